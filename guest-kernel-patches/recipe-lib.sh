# shellcheck shell=bash
# Shared by build-kernel.sh and build-selftests.sh (sourced, not run): the
# pinned Debian kernel source, the series, the step/log machinery, and the
# steps both recipes run the same way (host packages, fetching and unpacking
# the source, applying the series).
#
# The caller sets PROG (its name for messages), SCRIPT_PATH (itself) and
# SCRIPT_DIR (the directory of this file), and defines usage(); TREE is set
# by parse_recipe_args and require_tree.

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
# ---------------------------------------------------------------------------

PATCH_DIR="$SCRIPT_DIR"
SERIES="$PATCH_DIR/series"
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOWNLOAD_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/vhost-nic-lab/downloads"

msg() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { msg "error: $*"; exit 1; }

# outdir_is_current PRODUCT: OUTDIR holds PRODUCT made from the inputs whose
# cache key is KEY.
outdir_is_current() {
    [ -f "$1" ] && [ -f "$OUTDIR/.inputs-hash" ] &&
        [ "$(cat "$OUTDIR/.inputs-hash")" = "$KEY" ]
}

# claim_outdir PRODUCT: exits 0 when OUTDIR already holds PRODUCT for KEY,
# also after waiting for a concurrent run into OUTDIR; otherwise returns
# holding OUTDIR.lock on fd 9. Refuses a non-empty OUTDIR that the recipe
# did not create.
claim_outdir() {
    local product=$1
    if outdir_is_current "$product"; then
        msg "$product is up to date (key $KEY)"
        exit 0
    fi
    if [ -n "$(ls -A "$OUTDIR")" ] && [ ! -f "$OUTDIR/.inputs-hash" ] &&
            [ ! -f "$OUTDIR/.build-in-progress" ]; then
        die "$OUTDIR is not empty and was not created by $PROG; refusing to overwrite it"
    fi
    exec 9>"$OUTDIR.lock"
    if ! flock -n 9; then
        msg "another run into $OUTDIR is going on; waiting for it"
        flock 9
    fi
    if outdir_is_current "$product"; then
        msg "$product was made meanwhile (key $KEY)"
        exit 0
    fi
}

# parse_recipe_args ARG...: OUTDIR, TREE and PRINT_KEY from the command line
# both recipes take (OUTDIR [--tree PATH] | --print-key [--tree PATH]); the
# caller's usage() explains it.
parse_recipe_args() {
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
}

# require_tree PATH...: a --tree must hold each PATH (relative to it); TREE
# becomes absolute.
require_tree() {
    local p
    [ -n "$TREE" ] || return 0
    for p in "$@"; do
        [ -e "$TREE/$p" ] || die "--tree $TREE is not a kernel source tree (no $p)"
    done
    TREE=$(cd "$TREE" && pwd)
}

# recipe_cache_key [FILE...]: the cache key of the calling recipe: source
# identity, the recipe itself, each FILE, recipe-lib.sh, the series, every
# patch.
recipe_cache_key() {
    local p patches f
    patches=$(series_patches)
    for p in $patches; do
        [ -f "$PATCH_DIR/$p" ] || die "series lists missing patch $PATCH_DIR/$p"
    done
    {
        source_id
        cat "$SCRIPT_PATH"
        for f in "$@"; do
            printf '\n--- %s\n' "${f##*/}"
            cat "$f"
        done
        printf '\n--- recipe-lib.sh\n'
        cat "$SCRIPT_DIR/recipe-lib.sh"
        printf '\n--- series\n'
        cat "$SERIES"
        for p in $patches; do
            printf '\n--- %s\n' "$p"
            cat "$PATCH_DIR/$p"
        done
    } | sha256sum | cut -d' ' -f1
}

# source_description: what the recipe built from, for OUTDIR/.build-info.
source_description() {
    if [ -z "$TREE" ]; then
        printf '%s %s (%s, sha256 %s)\n' "$LINUX_PACKAGE" "$LINUX_DEB_VERSION" \
            "$DEBIAN_SUITE" "$LINUX_DEB_SHA256"
    elif tree_is_git; then
        printf 'tree %s at %s\n' "$TREE" "$(git -C "$TREE" rev-parse HEAD)"
    else
        printf 'tree %s\n' "$TREE"
    fi
}

# build_info_common: the lines of OUTDIR/.build-info both recipes write
# after their own: key, time, seconds in all and per step.
build_info_common() {
    local s
    printf 'key=%s\nbuilt=%s\nbuild_seconds=%s\n' "$KEY" \
        "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(( SECONDS - START ))"
    for s in "${!STEP_SECONDS[@]}"; do
        printf 'seconds_%s=%s\n' "${s//-/_}" "${STEP_SECONDS[$s]}"
    done | sort
}

# outdir_done: OUTDIR now holds the product for KEY.
outdir_done() {
    rm -f "$OUTDIR/.build-in-progress"
    printf '%s\n' "$KEY" >"$OUTDIR/.inputs-hash"
    STEP=''
}

series_patches() {
    [ -f "$SERIES" ] || die "missing $SERIES"
    sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$SERIES" | grep -v '^$' || true
}

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

# recipe_begin NAME: create the work directory ${TMPDIR:-/tmp}/NAME.XXXXXX
# with its logs/, and install the exit handler that reports a failed step.
recipe_begin() {
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
    LOGDIR="$WORK/logs"
    mkdir -p "$LOGDIR"
    STEP=''
    STEP_LOG=''
    STEP_HINT=''
    STEP_CMD=''
    BG_PID=''
    START=$SECONDS
    declare -gA STEP_SECONDS=()
    STEP_STARTED=$SECONDS
    trap on_exit EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

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

# install_apt_packages PKG...: install those that are missing (needs root).
install_apt_packages() {
    local missing=() pkg
    for pkg in "$@"; do
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
}

# fetch_and_unpack_source: sets SRC to the unpacked Debian tree in $WORK, or
# to $TREE; checks the version; the caller builds with make O=... .
fetch_and_unpack_source() {
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
                msg "LINUX_DEB_SHA256 at the top of $SCRIPT_DIR/recipe-lib.sh (see README.md, 'Updating the pin')"
                die "pinned version not available"
            fi
            mkdir -p "$WORK/dl"
            (cd "$WORK/dl" &&
                run apt-get "${APT_OPTS[@]}" download "$LINUX_PACKAGE=$LINUX_DEB_VERSION")
            [ -f "$WORK/dl/$LINUX_DEB_FILE" ] ||
                die "apt-get download did not produce $LINUX_DEB_FILE: $(ls "$WORK/dl")"

            step verify-source "checking the pinned SHA-256 of $LINUX_DEB_FILE"
            STEP_HINT="the archive's $LINUX_DEB_FILE differs from the pinned checksum; do not use it without checking why"
            (cd "$WORK/dl" && run sha256sum -c - \
                < <(printf '%s  %s\n' "$LINUX_DEB_SHA256" "$LINUX_DEB_FILE"))
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
    else
        step source "using the tree $TREE"
        SRC=$TREE
        if [ -f "$SRC/.config" ] || [ -d "$SRC/include/config" ]; then
            die "$SRC has in-tree build output (.config or include/config); this recipe builds out of tree (make O=...), which needs a clean source tree: run 'make mrproper' in $SRC (it deletes that tree's .config) or use a separate work tree"
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
}

# apply_series: the series onto $SRC (git am for a git --tree, else patch -p1).
apply_series() {
    local npatches
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
}
