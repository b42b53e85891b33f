"""The bench's output: the table within WIDTH columns for the terminal
(figure | apm-ext | floor | status, a row's target on a line of its own),
the wide one (one line per figure, for build/bench.txt) and wrapped text.
"""

import sys
import textwrap


def fmt(v, kind):
    if v is None:
        return "-"
    if kind == "stats":
        return "%s (p90 %s)" % (fmt(v["median"], "num"), fmt(v["p90"], "num"))
    if kind == "rate":                  # throughput: the worst run matters, not the p90
        return "%s (min %s)" % (fmt(v["median"], "num"), fmt(v["min"], "num"))
    if isinstance(v, float) and abs(v) < 10:
        return "%.2f" % v
    return "%.0f" % v


WIDTH = 100     # the terminal output: every line within this many columns


def row_cells(r):
    """(figure (unit), apm-ext, floor, target, status) of a row, as text."""
    unit = " (%s)" % r["unit"] if r["unit"] else ""
    return (r["figure"] + unit, fmt(r["apm_ext"], r["kind"]), fmt(r["floor"], r["kind"]),
            r["target"], "BROKEN" if r.get("broken") else
            "" if r["ok"] is None else ("ok" if r["ok"] else "MISSED"))


def print_narrow_table(rows, out=sys.stdout, width=WIDTH):
    """The table within `width` columns: figure | apm-ext | floor | status. A
    figure too long for its column goes on over more lines; the row's target
    follows on a line of its own: "target: ..." when the status says whether it
    was met, "-> ..." for a comparison or a verdict."""
    cells = [row_cells(r) for r in rows]
    wa = max([len("apm-ext")] + [len(c[1]) for c in cells])
    wf = max([len("floor")] + [len(c[2]) for c in cells])
    ws = max([len("status")] + [len(c[4]) for c in cells])
    wfig = max(24, width - (wa + wf + ws + 9))

    def line(fig, a="", f="", st=""):
        print(("%s | %s | %s | %s" % (fig.ljust(wfig), a.rjust(wa), f.rjust(wf), st)).rstrip(),
              file=out)

    line("figure", "apm-ext", "floor", "status")
    print("-" * (wfig + 1) + "+" + "-" * (wa + 2) + "+" + "-" * (wf + 2) + "+" + "-" * (ws + 1),
          file=out)
    for r, (fig, a, f, target, st) in zip(rows, cells):
        ind = " " * (len(fig) - len(fig.lstrip()))
        figs = textwrap.wrap(fig, wfig, subsequent_indent=ind + "    ",
                             break_on_hyphens=False)
        line(figs[0], a, f, st)
        for x in figs[1:]:
            line(x)
        if target:
            text = ("target: " if r["ok"] is not None else "-> ") + target
            for x in textwrap.wrap(text, wfig, initial_indent=ind + "  ",
                                   subsequent_indent=ind + "    ", break_on_hyphens=False):
                line(x)


def print_wrapped(text, prefix="", out=sys.stdout, width=WIDTH):
    """text within `width` columns, the first line starting with prefix, the
    others indented as far."""
    print(textwrap.fill(text, width, initial_indent=prefix,
                        subsequent_indent=" " * len(prefix), break_on_hyphens=False), file=out)


def print_table(rows, out=sys.stdout):
    """The table with one line per figure: figure | apm-ext | floor | target | status."""
    head = ("figure", "apm-ext", "floor", "target", "status")
    cells = [head] + [row_cells(r) for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(len(head))]
    line = "+".join("-" * (x + (1 if i in (0, len(w) - 1) else 2)) for i, x in enumerate(w))
    for n, c in enumerate(cells):
        print(" | ".join(s.ljust(w[i]) if i == 0 else s.rjust(w[i]) if i in (1, 2) else
                         s.ljust(w[i]) for i, s in enumerate(c)).rstrip(), file=out)
        if n == 0:
            print(line, file=out)
