#!/usr/bin/env bash
# Build a tiny bootable guest for the real-QEMU tests (direct kernel boot).
#
#   deploy/guest/build-guest.sh [OUTDIR]
#   OUTDIR defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/virtfleet/guest
#
# Outputs in OUTDIR:
#   vmlinuz    stock Debian 6.1 kernel (bzImage), from the newest
#              linux-image-6.1.0-N-amd64 that apt offers
#   vmlinux    the same kernel uncompressed (ELF with a PVH note): QEMU boots it
#              directly, skipping SeaBIOS + decompression (~5 s faster on TCG)
#   initrd.gz  busybox-static initramfs whose /init (see below) prints
#              GUEST-HELLO, then every second
#              "GUEST-STATE cpus=<online list> memtotal_kb=<MemTotal>"
#   kernel-version, debs/ (the downloaded .debs, kept as a cache)
#
# Idempotent: exits at once when the outputs exist. Needs apt (apt-get
# download works as any user; `apt-get update` only as root) and python3.
#
# libvirt runs QEMU as libvirt-qemu, which must be able to read the files:
# they are made world-readable, but every parent directory must also be
# traversable (as root, $HOME=/root is 0700: use a directory such as
# /var/cache/virtfleet/guest, as deploy/test.sh does).
set -euo pipefail

OUT="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/virtfleet/guest}"

log() { printf 'build-guest: %s\n' "$*"; }
die() {
    printf 'build-guest: ERROR: %s\n' "$*" >&2
    exit 1
}

# Warn when QEMU (run by libvirt as libvirt-qemu) could not open the files.
check_qemu_access() {
    [[ $EUID -eq 0 ]] && id libvirt-qemu >/dev/null 2>&1 || return 0
    runuser -u libvirt-qemu -- test -r "$OUT/initrd.gz" ||
        log "WARNING: user libvirt-qemu cannot read $OUT/initrd.gz (is every parent directory" \
            "traversable?): libvirt will fail with 'could not open kernel file'" >&2
}

if [[ -s "$OUT/vmlinuz" && -s "$OUT/vmlinux" && -s "$OUT/initrd.gz" ]]; then
    check_qemu_access
    exit 0
fi

mkdir -p "$OUT/debs"
OUT="$(cd "$OUT" && pwd)"
DEBS="$OUT/debs"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/virtfleet-guest.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

apt_updated=0
maybe_apt_update() {
    if ((apt_updated == 0)) && [[ $EUID -eq 0 ]]; then
        log "apt-get update"
        apt-get update -q >/dev/null
        apt_updated=1
        return 0
    fi
    return 1
}

# newest cached .deb matching a glob, or nothing
cached_deb() {
    local f best=""
    for f in "$DEBS"/$1; do
        [[ -f "$f" ]] && best="$(printf '%s\n%s\n' "$best" "$f" | sed '/^$/d' | sort -V | tail -n1)"
    done
    printf '%s' "$best"
}

download() { # download PKG -> prints the .deb path
    (cd "$DEBS" && apt-get download -q "$1" >&2) || return 1
    cached_deb "${1}_*.deb"
}

# ------------------------------------------------------------- kernel .deb
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
    log "downloading busybox-static"
    BBDEB="$(download busybox-static)" || { maybe_apt_update && BBDEB="$(download busybox-static)"; } ||
        die "could not download busybox-static"
fi
log "kernel:  $(basename "$KDEB")"
log "busybox: $(basename "$BBDEB")"

dpkg-deb -x "$KDEB" "$WORK/k"
dpkg-deb -x "$BBDEB" "$WORK/bb"

KVER="$(find "$WORK/k/lib/modules" -mindepth 1 -maxdepth 1 -printf '%f\n' | head -n1)"
[[ -n "$KVER" ]] || die "no /lib/modules in $(basename "$KDEB")"
MODDIR="$WORK/k/lib/modules/$KVER"
[[ -f "$WORK/k/boot/vmlinuz-$KVER" ]] || die "no /boot/vmlinuz-$KVER in $(basename "$KDEB")"

# ---------------------------------------------------------------- initramfs
IR="$WORK/ir"
mkdir -p "$IR"/{bin,dev,proc,sys,etc,lib/modules}
cp "$WORK/bb/bin/busybox" "$IR/bin/busybox"

# Modules, loaded in dependency order (there is no modprobe/udev in the guest).
# Dependencies come from the "depends=" field of each .ko's .modinfo section.
ORDER=()
declare -A SEEN=()

find_ko() { # module name -> path of its .ko / .ko.xz (names may use - or _)
    find "$MODDIR/kernel" \( -name "$1.ko" -o -name "$1.ko.xz" \
        -o -name "${1//_/-}.ko" -o -name "${1//_/-}.ko.xz" \) -print -quit
}

is_builtin() {
    grep -qE "/(${1}|${1//_/-})\.ko$" "$MODDIR/modules.builtin" 2>/dev/null
}

add_module() { # add_module NAME [optional]
    local name="$1" optional="${2:-}" ko deps dep
    [[ -n "${SEEN[$name]:-}" ]] && return 0
    SEEN[$name]=1
    if is_builtin "$name"; then
        log "module $name: built in"
        return 0
    fi
    ko="$(find_ko "$name")"
    if [[ -z "$ko" ]]; then
        [[ -n "$optional" ]] && {
            log "module $name: not available, skipped"
            return 0
        }
        die "module $name not found for $KVER"
    fi
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
    virtio_balloon virtio_blk virtio_net; do
    add_module "$m"
done
# ACPI power button + evdev: lets /init notice `virsh shutdown` and power off.
add_module button optional
add_module evdev optional
log "modules (load order): ${ORDER[*]}"

cat >"$IR/init" <<EOF
#!/bin/busybox sh
# virtfleet test guest /init (PID 1). Generated by deploy/guest/build-guest.sh
# for kernel $KVER.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in ${ORDER[*]}; do
    insmod /lib/modules/\$m.ko || echo "GUEST-INSMOD-FAIL \$m"
done
EOF
cat >>"$IR/init" <<'EOF'
echo "GUEST-HELLO kernel=$(uname -r)"

# ACPI power button (what `virsh shutdown` presses): the button driver exposes
# an input device named "Power Button"; any event read from it means a press.
# evdev reads need a buffer of at least one struct input_event (24 bytes).
power_button_watch() {
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        for d in /sys/class/input/event*; do
            [ -r "$d/device/name" ] || continue
            if [ "$(cat "$d/device/name")" = "Power Button" ]; then
                dd if="/dev/input/${d##*/}" of=/dev/null bs=24 count=1 2>/dev/null
                echo "GUEST-POWEROFF"
                sync
                poweroff -f
            fi
        done
        sleep 1
    done
    echo "GUEST-NO-POWER-BUTTON"
}
power_button_watch &

while true; do
    # No udev: online hot-plugged vCPUs ourselves.
    for f in /sys/devices/system/cpu/cpu[0-9]*/online; do
        [ -r "$f" ] || continue
        [ "$(cat "$f")" = 0 ] && echo 1 >"$f" 2>/dev/null
    done
    echo "GUEST-STATE cpus=$(cat /sys/devices/system/cpu/online) memtotal_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
    sleep 1
done
EOF
chmod 755 "$IR/init"

(cd "$IR" && find . | "$IR/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -9) >"$WORK/initrd.gz"

# Uncompressed ELF kernel (PVH entry) for faster direct boot.
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

cp "$WORK/k/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
echo "$KVER" >"$WORK/kernel-version"
for f in vmlinuz vmlinux initrd.gz kernel-version; do
    chmod 644 "$WORK/$f"
    mv -f "$WORK/$f" "$OUT/$f"
done
chmod 755 "$OUT"
log "built $OUT (kernel $KVER, initrd $(du -k "$OUT/initrd.gz" | cut -f1) KiB)"
check_qemu_access
