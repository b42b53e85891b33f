"""Binary size (bench.py --only size): `size -A` of the binary (section headers
survive -s), and the same sections by origin (apm-ext.c, BearSSL, musl) from
a linker map of build/apm-ext.unstripped, linked with the Makefile's flags
minus -s.
"""

import os
import subprocess

from common import BUILD, KiB, ROOT, row


def elf_sections(path):
    """{name: bytes} of the allocated sections of an ELF file (`size -A`:
    section headers survive -s), or None without binutils."""
    try:
        r = subprocess.run(["size", "-A", path], capture_output=True, text=True)
    except OSError:
        return None
    if r.returncode != 0:
        return None
    out = {}
    for ln in r.stdout.splitlines():
        f = ln.split()
        if len(f) == 3 and f[0].startswith(".") and f[1].isdigit() and f[2] != "0":
            out[f[0]] = int(f[1])
    return out


def make_vars():
    """{MUSL_CC, CFLAGS_REL, LDFLAGS_REL, BEARSSL_A} as the Makefile sets them."""
    names = ("MUSL_CC", "CFLAGS_REL", "LDFLAGS_REL", "BEARSSL_A")
    prog = "include Makefile\n__bench_vars:\n\t@echo '%s'\n" % "|".join("$(%s)" % n for n in names)
    try:
        r = subprocess.run(["make", "-s", "--no-print-directory", "-f", "-", "__bench_vars"],
                           input=prog, capture_output=True, text=True, cwd=ROOT)
    except OSError:
        return None
    vals = r.stdout.strip().split("|")
    return dict(zip(names, vals)) if r.returncode == 0 and len(vals) == len(names) else None


def size_by_origin():
    """Bytes of the allocated non-bss sections of apm-ext by the object they
    come from: link apm-ext.c as the Makefile does, minus -s, plus a linker
    map, into build/ (once per change of the sources); None if that fails."""
    src = os.path.join(ROOT, "apm-ext.c")
    out = os.path.join(BUILD, "apm-ext.unstripped")
    mapf = out + ".map"
    v = make_vars()
    if v is None:
        return None
    newest = max(os.path.getmtime(os.path.join(ROOT, f))
                 for f in ("apm-ext.c", "apm-ext.h", "Makefile"))
    if not (os.path.exists(mapf) and os.path.getmtime(mapf) >= newest):
        ld = [x for x in v["LDFLAGS_REL"].split() if x != "-s"]
        cmd = [v["MUSL_CC"]] + v["CFLAGS_REL"].split() + ["-o", out, src, v["BEARSSL_A"]] + \
            ld + ["-Wl,-Map=" + mapf]
        os.makedirs(BUILD, exist_ok=True)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        except OSError:
            return None
        if r.returncode != 0:
            return None
    keep = set((elf_sections(out) or {})) - {".bss", ".tbss", ".comment"}
    origin = {}
    sect = None
    with open(mapf, errors="replace") as f:
        for ln in f:
            if ln.strip() == "":
                continue
            if not ln.startswith(" "):          # an output section (or another block)
                sect = ln.split()[0] if ln.startswith(".") else None
                continue
            if sect not in keep:
                continue
            parts = ln.split()
            if parts[0].startswith(".") or parts[0] == "COMMON" or parts[0] == "*fill*":
                name, parts = parts[0], parts[1:]
            else:
                name = None                     # the second line of a long input section
            if len(parts) < 2 or not parts[0].startswith("0x") or not parts[1].startswith("0x"):
                continue                        # a symbol, or a name alone on its line
            size = int(parts[1], 16)
            obj = " ".join(parts[2:])
            if name == "*fill*":
                who = "alignment padding"
            elif "libbearssl" in obj:
                who = "BearSSL"
            elif "musl" in obj or "libc.a" in obj or "crt" in os.path.basename(obj) or \
                    "libgcc" in obj:
                who = "musl libc, crt, libgcc"
            else:
                who = "apm-ext.c"
            origin[who] = origin.get(who, 0) + size
    return origin


def m_size(ctx):
    a, f = os.path.getsize(ctx.binary), os.path.getsize(ctx.floor)
    # 224 KiB: the bound the HTTPS work may grow to (it was 200 KiB until the
    # resolver process, the audit fixes and the hardening flags took 8 KiB)
    rows = [row("binary size", a / KiB, f / KiB, "<= 224 KiB", a <= 224 * KiB, "KiB")]
    sa, sf = elf_sections(ctx.binary), elf_sections(ctx.floor)
    if not sa or not sf:
        ctx.notes.append("no section sizes: `size` (binutils) failed")
        return rows
    top = [n for n in sa if n not in (".bss", ".tbss") and sa[n] >= KiB]
    small = [n for n in sa if n not in (".bss", ".tbss") and n not in top]
    for n in top:
        rows.append(row("  section %s" % n, sa[n] / KiB, sf.get(n, 0) / KiB, unit="KiB"))
    rows.append(row("  other sections (%s)" % " ".join(small), sum(sa[n] for n in small) / KiB,
                    sum(v for n, v in sf.items() if n not in top and n not in (".bss", ".tbss"))
                    / KiB, unit="KiB"))

    def rest(size, secs):
        return size - sum(v for n, v in secs.items() if n not in (".bss", ".tbss"))
    rows.append(row("  ELF headers, page alignment", rest(a, sa) / KiB, rest(f, sf) / KiB,
                    unit="KiB"))
    rows.append(row("  .bss (zeroed memory, not in the file)", sa.get(".bss", 0) / KiB,
                    sf.get(".bss", 0) / KiB, unit="KiB"))
    origin = size_by_origin()
    if origin:
        for who in ("apm-ext.c", "BearSSL", "musl libc, crt, libgcc", "alignment padding"):
            if who in origin:
                rows.append(row("  sections above by origin: %s" % who, origin[who] / KiB,
                                unit="KiB"))
    else:
        ctx.notes.append("no size by origin: could not link build/apm-ext.unstripped with a map")
    return rows
