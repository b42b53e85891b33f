#!/usr/bin/env python3
"""Self-test for test/fakes/fake_aws.py (stdlib unittest).

    python3 test/fakes/test_fake_aws.py [-v]

1. The Signature V4 code against published expected values: for each case the
   canonical request, string to sign and Authorization header must match byte for
   byte, and verify() must accept the signed request.
   - Always: a few cases written into this file (AWS's documentation example for IAM
     ListUsers and cases of AWS's Signature Version 4 test suite).
   - Optionally, that whole test suite (published by AWS; botocore ships it as
     tests/unit/auth/aws4_testsuite): its folder is $AWS_SIGV4_TESTSUITE or, when
     that is unset or empty, ../shared/aws-sigv4-testsuite beside the repository.
     Without the folder these tests are reported as skipped.
2. verify() rejects what it must (tampered signature, body, header, key, date, scope,
   session token...).
3. The HTTPS server: answers, errors, failure injection, recording, keep-alive.
"""
import base64
import glob
import http.client
import json
import os
import socket
import ssl
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fake_aws as fa  # noqa: E402
from fake_apm import make_test_ca  # noqa: E402

# AWS's SigV4 test suite (optional): $AWS_SIGV4_TESTSUITE, else the folder
# ../shared/aws-sigv4-testsuite beside the repository; used only when it is a folder.
SUITE = os.environ.get("AWS_SIGV4_TESTSUITE") or os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, os.pardir, "shared",
    "aws-sigv4-testsuite"))
HAVE_SUITE = os.path.isdir(SUITE)
NO_SUITE = ("AWS SigV4 test suite absent (no folder %s); set AWS_SIGV4_TESTSUITE to "
            "botocore's tests/unit/auth/aws4_testsuite to run it" % SUITE)
AK, SK = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SUITE_DATE = "20150830T123600Z"
SUITE_NOW = fa.parse_amz_date(SUITE_DATE)
SUITE_SCOPE = "20150830/us-east-1/service/aws4_request"


# ---------------------------------------------------------------- suite files

def parse_http(data):
    """A test-suite request file -> (method, target, [(name, value)], body bytes).
    The request line's target may contain spaces; continuation lines (starting with
    whitespace) belong to the previous header."""
    s = data.decode("latin-1")
    head, _, body = s.partition("\n\n")
    lines = head.split("\n")
    method, _, rest = lines[0].partition(" ")
    target = rest[:rest.rindex(" ")]
    headers = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:
            headers[-1] = (headers[-1][0], headers[-1][1] + "\n" + line)
        elif line:
            k, _, v = line.partition(":")
            headers.append((k, v))
    return method, target, headers, body.encode("latin-1")


def read(path):
    with open(path, "rb") as f:
        return f.read()


def suite_cases():
    """[(name, base path)] of every case of the suite (a folder holding NAME.req)."""
    out = []
    for req in sorted(glob.glob(os.path.join(SUITE, "**", "*.req"), recursive=True)):
        out.append((os.path.relpath(req[:-4], SUITE), req[:-4]))
    return out


class Case:
    """A request in the suite's format (bytes) with the canonical request, string to
    sign and Authorization header published for it (str), signed with AK/SK."""

    def __init__(self, req, creq, sts, authz, sreq=None):
        self.method, self.target, self.headers, self.body = parse_http(req)
        self.creq, self.sts, self.authz, self.sreq = creq, sts, authz.strip(), sreq
        self.auth = fa.parse_authorization(self.authz)
        a = self.auth
        self.scope = "%s/%s/%s/aws4_request" % (a["date"], a["region"], a["service"])
        self.amz_date = [v.strip() for k, v in self.headers if k.lower() == "x-amz-date"][0]
        # A signer adds some headers itself (get-vanilla-with-session-token: the token):
        # take those from the canonical request expected.
        creq_headers = dict(ln.split(":", 1) for ln in self.creq.split("\n")[3:]
                            if ":" in ln and not ln.startswith(" "))
        for name in a["signed_headers"]:
            if not any(k.lower() == name for k, _ in self.headers):
                self.headers.append((name, creq_headers[name]))

    @classmethod
    def from_files(cls, base):
        """A case of the suite: BASE.req, .creq, .sts, .authz (and .sreq if any)."""
        text = lambda ext: read(base + ext).decode("latin-1")  # noqa: E731
        return cls(read(base + ".req"), text(".creq"), text(".sts"), text(".authz"),
                   read(base + ".sreq") if os.path.exists(base + ".sreq") else None)

    def token(self, headers=None):
        for k, v in headers or self.headers:
            if k.lower() == "x-amz-security-token":
                return v
        return None


def check_case(tc, c):
    """The fake's signing functions reproduce c's published values, and verify()
    accepts the request signed with them."""
    a = c.auth
    path, _, query = c.target.partition("?")
    creq = fa.canonical_request(c.method, path, query, c.headers, a["signed_headers"],
                                fa.sha256_hex(c.body))
    tc.assertEqual(creq, c.creq, "canonical request")
    sts = fa.string_to_sign(c.amz_date, c.scope, creq)
    tc.assertEqual(sts, c.sts, "string to sign")
    sig = fa.signature(SK, a["date"], a["region"], a["service"], sts)
    authz = "%s Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
        fa.ALGORITHM, AK, c.scope, ";".join(a["signed_headers"]), sig)
    tc.assertEqual(authz, c.authz, "Authorization header")
    hs = c.headers + [("Authorization", c.authz)]
    res = fa.verify(c.method, c.target, hs, c.body, AK, SK, a["region"], a["service"],
                    c.token(), now=fa.parse_amz_date(c.amz_date),
                    required_signed=("host", "x-amz-date"))
    tc.assertTrue(res.ok, res.error)
    tc.assertEqual(res.canonical_request, c.creq)
    tc.assertEqual(res.string_to_sign, c.sts)


def _sts(scope, creq_hash):
    return "\n".join((fa.ALGORITHM, SUITE_DATE, scope, creq_hash))


def _authz(scope, signed, sig):
    return "%s Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
        fa.ALGORITHM, AK, scope, signed, sig)


EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
IAM_SCOPE = "20150830/us-east-1/iam/aws4_request"

# Published expected values (facts), so that the signing code is checked without the
# suite: name -> Case. The first is AWS's documentation example of the signing process
# (IAM ListUsers); the others are cases of AWS's test suite, under their names there.
PUBLISHED = {
    "aws-docs/iam-list-users": Case(
        b"GET /?Action=ListUsers&Version=2010-05-08 HTTP/1.1\n"
        b"Host:iam.amazonaws.com\n"
        b"Content-Type:application/x-www-form-urlencoded; charset=utf-8\n"
        b"X-Amz-Date:20150830T123600Z",
        "GET\n/\nAction=ListUsers&Version=2010-05-08\n"
        "content-type:application/x-www-form-urlencoded; charset=utf-8\n"
        "host:iam.amazonaws.com\nx-amz-date:20150830T123600Z\n\n"
        "content-type;host;x-amz-date\n" + EMPTY_SHA256,
        _sts(IAM_SCOPE, "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59"),
        _authz(IAM_SCOPE, "content-type;host;x-amz-date",
               "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7")),
    "get-vanilla": Case(
        b"GET / HTTP/1.1\nHost:example.amazonaws.com\nX-Amz-Date:20150830T123600Z",
        "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\n"
        "host;x-amz-date\n" + EMPTY_SHA256,
        _sts(SUITE_SCOPE, "bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63"),
        _authz(SUITE_SCOPE, "host;x-amz-date",
               "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31")),
    "get-vanilla-query-order-key-case": Case(
        b"GET /?Param2=value2&Param1=value1 HTTP/1.1\nHost:example.amazonaws.com\n"
        b"X-Amz-Date:20150830T123600Z",
        "GET\n/\nParam1=value1&Param2=value2\nhost:example.amazonaws.com\n"
        "x-amz-date:20150830T123600Z\n\nhost;x-amz-date\n" + EMPTY_SHA256,
        _sts(SUITE_SCOPE, "816cd5b414d056048ba4f7c5386d6e0533120fb1fcfa93762cf0fc39e2cf19e0"),
        _authz(SUITE_SCOPE, "host;x-amz-date",
               "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500")),
    "get-header-value-multiline": Case(
        b"GET / HTTP/1.1\nHost:example.amazonaws.com\nMy-Header1:value1\n  value2\n"
        b"     value3\nX-Amz-Date:20150830T123600Z",
        "GET\n/\n\nhost:example.amazonaws.com\nmy-header1:value1 value2 value3\n"
        "x-amz-date:20150830T123600Z\n\nhost;my-header1;x-amz-date\n" + EMPTY_SHA256,
        _sts(SUITE_SCOPE, "e99419459a677bc11de234014be3c4e72c1ea5b454ceb58b613061f5d7a162e8"),
        _authz(SUITE_SCOPE, "host;my-header1;x-amz-date",
               "cfd34249e4b1c8d6b91ef74165d41a32e5fab3306300901bb65a51a73575eefd")),
    "normalize-path/get-space": Case(
        b"GET /example space/ HTTP/1.1\nHost:example.amazonaws.com\n"
        b"X-Amz-Date:20150830T123600Z",
        "GET\n/example%20space/\n\nhost:example.amazonaws.com\n"
        "x-amz-date:20150830T123600Z\n\nhost;x-amz-date\n" + EMPTY_SHA256,
        _sts(SUITE_SCOPE, "63ee75631ed7234ae61b5f736dfc7754cdccfedbff4b5128a915706ee9390d86"),
        _authz(SUITE_SCOPE, "host;x-amz-date",
               "652487583200325589f1fba4c7e578f72c47cb61beeca81406b39ddec1366741")),
    "post-x-www-form-urlencoded": Case(
        b"POST / HTTP/1.1\nContent-Type:application/x-www-form-urlencoded\n"
        b"Host:example.amazonaws.com\nX-Amz-Date:20150830T123600Z\n\nParam1=value1",
        "POST\n/\n\ncontent-type:application/x-www-form-urlencoded\n"
        "host:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\n"
        "content-type;host;x-amz-date\n"
        "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e",
        _sts(SUITE_SCOPE, "42a5e5bb34198acb3e84da4f085bb7927f2bc277ca766e6d19c73c2154021281"),
        _authz(SUITE_SCOPE, "content-type;host;x-amz-date",
               "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a")),
    "get-vanilla-with-session-token": Case(
        b"GET / HTTP/1.1\nHost:example.amazonaws.com\nX-Amz-Date:20150830T123600Z",
        "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n"
        "x-amz-security-token:6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267"
        "\n\nhost;x-amz-date;x-amz-security-token\n" + EMPTY_SHA256,
        _sts(SUITE_SCOPE, "067b36aa60031588cea4a4cde1f21215227a047690c72247f1d70b32fbbfad2b"),
        _authz(SUITE_SCOPE, "host;x-amz-date;x-amz-security-token",
               "07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8")),
}


class PublishedExamplesTest(unittest.TestCase):
    """Needs nothing outside this file."""

    def test_published_cases(self):
        for name, c in PUBLISHED.items():
            with self.subTest(case=name):
                check_case(self, c)


@unittest.skipUnless(HAVE_SUITE, NO_SUITE)
class SigV4SuiteTest(unittest.TestCase):
    """Needs AWS's SigV4 test suite (see the top of this file); skipped without it."""

    def test_suite_present(self):
        self.assertGreaterEqual(len(suite_cases()), 30, "suite at %s looks incomplete" % SUITE)
        src = os.path.join(SUITE, "SOURCE")  # a note some copies add; not upstream's
        if os.path.exists(src):
            with open(src) as f:
                text = f.read()
            for word in (AK, SK, "us-east-1", SUITE_DATE):
                self.assertIn(word, text)

    def test_every_case(self):
        for name, base in suite_cases():
            with self.subTest(case=name):
                check_case(self, Case.from_files(base))

    def test_signed_request_files(self):
        """The .sreq files (request as sent, with Authorization) verify too, except where
        the suite itself is inconsistent (.sreq signature differs from .authz)."""
        checked = 0
        for name, base in suite_cases():
            c = Case.from_files(base)
            if c.sreq is None:
                continue
            with self.subTest(case=name):
                m, target, hs, body = parse_http(c.sreq)
                sent = [v for k, v in hs if k.lower() == "authorization"]
                if sent != [" " + c.authz] and sent != [c.authz]:
                    continue  # get-vanilla-with-session-token: .sreq carries a stale signature
                tok = c.token(hs)
                signed_tok = "x-amz-security-token" in c.auth["signed_headers"]
                res = fa.verify(m, target, hs, body, AK, SK, "us-east-1", "service",
                                tok if signed_tok else None, now=SUITE_NOW,
                                required_signed=("host", "x-amz-date"))
                if tok is not None and not signed_tok:
                    # post-sts-header-after: token sent but not signed; this fake wants it
                    # signed, as the extension's spec says.
                    self.assertFalse(res.ok)
                    res2 = fa.verify(m, target, hs, body, AK, SK, "us-east-1", "service",
                                     tok, now=SUITE_NOW, required_signed=("host", "x-amz-date"))
                    self.assertFalse(res2.ok)
                    self.assertIn("signed header", res2.error)
                else:
                    self.assertTrue(res.ok, res.error)
                checked += 1
        self.assertGreaterEqual(checked, 25)


# ---------------------------------------------------------------- verifier negatives

class VerifyRejectsTest(unittest.TestCase):
    """Start from a request signed now, change one thing, expect a rejection."""

    TOKEN = "FwoGZXIvYXdzEXAMPLE//token+with/odd=chars"

    def make(self, **kw):
        body = kw.pop("body", b'{"SecretId":"apm/token","VersionStage":"AWSCURRENT"}')
        hs = [("Host", "localhost:4443"), ("Content-Type", fa.JSON_CT),
              ("X-Amz-Target", "secretsmanager.GetSecretValue")]
        args = dict(access_key=AK, secret_key=SK, region="us-east-1",
                    service="secretsmanager", session_token=self.TOKEN)
        args.update(kw)
        return fa.sign_request("POST", "/", hs, body, **args), body

    def check(self, hs, body, ok, want=None, **kw):
        target = kw.pop("target", "/")
        args = dict(access_key=AK, secret_key=SK, region="us-east-1",
                    service="secretsmanager", session_token=self.TOKEN)
        args.update(kw)
        res = fa.verify("POST", target, hs, body, **args)
        self.assertEqual(res.ok, ok, res.error)
        if want:
            self.assertIn(want, res.error)
        return res

    @staticmethod
    def replace(hs, name, value):
        return [(k, value if k.lower() == name else v) for k, v in hs]

    def test_good(self):
        hs, body = self.make()
        res = self.check(hs, body, True)
        self.assertTrue(res.session_token_signed)
        self.assertEqual(res.auth["service"], "secretsmanager")
        # an extra unsigned header is fine; header name case does not matter
        self.check(hs + [("User-Agent", "apm-ext/1.0")], body, True)
        self.check([(k.upper(), v) for k, v in hs], body, True)
        self.check(self.replace(hs, "content-type", "  %s  " % fa.JSON_CT), body, True)

    def test_tampering(self):
        hs, body = self.make()
        auth = [v for k, v in hs if k == "Authorization"][0]
        sig = auth[-64:]
        bad = sig[:10] + ("0" if sig[10] != "0" else "1") + sig[11:]
        self.check(self.replace(hs, "authorization", auth[:-64] + bad), body, False,
                   "does not match")
        self.check(hs, body.replace(b"token", b"tokem"), False, "does not match")
        self.check(self.replace(hs, "x-amz-target", "secretsmanager.ListSecrets"), body,
                   False, "does not match")
        self.check(self.replace(hs, "host", "evil:4443"), body, False, "does not match")
        self.check(hs + [("Content-Type", "text/plain")], body, False, "does not match")
        self.check(hs, body, False, "does not match", secret_key=SK + "x")
        self.check(hs, body, False, "does not match", target="/other")
        self.check(hs, body, False, "does not match", target="/?a=b")

    def test_credentials_and_scope(self):
        hs, body = self.make()
        res = self.check(hs, body, False, "unknown access key", access_key="AKIDOTHER")
        self.assertEqual(res.error_type, "UnrecognizedClientException")
        self.check(hs, body, False, "region", region="eu-west-1")
        self.check(hs, body, False, "correct service", service="acm")
        hs2, body2 = self.make(region="eu-west-1")
        self.check(hs2, body2, False, "region")
        hs3, body3 = self.make(service="acm")
        self.check(hs3, body3, False, "correct service")

    def test_date(self):
        now = time.time()
        for skew, ok in ((-14 * 60, True), (14 * 60, True), (-16 * 60, False),
                         (16 * 60, False)):
            hs, body = self.make(now=now + skew)
            self.check(hs, body, ok, None if ok else "expired", now=now)
        hs, body = self.make()
        self.check([(k, v) for k, v in hs if k != "X-Amz-Date"], body, False)
        amz = [v for k, v in hs if k == "X-Amz-Date"][0]
        self.check(self.replace(hs, "x-amz-date", amz.replace("T", "X")), body, False,
                   "YYYYMMDDTHHMMSSZ")
        # credential date not the X-Amz-Date's day
        auth = [v for k, v in hs if k == "Authorization"][0]
        self.check(self.replace(hs, "authorization", auth.replace(
            "/%s/" % amz[:8], "/19990101/")), body, False, "Credential date")

    def test_signed_headers(self):
        for drop in ("host", "x-amz-date", "x-amz-target"):
            names = {"content-type", "host", "x-amz-date", "x-amz-target",
                     "x-amz-security-token"} - {drop}
            hs, body = self.make(signed=names)
            self.check(hs, body, False, "'%s' must be a signed header" % drop)
        # content-type need not be signed for the fake (scenarios check it themselves)
        hs, body = self.make(signed={"host", "x-amz-date", "x-amz-target",
                                     "x-amz-security-token"})
        self.check(hs, body, True)
        # a signed header the request lacks (signed with it, sent without it)
        hs, body = self.make(signed={"content-type", "host", "x-amz-date", "x-amz-target",
                                     "x-amz-security-token"})
        self.check(hs, body, True)
        hs = [(k, v.replace("SignedHeaders=content-type;", "SignedHeaders=content-type;"
                            "expect;")) for k, v in hs]
        self.check(hs, body, False, "not in the request")
        # unsorted / upper-case SignedHeaders
        hs, body = self.make()
        auth = [v for k, v in hs if k == "Authorization"][0]
        self.check(self.replace(hs, "authorization", auth.replace(
            "content-type;host", "host;content-type")), body, False, "sorted")
        self.check(self.replace(hs, "authorization", auth.replace("host;", "Host;")), body,
                   False)

    def test_session_token(self):
        hs, body = self.make(signed={"content-type", "host", "x-amz-date", "x-amz-target"})
        self.check(hs, body, False, "x-amz-security-token must be a signed header")
        hs, body = self.make(session_token=None)
        res = self.check(hs, body, False, "X-Amz-Security-Token missing")
        self.assertEqual(res.error_type, "UnrecognizedClientException")
        self.check(hs, body, True, session_token=None)
        hs, body = self.make(session_token="other-token")
        self.check(hs, body, False, "security token included in the request is invalid")
        hs, body = self.make()
        self.check(hs, body, False, "none expected", session_token=None)

    def test_malformed_authorization(self):
        hs, body = self.make()
        auth = [v for k, v in hs if k == "Authorization"][0]
        res = self.check([(k, v) for k, v in hs if k != "Authorization"], body, False)
        self.assertEqual(res.error_type, "MissingAuthenticationTokenException")
        for bad in ("AWS4-HMAC-SHA1" + auth[16:], auth.replace("Credential=", "Cred="),
                    auth.replace(", Signature=", ", Sig="), auth.replace("aws4_request",
                                                                         "aws5_request"),
                    auth[:-1], auth + ", Extra=1", "garbage", ""):
            with self.subTest(bad=bad[:60]):
                self.check(self.replace(hs, "authorization", bad), body, False)

    def test_content_sha256(self):
        hs, body = self.make()
        hs2, _ = self.make(body=body)
        hs2.insert(0, ("X-Amz-Content-Sha256", fa.sha256_hex(b"other")))
        self.check(hs2, body, False, "x-amz-content-sha256")


# ---------------------------------------------------------------- the server

class ServerTest(unittest.TestCase):
    TOKEN = "IQoJb3JpZ2luX2VjEXAMPLE/session+token=="

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="fake-aws-test-")
        cls.ca = make_test_ca(cls.tmp.name)
        cls.ctx = ssl.create_default_context(cafile=cls.ca["ca"])

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def setUp(self):
        self.aws = fa.FakeAWS(self.ca["cert"], self.ca["key"], AK, SK,
                              session_token=self.TOKEN)
        self.addCleanup(self.aws.close)
        self.aws.secrets["apm/token"] = "tok-123"
        self.aws.secrets["apm/bin"] = b"\x00binary\xffsecret"
        self.aws.certs["arn:aws:acm:us-east-1:123456789012:certificate/abc"] = (
            "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n",
            "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n")

    def conn(self, host="localhost"):
        c = http.client.HTTPSConnection(host, self.aws.port, context=self.ctx, timeout=5)
        self.addCleanup(c.close)
        return c

    def call(self, target="secretsmanager.GetSecretValue", obj=None, conn=None,
             service=None, raw_body=None, content_type=fa.JSON_CT, **sign):
        if obj is None:
            obj = {"SecretId": "apm/token", "VersionStage": "AWSCURRENT"}
        body = raw_body if raw_body is not None else json.dumps(obj).encode()
        if service is None:
            service = fa.TARGETS.get(target, ("secretsmanager",))[0]
        args = dict(access_key=AK, secret_key=SK, region="us-east-1", service=service,
                    session_token=self.TOKEN)
        args.update(sign)
        hs = [("Host", "localhost:%d" % self.aws.port), ("Content-Type", content_type),
              ("X-Amz-Target", target)]
        hs = fa.sign_request("POST", "/", hs, body, **args)
        c = conn or self.conn()
        c.putrequest("POST", "/", skip_host=True, skip_accept_encoding=True)
        for k, v in hs:
            c.putheader(k, v)
        c.putheader("Content-Length", str(len(body)))
        c.endheaders(body)
        r = c.getresponse()
        data = r.read()
        try:
            doc = json.loads(data)
        except ValueError:
            doc = None
        return r.status, doc, data

    def last(self):
        self.assertTrue(self.aws.wait_for(lambda a: a.calls and a.calls[-1].done, 5))
        return self.aws.calls[-1]

    def test_url(self):
        self.assertEqual(self.aws.url, "https://localhost:%d" % self.aws.port)

    def test_secret_string(self):
        st, doc, _ = self.call()
        self.assertEqual(st, 200)
        self.assertEqual(doc["SecretString"], "tok-123")
        self.assertEqual(doc["Name"], "apm/token")
        self.assertEqual(doc["VersionStages"], ["AWSCURRENT"])
        self.assertNotIn("SecretBinary", doc)
        for k in ("ARN", "VersionId", "CreatedDate"):
            self.assertIn(k, doc)
        c = self.last()
        self.assertTrue(c.sig_ok, c.sig_error)
        self.assertEqual((c.status, c.op, c.service, c.secret_id), (200, "GetSecretValue",
                                                                   "secretsmanager",
                                                                   "apm/token"))
        self.assertEqual(c.problems, [])
        self.assertIn("x-amz-security-token", c.signed_headers)
        self.assertEqual(c.json, {"SecretId": "apm/token", "VersionStage": "AWSCURRENT"})
        # by ARN as well
        st, doc2, _ = self.call(obj={"SecretId": doc["ARN"]})
        self.assertEqual((st, doc2["SecretString"]), (200, "tok-123"))

    def test_secret_binary(self):
        st, doc, _ = self.call(obj={"SecretId": "apm/bin"})
        self.assertEqual(st, 200)
        self.assertNotIn("SecretString", doc)
        self.assertEqual(base64.b64decode(doc["SecretBinary"]), b"\x00binary\xffsecret")

    def test_secret_errors(self):
        st, doc, _ = self.call(obj={"SecretId": "nope"})
        self.assertEqual((st, doc["__type"]), (400, "ResourceNotFoundException"))
        self.assertIn("message", doc)
        self.assertEqual(self.last().error_type, "ResourceNotFoundException")
        st, doc, _ = self.call(obj={"SecretId": "apm/token", "VersionStage": "AWSPREVIOUS"})
        self.assertEqual((st, doc["__type"]), (400, "ResourceNotFoundException"))
        st, doc, _ = self.call(obj={})
        self.assertEqual((st, doc["__type"]), (400, "InvalidParameterException"))
        st, doc, _ = self.call(raw_body=b"{not json")
        self.assertEqual((st, doc["__type"]), (400, "SerializationException"))
        self.assertTrue(self.last().problems)

    def test_acm(self):
        arn = "arn:aws:acm:us-east-1:123456789012:certificate/abc"
        st, doc, _ = self.call("CertificateManager.GetCertificate", {"CertificateArn": arn})
        self.assertEqual(st, 200)
        self.assertIn("AAA", doc["Certificate"])
        self.assertIn("BBB", doc["CertificateChain"])
        c = self.last()
        self.assertEqual((c.op, c.service, c.cert_arn, c.sig_ok), ("GetCertificate", "acm",
                                                                   arn, True))
        self.aws.certs[arn] = ("PEM", None)
        st, doc, _ = self.call("CertificateManager.GetCertificate", {"CertificateArn": arn})
        self.assertEqual(doc, {"Certificate": "PEM"})
        st, doc, _ = self.call("CertificateManager.GetCertificate",
                               {"CertificateArn": arn + "x"})
        self.assertEqual((st, doc["__type"]), (400, "ResourceNotFoundException"))
        # ACM target signed for secretsmanager: wrong scope
        st, doc, _ = self.call("CertificateManager.GetCertificate", {"CertificateArn": arn},
                               service="secretsmanager")
        self.assertEqual((st, doc["__type"]), (403, "InvalidSignatureException"))

    def test_bad_signatures(self):
        self.aws.fail_next(1, ("ThrottlingException", 400))
        for sign, want in ((dict(secret_key="x" + SK), "InvalidSignatureException"),
                           (dict(access_key="AKIDOTHER"), "UnrecognizedClientException"),
                           (dict(session_token=None), "UnrecognizedClientException"),
                           (dict(session_token="wrong"), "UnrecognizedClientException"),
                           (dict(now=time.time() - 3600), "InvalidSignatureException"),
                           (dict(region="eu-west-1"), "InvalidSignatureException"),
                           (dict(service="acm"), "InvalidSignatureException"),
                           (dict(signed={"host", "x-amz-date", "x-amz-target"}),
                            "InvalidSignatureException")):
            with self.subTest(sign=sign):
                st, doc, _ = self.call(**sign)
                self.assertEqual((st, doc["__type"]), (403, want), doc)
                c = self.last()
                self.assertFalse(c.sig_ok)
                self.assertTrue(c.sig_error)
                self.assertEqual(c.status, 403)
                self.assertIsNone(c.injected)
        # the injected failure is still pending for the first well-signed call
        st, doc, _ = self.call()
        self.assertEqual((st, doc["__type"]), (400, "ThrottlingException"))
        self.assertEqual(self.call()[0], 200)

    def test_no_session_token_configured(self):
        self.aws.session_token = None
        st, doc, _ = self.call()
        self.assertEqual((st, doc["__type"]), (403, "UnrecognizedClientException"))
        st, doc, _ = self.call(session_token=None)
        self.assertEqual(st, 200)
        self.assertNotIn("x-amz-security-token", self.last().signed_headers)

    def test_protocol_problems(self):
        st, doc, _ = self.call(content_type="application/json")
        self.assertEqual(st, 200)  # AWS is lenient here; the problem is recorded
        self.assertTrue(any("Content-Type" in p for p in self.last().problems))
        st, doc, _ = self.call("secretsmanager.ListSecrets")
        self.assertEqual((st, doc["__type"]), (400, "UnknownOperationException"))

    def test_fail_injection(self):
        aws = self.aws
        aws.fail = (2, ("ThrottlingException", 400, "Rate exceeded"))
        for _ in range(2):
            st, doc, _ = self.call()
            self.assertEqual((st, doc), (400, {"__type": "ThrottlingException",
                                               "message": "Rate exceeded"}))
            self.assertEqual(self.last().injected, ("ThrottlingException", 400,
                                                    "Rate exceeded"))
        self.assertEqual(self.call()[0], 200)
        self.assertIsNone(aws.fail)
        aws.fail = (1, ("InternalServiceError", 500))
        st, doc, _ = self.call()
        self.assertEqual((st, doc["__type"]), (500, "InternalServiceError"))
        # target filter
        aws.fail_next(1, ("AccessDeniedException", 400), target="CertificateManager.GetCertificate")
        self.assertEqual(self.call()[0], 200)
        st, doc, _ = self.call("CertificateManager.GetCertificate", {"CertificateArn": "x"})
        self.assertEqual(doc["__type"], "AccessDeniedException")
        # unlimited until cleared, cycling
        aws.fail = (None, [("AccessDeniedException", 400), b"junk"])
        got = [self.call()[:2] for _ in range(4)]
        self.assertEqual([g[0] for g in got], [400, 200, 400, 200])
        self.assertIsNone(got[1][1])
        aws.fail = None
        self.assertEqual(self.call()[1]["SecretString"], "tok-123")
        with self.assertRaises(ValueError):
            aws.fail = (1, "not a failure")

    def test_garbage(self):
        aws = self.aws
        for g in fa.GARBAGE_ALL:
            with self.subTest(garbage=g):
                aws.fail = (1, g)
                if g.close:
                    with self.assertRaises((http.client.RemoteDisconnected,
                                            ConnectionError, ssl.SSLError)):
                        self.call()
                    self.assertIsNone(self.last().status)
                elif g.truncate:
                    with self.assertRaises(http.client.IncompleteRead):
                        self.call()
                else:
                    st, doc, data = self.call()
                    self.assertEqual((st, data), (g.status, g.body))
                self.assertIs(self.last().injected, g)
        self.assertEqual(self.call()[0], 200)

    def test_keepalive_and_recording(self):
        c = self.conn()
        for _ in range(3):
            self.assertEqual(self.call(conn=c)[0], 200)
        self.call("CertificateManager.GetCertificate", {"CertificateArn": "nope"}, conn=c)
        calls = self.aws.calls
        self.assertEqual(len(calls), 4)
        self.assertEqual(len({x.conn_id for x in calls}), 1)
        self.assertEqual(len(self.aws.connections), 1)
        self.assertEqual(len(self.aws.calls_to("GetSecretValue")), 3)
        self.assertEqual(len(self.aws.calls_to("CertificateManager.GetCertificate",
                                               ok=False)), 1)
        self.assertEqual(len(self.aws.wait_calls(3, "GetSecretValue", ok=True)), 3)
        self.assertTrue(all(x.t <= x.t_end for x in calls))
        self.assertIn("GetSecretValue apm/token sig=ok -> 200", self.aws.summary())
        with self.assertRaises(AssertionError):
            self.aws.wait_calls(5, "GetSecretValue", timeout=0.2)

    def test_delay(self):
        self.aws.delay = 0.3
        t0 = time.monotonic()
        self.assertEqual(self.call()[0], 200)
        self.assertGreaterEqual(time.monotonic() - t0, 0.3)

    def test_ipv6_and_tls(self):
        try:
            with socket.socket(socket.AF_INET6) as s:
                s.bind(("::1", 0))
        except OSError:
            self.skipTest("no ::1")
        c6 = http.client.HTTPSConnection("::1", self.aws.port, context=self.ctx, timeout=5)
        self.addCleanup(c6.close)
        self.assertEqual(self.call(conn=c6)[0], 200)
        # a client that does not trust the CA: handshake fails, recorded
        bad = ssl.create_default_context(cafile=self.ca["wrong_ca"])
        c = http.client.HTTPSConnection("localhost", self.aws.port, context=bad, timeout=5)
        with self.assertRaises(ssl.SSLError):
            c.request("POST", "/")
        c.close()
        self.assertTrue(self.aws.wait_for(lambda a: a.tls_errors, 5))

    def test_close_is_prompt(self):
        c = self.conn()
        self.assertEqual(self.call(conn=c)[0], 200)
        t0 = time.monotonic()
        self.aws.close()
        self.assertLess(time.monotonic() - t0, 2)
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", self.aws.port), timeout=1).close()


if __name__ == "__main__":
    unittest.main()
