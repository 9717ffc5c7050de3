"""Soak test: N concurrent streaming clients for M minutes against a running server; every request must
succeed; reports requests, errors, latency percentiles and the server's RSS and open file descriptors
before and after (from /proc/PID).

usage: soak.py URL PID CLIENTS MINUTES [--max-rss-growth-mb X]
"""
import json
import os
import random
import statistics
import sys
import threading
import time

from server_client import get, stream

PROMPTS = ["Recite John 3:16.", "Recite Genesis 1:1.", "What does Psalms 23:1 say?", "Quote Romans 8:28.",
           "Recite Exodus 20:3.", "Recite Matthew 5:9."]


def proc_stats(pid):
    rss = 0
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    fds = len(os.listdir("/proc/%d/fd" % pid))
    return rss, fds


def client(url, model, deadline, rnd, out, lock):
    while time.time() < deadline:
        chat = rnd.random() < 0.5
        body = {"model": model, "max_tokens": rnd.randint(4, 48), "temperature": rnd.choice([0, 0.7]),
                "stream": True, "seed": rnd.randint(0, 1 << 30)}
        if chat:
            body["messages"] = [{"role": "user", "content": rnd.choice(PROMPTS)}]
            body["chat_template_kwargs"] = {"enable_thinking": False}
            path = "/v1/chat/completions"
        else:
            body["prompt"] = rnd.choice(PROMPTS)
            path = "/v1/completions"
        t0 = time.time()
        try:
            st, events, done = stream(url, path, body, timeout=120)
            ok = st == 200 and done and not any(isinstance(e, dict) and "error" in e for e in events)
            err = None if ok else "status %s done %s %s" % (st, done, [e for e in events if isinstance(e, dict) and "error" in e][:1])
        except Exception as e:  # noqa: BLE001 - a soak test counts every failure
            ok, err = False, repr(e)
        with lock:
            out.append((ok, time.time() - t0, err))


def main():
    url, pid, n, minutes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    max_growth = float(sys.argv[sys.argv.index("--max-rss-growth-mb") + 1]) if "--max-rss-growth-mb" in sys.argv else 64
    model = get(url, "/v1/models")[1]["data"][0]["id"]
    # warm up, then take the baseline
    stream(url, "/v1/completions", {"model": model, "prompt": "In the beginning", "max_tokens": 8, "stream": True})
    rss0, fd0 = proc_stats(pid)
    out, lock = [], threading.Lock()
    deadline = time.time() + minutes * 60
    th = [threading.Thread(target=client, args=(url, model, deadline, random.Random(i), out, lock)) for i in range(n)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    time.sleep(1)
    rss1, fd1 = proc_stats(pid)
    lat = sorted(x[1] for x in out)
    errors = [x[2] for x in out if not x[0]]
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else 0
    r = {"clients": n, "minutes": minutes, "requests": len(out), "errors": len(errors),
         "p50_s": round(q(0.50), 3), "p99_s": round(q(0.99), 3), "mean_s": round(statistics.mean(lat), 3) if lat else 0,
         "rss_before_mb": round(rss0 / 1e6, 1), "rss_after_mb": round(rss1 / 1e6, 1), "fds_before": fd0,
         "fds_after": fd1}
    print(json.dumps(r))
    if errors:
        print("FAIL: %d failed requests, first: %s" % (len(errors), errors[0]))
        sys.exit(1)
    if fd1 > fd0 + 2:
        print("FAIL: file descriptors grew from %d to %d" % (fd0, fd1))
        sys.exit(1)
    if (rss1 - rss0) / 1e6 > max_growth:
        print("FAIL: RSS grew by %.1f MB" % ((rss1 - rss0) / 1e6))
        sys.exit(1)
    print("ok: soak passed")


if __name__ == "__main__":
    main()
