/*
 * apm-ext - an AWS Lambda extension for Elastic APM.
 *
 * Inside a Lambda sandbox, Elastic's APM agents send their data to a local
 * HTTP server on port 8200 that this daemon runs (and OpenTelemetry SDKs
 * theirs, OTLP/HTTP, on port 4318). It queues each request body as received
 * (same bytes, same Content-Encoding) and sends it to the real APM server
 * over kept-alive HTTP/1.1, retrying with backoff what fails. It speaks the
 * Lambda Extensions API (register, then a long-polling /event/next) and the
 * Telemetry API, and holds each invocation (in the default syncflush
 * strategy) only until its data is delivered, and never past its deadline,
 * so nothing waits in a frozen sandbox. One process, one thread, one poll()
 * loop over non-blocking sockets (a short-lived child process resolves host
 * names). Connection and queue buffers are reserved at start-up in one
 * mapping and never grown; malloc serves only the trust anchors and the CA
 * bundle's index (after the first /next; an anchor is added when a server
 * chain first needs it), a server chain held during a handshake, and a few
 * start-up reads.
 *
 * CONTENTS (keep this order; new code goes in its section)
 *   1. Includes, shims and internal limits
 *   2. Utilities: errors, strings, clock, log
 *   3. JSON reader and writer
 *   4. HTTP/1.1 head parser
 *   5. Chunked decoder
 *   6. Settings, URLs, durations, backoff
 *   7. AWS Signature Version 4 and base64
 *   8. Lambda events and telemetry records
 *   9. State: connections, queue, invocation, config
 *  10. Payload queue
 *  11. Sockets, connections and HTTP messages
 *  12. DER, X.509 checks and trust anchors
 *  13. TLS engine
 *  14. Upstream connections: forwarder and proxy
 *  15. Invocation records
 *  16. Local receiver: agent connections
 *  17. Lambda Extensions API client
 *  18. AWS secrets: Secrets Manager and ACM
 *  19. Telemetry listener and platform events
 *  20. Event loop
 *  21. Configuration and main
 */

/* == 1. Includes, shims and internal limits == */

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <bearssl.h>

#include "apm-ext.h"

/*
 * Debian's libbearssl.a is built with _FORTIFY_SOURCE and calls these; musl
 * does not provide them. Same contract as glibc's: abort on overflow.
 */
void *__memcpy_chk(void *dst, const void *src, size_t n, size_t dstlen);
void *__memset_chk(void *dst, int c, size_t n, size_t dstlen);
void *
__memcpy_chk(void *dst, const void *src, size_t n, size_t dstlen)
{
	if (n > dstlen)
		abort();
	return memcpy(dst, src, n);
}
void *
__memset_chk(void *dst, int c, size_t n, size_t dstlen)
{
	if (n > dstlen)
		abort();
	return memset(dst, c, n);
}

#define MAX_AGENT_CONNS 64      /* agent connections; the idlest is evicted */
#define AGENT_GRACE_MS 1000     /* a new connection is spared this long */
#define BODY_MIN_BYTES 64       /* a body brings this much per receiver timeout */
#define MAX_UPSTREAM 4          /* connections to the APM server */
#define AWS_SLOT MAX_UPSTREAM   /* one more connection, for AWS API calls */
#define NUM_UPSTREAM (MAX_UPSTREAM + 1)
#define AWS_RX 65536            /* AWS API answer (certificate chains) */
#define RX_BUF 16384            /* receive buffer of a connection */
#define TX_BUF (BLOCK_SIZE + 256) /* send buffer: a whole queue block framed */
#define BLOCK_SIZE 32768        /* queue block */
#define QUEUE_BYTES_DEFAULT (16u << 20)
#define QUEUE_WARM_BLOCKS 4     /* queue blocks kept resident when empty */
#define TEL_BODY_MAX (2u << 20) /* telemetry POST body (2 x maxBytes) */
#define TEL_TOKENS 2048         /* tokens of one telemetry record */
#define TEL_KEEP_RESIDENT 65536 /* telemetry buffer kept resident after a batch */
#define REG_MAX RX_BUF          /* /register/transaction body */
#define PROXY_BODY_MAX RX_BUF   /* proxied request or response body: what
                                   one receive buffer holds */
#define ERRTEXT_MAX 512         /* upstream error text kept for the log */
#define SHUTDOWN_MARGIN_MS 150  /* exit this long before deadlineMs */
#define DEADLINE_MARGIN_MS 100  /* an invocation ends this long before its deadline */
#define TELEMETRY_PORT_DEFAULT 8201
#define OTLP_PORT_DEFAULT 4318  /* OTLP/HTTP's own default port */
#define REPORT_WAIT_MS 500      /* at SHUTDOWN, wait this long for the last report */
#define MAX_TEL_CONNS 2         /* telemetry connections (Lambda uses one) */
#define NUM_ENDPOINTS 3         /* servers we resolve: APM, Secrets Manager, ACM */
#define NEXT_RETRY_MS 10        /* /event/next could not be sent: again this soon */
#define FREEZE_MIN_MS 20        /* a poll this much later than asked slept through a freeze */

/*
 * The system calls of the event loop and its clocks, in one table: a test
 * build replaces them to inject faults or to run the whole loop over
 * in-memory sockets and a virtual clock (test/sim/sim.c). Files read once at
 * start (CA bundles), the log write and the resolver process use the
 * system directly.
 */
static int
sys_fionread(int fd, int *n)
{
	return ioctl(fd, FIONREAD, n);
}

static struct apm_io {
	int (*socket)(int, int, int);
	int (*connect)(int, const struct sockaddr *, socklen_t);
	int (*bind)(int, const struct sockaddr *, socklen_t);
	int (*listen)(int, int);
	int (*accept4)(int, struct sockaddr *, socklen_t *, int);
	int (*setsockopt)(int, int, int, const void *, socklen_t);
	int (*getsockopt)(int, int, int, void *, socklen_t *);
	int (*fionread)(int, int *);
	ssize_t (*send)(int, const void *, size_t, int);
	ssize_t (*recv)(int, void *, size_t, int);
	ssize_t (*writev)(int, const struct iovec *, int);
	ssize_t (*read)(int, void *, size_t);
	int (*close)(int);
	int (*poll)(struct pollfd *, nfds_t, int);
	int (*clock_gettime)(clockid_t, struct timespec *);
	void (*exit)(int);
} io = {
	socket, connect, bind, listen, accept4, setsockopt, getsockopt,
	sys_fionread, send, recv, writev, read, close, poll, clock_gettime, exit,
};

#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define LIT(s) (s), (sizeof(s) - 1)

#ifdef APM_EXT_TEST
#define NEVER(x) (assert_never(#x, (x)))
static int
assert_never(const char *what, int x)
{
	if (x) {
		fprintf(stderr, "NEVER failed: %s\n", what);
		abort();
	}
	return 0;
}
#else
#define NEVER(x) (x)
#endif

/* == 2. Utilities: errors, strings, clock, log == */

static const char *const err_messages[] = {
#define APM_ERR_MSG(name, msg) msg,
	APM_ERRORS(APM_ERR_MSG)
#undef APM_ERR_MSG
};

const char *
apm_err_str(enum apm_err e)
{
	if ((unsigned)e >= APM_E__COUNT)
		return "unknown error";
	return err_messages[e];
}

static int
lower(int c)
{
	return c >= 'A' && c <= 'Z' ? c + 32 : c;
}

int
apm_str_ieq(struct apm_str s, const char *lit)
{
	size_t n = strlen(lit);
	if (s.len != n)
		return 0;
	for (size_t i = 0; i < n; i++)
		if (lower((unsigned char)s.ptr[i]) != lower((unsigned char)lit[i]))
			return 0;
	return 1;
}

static int
str_has_prefix(struct apm_str s, const char *lit)
{
	size_t n = strlen(lit);
	return s.len >= n && memcmp(s.ptr, lit, n) == 0;
}

/* s begins with lit, in any case. */
static int
str_has_iprefix(struct apm_str s, const char *lit)
{
	size_t n = strlen(lit);
	return s.len >= n && apm_str_ieq((struct apm_str){ s.ptr, n }, lit);
}

/* Copy a view into a fixed array, truncating; always NUL-terminated. */
static void
str_copy(char *dst, size_t cap, struct apm_str s)
{
	size_t n = s.ptr ? MIN(s.len, cap - 1) : 0;
	if (n)
		memcpy(dst, s.ptr, n);
	dst[n] = 0;
}

/* Overwrite every occurrence of secret in text with '*' (for log lines
 * that carry a server's words, which may echo our request). */
static void
str_redact(char *text, const char *secret)
{
	size_t n = secret ? strlen(secret) : 0;
	if (n < 4)
		return;
	for (char *p = strstr(text, secret); p; p = strstr(p + n, secret))
		memset(p, '*', n);
}

/* Whether s holds a control byte (CR, LF, ...): unfit for a header. */
static int
str_has_ctl(const char *s)
{
	for (; *s; s++)
		if ((unsigned char)*s < 0x20 || *s == 0x7f)
			return 1;
	return 0;
}

static int64_t
now_ms(void)
{
	struct timespec ts;
	io.clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The earlier of two deadlines, where 0 means none. */
static int64_t
earliest(int64_t a, int64_t b)
{
	if (!a)
		return b;
	if (!b)
		return a;
	return MIN(a, b);
}

static int64_t
epoch_us(void)
{
	struct timespec ts;
	io.clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static const char *
env_or(const char *name, const char *dflt)
{
	const char *v = getenv(name);
	return v && *v ? v : dflt;
}

/* Give the whole pages inside [p, p+n) back to the kernel (zero on reuse). */
static void
pages_release(char *p, size_t n)
{
	uintptr_t a = ((uintptr_t)p + 4095) & ~(uintptr_t)4095;
	uintptr_t e = ((uintptr_t)p + n) & ~(uintptr_t)4095;
	if (e > a)
		madvise((void *)a, e - a, MADV_DONTNEED);
}

enum log_level { LOG_TRACE, LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR,
	LOG_CRITICAL, LOG_OFF };
static const char *const log_names[] = { "trace", "debug", "info", "warn",
	"error", "critical", "off" };
static int log_threshold = LOG_INFO;

/*
 * One JSON line per event on stderr: time, level, msg. msg is printf-formatted
 * then escaped, so callers pass plain words; a secret is never an argument.
 */
__attribute__((format(printf, 2, 3))) static void
log_at(int level, const char *fmt, ...)
{
	char msg[1024], line[2300];
	if (level < log_threshold)
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	int64_t us = epoch_us();
	time_t secs = (time_t)(us / 1000000);
	struct tm tm;
	gmtime_r(&secs, &tm);
	int n = snprintf(line, sizeof line,
	    "{\"time\":\"%04d-%02d-%02dT%02d:%02d:%02d.%03dZ\",\"level\":\"%s\","
	    "\"logger\":\"apm-ext\",\"msg\":\"", tm.tm_year + 1900, tm.tm_mon + 1,
	    tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
	    (int)(us / 1000 % 1000), log_names[level]);
	int e = apm_json_escape(msg, strlen(msg), line + n, sizeof line - n - 4);
	if (e < 0)
		e = 0;
	n += e;
	memcpy(line + n, "\"}\n", 3);
	n += 3;
	ssize_t w = write(2, line, (size_t)n);
	(void)w;
}

#define log_trace(...) log_at(LOG_TRACE, __VA_ARGS__)
#define log_debug(...) log_at(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_at(LOG_INFO, __VA_ARGS__)
#define log_warn(...) log_at(LOG_WARN, __VA_ARGS__)
#define log_error(...) log_at(LOG_ERROR, __VA_ARGS__)

/* == 3. JSON reader and writer ==
 * A recursive-descent validator that emits jsmn-like tokens. Depth is bounded
 * by APM_JSON_MAX_DEPTH, so recursion is too. Offsets are 32-bit: inputs are
 * bounded far below 4 GiB by every caller.
 */

struct json_parser {
	const char *js;
	size_t len, pos;
	struct apm_json_tok *toks;
	unsigned cap, n, depth;
	enum apm_err err;
};

static int json_value(struct json_parser *p);

static void
json_ws(struct json_parser *p)
{
	while (p->pos < p->len) {
		char c = p->js[p->pos];
		if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
			break;
		p->pos++;
	}
}

static int
json_fail(struct json_parser *p, enum apm_err e)
{
	p->err = e;
	return -1;
}

/* Reserve the next token; returns its index or -1 when the array is full. */
static int
json_tok(struct json_parser *p, int type, size_t start)
{
	if (p->toks) {
		if (p->n >= p->cap)
			return json_fail(p, APM_E_JSON_TOO_LARGE);
		struct apm_json_tok *t = &p->toks[p->n];
		t->type = (uint8_t)type;
		t->start = (uint32_t)start;
		t->end = (uint32_t)start;
		t->size = 0;
	}
	return (int)p->n++;
}

static void
json_close(struct json_parser *p, int i, size_t end, uint32_t size)
{
	if (p->toks) {
		p->toks[i].end = (uint32_t)end;
		p->toks[i].size = size;
	}
}

static int
hexval(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	c = lower(c);
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

static int
json_string(struct json_parser *p)
{
	size_t start = ++p->pos; /* past the opening quote */
	while (p->pos < p->len) {
		unsigned char c = (unsigned char)p->js[p->pos];
		if (c == '"') {
			int i = json_tok(p, APM_JSON_STRING, start);
			if (i < 0)
				return -1;
			json_close(p, i, p->pos, 0);
			p->pos++;
			return i;
		}
		if (c < 0x20)
			return json_fail(p, APM_E_BAD_JSON);
		if (c == '\\') {
			if (++p->pos >= p->len)
				break;
			c = (unsigned char)p->js[p->pos];
			if (c == 'u') {
				if (p->len - p->pos < 5)
					break;
				for (int k = 1; k <= 4; k++)
					if (hexval(p->js[p->pos + k]) < 0)
						return json_fail(p, APM_E_BAD_JSON);
				p->pos += 4;
			} else if (!strchr("\"\\/bfnrt", c) || c == 0) {
				return json_fail(p, APM_E_BAD_JSON);
			}
		}
		p->pos++;
	}
	return json_fail(p, APM_E_BAD_JSON);
}

static int
json_digits(struct json_parser *p)
{
	size_t s = p->pos;
	while (p->pos < p->len && p->js[p->pos] >= '0' && p->js[p->pos] <= '9')
		p->pos++;
	return p->pos > s ? 0 : -1;
}

static int
json_number(struct json_parser *p)
{
	size_t start = p->pos;
	if (p->js[p->pos] == '-')
		p->pos++;
	if (p->pos < p->len && p->js[p->pos] == '0')
		p->pos++;
	else if (json_digits(p) < 0)
		return json_fail(p, APM_E_BAD_JSON);
	if (p->pos < p->len && p->js[p->pos] == '.') {
		p->pos++;
		if (json_digits(p) < 0)
			return json_fail(p, APM_E_BAD_JSON);
	}
	if (p->pos < p->len && (p->js[p->pos] == 'e' || p->js[p->pos] == 'E')) {
		p->pos++;
		if (p->pos < p->len && (p->js[p->pos] == '+' || p->js[p->pos] == '-'))
			p->pos++;
		if (json_digits(p) < 0)
			return json_fail(p, APM_E_BAD_JSON);
	}
	int i = json_tok(p, APM_JSON_NUMBER, start);
	if (i >= 0)
		json_close(p, i, p->pos, 0);
	return i;
}

static int
json_literal(struct json_parser *p, const char *lit, int type)
{
	size_t n = strlen(lit);
	if (p->len - p->pos < n || memcmp(p->js + p->pos, lit, n) != 0)
		return json_fail(p, APM_E_BAD_JSON);
	int i = json_tok(p, type, p->pos);
	p->pos += n;
	if (i >= 0)
		json_close(p, i, p->pos, 0);
	return i;
}

/* Objects and arrays share one loop: an object element is key ':' value. */
static int
json_container(struct json_parser *p, int is_obj)
{
	if (++p->depth > APM_JSON_MAX_DEPTH)
		return json_fail(p, APM_E_JSON_TOO_LARGE);
	int i = json_tok(p, is_obj ? APM_JSON_OBJECT : APM_JSON_ARRAY, p->pos);
	if (i < 0)
		return -1;
	char close = is_obj ? '}' : ']';
	uint32_t size = 0;
	p->pos++;
	json_ws(p);
	if (p->pos < p->len && p->js[p->pos] == close)
		goto done;
	for (;;) {
		json_ws(p);
		if (is_obj) {
			if (p->pos >= p->len || p->js[p->pos] != '"')
				return json_fail(p, APM_E_BAD_JSON);
			if (json_string(p) < 0)
				return -1;
			json_ws(p);
			if (p->pos >= p->len || p->js[p->pos] != ':')
				return json_fail(p, APM_E_BAD_JSON);
			p->pos++;
		}
		if (json_value(p) < 0)
			return -1;
		size++;
		json_ws(p);
		if (p->pos >= p->len)
			return json_fail(p, APM_E_BAD_JSON);
		if (p->js[p->pos] == close)
			break;
		if (p->js[p->pos] != ',')
			return json_fail(p, APM_E_BAD_JSON);
		p->pos++;
	}
done:
	p->pos++;
	p->depth--;
	json_close(p, i, p->pos, size);
	return i;
}

static int
json_value(struct json_parser *p)
{
	json_ws(p);
	if (p->pos >= p->len)
		return json_fail(p, APM_E_BAD_JSON);
	char c = p->js[p->pos];
	switch (c) {
	case '{': return json_container(p, 1);
	case '[': return json_container(p, 0);
	case '"': return json_string(p);
	case 't': return json_literal(p, "true", APM_JSON_TRUE);
	case 'f': return json_literal(p, "false", APM_JSON_FALSE);
	case 'n': return json_literal(p, "null", APM_JSON_NULL);
	default:
		if (c == '-' || (c >= '0' && c <= '9'))
			return json_number(p);
		return json_fail(p, APM_E_BAD_JSON);
	}
}

int
apm_json_parse(const char *js, size_t len, struct apm_json_tok *toks,
    unsigned cap, size_t *end, enum apm_err *err)
{
	struct json_parser p = { js, len, 0, toks, cap, 0, 0, APM_E_OK };
	enum apm_err dummy;
	if (!err)
		err = &dummy;
	*err = APM_E_OK;
	if (len >= UINT32_MAX) {
		*err = APM_E_JSON_TOO_LARGE;
		return APM_MALFORMED;
	}
	if (json_value(&p) < 0) {
		*err = p.err;
		return APM_MALFORMED;
	}
	if (end) {
		*end = p.pos;
	} else {
		json_ws(&p);
		if (p.pos != len) {
			*err = APM_E_BAD_JSON;
			return APM_MALFORMED;
		}
	}
	return (int)p.n;
}

int
apm_json_skip(const struct apm_json_tok *toks, int n, int i)
{
	int j = i + 1;
	while (j < n && toks[j].start < toks[i].end)
		j++;
	return j;
}

int
apm_json_eq(const char *js, const struct apm_json_tok *t, const char *lit)
{
	size_t n = strlen(lit);
	return t->type == APM_JSON_STRING && t->end - t->start == n &&
	    memcmp(js + t->start, lit, n) == 0;
}

int
apm_json_get(const char *js, const struct apm_json_tok *toks, int n, int obj,
    const char *key)
{
	if (obj < 0 || obj >= n || toks[obj].type != APM_JSON_OBJECT)
		return -1;
	int j = obj + 1;
	for (uint32_t k = 0; k < toks[obj].size && j + 1 < n; k++) {
		if (apm_json_eq(js, &toks[j], key))
			return j + 1;
		j = apm_json_skip(toks, n, j + 1);
	}
	return -1;
}

static int
utf8_put(char *out, size_t cap, size_t o, uint32_t cp)
{
	char b[4];
	int n;
	if (cp < 0x80) {
		b[0] = (char)cp;
		n = 1;
	} else if (cp < 0x800) {
		b[0] = (char)(0xC0 | cp >> 6);
		b[1] = (char)(0x80 | (cp & 0x3F));
		n = 2;
	} else if (cp < 0x10000) {
		b[0] = (char)(0xE0 | cp >> 12);
		b[1] = (char)(0x80 | (cp >> 6 & 0x3F));
		b[2] = (char)(0x80 | (cp & 0x3F));
		n = 3;
	} else {
		b[0] = (char)(0xF0 | cp >> 18);
		b[1] = (char)(0x80 | (cp >> 12 & 0x3F));
		b[2] = (char)(0x80 | (cp >> 6 & 0x3F));
		b[3] = (char)(0x80 | (cp & 0x3F));
		n = 4;
	}
	if (o + (size_t)n >= cap)
		return -1;
	memcpy(out + o, b, (size_t)n);
	return n;
}

static uint32_t
hex4(const char *s)
{
	uint32_t v = 0;
	for (int k = 0; k < 4; k++)
		v = v << 4 | (uint32_t)hexval(s[k]);
	return v;
}

int
apm_json_str(const char *js, const struct apm_json_tok *t, char *out,
    size_t cap)
{
	size_t o = 0;
	if (cap == 0 || t->type != APM_JSON_STRING)
		return -1;
	for (uint32_t i = t->start; i < t->end; i++) {
		char c = js[i];
		if (c == '\\') {
			c = js[++i];
			const char *map = "\"\"\\\\//b\bf\fn\nr\rt\t";
			const char *m = c ? strchr(map, c) : NULL;
			if (c == 'u') {
				uint32_t cp = hex4(js + i + 1);
				i += 4;
				if (cp >= 0xD800 && cp < 0xDC00 && i + 6 < t->end &&
				    js[i + 1] == '\\' && js[i + 2] == 'u') {
					uint32_t lo = hex4(js + i + 3);
					if (lo >= 0xDC00 && lo < 0xE000) {
						cp = 0x10000 + ((cp - 0xD800) << 10) +
						    (lo - 0xDC00);
						i += 6;
					}
				}
				if (cp >= 0xD800 && cp < 0xE000)
					return -1; /* a lone surrogate is not UTF-8 */
				int w = utf8_put(out, cap, o, cp);
				if (w < 0)
					return -1;
				o += (size_t)w;
				continue;
			}
			if (!m)
				return -1;
			c = m[1];
		}
		if (o + 1 >= cap)
			return -1;
		out[o++] = c;
	}
	out[o] = 0;
	return (int)o;
}

int
apm_json_int(const char *js, const struct apm_json_tok *t, int64_t *out)
{
	double d;
	if (t->type != APM_JSON_NUMBER)
		return -1;
	int64_t v = 0;
	uint32_t i = t->start;
	int neg = js[i] == '-';
	i += (uint32_t)neg;
	for (; i < t->end && js[i] >= '0' && js[i] <= '9'; i++) {
		int digit = js[i] - '0';
		if (v > (INT64_MAX - digit) / 10)
			return -1;
		v = v * 10 + digit;
	}
	if (i < t->end && memchr(js + i, 'e', t->end - i) == NULL &&
	    memchr(js + i, 'E', t->end - i) == NULL) {
		/* a fraction only: truncated */
	} else if (i < t->end) { /* exponent: go through double */
		if (apm_json_double(js, t, &d) < 0 || d > 9e18 || d < -9e18)
			return -1;
		*out = (int64_t)d;
		return 0;
	}
	*out = neg ? -v : v;
	return 0;
}

int
apm_json_double(const char *js, const struct apm_json_tok *t, double *out)
{
	/* The token is valid JSON already. Up to 19 significant digits and
	 * |exponent| <= 22 this is one correctly rounded operation on exact
	 * operands; beyond, close enough for metrics (no strtod: 6 KB less). */
	static const double p10[] = { 1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7,
		1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18,
		1e19, 1e20, 1e21, 1e22 };
	uint64_t m = 0;
	int exp10 = 0, digits = 0, neg = 0;
	uint32_t i = t->start;
	if (t->type != APM_JSON_NUMBER)
		return -1;
	if (js[i] == '-') {
		neg = 1;
		i++;
	}
	for (int frac = 0; i < t->end; i++) {
		char c = js[i];
		if (c == '.') {
			frac = 1;
		} else if (c >= '0' && c <= '9') {
			if (digits < 19) {
				m = m * 10 + (uint64_t)(c - '0');
				digits += m > 0;
				exp10 -= frac;
			} else {
				exp10 += !frac; /* dropped digit */
			}
		} else {
			break; /* 'e' or 'E' */
		}
	}
	if (i < t->end) {
		int eneg = js[++i] == '-', e = 0;
		if (js[i] == '-' || js[i] == '+')
			i++;
		for (; i < t->end; i++)
			if (e < 10000)
				e = e * 10 + (js[i] - '0');
		exp10 += eneg ? -e : e;
	}
	double d = (double)m;
	while (exp10 > 22 && d < 1e300) {
		d *= 1e22;
		exp10 -= 22;
	}
	while (exp10 < -22 && d > 1e-300) {
		d /= 1e22;
		exp10 += 22;
	}
	if (exp10 > 22)
		d = m ? 1e308 * 10 : 0; /* inf */
	else if (exp10 < -22)
		d = 0;
	else if (exp10 >= 0)
		d *= p10[exp10];
	else
		d /= p10[-exp10];
	*out = neg ? -d : d;
	return 0;
}

int
apm_json_escape(const char *s, size_t len, char *out, size_t cap)
{
	static const char hex[] = "0123456789abcdef";
	size_t o = 0;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		char esc = 0;
		switch (c) {
		case '"': esc = '"'; break;
		case '\\': esc = '\\'; break;
		case '\n': esc = 'n'; break;
		case '\r': esc = 'r'; break;
		case '\t': esc = 't'; break;
		case '\b': esc = 'b'; break;
		case '\f': esc = 'f'; break;
		}
		if (esc || c < 0x20) {
			size_t need = esc ? 2 : 6;
			if (o + need > cap)
				return -1;
			out[o++] = '\\';
			if (esc) {
				out[o++] = esc;
			} else {
				memcpy(out + o, "u00", 3);
				out[o + 3] = hex[c >> 4];
				out[o + 4] = hex[c & 15];
				o += 5;
			}
			continue;
		}
		if (o + 1 > cap)
			return -1;
		out[o++] = (char)c;
	}
	return (int)o;
}

/* == 4. HTTP/1.1 head parser ==
 * One parser for requests and responses. It first finds the blank line that
 * ends the head (scanning only what is new since prev_len), then parses the
 * whole head once. Header values are trimmed views into buf.
 */

static int
is_tchar(int c)
{
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') ||
	    (c >= 'A' && c <= 'Z') || (c && strchr("!#$%&'*+-.^_`|~", c));
}

/* Offset just past the head's terminating empty line, or 0 if not found. */
static size_t
http_head_end(const char *buf, size_t len, size_t prev_len)
{
	size_t i = prev_len > 3 ? prev_len - 3 : 0;
	for (; i < len; i++) {
		if (buf[i] != '\n')
			continue;
		if (i + 1 < len && buf[i + 1] == '\n')
			return i + 2;
		if (i + 2 < len && buf[i + 1] == '\r' && buf[i + 2] == '\n')
			return i + 3;
	}
	return 0;
}

/* The next line of buf[*pos..end), without its CRLF or LF. */
static struct apm_str
http_line(const char *buf, size_t end, size_t *pos)
{
	size_t s = *pos, e = s;
	while (e < end && buf[e] != '\n')
		e++;
	*pos = e < end ? e + 1 : e;
	if (e > s && buf[e - 1] == '\r')
		e--;
	return (struct apm_str){ buf + s, e - s };
}

static int
http_fail(struct apm_http_msg *m, enum apm_err e)
{
	m->error = e;
	return APM_MALFORMED;
}

static int
http_parse_version(struct apm_str v, struct apm_http_msg *m)
{
	if (v.len != 8 || memcmp(v.ptr, "HTTP/1.", 7) != 0 ||
	    (v.ptr[7] != '0' && v.ptr[7] != '1'))
		return -1;
	m->minor_version = v.ptr[7] - '0';
	m->close = m->minor_version == 0;
	return 0;
}

static int
http_request_line(struct apm_str l, struct apm_http_msg *m)
{
	const char *sp1 = memchr(l.ptr, ' ', l.len);
	if (!sp1 || sp1 == l.ptr)
		return -1;
	const char *rest = sp1 + 1;
	size_t rlen = l.len - (size_t)(rest - l.ptr);
	const char *sp2 = memchr(rest, ' ', rlen);
	if (!sp2 || sp2 == rest)
		return -1;
	m->method = (struct apm_str){ l.ptr, (size_t)(sp1 - l.ptr) };
	m->target = (struct apm_str){ rest, (size_t)(sp2 - rest) };
	for (size_t i = 0; i < m->method.len; i++)
		if (!is_tchar((unsigned char)m->method.ptr[i]))
			return -1;
	for (size_t i = 0; i < m->target.len; i++) {
		unsigned char c = (unsigned char)m->target.ptr[i];
		if (c <= 0x20 || c == 0x7f)
			return -1;
	}
	struct apm_str v = { sp2 + 1, l.len - (size_t)(sp2 + 1 - l.ptr) };
	return http_parse_version(v, m);
}

static int
http_status_line(struct apm_str l, struct apm_http_msg *m)
{
	if (l.len < 12 || http_parse_version((struct apm_str){ l.ptr, 8 }, m) < 0)
		return -1;
	if (l.ptr[8] != ' ')
		return -1;
	int st = 0;
	for (int k = 9; k < 12; k++) {
		if (l.ptr[k] < '0' || l.ptr[k] > '9')
			return -1;
		st = st * 10 + (l.ptr[k] - '0');
	}
	if (st < 100 || (l.len > 12 && l.ptr[12] != ' '))
		return -1;
	m->status = st;
	m->reason = l.len > 13 ? (struct apm_str){ l.ptr + 13, l.len - 13 } :
	    (struct apm_str){ l.ptr + l.len, 0 };
	return 0;
}

/* Interpret the headers that frame the body and the connection. */
static int
http_derive(struct apm_http_msg *m)
{
	for (size_t i = 0; i < m->num_headers; i++) {
		struct apm_str n = m->headers[i].name, v = m->headers[i].value;
		if (apm_str_ieq(n, "content-length")) {
			uint64_t cl;
			if (apm_uint_parse(v.ptr, v.len, (uint64_t)1 << 62, &cl) < 0 ||
			    (m->content_length >= 0 && (uint64_t)m->content_length != cl))
				return http_fail(m, APM_E_BAD_LENGTH);
			m->content_length = (int64_t)cl;
		} else if (apm_str_ieq(n, "transfer-encoding")) {
			if (!apm_str_ieq(v, "chunked"))
				return http_fail(m, APM_E_BAD_TRANSFER_ENCODING);
			m->chunked = 1;
		} else if (apm_str_ieq(n, "connection")) {
			if (apm_str_ieq(v, "close"))
				m->close = 1;
			else if (apm_str_ieq(v, "keep-alive"))
				m->close = 0;
		} else if (apm_str_ieq(n, "expect")) {
			m->expect_continue = apm_str_ieq(v, "100-continue");
		}
	}
	if (m->chunked && m->content_length >= 0)
		return http_fail(m, APM_E_BAD_LENGTH);
	return 0;
}

static int
http_header_line(struct apm_str l, struct apm_http_header *h)
{
	const char *colon = memchr(l.ptr, ':', l.len);
	if (!colon || colon == l.ptr)
		return -1;
	for (const char *c = l.ptr; c < colon; c++)
		if (!is_tchar((unsigned char)*c))
			return -1;
	const char *v = colon + 1, *e = l.ptr + l.len;
	while (v < e && (*v == ' ' || *v == '\t'))
		v++;
	while (e > v && (e[-1] == ' ' || e[-1] == '\t'))
		e--;
	for (const char *c = v; c < e; c++) {
		unsigned char u = (unsigned char)*c;
		if ((u < 0x20 && u != '\t') || u == 0x7f)
			return -1;
	}
	h->name = (struct apm_str){ l.ptr, (size_t)(colon - l.ptr) };
	h->value = (struct apm_str){ v, (size_t)(e - v) };
	return 0;
}

static int
http_parse_head(const char *buf, size_t len, size_t prev_len,
    struct apm_http_msg *m, struct apm_http_header *headers, size_t cap,
    int is_request)
{
	memset(m, 0, sizeof *m);
	m->headers = headers;
	m->content_length = -1;
	size_t skip = 0;
	/* RFC 9112 2.2: ignore empty lines before a request line. */
	while (is_request && skip < len && (buf[skip] == '\r' || buf[skip] == '\n'))
		skip++;
	/* the blank line that ends the head comes after the skipped ones */
	size_t lim = MIN(len, APM_HTTP_MAX_HEAD);
	size_t end = lim > skip ? http_head_end(buf + skip, lim - skip,
	    prev_len > skip ? prev_len - skip : 0) : 0;
	end = end ? end + skip : 0;
	if (end == 0)
		return len >= APM_HTTP_MAX_HEAD ?
		    http_fail(m, APM_E_HEAD_TOO_LARGE) : APM_NEED_MORE;
	size_t pos = skip;
	struct apm_str l = http_line(buf, end, &pos);
	if ((is_request ? http_request_line(l, m) : http_status_line(l, m)) < 0)
		return http_fail(m, APM_E_BAD_START_LINE);
	for (;;) {
		l = http_line(buf, end, &pos);
		if (l.len == 0)
			break;
		if (m->num_headers >= cap)
			return http_fail(m, APM_E_TOO_MANY_HEADERS);
		if (http_header_line(l, &headers[m->num_headers]) < 0)
			return http_fail(m, APM_E_BAD_HEADER);
		m->num_headers++;
	}
	if (http_derive(m) < 0)
		return APM_MALFORMED;
	return (int)end;
}

int
apm_http_parse_request(const char *buf, size_t len, size_t prev_len,
    struct apm_http_msg *m, struct apm_http_header *headers, size_t cap)
{
	return http_parse_head(buf, len, prev_len, m, headers, cap, 1);
}

int
apm_http_parse_response(const char *buf, size_t len, size_t prev_len,
    struct apm_http_msg *m, struct apm_http_header *headers, size_t cap)
{
	return http_parse_head(buf, len, prev_len, m, headers, cap, 0);
}

struct apm_str
apm_http_header_get(const struct apm_http_msg *m, const char *name)
{
	for (size_t i = 0; i < m->num_headers; i++)
		if (apm_str_ieq(m->headers[i].name, name))
			return m->headers[i].value;
	return (struct apm_str){ NULL, 0 };
}

/* == 5. Chunked decoder ==
 * A byte-at-a-time state machine except inside chunk data, which moves in
 * one memmove; its state never holds input bytes, so any split works.
 */

enum { CH_SIZE, CH_EXT, CH_SIZE_LF, CH_DATA, CH_DATA_CR, CH_DATA_LF,
	CH_TRAILER_BOL, CH_TRAILER, CH_TRAILER_LF, CH_END_LF, CH_DONE };

static int
chunk_fail(struct apm_chunk_dec *d)
{
	d->error = APM_E_BAD_CHUNK;
	return APM_MALFORMED;
}

/* One framing byte; returns 1 when the body is complete, -1 on error. */
static int
chunk_byte(struct apm_chunk_dec *d, char c)
{
	int v;
	switch (d->state) {
	case CH_SIZE:
		if ((v = hexval((unsigned char)c)) >= 0) {
			if (++d->digits > 15)
				return -1;
			d->remaining = d->remaining << 4 | (uint64_t)v;
			return 0;
		}
		if (d->digits == 0)
			return -1;
		if (c == ';' || c == ' ' || c == '\t')
			d->state = CH_EXT;
		else if (c == '\r')
			d->state = CH_SIZE_LF;
		else if (c == '\n')
			goto size_done;
		else
			return -1;
		return 0;
	case CH_EXT:
		if (++d->line_len > APM_CHUNK_MAX_LINE)
			return -1;
		if (c == '\r')
			d->state = CH_SIZE_LF;
		else if (c == '\n')
			goto size_done;
		return 0;
	case CH_SIZE_LF:
		if (c != '\n')
			return -1;
	size_done:
		d->digits = 0;
		d->line_len = 0;
		d->state = d->remaining ? CH_DATA : CH_TRAILER_BOL;
		return 0;
	case CH_DATA_CR:
		if (c == '\r')
			d->state = CH_DATA_LF;
		else if (c == '\n')
			d->state = CH_SIZE;
		else
			return -1;
		return 0;
	case CH_DATA_LF:
		if (c != '\n')
			return -1;
		d->state = CH_SIZE;
		return 0;
	case CH_TRAILER_BOL:
		if (c == '\r') {
			d->state = CH_END_LF;
			return 0;
		}
		if (c == '\n')
			return 1;
		d->state = CH_TRAILER;
		/* fall through */
	case CH_TRAILER:
		if (++d->trailer_len > APM_CHUNK_MAX_TRAILER)
			return -1;
		if (c == '\r')
			d->state = CH_TRAILER_LF;
		else if (c == '\n')
			d->state = CH_TRAILER_BOL;
		return 0;
	case CH_TRAILER_LF:
		if (c != '\n')
			return -1;
		d->state = CH_TRAILER_BOL;
		return 0;
	case CH_END_LF:
		return c == '\n' ? 1 : -1;
	}
	return -1;
}

ssize_t
apm_chunk_decode(struct apm_chunk_dec *d, char *buf, size_t *len)
{
	size_t in = 0, out = 0, n = *len;
	if (d->state == CH_DONE) {
		*len = 0;
		return (ssize_t)n;
	}
	while (in < n) {
		if (d->state == CH_DATA) {
			size_t take = (size_t)MIN(d->remaining, (uint64_t)(n - in));
			memmove(buf + out, buf + in, take);
			in += take;
			out += take;
			d->remaining -= take;
			if (d->remaining == 0)
				d->state = CH_DATA_CR;
			continue;
		}
		int r = chunk_byte(d, buf[in++]);
		if (r < 0) {
			*len = out;
			return chunk_fail(d);
		}
		if (r == 1) {
			d->state = CH_DONE;
			memmove(buf + out, buf + in, n - in);
			*len = out;
			return (ssize_t)(n - in);
		}
	}
	*len = out;
	return APM_NEED_MORE;
}

/* == 6. Settings, URLs, durations, backoff == */

int
apm_uint_parse(const char *s, size_t len, uint64_t max, uint64_t *out)
{
	uint64_t v = 0;
	if (len == 0 || len > 20)
		return -1;
	for (size_t i = 0; i < len; i++) {
		if (s[i] < '0' || s[i] > '9')
			return -1;
		unsigned d = (unsigned)(s[i] - '0');
		if (d > max || v > (max - d) / 10)
			return -1;
		v = v * 10 + d;
	}
	*out = v;
	return 0;
}

int
apm_bool_parse(const char *s, size_t len, int *out)
{
	struct apm_str v = { s, len };
	static const char *const yes[] = { "true", "1", "yes", "on", "t", "y" };
	static const char *const no[] = { "false", "0", "no", "off", "f", "n" };
	for (size_t i = 0; i < sizeof yes / sizeof *yes; i++) {
		if (apm_str_ieq(v, yes[i])) {
			*out = 1;
			return 0;
		}
		if (apm_str_ieq(v, no[i])) {
			*out = 0;
			return 0;
		}
	}
	return -1;
}

int
apm_duration_parse(const char *s, size_t len, int64_t *ms)
{
	static const struct { const char *unit; double ms; } units[] = {
		{ "ns", 1e-6 }, { "us", 1e-3 }, { "\xc2\xb5s", 1e-3 },
		{ "ms", 1 }, { "s", 1000 }, { "m", 60000 }, { "h", 3600000 },
	};
	double total = 0;
	size_t i = 0;
	while (i < len && (s[i] == ' ' || s[i] == '\t'))
		i++;
	while (len > i && (s[len - 1] == ' ' || s[len - 1] == '\t'))
		len--;
	if (i == len)
		return -1;
	size_t first = i;
	while (i < len) {
		size_t start = i;
		double v = 0, scale = 1;
		int digits = 0, dot = 0;
		for (; i < len && ((s[i] >= '0' && s[i] <= '9') || s[i] == '.'); i++) {
			if (s[i] == '.') {
				if (dot++)
					return -1;
				continue;
			}
			digits++;
			if (dot)
				scale /= 10;
			v = v * 10 + (s[i] - '0');
		}
		if (!digits)
			return -1;
		v *= scale;
		size_t u = i;
		while (i < len && !(s[i] >= '0' && s[i] <= '9') && s[i] != '.')
			i++;
		if (u == i) { /* a bare number: seconds, and it must be alone */
			if (start != first)
				return -1;
			total = v * 1000;
			break;
		}
		size_t k, nunits = sizeof units / sizeof *units;
		for (k = 0; k < nunits; k++)
			if (strlen(units[k].unit) == i - u &&
			    apm_str_ieq((struct apm_str){ s + u, i - u }, units[k].unit))
				break;
		/* "m" vs "ms": exact-length match above keeps them apart */
		if (k == nunits)
			return -1;
		total += v * units[k].ms;
	}
	if (!(total <= 9e15)) /* NaN too: huge mantissa with a tiny scale */
		return -1;
	*ms = (int64_t)total;
	return 0;
}

int
apm_url_parse(const char *s, size_t len, struct apm_url *u)
{
	memset(u, 0, sizeof *u);
	size_t p;
	if (len > APM_URL_MAX || memchr(s, '?', len) || memchr(s, '#', len))
		return -1;
	if (len >= 8 && apm_str_ieq((struct apm_str){ s, 8 }, "https://")) {
		u->tls = 1;
		u->port = 443;
		p = 8;
	} else if (len >= 7 && apm_str_ieq((struct apm_str){ s, 7 }, "http://")) {
		u->port = 80;
		p = 7;
	} else {
		return -1;
	}
	size_t a = p;
	while (p < len && s[p] != '/')
		p++;
	struct apm_str auth = { s + a, p - a }, host, port = { NULL, 0 };
	if (auth.len == 0 || memchr(auth.ptr, '@', auth.len))
		return -1;
	if (auth.ptr[0] == '[') {
		const char *rb = memchr(auth.ptr, ']', auth.len);
		if (!rb || rb == auth.ptr + 1)
			return -1;
		host = (struct apm_str){ auth.ptr + 1, (size_t)(rb - auth.ptr - 1) };
		size_t used = (size_t)(rb - auth.ptr) + 1;
		if (used < auth.len) {
			if (auth.ptr[used] != ':')
				return -1;
			port = (struct apm_str){ auth.ptr + used + 1, auth.len - used - 1 };
		}
	} else {
		const char *colon = memchr(auth.ptr, ':', auth.len);
		host = (struct apm_str){ auth.ptr, colon ? (size_t)(colon - auth.ptr) : auth.len };
		if (colon)
			port = (struct apm_str){ colon + 1, auth.len - host.len - 1 };
	}
	if (host.len == 0 || host.len >= sizeof u->host)
		return -1;
	for (size_t i = 0; i < host.len; i++) {
		unsigned char c = (unsigned char)host.ptr[i];
		if (c <= 0x20 || c >= 0x7f || c == '[' || c == ']')
			return -1;
	}
	if (port.ptr) {
		uint64_t pv;
		if (apm_uint_parse(port.ptr, port.len, 65535, &pv) < 0 || pv == 0)
			return -1;
		u->port = (uint16_t)pv;
	}
	str_copy(u->host, sizeof u->host, host);
	size_t plen = len - p;
	while (plen > 0 && s[p + plen - 1] == '/')
		plen--;
	if (plen >= sizeof u->prefix)
		return -1;
	for (size_t i = 0; i < plen; i++) {
		unsigned char c = (unsigned char)s[p + i];
		if (c <= 0x20 || c >= 0x7f)
			return -1;
	}
	str_copy(u->prefix, sizeof u->prefix, (struct apm_str){ s + p, plen });
	return 0;
}

int64_t
apm_backoff_ms(unsigned n, uint32_t rnd)
{
	if (n <= 1)
		return 0;
	int64_t k = MIN(n - 1, 6u);
	int64_t base = k * k * 1000;
	int64_t jitter = (int64_t)(rnd % 2001) - 1000; /* -1000..1000 per mille of 10% */
	return base + base * jitter / 10000;
}

/* Consecutive failures of one kind of call (deliveries to the APM server,
 * AWS calls) and when the next attempt may start. */
struct backoff {
	unsigned failures;
	int64_t retry_at;       /* no attempt starts before this (monotonic ms) */
};

/* One more failure: the next attempt waits apm_backoff_ms, its jitter
 * drawn from *rnd. Returns that wait. */
static int64_t
backoff_fail(struct backoff *b, uint32_t *rnd)
{
	b->failures++;
	*rnd = *rnd * 1103515245u + 12345u;
	int64_t delay = apm_backoff_ms(b->failures, *rnd >> 8);
	b->retry_at = now_ms() + delay;
	return delay;
}

/* A success: the next attempt may start at once. */
static void
backoff_reset(struct backoff *b)
{
	b->failures = 0;
	b->retry_at = 0;
}

/* == 7. AWS Signature Version 4 and base64 ==
 * Pure: canonical request, string to sign and Authorization value, over
 * BearSSL's SHA-256 and HMAC. Used for Secrets Manager and ACM calls.
 */

#define SIGV4_MAX_HEADERS 32

struct sbuf {                   /* bounded output; sticks at overflow */
	char *p;
	size_t len, cap;
	int over;
};

static void
sb_put(struct sbuf *b, const char *s, size_t n)
{
	if (b->over || b->len + n + 1 > b->cap) {
		b->over = 1;
		return;
	}
	memcpy(b->p + b->len, s, n);
	b->len += n;
	b->p[b->len] = 0;
}

static void
sb_puts(struct sbuf *b, const char *s)
{
	sb_put(b, s, strlen(s));
}

static int
sb_done(struct sbuf *b)
{
	return b->over ? -1 : (int)b->len;
}

static int
uri_unreserved(unsigned char c)
{
	return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
	    (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.' || c == '~';
}

static void
sb_uri_encode(struct sbuf *b, const char *s, size_t n, int keep_slash)
{
	static const char hex[] = "0123456789ABCDEF";
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (uri_unreserved(c) || (keep_slash && c == '/')) {
			sb_put(b, (const char *)&c, 1);
		} else {
			char e[3] = { '%', hex[c >> 4], hex[c & 15] };
			sb_put(b, e, 3);
		}
	}
}

/* Percent-decode s into out (same capacity as s). Returns the length. */
static size_t
uri_decode(const char *s, size_t n, char *out)
{
	size_t o = 0;
	for (size_t i = 0; i < n; i++) {
		if (s[i] == '%' && i + 2 < n && hexval((unsigned char)s[i + 1]) >= 0 &&
		    hexval((unsigned char)s[i + 2]) >= 0) {
			out[o++] = (char)(hexval((unsigned char)s[i + 1]) << 4 |
			    hexval((unsigned char)s[i + 2]));
			i += 2;
		} else {
			out[o++] = s[i];
		}
	}
	return o;
}

/* RFC 3986 dot-segment removal and empty-segment collapse, then encoding. */
static void
sigv4_uri(struct sbuf *b, const char *path)
{
	struct apm_str seg[64];
	int n = 0;
	size_t len = strlen(path);
	for (size_t i = 0; i < len;) {
		while (i < len && path[i] == '/')
			i++;
		size_t s = i;
		while (i < len && path[i] != '/')
			i++;
		struct apm_str v = { path + s, i - s };
		if (v.len == 0 || (v.len == 1 && v.ptr[0] == '.'))
			continue;
		if (v.len == 2 && v.ptr[0] == '.' && v.ptr[1] == '.') {
			if (n > 0)
				n--;
			continue;
		}
		if (n < 64)
			seg[n++] = v;
		else
			b->over = 1; /* more segments than we sign: fail, never guess */
	}
	int trailing = len > 0 && (path[len - 1] == '/' ||
	    (len >= 2 && memcmp(path + len - 2, "/.", 2) == 0) ||
	    (len >= 3 && memcmp(path + len - 3, "/..", 3) == 0));
	sb_puts(b, "/");
	for (int k = 0; k < n; k++) {
		sb_uri_encode(b, seg[k].ptr, seg[k].len, 0);
		if (k + 1 < n || trailing)
			sb_puts(b, "/");
	}
}

/* Query parameters decoded, re-encoded, sorted by encoded key then value. */
static void
sigv4_query(struct sbuf *b, const char *q)
{
	static struct { char k[768], v[1536]; } prm[32], tmp;
	char raw[512];
	int n = 0;
	size_t len = strlen(q);
	for (size_t i = 0; i < len; i++) {
		size_t s = i;
		while (i < len && q[i] != '&')
			i++;
		const char *eq = memchr(q + s, '=', i - s);
		size_t kl = eq ? (size_t)(eq - q - s) : i - s;
		size_t vl = eq ? i - s - kl - 1 : 0;
		if (kl == 0)
			continue;
		if (n == 32 || kl >= sizeof raw || vl >= sizeof raw) {
			b->over = 1; /* beyond what we sign: fail, never guess */
			return;
		}
		struct sbuf kb = { prm[n].k, 0, sizeof prm[n].k, 0 };
		struct sbuf vb = { prm[n].v, 0, sizeof prm[n].v, 0 };
		prm[n].k[0] = prm[n].v[0] = 0;
		sb_uri_encode(&kb, raw, uri_decode(q + s, kl, raw), 0);
		if (eq)
			sb_uri_encode(&vb, raw, uri_decode(eq + 1, vl, raw), 0);
		if (kb.over) { /* (a value always fits: 511 bytes encode to 1533) */
			b->over = 1; /* encoded longer than we sign: fail, never cut */
			return;
		}
		n++;
	}
	for (int i = 1; i < n; i++) /* insertion sort: a handful of params */
		for (int j = i; j > 0; j--) {
			int c = strcmp(prm[j - 1].k, prm[j].k);
			if (c < 0 || (c == 0 && strcmp(prm[j - 1].v, prm[j].v) <= 0))
				break;
			tmp = prm[j];
			prm[j] = prm[j - 1];
			prm[j - 1] = tmp;
		}
	for (int i = 0; i < n; i++) {
		if (i)
			sb_puts(b, "&");
		sb_puts(b, prm[i].k);
		sb_puts(b, "=");
		sb_puts(b, prm[i].v);
	}
}

/* Header names to sign, lower-cased and sorted, duplicates once. */
struct sigv4_hdrs {
	char name[SIGV4_MAX_HEADERS][64];
	int idx[SIGV4_MAX_HEADERS];      /* into the request's headers, sorted */
	int n;
};

static int
sigv4_collect(const struct apm_sigv4 *s, struct sigv4_hdrs *h)
{
	h->n = 0;
	for (size_t i = 0; i < s->num_headers; i++) {
		struct apm_str nm = s->headers[i].name;
		if (h->n >= SIGV4_MAX_HEADERS || nm.len == 0 || nm.len >= 64)
			return -1;
		for (size_t k = 0; k < nm.len; k++)
			h->name[h->n][k] = (char)lower((unsigned char)nm.ptr[k]);
		h->name[h->n][nm.len] = 0;
		h->idx[h->n] = (int)i;
		/* stable insertion: equal names keep request order */
		for (int j = h->n; j > 0 && strcmp(h->name[j - 1], h->name[j]) > 0; j--) {
			char t[64];
			int ti = h->idx[j];
			memcpy(t, h->name[j], 64);
			memcpy(h->name[j], h->name[j - 1], 64);
			memcpy(h->name[j - 1], t, 64);
			h->idx[j] = h->idx[j - 1];
			h->idx[j - 1] = ti;
		}
		h->n++;
	}
	return 0;
}

/* A header value trimmed, inner runs of white space made one space. */
static void
sb_header_value(struct sbuf *b, struct apm_str v)
{
	int space = 0, started = 0;
	for (size_t i = 0; i < v.len; i++) {
		char c = v.ptr[i];
		if (c == ' ' || c == '\t' || c == '\r' || c == '\n') {
			space = started;
			continue;
		}
		if (space)
			sb_puts(b, " ");
		space = 0;
		started = 1;
		sb_put(b, &c, 1);
	}
}

static void
hex_encode(const unsigned char *in, size_t n, char *out)
{
	static const char hex[] = "0123456789abcdef";
	for (size_t i = 0; i < n; i++) {
		out[2 * i] = hex[in[i] >> 4];
		out[2 * i + 1] = hex[in[i] & 15];
	}
	out[2 * n] = 0;
}

static void
sha256_hex(const void *data, size_t n, char out[65])
{
	br_sha256_context sc;
	unsigned char h[32];
	br_sha256_init(&sc);
	br_sha256_update(&sc, data, n);
	br_sha256_out(&sc, h);
	hex_encode(h, 32, out);
}

static void
hmac256(const void *key, size_t klen, const void *msg, size_t mlen,
    unsigned char out[32])
{
	br_hmac_key_context kc;
	br_hmac_context hc;
	br_hmac_key_init(&kc, &br_sha256_vtable, key, klen);
	br_hmac_init(&hc, &kc, 0);
	br_hmac_update(&hc, msg, mlen);
	br_hmac_out(&hc, out);
}

/* "host;x-amz-date;..." of the sorted names, session token included. */
static void
sigv4_signed_headers(struct sbuf *b, const struct apm_sigv4 *s,
    const struct sigv4_hdrs *h)
{
	int tok = s->session_token != NULL;
	const char *sep = "";
	for (int i = 0; i < h->n; i++) {
		if (i > 0 && strcmp(h->name[i], h->name[i - 1]) == 0)
			continue;
		if (tok && strcmp(h->name[i], "x-amz-security-token") > 0) {
			sb_puts(b, sep);
			sb_puts(b, "x-amz-security-token");
			sep = ";";
			tok = 0;
		}
		sb_puts(b, sep);
		sb_puts(b, h->name[i]);
		sep = ";";
	}
	if (tok) {
		sb_puts(b, sep);
		sb_puts(b, "x-amz-security-token");
	}
}

/* The credential scope: "YYYYMMDD/region/service/aws4_request". */
static void
sigv4_scope(struct sbuf *b, const struct apm_sigv4 *s)
{
	sb_put(b, s->amz_date, 8);
	sb_puts(b, "/");
	sb_puts(b, s->region);
	sb_puts(b, "/");
	sb_puts(b, s->service);
	sb_puts(b, "/aws4_request");
}

int
apm_sigv4_canonical(const struct apm_sigv4 *s, char *out, size_t cap)
{
	struct sbuf b = { out, 0, cap, cap == 0 };
	struct sigv4_hdrs h;
	char hash[65];
	if (sigv4_collect(s, &h) < 0)
		return -1;
	sb_puts(&b, s->method);
	sb_puts(&b, "\n");
	sigv4_uri(&b, s->path);
	sb_puts(&b, "\n");
	sigv4_query(&b, s->query ? s->query : "");
	sb_puts(&b, "\n");
	int tok = s->session_token != NULL;
	for (int i = 0; i < h.n; i++) {
		if (i > 0 && strcmp(h.name[i], h.name[i - 1]) == 0) {
			sb_puts(&b, ",");
		} else {
			if (i > 0)
				sb_puts(&b, "\n");
			if (tok && strcmp(h.name[i], "x-amz-security-token") > 0) {
				sb_puts(&b, "x-amz-security-token:");
				sb_puts(&b, s->session_token);
				sb_puts(&b, "\n");
				tok = 0;
			}
			sb_puts(&b, h.name[i]);
			sb_puts(&b, ":");
		}
		sb_header_value(&b, s->headers[h.idx[i]].value);
	}
	sb_puts(&b, "\n");
	if (tok) {
		sb_puts(&b, "x-amz-security-token:");
		sb_puts(&b, s->session_token);
		sb_puts(&b, "\n");
	}
	sb_puts(&b, "\n");
	sigv4_signed_headers(&b, s, &h);
	sb_puts(&b, "\n");
	sha256_hex(s->payload ? s->payload : "", s->payload_len, hash);
	sb_puts(&b, hash);
	return sb_done(&b);
}

int
apm_sigv4_string_to_sign(const struct apm_sigv4 *s, char *out, size_t cap)
{
	char creq[8192], hash[65];
	int n = apm_sigv4_canonical(s, creq, sizeof creq);
	if (n < 0 || strlen(s->amz_date) < 8)
		return -1;
	sha256_hex(creq, (size_t)n, hash);
	struct sbuf b = { out, 0, cap, cap == 0 };
	sb_puts(&b, "AWS4-HMAC-SHA256\n");
	sb_puts(&b, s->amz_date);
	sb_puts(&b, "\n");
	sigv4_scope(&b, s);
	sb_puts(&b, "\n");
	sb_puts(&b, hash);
	return sb_done(&b);
}

int
apm_sigv4_authorization(const struct apm_sigv4 *s, char *out, size_t cap)
{
	char sts[1024], key[256], sig[65];
	unsigned char k[32];
	struct sigv4_hdrs h;
	int n = apm_sigv4_string_to_sign(s, sts, sizeof sts);
	if (n < 0 || sigv4_collect(s, &h) < 0)
		return -1;
	int kl = snprintf(key, sizeof key, "AWS4%s", s->secret_key);
	if (kl < 0 || kl >= (int)sizeof key)
		return -1;
	hmac256(key, (size_t)kl, s->amz_date, 8, k);
	hmac256(k, 32, s->region, strlen(s->region), k);
	hmac256(k, 32, s->service, strlen(s->service), k);
	hmac256(k, 32, "aws4_request", 12, k);
	hmac256(k, 32, sts, (size_t)n, k);
	hex_encode(k, 32, sig);
	struct sbuf b = { out, 0, cap, cap == 0 };
	sb_puts(&b, "AWS4-HMAC-SHA256 Credential=");
	sb_puts(&b, s->access_key);
	sb_puts(&b, "/");
	sigv4_scope(&b, s);
	sb_puts(&b, ", SignedHeaders=");
	sigv4_signed_headers(&b, s, &h);
	sb_puts(&b, ", Signature=");
	sb_puts(&b, sig);
	return sb_done(&b);
}

int
apm_base64_decode(const char *in, size_t len, unsigned char *out, size_t cap)
{
	/* 1-64: the digit's value + 1; 65: white space (skipped); 66: '='
	 * (the end); 0: anything else (refused). A table: trust-anchor bundles
	 * are some 200 KB of base64 decoded at each cold start with https. */
	static const unsigned char val[256] = {
		['A'] = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17,
		18, 19, 20, 21, 22, 23, 24, 25, 26,
		['a'] = 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41,
		42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52,
		['0'] = 53, 54, 55, 56, 57, 58, 59, 60, 61, 62,
		['+'] = 63, ['/'] = 64, ['='] = 66,
		[' '] = 65, ['\n'] = 65, ['\r'] = 65, ['\t'] = 65,
	};
	uint32_t acc = 0;
	int bits = 0;
	size_t o = 0;
	const unsigned char *u = (const unsigned char *)in;
	for (size_t i = 0; i < len; i++) {
		/* four digits at a time while there are four (a PEM line) */
		while (bits == 0 && i + 4 <= len && o + 3 <= cap) {
			unsigned a = val[u[i]], b = val[u[i + 1]], c = val[u[i + 2]],
			    d = val[u[i + 3]];
			if (a - 1 > 63 || b - 1 > 63 || c - 1 > 63 || d - 1 > 63)
				break;
			uint32_t w = (a - 1) << 18 | (b - 1) << 12 | (c - 1) << 6 | (d - 1);
			out[o++] = (unsigned char)(w >> 16);
			out[o++] = (unsigned char)(w >> 8);
			out[o++] = (unsigned char)w;
			i += 4;
		}
		if (i >= len)
			break;
		unsigned v = val[u[i]];
		if (v == 0 || v > 64) {
			if (v == 65)
				continue;
			if (v == 66)
				break;
			return -1;
		}
		acc = acc << 6 | (v - 1);
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			if (o >= cap)
				return -1;
			out[o++] = (unsigned char)(acc >> bits);
		}
	}
	return (int)o;
}

/* == 8. Lambda events and telemetry records == */

/* Copy the string value of key in object obj into out; "" when absent. */
static void
json_get_str(const char *js, const struct apm_json_tok *t, int n, int obj,
    const char *key, char *out, size_t cap)
{
	int i = apm_json_get(js, t, n, obj, key);
	out[0] = 0;
	if (i >= 0 && apm_json_str(js, &t[i], out, cap) < 0)
		out[0] = 0;
}

static double
json_get_num(const char *js, const struct apm_json_tok *t, int n, int obj,
    const char *key, int *found)
{
	double d = 0;
	int i = apm_json_get(js, t, n, obj, key);
	int ok = i >= 0 && apm_json_double(js, &t[i], &d) == 0;
	if (found)
		*found = ok;
	return ok ? d : 0;
}

/* A memory size in MB from the platform: 0 unless in [0, 2^30]. */
static int64_t
mb_value(double d)
{
	return d >= 0 && d <= (double)(1 << 30) ? (int64_t)d : 0;
}

/* The text of a NUMBER value of key in obj, or {0,0}. */
static struct apm_str
json_get_raw_num(const char *js, const struct apm_json_tok *t, int n, int obj,
    const char *key)
{
	int i = apm_json_get(js, t, n, obj, key);
	if (i < 0 || t[i].type != APM_JSON_NUMBER)
		return (struct apm_str){ NULL, 0 };
	return (struct apm_str){ js + t[i].start, t[i].end - t[i].start };
}

int
apm_lambda_event_parse(const char *js, size_t len, struct apm_lambda_event *ev)
{
	struct apm_json_tok t[128];
	memset(ev, 0, sizeof *ev);
	int n = apm_json_parse(js, len, t, 128, NULL, NULL);
	if (n < 1 || t[0].type != APM_JSON_OBJECT)
		return -1;
	int i = apm_json_get(js, t, n, 0, "eventType");
	if (i < 0 || t[i].type != APM_JSON_STRING)
		return -1;
	if (apm_json_eq(js, &t[i], "INVOKE"))
		ev->type = APM_EV_INVOKE;
	else if (apm_json_eq(js, &t[i], "SHUTDOWN"))
		ev->type = APM_EV_SHUTDOWN;
	i = apm_json_get(js, t, n, 0, "deadlineMs");
	if (i < 0 || apm_json_int(js, &t[i], &ev->deadline_ms) < 0)
		return -1;
	json_get_str(js, t, n, 0, "requestId", ev->request_id, sizeof ev->request_id);
	json_get_str(js, t, n, 0, "invokedFunctionArn", ev->function_arn,
	    sizeof ev->function_arn);
	json_get_str(js, t, n, 0, "shutdownReason", ev->shutdown_reason,
	    sizeof ev->shutdown_reason);
	for (char *c = ev->shutdown_reason; *c; c++)
		*c = (char)lower((unsigned char)*c);
	i = apm_json_get(js, t, n, 0, "tracing");
	if (i >= 0)
		json_get_str(js, t, n, i, "value", ev->trace, sizeof ev->trace);
	if (ev->type == APM_EV_INVOKE && ev->request_id[0] == 0)
		return -1;
	return 0;
}

static int64_t
days_from_civil(int64_t y, int64_t m, int64_t d)
{
	y -= m <= 2;
	int64_t era = (y >= 0 ? y : y - 399) / 400;
	int64_t yoe = y - era * 400;
	int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
	int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
	return era * 146097 + doe - 719468;
}

static int
digits_at(const char *s, size_t len, size_t at, int n, int64_t *out)
{
	int64_t v = 0;
	if (at + (size_t)n > len)
		return -1;
	for (int k = 0; k < n; k++) {
		char c = s[at + (size_t)k];
		if (c < '0' || c > '9')
			return -1;
		v = v * 10 + (c - '0');
	}
	*out = v;
	return 0;
}

int
apm_time_parse(const char *s, size_t len, int64_t *us)
{
	int64_t y, mo, d, h, mi, se, frac = 0, off = 0;
	if (digits_at(s, len, 0, 4, &y) || len < 19 || s[4] != '-' ||
	    digits_at(s, len, 5, 2, &mo) || s[7] != '-' ||
	    digits_at(s, len, 8, 2, &d) || (s[10] != 'T' && s[10] != ' ') ||
	    digits_at(s, len, 11, 2, &h) || s[13] != ':' ||
	    digits_at(s, len, 14, 2, &mi) || s[16] != ':' ||
	    digits_at(s, len, 17, 2, &se))
		return -1;
	static const int mdays[] = { 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 };
	int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
	if (mo < 1 || mo > 12 || d < 1 || d > mdays[mo - 1] ||
	    (mo == 2 && d == 29 && !leap) || h > 23 || mi > 59 || se > 60)
		return -1;
	size_t i = 19;
	if (i < len && s[i] == '.') {
		int nd = 0;
		for (i++; i < len && s[i] >= '0' && s[i] <= '9'; i++, nd++)
			if (nd < 6)
				frac = frac * 10 + (s[i] - '0');
		if (nd == 0)
			return -1;
		for (; nd < 6; nd++)
			frac *= 10;
	}
	if (i < len && (s[i] == 'Z' || s[i] == 'z')) {
		i++;
	} else if (i < len && (s[i] == '+' || s[i] == '-')) {
		int64_t oh, om;
		if (digits_at(s, len, i + 1, 2, &oh) || i + 3 >= len ||
		    s[i + 3] != ':' || digits_at(s, len, i + 4, 2, &om))
			return -1;
		off = (oh * 60 + om) * (s[i] == '+' ? 1 : -1);
		i += 6;
	} else {
		return -1;
	}
	if (i != len)
		return -1;
	int64_t secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 +
	    se - off * 60;
	*us = secs * 1000000 + frac;
	return 0;
}

int
apm_tel_record_parse(const char *js, const struct apm_json_tok *t, int n,
    struct apm_tel_record *r)
{
	static const struct { const char *name; int type; } types[] = {
		{ "platform.start", APM_TEL_START },
		{ "platform.runtimeDone", APM_TEL_RUNTIME_DONE },
		{ "platform.report", APM_TEL_REPORT },
		{ "function", APM_TEL_FUNCTION },
		{ "platform.logsDropped", APM_TEL_LOGS_DROPPED },
	};
	memset(r, 0, sizeof *r);
	if (n < 1 || t[0].type != APM_JSON_OBJECT)
		return -1;
	int ti = apm_json_get(js, t, n, 0, "type");
	if (ti < 0 || t[ti].type != APM_JSON_STRING)
		return -1;
	for (size_t k = 0; k < sizeof types / sizeof *types; k++)
		if (apm_json_eq(js, &t[ti], types[k].name))
			r->type = types[k].type;
	int tm = apm_json_get(js, t, n, 0, "time");
	if (tm >= 0 && t[tm].type == APM_JSON_STRING &&
	    apm_time_parse(js + t[tm].start, t[tm].end - t[tm].start, &r->time_us) < 0)
		r->time_us = 0;
	int rec = apm_json_get(js, t, n, 0, "record");
	if (rec < 0)
		return r->type == APM_TEL_OTHER ? 0 : -1;
	if (r->type == APM_TEL_FUNCTION) {
		r->log_is_string = t[rec].type == APM_JSON_STRING;
		r->log = (struct apm_str){ js + t[rec].start, t[rec].end - t[rec].start };
		return 0;
	}
	if (t[rec].type != APM_JSON_OBJECT)
		return r->type == APM_TEL_OTHER ? 0 : -1;
	json_get_str(js, t, n, rec, "requestId", r->request_id, sizeof r->request_id);
	json_get_str(js, t, n, rec, "status", r->status, sizeof r->status);
	int mi = apm_json_get(js, t, n, rec, "metrics");
	if (mi >= 0) {
		r->duration_ms = json_get_num(js, t, n, mi, "durationMs", NULL);
		r->billed_ms = json_get_num(js, t, n, mi, "billedDurationMs", NULL);
		r->init_ms = json_get_num(js, t, n, mi, "initDurationMs", &r->has_init);
		r->duration_raw = json_get_raw_num(js, t, n, mi, "durationMs");
		r->billed_raw = json_get_raw_num(js, t, n, mi, "billedDurationMs");
		r->init_raw = json_get_raw_num(js, t, n, mi, "initDurationMs");
		r->memory_mb = mb_value(json_get_num(js, t, n, mi, "memorySizeMB", NULL));
		r->max_memory_mb = mb_value(json_get_num(js, t, n, mi,
		    "maxMemoryUsedMB", NULL));
	}
	return 0;
}

/* == 9. State: connections, queue, invocation, config ==
 * Process state: g (config, queue, connections, the invocation), tel
 * (telemetry and invocation records) and aws (secrets calls), all here.
 * Elsewhere, beside the code that owns them: the io table (section 1), the
 * log threshold (2), tls (12: trust anchors, engines), the arena (21) and
 * function-local buffers with one user each (SigV4's parameter table, a DER
 * copy, a TLS error text, an ACM answer, the Lambda connection's buffers).
 * Connection buffers come from one anonymous mapping made after register,
 * so pages cost RSS only once used.
 */

/* How a message body is framed, and how much of it has been decoded. */
enum body_mode { BODY_NONE, BODY_LENGTH, BODY_CHUNKED, BODY_EOF };

struct body {
	int mode;               /* enum body_mode */
	uint64_t left;          /* BODY_LENGTH: bytes still to come */
	struct apm_chunk_dec ch; /* BODY_CHUNKED: decoder state */
	size_t have;            /* decoded bytes at the start of rx */
	uint64_t total;         /* decoded bytes so far, for limits */
	int done;               /* the whole body has been decoded */
};

/* Byte streams shared by every connection kind. */
struct conn {
	int fd;                 /* -1: slot free */
	char *rx;               /* received bytes [0, rx_len) */
	size_t rx_len, rx_cap;
	char *tx;               /* bytes to send [tx_off, tx_len) */
	size_t tx_len, tx_off, tx_cap;
	size_t head_prev;       /* head parser's prev_len */
	int head_done;          /* the head has been parsed and removed */
	struct body body;
	int64_t deadline;       /* monotonic ms; 0 = none */
	int64_t last_active;    /* monotonic ms of the last byte moved */
	int64_t head_start;     /* when the first byte of this head came */
	int close_after;        /* close once tx has drained */
	int eof;                /* peer closed its side */
	br_ssl_client_context *tls; /* upstream over https, else NULL */
};

enum agent_state { AG_HEAD, AG_BODY, AG_PROXY_WAIT, AG_RESPOND };
enum agent_route { RT_INTAKE, RT_REGISTER, RT_PROXY, RT_REJECT };

/* What a queued payload is, and so where it goes upstream. */
enum payload_kind { PL_INTAKE, PL_OTLP_TRACES, PL_OTLP_METRICS, PL_OTLP_LOGS };

struct agent {
	struct conn c;
	int state;              /* enum agent_state */
	int route;              /* enum agent_route */
	int status;             /* RT_REJECT: the status to answer */
	uint64_t limit;         /* body bytes this route takes at most */
	int flushed;            /* ?flushed=true */
	int keep_alive;
	int payload;            /* queue slot receiving the body, -1 none */
	char encoding[32];      /* Content-Encoding of the body */
	char user_agent[128];
	char request_id[128];   /* x-elastic-aws-request-id */
	unsigned requests;      /* requests answered on this connection */
	uint64_t accepted;      /* accept order, to break idleness ties */
	int64_t accepted_at;    /* monotonic ms */
	int otlp;               /* accepted on the OTLP/HTTP port */
	int kind;               /* enum payload_kind of the request's body */
	char ctype[64];         /* its Content-Type (OTLP: passed on) */
	int64_t body_start;     /* AG_BODY: when its head was read */
	int64_t window_start;   /* AG_BODY: the current progress window */
	uint64_t window_total;  /* body.total when that window began */
};

/* A server we connect to: the APM server, Secrets Manager or ACM. */
struct endpoint {
	struct apm_url url;
	struct sockaddr_storage addr;
	socklen_t addrlen;
	int resolved;
	pid_t resolver;         /* resolver process under way, 0 none */
	int resolver_fd;        /* its answer pipe; -1 none */
	int64_t resolver_deadline;
	int64_t resolve_after;  /* no new resolver before (its owner's backoff) */
	int verify;             /* check its certificate */
	const char *what;       /* for log lines */
	/* TLS session to resume: this endpoint's own, never another's (a
	 * resumed session skips the certificate and name checks). */
	br_ssl_session_parameters session;
	int have_session;
};

enum up_state { UP_CLOSED, UP_CONNECTING, UP_HANDSHAKE, UP_IDLE, UP_BUSY };
enum up_job { JOB_NONE, JOB_PAYLOAD, JOB_PROXY, JOB_AWS };

struct upstream {
	struct conn c;
	struct endpoint *ep;    /* where this slot connects */
	int state;              /* enum up_state */
	int job;                /* enum up_job */
	/* The job's owner settles it: answered (the response is in c.rx,
	 * status in status) or failed (why). NULL: no one to tell. */
	void (*done)(struct upstream *u, int answered, const char *why);
	int payload;            /* JOB_PAYLOAD: queue slot */
	int agent;              /* JOB_PROXY: agent slot, -1 if it left */
	uint64_t sent;          /* payload bytes framed into tx so far */
	int sent_last;          /* the terminating chunk is in tx */
	int reused;             /* a previous exchange completed on it */
	int resp_started;       /* a response byte has arrived */
	int status;             /* response status */
	int resp_close;         /* Connection: close in the response */
	int head_req;           /* JOB_PROXY: a HEAD request, its answer has no body */
	int64_t retry_after_ms; /* the answer's Retry-After, 0 none */
	int64_t resp_length;    /* the answer's Content-Length, -1 none */
	char ctype_buf[128];
	char cenc_buf[64];
};

/* One agent request held until the APM server accepts it. */
struct payload {
	int used;
	uint64_t seq;           /* arrival order */
	int first, last;        /* block chain, -1 when empty */
	uint64_t len;           /* bytes stored */
	int open;               /* still being received */
	int aborted;            /* the agent's request broke off */
	int inflight;           /* an upstream connection is sending it */
	int own;                /* events we made: plain ndjson */
	int stale_retries;      /* resent after a dead kept-alive connection */
	int kind;               /* enum payload_kind */
	int64_t not_before;     /* the server's Retry-After for it: monotonic ms */
	char ctype[64];         /* OTLP: the exporter's Content-Type */
	char encoding[32];
	char user_agent[128];
};

struct queue {
	char *mem;              /* nblocks * BLOCK_SIZE */
	int *next;              /* chain links, -1 ends */
	int *free_stack;        /* recycled blocks, reused first (warm pages) */
	int free_top, fresh, nblocks;
	struct payload *p;      /* npayloads slots */
	unsigned npayloads, used;
	uint64_t seq;
	uint64_t dropped, dropped_bytes, rejected, delivered, delivered_bytes;
};

struct config {
	int has_server;         /* g.apm.url holds the APM server's URL */
	char auth[2048];        /* Authorization value; never logged */
	const char *runtime_api;
	uint16_t receiver_port, telemetry_port, otlp_port; /* otlp 0: off */
	int64_t receiver_timeout_ms, forwarder_timeout_ms;
	int background;
	unsigned buffer_requests;
	size_t queue_bytes, max_body;
	int verify_cert, capture_logs, disable_telemetry;
	int from_aws;           /* a token, API key or CA comes from AWS */
	const char *ca_file, *ca_pem;
	const char *function_name, *function_version, *region, *memory_mb;
};

enum phase { PH_INIT, PH_WAIT, PH_INVOKE, PH_SHUTDOWN };

struct invocation {
	int active;             /* an INVOKE is being handled */
	uint64_t number;        /* invocations so far */
	char request_id[128];
	char arn[256];
	int64_t t_invoke;       /* monotonic ms */
	int64_t deadline;       /* monotonic ms */
	int ended;              /* ?flushed=true, runtimeDone or deadline */
	int64_t t_end;
	int agent_flushed;
	int by_deadline;        /* ended because its deadline came */
};

/* The last /register/transaction: the agent's metadata and transaction
 * lines, kept to report the transaction if the function times out or
 * crashes (its ids go to the invocation's record, struct inv_info). */
struct registration {
	char *body;             /* REG_MAX bytes from the arena */
	size_t len;             /* 0: none */
	char request_id[128];   /* the invocation it was registered for */
};

enum lambda_req { LR_NONE, LR_NEXT };

struct lambda {
	struct conn c;
	char id[128];           /* Lambda-Extension-Identifier */
	char host[128];         /* AWS_LAMBDA_RUNTIME_API */
	struct sockaddr_storage addr;
	socklen_t addrlen;
	int req;                /* enum lambda_req in flight */
	int64_t retry_at;       /* /event/next could not be sent: again then */
};

enum tel_state { TS_HEAD, TS_BODY, TS_RESPOND };

struct telconn {
	struct conn c;
	int state;              /* enum tel_state */
	int reject;             /* status to answer instead of reading */
};

/* What the platform and the agent told us about one invocation. Telemetry
 * may come an invocation late, so the last few are kept. */
#define TEL_RECENT 8

struct inv_info {
	char request_id[128];
	char arn[256];
	int64_t deadline_epoch_ms; /* 0 until its INVOKE is read */
	int64_t start_us;       /* platform.start time, or INVOKE receipt */
	int reported;           /* platform.report arrived */
	char trace_id[33], tx_id[17]; /* registered transaction, "" if none */
};

/* What each pollfd slot of a loop pass belongs to. */
enum { PK_LISTEN, PK_LAMBDA, PK_AGENT, PK_UP, PK_TEL, PK_RESOLVER };

/* The listening sockets: agents' intake, telemetry, OTLP/HTTP. */
enum listener { LS_INTAKE4, LS_INTAKE6, LS_TELEMETRY, LS_OTLP4, LS_OTLP6,
	NUM_LISTENERS };

struct pollref {
	int kind;
	int idx;
};

/* The poll set of one loop pass, and what each slot belongs to. */
struct pollset {
	struct pollfd pfd[NUM_LISTENERS + 1 + MAX_AGENT_CONNS + NUM_UPSTREAM +
	    MAX_TEL_CONNS + NUM_ENDPOINTS];
	struct pollref ref[NUM_LISTENERS + 1 + MAX_AGENT_CONNS + NUM_UPSTREAM +
	    MAX_TEL_CONNS + NUM_ENDPOINTS];
	int n;
};

static struct {
	struct config cfg;
	struct queue q;
	struct agent agents[MAX_AGENT_CONNS];
	struct upstream up[NUM_UPSTREAM];
	struct endpoint apm;    /* the APM server */
	struct lambda lam;
	struct invocation inv;
	int phase;              /* enum phase */
	int64_t exit_at;        /* PH_SHUTDOWN: monotonic ms */
	int64_t shutdown_at;    /* when SHUTDOWN arrived */
	int end_pending;        /* the end of the invocation came before INVOKE */
	char done_pending[128]; /* runtimeDone seen before its INVOKE: request id */
	char done_pending_status[32];
	int listen_fd[NUM_LISTENERS]; /* enum listener */
	struct backoff fwd;     /* deliveries to the APM server */
	uint32_t rnd;           /* backoff jitter (deliveries and AWS calls) */
	volatile sig_atomic_t got_term;
	int warned_no_server;
	unsigned warned_grpc;   /* HTTP/2 on the OTLP port, said once */
	struct registration reg;
	uint64_t evicted, accepts;
	uint64_t progress;      /* bumped when a job ends: schedule again */
} g;

/* Telemetry: its connections, what it told us of recent invocations, and
 * the payload of our own events. */
static struct {
	struct telconn conns[MAX_TEL_CONNS];
	int subscribed;
	struct inv_info recent[TEL_RECENT]; /* ring of the last invocations */
	unsigned recent_next;
	char stream_rid[128];   /* request id of the last platform.start read */
	uint64_t bad_posts, records, logs_dropped;
	int own;                /* open payload of our own events, -1 none */
	char agent_meta[8192];  /* metadata line of the agent, if known */
	size_t agent_meta_len;
	int proxy_sent;         /* for g.inv */
	uint64_t own_mark;      /* length of our payload before the line begun */
	int own_cut;            /* a part of that line did not fit */
	struct apm_json_tok rec_toks[TEL_TOKENS]; /* the record being read */
	struct apm_json_tok tx_toks[TEL_TOKENS];  /* the registered transaction */
} tel; /* own = -1 is set in main: a zero struct stays out of .data */

/* AWS secrets: the calls to make and their backoff (section 18). */
enum aws_call { AWS_SM_TOKEN, AWS_SM_APIKEY, AWS_ACM, AWS_NCALLS };

static struct {
	const char *id[AWS_NCALLS];     /* secret id or certificate ARN */
	int done[AWS_NCALLS];
	int current;                    /* call in flight, -1 none */
	struct backoff backoff;
	const char *key_id, *secret, *session, *region;
	char token[1024], apikey[1024]; /* fetched secrets; never logged */
	struct endpoint sm, acm;
	struct apm_json_tok toks[TEL_TOKENS]; /* of an answer */
} aws; /* current = -1 is set in main */

/* What the secrets state says to the forwarder and the loop. */

static int
aws_acm_wanted(void)
{
	return aws.id[AWS_ACM] != NULL;
}

/* The first call still to make (the one aws_schedule starts next), or -1. */
static int
aws_next_call(void)
{
	for (int k = 0; k < AWS_NCALLS; k++)
		if (aws.id[k] && !aws.done[k])
			return k;
	return -1;
}

/* A call is still to be made: deliveries wait for it. */
static int
aws_pending(void)
{
	return aws_next_call() >= 0;
}

/* Secrets are wanted and their first attempt has not ended yet. */
static int
aws_first_call_pending(void)
{
	return aws.key_id && aws.backoff.failures == 0 && aws_pending();
}


/* == 10. Payload queue ==
 * Agent bodies are stored in chains of fixed blocks, appended as they arrive
 * and freed only once the APM server answered 2xx (or the payload was given
 * up), so a failed delivery can always be retried from the first byte.
 */

static int
queue_block_alloc(struct queue *q)
{
	if (q->free_top > 0)
		return q->free_stack[--q->free_top];
	if (q->fresh < q->nblocks)
		return q->fresh++;
	return -1;
}

static void
queue_free(struct queue *q, int slot)
{
	struct payload *p = &q->p[slot];
	g.progress++;
	for (int b = p->first; b >= 0; b = q->next[b])
		q->free_stack[q->free_top++] = b;
	memset(p, 0, sizeof *p);
	q->used--;
	if (q->used == 0 && q->fresh > QUEUE_WARM_BLOCKS) {
		/* Empty after a burst: give the pages back (idle RSS stays small)
		 * and start again from the first, still warm, blocks. */
		pages_release(q->mem + (size_t)QUEUE_WARM_BLOCKS * BLOCK_SIZE,
		    (size_t)(q->fresh - QUEUE_WARM_BLOCKS) * BLOCK_SIZE);
		q->free_top = 0;
		q->fresh = 0;
	}
}

/* Oldest payload that may be dropped (complete, not being sent). */
static int
queue_oldest_droppable(struct queue *q)
{
	int best = -1;
	for (unsigned i = 0; i < q->npayloads; i++) {
		struct payload *p = &q->p[i];
		if (p->used && !p->open && !p->inflight &&
		    (best < 0 || p->seq < q->p[best].seq))
			best = (int)i;
	}
	return best;
}

/*
 * Make room when may_drop (the APM server is failing, or the auth its
 * deliveries need is still to come): drop the oldest complete payload.
 * Otherwise we never drop: the caller waits.
 */
static int
queue_make_room(struct queue *q, int may_drop)
{
	if (!may_drop)
		return -1;
	int s = queue_oldest_droppable(q);
	if (s < 0)
		return -1;
	q->dropped++;
	q->dropped_bytes += q->p[s].len;
	log_warn("queue full while the APM server fails: dropped the oldest "
	    "payload (%llu bytes); %llu dropped so far",
	    (unsigned long long)q->p[s].len, (unsigned long long)q->dropped);
	queue_free(q, s);
	return 0;
}

/* A new open payload; returns its slot or -1 (full: back-pressure). With
 * may_drop, a full queue drops its oldest complete payload instead. */
static int
queue_open(struct queue *q, const char *encoding, const char *user_agent,
    int own, int may_drop)
{
	if (q->used >= q->npayloads && queue_make_room(q, may_drop) < 0)
		return -1;
	for (unsigned i = 0; i < q->npayloads; i++) {
		struct payload *p = &q->p[i];
		if (p->used)
			continue;
		memset(p, 0, sizeof *p);
		p->used = 1;
		p->open = 1;
		p->own = own;
		p->seq = ++q->seq;
		p->first = p->last = -1;
		snprintf(p->encoding, sizeof p->encoding, "%s", encoding);
		snprintf(p->user_agent, sizeof p->user_agent, "%s", user_agent);
		q->used++;
		return (int)i;
	}
	return -1;
}

/* Append; returns the bytes taken (fewer when blocks run out, unless
 * may_drop lets the oldest complete payload make room). */
static size_t
queue_append(struct queue *q, int slot, const char *data, size_t n,
    int may_drop)
{
	struct payload *p = &q->p[slot];
	size_t done = 0;
	while (done < n) {
		size_t fill = (size_t)(p->len % BLOCK_SIZE);
		if (p->last < 0 || (fill == 0 && p->len > 0)) {
			int b = queue_block_alloc(q);
			if (b < 0 && queue_make_room(q, may_drop) == 0)
				b = queue_block_alloc(q);
			if (b < 0)
				break;
			q->next[b] = -1;
			if (p->last >= 0)
				q->next[p->last] = b;
			else
				p->first = b;
			p->last = b;
			fill = 0;
		}
		size_t take = MIN(n - done, (size_t)BLOCK_SIZE - fill);
		memcpy(q->mem + (size_t)p->last * BLOCK_SIZE + fill, data + done, take);
		p->len += take;
		done += take;
	}
	return done;
}

/* Cut payload slot back to its first len bytes (len <= its length),
 * giving back the blocks past them. */
static void
queue_truncate(struct queue *q, int slot, uint64_t len)
{
	struct payload *p = &q->p[slot];
	if (len >= p->len)
		return;
	uint64_t keep = (len + BLOCK_SIZE - 1) / BLOCK_SIZE; /* blocks kept */
	int b = p->first, last = -1;
	for (uint64_t k = 0; k < keep && b >= 0; k++) {
		last = b;
		b = q->next[b];
	}
	while (b >= 0) {
		int nb = q->next[b];
		q->free_stack[q->free_top++] = b;
		b = nb;
	}
	if (last >= 0)
		q->next[last] = -1;
	else
		p->first = -1;
	p->last = last;
	p->len = len;
}

/* The stored bytes of payload slot from offset off: a view up to a block end. */
static struct apm_str
queue_view(struct queue *q, int slot, uint64_t off)
{
	struct payload *p = &q->p[slot];
	int b = p->first;
	for (uint64_t skip = off / BLOCK_SIZE; skip > 0 && b >= 0; skip--)
		b = q->next[b];
	if (b < 0 || off >= p->len)
		return (struct apm_str){ NULL, 0 };
	size_t in = (size_t)(off % BLOCK_SIZE);
	size_t n = (size_t)MIN((uint64_t)(BLOCK_SIZE - in), p->len - off);
	return (struct apm_str){ q->mem + (size_t)b * BLOCK_SIZE + in, n };
}

/* == 11. Sockets, connections and HTTP messages == */

/*
 * Add fd to the poll set with interest ev. No interest leaves it out: poll
 * reports a hang-up whatever was asked, so a connection waiting on the queue
 * or the APM server would wake the loop again and again; its deadline
 * covers it.
 */
static void
pollset_add(struct pollset *ps, int fd, short ev, int kind, int idx)
{
	if (!ev)
		return;
	ps->pfd[ps->n] = (struct pollfd){ fd, ev, 0 };
	ps->ref[ps->n++] = (struct pollref){ kind, idx };
}

/* Parse "host:port" with a numeric host into addr. 0 or -1. */
static int
sock_addr_numeric(const char *host, uint16_t port, struct sockaddr_storage *ss,
    socklen_t *len)
{
	memset(ss, 0, sizeof *ss);
	struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
	struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
	if (inet_pton(AF_INET, host, &s4->sin_addr) == 1) {
		s4->sin_family = AF_INET;
		s4->sin_port = htons(port);
		*len = sizeof *s4;
		return 0;
	}
	if (inet_pton(AF_INET6, host, &s6->sin6_addr) == 1) {
		s6->sin6_family = AF_INET6;
		s6->sin6_port = htons(port);
		*len = sizeof *s6;
		return 0;
	}
	return -1;
}

/* A numeric address or "localhost", without the resolver. 0 or -1. */
static int
sock_addr_local(const char *host, uint16_t port, struct sockaddr_storage *ss,
    socklen_t *len)
{
	if (sock_addr_numeric(host, port, ss, len) == 0)
		return 0;
	if (strcmp(host, "localhost") == 0)
		return sock_addr_numeric("127.0.0.1", port, ss, len);
	return -1;
}

/* What a resolver process writes back. */
struct resolved_addr {
	int rc;                 /* getaddrinfo's result, 0 = found */
	socklen_t len;
	struct sockaddr_storage addr;
};

/* Blocking resolution: getaddrinfo, which reads /etc/hosts and
 * /etc/resolv.conf (search, ndots, timeouts) as musl does. */
static struct resolved_addr
sock_getaddrinfo(const char *host, uint16_t port)
{
	struct resolved_addr r = { 0 };
	struct addrinfo hints = { 0 }, *res = NULL;
	hints.ai_socktype = SOCK_STREAM;
	char ps[8];
	snprintf(ps, sizeof ps, "%u", port);
	r.rc = getaddrinfo(host, ps, &hints, &res);
	if (r.rc == 0 && res && res->ai_addrlen <= sizeof r.addr) {
		memcpy(&r.addr, res->ai_addr, res->ai_addrlen);
		r.len = res->ai_addrlen;
	} else if (r.rc == 0) {
		r.rc = EAI_FAIL;
	}
	if (res)
		freeaddrinfo(res);
	return r;
}

/* Numeric, "localhost" or resolved, blocking: only before the loop runs
 * (AWS_LAMBDA_RUNTIME_API, an address in practice). 0 or -1. */
static int
sock_resolve(const char *host, uint16_t port, struct sockaddr_storage *ss,
    socklen_t *len)
{
	if (sock_addr_local(host, port, ss, len) == 0)
		return 0;
	struct resolved_addr r = sock_getaddrinfo(host, port);
	if (r.rc != 0) {
		log_error("cannot resolve %s: %s", host, gai_strerror(r.rc));
		return -1;
	}
	*ss = r.addr;
	*len = r.len;
	return 0;
}

/*
 * Name resolution inside the loop runs in a child process that calls
 * getaddrinfo and writes the answer to a pipe the loop polls. A DNS client
 * of our own would repeat what musl already does right (hosts file,
 * resolv.conf's search, ndots, timeout and attempts options, A and AAAA)
 * in some 400 lines with a parser to fuzz; a resolution happens once per
 * endpoint and again only after repeated failures, and a fork of this
 * small static process costs a fraction of a millisecond (pages shared
 * copy-on-write). The loop never waits: a resolver that hangs is killed at
 * its deadline and the endpoint counts as failing.
 */
static int
resolver_start(struct endpoint *ep, int64_t timeout_ms)
{
	int p[2];
	if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0)
		return -1;
	pid_t pid = fork();
	if (pid < 0) {
		close(p[0]);
		close(p[1]);
		return -1;
	}
	if (pid == 0) {
		close(p[0]);
		struct resolved_addr r = sock_getaddrinfo(ep->url.host, ep->url.port);
		(void)!write(p[1], &r, sizeof r);
		_exit(0);
	}
	close(p[1]);
	ep->resolver = pid;
	ep->resolver_fd = p[0];
	ep->resolver_deadline = now_ms() + timeout_ms;
	return 0;
}

/* Stop a resolver and reap it. */
static void
resolver_stop(struct endpoint *ep)
{
	if (!ep->resolver)
		return;
	kill(ep->resolver, SIGKILL);
	waitpid(ep->resolver, NULL, 0);
	close(ep->resolver_fd);
	ep->resolver = 0;
	ep->resolver_fd = -1;
}

/*
 * Read the resolver's answer (its pipe is readable, or closed). 1 resolved,
 * -1 failed (why is set), 0 nothing yet.
 */
static int
resolver_read(struct endpoint *ep, const char **why)
{
	struct resolved_addr r;
	ssize_t n = read(ep->resolver_fd, &r, sizeof r);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return 0;
	resolver_stop(ep);
	if (n != (ssize_t)sizeof r) {
		*why = "resolver process failed";
		return -1;
	}
	if (r.rc != 0) {
		*why = gai_strerror(r.rc);
		return -1;
	}
	ep->addr = r.addr;
	ep->addrlen = r.len;
	ep->resolved = 1;
	return 1;
}

/*
 * Whether ep's address is known; starts a resolver when it is not (and
 * none runs). 1 known, 0 not yet (the loop hears when it is).
 */
static int
endpoint_ready(struct endpoint *ep, int64_t timeout_ms)
{
	if (ep->resolved)
		return 1;
	if (sock_addr_local(ep->url.host, ep->url.port, &ep->addr,
	    &ep->addrlen) == 0) {
		ep->resolved = 1;
		return 1;
	}
	if (!ep->resolver && now_ms() >= ep->resolve_after &&
	    resolver_start(ep, timeout_ms) < 0)
		log_error("cannot start a resolver for %s: %s", ep->url.host,
		    strerror(errno));
	return 0;
}

/* A non-blocking connect in progress (or done); fd or -1. */
static int
sock_connect(const struct sockaddr_storage *ss, socklen_t len)
{
	int fd = io.socket(ss->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	int one = 1;
	io.setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	if (io.connect(fd, (const struct sockaddr *)ss, len) < 0 &&
	    errno != EINPROGRESS) {
		int e = errno;
		io.close(fd);
		errno = e;
		return -1;
	}
	return fd;
}

static int
sock_listen(int family, const char *addr, uint16_t port)
{
	struct sockaddr_storage ss;
	socklen_t len;
	if (sock_addr_numeric(addr, port, &ss, &len) < 0)
		return -1;
	int fd = io.socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	int one = 1;
	io.setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (family == AF_INET6)
		io.setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
	if (io.bind(fd, (struct sockaddr *)&ss, len) < 0 || io.listen(fd, 128) < 0) {
		int e = errno;
		io.close(fd);
		errno = e;
		return -1;
	}
	return fd;
}

/* Connections and HTTP messages on them: every kind reads and answers
 * through these. */

static void
buf_reset(struct conn *c)
{
	c->rx_len = c->tx_len = c->tx_off = 0;
	c->head_prev = 0;
	c->head_done = 0;
	c->close_after = 0;
	c->eof = 0;
	memset(&c->body, 0, sizeof c->body);
}

static void
conn_close(struct conn *c)
{
	if (c->fd >= 0)
		io.close(c->fd);
	c->fd = -1;
	c->deadline = 0;
	buf_reset(c);
}

/* Append formatted text to tx; -1 when it does not fit. */
__attribute__((format(printf, 2, 3))) static int
tx_printf(struct conn *c, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	size_t room = c->tx_cap - c->tx_len;
	int n = vsnprintf(c->tx + c->tx_len, room, fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= room)
		return -1;
	c->tx_len += (size_t)n;
	return 0;
}

static int
tx_put(struct conn *c, const void *p, size_t n)
{
	if (c->tx_cap - c->tx_len < n)
		return -1;
	memcpy(c->tx + c->tx_len, p, n);
	c->tx_len += n;
	return 0;
}

/*
 * Send what tx holds. Returns 0 (all sent, or would block), -1 on error.
 * Plain sockets here; TLS connections move their bytes in tls_step.
 */
static int
conn_flush(struct conn *c)
{
	while (c->tx_off < c->tx_len) {
		ssize_t n = io.send(c->fd, c->tx + c->tx_off, c->tx_len - c->tx_off,
		    MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			if (errno == EINTR)
				continue;
			return -1;
		}
		c->tx_off += (size_t)n;
		c->last_active = now_ms();
	}
	c->tx_off = c->tx_len = 0;
	return 0;
}

/* Read what is there into rx. 1 data read, 0 would block/full, -1 error/EOF. */
static int
conn_fill(struct conn *c)
{
	int got = 0;
	while (c->rx_len < c->rx_cap) {
		ssize_t n = io.recv(c->fd, c->rx + c->rx_len, c->rx_cap - c->rx_len,
		    MSG_DONTWAIT);
		if (n == 0) {
			c->eof = 1;
			return -1;
		}
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				break;
			return -1;
		}
		c->rx_len += (size_t)n;
		c->last_active = now_ms();
		got = 1;
		if ((size_t)n < 4096)
			break;
	}
	return got;
}

/* Set up body framing from a parsed head. */
static void
body_init(struct body *b, const struct apm_http_msg *m, int is_response)
{
	memset(b, 0, sizeof *b);
	if (is_response && (m->status < 200 || m->status == 204 ||
	    m->status == 304)) {
		b->mode = BODY_NONE; /* never a body, whatever the headers say */
		b->done = 1;
	} else if (m->chunked) {
		b->mode = BODY_CHUNKED;
	} else if (m->content_length > 0) {
		b->mode = BODY_LENGTH;
		b->left = (uint64_t)m->content_length;
	} else if (m->content_length < 0 && is_response) {
		b->mode = BODY_EOF;
	} else {
		b->mode = BODY_NONE;
		b->done = 1;
	}
}

/*
 * Decode what arrived after the decoded part: rx[have..len). Afterwards
 * rx[0..have) is decoded body and, once done, rx[have..len) is whatever
 * followed the body. 1 done, 0 more needed, -1 bad framing.
 */
static int
body_step(struct body *b, char *rx, size_t *rx_len, int eof)
{
	size_t raw = *rx_len - b->have;
	if (b->done)
		return 1;
	if (b->mode == BODY_CHUNKED) {
		size_t n = raw;
		ssize_t r = apm_chunk_decode(&b->ch, rx + b->have, &n);
		b->have += n;
		b->total += n;
		if (r == APM_MALFORMED)
			return -1;
		*rx_len = b->have + (r >= 0 ? (size_t)r : 0);
		if (r >= 0)
			b->done = 1;
	} else if (b->mode == BODY_LENGTH) {
		size_t take = (size_t)MIN((uint64_t)raw, b->left);
		b->have += take;
		b->total += take;
		b->left -= take;
		b->done = b->left == 0;
	} else if (b->mode == BODY_EOF) {
		b->have += raw;
		b->total += raw;
		b->done = eof;
	}
	return b->done;
}

/* Remove the first n bytes of rx (consumed body or head). */
static void
rx_consume(struct conn *c, size_t n)
{
	memmove(c->rx, c->rx + n, c->rx_len - n);
	c->rx_len -= n;
	if (c->body.have >= n)
		c->body.have -= n;
	else
		c->body.have = 0;
}

static const char *
status_text(int status)
{
	switch (status) {
	case 200: return "OK";
	case 202: return "Accepted";
	case 400: return "Bad Request";
	case 404: return "Not Found";
	case 405: return "Method Not Allowed";
	case 408: return "Request Timeout";
	case 413: return "Payload Too Large";
	case 415: return "Unsupported Media Type";
	case 422: return "Unprocessable Entity";
	case 431: return "Request Header Fields Too Large";
	case 501: return "Not Implemented";
	case 502: return "Bad Gateway";
	case 503: return "Service Unavailable";
	default: return "Status";
	}
}

/*
 * Parse the head of the message at the start of c's rx (a response when
 * is_response; h holds its headers) and set up its body's framing. Returns
 * the head's length, 0 when more bytes are needed, -1 when malformed
 * (m->error says how). *m points into rx: once it has been read,
 * msg_head_done removes the head.
 */
static int
msg_head(struct conn *c, int is_response, struct apm_http_msg *m,
    struct apm_http_header *h)
{
	int r = is_response ?
	    apm_http_parse_response(c->rx, c->rx_len, c->head_prev, m, h,
	    APM_HTTP_MAX_HEADERS) :
	    apm_http_parse_request(c->rx, c->rx_len, c->head_prev, m, h,
	    APM_HTTP_MAX_HEADERS);
	c->head_prev = c->rx_len;
	if (r == APM_NEED_MORE)
		return 0;
	if (r < 0)
		return -1;
	body_init(&c->body, m, is_response);
	return r;
}

/* The head (len bytes) has been read: remove it; the body follows. */
static void
msg_head_done(struct conn *c, int len)
{
	rx_consume(c, (size_t)len);
	c->head_done = 1;
	c->head_prev = 0;
}

/* The message is handled: its body leaves rx, and the next head may follow. */
static void
msg_next(struct conn *c)
{
	rx_consume(c, c->body.have);
	c->head_done = 0;
	c->head_prev = 0;
	memset(&c->body, 0, sizeof c->body);
}

/*
 * Put an answer in c's tx: the status line, Content-Length clen (-1: none),
 * the header lines in headers (each ending in CRLF), Connection: close when
 * close_after, then len bytes of body. 0, or -1 when it does not fit.
 */
static int
msg_answer(struct conn *c, int status, int64_t clen, const char *headers,
    const void *body, size_t len, int close_after)
{
	c->tx_len = c->tx_off = 0;
	c->close_after = close_after;
	char cl[48] = "";
	if (clen >= 0)
		snprintf(cl, sizeof cl, "Content-Length: %lld\r\n", (long long)clen);
	if (tx_printf(c, "HTTP/1.1 %d %s\r\n%s%s%s\r\n", status,
	    status_text(status), cl, headers, close_after ?
	    "Connection: close\r\n" : "") < 0)
		return -1;
	return len ? tx_put(c, body, len) : 0;
}

/* == 12. DER, X.509 checks and trust anchors ==
 * What BearSSL's X.509 engine needs from us: trust anchors from PEM (the
 * system bundle indexed at load and decoded on demand; a CA file, PEM
 * variable or ACM certificate decoded at once), and three wrappers of its
 * engine: no verification, an IP-address check, the lazy bundle lookup. A
 * small DER reader serves them. Trust anchors load after the first /next,
 * never for http.
 */

/* An X.509 "engine" for VERIFY_SERVER_CERT=false: takes the server's key
 * from its certificate and checks nothing else. */
struct tls_noverify {
	const br_x509_class *vtable;
	br_x509_decoder_context dc;
	unsigned certs;
};

/* For an IP-address URL: the minimal engine checks the chain, and this
 * wrapper checks that the server certificate names that address in an
 * iPAddress subjectAltName (BearSSL matches DNS names only). */
struct tls_ipcheck {
	const br_x509_class *vtable;
	const br_x509_class **inner;
	unsigned char ip[16];
	size_t iplen;
	unsigned char der[8192];        /* the server's certificate */
	size_t derlen;
	unsigned certs;
	int overflow;
};

/*
 * The system bundle's trust anchors are decoded on demand: tls_load indexes
 * each certificate by a hash of its subject (a short prefix of it decoded),
 * and this wrapper of the minimal engine holds the server's chain until its
 * end, then decodes the bundle certificates named as an issuer in it, and
 * only then runs the chain through the minimal engine.
 */
/* A growing byte array (trust anchors being decoded, a held chain). */
struct bytes {
	unsigned char *p;
	size_t len, cap;
	int oom;                /* an append failed (or was refused) */
};

struct tls_lazy {
	const br_x509_class *vtable;
	br_x509_minimal_context *inner;
	const char *name;
	struct bytes chain;     /* each certificate: 4-byte length, DER */
};

struct tls_slot {
	br_ssl_client_context cc;
	br_x509_minimal_context xc;
	struct tls_noverify nv;
	struct tls_ipcheck ipc;
	struct tls_lazy lz;
	unsigned char iobuf[BR_SSL_BUFSIZE_BIDI];
};

static struct {
	br_x509_trust_anchor *ta;
	size_t nta, cap;
	struct tls_idx {        /* a bundle certificate not decoded yet */
		off_t off;
		uint32_t len, hash;
	} *idx;
	size_t nidx, idxcap;
	const char *bundle;     /* the indexed bundle's path */
	int loaded;
	int last_err;           /* last handshake error logged, to log once */
	struct tls_slot *slots;
} tls;

/* One DER element. */
struct der {
	unsigned char tag;
	const unsigned char *p;         /* contents */
	size_t len;
	const unsigned char *start;     /* the whole element, tag included */
	size_t total;
};

/* Read the element at *cur (not past end) and move past it. 0 or -1. */
static int
der_next(const unsigned char **cur, const unsigned char *end, struct der *e)
{
	const unsigned char *s = *cur;
	if (end - s < 2 || (*s & 0x1f) == 0x1f)
		return -1; /* high tag numbers do not occur in certificates */
	e->start = s;
	e->tag = *s++;
	size_t len = *s++;
	if (len & 0x80) {
		int k = (int)(len & 0x7f);
		if (k == 0 || k > 4 || end - s < k)
			return -1;
		for (len = 0; k-- > 0;)
			len = len << 8 | *s++;
	}
	if ((size_t)(end - s) < len)
		return -1;
	e->p = s;
	e->len = len;
	*cur = s + len;
	e->total = (size_t)(*cur - e->start);
	return 0;
}

/* The value of extension OID oid (DER, without tag and length) in the
 * extensions [3] of a tbsCertificate, or {NULL, 0}. */
static struct der
der_extension(struct der exts, const unsigned char *oid, size_t oidlen)
{
	struct der none = { 0 }, seq, ext, id, v;
	const unsigned char *c = exts.p, *end = exts.p + exts.len;
	if (der_next(&c, end, &seq) || seq.tag != 0x30)
		return none;
	for (c = seq.p; c < seq.p + seq.len;) {
		if (der_next(&c, seq.p + seq.len, &ext) || ext.tag != 0x30)
			return none;
		const unsigned char *x = ext.p, *xe = ext.p + ext.len;
		if (der_next(&x, xe, &id) || id.tag != 0x06)
			return none;
		if (id.len != oidlen || memcmp(id.p, oid, oidlen) != 0)
			continue;
		if (der_next(&x, xe, &v))
			return none;
		if (v.tag == 0x01 && der_next(&x, xe, &v)) /* critical flag */
			return none;
		return v.tag == 0x04 ? v : none;
	}
	return none;
}

/* The parts of a certificate a trust anchor or a name check needs. */
struct cert_parts {
	struct der issuer, subject;     /* Names, as encoded */
	struct der spki_alg, spki_params, spki_key; /* key without unused-bits byte */
	struct der exts;                /* [3] extensions, tag 0 when absent */
};

static int
cert_parse(const unsigned char *der, size_t len, struct cert_parts *cp)
{
	struct der cert, tbs, e, validity, spki, alg, bits;
	const unsigned char *c = der, *end = der + len;
	memset(cp, 0, sizeof *cp);
	if (der_next(&c, end, &cert) || cert.tag != 0x30)
		return -1;
	c = cert.p;
	if (der_next(&c, cert.p + cert.len, &tbs) || tbs.tag != 0x30)
		return -1;
	c = tbs.p;
	end = tbs.p + tbs.len;
	if (der_next(&c, end, &e) || (e.tag == 0xa0 && der_next(&c, end, &e)) ||
	    e.tag != 0x02 || der_next(&c, end, &e) || /* signature algorithm */
	    der_next(&c, end, &cp->issuer) || der_next(&c, end, &validity) ||
	    der_next(&c, end, &cp->subject) || der_next(&c, end, &spki) ||
	    cp->subject.tag != 0x30 || spki.tag != 0x30)
		return -1;
	while (c < end) {
		if (der_next(&c, end, &e))
			return -1;
		if (e.tag == 0xa3)
			cp->exts = e;
	}
	const unsigned char *k = spki.p, *ke = spki.p + spki.len;
	if (der_next(&k, ke, &alg) || alg.tag != 0x30 ||
	    der_next(&k, ke, &bits) || bits.tag != 0x03 || bits.len < 2 ||
	    bits.p[0] != 0)
		return -1;
	const unsigned char *a = alg.p, *ae = alg.p + alg.len;
	if (der_next(&a, ae, &cp->spki_alg) || cp->spki_alg.tag != 0x06)
		return -1;
	if (a < ae && der_next(&a, ae, &cp->spki_params))
		return -1;
	cp->spki_key = bits;
	cp->spki_key.p++;
	cp->spki_key.len--;
	return 0;
}

/* Does the certificate's subjectAltName hold this iPAddress? */
static int
der_san_has_ip(const unsigned char *der, size_t len, const unsigned char *ip,
    size_t iplen)
{
	static const unsigned char san_oid[] = { 0x55, 0x1d, 0x11 };
	struct cert_parts cp;
	struct der names, name;
	if (cert_parse(der, len, &cp) < 0 || cp.exts.tag != 0xa3)
		return 0;
	struct der v = der_extension(cp.exts, san_oid, sizeof san_oid);
	const unsigned char *c = v.p;
	if (!v.p || der_next(&c, v.p + v.len, &names) || names.tag != 0x30)
		return 0;
	for (c = names.p; c < names.p + names.len;) {
		if (der_next(&c, names.p + names.len, &name))
			return 0;
		if (name.tag == 0x87 && name.len == iplen &&
		    memcmp(name.p, ip, iplen) == 0)
			return 1;
	}
	return 0;
}

/* Unsigned big-endian integer contents without leading zero bytes. */
static void
der_uint(struct der *i)
{
	while (i->len > 1 && i->p[0] == 0) {
		i->p++;
		i->len--;
	}
}

static void
bytes_append(void *ctx, const void *src, size_t len)
{
	struct bytes *b = ctx;
	if (b->len + len > b->cap) {
		size_t cap = MAX(b->cap * 2, b->len + len + 256);
		unsigned char *p = realloc(b->p, cap);
		if (!p) {
			b->oom = 1;
			return;
		}
		b->p = p;
		b->cap = cap;
	}
	memcpy(b->p + b->len, src, len);
	b->len += len;
}

static unsigned char *
dup_bytes(const unsigned char *p, size_t n)
{
	unsigned char *d = malloc(n ? n : 1);
	if (d)
		memcpy(d, p, n);
	return d;
}

/* Append a trust anchor, copying what it points to. 0 or -1. */
static int
tls_anchor_push(const unsigned char *dn, size_t dnlen, int ca,
    const br_x509_pkey *pk)
{
	if (tls.nta == tls.cap) {
		size_t cap = tls.cap ? tls.cap * 2 : 64;
		br_x509_trust_anchor *ta = realloc(tls.ta, cap * sizeof *ta);
		if (!ta)
			return -1;
		tls.ta = ta;
		tls.cap = cap;
	}
	br_x509_trust_anchor *ta = &tls.ta[tls.nta];
	memset(ta, 0, sizeof *ta);
	ta->dn.data = dup_bytes(dn, dnlen);
	ta->dn.len = dnlen;
	ta->flags = ca ? BR_X509_TA_CA : 0;
	ta->pkey.key_type = pk->key_type;
	if (pk->key_type == BR_KEYTYPE_RSA) {
		ta->pkey.key.rsa.n = dup_bytes(pk->key.rsa.n, pk->key.rsa.nlen);
		ta->pkey.key.rsa.nlen = pk->key.rsa.nlen;
		ta->pkey.key.rsa.e = dup_bytes(pk->key.rsa.e, pk->key.rsa.elen);
		ta->pkey.key.rsa.elen = pk->key.rsa.elen;
	} else if (pk->key_type == BR_KEYTYPE_EC) {
		ta->pkey.key.ec.curve = pk->key.ec.curve;
		ta->pkey.key.ec.q = dup_bytes(pk->key.ec.q, pk->key.ec.qlen);
		ta->pkey.key.ec.qlen = pk->key.ec.qlen;
	} else {
		return -1;
	}
	tls.nta++;
	return 0;
}

/*
 * A trust anchor straight from the DER: subject, key, basicConstraints cA.
 * About fifty times faster than BearSSL's general decoder (an interpreted
 * machine), which stays the fallback for anything this does not handle.
 */
static int
tls_anchor_fast(const unsigned char *der, size_t len)
{
	static const unsigned char rsa_oid[] = { 0x2a, 0x86, 0x48, 0x86, 0xf7,
		0x0d, 0x01, 0x01, 0x01 };
	static const unsigned char ec_oid[] = { 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02,
		0x01 };
	static const struct { unsigned char oid[8]; size_t len; int curve; } curves[] = {
		{ { 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 }, 8, BR_EC_secp256r1 },
		{ { 0x2b, 0x81, 0x04, 0x00, 0x22 }, 5, BR_EC_secp384r1 },
		{ { 0x2b, 0x81, 0x04, 0x00, 0x23 }, 5, BR_EC_secp521r1 },
	};
	static const unsigned char bc_oid[] = { 0x55, 0x1d, 0x13 };
	struct cert_parts cp;
	br_x509_pkey pk;
	if (cert_parse(der, len, &cp) < 0)
		return -1;
	memset(&pk, 0, sizeof pk);
	struct der alg = cp.spki_alg, par = cp.spki_params;
	if (alg.len == sizeof rsa_oid && memcmp(alg.p, rsa_oid, alg.len) == 0) {
		struct der seq, n, e;
		const unsigned char *c = cp.spki_key.p;
		const unsigned char *end = c + cp.spki_key.len;
		if (der_next(&c, end, &seq) || seq.tag != 0x30)
			return -1;
		c = seq.p;
		if (der_next(&c, seq.p + seq.len, &n) || n.tag != 0x02 ||
		    der_next(&c, seq.p + seq.len, &e) || e.tag != 0x02)
			return -1;
		der_uint(&n);
		der_uint(&e);
		pk.key_type = BR_KEYTYPE_RSA;
		pk.key.rsa.n = (unsigned char *)n.p;
		pk.key.rsa.nlen = n.len;
		pk.key.rsa.e = (unsigned char *)e.p;
		pk.key.rsa.elen = e.len;
	} else if (alg.len == sizeof ec_oid && memcmp(alg.p, ec_oid, alg.len) == 0 &&
	    par.tag == 0x06) {
		pk.key_type = BR_KEYTYPE_EC;
		for (size_t i = 0; i < sizeof curves / sizeof *curves; i++)
			if (par.len == curves[i].len &&
			    memcmp(par.p, curves[i].oid, par.len) == 0)
				pk.key.ec.curve = curves[i].curve;
		if (!pk.key.ec.curve)
			return -1;
		pk.key.ec.q = (unsigned char *)cp.spki_key.p;
		pk.key.ec.qlen = cp.spki_key.len;
	} else {
		return -1;
	}
	int ca = 0;
	if (cp.exts.tag == 0xa3) {
		struct der v = der_extension(cp.exts, bc_oid, sizeof bc_oid), bc, f;
		const unsigned char *c = v.p;
		if (v.p && der_next(&c, v.p + v.len, &bc) == 0 && bc.tag == 0x30) {
			c = bc.p;
			ca = bc.len > 0 && der_next(&c, bc.p + bc.len, &f) == 0 &&
			    f.tag == 0x01 && f.len == 1 && f.p[0] != 0;
		}
	}
	return tls_anchor_push(cp.subject.start, cp.subject.total, ca, &pk);
}

/* Decode one DER certificate into a trust anchor. 0 or -1. */
static int
tls_add_anchor(const unsigned char *der, size_t len)
{
	if (tls_anchor_fast(der, len) == 0)
		return 0;
	br_x509_decoder_context dc;
	struct bytes dn = { 0 };
	br_x509_decoder_init(&dc, bytes_append, &dn);
	br_x509_decoder_push(&dc, der, len);
	const br_x509_pkey *pk = br_x509_decoder_get_pkey(&dc);
	int r = -1;
	if (pk && !br_x509_decoder_last_error(&dc) && !dn.oom)
		r = tls_anchor_push(dn.p, dn.len, br_x509_decoder_isCA(&dc), pk);
	free(dn.p);
	return r;
}

/* memmem for a marker that starts with '-' (base64 has none): memchr is
 * several times faster than musl's memmem on a 200 KB bundle. */
static const char *
pem_marker(const char *p, size_t n, const char *m, size_t mlen)
{
	const char *end = p + n;
	while ((p = memchr(p, '-', (size_t)(end - p))) != NULL) {
		if ((size_t)(end - p) < mlen)
			return NULL;
		if (memcmp(p, m, mlen) == 0)
			return p;
		p++;
	}
	return NULL;
}

/* 32-bit FNV-1a of a DN: the bundle index's key. */
static uint32_t
dn_hash(const unsigned char *p, size_t n)
{
	uint32_t h = 2166136261u;
	while (n--)
		h = (h ^ *p++) * 16777619u;
	return h;
}

/*
 * Index a bundle certificate (its PEM block at file offset off) by its
 * subject, decoding only the first 640 base64 digits (where the subject
 * ends in all but odd certificates). -1: not indexed (decode it whole).
 */
static int
tls_index_block(const char *body, size_t blen, off_t off, size_t len)
{
	unsigned char der[480];
	int n = apm_base64_decode(body, MIN(blen, 640), der, sizeof der);
	const unsigned char *c = der, *end = der + (n > 0 ? n : 0);
	struct der e, name;
	for (int i = 0; i < 2; i++) { /* Certificate, tbsCertificate headers */
		if (end - c < 5 || *c != 0x30 || (c[1] & 0x80 && c[1] != 0x81 &&
		    c[1] != 0x82 && c[1] != 0x83))
			return -1;
		c += 2 + (c[1] & 0x80 ? (c[1] & 0x7f) : 0);
	}
	if (der_next(&c, end, &e) || (e.tag == 0xa0 && der_next(&c, end, &e)) ||
	    e.tag != 0x02 || der_next(&c, end, &e) || der_next(&c, end, &e) ||
	    der_next(&c, end, &e) || der_next(&c, end, &name) || name.tag != 0x30)
		return -1;
	if (tls.nidx == tls.idxcap) {
		size_t cap = tls.idxcap ? tls.idxcap * 2 : 256;
		struct tls_idx *x = realloc(tls.idx, cap * sizeof *x);
		if (!x)
			return -1;
		tls.idx = x;
		tls.idxcap = cap;
	}
	tls.idx[tls.nidx].off = off;
	tls.idx[tls.nidx].len = (uint32_t)len;
	tls.idx[tls.nidx++].hash = dn_hash(name.start, name.total);
	return 0;
}

/*
 * Add every CERTIFICATE of a PEM text. Returns how many were added.
 * Our own splitter and base64: BearSSL's PEM decoder is an interpreted
 * state machine that spends ~1,400 instructions a byte (87 ms for the
 * Debian bundle); this one decodes the same bundle in well under 1 ms.
 */
/*
 * Add the certificates of the whole PEM blocks in pem[0..len) as trust
 * anchors (counted in *added and *bad), or with lazy, index them (base:
 * the file offset of pem[0]). Returns how many bytes were used up: up to
 * the end of the last whole block, or, when a block has begun and not
 * ended, up to its start.
 */
static size_t
tls_pem_scan(const char *pem, size_t len, size_t *added, size_t *bad,
    off_t base, int lazy)
{
	static const char begin[] = "-----BEGIN CERTIFICATE-----";
	static const char end[] = "-----END CERTIFICATE-----";
	static unsigned char der[16384];
	size_t pos = 0;
	while (pos < len) {
		const char *b = pem_marker(pem + pos, len - pos, begin, sizeof begin - 1);
		if (!b) /* keep what could be the start of a BEGIN line */
			return len > sizeof begin ? MAX(pos, len - sizeof begin) : pos;
		size_t body = (size_t)(b - pem) + sizeof begin - 1;
		const char *e = pem_marker(pem + body, len - body, end, sizeof end - 1);
		if (!e)
			return (size_t)(b - pem);
		size_t blen = (size_t)(e - pem) - body;
		pos = (size_t)(e - pem) + sizeof end - 1;
		if (lazy && tls_index_block(pem + body, blen, base + (b - pem),
		    pos - (size_t)(b - pem)) == 0) {
			(*added)++;
			continue;
		}
		int n = apm_base64_decode(pem + body, blen, der, sizeof der);
		if (n > 0 && tls_add_anchor(der, (size_t)n) == 0)
			(*added)++;
		else
			(*bad)++;
	}
	return pos;
}

/* tls_pem_scan, every certificate decoded at once. */
static size_t
tls_pem_blocks(const char *pem, size_t len, size_t *added, size_t *bad)
{
	return tls_pem_scan(pem, len, added, bad, 0, 0);
}

/*
 * Decode the bundle certificates whose subject hashes like this issuer
 * (a DN as encoded) into trust anchors, each once.
 */
static void
tls_bundle_fetch(const struct der *issuer)
{
	uint32_t h = dn_hash(issuer->start, issuer->total);
	for (size_t i = 0; i < tls.nidx; i++) {
		struct tls_idx *x = &tls.idx[i];
		if (x->hash != h || x->len == 0)
			continue;
		char *pem = malloc(x->len);
		int fd = pem ? open(tls.bundle, O_RDONLY | O_CLOEXEC) : -1;
		size_t added = 0, bad = 0;
		if (fd >= 0 && pread(fd, pem, x->len, x->off) == (ssize_t)x->len)
			tls_pem_blocks(pem, x->len, &added, &bad);
		if (fd >= 0)
			close(fd);
		free(pem);
		if (!added)
			log_warn("%s: a certificate could not be decoded", tls.bundle);
		x->len = 0; /* done */
	}
}

/* Trust anchors from PEM text; returns how many were added. */
static size_t
tls_load_pem(const char *pem, size_t len, const char *what)
{
	size_t added = 0, bad = 0;
	size_t used = tls_pem_blocks(pem, len, &added, &bad);
	if (memmem(pem + used, len - used, "-----BEGIN CERTIFICATE-----", 27))
		bad++; /* a block that never ends */
	if (bad)
		log_warn("%s: %zu certificates could not be decoded", what, bad);
	return added;
}

/*
 * Trust anchors from a PEM file, read in pieces: a CA bundle (some 200 KB)
 * is never held whole, so it adds little to the peak RSS. lazy: index the
 * certificates (tls_index_block), decoded when a chain names them.
 */
static void
tls_load_file_idx(const char *path, const char *what, int lazy)
{
	enum { CAP = 32768 }; /* more than any one certificate's PEM */
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	char *buf = fd >= 0 ? malloc(CAP) : NULL;
	if (!buf) {
		log_error("%s %s cannot be read: %s", what, path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return;
	}
	size_t have = 0, added = 0, bad = 0;
	off_t base = 0; /* file offset of buf[0] */
	ssize_t n;
	while ((n = read(fd, buf + have, CAP - have)) > 0) {
		have += (size_t)n;
		size_t used = tls_pem_scan(buf, have, &added, &bad, base, lazy);
		if (used == 0 && have == CAP) { /* one block over CAP: skip it */
			bad++;
			used = have;
		}
		memmove(buf, buf + used, have - used);
		have -= used;
		base += (off_t)used;
	}
	if (n < 0)
		log_error("%s %s cannot be read: %s", what, path, strerror(errno));
	if (memmem(buf, have, "-----BEGIN CERTIFICATE-----", 27))
		bad++; /* cut short */
	close(fd);
	free(buf);
	if (bad)
		log_warn("%s: %zu certificates could not be decoded", path, bad);
	log_debug("%zu trust anchors from %s", added, path);
	if (added == 0 && n >= 0)
		log_error("%s %s holds no usable certificate", what, path);
}

/* Trust anchors from a PEM file, all decoded at once. */
static void
tls_load_file(const char *path, const char *what)
{
	tls_load_file_idx(path, what, 0);
}

/* PEM text from the environment: a literal backslash-n stands for a newline. */
static void
tls_load_env_pem(const char *v, const char *what)
{
	size_t n = strlen(v), o = 0;
	char *pem = malloc(n + 1);
	if (!pem)
		return;
	for (size_t i = 0; i < n; i++) {
		if (v[i] == '\\' && i + 1 < n && v[i + 1] == 'n') {
			pem[o++] = '\n';
			i++;
		} else {
			pem[o++] = v[i];
		}
	}
	if (tls_load_pem(pem, o, what) == 0)
		log_error("%s holds no usable certificate", what);
	free(pem);
}

/* Load the trust anchors once: system bundle, CA file, CA PEM. */
static void
tls_load(void)
{
	static const char *const bundles[] = {
		"/etc/pki/tls/certs/ca-bundle.crt",
		"/etc/ssl/certs/ca-certificates.crt",
	};
	if (tls.loaded)
		return;
	tls.loaded = 1;
	if (!g.cfg.verify_cert && !g.cfg.from_aws)
		return; /* AWS endpoints are verified whatever the APM setting */
	for (size_t i = 0; i < sizeof bundles / sizeof *bundles; i++)
		if (access(bundles[i], R_OK) == 0) {
			tls.bundle = bundles[i];
			tls_load_file_idx(bundles[i], "CA bundle", 1);
			break;
		}
	if (g.cfg.ca_file && *g.cfg.ca_file)
		tls_load_file(g.cfg.ca_file, "ELASTIC_APM_SERVER_CA_CERT_FILE");
	if (g.cfg.ca_pem && *g.cfg.ca_pem)
		tls_load_env_pem(g.cfg.ca_pem, "ELASTIC_APM_LAMBDA_SERVER_CA_CERT_PEM");
	if (tls.nta == 0 && tls.nidx == 0)
		log_error("no trust anchors (no CA bundle in /etc/pki/tls/certs or "
		    "/etc/ssl/certs, no ELASTIC_APM_SERVER_CA_CERT_FILE or "
		    "ELASTIC_APM_LAMBDA_SERVER_CA_CERT_PEM): the https APM server "
		    "cannot be verified and nothing will be sent to it");
}

static void
nv_start_chain(const br_x509_class **ctx, const char *server_name)
{
	struct tls_noverify *nv = (struct tls_noverify *)ctx;
	(void)server_name;
	nv->certs = 0;
}

static void
nv_start_cert(const br_x509_class **ctx, uint32_t length)
{
	struct tls_noverify *nv = (struct tls_noverify *)ctx;
	(void)length;
	if (nv->certs == 0)
		br_x509_decoder_init(&nv->dc, NULL, NULL);
}

static void
nv_append(const br_x509_class **ctx, const unsigned char *buf, size_t len)
{
	struct tls_noverify *nv = (struct tls_noverify *)ctx;
	if (nv->certs == 0)
		br_x509_decoder_push(&nv->dc, buf, len);
}

static void
nv_end_cert(const br_x509_class **ctx)
{
	((struct tls_noverify *)ctx)->certs++;
}

static unsigned
nv_end_chain(const br_x509_class **ctx)
{
	struct tls_noverify *nv = (struct tls_noverify *)ctx;
	if (nv->certs == 0)
		return BR_ERR_X509_EMPTY_CHAIN;
	int err = br_x509_decoder_last_error(&nv->dc);
	return err ? (unsigned)err : 0;
}

static const br_x509_pkey *
nv_get_pkey(const br_x509_class *const *ctx, unsigned *usages)
{
	struct tls_noverify *nv = (struct tls_noverify *)(void *)ctx;
	if (usages)
		*usages = BR_KEYTYPE_KEYX | BR_KEYTYPE_SIGN;
	return br_x509_decoder_get_pkey(&nv->dc);
}

static const br_x509_class tls_noverify_vtable = {
	sizeof(struct tls_noverify), nv_start_chain, nv_start_cert, nv_append,
	nv_end_cert, nv_end_chain, nv_get_pkey,
};

static void
ipc_start_chain(const br_x509_class **ctx, const char *server_name)
{
	struct tls_ipcheck *ic = (struct tls_ipcheck *)ctx;
	(void)server_name;
	ic->certs = 0;
	ic->derlen = 0;
	ic->overflow = 0;
	(*ic->inner)->start_chain(ic->inner, NULL);
}

static void
ipc_start_cert(const br_x509_class **ctx, uint32_t length)
{
	struct tls_ipcheck *ic = (struct tls_ipcheck *)ctx;
	(*ic->inner)->start_cert(ic->inner, length);
}

static void
ipc_append(const br_x509_class **ctx, const unsigned char *buf, size_t len)
{
	struct tls_ipcheck *ic = (struct tls_ipcheck *)ctx;
	if (ic->certs == 0) {
		if (ic->derlen + len > sizeof ic->der)
			ic->overflow = 1;
		else
			memcpy(ic->der + ic->derlen, buf, len);
		ic->derlen += len;
	}
	(*ic->inner)->append(ic->inner, buf, len);
}

static void
ipc_end_cert(const br_x509_class **ctx)
{
	struct tls_ipcheck *ic = (struct tls_ipcheck *)ctx;
	ic->certs++;
	(*ic->inner)->end_cert(ic->inner);
}

static unsigned
ipc_end_chain(const br_x509_class **ctx)
{
	struct tls_ipcheck *ic = (struct tls_ipcheck *)ctx;
	unsigned r = (*ic->inner)->end_chain(ic->inner);
	if (r)
		return r;
	if (ic->overflow || !der_san_has_ip(ic->der, ic->derlen, ic->ip, ic->iplen))
		return BR_ERR_X509_BAD_SERVER_NAME;
	return 0;
}

static const br_x509_pkey *
ipc_get_pkey(const br_x509_class *const *ctx, unsigned *usages)
{
	const struct tls_ipcheck *ic = (const struct tls_ipcheck *)(const void *)ctx;
	return (*ic->inner)->get_pkey(ic->inner, usages);
}

static const br_x509_class tls_ipcheck_vtable = {
	sizeof(struct tls_ipcheck), ipc_start_chain, ipc_start_cert, ipc_append,
	ipc_end_cert, ipc_end_chain, ipc_get_pkey,
};

static void
lz_start_chain(const br_x509_class **ctx, const char *server_name)
{
	struct tls_lazy *lz = (struct tls_lazy *)ctx;
	lz->name = server_name;
	lz->chain.len = 0;
	lz->chain.oom = 0;
}

/* Append to the held chain: at most 64 KiB, more fails the chain. */
static void
lz_put(struct tls_lazy *lz, const void *p, size_t n)
{
	if (lz->chain.len + n > 65536)
		lz->chain.oom = 1;
	if (!lz->chain.oom)
		bytes_append(&lz->chain, p, n);
}

static void
lz_start_cert(const br_x509_class **ctx, uint32_t length)
{
	unsigned char b[4] = { (unsigned char)(length >> 24),
		(unsigned char)(length >> 16), (unsigned char)(length >> 8),
		(unsigned char)length };
	lz_put((struct tls_lazy *)ctx, b, 4);
}

static void
lz_append(const br_x509_class **ctx, const unsigned char *buf, size_t len)
{
	lz_put((struct tls_lazy *)ctx, buf, len);
}

static void
lz_end_cert(const br_x509_class **ctx)
{
	(void)ctx;
}

/* The certificate of the held chain at *pos (its DER in *der, *n), and
 * *pos moved past it; 0 at the end. */
static int
lz_next_cert(const struct bytes *ch, size_t *pos, const unsigned char **der,
    size_t *n)
{
	if (*pos + 4 > ch->len)
		return 0;
	const unsigned char *p = ch->p + *pos;
	*n = MIN((size_t)p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3],
	    ch->len - *pos - 4);
	*der = p + 4;
	*pos += 4 + *n;
	return 1;
}

/* Decode the anchors the chain names as issuers, then check it. */
static unsigned
lz_end_chain(const br_x509_class **ctx)
{
	struct tls_lazy *lz = (struct tls_lazy *)ctx;
	const br_x509_class **in = &lz->inner->vtable;
	unsigned r = BR_ERR_X509_LIMIT_EXCEEDED;
	const unsigned char *der;
	size_t pos, n;
	if (!lz->chain.oom) {
		for (pos = 0; lz_next_cert(&lz->chain, &pos, &der, &n);) {
			struct cert_parts cp;
			if (cert_parse(der, n, &cp) == 0)
				tls_bundle_fetch(&cp.issuer);
		}
		lz->inner->trust_anchors = tls.ta;
		lz->inner->trust_anchors_num = tls.nta;
		(*in)->start_chain(in, lz->name);
		for (pos = 0; lz_next_cert(&lz->chain, &pos, &der, &n);) {
			(*in)->start_cert(in, (uint32_t)n);
			(*in)->append(in, der, n);
			(*in)->end_cert(in);
		}
		r = (*in)->end_chain(in);
	}
	free(lz->chain.p);
	memset(&lz->chain, 0, sizeof lz->chain);
	return r;
}

static const br_x509_pkey *
lz_get_pkey(const br_x509_class *const *ctx, unsigned *usages)
{
	const struct tls_lazy *lz = (const struct tls_lazy *)(const void *)ctx;
	const br_x509_class **in = &lz->inner->vtable;
	return (*in)->get_pkey(in, usages);
}

static const br_x509_class tls_lazy_vtable = {
	sizeof(struct tls_lazy), lz_start_chain, lz_start_cert, lz_append,
	lz_end_cert, lz_end_chain, lz_get_pkey,
};

/* == 13. TLS engine ==
 * BearSSL engines driven by the poll loop: the engine says which way records
 * must move (SENDREC, RECVREC) and we move them with non-blocking send/recv;
 * application bytes move between the engine and the connection's rx/tx.
 */

static const char *
tls_reason(int err)
{
	switch (err) {
	case BR_ERR_X509_NOT_TRUSTED:
		return "the server certificate is not signed by a trusted CA "
		    "(unknown CA)";
	case BR_ERR_X509_BAD_SERVER_NAME:
		return "the server certificate does not match the host name";
	case BR_ERR_X509_EXPIRED:
		return "the server certificate has expired or is not yet valid";
	case BR_ERR_X509_NOT_CA:
		return "a certificate in the chain is not a CA";
	case BR_ERR_X509_BAD_SIGNATURE:
		return "a certificate signature is invalid";
	case BR_ERR_X509_WEAK_PUBLIC_KEY:
		return "the server key is too weak";
	case BR_ERR_BAD_VERSION:
	case BR_ERR_UNSUPPORTED_VERSION:
		return "the server does not speak TLS 1.2";
	case BR_ERR_BAD_CIPHER_SUITE:
		return "no cipher suite in common";
	case BR_ERR_IO:
		return "connection failed during the TLS exchange";
	default:
		if (err >= BR_ERR_RECV_FATAL_ALERT && err < BR_ERR_SEND_FATAL_ALERT)
			return "the server sent a fatal TLS alert";
		if (err >= BR_ERR_SEND_FATAL_ALERT)
			return "we sent a fatal TLS alert (bad server handshake)";
		return "TLS failure";
	}
}

/*
 * A TLS 1.2 client with forward-secret AEAD suites only (what Elastic Cloud
 * and current servers offer); br_ssl_client_init_full would link every
 * legacy algorithm and add about 40 KB to the binary.
 */
static void
tls_client_init(br_ssl_client_context *cc, br_x509_minimal_context *xc)
{
	static const uint16_t suites[] = {
		BR_TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
		BR_TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
		BR_TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
		BR_TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
		BR_TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
		BR_TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
	};
	static const struct { int id; const br_hash_class *impl; } hashes[] = {
		{ br_sha1_ID, &br_sha1_vtable }, { br_sha256_ID, &br_sha256_vtable },
		{ br_sha384_ID, &br_sha384_vtable }, { br_sha512_ID, &br_sha512_vtable },
	};
	br_ssl_engine_context *e = &cc->eng;
	br_ssl_client_zero(cc);
	br_ssl_engine_set_versions(e, BR_TLS12, BR_TLS12);
	br_x509_minimal_init(xc, &br_sha256_vtable, tls.ta, tls.nta);
	br_ssl_engine_set_suites(e, suites, sizeof suites / sizeof *suites);
	br_ssl_engine_set_default_rsavrfy(e);
	br_ssl_engine_set_default_ecdsa(e);
	br_x509_minimal_set_rsa(xc, br_ssl_engine_get_rsavrfy(e));
	br_x509_minimal_set_ecdsa(xc, br_ssl_engine_get_ec(e),
	    br_ssl_engine_get_ecdsa(e));
	for (size_t i = 0; i < sizeof hashes / sizeof *hashes; i++) {
		br_ssl_engine_set_hash(e, hashes[i].id, hashes[i].impl);
		br_x509_minimal_set_hash(xc, hashes[i].id, hashes[i].impl);
	}
	br_ssl_engine_set_prf_sha256(e, &br_tls12_sha256_prf);
	br_ssl_engine_set_prf_sha384(e, &br_tls12_sha384_prf);
	br_ssl_engine_set_default_aes_gcm(e);
	br_ssl_engine_set_default_chapol(e);
	br_ssl_engine_set_x509(e, &xc->vtable);
}

static int
host_is_ip(const char *h)
{
	unsigned char b[16];
	return inet_pton(AF_INET, h, b) == 1 || inet_pton(AF_INET6, h, b) == 1;
}

/* Set up the engine of slot u for a new connection (client hello pending). */
static int
tls_start(struct upstream *u)
{
	struct tls_slot *s = &tls.slots[u - g.up];
	unsigned char seed[32];
	tls_load();
	tls_client_init(&s->cc, &s->xc);
	br_ssl_engine_set_buffer(&s->cc.eng, s->iobuf, sizeof s->iobuf, 1);
	const br_x509_class **x509 = &s->xc.vtable;
	if (tls.nidx) {
		free(s->lz.chain.p); /* a handshake cut short */
		memset(&s->lz, 0, sizeof s->lz);
		s->lz.vtable = &tls_lazy_vtable;
		s->lz.inner = &s->xc;
		x509 = &s->lz.vtable;
		br_ssl_engine_set_x509(&s->cc.eng, x509);
	}
	if (!u->ep->verify) {
		s->nv.vtable = &tls_noverify_vtable;
		br_ssl_engine_set_x509(&s->cc.eng, &s->nv.vtable);
	}
	if (getrandom(seed, sizeof seed, 0) == (ssize_t)sizeof seed)
		br_ssl_engine_inject_entropy(&s->cc.eng, seed, sizeof seed);
	/* BearSSL checks DNS names; an IP address is checked by the wrapper.
	 * No SNI is sent for an address. */
	const char *host = u->ep->url.host;
	const char *name = host;
	if (host_is_ip(host)) {
		name = NULL;
		if (u->ep->verify) {
			struct tls_ipcheck *ic = &s->ipc;
			ic->vtable = &tls_ipcheck_vtable;
			ic->inner = x509;
			ic->iplen = inet_pton(AF_INET, host, ic->ip) == 1 ? 4 : 16;
			if (ic->iplen == 16)
				inet_pton(AF_INET6, host, ic->ip);
			br_ssl_engine_set_x509(&s->cc.eng, &ic->vtable);
		}
	}
	if (u->ep->have_session)
		br_ssl_engine_set_session_parameters(&s->cc.eng, &u->ep->session);
	if (!br_ssl_client_reset(&s->cc, name, u->ep->have_session)) {
		log_error("TLS engine reset failed (%d)",
		    br_ssl_engine_last_error(&s->cc.eng));
		return -1;
	}
	u->c.tls = &s->cc;
	return 0;
}

/* The engine closed: a clean close_notify is an EOF (NULL), anything else
 * a failure, whose reason is returned. */
static const char *
tls_closed(struct upstream *u)
{
	static char why[200];
	int err = br_ssl_engine_last_error(&u->c.tls->eng);
	if (err == BR_ERR_OK && u->state != UP_HANDSHAKE) {
		u->c.eof = 1;
		return NULL;
	}
	snprintf(why, sizeof why, "TLS: %s (BearSSL error %d)", tls_reason(err), err);
	if (err != tls.last_err)
		log_error("cannot connect to %s: %s", u->ep->what, why);
	tls.last_err = err;
	return why;
}

/*
 * Move records and application bytes as far as they go without blocking.
 * NULL, or why the connection failed (the caller tears it down).
 */
static const char *
tls_step(struct upstream *u)
{
	struct conn *c = &u->c;
	br_ssl_engine_context *e = &c->tls->eng;
	/* non-blocking calls: we just try both ways, whatever poll said */
	for (int guard = 0; guard < 256; guard++) {
		unsigned st = br_ssl_engine_current_state(e);
		int progress = 0;
		size_t len;
		if (st & BR_SSL_CLOSED)
			return tls_closed(u);
		if (u->state == UP_HANDSHAKE && (st & BR_SSL_SENDAPP)) {
			br_ssl_engine_get_session_parameters(e, &u->ep->session);
			u->ep->have_session = 1;
			tls.last_err = 0;
			u->state = u->job == JOB_NONE ? UP_IDLE : UP_BUSY;
			if (u->job == JOB_NONE)
				c->deadline = 0;
			log_debug("TLS handshake done");
		}
		if (st & BR_SSL_SENDREC) {
			unsigned char *b = br_ssl_engine_sendrec_buf(e, &len);
			ssize_t n = io.send(c->fd, b, len, MSG_NOSIGNAL | MSG_DONTWAIT);
			if (n > 0) {
				br_ssl_engine_sendrec_ack(e, (size_t)n);
				c->last_active = now_ms();
				progress = 1;
			} else if (n < 0 && errno != EAGAIN && errno != EINTR) {
				return strerror(errno);
			}
		}
		if (st & BR_SSL_RECVAPP) {
			unsigned char *b = br_ssl_engine_recvapp_buf(e, &len);
			size_t n = MIN(len, c->rx_cap - c->rx_len);
			if (n) {
				memcpy(c->rx + c->rx_len, b, n);
				br_ssl_engine_recvapp_ack(e, n);
				c->rx_len += n;
				u->resp_started = 1;
				progress = 1;
			}
		}
		if ((st & BR_SSL_SENDAPP) && c->tx_off < c->tx_len) {
			unsigned char *b = br_ssl_engine_sendapp_buf(e, &len);
			size_t n = MIN(len, c->tx_len - c->tx_off);
			memcpy(b, c->tx + c->tx_off, n);
			br_ssl_engine_sendapp_ack(e, n);
			c->tx_off += n;
			if (c->tx_off == c->tx_len) {
				c->tx_off = c->tx_len = 0;
				br_ssl_engine_flush(e, 0);
			}
			progress = 1;
		}
		if (st & BR_SSL_RECVREC) {
			unsigned char *b = br_ssl_engine_recvrec_buf(e, &len);
			ssize_t n = io.recv(c->fd, b, len, MSG_DONTWAIT);
			if (n > 0) {
				br_ssl_engine_recvrec_ack(e, (size_t)n);
				c->last_active = now_ms();
				progress = 1;
			} else if (n == 0) {
				c->eof = 1;
				if (u->state == UP_HANDSHAKE)
					return "TLS: the server closed the connection "
					    "during the handshake";
				return NULL;
			} else if (errno != EAGAIN && errno != EINTR) {
				return strerror(errno);
			}
		}
		if (!progress)
			break;
	}
	return NULL;
}

/* poll() interest of a TLS connection, from the engine's state. */
static short
tls_events(struct upstream *u)
{
	unsigned st = br_ssl_engine_current_state(&u->c.tls->eng);
	short ev = 0;
	if (st & BR_SSL_SENDREC)
		ev |= POLLOUT;
	if (st & BR_SSL_RECVREC)
		ev |= POLLIN;
	return ev;
}

/* == 14. Upstream connections: forwarder and proxy == */

static void
upstream_host_header(const struct endpoint *ep, char *out, size_t cap)
{
	const struct apm_url *u = &ep->url;
	int v6 = strchr(u->host, ':') != NULL;
	int dflt = u->port == (u->tls ? 443 : 80);
	if (dflt)
		snprintf(out, cap, v6 ? "[%s]" : "%s", u->host);
	else
		snprintf(out, cap, v6 ? "[%s]:%u" : "%s:%u", u->host, u->port);
}

/* Close slot u's connection; its job, if any, stays for the caller. */
static void
upstream_close(struct upstream *u)
{
	conn_close(&u->c);
	u->state = UP_CLOSED;
}

/* The server has the forwarder timeout from now to answer (or accept). */
static void
upstream_arm(struct upstream *u)
{
	u->c.deadline = now_ms() + g.cfg.forwarder_timeout_ms;
}

/* Slot u has no job any more. */
static void
upstream_unassign(struct upstream *u)
{
	u->job = JOB_NONE;
	u->done = NULL;
	u->payload = -1;
	u->agent = -1;
}

/* Tear down a connection that failed and tell its job's owner. */
static void
upstream_fail(struct upstream *u, const char *why)
{
	g.progress++;
	upstream_close(u);
	if (u->done)
		u->done(u, 0, why);
	upstream_unassign(u);
	u->reused = 0;
}

/* Open a connection for slot u to its endpoint (the APM server or an AWS
 * service), whose address is known. 0 or -1. */
static int
upstream_connect(struct upstream *u)
{
	struct endpoint *ep = u->ep;
	if (ep->url.tls && ep->verify && tls.loaded && tls.nta == 0 &&
	    tls.nidx == 0) {
		errno = EPERM; /* said once by tls_load: nothing to verify with */
		return -1;
	}
	if (NEVER(!ep->resolved)) { /* callers wait for endpoint_ready */
		errno = EDESTADDRREQ;
		return -1;
	}
	int fd = sock_connect(&ep->addr, ep->addrlen);
	if (fd < 0) {
		log_debug("connect to %s: %s", ep->what, strerror(errno));
		return -1;
	}
	/* tx may already hold the request that asked for this connection */
	u->c.rx_len = 0;
	u->c.head_prev = 0;
	u->c.head_done = 0;
	u->c.eof = 0;
	u->c.close_after = 0;
	memset(&u->c.body, 0, sizeof u->c.body);
	u->c.fd = fd;
	u->c.tls = NULL;
	u->state = UP_CONNECTING;
	u->reused = 0;
	u->c.last_active = now_ms();
	upstream_arm(u);
	if (ep->url.tls && tls_start(u) < 0) {
		upstream_close(u);
		return -1;
	}
	return 0;
}

/* One more consecutive failure: no delivery starts before the backoff. */
static void
fwd_backoff(const char *why)
{
	int64_t delay = backoff_fail(&g.fwd, &g.rnd);
	if (g.fwd.failures == 1 || g.fwd.failures % 10 == 0)
		log_warn("delivery to the APM server failed (%s); failure %u, "
		    "retrying in %lld ms", why, g.fwd.failures, (long long)delay);
	else
		log_debug("delivery failed (%s); failure %u, retry in %lld ms",
		    why, g.fwd.failures, (long long)delay);
	if (g.fwd.failures >= 3)
		g.apm.resolved = 0; /* the address may have moved */
}

/* A full queue may drop its oldest complete payload: the APM server is
 * failing, or the auth its deliveries need is still to come. While it
 * accepts data, the agents wait instead (back-pressure). */
static int
fwd_may_drop(void)
{
	return g.fwd.failures > 0 || aws_pending();
}

/*
 * The APM server answered (or failed) payload u->payload. ok: 2xx.
 * retryable: keep it for a later attempt with backoff.
 */
static void
fwd_settle(struct upstream *u, int ok, int retryable, const char *why)
{
	int s = u->payload;
	struct payload *p = &g.q.p[s];
	p->inflight = 0;
	g.progress++;
	if (ok) {
		g.q.delivered++;
		g.q.delivered_bytes += p->len;
		if (g.fwd.failures)
			log_info("APM server accepts data again after %u failures",
			    g.fwd.failures);
		backoff_reset(&g.fwd);
		log_debug("delivered %llu bytes", (unsigned long long)p->len);
		queue_free(&g.q, s);
		return;
	}
	if (!retryable) {
		g.q.rejected++;
		log_error("APM server rejected a payload of %llu bytes (%s); dropped, "
		    "%llu rejected so far", (unsigned long long)p->len, why,
		    (unsigned long long)g.q.rejected);
		queue_free(&g.q, s);
		return;
	}
	p->stale_retries = 0;
	fwd_backoff(why);
	if (u->retry_after_ms > 0) /* the server said when: not before */
		p->not_before = now_ms() + u->retry_after_ms;
}

/*
 * JOB_PAYLOAD's end: the APM server's answer to payload u->payload, or the
 * attempt failed. A kept-alive connection the server closed while we were
 * frozen or idle, before any answer, is resent once on a new connection
 * without counting a failure.
 */
static void
fwd_payload_done(struct upstream *u, int answered, const char *why)
{
	struct conn *c = &u->c;
	struct payload *p = &g.q.p[u->payload];
	if (!answered) {
		if (u->reused && !u->resp_started && p->stale_retries++ == 0) {
			log_debug("kept-alive connection was dead (%s); resending", why);
			p->inflight = 0;
		} else {
			fwd_settle(u, 0, 1, why);
		}
		return;
	}
	char text[ERRTEXT_MAX + 1], reason[ERRTEXT_MAX + 64];
	size_t n = MIN(c->body.have, (size_t)ERRTEXT_MAX);
	for (size_t i = 0; i < n; i++)
		text[i] = (c->rx[i] >= 0x20 && c->rx[i] < 0x7f) ? c->rx[i] : ' ';
	text[n] = 0;
	const char *secret = strchr(g.cfg.auth, ' '); /* "Bearer x", "ApiKey x" */
	if (secret)
		str_redact(text, secret + 1);
	snprintf(reason, sizeof reason, "HTTP %d %s", u->status, text);
	int ok = u->status >= 200 && u->status < 300;
	int otlp = p->kind != PL_INTAKE;
	/* OTLP/HTTP: only 429, 502, 503 and 504 are worth a retry */
	int retryable = u->status == 429 || (otlp ? u->status == 502 ||
	    u->status == 503 || u->status == 504 :
	    u->status == 408 || u->status >= 500);
	/* an export response with content is a partial_success (protobuf: any
	 * field; JSON: more than "{}") */
	if (ok && otlp && c->body.have > 0 && (!strstr(p->ctype, "json") ||
	    memmem(c->rx, c->body.have, "rejected", 8)))
		log_debug("OTLP export accepted with a partial success answer: "
		    "some items were rejected (%.*s)", (int)MIN(c->body.have, 200),
		    text);
	fwd_settle(u, ok, retryable, reason);
}

/* A warm-up connection (no job yet) that fails is a failed delivery. */
static void
fwd_warmup_done(struct upstream *u, int answered, const char *why)
{
	(void)u;
	if (!answered)
		fwd_backoff(why);
}

/* Start the request for payload slot s on u (connected or not). */
static void
upstream_begin_payload(struct upstream *u, int s)
{
	struct payload *p = &g.q.p[s];
	char host[300];
	upstream_host_header(u->ep, host, sizeof host);
	u->job = JOB_PAYLOAD;
	u->done = fwd_payload_done;
	u->head_req = 0;
	u->payload = s;
	u->sent = 0;
	u->sent_last = 0;
	u->resp_started = 0;
	p->inflight = 1;
	static const char *const paths[] = { "/intake/v2/events", "/v1/traces",
		"/v1/metrics", "/v1/logs" };
	struct conn *c = &u->c;
	c->tx_len = c->tx_off = 0;
	u->retry_after_ms = 0;
	tx_printf(c, "POST %s%s HTTP/1.1\r\nHost: %s\r\n"
	    "Content-Type: %s\r\nTransfer-Encoding: chunked\r\n"
	    "User-Agent: " APM_EXT_NAME "/" APM_EXT_VERSION "%s%s%s\r\n",
	    g.apm.url.prefix, paths[p->kind], host,
	    p->kind == PL_INTAKE ? "application/x-ndjson" : p->ctype,
	    p->user_agent[0] ? " (" : "", p->user_agent,
	    p->user_agent[0] ? ")" : "");
	if (p->encoding[0] && strcmp(p->encoding, "identity") != 0)
		tx_printf(c, "Content-Encoding: %s\r\n", p->encoding);
	if (g.cfg.auth[0])
		tx_printf(c, "Authorization: %s\r\n", g.cfg.auth);
	tx_printf(c, "\r\n");
	upstream_arm(u);
}

/*
 * Frame more payload bytes as chunks into tx. Streams a payload that is still
 * being received; the last chunk goes once it is complete.
 */
static void
upstream_frame_body(struct upstream *u)
{
	struct conn *c = &u->c;
	struct payload *p = &g.q.p[u->payload];
	while (!u->sent_last) {
		size_t room = c->tx_cap - c->tx_len;
		if (u->sent < p->len) {
			if (room < 64)
				return;
			struct apm_str v = queue_view(&g.q, u->payload, u->sent);
			size_t n = MIN(v.len, room - 32);
			tx_printf(c, "%zx\r\n", n);
			tx_put(c, v.ptr, n);
			tx_put(c, "\r\n", 2);
			u->sent += n;
		} else if (!p->open) {
			if (tx_put(c, "0\r\n\r\n", 5) < 0)
				return;
			u->sent_last = 1;
			upstream_arm(u);
		} else {
			return; /* wait for the agent */
		}
	}
}

static void
upstream_idle(struct upstream *u)
{
	g.progress++;
	upstream_unassign(u);
	u->state = UP_IDLE;
	u->reused = 1;
	u->c.deadline = 0;
	buf_reset(&u->c);
}

/* The earliest Retry-After of a queued payload still ahead, 0 none. */
static int64_t
fwd_not_before(int64_t now)
{
	int64_t t = 0;
	for (unsigned i = 0; i < g.q.npayloads; i++)
		if (g.q.p[i].used && g.q.p[i].not_before > now)
			t = earliest(t, g.q.p[i].not_before);
	return t;
}

/* The response is complete: settle the job, keep the connection if allowed. */
static void
upstream_response_done(struct upstream *u)
{
	int keep = !u->resp_close && u->sent_last;
	if (u->done)
		u->done(u, 1, NULL);
	if (keep) {
		upstream_idle(u);
	} else {
		upstream_close(u);
		upstream_unassign(u);
	}
}

/* Parse what the APM server sent. */
static void
upstream_read(struct upstream *u)
{
	struct conn *c = &u->c;
	if (!c->head_done) {
		struct apm_http_header h[APM_HTTP_MAX_HEADERS];
		struct apm_http_msg m;
		int r = msg_head(c, 1, &m, h);
		if (r == 0) {
			if (c->eof)
				upstream_fail(u, "connection closed before an answer");
			return;
		}
		if (r < 0 || m.status < 200) {
			if (r > 0 && m.status >= 100 && m.status != 101) {
				/* interim (100 Continue, 103 Early Hints): skip it */
				msg_head_done(c, r);
				msg_next(c);
				return upstream_read(u);
			}
			upstream_fail(u, r < 0 ? apm_err_str(m.error) : "bad status");
			return;
		}
		u->status = m.status;
		u->resp_close = m.close;
		/* Retry-After in seconds (the HTTP-date form is not honoured) */
		struct apm_str ra = apm_http_header_get(&m, "retry-after");
		uint64_t secs;
		u->retry_after_ms = ra.ptr && apm_uint_parse(ra.ptr, ra.len, 3600,
		    &secs) == 0 ? (int64_t)secs * 1000 : 0;
		struct apm_str ct = apm_http_header_get(&m, "content-type");
		struct apm_str ce = apm_http_header_get(&m, "content-encoding");
		str_copy(u->ctype_buf, sizeof u->ctype_buf, ct);
		str_copy(u->cenc_buf, sizeof u->cenc_buf, ce);
		u->resp_length = m.content_length;
		if (u->head_req) {
			c->body.mode = BODY_NONE;
			c->body.done = 1;
		}
		if (c->body.mode == BODY_EOF)
			u->resp_close = 1;
		msg_head_done(c, r);
	}
	int r = body_step(&c->body, c->rx, &c->rx_len, c->eof);
	if (r < 0) {
		upstream_fail(u, "malformed response body");
		return;
	}
	if (u->job == JOB_PAYLOAD && c->body.have > ERRTEXT_MAX) {
		/* only the start of an error text is kept */
		memmove(c->rx + ERRTEXT_MAX, c->rx + c->body.have,
		    c->rx_len - c->body.have);
		c->rx_len -= c->body.have - ERRTEXT_MAX;
		c->body.have = ERRTEXT_MAX;
	}
	if (r == 1) {
		upstream_response_done(u);
		return;
	}
	if (c->rx_len == c->rx_cap) {
		upstream_fail(u, "response too large");
		return;
	}
	if (c->eof)
		upstream_fail(u, "connection closed mid-answer");
}

/* One step of an upstream connection after poll. */
static void
upstream_step(struct upstream *u, short revents)
{
	struct conn *c = &u->c;
	if (u->state == UP_CONNECTING) {
		int err = 0;
		socklen_t len = sizeof err;
		if (!(revents & (POLLOUT | POLLERR | POLLHUP)))
			return;
		io.getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
		if (err) {
			char why[128];
			snprintf(why, sizeof why, "connect: %s", strerror(err));
			upstream_fail(u, why);
			return;
		}
		if (c->tls) {
			u->state = UP_HANDSHAKE;
		} else {
			u->state = u->job == JOB_NONE ? UP_IDLE : UP_BUSY;
			if (u->job == JOB_NONE)
				c->deadline = 0;
		}
	}
	const char *why;
	if (c->tls) {
		if ((why = tls_step(u)) != NULL) {
			upstream_fail(u, why);
			return;
		}
	} else {
		if (revents & (POLLIN | POLLHUP | POLLERR)) {
			if (conn_fill(c) < 0 && !c->eof) {
				upstream_fail(u, strerror(errno));
				return;
			}
			if (c->rx_len > 0)
				u->resp_started = 1;
		}
	}
	if (u->state == UP_IDLE) {
		if (c->eof || c->rx_len > 0) /* closed while idle, or garbage */
			upstream_close(u);
		return;
	}
	if (u->state != UP_BUSY)
		return;
	if (c->rx_len > 0 || c->eof) {
		upstream_read(u);
		if (u->state != UP_BUSY || c->fd < 0)
			return;
	}
	if (u->job == JOB_PAYLOAD)
		upstream_frame_body(u);
	why = c->tls ? tls_step(u) : conn_flush(c) < 0 ? strerror(errno) : NULL;
	if (why)
		upstream_fail(u, why);
}

/* poll() interest of an upstream connection. */
static short
upstream_events(struct upstream *u)
{
	struct conn *c = &u->c;
	if (u->state == UP_CONNECTING)
		return POLLOUT;
	int more = u->state == UP_BUSY && u->job == JOB_PAYLOAD && !u->sent_last &&
	    (u->sent < g.q.p[u->payload].len || !g.q.p[u->payload].open);
	if (c->tls) /* the engine's wishes, plus body bytes still to frame */
		return (short)(tls_events(u) | (more ? POLLOUT : 0));
	short ev = POLLIN;
	if (u->state == UP_BUSY) {
		if (c->tx_off < c->tx_len)
			ev |= POLLOUT;
		if (more)
			ev |= POLLOUT;
	}
	return ev;
}

/* A slot for a new job: an idle connection first, then one still opening
 * with no job (the warm-up: the job waits for it rather than opening a
 * second connection and handshake), then a closed slot; or NULL. */
static struct upstream *
upstream_free_slot(void)
{
	struct upstream *opening = NULL, *closed = NULL;
	for (int i = 0; i < MAX_UPSTREAM; i++) {
		struct upstream *u = &g.up[i];
		if (u->state == UP_IDLE && u->job == JOB_NONE)
			return u;
		if ((u->state == UP_CONNECTING || u->state == UP_HANDSHAKE) &&
		    u->job == JOB_NONE && !opening)
			opening = u;
		if (u->state == UP_CLOSED && !closed)
			closed = u;
	}
	return opening ? opening : closed;
}

/* Put a job on slot u: connect if needed. 0 or -1. A connection still
 * opening (the warm-up) turns busy once open (upstream_step, tls_step). */
static int
upstream_assign(struct upstream *u)
{
	if (u->state == UP_CLOSED)
		return upstream_connect(u);
	if (u->state == UP_IDLE)
		u->state = UP_BUSY;
	return 0;
}

/* Start deliveries that can start: oldest payload first. None while the
 * auth they need is still to be fetched (auth_pending). */
static void
fwd_schedule(int auth_pending)
{
	int64_t now = now_ms();
	if (!g.cfg.has_server || now < g.fwd.retry_at || auth_pending ||
	    !endpoint_ready(&g.apm, g.cfg.forwarder_timeout_ms))
		return;
	int busy = 0;
	for (int i = 0; i < MAX_UPSTREAM; i++)
		busy += g.up[i].job == JOB_PAYLOAD;
	/* While the server fails, one probe at a time: parallel attempts would
	 * each count as a failure and race the backoff to its cap. */
	int limit = g.fwd.failures ? 1 : MAX_UPSTREAM - 1;
	while (busy < limit) {
		int best = -1;
		for (unsigned i = 0; i < g.q.npayloads; i++) {
			struct payload *p = &g.q.p[i];
			/* A body still arriving goes out once it fills a block: a
			 * small one is sent whole, so a function that dies
			 * mid-request leaves no cut request at the server. */
			if (!p->used || p->inflight || (p->open && p->len < BLOCK_SIZE) ||
			    p->not_before > now)
				continue;
			if (best < 0 || p->seq < g.q.p[best].seq)
				best = (int)i;
		}
		if (best < 0)
			return;
		struct upstream *u = upstream_free_slot();
		if (!u)
			return;
		upstream_begin_payload(u, best);
		if (upstream_assign(u) < 0) {
			u->state = UP_CLOSED;
			fwd_settle(u, 0, 1, "cannot connect");
			upstream_unassign(u);
			return;
		}
		busy++;
	}
}

/*
 * After the first /next, while the function initialises: load trust anchors
 * and open (and for https, handshake) one connection, so the first
 * invocation finds it ready. Not when the CA comes from ACM (ca_from_acm):
 * it must join the anchors first.
 */
static void
fwd_prewarm(int ca_from_acm)
{
	if (!g.cfg.has_server || ca_from_acm)
		return;
	if (g.apm.url.tls)
		tls_load();
	if (!endpoint_ready(&g.apm, g.cfg.forwarder_timeout_ms))
		return; /* called again once the name is resolved */
	for (int i = 0; i < MAX_UPSTREAM; i++)
		if (g.up[i].c.fd >= 0)
			return;
	struct upstream *u = &g.up[0];
	upstream_unassign(u);
	u->done = fwd_warmup_done;
	if (upstream_connect(u) < 0)
		log_debug("warm-up connection to the APM server failed");
}

/* Remove a payload from the connection sending it (the agent broke off). */
static void
fwd_payload_aborted(int s)
{
	for (int i = 0; i < MAX_UPSTREAM; i++) {
		struct upstream *u = &g.up[i];
		if (u->job == JOB_PAYLOAD && u->payload == s) {
			/* The server has a partial body: end that request by closing;
			 * the payload is given up. */
			upstream_close(u);
			upstream_unassign(u);
		}
	}
	queue_free(&g.q, s);
}

/* Bytes and payloads still held, for the shutdown log. */
static void
fwd_held(uint64_t *count, uint64_t *bytes)
{
	*count = *bytes = 0;
	for (unsigned i = 0; i < g.q.npayloads; i++)
		if (g.q.p[i].used) {
			(*count)++;
			*bytes += g.q.p[i].len;
		}
}

/* == 15. Invocation records ==
 * What the platform and the agents told us about the last few invocations
 * (telemetry may come an invocation late): request id, deadline, start, the
 * registered transaction's ids, whether its report came.
 */

static struct inv_info *
tel_inv_find(const char *rid)
{
	for (unsigned i = 0; i < TEL_RECENT; i++)
		if (rid[0] && strcmp(tel.recent[i].request_id, rid) == 0)
			return &tel.recent[i];
	return NULL;
}

/* The entry of request id rid, made (over the oldest) if it is new. */
static struct inv_info *
tel_inv_get(const char *rid)
{
	struct inv_info *r = tel_inv_find(rid);
	if (r)
		return r;
	r = &tel.recent[tel.recent_next++ % TEL_RECENT];
	memset(r, 0, sizeof *r);
	snprintf(r->request_id, sizeof r->request_id, "%s", rid);
	return r;
}

/* Remember an invocation for the telemetry that follows it. */
static void
tel_inv_track(void)
{
	struct inv_info *r = tel_inv_get(g.inv.request_id);
	snprintf(r->arn, sizeof r->arn, "%s", g.inv.arn);
	int64_t now_epoch_ms = epoch_us() / 1000;
	if (!r->start_us)
		r->start_us = now_epoch_ms * 1000;
	r->deadline_epoch_ms = now_epoch_ms + (g.inv.deadline - g.inv.t_invoke);
	tel.proxy_sent = 0;
}

/* The function's timeout: Lambda's are whole seconds, and deadline - start
 * falls a little short of it (start is read late) or, by clock rounding,
 * up to a few ms over. */
static int64_t
tel_inv_timeout_ms(const struct inv_info *inv)
{
	int64_t ms = inv->deadline_epoch_ms - inv->start_us / 1000 - 10;
	return ms <= 0 ? 1000 : (ms + 999) / 1000 * 1000;
}

/* At SHUTDOWN: the last invocation's platform.report has not come yet. */
static int
tel_report_pending(void)
{
	if (!tel.subscribed || g.inv.number == 0)
		return 0;
	struct inv_info *inv = tel_inv_find(g.inv.request_id);
	return inv && !inv->reported;
}

/* The metadata line of an uncompressed agent payload, for our own events. */
static void
tel_agent_metadata(const char *p, size_t n)
{
	const char *nl = memchr(p, '\n', n);
	if (!nl || (size_t)(nl - p) + 1 > sizeof tel.agent_meta ||
	    !str_has_prefix((struct apm_str){ p, n }, "{\"metadata\""))
		return;
	tel.agent_meta_len = (size_t)(nl - p) + 1;
	memcpy(tel.agent_meta, p, tel.agent_meta_len);
}

/* n lowercase hex digits, as trace and span ids are. */
static int
is_hex_id(const char *s, size_t n)
{
	if (strlen(s) != n)
		return 0;
	for (size_t i = 0; i < n; i++)
		if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
			return 0;
	return 1;
}

/* Keep the trace and transaction ids of the transaction registered for
 * request id rid; ids of the wrong shape are dropped. */
static void
tel_registered(const char *rid, const char *tx, size_t n)
{
	struct apm_json_tok t[256];
	int k = apm_json_parse(tx, n, t, 256, NULL, NULL);
	int obj = k > 0 ? apm_json_get(tx, t, k, 0, "transaction") : -1;
	struct inv_info *inv = tel_inv_get(rid);
	char trace[64] = "", id[64] = "";
	if (obj >= 0) {
		json_get_str(tx, t, k, obj, "trace_id", trace, sizeof trace);
		json_get_str(tx, t, k, obj, "id", id, sizeof id);
	}
	if (!is_hex_id(trace, 32) || !is_hex_id(id, 16)) {
		log_debug("registered transaction of %s has malformed ids; "
		    "its log lines carry none", rid);
		trace[0] = id[0] = 0;
	}
	memcpy(inv->trace_id, trace, sizeof inv->trace_id - 1);
	inv->trace_id[sizeof inv->trace_id - 1] = 0;
	memcpy(inv->tx_id, id, sizeof inv->tx_id - 1);
	inv->tx_id[sizeof inv->tx_id - 1] = 0;
}

/* == 16. Local receiver: agent connections ==
 * One request at a time per connection: its answer is written and drained
 * before the next pipelined head is parsed. An intake body moves into the
 * queue as it is decoded; when the queue is full the connection is simply
 * not read (back-pressure) and the agent's TCP window closes.
 */

/*
 * The function's work for this invocation is over (the agent flushed,
 * runtimeDone, or the deadline): from now on the invocation is held only
 * until its data is delivered.
 */
static void
invocation_end(const char *why)
{
	if (!g.inv.active && g.phase == PH_WAIT) {
		/* The INVOKE is on its way but not read yet: the agent (or the
		 * platform) was faster than us. It applies to that invocation. */
		g.end_pending = 1;
		return;
	}
	if (!g.inv.active || g.inv.ended)
		return;
	g.inv.ended = 1;
	g.inv.t_end = now_ms();
	log_debug("invocation %s ended: %s", g.inv.request_id, why);
}

static int
agent_index(struct agent *a)
{
	return (int)(a - g.agents);
}

/* Give up the payload an agent request was filling (it broke off). */
static void
agent_abort_payload(struct agent *a, const char *why)
{
	if (a->payload < 0)
		return;
	struct payload *p = &g.q.p[a->payload];
	if (p->inflight) {
		log_warn("agent request broke off after %llu bytes (%s); its "
		    "request to the APM server is cut off", (unsigned long long)p->len,
		    why);
		fwd_payload_aborted(a->payload);
	} else {
		log_debug("agent request broke off after %llu bytes (%s); "
		    "discarded", (unsigned long long)p->len, why);
		queue_free(&g.q, a->payload);
	}
	a->payload = -1;
}

static void
agent_close(struct agent *a)
{
	agent_abort_payload(a, "connection closed");
	for (int i = 0; i < MAX_UPSTREAM; i++)
		if (g.up[i].job == JOB_PROXY && g.up[i].agent == agent_index(a))
			g.up[i].agent = -1;
	conn_close(&a->c);
	a->state = AG_HEAD;
}

/* Queue an answer with a small JSON (or empty) body; close after if asked. */
static void
agent_respond(struct agent *a, int status, const char *msg, int close_after)
{
	struct conn *c = &a->c;
	a->requests++;
	char body[300];
	int n = 0;
	if (msg)
		n = snprintf(body, sizeof body, "{\"error\":\"%s\"}\n", msg);
	msg_answer(c, status, n, n ? "Content-Type: application/json\r\n" : "",
	    body, (size_t)n, close_after || !a->keep_alive || c->close_after);
	a->state = AG_RESPOND;
}

/* An OTLP export is in: 200 with an empty export response in the
 * exporter's encoding (no bytes for protobuf, {} for JSON). */
static void
agent_respond_otlp(struct agent *a)
{
	struct conn *c = &a->c;
	int json = str_has_iprefix((struct apm_str){ a->ctype, strlen(a->ctype) },
	    "application/json");
	a->requests++;
	msg_answer(c, 200, json ? 2 : 0, json ? "Content-Type: application/json\r\n" :
	    "Content-Type: application/x-protobuf\r\n", "{}", json ? 2 : 0,
	    !a->keep_alive || c->close_after);
	a->state = AG_RESPOND;
}

/* Refuse a malformed or oversized request: answer, then close. */
static void
agent_reject(struct agent *a, int status, const char *why)
{
	log_warn("agent request refused with %d: %s", status, why);
	agent_abort_payload(a, why);
	agent_respond(a, status, why, 1);
	a->c.rx_len = 0;
}

static int
path_is(struct apm_str target, const char *path, struct apm_str *query)
{
	size_t n = strlen(path);
	const char *q = memchr(target.ptr, '?', target.len);
	size_t plen = q ? (size_t)(q - target.ptr) : target.len;
	if (plen != n || memcmp(target.ptr, path, n) != 0)
		return 0;
	*query = q ? (struct apm_str){ q + 1, target.len - plen - 1 } :
	    (struct apm_str){ NULL, 0 };
	return 1;
}

static int
query_has(struct apm_str q, const char *kv)
{
	size_t n = strlen(kv);
	for (size_t i = 0; i + n <= q.len; i++)
		if ((i == 0 || q.ptr[i - 1] == '&') && memcmp(q.ptr + i, kv, n) == 0 &&
		    (i + n == q.len || q.ptr[i + n] == '&'))
			return 1;
	return 0;
}

/* Headers a proxy must not pass on (ours replace them, or hop-by-hop). */
static int
proxy_drops_header(struct apm_str name)
{
	static const char *const drop[] = { "authorization", "host",
		"connection", "content-length", "transfer-encoding", "keep-alive",
		"te", "trailer", "upgrade", "proxy-authorization",
		"proxy-connection", "expect" };
	for (size_t i = 0; i < sizeof drop / sizeof *drop; i++)
		if (apm_str_ieq(name, drop[i]))
			return 1;
	return 0;
}

/* Whether a header is named in the Connection header's list (hop-by-hop
 * by the sender's word: not passed on). */
static int
proxy_named_in_connection(const struct apm_http_msg *m, struct apm_str name)
{
	struct apm_str v = apm_http_header_get(m, "connection");
	size_t i = 0;
	while (v.ptr && i < v.len) {
		while (i < v.len && (v.ptr[i] == ' ' || v.ptr[i] == ',' ||
		    v.ptr[i] == '\t'))
			i++;
		size_t start = i;
		while (i < v.len && v.ptr[i] != ',' && v.ptr[i] != ' ' &&
		    v.ptr[i] != '\t')
			i++;
		if (i > start && name.len == i - start) {
			char tok[64];
			str_copy(tok, sizeof tok, (struct apm_str){ v.ptr + start, i - start });
			if (apm_str_ieq(name, tok))
				return 1;
		}
	}
	return 0;
}

/*
 * A target we may proxy with our Authorization: origin-form ("/path?q"),
 * no "//" authority trick, no dot segment (plain or percent-encoded) that
 * could climb out of the server URL's prefix, no backslash.
 */
static int
proxy_target_ok(struct apm_str t)
{
	if (t.len == 0 || t.ptr[0] != '/' || (t.len > 1 && t.ptr[1] == '/'))
		return 0;
	size_t plen = t.len;
	const char *q = memchr(t.ptr, '?', t.len);
	if (q)
		plen = (size_t)(q - t.ptr);
	size_t seg = 1, dots = 0, other = 0;
	for (size_t i = 1; i <= plen; i++) {
		if (i == plen || t.ptr[i] == '/') {
			if (other == 0 && dots > 0 && i > seg)
				return 0; /* "." or ".." segment */
			seg = i + 1;
			dots = other = 0;
		} else if (t.ptr[i] == '\\') {
			return 0;
		} else if (t.ptr[i] == '.') {
			dots++;
		} else if (t.ptr[i] == '%' && i + 2 < plen && t.ptr[i + 1] == '2' &&
		    (t.ptr[i + 2] == 'e' || t.ptr[i + 2] == 'E')) {
			dots++;
			i += 2;
		} else {
			other++;
		}
	}
	return 1;
}

/* Write the upstream request head of a proxied call into the agent's tx. */
static int
agent_proxy_head(struct agent *a, const struct apm_http_msg *m)
{
	struct conn *c = &a->c;
	char host[300];
	upstream_host_header(&g.apm, host, sizeof host);
	c->tx_len = c->tx_off = 0;
	/* Our Authorization goes in when the call leaves (proxy_schedule): a
	 * secret from Secrets Manager may arrive in between. */
	int bad = tx_printf(c, "%.*s %s%.*s HTTP/1.1\r\nHost: %s\r\n",
	    (int)m->method.len, m->method.ptr, g.apm.url.prefix,
	    (int)m->target.len, m->target.ptr, host);
	for (size_t i = 0; i < m->num_headers; i++) {
		const struct apm_http_header *h = &m->headers[i];
		if (!proxy_drops_header(h->name) &&
		    !proxy_named_in_connection(m, h->name))
			bad |= tx_printf(c, "%.*s: %.*s\r\n", (int)h->name.len,
			    h->name.ptr, (int)h->value.len, h->value.ptr);
	}
	return bad;
}

/* An agent route: the first entry of agent_routes for the port whose method
 * and path match a request takes it. */
struct agent_route_def {
	int otlp;               /* on the OTLP/HTTP port, else the intake port */
	const char *method;     /* NULL: any */
	const char *path;       /* NULL: any */
	int other_method;       /* the path matched, not the method: 0 look on,
	                           else answer this status */
	int route;              /* enum agent_route */
	int kind;               /* RT_INTAKE: enum payload_kind */
	int status;             /* RT_REJECT: the status to answer */
	uint64_t limit;         /* body bytes at most; 0: the configured max */
};

static const struct agent_route_def agent_routes[] = {
	{ 0, "POST", "/intake/v2/events", 0, RT_INTAKE, PL_INTAKE, 0, 0 },
	{ 0, "POST", "/register/transaction", 0, RT_REGISTER, 0, 0, REG_MAX },
	{ 0, NULL, NULL, 0, RT_PROXY, 0, 0, PROXY_BODY_MAX },
	{ 1, "POST", "/v1/traces", 405, RT_INTAKE, PL_OTLP_TRACES, 0, 0 },
	{ 1, "POST", "/v1/metrics", 405, RT_INTAKE, PL_OTLP_METRICS, 0, 0 },
	{ 1, "POST", "/v1/logs", 405, RT_INTAKE, PL_OTLP_LOGS, 0, 0 },
	{ 1, NULL, NULL, 0, RT_REJECT, 0, 404, 0 },
};

/* Route a request by the table; its query string goes to *q. */
static void
agent_route(struct agent *a, const struct apm_http_msg *m, struct apm_str *q)
{
	const struct agent_route_def *d;
	int method = 0;
	for (d = agent_routes;; d++) { /* each port's part ends with a catch-all */
		if (d->otlp != a->otlp)
			continue;
		method = !d->method || apm_str_ieq(m->method, d->method);
		if ((!d->path || path_is(m->target, d->path, q)) &&
		    (method || d->other_method))
			break;
	}
	a->route = method ? d->route : RT_REJECT;
	a->status = method ? d->status : d->other_method;
	a->kind = d->kind;
	a->limit = d->limit ? d->limit : g.cfg.max_body;
}


static void
agent_head(struct agent *a)
{
	struct conn *c = &a->c;
	struct apm_http_header h[APM_HTTP_MAX_HEADERS];
	struct apm_http_msg m;
	int r = msg_head(c, 0, &m, h);
	if (r == 0)
		return;
	if (r < 0) {
		int st = m.error == APM_E_HEAD_TOO_LARGE ||
		    m.error == APM_E_TOO_MANY_HEADERS ? 431 :
		    m.error == APM_E_BAD_TRANSFER_ENCODING ? 501 : 400;
		if (a->otlp && str_has_prefix((struct apm_str){ c->rx, c->rx_len },
		    "PRI * HTTP/2")) {
			if (!g.warned_grpc++)
				log_warn("an OTLP exporter spoke HTTP/2 (gRPC) to port %u: "
				    "only OTLP/HTTP is supported (set "
				    "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf)",
				    g.cfg.otlp_port);
			agent_respond(a, 400, "OTLP over gRPC (HTTP/2) is not supported: "
			    "use OTLP/HTTP", 1);
			c->rx_len = 0;
			return;
		}
		agent_reject(a, st, apm_err_str(m.error));
		return;
	}
	struct apm_str q = { NULL, 0 };
	a->keep_alive = !m.close;
	a->flushed = 0;
	a->payload = -1;
	a->status = 0;
	str_copy(a->encoding, sizeof a->encoding,
	    apm_http_header_get(&m, "content-encoding"));
	str_copy(a->user_agent, sizeof a->user_agent,
	    apm_http_header_get(&m, "user-agent"));
	str_copy(a->request_id, sizeof a->request_id,
	    apm_http_header_get(&m, "x-elastic-aws-request-id"));
	a->ctype[0] = 0;
	/* A body other than intake's is kept whole in rx, after the head. */
	agent_route(a, &m, &q);
	struct apm_str ct = apm_http_header_get(&m, "content-type");
	if (a->route == RT_INTAKE && a->otlp) {
		if (!ct.ptr || (!str_has_iprefix(ct, "application/x-protobuf") &&
		    !str_has_iprefix(ct, "application/json"))) {
			a->route = RT_REJECT;
			a->status = 415;
		} else {
			str_copy(a->ctype, sizeof a->ctype, ct);
		}
	} else if (a->route == RT_INTAKE) {
		a->flushed = query_has(q, "flushed=true");
	} else if (a->route == RT_REGISTER) {
		if (!ct.ptr || ct.len < 45 || memcmp(ct.ptr,
		    "application/vnd.elastic.apm.transaction+ndjson", 45) != 0) {
			a->route = RT_REJECT;
			a->status = 415;
		} else if (!a->request_id[0]) {
			a->route = RT_REJECT;
			a->status = 400;
		}
	} else if (a->route == RT_PROXY) {
		if (!g.cfg.has_server) {
			a->route = RT_REJECT;
			a->status = 502;
		} else if (apm_str_ieq(m.method, "CONNECT") ||
		    !proxy_target_ok(m.target)) {
			a->route = RT_REJECT;
			a->status = 400;
			log_warn("agent request for \"%.*s %.*s\" refused: only "
			    "paths under the APM server URL are proxied",
			    (int)MIN(m.method.len, 16), m.method.ptr,
			    (int)MIN(m.target.len, 128), m.target.ptr);
		} else if (agent_proxy_head(a, &m) < 0) {
			agent_reject(a, 431, "headers too large to proxy");
			return;
		}
	}
	if (m.content_length > 0 && (uint64_t)m.content_length > a->limit) {
		agent_reject(a, 413, apm_err_str(APM_E_BODY_TOO_LARGE));
		return;
	}
	if (m.expect_continue)
		(void)io.send(c->fd, "HTTP/1.1 100 Continue\r\n\r\n", 25,
		    MSG_NOSIGNAL | MSG_DONTWAIT);
	msg_head_done(c, r);
	a->body_start = a->window_start = now_ms();
	a->window_total = 0;
	a->state = AG_BODY;
}

/* Keep what /register/transaction gave; 200, or 422 for a bad payload. */
static void
register_transaction(struct agent *a)
{
	struct conn *c = &a->c;
	size_t n = c->body.have;
	const char *nl = memchr(c->rx, '\n', n);
	enum apm_err err;
	int ok = nl && n <= REG_MAX && str_has_prefix((struct apm_str){ c->rx, n },
	    "{\"metadata\"") &&
	    apm_json_parse(c->rx, (size_t)(nl - c->rx), NULL, 0, NULL, &err) > 0;
	if (ok) {
		const char *tx = nl + 1;
		size_t tlen = n - (size_t)(tx - c->rx);
		while (tlen > 0 && (tx[tlen - 1] == '\n' || tx[tlen - 1] == '\r'))
			tlen--;
		ok = str_has_prefix((struct apm_str){ tx, tlen }, "{\"transaction\"") &&
		    apm_json_parse(tx, tlen, NULL, 0, NULL, &err) > 0;
	}
	if (!ok) {
		log_warn("bad /register/transaction payload; answered 422");
		agent_respond(a, 422, "invalid transaction registration", 0);
	} else {
		memcpy(g.reg.body, c->rx, n);
		g.reg.len = n;
		snprintf(g.reg.request_id, sizeof g.reg.request_id, "%s",
		    a->request_id);
		tel_registered(a->request_id, nl + 1, n - (size_t)(nl + 1 - c->rx));
		log_debug("transaction registered for %s", a->request_id);
		agent_respond(a, 200, NULL, 0);
	}
	rx_consume(c, n);
}

/* The whole request is in: act on it and answer. */
static void
agent_request_done(struct agent *a)
{
	struct conn *c = &a->c;
	switch (a->route) {
	case RT_INTAKE:
		if (a->payload >= 0) {
			struct payload *p = &g.q.p[a->payload];
			p->open = 0;
			if (p->len == 0)
				queue_free(&g.q, a->payload);
			a->payload = -1;
		}
		if (a->otlp) {
			agent_respond_otlp(a);
			break;
		}
		agent_respond(a, 202, NULL, 0);
		if (a->flushed) {
			if (g.inv.active)
				g.inv.agent_flushed = 1;
			invocation_end("agent flushed");
		}
		break;
	case RT_REGISTER:
		register_transaction(a);
		break;
	case RT_REJECT:
		agent_respond(a, a->status, status_text(a->status), 0);
		rx_consume(c, c->body.have);
		break;
	case RT_PROXY:
		if (tx_printf(c, "Content-Length: %zu\r\n\r\n", c->body.have) < 0 ||
		    tx_put(c, c->rx, c->body.have) < 0) {
			agent_reject(a, 413, "proxied request too large");
			return;
		}
		rx_consume(c, c->body.have);
		a->state = AG_PROXY_WAIT;
		break;
	}
}

/*
 * The queue has no free block and no complete payload is on its way out
 * (none, or every delivery slot carries a body still arriving): only an
 * agent finishing its body could free one, and every agent with bytes to
 * store waits for a block. Refuse the newest body that holds blocks (503,
 * close) so the others go on. 1 if one was refused.
 */
static int
agent_unjam_queue(void)
{
	struct queue *q = &g.q;
	if (q->free_top > 0 || q->fresh < q->nblocks)
		return 0;
	struct agent *victim = NULL;
	for (int i = 0; i < MAX_AGENT_CONNS; i++) {
		struct agent *a = &g.agents[i];
		if (a->c.fd < 0 || a->payload < 0 || q->p[a->payload].len == 0)
			continue;
		if (!victim || q->p[a->payload].seq > q->p[victim->payload].seq)
			victim = a;
	}
	int sending_open = 0;
	for (int i = 0; i < MAX_UPSTREAM; i++)
		sending_open += g.up[i].job == JOB_PAYLOAD && g.up[i].payload >= 0 &&
		    q->p[g.up[i].payload].open;
	for (unsigned i = 0; i < q->npayloads; i++)
		if (q->p[i].used && !q->p[i].open &&
		    (q->p[i].inflight || sending_open < MAX_UPSTREAM - 1))
			return 0; /* its delivery (or drop) frees blocks */
	if (!victim)
		return 0;
	agent_reject(victim, 503, "queue full of unfinished bodies");
	return 1;
}

/* Move decoded intake bytes into the queue; 0 when all moved. */
static int
agent_push(struct agent *a)
{
	struct conn *c = &a->c;
	if (c->body.have == 0)
		return 0;
	if (!g.cfg.has_server) { /* no server: accept and discard */
		rx_consume(c, c->body.have);
		return 0;
	}
	if (a->payload < 0) {
		a->payload = queue_open(&g.q, a->encoding, a->user_agent, 0,
		    fwd_may_drop());
		if (a->payload < 0)
			return -1;
		struct payload *p = &g.q.p[a->payload];
		p->kind = a->kind;
		snprintf(p->ctype, sizeof p->ctype, "%s", a->ctype);
		if (a->kind == PL_INTAKE &&
		    (!a->encoding[0] || strcmp(a->encoding, "identity") == 0))
			tel_agent_metadata(c->rx, c->body.have);
	}
	size_t n = queue_append(&g.q, a->payload, c->rx, c->body.have,
	    fwd_may_drop());
	rx_consume(c, n);
	if (c->body.have && agent_unjam_queue() && a->payload >= 0)
		return agent_push(a);
	return c->body.have ? -1 : 0;
}

static void
agent_body(struct agent *a)
{
	struct conn *c = &a->c;
	int r = body_step(&c->body, c->rx, &c->rx_len, 0);
	if (r < 0) {
		agent_reject(a, 400, apm_err_str(c->body.ch.error));
		return;
	}
	if (c->body.total > a->limit ||
	    (r == 0 && a->route != RT_INTAKE && c->rx_len == c->rx_cap)) {
		agent_reject(a, 413, apm_err_str(APM_E_BODY_TOO_LARGE));
		return;
	}
	if (a->route == RT_INTAKE && agent_push(a) < 0)
		return; /* queue full: wait */
	if (a->route == RT_REJECT)
		rx_consume(c, c->body.have); /* its answer is known: discard */
	if (r == 1)
		agent_request_done(a);
}

/* Advance an agent connection as far as its buffers allow. */
static void
agent_process(struct agent *a)
{
	struct conn *c = &a->c;
	for (int guard = 0; guard < 64 && c->fd >= 0; guard++) {
		int before = a->state;
		size_t rx_before = c->rx_len;
		if (a->state == AG_RESPOND) {
			if (conn_flush(c) < 0) {
				agent_close(a);
				return;
			}
			if (c->tx_len > 0)
				return;
			if (c->close_after) {
				agent_close(a);
				return;
			}
			a->state = AG_HEAD;
			msg_next(c);
		}
		if (a->state == AG_HEAD && c->rx_len > 0)
			agent_head(a);
		else if (a->state == AG_BODY)
			agent_body(a);
		if (a->state == before && c->rx_len == rx_before)
			break;
	}
}

/* poll() interest of an agent connection. */
static short
agent_events(struct agent *a)
{
	struct conn *c = &a->c;
	switch (a->state) {
	case AG_RESPOND:
		return POLLOUT;
	case AG_PROXY_WAIT:
		return 0;
	case AG_BODY:
		if (a->route == RT_INTAKE && c->body.have > 0)
			return 0; /* back-pressure: the queue is full */
		return c->rx_len < c->rx_cap ? POLLIN : 0;
	default:
		return c->rx_len < c->rx_cap ? POLLIN : 0;
	}
}

static void
agent_timeouts(struct agent *a, int64_t now)
{
	struct conn *c = &a->c;
	int busy = a->state != AG_HEAD || c->rx_len > 0;
	if (a->state == AG_PROXY_WAIT) {
		c->deadline = 0; /* waiting on the APM server, bounded there */
		return;
	}
	/* A body must bring BODY_MIN_BYTES in every receiver timeout (one that
	 * trickles a byte at a time holds its slot for nothing). An intake body
	 * waiting for queue room is bounded by this too: the queue moves or the
	 * body is refused. */
	if (a->state == AG_BODY && now - a->window_start >= g.cfg.receiver_timeout_ms) {
		if (c->body.total - a->window_total < BODY_MIN_BYTES) {
			log_warn("agent request body made no progress (%llu bytes in "
			    "%lld ms); closed", (unsigned long long)(c->body.total -
			    a->window_total), (long long)g.cfg.receiver_timeout_ms);
			agent_reject(a, 408, "request body too slow");
			return;
		}
		a->window_start = now;
		a->window_total = c->body.total;
	}
	/* A head must arrive whole within the timeout (a slowloris trickles
	 * bytes to stay "active"); a body may pause up to it between bytes. */
	if (a->state == AG_HEAD && c->rx_len > 0) {
		if (!c->head_start)
			c->head_start = c->last_active;
		c->deadline = c->head_start + g.cfg.receiver_timeout_ms;
	} else {
		c->head_start = 0;
		c->deadline = busy ? c->last_active + g.cfg.receiver_timeout_ms : 0;
		if (a->state == AG_BODY)
			c->deadline = MIN(c->deadline,
			    a->window_start + g.cfg.receiver_timeout_ms);
	}
	if (c->deadline && now >= c->deadline) {
		if (a->state == AG_RESPOND) {
			agent_close(a);
			return;
		}
		log_warn("agent connection idle mid-request for %lld ms; closed",
		    (long long)g.cfg.receiver_timeout_ms);
		agent_reject(a, 408, "request timeout");
	}
}

static void
agent_step(struct agent *a, short revents)
{
	struct conn *c = &a->c;
	if (revents & (POLLIN | POLLHUP | POLLERR)) {
		if (conn_fill(c) < 0 && !c->eof) {
			agent_close(a);
			return;
		}
	}
	agent_process(a);
	if (c->fd >= 0 && c->eof && a->state != AG_RESPOND &&
	    a->state != AG_PROXY_WAIT) {
		if (a->state == AG_BODY || c->rx_len > 0)
			agent_abort_payload(a, "agent closed mid-request");
		agent_close(a);
	}
}

/*
 * How much closing this connection would cost: -1 never (a request is
 * under way); else higher is dearer. 0-1: never completed a request and
 * older than AGENT_GRACE_MS (what idle floods are made of); 2: just
 * accepted, its first head may still be on the way; 3: a kept-alive agent
 * connection (closing it could make an agent lose a request).
 */
static int
agent_evict_rank(const struct agent *a, int64_t now)
{
	if (a->c.fd < 0 || a->state != AG_HEAD || a->payload >= 0)
		return -1;
	if (a->requests > 0)
		return 3;
	if (now - a->accepted_at < AGENT_GRACE_MS)
		return 2;
	return a->c.rx_len > 0;
}

/*
 * The connection to give up when all slots are taken: the cheapest rank,
 * within a rank the idlest (the oldest, for connections that never sent).
 */
static int
agent_evictable(void)
{
	int64_t now = now_ms();
	int best = -1, best_rank = 0;
	for (int i = 0; i < MAX_AGENT_CONNS; i++) {
		struct agent *a = &g.agents[i];
		int r = agent_evict_rank(a, now);
		if (r < 0)
			continue;
		struct agent *b = best < 0 ? NULL : &g.agents[best];
		int before = !b || r < best_rank;
		if (b && r == best_rank)
			before = a->c.last_active < b->c.last_active ||
			    (a->c.last_active == b->c.last_active &&
			    a->accepted < b->accepted);
		if (before) {
			best = i;
			best_rank = r;
		}
	}
	return best;
}

/*
 * Every slot has a request under way: the body arriving slowest (bytes per
 * second since its head) yields to a new connection, or -1 if none is
 * slower than BODY_MIN_BYTES per second.
 */
static int
agent_slowest_body(void)
{
	int64_t now = now_ms();
	int best = -1;
	double best_rate = BODY_MIN_BYTES;
	for (int i = 0; i < MAX_AGENT_CONNS; i++) {
		struct agent *a = &g.agents[i];
		if (a->c.fd < 0 || a->state != AG_BODY)
			continue;
		double rate = (double)a->c.body.total * 1000.0 /
		    (double)(now - a->body_start + 1);
		if (rate < best_rate) {
			best = i;
			best_rate = rate;
		}
	}
	if (best >= 0)
		agent_abort_payload(&g.agents[best], "slowest body, all slots taken");
	return best;
}

static void
agent_accept(int lfd, int otlp)
{
	for (int k = 0; k < 16; k++) {
		int fd = io.accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0)
			return;
		int slot = -1;
		for (int i = 0; i < MAX_AGENT_CONNS && slot < 0; i++)
			if (g.agents[i].c.fd < 0)
				slot = i;
		if (slot < 0) {
			/* A candidate whose request bytes are in the socket but not
			 * read yet only looks idle: read it (it then is under way). */
			for (int tries = 0; tries < 8; tries++) {
				int pending = 0;
				slot = agent_evictable();
				if (slot < 0 || io.fionread(g.agents[slot].c.fd,
				    &pending) < 0 || pending == 0)
					break;
				agent_step(&g.agents[slot], POLLIN);
				slot = -1;
			}
			if (slot < 0)
				slot = agent_slowest_body();
			if (slot < 0) {
				io.close(fd);
				continue;
			}
			g.evicted++;
			if (g.evicted == 1 || g.evicted % 100 == 0)
				log_warn("agent connections at the limit (%d): closed the "
				    "idlest (%llu so far)", MAX_AGENT_CONNS,
				    (unsigned long long)g.evicted);
			agent_close(&g.agents[slot]);
		}
		struct agent *a = &g.agents[slot];
		buf_reset(&a->c);
		a->c.fd = fd;
		a->c.last_active = a->accepted_at = now_ms();
		a->state = AG_HEAD;
		a->payload = -1;
		a->keep_alive = 1;
		a->requests = 0;
		a->accepted = ++g.accepts;
		a->otlp = otlp;
	}
}

/* The APM server's answer to a proxied call, or 502 when it failed. */
static void
agent_proxy_answer(int ai, struct upstream *u, const char *failed)
{
	struct agent *a = &g.agents[ai];
	struct conn *c = &a->c;
	if (c->fd < 0 || a->state != AG_PROXY_WAIT)
		return;
	if (failed) {
		int big = strstr(failed, "too large") != NULL;
		log_warn("proxied agent request failed: %s", failed);
		agent_respond(a, 502, big ? "APM server answer over the 16 KiB proxy "
		    "limit" : "APM server unreachable", 0);
		return;
	}
	char hdr[300] = "";
	int64_t clen = u->status == 204 ? -1 : (int64_t)u->c.body.have;
	if (u->head_req || u->status == 304) /* the length a GET would get */
		clen = u->resp_length;
	if (u->ctype_buf[0] || u->cenc_buf[0])
		snprintf(hdr, sizeof hdr, "%s%s%s%s%s%s",
		    u->ctype_buf[0] ? "Content-Type: " : "", u->ctype_buf,
		    u->ctype_buf[0] ? "\r\n" : "",
		    u->cenc_buf[0] ? "Content-Encoding: " : "", u->cenc_buf,
		    u->cenc_buf[0] ? "\r\n" : "");
	if (msg_answer(c, u->status, clen, hdr, u->c.rx, u->c.body.have,
	    !a->keep_alive) < 0) {
		agent_respond(a, 502, "APM server answer too large", 0);
		return;
	}
	a->state = AG_RESPOND;
}

/* JOB_PROXY's end: answer the agent, unless it left. */
static void
agent_proxy_done(struct upstream *u, int answered, const char *why)
{
	if (u->agent >= 0)
		agent_proxy_answer(u->agent, u, answered ? NULL : why);
}

/* Hand waiting proxied calls to free upstream connections; not while the
 * auth they need is on its way (auth_coming: bounded by its timeout). */
static void
proxy_schedule(int auth_coming)
{
	if (auth_coming)
		return;
	if (!endpoint_ready(&g.apm, g.cfg.forwarder_timeout_ms))
		return; /* answered 502 if resolving fails */
	for (int i = 0; i < MAX_AGENT_CONNS; i++) {
		struct agent *a = &g.agents[i];
		if (a->c.fd < 0 || a->state != AG_PROXY_WAIT || a->c.tx_len == 0)
			continue;
		struct upstream *u = upstream_free_slot();
		if (!u)
			return;
		struct conn *uc = &u->c;
		if (upstream_assign(u) < 0) {
			agent_respond(a, 502, "APM server unreachable", 0);
			continue;
		}
		uc->tx_len = uc->tx_off = 0;
		const char *eol = memmem(a->c.tx, a->c.tx_len, "\r\n", 2);
		size_t line = eol ? (size_t)(eol - a->c.tx) + 2 : 0;
		tx_put(uc, a->c.tx, line); /* request line, then our auth */
		if (g.cfg.auth[0])
			tx_printf(uc, "Authorization: %s\r\n", g.cfg.auth);
		if (tx_put(uc, a->c.tx + line, a->c.tx_len - line) < 0) {
			a->c.tx_len = 0;
			agent_respond(a, 431, "proxied request too large", 0);
			continue;
		}
		a->c.tx_len = 0;
		upstream_unassign(u);
		u->job = JOB_PROXY;
		u->done = agent_proxy_done;
		u->head_req = line > 5 && memcmp(uc->tx, "HEAD ", 5) == 0;
		u->agent = i;
		u->sent_last = 1;
		u->resp_started = 0;
		upstream_arm(u);
	}
}

/* The APM server cannot be reached at all (its name does not resolve):
 * proxied calls still waiting get 502. */
static void
proxy_fail_waiting(void)
{
	for (int i = 0; i < MAX_AGENT_CONNS; i++) {
		struct agent *a = &g.agents[i];
		if (a->c.fd >= 0 && a->state == AG_PROXY_WAIT && a->c.tx_len > 0) {
			a->c.tx_len = 0;
			agent_respond(a, 502, "APM server unreachable", 0);
		}
	}
}

/* == 17. Lambda Extensions API client ==
 * Register is a blocking exchange on a fresh socket: it is the first thing
 * the process does, and the fewest system calls are the fastest cold start.
 * Afterwards the same connection turns non-blocking and carries /event/next.
 */

#define EXT_API "/2020-01-01/extension"

/* Blocking request on the Lambda API connection; fills c->rx with the
 * response. Returns the status (and the head length in *head), or -1. */
static int
lambda_call(const char *method, const char *path, const char *extra,
    const char *body, int *head, struct apm_http_msg *m,
    struct apm_http_header *h)
{
	struct conn *c = &g.lam.c;
	if (c->fd < 0) {
		c->fd = io.socket(g.lam.addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (c->fd < 0 || io.connect(c->fd, (struct sockaddr *)&g.lam.addr,
		    g.lam.addrlen) < 0) {
			conn_close(c);
			return -1;
		}
	}
	size_t blen = body ? strlen(body) : 0;
	char req[1024];
	int n = snprintf(req, sizeof req, "%s %s HTTP/1.1\r\nHost: %s\r\n%s"
	    "Content-Length: %zu\r\n\r\n", method, path, g.lam.host, extra, blen);
	struct iovec iov[2] = { { req, (size_t)n }, { (void *)body, blen } };
	if (n >= (int)sizeof req || io.writev(c->fd, iov, 2) != (ssize_t)(n + (int)blen)) {
		conn_close(c);
		return -1;
	}
	c->rx_len = 0;
	for (;;) {
		ssize_t r = io.read(c->fd, c->rx + c->rx_len, c->rx_cap - c->rx_len);
		if (r <= 0) {
			conn_close(c);
			return -1;
		}
		c->rx_len += (size_t)r;
		int hl = apm_http_parse_response(c->rx, c->rx_len, 0, m, h,
		    APM_HTTP_MAX_HEADERS);
		if (hl == APM_NEED_MORE)
			continue;
		if (hl < 0 || (m->content_length > 0 && (size_t)hl +
		    (size_t)m->content_length > c->rx_cap)) {
			conn_close(c);
			return -1;
		}
		if (m->content_length > 0 &&
		    c->rx_len < (size_t)hl + (size_t)m->content_length)
			continue;
		*head = hl;
		if (m->close || m->chunked) {
			conn_close(c); /* simple clients: no chunked answers here */
		}
		return m->status;
	}
}

static int
lambda_register(const char *name)
{
	struct apm_http_header h[APM_HTTP_MAX_HEADERS];
	struct apm_http_msg m;
	char extra[512];
	int head;
	snprintf(extra, sizeof extra, "Lambda-Extension-Name: %s\r\n"
	    "Content-Type: application/json\r\n", name);
	int st = lambda_call("POST", EXT_API "/register", extra,
	    "{\"events\":[\"INVOKE\",\"SHUTDOWN\"]}", &head, &m, h);
	if (st != 200) {
		log_error("register with the Extensions API failed (status %d)", st);
		return -1;
	}
	struct apm_str id = apm_http_header_get(&m, "lambda-extension-identifier");
	if (!id.len || id.len >= sizeof g.lam.id) {
		log_error("register answer has no Lambda-Extension-Identifier");
		return -1;
	}
	str_copy(g.lam.id, sizeof g.lam.id, id);
	return 0;
}

/* /event/next could not be sent: loop_lambda_tick tries again soon (said
 * once, not at every try). */
static void
lambda_next_failed(const char *why)
{
	if (!g.lam.retry_at)
		log_error("cannot call /event/next: %s; trying again every %d ms",
		    why, NEXT_RETRY_MS);
	g.lam.retry_at = now_ms() + NEXT_RETRY_MS;
}

/* Start the asynchronous GET /event/next. */
static void
lambda_send_next(void)
{
	struct conn *c = &g.lam.c;
	g.phase = g.phase == PH_SHUTDOWN ? PH_SHUTDOWN : PH_WAIT;
	if (c->fd < 0) {
		c->fd = sock_connect(&g.lam.addr, g.lam.addrlen);
		if (c->fd < 0) {
			lambda_next_failed(strerror(errno));
			return;
		}
	}
	/* The register socket stays in blocking mode: every call on it from
	 * here on passes MSG_DONTWAIT, which saves two fcntl calls at init. */
	buf_reset(c);
	tx_printf(c, "GET " EXT_API "/event/next HTTP/1.1\r\nHost: %s\r\n"
	    "Lambda-Extension-Identifier: %s\r\n\r\n", g.lam.host, g.lam.id);
	g.lam.req = LR_NEXT;
	if (conn_flush(c) < 0) {
		lambda_next_failed(strerror(errno));
		conn_close(c);
		g.lam.req = LR_NONE;
		return;
	}
	g.lam.retry_at = 0;
	log_debug("called /event/next");
}


/*
 * The Extensions API connection after poll: 1 when an event was read into
 * ev (it points into rx until the next read), -1 when it was malformed, 0
 * otherwise (a broken exchange is logged and /next asked again).
 */
static int
lambda_step(short revents, struct apm_lambda_event *ev)
{
	struct conn *c = &g.lam.c;
	if (revents & POLLOUT && conn_flush(c) < 0)
		goto broken;
	if (!(revents & (POLLIN | POLLHUP | POLLERR)))
		return 0;
	if (conn_fill(c) < 0 && !c->eof)
		goto broken;
	if (!c->head_done) {
		struct apm_http_header h[APM_HTTP_MAX_HEADERS];
		struct apm_http_msg m;
		int r = msg_head(c, 1, &m, h);
		if (r == 0) {
			if (c->eof)
				goto broken;
			return 0;
		}
		if (r < 0 || m.status != 200) {
			log_error("/event/next answered %d (%s)", r < 0 ? 0 : m.status,
			    r < 0 ? apm_err_str(m.error) : "error");
			goto broken;
		}
		c->close_after = m.close;
		msg_head_done(c, r);
	}
	int r = body_step(&c->body, c->rx, &c->rx_len, c->eof);
	if (r < 0 || (r == 0 && (c->eof || c->rx_len == c->rx_cap)))
		goto broken;
	if (r == 0)
		return 0;
	g.lam.req = LR_NONE;
	int ok = apm_lambda_event_parse(c->rx, c->body.have, ev) == 0;
	if (c->close_after || c->eof)
		conn_close(c);
	else
		buf_reset(c);
	return ok ? 1 : -1;
broken:
	/* The Lambda API never breaks in practice; after a broken exchange we
	 * reconnect and ask again (the event, if any, was lost upstream). */
	log_warn("the Extensions API connection broke; calling /event/next again");
	conn_close(c);
	g.lam.req = LR_NONE;
	if (g.phase == PH_WAIT)
		lambda_send_next();
	return 0;
}

/* == 18. AWS secrets: Secrets Manager and ACM ==
 * The secret token or API key (Secrets Manager GetSecretValue) and a private
 * CA (ACM GetCertificate), fetched with SigV4-signed JSON 1.1 calls on a
 * connection slot of their own, after the first /next. Until they arrive no
 * delivery starts: data waits rather than going out without auth.
 */

static int
aws_endpoint(struct endpoint *ep, const char *var, const char *service)
{
	char dflt[256];
	const char *v = getenv(var);
	if (!v || !*v)
		v = getenv("ELASTIC_APM_LAMBDA_AWS_ENDPOINT");
	if (!v || !*v) {
		snprintf(dflt, sizeof dflt, "https://%s.%s.amazonaws.com", service,
		    aws.region);
		v = dflt;
	}
	if (apm_url_parse(v, strlen(v), &ep->url) < 0) {
		log_error("%s=\"%.128s\" is not an http(s) URL", var, v);
		return -1;
	}
	ep->verify = 1;
	ep->what = strcmp(service, "acm") == 0 ? "AWS Certificate Manager" :
	    "AWS Secrets Manager";
	return 0;
}

/* Read the settings; called from cfg_load. */
static void
aws_config(void)
{
	aws.id[AWS_SM_TOKEN] = getenv("ELASTIC_APM_SECRETS_MANAGER_SECRET_TOKEN_ID");
	aws.id[AWS_SM_APIKEY] = getenv("ELASTIC_APM_SECRETS_MANAGER_API_KEY_ID");
	aws.id[AWS_ACM] = getenv("ELASTIC_APM_SERVER_CA_CERT_ACM_ID");
	for (int i = 0; i < AWS_NCALLS; i++) {
		if (aws.id[i] && !*aws.id[i])
			aws.id[i] = NULL;
		if (aws.id[i])
			g.cfg.from_aws = 1;
	}
	if (!g.cfg.from_aws)
		return;
	aws.key_id = getenv("AWS_ACCESS_KEY_ID");
	aws.secret = getenv("AWS_SECRET_ACCESS_KEY");
	aws.session = getenv("AWS_SESSION_TOKEN");
	if (aws.session && !*aws.session)
		aws.session = NULL;
	aws.region = env_or("AWS_REGION", "us-east-1");
	if (!aws.key_id || !*aws.key_id || !aws.secret || !*aws.secret)
		log_error("AWS_ACCESS_KEY_ID or AWS_SECRET_ACCESS_KEY is missing: "
		    "secrets cannot be fetched and nothing will be delivered");
	if (aws_endpoint(&aws.sm, "ELASTIC_APM_LAMBDA_SECRETSMANAGER_ENDPOINT",
	    "secretsmanager") < 0 ||
	    aws_endpoint(&aws.acm, "ELASTIC_APM_LAMBDA_ACM_ENDPOINT", "acm") < 0)
		aws.key_id = NULL;
}

/*
 * The Authorization value: an API key wins over a token; a fetched secret
 * wins over the plain variable. A secret with control bytes (CR, LF...)
 * would split every request head it goes into: it is refused, and nothing
 * is delivered rather than requests the server would misread.
 */
static void
aws_apply_auth(void)
{
	const char *key = aws.apikey[0] ? aws.apikey : getenv("ELASTIC_APM_API_KEY");
	const char *tok = aws.token[0] ? aws.token : getenv("ELASTIC_APM_SECRET_TOKEN");
	const char *scheme = "ApiKey", *v = key, *from = aws.apikey[0] ?
	    "the API key from Secrets Manager" : "ELASTIC_APM_API_KEY";
	if (!key || !*key) {
		scheme = "Bearer";
		v = tok;
		from = aws.token[0] ? "the secret token from Secrets Manager" :
		    "ELASTIC_APM_SECRET_TOKEN";
	}
	g.cfg.auth[0] = 0;
	if (!v || !*v)
		return;
	if (str_has_ctl(v)) {
		log_error("%s contains control characters (CR, LF or others): "
		    "refused, and no data will be sent to the APM server", from);
		g.cfg.has_server = 0;
		return;
	}
	snprintf(g.cfg.auth, sizeof g.cfg.auth, "%s %s", scheme, v);
}

static const char *const aws_call_names[] = {
	"Secrets Manager GetSecretValue (secret token)",
	"Secrets Manager GetSecretValue (API key)",
	"ACM GetCertificate",
};

/* Build the signed request of call k into u's tx. 0 or -1. */
static int
aws_request(struct upstream *u, int k)
{
	char body[1200], esc[1024], host[300], date[20], auth[512];
	const char *target = k == AWS_ACM ? "CertificateManager.GetCertificate" :
	    "secretsmanager.GetSecretValue";
	int e = apm_json_escape(aws.id[k], strlen(aws.id[k]), esc, sizeof esc - 1);
	if (e < 0)
		return -1;
	esc[e] = 0;
	if (k == AWS_ACM)
		snprintf(body, sizeof body, "{\"CertificateArn\":\"%s\"}", esc);
	else
		snprintf(body, sizeof body, "{\"SecretId\":\"%s\",\"VersionStage\":"
		    "\"AWSCURRENT\"}", esc);
	upstream_host_header(u->ep, host, sizeof host);
	time_t now = (time_t)(epoch_us() / 1000000);
	struct tm tm;
	gmtime_r(&now, &tm);
	snprintf(date, sizeof date, "%04u%02u%02uT%02u%02u%02uZ",
	    (unsigned)(tm.tm_year + 1900) % 10000, (unsigned)(tm.tm_mon + 1) % 100,
	    (unsigned)tm.tm_mday % 100, (unsigned)tm.tm_hour % 100,
	    (unsigned)tm.tm_min % 100, (unsigned)tm.tm_sec % 100);
	const char *ctype = "application/x-amz-json-1.1";
	struct apm_http_header h[4] = {
		{ { LIT("content-type") }, { ctype, strlen(ctype) } },
		{ { LIT("host") }, { host, strlen(host) } },
		{ { LIT("x-amz-date") }, { date, strlen(date) } },
		{ { LIT("x-amz-target") }, { target, strlen(target) } },
	};
	struct apm_sigv4 sv = { "POST", "/", "", h, 4, body, strlen(body),
		aws.region, k == AWS_ACM ? "acm" : "secretsmanager", date,
		aws.key_id, aws.secret, aws.session };
	if (apm_sigv4_authorization(&sv, auth, sizeof auth) < 0)
		return -1;
	struct conn *c = &u->c;
	c->tx_len = c->tx_off = 0;
	int bad = tx_printf(c, "POST / HTTP/1.1\r\nHost: %s\r\nContent-Type: %s\r\n"
	    "X-Amz-Target: %s\r\nX-Amz-Date: %s\r\nAuthorization: %s\r\n", host,
	    ctype, target, date, auth);
	if (aws.session)
		bad |= tx_printf(c, "X-Amz-Security-Token: %s\r\n", aws.session);
	bad |= tx_printf(c, "Content-Length: %zu\r\n\r\n%s", strlen(body), body);
	return bad ? -1 : 0;
}

/* The next call failed, begun (aws.current) or not (its endpoint does not
 * resolve, its request cannot be made): retry with backoff (the first retry
 * at once). */
static void
aws_failed(const char *why)
{
	int k = aws_next_call(); /* calls run in order: aws.current's, if any */
	aws.current = -1;
	if (NEVER(k < 0)) /* nothing pending: nothing was called */
		return;
	int64_t delay = backoff_fail(&aws.backoff, &g.rnd); /* the first: 0 */
	if (aws.backoff.failures == 1 || aws.backoff.failures % 10 == 0)
		log_error("%s for \"%.128s\" failed: %s; delivery waits, retrying in "
		    "%lld ms", aws_call_names[k], aws.id[k], why, (long long)delay);
}

/* Copy a string field of the answer; 0, or -1 when absent or too long. */
static int
aws_field(const char *js, const struct apm_json_tok *t, int n, const char *key,
    char *out, size_t cap)
{
	int i = apm_json_get(js, t, n, 0, key);
	return i >= 0 && apm_json_str(js, &t[i], out, cap) >= 0 ? 0 : -1;
}

/* The answer to call aws.current is in u's rx[0..body.have). */
static void
aws_answer(struct upstream *u)
{
	int k = aws.current;
	const char *js = u->c.rx;
	size_t len = u->c.body.have;
	struct apm_json_tok *t = aws.toks;
	int n = apm_json_parse(js, len, t, TEL_TOKENS, NULL, NULL);
	char why[400], type[128] = "", msg[200] = "";
	if (u->status != 200) {
		if (n > 0) {
			aws_field(js, t, n, "__type", type, sizeof type);
			if (aws_field(js, t, n, "message", msg, sizeof msg) < 0)
				aws_field(js, t, n, "Message", msg, sizeof msg);
		}
		str_redact(msg, aws.session);
		str_redact(msg, aws.secret);
		const char *hash = strrchr(type, '#');
		snprintf(why, sizeof why, "HTTP %d %s%s%s", u->status,
		    hash ? hash + 1 : (type[0] ? type : "(no AWS error type)"),
		    msg[0] ? ": " : "", msg);
		aws_failed(why);
		return;
	}
	if (n <= 0 || t[0].type != APM_JSON_OBJECT) {
		aws_failed("the answer is not a JSON object");
		return;
	}
	if (k == AWS_ACM) {
		static char pem[AWS_RX];
		size_t added = 0;
		if (aws_field(js, t, n, "Certificate", pem, sizeof pem) == 0)
			added += tls_load_pem(pem, strlen(pem), "ACM certificate");
		if (aws_field(js, t, n, "CertificateChain", pem, sizeof pem) == 0)
			added += tls_load_pem(pem, strlen(pem), "ACM certificate chain");
		if (added == 0) {
			aws_failed("no certificate in the answer");
			return;
		}
		log_info("%zu CA certificates from ACM added to the trust anchors",
		    added);
	} else {
		char *dst = k == AWS_SM_TOKEN ? aws.token : aws.apikey;
		char bin[1100];
		if (aws_field(js, t, n, "SecretString", dst, sizeof aws.token) < 0) {
			int b = -1;
			if (aws_field(js, t, n, "SecretBinary", bin, sizeof bin) == 0)
				b = apm_base64_decode(bin, strlen(bin), (unsigned char *)dst,
				    sizeof aws.token - 1);
			if (b <= 0) {
				dst[0] = 0;
				aws_failed("no SecretString or SecretBinary in the answer");
				return;
			}
			dst[b] = 0;
		}
		size_t l = strlen(dst); /* surrounding white space is not part of it */
		while (l && (dst[l - 1] == '\n' || dst[l - 1] == '\r' || dst[l - 1] == ' '))
			dst[--l] = 0;
		aws_apply_auth();
		log_info("%s: secret received", aws_call_names[k]);
	}
	aws.done[k] = 1;
	aws.current = -1;
	backoff_reset(&aws.backoff);
}

/* JOB_AWS's end: the answer to call aws.current, or its failure. */
static void
aws_call_done(struct upstream *u, int answered, const char *why)
{
	if (answered)
		aws_answer(u);
	else
		aws_failed(why);
}

/* Start the next call if one is due. */
static void
aws_schedule(void)
{
	struct upstream *u = &g.up[AWS_SLOT];
	if (aws.current >= 0 || !aws_pending() || !aws.key_id ||
	    now_ms() < aws.backoff.retry_at)
		return;
	int k = aws_next_call();
	struct endpoint *ep = k == AWS_ACM ? &aws.acm : &aws.sm;
	const char *too_long = "the request is too long to sign or send";
	if (!endpoint_ready(ep, g.cfg.forwarder_timeout_ms))
		return;
	if (u->c.fd >= 0 && u->state == UP_IDLE && u->ep == ep) {
		u->state = UP_BUSY;
	} else {
		upstream_close(u);
		u->ep = ep;
		if (aws_request(u, k) < 0) {
			aws_failed(too_long);
			return;
		}
		if (upstream_connect(u) < 0) {
			aws_failed("cannot connect");
			return;
		}
	}
	if (u->state == UP_BUSY && aws_request(u, k) < 0) {
		aws_failed(too_long);
		return;
	}
	aws.current = k;
	upstream_unassign(u);
	u->job = JOB_AWS;
	u->done = aws_call_done;
	u->head_req = 0;
	u->sent_last = 1;
	u->resp_started = 0;
	upstream_arm(u);
}

/* == 19. Telemetry listener and platform events ==
 * Lambda POSTs JSON arrays of records to us. A body is validated whole
 * before any record is acted on, so a 400 (which Lambda retries) never
 * follows half-applied records.
 */




static int
own_put(const char *s, size_t n)
{
	if (queue_append(&g.q, tel.own, s, n, fwd_may_drop()) == n)
		return 0;
	tel.own_cut = 1;
	return -1;
}

static int
own_puts(const char *s)
{
	return own_put(s, strlen(s));
}

/* Append s escaped as JSON string contents. */
static int
own_put_escaped(const char *s, size_t n)
{
	char buf[4096];
	for (size_t i = 0; i < n;) {
		size_t take = MIN(n - i, sizeof buf / 6);
		int w = apm_json_escape(s + i, take, buf, sizeof buf);
		if (w < 0 || own_put(buf, (size_t)w) < 0)
			return -1;
		i += take;
	}
	return 0;
}

static void
own_metadata(void)
{
	if (g.reg.len) {
		const char *nl = memchr(g.reg.body, '\n', g.reg.len);
		own_put(g.reg.body, (size_t)(nl - g.reg.body) + 1);
		return;
	}
	if (tel.agent_meta_len) {
		own_put(tel.agent_meta, tel.agent_meta_len);
		return;
	}
	const char *name = getenv("ELASTIC_APM_SERVICE_NAME");
	const char *ver = getenv("ELASTIC_APM_SERVICE_VERSION");
	if (!name || !*name)
		name = g.cfg.function_name;
	if (!ver || !*ver)
		ver = g.cfg.function_version;
	own_puts("{\"metadata\":{\"service\":{\"name\":\"");
	own_put_escaped(name, strlen(name));
	own_puts("\",\"version\":\"");
	own_put_escaped(ver, strlen(ver));
	own_puts("\",\"agent\":{\"name\":\"" APM_EXT_NAME "\",\"version\":\""
	    APM_EXT_VERSION "\"},\"framework\":{\"name\":\"AWS Lambda\"}},"
	    "\"cloud\":{\"provider\":\"aws\",\"region\":\"");
	own_put_escaped(g.cfg.region, strlen(g.cfg.region));
	own_puts("\",\"service\":{\"name\":\"lambda\"}}}}\n");
}

/*
 * Begin one event line in our own payload, opened (metadata first) if none
 * is. Every line goes in whole or not at all: own_line_end takes back a
 * line that did not fit (a cut line would make the server refuse the whole
 * payload). 0 or -1.
 */
static int
own_begin(void)
{
	if (tel.own < 0) {
		if (!g.cfg.has_server)
			return -1;
		tel.own = queue_open(&g.q, "", "", 1, fwd_may_drop());
		if (tel.own < 0) {
			log_warn("queue full: platform events dropped");
			return -1;
		}
		tel.own_cut = 0;
		own_metadata();
		if (tel.own_cut) { /* not even the metadata fits */
			queue_free(&g.q, tel.own);
			tel.own = -1;
			log_warn("queue full: platform events dropped");
			return -1;
		}
	}
	tel.own_mark = g.q.p[tel.own].len;
	tel.own_cut = 0;
	return 0;
}

/* End the line own_begin began; a line cut short is taken back. */
static void
own_line_end(void)
{
	if (tel.own < 0 || !tel.own_cut)
		return;
	queue_truncate(&g.q, tel.own, tel.own_mark);
	tel.logs_dropped++;
	log_warn("queue full: a platform event was dropped");
}

/* Close our payload so the forwarder sends it. */
static void
own_end(void)
{
	if (tel.own < 0)
		return;
	g.q.p[tel.own].open = 0;
	tel.own = -1;
}

/* A sample whose value is the platform's own number text, or an integer. */
static void
own_sample(const char *key, struct apm_str raw, int64_t v)
{
	char b[128];
	if (raw.len && raw.len < 64)
		snprintf(b, sizeof b, "\"%s\":{\"value\":%.*s}", key, (int)raw.len,
		    raw.ptr);
	else
		snprintf(b, sizeof b, "\"%s\":{\"value\":%lld}", key, (long long)v);
	own_puts(b);
}

/* platform.report -> one metricset with the Lambda metrics. */
static void
tel_report(const struct apm_tel_record *r)
{
	struct inv_info *inv = tel_inv_find(r->request_id);
	if (!inv || !inv->deadline_epoch_ms) {
		log_debug("platform.report for unknown request id %s; dropped",
		    r->request_id);
		return;
	}
	inv->reported = 1;
	if (own_begin() < 0)
		return;
	char b[1024];
	int64_t ts = r->time_us ? r->time_us : epoch_us();
	snprintf(b, sizeof b, "{\"metricset\":{\"timestamp\":%lld,\"faas\":{"
	    "\"coldstart\":%s,\"execution\":\"", (long long)ts,
	    r->has_init ? "true" : "false");
	own_puts(b);
	own_put_escaped(r->request_id, strlen(r->request_id));
	own_puts("\",\"id\":\"");
	own_put_escaped(inv->arn, strlen(inv->arn));
	own_puts("\",\"name\":\"");
	own_put_escaped(g.cfg.function_name, strlen(g.cfg.function_name));
	own_puts("\",\"version\":\"");
	own_put_escaped(g.cfg.function_version, strlen(g.cfg.function_version));
	own_puts("\"},\"samples\":{");
	struct apm_str none = { NULL, 0 };
	own_sample("faas.duration", r->duration_raw, (int64_t)r->duration_ms);
	own_puts(",");
	own_sample("faas.billed_duration", r->billed_raw, (int64_t)r->billed_ms);
	own_puts(",");
	if (r->has_init) {
		own_sample("faas.coldstart_duration", r->init_raw, (int64_t)r->init_ms);
		own_puts(",");
	}
	own_sample("faas.timeout", none, tel_inv_timeout_ms(inv));
	own_puts(",");
	own_sample("system.memory.total", none, r->memory_mb * 1048576);
	own_puts(",");
	own_sample("system.memory.actual.free", none,
	    (r->memory_mb - r->max_memory_mb) * 1048576);
	own_puts("}}}\n");
	own_line_end();
}

/* The length of a JSON string's contents without its trailing \n and \r
 * escapes (a backslash that is itself escaped is no escape). */
static size_t
json_trim_newlines(const char *p, size_t n)
{
	while (n >= 2 && (p[n - 1] == 'n' || p[n - 1] == 'r')) {
		size_t bs = 0;
		while (bs < n - 1 && p[n - 2 - bs] == '\\')
			bs++;
		if (bs % 2 == 0)
			break;
		n -= 2;
	}
	return n;
}

/*
 * A function log line -> one log event. It belongs to the invocation of the
 * last platform.start before it in the stream (telemetry can arrive after
 * the next INVOKE), else to the current one.
 */
static void
tel_function_log(const struct apm_tel_record *r)
{
	if (!g.cfg.capture_logs || own_begin() < 0)
		return;
	const char *rid = tel.stream_rid[0] ? tel.stream_rid : g.inv.request_id;
	struct inv_info *inv = tel_inv_find(rid);
	const char *arn = inv && inv->arn[0] ? inv->arn : g.inv.arn;
	char b[256];
	snprintf(b, sizeof b, "{\"log\":{\"@timestamp\":%lld,\"message\":\"",
	    (long long)(r->time_us ? r->time_us : epoch_us()));
	own_puts(b);
	struct apm_str m = r->log;
	if (r->log_is_string) /* already JSON string contents */
		own_put(m.ptr, json_trim_newlines(m.ptr, m.len));
	else
		own_put_escaped(m.ptr, m.len);
	own_puts("\",\"faas\":{\"id\":\"");
	own_put_escaped(arn, strlen(arn));
	own_puts("\",\"name\":\"");
	own_put_escaped(g.cfg.function_name, strlen(g.cfg.function_name));
	own_puts("\",\"execution\":\"");
	own_put_escaped(rid, strlen(rid));
	own_puts("\"}");
	if (inv && inv->trace_id[0]) { /* checked hex: nothing to escape */
		snprintf(b, sizeof b, ",\"trace.id\":\"%s\",\"transaction.id\":\"%s\"",
		    inv->trace_id, inv->tx_id);
		own_puts(b);
	}
	own_puts("}}\n");
	own_line_end();
}

/*
 * The invocation ended badly and its agent never reported: send the
 * transaction it registered, with result = status and outcome failure.
 */
static void
tel_proxy_transaction(const char *status)
{
	if (tel.proxy_sent || g.inv.agent_flushed || !g.reg.len ||
	    strcmp(g.reg.request_id, g.inv.request_id) != 0)
		return;
	const char *nl = memchr(g.reg.body, '\n', g.reg.len);
	const char *tx = nl + 1;
	size_t tlen = g.reg.len - (size_t)(tx - g.reg.body);
	while (tlen && (tx[tlen - 1] == '\n' || tx[tlen - 1] == '\r'))
		tlen--;
	struct apm_json_tok *t = tel.tx_toks;
	int n = apm_json_parse(tx, tlen, t, TEL_TOKENS, NULL, NULL);
	int obj = n > 0 ? apm_json_get(tx, t, n, 0, "transaction") : -1;
	if (obj < 0 || t[obj].type != APM_JSON_OBJECT || own_begin() < 0)
		return;
	tel.proxy_sent = 1;
	own_puts("{\"transaction\":{");
	int j = obj + 1, first = 1, has_span_count = 0;
	for (uint32_t k = 0; k < t[obj].size; k++) {
		int v = j + 1, next = apm_json_skip(t, n, v);
		if (apm_json_eq(tx, &t[j], "span_count"))
			has_span_count = 1;
		if (!apm_json_eq(tx, &t[j], "result") &&
		    !apm_json_eq(tx, &t[j], "outcome") &&
		    !apm_json_eq(tx, &t[j], "duration")) {
			if (!first)
				own_puts(",");
			/* key with quotes through the end of its value */
			uint32_t vend = t[v].type == APM_JSON_STRING ? t[v].end + 1 :
			    t[v].end;
			own_put(tx + t[j].start - 1, vend - (t[j].start - 1));
			first = 0;
		}
		j = next;
	}
	char b[256];
	own_puts(first ? "\"result\":\"" : ",\"result\":\"");
	own_put_escaped(status, strlen(status));
	snprintf(b, sizeof b, "\",\"outcome\":\"failure\",\"duration\":%lld%s}}\n",
	    (long long)((g.inv.ended ? g.inv.t_end : now_ms()) - g.inv.t_invoke),
	    has_span_count ? "" : ",\"span_count\":{\"started\":0}");
	own_puts(b);
	own_line_end();
	own_end();
	log_info("sent the registered transaction of %s (%s)", g.inv.request_id,
	    status);
}

/* platform.runtimeDone: the platform's own end of an invocation. */
static void
tel_runtime_done(const char *rid, const char *status)
{
	if (!g.inv.active || strcmp(rid, g.inv.request_id) != 0) {
		if (g.phase == PH_WAIT) { /* before its INVOKE was read */
			snprintf(g.done_pending, sizeof g.done_pending, "%s", rid);
			snprintf(g.done_pending_status, sizeof g.done_pending_status,
			    "%s", status);
		}
		return;
	}
	if (strcmp(status, "success") != 0)
		tel_proxy_transaction(status);
	invocation_end("runtimeDone");
}

static void
tel_record(const struct apm_tel_record *r)
{
	tel.records++;
	switch (r->type) {
	case APM_TEL_START: {
		struct inv_info *inv = tel_inv_get(r->request_id);
		if (r->time_us)
			inv->start_us = r->time_us;
		snprintf(tel.stream_rid, sizeof tel.stream_rid, "%s", r->request_id);
		break;
	}
	case APM_TEL_RUNTIME_DONE:
		tel_runtime_done(r->request_id, r->status);
		break;
	case APM_TEL_REPORT:
		tel_report(r);
		break;
	case APM_TEL_FUNCTION:
		tel_function_log(r);
		break;
	case APM_TEL_LOGS_DROPPED:
		tel.logs_dropped++;
		log_warn("Lambda dropped telemetry records (we were too slow)");
		break;
	}
}

/* Act on a whole POST body. Returns the status to answer. */
static int
tel_body(const char *js, size_t len)
{
	enum apm_err err;
	if (apm_json_parse(js, len, NULL, 0, NULL, &err) < 0) {
		tel.bad_posts++;
		log_warn("telemetry POST refused: %s", apm_err_str(err));
		return 400;
	}
	size_t pos = 0;
	while (pos < len && js[pos] != '[' && js[pos] != '{')
		pos++;
	if (pos == len || js[pos] != '[') {
		log_warn("telemetry POST refused: not a JSON array");
		return 400;
	}
	pos++;
	for (;;) {
		while (pos < len && strchr(" \t\r\n,", js[pos]))
			pos++;
		if (pos >= len || js[pos] == ']')
			break;
		size_t end;
		int n = apm_json_parse(js + pos, len - pos, tel.rec_toks, TEL_TOKENS, &end,
		    &err);
		if (n < 0) {
			/* valid JSON but too many tokens for one record: skip it */
			enum apm_err e2;
			if (apm_json_parse(js + pos, len - pos, NULL, 0, &end, &e2) < 0)
				break;
			log_warn("telemetry record too large; skipped");
		} else {
			struct apm_tel_record r;
			if (apm_tel_record_parse(js + pos, tel.rec_toks, n, &r) == 0)
				tel_record(&r);
		}
		pos += end;
	}
	own_end();
	return 200;
}

static void
tel_respond(struct telconn *t, int status, int close_after)
{
	msg_answer(&t->c, status, 0, "", NULL, 0, close_after);
	t->state = TS_RESPOND;
}

static void
tel_process(struct telconn *t)
{
	struct conn *c = &t->c;
	for (int guard = 0; guard < 8 && c->fd >= 0; guard++) {
		if (t->state == TS_RESPOND) {
			if (conn_flush(c) < 0 || (c->tx_len == 0 && c->close_after)) {
				conn_close(c);
				return;
			}
			if (c->tx_len)
				return;
			t->state = TS_HEAD;
		}
		if (t->state == TS_HEAD) {
			struct apm_http_header h[APM_HTTP_MAX_HEADERS];
			struct apm_http_msg m;
			if (c->rx_len == 0)
				return;
			int r = msg_head(c, 0, &m, h);
			if (r == 0)
				return;
			if (r < 0 || !apm_str_ieq(m.method, "POST")) {
				tel.bad_posts++;
				log_warn("telemetry request refused: %s", r < 0 ?
				    apm_err_str(m.error) : "not a POST");
				tel_respond(t, 400, 1);
				continue;
			}
			if (m.content_length > (int64_t)TEL_BODY_MAX) {
				tel.bad_posts++;
				log_warn("telemetry POST refused: body too large");
				tel_respond(t, 413, 1);
				continue;
			}
			msg_head_done(c, r);
			t->state = TS_BODY;
		}
		if (t->state == TS_BODY) {
			int r = body_step(&c->body, c->rx, &c->rx_len, 0);
			if (r < 0 || c->body.total > TEL_BODY_MAX) {
				tel.bad_posts++;
				log_warn("telemetry POST refused: %s", r < 0 ?
				    "bad chunked framing" : "body too large");
				tel_respond(t, r < 0 ? 400 : 413, 1);
				continue;
			}
			if (r == 0)
				return;
			int st = tel_body(c->rx, c->body.have);
			size_t big = c->body.have;
			msg_next(c);
			tel_respond(t, st, 0);
			if (big > TEL_KEEP_RESIDENT && c->rx_len == 0)
				pages_release(c->rx + TEL_KEEP_RESIDENT,
				    c->rx_cap - TEL_KEEP_RESIDENT);
		}
	}
}

static void
tel_accept(int lfd)
{
	for (int k = 0; k < 8; k++) {
		int fd = io.accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0)
			return;
		struct telconn *t = NULL;
		for (int i = 0; i < MAX_TEL_CONNS; i++)
			if (tel.conns[i].c.fd < 0)
				t = &tel.conns[i];
		if (!t) { /* Lambda retries; the idlest gives way */
			t = &tel.conns[0];
			if (tel.conns[1].c.last_active < t->c.last_active)
				t = &tel.conns[1];
			conn_close(&t->c);
		}
		buf_reset(&t->c);
		t->c.fd = fd;
		t->c.last_active = now_ms();
		t->state = TS_HEAD;
	}
}

/* poll() interest of the telemetry connections. */
static void
tel_events(struct pollset *ps)
{
	for (int i = 0; i < MAX_TEL_CONNS; i++) {
		struct telconn *t = &tel.conns[i];
		if (t->c.fd < 0)
			continue;
		short ev = t->state == TS_RESPOND ? POLLOUT :
		    (t->c.rx_len < t->c.rx_cap ? POLLIN : 0);
		pollset_add(ps, t->c.fd, ev, PK_TEL, i);
	}
}

static void
tel_dispatch(int idx, short revents)
{
	struct telconn *t = &tel.conns[idx];
	if (revents & (POLLIN | POLLHUP | POLLERR)) {
		if (conn_fill(&t->c) < 0 && !t->c.eof) {
			conn_close(&t->c);
			return;
		}
	}
	tel_process(t);
	if (t->c.fd >= 0 && t->c.eof && t->state != TS_RESPOND)
		conn_close(&t->c);
	else if (t->c.fd >= 0 && t->c.rx_len == t->c.rx_cap && t->state != TS_RESPOND) {
		log_warn("telemetry request too large");
		tel_respond(t, 413, 1);
	}
}

/* Close telemetry connections idle mid-request; the next such deadline. */
static int64_t
tel_timeouts(int64_t now)
{
	int64_t wake = 0;
	for (int i = 0; i < MAX_TEL_CONNS; i++) {
		struct conn *c = &tel.conns[i].c;
		if (c->fd < 0 || (tel.conns[i].state == TS_HEAD && c->rx_len == 0))
			continue;
		int64_t d = c->last_active + g.cfg.receiver_timeout_ms;
		if (now >= d)
			conn_close(c);
		else
			wake = earliest(wake, d);
	}
	return wake;
}

/* Subscribe to the Telemetry API (during init). */
static void
tel_subscribe(void)
{
	struct apm_http_header h[APM_HTTP_MAX_HEADERS];
	struct apm_http_msg m;
	char extra[256], body[512];
	int head;
	snprintf(extra, sizeof extra, "Lambda-Extension-Identifier: %s\r\n"
	    "Content-Type: application/json\r\n", g.lam.id);
	snprintf(body, sizeof body, "{\"schemaVersion\":\"2022-12-13\",\"types\":"
	    "[\"platform\"%s],\"buffering\":{\"maxItems\":1000,\"maxBytes\":262144,"
	    "\"timeoutMs\":25},\"destination\":{\"protocol\":\"HTTP\",\"URI\":"
	    "\"http://sandbox.localdomain:%u\"}}", g.cfg.capture_logs ?
	    ",\"function\"" : "", g.cfg.telemetry_port);
	int st = lambda_call("PUT", "/2022-07-01/telemetry", extra, body, &head,
	    &m, h);
	if (st == 200) {
		tel.subscribed = 1;
		log_debug("subscribed to the Telemetry API");
	} else {
		log_info("Telemetry API not available (status %d): no platform "
		    "metrics or function logs", st);
	}
}

/* == 20. Event loop == */

/* The endpoints whose names may be resolved while the loop runs. */
static struct endpoint *
loop_endpoint(int i)
{
	return i == 0 ? &g.apm : i == 1 ? &aws.sm : &aws.acm;
}


static void
lambda_event(const struct apm_lambda_event *e, int ok)
{
	if (!ok) {
		log_error("malformed event from /event/next; asking again");
		lambda_send_next();
		return;
	}
	int64_t now = now_ms();
	int64_t left = e->deadline_ms - epoch_us() / 1000;
	if (e->type == APM_EV_SHUTDOWN) {
		g.phase = PH_SHUTDOWN;
		g.exit_at = now + left - SHUTDOWN_MARGIN_MS;
		g.fwd.retry_at = 0; /* last chance: try at once */
		log_info("shutdown (%s), %lld ms left", e->shutdown_reason,
		    (long long)left);
		if (strcmp(e->shutdown_reason, "timeout") == 0 ||
		    strcmp(e->shutdown_reason, "failure") == 0)
			tel_proxy_transaction(e->shutdown_reason);
		g.shutdown_at = now;
		return;
	}
	if (e->type != APM_EV_INVOKE) {
		log_warn("unknown event type; ignored");
		lambda_send_next();
		return;
	}
	memset(&g.inv, 0, sizeof g.inv);
	g.inv.active = 1;
	g.inv.number++;
	snprintf(g.inv.request_id, sizeof g.inv.request_id, "%s", e->request_id);
	snprintf(g.inv.arn, sizeof g.inv.arn, "%s", e->function_arn);
	g.inv.t_invoke = now;
	g.inv.deadline = now + left;
	/* Thawed: timers that ran on through the freeze start again. */
	for (int i = 0; i < MAX_AGENT_CONNS; i++) {
		g.agents[i].c.last_active = g.agents[i].window_start = now;
		g.agents[i].window_total = g.agents[i].c.body.total;
	}
	for (int i = 0; i < NUM_ENDPOINTS; i++) /* it was frozen too */
		if (loop_endpoint(i)->resolver)
			loop_endpoint(i)->resolver_deadline = now +
			    g.cfg.forwarder_timeout_ms;
	tel_inv_track();
	log_debug("invoke %s, %lld ms to deadline", e->request_id, (long long)left);
	if (g.end_pending) {
		g.inv.agent_flushed = 1;
		invocation_end("agent flushed before INVOKE was read");
	}
	g.end_pending = 0;
	if (g.done_pending[0] && strcmp(g.done_pending, g.inv.request_id) == 0)
		tel_runtime_done(g.done_pending, g.done_pending_status);
	g.done_pending[0] = 0;
	if (g.cfg.background) {
		lambda_send_next();
	} else {
		g.phase = PH_INVOKE;
	}
}

/* Nothing held: no payload queued or being received. */
static int
loop_idle(void)
{
	return g.q.used == 0;
}

/*
 * This invocation's data is out. An agent request still arriving holds it
 * too (its end may be in flight beside the agent's flush), except after the
 * deadline: the function has timed out and that request cannot finish.
 */
static int
loop_flushed(void)
{
	if (!g.inv.by_deadline)
		return loop_idle();
	for (unsigned i = 0; i < g.q.npayloads; i++)
		if (g.q.p[i].used && !g.q.p[i].open)
			return 0;
	return 1;
}

/*
 * Deliveries are failing: the last attempt failed (refused, 5xx, timed
 * out) and none succeeded since, or the secrets they wait for cannot be had
 * (no credentials, or an attempt failed and the next waits for its
 * backoff). An invocation is not held then; the data stays queued and is
 * retried with backoff. A secrets call under way holds it (bounded by the
 * forwarder timeout and the deadline, as a delivery).
 */
static int
loop_failing(void)
{
	if (g.fwd.failures > 0)
		return 1;
	return aws_pending() && (!aws.key_id ||
	    (aws.backoff.failures > 0 && aws.current < 0));
}

/* Decide about /next and exit; returns the next deadline to wake for. */
static int64_t
loop_lambda_tick(int64_t now)
{
	if (g.phase == PH_SHUTDOWN) {
		uint64_t cnt, bytes;
		int report_wait = tel_report_pending() &&
		    now < g.shutdown_at + REPORT_WAIT_MS;
		if ((loop_idle() && !report_wait) || now >= g.exit_at ||
		    !g.cfg.has_server || g.fwd.retry_at > g.exit_at) {
			fwd_held(&cnt, &bytes);
			if (cnt)
				log_error("exiting with %llu payloads (%llu bytes) "
				    "undelivered", (unsigned long long)cnt,
				    (unsigned long long)bytes);
			log_info("exit: %llu payloads delivered (%llu bytes), %llu "
			    "dropped, %llu rejected by the server",
			    (unsigned long long)g.q.delivered,
			    (unsigned long long)g.q.delivered_bytes,
			    (unsigned long long)g.q.dropped,
			    (unsigned long long)g.q.rejected);
			for (int i = 0; i < NUM_ENDPOINTS; i++)
				resolver_stop(loop_endpoint(i));
			io.exit(0);
		}
		return report_wait ? MIN(g.exit_at, g.shutdown_at + REPORT_WAIT_MS) :
		    g.exit_at;
	}
	if (g.lam.retry_at && g.lam.req == LR_NONE) { /* a /next that failed */
		if (now >= g.lam.retry_at)
			lambda_send_next();
		return g.lam.retry_at; /* 0 once sent */
	}
	if (g.phase != PH_INVOKE || g.lam.req != LR_NONE)
		return 0;
	if (!g.inv.ended && now >= g.inv.deadline - DEADLINE_MARGIN_MS) {
		g.inv.by_deadline = 1;
		invocation_end("deadline");
	}
	if (!g.inv.ended)
		return g.inv.deadline - DEADLINE_MARGIN_MS;
	/* Held for the forwarder timeout at most, and never past the deadline:
	 * a /next after it makes Lambda time the invocation out. */
	int64_t bound = MIN(g.inv.t_end + g.cfg.forwarder_timeout_ms,
	    g.inv.deadline - DEADLINE_MARGIN_MS);
	int failing = loop_failing();
	if (loop_flushed() || failing || now >= bound) {
		if (!loop_idle())
			log_info("calling /event/next with %u payloads held (%s)",
			    g.q.used, loop_flushed() ? "agent request still open at "
			    "the deadline" : failing ? (g.fwd.failures ? "APM server failing" :
			    "secrets unavailable") :
			    now >= g.inv.deadline - DEADLINE_MARGIN_MS ?
			    "invocation deadline" : "forwarder timeout");
		g.inv.active = 0;
		lambda_send_next();
		return g.lam.retry_at; /* 0 once sent */
	}
	return bound;
}




/*
 * Before a busy plain-http upstream is timed out: read what has come (after
 * a freeze, an answer may wait whole in the socket, or its end: a close).
 * Each step reads until the socket is empty; one that finds nothing costs
 * a recv. 1 when that ended the job.
 */
static int
upstream_drain(struct upstream *u)
{
	if (u->state != UP_BUSY || u->c.tls)
		return 0;
	for (int k = 0; k < 64 && u->state == UP_BUSY; k++)
		upstream_step(u, POLLIN);
	return u->state != UP_BUSY; /* answered, or failed otherwise */
}

static void
upstream_timeouts(int64_t now)
{
	for (int i = 0; i < NUM_UPSTREAM; i++) {
		struct upstream *u = &g.up[i];
		if (u->c.fd < 0 || !u->c.deadline || now < u->c.deadline)
			continue;
		if (u->state == UP_BUSY && u->job == JOB_PAYLOAD && !u->sent_last &&
		    g.q.p[u->payload].open && u->sent >= g.q.p[u->payload].len) {
			u->c.deadline = 0; /* waiting for the agent, not the server */
			continue;
		}
		if (upstream_drain(u))
			continue; /* the answer had come: it ended the job */
		upstream_fail(u, "timed out");
	}
}

/* A resolver answered (r 1), failed or timed out (r -1). */
static void
loop_resolved(struct endpoint *ep, int r, const char *why)
{
	g.progress++;
	if (r > 0) {
		log_debug("%s resolved", ep->url.host);
		if (ep == &g.apm)
			fwd_prewarm(aws_acm_wanted());
		return;
	}
	/* A failed resolution is a failed delivery (or AWS call): the next one
	 * follows the same backoff. */
	char msg[300];
	snprintf(msg, sizeof msg, "cannot resolve %.200s: %s", ep->url.host, why);
	if (ep == &g.apm) {
		fwd_backoff(msg);
		ep->resolve_after = g.fwd.retry_at;
		proxy_fail_waiting();
	} else {
		aws_failed(msg);
		ep->resolve_after = aws.backoff.retry_at;
	}
}

/* Resolvers whose deadline passed; the next deadline or retry time. */
static int64_t
resolver_timeouts(int64_t now)
{
	int64_t wake = 0;
	for (int i = 0; i < NUM_ENDPOINTS; i++) {
		struct endpoint *ep = loop_endpoint(i);
		if (!ep->resolver && !ep->resolved && ep->resolve_after > now)
			wake = earliest(wake, ep->resolve_after); /* try again then */
		if (!ep->resolver)
			continue;
		if (now >= ep->resolver_deadline) {
			resolver_stop(ep);
			loop_resolved(ep, -1, "resolver timed out");
			continue;
		}
		wake = earliest(wake, ep->resolver_deadline);
	}
	return wake;
}

/* Stage 1: a signal, then the jobs that can start (secrets, deliveries,
 * proxied calls). */
static void
loop_schedule(int64_t now)
{
	if (g.got_term && g.phase != PH_SHUTDOWN) {
		g.phase = PH_SHUTDOWN;
		g.exit_at = now + 1000;
		log_info("SIGTERM: flushing for up to 1000 ms, then exiting");
	}
	aws_schedule();
	fwd_schedule(aws_pending());
	proxy_schedule(aws_first_call_pending());
}

/* Stage 2: every kind's timers and pending work; the earliest next wake-up
 * (0 none) from those that are not a connection's deadline. */
static int64_t
loop_timeouts(int64_t now)
{
	for (int i = 0; i < MAX_AGENT_CONNS; i++)
		if (g.agents[i].c.fd >= 0) {
			agent_process(&g.agents[i]);
			if (g.agents[i].c.fd >= 0)
				agent_timeouts(&g.agents[i], now);
		}
	for (int i = 0; i < NUM_UPSTREAM; i++)
		if (g.up[i].c.fd >= 0 && g.up[i].state == UP_BUSY)
			upstream_step(&g.up[i], 0);
	upstream_timeouts(now);
	int64_t wake = loop_lambda_tick(now);
	wake = earliest(wake, tel_timeouts(now));
	if (g.fwd.retry_at > now && !loop_idle())
		wake = earliest(wake, g.fwd.retry_at);
	wake = earliest(wake, fwd_not_before(now));
	if (aws_pending() && aws.current < 0 && aws.backoff.retry_at > now)
		wake = earliest(wake, aws.backoff.retry_at);
	return earliest(wake, resolver_timeouts(now));
}

/* Stage 3: the poll set, each kind with its interest; connections' deadlines
 * join wake. */
static int64_t
loop_fill(struct pollset *ps, int64_t wake)
{
	for (int i = 0; i < NUM_LISTENERS; i++)
		if (g.listen_fd[i] >= 0)
			pollset_add(ps, g.listen_fd[i], POLLIN, PK_LISTEN, i);
	if (g.lam.c.fd >= 0 && g.lam.req != LR_NONE)
		pollset_add(ps, g.lam.c.fd, POLLIN | (g.lam.c.tx_len ? POLLOUT : 0),
		    PK_LAMBDA, 0);
	for (int i = 0; i < MAX_AGENT_CONNS; i++) {
		struct agent *a = &g.agents[i];
		if (a->c.fd < 0)
			continue;
		wake = earliest(wake, a->c.deadline);
		pollset_add(ps, a->c.fd, agent_events(a), PK_AGENT, i);
	}
	for (int i = 0; i < NUM_UPSTREAM; i++) {
		struct upstream *u = &g.up[i];
		if (u->c.fd < 0)
			continue;
		wake = earliest(wake, u->c.deadline);
		pollset_add(ps, u->c.fd, upstream_events(u), PK_UP, i);
	}
	tel_events(ps);
	for (int i = 0; i < NUM_ENDPOINTS; i++)
		if (loop_endpoint(i)->resolver)
			pollset_add(ps, loop_endpoint(i)->resolver_fd, POLLIN,
			    PK_RESOLVER, i);
	return wake;
}

/*
 * Stage 4: how long poll may sleep: until wake (0: no timer). A job that
 * ended in this pass (g.progress moved) freed a connection or a queue slot
 * that waiting work may take: the pass runs again at once, without sleeping.
 */
static int
loop_poll_timeout(int64_t wake, int job_ended)
{
	if (job_ended)
		return 0;
	if (!wake)
		return -1;
	int64_t d = wake - now_ms();
	return d <= 0 ? 0 : (int)MIN(d + 1, (int64_t)INT_MAX);
}

/* Stage 5: hand each ready descriptor to its owner. */
static void
loop_dispatch(const struct pollset *ps, int ready)
{
	for (int i = 0; i < ps->n && ready > 0; i++) {
		short re = ps->pfd[i].revents;
		int idx = ps->ref[i].idx;
		if (!re)
			continue;
		switch (ps->ref[i].kind) {
		case PK_LISTEN:
			if (idx == LS_TELEMETRY)
				tel_accept(ps->pfd[i].fd);
			else
				agent_accept(ps->pfd[i].fd, idx == LS_OTLP4 ||
				    idx == LS_OTLP6);
			break;
		case PK_LAMBDA: {
			struct apm_lambda_event ev; /* points into the rx it came in */
			int got = lambda_step(re, &ev);
			if (got)
				lambda_event(&ev, got > 0);
			break;
		}
		case PK_AGENT:
			agent_step(&g.agents[idx], re);
			break;
		case PK_UP:
			upstream_step(&g.up[idx], re);
			break;
		case PK_TEL:
			tel_dispatch(idx, re);
			break;
		case PK_RESOLVER: {
			struct endpoint *ep = loop_endpoint(idx);
			const char *why = "";
			int rr = resolver_read(ep, &why);
			if (rr)
				loop_resolved(ep, rr, why);
			break;
		}
		}
	}
}

/*
 * Lambda freezes the sandbox only while every extension waits in /next, and
 * the monotonic clock runs on through a freeze. A poll that returned much
 * later than asked (asked_ms), while we waited there, slept through one,
 * which began when the poll did (Lambda freezes right after /next): the
 * forwarder's deadlines count awake time, as the agents' timers do (they
 * start again at INVOKE), so they move on by the whole sleep. Else an answer
 * that came while frozen but takes another read (its end, its close) would
 * be timed out after the thaw, and the payload sent twice.
 */
static void
loop_thawed(int64_t asked_ms, int64_t slept_ms)
{
	if (asked_ms < 0 || slept_ms - asked_ms < FREEZE_MIN_MS)
		return;
	for (int i = 0; i < NUM_UPSTREAM; i++)
		if (g.up[i].c.fd >= 0 && g.up[i].c.deadline)
			g.up[i].c.deadline += slept_ms;
	log_debug("thawed after %lld ms in poll (%lld asked)",
	    (long long)slept_ms, (long long)asked_ms);
}

static void
loop_run(void)
{
	struct pollset ps;
	for (;;) {
		int64_t now = now_ms();
		uint64_t progress = g.progress;
		loop_schedule(now);
		int64_t wake = loop_timeouts(now);
		ps.n = 0;
		wake = loop_fill(&ps, wake);
		int timeout = loop_poll_timeout(wake, g.progress != progress);
		int in_next = g.lam.req == LR_NEXT;
		int r = io.poll(ps.pfd, (nfds_t)ps.n, timeout);
		if (in_next)
			loop_thawed(timeout, now_ms() - now);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			log_error("poll: %s", strerror(errno));
			io.exit(0);
		}
		loop_dispatch(&ps, r);
	}
}

/* == 21. Configuration and main == */

/* A setting that did not parse: one warning naming it, the value and the
 * default. Secrets never pass through here. */
static void
cfg_warn(const char *name, const char *value, const char *dflt)
{
	log_warn("%s=\"%.64s\" is not valid; using the default %s", name, value,
	    dflt);
}

static int64_t
cfg_duration(const char *name, const char *seconds_name, int64_t dflt_ms)
{
	const char *v = getenv(name);
	int64_t ms;
	char d[32];
	snprintf(d, sizeof d, "%lldms", (long long)dflt_ms);
	if (v && *v) {
		if (apm_duration_parse(v, strlen(v), &ms) == 0 && ms > 0)
			return ms;
		cfg_warn(name, v, d);
		return dflt_ms;
	}
	v = seconds_name ? getenv(seconds_name) : NULL;
	if (v && *v) {
		uint64_t s;
		if (apm_uint_parse(v, strlen(v), 86400, &s) == 0 && s > 0)
			return (int64_t)s * 1000;
		if (apm_duration_parse(v, strlen(v), &ms) == 0 && ms > 0)
			return ms;
		cfg_warn(seconds_name, v, d);
	}
	return dflt_ms;
}

static int
cfg_bool(const char *name, int dflt)
{
	const char *v = getenv(name);
	int b;
	if (!v || !*v)
		return dflt;
	if (apm_bool_parse(v, strlen(v), &b) == 0)
		return b;
	cfg_warn(name, v, dflt ? "true" : "false");
	return dflt;
}

static uint64_t
cfg_uint(const char *name, uint64_t dflt, uint64_t min, uint64_t max)
{
	const char *v = getenv(name);
	uint64_t u;
	char d[32];
	if (!v || !*v)
		return dflt;
	if (apm_uint_parse(v, strlen(v), max, &u) == 0 && u >= min)
		return u;
	snprintf(d, sizeof d, "%llu", (unsigned long long)dflt);
	cfg_warn(name, v, d);
	return dflt;
}


static void
cfg_load(struct config *c)
{
	const char *lvl = getenv("ELASTIC_APM_LOG_LEVEL");
	if (lvl && *lvl) {
		int found = 0;
		for (int i = 0; i <= LOG_OFF; i++)
			if (apm_str_ieq((struct apm_str){ lvl, strlen(lvl) }, log_names[i])) {
				log_threshold = i;
				found = 1;
			}
		if (apm_str_ieq((struct apm_str){ lvl, strlen(lvl) }, "warning")) {
			log_threshold = LOG_WARN;
			found = 1;
		}
		if (!found)
			cfg_warn("ELASTIC_APM_LOG_LEVEL", lvl, "info");
	}
	const char *url = getenv("ELASTIC_APM_LAMBDA_APM_SERVER");
	if (url && *url) {
		if (apm_url_parse(url, strlen(url), &g.apm.url) == 0)
			c->has_server = 1;
		else if (strchr(url, '@'))
			log_error("ELASTIC_APM_LAMBDA_APM_SERVER holds credentials "
			    "(user:password@), which are not supported (value not "
			    "logged): use ELASTIC_APM_SECRET_TOKEN or ELASTIC_APM_API_KEY; "
			    "agent data will be discarded");
		else
			log_error("ELASTIC_APM_LAMBDA_APM_SERVER=\"%.128s\" is not an "
			    "http(s) URL: agent data will be discarded", url);
	} else {
		log_error("ELASTIC_APM_LAMBDA_APM_SERVER is not set: agent data "
		    "will be accepted and discarded");
	}
	aws_apply_auth();
	c->receiver_port = (uint16_t)cfg_uint("ELASTIC_APM_DATA_RECEIVER_SERVER_PORT",
	    8200, 1, 65535);
	c->telemetry_port = (uint16_t)cfg_uint("APM_EXT_TELEMETRY_PORT",
	    TELEMETRY_PORT_DEFAULT, 1, 65535);
	c->otlp_port = (uint16_t)cfg_uint("APM_EXT_OTLP_PORT", OTLP_PORT_DEFAULT,
	    0, 65535);
	c->receiver_timeout_ms = cfg_duration("ELASTIC_APM_DATA_RECEIVER_TIMEOUT",
	    "ELASTIC_APM_DATA_RECEIVER_TIMEOUT_SECONDS", 15000);
	c->forwarder_timeout_ms = cfg_duration("ELASTIC_APM_DATA_FORWARDER_TIMEOUT",
	    "ELASTIC_APM_DATA_FORWARDER_TIMEOUT_SECONDS", 3000);
	const char *strat = getenv("ELASTIC_APM_SEND_STRATEGY");
	if (strat && *strat) {
		struct apm_str s = { strat, strlen(strat) };
		if (apm_str_ieq(s, "background"))
			c->background = 1;
		else if (!apm_str_ieq(s, "syncflush"))
			cfg_warn("ELASTIC_APM_SEND_STRATEGY", strat, "syncflush");
	}
	c->buffer_requests = (unsigned)cfg_uint(
	    "ELASTIC_APM_LAMBDA_AGENT_DATA_BUFFER_SIZE", 100, 1, 100000);
	c->queue_bytes = (size_t)cfg_uint("APM_EXT_QUEUE_BYTES",
	    QUEUE_BYTES_DEFAULT, 4 * BLOCK_SIZE, (uint64_t)1 << 32);
	c->max_body = MIN((size_t)APM_MAX_BODY_DEFAULT, c->queue_bytes / 2);
	c->verify_cert = cfg_bool("ELASTIC_APM_LAMBDA_VERIFY_SERVER_CERT", 1);
	c->capture_logs = cfg_bool("ELASTIC_APM_LAMBDA_CAPTURE_LOGS", 1);
	c->disable_telemetry = cfg_bool("ELASTIC_APM_LAMBDA_DISABLE_LOGS_API", 0);
	c->ca_file = getenv("ELASTIC_APM_SERVER_CA_CERT_FILE");
	c->ca_pem = getenv("ELASTIC_APM_LAMBDA_SERVER_CA_CERT_PEM");
	c->function_name = env_or("AWS_LAMBDA_FUNCTION_NAME", "unknown");
	c->function_version = env_or("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST");
	c->region = env_or("AWS_REGION", "");
	c->memory_mb = env_or("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "");
	aws_config();
}

/* One anonymous mapping for every buffer: untouched pages cost nothing.
 * While arena_sizing, takes only add up what they would take. */
static char *arena_ptr;
static size_t arena_left, arena_sized;
static int arena_sizing;

static void *
arena_take(size_t n)
{
	n = (n + 63) & ~(size_t)63;
	if (arena_sizing) {
		arena_sized += n;
		return NULL;
	}
	if (NEVER(n > arena_left))
		return NULL;
	void *p = arena_ptr;
	arena_ptr += n;
	arena_left -= n;
	return p;
}

static void
conn_bufs(struct conn *c, size_t rx, size_t tx)
{
	c->fd = -1;
	c->rx = arena_take(rx);
	c->rx_cap = rx;
	c->tx = arena_take(tx);
	c->tx_cap = tx;
}

/* Every buffer of the arena, taken in order (or, while sizing, counted). */
static void
state_bufs(void)
{
	struct queue *q = &g.q;
	q->mem = arena_take((size_t)q->nblocks * BLOCK_SIZE);
	q->next = arena_take((size_t)q->nblocks * sizeof(int));
	q->free_stack = arena_take((size_t)q->nblocks * sizeof(int));
	q->p = arena_take(q->npayloads * sizeof(struct payload));
	for (int i = 0; i < MAX_AGENT_CONNS; i++) {
		conn_bufs(&g.agents[i].c, RX_BUF, RX_BUF + 1024);
		g.agents[i].payload = -1;
	}
	for (int i = 0; i < NUM_UPSTREAM; i++) {
		conn_bufs(&g.up[i].c, i == AWS_SLOT ? AWS_RX : RX_BUF, TX_BUF);
		g.up[i].payload = g.up[i].agent = -1;
		g.up[i].ep = &g.apm;
	}
	for (int i = 0; i < MAX_TEL_CONNS; i++)
		conn_bufs(&tel.conns[i].c, TEL_BODY_MAX + APM_HTTP_MAX_HEAD, 256);
	g.reg.body = arena_take(REG_MAX);
	if ((g.cfg.has_server && g.apm.url.tls) || g.cfg.from_aws)
		tls.slots = arena_take(NUM_UPSTREAM * sizeof(struct tls_slot));
}

/* Reserve the arena, sized by a counting pass of state_bufs, and take it. */
static int
state_init(void)
{
	g.q.nblocks = (int)(g.cfg.queue_bytes / BLOCK_SIZE);
	g.q.npayloads = g.cfg.buffer_requests;
	arena_sizing = 1;
	arena_sized = 0;
	state_bufs();
	arena_sizing = 0;
	void *m = mmap(NULL, arena_sized, PROT_READ | PROT_WRITE,
	    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED) {
		log_error("cannot reserve %zu bytes: %s", arena_sized,
		    strerror(errno));
		return -1;
	}
	arena_ptr = m;
	arena_left = arena_sized;
	state_bufs();
	return 0;
}

static void
on_term(int sig)
{
	(void)sig;
	g.got_term = 1;
}

static void
listener_telemetry(void)
{
	g.listen_fd[LS_TELEMETRY] = -1;
	if (!g.cfg.disable_telemetry) {
		g.listen_fd[LS_TELEMETRY] = sock_listen(AF_INET, "0.0.0.0",
		    g.cfg.telemetry_port);
		if (g.listen_fd[LS_TELEMETRY] < 0)
			log_warn("cannot listen for telemetry on port %u: %s",
			    g.cfg.telemetry_port, strerror(errno));
	}
}

/* A loopback listener pair (127.0.0.1 and ::1) on port, for what. */
static void
listeners_loopback(int v4, int v6, uint16_t port, const char *what)
{
	g.listen_fd[v4] = sock_listen(AF_INET, "127.0.0.1", port);
	if (g.listen_fd[v4] < 0)
		log_error("cannot listen on 127.0.0.1:%u: %s; %s cannot send data",
		    port, strerror(errno), what);
	g.listen_fd[v6] = sock_listen(AF_INET6, "::1", port);
	if (g.listen_fd[v6] < 0)
		log_debug("no listener on [::1]:%u: %s", port, strerror(errno));
}

/* The agents' intake port and, unless turned off, OTLP/HTTP's. */
static void
listeners_open(void)
{
	listeners_loopback(LS_INTAKE4, LS_INTAKE6, g.cfg.receiver_port, "agents");
	g.listen_fd[LS_OTLP4] = g.listen_fd[LS_OTLP6] = -1;
	if (g.cfg.otlp_port)
		listeners_loopback(LS_OTLP4, LS_OTLP6, g.cfg.otlp_port,
		    "OpenTelemetry exporters");
}

/* The Extensions API address from AWS_LAMBDA_RUNTIME_API ("host:port"). */
static int
lambda_addr(const char *api)
{
	struct lambda *l = &g.lam;
	const char *colon = strrchr(api, ':');
	uint64_t port;
	char host[128];
	if (!colon || (size_t)(colon - api) >= sizeof host ||
	    apm_uint_parse(colon + 1, strlen(colon + 1), 65535, &port) < 0)
		return -1;
	memcpy(host, api, (size_t)(colon - api));
	host[colon - api] = 0;
	char *h = host;
	if (h[0] == '[') { /* "[v6]": the brackets must close */
		size_t hl = strlen(h);
		if (hl < 3 || h[hl - 1] != ']')
			return -1;
		h[hl - 1] = 0;
		h++;
	}
	snprintf(l->host, sizeof l->host, "%s", api);
	return sock_resolve(h, (uint16_t)port, &l->addr, &l->addrlen);
}

#ifdef APM_EXT_TEST
#define main apm_ext_main
int apm_ext_main(int argc, char **argv);
#endif

/* --version and --help: answered before anything else runs. 1 if handled. */
static int
main_flags(int argc, char **argv)
{
	static const char usage[] =
	    APM_EXT_NAME " " APM_EXT_VERSION ": AWS Lambda extension for Elastic APM.\n"
	    "Lambda starts it from the layer (extensions/apm-lambda-extension); it\n"
	    "receives the APM agents' data on localhost:8200 and forwards it to the\n"
	    "APM server named by ELASTIC_APM_LAMBDA_APM_SERVER. It is configured by\n"
	    "environment variables only: see README.md (Configuration).\n"
	    "Flags: --version, --help.\n";
	if (argc < 2)
		return 0;
	static const char version[] = APM_EXT_NAME " " APM_EXT_VERSION "\n";
	const char *out;
	if (strcmp(argv[1], "--version") == 0)
		out = version;
	else if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)
		out = usage;
	else
		return 0;
	(void)!write(1, out, strlen(out));
	return 1;
}

int
main(int argc, char **argv)
{
	static char lam_rx[RX_BUF], lam_tx[1024];
	if (main_flags(argc, argv))
		return 0;
	const char *api = getenv("AWS_LAMBDA_RUNTIME_API");
	const char *name = argc > 0 ? strrchr(argv[0], '/') : NULL;
	name = name ? name + 1 : (argc > 0 ? argv[0] : APM_EXT_NAME);
	g.lam.c = (struct conn){ .fd = -1, .rx = lam_rx, .rx_cap = sizeof lam_rx,
		.tx = lam_tx, .tx_cap = sizeof lam_tx };
	if (!api || lambda_addr(api) < 0) {
		log_error("AWS_LAMBDA_RUNTIME_API is missing or malformed: this is "
		    "a Lambda extension, started by Lambda (try --help)");
		return 1;
	}
	tel.own = aws.current = -1;
	/* Register first: the function's init waits for it. */
	if (lambda_register(name) < 0)
		return 1;
	cfg_load(&g.cfg);
	/* Then only what must exist before /next: the listeners (an agent may
	 * connect as soon as the runtime runs) and the telemetry subscription.
	 * Buffers and the rest are set up while /next waits. */
	listeners_open();
	listener_telemetry();
	if (!g.cfg.disable_telemetry)
		tel_subscribe();
	lambda_send_next();
	g.phase = PH_WAIT;
	if (state_init() < 0)
		return 1;
	log_debug("registered as %s", name);
	struct sigaction sa = { 0 };
	sa.sa_handler = on_term;
	sigaction(SIGTERM, &sa, NULL);
	g.rnd = (uint32_t)epoch_us() ^ (uint32_t)getpid() << 16;
	g.apm.verify = g.cfg.verify_cert;
	g.apm.what = "the APM server";
	if (g.cfg.has_server && g.apm.url.tls && !g.cfg.verify_cert)
		log_warn("ELASTIC_APM_LAMBDA_VERIFY_SERVER_CERT=false: the APM "
		    "server's certificate is not checked");
	fwd_prewarm(aws_acm_wanted());
	loop_run();
	return 0;
}
