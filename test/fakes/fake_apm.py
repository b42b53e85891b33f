#!/usr/bin/env python3
"""Fake Elastic APM server for apm-ext tests (Python 3.11 stdlib only).

    apm = FakeAPM(token=None, api_key=None, tls=None, host='127.0.0.1', port=0)
    ... point the extension at apm.url ...
    apm.wait_for(lambda a: a.count('transaction') >= 1, timeout=5)
    apm.close()

Standalone: python3 test/fakes/fake_apm.py --port 8200 [--token T] [--api-key K]
            [--tls CERT KEY]   serves until killed, prints event lines to stdout.

See the class docstring for modes and the recorded request format.

Every intake line is checked, and a body with a bad line gets 400 (recorded in
.errors):
  - structurally, always (check_structure, plain Python): metadata first and only
    first, one known kind per line, the required fields and their types, ids as
    lowercase hex (trace ids 32, others 16), timestamps in microseconds;
  - and against the APM intake v2 JSON schemas of elastic/apm-data (folder
    docs/spec/v2 there), optional: the folder APM_INTAKE_SPEC_DIR names, or when it
    is unset ../shared/apm-intake-spec/v2 next to the repository if that exists.
CHECK_LEVEL says which ran ("schemas (<folder>) and structural" or "structural
(<why>)"); the first FakeAPM of a process says it once on stderr.

OTLP/HTTP too: POST <prefix>/v1/traces|metrics|logs in protobuf or JSON, gzip or
identity, decoded with a protobuf reader of its own (see the OTLP section): each span,
metric and log record is recorded (FakeAPM.otlp_spans() ...); a body that does not
decode, or holds invalid ids, gets 400 and is recorded in .errors.

Answers go out like a Go server's: TCP_NODELAY, head and body in one write.
"""
import argparse
import base64
import binascii
import gzip
import json
import os
import re
import select
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import traceback
import zlib
from urllib.parse import urlsplit, parse_qs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jsonschema_mini  # noqa: E402
import http_scaffold  # noqa: E402

KINDS = ("metadata", "transaction", "span", "error", "metricset", "log")
SCHEMA_KINDS = ("metadata", "transaction", "span", "error", "metricset")  # log: no schema file
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Where the optional schemas are looked for when APM_INTAKE_SPEC_DIR is not set.
DEFAULT_SPEC_DIR = os.path.normpath(os.path.join(REPO, os.pardir, "shared", "apm-intake-spec",
                                                 "v2"))
SERVER_INFO = {"build_date": "2024-01-01T00:00:00Z", "build_sha": "abc",
               "publish_ready": True, "version": "8.15.0"}


def find_spec_dir(environ=None):
    """(folder or None, CHECK_LEVEL text).

    The APM intake v2 JSON schemas of elastic/apm-data (folder docs/spec/v2 there),
    optional: named by APM_INTAKE_SPEC_DIR; when it is unset, DEFAULT_SPEC_DIR if that
    exists. A folder that does not exist or lacks one of the five files counts as absent
    (APM_INTAKE_SPEC_DIR="" too). Without schemas every line still gets the structural
    check (check_structure)."""
    environ = os.environ if environ is None else environ
    d = environ.get("APM_INTAKE_SPEC_DIR")
    if d is None:
        if not os.path.isdir(DEFAULT_SPEC_DIR):
            return None, "structural (no APM_INTAKE_SPEC_DIR)"
        d, what = DEFAULT_SPEC_DIR, "%s, the default" % DEFAULT_SPEC_DIR
    elif not d:
        return None, "structural (APM_INTAKE_SPEC_DIR is empty)"
    else:
        what = "APM_INTAKE_SPEC_DIR=%s" % d
    if not os.path.isdir(d):
        return None, "structural (%s: no such folder)" % what
    missing = [k + ".json" for k in SCHEMA_KINDS
               if not os.path.isfile(os.path.join(d, k + ".json"))]
    if missing:
        return None, "structural (%s has no %s)" % (what, ", ".join(missing))
    d = os.path.normpath(os.path.abspath(d))
    return d, "schemas (%s) and structural" % d


# Which checks every intake line gets in this process: "schemas (<folder>) and
# structural" or "structural (<why there are no schemas>)". Said once on stderr when the
# first FakeAPM is created.
SPEC_DIR, CHECK_LEVEL = find_spec_dir()
_schemas = None
_schemas_lock = threading.Lock()
_announced = False


def load_schemas(schema_dir=None):
    """{kind: schema} for the five kinds that have a schema file, read from schema_dir or
    SPEC_DIR (cached for SPEC_DIR); None when there are no schemas."""
    global _schemas
    if schema_dir is not None:
        return _read_schemas(schema_dir)
    if SPEC_DIR is None:
        return None
    with _schemas_lock:
        if _schemas is None:
            _schemas = _read_schemas(SPEC_DIR)
        return _schemas


def _read_schemas(d):
    out = {}
    for kind in SCHEMA_KINDS:
        with open(os.path.join(d, kind + ".json"), encoding="utf-8") as f:
            out[kind] = json.load(f)
    return out


def announce_check_level():
    """One line on stderr, the first time in a process, saying which checks run."""
    global _announced
    if not _announced:
        _announced = True
        sys.stderr.write("fake_apm: intake lines checked: %s\n" % CHECK_LEVEL)


# ---------------------------------------------------------------- structural check
#
# Written for this project, from what the intake v2 API requires and what apm-ext and
# its tests send: the required fields of each kind with their types, ids as lowercase hex
# (trace ids 32 characters, the others 16; error ids 16 or 32, agents use 32), timestamps
# as integers in microseconds since the epoch between 2000 and 2100 (which catches
# milliseconds, seconds and nanoseconds). Optional fields are checked when present and not
# null; unknown fields are accepted, as APM Server does.

TS_MIN_US = 946684800 * 1000000    # 2000-01-01T00:00:00Z
TS_MAX_US = 4102444800 * 1000000   # 2100-01-01T00:00:00Z
_HEX = re.compile(r"[0-9a-f]+\Z")
_SERVICE_NAME = re.compile(r"[a-zA-Z0-9 _-]+\Z")
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)\Z")
_MISSING = object()


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool) or (
        isinstance(v, float) and v.is_integer())


def _type_of(v):
    for t, ok in (("null", v is None), ("boolean", isinstance(v, bool)),
                  ("integer", _is_int(v)), ("number", _is_num(v)),
                  ("string", isinstance(v, str)), ("array", isinstance(v, list)),
                  ("object", isinstance(v, dict))):
        if ok:
            return t
    return type(v).__name__


# Each checker is f(value) -> None (fine) or a problem; fields() builds object checkers
# from {name: (required, checker)}; a required field may not be missing nor null.

def _string(max_len=1024, min_len=0, pattern=None):
    def f(v):
        if not isinstance(v, str):
            return "expected a string, got %s" % _type_of(v)
        if len(v) < min_len:
            return "empty string" if min_len == 1 else "shorter than %d" % min_len
        if max_len and len(v) > max_len:
            return "string longer than %d characters (%d)" % (max_len, len(v))
        if pattern and not pattern.match(v):
            return "%.80r does not match %s" % (v, pattern.pattern)
        return None
    return f


def _hex_id(*lengths):
    def f(v):
        if not isinstance(v, str):
            return "expected an id string, got %s" % _type_of(v)
        if len(v) not in lengths or not _HEX.match(v):
            return "%.80r is not %s lowercase hex characters" % (
                v, " or ".join(str(n) for n in lengths))
        return None
    return f


def _number(minimum=None):
    def f(v):
        if not _is_num(v):
            return "expected a number, got %s" % _type_of(v)
        if minimum is not None and v < minimum:
            return "%r < %r" % (v, minimum)
        return None
    return f


def _integer(minimum=None):
    def f(v):
        if not _is_int(v):
            return "expected an integer, got %s %r" % (_type_of(v), v)
        if minimum is not None and v < minimum:
            return "%r < %r" % (v, minimum)
        return None
    return f


def _boolean(v):
    return None if isinstance(v, bool) else "expected a boolean, got %s" % _type_of(v)


def _enum(*values):
    def f(v):
        return None if v in values and not isinstance(v, bool) else \
            "%.80r is not one of %s" % (v, ", ".join(values))
    return f


def _timestamp_us(v):
    if not _is_int(v):
        return "timestamp must be an integer (microseconds since the epoch), got %s %r" % (
            _type_of(v), v)
    if not TS_MIN_US <= v < TS_MAX_US:
        return "timestamp %r is not microseconds since the epoch between 2000 and 2100%s" % (
            v, " (milliseconds?)" if TS_MIN_US // 1000 <= v < TS_MAX_US // 1000 else
            " (nanoseconds?)" if TS_MIN_US * 1000 <= v < TS_MAX_US * 1000 else "")
    return None


def _log_timestamp(v):
    """Log events: microseconds like the others, or an RFC 3339 date-time string."""
    if isinstance(v, str):
        return None if _RFC3339.match(v) else "timestamp %.80r is not RFC 3339" % v
    return _timestamp_us(v)


def _object(v):
    return None if isinstance(v, dict) else "expected an object, got %s" % _type_of(v)


def _array(item=None):
    def f(v):
        if not isinstance(v, list):
            return "expected an array, got %s" % _type_of(v)
        if item:
            for i, x in enumerate(v):
                e = item(x)
                if e:
                    return "[%d]: %s" % (i, e)
        return None
    return f


def _scalar_map(v):
    """labels / tags: a flat object of strings (1024 at most), numbers, booleans, nulls."""
    if not isinstance(v, dict):
        return "expected an object, got %s" % _type_of(v)
    for k, x in v.items():
        if not (x is None or isinstance(x, (bool, str)) or _is_num(x)):
            return "%r: expected a string, number, boolean or null, got %s" % (k, _type_of(x))
        if isinstance(x, str) and len(x) > 1024:
            return "%r: string longer than 1024 characters (%d)" % (k, len(x))
    return None


def _path(path, name):
    return "%s.%s" % (path, name) if name.replace("_", "").isalnum() else \
        "%s[%r]" % (path, name)


class _Fields:
    """Object checker: {name: (required, checker)}; errors carry the JSON path."""

    def __init__(self, spec, extra=None):
        self.spec, self.extra = spec, extra

    def check(self, v, path, errs):
        if not isinstance(v, dict):
            errs.append("%s: expected an object, got %s" % (path, _type_of(v)))
            return
        for name, (required, chk) in self.spec.items():
            x = v.get(name, _MISSING)
            p = _path(path, name)
            if x is _MISSING or x is None:
                if required:
                    errs.append("%s: missing required property %r%s" % (
                        path, name, "" if x is _MISSING else " (null)"))
                continue
            if isinstance(chk, _Fields):
                chk.check(x, p, errs)
            else:
                e = chk(x)
                if e:
                    errs.append("%s: %s" % (p, e))
        if self.extra:  # yields problems of the object, or (key, problem)
            for e in self.extra(v):
                if isinstance(e, tuple):
                    errs.append("%s: %s" % (_path(path, e[0]), e[1]))
                else:
                    errs.append("%s: %s" % (path, e))


def fields(spec, extra=None):
    return _Fields(spec, extra)


REQ, OPT = True, False
_S = _string()
_NAME_VERSION = fields({"name": (OPT, _S), "version": (OPT, _S)})
_FAAS = fields({"coldstart": (OPT, _boolean), "execution": (OPT, _S), "id": (OPT, _S),
                "name": (OPT, _S), "version": (OPT, _S),
                "trigger": (OPT, fields({"type": (OPT, _S), "request_id": (OPT, _S)}))})


def _one_of_present(*names):
    def f(v):
        if all(v.get(n) is None for n in names):
            yield "needs one of %s" % ", ".join(repr(n) for n in names)
    return f


def _error_ids(v):
    # an error in a trace says where: the same pairs APM Server requires
    for a, needs in (("transaction_id", ("parent_id", "trace_id")), ("trace_id", ("parent_id",)),
                     ("parent_id", ("trace_id",))):
        if v.get(a) is not None:
            for b in needs:
                if v.get(b) is None:
                    yield "%r given without %r" % (a, b)
    if v.get("exception") is None and v.get("log") is None:
        yield "needs 'exception' or 'log'"
    exc = v.get("exception")
    if isinstance(exc, dict) and exc.get("message") is None and exc.get("type") is None:
        yield "exception needs 'message' or 'type'"


def _samples(v):
    if not isinstance(v, dict):
        return "expected an object, got %s" % _type_of(v)
    for key, s in v.items():
        if "*" in key or '"' in key:
            return "sample name %r contains * or \"" % key
        if s is None:
            continue
        if not isinstance(s, dict):
            return "%r: expected an object, got %s" % (key, _type_of(s))
        val, vals, counts = s.get("value"), s.get("values"), s.get("counts")
        if val is not None and not _is_num(val):
            return "%r.value: expected a number, got %s" % (key, _type_of(val))
        if vals is not None or counts is not None:
            if not (isinstance(vals, list) and all(_is_num(x) for x in vals)):
                return "%r.values: expected an array of numbers" % key
            if not (isinstance(counts, list) and all(_is_int(x) and x >= 0 for x in counts)):
                return "%r.counts: expected an array of integers >= 0" % key
            if len(vals) != len(counts):
                return "%r: %d values but %d counts" % (key, len(vals), len(counts))
        elif val is None:
            return "%r: needs 'value' or 'values' and 'counts'" % key
        for k in ("type", "unit"):
            if s.get(k) is not None and not isinstance(s[k], str):
                return "%r.%s: expected a string, got %s" % (key, k, _type_of(s[k]))
    return None


def _log_ids(v):
    # trace.id / transaction.id / span.id as dotted keys (what apm-ext writes) or nested
    for name, n in (("trace", 32), ("transaction", 16), ("span", 16)):
        x = v.get(name + ".id")
        if x is None and isinstance(v.get(name), dict):
            x = v[name].get("id")
        elif v.get(name) is not None and not isinstance(v.get(name), dict):
            yield name, "expected an object, got %s" % _type_of(v[name])
        if x is not None:
            e = _hex_id(n)(x)
            if e:
                yield name + ".id", e
    ts = [k for k in ("@timestamp", "timestamp") if v.get(k) is not None]
    if not ts:
        yield "needs '@timestamp' or 'timestamp'"
    for k in ts:
        e = _log_timestamp(v[k])
        if e:
            yield k, e


STRUCTURE = {
    "metadata": fields({
        "service": (REQ, fields({
            "name": (REQ, _string(min_len=1, pattern=_SERVICE_NAME)),
            "version": (OPT, _S), "environment": (OPT, _S), "id": (OPT, _S),
            "agent": (REQ, fields({"name": (REQ, _string(min_len=1)), "version": (REQ, _S),
                                   "ephemeral_id": (OPT, _S),
                                   "activation_method": (OPT, _S)})),
            "language": (OPT, fields({"name": (REQ, _S), "version": (OPT, _S)})),
            "runtime": (OPT, fields({"name": (REQ, _S), "version": (REQ, _S)})),
            "framework": (OPT, _NAME_VERSION),
            "node": (OPT, fields({"configured_name": (OPT, _S)}))})),
        "process": (OPT, fields({"pid": (REQ, _integer()), "ppid": (OPT, _integer()),
                                 "title": (OPT, _S), "argv": (OPT, _array(_S))})),
        "system": (OPT, _object), "user": (OPT, _object), "network": (OPT, _object),
        "cloud": (OPT, fields({"provider": (REQ, _S), "region": (OPT, _S),
                               "service": (OPT, fields({"name": (OPT, _S)})),
                               "account": (OPT, _object)})),
        "labels": (OPT, _scalar_map)}),
    "transaction": fields({
        "id": (REQ, _hex_id(16)), "trace_id": (REQ, _hex_id(32)),
        "parent_id": (OPT, _hex_id(16)), "name": (OPT, _S), "type": (REQ, _S),
        "duration": (REQ, _number(0)), "timestamp": (OPT, _timestamp_us),
        "span_count": (REQ, fields({"started": (REQ, _integer(0)),
                                    "dropped": (OPT, _integer(0))})),
        "result": (OPT, _S), "outcome": (OPT, _enum("success", "failure", "unknown")),
        "sampled": (OPT, _boolean), "sample_rate": (OPT, _number(0)),
        "faas": (OPT, _FAAS), "context": (OPT, _object), "marks": (OPT, _object)}),
    "span": fields({
        "id": (REQ, _hex_id(16)), "trace_id": (REQ, _hex_id(32)),
        "parent_id": (REQ, _hex_id(16)), "transaction_id": (OPT, _hex_id(16)),
        "name": (REQ, _S), "type": (REQ, _S), "subtype": (OPT, _S), "action": (OPT, _S),
        "duration": (REQ, _number(0)), "timestamp": (OPT, _timestamp_us),
        "start": (OPT, _number()), "outcome": (OPT, _enum("success", "failure", "unknown")),
        "sync": (OPT, _boolean), "sample_rate": (OPT, _number(0)), "context": (OPT, _object)},
        _one_of_present("timestamp", "start")),
    "error": fields({
        "id": (REQ, _hex_id(16, 32)), "trace_id": (OPT, _hex_id(32)),
        "parent_id": (OPT, _hex_id(16)), "transaction_id": (OPT, _hex_id(16)),
        "timestamp": (OPT, _timestamp_us), "culprit": (OPT, _S),
        "exception": (OPT, fields({"message": (OPT, _string(max_len=None)), "type": (OPT, _S),
                                   "handled": (OPT, _boolean),
                                   "stacktrace": (OPT, _array()), "cause": (OPT, _array())})),
        "log": (OPT, fields({"message": (REQ, _string(max_len=None)), "level": (OPT, _S),
                             "logger_name": (OPT, _S), "param_message": (OPT, _S)})),
        "transaction": (OPT, fields({"name": (OPT, _S), "type": (OPT, _S),
                                     "sampled": (OPT, _boolean)})),
        "context": (OPT, _object)},
        _error_ids),
    "metricset": fields({
        "samples": (REQ, _samples), "timestamp": (OPT, _timestamp_us),
        "tags": (OPT, _scalar_map), "faas": (OPT, _FAAS),
        "transaction": (OPT, fields({"name": (OPT, _S), "type": (OPT, _S)})),
        "span": (OPT, fields({"type": (OPT, _S), "subtype": (OPT, _S)})),
        "service": (OPT, _NAME_VERSION)}),
    "log": fields({
        "message": (REQ, _string(max_len=None)), "faas": (OPT, _FAAS),
        "log.level": (OPT, _S), "log.logger": (OPT, _S)},
        _log_ids),
}


def check_structure(kind, obj):
    """Errors ('$.kind.path: problem') of one event of a known kind; [] = fine."""
    errs = []
    STRUCTURE[kind].check(obj, "$." + kind, errs)
    return errs


def _no_constants(name):
    raise ValueError("invalid JSON constant %s" % name)


_DEFAULT = object()


def parse_ndjson(data, schemas=_DEFAULT):
    """Validate a decoded intake body. Returns (lines, errors);
    lines = [(kind, obj)], errors = ['line N: ...']. Every line gets check_structure,
    and the schema check too when there are schemas (schemas=None: structural only;
    default: load_schemas())."""
    if schemas is _DEFAULT:
        schemas = load_schemas()
    lines, errors = [], []
    raw_lines = [ln for ln in data.split(b"\n") if ln.strip()]
    if not raw_lines:
        return lines, ["empty body"]
    for n, raw in enumerate(raw_lines, 1):
        try:
            doc = json.loads(raw, parse_constant=_no_constants)
        except (ValueError, UnicodeDecodeError) as e:
            errors.append("line %d: invalid JSON: %s" % (n, e))
            continue
        if not isinstance(doc, dict) or len(doc) != 1 or next(iter(doc)) not in KINDS:
            errors.append("line %d: not an object with exactly one key of %s: %.200r"
                          % (n, "/".join(KINDS), doc))
            continue
        kind, obj = next(iter(doc.items()))
        lines.append((kind, obj))
        if n == 1 and kind != "metadata":
            errors.append("line 1: first line must be metadata, got %s" % kind)
        if n > 1 and kind == "metadata":
            errors.append("line %d: metadata only allowed on the first line" % n)
        errors.extend("line %d (%s): %s" % (n, kind, e) for e in check_structure(kind, obj))
        if schemas and kind in schemas:
            errors.extend("line %d (%s, schema): %s" % (n, kind, e)
                          for e in jsonschema_mini.validate(obj, schemas[kind], "$." + kind))
    return lines, errors


def decode_body(body, encoding):
    enc = (encoding or "identity").strip().lower()
    if enc in ("", "identity"):
        return body
    if enc in ("gzip", "x-gzip"):
        return gzip.decompress(body)
    if enc == "deflate":
        try:
            return zlib.decompress(body)
        except zlib.error:
            return zlib.decompress(body, -15)  # raw deflate
    raise ValueError("unsupported Content-Encoding %r" % encoding)


# ---------------------------------------------------------------- OTLP/HTTP
#
# POST <prefix>/v1/traces, /v1/metrics, /v1/logs as an OpenTelemetry collector (or
# APM Server's OTLP intake) takes them: Content-Type application/x-protobuf or
# application/json, Content-Encoding gzip (or identity, deflate). The bodies are
# ExportTraceServiceRequest, ExportMetricsServiceRequest, ExportLogsServiceRequest
# (opentelemetry-proto: collector/<signal>/v1/<signal>_service.proto, whose messages
# are those of trace/v1/trace.proto, metrics/v1/metrics.proto, logs/v1/logs.proto,
# resource/v1/resource.proto, common/v1/common.proto). The reader below is written for
# this project from the protobuf wire format: a message is a sequence of (key, value),
# key = varint (field number << 3 | wire type); wire type 0 varint, 1 fixed 8 bytes,
# 2 varint length + bytes, 5 fixed 4 bytes (3 and 4, groups, are not used by OTLP and
# are refused). Unknown fields are skipped, as any protobuf reader does; a known field
# with the wrong wire type, a truncated value, bad UTF-8 or ids of the wrong length are
# errors. OTLP/JSON is the same messages in proto3's JSON mapping with OTLP's rules:
# lowerCamelCase keys, trace and span ids as hex (not base64), enums as integers,
# 64-bit integers as strings or numbers; unknown keys are ignored.

OTLP_SIGNALS = ("traces", "metrics", "logs")
OTLP_TYPES = {"application/x-protobuf": "protobuf", "application/json": "json"}


class OtlpError(ValueError):
    """A malformed OTLP body."""


# Field kinds: a scalar kind name, or a message schema {field number: (name, kind[, REP])}.
# wire type of each scalar kind (messages, strings and bytes: 2)
_WIRE = {"string": 2, "bytes": 2, "id": 2, "uint": 0, "int64": 0, "enum": 0, "bool": 0,
         "fixed64": 1, "sfixed64": 1, "double": 1, "fixed32": 5}
REP = True

ANY_VALUE = {}
KEY_VALUE = {1: ("key", "string"), 2: ("value", ANY_VALUE)}
ANY_VALUE.update({
    1: ("string_value", "string"), 2: ("bool_value", "bool"), 3: ("int_value", "int64"),
    4: ("double_value", "double"),
    5: ("array_value", {1: ("values", ANY_VALUE, REP)}),
    6: ("kvlist_value", {1: ("values", KEY_VALUE, REP)}),
    7: ("bytes_value", "bytes")})
RESOURCE = {1: ("attributes", KEY_VALUE, REP), 2: ("dropped_attributes_count", "uint")}
SCOPE = {1: ("name", "string"), 2: ("version", "string"), 3: ("attributes", KEY_VALUE, REP),
         4: ("dropped_attributes_count", "uint")}
SPAN = {1: ("trace_id", "id"), 2: ("span_id", "id"), 3: ("trace_state", "string"),
        4: ("parent_span_id", "id"), 5: ("name", "string"), 6: ("kind", "enum"),
        7: ("start_time_unix_nano", "fixed64"), 8: ("end_time_unix_nano", "fixed64"),
        9: ("attributes", KEY_VALUE, REP), 10: ("dropped_attributes_count", "uint"),
        11: ("events", {1: ("time_unix_nano", "fixed64"), 2: ("name", "string"),
                        3: ("attributes", KEY_VALUE, REP)}, REP),
        12: ("dropped_events_count", "uint"),
        13: ("links", {1: ("trace_id", "id"), 2: ("span_id", "id"),
                       3: ("trace_state", "string"), 4: ("attributes", KEY_VALUE, REP),
                       6: ("flags", "fixed32")}, REP),
        14: ("dropped_links_count", "uint"),
        15: ("status", {2: ("message", "string"), 3: ("code", "enum")}),
        16: ("flags", "fixed32")}
TRACES_REQUEST = {1: ("resource_spans", {
    1: ("resource", RESOURCE),
    2: ("scope_spans", {1: ("scope", SCOPE), 2: ("spans", SPAN, REP),
                        3: ("schema_url", "string")}, REP),
    3: ("schema_url", "string")}, REP)}
_NUMBER_POINT = {7: ("attributes", KEY_VALUE, REP), 2: ("start_time_unix_nano", "fixed64"),
                 3: ("time_unix_nano", "fixed64"), 4: ("as_double", "double"),
                 6: ("as_int", "sfixed64"), 8: ("flags", "uint")}
_HIST_POINT = {9: ("attributes", KEY_VALUE, REP), 2: ("start_time_unix_nano", "fixed64"),
               3: ("time_unix_nano", "fixed64"), 4: ("count", "fixed64"),
               5: ("sum", "double"), 11: ("min", "double"), 12: ("max", "double")}
_EXP_POINT = {1: ("attributes", KEY_VALUE, REP), 3: ("time_unix_nano", "fixed64"),
              4: ("count", "fixed64"), 5: ("sum", "double")}
_SUMMARY_POINT = {7: ("attributes", KEY_VALUE, REP), 3: ("time_unix_nano", "fixed64"),
                  4: ("count", "fixed64"), 5: ("sum", "double")}
METRIC = {1: ("name", "string"), 2: ("description", "string"), 3: ("unit", "string"),
          5: ("gauge", {1: ("data_points", _NUMBER_POINT, REP)}),
          7: ("sum", {1: ("data_points", _NUMBER_POINT, REP),
                      2: ("aggregation_temporality", "enum"), 3: ("is_monotonic", "bool")}),
          9: ("histogram", {1: ("data_points", _HIST_POINT, REP),
                            2: ("aggregation_temporality", "enum")}),
          10: ("exponential_histogram", {1: ("data_points", _EXP_POINT, REP),
                                         2: ("aggregation_temporality", "enum")}),
          11: ("summary", {1: ("data_points", _SUMMARY_POINT, REP)}),
          12: ("metadata", KEY_VALUE, REP)}
METRIC_TYPES = ("gauge", "sum", "histogram", "exponential_histogram", "summary")
METRICS_REQUEST = {1: ("resource_metrics", {
    1: ("resource", RESOURCE),
    2: ("scope_metrics", {1: ("scope", SCOPE), 2: ("metrics", METRIC, REP),
                          3: ("schema_url", "string")}, REP),
    3: ("schema_url", "string")}, REP)}
LOG_RECORD = {1: ("time_unix_nano", "fixed64"), 11: ("observed_time_unix_nano", "fixed64"),
              2: ("severity_number", "enum"), 3: ("severity_text", "string"),
              5: ("body", ANY_VALUE), 6: ("attributes", KEY_VALUE, REP),
              7: ("dropped_attributes_count", "uint"), 8: ("flags", "fixed32"),
              9: ("trace_id", "id"), 10: ("span_id", "id"), 12: ("event_name", "string")}
LOGS_REQUEST = {1: ("resource_logs", {
    1: ("resource", RESOURCE),
    2: ("scope_logs", {1: ("scope", SCOPE), 2: ("log_records", LOG_RECORD, REP),
                       3: ("schema_url", "string")}, REP),
    3: ("schema_url", "string")}, REP)}
OTLP_REQUESTS = {"traces": TRACES_REQUEST, "metrics": METRICS_REQUEST, "logs": LOGS_REQUEST}
# ExportXServiceResponse.partial_success (field 1): {rejected_<items> (1, int64),
# error_message (2, string)}
OTLP_REJECTED = {"traces": "rejected_spans", "metrics": "rejected_data_points",
                 "logs": "rejected_log_records"}
_MAX_DEPTH = 32


def pb_varint(buf, pos):
    """(value, next position) of the varint at buf[pos] (bytes or memoryview); 64-bit
    wrap-around like protobuf; non-minimal encodings are accepted, as by any reader."""
    value = shift = 0
    n = len(buf)
    while True:
        if pos >= n:
            raise OtlpError("truncated varint at byte %d" % pos)
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7
        if shift >= 70:
            raise OtlpError("varint longer than 10 bytes at byte %d" % (pos - 10))


def pb_fields(buf):
    """[(field number, wire type, value)] of one message, in order: varints as int,
    wire types 1 and 5 as 8 / 4 bytes, length-delimited values as memoryview."""
    buf = memoryview(buf)
    out, pos, n = [], 0, len(buf)
    while pos < n:
        start = pos
        key, pos = pb_varint(buf, pos)
        field, wt = key >> 3, key & 7
        if field == 0 or field > 0x1FFFFFFF:
            raise OtlpError("field number %d at byte %d" % (field, start))
        if wt == 0:
            value, pos = pb_varint(buf, pos)
        elif wt in (1, 5):
            size = 8 if wt == 1 else 4
            if pos + size > n:
                raise OtlpError("field %d: truncated fixed%d at byte %d" % (
                    field, size * 8, pos))
            value, pos = bytes(buf[pos:pos + size]), pos + size
        elif wt == 2:
            size, pos = pb_varint(buf, pos)
            if size > n - pos:
                raise OtlpError("field %d: length %d at byte %d runs past the end (%d "
                                "bytes left)" % (field, size, start, n - pos))
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise OtlpError("field %d: wire type %d at byte %d (groups are not OTLP)" % (
                field, wt, start))
        out.append((field, wt, value))
    return out


def _pb_scalar(kind, value, where):
    if kind in ("string",):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise OtlpError("%s: invalid UTF-8 (%s)" % (where, e))
    if kind in ("bytes", "id"):
        return bytes(value)
    if kind in ("uint", "enum"):
        return value
    if kind == "int64":
        return value - (1 << 64) if value >= 1 << 63 else value
    if kind == "bool":
        return value != 0
    if kind == "fixed64":
        return int.from_bytes(value, "little")
    if kind == "sfixed64":
        return int.from_bytes(value, "little", signed=True)
    if kind == "fixed32":
        return int.from_bytes(value, "little")
    if kind == "double":
        return struct.unpack("<d", value)[0]
    raise AssertionError(kind)


def pb_decode(buf, schema, where="", depth=0):
    """One message as a dict {field name: value} by schema; repeated fields as lists."""
    if depth > _MAX_DEPTH:
        raise OtlpError("%s: nested more than %d deep" % (where or "message", _MAX_DEPTH))
    out = {}
    for field, wt, value in pb_fields(buf):
        spec = schema.get(field)
        if spec is None:
            continue  # unknown field: skipped
        name, kind = spec[0], spec[1]
        rep = len(spec) > 2 and spec[2]
        path = "%s.%s" % (where, name) if where else name
        want = 2 if isinstance(kind, dict) else _WIRE[kind]
        if wt != want:
            raise OtlpError("%s (field %d): wire type %d, want %d" % (path, field, wt, want))
        if isinstance(kind, dict):
            v = pb_decode(value, kind, path, depth + 1)
        else:
            v = _pb_scalar(kind, value, path)
        if rep:
            out.setdefault(name, []).append(v)
        else:
            out[name] = v   # last one wins, as in protobuf
    return out


def _camel(name):
    head, *rest = name.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


_HEXCHARS = re.compile(r"[0-9a-fA-F]*\Z")


def _json_int(v, path, lo, hi):
    if isinstance(v, str) and re.match(r"-?\d+\Z", v):
        v = int(v)
    elif isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise OtlpError("%s: expected an integer (number or decimal string), got %r" % (
            path, v))
    if not lo <= v <= hi:
        raise OtlpError("%s: %d out of range" % (path, v))
    return v


def _json_scalar(kind, v, path):
    if kind == "string":
        if not isinstance(v, str):
            raise OtlpError("%s: expected a string, got %s" % (path, _type_of(v)))
        return v
    if kind == "id":
        if not isinstance(v, str) or not _HEXCHARS.match(v) or len(v) % 2:
            raise OtlpError("%s: expected a hex id, got %.80r" % (path, v))
        return bytes.fromhex(v)
    if kind == "bytes":
        if not isinstance(v, str):
            raise OtlpError("%s: expected base64 text, got %s" % (path, _type_of(v)))
        try:
            return base64.b64decode(v + "=" * (-len(v) % 4), validate=True)
        except (ValueError, binascii.Error) as e:
            raise OtlpError("%s: bad base64 (%s)" % (path, e))
    if kind == "bool":
        if not isinstance(v, bool):
            raise OtlpError("%s: expected true or false, got %r" % (path, v))
        return v
    if kind == "enum":
        if isinstance(v, str):
            raise OtlpError("%s: enum given as %r; OTLP/JSON enums are integers" % (path, v))
        return _json_int(v, path, -(1 << 31), (1 << 31) - 1)
    if kind in ("uint", "fixed32"):
        return _json_int(v, path, 0, (1 << 32) - 1)
    if kind == "fixed64":
        return _json_int(v, path, 0, (1 << 64) - 1)
    if kind in ("int64", "sfixed64"):
        return _json_int(v, path, -(1 << 63), (1 << 63) - 1)
    if kind == "double":
        if isinstance(v, str) and v in ("NaN", "Infinity", "-Infinity"):
            return float(v)
        if not _is_num(v):
            raise OtlpError("%s: expected a number, got %r" % (path, v))
        return float(v)
    raise AssertionError(kind)


def json_decode(obj, schema, where="", depth=0):
    """The same dict as pb_decode from OTLP/JSON (lowerCamelCase keys)."""
    if depth > _MAX_DEPTH:
        raise OtlpError("%s: nested more than %d deep" % (where or "message", _MAX_DEPTH))
    if not isinstance(obj, dict):
        raise OtlpError("%s: expected an object, got %s" % (where or "body", _type_of(obj)))
    by_key = {_camel(spec[0]): spec for spec in schema.values()}
    out = {}
    for key, v in obj.items():
        spec = by_key.get(key)
        if spec is None or v is None:
            continue  # unknown key (or null: the default value)
        name, kind = spec[0], spec[1]
        rep = len(spec) > 2 and spec[2]
        path = "%s.%s" % (where, key) if where else key
        items = v if rep else [v]
        if rep and not isinstance(v, list):
            raise OtlpError("%s: expected an array, got %s" % (path, _type_of(v)))
        got = []
        for i, x in enumerate(items):
            p = "%s[%d]" % (path, i) if rep else path
            got.append(json_decode(x, kind, p, depth + 1) if isinstance(kind, dict)
                       else _json_scalar(kind, x, p))
        out[name] = got if rep else got[0]
    return out


def any_value(v):
    """An AnyValue dict as a Python value (None when unset)."""
    if not v:
        return None
    for k in ("string_value", "bool_value", "int_value", "double_value", "bytes_value"):
        if k in v:
            return v[k]
    if "array_value" in v:
        return [any_value(x) for x in v["array_value"].get("values", [])]
    if "kvlist_value" in v:
        return kv_dict(v["kvlist_value"].get("values", []))
    return None


def kv_dict(kvs):
    return {kv.get("key", ""): any_value(kv.get("value")) for kv in kvs or []}


def _hex_or_none(b):
    return b.hex() if b else None


def _check_id(b, size, what, required, errors):
    if not b:
        if required:
            errors.append("%s: missing" % what)
        return
    if len(b) != size:
        errors.append("%s: %d bytes, want %d" % (what, len(b), size))
    elif not any(b):
        errors.append("%s: all zeroes (invalid)" % what)


def otlp_items(signal, doc):
    """(items, errors) of a decoded export request.

    traces: spans {trace_id, span_id, parent_id (hex or None), name, kind, service,
            scope, attributes, resource, status, start_ns, end_ns}
    metrics: metrics {name, type, unit, service, scope, resource, points: [{value or
            count/sum, attributes}]}
    logs: log records {body, severity_text, severity_number, trace_id, span_id (hex or
            None), event_name, attributes, service, scope, resource, time_ns}"""
    items, errors = [], []
    top, mid, leaf = {"traces": ("resource_spans", "scope_spans", "spans"),
                      "metrics": ("resource_metrics", "scope_metrics", "metrics"),
                      "logs": ("resource_logs", "scope_logs", "log_records")}[signal]
    for ri, rx in enumerate(doc.get(top, [])):
        resource = kv_dict(rx.get("resource", {}).get("attributes"))
        service = resource.get("service.name")
        for si, sx in enumerate(rx.get(mid, [])):
            scope = sx.get("scope", {}).get("name", "")
            for li, x in enumerate(sx.get(leaf, [])):
                where = "%s[%d].%s[%d].%s[%d]" % (top, ri, mid, si, leaf, li)
                common = {"service": service, "scope": scope, "resource": resource,
                          "attributes": kv_dict(x.get("attributes"))}
                if signal == "traces":
                    _check_id(x.get("trace_id"), 16, where + ".trace_id", True, errors)
                    _check_id(x.get("span_id"), 8, where + ".span_id", True, errors)
                    _check_id(x.get("parent_span_id"), 8, where + ".parent_span_id", False,
                              errors)
                    item = {"trace_id": _hex_or_none(x.get("trace_id")),
                            "span_id": _hex_or_none(x.get("span_id")),
                            "parent_id": _hex_or_none(x.get("parent_span_id")),
                            "name": x.get("name", ""), "kind": x.get("kind", 0),
                            "status": x.get("status", {}).get("code", 0),
                            "start_ns": x.get("start_time_unix_nano", 0),
                            "end_ns": x.get("end_time_unix_nano", 0)}
                    if not item["name"]:
                        errors.append("%s.name: empty" % where)
                elif signal == "metrics":
                    kinds = [k for k in METRIC_TYPES if k in x]
                    points = []
                    for k in kinds:
                        for p in x[k].get("data_points", []):
                            pt = {"attributes": kv_dict(p.get("attributes"))}
                            for f in ("as_int", "as_double"):
                                if f in p:
                                    pt["value"] = p[f]
                            for f in ("count", "sum", "min", "max"):
                                if f in p:
                                    pt[f] = p[f]
                            points.append(pt)
                    item = {"name": x.get("name", ""), "unit": x.get("unit", ""),
                            "type": kinds[0] if kinds else None, "points": points}
                    if not item["name"]:
                        errors.append("%s.name: empty" % where)
                    if len(kinds) > 1:
                        errors.append("%s: more than one data type: %s" % (where, kinds))
                else:
                    _check_id(x.get("trace_id"), 16, where + ".trace_id", False, errors)
                    _check_id(x.get("span_id"), 8, where + ".span_id", False, errors)
                    item = {"body": any_value(x.get("body")),
                            "severity_text": x.get("severity_text", ""),
                            "severity_number": x.get("severity_number", 0),
                            "trace_id": _hex_or_none(x.get("trace_id")),
                            "span_id": _hex_or_none(x.get("span_id")),
                            "event_name": x.get("event_name", ""),
                            "time_ns": x.get("time_unix_nano", 0)}
                item.update(common)
                items.append(item)
    return items, errors


def parse_otlp(signal, fmt, data):
    """Decode an OTLP export request body (after Content-Encoding).
    signal: traces|metrics|logs; fmt: protobuf|json. Returns (items, errors): see
    otlp_items; a body that cannot be decoded gives ([], [its error])."""
    schema = OTLP_REQUESTS[signal]
    try:
        if fmt == "protobuf":
            doc = pb_decode(data, schema)
        elif fmt == "json":
            try:
                obj = json.loads(data, parse_constant=_no_constants)
            except (ValueError, UnicodeDecodeError) as e:
                raise OtlpError("invalid JSON: %s" % e)
            doc = json_decode(obj, schema)
        else:
            raise OtlpError("unknown format %r" % fmt)
    except OtlpError as e:
        return [], ["%s %s: %s" % (fmt, signal, e)]
    items, errors = otlp_items(signal, doc)
    return items, ["%s %s: %s" % (fmt, signal, e) for e in errors]


# A tiny protobuf writer, for the fake's answers (partial success, google.rpc.Status)
# and for tests that build request bodies.

def pb_key(field, wt):
    return pb_uvarint(field << 3 | wt)


def pb_uvarint(v):
    v &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb_len(field, payload):
    """A length-delimited field (string, bytes or message)."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    return pb_key(field, 2) + pb_uvarint(len(payload)) + bytes(payload)


def pb_int(field, v):
    """A varint field (int32/int64/uint/enum/bool); negatives as 64-bit two's complement."""
    return pb_key(field, 0) + pb_uvarint(int(v))


def pb_fixed64(field, v):
    return pb_key(field, 1) + struct.pack("<Q", v)


def pb_double(field, v):
    return pb_key(field, 1) + struct.pack("<d", v)


def pb_fixed32(field, v):
    return pb_key(field, 5) + struct.pack("<I", v)


# HTTP status -> google.rpc.Code, for the Status message of an error answer
_GRPC_CODE = {400: 3, 401: 16, 403: 7, 404: 12, 405: 12, 408: 4, 413: 8, 415: 3, 429: 8,
              500: 13, 502: 14, 503: 14, 504: 14}


def otlp_status_body(fmt, status, message):
    """(body, content type) of an OTLP error answer: a google.rpc.Status {code (1),
    message (2)} in the request's format (JSON when the format is unknown)."""
    code = _GRPC_CODE.get(status, 2)
    if fmt == "protobuf":
        return pb_int(1, code) + pb_len(2, message), "application/x-protobuf"
    return (json.dumps({"code": code, "message": message}).encode() + b"\n",
            "application/json")


def otlp_success_body(signal, fmt, partial=None):
    """(body, content type) of a 200 answer: empty (protobuf) or {} (JSON), or an
    ExportXServiceResponse whose partial_success says partial=(rejected, message)."""
    if fmt == "protobuf":
        if not partial:
            return b"", "application/x-protobuf"
        rejected, msg = partial
        return pb_len(1, pb_int(1, rejected) + (pb_len(2, msg) if msg else b"")), \
            "application/x-protobuf"
    if not partial:
        return b"{}", "application/json"
    rejected, msg = partial
    ps = {_camel(OTLP_REJECTED[signal]): str(rejected)}
    if msg:
        ps["errorMessage"] = msg
    return json.dumps({"partialSuccess": ps}).encode(), "application/json"


class Headers(dict):
    """dict of header name -> value with case-insensitive lookup (keys stored lower-case;
    repeated headers joined with ', ')."""

    def __init__(self, items=()):
        super().__init__()
        for k, v in items:
            k = k.lower()
            super().__setitem__(k, v if k not in self else self[k] + ", " + v)

    def __getitem__(self, k):
        return super().__getitem__(k.lower())

    def __contains__(self, k):
        return super().__contains__(k.lower())

    def get(self, k, default=None):
        return super().get(k.lower(), default)


class Request:
    """One request the fake saw. status is None until answered (or if never answered)."""

    def __init__(self, method, path, query, headers, conn_id):
        self.method, self.path, self.query, self.headers = method, path, query, headers
        self.params = parse_qs(query)
        self.conn_id = conn_id
        self.body = b""        # raw body as received (after de-chunking, still encoded)
        self.decoded = b""     # after Content-Encoding
        self.lines = []        # [(kind, obj)]
        self.errors = []       # validation / decoding errors
        self.status = None
        self.io_error = None   # set when reading/answering failed at the socket level
        self.chunked = False
        self.t_start = time.monotonic()
        self.t_end = None
        # OTLP (is_otlp): signal traces|metrics|logs, otlp_format protobuf|json (None:
        # another Content-Type), otlp_items: the decoded spans / metrics / log records
        # (see otlp_items()); errors as for intake
        self.signal = None
        for sig in OTLP_SIGNALS:
            if self.path.endswith("/v1/" + sig):
                self.signal = sig
        self.otlp_format = None
        self.otlp_items = []

    @property
    def is_intake(self):
        return self.path.endswith("/intake/v2/events")

    @property
    def is_otlp(self):
        return self.signal is not None

    @property
    def content_type(self):
        """The media type, lower case, without parameters ('' when absent)."""
        return (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()

    @property
    def encoding(self):
        return self.headers.get("Content-Encoding")

    @property
    def auth(self):
        return self.headers.get("Authorization")

    @property
    def user_agent(self):
        return self.headers.get("User-Agent")

    @property
    def delivered(self):
        """Answered with success (202 intake, 200 OTLP) and written to the socket."""
        return self.io_error is None and not self.errors and (
            self.status == 202 if self.is_intake else self.status == 200)

    def __repr__(self):
        if self.is_otlp:
            return "<Request %s %s conn=%d status=%s %s %s %d errors=%d>" % (
                self.method, self.path, self.conn_id, self.status, self.otlp_format,
                self.signal, len(self.otlp_items), len(self.errors))
        return "<Request %s %s%s conn=%d status=%s lines=%d errors=%d>" % (
            self.method, self.path, "?" + self.query if self.query else "", self.conn_id,
            self.status, len(self.lines), len(self.errors))


class _Handler(http_scaffold.Handler):
    server_version = "FakeAPM/1.0"

    # ---- connection management
    def setup(self):
        fake = self.server.fake
        try:  # answers go out at once (no Nagle delay between head and body)
            self.no_delay()
        except OSError:
            pass
        self.conn_id = fake._register_conn(self.request)
        if self.server.ssl_context is not None:
            try:
                self.request.settimeout(10)
                tls = self.server.ssl_context.wrap_socket(
                    self.request, server_side=True, do_handshake_on_connect=False)
            except (OSError, ssl.SSLError) as e:
                fake._tls_error(self.conn_id, e)
                fake._unregister_conn(self.conn_id)
                raise
            self.request = tls
            fake._register_conn(tls, self.conn_id)
            try:
                tls.do_handshake()
                tls.settimeout(None)
            except (OSError, ssl.SSLError) as e:
                fake._tls_error(self.conn_id, e)
                fake._unregister_conn(self.conn_id)
                tls.close()
                raise
        super().setup()

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        self.server.fake._unregister_conn(self.conn_id)
        if isinstance(self.request, ssl.SSLSocket):  # socketserver only closes the raw socket
            try:
                socket.socket.shutdown(self.request, socket.SHUT_WR)
            except OSError:
                pass
            self.request.close()

    def handle(self):
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection and self._wait_next_request():
            self.handle_one_request()

    def _wait_next_request(self):
        """Between requests: honour mode close_idle (close idle connection after N s)."""
        fake = self.server.fake
        idle_since = time.monotonic()
        while True:
            mode, arg = fake._mode
            if fake._closed:
                return False
            if mode == "close_idle" and time.monotonic() - idle_since >= (arg or 0):
                return False
            try:
                r, _, _ = select.select([self.connection], [], [], 0.05)
            except (OSError, ValueError):
                return False
            if r or (isinstance(self.connection, ssl.SSLSocket) and self.connection.pending()):
                return True

    def log_message(self, fmt, *args):
        sys.stderr.write("fake_apm: %s\n" % (fmt % args))

    def log_request(self, code="-", size="-"):
        pass

    # ---- dispatch
    def _any(self):
        fake = self.server.fake
        u = urlsplit(self.path)
        req = Request(self.command, u.path, u.query, Headers(self.headers.items()), self.conn_id)
        fake._add(req)
        try:
            self._serve(fake, req)
        except Exception as e:  # never crash on garbage
            self.close_connection = True
            if not isinstance(e, OSError):
                traceback.print_exc()
            req.io_error = "%s: %s" % (type(e).__name__, e)
            sys.stderr.write("fake_apm: %r: %s\n" % (req, req.io_error))
        finally:
            if req.t_end is None:
                req.t_end = time.monotonic()
            fake._done(req)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _any

    def _read_body(self, req):
        te = self.headers.get("Transfer-Encoding", "").lower()
        if "chunked" in te:
            req.chunked = True
            parts = []
            while True:
                line = self.rfile.readline(1024)
                if not line:  # the client went away mid-body: not a malformed body
                    raise ConnectionError("connection closed in the chunked body")
                if not line.endswith(b"\n"):
                    raise ValueError("bad chunk size line %r" % line)
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                data = self.rfile.read(size)
                if len(data) != size:  # short read = EOF
                    raise ConnectionError("connection closed in a chunk")
                parts.append(data)
                if self.rfile.readline(8) not in (b"\r\n", b"\n"):
                    raise ValueError("missing CRLF after chunk")
            return b"".join(parts)
        n = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(n) if n > 0 else b""
        if len(data) != n:  # short read = EOF
            raise ConnectionError("connection closed after %d of %d body bytes" % (len(data), n))
        return data

    def _serve(self, fake, req):
        gate = fake.body_gate
        if gate is not None:   # stop reading: the client's sends back up
            gate.wait(60)
        try:
            req.body = self._read_body(req)
        except (ValueError, OSError) as e:
            if isinstance(e, ValueError):
                req.errors.append("body: %s" % e)
            else:
                req.io_error = "body: %s" % e
            self.close_connection = True
            if isinstance(e, ValueError):
                self._reply(req, 400, {"accepted": 0, "errors": [{"message": str(e)}]})
            return

        known = (req.is_intake or req.is_otlp or req.path.endswith("/config/v1/agents")
                 or req.path.endswith("/") or req.path == "")  # "<prefix>/" = server info
        if req.is_otlp and req.method == "POST":
            req.otlp_format = OTLP_TYPES.get(req.content_type)
            if req.otlp_format is None:
                errs = ["Content-Type %r is not OTLP/HTTP (application/x-protobuf or "
                        "application/json)" % self.headers.get("Content-Type")]
            else:
                try:
                    req.decoded = decode_body(req.body, self.headers.get("Content-Encoding"))
                    req.otlp_items, errs = parse_otlp(req.signal, req.otlp_format, req.decoded)
                except (ValueError, OSError, EOFError, zlib.error) as e:
                    errs = ["decode: %s" % e]
            req.errors.extend(errs)
            for e in errs[:20]:
                sys.stderr.write("fake_apm: OTLP %s: %s\n" % (req.path, e))
        if req.is_intake and req.method == "POST":
            try:
                req.decoded = decode_body(req.body, self.headers.get("Content-Encoding"))
                req.lines, errs = parse_ndjson(req.decoded)
            except (ValueError, OSError, EOFError, zlib.error) as e:
                errs = ["decode: %s" % e]
            req.errors.extend(errs)
            if errs:
                for e in errs[:20]:
                    sys.stderr.write("fake_apm: validation: %s\n" % e)

        mode, arg = fake._wait_unstalled()
        if mode == "down" or fake._closed:
            self.close_connection = True
            return  # connection is being dropped; never answer
        status = fake._take_fail_next(req) if req.is_intake or req.is_otlp else None
        if status is None and mode == "status" and known:
            status = arg
        if status is not None:
            if req.is_otlp:
                return self._otlp_error(req, status, "fake_apm: forced status %d" % status)
            return self._reply(req, status, {"accepted": 0, "errors": [
                {"message": "fake_apm: forced status %d" % status}]})
        if mode == "slow":
            fake._sleep(arg)
        delay = fake.delay_for(req) if fake.delay_for else None
        if delay:
            fake._sleep(delay)
        if req.is_otlp and req.method != "POST":
            return self._otlp_error(req, 405, "method %s not allowed" % req.method)
        if not known or (req.is_intake and req.method != "POST"):
            return self._reply(req, 404, {"error": "404 page not found"})
        if not fake._auth_ok(req.headers.get("Authorization")):
            if req.is_otlp:
                return self._otlp_error(req, 401, "authentication failed: missing or "
                                        "invalid Authorization header")
            return self._reply(req, 401, {"accepted": 0, "errors": [
                {"message": "authentication failed: missing or invalid Authorization header"}]})
        if req.is_otlp:
            if req.otlp_format is None:
                return self._otlp_error(req, 415, req.errors[0])
            if req.errors:
                return self._otlp_error(req, 400, "; ".join(req.errors[:5]))
            body, ctype = otlp_success_body(req.signal, req.otlp_format, fake.otlp_partial)
            req.status, req.t_end = 200, time.monotonic()
            return self._send(200, body, ctype, always_type=True)
        if req.is_intake:
            if req.errors:
                return self._reply(req, 400, {"accepted": 0, "errors": [
                    {"message": e} for e in req.errors[:50]]})
            return self._reply(req, 202, None)
        if req.path.endswith("/config/v1/agents"):
            return self._reply(req, 200, {})
        return self._reply(req, 200, SERVER_INFO)

    def _reply(self, req, status, obj):
        body = b"" if obj is None else json.dumps(obj).encode() + b"\n"
        req.status = status
        req.t_end = time.monotonic()
        self._send(status, body)

    def _otlp_error(self, req, status, message):
        """An OTLP error answer: a google.rpc.Status in the request's format."""
        body, ctype = otlp_status_body(req.otlp_format, status, message)
        req.status = status
        req.t_end = time.monotonic()
        self._send(status, body, ctype)

    def _send(self, status, body, content_type="application/json", always_type=False):
        """The whole answer, head and body, in one sendall on the TCP_NODELAY socket (one
        segment), as a Go server writes it: a client that waits for the body after the head
        never meets a delayed ACK. always_type: Content-Type even with an empty body (an
        OTLP protobuf success). Retry-After (FakeAPM.retry_after) on 429 and 503."""
        head = [("Server", self.version_string()), ("Date", self.date_time_string())]
        if body or always_type:
            head.append(("Content-Type", content_type))
        retry_after = self.server.fake.retry_after
        if retry_after is not None and status in (429, 503):
            head.append(("Retry-After", retry_after))
        self.send_whole(status, head, body, send_body=self.command != "HEAD")

    def send_error(self, code, message=None, explain=None):
        """http.server's answer to a request it cannot parse, also in one write."""
        self.close_connection = True
        msg = message or self.responses.get(code, ("error",))[0]
        body = b"" if code < 200 or code in (204, 304) else \
            json.dumps({"error": "%d %s" % (code, msg)}).encode() + b"\n"
        try:
            self._send(code, body)
        except OSError:
            pass


class _Server(http_scaffold.Server):
    block_on_close = False

    def __init__(self, addr, fake, ssl_context, family):
        self.ssl_context = ssl_context
        super().__init__(addr, _Handler, fake, family)


class FakeAPM:
    """Fake APM server.

    Modes (set_mode, thread-safe, any time):
      'ok'               default: 202 / 400 / 401 / 404 as appropriate
      'status', code     answer `code` with {"accepted":0,"errors":[...]} after reading the body
                         (intake, GET / and /config/v1/agents)
      'slow', seconds    read the body, wait, then answer normally
      'stall'            read the request, never answer until the mode changes
      'down'             close the listening socket and all connections (refused);
                         any other mode re-listens on the same port
      'close_idle', s=0  close a keep-alive connection once idle for s seconds
                         (without announcing it)
    fail_next(n, status, which="any"): the next n intake or OTLP requests (which:
    "intake", "otlp" or an OTLP signal for those only) get `status`, then normal again.
    delay_for: None, or f(request) -> seconds to wait before answering it (after the
    body is in; 0 or None: at once), e.g. to hold one signal's answers.
    drop_connections(): close every open client connection now.
    body_gate: None (default), or a threading.Event: a request's body is not read
    (its head is, and recorded) until the event is set, so that the client's
    sends back up into full socket buffers.
    retry_after: None, or the Retry-After value sent with every 429 and 503 answer.
    otlp_partial: None, or (rejected, message): OTLP 200 answers then carry a
    partial_success saying that many items were rejected.

    OTLP/HTTP: POST <prefix>/v1/traces|metrics|logs, Content-Type application/x-protobuf
    or application/json, any Content-Encoding of decode_body; 200 with an empty body
    (Content-Type application/x-protobuf) or {} (application/json); 415 for another
    Content-Type, 400 for a body that does not decode or parse, 405 for another method,
    401 for bad auth, each with a google.rpc.Status in the request's format; the modes
    apply as to intake. otlp_requests(), otlp_spans(), otlp_span_counts(),
    otlp_metrics(), otlp_logs() read what was delivered (see parse_otlp/otlp_items for
    the items' fields).

    Recorded: .requests -> [Request] with method, path, query, params, headers
    (case-insensitive dict), body (raw bytes, still encoded), decoded, lines [(kind, obj)],
    errors (decoding/validation), status (None = never answered), io_error (socket-level
    failure, e.g. client went away; such requests do not count in events()), chunked,
    t_start, t_end (time.monotonic()), conn_id, is_intake; for OTLP is_otlp, signal,
    otlp_format, otlp_items; content_type, encoding, auth, user_agent; delivered (the
    success answer was written). A request is recorded as soon as its headers are in
    (status None until answered).
    Auth (token/api_key) is enforced on intake, config and GET <prefix>/ alike (401).
    """

    def __init__(self, token=None, api_key=None, tls=None, host="127.0.0.1", port=0):
        load_schemas()
        announce_check_level()
        self.token, self.api_key, self.host = token, api_key, host
        self.tls = tls
        self._ctx = None
        if tls:
            self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ctx.load_cert_chain(tls[0], tls[1])
        self._family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._cond = threading.Condition()
        self._mode = ("ok", None)
        self._fail = [0, None, "any"]
        self._closed = False
        self._requests = []
        self._conns = {}           # conn_id -> [sockets]
        self._next_conn = 0
        self.tls_errors = []       # TLS handshake failures seen (strings)
        self.on_request = None     # optional callback(Request) after each answered request
        self.retry_after = None    # Retry-After value on 429 / 503 answers
        self.otlp_partial = None   # (rejected, message): partial_success in OTLP 200s
        self.delay_for = None      # f(request) -> seconds before answering it
        self.body_gate = None      # threading.Event: bodies are read once it is set
        self._server, self._servers = None, []
        self._life = threading.Lock()  # serialises start/stop
        self.port = port
        self._start()

    # ---- lifecycle
    def _start(self):
        self._server = _Server((self.host, self.port), self, self._ctx, self._family)
        self.port = self._server.server_address[1]
        servers = [self._server]
        if self.tls and self.host == "127.0.0.1" and socket.has_ipv6:
            # url says "localhost", which may resolve to ::1 first: listen there too
            try:
                servers.append(_Server(("::1", self.port), self, self._ctx, socket.AF_INET6))
            except OSError:
                pass
        self._servers = servers
        for srv in servers:
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                             daemon=True, name="fake-apm:%d" % self.port).start()

    def _stop(self):
        servers, self._servers, self._server = self._servers, [], None
        for srv in servers:
            srv.shutdown()
            srv.server_close()
        self.drop_connections()

    @property
    def url(self):
        if self.tls:
            h = "localhost" if self.host in ("127.0.0.1", "0.0.0.0", "localhost") else self.host
        else:
            h = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        if ":" in h:
            h = "[%s]" % h
        return "%s://%s:%d" % ("https" if self.tls else "http", h, self.port)

    def close(self):
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        with self._life:
            self._stop()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    # ---- behaviour
    def set_mode(self, mode, arg=None):
        if mode not in ("ok", "status", "slow", "stall", "down", "close_idle"):
            raise ValueError("unknown mode %r" % mode)
        if mode == "status" and arg is None:
            arg = 503
        with self._cond:
            old = self._mode[0]
            self._mode = (mode, arg)
            self._cond.notify_all()
        with self._life:
            if mode == "down" and old != "down":
                self._stop()
            elif mode != "down" and self._server is None and not self._closed:
                self._start()

    @property
    def mode(self):
        return self._mode

    def fail_next(self, n, status=503, which="any"):
        """The next n requests of `which` kind ("any": intake or OTLP; "intake";
        "otlp"; or one OTLP signal: "traces", "metrics", "logs") get `status`."""
        if which not in ("any", "intake", "otlp") + OTLP_SIGNALS:
            raise ValueError("which must be any, intake, otlp or a signal, not %r" % (which,))
        with self._cond:
            self._fail = [n, status, which]

    def drop_connections(self):
        with self._cond:
            socks = [s for lst in self._conns.values() for s in lst]
        for s in socks:
            try:  # plain socket shutdown (also for SSLSocket): sends FIN, wakes the reader
                socket.socket.shutdown(s, socket.SHUT_RDWR)
            except OSError:
                pass

    def open_connections(self):
        with self._cond:
            return len(self._conns)

    @property
    def connections_total(self):
        return self._next_conn

    # ---- recorded data
    @property
    def requests(self):
        with self._cond:
            return list(self._requests)

    def intake_requests(self):
        return [r for r in self.requests if r.is_intake]

    def events(self, kind=None):
        """Objects of `kind` from intake requests answered 202 (and the answer could be
        written to the socket), in arrival order.
        kind=None: [(kind, obj)] of all non-metadata lines."""
        out = []
        for r in self.requests:
            if r.is_intake and r.status == 202 and r.io_error is None:
                for k, obj in r.lines:
                    if kind is None and k != "metadata":
                        out.append((k, obj))
                    elif k == kind:
                        out.append(obj)
        return out

    def metadata(self):
        return self.events("metadata")

    # ---- OTLP
    def otlp_requests(self, signal=None):
        """Every request to <prefix>/v1/traces|metrics|logs (or that signal)."""
        return [r for r in self.requests if r.is_otlp and (signal is None or r.signal == signal)]

    def otlp_delivered(self, signal=None):
        """OTLP requests answered 200 (written to the socket), in arrival order."""
        return [r for r in self.otlp_requests(signal) if r.method == "POST" and r.delivered]

    def otlp_items(self, signal):
        return [x for r in self.otlp_delivered(signal) for x in r.otlp_items]

    def otlp_spans(self):
        """Every span delivered (answered 200), once per delivery."""
        return self.otlp_items("traces")

    def otlp_span_counts(self):
        """{span id: times delivered}."""
        counts = {}
        for s in self.otlp_spans():
            counts[s["span_id"]] = counts.get(s["span_id"], 0) + 1
        return counts

    def otlp_metrics(self):
        return self.otlp_items("metrics")

    def otlp_logs(self):
        return self.otlp_items("logs")

    def count(self, kind=None):
        return len(self.events(kind))

    @property
    def errors(self):
        return [e for r in self.requests for e in r.errors]

    def reset(self):
        with self._cond:
            self._requests = []
            self.tls_errors = []

    def wait_for(self, predicate, timeout=5.0):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if predicate(self):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.25))

    # ---- internals used by the handler
    def _auth_ok(self, auth):
        if self.api_key is not None:
            return auth == "ApiKey " + self.api_key
        if self.token is not None:
            return auth == "Bearer " + self.token
        return True

    def _register_conn(self, sock, conn_id=None):
        with self._cond:
            if conn_id is None:
                self._next_conn += 1
                conn_id = self._next_conn
            self._conns.setdefault(conn_id, []).append(sock)
            return conn_id

    def _unregister_conn(self, conn_id):
        with self._cond:
            self._conns.pop(conn_id, None)

    def _tls_error(self, conn_id, e):
        sys.stderr.write("fake_apm: TLS handshake failed (conn %d): %s\n" % (conn_id, e))
        with self._cond:
            self.tls_errors.append(str(e))
            self._cond.notify_all()

    def _add(self, req):
        with self._cond:
            self._requests.append(req)
            self._cond.notify_all()

    def _done(self, req):
        with self._cond:
            self._cond.notify_all()
        cb = self.on_request
        if cb:
            try:
                cb(req)
            except Exception:
                traceback.print_exc()

    def _wait_unstalled(self):
        with self._cond:
            while self._mode[0] == "stall" and not self._closed:
                self._cond.wait(0.25)
            return self._mode

    def _take_fail_next(self, req):
        with self._cond:
            n, status, which = self._fail
            if n > 0 and (which == "any" or which == req.signal or
                          (which in ("intake", "otlp") and (which == "otlp") == req.is_otlp)):
                self._fail[0] -= 1
                return status
            return None

    def _sleep(self, seconds):
        deadline = time.monotonic() + float(seconds or 0)
        with self._cond:
            while not self._closed and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())


def make_test_ca(dirpath):
    """Create throwaway certificates with the openssl CLI in dirpath. Returns paths:
    ca, ca_key, cert, key (server cert for localhost/127.0.0.1/::1 signed by ca),
    wrong_ca, wrong_ca_key (an unrelated CA), wronghost_cert, wronghost_key
    (for otherhost.example only, signed by ca). Keys are EC P-256, PEM."""
    os.makedirs(dirpath, exist_ok=True)
    p = lambda name: os.path.join(dirpath, name)  # noqa: E731

    def run(*args):
        r = subprocess.run(["openssl", *args], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError("openssl %s failed: %s" % (" ".join(args), r.stderr))

    def cnf(name, cn, ext):
        with open(p(name), "w") as f:
            f.write("[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = %s\n[ext]\n%s\n"
                    % (cn, ext))
        return p(name)

    ca_ext = ("basicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n"
              "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid:always\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def ca(name, cn):
        run("req", "-x509", *ec, "-keyout", p(name + ".key"), "-out", p(name + ".pem"),
            "-days", "3650", "-config", cnf(name + ".cnf", cn, ca_ext), "-extensions", "ext")

    def leaf(name, cn, san, ca_name):
        ext = ("basicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature,keyEncipherment\n"
               "extendedKeyUsage = serverAuth\nsubjectAltName = %s\n"
               "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid,issuer\n" % san)
        c = cnf(name + ".cnf", cn, ext)
        run("req", "-new", *ec, "-keyout", p(name + ".key"), "-out", p(name + ".csr"), "-config", c)
        serial = str(int.from_bytes(os.urandom(8), "big"))
        run("x509", "-req", "-in", p(name + ".csr"), "-CA", p(ca_name + ".pem"),
            "-CAkey", p(ca_name + ".key"), "-set_serial", serial,
            "-days", "825", "-sha256", "-extfile", c, "-extensions", "ext", "-out", p(name + ".pem"))

    ca("ca", "apm-ext test CA")
    ca("wrong_ca", "apm-ext wrong CA")
    leaf("server", "localhost", "DNS:localhost,IP:127.0.0.1,IP:::1", "ca")
    leaf("wronghost", "otherhost.example", "DNS:otherhost.example", "ca")
    return dict(ca=p("ca.pem"), ca_key=p("ca.key"), cert=p("server.pem"), key=p("server.key"),
                wrong_ca=p("wrong_ca.pem"), wrong_ca_key=p("wrong_ca.key"),
                wronghost_cert=p("wronghost.pem"), wronghost_key=p("wronghost.key"))


def main():
    ap = argparse.ArgumentParser(description="Fake Elastic APM server")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8200)
    ap.add_argument("--token")
    ap.add_argument("--api-key")
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    a = ap.parse_args()

    def show(req):
        for kind, obj in req.lines:
            print(json.dumps({kind: obj}, separators=(",", ":")), flush=True)
        if req.is_otlp:
            for item in req.otlp_items:
                item = {k: v for k, v in item.items() if k != "resource"}
                print(json.dumps({"otlp_" + req.signal: item}, separators=(",", ":"),
                                 default=repr), flush=True)
        if req.errors or not (req.is_intake or req.is_otlp):
            sys.stderr.write("fake_apm: %r %s\n" % (req, req.errors[:5]))

    apm = FakeAPM(token=a.token, api_key=a.api_key, tls=a.tls, host=a.host, port=a.port)
    apm.on_request = show
    sys.stderr.write("fake_apm: listening on %s\n" % apm.url)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        apm.close()


if __name__ == "__main__":
    main()
