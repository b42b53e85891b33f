/*
 * fuzz_chunked.c - libFuzzer target: apm_chunk_decode.
 *
 * Invariants: decoding in place never grows the data; what follows the
 * body is exactly the tail of the input; feeding the same bytes whole,
 * split in two anywhere, or byte by byte gives the same decoded bytes,
 * result and rest; a decoded body re-framed as one chunk decodes to itself.
 */
#include "../../apm-ext.h"
#include "fuzz.h"

struct result {
	ssize_t r;              /* the last return */
	enum apm_err err;
	char *out;              /* decoded bytes */
	size_t out_len;
	char *rest;             /* DONE: the bytes after the body */
	size_t rest_len;
};

/*
 * Decode in[0..n): first in[0..cut), then the rest in pieces of step bytes
 * (0: at once), each piece in an exact-size block of its own, as a receiver
 * hands over what arrived since its last call.
 */
static void
decode(const char *in, size_t n, size_t cut, size_t step, struct result *res)
{
	struct apm_chunk_dec d;
	memset(&d, 0, sizeof d);
	res->r = APM_NEED_MORE;
	res->err = APM_E_OK;
	res->out_len = res->rest_len = 0;
	for (size_t pos = 0; pos < n;) {
		size_t piece = pos < cut ? cut - pos :
		    step ? MIN(step, n - pos) : n - pos;
		char *b = fuzz_dup(in + pos, piece);
		size_t len = piece;
		ssize_t r = apm_chunk_decode(&d, b, &len);
		pos += piece;
		res->r = r;
		FUZZ_ASSERT(len <= piece);
		FUZZ_ASSERT(r == APM_NEED_MORE || r == APM_MALFORMED ||
		    (r >= 0 && (size_t)r <= piece - len));
		memcpy(res->out + res->out_len, b, len);
		res->out_len += len;
		if (r == APM_MALFORMED) {
			FUZZ_ASSERT(d.error == APM_E_BAD_CHUNK);
			res->err = d.error;
			free(b);
			return;
		}
		if (r >= 0) {
			memcpy(res->rest, b + len, (size_t)r);
			memcpy(res->rest + r, in + pos, n - pos);
			res->rest_len = (size_t)r + (n - pos);
			/* done is final: more bytes all go to the caller */
			char more[3] = { 'a', 'b', 'c' };
			size_t ml = 3;
			FUZZ_ASSERT(apm_chunk_decode(&d, more, &ml) == 3 && ml == 0);
			free(b);
			return;
		}
		free(b);
	}
}

static void
check_same(const struct result *a, const struct result *b)
{
	FUZZ_ASSERT((a->r >= 0) == (b->r >= 0));
	if (a->r < 0)
		FUZZ_ASSERT(a->r == b->r && a->err == b->err);
	FUZZ_ASSERT(a->out_len == b->out_len &&
	    memcmp(a->out, b->out, a->out_len) == 0);
	FUZZ_ASSERT(a->rest_len == b->rest_len &&
	    memcmp(a->rest, b->rest, a->rest_len) == 0);
}

static void
result_alloc(struct result *r, size_t n)
{
	r->out = malloc(n + 1);
	r->rest = malloc(n + 1);
	FUZZ_ASSERT(r->out && r->rest);
}

static void
result_free(struct result *r)
{
	free(r->out);
	free(r->rest);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *in = (const char *)data;
	struct result whole, other;
	result_alloc(&whole, size + 64);
	result_alloc(&other, size + 64);

	decode(in, size, 0, 0, &whole);
	FUZZ_ASSERT(whole.out_len <= size);
	if (whole.r >= 0) {
		FUZZ_ASSERT(whole.out_len + whole.rest_len <= size);
		FUZZ_ASSERT(memcmp(whole.rest, in + size - whole.rest_len,
		    whole.rest_len) == 0);
	}

	decode(in, size, fuzz_cut(data, size), 0, &other);
	check_same(&whole, &other);
	decode(in, size, size / 2, 0, &other);
	check_same(&whole, &other);
	if (size <= 4096) {
		decode(in, size, 0, 1, &other);
		check_same(&whole, &other);
	}

	/* the decoded body as one chunk, then the same rest */
	if (whole.r >= 0) {
		size_t n = whole.out_len + whole.rest_len + 64;
		char *re = malloc(n);
		FUZZ_ASSERT(re != NULL);
		size_t k = 0;
		if (whole.out_len)
			k += (size_t)sprintf(re, "%zx\r\n", whole.out_len);
		memcpy(re + k, whole.out, whole.out_len);
		k += whole.out_len;
		k += (size_t)sprintf(re + k, "%s0\r\n\r\n",
		    whole.out_len ? "\r\n" : "");
		memcpy(re + k, whole.rest, whole.rest_len);
		k += whole.rest_len;
		struct result again;
		result_alloc(&again, k);
		decode(re, k, 0, 0, &again);
		check_same(&whole, &again);
		result_free(&again);
		free(re);
	}
	result_free(&whole);
	result_free(&other);
	return 0;
}
