#!/bin/bash
# /metrics after some traffic: Prometheus text format 0.0.4 with request counts by route and status, tokens in
# and out, time to first token and inter-token latency histograms, queue depth, active sequences, errors and the
# engine's busy time; then `promtool check metrics` must accept it (skipped, after the other checks, when
# promtool is absent: Debian package prometheus).
source "$(dirname "$0")/server_env.bash"
start_server main -m "$DEFAULT_MODEL" --parallel 4
H=(-s -H "Content-Type: application/json")
curl "${H[@]}" "$SERVER_URL/v1/chat/completions" -d '{"messages":[{"role":"user","content":"John 3:16"}],"max_tokens":8,"temperature":0}' >/dev/null
curl "${H[@]}" -N "$SERVER_URL/v1/completions" -d '{"prompt":"In the beginning","max_tokens":6,"stream":true,"ignore_eos":true}' >/dev/null
curl "${H[@]}" "$SERVER_URL/v1/completions" -d '{"prompt":"x","temperature":-3}' >/dev/null
curl "${H[@]}" "$SERVER_URL/nope" >/dev/null
curl -s -D "$E2E_TMP/headers" "$SERVER_URL/metrics" >"$E2E_TMP/metrics.txt" || { echo "FAIL: GET /metrics"; exit 1; }
python3 - "$E2E_TMP/metrics.txt" "$E2E_TMP/headers" <<'PY' || exit 1
import re, sys
from server_client import Checker
text, headers = open(sys.argv[1]).read(), open(sys.argv[2]).read()
c = Checker("metrics")
c.check(re.search(r"(?im)^content-type: text/plain; version=0\.0\.4", headers) is not None, "content type: %r" % headers)
def value(pattern):
    m = re.search(r"(?m)^" + pattern + r" ([0-9.e+-]+)$", text)
    return float(m.group(1)) if m else None
def at_least(pattern, v):
    got = value(pattern)
    c.check(got is not None and got >= v, "%s = %s, want >= %s" % (pattern, got, v))
at_least(re.escape('strata_http_requests_total{route="/v1/chat/completions",status="200"}'), 1)
at_least(re.escape('strata_http_requests_total{route="/v1/completions",status="200"}'), 1)
at_least(re.escape('strata_http_requests_total{route="/v1/completions",status="400"}'), 1)
at_least(re.escape('strata_http_requests_total{route="other",status="404"}'), 1)
at_least(re.escape('strata_errors_total{type="invalid_request_error"}'), 1)
at_least(re.escape('strata_errors_total{type="not_found_error"}'), 1)
at_least("strata_prompt_tokens_total", 10)
at_least("strata_generation_tokens_total", 14)
at_least("strata_requests_submitted_total", 2)
at_least(re.escape('strata_request_finished_total{finish_reason="length"}'), 2)
at_least("strata_time_to_first_token_seconds_count", 2)
at_least("strata_inter_token_latency_seconds_count", 10)
at_least("strata_e2e_request_latency_seconds_count", 2)
at_least("strata_engine_busy_seconds_total", 1e-6)
at_least("strata_engine_steps_total", 10)
at_least("strata_kv_slots", 4)
c.check(value("strata_queue_depth") == 0, "queue depth %s" % value("strata_queue_depth"))
c.check(value("strata_active_sequences") == 0, "active sequences %s" % value("strata_active_sequences"))
c.check(value(re.escape('strata_time_to_first_token_seconds_bucket{le="+Inf"}')) ==
        value("strata_time_to_first_token_seconds_count"), "histogram +Inf bucket equals its count")
for fam in re.findall(r"(?m)^# TYPE (\S+) ", text):
    c.check(re.search(r"(?m)^# HELP %s " % re.escape(fam), text) is not None, "HELP for %s" % fam)
c.done()
PY
command -v promtool >/dev/null 2>&1 || skip "promtool is not installed (Debian package prometheus); the other metrics checks passed"
if ! promtool check metrics <"$E2E_TMP/metrics.txt"; then
    echo "FAIL: promtool check metrics rejected /metrics:"
    cat "$E2E_TMP/metrics.txt"
    exit 1
fi
echo "promtool check metrics: ok"
