#!/bin/bash
# 32 concurrent streaming requests (chat and completions, temperature 0) against 16 KV slots: each must return
# exactly what it returns alone, and nothing may stay active or queued afterwards. Also prints tokens/s of one
# stream vs 8 concurrent streams (informational: timing is not asserted here; see server_load.py --check).
source "$(dirname "$0")/server_env.bash"
start_server main -m "$DEFAULT_MODEL" --parallel 16
timeout 300 python3 "$E2E_ROOT/tests/e2e/server_load.py" "$SERVER_URL" correctness 32 || exit 1
if ldd "$STRATA_BIN" 2>/dev/null | grep -q libasan; then
    echo "throughput: not measured on a sanitizer build"
else
    timeout 300 python3 "$E2E_ROOT/tests/e2e/server_load.py" "$SERVER_URL" throughput || exit 1
fi
kill -0 "$SERVER_PID" 2>/dev/null || { echo "FAIL: the server died"; exit 1; }
