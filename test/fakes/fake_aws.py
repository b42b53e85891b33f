#!/usr/bin/env python3
"""Fake AWS Secrets Manager + Certificate Manager for apm-ext tests (Python 3 stdlib only).

    aws = FakeAWS(certfile, keyfile, access_key, secret_key, region='us-east-1',
                  session_token=None)
    aws.secrets['apm/token'] = 's3cret'            # str -> SecretString
    aws.secrets['apm/bin'] = b'bytes'              # bytes -> SecretBinary (base64)
    aws.certs['arn:aws:acm:...'] = (cert_pem, chain_pem)   # chain_pem may be None
    ... point the extension at aws.url (https://localhost:PORT) ...
    aws.wait_calls(1, target='secretsmanager.GetSecretValue', timeout=5)
    aws.close()

One HTTPS endpoint serves both AWS JSON 1.1 services, routed by X-Amz-Target:
  secretsmanager.GetSecretValue      {"SecretId": id, "VersionStage": "AWSCURRENT"}
  CertificateManager.GetCertificate  {"CertificateArn": arn}
Every request's AWS Signature Version 4 is verified independently (see verify()):
canonical request, string to sign and signature recomputed from the secret key; the
date must be within 15 minutes of now, the credential scope must name this region and
the service of the target (secretsmanager / acm), SignedHeaders must include host,
x-amz-date and x-amz-target, and, when session_token is set, x-amz-security-token must
be present, equal and signed. A bad signature is answered 403
{"__type":"InvalidSignatureException","message":...} (UnrecognizedClientException for an
unknown access key or a wrong/unexpected session token, MissingAuthenticationToken-
Exception without Authorization) and never consumes an injected failure.

Failure injection (.fail, or fail_next()):
    aws.fail = (n, what)       the next n well-signed calls (n=None: every call until
                               aws.fail = None) answer `what` instead:
        ("ThrottlingException", 400[, message])   an AWS JSON error
        b"garbage"                                 200 with that body
        Garbage(...)                               any answer, see the class
        [what, what, ...]                          one after the other, cycling
    aws.fail_next(n, what, target=None)        same, limited to one X-Amz-Target
    aws.delay = seconds                        wait before answering every call

Recorded: aws.calls -> [Call] (see the class), aws.connections -> [t_accept] (monotonic),
aws.tls_errors -> [str]. wait_for(pred, timeout), wait_calls(n, target, timeout, ok),
summary() for assertion messages.

The Signature V4 functions (canonical_request, string_to_sign, signing_key,
signature, parse_authorization, verify, sign_request) are usable on their own;
test/fakes/test_fake_aws.py checks them against published expected values, and against
AWS's whole SigV4 test suite when that is available (see there).

Standalone: python3 test/fakes/fake_aws.py --cert C --key K --access-key A --secret-key S
            [--session-token T] [--secret ID=VALUE ...] [--port P]
"""
import argparse
import base64
import datetime
import hashlib
import hmac
import json
import re
import socket
import ssl
import sys
import threading
import time
import uuid
from urllib.parse import quote, unquote_to_bytes

import http_scaffold

ACCOUNT_ID = "123456789012"
ALGORITHM = "AWS4-HMAC-SHA256"
JSON_CT = "application/x-amz-json-1.1"
MAX_SKEW = 15 * 60  # seconds, as AWS allows
TARGETS = {  # X-Amz-Target -> (signing service name, short name)
    "secretsmanager.GetSecretValue": ("secretsmanager", "GetSecretValue"),
    "CertificateManager.GetCertificate": ("acm", "GetCertificate"),
}
REQUIRED_SIGNED = ("host", "x-amz-date", "x-amz-target")

# ==================================================================== Signature V4
# Strings hold raw bytes decoded as latin-1 (as http.server hands them over), so that
# every byte survives to the percent-encoding step.


def _b(s):
    return s if isinstance(s, bytes) else s.encode("latin-1")


def _hmac(key, msg):
    return hmac.new(key, _b(msg) if isinstance(msg, str) else msg, hashlib.sha256).digest()


def sha256_hex(data):
    return hashlib.sha256(_b(data)).hexdigest()


def _uri_encode(raw, safe):
    # RFC 3986 unreserved (A-Z a-z 0-9 - . _ ~) stay; everything else %XX, upper case.
    return quote(_b(raw), safe=safe)


def canonical_uri(path):
    """Path (as on the wire, without query) -> canonical URI for non-S3 services:
    '.'/'..' segments resolved, empty segments dropped, a trailing slash kept, each
    segment percent-encoded (a %XX already on the wire is encoded again)."""
    out = []
    for seg in path.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    norm = "/" + "/".join(out)
    if out and path.endswith("/"):
        norm += "/"
    return _uri_encode(norm, safe="/")


def canonical_query(query):
    """Query string -> canonical query: each name and value decoded then encoded
    (unreserved kept), pairs sorted by name then value, 'name=value' joined with '&'."""
    if not query:
        return ""
    pairs = []
    for part in query.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        pairs.append((quote(unquote_to_bytes(_b(k)), safe=""),
                      quote(unquote_to_bytes(_b(v)), safe="")))
    pairs.sort()
    return "&".join("%s=%s" % kv for kv in pairs)


def _trimall(value):
    return re.sub(r"[ \t\r\n]+", " ", value.strip(" \t\r\n"))


def canonical_headers(headers, signed):
    """headers: [(name, value)] as received (repeats kept, in order); signed: sorted
    lower-case names. Returns the canonical header block (each 'name:value\\n';
    repeated headers joined with ','), or raises KeyError(name) for a signed header
    the request lacks."""
    out = []
    for name in signed:
        vals = [_trimall(v) for k, v in headers if k.lower() == name]
        if not vals:
            raise KeyError(name)
        out.append("%s:%s\n" % (name, ",".join(vals)))
    return "".join(out)


def canonical_request(method, path, query, headers, signed, payload_hash):
    """The canonical request (str) of task 1 of the Signature V4 algorithm."""
    return "\n".join([method, canonical_uri(path), canonical_query(query),
                      canonical_headers(headers, signed), ";".join(signed), payload_hash])


def string_to_sign(amz_date, scope, creq):
    return "\n".join([ALGORITHM, amz_date, scope, sha256_hex(creq)])


def signing_key(secret_key, date, region, service):
    k = _hmac(("AWS4" + secret_key).encode("utf-8"), date)
    k = _hmac(k, region)
    k = _hmac(k, service)
    return _hmac(k, "aws4_request")


def signature(secret_key, date, region, service, sts):
    return hmac.new(signing_key(secret_key, date, region, service), _b(sts),
                    hashlib.sha256).hexdigest()


class SigError(Exception):
    """Why a request's signature is rejected: .type is the AWS error type."""

    def __init__(self, message, type_="InvalidSignatureException"):
        super().__init__(message)
        self.type = type_


def parse_authorization(value):
    """'AWS4-HMAC-SHA256 Credential=AK/DATE/REGION/SERVICE/aws4_request,
    SignedHeaders=a;b, Signature=hex' -> dict(access_key, date, region, service,
    signed_headers [list], signature). Raises SigError when malformed."""
    if value is None:
        raise SigError("Missing Authentication Token", "MissingAuthenticationTokenException")
    alg, _, rest = value.strip().partition(" ")
    if alg != ALGORITHM:
        raise SigError("Unsupported Authorization algorithm %r" % alg,
                       "IncompleteSignatureException")
    fields = {}
    for part in rest.split(","):
        k, eq, v = part.strip().partition("=")
        if not eq or k in fields:
            raise SigError("Authorization header requires Credential, SignedHeaders and "
                           "Signature as key=value, got %r" % part.strip(),
                           "IncompleteSignatureException")
        fields[k] = v.strip()
    if set(fields) != {"Credential", "SignedHeaders", "Signature"}:
        raise SigError("Authorization header requires exactly 'Credential', "
                       "'SignedHeaders' and 'Signature', got %s" % sorted(fields),
                       "IncompleteSignatureException")
    cred = fields["Credential"].split("/")
    if len(cred) != 5 or cred[4] != "aws4_request" or not all(cred):
        raise SigError("Credential must be AKID/yyyymmdd/region/service/aws4_request, got %r"
                       % fields["Credential"], "IncompleteSignatureException")
    signed = fields["SignedHeaders"].split(";")
    if (not all(signed) or signed != sorted(signed) or len(set(signed)) != len(signed)
            or any(h != h.lower() for h in signed)):
        raise SigError("SignedHeaders must be lower-case, sorted, unique and ';'-separated, "
                       "got %r" % fields["SignedHeaders"])
    if not re.fullmatch(r"[0-9a-f]{64}", fields["Signature"]):
        raise SigError("Signature must be 64 lower-case hex digits, got %r"
                       % fields["Signature"])
    return {"access_key": cred[0], "date": cred[1], "region": cred[2], "service": cred[3],
            "signed_headers": signed, "signature": fields["Signature"]}


def parse_amz_date(s):
    """'20150830T123600Z' -> epoch seconds (UTC); raises ValueError."""
    d = datetime.datetime.strptime(s, "%Y%m%dT%H%M%SZ")
    return d.replace(tzinfo=datetime.timezone.utc).timestamp()


class Verified:
    """Result of verify(): ok, error (message or None), error_type, and what was found:
    auth (parse_authorization dict or None), amz_date, canonical_request,
    string_to_sign, expected (signature), session_token_signed."""

    def __init__(self):
        self.ok, self.error, self.error_type = False, None, None
        self.auth = self.amz_date = None
        self.canonical_request = self.string_to_sign = self.expected = None
        self.session_token_signed = False

    def __repr__(self):
        return "<Verified ok>" if self.ok else "<Verified %s: %s>" % (self.error_type,
                                                                      self.error)


def _header(headers, name):
    vals = [v for k, v in headers if k.lower() == name]
    return ",".join(_trimall(v) for v in vals) if vals else None


def verify(method, target, headers, body, access_key, secret_key, region=None,
           service=None, session_token=None, now=None, max_skew=MAX_SKEW,
           required_signed=REQUIRED_SIGNED):
    """Check a request's Signature V4 (Authorization header form).

    target: the request target as on the wire ('/path?query'); headers: [(name, value)];
    body: bytes. region/service: what the credential scope must say (None: anything).
    session_token: the token the request must carry and sign (None: it must carry none).
    now: epoch seconds (default time.time()). Returns a Verified (never raises)."""
    res = Verified()
    try:
        _verify(res, method, target, headers, body, access_key, secret_key, region,
                service, session_token, time.time() if now is None else now, max_skew,
                required_signed)
        res.ok = True
    except SigError as e:
        res.error, res.error_type = str(e), e.type
    return res


def _verify(res, method, target, headers, body, access_key, secret_key, region, service,
            session_token, now, max_skew, required_signed):
    auth = res.auth = parse_authorization(_header(headers, "authorization"))
    if auth["access_key"] != access_key:
        raise SigError("The security token included in the request is invalid (unknown "
                       "access key %r)" % auth["access_key"], "UnrecognizedClientException")
    for name in required_signed:
        if name not in auth["signed_headers"]:
            raise SigError("'%s' must be a signed header (SignedHeaders=%s)"
                           % (name, ";".join(auth["signed_headers"])))
    amz_date = res.amz_date = _header(headers, "x-amz-date")
    if amz_date is None:
        raise SigError("Authorization header requires existence of either a 'X-Amz-Date' "
                       "or a 'Date' header (this fake wants X-Amz-Date)",
                       "IncompleteSignatureException")
    try:
        t = parse_amz_date(amz_date)
    except ValueError:
        raise SigError("X-Amz-Date %r is not YYYYMMDDTHHMMSSZ" % amz_date,
                       "IncompleteSignatureException")
    if abs(now - t) > max_skew:
        raise SigError("Signature expired: %s is more than %d s from now (%s)" % (
            amz_date, max_skew, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))))
    if auth["date"] != amz_date[:8]:
        raise SigError("Credential date %s does not match X-Amz-Date %s"
                       % (auth["date"], amz_date))
    if region is not None and auth["region"] != region:
        raise SigError("Credential should be scoped to a valid region, not '%s' (want %s)"
                       % (auth["region"], region))
    if service is not None and auth["service"] != service:
        raise SigError("Credential should be scoped to correct service: '%s', not '%s'"
                       % (service, auth["service"]))
    token = _header(headers, "x-amz-security-token")
    res.session_token_signed = "x-amz-security-token" in auth["signed_headers"]
    if session_token is not None:
        if token is None:
            raise SigError("X-Amz-Security-Token missing (temporary credentials need it)",
                           "UnrecognizedClientException")
        if token != session_token:
            raise SigError("The security token included in the request is invalid",
                           "UnrecognizedClientException")
        if not res.session_token_signed:
            raise SigError("x-amz-security-token must be a signed header")
    elif token is not None:
        raise SigError("The security token included in the request is invalid (none "
                       "expected)", "UnrecognizedClientException")
    payload_hash = sha256_hex(body or b"")
    declared = _header(headers, "x-amz-content-sha256")
    if declared is not None and declared != payload_hash:
        raise SigError("x-amz-content-sha256 %s does not match the body's %s"
                       % (declared, payload_hash))
    path, _, query = target.partition("?")
    try:
        creq = res.canonical_request = canonical_request(
            method, path, query, headers, auth["signed_headers"], payload_hash)
    except KeyError as e:
        raise SigError("signed header %s is not in the request" % e.args[0])
    scope = "/".join([auth["date"], auth["region"], auth["service"], "aws4_request"])
    sts = res.string_to_sign = string_to_sign(amz_date, scope, creq)
    want = res.expected = signature(secret_key, auth["date"], auth["region"],
                                    auth["service"], sts)
    if not hmac.compare_digest(want, auth["signature"]):
        raise SigError("The request signature we calculated does not match the signature "
                       "you provided. The Canonical String for this request should have "
                       "been\n'%s'\n\nThe String-to-Sign should have been\n'%s'\n"
                       % (creq, sts))


def sign_request(method, target, headers, body, access_key, secret_key, region, service,
                 session_token=None, now=None, signed=None):
    """A client-side signer for self-tests: returns headers + X-Amz-Date (+ token) +
    Authorization. headers: [(name, value)], must include Host. signed: names to sign
    (default: every header)."""
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None
                                                             else now))
    h = list(headers) + [("X-Amz-Date", amz_date)]
    if session_token is not None:
        h.append(("X-Amz-Security-Token", session_token))
    names = sorted({k.lower() for k, _ in h} if signed is None else set(signed))
    path, _, query = target.partition("?")
    creq = canonical_request(method, path, query, h, names, sha256_hex(body or b""))
    scope = "/".join([amz_date[:8], region, service, "aws4_request"])
    sig = signature(secret_key, amz_date[:8], region, service,
                    string_to_sign(amz_date, scope, creq))
    h.append(("Authorization", "%s Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
        ALGORITHM, access_key, scope, ";".join(names), sig)))
    return h


# ==================================================================== the server

class Garbage:
    """An answer that is not a proper AWS one: `body` with `status` and
    `content_type`; truncate=True announces more bytes than it sends, then closes;
    close=True closes the connection without any answer. name says it in words,
    slug in one identifier."""

    def __init__(self, body=b"", status=200, content_type=JSON_CT, truncate=False,
                 close=False, name=None, slug=None):
        self.body, self.status, self.content_type = body, status, content_type
        self.truncate, self.close = truncate, close
        self.slug = slug or "garbage"
        self.name = name or ("close" if close else "%d %r%s" % (
            status, body[:30], " truncated" if truncate else ""))

    def __repr__(self):
        return "Garbage(%s)" % self.name


GARBAGE_NOT_JSON = Garbage(b"\x00\xff<<not json at all>>\x01", name="200 not JSON",
                           slug="not_json")
GARBAGE_EMPTY = Garbage(b"", name="200 empty body", slug="empty")
GARBAGE_NO_VALUE = Garbage(b'{"ARN":"arn:aws:secretsmanager:us-east-1:123456789012:secret:x",'
                           b'"Name":"x","VersionId":"v1","VersionStages":["AWSCURRENT"]}',
                           name="200 JSON without SecretString/SecretBinary", slug="no_value")
GARBAGE_WRONG_TYPE = Garbage(b'{"SecretString":12345,"Certificate":["x"]}',
                             name="200 JSON with values of the wrong type", slug="wrong_type")
GARBAGE_BAD_BASE64 = Garbage(b'{"Name":"x","SecretBinary":"***not base64***"}',
                             name="200 SecretBinary not base64", slug="bad_base64")
GARBAGE_TRUNCATED = Garbage(b'{"Name":"x","SecretString":"abc', truncate=True,
                            name="200 truncated body, connection closed", slug="truncated")
GARBAGE_HTML_502 = Garbage(b"<html><body><h1>502 Bad Gateway</h1></body></html>", 502,
                           "text/html", name="502 HTML from a proxy", slug="html_502")
GARBAGE_CLOSE = Garbage(close=True, name="connection closed, no answer", slug="closed")
GARBAGE_ALL = [GARBAGE_NOT_JSON, GARBAGE_NO_VALUE, GARBAGE_TRUNCATED, GARBAGE_HTML_502,
               GARBAGE_CLOSE, GARBAGE_EMPTY, GARBAGE_WRONG_TYPE, GARBAGE_BAD_BASE64]


class Call:
    """One request the fake saw.

    t, t_answer, t_end  monotonic times: headers read / answer about to be written /
                    answer written (None if there was no answer)
    conn_id         which connection (1, 2, ... in accept order)
    method, path    path is the request target as sent
    headers         [(name, value)] as received; header(name) joins repeats
    body, json      raw body bytes; the parsed JSON object (None if not JSON)
    target          X-Amz-Target (None if absent); op: GetSecretValue / GetCertificate
    service         signing service the target needs (secretsmanager / acm / None)
    sig_ok          the signature verified; sig is the Verified, sig_error its message
    signed_headers  names from the Authorization header ([] if unparsable)
    status          HTTP status answered (None: connection closed without an answer)
    done            the fake has finished with it (answered or closed)
    error_type      __type of an error answer (None on success)
    injected        the failure injected instead of the real answer (None if none)
    problems        protocol deviations besides the signature (wrong method, path,
                    Content-Type, Host, body...), as strings
    answer          the answer body bytes
    """

    def __init__(self, conn_id, method, path, headers):
        self.t, self.t_answer, self.t_end = time.monotonic(), None, None
        self.conn_id, self.method, self.path, self.headers = conn_id, method, path, headers
        self.body, self.json = b"", None
        self.target = self.header("X-Amz-Target")
        self.service, self.op = TARGETS.get(self.target, (None, None))
        self.sig, self.sig_ok, self.sig_error, self.signed_headers = None, False, None, []
        self.status = self.error_type = self.injected = None
        self.problems = []
        self.answer = b""
        self.done = False

    def header(self, name):
        vals = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(vals) if vals else None

    @property
    def secret_id(self):
        return self.json.get("SecretId") if isinstance(self.json, dict) else None

    @property
    def cert_arn(self):
        return self.json.get("CertificateArn") if isinstance(self.json, dict) else None

    def __repr__(self):
        what = self.secret_id or self.cert_arn or ""
        return "<%s %s sig=%s -> %s%s%s>" % (
            self.op or self.target or "%s %s" % (self.method, self.path), what,
            "ok" if self.sig_ok else "BAD(%s)" % (self.sig_error or "").split("\n")[0],
            self.status if self.status is not None else "no answer",
            " " + self.error_type if self.error_type else "",
            " injected %r" % (self.injected,) if self.injected is not None else "")


class _Handler(http_scaffold.Handler):
    server_version = "FakeAWS/1.0"
    sys_version = ""
    timeout = 60  # an idle keep-alive connection is closed after this

    def setup(self):
        fake = self.server.fake
        raw = self.request
        raw.settimeout(10)
        try:
            tls = fake._ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            self.request = tls
            self.conn_id = fake._conn_open(tls)
            tls.do_handshake()
        except (OSError, ssl.SSLError) as e:
            fake._tls_error(e)
            raw.close()
            raise
        super().setup()

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        self.server.fake._conn_closed(self.conn_id)
        try:
            socket.socket.shutdown(self.request, socket.SHUT_WR)
        except OSError:
            pass
        self.request.close()

    def _read_body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = bytearray()
            while True:
                line = self.rfile.readline(1024)
                size = int(line.split(b";")[0].strip() or b"x", 16)
                if size == 0:
                    while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline(8)
        n = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(n) if n > 0 else b""
        if len(data) != n:
            raise ValueError("truncated body (%d of %d bytes)" % (len(data), n))
        return data

    def _any(self):
        fake = self.server.fake
        call = Call(self.conn_id, self.command, self.path, list(self.headers.items()))
        try:
            call.body = self._read_body()
        except (ValueError, OSError) as e:
            call.problems.append("body: %s" % e)
            self.close_connection = True
        fake._add(call)
        try:
            fake._serve(self, call)
        except OSError as e:
            call.problems.append("answer: %s" % e)
            self.close_connection = True
        finally:
            fake._done(call)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _any

    def reply(self, call, status, body, content_type=JSON_CT, truncate=False):
        call.status, call.answer = status, body
        call.t_answer = time.monotonic()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        self.send_header("Content-Length", str(len(body) + (37 if truncate else 0)))
        if truncate or self.close_connection:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()
        call.t_end = time.monotonic()


class _Server(http_scaffold.Server):
    block_on_close = False

    def __init__(self, addr, fake, family):
        super().__init__(addr, _Handler, fake, family)

    def get_request(self):
        sock, addr = super().get_request()
        self.fake._accepted()
        return sock, addr

    def handle_error(self, request, client_address):
        pass  # TLS failures are recorded in tls_errors; socket errors are the client's


class FakeAWS:
    """See the module docstring. Attributes: url, port, region, access_key, secret_key,
    session_token, secrets, certs, fail, delay, calls, connections, tls_errors."""

    def __init__(self, certfile, keyfile, access_key, secret_key, region="us-east-1",
                 session_token=None, host="127.0.0.1", port=0, max_skew=MAX_SKEW,
                 required_signed=REQUIRED_SIGNED):
        self.access_key, self.secret_key = access_key, secret_key
        self.region, self.session_token = region, session_token
        self.max_skew, self.required_signed = max_skew, tuple(required_signed)
        self.secrets = {}        # id -> str (SecretString) | bytes (SecretBinary)
        self.certs = {}          # arn -> (certificate PEM, chain PEM or None)
        self.delay = 0.0
        self.tls_errors = []
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(certfile, keyfile)
        self._cond = threading.Condition()
        self._calls, self._accepts = [], []
        self._fail = None
        self._closed = False
        self._conns, self._next_conn = {}, 0
        self._arns = {}
        self._servers = [_Server((host, port), self, socket.AF_INET6 if ":" in host
                                 else socket.AF_INET)]
        self.host, self.port = host, self._servers[0].server_address[1]
        if host == "127.0.0.1" and socket.has_ipv6:
            try:  # the url says localhost, which may resolve to ::1 first
                self._servers.append(_Server(("::1", self.port), self, socket.AF_INET6))
            except OSError:
                pass
        for srv in self._servers:
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                             daemon=True, name="fake-aws:%d" % self.port).start()

    @property
    def url(self):
        h = "localhost" if self.host in ("127.0.0.1", "::1", "localhost") else self.host
        return "https://%s:%d" % (h, self.port)

    def close(self):
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            socks = list(self._conns.values())
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        for s in socks:
            try:
                socket.socket.shutdown(s, socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    # ---- behaviour
    @property
    def fail(self):
        """None, or {'n': remaining (None = unlimited), 'what': [..], 'target': ..}."""
        return self._fail

    @fail.setter
    def fail(self, value):
        if value is None:
            f = None
        elif isinstance(value, dict):
            f = dict(value)
        else:
            n, what = value
            f = {"n": n, "what": what, "target": None}
        if f is not None:
            what = f["what"]
            if not isinstance(what, list):
                what = [what]
            for w in what:
                if not (isinstance(w, (bytes, Garbage)) or (
                        isinstance(w, tuple) and 2 <= len(w) <= 3)):
                    raise ValueError("failure must be (type, status[, message]), bytes or "
                                     "Garbage, got %r" % (w,))
            f = {"n": f.get("n"), "what": what, "target": f.get("target"), "i": 0}
        with self._cond:
            self._fail = f

    def fail_next(self, n, what, target=None):
        """The next n well-signed calls (to `target` only, if given; n=None: all until
        cleared) answer `what`; see the module docstring."""
        self.fail = {"n": n, "what": what, "target": target}

    def _take_fail(self, call):
        with self._cond:
            f = self._fail
            if f is None or (f["target"] and f["target"] != call.target):
                return None
            if f["n"] is not None:
                if f["n"] <= 0:
                    self._fail = None
                    return None
                f["n"] -= 1
            w = f["what"][f["i"] % len(f["what"])]
            f["i"] += 1
            return w

    # ---- recorded data
    @property
    def calls(self):
        with self._cond:
            return list(self._calls)

    @property
    def connections(self):
        """Monotonic accept time of every TCP connection, in order."""
        with self._cond:
            return list(self._accepts)

    def calls_to(self, target=None, ok=None):
        """Calls with this X-Amz-Target (short names GetSecretValue/GetCertificate
        work too); ok=True: only those answered 200, False: only the others."""
        out = []
        for c in self.calls:
            if target and target not in (c.target, c.op):
                continue
            if ok is not None and (c.status == 200) != ok:
                continue
            out.append(c)
        return out

    def wait_for(self, pred, timeout=5.0):
        """Wait until pred(self) is true (checked on every call); returns bool."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                if pred(self):
                    return True
                left = end - time.monotonic()
                if left <= 0 or self._closed:
                    return False
                self._cond.wait(min(left, 0.25))

    def wait_calls(self, n=1, target=None, timeout=10.0, ok=None):
        """Wait for n answered calls (to target; ok as in calls_to); returns them or
        raises AssertionError saying what was seen."""
        def enough(a):
            return len([c for c in a.calls_to(target, ok) if c.done]) >= n
        if not self.wait_for(enough, timeout):
            raise AssertionError("fake AWS: timed out after %.1fs waiting for %d %s call(s)%s;"
                                 " seen: %s" % (timeout, n, target or "AWS",
                                                {True: " answered 200", False: " failed",
                                                 None: ""}[ok], self.summary()))
        return self.calls_to(target, ok)

    def summary(self, last=8):
        calls = self.calls
        s = "%d call(s)" % len(calls)
        if calls:
            s += ": " + ", ".join(repr(c) for c in calls[-last:])
        if self.tls_errors:
            s += "; TLS errors: %s" % self.tls_errors[-3:]
        return s

    # ---- internals
    def _accepted(self):
        with self._cond:
            self._accepts.append(time.monotonic())
            self._cond.notify_all()

    def _conn_open(self, sock):
        with self._cond:
            self._next_conn += 1
            self._conns[self._next_conn] = sock
            return self._next_conn

    def _conn_closed(self, conn_id):
        with self._cond:
            self._conns.pop(conn_id, None)

    def _tls_error(self, e):
        with self._cond:
            self.tls_errors.append(str(e))
            self._cond.notify_all()

    def _add(self, call):
        with self._cond:
            self._calls.append(call)
            self._cond.notify_all()

    def _done(self, call):
        with self._cond:
            call.done = True
            self._cond.notify_all()

    def _sleep(self, seconds):
        end = time.monotonic() + seconds
        with self._cond:
            while not self._closed and time.monotonic() < end:
                self._cond.wait(end - time.monotonic())

    def _arn(self, name):
        if name.startswith("arn:"):
            return name
        if name not in self._arns:
            self._arns[name] = "arn:aws:secretsmanager:%s:%s:secret:%s-%s" % (
                self.region, ACCOUNT_ID, name, uuid.uuid4().hex[:6])
        return self._arns[name]

    def _error(self, h, call, type_, status, message):
        call.error_type = type_
        body = json.dumps({"__type": type_, "message": message}).encode()
        h.reply(call, status, body)

    def _serve(self, h, call):
        """Check the request the way AWS does, in AWS's order: signature first."""
        if call.problems:  # unreadable body
            return self._error(h, call, "SerializationException", 400, call.problems[0])
        res = verify(call.method, call.path, call.headers, call.body, self.access_key,
                     self.secret_key, self.region, call.service, self.session_token,
                     max_skew=self.max_skew, required_signed=self.required_signed)
        call.sig, call.sig_ok, call.sig_error = res, res.ok, res.error
        call.signed_headers = res.auth["signed_headers"] if res.auth else []
        try:
            call.json = json.loads(call.body) if call.body else None
        except ValueError:
            pass
        self._check_protocol(h, call)
        if not res.ok:
            return self._error(h, call, res.error_type, 403, res.error)
        if call.service is None:
            return self._error(h, call, "UnknownOperationException", 400,
                               "unknown X-Amz-Target %r" % call.target)
        if self.delay:
            self._sleep(self.delay)
        what = self._take_fail(call)
        if what is not None:
            call.injected = what
            return self._inject(h, call, what)
        if not isinstance(call.json, dict):
            return self._error(h, call, "SerializationException", 400,
                               "body is not a JSON object: %r" % call.body[:200])
        if call.op == "GetSecretValue":
            return self._get_secret_value(h, call)
        return self._get_certificate(h, call)

    def _check_protocol(self, h, call):
        p = call.problems
        if call.method != "POST":
            p.append("method %s, want POST" % call.method)
        if call.path != "/":
            p.append("path %r, want /" % call.path)
        ct = call.header("Content-Type")
        if ct != JSON_CT:
            p.append("Content-Type %r, want %s" % (ct, JSON_CT))
        host = call.header("Host")
        ok_hosts = {"%s:%d" % (n, self.port) for n in ("localhost", "127.0.0.1", "[::1]")}
        if host not in ok_hosts:
            p.append("Host %r, want localhost:%d" % (host, self.port))
        if call.target is not None and call.target not in TARGETS:
            p.append("unknown X-Amz-Target %r" % call.target)
        if call.body and not isinstance(call.json, dict):
            p.append("body is not a JSON object: %r" % call.body[:100])

    def _inject(self, h, call, what):
        if isinstance(what, bytes):
            what = Garbage(what)
        if isinstance(what, tuple):
            type_, status = what[0], what[1]
            msg = what[2] if len(what) > 2 else "fake_aws: injected %s" % type_
            return self._error(h, call, type_, status, msg)
        if what.close:
            h.close_connection = True
            return
        h.reply(call, what.status, what.body, what.content_type, what.truncate)

    def _get_secret_value(self, h, call):
        sid = call.json.get("SecretId")
        if not isinstance(sid, str) or not sid:
            return self._error(h, call, "InvalidParameterException", 400,
                               "SecretId is required")
        stage = call.json.get("VersionStage", "AWSCURRENT")
        value, name = None, None
        for k, v in self.secrets.items():
            if sid in (k, self._arn(k)):
                value, name = v, k
        if value is None:
            return self._error(h, call, "ResourceNotFoundException", 400,
                               "Secrets Manager can't find the specified secret.")
        if stage != "AWSCURRENT" or "VersionId" in call.json:
            return self._error(h, call, "ResourceNotFoundException", 400,
                               "Secrets Manager can't find the specified secret value for "
                               "staging label: %s" % stage)
        out = {"ARN": self._arn(name), "Name": name.split(":")[-1],
               "VersionId": str(uuid.uuid5(uuid.NAMESPACE_OID, name)),
               "VersionStages": ["AWSCURRENT"], "CreatedDate": 1.7e9}
        if isinstance(value, bytes):
            out["SecretBinary"] = base64.b64encode(value).decode()
        else:
            out["SecretString"] = value
        h.reply(call, 200, json.dumps(out).encode())

    def _get_certificate(self, h, call):
        arn = call.json.get("CertificateArn")
        if not isinstance(arn, str) or not arn:
            return self._error(h, call, "ValidationException", 400,
                               "CertificateArn is required")
        if arn not in self.certs:
            return self._error(h, call, "ResourceNotFoundException", 400,
                               "Could not find certificate %s." % arn)
        cert, chain = self.certs[arn]
        out = {"Certificate": cert}
        if chain is not None:
            out["CertificateChain"] = chain
        h.reply(call, 200, json.dumps(out).encode())


def main():
    ap = argparse.ArgumentParser(description="Fake AWS Secrets Manager + ACM")
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--access-key", required=True)
    ap.add_argument("--secret-key", required=True)
    ap.add_argument("--session-token")
    ap.add_argument("--region", default="us-east-1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--secret", action="append", default=[], metavar="ID=VALUE")
    ap.add_argument("--cert-arn", action="append", default=[], metavar="ARN=PEMFILE")
    a = ap.parse_args()
    aws = FakeAWS(a.cert, a.key, a.access_key, a.secret_key, a.region, a.session_token,
                  port=a.port)
    for kv in a.secret:
        k, _, v = kv.partition("=")
        aws.secrets[k] = v
    for kv in a.cert_arn:
        k, _, path = kv.partition("=")
        with open(path) as f:
            aws.certs[k] = (f.read(), None)
    sys.stderr.write("fake_aws: listening on %s\n" % aws.url)
    seen = 0
    try:
        while True:
            n = seen
            aws.wait_for(lambda x: len(x.calls) > n and x.calls[n].done, 3600)
            calls = aws.calls
            while seen < len(calls) and calls[seen].done:
                sys.stderr.write("fake_aws: %r\n" % calls[seen])
                seen += 1
    except KeyboardInterrupt:
        pass
    finally:
        aws.close()


if __name__ == "__main__":
    main()
