#!/usr/bin/env python3
"""make demo: the real Elastic APM Node.js agent, in a Lambda-like sandbox,
sending through ./apm-ext to a fake APM server; a few readable lines on what
happened.

    python3 test/e2e/demo.py [--binary ./apm-ext] [--invocations 3] [--spans 5]
                         [--background] [--out build/demo]
                         [--otel [--protocol http/protobuf|http/json]]

--otel (make demo OTEL=1): the OpenTelemetry JS SDK instead of the Elastic
agent: test/otel/handler.js wrapped by @opentelemetry/instrumentation-aws-lambda,
exporting traces, metrics and logs over OTLP/HTTP to apm-ext's OTLP listener,
which forwards them to the fake APM server's /v1/traces, /v1/metrics and
/v1/logs (needs test/otel/node_modules: test/e2e/demo.sh runs npm ci for it).

Runs on 127.0.0.1 only: test/fakes/fake_lambda.py plays Lambda (Extensions,
Telemetry and Runtime APIs, freezing the processes between invocations),
test/node/runtime.js is the Node runtime with NODE_OPTIONS=-r
elastic-apm-node/start, test/node/handler.js the function, test/fakes/fake_apm.py
the APM server (it checks every line: structurally always, and against the APM
intake v2 JSON schemas of elastic/apm-data (folder docs/spec/v2 there), optional,
when APM_INTAKE_SPEC_DIR or the default folder provides them; the demo prints which
level ran). Needs test/node/node_modules (test/e2e/demo.sh runs npm ci for it).
Exit status 1 if anything the handler made did not arrive exactly once.
"""

import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "fakes")]

import fake_apm  # noqa: E402
from fake_apm import FakeAPM  # noqa: E402
from fake_lambda import FakeLambda  # noqa: E402
import e2e  # noqa: E402
import e2e_agent as ea  # noqa: E402
import e2e_otel as eo  # noqa: E402


def ms(seconds):
    return "%.1f ms" % (seconds * 1000)


def keep_logs(out, lam, apm, fn, runtime_what, handler_what, request_row,
              decoded=lambda r: (), apm_what="its lines"):
    """Copy the run's logs to out/ and write apm-server.ndjson: one row per
    request the fake APM server got (request_row(r)), then its lines and
    whatever decoded(r) yields. Returns [(file, what it holds)]."""
    os.makedirs(out, exist_ok=True)
    kept = []
    for src, name, what in ((lam.ext_log_path, "extension.log", "apm-ext's JSON log"),
                            (lam.runtime_log_path, "runtime.log", runtime_what),
                            (fn.record_path, "handler-records.jsonl", handler_what)):
        if src and os.path.exists(src):
            shutil.copyfile(src, os.path.join(out, name))
            kept.append((name, what))
    with open(os.path.join(out, "apm-server.ndjson"), "w", encoding="utf-8") as f:
        for r in apm.requests:
            f.write(json.dumps(request_row(r)) + "\n")
            for kind, obj in r.lines:
                f.write(json.dumps({kind: obj}, separators=(",", ":")) + "\n")
            for row in decoded(r):
                f.write(json.dumps(row, separators=(",", ":"), default=repr) + "\n")
    kept.append(("apm-server.ndjson", "every request the fake APM server got, then " + apm_what))
    return kept


def agent_keep_logs(out, lam, apm, fn):
    return keep_logs(out, lam, apm, fn, "the Node runtime and the agent's own log",
                     "ids the handler made",
                     lambda r: {"request": "%s %s%s" % (r.method, r.path,
                                                         "?" + r.query if r.query else ""),
                                "status": r.status,
                                "user_agent": r.headers.get("User-Agent"),
                                "content_encoding": r.headers.get("Content-Encoding"),
                                "bytes": len(r.body)})


def report_end(out, kept, ok):
    """The demo's last lines: where the logs are, then ok or FAILED."""
    if kept:
        print("  logs kept in %s/:" % os.path.relpath(out))
        for name, what in kept:
            print("    %-22s %s" % (name, what))
    print("demo %s" % ("ok" if ok else "FAILED"))
    return 0 if ok else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=os.path.join(ROOT, "apm-ext"))
    ap.add_argument("--invocations", type=int, default=3)
    ap.add_argument("--spans", type=int, default=5, help="spans per invocation")
    ap.add_argument("--background", action="store_true",
                    help="ELASTIC_APM_SEND_STRATEGY=background")
    ap.add_argument("--out", default=None,
                    help="where the logs are kept (default build/demo, build/demo-otel)")
    ap.add_argument("--otel", action="store_true",
                    help="the OpenTelemetry JS SDK (OTLP/HTTP) instead of the Elastic agent")
    ap.add_argument("--protocol", default="http/protobuf", choices=sorted(eo.CTYPES),
                    help="with --otel: OTEL_EXPORTER_OTLP_PROTOCOL")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = os.path.join(ROOT, "build", "demo-otel" if args.otel else "demo")
    if args.otel:
        return otel_main(args)

    err = ea.node_setup_error()
    if err:
        print("demo: " + err)
        return 1
    if not os.access(args.binary, os.X_OK):
        print("demo: %s is not built (make)" % args.binary)
        return 1
    version = ea.agent_version()
    strategy = "background" if args.background else "syncflush"
    print("apm-ext demo: Elastic APM Node.js agent %s -> %s (%s) -> fake APM server" % (
        version, os.path.relpath(args.binary), strategy))
    print("  fake APM server checks every intake line: %s" % fake_apm.CHECK_LEVEL)

    lam = FakeLambda()
    apm = FakeAPM(token="demo-secret-token")
    fn = None
    ok = True
    try:
        port = e2e.free_port()
        tport = e2e.free_port("0.0.0.0")
        lam.start_extension(args.binary, {
            "ELASTIC_APM_LAMBDA_APM_SERVER": apm.url,
            "ELASTIC_APM_SECRET_TOKEN": "demo-secret-token",
            "ELASTIC_APM_DATA_RECEIVER_SERVER_PORT": str(port),
            "APM_EXT_TELEMETRY_PORT": str(tport),
            "ELASTIC_APM_SEND_STRATEGY": strategy,
            "ELASTIC_APM_LOG_LEVEL": "debug"})
        lam.wait_registered()
        lam.wait_init_done()
        fn = ea.NodeFunction(lam, port, env={"ELASTIC_APM_SECRET_TOKEN": "demo-secret-token"})
        init_s = fn.start()
        print("  init: extension registered %s after exec; Node runtime + agent ready %s "
              "after start" % (ms(lam.t_register - lam.t_exec), ms(init_s)))

        invs = []
        for i in range(args.invocations):
            payload = {"spans": args.spans, "errors": 1 if i % 2 == 0 else 0}
            inv = fn.invoke(payload)
            invs.append(inv)
            waits = ea.flush_waits_ms(fn)
            run = inv.t_runtime_done - inv.t_invoke
            gap = inv.t_end - inv.t_runtime_done
            if gap >= 0:
                held = "extension's /next %s after the runtime's response" % ms(gap)
            else:
                held = "extension already in /next %s before the runtime's response " \
                    "(added 0 ms)" % ms(-gap)
            recs = fn.records(inv.request_id)
            made = "%d spans, %d error%s" % (
                sum(1 for r in recs if r["kind"] == "span"),
                sum(1 for r in recs if r["kind"] == "error"),
                "" if sum(1 for r in recs if r["kind"] == "error") == 1 else "s")
            flush = "; agent waited %.1f ms for ?flushed=true" % waits[-1] \
                if len(waits) == i + 1 and waits[-1] is not None else ""
            print("  invocation %d%s: %s; function %s, %s; %s%s; frozen" % (
                i + 1, " (cold start)" if i == 0 else "", inv.status, ms(run), made, held,
                flush))
        t_shut = time.monotonic()
        code, t_exit, killed = lam.shutdown()
        print("  shutdown: extension exited %s %s after SHUTDOWN%s" % (
            code, ms(t_exit - t_shut), " (KILLED at the deadline)" if killed else ""))
        ok = code == 0 and not killed

        seen = ea.Seen(apm)
        counts = {}
        for r in seen.requests:
            for kind, _ in r.lines:
                if kind != "metadata" and r.status == 202:
                    counts[kind] = counts.get(kind, 0) + 1
        by_kind = ", ".join("%d %s%s" % (n, k, "s" if n != 1 else "")
                            for k, n in sorted(counts.items()))
        print("  delivered: %s in %d intake requests (%s)" % (
            by_kind or "nothing", len(seen.requests),
            "%d invalid lines" % len(apm.errors) if apm.errors else
            "every line valid: %s" % ("intake schemas and structural check"
                                      if fake_apm.SPEC_DIR else "structural check only")))
        try:
            ea.check_requests(seen, version)
            for i, inv in enumerate(invs):
                ea.check_invocation(seen, fn, inv, coldstart=(i == 0),
                                    by=None if args.background else inv.t_end,
                                    what="invocation %d" % (i + 1))
            ea.check_nothing_else(seen, fn)
            ea.check_agent_log(fn, len(invs))
            print("  checked: every id the handler made arrived exactly once, under the "
                  "agent's metadata%s; the agent logged no trouble" % (
                      "" if args.background else ", before the extension's /next"))
        except AssertionError as e:
            ok = False
            print("  PROBLEM: %s" % str(e).split("\n    --- Node runtime log")[0])
    finally:
        kept = agent_keep_logs(args.out, lam, apm, fn) if fn is not None else []
        lam.close()
        apm.close()
        if fn is not None:
            fn.close()
    return report_end(args.out, kept, ok)


def otel_keep_logs(out, lam, apm, fn):
    return keep_logs(out, lam, apm, fn, "the Node runtime and the SDK's diagnostics",
                     "what the handler made",
                     lambda r: {"request": "%s %s" % (r.method, r.path), "status": r.status,
                                "user_agent": r.user_agent, "content_type": r.content_type,
                                "content_encoding": r.encoding, "bytes": len(r.body)},
                     lambda r: ({"otlp_" + r.signal: {k: v for k, v in item.items()
                                                       if k != "resource"}}
                                for item in r.otlp_items),
                     "what it decoded")


def span_tree(spans, trace_id):
    """Lines drawing one trace's spans as a tree (name [kind])."""
    kinds = {1: "", 2: " [server]", 3: " [client]", 4: " [producer]", 5: " [consumer]"}
    mine = [s for s in spans if s["trace_id"] == trace_id]
    children = {}
    for s in mine:
        children.setdefault(s["parent_id"], []).append(s)
    ids = {s["span_id"] for s in mine}
    lines = []

    def walk(s, depth):
        ms = (s["end_ns"] - s["start_ns"]) / 1e6
        lines.append("%s%s%s  %.2f ms" % ("   " * depth + ("└─ " if depth else ""), s["name"],
                                          kinds.get(s["kind"], ""), ms))
        for c in sorted(children.get(s["span_id"], []), key=lambda x: x["start_ns"]):
            walk(c, depth + 1)
    for root in (s for s in mine if s["parent_id"] not in ids):
        walk(root, 0)
    return lines


def otel_main(args):
    err = eo.otel_setup_error()
    if err:
        print("demo: " + err)
        return 1
    if not os.access(args.binary, os.X_OK):
        print("demo: %s is not built (make)" % args.binary)
        return 1
    strategy = "background" if args.background else "syncflush"
    compression = "gzip" if args.protocol == "http/protobuf" else "none"
    print("apm-ext demo: OpenTelemetry JS SDK (%s) -> %s (%s) -> fake APM server" % (
        eo.sdk_user_agent(), os.path.relpath(args.binary), strategy))
    print("  exporters: OTLP/HTTP %s, compression %s; @opentelemetry/"
          "instrumentation-aws-lambda wraps the handler" % (args.protocol, compression))
    lam = FakeLambda()
    apm = FakeAPM(token="demo-secret-token")
    fn = None
    ok = True
    kept = []
    try:
        port = e2e.free_port()
        tport = e2e.free_port("0.0.0.0")
        oport = e2e.free_port()
        while oport in (port, tport):
            oport = e2e.free_port()
        lam.start_extension(args.binary, {
            "ELASTIC_APM_LAMBDA_APM_SERVER": apm.url,
            "ELASTIC_APM_SECRET_TOKEN": "demo-secret-token",
            "ELASTIC_APM_DATA_RECEIVER_SERVER_PORT": str(port),
            "APM_EXT_TELEMETRY_PORT": str(tport),
            "APM_EXT_OTLP_PORT": str(oport),
            "ELASTIC_APM_SEND_STRATEGY": strategy,
            "ELASTIC_APM_LOG_LEVEL": "debug"})
        lam.wait_registered()
        lam.wait_init_done()
        fn = eo.OtelFunction(lam, oport, args.protocol, compression)
        init_s = fn.start()
        print("  init: extension registered %s after exec (OTLP/HTTP on localhost:%d); Node "
              "runtime + SDK ready %s after start" % (ms(lam.t_register - lam.t_exec), oport,
                                                     ms(init_s)))
        invs = []
        for i in range(args.invocations):
            inv = fn.invoke({"spans": args.spans, "logs": 2})
            invs.append(inv)
            run = inv.t_runtime_done - inv.t_invoke
            gap = inv.t_end - inv.t_runtime_done
            held = ("extension's /next %s after the runtime's response" % ms(gap)) if gap >= 0 \
                else "extension already in /next %s before the runtime's response" % ms(-gap)
            recs = fn.records(inv.request_id)
            print("  invocation %d%s: %s; function %s (with the SDK's flush), %d spans + the "
                  "invocation span, %d log records; %s; frozen" % (
                      i + 1, " (cold start)" if i == 0 else "", inv.status, ms(run),
                      sum(1 for r in recs if r["kind"] == "span"),
                      sum(1 for r in recs if r["kind"] == "log"), held))
        t_shut = time.monotonic()
        code, t_exit, killed = lam.shutdown()
        print("  shutdown: extension exited %s %s after SHUTDOWN%s" % (
            code, ms(t_exit - t_shut), " (KILLED at the deadline)" if killed else ""))
        ok = code == 0 and not killed
        seen = eo.OtelSeen(apm)
        by_signal = {}
        for r in seen.delivered:
            by_signal[r.signal] = by_signal.get(r.signal, 0) + 1
        r0 = seen.delivered[0] if seen.delivered else None
        print("  delivered over OTLP: %d spans, %d metrics, %d log records in %s" % (
            len(apm.otlp_spans()), len(apm.otlp_metrics()), len(apm.otlp_logs()),
            ", ".join("%d %s" % (n, "/v1/" + s) for s, n in sorted(by_signal.items()))
            or "no request"))
        if r0 is not None:
            print("    as the APM server got them: Content-Type %s, Content-Encoding %s, "
                  "Authorization %s, User-Agent %s" % (
                      r0.content_type, r0.encoding or "identity",
                      (r0.auth or "none").split(" ")[0] + " <token>", r0.user_agent))
        print("  and at the intake API: %d platform metricsets (one per invocation)" % (
            apm.count("metricset")))
        if invs and apm.otlp_spans():
            last = [r for r in fn.records(invs[-1].request_id) if r["kind"] == "invocation"]
            if last:
                print("  the last invocation's trace at the APM server:")
                for line in span_tree(apm.otlp_spans(), last[0]["trace_id"])[:12]:
                    print("    " + line)
        try:
            eo.check_otlp_requests(seen, fn, token="demo-secret-token")
            for i, inv in enumerate(invs):
                eo.check_otel_invocation(seen, fn, inv, coldstart=(i == 0),
                                         by=None if args.background else inv.t_end,
                                         what="invocation %d" % (i + 1))
            eo.check_otel_nothing_else(seen, fn)
            eo.check_sdk_log(fn)
            print("  checked: every span, log record and counter value the handler made "
                  "arrived exactly once%s; the SDK logged no trouble" % (
                      "" if args.background else ", before the extension's /next"))
        except AssertionError as e:
            ok = False
            print("  PROBLEM: %s" % str(e).split("\n    --- Node runtime log")[0])
        if apm.errors:
            ok = False
            print("  PROBLEM: the fake APM server found invalid payloads: %s" % apm.errors[:3])
    finally:
        if fn is not None:
            kept = otel_keep_logs(args.out, lam, apm, fn)
        lam.close()
        apm.close()
        if fn is not None:
            fn.close()
    return report_end(args.out, kept, ok)


if __name__ == "__main__":
    sys.exit(main())
