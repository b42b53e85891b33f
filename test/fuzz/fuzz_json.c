/*
 * fuzz_json.c - libFuzzer target: apm_json_parse and the token helpers
 * (skip, get, str, escape, int, double).
 *
 * Invariants: counting without tokens agrees with tokenizing; a value
 * parsed with end given is the same value alone; tokens nest properly and
 * containers hold what their size says; every string unescapes (or holds a
 * \u escape that is refused), to valid UTF-8 when its text was, and
 * survives apm_json_escape and a second parse; apm_json_int agrees with
 * apm_json_double; apm_json_get finds every plain key.
 */
#include "../../apm-ext.h"
#include "fuzz.h"

#define CAP 512
static struct apm_json_tok t[CAP];

/* Strict UTF-8 (no surrogates, no overlongs). */
static int
utf8_valid(const unsigned char *s, size_t n)
{
	for (size_t i = 0; i < n;) {
		unsigned c = s[i], need, min;
		uint32_t cp;
		if (c < 0x80) {
			i++;
			continue;
		}
		if (c >= 0xC2 && c <= 0xDF)
			need = 1, cp = c & 0x1F, min = 0x80;
		else if (c >= 0xE0 && c <= 0xEF)
			need = 2, cp = c & 0x0F, min = 0x800;
		else if (c >= 0xF0 && c <= 0xF4)
			need = 3, cp = c & 0x07, min = 0x10000;
		else
			return 0;
		if (i + need >= n)
			return 0;
		for (unsigned k = 1; k <= need; k++) {
			if ((s[i + k] & 0xC0) != 0x80)
				return 0;
			cp = cp << 6 | (s[i + k] & 0x3F);
		}
		if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp < 0xE000))
			return 0;
		i += need + 1;
	}
	return 1;
}

static void
check_string(const char *js, const struct apm_json_tok *s)
{
	static char out[65536 + 1], esc[6 * 65536 + 2], back[65536 + 1];
	size_t len = s->end - s->start;
	FUZZ_ASSERT(s->start > 0 && js[s->start - 1] == '"' && js[s->end] == '"');
	int u = apm_json_str(js, s, out, len + 1);
	if (u < 0) {
		/* only a \u escape (a lone surrogate) may be refused */
		FUZZ_ASSERT(memmem(js + s->start, len, "\\u", 2) != NULL);
		return;
	}
	FUZZ_ASSERT((size_t)u <= len && out[u] == 0);
	if (utf8_valid((const unsigned char *)js + s->start, len))
		FUZZ_ASSERT(utf8_valid((const unsigned char *)out, (size_t)u));
	/* escape, parse again, unescape: the same bytes */
	esc[0] = '"';
	int e = apm_json_escape(out, (size_t)u, esc + 1, sizeof esc - 2);
	FUZZ_ASSERT(e >= 0);
	esc[e + 1] = '"';
	struct apm_json_tok t2[2];
	FUZZ_ASSERT(apm_json_parse(esc, (size_t)e + 2, t2, 2, NULL, NULL) == 1);
	int b = apm_json_str(esc, &t2[0], back, sizeof back);
	FUZZ_ASSERT(b == u && memcmp(back, out, (size_t)u) == 0);
}

static void
check_number(const char *js, const struct apm_json_tok *num)
{
	size_t len = num->end - num->start;
	double d = 0;
	int64_t v;
	if (len >= 64)
		return;
	FUZZ_ASSERT(apm_json_double(js, num, &d) == 0);
	if (apm_json_int(js, num, &v) == 0 && d < 1e15 && d > -1e15) {
		int64_t dv = (int64_t)d, diff = v > dv ? v - dv : dv - v;
		FUZZ_ASSERT(diff <= 1); /* 1: a long fraction may round up */
	}
}

static void
check_container(const char *js, int n, int i)
{
	const struct apm_json_tok *c = &t[i];
	int is_obj = c->type == APM_JSON_OBJECT;
	FUZZ_ASSERT(js[c->start] == (is_obj ? '{' : '['));
	FUZZ_ASSERT(js[c->end - 1] == (is_obj ? '}' : ']'));
	int s = apm_json_skip(t, n, i), kids = 0;
	for (int j = i + 1; j < s; j = apm_json_skip(t, n, j), kids++) {
		FUZZ_ASSERT(t[j].start > c->start && t[j].end < c->end);
		if (is_obj && kids % 2 == 0) {
			FUZZ_ASSERT(t[j].type == APM_JSON_STRING);
			/* a plain key is found, at its first occurrence */
			char key[256];
			size_t kl = t[j].end - t[j].start;
			if (kl >= sizeof key || memchr(js + t[j].start, '\\', kl) ||
			    memchr(js + t[j].start, 0, kl))
				continue;
			memcpy(key, js + t[j].start, kl);
			key[kl] = 0;
			int g = apm_json_get(js, t, n, i, key);
			FUZZ_ASSERT(g > i + 1 && g <= j + 1);
			FUZZ_ASSERT(apm_json_eq(js, &t[g - 1], key));
		}
	}
	FUZZ_ASSERT((uint32_t)kids == (is_obj ? 2 * c->size : c->size));
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *js = (const char *)data;
	enum apm_err err, err2;
	int n = apm_json_parse(js, size, t, CAP, NULL, &err);
	int count = apm_json_parse(js, size, NULL, 0, NULL, &err2);
	FUZZ_ASSERT(n == APM_MALFORMED || n > 0);
	if (n > 0) {
		FUZZ_ASSERT(err == APM_E_OK && count == n);
	} else {
		FUZZ_ASSERT(err == APM_E_BAD_JSON || err == APM_E_JSON_TOO_LARGE);
		if (err == APM_E_BAD_JSON)
			FUZZ_ASSERT(count == APM_MALFORMED && err2 == APM_E_BAD_JSON);
		if (count > 0)
			FUZZ_ASSERT(err == APM_E_JSON_TOO_LARGE && count > CAP);
	}

	/* with end given: the value, then only whitespace if it was whole */
	size_t end = 0;
	int ne = apm_json_parse(js, size, NULL, 0, &end, &err2);
	if (count > 0) {
		FUZZ_ASSERT(ne == count);
		for (size_t i = end; i < size; i++)
			FUZZ_ASSERT(strchr(" \t\r\n", js[i]) && js[i]);
	}
	if (ne > 0) {
		FUZZ_ASSERT(end <= size);
		char *v = fuzz_dup(js, end);
		FUZZ_ASSERT(apm_json_parse(v, end, NULL, 0, NULL, &err2) == ne);
		free(v);
	}

	if (n <= 0)
		return 0;
	FUZZ_ASSERT(apm_json_skip(t, n, 0) == n);
	for (int i = 0; i < n; i++) {
		const struct apm_json_tok *k = &t[i];
		FUZZ_ASSERT(k->type >= APM_JSON_OBJECT && k->type <= APM_JSON_NULL);
		FUZZ_ASSERT(k->start <= k->end && k->end <= size);
		int s = apm_json_skip(t, n, i);
		FUZZ_ASSERT(s > i && s <= n);
		switch (k->type) {
		case APM_JSON_OBJECT:
		case APM_JSON_ARRAY:
			check_container(js, n, i);
			break;
		case APM_JSON_STRING:
			check_string(js, k);
			break;
		case APM_JSON_NUMBER:
			check_number(js, k);
			break;
		case APM_JSON_TRUE:
			FUZZ_ASSERT(k->end - k->start == 4 && !memcmp(js + k->start, "true", 4));
			break;
		case APM_JSON_FALSE:
			FUZZ_ASSERT(k->end - k->start == 5 && !memcmp(js + k->start, "false", 5));
			break;
		case APM_JSON_NULL:
			FUZZ_ASSERT(k->end - k->start == 4 && !memcmp(js + k->start, "null", 4));
			break;
		}
	}
	return 0;
}
