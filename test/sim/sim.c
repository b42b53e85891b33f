/*
 * sim.c - a deterministic, seeded simulation of apm-ext's whole event loop.
 *
 * THE MODEL (after SQLite's aSyscall fault injection, FoundationDB's
 * simulation and TigerBeetle's VOPR)
 *
 * The extension runs unchanged: apm-ext.c is included (its main is renamed
 * apm_ext_main under APM_EXT_TEST) and every system call of its loop and its
 * clocks go through the `io` table, which the simulator fills before calling
 * apm_ext_main. Sockets are in-memory byte streams between the extension and
 * scripted actors; there is no real network and no real time.
 *
 *  - Virtual time. A discrete-event clock. poll() returns at once when a
 *    descriptor is ready; else the clock jumps to the earlier of its timeout
 *    and the next scheduled event. A blocking read (register, telemetry
 *    subscribe) runs the events until its answer arrives. CLOCK_MONOTONIC and
 *    CLOCK_REALTIME both read the virtual clock; deadlines in Lambda events
 *    are virtual epoch milliseconds. Each loop pass costs a few virtual
 *    microseconds, so a loop that spins still sees time pass.
 *  - Streams. A connection is two channels of bytes with TCP's semantics.
 *    Every write of an actor is cut into random segments (1 byte to 64 KiB)
 *    that arrive at random increasing times, with rare pauses: that is where
 *    split reads come from, since a recv returns everything that has arrived
 *    up to its length, as Linux does (the extension rightly reads a short
 *    recv as "drained"; a simulator that returned less would report false
 *    bugs). Each direction has a receive window (4 KiB to 1 MiB): a full one
 *    gives EAGAIN, a nearly full one short writes (also injected for writes
 *    over 1 KiB). accept4 fails now and then with a spurious EAGAIN, poll
 *    with EINTR, socket() with EMFILE, socket(AF_INET6) with
 *    EAFNOSUPPORT in a world without IPv6, bind with EADDRINUSE where
 *    another process holds the OTLP port. Close with unread bytes resets the
 *    peer; a write to a peer that has gone is lost and answered with a
 *    reset; a reset leaves the bytes already received readable, then
 *    ECONNRESET, and poll says POLLERR|POLLHUP whatever was asked.
 *  - Actors, scripted from the seed:
 *      lambda    the Extensions API (register, telemetry subscribe, the
 *                /event/next long poll) and the control plane: INVOKE events
 *                with deadlines, a freeze of the whole sandbox between
 *                invocations (the clock jumps, the extension gets no loop
 *                turn; agents and the function are frozen too, the outside
 *                world - APM server, platform - is not), SHUTDOWN at the end.
 *                A due event's /next exchange may break instead (lam_fault,
 *                up to 3 times in a row; the event stays pending): a reset,
 *                a close without answer, 500/403, a malformed status line,
 *                a truncated answer, a 200 with an unknown event type or a
 *                malformed event, a reset whose reconnect is refused; the
 *                broken answers carry a trap INVOKE ("trap-N"). Events may
 *                come with Connection: close (the next /next reconnects).
 *                In a few worlds SIGTERM comes during an invocation instead
 *                of SHUTDOWN (g.got_term set as on_term does, poll
 *                interrupted with EINTR; postponed past a freeze).
 *      runtime   the function of each invocation: agent threads, function
 *                log lines (hostile text), a crash or a timeout.
 *      agent     connections to the intake listener (127.0.0.1 or ::1):
 *                intake bodies with Content-Length or chunked (identity
 *                encoding, so contents can be checked), /register/transaction,
 *                proxied GET / and POST /config/v1/agents, the
 *                ?flushed=true flush, slow (trickling) bodies, bodies cut by a
 *                reset, 100-continue, Connection: close; OTLP/HTTP exporters
 *                on the OTLP port (protobuf and JSON exports of traces,
 *                metrics, logs; GET, unknown path, text/plain, HTTP/2);
 *                agents that reset while their call is proxied, or leave a
 *                large proxied answer unread past the receiver timeout;
 *                proxied requests whose long head and 15-16 KiB body do not
 *                fit the extension's send buffer; in a few worlds a burst of
 *                more connections with proxied calls than the extension has
 *                slots (MAX_AGENT_CONNS).
 *      platform  Telemetry API POSTs in order, possibly late (delivered while
 *                frozen, read after the thaw): platform.start, function
 *                logs, runtimeDone with statuses, report; in some worlds
 *                platform.logsDropped, a record of more tokens than the
 *                extension parses at once (followed by a logsDropped),
 *                whitespace before the array, POSTs cut by a reset (sent
 *                again), one POST over the extension's 2 MiB limit.
 *      apm       the APM server: 202 (200 for OTLP), 503, 429 (with or
 *                without Retry-After), 500, 400, slow answers, stalls past the
 *                forwarder timeout (answer never comes, or it stops reading),
 *                resets mid-answer, close without answer, idle connections
 *                closed, connects refused (at once, as on loopback, or
 *                later) or never completed; the answers of proxied calls
 *                (200, 304, 2-15 KiB, over 16 KiB, Content-Encoding: gzip).
 *                In some worlds answers are framed oddly: after an interim
 *                100 or 103, chunked, ended by the close of the connection,
 *                long error texts
 *                (over ERRTEXT_MAX, up to 40 KB); a flaky server also sends
 *                bad status lines (101, "2x2", "20", "SIMP/1.0") and
 *                malformed chunked bodies.
 *  - Configuration per seed, through the environment (receiver and
 *    forwarder timeouts, queue bytes, buffer size, strategy, ports, token,
 *    capture of logs); the server's temper per seed (healthy, flaky,
 *    stalling during some invocations).
 *  - Everything random comes from the seed (two streams: the plan of the
 *    world, and the run's delays and faults). The extension's own random
 *    seed (g.rnd, from getpid) is overwritten at its first poll. A seed
 *    replays exactly.
 *
 * INVARIANTS (checked at every step - each poll return - and at exit; the
 * first one broken ends the run with a message)
 *  - Every agent request (and telemetry POST) is answered or its connection
 *    closed within the receiver timeout (+ SLACK) of its last progress (the
 *    extension reading its bytes); a proxied call also gets a forwarder
 *    timeout per proxied call ahead of it (the most that waited beside it
 *    since it was read: those ahead may be answered before it). Times are
 *    awake times: a freeze does not count.
 *  - A well-formed request gets a sensible answer: intake 202 (or 503 when
 *    the queue jams, 413 when over the limit); 408 to a prompt agent only
 *    if the APM server had trouble in the last minute; register 200; a
 *    proxied call the server's own status and body, or 502. An answer never
 *    comes without a request.
 *  - A prompt agent is never refused (closed without answer) while bodies
 *    that trickle under BODY_MIN_BYTES per receiver timeout hold slots for
 *    longer than the receiver timeout.
 *  - Every event an agent got 202 for is delivered to the APM server exactly
 *    once or counted by the extension (dropped, rejected, held at exit);
 *    nothing is delivered twice; an agent body is delivered byte for byte;
 *    a body refused with 4xx/5xx is never delivered.
 *  - Every delivered line is valid JSON (apm_json_parse) and the extension's
 *    own objects have no duplicate keys; a function log line arrives with
 *    the text that was logged (trailing newlines trimmed) and the request id
 *    of its invocation; the transaction of a crashed invocation carries the
 *    platform's status as result.
 *  - /event/next reaches Lambda before the invocation's deadline; no /next
 *    after SHUTDOWN; the extension exits (io.exit, status 0) after SHUTDOWN
 *    and before its deadline, or within 1000 ms (+ SLACK) of SIGTERM.
 *  - After a broken /next exchange, /event/next comes again within 1 s
 *    (+ SLACK); the extension takes every INVOKE Lambda delivered once and
 *    never one it did not (a trap from a broken answer).
 *  - A payload the server answered 400 is never sent again (however long
 *    the error text); a proxied answer keeps the server's Content-Encoding;
 *    a proxied request over the send buffer is answered 413; a telemetry
 *    POST over the limit is answered 413 (and closed), every other 200;
 *    the logsDropped records of POSTs answered 200 are all counted
 *    (tel.logs_dropped).
 *  - No descriptor leak: every open simulated socket is held by exactly one
 *    slot of the extension (listeners, Lambda, agents, upstreams,
 *    telemetry), every slot's descriptor is open; nothing closed twice.
 *  - Queue accounting: blocks in chains + free blocks == nblocks, no block
 *    twice, each chain as long as its payload needs; used slots == g.q.used.
 *  - The loop never blocks (a blocking read or write inside the loop), never
 *    polls a descriptor that is not open, never spins (thousands of passes
 *    without a byte moved).
 *
 * NOT SIMULATED: TLS (https servers), the AWS calls (Secrets Manager, ACM),
 * name resolution (its child process bypasses io: every address here is
 * numeric), a kept-alive Lambda connection reset while idle.
 *
 * BUGS IT FOUND (fixed in apm-ext.c; the faults that showed them stay on):
 *  - A connect to the Extensions API that failed at once (refused, or
 *    socket() EMFILE) when /next was called again was never retried: the
 *    extension waited forever (seeds 23, 38, 40 ...: "has not called
 *    /event/next again"). Now retried every NEXT_RETRY_MS.
 *  - An upstream deadline ran on through a freeze: an answer that arrived
 *    while frozen but takes two reads (a body ended by the close: the
 *    bytes, then the end; a 400 with a 40 KB error text a small receive
 *    window cut) was timed out after the thaw, and the payload sent again
 *    (seeds 331, 636, 783, 500333: "delivered twice", "a payload the
 *    server rejected with 400 came again"). Now a late poll in /next moves
 *    the deadlines on (loop_thawed), and a timeout reads what has come
 *    first (upstream_drain).
 *  - (Not a fault here) a SIGTERM raised while frozen made the first poll
 *    after the thaw return EINTR before reading what arrived, and the same
 *    timeout resent an answered delivery (loop_thawed runs after an EINTR
 *    too now). A frozen process gets its signals at the thaw, so the
 *    simulator raises it then.
 *
 * RUNNING
 *  build/sim --seed S [-v] [--state MS]
 *                                  replay one seed and print its trace: one
 *                                  line per actor action and system call of
 *                                  interest ([virtual s] who what) with the
 *                                  extension's JSON log lines between them;
 *                                  a failure ends with the extension's queue
 *                                  and connections (-v: every send and recv
 *                                  too; --state: that dump every MS virtual
 *                                  ms)
 *  build/sim --seeds N [--start S] [-j J]
 *                                  run N seeds (one forked child each, so the
 *                                  extension's static state starts fresh);
 *                                  prints one line per failing seed, then
 *                                  "N passed, N failed" as the last line
 *  build/sim --quick               the fixed set make test runs: seeds
 *                                  1..1000, ~35 s with -j 2
 *  --timeout S                     a child still running after S s of wall
 *                                  clock (default 300) fails as "hung"
 *
 * Build (make build/sim; by hand, from the repository root):
 *  cc -std=c11 -g -O1 -Wall -Wextra -Wshadow -Werror -D_GNU_SOURCE \
 *     -DAPM_EXT_TEST -fsanitize=address,undefined,float-cast-overflow \
 *     -fno-sanitize-recover=all -fno-omit-frame-pointer \
 *     -I/usr/include/bearssl -I. -o build/sim test/sim/sim.c \
 *     /usr/lib/x86_64-linux-gnu/libbearssl.a
 * Against another copy of the extension (a scratch revert, say):
 *     -DAPM_EXT_C_PATH='"/tmp/x/apm-ext.c"'
 *
 * CONTENTS
 *   1. Product, limits
 *   2. Utilities: random numbers, buffers, trace, failure
 *   3. Virtual clock and events
 *   4. Simulated sockets
 *   5. The io table
 *   6. HTTP and JSON helpers
 *   7. The plan of a world
 *   8. Actors: lambda, runtime and agents, platform, APM server
 *   9. Invariants
 *  10. Runner
 */

/* == 1. Product, limits == */

#ifndef APM_EXT_C_PATH
#define APM_EXT_C_PATH "../../apm-ext.c"
#endif
#include APM_EXT_C_PATH
#undef main

#include <ctype.h>
#include <setjmp.h>
#include <strings.h>

#define LAMBDA_PORT 9001
#define APM_PORT 8300
#define T0_US 5000000000LL             /* monotonic clock at start */
#define EPOCH0_US 1700000000000000LL   /* realtime at start (2023-11-14) */
#define NEVER_US INT64_MAX
#define FD_BASE 100                    /* simulated descriptors start here */
#define MAX_SFD 1024
#define MAX_STREAMS 8192
#define MAX_LISTENERS 8
#define MAX_INV 8
#define MAX_THREADS 4
#define MAX_STEPS 12
#define SLACK_US 250000                /* granted beyond every bound */
#define TROUBLE_EXCUSE_US 60000000     /* a server fault excuses a 408 this long */
#define MAX_POLLS 3000000
#define SPIN_LIMIT 20000               /* loop passes without a byte moved */
#define FUNCTION_ARN "arn:aws:lambda:us-east-1:123456789012:function:sim-fn"
#define AGENT_META "{\"metadata\":{\"service\":{\"name\":\"sim-fn\",\"agent\":" \
	"{\"name\":\"nodejs\",\"version\":\"4.7.0\"},\"runtime\":{\"name\":\"node\"," \
	"\"version\":\"20.0.0\"}},\"cloud\":{\"provider\":\"aws\"}}}\n"

/* == 2. Utilities: random numbers, buffers, trace, failure == */

static uint64_t rng_plan, rng_run; /* the world's plan; the run's delays and faults */
#define PR (&rng_plan)
#define RR (&rng_run)

static uint64_t
rng_next(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static uint64_t
below(uint64_t *s, uint64_t n)
{
	return n ? rng_next(s) % n : 0;
}

/* The product's MIN/MAX evaluate an argument twice: never give them a draw. */
static int64_t
max64(int64_t a, int64_t b)
{
	return a > b ? a : b;
}

static size_t
minz(size_t a, size_t b)
{
	return a < b ? a : b;
}

/* Uniform in [lo, hi]. */
static int64_t
range(uint64_t *s, int64_t lo, int64_t hi)
{
	return hi <= lo ? lo : lo + (int64_t)below(s, (uint64_t)(hi - lo) + 1);
}

static int
pct(uint64_t *s, int p)
{
	return (int)below(s, 100) < p;
}

/* A growable byte buffer holding p[off..len). */
struct xbuf {
	char *p;
	size_t off, len, cap;
};

static size_t
sb_n(const struct xbuf *b)
{
	return b->len - b->off;
}

static char *
sb_data(const struct xbuf *b)
{
	return b->p + b->off;
}

static void
sb_reserve(struct xbuf *b, size_t n)
{
	if (b->off && b->off == b->len)
		b->off = b->len = 0;
	if (b->len + n + 1 <= b->cap)
		return;
	if (b->off && b->off >= b->len - b->off) { /* amortized: half is dead */
		memmove(b->p, b->p + b->off, b->len - b->off);
		b->len -= b->off;
		b->off = 0;
		if (b->len + n + 1 <= b->cap)
			return;
	}
	size_t c = b->cap ? b->cap : 256;
	while (c < b->len + n + 1)
		c *= 2;
	b->p = realloc(b->p, c);
	if (!b->p)
		abort();
	b->cap = c;
}

static void
sb_add(struct xbuf *b, const void *p, size_t n)
{
	sb_reserve(b, n);
	if (n)
		memcpy(b->p + b->len, p, n);
	b->len += n;
	b->p[b->len] = 0;
}

static void
sb_adds(struct xbuf *b, const char *s)
{
	sb_add(b, s, strlen(s));
}

__attribute__((format(printf, 2, 3))) static void
sb_addf(struct xbuf *b, const char *fmt, ...)
{
	char tmp[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n < sizeof tmp) {
		sb_add(b, tmp, (size_t)n);
		return;
	}
	sb_reserve(b, (size_t)n);
	va_start(ap, fmt);
	vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
	va_end(ap);
	b->len += (size_t)n;
}

static void
sb_consume(struct xbuf *b, size_t n)
{
	b->off += n;
	if (b->off >= b->len)
		b->off = b->len = 0;
}

static void
sb_clear(struct xbuf *b)
{
	b->off = b->len = 0;
}

static void
sb_free(struct xbuf *b)
{
	free(b->p);
	memset(b, 0, sizeof *b);
}

/* FNV-1a, to compare bodies without keeping them. */
static uint64_t
hash64(const char *p, size_t n)
{
	uint64_t h = 1469598103934665603ull;
	for (size_t i = 0; i < n; i++)
		h = (h ^ (unsigned char)p[i]) * 1099511628211ull;
	return h;
}

static int64_t now_us = T0_US;  /* the virtual monotonic clock */
static int64_t frozen_total;    /* time spent frozen so far */
static int verbose;
static int64_t state_every_us;  /* --state MS: dump the extension's state */

/* Awake time: the clock without the freezes (the sandbox's own time). */
static int64_t
awake(void)
{
	return now_us - frozen_total;
}

static int64_t
epoch_ms_at(int64_t mono_us)
{
	return (EPOCH0_US + (mono_us - T0_US)) / 1000;
}

/* One trace line on fd 2, where the extension's log lines go too. */
__attribute__((format(printf, 2, 3))) static void
trace(const char *who, const char *fmt, ...)
{
	char line[1600];
	int64_t t = now_us - T0_US;
	int n = snprintf(line, sizeof line, "[%4lld.%06lld] %-8s ",
	    (long long)(t / 1000000), (long long)(t % 1000000), who);
	va_list ap;
	va_start(ap, fmt);
	int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
	va_end(ap);
	if (m > 0)
		n = MIN(n + m, (int)sizeof line - 2);
	line[n++] = '\n';
	(void)!write(2, line, (size_t)n);
}

/* Printable excerpt of bytes, for the trace. */
static const char *
show(const char *p, size_t n, size_t max)
{
	static char out[4][400];
	static int k;
	char *o = out[k++ & 3];
	size_t j = 0;
	for (size_t i = 0; i < n && i < max && j + 5 < sizeof out[0]; i++) {
		unsigned char c = (unsigned char)p[i];
		if (c == '\r') {
			o[j++] = '\\';
			o[j++] = 'r';
		} else if (c == '\n') {
			o[j++] = '\\';
			o[j++] = 'n';
		} else if (c < 0x20 || c >= 0x7f) {
			j += (size_t)snprintf(o + j, 5, "\\x%02x", c);
		} else {
			o[j++] = (char)c;
		}
	}
	if (n > max && j + 4 < sizeof out[0]) {
		memcpy(o + j, "...", 3);
		j += 3;
	}
	o[j] = 0;
	return o;
}

static jmp_buf run_jmp;
static int in_ext;          /* the extension is running: a failure jumps out */
static int failed;
static char fail_msg[900];

static void dump_state(void);

/* An invariant is broken: record the first, end the run. */
__attribute__((format(printf, 1, 2))) static void
fail(const char *fmt, ...)
{
	if (!failed) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(fail_msg, sizeof fail_msg, fmt, ap);
		va_end(ap);
		failed = 1;
		trace("FAIL", "%s", fail_msg);
		dump_state();
	}
	if (in_ext)
		longjmp(run_jmp, 2);
}

/* What one run did, summed over seeds by the parent. */
struct stats {
	uint64_t polls, vtime_ms, invocations, requests, acked_events,
	    delivered_events, commits, own_lines, freezes, faults, lost_payloads,
	    log_lines_checked, bytes;
	uint64_t answers[7];    /* 2xx, 408, 413, 503, 502, other 4xx/5xx, closed */
};
static struct stats st;

/* == 3. Virtual clock and events == */

enum ev_kind {
	EV_WAKE,        /* nothing: something becomes ready for the extension */
	EV_DATA,        /* a: stream; bytes (or an end) reach its actor */
	EV_ROOM,        /* a: stream; the extension read: its actor may write */
	EV_CONNECTED,   /* a: stream; the extension's connect completes */
	EV_AGENT,       /* a: agent thread; its next step */
	EV_TRICKLE,     /* a: request; one more byte of a slow body */
	EV_ARESET,      /* a: request; the agent resets its connection */
	EV_CHECK,       /* re-check the request bounds */
	EV_LAMBDA,      /* a: what, b: invocation */
	EV_RUNTIME,     /* a: invocation, b: what */
	EV_TEL,         /* a: what */
	EV_APM,         /* a: connection, b: what */
	EV_ARESUME,     /* a: agent connection; it reads again */
};

struct event {
	int64_t at;
	uint64_t seq;
	int kind, a, b;
};

static struct event *evq;
static size_t nev, evcap;
static uint64_t evseq;

static int
ev_before(const struct event *x, const struct event *y)
{
	return x->at != y->at ? x->at < y->at : x->seq < y->seq;
}

static void
ev_up(size_t i)
{
	while (i > 0) {
		size_t p = (i - 1) / 2;
		if (!ev_before(&evq[i], &evq[p]))
			break;
		struct event t = evq[i];
		evq[i] = evq[p];
		evq[p] = t;
		i = p;
	}
}

static void
ev_down(size_t i)
{
	for (;;) {
		size_t l = 2 * i + 1, r = l + 1, m = i;
		if (l < nev && ev_before(&evq[l], &evq[m]))
			m = l;
		if (r < nev && ev_before(&evq[r], &evq[m]))
			m = r;
		if (m == i)
			return;
		struct event t = evq[i];
		evq[i] = evq[m];
		evq[m] = t;
		i = m;
	}
}

static void
schedule(int64_t at, int kind, int a, int b)
{
	if (at < now_us)
		at = now_us;
	if (nev == evcap) {
		evcap = evcap ? evcap * 2 : 1024;
		evq = realloc(evq, evcap * sizeof *evq);
		if (!evq)
			abort();
	}
	evq[nev] = (struct event){ at, ++evseq, kind, a, b };
	ev_up(nev++);
}

static struct event
ev_pop(void)
{
	struct event e = evq[0];
	evq[0] = evq[--nev];
	ev_down(0);
	return e;
}

static int64_t
ev_next(void)
{
	return nev ? evq[0].at : NEVER_US;
}

/* Events of the sandbox (agents, the function) stop while it is frozen. */
static int
ev_sandboxed(int kind)
{
	return kind == EV_AGENT || kind == EV_TRICKLE || kind == EV_ARESET ||
	    kind == EV_RUNTIME || kind == EV_ARESUME;
}

static void dispatch(const struct event *e);
static int64_t freeze_from, freeze_until; /* set by the lambda actor */
static int64_t frozen_until;    /* inside a freeze: its end; else 0 */

/*
 * The sandbox is frozen until freeze_until: the extension gets no loop turn
 * (we are inside its poll), the sandbox's own events move later by the
 * freeze, the outside world's events run.
 */
static void
freeze(void)
{
	int64_t from = now_us, until = freeze_until;
	freeze_from = freeze_until = 0;
	st.freezes++;
	trace("lambda", "sandbox frozen for %lld.%03lld s (no loop turn)",
	    (long long)((until - from) / 1000000),
	    (long long)((until - from) / 1000 % 1000));
	for (size_t i = 0; i < nev; i++)
		if (ev_sandboxed(evq[i].kind))
			evq[i].at += until - from;
	for (size_t i = nev / 2 + 1; i-- > 0;)
		ev_down(i);
	frozen_until = until;
	while (nev && evq[0].at <= until) {
		struct event e = ev_pop();
		if (e.at > now_us) {
			frozen_total += e.at - now_us;
			now_us = e.at;
		}
		dispatch(&e);
	}
	frozen_until = 0;
	frozen_total += until - now_us;
	now_us = until;
	trace("lambda", "sandbox thawed");
}

/* Run every event due by now (and a freeze that starts by now). */
static void
run_due(void)
{
	for (;;) {
		if (freeze_until > now_us && freeze_from && freeze_from <= now_us) {
			freeze();
			continue;
		}
		if (!nev || evq[0].at > now_us)
			return;
		struct event e = ev_pop();
		dispatch(&e);
	}
}

/* == 4. Simulated sockets ==
 * A stream joins the extension's descriptor to an actor: `in` carries the
 * actor's bytes to the extension, `out` the extension's to the actor. Bytes
 * arrive in segments, each at its time (in order); fin/rst say when an end
 * or a reset arrives.
 */

struct seg {
	uint64_t end;           /* absolute offset after the segment */
	int64_t at;             /* when it arrives */
};

struct chan {
	struct xbuf data;       /* unread bytes, arrived or not */
	uint64_t wrote, read;   /* totals */
	struct seg *seg;
	size_t nseg, seg0, segcap;
	size_t arr;             /* segments before it have arrived */
	int64_t last_at;        /* arrival of the latest segment */
	int64_t fin_at, rst_at; /* -1: none */
	size_t window;          /* the receiver's buffer */
};

enum st_state { ST_CONNECTING, ST_REFUSED, ST_OPEN };
enum actor_kind { ACT_NONE, ACT_LAMBDA, ACT_TEL, ACT_AGENT, ACT_APM };

struct stream {
	int state;              /* enum st_state */
	int ext_fd;             /* -1: not accepted yet, or closed */
	int ext_closed;
	int64_t ext_closed_at;  /* awake time */
	int actor, aid;         /* the other end */
	struct chan in, out;
	int so_error;           /* pending SO_ERROR */
	int peer_gone;          /* the actor closed or reset: no more reading */
	int rst_reported;       /* the extension got its ECONNRESET */
	struct xbuf outbox;     /* actor bytes waiting for window room */
	int close_pending;      /* the actor's FIN follows the outbox */
	int seg_max;            /* the actor's segment size bound */
	int64_t last_ext_read;  /* awake time of the extension's last read */
	char what[40];
};

static struct stream *streams;
static int nstreams;

struct pending {
	int sid;
	int64_t at;
};

struct slistener {
	int used, fd, family, port;
	uint8_t addr[16];       /* zero: any address */
	struct pending q[256];
	int nq;
};
static struct slistener listeners[MAX_LISTENERS];

enum { SF_FREE, SF_SOCKET, SF_LISTEN, SF_STREAM };

struct sfd {
	int kind, family, nonblock, sid, li, bound, port;
	uint8_t addr[16];
};
static struct sfd sfds[MAX_SFD];
static int loop_started;        /* the first poll happened */
static uint64_t moved_at_poll;  /* polls counter when a byte last moved */

static struct sfd *
sfd_get(int fd)
{
	if (fd < FD_BASE || fd >= FD_BASE + MAX_SFD)
		return NULL;
	struct sfd *f = &sfds[fd - FD_BASE];
	return f->kind == SF_FREE ? NULL : f;
}

static void
chan_init(struct chan *c, size_t window)
{
	memset(c, 0, sizeof *c);
	c->fin_at = c->rst_at = -1;
	c->window = window;
}

/* Absolute offset up to which bytes have arrived. */
static uint64_t
chan_arrived(const struct chan *c)
{
	struct chan *m = (struct chan *)c; /* the index only moves forward */
	while (m->arr < m->nseg && m->seg[m->arr].at <= now_us)
		m->arr++;
	uint64_t end = m->arr > m->seg0 ? m->seg[m->arr - 1].end : c->read;
	return end > c->read ? end : c->read;
}

static size_t
chan_avail(const struct chan *c)
{
	return (size_t)(chan_arrived(c) - c->read);
}

static size_t
chan_unread(const struct chan *c)
{
	return (size_t)(c->wrote - c->read);
}

static size_t
chan_room(const struct chan *c)
{
	size_t u = chan_unread(c);
	return u >= c->window ? 0 : c->window - u;
}

/* Queue bytes arriving at `when` (or after the previous segment). */
static int64_t
chan_write(struct chan *c, const void *p, size_t n, int64_t when)
{
	if (when < c->last_at)
		when = c->last_at;
	c->last_at = when;
	sb_add(&c->data, p, n);
	c->wrote += n;
	if (c->nseg == c->segcap) {
		if (c->seg0 > 0) {
			memmove(c->seg, c->seg + c->seg0, (c->nseg - c->seg0) * sizeof *c->seg);
			c->nseg -= c->seg0;
			c->arr -= c->seg0;
			c->seg0 = 0;
		}
		if (c->nseg == c->segcap) {
			c->segcap = c->segcap ? c->segcap * 2 : 16;
			c->seg = realloc(c->seg, c->segcap * sizeof *c->seg);
			if (!c->seg)
				abort();
		}
	}
	c->seg[c->nseg++] = (struct seg){ c->wrote, when };
	return when;
}

static size_t
chan_read(struct chan *c, void *dst, size_t max)
{
	size_t n = MIN(max, chan_avail(c));
	memcpy(dst, sb_data(&c->data), n);
	sb_consume(&c->data, n);
	c->read += n;
	while (c->seg0 < c->nseg && c->seg[c->seg0].end <= c->read)
		c->seg0++;
	if (c->seg0 == c->nseg)
		c->seg0 = c->nseg = c->arr = 0;
	return n;
}

static int
chan_eof(const struct chan *c)
{
	return c->fin_at >= 0 && c->fin_at <= now_us && c->read == c->wrote;
}

static int
chan_rst(const struct chan *c)
{
	return c->rst_at >= 0 && c->rst_at <= now_us;
}

static const size_t windows[] = { 4096, 65536, 262144, 1u << 20 };
static const int seg_maxes[] = { 64, 1460, 1460, 8192, 8192, 65536 };

static int
stream_new(int actor, int aid, const char *what)
{
	if (nstreams == MAX_STREAMS)
		fail("simulator: too many streams");
	int sid = nstreams++;
	struct stream *s = &streams[sid];
	memset(s, 0, sizeof *s);
	s->ext_fd = -1;
	s->actor = actor;
	s->aid = aid;
	chan_init(&s->in, windows[below(RR, 4)]);
	chan_init(&s->out, windows[below(RR, 4)]);
	s->seg_max = seg_maxes[below(RR, sizeof seg_maxes / sizeof *seg_maxes)];
	snprintf(s->what, sizeof s->what, "%s", what);
	return sid;
}

/* The actor's bytes into the channel, as far as the window allows. */
static void
stream_pump(int sid)
{
	struct stream *s = &streams[sid];
	if (s->ext_closed || chan_rst(&s->in) || s->in.rst_at >= 0) {
		sb_clear(&s->outbox);
		return;
	}
	while (sb_n(&s->outbox)) {
		size_t room = chan_room(&s->in);
		if (!room)
			break;
		size_t k = MIN(sb_n(&s->outbox), room);
		k = minz(k, (size_t)range(RR, 1, s->seg_max));
		int64_t d = pct(RR, 50) ? 0 : range(RR, 0, 200);
		if (pct(RR, 1))
			d = range(RR, 1000, 50000); /* a pause */
		int64_t at = chan_write(&s->in, sb_data(&s->outbox), k, now_us + d);
		sb_consume(&s->outbox, k);
		schedule(at, EV_WAKE, 0, 0);
	}
	if (!sb_n(&s->outbox) && s->close_pending && s->in.fin_at < 0) {
		s->in.fin_at = max64(s->in.last_at, now_us + range(RR, 0, 200));
		schedule(s->in.fin_at, EV_WAKE, 0, 0);
	}
}

static void
actor_send(int sid, const void *p, size_t n)
{
	struct stream *s = &streams[sid];
	if (s->ext_closed || s->peer_gone)
		return;
	sb_add(&s->outbox, p, n);
	stream_pump(sid);
}

/* The actor closes its socket (FIN once its bytes are out). */
static void
actor_close(int sid)
{
	struct stream *s = &streams[sid];
	if (s->peer_gone)
		return;
	s->close_pending = 1;
	s->peer_gone = 1;
	stream_pump(sid);
}

/* The actor resets its connection (what it had not sent is lost). */
static void
actor_reset(int sid)
{
	struct stream *s = &streams[sid];
	sb_clear(&s->outbox);
	s->peer_gone = 1;
	if (s->in.rst_at < 0 && s->in.fin_at < 0) {
		s->in.rst_at = max64(s->in.last_at, now_us + range(RR, 0, 200));
		schedule(s->in.rst_at, EV_WAKE, 0, 0);
	}
}

/* What arrived from the extension, into b. 0 open, 1 FIN, 2 reset. */
static int
actor_take(int sid, struct xbuf *b)
{
	struct stream *s = &streams[sid];
	size_t avail = chan_avail(&s->out);
	if (avail) {
		sb_reserve(b, avail);
		chan_read(&s->out, b->p + b->len, avail);
		b->len += avail;
		b->p[b->len] = 0;
	}
	if (chan_rst(&s->out))
		return 2;
	return chan_eof(&s->out) ? 1 : 0;
}

/* Whether the extension's end has gone (seen by the actor by now). */
static int
actor_sees_end(int sid)
{
	struct stream *s = &streams[sid];
	return chan_rst(&s->out) || (s->out.fin_at >= 0 && s->out.fin_at <= now_us);
}

static int
addr_decode(const struct sockaddr *sa, socklen_t len, int *family,
    uint8_t addr[16], int *port)
{
	memset(addr, 0, 16);
	if (sa->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
		const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
		*family = AF_INET;
		memcpy(addr, &s4->sin_addr, 4);
		*port = ntohs(s4->sin_port);
		return 0;
	}
	if (sa->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
		const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;
		*family = AF_INET6;
		memcpy(addr, &s6->sin6_addr, 16);
		*port = ntohs(s6->sin6_port);
		return 0;
	}
	return -1;
}

static const uint8_t zero16[16];

static int
is_any(const uint8_t a[16])
{
	return memcmp(a, zero16, 16) == 0;
}

/* An actor connects to a listener of the extension. Stream id, or -1. */
static int
actor_connect(int family, const char *ip, int port, int actor, int aid,
    const char *what)
{
	uint8_t a[16] = { 0 };
	inet_pton(family, ip, a);
	int li = -1;
	for (int i = 0; i < MAX_LISTENERS; i++) {
		struct slistener *l = &listeners[i];
		if (l->used && l->family == family && l->port == port &&
		    (is_any(l->addr) || memcmp(l->addr, a, 16) == 0))
			li = i;
	}
	if (li < 0 || listeners[li].nq >= 128) {
		trace("io", "%s: connect to %s:%d refused", what, ip, port);
		return -1;
	}
	int sid = stream_new(actor, aid, what);
	struct stream *s = &streams[sid];
	s->state = ST_OPEN;
	int64_t at = now_us + range(RR, 0, 100);
	s->in.last_at = at; /* its first bytes come with the connection */
	listeners[li].q[listeners[li].nq++] = (struct pending){ sid, at };
	schedule(at, EV_WAKE, 0, 0);
	return sid;
}

/* == 5. The io table ==
 * What the extension calls instead of the system. Descriptors >= FD_BASE
 * are simulated sockets; the extension never gets a real one from here.
 */

static int apm_connect_fault(void);
static int lam_connect_fault(void);
static int term_eintr;      /* SIGTERM was raised: poll returns EINTR */
static void actor_connected(int sid);
static void apm_lost_request(void);
static void note_ext_read(int sid);
static void sim_check_step(void);
static void lam_exit_check(int code);
static int g_rnd_seed;

static int
sfd_alloc(void)
{
	for (int i = 0; i < MAX_SFD; i++)
		if (sfds[i].kind == SF_FREE) {
			memset(&sfds[i], 0, sizeof sfds[i]);
			return FD_BASE + i;
		}
	return -1;
}

/* Socket-level faults only once the loop runs, and only where they make sense. */
static int plan_eagain_pct(void);
static int plan_short_pct(void);
static int plan_socket_fail_pct(void);
static int plan_no_ipv6(void);
static int plan_port_taken(int port);

static int
sim_socket(int domain, int type, int proto)
{
	(void)proto;
	if ((domain != AF_INET && domain != AF_INET6) ||
	    (domain == AF_INET6 && plan_no_ipv6())) {
		errno = EAFNOSUPPORT;
		return -1;
	}
	if (loop_started && (type & SOCK_NONBLOCK) &&
	    pct(RR, plan_socket_fail_pct())) {
		st.faults++;
		trace("io", "socket: EMFILE (injected)");
		errno = EMFILE;
		return -1;
	}
	int fd = sfd_alloc();
	if (fd < 0) {
		errno = EMFILE;
		return -1;
	}
	struct sfd *f = &sfds[fd - FD_BASE];
	f->kind = SF_SOCKET;
	f->family = domain;
	f->nonblock = !!(type & SOCK_NONBLOCK);
	f->li = f->sid = -1;
	if (verbose)
		trace("io", "socket fd=%d %s%s", fd, domain == AF_INET ? "inet" :
		    "inet6", f->nonblock ? " nonblocking" : "");
	return fd;
}

static int
sim_connect(int fd, const struct sockaddr *sa, socklen_t len)
{
	struct sfd *f = sfd_get(fd);
	if (!f || f->kind != SF_SOCKET) {
		errno = f ? EISCONN : EBADF;
		return -1;
	}
	int family, port, actor = ACT_NONE;
	uint8_t a[16];
	if (addr_decode(sa, len, &family, a, &port) < 0) {
		errno = EINVAL;
		return -1;
	}
	static const uint8_t lo4[4] = { 127, 0, 0, 1 };
	if (family == AF_INET && memcmp(a, lo4, 4) == 0)
		actor = port == LAMBDA_PORT ? ACT_LAMBDA : port == APM_PORT ?
		    ACT_APM : ACT_NONE;
	if (actor == ACT_NONE) {
		trace("io", "connect fd=%d to port %d: refused (nobody there)", fd,
		    port);
		errno = ECONNREFUSED;
		return -1;
	}
	char what[40];
	snprintf(what, sizeof what, "%s fd %d", actor == ACT_LAMBDA ? "lambda" :
	    "apm", fd);
	int fault = 0;
	if (f->nonblock)
		fault = actor == ACT_APM ? apm_connect_fault() : lam_connect_fault();
	if (fault == 3 || (actor == ACT_LAMBDA && fault == 2)) {
		/* refused at once, as a loopback connect to a closed port is */
		trace("io", "connect fd=%d -> %s: refused at once (injected)", fd,
		    what);
		errno = ECONNREFUSED;
		return -1;
	}
	int sid = stream_new(actor, -1, what);
	struct stream *s = &streams[sid];
	f->kind = SF_STREAM;
	f->sid = sid;
	s->ext_fd = fd;
	if (!f->nonblock) {
		s->state = ST_OPEN;
		trace("io", "connect fd=%d -> %s (blocking)", fd, what);
		actor_connected(sid);
		return 0;
	}
	s->state = ST_CONNECTING;
	if (fault == 2) {
		trace("io", "connect fd=%d -> %s: will never complete (injected)",
		    fd, what);
	} else {
		s->so_error = fault == 1 ? ECONNREFUSED : 0;
		schedule(now_us + range(RR, 20, 3000), EV_CONNECTED, sid, 0);
		trace("io", "connect fd=%d -> %s%s", fd, what, fault == 1 ?
		    " (will be refused)" : "");
	}
	errno = EINPROGRESS;
	return -1;
}

static void
stream_connected(int sid)
{
	struct stream *s = &streams[sid];
	if (s->ext_closed || s->state != ST_CONNECTING)
		return;
	if (s->so_error) {
		s->state = ST_REFUSED;
		return;
	}
	s->state = ST_OPEN;
	actor_connected(sid);
}

static int
sim_bind(int fd, const struct sockaddr *sa, socklen_t len)
{
	struct sfd *f = sfd_get(fd);
	if (!f || f->kind != SF_SOCKET) {
		errno = EBADF;
		return -1;
	}
	int family, port;
	uint8_t a[16];
	if (addr_decode(sa, len, &family, a, &port) < 0 || family != f->family) {
		errno = EINVAL;
		return -1;
	}
	if (plan_port_taken(port)) {
		trace("io", "bind fd=%d to port %d: EADDRINUSE (another process has "
		    "it)", fd, port);
		errno = EADDRINUSE;
		return -1;
	}
	for (int i = 0; i < MAX_LISTENERS; i++) {
		struct slistener *l = &listeners[i];
		if (l->used && l->family == family && l->port == port &&
		    (is_any(l->addr) || is_any(a) || memcmp(l->addr, a, 16) == 0)) {
			errno = EADDRINUSE;
			return -1;
		}
	}
	f->bound = 1;
	f->port = port;
	memcpy(f->addr, a, 16);
	return 0;
}

static int
sim_listen(int fd, int backlog)
{
	(void)backlog;
	struct sfd *f = sfd_get(fd);
	if (!f || f->kind != SF_SOCKET || !f->bound) {
		errno = EINVAL;
		return -1;
	}
	for (int i = 0; i < MAX_LISTENERS; i++)
		if (!listeners[i].used) {
			struct slistener *l = &listeners[i];
			memset(l, 0, sizeof *l);
			l->used = 1;
			l->fd = fd;
			l->family = f->family;
			l->port = f->port;
			memcpy(l->addr, f->addr, 16);
			f->kind = SF_LISTEN;
			f->li = i;
			char ip[64];
			inet_ntop(f->family, f->addr, ip, sizeof ip);
			trace("io", "listen fd=%d on %s port %d", fd, ip, f->port);
			return 0;
		}
	errno = ENOBUFS;
	return -1;
}

static int
sim_accept4(int fd, struct sockaddr *sa, socklen_t *len, int flags)
{
	(void)sa;
	(void)len;
	struct sfd *f = sfd_get(fd);
	if (!f || f->kind != SF_LISTEN) {
		errno = EINVAL;
		return -1;
	}
	struct slistener *l = &listeners[f->li];
	int k = -1;
	for (int i = 0; i < l->nq && k < 0; i++)
		if (l->q[i].at <= now_us)
			k = i;
	if (k < 0) {
		errno = EAGAIN;
		return -1;
	}
	if (pct(RR, plan_eagain_pct())) {
		st.faults++;
		errno = EAGAIN;
		return -1;
	}
	int nfd = sfd_alloc();
	if (nfd < 0) {
		errno = EMFILE;
		return -1;
	}
	int sid = l->q[k].sid;
	memmove(&l->q[k], &l->q[k + 1], (size_t)(l->nq - k - 1) * sizeof l->q[0]);
	l->nq--;
	struct sfd *n = &sfds[nfd - FD_BASE];
	n->kind = SF_STREAM;
	n->family = l->family;
	n->nonblock = !!(flags & SOCK_NONBLOCK);
	n->sid = sid;
	n->li = -1;
	streams[sid].ext_fd = nfd;
	moved_at_poll = st.polls;
	trace("io", "accept fd=%d <- %s", nfd, streams[sid].what);
	return nfd;
}

static int
sim_setsockopt(int fd, int level, int name, const void *v, socklen_t len)
{
	(void)level;
	(void)name;
	(void)v;
	(void)len;
	if (!sfd_get(fd)) {
		errno = EBADF;
		return -1;
	}
	return 0;
}

static int
sim_getsockopt(int fd, int level, int name, void *v, socklen_t *len)
{
	struct sfd *f = sfd_get(fd);
	if (!f) {
		errno = EBADF;
		return -1;
	}
	if (level == SOL_SOCKET && name == SO_ERROR && *len >= sizeof(int)) {
		int e = 0;
		if (f->kind == SF_STREAM) {
			e = streams[f->sid].so_error;
			streams[f->sid].so_error = 0;
		}
		memcpy(v, &e, sizeof e);
		*len = sizeof e;
		return 0;
	}
	errno = ENOPROTOOPT;
	return -1;
}

static int
sim_fionread(int fd, int *n)
{
	struct sfd *f = sfd_get(fd);
	if (!f) {
		errno = EBADF;
		return -1;
	}
	*n = f->kind == SF_STREAM ? (int)chan_avail(&streams[f->sid].in) : 0;
	return 0;
}

static struct stream *
ext_stream(int fd, const char *call)
{
	struct sfd *f = sfd_get(fd);
	if (!f)
		fail("%s(%d): not an open descriptor", call, fd);
	if (!f || f->kind != SF_STREAM) {
		errno = ENOTCONN;
		return NULL;
	}
	return &streams[f->sid];
}

/* send/writev. whole: a blocking gathered write (all or error). */
static ssize_t
ext_write(int fd, const void *p, size_t n, int flags, int whole)
{
	struct stream *s = ext_stream(fd, "send");
	if (!s)
		return -1;
	int nb = sfds[fd - FD_BASE].nonblock || (flags & MSG_DONTWAIT);
	if (!nb && loop_started && !whole)
		fail("blocking send on fd %d inside the loop", fd);
	if (s->state == ST_CONNECTING) {
		errno = EAGAIN;
		return -1;
	}
	if (s->state == ST_REFUSED) {
		errno = EPIPE;
		return -1;
	}
	if (chan_rst(&s->in)) {
		if (!(flags & MSG_NOSIGNAL) && !whole)
			fail("send on fd %d without MSG_NOSIGNAL to a reset peer "
			    "(SIGPIPE would kill the process)", fd);
		errno = s->rst_reported ? EPIPE : ECONNRESET;
		s->rst_reported = 1;
		return -1;
	}
	if (n == 0)
		return 0;
	if (s->peer_gone) {
		/* The actor has closed: the bytes are lost and answered with a
		 * reset (the first write succeeds, as with TCP). */
		if (s->in.rst_at < 0) {
			s->in.rst_at = max64(s->in.last_at, now_us + range(RR, 10, 300));
			schedule(s->in.rst_at, EV_WAKE, 0, 0);
		}
		if (s->actor == ACT_APM)
			apm_lost_request();
		trace("io", "send fd=%d: %zu bytes to %s, which has closed "
		    "(answered with a reset)", fd, n, s->what);
		return (ssize_t)n;
	}
	size_t room = whole ? n : chan_room(&s->out);
	if (room == 0) {
		errno = EAGAIN;
		return -1;
	}
	size_t k = MIN(n, room);
	/* Linux writes short only when its buffer is nearly full: a short
	 * write of a small message is not realistic */
	if (!whole && k > 1024 && pct(RR, plan_short_pct()))
		k = (size_t)range(RR, 1, (int64_t)k - 1);
	int64_t at = chan_write(&s->out, p, k, now_us + range(RR, 0, 300));
	schedule(at, EV_DATA, (int)(s - streams), 0);
	st.bytes += k;
	moved_at_poll = st.polls;
	if (verbose)
		trace("io", "send fd=%d %zu/%zu bytes -> %s: %s", fd, k, n, s->what,
		    show(p, k, 60));
	return (ssize_t)k;
}

static ssize_t
sim_send(int fd, const void *p, size_t n, int flags)
{
	return ext_write(fd, p, n, flags, 0);
}

static ssize_t
sim_writev(int fd, const struct iovec *iov, int cnt)
{
	struct xbuf b = { 0 };
	for (int i = 0; i < cnt; i++)
		sb_add(&b, iov[i].iov_base, iov[i].iov_len);
	int blocking = sfd_get(fd) && !sfds[fd - FD_BASE].nonblock;
	ssize_t r = ext_write(fd, b.p ? b.p : "", sb_n(&b), 0, blocking);
	sb_free(&b);
	return r;
}

static ssize_t
sim_recv(int fd, void *p, size_t n, int flags)
{
	struct stream *s = ext_stream(fd, "recv");
	if (!s)
		return -1;
	int sid = (int)(s - streams);
	int nb = sfds[fd - FD_BASE].nonblock || (flags & MSG_DONTWAIT);
	if (s->state == ST_CONNECTING) {
		errno = EAGAIN;
		return -1;
	}
	if (s->state == ST_REFUSED) {
		errno = ECONNREFUSED;
		return -1;
	}
	for (;;) {
		size_t avail = chan_avail(&s->in);
		if (avail && n) {
			/* All that has arrived, as TCP does: splits come from the
			 * segments' arrival times, never from recv itself (the
			 * extension rightly takes a short read for "drained"). */
			size_t k = MIN(n, avail);
			chan_read(&s->in, p, k);
			s->last_ext_read = awake();
			moved_at_poll = st.polls;
			note_ext_read(sid);
			if (sb_n(&s->outbox) || s->close_pending)
				schedule(now_us, EV_ROOM, sid, 0);
			if (verbose)
				trace("io", "recv fd=%d %zu bytes <- %s: %s", fd, k, s->what,
				    show(p, k, 60));
			return (ssize_t)k;
		}
		if (chan_rst(&s->in)) {
			moved_at_poll = st.polls;
			if (!s->rst_reported) {
				s->rst_reported = 1;
				trace("io", "recv fd=%d: connection reset by %s", fd, s->what);
				errno = ECONNRESET;
				return -1;
			}
			return 0;
		}
		if (chan_eof(&s->in)) {
			moved_at_poll = st.polls;
			if (verbose)
				trace("io", "recv fd=%d: end of stream from %s", fd, s->what);
			return 0;
		}
		if (nb) {
			errno = EAGAIN;
			return -1;
		}
		if (loop_started)
			fail("blocking read on fd %d (%s) inside the loop", fd, s->what);
		/* A blocking read before the loop: the clock runs until the
		 * actor's answer arrives. */
		if (ev_next() == NEVER_US)
			fail("blocking read on fd %d (%s) would wait forever", fd,
			    s->what);
		now_us = MAX(now_us, ev_next());
		run_due();
	}
}

static ssize_t
sim_read(int fd, void *p, size_t n)
{
	return sim_recv(fd, p, n, 0);
}

static void
stream_ext_close(int sid, int fd)
{
	struct stream *s = &streams[sid];
	s->ext_closed = 1;
	s->ext_fd = -1;
	s->ext_closed_at = awake();
	int unread = s->in.wrote > s->in.read;
	int64_t at;
	if (s->state == ST_CONNECTING || s->state == ST_REFUSED) {
		trace("io", "close fd=%d (%s, never connected)", fd, s->what);
		return;
	}
	if (unread) {
		at = s->out.rst_at = max64(s->out.last_at, now_us + range(RR, 0, 200));
	} else {
		at = s->out.fin_at = max64(s->out.last_at, now_us + range(RR, 0, 200));
	}
	sb_clear(&s->outbox);
	schedule(at, EV_DATA, sid, 0);
	trace("io", "close fd=%d (%s)%s", fd, s->what, unread ?
	    " with unread bytes: the peer gets a reset" : "");
}

static int
sim_close(int fd)
{
	struct sfd *f = sfd_get(fd);
	if (!f) {
		fail("close(%d): not an open descriptor (closed twice?)", fd);
		errno = EBADF;
		return -1;
	}
	moved_at_poll = st.polls;
	if (f->kind == SF_LISTEN) {
		struct slistener *l = &listeners[f->li];
		for (int i = 0; i < l->nq; i++) {
			struct stream *s = &streams[l->q[i].sid];
			s->ext_closed = 1;
			s->out.rst_at = now_us;
			schedule(now_us, EV_DATA, l->q[i].sid, 0);
		}
		trace("io", "close fd=%d (listener port %d)", fd, l->port);
		l->used = 0;
	} else if (f->kind == SF_STREAM) {
		stream_ext_close(f->sid, fd);
	} else if (verbose) {
		trace("io", "close fd=%d (unconnected socket)", fd);
	}
	f->kind = SF_FREE;
	return 0;
}

static int
sim_clock_gettime(clockid_t id, struct timespec *ts)
{
	int64_t us = id == CLOCK_REALTIME ? EPOCH0_US + (now_us - T0_US) : now_us;
	ts->tv_sec = us / 1000000;
	ts->tv_nsec = (long)(us % 1000000) * 1000;
	return 0;
}

static int exit_code = -1;

static void
sim_exit(int code)
{
	exit_code = code;
	trace("io", "exit(%d)", code);
	lam_exit_check(code);
	longjmp(run_jmp, 1);
}

/* revents of one pollfd. */
static short
fd_revents(const struct pollfd *p)
{
	if (p->fd < 0)
		return 0;
	struct sfd *f = sfd_get(p->fd);
	if (!f) {
		fail("poll on fd %d, which is not open", p->fd);
		return POLLNVAL;
	}
	if (f->kind == SF_LISTEN) {
		struct slistener *l = &listeners[f->li];
		for (int i = 0; i < l->nq; i++)
			if (l->q[i].at <= now_us)
				return p->events & POLLIN;
		return 0;
	}
	if (f->kind != SF_STREAM)
		return POLLHUP;
	struct stream *s = &streams[f->sid];
	if (s->state == ST_CONNECTING)
		return 0;
	if (s->state == ST_REFUSED)
		return (short)(POLLERR | POLLHUP | (p->events & POLLOUT));
	short re = 0;
	int rst = chan_rst(&s->in);
	if ((p->events & POLLIN) && (chan_avail(&s->in) || chan_eof(&s->in) || rst))
		re |= POLLIN;
	if (rst)
		re |= s->rst_reported ? POLLHUP : POLLERR | POLLHUP;
	if ((p->events & POLLOUT) && (chan_room(&s->out) > 0 || s->peer_gone))
		re |= POLLOUT;
	return re;
}

static int
poll_ready(struct pollfd *fds, nfds_t n)
{
	int r = 0;
	for (nfds_t i = 0; i < n; i++) {
		fds[i].revents = fd_revents(&fds[i]);
		r += fds[i].revents != 0;
	}
	return r;
}

static int spin_zero;       /* consecutive zero-timeout polls with nothing ready */

/*
 * One step of the extension's loop. Returns at once when something is
 * ready; else the clock jumps to the earlier of the timeout and the next
 * event (which may make something ready).
 */
static int
sim_poll(struct pollfd *fds, nfds_t n, int timeout)
{
	st.polls++;
	if (!loop_started) {
		loop_started = 1;
		g.rnd = (uint32_t)g_rnd_seed; /* it came from getpid(): make it ours */
	}
	sim_check_step();
	if (st.polls > MAX_POLLS)
		fail("more than %d loop passes", MAX_POLLS);
	if (st.polls - moved_at_poll > SPIN_LIMIT) {
		char set[700] = "";
		size_t k = 0;
		poll_ready(fds, n);
		for (nfds_t i = 0; i < n && k + 60 < sizeof set; i++) {
			struct sfd *f = sfd_get(fds[i].fd);
			if (!fds[i].revents)
				continue;
			k += (size_t)snprintf(set + k, sizeof set - k, " fd %d (%s) "
			    "events %#x revents %#x", fds[i].fd, f && f->kind == SF_STREAM ?
			    streams[f->sid].what : "listener", fds[i].events,
			    fds[i].revents);
			for (int a = 0; a < MAX_AGENT_CONNS; a++)
				if (g.agents[a].c.fd == fds[i].fd)
					k += (size_t)snprintf(set + k, sizeof set - k, ", agent "
					    "slot %d: state %d route %d, rx %zu of %zu, body %zu "
					    "decoded", a, g.agents[a].state, g.agents[a].route,
					    g.agents[a].c.rx_len, g.agents[a].c.rx_cap,
					    g.agents[a].c.body.have);
			k += (size_t)snprintf(set + k, sizeof set - k, ";");
		}
		fail("the loop spins: %d passes without a byte moved or a "
		    "connection opened or closed (timeout %d; poll set:%s)", SPIN_LIMIT,
		    timeout, set);
	}
	static int64_t last_dump;
	if (state_every_us && now_us - last_dump >= state_every_us) {
		last_dump = now_us;
		dump_state();
	}
	now_us += range(RR, 2, 40); /* the pass just run took some time */
	if (loop_started && pct(RR, plan_eagain_pct() / 4)) {
		st.faults++;
		errno = EINTR;
		return -1;
	}
	int64_t limit = timeout < 0 ? NEVER_US : now_us + (int64_t)timeout * 1000;
	for (;;) {
		run_due();
		if (term_eintr) { /* the signal interrupts the poll */
			term_eintr = 0;
			errno = EINTR;
			return -1;
		}
		int r = poll_ready(fds, n);
		if (r > 0 || now_us >= limit) {
			if (r == 0 && timeout == 0) {
				if (++spin_zero > SPIN_LIMIT)
					fail("the loop spins: %d polls with a zero timeout and "
					    "nothing ready", SPIN_LIMIT);
			} else {
				spin_zero = 0;
			}
			return r;
		}
		int64_t t = ev_next();
		if (freeze_until > now_us && freeze_from > now_us)
			t = MIN(t, freeze_from);
		if (t == NEVER_US && limit == NEVER_US)
			fail("poll(timeout -1) with nothing ready and nothing that "
			    "could ever happen: the extension waits forever");
		now_us = MIN(t, limit);
	}
}

static void
io_install(void)
{
	io.socket = sim_socket;
	io.connect = sim_connect;
	io.bind = sim_bind;
	io.listen = sim_listen;
	io.accept4 = sim_accept4;
	io.setsockopt = sim_setsockopt;
	io.getsockopt = sim_getsockopt;
	io.fionread = sim_fionread;
	io.send = sim_send;
	io.recv = sim_recv;
	io.writev = sim_writev;
	io.read = sim_read;
	io.close = sim_close;
	io.poll = sim_poll;
	io.clock_gettime = sim_clock_gettime;
	io.exit = sim_exit;
}

/* == 6. HTTP and JSON helpers ==
 * Our own parsers, strict where the extension writes (its requests to the
 * Lambda API and the APM server, its answers to agents), so that its
 * framing is checked by code it does not share.
 */

struct hreq {
	char method[16], target[600];
	char auth[400], ctype[160], ua[300], simid[32], lename[128], leid[128],
	    reqid[160], cenc[64];
	int64_t clen;
	int chunked, close;
	struct xbuf body;       /* decoded */
};

static int
name_is(const char *p, size_t n, const char *lit)
{
	return strlen(lit) == n && strncasecmp(p, lit, n) == 0;
}

static void
copy_val(char *dst, size_t cap, const char *p, size_t n)
{
	n = MIN(n, cap - 1);
	memcpy(dst, p, n);
	dst[n] = 0;
}

/* Decode a chunked body at p[0..n) into out (NULL: only scan it).
 * 1 complete (*used), 0 more, -1 bad. */
static int
chunked_decode(const char *p, size_t n, struct xbuf *out, size_t *used)
{
	size_t i = 0;
	if (out)
		sb_clear(out);
	for (;;) {
		const char *eol = memmem(p + i, minz(n - i, 300), "\r\n", 2);
		if (!eol)
			return n - i > 256 ? -1 : 0;
		size_t size = 0, digits = 0;
		const char *q = p + i;
		for (; q < eol && isxdigit((unsigned char)*q); q++, digits++)
			size = size * 16 + (size_t)(isdigit((unsigned char)*q) ? *q - '0' :
			    (tolower((unsigned char)*q) - 'a' + 10));
		if (!digits || digits > 8 || (q < eol && *q != ';'))
			return -1;
		i = (size_t)(eol - p) + 2;
		if (size == 0) {
			for (;;) { /* trailers, then an empty line */
				const char *e = memmem(p + i, minz(n - i, 4096), "\r\n", 2);
				if (!e)
					return 0;
				size_t len = (size_t)(e - (p + i));
				i += len + 2;
				if (len == 0) {
					*used = i;
					return 1;
				}
			}
		}
		if (n - i < size + 2)
			return 0;
		if (p[i + size] != '\r' || p[i + size + 1] != '\n')
			return -1;
		if (out)
			sb_add(out, p + i, size);
		i += size + 2;
	}
}

/* One HTTP/1.1 request at p[0..n). 1 whole (*used), 0 more, -1 bad. */
static int
http_request(const char *p, size_t n, struct hreq *h, size_t *used,
    const char **why)
{
	const char *end = memmem(p, minz(n, 16388), "\r\n\r\n", 4);
	if (!end) {
		*why = "head too large";
		return n > 16384 ? -1 : 0;
	}
	size_t head = (size_t)(end - p) + 4;
	struct xbuf keep = h->body;
	memset(h, 0, sizeof *h);
	h->body = keep;
	sb_clear(&h->body);
	h->clen = -1;
	const char *eol = memmem(p, head, "\r\n", 2);
	const char *sp1 = memchr(p, ' ', (size_t)(eol - p));
	const char *sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)(eol - sp1 - 1)) : NULL;
	if (!sp1 || !sp2 || (size_t)(eol - sp2 - 1) != 8 ||
	    memcmp(sp2 + 1, "HTTP/1.1", 8) != 0) {
		*why = "bad request line";
		return -1;
	}
	copy_val(h->method, sizeof h->method, p, (size_t)(sp1 - p));
	copy_val(h->target, sizeof h->target, sp1 + 1, (size_t)(sp2 - sp1 - 1));
	const char *l = eol + 2;
	while (l < end + 2) {
		const char *e = memmem(l, (size_t)(end + 2 - l), "\r\n", 2);
		const char *colon = memchr(l, ':', (size_t)(e - l));
		if (!colon || colon == l) {
			*why = "bad header line";
			return -1;
		}
		size_t nl = (size_t)(colon - l);
		const char *v = colon + 1;
		while (v < e && (*v == ' ' || *v == '\t'))
			v++;
		size_t vl = (size_t)(e - v);
		while (vl && (v[vl - 1] == ' ' || v[vl - 1] == '\t'))
			vl--;
		if (name_is(l, nl, "content-length")) {
			if (h->clen >= 0) {
				*why = "two Content-Length headers";
				return -1;
			}
			h->clen = 0;
			for (size_t k = 0; k < vl; k++) {
				if (!isdigit((unsigned char)v[k])) {
					*why = "bad Content-Length";
					return -1;
				}
				h->clen = h->clen * 10 + (v[k] - '0');
			}
		} else if (name_is(l, nl, "transfer-encoding")) {
			if (vl != 7 || strncasecmp(v, "chunked", 7) != 0) {
				*why = "bad Transfer-Encoding";
				return -1;
			}
			h->chunked = 1;
		} else if (name_is(l, nl, "authorization")) {
			if (h->auth[0]) {
				*why = "two Authorization headers";
				return -1;
			}
			copy_val(h->auth, sizeof h->auth, v, vl);
		} else if (name_is(l, nl, "connection")) {
			h->close = vl == 5 && strncasecmp(v, "close", 5) == 0;
		} else if (name_is(l, nl, "content-type")) {
			copy_val(h->ctype, sizeof h->ctype, v, vl);
		} else if (name_is(l, nl, "content-encoding")) {
			copy_val(h->cenc, sizeof h->cenc, v, vl);
		} else if (name_is(l, nl, "user-agent")) {
			copy_val(h->ua, sizeof h->ua, v, vl);
		} else if (name_is(l, nl, "x-sim-id")) {
			copy_val(h->simid, sizeof h->simid, v, vl);
		} else if (name_is(l, nl, "lambda-extension-name")) {
			copy_val(h->lename, sizeof h->lename, v, vl);
		} else if (name_is(l, nl, "lambda-extension-identifier")) {
			copy_val(h->leid, sizeof h->leid, v, vl);
		} else if (name_is(l, nl, "x-elastic-aws-request-id")) {
			copy_val(h->reqid, sizeof h->reqid, v, vl);
		}
		l = e + 2;
	}
	if (h->chunked && h->clen >= 0) {
		*why = "both Content-Length and chunked";
		return -1;
	}
	if (h->chunked) {
		size_t bu;
		int r = chunked_decode(p + head, n - head, NULL, &bu);
		if (r == 1)
			r = chunked_decode(p + head, n - head, &h->body, &bu);
		if (r < 0)
			*why = "bad chunked framing";
		if (r <= 0)
			return r;
		*used = head + bu;
		return 1;
	}
	size_t cl = h->clen > 0 ? (size_t)h->clen : 0;
	if (n - head < cl)
		return 0;
	sb_add(&h->body, p + head, cl);
	*used = head + cl;
	return 1;
}

struct hresp {
	int status, close, gzip;
	size_t body_off, body_len;
};

/* One answer at p[0..n). 1 whole (*used), 0 more, -1 bad. */
static int
http_response(const char *p, size_t n, struct hresp *r, size_t *used,
    const char **why)
{
	const char *end = memmem(p, minz(n, 16388), "\r\n\r\n", 4);
	if (!end) {
		*why = "answer head too large";
		return n > 16384 ? -1 : 0;
	}
	size_t head = (size_t)(end - p) + 4;
	memset(r, 0, sizeof *r);
	if (head < 16 || memcmp(p, "HTTP/1.1 ", 9) != 0 ||
	    !isdigit((unsigned char)p[9]) || !isdigit((unsigned char)p[10]) ||
	    !isdigit((unsigned char)p[11]) || p[12] != ' ') {
		*why = "bad status line";
		return -1;
	}
	r->status = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
	int64_t clen = -1;
	const char *l = memmem(p, head, "\r\n", 2) + 2;
	while (l < end + 2) {
		const char *e = memmem(l, (size_t)(end + 2 - l), "\r\n", 2);
		const char *colon = memchr(l, ':', (size_t)(e - l));
		if (!colon) {
			*why = "bad header line in an answer";
			return -1;
		}
		const char *v = colon + 1;
		while (v < e && *v == ' ')
			v++;
		if (name_is(l, (size_t)(colon - l), "content-length")) {
			if (clen >= 0) {
				*why = "two Content-Length headers in an answer";
				return -1;
			}
			clen = strtoll(v, NULL, 10);
		} else if (name_is(l, (size_t)(colon - l), "connection")) {
			r->close = (size_t)(e - v) == 5 && strncasecmp(v, "close", 5) == 0;
		} else if (name_is(l, (size_t)(colon - l), "content-encoding")) {
			r->gzip = (size_t)(e - v) == 4 && strncasecmp(v, "gzip", 4) == 0;
		} else if (name_is(l, (size_t)(colon - l), "transfer-encoding")) {
			*why = "chunked answer";
			return -1;
		}
		l = e + 2;
	}
	int nobody = r->status < 200 || r->status == 204 || r->status == 304;
	if (!nobody && clen < 0) {
		*why = "answer without Content-Length";
		return -1;
	}
	size_t cl = nobody ? 0 : (size_t)clen;
	if (n - head < cl)
		return 0;
	r->body_off = head;
	r->body_len = cl;
	*used = head + cl;
	return 1;
}

/* s[0..n) as JSON string contents. */
static void
json_esc(struct xbuf *b, const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '"' || c == '\\') {
			char e[2] = { '\\', (char)c };
			sb_add(b, e, 2);
		} else if (c == '\n') {
			sb_add(b, "\\n", 2);
		} else if (c == '\r') {
			sb_add(b, "\\r", 2);
		} else if (c == '\t') {
			sb_add(b, "\\t", 2);
		} else if (c < 0x20) {
			sb_addf(b, "\\u%04x", c);
		} else {
			sb_add(b, &s[i], 1);
		}
	}
}

static struct apm_json_tok jtok[16384];

/* A key that appears twice in one object, or -1. */
static int
json_dup_key(const char *js, const struct apm_json_tok *t, int n)
{
	for (int i = 0; i < n; i++) {
		if (t[i].type != APM_JSON_OBJECT)
			continue;
		int keys[512], nk = 0, k = i + 1;
		for (uint32_t a = 0; a < t[i].size && k < n && nk < 512; a++) {
			keys[nk++] = k;
			k = apm_json_skip(t, n, k + 1);
		}
		for (int x = 0; x < nk; x++)
			for (int y = x + 1; y < nk; y++) {
				const struct apm_json_tok *kx = &t[keys[x]], *ky = &t[keys[y]];
				if (kx->end - kx->start == ky->end - ky->start &&
				    memcmp(js + kx->start, js + ky->start,
				    kx->end - kx->start) == 0)
					return keys[y];
			}
	}
	return -1;
}

/* The decoded string at a path of keys from token obj, into out; -1 if absent. */
static int
json_path_str(const char *js, int n, int obj, const char *k1, const char *k2,
    char *out, size_t cap)
{
	int i = apm_json_get(js, jtok, n, obj, k1);
	if (i >= 0 && k2)
		i = jtok[i].type == APM_JSON_OBJECT ? apm_json_get(js, jtok, n, i, k2) :
		    -1;
	if (i < 0 || jtok[i].type != APM_JSON_STRING)
		return -1;
	return apm_json_str(js, &jtok[i], out, cap);
}

static void
iso_time(int64_t mono_us, char *out, size_t cap)
{
	int64_t us = EPOCH0_US + (mono_us - T0_US);
	time_t s = (time_t)(us / 1000000);
	struct tm tm;
	gmtime_r(&s, &tm);
	snprintf(out, cap, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
	    tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
	    tm.tm_sec, (int)(us / 1000 % 1000));
}

/* == 7. The plan of a world ==
 * Drawn from the seed before the run: the configuration, the APM server's
 * temper, and every invocation with its agent threads' scripts.
 */

enum rq_kind { RQ_SLEEP, RQ_INTAKE, RQ_FLUSH, RQ_REGISTER, RQ_PROXY_GET,
	RQ_PROXY_CONFIG, RQ_TRICKLE, RQ_ABORT, RQ_TEL, RQ_OTLP, RQ_OTLP_BAD };
static const char *const rq_names[] = { "sleep", "intake", "flush",
	"register", "GET /", "config", "trickle", "abort", "telemetry", "OTLP",
	"bad OTLP" };

struct rspec {
	int kind;
	int chunked, nevents, line_max, expect100, conn_close, v6, fresh_conn,
	    agent_auth, identity;
	int signal, json;       /* RQ_OTLP: traces/metrics/logs, JSON or protobuf;
	                           RQ_OTLP_BAD: signal is the mistake */
	size_t size;            /* RQ_PROXY_CONFIG body, RQ_TRICKLE body */
	int64_t think_ms;       /* pause after the answer (RQ_SLEEP: the pause) */
};

struct tplan {
	int nsteps;
	struct rspec steps[MAX_STEPS];
};

enum outcome { OUT_OK, OUT_CRASH, OUT_TIMEOUT };
static const char *const outcome_names[] = { "ok", "crash", "timeout" };

struct inv_plan {
	char rid[48];
	int64_t timeout_ms;     /* deadline - invoke */
	int64_t gap_ms;         /* idle (frozen) before its INVOKE */
	int outcome;
	int64_t crash_ms;       /* OUT_CRASH: after the invoke */
	char status[32];        /* runtimeDone status of a crash */
	int flush;              /* the agent flushes at the end */
	int64_t flush_at_ms;    /* ... not before this (after the invoke) */
	int register_tx, stall, nthreads, ntricklers, tricklers_intake, nlogs, big;
	int shutdown_after;     /* SHUTDOWN follows (timeout, failure) */
	struct tplan th[MAX_THREADS];
};

enum server_mode { SRV_HEALTHY, SRV_FLAKY, SRV_STALLING };
static const char *const server_names[] = { "healthy", "flaky", "stalling" };

static struct plan {
	uint64_t seed;
	int64_t recv_ms, fwd_ms;
	size_t queue_bytes, max_body;
	unsigned buffer;
	int background, capture_logs, server_mode, fail_pct, idle_close_pct,
	    connect_fault_pct, tel_ok, socket_fail_pct, with_token, register_close;
	int short_pct, eagain_pct;
	uint16_t recv_port, tel_port, otlp_port;
	char prefix[16], token[40];
	int ninv;
	struct inv_plan inv[MAX_INV];
	char shutdown_reason[16];
	int64_t init_ms, shutdown_gap_ms, shutdown_budget_ms;
	/* drawn last, so that the worlds above stay those of older builds */
	int lam_fault_pct;      /* a due event's /next breaks instead (0: never) */
	int lam_close_pct;      /* an event comes with Connection: close */
	int sigterm_inv;        /* SIGTERM during this invocation; -1 none */
	int apm_odd_pct;        /* answers framed oddly (1xx first, chunked,
	                           ended by close, long error texts) */
	int no_ipv6, otlp_taken, tel_huge, tel_odd;
	int burst_inv;          /* this invocation opens more agent connections
	                           with proxied calls than the extension has
	                           slots; -1 none */
} plan;

static int plan_eagain_pct(void) { return plan.eagain_pct; }
static int plan_short_pct(void) { return plan.short_pct; }
static int plan_socket_fail_pct(void) { return plan.socket_fail_pct; }
static int plan_no_ipv6(void) { return plan.no_ipv6; }
static int plan_port_taken(int port)
{
	return plan.otlp_taken && port == plan.otlp_port;
}

static const char *const crash_statuses[] = {
	"error", "failure", "error", "Runtime.ExitError",
	"err\"or", "error\",\"outcome\":\"success", "back\\slash\\",
	"fail\\\"ure", "tab\tand\x01",
};

static int64_t
pick_ms(uint64_t *r, const int64_t *v, size_t n)
{
	return v[below(r, n)];
}

static void
plan_steps(struct inv_plan *ip, int t, int big, int64_t budget_ms)
{
	struct tplan *tp = &ip->th[t];
	int n = (int)range(PR, big ? 1 : 0, big ? 3 : 5);
	if (t == 0 && ip->register_tx && !big) {
		tp->steps[tp->nsteps++] = (struct rspec){ .kind = RQ_REGISTER,
			.think_ms = range(PR, 0, 30) };
	}
	for (int i = 0; i < n && tp->nsteps < MAX_STEPS - 1; i++) {
		struct rspec sp = { 0 };
		int k = big && i == 0 ? 0 : (int)below(PR, 100); /* large bodies
		                           start together: they fill the queue */
		sp.kind = k < 45 ? RQ_INTAKE : k < 55 ? RQ_PROXY_GET : k < 65 ?
		    RQ_PROXY_CONFIG : k < 70 ? RQ_ABORT : k < 75 ? RQ_REGISTER :
		    k < 88 ? RQ_OTLP : k < 90 ? RQ_OTLP_BAD : RQ_SLEEP;
		if (!plan.otlp_port && (sp.kind == RQ_OTLP || sp.kind == RQ_OTLP_BAD))
			sp.kind = RQ_INTAKE;
		sp.signal = (int)below(PR, sp.kind == RQ_OTLP_BAD ? 4 : 3);
		sp.json = pct(PR, 40);
		sp.chunked = pct(PR, 40);
		sp.nevents = (int)range(PR, 1, 8);
		sp.line_max = pct(PR, 70) ? 300 : 3000;
		if (big && sp.kind == RQ_INTAKE) {
			/* half to nine tenths of the largest body: a few at once fill
			 * the queue before any is complete */
			int64_t target = range(PR, (int64_t)plan.max_body / 2,
			    (int64_t)plan.max_body * 9 / 10);
			sp.line_max = 8000;
			sp.nevents = (int)(target / (sp.line_max / 2 + 200)) + 1;
			sp.chunked = pct(PR, 50);
		} else if (pct(PR, 8)) {
			sp.nevents = (int)range(PR, 10, 60);
			sp.line_max = 6000;
		}
		sp.expect100 = pct(PR, 10);
		sp.conn_close = pct(PR, 8);
		sp.v6 = pct(PR, 20);
		sp.fresh_conn = pct(PR, 10);
		sp.agent_auth = pct(PR, 30);
		sp.identity = pct(PR, 30);
		sp.size = pct(PR, 50) ? (size_t)range(PR, 20, 2000) : pct(PR, 85) ?
		    (size_t)range(PR, 2000, 12000) : (size_t)range(PR, 15000, 20000);
		sp.think_ms = pct(PR, 60) ? range(PR, 0, 20) : range(PR, 20,
		    MAX(21, budget_ms / 8));
		if (sp.kind == RQ_SLEEP)
			sp.think_ms = range(PR, 1, max64(2, budget_ms / 4));
		tp->steps[tp->nsteps++] = sp;
	}
}

static void
plan_make(uint64_t seed)
{
	static const int64_t recv[] = { 1000, 2000, 2000, 3000, 5000, 15000 };
	static const int64_t fwd[] = { 300, 1000, 1000, 3000, 3000 };
	static const size_t qb[] = { 131072, 262144, 1048576, 1048576, 1048576,
		16777216 };
	memset(&plan, 0, sizeof plan);
	plan.seed = seed;
	rng_plan = seed * 0x2545f4914f6cdd1dull + 1;
	rng_run = seed ^ 0x5851f42d4c957f2dull;
	int slowloris = pct(PR, 12);
	plan.recv_ms = slowloris ? 1000 + 1000 * (int64_t)below(PR, 2) :
	    pick_ms(PR, recv, 6);
	plan.fwd_ms = pick_ms(PR, fwd, 5);
	plan.queue_bytes = qb[below(PR, 6)];
	plan.max_body = MIN((size_t)APM_MAX_BODY_DEFAULT, plan.queue_bytes / 2);
	plan.buffer = pct(PR, 15) ? (unsigned)range(PR, 1, 4) : 100;
	plan.background = pct(PR, 25);
	plan.capture_logs = pct(PR, 90);
	int m = (int)below(PR, 100);
	plan.server_mode = m < 40 ? SRV_HEALTHY : m < 75 ? SRV_FLAKY : SRV_STALLING;
	plan.fail_pct = plan.server_mode == SRV_FLAKY ? (int)range(PR, 5, 50) : 0;
	plan.idle_close_pct = (int)below(PR, 60);
	plan.connect_fault_pct = plan.server_mode == SRV_HEALTHY ? 0 :
	    (int)range(PR, 0, 15);
	plan.socket_fail_pct = plan.server_mode == SRV_HEALTHY ? 0 :
	    (int)below(PR, 3);
	plan.tel_ok = pct(PR, 95);
	plan.with_token = pct(PR, 50);
	plan.register_close = pct(PR, 5);
	plan.short_pct = (int)below(PR, 25);
	plan.eagain_pct = (int)below(PR, 5);
	plan.recv_port = pct(PR, 80) ? 8200 : (uint16_t)range(PR, 1024, 8000);
	plan.tel_port = pct(PR, 80) ? 8201 : (uint16_t)range(PR, 8202, 9000);
	int op = (int)below(PR, 10);
	plan.otlp_port = op < 8 ? 4318 : op < 9 ? (uint16_t)range(PR, 9002, 9100) : 0;
	/* A receiver port drawn equal to the OTLP port would take it (the OTLP
	 * listener then fails with EADDRINUSE, as it says): a misconfiguration,
	 * not a plan to check OTLP by. Seed 4000181 drew it. */
	if (plan.recv_port == plan.otlp_port)
		plan.recv_port++;
	snprintf(plan.prefix, sizeof plan.prefix, "%s", pct(PR, 25) ? "/apm" : "");
	snprintf(plan.token, sizeof plan.token, "tok-%016llx",
	    (unsigned long long)rng_next(PR));
	plan.init_ms = range(PR, 0, 300);
	plan.ninv = (int)range(PR, 1, slowloris ? 3 : MAX_INV - 2);
	for (int i = 0; i < plan.ninv; i++) {
		struct inv_plan *ip = &plan.inv[i];
		snprintf(ip->rid, sizeof ip->rid, "%08llx-%04x-4%03x-a%03x-%012llx",
		    (unsigned long long)(rng_next(PR) & 0xffffffff),
		    (unsigned)below(PR, 65536), (unsigned)below(PR, 4096),
		    (unsigned)below(PR, 4096),
		    (unsigned long long)(rng_next(PR) & 0xffffffffffffull));
		int gap = (int)below(PR, 100);
		ip->gap_ms = i == 0 ? 0 : gap < 30 ? 0 : gap < 70 ? range(PR, 10, 2000) :
		    gap < 90 ? range(PR, 2000, 60000) : range(PR, 300000, 1200000);
		ip->timeout_ms = 1000 * range(PR, 1, 8);
		int big = ip->big = pct(PR, 15);
		if (big || slowloris)
			ip->timeout_ms = MAX(ip->timeout_ms, plan.recv_ms + 6000);
		int o = (int)below(PR, 100);
		ip->outcome = o < 75 ? OUT_OK : o < 90 ? OUT_CRASH : OUT_TIMEOUT;
		ip->register_tx = pct(PR, 60);
		ip->stall = plan.server_mode == SRV_STALLING && pct(PR, 50);
		ip->nthreads = big ? (int)range(PR, 3, MAX_THREADS) :
		    (int)range(PR, 1, 3);
		ip->nlogs = plan.capture_logs ? (int)range(PR, 0, 6) : 0;
		for (int t = 0; t < ip->nthreads; t++)
			plan_steps(ip, t, big, ip->timeout_ms);
		ip->flush = ip->outcome == OUT_OK && pct(PR, 90);
		ip->flush_at_ms = 0;
		if (pct(PR, 30)) /* near the deadline: within a forwarder timeout */
			ip->flush_at_ms = max64(0, ip->timeout_ms - range(PR, 120,
			    plan.fwd_ms + 200));
		if (ip->outcome == OUT_CRASH) {
			ip->crash_ms = range(PR, 1, ip->timeout_ms - 1);
			snprintf(ip->status, sizeof ip->status, "%s",
			    crash_statuses[below(PR, sizeof crash_statuses /
			    sizeof *crash_statuses)]);
			ip->shutdown_after = pct(PR, 30);
		}
		if (ip->outcome == OUT_TIMEOUT) {
			/* one more pause than the function has time for */
			struct tplan *tp = &ip->th[0];
			if (tp->nsteps < MAX_STEPS)
				tp->steps[tp->nsteps++] = (struct rspec){ .kind = RQ_SLEEP,
					.think_ms = ip->timeout_ms + 1000 };
			ip->shutdown_after = pct(PR, 60);
		}
		if (slowloris) {
			/* bodies that trickle hold every slot; real agents come
			 * while they are young, and after the receiver timeout */
			ip->ntricklers = (int)range(PR, MAX_AGENT_CONNS + 2,
			    MAX_AGENT_CONNS + 8);
			ip->tricklers_intake = pct(PR, 50);
			for (int t = 0; t < ip->nthreads; t++) {
				struct tplan *tp = &ip->th[t];
				if (tp->nsteps == MAX_STEPS)
					tp->nsteps--;
				memmove(&tp->steps[1], &tp->steps[0],
				    (size_t)tp->nsteps * sizeof tp->steps[0]);
				tp->steps[0] = (struct rspec){ .kind = RQ_SLEEP,
					.think_ms = t % 2 ? plan.recv_ms / 2 : plan.recv_ms + 1500 };
				tp->nsteps++;
			}
		}
		if (ip->shutdown_after) {
			plan.ninv = i + 1;
			break;
		}
	}
	struct inv_plan *last = &plan.inv[plan.ninv - 1];
	snprintf(plan.shutdown_reason, sizeof plan.shutdown_reason, "%s",
	    last->outcome == OUT_TIMEOUT && last->shutdown_after ? "timeout" :
	    last->outcome == OUT_CRASH && last->shutdown_after ? "failure" :
	    "spindown");
	plan.shutdown_gap_ms = pct(PR, 50) ? 0 : range(PR, 10, 600000);
	plan.shutdown_budget_ms = pct(PR, 50) ? 2000 : range(PR, 500, 2000);
	plan.lam_fault_pct = pct(PR, 20) ? (int)range(PR, 10, 50) : 0;
	plan.lam_close_pct = pct(PR, 20) ? (int)range(PR, 10, 60) : 0;
	plan.sigterm_inv = pct(PR, 4) ? (int)below(PR, (uint64_t)plan.ninv) : -1;
	plan.apm_odd_pct = pct(PR, 40) ? (int)range(PR, 5, 40) : 0;
	plan.no_ipv6 = pct(PR, 3);
	plan.otlp_taken = plan.otlp_port && pct(PR, 3);
	plan.tel_huge = pct(PR, 3);
	plan.tel_odd = pct(PR, 30);
	plan.burst_inv = pct(PR, 3) ? (int)below(PR, (uint64_t)plan.ninv) : -1;
	g_rnd_seed = (int)(seed * 2654435761u);
}

static void
plan_env(void)
{
	char v[128];
	clearenv();
	setenv("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001", 1);
	snprintf(v, sizeof v, "http://127.0.0.1:%d%s", APM_PORT, plan.prefix);
	setenv("ELASTIC_APM_LAMBDA_APM_SERVER", v, 1);
	snprintf(v, sizeof v, "%lldms", (long long)plan.recv_ms);
	setenv("ELASTIC_APM_DATA_RECEIVER_TIMEOUT", v, 1);
	snprintf(v, sizeof v, "%lldms", (long long)plan.fwd_ms);
	setenv("ELASTIC_APM_DATA_FORWARDER_TIMEOUT", v, 1);
	snprintf(v, sizeof v, "%zu", plan.queue_bytes);
	setenv("APM_EXT_QUEUE_BYTES", v, 1);
	snprintf(v, sizeof v, "%u", plan.buffer);
	setenv("ELASTIC_APM_LAMBDA_AGENT_DATA_BUFFER_SIZE", v, 1);
	setenv("ELASTIC_APM_SEND_STRATEGY", plan.background ? "background" :
	    "syncflush", 1);
	snprintf(v, sizeof v, "%u", plan.tel_port);
	setenv("APM_EXT_TELEMETRY_PORT", v, 1);
	snprintf(v, sizeof v, "%u", plan.recv_port);
	setenv("ELASTIC_APM_DATA_RECEIVER_SERVER_PORT", v, 1);
	snprintf(v, sizeof v, "%u", plan.otlp_port);
	setenv("APM_EXT_OTLP_PORT", v, 1);
	setenv("ELASTIC_APM_LOG_LEVEL", "debug", 1);
	setenv("ELASTIC_APM_LAMBDA_CAPTURE_LOGS", plan.capture_logs ? "true" :
	    "false", 1);
	if (plan.with_token)
		setenv("ELASTIC_APM_SECRET_TOKEN", plan.token, 1);
	setenv("AWS_LAMBDA_FUNCTION_NAME", "sim-fn", 1);
	setenv("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST", 1);
	setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128", 1);
	setenv("AWS_REGION", "us-east-1", 1);
}

static void
plan_trace(void)
{
	trace("sim", "seed %llu: receiver timeout %lld ms, forwarder timeout "
	    "%lld ms, queue %zu bytes, buffer %u, %s, server %s (fail %d%%, "
	    "connect faults %d%%, idle close %d%%), %d invocation(s), shutdown %s "
	    "after %lld ms, budget %lld ms%s%s",
	    (unsigned long long)plan.seed, (long long)plan.recv_ms,
	    (long long)plan.fwd_ms, plan.queue_bytes, plan.buffer,
	    plan.background ? "background" : "syncflush",
	    server_names[plan.server_mode], plan.fail_pct,
	    plan.connect_fault_pct, plan.idle_close_pct, plan.ninv,
	    plan.shutdown_reason, (long long)plan.shutdown_gap_ms,
	    (long long)plan.shutdown_budget_ms, plan.with_token ? ", token" : "",
	    plan.tel_ok ? "" : ", telemetry subscription refused");
	trace("sim", "faults: short writes %d%%, spurious EAGAIN from accept and "
	    "EINTR from poll %d%%, socket() failures %d%%", plan.short_pct,
	    plan.eagain_pct, plan.socket_fail_pct);
	trace("sim", "Extensions API: /next breaks %d%%, Connection: close %d%%%s; "
	    "APM answers framed oddly %d%%%s%s%s%s", plan.lam_fault_pct,
	    plan.lam_close_pct, plan.sigterm_inv >= 0 ? ", SIGTERM" : "",
	    plan.apm_odd_pct, plan.no_ipv6 ? ", no IPv6" : "", plan.otlp_taken ?
	    ", OTLP port taken" : "", plan.tel_huge ? ", a telemetry POST over "
	    "the limit" : "", plan.tel_odd ? ", odd telemetry" : "");
	for (int i = 0; i < plan.ninv; i++) {
		const struct inv_plan *ip = &plan.inv[i];
		trace("sim", "invocation %d %s: after %lld ms idle, timeout %lld ms, "
		    "%s%s%s, %d thread(s)%s, %d trickler(s), %d log line(s)%s%s%s", i,
		    ip->rid, (long long)ip->gap_ms, (long long)ip->timeout_ms,
		    outcome_names[ip->outcome], ip->outcome == OUT_CRASH ?
		    " with status " : "", ip->outcome == OUT_CRASH ? ip->status : "",
		    ip->nthreads, ip->big ? " with large bodies" : "", ip->ntricklers,
		    ip->nlogs,
		    ip->flush ? ", flush" : "", ip->flush && ip->flush_at_ms ?
		    " near the deadline" : "", ip->stall ? ", server stalls" : "");
	}
}

/* == 8. Actors == */

/* Agent requests (and telemetry POSTs), for the answer checks. */
struct areq {
	int kind, conn, sid, thread, inv;
	int prompt;             /* sent at full speed: the extension is to blame */
	int oversize;           /* over the extension's limit for its route */
	int64_t t_start, t_last_write, t_read; /* awake us; t_read: all read */
	uint64_t end_off;       /* stream offset after its last byte */
	int status, closed, agent_gone, live;
	int first_ev, nev;
	size_t body_len;
	uint64_t body_hash;
	int64_t think_ms;
	struct xbuf trickle;    /* RQ_TRICKLE: body bytes still to send */
	char *body;             /* the body as sent (intake), for diagnostics */
	int otlp_json;          /* RQ_OTLP: its answer is {} */
	int bad;                /* RQ_OTLP_BAD: which mistake */
	int otlp_signal;        /* RQ_OTLP: traces, metrics, logs */
	int srv_seen, srv_status; /* proxied: what the APM server answered */
	int srv_cenc;           /* ... with Content-Encoding: gzip */
	int must_413;           /* proxied, head and body over the extension's
	                           send buffer: 413 */
	int noread;             /* the agent leaves its answer unread a while */
	int nproxy_max;         /* proxied calls waiting beside it, at most */
	size_t srv_len;
	uint64_t srv_hash;
};
static struct areq *reqs;
static int nreqs, reqcap;
static int *live;           /* requests waiting for an answer */
static int nlive, livecap;

struct evrec {
	int req, delivered;
};
static struct evrec *events;
static int nevents, evreccap;

static int
req_new(int kind, int inv, int thread)
{
	if (nreqs == reqcap) {
		reqcap = reqcap ? reqcap * 2 : 256;
		reqs = realloc(reqs, (size_t)reqcap * sizeof *reqs);
		if (!reqs)
			abort();
	}
	struct areq *r = &reqs[nreqs];
	memset(r, 0, sizeof *r);
	r->kind = kind;
	r->inv = inv;
	r->thread = thread;
	r->conn = r->sid = -1;
	r->prompt = 1;
	r->t_start = awake();
	if (kind != RQ_TEL)
		st.requests++;
	return nreqs++;
}

static void
live_add(int ri)
{
	if (nlive == livecap) {
		livecap = livecap ? livecap * 2 : 64;
		live = realloc(live, (size_t)livecap * sizeof *live);
		if (!live)
			abort();
	}
	live[nlive++] = ri;
	reqs[ri].live = 1;
}

static void
live_remove(int ri)
{
	if (!reqs[ri].live)
		return;
	reqs[ri].live = 0;
	for (int i = 0; i < nlive; i++)
		if (live[i] == ri) {
			live[i] = live[--nlive];
			return;
		}
}

static int
event_new(int ri)
{
	if (nevents == evreccap) {
		evreccap = evreccap ? evreccap * 2 : 1024;
		events = realloc(events, (size_t)evreccap * sizeof *events);
		if (!events)
			abort();
	}
	events[nevents] = (struct evrec){ ri, 0 };
	return nevents++;
}

/* -- lambda: the Extensions API and the control plane -- */

struct invrun {
	int delivered, runtime_done, completed, next_seen, threads_left;
	int64_t t_invoke, deadline;     /* monotonic us */
	char status[40];                /* the runtimeDone status sent */
	char tx_id[17], trace_id[33];   /* its last registered transaction */
	char tx_ids[8][17];             /* every one registered */
	int ntx;
	int ext_taken;                  /* the extension took its INVOKE */
};
static struct invrun invr[MAX_INV];

struct lconn {
	int sid;
	struct xbuf rx;
};

enum lam_fault_kind { LF_RESET, LF_CLOSE, LF_STATUS, LF_BADHEAD, LF_TRUNC,
	LF_UNKNOWN, LF_MALFORMED, LF_REFUSE, LF_REFUSE_NOW, LF_N };
static const char *const lam_fault_names[] = { "reset", "closed without an "
	"answer", "answered 500", "malformed status line", "truncated answer",
	"unknown event type", "malformed event", "reset; the reconnect is refused",
	"reset; the reconnect is refused at once" };

static struct {
	struct lconn c[64];
	int nc;
	int next_sid;           /* stream of the pending /next, -1 */
	int started;            /* the first /next came */
	int cur;                /* delivered, not completed; -1 */
	int next;               /* next invocation to deliver */
	int last;               /* last delivered; -1 */
	int deliver_pending, shutdown_next, shutdown_sent, exited, registered;
	int64_t deliver_at, shutdown_deadline;
	char id[40];
	int faults_in_row, nfaults; /* broken /next exchanges (lam_fault) */
	int await_next;         /* one broke: /next must come again */
	int64_t fault_at;       /* ... since then (monotonic us) */
	int refuse;             /* the next connect: 1 refused, 2 refused at once */
	int term;               /* SIGTERM raised */
	int64_t term_at;        /* ... at this awake time */
	int ext_invokes;        /* INVOKEs the extension took (the checks saw) */
	int64_t ext_inv_t;      /* g.inv.t_invoke of the last one */
} lam;

enum { LE_DELIVER, LE_DEADLINE, LE_SHUTDOWN_DEADLINE, LE_NEXT_AGAIN, LE_SIGTERM,
	LE_TERM_DEADLINE };
#define NEXT_AGAIN_US 1000000  /* /next again after a broken exchange */
#define TERM_EXIT_US 1000000   /* exit after SIGTERM (the extension's word) */
enum { RE_START, RE_LOG, RE_CRASH, RE_FLUSH, RE_DONE };
enum { TE_BATCH, TE_PUMP };

static void telp_emit(const char *rec, size_t n);
static void telp_enable(void);
static void check_live(void);
static int check_pending;  /* an EV_CHECK is scheduled */
static void runtime_finish(int i, const char *status);
static int apm_trouble_recent(void);
static int64_t slots_full_at;

static void
lam_connected(int sid)
{
	if (lam.nc == 64)
		fail("the extension opened more than 64 connections to the Lambda "
		    "API");
	struct lconn *c = &lam.c[lam.nc];
	memset(c, 0, sizeof *c);
	c->sid = sid;
	streams[sid].aid = lam.nc++;
}

static void
lam_respond(int sid, int status, const char *extra, const char *body, int close)
{
	struct xbuf b = { 0 };
	sb_addf(&b, "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n%s%s"
	    "Content-Length: %zu\r\nDate: Tue, 14 Nov 2023 22:13:20 GMT\r\n\r\n%s",
	    status, status == 200 ? "OK" : "Error", extra, close ?
	    "Connection: close\r\n" : "", strlen(body), body);
	actor_send(sid, b.p, sb_n(&b));
	sb_free(&b);
	if (close)
		actor_close(sid);
}

/*
 * The event is due but the /next exchange breaks instead (plan.lam_fault_pct,
 * at most 3 times in a row): the event stays pending for the next /next, as
 * Lambda keeps an event it could not hand over. A broken answer carries a
 * trap - an INVOKE of a request id Lambda never issued - that the extension
 * must not take. 1 if it broke.
 */
static int
lam_fault(int sid)
{
	if (!plan.lam_fault_pct || lam.faults_in_row >= 3 ||
	    !pct(RR, plan.lam_fault_pct))
		return 0;
	int k = (int)below(RR, LF_N);
	lam.faults_in_row++;
	lam.nfaults++;
	lam.next_sid = -1;
	lam.await_next = 1;
	lam.fault_at = now_us;
	schedule(now_us + NEXT_AGAIN_US + SLACK_US, EV_LAMBDA, LE_NEXT_AGAIN,
	    lam.nfaults);
	st.faults++;
	char trap[300], ev[300];
	snprintf(trap, sizeof trap, "{\"eventType\":\"INVOKE\",\"deadlineMs\":"
	    "%lld,\"requestId\":\"trap-%d\",\"invokedFunctionArn\":\""
	    FUNCTION_ARN "\"}", (long long)epoch_ms_at(now_us + 60000000),
	    lam.nfaults);
	trace("lambda", "/event/next breaks: %s", lam_fault_names[k]);
	struct xbuf b = { 0 };
	switch (k) {
	case LF_RESET:
		actor_reset(sid);
		break;
	case LF_CLOSE:
		actor_close(sid);
		break;
	case LF_STATUS:
		lam_respond(sid, pct(RR, 50) ? 500 : 403, "", trap, 0);
		break;
	case LF_BADHEAD:
		sb_addf(&b, "HTTP/1.1 2OO OK\r\nContent-Length: %zu\r\n\r\n%s",
		    strlen(trap), trap);
		actor_send(sid, b.p, sb_n(&b));
		break;
	case LF_TRUNC:
		sb_addf(&b, "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\n\r\n",
		    strlen(trap) + 40);
		sb_add(&b, trap, strlen(trap) / 2);
		actor_send(sid, b.p, sb_n(&b));
		actor_close(sid);
		break;
	case LF_UNKNOWN:
		snprintf(ev, sizeof ev, "{\"eventType\":\"RESTORE\",\"deadlineMs\":"
		    "%lld,\"requestId\":\"trap-%d\"}",
		    (long long)epoch_ms_at(now_us + 60000000), lam.nfaults);
		lam_respond(sid, 200, "", ev, 0);
		break;
	case LF_MALFORMED:
		snprintf(ev, sizeof ev, pct(RR, 50) ? "{\"eventType\":\"INVOKE\","
		    "\"requestId\":\"trap-%d\"}" : "{\"eventType\":\"INVOKE\","
		    "\"requestId\":\"trap-%d\",", lam.nfaults);
		lam_respond(sid, 200, "", ev, 0);
		break;
	case LF_REFUSE:
	case LF_REFUSE_NOW:
		lam.refuse = k == LF_REFUSE ? 1 : 2;
		actor_reset(sid);
		break;
	}
	sb_free(&b);
	return 1;
}

/* How the extension's next connect to the Lambda API goes: 0 it
 * connects, 1 refused (asynchronously), 2 refused at once. */
static int
lam_connect_fault(void)
{
	int r = lam.refuse;
	lam.refuse = 0;
	return r;
}

/* Write the next event on the pending /next, once it is due. */
static void
lam_try_deliver(void)
{
	if (!lam.deliver_pending || lam.deliver_at > now_us || lam.next_sid < 0 ||
	    lam.term)
		return;
	int sid = lam.next_sid;
	if (lam_fault(sid))
		return;
	lam.faults_in_row = 0;
	char body[1024];
	lam.deliver_pending = 0;
	lam.next_sid = -1;
	if (lam.shutdown_next) {
		lam.shutdown_sent = 1;
		lam.shutdown_deadline = now_us + plan.shutdown_budget_ms * 1000;
		snprintf(body, sizeof body, "{\"eventType\":\"SHUTDOWN\","
		    "\"shutdownReason\":\"%s\",\"deadlineMs\":%lld}",
		    plan.shutdown_reason, (long long)epoch_ms_at(lam.shutdown_deadline));
		schedule(lam.shutdown_deadline, EV_LAMBDA, LE_SHUTDOWN_DEADLINE, 0);
		trace("lambda", "SHUTDOWN (%s), deadline in %lld ms",
		    plan.shutdown_reason, (long long)plan.shutdown_budget_ms);
	} else {
		int i = lam.next++;
		struct invrun *ir = &invr[i];
		const struct inv_plan *ip = &plan.inv[i];
		ir->delivered = 1;
		ir->t_invoke = now_us;
		ir->deadline = now_us + ip->timeout_ms * 1000;
		lam.cur = lam.last = i;
		st.invocations++;
		snprintf(body, sizeof body, "{\"eventType\":\"INVOKE\","
		    "\"deadlineMs\":%lld,\"requestId\":\"%s\",\"invokedFunctionArn\":"
		    "\"" FUNCTION_ARN "\",\"tracing\":{\"type\":\"X-Amzn-Trace-Id\","
		    "\"value\":\"Root=1-6553f100-%024llx;Parent=%016llx;Sampled=1\"}}",
		    (long long)epoch_ms_at(ir->deadline), ip->rid,
		    (unsigned long long)(rng_next(RR) >> 16),
		    (unsigned long long)rng_next(RR));
		schedule(ir->deadline, EV_LAMBDA, LE_DEADLINE, i);
		schedule(now_us + range(RR, 0, 2000), EV_RUNTIME, i, RE_START);
		trace("lambda", "INVOKE %s (invocation %d), deadline in %lld ms", ip->rid,
		    i, (long long)ip->timeout_ms);
	}
	char extra[200];
	snprintf(extra, sizeof extra, "Lambda-Extension-Event-Identifier: "
	    "%08llx\r\n", (unsigned long long)(rng_next(RR) & 0xffffffff));
	int close = pct(RR, plan.lam_close_pct);
	if (close)
		trace("lambda", "... with Connection: close");
	lam_respond(sid, 200, extra, body, close);
}

/* The invocation is over for Lambda (function done and /next called). */
static void
lam_complete(int i)
{
	struct invrun *ir = &invr[i];
	const struct inv_plan *ip = &plan.inv[i];
	ir->completed = 1;
	lam.cur = -1;
	char t[40], rec[700];
	iso_time(now_us, t, sizeof t);
	int64_t dur = (now_us - ir->t_invoke) / 10; /* hundredths of ms */
	int n = snprintf(rec, sizeof rec, "{\"time\":\"%s\",\"type\":"
	    "\"platform.report\",\"record\":{\"requestId\":\"%s\",\"status\":\"%s\","
	    "\"metrics\":{\"durationMs\":%lld.%02lld,\"billedDurationMs\":%lld,"
	    "\"memorySizeMB\":128,\"maxMemoryUsedMB\":%d%s}}}", t, ip->rid,
	    strcmp(ir->status, "success") == 0 ? "success" : "error",
	    (long long)(dur / 100), (long long)(dur % 100),
	    (long long)(dur / 100 + 1), (int)range(RR, 40, 127),
	    i == 0 ? ",\"initDurationMs\":187.25" : "");
	telp_emit(rec, (size_t)n);
	int last = i + 1 >= plan.ninv;
	int64_t gap = (last ? plan.shutdown_gap_ms : plan.inv[i + 1].gap_ms) * 1000;
	lam.shutdown_next = last;
	lam.deliver_pending = 1;
	lam.deliver_at = now_us + gap;
	schedule(lam.deliver_at, EV_LAMBDA, LE_DELIVER, 0);
	trace("lambda", "invocation %d complete; next event (%s) in %lld ms", i,
	    last ? "SHUTDOWN" : "INVOKE", (long long)(gap / 1000));
	if (gap > 0) {
		freeze_from = now_us + range(RR, 0, 3000);
		freeze_until = lam.deliver_at;
		if (freeze_from >= freeze_until)
			freeze_from = freeze_until = 0;
		else
			schedule(freeze_from, EV_WAKE, 0, 0);
	}
}

static void
lam_next(int sid)
{
	if (lam.shutdown_sent)
		fail("/event/next after SHUTDOWN");
	if (lam.next_sid >= 0 && !streams[lam.next_sid].ext_closed)
		fail("a second /event/next while one is pending");
	lam.next_sid = sid;
	lam.await_next = 0;
	if (lam.cur >= 0) {
		struct invrun *ir = &invr[lam.cur];
		const char *rid = plan.inv[lam.cur].rid;
		if (now_us >= ir->deadline)
			fail("/event/next for %s came %lld ms after its deadline", rid,
			    (long long)((now_us - ir->deadline) / 1000));
		if (!ir->next_seen) {
			ir->next_seen = 1;
			trace("lambda", "/event/next: invocation %d done for the extension, "
			    "%lld ms before its deadline", lam.cur,
			    (long long)((ir->deadline - now_us) / 1000));
			if (ir->runtime_done)
				lam_complete(lam.cur);
		}
	} else if (!lam.started) {
		lam.started = 1;
		lam.deliver_pending = 1;
		lam.deliver_at = now_us + plan.init_ms * 1000;
		lam.shutdown_next = plan.ninv == 0;
		schedule(lam.deliver_at, EV_LAMBDA, LE_DELIVER, 0);
		trace("lambda", "/event/next: init done; the function initialises for "
		    "%lld ms", (long long)plan.init_ms);
	} else {
		trace("lambda", "/event/next");
	}
	lam_try_deliver();
}

static void
lam_request(int sid, struct hreq *h)
{
	const char *b = h->body.p ? sb_data(&h->body) : "";
	size_t bl = sb_n(&h->body);
	if (strcmp(h->method, "POST") == 0 &&
	    strcmp(h->target, "/2020-01-01/extension/register") == 0) {
		if (strcmp(h->lename, "apm-lambda-extension") != 0)
			fail("register: Lambda-Extension-Name is \"%s\"", h->lename);
		if (!memmem(b, bl, "\"INVOKE\"", 8) || !memmem(b, bl, "\"SHUTDOWN\"", 10))
			fail("register: events missing in %s", show(b, bl, 100));
		snprintf(lam.id, sizeof lam.id, "%08llx-sim-ext",
		    (unsigned long long)(rng_next(RR) & 0xffffffff));
		char extra[128];
		snprintf(extra, sizeof extra, "Lambda-Extension-Identifier: %s\r\n",
		    lam.id);
		lam.registered = 1;
		trace("lambda", "register: identifier %s", lam.id);
		lam_respond(sid, 200, extra, "{\"functionName\":\"sim-fn\","
		    "\"functionVersion\":\"$LATEST\",\"handler\":\"index.handler\"}",
		    plan.register_close);
		return;
	}
	if (!lam.registered || strcmp(h->leid, lam.id) != 0)
		fail("Lambda API call %s %s with identifier \"%s\" (want \"%s\")",
		    h->method, h->target, h->leid, lam.id);
	if (strcmp(h->method, "PUT") == 0 &&
	    strcmp(h->target, "/2022-07-01/telemetry") == 0) {
		enum apm_err err;
		char dest[64];
		snprintf(dest, sizeof dest, "sandbox.localdomain:%u\"", plan.tel_port);
		if (apm_json_parse(b, bl, NULL, 0, NULL, &err) < 0 ||
		    !memmem(b, bl, dest, strlen(dest)))
			fail("telemetry subscription: %s", show(b, bl, 300));
		if (!memmem(b, bl, "\"function\"", 10) != !plan.capture_logs)
			fail("telemetry subscription types do not follow CAPTURE_LOGS: %s",
			    show(b, bl, 300));
		trace("lambda", "telemetry subscribe: %s", plan.tel_ok ? "200" : "500");
		if (plan.tel_ok)
			telp_enable();
		lam_respond(sid, plan.tel_ok ? 200 : 500, "", plan.tel_ok ? "\"OK\"" :
		    "{\"errorMessage\":\"sim\"}", 0);
		return;
	}
	if (strcmp(h->method, "GET") == 0 &&
	    strcmp(h->target, "/2020-01-01/extension/event/next") == 0) {
		lam_next(sid);
		return;
	}
	fail("Lambda API: unexpected %s %s", h->method, h->target);
}

static void
lam_on_data(int sid)
{
	static struct hreq h;
	struct lconn *c = &lam.c[streams[sid].aid];
	int end = actor_take(sid, &c->rx);
	while (sb_n(&c->rx)) {
		size_t used;
		const char *why = "";
		int r = http_request(sb_data(&c->rx), sb_n(&c->rx), &h, &used, &why);
		if (r < 0)
			fail("Lambda API: malformed request (%s): %s", why,
			    show(sb_data(&c->rx), sb_n(&c->rx), 200));
		if (r == 0)
			break;
		sb_consume(&c->rx, used);
		lam_request(sid, &h);
	}
	if (end) {
		if (lam.next_sid == sid)
			lam.next_sid = -1;
		actor_close(sid);
	}
}

static void
lam_event(int what, int i)
{
	if (what == LE_DELIVER) {
		lam_try_deliver();
	} else if (what == LE_DEADLINE) {
		struct invrun *ir = &invr[i];
		if (ir->completed)
			return;
		if (!ir->runtime_done)
			runtime_finish(i, "timeout");
		if (!ir->next_seen && !lam.term)
			fail("deadline of %s (invocation %d): the extension has not "
			    "called /event/next", plan.inv[i].rid, i);
	} else if (what == LE_SHUTDOWN_DEADLINE) {
		if (!lam.exited)
			fail("the SHUTDOWN deadline passed and the extension is still "
			    "running (Lambda would kill it)");
	} else if (what == LE_NEXT_AGAIN) {
		if (lam.await_next && i == lam.nfaults && !lam.term)
			fail("the /event/next exchange broke %lld ms ago and the "
			    "extension has not called /event/next again",
			    (long long)((now_us - lam.fault_at) / 1000));
	} else if (what == LE_SIGTERM) {
		if (lam.exited || lam.shutdown_sent || lam.term)
			return;
		if (frozen_until) {
			/* a frozen process gets its signal once thawed (and the
			 * loop's first turn comes first) */
			schedule(frozen_until + range(RR, 1000, 50000), EV_LAMBDA,
			    LE_SIGTERM, 0);
			return;
		}
		trace("lambda", "SIGTERM to the extension (no SHUTDOWN event will "
		    "come)");
		lam.term = 1;
		lam.term_at = awake();
		g.got_term = 1; /* what its handler, on_term, does */
		term_eintr = 1;
		schedule(now_us + TERM_EXIT_US + SLACK_US, EV_LAMBDA, LE_TERM_DEADLINE,
		    0);
	} else if (what == LE_TERM_DEADLINE) {
		if (!lam.exited && awake() - lam.term_at > TERM_EXIT_US + SLACK_US)
			fail("SIGTERM came %lld ms ago and the extension is still "
			    "running (it flushes for up to %lld ms)",
			    (long long)((awake() - lam.term_at) / 1000),
			    (long long)(TERM_EXIT_US / 1000));
		else if (!lam.exited)
			schedule(now_us + 100000, EV_LAMBDA, LE_TERM_DEADLINE, 0);
	}
}

static void
lam_exit_check(int code)
{
	lam.exited = 1;
	if (lam.term && !lam.shutdown_sent) {
		if (awake() - lam.term_at > TERM_EXIT_US + SLACK_US)
			fail("the extension exited %lld ms after SIGTERM",
			    (long long)((awake() - lam.term_at) / 1000));
		if (code != 0)
			fail("the extension exited with status %d after SIGTERM", code);
		return;
	}
	if (!lam.shutdown_sent)
		fail("the extension exited (status %d) before SHUTDOWN", code);
	if (now_us >= lam.shutdown_deadline)
		fail("the extension exited %lld ms after the SHUTDOWN deadline",
		    (long long)((now_us - lam.shutdown_deadline) / 1000));
	if (code != 0)
		fail("the extension exited with status %d", code);
}

/* -- platform: the Telemetry API's deliveries -- */

static struct {
	int enabled, sid, inflight, batch_sched, req;
	struct xbuf rx, pending;
	int npending, pending_drops;
	struct xbuf q[512];     /* batches not yet answered 200, in order */
	int qdrops[512];        /* ... their platform.logsDropped records */
	int qhuge[512];         /* ... over the extension's limit: 413 */
	int qh, qn;
	int huge_done;
	uint64_t drops_acked;   /* logsDropped records in batches answered 200 */
} telp;

static void
telp_enable(void)
{
	telp.enabled = 1;
}

static void
telp_emit(const char *rec, size_t n)
{
	if (!telp.enabled)
		return;
	if (telp.npending++)
		sb_add(&telp.pending, ",", 1);
	sb_add(&telp.pending, rec, n);
	if (!telp.batch_sched) {
		telp.batch_sched = 1;
		int64_t d = 25000;
		if (pct(RR, 15))
			d += range(RR, 100000, 3000000); /* late */
		schedule(now_us + d, EV_TEL, TE_BATCH, 0);
	}
}

/* Lambda says it dropped records (the extension was too slow). */
static void
telp_emit_drop(void)
{
	char t[40], rec[300];
	iso_time(now_us, t, sizeof t);
	int n = snprintf(rec, sizeof rec, "{\"time\":\"%s\",\"type\":"
	    "\"platform.logsDropped\",\"record\":{\"reason\":\"Consumer seems to "
	    "have fallen behind as it has not acknowledged receipt of logs.\","
	    "\"droppedRecords\":%d,\"droppedBytes\":%d}}", t, (int)range(RR, 1, 90),
	    (int)range(RR, 100, 90000));
	if (!telp.enabled)
		return;
	telp_emit(rec, (size_t)n);
	telp.pending_drops++;
}

/* A record of more tokens than the extension parses at once (TEL_TOKENS):
 * skipped, and the records after it still count (a logsDropped follows). */
static void
telp_emit_oversize(void)
{
	struct xbuf b = { 0 };
	char t[40];
	iso_time(now_us, t, sizeof t);
	sb_addf(&b, "{\"time\":\"%s\",\"type\":\"platform.extension\",\"record\":"
	    "{\"name\":\"sim-other\",\"state\":\"Ready\",\"events\":[", t);
	for (int i = 0; i < 2200; i++)
		sb_adds(&b, i ? ",\"E\"" : "\"E\"");
	sb_adds(&b, "]}}");
	telp_emit(sb_data(&b), sb_n(&b));
	sb_free(&b);
	telp_emit_drop();
}

static void
telp_pump(void)
{
	if (telp.inflight || telp.qn == 0)
		return;
	if (telp.sid < 0) {
		telp.sid = actor_connect(AF_INET, "127.0.0.1", plan.tel_port, ACT_TEL,
		    0, "platform");
		if (telp.sid < 0) {
			schedule(now_us + 100000, EV_TEL, TE_PUMP, 0);
			return;
		}
	}
	struct xbuf *b = &telp.q[telp.qh];
	struct xbuf w = { 0 };
	sb_addf(&w, "POST / HTTP/1.1\r\nHost: sandbox.localdomain:%u\r\n"
	    "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n",
	    plan.tel_port, sb_n(b));
	sb_add(&w, sb_data(b), sb_n(b));
	if (plan.tel_odd && !telp.qhuge[telp.qh] && pct(RR, 5)) {
		/* cut off by a reset: sent again on a new connection */
		size_t cut = (size_t)range(RR, 1, (int64_t)sb_n(&w) - 1);
		trace("platform", "POST of %zu bytes of telemetry: reset after %zu "
		    "bytes", sb_n(b), cut);
		actor_send(telp.sid, sb_data(&w), cut);
		actor_reset(telp.sid);
		telp.sid = -1;
		sb_clear(&telp.rx);
		sb_free(&w);
		schedule(now_us + 10000, EV_TEL, TE_PUMP, 0);
		return;
	}
	int ri = req_new(RQ_TEL, lam.last, -1);
	struct stream *s = &streams[telp.sid];
	reqs[ri].sid = telp.sid;
	reqs[ri].end_off = s->in.wrote + sb_n(&s->outbox) + sb_n(&w);
	live_add(ri);
	telp.req = ri;
	telp.inflight = 1;
	trace("platform", "POST of %zu bytes of telemetry (t%d)", sb_n(b), ri);
	actor_send(telp.sid, sb_data(&w), sb_n(&w));
	sb_free(&w);
	check_live();
}

static void
telp_on_data(int sid)
{
	static struct xbuf junk;
	if (sid != telp.sid) {
		actor_take(sid, &junk);
		sb_clear(&junk);
		return;
	}
	int end = actor_take(sid, &telp.rx);
	while (sb_n(&telp.rx)) {
		struct hresp h;
		size_t used;
		const char *why = "";
		int r = http_response(sb_data(&telp.rx), sb_n(&telp.rx), &h, &used, &why);
		if (r < 0)
			fail("platform: bad answer to a telemetry POST (%s): %s", why,
			    show(sb_data(&telp.rx), sb_n(&telp.rx), 200));
		if (r == 0)
			break;
		sb_consume(&telp.rx, used);
		if (!telp.inflight)
			fail("platform: an answer (%d) without a POST", h.status);
		if (telp.qhuge[telp.qh] && h.status != 413)
			fail("platform: telemetry POST t%d of %zu bytes, over the "
			    "extension's limit, answered %d (not 413)", telp.req,
			    sb_n(&telp.q[telp.qh]), h.status);
		if (h.status != 200 && !telp.qhuge[telp.qh])
			fail("platform: telemetry POST t%d answered %d (its JSON is valid)",
			    telp.req, h.status);
		if (h.status == 200)
			telp.drops_acked += (uint64_t)telp.qdrops[telp.qh];
		reqs[telp.req].status = h.status;
		live_remove(telp.req);
		sb_free(&telp.q[telp.qh]);
		telp.qh = (telp.qh + 1) % 512;
		telp.qn--;
		telp.inflight = 0;
		if (h.close)
			end = 1;
		schedule(now_us, EV_TEL, TE_PUMP, 0);
	}
	if (end) {
		trace("platform", "telemetry connection closed by the extension%s",
		    telp.inflight ? " before the answer: resend" : "");
		if (telp.inflight && telp.qhuge[telp.qh])
			fail("platform: telemetry POST t%d, over the limit, was closed "
			    "without its 413", telp.req);
		if (telp.inflight) {
			reqs[telp.req].closed = 1;
			live_remove(telp.req);
			telp.inflight = 0;
		}
		actor_close(sid);
		telp.sid = -1;
		sb_clear(&telp.rx);
		schedule(now_us + 10000, EV_TEL, TE_PUMP, 0);
	}
}

static void
telp_event(int what)
{
	if (what == TE_BATCH) {
		telp.batch_sched = 0;
		if (!telp.npending)
			return;
		if (telp.qn == 512)
			fail("simulator: telemetry backlog over 512 batches");
		int k = (telp.qh + telp.qn++) % 512;
		struct xbuf *b = &telp.q[k];
		memset(b, 0, sizeof *b);
		telp.qdrops[k] = telp.pending_drops;
		telp.qhuge[k] = 0;
		if (plan.tel_odd && pct(RR, 30))
			sb_adds(b, pct(RR, 50) ? "\n" : " \t\r\n "); /* before the array */
		sb_add(b, "[", 1);
		sb_add(b, sb_data(&telp.pending), sb_n(&telp.pending));
		sb_add(b, "]", 1);
		sb_clear(&telp.pending);
		telp.npending = 0;
		telp.pending_drops = 0;
		if (plan.tel_huge && !telp.huge_done && telp.qn < 512) {
			/* one POST over TEL_BODY_MAX: Lambda never sends it (maxBytes
			 * is 1 MiB), the extension must still refuse it whole */
			telp.huge_done = 1;
			k = (telp.qh + telp.qn++) % 512;
			b = &telp.q[k];
			memset(b, 0, sizeof *b);
			telp.qdrops[k] = 0;
			telp.qhuge[k] = 1;
			char t[40];
			iso_time(now_us, t, sizeof t);
			sb_addf(b, "[{\"time\":\"%s\",\"type\":\"function\",\"record\":\"",
			    t);
			size_t n = (size_t)range(RR, 2200000, 2600000);
			sb_reserve(b, n);
			memset(b->p + b->len, 'h', n);
			b->len += n;
			b->p[b->len] = 0;
			sb_adds(b, "\"}]");
		}
	}
	telp_pump();
}

/* -- runtime and agents -- */

struct aconn {
	int sid, req, dead, trickler, otlp;
	int64_t noread_until;   /* the agent does not read its answer until then */
	struct xbuf rx;
};
static struct aconn *aconns;
static int naconns;

struct athread {
	int inv, tidx, step, waiting, done, flusher;
};
static struct athread athreads[MAX_INV * (MAX_THREADS + 2)];
static int nathreads;
static int thread_conn[MAX_THREADS]; /* kept-alive connection of agent thread k */
static int thread_otlp[MAX_THREADS]; /* ... to the OTLP port */

struct loginfo {
	int inv;
	char *expect;           /* the message the log event must carry */
};
static struct loginfo *logs;
static int nlogs, logcap;

static const char *const hostile_logs[] = {
	"plain line\n",
	"quote \" and backslash \\ and tab \t inside\n",
	"ends with a backslash and an n: \\n",
	"ends with a backslash and an n, then a newline: \\n\n",
	"trailing escaped backslash \\",
	"trailing escaped backslash, then a newline \\\n",
	"windows line\r\n",
	"two newlines\n\n",
	"backslashes \\\\\\n\n",
	"control \x01 bell \x07 and unicode \xc3\xa9 \xe2\x9c\x93\n",
	"{\"looks\":\"like json\"}\n",
	"\\",
	"\\n",
	"n",
	"\\r\\n\r\n",
	"",
};

static int
agent_connect(int v6, int trickler, int otlp)
{
	if (naconns == MAX_STREAMS)
		fail("simulator: too many agent connections");
	int ai = naconns++;
	struct aconn *a = &aconns[ai];
	memset(a, 0, sizeof *a);
	a->req = -1;
	a->trickler = trickler;
	a->otlp = otlp;
	char what[40];
	snprintf(what, sizeof what, "%s c%d", otlp ? "otlp" : "agent", ai);
	a->sid = actor_connect(v6 ? AF_INET6 : AF_INET, v6 ? "::1" : "127.0.0.1",
	    otlp ? plan.otlp_port : plan.recv_port, ACT_AGENT, ai, what);
	if (a->sid < 0) {
		a->dead = 1;
		return -1;
	}
	return ai;
}

/* One event line, with its sim_id, and hostile but valid strings. */
static void
gen_event(struct xbuf *b, int id, int line_max)
{
	static const char *const kinds[] = { "transaction", "span", "error" };
	sb_addf(b, "{\"%s\":{\"id\":\"%016llx\",\"sim_id\":%d,\"name\":"
	    "\"GET /r \\\"q\\\" \\\\ \\u00e9 \\n %d\",\"duration\":%d.5",
	    kinds[below(RR, 3)], (unsigned long long)rng_next(RR), id, id,
	    (int)below(RR, 1000));
	static char pattern[26 + 20000];
	if (!pattern[0])
		for (size_t i = 0; i < sizeof pattern; i++)
			pattern[i] = (char)('a' + (i * 7) % 26);
	size_t pad = (size_t)below(RR, (uint64_t)line_max + 1);
	if (pad) {
		sb_adds(b, ",\"pad\":\"");
		sb_add(b, pattern + id % 26, minz(pad, 20000));
		sb_add(b, "\"", 1);
	}
	sb_adds(b, "}}\n");
}

static void
add_common_headers(struct xbuf *w, const struct rspec *sp)
{
	sb_addf(w, "Host: localhost:%u\r\nUser-Agent: apm-agent-nodejs/4.7.0 "
	    "(sim-fn)\r\nAccept: */*\r\n", plan.recv_port);
	if (sp->agent_auth)
		sb_adds(w, "Authorization: Bearer agent-secret\r\n");
	if (sp->conn_close)
		sb_adds(w, "Connection: close\r\n");
}

/* Frame body b into w: Content-Length or chunked. */
static void
add_body(struct xbuf *w, const char *b, size_t n, int chunked)
{
	if (!chunked) {
		sb_addf(w, "Content-Length: %zu\r\n\r\n", n);
		sb_add(w, b, n);
		return;
	}
	sb_adds(w, "Transfer-Encoding: chunked\r\n\r\n");
	size_t max = pct(RR, 30) ? 16 : pct(RR, 50) ? 4096 : 40000;
	for (size_t off = 0; off < n;) {
		size_t k = minz(n - off, (size_t)range(RR, 1, (int64_t)max));
		sb_addf(w, "%zx%s\r\n", k, pct(RR, 10) ? ";sim=1" : "");
		sb_add(w, b + off, k);
		sb_adds(w, "\r\n");
		off += k;
	}
	sb_adds(w, pct(RR, 10) ? "0\r\nX-Sim-Trailer: 1\r\n\r\n" : "0\r\n\r\n");
}

/* Build the bytes of request ri per spec sp into w; *cut: bytes to send. */
static void
build_request(int ri, const struct rspec *sp, struct xbuf *w, size_t *cut)
{
	struct areq *r = &reqs[ri];
	const struct inv_plan *ip = &plan.inv[r->inv];
	struct xbuf body = { 0 };
	switch (sp->kind) {
	case RQ_INTAKE:
	case RQ_FLUSH:
	case RQ_ABORT:
		sb_addf(w, "POST /intake/v2/events%s HTTP/1.1\r\n", sp->kind == RQ_FLUSH ?
		    "?flushed=true" : "");
		add_common_headers(w, sp);
		sb_adds(w, "Content-Type: application/x-ndjson\r\n");
		if (sp->identity)
			sb_adds(w, "Content-Encoding: identity\r\n");
		if (sp->expect100)
			sb_adds(w, "Expect: 100-continue\r\n");
		if (sp->nevents > 0) {
			sb_adds(&body, AGENT_META);
			r->first_ev = nevents;
			r->nev = sp->nevents;
			for (int k = 0; k < sp->nevents; k++)
				gen_event(&body, event_new(ri), sp->line_max);
		}
		r->oversize = sb_n(&body) > plan.max_body;
		break;
	case RQ_REGISTER: {
		invr[r->inv].tx_id[0] = 0;
		snprintf(invr[r->inv].tx_id, sizeof invr[r->inv].tx_id, "%016llx",
		    (unsigned long long)rng_next(RR));
		if (invr[r->inv].ntx < 8)
			memcpy(invr[r->inv].tx_ids[invr[r->inv].ntx++], invr[r->inv].tx_id,
			    17);
		snprintf(invr[r->inv].trace_id, sizeof invr[r->inv].trace_id,
		    "%016llx%016llx", (unsigned long long)rng_next(RR),
		    (unsigned long long)rng_next(RR));
		sb_adds(w, "POST /register/transaction HTTP/1.1\r\n");
		add_common_headers(w, sp);
		sb_addf(w, "Content-Type: application/vnd.elastic.apm.transaction+"
		    "ndjson\r\nx-elastic-aws-request-id: %s\r\n", ip->rid);
		sb_adds(&body, AGENT_META);
		sb_addf(&body, "{\"transaction\":{\"id\":\"%s\",\"trace_id\":\"%s\","
		    "\"name\":\"sim \\\"handler\\\" \\\\\",\"type\":\"lambda\","
		    "\"timestamp\":%lld,\"duration\":0,\"result\":\"\",\"outcome\":"
		    "\"unknown\",\"sampled\":true,\"sample_rate\":1}}\n",
		    invr[r->inv].tx_id, invr[r->inv].trace_id,
		    (long long)(EPOCH0_US + now_us - T0_US));
		break;
	}
	case RQ_OTLP: {
		static const char *const sig[] = { "traces", "metrics", "logs" };
		sb_addf(w, "POST /v1/%s HTTP/1.1\r\n", sig[sp->signal]);
		add_common_headers(w, sp);
		sb_addf(w, "Content-Type: %s\r\n", sp->json ? "application/json" :
		    "application/x-protobuf");
		if (sp->expect100)
			sb_adds(w, "Expect: 100-continue\r\n");
		r->first_ev = event_new(ri);
		r->nev = 1;
		size_t pad = (size_t)below(RR, (uint64_t)sp->line_max * 4 + 1);
		if (sp->json) {
			sb_addf(&body, "{\"resource%s\":[{\"resource\":{\"attributes\":"
			    "[]},\"sim_id\":%d,\"pad\":\"", sp->signal == 0 ? "Spans" :
			    sp->signal == 1 ? "Metrics" : "Logs", r->first_ev);
			for (size_t i = 0; i < pad; i++)
				sb_add(&body, "p", 1);
			sb_adds(&body, "\"}]}");
		} else { /* opaque bytes, every value, our marker inside */
			sb_add(&body, "\x0a\x00", 2);
			for (size_t i = 0; i < pad / 2; i++) {
				char c = (char)below(RR, 256);
				sb_add(&body, &c, 1);
			}
			sb_addf(&body, "\"sim_id\":%d;", r->first_ev);
			for (size_t i = 0; i < pad / 2; i++) {
				char c = (char)below(RR, 256);
				sb_add(&body, &c, 1);
			}
		}
		r->oversize = sb_n(&body) > plan.max_body;
		r->otlp_json = sp->json;
		r->otlp_signal = sp->signal;
		break;
	}
	case RQ_OTLP_BAD:
		/* 0: GET (405), 1: unknown path (404), 2: text/plain (415),
		 * 3: HTTP/2's preface (400, closed) */
		r->bad = sp->signal;
		if (sp->signal == 3) {
			sb_adds(w, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
			*cut = sb_n(w);
			return;
		}
		sb_addf(w, "%s /v1/%s HTTP/1.1\r\n", sp->signal == 0 ? "GET" : "POST",
		    sp->signal == 1 ? "profiles" : "traces");
		add_common_headers(w, sp);
		sb_addf(w, "Content-Type: %s\r\n", sp->signal == 2 ? "text/plain" :
		    "application/x-protobuf");
		sb_adds(&body, "\x0a\x02\x08\x01");
		break;
	case RQ_PROXY_GET:
		sb_adds(w, "GET / HTTP/1.1\r\n");
		add_common_headers(w, sp);
		sb_addf(w, "x-sim-id: %d\r\n\r\n", ri);
		*cut = sb_n(w);
		return;
	case RQ_PROXY_CONFIG:
		sb_adds(w, "POST /config/v1/agents HTTP/1.1\r\n");
		add_common_headers(w, sp);
		sb_addf(w, "Content-Type: application/json\r\nx-sim-id: %d\r\n", ri);
		size_t size = sp->size;
		if (pct(RR, 5)) {
			/* a long header and a body within the proxy's limit: together
			 * over the buffer the extension passes them on from */
			int64_t pad = range(RR, 3000, 6000);
			sb_adds(w, "X-Sim-Pad: ");
			for (int64_t i = 0; i < pad; i++)
				sb_add(w, "p", 1);
			sb_adds(w, "\r\n");
			size = (size_t)range(RR, 15000, PROXY_BODY_MAX);
			r->must_413 = 1;
		}
		sb_adds(&body, "{\"service\":{\"name\":\"sim-fn\",\"environment\":"
		    "\"sim\"},\"pad\":\"");
		while (sb_n(&body) + 2 < size)
			sb_add(&body, "x", 1);
		sb_adds(&body, "\"}");
		r->oversize = sb_n(&body) > 12000;
		break;
	default:
		break;
	}
	r->body_len = sb_n(&body);
	r->body_hash = hash64(body.p ? sb_data(&body) : "", sb_n(&body));
	if (r->nev) {
		r->body = malloc(sb_n(&body) + 1);
		memcpy(r->body, sb_data(&body), sb_n(&body));
	}
	add_body(w, body.p ? sb_data(&body) : "", sb_n(&body), sp->chunked);
	*cut = sb_n(w);
	if (sp->kind == RQ_ABORT)
		*cut = (size_t)range(RR, 1, (int64_t)sb_n(w) - 1);
	sb_free(&body);
}

static void
agent_send(int th, const struct rspec *sp)
{
	struct athread *t = &athreads[th];
	int k = t->flusher ? 0 : t->tidx;
	int otlp = sp->kind == RQ_OTLP || sp->kind == RQ_OTLP_BAD;
	int *slot = otlp ? &thread_otlp[k] : &thread_conn[k];
	int ci = *slot;
	if (ci >= 0 && !aconns[ci].dead && (sp->fresh_conn || aconns[ci].req >= 0)) {
		actor_close(aconns[ci].sid); /* the agent drops its idle connection */
		aconns[ci].dead = 1;
	}
	if (ci < 0 || aconns[ci].dead)
		ci = *slot = agent_connect(sp->v6, 0, otlp);
	int ri = req_new(sp->kind, t->inv, th);
	struct areq *r = &reqs[ri];
	r->think_ms = sp->think_ms;
	r->prompt = sp->kind != RQ_ABORT;
	if (ci < 0) {
		r->closed = 1;
		trace("agent", "r%d (%s): cannot connect", ri, rq_names[sp->kind]);
		t->waiting = 0;
		schedule(now_us + 1000, EV_AGENT, th, 0);
		return;
	}
	struct xbuf w = { 0 };
	size_t cut;
	build_request(ri, sp, &w, &cut);
	struct aconn *a = &aconns[ci];
	struct stream *s = &streams[a->sid];
	r->conn = ci;
	r->sid = a->sid;
	r->end_off = s->in.wrote + sb_n(&s->outbox) + cut;
	a->req = ri;
	t->waiting = 1;
	trace("agent", "r%d c%d thread %d: %s, %zu bytes%s%s%s%s, %d events", ri,
	    ci, th, show(w.p, (size_t)((char *)memchr(w.p, '\r', w.len) - w.p), 80),
	    cut, sp->chunked ? ", chunked" : "", sp->expect100 ? ", expect 100" : "",
	    sp->conn_close ? ", close" : "", sp->kind == RQ_ABORT ?
	    " (then a reset)" : "", r->nev);
	actor_send(a->sid, w.p, cut);
	sb_free(&w);
	if (sp->kind == RQ_ABORT) {
		schedule(now_us + range(RR, 100, 30000), EV_ARESET, ri, 0);
	} else {
		live_add(ri);
		check_live();
		if ((sp->kind == RQ_PROXY_GET || sp->kind == RQ_PROXY_CONFIG) &&
		    pct(RR, 6)) /* the agent gives up while its call is proxied */
			schedule(now_us + range(RR, 100, plan.fwd_ms * 1000), EV_ARESET,
			    ri, 0);
		else if (sp->kind == RQ_PROXY_GET && pct(RR, 5)) {
			/* it leaves a large answer unread past the receiver timeout
			 * (a small receive window): the extension gives up sending */
			r->noread = 1;
			s->out.window = 4096;
			a->noread_until = now_us + plan.recv_ms * 1000 +
			    range(RR, 100000, 2000000);
			schedule(a->noread_until, EV_ARESUME, ci, 0);
		}
	}
}

/* The agent thread goes on after request ri. */
static void
agent_next(int ri)
{
	struct areq *r = &reqs[ri];
	if (r->thread < 0)
		return;
	struct athread *t = &athreads[r->thread];
	t->waiting = 0;
	if (t->flusher)
		schedule(now_us + range(RR, 0, 2000), EV_RUNTIME, t->inv, RE_DONE);
	else
		schedule(now_us + r->think_ms * 1000, EV_AGENT, r->thread, 0);
}

static int
delivered(const struct areq *r)
{
	return r->nev > 0 && events[r->first_ev].delivered > 0;
}

static void
agent_answer(int ri, const struct hresp *h, const char *body)
{
	struct areq *r = &reqs[ri];
	r->status = h->status;
	live_remove(ri);
	trace("agent", "r%d answered %d%s%s", ri, h->status, h->body_len ? ": " : "",
	    h->body_len ? show(body, h->body_len, 80) : "");
	st.answers[h->status < 300 ? 0 : h->status == 408 ? 1 : h->status == 413 ?
	    2 : h->status == 503 ? 3 : h->status == 502 ? 4 : 5]++;
	int trouble = apm_trouble_recent();
	switch (r->kind) {
	case RQ_INTAKE:
	case RQ_FLUSH:
		if (h->status == 202) {
			if (r->oversize)
				fail("r%d: a body of %zu bytes over the limit (%zu) was "
				    "accepted", ri, r->body_len, plan.max_body);
			st.acked_events += (uint64_t)r->nev;
		} else if (h->status == 413 && r->oversize) {
		} else if (h->status == 503) {
		} else if (h->status == 408 && r->prompt && !trouble) {
			fail("r%d: a prompt intake request was refused with 408 while the "
			    "APM server had no trouble (the queue did not move)", ri);
		} else if (h->status != 408) {
			fail("r%d: a well-formed intake request answered %d", ri,
			    h->status);
		}
		if (h->status != 202 && delivered(r))
			fail("r%d was refused with %d but its events were delivered", ri,
			    h->status);
		break;
	case RQ_OTLP:
		if (h->status == 200) {
			if (r->oversize)
				fail("r%d: an OTLP export of %zu bytes over the limit (%zu) "
				    "was accepted", ri, r->body_len, plan.max_body);
			if (h->body_len != (r->otlp_json ? 2u : 0u) || (r->otlp_json &&
			    memcmp(body, "{}", 2) != 0))
				fail("r%d: OTLP export answered with the body \"%s\"", ri,
				    show(body, h->body_len, 60));
			st.acked_events++;
		} else if ((h->status == 413 && r->oversize) || h->status == 503) {
		} else if (h->status == 408 && r->prompt && !trouble) {
			fail("r%d: a prompt OTLP export was refused with 408 while the "
			    "APM server had no trouble (the queue did not move)", ri);
		} else if (h->status != 408) {
			fail("r%d: a well-formed OTLP export answered %d", ri, h->status);
		}
		if (h->status != 200 && delivered(r))
			fail("r%d was refused with %d but was delivered", ri, h->status);
		break;
	case RQ_OTLP_BAD: {
		static const int want[] = { 405, 404, 415, 400 };
		if (h->status != want[r->bad])
			fail("r%d: a bad OTLP request (%s) answered %d, not %d", ri,
			    r->bad == 0 ? "GET" : r->bad == 1 ? "unknown path" :
			    r->bad == 2 ? "text/plain" : "HTTP/2", h->status, want[r->bad]);
		break;
	}
	case RQ_REGISTER:
		if (h->status != 200)
			fail("r%d: a well-formed /register/transaction answered %d", ri,
			    h->status);
		break;
	case RQ_PROXY_GET:
	case RQ_PROXY_CONFIG:
		if (r->must_413 && h->status != 413)
			fail("r%d: a proxied request whose head and body (%zu bytes) do "
			    "not fit the buffer they are passed on from answered %d, not "
			    "413", ri, r->body_len, h->status);
		if (r->srv_seen && h->status == r->srv_status) {
			if (h->body_len != r->srv_len || hash64(body, h->body_len) !=
			    r->srv_hash)
				fail("r%d: the proxied answer's body differs from the "
				    "server's (%zu bytes, server sent %zu)", ri, h->body_len,
				    r->srv_len);
			if (h->gzip != r->srv_cenc)
				fail("r%d: the server's answer %s Content-Encoding: gzip, "
				    "the proxied one %s", ri, r->srv_cenc ? "had" : "had no",
				    h->gzip ? "has it" : "not");
		} else if (h->status == 502 || (r->oversize && (h->status == 413 ||
		    h->status == 431))) {
		} else {
			fail("r%d: proxied call answered %d, the APM server %s %d", ri,
			    h->status, r->srv_seen ? "answered" : "never answered; status",
			    r->srv_status);
		}
		break;
	default:
		break;
	}
	agent_next(ri);
}

static int
old_tricklers_open(void)
{
	int n = 0;
	for (int i = 0; i < nlive; i++) {
		struct areq *t = &reqs[live[i]];
		if (t->kind == RQ_TRICKLE && !streams[t->sid].ext_closed &&
		    awake() - t->t_start > plan.recv_ms * 1000 + 1000000)
			n++;
	}
	return n;
}

/* The connection of request ri ended without an answer. */
static void
agent_closed(int ri, int how)
{
	struct areq *r = &reqs[ri];
	struct stream *s = &streams[r->sid];
	r->closed = 1;
	live_remove(ri);
	st.answers[6]++;
	trace("agent", "r%d: connection %s by the extension without an answer", ri,
	    how == 2 ? "reset" : "closed");
	if (r->prompt && r->kind != RQ_TRICKLE && s->ext_closed_at >= r->t_start) {
		int n = old_tricklers_open();
		if (n)
			fail("r%d: a prompt agent was refused while %d bodies that "
			    "trickle slower than %d bytes per receiver timeout have "
			    "held their slots for over %lld ms", ri, n, BODY_MIN_BYTES,
			    (long long)plan.recv_ms);
	}
	agent_next(ri);
}

static void
agent_on_data(int sid)
{
	struct aconn *a = &aconns[streams[sid].aid];
	if (a->noread_until > now_us && !a->dead)
		return; /* not reading: EV_ARESUME */
	int end = actor_take(sid, &a->rx);
	if (a->dead) {
		sb_clear(&a->rx);
		return;
	}
	while (sb_n(&a->rx)) {
		struct hresp h;
		size_t used;
		const char *why = "";
		int r = http_response(sb_data(&a->rx), sb_n(&a->rx), &h, &used, &why);
		if (r < 0)
			fail("%s: bad answer from the extension (%s): %s",
			    streams[sid].what, why, show(sb_data(&a->rx), sb_n(&a->rx), 200));
		if (r == 0)
			break;
		if (h.status >= 100 && h.status < 200) {
			sb_consume(&a->rx, used);
			continue;
		}
		if (a->req < 0)
			fail("%s: an answer (%d) without a request: %s", streams[sid].what,
			    h.status, show(sb_data(&a->rx), sb_n(&a->rx), 100));
		int ri = a->req;
		a->req = -1;
		agent_answer(ri, &h, sb_data(&a->rx) + h.body_off);
		sb_consume(&a->rx, used);
		if (h.close) {
			a->dead = 1;
			actor_close(sid);
			return;
		}
	}
	if (end) {
		a->dead = 1;
		if (a->req >= 0) {
			int ri = a->req;
			a->req = -1;
			agent_closed(ri, end);
		}
		actor_close(sid);
	}
}

static void
trickle_start(int inv)
{
	int ci = agent_connect(pct(RR, 20), 1, 0);
	if (ci < 0)
		return;
	int ri = req_new(RQ_TRICKLE, inv, -1);
	struct areq *r = &reqs[ri];
	struct aconn *a = &aconns[ci];
	r->prompt = 0;
	r->conn = ci;
	r->sid = a->sid;
	a->req = ri;
	struct xbuf w = { 0 };
	if (plan.inv[inv].tricklers_intake) {
		sb_adds(&r->trickle, AGENT_META);
		r->first_ev = nevents;
		r->nev = 1;
		gen_event(&r->trickle, event_new(ri), 2000);
		sb_addf(&w, "POST /intake/v2/events HTTP/1.1\r\nHost: localhost\r\n"
		    "Content-Type: application/x-ndjson\r\nContent-Length: %zu\r\n\r\n",
		    sb_n(&r->trickle));
	} else {
		sb_adds(&r->trickle, "{\"service\":{\"name\":\"slow\"},\"pad\":\"");
		while (sb_n(&r->trickle) < 900)
			sb_add(&r->trickle, "y", 1);
		sb_adds(&r->trickle, "\"}");
		sb_addf(&w, "POST /config/v1/agents HTTP/1.1\r\nHost: localhost\r\n"
		    "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n",
		    sb_n(&r->trickle));
	}
	r->body_len = sb_n(&r->trickle);
	r->body_hash = hash64(sb_data(&r->trickle), sb_n(&r->trickle));
	struct stream *s = &streams[a->sid];
	r->end_off = s->in.wrote + sb_n(&s->outbox) + sb_n(&w) + sb_n(&r->trickle);
	actor_send(a->sid, w.p, sb_n(&w));
	sb_free(&w);
	r->t_last_write = awake();
	live_add(ri);
	schedule(now_us + range(RR, 300000, 700000), EV_TRICKLE, ri, 0);
}

/* More agent connections than the extension has slots, each with a proxied
 * call: those past MAX_AGENT_CONNS find every slot under way and are closed
 * unanswered (the others are answered as any proxied call). */
static void
burst_start(int inv)
{
	int n = MAX_AGENT_CONNS + (int)range(RR, 2, 8);
	trace("runtime", "a burst of %d agent connections with proxied calls", n);
	for (int k = 0; k < n; k++) {
		int ci = agent_connect(0, 0, 0);
		if (ci < 0)
			return;
		int ri = req_new(RQ_PROXY_GET, inv, -1);
		struct areq *r = &reqs[ri];
		struct aconn *a = &aconns[ci];
		struct rspec sp = { .kind = RQ_PROXY_GET };
		struct xbuf w = { 0 };
		size_t cut;
		build_request(ri, &sp, &w, &cut);
		struct stream *s = &streams[a->sid];
		r->conn = ci;
		r->sid = a->sid;
		r->end_off = s->in.wrote + sb_n(&s->outbox) + cut;
		a->req = ri;
		actor_send(a->sid, w.p, cut);
		sb_free(&w);
		live_add(ri);
	}
	check_live();
}

static void
trickle_step(int ri)
{
	struct areq *r = &reqs[ri];
	struct aconn *a = &aconns[r->conn];
	if (a->dead || !r->live || !sb_n(&r->trickle))
		return;
	actor_send(a->sid, sb_data(&r->trickle), 1);
	sb_consume(&r->trickle, 1);
	r->t_last_write = awake();
	if (sb_n(&r->trickle))
		schedule(now_us + range(RR, 300000, 700000), EV_TRICKLE, ri, 0);
}

static void
agent_reset_req(int ri)
{
	struct areq *r = &reqs[ri];
	struct aconn *a = &aconns[r->conn];
	if (a->dead || a->req != ri)
		return;
	trace("agent", "r%d c%d: the agent resets its connection mid-request", ri,
	    r->conn);
	r->agent_gone = 1;
	live_remove(ri);
	a->req = -1;
	a->dead = 1;
	actor_reset(a->sid);
	agent_next(ri);
}

static void
athread_step(int th)
{
	struct athread *t = &athreads[th];
	struct invrun *ir = &invr[t->inv];
	if (ir->runtime_done || t->done || t->waiting)
		return;
	const struct tplan *tp = &plan.inv[t->inv].th[t->tidx];
	if (t->flusher) {
		struct rspec sp = { .kind = RQ_FLUSH, .chunked = pct(RR, 40),
			.nevents = (int)range(RR, 0, 2), .line_max = 200,
			.expect100 = pct(RR, 10), .agent_auth = pct(RR, 30) };
		t->done = 1;
		agent_send(th, &sp);
		return;
	}
	if (t->step >= tp->nsteps) {
		t->done = 1;
		if (--ir->threads_left == 0 && plan.inv[t->inv].outcome != OUT_CRASH) {
			const struct inv_plan *ip = &plan.inv[t->inv];
			if (ip->flush)
				schedule(MAX(now_us, ir->t_invoke + ip->flush_at_ms * 1000),
				    EV_RUNTIME, t->inv, RE_FLUSH);
			else
				schedule(now_us + range(RR, 0, 2000), EV_RUNTIME, t->inv,
				    RE_DONE);
		}
		return;
	}
	const struct rspec *sp = &tp->steps[t->step++];
	if (sp->kind == RQ_SLEEP) {
		schedule(now_us + sp->think_ms * 1000, EV_AGENT, th, 0);
		return;
	}
	agent_send(th, sp);
}

static void
runtime_log(int i)
{
	if (nlogs == logcap) {
		logcap = logcap ? logcap * 2 : 64;
		logs = realloc(logs, (size_t)logcap * sizeof *logs);
		if (!logs)
			abort();
	}
	int id = nlogs++;
	const char *h = hostile_logs[below(RR, sizeof hostile_logs /
	    sizeof *hostile_logs)];
	struct xbuf text = { 0 }, rec = { 0 };
	sb_addf(&text, "<<L%d>> %s", id, h);
	char t[40];
	iso_time(now_us, t, sizeof t);
	sb_addf(&rec, "{\"time\":\"%s\",\"type\":\"function\",\"record\":", t);
	size_t start = sb_n(&rec);
	if (pct(RR, 70)) {
		sb_add(&rec, "\"", 1);
		json_esc(&rec, sb_data(&text), sb_n(&text));
		sb_add(&rec, "\"", 1);
		size_t n = sb_n(&text); /* the extension trims trailing newlines */
		while (n && (sb_data(&text)[n - 1] == '\n' || sb_data(&text)[n - 1] == '\r'))
			n--;
		logs[id].expect = strndup(sb_data(&text), n);
	} else {
		sb_addf(&rec, "{\"timestamp\":\"%s\",\"level\":\"INFO\",\"requestId\":"
		    "\"%s\",\"message\":\"", t, plan.inv[i].rid);
		json_esc(&rec, sb_data(&text), sb_n(&text));
		sb_adds(&rec, "\"}");
		logs[id].expect = strndup(sb_data(&rec) + start, sb_n(&rec) - start);
	}
	logs[id].inv = i;
	sb_add(&rec, "}", 1);
	trace("runtime", "log line L%d: %s", id, show(sb_data(&text), sb_n(&text),
	    100));
	telp_emit(sb_data(&rec), sb_n(&rec));
	sb_free(&text);
	sb_free(&rec);
}

static void
runtime_start(int i)
{
	struct invrun *ir = &invr[i];
	const struct inv_plan *ip = &plan.inv[i];
	char t[40], rec[400];
	iso_time(now_us, t, sizeof t);
	int n = snprintf(rec, sizeof rec, "{\"time\":\"%s\",\"type\":"
	    "\"platform.start\",\"record\":{\"requestId\":\"%s\",\"version\":"
	    "\"$LATEST\"}}", t, ip->rid);
	telp_emit(rec, (size_t)n);
	if (pct(RR, 10)) {
		n = snprintf(rec, sizeof rec, "{\"time\":\"%s\",\"type\":"
		    "\"platform.extension\",\"record\":{\"name\":\"apm-lambda-extension\","
		    "\"state\":\"Ready\",\"events\":[\"INVOKE\",\"SHUTDOWN\"]}}", t);
		telp_emit(rec, (size_t)n);
	}
	if (plan.tel_odd && pct(RR, 25))
		telp_emit_oversize();
	else if (plan.tel_odd && pct(RR, 25))
		telp_emit_drop();
	trace("runtime", "invocation %d starts: %d thread(s), %d trickler(s)", i,
	    ip->nthreads, ip->ntricklers);
	for (int k = 0; k < ip->nlogs; k++)
		schedule(now_us + range(RR, 0, MIN(ip->timeout_ms, 3000)) * 1000,
		    EV_RUNTIME, i, RE_LOG);
	ir->threads_left = ip->nthreads;
	for (int k = 0; k < ip->nthreads; k++) {
		athreads[nathreads] = (struct athread){ .inv = i, .tidx = k };
		schedule(now_us + range(RR, 0, 2000), EV_AGENT, nathreads++, 0);
	}
	for (int k = 0; k < ip->ntricklers; k++)
		trickle_start(i);
	if (i == plan.burst_inv)
		burst_start(i);
	if (i == plan.sigterm_inv)
		schedule(now_us + range(RR, 0, ip->timeout_ms) * 1000, EV_LAMBDA,
		    LE_SIGTERM, 0);
	if (ip->outcome == OUT_CRASH)
		schedule(now_us + ip->crash_ms * 1000, EV_RUNTIME, i, RE_CRASH);
	else if (ip->nthreads == 0)
		schedule(now_us, EV_RUNTIME, i, ip->flush ? RE_FLUSH : RE_DONE);
}

/* The function is done (returned, crashed or timed out). */
static void
runtime_finish(int i, const char *status)
{
	struct invrun *ir = &invr[i];
	if (ir->runtime_done)
		return;
	ir->runtime_done = 1;
	snprintf(ir->status, sizeof ir->status, "%s", status);
	int ok = strcmp(status, "success") == 0;
	trace("runtime", "invocation %d: function done, status %s", i,
	    show(status, strlen(status), 40));
	struct xbuf rec = { 0 };
	char t[40];
	iso_time(now_us, t, sizeof t);
	sb_addf(&rec, "{\"time\":\"%s\",\"type\":\"platform.runtimeDone\","
	    "\"record\":{\"requestId\":\"%s\",\"status\":\"", t, plan.inv[i].rid);
	json_esc(&rec, status, strlen(status));
	sb_addf(&rec, "\",\"metrics\":{\"durationMs\":%lld.5,\"producedBytes\":0}}}",
	    (long long)((now_us - ir->t_invoke) / 1000));
	telp_emit(sb_data(&rec), sb_n(&rec));
	sb_free(&rec);
	/* Slow bodies end with the function; a crash or a timeout restarts the
	 * runtime, whose connections go with it. */
	for (int k = 0; k < naconns; k++) {
		struct aconn *a = &aconns[k];
		if (a->dead || (!a->trickler && ok))
			continue;
		if (a->req >= 0) {
			reqs[a->req].agent_gone = 1;
			live_remove(a->req);
			a->req = -1;
		}
		a->dead = 1;
		actor_reset(a->sid);
	}
	if (!ok)
		for (int k = 0; k < MAX_THREADS; k++)
			thread_conn[k] = thread_otlp[k] = -1;
	if (ir->next_seen)
		lam_complete(i);
}

static void
runtime_event(int i, int what)
{
	struct invrun *ir = &invr[i];
	if (ir->runtime_done)
		return;
	switch (what) {
	case RE_START:
		runtime_start(i);
		break;
	case RE_LOG:
		runtime_log(i);
		break;
	case RE_CRASH:
		runtime_finish(i, plan.inv[i].status);
		break;
	case RE_FLUSH:
		athreads[nathreads] = (struct athread){ .inv = i, .flusher = 1 };
		athread_step(nathreads++);
		break;
	case RE_DONE:
		runtime_finish(i, "success");
		break;
	}
}

/* -- apm: the APM server -- */

enum apm_fault { FA_OK, FA_SLOW, FA_503, FA_429, FA_400, FA_STALL_ANSWER,
	FA_STALL_READ, FA_RESET_MID, FA_CLOSE, FA_500, FA_BAD_STATUS, FA_BAD_BODY };
static const char *const fault_names[] = { "answer", "slow answer", "503", "429",
	"400", "stall (no answer)", "stall (stops reading)", "reset mid-answer",
	"close without answer", "500", "bad status line", "malformed body" };
/* How an answer is framed (plan.apm_odd_pct): plainly, after an interim
 * 1xx answer, chunked, or ended by the close of the connection. */
enum { AO_PLAIN, AO_INTERIM, AO_CHUNKED, AO_EOF };
enum { AE_ANSWER, AE_IDLE };

struct apmconn {
	int sid, busy, stalled, dead, idle_gen, fault, commit, proxy_req, status,
	    otlp, odd, cenc;
	int rej;                /* index in rejected of its 400, not yet sent */
	struct xbuf rx, ans, body, plain; /* plain: the answer's body */
};
static struct rejected {       /* bodies answered 400 */
	uint64_t hash;
	int sid;                /* the answer went on this stream; -1: not yet */
} rejected[4096];
static int nrejected;
static struct {
	struct apmconn *c;
	int nc;
	int64_t trouble_at;     /* awake time of the last fault; 0 none */
	int64_t slow_until;     /* a slow answer excuses a 408 until then */
} apm;

/* slots_full_at: awake time every payload slot was last taken */

/*
 * Whether a 408 to a prompt agent is excused: the server failed in the last
 * minute (backoff), answered slowly, or every payload slot of the queue
 * (ELASTIC_APM_LAMBDA_AGENT_DATA_BUFFER_SIZE) was taken within a receiver
 * timeout - the documented bound of back-pressure.
 */
static int
apm_trouble_recent(void)
{
	return (apm.trouble_at && awake() - apm.trouble_at < TROUBLE_EXCUSE_US) ||
	    awake() < apm.slow_until || (slots_full_at && awake() - slots_full_at <=
	    plan.recv_ms * 1000 + SLACK_US);
}

static void
apm_lost_request(void)
{
	apm.trouble_at = awake();
}

static int
apm_connect_fault(void)
{
	if (plan.server_mode == SRV_HEALTHY || !pct(RR, plan.connect_fault_pct))
		return 0;
	apm.trouble_at = awake();
	st.faults++;
	return pct(RR, 67) ? (pct(RR, 30) ? 3 : 1) : 2;
}

static void
apm_connected(int sid)
{
	if (apm.nc == MAX_STREAMS)
		fail("simulator: too many APM connections");
	int ci = apm.nc++;
	struct apmconn *c = &apm.c[ci];
	memset(c, 0, sizeof *c);
	c->sid = sid;
	c->proxy_req = -1;
	c->rej = -1;
	streams[sid].aid = ci;
	trace("apm", "a%d: connection from the extension", ci);
}

static int
apm_fault(void)
{
	if (lam.last >= 0 && !lam.shutdown_sent && plan.inv[lam.last].stall)
		return pct(RR, 50) ? FA_STALL_ANSWER : FA_STALL_READ;
	if (plan.server_mode == SRV_FLAKY && pct(RR, plan.fail_pct)) {
		static const int kinds[] = { FA_503, FA_503, FA_429, FA_400,
			FA_STALL_ANSWER, FA_STALL_READ, FA_RESET_MID, FA_CLOSE, FA_500,
			FA_BAD_STATUS, FA_BAD_BODY };
		return kinds[below(RR, plan.apm_odd_pct ? 11 : 9)];
	}
	return pct(RR, 10) ? FA_SLOW : FA_OK;
}

static int inv_of_rid(const char *rid);

/* One line of an event the extension made itself. */
static void
own_line_check(const char *line, size_t n, int ln)
{
	static char buf[70000], buf2[300];
	enum apm_err err;
	int k = apm_json_parse(line, n, jtok, sizeof jtok / sizeof *jtok, NULL,
	    &err);
	if (k < 0)
		return; /* reported as invalid JSON by the caller */
	int d = json_dup_key(line, jtok, k);
	if (d >= 0)
		fail("delivered line %d has the key \"%.*s\" twice: %s", ln,
		    (int)(jtok[d].end - jtok[d].start), line + jtok[d].start,
		    show(line, n, 300));
	if (k < 2 || jtok[0].type != APM_JSON_OBJECT)
		fail("delivered line %d is not an object: %s", ln, show(line, n, 200));
	st.own_lines++;
	int lg = apm_json_get(line, jtok, k, 0, "log");
	int tx = apm_json_get(line, jtok, k, 0, "transaction");
	if (lg >= 0) {
		if (json_path_str(line, k, lg, "message", NULL, buf, sizeof buf) < 0)
			fail("log event without a message: %s", show(line, n, 300));
		const char *m = strstr(buf, "<<L");
		int id = m ? atoi(m + 3) : -1;
		if (id < 0 || id >= nlogs)
			fail("log event with a message we never logged: %s",
			    show(buf, strlen(buf), 200));
		if (strcmp(buf, logs[id].expect) != 0)
			fail("log line L%d arrived as \"%s\"; it was logged as \"%s\"", id,
			    show(buf, strlen(buf), 150), show(logs[id].expect,
			    strlen(logs[id].expect), 150));
		if (json_path_str(line, k, lg, "faas", "execution", buf2,
		    sizeof buf2) < 0 || strcmp(buf2, plan.inv[logs[id].inv].rid) != 0)
			fail("log line L%d attributed to \"%s\"; it was logged during %s",
			    id, buf2, plan.inv[logs[id].inv].rid);
		st.log_lines_checked++;
	} else if (tx >= 0) {
		char id[40] = "", result[64] = "", outcome[32] = "";
		json_path_str(line, k, tx, "id", NULL, id, sizeof id);
		json_path_str(line, k, tx, "result", NULL, result, sizeof result);
		json_path_str(line, k, tx, "outcome", NULL, outcome, sizeof outcome);
		int i = -1;
		for (int j = 0; j < plan.ninv && i < 0; j++)
			for (int x = 0; x < invr[j].ntx; x++)
				if (strcmp(invr[j].tx_ids[x], id) == 0)
					i = j;
		if (i < 0)
			fail("a transaction we never registered: %s", show(line, n, 200));
		if (strcmp(outcome, "failure") != 0 ||
		    (strcmp(result, invr[i].status) != 0 &&
		    strcmp(result, plan.shutdown_reason) != 0))
			fail("transaction of invocation %d sent with result \"%s\", "
			    "outcome \"%s\"; its status was \"%s\"", i,
			    show(result, strlen(result), 60), outcome,
			    show(invr[i].status, strlen(invr[i].status), 60));
	} else if (apm_json_get(line, jtok, k, 0, "metricset") >= 0) {
		int ms = apm_json_get(line, jtok, k, 0, "metricset");
		if (json_path_str(line, k, ms, "faas", "execution", buf2,
		    sizeof buf2) < 0 || inv_of_rid(buf2) < 0)
			fail("metricset for an unknown invocation: %s", show(line, n, 300));
	} else {
		fail("delivered line %d of an unknown kind: %s", ln, show(line, n, 200));
	}
}

static int
inv_of_rid(const char *rid)
{
	for (int i = 0; i < plan.ninv; i++)
		if (strcmp(plan.inv[i].rid, rid) == 0)
			return i;
	return -1;
}

/* The server keeps an intake body (its answer is 202). */
static void
apm_commit(int ci, const char *b, size_t n)
{
	st.commits++;
	const char *id = memmem(b, n, "\"sim_id\":", 9);
	int agent = id != NULL;
	if (agent) {
		int ev = atoi(id + 9);
		if (ev < 0 || ev >= nevents)
			fail("a delivered event with an unknown sim_id %d", ev);
		int ri = events[ev].req;
		struct areq *r = &reqs[ri];
		if (r->body_len != n || r->body_hash != hash64(b, n)) {
			size_t k = 0;
			while (r->body && k < n && k < r->body_len && b[k] == r->body[k])
				k++;
			fail("a%d: the delivered body (%zu bytes) is not the body of agent "
			    "request r%d (%zu bytes): from offset %zu it reads \"%s\" "
			    "instead of \"%s\"", ci, n, ri, r->body_len, k,
			    show(b + k, n - k, 40), r->body ? show(r->body + k,
			    r->body_len - k, 40) : "?");
		}
		if (r->status && r->status != 202)
			fail("r%d was refused with %d but was delivered", ri, r->status);
		for (int e = r->first_ev; e < r->first_ev + r->nev; e++)
			if (++events[e].delivered > 1)
				fail("event %d of r%d delivered twice", e, ri);
		st.delivered_events += (uint64_t)r->nev;
		trace("apm", "a%d: committed r%d (%d events, %zu bytes)", ci, ri, r->nev,
		    n);
	} else {
		trace("apm", "a%d: committed %zu bytes of the extension's own events",
		    ci, n);
	}
	int ln = 0;
	for (size_t off = 0; off < n; ln++) {
		size_t len = 0; /* (a plain loop: ASan checks memchr's whole range) */
		while (off + len < n && b[off + len] != '\n')
			len++;
		const char *line = b + off;
		enum apm_err err;
		if (apm_json_parse(line, len, NULL, 0, NULL, &err) < 0)
			fail("a%d: delivered line %d is not valid JSON (%s): %s", ci, ln,
			    apm_err_str(err), show(line, len, 300));
		if (ln == 0 && (len < 12 || memcmp(line, "{\"metadata\"", 11) != 0))
			fail("a%d: a payload that does not start with metadata: %s", ci,
			    show(line, len, 100));
		if (ln > 0 && !agent)
			own_line_check(line, len, ln);
		off += len + 1;
	}
}

/* The server keeps an OTLP export: byte for byte what the exporter sent. */
static void
apm_commit_otlp(int ci, const char *b, size_t n)
{
	st.commits++;
	const char *id = memmem(b, n, "\"sim_id\":", 9);
	int ev = atoi(id + 9), ri = events[ev].req;
	struct areq *r = &reqs[ri];
	if (r->body_len != n || r->body_hash != hash64(b, n))
		fail("a%d: the delivered OTLP export (%zu bytes) is not r%d's (%zu "
		    "bytes)", ci, n, ri, r->body_len);
	if (r->status && r->status != 200)
		fail("r%d was refused with %d but was delivered", ri, r->status);
	if (++events[ev].delivered > 1)
		fail("OTLP export r%d delivered twice", ri);
	if (r->otlp_json) {
		enum apm_err err;
		if (apm_json_parse(b, n, NULL, 0, NULL, &err) < 0)
			fail("a%d: delivered OTLP JSON is not valid JSON", ci);
	}
	st.delivered_events++;
	trace("apm", "a%d: committed OTLP export r%d (%zu bytes)", ci, ri, n);
}

static void
apm_answer_build(struct apmconn *c, int status, const char *body, int close)
{
	static const char *const reasons[] = { [200] = "OK", [202] = "Accepted",
		[304] = "Not Modified", [400] = "Bad Request", [429] = "Too Many "
		"Requests", [500] = "Internal Server Error",
		[503] = "Service Unavailable" };
	int nobody = status == 304 || status == 204;
	size_t blen = strlen(body);
	c->odd = plan.apm_odd_pct && pct(RR, plan.apm_odd_pct) ?
	    (int)range(RR, AO_INTERIM, AO_EOF) : AO_PLAIN;
	if (nobody && c->odd != AO_INTERIM)
		c->odd = AO_PLAIN;
	sb_clear(&c->ans);
	sb_clear(&c->plain);
	if (!nobody)
		sb_add(&c->plain, body, blen);
	if (c->odd == AO_INTERIM)
		sb_adds(&c->ans, pct(RR, 50) ? "HTTP/1.1 100 Continue\r\n\r\n" :
		    "HTTP/1.1 103 Early Hints\r\nLink: </sim.css>; rel=preload\r\n"
		    "\r\n");
	sb_addf(&c->ans, "HTTP/1.1 %d %s\r\n", status, reasons[status] ?
	    reasons[status] : "Status");
	if (!nobody) {
		sb_adds(&c->ans, "Content-Type: application/json\r\n");
		if (c->odd == AO_CHUNKED)
			sb_adds(&c->ans, "Transfer-Encoding: chunked\r\n");
		else if (c->odd != AO_EOF)
			sb_addf(&c->ans, "Content-Length: %zu\r\n", blen);
	} else {
		sb_adds(&c->ans, "Etag: \"sim\"\r\n");
	}
	if (c->cenc)
		sb_adds(&c->ans, "Content-Encoding: gzip\r\n");
	if (close || (c->odd == AO_EOF && pct(RR, 50)))
		sb_adds(&c->ans, "Connection: close\r\n");
	if ((status == 429 || status == 503) && pct(RR, 30))
		sb_addf(&c->ans, "Retry-After: %d\r\n", (int)below(RR, 3));
	sb_adds(&c->ans, "\r\n");
	if (c->odd == AO_CHUNKED) {
		for (size_t off = 0; off < blen;) {
			size_t k = minz(blen - off, (size_t)range(RR, 1, 3000));
			sb_addf(&c->ans, "%zx\r\n", k);
			sb_add(&c->ans, body + off, k);
			sb_adds(&c->ans, "\r\n");
			off += k;
		}
		sb_adds(&c->ans, "0\r\n\r\n");
	} else if (!nobody) {
		sb_add(&c->ans, body, blen);
	}
	c->status = status;
}

/* An answer the extension cannot take: a bad status line (or 101, which is
 * no answer to a POST), or a chunked body with broken framing. */
static void
apm_answer_bad(struct apmconn *c, int f)
{
	static const char *const bad_status[] = {
		"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n"
		"Connection: Upgrade\r\n\r\n",
		"HTTP/1.1 2x2 Accepted\r\nContent-Length: 0\r\n\r\n",
		"HTTP/1.1 20 Accepted\r\nContent-Length: 0\r\n\r\n",
		"SIMP/1.0 202 Accepted\r\nContent-Length: 0\r\n\r\n",
	};
	sb_clear(&c->ans);
	sb_clear(&c->plain);
	c->odd = AO_PLAIN;
	c->status = 0;
	if (f == FA_BAD_STATUS)
		sb_adds(&c->ans, bad_status[below(RR, 4)]);
	else
		sb_adds(&c->ans, pct(RR, 50) ? "HTTP/1.1 202 Accepted\r\n"
		    "Transfer-Encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n0\r\n\r\n" :
		    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
		    "5\r\n{}{}{}{}\r\n0\r\n\r\n");
}

/* An error text, long at times (the extension keeps ERRTEXT_MAX bytes). */
static const char *
apm_error_text(const char *msg)
{
	static struct xbuf b;
	sb_clear(&b);
	sb_addf(&b, "{\"error\":\"%s\"", msg);
	if (plan.apm_odd_pct && pct(RR, 40)) {
		size_t n = pct(RR, 50) ? (size_t)range(RR, 520, 3000) :
		    (size_t)range(RR, 3000, 40000);
		sb_adds(&b, ",\"detail\":\"");
		for (size_t i = 0; i < n; i++)
			sb_add(&b, &"detail: error text "[i % 19], 1);
		sb_adds(&b, "\"");
	}
	sb_adds(&b, "}");
	return sb_data(&b);
}

static void
apm_request(int ci, struct hreq *h)
{
	struct apmconn *c = &apm.c[ci];
	char want[80];
	snprintf(want, sizeof want, "Bearer %s", plan.token);
	if (plan.with_token ? strcmp(h->auth, want) != 0 : h->auth[0] != 0)
		fail("a%d: %s %s came with Authorization \"%s\"", ci, h->method,
		    h->target, h->auth);
	size_t pl = strlen(plan.prefix);
	if (strncmp(h->target, plan.prefix, pl) != 0)
		fail("a%d: %s %s misses the server URL's path prefix", ci, h->method,
		    h->target);
	const char *path = h->target + pl;
	int intake = strcmp(h->method, "POST") == 0 &&
	    strcmp(path, "/intake/v2/events") == 0;
	int otlp = strcmp(h->method, "POST") == 0 && strncmp(path, "/v1/", 4) == 0;
	c->proxy_req = -1;
	c->otlp = otlp;
	if (otlp) {
		const char *id = memmem(sb_data(&h->body), sb_n(&h->body), "\"sim_id\":",
		    9);
		int ev = id ? atoi(id + 9) : -1;
		if (ev < 0 || ev >= nevents || reqs[events[ev].req].kind != RQ_OTLP)
			fail("a%d: OTLP export %s without a known sim_id", ci, path);
		const struct areq *r = &reqs[events[ev].req];
		static const char *const sig[] = { "/v1/traces", "/v1/metrics",
			"/v1/logs" };
		const char *want_ct = r->otlp_json ? "application/json" :
		    "application/x-protobuf";
		if (!h->chunked || strcmp(h->ctype, want_ct) != 0 ||
		    strncmp(h->ua, "apm-ext/", 8) != 0 || h->cenc[0] ||
		    strcmp(path, sig[r->otlp_signal]) != 0)
			fail("a%d: OTLP export of r%d went to %s with chunked %d, "
			    "Content-Type \"%s\", User-Agent \"%s\", Content-Encoding "
			    "\"%s\"", ci, events[ev].req, path, h->chunked, h->ctype,
			    h->ua, h->cenc);
	} else if (intake) {
		if (!h->chunked || strcmp(h->ctype, "application/x-ndjson") != 0 ||
		    strncmp(h->ua, "apm-ext/", 8) != 0 || h->cenc[0])
			fail("a%d: intake request with chunked %d, Content-Type \"%s\", "
			    "User-Agent \"%s\", Content-Encoding \"%s\"", ci, h->chunked,
			    h->ctype, h->ua, h->cenc);
	} else {
		int ri = h->simid[0] ? atoi(h->simid) : -1;
		if (ri < 0 || ri >= nreqs || (reqs[ri].kind != RQ_PROXY_GET &&
		    reqs[ri].kind != RQ_PROXY_CONFIG))
			fail("a%d: unexpected request %s %s", ci, h->method, h->target);
		const char *want_path = reqs[ri].kind == RQ_PROXY_GET ? "/" :
		    "/config/v1/agents";
		if (strcmp(path, want_path) != 0 || (reqs[ri].kind ==
		    RQ_PROXY_CONFIG && (sb_n(&h->body) != reqs[ri].body_len ||
		    hash64(sb_data(&h->body), sb_n(&h->body)) != reqs[ri].body_hash)))
			fail("a%d: proxied r%d arrived altered: %s %s, %zu body bytes", ci,
			    ri, h->method, h->target, sb_n(&h->body));
		c->proxy_req = ri;
	}
	if (intake || otlp) {
		uint64_t hb = hash64(sb_data(&h->body), sb_n(&h->body));
		for (int i = 0; i < nrejected; i++) {
			const struct rejected *x = &rejected[i];
			if (x->hash != hb || x->sid < 0) /* sid < 0: never answered */
				continue;
			fail("a%d: a payload the server rejected with 400 came again "
			    "(%zu bytes)", ci, sb_n(&h->body));
		}
	}
	int f = apm_fault();
	c->fault = f;
	c->busy = 1;
	c->cenc = 0;
	c->rej = -1;
	c->idle_gen++;
	if (f != FA_OK && f != FA_SLOW) {
		apm.trouble_at = awake();
		st.faults++;
	}
	trace("apm", "a%d: %s %s (%zu body bytes) -> %s", ci, h->method, h->target,
	    sb_n(&h->body), fault_names[f]);
	if (f == FA_STALL_ANSWER)
		return;
	if (f == FA_STALL_READ) {
		c->stalled = 1;
		return;
	}
	if (f == FA_CLOSE) {
		c->dead = 1;
		actor_close(c->sid);
		return;
	}
	int close = pct(RR, 3);
	c->commit = 0;
	if (f == FA_BAD_STATUS || f == FA_BAD_BODY) {
		apm_answer_bad(c, f);
	} else if (intake || otlp) {
		int okst = otlp ? 200 : 202;
		int status = f == FA_503 ? 503 : f == FA_429 ? 429 : f == FA_400 ? 400 :
		    f == FA_500 ? 500 : okst;
		c->commit = status == okst && (f == FA_OK || f == FA_SLOW);
		if (status == 400 && nrejected < 4096) {
			c->rej = nrejected;
			rejected[nrejected++] = (struct rejected){ hash64(sb_data(&h->body),
			    sb_n(&h->body)), -1 };
		}
		apm_answer_build(c, status, status == okst ? (otlp ? "{}" : "") :
		    status == 400 ?
		    apm_error_text("sim: decoding error: data validation failed") :
		    apm_error_text("sim: try again later"), close);
		sb_clear(&c->body);
		sb_add(&c->body, sb_data(&h->body), sb_n(&h->body));
	} else {
		int status = f == FA_503 ? 503 : f == FA_429 ? 429 : f == FA_400 ? 400 :
		    f == FA_500 ? 500 : 200;
		struct xbuf b = { 0 };
		if (status != 200) {
			sb_adds(&b, apm_error_text("sim"));
		} else if (reqs[c->proxy_req].kind == RQ_PROXY_GET) {
			sb_adds(&b, "{\"build_date\":\"2024-01-01T00:00:00Z\",\"build_sha\":"
			    "\"sim\",\"publish_ready\":true,\"version\":\"8.12.0\"");
			int pad = reqs[c->proxy_req].noread ? (int)range(RR, 8000, 15000) :
			    pct(RR, 10) ? 17000 : /* over the 16 KiB the proxy
			                             passes on */
			    pct(RR, 15) ? (int)range(RR, 2000, 15000) : 0;
			if (pad) {
				sb_adds(&b, ",\"pad\":\"");
				for (int i = 0; i < pad; i++)
					sb_add(&b, "z", 1);
				sb_adds(&b, "\"");
			}
			sb_adds(&b, "}");
			c->cenc = pct(RR, 20); /* passed on as it is */
		} else if (pct(RR, 30)) {
			status = 304;
		} else {
			sb_adds(&b, "{\"transaction_sample_rate\":\"1.0\"}");
		}
		apm_answer_build(c, status, b.p ? sb_data(&b) : "", close);
		sb_free(&b);
	}
	int64_t delay = f == FA_SLOW ? range(RR, plan.fwd_ms * 250, plan.fwd_ms * 500) :
	    range(RR, 0, 20000);
	if (f == FA_SLOW) /* an agent held for queue room may wait as long */
		apm.slow_until = max64(apm.slow_until, awake() + delay +
		    plan.recv_ms * 1000);
	schedule(now_us + delay, EV_APM, ci, AE_ANSWER);
}

static void apm_on_data(int sid);

static void
apm_event(int ci, int what)
{
	struct apmconn *c = &apm.c[ci];
	if (c->dead)
		return;
	if ((what & 1) == AE_IDLE) {
		if (c->busy || sb_n(&c->rx) || c->idle_gen != what >> 1)
			return;
		trace("apm", "a%d: closes the idle connection", ci);
		c->dead = 1;
		actor_close(c->sid);
		return;
	}
	if (c->commit && c->otlp)
		apm_commit_otlp(ci, sb_data(&c->body), sb_n(&c->body));
	else if (c->commit)
		apm_commit(ci, sb_data(&c->body), sb_n(&c->body));
	if (c->fault == FA_RESET_MID) {
		actor_send(c->sid, sb_data(&c->ans), MIN(sb_n(&c->ans), 12));
		actor_reset(c->sid);
		c->dead = 1;
		return;
	}
	if (c->proxy_req >= 0 && c->status) {
		struct areq *r = &reqs[c->proxy_req];
		r->srv_seen = 1;
		r->srv_status = c->status;
		r->srv_len = sb_n(&c->plain);
		r->srv_hash = hash64(c->plain.p ? sb_data(&c->plain) : "", r->srv_len);
		r->srv_cenc = c->cenc;
	}
	actor_send(c->sid, sb_data(&c->ans), sb_n(&c->ans));
	if (c->rej >= 0) { /* the 400 is on its way */
		rejected[c->rej].sid = c->sid;
		c->rej = -1;
	}
	c->busy = 0;
	if (c->odd == AO_EOF || !c->status ||
	    memmem(sb_data(&c->ans), sb_n(&c->ans), "Connection: close", 17)) {
		c->dead = 1;
		actor_close(c->sid);
		return;
	}
	if (pct(RR, plan.idle_close_pct))
		schedule(now_us + range(RR, 200000, 30000000), EV_APM, ci,
		    AE_IDLE | c->idle_gen << 1);
	apm_on_data(c->sid);
}

static void
apm_on_data(int sid)
{
	static struct hreq h;
	struct apmconn *c = &apm.c[streams[sid].aid];
	if (c->dead)
		return;
	if (c->stalled) {
		if (actor_sees_end(sid)) {
			c->dead = 1;
			actor_close(sid);
		}
		return;
	}
	int end = actor_take(sid, &c->rx);
	while (!c->busy && !c->dead && sb_n(&c->rx)) {
		size_t used;
		const char *why = "";
		int r = http_request(sb_data(&c->rx), sb_n(&c->rx), &h, &used, &why);
		if (r < 0)
			fail("APM server: malformed request from the extension (%s): %s",
			    why, show(sb_data(&c->rx), sb_n(&c->rx), 200));
		if (r == 0)
			break;
		sb_consume(&c->rx, used);
		apm_request(streams[sid].aid, &h);
	}
	if (end && !c->dead) {
		if (c->busy || sb_n(&c->rx))
			trace("apm", "a%d: the extension closed the connection before "
			    "the answer", streams[sid].aid);
		c->dead = 1;
		actor_close(sid);
	}
}

/* -- dispatch -- */

static void
actor_connected(int sid)
{
	if (streams[sid].actor == ACT_LAMBDA)
		lam_connected(sid);
	else if (streams[sid].actor == ACT_APM)
		apm_connected(sid);
}

static void
actor_data(int sid)
{
	switch (streams[sid].actor) {
	case ACT_LAMBDA:
		lam_on_data(sid);
		break;
	case ACT_TEL:
		telp_on_data(sid);
		break;
	case ACT_AGENT:
		agent_on_data(sid);
		break;
	case ACT_APM:
		if (streams[sid].aid >= 0)
			apm_on_data(sid);
		break;
	}
}

static void
dispatch(const struct event *e)
{
	switch (e->kind) {
	case EV_WAKE:
		break;
	case EV_DATA:
		actor_data(e->a);
		break;
	case EV_ROOM:
		stream_pump(e->a);
		break;
	case EV_CONNECTED:
		stream_connected(e->a);
		break;
	case EV_AGENT:
		athread_step(e->a);
		break;
	case EV_TRICKLE:
		trickle_step(e->a);
		break;
	case EV_ARESET:
		agent_reset_req(e->a);
		break;
	case EV_CHECK:
		check_pending = 0;
		check_live();
		break;
	case EV_LAMBDA:
		lam_event(e->a, e->b);
		break;
	case EV_RUNTIME:
		runtime_event(e->a, e->b);
		break;
	case EV_TEL:
		telp_event(e->a);
		break;
	case EV_APM:
		apm_event(e->a, e->b);
		break;
	case EV_ARESUME:
		aconns[e->a].noread_until = 0;
		trace("agent", "c%d reads again", e->a);
		agent_on_data(aconns[e->a].sid);
		break;
	}
}

/* == 9. Invariants == */

/* The extension read bytes of stream sid: a request may now be all in. */
static void
note_ext_read(int sid)
{
	struct stream *s = &streams[sid];
	int ri = -1;
	if (s->actor == ACT_AGENT)
		ri = aconns[s->aid].req;
	else if (s->actor == ACT_TEL && telp.inflight && telp.sid == sid)
		ri = telp.req;
	if (ri >= 0 && !reqs[ri].t_read && s->in.read >= reqs[ri].end_off)
		reqs[ri].t_read = awake();
}

static int64_t
req_bound(const struct areq *r, int nproxy)
{
	const struct stream *s = &streams[r->sid];
	int64_t T = plan.recv_ms * 1000, F = plan.fwd_ms * 1000;
	if (!r->t_read) {
		int64_t p = MAX(r->t_start, r->t_last_write);
		p = MAX(p, s->last_ext_read);
		return p + T + SLACK_US;
	}
	if (r->kind == RQ_PROXY_GET || r->kind == RQ_PROXY_CONFIG)
		return r->t_read + T + (2 + MAX(nproxy, r->nproxy_max)) * F + SLACK_US;
	return r->t_read + T + SLACK_US;
}

/* Every request waiting for an answer is within its bound. */
static void
check_live(void)
{
	int nproxy = 0;
	for (int i = 0; i < nlive; i++) {
		const struct areq *r = &reqs[live[i]];
		nproxy += (r->kind == RQ_PROXY_GET || r->kind == RQ_PROXY_CONFIG) &&
		    r->t_read;
	}
	for (int i = 0; i < nlive; i++) {
		int ri = live[i];
		struct areq *r = &reqs[ri];
		const struct stream *s = &streams[r->sid];
		if (r->t_read && r->nproxy_max < nproxy) /* the calls ahead of it
		                                            may leave before it */
			r->nproxy_max = nproxy;
		if (s->ext_closed || chan_unread(&s->out) > 0)
			continue; /* its end or its answer is on the way */
		int64_t b = req_bound(r, nproxy);
		if (awake() > b)
			fail("r%d (%s on %s) has waited %lld ms for an answer; its last "
			    "progress was %lld ms ago, %s (receiver timeout %lld ms)", ri,
			    rq_names[r->kind], s->what,
			    (long long)((awake() - r->t_start) / 1000),
			    (long long)((awake() - (b - SLACK_US - plan.recv_ms * 1000)) /
			    1000), r->t_read ? "all of it read by the extension" :
			    "not all of it read by the extension",
			    (long long)plan.recv_ms);
	}
	if (nlive && !check_pending) {
		check_pending = 1;
		schedule(now_us + 100000, EV_CHECK, 0, 0);
	}
}

static unsigned char owned[MAX_SFD];

static void
own_fd(int fd, const char *what, int i)
{
	if (fd < 0)
		return;
	if (!sfd_get(fd))
		fail("%s %d holds fd %d, which is not open", what, i, fd);
	if (owned[fd - FD_BASE]++)
		fail("fd %d is held by two slots (%s %d and another)", fd, what, i);
}

/* Every open socket is held by exactly one slot of the extension. */
static void
check_fds(void)
{
	if (!g.q.mem)
		return;
	memset(owned, 0, sizeof owned);
	for (int i = 0; i < NUM_LISTENERS; i++)
		own_fd(g.listen_fd[i], "listener", i);
	own_fd(g.lam.c.fd, "Lambda connection", 0);
	for (int i = 0; i < MAX_AGENT_CONNS; i++)
		own_fd(g.agents[i].c.fd, "agent slot", i);
	for (int i = 0; i < NUM_UPSTREAM; i++)
		own_fd(g.up[i].c.fd, "upstream slot", i);
	for (int i = 0; i < MAX_TEL_CONNS; i++)
		own_fd(tel.conns[i].c.fd, "telemetry slot", i);
	for (int i = 0; i < MAX_SFD; i++)
		if (sfds[i].kind != SF_FREE && !owned[i])
			fail("fd %d (%s) is open but held by no slot: leaked", FD_BASE + i,
			    sfds[i].kind == SF_STREAM ? streams[sfds[i].sid].what :
			    sfds[i].kind == SF_LISTEN ? "listener" : "socket");
}

/* Blocks in chains + free blocks == all blocks; slots in use == used. */
static void
check_queue(void)
{
	struct queue *q = &g.q;
	static unsigned char *seen;
	static int nseen;
	if (!q->mem)
		return;
	if (nseen < q->nblocks) {
		seen = realloc(seen, (size_t)q->nblocks);
		nseen = q->nblocks;
	}
	memset(seen, 0, (size_t)q->nblocks);
	int inuse = 0;
	unsigned used = 0;
	for (unsigned i = 0; i < q->npayloads; i++) {
		struct payload *p = &q->p[i];
		if (!p->used)
			continue;
		used++;
		int n = 0;
		for (int b = p->first; b >= 0; b = q->next[b]) {
			if (b >= q->nblocks || seen[b])
				fail("queue: block %d of payload %u is out of range or in two "
				    "chains", b, i);
			seen[b] = 1;
			n++;
		}
		int want = (int)((p->len + BLOCK_SIZE - 1) / BLOCK_SIZE);
		if (n != want)
			fail("queue: payload %u holds %llu bytes in %d blocks (%d needed)", i,
			    (unsigned long long)p->len, n, want);
		inuse += n;
	}
	for (int k = 0; k < q->free_top; k++) {
		int b = q->free_stack[k];
		if (b < 0 || b >= q->fresh || seen[b])
			fail("queue: free block %d is in use or unallocated", b);
		seen[b] = 1;
	}
	if (inuse + q->free_top + (q->nblocks - q->fresh) != q->nblocks)
		fail("queue: %d blocks in chains + %d free + %d fresh != %d", inuse,
		    q->free_top, q->nblocks - q->fresh, q->nblocks);
	if (used != q->used)
		fail("queue: %u payload slots in use, g.q.used says %u", used, q->used);
}

/* The extension's queue and connections, for the trace of a failure. */
static void
dump_state(void)
{
	struct queue *q = &g.q;
	if (!q->mem)
		return;
	trace("state", "queue: %u of %u payload slots, %d of %d blocks fresh, %d "
	    "free; %llu delivered, %llu dropped, %llu rejected; failures %u, retry "
	    "in %lld ms", q->used, q->npayloads, q->fresh, q->nblocks, q->free_top,
	    (unsigned long long)q->delivered, (unsigned long long)q->dropped,
	    (unsigned long long)q->rejected, g.fwd.failures,
	    (long long)(g.fwd.retry_at - now_us / 1000));
	for (unsigned i = 0; i < q->npayloads; i++)
		if (q->p[i].used)
			trace("state", "payload %u: seq %llu, %llu bytes, %s%s%s%s", i,
			    (unsigned long long)q->p[i].seq,
			    (unsigned long long)q->p[i].len, q->p[i].open ? "open" :
			    "complete", q->p[i].inflight ? ", being sent" : "",
			    q->p[i].own ? ", own events" : "", q->p[i].kind ? ", OTLP" : "");
	for (int i = 0; i < NUM_UPSTREAM; i++)
		if (g.up[i].c.fd >= 0)
			trace("state", "upstream %d: fd %d, state %d, job %d, payload %d, "
			    "sent %llu%s", i, g.up[i].c.fd, g.up[i].state, g.up[i].job,
			    g.up[i].payload, (unsigned long long)g.up[i].sent,
			    g.up[i].sent_last ? " (all)" : "");
	for (int i = 0; i < MAX_AGENT_CONNS; i++)
		if (g.agents[i].c.fd >= 0 && g.agents[i].state != AG_HEAD)
			trace("state", "agent slot %d: fd %d, state %d, route %d, payload "
			    "%d, rx %zu, body %zu decoded, %llu in all", i,
			    g.agents[i].c.fd, g.agents[i].state, g.agents[i].route,
			    g.agents[i].payload, g.agents[i].c.rx_len,
			    g.agents[i].c.body.have,
			    (unsigned long long)g.agents[i].c.body.total);
}

/*
 * The extension took an INVOKE (g.inv changed): one Lambda delivered, and
 * only once - never a trap from a broken /next answer (lam_fault).
 */
static void
check_invocation(void)
{
	static char last_rid[sizeof g.inv.request_id];
	if (!g.inv.request_id[0] || (g.inv.t_invoke == lam.ext_inv_t &&
	    strcmp(last_rid, g.inv.request_id) == 0))
		return;
	lam.ext_inv_t = g.inv.t_invoke;
	snprintf(last_rid, sizeof last_rid, "%s", g.inv.request_id);
	int i = inv_of_rid(g.inv.request_id);
	if (i < 0 || !invr[i].delivered)
		fail("the extension took an INVOKE for \"%s\", which Lambda never "
		    "delivered (a broken /event/next answer read as an event?)",
		    show(g.inv.request_id, strlen(g.inv.request_id), 60));
	if (invr[i].ext_taken++)
		fail("the extension took the INVOKE of %s (invocation %d) twice",
		    plan.inv[i].rid, i);
	lam.ext_invokes++;
}

static void
sim_check_step(void)
{
	check_invocation();
	if (telp.drops_acked > tel.logs_dropped)
		fail("Lambda said %llu times that it dropped records, in POSTs "
		    "answered 200; the extension counts %llu",
		    (unsigned long long)telp.drops_acked,
		    (unsigned long long)tel.logs_dropped);
	if (g.q.p && g.q.used >= g.q.npayloads)
		slots_full_at = awake();
	check_fds();
	check_queue();
	check_live();
}

/* After exit: what was acknowledged was delivered, or is accounted for. */
static void
check_end(void)
{
	check_fds();
	check_queue();
	uint64_t lost = 0, held, bytes;
	int first_lost = -1;
	for (int i = 0; i < nreqs; i++) {
		const struct areq *r = &reqs[i];
		if ((((r->kind == RQ_INTAKE || r->kind == RQ_FLUSH) && r->status == 202) ||
		    (r->kind == RQ_OTLP && r->status == 200)) && r->nev > 0 &&
		    !delivered(r)) {
			lost++;
			if (first_lost < 0)
				first_lost = i;
		}
	}
	fwd_held(&held, &bytes);
	st.lost_payloads = lost;
	if (lost > g.q.dropped + g.q.rejected + held)
		fail("%llu payload(s) answered 202 never reached the APM server (first: "
		    "r%d) but the extension counts %llu dropped, %llu rejected, %llu "
		    "held at exit", (unsigned long long)lost, first_lost,
		    (unsigned long long)g.q.dropped, (unsigned long long)g.q.rejected,
		    (unsigned long long)held);
}

/* == 10. Runner ==
 * One forked child per seed: the extension's static state (g, tel, aws,
 * the arena) starts fresh, a crash (sanitizer, NEVER) is contained, and fd 2
 * (trace and the extension's log) goes to a temporary file the parent prints
 * for a replay.
 */

struct result {
	int done, failed;
	char msg[900];
	struct stats st;
};

static void
run_child(uint64_t seed, int out)
{
	streams = calloc(MAX_STREAMS, sizeof *streams);
	aconns = calloc(MAX_STREAMS, sizeof *aconns);
	apm.c = calloc(MAX_STREAMS, sizeof *apm.c);
	if (!streams || !aconns || !apm.c)
		abort();
	plan_make(seed);
	plan_env();
	io_install();
	lam.cur = lam.last = lam.next_sid = -1;
	telp.sid = -1;
	for (int k = 0; k < MAX_THREADS; k++)
		thread_conn[k] = thread_otlp[k] = -1;
	plan_trace();
	static char *argv[] = { "apm-lambda-extension", NULL };
	if (setjmp(run_jmp) == 0) {
		in_ext = 1;
		int rc = apm_ext_main(1, argv);
		in_ext = 0;
		fail("apm_ext_main returned %d without calling exit", rc);
	}
	in_ext = 0;
	if (!failed)
		check_end();
	st.vtime_ms = (uint64_t)((now_us - T0_US) / 1000);
	trace("sim", "%s: %llu loop passes, %llu.%03llu virtual s, %llu "
	    "invocations, %llu agent requests, %llu events acknowledged, %llu "
	    "delivered, %llu own lines checked, %llu log lines checked, %llu "
	    "faults injected, %llu freezes", failed ? "FAILED" : "passed",
	    (unsigned long long)st.polls, (unsigned long long)st.vtime_ms / 1000,
	    (unsigned long long)st.vtime_ms % 1000,
	    (unsigned long long)st.invocations, (unsigned long long)st.requests,
	    (unsigned long long)st.acked_events,
	    (unsigned long long)st.delivered_events,
	    (unsigned long long)st.own_lines,
	    (unsigned long long)st.log_lines_checked, (unsigned long long)st.faults,
	    (unsigned long long)st.freezes);
	struct result res = { .done = 1, .failed = failed, .st = st };
	snprintf(res.msg, sizeof res.msg, "%s", fail_msg);
	(void)!write(out, &res, sizeof res);
	_exit(0);
}

static int wall_limit = 300; /* --timeout S: a child still running is killed */

struct job {
	pid_t pid;
	uint64_t seed;
	int rfd, tfd;
	struct result res;
	size_t got;
	struct timespec start;
};

static double
elapsed(const struct timespec *a)
{
	struct timespec b;
	clock_gettime(CLOCK_MONOTONIC, &b);
	return (double)(b.tv_sec - a->tv_sec) + (double)(b.tv_nsec - a->tv_nsec) / 1e9;
}

static int
job_start(struct job *j, uint64_t seed)
{
	int p[2];
	char tmpl[] = "/tmp/apm-sim-XXXXXX";
	if (pipe(p) < 0)
		return -1;
	int tfd = mkstemp(tmpl);
	if (tfd < 0)
		return -1;
	unlink(tmpl);
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		return -1;
	if (pid == 0) {
		close(p[0]);
		dup2(tfd, 2);
		close(tfd);
		run_child(seed, p[1]);
	}
	close(p[1]);
	memset(j, 0, sizeof *j);
	j->pid = pid;
	j->seed = seed;
	j->rfd = p[0];
	j->tfd = tfd;
	clock_gettime(CLOCK_MONOTONIC, &j->start);
	return 0;
}

/* The first line of the trace that explains a crash. */
static void
crash_line(int tfd, char *out, size_t cap)
{
	static const char *const marks[] = { "ERROR: AddressSanitizer",
		"runtime error:", "NEVER failed", "FAIL " };
	char buf[65536];
	out[0] = 0;
	off_t size = lseek(tfd, 0, SEEK_END);
	off_t from = size > (off_t)sizeof buf - 1 ? size - (off_t)sizeof buf + 1 : 0;
	ssize_t n = pread(tfd, buf, sizeof buf - 1, from);
	if (n <= 0)
		return;
	buf[n] = 0;
	for (size_t m = 0; m < sizeof marks / sizeof *marks; m++) {
		char *p = strstr(buf, marks[m]);
		if (p) {
			char *e = strchr(p, '\n');
			snprintf(out, cap, "%.*s", (int)(e ? e - p : (long)strlen(p)), p);
			return;
		}
	}
}

static void
print_file(int fd)
{
	char buf[65536];
	ssize_t n;
	off_t off = 0;
	fflush(stdout);
	while ((n = pread(fd, buf, sizeof buf, off)) > 0) {
		(void)!write(1, buf, (size_t)n);
		off += n;
	}
}

/* Wait for the job, fill its result; kills it past the wall-clock limit. */
static void
job_finish(struct job *j, int status, int timed_out)
{
	if (j->got != sizeof j->res || !j->res.done) {
		char why[400];
		crash_line(j->tfd, why, sizeof why);
		j->res.failed = 1;
		if (timed_out)
			snprintf(j->res.msg, sizeof j->res.msg, "hung: no result after %d s "
			    "of wall clock", wall_limit);
		else if (WIFSIGNALED(status))
			snprintf(j->res.msg, sizeof j->res.msg, "crashed (signal %d)%s%s",
			    WTERMSIG(status), why[0] ? ": " : "", why);
		else
			snprintf(j->res.msg, sizeof j->res.msg, "crashed (exit status %d)%s%s",
			    WEXITSTATUS(status), why[0] ? ": " : "", why);
	}
}

static int
run_seeds(uint64_t start, uint64_t count, int jobs, int print_trace)
{
	struct job run[16];
	int nrun = 0;
	uint64_t next = start, end = start + count, passed = 0, nfailed = 0;
	struct stats sum = { 0 };
	char **fails = calloc(count ? count : 1, sizeof *fails);
	uint64_t *fail_seeds = calloc(count ? count : 1, sizeof *fail_seeds);
	uint64_t nf = 0;
	while (next < end || nrun > 0) {
		while (nrun < jobs && next < end) {
			if (job_start(&run[nrun], next) < 0) {
				perror("sim: fork");
				return 2;
			}
			nrun++;
			next++;
		}
		struct pollfd pf[16];
		for (int i = 0; i < nrun; i++)
			pf[i] = (struct pollfd){ run[i].rfd, POLLIN, 0 };
		poll(pf, (nfds_t)nrun, 200);
		for (int i = 0; i < nrun; i++) {
			struct job *j = &run[i];
			int timed_out = elapsed(&j->start) > wall_limit;
			if (!pf[i].revents && !timed_out)
				continue;
			if (!timed_out) {
				ssize_t n = read(j->rfd, (char *)&j->res + j->got,
				    sizeof j->res - j->got);
				if (n > 0) {
					j->got += (size_t)n;
					if (j->got < sizeof j->res)
						continue;
				}
			} else {
				kill(j->pid, SIGKILL);
			}
			int status = 0;
			waitpid(j->pid, &status, 0);
			job_finish(j, status, timed_out);
			if (print_trace)
				print_file(j->tfd);
			const struct stats *s = &j->res.st;
			sum.polls += s->polls;
			sum.vtime_ms += s->vtime_ms;
			sum.invocations += s->invocations;
			sum.requests += s->requests;
			sum.acked_events += s->acked_events;
			sum.delivered_events += s->delivered_events;
			sum.own_lines += s->own_lines;
			sum.log_lines_checked += s->log_lines_checked;
			sum.faults += s->faults;
			sum.freezes += s->freezes;
			sum.lost_payloads += s->lost_payloads;
			for (int k = 0; k < 7; k++)
				sum.answers[k] += s->answers[k];
			if (j->res.failed) {
				nfailed++;
				char line[1100];
				snprintf(line, sizeof line, "seed %llu: FAIL %s "
				    "(replay: build/sim --seed %llu)",
				    (unsigned long long)j->seed, j->res.msg,
				    (unsigned long long)j->seed);
				fail_seeds[nf] = j->seed;
				fails[nf++] = strdup(line);
				if (!print_trace) {
					printf("%s\n", line);
					fflush(stdout);
				}
			} else {
				passed++;
			}
			close(j->rfd);
			close(j->tfd);
			run[i] = run[--nrun];
			pf[i] = pf[nrun];
			i--;
		}
	}
	printf("seeds %llu..%llu: %llu loop passes, %llu virtual s, %llu "
	    "invocations, %llu agent requests, %llu events acknowledged, %llu "
	    "delivered, %llu payloads lost (accounted), %llu own lines and %llu "
	    "log lines checked, %llu faults injected, %llu freezes\n",
	    (unsigned long long)start, (unsigned long long)(end - 1),
	    (unsigned long long)sum.polls, (unsigned long long)sum.vtime_ms / 1000,
	    (unsigned long long)sum.invocations, (unsigned long long)sum.requests,
	    (unsigned long long)sum.acked_events,
	    (unsigned long long)sum.delivered_events,
	    (unsigned long long)sum.lost_payloads,
	    (unsigned long long)sum.own_lines,
	    (unsigned long long)sum.log_lines_checked,
	    (unsigned long long)sum.faults, (unsigned long long)sum.freezes);
	printf("agent answers: %llu 2xx, %llu 408, %llu 413, %llu 503, %llu 502, "
	    "%llu other errors, %llu closed without an answer\n",
	    (unsigned long long)sum.answers[0], (unsigned long long)sum.answers[1],
	    (unsigned long long)sum.answers[2], (unsigned long long)sum.answers[3],
	    (unsigned long long)sum.answers[4], (unsigned long long)sum.answers[5],
	    (unsigned long long)sum.answers[6]);
	if (nf && count > 1) {
		printf("failing seeds:");
		for (uint64_t i = 0; i < nf; i++)
			printf(" %llu", (unsigned long long)fail_seeds[i]);
		printf("\n");
	} else if (nf && print_trace) {
		printf("%s\n", fails[0]);
	}
	printf("%llu passed, %llu failed\n", (unsigned long long)passed,
	    (unsigned long long)nfailed);
	for (uint64_t i = 0; i < nf; i++)
		free(fails[i]);
	free(fails);
	free(fail_seeds);
	return nfailed ? 1 : 0;
}

#define QUICK_SEEDS 1000    /* ~40 s with -j 2 on 2 shared cores */

static void
usage(void)
{
	fprintf(stderr, "usage: sim --seed S [-v] [--state MS]   replay one seed, "
	    "print its trace\n"
	    "                                  (-v: every send and recv; --state: the "
	    "extension's queue\n"
	    "                                  and connections every MS virtual ms)\n"
	    "       sim --seeds N [--start S] [-j J]   run N seeds from S (default 1)\n"
	    "       sim --quick [-j J]                 the fixed set for make test "
	    "(seeds 1..%d)\n", QUICK_SEEDS);
	exit(2);
}

int
main(int argc, char **argv)
{
	uint64_t seed = 0, count = 0, start = 1;
	int one = 0, jobs = 2;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (strcmp(a, "--seed") == 0 && v) {
			seed = strtoull(v, NULL, 0);
			one = 1;
			i++;
		} else if (strcmp(a, "--seeds") == 0 && v) {
			count = strtoull(v, NULL, 0);
			i++;
		} else if (strcmp(a, "--start") == 0 && v) {
			start = strtoull(v, NULL, 0);
			i++;
		} else if (strcmp(a, "-j") == 0 && v) {
			jobs = atoi(v);
			i++;
		} else if (strcmp(a, "--quick") == 0) {
			count = QUICK_SEEDS;
			start = 1;
		} else if (strcmp(a, "-v") == 0) {
			verbose = 1;
		} else if (strcmp(a, "--timeout") == 0 && v) {
			wall_limit = atoi(v);
			i++;
		} else if (strcmp(a, "--state") == 0 && v) {
			state_every_us = strtoll(v, NULL, 0) * 1000;
			i++;
		} else {
			usage();
		}
	}
	if (jobs < 1 || jobs > 16)
		jobs = 2;
	if (one)
		return run_seeds(seed, 1, 1, 1);
	if (!count)
		usage();
	return run_seeds(start, count, jobs, 0);
}
