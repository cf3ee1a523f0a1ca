#!/usr/bin/env bash
# Build and install the upstream kselftests the lab runs in its guest, from
# the same kernel source as the guest kernel.
#
#   build-selftests.sh OUTDIR [--tree PATH]        install into OUTDIR/kselftest
#   build-selftests.sh --print-key [--tree PATH]   print the cache key of this recipe and exit
#
# The source is the one build-kernel.sh uses: Debian's linux-source-7.3 at
# the version pinned in recipe-lib.sh (the .deb comes from the same download
# cache, $XDG_CACHE_HOME/vhost-nic-lab/downloads, fetched with the same
# private apt configuration if it is not there yet), or the tree given with
# --tree.  The patch series is applied the same way.  Then
#
#   make headers
#   make -C tools/testing/selftests TARGETS="$KSFT_TARGETS" FORCE_TARGETS=1 \
#        install INSTALL_PATH=OUTDIR/kselftest
#
# An installed kselftest tree is self-contained: net/lib carries the YNL
# python library (net/lib/ynl) and the netlink specs (net/lib/specs), the BPF
# objects (net/lib/*.bpf.o) and the C helpers.  Run a test from its own
# directory, e.g. `cd OUTDIR/kselftest/drivers/net && ./ping.py`.
#
# With a Debian source the build runs inside the unpacked tree in a temporary
# work directory.  With --tree the kernel headers and the selftests' objects
# go to OUTDIR/obj (make O=...); the YNL C library used by drivers/net is
# still built inside PATH/tools/net/ynl, as upstream's ynl.mk does.
#
# OUTDIR is reused when OUTDIR/.inputs-hash equals the cache key: the SHA-256
# of the source identity (as for build-kernel.sh), this script,
# recipe-lib.sh, the series file and every patch it lists.
#
# Environment: DEBIAN_MIRROR, XDG_CACHE_HOME, BUILD_JOBS, KEEP_BUILD_DIR as
# for build-kernel.sh.
set -euo pipefail

# Selftest targets (directories under tools/testing/selftests) to install.
KSFT_TARGETS='net/lib drivers/net drivers/net/hw'
# To build them: clang for the BPF objects in net/lib, libelf/zlib for the
# libbpf it links, rsync for `make install`, python3-yaml and
# python3-jsonschema for the YNL code generator.
APT_BUILD_DEPS=(build-essential clang libelf-dev zlib1g-dev pkg-config rsync
    python3 python3-yaml python3-jsonschema xz-utils patch git
    debian-archive-keyring)

PROG=build-selftests.sh
SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
SCRIPT_DIR=$(dirname "$SCRIPT_PATH")
# The pinned Debian source (LINUX_*), the series, the shared steps.
# shellcheck source=recipe-lib.sh
. "$SCRIPT_DIR/recipe-lib.sh"

usage() {
    cat >&2 <<EOF
usage: $PROG OUTDIR [--tree PATH]
       $PROG --print-key [--tree PATH]

Builds the kselftest targets '$KSFT_TARGETS' of Debian $LINUX_PACKAGE
$LINUX_DEB_VERSION (or of the Linux 7.3 tree at PATH) with the patches listed
in $SERIES, and installs them into OUTDIR/kselftest.  --print-key prints the
cache key that OUTDIR/.inputs-hash must match for OUTDIR to be reused.
EOF
}

# ---- arguments -------------------------------------------------------------
parse_recipe_args "$@"
require_tree Makefile tools/testing/selftests

if [ "$PRINT_KEY" = 1 ]; then
    # shellcheck disable=SC2119 # no inputs beyond the shared ones
    recipe_cache_key
    exit 0
fi

# shellcheck disable=SC2119
KEY=$(recipe_cache_key)
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
INSTALL="$OUTDIR/kselftest"

claim_outdir "$INSTALL/run_kselftest.sh"

recipe_begin vhost-nic-kselftest-build

# ---- 1. host packages ------------------------------------------------------
step host-packages "build dependencies from apt"
install_apt_packages "${APT_BUILD_DEPS[@]}"

# ---- 2. source -------------------------------------------------------------
fetch_and_unpack_source
if [ -z "$TREE" ]; then
    # A throw-away tree: build in it, as upstream documents.
    OBJ_ARGS=()
else
    OBJ_ARGS=(O="$OUTDIR/obj")
    mkdir -p "$OUTDIR/obj"
fi

# ---- 3. patches ------------------------------------------------------------
apply_series

# ---- 4. build and install --------------------------------------------------
JOBS=${BUILD_JOBS:-$(nproc)}
step headers "make headers"
run make -C "$SRC" "${OBJ_ARGS[@]}" ARCH=x86_64 -j"$JOBS" headers

step build "make -C tools/testing/selftests TARGETS=\"$KSFT_TARGETS\" install (log: $LOGDIR/build.log)"
STEP_HINT="a target failed to build; its tools are installed by the host-packages step (see APT_BUILD_DEPS in $SCRIPT_PATH)"
touch "$OUTDIR/.build-in-progress"
rm -f "$OUTDIR/.inputs-hash"
rm -rf "$INSTALL"
run_progress make -C "$SRC/tools/testing/selftests" "${OBJ_ARGS[@]}" -j"$JOBS" \
    FORCE_TARGETS=1 TARGETS="$KSFT_TARGETS" install INSTALL_PATH="$INSTALL"
for t in $KSFT_TARGETS; do
    [ -d "$INSTALL/$t" ] || die "no $INSTALL/$t after the install"
done
if [ ! -d "$INSTALL/net/lib/ynl" ] || [ ! -d "$INSTALL/net/lib/specs" ]; then
    die "$INSTALL/net/lib lacks the YNL library or the netlink specs"
fi
STEP_SECONDS[build]=$(( SECONDS - STEP_STARTED ))

if [ -n "$TREE" ]; then
    # For --tree the key covers the tree as built (after git am, if any).
    # shellcheck disable=SC2119
    KEY=$(recipe_cache_key)
fi
cat >"$OUTDIR/.build-info" <<EOF
source=$(source_description)
targets=$KSFT_TARGETS
patches=$(series_patches | tr '\n' ' ')
compiler=$(cc --version | head -n1); $(clang --version | head -n1)
$(build_info_common)
EOF
outdir_done
msg "done in $(( SECONDS - START ))s: $INSTALL ($KSFT_TARGETS)"
