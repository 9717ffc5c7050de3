#!/bin/bash
# The web page at / (src/server/webui.c) in headless Chromium, driven by playwright-core (pinned below, installed
# into build/node/webui on first use) against `strata serve` with an API key and a 2-stage pipeline (this
# process + one `strata worker`). The checks are in tests/e2e/webui.mjs; screenshots (desktop and 390x844 phone)
# are kept in BUILD/test-artifacts/webui-*.png. Skips (77) when Chromium, node or npm is missing, or when
# playwright-core cannot be installed (offline). CHROMIUM=PATH picks another browser binary.
source "$(dirname "$0")/server_env.bash"
PLAYWRIGHT_VERSION=1.65.1
chromium_bin=${CHROMIUM:-/usr/bin/chromium}
[ -x "$chromium_bin" ] || skip "chromium is not installed at $chromium_bin (apt-get install chromium)"
command -v node >/dev/null 2>&1 || skip "node is not installed (needed for the web page test)"
command -v npm >/dev/null 2>&1 || skip "npm is not installed (needed for the web page test)"
export CHROMIUM=$chromium_bin

# playwright-core in its own prefix, so that it and the openai client's build/node do not prune each other
node_dir=${STRATA_NODE_DIR:-$E2E_ROOT/build/node}/webui
mkdir -p "$node_dir"
have=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' \
    "$node_dir/node_modules/playwright-core/package.json" 2>/dev/null || true)
if [ "$have" != "$PLAYWRIGHT_VERSION" ]; then
    printf '{"name": "strata-e2e-webui", "private": true, "type": "module", "dependencies": {"playwright-core": "%s"}}\n' \
        "$PLAYWRIGHT_VERSION" >"$node_dir/package.json"
    echo "installing playwright-core@$PLAYWRIGHT_VERSION into $node_dir"
    timeout 180 npm install --prefix "$node_dir" --no-audit --no-fund --loglevel=error >"$E2E_TMP/npm.log" 2>&1 ||
        { cat "$E2E_TMP/npm.log"; skip "cannot install the playwright-core npm package (offline?)"; }
fi
cp "$E2E_ROOT/tests/e2e/webui.mjs" "$node_dir/webui.mjs"

WORKER_PIDS=()
webui_cleanup() {
    local rc=$?
    for p in "${WORKER_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for p in "${WORKER_PIDS[@]}"; do wait "$p" 2>/dev/null; done
    (exit $rc)
    e2e_cleanup
}
trap webui_cleanup EXIT

out="$E2E_TMP/worker.out"
timeout -s TERM 300 "$STRATA_BIN" worker --listen 127.0.0.1:0 --name stage-1 --threads 1 >"$out" 2>"$E2E_TMP/worker.log" &
WORKER_PIDS+=($!)
worker_port=""
for _ in $(seq 1 100); do
    worker_port=$(sed -n 's/^listening .*:\([0-9]*\)$/\1/p' "$out")
    [ -n "$worker_port" ] && break
    kill -0 "${WORKER_PIDS[0]}" 2>/dev/null || break
    sleep 0.1
done
[ -n "$worker_port" ] || { echo "FAIL: the worker did not start"; cat "$E2E_TMP/worker.log"; exit 1; }

SERVER_TIMEOUT=300 start_server main -m "$DEFAULT_MODEL" --api-key test-key --model-name kjv-8bit --parallel 2 \
    --worker "127.0.0.1:$worker_port"

# the page is open, the API behind it is not
code=$(curl -s -o "$E2E_TMP/page.html" -w '%{http_code}' "$SERVER_URL/")
[ "$code" = 200 ] || { echo "FAIL: GET / without a key -> $code (want 200)"; exit 1; }
grep -q 'data-auth="required"' "$E2E_TMP/page.html" || { echo "FAIL: the page does not say that a key is needed"; exit 1; }
code=$(curl -s -o /dev/null -w '%{http_code}' "$SERVER_URL/index.html")
[ "$code" = 200 ] || { echo "FAIL: GET /index.html -> $code (want 200)"; exit 1; }
code=$(curl -s -o /dev/null -w '%{http_code}' "$SERVER_URL/v1/cluster")
[ "$code" = 401 ] || { echo "FAIL: GET /v1/cluster without a key -> $code (want 401)"; exit 1; }
echo "ok: / and /index.html are open, /v1/cluster needs the key"

artifacts=$(cd "$(dirname "$STRATA_BIN")" && pwd)/test-artifacts
mkdir -p "$artifacts"
rm -f "$artifacts"/webui-*.png
timeout -s TERM 150 node "$node_dir/webui.mjs" "$SERVER_URL" test-key kjv-8bit "$artifacts" "$E2E_TMP/chromium-profile"
rc=$?
[ $rc -eq 124 ] && echo "FAIL: the browser test timed out"
kill -0 "$SERVER_PID" 2>/dev/null || { echo "FAIL: the server died"; rc=1; }
[ $rc -eq 0 ] || { echo "server log (tail):"; tail -n 30 "$SERVER_LOG"; }
exit $rc
