"""Checks for the cluster end-to-end tests (standard library only).

    compare SINGLE_URL CLUSTER_URL GOLDENS KEY   the golden prompts give identical tokens and logprobs
    status URL N_STAGES N_LAYERS                 /v1/cluster lists N verified stages tiling the layers
    stream_until_error URL                       a long stream that must end with an error event (a stage dies)
    wait_health URL CODE SECONDS                 polls /health until it answers CODE
    generate URL                                 one short completion must succeed
"""
import json
import os
import signal
import sys
import threading
import time

from server_client import get, post, stream


def model_of(url):
    s, m, _ = get(url, "/v1/models")
    return m["data"][0]["id"] if s == 200 else "unknown"


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


def compare(single, cluster, goldens, key):
    cases = json.load(open(goldens))["cases"][key]
    n = 0
    for i, c in enumerate(cases):
        body = {"model": model_of(single), "prompt": c["prompt_ids"], "max_tokens": len(c["greedy_ids"]), "temperature": 0,
                "logprobs": 5, "return_tokens_as_token_ids": True, "ignore_eos": True}
        sa, a, _ = post(single, "/v1/completions", body)
        sb, b, _ = post(cluster, "/v1/completions", body)
        if sa != 200 or sb != 200:
            fail("case %d: status %d / %d: %s %s" % (i, sa, sb, a, b))
        la, lb = a["choices"][0]["logprobs"], b["choices"][0]["logprobs"]
        if la["tokens"] != lb["tokens"]:
            fail("case %d: tokens differ\n single  %s\n cluster %s" % (i, la["tokens"], lb["tokens"]))
        if la["token_logprobs"] != lb["token_logprobs"] or la["top_logprobs"] != lb["top_logprobs"]:
            fail("case %d: logprobs differ" % i)
        if a["choices"][0]["text"] != b["choices"][0]["text"]:
            fail("case %d: text differs" % i)
        n += len(la["tokens"])
    print("ok: %d cases, %d tokens identical (ids and logprobs) between one node and the pipeline" % (len(cases), n))


def status(url, n_stages, n_layers):
    n_stages, n_layers = int(n_stages), int(n_layers)
    s, st, _ = get(url, "/v1/cluster")
    if s != 200:
        fail("/v1/cluster: %d %s" % (s, st))
    nodes = st["nodes"]
    if len(nodes) != n_stages:
        fail("%d stages listed, want %d: %s" % (len(nodes), n_stages, nodes))
    at = 0
    for nd in nodes:
        if not nd["verified"] or not nd["connected"]:
            fail("stage not verified/connected: %s" % nd)
        if nd["layers"][0] != at:
            fail("layers do not tile: %s" % [x["layers"] for x in nodes])
        at = nd["layers"][1] + 1
    if at != n_layers:
        fail("layers end at %d, model has %d" % (at, n_layers))
    if not st["healthy"]:
        fail("cluster not healthy: %s" % st["reason"])
    print("ok: %d verified stages: %s" % (n_stages, ", ".join("%s %d-%d" % (x["name"], x["layers"][0], x["layers"][1]) for x in nodes)))


def stream_until_error(url, pid):
    """Streams a long completion; after 20 events, SIGKILLs process pid (a stage) and times the error."""
    body = {"model": model_of(url), "prompt": [151644, 872, 198], "max_tokens": 1800, "temperature": 0,
            "ignore_eos": True, "stream": True}
    seen = [0]
    t_kill = [None]

    def on_event(ev, resp):
        seen[0] += 1
        if seen[0] == 20:
            os.kill(int(pid), signal.SIGKILL)
            t_kill[0] = time.time()
        return False

    st, events, done = stream(url, "/v1/completions", body, timeout=60, on_event=on_event)
    if t_kill[0] is None:
        fail("the stream ended before the stage could be killed")
    dt = time.time() - t_kill[0]
    errs = [e for e in events if isinstance(e, dict) and "error" in e]
    if st != 200:
        fail("stream status %d" % st)
    if not errs:
        fail("the stream ended without an error event (%d events, done=%s)" % (len(events), done))
    if dt > 5:
        fail("the error came %.1f s after the stage died" % dt)
    print("ok: the stream got an error %.2f s after the stage was killed: %s" % (dt, errs[0]["error"]["message"][:160]))


def wait_health(url, code, seconds):
    code, seconds = int(code), float(seconds)
    t0 = time.time()
    last = None
    while time.time() - t0 < seconds:
        try:
            s, body, _ = get(url, "/health", timeout=5)
            last = (s, body)
            if s == code:
                print("ok: /health %d after %.2f s: %s" % (s, time.time() - t0, body))
                return
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    fail("/health did not answer %d within %.0f s (last: %s)" % (code, seconds, last))


def generate(url):
    s, r, _ = post(url, "/v1/completions", {"model": model_of(url), "prompt": [151644, 872, 198], "max_tokens": 12,
                                          "temperature": 0})
    if s != 200 or r["usage"]["completion_tokens"] < 1:
        fail("completion after recovery: %d %s" % (s, r))
    print("ok: completion after recovery: %r" % r["choices"][0]["text"])


def garbage(host, port):
    """Sends a worker garbage, a truncated header, an oversized length and a half handshake; each connection
    must be refused (closed) without taking the worker down."""
    import random
    import socket
    import struct
    rnd = random.Random(7)
    port = int(port)
    hdr = b"STRT" + struct.pack("<HHHHQII", 1, 1, 0, 0, 0, 0xFFFFFFF0, 0) + b"\0\0\0\0"
    payloads = [bytes(rnd.getrandbits(8) for _ in range(n)) for n in (1, 31, 32, 200, 5000)]
    payloads += [hdr, hdr[:20], b"STRT" + b"\xff" * 28, b"GET / HTTP/1.0\r\n\r\n"]
    for p in payloads * 3:
        s = socket.create_connection((host, port), timeout=5)
        try:
            s.sendall(p)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            while s.recv(4096):
                pass
        except OSError:
            pass
        finally:
            s.close()
    print("ok: %d garbage connections refused by the worker" % (len(payloads) * 3))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"compare": compare, "status": status, "stream_until_error": stream_until_error, "wait_health": wait_health,
     "generate": generate, "garbage": garbage}[cmd](*args)
