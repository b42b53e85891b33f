#!/usr/bin/env python3
"""Line and branch coverage of apm-ext.c by the unit tests, the SigV4 test,
the end-to-end suite and the simulator (when test/sim/sim.c exists). `make
coverage` runs it through test/quality/coverage.sh.

    sh test/quality/coverage.sh [--no-run] [--check] [--update-baseline]
                        [-k SUBSTR ...] [--no-e2e]

What it does:
  1. copies apm-ext.c, apm-ext.h, test/unit/unit.c, test/unit/sigv4.c (test/sim/sim.c) to
     build/cov/src/ (others keep editing the tree while the suite runs: the
     report describes the copy that ran), and builds from it, with the host
     compiler, -O0 --coverage, no sanitizers:
        build/cov/apm-ext   the real program (its .gcda: build/cov/apm-ext-apm-ext.gcda)
        build/cov/unit      test/unit/unit.c, which includes apm-ext.c
        build/cov/sigv4     test/unit/sigv4.c linked with apm-ext.c
        build/cov/sim       test/sim/sim.c, which includes apm-ext.c (if it exists)
  2. runs build/cov/unit, build/cov/sigv4,
     `python3 test/e2e/e2e.py --binary build/cov/apm-ext` (the whole suite, about
     4 minutes on 2 cores; -k narrows it) and `build/cov/sim --quick`; logs
     in build/cov/*.log;
  3. gcovr (Debian: apt-get install gcovr) merges every .gcda by source
     into build/cov/coverage.json; this script sums its per-line and
     per-branch data by section of apm-ext.c (the `/* == N. Title ==`
     banners) and writes the uncovered regions (maximal runs of uncovered
     lines, each with its section and function) to
     build/coverage-uncovered.txt, marking those test/quality/coverage-exclusions.txt
     excuses.

--no-run       report from the data of the last run (build/cov) only.
--check        CI: compare the figures to test/quality/coverage-baseline.txt; exit 1
               if either lines or branches dropped by more than one point.
               Prints "coverage: lines X%, branches Y% (baseline ...)", then
               "1 passed, 0 failed" or "0 passed, 1 failed" last.
--update-baseline  write the figures of this run to test/quality/coverage-baseline.txt.

The headline figures are raw (every line gcov counts); the figures "without
excused lines" leave out the lines the exclusion list gives a reason for.
The baseline and --check use the raw figures.

Notes: forked children (the resolver, the simulator's one per seed) leave by
_exit(), which the coverage builds make dump gcov's counts first (see
COV_EXIT_C). An extension killed by SIGKILL (after a shutdown deadline)
writes nothing: what only such a run did shows as uncovered.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TEST = os.path.dirname(HERE)
ROOT = os.path.dirname(TEST)
COV = os.path.join(ROOT, "build", "cov")
SRC = os.path.join(COV, "src")
BEARSSL_A = os.environ.get("BEARSSL_A", "/usr/lib/x86_64-linux-gnu/libbearssl.a")
HOST_CC = os.environ.get("HOST_CC", "cc")
CFLAGS = ["-std=c11", "-O0", "-g", "--coverage", "-D_GNU_SOURCE",
          "-I/usr/include/bearssl"]
BASELINE = os.path.join(HERE, "coverage-baseline.txt")
EXCLUSIONS = os.path.join(HERE, "coverage-exclusions.txt")
UNCOVERED = os.path.join(ROOT, "build", "coverage-uncovered.txt")
JSON_OUT = os.path.join(COV, "coverage.json")
TARGET = os.path.join(SRC, "apm-ext.c")


def say(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------ build

def snapshot():
    """Copy the sources to build/cov/src; remove the counts of earlier runs."""
    if os.path.isdir(COV):
        shutil.rmtree(COV)
    for d in ("unit", "sim"):
        os.makedirs(os.path.join(SRC, "test", d))
    for f in ("apm-ext.c", "apm-ext.h"):
        shutil.copy2(os.path.join(ROOT, f), os.path.join(SRC, f))
    for f in ("unit/unit.c", "unit/sigv4.c", "sim/sim.c"):
        p = os.path.join(TEST, f)
        if os.path.exists(p):
            shutil.copy2(p, os.path.join(SRC, "test", f))


# The simulator runs each seed in a forked child, and the resolver is a
# forked child: both leave by _exit(), which skips gcov's dump at exit. In the
# coverage builds _exit is renamed to cov_exit, which dumps the counts first
# (__gcov_dump, GCC's libgcov); a child's counts include its parent's up to
# the fork, so some lines count twice: the report only asks run or not run.
COV_EXIT_C = r"""
#include <unistd.h>
extern void __gcov_dump(void);
__attribute__((noreturn)) void apm_cov_exit(int code);
void apm_cov_exit(int code) { __gcov_dump(); _exit(code); }
"""


def cc(out, srcs, extra=()):
    if isinstance(srcs, str):
        srcs = [srcs]
    wrap = os.path.join(COV, "cov_exit.o")
    cmd = [HOST_CC] + CFLAGS + ["-D_exit=apm_cov_exit"] + list(extra) + \
        ["-I" + SRC, "-o", out] + srcs + [wrap, BEARSSL_A, "-lm"]
    r = subprocess.run(cmd, cwd=COV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True)
    if r.returncode != 0:
        say("coverage: build of %s failed:\n%s" % (os.path.relpath(out, ROOT), r.stdout[-3000:]))
        return False
    return True


def build():
    with open(os.path.join(COV, "cov_exit.c"), "w") as f:
        f.write(COV_EXIT_C)
    subprocess.run([HOST_CC, "-c", "-O1", "-o", os.path.join(COV, "cov_exit.o"),
                    os.path.join(COV, "cov_exit.c")], check=True)
    ok = cc(os.path.join(COV, "apm-ext"), TARGET)
    ok_unit = cc(os.path.join(COV, "unit"), os.path.join(SRC, "test", "unit", "unit.c"),
                 ["-DAPM_EXT_TEST"])
    ok_sigv4 = cc(os.path.join(COV, "sigv4"), [os.path.join(SRC, "test", "unit", "sigv4.c"), TARGET],
                  ["-DAPM_EXT_TEST"])
    ok_sim = None
    if os.path.exists(os.path.join(SRC, "test", "sim", "sim.c")):
        ok_sim = cc(os.path.join(COV, "sim"), os.path.join(SRC, "test", "sim", "sim.c"),
                    ["-DAPM_EXT_TEST"])
    return ok, ok_unit, ok_sigv4, ok_sim


def run_suite(name, cmd, timeout):
    """Run one suite, its output in build/cov/NAME.log; return its summary line."""
    log = os.path.join(COV, name + ".log")
    t0 = time.monotonic()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    secs = time.monotonic() - t0
    summary = ""
    with open(log, errors="replace") as f:
        for line in f:
            if re.match(r"\s*\d+ passed, \d+ failed", line):
                summary = line.strip()
    say("coverage: %-5s %-40s exit %s, %.0fs  (%s)"
        % (name, summary or "(no summary)", rc, secs, os.path.relpath(log, ROOT)))
    if rc != 0:
        with open(log, errors="replace") as f:
            fails = [l.rstrip() for l in f if l.startswith("FAIL")]
        for l in fails[:20]:
            say("    " + l[:160])
    return rc


def run_all(args):
    snapshot()
    ok, ok_unit, ok_sigv4, ok_sim = build()
    if not ok:
        return False
    if ok_unit:
        run_suite("unit", [os.path.join(COV, "unit")], 600)
    if ok_sigv4:
        run_suite("sigv4", [os.path.join(COV, "sigv4")], 600)
    if not args.no_e2e:
        cmd = [sys.executable, os.path.join(TEST, "e2e", "e2e.py"), "--binary",
               os.path.join(COV, "apm-ext")]
        for k in args.k:
            cmd += ["-k", k]
        run_suite("e2e", cmd, 3600)
    if ok_sim is None:
        say("coverage: sim   skipped: test/sim/sim.c does not exist yet")
    elif ok_sim:
        run_suite("sim", [os.path.join(COV, "sim"), "--quick"], 900)
    else:
        say("coverage: sim   skipped: test/sim/sim.c did not build")
    return True


# ------------------------------------------------------------------ data

def gcovr_json():
    if not shutil.which("gcovr"):
        say("coverage: gcovr is missing (Debian: apt-get install gcovr)")
        return None
    cmd = ["gcovr", "--root", SRC, "--filter", re.escape(TARGET),
           "--json", JSON_OUT, COV]
    r = subprocess.run(cmd, cwd=COV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True)
    if r.returncode != 0:
        say("coverage: gcovr failed:\n" + r.stdout[-3000:])
        return None
    with open(JSON_OUT) as f:
        data = json.load(f)
    for fd in data.get("files", []):
        if fd["file"].endswith("apm-ext.c") and "test" not in fd["file"]:
            return fd
    say("coverage: no data for apm-ext.c in %s (did anything run?)" % JSON_OUT)
    return None


BANNER = re.compile(r"^/\* == (\d+)\. (.*?)(?: ==|$)")
FUNC_START = re.compile(r"^([A-Za-z_]\w*)\s*\(")


def source_map(lines):
    """Per line (1-based): its section "N. Title" and the function it is in."""
    section = [""] * (len(lines) + 2)
    func = [""] * (len(lines) + 2)
    cur_sec, cur_fn, pending = "0. (before the first banner)", "", ""
    for i, text in enumerate(lines, 1):
        m = BANNER.match(text)
        if m:
            cur_sec = "%s. %s" % (m.group(1), m.group(2).strip())
        m = FUNC_START.match(text)
        if m and not cur_fn:
            pending = m.group(1)
        if text.startswith("{") and pending:
            cur_fn, pending = pending, ""
        section[i] = cur_sec
        func[i] = cur_fn or pending
        if text.startswith("}"):
            cur_fn = ""
    return section, func


def load_exclusions():
    """test/quality/coverage-exclusions.txt: `function | text | reason` per line
    (text: see excused_lines)."""
    ex = []
    if not os.path.exists(EXCLUSIONS):
        return ex
    with open(EXCLUSIONS) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = [p.strip() for p in line.split(" | ", 2)]
            if len(parts) != 3 or not parts[2]:
                say("coverage: %s:%d: not `function | text | reason`: %s"
                    % (os.path.relpath(EXCLUSIONS, ROOT), n, line))
                continue
            ex.append({"func": parts[0], "text": parts[1], "reason": parts[2],
                       "line": n, "used": 0})
    return ex


def indent(line):
    return len(line.expandtabs(8)) - len(line.expandtabs(8).lstrip())


def excused_lines(spec, lines, text):
    """The lines of a region an exclusion excuses. spec: "*" (all), TEXT (a
    line containing it) or PREV >> TEXT (a line containing TEXT whose
    previous non-blank line contains PREV). A matched line takes along the
    uncovered lines of its block: before it, those indented alike; after it,
    those indented at least as deep (continuation lines, nested blocks)."""
    if spec == "*":
        return set(lines)
    prev, _, want = spec.rpartition(" >> ")
    out = set()
    for k, n in enumerate(lines):
        if want not in text[n - 1]:
            continue
        if prev:
            j = n - 2
            while j >= 0 and not text[j].strip():
                j -= 1
            if j < 0 or prev not in text[j]:
                continue
        depth = indent(text[n - 1])
        out.add(n)
        i = k - 1  # back over the statements before it in the same block
        while i >= 0 and indent(text[lines[i] - 1]) == depth:
            out.add(lines[i])
            i -= 1
        i = k + 1  # on over what it holds and its continuation lines
        while i < len(lines) and indent(text[lines[i] - 1]) >= depth:
            out.add(lines[i])
            i += 1
    return out


def pct(a, b):
    return 100.0 * a / b if b else 100.0


def analyse(fd):
    with open(TARGET, errors="replace") as f:
        text = f.read().split("\n")
    section, func = source_map(text)
    lines = {}
    for ln in fd["lines"]:
        if ln.get("gcovr/noncode"):
            continue
        n = ln["line_number"]
        lines[n] = {"count": ln["count"],
                    "br": [b["count"] for b in ln.get("branches", [])]}
    # regions: maximal runs of uncovered lines (lines without code do not
    # break a run; a covered line does)
    regions, cur = [], None
    for n in sorted(lines):
        if lines[n]["count"] == 0:
            if cur and cur["func"] == func[n]:
                cur["lines"].append(n)
            else:
                cur = {"lines": [n], "func": func[n], "section": section[n]}
                regions.append(cur)
        else:
            cur = None
    ex = load_exclusions()
    excused = set()
    for r in regions:
        r["reason"] = ""
        r["excused"] = set()
        for e in ex:
            if e["func"] not in ("*", r["func"]):
                continue
            hit = excused_lines(e["text"], r["lines"], text)
            if hit - r["excused"]:
                r["excused"] |= hit
                r["reason"] = r["reason"] or e["reason"]
                e["used"] += 1
        excused |= r["excused"]
    # a region counts as excused when all its lines are; the rest is split off
    split = []
    for r in regions:
        if r["excused"] and r["excused"] != set(r["lines"]):
            rest = [n for n in r["lines"] if n not in r["excused"]]
            split.append(dict(r, lines=rest, reason="", excused=set()))
            r["lines"] = [n for n in r["lines"] if n in r["excused"]]
    regions = sorted(regions + split, key=lambda r: r["lines"][0])
    # sums: overall and by section
    secs = {}
    order = []
    tot = {"l": 0, "lc": 0, "b": 0, "bc": 0, "lx": 0, "bx": 0, "bcx": 0}

    def add(key, n, d):
        if key not in secs:
            secs[key] = {"l": 0, "lc": 0, "b": 0, "bc": 0, "lx": 0, "bx": 0, "bcx": 0}
            order.append(key)
        s = secs[key]
        for t in (s, tot):
            t["l"] += 1
            t["lc"] += d["count"] > 0
            t["b"] += len(d["br"])
            t["bc"] += sum(1 for c in d["br"] if c > 0)
            if n in excused:
                t["lx"] += 1
                t["bx"] += len(d["br"])
                t["bcx"] += sum(1 for c in d["br"] if c > 0)
    for n in sorted(lines):
        add(section[n], n, lines[n])
    return {"text": text, "lines": lines, "regions": regions, "secs": secs,
            "order": order, "tot": tot, "ex": ex, "func": func, "section": section}


def figures(t):
    return pct(t["lc"], t["l"]), pct(t["bc"], t["b"])


def report(a):
    tot = a["tot"]
    lp, bp = figures(tot)
    say("")
    ran = [n for n in ("unit", "sigv4", "e2e", "sim")
           if os.path.exists(os.path.join(COV, n + ".log"))]
    say("coverage of apm-ext.c (%s):" % " + ".join(ran or ["nothing ran"]))
    say("  %-46s %14s %16s" % ("section", "lines", "branches"))
    for k in sorted(a["order"], key=lambda s: int(s.split(".")[0])):
        s = a["secs"][k]
        say("  %-46s %5d/%-5d %5.1f%% %6d/%-5d %5.1f%%"
            % (k[:46], s["lc"], s["l"], pct(s["lc"], s["l"]),
               s["bc"], s["b"], pct(s["bc"], s["b"])))
    say("  %-46s %5d/%-5d %5.1f%% %6d/%-5d %5.1f%%"
        % ("total", tot["lc"], tot["l"], lp, tot["bc"], tot["b"], bp))
    lx = pct(tot["lc"], tot["l"] - tot["lx"])
    bx = pct(tot["bc"] - tot["bcx"], tot["b"] - tot["bx"])
    say("  without excused lines (%d lines, %d branches, test/quality/coverage-exclusions.txt):"
        " lines %.1f%%, branches %.1f%%" % (tot["lx"], tot["bx"], lx, bx))
    open_regions = [r for r in a["regions"] if not r["reason"]]
    say("  uncovered: %d regions, %d lines; not excused: %d regions, %d lines"
        % (len(a["regions"]), sum(len(r["lines"]) for r in a["regions"]),
           len(open_regions), sum(len(r["lines"]) for r in open_regions)))
    unused = [e for e in a["ex"] if not e["used"]]
    for e in unused:
        say("  note: exclusion at test/quality/coverage-exclusions.txt:%d matches nothing"
            " uncovered now: %s | %s" % (e["line"], e["func"], e["text"]))
    # biggest open regions, and open lines by function
    byfn = {}
    for r in open_regions:
        k = (r["section"], r["func"] or "(file scope)")
        byfn[k] = byfn.get(k, 0) + len(r["lines"])
    top = sorted(byfn.items(), key=lambda kv: -kv[1])[:15]
    say("  functions with the most uncovered, not excused lines:")
    for (sec, fn), n in top:
        say("    %4d  %-32s %s" % (n, fn, sec))
    write_uncovered(a)
    say("  uncovered regions: %s" % os.path.relpath(UNCOVERED, ROOT))
    return lp, bp


def write_uncovered(a):
    text, lines = a["text"], a["lines"]
    os.makedirs(os.path.dirname(UNCOVERED), exist_ok=True)
    with open(UNCOVERED, "w") as f:
        f.write("# Uncovered regions of apm-ext.c (copy in build/cov/src), by section.\n"
                "# SECTION | FUNCTION | LINES (count) | excused: reason, or TODO\n"
                "# then each uncovered line: number and text. Also: uncovered branches\n"
                "# on covered lines (line: taken/total).\n\n")
        cur = None
        for r in a["regions"]:
            if r["section"] != cur:
                cur = r["section"]
                f.write("\n== %s\n" % cur)
            ln = r["lines"]
            f.write("%s | lines %d-%d (%d) | %s\n"
                    % (r["func"] or "(file scope)", ln[0], ln[-1], len(ln),
                       "excused: " + r["reason"] if r["reason"] else "TODO"))
            for n in ln:
                f.write("    %5d  %s\n" % (n, text[n - 1].rstrip()))
        f.write("\n\n# Partly taken branches on covered lines\n")
        for n in sorted(lines):
            d = lines[n]
            if d["count"] > 0 and d["br"] and any(c == 0 for c in d["br"]):
                f.write("%5d  %d/%d  %-24s %s\n"
                        % (n, sum(1 for c in d["br"] if c), len(d["br"]),
                           a["func"][n] or "-", text[n - 1].strip()[:90]))


# --------------------------------------------------------------- baseline

def read_baseline():
    vals = {}
    if not os.path.exists(BASELINE):
        return None
    with open(BASELINE) as f:
        for line in f:
            m = re.match(r"^(lines|branches)\s+([\d.]+)", line)
            if m:
                vals[m.group(1)] = float(m.group(2))
    if "lines" in vals and "branches" in vals:
        return vals
    return None


def write_baseline(lp, bp):
    with open(BASELINE, "w") as f:
        f.write("# Coverage of apm-ext.c by unit + e2e (+ sim), raw gcov figures in per cent.\n"
                "# test/quality/coverage.sh --check fails when either drops by more than 1 point;\n"
                "# test/quality/coverage.sh --update-baseline rewrites this file.\n"
                "lines %.1f\nbranches %.1f\n" % (lp, bp))
    say("coverage: baseline written: %s" % os.path.relpath(BASELINE, ROOT))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-run", action="store_true",
                    help="report from the data of the last run (build/cov)")
    ap.add_argument("--check", action="store_true",
                    help="fail if lines or branches dropped > 1 point below the baseline")
    ap.add_argument("--update-baseline", action="store_true")
    ap.add_argument("--no-e2e", action="store_true", help="unit (and sim) only")
    ap.add_argument("-k", action="append", default=[],
                    help="only these e2e scenarios (substring, repeatable)")
    args = ap.parse_args(argv)
    ok = True
    if not args.no_run:
        ok = run_all(args)
    fd = gcovr_json() if ok else None
    if fd is None:
        if args.check:
            say("coverage: no figures")
            say("0 passed, 1 failed")
        return 1
    a = analyse(fd)
    lp, bp = report(a)
    if args.update_baseline:
        write_baseline(lp, bp)
    base = read_baseline()
    if base:
        line = ("coverage: lines %.1f%%, branches %.1f%% (baseline lines %.1f%%, branches %.1f%%)"
                % (lp, bp, base["lines"], base["branches"]))
    else:
        line = "coverage: lines %.1f%%, branches %.1f%% (no baseline)" % (lp, bp)
    say(line)
    if args.check:
        if base is None:
            say("coverage: %s is missing or unreadable" % os.path.relpath(BASELINE, ROOT))
            say("0 passed, 1 failed")
            return 1
        drops = []
        if lp < base["lines"] - 1.0:
            drops.append("lines %.1f%% < %.1f%% - 1" % (lp, base["lines"]))
        if bp < base["branches"] - 1.0:
            drops.append("branches %.1f%% < %.1f%% - 1" % (bp, base["branches"]))
        if drops:
            say("coverage: dropped: " + "; ".join(drops)
                + " (see build/coverage-uncovered.txt; if intended, --update-baseline)")
            say("0 passed, 1 failed")
            return 1
        say("1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
