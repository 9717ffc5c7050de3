#!/bin/bash
# The official `openai` npm client (pinned in tests/e2e/package.json, installed into build/node on first use)
# drives chat and completions, streaming and not, against `strata serve` on the bundled 8-bit model, with an API
# key. Skips (77) when node/npm are missing or the package cannot be installed (offline).
source "$(dirname "$0")/server_env.bash"
command -v node >/dev/null 2>&1 || skip "node is not installed (needed for the openai npm client test)"
command -v npm >/dev/null 2>&1 || skip "npm is not installed (needed for the openai npm client test)"
node_dir=${STRATA_NODE_DIR:-$E2E_ROOT/build/node}
mkdir -p "$node_dir"
want=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["dependencies"]["openai"])' "$E2E_ROOT/tests/e2e/package.json")
have=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' "$node_dir/node_modules/openai/package.json" 2>/dev/null || true)
if [ "$have" != "$want" ]; then
    cp "$E2E_ROOT/tests/e2e/package.json" "$node_dir/package.json"
    echo "installing openai@$want into $node_dir"
    timeout 180 npm install --prefix "$node_dir" --no-audit --no-fund --loglevel=error >"$E2E_TMP/npm.log" 2>&1 ||
        { cat "$E2E_TMP/npm.log"; skip "cannot install the openai npm package (offline?)"; }
fi
cp "$E2E_ROOT/tests/e2e/openai_client.mjs" "$node_dir/openai_client.mjs"
start_server main -m "$DEFAULT_MODEL" --api-key test-key --model-name kjv-8bit --parallel 4
timeout 300 node "$node_dir/openai_client.mjs" "$SERVER_URL" kjv-8bit "$STRATA_FIXTURES/goldens/kjv-qwen3.goldens.json"
rc=$?
kill -0 "$SERVER_PID" 2>/dev/null || { echo "FAIL: the server died"; tail -n 20 "$SERVER_LOG"; exit 1; }
[ $rc -eq 0 ] || { echo "server log (tail):"; tail -n 30 "$SERVER_LOG"; }
exit $rc
