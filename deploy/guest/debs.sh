# Shared by build-guest.sh and build-netlab.sh (sourced, not run): fetch the stock
# Debian 6.1 kernel and busybox-static .debs into the $DEBS cache and unpack them.
#
# The caller defines log, die, DEBS (the .deb cache) and WORK (a scratch directory),
# then calls unpack_kernel_and_busybox, which sets KDEB, BBDEB, KVER and MODDIR and
# leaves the kernel in $WORK/k and busybox in $WORK/bb.

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
