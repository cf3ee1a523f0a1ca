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

# ---- pinned inputs ---------------------------------------------------------
LINUX_PACKAGE='linux-source-7.3'
LINUX_DEB_VERSION='7.3.4-1~bpo13+1'
LINUX_UPSTREAM_VERSION='7.3.4'
LINUX_DEB_FILE='linux-source-7.3_7.3.4-1~bpo13+1_all.deb'
LINUX_DEB_SHA256='703e369ddd4cce971452f5a593ee55df3a5c10c83caf0fa0df039633ed181ee3'
LINUX_TARBALL_IN_DEB='./usr/src/linux-source-7.3.tar.xz'
LINUX_TREE_NAME='linux-source-7.3'
DEBIAN_SUITE='trixie-backports'
DEBIAN_KEYRING='/usr/share/keyrings/debian-archive-keyring.gpg'
APT_BUILD_DEPS=(build-essential bc bison flex libelf-dev libssl-dev cpio
    xz-utils gzip patch git debian-archive-keyring)
# ---------------------------------------------------------------------------

PROG=build-kernel.sh
SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
SCRIPT_DIR=$(dirname "$SCRIPT_PATH")
PATCH_DIR="$SCRIPT_DIR"
SERIES="$PATCH_DIR/series"
LAB_CONFIG="$SCRIPT_DIR/lab.config"
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOWNLOAD_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/vhost-nic-lab/downloads"

msg() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { msg "error: $*"; exit 1; }

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

series_patches() {
    [ -f "$SERIES" ] || die "missing $SERIES"
    sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$SERIES" | grep -v '^$' || true
}

# ---- arguments -------------------------------------------------------------
OUTDIR=''
TREE=''
PRINT_KEY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --print-key) PRINT_KEY=1 ;;
        --tree) [ $# -ge 2 ] || { usage; exit 2; }; TREE=$2; shift ;;
        --tree=*) TREE=${1#--tree=} ;;
        -h|--help) usage; exit 0 ;;
        -*) usage; exit 2 ;;
        *) [ -z "$OUTDIR" ] || { usage; exit 2; }; OUTDIR=$1 ;;
    esac
    shift
done
if [ "$PRINT_KEY" = 1 ]; then
    [ -z "$OUTDIR" ] || { usage; exit 2; }
else
    [ -n "$OUTDIR" ] || { usage; exit 2; }
fi
if [ -n "$TREE" ]; then
    { [ -f "$TREE/Makefile" ] && [ -f "$TREE/Kconfig" ]; } ||
        die "--tree $TREE is not a kernel source tree (no Makefile/Kconfig)"
    TREE=$(cd "$TREE" && pwd)
fi

tree_is_git() {
    [ -n "$TREE" ] && git -C "$TREE" rev-parse --is-inside-work-tree >/dev/null 2>&1 &&
        [ "$(git -C "$TREE" rev-parse --show-toplevel)" = "$TREE" ]
}

# What the kernel is built from.
source_id() {
    if [ -z "$TREE" ]; then
        printf 'debian:%s=%s sha256=%s\n' \
            "$LINUX_PACKAGE" "$LINUX_DEB_VERSION" "$LINUX_DEB_SHA256"
    elif tree_is_git; then
        # HEAD plus uncommitted changes (tracked diffs, untracked names).
        printf 'tree:%s head=%s changes=%s\n' "$TREE" \
            "$(git -C "$TREE" rev-parse HEAD)" \
            "$( { git -C "$TREE" diff HEAD --binary
                  git -C "$TREE" status --porcelain --untracked-files=normal; } |
                sha256sum | cut -d' ' -f1)"
    else
        # A plain tree cannot be fingerprinted cheaply: never reuse OUTDIR,
        # make itself is incremental (objects in OUTDIR/obj).
        printf 'tree:%s unversioned run=%s.%s\n' "$TREE" "$(date +%s%N)" "$$"
    fi
}

# Cache key: source identity, this script, lab.config, the series, every patch.
cache_key() {
    local p patches
    patches=$(series_patches)
    for p in $patches; do
        [ -f "$PATCH_DIR/$p" ] || die "series lists missing patch $PATCH_DIR/$p"
    done
    {
        source_id
        cat "$SCRIPT_PATH"
        printf '\n--- lab.config\n'
        cat "$LAB_CONFIG"
        printf '\n--- series\n'
        cat "$SERIES"
        for p in $patches; do
            printf '\n--- %s\n' "$p"
            cat "$PATCH_DIR/$p"
        done
    } | sha256sum | cut -d' ' -f1
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

is_current() {
    [ -f "$BZIMAGE" ] && [ -f "$OUTDIR/.inputs-hash" ] &&
        [ "$(cat "$OUTDIR/.inputs-hash")" = "$KEY" ]
}

if is_current; then
    msg "$BZIMAGE is up to date (key $KEY)"
    exit 0
fi

# Only ever write into a directory this script created (or an empty one).
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
    msg "$BZIMAGE was built meanwhile (key $KEY)"
    exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vhost-nic-kernel-build.XXXXXX")
LOGDIR="$WORK/logs"
mkdir -p "$LOGDIR"
STEP=''
STEP_LOG=''
STEP_HINT=''
STEP_CMD=''
BG_PID=''
START=$SECONDS
declare -A STEP_SECONDS=()
STEP_STARTED=$SECONDS

on_exit() {
    local rc=$?
    if [ -n "$BG_PID" ]; then
        kill "$BG_PID" 2>/dev/null || true
        wait "$BG_PID" 2>/dev/null || true
    fi
    if [ $rc -ne 0 ]; then
        if [ -n "$STEP" ]; then
            msg "FAILED at step '$STEP' (exit $rc)"
            [ -z "$STEP_CMD" ] || msg "command: $STEP_CMD"
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
    [ -z "$STEP" ] || STEP_SECONDS[$STEP]=$(( SECONDS - STEP_STARTED ))
    STEP_STARTED=$SECONDS
    STEP=$1
    STEP_LOG="$LOGDIR/$1.log"
    STEP_HINT=''
    STEP_CMD=''
    : >>"$STEP_LOG"
    msg "[$(( SECONDS - START ))s] $1: $2"
}

# run CMD...: run with output appended to the current step's log
run() {
    STEP_CMD="$*"
    printf '+ %s\n' "$*" >>"$STEP_LOG"
    "$@" >>"$STEP_LOG" 2>&1
}

# run_progress CMD...: like run, with a line on stderr every minute
run_progress() {
    local n=0 rc=0
    STEP_CMD="$*"
    printf '+ %s\n' "$*" >>"$STEP_LOG"
    "$@" >>"$STEP_LOG" 2>&1 &
    BG_PID=$!
    while kill -0 "$BG_PID" 2>/dev/null; do
        sleep 5
        n=$(( n + 1 ))
        if [ $(( n % 12 )) = 0 ] && kill -0 "$BG_PID" 2>/dev/null; then
            msg "[$(( SECONDS - START ))s] $STEP: $(grep -cE '^  (CC|AS|LD|AR)' "$STEP_LOG" || true) objects so far"
        fi
    done
    wait "$BG_PID" || rc=$?
    BG_PID=''
    return $rc
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

if [ "$(uname -m)" != x86_64 ] && [ -z "${CROSS_COMPILE:-}" ]; then
    die "this recipe builds an x86_64 kernel; on $(uname -m) set CROSS_COMPILE"
fi

# ---- 1. host packages ------------------------------------------------------
step host-packages "build dependencies from apt"
missing=()
for pkg in "${APT_BUILD_DEPS[@]}"; do
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

# ---- 2. source -------------------------------------------------------------
if [ -z "$TREE" ]; then
    DEB="$DOWNLOAD_DIR/$LINUX_DEB_FILE"
    deb_ok() {
        [ -f "$1" ] &&
            [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$LINUX_DEB_SHA256" ]
    }
    if deb_ok "$DEB"; then
        step fetch-source "$LINUX_PACKAGE=$LINUX_DEB_VERSION from the download cache ($DEB)"
    else
        step fetch-source "$LINUX_PACKAGE=$LINUX_DEB_VERSION from $DEBIAN_SUITE (private apt config)"
        STEP_HINT="the Debian archive is needed once; afterwards $DEB is reused"
        [ -r "$DEBIAN_KEYRING" ] || die "$DEBIAN_KEYRING missing (install debian-archive-keyring)"
        APTDIR="$WORK/apt"
        mkdir -p "$APTDIR/sources.list.d" "$APTDIR/preferences.d" \
                 "$APTDIR/state/lists/partial" "$APTDIR/cache/archives/partial"
        printf 'deb [signed-by=%s] %s %s main\n' \
            "$DEBIAN_KEYRING" "$DEBIAN_MIRROR" "$DEBIAN_SUITE" >"$APTDIR/sources.list"
        APT_OPTS=(
            -o "Dir::Etc::sourcelist=$APTDIR/sources.list"
            -o "Dir::Etc::sourceparts=$APTDIR/sources.list.d"
            -o "Dir::Etc::preferencesparts=$APTDIR/preferences.d"
            -o "Dir::State=$APTDIR/state"
            -o "Dir::State::status=/dev/null"
            -o "Dir::Cache=$APTDIR/cache"
            -o "Acquire::Languages=none"
            -o "APT::Architecture=amd64"
        )
        # apt drops root privileges to _apt for downloads, and _apt cannot
        # write into our private (mode 0700) directories.
        [ "$(id -u)" != 0 ] || APT_OPTS+=(-o "APT::Sandbox::User=root")
        run apt-get "${APT_OPTS[@]}" update
        run apt-cache "${APT_OPTS[@]}" madison "$LINUX_PACKAGE" || true
        available=$(apt-cache "${APT_OPTS[@]}" madison "$LINUX_PACKAGE" 2>/dev/null |
            awk -F'|' '{gsub(/ /, "", $2); print $2}' | sort -u | tr '\n' ' ')
        if ! printf ' %s ' "$available" | grep -qF " $LINUX_DEB_VERSION "; then
            STEP_HINT=''
            STEP_CMD="apt-cache madison $LINUX_PACKAGE (private apt config)"
            msg "$DEBIAN_MIRROR $DEBIAN_SUITE no longer serves $LINUX_PACKAGE=$LINUX_DEB_VERSION"
            msg "versions it serves now: ${available:-none}"
            msg "either build from your own Linux 7.3 tree:  $PROG OUTDIR --tree PATH"
            msg "or update LINUX_DEB_VERSION, LINUX_UPSTREAM_VERSION, LINUX_DEB_FILE and"
            msg "LINUX_DEB_SHA256 at the top of $SCRIPT_PATH (see README.md, 'Updating the pin')"
            die "pinned version not available"
        fi
        mkdir -p "$WORK/dl"
        (cd "$WORK/dl" &&
            run apt-get "${APT_OPTS[@]}" download "$LINUX_PACKAGE=$LINUX_DEB_VERSION")
        [ -f "$WORK/dl/$LINUX_DEB_FILE" ] ||
            die "apt-get download did not produce $LINUX_DEB_FILE: $(ls "$WORK/dl")"

        step verify-source "checking the pinned SHA-256 of $LINUX_DEB_FILE"
        STEP_HINT="the archive's $LINUX_DEB_FILE differs from the pinned checksum; do not use it without checking why"
        (cd "$WORK/dl" && run sha256sum -c - <<EOF
$LINUX_DEB_SHA256  $LINUX_DEB_FILE
EOF
        )
        mkdir -p "$DOWNLOAD_DIR"
        cp "$WORK/dl/$LINUX_DEB_FILE" "$DEB.tmp.$$"
        mv -f "$DEB.tmp.$$" "$DEB"
        rm -f "$WORK/dl/$LINUX_DEB_FILE"
        msg "cached as $DEB"
    fi

    step unpack "$LINUX_TARBALL_IN_DEB from the .deb"
    run dpkg-deb -f "$DEB" Package Version
    grep -qx "Version: $LINUX_DEB_VERSION" "$STEP_LOG" ||
        die "$DEB does not have version $LINUX_DEB_VERSION"
    SRC="$WORK/$LINUX_TREE_NAME"
    STEP_CMD="dpkg-deb --fsys-tarfile $DEB | tar -xO $LINUX_TARBALL_IN_DEB | tar -xJ -C $WORK"
    dpkg-deb --fsys-tarfile "$DEB" | tar -xO "$LINUX_TARBALL_IN_DEB" |
        tar --no-same-owner -xJ -C "$WORK" 2>>"$STEP_LOG"
    [ -f "$SRC/Makefile" ] || die "unexpected tarball layout: no $SRC/Makefile"
    OBJ="$WORK/obj"
else
    step source "using the tree $TREE"
    SRC=$TREE
    OBJ="$OUTDIR/obj"
    if [ -f "$SRC/.config" ] || [ -d "$SRC/include/config" ]; then
        die "$SRC has in-tree build output (.config or include/config); this recipe builds with make O=$OBJ, which needs a clean source tree: run 'make mrproper' in $SRC (it deletes that tree's .config) or use a separate work tree"
    fi
fi
kver=$(sed -nE 's/^(VERSION|PATCHLEVEL|SUBLEVEL) = ([0-9]+)$/\2/p' "$SRC/Makefile" | paste -sd.)
if [ -z "$TREE" ]; then
    [ "$kver" = "$LINUX_UPSTREAM_VERSION" ] ||
        die "tree has version $kver, expected $LINUX_UPSTREAM_VERSION"
else
    case "$kver" in
        7.3|7.3.*) ;;
        *) msg "warning: $TREE is Linux $kver; lab.config and the series are made for 7.3" ;;
    esac
fi
msg "Linux $kver"

# ---- 3. patches ------------------------------------------------------------
npatches=$(series_patches | wc -l)
if tree_is_git; then
    step patch "applying $npatches patches from $SERIES with git am"
    STEP_HINT="the patch does not apply to $SRC (the failed git am was aborted): rebase the series or the tree"
    git_id=()
    git -C "$SRC" config user.email >/dev/null 2>&1 ||
        git_id=(-c user.name="$PROG" -c user.email="$PROG@localhost")
    recent=$(git -C "$SRC" log -n 1000 --format=%s)
    while read -r p; do
        [ -n "$p" ] || continue
        subject=$(git mailinfo /dev/null /dev/null <"$PATCH_DIR/$p" |
            sed -n 's/^Subject: //p')
        [ -n "$subject" ] || die "$PATCH_DIR/$p has no Subject: (not a git format-patch file?)"
        if printf '%s\n' "$recent" | grep -Fxq -- "$subject"; then
            msg "  $p (already applied)"
            continue
        fi
        msg "  $p"
        if ! run git "${git_id[@]}" -C "$SRC" am --keep-cr "$PATCH_DIR/$p"; then
            git -C "$SRC" am --abort >/dev/null 2>&1 || true
            die "git am $PATCH_DIR/$p failed on $SRC"
        fi
    done < <(series_patches)
else
    step patch "applying $npatches patches from $SERIES with patch -p1"
    STEP_HINT="the series must apply without fuzz to $LINUX_PACKAGE $LINUX_DEB_VERSION"
    while read -r p; do
        [ -n "$p" ] || continue
        if [ -n "$TREE" ] && patch -d "$SRC" -p1 -R --dry-run --batch --force \
                --fuzz=0 -i "$PATCH_DIR/$p" >/dev/null 2>&1; then
            msg "  $p (already applied)"
            continue
        fi
        msg "  $p"
        run patch -d "$SRC" -p1 --batch --forward --fuzz=0 \
            --no-backup-if-mismatch -i "$PATCH_DIR/$p"
    done < <(series_patches)
fi

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
if [ -z "$TREE" ]; then
    source_desc="$LINUX_PACKAGE $LINUX_DEB_VERSION ($DEBIAN_SUITE, sha256 $LINUX_DEB_SHA256)"
else
    source_desc="tree $TREE"
    if tree_is_git; then
        source_desc="$source_desc at $(git -C "$TREE" rev-parse HEAD)"
    fi
fi
cat >"$OUTDIR/.build-info" <<EOF
source=$source_desc
kernel_release=$krelease
patches=$(series_patches | tr '\n' ' ')
compiler=$(sed -nE 's/^CONFIG_CC_VERSION_TEXT="(.*)"$/\1/p' "$OUTDIR/.config")
key=$KEY
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
build_seconds=$(( SECONDS - START ))
$(for s in "${!STEP_SECONDS[@]}"; do printf 'seconds_%s=%s\n' "${s//-/_}" "${STEP_SECONDS[$s]}"; done | sort)
EOF
rm -f "$OUTDIR/.build-in-progress"
printf '%s\n' "$KEY" >"$OUTDIR/.inputs-hash"
STEP=''
msg "done in $(( SECONDS - START ))s: $BZIMAGE ($krelease, $(stat -c %s "$BZIMAGE") bytes)"
