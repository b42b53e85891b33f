#!/usr/bin/env python3
"""Benchmark of apm-ext against the floor (test/floor.c, a bare extension).

    python3 test/bench.py [--binary ./apm-ext] [--runs N] [--quick]
                          [--json FILE] [--only cold,size,latency]
                          [--cpu N] [--keep]

Prints a table: figure | apm-ext | floor | target | status. The status column
is information only: the bench never fails on a time or a size. It exits 1
only when something broke (a binary crashed, never registered, answered
with an error, lost data...), 2 on bad usage.

How the figures are taken
-------------------------
* One process plays Lambda, the agent and the telemetry sender: a
  single-threaded poll loop (no threads, so no GIL hand-offs; gc is off
  while measuring). Every read is stamped by the kernel (SO_TIMESTAMPNS,
  CLOCK_REALTIME; on loopback the stamp is taken when the peer's write
  enters the stack), so a figure is the time between the extension's own
  writes, not the time Python took to notice them. Where the kernel gives
  no stamp, the time poll() returned is used (the notes say how many).
  Our own instants (exec, INVOKE sent) are time.time_ns(), the same clock.
* exec: now() right before os.posix_spawn(). Its return is no good mark:
  glibc spawns the vfork way, so it returns once the child has exec'd, but
  on a busy machine our process may get a CPU again only after the child
  has registered. Our own writes are stamped just before the write for the
  same reason (the woken extension may run before the write returns).
  "received" is the kernel stamp of the first bytes of that request.
* Everything (bench, sink, extensions) is pinned to one CPU (--cpu): as
  in a small Lambda function (a fraction of one vCPU), and because in a
  VM a wake-up sent to an idle (halted) vCPU can take milliseconds, which
  would swamp the figures with noise.
* Cold starts: a fresh fake Lambda and process per run, apm-ext and the
  floor alternating (the order flips every round). After the first /next,
  VmHWM is read from /proc/<pid>/status, then SHUTDOWN is sent; the process
  must exit 0.
* Added latency: one long-lived apm-ext, subscribed to telemetry, sending
  to test/sink.c (answers 202 at once), and one floor, invocations
  interleaved (the order of the cases rotates every round). For apm-ext the
  bench acts as the agent on one keep-alive connection: INVOKE, POST
  /intake/v2/events with N bytes of identity ndjson (answered 202), then an
  empty POST /intake/v2/events?flushed=true. Added latency = the
  extension's next GET /event/next minus the flushed POST's 202 (the
  runtime could answer Lambda then). The "+ telemetry" case also POSTs a
  platform.runtimeDone batch to the telemetry listener right after that
  202, as Lambda does after the runtime's response; the "ended by
  runtimeDone only" case sends no flushed POST, only that record, and
  counts from the moment we start writing it. For the floor, with no
  agent, it is INVOKE written -> /next.

Adding a figure: write a function taking the Ctx and returning a list of
row() dicts, and add it to MEASUREMENTS.
"""

import argparse
import datetime
import gc
import json
import math
import os
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILD = os.path.join(ROOT, "build")
now = time.time_ns                  # CLOCK_REALTIME: the clock of kernel receive stamps
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)   # Linux (SO_TIMESTAMPNS_OLD)
_ANC = socket.CMSG_SPACE(16)
STAMPS = {"kernel": 0, "poll": 0}   # how the reads were stamped

FUNCTION_NAME = "bench-fn"
REGION = "us-east-1"
ARN = "arn:aws:lambda:%s:123456789012:function:%s" % (REGION, FUNCTION_NAME)
EXT_API = "/2020-01-01/extension"
WAIT = 10.0              # seconds; any single wait longer than this is a failure
INVOKE_TIMEOUT_MS = 30000
KiB = 1024


class BenchError(Exception):
    """Something broke (not slow: broke). The bench exits 1."""


# ----------------------------------------------------------------- helpers

def stats(samples):
    """{'n','median','p90','min','max'} of a list of numbers (nearest-rank p90)."""
    s = sorted(samples)
    if not s:
        return None
    return {"n": len(s), "median": statistics.median(s),
            "p90": s[max(0, math.ceil(0.9 * len(s)) - 1)], "min": s[0], "max": s[-1]}


def us(ns):
    return ns / 1000.0


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def iso_now():
    d = datetime.datetime.now(datetime.timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (d.microsecond // 1000)


def epoch_ms():
    return int(time.time() * 1000)


def build(out, src, cmd):
    """Compile src into out unless out is newer. Returns out."""
    if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(src):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError("building %s failed:\n%s%s" % (out, r.stdout, r.stderr))
    return out


def stamp_reads(sock):
    """Ask the kernel to stamp what this socket receives (SO_TIMESTAMPNS)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:
        pass


def recv_stamped(sock, t_poll, flags=0):
    """(data, ns): the kernel's receive stamp of the data when there is one
    (on loopback: when the peer's write reached the stack), else t_poll.
    data is b"" at EOF, None when flags has MSG_DONTWAIT and nothing came."""
    try:
        data, anc, _, _ = sock.recvmsg(65536, _ANC, flags)
    except BlockingIOError:
        return None, t_poll
    except OSError:
        return b"", t_poll
    for level, kind, d in anc:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(d) >= 16:
            sec, ns = struct.unpack("qq", d[:16])
            STAMPS["kernel"] += 1
            return data, sec * 1000000000 + ns
    if data:
        STAMPS["poll"] += 1
    return data, t_poll


def parse_head(raw):
    """(first line, {lower-case name: value}) of an HTTP head (bytes, no CRLFCRLF)."""
    lines = raw.decode("latin-1").split("\r\n")
    hdrs = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return lines[0], hdrs


def ndjson(size):
    """Exactly `size` bytes of plausible agent ndjson: metadata, transaction, spans."""
    trace = uuid.uuid4().hex
    meta = json.dumps({"metadata": {
        "service": {"name": FUNCTION_NAME, "version": "$LATEST",
                    "agent": {"name": "nodejs", "version": "4.7.0"},
                    "language": {"name": "javascript"},
                    "runtime": {"name": "AWS_Lambda_nodejs20.x", "version": "20.11.0"},
                    "framework": {"name": "AWS Lambda"}},
        "cloud": {"provider": "aws", "region": REGION,
                  "service": {"name": "lambda"}, "account": {"id": "123456789012"}}}},
        separators=(",", ":")) + "\n"
    tx = json.dumps({"transaction": {
        "id": uuid.uuid4().hex[:16], "trace_id": trace, "name": FUNCTION_NAME,
        "type": "request", "duration": 12.5, "timestamp": epoch_ms() * 1000,
        "outcome": "success", "result": "success", "sampled": True,
        "span_count": {"started": 0, "dropped": 0}}}, separators=(",", ":")) + "\n"
    out = [meta, tx]
    total = len(meta) + len(tx)
    if total > size:
        raise ValueError("size %d is smaller than metadata + transaction" % size)

    def span(name):
        return json.dumps({"span": {
            "id": uuid.uuid4().hex[:16], "transaction_id": uuid.uuid4().hex[:16],
            "parent_id": uuid.uuid4().hex[:16], "trace_id": trace, "name": name,
            "type": "db", "subtype": "dynamodb", "action": "query", "duration": 3.25,
            "timestamp": epoch_ms() * 1000, "outcome": "success"}},
            separators=(",", ":")) + "\n"
    base = len(span(""))
    while size - total >= base:
        fill = size - total - base
        name = "SELECT * FROM t WHERE id = ?"
        if fill < 2 * base:                     # last line: pad it to the exact size
            name = ("Query " + "x" * fill)[:fill]
        line = span(name)
        out.append(line)
        total += len(line)
    body = "".join(out).encode()
    if len(body) < size:                        # a few bytes short of a line: pad the tx
        body = body.replace(b'"name":"%s"' % FUNCTION_NAME.encode(),
                            b'"name":"%s"' % (FUNCTION_NAME + "-" * (size - len(body))).encode(), 1)
    assert len(body) == size, (len(body), size)
    return body


# ------------------------------------------------------------------ process

class Proc:
    """A spawned extension. t_exec: now() right before posix_spawn();
    t_spawned: when it returned."""

    def __init__(self, path, argv0, env, log_path):
        self.path, self.log_path = path, log_path
        self.name = os.path.basename(argv0)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        fa = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
              (os.POSIX_SPAWN_DUP2, fd, 1), (os.POSIX_SPAWN_DUP2, fd, 2)]
        try:
            self.t_exec = now()
            self.pid = os.posix_spawn(path, [argv0], env, file_actions=fa)
            self.t_spawned = now()
        finally:
            os.close(fd)
        self.returncode = None
        self.rusage = None

    def poll(self):
        if self.returncode is None:
            pid, status, ru = os.wait4(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                self.rusage = ru
        return self.returncode

    def check(self, what):
        if self.poll() is not None:
            raise BenchError("%s exited with %s while waiting for %s\n%s"
                             % (self.name, self.returncode, what, self.log_tail()))

    def wait(self, timeout):
        end = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > end:
                self.kill()
                raise BenchError("%s did not exit within %.1fs\n%s"
                                 % (self.name, timeout, self.log_tail()))
            time.sleep(0.0005)
        return self.returncode

    def kill(self):
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            _, status, self.rusage = os.wait4(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)

    def status(self):
        """{'VmHWM': kB, 'VmRSS': kB, ...} from /proc/<pid>/status."""
        out = {}
        with open("/proc/%d/status" % self.pid) as f:
            for ln in f:
                k, _, v = ln.partition(":")
                if v.strip().endswith(" kB"):
                    out[k] = int(v.split()[0])
        return out

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, n=15):
        lines = self.log().splitlines()[-n:]
        return "  %s log (last %d lines):\n" % (self.name, len(lines)) + \
            "".join("    " + ln + "\n" for ln in lines) if lines else "  (%s wrote no log)" % self.name


# ------------------------------------------------------------- fake Lambda

class _Conn:
    __slots__ = ("sock", "buf", "t_first")

    def __init__(self, sock):
        self.sock, self.buf, self.t_first = sock, b"", None


class Lambda:
    """A lean fake Lambda control plane (Extensions + Telemetry subscription
    API) on 127.0.0.1:<port>, driven by step()/wait() from the caller's thread.
    Other sockets (the agent's) join the same poll loop through watch()."""

    def __init__(self, telemetry=True):
        self.telemetry = telemetry
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        stamp_reads(self.lsock)             # accepted sockets inherit it: the first
        self.lsock.bind(("127.0.0.1", 0))   # bytes may arrive before accept()
        # Wake us when the first request is in, not at the SYN: one switch
        # less in the extension's path to register.
        self.lsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
        self.lsock.listen(16)
        self.lsock.setblocking(False)
        self.port = self.lsock.getsockname()[1]
        self.address = "127.0.0.1:%d" % self.port
        self.poller = select.poll()
        self.poller.register(self.lsock, select.POLLIN)
        self.conns = {}
        self.watched = {}
        self.proc = None
        self.ext_id = str(uuid.uuid4())
        self.ext_name = None
        self.t_register = None
        self.subscription = None
        self.t_subscribe = None
        self.tel_port = None
        self.nexts = []             # ns (kernel stamp) of every GET /event/next
        self.parked = None          # the conn whose /next waits for an event
        self.t_eof = None           # first time a connection of ours saw EOF
        self.answer_ns = 0          # our time answering register/subscribe (request -> answer sent)
        self.answered = {}          # "register"/"subscribe" -> ns when our answer was sent
        self.errors = []            # protocol mistakes of the extension

    # -- process
    def spawn(self, path, argv0, env, log_path):
        env = dict(env, AWS_LAMBDA_RUNTIME_API=self.address)
        self.proc = Proc(path, argv0, env, log_path)
        return self.proc

    # -- loop
    def watch(self, sock, callback):
        self.watched[sock.fileno()] = callback
        self.poller.register(sock, select.POLLIN)

    def unwatch(self, sock):
        self.watched.pop(sock.fileno(), None)
        try:
            self.poller.unregister(sock)
        except (KeyError, ValueError):
            pass

    def step(self, timeout_ms):
        events = self.poller.poll(timeout_ms)
        t = now()
        for fd, _ in events:
            if fd == self.lsock.fileno():
                self._accept(t)
            elif fd in self.conns:
                self._read(self.conns[fd], t)
            elif fd in self.watched:
                self.watched[fd](t)
        return t

    def wait(self, pred, what, timeout=WAIT):
        end = now() + int(timeout * 1e9)
        while not pred():
            if self.proc is not None:
                self.proc.check(what)
            left = end - now()
            if left <= 0:
                raise BenchError("timed out after %.1fs waiting for %s%s" % (
                    timeout, what, "\n" + self.proc.log_tail() if self.proc else ""))
            self.step(min(left // 1000000 + 1, 20))

    def close(self):
        for c in list(self.conns.values()):
            c.sock.close()
        self.conns.clear()
        self.lsock.close()
        if self.proc is not None:
            self.proc.kill()

    # -- server
    def _accept(self, t):
        while True:
            try:
                s, _ = self.lsock.accept()
            except BlockingIOError:
                return
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(True)
            c = self.conns[s.fileno()] = _Conn(s)
            self.poller.register(s, select.POLLIN)
            self._read(c, t, socket.MSG_DONTWAIT)   # the request is likely in already

    def _drop(self, c, t):
        if self.t_eof is None:
            self.t_eof = t
        if self.parked is c:
            self.parked = None
        self.poller.unregister(c.sock)
        del self.conns[c.sock.fileno()]
        c.sock.close()

    def _read(self, c, t, flags=0):
        data, t = recv_stamped(c.sock, t, flags)
        if data is None:
            return
        if not data:
            self._drop(c, t)
            return
        if not c.buf:
            c.t_first = t
        c.buf += data
        while True:
            end = c.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            line, hdrs = parse_head(c.buf[:end])
            if "chunked" in hdrs.get("transfer-encoding", "").lower():
                self.errors.append("chunked request to the Lambda API: " + line)
                self._drop(c, t)
                return
            n = int(hdrs.get("content-length") or 0)
            if len(c.buf) < end + 4 + n:
                return
            body = c.buf[end + 4:end + 4 + n]
            c.buf = c.buf[end + 4 + n:]
            t_req = c.t_first
            c.t_first = t if c.buf else None
            self._route(c, line, hdrs, body, t_req)

    def _send(self, c, status, body=b"", headers=()):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        head = "HTTP/1.1 %d %s\r\n" % (status, {200: "OK", 202: "Accepted"}.get(status, "Error"))
        head += "".join("%s: %s\r\n" % kv for kv in headers)
        head += "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        data = head.encode() + body
        t = now()       # before the write: after it, the woken peer may run first
        c.sock.sendall(data)
        return t

    def _route(self, c, line, hdrs, body, t):
        method, _, rest = line.partition(" ")
        path = rest.rsplit(" ", 1)[0].split("?", 1)[0]
        ident = hdrs.get("lambda-extension-identifier")
        if method == "POST" and path == EXT_API + "/register":
            name = hdrs.get("lambda-extension-name")
            try:
                events = json.loads(body or b"{}").get("events")
            except ValueError:
                events = None
            if not name or self.t_register is not None:
                self.errors.append("register: name %r, registered before: %s"
                                   % (name, self.t_register is not None))
                self._send(c, 400, {"errorType": "InvalidRequest"})
                return
            if sorted(events or []) != ["INVOKE", "SHUTDOWN"]:
                self.errors.append("register: events %r" % (events,))
            self.ext_name, self.t_register = name, t
            self.answered["register"] = self._send(
                c, 200, {"functionName": FUNCTION_NAME, "functionVersion": "$LATEST",
                         "handler": "index.handler"},
                [("Lambda-Extension-Identifier", self.ext_id)])
            self.answer_ns += self.answered["register"] - t
        elif ident != self.ext_id:
            self.errors.append("%s %s without the identifier" % (method, path))
            self._send(c, 403, {"errorType": "Extension.Forbidden"})
        elif method == "GET" and path == EXT_API + "/event/next":
            self.nexts.append(t)
            if self.parked is not None:
                self.errors.append("two /event/next calls waiting at once")
            self.parked = c
        elif method == "PUT" and path == "/2022-07-01/telemetry":
            try:
                sub = json.loads(body)
                uri = sub["destination"]["URI"]
                port = int(uri.rsplit(":", 1)[1].split("/")[0])
            except (ValueError, KeyError, IndexError, TypeError):
                self.errors.append("bad telemetry subscription: %r" % body[:200])
                self._send(c, 400, {"errorType": "ValidationError"})
                return
            if not self.telemetry:
                self._send(c, 202, {"errorType": "Telemetry.NotSupported"})
                return
            self.subscription, self.tel_port, self.t_subscribe = sub, port, t
            self.answered["subscribe"] = self._send(c, 200, b"OK")
            self.answer_ns += self.answered["subscribe"] - t
        elif method == "POST" and path in (EXT_API + "/init/error", EXT_API + "/exit/error"):
            self.errors.append("%s: %s %s" % (path, hdrs.get("lambda-extension-function-error-type"),
                                              body[:200]))
            self._send(c, 202, {"status": "OK"})
        else:
            self.errors.append("unknown request %s %s" % (method, path))
            self._send(c, 404, {"errorType": "NotFound"})

    def _deliver(self, ev):
        c, self.parked = self.parked, None
        return self._send(c, 200, ev, [("Lambda-Extension-Event-Identifier", str(uuid.uuid4()))])

    def send_event(self, ev):
        """Hand ev to the parked /next (it must be parked). Returns the ns
        just before the answer was written."""
        if self.parked is None:
            raise BenchError("no /event/next waiting for %s" % ev["eventType"])
        return self._deliver(ev)

    def invoke(self, request_id):
        return self.send_event({
            "eventType": "INVOKE", "deadlineMs": epoch_ms() + INVOKE_TIMEOUT_MS,
            "requestId": request_id, "invokedFunctionArn": ARN,
            "tracing": {"type": "X-Amzn-Trace-Id", "value": "Root=1-%08x-%s;Parent=%s;Sampled=1"
                        % (int(time.time()), uuid.uuid4().hex[:24], uuid.uuid4().hex[:16])}})

    def shutdown(self, deadline_ms=2000):
        """SHUTDOWN, then wait for the exit. Returns (exit code, ns from
        SHUTDOWN to the EOF of the Lambda connection = exit)."""
        self.wait(lambda: self.parked is not None, "%s to wait in /event/next before SHUTDOWN"
                  % self.proc.name)
        self.t_eof = None
        t0 = self.send_event({"eventType": "SHUTDOWN", "shutdownReason": "spindown",
                              "deadlineMs": epoch_ms() + deadline_ms})
        end = now() + int((deadline_ms / 1000.0 + 2) * 1e9)
        while self.t_eof is None and now() < end:
            if self.proc.poll() is not None and not self.conns:
                break
            self.step(20)
        code = self.proc.wait(max(0.1, (end - now()) / 1e9))
        return code, (self.t_eof - t0) if self.t_eof else None


# ------------------------------------------------------------- HTTP client

class Client:
    """One keep-alive HTTP/1.1 connection (the agent's, or Lambda's telemetry
    sender's); responses are read inside the Lambda poll loop."""

    def __init__(self, lam, port, host="127.0.0.1"):
        self.lam, self.addr = lam, (host, port)
        self.sock = None

    def _connect(self):
        s = socket.create_connection(self.addr, timeout=WAIT)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stamp_reads(s)
        self.sock = s

    def close(self):
        if self.sock is not None:
            self.lam.unwatch(self.sock)
            self.sock.close()
            self.sock = None

    def request(self, method, path, body=b"", headers=()):
        """Returns (status, ns (kernel stamp) of the first response byte)."""
        for attempt in (0, 1):
            fresh = self.sock is None
            if fresh:
                self._connect()
            head = "%s %s HTTP/1.1\r\nHost: %s:%d\r\n" % ((method, path) + self.addr)
            head += "".join("%s: %s\r\n" % kv for kv in headers)
            head += "Content-Length: %d\r\n\r\n" % len(body)
            try:
                self.sock.sendall(head.encode() + body)
            except OSError:
                self.close()
                if fresh or attempt:
                    raise BenchError("%s %s: the connection to port %d broke while sending"
                                     % (method, path, self.addr[1]))
                continue
            r = self._response("%s %s" % (method, path))
            if r is not None:
                return r
            if fresh or attempt:   # a fresh connection closed without answering
                raise BenchError("%s %s: port %d closed the connection without answering"
                                 % (method, path, self.addr[1]))
        raise AssertionError("unreachable")

    def _response(self, what):
        st = {"buf": b"", "t": None, "done": None, "eof": False}
        sock = self.sock

        def on_read(t):
            data, t = recv_stamped(sock, t)
            if not data:
                st["eof"] = True
                return
            if st["t"] is None:
                st["t"] = t
            st["buf"] += data
            end = st["buf"].find(b"\r\n\r\n")
            if end < 0:
                return
            line, hdrs = parse_head(st["buf"][:end])
            rest = st["buf"][end + 4:]
            if "chunked" in hdrs.get("transfer-encoding", "").lower():
                if not rest.endswith(b"0\r\n\r\n"):
                    return
            elif len(rest) < int(hdrs.get("content-length") or 0):
                return
            st["done"] = (int(line.split()[1]), hdrs)

        self.lam.watch(sock, on_read)
        try:
            self.lam.wait(lambda: st["done"] or st["eof"], "the answer to " + what)
        finally:
            self.lam.unwatch(sock)
        if st["done"] is None:
            self.close()
            return None if not st["buf"] else self._bad(what)
        status, hdrs = st["done"]
        if "close" in hdrs.get("connection", "").lower():
            self.close()
        return status, st["t"]

    def _bad(self, what):
        raise BenchError("%s: truncated answer" % what)


# ------------------------------------------------------------------ context

class Ctx:
    def __init__(self, args):
        self.args = args
        self.binary = os.path.abspath(args.binary)
        if not os.access(self.binary, os.X_OK):
            raise BenchError("%s: not an executable (run make first)" % self.binary)
        self.floor = build(os.path.join(BUILD, "floor"), os.path.join(HERE, "floor.c"),
                           ["musl-gcc", "-std=c11", "-Os", "-static", "-s", "-o",
                            os.path.join(BUILD, "floor"), os.path.join(HERE, "floor.c")])
        self.sink_bin = build(os.path.join(BUILD, "sink"), os.path.join(HERE, "sink.c"),
                              [os.environ.get("CC", "cc"), "-O2", "-o",
                               os.path.join(BUILD, "sink"), os.path.join(HERE, "sink.c")])
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        # The kernel stamps packets only while some socket asks for it, and
        # turns that on asynchronously: keep one such socket open throughout.
        self.stamp_keeper = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stamp_reads(self.stamp_keeper)
        time.sleep(0.01)
        self.tmp = tempfile.mkdtemp(prefix="apm-bench-", dir=shm)   # logs: tmpfs if any
        self.sink = subprocess.Popen([self.sink_bin], stdout=subprocess.PIPE)
        line = self.sink.stdout.readline()
        if not line.strip().isdigit():
            raise BenchError("the sink did not print its port")
        self.sink_port = int(line)
        self.notes = []
        self.logged = {}
        self.raw = {}
        self._logs = 0

    def log_path(self, tag):
        self._logs += 1
        return os.path.join(self.tmp, "%03d-%s.log" % (self._logs, tag))

    def env(self, **extra):
        e = {"PATH": "/usr/bin:/bin", "LANG": "C",
             "AWS_LAMBDA_FUNCTION_NAME": FUNCTION_NAME, "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
             "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "128", "AWS_REGION": REGION,
             "ELASTIC_APM_LAMBDA_APM_SERVER": "http://127.0.0.1:%d" % self.sink_port,
             "ELASTIC_APM_LOG_LEVEL": "error",
             "ELASTIC_APM_DATA_RECEIVER_SERVER_PORT": str(free_port()),
             "APM_EXT_TELEMETRY_PORT": str(free_port("0.0.0.0"))}
        e.update(extra)
        return e

    def binaries(self):
        """(key, path, argv0) of the two contenders."""
        return [("apm", self.binary, "apm-lambda-extension"), ("floor", self.floor, "floor")]

    def sink_stats(self):
        s = socket.create_connection(("127.0.0.1", self.sink_port), timeout=WAIT)
        s.sendall(b"GET /__sink/stats HTTP/1.1\r\nHost: sink\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            d = s.recv(4096)
            if not d:
                break
            data += d
        s.close()
        return json.loads(data.split(b"\r\n\r\n", 1)[1])

    def check_log(self, proc, where):
        """apm-ext runs at log level error: anything it logs is worth a note."""
        lines = [ln for ln in proc.log().splitlines() if ln.strip()]
        if lines:
            n, first = self.logged.get(where, (0, lines[0]))
            self.logged[where] = (n + len(lines), first)

    def log_notes(self):
        return ["%s: apm-ext logged %d line(s) at level error, first: %s"
                % (where, n, first[:300]) for where, (n, first) in self.logged.items()]

    def close(self):
        self.stamp_keeper.close()
        if self.sink.poll() is None:
            self.sink.kill()
            self.sink.wait()
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def row(figure, apm, floor=None, target="", ok=None, unit="", kind="num"):
    """One table row. apm/floor: a number, a stats() dict or None. ok: True
    (target met), False (missed) or None (no target)."""
    return {"figure": figure, "unit": unit, "apm_ext": apm, "floor": floor,
            "target": target, "ok": ok, "kind": kind}


# ------------------------------------------------------------- measurements

def cold_start_once(ctx, key, path, argv0):
    lam = Lambda(telemetry=True)
    try:
        proc = lam.spawn(path, argv0, ctx.env(), ctx.log_path("cold-" + key))
        lam.wait(lambda: lam.t_register is not None, "%s to register" % key)
        lam.wait(lambda: lam.nexts, "%s's first /event/next" % key)
        time.sleep(0.002)                       # let it settle in poll()
        st = proc.status()
        code, t_exit = lam.shutdown()
        if code != 0:
            raise BenchError("%s exited %s after SHUTDOWN\n%s" % (key, code, proc.log_tail()))
        if lam.errors:
            raise BenchError("%s made protocol errors: %s" % (key, lam.errors))
        if key == "apm":
            if lam.subscription is None:
                raise BenchError("apm-ext did not subscribe to telemetry")
            ctx.check_log(proc, "cold starts")
        ru = proc.rusage
        return {"register": lam.t_register - proc.t_exec,
                "next": lam.nexts[0] - proc.t_exec,
                "register_after_spawn": lam.t_register - proc.t_spawned,
                "init_after_register": lam.nexts[0] - lam.t_register,
                "next_own": lam.nexts[0] - proc.t_exec - lam.answer_ns,
                "answer": lam.answered["register"] - lam.t_register,
                "reg_to_sub": (lam.t_subscribe - lam.answered["register"])
                if lam.t_subscribe else None,
                "last_to_next": lam.nexts[0] - max(lam.answered.values()),
                "spawn": proc.t_spawned - proc.t_exec,
                "hwm_kb": st["VmHWM"], "rss_kb": st["VmRSS"],
                "exit": t_exit,
                "cpu_us": (ru.ru_utime + ru.ru_stime) * 1e6 if ru else None}
    finally:
        lam.close()


def m_cold_start(ctx):
    """Cold start and idle memory, apm-ext and floor alternating."""
    runs = {"apm": [], "floor": []}
    bins = ctx.binaries()
    for key, path, argv0 in bins:            # warm the page cache, not counted
        cold_start_once(ctx, key, path, argv0)
    gc.collect()
    for i in range(ctx.args.runs):
        for key, path, argv0 in (bins if i % 2 == 0 else bins[::-1]):
            runs[key].append(cold_start_once(ctx, key, path, argv0))
    ctx.raw["cold_start"] = runs

    def st(key, field, scale=us):
        vals = [scale(r[field]) for r in runs[key] if r[field] is not None]
        return stats(vals)
    a_next, f_next = st("apm", "next"), st("floor", "next")
    ratio = a_next["median"] / f_next["median"]
    hwm = st("apm", "hwm_kb", float)
    rows = [
        row("cold start: exec -> register received", st("apm", "register"),
            st("floor", "register"), unit="us", kind="stats"),
        row("cold start: exec -> first /next received", a_next, f_next,
            "<= 1.5x floor (%.2fx)" % ratio, ratio <= 1.5, "us", "stats"),
        row("cold start: exec -> first /next, less the fake's answer time",
            st("apm", "next_own"), st("floor", "next_own"), unit="us", kind="stats"),
        row("cold start: register -> first /next", st("apm", "init_after_register"),
            st("floor", "init_after_register"), unit="us", kind="stats"),
        row("  of which: register answered -> telemetry PUT", st("apm", "reg_to_sub"),
            None, unit="us", kind="stats"),
        row("  of which: last answer (register/PUT) -> first /next", st("apm", "last_to_next"),
            st("floor", "last_to_next"), unit="us", kind="stats"),
        row("SHUTDOWN -> exit (idle)", st("apm", "exit"), st("floor", "exit"),
            unit="us", kind="stats"),
        row("peak RSS, idle after init (VmHWM)", hwm, st("floor", "hwm_kb", float),
            "< 1024 KiB", hwm["median"] < 1024, "KiB", "stats"),
    ]
    cpu_a, cpu_f = st("apm", "cpu_us", float), st("floor", "cpu_us", float)
    if cpu_a and cpu_f and cpu_a["max"] > 0:
        rows.append(row("CPU user+sys per cold start (rusage)", cpu_a, cpu_f,
                        unit="us", kind="stats"))
    spawn = stats([us(r["spawn"]) for k in runs for r in runs[k]])
    spawn = stats([us(r["spawn"]) for k in runs for r in runs[k]])
    early = sum(r["register_after_spawn"] < 0 for k in runs for r in runs[k])
    answer = stats([us(r["answer"]) for k in runs for r in runs[k]])
    ctx.notes.append("the fake Lambda answered register in %.0f us median (p90 %.0f), from "
                     "the request's kernel stamp to our write" % (answer["median"], answer["p90"]))
    ctx.notes.append("exec = the call of posix_spawn(), which returned after %.0f us median "
                     "(p90 %.0f); %d of %d registers came before it returned"
                     % (spawn["median"], spawn["p90"], early, 2 * ctx.args.runs))
    return rows


def m_size(ctx):
    a, f = os.path.getsize(ctx.binary), os.path.getsize(ctx.floor)
    return [row("binary size", a / KiB, f / KiB, "< 200 KiB", a < 200 * KiB, "KiB")]


SIZES = [("flush only", 0), ("1 KB", 1024), ("100 KB", 100 * 1024), ("1 MB", 1024 * 1024)]


def m_latency(ctx):
    """Per-invocation added latency, one apm-ext and one floor, interleaved."""
    runs = ctx.args.runs
    apm_lam, floor_lam = Lambda(telemetry=True), Lambda(telemetry=True)
    env = ctx.env()
    agent = tel = None
    try:
        apm = apm_lam.spawn(ctx.binary, "apm-lambda-extension", env, ctx.log_path("lat-apm"))
        floor = floor_lam.spawn(ctx.floor, "floor", env, ctx.log_path("lat-floor"))
        for lam, what in ((apm_lam, "apm-ext"), (floor_lam, "floor")):
            lam.wait(lambda: lam.nexts, what + "'s first /event/next")
        if apm_lam.tel_port is None:
            raise BenchError("apm-ext did not subscribe to telemetry")
        time.sleep(0.002)
        hwm_init = apm.status()["VmHWM"]
        agent = Client(apm_lam, int(env["ELASTIC_APM_DATA_RECEIVER_SERVER_PORT"]))
        tel = Client(apm_lam, apm_lam.tel_port)
        bodies = {n: ndjson(n) for _, n in SIZES if n}
        sent = {"bytes": 0}
        last_rid = [None]
        intake_hdrs = [("Content-Type", "application/x-ndjson"),
                       ("User-Agent", "apm-agent-nodejs/4.7.0 (bench-fn)")]

        def invoke_apm(size, telemetry):
            """telemetry: None (no records), "after" (runtimeDone right after the
            flushed POST's 202) or "only" (runtimeDone, no flushed POST)."""
            rid = str(uuid.uuid4())
            n0 = len(apm_lam.nexts)
            apm_lam.invoke(rid)
            last_rid[0] = rid
            if size:
                status, _ = agent.request("POST", "/intake/v2/events", bodies[size], intake_hdrs)
                if status != 202:
                    raise BenchError("apm-ext answered %d to a %d-byte intake POST" % (status, size))
                sent["bytes"] += size
            if telemetry:                       # ready before the runtime answers
                done = json.dumps([{"time": iso_now(), "type": "platform.runtimeDone", "record": {
                    "requestId": rid, "status": "success",
                    "metrics": {"durationMs": 1.0, "producedBytes": 42}}}]).encode()
            if telemetry == "only":
                t_resp = now()                  # the runtime answers: Lambda sends runtimeDone
            else:
                status, t_resp = agent.request("POST", "/intake/v2/events?flushed=true", b"",
                                               intake_hdrs)
                if status != 202:
                    raise BenchError("apm-ext answered %d to the flushed POST" % status)
            if telemetry:
                status, _ = tel.request("POST", "/", done, [("Content-Type", "application/json")])
                if status != 200:
                    raise BenchError("apm-ext answered %d to a telemetry POST" % status)
            apm_lam.wait(lambda: len(apm_lam.nexts) > n0, "apm-ext's /next after an invocation")
            return apm_lam.nexts[n0] - t_resp

        def invoke_floor():
            n0 = len(floor_lam.nexts)
            t_inv = floor_lam.invoke(str(uuid.uuid4()))
            floor_lam.wait(lambda: len(floor_lam.nexts) > n0, "the floor's /next")
            return floor_lam.nexts[n0] - t_inv

        cases = [("floor", None, None)] + [(label, n, None) for label, n in SIZES] + \
                [("100 KB + telemetry", 100 * 1024, "after"),
                 ("100 KB, ended by runtimeDone only", 100 * 1024, "only")]
        samples = {c[0]: [] for c in cases}
        for i in range(3 + runs):               # 3 warm-up rounds
            k = i % len(cases)
            for label, size, telemetry in cases[k:] + cases[:k]:
                v = invoke_floor() if label == "floor" else invoke_apm(size, telemetry)
                if i >= 3:
                    samples[label].append(us(v))
        gc.collect()

        # the last invocation's platform.report, so apm-ext need not wait for it
        tel.request("POST", "/", json.dumps([{"time": iso_now(), "type": "platform.report",
                    "record": {"requestId": last_rid[0], "status": "success", "metrics": {
                        "durationMs": 1.0, "billedDurationMs": 1, "memorySizeMB": 128,
                        "maxMemoryUsedMB": 20}}}]).encode(), [("Content-Type", "application/json")])
        time.sleep(0.05)                         # let it forward what the report made
        st_a = apm.status()
        hwm_a, hwm_f = st_a["VmHWM"], floor.status()["VmHWM"]
        ctx.notes.append("apm-ext after the latency runs: VmHWM %d KiB, VmRSS %d KiB (%d KiB "
                         "right after init)" % (hwm_a, st_a["VmRSS"], hwm_init))
        agent.close()
        tel.close()
        code_a, exit_a = apm_lam.shutdown()
        code_f, exit_f = floor_lam.shutdown()
        if code_a != 0 or code_f != 0:
            raise BenchError("exit codes after SHUTDOWN: apm-ext %s, floor %s\n%s"
                             % (code_a, code_f, apm.log_tail()))
        for lam, what in ((apm_lam, "apm-ext"), (floor_lam, "floor")):
            if lam.errors:
                raise BenchError("%s made protocol errors: %s" % (what, lam.errors))
        ctx.check_log(apm, "latency runs")
        sink = ctx.sink_stats()
        if sink["body_bytes"] < sent["bytes"]:
            raise BenchError("the APM server got %d body bytes, the agent sent %d: data lost"
                             % (sink["body_bytes"], sent["bytes"]))
        ctx.notes.append("sink: %d requests, %d body bytes, %d connections (agent sent %d bytes)"
                         % (sink["requests"], sink["body_bytes"], sink["connections"], sent["bytes"]))
    finally:
        for c in (agent, tel):
            if c is not None:
                c.close()
        apm_lam.close()
        floor_lam.close()
    ctx.raw["latency_us"] = samples
    fl = stats(samples["floor"])
    rows = []
    for label, size, telemetry in cases[1:]:
        s = stats(samples[label])
        target, ok = "", None
        if label == "100 KB":
            target, ok = "< 1000 us", s["median"] < 1000
        rows.append(row("added latency, %s" % label, s, fl, target, ok, "us", "stats"))
    ctx.raw["latency_rss_kb"] = {"apm_init": hwm_init, "apm": hwm_a, "floor": hwm_f}
    rows.append(row("peak RSS after latency runs (VmHWM)", hwm_a, hwm_f, unit="KiB"))
    rows.append(row("SHUTDOWN -> exit after latency runs (1 run)", us(exit_a) if exit_a else None,
                    us(exit_f) if exit_f else None, unit="us"))
    return rows


MEASUREMENTS = [("cold", m_cold_start), ("size", m_size), ("latency", m_latency)]


# ------------------------------------------------------------------ output

def fmt(v, kind):
    if v is None:
        return "-"
    if kind == "stats":
        return "%s (p90 %s)" % (fmt(v["median"], "num"), fmt(v["p90"], "num"))
    if isinstance(v, float) and abs(v) < 10:
        return "%.2f" % v
    return "%.0f" % v


def print_table(rows, out=sys.stdout):
    head = ("figure", "apm-ext", "floor", "target", "status")
    cells = [head]
    for r in rows:
        unit = " (%s)" % r["unit"] if r["unit"] else ""
        cells.append((r["figure"] + unit, fmt(r["apm_ext"], r["kind"]),
                      fmt(r["floor"], r["kind"]), r["target"],
                      "" if r["ok"] is None else ("ok" if r["ok"] else "MISSED")))
    w = [max(len(c[i]) for c in cells) for i in range(len(head))]
    line = "+".join("-" * (x + (1 if i in (0, len(w) - 1) else 2)) for i, x in enumerate(w))
    for n, c in enumerate(cells):
        print(" | ".join(s.ljust(w[i]) if i == 0 else s.rjust(w[i]) if i in (1, 2) else
                         s.ljust(w[i]) for i, s in enumerate(c)).rstrip(), file=out)
        if n == 0:
            print(line, file=out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=os.path.join(ROOT, "apm-ext"))
    ap.add_argument("--runs", type=int, default=100,
                    help="cold starts per binary and invocations per latency case (default 100)")
    ap.add_argument("--quick", action="store_true", help="5 runs: a smoke test for CI")
    ap.add_argument("--json", metavar="FILE", help="also write the figures there")
    ap.add_argument("--only", metavar="NAMES",
                    help="comma-separated subset of: " + ",".join(n for n, _ in MEASUREMENTS))
    ap.add_argument("--keep", action="store_true", help="keep the extensions' logs")
    ap.add_argument("--cpu", type=int, default=None,
                    help="CPU to pin the bench, the sink and the extensions to (default: the "
                         "last one allowed; -1: no pinning)")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs = min(args.runs, 5)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    only = set(args.only.split(",")) if args.only else None
    if only and only - {n for n, _ in MEASUREMENTS}:
        ap.error("unknown measurement(s): %s" % ",".join(only - {n for n, _ in MEASUREMENTS}))

    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[-1] if args.cpu is None else args.cpu
    if cpu >= 0:
        try:
            os.sched_setaffinity(0, {cpu})      # inherited by every child
        except OSError as e:
            ap.error("cannot pin to CPU %d: %s" % (cpu, e))
    t0 = time.monotonic()
    rows, ctx = [], None
    try:
        ctx = Ctx(args)
        gc.disable()
        for name, fn in MEASUREMENTS:
            if only is None or name in only:
                rows += fn(ctx)
                gc.collect()
    except BenchError as e:
        print("bench: FAILED: %s" % e, file=sys.stderr)
        return 1
    finally:
        gc.enable()
        if ctx is not None:
            ctx.close()
    if STAMPS["poll"]:
        ctx.notes.append("%d of %d reads had no kernel timestamp: poll() return time used"
                         % (STAMPS["poll"], STAMPS["poll"] + STAMPS["kernel"]))
    print("apm-ext bench: %s (%d bytes), %d runs, %s, %.1fs, Linux %s"
          % (os.path.relpath(ctx.binary), os.path.getsize(ctx.binary), args.runs,
             "all on CPU %d" % cpu if cpu >= 0 else "not pinned (%d CPUs)" % len(cpus),
             time.monotonic() - t0, os.uname().release))
    print()
    print_table(rows)
    notes = ctx.notes + ctx.log_notes()
    if notes:
        print()
        for n in notes:
            print("note: " + n)
    if ctx.args.keep:
        print("logs kept in " + ctx.tmp)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"binary": ctx.binary, "size": os.path.getsize(ctx.binary),
                       "runs": args.runs, "rows": rows, "notes": notes, "raw": ctx.raw},
                      f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
