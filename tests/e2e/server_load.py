"""Concurrency and throughput against a running `strata serve`.

usage: server_load.py BASE correctness [N]        N streaming requests at once (default 32), temperature 0: each
                                                  must return exactly what it returns alone (text, finish
                                                  reason, token count); then /health and /metrics still answer.
       server_load.py BASE throughput [--check R] tokens/s of 1 stream vs 8 concurrent streams (ignore_eos,
                                                  fixed length); prints both and the ratio; with --check, fails
                                                  when the ratio is below R (for manual runs: timing is not
                                                  asserted in CI).
"""
import sys
import threading
import time

from server_client import Checker, chat_text, completion_text, get, stream

BOOKS = ["Genesis", "Exodus", "Psalms", "Proverbs", "Isaiah", "Matthew", "John", "Romans"]
OPENINGS = ["In the beginning", "And the LORD said", "Blessed is the man", "Now the serpent was",
            "And it came to pass", "For God so loved", "The heavens declare", "Hear, O Israel"]


def requests(n):
    out = []
    for i in range(n):
        if i % 2 == 0:
            msg = "Recite %s %d:%d." % (BOOKS[i % len(BOOKS)], 1 + i % 7, 1 + (i * 5) % 11)
            body = {"messages": [{"role": "user", "content": msg}], "max_tokens": 16, "temperature": 0,
                    "chat_template_kwargs": {"enable_thinking": i % 4 == 0}, "stream": True,
                    "stream_options": {"include_usage": True}}
            out.append(("/v1/chat/completions", body))
        else:
            body = {"prompt": "%s %d" % (OPENINGS[i % len(OPENINGS)], i), "max_tokens": 16, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            out.append(("/v1/completions", body))
    return out


def run_one(base, path, body):
    status, events, done = stream(base, path, body, timeout=300)
    if status != 200:
        return {"status": status, "error": events}
    if path == "/v1/chat/completions":
        reasoning, content, finish, usage, _ = chat_text(events)
        text = (reasoning, content)
    else:
        text, finish, usage = completion_text(events)
    return {"status": status, "text": text, "finish": finish, "usage": usage, "done": done}


def correctness(base, n):
    c = Checker("concurrency")
    reqs = requests(n)
    t0 = time.time()
    alone = [run_one(base, p, b) for p, b in reqs]
    t_alone = time.time() - t0
    for i, a in enumerate(alone):
        c.check(a["status"] == 200 and a["done"], "request %d alone: %s" % (i, a))
    results = [None] * n
    barrier = threading.Barrier(n)

    def worker(i):
        barrier.wait()
        try:
            results[i] = run_one(base, *reqs[i])
        except Exception as e:  # noqa: BLE001 (reported as a failure below)
            results[i] = {"status": -1, "error": repr(e)}

    t0 = time.time()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    t_together = time.time() - t0
    for i in range(n):
        r, a = results[i], alone[i]
        if not c.check(r is not None and r["status"] == 200, "request %d under load: %s" % (i, r)):
            continue
        c.check(r["done"], "request %d: stream ended without [DONE]" % i)
        c.check(r["text"] == a["text"], "request %d: text differs under load:\n    alone:    %r\n    together: %r"
                % (i, a["text"], r["text"]))
        c.check(r["finish"] == a["finish"], "request %d: finish %s vs %s alone" % (i, r["finish"], a["finish"]))
        c.check(r["usage"] == a["usage"], "request %d: usage %s vs %s alone" % (i, r["usage"], a["usage"]))
        c.check(r["usage"] and r["usage"]["completion_tokens"] > 0, "request %d: no tokens" % i)
    n_tok = sum(a["usage"]["completion_tokens"] for a in alone if a.get("usage"))
    print("%d requests, %d tokens: one at a time %.2fs, all at once %.2fs" % (n, n_tok, t_alone, t_together))
    status, body, _ = get(base, "/health")
    c.check(status == 200 and body.get("status") == "ok", "/health after the load: %s %s" % (status, body))
    status, text, _ = get(base, "/metrics")
    c.check(status == 200 and "strata_active_sequences 0" in text and "strata_queue_depth 0" in text,
            "/metrics after the load: no sequence may be left active or queued")
    c.done()


def throughput(base, check, n_tok=64):
    body = {"prompt": "And God said, Let there be light", "max_tokens": n_tok, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    run_one(base, "/v1/completions", dict(body, max_tokens=8))  # warm up

    def measure(k):
        res = [None] * k
        barrier = threading.Barrier(k)

        def worker(i):
            barrier.wait()
            res[i] = run_one(base, "/v1/completions", body)

        t0 = time.time()
        ts = [threading.Thread(target=worker, args=(i,)) for i in range(k)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(600)
        dt = time.time() - t0
        toks = sum(r["usage"]["completion_tokens"] for r in res if r and r.get("usage"))
        return toks, dt

    t1, d1 = measure(1)
    t8, d8 = measure(8)
    tps1, tps8 = t1 / d1, t8 / d8
    ratio = tps8 / tps1
    print("throughput: 1 stream %d tokens in %.2fs = %.1f tok/s; 8 streams %d tokens in %.2fs = %.1f tok/s; "
          "ratio %.2fx" % (t1, d1, tps1, t8, d8, tps8, ratio))
    c = Checker("throughput")
    c.check(t1 == n_tok and t8 == 8 * n_tok, "every stream must produce its %d tokens (got %d and %d)" % (n_tok, t1, t8))
    if check is not None:
        c.check(ratio >= check, "8-stream aggregate is %.2fx one stream's, want at least %.1fx" % (ratio, check))
    c.done()


if __name__ == "__main__":
    base, mode = sys.argv[1], sys.argv[2]
    if mode == "correctness":
        correctness(base, int(sys.argv[3]) if len(sys.argv) > 3 else 32)
    elif mode == "throughput":
        chk = float(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--check" else None
        throughput(base, chk)
    else:
        sys.exit("unknown mode %s" % mode)
