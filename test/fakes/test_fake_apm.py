#!/usr/bin/env python3
"""Self-test for test/fakes/fake_apm.py and test/fakes/jsonschema_mini.py (stdlib unittest).

    python3 test/fakes/test_fake_apm.py [-k pattern]

OTLP: the fake's protobuf and JSON readers on bodies built here (a tiny encoder of the
test's own), on bodies from the pinned OpenTelemetry JS SDK when test/otel/node_modules
is installed (skipped otherwise), and its answers over HTTP.

The tests that need the APM intake v2 JSON schemas of elastic/apm-data (folder
docs/spec/v2 there), optional, are skipped when fake_apm found none (see
fake_apm.CHECK_LEVEL; APM_INTAKE_SPEC_DIR=/nonexistent forces that); everything else,
including the structural check, runs either way.
"""
import base64
import gzip
import http.client
import json
import os
import select
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fake_apm  # noqa: E402
import jsonschema_mini  # noqa: E402
from fake_apm import FakeAPM, load_schemas, make_test_ca, parse_ndjson  # noqa: E402

NO_SCHEMAS = "no intake schemas: " + fake_apm.CHECK_LEVEL

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


@unittest.skipIf(fake_apm.SPEC_DIR is None, NO_SCHEMAS)
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


class JsonSchemaMiniTest(unittest.TestCase):
    def test_keywords(self):
        v = jsonschema_mini.validate
        self.assertEqual(v(3, {"type": "integer", "minimum": 1, "maximum": 3}), [])
        self.assertEqual(len(v([1], {"type": "array", "minItems": 2, "maxItems": 0})), 2)
        self.assertEqual(len(v({}, {"minProperties": 1, "unknownKeyword": 1})), 1)
        self.assertEqual(len(v("b", {"enum": ["a", None]})), 1)
        self.assertEqual(v(None, {"enum": ["a", None]}), [])
        self.assertIn("$[1]", v([1, "x"], {"items": {"type": "integer"}})[0])


# ---------------------------------------------------------------- structural check

TRACE = "0af7651916cd43dd8448eb211c80319c"
ARN = "arn:aws:lambda:us-east-1:123456789012:function:test-fn"
# apm-ext's own events, byte for byte as apm-ext.c writes them (own_metadata, tel_report,
# tel_function_log, tel_proxy_transaction)
EXT_META = (b'{"metadata":{"service":{"name":"test-fn","version":"$LATEST","agent":{"name":'
            b'"apm-ext","version":"0.1.0"},"framework":{"name":"AWS Lambda"}},"cloud":'
            b'{"provider":"aws","region":"us-east-1","service":{"name":"lambda"}}}}\n')
EXT_METRICSET = (b'{"metricset":{"timestamp":1700000000123000,"faas":{"coldstart":true,'
                 b'"execution":"8476a536-e9f4-465a-9a6b-3d0b8d2e0c10","id":"' + ARN.encode() +
                 b'","name":"test-fn","version":"$LATEST"},"samples":{"faas.duration":'
                 b'{"value":12.34},"faas.billed_duration":{"value":13},'
                 b'"faas.coldstart_duration":{"value":150.5},"faas.timeout":{"value":3000},'
                 b'"system.memory.total":{"value":134217728},'
                 b'"system.memory.actual.free":{"value":83886080}}}}\n')
EXT_LOG = (b'{"log":{"@timestamp":1700000000123456,"message":"hello from the function",'
           b'"faas":{"id":"' + ARN.encode() + b'","name":"test-fn","execution":"8476a536"},'
           b'"trace.id":"' + TRACE.encode() + b'","transaction.id":"b7ad6b7169203331"}}\n')
EXT_PROXY_TX = (b'{"transaction":{"id":"b7ad6b7169203331","trace_id":"' + TRACE.encode() +
                b'","name":"test-fn","type":"request","timestamp":1700000000000000,'
                b'"sampled":true,"faas":{"coldstart":false,"execution":"8476a536","id":"' +
                ARN.encode() + b'","name":"test-fn","version":"$LATEST","trigger":'
                b'{"type":"other"}},"result":"timeout","outcome":"failure","duration":3012,'
                b'"span_count":{"started":0}}}\n')
# what the real Node.js agent sends (shapes of elastic-apm-node 4.x)
NODE_TX = {"id": "b7ad6b7169203331", "trace_id": TRACE, "parent_id": None, "name": "test-fn",
           "type": "request", "subtype": None, "action": None, "duration": 1.785,
           "timestamp": 1700000000000123, "result": "success", "sampled": True,
           "context": {"user": {}, "tags": {}, "custom": {}}, "sample_rate": 1,
           "span_count": {"started": 2}, "outcome": "success",
           "faas": {"coldstart": True, "execution": "8476a536", "id": ARN,
                    "name": "test-fn", "version": "$LATEST", "trigger": {"type": "other"}}}
NODE_SPAN = {"id": "6d19b0bd3b6b8a1e", "transaction_id": NODE_TX["id"],
             "parent_id": NODE_TX["id"], "trace_id": TRACE, "name": "handler work",
             "type": "custom", "subtype": None, "action": None, "timestamp": 1700000000000456,
             "duration": 0.25, "context": None, "outcome": "success", "sample_rate": 1}
NODE_ERR = {"id": "3c1ad3d0b0e84d7aa31f0c4ba40f1a8e", "timestamp": 1700000000000789,
            "parent_id": NODE_SPAN["id"], "trace_id": TRACE, "transaction_id": NODE_TX["id"],
            "transaction": {"name": "test-fn", "type": "request", "sampled": True},
            "exception": {"message": "boom", "type": "Error", "handled": True,
                          "stacktrace": [{"filename": "handler.js", "lineno": 3}]},
            "culprit": "handler (handler.js)"}
NODE_METRICS = {"samples": {"span.self_time.count": {"value": 1},
                            "span.self_time.sum.us": {"value": 123}},
                "timestamp": 1700000000001000, "tags": {"env": "test", "n": 1, "ok": True},
                "transaction": {"name": "test-fn", "type": "request"},
                "span": {"type": "app", "subtype": None}}


def errors_of(body):
    """Structural check only (what runs without the schemas)."""
    return parse_ndjson(body, schemas=None)[1]


def with_(d, **kv):
    """d with kv replaced (a value of DROP removes the key)."""
    out = dict(d)
    for k, v in kv.items():
        if v is DROP:
            out.pop(k, None)
        else:
            out[k] = v
    return out


DROP = object()


class StructureTest(unittest.TestCase):
    """fake_apm.check_structure, the check that runs with or without the schemas."""

    def assertRejected(self, body, *words):
        errs = errors_of(body)
        self.assertTrue(errs, "accepted: %r" % body[:300])
        text = "\n".join(errs)
        for w in words:
            self.assertIn(w, text, "errors for %r do not name %r: %s" % (body[:200], w, errs))
        return errs

    def one(self, kind, obj, *words):
        """A body of valid metadata plus this one event must be rejected, naming words."""
        return self.assertRejected(ndjson(("metadata", META), (kind, obj)), *words)

    def test_valid_payloads(self):
        for what, body in (
                ("the self-test's payload", GOOD),
                ("apm-ext's own events", EXT_META + EXT_METRICSET + EXT_LOG + EXT_PROXY_TX),
                ("apm-ext's proxy transaction behind agent metadata",
                 ndjson(("metadata", META)) + EXT_PROXY_TX),
                ("Node.js agent events", ndjson(
                    ("metadata", META), ("transaction", NODE_TX), ("span", NODE_SPAN),
                    ("error", NODE_ERR), ("metricset", NODE_METRICS))),
                ("nulls for optional fields, ids of errors 16 or 32", ndjson(
                    ("metadata", dict(META, labels={"a": None, "b": 1.5, "c": "x", "d": False},
                                      process=None, cloud=None)),
                    ("transaction", with_(TX, outcome=None, timestamp=None, name=None)),
                    ("span", with_(SPAN, start=None, timestamp=1700000000000000)),
                    ("error", {"id": "2222222222222222", "log": {"message": "m"}}),
                    ("error", with_(NODE_ERR, exception={"type": "TypeError"})))),
                ("histogram and sample without unit", ndjson(
                    ("metadata", META),
                    ("metricset", {"samples": {"h": {"values": [0.5, 1], "counts": [0, 3],
                                                     "type": "histogram"},
                                               "g": {"value": -1, "unit": "ms"}}}))),
                ("log event shapes", ndjson(
                    ("metadata", META), ("log", LOG),
                    ("log", {"timestamp": 1700000000000000, "message": ""}),
                    ("log", {"@timestamp": "2024-01-01T00:00:00.123+01:00", "message": "x",
                             "trace": {"id": TRACE}, "span": {"id": "6d19b0bd3b6b8a1e"}}))),
                ("CRLF, blank lines, no final newline",
                 ndjson(("metadata", META)).replace(b"\n", b"\r\n") + b"\n\n" +
                 json.dumps({"transaction": TX}).encode())):
            with self.subTest(what):
                lines, errs = parse_ndjson(body, schemas=None)
                self.assertEqual(errs, [], what)
                self.assertTrue(lines and lines[0][0] == "metadata")

    def test_line_framing(self):
        self.assertRejected(ndjson(("transaction", TX), ("metadata", META)),
                            "line 1: first line must be metadata")
        self.assertRejected(ndjson(("metadata", META), ("metadata", META)),
                            "line 2: metadata only allowed on the first line")
        self.assertRejected(ndjson(("metadata", META), ("trace", TX)),
                            "line 2: not an object with exactly one key")
        self.assertRejected(ndjson(("metadata", META)) + b'{"span": {}, "log": {}}\n',
                            "line 2: not an object with exactly one key")
        self.assertRejected(ndjson(("metadata", META)) + b'[{"span": {}}]\n', "line 2")
        self.assertRejected(ndjson(("metadata", META)) + b'{"log": {"message": NaN}}\n',
                            "line 2: invalid JSON")
        self.assertRejected(b"\n  \n", "empty body")
        self.assertRejected(ndjson(("metadata", META), ("span", "not an object")),
                            "$.span: expected an object, got string")

    def test_missing_required(self):
        for kind, obj, field in (
                ("transaction", TX, "id"), ("transaction", TX, "trace_id"),
                ("transaction", TX, "type"), ("transaction", TX, "duration"),
                ("transaction", TX, "span_count"),
                ("span", SPAN, "id"), ("span", SPAN, "trace_id"), ("span", SPAN, "parent_id"),
                ("span", SPAN, "name"), ("span", SPAN, "type"), ("span", SPAN, "duration"),
                ("error", ERR, "id"), ("metricset", METRIC, "samples"),
                ("log", LOG, "message")):
            with self.subTest(kind=kind, field=field):
                self.one(kind, with_(obj, **{field: DROP}),
                         "$.%s: missing required property %r" % (kind, field))
                self.one(kind, with_(obj, **{field: None}), "%r (null)" % field)
        for svc, words in ((with_(META["service"], name=DROP), "'name'"),
                           (with_(META["service"], agent=DROP), "'agent'"),
                           (with_(META["service"], agent={"name": "python"}), "'version'"),
                           (with_(META["service"], agent={"version": "1"}), "'name'")):
            with self.subTest(service=svc):
                self.assertRejected(ndjson(("metadata", with_(META, service=svc))),
                                    "$.metadata.service", "missing required property", words)
        self.assertRejected(ndjson(("metadata", {"process": {"pid": 1}})),
                            "$.metadata: missing required property 'service'")
        self.assertRejected(ndjson(("metadata", dict(META, cloud={"region": "x"}))),
                            "$.metadata.cloud: missing required property 'provider'")
        self.one("transaction", with_(TX, span_count={"dropped": 0}),
                 "$.transaction.span_count: missing required property 'started'")
        self.one("span", with_(SPAN, start=DROP), "needs one of 'timestamp', 'start'")
        self.one("error", {"id": ERR["id"]}, "needs 'exception' or 'log'")
        self.one("error", with_(ERR, exception={"handled": True}),
                 "exception needs 'message' or 'type'")
        self.one("error", with_(ERR, parent_id=DROP), "'transaction_id' given without 'parent_id'")
        self.one("error", with_(ERR, trace_id=DROP, transaction_id=DROP),
                 "'parent_id' given without 'trace_id'")
        self.one("error", {"id": ERR["id"], "log": {"level": "x"}},
                 "$.error.log: missing required property 'message'")
        self.one("log", {"message": "no time"}, "needs '@timestamp' or 'timestamp'")
        self.one("metricset", {"samples": {"a": {"unit": "ms"}}},
                 "'a': needs 'value' or 'values' and 'counts'")

    def test_wrong_types(self):
        for kind, obj, field, value, words in (
                ("transaction", TX, "duration", "12", "expected a number, got string"),
                ("transaction", TX, "duration", -1, "-1 < 0"),
                ("transaction", TX, "span_count", {"started": 1.5}, "expected an integer"),
                ("transaction", TX, "span_count", {"started": -1}, "-1 < 0"),
                ("transaction", TX, "outcome", "meh", "not one of success, failure, unknown"),
                ("transaction", TX, "sampled", "yes", "expected a boolean"),
                ("transaction", TX, "name", 5, "$.transaction.name: expected a string"),
                ("transaction", TX, "type", "x" * 1025, "longer than 1024"),
                ("transaction", TX, "faas", {"coldstart": "true"},
                 "$.transaction.faas.coldstart: expected a boolean"),
                ("span", SPAN, "start", "2", "$.span.start: expected a number"),
                ("span", SPAN, "duration", True, "expected a number, got boolean"),
                ("error", ERR, "exception", "boom", "$.error.exception: expected an object"),
                ("metricset", METRIC, "samples", [], "expected an object, got array"),
                ("metricset", METRIC, "samples", {"c": {"value": "1"}},
                 "'c'.value: expected a number"),
                ("metricset", METRIC, "samples", {"a*b": {"value": 1}}, "contains *"),
                ("metricset", METRIC, "samples", {"h": {"values": [1]}}, "'h'.counts"),
                ("metricset", METRIC, "samples", {"h": {"values": [1], "counts": [1, 2]}},
                 "1 values but 2 counts"),
                ("metricset", METRIC, "samples", {"h": {"values": [1], "counts": [-1]}},
                 "integers >= 0"),
                ("metricset", METRIC, "tags", {"a": {"b": 1}}, "'a': expected a string, number"),
                ("log", LOG, "message", 5, "$.log.message: expected a string"),
                ("log", LOG, "faas", "x", "$.log.faas: expected an object")):
            with self.subTest(kind=kind, field=field, value=value):
                self.one(kind, with_(obj, **{field: value}), *words.split("|"))
        for meta, words in (
                (dict(META, service=dict(META["service"], name="bad/name")), "does not match"),
                (dict(META, service=dict(META["service"], name="")), "empty string"),
                (dict(META, service=dict(META["service"], agent={"name": "", "version": "1"})),
                 "$.metadata.service.agent.name: empty string"),
                (dict(META, service=dict(META["service"], agent={"name": 1, "version": "1"})),
                 "$.metadata.service.agent.name: expected a string, got integer"),
                (dict(META, process={"pid": 1.5}), "$.metadata.process.pid: expected an integer"),
                (dict(META, process={"pid": True}), "expected an integer, got boolean"),
                (dict(META, labels={"a": {"nested": 1}}), "$.metadata.labels"),
                (dict(META, labels={"a": "é" * 1025}), "longer than 1024"),
                (dict(META, service="my-fn"), "$.metadata.service: expected an object")):
            with self.subTest(meta=meta):
                self.assertRejected(ndjson(("metadata", meta)), *words.split("|"))

    def test_bad_ids(self):
        upper, short, nonhex = TRACE.upper(), TRACE[:31], "g" * 32
        for kind, obj, field, value, n in (
                ("transaction", TX, "trace_id", upper, 32),
                ("transaction", TX, "trace_id", short, 32),
                ("transaction", TX, "trace_id", nonhex, 32),
                ("transaction", TX, "trace_id", TX["id"], 32),
                ("transaction", TX, "id", TRACE, 16),
                ("transaction", TX, "id", "0123456789ABCDEF", 16),
                ("transaction", TX, "id", 123, 16),
                ("transaction", TX, "parent_id", "0123456789abcde", 16),
                ("span", SPAN, "parent_id", "x" * 16, 16),
                ("span", SPAN, "transaction_id", TRACE, 16),
                ("error", ERR, "id", "2" * 24, "16 or 32"),
                ("error", ERR, "id", "2" * 32 + " ", "16 or 32"),
                ("error", ERR, "trace_id", TRACE[:16], 32)):
            with self.subTest(kind=kind, field=field, value=value):
                errs = self.one(kind, with_(obj, **{field: value}),
                                "$.%s.%s" % (kind, field))
                self.assertTrue(any(("%s lowercase hex" % n) in e or "id string" in e
                                    for e in errs), errs)
        for key, value in (("trace.id", upper), ("transaction.id", TRACE),
                           ("span.id", "xyz")):
            with self.subTest(log=key):
                self.one("log", with_(LOG, **{key: value}), "$.log[%r]: " % key,
                         "lowercase hex")
        self.one("log", with_(LOG, trace={"id": short}), "$.log['trace.id']: ",
                 "32 lowercase hex")
        self.one("log", with_(LOG, trace="x"), "$.log.trace: expected an object")

    def test_bad_timestamps(self):
        now_ms, now_s = 1700000000000, 1700000000
        for value, words in ((now_ms, "(milliseconds?)"), (now_ms * 10**6, "(nanoseconds?)"),
                             (now_s, "between 2000 and 2100"), (-1, "between 2000 and 2100"),
                             (4102444800 * 10**6, "between 2000 and 2100"),
                             (1700000000000000.5, "must be an integer"),
                             ("1700000000000000", "must be an integer"),
                             (True, "must be an integer|got boolean")):
            for kind, obj in (("transaction", TX), ("span", SPAN), ("error", ERR),
                              ("metricset", METRIC)):
                with self.subTest(kind=kind, value=value):
                    self.one(kind, with_(obj, timestamp=value),
                             "$.%s.timestamp: " % kind, *words.split("|"))
            with self.subTest(kind="log", value=value):  # logs may also say RFC 3339
                self.one("log", with_(LOG, **{"@timestamp": value}), "$.log['@timestamp']: ",
                         *("is not RFC 3339" if isinstance(value, str) else words).split("|"))
        for value in ("2024-01-01", "yesterday", "2024-01-01 00:00:00Z"):
            with self.subTest(log=value):
                self.one("log", with_(LOG, **{"@timestamp": value}), "is not RFC 3339")
        # the limits themselves
        self.assertEqual(errors_of(ndjson(("metadata", META), ("transaction", with_(
            TX, timestamp=fake_apm.TS_MIN_US)))), [])
        self.one("transaction", with_(TX, timestamp=fake_apm.TS_MIN_US - 1), "timestamp")

    def test_every_error_is_reported(self):
        """All problems of a body are listed, each with its line number."""
        body = ndjson(("transaction", with_(TX, id="X")), ("metadata", META),
                      ("span", with_(SPAN, duration=-2)), ("log", {}))
        errs = errors_of(body)
        self.assertTrue(any(e.startswith("line 1: first line") for e in errs), errs)
        self.assertTrue(any(e.startswith("line 1 (transaction): $.transaction.id") for e in errs))
        self.assertTrue(any(e.startswith("line 2: metadata only") for e in errs), errs)
        self.assertTrue(any(e.startswith("line 3 (span): $.span.duration") for e in errs))
        self.assertTrue(any(e.startswith("line 4 (log): ") and "message" in e for e in errs))

    @unittest.skipIf(fake_apm.SPEC_DIR is None, NO_SCHEMAS)
    def test_schemas_run_too(self):
        """With the schemas, a line the structural check lets through but the schema does
        not is rejected (and the other way round)."""
        self.assertIsNotNone(load_schemas())
        self.assertTrue(fake_apm.CHECK_LEVEL.startswith("schemas (%s)" % fake_apm.SPEC_DIR))
        body = ndjson(("metadata", dict(META, system={"architecture": 5})))
        self.assertEqual(errors_of(body), [])
        errs = parse_ndjson(body)[1]
        self.assertTrue(errs and all("(metadata, schema): $.metadata.system.architecture" in e
                                     for e in errs), errs)
        body = ndjson(("metadata", META), ("transaction", with_(TX, id=TX["id"].upper())))
        s = load_schemas()
        self.assertEqual(jsonschema_mini.validate(TX | {"id": TX["id"].upper()},
                                                  s["transaction"]), [])
        self.assertTrue(parse_ndjson(body)[1])
        self.assertEqual(parse_ndjson(GOOD + EXT_METRICSET + EXT_LOG + EXT_PROXY_TX)[1], [])
        self.assertEqual(parse_ndjson(EXT_META + EXT_METRICSET)[1], [])
        self.assertEqual(parse_ndjson(ndjson(
            ("metadata", META), ("transaction", NODE_TX), ("span", NODE_SPAN),
            ("error", NODE_ERR), ("metricset", NODE_METRICS)))[1], [])


class SpecDirTest(unittest.TestCase):
    """Where the optional schemas come from, and what the fake says about it."""

    def test_find_spec_dir(self):
        find = fake_apm.find_spec_dir
        default = fake_apm.DEFAULT_SPEC_DIR
        d, level = find({})
        if os.path.isdir(default):
            self.assertEqual(d, default)
            self.assertEqual(level, "schemas (%s) and structural" % default)
        else:
            self.assertEqual((d, level), (None, "structural (no APM_INTAKE_SPEC_DIR)"))
        self.assertEqual(find({"APM_INTAKE_SPEC_DIR": "/nonexistent/x"}),
                         (None, "structural (APM_INTAKE_SPEC_DIR=/nonexistent/x: "
                                "no such folder)"))
        self.assertEqual(find({"APM_INTAKE_SPEC_DIR": ""}),
                         (None, "structural (APM_INTAKE_SPEC_DIR is empty)"))
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "metadata.json"), "w") as f:
                f.write("{}")
            d, level = find({"APM_INTAKE_SPEC_DIR": tmp})
            self.assertIsNone(d)
            self.assertIn("has no transaction.json, span.json", level)
            if fake_apm.SPEC_DIR:  # a complete copy anywhere is taken
                for k in fake_apm.SCHEMA_KINDS:
                    shutil.copy(os.path.join(fake_apm.SPEC_DIR, k + ".json"), tmp)
                d, level = find({"APM_INTAKE_SPEC_DIR": tmp + "/"})
                self.assertEqual(d, os.path.normpath(tmp))
                self.assertEqual(level, "schemas (%s) and structural" % d)
                self.assertEqual(fake_apm.load_schemas(tmp), load_schemas())

    def test_said_once(self):
        """One stderr line per process, naming the level; the fake works without schemas."""
        prog = ("import sys; sys.path.insert(0, %r)\n"
                "import fake_apm, http.client\n"
                "for _ in range(2):\n"
                "    with fake_apm.FakeAPM() as a:\n"
                "        c = http.client.HTTPConnection('127.0.0.1', a.port, timeout=5)\n"
                "        c.request('POST', '/intake/v2/events', body=%r)\n"
                "        print(c.getresponse().status, fake_apm.CHECK_LEVEL)\n" % (HERE, GOOD))
        for spec in ("/nonexistent", None):
            env = dict(os.environ)
            env.pop("APM_INTAKE_SPEC_DIR", None)
            if spec:
                env["APM_INTAKE_SPEC_DIR"] = spec
            r = subprocess.run([sys.executable, "-c", prog], env=env, capture_output=True,
                               text=True, timeout=60)
            self.assertEqual(r.returncode, 0, r.stderr)
            level = fake_apm.find_spec_dir(env)[1]
            self.assertEqual(r.stdout, ("202 %s\n" % level) * 2)
            self.assertEqual(r.stderr, "fake_apm: intake lines checked: %s\n" % level)
            if spec:
                self.assertEqual(level, "structural (APM_INTAKE_SPEC_DIR=/nonexistent: "
                                        "no such folder)")


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


class WriteSpy:
    """Records every write made on the fake's side of its plain TCP connections (sockets
    whose local port is the fake's): (client port, TCP_NODELAY, bytes). Patches
    socket.socket's send methods for the duration of a `with`."""

    METHODS = ("send", "sendall", "sendmsg")

    def __init__(self, port):
        self.port, self.writes, self._lock = port, [], threading.Lock()

    def __enter__(self):
        self._saved = {m: getattr(socket.socket, m) for m in self.METHODS}
        for m in self.METHODS:
            setattr(socket.socket, m, self._wrap(self._saved[m]))
        return self

    def __exit__(self, *exc):
        for m, f in self._saved.items():
            setattr(socket.socket, m, f)

    def _wrap(self, orig):
        spy = self

        def write(sock, data, *args):
            try:
                mine = sock.getsockname()[1] == spy.port
                peer = sock.getpeername()[1] if mine else None
                nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) if mine \
                    else None
            except OSError:
                mine = False
            if mine:
                raw = b"".join(bytes(x) for x in data) if orig.__name__ == "sendmsg" \
                    else bytes(data)
                with spy._lock:
                    spy.writes.append((peer, nodelay, raw))
            return orig(sock, data, *args)
        return write

    def of(self, client):
        port = client.getsockname()[1]
        with self._lock:
            return [(nd, raw) for peer, nd, raw in self.writes if peer == port]


def whole_response(data, head_only=False):
    """(status, body) if data is exactly one complete HTTP response, else fail
    (head_only: the answer to HEAD, whose Content-Length describes no body)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, "no end of head in %r" % data[:300]
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdr = dict((k.strip().lower(), v.strip()) for k, _, v in
               (ln.partition(":") for ln in lines[1:]))
    assert int(hdr["content-length"]) == len(body) or head_only and not body, \
        "Content-Length %s but %d body bytes came with the head: %r" % (
            hdr["content-length"], len(body), data[:300])
    return status, body


class OneWriteTest(unittest.TestCase):
    """Every answer is one write (head and body together) on a TCP_NODELAY socket, so it
    arrives in one segment: what the client gets in its first recv is the whole answer."""

    def setUp(self):
        self.apm = FakeAPM(token="t")
        self.addCleanup(self.apm.close)
        self.spy = WriteSpy(self.apm.port)
        self.spy.__enter__()
        self.addCleanup(self.spy.__exit__)

    def exchange(self, request, before_answer=None):
        """Send request on a new connection, wait (select) until the answer starts to
        arrive, take one recv: it must be the whole answer, sent in one write."""
        s = socket.create_connection(("127.0.0.1", self.apm.port), timeout=5)
        try:
            s.sendall(request)
            if before_answer:
                before_answer(s)
            r, _, _ = select.select([s], [], [], 5)
            self.assertTrue(r, "no answer within 5 s")
            data = s.recv(1 << 16)
            status, body = whole_response(data, request.startswith(b"HEAD "))
            # the fake's side: exactly one write, with TCP_NODELAY, and it is what came
            self.assertTrue(self.apm.wait_for(lambda a: self.spy.of(s), 2))
            writes = self.spy.of(s)
            self.assertEqual(len(writes), 1, "answer written in %d pieces: %r" % (
                len(writes), [w[1][:80] for w in writes]))
            self.assertTrue(writes[0][0], "TCP_NODELAY not set on the fake's socket")
            self.assertEqual(writes[0][1], data)
            return status, body
        finally:
            s.close()

    @staticmethod
    def post(body, auth="Bearer t", path="/intake/v2/events", extra=b""):
        return (b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\nContent-Length: %d\r\n"
                b"%s\r\n" % (path.encode(), auth.encode(), len(body), extra)) + body

    def test_every_mode(self):
        a = self.apm
        get = b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\r\n"
        self.assertEqual(self.exchange(self.post(GOOD)), (202, b""))
        st, body = self.exchange(self.post(ndjson(("transaction", TX))))
        self.assertEqual(st, 400)
        self.assertIn(b"first line must be metadata", body)
        st, body = self.exchange(get)
        self.assertEqual((st, json.loads(body)["version"]), (200, "8.15.0"))
        self.assertEqual(self.exchange(self.post(b"{}", path="/config/v1/agents")),
                         (200, b"{}\n"))
        self.assertEqual(self.exchange(self.post(GOOD, auth="Bearer nope"))[0], 401)
        self.assertEqual(self.exchange(get.replace(b"GET /", b"GET /nope"))[0], 404)
        self.assertEqual(self.exchange(get.replace(b"GET", b"HEAD")), (200, b""))
        self.assertEqual(self.exchange(self.post(GOOD, extra=b"Connection: close\r\n")),
                         (202, b""))
        a.set_mode("status", 503)
        st, body = self.exchange(self.post(GOOD))
        self.assertEqual(st, 503)
        self.assertIn(b"forced status 503", body)
        a.set_mode("ok")
        a.fail_next(1, 429)
        self.assertEqual(self.exchange(self.post(GOOD))[0], 429)
        a.set_mode("slow", 0.05)
        self.assertEqual(self.exchange(self.post(GOOD)), (202, b""))
        a.set_mode("stall")
        n = len(a.requests)

        def unstall(sock):
            self.assertTrue(a.wait_for(lambda s: len(s.requests) == n + 1, 2))
            self.assertEqual(select.select([sock], [], [], 0)[0], [])  # not answered yet
            a.set_mode("ok")
        self.assertEqual(self.exchange(self.post(GOOD), before_answer=unstall), (202, b""))
        # requests http.server itself refuses (send_error)
        st, body = self.exchange(b"\x00\x01garbage\r\n\r\n")
        self.assertEqual(st, 400)
        self.assertIn(b"400", body)
        self.assertEqual(self.exchange(b"GET / HTTP/2.0\r\n\r\n")[0], 505)
        self.assertEqual(self.exchange(b"BREW / HTTP/1.1\r\nHost: x\r\n\r\n")[0], 501)
        st, _ = self.exchange(b"POST /intake/v2/events HTTP/1.1\r\nHost: x\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\nzz\r\n")
        self.assertEqual(st, 400)

    def test_keepalive_answers(self):
        """On one kept-alive connection each answer is still one write."""
        s = socket.create_connection(("127.0.0.1", self.apm.port), timeout=5)
        self.addCleanup(s.close)
        for i in range(3):
            s.sendall(self.post(GOOD if i != 1 else b"x"))
            self.assertTrue(select.select([s], [], [], 5)[0])
            st, _ = whole_response(s.recv(1 << 16))
            self.assertEqual(st, 400 if i == 1 else 202)
        self.assertTrue(self.apm.wait_for(lambda a: len(self.spy.of(s)) == 3, 2))
        self.assertEqual(len(self.spy.of(s)), 3)


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
        with FakeAPM(tls=(c["cert"], c["key"])) as a:
            # one write = one TLS record: the first read after select has the whole answer
            raw = socket.create_connection(("127.0.0.1", a.port), timeout=5)
            s = self.ctx(c["ca"]).wrap_socket(raw, server_hostname="localhost")
            for req in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                        b"POST /intake/v2/events HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Length: 2\r\n\r\n{}"):
                s.sendall(req)
                self.assertTrue(select.select([s], [], [], 5)[0])
                st, body = whole_response(s.recv(1 << 16))
                self.assertTrue(body)
                self.assertEqual(st, 200 if req.startswith(b"GET") else 400)
            s.close()
        with FakeAPM(tls=(c["wronghost_cert"], c["wronghost_key"])) as a:
            with self.assertRaises(ssl.SSLCertVerificationError) as cm:
                post(a.port, GOOD, tls_ctx=self.ctx(c["ca"]))
            self.assertIn("Hostname mismatch", str(cm.exception))


# ---------------------------------------------------------------- OTLP
#
# Bodies built with a tiny protobuf encoder of the test's own (not the fake's writer),
# one known-answer body written out byte by byte, and, when test/otel/node_modules is
# there, bodies from the OpenTelemetry JS SDK's own serializers (test/otel/sdk-bodies.js).

def e_varint(n):
    n &= (1 << 64) - 1
    out = b""
    while n >= 0x80:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n])


def e_key(field, wt):
    return e_varint(field << 3 | wt)


def e_ld(field, *parts):
    """Length-delimited: a message made of parts, or one str/bytes value."""
    data = b"".join(p.encode() if isinstance(p, str) else p for p in parts)
    return e_key(field, 2) + e_varint(len(data)) + data


def e_vi(field, n):
    return e_key(field, 0) + e_varint(n)


def e_f64(field, n):
    return e_key(field, 1) + n.to_bytes(8, "little")


def e_dbl(field, x):
    return e_key(field, 1) + struct.pack("<d", x)


def e_f32(field, n):
    return e_key(field, 5) + n.to_bytes(4, "little")


def e_kv(key, value):
    """KeyValue with an AnyValue from a Python value."""
    return e_ld(1, key) + e_ld(2, e_any(value))


def e_any(v):
    if isinstance(v, bool):
        return e_vi(2, int(v))
    if isinstance(v, int):
        return e_vi(3, v)
    if isinstance(v, float):
        return e_dbl(4, v)
    if isinstance(v, bytes):
        return e_ld(7, v)
    if isinstance(v, list):
        return e_ld(5, *[e_ld(1, e_any(x)) for x in v])
    if isinstance(v, dict):
        return e_ld(6, *[e_ld(1, e_kv(k, x)) for k, x in v.items()])
    return e_ld(1, v)


def e_resource(service, **attrs):
    """A Resource message (its attributes, field 1)."""
    return b"".join(e_ld(1, e_kv(k, v)) for k, v in
                    dict({"service.name": service}, **attrs).items())


TID = "0af7651916cd43dd8448eb211c80319c"
SID = "b7ad6b7169203331"
PID = "00f067aa0ba902b7"


def e_span(trace_id, span_id, name, parent=None, attrs=None, kind=1, status=None):
    parts = [e_ld(1, bytes.fromhex(trace_id)), e_ld(2, bytes.fromhex(span_id))]
    if parent:
        parts.append(e_ld(4, bytes.fromhex(parent)))
    parts += [e_ld(5, name), e_vi(6, kind), e_f64(7, 1700000000000000000),
              e_f64(8, 1700000000002000000)]
    parts += [e_ld(9, e_kv(k, v)) for k, v in (attrs or {}).items()]
    if status is not None:
        parts.append(e_ld(15, e_ld(2, "why"), e_vi(3, status)))
    return e_ld(2, *parts)


def e_traces(*resources):
    """resources: (service, scope name, [encoded spans])."""
    return b"".join(e_ld(1, e_ld(1, e_resource(svc)), e_ld(2, e_ld(1, e_ld(1, scope)), *spans))
                    for svc, scope, spans in resources)


class OtlpProtobufTest(unittest.TestCase):
    def test_known_answer(self):
        # ExportTraceServiceRequest{resource_spans{scope_spans{spans{trace_id=01*16,
        # span_id=02*8, name="a"}}}}, written out by hand
        body = bytes.fromhex("0a23" "1221" "121f" "0a10" + "01" * 16 + "1208" + "02" * 8 +
                             "2a0161")
        items, errs = fake_apm.parse_otlp("traces", "protobuf", body)
        self.assertEqual(errs, [])
        self.assertEqual(len(items), 1)
        s = items[0]
        self.assertEqual((s["trace_id"], s["span_id"], s["parent_id"], s["name"], s["service"]),
                         ("01" * 16, "02" * 8, None, "a", None))

    def test_varints(self):
        for n in (0, 1, 127, 128, 300, 2 ** 32, 2 ** 63, 2 ** 64 - 1):
            self.assertEqual(fake_apm.pb_varint(e_varint(n), 0), (n, len(e_varint(n))))
            self.assertEqual(fake_apm.pb_uvarint(n), e_varint(n))
        self.assertEqual(fake_apm.pb_varint(b"\x81\x80\x80\x00", 0), (1, 4))  # non-minimal
        for bad in (b"\x80", b"\xff" * 11, b""):
            with self.assertRaises(fake_apm.OtlpError):
                fake_apm.pb_varint(bad, 0)

    def test_traces(self):
        attrs = {"s": "text", "i": -7, "big": 2 ** 62, "d": 2.5, "b": True, "raw": b"\x00\xff",
                 "arr": ["x", 1, False], "map": {"k": "v", "n": {"deep": 1}}}
        body = e_traces(
            ("svc-a", "scope-1", [e_span(TID, SID, "root", attrs=attrs, kind=2),
                                  e_span(TID, PID, "child ✓", parent=SID, status=2)]),
            ("svc-b", "scope-2", [e_span("11" * 16, "22" * 8, "other")]))
        items, errs = fake_apm.parse_otlp("traces", "protobuf", body)
        self.assertEqual(errs, [])
        self.assertEqual([(s["service"], s["scope"], s["name"], s["span_id"], s["parent_id"])
                          for s in items],
                         [("svc-a", "scope-1", "root", SID, None),
                          ("svc-a", "scope-1", "child ✓", PID, SID),
                          ("svc-b", "scope-2", "other", "22" * 8, None)])
        self.assertEqual(items[0]["attributes"], attrs)
        self.assertEqual((items[0]["kind"], items[1]["status"], items[0]["trace_id"]),
                         (2, 2, TID))
        self.assertEqual((items[0]["start_ns"], items[0]["end_ns"]),
                         (1700000000000000000, 1700000000002000000))

    def test_unknown_fields_skipped(self):
        extra = e_vi(99, 5) + e_f32(98, 1) + e_f64(97, 2) + e_ld(96, "future")
        span = e_ld(2, e_ld(1, bytes.fromhex(TID)), extra, e_ld(2, bytes.fromhex(SID)),
                    e_ld(5, "n"), e_f32(16, 0x101))
        body = e_ld(1, extra, e_ld(2, extra, span), e_ld(3, "https://schema"))
        items, errs = fake_apm.parse_otlp("traces", "protobuf", body + extra)
        self.assertEqual(errs, [])
        self.assertEqual([s["span_id"] for s in items], [SID])

    def test_empty_request(self):
        self.assertEqual(fake_apm.parse_otlp("traces", "protobuf", b""), ([], []))
        self.assertEqual(fake_apm.parse_otlp("logs", "json", b"{}"), ([], []))

    def test_metrics(self):
        sum_ = e_ld(7, e_ld(1, e_ld(7, e_kv("route", "/a")), e_f64(3, 1), e_key(6, 1) +
                                (-3).to_bytes(8, "little", signed=True)),
                    e_ld(1, e_dbl(4, 2.5)), e_vi(2, 2), e_vi(3, 1))
        gauge = e_ld(5, e_ld(1, e_dbl(4, 0.25)))
        hist = e_ld(9, e_ld(1, e_f64(4, 3), e_dbl(5, 7.5), e_dbl(11, 1.0), e_dbl(12, 4.0),
                            e_ld(6, e_f64(1, 1))), e_vi(2, 1))
        metrics = [e_ld(2, e_ld(1, "m.sum"), e_ld(3, "ms"), sum_),
                   e_ld(2, e_ld(1, "m.gauge"), gauge), e_ld(2, e_ld(1, "m.hist"), hist),
                   e_ld(2, e_ld(1, "m.none"))]
        body = e_ld(1, e_ld(1, e_resource("svc")), e_ld(2, e_ld(1, e_ld(1, "meter")), *metrics))
        items, errs = fake_apm.parse_otlp("metrics", "protobuf", body)
        self.assertEqual(errs, [])
        self.assertEqual([(m["name"], m["type"]) for m in items],
                         [("m.sum", "sum"), ("m.gauge", "gauge"), ("m.hist", "histogram"),
                          ("m.none", None)])
        self.assertEqual(items[0]["points"], [{"attributes": {"route": "/a"}, "value": -3},
                                              {"attributes": {}, "value": 2.5}])
        self.assertEqual(items[0]["unit"], "ms")
        self.assertEqual(items[2]["points"], [{"attributes": {}, "count": 3, "sum": 7.5,
                                               "min": 1.0, "max": 4.0}])
        self.assertEqual(items[0]["service"], "svc")

    def test_logs(self):
        rec1 = e_ld(2, e_f64(1, 1700000000000000000), e_vi(2, 9), e_ld(3, "INFO"),
                    e_ld(5, e_any("hello")), e_ld(6, e_kv("k", 1)),
                    e_ld(9, bytes.fromhex(TID)), e_ld(10, bytes.fromhex(SID)))
        rec2 = e_ld(2, e_ld(5, e_any({"structured": ["a", 2]})), e_ld(12, "my.event"))
        body = e_ld(1, e_ld(1, e_resource("svc")), e_ld(2, e_ld(1, e_ld(1, "lg")), rec1, rec2))
        items, errs = fake_apm.parse_otlp("logs", "protobuf", body)
        self.assertEqual(errs, [])
        self.assertEqual([(x["body"], x["trace_id"], x["span_id"], x["severity_text"],
                           x["severity_number"]) for x in items],
                         [("hello", TID, SID, "INFO", 9),
                          ({"structured": ["a", 2]}, None, None, "", 0)])
        self.assertEqual((items[0]["attributes"], items[1]["event_name"], items[0]["scope"]),
                         ({"k": 1}, "my.event", "lg"))

    def test_bad_bodies(self):
        good_span = e_span(TID, SID, "n")
        cases = {
            "truncated length": e_traces(("s", "c", [good_span]))[:-3],
            "length past the end": b"\x0a\x05\x12\x01",
            "truncated varint": e_ld(1, e_ld(2, e_ld(2, e_key(6, 0) + b"\x80"))),
            "truncated fixed64": e_ld(1, e_ld(2, e_ld(2, e_key(7, 1) + b"\x00" * 5))),
            "group wire type": b"\x0b\x0c",
            "field number 0": b"\x02\x00",
            "name as a varint": e_ld(1, e_ld(2, e_ld(2, e_vi(5, 3)))),
            "resource_spans as a varint": e_vi(1, 1),
            "bad UTF-8 name": e_traces(("s", "c", [e_ld(2, e_ld(1, bytes.fromhex(TID)),
                                                        e_ld(2, bytes.fromhex(SID)),
                                                        e_ld(5, b"\xff\xfe"))])),
            "trace id of 15 bytes": e_traces(("s", "c", [e_span(TID[:30], SID, "n")])),
            "span id of zeroes": e_traces(("s", "c", [e_span(TID, "00" * 8, "n")])),
            "no span id": e_traces(("s", "c", [e_ld(2, e_ld(1, bytes.fromhex(TID)),
                                                    e_ld(5, "n"))])),
            "parent of 4 bytes": e_traces(("s", "c", [e_span(TID, SID, "n", parent="01020304")])),
            "empty name": e_traces(("s", "c", [e_span(TID, SID, "")])),
        }
        for what, body in cases.items():
            items, errs = fake_apm.parse_otlp("traces", "protobuf", body)
            self.assertTrue(errs, "%s: accepted (%r)" % (what, items))
        logs = [e_ld(1, e_ld(2, e_ld(2, e_ld(9, b"\x01" * 8)))),           # 8-byte trace id
                e_ld(1, e_ld(2, e_ld(2, e_ld(10, b"\x01" * 16))))]         # 16-byte span id
        for body in logs:
            self.assertTrue(fake_apm.parse_otlp("logs", "protobuf", body)[1])
        metrics = [e_ld(1, e_ld(2, e_ld(2, e_ld(3, "unit only")))),        # no name
                   e_ld(1, e_ld(2, e_ld(2, e_ld(1, "two"), e_ld(5, b""), e_ld(7, b""))))]
        for body in metrics:
            self.assertTrue(fake_apm.parse_otlp("metrics", "protobuf", body)[1])
        # very deep nesting is refused, not a RecursionError
        deep = e_any("x")
        for _ in range(100):
            deep = e_ld(5, e_ld(1, deep))
        body = e_traces(("s", "c", [e_span(TID, SID, "n")[:0] + e_ld(2, e_ld(
            1, bytes.fromhex(TID)), e_ld(2, bytes.fromhex(SID)), e_ld(5, "n"),
            e_ld(9, e_ld(1, "k"), e_ld(2, deep)))]))
        self.assertTrue(fake_apm.parse_otlp("traces", "protobuf", body)[1])


def j_traces(spans, service="svc"):
    return json.dumps({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
        "scopeSpans": [{"scope": {"name": "sc"}, "spans": spans}]}]}).encode()


class OtlpJsonTest(unittest.TestCase):
    def test_same_as_protobuf(self):
        attrs = {"s": "t", "i": 5, "d": 0.5, "b": False, "arr": ["a"], "map": {"k": 2},
                 "raw": b"\x01\x02"}
        pb = e_traces(("svc", "sc", [e_span(TID, SID, "root", attrs=attrs, kind=2),
                                     e_span(TID, PID, "child", parent=SID, status=1)]))

        def j_any(v):
            if isinstance(v, bool):
                return {"boolValue": v}
            if isinstance(v, int):
                return {"intValue": str(v)}
            if isinstance(v, float):
                return {"doubleValue": v}
            if isinstance(v, bytes):
                return {"bytesValue": base64.b64encode(v).decode()}
            if isinstance(v, list):
                return {"arrayValue": {"values": [j_any(x) for x in v]}}
            if isinstance(v, dict):
                return {"kvlistValue": {"values": [{"key": k, "value": j_any(x)}
                                                   for k, x in v.items()]}}
            return {"stringValue": v}
        js = j_traces([
            {"traceId": TID.upper(), "spanId": SID, "name": "root", "kind": 2,
             "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": 1700000000002000000,
             "attributes": [{"key": k, "value": j_any(v)} for k, v in attrs.items()],
             "unknownKey": {"ignored": True}},
            {"traceId": TID, "spanId": PID, "parentSpanId": SID, "name": "child", "kind": 1,
             "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000000002000000",
             "status": {"code": 1, "message": "why"}}])
        a, ea = fake_apm.parse_otlp("traces", "protobuf", pb)
        b, eb = fake_apm.parse_otlp("traces", "json", js)
        self.assertEqual((ea, eb), ([], []))
        self.assertEqual(a, b)

    def test_metrics_and_logs(self):
        m = json.dumps({"resourceMetrics": [{"scopeMetrics": [{"metrics": [
            {"name": "c", "sum": {"dataPoints": [{"asInt": "-4"}, {"asDouble": 1.5}],
                                  "aggregationTemporality": 2, "isMonotonic": True}},
            {"name": "h", "histogram": {"dataPoints": [{"count": "2", "sum": 3.0}]}}]}]}]})
        items, errs = fake_apm.parse_otlp("metrics", "json", m.encode())
        self.assertEqual(errs, [])
        self.assertEqual([(x["name"], x["points"]) for x in items],
                         [("c", [{"attributes": {}, "value": -4}, {"attributes": {},
                                                                   "value": 1.5}]),
                          ("h", [{"attributes": {}, "count": 2, "sum": 3.0}])])
        lg = json.dumps({"resourceLogs": [{"scopeLogs": [{"logRecords": [
            {"body": {"stringValue": "hi"}, "traceId": TID, "spanId": SID,
             "severityText": "WARN", "severityNumber": 13},
            {"body": {"kvlistValue": {"values": [{"key": "a", "value": {"intValue": 1}}]}},
             "traceId": "", "spanId": ""}]}]}]})
        items, errs = fake_apm.parse_otlp("logs", "json", lg.encode())
        self.assertEqual(errs, [])
        self.assertEqual([(x["body"], x["trace_id"], x["span_id"]) for x in items],
                         [("hi", TID, SID), ({"a": 1}, None, None)])

    def test_bad_bodies(self):
        span = {"traceId": TID, "spanId": SID, "name": "n"}
        cases = {
            "not JSON": b"{nope",
            "NaN constant": b'{"resourceSpans": NaN}',
            "not an object": b"[]",
            "resourceSpans not an array": b'{"resourceSpans": {}}',
            "span not an object": j_traces(["x"]),
            "base64 trace id": j_traces([dict(span, traceId=base64.b64encode(
                bytes.fromhex(TID)).decode())]),
            "odd hex": j_traces([dict(span, spanId=SID[:-1])]),
            "trace id of 8 bytes": j_traces([dict(span, traceId=SID)]),
            "enum as a name": j_traces([dict(span, kind="SPAN_KIND_SERVER")]),
            "name as a number": j_traces([dict(span, name=5)]),
            "time as text": j_traces([dict(span, startTimeUnixNano="soon")]),
            "negative fixed64": j_traces([dict(span, endTimeUnixNano=-1)]),
            "snake_case keys (ignored: no ids)": j_traces([{"trace_id": TID, "span_id": SID,
                                                            "name": "n"}]),
            "bool as text": j_traces([dict(span, attributes=[{"key": "b", "value": {
                "boolValue": "true"}}])]),
        }
        for what, body in cases.items():
            items, errs = fake_apm.parse_otlp("traces", "json", body)
            self.assertTrue(errs, "%s: accepted (%r)" % (what, items))


OTEL_DIR = os.path.join(os.path.dirname(HERE), "otel")
SDK_BODIES = os.path.join(OTEL_DIR, "sdk-bodies.js")
OTEL_MODULES = os.path.join(OTEL_DIR, "node_modules", "@opentelemetry", "otlp-transformer")


@unittest.skipUnless(shutil.which("node") and os.path.isdir(OTEL_MODULES),
                     "node or test/otel/node_modules missing (npm ci --prefix test/otel)")
class OtlpRealSdkTest(unittest.TestCase):
    """The fake's readers on bodies the pinned OpenTelemetry JS SDK serializes."""

    @classmethod
    def setUpClass(cls):
        r = subprocess.run(["node", SDK_BODIES], capture_output=True, text=True, timeout=60)
        if r.returncode:
            raise AssertionError("test/otel/sdk-bodies.js failed: %s" % r.stderr[-2000:])
        cls.bodies = json.loads(r.stdout)

    def parse(self, signal, fmt):
        items, errs = fake_apm.parse_otlp(signal, fmt, base64.b64decode(
            self.bodies[signal][fmt]))
        self.assertEqual(errs, [])
        return items

    def test_traces(self):
        want = self.bodies["traces"]["expect"]
        self.assertEqual(len(want), 2)
        for fmt in ("protobuf", "json"):
            got = self.parse("traces", fmt)
            self.assertEqual([{k: s[k] for k in w} for s, w in zip(got, want)], want, fmt)
            self.assertEqual({s["service"] for s in got}, {self.bodies["service"]})
        self.assertEqual(self.parse("traces", "protobuf"), self.parse("traces", "json"))

    def test_logs(self):
        want = self.bodies["logs"]["expect"]
        for fmt in ("protobuf", "json"):
            got = self.parse("logs", fmt)
            self.assertEqual([{k: x[k] for k in w} for x, w in zip(got, want)], want, fmt)
            self.assertEqual(len(got), len(want))
        self.assertEqual(self.parse("logs", "protobuf"), self.parse("logs", "json"))

    def test_metrics(self):
        want = self.bodies["metrics"]["expect"]
        for fmt in ("protobuf", "json"):
            got = {m["name"]: m for m in self.parse("metrics", fmt)}
            for w in want:
                pt = got[w["name"]]["points"][0]
                self.assertEqual({k: pt[k] for k in w if k != "name"},
                                 {k: v for k, v in w.items() if k != "name"}, fmt)
        self.assertEqual(self.parse("metrics", "protobuf"), self.parse("metrics", "json"))


def otlp_post(port, body, ctype="application/x-protobuf", signal="traces", headers=None,
              conn=None, path=None, method="POST"):
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    h = {"Content-Type": ctype} if ctype else {}
    h.update(headers or {})
    try:
        c.request(method, path or "/v1/" + signal, body=body, headers=h)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        if conn is None:
            c.close()


SPANS_PB = e_traces(("svc", "sc", [e_span(TID, SID, "root"), e_span(TID, PID, "c", SID)]))
SPANS_JSON = j_traces([{"traceId": TID, "spanId": "33" * 8, "name": "j"}])


class FakeAPMOtlpTest(unittest.TestCase):
    def setUp(self):
        self.apm = FakeAPM(token="t")
        self.addCleanup(self.apm.close)
        self.auth = {"Authorization": "Bearer t"}

    def test_answers_and_records(self):
        a = self.apm
        c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=5)
        st, h, body = otlp_post(a.port, gzip.compress(SPANS_PB), headers=dict(
            self.auth, **{"Content-Encoding": "gzip", "User-Agent": "apm-ext/1 (sdk/2)"}),
            conn=c)
        self.assertEqual((st, body, h["content-type"], h["content-length"]),
                         (200, b"", "application/x-protobuf", "0"))
        st, h, body = otlp_post(a.port, iter([SPANS_JSON[:10], SPANS_JSON[10:]]),
                                "application/json; charset=utf-8", headers=self.auth, conn=c,
                                path="/prefix/v1/traces")
        self.assertEqual((st, body, h["content-type"]), (200, b"{}", "application/json"))
        logs = e_ld(1, e_ld(2, e_ld(2, e_ld(5, e_any("log line")))))
        metrics = e_ld(1, e_ld(2, e_ld(2, e_ld(1, "m1"))))
        self.assertEqual(otlp_post(a.port, logs, signal="logs", headers=self.auth,
                                   conn=c)[0], 200)
        self.assertEqual(otlp_post(a.port, zlib.compress(metrics), signal="metrics", headers=dict(
            self.auth, **{"Content-Encoding": "deflate"}), conn=c)[0], 200)
        c.close()
        r = a.otlp_requests()
        self.assertEqual([(x.signal, x.otlp_format, x.status, x.delivered) for x in r],
                         [("traces", "protobuf", 200, True), ("traces", "json", 200, True),
                          ("logs", "protobuf", 200, True), ("metrics", "protobuf", 200, True)])
        self.assertEqual((r[0].encoding, r[0].auth, r[0].user_agent, r[0].content_type,
                          r[1].chunked, r[1].path),
                         ("gzip", "Bearer t", "apm-ext/1 (sdk/2)", "application/x-protobuf",
                          True, "/prefix/v1/traces"))
        self.assertEqual(r[0].body, gzip.compress(SPANS_PB))  # as received, still encoded
        self.assertEqual([s["span_id"] for s in a.otlp_spans()], [SID, PID, "33" * 8])
        self.assertEqual(a.otlp_span_counts(), {SID: 1, PID: 1, "33" * 8: 1})
        self.assertEqual([x["body"] for x in a.otlp_logs()], ["log line"])
        self.assertEqual([x["name"] for x in a.otlp_metrics()], ["m1"])
        self.assertEqual(a.errors, [])
        self.assertEqual(a.intake_requests(), [])
        self.assertEqual(a.count(), 0)  # OTLP is not intake

    def test_refusals(self):
        a = self.apm
        st, h, body = otlp_post(a.port, SPANS_PB, "text/plain", headers=self.auth)
        self.assertEqual((st, h["content-type"]), (415, "application/json"))
        self.assertIn("message", json.loads(body))
        self.assertEqual(otlp_post(a.port, SPANS_PB, None, headers=self.auth)[0], 415)
        st, h, body = otlp_post(a.port, b"\x0a\x05", headers=self.auth)
        self.assertEqual((st, h["content-type"]), (400, "application/x-protobuf"))
        code, msg = fake_apm.pb_decode(body, {1: ("code", "int64"), 2: ("message", "string")}
                                       ).values()
        self.assertEqual(code, 3)
        self.assertIn("runs past the end", msg)
        self.assertEqual(otlp_post(a.port, b"{", "application/json", headers=self.auth)[0], 400)
        self.assertEqual(otlp_post(a.port, b"not gzip", headers=dict(
            self.auth, **{"Content-Encoding": "gzip"}))[0], 400)
        self.assertEqual(otlp_post(a.port, SPANS_PB, headers=dict(
            self.auth, **{"Content-Encoding": "br"}))[0], 400)
        self.assertEqual(otlp_post(a.port, b"", headers=self.auth, method="GET")[0], 405)
        self.assertEqual(otlp_post(a.port, SPANS_PB, headers=self.auth, path="/v1/other")[0], 404)
        st, _, body = otlp_post(a.port, SPANS_PB)
        self.assertEqual(st, 401)
        self.assertEqual(otlp_post(a.port, SPANS_PB, headers={"Authorization": "ApiKey t"})[0],
                         401)
        self.assertEqual(a.otlp_spans(), [])   # nothing was delivered
        self.assertEqual(len(a.errors), 6)     # malformed or unsupported bodies are errors
        self.assertTrue(any("Content-Type 'text/plain'" in e for e in a.errors))

    def test_modes(self):
        a = self.apm
        a.set_mode("status", 503)
        a.retry_after = "3"
        st, h, body = otlp_post(a.port, SPANS_PB, headers=self.auth)
        self.assertEqual((st, h.get("retry-after"), h["content-type"]),
                         (503, "3", "application/x-protobuf"))
        self.assertIn(b"forced status 503", body)
        st, h, body = otlp_post(a.port, SPANS_JSON, "application/json", headers=self.auth)
        self.assertEqual((st, json.loads(body)["code"]), (503, 14))
        a.set_mode("ok")
        a.retry_after = None
        a.fail_next(1, 429, which="otlp")
        self.assertEqual(post(a.port, GOOD, self.auth)[0], 202)   # intake: not this one
        st, h, _ = otlp_post(a.port, SPANS_PB, headers=self.auth)
        self.assertEqual((st, h.get("retry-after")), (429, None))
        a.fail_next(1, 502, which="metrics")
        self.assertEqual(otlp_post(a.port, SPANS_PB, headers=self.auth)[0], 200)
        self.assertEqual(otlp_post(a.port, b"", signal="metrics", headers=self.auth)[0], 502)
        a.fail_next(1, 503)                                          # any: the next one
        self.assertEqual(otlp_post(a.port, SPANS_PB, headers=self.auth)[0], 503)
        self.assertEqual(a.otlp_span_counts(), {SID: 1, PID: 1})  # only the 200 counts
        a.set_mode("slow", 0.2)
        t = time.monotonic()
        self.assertEqual(otlp_post(a.port, SPANS_PB, headers=self.auth)[0], 200)
        self.assertGreaterEqual(time.monotonic() - t, 0.2)
        a.set_mode("ok")
        a.delay_for = lambda r: 0.2 if r.signal == "logs" else 0
        t = time.monotonic()
        self.assertEqual(otlp_post(a.port, SPANS_PB, headers=self.auth)[0], 200)
        self.assertLess(time.monotonic() - t, 0.2)
        self.assertEqual(otlp_post(a.port, b"", signal="logs", headers=self.auth)[0], 200)
        self.assertGreaterEqual(time.monotonic() - t, 0.2)
        a.delay_for = None
        a.set_mode("stall")
        with self.assertRaises(socket.timeout):
            c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=0.3)
            otlp_post(a.port, SPANS_PB, headers=self.auth, conn=c)
        c.close()
        a.set_mode("ok")
        self.assertEqual(a.otlp_span_counts(), {SID: 3, PID: 3})
        with self.assertRaises(ValueError):
            a.fail_next(1, 503, which="profiles")

    def test_partial_success(self):
        a = self.apm
        a.otlp_partial = (2, "two dropped")
        st, h, body = otlp_post(a.port, SPANS_PB, headers=self.auth)
        self.assertEqual(st, 200)
        ps = fake_apm.pb_decode(body, {1: ("partial_success", {
            1: ("rejected_spans", "int64"), 2: ("error_message", "string")})})
        self.assertEqual(ps, {"partial_success": {"rejected_spans": 2,
                                                  "error_message": "two dropped"}})
        st, h, body = otlp_post(a.port, b"{}", "application/json", signal="logs",
                                headers=self.auth)
        self.assertEqual(json.loads(body), {"partialSuccess": {"rejectedLogRecords": "2",
                                                               "errorMessage": "two dropped"}})
        self.assertEqual(len(a.otlp_spans()), 2)    # still delivered


class OtlpOneWriteTest(OneWriteTest):
    """OTLP answers are one write on a TCP_NODELAY socket too."""

    def test_every_mode(self):
        a = self.apm

        def req(body, ctype=b"application/x-protobuf", path=b"/v1/traces", auth=b"Bearer t",
                method=b"POST"):
            return (b"%s %s HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\nContent-Type: %s\r\n"
                    b"Content-Length: %d\r\n\r\n" % (method, path, auth, ctype, len(body))) + body
        self.assertEqual(self.exchange(req(SPANS_PB)), (200, b""))
        self.assertEqual(self.exchange(req(SPANS_JSON, b"application/json")), (200, b"{}"))
        self.assertEqual(self.exchange(req(b"\x0a\x05"))[0], 400)
        self.assertEqual(self.exchange(req(SPANS_PB, b"text/plain"))[0], 415)
        self.assertEqual(self.exchange(req(b"", method=b"GET"))[0], 405)
        self.assertEqual(self.exchange(req(SPANS_PB, auth=b"Bearer x"))[0], 401)
        a.otlp_partial = (1, "x")
        st, body = self.exchange(req(SPANS_PB))
        self.assertEqual(st, 200)
        self.assertTrue(body)
        a.otlp_partial = None
        a.set_mode("status", 503)
        a.retry_after = "1"
        self.assertEqual(self.exchange(req(SPANS_PB))[0], 503)

    def test_keepalive_answers(self):
        pass


if __name__ == "__main__":
    unittest.main(verbosity=2)
