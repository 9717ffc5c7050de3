#!/bin/bash
# A 3-stage pipeline of processes on loopback (the coordinator's own stage + 2 workers): the golden prompts give
# exactly the single-node tokens and logprobs through the API; /v1/cluster and /metrics describe the stages;
# a worker killed with SIGKILL mid-stream fails that stream within seconds and /health says why; the worker
# restarted on the same port brings the pipeline back without restarting the coordinator; a worker stopped
# with SIGSTOP (silent but connected) is detected by heartbeats, and recovers on SIGCONT.
source "$(dirname "$0")/server_env.bash"
WORKER_PIDS=()

start_worker() { # NAME PORT -> WORKER_PORT, WORKER_PID
    local name=$1 port=$2 out="$E2E_TMP/$1.out"
    timeout -s TERM 600 "$STRATA_BIN" worker --listen 127.0.0.1:$port --name "$name" --threads 1 \
        >"$out" 2>"$E2E_TMP/$name.log" &
    WORKER_PID=$!
    WORKER_PIDS+=("$WORKER_PID")
    for _ in $(seq 1 100); do
        WORKER_PORT=$(sed -n 's/^listening .*:\([0-9]*\)$/\1/p' "$out")
        if [ -n "$WORKER_PORT" ]; then
            # signals go to strata itself, not to the timeout(1) wrapper
            WORKER_PID=$(pgrep -P "$WORKER_PID" -x strata || echo "$WORKER_PID")
            WORKER_PIDS+=("$WORKER_PID")
            return 0
        fi
        kill -0 "$WORKER_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "FAIL: worker $name did not start"; cat "$E2E_TMP/$name.log"; exit 1
}

cluster_cleanup() {
    local rc=$?
    for p in "${WORKER_PIDS[@]}"; do kill -CONT "$p" 2>/dev/null; kill -TERM "$p" 2>/dev/null; done
    for p in "${WORKER_PIDS[@]}"; do wait "$p" 2>/dev/null; done
    (exit $rc)
    e2e_cleanup
}
trap cluster_cleanup EXIT

start_worker w1 0; P1=$WORKER_PORT
start_worker w2 0; P2=$WORKER_PORT; W2=$WORKER_PID
start_server single -m "$DEFAULT_MODEL" --parallel 4
SINGLE=$SERVER_URL
start_server coord -m "$DEFAULT_MODEL" --parallel 4 --worker 127.0.0.1:$P1 --worker 127.0.0.1:$P2 --dead-ms 1500
COORD=$SERVER_URL
python3 tests/e2e/cluster_check.py status "$COORD" 3 8 || exit 1
python3 tests/e2e/cluster_check.py compare "$SINGLE" "$COORD" "$STRATA_FIXTURES/goldens/kjv-qwen3.goldens.json" q8 || exit 1
curl -s "$COORD/metrics" | grep -q 'strata_stage_compute_seconds_total{stage="2",node="w2"}' \
    || { echo "FAIL: /metrics lacks per-stage compute time"; exit 1; }
echo "ok: /metrics has per-stage compute time and link figures"

# kill -9 the last stage in the middle of a stream
python3 tests/e2e/cluster_check.py stream_until_error "$COORD" $W2 || exit 1
python3 tests/e2e/cluster_check.py wait_health "$COORD" 503 5 || exit 1
kill -0 "$SERVER_PID" || { echo "FAIL: the coordinator died"; exit 1; }
start_worker w2 $P2; W2=$WORKER_PID
python3 tests/e2e/cluster_check.py wait_health "$COORD" 200 20 || exit 1
python3 tests/e2e/cluster_check.py generate "$COORD" || exit 1

# a silent stage: stopped, connection open
kill -STOP $W2
python3 tests/e2e/cluster_check.py wait_health "$COORD" 503 6 || exit 1
kill -CONT $W2
python3 tests/e2e/cluster_check.py wait_health "$COORD" 200 20 || exit 1
python3 tests/e2e/cluster_check.py generate "$COORD" || exit 1
python3 tests/e2e/cluster_check.py status "$COORD" 3 8 || exit 1

# garbage, truncated and oversized frames to a worker: refused, the worker and the pipeline keep serving
python3 tests/e2e/cluster_check.py garbage 127.0.0.1 $P1 || exit 1
kill -0 "${WORKER_PIDS[1]}" || { echo "FAIL: the worker died on garbage"; exit 1; }
python3 tests/e2e/cluster_check.py generate "$COORD" || exit 1
python3 tests/e2e/cluster_check.py status "$COORD" 3 8 || exit 1
echo "PASS"
