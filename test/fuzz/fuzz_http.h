/*
 * fuzz_http.h - the body of the two head parser targets: requests when
 * FUZZ_REQUEST is 1 (fuzz_http_request.c), responses when 0
 * (fuzz_http_response.c).
 *
 * Invariants: a result is one of the three kinds and its views lie in the
 * head; parsing resumed after any first part (prev_len), or byte by byte,
 * gives the same result as parsing the whole; a header array one short of
 * the headers found is TOO_MANY_HEADERS; for requests, empty lines before
 * the request line are skipped.
 */

static int
parse(const char *buf, size_t len, size_t prev, struct apm_http_msg *m,
    struct apm_http_header *h, size_t cap)
{
	return FUZZ_REQUEST ? apm_http_parse_request(buf, len, prev, m, h, cap) :
	    apm_http_parse_response(buf, len, prev, m, h, cap);
}

static void
view_in(struct apm_str v, const char *buf, int r)
{
	FUZZ_ASSERT(v.len == 0 || (v.ptr >= buf && v.ptr + v.len <= buf + r));
}

/* What a result r for buf[0..len) must satisfy on its own. */
static void
check_sane(const char *buf, size_t len, int r, const struct apm_http_msg *m)
{
	FUZZ_ASSERT(r == APM_NEED_MORE || r == APM_MALFORMED ||
	    (r > 0 && (size_t)r <= len && r <= APM_HTTP_MAX_HEAD));
	if (r == APM_NEED_MORE) {
		FUZZ_ASSERT(len < APM_HTTP_MAX_HEAD);
		return;
	}
	if (r == APM_MALFORMED) {
		FUZZ_ASSERT(m->error > APM_E_OK && m->error < APM_E__COUNT);
		return;
	}
	FUZZ_ASSERT(m->error == APM_E_OK);
	FUZZ_ASSERT(buf[r - 1] == '\n');
	FUZZ_ASSERT(m->num_headers <= APM_HTTP_MAX_HEADERS);
	FUZZ_ASSERT(m->minor_version == 0 || m->minor_version == 1);
	FUZZ_ASSERT(m->content_length >= -1);
	FUZZ_ASSERT(!(m->chunked && m->content_length >= 0));
	FUZZ_ASSERT(m->close == 0 || m->close == 1);
	if (FUZZ_REQUEST) {
		FUZZ_ASSERT(m->method.len > 0 && m->target.len > 0);
		view_in(m->method, buf, r);
		view_in(m->target, buf, r);
		for (size_t i = 0; i < m->target.len; i++)
			FUZZ_ASSERT((unsigned char)m->target.ptr[i] > 0x20);
	} else {
		FUZZ_ASSERT(m->status >= 100 && m->status <= 999);
		view_in(m->reason, buf, r);
	}
	for (size_t i = 0; i < m->num_headers; i++) {
		const struct apm_http_header *h = &m->headers[i];
		FUZZ_ASSERT(h->name.len > 0);
		view_in(h->name, buf, r);
		view_in(h->value, buf, r);
		FUZZ_ASSERT(!memchr(h->name.ptr, ':', h->name.len));
		for (size_t k = 0; k < h->value.len; k++)
			FUZZ_ASSERT(h->value.ptr[k] != '\r' && h->value.ptr[k] != '\n');
		if (h->value.len > 0) {
			FUZZ_ASSERT(h->value.ptr[0] != ' ' && h->value.ptr[0] != '\t');
			char last = h->value.ptr[h->value.len - 1];
			FUZZ_ASSERT(last != ' ' && last != '\t');
		}
		/* the lookup finds the first header of that name */
		char name[APM_HTTP_MAX_HEAD + 1];
		memcpy(name, h->name.ptr, h->name.len);
		name[h->name.len] = 0;
		struct apm_str v = apm_http_header_get(m, name);
		FUZZ_ASSERT(v.ptr != NULL || h->value.len == 0);
		FUZZ_ASSERT(v.ptr <= h->value.ptr || h->value.len == 0);
	}
}

#define SAME_VIEW(f)                                                          \
	FUZZ_ASSERT(ma->f.len == mb->f.len &&                                 \
	    (ma->f.len == 0 || ma->f.ptr - a == mb->f.ptr - b))

/* Results for the same bytes at a and at b are the same. */
static void
check_same(const char *a, int ra, const struct apm_http_msg *ma,
    const char *b, int rb, const struct apm_http_msg *mb)
{
	FUZZ_ASSERT(ra == rb);
	if (ra == APM_MALFORMED)
		FUZZ_ASSERT(ma->error == mb->error);
	if (ra <= 0)
		return;
	SAME_VIEW(method);
	SAME_VIEW(target);
	SAME_VIEW(reason);
	FUZZ_ASSERT(ma->status == mb->status);
	FUZZ_ASSERT(ma->minor_version == mb->minor_version);
	FUZZ_ASSERT(ma->num_headers == mb->num_headers);
	FUZZ_ASSERT(ma->content_length == mb->content_length);
	FUZZ_ASSERT(ma->chunked == mb->chunked);
	FUZZ_ASSERT(ma->close == mb->close);
	FUZZ_ASSERT(ma->expect_continue == mb->expect_continue);
	for (size_t i = 0; i < ma->num_headers; i++) {
		SAME_VIEW(headers[i].name);
		SAME_VIEW(headers[i].value);
	}
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct apm_http_header h1[APM_HTTP_MAX_HEADERS],
	    h2[APM_HTTP_MAX_HEADERS];
	struct apm_http_msg m1, m2;
	const char *buf = (const char *)data;

	int r = parse(buf, size, 0, &m1, h1, APM_HTTP_MAX_HEADERS);
	check_sane(buf, size, r, &m1);

	/* resumed: a first part in a block of its own, then all of it */
	size_t cut = fuzz_cut(data, size);
	char *part = fuzz_dup(data, cut);
	int r1 = parse(part, cut, 0, &m2, h2, APM_HTTP_MAX_HEADERS);
	check_sane(part, cut, r1, &m2);
	if (r1 == APM_NEED_MORE) {
		r1 = parse(buf, size, cut, &m2, h2, APM_HTTP_MAX_HEADERS);
		check_same(buf, r, &m1, buf, r1, &m2);
	} else {
		/* the first part already held the whole head (or its fault) */
		check_same(buf, r, &m1, part, r1, &m2);
	}
	free(part);

	/* byte by byte, for inputs small enough to afford it */
	if (size <= 1024) {
		int rb = APM_NEED_MORE;
		for (size_t k = 1; k <= size && rb == APM_NEED_MORE; k++) {
			char *p = fuzz_dup(data, k);
			rb = parse(p, k, k - 1, &m2, h2, APM_HTTP_MAX_HEADERS);
			if (rb != APM_NEED_MORE)
				check_same(buf, r, &m1, p, rb, &m2);
			free(p);
		}
		if (rb == APM_NEED_MORE)
			FUZZ_ASSERT(r == APM_NEED_MORE);
	}

	/* the header array bounds the header count */
	if (r > 0 && m1.num_headers > 0) {
		int rc = parse(buf, size, 0, &m2, h2, m1.num_headers - 1);
		FUZZ_ASSERT(rc == APM_MALFORMED &&
		    m2.error == APM_E_TOO_MANY_HEADERS);
	}

#if FUZZ_REQUEST
	/* RFC 9112 2.2: empty lines before a request line are ignored */
	if (r > 0 && r + 4 <= APM_HTTP_MAX_HEAD) {
		char *p = malloc(size + 4);
		FUZZ_ASSERT(p != NULL);
		memcpy(p, "\r\n\r\n", 4);
		memcpy(p + 4, data, size);
		int rl = parse(p, size + 4, 0, &m2, h2, APM_HTTP_MAX_HEADERS);
		FUZZ_ASSERT(rl == r + 4);
		check_same(buf, r, &m1, p + 4, rl - 4, &m2);
		free(p);
	}
#endif
	return 0;
}
