#!/usr/bin/env bash
# Build the guest kernel used by the vhost-nic lab.
#
#   build-kernel.sh OUTDIR [--tree PATH]        build into OUTDIR (bzImage, .config)
#   build-kernel.sh --print-key [--tree PATH]   print the cache key of this recipe and exit
#
# The source is Debian's linux-source-7.3 binary package (arch:all) from the
# trixie-backports suite, fetched with a private apt configuration (the
# system's apt sources are not touched) and kept in a download cache so later
# runs need no network.  The patch series listed in `series` is applied to the
# unpacked tree with `patch -p1`.  The config is `make tinyconfig`, then
# `make kvm_guest.config`, then lab.config merged on top, then
# `make olddefconfig`; every option that lab.config sets is then checked in
# the final .config before anything is compiled.
#
# With --tree PATH the recipe uses that kernel tree (Linux 7.3) instead of the
# Debian package.  Patches of the series that are not in it yet are applied:
# with `git am` when PATH is a git work tree, else with `patch -p1`.  Objects
# go to OUTDIR/obj (make O=...), so the tree itself gets no build output and
# later runs are incremental.
#
# OUTDIR is reused when OUTDIR/.inputs-hash equals the cache key: the key is
# the SHA-256 of the source identity (the pinned Debian version and .deb
# checksum, or for --tree the tree's path, HEAD and uncommitted changes), this
# script, lab.config, the series file and every patch it lists, in order.
#
# Environment:
#   DEBIAN_MIRROR        archive to fetch the package from
#                        (default http://deb.debian.org/debian)
#   XDG_CACHE_HOME       download cache root (default ~/.cache); the .deb is
#                        kept in $XDG_CACHE_HOME/vhost-nic-lab/downloads
#   BUILD_JOBS           parallel compile jobs (default: nproc)
#   KEEP_BUILD_DIR=1     keep the work directory after a successful build
set -euo pipefail

APT_BUILD_DEPS=(build-essential bc bison flex libelf-dev libssl-dev cpio
    xz-utils gzip patch git debian-archive-keyring)

PROG=build-kernel.sh
SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
SCRIPT_DIR=$(dirname "$SCRIPT_PATH")
# The pinned Debian source (LINUX_*), the series, the shared steps.
# shellcheck source=recipe-lib.sh
. "$SCRIPT_DIR/recipe-lib.sh"
LAB_CONFIG="$SCRIPT_DIR/lab.config"

usage() {
    cat >&2 <<EOF
usage: $PROG OUTDIR [--tree PATH]
       $PROG --print-key [--tree PATH]

Builds the lab guest kernel (Debian $LINUX_PACKAGE $LINUX_DEB_VERSION, or the
Linux 7.3 tree at PATH) with the patches listed in $SERIES and the config
fragment $LAB_CONFIG, and puts bzImage, .config and System.map into OUTDIR.
--print-key prints the cache key that OUTDIR/.inputs-hash must match for
OUTDIR to be reused.
EOF
}

# ---- arguments -------------------------------------------------------------
parse_recipe_args "$@"
require_tree Makefile Kconfig

cache_key() {
    recipe_cache_key "$LAB_CONFIG"
}

[ -f "$LAB_CONFIG" ] || die "missing $LAB_CONFIG"
if [ "$PRINT_KEY" = 1 ]; then
    cache_key
    exit 0
fi

KEY=$(cache_key)
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
BZIMAGE="$OUTDIR/bzImage"

claim_outdir "$BZIMAGE"

recipe_begin vhost-nic-kernel-build

if [ "$(uname -m)" != x86_64 ] && [ -z "${CROSS_COMPILE:-}" ]; then
    die "this recipe builds an x86_64 kernel; on $(uname -m) set CROSS_COMPILE"
fi

# ---- 1. host packages ------------------------------------------------------
step host-packages "build dependencies from apt"
install_apt_packages "${APT_BUILD_DEPS[@]}"

# ---- 2. source -------------------------------------------------------------
fetch_and_unpack_source
if [ -z "$TREE" ]; then OBJ="$WORK/obj"; else OBJ="$OUTDIR/obj"; fi

# ---- 3. patches ------------------------------------------------------------
apply_series

# ---- 4. config -------------------------------------------------------------
KMAKE=(make -C "$SRC" O="$OBJ" ARCH=x86_64
    KBUILD_BUILD_USER=vhost-nic-lab KBUILD_BUILD_HOST=lab)
step config "tinyconfig + kvm_guest.config + lab.config, olddefconfig"
STEP_HINT="see $LAB_CONFIG"
mkdir -p "$OBJ"
rm -f "$OBJ/.config"
run "${KMAKE[@]}" tinyconfig
run "${KMAKE[@]}" kvm_guest.config
(cd "$SRC" && run scripts/kconfig/merge_config.sh -m -O "$OBJ" \
    "$OBJ/.config" "$LAB_CONFIG")
run "${KMAKE[@]}" olddefconfig

step check-config "every option in lab.config has its requested value"
STEP_HINT="an option's dependencies are not met or it does not exist in this tree: read its Kconfig entry ('make O=$OBJ menuconfig', '/' to search) and fix $LAB_CONFIG"
dups=$(sed -nE 's/^(CONFIG_[A-Za-z0-9_]+)=.*$/\1/p
                s/^# (CONFIG_[A-Za-z0-9_]+) is not set$/\1/p' "$LAB_CONFIG" |
    sort | uniq -d | tr '\n' ' ')
[ -z "$dups" ] || die "$LAB_CONFIG sets these options more than once: $dups"
wrong=0
nchecked=0
while read -r sym want; do
    nchecked=$(( nchecked + 1 ))
    got=$(sed -nE "s/^$sym=(.*)\$/\\1/p" "$OBJ/.config")
    [ -n "$got" ] || got=n
    if [ "$got" != "$want" ]; then
        wrong=$(( wrong + 1 ))
        if grep -qE "^# $sym is not set\$|^$sym=" "$OBJ/.config"; then
            why=''
        else
            why=' (not in .config: unknown symbol or dependencies unmet)'
        fi
        printf '%s: requested %s, got %s%s\n' "$sym" "$want" "$got" "$why" |
            tee -a "$STEP_LOG" >&2
    fi
done < <(sed -nE 's/^(CONFIG_[A-Za-z0-9_]+)=(.*)$/\1 \2/p
                  s/^# (CONFIG_[A-Za-z0-9_]+) is not set$/\1 n/p' "$LAB_CONFIG")
[ "$nchecked" -gt 0 ] || die "$LAB_CONFIG sets no options"
if [ "$wrong" -gt 0 ]; then
    STEP_CMD="compare $LAB_CONFIG with $OBJ/.config"
    printf '%d of %d options differ\n' "$wrong" "$nchecked" >>"$STEP_LOG"
    die "$wrong of the $nchecked options in lab.config did not get their requested value"
fi
msg "all $nchecked options as requested"

# ---- 5. build --------------------------------------------------------------
JOBS=${BUILD_JOBS:-$(nproc)}
step build "make -j$JOBS bzImage (log: $LOGDIR/build.log)"
run_progress "${KMAKE[@]}" -j"$JOBS" bzImage
[ -f "$OBJ/arch/x86/boot/bzImage" ] || die "no $OBJ/arch/x86/boot/bzImage after the build"
krelease=$("${KMAKE[@]}" -s kernelrelease 2>/dev/null)

# ---- 6. install ------------------------------------------------------------
step install "into $OUTDIR"
touch "$OUTDIR/.build-in-progress"
rm -f "$OUTDIR/.inputs-hash"
for f in arch/x86/boot/bzImage .config System.map; do
    cp "$OBJ/$f" "$OUTDIR/$(basename "$f").tmp"
    mv -f "$OUTDIR/$(basename "$f").tmp" "$OUTDIR/$(basename "$f")"
done
STEP_SECONDS[install]=$(( SECONDS - STEP_STARTED ))

# For --tree the key covers the tree as built (after git am, if any).
KEY=$(cache_key)
cat >"$OUTDIR/.build-info" <<EOF
source=$(source_description)
kernel_release=$krelease
patches=$(series_patches | tr '\n' ' ')
compiler=$(sed -nE 's/^CONFIG_CC_VERSION_TEXT="(.*)"$/\1/p' "$OUTDIR/.config")
$(build_info_common)
EOF
outdir_done
msg "done in $(( SECONDS - START ))s: $BZIMAGE ($krelease, $(stat -c %s "$BZIMAGE") bytes)"
