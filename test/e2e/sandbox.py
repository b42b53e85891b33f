#!/usr/bin/env python3
"""The bare-sandbox test: each layer zip, unpacked into an empty root, runs.

    python3 test/e2e/sandbox.py [--zip-dir layer] [--arch x86_64,arm64]
                            [--qemu auto|binfmt|copy] [-k name] [--keep]

For each zip (layer/apm-ext-x86_64.zip, layer/apm-ext-arm64.zip) and each
scenario, a fresh root directory gets nothing but what Lambda would put there
from the layer: <root>/opt/extensions/apm-lambda-extension, with the mode the
zip stores. No /etc (no hosts, resolv.conf or CA bundle), no /lib, no /dev,
no /proc, no /tmp, no shell. The extension is started inside it with chroot
(as root) by FakeLambda; the fake control plane and the fake APM server run
outside, on 127.0.0.1: the chroot shares the network namespace.

How the process gets into the root: FakeLambda.start_extension(path, env)
executes a symlink named apm-lambda-extension pointing at `path`; here `path`
is a small launcher script (outside the root) that execs
`chroot <root> /opt/extensions/apm-lambda-extension` -- the same PID all the
way, so FakeLambda's freeze (SIGSTOP), SIGKILL and exit code all apply to the
extension itself. FakeLambda is used unchanged.

arm64 runs under qemu-user, two ways (--qemu):
  binfmt  the launcher enters a new user+mount namespace, mounts a private
          binfmt_misc instance (Linux >= 6.7) and registers qemu-aarch64-static
          there with the F flag (interpreter opened at registration time), then
          chroots: the root holds only the layer, as on Lambda. The host's
          binfmt_misc is not touched.
  copy    /usr/bin/qemu-aarch64-static is copied into the root and the launcher
          runs `chroot <root> /qemu-aarch64-static /opt/extensions/...`.
  auto    binfmt if a probe run works, else copy (default).

Scenarios (each per arch):
  plain_http      register (name apm-lambda-extension), subscribe, one invocation
                  whose agent payload reaches the fake APM server over http://,
                  exit 0 on SHUTDOWN.
  https_no_ca     https:// server URL, no CA bundle in the root: nothing may be
                  delivered, the log must say why (no trust anchors / cannot
                  verify / https not supported), exit 0 on SHUTDOWN.
  https_ca_file   https:// with ELASTIC_APM_SERVER_CA_CERT_FILE=/opt/ca.pem (the
                  test CA, the only extra file in the root): delivered. SKIPPED
                  while the binary logs that https is not supported.

Prints one line per scenario and, last, `N passed, N failed[, N skipped]`;
exit code 1 if any failed.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "fakes")]

from fake_lambda import FakeLambda  # noqa: E402
from fake_apm import FakeAPM, make_test_ca  # noqa: E402
from e2e import (free_port, agent_send, agent_flush, make_metadata,  # noqa: E402
                 make_transaction, tx_delivered)

EXT_NAME = "apm-lambda-extension"
EXT_PATH = "/opt/extensions/" + EXT_NAME
QEMU = "/usr/bin/qemu-aarch64-static"
# Debian's /usr/lib/binfmt.d/qemu-aarch64.conf, with the static interpreter
# and only the F flag (no P: argv[0] stays the extension's path).
BINFMT_AARCH64 = (
    r":qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    r"\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff"
    r"\xfe\xff\xff\xff:" + QEMU + ":F")
# What "the log says why https cannot deliver" may look like.
WHY_NO_TLS = re.compile(r"no trust anchors?|cannot (be )?verif|https is not supported", re.I)
TIMEOUT = 20  # seconds for each wait: qemu-user is slow to start


class Skip(Exception):
    pass


# ------------------------------------------------------------------ the root

def make_root(zip_path, arch, qemu_mode, extra_files=None):
    """A temporary root with the zip unpacked into <root>/opt (as Lambda
    unpacks layers), plus qemu (copy mode) and extra_files {path: src}."""
    root = tempfile.mkdtemp(prefix="apm-sandbox-%s-" % arch)
    os.chmod(root, 0o755)
    with zipfile.ZipFile(zip_path) as z:
        infos = z.infolist()
        names = [i.filename for i in infos]
        assert names == ["extensions/" + EXT_NAME], \
            "%s holds %r, want exactly ['extensions/%s']" % (zip_path, names, EXT_NAME)
        info = infos[0]
        mode = (info.external_attr >> 16) & 0o7777
        assert info.create_system == 3 and mode == 0o755, \
            "%s: entry mode %o (create_system %d), want 0755 from a Unix zip" % (
                zip_path, mode, info.create_system)
        dest = os.path.join(root, "opt", "extensions", EXT_NAME)
        os.makedirs(os.path.dirname(dest), mode=0o755)
        with z.open(info) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)
        os.chmod(dest, mode)
    if arch == "arm64" and qemu_mode == "copy":
        shutil.copy2(QEMU, os.path.join(root, "qemu-aarch64-static"))
    for path, src in (extra_files or {}).items():
        d = os.path.join(root, path.lstrip("/"))
        shutil.copy(src, d)
        os.chmod(d, 0o644)
    check_bare(root, arch, qemu_mode, extra_files)
    return root


def check_bare(root, arch, qemu_mode, extra_files):
    """The root holds the layer's file and what we put there, nothing else."""
    want = {"opt", "opt/extensions", "opt/extensions/" + EXT_NAME}
    if arch == "arm64" and qemu_mode == "copy":
        want.add("qemu-aarch64-static")
    want.update(p.lstrip("/") for p in (extra_files or {}))
    found = set()
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            found.add(os.path.relpath(os.path.join(d, n), root))
    assert found == want, "root is not bare: %s" % sorted(found ^ want)


def make_launcher(root, arch, qemu_mode, tmp):
    """A script outside the root that execs the extension inside it."""
    if arch == "arm64" and qemu_mode == "copy":
        inner = "exec chroot '%s' /qemu-aarch64-static %s" % (root, EXT_PATH)
    else:
        inner = "exec chroot '%s' %s" % (root, EXT_PATH)
    if arch == "arm64" and qemu_mode == "binfmt":
        inner = ("exec unshare --user --map-root-user --mount sh -c '"
                 "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc && "
                 "printf %%s \"$0\" > /proc/sys/fs/binfmt_misc/register && "
                 "exec chroot \"$1\" %s' '%s' '%s'" % (EXT_PATH, BINFMT_AARCH64, root))
    path = os.path.join(tmp, "launch-%s-%s" % (arch, qemu_mode))
    with open(path, "w") as f:
        f.write("#!/bin/sh\n# runs the layer's extension inside %s\n%s\n" % (root, inner))
    os.chmod(path, 0o755)
    return path


def probe_binfmt(zip_path, tmp):
    """True if the binfmt launcher can run the arm64 binary (it complains
    about the missing AWS_LAMBDA_RUNTIME_API and exits 1)."""
    if not os.path.exists("/proc/sys/fs/binfmt_misc") or not shutil.which("unshare"):
        return False
    root = make_root(zip_path, "arm64", "binfmt")
    try:
        launcher = make_launcher(root, "arm64", "binfmt", tmp)
        r = subprocess.run([launcher], env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                           capture_output=True, timeout=30)
        return b"AWS_LAMBDA_RUNTIME_API" in r.stderr
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ scenarios

class Run:
    """One extension in one root, between a FakeLambda and a FakeAPM."""

    def __init__(self, launcher, apm, env=None):
        self.lam = FakeLambda()
        self.apm = apm
        self.port = free_port("127.0.0.1")
        self.tport = free_port("0.0.0.0")
        while self.tport == self.port:
            self.tport = free_port("0.0.0.0")
        e = {"ELASTIC_APM_LAMBDA_APM_SERVER": apm.url,
             "ELASTIC_APM_DATA_RECEIVER_SERVER_PORT": str(self.port),
             "APM_EXT_TELEMETRY_PORT": str(self.tport),
             "APM_EXT_OTLP_PORT": str(free_port("127.0.0.1")),
             "ELASTIC_APM_LOG_LEVEL": "debug"}
        e.update(env or {})
        try:
            self.lam.start_extension(launcher, e)
        except Exception:
            self.lam.close()
            raise

    def init(self):
        self.lam.wait_registered(TIMEOUT)
        self.lam.wait_init_done(TIMEOUT)
        name = (self.lam.register_headers or {}).get("Lambda-Extension-Name")
        assert name == EXT_NAME, "registered as %r, want %r" % (name, EXT_NAME)

    def invocation(self):
        """INVOKE, the agent sends one transaction and flushes, runtimeDone,
        the extension's /next. Returns the transaction."""
        inv = self.lam.invoke(timeout_ms=10000, timeout=TIMEOUT)
        tx = make_transaction(request_id=inv.request_id)
        st = agent_send(self.port, [make_metadata(), tx])
        assert st == 202, "agent POST answered %s, want 202" % st.status
        st = agent_flush(self.port)
        assert st == 202, "flushed=true answered %s, want 202" % st.status
        self.lam.runtime_done(inv)
        self.lam.finish(inv, timeout=TIMEOUT)
        return tx

    def shutdown_ok(self):
        code, _, killed = self.lam.shutdown(deadline_ms=5000, park_timeout=TIMEOUT)
        assert not killed, "still running at the SHUTDOWN deadline: SIGKILLed"
        assert code == 0, "exited with %s on SHUTDOWN" % code

    def check_clean(self):
        assert not self.lam.protocol_errors, "Lambda API misuse: %s" % \
            "; ".join(self.lam.protocol_errors[:5])
        self.lam.ext_logs()  # every stderr line is a JSON object

    def close(self):
        self.lam.close()


def sc_plain_http(ctx):
    apm = FakeAPM()
    r = None
    try:
        r = ctx.run = Run(ctx.launcher(), apm)
        r.init()
        assert r.lam.subscription is not None, "no telemetry subscription"
        tx = r.invocation()
        assert apm.wait_for(lambda a: tx_delivered(a, tx), TIMEOUT), \
            "the agent's transaction never reached the APM server (%d requests: %s)" % (
                len(apm.requests), apm.requests[-5:])
        assert not apm.errors, "APM server rejected payloads: %s" % apm.errors[:5]
        r.shutdown_ok()
        r.check_clean()
        return "registered, payload forwarded, exit 0"
    finally:
        if r is not None:
            r.close()
        apm.close()


def _tls_apm(ctx):
    if ctx.ca is None:
        ctx.ca = make_test_ca(os.path.join(ctx.tmp, "ca"))
    return FakeAPM(tls=(ctx.ca["cert"], ctx.ca["key"]))


def sc_https_no_ca(ctx):
    apm = _tls_apm(ctx)
    r = None
    try:
        r = ctx.run = Run(ctx.launcher(), apm, {"ELASTIC_APM_DATA_FORWARDER_TIMEOUT": "1s"})
        r.init()
        r.invocation()
        r.shutdown_ok()
        delivered = [q for q in apm.intake_requests() if q.status == 202]
        assert not delivered and not apm.events(), \
            "delivered over https without any trust anchor: %s" % delivered
        why = [x for x in r.lam.ext_logs()
               if x.get("level") in ("warn", "error", "critical")
               and WHY_NO_TLS.search(str(x.get("msg", "")))]
        assert why, "nothing delivered, but no warn/error log line says why (wanted " \
            "/%s/)" % WHY_NO_TLS.pattern
        r.check_clean()
        seen = "; ".join(sorted({"%s: %s" % (x["level"], x["msg"]) for x in why}))
        hs = " (server saw %d TLS handshake failures)" % len(apm.tls_errors) \
            if apm.tls_errors else ""
        return "nothing delivered%s; log: %s" % (hs, seen)
    finally:
        if r is not None:
            r.close()
        apm.close()


def sc_https_ca_file(ctx):
    apm = _tls_apm(ctx)
    r = None
    try:
        r = ctx.run = Run(ctx.launcher({"/opt/ca.pem": ctx.ca["ca"]}), apm,
                          {"ELASTIC_APM_SERVER_CA_CERT_FILE": "/opt/ca.pem"})
        r.init()
        tx = r.invocation()
        end = time.monotonic() + TIMEOUT
        while True:
            ok = apm.wait_for(lambda a: tx_delivered(a, tx), 0.5)
            unsupported = [x for x in r.lam.ext_logs()
                           if "https is not supported" in str(x.get("msg", ""))]
            if ok or unsupported or time.monotonic() > end:
                break
        if not ok and unsupported:
            r.shutdown_ok()
            raise Skip("binary says: %s" % unsupported[0]["msg"])
        assert ok, "not delivered over https with the CA file (%d requests, TLS errors %s)" \
            % (len(apm.requests), apm.tls_errors[:3])
        assert not apm.errors, "APM server rejected payloads: %s" % apm.errors[:5]
        r.shutdown_ok()
        r.check_clean()
        return "delivered over https, CA from /opt/ca.pem, exit 0"
    finally:
        if r is not None:
            r.close()
        apm.close()


SCENARIOS = [("plain_http", sc_plain_http), ("https_no_ca", sc_https_no_ca),
             ("https_ca_file", sc_https_ca_file)]


class Ctx:
    """Per-arch state: makes a fresh root (and its launcher) per scenario."""

    def __init__(self, zip_path, arch, qemu_mode, tmp, keep):
        self.zip_path, self.arch, self.qemu_mode = zip_path, arch, qemu_mode
        self.tmp, self.keep = tmp, keep
        self.ca = None
        self.roots = []
        self.run = None

    def launcher(self, extra_files=None):
        root = make_root(self.zip_path, self.arch, self.qemu_mode, extra_files)
        self.roots.append(root)
        return make_launcher(root, self.arch, self.qemu_mode, self.tmp)

    def cleanup(self):
        if not self.keep:
            for r in self.roots:
                shutil.rmtree(r, ignore_errors=True)
        self.roots = []


def main(argv=None):
    ap = argparse.ArgumentParser(description="bare-sandbox test of the layer zips")
    ap.add_argument("--zip-dir", default=os.path.join(ROOT, "layer"))
    ap.add_argument("--arch", default="x86_64,arm64")
    ap.add_argument("--qemu", choices=("auto", "binfmt", "copy"), default="auto")
    ap.add_argument("-k", dest="substr", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the roots (printed)")
    args = ap.parse_args(argv)

    passed = failed = skipped = 0
    if os.geteuid() != 0:
        print("FAIL setup: chroot needs root")
        print("0 passed, 1 failed")
        return 1
    tmp = tempfile.mkdtemp(prefix="apm-sandbox-")
    try:
        for arch in [a.strip() for a in args.arch.split(",") if a.strip()]:
            zip_path = os.path.join(args.zip_dir, "apm-ext-%s.zip" % arch)
            if not os.path.exists(zip_path):
                print("FAIL %s: %s missing (run make layer)" % (arch, zip_path))
                failed += 1
                continue
            mode = "native"
            if arch == "arm64":
                if not os.path.exists(QEMU):
                    print("FAIL arm64: %s missing (apt-get install qemu-user-static)" % QEMU)
                    failed += 1
                    continue
                mode = args.qemu
                if mode == "auto":
                    mode = "binfmt" if probe_binfmt(zip_path, tmp) else "copy"
            print("# %s: %s (%d bytes), %s" % (arch, os.path.relpath(zip_path),
                                               os.path.getsize(zip_path),
                                               "qemu via " + mode if arch == "arm64"
                                               else "native"), flush=True)
            ctx = Ctx(zip_path, arch, mode, tmp, args.keep)
            for name, func in SCENARIOS:
                full = "%s/%s" % (arch, name)
                if args.substr and args.substr not in full:
                    continue
                t0 = time.monotonic()
                ctx.run = None
                try:
                    what = func(ctx)
                    print("PASS %s (%.1fs): %s" % (full, time.monotonic() - t0, what),
                          flush=True)
                    passed += 1
                except Skip as e:
                    print("SKIP %s: %s" % (full, e), flush=True)
                    skipped += 1
                except Exception as e:  # noqa: BLE001 - any failure fails the scenario
                    reason = str(e) if isinstance(e, AssertionError) else \
                        "%s: %s\n%s" % (type(e).__name__, e, traceback.format_exc())
                    print("FAIL %s: %s" % (full, reason.strip()), flush=True)
                    if ctx.run is not None:
                        tail = ctx.run.lam.ext_log_tail(20)
                        if tail:
                            print("    --- extension log ---\n    " +
                                  tail.replace("\n", "\n    "))
                    failed += 1
                finally:
                    if args.keep:
                        print("    roots: %s" % " ".join(ctx.roots))
                    ctx.cleanup()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print("%d passed, %d failed%s" % (passed, failed,
                                      ", %d skipped" % skipped if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
