"""Per-token network overhead of the pipeline and concurrent throughput (standard library only).

usage: cluster_bench.py SINGLE_URL CLUSTER_URL [TOKENS]
Prints, for one stream: decode ms/token on one node and through the pipeline (the difference is the
per-token overhead of the stages' links and hand-offs); then aggregate tokens/s of 8 concurrent streams on
each. Decode time is measured between the first and the last streamed token, so prefill is excluded.
"""
import statistics
import sys
import threading
import time

from server_client import get, stream


def model_of(url):
    s, m, _ = get(url, "/v1/models")
    return m["data"][0]["id"]


def decode_run(url, n_tokens, prompt_id):
    body = {"model": model_of(url), "prompt": [151644, 872, 198, 1000 + prompt_id], "max_tokens": n_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    times = []

    def on_event(ev, resp):
        if isinstance(ev, dict) and ev.get("choices"):
            times.append(time.perf_counter())
        return False

    status, events, done = stream(url, "/v1/completions", body, timeout=600, on_event=on_event)
    if status != 200 or len(times) < 2:
        raise SystemExit("stream failed: %s" % status)
    return (times[-1] - times[0]) / (len(times) - 1), len(times)


def single_stream(url, n_tokens, reps=3):
    per_tok = [decode_run(url, n_tokens, r)[0] for r in range(reps)]
    return statistics.median(per_tok)


def concurrent(url, n_streams, n_tokens):
    results = [None] * n_streams

    def worker(i):
        results[i] = decode_run(url, n_tokens, i)

    t0 = time.perf_counter()
    th = [threading.Thread(target=worker, args=(i,)) for i in range(n_streams)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    dt = time.perf_counter() - t0
    total = sum(r[1] for r in results)
    return total / dt


def main():
    single, cluster = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    s1, c1 = single_stream(single, n), single_stream(cluster, n)
    print("one stream, decode: one node %.3f ms/token (%.1f tok/s); pipeline %.3f ms/token (%.1f tok/s); "
          "overhead %.3f ms/token" % (s1 * 1e3, 1 / s1, c1 * 1e3, 1 / c1, (c1 - s1) * 1e3))
    s8, c8 = concurrent(single, 8, n), concurrent(cluster, 8, n)
    print("8 concurrent streams: one node %.1f tok/s (%.2fx one stream); pipeline %.1f tok/s (%.2fx one stream)"
          % (s8, s8 * s1, c8, c8 * c1))


if __name__ == "__main__":
    main()
