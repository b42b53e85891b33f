"""Added latency per invocation (bench.py --only latency): one long-lived
apm-ext, subscribed to telemetry, sending to test/bench/sink.c (answers 202
at once), and one floor, invocations interleaved (the order of the cases
rotates every round).

For apm-ext the bench acts as the agent on one keep-alive connection:
INVOKE, POST /intake/v2/events with N bytes of identity ndjson (answered
202), then an empty POST /intake/v2/events?flushed=true. Added latency = the
extension's next GET /event/next minus the flushed POST's 202 (the runtime
could answer Lambda then). The "+ telemetry" case also POSTs a
platform.runtimeDone batch to the telemetry listener right after that 202,
as Lambda does after the runtime's response; the "ended by runtimeDone only"
case sends no flushed POST, only that record, and counts from the moment we
start writing it; the "OTLP export" case sends a 100 KB OTLP/HTTP export
instead of the agent's ndjson, then that record. For the floor, with no
agent, it is INVOKE written -> /next.
"""

import gc
import json
import time
import uuid

from common import BenchError, iso_now, ndjson, now, row, stats, us
from harness import INTAKE_HDRS, Client, Lambda

SIZES = [("flush only", 0), ("1 KB", 1024), ("100 KB", 100 * 1024), ("1 MB", 1024 * 1024)]
# (label, agent bytes, telemetry: see LatencyRun.invoke_apm), the floor's first
CASES = [("floor", None, None)] + [(label, n, None) for label, n in SIZES] + \
        [("100 KB + telemetry", 100 * 1024, "after"),
         ("100 KB, ended by runtimeDone only", 100 * 1024, "only"),
         ("100 KB OTLP export, ended by runtimeDone", 100 * 1024, "otlp")]
WARMUP_ROUNDS = 3
OTLP_HDRS = [("Content-Type", "application/x-protobuf"),
             ("User-Agent", "OTel-OTLP-Exporter-JavaScript/0.223.0")]
JSON_HDRS = [("Content-Type", "application/json")]


class LatencyRun:
    """One long-lived apm-ext and one floor, and the connections to apm-ext
    of the agent, of an OpenTelemetry SDK's exporter and of Lambda's
    telemetry sender."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.apm_lam, self.floor_lam = Lambda(telemetry=True), Lambda(telemetry=True)
        self.env = ctx.env()
        self.agent = self.tel = self.otlp = None
        self.sent = 0               # agent bytes apm-ext accepted: the sink must get them all
        self.last_rid = None

    def start(self):
        """Both processes up and waiting in /next; the clients; the bodies."""
        ctx, env = self.ctx, self.env
        self.apm = self.apm_lam.spawn(ctx.binary, "apm-lambda-extension", env,
                                      ctx.log_path("lat-apm"))
        self.floor = self.floor_lam.spawn(ctx.floor, "floor", env, ctx.log_path("lat-floor"))
        for lam, what in ((self.apm_lam, "apm-ext"), (self.floor_lam, "floor")):
            lam.wait(lambda: lam.nexts, what + "'s first /event/next")
        if self.apm_lam.tel_port is None:
            raise BenchError("apm-ext did not subscribe to telemetry")
        time.sleep(0.002)
        self.hwm_init = self.apm.status()["VmHWM"]
        self.agent = Client(self.apm_lam, int(env["ELASTIC_APM_DATA_RECEIVER_SERVER_PORT"]))
        self.otlp = Client(self.apm_lam, int(env["APM_EXT_OTLP_PORT"]))
        self.tel = Client(self.apm_lam, self.apm_lam.tel_port)
        self.otlp_body = bytes((i * 131 + i // 97) & 0xFF for i in range(100 * 1024))
        self.bodies = {n: ndjson(n) for _, n in SIZES if n}

    def _post_data(self, size, telemetry):
        """The invocation's data: an OTLP export, or size bytes of ndjson (if any)."""
        if telemetry == "otlp":
            status, _ = self.otlp.request("POST", "/v1/traces", self.otlp_body, OTLP_HDRS)
            if status != 200:
                raise BenchError("apm-ext answered %d to a %d-byte OTLP export"
                                 % (status, len(self.otlp_body)))
            self.sent += len(self.otlp_body)
        elif size:
            status, _ = self.agent.request("POST", "/intake/v2/events", self.bodies[size],
                                           INTAKE_HDRS)
            if status != 202:
                raise BenchError("apm-ext answered %d to a %d-byte intake POST" % (status, size))
            self.sent += size

    def invoke_apm(self, size, telemetry):
        """telemetry: None (no records), "after" (runtimeDone right after the
        flushed POST's 202), "only" (runtimeDone, no flushed POST) or "otlp"
        (the body is an OTLP/HTTP export instead, as an OpenTelemetry SDK's
        force-flush sends it, then runtimeDone). Returns the added latency (ns)."""
        lam = self.apm_lam
        rid = str(uuid.uuid4())
        n0 = len(lam.nexts)
        lam.invoke(rid)
        self.last_rid = rid
        self._post_data(size, telemetry)
        if telemetry:                       # ready before the runtime answers
            done = json.dumps([{"time": iso_now(), "type": "platform.runtimeDone", "record": {
                "requestId": rid, "status": "success",
                "metrics": {"durationMs": 1.0, "producedBytes": 42}}}]).encode()
        if telemetry in ("only", "otlp"):
            t_resp = now()                  # the runtime answers: Lambda sends runtimeDone
        else:
            status, t_resp = self.agent.request("POST", "/intake/v2/events?flushed=true", b"",
                                                INTAKE_HDRS)
            if status != 202:
                raise BenchError("apm-ext answered %d to the flushed POST" % status)
        if telemetry:
            status, _ = self.tel.request("POST", "/", done, JSON_HDRS)
            if status != 200:
                raise BenchError("apm-ext answered %d to a telemetry POST" % status)
        lam.wait(lambda: len(lam.nexts) > n0, "apm-ext's /next after an invocation")
        return lam.nexts[n0] - t_resp

    def invoke_floor(self):
        """INVOKE written -> the floor's next /next (ns)."""
        lam = self.floor_lam
        n0 = len(lam.nexts)
        t_inv = lam.invoke(str(uuid.uuid4()))
        lam.wait(lambda: len(lam.nexts) > n0, "the floor's /next")
        return lam.nexts[n0] - t_inv

    def rounds(self, runs):
        """WARMUP_ROUNDS + runs rounds of every case, the order rotating.
        Returns {label: [us, ...]}."""
        samples = {c[0]: [] for c in CASES}
        for i in range(WARMUP_ROUNDS + runs):
            k = i % len(CASES)
            for label, size, telemetry in CASES[k:] + CASES[:k]:
                v = self.invoke_floor() if label == "floor" else self.invoke_apm(size, telemetry)
                if i >= WARMUP_ROUNDS:
                    samples[label].append(us(v))
        gc.collect()
        return samples

    def stop(self):
        """The last report, memory, SHUTDOWN of both, and the checks: exit 0,
        no protocol error, every byte the agent sent at the sink."""
        ctx = self.ctx
        # the last invocation's platform.report, so apm-ext need not wait for it
        self.tel.request("POST", "/", json.dumps([{
            "time": iso_now(), "type": "platform.report", "record": {
                "requestId": self.last_rid, "status": "success", "metrics": {
                    "durationMs": 1.0, "billedDurationMs": 1, "memorySizeMB": 128,
                    "maxMemoryUsedMB": 20}}}]).encode(), JSON_HDRS)
        time.sleep(0.05)                         # let it forward what the report made
        st_a = self.apm.status()
        self.hwm_a, self.hwm_f = st_a["VmHWM"], self.floor.status()["VmHWM"]
        ctx.notes.append("apm-ext after the latency runs: VmHWM %d KiB, VmRSS %d KiB (%d KiB "
                         "right after init)" % (self.hwm_a, st_a["VmRSS"], self.hwm_init))
        self.close_clients()
        code_a, self.exit_a = self.apm_lam.shutdown()
        code_f, self.exit_f = self.floor_lam.shutdown()
        if code_a != 0 or code_f != 0:
            raise BenchError("exit codes after SHUTDOWN: apm-ext %s, floor %s\n%s"
                             % (code_a, code_f, self.apm.log_tail()))
        for lam, what in ((self.apm_lam, "apm-ext"), (self.floor_lam, "floor")):
            if lam.errors:
                raise BenchError("%s made protocol errors: %s" % (what, lam.errors))
        ctx.check_log(self.apm, "latency runs")
        sink = ctx.sink_stats()
        if sink["body_bytes"] < self.sent:
            raise BenchError("the APM server got %d body bytes, the agent sent %d: data lost"
                             % (sink["body_bytes"], self.sent))
        ctx.notes.append("sink: %d requests, %d body bytes, %d connections (agent sent %d bytes)"
                         % (sink["requests"], sink["body_bytes"], sink["connections"], self.sent))

    def close_clients(self):
        for c in (self.agent, self.otlp, self.tel):
            if c is not None:
                c.close()

    def close(self):
        self.close_clients()
        self.apm_lam.close()
        self.floor_lam.close()


def latency_rows(ctx, run, samples):
    fl = stats(samples["floor"])
    rows = []
    for label, size, telemetry in CASES[1:]:
        s = stats(samples[label])
        target, ok = "", None
        if label in ("100 KB", "100 KB OTLP export, ended by runtimeDone"):
            target, ok = "< 1000 us", s["median"] < 1000
        rows.append(row("added latency, %s" % label, s, fl, target, ok, "us", "stats"))
    ctx.raw["latency_rss_kb"] = {"apm_init": run.hwm_init, "apm": run.hwm_a, "floor": run.hwm_f}
    rows.append(row("peak RSS after latency runs (VmHWM)", run.hwm_a, run.hwm_f, unit="KiB"))
    rows.append(row("SHUTDOWN -> exit after latency runs (1 run)",
                    us(run.exit_a) if run.exit_a else None,
                    us(run.exit_f) if run.exit_f else None, unit="us"))
    return rows


def m_latency(ctx):
    """Per-invocation added latency, one apm-ext and one floor, interleaved."""
    run = LatencyRun(ctx)
    try:
        run.start()
        samples = run.rounds(ctx.args.runs)
        run.stop()
    finally:
        run.close()
    ctx.raw["latency_us"] = samples
    return latency_rows(ctx, run, samples)
