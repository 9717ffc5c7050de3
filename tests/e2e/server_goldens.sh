#!/bin/bash
# The reference goldens through the API: token-id completions with logprobs 20 and return_tokens_as_token_ids,
# and the chat cases as messages (see server_goldens.py), for the bundled 8-bit model (q8 goldens) and the bf16
# model (bf16 goldens), each on its own server.
source "$(dirname "$0")/server_env.bash"
goldens=$STRATA_FIXTURES/goldens/kjv-qwen3.goldens.json
start_server q8 -m "$DEFAULT_MODEL" --parallel 4
q8_url=$SERVER_URL
start_server bf16 -m "$STRATA_FIXTURES/models/kjv-qwen3-21m" --parallel 4
bf16_url=$SERVER_URL
rc=0
timeout 300 python3 "$E2E_ROOT/tests/e2e/server_goldens.py" "$q8_url" "$goldens" q8 || rc=1
timeout 300 python3 "$E2E_ROOT/tests/e2e/server_goldens.py" "$bf16_url" "$goldens" bf16 || rc=1
exit $rc
