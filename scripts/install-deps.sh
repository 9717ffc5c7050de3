#!/bin/sh
# Installs the Debian/Ubuntu packages strata builds and tests with. Run as root (or with sudo available).
# usage: scripts/install-deps.sh [--with-tests]   (--with-tests adds what the test suite uses: node/npm, bc, prometheus)
set -eu
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
pkgs="build-essential pkg-config xz-utils bc libmicrohttpd-dev libjansson-dev libpcre2-dev libutf8proc-dev libxxhash-dev"
if [ "${1:-}" = "--with-tests" ]; then
    pkgs="$pkgs curl python3 iproute2 clang libclang-rt-14-dev prometheus chromium"
    command -v npm >/dev/null 2>&1 || pkgs="$pkgs nodejs npm"
fi
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends $missing
fi
