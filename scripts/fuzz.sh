#!/bin/bash
# Builds and runs the libFuzzer targets.
#   usage: scripts/fuzz.sh SECONDS [target...]      (target: fuzz_frame, or just frame; default: all)
# Every tests/fuzz/fuzz_<name>.c is linked with clang -fsanitize=fuzzer,address,undefined against all library
# sources (src/**/*.c except src/cli and src/backend/cuda, compiled with -DSTRATA_FUZZ into build-fuzz/obj).
# Each target runs SECONDS on a scratch copy of tests/fuzz/corpus/<name>/ (the repo is never written to), with
# tests/fuzz/<name>.dict when present; crashes, leaks and hangs are saved to build-fuzz/crashes/<name>/.
# Prints executions per target; exits non-zero if a target failed to build or found anything.
set -u -o pipefail

usage() { echo "usage: scripts/fuzz.sh SECONDS [target...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
secs=$1; shift
[[ "$secs" =~ ^[0-9]+$ ]] && [ "$secs" -gt 0 ] || usage

cd "$(dirname "$0")/.."
out=build-fuzz
CC=${FUZZ_CC:-clang}
jobs=$(nproc 2>/dev/null || echo 2)

# clang with libFuzzer and the sanitizer runtimes (Debian: clang + libclang-rt-14-dev)
have_fuzzer() { echo 'int LLVMFuzzerTestOneInput(const char *d, long n){return 0;}' |
    "$CC" -x c -fsanitize=fuzzer,address,undefined -o /dev/null - >/dev/null 2>&1; }
if ! command -v "$CC" >/dev/null 2>&1 || ! have_fuzzer; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "fuzz: installing clang and libclang-rt-14-dev" >&2
        apt-get update -qq >/dev/null && apt-get install -y -qq clang libclang-rt-14-dev >/dev/null
    fi
    have_fuzzer || { echo "fuzz: $CC cannot build libFuzzer targets (apt-get install clang libclang-rt-14-dev)" >&2; exit 2; }
fi

pkgs="libmicrohttpd jansson libpcre2-8 libutf8proc libxxhash"
pkg_cflags=$(pkg-config --cflags $pkgs 2>/dev/null || true)
pkg_libs=$(pkg-config --libs $pkgs 2>/dev/null || echo "-lmicrohttpd -ljansson -lpcre2-8 -lutf8proc -lxxhash")
san="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
cflags="-std=c11 -D_GNU_SOURCE -DSTRATA_FUZZ -g -O1 -pthread $san -Iinclude -Isrc $pkg_cflags"

# Targets to run.
targets=()
if [ $# -eq 0 ]; then
    for f in tests/fuzz/fuzz_*.c; do [ -f "$f" ] && targets+=("$(basename "$f" .c)"); done
else
    for t in "$@"; do
        t=${t%.c}; t=${t#fuzz_}
        [ -f "tests/fuzz/fuzz_$t.c" ] || { echo "fuzz: no target tests/fuzz/fuzz_$t.c" >&2; exit 2; }
        targets+=("fuzz_$t")
    done
fi
[ ${#targets[@]} -gt 0 ] || { echo "fuzz: no targets in tests/fuzz" >&2; exit 2; }

# Library objects: rebuilt when their .c is newer, or everything when a header or the flags changed.
mkdir -p "$out/obj" "$out/logs"
srcs=$(find src -name '*.c' -not -path 'src/cli/*' -not -path 'src/backend/cuda/*' | sort)
stamp="$out/obj/.flags"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$CC $cflags" ] ||
   [ -n "$(find src include -name '*.h' -newer "$stamp" 2>/dev/null | head -n1)" ]; then
    rm -rf "$out/obj"; mkdir -p "$out/obj"
fi
export CC cflags out
compile_one() {
    local src=$1 obj="$out/obj/${1%.c}.o"
    if [ ! -f "$obj" ] || [ "$src" -nt "$obj" ]; then
        mkdir -p "$(dirname "$obj")"
        "$CC" $cflags -fsanitize=fuzzer-no-link -c "$src" -o "$obj" 2>"$obj.log" ||
            { echo "fuzz: compiling $src failed:" >&2; sed 's/^/    /' "$obj.log" >&2; rm -f "$obj"; return 1; }
    fi
}
export -f compile_one
status=0
# A library file that does not compile fails the run, but targets that link without it still run.
if ! printf '%s\n' $srcs | xargs -P "$jobs" -I{} bash -c 'compile_one "$@"' _ {}; then
    echo "fuzz: some library sources failed to compile (see above); running what still links" >&2
    status=1
fi
echo "$CC $cflags" > "$stamp"
lib="$out/libstrata-fuzz.a"
rm -f "$lib"
objs=$(for s in $srcs; do o="$out/obj/${s%.c}.o"; [ -f "$o" ] && echo "$o"; done)
ar rcs "$lib" $objs

declare -A result execs
for t in "${targets[@]}"; do
    name=${t#fuzz_}
    bin="$out/$t"
    if ! "$CC" $cflags -fsanitize=fuzzer -Itests "tests/fuzz/$t.c" "$lib" $pkg_libs -lm -lpthread -ldl \
            -o "$bin" 2>"$out/logs/$t.build.log"; then
        sed 's/^/    /' "$out/logs/$t.build.log" >&2
        result[$t]="BUILD FAILED"; execs[$t]=0; status=1; continue
    fi
    work=$(mktemp -d "${TMPDIR:-/tmp}/strata-fuzz-$name.XXXXXX")
    [ -d "tests/fuzz/corpus/$name" ] && cp -r "tests/fuzz/corpus/$name/." "$work/" 2>/dev/null
    crashes="$out/crashes/$name"
    mkdir -p "$crashes"
    n_before=$(find "$crashes" -type f | wc -l)
    dict=(); [ -f "tests/fuzz/$name.dict" ] && dict=(-dict="tests/fuzz/$name.dict")
    log="$out/logs/$t.log"
    echo "fuzz: $t for ${secs}s (corpus $(find "$work" -type f | wc -l) files)"
    ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1} \
    UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1} \
        "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2560 -print_final_stats=1 \
            -artifact_prefix="$crashes/" "${dict[@]}" "$work" >"$log" 2>&1
    rc=$?
    n=$(grep -m1 'stat::number_of_executed_units' "$log" | awk '{print $2}')
    execs[$t]=${n:-0}
    n_after=$(find "$crashes" -type f | wc -l)
    if [ $rc -ne 0 ] || [ "$n_after" -gt "$n_before" ]; then
        result[$t]="FAILED (exit $rc, artifacts in $crashes/)"
        status=1
        grep -m5 -E 'ERROR: |SUMMARY: |runtime error|Test unit written' "$log" | sed 's/^/    /'
    else
        result[$t]="ok"
    fi
    rm -rf "$work"
done

echo "fuzz summary (${secs}s each):"
for t in "${targets[@]}"; do printf '  %-28s %12s execs  %s\n' "$t" "${execs[$t]}" "${result[$t]}"; done
[ $status -eq 0 ] || echo "fuzz: FAILED" >&2
exit $status
