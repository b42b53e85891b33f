#!/usr/bin/env python3
"""Fake Elastic APM server for apm-ext tests (Python 3.11 stdlib only).

    apm = FakeAPM(token=None, api_key=None, tls=None, host='127.0.0.1', port=0)
    ... point the extension at apm.url ...
    apm.wait_for(lambda a: a.count('transaction') >= 1, timeout=5)
    apm.close()

Standalone: python3 test/fake_apm.py --port 8200 [--token T] [--api-key K]
            [--tls CERT KEY]   serves until killed, prints event lines to stdout.

See the class docstring for modes and the recorded request format.
"""
import argparse
import gzip
import http.server
import json
import os
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
import traceback
import zlib
from urllib.parse import urlsplit, parse_qs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jsonschema_mini  # noqa: E402

KINDS = ("metadata", "transaction", "span", "error", "metricset", "log")
SCHEMA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          os.pardir, "shared", "apm-intake-spec", "v2")
SERVER_INFO = {"build_date": "2024-01-01T00:00:00Z", "build_sha": "abc",
               "publish_ready": True, "version": "8.15.0"}
_schemas = None
_schemas_lock = threading.Lock()


def load_schemas(schema_dir=None):
    """{kind: schema} for the five kinds that have a schema file (cached)."""
    global _schemas
    with _schemas_lock:
        if _schemas is None:
            d = os.path.normpath(schema_dir or os.environ.get("APM_INTAKE_SPEC_DIR") or SCHEMA_DIR)
            out = {}
            for kind in ("metadata", "transaction", "span", "error", "metricset"):
                with open(os.path.join(d, kind + ".json"), encoding="utf-8") as f:
                    out[kind] = json.load(f)
            _schemas = out
        return _schemas


def _no_constants(name):
    raise ValueError("invalid JSON constant %s" % name)


def parse_ndjson(data):
    """Validate a decoded intake body. Returns (lines, errors);
    lines = [(kind, obj)], errors = ['line N: ...']."""
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
        if kind == "log":
            if not isinstance(obj, dict) or not ("message" in obj or "@timestamp" in obj):
                errors.append("line %d: log event must be an object with message or @timestamp" % n)
        else:
            errors.extend("line %d (%s): %s" % (n, kind, e)
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

    @property
    def is_intake(self):
        return self.path.endswith("/intake/v2/events")

    def __repr__(self):
        return "<Request %s %s%s conn=%d status=%s lines=%d errors=%d>" % (
            self.method, self.path, "?" + self.query if self.query else "", self.conn_id,
            self.status, len(self.lines), len(self.errors))


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeAPM/1.0"

    # ---- connection management
    def setup(self):
        fake = self.server.fake
        try:  # answers go out at once (no Nagle delay between head and body)
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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

        known = (req.is_intake or req.path.endswith("/config/v1/agents")
                 or req.path.endswith("/") or req.path == "")  # "<prefix>/" = server info
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
        status = fake._take_fail_next() if req.is_intake else None
        if status is None and mode == "status" and known:
            status = arg
        if status is not None:
            return self._reply(req, status, {"accepted": 0, "errors": [
                {"message": "fake_apm: forced status %d" % status}]})
        if mode == "slow":
            fake._sleep(arg)
        if not known or (req.is_intake and req.method != "POST"):
            return self._reply(req, 404, {"error": "404 page not found"})
        if not fake._auth_ok(req.headers.get("Authorization")):
            return self._reply(req, 401, {"accepted": 0, "errors": [
                {"message": "authentication failed: missing or invalid Authorization header"}]})
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
        self.send_response(status)
        if body:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, addr, fake, ssl_context, family):
        self.address_family = family
        self.fake, self.ssl_context = fake, ssl_context
        super().__init__(addr, _Handler)

    def handle_error(self, request, client_address):
        e = sys.exc_info()[1]
        if not isinstance(e, (OSError, ssl.SSLError)):
            traceback.print_exc()


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
    fail_next(n, status): the next n intake requests get `status`, then normal again.
    drop_connections(): close every open client connection now.

    Recorded: .requests -> [Request] with method, path, query, params, headers
    (case-insensitive dict), body (raw bytes, still encoded), decoded, lines [(kind, obj)],
    errors (decoding/validation), status (None = never answered), io_error (socket-level
    failure, e.g. client went away; such requests do not count in events()), chunked,
    t_start, t_end (time.monotonic()), conn_id, is_intake. A request is recorded as soon
    as its headers are in (status None until answered).
    Auth (token/api_key) is enforced on intake, config and GET <prefix>/ alike (401).
    """

    def __init__(self, token=None, api_key=None, tls=None, host="127.0.0.1", port=0):
        load_schemas()
        self.token, self.api_key, self.host = token, api_key, host
        self.tls = tls
        self._ctx = None
        if tls:
            self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ctx.load_cert_chain(tls[0], tls[1])
        self._family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._cond = threading.Condition()
        self._mode = ("ok", None)
        self._fail = [0, None]
        self._closed = False
        self._requests = []
        self._conns = {}           # conn_id -> [sockets]
        self._next_conn = 0
        self.tls_errors = []       # TLS handshake failures seen (strings)
        self.on_request = None     # optional callback(Request) after each answered request
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

    def fail_next(self, n, status=503):
        with self._cond:
            self._fail = [n, status]

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

    def _take_fail_next(self):
        with self._cond:
            if self._fail[0] > 0:
                self._fail[0] -= 1
                return self._fail[1]
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
        if req.errors or not req.is_intake:
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
