#!/usr/bin/env python3
"""Cold start in system calls: what the binary does from exec to its first /next.

    python3 test/e2e/coldstart_syscalls.py [--binary ./apm-ext] [--keep-trace DIR]

Runs the real binary (through a symlink named apm-lambda-extension, as Lambda
starts it) under `strace -f`, between test/fakes/fake_lambda.py and test/fakes/fake_apm.py,
and counts the system calls from its execve (not counted) to

  - the write of `POST /2020-01-01/extension/register` (inclusive): the part of
    the function's cold start spent before Lambda knows the extension, and
  - the write of `GET /2020-01-01/extension/event/next` (inclusive): the
    extension's whole init phase, which the function's init waits for.

Checks (each prints PASS/FAIL; the last line is `N passed, N failed`):
  plain_http      with an http:// server URL: the counts are within the bounds
                  below, and no system call in the whole run (exec to exit on
                  SHUTDOWN) takes a file path (open/openat/stat/access... of
                  /etc/hosts, resolv.conf, a CA bundle, anything).
  https_init      with an https:// server URL: still no file path before the
                  first /next (trust anchors, if loaded at all, are loaded
                  after it, while the function initialises); prints the ones
                  after it.
Installs strace with apt-get (as root) if it is missing.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "fakes")]

from fake_lambda import FakeLambda  # noqa: E402
from fake_apm import FakeAPM, make_test_ca  # noqa: E402
from e2e import free_port  # noqa: E402

# Measured with the static musl x86_64 build, telemetry on (the default), on
# Debian 12 / strace 6.1:
#
# exec -> register: 5
#   arch_prctl, set_tid_address          musl's static start-up (TLS pointer)
#   socket, connect, writev              the register request (blocking socket)
#   Nothing else runs before register: no config parsing that touches the
#   system, no allocation (brk/mmap), no signal set-up, no file. Nothing
#   avoidable is left there.
REGISTER_MAX = 6
#
# exec -> first /next: 22
#   the 5 above, then
#   read                                 register's answer (identifier)
#   socket, setsockopt, bind, listen     agent receiver on 127.0.0.1
#   socket, setsockopt x2, bind, listen  agent receiver on [::1] (V6ONLY)
#   socket, setsockopt, bind, listen     OTLP/HTTP receiver on 127.0.0.1
#   socket, setsockopt x2, bind, listen  OTLP/HTTP receiver on [::1]
#                                        (APM_EXT_OTLP_PORT, 4318; 0: off)
#   socket, setsockopt, bind, listen     telemetry listener on 0.0.0.0
#   writev, read                         PUT /2022-07-01/telemetry and answer
#   sendto                               GET /2020-01-01/extension/event/next
#                                        (MSG_DONTWAIT: no fcntl needed)
#   The arena mmap, the SIGTERM handler and the jitter seed (getpid) run
#   after the first /next, while it waits.
# The bound leaves room for a response read in two pieces; a new kind of
# work before /next should be a conscious change here.
NEXT_MAX = 33

# System calls that take a path name (a file, a directory, a program).
PATH_SYSCALLS = {
    "open", "openat", "openat2", "creat", "stat", "lstat", "newfstatat", "fstatat64",
    "statx", "access", "faccessat", "faccessat2", "readlink", "readlinkat", "execve",
    "execveat", "statfs", "chdir", "chroot", "mkdir", "mkdirat", "unlink", "unlinkat",
    "rename", "renameat", "renameat2", "symlink", "symlinkat", "link", "linkat",
    "truncate", "utimensat", "utimes", "utime", "chmod", "fchmodat", "chown", "lchown",
    "fchownat", "mknod", "mknodat", "inotify_add_watch", "uselib", "swapon", "acct",
    "getxattr", "lgetxattr", "listxattr", "llistxattr", "name_to_handle_at",
}
LINE = re.compile(r"^(?:\[pid\s+)?(\d+)\]?\s+(\w+)\((.*)$")
REGISTER_REQ = "POST /2020-01-01/extension/register"
NEXT_REQ = "GET /2020-01-01/extension/event/next"
SEND_SYSCALLS = {"write", "writev", "send", "sendto", "sendmsg", "sendmmsg", "pwritev"}


def ensure_strace():
    if shutil.which("strace"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("# installing strace", flush=True)
        subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "strace"], check=True,
                       capture_output=True, env=dict(os.environ,
                                                     DEBIAN_FRONTEND="noninteractive"))
    if not shutil.which("strace"):
        raise SystemExit("strace is missing: apt-get install strace")


def parse_trace(path):
    """[(pid, name, args)] of the system calls in an strace -f output, from
    the extension's execve on (execve excluded); '<... resumed>' halves,
    signals and exits are not calls."""
    calls, started = [], False
    with open(path, errors="replace") as f:
        for line in f:
            m = LINE.match(line.rstrip("\n"))
            if not m or "resumed>" in line.split("(", 1)[0]:
                continue
            pid, name, args = m.groups()
            if not started:
                if name == "execve" and args.rstrip().endswith("= 0"):
                    started = True
                continue
            calls.append((int(pid), name, args))
    return calls


def index_of_send(calls, request):
    for i, (_, name, args) in enumerate(calls):
        if name in SEND_SYSCALLS and request in args:
            return i
    raise AssertionError("no write/sendto/... of %r in the trace" % request)


def path_calls(calls):
    out = []
    for pid, name, args in calls:
        if name in PATH_SYSCALLS or "/etc/" in args or "ca-bundle" in args \
                or "ca-certificates" in args:
            out.append("%s(%s" % (name, args[:120]))
    return out


def traced_run(binary, env_extra, tmp, tag, apm):
    """Start the binary under strace between the fakes, wait for its first
    /next, SHUTDOWN it; returns the parsed calls."""
    d = os.path.join(tmp, tag)
    os.makedirs(os.path.join(d, "extensions"))
    link = os.path.join(d, "extensions", "apm-lambda-extension")
    os.symlink(os.path.abspath(binary), link)
    trace = os.path.join(d, "strace.out")
    launcher = os.path.join(d, "launch")
    with open(launcher, "w") as f:
        # -s 64: enough of each buffer to see the request line
        f.write("#!/bin/sh\nexec strace -f -qq -s 64 -o '%s' '%s'\n" % (trace, link))
    os.chmod(launcher, 0o755)
    lam = FakeLambda()
    try:
        env = {"ELASTIC_APM_LAMBDA_APM_SERVER": apm.url,
               "ELASTIC_APM_DATA_RECEIVER_SERVER_PORT": str(free_port()),
               "APM_EXT_TELEMETRY_PORT": str(free_port("0.0.0.0")),
               "APM_EXT_OTLP_PORT": str(free_port())}
        env.update(env_extra)
        lam.start_extension(launcher, env)
        lam.wait_init_done(20)
        code, _, killed = lam.shutdown(deadline_ms=5000)
        assert not killed and code == 0, "exit %s on SHUTDOWN (killed %s)" % (code, killed)
        assert not lam.protocol_errors, lam.protocol_errors[:3]
    finally:
        lam.close()
    return parse_trace(trace), trace


def show(title, calls):
    print("  %s (%d): %s" % (title, len(calls), " ".join(c[1] for c in calls)))


def check_plain_http(binary, tmp):
    apm = FakeAPM()
    try:
        calls, trace = traced_run(binary, {}, tmp, "http", apm)
    finally:
        apm.close()
    i_reg = index_of_send(calls, REGISTER_REQ)
    i_next = index_of_send(calls, NEXT_REQ)
    before_reg, before_next = calls[:i_reg + 1], calls[:i_next + 1]
    print("syscalls exec->register: %d (bound %d)" % (len(before_reg), REGISTER_MAX))
    print("syscalls exec->first /next: %d (bound %d)" % (len(before_next), NEXT_MAX))
    show("before register", before_reg)
    show("register..first /next", calls[i_reg + 1:i_next + 1])
    errs = []
    if len(before_reg) > REGISTER_MAX:
        errs.append("%d syscalls before register, bound %d" % (len(before_reg), REGISTER_MAX))
    if len(before_next) > NEXT_MAX:
        errs.append("%d syscalls before the first /next, bound %d" % (len(before_next),
                                                                       NEXT_MAX))
    files = path_calls(before_next)
    if files:
        errs.append("file system calls before the first /next: %s" % files[:5])
    files_all = path_calls(calls)
    if files_all:
        errs.append("file system calls with a plain-http URL: %s" % files_all[:5])
    assert not errs, "; ".join(errs) + " (trace: %s)" % trace
    return "register %d, first /next %d, no file touched" % (len(before_reg),
                                                              len(before_next))


def check_https_init(binary, tmp):
    ca = make_test_ca(os.path.join(tmp, "ca"))
    apm = FakeAPM(tls=(ca["cert"], ca["key"]))
    try:
        calls, trace = traced_run(binary, {"ELASTIC_APM_SERVER_CA_CERT_FILE": ca["ca"]},
                                  tmp, "https", apm)
    finally:
        apm.close()
    i_next = index_of_send(calls, NEXT_REQ)
    before = path_calls(calls[:i_next + 1])
    after = path_calls(calls[i_next + 1:])
    print("syscalls exec->first /next with https: %d" % (i_next + 1))
    for c in after:
        print("  after /next: %s" % c)
    assert not before, "file system calls before the first /next with https: %s " \
        "(trace: %s)" % (before[:5], trace)
    return "%d syscalls to first /next, none with a path; %d with a path after it" % (
        i_next + 1, len(after))


def main(argv=None):
    ap = argparse.ArgumentParser(description="count cold-start system calls")
    ap.add_argument("--binary", default=os.path.join(ROOT, "apm-ext"))
    ap.add_argument("--keep-trace", default=None, metavar="DIR",
                    help="keep the strace outputs in DIR")
    args = ap.parse_args(argv)
    if not os.access(args.binary, os.X_OK):
        print("FAIL setup: %s is not an executable (make)" % args.binary)
        print("0 passed, 1 failed")
        return 1
    ensure_strace()
    tmp = args.keep_trace or tempfile.mkdtemp(prefix="apm-syscalls-")
    os.makedirs(tmp, exist_ok=True)
    passed = failed = 0
    try:
        for name, check in (("plain_http", check_plain_http),
                            ("https_init", check_https_init)):
            try:
                what = check(args.binary, tmp)
                print("PASS %s: %s" % (name, what), flush=True)
                passed += 1
            except AssertionError as e:
                print("FAIL %s: %s" % (name, e), flush=True)
                failed += 1
    finally:
        if not args.keep_trace:
            shutil.rmtree(tmp, ignore_errors=True)
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
