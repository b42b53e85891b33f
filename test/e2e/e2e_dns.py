"""End-to-end scenarios for name resolution of the APM server's host.

    python3 test/e2e/e2e.py -k dns_

The extension resolves a host name (not a numeric address, not "localhost")
in a child process (fork + musl's getaddrinfo: /etc/hosts first, then the
nameservers of /etc/resolv.conf) whose answer comes back over a pipe the
event loop polls; a resolver that does not answer within the forwarder
timeout is killed and counts as a delivery failure.

To aim musl's resolver at a fake DNS server (test/fakes/fake_dns.py) without
touching the machine's files, the extension runs in a mount namespace of its
own in which a resolv.conf and a hosts file written by the scenario are
bind-mounted over /etc/resolv.conf and /etc/hosts. DnsBed builds that:

  <tmp>/resolv.conf              nameserver <fake DNS address> + options
  <tmp>/hosts                    localhost lines + the scenario's lines
  <tmp>/bin/apm-lambda-extension symlink to the binary under test (the
                                 extension registers with basename(argv[0]))
  <tmp>/wrapper                  #!/bin/sh
                                 exec unshare -m sh -c 'mount --bind R /etc/resolv.conf &&
                                     mount --bind H /etc/hosts && exec "$3"' sh R H LINK

FakeLambda starts the wrapper (t.binary is pointed at it) through its own
extensions/apm-lambda-extension symlink. Every step is an exec: the shell
becomes unshare, unshare (no --fork) becomes sh, sh execs the extension, so
the process FakeLambda started, signals (SIGSTOP/SIGCONT/SIGKILL to its
process group) and waits for is the extension itself; check_process()
asserts that (/proc/<pid>/exe is the binary, its mount namespace is not
ours, it registered as apm-lambda-extension). unshare -m makes the new
namespace's mounts private: the machine's /etc is never changed.

A scenario that cannot build this (not root, no unshare/mount, mount
namespaces or bind mounts refused, no address to bind port 53 on) raises
Skip with the reason.

The fake DNS listens on 127.0.0.153:53 (musl only talks to port 53; any
127/8 address is local on Linux), or another 127.53.x.y address when that
one is taken. Scenarios (all names start with dns_):
  dns_name_resolved          name answered by the fake DNS: delivered before /next,
                             Host header is the name, asked once, freeze reaches it
  dns_hosts_file_first       name in /etc/hosts, DNS silent: delivered, DNS not asked
  dns_never_answers          DNS silent: agents served at once, resolver killed at the
                             forwarder timeout, not held after; DNS back: all delivered
                             exactly once
  dns_slow_answer            answer after 1.5 s: agents served at once meanwhile,
                             delivered in that invocation (or the next)
  dns_proxy_waits_then_502   proxied GET / during a silent resolution: 502 at the
                             resolver timeout, intake served meanwhile
  dns_proxy_during_backoff   proxied GET / right after a resolver failure: 502 within
                             the backoff + one resolver timeout, not left waiting
  dns_nxdomain               NXDOMAIN: one warn/error line naming the host, not held,
                             exit 0 at SHUTDOWN

Waiting is on conditions with timeouts; the only plain waits model a
function at work (function_runs).
"""

import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time

from e2e import (scenario, Skip, agent_send, agent_flush, agent_payload, http_request,
                 tx_of, first_delivery, delivered_requests, AGENT_UA)
from fake_dns import FakeDNS

APM_NAME = "apm.example.test"
DNS_ADDRS = ("127.0.0.153", "127.53.0.153", "127.53.1.153", "127.53.2.153")
FAST_S = 0.2          # an agent request answered this fast = "at once"
NOT_HELD_S = 0.5      # /next this soon after the agent's flush = not held
FUNCTION_S = 0.3      # the handler's work in invocations that need time to pass
PROBLEM_LEVELS = ("warn", "warning", "error", "critical")


def function_runs(seconds=FUNCTION_S):
    """The function works for a while. Models time passing in the function;
    not a synchronisation (nothing waits on anything here)."""
    threading.Event().wait(seconds)


def poll_until(pred, timeout, step=0.02):
    """Wait until pred() is true (re-checked every `step` s); its value, or
    None after timeout. For state only visible by polling (log file, /proc)."""
    end = time.monotonic() + timeout
    ev = threading.Event()
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= end:
            return None
        ev.wait(step)


# --------------------------------------------------------------- the bed

class DnsBed:
    """Fake DNS + resolv.conf/hosts + namespace wrapper for one scenario.

    with DnsBed(t, records, options=..., hosts=[...], mode=...) as bed:
        bed.start(env)           # t.start() through the wrapper
        bed.dns                  # the FakeDNS
    """

    def __init__(self, t, records=None, options="timeout:5 attempts:1", hosts=(),
                 mode="ok", mode_arg=None):
        self.t = t
        self.dns = None
        self.dir = None
        if os.geteuid() != 0:
            raise Skip("a mount namespace with bind mounts needs root (euid %d)"
                       % os.geteuid())
        self.tools = tools = {n: shutil.which(n) for n in ("unshare", "mount", "sh")}
        missing = [n for n, p in tools.items() if not p]
        if missing:
            raise Skip("no %s on PATH" % ", ".join(missing))
        for f in ("/etc/resolv.conf", "/etc/hosts"):
            if not os.path.exists(f):
                raise Skip("%s does not exist: nothing to bind-mount over" % f)
        self.real_binary = os.path.abspath(t.binary)
        self.dns = self._bind_dns(records or {})
        try:
            self._setup(options, hosts, mode, mode_arg)
        except BaseException:
            self.close()
            raise

    def _setup(self, options, hosts, mode, mode_arg):
        tools = self.tools
        if mode != "ok":
            self.dns.set_mode(mode, mode_arg)
        self.dir = tempfile.mkdtemp(prefix="e2e-dns-")
        self.resolv = os.path.join(self.dir, "resolv.conf")
        self.hosts = os.path.join(self.dir, "hosts")
        with open(self.resolv, "w") as f:
            f.write("nameserver %s\n" % self.dns.host)
            if options:
                f.write("options %s\n" % options)
        with open(self.hosts, "w") as f:
            f.write("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n")
            for line in hosts:
                f.write(line + "\n")
        os.mkdir(os.path.join(self.dir, "bin"))
        self.link = os.path.join(self.dir, "bin", "apm-lambda-extension")
        os.symlink(self.real_binary, self.link)
        inner = ('{m} --bind "$1" /etc/resolv.conf && {m} --bind "$2" /etc/hosts && '
                 'exec "$3"').format(m=shlex.quote(tools["mount"]))
        self.wrapper = os.path.join(self.dir, "wrapper")
        with open(self.wrapper, "w") as f:
            f.write("#!/bin/sh\n"
                    "# apm-ext in a mount namespace of its own, with the test's\n"
                    "# resolv.conf and hosts; every step execs (no shell stays)\n"
                    "exec %s -m %s -c %s sh %s %s %s\n" % (
                        shlex.quote(tools["unshare"]), shlex.quote(tools["sh"]),
                        shlex.quote(inner), shlex.quote(self.resolv),
                        shlex.quote(self.hosts), shlex.quote(self.link)))
        os.chmod(self.wrapper, 0o755)
        self._probe(tools)

    def _bind_dns(self, records):
        why = []
        for addr in DNS_ADDRS:
            try:
                return FakeDNS(records, ttl=30, host=addr, port=53)
            except PermissionError as e:
                raise Skip("cannot bind udp %s:53: %s" % (addr, e))
            except OSError as e:
                why.append("%s: %s" % (addr, e.strerror or e))
        raise Skip("no address to run the fake DNS on port 53 (%s)" % "; ".join(why))

    def _probe(self, tools):
        """The wrapper's namespace and mounts work here, and do not leak."""
        inner = ('{m} --bind "$1" /etc/resolv.conf && {m} --bind "$2" /etc/hosts && '
                 'cat /etc/resolv.conf /etc/hosts').format(m=shlex.quote(tools["mount"]))
        try:
            p = subprocess.run([tools["unshare"], "-m", tools["sh"], "-c", inner, "sh",
                                self.resolv, self.hosts], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise Skip("unshare -m could not run: %s" % e)
        with open(self.resolv, "rb") as a, open(self.hosts, "rb") as b:
            ours = a.read()
            want = ours + b.read()
        if p.returncode != 0 or p.stdout != want:
            raise Skip("unshare -m / mount --bind not permitted here (exit %s): %s" % (
                p.returncode, p.stderr.decode("utf-8", "replace").strip()[:200]))
        with open("/etc/resolv.conf", "rb") as f:
            assert f.read() != ours, \
                "the probe's bind mount leaked into the machine's /etc/resolv.conf"

    def start(self, env=None, **kw):
        """t.start() through the wrapper; APM server URL by name; checks the process."""
        if os.environ.get("APM_E2E_UNDER_VALGRIND"):
            raise Skip("the DNS scenarios start the binary itself in a mount namespace, "
                       "not through the valgrind wrapper")
        e = {"ELASTIC_APM_LAMBDA_APM_SERVER": "http://%s:%d" % (APM_NAME, self.t.apm.port)}
        e.update(env or {})
        self.t.binary = self.wrapper
        try:
            proc = self.t.start(env=e, **kw)
        finally:
            self.t.binary = self.real_binary
        check_process(self.t, self.real_binary, self.link)
        # the extension's /etc is the test's (seen through its mount namespace)
        pid = self.t.lam.ext_proc.pid
        for mine, theirs in ((self.resolv, "/etc/resolv.conf"), (self.hosts, "/etc/hosts")):
            with open(mine, "rb") as a, open("/proc/%d/root%s" % (pid, theirs), "rb") as b:
                assert a.read() == b.read(), "the extension's %s is not the test's" % theirs
        with open("/etc/resolv.conf", "rb") as f, open(self.resolv, "rb") as g:
            assert f.read() != g.read(), "the test's resolv.conf shows in ours: mount leaked"
        return proc

    def name_queries(self, name=APM_NAME):
        """Queries for `name` (also with a search suffix)."""
        return [q for q in list(self.dns.queries)
                if q.name == name or q.name.startswith(name + ".")]

    def wait_query(self, pred=lambda q: True, timeout=5, what="a query"):
        if not self.dns.wait_for(lambda d: any(pred(q) for q in self.name_queries()),
                                 timeout):
            raise AssertionError("the fake DNS got no %s for %s within %.0fs (queries: %r)"
                                 % (what, APM_NAME, timeout, self.dns.queries[-6:]))
        return [q for q in self.name_queries() if pred(q)][0]

    def close(self):
        if self.dns is not None:
            self.dns.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_process(t, binary, link):
    """The process FakeLambda started (and signals) is the extension itself,
    in its own mount namespace, registered as apm-lambda-extension."""
    pid = t.lam.ext_proc.pid
    try:
        exe = os.readlink("/proc/%d/exe" % pid)
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            argv = [os.fsdecode(a) for a in f.read().split(b"\0") if a]
        ns, own_ns = os.readlink("/proc/%d/ns/mnt" % pid), os.readlink("/proc/self/ns/mnt")
        with open(binary, "rb") as f:
            script = f.read(2) == b"#!"
    except OSError as e:
        raise AssertionError("cannot inspect the extension process %d: %s" % (pid, e))
    if script:   # e.g. test/fakes/stub_extension.py: the interpreter runs our link to it
        ok = link in argv[1:3]
    else:
        ok = exe == os.path.realpath(binary) and argv[:1] == [link]
    assert ok, "FakeLambda's process %d runs %s %r, not the extension %s as %s: a " \
        "wrapper stays in between (freezes and exit codes would not reach the " \
        "extension)" % (pid, exe, argv, binary, link)
    assert ns != own_ns, "the extension runs in our own mount namespace (%s)" % ns
    name = t.lam.register_headers.get("Lambda-Extension-Name")
    assert name == "apm-lambda-extension", "registered as %r through the wrapper" % name


def children(pid):
    """Pids whose parent is pid (a resolver still running or not reaped)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                out.append((int(d), fields[0]))
    return out


def proc_state(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def cpu_seconds(pid):
    """user + system CPU time of pid so far, in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log_lines(t, levels, *words):
    out = []
    for rec in t.logs():
        if str(rec.get("level", "")).lower() in levels:
            msg = str(rec.get("msg", ""))
            if all(w in msg for w in words):
                out.append(rec)
    return out


def wait_log(t, levels, *words, timeout=3):
    got = poll_until(lambda: log_lines(t, levels, *words), timeout)
    if not got:
        raise AssertionError("no log line at %s with %r within %.0fs" % (
            "/".join(levels), words, timeout))
    return got


def timed_send(t, lines, what):
    """Agent intake POST; asserts 202. Returns (seconds it took, time it ended)."""
    t0 = time.monotonic()
    s = agent_send(t.port, lines)
    took = time.monotonic() - t0
    assert s == 202, "%s: agent POST answered %s, want 202" % (what, s.status)
    return took, time.monotonic()


def tx_delivered_any(t, tx):
    return bool(delivered_requests(t.apm, tx))


def exactly_once(t, txs):
    ids = [tx_of(tx)["id"] for tx in txs]
    seen = [o["id"] for o in t.apm.events("transaction")]
    bad = {i: seen.count(i) for i in ids if seen.count(i) != 1}
    assert not bad, "transactions delivered other than exactly once: %s" % (
        ", ".join("%s x%d" % kv for kv in bad.items()))


# --------------------------------------------------------------- scenarios

@scenario()
def dns_name_resolved(t):
    """APM server URL with a host name the fake DNS answers: two syncflush
    invocations delivered before /next; the name was asked (A/AAAA) once."""
    with DnsBed(t, {APM_NAME: ["127.0.0.1"]}) as bed:
        bed.start()
        for i in range(2):
            lines, tx = agent_payload()
            inv, t_flush, t_next, sent = t.sync_invocation([lines])
            req = first_delivery(t.apm, tx)
            assert req is not None and req.t_end <= t_next, \
                "invocation %d: transaction not delivered before /next" % (i + 1)
            host = req.headers.get("Host")
            assert host == "%s:%d" % (APM_NAME, t.apm.port), \
                "invocation %d: upstream Host %r, want the URL's %s:%d" % (
                    i + 1, host, APM_NAME, t.apm.port)
            # finish() froze the sandbox: the SIGSTOP must reach the extension
            pid = t.lam.ext_proc.pid
            assert poll_until(lambda: proc_state(pid) == "T", 2), \
                "extension %d not stopped after the freeze (state %s)" % (
                    pid, proc_state(pid))
            assert not children(pid), "resolver processes left behind: %r" % children(pid)
        qs = bed.name_queries()
        assert qs, "the fake DNS got no query for %s (got %r)" % (APM_NAME, bed.dns.queries)
        kinds = sorted(set(q.qtype_name for q in qs))
        assert set(kinds) <= {"A", "AAAA"}, "queries of types %s" % kinds
        assert all(q.rcode == 0 for q in qs), "queries not answered NOERROR: %r" % qs
        assert len(qs) <= 2, "the name was resolved more than once (%d queries: %r)" % (
            len(qs), qs)


@scenario()
def dns_hosts_file_first(t):
    """The name is in /etc/hosts, the DNS never answers: delivered, the DNS
    was never asked."""
    with DnsBed(t, {APM_NAME: ["127.0.0.1"]}, hosts=["127.0.0.1\t%s" % APM_NAME],
                mode="never") as bed:
        bed.start()
        for i in range(2):
            lines, tx = agent_payload()
            inv, t_flush, t_next, sent = t.sync_invocation([lines])
            req = first_delivery(t.apm, tx)
            assert req is not None and req.t_end <= t_next, \
                "invocation %d: transaction not delivered before /next (hosts file " \
                "entry not used?)" % (i + 1)
        assert not bed.name_queries(), "the fake DNS was asked for %s although /etc/hosts " \
            "has it: %r" % (APM_NAME, bed.name_queries())


@scenario(env={"ELASTIC_APM_DATA_FORWARDER_TIMEOUT": "1s"})
def dns_never_answers(t):
    """The DNS never answers: agents answered at once, /next before the
    deadline, the resolver killed at the forwarder timeout ("cannot resolve"),
    later invocations not held; once the DNS answers, everything kept is
    delivered exactly once."""
    fwd = 1.0
    # musl would wait 5 s: the extension's bound (1 s) must be what ends it
    with DnsBed(t, {APM_NAME: ["127.0.0.1"]}, options="timeout:5 attempts:1",
                mode="never") as bed:
        bed.start()
        q0 = bed.wait_query(what="query (resolution at init)")
        first = {pid for pid, _ in children(t.lam.ext_proc.pid)}
        txs, problems = [], []
        # invocation 1: the resolution is under way
        inv = t.lam.invoke()                              # 3 s function timeout
        lines, tx = agent_payload(inv)
        txs.append(tx)
        took, t_sent = timed_send(t, lines, "invocation 1")
        assert t_sent < q0.t + fwd, "the intake POST ended %.0f ms after the query: the " \
            "resolution was no longer under way" % ((t_sent - q0.t) * 1000)
        assert took < FAST_S, "intake POST took %.0f ms while the name was being " \
            "resolved: the loop waits for the resolver" % (took * 1000)
        # the function works on: the resolver's bound (1 s from the query) passes
        # while the invocation runs, before the hold bound (1 s after its end)
        function_runs(0.5)
        t_flush = time.monotonic()
        assert agent_flush(t.port) == 202
        t.lam.runtime_done(inv)
        t_next = t.lam.finish(inv, timeout=10)
        assert t_next < inv.t_deadline, "invocation 1: /next %.0f ms after the deadline" % (
            (t_next - inv.t_deadline) * 1000)
        assert t_next - q0.t <= fwd + 0.3, "invocation 1: /next %.0f ms after the query, " \
            "%.0f ms after its end: not released when the resolver timed out (1 s)" % (
                (t_next - q0.t) * 1000, (t_next - t_flush) * 1000)
        errs = wait_log(t, PROBLEM_LEVELS, "cannot resolve %s" % APM_NAME, timeout=1)
        # (a new resolver may run already: the first retry is at once)
        kids = [k for k in children(t.lam.ext_proc.pid) if k[0] in first]
        assert first and not kids, "the timed-out resolver %r was not killed and " \
            "reaped: %r" % (first, kids)
        assert any("timed out" in r["msg"] for r in errs), \
            "the failure does not say the resolver timed out: %r" % errs[0]["msg"]
        # invocations 2, 3: the server counts as failing, not held
        for i in (2, 3):
            inv = t.lam.invoke()
            lines, tx = agent_payload(inv)
            txs.append(tx)
            took, _ = timed_send(t, lines, "invocation %d" % i)
            if took >= FAST_S:
                problems.append("invocation %d: intake POST took %.0f ms" % (i, took * 1000))
            t_flush = time.monotonic()
            assert agent_flush(t.port) == 202
            t.lam.runtime_done(inv)
            t_next = t.lam.finish(inv, timeout=10)
            if t_next - t_flush >= NOT_HELD_S:
                problems.append("invocation %d held %.0f ms after the first resolver "
                                "timeout" % (i, (t_next - t_flush) * 1000))
        assert not problems, "; ".join(problems)
        assert not any(tx_delivered_any(t, x) for x in txs), "delivered without an address?"
        # the DNS recovers: later invocations deliver what was kept
        bed.dns.set_mode("ok")
        end = time.monotonic() + 25
        n = 3
        while not all(tx_delivered_any(t, x) for x in txs):
            assert time.monotonic() < end, "kept data not delivered within 25 s of the DNS " \
                "answering again (%d invocations; %d queries answered)" % (
                    n, sum(1 for q in bed.name_queries() if q.rcode is not None))
            n += 1
            inv = t.lam.invoke()
            function_runs()
            lines, tx = agent_payload(inv)
            txs.append(tx)
            timed_send(t, lines, "invocation %d" % n)
            assert agent_flush(t.port) == 202
            t.lam.runtime_done(inv)
            t_next = t.lam.finish(inv, timeout=10)
            assert t_next < inv.t_deadline, "invocation %d: /next after the deadline" % n
        assert any(q.rcode == 0 for q in bed.name_queries()), "delivered, but no query " \
            "answered by the fake DNS"
        t.shutdown_ok()
        exactly_once(t, txs)


@scenario()
def dns_slow_answer(t):
    """The DNS answers after 1.5 s (forwarder timeout 3 s): agents answered
    at once meanwhile; delivered in that invocation or the next."""
    with DnsBed(t, {APM_NAME: ["127.0.0.1"]}, options="timeout:5 attempts:1",
                mode="slow", mode_arg=1500) as bed:
        bed.start()
        q0 = bed.wait_query(what="query (resolution at init)")
        cpu0 = cpu_seconds(t.lam.ext_proc.pid)
        inv = t.lam.invoke()
        lines, tx = agent_payload(inv)
        took, t_sent = timed_send(t, lines, "invocation 1")
        assert t_sent < q0.t + 1.5 and (q0.answered is None or q0.answered > t_sent), \
            "the intake POST ended %.0f ms after the query, once it was answered: not " \
            "measured during the resolution" % ((t_sent - q0.t) * 1000)
        assert took < FAST_S, "intake POST took %.0f ms while the name was being " \
            "resolved" % (took * 1000)
        t0 = time.monotonic()
        assert agent_flush(t.port) == 202
        took_flush = time.monotonic() - t0
        assert took_flush < FAST_S, "flushed=true took %.0f ms during the resolution" % (
            took_flush * 1000)
        t.lam.runtime_done(inv)
        t_next = t.lam.finish(inv, timeout=10)
        assert t_next < inv.t_deadline, "/next %.0f ms after the deadline" % (
            (t_next - inv.t_deadline) * 1000)
        # the loop sleeps in poll() while the resolver works: a few ms of CPU,
        # not the 1.5 s a loop spinning on the resolver's pipe would burn
        cpu = cpu_seconds(t.lam.ext_proc.pid) - cpu0
        assert cpu < 0.5, "%.0f ms of CPU while the name was resolved in 1.5 s" % (
            cpu * 1000)
        req = first_delivery(t.apm, tx)
        if req is None or req.t_end > t_next:
            # not in the same invocation: then in the next one, before its /next
            lines2, tx2 = agent_payload()
            inv2, _, t_next2, _ = t.sync_invocation([lines2])
            req = first_delivery(t.apm, tx)
            assert req is not None and req.t_end <= t_next2, \
                "not delivered in the invocation nor the next one (/next 1 at %.0f ms " \
                "after the query)" % ((t_next - q0.t) * 1000)
        assert any(q.rcode == 0 and q.answered - q.t >= 1.4 for q in bed.name_queries()), \
            "no slow answer given: %r" % bed.name_queries()


class ProxyCall(threading.Thread):
    """A proxied agent call (GET /) in a thread: .status (or the exception),
    .t0 and .t1 (monotonic, sent and answered)."""

    def __init__(self, t, timeout=15):
        super().__init__(daemon=True)
        self.port, self.timeout = t.port, timeout
        self.status = self.t1 = None
        self.body = b""
        self.t0 = time.monotonic()
        self.start()

    def run(self):
        try:
            st, _, self.body = http_request(self.port, "GET", "/", headers={
                "User-Agent": AGENT_UA}, timeout=self.timeout)
            self.status = st
        except Exception as e:  # noqa: BLE001 - the scenario reports it
            self.status = e
        self.t1 = time.monotonic()


@scenario(env={"ELASTIC_APM_DATA_FORWARDER_TIMEOUT": "1s"})
def dns_proxy_waits_then_502(t):
    """A proxied GET / while the DNS never answers: 502 once the resolver
    times out (no hang); intake requests served at once meanwhile."""
    fwd = 1.0
    with DnsBed(t, {APM_NAME: ["127.0.0.1"]}, options="timeout:5 attempts:1",
                mode="never") as bed:
        bed.start()
        q0 = bed.wait_query(what="query (resolution at init)")
        inv = t.lam.invoke()                              # 3 s function timeout
        call = ProxyCall(t)
        took, t_sent = timed_send(t, agent_payload(inv)[0], "intake during the proxied call")
        assert call.is_alive(), "the proxied call was answered (%r) before the intake " \
            "POST ended, %.0f ms after the query" % (call.status, (call.t1 - q0.t) * 1000)
        assert took < FAST_S, "intake POST took %.0f ms while a proxied call waited for " \
            "the resolver" % (took * 1000)
        call.join(fwd + 4)
        assert not call.is_alive(), "proxied GET / still unanswered %.0f s after the " \
            "query (resolver timeout 1 s)" % (time.monotonic() - q0.t)
        assert call.status == 502, "proxied GET / answered %r, want 502: %r" % (
            call.status, call.body[:200])
        assert fwd - 0.1 <= call.t1 - q0.t <= fwd + 0.5, "502 %.0f ms after the query, " \
            "want at the resolver timeout (1 s)" % ((call.t1 - q0.t) * 1000)
        took, _ = timed_send(t, agent_payload(inv)[0], "intake after the 502")
        assert took < FAST_S, "intake POST after the 502 took %.0f ms" % (took * 1000)
        assert agent_flush(t.port) == 202
        t.lam.runtime_done(inv)
        t_next = t.lam.finish(inv, timeout=10)
        assert t_next < inv.t_deadline, "/next %.0f ms after the deadline" % (
            (t_next - inv.t_deadline) * 1000)
        assert not [r for r in t.apm.requests if r.path == "/"], \
            "a proxied call reached the APM server without an address"


@scenario(telemetry=False, env={"ELASTIC_APM_DATA_FORWARDER_TIMEOUT": "1s"})
def dns_proxy_during_backoff(t):
    """After a resolver timeout, a proxied GET / made while the resolver
    backs off (the next attempt is due ~1 s later) is answered 502 at once or
    by the next attempt's timeout: not left waiting for an unrelated event.
    (Long function timeout and no telemetry, so nothing else wakes the loop.)"""
    fwd, backoff = 1.0, 1.1     # 2nd attempt: min(1,6)^2 s +-10% after the 1st failure
    with DnsBed(t, {APM_NAME: ["127.0.0.1"]}, options="timeout:5 attempts:1",
                mode="never") as bed:
        bed.start()
        q0 = bed.wait_query(what="query (resolution at init)")
        inv = t.lam.invoke(timeout_ms=20000)
        first = ProxyCall(t)
        first.join(fwd + 4)
        assert first.status == 502, "first proxied GET / answered %r, want 502" % (
            first.status,)
        bound = backoff + fwd + 0.9
        second = ProxyCall(t, timeout=bound + 3)
        took, _ = timed_send(t, agent_payload(inv)[0], "intake during the second call")
        assert took < FAST_S, "intake POST took %.0f ms" % (took * 1000)
        second.join(bound + 4)
        waited = (second.t1 or time.monotonic()) - second.t0
        assert second.status == 502 and waited <= bound, \
            "proxied GET / made %.0f ms after the resolver failed, during its backoff: " \
            "%s after %.0f ms, want 502 within %.0f ms (backoff + resolver timeout); " \
            "DNS queries since the first: %d" % (
                (second.t0 - first.t1) * 1000,
                "answered %r" % second.status if second.t1 else "unanswered",
                waited * 1000, bound * 1000, len(bed.name_queries()) - 2)
        assert agent_flush(t.port) == 202
        t.lam.runtime_done(inv)
        t.lam.finish(inv, timeout=10)


@scenario()
def dns_nxdomain(t):
    """NXDOMAIN for the name: one problem line naming the host, invocations
    not held, exit 0 at SHUTDOWN."""
    with DnsBed(t, {"other.example.test": ["127.0.0.1"]}) as bed:
        bed.start()
        bed.wait_query(lambda q: q.rcode == 3, what="NXDOMAIN answer")
        for i in range(3):
            inv = t.lam.invoke()
            function_runs(0.4)   # time for the resolver's backoff to pass: it retries
            lines, tx = agent_payload(inv)
            took, _ = timed_send(t, lines, "invocation %d" % (i + 1))
            assert took < FAST_S, "invocation %d: intake POST took %.0f ms" % (
                i + 1, took * 1000)
            t_flush = time.monotonic()
            assert agent_flush(t.port) == 202
            t.lam.runtime_done(inv)
            t_next = t.lam.finish(inv, timeout=10)
            assert t_next - t_flush < NOT_HELD_S, \
                "invocation %d held %.0f ms with a name that does not exist" % (
                    i + 1, (t_next - t_flush) * 1000)
        t.shutdown_ok()
        lines = log_lines(t, PROBLEM_LEVELS, "cannot resolve", APM_NAME)
        assert len(lines) == 1, "want one warn/error line naming %s, got %d: %r" % (
            APM_NAME, len(lines), [r["msg"] for r in lines])
        assert "timed out" not in lines[0]["msg"], \
            "NXDOMAIN reported as a timeout: %r" % lines[0]["msg"]
        assert all(q.rcode == 3 for q in bed.name_queries()), bed.name_queries()
