"""Secrets (bench.py --only secrets): cold starts with the secret token from
the fake Secrets Manager (test/fakes/fake_aws.py in its own process: it checks
SigV4, serves TLS with the test CA's certificate;
ELASTIC_APM_LAMBDA_AWS_ENDPOINT, AWS_ACCESS_KEY_ID/SECRET/SESSION_TOKEN set)
vs with ELASTIC_APM_SECRET_TOKEN, alternating; the fetch's CPU = the
difference of the medians (issue #15: <= 3000 us). The fake reports each
call's times in its monotonic clock, mapped to ours; "exec -> GetSecretValue
answered" is its answer's write.
"""

import gc
import json
import os
import sys
import time
import uuid

from common import FAKES, REGION, BenchError, diff_text, row, start_server, stats, us
from harness import Lambda, finish

SM_FETCH_CPU_US = 3000     # issue #15: the Secrets Manager fetch
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


def start_aws(ctx):
    """The fake AWS (test/fakes/fake_aws.py) in a process of its own, so that its
    threads stay out of ours; returns its port. It prints one JSON line
    per call (see AWS_CHILD) on ctx.aws.stdout; ctx.close() stops it."""
    if ctx.aws is None:
        c = ctx.certs()
        ctx.aws_creds = {"AWS_ACCESS_KEY_ID": "ASIABENCH" + uuid.uuid4().hex[:11].upper(),
                         "AWS_SECRET_ACCESS_KEY": uuid.uuid4().hex + uuid.uuid4().hex[:8],
                         "AWS_SESSION_TOKEN": "IQoJb3JpZ2luX2VjE" + uuid.uuid4().hex * 4}
        ctx.aws, ctx.aws_port = start_server(
            [sys.executable, "-c", AWS_CHILD, FAKES, c["cert"], c["key"],
             ctx.aws_creds["AWS_ACCESS_KEY_ID"], ctx.aws_creds["AWS_SECRET_ACCESS_KEY"],
             ctx.aws_creds["AWS_SESSION_TOKEN"], REGION, SECRET_ID, SECRET_TOKEN],
            "the fake AWS")
        os.set_blocking(ctx.aws.stdout.fileno(), False)
    return ctx.aws_port


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
    start_aws(ctx)
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
