#!/bin/bash
# API features: /tokenize and /detokenize on the goldens' prompts, /v1/models, seeds, logit_bias, stop strings and
# stop_token_ids (streamed and not), logprobs shapes, include_usage, reasoning_content, the context budget.
source "$(dirname "$0")/server_env.bash"
start_server main -m "$DEFAULT_MODEL" --model-name kjv --ctx 256 --parallel 4
timeout 300 python3 "$E2E_ROOT/tests/e2e/server_api.py" "$SERVER_URL" "$STRATA_FIXTURES/goldens/kjv-qwen3.goldens.json" kjv 256
