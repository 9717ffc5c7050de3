#!/bin/bash
# A table of bad requests (bad JSON, types, ranges, context overflow, unknown model/route, wrong method, content
# type, API key, body and header limits, a full queue, a stalled client): each gets the right status and an
# OpenAI-shaped error naming the problem; the server keeps answering /health, and a client that leaves frees its
# KV slot at once.
source "$(dirname "$0")/server_env.bash"
start_server main -m "$DEFAULT_MODEL" --api-key sekrit --model-name kjv --ctx 512 --max-body 65536 --parallel 1 \
    --queue 1 --timeout 2
timeout 180 python3 "$E2E_ROOT/tests/e2e/server_errors.py" "$SERVER_URL" sekrit kjv
rc=$?
kill -0 "$SERVER_PID" 2>/dev/null || { echo "FAIL: the server died"; tail -n 20 "$SERVER_LOG"; exit 1; }
[ $rc -eq 0 ] || { echo "server log (tail):"; tail -n 40 "$SERVER_LOG"; }
exit $rc
