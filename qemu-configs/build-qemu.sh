#!/usr/bin/env bash
# Build the patched QEMU used by the vhost-nic lab.
#
#   build-qemu.sh OUTDIR        build and install into OUTDIR (bin/qemu-system-x86_64)
#   build-qemu.sh --print-key   print the cache key of this recipe and exit
#
# The source is Debian's QEMU package from the trixie suite, fetched with a
# private apt configuration (the system's apt sources are not touched).  The
# patch series in patches/ is applied on top of the orig tarball.  Firmware
# (SeaBIOS, qboot, option ROMs) comes from Debian's packages at run time.
#
# OUTDIR is reused when OUTDIR/.inputs-hash equals the cache key: the key is
# the SHA-256 of this script (which pins the Debian version and checksums),
# the series file and every patch it lists, in order.
#
# Environment:
#   DEBIAN_MIRROR        archive to fetch the source from
#                        (default http://deb.debian.org/debian)
#   BUILD_JOBS           parallel compile jobs (default: nproc)
#   KEEP_BUILD_DIR=1     keep the work directory after a successful build
set -euo pipefail

# ---- pinned inputs ---------------------------------------------------------
QEMU_DEB_VERSION='1:10.0.13+ds-0+deb13u1'
QEMU_UPSTREAM_VERSION='10.0.13'
DEBIAN_SUITE='trixie'
QEMU_ORIG_TARBALL='qemu_10.0.13+ds.orig.tar.xz'
QEMU_ORIG_SHA256='6a0888e806c2ffc0c5f0733e974f9aea55491950d3c47c98669c8b236dde59ae'
QEMU_DEBIAN_TARBALL='qemu_10.0.13+ds-0+deb13u1.debian.tar.xz'
QEMU_DEBIAN_SHA256='da73c092f5684c551b0334d675eb16a3dec91e1edea94759cfb1102fa4a0364e'
# Debian's own build fixes for the +ds tarball, taken from its debian/patches:
# the edk2 firmware blobs and the pycotap wheel are stripped from it.
DEBIAN_BUILD_PATCHES=(skip-unpack-edk2-blobs.patch disable-pycotap.patch)
MESON_VERSION='1.5.0'
DEBIAN_KEYRING='/usr/share/keyrings/debian-archive-keyring.gpg'
# Where QEMU looks for firmware: Debian's seabios, qemu-system-data and
# ipxe-qemu packages (same search path as Debian's own QEMU build).
FIRMWARE_PATH='/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu'
APT_BUILD_DEPS=(gcc libc6-dev pkg-config ninja-build python3 python3-venv
    libglib2.0-dev libfdt-dev zlib1g-dev xz-utils patch)
APT_FIRMWARE=(seabios qemu-system-data ipxe-qemu)
CONFIGURE_ARGS=(
    --target-list=x86_64-softmmu
    --without-default-features
    --enable-kvm
    --enable-tcg
    --enable-vhost-user
    --enable-vhost-net
    --enable-fdt=system
    --enable-attr
    --enable-virtfs
    --disable-download
    --disable-install-blobs
    --disable-docs
    --firmwarepath="$FIRMWARE_PATH"
)
# ---------------------------------------------------------------------------

PROG=build-qemu.sh
SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
SCRIPT_DIR=$(dirname "$SCRIPT_PATH")
PATCH_DIR="$SCRIPT_DIR/patches"
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

msg() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { msg "error: $*"; exit 1; }

usage() {
    cat >&2 <<EOF
usage: $PROG OUTDIR
       $PROG --print-key

Builds QEMU $QEMU_UPSTREAM_VERSION (Debian $QEMU_DEB_VERSION) with the patches
in $PATCH_DIR and installs it into OUTDIR.  --print-key prints the cache
key that OUTDIR/.inputs-hash must match for OUTDIR to be reused.
EOF
}

series_patches() {
    [ -f "$PATCH_DIR/series" ] || die "missing $PATCH_DIR/series"
    sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$PATCH_DIR/series" | grep -v '^$' || true
}

# Cache key: this script (with its pins), the series file, every patch.
cache_key() {
    local p patches
    patches=$(series_patches)
    [ -n "$patches" ] || die "$PATCH_DIR/series lists no patches"
    for p in $patches; do
        [ -f "$PATCH_DIR/$p" ] || die "series lists missing patch $PATCH_DIR/$p"
    done
    {
        cat "$SCRIPT_PATH" "$PATCH_DIR/series"
        for p in $patches; do
            printf '\n--- %s\n' "$p"
            cat "$PATCH_DIR/$p"
        done
    } | sha256sum | cut -d' ' -f1
}

case "${1:-}" in
    --print-key) cache_key; exit 0 ;;
    -h|--help) usage; exit 0 ;;
    ''|-*) usage; exit 2 ;;
esac
[ $# -eq 1 ] || { usage; exit 2; }

KEY=$(cache_key)
OUTDIR=$1
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
QEMU_BIN="$OUTDIR/bin/qemu-system-x86_64"

is_current() {
    [ -x "$QEMU_BIN" ] && [ -f "$OUTDIR/.inputs-hash" ] &&
        [ "$(cat "$OUTDIR/.inputs-hash")" = "$KEY" ]
}

if is_current; then
    msg "$QEMU_BIN is up to date (key $KEY)"
    exit 0
fi

# Only ever wipe a directory this script created (or an empty one).
if [ -n "$(ls -A "$OUTDIR")" ] && [ ! -f "$OUTDIR/.inputs-hash" ] &&
        [ ! -f "$OUTDIR/.build-in-progress" ]; then
    die "$OUTDIR is not empty and was not created by $PROG; refusing to overwrite it"
fi

# Serialise concurrent builds into the same OUTDIR.
exec 9>"$OUTDIR.lock"
if ! flock -n 9; then
    msg "another build into $OUTDIR is running; waiting for it"
    flock 9
fi
if is_current; then
    msg "$QEMU_BIN was built meanwhile (key $KEY)"
    exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vhost-nic-qemu-build.XXXXXX")
LOGDIR="$WORK/logs"
mkdir -p "$LOGDIR"
STEP=''
STEP_LOG=''
STEP_HINT=''
START=$SECONDS

on_exit() {
    local rc=$?
    if [ $rc -ne 0 ]; then
        if [ -n "$STEP" ]; then
            msg "FAILED at step '$STEP' (exit $rc)"
            if [ -n "$STEP_LOG" ] && [ -f "$STEP_LOG" ]; then
                msg "last lines of $STEP_LOG:"
                tail -n 25 "$STEP_LOG" >&2 || true
                msg "full log: $STEP_LOG"
            fi
            [ -z "$STEP_HINT" ] || msg "hint: $STEP_HINT"
        fi
        msg "work directory kept for inspection: $WORK"
    elif [ "${KEEP_BUILD_DIR:-0}" = 1 ]; then
        msg "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# step NAME: announce a step; its output goes to $LOGDIR/NAME.log
step() {
    STEP=$1
    STEP_LOG="$LOGDIR/$1.log"
    STEP_HINT=''
    msg "[$(( SECONDS - START ))s] $1: $2"
}

# run CMD...: run with output appended to the current step's log
run() {
    printf '+ %s\n' "$*" >>"$STEP_LOG"
    "$@" >>"$STEP_LOG" 2>&1
}

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# ---- 1. host packages ------------------------------------------------------
step host-packages "build dependencies and firmware from apt"
missing=()
for pkg in "${APT_BUILD_DEPS[@]}" "${APT_FIRMWARE[@]}"; do
    if ! dpkg-query -W -f='${db:Status-Status}\n' "$pkg" 2>/dev/null |
            grep -qx installed; then
        missing+=("$pkg")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    msg "installing: ${missing[*]}"
    run as_root apt-get update
    run as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${missing[@]}"
else
    msg "all present"
fi
for f in /usr/share/seabios/bios-256k.bin /usr/share/qemu/kvmvapic.bin \
         /usr/lib/ipxe/qemu/efi-virtio.rom; do
    [ -f "$f" ] || die "firmware file $f missing after installing ${APT_FIRMWARE[*]}"
done

# ---- 2. source download with a private apt configuration ------------------
step fetch-source "qemu=$QEMU_DEB_VERSION from $DEBIAN_SUITE (private apt config)"
STEP_HINT="if $DEBIAN_SUITE no longer serves $QEMU_DEB_VERSION, update the pins at the top of $SCRIPT_PATH (see README.md, 'Moving to a new Debian version')"
[ -r "$DEBIAN_KEYRING" ] || die "$DEBIAN_KEYRING missing (install debian-archive-keyring)"
APTDIR="$WORK/apt"
mkdir -p "$APTDIR/sources.list.d" "$APTDIR/preferences.d" \
         "$APTDIR/state/lists/partial" "$APTDIR/cache/archives/partial"
printf 'deb-src [signed-by=%s] %s %s main\n' \
    "$DEBIAN_KEYRING" "$DEBIAN_MIRROR" "$DEBIAN_SUITE" >"$APTDIR/sources.list"
APT_OPTS=(
    -o "Dir::Etc::sourcelist=$APTDIR/sources.list"
    -o "Dir::Etc::sourceparts=$APTDIR/sources.list.d"
    -o "Dir::Etc::preferencesparts=$APTDIR/preferences.d"
    -o "Dir::State=$APTDIR/state"
    -o "Dir::Cache=$APTDIR/cache"
    -o "Acquire::Languages=none"
)
# apt drops root privileges to _apt for downloads, and _apt cannot write
# into our private (mode 0700) directories.
[ "$(id -u)" != 0 ] || APT_OPTS+=(-o "APT::Sandbox::User=root")
run apt-get "${APT_OPTS[@]}" update
mkdir -p "$WORK/dl"
(cd "$WORK/dl" &&
    run apt-get "${APT_OPTS[@]}" source --download-only "qemu=$QEMU_DEB_VERSION")

step verify-source "checking pinned SHA-256 sums"
(cd "$WORK/dl" && run sha256sum -c - <<EOF
$QEMU_ORIG_SHA256  $QEMU_ORIG_TARBALL
$QEMU_DEBIAN_SHA256  $QEMU_DEBIAN_TARBALL
EOF
)

# ---- 3. unpack and patch ---------------------------------------------------
step unpack "orig tarball"
SRC="$WORK/qemu-$QEMU_UPSTREAM_VERSION"
run tar --no-same-owner -xf "$WORK/dl/$QEMU_ORIG_TARBALL" -C "$WORK"
[ -f "$SRC/VERSION" ] || die "unexpected tarball layout: no $SRC/VERSION"
[ "$(cat "$SRC/VERSION")" = "$QEMU_UPSTREAM_VERSION" ] ||
    die "tarball VERSION is $(cat "$SRC/VERSION"), expected $QEMU_UPSTREAM_VERSION"
run tar --no-same-owner -xf "$WORK/dl/$QEMU_DEBIAN_TARBALL" -C "$WORK"

step patch "applying $(series_patches | wc -l) patches from $PATCH_DIR"
STEP_HINT="the series must apply to the pristine $QEMU_ORIG_TARBALL without fuzz"
while read -r p; do
    msg "  $p"
    run patch -d "$SRC" -p1 --batch --forward --fuzz=0 \
        --no-backup-if-mismatch -i "$PATCH_DIR/$p"
done < <(series_patches)
for p in "${DEBIAN_BUILD_PATCHES[@]}"; do
    msg "  debian/patches/$p"
    run patch -d "$SRC" -p1 --batch --forward --fuzz=0 \
        --no-backup-if-mismatch -i "$WORK/debian/patches/$p"
done

# ---- 4. meson --------------------------------------------------------------
step meson "meson $MESON_VERSION from PyPI into a venv"
PYTHON=/usr/bin/python3
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)
run "$PYTHON" -m venv "$WORK/venv"
run "$WORK/venv/bin/pip" install --disable-pip-version-check \
    "meson==$MESON_VERSION"

# ---- 5. configure ----------------------------------------------------------
step configure "prefix $OUTDIR"
BUILD="$SRC/build"
mkdir -p "$BUILD"
(cd "$BUILD" && run ../configure --prefix="$OUTDIR" \
    --python="$WORK/venv/bin/python3" "${CONFIGURE_ARGS[@]}")

# ---- 6. build --------------------------------------------------------------
JOBS=${BUILD_JOBS:-$(nproc)}
step build "ninja -j$JOBS (log: $LOGDIR/build.log)"
run ninja -C "$BUILD" -j "$JOBS"

# ---- 7. install ------------------------------------------------------------
step install "into $OUTDIR"
# Clear out a previous build (OUTDIR was checked to be ours above).
find "$OUTDIR" -mindepth 1 -delete
touch "$OUTDIR/.build-in-progress"
run ninja -C "$BUILD" install

step smoke-test "$QEMU_BIN"
run "$QEMU_BIN" --version
run "$QEMU_BIN" -device vhost-user-device-pci,help
grep -q 'num_vqs' "$STEP_LOG" ||
    die "vhost-user-device-pci is not user creatable in the built QEMU"

cat >"$OUTDIR/.build-info" <<EOF
qemu_deb_version=$QEMU_DEB_VERSION
debian_suite=$DEBIAN_SUITE
meson_version=$MESON_VERSION
firmware_path=$FIRMWARE_PATH
patches=$(series_patches | tr '\n' ' ')
key=$KEY
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
build_seconds=$(( SECONDS - START ))
EOF
rm -f "$OUTDIR/.build-in-progress"
printf '%s\n' "$KEY" >"$OUTDIR/.inputs-hash"
STEP=''
msg "done in $(( SECONDS - START ))s: $QEMU_BIN"
