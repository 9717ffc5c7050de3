"""The reference goldens through the HTTP API.

usage: server_goldens.py BASE GOLDENS_JSON KEY

For every case of goldens["cases"][KEY]:
- /v1/completions with the golden prompt ids, temperature 0, logprobs 20, return_tokens_as_token_ids: the greedy
  ids must equal the goldens' (a difference is allowed only at a step whose golden margin is below 0.02, and ends
  the comparison; a golden that ends in EOS ends with finish_reason "stop" one token earlier, since the EOS is
  not part of the completion); the top-20 logprobs of the first step must match the goldens within 1e-3, and the
  top-1/top-2 gap of every compared step must match the golden margin.
- chat cases also through /v1/chat/completions (messages + chat_template_kwargs.enable_thinking): the prompt
  token count, the greedy ids (from logprobs), and the text: "<think>" + reasoning_content + "</think>" + content
  (or content) must equal greedy_text, up to a near-tie step.
"""
import json
import sys

from server_client import Checker, post

TOL = 1e-3
MARGIN_MIN = 0.02
EOS_IDS = {151643, 151645}


def tok_id(s):
    if not s.startswith("token_id:"):
        raise ValueError("not a token_id string: %r" % s)
    return int(s[len("token_id:"):])


def compare_ids(c, what, got, case, finish):
    """Returns the number of leading steps that were compared (up to a near-tie difference)."""
    want, margins = case["greedy_ids"], case["greedy_margins"]
    for i, g in enumerate(got):
        if i >= len(want):
            c.check(False, "%s: more tokens than the goldens (%d > %d)" % (what, len(got), len(want)))
            return i
        if g != want[i]:
            c.check(margins[i] < MARGIN_MIN,
                    "%s: step %d: got %d, want %d (margin %.4f)" % (what, i, g, want[i], margins[i]))
            return i
    if want[-1] in EOS_IDS:
        # the completion ends at the EOS, which is either left out (as now) or reported as the last token
        ok = len(got) in (len(want) - 1, len(want)) and finish == "stop"
        c.check(ok, "%s: %d tokens, finish %s; goldens have %d ending in EOS %d" % (what, len(got), finish, len(want),
                                                                                     want[-1]))
    else:
        c.check(len(got) == len(want) and finish == "length",
                "%s: %d tokens, finish %s; goldens have %d and no EOS" % (what, len(got), finish, len(want)))
    return len(got)


def check_completion(c, base, key, i, case):
    what = "%s case %d completions" % (key, i)
    body = {"prompt": case["prompt_ids"], "max_tokens": len(case["greedy_ids"]), "temperature": 0, "logprobs": 20,
            "return_tokens_as_token_ids": True}
    status, r, _ = post(base, "/v1/completions", body)
    if not c.check(status == 200, "%s: status %s %s" % (what, status, r)):
        return
    ch = r["choices"][0]
    lp = ch["logprobs"]
    got = [tok_id(t) for t in lp["tokens"]]
    c.check(r["usage"]["prompt_tokens"] == len(case["prompt_ids"]), "%s: prompt_tokens %s" % (what, r["usage"]))
    c.check(r["usage"]["completion_tokens"] == len(got), "%s: completion_tokens %s vs %d" % (what, r["usage"], len(got)))
    n = compare_ids(c, what, got, case, ch["finish_reason"])
    # first step: the full top-20 against the goldens
    top = {tok_id(k): v for k, v in lp["top_logprobs"][0].items()}
    lse = case["logsumexp"]
    ours_sorted = sorted(top.values(), reverse=True)
    floor = ours_sorted[min(19, len(ours_sorted) - 1)]
    worst = 0.0
    for gid, logit in zip(case["top20_ids"], case["top20_logits"]):
        want = logit - lse
        if gid in top:
            worst = max(worst, abs(top[gid] - want))
        else:  # only a near-tie at the cut of the top 20 may be missing
            c.check(want <= floor + TOL, "%s: golden top-20 id %d (logprob %.5f) missing" % (what, gid, want))
    c.check(worst <= TOL, "%s: top-20 logprobs differ by %.2e (tolerance %g)" % (what, worst, TOL))
    c.check(abs(lp["token_logprobs"][0] - ours_sorted[0]) <= 1e-6 or got[0] != case["greedy_ids"][0],
            "%s: the sampled token's logprob is not the top one" % what)
    # every compared step: the gap between the two best matches the golden margin
    for s in range(min(n, len(lp["top_logprobs"]))):
        vals = sorted(lp["top_logprobs"][s].values(), reverse=True)
        if len(vals) >= 2:
            gap = vals[0] - vals[1]
            c.check(abs(gap - case["greedy_margins"][s]) <= 2 * TOL,
                    "%s: step %d margin %.5f, goldens %.5f" % (what, s, gap, case["greedy_margins"][s]))


def check_chat(c, base, key, i, case):
    what = "%s case %d chat" % (key, i)
    body = {"messages": case["messages"], "max_tokens": len(case["greedy_ids"]), "temperature": 0,
            "chat_template_kwargs": {"enable_thinking": case["enable_thinking"]}, "logprobs": True,
            "top_logprobs": 2, "return_tokens_as_token_ids": True}
    status, r, _ = post(base, "/v1/chat/completions", body)
    if not c.check(status == 200, "%s: status %s %s" % (what, status, r)):
        return
    ch = r["choices"][0]
    msg = ch["message"]
    got = [tok_id(t["token"]) for t in ch["logprobs"]["content"]]
    c.check(r["usage"]["prompt_tokens"] == len(case["prompt_ids"]),
            "%s: prompt_tokens %d, goldens %d (chat template or tokenizer differ)" % (
                what, r["usage"]["prompt_tokens"], len(case["prompt_ids"])))
    n = compare_ids(c, what, got, case, ch["finish_reason"])
    if msg.get("reasoning_content") is not None:
        text = "<think>" + msg["reasoning_content"] + "</think>" + (msg["content"] or "")
    else:
        text = msg["content"] or ""
    want = case["greedy_text"]
    if want.endswith("<|im_end|>"):
        want = want[:-len("<|im_end|>")]
    if n == len(got) and n >= len(case["greedy_ids"]) - 1:  # no near-tie difference: the whole text
        c.check(text == want, "%s: text\n      got  %r\n      want %r" % (what, text, want))
    else:  # diverged at a near-tie: the text must agree up to there
        status, d, _ = post(base, "/detokenize", {"tokens": case["greedy_ids"][:n]})
        c.check(status == 200 and text.startswith(d["prompt"]) and want.startswith(d["prompt"]),
                "%s: text before the near-tie at step %d differs: %r vs %r" % (what, n, text, d))
    c.check(case["enable_thinking"] == (msg.get("reasoning_content") is not None) or not case["enable_thinking"],
            "%s: enable_thinking=%s but reasoning_content is %r" % (what, case["enable_thinking"],
                                                                   msg.get("reasoning_content")))


def main():
    base, path, key = sys.argv[1], sys.argv[2], sys.argv[3]
    goldens = json.load(open(path))
    cases = goldens["cases"][key]
    c = Checker("goldens " + key)
    n_chat = 0
    for i, case in enumerate(cases):
        check_completion(c, base, key, i, case)
        if case["kind"] == "chat":
            check_chat(c, base, key, i, case)
            n_chat += 1
    c.check(len(cases) >= 5 and n_chat >= 3, "too few golden cases (%d, %d chat)" % (len(cases), n_chat))
    c.done()


if __name__ == "__main__":
    main()
