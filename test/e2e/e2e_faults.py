"""Reliability when the APM server fails: a fault matrix (README: Reliability).

    python3 test/e2e/e2e.py -k faults_

Each scenario plays one row of the fault matrix with a fake APM server that
misbehaves (503, refused connections, stalls, 400, 429, closed idle
connections) and prints it as one line

    MATRIX <scenario> sent=N delivered=N duplicated=N lost=N dropped=N rejected=N
           undelivered=N hold_max=S agent_max=S

(on one line): payloads the agent sent (one transaction each), how many of
them the fake APM server accepted (unique transaction ids), extra copies
accepted, the extension's own counts from its exit log line ("exit: N
payloads delivered (B bytes), D dropped, R rejected by the server" and
"exiting with N payloads (B bytes) undelivered"; these count the
extension's own metric/log payloads too), the longest hold of an invocation
(extension /next time - runtime response time, 0 when /next came
before the runtime answered) and the longest wait of an agent request for
its 202. The row is printed even when the scenario fails.

What the extension promises (README "What it does", SPEC-FOR-TESTS.md):
  - undelivered payloads stay queued and are retried; after the n-th
    consecutive failure the next attempt waits min(n-1,6)^2 s +-10% (the
    first retry at once); a 2xx resets the count;
  - 429, 5xx, timeouts, resets, refused connections are retried; another 4xx
    drops the payload (logged with the server's error text, counted as
    "rejected by the server" in the exit line);
  - syncflush holds an invocation at most ELASTIC_APM_DATA_FORWARDER_TIMEOUT
    after its end, and calls /next at once while the server is in backoff;
  - a full queue while the server fails drops the oldest payloads (logged,
    counted); agents always get 202 at once;
  - SHUTDOWN: exit 0 before deadlineMs, what could not go out is logged;
  - a kept-alive connection the server closed while we were frozen is
    replaced without losing or duplicating data.

Time bounds asserted are the documented ones plus margins (HOLD_AT_ONCE for
"at once", BACKOFF_SLACK on the backoff schedule); waits are on predicates.
Scenarios whose accounting must not be disturbed by the extension's own
payloads (metricsets from platform.report) run without telemetry
(telemetry=False: the agent's ?flushed=true ends each invocation).
"""

import collections
import re
import time

from e2e import (scenario, agent_send, agent_flush, agent_payload, tx_of, log_has,
                 first_delivery)

HOLD_AT_ONCE = 0.5     # s: "calls /next at once" (no delivery to wait for)
AGENT_AT_ONCE = 2.0    # s: an agent request must be answered 202 within this
FIRST_RETRY = 0.3      # s: "first retry at once"
BACKOFF_SLACK = 0.5    # s: added above the +10% of a backoff (scheduling, loop)
FORWARDER_SLACK = 0.75  # s: added to ELASTIC_APM_DATA_FORWARDER_TIMEOUT
MAX_BACKOFF_WAIT = 40.0  # s: longest backoff (36 s +10%) plus a margin

EXIT_RE = re.compile(r"exit: (\d+) payloads delivered \((\d+) bytes\), (\d+) dropped, "
                     r"(\d+) rejected by the server")
UNDELIVERED_RE = re.compile(r"exiting with (\d+) payloads \((\d+) bytes\) undelivered")
BACKOFF_RE = re.compile(r"failure (\d+), retry(?:ing)? in (-?\d+) ms")


# --------------------------------------------------------------- accounting

def exit_counts(logs):
    """The exit log line's numbers: dict delivered, bytes, dropped, rejected,
    undelivered, undelivered_bytes; None when there is no exit line."""
    out = None
    undelivered = (0, 0)
    for rec in logs:
        msg = str(rec.get("msg", ""))
        m = UNDELIVERED_RE.search(msg)
        if m:
            undelivered = (int(m.group(1)), int(m.group(2)))
        m = EXIT_RE.search(msg)
        if m:
            out = {"delivered": int(m.group(1)), "bytes": int(m.group(2)),
                   "dropped": int(m.group(3)), "rejected": int(m.group(4))}
    if out is not None:
        out["undelivered"], out["undelivered_bytes"] = undelivered
    return out


def logged_backoffs(t):
    """[(n, delay ms)] from the extension's "failure n, retry in D ms" lines."""
    return [(int(m.group(1)), int(m.group(2))) for m in
            BACKOFF_RE.finditer(t.lam.ext_log_text())]


def wait_failures(t, n, timeout=10):
    """Wait until the extension has logged its n-th consecutive failure (its
    own view: the fake's answer reaches it a little after the fake records it)."""
    t.wait_apm(lambda a: any(k >= n for k, _ in logged_backoffs(t)),
               "the extension to log failure %d" % n, timeout)


def check_logged_backoffs(t):
    """Every logged delay is min(n-1,6)^2 s +-10% for its failure number n."""
    got = logged_backoffs(t)
    assert got, "no \"failure n, retry in D ms\" line in the log"
    for n, ms in got:
        k = min(n - 1, 6) ** 2 * 1000
        assert k * 0.9 - 1 <= ms <= k * 1.1 + 1, "failure %d: retry in %d ms, want %d ms " \
            "+-10%% (all: %r)" % (n, ms, k, got)
    return got


def attempts(apm, tx):
    """Every intake request (any status, answered or not) that carried tx,
    in arrival order."""
    tid = tx_of(tx)["id"]
    return [r for r in apm.intake_requests()
            if any(k == "transaction" and o.get("id") == tid for k, o in r.lines)]


def accepted(apm, tx, since=None, before=None):
    """Intake requests answered 202 (answer written) that carried tx; with
    since/before only those whose request started in [since, before)."""
    return [r for r in attempts(apm, tx)
            if r.status == 202 and r.io_error is None
            and (since is None or r.t_start >= since)
            and (before is None or r.t_start < before)]


class Matrix:
    """One row of the fault matrix; print() emits the MATRIX line."""

    def __init__(self, t, name):
        self.t, self.name = t, name
        self.txs = []          # every transaction an agent sent (one per payload)
        self.holds = []        # t_next - t_runtime_done per invocation
        self.agent_max = 0.0   # longest agent request (send to 202)
        self.stale_before = None  # see copies()

    def copies(self, tx):
        """(accepted copies counted, stale copies). With stale_before set
        (a stalled server), requests that started before it may have been
        answered 202 after the extension gave up on them: at-least-once, not
        a duplicate the extension made; they count as one copy only when no
        later request carried tx."""
        if self.stale_before is None:
            return len(accepted(self.t.apm, tx)), 0
        post = len(accepted(self.t.apm, tx, since=self.stale_before))
        pre = len(accepted(self.t.apm, tx, before=self.stale_before))
        if post:
            return post, pre
        return min(pre, 1), max(pre - 1, 0)

    def tally(self):
        delivered = dup = stale = 0
        for tx in self.txs:
            n, s = self.copies(tx)
            stale += s
            if n:
                delivered += 1
                dup += n - 1
        return delivered, dup, stale

    def row(self):
        try:
            delivered, dup, stale = self.tally()
        except Exception as e:  # never hide the scenario's own failure
            return "MATRIX %s (could not tally: %s)" % (self.name, e)
        try:
            ex = exit_counts(self.t.logs())
        except AssertionError:
            ex = None
        q = lambda k: "?" if ex is None else str(ex[k])  # noqa: E731
        hold = max(0.0, max(self.holds)) if self.holds else float("nan")
        line = ("MATRIX %s sent=%d delivered=%d duplicated=%d lost=%d dropped=%s "
                "rejected=%s undelivered=%s hold_max=%.3fs agent_max=%.3fs" % (
                    self.name, len(self.txs), delivered, dup, len(self.txs) - delivered,
                    q("dropped"), q("rejected"), q("undelivered"), hold, self.agent_max))
        if stale:
            line += " stale_accepts=%d" % stale
        return line

    def print(self):
        print(self.row(), flush=True)

    def assert_once(self, txs=None, what="payload"):
        """Every tx in txs (default: all) accepted exactly once."""
        for i, tx in enumerate(self.txs if txs is None else txs):
            n, _ = self.copies(tx)
            assert n == 1, "%s %d (transaction %s) accepted %d times by the APM server " \
                "(attempts: %s)" % (what, i, tx_of(tx)["id"], n, attempts(self.t.apm, tx))


class Inv:
    def __init__(self, inv, txs, t_end, t_next):
        self.inv, self.txs, self.t_end, self.t_next = inv, txs, t_end, t_next

    @property
    def hold(self):
        return self.t_next - self.inv.t_runtime_done

    @property
    def hold_from_end(self):
        return self.t_next - self.t_end


def invocation(t, m, payloads=1, freeze=True, spans=2, finish_timeout=10, what=""):
    """One syncflush invocation: the agent sends `payloads` requests (one
    transaction each) and flushes, the runtime answers, the extension calls
    /next. Records the transactions and the hold in m; returns an Inv."""
    inv = t.lam.invoke()
    txs = []
    for i in range(payloads):
        lines, tx = agent_payload(inv, spans=spans)
        t0 = time.monotonic()
        s = agent_send(t.port, lines)
        took = time.monotonic() - t0
        m.agent_max = max(m.agent_max, took)
        assert s == 202, "%sagent request %d answered %s, want 202" % (what, i, s.status)
        assert took <= AGENT_AT_ONCE, "%sagent request %d held %.3fs before its 202" % (
            what, i, took)
        txs.append(tx)
        m.txs.append(tx)
    t_end = time.monotonic()
    t0 = time.monotonic()
    st = agent_flush(t.port)
    m.agent_max = max(m.agent_max, time.monotonic() - t0)
    assert st == 202, "%s?flushed=true answered %s" % (what, st.status)
    t.lam.runtime_done(inv)
    t_next = t.lam.finish(inv, freeze=freeze, timeout=finish_timeout)
    r = Inv(inv, txs, t_end, t_next)
    m.holds.append(r.hold)
    return r


def all_accepted(txs):
    return lambda a: all(accepted(a, tx) for tx in txs)


def check_exit(t, **want):
    """Exit line present; the given counts equal (e.g. dropped=0)."""
    ex = exit_counts(t.logs())
    assert ex is not None, "no exit line (\"exit: N payloads delivered ...\") in the log"
    for k, v in want.items():
        assert ex[k] == v, "exit line says %s=%d, want %d (%r)" % (k, ex[k], v, ex)
    return ex


def gap(a, b):
    """Time from the answer to request a to the start of request b."""
    return b.t_start - a.t_end


def backoff_bounds(n):
    """Allowed wait after the n-th consecutive failure: min(n-1,6)^2 s +-10%."""
    k = min(n - 1, 6) ** 2
    return k * 0.9 - 0.05, k * 1.1 + BACKOFF_SLACK


# --------------------------------------------------------------- scenarios

@scenario(telemetry=False)
def faults_503_then_recovery(t):
    """503 for a while: retried on the backoff schedule, then all delivered once."""
    m = Matrix(t, "faults_503_then_recovery")
    try:
        t.start()
        t.apm.set_mode("status", 503)
        r1 = invocation(t, m, freeze=False, what="invocation 1 (503): ")
        assert r1.hold_from_end <= HOLD_AT_ONCE, "invocation 1: /next %.3fs after the end " \
            "while the APM server answers 503 (should be at once: backing off)" % (
                r1.hold_from_end)
        a_tx = r1.txs[0]
        t.wait_apm(lambda a: len([r for r in attempts(a, a_tx) if r.status == 503]) >= 3,
                   "three 503 answers to payload A", timeout=6)
        # B must come in the backoff after failure 3, not while A's third
        # attempt is still on its way back (then both count, see the report)
        wait_failures(t, 3)
        att = [r for r in attempts(t.apm, a_tx) if r.status is not None]
        g1, g2 = gap(att[0], att[1]), gap(att[1], att[2])
        assert g1 <= FIRST_RETRY, "first retry %.3fs after the first 503 (want at once)" % g1
        lo, hi = backoff_bounds(2)
        assert lo <= g2 <= hi, "retry after the 2nd failure came after %.3fs, want %.2f-" \
            "%.2fs" % (g2, lo, hi)
        r2 = invocation(t, m, freeze=False, what="invocation 2 (503, in backoff): ")
        assert r2.hold_from_end <= HOLD_AT_ONCE, "invocation 2: /next %.3fs after the end " \
            "while backing off" % r2.hold_from_end
        t_ok = time.monotonic()
        t.apm.set_mode("ok")
        t.wait_apm(all_accepted(m.txs), "both payloads after recovery",
                   timeout=backoff_bounds(3)[1] + 3)
        att = sorted(attempts(t.apm, a_tx), key=lambda r: r.t_start)
        last503 = [r for r in att if r.status == 503][-1]
        first_ok = first_delivery(t.apm, a_tx)
        # the attempt after the 3rd consecutive failure waits 4 s +-10%
        lo, hi = backoff_bounds(3)
        g3 = gap(last503, first_ok)
        assert first_ok.t_start > t_ok and lo <= g3 <= hi, "retry after the 3rd failure " \
            "came after %.3fs, want %.2f-%.2fs (attempts of A: %s)" % (g3, lo, hi, att)
        b_att = attempts(t.apm, r2.txs[0])
        early = [r for r in b_att if r.t_start < last503.t_end + lo]
        assert not early, "payload B was sent during the backoff: %s" % early
        t.shutdown_ok()
        m.assert_once()
        check_exit(t, dropped=0, rejected=0, undelivered=0)
        got = check_logged_backoffs(t)
        assert [n for n, _ in got] == [1, 2, 3], "want failures 1, 2, 3 logged, got %r" % got
    finally:
        m.print()


@scenario()
def faults_down_two_invocations_then_up(t):
    """Refused for two invocations (not held), then up: nothing lost or duplicated."""
    m = Matrix(t, "faults_down_two_invocations_then_up")
    try:
        t.start()
        t.apm.set_mode("down")
        for i in (1, 2):
            r = invocation(t, m, what="invocation %d (down): " % i)
            assert r.hold <= HOLD_AT_ONCE, "invocation %d: /next %.3fs after the runtime's " \
                "response while the APM server is down (should not be held)" % (i, r.hold)
        t.apm.set_mode("ok")
        r3 = invocation(t, m, freeze=False, what="invocation 3 (up again): ")
        assert r3.hold_from_end <= 3.0 + FORWARDER_SLACK, "invocation 3: /next held %.3fs " \
            "after the end (forwarder timeout 3s)" % r3.hold_from_end
        t.wait_apm(all_accepted(m.txs), "the three payloads after recovery",
                   timeout=MAX_BACKOFF_WAIT)
        t.shutdown_ok()
        m.assert_once()
        check_exit(t, dropped=0, rejected=0, undelivered=0)
        check_logged_backoffs(t)
    finally:
        m.print()


@scenario()
def faults_down_throughout(t):
    """Refused throughout: invocations not held; exit 0 in time, undelivered logged."""
    m = Matrix(t, "faults_down_throughout")
    try:
        t.start()
        t.apm.set_mode("down")
        for i in (1, 2, 3):
            r = invocation(t, m, what="invocation %d (down): " % i)
            assert r.hold <= HOLD_AT_ONCE, "invocation %d: /next %.3fs after the runtime's " \
                "response while the APM server is down" % (i, r.hold)
        t_exit = t.shutdown_ok()
        assert t_exit - t.lam.t_shutdown < 2.0, "exit %.3fs after SHUTDOWN" % (
            t_exit - t.lam.t_shutdown)
        ex = check_exit(t)
        assert ex["undelivered"] >= 3 and ex["undelivered_bytes"] > 0, \
            "want \"exiting with N>=3 payloads (B bytes) undelivered\" logged, exit " \
            "counts %r" % ex
        lines = log_has(t.logs(), ("error", "warn", "warning"), "undelivered")
        assert lines, "the undelivered payloads are not logged at warn/error level"
        assert not [r for r in t.apm.intake_requests() if r.status == 202], \
            "the fake APM server accepted data while down?"
        check_logged_backoffs(t)
    finally:
        m.print()


@scenario(env={"ELASTIC_APM_DATA_FORWARDER_TIMEOUT": "1s"})
def faults_stalling_server(t):
    """Server never answers: each invocation held <= forwarder timeout (1s); delivered later."""
    m = Matrix(t, "faults_stalling_server")
    try:
        t.start()
        t.apm.set_mode("stall")
        for i in (1, 2):
            r = invocation(t, m, what="invocation %d (stall): " % i, finish_timeout=6)
            assert r.hold_from_end <= 1.0 + FORWARDER_SLACK, "invocation %d: /next held " \
                "%.3fs after its end with ELASTIC_APM_DATA_FORWARDER_TIMEOUT=1s" % (
                    i, r.hold_from_end)
        m.stale_before = time.monotonic()
        t.apm.set_mode("ok")
        r = invocation(t, m, freeze=False, what="invocation 3 (answering again): ")
        assert r.hold_from_end <= 1.0 + FORWARDER_SLACK, "invocation 3: /next held %.3fs" % (
            r.hold_from_end)
        t.wait_apm(lambda a: all(m.copies(tx)[0] for tx in m.txs),
                   "all payloads after the stall", timeout=MAX_BACKOFF_WAIT)
        t.shutdown_ok()
        m.assert_once()
        check_exit(t, dropped=0, rejected=0, undelivered=0)
        check_logged_backoffs(t)
    finally:
        m.print()


@scenario()
def faults_idle_close_while_frozen(t):
    """Server closes kept-alive connections while we are frozen: nothing lost or duplicated."""
    m = Matrix(t, "faults_idle_close_while_frozen")
    handled = []  # requests the fake has completely finished with
    t.apm.on_request = handled.append
    try:
        t.start()
        for i in range(1, 5):
            r = invocation(t, m, what="invocation %d: " % i)
            for tx in r.txs:
                req = first_delivery(t.apm, tx)
                assert req is not None and req.t_end <= r.t_next, "invocation %d: data not " \
                    "delivered before /next (after the server closed the idle connection)" % i
            assert r.hold_from_end <= 1.0, "invocation %d: /next held %.3fs: the dead " \
                "connection cost a failure/backoff?" % (i, r.hold_from_end)
            assert t.lam.frozen
            # The fake marks a request 202 before it writes the (empty) body;
            # dropping its socket in between records a broken pipe on a
            # response the extension already has. Let it finish first.
            t.wait_apm(lambda a: all(any(h is r for h in handled) for r in a.requests),
                       "the fake to finish its answers", timeout=5)
            t.apm.drop_connections()  # the sandbox is frozen right now
        t.shutdown_ok()
        m.assert_once()
        ex = check_exit(t, dropped=0, rejected=0, undelivered=0)
        fails = log_has(t.logs(), ("warn", "warning", "error"), "delivery to the APM server")
        assert not fails, "a dead kept-alive connection was logged as a delivery failure: " \
            "%r" % fails[:2]
        assert ex["delivered"] >= 4
        assert t.apm.connections_total >= 4, "the fake saw %d connections: the dropped " \
            "ones were not replaced?" % t.apm.connections_total
    finally:
        m.print()


@scenario(telemetry=False, allow_apm_errors=True)
def faults_400_one_payload(t):
    """400 for one payload: that one dropped (logged with the server's text, counted); rest flows."""
    m = Matrix(t, "faults_400_one_payload")
    try:
        t.start()
        r1 = invocation(t, m, what="invocation 1: ")
        req = first_delivery(t.apm, r1.txs[0])
        assert req is not None and req.t_end <= r1.t_next, "payload 1 not delivered"
        t.apm.fail_next(1, 400)
        r2 = invocation(t, m, what="invocation 2 (400): ")
        assert r2.hold_from_end <= 1.0, "invocation 2: /next held %.3fs after a 400" % (
            r2.hold_from_end)
        r3 = invocation(t, m, what="invocation 3: ")
        req = first_delivery(t.apm, r3.txs[0])
        assert req is not None and req.t_end <= r3.t_next, "payload 3 not delivered " \
            "before /next after a 400 for payload 2"
        t.shutdown_ok()
        bad = attempts(t.apm, r2.txs[0])
        assert [r.status for r in bad] == [400], "payload 2: attempts answered %r, want one " \
            "400 and no retry" % [r.status for r in bad]
        m.assert_once([r1.txs[0], r3.txs[0]])
        check_exit(t, rejected=1, dropped=0, undelivered=0)
        lines = log_has(t.logs(), ("error", "warn", "warning"), "forced status 400")
        assert lines, "the rejection is not logged with the server's error text " \
            "(\"fake_apm: forced status 400\")"
    finally:
        m.print()


@scenario(telemetry=False)
def faults_429_then_ok(t):
    """429 twice: retried (first at once, then after ~1s), delivered exactly once."""
    m = Matrix(t, "faults_429_then_ok")
    try:
        t.start()
        t.apm.fail_next(2, 429)
        r1 = invocation(t, m, what="invocation 1 (429): ")
        assert r1.hold_from_end <= 1.0 + FORWARDER_SLACK, "invocation 1: /next held %.3fs" % (
            r1.hold_from_end)
        r2 = invocation(t, m, freeze=False, what="invocation 2: ")
        t.wait_apm(all_accepted(m.txs), "both payloads after the 429s", timeout=10)
        att = [r for r in attempts(t.apm, r1.txs[0]) if r.status is not None]
        assert [r.status for r in att[:3]] == [429, 429, 202], "payload 1 answered %r" % (
            [r.status for r in att])
        assert gap(att[0], att[1]) <= FIRST_RETRY, "first retry after a 429 came after " \
            "%.3fs (want at once)" % gap(att[0], att[1])
        t.shutdown_ok()
        m.assert_once()
        check_exit(t, dropped=0, rejected=0, undelivered=0)
        check_logged_backoffs(t)
        m.assert_once(r2.txs, "payload sent after the 429s")
    finally:
        m.print()


@scenario(telemetry=False, env={"ELASTIC_APM_LAMBDA_AGENT_DATA_BUFFER_SIZE": "3"})
def faults_small_queue_server_down(t):
    """Queue of 3, server down, 6 payloads: all get 202 at once; oldest 3 dropped, newest 3 delivered."""
    m = Matrix(t, "faults_small_queue_server_down")
    try:
        t.start()
        t.apm.set_mode("down")
        r = invocation(t, m, payloads=6, freeze=False, spans=1,
                       what="invocation 1 (down, queue of 3): ")
        assert r.hold <= HOLD_AT_ONCE, "/next %.3fs after the runtime's response while down" \
            % r.hold
        t.apm.set_mode("ok")
        newest, oldest = m.txs[3:], m.txs[:3]
        t.wait_apm(all_accepted(newest), "the 3 newest payloads after recovery",
                   timeout=MAX_BACKOFF_WAIT)
        t.shutdown_ok()
        got_old = [i + 1 for i, tx in enumerate(oldest) if accepted(t.apm, tx)]
        assert not got_old, "payloads %s (the oldest) were delivered, want them dropped " \
            "(the queue holds 3)" % got_old
        m.assert_once(newest, "newest payload")
        ex = check_exit(t, rejected=0)
        assert ex["dropped"] == 3, "exit line counts %d dropped, want 3 (%r)" % (
            ex["dropped"], ex)
        lines = log_has(t.logs(), ("warn", "warning", "error"), "dropped")
        assert lines, "dropping payloads from a full queue is not logged"
    finally:
        m.print()


@scenario(telemetry=False)
def faults_stall_at_shutdown(t):
    """Server stalls through SHUTDOWN: exit 0 before the deadline, every payload accounted for."""
    m = Matrix(t, "faults_stall_at_shutdown")
    try:
        t.start()
        t.apm.set_mode("stall")
        for i in (1, 2):
            r = invocation(t, m, what="invocation %d (stall): " % i, finish_timeout=8)
            assert r.hold_from_end <= 3.0 + FORWARDER_SLACK, "invocation %d: /next held " \
                "%.3fs after its end (forwarder timeout 3s)" % (i, r.hold_from_end)
        t_exit = t.shutdown_ok(deadline_ms=1500)
        assert t_exit - t.lam.t_shutdown < 1.5, "exit %.3fs after SHUTDOWN (deadline 1.5s)" % (
            t_exit - t.lam.t_shutdown)
        ex = check_exit(t, dropped=0, rejected=0)
        delivered, dup, _ = m.tally()
        assert ex["undelivered"] == len(m.txs) - delivered, "%d payloads sent, %d accepted, " \
            "but the exit log says %d undelivered" % (len(m.txs), delivered, ex["undelivered"])
        if ex["undelivered"]:
            assert log_has(t.logs(), ("error", "warn", "warning"), "undelivered"), \
                "undelivered payloads not logged"
    finally:
        m.print()


@scenario(telemetry=False, env={"ELASTIC_APM_SEND_STRATEGY": "background"})
def faults_slow_server_shutdown(t):
    """Slow server (0.4 s an answer), SHUTDOWN at once: exit in time; delivered + undelivered = sent."""
    m = Matrix(t, "faults_slow_server_shutdown")
    try:
        t.start()
        t.apm.set_mode("slow", 0.4)
        r = invocation(t, m, payloads=5, what="background invocation (slow server): ")
        assert r.hold <= HOLD_AT_ONCE, "background: /next %.3fs after the runtime's " \
            "response" % r.hold
        t_exit = t.shutdown_ok(deadline_ms=2000)
        assert t_exit - t.lam.t_shutdown < 2.0
        ex = check_exit(t, dropped=0, rejected=0)
        delivered, dup, _ = m.tally()
        assert dup == 0, "%d duplicate deliveries" % dup
        assert delivered + ex["undelivered"] == len(m.txs), "%d sent, %d accepted, %d logged " \
            "undelivered: some payloads are unaccounted for" % (
                len(m.txs), delivered, ex["undelivered"])
        assert delivered >= 1, "nothing delivered in a 2 s SHUTDOWN with a 0.4 s server"
    finally:
        m.print()
