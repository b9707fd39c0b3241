#!/usr/bin/env bash
# Build the "netlab" guest: a stock Debian kernel whose initramfs loads bonding,
# 8021q, bridge, veth and 9p, mounts the HOST's root filesystem read-only over
# virtio-9p and runs the host's own Python there (see /work/shared/bond-in-guest.md).
# The test suite boots it once per run (tests/realnet) to test bonds and VLANs on
# a real kernel: this machine's kernel has neither and cannot load modules.
#
#   deploy/guest/build-netlab.sh [OUTDIR]
#   OUTDIR defaults to /var/cache/virtfleet/netlab
#
# Outputs in OUTDIR: vmlinux (uncompressed kernel, PVH boot), initrd.gz,
# kernel-version, stamp. The kernel .deb is taken from (and downloaded into)
# $VIRTFLEET_TEST_GUEST_DIR/debs (default /var/cache/virtfleet/guest/debs),
# the cache deploy/guest/build-guest.sh fills, so both guests share one download.
# Idempotent: exits at once when the outputs exist and were built by this
# version of the script. Needs apt-get (download), dpkg-deb and python3.
#
# The guest's /init (PID 1, busybox):
#   1. loads the modules (dependency order from each .ko's depends= field);
#      bonding with max_bonds=0 so it does not create bond0 by itself;
#   2. mounts 9p tag "hostroot" read-only on /newroot, and proc, sysfs,
#      devtmpfs and a tmpfs /run inside it;
#   3. mounts 9p tag "out" (writable, from the host) on /newroot/run/out;
#   4. chroots into /newroot and runs /run/out/guest.sh with /bin/sh;
#   5. prints "NETLAB-RC=<rc>" and powers off.
set -euo pipefail

OUT="${1:-/var/cache/virtfleet/netlab}"
DEBS="${VIRTFLEET_TEST_GUEST_DIR:-/var/cache/virtfleet/guest}/debs"
SELF_HASH="$(sha256sum "$0" | cut -c1-16)"

log() { printf 'build-netlab: %s\n' "$*"; }
die() {
    printf 'build-netlab: ERROR: %s\n' "$*" >&2
    exit 1
}

if [[ -s "$OUT/vmlinux" && -s "$OUT/initrd.gz" && "$(cat "$OUT/stamp" 2>/dev/null)" == "$SELF_HASH" ]]; then
    exit 0
fi

mkdir -p "$OUT" "$DEBS"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/virtfleet-netlab.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

cached_deb() { # newest cached .deb matching a glob, or nothing
    local f best=""
    for f in "$DEBS"/$1; do
        [[ -f "$f" ]] && best="$(printf '%s\n%s\n' "$best" "$f" | sed '/^$/d' | sort -V | tail -n1)"
    done
    printf '%s' "$best"
}

apt_updated=0
maybe_apt_update() {
    if ((apt_updated == 0)) && [[ $EUID -eq 0 ]]; then
        apt-get update -q >/dev/null
        apt_updated=1
        return 0
    fi
    return 1
}

download() { # download PKG -> prints the .deb path
    (cd "$DEBS" && apt-get download -q "$1" >&2) || return 1
    cached_deb "${1}_*.deb"
}

KDEB="$(cached_deb 'linux-image-6.1.0-*-amd64_*.deb')"
if [[ -z "$KDEB" ]]; then
    list_kernels() {
        apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -rV
    }
    candidates="$(list_kernels)"
    if [[ -z "$candidates" ]] && maybe_apt_update; then
        candidates="$(list_kernels)"
    fi
    [[ -n "$candidates" ]] || die "apt offers no linux-image-6.1.0-N-amd64 package"
    for pkg in $candidates; do
        log "downloading $pkg"
        if KDEB="$(download "$pkg")" && [[ -n "$KDEB" ]]; then
            break
        fi
        KDEB=""
    done
    [[ -n "$KDEB" ]] || die "could not download any of: $candidates"
fi
BBDEB="$(cached_deb 'busybox-static_*.deb')"
if [[ -z "$BBDEB" ]]; then
    BBDEB="$(download busybox-static)" || { maybe_apt_update && BBDEB="$(download busybox-static)"; } ||
        die "could not download busybox-static"
fi
log "kernel:  $(basename "$KDEB")"

dpkg-deb -x "$KDEB" "$WORK/k"
dpkg-deb -x "$BBDEB" "$WORK/bb"
KVER="$(find "$WORK/k/lib/modules" -mindepth 1 -maxdepth 1 -printf '%f\n' | head -n1)"
[[ -n "$KVER" ]] || die "no /lib/modules in $(basename "$KDEB")"
MODDIR="$WORK/k/lib/modules/$KVER"

IR="$WORK/ir"
mkdir -p "$IR"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$WORK/bb/bin/busybox" "$IR/bin/busybox"

ORDER=()
declare -A SEEN=()
find_ko() {
    find "$MODDIR/kernel" \( -name "$1.ko" -o -name "$1.ko.xz" \
        -o -name "${1//_/-}.ko" -o -name "${1//_/-}.ko.xz" \) -print -quit
}
is_builtin() {
    grep -qE "/(${1}|${1//_/-})\.ko$" "$MODDIR/modules.builtin" 2>/dev/null
}
add_module() {
    local name="$1" ko deps dep
    [[ -n "${SEEN[$name]:-}" ]] && return 0
    SEEN[$name]=1
    if is_builtin "$name"; then
        return 0
    fi
    ko="$(find_ko "$name")"
    [[ -n "$ko" ]] || die "module $name not found for $KVER"
    if [[ "$ko" == *.xz ]]; then
        xz -dc "$ko" >"$IR/lib/modules/$name.ko"
    else
        cp "$ko" "$IR/lib/modules/$name.ko"
    fi
    deps="$(tr '\0' '\n' <"$IR/lib/modules/$name.ko" | sed -n 's/^depends=//p' | head -n1)"
    for dep in ${deps//,/ }; do
        add_module "$dep"
    done
    ORDER+=("$name")
}
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
    9pnet 9pnet_virtio netfs fscache 9p veth bridge 8021q; do
    add_module "$m"
done
# bonding last and on its own: it needs max_bonds=0 (else it creates bond0 itself)
for dep in $(tr '\0' '\n' <"$(find_ko bonding)" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '); do
    add_module "$dep"
done
cp "$(find_ko bonding)" "$IR/lib/modules/bonding.ko"
log "modules: ${ORDER[*]} bonding"

cat >"$IR/init" <<EOF
#!/bin/busybox sh
# virtfleet netlab guest /init, generated by deploy/guest/build-netlab.sh for $KVER
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
for m in ${ORDER[*]}; do insmod /lib/modules/\$m.ko || echo "NETLAB-INSMOD-FAIL \$m"; done
insmod /lib/modules/bonding.ko max_bonds=0 || echo "NETLAB-INSMOD-FAIL bonding"
EOF
cat >>"$IR/init" <<'EOF'
R=/newroot
# multidevs=remap on the QEMU side; cache=loose makes the Python imports bearable
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot $R || echo "NETLAB-MOUNT-FAIL hostroot"
mount -t proc proc $R/proc; mount -t sysfs sysfs $R/sys; mount -t devtmpfs devtmpfs $R/dev
mount -t tmpfs tmpfs $R/run
mkdir -p $R/run/out $R/run/netns
mount -t 9p -o trans=virtio,version=9p2000.L,rw out $R/run/out || echo "NETLAB-MOUNT-FAIL out"
echo "NETLAB-START uptime=$(cut -d' ' -f1 /proc/uptime)"
chroot $R /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/run /bin/sh /run/out/guest.sh </dev/null 2>&1
echo "NETLAB-RC=$? uptime=$(cut -d' ' -f1 /proc/uptime)"
sync
poweroff -f
EOF
chmod 755 "$IR/init"
(cd "$IR" && find . | "$IR/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1) >"$WORK/initrd.gz"

python3 - "$WORK/k/boot/vmlinuz-$KVER" "$WORK/vmlinux" <<'PY'
import lzma, sys
data = open(sys.argv[1], "rb").read()
start = data.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit("vmlinuz is not XZ-compressed")
out = lzma.LZMADecompressor().decompress(data[start:])
if out[:4] != b"\x7fELF":
    sys.exit("decompressed kernel is not an ELF file")
open(sys.argv[2], "wb").write(out)
PY

echo "$KVER" >"$WORK/kernel-version"
for f in vmlinux initrd.gz kernel-version; do
    mv -f "$WORK/$f" "$OUT/$f"
done
echo "$SELF_HASH" >"$OUT/stamp"
log "built $OUT (kernel $KVER)"
