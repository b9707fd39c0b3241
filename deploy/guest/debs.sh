# Shared by build-guest.sh and build-netlab.sh (sourced, not run): fetch the stock
# Debian 6.1 kernel and busybox-static .debs into the $DEBS cache and unpack them.
#
# The caller defines log, die, DEBS (the .deb cache) and WORK (a scratch directory),
# then calls unpack_kernel_and_busybox, which sets KDEB, BBDEB, KVER and MODDIR and
# leaves the kernel in $WORK/k and busybox in $WORK/bb. Then, for the initramfs in $IR:
# add_module copies a module and what it depends on into $IR/lib/modules, appending
# their names to ORDER in load order; extract_vmlinux makes the uncompressed kernel.

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

cached_deb() { # newest cached .deb matching a glob, or nothing
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

list_kernels() {
    apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -rV
}

unpack_kernel_and_busybox() {
    local candidates pkg
    KDEB="$(cached_deb 'linux-image-6.1.0-*-amd64_*.deb')"
    if [[ -z "$KDEB" ]]; then
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
}

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

module_deps() { # the "depends=" of a .ko file, space-separated
    tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '
}

add_module() { # add_module NAME [optional]
    local name="$1" optional="${2:-}" ko dep
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
    for dep in $(module_deps "$IR/lib/modules/$name.ko"); do
        add_module "$dep"
    done
    ORDER+=("$name")
}

extract_vmlinux() { # extract_vmlinux VMLINUZ VMLINUX: the uncompressed ELF kernel (PVH entry)
    python3 - "$1" "$2" <<'PY'
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
}
