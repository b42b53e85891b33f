"""What every measurement of test/bench/bench.py shares: paths and constants,
the exceptions, small helpers (statistics, CPU time, kernel receive stamps,
helper servers, agent ndjson), the run context (Ctx: the built floor and
sink, the TLS sink, certificates, notes, raw figures) and row().

Timing: every read is stamped by the kernel (SO_TIMESTAMPNS, CLOCK_REALTIME:
recv_stamped(); STAMPS counts the reads that had no stamp and fell back on
the time poll() returned), and our own instants are now() = time.time_ns(),
the same clock.
"""

import datetime
import json
import math
import os
import select
import shutil
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
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
# apm-ext's offer (tls_client_init in apm-ext.c), in OpenSSL's names
APM_EXT_SUITES = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                  "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                  "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")


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
        self.aws = None             # Popen of the fake AWS (secrets_manager.start_aws)
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


# ------------------------------------------------------------------ rows

def row(figure, apm, floor=None, target="", ok=None, unit="", kind="num", broken=False):
    """One table row. apm/floor: a number, a stats() dict or None. ok: True
    (target met), False (missed) or None (no target); broken: apm-ext
    misbehaved in this case (see ctx.broken)."""
    return {"figure": figure, "unit": unit, "apm_ext": apm, "floor": floor,
            "target": target, "ok": ok, "kind": kind, "broken": broken}


def diff_text(a, b, what):
    """'<what> +N us' between the medians of two stats() dicts."""
    if not a or not b:
        return ""
    return "%s %+.0f us" % (what, a["median"] - b["median"])
