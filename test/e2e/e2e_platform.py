"""End-to-end scenarios for platform data: what apm-ext makes of the Telemetry API.

    python3 test/e2e/e2e.py -k platform_    (these, plus e2e.py's platform_report_metrics)

Covers the platform data (README "What it does": Platform data) beyond the few
platform scenarios in
e2e.py (platform_report_metrics, function_logs_forwarded,
timeout_reports_registered_transaction, sync_runtime_done_without_flush):

  * platform.report -> exactly one metricset per invocation with exactly the
    reported values, coldstart only on the first, timestamps = record times;
  * ELASTIC_APM_LAMBDA_CAPTURE_LOGS=false and ..._DISABLE_LOGS_API=true;
  * function log lines -> log events, tagged with the registered transaction;
  * the proxy transaction for a registered transaction the agent never
    flushed (runtimeDone error/failure/timeout, SHUTDOWN failure), exactly
    once, and never when the agent flushed or the invocation went well;
  * runtimeDone alone ends an invocation well before its deadline;
  * the telemetry listener with garbage, truncated, oversized and stalled posts;
  * the last platform.report at SHUTDOWN (waited for, but bounded);
  * the metadata line in front of our own events.

All names start with platform_ so that `-k platform_` picks them.
The fake's own platform.report (fixed metrics) is suppressed where a scenario
emits its own (finish_with_report); record times are given explicitly so that
timestamps can be compared exactly.
"""

import datetime
import fcntl
import json
import select
import socket
import struct
import threading
import time

from e2e import (scenario, agent_send, agent_flush, make_metadata, make_transaction,
                 http_request, ndjson, tx_of, first_delivery, read_response,
                 agent_payload)
from fake_lambda import FUNCTION_ARN, FUNCTION_NAME, FUNCTION_VERSION

MiB = 1 << 20
REG_CTYPE = "application/vnd.elastic.apm.transaction+ndjson"

# distinctive report values (the fake's own are 128 MB / 64 MB / whole ms)
REPORT_1 = {"durationMs": 123.45, "billedDurationMs": 124, "memorySizeMB": 256,
            "maxMemoryUsedMB": 77, "initDurationMs": 456.78}
REPORT_2 = {"durationMs": 98.76, "billedDurationMs": 99, "memorySizeMB": 256,
            "maxMemoryUsedMB": 81}


# --------------------------------------------------------------- helpers

def iso_ms(ms):
    """Epoch milliseconds -> ISO-8601 UTC as Lambda stamps telemetry."""
    d = datetime.datetime.fromtimestamp(ms // 1000, datetime.timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (ms % 1000)


def record_ms(offset_ms=-1234):
    """A record time distinct from any time the extension could take itself."""
    return int(time.time() * 1000) + offset_ms


def finish_with_report(t, inv, metrics, when_ms=None, status="success", freeze=True):
    """finish(inv), with our platform.report (given metrics and time) instead of
    the fake's. Returns (t_next, when_ms)."""
    when_ms = when_ms if when_ms is not None else record_ms()
    with t.lam._cv:
        inv.reported = True          # the fake emits no report of its own
    t_next = t.lam.finish(inv, freeze=freeze)
    emit_report(t, inv, metrics, when_ms, status)
    return t_next, when_ms


def emit_report(t, inv, metrics, when_ms, status="success"):
    t.lam.emit([{"type": "platform.report", "time": iso_ms(when_ms), "record": {
        "requestId": inv.request_id, "status": status, "metrics": dict(metrics),
        "tracing": {"spanId": "0123456789abcdef", "type": "X-Amzn-Trace-Id",
                    "value": inv.trace_id}}}])


def emit_log(t, line, when_ms):
    t.lam.emit([{"type": "function", "time": iso_ms(when_ms), "record": line}])


def metricsets_for(apm, request_id):
    return [o for o in apm.events("metricset")
            if (o.get("faas") or {}).get("execution") == request_id]


def requests_with(apm, kind, pred=lambda o: True):
    """Intake requests answered 202 holding a `kind` line matching pred."""
    return [r for r in apm.intake_requests()
            if r.status == 202 and r.io_error is None
            and any(k == kind and pred(o) for k, o in r.lines)]


def check_own_request(req, what):
    """Our own events: plain ndjson, metadata line first."""
    enc = (req.headers.get("Content-Encoding") or "identity").lower()
    assert enc == "identity", "%s: our own events sent with Content-Encoding %r, want plain " \
        "ndjson" % (what, enc)
    assert req.lines and req.lines[0][0] == "metadata", \
        "%s: first line is %r, want metadata" % (what, req.lines[0][0] if req.lines else None)
    return req.lines[0][1]


def started_transaction(inv, **kw):
    """The transaction as an agent registers it: started, not finished."""
    tx = make_transaction(request_id=inv.request_id, duration=0, **kw)
    del tx["transaction"]["outcome"], tx["transaction"]["result"]
    return tx


def register(t, inv, tx, metadata=None):
    st, _, body = http_request(t.port, "POST", "/register/transaction",
                               ndjson([metadata or make_metadata(), tx]),
                               {"Content-Type": REG_CTYPE,
                                "x-elastic-aws-request-id": inv.request_id})
    assert st == 200, "/register/transaction answered %s: %r" % (st, body[:200])


def tx_events(apm, tx):
    tid = tx_of(tx)["id"]
    return [o for o in apm.events("transaction") if o.get("id") == tid]


def function_runs(seconds):
    """The handler works for a while (gives a proxy transaction a measurable
    duration). Not a synchronisation: nothing waits on anything here."""
    threading.Event().wait(seconds)


def ext_alive(t, what):
    p = t.lam.ext_proc
    assert p.poll() is None, "extension died (exit %s) after %s" % (p.returncode, what)


def tel_connect(t, timeout=5):
    return socket.create_connection(("127.0.0.1", t.tport), timeout=timeout)


def tel_head(t, length=None, chunked=False):
    h = "POST / HTTP/1.1\r\nHost: sandbox.localdomain:%d\r\nContent-Type: application/json\r\n" \
        % t.tport
    if chunked:
        h += "Transfer-Encoding: chunked\r\n"
    if length is not None:
        h += "Content-Length: %d\r\n" % length
    return (h + "\r\n").encode()


def tel_post_big(t, body=None, chunked=False, total=None, timeout=10):
    """POST a large body to the telemetry listener, written from a thread while
    this one reads the answer (a server that refuses early may stop reading).
    Returns the status, or the exception's class name if no answer came."""
    sock = tel_connect(t, timeout)
    f = sock.makefile("rb")
    sent_err = []

    def writer():
        try:
            if chunked:
                sock.sendall(tel_head(t, chunked=True))
                piece = b"x" * 65536
                left = total
                while left > 0:
                    n = min(left, len(piece))
                    sock.sendall(b"%x\r\n" % n + piece[:n] + b"\r\n")
                    left -= n
                sock.sendall(b"0\r\n\r\n")
            else:
                sock.sendall(tel_head(t, len(body)) + body)
        except OSError as e:
            sent_err.append(type(e).__name__)
    th = threading.Thread(target=writer, daemon=True)
    th.start()
    try:
        st, _, _ = read_response(f)
        return st
    except (OSError, AssertionError, ValueError) as e:
        return "%s (writer: %s)" % (type(e).__name__, sent_err or "ok")
    finally:
        th.join(timeout)
        f.close()
        sock.close()


def big_function_body(size):
    """A valid telemetry body of about `size` bytes: one function record."""
    head = b'[{"time":"%s","type":"function","record":"' % iso_ms(record_ms()).encode()
    tail = b'"}]'
    return head + b"y" * (size - len(head) - len(tail)) + tail


# --------------------------------------------------------------- metricsets

@scenario()
def platform_report_exact_metricset(t):
    """platform.report -> one metricset each, exactly the reported values;
    coldstart true then false; timestamp = record time; delivered with the next delivery."""
    t.start()
    inv1 = t.lam.invoke(timeout_ms=7000)
    t.lam.runtime_done(inv1)
    t_next1, when1 = finish_with_report(t, inv1, REPORT_1)
    inv2 = t.lam.invoke(timeout_ms=9000)
    t.lam.wait_telemetry_idle()          # inv1's report is in the extension now
    lines, tx = agent_payload(inv2)
    assert agent_send(t.port, lines) == 202
    assert agent_flush(t.port) == 202
    t.lam.runtime_done(inv2)
    t_next2, when2 = finish_with_report(t, inv2, REPORT_2, when_ms=record_ms(-4321))
    got1 = metricsets_for(t.apm, inv1.request_id)
    assert got1, "invocation 1's report (received during invocation 2) not delivered by " \
        "the /next that ended invocation 2 (metricsets seen: %r)" % t.apm.events("metricset")
    req1 = requests_with(t.apm, "metricset",
                         lambda o: o.get("faas", {}).get("execution") == inv1.request_id)[0]
    assert req1.t_end <= t_next2, "invocation 1's metricset answered %.3fs after the /next " \
        "that ended invocation 2" % (req1.t_end - t_next2)
    t.shutdown_ok()

    for inv, rep, when, cold, timeout_ms in ((inv1, REPORT_1, when1, True, 7000),
                                             (inv2, REPORT_2, when2, False, 9000)):
        got = metricsets_for(t.apm, inv.request_id)
        assert len(got) == 1, "invocation %s: %d metricsets, want exactly 1: %r" % (
            inv.request_id, len(got), got)
        m = got[0]
        assert m.get("timestamp") == when * 1000, "timestamp %r, want the record time %d " \
            "(epoch us)" % (m.get("timestamp"), when * 1000)
        faas = m.get("faas") or {}
        want_faas = {"coldstart": cold, "execution": inv.request_id, "id": FUNCTION_ARN,
                     "name": FUNCTION_NAME, "version": FUNCTION_VERSION}
        for k, v in want_faas.items():
            assert faas.get(k) == v, "faas.%s = %r, want %r (faas: %r)" % (k, faas.get(k), v,
                                                                         faas)
        samples = {k: (v or {}).get("value") for k, v in (m.get("samples") or {}).items()}
        want = {"faas.duration": rep["durationMs"],
                "faas.billed_duration": rep["billedDurationMs"],
                "system.memory.total": rep["memorySizeMB"] * MiB,
                "system.memory.actual.free": (rep["memorySizeMB"] - rep["maxMemoryUsedMB"]) * MiB}
        if "initDurationMs" in rep:
            want["faas.coldstart_duration"] = rep["initDurationMs"]
        want_keys = set(want) | {"faas.timeout"}
        assert set(samples) == want_keys, "samples %s, want exactly %s" % (
            sorted(samples), sorted(want_keys))
        for k, v in want.items():
            assert samples[k] == v, "%s = %r, want %r" % (k, samples[k], v)
        # deadlineMs - invocation start (platform.start, or INVOKE as received)
        assert timeout_ms - 250 <= samples["faas.timeout"] <= timeout_ms + 5, \
            "faas.timeout %r, want ~%d (deadlineMs - invocation start)" % (
                samples["faas.timeout"], timeout_ms)
    assert t.apm.count("metricset") == 2, "%d metricsets, want 2: %r" % (
        t.apm.count("metricset"), t.apm.events("metricset"))


@scenario(env={"ELASTIC_APM_LAMBDA_CAPTURE_LOGS": "false"})
def platform_capture_logs_off(t):
    """CAPTURE_LOGS=false: subscribes to platform only, no log event even for
    function records posted anyway; metricsets still come."""
    t.start()
    sub = t.lam.subscription
    assert sub is not None, "no subscription (attempts %r)" % t.lam.subscribe_attempts
    assert sub["types"] == ["platform"], "subscribed to %r, want [\"platform\"]" % sub["types"]
    invs = []
    for i in range(2):
        inv = t.lam.invoke()
        invs.append(inv)
        t.lam.log_line("line %d the platform would not even send\n" % i)
        # a function record arriving anyway must not become a log event
        body = json.dumps([{"time": iso_ms(record_ms()), "type": "function",
                            "record": "forced function line %d\n" % i}]).encode()
        st = t.lam.post_telemetry_raw(body)
        assert st == 200, "a function record answered %r, want 200" % st
        t.lam.runtime_done(inv)
        finish_with_report(t, inv, REPORT_1 if i == 0 else REPORT_2)
    t.shutdown_ok()
    assert t.apm.count("log") == 0, "log events with capture off: %r" % t.apm.events("log")
    for inv in invs:
        n = len(metricsets_for(t.apm, inv.request_id))
        assert n == 1, "invocation %s: %d metricsets with capture off, want 1" % (
            inv.request_id, n)


@scenario(env={"ELASTIC_APM_LAMBDA_DISABLE_LOGS_API": "true"})
def platform_disable_logs_api(t):
    """DISABLE_LOGS_API=true: no subscription attempt, no telemetry listener;
    agent data still flows end to end (the agent's flush ends invocations)."""
    t.start()
    assert t.lam.subscribe_attempts == [], "subscribed anyway: %r" % [
        (st, b[:200]) for st, b in t.lam.subscribe_attempts]
    assert t.lam.subscription is None
    try:
        tel_connect(t, timeout=2).close()
        raise AssertionError("telemetry listener on port %d although the Logs API is "
                             "disabled" % t.tport)
    except (ConnectionRefusedError, socket.timeout):
        pass
    for i in range(3):
        inv = t.lam.invoke(timeout_ms=10000)
        lines, tx = agent_payload(inv)
        assert agent_send(t.port, lines) == 202, "invocation %d: agent POST" % i
        t_flush = time.monotonic()
        assert agent_flush(t.port) == 202
        t.lam.runtime_done(inv)     # the fake drops it: nobody subscribed
        t_next = t.lam.finish(inv)
        req = first_delivery(t.apm, tx)
        assert req is not None and req.t_end <= t_next, \
            "invocation %d: transaction not delivered before /next" % i
        assert t_next - t_flush < 1.5, "invocation %d: /next %.3fs after the agent's flush " \
            "(deadline 10 s)" % (i, t_next - t_flush)
    t.shutdown_ok()
    assert t.apm.count("metricset") == 0 and t.apm.count("log") == 0, \
        "platform events without telemetry?"


# --------------------------------------------------------------- function logs

@scenario()
def platform_logs_carry_trace_ids(t):
    """Log lines of an invocation with a registered transaction carry its
    trace.id/transaction.id and the registration's metadata; the next
    invocation's lines do not."""
    t.start()
    types = (t.lam.subscription or {}).get("types")
    assert sorted(types or []) == ["function", "platform"], \
        "subscribed to %r, want platform and function (capture is on by default)" % types
    meta = make_metadata(service_name="svc-registered")
    inv1 = t.lam.invoke()
    tx = started_transaction(inv1)
    register(t, inv1, tx, meta)
    line_a = '2024-01-01T00:00:00.000Z\t%s\tINFO\tline A "quoted" back\\slash caf\u00e9\n' \
        % inv1.request_id
    line_b = "2024-01-01T00:00:00.001Z\t%s\tINFO\tline B just before runtimeDone\n" \
        % inv1.request_id
    ms_a = record_ms(-2000)
    emit_log(t, line_a, ms_a)
    t.lam.wait_telemetry_idle()
    done = make_transaction(request_id=inv1.request_id, id=tx_of(tx)["id"],
                            trace_id=tx_of(tx)["trace_id"])
    assert agent_send(t.port, [meta, done]) == 202
    ms_b = record_ms(-1000)
    emit_log(t, line_b, ms_b)        # same stream as the runtimeDone right after it
    t.lam.runtime_done(inv1)
    t_next1 = t.lam.finish(inv1)

    inv2 = t.lam.invoke()
    line_c = "2024-01-01T00:00:01.000Z\t%s\tINFO\tline C untraced\n" % inv2.request_id
    ms_c = record_ms(-500)
    emit_log(t, line_c, ms_c)
    t.lam.wait_telemetry_idle()
    assert agent_flush(t.port) == 202
    t.lam.runtime_done(inv2)
    t.lam.finish(inv2)
    t.shutdown_ok()

    logs = t.apm.events("log")
    by_msg = {}
    for o in logs:
        by_msg.setdefault(o.get("message"), []).append(o)
    for line, ms, inv, traced in ((line_a, ms_a, inv1, True), (line_b, ms_b, inv1, True),
                                  (line_c, ms_c, inv2, False)):
        msg = line[:-1]
        got = by_msg.get(msg, [])
        assert len(got) == 1, "log %r delivered %d times (messages seen: %r)" % (
            msg[-30:], len(got), list(by_msg)[:6])
        o = got[0]
        assert o.get("@timestamp") == ms * 1000, "@timestamp %r, want the record time %d" % (
            o.get("@timestamp"), ms * 1000)
        faas = o.get("faas") or {}
        assert faas.get("id") == FUNCTION_ARN and faas.get("name") == FUNCTION_NAME, faas
        assert faas.get("execution") == inv.request_id, \
            "%r: faas.execution %r, want %r" % (msg[-30:], faas.get("execution"),
                                               inv.request_id)
        if traced:
            assert o.get("trace.id") == tx_of(tx)["trace_id"], \
                "%r: trace.id %r, want the registered %r" % (
                    msg[-30:], o.get("trace.id"), tx_of(tx)["trace_id"])
            assert o.get("transaction.id") == tx_of(tx)["id"], \
                "%r: transaction.id %r, want %r" % (msg[-30:], o.get("transaction.id"),
                                                    tx_of(tx)["id"])
        else:
            assert "trace.id" not in o and "transaction.id" not in o, \
                "untraced invocation's log carries ids: %r" % o
    req = requests_with(t.apm, "log", lambda o: o.get("message") == line_a[:-1])[0]
    assert req.t_end <= t_next1, "log line A not delivered before the /next ending its " \
        "invocation"
    got_meta = check_own_request(req, "log events")
    assert got_meta == meta["metadata"], "log events behind metadata %r, want the " \
        "registration's" % got_meta
    assert len(tx_events(t.apm, tx)) == 1, "the agent's transaction delivered %d times" % len(
        tx_events(t.apm, tx))


# --------------------------------------------------------------- proxy transactions

def check_proxy(t, tx, status, lo_ms, hi_ms, t_by=None):
    got = tx_events(t.apm, tx)
    assert len(got) == 1, "registered transaction delivered %d times, want exactly 1 " \
        "(status %s)" % (len(got), status)
    o = got[0]
    assert o.get("result") == status, "result %r, want %r" % (o.get("result"), status)
    assert o.get("outcome") == "failure", "outcome %r, want failure" % o.get("outcome")
    reg = tx_of(tx)
    for k in ("trace_id", "name", "type"):
        assert o.get(k) == reg[k], "%s %r, want the registered %r" % (k, o.get(k), reg[k])
    assert (o.get("faas") or {}).get("execution") == reg["faas"]["execution"]
    d = o.get("duration")
    assert isinstance(d, (int, float)) and lo_ms <= d <= hi_ms, \
        "duration %r ms, want INVOKE->end in [%.0f, %.0f]" % (d, lo_ms, hi_ms)
    if t_by is not None:
        req = first_delivery(t.apm, tx)
        assert req.t_end <= t_by, "proxy transaction answered %.3fs too late" % (
            req.t_end - t_by)


@scenario()
def platform_proxy_tx_runtime_error(t):
    """runtimeDone status error, agent registered but never flushed: we send the
    registered transaction (result error, outcome failure) before /next; once."""
    t.start()
    inv = t.lam.invoke(timeout_ms=10000)
    tx = started_transaction(inv)
    register(t, inv, tx)
    function_runs(0.3)
    t.lam.runtime_done(inv, "error")
    t_next = t.lam.finish(inv)
    assert t_next - inv.t_runtime_done < 1.0, "/next %.3fs after runtimeDone(error)" % (
        t_next - inv.t_runtime_done)
    check_proxy(t, tx, "error", (inv.t_runtime_done - inv.t_delivered) * 1000 - 30,
                (t_next - inv.t_invoke) * 1000 + 30, t_by=t_next)
    # two more invocations, the sandbox lives on: nothing sent again
    for i in range(2):
        inv2 = t.lam.invoke()
        t.lam.runtime_done(inv2)
        t.lam.finish(inv2)
    t.shutdown_ok()
    assert len(tx_events(t.apm, tx)) == 1, "proxy transaction sent %d times" % len(
        tx_events(t.apm, tx))


@scenario()
def platform_proxy_tx_crash_once(t):
    """Runtime crash: runtimeDone(failure), then SHUTDOWN(failure): one proxy
    transaction with result failure, not two."""
    t.start()
    inv = t.lam.invoke(timeout_ms=10000)
    tx = started_transaction(inv)
    register(t, inv, tx)
    function_runs(0.2)
    t.lam.runtime_done(inv, "failure")
    t_next = t.lam.finish(inv)
    assert t_next - inv.t_runtime_done < 1.0, "/next %.3fs after runtimeDone(failure)" % (
        t_next - inv.t_runtime_done)
    t_exit = t.shutdown_ok(reason="failure")
    check_proxy(t, tx, "failure", (inv.t_runtime_done - inv.t_delivered) * 1000 - 30,
                (t_next - inv.t_invoke) * 1000 + 30, t_by=t_next)
    assert first_delivery(t.apm, tx).t_end <= t_exit


@scenario()
def platform_proxy_tx_shutdown_failure(t):
    """No runtimeDone at all (the runtime died), the deadline ends the invocation,
    then SHUTDOWN(failure): the registered transaction goes out with result failure."""
    t.start()
    inv = t.lam.invoke(timeout_ms=1500)
    tx = started_transaction(inv)
    register(t, inv, tx)
    t_next = t.lam.wait_ext_next_after(inv, timeout=5)
    assert t_next - inv.t_invoke < 1.5 + 0.5, "/next %.3fs after INVOKE (deadline 1.5 s)" % (
        t_next - inv.t_invoke)
    t_exit = t.shutdown_ok(reason="failure")
    check_proxy(t, tx, "failure", 1000, (t_exit - inv.t_invoke) * 1000 + 30, t_by=t_exit)


@scenario()
def platform_proxy_tx_timeout_second_invocation(t):
    """Invocation 1 normal (registered, sent, flushed), invocation 2 times out:
    only tx2 is proxied (result timeout); tx1 stays the agent's, once."""
    t.start()
    inv1 = t.lam.invoke()
    tx1s = started_transaction(inv1)
    register(t, inv1, tx1s)
    tx1 = make_transaction(request_id=inv1.request_id, id=tx_of(tx1s)["id"],
                           trace_id=tx_of(tx1s)["trace_id"], result="agent-result-1")
    assert agent_send(t.port, [make_metadata(), tx1]) == 202
    assert agent_flush(t.port) == 202
    t.lam.runtime_done(inv1)
    t.lam.finish(inv1)
    inv2 = t.lam.invoke(timeout_ms=1200)
    tx2 = started_transaction(inv2)
    register(t, inv2, tx2)
    code, t_exit, killed = t.lam.timeout(inv2)
    t.shut_down = True
    assert code == 0 and not killed, "exit %s killed=%s" % (code, killed)
    got1 = tx_events(t.apm, tx1)
    assert len(got1) == 1 and got1[0].get("result") == "agent-result-1", \
        "transaction 1 (agent flushed it) arrived %d times: %r" % (len(got1), got1)
    check_proxy(t, tx2, "timeout", 1200 - 300, (inv2.t_runtime_done - inv2.t_invoke) * 1000 +
                300, t_by=t_exit)
    for inv in (inv1, inv2):   # the timed-out invocation's report too, before the exit
        n = len(metricsets_for(t.apm, inv.request_id))
        assert n == 1, "invocation %s: %d metricsets, want 1" % (inv.request_id, n)


@scenario()
def platform_no_proxy_when_agent_done(t):
    """No proxy transaction when the agent flushed (even with runtimeDone
    error/failure and SHUTDOWN failure), nor for a successful invocation."""
    t.start()
    txs = []
    # 1: normal, registered, sent, flushed
    # 2: registered, sent, not flushed, runtimeDone success
    # 3: registered, sent, flushed, runtimeDone error (handler threw)
    # 4: registered, sent, flushed, runtimeDone failure, then SHUTDOWN failure
    for i, (flush, status) in enumerate(((True, "success"), (False, "success"),
                                         (True, "error"), (True, "failure")), 1):
        inv = t.lam.invoke(timeout_ms=10000)
        started = started_transaction(inv)
        register(t, inv, started)
        tx = make_transaction(request_id=inv.request_id, id=tx_of(started)["id"],
                              trace_id=tx_of(started)["trace_id"],
                              result="agent-result-%d" % i,
                              outcome="success" if status == "success" else "failure")
        txs.append((i, tx))
        assert agent_send(t.port, [make_metadata(), tx], encoding="identity") == 202
        if flush:
            assert agent_flush(t.port) == 202
        t.lam.runtime_done(inv, status)
        t_next = t.lam.finish(inv)
        assert t_next - inv.t_runtime_done < 1.0, "case %d: /next %.3fs after runtimeDone" % (
            i, t_next - inv.t_runtime_done)
    t.shutdown_ok(reason="failure")
    for i, tx in txs:
        got = tx_events(t.apm, tx)
        assert len(got) == 1, "case %d: transaction delivered %d times, want once (the " \
            "agent's): %r" % (i, len(got), got)
        assert got[0].get("result") == "agent-result-%d" % i, \
            "case %d: result %r, the agent sent agent-result-%d (a proxy went out)" % (
                i, got[0].get("result"), i)


# --------------------------------------------------------------- runtimeDone alone

@scenario()
def platform_runtime_done_alone(t):
    """No agent at all: platform.runtimeDone ends each invocation (deadline 10 s)
    within 1 s, whatever its status; the metricsets come."""
    t.start()
    invs = []
    for i, status in enumerate(("success", "error", "success")):
        inv = t.lam.invoke(timeout_ms=10000)
        invs.append(inv)
        t.lam.runtime_done(inv, status)
        t_next = t.lam.finish(inv)
        assert t_next - inv.t_invoke < 1.0, "invocation %d (%s): /next %.3fs after INVOKE, " \
            "deadline 10 s" % (i, status, t_next - inv.t_invoke)
    t.shutdown_ok()
    for inv in invs:
        assert len(metricsets_for(t.apm, inv.request_id)) == 1, \
            "invocation %s: %d metricsets" % (inv.request_id,
                                              len(metricsets_for(t.apm, inv.request_id)))
    assert t.apm.count("transaction") == 0, "a transaction without any registration"


# --------------------------------------------------------------- listener robustness

@scenario()
def platform_telemetry_garbage(t):
    """Malformed JSON -> 400, > 2 MiB -> 413, odd records, truncated and stalled
    posts: always a fast answer, never a crash; the good posts that follow work."""
    t.start()
    inv = t.lam.invoke(timeout_ms=10000)
    # the platform's own batch (initStart... platform.start) first: Lambda sends
    # one batch at a time, and the listener may recycle the idlest of its
    # connections when more clients come at once (see tel_accept)
    t.lam.wait_telemetry_idle()
    post = t.lam.post_telemetry_raw
    for body in (b"not json at all", b"[{\"type\":\"function\",\"record\":\"trunc",
                 b"[{]", b"\xff\xfe\x00garbage", b""):
        st = post(body, timeout=2)
        assert st == 400, "malformed body %r answered %r, want 400" % (body[:30], st)
        ext_alive(t, "malformed body %r" % body[:30])
    # valid JSON with odd contents: refused or ignored, but answered
    for body in (b"{}", b"[]", b"[1,2,\"x\",null]", b"[{\"type\":\"platform.report\"}]",
                 b"[{\"type\":\"platform.report\",\"record\":\"no object\"}]",
                 b"[{\"type\":\"platform.runtimeDone\",\"record\":{\"requestId\":7,"
                 b"\"status\":[]}}]",
                 b"[{\"type\":\"platform.report\",\"time\":\"yesterday\",\"record\":"
                 b"{\"requestId\":\"nope\",\"metrics\":{\"durationMs\":\"x\"}}}]",
                 b"[{\"type\":\"function\",\"record\":{\"deep\":" + b"[" * 300 + b"]" * 300 +
                 b"}}]",
                 b"[{\"type\":\"platform.unknownThing\",\"record\":{}}]"):
        st = post(body, timeout=2)
        assert st in (200, 400), "body %r answered %r, want 200 or 400" % (body[:40], st)
        ext_alive(t, "body %r" % body[:40])
    # over 2 MiB: with Content-Length, and chunked
    st = tel_post_big(t, big_function_body(2 * MiB + 100))
    assert st == 413, "2 MiB + 100 bytes (Content-Length) answered %r, want 413" % st
    ext_alive(t, "an oversized post")
    st = tel_post_big(t, chunked=True, total=2 * MiB + 65536)
    assert st == 413, "2 MiB + 64 KiB chunked answered %r, want 413" % st
    ext_alive(t, "an oversized chunked post")
    # a large but legal body (Lambda's 2 x maxBytes is well below 2 MiB)
    st = tel_post_big(t, big_function_body(MiB))
    assert st == 200, "a 1 MiB body answered %r, want 200" % st
    # truncated: the sender goes away mid-body
    s = tel_connect(t)
    s.sendall(tel_head(t, 1000) + b'[{"type":"function","record":"cut')
    s.close()
    # bad chunked framing
    s = tel_connect(t)
    s.sendall(tel_head(t, chunked=True) + b"zz\r\n[]\r\n0\r\n\r\n")
    f = s.makefile("rb")
    try:
        st = read_response(f)[0]
    except AssertionError as e:   # closed without an answer: acceptable here
        st = str(e)
    finally:
        f.close()
        s.close()
    assert st in (400, "connection closed before a response"), \
        "bad chunked framing answered %r, want 400" % st
    # stalled: two connections that send half a request and stay open
    stalled = []
    for _ in range(2):
        s = tel_connect(t)
        s.sendall(tel_head(t, 500) + b'[{"type":"function"')
        stalled.append(s)
    try:
        ext_alive(t, "truncated and stalled posts")
        # good posts still work, through the fake's normal delivery
        ms = record_ms()
        line = "2024-01-01T00:00:00.000Z\t%s\tINFO\tgood line after garbage\n" % inv.request_id
        emit_log(t, line, ms)
        t.lam.runtime_done(inv)
        t_next, when = finish_with_report(t, inv, REPORT_1)
        assert t_next - inv.t_runtime_done < 1.0, "/next %.3fs after runtimeDone (after the " \
            "garbage)" % (t_next - inv.t_runtime_done)
        inv2 = t.lam.invoke()
        t.lam.wait_telemetry_idle()
        t.lam.runtime_done(inv2)
        t.lam.finish(inv2)
    finally:
        for s in stalled:
            s.close()
    t.shutdown_ok()
    bad = [(e["records"][0]["type"], e["statuses"]) for e in t.lam.telemetry_posts
           if not e["ok"] or any(s != 200 for s in e["statuses"])]
    assert not bad, "the fake's good posts were not all answered 200 at once: %r" % bad[:5]
    logs = [o for o in t.apm.events("log") if o.get("message") == line[:-1]]
    assert len(logs) == 1, "the good log line after the garbage: %d log events" % len(logs)
    ms1 = metricsets_for(t.apm, inv.request_id)
    assert len(ms1) == 1 and ms1[0].get("timestamp") == when * 1000, \
        "metricset after the garbage: %r" % ms1
    assert len(metricsets_for(t.apm, inv2.request_id)) == 1


TEL_BODY_MAX = 2 * MiB   # apm-ext.c: a telemetry POST's body, at most
SIOCOUTQNSD = 0x894B     # Linux ioctl: bytes of a socket's send queue not sent yet


def function_body(message, size=None):
    """A telemetry body holding one function record (`message`), padded with
    blanks inside the array to exactly `size` bytes."""
    body = json.dumps([{"time": iso_ms(record_ms()), "type": "function",
                        "record": message}]).encode()
    return body if size is None else body[:-1] + b" " * (size - len(body)) + b"]"


def unsent(sock):
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, b"\0" * 4))[0]


def tel_exchange(t, pieces, what, closes=True):
    """Raw bytes to the telemetry listener: each of `pieces` (head, framing,
    data) in one send() that begins only once everything before it has left
    this socket, so that each piece reaches the listener whole (one segment).
    Returns (status, headers, whether the listener closed the connection after
    its answer: read only when `closes`, else None)."""
    s = tel_connect(t)
    f = s.makefile("rb")
    try:
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            p = select.poll()
            p.register(s, select.POLLIN)
            for piece in pieces:
                end = time.monotonic() + 10
                while unsent(s) and time.monotonic() < end:
                    if p.poll(5):        # an answer (or a close) already: stop sending
                        break
                else:
                    s.sendall(piece)
                    continue
                break
        except (BrokenPipeError, ConnectionResetError):
            pass                          # refused early: the answer tells
        try:
            st, headers, _ = read_response(f)
        except (AssertionError, OSError) as e:
            raise AssertionError("%s: no answer (%s)" % (what, e))
        if not closes:
            return st, headers, None
        try:
            closed = f.read(1) == b""     # EOF, or the timeout of tel_connect
        except socket.timeout:
            closed = False
        except OSError:
            closed = True
        return st, headers, closed
    finally:
        f.close()
        s.close()


@scenario()
def platform_telemetry_refused_posts(t):
    """Refused telemetry requests are answered, closed, and their records never
    applied: a PUT with a valid batch -> 400; a GET -> 400; bad chunked framing
    after a whole chunk -> 400; a chunked body one byte over 2 MiB (its last
    byte and the end of the body in one segment) -> 413. A chunked body of
    exactly 2 MiB is taken (200), its record applied."""
    t.start()
    inv = t.lam.invoke(timeout_ms=10000)
    t.lam.wait_telemetry_idle()           # the platform's batch is in: one client at a time
    refused = []
    # not a POST: with a valid batch as its body, and without a body
    put = function_body("record of a PUT")
    refused.append("record of a PUT")
    for method, body in (("PUT", put), ("GET", None)):
        head = tel_head(t, len(body) if body else None)
        head = method.encode() + head[len(b"POST"):]
        st, h, closed = tel_exchange(t, [head + (body or b"")], method)
        assert st == 400, "a %s answered %r, want 400" % (method, st)
        assert closed and h.get("connection", "").lower() == "close", \
            "a %s: answered 400 but the connection stays open (%r)" % (method, h)
    # bad framing: a whole chunk holding a valid batch, then a size line "zz"
    bad = function_body("record before bad chunked framing")
    refused.append("record before bad chunked framing")
    st, h, closed = tel_exchange(
        t, [tel_head(t, chunked=True), b"%x\r\n" % len(bad) + bad + b"\r\nzz\r\n"],
        "bad chunked framing")
    assert st == 400, "a valid chunk then bad framing answered %r, want 400" % st
    assert closed and h.get("connection", "").lower() == "close", \
        "bad chunked framing: answered 400 but the connection stays open (%r)" % h
    ext_alive(t, "bad chunked framing")
    # one byte over: TEL_BODY_MAX bytes in one chunk, then the last byte with
    # the end of the body
    over = function_body("record of a chunked body one byte over 2 MiB", TEL_BODY_MAX + 1)
    refused.append("record of a chunked body one byte over 2 MiB")
    st, h, closed = tel_exchange(
        t, [tel_head(t, chunked=True), b"%x\r\n" % TEL_BODY_MAX + over[:TEL_BODY_MAX] + b"\r\n",
            b"1\r\n" + over[TEL_BODY_MAX:] + b"\r\n0\r\n\r\n"], "2 MiB + 1 chunked")
    assert st == 413, "a chunked body of 2 MiB + 1 byte answered %r, want 413" % st
    assert closed, "2 MiB + 1 chunked: answered 413 but the connection stays open"
    ext_alive(t, "a chunked body one byte over 2 MiB")
    # exactly the limit: taken
    at = function_body("record of a chunked body of exactly 2 MiB", TEL_BODY_MAX)
    st, _, _ = tel_exchange(
        t, [tel_head(t, chunked=True), b"%x\r\n" % TEL_BODY_MAX + at + b"\r\n0\r\n\r\n"],
        "2 MiB chunked", closes=False)
    assert st == 200, "a chunked body of exactly 2 MiB answered %r, want 200" % st
    t.lam.runtime_done(inv)
    t.lam.finish(inv)
    t.shutdown_ok()
    msgs = [o.get("message") for o in t.apm.events("log")]
    assert "record of a chunked body of exactly 2 MiB" in msgs, \
        "the record of the 2 MiB body was not forwarded (log events: %r)" % msgs[:5]
    for m in refused:
        assert m not in msgs, "a refused request's record was applied: %r" % m


@scenario()
def platform_telemetry_answers_fast(t):
    """The listener answers every post at once, also while an invocation is
    open and the APM server is slow."""
    t.start()
    t.apm.set_mode("slow", 1.0)
    inv = t.lam.invoke(timeout_ms=10000)
    lines, tx = agent_payload(inv)
    assert agent_send(t.port, lines, encoding="identity") == 202
    worst = 0.0
    for i in range(20):
        body = json.dumps([{"time": iso_ms(record_ms()), "type": "function",
                            "record": "fast line %d\n" % i}]).encode()
        t0 = time.monotonic()
        st = t.lam.post_telemetry_raw(body, timeout=2)
        worst = max(worst, time.monotonic() - t0)
        assert st == 200, "post %d answered %r" % (i, st)
    assert worst < 0.2, "slowest telemetry answer took %.3fs" % worst
    assert agent_flush(t.port) == 202
    t.lam.runtime_done(inv)
    t.lam.finish(inv, timeout=10)
    t.apm.set_mode("ok")
    t.shutdown_ok()
    n = sum(1 for o in t.apm.events("log") if str(o.get("message", "")).startswith("fast line"))
    assert n == 20, "%d of 20 log lines delivered" % n


# --------------------------------------------------------------- shutdown and the last report

@scenario()
def platform_shutdown_waits_for_last_report(t):
    """The last invocation's report arrives ~200 ms after SHUTDOWN: the extension
    waits for it, delivers its metricset, and exits 0 before the deadline."""
    t.start()
    inv1 = t.lam.invoke()
    t.lam.runtime_done(inv1)
    finish_with_report(t, inv1, REPORT_1)
    inv2 = t.lam.invoke()
    t.lam.runtime_done(inv2)
    with t.lam._cv:
        inv2.reported = True
    t.lam.finish(inv2)
    when = record_ms(-777)
    # the platform is late with the report (simulated latency, not a sync point)
    timer = threading.Timer(0.2, emit_report, args=(t, inv2, REPORT_2, when))
    timer.daemon = True
    t.shut_down = True
    timer.start()
    try:
        code, t_exit, killed = t.lam.shutdown("spindown", 2000, flush_telemetry=0)
    finally:
        timer.cancel()
    assert code == 0 and not killed, "exit %s killed=%s" % (code, killed)
    assert t_exit - t.lam.t_shutdown < 1.9, "exit %.3fs after SHUTDOWN" % (
        t_exit - t.lam.t_shutdown)
    got = metricsets_for(t.apm, inv2.request_id)
    assert len(got) == 1, "the last report (200 ms after SHUTDOWN) gave %d metricsets" % len(
        got)
    assert got[0].get("timestamp") == when * 1000
    req = requests_with(t.apm, "metricset",
                        lambda o: o.get("faas", {}).get("execution") == inv2.request_id)[0]
    assert req.t_end <= t_exit, "last metricset answered after the exit"
    assert len(metricsets_for(t.apm, inv1.request_id)) == 1


@scenario()
def platform_shutdown_report_never_comes(t):
    """The last report never comes: the extension gives up after ~500 ms."""
    t.start()
    inv = t.lam.invoke()
    t.lam.runtime_done(inv)
    with t.lam._cv:
        inv.reported = True
    t.lam.finish(inv)
    t.shut_down = True
    code, t_exit, killed = t.lam.shutdown("spindown", 2000, flush_telemetry=0)
    assert code == 0 and not killed, "exit %s killed=%s" % (code, killed)
    waited = t_exit - t.lam.t_shutdown
    assert waited < 0.5 + 0.3, "exit %.3fs after SHUTDOWN waiting for a report that never " \
        "comes (bound 500 ms)" % waited


@scenario()
def platform_shutdown_report_wait_within_deadline(t):
    """SHUTDOWN with a 300 ms deadline and no report: exit 0 before the deadline."""
    t.start()
    inv = t.lam.invoke()
    t.lam.runtime_done(inv)
    with t.lam._cv:
        inv.reported = True
    t.lam.finish(inv)
    t.shut_down = True
    code, t_exit, killed = t.lam.shutdown("spindown", 300, flush_telemetry=0)
    assert not killed, "still running at the 300 ms SHUTDOWN deadline (waited for a report)"
    assert code == 0, "exit %s" % code


# --------------------------------------------------------------- metadata of our own events

def _own_metadata_case(t):
    t.start()
    inv = t.lam.invoke()
    emit_log(t, "a line\n", record_ms())
    t.lam.runtime_done(inv)
    t.lam.finish(inv)
    t.shutdown_ok()
    reqs = requests_with(t.apm, "metricset") + requests_with(t.apm, "log")
    assert reqs, "no metricset or log event delivered"
    metas = [check_own_request(r, "own events") for r in reqs]
    return metas


@scenario(env={"ELASTIC_APM_SERVICE_NAME": "svc-from-env"})
def platform_own_metadata_service_name(t):
    """No agent: our events go behind metadata built from the environment,
    valid per the intake schema, service name from ELASTIC_APM_SERVICE_NAME."""
    for m in _own_metadata_case(t):
        svc = m.get("service") or {}
        assert svc.get("name") == "svc-from-env", "service.name %r, want svc-from-env" % (
            svc.get("name"))
        assert (svc.get("agent") or {}).get("name") == "apm-ext", \
            "agent.name %r, want apm-ext" % (svc.get("agent") or {}).get("name")
    ms = t.apm.events("metricset")
    assert ms and ms[0]["faas"]["name"] == FUNCTION_NAME, "faas.name must stay the function's"


@scenario(env={"ELASTIC_APM_SERVICE_NAME": None})
def platform_own_metadata_function_name(t):
    """No agent, no ELASTIC_APM_SERVICE_NAME: the service is named after the function."""
    for m in _own_metadata_case(t):
        svc = m.get("service") or {}
        assert svc.get("name") == FUNCTION_NAME, "service.name %r, want %r" % (
            svc.get("name"), FUNCTION_NAME)
        assert (svc.get("agent") or {}).get("name") == "apm-ext", svc.get("agent")


@scenario()
def platform_own_metadata_from_agent_payload(t):
    """After an uncompressed agent payload, our events carry the agent's metadata."""
    t.start()
    meta = make_metadata(service_name="svc-identity-agent")
    inv = t.lam.invoke()
    tx = make_transaction(request_id=inv.request_id)
    assert agent_send(t.port, [meta, tx], encoding="identity") == 202
    assert agent_flush(t.port) == 202
    t.lam.runtime_done(inv)
    finish_with_report(t, inv, REPORT_1)
    inv2 = t.lam.invoke()
    t.lam.runtime_done(inv2)
    t.lam.finish(inv2)
    t.shutdown_ok()
    reqs = requests_with(t.apm, "metricset")
    assert reqs, "no metricset delivered"
    for r in reqs:
        m = check_own_request(r, "metricset")
        assert m == meta["metadata"], "metricset behind metadata %r, want the agent's" % m
