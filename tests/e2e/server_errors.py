"""A table of bad requests against a running server, each with its status and message; then the server must still
answer /health. Expects `strata serve --api-key KEY --ctx 512 --max-body 65536 --parallel 1 --queue 1 --timeout 2`.

usage: server_errors.py BASE KEY MODEL
"""
import json
import socket
import sys
import threading
import time
import urllib.parse

from server_client import Checker, get, post, raw, request, stream

BASE, KEY, MODEL = sys.argv[1], sys.argv[2], sys.argv[3]
AUTH = {"Authorization": "Bearer " + KEY}
u = urllib.parse.urlparse(BASE)
HOST, PORT = u.hostname, u.port
c = Checker("errors")
USER = [{"role": "user", "content": "hello"}]


def expect(name, status, needle, method, path, body=None, headers=AUTH, param=None, code=None):
    """One table row: the HTTP status, a substring of the error message, optionally the param and code."""
    try:
        got, r, h = request(BASE, method, path, body, headers)
    except Exception as e:  # noqa: BLE001
        c.check(False, "%s: request failed: %r" % (name, e))
        return None
    ok = c.check(got == status, "%s: status %s, want %s (%s)" % (name, got, status, r))
    if ok and status >= 400:
        err = r.get("error") if isinstance(r, dict) else None
        if c.check(isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err),
                   "%s: not an OpenAI error body: %r" % (name, r)):
            c.check(needle in err["message"], "%s: message %r lacks %r" % (name, err["message"], needle))
            if param is not None:
                c.check(err["param"] == param, "%s: param %r, want %r" % (name, err["param"], param))
            if code is not None:
                c.check(err["code"] == code, "%s: code %r, want %r" % (name, err["code"], code))
    return h


CHAT, COMP = "/v1/chat/completions", "/v1/completions"
long_prompt = "In the beginning God created the heaven and the earth. " * 80  # > 512 tokens
rows = [
    ("invalid JSON", 400, "invalid JSON", "POST", CHAT, '{"messages": [', AUTH, None, None),
    ("invalid UTF-8", 400, "invalid JSON", "POST", CHAT, b'{"messages": "\xff\xfe"}', AUTH, None, None),
    ("empty body", 400, "body is empty", "POST", CHAT, b"", AUTH, None, None),
    ("not an object", 400, "must be a JSON object", "POST", CHAT, "[1]", AUTH, None, None),
    ("duplicate key", 400, "duplicate", "POST", CHAT, '{"messages": [], "messages": []}', AUTH, None, None),
    ("missing messages", 400, "'messages' is required", "POST", CHAT, {"model": MODEL}, AUTH, "messages", None),
    ("empty messages", 400, "must not be empty", "POST", CHAT, {"messages": []}, AUTH, "messages", None),
    ("unknown role", 400, "unknown role \"wizard\"", "POST", CHAT,
     {"messages": [{"role": "wizard", "content": "x"}]}, AUTH, "messages[0].role", None),
    ("content wrong type", 400, "must be a string or an array", "POST", CHAT,
     {"messages": [{"role": "user", "content": 12}]}, AUTH, "messages[0].content", None),
    ("max_tokens wrong type", 400, "'max_tokens' must be an integer", "POST", CHAT,
     {"messages": USER, "max_tokens": "ten"}, AUTH, "max_tokens", None),
    ("max_tokens zero", 400, "'max_tokens' must be between 1", "POST", CHAT,
     {"messages": USER, "max_tokens": 0}, AUTH, "max_tokens", None),
    ("n = 3", 400, "'n' must be 1", "POST", CHAT, {"messages": USER, "n": 3}, AUTH, "n", None),
    ("temperature out of range", 400, "'temperature' must be between 0", "POST", CHAT,
     {"messages": USER, "temperature": -0.5}, AUTH, "temperature", None),
    ("top_p out of range", 400, "'top_p' must be between 0 and 1", "POST", CHAT,
     {"messages": USER, "top_p": 1.5}, AUTH, "top_p", None),
    ("presence_penalty out of range", 400, "between -2 and 2", "POST", CHAT,
     {"messages": USER, "presence_penalty": 9}, AUTH, "presence_penalty", None),
    ("stream_options without stream", 400, "only allowed when 'stream' is true", "POST", CHAT,
     {"messages": USER, "stream_options": {"include_usage": True}}, AUTH, "stream_options", None),
    ("logit_bias bad key", 400, "is not a token id", "POST", CHAT,
     {"messages": USER, "logit_bias": {"hello": 5}}, AUTH, "logit_bias", None),
    ("logit_bias id outside vocab", 400, "outside the vocabulary", "POST", CHAT,
     {"messages": USER, "logit_bias": {"99999999": 5}}, AUTH, "logit_bias", None),
    ("top_logprobs without logprobs", 400, "needs 'logprobs'", "POST", CHAT,
     {"messages": USER, "top_logprobs": 2}, AUTH, "top_logprobs", None),
    ("context overflow", 400, "maximum context length is 512 tokens. However, you requested", "POST", CHAT,
     {"messages": USER, "max_tokens": 600}, AUTH, "max_tokens", "context_length_exceeded"),
    ("prompt longer than the context", 400, "maximum context length is 512 tokens. However, your request has",
     "POST", COMP, {"prompt": long_prompt}, AUTH, "prompt", "context_length_exceeded"),
    ("missing prompt", 400, "'prompt' is required", "POST", COMP, {"max_tokens": 5}, AUTH, "prompt", None),
    ("token id outside vocab", 400, "outside the vocabulary", "POST", COMP, {"prompt": [1, 2, 10 ** 9]}, AUTH,
     "prompt", None),
    ("batched prompts", 400, "batched prompts are not supported", "POST", COMP, {"prompt": ["a", "b"]}, AUTH,
     "prompt", None),
    ("completions logprobs bool", 400, "must be an integer", "POST", COMP, {"prompt": "x", "logprobs": True}, AUTH,
     "logprobs", None),
    ("echo", 400, "'echo' is not supported", "POST", COMP, {"prompt": "x", "echo": True}, AUTH, "echo", None),
    ("unknown model", 404, "The model `gpt-4o` does not exist.", "POST", CHAT, {"model": "gpt-4o", "messages": USER},
     AUTH, "model", "model_not_found"),
    ("unknown model (GET)", 404, "does not exist", "GET", "/v1/models/gpt-4o", None, AUTH, "model", "model_not_found"),
    ("unknown route", 404, "Not found: /v1/embeddings", "POST", "/v1/embeddings", {"input": "x"}, AUTH, None, None),
    ("wrong method on chat", 405, "method GET is not allowed", "GET", CHAT, None, AUTH, None, None),
    ("wrong method on health", 405, "method POST is not allowed", "POST", "/health", {}, AUTH, None, None),
    ("unsupported content type", 415, "unsupported Content-Type", "POST", CHAT, json.dumps({"messages": USER}),
     dict(AUTH, **{"Content-Type": "text/plain"}), None, None),
    ("missing API key", 401, "API key", "POST", CHAT, {"messages": USER}, {"Authorization": None}, None,
     "invalid_api_key"),
    ("wrong API key", 401, "API key", "GET", "/v1/models", None, {"Authorization": "Bearer nope"}, None,
     "invalid_api_key"),
    ("body over the limit", 413, "larger than the limit of 65536 bytes", "POST", CHAT,
     json.dumps({"messages": [{"role": "user", "content": "x" * 70000}]}), AUTH, None, None),
    ("tokenize without input", 400, "'prompt' (text) or 'messages' is required", "POST", "/tokenize", {}, AUTH,
     "prompt", None),
    ("detokenize bad ids", 400, "outside the vocabulary", "POST", "/detokenize", {"tokens": [1, -5]}, AUTH, "tokens",
     None),
]
for row in rows:
    h = expect(*row)
    if row[0] == "wrong method on chat" and h is not None:
        c.check(h.get("Allow") == "POST", "405 must say Allow: POST (got %r)" % h.get("Allow"))
c.check(len(rows) >= 20, "the table needs at least 20 kinds of bad requests")

# the open routes need no key
status, body, _ = get(BASE, "/health")
c.check(status == 200 and body == {"status": "ok"}, "/health without a key: %s %s" % (status, body))
status, text, _ = get(BASE, "/metrics")
c.check(status == 200 and "strata_errors_total{type=\"invalid_request_error\"}" in text, "/metrics without a key")

# a chunked body over the limit (no Content-Length to refuse it up front)
chunk = b"x" * 30000
req = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
       b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
for _ in range(3):
    req += b"%x\r\n" % len(chunk) + chunk + b"\r\n"
req += b"0\r\n\r\n"
out = raw(HOST, PORT, req)
c.check(out.startswith(b"HTTP/1.1 413"), "chunked body over the limit: %r" % out[:80])

# headers over the connection buffer
out = raw(HOST, PORT, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200000 + b"\r\n\r\n")
c.check(out[:12] in (b"HTTP/1.1 431", b"HTTP/1.1 413") or out == b"", "huge headers: %r" % out[:80])

# a slow client is dropped after the idle timeout (2 s)
s = socket.create_connection((HOST, PORT), timeout=10)
s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
t0 = time.time()
try:
    closed = s.recv(100) == b""
except (ConnectionResetError, socket.timeout):
    closed = True
dt = time.time() - t0
s.close()
c.check(closed and dt < 8, "a stalled client must be disconnected by the timeout (closed %s after %.1fs)" % (closed, dt))

# one slot, one queue place: A streams (held open by its client), B waits quietly in the queue for longer than
# the 2 s idle timeout (SSE keep-alive comments hold its connection), C gets 429; when A's client leaves, its
# slot goes to B at once and B completes
first_events = []
started = threading.Event()
release = threading.Event()
b_result = {}


def stream_a():
    def on_event(ev, resp):
        first_events.append(ev)
        started.set()
        release.wait(30)
        return True  # stop reading: the connection is closed

    stream(BASE, COMP, {"prompt": "And", "max_tokens": 400, "ignore_eos": True, "stream": True}, headers=AUTH,
           on_event=on_event)


def stream_b():
    b_result["r"] = stream(BASE, COMP, {"prompt": "And", "max_tokens": 3, "stream": True}, headers=AUTH, timeout=60)


ta = threading.Thread(target=stream_a)
ta.start()
c.check(started.wait(60), "stream A never started")
tb = threading.Thread(target=stream_b)
tb.start()
time.sleep(0.5)
expect("queue full", 429, "too many requests", "POST", COMP, {"prompt": "x", "max_tokens": 2}, AUTH, None, None)
time.sleep(3)  # B is quiet for longer than the idle timeout
release.set()
ta.join(30)
t0 = time.time()
tb.join(30)
status, events, done = b_result.get("r", (None, [], False))
c.check(status == 200 and done and len(events) >= 1,
        "the queued stream must survive the idle timeout and complete: %s %s %s" % (status, events[:1], done))
c.check(time.time() - t0 < 3, "A's slot went to B in %.1fs" % (time.time() - t0))
status, body, _ = post(BASE, COMP, {"prompt": "And", "max_tokens": 2}, AUTH)
c.check(status == 200, "a request after both: %s %s" % (status, body))

status, body, _ = get(BASE, "/health")
c.check(status == 200 and body == {"status": "ok"}, "/health after the table: %s %s" % (status, body))
status, text, _ = get(BASE, "/metrics")
c.check(status == 200 and "strata_http_requests_total{route=\"/v1/chat/completions\",status=\"400\"}" in text,
        "/metrics counts the errors by status")
c.done()
