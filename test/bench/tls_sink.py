#!/usr/bin/env python3
"""An HTTPS sink, the TLS APM server of test/bench/bench.py: the same contract as
test/bench/sink.c (which has no TLS: the project may not depend on OpenSSL), in
Python's ssl (OpenSSL underneath) for the bench only.

    python3 test/bench/tls_sink.py --cert CERT --key KEY [--port P]

Binds 127.0.0.1:P and, if it can, [::1]:P (P 0: any free port; "localhost"
may resolve to either), prints the port on stdout and serves until killed.
Reads requests (Content-Length or chunked bodies, pipelined, keep-alive) and
answers each one "202 Accepted" with an empty body as soon as its body is in.
Bodies are counted, never stored. GET /__sink/stats answers 200 with
{"requests","body_bytes","connections","handshakes","tls_errors","suites",
"resumed","curves"} (not counted itself; suites: {"<version> <cipher>":
handshakes}; resumed: handshakes that resumed a session; curves: {"<ECDHE
group>": full handshakes}).
GET /__sink/handshakes answers the last 10000 handshakes, oldest first:
[[t_accept, t_done, "<version> <cipher>", peer port, resumed, group], ...],
times in CLOCK_REALTIME ns (time.time_ns()): when the connection was
accepted and when the server side of the handshake completed; resumed:
true when the client's session was resumed (no certificate, no ECDHE);
group: the ECDHE group of the ServerKeyExchange ("x25519", "secp256r1"...;
null when resumed).
GET /__sink/drop closes every other connection (with close_notify), as a
server whose idle connections die while the Lambda sandbox is frozen, and
answers {"dropped": n}.
Without --cert it serves plain HTTP (to tell Python's cost from TLS's).

Like the APM Server (Go's crypto/tls): the server's order picks the suite and
the ECDHE group (OP_CIPHER_SERVER_PREFERENCE: OpenSSL's group list starts
with X25519; the suites in Go's order, AES-128-GCM first), and every close
sends close_notify (SSL_shutdown), which also keeps the session in
OpenSSL's cache: one freed without it is forgotten. Unlike Go, which resumes
with session tickets only (BearSSL 0.6 sends none), OpenSSL also keeps a
session-id cache: that is what a resumption here uses.

One thread, one poll() loop, non-blocking sockets; TLS runs over memory
BIOs, so one recv() takes in many records (a socket-backed SSLSocket makes
two read() calls per record); the body bytes are skipped by index
arithmetic, never copied, so that the cost per byte is mostly OpenSSL's
decryption.
"""
import argparse
import json
import select
import socket
import ssl
import sys
import time

HEAD_MAX = 16384
RX = 1 << 18
KEEP_HANDSHAKES = 10000

S_HEAD, S_BODY, S_CSIZE, S_CDATA, S_CCRLF, S_TRAILER = range(6)

# Go's crypto/tls server order for TLS 1.2 (on AES hardware), in OpenSSL's names
GO_SUITES = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
             "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
             "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")
GROUPS = {0x17: "secp256r1", 0x18: "secp384r1", 0x19: "secp521r1", 0x1d: "x25519",
          0x1e: "x448"}

stats = {"requests": 0, "body_bytes": 0, "connections": 0, "handshakes": 0,
         "tls_errors": 0, "suites": {}, "resumed": 0, "curves": {}}
handshakes = []
drop_others = None      # set by main(): f(conn) -> how many other connections it closed


def ske_group(flight):
    """The named group of the ServerKeyExchange in the server's handshake
    bytes (TLS records as written), or None (none: a resumption)."""
    hs, i = bytearray(), 0
    while i + 5 <= len(flight):
        rtype, rlen = flight[i], int.from_bytes(flight[i + 3:i + 5], "big")
        if rtype == 20:         # ChangeCipherSpec: what follows is encrypted
            break
        if rtype == 22:
            hs += flight[i + 5:i + 5 + rlen]
        i += 5 + rlen
    j = 0
    while j + 4 <= len(hs):
        mtype, mlen = hs[j], int.from_bytes(hs[j + 1:j + 4], "big")
        body = hs[j + 4:j + 4 + mlen]
        if mtype == 12 and len(body) >= 3 and body[0] == 3:    # named_curve
            g = int.from_bytes(body[1:3], "big")
            return GROUPS.get(g, "0x%04x" % g)
        j += 4 + mlen
    return None


class Conn:
    __slots__ = ("sock", "tls", "bio_in", "bio_out", "shaking", "state", "left", "part",
                 "out", "close_after", "is_stats", "dead", "t_accept", "peer", "flight")

    def __init__(self, sock, ctx):
        self.t_accept = time.time_ns()
        self.peer = sock.getpeername()[1]
        self.sock, self.tls = sock, None
        if ctx is not None:     # TLS over memory BIOs: one recv() for many records
            self.bio_in, self.bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = ctx.wrap_bio(self.bio_in, self.bio_out, server_side=True)
        self.shaking = ctx is not None
        self.flight = bytearray()       # what the server wrote during the handshake
        self.state, self.left, self.part = S_HEAD, 0, b""
        self.out = bytearray()          # bytes for the socket (ciphertext under TLS)
        self.close_after = self.is_stats = self.dead = False


def answer(c, data):
    if c.tls is not None:
        c.tls.write(data)
        c.out += c.bio_out.read()
    else:
        c.out += data


def request_done(c):
    if c.is_stats:
        body = json.dumps(stats if c.is_stats == 1 else handshakes if c.is_stats == 2 else
                          {"dropped": drop_others(c)}).encode()
        answer(c, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n%s\r\n" % (
                      len(body), b"Connection: close\r\n" if c.close_after else b"") + body)
    else:
        stats["requests"] += 1
        answer(c, b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n%s\r\n" % (
            b"Connection: close\r\n" if c.close_after else b""))
    c.state = S_HEAD


def head_done(c, head):
    lines = head.split(b"\r\n")
    first = lines[0]
    hdrs = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(b":")
        hdrs[k.strip().lower()] = v.strip().lower()
    c.is_stats = 1 if first.startswith(b"GET /__sink/stats ") else \
        2 if first.startswith(b"GET /__sink/handshakes ") else \
        3 if first.startswith(b"GET /__sink/drop ") else 0
    conn = hdrs.get(b"connection", b"")
    c.close_after = conn.startswith(b"close") or (
        first.endswith(b"HTTP/1.0") and not conn.startswith(b"keep-alive"))
    if hdrs.get(b"expect", b"").startswith(b"100-continue"):
        answer(c, b"HTTP/1.1 100 Continue\r\n\r\n")
    if b"chunked" in hdrs.get(b"transfer-encoding", b""):
        c.state = S_CSIZE
        return
    c.left = int(hdrs.get(b"content-length") or 0)
    if c.left == 0:
        request_done(c)
    else:
        c.state = S_BODY


def feed(c, buf, i, n):
    """Parse buf[i:n]; a line cut by the end of the data waits in c.part."""
    if c.part:
        buf = c.part + bytes(buf[i:n])
        c.part, i, n = b"", 0, len(buf)
    while i < n:
        st = c.state
        if st == S_BODY or st == S_CDATA:
            k = n - i
            if k > c.left:
                k = c.left
            stats["body_bytes"] += k
            c.left -= k
            i += k
            if c.left == 0:
                if st == S_BODY:
                    request_done(c)
                else:
                    c.state = S_CCRLF
        elif st == S_HEAD:
            while i < n and buf[i] in (13, 10):     # stray CRLF between requests
                i += 1
            if i == n:
                break
            j = buf.find(b"\r\n\r\n", i, n)
            if j < 0:
                if n - i >= HEAD_MAX:
                    raise ValueError("head too long")
                c.part = bytes(buf[i:n])
                return
            head_done(c, bytes(buf[i:j]))
            i = j + 4
        elif st == S_CSIZE or st == S_TRAILER:
            j = buf.find(b"\r\n", i, n)
            if j < 0:
                if n - i >= HEAD_MAX:
                    raise ValueError("line too long")
                c.part = bytes(buf[i:n])
                return
            line = bytes(buf[i:j])
            i = j + 2
            if st == S_TRAILER:
                if not line:
                    request_done(c)
            else:
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    c.state = S_TRAILER
                else:
                    c.state, c.left = S_CDATA, size
        else:  # S_CCRLF
            if n - i < 2:
                c.part = bytes(buf[i:n])
                return
            if buf[i:i + 2] != b"\r\n":
                raise ValueError("no CRLF after chunk data")
            i += 2
            c.state = S_CSIZE


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    ctx = None
    if a.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # The server's preference, as the APM Server (Go's crypto/tls) has it:
        # Go's suite order (AES-128-GCM first on AES hardware) and OpenSSL's
        # group order (X25519 first, as Go's). Without the option OpenSSL
        # takes the client's group order (BearSSL: P-256 first).
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        ctx.set_ciphers(GO_SUITES)
        ctx.load_cert_chain(a.cert, a.key)
    listeners = []
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", a.port))
    port = ls.getsockname()[1]
    listeners.append(ls)
    if socket.has_ipv6:
        try:
            l6 = socket.socket(socket.AF_INET6)
            l6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            l6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            l6.bind(("::1", port))
            listeners.append(l6)
        except OSError:
            pass
    poller = select.poll()
    lfds = {}
    for s in listeners:
        s.listen(128)
        s.setblocking(False)
        lfds[s.fileno()] = s
        poller.register(s, select.POLLIN)
    sys.stdout.write("%d\n" % port)
    sys.stdout.flush()
    conns = {}
    rx = bytearray(RX)          # what recv() gets (ciphertext under TLS)
    rxv = memoryview(rx)
    plain = bytearray(RX)       # what the TLS layer decrypts
    plainv = memoryview(plain)

    def close(c):
        """Close a connection; under TLS with close_notify first (as Go's
        Conn.Close does), which also keeps its session resumable."""
        c.dead = True
        if c.tls is not None and not c.shaking:
            try:
                c.tls.unwrap()      # writes close_notify; the peer's is not awaited
            except (ssl.SSLError, OSError):
                pass
            c.out += c.bio_out.read()
            try:
                c.sock.send(c.out)
            except OSError:
                pass
        fd = c.sock.fileno()
        conns.pop(fd, None)
        try:
            poller.unregister(fd)
        except (KeyError, ValueError):
            pass
        c.sock.close()

    def flush(c):
        while c.out:
            try:
                w = c.sock.send(c.out)
            except BlockingIOError:
                return
            del c.out[:w]

    def tls_step(c):
        """Handshake and decrypt what the BIO holds. False: the connection died."""
        t = c.tls
        if c.shaking:
            try:
                t.do_handshake()
            except ssl.SSLWantReadError:
                return True
            except ssl.SSLError:
                stats["tls_errors"] += 1
                return False
            finally:
                out = c.bio_out.read()
                c.out += out
                c.flight += out
            c.shaking = False
            t_done = time.time_ns()
            suite = "%s %s" % (t.version(), t.cipher()[0])
            reused = bool(t.session_reused)
            group = None if reused else ske_group(c.flight)
            c.flight = None
            stats["handshakes"] += 1
            stats["suites"][suite] = stats["suites"].get(suite, 0) + 1
            stats["resumed"] += reused
            if group:
                stats["curves"][group] = stats["curves"].get(group, 0) + 1
            handshakes.append((c.t_accept, t_done, suite, c.peer, reused, group))
            if len(handshakes) > KEEP_HANDSHAKES:
                del handshakes[:len(handshakes) - KEEP_HANDSHAKES]
        while True:
            try:
                n = t.read(RX, plainv)
            except ssl.SSLWantReadError:
                return True
            except ssl.SSLError:        # close_notify (SSLZeroReturnError) included
                return False
            if not n:
                return False
            feed(c, plain, 0, n)

    def service(c):
        while True:
            try:
                n = c.sock.recv_into(rxv, RX)
            except BlockingIOError:
                break
            except OSError:
                close(c)
                return
            if not n:
                close(c)
                return
            try:
                if c.tls is None:
                    feed(c, rx, 0, n)
                else:
                    c.bio_in.write(rxv[:n])
                    if not tls_step(c):
                        flush(c)
                        close(c)
                        return
            except ValueError:
                close(c)
                return
            if n < RX:
                break
        try:
            flush(c)
        except OSError:
            close(c)
            return
        if c.close_after and not c.out and c.state == S_HEAD and not c.part:
            close(c)
            return
        poller.modify(c.sock, select.POLLIN | (select.POLLOUT if c.out else 0))

    def drop(keep):
        n = 0
        for other in list(conns.values()):
            if other is not keep:
                close(other)
                n += 1
        return n
    global drop_others
    drop_others = drop

    while True:
        for fd, ev in poller.poll():
            if fd in lfds:
                while True:
                    try:
                        s, _ = lfds[fd].accept()
                    except (BlockingIOError, OSError):
                        break
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    s.setblocking(False)
                    c = Conn(s, ctx)
                    conns[s.fileno()] = c
                    stats["connections"] += 1
                    poller.register(s, select.POLLIN)
                    service(c)      # the ClientHello may be in already
            elif fd in conns:
                service(conns[fd])


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
