"""End-to-end scenarios for HTTPS to the APM server (TLS 1.2 via BearSSL).

Loaded by test/e2e/e2e.py (python3 test/e2e/e2e.py -k tls_). The scenarios run the
real binary against a FakeAPM that serves HTTPS with throwaway certificates
(fake_apm.make_test_ca, made once per run in a temporary directory):

  ca              the test CA; `cert` (localhost, 127.0.0.1, ::1) is signed by it
  wrong_ca        an unrelated CA
  wronghost_cert  signed by ca, valid for otherhost.example only

What they rely on from the extension (its environment):
  ELASTIC_APM_LAMBDA_APM_SERVER=https://localhost:PORT (or https://127.0.0.1:PORT)
  ELASTIC_APM_SERVER_CA_CERT_FILE         a PEM file of extra trust anchors
  ELASTIC_APM_LAMBDA_SERVER_CA_CERT_PEM   PEM text; a literal backslash-n = newline
  ELASTIC_APM_LAMBDA_VERIFY_SERVER_CERT=false   no verification, one warning
plus the system bundle (first of /etc/pki/tls/certs/ca-bundle.crt,
/etc/ssl/certs/ca-certificates.crt), which never holds the test CA.

E2E_TLS_PLAIN=1 runs the same scenario logic against a plain-http fake (the
TLS-only checks are skipped). That checks the scenarios themselves with a
binary without https; the refusal scenarios cannot pass that way.
"""

import atexit
import collections.abc
import errno
import json
import os
import select
import shutil
import socket
import struct
import tempfile
import threading
import time

from e2e import (scenario, Skip, agent_send, agent_send_spans, agent_flush, agent_payload,
                 first_delivery, delivered_requests, tx_delivered, tx_of, check_forwarded,
                 http_request, AGENT_TOKEN, AGENT_UA)
from fake_apm import make_test_ca, SERVER_INFO

PLAIN = os.environ.get("E2E_TLS_PLAIN") == "1"
FWD_TIMEOUT = 1.0   # ELASTIC_APM_DATA_FORWARDER_TIMEOUT where a bound is measured
MARGIN = 1.0        # allowed past the forwarder timeout (as in e2e.py)
MAX_ATTEMPTS = 20   # handshakes a failing server may see in a scenario (backoff, no hot loop)
VERIFY_VAR = "ELASTIC_APM_LAMBDA_VERIFY_SERVER_CERT"
CA_FILE_VAR = "ELASTIC_APM_SERVER_CA_CERT_FILE"
CA_PEM_VAR = "ELASTIC_APM_LAMBDA_SERVER_CA_CERT_PEM"

# --------------------------------------------------------------- certificates

_certs = None
_certs_lock = threading.Lock()


def certs():
    """Paths of the throwaway CA and certificates (made on first use)."""
    global _certs
    with _certs_lock:
        if _certs is None:
            d = tempfile.mkdtemp(prefix="apm-ext-tls-")
            atexit.register(shutil.rmtree, d, True)
            _certs = make_test_ca(d)
        return _certs


class TLSApm(collections.abc.Mapping):
    """FakeAPM keyword arguments for @scenario(apm=...), with tls=(cert, key)
    resolved only when the scenario runs (so --list and -k make no CA).
    cert names a certs() entry: "cert" or "wronghost_cert"."""

    def __init__(self, cert="cert", **kw):
        self.cert, self.kw = cert, kw

    def _args(self):
        a = dict(self.kw)
        if not PLAIN:
            c = certs()
            a["tls"] = (c[self.cert], c[self.cert.replace("cert", "key")])
        return a

    def __getitem__(self, k):
        return self._args()[k]

    def __iter__(self):
        return iter(self._args())

    def __len__(self):
        return len(self.kw) + (0 if PLAIN else 1)


def ca_file_env(which="ca"):
    return {CA_FILE_VAR: certs()[which]}


def ca_pem_env_escaped(which="ca"):
    """The CA as PEM text with each newline written as the two characters \\ n."""
    with open(certs()[which], encoding="ascii") as f:
        pem = f.read().strip()
    v = pem.replace("\n", "\\n")
    assert "\n" not in v and "\\n" in v and v.startswith("-----BEGIN CERTIFICATE-----")
    return {CA_PEM_VAR: v}


# --------------------------------------------------------------- helpers

def invocation(t, spans=2):
    """One syncflush invocation whose data goes through the extension:
    returns (inv, tx, sent, t_flush, t_next). t_flush is taken just before
    the agent's flushed=true (the end of the invocation)."""
    inv = t.lam.invoke()
    lines, tx = agent_payload(inv, spans=spans)
    sent = agent_send(t.port, lines)
    assert sent == 202, "agent POST answered %s, want 202" % sent.status
    t_flush = time.monotonic()
    st = agent_flush(t.port)
    assert st == 202, "flushed=true answered %s, want 202" % st.status
    t.lam.runtime_done(inv)
    t_next = t.lam.finish(inv, timeout=FWD_TIMEOUT + MARGIN + 10)
    return inv, tx, sent, t_flush, t_next


def assert_delivered_before_next(t, tx, t_flush, t_next, what, held=2.0):
    req = first_delivery(t.apm, tx)
    assert req is not None, "%s: transaction not at the APM server when the extension " \
        "called /next (APM server saw %d requests, TLS errors: %s)" % (
            what, len(t.apm.requests), t.apm.tls_errors[-3:])
    assert req.t_end <= t_next, "%s: /next %.3fs before the APM server answered" % (
        what, req.t_end - t_next)
    assert t_next - t_flush < held, "%s: /next held %.3fs after the flush" % (
        what, t_next - t_flush)
    return req


def assert_released(t_flush, t_next, what):
    """The invocation was not held past the forwarder timeout (+ margin)."""
    assert t_next - t_flush <= FWD_TIMEOUT + MARGIN, "%s: /next held %.3fs after the end " \
        "of the invocation, forwarder timeout %.1fs" % (what, t_next - t_flush, FWD_TIMEOUT)


def assert_once(apm, txs):
    for i, tx in enumerate(txs):
        n = len(delivered_requests(apm, tx))
        assert n == 1, "transaction %d (%s) delivered %d times, want once" % (
            i, tx_of(tx)["id"], n)


def assert_no_tls_errors(t):
    assert not t.apm.tls_errors, "TLS handshakes failed at the APM server: %s" % (
        t.apm.tls_errors[:3],)


def log_text(rec):
    """A log record's words, lower case, without time and level."""
    return json.dumps({k: v for k, v in rec.items() if k not in ("time", "level")}).lower()


def warn_or_error(logs):
    return [r for r in logs if str(r.get("level", "")).lower() in
            ("warn", "warning", "error", "critical")]


def wait_logs(t, pred, what, timeout=2.0):
    """Poll the extension's log until pred(logs) holds (the log file has no
    notification to wait on). Returns pred's value."""
    end = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        v = pred(t.logs())
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError("timed out after %.1fs waiting for %s in the extension's "
                                 "log" % (timeout, what))
        pause.wait(0.05)


# --------------------------------------------------------------- a stalling server

def parse_client_hello(data):
    """(legacy_version, sni or None) from the first TLS record of a connection,
    or None while incomplete. Raises AssertionError if it is not a ClientHello."""
    if len(data) < 5:
        return None
    assert data[0] == 0x16, "first byte 0x%02x: not a TLS handshake record (%r)" % (
        data[0], bytes(data[:16]))
    rlen = int.from_bytes(data[3:5], "big")
    if len(data) < 5 + rlen:
        return None
    b = bytes(data[5:5 + rlen])
    assert b[0] == 1, "first handshake message type %d, want ClientHello (1)" % b[0]
    hlen = int.from_bytes(b[1:4], "big")
    assert hlen <= len(b) - 4, "ClientHello split over records (%d > %d)" % (hlen, len(b) - 4)
    p = 4
    version = int.from_bytes(b[p:p + 2], "big")
    p += 2 + 32                                     # version, random
    p += 1 + b[p]                                   # session id
    p += 2 + int.from_bytes(b[p:p + 2], "big")      # cipher suites
    p += 1 + b[p]                                   # compression methods
    sni = None
    if p + 2 <= 4 + hlen:
        end = p + 2 + int.from_bytes(b[p:p + 2], "big")
        p += 2
        while p + 4 <= end:
            etype = int.from_bytes(b[p:p + 2], "big")
            elen = int.from_bytes(b[p + 2:p + 4], "big")
            ext = b[p + 4:p + 4 + elen]
            p += 4 + elen
            if etype == 0 and len(ext) >= 5 and ext[2] == 0:   # server_name, host_name
                n = int.from_bytes(ext[3:5], "big")
                sni = ext[5:5 + n].decode("ascii", "replace")
    return version, sni


class StallServer:
    """Accepts TCP on 127.0.0.1 (and ::1, same port, when available), reads
    whatever comes and never writes a byte: a server stuck mid-handshake.
    .conns: [{"data": bytearray, "t_accept": t, "t_eof": t or None}]."""

    def __init__(self):
        self.conns = []
        self._cv = threading.Condition()
        self._closed = False
        self.listeners = []
        for _ in range(20):
            s4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s4.bind(("127.0.0.1", 0))
            self.port = s4.getsockname()[1]
            ls = [s4]
            try:
                s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    s6.bind(("::1", self.port))
                    ls.append(s6)
                except OSError as e:
                    s6.close()
                    if e.errno == errno.EADDRINUSE:
                        s4.close()
                        continue
            except OSError:
                pass  # no IPv6 here: "localhost" is 127.0.0.1 only
            self.listeners = ls
            break
        assert self.listeners, "no port free on both 127.0.0.1 and ::1"
        for s in self.listeners:
            s.listen(16)
        self._thread = threading.Thread(target=self._run, daemon=True, name="stall-server")
        self._thread.start()

    def _run(self):
        socks = {}  # socket -> conn record
        try:
            while not self._closed:
                r, _, _ = select.select(self.listeners + list(socks), [], [], 0.05)
                for s in r:
                    if s in self.listeners:
                        try:
                            c, _ = s.accept()
                        except OSError:
                            continue
                        rec = {"data": bytearray(), "t_accept": time.monotonic(),
                               "t_eof": None}
                        socks[c] = rec
                        with self._cv:
                            self.conns.append(rec)
                            self._cv.notify_all()
                        continue
                    try:
                        d = s.recv(65536)
                    except OSError:
                        d = b""
                    with self._cv:
                        if d:
                            socks[s]["data"] += d
                        else:
                            socks[s]["t_eof"] = time.monotonic()
                            del socks[s]
                            s.close()
                        self._cv.notify_all()
        finally:
            for s in list(socks) + self.listeners:
                s.close()

    def wait_for(self, pred, timeout, what):
        end = time.monotonic() + timeout
        with self._cv:
            while not pred(self):
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError("timed out after %.1fs waiting for %s (stalling "
                                         "server saw %d connections)" % (
                                             timeout, what, len(self.conns)))
                self._cv.wait(min(left, 0.1))

    def close(self):
        self._closed = True
        self._thread.join(2)


# --------------------------------------------------------------- deliveries

@scenario(apm=TLSApm(token="s3cret"))
def tls_ca_file_delivery(t):
    """https://localhost, CA from ELASTIC_APM_SERVER_CA_CERT_FILE: delivered before /next."""
    assert PLAIN or t.apm.url.startswith("https://localhost:"), t.apm.url
    t.start(env=ca_file_env())
    for i in range(2):
        inv, tx, sent, t_flush, t_next = invocation(t)
        req = assert_delivered_before_next(t, tx, t_flush, t_next, "invocation %d" % i)
        check_forwarded(req, sent, "invocation %d" % i)
        auth = req.headers.get("Authorization")
        assert auth == "Bearer s3cret", "upstream Authorization %r" % auth
    assert_no_tls_errors(t)
    t.shutdown_ok()


@scenario(apm=TLSApm())
def tls_ca_pem_env_delivery(t):
    """CA from ELASTIC_APM_LAMBDA_SERVER_CA_CERT_PEM, newlines written as \\n: delivered."""
    t.start(env=ca_pem_env_escaped())
    inv, tx, sent, t_flush, t_next = invocation(t)
    req = assert_delivered_before_next(t, tx, t_flush, t_next, "invocation")
    check_forwarded(req, sent)
    assert_no_tls_errors(t)


@scenario(apm=TLSApm())
def tls_ip_address_url(t):
    """https://127.0.0.1:PORT: the certificate's IP address SAN matches; delivered."""
    url = ("http" if PLAIN else "https") + "://127.0.0.1:%d" % t.apm.port
    t.start(env=dict(ca_file_env(), ELASTIC_APM_LAMBDA_APM_SERVER=url))
    inv, tx, sent, t_flush, t_next = invocation(t)
    assert_delivered_before_next(t, tx, t_flush, t_next, "invocation")
    assert_no_tls_errors(t)


@scenario(apm=TLSApm(cert="wronghost_cert"), env={VERIFY_VAR: "false"})
def tls_verify_off_delivery(t):
    """VERIFY_SERVER_CERT=false: an untrusted, wrong-host certificate is accepted; one warning."""
    t.start()
    if not PLAIN:
        wait_logs(t, lambda logs: [r for r in warn_or_error(logs)
                                   if VERIFY_VAR.lower() in log_text(r)],
                  "a warning naming %s before the end of init" % VERIFY_VAR)
    inv, tx, sent, t_flush, t_next = invocation(t)
    assert_delivered_before_next(t, tx, t_flush, t_next, "invocation 1")
    inv, tx2, sent, t_flush, t_next = invocation(t)
    assert_delivered_before_next(t, tx2, t_flush, t_next, "invocation 2")
    t.shutdown_ok()
    assert_no_tls_errors(t)
    if not PLAIN:
        warns = [r for r in warn_or_error(t.logs()) if VERIFY_VAR.lower() in log_text(r)]
        assert len(warns) == 1, "want one warning naming %s, got %d: %r" % (
            VERIFY_VAR, len(warns), warns[:3])
        assert str(warns[0].get("level")).lower() in ("warn", "warning"), \
            "%s logged at level %r, want warn" % (VERIFY_VAR, warns[0].get("level"))
        # nothing to verify, and no AWS call (no secrets) needs them: no trust
        # anchors are loaded (the CA bundle is never read)
        anchors = [r for r in t.logs() if "trust anchors from" in log_text(r)]
        assert not anchors, "trust anchors loaded with verification off and no secrets: " \
            "%r" % anchors[:2]


@scenario(apm=TLSApm(token="s3cret"))
def tls_proxy_get_root(t):
    """GET / and /config/v1/agents are proxied over TLS with our Authorization."""
    t.start(env=ca_file_env())
    st, hdrs, body = http_request(t.port, "GET", "/", headers={
        "Authorization": "Bearer " + AGENT_TOKEN, "User-Agent": AGENT_UA})
    assert st == 200, "GET / answered %s: %r" % (st, body[:200])
    info = json.loads(body)
    assert info.get("version") == SERVER_INFO["version"], "GET / version %r, want the " \
        "fake's %r" % (info.get("version"), SERVER_INFO["version"])
    roots = [r for r in t.apm.requests if r.path == "/"]
    assert roots, "the APM server never saw GET /"
    auth = roots[0].headers.get("Authorization")
    assert auth == "Bearer s3cret", "upstream got Authorization %r" % auth
    st, _, body = http_request(t.port, "GET", "/config/v1/agents?service.name=test-fn",
                               headers={"Authorization": "Bearer " + AGENT_TOKEN})
    assert st == 200, "/config/v1/agents answered %s: %r" % (st, body[:200])
    assert any(r.path == "/config/v1/agents" for r in t.apm.requests), \
        "the APM server never saw /config/v1/agents"
    assert_no_tls_errors(t)


@scenario(apm=TLSApm(), env={"ELASTIC_APM_DATA_FORWARDER_TIMEOUT": "5s"})
def tls_payload_1mb(t):
    """A 1 MB body (some 30 send buffers) goes over TLS whole and unchanged, before /next."""
    t.start(env=ca_file_env())
    inv = t.lam.invoke()
    s, tx = agent_send_spans(t.port, inv, 900, 1_000_000, "1 MB POST")
    assert agent_flush(t.port) == 202
    t.lam.runtime_done(inv)
    t_next = t.lam.finish(inv, timeout=15)
    req = first_delivery(t.apm, tx)
    assert req is not None, "1 MB payload not delivered over TLS (APM server saw %d " \
        "requests, TLS errors: %s)" % (len(t.apm.requests), t.apm.tls_errors[-3:])
    assert req.t_end <= t_next, "/next %.3fs before the APM server answered" % (
        req.t_end - t_next)
    check_forwarded(req, s, "1 MB payload over TLS")
    assert t.apm.count("span") == 900, "%d spans arrived, want 900" % t.apm.count("span")
    assert_no_tls_errors(t)


# --------------------------------------------------------------- connections

@scenario(apm=TLSApm())
def tls_keepalive_three_invocations(t):
    """Three invocations over one kept-alive TLS connection (the sandbox frozen between)."""
    t.start(env=ca_file_env())
    txs, conns_after, requests_before = [], [], []
    for i in range(3):
        requests_before.append(len(t.apm.requests))
        inv, tx, sent, t_flush, t_next = invocation(t)
        assert_delivered_before_next(t, tx, t_flush, t_next, "invocation %d" % i)
        txs.append(tx)
        conns_after.append(t.apm.connections_total)
    total = t.apm.connections_total
    assert total <= 2, "%d TCP connections (TLS handshakes) for 3 invocations, per " \
        "invocation %s: not kept alive" % (total, conns_after)
    # The first request of invocation 3 takes the idle kept-alive connection.
    # Invocation 2's platform telemetry may arrive late, during invocation 3,
    # and be delivered beside the agent's data: that second delivery may open
    # a second connection, which is parallelism, not a lost connection.
    first = t.apm.requests[requests_before[2]]
    assert first.conn_id <= conns_after[1], "invocation 3's first request came on " \
        "connection %d, opened during invocation 3: the connection did not survive the " \
        "freeze (connections after each invocation: %s)" % (first.conn_id, conns_after)
    t.shutdown_ok()
    assert_once(t.apm, txs)
    assert_no_tls_errors(t)


@scenario(apm=TLSApm())
def tls_warm_connection_before_first_invocation(t):
    """While the function initialises (after the first /next), the extension opens and
    handshakes one connection to the APM server; the first invocation's data goes on it."""
    t.start(env=ca_file_env())
    t.wait_apm(lambda a: a.connections_total >= 1,
               "a warm-up connection before the first invocation", 10)
    assert not t.apm.requests, "requests before any invocation: %r" % t.apm.requests
    inv, tx, sent, t_flush, t_next = invocation(t)
    req = assert_delivered_before_next(t, tx, t_flush, t_next, "the first invocation")
    assert req.conn_id == 1, "the first invocation's data came on connection %d, not on " \
        "the warm one" % req.conn_id
    t.shutdown_ok()
    assert_no_tls_errors(t)


@scenario(apm=TLSApm(), env={"ELASTIC_APM_DATA_FORWARDER_TIMEOUT": "1s"})
def tls_server_closes_between_invocations(t):
    """Connections dropped while frozen: next data and retried data arrive, once each."""
    t.start(env=ca_file_env())
    inv, tx1, _, t_flush, t_next = invocation(t)
    assert_delivered_before_next(t, tx1, t_flush, t_next, "invocation 1")
    t.apm.drop_connections()            # frozen: the extension cannot notice now
    assert t.apm.wait_for(lambda a: a.open_connections() == 0, 5), "connections not closed"

    inv, tx2, _, t_flush, t_next = invocation(t)
    assert_delivered_before_next(t, tx2, t_flush, t_next,
                                 "invocation 2 (after the server closed)")

    t.apm.fail_next(1000, 503)          # invocation 3: the server answers 503 throughout
    inv, tx3, _, t_flush, t_next = invocation(t)
    assert_released(t_flush, t_next, "invocation 3 (server answering 503)")
    assert not tx_delivered(t.apm, tx3), "tx3 delivered although the server answered 503"
    assert any(r.status == 503 for r in t.apm.intake_requests()), \
        "invocation 3's data never reached the server (no 503 answered)"
    t.apm.fail_next(0)                  # frozen with tx3 pending: recover, then drop
    t.apm.drop_connections()
    assert t.apm.wait_for(lambda a: a.open_connections() == 0, 5), "connections not closed"

    inv, tx4, _, t_flush, t_next = invocation(t)
    assert_released(t_flush, t_next, "invocation 4 (retry pending, connection closed)")
    t_exit = t.shutdown_ok()
    for name, tx in (("tx3 (retried)", tx3), ("tx4", tx4)):
        req = first_delivery(t.apm, tx)
        assert req is not None and req.t_end <= t_exit, "%s lost: not delivered by the " \
            "exit" % name
    assert_once(t.apm, [tx1, tx2, tx3, tx4])
    assert_no_tls_errors(t)


# --------------------------------------------------------------- refusals

def refused(t, env, reason_words, reason_what):
    """The extension must not complete a handshake with this server: two
    invocations released within the forwarder timeout, the data never seen by
    the server, handshakes retried with backoff, the reason logged."""
    t.start(env=dict(env, ELASTIC_APM_DATA_FORWARDER_TIMEOUT="1s"))
    def no_requests(when):
        reqs = t.apm.requests
        assert not reqs, "%s: the handshake succeeded and the server got %d HTTP requests " \
            "(%s); the connection should have been refused" % (when, len(reqs), reqs[:3])

    for i in range(2):
        inv, tx, _, t_flush, t_next = invocation(t)
        no_requests("invocation %d" % i)
        assert_released(t_flush, t_next, "invocation %d" % i)
        if i == 0:
            t.wait_apm(lambda a: a.tls_errors, "a handshake attempt (TLS error at the "
                       "server)", timeout=2)
    t.shutdown_ok()
    no_requests("after shutdown")
    n = len(t.apm.tls_errors)
    assert n >= 2, "only %d handshake attempt(s): a failed handshake must be retried" % n
    assert n <= MAX_ATTEMPTS, "%d handshake attempts in ~3s: no backoff" % n
    plain = [e for e in t.apm.tls_errors if "http_request" in e.lower()
             or "http request" in e.lower()]
    assert not plain, "the extension spoke plain HTTP to an https server: %s" % plain[:1]
    bad = warn_or_error(t.logs())
    why = [r for r in bad if any(w in log_text(r) for w in reason_words)]
    assert why, "no warn/error log line gives the reason (%s; any of %s). warn/error " \
        "lines: %s" % (reason_what, reason_words, [r.get("msg") for r in bad][:5])


@scenario(apm=TLSApm())
def tls_refused_unknown_ca(t):
    """Server cert signed by ca, the extension trusts wrong_ca only: refused, reason logged."""
    refused(t, ca_file_env("wrong_ca"), ("certificate", "unknown", "trust", "issuer"),
            "unknown CA")


@scenario(apm=TLSApm())
def tls_refused_system_trust_only(t):
    """No extra CA (system bundle only), server cert from the test CA: refused."""
    refused(t, {CA_FILE_VAR: None, CA_PEM_VAR: None},
            ("certificate", "unknown", "trust", "issuer"), "unknown CA")


@scenario(apm=TLSApm(cert="wronghost_cert"))
def tls_refused_wrong_host(t):
    """Server cert for otherhost.example (trusted CA): refused, the name mismatch logged."""
    refused(t, ca_file_env(), ("host name", "hostname", "name"), "wrong host name")


@scenario(apm=TLSApm(cert="wronghost_cert"))
def tls_refused_wrong_ip(t):
    """https://127.0.0.1, cert (trusted CA) for otherhost.example only: refused, mismatch logged."""
    url = "https://127.0.0.1:%d" % t.apm.port
    refused(t, dict(ca_file_env(), ELASTIC_APM_LAMBDA_APM_SERVER=url),
            ("name", "address", "match"), "certificate not for 127.0.0.1")


@scenario(env={"ELASTIC_APM_DATA_FORWARDER_TIMEOUT": "1s"})
def tls_stall_mid_handshake(t):
    """Server accepts TCP and never answers the ClientHello: invocations released, exit 0."""
    srv = StallServer()
    try:
        url = ("http" if PLAIN else "https") + "://localhost:%d" % srv.port
        env = {"ELASTIC_APM_LAMBDA_APM_SERVER": url}
        if not PLAIN:
            env.update(ca_file_env())
        t.start(env=env)
        for i in range(2):
            inv, tx, _, t_flush, t_next = invocation(t)
            assert_released(t_flush, t_next, "invocation %d" % i)
            if i == 0:
                srv.wait_for(lambda s: s.conns and len(s.conns[0]["data"]) >= 5, 2,
                             "the extension's first bytes")
        if not PLAIN:
            def hello(s):
                return parse_client_hello(s.conns[0]["data"])
            srv.wait_for(hello, 2, "a whole ClientHello")
            with srv._cv:
                version, sni = hello(srv)
            assert version >= 0x0303, "ClientHello offers version 0x%04x, want TLS 1.2" % (
                version)
            assert sni == "localhost", "ClientHello SNI %r, want 'localhost'" % sni
        n = len(srv.conns)
        assert n <= MAX_ATTEMPTS, "%d connections to the stalling server: no backoff" % n
        t.shutdown_ok()
    finally:
        srv.close()


# --------------------------------------------------------------- broken handshakes

class BreakServer:
    """Accepts TCP on 127.0.0.1, reads the whole ClientHello, then breaks the
    handshake as `mode` says: "close" (a FIN: closed cleanly), "reset" (an RST:
    SO_LINGER 0), "flight_reset" (answers with the server's first flight,
    made by Python's ssl on memory BIOs with certs()' cert, then an RST before
    the client's reply). .conns counts the ClientHellos answered so."""

    def __init__(self, mode):
        self.mode, self.conns, self._closed = mode, 0, False
        self._cv = threading.Condition()
        self._ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._ls.bind(("127.0.0.1", 0))
        self._ls.listen(16)
        self._ls.settimeout(0.1)
        self.port = self._ls.getsockname()[1]
        self._ctx = None
        if mode == "flight_reset":
            import ssl
            self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ctx.load_cert_chain(certs()["cert"], certs()["key"])
        self._thread = threading.Thread(target=self._run, daemon=True, name="break-server")
        self._thread.start()

    def _run(self):
        while not self._closed:
            try:
                c, _ = self._ls.accept()
            except OSError:
                continue
            try:
                self._serve(c)
            except OSError:
                pass
            finally:
                c.close()

    def _serve(self, c):
        c.settimeout(5)
        data = bytearray()
        while parse_client_hello(data) is None:
            d = c.recv(65536)
            if not d:
                return
            data += d
        if self.mode == "flight_reset":
            import ssl
            inb, outb = ssl.MemoryBIO(), ssl.MemoryBIO()
            obj = self._ctx.wrap_bio(inb, outb, server_side=True)
            inb.write(bytes(data))
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            c.sendall(outb.read())
        if self.mode in ("reset", "flight_reset"):
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with self._cv:
            self.conns += 1
            self._cv.notify_all()

    def wait_conns(self, n, timeout=3):
        end = time.monotonic() + timeout
        with self._cv:
            while self.conns < n:
                left = end - time.monotonic()
                assert left > 0, "the breaking server saw %d ClientHellos, want %d" % (
                    self.conns, n)
                self._cv.wait(left)

    def close(self):
        self._closed = True
        self._thread.join(2)
        self._ls.close()


def broken_handshake(t, mode, reason):
    """The server breaks every handshake (mode): invocations released within the
    forwarder timeout, handshakes retried with backoff, `reason` logged, exit 0."""
    if PLAIN:
        raise Skip("a broken TLS handshake needs the https build (E2E_TLS_PLAIN=1)")
    srv = BreakServer(mode)
    try:
        t.start(env=dict(ca_file_env(), ELASTIC_APM_LAMBDA_APM_SERVER="https://localhost:%d"
                         % srv.port, ELASTIC_APM_DATA_FORWARDER_TIMEOUT="1s"))
        for i in range(2):
            inv, tx, _, t_flush, t_next = invocation(t)
            assert_released(t_flush, t_next, "invocation %d" % i)
            if i == 0:
                srv.wait_conns(1)
        wait_logs(t, lambda rs: [r for r in warn_or_error(rs)
                                 if reason.lower() in log_text(r)],
                  "a warn/error line with %r" % reason)
        t.shutdown_ok()
        assert 2 <= srv.conns <= MAX_ATTEMPTS, "%d handshakes in ~3s (want retries, " \
            "with backoff)" % srv.conns
        assert not t.apm.requests, "data went elsewhere: %s" % t.apm.requests[:2]
    finally:
        srv.close()


@scenario()
def tls_server_closes_in_handshake(t):
    """The server closes (FIN) after the ClientHello: 'closed the connection during the
    handshake' logged; retried with backoff; not held; exit 0."""
    broken_handshake(t, "close", "closed the connection during the handshake")


@scenario()
def tls_server_resets_in_handshake(t):
    """The server resets after the ClientHello: 'Connection reset by peer' logged;
    retried with backoff; not held; exit 0."""
    broken_handshake(t, "reset", "connection reset by peer")


@scenario()
def tls_server_resets_after_its_flight(t):
    """The server sends its first flight, then resets before the client's reply: the
    reset logged; retried with backoff; not held; exit 0."""
    broken_handshake(t, "flight_reset", "connection reset by peer")


@scenario(apm=TLSApm())
def tls_ipv6_literal_url(t):
    """https://[::1]:PORT: verified against the certificate's IP SAN ::1; delivered."""
    if PLAIN:
        raise Skip("the IPv6 address check is TLS-only")
    if len(t.apm._servers) < 2:
        raise Skip("no ::1 here: the fake APM server listens on 127.0.0.1 only")
    t.start(env=dict(ca_file_env(),
                     ELASTIC_APM_LAMBDA_APM_SERVER="https://[::1]:%d" % t.apm.port))
    inv, tx, sent, t_flush, t_next = invocation(t)
    req = assert_delivered_before_next(t, tx, t_flush, t_next, "invocation")
    check_forwarded(req, sent)
    assert_no_tls_errors(t)


@scenario(apm=TLSApm(cert="wronghost_cert"))
def tls_refused_wrong_ipv6(t):
    """https://[::1], cert (trusted CA) for otherhost.example only: refused, mismatch logged."""
    if PLAIN:
        raise Skip("the IPv6 address check is TLS-only")
    if len(t.apm._servers) < 2:
        raise Skip("no ::1 here: the fake APM server listens on 127.0.0.1 only")
    refused(t, dict(ca_file_env(), ELASTIC_APM_LAMBDA_APM_SERVER="https://[::1]:%d"
                    % t.apm.port), ("name", "address", "match"), "certificate not for ::1")


@scenario(apm=TLSApm(), env={"ELASTIC_APM_DATA_FORWARDER_TIMEOUT": "5s"})
def tls_payload_small_window(t):
    """A 1 MB body to a server with a tiny receive window (the extension's sends would
    block): it goes whole and unchanged, before /next."""
    for srv in t.apm._servers:
        srv.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    t.start(env=ca_file_env())
    inv = t.lam.invoke()
    s, tx = agent_send_spans(t.port, inv, 900, 1_000_000, "1 MB POST")
    assert agent_flush(t.port) == 202
    t.lam.runtime_done(inv)
    t_next = t.lam.finish(inv, timeout=15)
    req = first_delivery(t.apm, tx)
    assert req is not None and req.t_end <= t_next, "1 MB payload not delivered before " \
        "/next through a small window (TLS errors: %s)" % t.apm.tls_errors[-3:]
    check_forwarded(req, s, "1 MB payload, small window")
    assert_no_tls_errors(t)


def _without_trust_anchors(t, env):
    """Start the extension with the system bundles hidden (an empty folder
    bind-mounted over them in a private mount namespace) and no CA variable,
    run two invocations (each released) and the shutdown; return its error
    lines. Skips where that cannot be done."""
    if PLAIN:
        raise Skip("trust anchors are TLS-only")
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("mount"):
        raise Skip("hiding the system bundle needs root, unshare and mount")
    if os.environ.get("APM_E2E_UNDER_VALGRIND"):
        raise Skip("the binary is started here, not through the valgrind wrapper")
    d = tempfile.mkdtemp(prefix="e2e-noanchors-")
    try:
        empty = os.path.join(d, "empty")
        os.mkdir(empty)
        link = os.path.join(d, "apm-lambda-extension")
        os.symlink(os.path.abspath(t.binary), link)
        wrapper = os.path.join(d, "wrapper")
        inner = ('for c in /etc/ssl/certs /etc/pki/tls/certs; do if [ -d "$c" ]; then '
                 'mount --bind "$1" "$c" || exit 97; fi; done; '
                 '[ ! -e /etc/ssl/certs/ca-certificates.crt ] || exit 98; exec "$2"')
        with open(wrapper, "w") as f:
            f.write("#!/bin/sh\nexec unshare -m sh -c '%s' sh %s %s\n" % (inner, empty, link))
        os.chmod(wrapper, 0o755)
        t.binary, real = wrapper, t.binary
        try:
            t.start(env=dict({CA_FILE_VAR: None, CA_PEM_VAR: None,
                              "ELASTIC_APM_DATA_FORWARDER_TIMEOUT": "1s"}, **env))
        finally:
            t.binary = real
        for i in range(2):
            inv, tx, _, t_flush, t_next = invocation(t)
            assert_released(t_flush, t_next, "invocation %d" % i)
        t.shutdown_ok()
        return [log_text(r) for r in warn_or_error(t.logs())]
    finally:
        shutil.rmtree(d, ignore_errors=True)


@scenario(apm=TLSApm())
def tls_no_trust_anchors(t):
    """No system bundle and no CA variable: one error says nothing can be verified; the
    https server is never contacted; invocations released; exit 0."""
    errs = _without_trust_anchors(t, {})
    assert len([m for m in errs if "no trust anchors" in m]) == 1, \
        "want one 'no trust anchors' line, got: %r" % errs[:4]
    assert not t.apm.requests and not t.apm.tls_errors, \
        "the https server was contacted with nothing to verify it by"


@scenario(apm=TLSApm())
def tls_no_trust_anchors_secrets(t):
    """No trust anchors and the token from Secrets Manager (https): the call is not made
    ('cannot connect', said once with the call's name), nothing is sent anywhere;
    invocations released; exit 0."""
    errs = _without_trust_anchors(t, {
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_REGION": "us-east-1", "ELASTIC_APM_SECRET_TOKEN": None,
        "ELASTIC_APM_LAMBDA_AWS_ENDPOINT": "https://127.0.0.1:9",
        "ELASTIC_APM_SECRETS_MANAGER_SECRET_TOKEN_ID": "apm/token"})
    calls = [m for m in errs if "secrets manager getsecretvalue (secret token)" in m
             and "apm/token" in m and "cannot connect" in m]  # log_text: lower case
    assert len(calls) == 1, "want one failed-call line, got: %r" % errs[:6]
    assert not t.apm.requests and not t.apm.tls_errors, \
        "the https server was contacted with nothing to verify it by"


@scenario(apm=TLSApm(), env={"ELASTIC_APM_DATA_FORWARDER_TIMEOUT": "1s"})
def tls_server_stops_reading(t):
    """The server reads a 6 MB request's head, then nothing (the extension's sends back
    up, over TLS): the invocation is released at the forwarder timeout; once the
    server reads again the payload is delivered, whole, by shutdown."""
    gate = threading.Event()
    t.apm.body_gate = gate
    try:
        t.start(env=ca_file_env())
        inv = t.lam.invoke()
        s, tx = agent_send_spans(t.port, inv, 5400, 6_000_000, "6 MB POST")
        t_flush = time.monotonic()
        assert agent_flush(t.port) == 202
        t.lam.runtime_done(inv)
        t_next = t.lam.finish(inv, timeout=15)
        assert_released(t_flush, t_next, "server not reading")
        assert t.apm.requests, "the request's head never reached the server"
        assert first_delivery(t.apm, tx) is None, "delivered while the server did not read"
    finally:
        gate.set()
    t.shutdown_ok(deadline_ms=10000)
    req = first_delivery(t.apm, tx)
    assert req is not None, "6 MB payload not delivered once the server read again " \
        "(requests: %s)" % [(r.status, r.io_error) for r in t.apm.requests]
    check_forwarded(req, s, "6 MB payload after the server stalled")
    assert len(delivered_requests(t.apm, tx)) == 1, "delivered more than once"
