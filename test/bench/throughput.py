"""Throughput (bench.py --only throughput): one long-lived apm-ext per scheme;
a run is one invocation in which the bench, as the agent, sends N 1 MiB
identity-ndjson requests back to back on one keep-alive connection, then the
flushed POST; MB/s = bytes / (INVOKE written -> /next), /next coming only
once the sink has answered everything.

The sinks (a C sink of its own for http, the TLS sink for https) are moved
to another CPU if there is one, standing for a remote server; apm-ext and the
agent stay on the bench's CPU. CPU time of each party
(/proc/<pid>/task/*/schedstat) gives "busy" percentages and "MB per
CPU-second" ceilings (apm-ext's, the sink's). The floor column is the bench
sending the same bytes straight to the sink (chunked like apm-ext; over TLS
with Python's ssl as the client, offering apm-ext's suites): the sink's own
ceiling in practice. If apm-ext holds data past the flush (the sink short of
bytes at /next) the case is marked BROKEN, its other runs skipped, and the
bench exits 1 after printing the table.
"""

import gc
import statistics
import time
import uuid

from common import (DIRECT_PORTS, OWN_PORTS, BenchError, Broken, cpu_busy, cpu_ns, cpu_stat,
                    http_get_json, ndjson, now, row, start_server, stats, stop_server)
from harness import Client, Lambda, direct_connect, finish, intake_request, read_202, send_report

TPUT_REQ = 1 << 20      # one agent request of the throughput runs
TPUT_CHUNK = 32768      # chunk size of the direct runs (apm-ext sends a queue block per chunk)
TPUT_FWD_TIMEOUT_S = 10  # apm-ext's forwarder timeout in the throughput runs (default 3 s)
CASES = [("ext", "http"), ("ext", "https"), ("direct", "http"), ("direct", "https")]


class Throughput:
    """The sinks, one long-lived apm-ext per scheme, and the runs of each
    case: ("ext" (through apm-ext) or "direct" (the bench to the sink), scheme)."""

    def __init__(self, ctx, body):
        self.ctx, self.body = ctx, body
        self.sink_cpu = ctx.remote_cpu if ctx.remote_cpu is not None else ctx.cpu
        self.tport = ctx.start_tls_sink()
        ctx.tls_client()
        self.csink, cport = start_server([ctx.sink_bin], "the throughput sink")
        self.sinks = {"http": (self.csink, cport, None),
                      "https": (ctx.tls_sink, self.tport, ctx.tls_client())}
        self.exts = {}          # scheme -> {"lam", "proc", "agent", "req", "flushed", "rid"}
        self.res = {c: [] for c in CASES}
        self.broken = {}        # case -> why: no more runs of it
        self.t_start = now()

    # -- the parties
    def start(self):
        """The sinks on their CPU, an apm-ext per scheme waiting in /next."""
        for p, _, _ in self.sinks.values():
            self.ctx.pin(p.pid, self.sink_cpu)
        for scheme in ("http", "https"):
            self.start_ext(scheme)
        self.direct_req = intake_request(0, self.body, TPUT_CHUNK)

    def start_ext(self, scheme):
        ctx = self.ctx
        lam = Lambda(telemetry=True)
        url = ("http://127.0.0.1:%d" % self.sinks["http"][1]) if scheme == "http" else \
            ("https://localhost:%d" % self.tport)
        env = ctx.env(ELASTIC_APM_LAMBDA_APM_SERVER=url,
                      ELASTIC_APM_DATA_FORWARDER_TIMEOUT="%ds" % TPUT_FWD_TIMEOUT_S,
                      ELASTIC_APM_SERVER_CA_CERT_FILE=ctx.certs()["ca"])
        e = self.exts[scheme] = {"lam": lam, "agent": None}
        e["proc"] = lam.spawn(ctx.binary, "apm-lambda-extension", env,
                              ctx.log_path("tput-" + scheme))
        lam.wait(lambda: lam.nexts, "apm-ext's (%s) first /event/next" % scheme)
        port = int(env["ELASTIC_APM_DATA_RECEIVER_SERVER_PORT"])
        e["agent"] = Client(lam, port)
        e["req"] = intake_request(port, self.body)
        e["flushed"] = ("POST /intake/v2/events?flushed=true HTTP/1.1\r\nHost: 127.0.0.1:%d"
                        "\r\nContent-Length: 0\r\n\r\n" % port).encode()

    def sink_bytes(self, scheme):
        """Body bytes the sink of scheme has got so far."""
        _, port, tls = self.sinks[scheme]
        return http_get_json(port, "/__sink/stats", tls)["body_bytes"]

    def stop(self):
        """The last reports, SHUTDOWN of each apm-ext (it must exit 0).
        Returns ({scheme: VmHWM KiB}, the TLS sink's handshakes)."""
        hwm = {}
        for scheme, e in self.exts.items():
            hwm[scheme] = e["proc"].status()["VmHWM"]
            e["agent"].close()
            if e.get("rid"):
                send_report(e["lam"], e["rid"])
            finish(self.ctx, e["lam"], e["proc"], "throughput runs, %s server" % scheme)
        return hwm, http_get_json(self.tport, "/__sink/handshakes", self.ctx.tls_client())

    def close(self):
        ctx = self.ctx
        for e in self.exts.values():
            if e["agent"] is not None:
                e["agent"].close()
            e["lam"].close()
        stop_server(self.csink)
        if ctx.tls_sink is not None and ctx.tls_sink.poll() is None:
            ctx.pin(ctx.tls_sink.pid, ctx.cpu)

    # -- the runs
    def run_ext(self, scheme, n):
        """One invocation: n 1 MiB intake POSTs through apm-ext, then the
        flushed POST; until apm-ext's /next. Raises Broken if the sink is
        short of bytes then."""
        e = self.exts[scheme]
        lam, agent, proc = e["lam"], e["agent"], e["proc"]
        what = "the %s throughput run" % scheme
        b0 = self.sink_bytes(scheme)
        spid = self.sinks[scheme][0].pid
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
        got = self.sink_bytes(scheme) - b0
        if got < n * len(self.body):
            held = (t1 - t_flushed) / 1e9
            raise Broken(
                "%s: apm-ext called /next %.1f s after the flushed POST%s with %d of %d "
                "body bytes at the sink: %s" % (
                    what, held, " (its forwarder timeout is %d s)" % TPUT_FWD_TIMEOUT_S,
                    got, n * len(self.body),
                    "delivery stalled until the forwarder timeout, data held back"
                    if held >= TPUT_FWD_TIMEOUT_S - 0.5 else "data lost"))
        return {"wall": t1 - t0, "bytes": n * len(self.body), "ext": c1[0] - c0[0],
                "sink": c1[1] - c0[1], "agent": c1[2] - c0[2],
                "cpu_here": cpu_busy(k0, k1, self.ctx.cpu),
                "cpu_sink": cpu_busy(k0, k1, self.sink_cpu)}

    def run_direct(self, scheme, n):
        """n requests of the same bytes, chunked, from the bench straight to the sink."""
        p, port, tls = self.sinks[scheme]
        what = "the direct %s throughput run" % scheme
        b0 = self.sink_bytes(scheme)
        s = direct_connect(self.ctx, port, tls is not None)
        try:
            c0 = (cpu_ns(p.pid), time.process_time_ns())
            t0 = now()
            for _ in range(n):
                s.sendall(self.direct_req)
                read_202(s, what)
            t1 = now()
            c1 = (cpu_ns(p.pid), time.process_time_ns())
        except OSError as e:
            raise BenchError("%s: %s" % (what, e))
        finally:
            s.close()
        got = self.sink_bytes(scheme) - b0
        if got < n * len(self.body):
            raise BenchError("%s: the sink got %d body bytes of %d"
                             % (what, got, n * len(self.body)))
        return {"wall": t1 - t0, "bytes": n * len(self.body), "sink": c1[0] - c0[0],
                "agent": c1[1] - c0[1]}

    def run(self, case, n):
        """One run of case, or None if apm-ext broke in it (now or before)."""
        if case in self.broken:
            return None
        try:
            return (self.run_ext if case[0] == "ext" else self.run_direct)(case[1], n)
        except Broken as e:
            self.broken[case] = str(e)
            self.ctx.broken.append(str(e))
            return None

    def run_all(self, nreq, rounds):
        """A warm-up run of each case (connections, queue pages), then rounds
        rounds of every case, the order rotating."""
        for c in CASES:
            self.run(c, min(8, nreq))
        gc.collect()
        for i in range(rounds):
            k = i % len(CASES)
            for c in CASES[k:] + CASES[:k]:
                r = self.run(c, nreq)
                if r is not None:
                    self.res[c].append(r)
                gc.collect()

    # -- the figures
    @staticmethod
    def rate(runs, den="wall"):
        return stats([r["bytes"] / r[den] * 1e3 for r in runs if r.get(den)])   # MB/s

    @staticmethod
    def busy(runs, who):
        """Median % of the run's wall time: CPU time of who, or (cpu_*) how
        busy that CPU was, whoever used it."""
        v = [r[who] / r["wall"] if who in ("ext", "sink", "agent") else r[who]
             for r in runs if r.get(who) is not None]
        return 100.0 * statistics.median(v) if v else None

    def shares(self, scheme):
        """(apm-ext, agent, sink, the bench's CPU, the sink's CPU) busy %."""
        runs = self.res[("ext", scheme)]
        e, a, s = self.busy(runs, "ext"), self.busy(runs, "agent"), self.busy(runs, "sink")
        here, there = self.busy(runs, "cpu_here"), self.busy(runs, "cpu_sink")
        return e, a, s, here, there

    def verdict(self, scheme):
        """What limited the throughput through apm-ext: the row's target text."""
        ctx = self.ctx
        if ("ext", scheme) in self.broken:
            return "apm-ext broke (see 'bench: BROKEN' below)"
        if not self.res[("ext", scheme)]:
            return ""
        e, a, s, here, there = self.shares(scheme)
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
                str(c) for c, f in ((ctx.cpu, here_full), (self.sink_cpu, there_full)) if f)
        return "neither side's CPU full (note)"

    def rows(self):
        res, rate = self.res, self.rate
        ext_h, ext_s = res[("ext", "http")], res[("ext", "https")]
        dir_h, dir_s = res[("direct", "http")], res[("direct", "https")]
        bh, bs = ("ext", "http") in self.broken, ("ext", "https") in self.broken
        return [
            row("intake throughput, http: agent -> apm-ext -> C sink", rate(ext_h), rate(dir_h),
                self.verdict("http"), None, "MB/s", "rate", bh),
            row("intake throughput, https: agent -> apm-ext -> Python ssl sink", rate(ext_s),
                rate(dir_s), self.verdict("https"), None, "MB/s", "rate", bs),
            row("  apm-ext ceiling, http: MB per apm-ext CPU-second", rate(ext_h, "ext"), None,
                unit="MB/s", kind="rate", broken=bh),
            row("  apm-ext ceiling, https: MB per apm-ext CPU-second", rate(ext_s, "ext"), None,
                unit="MB/s", kind="rate", broken=bs),
            row("  sink ceiling, http: MB per C sink CPU-second", rate(ext_h, "sink"),
                rate(dir_h, "sink"), unit="MB/s", kind="rate"),
            row("  sink ceiling, https: MB per Python ssl sink CPU-second", rate(ext_s, "sink"),
                rate(dir_s, "sink"), unit="MB/s", kind="rate"),
        ]

    def busy_notes(self):
        ctx = self.ctx
        for scheme in ("http", "https"):
            if self.res[("ext", scheme)] and ("ext", scheme) not in self.broken:
                e, a, s, here, there = self.shares(scheme)
                ctx.notes.append(
                    "throughput, %s, busy (CPU time / wall time, medians): CPU %s: %s apm-ext "
                    "%.0f%% + agent %.0f%%; CPU %s: %s sink %.0f%%" % (
                        scheme, ctx.cpu, "%.0f%% busy of which" % here if here is not None
                        else "", e, a, self.sink_cpu,
                        "%.0f%% busy of which" % there if there is not None else "", s))

    def run_notes(self, nreq, rounds, hwm, hands):
        """How the runs went: sizes, pinning, the TLS suites at the sink, memory."""
        ctx, sink_cpu = self.ctx, self.sink_cpu
        where = ("the sinks on CPU %d (a remote server's stand-in), apm-ext and the agent (the "
                 "bench) on CPU %d" % (sink_cpu, ctx.cpu)) if ctx.remote_cpu is not None else \
            "everything on one CPU" if ctx.cpu is not None else "nothing pinned"
        suites = {"apm-ext": {}, "direct": {}}
        for h in hands:
            if h[0] >= self.t_start and (h[3] in DIRECT_PORTS or h[3] not in OWN_PORTS):
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
            "the runs; TLS handshakes at the sink: %s"
            % (nreq, len(self.body), rounds, where, tls_info))
        ctx.notes.append("apm-ext VmHWM after the throughput runs: %d KiB (http), %d KiB (https)"
                         % (hwm["http"], hwm["https"]))


def m_throughput(ctx):
    """MB/s of agent data through apm-ext to a sink, http and https, against
    the bench sending the same bytes straight to the sink (floor column)."""
    nreq = ctx.args.tput_mb or (32 if ctx.args.quick else 100)
    rounds = 1 if ctx.args.quick else 5
    tp = Throughput(ctx, ndjson(TPUT_REQ))
    try:
        tp.start()
        tp.run_all(nreq, rounds)
        hwm, hands = tp.stop()
    finally:
        tp.close()
    ctx.raw["throughput"] = {"%s-%s" % k: v for k, v in tp.res.items()}
    rows = tp.rows()
    tp.busy_notes()
    tp.run_notes(nreq, rounds, hwm, hands)
    return rows
