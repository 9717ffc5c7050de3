"""Features of the API beyond the happy path of the openai client: /tokenize and /detokenize (vLLM shapes) against
the goldens' prompt ids, /v1/models, seeds, logit_bias, stop strings and stop_token_ids, logprobs shapes,
include_usage, reasoning_content in streaming and not, request ids and timestamps.

usage: server_api.py BASE GOLDENS_JSON MODEL_NAME N_CTX
"""
import json
import sys
import time

from server_client import Checker, chat_text, completion_text, get, post, stream

base, goldens_path, model, n_ctx = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cases = json.load(open(goldens_path))["cases"]["q8"]
c = Checker("api")
CHAT, COMP = "/v1/chat/completions", "/v1/completions"

# models
status, body, _ = get(base, "/v1/models")
c.check(status == 200 and body["object"] == "list" and body["data"][0]["id"] == model
        and body["data"][0]["max_model_len"] == n_ctx, "/v1/models: %s" % body)
status, body, _ = get(base, "/v1/models/" + model)
c.check(status == 200 and body["id"] == model and body["object"] == "model", "/v1/models/ID: %s" % body)

# tokenize / detokenize: the goldens' prompts, text and chat
for case in cases:
    if case["kind"] == "text":
        req = {"prompt": case["prompt"], "add_special_tokens": False}
    else:
        req = {"messages": case["messages"], "chat_template_kwargs": {"enable_thinking": case["enable_thinking"]}}
    status, body, _ = post(base, "/tokenize", req)
    c.check(status == 200 and body["tokens"] == case["prompt_ids"] and body["count"] == len(case["prompt_ids"])
            and body["max_model_len"] == n_ctx, "/tokenize %r: %s" % (req, body))
    status, body, _ = post(base, "/detokenize", {"tokens": case["prompt_ids"]})
    c.check(status == 200 and body["prompt"] == case["prompt"], "/detokenize: %s" % body)

# ids and timestamps
status, r, _ = post(base, CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
c.check(status == 200 and r["id"].startswith("chatcmpl-") and len(r["id"]) > 20 and abs(r["created"] - time.time()) < 60
        and r["model"] == model, "chat envelope: %s" % r)
status, r2, _ = post(base, CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
c.check(status == 200 and r2["id"] != r["id"], "ids are unique")

# seeds: the same seed gives the same sample, different seeds (almost surely) differ
body = {"prompt": "And the LORD said", "max_tokens": 24, "temperature": 1.0, "seed": 1234, "ignore_eos": True}
t1 = post(base, COMP, body)[1]["choices"][0]["text"]
t2 = post(base, COMP, body)[1]["choices"][0]["text"]
t3 = post(base, COMP, dict(body, seed=99))[1]["choices"][0]["text"]
c.check(t1 == t2, "same seed, same text: %r vs %r" % (t1, t2))
c.check(t1 != t3, "different seeds gave the same 24 tokens: %r" % t1)

# logit_bias: +100 on one token makes it the only choice
status, body, _ = post(base, "/tokenize", {"prompt": " Amen", "add_special_tokens": False})
amen = body["tokens"]
c.check(len(amen) == 1, "' Amen' is one token: %s" % amen)
status, r, _ = post(base, COMP, {"prompt": "In the beginning", "max_tokens": 3, "temperature": 0, "ignore_eos": True,
                                 "logit_bias": {str(amen[0]): 100}})
c.check(status == 200 and r["choices"][0]["text"] == " Amen Amen Amen", "logit_bias: %s" % r)

# stop strings hold back and cut; stop_token_ids end without their text
g = next(x for x in cases if x["kind"] == "text" and len(x["greedy_ids"]) >= 30)
full = post(base, COMP, {"prompt": g["prompt"], "max_tokens": 30, "temperature": 0})[1]["choices"][0]["text"]
stop = full[10:14]
r = post(base, COMP, {"prompt": g["prompt"], "max_tokens": 30, "temperature": 0, "stop": ["zzz", stop]})[1]
c.check(r["choices"][0]["text"] == full[:full.index(stop)] and r["choices"][0]["finish_reason"] == "stop"
        and r["choices"][0]["stop_reason"] == stop, "stop %r: %s (full %r)" % (stop, r["choices"][0], full))
status, ev, done = stream(base, COMP, {"prompt": g["prompt"], "max_tokens": 30, "temperature": 0, "stop": [stop],
                                       "stream": True})
text, finish, _ = completion_text(ev)
c.check(done and text == full[:full.index(stop)] and finish == "stop", "streamed stop: %r %s" % (text, finish))
r = post(base, COMP, {"prompt": g["prompt_ids"], "max_tokens": 30, "temperature": 0,
                      "stop_token_ids": [g["greedy_ids"][3]]})[1]
ch = r["choices"][0]
c.check(ch["finish_reason"] == "stop" and ch["stop_reason"] == g["greedy_ids"][3]
        and r["usage"]["completion_tokens"] == 4, "stop_token_ids: %s %s" % (ch, r["usage"]))
status, body, _ = post(base, "/detokenize", {"tokens": g["greedy_ids"][:3]})
c.check(ch["text"] == body["prompt"], "stop token text is not emitted: %r vs %r" % (ch["text"], body["prompt"]))

# logprobs shapes: chat (OpenAI) and completions (legacy), decoded token strings
no_think_case = next(x for x in cases if x["kind"] == "chat" and not x["enable_thinking"])
r = post(base, CHAT, {"messages": no_think_case["messages"], "max_tokens": 5, "temperature": 0, "logprobs": True,
                      "top_logprobs": 3, "chat_template_kwargs": {"enable_thinking": False}})[1]
lc = r["choices"][0]["logprobs"]["content"]
c.check(len(lc) == 5 and all(len(t["top_logprobs"]) == 3 for t in lc)
        and all(bytes(t["bytes"]).decode() == t["token"] for t in lc)
        and "".join(t["token"] for t in lc) == r["choices"][0]["message"]["content"],
        "chat logprobs: %s" % json.dumps(lc)[:300])
c.check(all(t["logprob"] == t["top_logprobs"][0]["logprob"] for t in lc), "greedy token is the top logprob")
r = post(base, COMP, {"prompt": "In the beginning", "max_tokens": 4, "temperature": 0, "logprobs": 0})[1]
lp = r["choices"][0]["logprobs"]
c.check(len(lp["tokens"]) == 4 and all(len(d) == 1 for d in lp["top_logprobs"])
        and lp["text_offset"][0] == 0 and lp["text_offset"][1] == len(lp["tokens"][0]),
        "completion logprobs=0: %s" % lp)

# reasoning: a Qwen3 think block goes to reasoning_content, streamed and not, the same text
thinking = next(x for x in cases if x["kind"] == "chat" and x["enable_thinking"])
req = {"messages": thinking["messages"], "max_tokens": 12, "temperature": 0}
msg = post(base, CHAT, req)[1]["choices"][0]["message"]
status, ev, done = stream(base, CHAT, dict(req, stream=True))
reasoning, content, finish, usage, _ = chat_text(ev)
c.check(msg.get("reasoning_content") is not None and msg["reasoning_content"] == reasoning and msg["content"] == content,
        "reasoning streamed %r/%r vs %r/%r" % (reasoning, content, msg.get("reasoning_content"), msg["content"]))
c.check("<think>" not in content and "</think>" not in content, "think tags leaked into content: %r" % content)
no_think = next(x for x in cases if x["kind"] == "chat" and not x["enable_thinking"])
msg = post(base, CHAT, {"messages": no_think["messages"], "max_tokens": 5, "temperature": 0,
                        "chat_template_kwargs": {"enable_thinking": False}})[1]["choices"][0]["message"]
c.check("reasoning_content" not in msg, "no think block, no reasoning_content: %s" % msg)

# include_usage: every chunk has "usage": null, the last one has empty choices and the counts
status, ev, done = stream(base, COMP, {"prompt": "In the beginning", "max_tokens": 5, "ignore_eos": True,
                                       "stream": True, "stream_options": {"include_usage": True}})
c.check(done and all("usage" in e for e in ev) and all(e["usage"] is None for e in ev[:-1])
        and ev[-1]["choices"] == [] and ev[-1]["usage"]["completion_tokens"] == 5, "include_usage: %s" % ev[-2:])
status, ev, done = stream(base, COMP, {"prompt": "In the beginning", "max_tokens": 3, "stream": True})
c.check(done and all("usage" not in e for e in ev), "no usage without include_usage")

# a prompt that fills the context leaves room for nothing: 400; max_tokens unset uses the rest of the context
status, body, _ = post(base, COMP, {"prompt": [1] * n_ctx, "max_tokens": 1})
c.check(status == 400 and body["error"]["code"] == "context_length_exceeded", "full context: %s %s" % (status, body))
status, body, _ = post(base, CHAT, {"messages": [{"role": "user", "content": "x"}], "ignore_eos": True,
                                    "temperature": 0}, timeout=300)
c.check(status == 200 and body["choices"][0]["finish_reason"] == "length"
        and body["usage"]["total_tokens"] == n_ctx, "max_tokens unset: %s" % body.get("usage"))
c.done()
