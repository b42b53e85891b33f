#!/usr/bin/env python3
"""Benchmark of apm-ext against the floor (test/bench/floor.c, a bare extension).

    python3 test/bench/bench.py [--binary ./apm-ext] [--runs N] [--quick]
                          [--json FILE] [--only cold,size,latency,tls,secrets,throughput]
                          [--cpu N] [--keep] [--tput-mb N] [--wide FILE]

Prints a table: figure | apm-ext | floor | status, every line within 100
columns (a long figure name goes on over more lines; a row's target, or what
it is compared with, on the line below it), then notes. The same table with
one line per figure (figure | apm-ext | floor | target | status) and the
notes unwrapped go to build/bench.txt (--wide). The status column is
information only: the bench never fails on a time or a size. It exits 1
only when something broke (a binary crashed, never registered, answered
with an error, lost data...), 2 on bad usage.

How the figures are taken
-------------------------
* One process plays Lambda, the agent and the telemetry sender: a
  single-threaded poll loop (no threads, so no GIL hand-offs; gc is off
  while measuring). Every read is stamped by the kernel (SO_TIMESTAMPNS,
  CLOCK_REALTIME; on loopback the stamp is taken when the peer's write
  enters the stack), so a figure is the time between the extension's own
  writes, not the time Python took to notice them. Where the kernel gives
  no stamp, the time poll() returned is used (the notes say how many).
  Our own instants (exec, INVOKE sent) are time.time_ns(), the same clock.
* exec: now() right before os.posix_spawn(). Its return is no good mark:
  glibc spawns the vfork way, so it returns once the child has exec'd, but
  on a busy machine our process may get a CPU again only after the child
  has registered. Our own writes are stamped just before the write for the
  same reason (the woken extension may run before the write returns).
  "received" is the kernel stamp of the first bytes of that request.
* Everything (bench, sinks, extensions) is pinned to one CPU (--cpu): as
  in a small Lambda function (a fraction of one vCPU), and because in a
  VM a wake-up sent to an idle (halted) vCPU can take milliseconds, which
  would swamp the figures with noise. (Except the throughput sinks: see
  throughput.py.)

The figures, one module each beside this file (its docstring says how that
figure is taken), in the order they run (--only names):
* cold: cold_start.py, cold start and idle memory against the floor;
* size: size.py, the binary's size, by section and by origin;
* latency: latency.py, the latency each invocation adds;
* tls: tls.py, cold start and first invocations with https:// vs http://,
  and a new connection's cost with session resumption;
* secrets: secrets_manager.py, the secret token fetched from (fake) Secrets
  Manager vs given in the environment;
* throughput: throughput.py, MB/s through apm-ext against the sinks alone.
Shared by them: common.py (constants, helpers, statistics, the run context
Ctx, row()), harness.py (the extension process, the fake Lambda, the agent's
HTTP client and run helpers) and table.py (printing).

Adding a figure: write a module with a function taking the Ctx and returning
a list of row() dicts, and add it to MEASUREMENTS below.
"""

import argparse
import gc
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))           # test/bench
if HERE not in sys.path:
    sys.path.insert(0, HERE)        # the modules beside this file, wherever we are run from

from common import BUILD, ROOT, STAMPS, BenchError, Ctx, Skip  # noqa: E402
from cold_start import m_cold_start  # noqa: E402
from latency import m_latency  # noqa: E402
from secrets_manager import m_secrets  # noqa: E402
from size import m_size  # noqa: E402
from table import print_narrow_table, print_table, print_wrapped  # noqa: E402
from throughput import m_throughput  # noqa: E402
from tls import m_tls_cold  # noqa: E402

MEASUREMENTS = [("cold", m_cold_start), ("size", m_size), ("latency", m_latency),
                ("tls", m_tls_cold), ("secrets", m_secrets), ("throughput", m_throughput)]


def parse_args(argv):
    """(the parser, its args, the set of measurements to run or None: all)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=os.path.join(ROOT, "apm-ext"))
    ap.add_argument("--runs", type=int, default=100,
                    help="cold starts per binary and invocations per latency case (default 100)")
    ap.add_argument("--quick", action="store_true", help="5 runs: a smoke test for CI")
    ap.add_argument("--json", metavar="FILE", help="also write the figures there")
    ap.add_argument("--only", metavar="NAMES",
                    help="comma-separated subset of: " + ",".join(n for n, _ in MEASUREMENTS))
    ap.add_argument("--keep", action="store_true", help="keep the extensions' logs")
    ap.add_argument("--wide", metavar="FILE", default=os.path.join(BUILD, "bench.txt"),
                    help="also write the table there with one line per figure, and the notes "
                         "unwrapped (default build/bench.txt; '' for none)")
    ap.add_argument("--tput-mb", type=int, default=None, metavar="N",
                    help="1 MiB agent requests per throughput run (default 100; --quick: 32)")
    ap.add_argument("--cpu", type=int, default=None,
                    help="CPU to pin the bench, the sink and the extensions to (default: the "
                         "last one allowed; -1: no pinning)")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs = min(args.runs, 5)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    only = set(args.only.split(",")) if args.only else None
    if only and only - {n for n, _ in MEASUREMENTS}:
        ap.error("unknown measurement(s): %s" % ",".join(only - {n for n, _ in MEASUREMENTS}))
    return ap, args, only


def pin_cpu(ap, args):
    """Pin the bench, and so every child, to --cpu. Returns (the CPUs allowed,
    the CPU pinned to or -1)."""
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[-1] if args.cpu is None else args.cpu
    if cpu >= 0:
        try:
            os.sched_setaffinity(0, {cpu})      # inherited by every child
        except OSError as e:
            ap.error("cannot pin to CPU %d: %s" % (cpu, e))
    return cpus, cpu


def run_measurements(ctx, only):
    """The rows of every measurement in `only` (None: all), in order."""
    rows, took = [], []
    for name, fn in MEASUREMENTS:
        if only is None or name in only:
            t_m = time.monotonic()
            try:
                rows += fn(ctx)
            except Skip as e:
                ctx.notes.append("%s skipped: %s" % (name, e))
            gc.collect()
            took.append("%s %.1fs" % (name, time.monotonic() - t_m))
    ctx.notes.append("time per measurement: " + ", ".join(took))
    return rows


def write_wide(wide, title, rows, notes):
    """The table with one line per figure and the notes unwrapped into the
    file wide (--wide); returns wide, or None if there is none or it failed."""
    if not wide:
        return wide
    try:
        os.makedirs(os.path.dirname(os.path.abspath(wide)), exist_ok=True)
        with open(wide, "w") as f:
            print(title + "\n", file=f)
            print_table(rows, out=f)
            if notes:
                print(file=f)
            for n in notes:
                print("note: " + n, file=f)
    except OSError as e:
        print_wrapped("cannot write %s: %s" % (wide, e), "bench: ", out=sys.stderr)
        return None
    return wide


def print_report(ctx, title, rows, notes, wide):
    """The terminal output: title, the narrow table, the notes, what broke."""
    print_wrapped(title)
    print()
    print_narrow_table(rows)
    if notes:
        print()
        for n in notes:
            print_wrapped(n, "note: ")
    if ctx.args.keep:
        print_wrapped(ctx.tmp, "logs kept in ")
    if wide:
        print()
        print_wrapped(os.path.relpath(wide), "the table with one line per figure: ")
    for b in ctx.broken:
        print_wrapped(b, "bench: BROKEN: ", out=sys.stderr)


def main(argv=None):
    ap, args, only = parse_args(argv)
    cpus, cpu = pin_cpu(ap, args)
    t0 = time.monotonic()
    rows, ctx = [], None
    try:
        ctx = Ctx(args)
        if cpu >= 0:
            ctx.cpu = cpu
            others = [c for c in cpus if c != cpu]
            ctx.remote_cpu = others[-1] if others else None
        gc.disable()
        rows = run_measurements(ctx, only)
    except BenchError as e:
        print("bench: FAILED: %s" % e, file=sys.stderr)
        return 1
    finally:
        gc.enable()
        if ctx is not None:
            ctx.close()
    if STAMPS["poll"]:
        ctx.notes.append("%d of %d reads had no kernel timestamp: poll() return time used"
                         % (STAMPS["poll"], STAMPS["poll"] + STAMPS["kernel"]))
    title = ("apm-ext bench: %s (%d bytes), %d runs, %s, %.1fs, Linux %s"
             % (os.path.relpath(ctx.binary), os.path.getsize(ctx.binary), args.runs,
                "all on CPU %d" % cpu if cpu >= 0 else "not pinned (%d CPUs)" % len(cpus),
                time.monotonic() - t0, os.uname().release))
    notes = ctx.notes + ctx.log_notes()
    wide = write_wide(args.wide, title, rows, notes)
    print_report(ctx, title, rows, notes, wide)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"binary": ctx.binary, "size": os.path.getsize(ctx.binary),
                       "runs": args.runs, "rows": rows, "notes": notes, "raw": ctx.raw,
                       "broken": ctx.broken}, f, indent=1, default=str)
    return 1 if ctx.broken else 0


if __name__ == "__main__":
    sys.exit(main())
