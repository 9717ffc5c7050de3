#!/bin/sh
# Prepares what a call on the lent GPU machine carries (it has no package registry, and nvcc takes minutes for
# cuda_matmul.cu there too):
#   scripts/gpu-deps.sh [deps|cuobj|all]     (default all)
#   deps:  strata's build dependencies (the headers and shared libraries of scripts/install-deps.sh's packages, with
#          the libraries they load) from this machine into .carry/deps (git-ignored); scripts/gpu-check.sh uses
#          them only when the system has none.
#   cuobj: the CUDA objects (sm_90 SASS, the Makefile's nvcc flags otherwise) into .carry/cuobj, with a hash of
#          every source and header they were built from (cuda_src_hash below); scripts/gpu-check.sh uses them only
#          when the hash matches the tree it runs on, else it compiles.
# Then carry .carry/deps and .carry/cuobj with the device call.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
what=${1:-all}

# the sources the CUDA objects depend on (gpu-check.sh computes the same)
cuda_src_hash() {
    (cd "$root" && cat src/backend/cuda/*.cu src/backend/cuda/*.cuh src/backend/cuda/*.h src/backend/backend.h \
        src/model/*.h src/core/*.h | sha256sum | cut -d' ' -f1)
}

deps() {
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
}

cuobj() {
    o="$root/.carry/cuobj"
    nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
    rm -rf "$o"
    mkdir -p "$o"
    h=$(cuda_src_hash)
    pids=""
    for f in "$root"/src/backend/cuda/*.cu; do
        "$nvcc" -O3 -std=c++17 -gencode arch=compute_90,code=sm_90 -I"$root/src" -I"$root/include" -Xcompiler -fPIC,-Wall \
            -c "$f" -o "$o/$(basename "$f" .cu).o" &
        pids="$pids $!"
    done
    for p in $pids; do wait "$p"; done
    [ "$h" = "$(cuda_src_hash)" ] || { echo "sources changed while compiling" >&2; exit 1; }
    echo "$h" >"$o/stamp"
    du -sh "$o"
}

case $what in
    deps) deps ;;
    cuobj) cuobj ;;
    all) deps; cuobj ;;
    *) echo "usage: $0 [deps|cuobj|all]" >&2; exit 2 ;;
esac
