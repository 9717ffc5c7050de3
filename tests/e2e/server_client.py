"""HTTP helpers for the server end-to-end tests (standard library only).

    post(base, path, body, headers=None, timeout=60) -> (status, parsed JSON or text, headers)
    get(base, path, timeout=30) -> (status, parsed JSON or text, headers)
    stream(base, path, body, timeout=120) -> (status, [event dicts], saw_done)
    raw(host, port, data, timeout=10) -> bytes   (a hand-written request on a socket)
"""
import http.client
import json
import socket
import sys
import urllib.parse


def _conn(base, timeout):
    u = urllib.parse.urlparse(base)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)


def _decode(data, headers):
    ctype = headers.get("Content-Type", "")
    if "json" in ctype:
        try:
            return json.loads(data)
        except ValueError:
            return data.decode("utf-8", "replace")
    return data.decode("utf-8", "replace")


def request(base, method, path, body=None, headers=None, timeout=60):
    c = _conn(base, timeout)
    h = {"Content-Type": "application/json"}
    if headers:
        h.update(headers)
    h = {k: v for k, v in h.items() if v is not None}
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    try:
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        data = r.read()
        return r.status, _decode(data, r.headers), r.headers
    finally:
        c.close()


def post(base, path, body, headers=None, timeout=60):
    return request(base, "POST", path, body, headers, timeout)


def get(base, path, headers=None, timeout=30):
    return request(base, "GET", path, None, headers, timeout)


def stream(base, path, body, headers=None, timeout=120, on_event=None):
    """POSTs with stream=true and reads server-sent events. Returns (status, events, saw_done).
    on_event(event, response) may return True to stop reading early (the connection is then closed)."""
    c = _conn(base, timeout)
    h = {"Content-Type": "application/json"}
    if headers:
        h.update(headers)
    try:
        c.request("POST", path, body=json.dumps(body), headers=h)
        r = c.getresponse()
        if r.status != 200:
            return r.status, [_decode(r.read(), r.headers)], False
        events, done = [], False
        while True:
            line = r.fp.readline()
            if not line:
                break
            line = line.decode("utf-8").rstrip("\r\n")
            if not line.startswith("data: "):
                continue
            payload = line[6:]
            if payload == "[DONE]":
                done = True
                break
            ev = json.loads(payload)
            events.append(ev)
            if on_event and on_event(ev, r):
                break
        return 200, events, done
    finally:
        c.close()


def raw(host, port, data, timeout=10):
    s = socket.create_connection((host, port), timeout=timeout)
    try:
        s.sendall(data)
        out = b""
        while True:
            try:
                b = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not b:
                break
            out += b
        return out
    finally:
        s.close()


def chat_text(events):
    """Joins a chat stream's deltas: (reasoning, content, finish_reason, usage, token ids from logprobs)."""
    reasoning, content, finish, usage, ids = "", "", None, None, []
    for ev in events:
        if "error" in ev:
            raise RuntimeError("error event: %s" % ev["error"])
        if ev.get("usage"):
            usage = ev["usage"]
        for ch in ev.get("choices", []):
            d = ch.get("delta", {})
            reasoning += d.get("reasoning_content") or ""
            content += d.get("content") or ""
            if ch.get("finish_reason"):
                finish = ch["finish_reason"]
            lp = ch.get("logprobs")
            if lp and lp.get("content"):
                ids += [t["token"] for t in lp["content"]]
    return reasoning, content, finish, usage, ids


def completion_text(events):
    text, finish, usage = "", None, None
    for ev in events:
        if "error" in ev:
            raise RuntimeError("error event: %s" % ev["error"])
        if ev.get("usage"):
            usage = ev["usage"]
        for ch in ev.get("choices", []):
            text += ch.get("text") or ""
            if ch.get("finish_reason"):
                finish = ch["finish_reason"]
    return text, finish, usage


class Checker:
    """Counts failures; every check prints one line."""

    def __init__(self, name):
        self.name, self.failed, self.passed = name, 0, 0

    def check(self, cond, what):
        if cond:
            self.passed += 1
        else:
            self.failed += 1
            print("  FAIL %s: %s" % (self.name, what), flush=True)
        return cond

    def done(self):
        print("%s: %d checks passed, %d failed" % (self.name, self.passed, self.failed), flush=True)
        sys.exit(1 if self.failed else 0)
