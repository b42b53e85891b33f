#!/usr/bin/env python3
"""Benchmark of apm-ext against the floor (test/bench/floor.c, a bare extension).

    python3 test/bench/bench.py [--binary ./apm-ext] [--runs N] [--quick]
                          [--json FILE] [--only cold,size,latency,tls,secrets,throughput]
                          [--cpu N] [--keep] [--tput-mb N] [--wide FILE]

Prints a table: figure | apm-ext | floor | status, every line within 100
columns (a long figure name goes on over more lines; a row's target, or what
it is compared with, on the line below it), then notes. The same table with
one line per figure (figure | apm-ext | floor | target | status) and the
notes unwrapped go to build/bench.txt (--wide). The status column is
information only: the bench never fails on a time or a size. It exits 1
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
* Everything (bench, sinks, extensions) is pinned to one CPU (--cpu): as
  in a small Lambda function (a fraction of one vCPU), and because in a
  VM a wake-up sent to an idle (halted) vCPU can take milliseconds, which
  would swamp the figures with noise. (Except the throughput sinks: below.)
* Cold starts: a fresh fake Lambda and process per run, apm-ext and the
  floor alternating (the order flips every round). After the first /next,
  VmHWM is read from /proc/<pid>/status, then SHUTDOWN is sent; the process
  must exit 0.
* Added latency: one long-lived apm-ext, subscribed to telemetry, sending
  to test/bench/sink.c (answers 202 at once), and one floor, invocations
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

* TLS (tls): cold starts with ELASTIC_APM_LAMBDA_APM_SERVER=https://localhost
  (test/bench/tls_sink.py: Python's ssl, a throwaway CA from fake_apm.make_test_ca
  given as ELASTIC_APM_SERVER_CA_CERT_FILE) and with http:// (test/bench/sink.c),
  alternating: exec -> register and exec -> first /next (nothing TLS happens
  before the first /next, so these should match), then INIT_MS of function
  init, then two 1 KB invocations as above. The TLS sink stamps each
  handshake (accept, done; CLOCK_REALTIME), which gives "first /next -> warm
  TLS connection ready". "sink alone" rows: the same 1 KB POST sent by the
  bench straight to each sink, first on a new connection left idle
  SINK_IDLE_MS after its handshake (like apm-ext's warm one), then again: the
  sinks' (and Python's client's) share. With syncflush the 1 KB is usually
  answered before the flushed POST, so only what a sink takes beyond that
  gap shows in the added latency.
  Issue #15's targets: "first https connection" = apm-ext's CPU (schedstat)
  from exec to the end of the function's init, when it is idle with its warm
  connection ready (checked against the sink's handshake stamp), https minus
  http (<= 2500 us); peak RSS with https (<= 400 KiB). "A later new
  connection" (<= 500 us, and it must resume): one more https cold start
  per run, then pairs of 1 KB invocations with the process frozen (SIGSTOP)
  around each, as Lambda does; before the second of a pair the sink closes
  every connection (GET /__sink/drop, with close_notify, as a server closes
  idle connections while the sandbox is frozen), so its delivery opens a new
  one; CPU from the thaw to /next, new minus kept-alive, and how many new
  connections the sink saw resumed (session_reused). The sink takes the
  suite and the ECDHE group by its own order, as Go's crypto/tls does
  (X25519 first; the notes say which group was negotiated), and resumes by
  session id (Go's server only by ticket, which BearSSL 0.6 lacks).
* Secrets (secrets): cold starts with the secret token from the fake Secrets
  Manager (test/fakes/fake_aws.py in its own process: it checks SigV4, serves TLS
  with the test CA's certificate; ELASTIC_APM_LAMBDA_AWS_ENDPOINT,
  AWS_ACCESS_KEY_ID/SECRET/SESSION_TOKEN set) vs with ELASTIC_APM_SECRET_TOKEN,
  alternating; the fetch's CPU = the difference of the medians (issue #15:
  <= 3000 us). The fake reports each call's times in its monotonic clock,
  mapped to ours; "exec -> GetSecretValue answered" is its answer's write.
* Throughput (throughput): one long-lived apm-ext per scheme; a run is one
  invocation in which the bench, as the agent, sends N 1 MiB identity-ndjson
  requests back to back on one keep-alive connection, then the flushed POST;
  MB/s = bytes / (INVOKE written -> /next), /next coming only once the sink
  has answered everything. The sinks (a C sink of its own for http, the
  TLS sink for https) are moved to another CPU if there is one, standing for
  a remote server; apm-ext and the agent stay on the bench's CPU. CPU time
  of each party (/proc/<pid>/task/*/schedstat) gives "busy" percentages and
  "MB per CPU-second" ceilings (apm-ext's, the sink's). The floor column is
  the bench sending the same bytes straight to the sink (chunked like
  apm-ext; over TLS with Python's ssl as the client, offering apm-ext's
  suites): the sink's own ceiling in practice. If apm-ext holds data past the
  flush (the sink short of bytes at /next) the case is marked BROKEN, its
  other runs skipped, and the bench exits 1 after printing the table.
* Size (size): `size -A` of the binary (section headers survive -s), and
  the same sections by origin (apm-ext.c, BearSSL, musl) from a linker map
  of build/apm-ext.unstripped, linked with the Makefile's flags minus -s.

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
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))           # test/bench
FAKES = os.path.join(os.path.dirname(HERE), "fakes")        # fake_apm.py, fake_aws.py
ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD = os.path.join(ROOT, "build")
now = time.time_ns                  # CLOCK_REALTIME: the clock of kernel receive stamps
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)   # Linux (SO_TIMESTAMPNS_OLD)
_ANC = socket.CMSG_SPACE(16)
STAMPS = {"kernel": 0, "poll": 0}   # how the reads were stamped
OWN_PORTS = set()                   # local ports of the bench's own connections to the sinks
DIRECT_PORTS = set()                # those of them that carry direct (no apm-ext) runs

FUNCTION_NAME = "bench-fn"
REGION = "us-east-1"
ARN = "arn:aws:lambda:%s:123456789012:function:%s" % (REGION, FUNCTION_NAME)
EXT_API = "/2020-01-01/extension"
WAIT = 10.0              # seconds; any single wait longer than this is a failure
INVOKE_TIMEOUT_MS = 30000
KiB = 1024


class BenchError(Exception):
    """Something broke (not slow: broke). The bench exits 1."""


class Skip(Exception):
    """A measurement cannot run here (e.g. no openssl CLI): noted, not a failure."""


class Broken(BenchError):
    """apm-ext misbehaved in one case of a measurement: the measurement
    marks its rows BROKEN (ctx.broken) and goes on; the bench still exits 1."""


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


def cpu_ns(pid):
    """CPU time (ns, user + system) that process pid has used so far: the sum
    of /proc/<pid>/task/*/schedstat (exact, unlike the 10 ms ticks of
    /proc/<pid>/stat). 0 when the process is gone."""
    total = 0
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return 0
    for tid in tids:
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def cpu_stat():
    """{cpu: (busy, total)} jiffies of every CPU so far (/proc/stat), to see
    how much of a CPU went to processes other than ours."""
    out = {}
    try:
        with open("/proc/stat") as f:
            for ln in f:
                if ln.startswith("cpu") and ln[3:4].isdigit():
                    name, *v = ln.split()
                    v = [int(x) for x in v[:8]]
                    out[int(name[3:])] = (sum(v) - v[3] - v[4], sum(v))  # less idle, iowait
    except (OSError, ValueError):
        pass
    return out


def cpu_busy(before, after, cpu):
    """Share (0..1) of cpu's time that was busy between two cpu_stat()s."""
    if cpu not in before or cpu not in after:
        return None
    busy = after[cpu][0] - before[cpu][0]
    total = after[cpu][1] - before[cpu][1]
    return busy / total if total > 0 else None


def start_server(cmd, what):
    """Start a helper server that prints its port on its first stdout line.
    Returns (Popen, port)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    r, _, _ = select.select([p.stdout], [], [], WAIT)
    line = p.stdout.readline() if r else b""
    if not line.strip().isdigit():
        p.kill()
        p.wait()
        raise BenchError("%s did not print its port (%r)" % (what, line[:200]))
    return p, int(line)


def stop_server(p):
    if p is not None and p.poll() is None:
        p.kill()
        p.wait()


def http_get_json(port, path, tls=None):
    """GET path from 127.0.0.1:port (over TLS when tls is an SSLContext, as
    "localhost"), Connection: close; returns the parsed JSON body."""
    s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    OWN_PORTS.add(s.getsockname()[1])
    try:
        if tls is not None:
            s = tls.wrap_socket(s, server_hostname="localhost")
        s.sendall(b"GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                  % path.encode())
        data = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            data += d
    except (OSError, ssl.SSLError) as e:
        raise BenchError("GET %s from port %d failed: %s" % (path, port, e))
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise BenchError("GET %s from port %d: %r" % (path, port, head[:100]))
    return json.loads(body)


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

    def send_raw(self, data, what):
        """Send one whole pre-built request (no retry); returns (status, ns
        (kernel stamp) of the first response byte)."""
        if self.sock is None:
            self._connect()
        try:
            self.sock.sendall(data)
        except OSError as e:
            self.close()
            raise BenchError("%s: the connection to port %d broke while sending: %s"
                             % (what, self.addr[1], e))
        r = self._response(what)
        if r is None:
            raise BenchError("%s: port %d closed the connection without answering"
                             % (what, self.addr[1]))
        return r

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
        self.cpu = None             # the CPU everything is pinned to (None: not pinned)
        self.remote_cpu = None      # another allowed CPU, for servers that stand for remote ones
        self._certs = None
        self._tls_client = None
        self.tls_sink = None        # Popen of test/bench/tls_sink.py, started on first use
        self.tls_sink_port = None
        self.aws = None             # Popen of the fake AWS (AWS_CHILD), started on first use
        self.aws_port = None
        self.aws_creds = None
        self.broken = []            # what broke without stopping the bench (exit 1 at the end)

    def pin(self, pid, cpu):
        """Pin process pid to cpu (no-op when not pinning)."""
        if cpu is not None:
            os.sched_setaffinity(pid, {cpu})

    def certs(self):
        """make_test_ca() paths of a throwaway CA and a localhost certificate."""
        if self._certs is None:
            sys.path.insert(0, FAKES)
            from fake_apm import make_test_ca
            try:
                self._certs = make_test_ca(os.path.join(self.tmp, "ca"))
            except (RuntimeError, OSError) as e:
                raise Skip("cannot make test certificates with the openssl CLI: %s" % e)
        return self._certs

    def tls_client(self, like_apm_ext=False):
        """An SSLContext that trusts the test CA; like_apm_ext: TLS 1.2 only and
        apm-ext's suites in its order, so that the sink negotiates the same."""
        if self._tls_client is None:
            self._tls_client = {}
            for like in (False, True):
                c = ssl.create_default_context(cafile=self.certs()["ca"])
                if like:
                    c.maximum_version = ssl.TLSVersion.TLSv1_2
                    c.set_ciphers(APM_EXT_SUITES)
                self._tls_client[like] = c
        return self._tls_client[like_apm_ext]

    def start_tls_sink(self):
        """test/bench/tls_sink.py with the localhost certificate; returns its port."""
        if self.tls_sink is None:
            c = self.certs()
            self.tls_sink, self.tls_sink_port = start_server(
                [sys.executable, os.path.join(HERE, "tls_sink.py"), "--cert", c["cert"],
                 "--key", c["key"]], "the TLS sink")
        return self.tls_sink_port

    def tls_sink_stats(self):
        return http_get_json(self.start_tls_sink(), "/__sink/stats", self.tls_client())

    def start_aws(self):
        """The fake AWS (test/fakes/fake_aws.py) in a process of its own, so that its
        threads stay out of ours; returns its port. It prints one JSON line
        per call (see AWS_CHILD) on self.aws.stdout."""
        if self.aws is None:
            c = self.certs()
            self.aws_creds = {"AWS_ACCESS_KEY_ID": "ASIABENCH" + uuid.uuid4().hex[:11].upper(),
                              "AWS_SECRET_ACCESS_KEY": uuid.uuid4().hex + uuid.uuid4().hex[:8],
                              "AWS_SESSION_TOKEN": "IQoJb3JpZ2luX2VjE" + uuid.uuid4().hex * 4}
            self.aws, self.aws_port = start_server(
                [sys.executable, "-c", AWS_CHILD, FAKES, c["cert"], c["key"],
                 self.aws_creds["AWS_ACCESS_KEY_ID"], self.aws_creds["AWS_SECRET_ACCESS_KEY"],
                 self.aws_creds["AWS_SESSION_TOKEN"], REGION, SECRET_ID, SECRET_TOKEN],
                "the fake AWS")
            os.set_blocking(self.aws.stdout.fileno(), False)
        return self.aws_port

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
             "APM_EXT_TELEMETRY_PORT": str(free_port("0.0.0.0")),
             "APM_EXT_OTLP_PORT": str(free_port())}
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
        for p in (self.sink, self.tls_sink, self.aws):
            stop_server(p)
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def row(figure, apm, floor=None, target="", ok=None, unit="", kind="num", broken=False):
    """One table row. apm/floor: a number, a stats() dict or None. ok: True
    (target met), False (missed) or None (no target); broken: apm-ext
    misbehaved in this case (see ctx.broken)."""
    return {"figure": figure, "unit": unit, "apm_ext": apm, "floor": floor,
            "target": target, "ok": ok, "kind": kind, "broken": broken}


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


def elf_sections(path):
    """{name: bytes} of the allocated sections of an ELF file (`size -A`:
    section headers survive -s), or None without binutils."""
    try:
        r = subprocess.run(["size", "-A", path], capture_output=True, text=True)
    except OSError:
        return None
    if r.returncode != 0:
        return None
    out = {}
    for ln in r.stdout.splitlines():
        f = ln.split()
        if len(f) == 3 and f[0].startswith(".") and f[1].isdigit() and f[2] != "0":
            out[f[0]] = int(f[1])
    return out


def make_vars():
    """{MUSL_CC, CFLAGS_REL, LDFLAGS_REL, BEARSSL_A} as the Makefile sets them."""
    names = ("MUSL_CC", "CFLAGS_REL", "LDFLAGS_REL", "BEARSSL_A")
    prog = "include Makefile\n__bench_vars:\n\t@echo '%s'\n" % "|".join("$(%s)" % n for n in names)
    try:
        r = subprocess.run(["make", "-s", "--no-print-directory", "-f", "-", "__bench_vars"],
                           input=prog, capture_output=True, text=True, cwd=ROOT)
    except OSError:
        return None
    vals = r.stdout.strip().split("|")
    return dict(zip(names, vals)) if r.returncode == 0 and len(vals) == len(names) else None


def size_by_origin():
    """Bytes of the allocated non-bss sections of apm-ext by the object they
    come from: link apm-ext.c as the Makefile does, minus -s, plus a linker
    map, into build/ (once per change of the sources); None if that fails."""
    src = os.path.join(ROOT, "apm-ext.c")
    out = os.path.join(BUILD, "apm-ext.unstripped")
    mapf = out + ".map"
    v = make_vars()
    if v is None:
        return None
    newest = max(os.path.getmtime(os.path.join(ROOT, f))
                 for f in ("apm-ext.c", "apm-ext.h", "Makefile"))
    if not (os.path.exists(mapf) and os.path.getmtime(mapf) >= newest):
        ld = [x for x in v["LDFLAGS_REL"].split() if x != "-s"]
        cmd = [v["MUSL_CC"]] + v["CFLAGS_REL"].split() + ["-o", out, src, v["BEARSSL_A"]] + \
            ld + ["-Wl,-Map=" + mapf]
        os.makedirs(BUILD, exist_ok=True)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        except OSError:
            return None
        if r.returncode != 0:
            return None
    keep = set((elf_sections(out) or {})) - {".bss", ".tbss", ".comment"}
    origin = {}
    sect = None
    with open(mapf, errors="replace") as f:
        for ln in f:
            if ln.strip() == "":
                continue
            if not ln.startswith(" "):          # an output section (or another block)
                sect = ln.split()[0] if ln.startswith(".") else None
                continue
            if sect not in keep:
                continue
            parts = ln.split()
            if parts[0].startswith(".") or parts[0] == "COMMON" or parts[0] == "*fill*":
                name, parts = parts[0], parts[1:]
            else:
                name = None                     # the second line of a long input section
            if len(parts) < 2 or not parts[0].startswith("0x") or not parts[1].startswith("0x"):
                continue                        # a symbol, or a name alone on its line
            size = int(parts[1], 16)
            obj = " ".join(parts[2:])
            if name == "*fill*":
                who = "alignment padding"
            elif "libbearssl" in obj:
                who = "BearSSL"
            elif "musl" in obj or "libc.a" in obj or "crt" in os.path.basename(obj) or \
                    "libgcc" in obj:
                who = "musl libc, crt, libgcc"
            else:
                who = "apm-ext.c"
            origin[who] = origin.get(who, 0) + size
    return origin


def m_size(ctx):
    a, f = os.path.getsize(ctx.binary), os.path.getsize(ctx.floor)
    # 224 KiB: the bound the HTTPS work may grow to (it was 200 KiB until the
    # resolver process, the audit fixes and the hardening flags took 8 KiB)
    rows = [row("binary size", a / KiB, f / KiB, "<= 224 KiB", a <= 224 * KiB, "KiB")]
    sa, sf = elf_sections(ctx.binary), elf_sections(ctx.floor)
    if not sa or not sf:
        ctx.notes.append("no section sizes: `size` (binutils) failed")
        return rows
    top = [n for n in sa if n not in (".bss", ".tbss") and sa[n] >= KiB]
    small = [n for n in sa if n not in (".bss", ".tbss") and n not in top]
    for n in top:
        rows.append(row("  section %s" % n, sa[n] / KiB, sf.get(n, 0) / KiB, unit="KiB"))
    rows.append(row("  other sections (%s)" % " ".join(small), sum(sa[n] for n in small) / KiB,
                    sum(v for n, v in sf.items() if n not in top and n not in (".bss", ".tbss"))
                    / KiB, unit="KiB"))

    def rest(size, secs):
        return size - sum(v for n, v in secs.items() if n not in (".bss", ".tbss"))
    rows.append(row("  ELF headers, page alignment", rest(a, sa) / KiB, rest(f, sf) / KiB,
                    unit="KiB"))
    rows.append(row("  .bss (zeroed memory, not in the file)", sa.get(".bss", 0) / KiB,
                    sf.get(".bss", 0) / KiB, unit="KiB"))
    origin = size_by_origin()
    if origin:
        for who in ("apm-ext.c", "BearSSL", "musl libc, crt, libgcc", "alignment padding"):
            if who in origin:
                rows.append(row("  sections above by origin: %s" % who, origin[who] / KiB,
                                unit="KiB"))
    else:
        ctx.notes.append("no size by origin: could not link build/apm-ext.unstripped with a map")
    return rows


SIZES = [("flush only", 0), ("1 KB", 1024), ("100 KB", 100 * 1024), ("1 MB", 1024 * 1024)]


def m_latency(ctx):
    """Per-invocation added latency, one apm-ext and one floor, interleaved."""
    runs = ctx.args.runs
    apm_lam, floor_lam = Lambda(telemetry=True), Lambda(telemetry=True)
    env = ctx.env()
    agent = tel = otlp = None
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
        otlp = Client(apm_lam, int(env["APM_EXT_OTLP_PORT"]))
        tel = Client(apm_lam, apm_lam.tel_port)
        otlp_body = bytes((i * 131 + i // 97) & 0xFF for i in range(100 * 1024))
        otlp_hdrs = [("Content-Type", "application/x-protobuf"),
                     ("User-Agent", "OTel-OTLP-Exporter-JavaScript/0.223.0")]
        bodies = {n: ndjson(n) for _, n in SIZES if n}
        sent = {"bytes": 0}
        last_rid = [None]
        intake_hdrs = [("Content-Type", "application/x-ndjson"),
                       ("User-Agent", "apm-agent-nodejs/4.7.0 (bench-fn)")]

        def invoke_apm(size, telemetry):
            """telemetry: None (no records), "after" (runtimeDone right after the
            flushed POST's 202), "only" (runtimeDone, no flushed POST) or "otlp"
            (the body is an OTLP/HTTP export instead, as an OpenTelemetry SDK's
            force-flush sends it, then runtimeDone)."""
            rid = str(uuid.uuid4())
            n0 = len(apm_lam.nexts)
            apm_lam.invoke(rid)
            last_rid[0] = rid
            if telemetry == "otlp":
                status, _ = otlp.request("POST", "/v1/traces", otlp_body, otlp_hdrs)
                if status != 200:
                    raise BenchError("apm-ext answered %d to a %d-byte OTLP export"
                                     % (status, len(otlp_body)))
                sent["bytes"] += len(otlp_body)
            elif size:
                status, _ = agent.request("POST", "/intake/v2/events", bodies[size], intake_hdrs)
                if status != 202:
                    raise BenchError("apm-ext answered %d to a %d-byte intake POST" % (status, size))
                sent["bytes"] += size
            if telemetry:                       # ready before the runtime answers
                done = json.dumps([{"time": iso_now(), "type": "platform.runtimeDone", "record": {
                    "requestId": rid, "status": "success",
                    "metrics": {"durationMs": 1.0, "producedBytes": 42}}}]).encode()
            if telemetry in ("only", "otlp"):
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
                 ("100 KB, ended by runtimeDone only", 100 * 1024, "only"),
                 ("100 KB OTLP export, ended by runtimeDone", 100 * 1024, "otlp")]
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
        otlp.close()
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
        for c in (agent, tel, otlp):
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
        if label in ("100 KB", "100 KB OTLP export, ended by runtimeDone"):
            target, ok = "< 1000 us", s["median"] < 1000
        rows.append(row("added latency, %s" % label, s, fl, target, ok, "us", "stats"))
    ctx.raw["latency_rss_kb"] = {"apm_init": hwm_init, "apm": hwm_a, "floor": hwm_f}
    rows.append(row("peak RSS after latency runs (VmHWM)", hwm_a, hwm_f, unit="KiB"))
    rows.append(row("SHUTDOWN -> exit after latency runs (1 run)", us(exit_a) if exit_a else None,
                    us(exit_f) if exit_f else None, unit="us"))
    return rows


# ------------------------------------------------- TLS, AWS secrets, throughput

INIT_MS = 50            # the function's init: first /next -> first INVOKE
FIRST_SIZE = 1024       # agent bytes of each invocation after a cold start
TPUT_REQ = 1 << 20      # one agent request of the throughput runs
TPUT_CHUNK = 32768      # chunk size of the direct runs (apm-ext sends a queue block per chunk)
TPUT_FWD_TIMEOUT_S = 10  # apm-ext's forwarder timeout in the throughput runs (default 3 s)
INTAKE_HDRS = [("Content-Type", "application/x-ndjson"),
               ("User-Agent", "apm-agent-nodejs/4.7.0 (bench-fn)")]
# apm-ext's offer (tls_client_init in apm-ext.c), in OpenSSL's names
APM_EXT_SUITES = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                  "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                  "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")
SECRET_ID = "bench/apm-secret-token"
SECRET_TOKEN = "bench-token-" + uuid.uuid4().hex

# The fake AWS, run as `python3 -c AWS_CHILD FAKES cert key access-key secret-key
# session-token region secret-id secret-value`: prints its port, then one JSON
# line per finished call, times turned from its monotonic clock into ours
# (CLOCK_REALTIME ns): t_accept (TCP accept), t (request head read), t_end
# (answer written); and {"tls_error": ...} for a failed handshake.
AWS_CHILD = r'''
import json, sys, time
sys.path.insert(0, sys.argv[1])
from fake_aws import FakeAWS
cert, key, ak, sk, tok, region, sid, value = sys.argv[2:10]
aws = FakeAWS(cert, key, ak, sk, region, tok)
aws.secrets[sid] = value
off = time.time_ns() - time.monotonic_ns()

def real(t):
    return None if t is None else int(t * 1e9) + off

print(aws.port, flush=True)
seen = errs = 0
while True:
    aws.wait_for(lambda a: (len(a.calls) > seen and a.calls[seen].done)
                 or len(a.tls_errors) > errs, 3600)
    calls, accepts, tls_errors = aws.calls, aws.connections, aws.tls_errors
    out = []
    while seen < len(calls) and calls[seen].done:
        c = calls[seen]
        seen += 1
        out.append({"op": c.op, "status": c.status, "sig_ok": c.sig_ok,
                    "sig_error": c.sig_error, "problems": c.problems,
                    "secret_id": c.secret_id, "conn": c.conn_id,
                    "t_accept": real(accepts[c.conn_id - 1]) if 0 < c.conn_id <= len(accepts)
                    else None, "t": real(c.t), "t_end": real(c.t_end)})
    for e in tls_errors[errs:]:
        out.append({"tls_error": e})
    errs = len(tls_errors)
    sys.stdout.write("".join(json.dumps(o) + "\n" for o in out))
    sys.stdout.flush()
'''


def diff_text(a, b, what):
    """'<what> +N us' between the medians of two stats() dicts."""
    if not a or not b:
        return ""
    return "%s %+.0f us" % (what, a["median"] - b["median"])


def read_202(sock, what):
    """Read one answer (no body) from a blocking socket; it must be a 202."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        try:
            d = sock.recv(65536)
        except (OSError, ssl.SSLError) as e:
            raise BenchError("%s: %s" % (what, e))
        if not d:
            raise BenchError("%s: the sink closed the connection" % what)
        buf += d
    head, _, rest = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 202") or rest:
        raise BenchError("%s: unexpected answer %r" % (what, buf[:200]))


def direct_connect(ctx, port, tls):
    """A warm (connected, handshaken) blocking connection straight to a sink."""
    s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    OWN_PORTS.add(s.getsockname()[1])
    DIRECT_PORTS.add(s.getsockname()[1])
    if tls:
        try:
            s = ctx.tls_client(like_apm_ext=True).wrap_socket(s, server_hostname="localhost")
        except (OSError, ssl.SSLError) as e:
            s.close()
            raise BenchError("TLS handshake with the TLS sink failed: %s" % e)
    return s


def intake_request(port, body, chunk=None):
    """A whole POST /intake/v2/events request: Content-Length, or chunked
    (chunk bytes a chunk) as apm-ext sends upstream."""
    head = ("POST /intake/v2/events HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port +
            "".join("%s: %s\r\n" % kv for kv in INTAKE_HDRS)).encode()
    if chunk is None:
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    parts = [head, b"Transfer-Encoding: chunked\r\n\r\n"]
    for i in range(0, len(body), chunk):
        c = body[i:i + chunk]
        parts += [b"%x\r\n" % len(c), c, b"\r\n"]
    parts.append(b"0\r\n\r\n")
    return b"".join(parts)


def send_report(lam, request_id):
    """POST the invocation's platform.report to apm-ext's telemetry listener,
    as Lambda does; without it apm-ext waits for it at SHUTDOWN (up to 500 ms)."""
    if lam.tel_port is None:
        return
    tel = Client(lam, lam.tel_port)
    try:
        st, _ = tel.request("POST", "/", json.dumps([{
            "time": iso_now(), "type": "platform.report", "record": {
                "requestId": request_id, "status": "success", "metrics": {
                    "durationMs": 1.0, "billedDurationMs": 1, "memorySizeMB": 128,
                    "maxMemoryUsedMB": 20}}}]).encode(), [("Content-Type", "application/json")])
    finally:
        tel.close()
    if st != 200:
        raise BenchError("apm-ext answered %d to a telemetry POST" % st)


def agent_invocation(lam, agent, body, what):
    """One syncflush invocation with the bench as the agent: INVOKE, POST
    body (if any), then the flushed POST. Returns the added latency (ns):
    the next /next minus the flushed POST's 202. lam.last_rid: its requestId."""
    n0 = len(lam.nexts)
    lam.last_rid = str(uuid.uuid4())
    lam.invoke(lam.last_rid)
    if body:
        st, _ = agent.request("POST", "/intake/v2/events", body, INTAKE_HDRS)
        if st != 202:
            raise BenchError("%s: apm-ext answered %d to a %d-byte intake POST"
                             % (what, st, len(body)))
    st, t_resp = agent.request("POST", "/intake/v2/events?flushed=true", b"", INTAKE_HDRS)
    if st != 202:
        raise BenchError("%s: apm-ext answered %d to the flushed POST" % (what, st))
    lam.wait(lambda: len(lam.nexts) > n0, "apm-ext's /next after " + what)
    return lam.nexts[n0] - t_resp


def scheme_env(ctx, scheme, **extra):
    """apm-ext's environment for the C sink (http) or the TLS sink (https)."""
    if scheme == "https":
        extra = dict(extra, ELASTIC_APM_LAMBDA_APM_SERVER="https://localhost:%d"
                     % ctx.start_tls_sink(), ELASTIC_APM_SERVER_CA_CERT_FILE=ctx.certs()["ca"])
    return ctx.env(**extra)


def finish(ctx, lam, proc, what):
    """SHUTDOWN; the process must exit 0 having made no protocol error."""
    code, _ = lam.shutdown()
    if code != 0:
        raise BenchError("apm-ext (%s) exited %s after SHUTDOWN\n%s"
                         % (what, code, proc.log_tail()))
    if lam.errors:
        raise BenchError("apm-ext (%s) made protocol errors: %s" % (what, lam.errors))
    ctx.check_log(proc, what)


def cold_invocations_once(ctx, scheme, body):
    """Cold start against an http or https server, INIT_MS of function init,
    then two invocations of len(body) agent bytes."""
    lam = Lambda(telemetry=True)
    agent = None
    try:
        env = scheme_env(ctx, scheme)
        proc = lam.spawn(ctx.binary, "apm-lambda-extension", env, ctx.log_path("first-" + scheme))
        lam.wait(lambda: lam.t_register is not None, "apm-ext (%s) to register" % scheme)
        lam.wait(lambda: lam.nexts, "apm-ext's (%s) first /event/next" % scheme)
        end = lam.nexts[0] + INIT_MS * 1000000
        while now() < end:                  # the function initialises
            proc.check("the end of the function's init")
            lam.step(max(1, (end - now()) // 1000000))
        # apm-ext idle, its warm connection ready (checked against the sink's
        # handshake stamps): its CPU from exec to here
        t_cpu, cpu_ready = now(), cpu_ns(proc.pid)
        agent = Client(lam, int(env["ELASTIC_APM_DATA_RECEIVER_SERVER_PORT"]))
        first = agent_invocation(lam, agent, body, "the first invocation (%s)" % scheme)
        second = agent_invocation(lam, agent, body, "the second invocation (%s)" % scheme)
        hwm = proc.status()["VmHWM"]
        agent.close()
        send_report(lam, lam.last_rid)
        finish(ctx, lam, proc, "cold starts, %s server" % scheme)
        ru = proc.rusage
        return {"register": lam.t_register - proc.t_exec, "next": lam.nexts[0] - proc.t_exec,
                "first": first, "second": second, "hwm_kb": hwm, "t_exec": proc.t_exec,
                "t_next": lam.nexts[0], "t_done": now(), "t_cpu": t_cpu,
                "cpu_ready_us": cpu_ready / 1000.0,
                "cpu_us": (ru.ru_utime + ru.ru_stime) * 1e6 if ru else None}
    finally:
        if agent is not None:
            agent.close()
        lam.close()


SINK_IDLE_MS = 20        # new connection -> first request, in the "sink alone" rows


def sink_round_trips(ctx, body, n):
    """{(scheme, "first"|"next"): stats (us)} of a len(body)-byte POST -> 202
    sent by the bench straight to each sink: the first request on a new
    connection SINK_IDLE_MS after its handshake (as apm-ext's warm connection
    is used), then a second one at once; n rounds, the sinks alternating."""
    req = intake_request(0, body)
    out = {(k, w): [] for k in ("http", "https") for w in ("first", "next")}
    for _ in range(n):
        for scheme, port in (("http", ctx.sink_port), ("https", ctx.start_tls_sink())):
            s = direct_connect(ctx, port, scheme == "https")
            try:
                time.sleep(SINK_IDLE_MS / 1000.0)
                for which in ("first", "next"):
                    t0 = now()
                    s.sendall(req)
                    read_202(s, "a %d-byte POST straight to the %s sink" % (len(body), scheme))
                    out[(scheme, which)].append(us(now() - t0))
            except OSError as e:
                raise BenchError("a POST straight to the %s sink: %s" % (scheme, e))
            finally:
                s.close()
    return {k: stats(v) for k, v in out.items()}


FIRST_CONN_CPU_US = 2500   # issue #15: trust anchors + handshake, exec -> warm connection
NEW_CONN_CPU_US = 500      # issue #15: a later new connection (session resumed)
HTTPS_HWM_KIB = 400        # issue #15: peak RSS with https, cold start + 2 invocations
SM_FETCH_CPU_US = 3000     # issue #15: the Secrets Manager fetch
RESUME_PAIRS = 3           # (kept, new connection) invocation pairs per resumption run


def proc_state(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def freeze(proc):
    """SIGSTOP, as Lambda freezes the sandbox; returns once it is stopped."""
    os.kill(proc.pid, signal.SIGSTOP)
    end = time.monotonic() + WAIT
    while proc_state(proc.pid) != "T":
        proc.check("the extension to stop")
        if time.monotonic() > end:
            raise BenchError("apm-ext did not stop within %.0fs of SIGSTOP" % WAIT)
        time.sleep(0.0002)


def thaw(proc):
    os.kill(proc.pid, signal.SIGCONT)


def resume_once(ctx, body):
    """One https cold start, then RESUME_PAIRS pairs of invocations, the
    sandbox frozen (SIGSTOP) around each: "kept", over the kept-alive
    connection; "new", after the sink closed every connection (close_notify,
    as the server closes idle connections while Lambda has the sandbox
    frozen), so that its delivery opens a new one. Each: apm-ext's CPU from
    the thaw to its /next (read frozen again) and the window's bounds."""
    lam = Lambda(telemetry=True)
    agent = None
    port = ctx.start_tls_sink()
    try:
        env = scheme_env(ctx, "https")
        proc = lam.spawn(ctx.binary, "apm-lambda-extension", env, ctx.log_path("resume"))
        lam.wait(lambda: lam.t_register is not None, "apm-ext (resumption) to register")
        lam.wait(lambda: lam.nexts, "apm-ext's (resumption) first /event/next")
        end = lam.nexts[0] + INIT_MS * 1000000
        while now() < end:
            proc.check("the end of the function's init")
            lam.step(max(1, (end - now()) // 1000000))
        agent = Client(lam, int(env["ELASTIC_APM_DATA_RECEIVER_SERVER_PORT"]))
        agent_invocation(lam, agent, body, "the first invocation (resumption run)")
        out = []
        for _ in range(RESUME_PAIRS):
            for case in ("kept", "new"):
                what = "an invocation (%s connection)" % case
                freeze(proc)
                if case == "new":
                    n = http_get_json(port, "/__sink/drop", ctx.tls_client())["dropped"]
                    if n < 1:
                        raise BenchError("the TLS sink had no connection of apm-ext's to drop")
                t0, c0 = now(), cpu_ns(proc.pid)
                thaw(proc)
                agent_invocation(lam, agent, body, what)
                freeze(proc)
                out.append({"case": case, "cpu_us": (cpu_ns(proc.pid) - c0) / 1000.0,
                            "t0": t0, "t1": now()})
                thaw(proc)
        agent.close()
        send_report(lam, lam.last_rid)
        finish(ctx, lam, proc, "resumption runs, https server")
        return out
    finally:
        if agent is not None:
            agent.close()
        lam.close()


def resume_rows(ctx, body):
    """Rows: CPU of an invocation over the kept-alive connection vs one that
    opens a new connection (which must resume the session)."""
    runs = []
    resume_once(ctx, body)                  # warm-up, not counted
    gc.collect()
    for _ in range(ctx.args.runs):
        runs += resume_once(ctx, body)
    hands = [h for h in http_get_json(ctx.start_tls_sink(), "/__sink/handshakes",
                                      ctx.tls_client()) if h[3] not in OWN_PORTS]
    new_conns = resumed = kept_bad = 0
    for r in runs:
        mine = [h for h in hands if r["t0"] <= h[0] <= r["t1"]]
        if r["case"] == "kept":
            kept_bad += bool(mine)
        else:
            if not mine:
                raise BenchError("an invocation after the sink dropped apm-ext's connection "
                                 "made no new TLS connection")
            new_conns += len(mine)
            resumed += sum(1 for h in mine if len(h) > 4 and h[4])
    ctx.raw["tls_resume"] = runs
    kept = stats([r["cpu_us"] for r in runs if r["case"] == "kept"])
    new = stats([r["cpu_us"] for r in runs if r["case"] == "new"])
    diff = new["median"] - kept["median"]
    ctx.notes.append("resumption: %d runs x %d pairs of 1 KB invocations, frozen (SIGSTOP) "
                     "around each, CPU from the thaw to /next (schedstat); %d of %d new "
                     "connections resumed (the sink's session_reused), %d kept-alive "
                     "invocations opened a connection anyway; the sink resumes by session id "
                     "(OpenSSL's cache), not by ticket as Go's APM Server (BearSSL 0.6 has no "
                     "tickets)" % (ctx.args.runs, RESUME_PAIRS, resumed, new_conns, kept_bad))
    return [
        row("https: invocation over the kept-alive connection, CPU user+sys", kept,
            unit="us", kind="stats"),
        row("https: invocation after the server closed the connection (a new one), CPU "
            "user+sys", new, target="new connection (new - kept) %+.0f us <= %d us, "
            "resumed %d of %d" % (diff, NEW_CONN_CPU_US, resumed, new_conns),
            ok=diff <= NEW_CONN_CPU_US and resumed == new_conns > 0, unit="us",
            kind="stats"),
    ]


def m_tls_cold(ctx):
    """Cold start and the first invocations with an https:// APM server vs
    http://, alternating (items: cold start equal, first invocation ready)."""
    body = ndjson(FIRST_SIZE)
    ctx.start_tls_sink()
    s0 = ctx.tls_sink_stats()
    res = {"http": [], "https": []}
    for scheme in res:                          # warm the page cache, not counted
        cold_invocations_once(ctx, scheme, body)
    gc.collect()
    for i in range(ctx.args.runs):
        for scheme in (("http", "https") if i % 2 == 0 else ("https", "http")):
            res[scheme].append(cold_invocations_once(ctx, scheme, body))
    s1 = ctx.tls_sink_stats()
    n_https = ctx.args.runs + 1
    want = n_https * 2 * FIRST_SIZE
    if s1["body_bytes"] - s0["body_bytes"] < want:
        raise BenchError("the TLS sink got %d body bytes from the https cold starts, the agent "
                         "sent %d: data lost" % (s1["body_bytes"] - s0["body_bytes"], want))
    if s1["tls_errors"] > s0["tls_errors"]:
        raise BenchError("the TLS sink saw %d failed handshakes in the https cold starts"
                         % (s1["tls_errors"] - s0["tls_errors"]))
    # The sink's handshakes, matched to the runs by time: when was the warm
    # connection ready, and did a run need more than one?
    hands = http_get_json(ctx.start_tls_sink(), "/__sink/handshakes", ctx.tls_client())
    suites, curves, extra, late = {}, {}, 0, 0
    for r in res["https"]:
        mine = [h for h in hands if r["t_exec"] <= h[0] <= r["t_done"]]
        if not mine:
            raise BenchError("an https cold start made no TLS connection to the sink")
        r["ready"] = mine[0][1] - r["t_next"]
        extra += len(mine) > 1
        late += mine[0][1] > r["t_cpu"]     # CPU read before the warm connection was ready
        for h in mine:
            suites[h[2]] = suites.get(h[2], 0) + 1
            g = h[5] if len(h) > 5 and h[5] else "resumed" if len(h) > 4 and h[4] else "?"
            curves[g] = curves.get(g, 0) + 1
    rtt = sink_round_trips(ctx, body, min(ctx.args.runs, 30))
    ctx.raw["tls_cold"] = res
    ctx.raw["sink_round_trip_us"] = {"%s-%s" % k: v for k, v in rtt.items()}
    ctx.notes.append("https cold starts: the first INVOKE %d ms after the first /next (the "
                     "function's init); %d of %d made more than one TLS connection; suites "
                     "negotiated: %s; ECDHE group: %s (the sink, like Go's crypto/tls, picks "
                     "it by its own preference, X25519 first)"
                     % (INIT_MS, extra, len(res["https"]),
                        ", ".join("%s (%d)" % kv for kv in suites.items()),
                        ", ".join("%s (%d)" % kv for kv in curves.items())))
    if late:
        ctx.notes.append("https cold starts: in %d of %d runs the warm TLS connection was not "
                         "ready at the end of the function's init, when the CPU was read"
                         % (late, len(res["https"])))

    def st(scheme, field, scale=us):
        return stats([scale(r[field]) for r in res[scheme] if r.get(field) is not None])
    rows = []
    for label, field in (("exec -> register received", "register"),
                         ("exec -> first /next received", "next")):
        h, t = st("http", field), st("https", field)
        rows.append(row("cold start, http:// server: " + label, h, unit="us", kind="stats"))
        rows.append(row("cold start, https:// server: " + label, t,
                        target=diff_text(t, h, "https - http:"), unit="us", kind="stats"))
    rows.append(row("  https: first /next -> warm TLS connection ready (sink's handshake done)",
                    st("https", "ready"), unit="us", kind="stats"))
    h, t = st("http", "cpu_ready_us", float), st("https", "cpu_ready_us", float)
    if h and t and t["max"] > 0:
        d = t["median"] - h["median"]
        rows.append(row("CPU user+sys, exec -> end of init (warm connection ready), http://",
                        h, unit="us", kind="stats"))
        rows.append(row("CPU user+sys, exec -> end of init (warm TLS connection ready), "
                        "https://", t, target="first https connection (https - http) %+.0f us "
                        "<= %d us" % (d, FIRST_CONN_CPU_US), ok=d <= FIRST_CONN_CPU_US,
                        unit="us", kind="stats"))
    for label, field in (("1st invocation after a cold start", "first"),
                         ("2nd invocation", "second")):
        h, t = st("http", field), st("https", field)
        rows.append(row("added latency, %s, 1 KB, http://" % label, h, unit="us", kind="stats"))
        rows.append(row("added latency, %s, 1 KB, https://" % label, t,
                        target=diff_text(t, h, "https - http:"), unit="us", kind="stats"))
    for which, label in (("first", "1st request on a new connection"),
                         ("next", "2nd request")):
        h, t = rtt[("http", which)], rtt[("https", which)]
        rows.append(row("  sink alone: 1 KB POST -> 202, %s, http (C sink)" % label, h,
                        unit="us", kind="stats"))
        rows.append(row("  sink alone: 1 KB POST -> 202, %s, https (Python ssl)" % label, t,
                        target=diff_text(t, h, "https - http:"), unit="us", kind="stats"))
    for scheme in ("http", "https"):
        hwm = st(scheme, "hwm_kb", float)
        target, ok = ("<= %d KiB" % HTTPS_HWM_KIB, hwm["median"] <= HTTPS_HWM_KIB) \
            if scheme == "https" else ("", None)
        rows.append(row("peak RSS after cold start + 2 invocations, %s:// (VmHWM)" % scheme,
                        hwm, target=target, ok=ok, unit="KiB", kind="stats"))
    for scheme in ("http", "https"):
        c = st(scheme, "cpu_us", float)
        if c and c["max"] > 0:
            rows.append(row("CPU user+sys, cold start + 2 invocations, %s://" % scheme, c,
                            unit="us", kind="stats"))
    rows += resume_rows(ctx, body)
    return rows


class AwsCalls:
    """The fake AWS's report lines, read inside a Lambda poll loop."""

    def __init__(self, ctx):
        self.ctx, self.fd = ctx, ctx.aws.stdout.fileno()
        self.buf, self.calls = b"", []

    def on_read(self, t):
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        if not data:
            raise BenchError("the fake AWS exited (code %s)" % self.ctx.aws.poll())
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for ln in lines:
            o = json.loads(ln)
            if "tls_error" in o:
                raise BenchError("the fake AWS: TLS handshake failed: %s" % o["tls_error"])
            self.calls.append(o)


def secrets_once(ctx, with_secret, aws):
    """Cold start with the secret token in the environment, or fetched from
    the fake Secrets Manager (waits for that call before SHUTDOWN)."""
    lam = Lambda(telemetry=True)
    what = "cold starts, secret from Secrets Manager" if with_secret else \
        "cold starts, secret token in env"
    try:
        if with_secret:
            env = ctx.env(ELASTIC_APM_SECRETS_MANAGER_SECRET_TOKEN_ID=SECRET_ID,
                          ELASTIC_APM_LAMBDA_AWS_ENDPOINT="https://localhost:%d" % ctx.aws_port,
                          ELASTIC_APM_SERVER_CA_CERT_FILE=ctx.certs()["ca"], **ctx.aws_creds)
            lam.watch(ctx.aws.stdout, aws.on_read)
        else:
            env = ctx.env(ELASTIC_APM_SECRET_TOKEN=SECRET_TOKEN)
        n0 = len(aws.calls)
        proc = lam.spawn(ctx.binary, "apm-lambda-extension", env,
                         ctx.log_path("secret" if with_secret else "nosecret"))
        lam.wait(lambda: lam.t_register is not None, "apm-ext (%s) to register" % what)
        lam.wait(lambda: lam.nexts, "apm-ext's (%s) first /event/next" % what)
        r = {"register": lam.t_register - proc.t_exec, "next": lam.nexts[0] - proc.t_exec}
        if with_secret:
            lam.wait(lambda: len(aws.calls) > n0, "apm-ext's GetSecretValue call")
            c = aws.calls[n0]
            if c["op"] != "GetSecretValue" or c["status"] != 200 or not c["sig_ok"] or \
                    c["problems"] or c["secret_id"] != SECRET_ID:
                raise BenchError("the fake AWS did not like apm-ext's call: %r" % c)
            r.update(accept=c["t_accept"] - proc.t_exec, request=c["t"] - proc.t_exec,
                     answered=c["t_end"] - proc.t_exec, after_next=c["t_end"] - lam.nexts[0],
                     fake=c["t_end"] - c["t"])
        time.sleep(0.002)
        finish(ctx, lam, proc, what)
        if with_secret and len(aws.calls) != n0 + 1:
            raise BenchError("apm-ext made %d AWS calls in one cold start: %r"
                             % (len(aws.calls) - n0, aws.calls[n0:]))
        ru = proc.rusage
        r["cpu_us"] = (ru.ru_utime + ru.ru_stime) * 1e6 if ru else None
        return r
    finally:
        if with_secret:
            lam.unwatch(ctx.aws.stdout)
        lam.close()


def m_secrets(ctx):
    """Cold start with the secret token from (fake) Secrets Manager vs in the
    environment, alternating; and when the secret is in."""
    ctx.start_aws()
    aws = AwsCalls(ctx)
    res = {False: [], True: []}
    for w in res:                                   # warm-up, not counted
        secrets_once(ctx, w, aws)
    gc.collect()
    for i in range(ctx.args.runs):
        for w in ((False, True) if i % 2 == 0 else (True, False)):
            res[w].append(secrets_once(ctx, w, aws))
    ctx.raw["secrets"] = {"env": res[False], "secrets_manager": res[True]}

    def st(w, field, scale=us):
        return stats([scale(r[field]) for r in res[w] if r.get(field) is not None])
    rows = []
    for label, field in (("exec -> register received", "register"),
                         ("exec -> first /next received", "next")):
        p, s = st(False, field), st(True, field)
        rows.append(row("cold start, token in env: " + label, p, unit="us", kind="stats"))
        rows.append(row("cold start, token from Secrets Manager: " + label, s,
                        target=diff_text(s, p, "SM - env:"), unit="us", kind="stats"))
    rows += [
        row("secret fetched: exec -> GetSecretValue answered", st(True, "answered"),
            unit="us", kind="stats"),
        row("  of which: first /next -> fake AWS accepted the connection",
            stats([us(r["accept"] - r["next"]) for r in res[True]]), unit="us", kind="stats"),
        row("  of which: first /next -> GetSecretValue answered", st(True, "after_next"),
            unit="us", kind="stats"),
        row("  of which: the fake AWS's own time (request read -> answer written)",
            st(True, "fake"), unit="us", kind="stats"),
    ]
    p, s = st(False, "cpu_us", float), st(True, "cpu_us", float)
    if p and s and p["max"] > 0:
        rows.append(row("CPU user+sys per cold start, token in env", p, unit="us", kind="stats"))
        d = s["median"] - p["median"]
        rows.append(row("CPU user+sys per cold start, token from Secrets Manager (incl. fetch)",
                        s, target="the fetch (SM - env) %+.0f us <= %d us" % (d, SM_FETCH_CPU_US),
                        ok=d <= SM_FETCH_CPU_US, unit="us", kind="stats"))
    ctx.notes.append("secrets: the fake AWS (test/fakes/fake_aws.py, Python threads, its own process "
                     "on the bench's CPU) checks SigV4 and answers over TLS; its times are its "
                     "monotonic clock mapped to ours")
    return rows


def m_throughput(ctx):
    """MB/s of agent data through apm-ext to a sink, http and https, against
    the bench sending the same bytes straight to the sink (floor column)."""
    nreq = ctx.args.tput_mb or (32 if ctx.args.quick else 100)
    rounds = 1 if ctx.args.quick else 5
    body = ndjson(TPUT_REQ)
    sink_cpu = ctx.remote_cpu if ctx.remote_cpu is not None else ctx.cpu
    tport = ctx.start_tls_sink()
    ctx.tls_client()
    csink, cport = start_server([ctx.sink_bin], "the throughput sink")
    sinks = {"http": (csink, cport, None), "https": (ctx.tls_sink, tport, ctx.tls_client())}
    exts = {}
    t_start = now()
    try:
        for p, _, _ in sinks.values():
            ctx.pin(p.pid, sink_cpu)
        for scheme in ("http", "https"):
            lam = Lambda(telemetry=True)
            url = ("http://127.0.0.1:%d" % cport) if scheme == "http" else \
                ("https://localhost:%d" % tport)
            env = ctx.env(ELASTIC_APM_LAMBDA_APM_SERVER=url,
                          ELASTIC_APM_DATA_FORWARDER_TIMEOUT="%ds" % TPUT_FWD_TIMEOUT_S,
                          ELASTIC_APM_SERVER_CA_CERT_FILE=ctx.certs()["ca"])
            e = exts[scheme] = {"lam": lam, "agent": None}
            e["proc"] = lam.spawn(ctx.binary, "apm-lambda-extension", env,
                                  ctx.log_path("tput-" + scheme))
            lam.wait(lambda: lam.nexts, "apm-ext's (%s) first /event/next" % scheme)
            port = int(env["ELASTIC_APM_DATA_RECEIVER_SERVER_PORT"])
            e["agent"] = Client(lam, port)
            e["req"] = intake_request(port, body)
            e["flushed"] = ("POST /intake/v2/events?flushed=true HTTP/1.1\r\nHost: 127.0.0.1:%d"
                            "\r\nContent-Length: 0\r\n\r\n" % port).encode()
        direct_req = intake_request(0, body, TPUT_CHUNK)

        def sink_stats(scheme):
            return http_get_json(sinks[scheme][1], "/__sink/stats", sinks[scheme][2])

        def run_ext(scheme, n):
            e = exts[scheme]
            lam, agent, proc = e["lam"], e["agent"], e["proc"]
            what = "the %s throughput run" % scheme
            b0 = sink_stats(scheme)["body_bytes"]
            spid = sinks[scheme][0].pid
            k0 = cpu_stat()
            c0 = (cpu_ns(proc.pid), cpu_ns(spid), time.process_time_ns())
            n0 = len(lam.nexts)
            rid = str(uuid.uuid4())
            t0 = lam.invoke(rid)
            for _ in range(n):
                st, _ = agent.send_raw(e["req"], "a 1 MiB intake POST in " + what)
                if st != 202:
                    raise BenchError("apm-ext answered %d to a 1 MiB intake POST in %s" % (st, what))
            st, t_flushed = agent.send_raw(e["flushed"], "the flushed POST of " + what)
            if st != 202:
                raise BenchError("apm-ext answered %d to the flushed POST of %s" % (st, what))
            lam.wait(lambda: len(lam.nexts) > n0, "apm-ext's /next after " + what,
                     timeout=TPUT_FWD_TIMEOUT_S + 60)
            t1 = lam.nexts[n0]
            c1 = (cpu_ns(proc.pid), cpu_ns(spid), time.process_time_ns())
            k1 = cpu_stat()
            e["rid"] = rid
            got = sink_stats(scheme)["body_bytes"] - b0
            if got < n * len(body):
                held = (t1 - t_flushed) / 1e9
                raise Broken(
                    "%s: apm-ext called /next %.1f s after the flushed POST%s with %d of %d "
                    "body bytes at the sink: %s" % (
                        what, held, " (its forwarder timeout is %d s)" % TPUT_FWD_TIMEOUT_S,
                        got, n * len(body),
                        "delivery stalled until the forwarder timeout, data held back"
                        if held >= TPUT_FWD_TIMEOUT_S - 0.5 else "data lost"))
            return {"wall": t1 - t0, "bytes": n * len(body), "ext": c1[0] - c0[0],
                    "sink": c1[1] - c0[1], "agent": c1[2] - c0[2],
                    "cpu_here": cpu_busy(k0, k1, ctx.cpu), "cpu_sink": cpu_busy(k0, k1, sink_cpu)}

        def run_direct(scheme, n):
            p, port, tls = sinks[scheme]
            what = "the direct %s throughput run" % scheme
            b0 = sink_stats(scheme)["body_bytes"]
            s = direct_connect(ctx, port, tls is not None)
            try:
                c0 = (cpu_ns(p.pid), time.process_time_ns())
                t0 = now()
                for _ in range(n):
                    s.sendall(direct_req)
                    read_202(s, what)
                t1 = now()
                c1 = (cpu_ns(p.pid), time.process_time_ns())
            except OSError as e:
                raise BenchError("%s: %s" % (what, e))
            finally:
                s.close()
            got = sink_stats(scheme)["body_bytes"] - b0
            if got < n * len(body):
                raise BenchError("%s: the sink got %d body bytes of %d" % (what, got, n * len(body)))
            return {"wall": t1 - t0, "bytes": n * len(body), "sink": c1[0] - c0[0],
                    "agent": c1[1] - c0[1]}

        cases = [("ext", "http"), ("ext", "https"), ("direct", "http"), ("direct", "https")]
        res = {c: [] for c in cases}
        broken = {}             # case -> why: no more runs of it

        def run(case, n):
            if case in broken:
                return None
            try:
                return (run_ext if case[0] == "ext" else run_direct)(case[1], n)
            except Broken as e:
                broken[case] = str(e)
                ctx.broken.append(str(e))
                return None
        for c in cases:                             # warm-up: connections, queue pages
            run(c, min(8, nreq))
        gc.collect()
        for i in range(rounds):
            k = i % len(cases)
            for c in cases[k:] + cases[:k]:
                r = run(c, nreq)
                if r is not None:
                    res[c].append(r)
                gc.collect()
        hwm = {}
        for scheme, e in exts.items():
            hwm[scheme] = e["proc"].status()["VmHWM"]
            e["agent"].close()
            if e.get("rid"):
                send_report(e["lam"], e["rid"])
            finish(ctx, e["lam"], e["proc"], "throughput runs, %s server" % scheme)
        hands = http_get_json(tport, "/__sink/handshakes", ctx.tls_client())
    finally:
        for e in exts.values():
            if e["agent"] is not None:
                e["agent"].close()
            e["lam"].close()
        stop_server(csink)
        if ctx.tls_sink is not None and ctx.tls_sink.poll() is None:
            ctx.pin(ctx.tls_sink.pid, ctx.cpu)
    ctx.raw["throughput"] = {"%s-%s" % k: v for k, v in res.items()}

    def rate(runs, den="wall"):
        return stats([r["bytes"] / r[den] * 1e3 for r in runs if r.get(den)])   # MB/s

    def busy(runs, who):
        """Median % of the run's wall time: CPU time of who, or (cpu_*) how
        busy that CPU was, whoever used it."""
        v = [r[who] / r["wall"] if who in ("ext", "sink", "agent") else r[who]
             for r in runs if r.get(who) is not None]
        return 100.0 * statistics.median(v) if v else None

    def shares(scheme):
        runs = res[("ext", scheme)]
        e, a, s = busy(runs, "ext"), busy(runs, "agent"), busy(runs, "sink")
        here, there = busy(runs, "cpu_here"), busy(runs, "cpu_sink")
        return e, a, s, here, there

    def verdict(scheme):
        if ("ext", scheme) in broken:
            return "apm-ext broke (see 'bench: BROKEN' below)"
        if not res[("ext", scheme)]:
            return ""
        e, a, s, here, there = shares(scheme)
        sink = "Python ssl sink" if scheme == "https" else "C sink"
        if ctx.remote_cpu is None:
            return "%s: apm-ext %.0f%%, agent %.0f%%, sink %.0f%%" % (
                "one CPU" if ctx.cpu is not None else "not pinned", e, a, s)
        # A side is the limit when its CPU is full, mostly with our process(es).
        ours = e + a
        here_full = here >= 90 if here is not None else ours >= 85
        there_full = there >= 90 if there is not None else s >= 85
        def other(busy_cpu, own):
            o = (busy_cpu - own) if busy_cpu is not None else 0
            return ", other load %.0f%%" % o if o >= 10 else ""
        cands = []
        if there_full and s >= (there if there is not None else s) - s:
            cands.append((s, "%s-bound: the sink is the bottleneck (busy %.0f%%%s)"
                          % (sink, s, other(there, s))))
        if here_full and ours >= (here if here is not None else ours) - ours:
            cands.append((ours, "apm-ext-bound (apm-ext %.0f%% + agent %.0f%% of CPU %d%s)"
                          % (e, a, ctx.cpu, other(here, ours))))
        if cands:
            return max(cands)[1]
        if here_full or there_full:
            return "other load: CPU %s full, mostly not with ours (note)" % "+".join(
                str(c) for c, f in ((ctx.cpu, here_full), (sink_cpu, there_full)) if f)
        return "neither side's CPU full (note)"

    ext_h, ext_s = res[("ext", "http")], res[("ext", "https")]
    dir_h, dir_s = res[("direct", "http")], res[("direct", "https")]
    bh, bs = ("ext", "http") in broken, ("ext", "https") in broken
    rows = [
        row("intake throughput, http: agent -> apm-ext -> C sink", rate(ext_h), rate(dir_h),
            verdict("http"), None, "MB/s", "rate", bh),
        row("intake throughput, https: agent -> apm-ext -> Python ssl sink", rate(ext_s),
            rate(dir_s), verdict("https"), None, "MB/s", "rate", bs),
        row("  apm-ext ceiling, http: MB per apm-ext CPU-second", rate(ext_h, "ext"), None,
            unit="MB/s", kind="rate", broken=bh),
        row("  apm-ext ceiling, https: MB per apm-ext CPU-second", rate(ext_s, "ext"), None,
            unit="MB/s", kind="rate", broken=bs),
        row("  sink ceiling, http: MB per C sink CPU-second", rate(ext_h, "sink"),
            rate(dir_h, "sink"), unit="MB/s", kind="rate"),
        row("  sink ceiling, https: MB per Python ssl sink CPU-second", rate(ext_s, "sink"),
            rate(dir_s, "sink"), unit="MB/s", kind="rate"),
    ]
    for scheme in ("http", "https"):
        if res[("ext", scheme)] and ("ext", scheme) not in broken:
            e, a, s, here, there = shares(scheme)
            ctx.notes.append(
                "throughput, %s, busy (CPU time / wall time, medians): CPU %s: %s apm-ext "
                "%.0f%% + agent %.0f%%; CPU %s: %s sink %.0f%%" % (
                    scheme, ctx.cpu, "%.0f%% busy of which" % here if here is not None else "",
                    e, a, sink_cpu, "%.0f%% busy of which" % there if there is not None else "",
                    s))
    where = ("the sinks on CPU %d (a remote server's stand-in), apm-ext and the agent (the "
             "bench) on CPU %d" % (sink_cpu, ctx.cpu)) if ctx.remote_cpu is not None else \
        "everything on one CPU" if ctx.cpu is not None else "nothing pinned"
    suites = {"apm-ext": {}, "direct": {}}
    for h in hands:
        if h[0] >= t_start and (h[3] in DIRECT_PORTS or h[3] not in OWN_PORTS):
            d = suites["direct" if h[3] in DIRECT_PORTS else "apm-ext"]
            d[h[2]] = d.get(h[2], 0) + 1
    tls_info = "; ".join("%s: %s" % (k, ", ".join("%s (%d)" % kv for kv in v.items()))
                         for k, v in suites.items())
    ctx.notes.append(
        "throughput: %d x %d-byte identity ndjson agent requests per run (one keep-alive "
        "connection, ended by the flushed POST; time = INVOKE written -> /next, i.e. until "
        "the sink answered everything), %d run(s) per case, MB = 10^6 bytes; %s; floor "
        "column = the bench sending the same bytes straight to the sink (chunked, one "
        "connection; https: Python's ssl as the client); 'busy' = CPU time / wall time of "
        "the runs; TLS handshakes at the sink: %s" % (nreq, len(body), rounds, where, tls_info))
    ctx.notes.append("apm-ext VmHWM after the throughput runs: %d KiB (http), %d KiB (https)"
                     % (hwm["http"], hwm["https"]))
    return rows


MEASUREMENTS = [("cold", m_cold_start), ("size", m_size), ("latency", m_latency),
                ("tls", m_tls_cold), ("secrets", m_secrets), ("throughput", m_throughput)]


# ------------------------------------------------------------------ output

def fmt(v, kind):
    if v is None:
        return "-"
    if kind == "stats":
        return "%s (p90 %s)" % (fmt(v["median"], "num"), fmt(v["p90"], "num"))
    if kind == "rate":                  # throughput: the worst run matters, not the p90
        return "%s (min %s)" % (fmt(v["median"], "num"), fmt(v["min"], "num"))
    if isinstance(v, float) and abs(v) < 10:
        return "%.2f" % v
    return "%.0f" % v


WIDTH = 100     # the terminal output: every line within this many columns


def row_cells(r):
    """(figure (unit), apm-ext, floor, target, status) of a row, as text."""
    unit = " (%s)" % r["unit"] if r["unit"] else ""
    return (r["figure"] + unit, fmt(r["apm_ext"], r["kind"]), fmt(r["floor"], r["kind"]),
            r["target"], "BROKEN" if r.get("broken") else
            "" if r["ok"] is None else ("ok" if r["ok"] else "MISSED"))


def print_narrow_table(rows, out=sys.stdout, width=WIDTH):
    """The table within `width` columns: figure | apm-ext | floor | status. A
    figure too long for its column goes on over more lines; the row's target
    follows on a line of its own: "target: ..." when the status says whether it
    was met, "-> ..." for a comparison or a verdict."""
    cells = [row_cells(r) for r in rows]
    wa = max([len("apm-ext")] + [len(c[1]) for c in cells])
    wf = max([len("floor")] + [len(c[2]) for c in cells])
    ws = max([len("status")] + [len(c[4]) for c in cells])
    wfig = max(24, width - (wa + wf + ws + 9))

    def line(fig, a="", f="", st=""):
        print(("%s | %s | %s | %s" % (fig.ljust(wfig), a.rjust(wa), f.rjust(wf), st)).rstrip(),
              file=out)

    line("figure", "apm-ext", "floor", "status")
    print("-" * (wfig + 1) + "+" + "-" * (wa + 2) + "+" + "-" * (wf + 2) + "+" + "-" * (ws + 1),
          file=out)
    for r, (fig, a, f, target, st) in zip(rows, cells):
        ind = " " * (len(fig) - len(fig.lstrip()))
        figs = textwrap.wrap(fig, wfig, subsequent_indent=ind + "    ",
                             break_on_hyphens=False)
        line(figs[0], a, f, st)
        for x in figs[1:]:
            line(x)
        if target:
            text = ("target: " if r["ok"] is not None else "-> ") + target
            for x in textwrap.wrap(text, wfig, initial_indent=ind + "  ",
                                   subsequent_indent=ind + "    ", break_on_hyphens=False):
                line(x)


def print_wrapped(text, prefix="", out=sys.stdout, width=WIDTH):
    """text within `width` columns, the first line starting with prefix, the
    others indented as far."""
    print(textwrap.fill(text, width, initial_indent=prefix,
                        subsequent_indent=" " * len(prefix), break_on_hyphens=False), file=out)


def print_table(rows, out=sys.stdout):
    """The table with one line per figure: figure | apm-ext | floor | target | status."""
    head = ("figure", "apm-ext", "floor", "target", "status")
    cells = [head] + [row_cells(r) for r in rows]
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
    ap.add_argument("--wide", metavar="FILE", default=os.path.join(BUILD, "bench.txt"),
                    help="also write the table there with one line per figure, and the notes "
                         "unwrapped (default build/bench.txt; '' for none)")
    ap.add_argument("--tput-mb", type=int, default=None, metavar="N",
                    help="1 MiB agent requests per throughput run (default 100; --quick: 32)")
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
        if cpu >= 0:
            ctx.cpu = cpu
            others = [c for c in cpus if c != cpu]
            ctx.remote_cpu = others[-1] if others else None
        gc.disable()
        took = []
        for name, fn in MEASUREMENTS:
            if only is None or name in only:
                t_m = time.monotonic()
                try:
                    rows += fn(ctx)
                except Skip as e:
                    ctx.notes.append("%s skipped: %s" % (name, e))
                gc.collect()
                took.append("%s %.1fs" % (name, time.monotonic() - t_m))
        ctx.notes.append("time per measurement: " + ", ".join(took))
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
    title = ("apm-ext bench: %s (%d bytes), %d runs, %s, %.1fs, Linux %s"
             % (os.path.relpath(ctx.binary), os.path.getsize(ctx.binary), args.runs,
                "all on CPU %d" % cpu if cpu >= 0 else "not pinned (%d CPUs)" % len(cpus),
                time.monotonic() - t0, os.uname().release))
    notes = ctx.notes + ctx.log_notes()
    wide = args.wide
    if wide:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(wide)), exist_ok=True)
            with open(wide, "w") as f:
                print(title + "\n", file=f)
                print_table(rows, out=f)
                if notes:
                    print(file=f)
                for n in notes:
                    print("note: " + n, file=f)
        except OSError as e:
            print_wrapped("cannot write %s: %s" % (wide, e), "bench: ", out=sys.stderr)
            wide = None
    print_wrapped(title)
    print()
    print_narrow_table(rows)
    if notes:
        print()
        for n in notes:
            print_wrapped(n, "note: ")
    if ctx.args.keep:
        print_wrapped(ctx.tmp, "logs kept in ")
    if wide:
        print()
        print_wrapped(os.path.relpath(wide), "the table with one line per figure: ")
    for b in ctx.broken:
        print_wrapped(b, "bench: BROKEN: ", out=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"binary": ctx.binary, "size": os.path.getsize(ctx.binary),
                       "runs": args.runs, "rows": rows, "notes": notes, "raw": ctx.raw,
                       "broken": ctx.broken}, f, indent=1, default=str)
    return 1 if ctx.broken else 0


if __name__ == "__main__":
    sys.exit(main())
