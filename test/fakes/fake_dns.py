#!/usr/bin/env python3
"""A tiny fake DNS server over UDP for tests (Python stdlib only).

    dns = FakeDNS({"apm.example": ["127.0.0.1", "::1"]}, ttl=30)
    ... point a resolver at dns.host:dns.port ...
    dns.set_mode("slow", 800)          # answer each query 800 ms late
    dns.set_mode("never")              # swallow queries (a resolver that times out)
    dns.set_mode("ok")
    dns.wait_for(lambda d: len(d.queries) >= 2, timeout=5)
    dns.close()

Answers A (1) and AAAA (28) queries for the names in `records` ({name:
[address, ...]}; IPv4 addresses answer A, IPv6 ones AAAA) with the given
TTL, authoritative, recursion available. A known name without an address of
the asked type gets NOERROR with no answer (NODATA); an unknown name gets
NXDOMAIN; any other query type NOERROR with no answer; a packet that is not
one standard query (QDCOUNT 1) FORMERR, or nothing when it cannot be parsed
at all. Names compare case-insensitively, with or without the final dot.
An answer that would exceed 512 bytes is sent truncated (TC set, no
records), as a UDP server without EDNS does.

Modes (set_mode, thread-safe, any time; applies to queries received after):
  'ok'               answer at once
  'slow', ms         answer each query `ms` milliseconds after it arrived
  'never'            record the query, never answer
  'servfail'         answer SERVFAIL

Recorded: .queries -> [Query] with name (lower-case, no final dot), qtype
(number), qtype_name ('A', 'AAAA', or the number as text), id, client
(host, port), t (time.monotonic() on arrival), answered (time.monotonic()
of the answer, None if none was sent), rcode (None if unanswered),
mode (the mode it met). .malformed counts packets that could not be parsed.
records, ttl can be changed at any time (dns.records["x"] = [...]).

python3 test/fakes/fake_dns.py --selftest   runs the self-test; last line "N passed, N failed".
python3 test/fakes/fake_dns.py --port 5353 NAME=ADDR[,ADDR...]...   serves until killed.
"""

import argparse
import ipaddress
import socket
import struct
import sys
import threading
import time

__all__ = ["FakeDNS", "Query", "QTYPE_A", "QTYPE_AAAA"]

QTYPE_A = 1
QTYPE_AAAA = 28
QCLASS_IN = 1
RCODE_OK, RCODE_FORMERR, RCODE_SERVFAIL, RCODE_NXDOMAIN, RCODE_NOTIMP = 0, 1, 2, 3, 4
UDP_MAX = 512
_TYPE_NAMES = {QTYPE_A: "A", QTYPE_AAAA: "AAAA", 5: "CNAME", 15: "MX", 16: "TXT",
               33: "SRV", 255: "ANY"}


def _norm(name):
    return name.rstrip(".").lower()


class Query:
    """One query the fake received."""

    def __init__(self, name, qtype, qid, client, t, mode):
        self.name, self.qtype, self.id, self.client, self.t = name, qtype, qid, client, t
        self.mode = mode
        self.answered = None
        self.rcode = None

    @property
    def qtype_name(self):
        return _TYPE_NAMES.get(self.qtype, str(self.qtype))

    def __repr__(self):
        return "<Query %s %s id=%d mode=%s rcode=%s>" % (self.name, self.qtype_name, self.id,
                                                        self.mode, self.rcode)


class _Malformed(Exception):
    pass


def parse_query(pkt):
    """(id, flags, qname, qtype, qclass, question bytes end) of a DNS query.
    Raises _Malformed (with .qid when the header could be read)."""
    if len(pkt) < 12:
        raise _Malformed("short header")
    qid, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", pkt[:12])
    e = _Malformed("bad query")
    e.qid, e.flags = qid, flags
    if flags & 0x8000 or qd != 1 or (flags >> 11) & 0xF != 0:
        raise e                          # a response, not one question, or not QUERY
    labels, pos = [], 12
    while True:
        if pos >= len(pkt):
            raise e
        n = pkt[pos]
        pos += 1
        if n == 0:
            break
        if n & 0xC0 or pos + n > len(pkt):   # no compression in a question
            raise e
        labels.append(pkt[pos:pos + n])
        pos += n
    if pos + 4 > len(pkt) or sum(len(x) + 1 for x in labels) > 255:
        raise e
    qtype, qclass = struct.unpack("!HH", pkt[pos:pos + 4])
    try:
        name = ".".join(x.decode("ascii") for x in labels)
    except UnicodeDecodeError:
        raise e
    return qid, flags, name, qtype, qclass, pos + 4


class FakeDNS:
    """See the module docstring."""

    def __init__(self, records=None, ttl=60, host="127.0.0.1", port=0):
        self.records = {_norm(k): list(v) for k, v in (records or {}).items()}
        self.ttl = ttl
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(fam, socket.SOCK_DGRAM)
        self._sock.bind((host, port))
        self._sock.settimeout(0.2)          # lets close() end the serving thread
        self.host, self.port = self._sock.getsockname()[:2]
        self._cv = threading.Condition()
        self._mode = ("ok", None)
        self._closed = False
        self._timers = []
        self.queries = []
        self.malformed = 0
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name="fake-dns:%d" % self.port)
        self._thread.start()

    # ---- control
    def set_mode(self, mode, arg=None):
        if mode not in ("ok", "slow", "never", "servfail"):
            raise ValueError("unknown mode %r" % mode)
        if mode == "slow" and (arg is None or arg < 0):
            raise ValueError("slow needs a delay in ms")
        with self._cv:
            self._mode = (mode, arg)
            self._cv.notify_all()

    @property
    def mode(self):
        return self._mode

    @property
    def address(self):
        return "%s:%d" % (("[%s]" % self.host) if ":" in self.host else self.host, self.port)

    def wait_for(self, pred, timeout=5.0):
        """Wait until pred(self) is true (re-checked on every query and
        answer); returns False after timeout seconds."""
        end = time.monotonic() + timeout
        with self._cv:
            while not pred(self):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
            return True

    def close(self):
        with self._cv:
            self._closed = True
            timers, self._timers = self._timers, []
            self._cv.notify_all()
        for tm in timers:
            tm.cancel()
        try:
            self._sock.close()
        except OSError:
            pass
        self._thread.join(2)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    # ---- serving
    def _serve(self):
        while True:
            try:
                pkt, client = self._sock.recvfrom(65535)
            except socket.timeout:
                if self._closed:
                    return
                continue
            except OSError:
                return                      # closed
            with self._cv:
                if self._closed:
                    return
                mode = self._mode
            try:
                qid, flags, name, qtype, qclass, qend = parse_query(pkt)
            except _Malformed as e:
                with self._cv:
                    self.malformed += 1
                    self._cv.notify_all()
                if hasattr(e, "qid"):        # a header: tell the client
                    self._sendto(struct.pack("!HHHHHH", e.qid,
                                             0x8000 | (e.flags & 0x0100) | 0x0080 |
                                             RCODE_FORMERR, 0, 0, 0, 0), client)
                continue
            q = Query(_norm(name), qtype, qid, client, time.monotonic(), mode[0])
            with self._cv:
                self.queries.append(q)
                self._cv.notify_all()
            if mode[0] == "never":
                continue
            answer = self._answer(pkt[:qend], qid, flags, q, qclass, mode[0] == "servfail")
            if mode[0] == "slow":
                delay = mode[1] / 1000.0 - (time.monotonic() - q.t)
                tm = threading.Timer(max(0.0, delay), self._reply, args=(answer, client, q))
                tm.daemon = True
                with self._cv:
                    if self._closed:
                        return
                    self._timers = [x for x in self._timers if x.is_alive()] + [tm]
                tm.start()
            else:
                self._reply(answer, client, q)

    def _answer(self, question, qid, flags, q, qclass, servfail):
        """The response packet: (bytes, rcode)."""
        rd = flags & 0x0100
        answers = []
        if servfail:
            rcode = RCODE_SERVFAIL
        elif qclass != QCLASS_IN:
            rcode = RCODE_NOTIMP
        else:
            with self._cv:
                addrs = self.records.get(q.name)
                ttl = self.ttl
            if addrs is None:
                rcode = RCODE_NXDOMAIN
            else:
                rcode = RCODE_OK
                for a in addrs:
                    ip = ipaddress.ip_address(a)
                    if (q.qtype == QTYPE_A and ip.version == 4) or \
                            (q.qtype == QTYPE_AAAA and ip.version == 6):
                        rdata = ip.packed
                        # name: pointer to the question's name at offset 12
                        answers.append(struct.pack("!HHHIH", 0xC00C, q.qtype, QCLASS_IN,
                                                   ttl, len(rdata)) + rdata)
        # QR, AA, RD as asked, RA
        fl = 0x8000 | 0x0400 | rd | 0x0080 | rcode
        pkt = struct.pack("!HHHHHH", qid, fl, 1, len(answers), 0, 0) + question[12:] + \
            b"".join(answers)
        if len(pkt) > UDP_MAX:              # no EDNS: truncated, the client retries on TCP
            pkt = struct.pack("!HHHHHH", qid, fl | 0x0200, 1, 0, 0, 0) + question[12:]
        return pkt, rcode

    def _reply(self, answer, client, q):
        pkt, rcode = answer
        with self._cv:
            if self._closed:
                return
        with self._cv:   # recorded before it leaves: a client may look at once
            q.answered, q.rcode = time.monotonic(), rcode
            self._cv.notify_all()
        if not self._sendto(pkt, client):
            with self._cv:
                q.answered = q.rcode = None
                self._cv.notify_all()

    def _sendto(self, pkt, client):
        try:
            self._sock.sendto(pkt, client)
            return True
        except OSError:
            return False


# -------------------------------------------------------------------- self-test
# The client side below is written independently of the server's encoder:
# it builds queries and decodes answers (including compressed names) itself.

def _encode_query(name, qtype, qid=0x1234, rd=True):
    q = b"".join(bytes([len(x)]) + x.encode() for x in name.rstrip(".").split(".")) + b"\0"
    return struct.pack(">HHHHHH", qid, 0x0100 if rd else 0, 1, 0, 0, 0) + q + \
        struct.pack(">HH", qtype, 1)


def _read_name(pkt, pos):
    labels, jumped, end = [], False, None
    for _ in range(128):
        n = pkt[pos]
        if n & 0xC0 == 0xC0:
            if not jumped:
                end = pos + 2
            pos = ((n & 0x3F) << 8) | pkt[pos + 1]
            jumped = True
            continue
        pos += 1
        if n == 0:
            return ".".join(labels), (end if jumped else pos)
        labels.append(pkt[pos:pos + n].decode())
        pos += n
    raise ValueError("name loop")


def _decode(pkt):
    qid, fl, qd, an, ns, ar = struct.unpack(">HHHHHH", pkt[:12])
    pos = 12
    for _ in range(qd):
        _, pos = _read_name(pkt, pos)
        pos += 4
    out = []
    for _ in range(an):
        name, pos = _read_name(pkt, pos)
        typ, cls, ttl, rdlen = struct.unpack(">HHIH", pkt[pos:pos + 10])
        pos += 10
        rdata = pkt[pos:pos + rdlen]
        pos += rdlen
        addr = socket.inet_ntop(socket.AF_INET if typ == 1 else socket.AF_INET6, rdata) \
            if typ in (1, 28) else rdata
        out.append((name, typ, cls, ttl, addr))
    return {"id": qid, "qr": bool(fl & 0x8000), "aa": bool(fl & 0x0400),
            "tc": bool(fl & 0x0200), "rd": bool(fl & 0x0100), "ra": bool(fl & 0x0080),
            "rcode": fl & 0xF, "answers": out}


def _ask(dns, pkt, timeout=2.0):
    """Send one packet, return (decoded answer or None on timeout, seconds)."""
    fam = socket.AF_INET6 if ":" in dns.host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        t0 = time.monotonic()
        s.sendto(pkt, (dns.host, dns.port))
        try:
            data, _ = s.recvfrom(65535)
        except socket.timeout:
            return None, time.monotonic() - t0
        return _decode(data), time.monotonic() - t0


def _selftest():
    results = []

    def check(name, fn):
        try:
            fn()
            results.append((name, None))
            print("PASS %s" % name)
        except Exception as e:  # noqa: BLE001 - report every failure
            results.append((name, e))
            print("FAIL %s: %s: %s" % (name, type(e).__name__, e))

    recs = {"apm.example": ["10.1.2.3", "10.1.2.4", "2001:db8::7"],
            "v4only.example.": ["192.0.2.1"], "Mixed.Case.Example": ["198.51.100.9"],
            "many.example": ["10.0.%d.%d" % (i // 250, i % 250) for i in range(40)]}
    dns = FakeDNS(recs, ttl=42)

    def a_records():
        r, _ = _ask(dns, _encode_query("apm.example", QTYPE_A, qid=777))
        assert r and r["qr"] and r["aa"] and r["ra"] and r["rd"] and r["rcode"] == 0, r
        assert r["id"] == 777, r
        got = sorted(a[4] for a in r["answers"])
        assert got == ["10.1.2.3", "10.1.2.4"], got
        assert all(a[0] == "apm.example" and a[1] == 1 and a[2] == 1 and a[3] == 42
                   for a in r["answers"]), r["answers"]

    def aaaa_records():
        r, _ = _ask(dns, _encode_query("apm.example", QTYPE_AAAA))
        assert r["rcode"] == 0 and [a[4] for a in r["answers"]] == ["2001:db8::7"], r
        assert r["answers"][0][1] == 28 and r["answers"][0][3] == 42

    def nodata():
        r, _ = _ask(dns, _encode_query("v4only.example", QTYPE_AAAA))
        assert r["rcode"] == 0 and r["answers"] == [], r

    def nxdomain():
        r, _ = _ask(dns, _encode_query("nope.example", QTYPE_A))
        assert r["rcode"] == 3 and r["answers"] == [], r

    def case_and_dot():
        r, _ = _ask(dns, _encode_query("mixed.CASE.example.", QTYPE_A))
        assert [a[4] for a in r["answers"]] == ["198.51.100.9"], r

    def other_type():
        r, _ = _ask(dns, _encode_query("apm.example", 16))  # TXT
        assert r["rcode"] == 0 and r["answers"] == [], r

    def truncated():
        r, _ = _ask(dns, _encode_query("many.example", QTYPE_A))
        assert r["tc"] and r["answers"] == [], r

    def ttl_change():
        dns.ttl = 5
        dns.records["late.example"] = ["203.0.113.5"]
        r, _ = _ask(dns, _encode_query("late.example", QTYPE_A))
        assert r["answers"] == [("late.example", 1, 1, 5, "203.0.113.5")], r
        dns.ttl = 42

    def recorded():
        n = len(dns.queries)
        _ask(dns, _encode_query("apm.example", QTYPE_AAAA, qid=4242))
        q = dns.queries[n]
        assert (q.name, q.qtype, q.qtype_name, q.id, q.mode, q.rcode) == \
            ("apm.example", 28, "AAAA", 4242, "ok", 0), q
        assert q.answered is not None and q.answered >= q.t

    def malformed():
        before = dns.malformed
        r, _ = _ask(dns, b"\x12\x34\x01\x00\x00\x02\x00\x00\x00\x00\x00\x00", timeout=1)
        assert r is not None and r["rcode"] == 1 and r["id"] == 0x1234, r  # FORMERR
        fam = socket.AF_INET6 if ":" in dns.host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.sendto(b"\x01", (dns.host, dns.port))       # garbage: no answer
        assert dns.wait_for(lambda d: d.malformed >= before + 2, 2), dns.malformed
        r, _ = _ask(dns, _encode_query("apm.example", QTYPE_A))
        assert r and len(r["answers"]) == 2, "not serving after garbage: %r" % r

    def slow():
        dns.set_mode("slow", 300)
        r, took = _ask(dns, _encode_query("apm.example", QTYPE_A))
        dns.set_mode("ok")
        assert r and len(r["answers"]) == 2, r
        assert 0.29 <= took < 1.0, "slow 300 ms answered after %.3fs" % took
        q = dns.queries[-1]
        assert q.mode == "slow" and q.answered - q.t >= 0.29, q

    def slow_parallel():
        # two queries during one slow period: both late, neither waits for the other
        dns.set_mode("slow", 300)
        out = []
        ths = [threading.Thread(target=lambda: out.append(
            _ask(dns, _encode_query("apm.example", QTYPE_A))[1])) for _ in range(2)]
        for th in ths:
            th.start()
        for th in ths:
            th.join(5)
        dns.set_mode("ok")
        assert len(out) == 2 and all(0.29 <= x < 0.55 for x in out), out

    def never():
        n = len(dns.queries)
        dns.set_mode("never")
        r, took = _ask(dns, _encode_query("apm.example", QTYPE_A), timeout=0.3)
        assert r is None, "answered in never mode: %r" % r
        assert dns.wait_for(lambda d: len(d.queries) > n, 1)
        q = dns.queries[n]
        assert q.mode == "never" and q.answered is None and q.rcode is None, q
        dns.set_mode("ok")
        r, _ = _ask(dns, _encode_query("apm.example", QTYPE_A))
        assert r and len(r["answers"]) == 2, "no answer after never -> ok: %r" % r

    def servfail():
        dns.set_mode("servfail")
        r, _ = _ask(dns, _encode_query("apm.example", QTYPE_A))
        dns.set_mode("ok")
        assert r["rcode"] == 2 and r["answers"] == [], r

    def bad_mode():
        for args in (("sometimes",), ("slow",), ("slow", -1)):
            try:
                dns.set_mode(*args)
            except ValueError:
                continue
            raise AssertionError("set_mode%r accepted" % (args,))

    def ipv6_listener():
        try:
            d6 = FakeDNS({"six.example": ["::1"]}, host="::1")
        except OSError:
            return  # no IPv6 on this host: nothing to check
        try:
            r, _ = _ask(d6, _encode_query("six.example", QTYPE_AAAA))
            assert [a[4] for a in r["answers"]] == ["::1"], r
        finally:
            d6.close()

    for name, fn in (("a_records", a_records), ("aaaa_records", aaaa_records),
                     ("nodata", nodata), ("nxdomain", nxdomain),
                     ("case_and_final_dot", case_and_dot), ("other_type", other_type),
                     ("truncated_over_512", truncated), ("ttl_and_records_change", ttl_change),
                     ("queries_recorded", recorded), ("malformed", malformed),
                     ("slow", slow), ("slow_parallel", slow_parallel), ("never", never),
                     ("servfail", servfail), ("bad_mode", bad_mode),
                     ("ipv6_listener", ipv6_listener)):
        check(name, fn)
    dns.close()
    failed = sum(1 for _, e in results if e is not None)
    print("%d passed, %d failed" % (len(results) - failed, failed))
    return 1 if failed else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description="tiny fake DNS server (UDP, A/AAAA)")
    ap.add_argument("--selftest", action="store_true")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5353)
    ap.add_argument("--ttl", type=int, default=60)
    ap.add_argument("records", nargs="*", metavar="NAME=ADDR[,ADDR...]")
    a = ap.parse_args(argv)
    if a.selftest:
        return _selftest()
    recs = {}
    for r in a.records:
        k, _, v = r.partition("=")
        recs[k] = [x for x in v.split(",") if x]
    dns = FakeDNS(recs, a.ttl, a.host, a.port)
    sys.stderr.write("fake_dns: serving %d names on %s (udp)\n" % (len(recs), dns.address))
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        dns.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
