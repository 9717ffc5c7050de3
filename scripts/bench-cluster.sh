#!/bin/bash
# Pipeline overhead and throughput on loopback: a single-node server and a 2-stage pipeline (coordinator stage
# + 1 worker) on the same model, then tests/e2e/cluster_bench.py against both.
# usage: scripts/bench-cluster.sh [MODEL_DIR | --random CONFIG BITS] [TOKENS] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=build/strata
model=(-m models/kjv-qwen3-21m-8bit)
if [ "${1:-}" = "--random" ]; then model=(--random-weights --config "$2" --bits "$3"); shift 3
elif [ -n "${1:-}" ]; then model=(-m "$1"); shift; fi
tokens=${1:-128}
threads=${2:-1}
tmp=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill $p 2>/dev/null; done; wait 2>/dev/null; rm -rf $tmp' EXIT
$BIN worker --listen 127.0.0.1:0 --threads "$threads" >"$tmp/w.out" 2>"$tmp/w.log" & pids+=($!)
for _ in $(seq 100); do grep -q listening "$tmp/w.out" 2>/dev/null && break; sleep 0.1; done
wport=$(sed -n 's/^listening .*:\([0-9]*\)$/\1/p' "$tmp/w.out")
$BIN serve "${model[@]}" --port 0 --threads "$threads" --parallel 8 2>"$tmp/s.log" & pids+=($!)
$BIN serve "${model[@]}" --port 0 --threads "$threads" --parallel 8 --worker 127.0.0.1:$wport 2>"$tmp/c.log" & pids+=($!)
for f in s c; do
    for _ in $(seq 600); do grep -q "listening on http://" "$tmp/$f.log" && break; sleep 0.1; done
done
url() { echo "http://$(grep -ao 'listening on http://[0-9.:]*' "$tmp/$1.log" | head -1 | sed 's|listening on http://||')"; }
echo "model: ${model[*]}, $tokens tokens per stream, $threads thread(s) per process, $(nproc) cores"
PYTHONPATH=tests/e2e python3 tests/e2e/cluster_bench.py "$(url s)" "$(url c)" "$tokens"
