#!/bin/sh
# Installs strata on a Debian or Ubuntu node from this source tree: the build dependencies (apt), the build, the
# binary, the bundled model (so `strata run` works from anywhere) and the docs under PREFIX; optionally a systemd
# unit that runs a worker. Safe to run again: it upgrades in place and keeps an existing worker configuration.
# The Dockerfile runs the same steps (keep the two in step).
#
# usage: scripts/install.sh [options]
#   --prefix DIR            install under DIR (default /usr/local): DIR/bin/strata, DIR/share/strata/models,
#                           DIR/share/doc/strata
#   --with-systemd-worker   also install strata-worker.service and its settings /etc/strata/worker.env (kept when
#                           it exists), create the system user "strata", enable and (re)start the unit
#   --worker-listen H:P     the worker's --listen in a new worker.env (default 127.0.0.1:50051: loopback only;
#                           use 0.0.0.0:50051 with --secret-file so other machines can reach it)
#   --secret-file FILE      copy FILE to /etc/strata/secret (mode 0640, group strata) and use it in a new worker.env
#   --no-start              with --with-systemd-worker: install and enable the unit, do not (re)start it
#   --no-deps               do not install packages (they must be there already)
#   --runtime-deps          only install the packages the strata binary needs at run time, then exit
#   --build-dir DIR         build in DIR (default: build, in the source tree)
#   --skip-build            install DIR/strata as it is (built before, e.g. by `make`)
#   --jobs N                parallel build jobs (default: the number of CPUs)
#   --cuda auto|0|1         build the CUDA backend: when nvcc is found (default), never, always
#   -h, --help
# Environment: DESTDIR=/some/root stages everything under that root (packaging, tests): no package is installed,
# no user created, nothing started.
set -eu

SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/usr/local
SYSTEMD=0
LISTEN=127.0.0.1:50051
SECRET=""
START=1
DEPS=1
RUNTIME_ONLY=0
BUILD_DIR=""
SKIP_BUILD=0
JOBS=$(nproc 2>/dev/null || echo 2)
CUDA_OPT=auto
DESTDIR=${DESTDIR:-}
MODEL=kjv-qwen3-21m-8bit
# packages the binary links against at run time (Debian 12 / Ubuntu 22.04 names; Ubuntu 24.04 renames a few:
# --runtime-deps falls back to the -dev packages, which pull in whatever the release calls them)
RUNTIME_PKGS="libmicrohttpd12 libjansson4 libpcre2-8-0 libutf8proc2 libxxhash0"
RUNTIME_DEV_PKGS="libmicrohttpd-dev libjansson-dev libpcre2-dev libutf8proc-dev libxxhash-dev"

say() { echo "install.sh: $*"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -eu/p' "$0" | sed -e '/^set -eu/d' -e 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case $1 in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift ;;
        --prefix=*) PREFIX=${1#*=} ;;
        --with-systemd-worker) SYSTEMD=1 ;;
        --worker-listen) [ $# -ge 2 ] || die "--worker-listen needs HOST:PORT"; LISTEN=$2; shift ;;
        --secret-file) [ $# -ge 2 ] || die "--secret-file needs a file"; SECRET=$2; shift ;;
        --no-start) START=0 ;;
        --no-deps) DEPS=0 ;;
        --runtime-deps) RUNTIME_ONLY=1 ;;
        --build-dir) [ $# -ge 2 ] || die "--build-dir needs a directory"; BUILD_DIR=$2; shift ;;
        --skip-build) SKIP_BUILD=1 ;;
        --jobs) [ $# -ge 2 ] || die "--jobs needs a number"; JOBS=$2; shift ;;
        --cuda) [ $# -ge 2 ] || die "--cuda needs auto, 0 or 1"; CUDA_OPT=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option \"$1\" (see --help)" ;;
    esac
    shift
done

case $PREFIX in /*) ;; *) die "--prefix must be an absolute path (got \"$PREFIX\")" ;; esac
PREFIX=${PREFIX%/}
[ -n "$PREFIX" ] || PREFIX=/
case $JOBS in ''|*[!0-9]*) die "--jobs: expected a number, got \"$JOBS\"" ;; esac
case $CUDA_OPT in auto|0|1) ;; *) die "--cuda: expected auto, 0 or 1, got \"$CUDA_OPT\"" ;; esac
case $LISTEN in *:*) ;; *) die "--worker-listen: expected HOST:PORT, got \"$LISTEN\"" ;; esac
case $LISTEN in *[!A-Za-z0-9.:_-]*) die "--worker-listen: unexpected characters in \"$LISTEN\"" ;; esac
[ -z "$SECRET" ] || [ -s "$SECRET" ] || die "--secret-file $SECRET does not exist or is empty"
if [ -z "$BUILD_DIR" ]; then BUILD_DIR=$SRC/build; fi
case $BUILD_DIR in /*) ;; *) BUILD_DIR=$(pwd)/$BUILD_DIR ;; esac

SUDO=""
need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "$1 needs root: run as root or install sudo"
        SUDO=sudo
    fi
}

check_os() {
    [ -r /etc/os-release ] || die "no /etc/os-release: this installer supports Debian and Ubuntu"
    # shellcheck disable=SC1091
    os_id=$(. /etc/os-release && echo "${ID:-} ${ID_LIKE:-}")
    case " $os_id " in
        *" debian "*|*" ubuntu "*) ;;
        *) die "this installer supports Debian and Ubuntu (found: $os_id); install the packages of scripts/install-deps.sh by hand and use --no-deps" ;;
    esac
}

apt_install() {
    need_root "installing packages"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -qq --no-install-recommends "$@"
}

if [ $RUNTIME_ONLY -eq 1 ]; then
    check_os
    missing=""
    for p in $RUNTIME_PKGS; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
    done
    [ -z "$missing" ] && { say "runtime packages are installed"; exit 0; }
    # shellcheck disable=SC2086
    if ! apt_install $missing; then
        say "runtime package names differ on this release; installing the -dev packages instead"
        # shellcheck disable=SC2086
        apt_install $RUNTIME_DEV_PKGS
    fi
    exit 0
fi

# ---- 1. dependencies ----
if [ $DEPS -eq 1 ] && [ -z "$DESTDIR" ]; then
    check_os
    need_root "installing packages"
    say "build dependencies (scripts/install-deps.sh)"
    $SUDO "$SRC/scripts/install-deps.sh"
fi

# ---- 2. build ----
BIN=$BUILD_DIR/strata
if [ $SKIP_BUILD -eq 0 ]; then
    command -v make >/dev/null 2>&1 || die "make is not installed (drop --no-deps, or install build-essential)"
    say "building in $BUILD_DIR with $JOBS jobs"
    if [ "$CUDA_OPT" = auto ]; then
        make -C "$SRC" -j"$JOBS" BUILD="$BUILD_DIR" "$BIN"
    else
        make -C "$SRC" -j"$JOBS" BUILD="$BUILD_DIR" CUDA="$CUDA_OPT" "$BIN"
    fi
fi
[ -x "$BIN" ] || die "$BIN is missing: build first (make), or drop --skip-build"
"$BIN" --version >/dev/null 2>&1 || die "$BIN does not run"

# ---- 3. install ----
ROOT=$DESTDIR
if [ -z "$DESTDIR" ]; then
    target=$PREFIX
    while [ ! -e "$target" ]; do target=$(dirname "$target"); done
    [ -w "$target" ] || need_root "installing into $PREFIX"
fi
BINDIR=$ROOT$PREFIX/bin
MODELDIR=$ROOT$PREFIX/share/strata/models/$MODEL
DOCDIR=$ROOT$PREFIX/share/doc/strata
say "installing into $ROOT$PREFIX"
$SUDO install -d -m 0755 "$BINDIR" "$MODELDIR" "$DOCDIR"
# a new file renamed over the old one: a running strata keeps its binary, the next start gets the new one
$SUDO install -m 0755 "$BIN" "$BINDIR/.strata.new"
$SUDO mv -f "$BINDIR/.strata.new" "$BINDIR/strata"
for f in "$SRC/models/$MODEL"/*; do
    [ -f "$f" ] || continue
    $SUDO install -m 0644 "$f" "$MODELDIR/.$(basename "$f").new"
    $SUDO mv -f "$MODELDIR/.$(basename "$f").new" "$MODELDIR/$(basename "$f")"
done
for f in "$SRC/README.md" "$SRC"/docs/*.md; do
    [ -f "$f" ] && $SUDO install -m 0644 "$f" "$DOCDIR/"
done

# ---- 4. check: the installed binary finds the installed model from anywhere ----
out=$(cd / && "$BINDIR/strata" run -p "In the beginning" -n 4 --temp 0 --threads 1 2>&1) ||
    die "the installed strata does not run the bundled model:
$out"
say "check: strata run with the installed model: ok"

# ---- 5. systemd worker ----
if [ $SYSTEMD -eq 1 ]; then
    ETC=$ROOT/etc/strata
    UNIT=$ROOT/etc/systemd/system/strata-worker.service
    [ -z "$ROOT" ] && need_root "installing a systemd unit"
    if [ -z "$ROOT" ] && ! getent passwd strata >/dev/null 2>&1; then
        say "creating the system user strata"
        $SUDO useradd --system --home-dir /var/lib/strata --no-create-home --shell /usr/sbin/nologin \
            --user-group strata
    fi
    $SUDO install -d -m 0755 "$ETC" "$(dirname "$UNIT")"
    secret_arg=""
    if [ -n "$SECRET" ]; then
        $SUDO install -m 0640 "$SECRET" "$ETC/secret"
        [ -z "$ROOT" ] && $SUDO chgrp strata "$ETC/secret"
        secret_arg=" --secret-file /etc/strata/secret"
    elif [ -s "$ETC/secret" ]; then
        secret_arg=" --secret-file /etc/strata/secret"
    fi
    if [ -e "$ETC/worker.env" ]; then
        say "keeping $ETC/worker.env"
    else
        tmp=$(mktemp)
        cat >"$tmp" <<EOF
# Settings of strata-worker.service (strata worker --help lists every option). One line, no variable expansion.
# The worker listens on loopback unless told otherwise: for a cluster, listen on an address the coordinator can
# reach and use the cluster's shared secret (the same file on every node), e.g.
#   STRATA_WORKER_ARGS=--listen 0.0.0.0:50051 --secret-file /etc/strata/secret --cache-dir /var/cache/strata
# Other useful options: --name NODE, -m MODEL_DIR (this node's copy), --device cuda:0, --threads N,
# --max-memory 8G (what this node offers to the placement).
# After a change: systemctl restart strata-worker
STRATA_WORKER_ARGS=--listen $LISTEN$secret_arg --cache-dir /var/cache/strata
EOF
        $SUDO install -m 0644 "$tmp" "$ETC/worker.env"
        rm -f "$tmp"
        say "wrote $ETC/worker.env (listen $LISTEN${secret_arg:+, with the secret})"
    fi
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# installed by strata scripts/install.sh; settings in /etc/strata/worker.env
[Unit]
Description=strata worker (one pipeline stage of a strata cluster)
Documentation=file://$PREFIX/share/doc/strata/operations.md
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
EnvironmentFile=/etc/strata/worker.env
ExecStart=$PREFIX/bin/strata worker \$STRATA_WORKER_ARGS
User=strata
Group=strata
CacheDirectory=strata
StateDirectory=strata
Environment=HOME=/var/lib/strata
Restart=on-failure
RestartSec=5
KillSignal=SIGTERM
TimeoutStopSec=30
NoNewPrivileges=yes
ProtectSystem=full
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
EOF
    $SUDO install -m 0644 "$tmp" "$UNIT"
    rm -f "$tmp"
    say "wrote $UNIT"
    if [ -z "$ROOT" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        $SUDO systemctl daemon-reload
        $SUDO systemctl enable strata-worker.service >/dev/null
        if [ $START -eq 1 ]; then
            $SUDO systemctl restart strata-worker.service
            say "strata-worker is enabled and (re)started (systemctl status strata-worker)"
        else
            say "strata-worker is enabled; start it with: systemctl start strata-worker"
        fi
    else
        say "systemd is not running here: the unit is installed but not enabled"
    fi
fi

say "done: $PREFIX/bin/strata ($("$BINDIR/strata" --version 2>/dev/null))"
case ":${PATH:-}:" in *":$PREFIX/bin:"*) ;; *) [ -z "$DESTDIR" ] && say "note: $PREFIX/bin is not in PATH" ;; esac
exit 0
