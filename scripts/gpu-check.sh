#!/bin/bash
# One call on a GPU machine: build with CUDA, run the GPU tests (make test-cuda), benchmark, check memory with
# compute-sanitizer; prints a short summary table last. Logs go to $OUT (the device tool's folder) or
# build/gpu-check (at most 8 files).
#   scripts/gpu-check.sh [all|nosan|perf|split|split-only] [budget_seconds]
#     all        build + test-cuda + cuda_bench (Qwen3-1.7B shape, 8-bit, GPU 0) + memcheck on the quick test set
#     nosan      the same without compute-sanitizer
#     perf       build + test-cuda + cuda_bench + ncu of one decode step at batch 1 and 32 (kernel table)
#     split      build + test-cuda + cuda_bench + the 70B bf16 shape split over two GPUs + memcheck if time is left
#     split-only build, then only the 70B split
# cuda_bench runs with --variants --profile (feature switches, per-kernel profile). Steps are cut to fit the budget
# (default 560 s); the summary says what ran. Without the -dev packages on the machine (and no registry), the copy
# made by scripts/gpu-deps.sh in .carry/deps is used; CUDA objects prebuilt by `scripts/gpu-deps.sh cuobj` in
# .carry/cuobj are used when their source hash matches (carry both with the call).
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

# prebuilt CUDA objects, when built from exactly these sources
cu_hash=$(cat src/backend/cuda/*.cu src/backend/cuda/*.cuh src/backend/cuda/*.h src/backend/backend.h src/model/*.h \
    src/core/*.h | sha256sum | cut -d' ' -f1)
if [ -f .carry/cuobj/stamp ] && [ "$(cat .carry/cuobj/stamp)" = "$cu_hash" ]; then
    mkdir -p "$build/obj/src/backend/cuda"
    cp .carry/cuobj/*.o "$build/obj/src/backend/cuda/"
    touch "$build/obj/src/backend/cuda/"*.o
    echo "CUDA objects: prebuilt (.carry/cuobj, hash $cu_hash)" >>"$out/env.txt"
elif [ -d .carry/cuobj ]; then
    echo "CUDA objects: .carry/cuobj is stale (sources changed), compiling" >>"$out/env.txt"
fi

# build (-k: a test of another module that does not compile must not stop ours)
t0=$(date +%s)
make -k -j"$(nproc)" CUDA=1 MPI=0 BUILD="$build" "${mk[@]}" all tests "$build/cuda_bench" >"$out/build.log" 2>&1
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
    cuobjdump --dump-resource-usage "$build/obj/src/backend/cuda/cuda_matmul.o" | grep -A1 -E 'mm_kernel|mm2_kernel|f32mm' | grep -E 'Function|REG'
    echo "HMMA in mm kernels: $(cuobjdump --dump-sass "$build/obj/src/backend/cuda/cuda_matmul.o" | grep -c HMMA)"
    echo "local memory (LDL/STL) in mm kernels: $(cuobjdump --dump-sass "$build/obj/src/backend/cuda/cuda_matmul.o" | grep -cE 'LDL|STL')"
} >>"$out/env.txt" 2>&1
row "sass" "$(tail -2 "$out/env.txt" | tr '\n' ' ')"

if [ "$mode" != split-only ]; then
    t0=$(date +%s)
    # QUICK_TESTS=1: the reduced set (STRATA_TEST_QUICK) to save device time
    CHECK_VERBOSE=1 STRATA_TEST_CUDA=1 STRATA_TEST_QUICK=${QUICK_TESTS:-0} timeout "$(limit 240)" scripts/run-tests.sh "$build" cuda >"$out/test.log" 2>&1
    trc=$?
    cp "$build/test-logs/test_cuda.log" "$out/test_cuda.log" 2>/dev/null
    row "make test-cuda" "exit $trc, $(tail -1 "$out/test.log" | head -c 80), $(($(date +%s) - t0)) s"
    grep -E 'FAIL|golden|split |matmul: worst' "$out/test_cuda.log" | head -40
    if grep -q 'exit 1[3-5][0-9]' "$out/test.log"; then
        echo "test_cuda crashed; backtrace:"
        backtrace "$out/crash.log" "$build/tests/test_cuda"
    fi

    t0=$(date +%s)
    timeout "$(limit 150)" "$build/cuda_bench" --variants --profile >"$out/bench.log" 2>&1
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
    grep -E '^(device|copy)' "$out/bench.log"
fi

# ncu: one decode step per batch size in NCU_BATCHES (default 1), every kernel its own launch (no graphs), kernel
# table by time
if [ "$mode" = perf ]; then
    t0=$(date +%s)
    l=$(limit 100)
    if command -v ncu >/dev/null 2>&1 && [ "$l" -gt 40 ]; then
        STRATA_CUDA_GRAPHS=0 timeout "$l" ncu --profile-from-start off --cache-control none --clock-control none \
            --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,smsp__inst_executed.sum \
            --csv --page raw --print-units base "$build/cuda_bench" --ncu --batches "${NCU_BATCHES:-1}" >"$out/ncu.csv" 2>"$out/ncu.err"
        nrc=$?
        python3 - "$out/ncu.csv" >"$out/ncu_summary.txt" 2>&1 <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if r]
hi = next(i for i, r in enumerate(rows) if 'Kernel Name' in r)
h = rows[hi]
col = {n: h.index(n) for n in h}
def num(r, n):
    try: return float(r[col[n]].replace(',', ''))
    except (KeyError, ValueError): return 0.0
data = [r for r in rows[hi + 1:] if len(r) == len(h) and r[col['ID']].strip().isdigit()]
# two profiled steps (batch 1, then batch 32) in launch order: a step has one embedding kernel
steps, cur = [], []
for r in data:
    if 'embed_kernel' in r[col['Kernel Name']] and any('embed_kernel' in x[col['Kernel Name']] for x in cur):
        steps.append(cur); cur = []
    cur.append(r)
if cur: steps.append(cur)
for si, st in enumerate(steps):
    agg = collections.OrderedDict()
    for r in st:
        name = r[col['Kernel Name']].split('(')[0][:40]
        mb = (num(r, 'dram__bytes_read.sum') + num(r, 'dram__bytes_write.sum')) / 1e6
        key = (name, r[col['Grid Size']], r[col['Block Size']], round(mb) if mb >= 2 else round(mb, 1))
        a = agg.setdefault(key, [0, 0.0, 0.0, 0.0, 0.0])
        a[0] += 1; a[1] += num(r, 'gpu__time_duration.sum'); a[2] += num(r, 'dram__bytes_read.sum') + num(r, 'dram__bytes_write.sum')
        a[3] += num(r, 'sm__warps_active.avg.pct_of_peak_sustained_active'); a[4] = num(r, 'launch__registers_per_thread')
        a.append(num(r, 'smsp__inst_executed.sum'))
    tot = sum(a[1] for a in agg.values())
    print('step %d: %d kernels, %.1f us in kernels (serialized by ncu)' % (si, len(st), tot / 1e3))
    print('| kernel | grid | block | DRAM MB each | n | us total | us each | DRAM GB/s | warps active % | regs | warp instr / KB DRAM |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for k, a in sorted(agg.items(), key=lambda kv: -kv[1][1])[:18]:
        print('| %s | %s | %s | %s | %d | %.1f | %.2f | %.0f | %.0f | %d | %.0f |' % (k[0], k[1], k[2], k[3], a[0], a[1] / 1e3,
              a[1] / 1e3 / a[0], a[2] / a[1] if a[1] else 0, a[3] / a[0], a[4], sum(a[5:]) / (a[2] / 1e3) if a[2] else 0))
    print()
PY
        row "ncu (one step per batch size)" "exit $nrc, $(($(date +%s) - t0)) s"
        cat "$out/ncu_summary.txt"
        { echo "== ncu stderr =="; tail -20 "$out/ncu.err"; } >>"$out/ncu_summary.txt"
        rm -f "$out/ncu.err"
        gzip -f "$out/ncu.csv"
    else
        row "ncu" "skipped (no ncu or budget)"
    fi
fi

memcheck() { # memcheck SECONDS: the quick test set under compute-sanitizer (GPU 0)
    STRATA_TEST_QUICK=1 timeout "$1" compute-sanitizer --tool memcheck --error-exitcode 9 \
        "$build/tests/test_cuda" >"$out/memcheck.log" 2>&1
    echo $? >"$out/.memcheck_rc"
}
memcheck_row() {
    row "compute-sanitizer memcheck (quick)" "exit $(cat "$out/.memcheck_rc" 2>/dev/null), $(grep -m1 'ERROR SUMMARY' "$out/memcheck.log"), $(grep -m1 -E '^[0-9]+ tests,' "$out/memcheck.log"), $(($(date +%s) - $1)) s"
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

if [ "$mode" = all ] || { [ "$mode" = split ] && [ "$ngpu" -lt 2 ]; } || { [ "$mode" = perf ] && [ "${MEMCHECK:-0}" = 1 ]; }; then
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
