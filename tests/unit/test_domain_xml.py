"""Golden-file and round-trip tests of the pure domain-XML builder and parser (common/domain_xml.py).

Regenerate the golden files after an intended change with::

    VIRTFLEET_REGEN_GOLDEN=1 pytest tests/unit/test_domain_xml.py

then review the diff. Without the variable the XML must match the files byte for byte.
"""

from __future__ import annotations

import importlib.util
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from common.domain_xml import (
    VF_NAMESPACE,
    DomainXmlError,
    DomIfRow,
    ParsedDisk,
    ParsedDomain,
    ParsedGraphics,
    ParsedNic,
    build_disk_xml,
    build_domain_xml,
    build_interface_xml,
    domiflist,
    parse_domain_xml,
    spec_from_parsed,
)
from common.messages import vm
from common.messages.base import replace

GOLDEN_DIR = Path(__file__).parent / "golden" / "domain"
REGEN = os.environ.get("VIRTFLEET_REGEN_GOLDEN") == "1"
LIBVIRT_SAMPLE = "libvirt_running_sample.xml"  # written by hand, never regenerated
HAVE_LIBVIRT = importlib.util.find_spec("libvirt") is not None


def _uuid(n: int) -> str:
    return f"5b8f4c9e-1f0b-4b7a-9d4e-{n:012x}"


def _disk(target: str, path: str, **kwargs: object) -> vm.DiskSpec:
    return vm.DiskSpec(target=target, source="existing", path=path, **kwargs)  # type: ignore[arg-type]


# Every spec uses existing disks, lower-case MACs and explicit max values only where they differ from the
# current ones, so that spec_from_parsed(parse_domain_xml(build_domain_xml(spec))) == spec exactly.
DOMAIN_CASES: dict[str, vm.VmSpec] = {
    "minimal": vm.VmSpec(uuid=_uuid(1), name="minimal", vcpus=1, memory_mib=512),
    # ops notes: --vcpus 5,maxcpus=10,cpuset=1-4,6,8 --memory 512,maxmemory=1024
    "hotplug": vm.VmSpec(
        uuid=_uuid(2),
        name="hotplug",
        vcpus=5,
        max_vcpus=10,
        cpuset="1-4,6,8",
        memory_mib=512,
        max_memory_mib=1024,
        disks=(_disk("vda", "/var/lib/libvirt/images/hotplug.qcow2"),),
        nics=(vm.NicSpec(vm.NicKind.NETWORK, "default"),),
    ),
    # ops notes: virt-install --graphics vnc,password=foobar,port=5910,listen=0.0.0.0 --network bridge=br0
    #   --network bridge=br1 --disk /data/img/test.qcow2 --vcpus 1,maxvcpus=2 --memory 1024,maxmemory=2048
    "two_bridges_vnc": vm.VmSpec(
        uuid=_uuid(3),
        name="testlinux",
        vcpus=1,
        max_vcpus=2,
        memory_mib=1024,
        max_memory_mib=2048,
        disks=(_disk("vda", "/data/img/test.qcow2"),),
        nics=(vm.NicSpec(vm.NicKind.BRIDGE, "br0"), vm.NicSpec(vm.NicKind.BRIDGE, "br1")),
        graphics=vm.GraphicsSpec(listen="0.0.0.0", port=5910, password="foobar"),
    ),
    # ops notes: virt-install --virt-type kvm --name CentOS-7-x86_64 --ram 2048 --cdrom=/opt/Centos7.5.iso
    #   --disk path=/opt/CentOS-7-x86_64.raw --network network=default --graphics vnc,listen=0.0.0.0
    "cdrom_install": vm.VmSpec(
        uuid=_uuid(4),
        name="CentOS-7-x86_64",
        vcpus=1,
        memory_mib=2048,
        disks=(
            _disk("vda", "/opt/CentOS-7-x86_64.raw", format=vm.DiskFormat.RAW),
            _disk(
                "hda",
                "/opt/Centos7.5.iso",
                format=vm.DiskFormat.RAW,
                device=vm.DiskDevice.CDROM,
                bus=vm.DiskBus.IDE,
            ),
        ),
        nics=(vm.NicSpec(vm.NicKind.NETWORK, "default"),),
        graphics=vm.GraphicsSpec(listen="0.0.0.0"),
    ),
    # host-facts section 5: the TCG test guest booted straight into its kernel, console on a file
    "kernel_boot": vm.VmSpec(
        uuid=_uuid(5),
        name="tiny-guest",
        vcpus=1,
        max_vcpus=2,
        memory_mib=512,
        domain_type=vm.DomainType.QEMU,
        machine="pc-i440fx-7.2",
        kernel_boot=vm.KernelBoot(
            kernel="/var/lib/virtfleet/guest/vmlinuz-6.1.0-56-amd64",
            initrd="/var/lib/virtfleet/guest/initramfs.cpio.gz",
            cmdline="console=ttyS0 quiet",
        ),
        disks=(_disk("vda", "/var/lib/virtfleet/images/tiny-guest.qcow2"),),
        serial_log="/var/log/libvirt/qemu/tiny-guest-serial.log",
        description="TCG test guest",
    ),
    "cache_modes": vm.VmSpec(
        uuid=_uuid(6),
        name="cache-modes",
        vcpus=1,
        memory_mib=512,
        disks=tuple(
            _disk(f"vd{letter}", f"/images/cache-{mode.value}.qcow2", cache=mode)
            for letter, mode in zip("abcde", vm.CacheMode, strict=True)
        ),
    ),
    "io_modes": vm.VmSpec(
        uuid=_uuid(7),
        name="io-modes",
        vcpus=1,
        memory_mib=512,
        disks=(
            _disk("vda", "/images/io-native.raw", format=vm.DiskFormat.RAW, io=vm.IoMode.NATIVE),
            _disk(
                "vdb",
                "/images/io-native-directsync.qcow2",
                cache=vm.CacheMode.DIRECTSYNC,
                io=vm.IoMode.NATIVE,
            ),
            _disk("vdc", "/images/io-threads.qcow2", cache=vm.CacheMode.WRITEBACK, io=vm.IoMode.THREADS),
            _disk("vdd", "/images/io-uring.qcow2", io=vm.IoMode.IO_URING),
            _disk("vde", "/images/shared-ro.qcow2", readonly=True),
        ),
    ),
    "e1000_fixed_mac": vm.VmSpec(
        uuid=_uuid(8),
        name="e1000-guest",
        vcpus=2,
        memory_mib=1024,
        nics=(
            vm.NicSpec(vm.NicKind.NETWORK, "default", model=vm.NicModel.E1000, mac="52:54:00:12:34:56"),
            vm.NicSpec(vm.NicKind.BRIDGE, "br0", model=vm.NicModel.RTL8139),
        ),
    ),
    "cputune_hugepages": vm.VmSpec(
        uuid=_uuid(9),
        name="pinned",
        vcpus=2,
        memory_mib=1024,
        cputune=vm.CpuTune(vcpu_pins=(vm.VcpuPin(0, "2"), vm.VcpuPin(1, "3")), emulator_cpuset="0-1"),
        hugepage_size_kib=2048,
        disks=(_disk("vda", "/images/pinned.qcow2"),),
    ),
    "test_domain": vm.VmSpec(
        uuid=_uuid(10),
        name="test-driver-vm",
        vcpus=1,
        max_vcpus=4,
        memory_mib=256,
        max_memory_mib=512,
        domain_type=vm.DomainType.TEST,
        disks=(_disk("vda", "/images/test.qcow2"),),
        nics=(vm.NicSpec(vm.NicKind.NETWORK, "default", mac="52:54:00:aa:bb:01"),),
        graphics=vm.GraphicsSpec(),
    ),
}

DEVICE_CASES: dict[str, str] = {
    "device_disk": build_disk_xml(
        vm.DiskSpec(
            target="vdb",
            source="new",
            size_gib=10,
            pool="default",
            volume="data-1.qcow2",
            path="/var/lib/libvirt/images/data-1.qcow2",
            io=vm.IoMode.NATIVE,
        )
    ),
    "device_interface": build_interface_xml(
        vm.NicSpec(vm.NicKind.BRIDGE, "br1", model=vm.NicModel.VIRTIO, mac="52:54:00:ab:cd:ef")
    ),
}


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN_DIR / f"{name}.xml"
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"missing golden file {path}; create it with VIRTFLEET_REGEN_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8"), f"{name}: XML differs from {path}"


def _canonical(elem_or_text: ET.Element | str) -> str:
    text = elem_or_text if isinstance(elem_or_text, str) else ET.tostring(elem_or_text, encoding="unicode")
    return ET.canonicalize(xml_data=text, strip_text=True)


# ------------------------------------------------------------------------------------------------ golden


@pytest.mark.parametrize("name", sorted(DOMAIN_CASES))
def test_domain_golden(name: str) -> None:
    _check_golden(name, build_domain_xml(DOMAIN_CASES[name]))


@pytest.mark.parametrize("name", sorted(DEVICE_CASES))
def test_device_golden(name: str) -> None:
    _check_golden(name, DEVICE_CASES[name])


def test_no_stale_golden_files() -> None:
    expected = {f"{name}.xml" for name in [*DOMAIN_CASES, *DEVICE_CASES]} | {LIBVIRT_SAMPLE}
    assert {p.name for p in GOLDEN_DIR.glob("*.xml")} == expected


def test_build_is_deterministic() -> None:
    spec = DOMAIN_CASES["two_bridges_vnc"]
    assert build_domain_xml(spec) == build_domain_xml(replace(spec))


def test_exact_elements_of_two_bridges_vnc() -> None:
    root = ET.fromstring(build_domain_xml(DOMAIN_CASES["two_bridges_vnc"]))
    assert root.get("type") == "kvm"
    assert root.findtext("memory") == "2097152"
    assert root.findtext("currentMemory") == "1048576"
    vcpu = root.find("vcpu")
    assert vcpu is not None
    assert (vcpu.text, vcpu.attrib) == ("2", {"placement": "static", "current": "1"})
    graphics = root.find("devices/graphics")
    assert graphics is not None
    assert graphics.attrib == {
        "type": "vnc",
        "port": "5910",
        "autoport": "no",
        "listen": "0.0.0.0",
        "passwd": "foobar",
    }
    assert [i.get("type") for i in root.iterfind("devices/interface")] == ["bridge", "bridge"]
    assert [s.get("bridge") for s in root.iterfind("devices/interface/source")] == ["br0", "br1"]
    assert [f.tag for f in root.iterfind("features/*")] == ["acpi", "apic"]
    assert root.find(f"metadata/{{{VF_NAMESPACE}}}instance") is not None


def test_cdrom_boots_first_and_kernel_boot_has_no_boot_devices() -> None:
    cdrom = ET.fromstring(build_domain_xml(DOMAIN_CASES["cdrom_install"]))
    assert [b.get("dev") for b in cdrom.iterfind("os/boot")] == ["cdrom", "hd"]
    minimal = ET.fromstring(build_domain_xml(DOMAIN_CASES["minimal"]))
    assert [b.get("dev") for b in minimal.iterfind("os/boot")] == ["hd"]
    kernel = ET.fromstring(build_domain_xml(DOMAIN_CASES["kernel_boot"]))
    assert kernel.findall("os/boot") == []
    assert kernel.findtext("os/cmdline") == "console=ttyS0 quiet"


def test_default_size_hugepages_round_trip() -> None:
    spec = replace(DOMAIN_CASES["minimal"], hugepage_size_kib=0)
    root = ET.fromstring(build_domain_xml(spec))
    hugepages = root.find("memoryBacking/hugepages")
    assert hugepages is not None
    assert list(hugepages) == []
    assert parse_domain_xml(build_domain_xml(spec)).hugepage_size_kib == 0
    assert spec_from_parsed(parse_domain_xml(build_domain_xml(spec))) == spec


@pytest.mark.parametrize("name", sorted(DOMAIN_CASES))
def test_device_builders_match_domain_elements(name: str) -> None:
    spec = DOMAIN_CASES[name]
    root = ET.fromstring(build_domain_xml(spec))
    disks = root.findall("devices/disk")
    nics = root.findall("devices/interface")
    assert [_canonical(e) for e in disks] == [_canonical(build_disk_xml(d)) for d in spec.disks]
    assert [_canonical(e) for e in nics] == [_canonical(build_interface_xml(n)) for n in spec.nics]


# ------------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("name", sorted(DOMAIN_CASES))
def test_round_trip(name: str) -> None:
    spec = DOMAIN_CASES[name]
    parsed = parse_domain_xml(build_domain_xml(spec))
    assert parsed.uuid == spec.uuid
    assert parsed.name == spec.name
    assert parsed.domain_type == spec.domain_type.value
    assert parsed.vcpus == spec.vcpus
    assert parsed.max_vcpus == spec.effective_max_vcpus
    assert parsed.memory_mib == spec.memory_mib
    assert parsed.max_memory_mib == spec.effective_max_memory_mib
    assert parsed.managed is True
    assert parsed.cpuset == spec.cpuset
    assert parsed.cputune == spec.cputune
    assert parsed.hugepage_size_kib == spec.hugepage_size_kib
    assert parsed.kernel_boot == spec.kernel_boot
    assert parsed.serial_log == spec.serial_log
    assert [d.path for d in parsed.disks] == [d.path for d in spec.disks]
    assert [n.source for n in parsed.nics] == [n.source for n in spec.nics]
    assert spec_from_parsed(parsed) == spec


def test_round_trip_parsed_values_two_bridges_vnc() -> None:
    parsed = parse_domain_xml(build_domain_xml(DOMAIN_CASES["two_bridges_vnc"]))
    assert (parsed.vcpus, parsed.max_vcpus, parsed.memory_mib, parsed.max_memory_mib) == (1, 2, 1024, 2048)
    assert parsed.disks == (
        ParsedDisk(
            target="vda",
            device="disk",
            source_type="file",
            path="/data/img/test.qcow2",
            format="qcow2",
            bus="virtio",
            cache="none",
            io=None,
            readonly=False,
        ),
    )
    assert parsed.nics == (
        ParsedNic(kind="bridge", source="br0", model="virtio", mac=None, target=None),
        ParsedNic(kind="bridge", source="br1", model="virtio", mac=None, target=None),
    )
    assert parsed.graphics == ParsedGraphics(
        type="vnc", listen="0.0.0.0", port=5910, autoport=False, password_set=True, password="foobar"
    )
    assert "foobar" not in repr(parsed)
    assert domiflist(parsed) == (
        DomIfRow("-", "bridge", "br0", "virtio", "-"),
        DomIfRow("-", "bridge", "br1", "virtio", "-"),
    )


def test_new_disk_becomes_existing_on_import() -> None:
    disk = vm.DiskSpec(target="vda", size_gib=20, pool="default", volume="a.qcow2", path="/pool/a.qcow2")
    spec = vm.VmSpec(uuid=_uuid(20), name="fresh", vcpus=1, memory_mib=512, max_vcpus=1, disks=(disk,))
    imported = spec_from_parsed(parse_domain_xml(build_domain_xml(spec)))
    assert imported.disks == (_disk("vda", "/pool/a.qcow2"),)
    assert imported.max_vcpus == 0  # equal to vcpus: the spec's "same as current"


def test_mac_is_written_lower_case() -> None:
    xml = build_interface_xml(vm.NicSpec(vm.NicKind.NETWORK, "default", mac="52:54:00:AB:CD:EF"))
    assert '<mac address="52:54:00:ab:cd:ef" />' in xml


# ------------------------------------------------------------------------------------------------ libvirt sample


def _libvirt_sample() -> ParsedDomain:
    return parse_domain_xml((GOLDEN_DIR / LIBVIRT_SAMPLE).read_text(encoding="utf-8"))


def test_parse_libvirt_running_sample() -> None:
    parsed = _libvirt_sample()
    assert parsed.uuid == "0f6a3c7e-9d52-4b1e-8f43-2c7d9e1a5b60"
    assert parsed.name == "CentOS7-x86_64"
    assert parsed.domain_type == "kvm"
    assert (parsed.vcpus, parsed.max_vcpus) == (1, 2)
    assert (parsed.memory_mib, parsed.max_memory_mib) == (1024, 2048)
    assert parsed.managed is False
    assert (parsed.arch, parsed.machine) == ("x86_64", "pc-i440fx-rhel7.0.0")
    assert parsed.cpuset is None
    assert parsed.cputune is None
    assert parsed.hugepage_size_kib is None
    assert parsed.kernel_boot is None
    assert parsed.serial_log is None
    assert parsed.disks == (
        ParsedDisk(
            target="vda",
            device="disk",
            source_type="file",
            path="/opt/CentOS7-x86_64.qcow2",
            format="qcow2",
            bus="virtio",
            cache=None,
            io=None,
            readonly=False,
        ),
        ParsedDisk(
            target="hda",
            device="cdrom",
            source_type="file",
            path=None,
            format="raw",
            bus="ide",
            cache=None,
            io=None,
            readonly=True,
        ),
    )
    assert parsed.nics == (
        ParsedNic(kind="bridge", source="br0", model="virtio", mac="52:54:00:6f:1c:2a", target="vnet0"),
        ParsedNic(kind="network", source="default", model="e1000", mac="52:54:00:0b:9e:77", target="vnet1"),
    )
    assert parsed.graphics == ParsedGraphics(
        type="vnc", listen="0.0.0.0", port=5900, autoport=True, password_set=False
    )


def test_domiflist_of_libvirt_sample() -> None:
    assert domiflist(_libvirt_sample()) == (
        DomIfRow("vnet0", "bridge", "br0", "virtio", "52:54:00:6f:1c:2a"),
        DomIfRow("vnet1", "network", "default", "e1000", "52:54:00:0b:9e:77"),
    )


def test_import_libvirt_sample() -> None:
    spec = spec_from_parsed(_libvirt_sample())
    assert spec == vm.VmSpec(
        uuid="0f6a3c7e-9d52-4b1e-8f43-2c7d9e1a5b60",
        name="CentOS7-x86_64",
        vcpus=1,
        max_vcpus=2,
        memory_mib=1024,
        max_memory_mib=2048,
        domain_type=vm.DomainType.KVM,
        machine="pc-i440fx-rhel7.0.0",
        # the empty CD-ROM tray is left out; no cache attribute means QEMU's writeback
        disks=(_disk("vda", "/opt/CentOS7-x86_64.qcow2", cache=vm.CacheMode.WRITEBACK),),
        nics=(
            vm.NicSpec(vm.NicKind.BRIDGE, "br0", model=vm.NicModel.VIRTIO, mac="52:54:00:6f:1c:2a"),
            vm.NicSpec(vm.NicKind.NETWORK, "default", model=vm.NicModel.E1000, mac="52:54:00:0b:9e:77"),
        ),
        graphics=vm.GraphicsSpec(listen="0.0.0.0", port=None, password=None),
    )


@pytest.mark.parametrize(
    ("memory", "current", "expected"),
    [
        ("<memory unit='GiB'>2</memory>", "<currentMemory unit='MiB'>1536</currentMemory>", (1536, 2048)),
        ("<memory>1048576</memory>", "", (1024, 1024)),
        (
            "<memory unit='bytes'>1073741824</memory>",
            "<currentMemory unit='k'>524288</currentMemory>",
            (512, 1024),
        ),
        ("<memory unit='MB'>2000</memory>", "<currentMemory unit='M'>1000</currentMemory>", (1000, 1907)),
    ],
)
def test_memory_units(memory: str, current: str, expected: tuple[int, int]) -> None:
    xml = f"<domain type='kvm'><name>m</name><uuid>{_uuid(30)}</uuid>{memory}{current}<vcpu>1</vcpu></domain>"
    parsed = parse_domain_xml(xml)
    assert (parsed.memory_mib, parsed.max_memory_mib) == expected


# ------------------------------------------------------------------------------------------------ errors

_BASE = "<domain type='kvm'>{name}{uuid}<memory unit='KiB'>524288</memory><vcpu>1</vcpu></domain>"
_NAME = "<name>vm1</name>"
_UUID = f"<uuid>{_uuid(40)}</uuid>"


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<domain type='kvm'><name>vm1</name>", "malformed domain XML"),
        ("", "malformed domain XML"),
        ("<network><name>default</name></network>", "expected a <domain> root element, got <network>"),
        (_BASE.format(name="", uuid=_UUID), "domain XML has no <name>"),
        (_BASE.format(name="<name>  </name>", uuid=_UUID), "domain XML has no <name>"),
        (_BASE.format(name=_NAME, uuid=""), "domain XML has no <uuid>"),
        (_BASE.format(name=_NAME, uuid="<uuid>not-a-uuid</uuid>"), "domain vm1: invalid <uuid> 'not-a-uuid'"),
        (f"<domain><name>vm1</name>{_UUID}<vcpu>1</vcpu></domain>", "domain vm1: no <memory>"),
        (
            f"<domain>{_NAME}{_UUID}<memory unit='parsecs'>1</memory></domain>",
            "<memory>: unknown unit 'parsecs'",
        ),
        (f"<domain>{_NAME}{_UUID}<memory>1024</memory><vcpu>two</vcpu></domain>", "<vcpu> is not an integer"),
        (
            '<!DOCTYPE d [<!ENTITY x "y">]><domain><name>&x;</name></domain>',
            "domain XML must not contain a DOCTYPE or entity declarations",
        ),
    ],
)
def test_parse_errors(xml: str, message: str) -> None:
    with pytest.raises(DomainXmlError, match="^" + _escape(message)):
        parse_domain_xml(xml)


def _escape(text: str) -> str:
    return re.escape(text)


def test_domain_xml_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="has no <name>"):
        parse_domain_xml(_BASE.format(name="", uuid=_UUID))


def test_disk_without_path_is_refused() -> None:
    disk = vm.DiskSpec(target="vdb", size_gib=10, pool="default", volume="vm1-vdb.qcow2")
    spec = replace(DOMAIN_CASES["minimal"], disks=(disk,))
    with pytest.raises(ValueError, match=r"^disk vdb: no path"):
        build_domain_xml(spec)
    with pytest.raises(ValueError, match=r"^disk vdb: no path"):
        build_disk_xml(disk)


@pytest.mark.parametrize(
    ("disk", "message"),
    [
        (
            _disk("vdb", "/x.iso", device=vm.DiskDevice.CDROM, format=vm.DiskFormat.RAW),
            "disk vdb: a CD-ROM cannot be on the virtio bus",
        ),
        (
            _disk("sdb", "/x.qcow2", bus=vm.DiskBus.SATA, readonly=True),
            "disk sdb: QEMU has no read-only sata disks (use virtio or scsi)",
        ),
        (
            _disk("vdb", "/x.qcow2", cache=vm.CacheMode.WRITEBACK, io=vm.IoMode.NATIVE),
            "disk vdb: io='native' needs cache 'none' or 'directsync', not 'writeback'",
        ),
    ],
)
def test_disks_qemu_would_refuse(disk: vm.DiskSpec, message: str) -> None:
    with pytest.raises(ValueError, match="^" + _escape(message)):
        build_disk_xml(disk)


def test_build_refuses_bad_values() -> None:
    minimal = DOMAIN_CASES["minimal"]
    with pytest.raises(ValueError, match="invalid uuid 'nope'"):
        build_domain_xml(replace(minimal, uuid="nope"))
    with pytest.raises(ValueError, match="vcpupin for vCPU 1, but it has 1 vCPUs"):
        build_domain_xml(replace(minimal, cputune=vm.CpuTune(vcpu_pins=(vm.VcpuPin(1, "0"),))))
    with pytest.raises(ValueError, match="<description> contains a character"):
        build_domain_xml(replace(minimal, description="bell\x07"))


def _foreign(devices: str, domain_type: str = "kvm", name: str = "vm1") -> str:
    return (
        f"<domain type='{domain_type}'><name>{name}</name>{_UUID}<memory unit='KiB'>524288</memory>"
        f"<vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os><devices>{devices}</devices></domain>"
    )


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        (
            _foreign("<interface type='direct'><source dev='eth0' mode='bridge'/></interface>"),
            "interface 0 (direct): type 'direct' is not supported",
        ),
        (
            _foreign("<interface type='bridge'><source bridge='br0'/><model type='ne2k_pci'/></interface>"),
            "interface 0 (bridge): model 'ne2k_pci' is not supported",
        ),
        (
            _foreign("<disk type='block' device='disk'><source dev='/dev/vg/lv'/><target dev='vda'/></disk>"),
            "disk vda: only file-backed disks can be imported, not type 'block'",
        ),
        (_foreign("<graphics type='spice' autoport='yes'/>"), "graphics type 'spice' is not supported"),
        (_foreign("", domain_type="xen"), "domain type 'xen' is not supported"),
        (_foreign("", name="has space"), "domain has space cannot be imported: invalid VM name"),
        (
            _foreign("<graphics type='vnc' port='-1' autoport='yes' passwd='123456789'/>"),
            "domain vm1 cannot be imported: VNC passwords are limited to 8 characters",
        ),
    ],
)
def test_import_refuses_what_virtfleet_cannot_represent(xml: str, message: str) -> None:
    parsed = parse_domain_xml(xml)
    with pytest.raises(DomainXmlError, match="^" + _escape(message)):
        spec_from_parsed(parsed)


def test_foreign_defaults_on_import() -> None:
    parsed = parse_domain_xml(
        _foreign(
            "<disk type='file' device='disk'><source file='/img/a.img'/><target dev='sdb'/></disk>"
            "<interface type='network'><source network='default'/></interface>"
        )
    )
    assert parsed.disks[0].bus is None
    assert parsed.nics[0].model is None
    spec = spec_from_parsed(parsed)
    assert spec.disks == (
        _disk(
            "sdb", "/img/a.img", format=vm.DiskFormat.RAW, bus=vm.DiskBus.SCSI, cache=vm.CacheMode.WRITEBACK
        ),
    )
    assert spec.nics == (vm.NicSpec(vm.NicKind.NETWORK, "default", model=vm.NicModel.E1000),)
    assert domiflist(parsed) == (DomIfRow("-", "network", "default", "-", "-"),)


# ------------------------------------------------------------------------------------------------ libvirt


@pytest.mark.skipif(
    not HAVE_LIBVIRT, reason="libvirt-python is not importable: cannot validate with test:///default"
)
@pytest.mark.parametrize("name", sorted(DOMAIN_CASES))
def test_libvirt_test_driver_accepts(name: str) -> None:
    import libvirt  # noqa: PLC0415 - optional; the skipif above covers its absence

    spec = replace(DOMAIN_CASES[name], name=f"vf-golden-{name.replace('_', '-')}")
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(build_domain_xml(spec))
        try:
            live = parse_domain_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE))
            assert live.managed is True
            assert (live.vcpus, live.max_vcpus) == (spec.vcpus, spec.effective_max_vcpus)
            assert (live.memory_mib, live.max_memory_mib) == (spec.memory_mib, spec.effective_max_memory_mib)
            # libvirt invents MACs (and test-driver taps) for NICs that have none; everything else comes back.
            invented = [n.mac for n in live.nics]
            expected = replace(
                spec,
                nics=tuple(
                    replace(nic, mac=nic.mac or mac) for nic, mac in zip(spec.nics, invented, strict=True)
                ),
            )
            assert spec_from_parsed(live) == expected
        finally:
            dom.undefine()
    finally:
        conn.close()
