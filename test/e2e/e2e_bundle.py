"""End-to-end scenarios for the system CA bundle's lazy trust anchors.

    python3 test/e2e/e2e.py -k bundle_

apm-ext indexes the system bundle (the first of
/etc/pki/tls/certs/ca-bundle.crt, /etc/ssl/certs/ca-certificates.crt that
exists) by a hash of each certificate's subject when it loads its trust
anchors, and decodes a bundle certificate only when a server's chain names
it as an issuer (tls_index_block, tls_bundle_fetch, the lz_* wrapper in
apm-ext.c). The TLS scenarios of e2e_tls.py give their CA in
ELASTIC_APM_SERVER_CA_CERT_FILE (decoded at once); these put a test root
into the system bundle itself, with no CA variable set.

The bundle: the machine's own, with the scenario's blocks inserted in the
middle (so some 140 other certificates are indexed around them), written to
a temporary file that is bind-mounted over the bundle path in a mount
namespace of the extension's own; the machine's /etc is never changed. The
wrapper is e2e_dns.py's (every step an exec: FakeLambda starts, freezes and
signals the extension itself; check_process() asserts that):

  <tmp>/wrapper   exec unshare -m sh -c 'mount --bind "$1" "$2" && exec "$3"'
                      sh <tmp>/bundle.pem <bundle path> <tmp>/bin/apm-lambda-extension

Without root, unshare or mount, or when the bind mount is refused, or under
valgrind (APM_E2E_UNDER_VALGRIND: the binary is started here, not through
the valgrind wrapper), a scenario raises Skip.

Certificates (openssl CLI, made once per run):
  root       RSA-2048 CA "apm-ext bundle test root"   (the one put in the bundle)
  inter      EC P-256 CA "apm-ext bundle test intermediate", signed by root
  leaf       EC P-256 localhost / 127.0.0.1 / ::1, signed by inter;
             the fake APM server sends leaf + inter (the root only in the bundle)
  other      an unrelated CA, and other_leaf (localhost) signed by it
  impostor   RSA-2048 CA with root's very subject but its own key, and
             impostor_leaf (localhost) signed by it

What the extension reads of the bundle is watched with inotify (IN_OPEN on
the temporary file; the bind mount is the same inode): the lazy path reads it
once to index it and once more for the one issuer a chain names, and never
again once that anchor is decoded (kept for every later handshake).

Scenarios (all names start with bundle_):
  bundle_chain_delivered            (a) leaf <- inter <- root, root only in the bundle:
                                    delivered over https before /next; every block
                                    of the bundle indexed; read twice (index + fetch)
  bundle_unknown_ca_refused         (b) a chain from a CA not in the bundle: refused,
                                    nothing delivered, reason logged, nothing fetched
  bundle_impostor_refused           (b) a chain whose issuer has root's subject but
                                    another key: the bundle's root is fetched, the
                                    signature fails, refused
  bundle_corrupt_blocks_tolerated   (c) a garbage block and a cut copy of root (same
                                    subject) before the good root: delivered, the bad
                                    ones logged
  bundle_corrupt_issuer_fails_cleanly (c) the issuer's only block is cut: refused, one
                                    warning for it over every handshake attempt,
                                    invocations released, exit 0
  bundle_anchor_kept                (d) after the server dropped the connection while
                                    frozen, and again after a server restart that
                                    forgets every session (a full handshake for sure):
                                    delivered, verified with the anchor decoded the
                                    first time (the bundle not read again)
"""

import atexit
import ctypes
import os
import re
import select
import shlex
import shutil
import ssl
import struct
import subprocess
import tempfile
import threading
import time

from e2e import (scenario, Skip, agent_send, agent_flush, agent_payload, first_delivery,
                 check_forwarded, log_has)
from e2e_dns import check_process, poll_until

BUNDLES = ("/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/certs/ca-certificates.crt")
CA_FILE_VAR = "ELASTIC_APM_SERVER_CA_CERT_FILE"
CA_PEM_VAR = "ELASTIC_APM_LAMBDA_SERVER_CA_CERT_PEM"
NO_CA_VARS = {CA_FILE_VAR: None, CA_PEM_VAR: None}
FWD_TIMEOUT = 1.0     # ELASTIC_APM_DATA_FORWARDER_TIMEOUT in the refusal scenarios
MARGIN = 1.0
MAX_ATTEMPTS = 20     # handshakes a refused server may see in a scenario (no hot loop)
PROBLEM_LEVELS = ("warn", "warning", "error", "critical")
BEGIN = "-----BEGIN CERTIFICATE-----"
END = "-----END CERTIFICATE-----"
ROOT_CN = "apm-ext bundle test root"

# --------------------------------------------------------------- certificates

_certs = None
_certs_lock = threading.Lock()


def _openssl(*args):
    r = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError("openssl %s failed: %s" % (" ".join(args), r.stderr))


def make_chain_certs(d):
    """The certificates of the module docstring, in d. Returns {name: path}."""
    p = lambda n: os.path.join(d, n)  # noqa: E731
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    rsa = ["-newkey", "rsa:2048"]
    ca_ext = ("basicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n"
              "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid:always\n")
    inter_ext = ca_ext.replace("CA:TRUE", "CA:TRUE,pathlen:0")
    leaf_ext = ("basicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\n"
                "extendedKeyUsage = serverAuth\n"
                "subjectAltName = DNS:localhost,IP:127.0.0.1,IP:::1\n"
                "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid,issuer\n")

    def cnf(name, dn, ext):
        with open(p(name + ".cnf"), "w") as f:
            f.write("[req]\ndistinguished_name = dn\nprompt = no\n[dn]\n%s\n[ext]\n%s"
                    % (dn, ext))
        return p(name + ".cnf")

    def self_signed(name, dn, key):
        _openssl("req", "-x509", *key, "-nodes", "-keyout", p(name + ".key"),
                 "-out", p(name + ".pem"), "-days", "3650", "-sha256",
                 "-config", cnf(name, dn, ca_ext), "-extensions", "ext")

    def signed(name, dn, ext, issuer):
        c = cnf(name, dn, ext)
        _openssl("req", "-new", *ec, "-nodes", "-keyout", p(name + ".key"),
                 "-out", p(name + ".csr"), "-config", c)
        _openssl("x509", "-req", "-in", p(name + ".csr"), "-CA", p(issuer + ".pem"),
                 "-CAkey", p(issuer + ".key"),
                 "-set_serial", str(int.from_bytes(os.urandom(8), "big")),
                 "-days", "825", "-sha256", "-extfile", c, "-extensions", "ext",
                 "-out", p(name + ".pem"))

    root_dn = "O = apm-ext tests\nCN = %s" % ROOT_CN
    self_signed("root", root_dn, rsa)
    signed("inter", "O = apm-ext tests\nCN = apm-ext bundle test intermediate", inter_ext,
           "root")
    signed("leaf", "CN = localhost", leaf_ext, "inter")
    self_signed("other", "O = apm-ext tests\nCN = apm-ext bundle other root", ec)
    signed("other_leaf", "CN = localhost", leaf_ext, "other")
    self_signed("impostor", root_dn, rsa)          # root's subject, another key
    signed("impostor_leaf", "CN = localhost", leaf_ext, "impostor")
    out = {}
    for n in ("root", "inter", "leaf", "other", "other_leaf", "impostor", "impostor_leaf"):
        out[n], out[n + "_key"] = p(n + ".pem"), p(n + ".key")
    with open(p("chain.pem"), "w") as f:          # what the server sends: leaf, inter
        for n in ("leaf", "inter"):
            with open(out[n]) as g:
                f.write(g.read())
    out["chain"] = p("chain.pem")
    return out


def certs():
    global _certs
    with _certs_lock:
        if _certs is None:
            if not shutil.which("openssl"):
                raise Skip("no openssl CLI to make the test certificates")
            d = tempfile.mkdtemp(prefix="e2e-bundle-certs-")
            atexit.register(shutil.rmtree, d, True)
            _certs = make_chain_certs(d)
        return _certs


class ChainApm:
    """FakeAPM keyword arguments (@scenario(apm=...)) serving `chain` with
    `key` (certs() names), resolved only when the scenario runs (so --list and
    -k make no certificates)."""

    def __init__(self, chain="chain", key="leaf_key"):
        self.chain, self.key = chain, key

    def keys(self):
        return ["tls"]

    def __getitem__(self, k):
        c = certs()
        return (c[self.chain], c[self.key])


def pem_block(path):
    """The one PEM certificate block of a file, BEGIN to END lines, newline-ended."""
    with open(path) as f:
        text = f.read()
    m = re.search(re.escape(BEGIN) + r".*?" + re.escape(END), text, re.S)
    assert m, "%s holds no certificate" % path
    return m.group(0) + "\n"


def der_of(block):
    import base64
    body = block.split(BEGIN, 1)[1].split(END, 1)[0]
    return base64.b64decode("".join(body.split()))


def pem_of(der):
    import base64
    b = base64.b64encode(der).decode()
    return BEGIN + "\n" + "".join(b[i:i + 64] + "\n" for i in range(0, len(b), 64)) + END + "\n"


def _der_item(b, i):
    """(tag, start of content, end of item) of the DER item at b[i]."""
    tag, n = b[i], b[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7f
        n = int.from_bytes(b[i:i + k], "big")
        i += k
    return tag, i, i + n


def cut_block(block):
    """The certificate cut short inside its public key: the subject (the
    index's key) is whole, the certificate cannot be decoded."""
    der = der_of(block)
    _, c, _ = _der_item(der, 0)             # Certificate
    _, t, t_end = _der_item(der, c)         # tbsCertificate
    i = t
    if der[i] == 0xa0:                      # version
        i = _der_item(der, i)[2]
    for _ in range(5):                      # serial, sigalg, issuer, validity, subject
        i = _der_item(der, i)[2]
    cut = der[:i + 24]                      # 24 bytes into the SubjectPublicKeyInfo
    assert i + 24 < t_end
    return pem_of(cut)


GARBAGE_BLOCK = (BEGIN + "\nbm90IGEgY2VydGlmaWNhdGUsIGp1c3QgdGV4dCBpbiBhIENBIGJ1bmRsZQ==\n"
                 + END + "\n")


def machine_bundle():
    """(path the extension will read, its text)."""
    for path in BUNDLES:
        if os.access(path, os.R_OK):
            with open(path, encoding="ascii", errors="replace") as f:
                return path, f.read()
    raise Skip("no system CA bundle here (%s): nothing to bind-mount over"
               % ", ".join(BUNDLES))


def bundle_with(text, blocks):
    """The machine's bundle text with `blocks` inserted before its middle
    certificate. Returns (text, how many certificate blocks it holds)."""
    starts = [m.start() for m in re.finditer(re.escape(BEGIN), text)]
    if len(starts) < 10:
        raise Skip("the system bundle holds only %d certificates" % len(starts))
    mid = starts[len(starts) // 2]
    out = text[:mid] + "".join(blocks) + text[mid:]
    return out, out.count(BEGIN)


# --------------------------------------------------------------- inotify

class OpenWatch:
    """Counts opens of one file (inotify IN_OPEN, with IN_CLOSE_NOWRITE so
    that successive opens are not coalesced into one event)."""
    IN_OPEN, IN_CLOSE_NOWRITE, IN_CLOSE_WRITE = 0x20, 0x10, 0x08

    def __init__(self, path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise Skip("inotify_init1: %s" % os.strerror(ctypes.get_errno()))
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(path), self.IN_OPEN |
                                         self.IN_CLOSE_NOWRITE | self.IN_CLOSE_WRITE)
        if wd < 0:
            os.close(self.fd)
            raise Skip("inotify_add_watch %s: %s" % (path, os.strerror(ctypes.get_errno())))
        self.opens = self.closes = 0

    def count(self):
        """Opens so far (and reads the events that are in)."""
        while select.select([self.fd], [], [], 0)[0]:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            i = 0
            while i + 16 <= len(data):
                _, mask, _, ln = struct.unpack_from("iIII", data, i)
                i += 16 + ln
                self.opens += bool(mask & self.IN_OPEN)
                self.closes += bool(mask & (self.IN_CLOSE_NOWRITE | self.IN_CLOSE_WRITE))
        return self.opens

    def wait_closed(self, timeout=3):
        """Opens so far, once each has been closed (the extension is done
        reading; inotify has no blocking wait we could bound here)."""
        poll_until(lambda: self.count() is not None and self.closes >= self.opens, timeout)
        return self.count()

    def close(self):
        os.close(self.fd)


# --------------------------------------------------------------- the bed

class BundleBed:
    """A bundle file + the namespace wrapper for one scenario.

    with BundleBed(t, [blocks]) as bed:
        bed.start(env)          # t.start() through the wrapper, no CA variable
        bed.opens()             # how many times the extension opened the bundle
    """

    def __init__(self, t, blocks):
        self.t, self.dir, self.watch = t, None, None
        if os.environ.get("APM_E2E_UNDER_VALGRIND"):
            raise Skip("the bundle scenarios start the binary itself in a mount namespace, "
                       "not through the valgrind wrapper")
        if os.geteuid() != 0:
            raise Skip("a mount namespace with bind mounts needs root (euid %d)" % os.geteuid())
        self.tools = {n: shutil.which(n) for n in ("unshare", "mount", "sh")}
        missing = [n for n, p in self.tools.items() if not p]
        if missing:
            raise Skip("no %s on PATH" % ", ".join(missing))
        self.target, text = machine_bundle()
        self.text, self.ncerts = bundle_with(text, blocks)
        self.real_binary = os.path.abspath(t.binary)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self):
        tools = self.tools
        self.dir = tempfile.mkdtemp(prefix="e2e-bundle-")
        self.bundle = os.path.join(self.dir, "bundle.pem")
        with open(self.bundle, "w") as f:
            f.write(self.text)
        os.mkdir(os.path.join(self.dir, "bin"))
        self.link = os.path.join(self.dir, "bin", "apm-lambda-extension")
        os.symlink(self.real_binary, self.link)
        inner = '{m} --bind "$1" "$2" && exec "$3"'.format(m=shlex.quote(tools["mount"]))
        self.wrapper = os.path.join(self.dir, "wrapper")
        with open(self.wrapper, "w") as f:
            f.write("#!/bin/sh\n"
                    "# apm-ext in a mount namespace of its own, with the test's CA\n"
                    "# bundle; every step execs (no shell stays)\n"
                    "exec %s -m %s -c %s sh %s %s %s\n" % (
                        shlex.quote(tools["unshare"]), shlex.quote(tools["sh"]),
                        shlex.quote(inner), shlex.quote(self.bundle),
                        shlex.quote(self.target), shlex.quote(self.link)))
        os.chmod(self.wrapper, 0o755)
        self._probe()
        self.watch = OpenWatch(self.bundle)    # after the probe: only the extension's opens

    def _probe(self):
        """The namespace and the bind mount work here, and do not leak."""
        inner = '{m} --bind "$1" "$2" && cat "$2"'.format(m=shlex.quote(self.tools["mount"]))
        try:
            p = subprocess.run([self.tools["unshare"], "-m", self.tools["sh"], "-c", inner,
                                "sh", self.bundle, self.target], capture_output=True,
                               timeout=10)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise Skip("unshare -m could not run: %s" % e)
        if p.returncode != 0 or p.stdout.decode("ascii", "replace") != self.text:
            raise Skip("unshare -m / mount --bind not permitted here (exit %s): %s" % (
                p.returncode, p.stderr.decode("utf-8", "replace").strip()[:200]))
        with open(self.target, encoding="ascii", errors="replace") as f:
            assert f.read() != self.text, "the probe's bind mount leaked into %s" % self.target

    def start(self, env=None, **kw):
        """t.start() through the wrapper, with no CA variable; checks the process
        and that it sees our bundle (and we do not)."""
        e = dict(NO_CA_VARS)
        e.update(env or {})
        self.t.binary = self.wrapper
        try:
            proc = self.t.start(env=e, **kw)
        finally:
            self.t.binary = self.real_binary
        check_process(self.t, self.real_binary, self.link)
        pid = self.t.lam.ext_proc.pid
        # stat, not open: an open would count as the extension's (same inode)
        theirs, mine = os.stat("/proc/%d/root%s" % (pid, self.target)), os.stat(self.bundle)
        assert (theirs.st_dev, theirs.st_ino) == (mine.st_dev, mine.st_ino), \
            "the extension's %s is not the test's bundle" % self.target
        with open(self.target, encoding="ascii", errors="replace") as f:
            assert f.read() != self.text, "the test's bundle shows in ours: mount leaked"
        return proc

    def opens(self):
        return self.watch.wait_closed()

    def close(self):
        if self.watch is not None:
            self.watch.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------- helpers

def invocation(t):
    """One syncflush invocation: (tx, sent, t_flush, t_next)."""
    inv = t.lam.invoke()
    lines, tx = agent_payload(inv, spans=2)
    sent = agent_send(t.port, lines)
    assert sent == 202, "agent POST answered %s, want 202" % sent.status
    t_flush = time.monotonic()
    assert agent_flush(t.port) == 202, "flushed=true not answered 202"
    t.lam.runtime_done(inv)
    t_next = t.lam.finish(inv, timeout=FWD_TIMEOUT + MARGIN + 10)
    return tx, sent, t_flush, t_next


def delivered(t, tx, sent, t_flush, t_next, what):
    req = first_delivery(t.apm, tx)
    assert req is not None, "%s: transaction not at the APM server when the extension " \
        "called /next (server saw %d requests; TLS errors: %s)" % (
            what, len(t.apm.requests), t.apm.tls_errors[-3:])
    assert req.t_end <= t_next, "%s: /next %.3fs before the server answered" % (
        what, req.t_end - t_next)
    assert t_next - t_flush < 2.0, "%s: /next held %.3fs after the flush" % (
        what, t_next - t_flush)
    check_forwarded(req, sent, what)
    return req


def msgs(t, levels=PROBLEM_LEVELS):
    return [(str(r.get("level")), str(r.get("msg", ""))) for r in t.logs()
            if str(r.get("level", "")).lower() in levels]


def check_indexed(t, bed):
    """(anchors the debug line of the bundle's load counts, blocks in the bundle)."""
    want = bed.ncerts
    lines = log_has(t.logs(), ("debug",), "trust anchors from", bed.target)
    assert lines, "no debug line 'N trust anchors from %s' (log: %s)" % (
        bed.target, [r.get("msg") for r in t.logs()][:8])
    n = int(str(lines[0]["msg"]).split()[0])
    return n, want


def refused(t, bed, reason_words, what):
    """Two invocations: none delivered, each released within the forwarder
    timeout, handshakes retried with backoff, the reason logged."""
    bed.start(env={"ELASTIC_APM_DATA_FORWARDER_TIMEOUT": "%ds" % FWD_TIMEOUT})
    for i in range(2):
        tx, _, t_flush, t_next = invocation(t)
        assert not t.apm.requests, "invocation %d: the handshake succeeded (%s) and the " \
            "server got %d requests: %s" % (i, what, len(t.apm.requests), t.apm.requests[:3])
        assert t_next - t_flush <= FWD_TIMEOUT + MARGIN, "invocation %d: /next held %.3fs " \
            "after the end, forwarder timeout %.1fs" % (i, t_next - t_flush, FWD_TIMEOUT)
        if i == 0:
            t.wait_apm(lambda a: a.tls_errors, "a handshake attempt (TLS error at the "
                       "server)", timeout=3)
    t.shutdown_ok()
    assert not t.apm.requests, "after shutdown: %d requests reached the server" % len(
        t.apm.requests)
    n = len(t.apm.tls_errors)
    assert 2 <= n <= MAX_ATTEMPTS, "%d handshake attempts: want retries (>= 2) with " \
        "backoff (<= %d)" % (n, MAX_ATTEMPTS)
    why = [m for lv, m in msgs(t) if any(w in m.lower() for w in reason_words)]
    assert why, "no warn/error line gives the reason (%s; any of %s): %s" % (
        what, reason_words, msgs(t)[:6])
    return n


# --------------------------------------------------------------- scenarios

@scenario(apm=ChainApm())
def bundle_chain_delivered(t):
    """(a) leaf <- inter <- root, root only in the system bundle: delivered, read lazily."""
    c = certs()
    with BundleBed(t, [pem_block(c["root"])]) as bed:
        bed.start()
        for i in range(2):
            tx, sent, t_flush, t_next = invocation(t)
            delivered(t, tx, sent, t_flush, t_next, "invocation %d" % i)
        assert not t.apm.tls_errors, "handshakes failed at the server: %s" % t.apm.tls_errors
        n, want = check_indexed(t, bed)
        assert n == want, "%d trust anchors from the bundle, it holds %d certificates " \
            "(ours in the middle)" % (n, want)
        opens = bed.opens()
        assert opens == 2, "the bundle was opened %d times: want 2, once to index it and " \
            "once to decode the one issuer the chain names (1: not lazy)" % opens
        bad = msgs(t)
        assert not bad, "warn/error lines with a good bundle: %s" % bad[:4]
        t.shutdown_ok()


@scenario(apm=ChainApm("other_leaf", "other_leaf_key"))
def bundle_unknown_ca_refused(t):
    """(b) a server whose CA is not in the bundle: refused, nothing delivered, reason logged."""
    c = certs()
    with BundleBed(t, [pem_block(c["root"])]) as bed:
        refused(t, bed, ("unknown ca", "trusted"), "CA not in the bundle")
        opens = bed.opens()
        assert opens == 1, "the bundle was opened %d times: the chain names no bundle " \
            "certificate, so only the index pass should read it" % opens


@scenario(apm=ChainApm("impostor_leaf", "impostor_leaf_key"))
def bundle_impostor_refused(t):
    """(b) issuer named like the bundle's root, another key: fetched, signature fails, refused."""
    c = certs()
    with BundleBed(t, [pem_block(c["root"])]) as bed:
        refused(t, bed, ("signature", "trusted", "unknown ca"), "impostor CA")
        opens = bed.opens()
        assert opens == 2, "the bundle was opened %d times: want 2 (index, then the " \
            "root its subject names, once)" % opens


@scenario(apm=ChainApm())
def bundle_corrupt_blocks_tolerated(t):
    """(c) garbage and a cut copy of root (same subject) before root: delivered, bad ones logged."""
    c = certs()
    root = pem_block(c["root"])
    other = pem_block(c["other"])
    with BundleBed(t, [GARBAGE_BLOCK, cut_block(root), other, root]) as bed:
        bed.start()
        tx, sent, t_flush, t_next = invocation(t)
        delivered(t, tx, sent, t_flush, t_next, "invocation")
        tx, sent, t_flush, t_next = invocation(t)
        delivered(t, tx, sent, t_flush, t_next, "invocation 2")
        n, want = check_indexed(t, bed)
        assert n == want - 1, "%d trust anchors from the bundle, want %d (all its %d blocks " \
            "but the garbage one)" % (n, want - 1, want)
        bad = msgs(t)
        load = [m for lv, m in bad if bed.target in m and "could not be decoded" in m]
        assert load, "the undecodable blocks were not logged: %s" % bad[:6]
        assert len(bad) <= 3, "more warn/error lines than the bad blocks explain: %s" % bad
        t.shutdown_ok()


@scenario(apm=ChainApm())
def bundle_corrupt_issuer_fails_cleanly(t):
    """(c) the chain's issuer's only block is cut: refused, logged once, released, exit 0."""
    c = certs()
    with BundleBed(t, [cut_block(pem_block(c["root"]))]) as bed:
        n = refused(t, bed, ("unknown ca", "trusted"), "issuer's block undecodable")
        fetch = [m for lv, m in msgs(t) if "could not be decoded" in m]
        assert len(fetch) == 1, "want one warning for the undecodable issuer over %d " \
            "handshakes (decoded once), got %d: %s" % (n, len(fetch), fetch[:4])
        opens = bed.opens()
        assert opens == 2, "the bundle was opened %d times over %d handshakes: want 2 " \
            "(index, then the issuer once)" % (opens, n)


@scenario(apm=ChainApm())
def bundle_anchor_kept(t):
    """(d) new connections after the old one closed: resumed, then a full handshake verifies."""
    c = certs()
    with BundleBed(t, [pem_block(c["root"])]) as bed:
        bed.start()
        tx, sent, t_flush, t_next = invocation(t)         # full handshake, root fetched
        delivered(t, tx, sent, t_flush, t_next, "invocation 1")
        opens = bed.opens()
        st1 = t.apm._ctx.session_stats()
        assert st1["accept_good"] >= 1 and st1["hits"] == 0, st1

        t.apm.drop_connections()                          # frozen: the server closes
        assert t.apm.wait_for(lambda a: a.open_connections() == 0, 5), "connections not closed"
        conns = t.apm.connections_total
        tx, sent, t_flush, t_next = invocation(t)
        req = delivered(t, tx, sent, t_flush, t_next, "invocation 2 (server closed)")
        assert req.conn_id > conns, "invocation 2 came on an old connection"
        # (FakeAPM's drop sends no close_notify: OpenSSL then forgets the session,
        # so this one is usually a full handshake too; either way it must verify.)

        # The server restarts and forgets every session: a full handshake again.
        t.apm.set_mode("down")
        fresh = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        fresh.load_cert_chain(c["chain"], c["leaf_key"])
        t.apm._ctx = fresh
        t.apm.set_mode("ok")
        tx, sent, t_flush, t_next = invocation(t)
        delivered(t, tx, sent, t_flush, t_next, "invocation 3 (full handshake, server "
                  "restarted)")
        st3 = fresh.session_stats()
        # at least one full handshake at the restarted server (a later connection, e.g.
        # a second slot, may resume the session that handshake made)
        assert st3["accept_good"] - st3["hits"] >= 1, "invocation 3 was not a full " \
            "handshake: %s" % st3
        assert not t.apm.tls_errors, "handshakes failed at the server: %s" % t.apm.tls_errors
        after = bed.opens()
        assert after == opens, "the bundle was opened %d times after the first handshake " \
            "(%d before, %d after): its anchor is decoded once and kept" % (
                after - opens, opens, after)
        t.shutdown_ok()
        ids = [o["id"] for o in t.apm.events("transaction")]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        assert len(ids) == 3 and not twice, "transactions delivered: %d (want 3), more " \
            "than once: %s" % (len(ids), twice)
