#!/usr/bin/env python3
"""Self-test for test/fake_apm.py and test/jsonschema_mini.py (stdlib unittest)."""
import gzip
import http.client
import json
import os
import socket
import ssl
import sys
import tempfile
import time
import unittest
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jsonschema_mini  # noqa: E402
from fake_apm import FakeAPM, load_schemas, make_test_ca  # noqa: E402

META = {"service": {"name": "my-fn", "agent": {"name": "python", "version": "6.22.0"},
                    "runtime": {"name": "python", "version": "3.11"}},
        "process": {"pid": 1}, "cloud": {"provider": "aws", "region": "us-east-1"}}
TX = {"id": "0123456789abcdef", "trace_id": "0123456789abcdef0123456789abcdef",
      "type": "request", "name": "GET /", "duration": 12.5, "span_count": {"started": 1},
      "outcome": "success", "timestamp": 1700000000000000}
SPAN = {"id": "1111111111111111", "trace_id": TX["trace_id"], "parent_id": TX["id"],
        "transaction_id": TX["id"], "name": "SELECT", "type": "db", "duration": 1.0, "start": 2.0}
ERR = {"id": "2222222222222222", "exception": {"message": "boom", "type": "ValueError"},
       "trace_id": TX["trace_id"], "parent_id": TX["id"], "transaction_id": TX["id"]}
METRIC = {"samples": {"faas.duration": {"value": 12.5},
                      "h": {"values": [1, 2], "counts": [3, 4], "type": "histogram"}},
          "timestamp": 1700000000000000, "faas": {"execution": "abc"}}
LOG = {"@timestamp": "2024-01-01T00:00:00Z", "message": "hello"}


def ndjson(*pairs):
    return b"".join(json.dumps({k: v}).encode() + b"\n" for k, v in pairs)


GOOD = ndjson(("metadata", META), ("transaction", TX), ("span", SPAN), ("error", ERR),
              ("metricset", METRIC), ("log", LOG))


class SchemaTest(unittest.TestCase):
    def setUp(self):
        self.s = load_schemas()

    def check(self, kind, obj, valid):
        errs = jsonschema_mini.validate(obj, self.s[kind])
        self.assertEqual(not errs, valid, "%s %r -> %s" % (kind, obj, errs))
        return errs

    def test_valid(self):
        for kind, obj in (("metadata", META), ("transaction", TX), ("span", SPAN),
                          ("error", ERR), ("metricset", METRIC)):
            self.check(kind, obj, True)
        self.check("error", {"id": "x", "log": {"message": "m"}}, True)
        self.check("span", dict(SPAN, start=None, timestamp=5), True)
        self.check("metadata", dict(META, labels={"a": "x", "b": 1, "c": None, "d": True}), True)

    def test_invalid(self):
        e = self.check("metadata", {"service": {"name": "bad/name",
                                                "agent": {"name": "", "version": "1"}}}, False)
        self.assertTrue(any("$.service.name" in x and "pattern" in x for x in e), e)
        self.assertTrue(any("$.service.agent.name" in x for x in e), e)
        self.check("metadata", {}, False)
        self.check("metadata", dict(META, labels={"a": {"nested": 1}}), False)
        self.check("metadata", dict(META, labels={"a": "é" * 1024}), True)  # characters
        self.check("metadata", dict(META, labels={"a": "é" * 1025}), False)
        self.check("metadata", dict(META, process={"pid": 1.5}), False)
        self.check("metadata", dict(META, process={"pid": True}), False)
        self.check("transaction", {k: v for k, v in TX.items() if k != "span_count"}, False)
        self.check("transaction", dict(TX, duration=-1), False)
        self.check("transaction", dict(TX, outcome="meh"), False)
        self.check("transaction", dict(TX, id="x" * 1025), False)
        self.check("span", {k: v for k, v in SPAN.items() if k != "start"}, False)  # anyOf
        self.check("error", {"id": "x"}, False)                                     # anyOf
        self.check("error", {"id": "x", "log": {"message": "m"}, "transaction_id": "t"}, False)
        self.check("metricset", {"samples": {"h": {"values": [1]}}}, False)         # if/then
        self.check("metricset", {"samples": {"a*b": {"value": 1}}}, False)          # pattern key
        self.check("metricset", {"samples": {"c": {"value": "1"}}}, False)

    def test_keywords(self):
        v = jsonschema_mini.validate
        self.assertEqual(v(3, {"type": "integer", "minimum": 1, "maximum": 3}), [])
        self.assertEqual(len(v([1], {"type": "array", "minItems": 2, "maxItems": 0})), 2)
        self.assertEqual(len(v({}, {"minProperties": 1, "unknownKeyword": 1})), 1)
        self.assertEqual(len(v("b", {"enum": ["a", None]})), 1)
        self.assertEqual(v(None, {"enum": ["a", None]}), [])
        self.assertIn("$[1]", v([1, "x"], {"items": {"type": "integer"}})[0])


def post(port, body, headers=None, path="/intake/v2/events", conn=None, timeout=5, tls_ctx=None):
    c = conn or (http.client.HTTPSConnection("localhost", port, context=tls_ctx, timeout=timeout)
                 if tls_ctx else http.client.HTTPConnection("127.0.0.1", port, timeout=timeout))
    h = {"Content-Type": "application/x-ndjson"}
    h.update(headers or {})
    try:
        c.request("POST", path, body=body, headers=h)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        if conn is None:
            c.close()


class FakeAPMTest(unittest.TestCase):
    def setUp(self):
        self.apm = FakeAPM()
        self.addCleanup(self.apm.close)

    def test_encodings_and_keepalive(self):
        a = self.apm
        c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=5)
        gz = gzip.compress(GOOD)
        chunks = iter([gz[:10], gz[10:50], gz[50:]])  # no length -> chunked
        self.assertEqual(post(a.port, chunks, {"Content-Encoding": "gzip"}, conn=c), (202, b""))
        self.assertEqual(post(a.port, zlib.compress(GOOD), {"Content-Encoding": "deflate"},
                              conn=c)[0], 202)
        raw = zlib.compressobj(wbits=-15)
        self.assertEqual(post(a.port, raw.compress(GOOD) + raw.flush(),
                              {"Content-Encoding": "deflate"}, conn=c)[0], 202)
        self.assertEqual(post(a.port, GOOD, path="/prefix/intake/v2/events?flushed=true",
                              conn=c)[0], 202)
        c.close()
        reqs = a.requests
        self.assertEqual(len(reqs), 4)
        self.assertTrue(reqs[0].chunked)
        self.assertEqual(reqs[0].body, gz)
        self.assertEqual(reqs[0].headers["content-encoding"], "gzip")
        self.assertEqual(len({r.conn_id for r in reqs}), 1)  # keep-alive reuse
        self.assertEqual(reqs[3].path, "/prefix/intake/v2/events")
        self.assertEqual(reqs[3].params, {"flushed": ["true"]})
        self.assertEqual(a.count("transaction"), 4)
        self.assertEqual(a.count("log"), 4)
        self.assertEqual(len(a.metadata()), 4)
        self.assertEqual(a.events("span")[0], SPAN)
        self.assertEqual(a.events()[0], ("transaction", TX))
        self.assertEqual(a.errors, [])
        self.assertTrue(all(r.t_end >= r.t_start for r in reqs))
        self.assertTrue(a.wait_for(lambda s: s.open_connections() == 0, 2))

    def test_bad_payloads(self):
        a = self.apm
        bad_tx = dict(TX)
        del bad_tx["trace_id"]
        cases = [ndjson(("metadata", META), ("transaction", bad_tx)),
                 ndjson(("transaction", TX)),
                 ndjson(("metadata", META), ("foo", {})),
                 b'{"metadata": {}, "span": {}}\n',
                 ndjson(("metadata", META)) + b"{not json\n",
                 ndjson(("metadata", META), ("log", {"x": 1})),
                 b"", b"\xff\xfe garbage"]
        for body in cases:
            st, data = post(a.port, body)
            self.assertEqual(st, 400, body)
            self.assertEqual(json.loads(data)["accepted"], 0)
        st, _ = post(a.port, b"not gzip", {"Content-Encoding": "gzip"})
        self.assertEqual(st, 400)
        st, _ = post(a.port, GOOD, {"Content-Encoding": "br"})
        self.assertEqual(st, 400)
        self.assertTrue(any("trace_id" in e for e in a.requests[0].errors))
        self.assertEqual(a.count("transaction"), 0)
        self.assertTrue(len(a.errors) >= len(cases))
        # raw garbage on the socket must not kill the server
        s = socket.create_connection(("127.0.0.1", a.port))
        s.sendall(b"\x00\x01garbage\r\n\r\n")
        s.recv(100)
        s.close()
        s = socket.create_connection(("127.0.0.1", a.port))
        s.sendall(b"POST /intake/v2/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  b"\r\nzz\r\n")
        self.assertIn(b" 400 ", s.recv(1000))
        s.close()
        self.assertEqual(post(a.port, GOOD)[0], 202)

    def test_other_endpoints(self):
        a = self.apm
        c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=5)
        c.request("GET", "/", headers={"Authorization": "Bearer x"})
        r = c.getresponse()
        self.assertEqual((r.status, json.loads(r.read())["version"]), (200, "8.15.0"))
        c.request("POST", "/config/v1/agents", body=b'{"service":{"name":"x"}}')
        r = c.getresponse()
        self.assertEqual((r.status, r.read()), (200, b"{}\n"))
        c.request("GET", "/config/v1/agents?service.name=x")
        r = c.getresponse()
        self.assertEqual((r.status, r.read()), (200, b"{}\n"))
        c.request("GET", "/nope")
        r = c.getresponse()
        r.read()
        self.assertEqual(r.status, 404)
        c.close()
        self.assertEqual(a.requests[0].headers["AUTHORIZATION"], "Bearer x")
        self.assertEqual([r.status for r in a.requests], [200, 200, 200, 404])

    def test_auth(self):
        for kw, good, bad in (({"token": "s3cr3t"}, "Bearer s3cr3t", "ApiKey s3cr3t"),
                              ({"api_key": "k3y"}, "ApiKey k3y", "Bearer k3y")):
            with FakeAPM(**kw) as a:
                self.assertEqual(post(a.port, GOOD)[0], 401)
                self.assertEqual(post(a.port, GOOD, {"Authorization": bad})[0], 401)
                self.assertEqual(post(a.port, GOOD, {"Authorization": good})[0], 202)
                self.assertEqual(a.count("transaction"), 1)
                self.assertEqual([r.status for r in a.requests], [401, 401, 202])

    def test_modes(self):
        a = self.apm
        a.set_mode("status", 503)
        st, data = post(a.port, GOOD)
        self.assertEqual(st, 503)
        self.assertIn("errors", json.loads(data))
        self.assertEqual(a.count("transaction"), 0)
        a.set_mode("ok")
        a.fail_next(2, 429)
        self.assertEqual([post(a.port, GOOD)[0] for _ in range(3)], [429, 429, 202])
        a.set_mode("slow", 0.3)
        t = time.monotonic()
        self.assertEqual(post(a.port, GOOD)[0], 202)
        self.assertGreaterEqual(time.monotonic() - t, 0.3)
        a.set_mode("stall")
        with self.assertRaises(socket.timeout):
            post(a.port, GOOD, timeout=0.3)
        self.assertIsNone(a.requests[-1].status)
        c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=5)
        c.request("POST", "/intake/v2/events", body=GOOD)
        self.assertTrue(a.wait_for(lambda s: len(s.requests) == 7, 2))
        a.set_mode("ok")  # the stalled request is now answered
        self.assertEqual(c.getresponse().status, 202)
        c.close()
        port = a.port
        a.set_mode("down")
        with self.assertRaises(ConnectionRefusedError):
            post(port, GOOD)
        a.set_mode("ok")
        self.assertEqual(a.port, port)
        self.assertEqual(post(port, GOOD)[0], 202)

    def test_drop_and_close_idle(self):
        a = self.apm
        c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=5)
        self.assertEqual(post(a.port, GOOD, conn=c)[0], 202)
        self.assertEqual(a.open_connections(), 1)
        a.drop_connections()
        self.assertTrue(a.wait_for(lambda s: s.open_connections() == 0, 2))
        with self.assertRaises((http.client.RemoteDisconnected, ConnectionError)):
            post(a.port, GOOD, conn=c)
        c.close()
        a.set_mode("close_idle", 0.2)
        c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=5)
        self.assertEqual(post(a.port, GOOD, conn=c)[0], 202)
        self.assertEqual(post(a.port, GOOD, conn=c)[0], 202)  # not idle long enough
        self.assertTrue(a.wait_for(lambda s: s.open_connections() == 0, 2))
        c.close()
        self.assertEqual(len({r.conn_id for r in a.requests[1:]}), 1)

    def test_stall_then_down_and_close(self):
        a = self.apm
        a.set_mode("stall")
        c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=5)
        c.request("POST", "/intake/v2/events", body=GOOD)
        self.assertTrue(a.wait_for(lambda s: len(s.requests) == 1, 2))
        t = time.monotonic()
        a.set_mode("down")  # drops the stalled connection without an answer
        with self.assertRaises((http.client.RemoteDisconnected, ConnectionError)):
            c.getresponse()
        c.close()
        a.set_mode("stall")
        c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=5)
        c.request("GET", "/")
        self.assertTrue(a.wait_for(lambda s: len(s.requests) == 2, 2))
        a.close()
        with self.assertRaises((http.client.RemoteDisconnected, ConnectionError)):
            c.getresponse()
        c.close()
        self.assertLess(time.monotonic() - t, 2)
        self.assertEqual([r.status for r in a.requests], [None, None])
        self.assertEqual(a.count(), 0)

    def test_wait_for_timeout(self):
        t = time.monotonic()
        self.assertFalse(self.apm.wait_for(lambda s: s.count("span") > 0, 0.2))
        self.assertLess(time.monotonic() - t, 1)


class TLSTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.certs = make_test_ca(cls.tmp.name)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def ctx(self, ca):
        return ssl.create_default_context(cafile=ca)

    def test_tls(self):
        c = self.certs
        with FakeAPM(tls=(c["cert"], c["key"]), token="t") as a:
            self.assertTrue(a.url.startswith("https://localhost:"))
            st, _ = post(a.port, GOOD, {"Authorization": "Bearer t"}, tls_ctx=self.ctx(c["ca"]))
            self.assertEqual(st, 202)
            with self.assertRaises(ssl.SSLCertVerificationError):
                post(a.port, GOOD, tls_ctx=self.ctx(c["wrong_ca"]))
            self.assertTrue(a.wait_for(lambda s: s.tls_errors, 2))
            a.set_mode("down")
            a.set_mode("ok")
            st, _ = post(a.port, GOOD, {"Authorization": "Bearer t"}, tls_ctx=self.ctx(c["ca"]))
            self.assertEqual(st, 202)
        with FakeAPM(tls=(c["wronghost_cert"], c["wronghost_key"])) as a:
            with self.assertRaises(ssl.SSLCertVerificationError) as cm:
                post(a.port, GOOD, tls_ctx=self.ctx(c["ca"]))
            self.assertIn("Hostname mismatch", str(cm.exception))


if __name__ == "__main__":
    unittest.main(verbosity=2)
