#!/bin/bash
# The command line on the fixtures: run --json against the goldens (ids and top logprobs), text prompts and the
# bundled default model, tokenize/template/verify/convert, and clear errors for a truncated model file.
set -u
cd "$(dirname "$0")/../.."
BIN=${STRATA_BIN:-build/strata}
FX=${STRATA_FIXTURES:-build/fixtures}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

# 1. scriptable generation reproduces the goldens (bf16, q8, q4, stories)
for spec in "kjv-qwen3-21m bf16" "kjv-qwen3-21m-8bit q8" "kjv-qwen3-21m-4bit q4" "stories260K -"; do
    set -- $spec
    model=$FX/models/$1 key=$2
    gold=$FX/goldens/kjv-qwen3.goldens.json
    [ "$key" = "-" ] && gold=$FX/goldens/stories260K.goldens.json
    python3 - "$BIN" "$model" "$gold" "$key" <<'PY' || exit 1
import json, subprocess, sys
bin_, model, gold, key = sys.argv[1:]
g = json.load(open(gold))["cases"]
cases = g if key == "-" else g[key]
for i, c in enumerate(cases[:3]):
    n = len(c["greedy_ids"])
    out = subprocess.run([bin_, "run", "-m", model, "--prompt-ids", ",".join(map(str, c["prompt_ids"])), "-n", str(n),
                          "--temp", "0", "--top-logprobs", "20", "--json"], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        sys.exit("FAIL: run exited %d: %s" % (out.returncode, out.stderr))
    r = json.loads(out.stdout)
    if sorted(r) != ["ids", "prompt_ids", "top_logprobs"]:
        sys.exit("FAIL: keys %s" % sorted(r))
    if r["prompt_ids"] != c["prompt_ids"]:
        sys.exit("FAIL: prompt_ids echoed wrong")
    lse = c["logsumexp"]
    ours = {e["id"]: e["logprob"] for e in r["top_logprobs"][0]}
    for tid, tl in zip(c["top20_ids"], c["top20_logits"]):
        if tid not in ours or abs(ours[tid] - (tl - lse)) > 1e-3:
            sys.exit("FAIL: %s case %d: top logprob of %d: %s vs %.6f" % (model, i, tid, ours.get(tid), tl - lse))
    for k, (a, b) in enumerate(zip(r["ids"], c["greedy_ids"])):
        if a != b:
            if c["greedy_margins"][k] >= 0.02:
                sys.exit("FAIL: %s case %d step %d: %d vs %d" % (model, i, k, a, b))
            break
    if len(r["top_logprobs"]) != len(r["ids"]):
        sys.exit("FAIL: %d top_logprobs rows for %d ids" % (len(r["top_logprobs"]), len(r["ids"])))
print("ok: %s reproduces %d golden cases through strata run --json" % (model.split("/")[-1], min(3, len(cases))))
PY
done

# 2. text prompt with the bundled default model (no -m), greedy: the golden text
out=$($BIN run -p "In the beginning God created" -n 40 --temp 0 2>"$tmp/err") || fail "run -p: $(cat $tmp/err)"
want=$(python3 -c "import json;print(json.load(open('$FX/goldens/kjv-qwen3.goldens.json'))['cases']['q8'][0]['greedy_text'].split('<|im_end|>')[0])")
[ "$(echo "$out" | head -c 20)" = "$(echo "$want" | head -c 20)" ] || fail "bundled model text: '$out' vs '$want'"
echo "ok: strata run -p with the bundled model: '$out'"

# 3. tokenize / template / verify
ids=$($BIN tokenize -m "$FX/models/kjv-qwen3-21m-8bit" --text "In the beginning God created") || fail tokenize
[ "$ids" = '{"ids":[641,279,7167,4264,3465]}' ] || fail "tokenize: $ids"
echo '[{"role":"user","content":"John 3:16"}]' > "$tmp/m.json"
t=$($BIN template -m "$FX/models/kjv-qwen3-21m-8bit" --messages "$tmp/m.json" --no-think) || fail template
[ "$t" = "$(printf '<|im_start|>user\nJohn 3:16<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n')" ] || fail "template: $t"
$BIN verify -m "$FX/models/stories260K" > "$tmp/v.json" || fail verify
python3 -c "import json,sys; d=json.load(open('$tmp/v.json')); sys.exit(0 if d['n_tensors']==len(d['tensors'])>0 and len(d['config'])==32 else 1)" || fail "verify output"
echo "ok: tokenize, template and verify"

# 4. a truncated model file: an error naming the file, no crash
mkdir -p "$tmp/bad"
cp "$FX/models/stories260K/config.json" "$tmp/bad/"
head -c 500000 "$FX/models/stories260K/model.safetensors" > "$tmp/bad/model.safetensors"
$BIN run -m "$tmp/bad" --prompt-ids 1,2 -n 2 2>"$tmp/err" && fail "truncated model accepted"
st=$?
[ $st -eq 1 ] || fail "truncated model: exit $st (a crash?)"
grep -q "model.safetensors" "$tmp/err" && grep -qi "truncated\|exceeds\|outside" "$tmp/err" || fail "message: $(cat $tmp/err)"
echo "ok: truncated model refused: $(cat $tmp/err)"
echo PASS
