"""End-to-end scenarios with the real OpenTelemetry JS SDK (OTLP/HTTP).

    npm ci --prefix test/otel          # once: the OpenTelemetry packages, pinned
    python3 test/e2e/e2e.py -k otel

Each scenario runs the real chain: FakeLambda starts ./apm-ext (its OTLP/HTTP
listener on a free port, APM_EXT_OTLP_PORT), then test/node/runtime.js (the
minimal Lambda runtime the Elastic agent scenarios use; it loads
LAMBDA_TASK_ROOT/<_HANDLER module>) with LAMBDA_TASK_ROOT=test/otel and
NODE_OPTIONS="-r test/otel/otel-init.js": the SDK's tracer, meter and logger
providers with OTLP/HTTP exporters pointed at http://localhost:<port>, and
@opentelemetry/instrumentation-aws-lambda registered before the runtime
requires test/otel/handler.js, so that it wraps the handler as in Lambda
(the invocation's SERVER span, force-flush of traces and metrics before the
result goes to the runtime). The handler writes what it made (span ids, log
records, the invocation counter's value) to a file; the scenarios match it,
item by item, against what the fake APM server got at /v1/traces, /v1/metrics
and /v1/logs: nothing missing, nothing twice, nothing else; every OTLP request
with the extension's Authorization, `User-Agent: apm-ext/<v> (<the SDK's>)`,
the SDK's Content-Type and Content-Encoding, chunked. The SDK's own
diagnostics ("otel-diag: warn|error" lines in the runtime's log) must be
empty. With syncflush, an invocation's data must have been answered by the
APM server before the extension's /next that ends it.

The otel_sdk_direct_* scenarios check the test bed itself: the SDK posts
straight to the fake APM server (no extension in the OTLP path), so that the
fake's protobuf and JSON readers meet the SDK's real bytes.

OtelFunction below is the reusable piece (test/e2e/demo.py uses it too).
"""

import collections
import gzip
import http.client
import ipaddress
import json
import os
import re
import shutil
import socket
import time

from e2e import scenario, TEST, Skip, free_port, agent_payload
from e2e_agent import (NodeFunction, run_function, Seen, check_requests, check_invocation,
                       check_nothing_else, check_agent_log, agent_version,
                       node_setup_error, crash_report, NODE_DIR)
from fake_apm import pb_len, pb_int, pb_fixed64

OTEL_DIR = os.path.join(TEST, "otel")
OTEL_MODULES = os.path.join(OTEL_DIR, "node_modules")
OTEL_INIT = os.path.join(OTEL_DIR, "otel-init.js")
EXPORTER_PKG = os.path.join(OTEL_MODULES, "@opentelemetry", "exporter-trace-otlp-proto",
                            "package.json")
FUNCTION_NAME = "test-fn"
COUNTER = "apm_ext_test.invocations"
LAMBDA_SCOPE = "@opentelemetry/instrumentation-aws-lambda"
SERVER_KIND = 2                     # Span.SpanKind SPAN_KIND_SERVER
STATUS_ERROR = 2                    # Status.StatusCode STATUS_CODE_ERROR
CTYPES = {"http/protobuf": "application/x-protobuf", "http/json": "application/json"}
SDK_TROUBLE = re.compile(r"otel-diag: (warn|error) ")
NOT_HELD_S = 0.5                    # /next this soon after the end = not held


def otel_setup_error():
    """Why the OpenTelemetry SDK cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed (the OpenTelemetry scenarios need node >= 18.19)"
    if not os.path.exists(EXPORTER_PKG):
        return "test/otel/node_modules is missing: run npm ci --prefix test/otel"
    return None


def sdk_version():
    with open(EXPORTER_PKG, encoding="utf-8") as f:
        return json.load(f)["version"]


def sdk_user_agent():
    """What the OTLP exporters send as User-Agent."""
    return "OTel-OTLP-Exporter-JavaScript/%s" % sdk_version()


class OtelFunction(NodeFunction):
    """The function: test/node/runtime.js + test/otel/handler.js + the
    OpenTelemetry SDK (test/otel/otel-init.js), run by a FakeLambda.

        fn = OtelFunction(lam, otlp_port, protocol="http/protobuf", compression="gzip")
        fn.start()                         # init: SDK set-up, runtime's first /next
        inv = fn.invoke({"spans": 5})      # invoke, wait for both /next, freeze
        fn.records(inv.request_id)         # what the handler recorded
        fn.sdk_trouble()                   # the SDK's warn/error diagnostics

    endpoint: where the SDK sends (default http://localhost:<otlp_port>, the
    extension); signals: "traces,metrics,logs" by default."""

    def __init__(self, lam, otlp_port, protocol="http/protobuf", compression="gzip",
                 env=None, endpoint=None, signals=None, log_level="warn"):
        super().__init__(lam, 0)
        self.protocol, self.compression = protocol, compression
        self.env = {
            "_HANDLER": "handler.main",
            "LAMBDA_TASK_ROOT": OTEL_DIR,
            "NODE_OPTIONS": "-r " + OTEL_INIT,
            "AWS_EXECUTION_ENV": "AWS_Lambda_nodejs20.x",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint or "http://localhost:%d" % otlp_port,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_COMPRESSION": compression,
            "OTEL_SERVICE_NAME": FUNCTION_NAME,
            "OTEL_LOG_LEVEL": log_level,
            "APM_TEST_OTEL_SIGNALS": signals or "traces,metrics,logs",
            "APM_TEST_RECORD": self.record_path,
        }
        self.env.update(env or {})

    def setup_error(self):
        return otel_setup_error()

    def sdk_trouble(self):
        """The SDK's warn and error diagnostics (otel-init.js prints them)."""
        return [ln[:400] for ln in self.log_text().splitlines() if SDK_TROUBLE.match(ln)]

    def log_tail(self, n=15):
        lines = [ln[:400] for ln in self.log_text().splitlines()]
        return "    --- Node runtime log (last %d lines) ---\n    %s" % (
            n, "\n    ".join(lines[-n:]))


# ------------------------------------------------------------------ matching

class OtelSeen:
    """What the fake APM server accepted over OTLP (answered 200)."""

    def __init__(self, apm, keep=None):
        self.apm = apm
        self.requests = [r for r in apm.otlp_requests() if keep is None or keep(r)]
        self.delivered = [r for r in self.requests if r.method == "POST" and r.delivered]
        self.spans = collections.defaultdict(list)    # span id -> [(span, request)]
        self.logs = collections.defaultdict(list)     # body -> [(record, request)]
        self.counter = collections.defaultdict(list)  # counter value -> [request]
        self.metric_names = collections.Counter()
        for r in self.delivered:
            for x in r.otlp_items:
                if r.signal == "traces":
                    self.spans[x["span_id"]].append((x, r))
                elif r.signal == "logs":
                    self.logs[x["body"]].append((x, r))
                else:
                    self.metric_names[x["name"]] += 1
                    if x["name"] == COUNTER:
                        for p in x["points"]:
                            self.counter[p.get("value")].append(r)

    def spans_of_trace(self, trace_id):
        return [(i, lst) for i, lst in self.spans.items() if lst[0][0]["trace_id"] == trace_id]


def check_otlp_requests(seen, fn, token=None, api_key=None, statuses=(200,), what=""):
    """Every OTLP request at the APM server came from the extension for the
    SDK: POST, its Content-Type and Content-Encoding, chunked, the
    extension's Authorization, User-Agent apm-ext/<v> (<the SDK's>), and
    was answered with one of `statuses`, valid."""
    assert seen.requests, "%sno OTLP request reached the APM server" % what
    ctype = CTYPES[fn.protocol]
    enc = "gzip" if fn.compression == "gzip" else None
    ua_sdk = sdk_user_agent()
    for r in seen.requests:
        assert r.method == "POST", "%s%r: method %s" % (what, r, r.method)
        assert r.content_type == ctype, "%s%r: Content-Type %r, the SDK sent %s" % (
            what, r, r.headers.get("Content-Type"), ctype)
        assert (r.encoding or None) == enc or (enc is None and r.encoding == "identity"), \
            "%s%r: Content-Encoding %r, the SDK sent %r" % (what, r, r.encoding, enc)
        assert r.chunked, "%s%r: not chunked upstream" % (what, r)
        ua = r.user_agent or ""
        assert re.match(r"apm-ext/\S+ \(", ua) and ua.endswith("(%s)" % ua_sdk), \
            "%s%r: User-Agent %r, want apm-ext/<v> (%s)" % (what, r, ua, ua_sdk)
        want_auth = "ApiKey " + api_key if api_key else "Bearer " + token if token else None
        assert r.auth == want_auth, "%s%r: Authorization %r, want the extension's %r" % (
            what, r, r.auth, want_auth)
        assert r.status in statuses and r.io_error is None, \
            "%s%r answered %s (io error %s; errors %s)" % (what, r, r.status, r.io_error,
                                                           r.errors[:3])
        assert not r.errors, "%s%r: %s" % (what, r, r.errors[:3])


def check_otel_invocation(seen, fn, inv, by=None, lost_ok=False, ended=True, failed=False,
                          coldstart=None, logs=True, metrics=True, what=None):
    """Match one invocation's records against what the APM server accepted:
    each span, log record and the counter's value exactly once (lost_ok:
    may be missing, never twice), the instrumentation's invocation span once
    when the invocation ended (ended; failed: with status error), nothing
    else in its trace; by: every request carrying its data was answered by
    then (monotonic time)."""
    rid = inv.request_id
    what = what or "invocation %s" % rid[:8]
    recs = fn.records(rid)
    ir = [r for r in recs if r["kind"] == "invocation"]
    assert len(ir) == 1, "%s: the handler recorded %d invocation spans (did the aws-lambda " \
        "instrumentation wrap it?)\n%s" % (what, len(ir), fn.log_tail())
    ir = ir[0]
    reqs = {}

    def once(lst, desc):
        if not lst and lost_ok:
            return None
        assert lst, "%s: %s never arrived" % (what, desc)
        assert len(lst) == 1, "%s: %s arrived %d times" % (what, desc, len(lst))
        return lst[0]

    got = seen.spans.get(ir["id"], [])
    if ended:
        s, r = once(got, "the invocation span %s" % ir["id"]) or (None, None)
        if s is not None:
            reqs[id(r)] = r
            assert s["trace_id"] == ir["trace_id"] and s["parent_id"] is None, \
                "%s: invocation span in trace %s parent %s, recorded %s (root)" % (
                    what, s["trace_id"], s["parent_id"], ir["trace_id"])
            assert s["kind"] == SERVER_KIND and s["scope"] == LAMBDA_SCOPE, \
                "%s: invocation span kind %s scope %r, want SERVER from %s" % (
                    what, s["kind"], s["scope"], LAMBDA_SCOPE)
            assert s["attributes"].get("faas.invocation_id") == rid, \
                "%s: invocation span faas.invocation_id %r" % (
                    what, s["attributes"].get("faas.invocation_id"))
            assert s["service"] == FUNCTION_NAME, "%s: service.name %r" % (what, s["service"])
            if coldstart is not None:
                assert s["attributes"].get("faas.coldstart") is coldstart, \
                    "%s: faas.coldstart %r, want %r" % (
                        what, s["attributes"].get("faas.coldstart"), coldstart)
            want_status = STATUS_ERROR if failed else 0
            assert s["status"] == want_status, "%s: invocation span status %s, want %s" % (
                what, s["status"], want_status)
    else:
        assert not got, "%s: the invocation span %s arrived, yet the invocation never " \
            "ended (it cannot have been exported)" % (what, ir["id"])
    known = {ir["id"]}
    for sr in (r for r in recs if r["kind"] == "span"):
        known.add(sr["id"])
        hit = once(seen.spans.get(sr["id"], []), "span %s (%s)" % (sr["id"], sr["name"]))
        if hit is None:
            continue
        s, r = hit
        reqs[id(r)] = r
        for k, rk in (("trace_id", "trace_id"), ("parent_id", "parent_id"), ("name", "name")):
            assert s[k] == sr[rk], "%s: span %s %s %r, the handler made %r" % (
                what, sr["id"], k, s[k], sr[rk])
        assert s["service"] == FUNCTION_NAME, "%s: span %s service.name %r" % (
            what, sr["id"], s["service"])
    for i, lst in seen.spans_of_trace(ir["trace_id"]):
        assert i in known, "%s: a span the handler did not make arrived in its trace: %s" % (
            what, json.dumps(lst[0][0], default=repr)[:400])
    if logs:
        for lr in (r for r in recs if r["kind"] == "log"):
            hit = once(seen.logs.get(lr["body"], []), "log record %r" % lr["body"])
            if hit is None:
                continue
            x, r = hit
            reqs[id(r)] = r
            assert (x["trace_id"], x["span_id"]) == (lr["trace_id"], lr["span_id"]), \
                "%s: log record %r in trace %s span %s, emitted in %s %s" % (
                    what, lr["body"], x["trace_id"], x["span_id"], lr["trace_id"],
                    lr["span_id"])
    if metrics:
        for mr in (r for r in recs if r["kind"] == "metric"):
            r = once(seen.counter.get(float(mr["value"]), []),
                     "the counter %s = %s" % (mr["name"], mr["value"]))
            if r is not None:
                reqs[id(r)] = r
    if by is not None:
        late = [r for r in reqs.values() if r.t_end > by]
        assert not late, "%s: %d OTLP request(s) with its data answered %.3fs after the " \
            "extension's /next (syncflush)" % (what, len(late),
                                               max(r.t_end for r in late) - by)


def check_otel_nothing_else(seen, fn, logs=True):
    """Every span and log record the APM server accepted was made by the
    handler (or is an invocation span), and came once."""
    recs = fn.records()
    ids = {r["id"] for r in recs if r["kind"] in ("span", "invocation")}
    for i, lst in seen.spans.items():
        assert len(lst) == 1, "span %s (%s) arrived %d times" % (i, lst[0][0]["name"], len(lst))
        assert i in ids, "a span nobody made arrived: %s" % json.dumps(lst[0][0],
                                                                       default=repr)[:400]
    if logs:
        bodies = {r["body"] for r in recs if r["kind"] == "log"}
        for body, lst in seen.logs.items():
            assert len(lst) == 1, "log record %r arrived %d times" % (body, len(lst))
            assert body in bodies, "a log record nobody emitted arrived: %r" % (body,)
    for value, lst in seen.counter.items():
        assert len(lst) == 1, "the counter's value %s arrived %d times" % (value, len(lst))


def check_sdk_log(fn, what=""):
    bad = fn.sdk_trouble()
    assert not bad, "%sthe OpenTelemetry SDK reported trouble:\n    %s" % (
        what, "\n    ".join(bad[:5]))


def check_platform_metrics(t, invs):
    """Each invocation's platform.report became a metricset at the intake
    API (/intake/v2/events), whatever protocol the function uses."""
    have = {(m.get("faas") or {}).get("execution") for m in t.apm.events("metricset")}
    missing = [inv.request_id for inv in invs if inv.request_id not in have]
    assert not missing, "no platform metricset at the intake API for %d of %d invocations " \
        "(%s)" % (len(missing), len(invs), ", ".join(m[:8] for m in missing))


# ------------------------------------------------------------------ helpers

def otlp_port_for(t):
    """The scenario's free port for APM_EXT_OTLP_PORT (the Context's t.oport)."""
    if getattr(t, "oport", None):
        return t.oport
    while True:
        p = free_port()
        if p not in (t.port, t.tport):
            return p


def listening(pid):
    """{(address, port)} of the TCP sockets process pid listens on."""
    inodes = set()
    fd_dir = "/proc/%d/fd" % pid
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for path, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            with open(path) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            parts = row.split()
            if parts[3] != "0A" or parts[9] not in inodes:   # 0A: LISTEN
                continue
            addr_hex, port_hex = parts[1].split(":")
            raw = bytes.fromhex(addr_hex)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            out.add((str(ipaddress.ip_address(raw)), int(port_hex, 16)))
    return out


def port_free(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def have_ipv6():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def raw_exchange(port, data, host="127.0.0.1", timeout=5.0):
    """Send bytes, read until the peer closes or goes quiet after an answer:
    (status or None, headers, body, closed)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(data)
        buf, closed = b"", False
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                closed = True
                break
            except socket.timeout:
                break
            if not chunk:
                closed = True
                break
            buf += chunk
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep:
                m = re.search(rb"content-length:\s*(\d+)", head, re.I)
                if m and len(body) >= int(m.group(1)):
                    break
    head, _, body = buf.partition(b"\r\n\r\n")
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", head)
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    return (int(m.group(1)) if m else None), headers, body, closed


def otlp_post(port, signal, body, ctype, encoding=None, chunked=False, host="127.0.0.1",
              user_agent="test-exporter/1.0", path=None):
    """POST an OTLP export to the extension; (status, headers, body)."""
    c = http.client.HTTPConnection(host, port, timeout=10)
    try:
        h = {"Content-Type": ctype, "User-Agent": user_agent}
        if encoding:
            h["Content-Encoding"] = encoding
        path = path or "/v1/" + signal
        if chunked:
            c.putrequest("POST", path, skip_accept_encoding=True)
            for k, v in h.items():
                c.putheader(k, v)
            c.putheader("Transfer-Encoding", "chunked")
            c.endheaders()
            for i in range(0, len(body), 100):
                piece = body[i:i + 100]
                c.send(b"%x\r\n" % len(piece) + piece + b"\r\n")
            c.send(b"0\r\n\r\n")
        else:
            c.request("POST", path, body=body, headers=h)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def pb_span_request(service, spans):
    """An ExportTraceServiceRequest: spans [(trace id hex, span id hex, parent
    hex or None, name)] of one resource (service.name) and scope."""
    body = b""
    for trace_id, span_id, parent, name in spans:
        sp = pb_len(1, bytes.fromhex(trace_id)) + pb_len(2, bytes.fromhex(span_id))
        if parent:
            sp += pb_len(4, bytes.fromhex(parent))
        sp += pb_len(5, name) + pb_int(6, 1) + pb_fixed64(7, 1700000000000000000) + \
            pb_fixed64(8, 1700000000001000000)
        body += pb_len(2, sp)
    resource = pb_len(1, pb_len(1, "service.name") + pb_len(2, pb_len(1, service)))
    scope = pb_len(1, pb_len(1, "raw-test"))
    return pb_len(1, pb_len(1, resource) + pb_len(2, scope + body))


def json_span_request(service, spans):
    return json.dumps({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name",
                                     "value": {"stringValue": service}}]},
        "scopeSpans": [{"scope": {"name": "raw-test"}, "spans": [
            dict({"traceId": t, "spanId": s, "name": n, "kind": 1,
                  "startTimeUnixNano": "1700000000000000000",
                  "endTimeUnixNano": "1700000000001000000"},
                 **({"parentSpanId": p} if p else {}))
            for t, s, p, n in spans]}]}]}).encode()


def _ids():
    return os.urandom(16).hex(), os.urandom(8).hex()


# ------------------------------------------------------------------ scenarios

def otel_scenario(name=None, protocol="http/protobuf", compression="gzip", fn_env=None,
                  start=True, direct=False, **kw):
    """@scenario for a real-SDK test: f(t, fn). The extension is started with
    APM_EXT_OTLP_PORT on a free port (t.otlp_port) and the Node function
    (OtelFunction: protocol, compression, fn_env) initialised (start) before
    f runs. direct: the SDK sends straight to the fake APM server."""
    def deco(func):
        def run(t):
            err = otel_setup_error()
            assert err is None, err
            t.otlp_port = otlp_port_for(t)
            t.start(env={"APM_EXT_OTLP_PORT": str(t.otlp_port)})
            fn = OtelFunction(t.lam, t.otlp_port, protocol, compression, fn_env,
                              endpoint=t.apm.url if direct else None)
            run_function(t, fn, func, start)
        run.__name__ = name or func.__name__
        run.__doc__ = func.__doc__
        return scenario(name or func.__name__, **kw)(run)
    return deco


def _direct(t, fn):
    invs = [fn.invoke({"spans": 3 + i, "logs": 2}) for i in range(3)]
    for i, inv in enumerate(invs):
        assert inv.status == "success", "invocation %d: %s %r" % (i, inv.status, inv.response)
    t.shutdown_ok()
    seen = OtelSeen(t.apm)
    for r in seen.requests:
        assert r.status == 200 and not r.errors, "%r: %s %s" % (r, r.status, r.errors[:3])
        assert r.content_type == CTYPES[fn.protocol], "%r: Content-Type %r" % (
            r, r.content_type)
        assert (r.user_agent or "") == sdk_user_agent(), "%r: User-Agent %r" % (
            r, r.user_agent)
    assert {r.signal for r in seen.delivered} == {"traces", "metrics", "logs"}, \
        "signals delivered: %s" % sorted({r.signal for r in seen.delivered})
    for i, inv in enumerate(invs):
        # the SDK's export is answered before the handler's result goes out
        check_otel_invocation(seen, fn, inv, by=inv.t_runtime_done, coldstart=(i == 0),
                              what="invocation %d" % (i + 1))
    check_otel_nothing_else(seen, fn)
    check_sdk_log(fn)


@otel_scenario(direct=True)
def otel_sdk_direct_proto(t, fn):
    """Test bed: the SDK's protobuf (gzip) straight to the fake APM server parses, item by item."""
    _direct(t, fn)


@otel_scenario(direct=True, protocol="http/json", compression="none")
def otel_sdk_direct_json(t, fn):
    """Test bed: the SDK's OTLP/JSON straight to the fake APM server parses, item by item."""
    _direct(t, fn)


@otel_scenario(apm={"token": "s3cret-token"},
               fn_env={"OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20sdk-side-token"})
def otel_proto_cold_and_warm(t, fn):
    """Protobuf+gzip: cold start and 3 warm invocations, each item once before /next."""
    invs = []
    for i in range(4):
        inv = fn.invoke({"spans": 3 + 2 * i, "logs": 2}, finish=False)
        if i == 1:   # a function log line: to the intake API, as always
            t.lam.log_line("2024-01-01T00:00:00.000Z\t%s\tINFO\thello from an OTel "
                           "function\n" % inv.request_id, inv.request_id)
        fn.finish(inv)
        invs.append(inv)
        assert t.lam.frozen and t.lam.freezes == i + 1, "sandbox not frozen after %d" % i
        assert inv.status == "success", "invocation %d: %s %r" % (i, inv.status, inv.response)
        check_otel_invocation(OtelSeen(t.apm), fn, inv, by=inv.t_end, coldstart=(i == 0),
                              what="invocation %d" % (i + 1))
    t.shutdown_ok()
    seen = OtelSeen(t.apm)
    check_otlp_requests(seen, fn, token="s3cret-token")
    for i, inv in enumerate(invs):
        check_otel_invocation(seen, fn, inv, by=inv.t_end, coldstart=(i == 0),
                              what="invocation %d after shutdown" % (i + 1))
    check_otel_nothing_else(seen, fn)
    assert {r.signal for r in seen.delivered} == {"traces", "metrics", "logs"}
    check_sdk_log(fn)
    check_platform_metrics(t, invs)
    logs = [o for o in t.apm.events("log") if "hello from an OTel function" in
            json.dumps(o)]
    assert len(logs) == 1, "the function's log line reached the intake API %d times" % len(
        logs)


@otel_scenario(protocol="http/json", compression="none", apm={"api_key": "k3y"})
def otel_json(t, fn):
    """OTLP/JSON, identity: cold start and 3 warm invocations, each item once before /next."""
    invs = []
    for i in range(4):
        inv = fn.invoke({"spans": 2 + i, "logs": 1})
        invs.append(inv)
        assert inv.status == "success", "invocation %d: %s %r" % (i, inv.status, inv.response)
    t.shutdown_ok()
    seen = OtelSeen(t.apm)
    check_otlp_requests(seen, fn, api_key="k3y")
    for i, inv in enumerate(invs):
        check_otel_invocation(seen, fn, inv, by=inv.t_end, coldstart=(i == 0),
                              what="invocation %d" % (i + 1))
    check_otel_nothing_else(seen, fn)
    check_sdk_log(fn)
    check_platform_metrics(t, invs)


@otel_scenario(apm={"token": "tok"})
def otel_failing_handler(t, fn):
    """A handler that throws: its invocation span (status error) and spans once, before /next."""
    ok = fn.invoke({"spans": 2})
    bad = fn.invoke({"spans": 3, "action": "fail"})
    assert bad.status == "error", "failing invocation: %s %r" % (bad.status, bad.response)
    t.shutdown_ok()
    seen = OtelSeen(t.apm)
    check_otlp_requests(seen, fn, token="tok")
    check_otel_invocation(seen, fn, ok, by=ok.t_end, what="first invocation")
    check_otel_invocation(seen, fn, bad, by=bad.t_end, failed=True, what="failing invocation")
    check_otel_nothing_else(seen, fn)
    check_sdk_log(fn)


@otel_scenario(env={"ELASTIC_APM_DATA_FORWARDER_TIMEOUT": "5s"},
               fn_env={"OTEL_BSP_MAX_QUEUE_SIZE": "8192"})   # the SDK's own queue: 2048
def otel_large_invocation(t, fn):
    """3000 spans of 300 bytes (exports > 32 KiB, streamed upstream): all once, before /next."""
    small = fn.invoke({"spans": 2})
    inv = fn.invoke({"spans": 3000, "pad": 300, "logs": 50}, timeout_ms=30000, timeout=60)
    assert inv.status == "success", "large invocation: %s %r" % (inv.status, inv.response)
    t.shutdown_ok()
    seen = OtelSeen(t.apm)
    check_otlp_requests(seen, fn)
    check_otel_invocation(seen, fn, small, by=small.t_end, what="warm-up")
    check_otel_invocation(seen, fn, inv, by=inv.t_end, what="large invocation")
    big = [r for r in seen.delivered if r.signal == "traces" and len(r.body) > 32768]
    assert len(big) >= 2, "only %d span exports over 32 KiB: too small to test streaming" % (
        len(big))
    check_otel_nothing_else(seen, fn)
    check_sdk_log(fn)


@otel_scenario()
def otel_timeout(t, fn):
    """Sleeps past its deadline after a flush: what the SDK flushed arrives once; exit 0."""
    first = fn.invoke({"spans": 2})
    inv = fn.invoke({"action": "sleep", "spans": 4, "logs": 2}, timeout_ms=1500, finish=False)
    fn.wait_phase(inv, "sleeping")
    code, t_exit, killed = t.lam.timeout(inv)
    t.shut_down = True
    assert code == 0 and not killed, "extension exit %s, killed=%s after a timeout" % (
        code, killed)
    seen = OtelSeen(t.apm)
    check_otlp_requests(seen, fn)
    check_otel_invocation(seen, fn, first, by=first.t_end, coldstart=True,
                          what="first invocation")
    check_otel_invocation(seen, fn, inv, by=t_exit, ended=False, what="timed-out invocation")
    check_otel_nothing_else(seen, fn)
    check_sdk_log(fn)


@otel_scenario()
def otel_crash(t, fn):
    """process.exit(1) after a flush: what the SDK flushed arrives once; exit 0."""
    first = fn.invoke({"spans": 2})
    inv = fn.invoke({"action": "crash", "spans": 3, "logs": 1}, finish=False)
    code = fn.wait_exit()
    assert code == 1, "runtime exit code %s, want 1" % code
    crash_report(t.lam, inv, "failure")
    code, t_exit, killed = t.lam.shutdown("failure")
    t.shut_down = True
    assert code == 0 and not killed, "extension exit %s, killed=%s after a crash" % (
        code, killed)
    seen = OtelSeen(t.apm)
    check_otlp_requests(seen, fn)
    check_otel_invocation(seen, fn, first, by=first.t_end, what="first invocation")
    check_otel_invocation(seen, fn, inv, by=t_exit, ended=False, what="crashed invocation")
    check_otel_nothing_else(seen, fn)
    check_sdk_log(fn)


@otel_scenario()
def otel_crash_uncaught(t, fn):
    """Uncaught exception after a flush (the runtime exits 129): flushed data once; exit 0."""
    inv = fn.invoke({"action": "throw", "spans": 3, "logs": 1}, finish=False)
    code = fn.wait_exit()
    assert code == 129, "runtime exit code %s, want 129" % code
    try:
        t.lam.wait_for(lambda lam: inv.t_runtime_done is not None, 0.5, "POST /error")
    except AssertionError:
        pass
    crash_report(t.lam, inv, inv.status or "failure")
    code, t_exit, killed = t.lam.shutdown("failure")
    t.shut_down = True
    assert code == 0 and not killed, "extension exit %s, killed=%s after a crash" % (
        code, killed)
    seen = OtelSeen(t.apm)
    check_otlp_requests(seen, fn)
    check_otel_invocation(seen, fn, inv, by=t_exit, ended=False, coldstart=True,
                          what="crashed invocation")
    check_otel_nothing_else(seen, fn)
    check_sdk_log(fn)


RECOVERY_S = 25.0
PACE_S = 0.5


@otel_scenario(apm={"token": "tok"})
def otel_server_failing_then_recovering(t, fn):
    """APM server 503 for 3 invocations (not held), then OK: every item delivered once."""
    t.apm.set_mode("status", 503)
    invs, problems = [], []
    for i in range(3):
        inv = fn.invoke({"spans": 3, "logs": 1})
        invs.append(inv)
        assert inv.status == "success", "invocation %d: %s" % (i + 1, inv.status)
        held = inv.t_end - inv.t_runtime_done
        if i > 0 and held >= NOT_HELD_S:
            problems.append("invocation %d: /next held %.0f ms while the APM server fails" % (
                i + 1, held * 1000))
    failed = [r for r in t.apm.otlp_requests() if r.status == 503]
    assert failed, "no OTLP delivery was tried while the APM server answered 503"
    t.apm.set_mode("ok")
    t_back = time.monotonic()

    def all_delivered():
        seen = OtelSeen(t.apm)
        return all(seen.spans.get(r["id"]) for r in fn.records()
                   if r["kind"] == "span")
    # Lambda's pace, not a flood: an invocation, then frozen a while (a flood
    # while the extension still counts the server as failing fills the queue,
    # which then drops the oldest, as it should)
    while not all_delivered() and time.monotonic() - t_back < RECOVERY_S:
        invs.append(fn.invoke({"spans": 1, "logs": 0}))
        with t.lam._cv:
            t.lam._cv.wait(PACE_S)
    done_before_shutdown = all_delivered()
    t.shutdown_ok()
    assert not problems, "; ".join(problems)
    assert done_before_shutdown, "%.0f s of invocations after the APM server came back, and " \
        "the spans kept while it failed were still not delivered" % RECOVERY_S
    seen = OtelSeen(t.apm)
    check_otlp_requests(seen, fn, token="tok", statuses=(200, 503))
    for i, inv in enumerate(invs):
        check_otel_invocation(seen, fn, inv, what="invocation %d" % (i + 1))
    check_otel_nothing_else(seen, fn)
    check_sdk_log(fn)


def retry_gap(t, refused_signal, what):
    """The one export answered 429 and its retry: assert the retry started no
    sooner than the Retry-After (2 s, 10% slack)."""
    reqs = sorted(t.apm.otlp_requests(), key=lambda r: r.t_start)
    refused = [r for r in reqs if r.status == 429]
    assert len(refused) == 1, "%s: want one export answered 429, got %d" % (what, len(refused))
    assert refused[0].signal == refused_signal, "setup: the 429 went to %s" % refused[0].signal
    after = [r for r in reqs if r.t_start > refused[0].t_start and r.body == refused[0].body]
    assert after, "%s: the export answered 429 was never retried" % what
    assert len(after) == 1 and after[0].delivered, "%s: retried %d times, last answered %s" % (
        what, len(after), after[-1].status)
    gap = after[0].t_start - refused[0].t_end
    between = [r for r in t.apm.requests if refused[0].t_end <= r.t_end <= after[0].t_start
               and r.status in (200, 202)]
    assert gap >= 2.0 * 0.9, "%s: retried %.2f s after a 429 with Retry-After: 2%s" % (
        what, gap, " (%d other deliveries succeeded in between: %s)" % (
            len(between), ", ".join("%s %s" % (r.path, r.status) for r in between[:3]))
        if between else "")


@otel_scenario(fn_env={"APM_TEST_OTEL_SIGNALS": "traces"})
def otel_retry_after(t, fn):
    """429 with Retry-After: 2: the export is retried no sooner than 2 s later, delivered once."""
    t.apm.retry_after = "2"
    t.apm.fail_next(1, 429, which="traces")
    inv = fn.invoke({"spans": 2, "logs": 0}, freeze=False)
    assert inv.status == "success"
    t.wait_apm(lambda a: all(OtelSeen(a).spans.get(r["id"]) for r in fn.records()
                             if r["kind"] == "span"), "the spans after the 429", timeout=15)
    t.shutdown_ok()
    retry_gap(t, "traces", "traces alone")
    seen = OtelSeen(t.apm)
    check_otlp_requests(seen, fn, statuses=(200, 429))
    check_otel_invocation(seen, fn, inv, metrics=False, logs=False)
    check_otel_nothing_else(seen, fn)


@scenario()
def otel_retry_after_concurrent(t):
    """429 Retry-After: 2 on traces, a metrics export in flight succeeds: the retry waits 2 s."""
    port = _otlp_port_scenario(t)
    t.start(env={"APM_EXT_OTLP_PORT": str(port)})
    t.apm.retry_after = "2"
    t.apm.fail_next(1, 429, which="traces")
    # the metrics export is answered 0.3 s after it is in: it succeeds after the 429
    t.apm.delay_for = lambda r: 0.3 if r.signal == "metrics" else 0
    inv = t.lam.invoke()
    tid, sid = _ids()
    traces = pb_span_request(FUNCTION_NAME, [(tid, sid, None, "rate-limited")])
    metrics = pb_len(1, pb_len(2, pb_len(2, pb_len(1, "raw.metric"))))
    assert otlp_post(port, "metrics", metrics, "application/x-protobuf")[0] == 200
    assert otlp_post(port, "traces", traces, "application/x-protobuf")[0] == 200
    t.lam.runtime_done(inv)
    t.lam.finish(inv, freeze=False)
    t.wait_apm(lambda a: [s["span_id"] for s in a.otlp_spans()] == [sid],
               "the span after the 429", timeout=15)
    t.shutdown_ok()
    metrics_req = [r for r in t.apm.otlp_requests("metrics")]
    assert len(metrics_req) == 1 and metrics_req[0].delivered, "metrics: %r" % metrics_req
    retry_gap(t, "traces", "traces with metrics in flight")


@otel_scenario(apm={"token": "tok"})
def otel_rejected_dropped(t, fn):
    """A 400 from the APM server drops that export (not retried, counted); the rest arrives."""
    t.apm.fail_next(1, 400, which="otlp")
    first = fn.invoke({"spans": 2, "logs": 0})
    second = fn.invoke({"spans": 2, "logs": 0})
    t.shutdown_ok()
    reqs = t.apm.otlp_requests()
    refused = [r for r in reqs if r.status == 400]
    assert len(refused) == 1, "want one export answered 400, got %d" % len(refused)
    bodies = [r.body for r in reqs]
    assert bodies.count(refused[0].body) == 1, "the export answered 400 was sent %d times" % (
        bodies.count(refused[0].body))
    seen = OtelSeen(t.apm)
    check_otlp_requests(seen, fn, token="tok", statuses=(200, 400))
    check_otel_invocation(seen, fn, second, by=second.t_end, what="second invocation")
    check_otel_invocation(seen, fn, first, lost_ok=True, what="first invocation")
    check_otel_nothing_else(seen, fn)
    logs = t.logs()
    exit_line = [ln for ln in logs if str(ln.get("msg", "")).startswith("exit:")]
    assert exit_line and "1 rejected" in exit_line[-1]["msg"], \
        "the exit line does not count the rejected export: %r" % (
            exit_line[-1]["msg"] if exit_line else None)


@otel_scenario()
def otel_partial_success(t, fn):
    """200 with partial_success (rejected spans): delivered, not retried; logged at debug only."""
    t.apm.otlp_partial = (2, "fake_apm: 2 items rejected for the test")
    invs = [fn.invoke({"spans": 3}) for _ in range(2)]
    t.shutdown_ok()
    seen = OtelSeen(t.apm)
    check_otlp_requests(seen, fn)
    for i, inv in enumerate(invs):
        check_otel_invocation(seen, fn, inv, by=inv.t_end, what="invocation %d" % (i + 1))
    check_otel_nothing_else(seen, fn)
    logs = t.logs()
    said = [ln for ln in logs if re.search(r"partial", str(ln.get("msg", "")), re.I)]
    assert said, "no log line about the partial success"
    loud = [ln for ln in said if ln.get("level") not in ("debug", "trace")]
    assert not loud, "partial success logged above debug: %r" % loud[:2]
    exit_line = [ln for ln in logs if str(ln.get("msg", "")).startswith("exit:")]
    assert exit_line and "0 dropped, 0 rejected" in exit_line[-1]["msg"], \
        "exit line %r" % (exit_line[-1]["msg"] if exit_line else None)


@scenario()
def otel_partial_success_json(t):
    """OTLP/JSON: an answer {} is a plain success (no partial-success line); partialSuccess is."""
    port = _otlp_port_scenario(t)
    t.start(env={"APM_EXT_OTLP_PORT": str(port)})

    def export(name):
        tid, sid = _ids()
        inv = t.lam.invoke()
        st = otlp_post(port, "traces", json_span_request(FUNCTION_NAME, [(tid, sid, None, name)]),
                       "application/json")[0]
        assert st == 200, "export answered %s" % st
        t.lam.runtime_done(inv)
        t.lam.finish(inv)
        return sid

    def partial_lines():
        return [ln for ln in t.logs() if re.search(r"partial", str(ln.get("msg", "")), re.I)]
    first = export("plain")
    plain = partial_lines()
    t.apm.otlp_partial = (1, "fake_apm: 1 span rejected for the test")
    second = export("partial")
    after = partial_lines()
    t.shutdown_ok()
    assert t.apm.otlp_span_counts() == {first: 1, second: 1}, "spans delivered: %r" % (
        t.apm.otlp_span_counts())
    assert len(after) > len(plain), "no log line about the partial success in the answer %r" % (
        t.apm.otlp_requests()[-1].status,)
    assert all(ln.get("level") in ("debug", "trace") for ln in after), \
        "partial success logged above debug: %r" % after
    assert not plain, "the answer {} (no partial_success) was logged as a partial success: " \
        "%r" % plain[0].get("msg")


@otel_scenario(env={"ELASTIC_APM_SEND_STRATEGY": "background"})
def otel_background(t, fn):
    """background: /next right after INVOKE; every item still arrives once by shutdown."""
    invs = []
    for i in range(4):
        inv = fn.invoke({"spans": 4, "logs": 1}, finish=False)
        t_next = t.lam.wait_ext_next_after(inv, timeout=5)
        assert t_next - inv.t_delivered < NOT_HELD_S, "invocation %d: /next %.3fs after " \
            "INVOKE with background" % (i + 1, t_next - inv.t_delivered)
        fn.finish(inv)
        assert inv.status == "success", "invocation %d: %s" % (i + 1, inv.status)
        invs.append(inv)
    t_exit = t.shutdown_ok()
    seen = OtelSeen(t.apm)
    check_otlp_requests(seen, fn)
    for i, inv in enumerate(invs):
        check_otel_invocation(seen, fn, inv, by=t_exit, coldstart=(i == 0),
                              what="invocation %d" % (i + 1))
    check_otel_nothing_else(seen, fn)
    check_sdk_log(fn)


@scenario(apm={"token": "both-token"})
def otel_and_elastic_agent_together(t):
    """Elastic agent and OTel SDK in one runtime: intake and OTLP delivered once, before /next."""
    err = node_setup_error() or otel_setup_error()
    assert err is None, err
    t.otlp_port = otlp_port_for(t)
    t.start(env={"APM_EXT_OTLP_PORT": str(t.otlp_port)})
    version = agent_version()
    fn = NodeFunction(t.lam, t.port, handler="both.main", env={
        "ELASTIC_APM_SECRET_TOKEN": "both-token",
        "LAMBDA_TASK_ROOT": OTEL_DIR,
        "NODE_OPTIONS": "-r elastic-apm-node/start -r " + OTEL_INIT,
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://localhost:%d" % t.otlp_port,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        "OTEL_SERVICE_NAME": FUNCTION_NAME,
        "OTEL_LOG_LEVEL": "warn",
        "APM_TEST_OTEL_LAMBDA": "off",
        "APM_TEST_OTEL_SIGNALS": "traces"})
    fn.protocol, fn.compression = "http/protobuf", "gzip"

    def checks(t, fn):
        invs = [fn.invoke({"spans": 3 + i, "errors": i % 2, "otel_spans": 2 + i})
                for i in range(3)]
        for i, inv in enumerate(invs):
            assert inv.status == "success", "invocation %d: %s %r" % (i + 1, inv.status,
                                                                       inv.response)
        t.shutdown_ok()
        seen = Seen(t.apm)
        check_requests(seen, version)
        for i, inv in enumerate(invs):
            check_invocation(seen, fn, inv, coldstart=(i == 0), by=inv.t_end,
                             what="invocation %d (Elastic agent)" % (i + 1))
        check_nothing_else(seen, fn)
        check_agent_log(fn, len(invs))
        oseen = OtelSeen(t.apm)
        check_otlp_requests(oseen, fn, token="both-token")
        made = {}
        for i, inv in enumerate(invs):
            what = "invocation %d (OpenTelemetry)" % (i + 1)
            for r in (r for r in fn.records(inv.request_id) if r["kind"] == "otel_span"):
                made[r["id"]] = r
                lst = oseen.spans.get(r["id"], [])
                assert len(lst) == 1, "%s: span %s (%s) arrived %d times" % (
                    what, r["id"], r["name"], len(lst))
                s, req = lst[0]
                assert (s["trace_id"], s["parent_id"], s["name"]) == (
                    r["trace_id"], r["parent_id"], r["name"]), "%s: span %s arrived as %r" % (
                        what, r["id"], s)
                assert req.t_end <= inv.t_end, "%s: span %s answered %.3fs after the " \
                    "extension's /next (syncflush)" % (what, r["id"], req.t_end - inv.t_end)
        assert len(made) >= 9, "setup: only %d OTel spans made" % len(made)
        other = [i for i in oseen.spans if i not in made]
        assert not other, "OTel spans nobody made arrived: %s" % other[:5]
        bad = [ln[:400] for ln in fn.log_text().splitlines() if SDK_TROUBLE.match(ln)]
        assert not bad, "the OpenTelemetry SDK reported trouble: %s" % bad[:3]

    run_function(t, fn, checks)


def _otlp_port_scenario(t):
    t.otlp_port = otlp_port_for(t)
    return t.otlp_port


@scenario()
def otel_refusals(t):
    """GET 405, /v1/other 404, text/plain 415, HTTP/2 4xx or closed, one log line; none sent."""
    port = _otlp_port_scenario(t)
    t.start(env={"APM_EXT_OTLP_PORT": str(port)})
    body = pb_span_request(FUNCTION_NAME, [(_ids()[0], _ids()[1], None, "refused")])
    problems = []

    def expect(what, data, want):
        status, headers, rbody, _ = raw_exchange(port, data)
        if status != want:
            problems.append("%s: answered %s, want %d" % (what, status, want))
        elif not 0 < len(rbody) <= 512:
            problems.append("%s: %d-byte body, want a short one" % (what, len(rbody)))

    def req(method, path, ctype=None, payload=b""):
        head = "%s %s HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n" % (method, path)
        if ctype:
            head += "Content-Type: %s\r\n" % ctype
        head += "Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload)
        return head.encode() + payload

    expect("GET /v1/traces", req("GET", "/v1/traces"), 405)
    expect("PUT /v1/metrics", req("PUT", "/v1/metrics", "application/x-protobuf", body), 405)
    expect("POST /v1/other", req("POST", "/v1/other", "application/x-protobuf", body), 404)
    expect("POST /", req("POST", "/", "application/x-protobuf", body), 404)
    expect("POST /intake/v2/events on the OTLP port",
           req("POST", "/intake/v2/events", "application/x-ndjson", b"{}\n"), 404)
    expect("POST /v1/traces text/plain", req("POST", "/v1/traces", "text/plain", body), 415)
    expect("POST /v1/logs without Content-Type", req("POST", "/v1/logs", None, body), 415)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    for attempt in (1, 2):
        try:
            status, _, rbody, closed = raw_exchange(port, preface)
        except OSError as e:
            status, rbody, closed = None, b"", "error %s" % e
        if not ((status is not None and 400 <= status < 500) or (status is None and closed)):
            problems.append("HTTP/2 preface %d: answered %s, closed %s; want a 4xx or the "
                            "connection closed" % (attempt, status, closed))
        elif status is not None and (status != 400 or b"OTLP/HTTP" not in rbody):
            # README: such a connection gets 400; its body says what to use
            problems.append("HTTP/2 preface %d: answered %s %r, want 400 saying to use "
                            "OTLP/HTTP" % (attempt, status, rbody[:200]))
    # still serving: a good export after all that
    st, _, _ = otlp_post(port, "traces", body, "application/x-protobuf")
    if st != 200:
        problems.append("a valid export after the refusals answered %s" % st)
    t.shutdown_ok()
    grpc = [ln for ln in t.logs() if re.search(r"grpc|http/2", str(ln.get("msg", "")), re.I)]
    if len(grpc) != 1:
        problems.append("%d log lines about HTTP/2 (gRPC) after two prefaces, want 1: %r" % (
            len(grpc), [ln.get("msg") for ln in grpc][:3]))
    elif "OTLP/HTTP" not in grpc[0].get("msg", ""):
        problems.append("the gRPC line does not say OTLP/HTTP is what is taken: %r" %
                        grpc[0].get("msg"))
    fwd = t.apm.otlp_requests()
    if len(fwd) != 1:
        problems.append("%d OTLP requests reached the APM server, want only the valid one: "
                        "%r" % (len(fwd), fwd[:5]))
    assert not problems, "; ".join(problems)


@scenario(apm={"api_key": "raw-key"})
def otel_raw_contract(t):
    """Exports by hand (Content-Length, chunked, gzip, JSON, ::1): 200s as specified; bytes kept."""
    port = _otlp_port_scenario(t)
    prefix_url = t.apm.url + "/apm-prefix"
    t.start(env={"APM_EXT_OTLP_PORT": str(port), "ELASTIC_APM_LAMBDA_APM_SERVER": prefix_url})
    inv = t.lam.invoke()
    sent = []   # (signal, body as sent, ctype, encoding, user agent)
    problems = []
    hosts = ["127.0.0.1"] + (["::1"] if have_ipv6() else [])
    n = 0
    for host in hosts:
        for fmt, ctype in (("protobuf", "application/x-protobuf"), ("json", "application/json")):
            for encoding, chunked in ((None, False), ("gzip", True), ("gzip", False)):
                n += 1
                tid, sid = _ids()
                spans = [(tid, sid, None, "raw %d" % n), (tid, _ids()[1], sid, "child %d" % n)]
                raw = pb_span_request(FUNCTION_NAME, spans) if fmt == "protobuf" else \
                    json_span_request(FUNCTION_NAME, spans)
                body = gzip.compress(raw) if encoding == "gzip" else raw
                ua = "raw-exporter/%d (%s)" % (n, fmt)
                st, h, rb = otlp_post(port, "traces", body, ctype, encoding, chunked, host, ua)
                what = "%s %s %s %s" % (host, fmt, encoding or "identity",
                                        "chunked" if chunked else "Content-Length")
                sent.append(("traces", body, ctype, encoding, ua, what))
                if st != 200:
                    problems.append("%s: answered %s %r" % (what, st, rb[:200]))
                    continue
                if (h.get("content-type") or "").split(";")[0] != ctype:
                    problems.append("%s: answer Content-Type %r" % (what, h.get("content-type")))
                want = b"" if fmt == "protobuf" else b"{}"
                if rb.strip() != want or (fmt == "protobuf" and h.get("content-length") != "0"):
                    problems.append("%s: answer body %r (Content-Length %r), want %r" % (
                        what, rb[:100], h.get("content-length"), want))
    # metrics and logs too
    metric = pb_len(1, pb_len(2, pb_len(2, pb_len(1, "raw.metric"))))
    record = pb_len(1, pb_len(2, pb_len(2, pb_len(5, pb_len(1, "raw log record")))))
    for signal, body in (("metrics", metric), ("logs", record)):
        st, _, _ = otlp_post(port, signal, body, "application/x-protobuf")
        sent.append((signal, body, "application/x-protobuf", None, "test-exporter/1.0", signal))
        if st != 200:
            problems.append("/v1/%s answered %s" % (signal, st))
    t.lam.runtime_done(inv)
    t_next = t.lam.finish(inv)
    assert not problems, "; ".join(problems)
    got = t.apm.otlp_requests()
    for signal, body, ctype, encoding, ua, what in sent:
        mine = [r for r in got if r.body == body]
        assert len(mine) == 1, "%s: %d upstream requests carry its bytes, want 1" % (
            what, len(mine))
        r = mine[0]
        assert r.path == "/apm-prefix/v1/" + signal, "%s: upstream path %r" % (what, r.path)
        assert r.content_type == ctype and (r.encoding or None) == encoding, \
            "%s: upstream Content-Type %r Content-Encoding %r" % (what, r.content_type,
                                                                 r.encoding)
        assert r.chunked, "%s: upstream body not chunked" % what
        assert r.auth == "ApiKey raw-key", "%s: upstream Authorization %r" % (what, r.auth)
        assert re.match(r"apm-ext/\S+ \(%s\)\Z" % re.escape(ua), r.user_agent or ""), \
            "%s: upstream User-Agent %r" % (what, r.user_agent)
        assert r.delivered and r.t_end <= t_next, "%s: answered %s at %+.3fs from /next" % (
            what, r.status, (r.t_end or 0) - t_next)
    assert len(got) == len(sent), "%d upstream OTLP requests for %d exports" % (
        len(got), len(sent))


@scenario(env={"APM_EXT_OTLP_PORT": "0"})
def otel_port_off(t):
    """APM_EXT_OTLP_PORT=0: no OTLP listener (4318 refused); the agents' port still works."""
    t.start()
    ports = listening(t.lam.ext_proc.pid)
    extra = {p for p in ports if p[1] not in (t.port, t.tport)}
    assert not extra, "the extension listens on %s besides intake %d and telemetry %d" % (
        sorted(extra), t.port, t.tport)
    assert any(p[1] == t.port for p in ports), "setup: no intake listener found in %s" % (
        sorted(ports))
    if port_free(4318):
        try:
            socket.create_connection(("127.0.0.1", 4318), timeout=2).close()
            raise AssertionError("something accepts connections on 127.0.0.1:4318")
        except ConnectionRefusedError:
            pass
    t.sync_invocation([agent_payload()[0]])
    assert len(t.apm.intake_requests()) >= 1, "the agents' port does not work"


@scenario(env={"APM_EXT_OTLP_PORT": None})
def otel_port_default(t):
    """APM_EXT_OTLP_PORT unset: listens on 127.0.0.1:4318 (and ::1:4318), loopback only."""
    if not port_free(4318):
        raise Skip("port 4318 is taken on this machine")
    t.start()
    ports = listening(t.lam.ext_proc.pid)
    otlp = {p for p in ports if p[1] == 4318}
    want = {("127.0.0.1", 4318)} | ({("::1", 4318)} if have_ipv6() else set())
    assert otlp == want, "OTLP listeners %s, want %s" % (sorted(otlp), sorted(want))
    inv = t.lam.invoke()
    tid, sid = _ids()
    st, _, _ = otlp_post(4318, "traces", pb_span_request(FUNCTION_NAME, [(tid, sid, None, "d")]),
                         "application/x-protobuf")
    assert st == 200, "export to the default port answered %s" % st
    t.lam.runtime_done(inv)
    t_next = t.lam.finish(inv)
    got = t.apm.otlp_spans()
    assert [s["span_id"] for s in got] == [sid], "spans delivered: %r" % got
    assert t.apm.otlp_delivered()[0].t_end <= t_next, "not delivered before /next"
