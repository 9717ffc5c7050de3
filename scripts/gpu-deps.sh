#!/bin/sh
# Copies strata's build dependencies (the headers and shared libraries of scripts/install-deps.sh's packages, with
# the libraries they load) from this machine into .carry/deps (git-ignored), for a machine that lacks them and
# has no package registry (the lent GPU machine). scripts/gpu-check.sh uses them only when the system has none.
# usage: scripts/gpu-deps.sh    (then carry .carry/deps with the device call)
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
d="$root/.carry/deps"
rm -rf "$d"
mkdir -p "$d/include" "$d/lib"
for h in jansson.h jansson_config.h microhttpd.h pcre2.h utf8proc.h xxhash.h xxh3.h; do
    cp "/usr/include/$h" "$d/include/"
done
libdir=/usr/lib/x86_64-linux-gnu
for l in libmicrohttpd libjansson libpcre2-8 libutf8proc libxxhash; do
    real=$(readlink -f "$libdir/$l.so")
    cp "$real" "$d/lib/"
    soname=$(objdump -p "$real" | awk '/SONAME/ {print $2}')
    ln -sf "$(basename "$real")" "$d/lib/$soname"
    ln -sf "$soname" "$d/lib/$l.so"
done
# what libmicrohttpd loads (gnutls and its libraries), outside glibc
ldd "$libdir/libmicrohttpd.so" | awk '$3 ~ /^\// {print $3}' | while read -r p; do
    case $(basename "$p") in libc.so*|libm.so*|libpthread.so*|libdl.so*|ld-linux*) continue;; esac
    cp -L "$p" "$d/lib/$(basename "$p")"
done
du -sh "$d"
