#!/usr/bin/env python3
"""Self-test for test/fake_aws.py (stdlib unittest).

    python3 test/test_fake_aws.py [-v]

1. The Signature V4 code against AWS's own test suite in
   /work/shared/aws-sigv4-testsuite (or $AWS_SIGV4_TESTSUITE): for every case the
   canonical request, string to sign and Authorization header must match AWS's files
   byte for byte, and verify() must accept the signed request.
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

SUITE = os.environ.get("AWS_SIGV4_TESTSUITE") or os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "shared",
    "aws-sigv4-testsuite"))
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
    """[(name, base path)] of every case (a directory holding NAME.req)."""
    out = []
    for req in sorted(glob.glob(os.path.join(SUITE, "**", "*.req"), recursive=True)):
        out.append((os.path.relpath(req[:-4], SUITE), req[:-4]))
    return out


class Case:
    def __init__(self, base):
        self.method, self.target, self.headers, self.body = parse_http(read(base + ".req"))
        self.creq = read(base + ".creq").decode("latin-1")
        self.sts = read(base + ".sts").decode("latin-1")
        self.authz = read(base + ".authz").decode("latin-1").strip()
        self.sreq = read(base + ".sreq") if os.path.exists(base + ".sreq") else None
        self.auth = fa.parse_authorization(self.authz)
        # A signer adds some headers itself (get-vanilla-with-session-token: the token):
        # take those from the canonical request AWS expects.
        creq_headers = dict(ln.split(":", 1) for ln in self.creq.split("\n")[3:]
                            if ":" in ln and not ln.startswith(" "))
        for name in self.auth["signed_headers"]:
            if not any(k.lower() == name for k, _ in self.headers):
                self.headers.append((name, creq_headers[name]))

    def token(self, headers=None):
        for k, v in headers or self.headers:
            if k.lower() == "x-amz-security-token":
                return v
        return None


@unittest.skipUnless(os.path.isdir(SUITE), "no AWS SigV4 test suite at %s" % SUITE)
class SigV4SuiteTest(unittest.TestCase):
    def test_suite_present(self):
        self.assertGreaterEqual(len(suite_cases()), 30, "suite at %s looks incomplete" % SUITE)
        with open(os.path.join(SUITE, "SOURCE")) as f:
            src = f.read()
        for word in (AK, SK, "us-east-1", SUITE_DATE):
            self.assertIn(word, src)

    def test_every_case(self):
        for name, base in suite_cases():
            with self.subTest(case=name):
                c = Case(base)
                path, _, query = c.target.partition("?")
                creq = fa.canonical_request(c.method, path, query, c.headers,
                                            c.auth["signed_headers"], fa.sha256_hex(c.body))
                self.assertEqual(creq, c.creq, "canonical request")
                sts = fa.string_to_sign(SUITE_DATE, SUITE_SCOPE, creq)
                self.assertEqual(sts, c.sts, "string to sign")
                sig = fa.signature(SK, "20150830", "us-east-1", "service", sts)
                authz = "%s Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
                    fa.ALGORITHM, AK, SUITE_SCOPE, ";".join(c.auth["signed_headers"]), sig)
                self.assertEqual(authz, c.authz, "Authorization header")
                # ... and the verifier accepts the signed request
                hs = c.headers + [("Authorization", c.authz)]
                res = fa.verify(c.method, c.target, hs, c.body, AK, SK, "us-east-1",
                                "service", c.token(), now=SUITE_NOW,
                                required_signed=("host", "x-amz-date"))
                self.assertTrue(res.ok, res.error)
                self.assertEqual(res.canonical_request, c.creq)
                self.assertEqual(res.string_to_sign, c.sts)

    def test_signed_request_files(self):
        """The .sreq files (request as sent, with Authorization) verify too, except where
        the suite itself is inconsistent (.sreq signature differs from .authz)."""
        checked = 0
        for name, base in suite_cases():
            c = Case(base)
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
