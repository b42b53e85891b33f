#!/usr/bin/env python3
"""End-to-end scenarios: the real binary between a fake Lambda and a fake APM server.

    python3 test/e2e/e2e.py [--binary ./apm-ext] [-k substring] [--list] [--log-lines N]

Every scenario gets its own FakeLambda (test/fakes/fake_lambda.py), FakeAPM
(test/fakes/fake_apm.py) and free ports for ELASTIC_APM_DATA_RECEIVER_SERVER_PORT and
APM_EXT_TELEMETRY_PORT. One line per scenario, `PASS name (1.2s)` or
`FAIL name: reason` followed by the tail of the extension's log; the last line
is exactly `N passed, N failed` (`, N skipped` added when a scenario raised
Skip: it cannot run here, e.g. without root); the exit code is 1 if any failed.

Without the C binary, the harness itself can be checked against a Python
imitation: python3 test/e2e/e2e.py --binary test/fakes/stub_extension.py

How to add a scenario
---------------------
Write a function taking one argument, the scenario context `t`, and register it
with @scenario. Put it in this file or in any module test/e2e/e2e_<topic>.py: such
modules are imported automatically and do `from e2e import scenario, ...`.

    from e2e import scenario, agent_send, agent_flush, make_metadata, \\
        make_transaction, tx_delivered

    @scenario(env={"ELASTIC_APM_SEND_STRATEGY": "background"})
    def my_case(t):
        t.start()                                  # exec, register, first /next
        inv = t.lam.invoke()
        tx = make_transaction(request_id=inv.request_id)
        assert agent_send(t.port, [make_metadata(), tx]) == 202
        assert agent_flush(t.port) == 202
        t.lam.runtime_done(inv)
        t_next = t.lam.finish(inv)                 # extension's /next; freezes
        t.wait_apm(lambda a: tx_delivered(a, tx), "the transaction")

@scenario(name=None, telemetry=True, apm={}, env={}, auto_shutdown=True,
allow_apm_errors=False): `telemetry` is passed to FakeLambda, `apm` are the
FakeAPM keyword arguments (token=, api_key=, tls=), `env` is added to the
extension's environment by t.start() (a value of None removes a variable).

What the context offers:
  t.lam, t.apm          the fakes (see their docstrings for the full API)
  t.port, t.tport, t.oport  the agent receiver, telemetry and OTLP/HTTP ports
  t.start(env=None)     start the extension; waits for register and init end
                        (env: defaults, then --env, then the scenario's, then env)
  t.env                 the environment t.start() used
  t.wait_apm(pred, what, timeout)   FakeAPM.wait_for that raises on timeout
  t.shutdown_ok(...)    SHUTDOWN, assert exit 0 before the deadline, not killed
  t.logs()              the extension's JSON log lines
  t.sync_invocation(lines_list, encoding)  INVOKE, send, flush, runtimeDone, /next
Assertions fail the scenario; raise with a message that says what went wrong.

Helpers for acting as the agent and for checking (all module-level):
  agent_send(port, lines, encoding='gzip'|'deflate'|'identity', chunked=True,
             flushed=False, token=None, conn=None, host='127.0.0.1') -> Sent
             (Sent == 202 compares the status; .raw is the body as sent)
  agent_flush(port)                 empty POST ?flushed=true
  AgentStream(port, encoding)       .write(lines) piece by piece, .finish() -> status
  http_request(port, method, path, body, headers) -> (status, headers, body)
  raw_request(...) + read_response(file)   for pipelining on a raw socket
  make_metadata(), make_transaction(request_id=...), make_span(tx, pad=N),
  agent_payload(inv, spans, pad) -> (lines, tx)      intake v2 valid events
  first_delivery(apm, tx) -> the fake APM request (202) that carried tx, or None
  check_forwarded(req, sent)        upstream request = agent's bytes, encoding, UA
  log_has(logs, levels, *words)     matching JSON log lines
Times: FakeLambda and FakeAPM both use time.monotonic(), so a request's
t_end can be compared with the t_next that FakeLambda.finish() returns.

After the function returns the runner checks, for every scenario: the
extension made no Lambda protocol mistakes (FakeLambda.protocol_errors), it
exits 0 before the deadline on SHUTDOWN (unless the scenario shut it down or
auto_shutdown=False), every stderr line is JSON, and the fake APM server saw no
invalid payload (unless allow_apm_errors=True).
"""

import argparse
import glob
import gzip
import http.client
import importlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import traceback
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))     # test/e2e: the scenarios
TEST = os.path.dirname(HERE)                          # test/: node/, otel/, ...
ROOT = os.path.dirname(TEST)                          # the repository
FAKES = os.path.join(TEST, "fakes")                   # fake_lambda.py, fake_apm.py, ...
for _dir in (FAKES, HERE):
    if _dir not in sys.path:
        sys.path.insert(0, _dir)
# `python3 test/e2e/e2e.py` runs this file as __main__: let `import e2e` in the
# e2e_*.py modules find this very module (and its SCENARIOS list).
if __name__ == "__main__":
    sys.modules.setdefault("e2e", sys.modules[__name__])

from fake_lambda import FakeLambda, FUNCTION_ARN  # noqa: E402

AGENT_UA = "apm-agent-nodejs/4.5.0 (test-fn 1.0.0)"
AGENT_TOKEN = "agent-token-should-not-go-upstream"
EXTRA_ENV = {}  # --env K=V: added to every scenario's extension environment

# --------------------------------------------------------------- registry

SCENARIOS = []


class Scenario:
    def __init__(self, name, func, telemetry, apm, env, auto_shutdown, allow_apm_errors):
        self.name, self.func = name, func
        self.telemetry, self.apm, self.env = telemetry, apm or {}, env or {}
        self.auto_shutdown, self.allow_apm_errors = auto_shutdown, allow_apm_errors


def scenario(name=None, *, telemetry=True, apm=None, env=None, auto_shutdown=True,
             allow_apm_errors=False):
    """Register a scenario function f(t). See the module docstring."""
    def deco(func):
        n = name or func.__name__
        if any(s.name == n for s in SCENARIOS):
            raise ValueError("duplicate scenario name %r" % n)
        SCENARIOS.append(Scenario(n, func, telemetry, apm, env, auto_shutdown,
                                  allow_apm_errors))
        return func
    return deco


# --------------------------------------------------------------- helpers

def free_port(host="127.0.0.1"):
    """A port nobody listens on right now, for the extension to listen on.

    Chosen below the kernel's ephemeral range (32768-60999 by default): a port
    from bind(0) would be handed out again to the fakes' own listeners and
    outgoing connections before the extension binds it ("Address in use")."""
    lo, hi = 20000, 32000
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            eph_lo = int(f.read().split()[0])
        hi = min(hi, eph_lo)
        lo = min(lo, hi - 2000)
    except (OSError, ValueError, IndexError):
        pass
    for _ in range(200):
        port = random.randrange(lo, hi)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port found in %d-%d" % (lo, hi))


def _id(n):
    return os.urandom(n).hex()


def make_metadata(service_name="test-fn", agent_name="nodejs", agent_version="4.5.0"):
    """A metadata line as a Node.js agent in Lambda sends it."""
    return {"metadata": {
        "service": {
            "name": service_name, "version": "$LATEST", "environment": "test",
            "agent": {"name": agent_name, "version": agent_version,
                      "activation_method": "aws-lambda-layer"},
            "language": {"name": "javascript"},
            "runtime": {"name": "AWS_Lambda_nodejs20.x", "version": "20.11.0"},
            "framework": {"name": "AWS Lambda", "version": "1"},
            "node": {"configured_name": "2024/01/01/[$LATEST]0123456789abcdef"}},
        "cloud": {"provider": "aws", "region": "us-east-1",
                  "service": {"name": "lambda"}, "account": {"id": "123456789012"}}}}


def make_transaction(request_id=None, name="test-fn", duration=12.5, outcome="success",
                     result="success", span_count=0, trace_id=None, id=None,
                     timestamp=None, coldstart=False):
    """A finished Lambda transaction event ({"transaction": {...}})."""
    return {"transaction": {
        "id": id or _id(8), "trace_id": trace_id or _id(16), "name": name,
        "type": "request", "duration": duration, "outcome": outcome, "result": result,
        "timestamp": timestamp or int(time.time() * 1e6), "sampled": True,
        "span_count": {"started": span_count, "dropped": 0},
        "faas": {"coldstart": coldstart, "execution": request_id, "id": FUNCTION_ARN,
                 "name": "test-fn", "version": "$LATEST", "trigger": {"type": "other"}}}}


def make_span(transaction, name=None, pad=0, start=1.0, duration=2.0):
    """A span of `transaction` (wrapped or not); pad adds that many bytes of SQL."""
    tx = transaction.get("transaction", transaction)
    span = {"id": _id(8), "trace_id": tx["trace_id"], "parent_id": tx["id"],
            "transaction_id": tx["id"], "name": name or "SELECT FROM users",
            "type": "db", "subtype": "postgresql", "action": "query",
            "start": start, "duration": duration, "outcome": "success", "sync": False}
    if pad:
        span["context"] = {"db": {"type": "sql", "instance": "app",
                                  "statement": "SELECT 1 /* %s */" % ("x" * pad)}}
    return {"span": span}


def ndjson(lines):
    return b"".join(json.dumps(x, separators=(",", ":")).encode() + b"\n" for x in lines)


def _compressor(encoding):
    if encoding == "gzip":
        return zlib.compressobj(6, zlib.DEFLATED, 31)
    if encoding == "deflate":
        return zlib.compressobj(6, zlib.DEFLATED, 15)  # zlib format, as agents send it
    if encoding in ("identity", None):
        return None
    raise ValueError("unknown encoding %r" % encoding)


def encode(data, encoding):
    if encoding == "gzip":
        return gzip.compress(data)
    if encoding == "deflate":
        return zlib.compress(data)
    return data


def _agent_headers(encoding, token, user_agent, extra):
    h = {"Content-Type": "application/x-ndjson", "User-Agent": user_agent,
         "Accept": "application/json"}
    if encoding not in ("identity", None):
        h["Content-Encoding"] = encoding
    if token:
        h["Authorization"] = "Bearer " + token
    h.update(extra or {})
    return h


class AgentStream:
    """One streamed (chunked) intake request, written piece by piece like an
    agent does during an invocation. .raw holds the body bytes as sent."""

    def __init__(self, port, encoding="gzip", flushed=False, token=None, conn=None,
                 user_agent=AGENT_UA, headers=None, timeout=15, host="127.0.0.1"):
        self.own = conn is None
        self.conn = conn or http.client.HTTPConnection(host, port, timeout=timeout)
        self.comp = _compressor(encoding)
        self.raw = bytearray()
        path = "/intake/v2/events" + ("?flushed=true" if flushed else "")
        self.conn.putrequest("POST", path, skip_accept_encoding=True)
        for k, v in _agent_headers(encoding, token, user_agent, headers).items():
            self.conn.putheader(k, v)
        self.conn.putheader("Transfer-Encoding", "chunked")
        self.conn.endheaders()

    def _chunk(self, data):
        if data:
            self.conn.send(b"%x\r\n" % len(data) + data + b"\r\n")
            self.raw += data

    def write(self, lines):
        data = ndjson(lines)
        if self.comp is not None:
            data = self.comp.compress(data) + self.comp.flush(zlib.Z_SYNC_FLUSH)
        self._chunk(data)

    def finish(self):
        """End the body, read the answer; returns the status."""
        if self.comp is not None:
            self._chunk(self.comp.flush())
        self.conn.send(b"0\r\n\r\n")
        resp = self.conn.getresponse()
        resp.read()
        self.status = resp.status
        if self.own:
            self.conn.close()
        return resp.status


class Sent:
    """What agent_send sent: .status, .raw (body bytes), .encoding."""

    def __init__(self, status, raw, encoding):
        self.status, self.raw, self.encoding = status, raw, encoding

    def __eq__(self, other):  # so `agent_send(...) == 202` reads naturally
        return self.status == other if isinstance(other, int) else NotImplemented

    def __int__(self):
        return self.status

    def __repr__(self):
        return "<sent %s %d bytes, status %s>" % (self.encoding, len(self.raw), self.status)


def agent_send(port, lines, encoding="gzip", chunked=True, flushed=False, token=None,
               conn=None, user_agent=AGENT_UA, headers=None, piece=65536, timeout=15,
               host="127.0.0.1"):
    """POST /intake/v2/events as an agent would. Returns a Sent, which compares
    equal to its status code (agent_send(...) == 202). Empty `lines` sends an
    empty body (as the agent's ?flushed=true request). With conn, the
    connection is reused and left open (keep-alive). host may be "::1"."""
    if not lines:
        encoding = "identity"
    if chunked and lines:
        s = AgentStream(port, encoding, flushed, token, conn, user_agent, headers, timeout,
                        host)
        for i in range(0, len(lines), max(1, piece // 1000)):
            s.write(lines[i:i + max(1, piece // 1000)])
        return Sent(s.finish(), bytes(s.raw), encoding)
    body = encode(ndjson(lines), encoding) if lines else b""
    own = conn is None
    c = conn or http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        h = _agent_headers(encoding, token, user_agent, headers)
        h["Content-Length"] = str(len(body))
        c.request("POST", "/intake/v2/events" + ("?flushed=true" if flushed else ""),
                  body=body, headers=h)
        r = c.getresponse()
        r.read()
        return Sent(r.status, body, encoding)
    finally:
        if own:
            c.close()

def agent_send_spans(port, inv, spans, min_bytes, what):
    """One chunked, identity-encoded intake POST of metadata, a transaction of inv
    and `spans` spans of 1000 bytes of text each: at least min_bytes, answered 202.
    Returns (the Sent, the transaction)."""
    tx = make_transaction(request_id=inv.request_id, span_count=spans)
    lines = [make_metadata(), tx] + [make_span(tx, pad=1000) for _ in range(spans)]
    s = agent_send(port, lines, "identity", chunked=True)
    assert len(s.raw) >= min_bytes, "payload only %d bytes" % len(s.raw)
    assert s == 202, "%s answered %s" % (what, s.status)
    return s, tx


def agent_flush(port, token=None, conn=None):
    """The agent's end-of-invocation signal: empty POST ?flushed=true."""
    return agent_send(port, [], flushed=True, token=token, conn=conn, chunked=False)


def http_request(port, method, path, body=b"", headers=None, timeout=15):
    """One request to the extension's receiver; returns (status, headers, body)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body or None, headers=headers or {})
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def read_response(f):
    """Read one HTTP/1.1 response from a binary file object:
    (status, {lower-case header: value}, body)."""
    line = f.readline(65537)
    if not line:
        raise AssertionError("connection closed before a response")
    parts = line.decode("latin-1").split(" ", 2)
    status = int(parts[1])
    headers = {}
    while True:
        h = f.readline(65537)
        if h in (b"\r\n", b"\n"):
            break
        if not h:
            raise AssertionError("connection closed in response headers")
        k, _, v = h.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    if status in (204, 304) or 100 <= status < 200:
        return status, headers, b""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size = int(f.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while f.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return status, headers, bytes(body)
            body += f.read(size)
            f.readline()
    if "content-length" not in headers:
        raise AssertionError("response %d has neither Content-Length nor chunked "
                             "(keep-alive impossible): %r" % (status, headers))
    return status, headers, f.read(int(headers["content-length"]))


def raw_request(method, path, body=b"", headers=None):
    """Bytes of one HTTP/1.1 request with Content-Length (for pipelining)."""
    h = {"Host": "127.0.0.1", "User-Agent": AGENT_UA}
    h.update(headers or {})
    h["Content-Length"] = str(len(body))
    head = "%s %s HTTP/1.1\r\n" % (method, path) + \
        "".join("%s: %s\r\n" % kv for kv in h.items()) + "\r\n"
    return head.encode("latin-1") + body


def tx_of(line):
    return line.get("transaction", line)


def delivered_requests(apm, tx):
    """Intake requests answered 202 that carry this transaction."""
    tid = tx_of(tx)["id"]
    return [r for r in apm.intake_requests()
            if r.status == 202 and r.io_error is None
            and any(k == "transaction" and o.get("id") == tid for k, o in r.lines)]


def tx_delivered(apm, tx):
    return bool(delivered_requests(apm, tx))


def first_delivery(apm, tx):
    """The first intake request answered 202 that carries tx, or None."""
    reqs = delivered_requests(apm, tx)
    return reqs[0] if reqs else None


def log_has(logs, levels, *words):
    """Log lines at one of `levels` whose JSON text contains every word."""
    out = []
    for rec in logs:
        if str(rec.get("level", "")).lower() in levels:
            text = json.dumps(rec)
            if all(w in text for w in words):
                out.append(rec)
    return out


# --------------------------------------------------------------- context

class Context:
    """What a scenario function gets. See the module docstring."""

    def __init__(self, binary, sc, lam, apm):
        self.binary, self.sc, self.lam, self.apm = binary, sc, lam, apm
        self.port = free_port("127.0.0.1")
        self.tport = free_port("0.0.0.0")
        while self.tport == self.port:
            self.tport = free_port("0.0.0.0")
        self.oport = free_port("127.0.0.1")   # OTLP/HTTP (APM_EXT_OTLP_PORT)
        while self.oport in (self.port, self.tport):
            self.oport = free_port("127.0.0.1")
        self.env = None
        self.shut_down = False

    def start(self, env=None, wait_init=True, timeout=10):
        """Start the extension with the scenario's env plus `env`; wait for
        register and (wait_init) its first /next. Returns the Popen."""
        e = {"ELASTIC_APM_LAMBDA_APM_SERVER": self.apm.url,
             "ELASTIC_APM_DATA_RECEIVER_SERVER_PORT": str(self.port),
             "APM_EXT_TELEMETRY_PORT": str(self.tport),
             "APM_EXT_OTLP_PORT": str(self.oport),
             "ELASTIC_APM_LOG_LEVEL": "debug"}
        if self.apm.token:
            e["ELASTIC_APM_SECRET_TOKEN"] = self.apm.token
        if self.apm.api_key:
            e["ELASTIC_APM_API_KEY"] = self.apm.api_key
        e.update(EXTRA_ENV)
        e.update(self.sc.env)
        e.update(env or {})
        self.env = e
        proc = self.lam.start_extension(self.binary, e)
        self.lam.wait_registered(timeout)
        if wait_init:
            self.lam.wait_init_done(timeout)
            self.wait_listening(timeout)
        return proc

    def wait_listening(self, timeout=5):
        """The receiver must accept connections once init is over; polls
        connect() briefly in case the listener comes up right after /next."""
        end = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError as e:
                if time.monotonic() > end:
                    raise AssertionError("receiver 127.0.0.1:%d not listening after init: %s"
                                         % (self.port, e))
                with self.lam._cv:
                    self.lam._cv.wait(0.02)

    def wait_apm(self, pred, what="data at the APM server", timeout=10):
        if not self.apm.wait_for(pred, timeout):
            raise AssertionError("timed out after %.1fs waiting for %s (APM server saw %d "
                                 "requests: %s)" % (timeout, what, len(self.apm.requests),
                                                    self.apm.requests[-5:]))

    def logs(self):
        return self.lam.ext_logs()

    def shutdown_ok(self, reason="spindown", deadline_ms=2000, park_timeout=10):
        """SHUTDOWN; assert a clean exit 0 before the deadline. Returns t_exit."""
        self.shut_down = True
        code, t_exit, killed = self.lam.shutdown(reason, deadline_ms, park_timeout)
        assert not killed, "extension still running at the SHUTDOWN deadline: SIGKILLed"
        assert code == 0, "extension exited with %s on SHUTDOWN" % code
        return t_exit

    def sync_invocation(self, lines_list, encoding="gzip", freeze=True, flush=True,
                        runtime_done=True):
        """One invocation: INVOKE, the agent sends each list in lines_list as
        one request, flushes, the runtime answers, the extension's /next.
        Returns (inv, t_flush, t_next, [Sent])."""
        inv = self.lam.invoke()
        sent = []
        for lines in lines_list:
            s = agent_send(self.port, lines, encoding)
            assert s == 202, "agent POST answered %s, want 202" % s.status
            sent.append(s)
        t_flush = time.monotonic()
        if flush:
            st = agent_flush(self.port)
            assert st == 202, "flushed=true answered %s, want 202" % st.status
        if runtime_done:
            self.lam.runtime_done(inv)
        t_next = self.lam.finish(inv, freeze=freeze)
        return inv, t_flush, t_next, sent


def agent_payload(inv=None, spans=2, pad=0):
    """[metadata, transaction, spans...] for an invocation; returns (lines, tx)."""
    tx = make_transaction(request_id=inv.request_id if inv else None, span_count=spans)
    return [make_metadata(), tx] + [make_span(tx, pad=pad) for _ in range(spans)], tx


def check_forwarded(req, sent, what="payload"):
    """An upstream intake request carries the agent's bytes as sent."""
    enc = req.headers.get("Content-Encoding")
    want = None if sent.encoding == "identity" else sent.encoding
    assert (enc or None) == want or (want is None and enc == "identity"), \
        "%s: upstream Content-Encoding %r, agent sent %r" % (what, enc, sent.encoding)
    assert req.body == sent.raw, "%s: upstream body (%d bytes) differs from the agent's " \
        "(%d bytes)" % (what, len(req.body), len(sent.raw))
    ctype = req.headers.get("Content-Type") or ""
    assert ctype.split(";")[0].strip() == "application/x-ndjson", \
        "%s: upstream Content-Type %r" % (what, ctype)
    assert req.chunked, "%s: upstream body not chunked" % what
    ua = req.headers.get("User-Agent") or ""
    assert ua.startswith("apm-ext/") and AGENT_UA in ua, \
        "%s: upstream User-Agent %r, want apm-ext/<v> (%s)" % (what, ua, AGENT_UA)


# --------------------------------------------------------------- scenarios

@scenario()
def init_register_subscribe(t):
    """Registers with its file name for INVOKE+SHUTDOWN and subscribes right."""
    t.start()
    lam = t.lam
    assert lam.register_headers.get("Lambda-Extension-Name") == "apm-lambda-extension", \
        "registered as %r" % lam.register_headers.get("Lambda-Extension-Name")
    assert sorted(lam.ext_events_wanted) == ["INVOKE", "SHUTDOWN"], lam.ext_events_wanted
    sub = lam.subscription
    assert sub is not None, "no telemetry subscription (attempts: %r)" % lam.subscribe_attempts
    assert sub["schemaVersion"] == "2022-12-13", sub
    assert "platform" in sub["types"], sub
    assert lam.telemetry_port == t.tport, "subscribed port %s, want %s" % (
        lam.telemetry_port, t.tport)
    assert lam.t_register - lam.t_exec < 1.0, "register took %.3fs" % (
        lam.t_register - lam.t_exec)
    # an http APM server: no trust anchors are loaded, the CA bundle is never
    # read (tls_load runs for https only; its lines name "trust anchors" or the
    # "CA bundle", at debug when it loads, at error when it finds none)
    t.shutdown_ok()
    tls_lines = [json.dumps(r) for r in t.logs()]
    tls_lines = [r for r in tls_lines if "trust anchors" in r or "CA bundle" in r]
    assert not tls_lines, "trust anchors loaded for an http APM server: %s" % tls_lines[:3]


@scenario(telemetry=False)
def telemetry_not_supported(t):
    """202 "not supported" from the Telemetry API: carries on; flushed=true ends it."""
    t.start()
    lines, tx = agent_payload()
    inv, t_flush, t_next, sent = t.sync_invocation([lines])
    req = first_delivery(t.apm, tx)
    assert req is not None and req.t_end <= t_next, "transaction not delivered before /next"
    assert t.lam.subscribe_attempts, "never tried to subscribe"


@scenario()
def sync_three_invocations(t):
    """Each invocation's events reach the APM server before the extension's next /next."""
    t.start()
    for i in range(3):
        inv = t.lam.invoke()
        lines, tx = agent_payload(inv, spans=3)
        s = agent_send(t.port, lines, "gzip")
        assert s == 202, "invocation %d: agent POST answered %s" % (i, s.status)
        t_flush = time.monotonic()
        assert agent_flush(t.port) == 202
        t.lam.runtime_done(inv)
        t_next = t.lam.finish(inv)
        req = first_delivery(t.apm, tx)
        assert req is not None, "invocation %d: transaction not at the APM server when " \
            "the extension called /next" % i
        assert req.t_end <= t_next, "invocation %d: /next %.3fs before the APM server " \
            "answered" % (i, req.t_end - t_next)
        assert t_next - t_flush < 2.0, "invocation %d: /next held %.3fs after the flush" % (
            i, t_next - t_flush)
        check_forwarded(req, s, "invocation %d" % i)
    t.shutdown_ok()
    for tx_obj in t.apm.events("transaction"):
        n = sum(1 for o in t.apm.events("transaction") if o["id"] == tx_obj["id"])
        assert n == 1, "transaction %s delivered %d times" % (tx_obj["id"], n)


@scenario()
def sync_runtime_done_without_flush(t):
    """No ?flushed=true: telemetry platform.runtimeDone ends the invocation."""
    t.start()
    inv = t.lam.invoke()
    lines, tx = agent_payload(inv)
    assert agent_send(t.port, lines) == 202
    t.lam.runtime_done(inv)
    t_done = inv.t_runtime_done
    t_next = t.lam.finish(inv, timeout=5)
    req = first_delivery(t.apm, tx)
    assert req is not None and req.t_end <= t_next, "data not delivered before /next"
    assert t_next - t_done < 1.5, "/next %.3fs after runtimeDone" % (t_next - t_done)


@scenario()
def sync_deadline_bounds_hold(t):
    """Neither flush nor runtimeDone: the extension still calls /next by the deadline."""
    t.start()
    inv = t.lam.invoke(timeout_ms=1500)
    lines, tx = agent_payload(inv)
    assert agent_send(t.port, lines) == 202
    t_next = t.lam.wait_ext_next_after(inv, timeout=5)
    assert t_next - inv.t_invoke < 1.5 + 0.5, "/next %.3fs after INVOKE, deadline 1.5s" % (
        t_next - inv.t_invoke)
    assert tx_delivered(t.apm, tx), "data not delivered by the deadline"
    code, t_exit, killed = t.lam.timeout(inv)
    t.shut_down = True
    assert code == 0 and not killed, "exit %s killed=%s after timeout" % (code, killed)


@scenario(env={"ELASTIC_APM_SEND_STRATEGY": "background"})
def background(t):
    """background: /next right after INVOKE; the data still arrives (later or at shutdown)."""
    t.start()
    txs = []
    for i in range(2):
        inv = t.lam.invoke()
        t_next = t.lam.wait_ext_next_after(inv, timeout=2)
        assert t_next - inv.t_delivered < 0.5, "invocation %d: /next %.3fs after INVOKE" % (
            i, t_next - inv.t_delivered)
        lines, tx = agent_payload(inv)
        txs.append(tx)
        assert agent_send(t.port, lines) == 202
        assert agent_flush(t.port) == 202
        t.lam.runtime_done(inv)
        t.lam.finish(inv)
    t_exit = t.shutdown_ok()
    for i, tx in enumerate(txs):
        req = first_delivery(t.apm, tx)
        assert req is not None, "invocation %d: transaction never delivered" % i
        assert req.t_end <= t_exit


@scenario()
def sync_flush_races_invoke(t):
    """The agent flushes and runtimeDone arrives before the extension reads its INVOKE."""
    t.start()
    for i, (flush, rt_done) in enumerate(((True, True), (True, False), (False, True))):
        inv = t.lam.invoke(ext_delay=0.15)
        lines, tx = agent_payload(inv)
        assert agent_send(t.port, lines) == 202
        t_end = time.monotonic()
        if flush:
            assert agent_flush(t.port) == 202
        if rt_done:
            t.lam.runtime_done(inv)
            t.lam.wait_telemetry_idle()
        t.lam.wait_delivered(inv)
        t_next = t.lam.finish(inv, timeout=5)
        req = first_delivery(t.apm, tx)
        assert req is not None and req.t_end <= t_next, "case %d: data not delivered " \
            "before /next" % i
        assert t_next - inv.t_delivered < 1.0, "case %d (flush=%s runtimeDone=%s): the " \
            "end came before INVOKE and was missed: /next %.3fs after INVOKE, %.3fs after " \
            "the end" % (i, flush, rt_done, t_next - inv.t_delivered, t_next - t_end)


@scenario()
def agents_and_encodings(t):
    """gzip chunked, deflate with Content-Length, identity, two concurrent streams."""
    t.start()
    inv = t.lam.invoke()
    sent = []
    for enc, chunked in (("gzip", True), ("deflate", False), ("identity", True),
                         ("identity", False), ("deflate", True)):
        lines, tx = agent_payload(inv, spans=4)
        s = agent_send(t.port, lines, enc, chunked=chunked)
        assert s == 202, "%s chunked=%s answered %s" % (enc, chunked, s.status)
        sent.append((tx, s, "%s%s" % (enc, " chunked" if chunked else "")))
    # two agents streaming at the same time, pieces interleaved
    a = AgentStream(t.port, "gzip")
    b = AgentStream(t.port, "identity")
    la, txa = agent_payload(inv, spans=6)
    lb, txb = agent_payload(inv, spans=6)
    a.write(la[:3])
    b.write(lb[:3])
    a.write(la[3:5])
    b.write(lb[3:])
    assert b.finish() == 202, "stream B answered %s" % b.status
    a.write(la[5:])
    assert a.finish() == 202, "stream A answered %s" % a.status
    sent.append((txa, Sent(202, bytes(a.raw), "gzip"), "concurrent gzip"))
    sent.append((txb, Sent(202, bytes(b.raw), "identity"), "concurrent identity"))
    assert agent_flush(t.port) == 202
    t.lam.runtime_done(inv)
    t_next = t.lam.finish(inv)
    for tx, s, what in sent:
        req = first_delivery(t.apm, tx)
        assert req is not None and req.t_end <= t_next, "%s: not delivered before /next" % what
        check_forwarded(req, s, what)


@scenario()
def payload_1mb(t):
    """A 1 MB identity body of many spans arrives whole and unchanged."""
    t.start()
    inv = t.lam.invoke()
    s, tx = agent_send_spans(t.port, inv, 900, 1_000_000, "1 MB POST")
    assert agent_flush(t.port) == 202
    t.lam.runtime_done(inv)
    t_next = t.lam.finish(inv, timeout=15)
    req = first_delivery(t.apm, tx)
    assert req is not None and req.t_end <= t_next, "1 MB payload not delivered before /next"
    check_forwarded(req, s, "1 MB payload")
    assert t.apm.count("span") == 900, "%d spans arrived, want 900" % t.apm.count("span")


@scenario(env={"ELASTIC_APM_SEND_STRATEGY": "background"})
def shutdown_delivery(t):
    """Data sent, then SHUTDOWN right away: all delivered, exit 0 before the deadline."""
    t.start()
    inv = t.lam.invoke()
    t.lam.wait_ext_next_after(inv, timeout=2)
    txs = []
    for enc in ("gzip", "deflate", "identity", "gzip", "gzip"):
        lines, tx = agent_payload(inv, spans=40, pad=200)
        assert agent_send(t.port, lines, enc) == 202
        txs.append(tx)
    assert agent_flush(t.port) == 202
    t.lam.runtime_done(inv)
    t_exit = t.shutdown_ok()
    assert t_exit - t.lam.t_shutdown < 2.0
    for i, tx in enumerate(txs):
        req = first_delivery(t.apm, tx)
        assert req is not None and req.t_end <= t_exit, "payload %d not delivered before " \
            "exit" % i


@scenario()
def sync_flush_ends_without_runtime_done(t):
    """The agent's ?flushed=true alone ends the invocation: /next follows the
    flush promptly while platform.runtimeDone comes late (it is sent only
    once /next came, or after 2 s)."""
    t.start()
    for i in range(2):
        inv = t.lam.invoke()                    # 3 s deadline
        lines, tx = agent_payload(inv)
        assert agent_send(t.port, lines) == 202
        t_flush = time.monotonic()
        assert agent_flush(t.port) == 202
        try:
            t_next = t.lam.wait_ext_next_after(inv, timeout=2.0)
        except AssertionError:
            t_next = None
        t.lam.runtime_done(inv)
        t.lam.finish(inv)
        assert t_next is not None and t_next - t_flush < 0.5, \
            "invocation %d: /next %s after the agent's flush, want it at once (the " \
            "flush ends the invocation, runtimeDone came late)" % (
                i + 1, "not within 2 s" if t_next is None else "%.3fs" % (t_next - t_flush))
        req = first_delivery(t.apm, tx)
        assert req is not None and req.t_end <= t_next, "not delivered before /next"


@scenario(env={"ELASTIC_APM_SEND_STRATEGY": "background"})
def shutdown_delivery_held_answers(t):
    """The APM server holds every answer until SHUTDOWN came: what is
    delivered is delivered during shutdown (an extension that exits at
    SHUTDOWN without delivering fails here)."""
    t.start()
    t.apm.set_mode("stall")

    def release():  # the moment the platform sent SHUTDOWN
        t.lam.wait_for(lambda lam: lam.t_shutdown is not None, timeout=30,
                       what="SHUTDOWN sent")
        t.apm.set_mode("ok")
    th = threading.Thread(target=release, daemon=True)
    th.start()
    inv = t.lam.invoke()
    t.lam.wait_ext_next_after(inv, timeout=2)
    txs = []
    for enc in ("gzip", "identity"):
        lines, tx = agent_payload(inv, spans=10)
        assert agent_send(t.port, lines, enc) == 202
        txs.append(tx)
    assert agent_flush(t.port) == 202
    t.lam.runtime_done(inv)
    t.lam.finish(inv, freeze=False)
    assert not any(first_delivery(t.apm, tx) for tx in txs), \
        "answered before SHUTDOWN: the fake APM server did not hold"
    t_exit = t.shutdown_ok()
    th.join(5)
    for i, tx in enumerate(txs):
        req = first_delivery(t.apm, tx)
        assert req is not None and t.lam.t_shutdown <= req.t_end <= t_exit, \
            "payload %d not delivered during shutdown" % i


@scenario()
def shutdown_after_timeout(t):
    """Function timeout: runtimeDone(timeout), SHUTDOWN(timeout); data delivered, exit 0."""
    t.start()
    inv = t.lam.invoke(timeout_ms=1000)
    lines, tx = agent_payload(inv)
    assert agent_send(t.port, lines) == 202
    code, t_exit, killed = t.lam.timeout(inv)
    t.shut_down = True
    assert not killed and code == 0, "exit %s, killed=%s" % (code, killed)
    req = first_delivery(t.apm, tx)
    assert req is not None and req.t_end <= t_exit, "data not delivered before exit"


@scenario()
def apm_server_slow(t):
    """APM server answers after 1 s: still delivered, /next held <= forwarder timeout + margin."""
    t.start()
    t.apm.set_mode("slow", 1.0)
    lines, tx = agent_payload()
    inv, t_flush, t_next, sent = t.sync_invocation([lines])
    req = first_delivery(t.apm, tx)
    assert req is not None and req.t_end <= t_next, "data not delivered before /next"
    assert t_next - t_flush <= 3.0 + 1.0, "/next held %.3fs (forwarder timeout 3s)" % (
        t_next - t_flush)


@scenario(env={"ELASTIC_APM_DATA_FORWARDER_TIMEOUT": "1s"})
def apm_server_stall_bounded(t):
    """APM server never answers: /next held at most ~forwarder timeout; retried later."""
    t.start()
    t.apm.set_mode("stall")
    inv = t.lam.invoke()
    lines, tx = agent_payload(inv)
    assert agent_send(t.port, lines) == 202
    t_flush = time.monotonic()
    assert agent_flush(t.port) == 202, "agent held up while the APM server stalls"
    t.lam.runtime_done(inv)
    t_next = t.lam.finish(inv, timeout=6)
    assert t_next - t_flush <= 1.0 + 1.0, "/next held %.3fs with forwarder timeout 1s" % (
        t_next - t_flush)
    t.apm.set_mode("ok")
    t.shutdown_ok()
    assert tx_delivered(t.apm, tx), "stalled payload never delivered after recovery"


@scenario(apm={"token": "s3cret"})
def proxy_get_root(t):
    """GET / is proxied with our Authorization (not the agent's); 502 when upstream is down."""
    t.start()
    st, hdrs, body = http_request(t.port, "GET", "/", headers={
        "Authorization": "Bearer " + AGENT_TOKEN, "User-Agent": AGENT_UA})
    assert st == 200, "GET / answered %s: %r" % (st, body[:200])
    info = json.loads(body)
    direct = http.client.HTTPConnection("127.0.0.1", t.apm.port, timeout=5)
    direct.request("GET", "/", headers={"Authorization": "Bearer s3cret"})
    want = json.loads(direct.getresponse().read())
    direct.close()
    assert info.get("version") == want["version"], "version %r, want %r" % (
        info.get("version"), want["version"])
    proxied = [r for r in t.apm.requests if r.path == "/"][0]  # ours came first
    auth = proxied.headers.get("Authorization")
    assert auth == "Bearer s3cret", "upstream got Authorization %r (agent sent %r)" % (
        auth, "Bearer " + AGENT_TOKEN)
    st, _, body = http_request(t.port, "GET", "/config/v1/agents?service.name=test-fn",
                               headers={"Authorization": "Bearer " + AGENT_TOKEN})
    assert st == 200, "/config/v1/agents answered %s" % st
    t.apm.set_mode("down")
    st, _, _ = http_request(t.port, "GET", "/", headers={"User-Agent": AGENT_UA})
    assert st == 502, "GET / with the APM server down answered %s, want 502" % st
    t.apm.set_mode("ok")


@scenario(apm={"api_key": "k3y"}, env={"ELASTIC_APM_SECRET_TOKEN": "s3cret"})
def auth_api_key_wins(t):
    """With both a token and an API key, upstream gets ApiKey."""
    t.start()
    t.sync_invocation([agent_payload()[0]])
    reqs = t.apm.intake_requests()
    assert reqs, "nothing delivered"
    auth = reqs[0].headers.get("Authorization")
    assert auth == "ApiKey k3y", "upstream Authorization %r" % auth
    assert reqs[0].status == 202


@scenario()
def register_transaction(t):
    """/register/transaction: 200; 415 wrong content type; 400 no request id; 422 garbage."""
    t.start()
    inv = t.lam.invoke()
    tx = make_transaction(request_id=inv.request_id)
    body = ndjson([make_metadata(), tx])
    ctype = "application/vnd.elastic.apm.transaction+ndjson"
    st, _, _ = http_request(t.port, "POST", "/register/transaction", body,
                            {"Content-Type": ctype, "x-elastic-aws-request-id": inv.request_id})
    assert st == 200, "register answered %s, want 200" % st
    st, _, _ = http_request(t.port, "POST", "/register/transaction", body,
                            {"Content-Type": "application/json",
                             "x-elastic-aws-request-id": inv.request_id})
    assert st == 415, "wrong content type answered %s, want 415" % st
    st, _, _ = http_request(t.port, "POST", "/register/transaction", body,
                            {"Content-Type": ctype})
    assert st == 400, "missing request id answered %s, want 400" % st
    st, _, _ = http_request(t.port, "POST", "/register/transaction", b"{not json\n",
                            {"Content-Type": ctype, "x-elastic-aws-request-id": inv.request_id})
    assert st == 422, "garbage body answered %s, want 422" % st
    lines = [make_metadata(), tx]
    assert agent_send(t.port, lines) == 202
    assert agent_flush(t.port) == 202
    t.lam.runtime_done(inv)
    t_next = t.lam.finish(inv)
    req = first_delivery(t.apm, tx)
    assert req is not None and req.t_end <= t_next, "transaction not delivered before /next"
    t.shutdown_ok()
    n = sum(1 for o in t.apm.events("transaction") if o["id"] == tx_of(tx)["id"])
    assert n == 1, "a registered and finished transaction was delivered %d times" % n


@scenario()
def keepalive_pipelining(t):
    """Two pipelined requests, then more on the same agent connection."""
    t.start()
    inv = t.lam.invoke()
    l1, tx1 = agent_payload(inv)
    l2, tx2 = agent_payload(inv)
    l3, tx3 = agent_payload(inv)
    h = {"Content-Type": "application/x-ndjson"}
    sock = socket.create_connection(("127.0.0.1", t.port), timeout=10)
    f = sock.makefile("rb")
    try:
        sock.sendall(raw_request("POST", "/intake/v2/events", ndjson(l1), h) +
                     raw_request("POST", "/intake/v2/events", ndjson(l2), h))
        for i in (1, 2):
            st, hd, _ = read_response(f)
            assert st == 202, "pipelined request %d answered %s" % (i, st)
            assert hd.get("connection", "").lower() != "close", \
                "pipelined request %d: the extension closes the connection" % i
        sock.sendall(raw_request("POST", "/intake/v2/events",
                                 gzip.compress(ndjson(l3)), dict(h, **{
                                     "Content-Encoding": "gzip"})))
        st, hd, _ = read_response(f)
        assert st == 202, "third request on the kept-alive connection answered %s" % st
        sock.sendall(raw_request("POST", "/intake/v2/events?flushed=true", b"", h))
        st, hd, _ = read_response(f)
        assert st == 202, "flushed=true on the kept-alive connection answered %s" % st
    finally:
        f.close()
        sock.close()
    t.lam.runtime_done(inv)
    t_next = t.lam.finish(inv)
    for i, tx in enumerate((tx1, tx2, tx3), 1):
        req = first_delivery(t.apm, tx)
        assert req is not None and req.t_end <= t_next, "request %d not delivered" % i


@scenario()
def flags_version_and_help(t):
    """--version prints the version, --help (and -h) a short usage; both exit 0 (README)."""
    outs = {}
    for flag in ("--version", "--help", "-h"):
        r = subprocess.run([t.binary, flag], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=60)
        assert r.returncode == 0, "%s: exit %s, want 0 (stderr %r)" % (
            flag, r.returncode, r.stderr[-300:])
        outs[flag] = r.stdout.decode("utf-8", "replace")
    version = outs["--version"]
    assert version.endswith("\n") and version.count("\n") == 1 and " " in version, \
        "--version printed %r, want one line: name and version" % version
    assert outs["--help"] == outs["-h"], "--help and -h differ"
    assert outs["--help"].startswith(version.rstrip("\n") + ":") and \
        "--version, --help" in outs["--help"], "--help printed %r" % outs["--help"][:300]


@scenario(env={"ELASTIC_APM_LAMBDA_APM_SERVER": None})
def missing_server_url(t):
    """No server URL: registers, answers agents 202, one error logged, exits 0."""
    t.start()
    for i in range(2):
        inv = t.lam.invoke()
        lines, tx = agent_payload(inv)
        assert agent_send(t.port, lines) == 202, "agent POST without a server URL"
        assert agent_flush(t.port) == 202
        t.lam.runtime_done(inv)
        t.lam.finish(inv, timeout=5)
    t.shutdown_ok()
    errs = [r for r in t.logs() if str(r.get("level", "")).lower() in ("error", "critical")]
    assert len(errs) == 1, "want one error line for the missing server URL, got %d: %r" % (
        len(errs), errs[:3])
    assert not t.apm.requests, "the fake APM server was contacted"


@scenario(env={"ELASTIC_APM_DATA_FORWARDER_TIMEOUT": "banana"})
def malformed_setting(t):
    """ELASTIC_APM_DATA_FORWARDER_TIMEOUT=banana: a warning naming it; still works."""
    t.start()
    warns = log_has(t.logs(), ("warn", "warning"), "ELASTIC_APM_DATA_FORWARDER_TIMEOUT")
    assert warns, "no warning naming ELASTIC_APM_DATA_FORWARDER_TIMEOUT in the log"
    lines, tx = agent_payload()
    inv, t_flush, t_next, sent = t.sync_invocation([lines])
    req = first_delivery(t.apm, tx)
    assert req is not None and req.t_end <= t_next, "not delivered with a malformed setting"


# ---- beyond the list: the Lambda lifecycle, the receiver, forwarding

@scenario()
def timeout_reports_registered_transaction(t):
    """Function timeout after /register/transaction: we send it, result timeout, outcome failure."""
    t.start()
    inv = t.lam.invoke(timeout_ms=1000)
    tx = make_transaction(request_id=inv.request_id, duration=0)  # as started
    del tx["transaction"]["outcome"], tx["transaction"]["result"]
    st, _, _ = http_request(t.port, "POST", "/register/transaction",
                            ndjson([make_metadata(), tx]),
                            {"Content-Type": "application/vnd.elastic.apm.transaction+ndjson",
                             "x-elastic-aws-request-id": inv.request_id})
    assert st == 200, "register answered %s" % st
    t_invoke = inv.t_invoke
    code, t_exit, killed = t.lam.timeout(inv)
    t.shut_down = True
    assert code == 0 and not killed, "exit %s, killed=%s" % (code, killed)
    got = [o for o in t.apm.events("transaction") if o["id"] == tx_of(tx)["id"]]
    assert len(got) == 1, "registered transaction delivered %d times after a timeout" % len(got)
    o = got[0]
    assert o.get("outcome") == "failure", "outcome %r, want failure" % o.get("outcome")
    assert o.get("result") == "timeout", "result %r, want timeout" % o.get("result")
    elapsed_ms = (inv.t_runtime_done - t_invoke) * 1000
    assert 1000 - 250 <= o["duration"] <= elapsed_ms + 250, \
        "duration %r ms, the invocation timed out after %.0f ms" % (o["duration"], elapsed_ms)


@scenario()
def function_logs_forwarded(t):
    """A function log line from telemetry reaches the APM server as a log event."""
    t.start()
    inv = t.lam.invoke()
    t.lam.log_line("2024-01-01T00:00:00.000Z\t%s\tINFO\thello from the function\n"
                   % inv.request_id, inv.request_id)
    t.lam.wait_telemetry_idle()
    assert agent_flush(t.port) == 202
    t.lam.runtime_done(inv)
    t.lam.finish(inv)
    t.shutdown_ok()
    logs = [o for o in t.apm.events("log") if "hello from the function" in json.dumps(o)]
    assert logs, "function log line not forwarded (log events seen: %d)" % t.apm.count("log")
    # a function log line is not a platform.logsDropped record
    dropped = log_has(t.logs(), ("warn", "warning", "error"), "dropped telemetry")
    assert not dropped, "a function log line was taken for dropped records: %s" % dropped[:2]


@scenario()
def platform_report_metrics(t):
    """platform.report becomes metrics at the APM server (by shutdown at the latest)."""
    t.start()
    for _ in range(2):
        lines, _ = agent_payload()
        t.sync_invocation([lines])
    t.shutdown_ok()
    assert t.apm.count("metricset") >= 1, "no metricset from platform.report"


@scenario()
def receiver_loopback_only(t):
    """The receiver answers on 127.0.0.1 and ::1 (when the host has it), nothing else."""
    t.start()
    try:
        with socket.socket(socket.AF_INET6) as s6:
            s6.bind(("::1", 0))
        have6 = True
    except OSError:
        have6 = False
    inv = t.lam.invoke()
    lines, tx = agent_payload(inv)
    if have6:
        assert agent_send(t.port, lines, host="::1") == 202, "::1 not served"
    else:
        assert agent_send(t.port, lines) == 202
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        try:
            u.connect(("10.255.255.255", 1))
            other = u.getsockname()[0]
        except OSError:
            other = None
    if other and not other.startswith("127."):
        try:
            socket.create_connection((other, t.port), timeout=2).close()
            raise AssertionError("receiver also listens on %s" % other)
        except (ConnectionRefusedError, socket.timeout):
            pass
    assert agent_flush(t.port) == 202
    t.lam.runtime_done(inv)
    t_next = t.lam.finish(inv)
    req = first_delivery(t.apm, tx)
    assert req is not None and req.t_end <= t_next, "not delivered before /next"


# --------------------------------------------------------------- runner

class Skip(Exception):
    """Raised by a scenario that cannot run here (e.g. it needs root for a
    mount namespace): reported as SKIP with the reason, counted as skipped,
    never as passed."""


def load_extra_modules():
    for path in sorted(glob.glob(os.path.join(HERE, "e2e_*.py"))):
        importlib.import_module(os.path.splitext(os.path.basename(path))[0])


def run_one(sc, binary, log_lines):
    from fake_apm import FakeAPM
    t0 = time.monotonic()
    lam = FakeLambda(telemetry=sc.telemetry)
    apm = None
    t = None
    try:
        apm = FakeAPM(**sc.apm)
        t = Context(binary, sc, lam, apm)
        sc.func(t)
        if lam.ext_proc is not None and lam.ext_proc.poll() is None and sc.auto_shutdown:
            t.shutdown_ok()
        assert not lam.protocol_errors, "Lambda API misuse: %s" % "; ".join(
            lam.protocol_errors[:5])
        lam.ext_logs()
        if not sc.allow_apm_errors:
            assert not apm.errors, "APM server rejected payloads: %s" % "; ".join(
                apm.errors[:5])
        return True, "PASS %s (%.1fs)" % (sc.name, time.monotonic() - t0)
    except Skip as e:
        return None, "SKIP %s: %s" % (sc.name, e)
    except Exception as e:
        if isinstance(e, AssertionError):
            reason = str(e) or "assertion failed"
            tb = traceback.extract_tb(e.__traceback__)
            here = [fr for fr in tb if fr.filename.startswith(TEST)]
            if here:
                reason += " [%s:%d]" % (os.path.basename(here[-1].filename), here[-1].lineno)
        else:
            reason = "%s: %s\n%s" % (type(e).__name__, e, traceback.format_exc())
        tail = lam.ext_log_tail(log_lines) if lam.ext_log_path else "(extension not started)"
        msg = "FAIL %s: %s" % (sc.name, reason.strip().replace("\n", "\n    "))
        if tail:
            msg += "\n    --- extension log (last %d lines) ---\n    " % log_lines + \
                tail.replace("\n", "\n    ")
        return False, msg
    finally:
        lam.close()
        if apm is not None:
            apm.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description="apm-ext end-to-end scenarios")
    ap.add_argument("--binary", default=os.path.join(ROOT, "apm-ext"))
    ap.add_argument("-k", dest="substr", action="append", default=[],
                    help="only scenarios whose name contains this (repeatable: any)")
    ap.add_argument("--list", action="store_true", help="list scenario names and exit")
    ap.add_argument("--log-lines", type=int, default=25, help="log tail shown on failure")
    ap.add_argument("--env", action="append", default=[], metavar="K=V",
                    help="extra environment for the extension in every scenario")
    args = ap.parse_args(argv)
    load_extra_modules()
    chosen = [s for s in SCENARIOS
              if not args.substr or any(k in s.name for k in args.substr)]
    if args.list:
        for s in chosen:
            doc = (s.func.__doc__ or "").strip().splitlines()
            print("%-36s %s" % (s.name, doc[0] if doc else ""))
        return 0
    for kv in args.env:
        k, _, v = kv.partition("=")
        EXTRA_ENV[k] = v
    binary = os.path.abspath(args.binary)
    if not os.access(binary, os.X_OK):
        print("FAIL setup: %s is not an executable (build it with make)" % binary)
        print("0 passed, %d failed" % len(chosen))
        return 1
    passed = failed = skipped = 0
    for sc in chosen:
        ok, line = run_one(sc, binary, args.log_lines)
        print(line, flush=True)
        if ok is None:
            skipped += 1
        elif ok:
            passed += 1
        else:
            failed += 1
    print("%d passed, %d failed%s" % (passed, failed,
                                      ", %d skipped" % skipped if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
