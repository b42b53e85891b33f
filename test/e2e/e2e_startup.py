"""End-to-end scenarios for start-up: the Extensions API, the settings, the listeners.

    python3 test/e2e/e2e.py -k startup_

What they rely on from the extension (test/SPEC-FOR-TESTS.md, README):
  - AWS_LAMBDA_RUNTIME_API missing, malformed, or a name that does not resolve:
    one error line naming the variable (or the name), exit 1, nothing registered.
  - register not answered 200 with a Lambda-Extension-Identifier (the connection
    refused or closed, an answer that is no HTTP, a 500, no identifier): one error
    line, exit 1, no /event/next.
  - the telemetry subscription failing at the socket (the connection closed or
    reset): an info line "Telemetry API not available (status -1)", and the
    extension carries on (a new connection for /event/next, invocations served).
  - a bad ELASTIC_APM_LOG_LEVEL / ELASTIC_APM_SEND_STRATEGY: a warning naming the
    variable and the default used; ELASTIC_APM_LOG_LEVEL=warning is warn.
  - ELASTIC_APM_LAMBDA_APM_SERVER not an http(s) URL: one error line, agents
    answered 202, nothing sent, invocations not held.
  - a listener port taken: telemetry's is a warning; 127.0.0.1's intake port an
    error (the ::1 one still serves agents).
  - SIGTERM: flushes what it holds, exits 0.
FakeLambda.register_fault / subscribe_fault (test/fakes/fake_lambda.py) make the
misbehaving Extensions API. Waits are on conditions or process exit, with timeouts.
"""

import json
import os
import signal
import socket
import subprocess
import time

from e2e import (scenario, Skip, agent_send, agent_flush, agent_payload, first_delivery,
                 free_port)

EXIT_TIMEOUT = 10      # a failing start-up exits well within this
NOT_HELD_S = 1.5       # /next this soon after the end of an invocation = not held


def base_env(t, env=None):
    """The environment t.start() would give, plus env (None removes)."""
    e = {"ELASTIC_APM_LAMBDA_APM_SERVER": t.apm.url,
         "ELASTIC_APM_DATA_RECEIVER_SERVER_PORT": str(t.port),
         "APM_EXT_TELEMETRY_PORT": str(t.tport),
         "APM_EXT_OTLP_PORT": str(t.oport),
         "ELASTIC_APM_LOG_LEVEL": "debug"}
    e.update(env or {})
    return e


def start_to_exit(t, env=None):
    """Start the extension through FakeLambda; wait for it to exit; its code."""
    proc = t.lam.start_extension(t.binary, base_env(t, env))
    try:
        return proc.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError("the extension still runs %ds after a failed start-up"
                             % EXIT_TIMEOUT)


def lines_at(logs, levels, *words):
    return [r for r in logs if str(r.get("level", "")).lower() in levels
            and all(w in str(r.get("msg", "")) for w in words)]


ERR = ("error", "critical", "fatal")
WARN = ("warn", "warning")


def assert_one_error(logs, *words):
    errs = lines_at(logs, ERR)
    hit = lines_at(logs, ERR, *words)
    assert len(hit) == 1 and len(errs) == 1, "want one error line naming %r, got %r" % (
        words, [r.get("msg") for r in errs][:4])
    return hit[0]


def assert_failed_start(t, code, *words):
    """Exit 1, one error line with words, no /next, no listener left."""
    assert code == 1, "exit %s after a failed start-up, want 1" % code
    assert_one_error(t.logs(), *words)
    assert not t.lam.ext_next_times, "/event/next called after a failed register"


def one_invocation_delivered(t, what):
    """An invocation whose transaction reaches the APM server before /next."""
    lines, tx = agent_payload()
    inv, t_flush, t_next, sent = t.sync_invocation([lines])
    req = first_delivery(t.apm, tx)
    assert req is not None and req.t_end <= t_next, \
        "%s: transaction not delivered before /next" % what
    return t_flush, t_next


# --------------------------------------------------------------- AWS_LAMBDA_RUNTIME_API

@scenario(auto_shutdown=False)
def startup_runtime_api_missing_or_malformed(t):
    """AWS_LAMBDA_RUNTIME_API absent, without a port, with a bad port: exit 1, one error."""
    for api in (None, "127.0.0.1", "127.0.0.1:http", "127.0.0.1:65536",
                "[::1]:%d" % t.lam.port):
        env = dict(os.environ)
        env.pop("AWS_LAMBDA_RUNTIME_API", None)
        env.update(base_env(t))
        if api is not None:
            env["AWS_LAMBDA_RUNTIME_API"] = api
        r = subprocess.run([t.binary], env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=EXIT_TIMEOUT)
        logs = [json.loads(ln) for ln in r.stderr.decode().splitlines() if ln.strip()]
        if api and api.startswith("[::1]"):
            # numeric IPv6: accepted; nobody answers there (the fake is on 127.0.0.1)
            assert r.returncode == 1, "%r: exit %s, want 1" % (api, r.returncode)
            assert_one_error(logs, "register with the Extensions API failed (status -1)")
            continue
        assert r.returncode == 1, "AWS_LAMBDA_RUNTIME_API=%r: exit %s, want 1" % (
            api, r.returncode)
        assert_one_error(logs, "AWS_LAMBDA_RUNTIME_API is missing or malformed")
    assert t.lam.t_register is None, "registered although every address was bad"


@scenario(auto_shutdown=False)
def startup_register_refused(t):
    """Nobody listens at AWS_LAMBDA_RUNTIME_API: register fails (status -1), exit 1."""
    code = start_to_exit(t, {"AWS_LAMBDA_RUNTIME_API": "127.0.0.1:%d" % free_port()})
    assert_failed_start(t, code, "register with the Extensions API failed (status -1)")


def _register_fault(fault, words, doc):
    def f(t):
        t.lam.register_fault = fault
        code = start_to_exit(t)
        assert_failed_start(t, code, *words)
        assert t.lam.subscription is None and not t.lam.subscribe_attempts, \
            "subscribed after a failed register"
    f.__doc__ = doc
    scenario("startup_register_" + fault, auto_shutdown=False)(f)


_register_fault("close", ("register with the Extensions API failed (status -1)",),
                "Register: the connection closed without an answer: status -1, exit 1.")
_register_fault("garbage", ("register with the Extensions API failed (status -1)",),
                "Register answered with no HTTP status line: status -1, exit 1.")
_register_fault("status", ("register with the Extensions API failed (status 500)",),
                "Register answered 500: the status logged, exit 1.")
_register_fault("no_id", ("register answer has no Lambda-Extension-Identifier",),
                "Register answered 200 without Lambda-Extension-Identifier: exit 1.")
_register_fault("long_id", ("register answer has no Lambda-Extension-Identifier",),
                "Register answered 200 with a 200-character identifier (no room): exit 1.")


@scenario()
def startup_subscribe_connection_closed(t):
    """The Telemetry API PUT gets no answer (closed): info line, status -1; carries on."""
    t.lam.subscribe_fault = "close"
    t.start()
    assert [a[0] for a in t.lam.subscribe_attempts] == [None], t.lam.subscribe_attempts
    assert t.lam.subscription is None
    assert lines_at(t.logs(), ("info",), "Telemetry API not available (status -1)"), \
        "no info line for the failed subscription"
    assert not lines_at(t.logs(), ERR), "an error line for a failed subscription"
    one_invocation_delivered(t, "after a failed subscription")


@scenario()
def startup_register_connection_reset(t):
    """Register answered, then the connection reset: subscribe fails (-1); /next on a new one."""
    t.lam.register_fault = "reset_after"
    t.start()
    assert not t.lam.subscribe_attempts, "a PUT reached the fake over a reset connection?"
    assert lines_at(t.logs(), ("info",), "Telemetry API not available (status -1)"), \
        "no info line for the subscription on a reset connection"
    one_invocation_delivered(t, "after a reset connection")


@scenario(auto_shutdown=False)
def startup_api_name_unresolvable(t):
    """AWS_LAMBDA_RUNTIME_API names a host nobody knows: 'cannot resolve', exit 1."""
    from e2e_dns import DnsBed
    with DnsBed(t, {"other.example.test": ["127.0.0.1"]}) as bed:
        name = "lambda-api.example.test"
        proc = t.lam.start_extension(bed.wrapper, base_env(
            t, {"AWS_LAMBDA_RUNTIME_API": "%s:%d" % (name, t.lam.port)}))
        code = proc.wait(timeout=EXIT_TIMEOUT)
        assert code == 1, "exit %s, want 1" % code
        logs = t.logs()
        assert lines_at(logs, ERR, "cannot resolve " + name), \
            "no error line naming %s: %r" % (name, [r.get("msg") for r in logs][:4])
        errs = [r.get("msg") for r in lines_at(logs, ERR)]
        assert len(errs) == 2 and "AWS_LAMBDA_RUNTIME_API is missing or malformed" in \
            errs[1], "want the resolver's error, then AWS_LAMBDA_RUNTIME_API's: %r" % errs
        assert t.lam.t_register is None


@scenario()
def startup_api_by_name(t):
    """AWS_LAMBDA_RUNTIME_API by a name in /etc/hosts: registers there and works."""
    from e2e_dns import DnsBed
    name = "lambda-api.example.test"
    with DnsBed(t, {}, hosts=["127.0.0.1\t" + name]) as bed:
        t.binary, real = bed.wrapper, t.binary
        try:
            t.start({"AWS_LAMBDA_RUNTIME_API": "%s:%d" % (name, t.lam.port)})
        finally:
            t.binary = real
        one_invocation_delivered(t, "with the Extensions API by name")
        t.shutdown_ok()
        assert not bed.name_queries(name), "asked the DNS for a name in /etc/hosts"


# --------------------------------------------------------------- settings

@scenario(env={"ELASTIC_APM_LOG_LEVEL": "Warning", "ELASTIC_APM_SEND_STRATEGY": "sometimes"})
def startup_log_level_warning_bad_strategy(t):
    """LOG_LEVEL=Warning is warn; a bad SEND_STRATEGY warns and means syncflush."""
    t.start()
    one_invocation_delivered(t, "syncflush by default")
    t.shutdown_ok()
    logs = t.logs()
    w = lines_at(logs, WARN, "ELASTIC_APM_SEND_STRATEGY", "sometimes",
                 "using the default syncflush")
    assert len(w) == 1, "want one warning for the bad strategy: %r" % logs[:4]
    low = [r for r in logs if str(r.get("level", "")).lower() in ("info", "debug", "trace")]
    assert not low, "info/debug lines at log level warning: %r" % low[:3]


@scenario(env={"ELASTIC_APM_LOG_LEVEL": "loud"})
def startup_log_level_unknown(t):
    """LOG_LEVEL=loud: a warning naming it, the default info (no debug lines)."""
    t.start()
    one_invocation_delivered(t, "with an unknown log level")
    t.shutdown_ok()
    logs = t.logs()
    assert lines_at(logs, WARN, "ELASTIC_APM_LOG_LEVEL", "loud", "using the default info"), \
        "no warning for ELASTIC_APM_LOG_LEVEL=loud: %r" % logs[:4]
    dbg = [r for r in logs if str(r.get("level", "")).lower() in ("debug", "trace")]
    assert not dbg, "debug lines at the default level info: %r" % dbg[:3]


@scenario(env={"ELASTIC_APM_LAMBDA_APM_SERVER": "ftp://apm.example.test:8200"})
def startup_server_url_not_http(t):
    """An ftp:// server URL: one error naming it; agents get 202; nothing sent; not held."""
    t.start()
    assert_one_error(t.logs(), 'ELASTIC_APM_LAMBDA_APM_SERVER="ftp://apm.example.test:8200"',
                     "is not an http(s) URL")
    inv = t.lam.invoke()
    lines, tx = agent_payload(inv)
    assert agent_send(t.port, lines) == 202, "agent POST with a bad server URL"
    t_flush = time.monotonic()
    assert agent_flush(t.port) == 202
    t.lam.runtime_done(inv)
    t_next = t.lam.finish(inv)
    assert t_next - t_flush < NOT_HELD_S, "/next held %.3fs with no server to send to" % (
        t_next - t_flush)
    t.shutdown_ok()
    assert not t.apm.requests, "the fake APM server was contacted"
    assert_one_error(t.logs(), "ELASTIC_APM_LAMBDA_APM_SERVER")


# --------------------------------------------------------------- listeners

def hold_port(host, port, family=socket.AF_INET):
    """Bind host:port (no SO_REUSEADDR, not listening): nobody else may bind it."""
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, port))
    return s


@scenario(telemetry=False)
def startup_telemetry_port_taken(t):
    """Telemetry's port taken: a warning naming it; agents still served and delivered."""
    with hold_port("0.0.0.0", t.tport):
        t.start()
        w = lines_at(t.logs(), WARN, "cannot listen for telemetry on port %d" % t.tport)
        assert len(w) == 1, "want one warning for the taken telemetry port: %r" % t.logs()[:5]
        one_invocation_delivered(t, "without a telemetry listener")


@scenario()
def startup_intake_port_taken_v4(t):
    """127.0.0.1's intake port taken: one error naming it; ::1 still serves agents."""
    try:
        with socket.socket(socket.AF_INET6) as s6:
            s6.bind(("::1", t.port))
    except OSError as e:
        raise Skip("no ::1 here (or its port is taken): %s" % e)
    with hold_port("127.0.0.1", t.port):
        t.start(wait_init=False)
        t.lam.wait_init_done()
        assert_one_error(t.logs(), "cannot listen on 127.0.0.1:%d" % t.port,
                         "agents cannot send data")
        inv = t.lam.invoke()
        lines, tx = agent_payload(inv)
        assert agent_send(t.port, lines, host="::1") == 202, "::1 not served"
        st = agent_send(t.port, [], encoding="identity", flushed=True, host="::1")
        assert st == 202, "flush on ::1 answered %s" % st.status
        t.lam.runtime_done(inv)
        t_next = t.lam.finish(inv)
        req = first_delivery(t.apm, tx)
        assert req is not None and req.t_end <= t_next, "not delivered from ::1"
        t.shutdown_ok()


# --------------------------------------------------------------- signals

@scenario(env={"ELASTIC_APM_SEND_STRATEGY": "background"})
def startup_sigterm_flushes_and_exits(t):
    """SIGTERM mid-invocation: a line saying so, what it holds delivered, exit 0."""
    proc = t.start()
    inv = t.lam.invoke()
    t.lam.wait_delivered(inv)
    lines, tx = agent_payload(inv)
    assert agent_send(t.port, lines) == 202
    os.kill(proc.pid, signal.SIGTERM)
    try:
        code = proc.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError("still running %ds after SIGTERM" % EXIT_TIMEOUT)
    assert code == 0, "exit %s after SIGTERM, want 0" % code
    assert lines_at(t.logs(), ("info",), "SIGTERM"), "no line about SIGTERM"
    assert first_delivery(t.apm, tx) is not None, "held data not delivered on SIGTERM"


# --------------------------------------------------------------- memory

@scenario(auto_shutdown=False, env={"APM_EXT_QUEUE_BYTES": str(1 << 32)})
def startup_arena_refused(t):
    """The buffers' mapping refused (a 4 GiB queue under a 1 GiB address-space limit):
    one error naming the size, exit 1, after register (init does not hang)."""
    import resource
    import tempfile
    with open(t.binary, "rb") as f:
        image = f.read()
    if b"__asan_" in image or os.environ.get("APM_E2E_UNDER_VALGRIND") or \
            image[:2] == b"#!":
        raise Skip("an address-space limit needs the plain binary (ASan and valgrind "
                   "reserve more than the limit themselves)")
    d = tempfile.mkdtemp(prefix="e2e-arena-")
    link = os.path.join(d, "apm-lambda-extension")
    os.symlink(os.path.abspath(t.binary), link)
    env = t.lam._merge(t.lam._lambda_env(), base_env(t, t.sc.env))
    limit = 1 << 30

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        r = subprocess.run([link], env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           preexec_fn=cap, timeout=EXIT_TIMEOUT)
    finally:
        os.unlink(link)
        os.rmdir(d)
    logs = [json.loads(ln) for ln in r.stderr.decode().splitlines() if ln.strip()]
    assert r.returncode == 1, "exit %s with the arena refused, want 1 (log %r)" % (
        r.returncode, logs[-3:])
    hit = assert_one_error(logs, "cannot reserve")
    size = int(hit["msg"].split()[2])
    assert size > 1 << 32, "the reservation named %d bytes, want the 4 GiB queue and more" \
        % size
    assert t.lam.t_register is not None, "exited before registering"
