"""End-to-end scenarios with Lambda's real timing (issue "Lambda's real timing").

    python3 test/e2e/e2e.py -k timing_

The test bed is as unkind as production Lambda here:

  * default timings: a 3 s function timeout, ELASTIC_APM_DATA_FORWARDER_TIMEOUT
    unset (3 s), a function that works 0.8 s before it returns;
  * FakeLambda's invocation-deadline rule (every scenario, see
    fake_lambda.DEADLINE_MARGIN_MS): the /next ending an invocation must come
    before its deadline; the scenarios here also check it themselves, so that
    the failure says which invocation and by how much;
  * late telemetry (FakeLambda telemetry="late"): invocation N's last
    function log lines, platform.runtimeDone and platform.report, and the
    platform.start of N+1, arrive only after INVOKE N+1 was handed to the
    extension, in stream order;
  * agent requests cut short.

"Not held" means the extension calls /next soon after the invocation ended
(the agent's flush): t_next - t_end < NOT_HELD_S.

All names start with timing_ so that `-k timing_` picks them. Waiting is on
conditions with timeouts; the only plain waits model a function at work
(function_runs), never a synchronisation.
"""

import gzip
import json
import socket
import struct
import threading
import time
import uuid

from e2e import (scenario, agent_send, agent_flush, agent_payload, make_metadata,
                 make_transaction, http_request, ndjson, tx_of, tx_delivered, free_port,
                 first_delivery, log_has, AgentStream, AGENT_UA)
from fake_lambda import DEADLINE_MARGIN_MS

FUNCTION_S = 0.8          # the handler's work before it returns (3 s timeout)
NOT_HELD_S = 0.5          # /next this soon after the end = not held
DEFAULT_TIMEOUT_MS = 3000  # Lambda's default function timeout
REG_CTYPE = "application/vnd.elastic.apm.transaction+ndjson"


# --------------------------------------------------------------- helpers

def function_runs(seconds=FUNCTION_S):
    """The function works for a while. Models time passing in the function;
    not a synchronisation (nothing waits on anything here)."""
    threading.Event().wait(seconds)


def check_deadline(inv, t_next, what, problems):
    """The /next ending inv must come before its deadline (the fake's clock,
    the fake's margin)."""
    if t_next >= inv.t_deadline - DEADLINE_MARGIN_MS / 1000.0:
        problems.append("%s: /next %.0f ms after the deadline (%.0f ms after INVOKE, "
                        "function timeout %d ms)" % (
                            what, (t_next - inv.t_deadline) * 1000,
                            (t_next - inv.t_invoke) * 1000, inv.timeout_ms))


def check_not_held(t_end, t_next, what, problems, why):
    if t_next - t_end >= NOT_HELD_S:
        problems.append("%s: /next held %.0f ms after the end of the invocation (%s)"
                        % (what, (t_next - t_end) * 1000, why))


def report(problems):
    assert not problems, "; ".join(problems)


def started_transaction(inv):
    """The transaction as the Node.js agent registers it at the start."""
    tx = make_transaction(request_id=inv.request_id, duration=0)
    del tx["transaction"]["outcome"], tx["transaction"]["result"]
    return tx


def register(t, inv, tx):
    """POST /register/transaction, as the real Node.js agent does."""
    st, _, body = http_request(t.port, "POST", "/register/transaction",
                               ndjson([make_metadata(), tx]),
                               {"Content-Type": REG_CTYPE,
                                "x-elastic-aws-request-id": inv.request_id})
    assert st == 200, "/register/transaction answered %s: %r" % (st, body[:200])


def metricsets_for(apm, request_id):
    return [o for o in apm.events("metricset")
            if (o.get("faas") or {}).get("execution") == request_id]


def samples_of(m):
    return {k: (v or {}).get("value") for k, v in (m.get("samples") or {}).items()}


def partial_intake(apm):
    """Intake requests that reached the APM server without a whole, valid
    body: the client went away mid-body (io_error), it was never answered,
    or what arrived does not decode / validate."""
    return [r for r in apm.intake_requests()
            if r.io_error is not None or r.status is None or r.errors]


# --------------------------------------------------------------- A stalling APM server

@scenario(env={"ELASTIC_APM_DATA_FORWARDER_TIMEOUT": None})
def timing_stalling_server_default_timeouts(t):
    """Defaults (3 s function, 3 s forwarder timeout), an APM server that
    answers only after 10 s, a function that runs 0.8 s: /next before the
    deadline; once the server counts as failing, the next invocations are
    not held; the data is kept and delivered once the server is back."""
    t.start()
    t.apm.set_mode("slow", 10.0)
    problems, txs = [], []
    for i in range(3):
        inv = t.lam.invoke()                    # deadline: 3000 ms
        function_runs()
        lines, tx = agent_payload(inv)
        txs.append(tx)
        assert agent_send(t.port, lines) == 202, "invocation %d: agent POST" % i
        t_end = time.monotonic()
        assert agent_flush(t.port) == 202, "invocation %d: agent flush" % i
        t.lam.runtime_done(inv)
        t_next = t.lam.finish(inv, timeout=10)
        check_deadline(inv, t_next, "invocation %d" % (i + 1), problems)
        if i > 0:
            check_not_held(t_end, t_next, "invocation %d" % (i + 1), problems,
                           "the APM server did not answer the previous delivery within "
                           "the 3 s forwarder timeout: it is failing, /next must come "
                           "at once and the data be kept")
    # The server recovers; later invocations (thawed sandboxes) deliver what was
    # kept, retried with backoff.
    t.apm.set_mode("ok")
    for i in range(3, 10):
        if all(tx_delivered(t.apm, tx) for tx in txs):
            break
        inv = t.lam.invoke()
        function_runs()
        lines, tx = agent_payload(inv)
        txs.append(tx)
        assert agent_send(t.port, lines) == 202, "invocation %d: agent POST" % i
        assert agent_flush(t.port) == 202, "invocation %d: agent flush" % i
        t.lam.runtime_done(inv)
        t_next = t.lam.finish(inv, timeout=10)
        check_deadline(inv, t_next, "invocation %d" % (i + 1), problems)
    t.shutdown_ok()
    lost = [i + 1 for i, tx in enumerate(txs) if not tx_delivered(t.apm, tx)]
    if lost:
        problems.append("transactions of invocations %s never delivered after the APM "
                        "server recovered (the data must be kept)" % lost)
    report(problems)


# --------------------------------------------------------------- Secrets Manager unreachable

SM_TOKEN = "sm-token-" + uuid.uuid4().hex


def _secrets_no_hold(t, env):
    t.start(env)
    problems = []
    for i in range(3):
        inv = t.lam.invoke()
        function_runs()
        lines, tx = agent_payload(inv)
        assert agent_send(t.port, lines) == 202, "invocation %d: agent POST" % i
        t_end = time.monotonic()
        assert agent_flush(t.port) == 202, "invocation %d: agent flush" % i
        t.lam.runtime_done(inv)
        t_next = t.lam.finish(inv, timeout=10)
        check_deadline(inv, t_next, "invocation %d" % (i + 1), problems)
        check_not_held(t_end, t_next, "invocation %d" % (i + 1), problems,
                       "the secret cannot be fetched: waiting for it helps nobody")
    t.shutdown_ok()
    unauth = [r for r in t.apm.requests if r.headers.get("Authorization") != "Bearer " +
              SM_TOKEN]
    if unauth:
        problems.append("%d requests reached the APM server without the secret's auth "
                        "(first: %r with Authorization %r)" % (
                            len(unauth), unauth[0], unauth[0].headers.get("Authorization")))
    report(problems)


@scenario(apm={"token": SM_TOKEN}, env={"ELASTIC_APM_SECRET_TOKEN": None,
                                        "ELASTIC_APM_DATA_FORWARDER_TIMEOUT": None})
def timing_secrets_unreachable_no_hold(t):
    """Secrets Manager configured, its endpoint refuses connections (closed
    port): no invocation is held, every /next before the deadline; nothing
    goes out without auth."""
    closed = free_port()
    _secrets_no_hold(t, {
        "ELASTIC_APM_SECRETS_MANAGER_SECRET_TOKEN_ID": "apm/secret-token",
        "ELASTIC_APM_LAMBDA_AWS_ENDPOINT": "https://127.0.0.1:%d" % closed})


@scenario(apm={"token": SM_TOKEN}, env={"ELASTIC_APM_SECRET_TOKEN": None,
                                        "ELASTIC_APM_DATA_FORWARDER_TIMEOUT": None})
def timing_secrets_no_credentials_no_hold(t):
    """Secrets Manager configured but no AWS credentials in the environment
    (the call can never be signed): no invocation is held, every /next
    before the deadline; nothing goes out without auth."""
    closed = free_port()
    _secrets_no_hold(t, {
        "ELASTIC_APM_SECRETS_MANAGER_SECRET_TOKEN_ID": "apm/secret-token",
        "ELASTIC_APM_LAMBDA_AWS_ENDPOINT": "https://127.0.0.1:%d" % closed,
        "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
        "AWS_SESSION_TOKEN": None})


# --------------------------------------------------------------- late telemetry

@scenario(telemetry="late")
def timing_late_telemetry_attribution(t):
    """Late telemetry: invocation N's last log lines, runtimeDone and report
    arrive after INVOKE N+1 (and after N+1's /register/transaction). Every
    log event carries the request id and trace/transaction ids of the
    invocation that printed the line; every metricset its own invocation's
    request id; faas.timeout is exactly 3000 (deadlineMs - platform.start)."""
    t.start()
    invs, txs, lines_of = [], [], []
    for i in range(3):
        inv = t.lam.invoke()                   # deadline 3000 ms
        t.lam.wait_delivered(inv)
        tx = started_transaction(inv)
        register(t, inv, tx)
        # the previous invocation's end and this one's platform.start: only now
        t.lam.release_telemetry()
        lines = ["2024-01-01T00:00:0%d.000Z\t%s\tINFO\tinvocation %d line %s\n"
                 % (i, inv.request_id, i + 1, which) for which in ("first", "last")]
        t.lam.log_line(lines[0])
        function_runs(0.05)
        done = make_transaction(request_id=inv.request_id, id=tx_of(tx)["id"],
                                trace_id=tx_of(tx)["trace_id"])
        assert agent_send(t.port, [make_metadata(), done]) == 202
        t.lam.log_line(lines[1])               # printed just before the handler returns
        assert agent_flush(t.port) == 202
        t.lam.runtime_done(inv)
        # hold this invocation's tail until the next one is registered
        t.lam.hold_telemetry()
        t.lam.finish(inv)
        invs.append(inv)
        txs.append(tx)
        lines_of.append(lines)
    t.shutdown_ok()                            # releases the last tail

    problems = []
    logs = t.apm.events("log")
    for n, (inv, tx, lines) in enumerate(zip(invs, txs, lines_of), 1):
        for line in lines:
            msg = line[:-1]
            got = [o for o in logs if o.get("message") == msg]
            if len(got) != 1:
                problems.append("%r: %d log events, want 1" % (msg[-26:], len(got)))
                continue
            o = got[0]
            ex = (o.get("faas") or {}).get("execution")
            if ex != inv.request_id:
                who = [k + 1 for k, v in enumerate(invs) if v.request_id == ex]
                problems.append("%r: faas.execution is %s, want invocation %d's" % (
                    msg[-26:], "invocation %d's" % who[0] if who else repr(ex), n))
            for key, want in (("trace.id", tx_of(tx)["trace_id"]),
                              ("transaction.id", tx_of(tx)["id"])):
                if o.get(key) != want:
                    who = [k + 1 for k, v in enumerate(txs)
                           if o.get(key) in (tx_of(v)["trace_id"], tx_of(v)["id"])]
                    problems.append("%r: %s is %s, want invocation %d's" % (
                        msg[-26:], key, "invocation %d's" % who[0] if who
                        else repr(o.get(key)), n))
        ms = metricsets_for(t.apm, inv.request_id)
        if len(ms) != 1:
            problems.append("invocation %d: %d metricsets with its request id, want 1" % (
                n, len(ms)))
        else:
            to = samples_of(ms[0]).get("faas.timeout")
            if to != DEFAULT_TIMEOUT_MS:
                problems.append("invocation %d: faas.timeout %r, want exactly %d "
                                "(deadlineMs - platform.start time)" % (n, to,
                                                                        DEFAULT_TIMEOUT_MS))
    n_ms = t.apm.count("metricset")
    if n_ms != len(invs):
        problems.append("%d metricsets in all, want %d" % (n_ms, len(invs)))
    report(problems)


@scenario()
def timing_platform_start_before_invoke(t):
    """platform.start reaches the extension before its INVOKE (the INVOKE is
    handed over 300 ms late, telemetry is not): faas.timeout is still
    exactly the function's timeout, 3000 (deadlineMs - platform.start)."""
    t.start()
    early = []                 # invocations whose platform.start was in first
    for i in range(3):
        inv = t.lam.invoke(ext_delay=0.3)
        t.lam.wait_telemetry_idle()            # platform.start answered 200...
        with t.lam._cv:
            if inv.t_handed is None:           # ...and the INVOKE not yet written
                early.append(inv)
        t.lam.wait_delivered(inv)
        assert agent_flush(t.port) == 202
        t.lam.runtime_done(inv)
        t.lam.finish(inv)
    t.shutdown_ok()
    assert early, "setup: platform.start never reached the extension before its INVOKE " \
        "(machine too slow?)"
    problems = []
    for inv in early:
        n = t.lam.invocations.index(inv) + 1
        ms = metricsets_for(t.apm, inv.request_id)
        if len(ms) != 1:
            problems.append("invocation %d: %d metricsets, want 1" % (n, len(ms)))
            continue
        to = samples_of(ms[0]).get("faas.timeout")
        if to != DEFAULT_TIMEOUT_MS:
            problems.append("invocation %d: faas.timeout %r, want exactly %d "
                            "(deadlineMs - platform.start time)" % (n, to, DEFAULT_TIMEOUT_MS))
    report(problems)


# --------------------------------------------------------------- a report for nobody

@scenario()
def timing_report_unknown_request_id(t):
    """A platform.report for a request id the extension never saw gives no
    metricset (nothing invented); the real invocation still gets its own."""
    t.start()
    inv = t.lam.invoke()
    stranger = str(uuid.uuid4())
    t.lam.emit([{"type": "platform.report", "record": {
        "requestId": stranger, "status": "success",
        "metrics": {"durationMs": 12.5, "billedDurationMs": 13, "memorySizeMB": 128,
                    "maxMemoryUsedMB": 60}}}])
    t.lam.wait_telemetry_idle()
    assert agent_flush(t.port) == 202
    t.lam.runtime_done(inv)
    t.lam.finish(inv)
    t.shutdown_ok()
    got = metricsets_for(t.apm, stranger)
    problems = []
    if got:
        problems.append("%d metricsets for a request id the extension never saw: %s" % (
            len(got), json.dumps(got[0])[:400]))
    mine = metricsets_for(t.apm, inv.request_id)
    if len(mine) != 1:
        problems.append("the real invocation: %d metricsets, want 1" % len(mine))
    report(problems)


# --------------------------------------------------------------- cut agent bodies

def _cut_stream(t, inv):
    """An agent opens a chunked gzip intake request and sends only the first
    10 bytes of its body. Returns the open socket."""
    lines, _ = agent_payload(inv)
    body = gzip.compress(ndjson(lines))
    head = ("POST /intake/v2/events HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: %s\r\n"
            "Content-Type: application/x-ndjson\r\nContent-Encoding: gzip\r\n"
            "Transfer-Encoding: chunked\r\n\r\n" % (t.port, AGENT_UA)).encode()
    s = socket.create_connection(("127.0.0.1", t.port), timeout=5)
    s.sendall(head + b"%x\r\n" % len(body) + body[:10])
    return s


def _check_no_partial(t):
    bad = partial_intake(t.apm)
    assert not bad, "%d partial intake requests reached the APM server (the agent's " \
        "body was cut after 10 bytes): %s" % (len(bad), "; ".join(
            "%r io_error=%r errors=%r body=%d bytes" % (r, r.io_error, r.errors[:2],
                                                         len(r.body)) for r in bad[:3]))


@scenario()
def timing_cut_body_never_reaches_server(t):
    """An agent sends 10 bytes of a chunked gzip body, then the function
    times out (3 s): no aborted or partial intake request reaches the APM
    server."""
    t.start()
    inv = t.lam.invoke()                       # 3000 ms
    s = _cut_stream(t, inv)
    try:
        code, t_exit, killed = t.lam.timeout(inv)
        t.shut_down = True
        assert code == 0 and not killed, "exit %s killed=%s after the timeout" % (code, killed)
    finally:
        s.close()
    _check_no_partial(t)


@scenario()
def timing_cut_body_agent_closes(t):
    """An agent sends 10 bytes of a chunked gzip body and its connection
    closes (the runtime died): no aborted or partial intake request reaches
    the APM server; the invocation ends as usual."""
    t.start()
    inv = t.lam.invoke()
    s = _cut_stream(t, inv)
    # give a streaming forwarder the chance to start (bounded; not an assertion)
    t.apm.wait_for(lambda a: a.intake_requests(), 1.0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()                                  # RST: the agent is gone
    lines, tx = agent_payload(inv)
    assert agent_send(t.port, lines) == 202, "a later, whole agent request"
    assert agent_flush(t.port) == 202
    t.lam.runtime_done(inv)
    t.lam.finish(inv)
    t.shutdown_ok()
    assert tx_delivered(t.apm, tx), "the whole request after the cut one was not delivered"
    _check_no_partial(t)


@scenario(env={"ELASTIC_APM_DATA_FORWARDER_TIMEOUT": "1s"})
def timing_agent_pauses_past_forwarder_timeout(t):
    """An agent request pauses mid-body past the forwarder timeout: the upstream request
    waits for it (the server is not the one late), one request, no timeout."""
    t.start()
    inv = t.lam.invoke()
    lines, tx = agent_payload(inv, spans=60, pad=1000)
    s = AgentStream(t.port, "identity")
    s.write(lines[:50])  # over a queue block (32 KiB): forwarding starts, streamed
    function_runs(1.6)  # the function works on, its agent's request open
    s.write(lines[3:])
    st = s.finish()
    assert st == 202, "the paused request answered %s" % st
    assert agent_flush(t.port) == 202
    t.lam.runtime_done(inv)
    t.lam.finish(inv)
    req = first_delivery(t.apm, tx)
    assert req is not None, "the paused payload was not delivered"
    assert req.body == bytes(s.raw), "upstream body (%d bytes) differs from the agent's " \
        "(%d bytes)" % (len(req.body), len(s.raw))
    tid = tx_of(tx)["id"]
    reqs = [r for r in t.apm.intake_requests()
            if r.io_error is not None or r.status != 202 or
            any(k == "transaction" and o.get("id") == tid for k, o in r.lines)]
    assert len(reqs) == 1, "%d upstream intake requests for one agent request, want 1 " \
        "(statuses %s, errors %s)" % (len(reqs), [r.status for r in reqs],
                                      [r.io_error for r in reqs])
    late = log_has(t.logs(), ("warn", "warning", "error"), "timed out")
    assert not late, "the upstream request timed out while the agent paused: %r" % late[:2]
