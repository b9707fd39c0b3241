"""Pure host-fact parsers and the thin readers, on captured text and temporary files."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.drivers import host_facts

INTEL_CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov vmx smx est tm2 ssse3
vmx flags\t: vnmi preemption_timer posted_intr invvpid ept_x_only ept_ad
bugs\t\t: spectre_v1 spectre_v2
"""

AMD_CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep svm extapic cr8_legacy
"""

# The project machine (Firecracker guest on EPYC): no vmx, no svm; note "vmx flags"-like noise elsewhere.
NO_VIRT_CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr hypervisor svm_lock_not_really
bugs\t\t: sysret_ss_attrs svm
power management:
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [(INTEL_CPUINFO, True), (AMD_CPUINFO, True), (NO_VIRT_CPUINFO, False), ("", False)],
)
def test_cpu_has_virt_flags(text: str, expected: bool) -> None:
    assert host_facts.cpu_has_virt_flags(text) is expected


def test_only_the_flags_line_counts() -> None:
    assert not host_facts.cpu_has_virt_flags("vmx flags\t: vnmi ept\nflags\t: fpu sse2\n")
    assert not host_facts.cpu_has_virt_flags("bugs\t: svm vmx\n")


def test_uri_helpers() -> None:
    assert host_facts.is_test_uri("test:///default")
    assert not host_facts.is_test_uri("qemu:///system")
    assert host_facts.simulated_node_file("test:///default") is None
    assert host_facts.simulated_node_file("qemu:///system") is None
    assert host_facts.simulated_node_file("test:///srv/nodes/my%20host.xml") == Path("/srv/nodes/my host.xml")


@pytest.mark.parametrize(("number", "text"), [(9000000, "9.0.0"), (7002022, "7.2.22"), (2, "0.0.2")])
def test_version_string(number: int, text: str) -> None:
    assert host_facts.version_string(number) == text


NODE_XML = """<node>
  <pool type='dir'><name>other</name><capacity unit='TiB'>1</capacity></pool>
  <pool type='dir'><name>default</name><capacity unit='GiB'>200</capacity></pool>
  <pool type='dir'><name>plain</name><capacity>4096</capacity></pool>
  <pool type='dir'><name>nocap</name></pool>
</node>"""


@pytest.mark.parametrize(
    ("pool", "expected"),
    [("default", 200 * 1024**3), ("other", 1024**4), ("plain", 4096), ("nocap", None), ("missing", None)],
)
def test_pool_capacity_from_node_xml(pool: str, expected: int | None) -> None:
    assert host_facts.pool_capacity_from_node_xml(NODE_XML, pool) == expected


def test_pool_capacity_from_garbage() -> None:
    assert host_facts.pool_capacity_from_node_xml("<node", "default") is None


def test_fixture_node_files_have_the_promised_sizes() -> None:
    nodes = Path(__file__).resolve().parents[1] / "fixtures" / "nodes"
    sizes = {
        name: host_facts.read_node_file_pool_capacity(f"test://{nodes / f'{name}.xml'}", "default")
        for name in ("small", "medium", "large")
    }
    assert sizes == {"small": 200 * 1024**3, "medium": 500 * 1024**3, "large": 1000 * 1024**3}


def test_cpu_model_from_capabilities() -> None:
    caps = "<capabilities><host><cpu><arch>x86_64</arch><model>EPYC-Rome</model></cpu></host></capabilities>"
    assert host_facts.cpu_model_from_capabilities(caps) == "EPYC-Rome"
    assert host_facts.cpu_model_from_capabilities("<capabilities><host><cpu/></host></capabilities>") is None
    assert host_facts.cpu_model_from_capabilities("not xml") is None


def test_list_bridges(tmp_path: Path) -> None:
    for name in ("br0", "eth0", "virbr0", "lo"):
        (tmp_path / name).mkdir()
    (tmp_path / "br0" / "bridge").mkdir()
    (tmp_path / "virbr0" / "bridge").mkdir()
    (tmp_path / "eth0" / "brport").mkdir()
    assert host_facts.list_bridges(tmp_path) == ("br0", "virbr0")
    assert host_facts.list_bridges(tmp_path / "missing") == ()


def test_detect_hw_virt_needs_both_device_and_flags(tmp_path: Path) -> None:
    kvm = tmp_path / "kvm"
    kvm.write_bytes(b"")
    intel = tmp_path / "cpuinfo-intel"
    intel.write_text(INTEL_CPUINFO)
    none = tmp_path / "cpuinfo-none"
    none.write_text(NO_VIRT_CPUINFO)

    assert host_facts.detect_hw_virt(kvm, intel) is True
    assert host_facts.detect_hw_virt(kvm, none) is False
    assert host_facts.detect_hw_virt(tmp_path / "no-kvm", intel) is False
    assert host_facts.detect_hw_virt(kvm, tmp_path / "no-cpuinfo") is False


def test_kvm_device_not_openable(tmp_path: Path) -> None:
    assert host_facts.kvm_device_usable(tmp_path / "absent") is False
    assert host_facts.kvm_device_usable(tmp_path) is False  # a directory cannot be opened read-write


def test_bridges_in_interface_xml_picks_only_bridges() -> None:
    docs = [
        "<interface type='bridge' name='br1'><bridge><interface type='ethernet' name='eth1'/></bridge></interface>",
        "<interface type='ethernet' name='eth0'/>",
        "<interface type='bridge' name='br0'/>",
        "<interface type='bond' name='bond0'/>",
        "not xml",
        "<interface type='bridge'/>",  # no name: ignored
    ]
    assert host_facts.bridges_in_interface_xml(docs) == ("br0", "br1")
    assert host_facts.bridges_in_interface_xml([]) == ()
