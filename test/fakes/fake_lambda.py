"""A fake AWS Lambda control plane for end-to-end tests of apm-ext.

FakeLambda serves, on 127.0.0.1:<ephemeral port> (HTTP/1.1, one thread per
connection), the three APIs a Lambda sandbox offers its processes, as AWS
documents them (the Extensions API, the Telemetry API and the Runtime API;
test/SPEC-FOR-TESTS.md says what the extension does with them):

  Extensions API  POST /2020-01-01/extension/register
                  GET  /2020-01-01/extension/event/next        (long poll)
                  POST /2020-01-01/extension/init/error, /exit/error
  Telemetry API   PUT  /2022-07-01/telemetry                   (subscribe)
                  ...and the fake POSTs telemetry batches to the subscriber
  Runtime API     GET  /2018-06-01/runtime/invocation/next      (long poll)
                  POST /2018-06-01/runtime/invocation/<id>/response, /error
                  POST /2018-06-01/runtime/init/error

The test drives the lifecycle (invoke, runtime_done, finish, shutdown...), the
fake plays the platform: it hands events to the parked /next calls, freezes
the sandbox (SIGSTOP) when Lambda would, thaws it (SIGCONT) on the next
event, emits platform.* telemetry and enforces the SHUTDOWN deadline.

Every blocking wait takes a timeout and raises AssertionError with a clear
message on expiry; synchronisation is by threading.Condition, never sleeps.
Protocol mistakes the extension makes (missing identifier, bad subscription
body, ...) are answered the way Lambda would and recorded in
`protocol_errors`, which a harness should assert to be empty.

Times named t_* are time.monotonic() values; deadlineMs values are epoch ms.
"""

import collections
import datetime
import http.client
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid

import http_scaffold

__all__ = ["FakeLambda", "Invocation"]

FUNCTION_NAME = "test-fn"
FUNCTION_VERSION = "$LATEST"
MEMORY_MB = 128
REGION = "us-east-1"
ACCOUNT_ID = "123456789012"
FUNCTION_ARN = "arn:aws:lambda:%s:%s:function:%s" % (REGION, ACCOUNT_ID, FUNCTION_NAME)
HANDLER = "index.handler"

TELEMETRY_SCHEMAS = ("2022-07-01", "2022-12-13")
TELEMETRY_TYPES = ("platform", "function", "extension")
TELEMETRY_RETRIES = 4          # attempts after the first one
TELEMETRY_POST_TIMEOUT = 30.0  # seconds; a thawed extension answers in time

# The invocation-deadline rule: the extension's /event/next that ends an
# invocation must come at least this long before the invocation's deadline,
# or it is a protocol error (exempt: invocations the test times out with
# timeout(), which Lambda ends itself). 0 = strictly before the deadline,
# what Lambda enforces (a later /next turns a successful invocation into a
# "Task timed out"); the extension itself aims at deadline - 100 ms.
DEADLINE_MARGIN_MS = 0


def iso_now(t=None):
    """ISO-8601 UTC with milliseconds and 'Z', as Lambda stamps telemetry."""
    if t is None:
        t = time.time()
    d = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (d.microsecond // 1000)


def epoch_ms():
    return int(time.time() * 1000)


def iso_ms(ms):
    """Epoch milliseconds -> ISO-8601 UTC with milliseconds and 'Z'."""
    d = datetime.datetime.fromtimestamp(ms // 1000, datetime.timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (ms % 1000)


def make_trace_header():
    root = "1-%08x-%s" % (int(time.time()), uuid.uuid4().hex[:24])
    return "Root=%s;Parent=%s;Sampled=1" % (root, uuid.uuid4().hex[:16])


class Invocation:
    """One invocation as the fake platform sees it."""

    def __init__(self, request_id, deadline_ms, t_invoke, trace_id, payload, timeout_ms,
                 t_deadline=None, index=0):
        self.request_id = request_id
        self.index = index                  # 0-based position in FakeLambda.invocations
        self.deadline_ms = deadline_ms      # epoch ms, as sent in the INVOKE event
        self.t_invoke = t_invoke            # monotonic, when the event was handed out
        # monotonic time of deadline_ms (the fake's own clock for the deadline rule)
        self.t_deadline = t_deadline if t_deadline is not None else \
            t_invoke + timeout_ms / 1000.0
        self.start_ms = deadline_ms - timeout_ms  # epoch ms; platform.start's time
        self.trace_id = trace_id            # X-Amzn-Trace-Id value
        self.payload = payload
        self.timeout_ms = timeout_ms
        self.ext_next_index = None          # 1-based number of the /next call that got it
        self.t_delivered = None             # monotonic, when that /next was answered
        self.t_handed = None                # monotonic, once that answer was written
        self.t_runtime_got = None           # monotonic, when a real runtime took it
        self.runtime_next_index = None
        self.t_runtime_done = None
        self.status = None                  # success | error | failure | timeout
        self.produced_bytes = 0
        self.response = None                # bytes posted by a real runtime
        self.t_end = None                   # extension's /next after it (finish)
        self.reported = False
        self.t_ext_next_after = None        # monotonic, the /next that ended it
        self.late_by = None                 # seconds past deadline - margin, if late
        self.deadline_error = None          # the protocol error recorded for it
        self.timed_out = False              # timeout() was called: Lambda ends it

    def __repr__(self):
        return "Invocation(%s)" % self.request_id


def _read_body(handler):
    """Request body with Content-Length or chunked transfer coding."""
    te = (handler.headers.get("Transfer-Encoding") or "").lower()
    if "chunked" in te:
        out = bytearray()
        while True:
            line = handler.rfile.readline(65537)
            if not line:
                raise ConnectionError("eof in chunk size")
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers
                    t = handler.rfile.readline(65537)
                    if t in (b"\r\n", b"\n", b""):
                        break
                return bytes(out)
            out += handler.rfile.read(size)
            handler.rfile.readline(3)
    n = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(n) if n else b""


class _Handler(http_scaffold.Handler):
    """Answers like Lambda's Go net/http server: TCP_NODELAY on the accepted
    socket and every response, head and body, in one write (one sendall), so
    that an extension sees the whole answer in the first segment it reads and
    never waits on a Nagle / delayed-ACK pause between head and body."""
    server_version = "FakeLambda/1.0"
    sys_version = ""

    def setup(self):
        super().setup()
        self.no_delay()

    def _send(self, status, body=b"", headers=None, ctype="application/json"):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        head = []
        if body or ctype:
            head.append(("Content-Type", ctype))
        head.append(("Date", self.date_time_string()))
        head += list((headers or {}).items())
        self.send_whole(status, head, body)

    def _dispatch(self, method):
        fl = self.server.fake
        try:
            body = _read_body(self)
        except (ValueError, ConnectionError) as e:
            fl._protocol_error("%s %s: unreadable body: %s" % (method, self.path, e))
            self.close_connection = True
            return
        path = urllib.parse.urlsplit(self.path).path
        try:
            fl._route(self, method, path, body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")


class _Server(http_scaffold.Server):
    # (a process that dies, a crashed runtime or a killed extension, resets
    # its connections: http_scaffold.Server prints no traceback for those)
    request_queue_size = 64


def _wait_stopped(proc, timeout=5.0):
    """Wait until proc is in the stopped state (after a SIGSTOP): only visible by
    polling /proc/<pid>/stat."""
    if proc is None:
        return
    end = time.monotonic() + timeout
    pause = threading.Event()
    while time.monotonic() < end and proc.poll() is None:
        try:
            with open("/proc/%d/stat" % proc.pid) as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                    return
        except (OSError, IndexError):
            return
        pause.wait(0.005)
    raise AssertionError("extension %d not stopped %.0fs after SIGSTOP" % (proc.pid, timeout))


def _client_gone(sock):
    """True when the peer of a parked long poll has closed its end."""
    try:
        r, _, _ = select.select([sock], [], [], 0)
        if not r:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class FakeLambda:
    """The fake platform. See the module docstring; API summary:

    FakeLambda(telemetry=True, late_telemetry=False)  .address  .port  .close()
                                         (telemetry="late" = both True)
    start_extension(path, env, name)     start_runtime(argv, env)
    wait_registered(timeout) -> t        wait_ext_next(n, timeout) -> t
    wait_init_done(timeout) -> t         wait_subscribed(timeout)
    wait_parked(timeout)                 wait_telemetry_idle(timeout)
    wait_delivered(inv) -> t             wait_ext_next_after(inv) -> t
    wait_for(pred(fake), timeout, what)
    invoke(request_id, timeout_ms, payload, trace_id, ext_delay=0) -> Invocation
    runtime_done(inv, status, produced_bytes)
    finish(inv, freeze=True, timeout) -> t of the extension's /next
    timeout(inv, at_deadline=True) -> shutdown()'s tuple
    shutdown(reason, deadline_ms, flush_telemetry=2.0) -> (exit_code, t_exit, killed)
    log_line(text_or_obj, request_id)    emit(records)
    set_late_telemetry(on)               hold_telemetry()  release_telemetry()
    post_telemetry_raw(body, content_type) -> status
    deadline_left(inv) -> seconds until inv's deadline (negative: past)
    ext_logs()  ext_log_text()  ext_log_tail(n)  freeze()  thaw()
    Recorded: t_exec, t_register, register_headers, ext_events_wanted,
    ext_next_times, ext_delivered, ext_errors, subscription, subscribe_attempts,
    telemetry_port, telemetry_posts, telemetry_statuses, telemetry_dropped,
    invocations, runtime_next_times, runtime_errors, shutdown_event,
    t_shutdown, freezes, protocol_errors.

    The invocation-deadline rule (every scenario): the extension's /next
    that ends invocation N must come before N's deadline minus
    DEADLINE_MARGIN_MS (the fake's monotonic inv.t_deadline); a later one
    is a protocol error, unless the test calls timeout(N) (then Lambda
    itself ends N at its deadline). Recorded per invocation:
    inv.t_ext_next_after, inv.late_by.

    Late telemetry (late_telemetry=True, or set_late_telemetry(True) at any
    time): the stream keeps its order, but what is emitted during
    invocation N (its function log lines, platform.runtimeDone,
    platform.report) and the platform.start of N+1 are held until the
    extension's /next has returned INVOKE N+1; then they leave together, as
    Lambda delivers what it buffered when a sandbox frozen right after N is
    thawed for N+1. Records emitted before the first invocation wait for
    INVOKE 1. hold_telemetry() holds every further batch (any mode) until
    release_telemetry(), to order a late batch after something the test
    does first (e.g. the agent's /register/transaction for N+1). SHUTDOWN
    and timeout() release everything (shutdown()'s flush). Held records do
    not count for wait_telemetry_idle().
    """

    def __init__(self, telemetry=True, late_telemetry=False):
        if telemetry == "late":
            telemetry, late_telemetry = True, True
        self.telemetry = bool(telemetry)
        self.late_telemetry = bool(late_telemetry)
        self._cv = threading.Condition()
        self._closing = False

        # extension state
        self.ext_proc = None
        self.ext_name = None
        self.ext_path = None            # the symlink that was executed
        self.ext_log_path = None        # its stderr
        self.ext_stdout_path = None
        self.t_exec = None
        self.ext_id = None              # identifier handed out at register
        self.t_register = None
        self.register_headers = None
        self.register_body = None
        self.ext_events_wanted = None
        self.ext_next_times = []        # monotonic time of every /next call
        self.ext_delivered = []         # (next index, event dict, t) per answered /next
        self.ext_errors = []            # (path, error type, body) of init/exit errors
        self._ext_parked = 0
        self._ext_queue = collections.deque()
        self._ext_delayed = 0           # INVOKEs held back by invoke(ext_delay=)
        self._ext_current = None        # invocation whose INVOKE the last /next got
        # Misbehaviours at start-up (None: answer as Lambda does). register_fault:
        # "close" (read the request, close without a word), "garbage" (a line
        # that is no HTTP status line), "status" (500 with Lambda's error body),
        # "no_id" (200 without Lambda-Extension-Identifier), "long_id" (200 with
        # an identifier of 200 characters), "reset_after" (200 as usual, then the
        # connection reset: SO_LINGER 0). subscribe_fault: "close" (read the PUT,
        # close without answering; recorded in subscribe_attempts as status None).
        self.register_fault = None
        self.subscribe_fault = None

        # runtime state
        self.runtime_proc = None
        self.runtime_log_path = None
        self.runtime_next_times = []
        self.runtime_errors = []        # init errors a runtime posted
        self._rt_parked = 0
        self._rt_queue = collections.deque()

        # platform state
        self.invocations = []
        self._by_id = {}
        self.frozen = False
        self.freezes = 0
        self.shutdown_event = None      # the SHUTDOWN event sent
        self.t_shutdown = None
        self.protocol_errors = []       # mistakes the extension made
        self._init_reported = False

        # telemetry state
        self.subscription = None        # parsed PUT body once subscribed (200)
        self.subscription_headers = None
        self.subscribe_attempts = []    # (status, body) of every PUT
        self.telemetry_port = None      # where batches go (127.0.0.1:<port>)
        self.telemetry_posts = []       # {'records','statuses','ok','t'} per batch
        self.telemetry_dropped = []     # records emitted with nobody subscribed
        self._tq = collections.deque()  # (time emitted, record, gate) pending
        self._t_inflight = False
        self._t_flush_now = False       # skip the buffering delay and gates (shutdown)
        self._t_hold = False            # hold_telemetry()

        self._tmpdirs = []
        self._srv = _Server(("127.0.0.1", 0), _Handler)
        self._srv.fake = self
        self.port = self._srv.server_address[1]
        self.address = "127.0.0.1:%d" % self.port
        self._srv_thread = threading.Thread(target=self._srv.serve_forever,
                                            name="fake-lambda-http", daemon=True)
        self._srv_thread.start()
        self._sender = threading.Thread(target=self._telemetry_sender,
                                        name="fake-lambda-telemetry", daemon=True)
        self._sender.start()

    # ------------------------------------------------------------------ waits

    def _wait(self, pred, timeout, what, watch_ext=False):
        """Wait (holding no lock on return) until pred() under the lock is true.

        Raises AssertionError after `timeout` seconds, or at once when
        watch_ext and the extension process has exited."""
        end = time.monotonic() + timeout
        with self._cv:
            while True:
                v = pred()
                if v:
                    return v
                if self._closing:
                    raise AssertionError("FakeLambda closed while waiting for " + what)
                if watch_ext and self.ext_proc is not None and self.ext_proc.poll() is not None:
                    raise AssertionError("extension exited (code %s) while waiting for %s"
                                         % (self.ext_proc.returncode, what))
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
                self._cv.wait(min(left, 0.1) if watch_ext else left)

    def wait_registered(self, timeout=10):
        """Wait for the extension's register; returns t_register."""
        self._wait(lambda: self.t_register is not None, timeout,
                   "the extension to register", watch_ext=True)
        return self.t_register

    def wait_ext_next(self, n, timeout=10):
        """Wait until the extension has made its n-th /next call; returns its time."""
        self._wait(lambda: len(self.ext_next_times) >= n, timeout,
                   "the extension's /next call #%d (seen %d)" % (n, len(self.ext_next_times)),
                   watch_ext=True)
        return self.ext_next_times[n - 1]

    def wait_delivered(self, inv, timeout=10):
        """Wait until the INVOKE of inv was handed to the extension's /next."""
        inv = self._inv(inv)
        self._wait(lambda: inv.t_handed is not None, timeout,
                   "INVOKE %s to reach the extension" % inv.request_id, watch_ext=True)
        return inv.t_delivered

    def wait_ext_next_after(self, inv, timeout=10):
        """Wait for the extension's first /next call after it got inv; returns
        its time. Unlike finish(), no report and no freeze."""
        inv = self._inv(inv)
        self._wait(lambda: inv.ext_next_index is not None
                   and len(self.ext_next_times) > inv.ext_next_index, timeout,
                   "the extension's /next after invocation %s" % inv.request_id,
                   watch_ext=True)
        return self.ext_next_times[inv.ext_next_index]

    def wait_init_done(self, timeout=10):
        """Init ends when the extension (and runtime, if any) wait in /next."""
        self.wait_ext_next(1, timeout)
        if self.runtime_proc is not None:
            self._wait(lambda: len(self.runtime_next_times) >= 1, timeout,
                       "the runtime's first /next")
        return self.ext_next_times[0]

    def wait_subscribed(self, timeout=10):
        self._wait(lambda: self.subscription is not None, timeout,
                   "the telemetry subscription", watch_ext=True)
        return self.subscription

    def wait_parked(self, timeout=10):
        """Wait until the extension is blocked in /next with no event pending."""
        self._wait(lambda: self._ext_parked > 0 and not self._ext_queue
                   and not self._ext_delayed, timeout,
                   "the extension to wait in /next (it has made %d calls)"
                   % len(self.ext_next_times), watch_ext=True)

    def wait_telemetry_idle(self, timeout=10):
        """Wait until every emitted record was POSTed (and answered, or given
        up). Records held back (late telemetry, hold_telemetry) do not count."""
        def idle():
            if self.subscription is None:
                return True
            return not self._t_inflight and not (
                self._tq and self._t_open_locked(self._tq[0], due=True))
        self._wait(idle, timeout, "telemetry delivery (%d records pending)" % len(self._tq))

    def wait_for(self, pred, timeout=10, what="condition"):
        """Wait until pred(self) is true; pred is evaluated under the lock
        and re-checked on every state change."""
        return self._wait(lambda: pred(self), timeout, what)

    # -------------------------------------------------------------- processes

    def _lambda_env(self):
        return {
            "AWS_LAMBDA_RUNTIME_API": self.address,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_LAMBDA_FUNCTION_NAME": FUNCTION_NAME,
            "AWS_LAMBDA_FUNCTION_VERSION": FUNCTION_VERSION,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(MEMORY_MB),
            "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
            "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
            "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            "AWS_SESSION_TOKEN": "fake-session-token",
            "TZ": ":UTC",
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        }

    @staticmethod
    def _merge(base, env):
        for k, v in (env or {}).items():
            if v is None:
                base.pop(k, None)
            else:
                base[k] = str(v)
        return base

    def start_extension(self, argv0_path, env=None, name="apm-lambda-extension"):
        """Start the extension like Lambda does from /opt/extensions/<name>.

        env updates the Lambda-like environment (a value None removes a
        variable). stderr goes to self.ext_log_path. Returns the Popen."""
        assert self.ext_proc is None, "an extension is already running"
        target = os.path.abspath(argv0_path)
        assert os.access(target, os.X_OK), "not an executable: %s" % target
        d = tempfile.mkdtemp(prefix="fake-lambda-")
        self._tmpdirs.append(d)
        os.mkdir(os.path.join(d, "extensions"))
        link = os.path.join(d, "extensions", name)
        os.symlink(target, link)
        self.ext_name = name
        self.ext_path = link
        self.ext_log_path = os.path.join(d, "extension.stderr")
        self.ext_stdout_path = os.path.join(d, "extension.stdout")
        full_env = self._merge(self._lambda_env(), env)
        with open(self.ext_log_path, "wb") as err, open(self.ext_stdout_path, "wb") as out:
            self.t_exec = time.monotonic()
            self.ext_proc = subprocess.Popen([link], env=full_env, cwd=d,
                                             stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                             start_new_session=True)
        threading.Thread(target=self._reap, args=(self.ext_proc,), daemon=True).start()
        return self.ext_proc

    def start_runtime(self, argv, env=None):
        """Start a runtime process (gets AWS_LAMBDA_RUNTIME_API, _HANDLER...)."""
        assert self.runtime_proc is None, "a runtime is already running"
        d = tempfile.mkdtemp(prefix="fake-lambda-rt-")
        self._tmpdirs.append(d)
        self.runtime_log_path = os.path.join(d, "runtime.log")
        base = self._lambda_env()
        base.update({"_HANDLER": HANDLER, "LAMBDA_TASK_ROOT": d,
                     "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/" + FUNCTION_NAME,
                     "AWS_LAMBDA_LOG_STREAM_NAME": "2024/01/01/[$LATEST]0123456789abcdef"})
        full_env = self._merge(base, env)
        with open(self.runtime_log_path, "wb") as log:
            self.runtime_proc = subprocess.Popen(list(argv), env=full_env, cwd=d,
                                                 stdin=subprocess.DEVNULL, stdout=log,
                                                 stderr=subprocess.STDOUT,
                                                 start_new_session=True)
        threading.Thread(target=self._reap, args=(self.runtime_proc,), daemon=True).start()
        return self.runtime_proc

    def _reap(self, proc):
        proc.wait()
        with self._cv:
            self._cv.notify_all()

    def _signal(self, proc, sig):
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass

    def _procs(self):
        return [p for p in (self.ext_proc, self.runtime_proc) if p is not None]

    def freeze(self):
        """Freeze the sandbox (SIGSTOP its processes), as Lambda does once
        the runtime and every extension wait in /next."""
        with self._cv:
            if self.frozen:
                return
            for p in self._procs():
                self._signal(p, signal.SIGSTOP)
            self.frozen = True
            self.freezes += 1
            self._cv.notify_all()

    def thaw(self):
        with self._cv:
            if not self.frozen:
                return
            for p in self._procs():
                self._signal(p, signal.SIGCONT)
            self.frozen = False
            self._cv.notify_all()

    def ext_log_text(self):
        if not self.ext_log_path or not os.path.exists(self.ext_log_path):
            return ""
        with open(self.ext_log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def ext_log_tail(self, n=30):
        return "\n".join(self.ext_log_text().splitlines()[-n:])

    def ext_logs(self):
        """The extension's stderr as a list of JSON objects. Fails the test
        on a line that is not a JSON object (a final line still being
        written, without its newline, is left out while the process runs)."""
        text = self.ext_log_text()
        lines = text.split("\n")
        if lines and lines[-1] and self.ext_proc is not None and self.ext_proc.poll() is None:
            lines = lines[:-1]
        out = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise AssertionError("extension log line %d is not JSON: %r" % (i, line[:300]))
            if not isinstance(obj, dict):
                raise AssertionError("extension log line %d is not a JSON object: %r"
                                     % (i, line[:300]))
            out.append(obj)
        return out

    # ------------------------------------------------------------- lifecycle

    def invoke(self, request_id=None, timeout_ms=3000, payload=None, trace_id=None,
               timeout=10, ext_delay=0.0):
        """Start an invocation: thaw, wait for the extension (and runtime) to
        be parked in /next, hand both the event, emit platform.start.

        ext_delay > 0 hands the INVOKE to the extension that many seconds
        after the runtime got it (a starved extension thread; the agent's
        flush and runtimeDone may then arrive before the extension knows the
        invocation). inv.t_invoke stays the time the runtime could start."""
        self.thaw()
        self.wait_parked(timeout)
        if self.runtime_proc is not None:
            self._wait(lambda: self._rt_parked > 0 and not self._rt_queue, timeout,
                       "the runtime to wait in /next")
        request_id = request_id or str(uuid.uuid4())
        trace_id = trace_id or make_trace_header()
        with self._cv:
            assert request_id not in self._by_id, "duplicate request id " + request_id
            now_e, now_m = time.time(), time.monotonic()
            deadline_ms = int(now_e * 1000) + timeout_ms
            inv = Invocation(request_id, deadline_ms, now_m, trace_id,
                             payload if payload is not None else {}, timeout_ms,
                             t_deadline=now_m + (deadline_ms - now_e * 1000) / 1000.0,
                             index=len(self.invocations))
            self.invocations.append(inv)
            self._by_id[request_id] = inv
            if not self._init_reported:
                self._init_reported = True
                self._emit_init_records(gate=inv.index)
            event = {"eventType": "INVOKE", "deadlineMs": inv.deadline_ms,
                     "requestId": request_id, "invokedFunctionArn": FUNCTION_ARN,
                     "tracing": {"type": "X-Amzn-Trace-Id", "value": trace_id}}
            if ext_delay > 0:
                self._ext_delayed += 1
                threading.Thread(target=self._deliver_late, args=(event, inv, ext_delay),
                                 daemon=True).start()
            else:
                self._ext_queue.append((event, inv))
            self._rt_queue.append(inv)
            # stamped with the invocation's start: deadlineMs - its time is
            # exactly the function's timeout, as with Lambda
            self._emit_locked([{"type": "platform.start", "time": iso_ms(inv.start_ms),
                                "record": {
                "requestId": request_id, "version": FUNCTION_VERSION,
                "tracing": {"spanId": uuid.uuid4().hex[:16], "type": "X-Amzn-Trace-Id",
                            "value": trace_id}}}], gate=inv.index)
            self._cv.notify_all()
        return inv

    def deadline_left(self, inv):
        """Seconds from now to inv's deadline (negative once it has passed)."""
        return self._inv(inv).t_deadline - time.monotonic()

    def _deliver_late(self, event, inv, delay):
        end = time.monotonic() + delay
        with self._cv:
            while not self._closing and time.monotonic() < end:
                self._cv.wait(end - time.monotonic())  # simulated scheduling delay
            self._ext_delayed -= 1
            self._ext_queue.append((event, inv))
            self._cv.notify_all()

    def _emit_init_records(self, gate=None):
        init_ms = 0.0
        if self.t_exec is not None and self.ext_next_times:
            init_ms = round((self.ext_next_times[0] - self.t_exec) * 1000, 3)
        base = {"initializationType": "on-demand", "phase": "init"}
        self._emit_locked([
            {"type": "platform.initStart", "record": dict(base, runtimeVersion="fake:1",
                                                          functionName=FUNCTION_NAME,
                                                          functionVersion=FUNCTION_VERSION)},
            {"type": "platform.initRuntimeDone", "record": dict(base, status="success")},
            {"type": "platform.initReport", "record": dict(base, status="success",
                                                           metrics={"durationMs": init_ms})},
        ], gate=gate)

    def _inv(self, inv):
        if isinstance(inv, Invocation):
            return inv
        with self._cv:
            assert inv in self._by_id, "unknown request id %r" % (inv,)
            return self._by_id[inv]

    def runtime_done(self, inv, status="success", produced_bytes=0):
        """The runtime answered: record it and emit platform.runtimeDone."""
        inv = self._inv(inv)
        with self._cv:
            self._runtime_done_locked(inv, status, produced_bytes)

    def _runtime_done_locked(self, inv, status, produced_bytes):
        assert inv.t_runtime_done is None, "runtime_done twice for %s" % inv.request_id
        inv.t_runtime_done = time.monotonic()
        inv.status = status
        inv.produced_bytes = produced_bytes
        dur = round((inv.t_runtime_done - inv.t_invoke) * 1000, 3)
        start = iso_now(time.time() - dur / 1000)
        self._emit_locked([{"type": "platform.runtimeDone", "record": {
            "requestId": inv.request_id, "status": status,
            "tracing": {"spanId": uuid.uuid4().hex[:16], "type": "X-Amzn-Trace-Id",
                        "value": inv.trace_id},
            "spans": [{"name": "responseLatency", "start": start, "durationMs": dur},
                      {"name": "responseDuration", "start": iso_now(), "durationMs": 0.0}],
            "metrics": {"durationMs": dur, "producedBytes": produced_bytes}}}])
        self._cv.notify_all()

    def finish(self, inv, freeze=True, timeout=10):
        """End the invocation as Lambda sees it: wait until the extension
        (and a real runtime) called /next after it, emit platform.report,
        freeze the sandbox if asked. Returns the time of the extension's /next."""
        inv = self._inv(inv)

        def ended():
            if inv.ext_next_index is None:
                return False
            if len(self.ext_next_times) <= inv.ext_next_index:
                return False
            if self.runtime_proc is not None:
                if inv.runtime_next_index is None or inv.t_runtime_done is None:
                    return False
                if len(self.runtime_next_times) <= inv.runtime_next_index:
                    return False
            return True
        self._wait(ended, timeout, "the extension's /next after invocation %s"
                   % inv.request_id, watch_ext=True)
        with self._cv:
            inv.t_end = self.ext_next_times[inv.ext_next_index]
            self._report_locked(inv, inv.status or "success")
        if freeze:
            self.freeze()
        return inv.t_end

    def _report_locked(self, inv, status):
        if inv.reported:
            return
        inv.reported = True
        t_done = inv.t_runtime_done or time.monotonic()
        dur = round((t_done - inv.t_invoke) * 1000, 3)
        metrics = {"durationMs": dur, "billedDurationMs": int(dur) + 1,
                   "memorySizeMB": MEMORY_MB, "maxMemoryUsedMB": 64}
        if inv is self.invocations[0] and self.t_exec is not None and self.ext_next_times:
            metrics["initDurationMs"] = round((self.ext_next_times[0] - self.t_exec) * 1000, 3)
        self._emit_locked([{"type": "platform.report", "record": {
            "requestId": inv.request_id, "status": status, "metrics": metrics,
            "tracing": {"spanId": uuid.uuid4().hex[:16], "type": "X-Amzn-Trace-Id",
                        "value": inv.trace_id}}}])

    def timeout(self, inv, deadline_ms=2000, park_timeout=10, at_deadline=True):
        """A function timeout: at the invocation's deadline (at_deadline; else
        now), runtimeDone(timeout), report(timeout), then the sandbox is
        reset: shutdown(reason='timeout'). Returns shutdown()'s tuple.

        Lambda ends such an invocation itself, so the deadline rule does not
        apply to it: a /next after its deadline (before or during this call)
        is no protocol error."""
        inv = self._inv(inv)
        with self._cv:
            inv.timed_out = True
            if inv.deadline_error is not None and inv.deadline_error in self.protocol_errors:
                self.protocol_errors.remove(inv.deadline_error)
        if at_deadline:
            with self._cv:
                while not self._closing and epoch_ms() < inv.deadline_ms:
                    self._cv.wait((inv.deadline_ms - epoch_ms()) / 1000.0)  # the clock
        self.thaw()
        with self._cv:
            if inv.t_runtime_done is None:
                self._runtime_done_locked(inv, "timeout", 0)
            self._report_locked(inv, "timeout")
        return self.shutdown("timeout", deadline_ms, park_timeout=park_timeout)

    def shutdown(self, reason="spindown", deadline_ms=2000, park_timeout=10,
                 flush_telemetry=2.0):
        """Send SHUTDOWN to the extension's pending /next (waiting for it to be
        parked), SIGTERM the runtime, wait for the extension's exit until the
        deadline, SIGKILL after it. Returns (exit_code, t_exit, killed).

        Telemetry still buffered (e.g. the last platform.report, held while
        the sandbox was frozen) is delivered first, without the buffering
        delay, waiting at most flush_telemetry seconds (0: don't), so that
        tests do not depend on that race."""
        proc = self.ext_proc
        assert proc is not None, "no extension started"
        self.thaw()
        if proc.poll() is not None:
            raise AssertionError("extension had already exited (code %s) before SHUTDOWN"
                                 % proc.returncode)
        if flush_telemetry and self.subscription is not None:
            with self._cv:
                self._t_flush_now = True
                self._cv.notify_all()
            try:
                self.wait_telemetry_idle(flush_telemetry)
            except AssertionError:
                pass  # the extension does not take telemetry: its problem, not ours
            finally:
                with self._cv:
                    self._t_flush_now = False
        if self.runtime_proc is not None:
            self._signal(self.runtime_proc, signal.SIGTERM)
        self.wait_parked(park_timeout)
        with self._cv:
            self.t_shutdown = time.monotonic()
            t_deadline = self.t_shutdown + deadline_ms / 1000.0
            self.shutdown_event = {"eventType": "SHUTDOWN", "shutdownReason": reason,
                                   "deadlineMs": epoch_ms() + deadline_ms}
            if "SHUTDOWN" in (self.ext_events_wanted or ()):
                self._ext_queue.append((self.shutdown_event, None))
            # else: Lambda sends nothing; the extension is killed at the deadline
            self._cv.notify_all()
        killed = False
        try:
            code = proc.wait(timeout=max(0.0, t_deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            killed = True
            self._signal(proc, signal.SIGKILL)
            code = proc.wait()
        t_exit = time.monotonic()
        if self.runtime_proc is not None and self.runtime_proc.poll() is None:
            try:
                self.runtime_proc.wait(timeout=0.3)
            except subprocess.TimeoutExpired:
                self._signal(self.runtime_proc, signal.SIGKILL)
                self.runtime_proc.wait()
        with self._cv:
            self._cv.notify_all()
        return code, t_exit, killed

    # -------------------------------------------------------------- telemetry

    def log_line(self, text_or_obj, request_id=None):
        """A function log line (telemetry type "function"). A dict is sent as
        an object (JSON log format; requestId added if given), text as is."""
        rec = text_or_obj
        if isinstance(rec, dict):
            rec = dict(rec)
            if request_id is not None:
                rec.setdefault("requestId", request_id)
        self.emit([{"type": "function", "record": rec}])

    def emit(self, records):
        """Queue telemetry records ({"type","record"[,"time"]}) for delivery."""
        with self._cv:
            self._emit_locked(records)

    def set_late_telemetry(self, on=True):
        """Late telemetry for what is emitted from now on (see the class doc)."""
        with self._cv:
            self.late_telemetry = bool(on)
            self._cv.notify_all()

    def hold_telemetry(self):
        """Send no further telemetry batch until release_telemetry() (or
        SHUTDOWN's flush). A batch already on its way still arrives."""
        with self._cv:
            self._t_hold = True
            self._cv.notify_all()

    def release_telemetry(self):
        with self._cv:
            self._t_hold = False
            self._cv.notify_all()

    def _t_open_locked(self, entry, due=False):
        """May this queued record leave now (its gate is open)? due: or as
        soon as the INVOKE that opens its gate, already taken, is written."""
        if self._t_flush_now or self.t_shutdown is not None:
            return True
        if self._t_hold:
            return False
        gate = entry[2]
        if gate is None:
            return True
        if gate >= len(self.invocations):
            return False
        inv = self.invocations[gate]
        return inv.t_handed is not None or (due and inv.ext_next_index is not None)

    def _emit_locked(self, records, gate=None):
        """Queue records. In late mode they wait until the extension got
        INVOKE number `gate` (default: the invocation after the current one)."""
        if self.late_telemetry:
            if gate is None:
                gate = len(self.invocations)
        else:
            gate = None
        now = time.monotonic()
        for r in records:
            r = dict(r)
            r.setdefault("time", iso_now())
            if self.subscription is None and not self.telemetry:
                self.telemetry_dropped.append(r)
                continue
            if self.subscription is not None:
                wanted = self.subscription.get("types", [])
                kind = r.get("type", "")
                group = "function" if kind == "function" else (
                    "extension" if kind == "extension" else "platform")
                if group not in wanted:
                    self.telemetry_dropped.append(r)
                    continue
            self._tq.append((now, r, gate))
        self._cv.notify_all()

    def _telemetry_sender(self):
        """One batch at a time, in order, like Lambda's buffered delivery."""
        while True:
            with self._cv:
                def ready():
                    return self.subscription is not None and self._tq and \
                        self._t_open_locked(self._tq[0])
                while not self._closing and not ready():
                    self._cv.wait()
                if self._closing:
                    return
                buf = self.subscription.get("buffering") or {}
                max_items = buf.get("maxItems", 1000)
                max_bytes = buf.get("maxBytes", 262144)
                wait_s = buf.get("timeoutMs", 1000) / 1000.0
                flush_at = self._tq[0][0] + wait_s
                while not self._closing and len(self._tq) < max_items \
                        and not self._t_flush_now:
                    left = flush_at - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                while not self._closing and (self.frozen or not ready()):
                    self._cv.wait()
                if self._closing:
                    return
                batch, size = [], 0
                while self._tq and len(batch) < max_items and \
                        self._t_open_locked(self._tq[0]):
                    n = len(json.dumps(self._tq[0][1]))
                    if batch and size + n > max_bytes:
                        break
                    batch.append(self._tq.popleft()[1])
                    size += n
                self._t_inflight = True
                port = self.telemetry_port
            entry = {"records": batch, "statuses": [], "ok": False, "t": time.monotonic()}
            body = json.dumps(batch).encode()
            for attempt in range(TELEMETRY_RETRIES + 1):
                with self._cv:
                    while not self._closing and self.frozen:
                        self._cv.wait()
                    if self._closing:
                        break
                status = self._post(port, body, "application/json")
                entry["statuses"].append(status)
                if isinstance(status, int) and 200 <= status < 300:
                    entry["ok"] = True
                    break
                with self._cv:
                    if attempt < TELEMETRY_RETRIES:
                        self._cv.wait(0.05 * (2 ** attempt))  # backoff, not sync
            with self._cv:
                self.telemetry_posts.append(entry)
                self._t_inflight = False
                self._cv.notify_all()

    def _post(self, port, body, ctype, timeout=TELEMETRY_POST_TIMEOUT):
        """POST to 127.0.0.1:port (what sandbox.localdomain resolves to in
        Lambda) like Go's net/http client: TCP_NODELAY, head and body in one
        write. Returns the status or the exception's class name."""
        head = ("POST / HTTP/1.1\r\nHost: sandbox.localdomain:%d\r\n"
                "User-Agent: Go-http-client/1.1\r\nContent-Length: %d\r\n"
                "Content-Type: %s\r\nAccept-Encoding: gzip\r\n\r\n"
                % (port, len(body), ctype)).encode("latin-1")
        sock = resp = None
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(head + body)
            resp = http.client.HTTPResponse(sock, method="POST")
            resp.begin()
            resp.read()
            return resp.status
        except (OSError, http.client.HTTPException) as e:
            return type(e).__name__
        finally:
            if resp is not None:
                resp.close()
            if sock is not None:
                sock.close()

    def post_telemetry_raw(self, body, content_type="application/json", timeout=10):
        """POST arbitrary bytes to the telemetry listener now; returns the
        status code (or the exception's class name). Bypasses the queue."""
        with self._cv:
            assert not self.frozen, "post_telemetry_raw while the sandbox is frozen"
            port = self.telemetry_port
        assert port is not None, "no telemetry subscription"
        return self._post(port, body, content_type, timeout)

    @property
    def telemetry_statuses(self):
        with self._cv:
            return [s for e in self.telemetry_posts for s in e["statuses"]]

    # ---------------------------------------------------------------- routing

    def _protocol_error(self, msg):
        with self._cv:
            self.protocol_errors.append(msg)
            self._cv.notify_all()

    def _err(self, h, status, etype, msg):
        self._protocol_error("%s %s -> %d %s: %s" % (h.command, h.path, status, etype, msg))
        h._send(status, {"errorMessage": msg, "errorType": etype})

    def _check_id(self, h):
        ident = h.headers.get("Lambda-Extension-Identifier")
        if not ident:
            self._err(h, 403, "Extension.MissingExtensionIdentifier",
                      "missing Lambda-Extension-Identifier header")
            return False
        if ident != self.ext_id:
            self._err(h, 403, "Extension.InvalidExtensionIdentifier",
                      "unknown extension identifier %r" % ident)
            return False
        return True

    def _route(self, h, method, path, body):
        if path == "/2020-01-01/extension/register" and method == "POST":
            return self._register(h, body)
        if path == "/2020-01-01/extension/event/next" and method == "GET":
            return self._ext_next(h)
        if path in ("/2020-01-01/extension/init/error",
                    "/2020-01-01/extension/exit/error") and method == "POST":
            return self._ext_error(h, path, body)
        if path == "/2022-07-01/telemetry" and method == "PUT":
            return self._subscribe(h, body)
        if path == "/2020-08-15/logs" and method == "PUT":
            return self._err(h, 400, "Logs.NotSupported",
                             "this fake only offers the Telemetry API")
        if path == "/2018-06-01/runtime/invocation/next" and method == "GET":
            return self._rt_next(h)
        if path.startswith("/2018-06-01/runtime/invocation/") and method == "POST":
            return self._rt_result(h, path, body)
        if path == "/2018-06-01/runtime/init/error" and method == "POST":
            with self._cv:
                self.runtime_errors.append((h.headers.get("Lambda-Runtime-Function-Error-Type"),
                                            body))
                self._cv.notify_all()
            return h._send(202, {"status": "OK"})
        return self._err(h, 404, "InvalidRequest", "no such API: %s %s" % (method, path))

    def _register_misbehave(self, h, fault):
        """Answer register as register_fault says; True when it answered (or not)."""
        if fault == "close":
            h.close_connection = True
        elif fault == "garbage":
            h.close_connection = True
            h.connection.sendall(b"this is not HTTP\r\n\r\n")
        elif fault == "status":
            h._send(500, {"errorMessage": "injected failure",
                          "errorType": "Extension.Unknown"})
        elif fault in ("no_id", "long_id"):
            hdr = {"Lambda-Extension-Identifier": "x" * 200} if fault == "long_id" else {}
            h._send(200, {"functionName": FUNCTION_NAME,
                          "functionVersion": FUNCTION_VERSION, "handler": HANDLER}, hdr)
        else:
            return False
        return True

    def _register(self, h, body):
        if self.register_fault and self.register_fault != "reset_after":
            if self._register_misbehave(h, self.register_fault):
                return
        name = h.headers.get("Lambda-Extension-Name")
        if not name:
            return self._err(h, 400, "InvalidRequest", "missing Lambda-Extension-Name header")
        try:
            req = json.loads(body or b"null")
            events = req["events"]
            assert isinstance(events, list) and events
            assert all(e in ("INVOKE", "SHUTDOWN") for e in events)
        except (ValueError, KeyError, TypeError, AssertionError):
            return self._err(h, 400, "InvalidRequest",
                             "body must be {\"events\":[\"INVOKE\"|\"SHUTDOWN\",...]}, got %r"
                             % body[:200])
        with self._cv:
            if self.t_register is not None:
                return self._err(h, 403, "Extension.AlreadyRegistered",
                                 "extension already registered")
            if self.ext_name is not None and name != self.ext_name and "SHUTDOWN" in events:
                return self._err(h, 403, "Extension.InvalidEventType",
                                 "internal extension %r cannot register for SHUTDOWN "
                                 "(file name is %r)" % (name, self.ext_name))
            self.ext_id = str(uuid.uuid4())
            self.t_register = time.monotonic()
            self.register_headers = dict(h.headers.items())
            self.register_body = req
            self.ext_events_wanted = events
            self._cv.notify_all()
        resp = {"functionName": FUNCTION_NAME, "functionVersion": FUNCTION_VERSION,
                "handler": HANDLER}
        if "accountId" in (h.headers.get("Lambda-Extension-Accept-Feature") or ""):
            resp["accountId"] = ACCOUNT_ID
        if self.register_fault != "reset_after":
            h._send(200, resp, {"Lambda-Extension-Identifier": self.ext_id})
            return
        # the answer and the RST both arrive while the extension is stopped, so
        # that its next write on this connection (the subscription) meets the reset
        proc = self.ext_proc
        self._signal(proc, signal.SIGSTOP)
        _wait_stopped(proc)
        try:
            h._send(200, resp, {"Lambda-Extension-Identifier": self.ext_id})
            h.close_connection = True
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
            h.connection.close()    # an RST, not a FIN
        finally:
            self._signal(proc, signal.SIGCONT)

    def _check_deadline_locked(self, t_next):
        """The /next at t_next ends the invocation the previous /next got:
        apply the deadline rule to it."""
        inv, self._ext_current = self._ext_current, None
        if inv is None:
            return
        inv.t_ext_next_after = t_next
        late = t_next - (inv.t_deadline - DEADLINE_MARGIN_MS / 1000.0)
        if late < 0:
            return
        inv.late_by = late
        if inv.timed_out:
            return      # timeout(): Lambda ends it at the deadline itself
        msg = ("/event/next ending invocation %s came %.0f ms after its deadline%s "
               "(%.0f ms after INVOKE, timeout %d ms): Lambda would time out an "
               "invocation whose function had returned" % (
                   inv.request_id, (t_next - inv.t_deadline) * 1000,
                   " - %d ms" % DEADLINE_MARGIN_MS if DEADLINE_MARGIN_MS else "",
                   (t_next - inv.t_invoke) * 1000, inv.timeout_ms))
        inv.deadline_error = msg
        self.protocol_errors.append(msg)

    def _ext_next(self, h):
        if not self._check_id(h):
            return
        with self._cv:
            t_call = time.monotonic()
            self.ext_next_times.append(t_call)
            index = len(self.ext_next_times)
            self._check_deadline_locked(t_call)
            self._ext_parked += 1
            self._cv.notify_all()
            try:
                while not self._ext_queue:
                    if self._closing:
                        h.close_connection = True
                        return
                    self._cv.wait(0.2)
                    if not self._ext_queue and _client_gone(h.connection):
                        h.close_connection = True
                        return
                event, inv = self._ext_queue.popleft()
                t = time.monotonic()
                self.ext_delivered.append((index, event, t))
                if inv is not None:
                    inv.ext_next_index = index
                    inv.t_delivered = t
                    self._ext_current = inv
            finally:
                self._ext_parked -= 1
                self._cv.notify_all()
        h._send(200, event, {"Lambda-Extension-Event-Identifier": str(uuid.uuid4())})
        if inv is not None:
            with self._cv:
                inv.t_handed = time.monotonic()    # the answer is written
                self._cv.notify_all()

    def _ext_error(self, h, path, body):
        if not self._check_id(h):
            return
        etype = h.headers.get("Lambda-Extension-Function-Error-Type")
        with self._cv:
            self.ext_errors.append((path.rsplit("/", 2)[-2], etype, body))
            self._cv.notify_all()
        h._send(202, {"status": "OK"})

    def _subscribe(self, h, body):
        if not self._check_id(h):
            return
        if self.subscribe_fault == "close":
            with self._cv:
                self.subscribe_attempts.append((None, body))
                self._cv.notify_all()
            h.close_connection = True
            return
        if not self.telemetry:
            with self._cv:
                self.subscribe_attempts.append((202, body))
            return h._send(202, {"errorMessage": "Telemetry API is not supported",
                                 "errorType": "Telemetry.NotSupported"})
        with self._cv:
            if self.ext_next_times:
                self.subscribe_attempts.append((400, body))
                return self._err(h, 400, "ValidationError",
                                 "subscription is only allowed during init")
        try:
            req = json.loads(body)
            port = self._validate_subscription(req)
        except (ValueError, KeyError, TypeError, AssertionError) as e:
            with self._cv:
                self.subscribe_attempts.append((400, body))
            return self._err(h, 400, "ValidationError", "bad subscription: %s" % e)
        with self._cv:
            self.subscribe_attempts.append((200, body))
            self.subscription = req
            self.subscription_headers = dict(h.headers.items())
            self.telemetry_port = port
            self._cv.notify_all()
        h._send(200, "OK", ctype="text/plain")

    @staticmethod
    def _validate_subscription(req):
        assert isinstance(req, dict), "body is not an object"
        assert req.get("schemaVersion") in TELEMETRY_SCHEMAS, \
            "schemaVersion %r not in %s" % (req.get("schemaVersion"), TELEMETRY_SCHEMAS)
        types = req.get("types")
        assert isinstance(types, list) and types, "types must be a non-empty list"
        for t in types:
            assert t in TELEMETRY_TYPES, "unknown type %r" % t
        buf = req.get("buffering")
        if buf is not None:
            assert isinstance(buf, dict), "buffering must be an object"
            for k, lo, hi in (("maxItems", 1000, 10000), ("maxBytes", 262144, 1048576),
                              ("timeoutMs", 25, 30000)):
                if k in buf:
                    v = buf[k]
                    assert isinstance(v, int) and not isinstance(v, bool), \
                        "buffering.%s must be an integer" % k
                    assert lo <= v <= hi, "buffering.%s=%d outside %d..%d" % (k, v, lo, hi)
        dest = req.get("destination")
        assert isinstance(dest, dict), "destination must be an object"
        assert dest.get("protocol") == "HTTP", "destination.protocol must be HTTP"
        uri = urllib.parse.urlsplit(dest.get("URI") or "")
        assert uri.scheme == "http", "destination.URI must be http://"
        assert uri.hostname == "sandbox.localdomain", \
            "destination.URI host must be sandbox.localdomain, not %r" % uri.hostname
        assert uri.port, "destination.URI needs a port"
        return uri.port

    def _rt_next(self, h):
        with self._cv:
            self.runtime_next_times.append(time.monotonic())
            index = len(self.runtime_next_times)
            self._rt_parked += 1
            self._cv.notify_all()
            try:
                while not self._rt_queue:
                    if self._closing:
                        h.close_connection = True
                        return
                    self._cv.wait(0.2)
                    if not self._rt_queue and _client_gone(h.connection):
                        h.close_connection = True
                        return
                inv = self._rt_queue.popleft()
                inv.runtime_next_index = index
                inv.t_runtime_got = time.monotonic()
            finally:
                self._rt_parked -= 1
                self._cv.notify_all()
        h._send(200, json.dumps(inv.payload), {
            "Lambda-Runtime-Aws-Request-Id": inv.request_id,
            "Lambda-Runtime-Deadline-Ms": str(inv.deadline_ms),
            "Lambda-Runtime-Invoked-Function-Arn": FUNCTION_ARN,
            "Lambda-Runtime-Trace-Id": inv.trace_id})

    def _rt_result(self, h, path, body):
        parts = path.split("/")  # '', 2018-06-01, runtime, invocation, id, response|error
        if len(parts) != 6 or parts[5] not in ("response", "error"):
            return self._err(h, 404, "InvalidRequest", "no such API: POST " + path)
        rid, kind = parts[4], parts[5]
        with self._cv:
            inv = self._by_id.get(rid)
            if inv is None or inv.t_runtime_got is None:
                return self._err(h, 400, "InvalidRequestID", "unknown request id " + rid)
            if inv.t_runtime_done is not None:
                return self._err(h, 400, "InvalidStateTransition",
                                 "invocation %s already answered" % rid)
            inv.response = body
            self._runtime_done_locked(inv, "success" if kind == "response" else "error",
                                      len(body))
        h._send(202, {"status": "OK"})

    # ---------------------------------------------------------------- closing

    def close(self):
        """Kill whatever still runs, stop the server and the sender."""
        for p in self._procs():
            if p.poll() is None:
                self._signal(p, signal.SIGCONT)
                self._signal(p, signal.SIGKILL)
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        with self._cv:
            self._closing = True
            self.frozen = False
            self._cv.notify_all()
        self._srv.shutdown()
        self._srv.server_close()
        for d in self._tmpdirs:
            shutil.rmtree(d, ignore_errors=True)
        self._tmpdirs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -------------------------------------------------------------------- self-test

_RUNTIME = r'''
import http.client, json, os
api = os.environ["AWS_LAMBDA_RUNTIME_API"]
while True:
    c = http.client.HTTPConnection(api)
    c.request("GET", "/2018-06-01/runtime/invocation/next")
    r = c.getresponse(); ev = json.loads(r.read())
    rid = r.getheader("Lambda-Runtime-Aws-Request-Id")
    assert r.getheader("Lambda-Runtime-Deadline-Ms") and r.getheader("Lambda-Runtime-Trace-Id")
    kind = "error" if ev.get("fail") else "response"
    c.request("POST", "/2018-06-01/runtime/invocation/%s/%s" % (rid, kind),
              body=json.dumps({"echo": ev}))
    c.getresponse().read(); c.close()
'''


def _selftest():
    """python3 test/fakes/fake_lambda.py: checks the fake by hand and with
    test/fakes/stub_extension.py plus a tiny runtime. Prints 'fake_lambda selftest ok'."""
    import sys

    def req(fl, method, path, body=None, headers=None):
        c = http.client.HTTPConnection("127.0.0.1", fl.port, timeout=10)
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, r, data

    # telemetry listener that fails twice, then accepts
    got, answers = [], [500, 500]

    class L(http_scaffold.Handler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            st = answers.pop(0) if answers else 200
            if st == 200:
                got.append(json.loads(body) if body.startswith(b"[") else body)
            self.send_response(st)
            self.send_header("Content-Length", "0")
            self.end_headers()
    lsrv = _Server(("0.0.0.0", 0), L)
    threading.Thread(target=lsrv.serve_forever, daemon=True).start()
    lport = lsrv.server_address[1]

    # 1. the APIs by hand
    fl = FakeLambda()
    st, _, _ = req(fl, "POST", "/2020-01-01/extension/register", b'{"events":["INVOKE"]}')
    assert st == 400 and fl.protocol_errors, "register without a name must fail"
    st, r, data = req(fl, "POST", "/2020-01-01/extension/register",
                      b'{"events":["INVOKE","SHUTDOWN"]}',
                      {"Lambda-Extension-Name": "x", "Lambda-Extension-Accept-Feature": "accountId"})
    assert st == 200 and json.loads(data)["accountId"] == ACCOUNT_ID
    ident = r.getheader("Lambda-Extension-Identifier")
    assert ident == fl.ext_id
    st, _, _ = req(fl, "GET", "/2020-01-01/extension/event/next")
    assert st == 403
    hid = {"Lambda-Extension-Identifier": ident}
    sub = {"schemaVersion": "2022-12-13", "types": ["platform", "function"],
           "buffering": {"maxItems": 1000, "maxBytes": 262144, "timeoutMs": 5},
           "destination": {"protocol": "HTTP", "URI": "http://sandbox.localdomain:%d" % lport}}
    st, _, _ = req(fl, "PUT", "/2022-07-01/telemetry", json.dumps(sub), hid)
    assert st == 400, "timeoutMs 5 must be refused"
    sub["buffering"]["timeoutMs"] = 25
    st, _, _ = req(fl, "PUT", "/2022-07-01/telemetry", json.dumps(sub), hid)
    assert st == 200 and fl.telemetry_port == lport
    events = []

    def poll(n):
        for _ in range(n):
            try:
                events.append(json.loads(req(fl, "GET", "/2020-01-01/extension/event/next",
                                             None, hid)[2]))
            except (OSError, http.client.HTTPException):
                return  # the fake closed while we waited (end of the test)
    th = threading.Thread(target=poll, args=(2,), daemon=True)
    th.start()
    inv = fl.invoke(timeout_ms=5000)
    fl.wait_for(lambda f: len(f.ext_next_times) == 2, 5, "second /next")
    fl.runtime_done(inv, produced_bytes=7)
    fl.log_line({"msg": "hi"}, inv.request_id)
    fl.finish(inv, freeze=False)
    fl.wait_telemetry_idle(10)
    ev = events[0]
    assert ev["eventType"] == "INVOKE" and ev["requestId"] == inv.request_id
    assert ev["deadlineMs"] == inv.deadline_ms and ev["tracing"]["value"] == inv.trace_id
    assert fl.telemetry_statuses[:3] == [500, 500, 200], fl.telemetry_statuses
    types = [rec["type"] for batch in got for rec in batch]
    for want in ("platform.initStart", "platform.start", "platform.runtimeDone", "function",
                 "platform.report"):
        assert want in types, (want, types)
    rd = [rec for b in got for rec in b if rec["type"] == "platform.runtimeDone"][0]
    assert rd["record"]["metrics"]["producedBytes"] == 7 and rd["time"].endswith("Z")
    assert fl.post_telemetry_raw(b"garbage", "text/plain") == 200 and got[-1] == b"garbage"
    assert len(fl.protocol_errors) == 3, fl.protocol_errors
    fl.close()

    # 2. processes: the stub extension and a tiny runtime, freezing, shutdown
    stub = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stub_extension.py")
    fl = FakeLambda()
    # (the APM server is unreachable: a short forwarder timeout keeps the
    # stub's hold of each invocation well inside its 3 s deadline)
    fl.start_extension(stub, {"APM_EXT_TELEMETRY_PORT": str(_free()),
                              "ELASTIC_APM_DATA_RECEIVER_SERVER_PORT": str(_free()),
                              "ELASTIC_APM_LAMBDA_APM_SERVER": "http://127.0.0.1:9",
                              "ELASTIC_APM_DATA_FORWARDER_TIMEOUT": "300ms"})
    fl.start_runtime([sys.executable, "-c", _RUNTIME])
    fl.wait_registered()
    fl.wait_subscribed()
    fl.wait_init_done()
    for i in range(2):
        inv = fl.invoke(payload={"n": i, "fail": i == 1})
        fl.finish(inv)
        assert inv.status == ("error" if i else "success") and inv.response
        for p in (fl.ext_proc, fl.runtime_proc):
            # SIGSTOP takes effect asynchronously: wait (bounded) for state T
            end = time.monotonic() + 5
            while True:
                with open("/proc/%d/stat" % p.pid) as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "T":
                        break
                assert time.monotonic() < end, "not frozen"
                with fl._cv:
                    fl._cv.wait(0.01)
    code, t_exit, killed = fl.shutdown()
    assert code == 0 and not killed and fl.runtime_proc.returncode == -signal.SIGTERM
    assert not fl.protocol_errors, fl.protocol_errors
    assert any(r.get("msg") == "registered" for r in fl.ext_logs())
    fl.close()

    fl = FakeLambda(telemetry=False)
    fl.start_extension(stub, {"STUB_BUG": "hang_on_shutdown",
                              "APM_EXT_TELEMETRY_PORT": str(_free()),
                              "ELASTIC_APM_DATA_RECEIVER_SERVER_PORT": str(_free())})
    fl.wait_init_done()
    assert fl.subscribe_attempts[0][0] == 202 and fl.subscription is None
    t0 = time.monotonic()
    code, t_exit, killed = fl.shutdown(deadline_ms=500)
    assert killed and code == -signal.SIGKILL and 0.45 < t_exit - t0 < 2, (code, t_exit - t0)
    try:
        fl.wait_ext_next(99, timeout=0.2)
        raise RuntimeError("wait did not fail")
    except AssertionError as e:
        assert "exited" in str(e), e
    fl.close()

    # 3. one-write answers, the deadline rule, late and held telemetry
    _selftest_timing(req, lport, got)
    lsrv.shutdown()
    print("fake_lambda selftest ok")


def _selftest_timing(req, lport, got):
    fl = FakeLambda(telemetry="late")
    assert fl.telemetry and fl.late_telemetry
    st, r, _ = req(fl, "POST", "/2020-01-01/extension/register",
                   b'{"events":["INVOKE","SHUTDOWN"]}', {"Lambda-Extension-Name": "x"})
    hid = {"Lambda-Extension-Identifier": r.getheader("Lambda-Extension-Identifier")}
    sub = {"schemaVersion": "2022-12-13", "types": ["platform", "function"],
           "buffering": {"maxItems": 1000, "maxBytes": 262144, "timeoutMs": 25},
           "destination": {"protocol": "HTTP", "URI": "http://sandbox.localdomain:%d" % lport}}
    assert req(fl, "PUT", "/2022-07-01/telemetry", json.dumps(sub), hid)[0] == 200
    del got[:]

    # a response (head and body) arrives in the first segment read
    s = socket.create_connection(("127.0.0.1", fl.port), timeout=5)
    s.sendall(b"POST /2018-06-01/runtime/init/error HTTP/1.1\r\nHost: x\r\n"
              b"Content-Length: 2\r\n\r\n{}")
    select.select([s], [], [], 5)
    first = s.recv(65536)
    s.close()
    head, _, body = first.partition(b"\r\n\r\n")
    clen = [int(ln.split(b":")[1]) for ln in head.split(b"\r\n")
            if ln.lower().startswith(b"content-length:")]
    assert clen and len(body) == clen[0] > 0, "answer split: first read %r" % first

    # a telemetry POST (head and body) arrives in the first segment read
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    res = []
    th = threading.Thread(target=lambda: res.append(
        fl._post(ls.getsockname()[1], b'[{"x":1}]', "application/json", 5)), daemon=True)
    th.start()
    c, _ = ls.accept()
    select.select([c], [], [], 5)
    first = c.recv(65536)
    assert first.endswith(b'\r\n\r\n[{"x":1}]') and b"Content-Length: 9" in first, first
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    th.join(5)
    c.close()
    ls.close()
    assert res == [200], res

    nexts = []

    def next_async():
        def run():
            try:
                nexts.append(json.loads(req(fl, "GET", "/2020-01-01/extension/event/next",
                                            None, hid)[2]))
            except (OSError, http.client.HTTPException, ValueError):
                pass
        th = threading.Thread(target=run, daemon=True)
        th.start()
        return th

    def types_after(t0):
        return [rec["type"] for e in fl.telemetry_posts if e["t"] >= t0
                for rec in e["records"]]

    next_async()
    fl.wait_parked(5)
    inv1 = fl.invoke(timeout_ms=2000)
    fl.wait_delivered(inv1, 5)
    fl.wait_telemetry_idle(5)           # init records and platform.start of inv1
    fl.log_line("late line\n")
    fl.runtime_done(inv1)
    fl.wait_telemetry_idle(5)           # returns: held records do not count
    sent = [rec["type"] for b in got for rec in b]
    assert sent[-1] == "platform.start" and "function" not in sent, sent
    start1 = [rec for b in got for rec in b if rec["type"] == "platform.start"][0]
    assert start1["time"] == iso_ms(inv1.deadline_ms - 2000), (start1, inv1.deadline_ms)
    next_async()
    fl.finish(inv1, freeze=False)       # in time: no protocol error
    assert inv1.t_ext_next_after is not None and inv1.late_by is None
    assert not fl.protocol_errors, fl.protocol_errors
    inv2 = fl.invoke(timeout_ms=300)
    fl.wait_delivered(inv2, 5)
    fl.wait_for(lambda f: f.telemetry_posts and "platform.report" in
                types_after(f.telemetry_posts[-1]["t"]), 5, "the late batch")
    late = fl.telemetry_posts[-1]
    assert inv2.t_handed is not None and late["t"] >= inv2.t_handed, \
        "the late batch left before INVOKE 2 was written"
    assert [r["type"] for r in late["records"]] == [
        "function", "platform.runtimeDone", "platform.report", "platform.start"], late
    assert late["records"][3]["record"]["requestId"] == inv2.request_id

    # held: nothing leaves until released (late mode off for this)
    fl.set_late_telemetry(False)
    fl.hold_telemetry()
    fl.log_line("held line\n")
    fl.wait_telemetry_idle(5)
    assert "held line\n" not in [r.get("record") for b in got for r in b]
    fl.release_telemetry()
    fl.wait_telemetry_idle(5)
    assert "held line\n" in [r.get("record") for b in got for r in b]
    fl.set_late_telemetry(True)

    # the /next ending inv2 comes after its deadline: a protocol error
    threading.Event().wait(max(0.0, fl.deadline_left(inv2)) + 0.02)  # a late extension
    next_async()
    fl.wait_for(lambda f: f.protocol_errors, 5, "the late /next to be flagged")
    assert inv2.late_by is not None and "after its deadline" in fl.protocol_errors[0], \
        fl.protocol_errors
    # ...but not for an invocation the test times out (Lambda ends it)
    inv3 = fl.invoke(timeout_ms=200)
    fl.wait_delivered(inv3, 5)
    threading.Event().wait(max(0.0, fl.deadline_left(inv3)) + 0.02)
    next_async()
    fl.wait_for(lambda f: len(f.protocol_errors) == 2, 5, "the second late /next")
    try:
        fl.timeout(inv3)
    except AssertionError as e:         # no extension process to shut down here
        assert "no extension started" in str(e), e
    assert inv3.timed_out and len(fl.protocol_errors) == 1 and \
        inv2.request_id in fl.protocol_errors[0], fl.protocol_errors
    fl.close()


def _free():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    _selftest()
