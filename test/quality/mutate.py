#!/usr/bin/env python3
"""Mutation testing of apm-ext.c: do the fast tests notice a small change?

    python3 test/quality/mutate.py [--seed S] [--n N] [--lines A-B] [--changed-since REV]
                           [--ci] [--confirm] [--key KEY] [--budget SECONDS]
                           [--list] [--keep]

A seeded random sample of the lines of apm-ext.c gets one mutant each, made
by one of these operators (at most one mutant a line):
  relop    flip a relational operator: < <= > >= == != (to its boundary
           neighbour or its opposite)
  const    an integer constant plus or minus one
  negate   if (c) / while (c) -> if (!(c)) / while (!(c))
  delete   a simple statement (not a declaration, not a return) becomes ;
  return   return x; -> return 0; / return -1; / ; (deleted)
  swap     two adjacent arguments of a call swapped
Never mutated: comments, blank lines, preprocessor lines, log calls
(log_trace/debug/info/warn/error/at, with their continuation lines), code
under #ifdef APM_EXT_TEST, and declarations' array sizes.

Each mutant is written to a scratch tree, build/mut/work/ (apm-ext.c is never
touched: others build from it), and built: the release binary with musl-gcc
(-O1 -static -s), test/unit/unit.c and test/unit/sigv4.c with the host cc (-O1,
ASan+UBSan, like make's build/unit), test/sim/sim.c when it exists and passes
unmutated. Warnings that are errors for the mutant: int-conversion,
incompatible-pointer-types, return-type, implicit-function-declaration.
Then:
  invalid     it does not compile;
  same code   its release binary is byte for byte the original's: an
              equivalent mutant, left out of the rate;
  killed      a test failed: build/unit, build/sigv4, build/sim --quick, then
              a fixed set of fast, broad e2e scenarios (E2E_SET below), in
              that order, stopping at the first failure;
  timed out   a test ran past its time budget (killed, counted apart);
  flaky       an e2e scenario failed, and so did the unmutated binary when
              run on it again: left out of the rate (a loaded machine);
  survived    every test passed. Its unified diff is in the report.
Kill rate = (killed + timed out) / (killed + timed out + survived).

Before the mutants, the unmutated tree is built and every test run once: it
must pass (else the run stops), and its times set each test's budget
(3 x its time + 10 s; --budget caps the whole per-mutant run).

Mutants known to be equivalent are listed in test/quality/mutate-equivalent.txt, one
a line: `operator :: detail :: function :: line text :: reason` (the first
four fields are the key the report prints for each mutant: the operator, what
it changed, the enclosing function and the line's text, whitespace squeezed);
the sampler skips them. Where the same text appears on several lines of one
function (`return;` eight times in agent_head), the function carries the
line's rank among them: `agent_head[3]`, so that a key names one line.

Options:
  --seed S          the sample's seed (default: from the clock; always printed)
  --n N             mutants (default 30; 8 with --ci)
  --lines A-B       only lines A..B of apm-ext.c
  --changed-since REV  only lines changed since REV (git diff -U0 REV -- apm-ext.c,
                    working tree included)
  --ci              CI mode: n=8; half of the sample from the lines changed
                    since --changed-since (default HEAD~1) when there are any
                    (none when git cannot tell: a shallow clone, a first
                    commit), the rest from the whole file. A survivor in the changed
                    lines fails (exit 1); others are reported only. Last line:
                    "N passed, N failed": passed = killed + timed out,
                    failed = survivors in the changed lines.
  --confirm         run each survivor of the fast tests against the whole e2e
                    suite as well (minutes each): tells a gap of the fast set
                    from a gap of the whole suite
  --key KEY         run just the mutant with this key (repeatable), e.g. one a
                    report listed, after adding the test meant to kill it
  --list            print the sampled mutants (key and line) and exit
  --keep            keep build/mut/ afterwards

Report: stdout and build/mutate-report.txt.
"""

import argparse
import difflib
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TEST = os.path.dirname(HERE)
ROOT = os.path.dirname(TEST)
SRC = os.path.join(ROOT, "apm-ext.c")
MUT = os.path.join(ROOT, "build", "mut")
WORK = os.path.join(MUT, "work")
REPORT = os.path.join(ROOT, "build", "mutate-report.txt")
EQUIV = os.path.join(HERE, "mutate-equivalent.txt")
BEARSSL_A = os.environ.get("BEARSSL_A", "/usr/lib/x86_64-linux-gnu/libbearssl.a")
MUSL_CC = os.environ.get("MUSL_CC", "musl-gcc")
HOST_CC = os.environ.get("HOST_CC", "cc")
WERR = ["-Werror=int-conversion", "-Werror=incompatible-pointer-types",
        "-Werror=return-type", "-Werror=implicit-function-declaration"]

# Fast, broad e2e scenarios (each a few tenths of a second to ~2 s with the
# release binary): lifecycle in both strategies, encodings, shutdown,
# telemetry and platform events, proxying, the receiver's refusals, faults of
# the APM server, TLS, secrets, OTLP. Names of scenarios: each must exist (the
# runner checks), and since e2e.py -k matches substrings, every scenario whose
# name contains one of them runs too (the report prints how many in all).
E2E_SET = [
    "init_register_subscribe",
    "sync_three_invocations",
    "sync_runtime_done_without_flush",
    "sync_flush_races_invoke",
    "background",
    "agents_and_encodings",
    "payload_1mb",
    "shutdown_delivery",
    "proxy_get_root",
    "register_transaction",
    "keepalive_pipelining",
    "flags_version_and_help",
    "missing_server_url",
    "malformed_setting",
    "function_logs_forwarded",
    "timeout_reports_registered_transaction",
    "platform_report_exact_metricset",
    "platform_proxy_tx_crash_once",
    "platform_logs_carry_trace_ids",
    "platform_telemetry_garbage",
    "platform_telemetry_refused_posts",
    "platform_own_metadata_from_agent_payload",
    "platform_shutdown_report_never_comes",
    "platform_shutdown_waits_for_last_report",
    "faults_down_two_invocations_then_up",
    "timing_agent_pauses_past_forwarder_timeout",
    "faults_400_one_payload",
    "faults_429_then_ok",
    "hostile_garbage",
    "hostile_bad_chunks",
    "hostile_huge_content_length",
    "hostile_telemetry_listener",
    "audit_1_register_chunked_split",
    "audit_7_proxy_rejects_bad_targets",
    "audit_8_proxy_bodiless_answers",
    "tls_ca_file_delivery",
    "tls_keepalive_three_invocations",
    "tls_verify_off_delivery",
    "tls_payload_1mb",
    "secrets_token_every_delivery",
    "secrets_session_token_signed",
    "secrets_binary",
    "otel_raw_contract",
    "otel_refusals",
    "otel_port_off",
    "dns_name_resolved",
    "audit_9_token_crlf_rejected",
    "dns_slow_answer",
    "startup_runtime_api_missing_or_malformed",
    "startup_register_garbage",
    "startup_register_status",
    "startup_register_no_id",
    "startup_register_connection_reset",
    "startup_subscribe_connection_closed",
    "startup_log_level_warning_bad_strategy",
    "startup_intake_port_taken_v4",
    "startup_sigterm_flushes_and_exits",
    "secrets_request_unsignable",
    "secrets_access_denied",
    "secrets_second_request_too_large",
    "tls_server_closes_in_handshake",
    "tls_warm_connection_before_first_invocation",
]

KEYWORDS = {"if", "while", "for", "switch", "return", "sizeof", "do", "else",
            "case", "default", "goto", "break", "continue", "typedef", "struct",
            "union", "enum", "static", "const", "_Alignof", "alignof",
            "__attribute__", "offsetof"}
NO_SWAP = {"MIN", "MAX", "earliest", "LIT", "NEVER"}  # symmetric or macro plumbing
# comparators: swapping the two compared arguments changes only the sign, so
# a result tested for equality alone (== 0, != 0, !) keeps its meaning
COMPARATORS = {"strcmp", "strncmp", "strcasecmp", "strncasecmp", "memcmp"}
EQUALITY_TEST = re.compile(r"\s*[!=]=\s*0\b")
DECL = re.compile(r"^\s*(?:(?:const|static|unsigned|signed|struct|enum|union|volatile)\s+)*"
                  r"[A-Za-z_]\w*(?:\s+|\s*\*+\s*)(?:const\s+)?\**[A-Za-z_]\w*\s*[\[=;,)]")


def say(f, *a):
    line = " ".join(str(x) for x in a)
    print(line, flush=True)
    if f:
        f.write(line + "\n")
        f.flush()


# ------------------------------------------------------------------ source

def mask(text):
    """The text with comments, string and character literals and preprocessor
    lines (with their continuations) blanked, newlines kept: same offsets."""
    out = list(text)
    i, n = 0, len(text)
    bol = True
    while i < n:
        c = text[i]
        if bol:
            j = i
            while j < n and text[j] in " \t":
                j += 1
            if j < n and text[j] == "#":
                while j < n:
                    if text[j] == "\n" and text[j - 1] != "\\":
                        break
                    j += 1
                for k in range(i, j):
                    if out[k] != "\n":
                        out[k] = " "
                i = j
                continue
            bol = False
        if c == "\n":
            bol = True
            i += 1
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            for k in range(i, j):
                if out[k] != "\n":
                    out[k] = " "
            i = j
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            for k in range(i, j):
                out[k] = " "
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            for k in range(i + 1, min(j, n)):
                if out[k] != "\n":
                    out[k] = " "
            i = j + 1
        else:
            i += 1
    return "".join(out)


def match_paren(m, i):
    """Offset of the bracket closing the one at m[i]."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack = []
    for j in range(i, len(m)):
        c = m[j]
        if c in pairs:
            stack.append(pairs[c])
        elif c in ")]}":
            if not stack or stack.pop() != c:
                return -1
            if not stack:
                return j
    return -1


def stmt_end(m, i):
    """Offset of the ';' ending the statement starting at i (depth 0), or -1."""
    depth = 0
    for j in range(i, len(m)):
        c = m[j]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth < 0:
                return -1
        elif c == ";" and depth == 0:
            return j
    return -1


class Source:
    def __init__(self, text):
        self.text = text
        self.m = mask(text)
        self.starts = [0]
        for i, c in enumerate(text):
            if c == "\n":
                self.starts.append(i + 1)
        self.nlines = len(self.starts)
        self.skip = self._skipped_lines()
        self.func = self._functions()
        self.occurrence = self._occurrences()

    def _occurrences(self):
        """For a line whose text (whitespace squeezed) appears more than once
        in its function: its rank among them, from 1; else 0."""
        seen, rank = {}, [0] * (self.nlines + 2)
        for ln in range(1, self.nlines + 1):
            k = (self.func[ln], " ".join(self.line(ln).split()))
            seen.setdefault(k, []).append(ln)
        for lines in seen.values():
            if len(lines) > 1:
                for i, ln in enumerate(lines):
                    rank[ln] = i + 1
        return rank

    def _functions(self):
        """The function each line is in ("" at file scope): a definition has
        its name at column 0 and its body between braces at column 0."""
        func = [""] * (self.nlines + 2)
        cur, pending = "", ""
        for ln in range(1, self.nlines + 1):
            t = self.line(ln)
            mo = re.match(r"([A-Za-z_]\w*)\s*\(", t)
            if mo and not cur:
                pending = mo.group(1)
            if t.startswith("{") and pending:
                cur, pending = pending, ""
            func[ln] = cur or pending
            if t.startswith("}"):
                cur = ""
        return func

    def line_of(self, off):
        lo, hi = 0, len(self.starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.starts[mid] <= off:
                lo = mid
            else:
                hi = mid - 1
        return lo + 1

    def span(self, ln):
        a = self.starts[ln - 1]
        b = self.starts[ln] - 1 if ln < len(self.starts) else len(self.text)
        return a, b

    def line(self, ln):
        a, b = self.span(ln)
        return self.text[a:b]

    def _skipped_lines(self):
        skip = set()
        # log calls, whole statements
        for mo in re.finditer(r"\blog_(?:trace|debug|info|warn|error|at)\s*\(", self.m):
            a = mo.start()
            if self.m[self.starts[self.line_of(a) - 1]] not in " \t":
                continue  # a definition at column 0 (log_at's own)
            e = stmt_end(self.m, a)
            e = a if e < 0 else e
            for ln in range(self.line_of(a), self.line_of(e) + 1):
                skip.add(ln)
        # code only the test build has
        depth, test_depth = 0, None
        for ln in range(1, self.nlines + 1):
            s = self.line(ln).strip()
            if s.startswith("#if"):
                depth += 1
                if "APM_EXT_TEST" in s and s.startswith("#ifdef") and test_depth is None:
                    test_depth = depth
            elif s.startswith("#else") and test_depth == depth:
                test_depth = None
                skip.add(ln)
                continue
            elif s.startswith("#endif"):
                if test_depth == depth:
                    test_depth = None
                depth -= 1
            if test_depth is not None:
                skip.add(ln)
        return skip

    def eligible(self, ln):
        if ln in self.skip:
            return False
        a, b = self.span(ln)
        return self.m[a:b].strip() != ""


# --------------------------------------------------------------- operators

class Mutant:
    def __init__(self, ln, op, detail, edits, src):
        self.ln, self.op, self.detail = ln, op, detail
        self.edits = edits  # [(start, end, replacement)] on the original text
        self.text = " ".join(src.line(ln).split())
        self.func = src.func[ln] or "-"
        if src.occurrence[ln]:  # one of several identical lines: which one
            self.func += "[%d]" % src.occurrence[ln]
        self.key = "%s :: %s :: %s :: %s" % (op, detail, self.func, self.text)
        self.status, self.by, self.secs = "", "", 0.0
        self.full_only = False

    def apply(self, text):
        for a, b, rep in sorted(self.edits, reverse=True):
            text = text[:a] + rep + text[b:]
        return text


RELOPS = {"<": ["<=", ">="], "<=": ["<", ">"], ">": [">=", "<="], ">=": [">", "<"],
          "==": ["!="], "!=": ["=="]}


def ops_relop(src, ln):
    a, b = src.span(ln)
    m = src.m
    out, i, seen = [], a, {}
    while i < b:
        for tok in ("<<=", ">>=", "<<", ">>", "->", "<=", ">=", "==", "!=", "<", ">"):
            if m.startswith(tok, i):
                break
        else:
            i += 1
            continue
        if tok in RELOPS:
            k = seen.get(tok, 0)
            seen[tok] = k + 1
            for rep in RELOPS[tok]:
                out.append(("relop", "%s -> %s #%d" % (tok, rep, k), [(i, i + len(tok), rep)]))
        i += len(tok)
    return out


CONST = re.compile(r"(?<![\w.])(0[xX][0-9a-fA-F]+|\d+)([uUlL]*)(?![\w.])")
FLOAT = re.compile(r"(?<![\w.])(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?[fFlL]?(?![\w.])")


def ops_const(src, ln):
    a, b = src.span(ln)
    seg = src.m[a:b]
    decl = DECL.match(seg) is not None
    out, seen = [], {}
    floats = [(f.start(), f.end()) for f in FLOAT.finditer(seg)
              if re.search(r"[.eE]", f.group(0)) and not f.group(0)[:2].lower() == "0x"]
    for mo in CONST.finditer(seg):
        lit = mo.group(1)
        if any(fa <= mo.start() < fb for fa, fb in floats):
            continue  # part of a floating constant (1e-3, 2.5)
        # an array size in a declaration: more or less room, not behaviour
        before = seg[:mo.start()].rstrip()
        after = seg[mo.end():].lstrip()
        if decl and before.endswith("[") and after.startswith("]"):
            continue
        v = int(lit, 16) if lit[:2].lower() == "0x" else int(lit, 10)
        if lit != "0" and lit.startswith("0") and lit[:2].lower() != "0x":
            continue  # octal: leave alone
        k = seen.get(lit, 0)
        seen[lit] = k + 1
        # a negative constant (-1 as an error code) moves toward zero only:
        # callers test < 0, so -2 would be equivalent
        pre = seg[:mo.start()].rstrip()
        unary = pre.endswith("-") and (re.search(r"(?:^|[(=,?:{\[]|\breturn)\s*-$", pre)
                                       is not None)
        # a flag set or returned (x = 1; return 1;): 1 -> 2 is as true as 1
        whole = re.search(r"(?:[^=!<>]=|\breturn)\s*$", pre) and re.match(r"\s*;", seg[mo.end():])
        if unary:
            news = (v - 1,)
        elif whole and v in (0, 1):
            news = (1 - v,)
        else:
            news = (v + 1, v - 1)
        for nv in news:
            if nv < 0:
                continue
            rep = (hex(nv) if lit[:2].lower() == "0x" else str(nv))
            out.append(("const", "%s -> %s #%d" % (lit, rep, k),
                        [(a + mo.start(1), a + mo.end(1), rep)]))
    return out


def ops_negate(src, ln):
    a, b = src.span(ln)
    m = src.m
    out, seen = [], {}
    for mo in re.finditer(r"\b(if|while)\s*\(", m[a:b]):
        kw = mo.group(1)
        p = a + mo.end() - 1
        q = match_paren(m, p)
        if q < 0:
            continue
        k = seen.get(kw, 0)
        seen[kw] = k + 1
        out.append(("negate", "%s #%d" % (kw, k), [(p + 1, p + 1, "!("), (q, q, ")")]))
    return out


def stmt_start(src, ln):
    """Offset of the statement beginning this line, if one does and the code
    before it ends a statement (so deleting it keeps the structure)."""
    a, b = src.span(ln)
    m = src.m
    i = a
    while i < b and m[i] in " \t":
        i += 1
    if i >= b:
        return -1
    j = i - 1
    while j >= 0 and m[j] in " \t\n":
        j -= 1
    prev = m[j] if j >= 0 else ";"
    if prev in ";{}:)" or m[max(0, j - 3):j + 1] == "else":
        if prev == ":" and m[j - 1:j + 1] == "::":
            return -1
        return i
    return -1


def ops_delete(src, ln):
    i = stmt_start(src, ln)
    if i < 0:
        return []
    m = src.m
    a, b = src.span(ln)
    head = m[i:b]
    w = re.match(r"[A-Za-z_]\w*", head)
    if w and w.group(0) in KEYWORDS - {"break", "continue", "goto"}:
        return []
    if re.match(r"[A-Za-z_]\w*\s*:(?!:)", head):
        return []  # a label
    if w and w.group(0) in ("break", "continue", "goto"):
        pass
    elif DECL.match(head) or head.startswith(("{", "}", "(")) and not head.startswith("(void)"):
        return []
    e = stmt_end(m, i)
    if e < 0 or src.line_of(e) - ln > 5:
        return []
    body = m[i:e]
    if "{" in body and "}" not in body:
        return []
    # keep the line count: ";" then the newlines the statement spanned
    rep = ";" + "\n" * src.text[i:e + 1].count("\n")
    return [("delete", "stmt", [(i, e + 1, rep)])]


def ops_return(src, ln):
    i = stmt_start(src, ln)
    m = src.m
    if i < 0 or not re.match(r"return\b", m[i:i + 7]):
        return []
    e = stmt_end(m, i)
    if e < 0:
        return []
    expr = src.text[i + 6:e].strip()
    nl = "\n" * src.text[i:e + 1].count("\n")
    out = [("return", "delete", [(i, e + 1, ";" + nl)])]
    if expr:
        if expr != "0":
            out.append(("return", "return 0", [(i, e + 1, "return 0;" + nl)]))
        if expr != "-1":
            out.append(("return", "return -1", [(i, e + 1, "return -1;" + nl)]))
    return out


def split_args(m, p, q):
    """Top-level comma-separated argument spans inside m[p+1:q]."""
    spans, depth, s = [], 0, p + 1
    for j in range(p + 1, q):
        c = m[j]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            spans.append((s, j))
            s = j + 1
    spans.append((s, q))
    return spans


def ops_swap(src, ln):
    a, b = src.span(ln)
    m, t = src.m, src.text
    out, seen = [], {}
    for mo in re.finditer(r"\b([A-Za-z_]\w*)\s*\(", m[a:b]):
        name = mo.group(1)
        if name in KEYWORDS or name in NO_SWAP:
            continue
        before = m[a:a + mo.start()].rstrip().rstrip("*").rstrip()
        last = re.search(r"([A-Za-z_]\w*)$", before)
        if last and last.group(1) != "return":
            continue  # a declaration (a type before the name), not a call
        if a + mo.start() == a and not t[a:b].startswith((" ", "\t")):
            continue  # a function definition at column 0
        p = a + mo.end() - 1
        q = match_paren(m, p)
        if q < 0:
            continue
        args = split_args(m, p, q)
        if len(args) < 2:
            continue
        k = seen.get(name, 0)
        seen[name] = k + 1
        only_equality = name in COMPARATORS and (
            EQUALITY_TEST.match(m, q + 1) or before.endswith("!"))
        for x in range(len(args) - 1):
            if x == 0 and only_equality:
                continue
            (s1, e1), (s2, e2) = args[x], args[x + 1]
            t1, t2 = t[s1:e1].strip(), t[s2:e2].strip()
            if not t1 or not t2 or t1 == t2 or "\n" in t1 or "\n" in t2:
                continue
            o1 = s1 + t[s1:e1].index(t1)
            o2 = s2 + t[s2:e2].index(t2)
            out.append(("swap", "%s#%d args %d,%d" % (name, k, x + 1, x + 2),
                        [(o1, o1 + len(t1), t2), (o2, o2 + len(t2), t1)]))
    return out


OPERATORS = [ops_relop, ops_const, ops_negate, ops_delete, ops_return, ops_swap]


def candidates(src, ln):
    out = []
    for f in OPERATORS:
        for op, detail, edits in f(src, ln):
            out.append(Mutant(ln, op, detail, edits, src))
    return out


# ---------------------------------------------------------------- sampling

def load_equivalent():
    keys = {}
    if not os.path.exists(EQUIV):
        return keys
    with open(EQUIV) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = [p.strip() for p in line.split(" :: ")]
            if len(parts) >= 5:
                keys[" :: ".join(parts[:4])] = " :: ".join(parts[4:])
            else:
                print("mutate: %s: not `operator :: detail :: function :: line :: reason`: %s"
                      % (os.path.relpath(EQUIV, ROOT), line.strip()))
    return keys


def changed_lines(rev, lenient=False):
    """Lines of apm-ext.c (working tree) changed since rev."""
    r = subprocess.run(["git", "diff", "-U0", rev, "--", "apm-ext.c"], cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True)
    if r.returncode != 0:
        msg = "mutate: git diff %s failed: %s" % (rev, (r.stderr.strip().splitlines() or [""])[-1])
        if lenient:  # --ci in a shallow clone: sample the whole file
            print(msg + "; no changed lines")
            return set()
        raise SystemExit(msg)
    out = set()
    for mo in re.finditer(r"^@@ -\S+ \+(\d+)(?:,(\d+))? @@", r.stdout, re.M):
        start, count = int(mo.group(1)), int(mo.group(2) or "1")
        out.update(range(start, start + count))
    return out


def sample(src, lines, n, rng, equiv, skipped_equiv):
    pool = sorted(l for l in lines if 1 <= l <= src.nlines and src.eligible(l))
    rng.shuffle(pool)
    chosen = []
    for ln in pool:
        if len(chosen) >= n:
            break
        cands = candidates(src, ln)
        if not cands:
            continue
        # draw among all candidates (the same draws whatever the list of
        # equivalent ones holds), then step past known equivalent ones
        k = rng.randrange(len(cands))
        for j in range(len(cands)):
            c = cands[(k + j) % len(cands)]
            if c.key in equiv:
                skipped_equiv.append(c)
                continue
            chosen.append(c)
            break
    return chosen


# ------------------------------------------------------------------- build

def build(d, sim=True):
    """Build the tree in d. Returns (ok, error text, sim built): ok when the
    release binary, unit and sigv4 built; test/sim/sim.c is optional."""
    rel = [MUSL_CC, "-std=c11", "-O1", "-D_GNU_SOURCE", "-I/usr/include/bearssl",
           "-I" + d] + WERR + ["-o", os.path.join(d, "apm-ext"),
                               os.path.join(d, "apm-ext.c"), BEARSSL_A, "-static", "-s"]
    host = [HOST_CC, "-std=c11", "-O1", "-g0", "-D_GNU_SOURCE", "-DAPM_EXT_TEST",
            "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
            "-I/usr/include/bearssl", "-I" + d] + WERR
    jobs = [("apm-ext", rel),
            ("unit", host + ["-o", os.path.join(d, "unit"), os.path.join(d, "test", "unit", "unit.c"),
                             BEARSSL_A, "-lm"]),
            ("sigv4", host + ["-o", os.path.join(d, "sigv4"),
                              os.path.join(d, "test", "unit", "sigv4.c"),
                              os.path.join(d, "apm-ext.c"), BEARSSL_A, "-lm"])]
    if sim and os.path.exists(os.path.join(d, "test", "sim", "sim.c")):
        jobs.append(("sim", [HOST_CC, "-std=c11", "-O1", "-g0", "-D_GNU_SOURCE",
                             "-DAPM_EXT_TEST", "-I/usr/include/bearssl", "-I" + d,
                             "-o", os.path.join(d, "sim"), os.path.join(d, "test", "sim", "sim.c"),
                             BEARSSL_A, "-lm"]))
    for f in ("apm-ext", "unit", "sigv4", "sim"):
        if os.path.exists(os.path.join(d, f)):
            os.unlink(os.path.join(d, f))
    # two at a time: the machine has 2 cores, shared
    errs = {}
    pending = list(jobs)
    running = []
    while pending or running:
        while pending and len(running) < 2:
            name, cmd = pending.pop(0)
            running.append((name, subprocess.Popen(cmd, cwd=d, stdout=subprocess.PIPE,
                                                   stderr=subprocess.STDOUT,
                                                   universal_newlines=True)))
        name, p = running.pop(0)
        out, _ = p.communicate()
        if p.returncode != 0:
            errs[name] = out
            if name != "sim":
                for _, q in running:
                    q.kill()
                    q.wait()
                return False, out[-2000:], False
    sim_ok = "sim" not in errs and os.path.exists(os.path.join(d, "sim"))
    return True, errs.get("sim", "")[-2000:], sim_ok


def make_tree(d):
    for sub in ("unit", "sim"):
        os.makedirs(os.path.join(d, "test", sub), exist_ok=True)
    shutil.copy2(os.path.join(ROOT, "apm-ext.h"), os.path.join(d, "apm-ext.h"))
    for f in ("unit/unit.c", "unit/sigv4.c", "sim/sim.c"):
        p = os.path.join(TEST, f)
        if os.path.exists(p):
            shutil.copy2(p, os.path.join(d, "test", f))


# ------------------------------------------------------------------- tests

def reap_strays(binary):
    """Extensions the e2e harness left (it is killed at the first failure, and
    the fake Lambda starts each extension in a session of its own): every
    process whose executable is our scratch binary. Ours alone: the path is
    this run's scratch tree."""
    target = os.path.realpath(binary)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            exe = os.readlink("/proc/%s/exe" % pid)
        except OSError:
            continue
        if exe.replace(" (deleted)", "") == target:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


def run_step(name, cmd, budget, fail_fast_e2e=False, binary=None):
    """Run one test; returns ('pass'|'fail'|'timeout', seconds, detail)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)
    result, detail = None, ""
    tail, buf = [], b""
    fd = p.stdout.fileno()
    deadline = t0 + budget
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            result, detail = "timeout", "past its %.0f s budget" % budget
            break
        r, _, _ = select.select([fd], [], [], min(left, 1.0))
        if not r:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            tail = (tail + [line.rstrip()])[-5:]
            if fail_fast_e2e and line.startswith("FAIL") and result is None:
                result, detail = "fail", line.strip()[:200]
        if result:
            break
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGINT)  # e2e.py cleans up its fakes
            p.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            p.wait()
    else:
        p.wait()
    p.stdout.close()
    if binary:
        reap_strays(binary)
    secs = time.monotonic() - t0
    if result is None:
        if p.returncode != 0:
            result = "fail"
            fails = [l for l in tail if "FAIL" in l or "failed" in l or "ERROR" in l]
            detail = (fails[-1] if fails else (tail[-1] if tail else ""))
            detail = "exit %s: %s" % (p.returncode, detail.strip()[:200])
        else:
            result = "pass"
    return result, secs, detail


def flaky(detail, orig_exe):
    """An e2e scenario failed with the mutant: does the unmutated binary pass
    it now? (A loaded machine can fail a timing scenario.)"""
    mo = re.match(r"FAIL (\S+?):", detail)
    if not mo:
        return False
    cmd = [sys.executable, os.path.join(TEST, "e2e", "e2e.py"), "--binary", orig_exe,
           "-k", mo.group(1)]
    res, _, _ = run_step("e2e-orig", cmd, 300, True, orig_exe)
    return res != "pass"


def steps(d, sim):
    out = [("unit", [os.path.join(d, "unit")], False, None),
           ("sigv4", [os.path.join(d, "sigv4")], False, None)]
    if sim and os.path.exists(os.path.join(d, "sim")):
        out.append(("sim", [os.path.join(d, "sim"), "--quick"], False, None))
    cmd = [sys.executable, os.path.join(TEST, "e2e", "e2e.py"), "--binary",
           os.path.join(d, "apm-ext")]
    for s in E2E_SET:
        cmd += ["-k", s]
    out.append(("e2e", cmd, True, os.path.join(d, "apm-ext")))
    return out


def e2e_exact_filter():
    """e2e.py -k matches substrings: check which scenarios the set selects."""
    r = subprocess.run([sys.executable, os.path.join(TEST, "e2e", "e2e.py"), "--list"],
                       cwd=ROOT, stdout=subprocess.PIPE, universal_newlines=True)
    names = [l.split()[0] for l in r.stdout.splitlines() if l.strip()]
    missing = [s for s in E2E_SET if s not in names]
    chosen = [n for n in names if any(s in n for s in E2E_SET)]
    return missing, chosen


# -------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description="mutation testing of apm-ext.c")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--n", type=int)
    ap.add_argument("--lines")
    ap.add_argument("--changed-since", metavar="REV")
    ap.add_argument("--ci", action="store_true")
    ap.add_argument("--budget", type=float, default=120.0,
                    help="cap of one mutant's test run, seconds (default 120)")
    ap.add_argument("--confirm", action="store_true",
                    help="run each survivor against the whole e2e suite too")
    ap.add_argument("--key", action="append", default=[],
                    help="run the mutant with this key (as the report prints it); repeatable")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    n = args.n if args.n is not None else (8 if args.ci else 30)
    rng = random.Random(seed)
    with open(SRC) as f:
        orig = f.read()
    src = Source(orig)
    lines = set(range(1, src.nlines + 1))
    if args.lines:
        mo = re.match(r"^(\d+)-(\d+)$", args.lines)
        if not mo:
            raise SystemExit("mutate: --lines A-B")
        lines &= set(range(int(mo.group(1)), int(mo.group(2)) + 1))
    changed = set()
    rev = args.changed_since or ("HEAD~1" if args.ci else None)
    if rev:
        changed = changed_lines(rev, lenient=args.ci)
    equiv = load_equivalent()
    every = {" ".join(c.key.split()) for ln in range(1, src.nlines + 1)
             if src.eligible(ln) for c in candidates(src, ln)}
    for k in sorted(k for k in equiv if " ".join(k.split()) not in every):
        print("mutate: %s names no mutant of apm-ext.c now (update or delete it): %s"
              % (os.path.relpath(EQUIV, ROOT), k))
    skipped_equiv = []
    if args.key:
        want = {" ".join(k.split()) for k in args.key}
        mutants = []
        for ln in range(1, src.nlines + 1):
            if src.eligible(ln):
                mutants += [c for c in candidates(src, ln)
                            if " ".join(c.key.split()) in want]
        found = {" ".join(c.key.split()) for c in mutants}
        for k in sorted(want - found):
            print("mutate: no such mutant in apm-ext.c now: %s" % k)
    elif args.ci:
        near = sample(src, lines & changed, n // 2 if changed else 0, rng, equiv, skipped_equiv)
        taken = {m.ln for m in near}
        rest = sample(src, lines - taken, n - len(near), rng, equiv, skipped_equiv)
        mutants = near + rest
    else:
        if args.changed_since:
            lines &= changed
        mutants = sample(src, lines, n, rng, equiv, skipped_equiv)
    mutants.sort(key=lambda m: m.ln)

    os.makedirs(os.path.dirname(REPORT), exist_ok=True)
    rep = open(REPORT, "w")
    eligible = sum(1 for l in lines if src.eligible(l))
    if args.key:
        say(rep, "mutate: %d mutants by key" % len(mutants))
    else:
        say(rep, "mutate: seed %d, %d mutants over %d eligible lines of apm-ext.c%s%s"
            % (seed, len(mutants), eligible,
               " (lines %s)" % args.lines if args.lines else "",
               " (changed since %s: %d lines)" % (rev, len(changed)) if rev else ""))
    if args.list:
        for m in mutants:
            say(rep, "%5d  %s" % (m.ln, m.key))
        return 0
    missing, chosen = e2e_exact_filter()
    if missing:
        say(rep, "mutate: e2e scenarios not found (E2E_SET): %s" % ", ".join(missing))
    say(rep, "mutate: e2e set: %d scenarios" % len(chosen))

    # the unmutated tree: must build and pass; its times set the budgets
    if os.path.isdir(MUT):
        shutil.rmtree(MUT)
    make_tree(WORK)
    with open(os.path.join(WORK, "apm-ext.c"), "w") as f:
        f.write(orig)
    t0 = time.monotonic()
    ok, err, use_sim = build(WORK)
    if not ok:
        say(rep, "mutate: the unmutated tree does not build:\n" + err)
        say(rep, "0 passed, 1 failed")
        return 1
    if not os.path.exists(os.path.join(TEST, "sim", "sim.c")):
        say(rep, "mutate: test/sim/sim.c does not exist yet: no simulator runs")
    elif not use_sim:
        say(rep, "mutate: test/sim/sim.c does not build; no simulator runs:\n  "
            + "\n  ".join([l for l in err.splitlines() if "error" in l][:5]))
    build_secs = time.monotonic() - t0
    with open(os.path.join(WORK, "apm-ext"), "rb") as f:
        orig_bin = f.read()
    orig_exe = os.path.join(MUT, "orig", "apm-ext")
    os.makedirs(os.path.dirname(orig_exe))
    shutil.copy2(os.path.join(WORK, "apm-ext"), orig_exe)
    budgets = {}
    for name, cmd, ff, binary in steps(WORK, use_sim):
        res, secs, detail = run_step(name, cmd, 600, ff, binary)
        if res != "pass" and name == "sim":
            say(rep, "mutate: the unmutated tree fails sim (%s): no simulator runs" % detail)
            use_sim = False
            continue
        if res != "pass":
            say(rep, "mutate: the unmutated tree fails %s (%s): fix that first" % (name, detail))
            say(rep, "0 passed, 1 failed")
            return 1
        budgets[name] = 3 * secs + 10
        say(rep, "mutate: baseline %-5s passed in %5.1fs (budget %.0fs)"
            % (name, secs, budgets[name]))
    say(rep, "mutate: baseline build %.1fs" % build_secs)

    counts = {"killed": 0, "timed out": 0, "survived": 0, "invalid": 0, "same code": 0,
              "flaky": 0}
    t_all = time.monotonic()
    for i, m in enumerate(mutants, 1):
        t0 = time.monotonic()
        mutated = m.apply(orig)
        with open(os.path.join(WORK, "apm-ext.c"), "w") as f:
            f.write(mutated)
        ok, err, _ = build(WORK, use_sim)
        if not ok:
            m.status = "invalid"
            m.by = (err.strip().splitlines() or [""])[0][:160]
            m.by = next((l for l in err.splitlines() if "error" in l), m.by)[:200]
        else:
            with open(os.path.join(WORK, "apm-ext"), "rb") as f:
                if f.read() == orig_bin:
                    m.status = "same code"
        if not m.status:
            left = args.budget
            m.status = "survived"
            for name, cmd, ff, binary in steps(WORK, use_sim):
                budget = min(budgets[name], max(left, 1))
                res, secs, detail = run_step(name, cmd, budget, ff, binary)
                left -= secs
                if res == "fail" and name == "e2e" and flaky(detail, orig_exe):
                    m.status, m.by = "flaky", "%s: %s (the unmutated binary failed it too)" % (
                        name, detail)
                    break
                if res == "fail":
                    m.status, m.by = "killed", "%s: %s" % (name, detail)
                    break
                if res == "timeout":
                    m.status, m.by = "timed out", "%s: %s" % (name, detail)
                    break
        if m.status == "survived" and args.confirm:
            full = [sys.executable, os.path.join(TEST, "e2e", "e2e.py"), "--binary",
                    os.path.join(WORK, "apm-ext")]
            res, secs, detail = run_step("e2e-all", full, 1800, True,
                                         os.path.join(WORK, "apm-ext"))
            if res == "fail" and flaky(detail, orig_exe):
                m.status, m.by = "flaky", "whole e2e suite: %s (the unmutated binary failed it too)" % (
                    detail)
            elif res == "fail":
                m.status, m.by = "killed", "whole e2e suite (not the fast set): %s" % detail
                m.full_only = True
            elif res == "timeout":
                m.status, m.by = "timed out", "whole e2e suite: %s" % detail
                m.full_only = True
        m.secs = time.monotonic() - t0
        m.diff = "".join(difflib.unified_diff(
            orig.splitlines(True), mutated.splitlines(True),
            "a/apm-ext.c", "b/apm-ext.c", n=3))
        counts[m.status] += 1
        say(rep, "[%d/%d] %-9s %5.1fs  line %d  %s%s"
            % (i, len(mutants), m.status, m.secs, m.ln, m.key[:150],
               ("\n           by " + m.by) if m.by else ""))
    # summary
    valid = counts["killed"] + counts["timed out"] + counts["survived"]
    rate = 100.0 * (counts["killed"] + counts["timed out"]) / valid if valid else 100.0
    survivors = [m for m in mutants if m.status == "survived"]
    say(rep, "")
    say(rep, "mutate: seed %d: %d mutants in %.0fs: %d killed, %d survived, %d timed out, "
        "%d invalid, %d same code (equivalent)%s; kill rate %.1f%% of %d valid"
        % (seed, len(mutants), time.monotonic() - t_all, counts["killed"], counts["survived"],
           counts["timed out"], counts["invalid"], counts["same code"],
           ", %d flaky (left out)" % counts["flaky"] if counts["flaky"] else "", rate, valid))
    if args.confirm:
        late = sum(1 for m in mutants if m.full_only)
        say(rep, "mutate: --confirm: %d of them killed only by the whole e2e suite "
            "(the fast set misses them); fast set alone: kill rate %.1f%%"
            % (late, 100.0 * (counts["killed"] + counts["timed out"] - late) / valid
               if valid else 100.0))
    if skipped_equiv:
        say(rep, "mutate: %d candidate mutants skipped as known equivalent "
            "(test/quality/mutate-equivalent.txt)" % len(skipped_equiv))
    failed = 0
    for m in survivors:
        in_changed = m.ln in changed
        if args.ci and in_changed:
            failed += 1
        say(rep, "")
        say(rep, "SURVIVED line %d%s: %s" % (m.ln, " (changed lines)" if in_changed else "", m.key))
        say(rep, m.diff.rstrip())
    say(rep, "")
    say(rep, "report: %s" % os.path.relpath(REPORT, ROOT))
    if not args.keep:
        shutil.rmtree(MUT, ignore_errors=True)
    if args.ci:
        say(rep, "%d passed, %d failed" % (counts["killed"] + counts["timed out"], failed))
        rep.close()
        return 1 if failed else 0
    rep.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
