#!/bin/bash
# One call on a GPU machine: build with CUDA, run the GPU tests (make test-cuda), benchmark, check memory with
# compute-sanitizer; prints a short summary table last. Logs go to $OUT (the device tool's folder) or
# build/gpu-check (at most 8 files).
#   scripts/gpu-check.sh [all|nosan|split|split-only] [budget_seconds]
#     all        build + test-cuda + cuda_bench (Qwen3-1.7B shape, 8-bit, GPU 0) + memcheck on the quick test set
#     nosan      the same without compute-sanitizer
#     split      build + test-cuda + cuda_bench + the 70B bf16 shape split over two GPUs + memcheck if time is left
#     split-only build, then only the 70B split
# Steps are cut to fit the budget (default 560 s); the summary says what ran. Without the -dev packages on the
# machine (and no registry), the copy made by scripts/gpu-deps.sh in .carry/deps is used (carry it with the call).
set -u
mode=${1:-all}
budget=${2:-560}
build=${BUILD:-build}
out=${OUT:-$build/gpu-check}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0
t_begin=$(date +%s)
rows=()
row() { rows+=("$1|$2"); }
left() { echo $((budget - ($(date +%s) - t_begin))); }
limit() { # limit WANT: seconds for the next step, within what is left of the budget
    local l
    l=$(($(left) - 15))
    [ "$l" -gt "$1" ] && l=$1
    echo $l
}
# backtrace of a binary that crashed (exit 128 + signal, not a timeout): rerun it under cuda-gdb
backtrace() { # backtrace LOG CMD...
    local log=$1 l
    shift
    l=$(limit 60)
    [ "$l" -lt 20 ] && return
    timeout "$l" cuda-gdb -q -batch -ex run -ex bt --args "$@" >"$log" 2>&1
    grep -E '^#[0-9]|signal SIG' "$log" | head -16
}
summary() {
    echo
    echo "==== gpu-check summary ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), $ngpu GPU(s), $(($(date +%s) - t_begin)) s) ===="
    printf '| %-34s | %s\n' step result
    for r in "${rows[@]}"; do printf '| %-34s | %s\n' "${r%%|*}" "${r#*|}"; done
    [ -f "$out/test_cuda.log" ] && echo "tests: $(grep -E '^(ok|FAIL) ' "$out/test_cuda.log" | tr '\n' ' ')"
    [ -f "$out/bench.log" ] && grep '^SUMMARY' "$out/bench.log"
    [ -f "$out/split70b.log" ] && grep '^SUMMARY' "$out/split70b.log"
}

{
    nvidia-smi -L
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv
    nvidia-smi topo -m
    nvcc --version | tail -2
    ldd --version | head -1
    nproc
} >"$out/env.txt" 2>&1
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')

# dependencies
mk=()
probe='#include <jansson.h>
#include <microhttpd.h>
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>
#include <xxhash.h>
int main(void) { return 0; }'
if ! echo "$probe" | cc -x c - -o /dev/null -lmicrohttpd -ljansson -lpcre2-8 -lutf8proc -lxxhash >/dev/null 2>&1; then
    deps=$PWD/.carry/deps
    if [ -d "$deps" ]; then
        mk=("PKG_CFLAGS=-I$deps/include"
            "PKG_LIBS=-L$deps/lib -Wl,-rpath,$deps/lib -Wl,-rpath-link,$deps/lib -lmicrohttpd -ljansson -lpcre2-8 -lutf8proc -lxxhash")
        export LD_LIBRARY_PATH=$deps/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        echo "build dependencies: carried copy in $deps" >>"$out/env.txt"
    else
        echo "build dependencies missing and no .carry/deps (run scripts/gpu-deps.sh here first)" >>"$out/env.txt"
    fi
fi

# build (-k: a test of another module that does not compile must not stop ours)
t0=$(date +%s)
make -k -j"$(nproc)" CUDA=1 BUILD="$build" "${mk[@]}" all tests "$build/cuda_bench" >"$out/build.log" 2>&1
brc=$?
make BUILD="$build" fixtures >>"$out/build.log" 2>&1
missing=""
for f in "$build/strata" "$build/tests/test_cuda" "$build/cuda_bench"; do [ -x "$f" ] || missing="$missing $f"; done
row "build (make CUDA=1)" "exit $brc, $(($(date +%s) - t0)) s${missing:+, MISSING:$missing}"
if [ -n "$missing" ]; then
    grep -E 'error|Error' "$out/build.log" | head -20
    summary
    exit 1
fi
{
    echo "== kernels (cuobjdump) =="
    cuobjdump --dump-resource-usage "$build/obj/src/backend/cuda/cuda_matmul.o" | grep -A1 -E 'mm_kernel|f32mm' | grep -E 'Function|REG'
    echo "HMMA in mm kernels: $(cuobjdump --dump-sass "$build/obj/src/backend/cuda/cuda_matmul.o" | grep -c HMMA)"
    echo "local memory (LDL/STL) in mm kernels: $(cuobjdump --dump-sass "$build/obj/src/backend/cuda/cuda_matmul.o" | grep -cE 'LDL|STL')"
} >>"$out/env.txt" 2>&1
row "sass" "$(tail -2 "$out/env.txt" | tr '\n' ' ')"

if [ "$mode" != split-only ]; then
    t0=$(date +%s)
    CHECK_VERBOSE=1 STRATA_TEST_CUDA=1 timeout "$(limit 240)" scripts/run-tests.sh "$build" cuda >"$out/test.log" 2>&1
    trc=$?
    cp "$build/test-logs/test_cuda.log" "$out/test_cuda.log" 2>/dev/null
    row "make test-cuda" "exit $trc, $(tail -1 "$out/test.log" | head -c 80), $(($(date +%s) - t0)) s"
    grep -E 'FAIL|golden|split |matmul: worst' "$out/test_cuda.log" | head -40
    if grep -q 'exit 1[3-5][0-9]' "$out/test.log"; then
        echo "test_cuda crashed; backtrace:"
        backtrace "$out/crash.log" "$build/tests/test_cuda"
    fi

    t0=$(date +%s)
    timeout "$(limit 150)" "$build/cuda_bench" --variants >"$out/bench.log" 2>&1
    brc=$?
    row "cuda_bench (Qwen3-1.7B, 8-bit)" "exit $brc, $(($(date +%s) - t0)) s"
    if [ $brc -gt 128 ] && [ $brc -ne 137 ]; then
        echo "cuda_bench crashed; backtrace:"
        backtrace "$out/crash.log" "$build/cuda_bench"
        t0=$(date +%s)
        STRATA_CUDA_GRAPHS=0 timeout "$(limit 120)" "$build/cuda_bench" --variants >>"$out/bench.log" 2>&1
        row "cuda_bench, graphs off (retry)" "exit $?, $(($(date +%s) - t0)) s"
    fi
    sed -n '/^| figure/,/^$/p' "$out/bench.log"
    grep -E '^(cuda_bench|copy|weights|graphs)' "$out/bench.log"
fi

memcheck() { # memcheck SECONDS: the quick test set under compute-sanitizer (GPU 0)
    STRATA_TEST_QUICK=1 timeout "$1" compute-sanitizer --tool memcheck --error-exitcode 9 \
        "$build/tests/test_cuda" >"$out/memcheck.log" 2>&1
    echo $? >"$out/.memcheck_rc"
}
memcheck_row() {
    row "compute-sanitizer memcheck (quick)" "exit $(cat "$out/.memcheck_rc" 2>/dev/null), $(grep -m1 'ERROR SUMMARY' "$out/memcheck.log"), $(grep -cE '^(ok|FAIL) ' "$out/memcheck.log") tests done, $(($(date +%s) - $1)) s"
    rm -f "$out/.memcheck_rc"
    grep -m3 -A6 'Invalid\|Race\|Uninit' "$out/memcheck.log" | head -24
}

if [ "$mode" = split ] || [ "$mode" = split-only ]; then
    if [ "$ngpu" -ge 2 ]; then
        # memcheck (GPU 0, light) runs beside the 70B split (host generation, uploads, both GPUs)
        ms=$(date +%s)
        ml=$(limit 240)
        [ "$mode" = split ] && [ "$ml" -gt 45 ] && { memcheck "$ml" & }
        t0=$(date +%s)
        timeout "$(limit 300)" "$build/cuda_bench" --split70b >"$out/split70b.log" 2>&1
        row "70B bf16 split over 2 GPUs" "exit $?, $(($(date +%s) - t0)) s"
        grep -vE '^SUMMARY' "$out/split70b.log" | tail -8
        if [ "$mode" = split ]; then
            wait
            [ -f "$out/.memcheck_rc" ] && memcheck_row "$ms" || row "compute-sanitizer memcheck" "skipped (budget)"
        fi
    else
        row "70B bf16 split over 2 GPUs" "skipped: $ngpu GPU"
    fi
fi

if [ "$mode" = all ] || { [ "$mode" = split ] && [ "$ngpu" -lt 2 ]; }; then
    ms=$(date +%s)
    l=$(limit 200)
    if [ "$l" -gt 45 ]; then
        memcheck "$l"
        memcheck_row "$ms"
    else
        row "compute-sanitizer memcheck" "skipped (budget)"
    fi
fi
summary
