"""The bench's side of the Lambda sandbox: Proc (a spawned extension), Lambda
(a lean fake Lambda control plane, driven from the caller's thread by a
single-threaded poll loop: no threads, so no GIL hand-offs) and Client (a
keep-alive HTTP/1.1 connection: the agent's, or Lambda's telemetry
sender's, answered inside that poll loop); and the run helpers of the
agent's side shared by the TLS, secrets and throughput measurements
(agent_invocation, send_report, finish, intake_request, direct_connect,
read_202).

Our own writes are stamped just before the write: after it, the woken
extension may run before the write returns.
"""

import json
import os
import select
import signal
import socket
import ssl
import time
import uuid

from common import (ARN, DIRECT_PORTS, EXT_API, FUNCTION_NAME, INVOKE_TIMEOUT_MS, OWN_PORTS,
                    WAIT, BenchError, epoch_ms, iso_now, now, parse_head, recv_stamped,
                    stamp_reads)

INTAKE_HDRS = [("Content-Type", "application/x-ndjson"),
               ("User-Agent", "apm-agent-nodejs/4.7.0 (bench-fn)")]


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


# ------------------------------------------------------- the agent's side

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


def finish(ctx, lam, proc, what):
    """SHUTDOWN; the process must exit 0 having made no protocol error."""
    code, _ = lam.shutdown()
    if code != 0:
        raise BenchError("apm-ext (%s) exited %s after SHUTDOWN\n%s"
                         % (what, code, proc.log_tail()))
    if lam.errors:
        raise BenchError("apm-ext (%s) made protocol errors: %s" % (what, lam.errors))
    ctx.check_log(proc, what)
