/*
 * apm-ext.h - the test contract of apm-ext: limits, the error list, the pure
 * structs and the prototypes of the pure parts (parsers, formatters, backoff,
 * settings). Everything else in apm-ext.c is static.
 *
 * Conventions (picohttpparser, jsmn): parsers return bytes consumed or a
 * count (>= 0), APM_MALFORMED (-1) for bad input, APM_NEED_MORE (-2) when the
 * input ends too early. They never read past the length they are given and
 * never require a NUL. Strings are views {ptr, len} into the caller's buffer.
 */
#ifndef APM_EXT_H
#define APM_EXT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define APM_EXT_NAME "apm-ext"
#define APM_EXT_VERSION "0.1.0"

/* == Limits (of the parsers; hitting one is an error the caller sees) == */
#define APM_HTTP_MAX_HEAD 8192        /* request/status line + headers, bytes */
#define APM_HTTP_MAX_HEADERS 64       /* header lines per message */
#define APM_CHUNK_MAX_LINE 256        /* chunk-size line incl. extensions */
#define APM_CHUNK_MAX_TRAILER 4096    /* trailer section bytes */
#define APM_JSON_MAX_DEPTH 64         /* nesting of objects/arrays */
#define APM_URL_MAX 1024              /* server URL length */
#define APM_MAX_BODY_DEFAULT (8u << 20) /* one agent request body, bytes */

/* Return codes of the pure parsers. */
#define APM_MALFORMED (-1)
#define APM_NEED_MORE (-2)

/* == Errors: one list, expanded into the enum and the message table == */
#define APM_ERRORS(X)                                                         \
	X(OK, "ok")                                                           \
	X(HEAD_TOO_LARGE, "request or status line and headers too large")     \
	X(TOO_MANY_HEADERS, "too many header lines")                          \
	X(BAD_START_LINE, "malformed request or status line")                 \
	X(BAD_HEADER, "malformed header line")                                \
	X(BAD_VERSION, "unsupported HTTP version")                            \
	X(BAD_LENGTH, "malformed or conflicting Content-Length")              \
	X(BAD_TRANSFER_ENCODING, "unsupported Transfer-Encoding")             \
	X(BAD_CHUNK, "malformed chunked body")                                \
	X(BODY_TOO_LARGE, "body too large")                                   \
	X(BAD_JSON, "malformed JSON")                                         \
	X(JSON_TOO_LARGE, "JSON too large or too deep")                       \
	X(BAD_URL, "malformed URL")                                           \
	X(BAD_DURATION, "malformed duration")                                 \
	X(BAD_BOOL, "malformed boolean")                                      \
	X(BAD_NUMBER, "malformed number")

enum apm_err {
#define APM_ERR_ENUM(name, msg) APM_E_##name,
	APM_ERRORS(APM_ERR_ENUM)
#undef APM_ERR_ENUM
	APM_E__COUNT
};

/* The message of an error code; never NULL. */
const char *apm_err_str(enum apm_err e);

/* A string view. No NUL terminator is implied. */
struct apm_str {
	const char *ptr;
	size_t len;
};

/* Case-insensitive equality of a view and a C string. */
int apm_str_ieq(struct apm_str s, const char *lit);

/* == HTTP/1.1 head parser == */
struct apm_http_header {
	struct apm_str name;
	struct apm_str value;
};

struct apm_http_msg {
	struct apm_str method;       /* requests only */
	struct apm_str target;       /* requests only: path and query */
	int status;                  /* responses only */
	struct apm_str reason;       /* responses only */
	int minor_version;           /* 0 or 1 */
	struct apm_http_header *headers; /* caller's array */
	size_t num_headers;          /* out: headers found */
	/* Derived from the headers while parsing: */
	int64_t content_length;      /* -1 when absent */
	int chunked;                 /* Transfer-Encoding: chunked */
	int close;                   /* connection ends after this message */
	int expect_continue;         /* Expect: 100-continue */
	enum apm_err error;          /* why APM_MALFORMED was returned */
};

/*
 * Parse a request head in buf[0..len). prev_len is the length given on the
 * previous call for the same message (0 at first), so a head that arrives
 * byte by byte is scanned once. headers/cap: the caller's header array.
 * Returns the head length (body starts there), APM_NEED_MORE, or
 * APM_MALFORMED with m->error set (HEAD_TOO_LARGE once len passes
 * APM_HTTP_MAX_HEAD without a complete head).
 */
int apm_http_parse_request(const char *buf, size_t len, size_t prev_len,
    struct apm_http_msg *m, struct apm_http_header *headers, size_t cap);

/* Same for a response head ("HTTP/1.x NNN reason"). */
int apm_http_parse_response(const char *buf, size_t len, size_t prev_len,
    struct apm_http_msg *m, struct apm_http_header *headers, size_t cap);

/* The value of the first header named name (case-insensitive), or {0,0}. */
struct apm_str apm_http_header_get(const struct apm_http_msg *m,
    const char *name);

/* == Chunked transfer decoder (resumable, decodes in place) == */
struct apm_chunk_dec {
	int state;              /* private; zero to start */
	uint64_t remaining;     /* bytes left in the current chunk */
	unsigned line_len;      /* bytes seen in the current size/trailer line */
	unsigned trailer_len;   /* bytes seen in the trailer section */
	unsigned digits;        /* hex digits of the current size */
	enum apm_err error;
};

/*
 * Decode the chunked bytes buf[0..*len) in place: on return buf[0..*len)
 * holds the decoded data. Returns APM_NEED_MORE while the body goes on,
 * APM_MALFORMED (d->error set) on bad framing, or, once the last chunk and
 * trailers are complete, the number of bytes that followed the body; they
 * are left at buf[*len .. *len + ret) (the next pipelined request).
 */
ssize_t apm_chunk_decode(struct apm_chunk_dec *d, char *buf, size_t *len);

/* == JSON reader (jsmn-like tokens over the caller's text) == */
enum apm_json_type {
	APM_JSON_NONE = 0,
	APM_JSON_OBJECT,
	APM_JSON_ARRAY,
	APM_JSON_STRING,  /* start/end exclude the quotes; escapes left as is */
	APM_JSON_NUMBER,
	APM_JSON_TRUE,
	APM_JSON_FALSE,
	APM_JSON_NULL,
};

struct apm_json_tok {
	uint8_t type;   /* enum apm_json_type */
	uint32_t start; /* offset of the first byte */
	uint32_t end;   /* offset after the last byte */
	uint32_t size;  /* object: keys; array: elements; else 0 */
};

/*
 * Validate and tokenize the single JSON value at the start of js[0..len)
 * (leading whitespace allowed). toks may be NULL to only validate and count.
 * If end is NULL, only whitespace may follow the value; else *end receives
 * the offset just after the value. Returns the number of tokens, or
 * APM_MALFORMED with *err set (BAD_JSON, or JSON_TOO_LARGE when cap or
 * APM_JSON_MAX_DEPTH is exceeded). An object key is a STRING token followed
 * by its value's tokens.
 */
int apm_json_parse(const char *js, size_t len, struct apm_json_tok *toks,
    unsigned cap, size_t *end, enum apm_err *err);

/* Index of the token after the whole subtree of toks[i]. */
int apm_json_skip(const struct apm_json_tok *toks, int n, int i);

/* Index of the value of key in the object toks[obj], or -1. */
int apm_json_get(const char *js, const struct apm_json_tok *toks, int n,
    int obj, const char *key);

/*
 * Unescape the string token t into out (capacity cap, NUL added).
 * Returns the length, or -1 when it does not fit or a \u escape is bad.
 */
int apm_json_str(const char *js, const struct apm_json_tok *t, char *out,
    size_t cap);

/* True when string token t equals lit exactly (no escapes in lit). */
int apm_json_eq(const char *js, const struct apm_json_tok *t, const char *lit);

/* Integer value of a NUMBER token (fraction truncated); 0 or -1. */
int apm_json_int(const char *js, const struct apm_json_tok *t, int64_t *out);

/* Double value of a NUMBER token; 0 or -1. */
int apm_json_double(const char *js, const struct apm_json_tok *t,
    double *out);

/*
 * Write s[0..len) as the inside of a JSON string (no quotes) into out, cap
 * bytes. Returns bytes written, or -1 when out is too small.
 */
int apm_json_escape(const char *s, size_t len, char *out, size_t cap);

/* == Settings and URLs == */
struct apm_url {
	int tls;                /* https */
	char host[256];         /* without brackets for IPv6 literals */
	uint16_t port;
	char prefix[512];       /* path prefix without trailing '/', may be "" */
};

/* Parse an http(s) URL; 0, or -1 (malformed, userinfo, query, fragment). */
int apm_url_parse(const char *s, size_t len, struct apm_url *u);

/* Go-style duration ("15s", "1m30s", "500ms", "1.5s"); a bare number is
 * seconds. Result in milliseconds. 0 or -1. */
int apm_duration_parse(const char *s, size_t len, int64_t *ms);

/* true/false/1/0/yes/no/on/off, any case. 0 or -1. */
int apm_bool_parse(const char *s, size_t len, int *out);

/* Non-negative decimal integer, at most max. 0 or -1. */
int apm_uint_parse(const char *s, size_t len, uint64_t max, uint64_t *out);

/* == Backoff (agent transport spec) ==
 * Delay before the next attempt after the n-th consecutive failure:
 * min(n-1, 6)^2 s (0, 1, 4, 9, 16, 25, 36 s), +-10% jitter from rnd.
 * n == 0 gives 0. */
int64_t apm_backoff_ms(unsigned n, uint32_t rnd);

/* == Lambda events == */
enum apm_lambda_event_type {
	APM_EV_UNKNOWN = 0,
	APM_EV_INVOKE,
	APM_EV_SHUTDOWN,
};

struct apm_lambda_event {
	int type;               /* enum apm_lambda_event_type */
	int64_t deadline_ms;    /* epoch milliseconds */
	char request_id[128];
	char function_arn[256];
	char trace[256];        /* tracing.value, may be "" */
	char shutdown_reason[32]; /* lower case, as received */
};

/* Parse an /event/next body. 0, or -1 (malformed or missing fields). */
int apm_lambda_event_parse(const char *js, size_t len,
    struct apm_lambda_event *ev);

/* == Telemetry records == */
enum apm_tel_type {
	APM_TEL_OTHER = 0,
	APM_TEL_START,          /* platform.start */
	APM_TEL_RUNTIME_DONE,   /* platform.runtimeDone */
	APM_TEL_REPORT,         /* platform.report */
	APM_TEL_FUNCTION,       /* function log line */
	APM_TEL_LOGS_DROPPED,   /* platform.logsDropped */
};

struct apm_tel_record {
	int type;               /* enum apm_tel_type */
	int64_t time_us;        /* "time", epoch microseconds; 0 if absent */
	char request_id[128];
	char status[32];
	double duration_ms, billed_ms, init_ms;
	struct apm_str duration_raw, billed_raw, init_raw; /* the numbers as
	                           sent (JSON number text), passed on exactly */
	int64_t memory_mb, max_memory_mb;
	int has_init;
	struct apm_str log;     /* function: the raw record (string token
	                           contents, escapes kept, or object text) */
	int log_is_string;
};

/* Parse one element of a telemetry batch (the tokens of one object).
 * 0, or -1 when it is not an object with a type. */
int apm_tel_record_parse(const char *js, const struct apm_json_tok *toks,
    int n, struct apm_tel_record *r);

/* ISO-8601 UTC time ("2022-10-12T00:00:00.123Z") to epoch microseconds.
 * 0 or -1. */
int apm_time_parse(const char *s, size_t len, int64_t *us);

/* == AWS Signature Version 4 (over BearSSL's SHA-256 and HMAC) == */
struct apm_sigv4 {
	const char *method;         /* "POST" */
	const char *path;           /* as in the request line, unencoded */
	const char *query;          /* without '?', "" when none */
	const struct apm_http_header *headers; /* all to be signed, incl. host
	                               and x-amz-date; names in any case */
	size_t num_headers;
	const char *payload;
	size_t payload_len;
	const char *region, *service;
	const char *amz_date;       /* "YYYYMMDDTHHMMSSZ" */
	const char *access_key, *secret_key;
	const char *session_token;  /* non-NULL: signed as x-amz-security-token */
};

/* The canonical request into out (cap bytes, NUL added). Length or -1. */
int apm_sigv4_canonical(const struct apm_sigv4 *s, char *out, size_t cap);

/* The string to sign. Length or -1. */
int apm_sigv4_string_to_sign(const struct apm_sigv4 *s, char *out, size_t cap);

/* The Authorization header value. Length or -1. */
int apm_sigv4_authorization(const struct apm_sigv4 *s, char *out, size_t cap);

/* Standard base64 (padding optional, whitespace skipped) into out.
 * Returns the decoded length, or -1 (bad input or out too small). */
int apm_base64_decode(const char *in, size_t len, unsigned char *out,
    size_t cap);

#endif /* APM_EXT_H */
