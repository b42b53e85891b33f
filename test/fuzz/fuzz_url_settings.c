/*
 * fuzz_url_settings.c - libFuzzer target: apm_url_parse,
 * apm_duration_parse, apm_bool_parse and apm_uint_parse, each given the
 * whole input.
 *
 * Invariants: a parsed URL is well formed and prints back to a URL that
 * parses to the same parts; durations are non-negative and ignore
 * surrounding blanks and letter case; booleans are 0 or 1; integers agree
 * with a 128-bit reference for several bounds.
 */
#include "../../apm-ext.h"
#include "fuzz.h"

static void
check_url(const char *s, size_t n)
{
	struct apm_url u, v;
	if (apm_url_parse(s, n, &u) < 0)
		return;
	size_t hl = strnlen(u.host, sizeof u.host);
	size_t pl = strnlen(u.prefix, sizeof u.prefix);
	FUZZ_ASSERT(n <= APM_URL_MAX);
	FUZZ_ASSERT(hl > 0 && hl < sizeof u.host && pl < sizeof u.prefix);
	FUZZ_ASSERT(u.port != 0 && (u.tls == 0 || u.tls == 1));
	FUZZ_ASSERT(!strpbrk(u.host, "/@?#[] "));
	FUZZ_ASSERT(pl == 0 || (u.prefix[0] == '/' && u.prefix[pl - 1] != '/'));
	FUZZ_ASSERT(!strpbrk(u.prefix, "?# "));
	/* print it back and parse again */
	char again[APM_URL_MAX + 300];
	int k = snprintf(again, sizeof again, strchr(u.host, ':') ?
	    "%s://[%s]:%u%s" : "%s://%s:%u%s", u.tls ? "https" : "http",
	    u.host, u.port, u.prefix);
	FUZZ_ASSERT(k > 0 && (size_t)k < sizeof again);
	FUZZ_ASSERT(apm_url_parse(again, (size_t)k, &v) == 0);
	FUZZ_ASSERT(v.tls == u.tls && v.port == u.port);
	FUZZ_ASSERT(!strcmp(v.host, u.host) && !strcmp(v.prefix, u.prefix));
}

static void
check_duration(const char *s, size_t n)
{
	int64_t ms = -1, ms2 = -1;
	int r = apm_duration_parse(s, n, &ms);
	if (r == 0)
		FUZZ_ASSERT(ms >= 0 && ms <= (int64_t)9e15);
	/* blanks around it and letter case change nothing */
	char *b = malloc(n + 2);
	FUZZ_ASSERT(b != NULL);
	b[0] = ' ';
	for (size_t i = 0; i < n; i++) {
		char c = s[i];
		b[i + 1] = c >= 'a' && c <= 'z' ? (char)(c - 32) : c;
	}
	b[n + 1] = '\t';
	int r2 = apm_duration_parse(b, n + 2, &ms2);
	FUZZ_ASSERT(r2 == r && (r < 0 || ms2 == ms));
	free(b);
}

static void
check_bool(const char *s, size_t n)
{
	int v = -1;
	if (apm_bool_parse(s, n, &v) == 0)
		FUZZ_ASSERT((v == 0 || v == 1) && n > 0 && n <= 5);
}

/* The reference: 1 to 20 decimal digits whose value is at most max. */
static int
uint_ref(const char *s, size_t n, uint64_t max, uint64_t *out)
{
	unsigned __int128 v = 0;
	if (n == 0 || n > 20)
		return -1;
	for (size_t i = 0; i < n; i++) {
		if (s[i] < '0' || s[i] > '9')
			return -1;
		v = v * 10 + (unsigned)(s[i] - '0');
	}
	if (v > max)
		return -1;
	*out = (uint64_t)v;
	return 0;
}

static void
check_uint(const char *s, size_t n)
{
	static const uint64_t maxes[] = { 0, 1, 5, 9, 10, 99, 65535,
		(uint64_t)1 << 62, UINT64_MAX - 1, UINT64_MAX };
	for (size_t i = 0; i < sizeof maxes / sizeof *maxes; i++) {
		uint64_t got = 0, want = 0;
		int r = apm_uint_parse(s, n, maxes[i], &got);
		int rr = uint_ref(s, n, maxes[i], &want);
		FUZZ_ASSERT(r == rr);
		FUZZ_ASSERT(r < 0 || (got == want && got <= maxes[i]));
	}
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *s = (const char *)data;
	check_url(s, size);
	check_duration(s, size);
	check_bool(s, size);
	check_uint(s, size);
	return 0;
}
