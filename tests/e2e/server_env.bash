# Sourced by tests/e2e/server_*.sh (not a test itself: make test runs *.sh only).
# Starts `strata serve` processes on free ports (--port 0, the port is read from the log) with a hard timeout,
# and stops them on exit, whatever happens.
#   start_server NAME [serve options...]   sets SERVER_URL, SERVER_PID, SERVER_LOG, SERVER_PORT
#   skip "why"                             exit 77 with a visible message
#   need CMD                               skip unless CMD exists
# Servers run with --threads 1 unless the options say otherwise (STRATA_TEST_THREADS overrides): tests run next
# to their clients on small CI machines, where a spinning thread pool would fight the clients for the cores.
set -u
E2E_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STRATA_BIN=${STRATA_BIN:-$E2E_ROOT/build/strata}
STRATA_FIXTURES=${STRATA_FIXTURES:-$E2E_ROOT/build/fixtures}
case $STRATA_BIN in /*) ;; *) STRATA_BIN=$E2E_ROOT/$STRATA_BIN ;; esac
case $STRATA_FIXTURES in /*) ;; *) STRATA_FIXTURES=$E2E_ROOT/$STRATA_FIXTURES ;; esac
export STRATA_BIN STRATA_FIXTURES
export PYTHONPATH="$E2E_ROOT/tests/e2e${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
E2E_TMP=$(mktemp -d "${TMPDIR:-/tmp}/strata-e2e.XXXXXX")
SERVER_PIDS=()

skip() {
    echo "SKIP: $*"
    exit 77
}

need() {
    command -v "$1" >/dev/null 2>&1 || skip "$1 is not installed"
}

e2e_cleanup() {
    local rc=$? p st
    for p in "${SERVER_PIDS[@]}"; do kill -0 "$p" 2>/dev/null && kill -TERM "$p" 2>/dev/null; done
    for p in "${SERVER_PIDS[@]}"; do
        kill -0 "$p" 2>/dev/null || continue
        for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$p" 2>/dev/null; then
            echo "FAIL: server pid $p did not stop within 10 s of SIGTERM"
            kill -KILL "$p" 2>/dev/null
            rc=1
        fi
        wait "$p" 2>/dev/null
        st=$?
        # a clean stop exits 0; anything else (a sanitizer report at exit, a crash) fails the test
        if [ "$st" -ne 0 ] && [ "$st" -ne 127 ]; then
            echo "FAIL: server pid $p exited with status $st after SIGTERM"
            rc=1
        fi
    done
    if [ $rc -ne 0 ] && [ $rc -ne 77 ]; then
        for f in "$E2E_TMP"/*.log; do [ -f "$f" ] && { echo "--- $(basename "$f") (tail)"; tail -n 25 "$f"; }; done
    fi
    rm -rf "$E2E_TMP"
    exit $rc
}
trap e2e_cleanup EXIT
trap 'exit 1' INT TERM

need curl
need python3
[ -x "$STRATA_BIN" ] || { echo "FAIL: $STRATA_BIN is not built"; exit 1; }
[ -d "$STRATA_FIXTURES/models" ] || { echo "FAIL: fixtures missing in $STRATA_FIXTURES (make fixtures)"; exit 1; }
DEFAULT_MODEL=$STRATA_FIXTURES/models/kjv-qwen3-21m-8bit

start_server() {
    local name=$1
    shift
    local log="$E2E_TMP/$name.log" port="" threads=()
    case " $* " in *" --threads "*) ;; *) threads=(--threads "${STRATA_TEST_THREADS:-1}") ;; esac
    timeout -s TERM "${SERVER_TIMEOUT:-600}" "$STRATA_BIN" serve --host 127.0.0.1 --port 0 "${threads[@]}" "$@" \
        >"$E2E_TMP/$name.out" 2>"$log" &
    local pid=$!
    SERVER_PIDS+=("$pid")
    for _ in $(seq 1 600); do
        port=$(grep -ao 'listening on http://127\.0\.0\.1:[0-9]*' "$log" 2>/dev/null | head -n1 | sed 's/.*://')
        [ -n "$port" ] && break
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "FAIL: server $name exited while starting:"
            cat "$log"
            exit 1
        fi
        sleep 0.1
    done
    if [ -z "$port" ]; then
        echo "FAIL: server $name did not start within 60 s:"
        cat "$log"
        exit 1
    fi
    SERVER_URL="http://127.0.0.1:$port"
    SERVER_PORT=$port
    SERVER_PID=$pid
    SERVER_LOG=$log
    echo "server $name: $SERVER_URL (pid $pid, $*)"
}
