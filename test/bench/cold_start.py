"""Cold start and idle memory (bench.py --only cold): apm-ext against the floor.

* Cold starts: a fresh fake Lambda and process per run, apm-ext and the
  floor alternating (the order flips every round). After the first /next,
  VmHWM is read from /proc/<pid>/status, then SHUTDOWN is sent; the process
  must exit 0.
* exec: now() right before os.posix_spawn() (see bench.py); "received" is
  the kernel stamp of the first bytes of that request.
"""

import gc
import time

from common import BenchError, row, stats, us
from harness import Lambda


def cold_start_once(ctx, key, path, argv0):
    lam = Lambda(telemetry=True)
    try:
        proc = lam.spawn(path, argv0, ctx.env(), ctx.log_path("cold-" + key))
        lam.wait(lambda: lam.t_register is not None, "%s to register" % key)
        lam.wait(lambda: lam.nexts, "%s's first /event/next" % key)
        time.sleep(0.002)                       # let it settle in poll()
        st = proc.status()
        code, t_exit = lam.shutdown()
        if code != 0:
            raise BenchError("%s exited %s after SHUTDOWN\n%s" % (key, code, proc.log_tail()))
        if lam.errors:
            raise BenchError("%s made protocol errors: %s" % (key, lam.errors))
        if key == "apm":
            if lam.subscription is None:
                raise BenchError("apm-ext did not subscribe to telemetry")
            ctx.check_log(proc, "cold starts")
        ru = proc.rusage
        return {"register": lam.t_register - proc.t_exec,
                "next": lam.nexts[0] - proc.t_exec,
                "register_after_spawn": lam.t_register - proc.t_spawned,
                "init_after_register": lam.nexts[0] - lam.t_register,
                "next_own": lam.nexts[0] - proc.t_exec - lam.answer_ns,
                "answer": lam.answered["register"] - lam.t_register,
                "reg_to_sub": (lam.t_subscribe - lam.answered["register"])
                if lam.t_subscribe else None,
                "last_to_next": lam.nexts[0] - max(lam.answered.values()),
                "spawn": proc.t_spawned - proc.t_exec,
                "hwm_kb": st["VmHWM"], "rss_kb": st["VmRSS"],
                "exit": t_exit,
                "cpu_us": (ru.ru_utime + ru.ru_stime) * 1e6 if ru else None}
    finally:
        lam.close()


def m_cold_start(ctx):
    """Cold start and idle memory, apm-ext and floor alternating."""
    runs = {"apm": [], "floor": []}
    bins = ctx.binaries()
    for key, path, argv0 in bins:            # warm the page cache, not counted
        cold_start_once(ctx, key, path, argv0)
    gc.collect()
    for i in range(ctx.args.runs):
        for key, path, argv0 in (bins if i % 2 == 0 else bins[::-1]):
            runs[key].append(cold_start_once(ctx, key, path, argv0))
    ctx.raw["cold_start"] = runs

    def st(key, field, scale=us):
        vals = [scale(r[field]) for r in runs[key] if r[field] is not None]
        return stats(vals)
    a_next, f_next = st("apm", "next"), st("floor", "next")
    ratio = a_next["median"] / f_next["median"]
    hwm = st("apm", "hwm_kb", float)
    rows = [
        row("cold start: exec -> register received", st("apm", "register"),
            st("floor", "register"), unit="us", kind="stats"),
        row("cold start: exec -> first /next received", a_next, f_next,
            "<= 1.5x floor (%.2fx)" % ratio, ratio <= 1.5, "us", "stats"),
        row("cold start: exec -> first /next, less the fake's answer time",
            st("apm", "next_own"), st("floor", "next_own"), unit="us", kind="stats"),
        row("cold start: register -> first /next", st("apm", "init_after_register"),
            st("floor", "init_after_register"), unit="us", kind="stats"),
        row("  of which: register answered -> telemetry PUT", st("apm", "reg_to_sub"),
            None, unit="us", kind="stats"),
        row("  of which: last answer (register/PUT) -> first /next", st("apm", "last_to_next"),
            st("floor", "last_to_next"), unit="us", kind="stats"),
        row("SHUTDOWN -> exit (idle)", st("apm", "exit"), st("floor", "exit"),
            unit="us", kind="stats"),
        row("peak RSS, idle after init (VmHWM)", hwm, st("floor", "hwm_kb", float),
            "< 1024 KiB", hwm["median"] < 1024, "KiB", "stats"),
    ]
    cpu_a, cpu_f = st("apm", "cpu_us", float), st("floor", "cpu_us", float)
    if cpu_a and cpu_f and cpu_a["max"] > 0:
        rows.append(row("CPU user+sys per cold start (rusage)", cpu_a, cpu_f,
                        unit="us", kind="stats"))
    spawn = stats([us(r["spawn"]) for k in runs for r in runs[k]])
    early = sum(r["register_after_spawn"] < 0 for k in runs for r in runs[k])
    answer = stats([us(r["answer"]) for k in runs for r in runs[k]])
    ctx.notes.append("the fake Lambda answered register in %.0f us median (p90 %.0f), from "
                     "the request's kernel stamp to our write" % (answer["median"], answer["p90"]))
    ctx.notes.append("exec = the call of posix_spawn(), which returned after %.0f us median "
                     "(p90 %.0f); %d of %d registers came before it returned"
                     % (spawn["median"], spawn["p90"], early, 2 * ctx.args.runs))
    return rows
