#!/bin/bash
# Soak a 2-stage pipeline (coordinator stage + 1 worker) on loopback: CLIENTS concurrent streaming clients for
# MINUTES minutes; zero failed requests, no growth in file descriptors, bounded RSS growth; prints latency
# percentiles and RSS/fds before and after.   usage: scripts/soak.sh [CLIENTS=64] [MINUTES=10] [MODEL_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-64}; minutes=${2:-10}; model=${3:-models/kjv-qwen3-21m-8bit}
tmp=$(mktemp -d); pids=()
trap 'for p in "${pids[@]}"; do kill $p 2>/dev/null; done; wait 2>/dev/null; rm -rf $tmp' EXIT
build/strata worker --listen 127.0.0.1:0 --threads 1 >"$tmp/w.out" 2>"$tmp/w.log" & pids+=($!)
for _ in $(seq 100); do grep -q listening "$tmp/w.out" 2>/dev/null && break; sleep 0.1; done
wport=$(sed -n 's/^listening .*:\([0-9]*\)$/\1/p' "$tmp/w.out")
build/strata serve -m "$model" --port 0 --threads 1 --parallel 16 --queue 256 --worker 127.0.0.1:$wport \
    2>"$tmp/c.log" & spid=$!; pids+=($spid)
for _ in $(seq 600); do grep -q "listening on http://" "$tmp/c.log" && break; sleep 0.1; done
url="http://$(grep -ao 'listening on http://[0-9.:]*' "$tmp/c.log" | head -1 | sed 's|listening on http://||')"
echo "soak: $clients clients, $minutes min, 2-stage pipeline at $url"
PYTHONPATH=tests/e2e python3 tests/e2e/soak.py "$url" "$spid" "$clients" "$minutes"
