"""End-to-end scenarios for the TLS defects 3 and 4 of the audit of commit c0211dd.

    python3 test/e2e/e2e.py -k audit_tls

Each scenario fails on c0211dd for that defect's reason and passes once it is
fixed (audit_tls_4_apm_resumes_own_session is a guard that passes on both):

  3  ELASTIC_APM_LAMBDA_VERIFY_SERVER_CERT=false skipped loading the trust
     anchors altogether, and the AWS endpoints (verified whatever that
     variable says) then had nothing to verify with: with a Secrets Manager
     id nothing was ever fetched, so nothing was ever delivered.
       audit_tls_3_verify_off_still_fetches_secret   fetched, delivered with it
       audit_tls_3_aws_still_verified                an untrusted AWS endpoint is
                                                     contacted, and refused
  4  one TLS session was shared by every endpoint; a resumed session skips
     the certificate and host-name checks, so a Secrets Manager endpoint whose
     certificate fails the name check was talked to anyway once the client
     offered it the APM server's session.
       audit_tls_4_no_session_across_endpoints
       audit_tls_4_apm_resumes_own_session           (guard: resumption kept)

Certificates are made at run time with the openssl CLI in a temporary
directory (certs()): a test CA, a leaf for localhost/127.0.0.1/::1 and one for
otherhost.example signed by it, and a self-signed localhost certificate that
no anchor vouches for. The extension gets the test CA through
ELASTIC_APM_SERVER_CA_CERT_FILE.

Defect 4 needs a server that resumes sessions across two ports, which neither
FakeAPM nor FakeAWS can do (each has its own SSLContext): SessionServer below
is one Python ssl server context (TLS 1.2 only, so resumption is by session
id, the only kind BearSSL's client offers) listening on one port per role.
A role may present another certificate (switched in the SNI callback; the
session cache stays the listener context's). For every connection it records
the session id offered in the ClientHello (peeked before the handshake),
whether the server resumed a session (SSLSocket.session_reused), the session
id, and every HTTP request. The "apm" role answers intake requests 202, the
"sm" role answers GetSecretValue with a SecretString.
"""

import atexit
import collections.abc
import gzip
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import zlib

from e2e import scenario, agent_send, agent_flush, agent_payload, first_delivery, tx_of
from fake_aws import FakeAWS

FWD_TIMEOUT = 1.0
MARGIN = 1.0
FWD_ENV = {"ELASTIC_APM_DATA_FORWARDER_TIMEOUT": "%gs" % FWD_TIMEOUT}
VERIFY_VAR = "ELASTIC_APM_LAMBDA_VERIFY_SERVER_CERT"
CA_FILE_VAR = "ELASTIC_APM_SERVER_CA_CERT_FILE"
TOKEN_ID_VAR = "ELASTIC_APM_SECRETS_MANAGER_SECRET_TOKEN_ID"
SM_TARGET = "secretsmanager.GetSecretValue"
TOKEN = "audit-tls-token-" + os.urandom(8).hex()
TOKEN_ID = "apm/audit-tls-token"


# --------------------------------------------------------------- certificates

_certs = None
_certs_lock = threading.Lock()


def _openssl(*args):
    r = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError("openssl %s: %s" % (" ".join(args), r.stderr.strip()))


def _make_certs(d):
    def path(n):
        return os.path.join(d, n)

    def config(name, cn, ext):
        with open(path(name + ".cnf"), "w") as f:
            f.write("[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = %s\n"
                    "[ext]\n%s" % (cn, ext))
        return path(name + ".cnf")

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_ext = ("basicConstraints = critical,CA:TRUE\n"
              "keyUsage = critical,keyCertSign,cRLSign\n"
              "subjectKeyIdentifier = hash\n")
    leaf_ext = ("basicConstraints = CA:FALSE\n"
                "keyUsage = critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage = serverAuth\nsubjectAltName = %s\n")

    def self_signed(name, cn, ext):
        _openssl("req", "-x509", *key, "-keyout", path(name + ".key"),
                 "-out", path(name + ".pem"), "-days", "3650",
                 "-config", config(name, cn, ext), "-extensions", "ext")

    def leaf(name, cn, san):
        cnf = config(name, cn, leaf_ext % san)
        _openssl("req", "-new", *key, "-keyout", path(name + ".key"),
                 "-out", path(name + ".csr"), "-config", cnf)
        _openssl("x509", "-req", "-in", path(name + ".csr"), "-CA", path("ca.pem"),
                 "-CAkey", path("ca.key"), "-set_serial",
                 str(int.from_bytes(os.urandom(8), "big")), "-days", "825", "-sha256",
                 "-extfile", cnf, "-extensions", "ext", "-out", path(name + ".pem"))

    self_signed("ca", "apm-ext audit TLS test CA", ca_ext)
    leaf("localhost", "localhost", "DNS:localhost,IP:127.0.0.1,IP:::1")
    leaf("othername", "otherhost.example", "DNS:otherhost.example")
    # trusted by nobody: not signed by the test CA, not in the system bundle
    self_signed("selfsigned", "localhost",
                leaf_ext % "DNS:localhost,IP:127.0.0.1,IP:::1")
    out = {"ca": path("ca.pem")}
    for n in ("localhost", "othername", "selfsigned"):
        out[n] = (path(n + ".pem"), path(n + ".key"))
    return out


def certs():
    """{"ca": pem path, "localhost"|"othername"|"selfsigned": (cert, key)}."""
    global _certs
    with _certs_lock:
        if _certs is None:
            d = tempfile.mkdtemp(prefix="apm-ext-audit-tls-")
            atexit.register(shutil.rmtree, d, True)
            _certs = _make_certs(d)
        return _certs


class LazyApm(collections.abc.Mapping):
    """FakeAPM keyword arguments for @scenario(apm=...); tls names a certs()
    entry, resolved only when the scenario runs (--list makes no certificate)."""

    def __init__(self, tls=None, **kw):
        self.tls, self.kw = tls, kw

    def _args(self):
        a = dict(self.kw)
        if self.tls:
            a["tls"] = certs()[self.tls]
        return a

    def __getitem__(self, k):
        return self._args()[k]

    def __iter__(self):
        return iter(list(self.kw) + (["tls"] if self.tls else []))

    def __len__(self):
        return len(self.kw) + (1 if self.tls else 0)


# --------------------------------------------------------------- AWS side

class Creds:
    def __init__(self):
        self.access_key = "ASIA" + os.urandom(8).hex().upper()
        self.secret_key = os.urandom(30).hex()
        self.session_token = "IQoJb3JpZ2luX2VjE" + os.urandom(40).hex()
        self.region = "us-east-1"

    def env(self, sm_endpoint):
        return {"AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_SESSION_TOKEN": self.session_token,
                "AWS_REGION": self.region, "AWS_DEFAULT_REGION": self.region,
                "ELASTIC_APM_LAMBDA_SECRETSMANAGER_ENDPOINT": sm_endpoint,
                TOKEN_ID_VAR: TOKEN_ID,
                "ELASTIC_APM_SECRET_TOKEN": None, "ELASTIC_APM_API_KEY": None}


def fake_aws(creds, cert):
    aws = FakeAWS(cert[0], cert[1], creds.access_key, creds.secret_key, creds.region,
                  creds.session_token)
    aws.secrets[TOKEN_ID] = TOKEN
    return aws


# --------------------------------------------------------------- helpers

def invocation(t, timeout=15, work=0.0):
    """One syncflush invocation: (inv, tx, t_flush, t_next). work: seconds the
    function runs after the agent's request (the extension is thawed)."""
    inv = t.lam.invoke()
    lines, tx = agent_payload(inv)
    s = agent_send(t.port, lines)
    assert s == 202, "agent POST answered %s, want 202" % s.status
    if work:
        threading.Event().wait(work)
    t_flush = time.monotonic()
    st = agent_flush(t.port)
    assert st == 202, "flushed=true answered %s, want 202" % st.status
    t.lam.runtime_done(inv)
    t_next = t.lam.finish(inv, timeout=timeout)
    return inv, tx, t_flush, t_next


def assert_released(t_flush, t_next, what):
    assert t_next - t_flush <= FWD_TIMEOUT + MARGIN, "%s: /next held %.3fs after the end " \
        "of the invocation (forwarder timeout %.1fs)" % (what, t_next - t_flush, FWD_TIMEOUT)


def log_lines(t, *words, levels=None):
    """The extension's log lines (as JSON text) containing every word."""
    out = []
    for rec in t.logs():
        if levels and str(rec.get("level", "")).lower() not in levels:
            continue
        text = json.dumps(rec)
        if all(w.lower() in text.lower() for w in words):
            out.append(text)
    return out


def aws_log(t, n=6):
    """Log lines that speak of AWS, TLS or anchors, for failure messages."""
    keep = [ln for ln in log_lines(t) if any(w in ln.lower() for w in (
        "secrets manager", "aws", "tls", "anchor", "certificate", "cannot connect"))]
    return keep[-n:] or ["(none)"]


def wait_until(pred, timeout, step=0.05):
    end = time.monotonic() + timeout
    ev = threading.Event()
    while True:
        v = pred()
        if v or time.monotonic() > end:
            return v
        ev.wait(step)


# --------------------------------------------------------------- a TLS server with one session cache

def parse_hello(data):
    """(session_id bytes, sni or None) from the first TLS record of a
    connection; None while incomplete; raises ValueError if not a ClientHello."""
    if len(data) < 5:
        return None
    if data[0] != 0x16:
        raise ValueError("first byte 0x%02x: not a TLS handshake record" % data[0])
    rlen = int.from_bytes(data[3:5], "big")
    if len(data) < 5 + rlen:
        return None
    b = data[5:5 + rlen]
    if b[0] != 1:
        raise ValueError("handshake message %d, want ClientHello" % b[0])
    end = 4 + int.from_bytes(b[1:4], "big")
    p = 4 + 2 + 32
    sid = bytes(b[p + 1:p + 1 + b[p]])
    p += 1 + b[p]
    p += 2 + int.from_bytes(b[p:p + 2], "big")
    p += 1 + b[p]
    sni = None
    if p + 2 <= end:
        ext_end = p + 2 + int.from_bytes(b[p:p + 2], "big")
        p += 2
        while p + 4 <= min(ext_end, end):
            etype = int.from_bytes(b[p:p + 2], "big")
            elen = int.from_bytes(b[p + 2:p + 4], "big")
            ext = b[p + 4:p + 4 + elen]
            p += 4 + elen
            if etype == 0 and len(ext) >= 5 and ext[2] == 0:
                sni = bytes(ext[5:5 + int.from_bytes(ext[3:5], "big")]).decode(
                    "ascii", "replace")
    return sid, sni


class Conn:
    """One accepted connection as SessionServer saw it."""

    def __init__(self, role, n):
        self.role, self.n = role, n
        self.t_accept = time.monotonic()
        self.hello_sid = None       # session id offered in the ClientHello (b"" none)
        self.sni = None
        self.t_hello = None
        self.handshake_ok = None    # None: not finished
        self.error = None
        self.reused = None          # the server resumed a session
        self.sid = None             # the session id after the handshake
        self.requests = []          # [Req]
        self.sock = None
        self.closed = False

    def __repr__(self):
        return "<%s conn %d: offered %s, %s%s, %d request(s)>" % (
            self.role, self.n,
            "session %s" % self.hello_sid.hex()[:16] if self.hello_sid else "no session",
            "handshake ok" if self.handshake_ok else
            "handshake failed (%s)" % self.error if self.handshake_ok is False else
            "handshake unfinished",
            ", RESUMED" if self.reused else "", len(self.requests))


class Req:
    def __init__(self, method, path, headers, body):
        self.method, self.path, self.headers, self.body = method, path, headers, body
        self.tx_ids = []

    def header(self, name):
        return self.headers.get(name.lower())

    def __repr__(self):
        return "<%s %s %s%s>" % (self.method, self.path, self.header("x-amz-target") or "",
                                 " X-Amz-Security-Token" if self.header(
                                     "x-amz-security-token") else "")


class SessionServer:
    """roles: {name: certificate name in certs()}. The first role's
    certificate is the listener context's; every role listens on its own
    port of 127.0.0.1 (and ::1 when possible) with that one context, so one
    session cache serves them all. .url(role), .conns, .drop(role), .close()."""

    def __init__(self, roles, secret=TOKEN):
        c = certs()
        self.secret = secret
        self.conns = []
        self._cv = threading.Condition()
        self._closed = False
        self._ctxs = {}
        for name, cert in roles.items():
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            # An end of stream without close_notify is an end like any other: by
            # default OpenSSL 3 answers it with a fatal alert, and a fatal alert
            # evicts the session from the cache (no real server forgets it so)
            ctx.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
            ctx.load_cert_chain(*c[cert])
            self._ctxs[name] = ctx
        self.ctx = self._ctxs[next(iter(roles))]   # the one that holds the sessions
        self.ctx.sni_callback = self._sni
        self.ports, self._role_of_port, self._listeners = {}, {}, []
        for name in roles:
            port, socks = self._listen()
            self.ports[name] = port
            self._role_of_port[port] = name
            for s in socks:
                self._listeners.append(s)
                threading.Thread(target=self._accept, args=(s, name), daemon=True,
                                 name="session-server-%s" % name).start()

    def _listen(self):
        """A port on 127.0.0.1, and the same on ::1 when localhost may mean ::1."""
        want6 = _localhost_v6()
        for _ in range(20):
            s4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s4.bind(("127.0.0.1", 0))
            port = s4.getsockname()[1]
            socks = [s4]
            if want6:
                s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    s6.bind(("::1", port))
                    socks.append(s6)
                except OSError:
                    s6.close()
                    s4.close()
                    continue
            for s in socks:
                s.listen(16)
                s.settimeout(0.1)
            return port, socks
        raise AssertionError("no port free on both 127.0.0.1 and ::1")

    def url(self, role):
        return "https://localhost:%d" % self.ports[role]

    def _sni(self, sslsock, server_name, ctx):
        try:
            port = sslsock.getsockname()[1]
        except OSError:
            return None
        role = self._role_of_port.get(port)
        if role is not None and self._ctxs[role] is not self.ctx:
            sslsock.context = self._ctxs[role]
        return None

    def _accept(self, ls, role):
        while not self._closed:
            try:
                s, _ = ls.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._cv:
                rec = Conn(role, len(self.conns) + 1)
                self.conns.append(rec)
                self._cv.notify_all()
            threading.Thread(target=self._serve, args=(s, rec), daemon=True).start()

    def _set(self, rec, **kw):
        with self._cv:
            for k, v in kw.items():
                setattr(rec, k, v)
            self._cv.notify_all()

    def _serve(self, s, rec):
        s.settimeout(10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rec.sock = s
        tls = None
        try:
            data = b""
            while True:
                data = s.recv(16384, socket.MSG_PEEK)
                if not data:
                    raise OSError("closed before a ClientHello")
                hello = parse_hello(data)
                if hello is not None:
                    break
                time.sleep(0.005)
            self._set(rec, hello_sid=hello[0], sni=hello[1], t_hello=time.monotonic())
            tls = self.ctx.wrap_socket(s, server_side=True, do_handshake_on_connect=False)
            rec.sock = tls
            if self._closed:
                return
            try:
                tls.do_handshake()
            except (OSError, ssl.SSLError, ValueError) as e:
                self._set(rec, handshake_ok=False, error=str(e))
                return
            sess = tls.session
            self._set(rec, handshake_ok=True, reused=tls.session_reused,
                      sid=sess.id if sess is not None else None)
            tls.settimeout(None)
            f = tls.makefile("rb")
            while not self._closed:
                req = self._read_request(f)
                if req is None:
                    return
                with self._cv:
                    rec.requests.append(req)
                    self._cv.notify_all()
                tls.sendall(self._answer(rec.role, req))
        except (OSError, ssl.SSLError, ValueError) as e:
            if rec.handshake_ok is None:
                self._set(rec, handshake_ok=False, error=str(e))
        finally:
            if rec.handshake_ok:
                # close_notify first: OpenSSL drops from its cache the session of a
                # connection freed without one, and a real server's cache keeps it
                try:
                    tls.settimeout(0.5)
                    tls.unwrap()
                except (OSError, ssl.SSLError, ValueError):
                    pass
            try:
                (tls or s).close()
            except OSError:
                pass
            self._set(rec, closed=True)

    @staticmethod
    def _read_request(f):
        line = f.readline(65537)
        if not line:
            return None
        method, path = line.decode("latin-1").split(" ")[:2]
        headers = {}
        while True:
            h = f.readline(65537)
            if h in (b"\r\n", b"\n", b""):
                break
            k, _, v = h.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        body = bytearray()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size = int(f.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while f.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                body += f.read(size)
                f.readline()
        else:
            body += f.read(int(headers.get("content-length") or 0))
        req = Req(method, path, headers, bytes(body))
        enc = headers.get("content-encoding", "").lower()
        try:
            raw = gzip.decompress(body) if enc == "gzip" else \
                zlib.decompress(body) if enc == "deflate" else bytes(body)
            for ln in raw.splitlines():
                if ln.strip():
                    o = json.loads(ln)
                    if "transaction" in o:
                        req.tx_ids.append(o["transaction"].get("id"))
        except (ValueError, OSError, zlib.error):
            pass
        return req

    def _answer(self, role, req):
        if role == "sm":
            body = json.dumps({"ARN": "arn:aws:secretsmanager:us-east-1:123456789012:"
                               "secret:%s-AbCdEf" % TOKEN_ID, "Name": TOKEN_ID,
                               "VersionId": "v1", "VersionStages": ["AWSCURRENT"],
                               "SecretString": self.secret}).encode()
            return b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\n" \
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        if req.method == "POST" and req.path.startswith("/intake/v2/events"):
            return b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"
        body = b'{"version":"8.15.0"}'
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" \
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)

    # ---- what was seen
    def of(self, role):
        with self._cv:
            return [c for c in self.conns if c.role == role]

    def requests(self, role):
        return [r for c in self.of(role) for r in list(c.requests)]

    def delivered(self, tx):
        tid = tx_of(tx)["id"]
        for c in self.of("apm"):
            for r in list(c.requests):
                if tid in r.tx_ids:
                    return c, r
        return None

    def wait(self, pred, timeout):
        end = time.monotonic() + timeout
        with self._cv:
            while not pred():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.1))
            return True

    def drop(self, role):
        """Close every connection of this role now: its reader sees the end of
        the stream, sends a close_notify and closes."""
        for c in self.of(role):
            if c.sock is not None:
                try:
                    socket.socket.shutdown(c.sock, socket.SHUT_RD)
                except OSError:
                    pass

    def open_conns(self, role):
        return [c for c in self.of(role) if c.handshake_ok and not c.closed]

    def close(self):
        self._closed = True
        for s in self._listeners:
            s.close()
        self.drop("apm")
        self.drop("sm")


def _localhost_v6():
    try:
        return any(a[0] == socket.AF_INET6 for a in socket.getaddrinfo("localhost", None))
    except OSError:
        return False


# --------------------------------------------------------------- defect 3

@scenario(apm=LazyApm(tls="selfsigned", token=TOKEN),
          env=dict(FWD_ENV, **{VERIFY_VAR: "false"}))
def audit_tls_3_verify_off_still_fetches_secret(t):
    """VERIFY_SERVER_CERT=false + Secrets Manager id: secret fetched, delivered with it.

    The fake Secrets Manager's certificate comes from the test CA given in
    ELASTIC_APM_SERVER_CA_CERT_FILE; the APM server's is self-signed (accepted, as
    verification is off for it)."""
    creds = Creds()
    aws = fake_aws(creds, certs()["localhost"])
    try:
        env = creds.env(aws.url)
        env[CA_FILE_VAR] = certs()["ca"]
        t.start(env)
        txs = []
        for i in range(4):
            inv, tx, t_flush, t_next = invocation(t)
            assert_released(t_flush, t_next, "invocation %d" % i)
            txs.append(tx)
            if aws.calls_to(SM_TARGET, ok=True) and first_delivery(t.apm, tx):
                break
        ok = aws.calls_to(SM_TARGET, ok=True)
        assert ok, "with %s=false the secret was never fetched after %d invocations: the " \
            "fake Secrets Manager (certificate from the CA in %s) saw %d connection(s), " \
            "%s; nothing can be delivered without it (APM server saw %d requests). " \
            "Extension: %s" % (VERIFY_VAR, len(txs), CA_FILE_VAR, len(aws.connections),
                               aws.summary(), len(t.apm.requests), aws_log(t))
        assert not aws.tls_errors, "TLS errors at the fake Secrets Manager: %s" % \
            aws.tls_errors[:3]
        for c in aws.calls:
            assert c.sig_ok, "%r: signature rejected: %s" % (c, c.sig_error)
            assert c.json == {"SecretId": TOKEN_ID, "VersionStage": "AWSCURRENT"}, c.body
        t.shutdown_ok()
        got = [tx for tx in txs if first_delivery(t.apm, tx)]
        assert got, "secret fetched but none of %d transactions delivered (APM server saw " \
            "%s; TLS errors %s)" % (len(txs), t.apm.requests[-4:], t.apm.tls_errors[-2:])
        assert t.apm.intake_requests(), "no intake request"
        bad = [r for r in t.apm.requests
               if r.headers.get("Authorization") != "Bearer " + TOKEN]
        assert not bad, "%d request(s) to the APM server without the fetched token: %s" % (
            len(bad), [(r.method, r.path, (r.headers.get("Authorization") or "none")[:7])
                       for r in bad[:4]])
        assert all(r.t_start >= ok[0].t_answer for r in t.apm.requests), \
            "a request reached the APM server before the secret was fetched"
    finally:
        aws.close()


@scenario(apm=LazyApm(tls="selfsigned", token=TOKEN),
          env=dict(FWD_ENV, **{VERIFY_VAR: "false"}))
def audit_tls_3_aws_still_verified(t):
    """VERIFY_SERVER_CERT=false: an untrusted AWS endpoint is still verified, and refused.

    Its certificate is self-signed (no anchor vouches for it): a handshake is
    tried, fails, the reason is logged, no GetSecretValue reaches it, nothing is
    delivered without the secret."""
    creds = Creds()
    aws = fake_aws(creds, certs()["selfsigned"])
    try:
        env = creds.env(aws.url)
        env[CA_FILE_VAR] = certs()["ca"]   # anchors exist; none vouches for the fake
        t.start(env)
        for i in range(3):
            inv, tx, t_flush, t_next = invocation(t)
            assert_released(t_flush, t_next, "invocation %d" % i)
            assert not aws.calls, "invocation %d: the AWS endpoint with an untrusted " \
                "certificate got requests: %s" % (i, aws.summary())
            assert not first_delivery(t.apm, tx), "invocation %d delivered without the " \
                "secret" % i
            if aws.tls_errors and log_lines(t, "secrets manager", "trusted"):
                break
        assert not t.apm.requests, "the APM server got %d request(s) although the secret " \
            "could not be fetched: %s" % (len(t.apm.requests), t.apm.requests[:3])
        assert aws.connections, "with %s=false the extension never even tried the AWS " \
            "endpoint (0 connections in %d invocations): it has no trust anchors to verify " \
            "it with, so it is refused without a handshake (or not at all, had it been " \
            "trusted). Extension: %s" % (VERIFY_VAR, i + 1, aws_log(t))
        assert aws.tls_errors, "the fake Secrets Manager saw %d connection(s) but no failed " \
            "handshake" % len(aws.connections)
        why = log_lines(t, "secrets manager", "trusted",
                        levels=("warn", "warning", "error", "critical"))
        assert why, "no warn/error line says the Secrets Manager certificate is not " \
            "trusted; extension: %s" % aws_log(t)
        t.shutdown_ok()
        assert not aws.calls, "GetSecretValue reached an untrusted endpoint: %s" % \
            aws.summary()
        assert not t.apm.requests, "the APM server got requests without auth: %s" % (
            t.apm.requests[:3],)
    finally:
        aws.close()


# --------------------------------------------------------------- defect 4

@scenario(env=FWD_ENV)
def audit_tls_4_no_session_across_endpoints(t):
    """The APM server's TLS session is never offered to (nor resumed at) Secrets Manager.

    One TLS server, one session cache, two ports: the APM port's certificate is
    right, the Secrets Manager port's (same trusted CA) is for another name.
    Every Secrets Manager handshake must fail, none may offer a session, and no
    GetSecretValue may reach it, over several seconds of retries."""
    srv = SessionServer({"apm": "localhost", "sm": "othername"})
    creds = Creds()
    try:
        env = creds.env(srv.url("sm"))
        env[CA_FILE_VAR] = certs()["ca"]
        env["ELASTIC_APM_LAMBDA_APM_SERVER"] = srv.url("apm")
        t.start(env)
        assert srv.wait(lambda: any(c.handshake_ok for c in srv.of("apm")), 5), \
            "no successful handshake at the APM server after init: %s; extension: %s" % (
                srv.of("apm"), aws_log(t))
        t_apm = min(c.t_hello for c in srv.of("apm") if c.handshake_ok)
        t_end = time.monotonic() + 6.0
        n = 0
        while time.monotonic() < t_end and not srv.requests("sm"):
            # the extension lets invocations go at once while it cannot deliver:
            # each one runs a while, so that it is thawed long enough to retry
            inv, tx, t_flush, t_next = invocation(t, work=0.25)
            assert_released(t_flush, t_next, "invocation %d" % n)
            n += 1
        sm = srv.of("sm")
        sm_reqs = srv.requests("sm")
        apm_sids = {c.sid for c in srv.of("apm") if c.sid}
        resumed = [c for c in sm if c.reused]
        offered = [c for c in sm if c.hello_sid]
        assert not sm_reqs, "the Secrets Manager endpoint, whose certificate is for " \
            "otherhost.example, got %d request(s) %s (GetSecretValue signed with the " \
            "session token); its connections: %s. %d resumed a session (%s of them the " \
            "APM server's): a resumed session skips the certificate checks" % (
                len(sm_reqs), sm_reqs[:3], sm, len(resumed),
                sum(1 for c in resumed if c.hello_sid in apm_sids))
        assert not resumed, "Secrets Manager handshakes resumed a session: %s" % resumed
        assert not offered, "a Secrets Manager ClientHello offered a session id (%s): " \
            "the APM server's session must never be offered to another endpoint" % [
                (c.n, c.hello_sid.hex()[:16], c.hello_sid in apm_sids) for c in offered]
        after = [c for c in sm if c.t_hello is not None and c.t_hello > t_apm]
        assert len(sm) >= 2 and after, "the test proves nothing: %d Secrets Manager " \
            "handshake(s), %d after the APM server's session existed (%s)" % (
                len(sm), len(after), sm)
        bad = [c for c in sm if c.handshake_ok]
        assert not bad, "Secrets Manager handshakes completed with a wrong-name " \
            "certificate: %s" % bad
        why = log_lines(t, "secrets manager", "host name",
                        levels=("warn", "warning", "error", "critical"))
        assert why, "no warn/error line says the Secrets Manager certificate does not " \
            "match the host name; extension: %s" % aws_log(t)
        assert not srv.requests("apm"), "the APM server got requests without the " \
            "secret: %s" % srv.requests("apm")[:3]
        t.shutdown_ok()
        assert not srv.requests("sm"), "GetSecretValue went out at shutdown: %s" % (
            srv.of("sm"),)
    finally:
        srv.close()


@scenario(env={"ELASTIC_APM_DATA_FORWARDER_TIMEOUT": "3s"})
def audit_tls_4_apm_resumes_own_session(t):
    """Guard: after the APM server closed the connection, its own session is resumed.

    The server closes it while the sandbox is frozen; the next connection offers
    the session the server gave before and the server resumes it."""
    srv = SessionServer({"apm": "localhost"})
    try:
        t.start({CA_FILE_VAR: certs()["ca"], "ELASTIC_APM_LAMBDA_APM_SERVER": srv.url("apm")})
        inv, tx1, t_flush, t_next = invocation(t)
        d1 = srv.delivered(tx1)
        assert d1 is not None, "invocation 1 not delivered before /next: %s" % srv.conns
        first = d1[0]
        assert first.handshake_ok and first.sid, "first connection: %r" % first
        srv.drop("apm")                     # frozen: the extension cannot notice now
        assert srv.wait(lambda: not srv.open_conns("apm"), 5), "connections not closed: " \
            "%s" % srv.conns
        inv, tx2, t_flush, t_next = invocation(t)
        d2 = srv.delivered(tx2)
        assert d2 is not None, "invocation 2 (after the server closed the connection) not " \
            "delivered before /next: %s" % srv.conns
        second = d2[0]
        assert second is not first, "invocation 2 came on the closed connection?! %s" % \
            srv.conns
        assert second.hello_sid, "the new connection to the APM server offered no session " \
            "to resume (connections: %s)" % srv.conns
        assert second.hello_sid in {c.sid for c in srv.of("apm") if c.n < second.n}, \
            "the new connection offered session %s, not one the APM server gave before " \
            "(%s)" % (second.hello_sid.hex()[:16], srv.conns)
        assert second.reused, "the APM server did not resume the offered session: %r " \
            "(connections: %s)" % (second, [(c, c.error) for c in srv.conns])
        t.shutdown_ok()
    finally:
        srv.close()
