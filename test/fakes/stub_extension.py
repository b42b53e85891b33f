#!/usr/bin/env python3
"""A stand-in for ./apm-ext, to check the test fakes and harness.

Not the product: a small, slow, plain Python imitation of what
test/SPEC-FOR-TESTS.md says the binary does, so that test/fakes/fake_lambda.py and
test/e2e/e2e.py can be exercised before (or independently of) the C binary:

  python3 test/e2e/e2e.py --binary test/fakes/stub_extension.py

It registers as basename(argv[0]), subscribes to telemetry (unless
ELASTIC_APM_LAMBDA_DISABLE_LOGS_API=true), listens for agents on
127.0.0.1:ELASTIC_APM_DATA_RECEIVER_SERVER_PORT, queues intake bodies and
forwards them unchanged (chunked, agent's Content-Encoding) to the APM server,
holds /next in syncflush until the invocation ended and the queue is empty
(bounded by ELASTIC_APM_DATA_FORWARDER_TIMEOUT), proxies other paths with our
Authorization, flushes and exits 0 on SHUTDOWN. Logs are JSON lines on stderr.

STUB_MODE=minimal: only register, /next until SHUTDOWN, exit 0.
STUB_BUG=<name> makes it misbehave, to check that the harness notices:
  early_next (syncflush calls /next at once), hang_on_shutdown (never exits),
  no_forward (never delivers), bad_log (a non-JSON stderr line),
  agent_auth (proxy passes the agent's Authorization upstream).
"""

import http.client
import http.server
import json
import os
import re
import socket
import ssl
import sys
import threading
import time
import urllib.parse

ENV = os.environ
API = ENV.get("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001")
NAME = os.path.basename(sys.argv[0])
LEVELS = ["trace", "debug", "info", "warn", "error", "critical", "off"]
LOG_LEVEL = LEVELS.index(ENV.get("ELASTIC_APM_LOG_LEVEL", "info").lower()) \
    if ENV.get("ELASTIC_APM_LOG_LEVEL", "info").lower() in LEVELS else 2
_log_lock = threading.Lock()


def log(level, msg, **kw):
    if LEVELS.index(level) < LOG_LEVEL:
        return
    t = time.time()
    rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ"
           % (int(t * 1000) % 1000), "level": level, "msg": msg}
    rec.update(kw)
    with _log_lock:
        sys.stderr.write(json.dumps(rec) + "\n")
        sys.stderr.flush()


def duration(name, default):
    raw = ENV.get(name)
    if raw is None or raw == "":
        return default
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)(ms|s|m)?\s*", raw)
    if not m:
        log("warn", "malformed duration, using the default", var=name, value=raw,
            default=default)
        return default
    v = float(m.group(1))
    return v / 1000 if m.group(2) == "ms" else v * 60 if m.group(2) == "m" else v


def api(method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(API, timeout=None)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read()
    hdrs = dict(r.getheaders())
    conn.close()
    return r.status, hdrs, data


def register():
    st, hdrs, data = api("POST", "/2020-01-01/extension/register",
                         json.dumps({"events": ["INVOKE", "SHUTDOWN"]}),
                         {"Lambda-Extension-Name": NAME, "Content-Type": "application/json"})
    if st != 200:
        log("critical", "register failed", status=st, body=data.decode("utf-8", "replace"))
        sys.exit(1)
    log("info", "registered", name=NAME)
    return hdrs["Lambda-Extension-Identifier"]


def next_event(ext_id):
    st, _, data = api("GET", "/2020-01-01/extension/event/next",
                      headers={"Lambda-Extension-Identifier": ext_id})
    if st != 200:
        log("critical", "/next failed", status=st)
        os._exit(1)
    return json.loads(data)


class State:
    def __init__(self):
        self.cv = threading.Condition()
        self.queue = []          # (content-encoding, user-agent, body)
        self.inflight = 0
        self.flushed = False
        self.done_ids = set()    # runtimeDone request ids
        self.dropped = 0
        self.registered = {}     # request id -> (metadata line, transaction) not yet sent
        self.t_invoke = {}       # request id -> time.time() of INVOKE
        self.metadata = None     # last metadata line from an agent


S = State()
SERVER = ENV.get("ELASTIC_APM_LAMBDA_APM_SERVER", "").rstrip("/")
if ENV.get("ELASTIC_APM_API_KEY"):
    AUTH = "ApiKey " + ENV["ELASTIC_APM_API_KEY"]
elif ENV.get("ELASTIC_APM_SECRET_TOKEN"):
    AUTH = "Bearer " + ENV["ELASTIC_APM_SECRET_TOKEN"]
else:
    AUTH = None
FWD_TIMEOUT = duration("ELASTIC_APM_DATA_FORWARDER_TIMEOUT", 3.0)
RECV_TIMEOUT = duration("ELASTIC_APM_DATA_RECEIVER_TIMEOUT", 15.0)
BUF_MAX = 100
try:
    BUF_MAX = int(ENV.get("ELASTIC_APM_LAMBDA_AGENT_DATA_BUFFER_SIZE", "100"))
except ValueError:
    log("warn", "malformed integer, using the default",
        var="ELASTIC_APM_LAMBDA_AGENT_DATA_BUFFER_SIZE")
STRATEGY = ENV.get("ELASTIC_APM_SEND_STRATEGY", "syncflush").lower()
BUG = ENV.get("STUB_BUG", "")


def upstream_conn():
    u = urllib.parse.urlsplit(SERVER)
    if u.scheme == "https":
        ctx = ssl.create_default_context()
        return http.client.HTTPSConnection(u.hostname, u.port or 443, timeout=FWD_TIMEOUT,
                                           context=ctx), u.path
    return http.client.HTTPConnection(u.hostname, u.port or 80, timeout=FWD_TIMEOUT), u.path


def forwarder():
    conn, prefix = None, ""
    failures = 0
    while True:
        with S.cv:
            while not S.queue or BUG == "no_forward":
                S.cv.wait()
            enc, ua, body = S.queue[0]
            S.inflight += 1
        ok = False
        try:
            if conn is None:
                conn, prefix = upstream_conn()
            hdrs = {"Content-Type": "application/x-ndjson",
                    "User-Agent": "apm-ext/stub (%s)" % (ua or "")}
            if enc:
                hdrs["Content-Encoding"] = enc
            if AUTH:
                hdrs["Authorization"] = AUTH
            conn.request("POST", prefix + "/intake/v2/events", body=iter([body]),
                         headers=hdrs, encode_chunked=True)
            r = conn.getresponse()
            r.read()
            log("debug", "upstream answered", status=r.status, bytes=len(body))
            if r.status < 300 or (400 <= r.status < 500 and r.status != 429):
                ok = True
        except (OSError, http.client.HTTPException) as e:
            log("warn", "upstream failed", error=repr(e))
            if conn is not None:
                conn.close()
            conn = None
        with S.cv:
            S.inflight -= 1
            if ok:
                S.queue.pop(0)
                failures = 0
            else:
                failures += 1
            S.cv.notify_all()
            if not ok and failures > 1:
                S.cv.wait(min(failures - 1, 6) ** 2 * 0.1)


def read_body(h):
    if "chunked" in (h.headers.get("Transfer-Encoding") or "").lower():
        out = bytearray()
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            out += h.rfile.read(size)
            h.rfile.readline()
    n = int(h.headers.get("Content-Length") or 0)
    return h.rfile.read(n)


class Receiver(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = RECV_TIMEOUT

    def log_message(self, *a):
        pass

    def answer(self, status, body=b"", ctype="application/json", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        path = urllib.parse.urlsplit(self.path)
        if path.path == "/intake/v2/events":
            body = read_body(self)
            flushed = "flushed=true" in path.query
            seen_tx_ids(body, self.headers.get("Content-Encoding"))
            with S.cv:
                if body and SERVER:
                    if len(S.queue) >= BUF_MAX:
                        S.dropped += 1
                        log("warn", "agent data buffer full, dropped a payload")
                    else:
                        S.queue.append((self.headers.get("Content-Encoding"),
                                        self.headers.get("User-Agent"), body))
                if flushed:
                    S.flushed = True
                S.cv.notify_all()
            return self.answer(202)
        if path.path == "/register/transaction":
            body = read_body(self)
            if self.headers.get("Content-Type", "").split(";")[0].strip() != \
                    "application/vnd.elastic.apm.transaction+ndjson":
                return self.answer(415)
            if not self.headers.get("x-elastic-aws-request-id"):
                return self.answer(400)
            try:
                lines = [json.loads(x) for x in body.splitlines() if x.strip()]
                assert "metadata" in lines[0] and "transaction" in lines[1]
            except (ValueError, IndexError, AssertionError):
                return self.answer(422)
            with S.cv:
                S.metadata = lines[0]
                S.registered[self.headers["x-elastic-aws-request-id"]] = (lines[0], lines[1])
            return self.answer(200)
        return self.proxy("POST")

    def do_GET(self):
        self.proxy("GET")

    def proxy(self, method):
        body = read_body(self) if method != "GET" else b""
        if not SERVER:
            return self.answer(502)
        try:
            conn, prefix = upstream_conn()
            hdrs = {k: v for k, v in self.headers.items()
                    if k.lower() not in ("authorization", "host", "connection",
                                         "content-length", "transfer-encoding")}
            if AUTH and BUG == "agent_auth" and self.headers.get("Authorization"):
                hdrs["Authorization"] = self.headers["Authorization"]
            elif AUTH:
                hdrs["Authorization"] = AUTH
            conn.request(method, prefix + self.path, body=body or None, headers=hdrs)
            r = conn.getresponse()
            data = r.read()
            conn.close()
        except (OSError, http.client.HTTPException):
            return self.answer(502)
        self.answer(r.status, data, r.getheader("Content-Type") or "application/json")


class TelemetryHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_POST(self):
        try:
            body = read_body(self)
            recs = json.loads(body)
            assert isinstance(recs, list)
        except (ValueError, AssertionError):
            self.send_response(400)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        with S.cv:
            for r in recs:
                if not isinstance(r, dict):
                    continue
                rec = r.get("record")
                if r.get("type") == "platform.runtimeDone":
                    S.done_ids.add(rec.get("requestId"))
                    if rec.get("status") != "success":
                        proxy_transaction(rec["requestId"], rec["status"])
                elif r.get("type") == "platform.report":
                    own_events([{"metricset": {
                        "timestamp": int(time.time() * 1e6),
                        "faas": {"execution": rec.get("requestId")},
                        "samples": {"faas.duration": {"value": rec["metrics"]["durationMs"]},
                                    "faas.billed_duration": {
                                        "value": rec["metrics"]["billedDurationMs"]}}}}])
                elif r.get("type") == "function" and CAPTURE_LOGS:
                    own_events([{"log": {"@timestamp": r.get("time"),
                                         "message": rec if isinstance(rec, str)
                                         else json.dumps(rec)}}])
            S.cv.notify_all()
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


class Srv(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class Srv6(Srv):
    address_family = socket.AF_INET6


def serve(cls, addr, handler):
    srv = cls(addr, handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


CAPTURE_LOGS = ENV.get("ELASTIC_APM_LAMBDA_CAPTURE_LOGS", "true").lower() != "false"


def seen_tx_ids(body, enc):
    """Forget registered transactions the agent sent itself."""
    import gzip
    import zlib
    try:
        data = gzip.decompress(body) if enc == "gzip" else \
            zlib.decompress(body) if enc == "deflate" else body
        ids = {json.loads(x)["transaction"]["id"] for x in data.splitlines()
               if x.startswith(b'{"transaction"')}
    except (ValueError, OSError, KeyError, zlib.error):
        return
    with S.cv:
        for rid, (_, tx) in list(S.registered.items()):
            if tx["transaction"]["id"] in ids:
                del S.registered[rid]


def own_events(lines):
    """Queue events we make ourselves (caller holds S.cv), behind a metadata line."""
    if not SERVER:
        return
    md = S.metadata or {"metadata": {"service": {
        "name": ENV.get("AWS_LAMBDA_FUNCTION_NAME", "unknown"),
        "agent": {"name": "apm-ext-stub", "version": "0"}}}}
    body = b"".join(json.dumps(x).encode() + b"\n" for x in [md] + lines)
    S.queue.append((None, "", body))
    S.cv.notify_all()


def proxy_transaction(rid, status):
    """The function failed before the agent sent its transaction: send it (caller holds S.cv)."""
    if rid not in S.registered:
        return
    md, tx = S.registered.pop(rid)
    t = dict(tx["transaction"])
    t["result"], t["outcome"] = status, "failure"
    t0 = S.t_invoke.get(rid, time.time())
    t["duration"] = round((time.time() - t0) * 1000, 3)
    saved, S.metadata = S.metadata, md
    own_events([{"transaction": t}])
    S.metadata = saved


def wait_drained(until):
    with S.cv:
        while (S.queue or S.inflight) and time.monotonic() < until:
            S.cv.wait(until - time.monotonic())
        return not S.queue and not S.inflight


def main():
    if ENV.get("STUB_MODE") == "minimal":
        ext_id = register()
        while True:
            ev = next_event(ext_id)
            if ev["eventType"] == "SHUTDOWN":
                os._exit(0)
    ext_id = register()
    if BUG == "bad_log":
        sys.stderr.write("plain text, not JSON\n")
    if not SERVER:
        log("error", "ELASTIC_APM_LAMBDA_APM_SERVER is not set: data is discarded")
    rport = int(ENV.get("ELASTIC_APM_DATA_RECEIVER_SERVER_PORT", "8200"))
    tport = int(ENV.get("APM_EXT_TELEMETRY_PORT", "8201"))
    serve(Srv, ("127.0.0.1", rport), Receiver)
    try:
        serve(Srv6, ("::1", rport), Receiver)
    except OSError as e:
        log("debug", "no ::1 listener", error=str(e))
    if ENV.get("ELASTIC_APM_LAMBDA_DISABLE_LOGS_API", "false").lower() != "true":
        serve(Srv, ("0.0.0.0", tport), TelemetryHandler)
        st, _, data = api("PUT", "/2022-07-01/telemetry", json.dumps({
            "schemaVersion": "2022-12-13", "types": ["platform", "function"],
            "buffering": {"maxItems": 1000, "maxBytes": 262144, "timeoutMs": 25},
            "destination": {"protocol": "HTTP",
                            "URI": "http://sandbox.localdomain:%d" % tport}}),
            {"Lambda-Extension-Identifier": ext_id, "Content-Type": "application/json"})
        log("info" if st == 200 else "warn", "telemetry subscription", status=st)
    threading.Thread(target=forwarder, daemon=True).start()
    while True:
        ev = next_event(ext_id)
        log("debug", "event", event=ev)
        if ev["eventType"] == "SHUTDOWN":
            deadline = time.monotonic() + (ev["deadlineMs"] - time.time() * 1000) / 1000 - 0.2
            ok = wait_drained(deadline)
            log("info", "shutdown", delivered_all=ok)
            if BUG == "hang_on_shutdown":
                threading.Event().wait()
            os._exit(0)
        if STRATEGY == "background" or BUG == "early_next":
            continue
        rid = ev["requestId"]
        with S.cv:
            S.t_invoke[rid] = time.time()
        end_by = time.monotonic() + (ev["deadlineMs"] - time.time() * 1000) / 1000 - 0.1
        with S.cv:
            while not S.flushed and rid not in S.done_ids and time.monotonic() < end_by:
                S.cv.wait(max(0.001, end_by - time.monotonic()))
            S.flushed = False
        wait_drained(time.monotonic() + FWD_TIMEOUT)


if __name__ == "__main__":
    main()
