#!/usr/bin/env bash
# ethtool for the lab guest.
#
#   install-ethtool.sh OUTDIR        install into OUTDIR (bin/ethtool)
#   install-ethtool.sh --print-key   print the cache key of this recipe and exit
#
# The guest runs the host's binaries, and Debian 12's ethtool (6.1) is too old
# for the Linux 7.3 kselftests: it does not know `ethtool -G DEV
# tcp-data-split on|off|auto`, rejects `ethtool --json -c` and lacks the
# `--disable-netlink` handling drivers/net/hw/rss_api.py relies on.  This
# recipe takes the ethtool package of Debian 13 (trixie), fetched with a
# private apt configuration as guest-kernel-patches/recipe-lib.sh fetches the
# kernel source (the system's apt sources are not touched, nothing is
# installed into /usr), checks its pinned SHA-256 and unpacks its binary into
# OUTDIR/bin.  Debian's binary package rather than a build from its source:
# trixie's build needs only glibc >= 2.34 and libmnl0, both in Debian 12, so
# it runs as it is (the smoke test below runs it on the host, whose libraries
# the guest uses).  `cargo xtask` shares OUTDIR read-only with the guest, whose
# init (tests/vm/init.sh) mounts it on /run/lab-tools and puts its bin/ first
# on PATH.
#
# OUTDIR is reused when OUTDIR/.inputs-hash equals the cache key: the SHA-256
# of this script (which pins the package) and of recipe-lib.sh (its helpers).
# The .deb is kept in $XDG_CACHE_HOME/vhost-nic-lab/downloads.
#
# Environment:
#   DEBIAN_MIRROR        archive to fetch from (default http://deb.debian.org/debian)
#   KEEP_BUILD_DIR=1     keep the work directory after a successful run
set -euo pipefail

# ---- pinned inputs ---------------------------------------------------------
ETHTOOL_PACKAGE='ethtool'
ETHTOOL_DEB_VERSION='1:6.14.2-1'
ETHTOOL_VERSION='6.14.2'
ETHTOOL_SUITE='trixie'
ETHTOOL_ARCH='amd64'
ETHTOOL_DEB_FILE='ethtool_6.14.2-1_amd64.deb'
ETHTOOL_DEB_SHA256='5c592ac6e65c3863c5ba9c9b8380f913a35f39803aa89ccc59c11c5c953a46ef'
# libmnl0: the binary's one library besides glibc.
APT_DEPS=(libmnl0 debian-archive-keyring)
# ---------------------------------------------------------------------------

PROG=install-ethtool.sh
SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
LIB=$(dirname "$(dirname "$SCRIPT_PATH")")/guest-kernel-patches/recipe-lib.sh
# recipe-lib.sh: msg/die, recipe_begin/step/run, install_apt_packages,
# DOWNLOAD_DIR, DEBIAN_MIRROR, DEBIAN_KEYRING.  It wants TREE and SCRIPT_DIR
# (its own directory) set; this recipe uses none of its kernel steps.
TREE=''
SCRIPT_DIR=$(dirname "$LIB")
# shellcheck source-path=SCRIPTDIR source=../guest-kernel-patches/recipe-lib.sh
. "$LIB"

usage() {
    cat >&2 <<EOF
usage: $PROG OUTDIR
       $PROG --print-key

Installs Debian $ETHTOOL_SUITE's $ETHTOOL_PACKAGE $ETHTOOL_DEB_VERSION into
OUTDIR/bin.  --print-key prints the cache key that OUTDIR/.inputs-hash must
match for OUTDIR to be reused.
EOF
}

cache_key() {
    {
        cat "$SCRIPT_PATH"
        printf '\n--- recipe-lib.sh\n'
        cat "$LIB"
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
BIN="$OUTDIR/bin/ethtool"

claim_outdir "$BIN"

recipe_begin vhost-nic-ethtool

# ---- 1. host packages ------------------------------------------------------
step host-packages "runtime library and archive keyring from apt"
arch=$(dpkg --print-architecture)
[ "$arch" = "$ETHTOOL_ARCH" ] || die "this recipe pins the $ETHTOOL_ARCH package; the host is $arch"
install_apt_packages "${APT_DEPS[@]}"

# ---- 2. the package, with a private apt configuration ----------------------
DEB="$DOWNLOAD_DIR/$ETHTOOL_DEB_FILE"
deb_ok() {
    [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$ETHTOOL_DEB_SHA256" ]
}
if deb_ok "$DEB"; then
    step fetch "$ETHTOOL_PACKAGE=$ETHTOOL_DEB_VERSION from the download cache ($DEB)"
else
    step fetch "$ETHTOOL_PACKAGE=$ETHTOOL_DEB_VERSION from $ETHTOOL_SUITE (private apt config)"
    STEP_HINT="the Debian archive is needed once; afterwards $DEB is reused"
    [ -r "$DEBIAN_KEYRING" ] || die "$DEBIAN_KEYRING missing (install debian-archive-keyring)"
    APTDIR="$WORK/apt"
    mkdir -p "$APTDIR/sources.list.d" "$APTDIR/preferences.d" \
             "$APTDIR/state/lists/partial" "$APTDIR/cache/archives/partial"
    printf 'deb [signed-by=%s] %s %s main\n' \
        "$DEBIAN_KEYRING" "$DEBIAN_MIRROR" "$ETHTOOL_SUITE" >"$APTDIR/sources.list"
    APT_OPTS=(
        -o "Dir::Etc::sourcelist=$APTDIR/sources.list"
        -o "Dir::Etc::sourceparts=$APTDIR/sources.list.d"
        -o "Dir::Etc::preferencesparts=$APTDIR/preferences.d"
        -o "Dir::State=$APTDIR/state"
        -o "Dir::State::status=/dev/null"
        -o "Dir::Cache=$APTDIR/cache"
        -o "Acquire::Languages=none"
        -o "APT::Architecture=$ETHTOOL_ARCH"
    )
    # apt drops root privileges to _apt for downloads, and _apt cannot write
    # into our private (mode 0700) directories.
    [ "$(id -u)" != 0 ] || APT_OPTS+=(-o "APT::Sandbox::User=root")
    run apt-get "${APT_OPTS[@]}" update
    available=$(apt-cache "${APT_OPTS[@]}" madison "$ETHTOOL_PACKAGE" 2>/dev/null |
        awk -F'|' '{gsub(/ /, "", $2); print $2}' | sort -u | tr '\n' ' ')
    if ! printf ' %s ' "$available" | grep -qF " $ETHTOOL_DEB_VERSION "; then
        STEP_HINT=''
        STEP_CMD="apt-cache madison $ETHTOOL_PACKAGE (private apt config)"
        msg "$DEBIAN_MIRROR $ETHTOOL_SUITE no longer serves $ETHTOOL_PACKAGE=$ETHTOOL_DEB_VERSION"
        msg "versions it serves now: ${available:-none}"
        msg "update ETHTOOL_DEB_VERSION, ETHTOOL_VERSION, ETHTOOL_DEB_FILE and ETHTOOL_DEB_SHA256"
        msg "at the top of $SCRIPT_PATH (the SHA256 field of 'apt-cache show' with this configuration)"
        die "pinned version not available"
    fi
    mkdir -p "$WORK/dl"
    (cd "$WORK/dl" &&
        run apt-get "${APT_OPTS[@]}" download "$ETHTOOL_PACKAGE=$ETHTOOL_DEB_VERSION")
    # apt names the file after the version with its epoch (1%3a6.14.2-1).
    got=$(find "$WORK/dl" -maxdepth 1 -name "${ETHTOOL_PACKAGE}_*_$ETHTOOL_ARCH.deb" | head -n1)
    [ -n "$got" ] || die "apt-get download did not produce a .deb: $(ls "$WORK/dl")"

    step verify "checking the pinned SHA-256 of $ETHTOOL_DEB_FILE"
    STEP_HINT="the archive's $ETHTOOL_DEB_FILE differs from the pinned checksum; do not use it without checking why"
    run sha256sum -c - < <(printf '%s  %s\n' "$ETHTOOL_DEB_SHA256" "$got")
    mkdir -p "$DOWNLOAD_DIR"
    cp "$got" "$DEB.tmp.$$"
    mv -f "$DEB.tmp.$$" "$DEB"
    msg "cached as $DEB"
fi

# ---- 3. unpack and install -------------------------------------------------
step install "usr/sbin/ethtool from the .deb into $OUTDIR/bin"
run dpkg-deb -f "$DEB" Package Version
grep -qx "Version: $ETHTOOL_DEB_VERSION" "$STEP_LOG" ||
    die "$DEB does not have version $ETHTOOL_DEB_VERSION"
run dpkg-deb -x "$DEB" "$WORK/root"
[ -x "$WORK/root/usr/sbin/ethtool" ] || die "no usr/sbin/ethtool in $DEB"
# Clear out a previous install (OUTDIR was checked to be ours above).
find "$OUTDIR" -mindepth 1 -delete
touch "$OUTDIR/.build-in-progress"
install -D -m 0755 "$WORK/root/usr/sbin/ethtool" "$BIN"
install -D -m 0644 "$WORK/root/usr/share/doc/ethtool/copyright" \
    "$OUTDIR/share/doc/ethtool/copyright"

step smoke-test "$BIN on this host's libraries"
STEP_HINT="the guest runs $BIN with the host's libraries (glibc, libmnl0)"
run ldd "$BIN"
! grep -q 'not found' "$STEP_LOG" || die "$BIN lacks a library on this host"
run "$BIN" --version
grep -qx "ethtool version $ETHTOOL_VERSION" "$STEP_LOG" ||
    die "$BIN --version does not say $ETHTOOL_VERSION"
# --help exits 0 and lists the ring parameters the kselftests set.
run "$BIN" --help
grep -q 'tcp-data-split' "$STEP_LOG" || die "$BIN does not know -G tcp-data-split"

cat >"$OUTDIR/.build-info" <<EOF
package=$ETHTOOL_PACKAGE $ETHTOOL_DEB_VERSION ($ETHTOOL_SUITE, $ETHTOOL_ARCH, sha256 $ETHTOOL_DEB_SHA256)
key=$KEY
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
build_seconds=$(( SECONDS - START ))
EOF
rm -f "$OUTDIR/.build-in-progress"
printf '%s\n' "$KEY" >"$OUTDIR/.inputs-hash"
STEP=''
msg "done in $(( SECONDS - START ))s: $BIN (ethtool $ETHTOOL_VERSION)"
