"""End-to-end scenarios with the real Elastic APM Node.js agent.

    npm ci --prefix test/node          # once: elastic-apm-node, pinned
    python3 test/e2e/e2e.py -k agent

Each scenario runs the real chain: FakeLambda starts ./apm-ext, then
test/node/runtime.js (a minimal Lambda runtime) with
NODE_OPTIONS=-r elastic-apm-node/start, which wraps test/node/handler.js the
way it does in Lambda. The handler writes the ids of what it made (transaction,
spans, errors) to a file; the scenarios match them, id by id, against what the
fake APM server accepted: nothing missing, nothing twice, nothing else (the
runtime's own Runtime API calls must not show up as spans), every event behind
the agent's metadata, every line valid against the intake schemas. The agent's
own log (JSON lines on the runtime's stdout) must hold no warning or error
about the APM server or the extension.

The agent_node_timing_* scenarios at the end hold the agent to Lambda's
real timing (default 3 s timeouts, a stalling APM server, telemetry one
invocation late, a timeout mid-request); test/node/timing_handler.js prints
the function log lines the late-telemetry one follows.

NodeFunction below is the reusable piece (test/e2e/demo.py uses it too).
"""

import collections
import json
import os
import re
import shutil
import tempfile
import threading
import time

from e2e import scenario, TEST
from fake_lambda import DEADLINE_MARGIN_MS

NODE_DIR = os.path.join(TEST, "node")
NODE_MODULES = os.path.join(NODE_DIR, "node_modules")
AGENT_PKG = os.path.join(NODE_MODULES, "elastic-apm-node", "package.json")
FUNCTION_NAME = "test-fn"

# Agent log messages (below warn level) that mean the extension or the APM
# server let the agent down.
AGENT_TROUBLE = re.compile(r"lambdaRegisterTransaction unsuccessful|verfetch|"
                           r"_signalLambdaEnd error|APM Server transport error|"
                           r"flush error|could not wrap lambda handler")


def node_setup_error():
    """Why the real agent cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed (the Node.js agent scenarios need node >= 18)"
    if not os.path.exists(AGENT_PKG):
        return "test/node/node_modules is missing: run npm ci --prefix test/node"
    return None


def agent_version():
    with open(AGENT_PKG, encoding="utf-8") as f:
        return json.load(f)["version"]


class NodeFunction:
    """The function: test/node/runtime.js + handler.js + the real agent, run
    by a FakeLambda as its runtime.

        fn = NodeFunction(lam, port, handler="handler.main", env={...})
        fn.start()                         # init: agent start, GET /, /next
        inv = fn.invoke({"spans": 5})      # invoke, wait for both /next, freeze
        fn.records(inv.request_id)         # what the handler recorded
        fn.agent_logs(), fn.agent_trouble()
    """

    def __init__(self, lam, port, handler="handler.main", env=None, log_level="trace"):
        self.lam, self.port, self.handler = lam, port, handler
        self.tmp = tempfile.mkdtemp(prefix="apm-ext-node-")
        self.record_path = os.path.join(self.tmp, "records.jsonl")
        open(self.record_path, "w").close()
        self.env = {
            "_HANDLER": handler,
            "LAMBDA_TASK_ROOT": NODE_DIR,
            "NODE_PATH": NODE_MODULES,        # as Lambda's /opt/nodejs/node_modules
            "NODE_OPTIONS": "-r elastic-apm-node/start",
            "AWS_EXECUTION_ENV": "AWS_Lambda_nodejs20.x",
            "ELASTIC_APM_SERVER_URL": "http://127.0.0.1:%d" % port,
            "ELASTIC_APM_LOG_LEVEL": log_level,
            "APM_TEST_RECORD": self.record_path,
        }
        self.env.update(env or {})
        self.proc = None
        self.t_start = None
        self.t_ready = None

    def setup_error(self):
        """Why this function cannot run here (node or its packages missing), or None."""
        return node_setup_error()

    def start(self, timeout=30):
        err = self.setup_error()
        assert err is None, err
        self.t_start = time.monotonic()
        self.proc = self.lam.start_runtime([shutil.which("node"),
                                            os.path.join(NODE_DIR, "runtime.js")], self.env)

        def ready(lam):
            return len(lam.runtime_next_times) >= 1 or self.proc.poll() is not None
        self.lam.wait_for(ready, timeout, "the Node runtime's first /next")
        assert self.proc.poll() is None, "the Node runtime exited during init (code %s):\n%s" \
            % (self.proc.returncode, self.log_tail())
        self.t_ready = self.lam.runtime_next_times[0]
        return self.t_ready - self.t_start

    def invoke(self, payload=None, timeout_ms=3000, finish=True, freeze=True, timeout=20):
        """One invocation; with finish, wait until the runtime and the
        extension called /next after it (then freeze, like Lambda)."""
        inv = self.lam.invoke(payload=payload or {}, timeout_ms=timeout_ms, timeout=timeout)
        if finish:
            self.finish(inv, freeze=freeze, timeout=timeout)
        return inv

    def finish(self, inv, freeze=True, timeout=20):
        try:
            return self.lam.finish(inv, freeze=freeze, timeout=timeout)
        except AssertionError as e:
            raise AssertionError("%s\n%s" % (e, self.log_tail()))

    def poll(self, pred, timeout, what):
        """Wait until pred() (polled: the runtime's files wake no condition)."""
        end = time.monotonic() + timeout
        while not pred():
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError("timed out waiting for %s (runtime exit code %s)\n%s"
                                     % (what, self.proc.poll(), self.log_tail()))
            with self.lam._cv:
                self.lam._cv.wait(0.02)

    def wait_phase(self, inv, phase, timeout=10):
        """Wait until the handler recorded `phase` for inv."""
        self.poll(lambda: any(r.get("phase") == phase for r in self.records(inv.request_id)),
                  timeout, "the handler to reach phase %r" % phase)

    def wait_exit(self, timeout=15):
        self.lam.wait_for(lambda lam: self.proc.poll() is not None, timeout,
                          "the Node runtime to exit")
        return self.proc.returncode

    # ---- what happened
    def records(self, request_id=None):
        out = []
        with open(self.record_path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    if request_id is None or rec.get("rid") == request_id:
                        out.append(rec)
        return out

    def log_text(self):
        path = self.lam.runtime_log_path
        if not path or not os.path.exists(path):
            return ""
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def agent_logs(self):
        """The agent's JSON log records (ecs-logging lines on stdout)."""
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and "log.level" in rec:
                    out.append(rec)
        return out

    def agent_messages(self, word):
        return [r for r in self.agent_logs() if word in str(r.get("message", ""))]

    def agent_trouble(self):
        """Agent log records that say something went wrong with the APM
        server or the extension: warn and worse, and known debug messages."""
        bad = []
        for r in self.agent_logs():
            level = str(r.get("log.level", "")).lower()
            if level in ("warn", "warning", "error", "fatal") or \
                    AGENT_TROUBLE.search(str(r.get("message", ""))):
                bad.append(r)
        return bad

    def log_tail(self, n=15):
        """The runtime's own lines and the agent's notable ones (not trace/debug)."""
        keep = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    lvl = json.loads(line).get("log.level")
                except ValueError:
                    lvl = None
                if lvl in ("trace", "debug"):
                    if not AGENT_TROUBLE.search(line):
                        continue
            keep.append(line[:400])
        return "    --- Node runtime log (last %d notable lines) ---\n    %s" % (
            n, "\n    ".join(keep[-n:]))

    def close(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


# ------------------------------------------------------------------ matching

class Seen:
    """What the fake APM server accepted, indexed by (kind, id)."""

    def __init__(self, apm):
        self.apm = apm
        self.requests = apm.intake_requests()
        self.by_id = collections.defaultdict(list)   # (kind, id) -> [(obj, request)]
        for r in self.requests:
            if r.status == 202 and r.io_error is None:
                for kind, obj in r.lines:
                    if kind in ("transaction", "span", "error"):
                        self.by_id[(kind, obj.get("id"))].append((obj, r))

    def events(self, kind):
        return [(k, i, lst) for (k, i), lst in self.by_id.items() if k == kind]


def _brief(obj):
    return json.dumps({k: obj.get(k) for k in ("id", "name", "outcome", "result",
                                                 "transaction_id", "parent_id")
                       if k in obj})


def check_requests(seen, version, what="", allow_aborted=False):
    """Every intake request answered 202, valid, and its events behind the
    agent's metadata: the very metadata the agent sends (nodejs <version>,
    service test-fn, its Lambda cloud data), also on the requests the
    extension makes itself (metricsets, reported transactions).
    allow_aborted: an agent request the extension had to abort upstream
    (the agent died in the middle of it) is allowed. Returns the agent's
    metadata."""
    agent_meta = None
    for mine in (True, False):   # the agent's own request, else one of the extension's
        for r in seen.requests:
            if r.lines and r.lines[0][0] == "metadata" and r.status == 202 and \
                    ("apm-agent-nodejs" in (r.headers.get("User-Agent") or "")) == mine:
                agent_meta = r.lines[0][1]
                break
        if agent_meta is not None:
            break
    assert agent_meta is not None, "%sno intake request arrived whole (%d intake " \
        "requests)" % (what, len(seen.requests))
    svc = agent_meta.get("service", {})
    agent = svc.get("agent", {})
    assert agent.get("name") == "nodejs" and agent.get("version") == version, \
        "%sthe agent's metadata names agent %r %r, want nodejs %s" % (
            what, agent.get("name"), agent.get("version"), version)
    assert svc.get("name") == FUNCTION_NAME, "%sservice.name %r" % (what, svc.get("name"))
    cloud = agent_meta.get("cloud", {})
    assert cloud.get("provider") == "aws" and cloud.get("region") and \
        cloud.get("service", {}).get("name") == "lambda", \
        "%sthe agent's metadata lacks its Lambda cloud data: %r" % (what, cloud)
    for r in seen.requests:
        if allow_aborted and r.status is None and r.io_error and \
                "apm-agent-nodejs" in (r.headers.get("User-Agent") or ""):
            continue
        assert r.status == 202 and r.io_error is None, "%sintake request %r answered %s " \
            "(%s; errors %s)" % (what, r, r.status, r.io_error, r.errors[:3])
        assert r.lines and r.lines[0][0] == "metadata", "%s%r: no metadata first" % (what, r)
        assert r.lines[0][1] == agent_meta, "%s%r (User-Agent %r): metadata differs from " \
            "the agent's:\n  %s\n  %s" % (
                what, r, r.headers.get("User-Agent"),
                json.dumps(r.lines[0][1], sort_keys=True)[:600],
                json.dumps(agent_meta, sort_keys=True)[:600])
    return agent_meta


def check_invocation(seen, fn, inv, outcome="success", result="success", coldstart=None,
                     tx_by="agent", by=None, what=None, lost_ok=False):
    """Match one invocation's records id by id against the APM server.

    tx_by "agent": the agent's finished transaction; "extension": the one the
    agent registered, reported by the extension (no span_count, outcome
    failure). by: monotonic time every request carrying the invocation's data
    must have been answered by. lost_ok: spans and errors may be missing
    (the agent died with them), but none may come twice or wrong. Returns
    the transaction event."""
    rid = inv.request_id
    what = what or "invocation %s" % rid[:8]
    recs = fn.records(rid)
    txr = [r for r in recs if r["kind"] == "transaction"]
    assert len(txr) == 1, "%s: the handler recorded %d transactions (did the agent wrap " \
        "it?)\n%s" % (what, len(txr), fn.log_tail())
    txr = txr[0]
    for r in recs:
        if r["kind"] == "stats":
            assert not r["dropped"], "%s: the agent itself dropped %s events (queue full)" \
                % (what, r["dropped"])
    got = seen.by_id.get(("transaction", txr["id"]), [])
    assert got, "%s: transaction %s never arrived (%s)" % (
        what, txr["id"], "the extension should have reported the registered one"
        if tx_by == "extension" else "the agent sent it")
    assert len(got) == 1, "%s: transaction %s arrived %d times: %s" % (
        what, txr["id"], len(got), [_brief(o) for o, _ in got])
    tx, treq = got[0]
    assert tx["trace_id"] == txr["trace_id"], "%s: transaction trace_id %s, recorded %s" % (
        what, tx["trace_id"], txr["trace_id"])
    faas = tx.get("faas") or {}
    assert faas.get("execution") == rid, "%s: faas.execution %r" % (what, faas.get("execution"))
    assert tx.get("outcome") == outcome, "%s: transaction outcome %r, want %r (%s)" % (
        what, tx.get("outcome"), outcome, _brief(tx))
    if result is not None:
        want = result if isinstance(result, (tuple, list)) else (result,)
        assert tx.get("result") in want, "%s: transaction result %r, want %s" % (
            what, tx.get("result"), " or ".join(map(repr, want)))
    if coldstart is not None:
        assert faas.get("coldstart") is coldstart, "%s: faas.coldstart %r, want %r" % (
            what, faas.get("coldstart"), coldstart)
    reqs = {id(treq): treq}
    span_recs = [r for r in recs if r["kind"] == "span"]
    for sr in span_recs:
        lst = seen.by_id.get(("span", sr["id"]), [])
        if lost_ok and not lst:
            continue
        assert lst, "%s: span %s (%s) never arrived (%d of %d spans did)" % (
            what, sr["id"], sr["name"], sum(1 for s in span_recs
                                            if seen.by_id.get(("span", s["id"]))),
            len(span_recs))
        assert len(lst) == 1, "%s: span %s arrived %d times" % (what, sr["id"], len(lst))
        s, sreq = lst[0]
        reqs[id(sreq)] = sreq
        for k in ("trace_id", "parent_id", "transaction_id", "name"):
            assert s.get(k) == sr[k], "%s: span %s %s %r, handler made %r" % (
                what, sr["id"], k, s.get(k), sr[k])
    err_recs = [r for r in recs if r["kind"] == "error"]
    for er in err_recs:
        lst = seen.by_id.get(("error", er["id"]), [])
        if lost_ok and not lst:
            continue
        assert len(lst) == 1, "%s: error %s arrived %d times" % (what, er["id"], len(lst))
        e, ereq = lst[0]
        reqs[id(ereq)] = ereq
        assert e.get("trace_id") == er["trace_id"] and \
            e.get("transaction_id") == er["transaction_id"], \
            "%s: error %s in trace %s transaction %s, handler was in %s %s" % (
                what, er["id"], e.get("trace_id"), e.get("transaction_id"),
                er["trace_id"], er["transaction_id"])
    known = {r["id"] for r in recs if r["kind"] in ("span", "error")}
    for er in (r for r in recs if r["kind"] == "expect_error"):
        match = [(i, lst) for _, i, lst in seen.events("error")
                 if i not in known and lst[0][0].get("transaction_id") == txr["id"]
                 and (lst[0][0].get("exception") or {}).get("message") == er["message"]]
        if er.get("unhandled"):
            assert len(match) <= 1, "%s: the uncaught error arrived %d times" % (
                what, len(match))
        else:
            assert len(match) == 1, "%s: the handler's failure %r arrived as %d error " \
                "events, want 1" % (what, er["message"], len(match))
        for i, lst in match:
            assert len(lst) == 1, "%s: error %s arrived %d times" % (what, i, len(lst))
            known.add(i)
            reqs[id(lst[0][1])] = lst[0][1]
    # nothing else in this transaction: e.g. no span for the runtime's HTTP calls
    for kind in ("span", "error"):
        for _, i, lst in seen.events(kind):
            o = lst[0][0]
            if (o.get("transaction_id") == txr["id"] or o.get("trace_id") == txr["trace_id"]) \
                    and i not in known:
                raise AssertionError("%s: a %s the handler did not make arrived: %s" % (
                    what, kind, json.dumps(o)[:400]))
    if tx_by == "agent":
        sc = tx.get("span_count") or {}
        assert sc.get("started") == len(span_recs) and not sc.get("dropped"), \
            "%s: span_count %r, the handler made %d spans" % (what, sc, len(span_recs))
    if by is not None:
        late = [r for r in reqs.values() if r.t_end > by]
        assert not late, "%s: %d request(s) with its data answered %.3fs after the " \
            "extension's /next (syncflush)" % (what, len(late), max(r.t_end for r in late) - by)
    return tx


def check_nothing_else(seen, fn):
    """Every transaction, span and error at the APM server was recorded by
    the handler (or is an error the agent captured itself), and came once."""
    recs = fn.records()
    tx_ids = {r["id"] for r in recs if r["kind"] == "transaction"}
    traces = {r["trace_id"] for r in recs if r["kind"] == "transaction"}
    ids = {r["id"] for r in recs if r["kind"] in ("transaction", "span", "error")}
    for (kind, i), lst in seen.by_id.items():
        assert len(lst) == 1, "%s %s arrived %d times" % (kind, i, len(lst))
        o = lst[0][0]
        if i in ids:
            continue
        if kind == "error" and (o.get("transaction_id") in tx_ids or
                                o.get("trace_id") in traces):
            continue  # captured by the agent (handler failure); checked per invocation
        raise AssertionError("a %s nobody made arrived: %s" % (kind, json.dumps(o)[:400]))


def check_agent_log(fn, invocations, ended=None, what=""):
    """No trouble in the agent's log; with trace level, each of the
    invocations registered its transaction and each of the `ended` ones (all
    by default) ended with a successful flush signal."""
    ended = invocations if ended is None else ended
    bad = fn.agent_trouble()
    assert not bad, "%sthe agent logged trouble:\n    %s" % (
        what, "\n    ".join(json.dumps(r)[:500] for r in bad[:5]))
    ver = fn.agent_messages("fetched APM Server version")
    assert ver, "%sthe agent never fetched the APM server version (GET / through the " \
        "extension)" % what
    if fn.env.get("ELASTIC_APM_LOG_LEVEL") == "trace":
        n_reg = len(fn.agent_messages("lambdaRegisterTransaction success"))
        n_end = len(fn.agent_messages("_signalLambdaEnd success"))
        assert n_reg == invocations, "%s%d of %d invocations registered their " \
            "transaction with the extension" % (what, n_reg, invocations)
        assert n_end == ended, "%s%d invocations signalled their end (?flushed=true " \
            "answered 202), want %d" % (what, n_end, ended)


def flush_waits_ms(fn):
    """How long the agent waited for the extension's 202 to ?flushed=true,
    per invocation (from its trace log)."""
    return [r.get("durationMs") for r in fn.agent_messages("_signalLambdaEnd success")]


def crash_report(lam, inv, status):
    """What Lambda emits when the runtime dies mid-invocation: runtimeDone
    and report with the failure status (FakeLambda has timeout() but no
    crash())."""
    if inv.t_runtime_done is None:
        lam.runtime_done(inv, status)
    dur = round((inv.t_runtime_done - inv.t_invoke) * 1000, 3)
    lam.emit([{"type": "platform.report", "record": {
        "requestId": inv.request_id, "status": status,
        "metrics": {"durationMs": dur, "billedDurationMs": int(dur) + 1,
                    "memorySizeMB": 128, "maxMemoryUsedMB": 64}}}])


# ------------------------------------------------------------------ scenarios

def run_function(t, fn, func, start=True):
    """func(t, fn), fn started first (start) and closed after; a failed
    assertion carries the tail of the runtime's log."""
    try:
        if start:
            fn.start()
        func(t, fn)
    except AssertionError as e:
        msg = str(e)
        if "Node runtime log" not in msg:
            msg += "\n" + fn.log_tail()
        raise AssertionError(msg).with_traceback(e.__traceback__)
    finally:
        fn.close()


def agent_scenario(name=None, handler="handler.main", node_env=None, log_level="trace",
                   agent_token=True, start=True, **kw):
    """@scenario for a real-agent test: f(t, fn). The extension is started
    (t.start()) and the Node function initialised before f runs. With a
    token for the fake APM server (apm={"token": ..}) the agent gets it too
    (agent_token True: Lambda's environment is shared), or another one
    (agent_token a string: the extension's, e.g. from Secrets Manager, must
    be the one that goes upstream). start=False: f calls fn.start() itself."""
    def deco(func):
        def run(t):
            err = node_setup_error()
            assert err is None, err
            t.start()
            fn = NodeFunction(t.lam, t.port, handler, node_env, log_level)
            if t.apm.token and agent_token is True:
                fn.env["ELASTIC_APM_SECRET_TOKEN"] = t.apm.token  # Lambda's env is shared
            elif isinstance(agent_token, str):
                fn.env["ELASTIC_APM_SECRET_TOKEN"] = agent_token
            run_function(t, fn, func, start)
        run.__name__ = name or func.__name__
        run.__doc__ = func.__doc__
        return scenario(name or func.__name__, **kw)(run)
    return deco


@agent_scenario(apm={"token": "s3cret-token"})
def agent_node_cold_start(t, fn):
    """Cold start: the agent's GET / and /register/transaction answered as it expects."""
    version = agent_version()

    def gets(apm):
        return [r for r in apm.requests if r.method == "GET" and r.path == "/"
                and r.status is not None]
    # The agent does not wait for its GET / before the runtime's first /next.
    t.wait_apm(lambda a: gets(a), "the agent's GET / (server version) at the APM server",
               timeout=5)
    g = gets(t.apm)[0]
    assert g.status == 200, "GET / answered %s upstream" % g.status
    assert g.headers.get("Authorization") == "Bearer s3cret-token", \
        "GET / went upstream with Authorization %r" % g.headers.get("Authorization")
    assert "apm-agent-nodejs/%s" % version in (g.headers.get("User-Agent") or ""), \
        "GET / upstream User-Agent %r" % g.headers.get("User-Agent")
    inv = fn.invoke({"spans": 4, "errors": 1})
    assert inv.status == "success", "invocation status %s: %r" % (inv.status, inv.response)
    seen = Seen(t.apm)
    check_requests(seen, version)
    check_invocation(seen, fn, inv, coldstart=True, by=inv.t_end)
    check_nothing_else(seen, fn)
    for r in seen.requests:
        assert r.headers.get("Authorization") == "Bearer s3cret-token", \
            "%r went upstream with Authorization %r" % (r, r.headers.get("Authorization"))
    t.shutdown_ok()
    check_agent_log(fn, 1)


@agent_scenario(apm={"token": "ext-only-token"}, agent_token="agent-side-token")
def agent_node_warm_invocations(t, fn):
    """Six invocations with freezes between: spans, nested spans, errors, a failing one."""
    version = agent_version()
    plan = [{"spans": 3}, {"spans": 8, "errors": 2}, {"spans": 2, "action": "fail"},
            {"spans": 20}, {"spans": 5, "errors": 1}, {"spans": 1}]
    invs = []
    for i, payload in enumerate(plan):
        inv = fn.invoke(payload)
        invs.append((inv, payload))
        assert t.lam.frozen and t.lam.freezes == i + 1, "sandbox not frozen after %d" % i
        want = "error" if payload.get("action") == "fail" else "success"
        assert inv.status == want, "invocation %d: runtime status %s, want %s (%r)" % (
            i, inv.status, want, inv.response)
        seen = Seen(t.apm)
        failed = payload.get("action") == "fail"
        check_invocation(seen, fn, inv, coldstart=(i == 0),
                         outcome="failure" if failed else "success",
                         result="failure" if failed else "success",
                         by=inv.t_end, what="invocation %d" % i)
    t.shutdown_ok()
    seen = Seen(t.apm)
    check_requests(seen, version)
    for r in t.apm.requests:
        assert r.headers.get("Authorization") == "Bearer ext-only-token", \
            "%r went upstream with Authorization %r (the agent's is not for upstream)" % (
                r, r.headers.get("Authorization"))
    for i, (inv, payload) in enumerate(invs):
        failed = payload.get("action") == "fail"
        check_invocation(seen, fn, inv, outcome="failure" if failed else "success",
                         result="failure" if failed else "success",
                         what="invocation %d after shutdown" % i)
    check_nothing_else(seen, fn)
    check_agent_log(fn, len(plan))


@agent_scenario(handler="handler.callback")
def agent_node_callback_handler(t, fn):
    """A callback-style handler (waits for the empty event loop) is wrapped and delivered."""
    version = agent_version()
    invs = [fn.invoke({"spans": 4, "errors": 1}) for _ in range(3)]
    seen = Seen(t.apm)
    check_requests(seen, version)
    for i, inv in enumerate(invs):
        assert inv.status == "success", "invocation %d: %s %r" % (i, inv.status, inv.response)
        assert b'"style":"callback"' in (inv.response or b""), inv.response
        check_invocation(seen, fn, inv, coldstart=(i == 0), by=inv.t_end,
                         what="invocation %d" % i)
    check_nothing_else(seen, fn)
    t.shutdown_ok()
    check_agent_log(fn, len(invs))


@agent_scenario(log_level="debug", node_env={"ELASTIC_APM_TRANSACTION_MAX_SPANS": "-1"})
def agent_node_large_invocation(t, fn):
    """Thousands of spans (several agent requests, > 1 MB gzip): all there, once, in time."""
    version = agent_version()
    small = fn.invoke({"spans": 2})
    n = 4000
    inv = fn.invoke({"spans": n, "pad": 600, "errors": 2}, timeout_ms=30000, timeout=60)
    assert inv.status == "success", "large invocation: %s %r" % (inv.status, inv.response)
    seen = Seen(t.apm)
    check_requests(seen, version)
    check_invocation(seen, fn, small, coldstart=True, by=small.t_end, what="warm-up")
    tx = check_invocation(seen, fn, inv, coldstart=False, by=inv.t_end,
                          what="large invocation")
    mine = [r for r in seen.requests if any(
        o.get("transaction_id") == tx["id"] or o.get("id") == tx["id"] for _, o in r.lines)]
    body = sum(len(r.body) for r in mine)
    assert len(mine) >= 2 and body > 1_000_000, "the large invocation came in %d " \
        "request(s), %d bytes: too small to test the agent's request cutting" % (
            len(mine), body)
    check_nothing_else(seen, fn)
    t.shutdown_ok()
    check_agent_log(fn, 2)


@agent_scenario()
def agent_node_timeout(t, fn):
    """Sleeps past its deadline: the registered transaction arrives once, outcome failure."""
    version = agent_version()
    first = fn.invoke({"spans": 2})
    inv = fn.invoke({"action": "sleep", "spans": 3, "errors": 1}, timeout_ms=1500,
                    finish=False)
    fn.wait_phase(inv, "sleeping")
    code, t_exit, killed = t.lam.timeout(inv)
    t.shut_down = True
    assert code == 0 and not killed, "extension exit %s, killed=%s after a timeout" % (
        code, killed)
    seen = Seen(t.apm)
    check_requests(seen, version)
    check_invocation(seen, fn, first, coldstart=True, by=first.t_end, what="first invocation")
    tx = check_invocation(seen, fn, inv, outcome="failure", result="timeout", tx_by="extension",
                          by=t_exit, what="timed-out invocation")
    elapsed = (inv.t_runtime_done - inv.t_invoke) * 1000
    assert 1000 <= tx["duration"] <= elapsed + 500, "reported duration %r ms; the " \
        "invocation timed out after %.0f ms" % (tx["duration"], elapsed)
    check_nothing_else(seen, fn)
    check_agent_log(fn, 2, ended=1)


@agent_scenario()
def agent_node_timeout_open_request(t, fn):
    """Hangs with its intake request open (no flush): the registered transaction arrives once."""
    version = agent_version()
    inv = fn.invoke({"action": "sleep", "spans": 400, "pad": 300, "flush": False},
                    timeout_ms=1500, finish=False)
    fn.wait_phase(inv, "sleeping")
    fn.poll(lambda: fn.agent_messages("intake request start"), 1.0,
            "the agent to open its intake request (else this tests nothing)")
    code, t_exit, killed = t.lam.timeout(inv)
    t.shut_down = True
    assert code == 0 and not killed, "extension exit %s, killed=%s after a timeout" % (
        code, killed)
    seen = Seen(t.apm)
    # The agent streams its events as they end (> 50 queued) and never ends
    # that request: the extension can only drop the part it got.
    check_requests(seen, version, allow_aborted=True)
    tx = check_invocation(seen, fn, inv, outcome="failure", result="timeout",
                          tx_by="extension", coldstart=True, by=t_exit, lost_ok=True,
                          what="timed-out invocation")
    treq = seen.by_id[("transaction", tx["id"])][0][1]
    assert treq.t_end - inv.t_runtime_done < 0.5, "the registered transaction went %.3fs " \
        "after runtimeDone(timeout)" % (treq.t_end - inv.t_runtime_done)
    check_nothing_else(seen, fn)
    check_agent_log(fn, 1, ended=0)


@agent_scenario()
def agent_node_crash_exit(t, fn):
    """process.exit(1) mid-invocation: flushed spans arrive; the registered transaction once."""
    version = agent_version()
    first = fn.invoke({"spans": 2})
    inv = fn.invoke({"action": "crash", "spans": 3, "errors": 1}, finish=False)
    code = fn.wait_exit()
    assert code == 1, "runtime exit code %s, want 1" % code
    crash_report(t.lam, inv, "failure")
    code, t_exit, killed = t.lam.shutdown("failure")
    t.shut_down = True
    assert code == 0 and not killed, "extension exit %s, killed=%s after a crash" % (
        code, killed)
    seen = Seen(t.apm)
    check_requests(seen, version)
    check_invocation(seen, fn, first, coldstart=True, by=first.t_end, what="first invocation")
    tx = check_invocation(seen, fn, inv, outcome="failure", result="failure",
                          tx_by="extension", by=t_exit, what="crashed invocation")
    assert tx["duration"] > 0, "reported duration %r" % tx["duration"]
    check_nothing_else(seen, fn)
    check_agent_log(fn, 2, ended=1)


@agent_scenario()
def agent_node_crash_uncaught(t, fn):
    """Uncaught exception: the process dies; the registered transaction arrives once."""
    version = agent_version()
    inv = fn.invoke({"action": "throw", "spans": 2}, finish=False)
    code = fn.wait_exit()
    # Two uncaughtException listeners race: the runtime's posts the error and
    # exits 129, the agent's captures the error, flushes it and exits 1.
    assert code in (1, 129), "runtime exit code %s, want 129 (runtime) or 1 (agent)" % code
    try:  # a POST /error sent just before the exit may still be in the fake's hands
        t.lam.wait_for(lambda lam: inv.t_runtime_done is not None, 0.5, "POST /error")
    except AssertionError:
        pass
    status = inv.status or "failure"   # no /error posted: Runtime.ExitError
    crash_report(t.lam, inv, status)
    code, t_exit, killed = t.lam.shutdown("failure")
    t.shut_down = True
    assert code == 0 and not killed, "extension exit %s, killed=%s after a crash" % (
        code, killed)
    seen = Seen(t.apm)
    check_requests(seen, version, allow_aborted=True)
    check_invocation(seen, fn, inv, outcome="failure", result=status,
                     tx_by="extension", coldstart=True, by=t_exit, what="crashed invocation")
    check_nothing_else(seen, fn)
    check_agent_log(fn, 1, ended=0)


@agent_scenario(env={"ELASTIC_APM_SEND_STRATEGY": "background"})
def agent_node_background(t, fn):
    """background: /next right after INVOKE; every event still arrives once by shutdown."""
    version = agent_version()
    invs = []
    for i in range(4):
        inv = fn.invoke({"spans": 6, "errors": 1 if i % 2 else 0}, finish=False)
        t_next = t.lam.wait_ext_next_after(inv, timeout=5)
        assert t_next - inv.t_delivered < 0.5, "invocation %d: /next %.3fs after INVOKE " \
            "with background" % (i, t_next - inv.t_delivered)
        fn.finish(inv)
        assert inv.status == "success", "invocation %d: %s %r" % (i, inv.status, inv.response)
        invs.append(inv)
    t_exit = t.shutdown_ok()
    seen = Seen(t.apm)
    check_requests(seen, version)
    for i, inv in enumerate(invs):
        check_invocation(seen, fn, inv, coldstart=(i == 0), by=t_exit,
                         what="invocation %d" % i)
    check_nothing_else(seen, fn)
    check_agent_log(fn, len(invs))


@agent_scenario()
def agent_node_thaw_dead_connections(t, fn):
    """Frozen after init and between invocations while the APM server drops idle connections."""
    version = agent_version()
    t.apm.set_mode("close_idle", 0.2)
    t.lam.freeze()                                   # right after init
    with t.lam._cv:
        t.lam._cv.wait(1.0)                          # frozen time: the clock, no work
    invs = []
    for i in range(3):
        inv = fn.invoke({"spans": 4, "errors": 1})
        invs.append(inv)
        assert inv.status == "success", "invocation %d: %s %r" % (i, inv.status, inv.response)
        with t.lam._cv:
            t.lam._cv.wait(0.6)                      # frozen; idle connections die
    t.shutdown_ok()
    seen = Seen(t.apm)
    check_requests(seen, version)
    for i, inv in enumerate(invs):
        check_invocation(seen, fn, inv, coldstart=(i == 0), by=inv.t_end,
                         what="invocation %d" % i)
    assert t.apm.connections_total >= 3, "only %d upstream connections: the idle ones " \
        "were not dropped, the scenario tested nothing" % t.apm.connections_total
    check_nothing_else(seen, fn)
    check_agent_log(fn, len(invs))


@agent_scenario(start=False)
def agent_node_frozen_mid_get(t, fn):
    """Frozen after init with the agent's GET / still on its way: all goes on after the thaw."""
    version = agent_version()
    t.apm.set_mode("slow", 0.5)
    fn.start()
    t.lam.freeze()
    pending = not fn.agent_messages("fetched APM Server version")   # log is synchronous
    with t.lam._cv:
        t.lam._cv.wait(1.5)                          # the APM server answers; all frozen
    t.apm.set_mode("ok")
    inv = fn.invoke({"spans": 3, "errors": 1})
    assert inv.status == "success", "invocation: %s %r" % (inv.status, inv.response)
    inv2 = fn.invoke({"spans": 2})
    t.shutdown_ok()
    assert pending, "the agent had its GET / answer before the freeze: tested nothing"
    seen = Seen(t.apm)
    check_requests(seen, version)
    check_invocation(seen, fn, inv, coldstart=True, by=inv.t_end)
    check_invocation(seen, fn, inv2, coldstart=False, by=inv2.t_end)
    check_nothing_else(seen, fn)
    check_agent_log(fn, 2)


@agent_scenario(telemetry=False)
def agent_node_crash_no_telemetry(t, fn):
    """Crash without the Telemetry API: SHUTDOWN(failure) alone makes the extension report it."""
    version = agent_version()
    inv = fn.invoke({"action": "crash", "spans": 2}, timeout_ms=2000, finish=False)
    assert fn.wait_exit() == 1, "runtime exit code %s, want 1" % fn.proc.returncode
    code, t_exit, killed = t.lam.shutdown("failure")
    t.shut_down = True
    assert code == 0 and not killed, "extension exit %s, killed=%s after a crash" % (
        code, killed)
    seen = Seen(t.apm)
    check_requests(seen, version)
    check_invocation(seen, fn, inv, outcome="failure", result="failure", tx_by="extension",
                     coldstart=True, by=t_exit, what="crashed invocation")
    check_nothing_else(seen, fn)
    check_agent_log(fn, 1, ended=0)


# ------------------------------------------------------------------ timing
#
# Lambda's real timing conditions with the real agent (issue "Lambda's real
# timing"; test/e2e/e2e_timing.py has the same conditions with a simulated
# agent). Default timings unless a scenario says otherwise: a 3 s function
# timeout, ELASTIC_APM_DATA_FORWARDER_TIMEOUT unset (3 s). FakeLambda flags
# a /next after an invocation's deadline in every scenario; these check it
# themselves as well, so that the failure names the invocation.

TIMING_TIMEOUT_MS = 3000      # Lambda's default function timeout
TIMING_WORK_MS = 800          # what the handler works before it returns
TIMING_STALL_S = 10.0         # the stalling APM server answers after this
TIMING_NOT_HELD_S = 0.5       # /next this soon after the end = not held
TIMING_RECOVERY_S = 25.0      # the kept data must be out this soon after recovery


def timing_deadline(inv, t_next, what, problems):
    """The /next ending inv must come before its deadline (the fake's
    clock and margin)."""
    if t_next >= inv.t_deadline - DEADLINE_MARGIN_MS / 1000.0:
        problems.append("%s: /next %.0f ms after the deadline (%.0f ms after INVOKE, "
                        "function timeout %d ms)" % (
                            what, (t_next - inv.t_deadline) * 1000,
                            (t_next - inv.t_invoke) * 1000, inv.timeout_ms))


def timing_report(problems):
    assert not problems, "; ".join(problems)


class _OnlyRequests:
    """An APM server view for Seen that holds only the intake requests
    keep(r) accepts."""

    def __init__(self, apm, keep):
        self.apm, self.keep = apm, keep

    def intake_requests(self):
        return [r for r in self.apm.intake_requests() if self.keep(r)]


def server_info_answered(apm):
    return [r for r in apm.requests if r.method == "GET" and r.path == "/"
            and r.status is not None]


@agent_scenario(env={"ELASTIC_APM_DATA_FORWARDER_TIMEOUT": None})
def agent_node_timing_stalling_server(t, fn):
    """APM server answering after 10 s: /next before the deadline, not held, all kept, once.

    Default timings, a handler that works 0.8 s: every /next before the
    deadline; after the first delivery timed out the invocations are not
    held; once the server is back, later invocations deliver everything
    kept, each id once."""
    version = agent_version()
    # the agent's GET / (server version, at init) answered before the stall
    t.wait_apm(server_info_answered, "the agent's GET / at the APM server", timeout=5)
    t_stall = time.monotonic()
    t.apm.set_mode("slow", TIMING_STALL_S)
    problems, invs = [], []
    work = {"spans": 3, "errors": 1, "delay_ms": TIMING_WORK_MS}
    for i in range(3):
        inv = fn.invoke(work, timeout_ms=TIMING_TIMEOUT_MS, timeout=15)
        invs.append(inv)
        assert inv.status == "success", "invocation %d: %s %r" % (i + 1, inv.status,
                                                                   inv.response)
        timing_deadline(inv, inv.t_end, "invocation %d" % (i + 1), problems)
        if i > 0:
            # the end: the runtime's answer, which comes after the agent's
            # ?flushed=true was answered
            held = inv.t_end - inv.t_runtime_done
            if held >= TIMING_NOT_HELD_S:
                problems.append("invocation %d: /next held %.0f ms after the end of the "
                                "invocation (the APM server did not answer the first "
                                "delivery within the 3 s forwarder timeout: it is failing, "
                                "/next must come at once and the data be kept)" % (
                                    i + 1, held * 1000))
    # The server is back; later invocations (thawed sandboxes) deliver what
    # was kept, retried with backoff. Requests that went out during the
    # stall are answered after 10 s, long after the extension gave up on
    # them (3 s): left out of the count, their data must come again.
    t_back = time.monotonic()
    t.apm.set_mode("ok")

    def answered_to_extension(r):
        return not (t_stall <= r.t_start < t_back)

    def kept_delivered():
        seen = Seen(_OnlyRequests(t.apm, answered_to_extension))
        return all(seen.by_id.get(("transaction", r["id"]))
                   for r in fn.records() if r["kind"] == "transaction")
    # Retries back off (min(n-1,6)^2 s): after the few failures of a 5 s
    # stall the kept data goes out within some 10 s of invocations.
    more = 0
    while not kept_delivered() and time.monotonic() - t_back < TIMING_RECOVERY_S:
        inv = fn.invoke({"spans": 2, "delay_ms": TIMING_WORK_MS},
                        timeout_ms=TIMING_TIMEOUT_MS, timeout=15)
        invs.append(inv)
        more += 1
        timing_deadline(inv, inv.t_end, "invocation %d (server back)" % len(invs), problems)
    delivered_before_shutdown = kept_delivered()
    t.shutdown_ok()
    if not delivered_before_shutdown:
        problems.append("%d invocations in the %.0f s after the APM server came back, and "
                        "the transactions of the stalled invocations were still not "
                        "delivered (the data must be kept and retried)" % (
                            more, TIMING_RECOVERY_S))
    timing_report(problems)
    seen = Seen(_OnlyRequests(t.apm, answered_to_extension))
    check_requests(seen, version)
    for i, inv in enumerate(invs):
        check_invocation(seen, fn, inv, coldstart=(i == 0), what="invocation %d" % (i + 1))
    check_nothing_else(seen, fn)
    check_agent_log(fn, len(invs))


# Lambda's capture of the function's stdout, for the lines
# test/node/timing_handler.js prints.
TIMING_LINE = re.compile(r"agent-node-timing line (\d+) (first|last) of ([0-9a-f-]+)$")


class FunctionLogCapture:
    """Plays Lambda's capture of the function's output: tails the runtime's
    log and hands every line timing_handler.js prints to FakeLambda as a
    "function" telemetry record, then acknowledges it (the handler waits for
    that, so that the line is in the stream before the runtime answers, as
    with Lambda). .lines: one dict per line (text, n, which, rid, t, and
    `invocations`: how many invocations the fake had started then)."""

    def __init__(self, lam, ack_dir):
        self.lam, self.ack_dir = lam, ack_dir
        self.lines, self.error = [], None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-capture", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(5)

    def _run(self):
        pos, buf = 0, b""
        try:
            while not self._stop.is_set():
                path = self.lam.runtime_log_path
                if path and os.path.exists(path):
                    with open(path, "rb") as f:
                        f.seek(pos)
                        data = f.read()
                    pos += len(data)
                    buf += data
                    *whole, buf = buf.split(b"\n")
                    for raw in whole:
                        self._line(raw.decode("utf-8", "replace"))
                self._stop.wait(0.003)   # polling a file: nothing to wait on
        except Exception as e:  # reported by the scenario
            self.error = "%s: %s" % (type(e).__name__, e)

    def _line(self, text):
        m = TIMING_LINE.search(text)
        if not m:
            return
        with self.lam._cv:
            n_inv = len(self.lam.invocations)
        self.lam.log_line(text + "\n")
        self.lines.append({"text": text, "n": int(m.group(1)), "which": m.group(2),
                           "rid": m.group(3), "t": time.monotonic(), "invocations": n_inv})
        open(os.path.join(self.ack_dir, "%s.%s" % (m.group(3), m.group(2))), "w").close()


@agent_scenario(handler="timing_handler.logged", telemetry="late", start=False)
def agent_node_timing_late_telemetry(t, fn):
    """Late telemetry: each function log line carries the ids of the invocation that printed it.

    Invocation N's log lines, runtimeDone and report arrive after INVOKE
    N+1 and N+1's /register/transaction: each log event carries the
    faas.execution, trace.id and transaction.id of the invocation whose
    handler printed the line, as its agent delivered its transaction."""
    version = agent_version()
    ack_dir = os.path.join(fn.tmp, "log-ack")
    os.mkdir(ack_dir)
    fn.env["APM_TEST_LOG_ACK"] = ack_dir
    capture = FunctionLogCapture(t.lam, ack_dir).start()
    try:
        fn.start()
        t.lam.hold_telemetry()             # nothing before the agent registered
        invs = []
        for i in range(3):
            inv = fn.invoke({"n": i + 1, "spans": 3, "delay_ms": 50}, finish=False)
            invs.append(inv)
            fn.poll(lambda: len(fn.agent_messages("lambdaRegisterTransaction success")) > i,
                    5, "the agent to register invocation %d's transaction" % (i + 1))
            # now invocation N-1's tail and N's platform.start, in stream order
            t.lam.release_telemetry()
            t.lam.wait_telemetry_idle()
            # this invocation's lines, runtimeDone and report: after INVOKE
            # N+1 and its registration
            t.lam.hold_telemetry()
            fn.finish(inv)
            assert inv.status == "success", "invocation %d: %s %r" % (i + 1, inv.status,
                                                                       inv.response)
        t.shutdown_ok()                    # releases the last tail
    finally:
        capture.stop()
    assert capture.error is None, "log capture failed: %s" % capture.error
    # the test bed did what it says: both lines of each invocation went into
    # the stream while it ran, before its runtimeDone
    for n, inv in enumerate(invs, 1):
        mine = [c for c in capture.lines if c["rid"] == inv.request_id]
        assert sorted(c["which"] for c in mine) == ["first", "last"], \
            "setup: invocation %d printed %r" % (n, [c["text"] for c in mine])
        for c in mine:
            assert c["n"] == n and c["invocations"] == n and c["t"] < inv.t_runtime_done, \
                "setup: the %s line of invocation %d reached the fake out of order" % (
                    c["which"], n)

    seen = Seen(t.apm)
    check_requests(seen, version)
    txs = [check_invocation(seen, fn, inv, coldstart=(n == 0), by=inv.t_end,
                            what="invocation %d" % (n + 1)) for n, inv in enumerate(invs)]
    check_nothing_else(seen, fn)
    check_agent_log(fn, len(invs))

    def whose(value):
        for k, (inv, tx) in enumerate(zip(invs, txs), 1):
            if value in (inv.request_id, tx["id"], tx["trace_id"]):
                return "invocation %d's" % k
        return repr(value)
    problems = []
    logs = t.apm.events("log")
    for n, (inv, tx) in enumerate(zip(invs, txs), 1):
        for c in (c for c in capture.lines if c["rid"] == inv.request_id):
            got = [o for o in logs if o.get("message") == c["text"]]
            what = "invocation %d's %s line" % (n, c["which"])
            if len(got) != 1:
                problems.append("%s: %d log events, want 1" % (what, len(got)))
                continue
            o = got[0]
            for key, have, want in (
                    ("faas.execution", (o.get("faas") or {}).get("execution"),
                     inv.request_id),
                    ("trace.id", o.get("trace.id"), tx["trace_id"]),
                    ("transaction.id", o.get("transaction.id"), tx["id"])):
                if have != want:
                    problems.append("%s: %s is %s, want invocation %d's" % (
                        what, key, whose(have), n))
    timing_report(problems)


def partial_intake_requests(apm):
    """Intake requests that reached the APM server without a whole, valid
    body: the client went away mid-body (io_error), never answered, or what
    arrived does not decode / validate."""
    return [r for r in apm.intake_requests()
            if r.io_error is not None or r.status is None or r.errors]


def timing_timeout_mid_request(t, fn, spans, pad, streamed=False):
    """Invocation 1 ends normally; invocation 2's handler makes `spans`
    spans (`pad` bytes of label each), then sleeps past its 3 s timeout
    with the agent's intake request open (no flush: the agent streams its
    events into the request as they end). Returns the bytes of that body
    the extension says it had when the agent went away (None if it does
    not say). streamed: the body had passed one queue block (32 KiB), so its
    upstream request had started: it is cut off (aborted, logged once at warn)
    instead of never reaching the server."""
    version = agent_version()
    first = fn.invoke({"spans": 2})
    inv = fn.invoke({"action": "sleep", "spans": spans, "pad": pad, "flush": False},
                    timeout_ms=TIMING_TIMEOUT_MS, finish=False)
    fn.wait_phase(inv, "sleeping")
    fn.poll(lambda: len(fn.agent_messages("intake request start")) >= 2, 1.0,
            "the agent to open its intake request for the timed-out invocation")
    code, t_exit, killed = t.lam.timeout(inv)
    t.shut_down = True
    assert code == 0 and not killed, "extension exit %s, killed=%s after a timeout" % (
        code, killed)
    got = [int(m.group(1)) for m in re.finditer(r"agent request broke off after (\d+) bytes",
                                                t.lam.ext_log_text())]
    assert not got or max(got) > 0, "setup: the agent had sent no body bytes when the " \
        "function timed out (the extension says %r): this tests nothing" % got
    bad = partial_intake_requests(t.apm)
    if streamed:
        warns = [ln for ln in t.lam.ext_logs() if ln.get("level") == "warn" and
                 "request to the APM server is cut off" in ln.get("msg", "")]
        assert len(warns) == 1, "a streamed body cut by the timeout: want one warn line " \
            "saying its upstream request is cut off, got %d" % len(warns)
        assert len(bad) <= 1, "more than one cut request at the APM server: %r" % bad
        bad = []
    assert not bad, "%d cut or partial intake request(s) reached the APM server (the " \
        "extension had %s bytes of the agent's open request): %s" % (
            len(bad), max(got) if got else "?", "; ".join(
                "%r (User-Agent %r) io_error=%r errors=%r body=%d bytes" % (
                    r, r.headers.get("User-Agent"), r.io_error, r.errors[:2], len(r.body))
                for r in bad[:3]))
    seen = Seen(t.apm)
    check_requests(seen, version, allow_aborted=streamed)
    check_invocation(seen, fn, first, coldstart=True, by=first.t_end, what="first invocation")
    check_invocation(seen, fn, inv, outcome="failure", result="timeout", tx_by="extension",
                     by=t_exit, lost_ok=True, what="timed-out invocation")
    check_nothing_else(seen, fn)
    check_agent_log(fn, 2, ended=1)
    return max(got) if got else None


@agent_scenario(env={"ELASTIC_APM_DATA_FORWARDER_TIMEOUT": None})
def agent_node_timing_timeout_mid_request(t, fn):
    """Timeout with ~13 KB of an open agent request: no cut request upstream; proxy tx once.

    The handler makes 120 spans, then exceeds its 3 s timeout while the
    agent's intake request is open with part of its body sent (about 13 KB
    of gzip): no cut or partial intake request reaches the APM server; the
    registered transaction arrives once, outcome failure, result timeout."""
    timing_timeout_mid_request(t, fn, spans=120, pad=200)


@agent_scenario(env={"ELASTIC_APM_DATA_FORWARDER_TIMEOUT": None})
def agent_node_timing_timeout_mid_request_large(t, fn):
    """Timeout with ~75 KB of an open agent request: streamed, so cut off once, logged.

    The same with 400 spans of 300 bytes each: the agent has sent about
    75 KB of its open request (more than one 32 KiB queue block) when the
    function times out. A body that big streams upstream as it arrives
    (the upload overlaps the function's work), so the timeout cuts that one
    request off: one warn line says so; the registered transaction still
    arrives once."""
    n = timing_timeout_mid_request(t, fn, spans=400, pad=300, streamed=True)
    assert n is None or n > 32768, "setup: only %d bytes of the open request" % n
