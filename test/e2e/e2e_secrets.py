"""End-to-end scenarios for AWS secrets: Secrets Manager (token, API key) and ACM (CA).

Loaded by test/e2e/e2e.py (python3 test/e2e/e2e.py -k secrets_). Each scenario runs the real
binary against FakeLambda, FakeAPM and one or two FakeAWS (test/fakes/fake_aws.py): an HTTPS
fake of Secrets Manager GetSecretValue and ACM GetCertificate that checks every
request's Signature V4 on its own and records every call.

What they rely on from the extension (its environment, as the spec gives it):
  ELASTIC_APM_SECRETS_MANAGER_SECRET_TOKEN_ID / ELASTIC_APM_SECRETS_MANAGER_API_KEY_ID
  ELASTIC_APM_SERVER_CA_CERT_ACM_ID                     certificate ARN
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN (optional), AWS_REGION
  ELASTIC_APM_LAMBDA_AWS_ENDPOINT=https://localhost:PORT  (both services), or
  ELASTIC_APM_LAMBDA_SECRETSMANAGER_ENDPOINT / ELASTIC_APM_LAMBDA_ACM_ENDPOINT
  ELASTIC_APM_SERVER_CA_CERT_FILE   the test CA that signed the fake AWS's certificate
The fetched secret overrides ELASTIC_APM_SECRET_TOKEN / ELASTIC_APM_API_KEY (the API
key wins); ACM's Certificate and CertificateChain join the trust anchors. On AWS errors
it logs which call failed, the HTTP status and the AWS error type (never the secret),
delivers nothing without auth, holds no invocation past the forwarder timeout and
exits 0 at shutdown. Secrets are fetched after register.

Checks made at the end of every scenario (finish()): exit 0 on SHUTDOWN; every AWS call
well signed (content-type;host;x-amz-date;x-amz-target[;x-amz-security-token] signed),
POST / with Content-Type application/x-amz-json-1.1 and exactly the spec's JSON body;
no secret (token, API key, binary secret raw or base64, AWS secret key, session token)
in any extension log line, its stdout, or any payload the APM server got.

Certificates (fake_apm.make_test_ca, made once per run): "aws" signs the fake AWS's
certificate and is given to the extension with ELASTIC_APM_SERVER_CA_CERT_FILE; "apm"
signs the HTTPS APM server's certificate in the ACM scenarios and reaches the
extension only through ACM.
"""

import atexit
import base64
import collections.abc
import json
import os
import re
import shutil
import tempfile
import threading
import time

from e2e import (scenario, agent_send, agent_flush, agent_payload, first_delivery,
                 delivered_requests, tx_delivered, tx_of, http_request)
from fake_apm import make_test_ca
from fake_aws import FakeAWS, GARBAGE_ALL, JSON_CT

FWD_TIMEOUT = 1.0           # ELASTIC_APM_DATA_FORWARDER_TIMEOUT where a bound is measured
MARGIN = 1.0                # allowed past it (as e2e.py does)
RECOVERY_S = 30.0           # a retried fetch must succeed within this after AWS recovers
FWD_ENV = {"ELASTIC_APM_DATA_FORWARDER_TIMEOUT": "%gs" % FWD_TIMEOUT}
SM = "secretsmanager.GetSecretValue"
ACM = "CertificateManager.GetCertificate"
SM_WORDS = ("getsecretvalue", "secrets manager", "secretsmanager")
ACM_WORDS = ("getcertificate", "acm", "certificate manager", "certificatemanager")
SIGNED_MIN = {"content-type", "host", "x-amz-date", "x-amz-target"}


def _rand(n=12):
    return os.urandom(n).hex()


def _b64(n):
    return base64.b64encode(os.urandom(n)).decode()


# Fresh secrets per run, so nothing can be hard-wired; each differs from the others.
TOKEN = "sm-token-" + _rand()
API_KEY = base64.b64encode(("apikey-id-%s:%s" % (_rand(4), _rand())).encode()).decode()
BINARY = ("bin-token-" + _rand()).encode()
PLAIN_TOKEN = "plain-env-token-" + _rand(6)
PLAIN_KEY = "plain-env-apikey-" + _rand(6)
TOKEN_ID = "apm/secret-token"
KEY_ID = "arn:aws:secretsmanager:us-east-1:123456789012:secret:apm/api-key-" + _rand(3)
BIN_ID = "apm/binary-token"
CERT_ARN = "arn:aws:acm:us-east-1:123456789012:certificate/" + \
    "-".join((_rand(4), _rand(2), _rand(2), _rand(2), _rand(6)))

# --------------------------------------------------------------- certificates

_certs = {}
_certs_lock = threading.Lock()


def certs(which):
    """make_test_ca paths of the "aws" or the "apm" certificate set (made on first use)."""
    with _certs_lock:
        if which not in _certs:
            d = tempfile.mkdtemp(prefix="apm-ext-secrets-%s-" % which)
            atexit.register(shutil.rmtree, d, True)
            _certs[which] = make_test_ca(d)
        return _certs[which]


def pem(path):
    with open(path, encoding="ascii") as f:
        return f.read()


class ApmArgs(collections.abc.Mapping):
    """FakeAPM keyword arguments for @scenario(apm=...); with tls=True the server
    serves https with the "apm" set's certificate, made only when the scenario runs."""

    def __init__(self, tls=False, **kw):
        self.tls, self.kw = tls, kw

    def _args(self):
        a = dict(self.kw)
        if self.tls:
            a["tls"] = (certs("apm")["cert"], certs("apm")["key"])
        return a

    def __getitem__(self, k):
        return self._args()[k]

    def __iter__(self):
        return iter(list(self.kw) + (["tls"] if self.tls else []))

    def __len__(self):
        return len(self.kw) + (1 if self.tls else 0)


# --------------------------------------------------------------- fakes and environment

class Creds:
    """AWS credentials for one scenario (what the extension gets and the fakes expect)."""

    def __init__(self, session_token=True, region="us-east-1"):
        self.access_key = "ASIA" + _rand(8).upper()
        self.secret_key = _b64(30)  # has '/' and '+' now and then, like real ones
        self.session_token = ("IQoJb3JpZ2luX2VjE" + _b64(60)) if session_token is True \
            else session_token
        self.region = region


def new_aws(t, creds, secrets=None, certs_=None):
    """A FakeAWS for this scenario, closed with the scenario's FakeLambda."""
    c = certs("aws")
    aws = FakeAWS(c["cert"], c["key"], creds.access_key, creds.secret_key, creds.region,
                  creds.session_token)
    aws.secrets.update(secrets or {})
    aws.certs.update(certs_ or {})
    fakes = t.__dict__.setdefault("aws_fakes", [])
    if not fakes:  # the runner closes the FakeLambda in any case: close ours with it
        close = t.lam.close

        def close_all():
            try:
                close()
            finally:
                for f in t.aws_fakes:
                    f.close()
        t.lam.close = close_all
    fakes.append(aws)
    return aws


def aws_env(creds, aws=None, **ids):
    """Extension environment: credentials, the AWS endpoint (aws), the CA that signed
    the fake's certificate, no plain token or API key (unless the caller adds one),
    and ids: token=, api_key=, acm= (secret ids / certificate ARN)."""
    e = {"AWS_ACCESS_KEY_ID": creds.access_key, "AWS_SECRET_ACCESS_KEY": creds.secret_key,
         "AWS_SESSION_TOKEN": creds.session_token, "AWS_REGION": creds.region,
         "AWS_DEFAULT_REGION": creds.region,
         "ELASTIC_APM_SERVER_CA_CERT_FILE": certs("aws")["ca"],
         "ELASTIC_APM_SECRET_TOKEN": None, "ELASTIC_APM_API_KEY": None}
    if aws is not None:
        e["ELASTIC_APM_LAMBDA_AWS_ENDPOINT"] = aws.url
    names = {"token": "ELASTIC_APM_SECRETS_MANAGER_SECRET_TOKEN_ID",
             "api_key": "ELASTIC_APM_SECRETS_MANAGER_API_KEY_ID",
             "acm": "ELASTIC_APM_SERVER_CA_CERT_ACM_ID"}
    for k, v in ids.items():
        e[names[k]] = v
    return e


# --------------------------------------------------------------- checks

def invocation(t, timeout=15):
    """One syncflush invocation: returns (inv, tx, t_flush, t_next)."""
    inv = t.lam.invoke()
    lines, tx = agent_payload(inv)
    s = agent_send(t.port, lines)
    assert s == 202, "agent POST answered %s, want 202" % s.status
    t_flush = time.monotonic()
    st = agent_flush(t.port)
    assert st == 202, "flushed=true answered %s, want 202" % st.status
    t.lam.runtime_done(inv)
    t_next = t.lam.finish(inv, timeout=timeout)
    return inv, tx, t_flush, t_next


def assert_released(t_flush, t_next, what):
    assert t_next - t_flush <= FWD_TIMEOUT + MARGIN, "%s: /next held %.3fs after the end " \
        "of the invocation (forwarder timeout %.1fs): the invocation waits for the " \
        "secret" % (what, t_next - t_flush, FWD_TIMEOUT)


def assert_delivered_before_next(t, tx, t_next, what, aws=None):
    req = first_delivery(t.apm, tx)
    assert req is not None, "%s: transaction not at the APM server when the extension " \
        "called /next (APM server saw %d requests%s%s)" % (
            what, len(t.apm.requests), _apm_seen(t),
            "; AWS: " + aws.summary() if aws else "")
    assert req.t_end <= t_next, "%s: /next %.3fs before the APM server answered" % (
        what, req.t_end - t_next)
    return req


def _apm_seen(t):
    reqs = t.apm.requests
    if not reqs:
        return ""
    return ": " + ", ".join("%s %s auth=%s -> %s" % (r.method, r.path, _auth_kind(r),
                                                     r.status) for r in reqs[-4:])


def _auth_kind(r):
    a = r.headers.get("Authorization")
    if a is None:
        return "none"
    for want, name in (("Bearer " + TOKEN, "Bearer <SM token>"),
                       ("ApiKey " + API_KEY, "ApiKey <SM key>"),
                       ("Bearer " + BINARY.decode(), "Bearer <SM binary>"),
                       ("Bearer " + PLAIN_TOKEN, "Bearer <plain env token>"),
                       ("ApiKey " + PLAIN_KEY, "ApiKey <plain env key>")):
        if a == want:
            return name
    return repr(a.split(" ")[0] + " <%d chars>" % len(a))


def assert_auth_everywhere(t, want, what="APM server"):
    """Every request the APM server saw carried `want` as Authorization (None: none)."""
    bad = [r for r in t.apm.requests if r.headers.get("Authorization") != want]
    assert not bad, "%s: %d request(s) without the right Authorization (want %s): %s" % (
        what, len(bad), "none" if want is None else want.split(" ")[0] + " <secret>",
        ", ".join("%s %s auth=%s -> %s" % (r.method, r.path, _auth_kind(r), r.status)
                  for r in bad[:5]))


def assert_nothing_sent(t, what):
    reqs = t.apm.requests
    assert not reqs, "%s: the APM server got %d request(s) although the extension has " \
        "no auth yet%s" % (what, len(reqs), _apm_seen(t))


def failure_line(t, words, status=None, error_type=None):
    """The first warn/error log line that names the call (one of words), the HTTP
    status and the AWS error type; None if there is none."""
    for rec in t.logs():
        if str(rec.get("level", "")).lower() not in ("warn", "warning", "error", "critical",
                                                   "fatal"):
            continue
        text = json.dumps({k: v for k, v in rec.items()
                           if k not in ("time", "timestamp", "@timestamp", "ts")})
        low = text.lower()
        if not any(w in low for w in words):
            continue
        if error_type and error_type not in text:
            continue
        if status and not re.search(r"(?<![0-9.])%d(?![0-9])" % status, text):
            continue
        return rec
    return None


def wait_failure_logged(t, words, status=None, error_type=None, what="", timeout=3.0):
    end = time.monotonic() + timeout
    ev = threading.Event()
    while True:
        rec = failure_line(t, words, status, error_type)
        if rec:
            return rec
        if time.monotonic() > end:
            lines = [r for r in t.logs() if str(r.get("level", "")).lower() in
                     ("warn", "warning", "error", "critical")]
            raise AssertionError(
                "%s: no warn/error log line naming the call (%s)%s%s; warn/error lines: %s"
                % (what, " or ".join(words[:2]), ", HTTP %d" % status if status else "",
                   ", %s" % error_type if error_type else "",
                   [r.get("msg") for r in lines[-5:]] or "none"))
        ev.wait(0.05)


def check_calls(aws, ids=(), arns=(), what="AWS"):
    """Every call well signed and as the spec writes it."""
    problems = []
    for c in aws.calls:
        if not c.done:
            continue
        if not c.sig_ok:
            problems.append("%r: signature rejected: %s" % (c, (c.sig_error or "")[:700]))
            continue
        if c.problems:
            problems.append("%r: %s" % (c, "; ".join(c.problems)))
        if c.header("Content-Type") != JSON_CT:
            problems.append("%r: Content-Type %r" % (c, c.header("Content-Type")))
        need = SIGNED_MIN | ({"x-amz-security-token"} if aws.session_token else set())
        if need - set(c.signed_headers):
            problems.append("%r: SignedHeaders=%s lacks %s" % (
                c, ";".join(c.signed_headers), ",".join(sorted(need - set(c.signed_headers)))))
        if c.header("X-Amz-Security-Token") is not None and not aws.session_token:
            problems.append("%r: X-Amz-Security-Token sent without AWS_SESSION_TOKEN" % c)
        if c.op == "GetSecretValue":
            if c.json not in [{"SecretId": i, "VersionStage": "AWSCURRENT"} for i in ids]:
                problems.append("%r: body %r, want {\"SecretId\": one of %s, "
                                "\"VersionStage\": \"AWSCURRENT\"}" % (c, c.body[:200],
                                                                      list(ids)))
        elif c.op == "GetCertificate":
            if c.json not in [{"CertificateArn": a} for a in arns]:
                problems.append("%r: body %r, want {\"CertificateArn\": one of %s}" % (
                    c, c.body[:200], list(arns)))
        else:
            problems.append("%r: unexpected X-Amz-Target %r" % (c, c.target))
    assert not problems, "%s: %d bad call(s): %s" % (what, len(problems),
                                                     " | ".join(problems[:4]))


def secret_strings(creds=None):
    out = {"secret token": TOKEN, "API key": API_KEY, "binary secret": BINARY.decode(),
           "binary secret (base64)": base64.b64encode(BINARY).decode()}
    if creds is not None:
        out["AWS secret access key"] = creds.secret_key
        if creds.session_token:
            out["AWS session token"] = creds.session_token
    return out


def assert_no_secret_leaked(t, creds):
    """No secret in any extension log line (stderr, stdout), nor in what the APM server
    got as payload (e.g. forwarded log events)."""
    raw = t.lam.ext_log_text()
    texts = [("extension log", raw)]
    # the same lines with JSON escapes undone (a "\/" or "\u002b" must not hide a leak)
    norm = []
    for ln in raw.splitlines():
        try:
            norm.append(json.dumps(json.loads(ln), ensure_ascii=False))
        except ValueError:
            pass
    texts.append(("extension log (JSON decoded)", "\n".join(norm)))
    if t.lam.ext_stdout_path and os.path.exists(t.lam.ext_stdout_path):
        with open(t.lam.ext_stdout_path, "rb") as f:
            texts.append(("extension stdout", f.read().decode("utf-8", "replace")))
    for r in t.apm.requests:
        texts.append(("APM request %s %s body" % (r.method, r.path),
                      (r.decoded or r.body or b"").decode("utf-8", "replace")))
    for where, text in texts:
        for name, s in secret_strings(creds).items():
            if s and s in text:
                lines = [(i, ln) for i, ln in enumerate(text.splitlines(), 1) if s in ln]
                raise AssertionError("the %s appears in the %s (line %s: %.300s)" % (
                    name, where, lines[0][0] if lines else "?",
                    lines[0][1].replace(s, "<THE %s>" % name.upper()) if lines else ""))


def finish(t, creds, fakes, ids=(), arns=()):
    """Shut down (exit 0 in time), then the checks every scenario makes."""
    if not t.shut_down:
        t.shutdown_ok()
    for aws in fakes:
        check_calls(aws, ids, arns, "fake AWS %s" % aws.url)
    assert_no_secret_leaked(t, creds)


def deliver_until(t, txs, what, auth, limit=RECOVERY_S, aws=None):
    """Run invocations (each bounded by the forwarder timeout) until every tx in txs
    (and each new invocation's) is at the APM server, every request carrying `auth`;
    returns all txs."""
    end = time.monotonic() + limit
    i = 0
    while not all(tx_delivered(t.apm, tx) for tx in txs):
        assert_auth_everywhere(t, auth, "%s, after %d invocation(s)" % (what, i))
        assert time.monotonic() < end, "%s: %d of %d transactions still not delivered " \
            "%.0fs after AWS recovered (%d invocations since; APM saw %d requests%s; " \
            "AWS: %s)" % (what, sum(1 for x in txs if not tx_delivered(t.apm, x)), len(txs),
                          limit, i, len(t.apm.requests), _apm_seen(t),
                          aws.summary() if aws else "-")
        inv, tx, t_flush, t_next = invocation(t)
        assert_released(t_flush, t_next, "%s, invocation %d" % (what, i))
        txs.append(tx)
        i += 1
    return txs


def assert_once(t, txs):
    for i, tx in enumerate(txs):
        n = len(delivered_requests(t.apm, tx))
        assert n == 1, "transaction %d (%s) delivered %d times, want once" % (
            i, tx_of(tx)["id"], n)


def assert_alive(t, what):
    code = t.lam.ext_proc.poll()
    assert code is None, "%s: the extension exited with %s" % (what, code)


# --------------------------------------------------------------- success

@scenario(apm=ApmArgs(token=TOKEN))
def secrets_token_every_delivery(t):
    """Secret token from Secrets Manager: Bearer <secret> on every delivery, 3 invocations."""
    creds = Creds()
    aws = new_aws(t, creds, {TOKEN_ID: TOKEN, "apm/other": "not-this-one"})
    t.start(aws_env(creds, aws, token=TOKEN_ID))
    txs = []
    for i in range(3):
        inv, tx, t_flush, t_next = invocation(t)
        assert_delivered_before_next(t, tx, t_next, "invocation %d" % i, aws)
        assert t_next - t_flush < 3.0, "invocation %d: /next held %.3fs" % (
            i, t_next - t_flush)
        txs.append(tx)
    assert_auth_everywhere(t, "Bearer " + TOKEN)
    ok = aws.calls_to(SM, ok=True)
    assert len(ok) == 1, "%d successful GetSecretValue calls for 3 invocations, want one " \
        "(fetched once, kept): %s" % (len(ok), aws.summary())
    c = ok[0]
    assert c.header("X-Amz-Target") == SM and c.service == "secretsmanager", repr(c)
    assert re.fullmatch(r"\d{8}T\d{6}Z", c.header("X-Amz-Date") or ""), \
        "X-Amz-Date %r" % c.header("X-Amz-Date")
    assert c.sig.auth["service"] == "secretsmanager" and c.sig.auth["region"] == "us-east-1"
    finish(t, creds, [aws], ids=[TOKEN_ID])
    assert_once(t, txs)


@scenario(apm=ApmArgs(api_key=API_KEY))
def secrets_api_key(t):
    """API key and token from Secrets Manager: ApiKey wins; no session token; region eu-central-1."""
    creds = Creds(session_token=None, region="eu-central-1")
    aws = new_aws(t, creds, {KEY_ID: API_KEY, TOKEN_ID: TOKEN})
    t.start(aws_env(creds, aws, api_key=KEY_ID, token=TOKEN_ID))
    for i in range(2):
        inv, tx, t_flush, t_next = invocation(t)
        assert_delivered_before_next(t, tx, t_next, "invocation %d" % i, aws)
    assert_auth_everywhere(t, "ApiKey " + API_KEY)
    assert [c for c in aws.calls_to(SM, ok=True) if c.secret_id == KEY_ID], \
        "the API key was never fetched: %s" % aws.summary()
    for c in aws.calls:
        assert c.header("X-Amz-Security-Token") is None, \
            "%r: X-Amz-Security-Token sent, AWS_SESSION_TOKEN is not set" % c
        assert c.sig_ok and c.sig.auth["region"] == "eu-central-1", \
            "%r: credential scope region %r, AWS_REGION is eu-central-1" % (
                c, c.sig.auth and c.sig.auth["region"])
    finish(t, creds, [aws], ids=[KEY_ID, TOKEN_ID])


@scenario(apm=ApmArgs(token=BINARY.decode()))
def secrets_binary(t):
    """A SecretBinary answer (no SecretString) is base64-decoded and used as the token."""
    creds = Creds()
    aws = new_aws(t, creds, {BIN_ID: BINARY})
    t.start(aws_env(creds, aws, token=BIN_ID))
    inv, tx, t_flush, t_next = invocation(t)
    assert_delivered_before_next(t, tx, t_next, "invocation", aws)
    assert_auth_everywhere(t, "Bearer " + BINARY.decode())
    ans = json.loads(aws.calls_to(SM, ok=True)[0].answer)
    assert "SecretBinary" in ans and "SecretString" not in ans, ans
    finish(t, creds, [aws], ids=[BIN_ID])


@scenario(apm=ApmArgs(token=TOKEN))
def secrets_override_plain_token(t):
    """ELASTIC_APM_SECRET_TOKEN is set too: the Secrets Manager token wins."""
    creds = Creds()
    aws = new_aws(t, creds, {TOKEN_ID: TOKEN})
    env = aws_env(creds, aws, token=TOKEN_ID)
    env["ELASTIC_APM_SECRET_TOKEN"] = PLAIN_TOKEN
    t.start(env)
    for i in range(2):
        inv, tx, t_flush, t_next = invocation(t)
        assert_delivered_before_next(t, tx, t_next, "invocation %d" % i, aws)
    assert_auth_everywhere(t, "Bearer " + TOKEN)
    finish(t, creds, [aws], ids=[TOKEN_ID])


@scenario(apm=ApmArgs(api_key=API_KEY))
def secrets_override_plain_api_key(t):
    """ELASTIC_APM_API_KEY and ELASTIC_APM_SECRET_TOKEN set: the Secrets Manager API key wins."""
    creds = Creds()
    aws = new_aws(t, creds, {KEY_ID: API_KEY})
    env = aws_env(creds, aws, api_key=KEY_ID)
    env["ELASTIC_APM_API_KEY"] = PLAIN_KEY
    env["ELASTIC_APM_SECRET_TOKEN"] = PLAIN_TOKEN
    t.start(env)
    inv, tx, t_flush, t_next = invocation(t)
    assert_delivered_before_next(t, tx, t_next, "invocation", aws)
    assert_auth_everywhere(t, "ApiKey " + API_KEY)
    finish(t, creds, [aws], ids=[KEY_ID])


@scenario(apm=ApmArgs(token=TOKEN))
def secrets_session_token_signed(t):
    """AWS_SESSION_TOKEN: sent as X-Amz-Security-Token on every call, and signed."""
    creds = Creds(session_token="IQoJb3JpZ2luX2VjE//" + _b64(90) + "+/=")
    aws = new_aws(t, creds, {TOKEN_ID: TOKEN})
    t.start(aws_env(creds, aws, token=TOKEN_ID))
    inv, tx, t_flush, t_next = invocation(t)
    assert_delivered_before_next(t, tx, t_next, "invocation", aws)
    calls = aws.calls
    assert calls, "no AWS call"
    for c in calls:
        assert c.header("X-Amz-Security-Token") == creds.session_token, \
            "%r: X-Amz-Security-Token %r" % (c, (c.header("X-Amz-Security-Token") or "")[:20])
        assert "x-amz-security-token" in c.signed_headers, \
            "%r: x-amz-security-token not in SignedHeaders=%s" % (c, ";".join(c.signed_headers))
    assert_auth_everywhere(t, "Bearer " + TOKEN)
    finish(t, creds, [aws], ids=[TOKEN_ID])


# --------------------------------------------------------------- ACM

@scenario(apm=ApmArgs(tls=True, token=TOKEN))
def secrets_acm_ca_trusted(t):
    """HTTPS APM server whose CA is known only through ACM (Certificate); separate endpoints."""
    creds = Creds()
    sm = new_aws(t, creds, {TOKEN_ID: TOKEN})
    acm = new_aws(t, creds, certs_={CERT_ARN: (pem(certs("apm")["ca"]), None)})
    env = aws_env(creds, None, token=TOKEN_ID, acm=CERT_ARN)
    env["ELASTIC_APM_LAMBDA_SECRETSMANAGER_ENDPOINT"] = sm.url
    env["ELASTIC_APM_LAMBDA_ACM_ENDPOINT"] = acm.url
    t.start(env)
    txs = []
    for i in range(2):
        inv, tx, t_flush, t_next = invocation(t)
        assert not [c for c in sm.calls if c.op != "GetSecretValue"], \
            "ELASTIC_APM_LAMBDA_SECRETSMANAGER_ENDPOINT got calls meant for ACM " \
            "(ELASTIC_APM_LAMBDA_ACM_ENDPOINT): %s" % sm.summary()
        assert not [c for c in acm.calls if c.op != "GetCertificate"], \
            "ELASTIC_APM_LAMBDA_ACM_ENDPOINT got calls meant for Secrets Manager: %s" % \
            acm.summary()
        assert acm.calls_to(ACM, ok=True), "invocation %d: ACM never asked at %s (%s)" % (
            i, acm.url, acm.summary())
        assert_delivered_before_next(t, tx, t_next, "invocation %d (TLS errors at the APM "
                                     "server: %s)" % (i, t.apm.tls_errors[-2:]), sm)
        txs.append(tx)
    assert_auth_everywhere(t, "Bearer " + TOKEN)
    for c in acm.calls:
        assert c.sig_ok and c.sig.auth["service"] == "acm", "%r: scope service %r" % (
            c, c.sig.auth and c.sig.auth["service"])
    finish(t, creds, [sm, acm], ids=[TOKEN_ID], arns=[CERT_ARN])
    assert_once(t, txs)


@scenario(apm=ApmArgs(tls=True, token=TOKEN))
def secrets_acm_chain_trusted(t):
    """One endpoint for both: token, and ACM's server certificate + the CA in CertificateChain."""
    creds = Creds()
    aws = new_aws(t, creds, {TOKEN_ID: TOKEN},
                  certs_={CERT_ARN: (pem(certs("apm")["cert"]), pem(certs("apm")["ca"]))})
    t.start(aws_env(creds, aws, token=TOKEN_ID, acm=CERT_ARN))
    inv, tx, t_flush, t_next = invocation(t)
    assert_delivered_before_next(t, tx, t_next, "invocation (TLS errors at the APM server: "
                                 "%s)" % t.apm.tls_errors[-2:], aws)
    assert aws.calls_to(ACM, ok=True) and aws.calls_to(SM, ok=True), aws.summary()
    assert_auth_everywhere(t, "Bearer " + TOKEN)
    finish(t, creds, [aws], ids=[TOKEN_ID], arns=[CERT_ARN])


@scenario(apm=ApmArgs(tls=True), env=FWD_ENV)
def secrets_acm_wrong_ca_refused(t):
    """Control: ACM hands out an unrelated CA: the HTTPS APM server is not trusted."""
    creds = Creds()
    aws = new_aws(t, creds, certs_={CERT_ARN: (pem(certs("apm")["wrong_ca"]), None)})
    t.start(aws_env(creds, aws, acm=CERT_ARN))
    for i in range(2):
        inv, tx, t_flush, t_next = invocation(t)
        assert_released(t_flush, t_next, "invocation %d" % i)
        aws.wait_calls(1, ACM, timeout=1, ok=True)
        assert not tx_delivered(t.apm, tx), "invocation %d: delivered to a server whose " \
            "certificate no trust anchor vouches for" % i
    assert not t.apm.requests, "the APM server got HTTP requests over an untrusted " \
        "connection: %s" % t.apm.requests[:3]
    finish(t, creds, [aws], arns=[CERT_ARN])


@scenario(apm=ApmArgs(tls=True), env=FWD_ENV)
def secrets_acm_unknown_certificate(t):
    """ACM answers ResourceNotFoundException: logged (call, 400, type); bounded; exit 0."""
    creds = Creds()
    aws = new_aws(t, creds, certs_={CERT_ARN + "-other": (pem(certs("apm")["ca"]), None)})
    t.start(aws_env(creds, aws, acm=CERT_ARN))
    for i in range(2):
        inv, tx, t_flush, t_next = invocation(t)
        assert_released(t_flush, t_next, "invocation %d" % i)
        assert_alive(t, "invocation %d" % i)
        aws.wait_calls(1, ACM, timeout=1)
    assert not [r for r in t.apm.requests if r.status == 202], \
        "delivered to a server trusted only through a certificate ACM did not give"
    wait_failure_logged(t, ACM_WORDS, 400, "ResourceNotFoundException", "ACM not found")
    finish(t, creds, [aws], arns=[CERT_ARN])


# --------------------------------------------------------------- errors

def _denied(t, error_type, what, secrets, msg=None, fail=None):
    creds = Creds()
    aws = new_aws(t, creds, secrets)
    if fail:
        aws.fail = (None, fail)
    t.start(dict(aws_env(creds, aws, token=TOKEN_ID), **FWD_ENV))
    for i in range(2):
        inv, tx, t_flush, t_next = invocation(t)
        assert_released(t_flush, t_next, "%s, invocation %d" % (what, i))
        assert_alive(t, "%s, invocation %d" % (what, i))
        assert_nothing_sent(t, "%s, invocation %d" % (what, i))
        aws.wait_calls(1, SM, timeout=1)
    wait_failure_logged(t, SM_WORDS, 400, error_type, what)
    assert not aws.calls_to(SM, ok=True), "a GetSecretValue call succeeded?! %s" % \
        aws.summary()
    n = len(aws.calls)
    assert n <= 15, "%d GetSecretValue calls in a few seconds: retried without backoff" % n
    finish(t, creds, [aws], ids=[TOKEN_ID])
    assert_nothing_sent(t, "%s, after shutdown" % what)


@scenario(apm=ApmArgs(token=TOKEN))
def secrets_access_denied(t):
    """AccessDeniedException (400): logged (call, status, type); nothing sent; bounded; exit 0."""
    _denied(t, "AccessDeniedException", "access denied", {TOKEN_ID: TOKEN}, fail=(
        "AccessDeniedException", 400,
        "User: arn:aws:sts::123456789012:assumed-role/test-fn-role/test-fn is not "
        "authorized to perform: secretsmanager:GetSecretValue on resource: %s because no "
        "identity-based policy allows the secretsmanager:GetSecretValue action" % TOKEN_ID))


@scenario(apm=ApmArgs(token=TOKEN))
def secrets_unknown_secret(t):
    """ResourceNotFoundException (400) for an unknown id: logged; nothing sent; bounded; exit 0."""
    _denied(t, "ResourceNotFoundException", "unknown secret", {"apm/some-other": TOKEN})


@scenario(apm=ApmArgs(token=TOKEN))
def secrets_throttled_then_ok(t):
    """ThrottlingException (400) first: retried; data goes once the secret is in, never without auth."""
    creds = Creds()
    aws = new_aws(t, creds, {TOKEN_ID: TOKEN})
    aws.fail_next(1, ("ThrottlingException", 400, "Rate exceeded"), target=SM)
    t.start(dict(aws_env(creds, aws, token=TOKEN_ID), **FWD_ENV))
    inv, tx, t_flush, t_next = invocation(t)
    assert_released(t_flush, t_next, "first invocation")
    aws.wait_calls(1, SM, timeout=1)
    assert_auth_everywhere(t, "Bearer " + TOKEN, "first invocation")
    txs = deliver_until(t, [tx], "after throttling", "Bearer " + TOKEN, aws=aws)
    assert_auth_everywhere(t, "Bearer " + TOKEN, "after the retry")
    calls = aws.calls_to(SM)
    assert calls[0].error_type == "ThrottlingException", calls
    ok = aws.calls_to(SM, ok=True)
    assert ok, "never fetched after throttling: %s" % aws.summary()
    first = first_delivery(t.apm, tx)
    assert first.t_start >= ok[0].t_answer, "delivered before the secret was fetched"
    wait_failure_logged(t, SM_WORDS, 400, "ThrottlingException", "throttled")
    finish(t, creds, [aws], ids=[TOKEN_ID])
    assert_once(t, txs)


def _garbage(t, garbage):
    creds = Creds()
    aws = new_aws(t, creds, {TOKEN_ID: TOKEN})
    aws.fail_next(1, garbage, target=SM)
    t.start(dict(aws_env(creds, aws, token=TOKEN_ID), **FWD_ENV))
    inv, tx, t_flush, t_next = invocation(t)
    what = "answer %s" % garbage.name
    assert_released(t_flush, t_next, what)
    assert_alive(t, what)
    assert_auth_everywhere(t, "Bearer " + TOKEN, what)
    calls = aws.wait_calls(1, SM, timeout=1)
    assert calls[0].injected is garbage, calls
    wait_failure_logged(t, SM_WORDS, what=what)
    deliver_until(t, [tx], "after the " + what, "Bearer " + TOKEN, aws=aws)
    assert_auth_everywhere(t, "Bearer " + TOKEN, "after the " + what)
    ok = aws.calls_to(SM, ok=True)
    assert ok and first_delivery(t.apm, tx).t_start >= ok[0].t_answer, \
        "delivered before the secret was fetched"
    finish(t, creds, [aws], ids=[TOKEN_ID])


def _garbage_scenario(garbage):
    def f(t):
        _garbage(t, garbage)
    f.__doc__ = "Garbage from Secrets Manager (%s): logged, nothing without auth, " \
        "bounded, recovers." % garbage.name
    scenario("secrets_garbage_" + garbage.slug, apm=ApmArgs(token=TOKEN))(f)


for _g in GARBAGE_ALL:
    _garbage_scenario(_g)


# --------------------------------------------------------------- secrets stay secret

@scenario(apm=ApmArgs(api_key=API_KEY), env={"ELASTIC_APM_LOG_LEVEL": "trace"})
def secrets_never_logged(t):
    """At trace level, through a throttled call and two fetches: no secret in any log line."""
    creds = Creds()
    aws = new_aws(t, creds, {TOKEN_ID: TOKEN, BIN_ID: API_KEY.encode()})
    aws.fail_next(1, ("ThrottlingException", 400, "Rate exceeded"), target=SM)
    env = dict(aws_env(creds, aws, token=TOKEN_ID, api_key=BIN_ID), **FWD_ENV)
    env["ELASTIC_APM_LOG_LEVEL"] = "trace"
    t.start(env)
    inv, tx, t_flush, t_next = invocation(t)
    deliver_until(t, [tx], "throttled, then fetched", "ApiKey " + API_KEY, aws=aws)
    # a proxied request carries the secret upstream too: still never in the log
    inv = t.lam.invoke()
    st, _, body = http_request(t.port, "GET", "/", headers={"User-Agent": "test"})
    assert st == 200, "proxied GET / answered %s: %r" % (st, body[:200])
    assert agent_flush(t.port) == 202
    t.lam.runtime_done(inv)
    t.lam.finish(inv)
    assert_auth_everywhere(t, "ApiKey " + API_KEY)
    assert len(t.logs()) > 5, "trace level gave only %d log lines" % len(t.logs())
    finish(t, creds, [aws], ids=[TOKEN_ID, BIN_ID])


# --------------------------------------------------------------- cold start

@scenario(apm=ApmArgs(token=TOKEN))
def secrets_cold_start_not_delayed(t):
    """A slow AWS (1 s per answer) does not delay register: no AWS connection before it."""
    creds = Creds()
    aws = new_aws(t, creds, {TOKEN_ID: TOKEN})
    aws.delay = 1.0
    t.start(aws_env(creds, aws, token=TOKEN_ID))
    lam = t.lam
    assert lam.t_register - lam.t_exec < 0.9, "register %.3fs after exec with a slow AWS " \
        "(secrets fetched before register?)" % (lam.t_register - lam.t_exec)
    inv, tx, t_flush, t_next = invocation(t)
    aws.wait_calls(1, SM, timeout=1)
    conns = aws.connections
    assert conns and conns[0] >= lam.t_register, "first AWS connection %.3fs before " \
        "register" % (lam.t_register - conns[0])
    first = aws.calls[0]
    assert first.t >= lam.t_register, "first AWS call %.3fs before register" % (
        lam.t_register - first.t)
    assert_delivered_before_next(t, tx, t_next, "first invocation", aws)
    assert_auth_everywhere(t, "Bearer " + TOKEN)
    finish(t, creds, [aws], ids=[TOKEN_ID])


@scenario(apm=ApmArgs(token=TOKEN))
def secrets_proxy_waits_for_the_secret(t):
    """The agent's first GET / (sent as soon as it starts) goes out with the fetched token, not
    without auth: proxied calls wait for the first Secrets Manager attempt."""
    from e2e import http_request
    creds = Creds()
    aws = new_aws(t, creds, {TOKEN_ID: TOKEN})
    aws.delay = 0.3     # the secret arrives well after the agent's first call
    t.start(aws_env(creds, aws, token=TOKEN_ID))
    status, _, body = http_request(t.port, "GET", "/")
    assert status == 200, "GET / through the extension: %s %r (401 = sent before the " \
        "secret arrived)" % (status, body[:200])
    gets = [r for r in t.apm.requests if r.method == "GET"]
    assert gets and gets[0].headers.get("Authorization") == "Bearer " + TOKEN, \
        "the proxied GET / carried %r" % (gets[0].headers.get("Authorization") if gets else None)
    finish(t, creds, [aws], ids=[TOKEN_ID])


# --------------------------------------------------------------- settings and local failures

def _error_line(t, *words):
    """The error lines whose msg holds every one of words."""
    return [r for r in t.logs() if str(r.get("level", "")).lower() in ("error", "critical")
            and all(w in str(r.get("msg", "")) for w in words)]


def _no_auth_invocations(t, what, n=2):
    """n invocations: each released within the bound, nothing reaches the APM server."""
    for i in range(n):
        inv, tx, t_flush, t_next = invocation(t)
        assert_released(t_flush, t_next, "%s, invocation %d" % (what, i))
        assert_alive(t, "%s, invocation %d" % (what, i))
        assert_nothing_sent(t, "%s, invocation %d" % (what, i))


@scenario(apm=ApmArgs(token=TOKEN), env=FWD_ENV)
def secrets_endpoint_not_http(t):
    """ELASTIC_APM_LAMBDA_SECRETSMANAGER_ENDPOINT=ftp://...: one error naming it, no AWS
    call, nothing sent without the secret, not held, exit 0."""
    creds = Creds()
    aws = new_aws(t, creds, {TOKEN_ID: TOKEN})
    env = dict(aws_env(creds, aws, token=TOKEN_ID), **FWD_ENV)
    env["ELASTIC_APM_LAMBDA_SECRETSMANAGER_ENDPOINT"] = "ftp://secrets.example.test"
    t.start(env)
    _no_auth_invocations(t, "endpoint not http")
    assert len(_error_line(t, 'ELASTIC_APM_LAMBDA_SECRETSMANAGER_ENDPOINT='
                           '"ftp://secrets.example.test" is not an http(s) URL')) == 1, \
        "no error line naming the endpoint: %r" % [r.get("msg") for r in t.logs()][:5]
    assert not aws.connections and not aws.calls, "AWS contacted: %s" % aws.summary()
    finish(t, creds, [aws], ids=[TOKEN_ID])
    assert_nothing_sent(t, "endpoint not http, after shutdown")


@scenario(apm=ApmArgs(token=TOKEN))
def secrets_blank_settings_ignored(t):
    """Empty API-key id, ACM ARN and AWS_SESSION_TOKEN count as unset: one GetSecretValue,
    signed without a security token; delivered with the secret token."""
    creds = Creds(session_token=None)
    aws = new_aws(t, creds, {TOKEN_ID: TOKEN})
    env = aws_env(creds, aws, token=TOKEN_ID, api_key="", acm="")
    env["AWS_SESSION_TOKEN"] = ""
    t.start(env)
    inv, tx, t_flush, t_next = invocation(t)
    assert_delivered_before_next(t, tx, t_next, "blank settings", aws)
    assert_auth_everywhere(t, "Bearer " + TOKEN)
    calls = aws.calls
    assert [c.op for c in calls] == ["GetSecretValue"], "want one GetSecretValue (the " \
        "blank ids asked for nothing): %s" % aws.summary()
    assert calls[0].header("X-Amz-Security-Token") is None, \
        "an empty AWS_SESSION_TOKEN was sent as X-Amz-Security-Token"
    finish(t, creds, [aws], ids=[TOKEN_ID])


@scenario(apm=ApmArgs(token=TOKEN))
def secrets_trailing_white_space_trimmed(t):
    """A SecretString ending in " \\r\\n": the token goes out without it."""
    creds = Creds()
    aws = new_aws(t, creds, {TOKEN_ID: TOKEN + " \r\n"})
    t.start(aws_env(creds, aws, token=TOKEN_ID))
    inv, tx, t_flush, t_next = invocation(t)
    assert_delivered_before_next(t, tx, t_next, "padded secret", aws)
    assert_auth_everywhere(t, "Bearer " + TOKEN)
    finish(t, creds, [aws], ids=[TOKEN_ID])


@scenario(apm=ApmArgs(tls=True), env=FWD_ENV)
def secrets_acm_no_certificate(t):
    """ACM answers 200 with no PEM in Certificate: 'no certificate in the answer'; the
    HTTPS APM server stays untrusted; not held; exit 0."""
    creds = Creds()
    aws = new_aws(t, creds, certs_={CERT_ARN: ("not a certificate", None)})
    t.start(aws_env(creds, aws, acm=CERT_ARN))
    for i in range(2):
        inv, tx, t_flush, t_next = invocation(t)
        assert_released(t_flush, t_next, "invocation %d" % i)
        assert_alive(t, "invocation %d" % i)
        aws.wait_calls(1, ACM, timeout=1, ok=True)
    assert not t.apm.requests, "the APM server got requests: %s" % t.apm.requests[:3]
    assert _error_line(t, "ACM GetCertificate", "no certificate in the answer"), \
        "no error line for a certificate-less answer: %r" % [r.get("msg") for r in t.logs()]
    finish(t, creds, [aws], arns=[CERT_ARN])


@scenario(apm=ApmArgs(token=TOKEN), env=FWD_ENV)
def secrets_request_unsignable(t):
    """An AWS_ACCESS_KEY_ID too long for the Authorization header: the call is never made
    (logged as a request too long to sign, not as a connection failure; retried with
    backoff); nothing sent; not held; exit 0."""
    creds = Creds()
    creds.access_key = "AKIA" + "X" * 480
    aws = new_aws(t, creds, {TOKEN_ID: TOKEN})
    t.start(dict(aws_env(creds, aws, token=TOKEN_ID), **FWD_ENV))
    _no_auth_invocations(t, "unsignable request")
    assert _error_line(t, "Secrets Manager GetSecretValue (secret token)",
                       "the request is too long to sign or send"), \
        "no error line for the call: %r" % [r.get("msg") for r in t.logs()][:5]
    assert not aws.connections, "connected to AWS with a request that cannot be signed"
    finish(t, creds, [aws], ids=[TOKEN_ID])


@scenario(apm=ApmArgs(token=TOKEN), env=FWD_ENV)
def secrets_second_request_too_large(t):
    """Token fetched; the API key's id (1100 characters) does not fit a request on the
    kept connection: the error line names the API key's call (not the token's, which
    succeeded) and the request too long; retried with backoff, not held, exit 0."""
    creds = Creds()
    long_id = "apm/" + "k" * 1100
    aws = new_aws(t, creds, {TOKEN_ID: TOKEN})
    t.start(dict(aws_env(creds, aws, token=TOKEN_ID, api_key=long_id), **FWD_ENV))
    aws.wait_calls(1, SM, timeout=5, ok=True)
    _no_auth_invocations(t, "second request too large")
    assert _error_line(t, "Secrets Manager GetSecretValue (API key)",
                       "the request is too long to sign or send"), \
        "no error line for the oversized call: %r" % [r.get("msg") for r in t.logs()][:5]
    assert len(aws.calls) == 1, "want only the token's call at AWS: %s" % aws.summary()
    finish(t, creds, [aws], ids=[TOKEN_ID])


@scenario(apm=ApmArgs(token=TOKEN), env=FWD_ENV)
def secrets_endpoint_unresolvable(t):
    """The AWS endpoint's name gets NXDOMAIN: the call fails 'cannot resolve <name>',
    retried with backoff; nothing sent; not held; exit 0."""
    from e2e_dns import DnsBed
    name = "secrets.example.test"
    creds = Creds()
    with DnsBed(t, {"other.example.test": ["127.0.0.1"]}) as bed:
        env = dict(aws_env(creds, None, token=TOKEN_ID), **FWD_ENV)
        env["ELASTIC_APM_LAMBDA_AWS_ENDPOINT"] = "https://%s:443" % name
        t.binary, real = bed.wrapper, t.binary
        try:
            t.start(env)
        finally:
            t.binary = real
        _no_auth_invocations(t, "AWS endpoint unresolvable")
        assert _error_line(t, "Secrets Manager GetSecretValue (secret token)",
                           "cannot resolve " + name), \
            "no error line naming %s: %r" % (name, [r.get("msg") for r in t.logs()][:5])
        assert bed.name_queries(name), "the fake DNS was never asked for %s" % name
        finish(t, creds, [])
