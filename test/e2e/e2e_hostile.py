"""Hostile clients on the extension's local ports, during legitimate traffic.

    python3 test/e2e/e2e.py -k hostile_

Anything in the sandbox can connect to the intake port (127.0.0.1/::1) and to
the telemetry listener (0.0.0.0). In every scenario a legitimate agent keeps
running invocations (syncflush: send, ?flushed=true, runtime response,
/next) while a hostile client on the same port misbehaves; every one of the
agent's invocations must get its data to the APM server before /next, and
each transaction exactly once. The extension must keep answering, keep its
peak RSS (VmHWM from /proc/<pid>/status, printed as `RSS <scenario>
VmHWM=N kB`) under 32 MiB, and exit 0 on SHUTDOWN.

The hostile client, with ELASTIC_APM_DATA_RECEIVER_TIMEOUT=1s:
  garbage bytes (4xx or close), a 100 kB request line (431 or close), 5000
  header lines and 100 small ones (431 or close), invalid chunk framing
  (400; the valid first chunk it carried must never reach the APM server),
  a 10 GB Content-Length (413, answered without waiting for the body), a
  slowloris (one byte of a head every ~100 ms: closed within the receiver
  timeout plus a margin), 300 idle connections (the extension keeps 64
  agent connections and evicts the idlest: the agent still gets through; nor
  may it evict agent requests under way), 600 more opened by another
  process as fast as it can while the agent works,
  and on the telemetry listener: garbage JSON (400), a body over 2 MiB
  (413), a truncated body then close, truncated bodies held open.

The sandbox is not frozen between the agent's invocations here: the hostile
client stands for another process of the same sandbox, which Lambda would
freeze along with the extension.
"""

import http.client
import os
import select
import socket
import subprocess
import sys
import threading
import time

from e2e import (scenario, make_span, AgentStream, agent_send, agent_flush, agent_payload, first_delivery, tx_of,
                 ndjson, make_metadata, make_transaction)

RECEIVER_TIMEOUT = 1.0
HOSTILE_ENV = {"ELASTIC_APM_DATA_RECEIVER_TIMEOUT": "1s"}
CLOSE_SLACK = 1.5            # s beyond the receiver timeout for a forced close
RSS_LIMIT_KIB = 32 * 1024
AGENT_CONN_LIMIT = 64
TEL_BODY_MAX = 2 << 20       # telemetry POST body limit (2 x the subscription's maxBytes)


# --------------------------------------------------------------- checks

def peak_rss_kib(t):
    """VmHWM of the running extension, in kB."""
    proc = t.lam.ext_proc
    assert proc is not None and proc.poll() is None, "extension not running (exit %s)" % (
        proc.returncode if proc else None)
    with open("/proc/%d/status" % proc.pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/%d/status" % proc.pid)


def check_rss(t, name):
    kib = peak_rss_kib(t)
    print("RSS %s VmHWM=%d kB" % (name, kib), flush=True)
    # Under valgrind (test/e2e/valgrind-e2e.sh) the process is valgrind itself:
    # its RSS says nothing about ours. The native runs check the bound.
    if os.environ.get("APM_E2E_UNDER_VALGRIND") != "1":
        assert kib < RSS_LIMIT_KIB, "peak RSS %d kB >= %d kB" % (kib, RSS_LIMIT_KIB)
    return kib


class Legit:
    """The legitimate agent: whole syncflush invocations, each checked. Like
    the real agents, it keeps one connection alive for all its requests; an
    agent connection that has completed a request is the last the extension
    gives up, so a flood never costs it a request (no retry here)."""

    def __init__(self, t):
        self.t = t
        self.txs = []
        self.conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=15)

    def invocation(self, what, flush=True):
        t = self.t
        inv = t.lam.invoke()
        lines, tx = agent_payload(inv, spans=3)
        step = "intake request"
        try:
            s = agent_send(t.port, lines, conn=self.conn)
            assert s == 202, "answered %s" % s.status
            self.txs.append(tx)
            if flush:
                step = "?flushed=true request"
                st = agent_flush(t.port, conn=self.conn)
                assert st == 202, "answered %s" % st.status
        except (OSError, http.client.HTTPException, AssertionError) as e:
            raise AssertionError("legitimate agent (%s), %s: %s: %s" % (
                what, step, type(e).__name__, e))
        t.lam.runtime_done(inv)
        t_next = t.lam.finish(inv, freeze=False)
        req = first_delivery(t.apm, tx)
        assert req is not None and req.t_end <= t_next, "legitimate agent (%s): its data " \
            "was not delivered before the extension's /next" % what
        if not flush:
            assert t_next - inv.t_runtime_done < 1.5, "legitimate agent (%s): /next %.3fs " \
                "after runtimeDone (telemetry not working?)" % (what, t_next - inv.t_runtime_done)
        return t_next

    def check_all_once(self):
        for i, tx in enumerate(self.txs):
            n = sum(1 for o in self.t.apm.events("transaction") if o["id"] == tx_of(tx)["id"])
            assert n == 1, "legitimate transaction %d delivered %d times" % (i, n)


def during(t, legit, attack, what, min_legit=2, max_legit=60, timeout=40):
    """Run attack() in a thread while the legitimate agent keeps invoking
    (at least min_legit invocations, and until the attack is over). Raises
    the attack's own assertion, if any. Returns attack()'s result."""
    out, errors, done = [], [], threading.Event()

    def run():
        try:
            out.append(attack())
        except BaseException as e:  # noqa: B902 - reported in the main thread
            errors.append(e)
        finally:
            done.set()

    th = threading.Thread(target=run, daemon=True, name="hostile")
    th.start()
    n, end = 0, time.monotonic() + timeout
    while n < min_legit or (not done.is_set() and n < max_legit):
        n += 1
        legit.invocation("%s, invocation %d during the attack" % (what, n))
        assert time.monotonic() < end, "%s: the attack still runs after %ds" % (what, timeout)
    if not done.wait(max(0.0, end - time.monotonic())):
        raise AssertionError("%s: the hostile client is still stuck after %ds" % (what, timeout))
    if errors:
        raise errors[0]
    return out[0] if out else None


def finish(t, legit, name):
    """After the attack: one more legitimate invocation, RSS, SHUTDOWN, exactly once."""
    legit.invocation("after the attack")
    check_rss(t, name)
    t.shutdown_ok()
    legit.check_all_once()


# --------------------------------------------------------------- raw client

class Outcome:
    """What a raw hostile request got back."""

    def __init__(self, what):
        self.what = what
        self.status = None     # status code of the answer, if any
        self.closed = False    # the extension closed the connection (FIN or RST)
        self.reset = False
        self.send_error = None
        self.data = b""
        self.elapsed = None    # from the first byte sent to the close

    def __repr__(self):
        return "<%s: status=%s closed=%s reset=%s send_error=%s answer=%r>" % (
            self.what, self.status, self.closed, self.reset, self.send_error,
            self.data[:120])


def _answer_complete(data):
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return False
    length = 0
    for line in data[:end].split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip() or 0)
    return len(data) >= end + 4 + length


def _read_until_close(s, o, deadline, t0, until_answer=False):
    """Read until the extension closes (or, until_answer, a whole answer is in)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        s.settimeout(left)
        try:
            d = s.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            o.reset = o.closed = True
            break
        if not d:
            o.closed = True
            break
        o.data += d
        if until_answer and _answer_complete(o.data):
            break
    if o.closed:
        o.elapsed = time.monotonic() - t0
    if o.data.startswith(b"HTTP/1."):
        try:
            o.status = int(o.data.split(b" ", 2)[1])
        except (IndexError, ValueError):
            pass


def raw_exchange(port, data, what, timeout=RECEIVER_TIMEOUT + 4, until_answer=False):
    """Connect, send data (a reset while sending is noted, not an error),
    read until the extension closes (or until_answer: a whole answer is in)
    or timeout. Returns an Outcome."""
    o = Outcome(what)
    t0 = time.monotonic()
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            o.send_error = type(e).__name__
        _read_until_close(s, o, t0 + timeout, t0, until_answer)
    finally:
        s.close()
    return o


# Set while several attacks run at once: 300 idle connections then evict
# other hostile connections too, so a silent close is a fair answer to any.
LENIENT = {"silent_close": False}


def expect(o, statuses, allow_silent_close=True, need_close=True):
    """The answer is one of statuses and (need_close) the connection is
    closed after it; or (allow_silent_close) no answer but the connection
    closed."""
    allow_silent_close = allow_silent_close or LENIENT["silent_close"]
    if o.status is not None:
        assert o.status in statuses, "%s: answered %s, want %s (%r)" % (
            o.what, o.status, sorted(statuses), o)
        assert o.closed or not need_close, "%s: answered %s but left the connection " \
            "open" % (o.what, o.status)
    else:
        assert allow_silent_close, "%s: no answer, want %s (%r)" % (
            o.what, sorted(statuses), o)
        assert o.closed, "%s: neither answered nor closed within the timeout (%r)" % (
            o.what, o)


FOURXX = set(range(400, 500))


def intake_head(extra=b"", path=b"/intake/v2/events"):
    return (b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1:8200\r\n"
            b"Content-Type: application/x-ndjson\r\nUser-Agent: hostile/1.0\r\n" + extra +
            b"\r\n")


# --------------------------------------------------------------- attacks on the intake port

def attack_garbage(port):
    cases = [
        ("random bytes", os.urandom(20000)),
        ("TLS ClientHello", bytes.fromhex("16030100a5010000a10303") + os.urandom(160)),
        ("binary head", os.urandom(300).replace(b"\n", b"") + b"\r\n\r\n"),
        ("nonsense start line", b"HELLO WORLD\r\n\r\n"),
        ("HTTP/9.9", b"POST /intake/v2/events HTTP/9.9\r\nHost: x\r\n\r\n"),
        ("header without colon", b"POST /intake/v2/events HTTP/1.1\r\nHost x\r\n\r\n"),
        ("NUL in a header", b"POST /intake/v2/events HTTP/1.1\r\nHost: a\x00b\r\n\r\n"),
        ("two Content-Lengths", intake_head(b"Content-Length: 5\r\nContent-Length: 6\r\n") +
         b"hello!"),
    ]
    for what, data in cases:
        expect(raw_exchange(port, data, "garbage: " + what), FOURXX | {501, 505})


def attack_long_request_line(port):
    data = b"POST /intake/v2/events?" + b"a" * 100000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    expect(raw_exchange(port, data, "100 kB request line"), {431, 414})


def attack_many_headers(port):
    many = b"".join(b"X-Header-%d: v\r\n" % i for i in range(5000))
    expect(raw_exchange(port, intake_head(many), "5000 header lines"), {431})
    some = b"".join(b"X-%d: 1\r\n" % i for i in range(100))  # ~1 kB: the count, not size
    expect(raw_exchange(port, intake_head(some), "100 small header lines"), {431})


POISON = []  # transactions inside rejected requests: must never reach the APM server


def check_no_poison(t):
    ids = {tx_of(p)["id"] for p in POISON}
    leaked = [(o.get("id"), r) for r in t.apm.intake_requests() for k, o in r.lines
              if k == "transaction" and o.get("id") in ids]
    assert not leaked, "the valid first chunk of a rejected (bad framing) request reached " \
        "the APM server: %s" % leaked[:3]


def attack_bad_chunks(port):
    head = intake_head(b"Transfer-Encoding: chunked\r\n")

    def first_chunk():
        tx = make_transaction(name="poison")
        POISON.append(tx)
        body = ndjson([make_metadata(), tx])
        return b"%x\r\n" % len(body) + body + b"\r\n"
    cases = [
        ("chunk size not hex", head + first_chunk() + b"zz\r\nhello\r\n0\r\n\r\n", {400}),
        ("no CRLF after chunk data", head + first_chunk()[:-2] + b"XX5\r\nhello\r\n0\r\n\r\n",
         {400}),
        ("negative chunk size", head + first_chunk() + b"-5\r\nhello\r\n0\r\n\r\n", {400}),
        ("chunk size overflow", head + first_chunk() + b"f" * 40 + b"\r\nhello\r\n", {400, 413}),
        ("chunk size line of 1000 bytes", head + first_chunk() + b"5;" + b"e" * 1000 +
         b"\r\nhello\r\n0\r\n\r\n", {400}),
        ("bare CR in the chunk size line", head + first_chunk() + b"5\rhello\r\n0\r\n\r\n",
         {400}),
    ]
    for what, data, want in cases:
        expect(raw_exchange(port, data, "invalid chunk framing: " + what), want,
               allow_silent_close=False)


def attack_huge_chunked_body(port):
    """A chunked, identity-encoded intake body of about 9 MiB with no
    Content-Length: over the 8 MiB body limit, so 413 and a close once the
    limit is passed; none of its events may reach the APM server."""
    tx = make_transaction(name="poison")
    POISON.append(tx)
    line = ndjson([make_span(tx, pad=4000)])
    piece = ndjson([make_metadata(), tx]) + line * ((1 << 20) // len(line))
    data = intake_head(b"Transfer-Encoding: chunked\r\n")
    for _ in range(9):
        data += b"%x\r\n" % len(piece) + piece + b"\r\n"
    data += b"0\r\n\r\n"
    o = raw_exchange(port, data, "9 MiB chunked body, no Content-Length")
    expect(o, {413}, allow_silent_close=False)


def attack_huge_content_length(port):
    o = raw_exchange(port, intake_head(b"Content-Length: 10737418240\r\n"),
                     "10 GB Content-Length (head only)")
    expect(o, {413}, allow_silent_close=False)
    o = raw_exchange(port, intake_head(b"Content-Length: 99999999999999999999999999\r\n"),
                     "Content-Length overflowing 64 bits")
    expect(o, {400, 413}, allow_silent_close=False)


def slowloris(port, what, interval=0.1, give_up=RECEIVER_TIMEOUT + 5):
    """One byte of a never-ending head every `interval` (the attack's pace);
    returns an Outcome with elapsed = time to the extension's close."""
    head = (b"POST /intake/v2/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/x-ndjson\r\nX-Slow: ")
    o = Outcome(what)
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    t0 = time.monotonic()
    try:
        i = 0
        while time.monotonic() - t0 < give_up:
            byte = head[i:i + 1] or b"a"
            i += 1
            try:
                s.send(byte)
            except (BrokenPipeError, ConnectionResetError) as e:
                o.send_error = type(e).__name__
                o.closed, o.elapsed = True, time.monotonic() - t0
                break
            r, _, _ = select.select([s], [], [], interval)
            if r:
                _read_until_close(s, o, time.monotonic() + 2, t0)
                break
    finally:
        s.close()
    return o


def attack_slowloris(port, n=5):
    outs = [None] * n

    def one(i):
        outs[i] = slowloris(port, "slowloris %d" % i)
    ths = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(RECEIVER_TIMEOUT + 15)
    for o in outs:
        assert o is not None, "a slowloris thread hung"
        assert o.closed, "%s: still open after %.1fs of one byte per 100 ms (receiver " \
            "timeout %.0fs): %r" % (o.what, RECEIVER_TIMEOUT + 5, RECEIVER_TIMEOUT, o)
        assert o.elapsed <= RECEIVER_TIMEOUT + CLOSE_SLACK, "%s: closed only after %.2fs " \
            "(receiver timeout %.0fs)" % (o.what, o.elapsed, RECEIVER_TIMEOUT)
        if o.status is not None:
            assert o.status in (400, 408, 431), "%s: answered %s" % (o.what, o.status)
    return [o.elapsed for o in outs]


# --------------------------------------------------------------- idle connections

def open_idle(port, n):
    socks = []
    for _ in range(n):
        socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
    return socks


def closed_indexes(socks, closed, wait):
    """Add to `closed` the indexes of sockets the extension has closed,
    waiting up to `wait` s for at least one event."""
    p = select.poll()
    fds = {}
    for i, s in enumerate(socks):
        if i not in closed:
            p.register(s, select.POLLIN | select.POLLHUP | select.POLLERR)
            fds[s.fileno()] = i
    for fd, ev in p.poll(int(wait * 1000)):
        i = fds[fd]
        try:
            d = socks[i].recv(1, socket.MSG_DONTWAIT)
        except (ConnectionResetError, BlockingIOError, OSError) as e:
            d = b"" if not isinstance(e, BlockingIOError) else None
        if d == b"":
            closed.add(i)
    return closed


def wait_evicted(socks, pred, timeout=10):
    closed = set()
    end = time.monotonic() + timeout
    while not pred(closed):
        left = end - time.monotonic()
        if left <= 0:
            break
        closed_indexes(socks, closed, min(left, 0.2))
    return closed


# --------------------------------------------------------------- telemetry listener

def tel_head(length=None, chunked=False):
    h = (b"POST / HTTP/1.1\r\nHost: sandbox.localdomain\r\n"
         b"Content-Type: application/json\r\n")
    if chunked:
        h += b"Transfer-Encoding: chunked\r\n"
    if length is not None:
        h += b"Content-Length: %d\r\n" % length
    return h + b"\r\n"


def tel_post(port, body, what):
    """A well-framed POST: the answer may keep the connection (keep-alive)."""
    return raw_exchange(port, tel_head(len(body)) + body, what, timeout=5, until_answer=True)


def tel_ok(port, what):
    """A valid (empty) batch on a new connection: 200."""
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    o = Outcome(what)
    try:
        c.sendall(tel_head(2) + b"[]")
        _read_until_close(c, o, time.monotonic() + 5, time.monotonic(), until_answer=True)
    finally:
        c.close()
    assert o.status == 200, "%s: a valid empty batch answered %s (%r)" % (what, o.status, o)


def tel_oversize_chunked(port, total=3 << 20, piece=64 << 10):
    """Stream a chunked body past 2 MiB; read the answer as soon as it comes."""
    o = Outcome("telemetry: chunked body over 2 MiB")
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    t0 = time.monotonic()
    try:
        s.sendall(tel_head(chunked=True) + b"%x\r\n[" % 1 + b"\r\n")
        sent = 0
        p = select.poll()
        p.register(s, select.POLLIN)
        while sent < total:
            if p.poll(0 if sent < TEL_BODY_MAX else 50):  # the answer may come
                break
            data = b" " * piece
            try:
                s.sendall(b"%x\r\n" % len(data) + data + b"\r\n")
            except (BrokenPipeError, ConnectionResetError) as e:
                o.send_error = type(e).__name__
                break
            sent += piece
        _read_until_close(s, o, time.monotonic() + 3, t0)
    finally:
        s.close()
    return o


def tel_truncated_held(port, n):
    """n connections, each a head with Content-Length 1000 and 100 bytes; held open."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(tel_head(1000) + b"[" + b" " * 99)
        socks.append(s)
    return socks


def attack_telemetry(port):
    for body, what in ((b'{"not json', "truncated JSON"),
                       (b"\xff\xfe garbage \x00", "binary garbage"),
                       (b'[{"type":"platform.start",]', "broken array"),
                       (b'{"type":"platform.start"}', "an object, not an array")):
        expect(tel_post(port, body, "telemetry: " + what), {400}, allow_silent_close=False,
               need_close=False)
    expect(raw_exchange(port, os.urandom(4000), "telemetry: not HTTP", timeout=5),
           FOURXX)
    o = raw_exchange(port, tel_head(3 << 20), "telemetry: Content-Length 3 MiB (head only)",
                     timeout=3)
    expect(o, {413}, allow_silent_close=False)
    expect(tel_oversize_chunked(port), {413}, allow_silent_close=False)
    # truncated body, then close: nothing to answer; the listener must go on
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(tel_head(1000) + b"[" + b" " * 99)
    s.close()
    tel_ok(port, "telemetry after a truncated body")
    # truncated bodies held open (more than the listener keeps): closed by the
    # receiver timeout; a valid batch still gets through meanwhile
    socks = tel_truncated_held(port, 3)
    t0 = time.monotonic()
    try:
        tel_ok(port, "telemetry while 3 truncated bodies are held open")
        closed = wait_evicted(socks, lambda c: len(c) == len(socks),
                              timeout=RECEIVER_TIMEOUT + CLOSE_SLACK + 1)
        took = time.monotonic() - t0
        assert len(closed) == len(socks), "telemetry: %d of %d truncated bodies still open " \
            "%.1fs later (receiver timeout %.0fs)" % (len(socks) - len(closed), len(socks),
                                                      took, RECEIVER_TIMEOUT)
        assert took <= RECEIVER_TIMEOUT + CLOSE_SLACK, "telemetry: truncated bodies closed " \
            "only after %.2fs" % took
    finally:
        for s in socks:
            s.close()
    tel_ok(port, "telemetry after the attack")


# --------------------------------------------------------------- scenarios

def _attack_scenario(name, attack, t, **kw):
    t.start()
    legit = Legit(t)
    legit.invocation("before the attack")
    during(t, legit, lambda: attack(t.port), name, **kw)
    finish(t, legit, name)


@scenario(env=HOSTILE_ENV)
def hostile_garbage(t):
    """Garbage bytes on the intake port: 4xx or close; the agent's data still flows."""
    _attack_scenario("hostile_garbage", attack_garbage, t)


@scenario(env=HOSTILE_ENV)
def hostile_long_request_line(t):
    """A 100 kB request line: 431 (or close)."""
    _attack_scenario("hostile_long_request_line", attack_long_request_line, t)


@scenario(env=HOSTILE_ENV)
def hostile_many_headers(t):
    """5000 header lines, and 100 small ones: 431 (or close)."""
    _attack_scenario("hostile_many_headers", attack_many_headers, t)


@scenario(env=HOSTILE_ENV)
def hostile_bad_chunks(t):
    """Invalid chunk framing: 400; the partial body never reaches the APM server."""
    _attack_scenario("hostile_bad_chunks", attack_bad_chunks, t)
    check_no_poison(t)


@scenario(env=HOSTILE_ENV)
def hostile_huge_chunked_body(t):
    """A 9 MiB chunked body without Content-Length: 413 and a close; none of its
    events at the APM server (the chunked path of the body limit)."""
    _attack_scenario("hostile_huge_chunked_body", attack_huge_chunked_body, t)
    check_no_poison(t)


@scenario(env=HOSTILE_ENV)
def hostile_huge_content_length(t):
    """Content-Length 10 GB: 413 at once."""
    _attack_scenario("hostile_huge_content_length", attack_huge_content_length, t)


@scenario(env=HOSTILE_ENV)
def hostile_slowloris(t):
    """Five slowloris heads (1 byte / 100 ms): closed after the receiver timeout (1s)."""
    t.start()
    legit = Legit(t)
    legit.invocation("before the attack")
    elapsed = during(t, legit, lambda: attack_slowloris(t.port), "slowloris")
    print("SLOWLORIS closed after %s s" % ", ".join("%.2f" % e for e in elapsed), flush=True)
    finish(t, legit, "hostile_slowloris")


@scenario(env=HOSTILE_ENV)
def hostile_idle_connections(t):
    """300 idle connections: the idlest are evicted (64 kept); the agent gets through."""
    t.start()
    legit = Legit(t)
    legit.invocation("before the attack")
    socks = open_idle(t.port, 300)
    try:
        for i in range(3):
            legit.invocation("with 300 idle connections opened, %d" % (i + 1))
        closed = wait_evicted(socks, lambda c: len(c) >= 300 - AGENT_CONN_LIMIT and
                              all(i in c for i in range(200)))
        still = len(socks) - len(closed)
        print("IDLE 300 opened, %d closed by the extension, %d still open" % (
            len(closed), still), flush=True)
        assert still <= AGENT_CONN_LIMIT, "%d idle connections still open (limit %d)" % (
            still, AGENT_CONN_LIMIT)
        oldest_open = [i for i in range(200) if i not in closed]
        assert not oldest_open, "the oldest idle connections %s were kept while newer " \
            "ones were (the idlest should go first)" % oldest_open[:10]
        # a kept-alive agent connection in use among them still works
        conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=10)
        try:
            inv = t.lam.invoke()
            lines, tx = agent_payload(inv)
            assert agent_send(t.port, lines, conn=conn) == 202
            assert agent_flush(t.port, conn=conn) == 202
            legit.txs.append(tx)
            t.lam.runtime_done(inv)
            t_next = t.lam.finish(inv, freeze=False)
            req = first_delivery(t.apm, tx)
            assert req is not None and req.t_end <= t_next, "kept-alive agent among idle " \
                "connections: not delivered before /next"
        finally:
            conn.close()
    finally:
        for s in socks:
            s.close()
    finish(t, legit, "hostile_idle_connections")


@scenario(env={"ELASTIC_APM_DATA_RECEIVER_TIMEOUT": "10s"})
def hostile_idle_flood_mid_request(t):
    """300 idle connections while two agent requests are under way: neither is evicted.

    The receiver timeout is 10 s here so that the pause of the two requests
    during the flood cannot end them (a body may pause up to the timeout)."""
    t.start()
    legit = Legit(t)
    legit.invocation("before the attack")
    inv = t.lam.invoke()
    la, txa = agent_payload(inv)
    lb, txb = agent_payload(inv)
    streaming = AgentStream(t.port, "gzip")   # head and a first chunk sent
    streaming.write(la[:2])
    head_only = AgentStream(t.port, "gzip")   # head sent, body not started
    socks = open_idle(t.port, 300)
    try:
        closed = wait_evicted(socks, lambda c: len(c) >= 300 - AGENT_CONN_LIMIT)
        assert len(closed) >= 300 - AGENT_CONN_LIMIT, "only %d of 300 idle connections " \
            "closed (limit %d)" % (len(closed), AGENT_CONN_LIMIT)
        for what, stream, rest in (("streaming (head and first chunk in)", streaming, la[2:]),
                                   ("head in, body not started", head_only, lb)):
            try:
                stream.write(rest)
                st = stream.finish()
            except (OSError, http.client.HTTPException) as e:
                raise AssertionError("agent request under way (%s) was cut by 300 idle "
                                     "connections: %s: %s" % (what, type(e).__name__, e))
            assert st == 202, "agent request under way (%s) answered %s" % (what, st)
    finally:
        for s in socks:
            s.close()
    legit.txs += [txa, txb]
    assert agent_flush(t.port) == 202
    t.lam.runtime_done(inv)
    t_next = t.lam.finish(inv, freeze=False)
    for tx in (txa, txb):
        req = first_delivery(t.apm, tx)
        assert req is not None and req.t_end <= t_next, "request under way during the " \
            "flood: not delivered before /next"
    finish(t, legit, "hostile_idle_flood_mid_request")


# The churn runs in its own process, as another process of the sandbox
# would: in a thread of this one, the GIL decides how many connections get
# opened between the agent's connect() and its first byte.
CHURN = r"""
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
socks = []
for _ in range(n):
    try:
        socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
    except OSError as e:
        print("error after %d: %s" % (len(socks), e), flush=True)
        sys.exit(1)
print("opened %d" % len(socks), flush=True)
sys.stdin.read()
"""


@scenario(env=HOSTILE_ENV)
def hostile_idle_connection_churn(t):
    """Another process opens 600 idle connections as fast as it can while the agent works."""
    t.start()
    legit = Legit(t)
    legit.invocation("before the attack")
    procs = []

    def churn():
        proc = subprocess.Popen([sys.executable, "-c", CHURN, str(t.port), "600"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(proc)
        r, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline().decode().strip() if r else "(no answer in 30 s)"
        assert line.startswith("opened"), "churn process: %s" % line
    try:
        during(t, legit, churn, "idle connection churn", min_legit=5)
        for i in range(3):
            legit.invocation("600 idle connections opened, %d" % (i + 1))
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait(10)
    finish(t, legit, "hostile_idle_connection_churn")


@scenario(env=HOSTILE_ENV)
def hostile_telemetry_listener(t):
    """Telemetry listener: garbage 400, > 2 MiB 413, truncated bodies; telemetry still works."""
    t.start()
    legit = Legit(t)
    legit.invocation("before the attack")
    during(t, legit, lambda: attack_telemetry(t.tport), "telemetry attack")
    # invocations ended by platform.runtimeDone alone: telemetry still flows
    for i in range(2):
        legit.invocation("ended by runtimeDone after the attack, %d" % (i + 1), flush=False)
    t.lam.wait_telemetry_idle()
    bad = [e for e in t.lam.telemetry_posts if not e["ok"]]
    assert not bad, "the platform's telemetry batches were refused: %r" % [
        e["statuses"] for e in bad][:3]
    finish(t, legit, "hostile_telemetry_listener")


@scenario(env=HOSTILE_ENV)
def hostile_everything_at_once(t):
    """All the attacks at once, on both ports, during traffic."""
    t.start()
    legit = Legit(t)
    legit.invocation("before the attack")
    idle = []

    def everything():
        jobs = [lambda: attack_garbage(t.port), lambda: attack_long_request_line(t.port),
                lambda: attack_many_headers(t.port), lambda: attack_bad_chunks(t.port),
                lambda: attack_huge_content_length(t.port),
                lambda: attack_slowloris(t.port, n=3), lambda: attack_telemetry(t.tport),
                lambda: idle.extend(open_idle(t.port, 300))]
        errors = []

        def run(job):
            try:
                job()
            except BaseException as e:  # noqa: B902
                errors.append(e)
        ths = [threading.Thread(target=run, args=(j,), daemon=True) for j in jobs]
        for th in ths:
            th.start()
        for th in ths:
            th.join(30)
        assert not any(th.is_alive() for th in ths), "an attack thread hung"
        if errors:
            raise AssertionError(" / ".join(str(e) for e in errors))
    LENIENT["silent_close"] = True
    try:
        during(t, legit, everything, "everything at once", min_legit=5)
    finally:
        LENIENT["silent_close"] = False
        for s in idle:
            s.close()
    finish(t, legit, "hostile_everything_at_once")
    check_no_poison(t)
