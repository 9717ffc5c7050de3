#!/bin/bash
# SIGTERM with requests in flight: the streaming client gets an error event and [DONE], the waiting client a 503,
# and the server exits 0 within seconds. SIGINT on an idle server: exit 0 at once.
source "$(dirname "$0")/server_env.bash"
start_server busy -m "$DEFAULT_MODEL" --parallel 2
python3 - "$SERVER_URL" "$SERVER_PID" <<'PY' || exit 1
import os, signal, sys, threading, time
from server_client import Checker, post, stream
base, pid = sys.argv[1], int(sys.argv[2])
c = Checker("shutdown")
got = {}
streaming = threading.Event()
def streamer():
    def on_event(ev, resp):
        streaming.set()
    got["stream"] = stream(base, "/v1/completions", {"prompt": "And", "max_tokens": 1500, "ignore_eos": True,
                                                     "stream": True}, on_event=on_event, timeout=60)
def waiter():
    got["plain"] = post(base, "/v1/completions", {"prompt": "And", "max_tokens": 1500, "ignore_eos": True}, timeout=60)
ts = [threading.Thread(target=streamer), threading.Thread(target=waiter)]
for t in ts:
    t.start()
c.check(streaming.wait(30), "the stream started")
time.sleep(0.3)
t0 = time.time()
os.kill(pid, signal.SIGTERM)
for t in ts:
    t.join(30)
status, events, done = got.get("stream", (None, [], False))
c.check(status == 200 and done, "stream: status %s, [DONE] %s" % (status, done))
c.check(events and "error" in events[-1] and "shutting down" in events[-1]["error"]["message"],
        "stream: the last event must be an error naming the shutdown: %r" % (events[-1:] if events else None))
status, body, _ = got.get("plain", (None, None, None))
c.check(status == 503 and "shutting down" in body["error"]["message"], "waiting request: %s %s" % (status, body))
c.check(time.time() - t0 < 10, "clients answered within 10 s of SIGTERM (%.1fs)" % (time.time() - t0))
c.done()
PY
for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$SERVER_PID" 2>/dev/null; then echo "FAIL: the server is still running 10 s after SIGTERM"; exit 1; fi
wait "$SERVER_PID"
rc=$?
[ $rc -eq 0 ] || { echo "FAIL: exit status $rc after SIGTERM"; tail -n 20 "$SERVER_LOG"; exit 1; }
grep -q "SIGTERM: shutting down" "$SERVER_LOG" || { echo "FAIL: no shutdown line in the log"; exit 1; }

start_server idle -m "$DEFAULT_MODEL" --parallel 1
kill -INT "$SERVER_PID"
for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$SERVER_PID" 2>/dev/null; then echo "FAIL: the idle server is still running 5 s after SIGINT"; exit 1; fi
wait "$SERVER_PID"
rc=$?
[ $rc -eq 0 ] || { echo "FAIL: exit status $rc after SIGINT"; tail -n 20 "$SERVER_LOG"; exit 1; }
echo "shutdown: ok"
