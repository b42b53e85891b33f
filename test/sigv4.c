/*
 * AWS's Signature Version 4 test suite against apm_sigv4_*: for every case
 * directory under ../shared/aws-sigv4-testsuite (or argv[1]), parse the .req,
 * sign it with the suite's credentials, and compare the canonical request,
 * the string to sign and the Authorization value with the suite's files.
 * Last line: "N passed, N failed".
 */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "apm-ext.h"

static char *
slurp(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return NULL;
	char *buf = malloc(1 << 16);
	size_t n = fread(buf, 1, (1 << 16) - 1, f);
	fclose(f);
	buf[n] = 0;
	if (len)
		*len = n;
	return buf;
}

static void
chomp(char *s)
{
	size_t n = strlen(s);
	while (n && (s[n - 1] == '\n' || s[n - 1] == '\r'))
		s[--n] = 0;
}

/* Parse the suite's request format: request line, headers (continuation
 * lines start with white space), blank line, body. */
static int
run_case(const char *dir, const char *name, int *passed, int *failed)
{
	char path[8192];
	if (snprintf(path, sizeof path, "%.4000s/%.200s.req", dir, name) >= (int)sizeof path)
		return 0;
	char *req = slurp(path, NULL);
	if (!req)
		return 0;
	struct apm_http_header h[32];
	size_t nh = 0;
	char *line = req, *next, *body = "", *folded[32];
	int nfolded = 0;
	char method[16] = "", target[2048] = "";
	int first = 1;
	for (; line && *line; line = next) {
		next = strchr(line, '\n');
		if (next)
			*next++ = 0;
		chomp(line);
		if (first) {
			char *sp = strchr(line, ' '), *sp2 = strrchr(line, ' ');
			*sp = 0;
			snprintf(method, sizeof method, "%s", line);
			*sp2 = 0;
			snprintf(target, sizeof target, "%s", sp + 1);
			first = 0;
			continue;
		}
		if (*line == 0) {
			body = next ? next : "";
			break;
		}
		if ((*line == ' ' || *line == '\t') && nh > 0) {
			/* folded value: keep it with a newline, the signer collapses */
			struct apm_str *v = &h[nh - 1].value;
			char *joined = malloc(v->len + strlen(line) + 2);
			memcpy(joined, v->ptr, v->len);
			joined[v->len] = '\n';
			strcpy(joined + v->len + 1, line);
			v->ptr = joined;
			v->len = strlen(joined);
			if (nfolded < 32)
				folded[nfolded++] = joined;
			continue;
		}
		char *colon = strchr(line, ':');
		h[nh].name = (struct apm_str){ line, (size_t)(colon - line) };
		h[nh].value = (struct apm_str){ colon + 1, strlen(colon + 1) };
		nh++;
	}
	char *q = strchr(target, '?');
	if (q)
		*q++ = 0;
	struct apm_sigv4 s = {
		.method = method, .path = target, .query = q ? q : "",
		.headers = h, .num_headers = nh, .payload = body,
		.payload_len = strlen(body), .region = "us-east-1",
		.service = "service", .amz_date = "20150830T123600Z",
		.access_key = "AKIDEXAMPLE",
		.secret_key = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
	};
	if (strstr(name, "session-token"))
		s.session_token = "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267";
	struct { const char *ext; int (*fn)(const struct apm_sigv4 *, char *, size_t); } parts[] = {
		{ "creq", apm_sigv4_canonical },
		{ "sts", apm_sigv4_string_to_sign },
		{ "authz", apm_sigv4_authorization },
	};
	for (size_t k = 0; k < 3; k++) {
		char got[8192];
		if (snprintf(path, sizeof path, "%.4000s/%.200s.%s", dir, name, parts[k].ext) >= (int)sizeof path)
			continue;
		char *want = slurp(path, NULL);
		if (!want)
			continue;
		chomp(want);
		int n = parts[k].fn(&s, got, sizeof got);
		if (n >= 0 && strcmp(got, want) == 0) {
			(*passed)++;
		} else {
			(*failed)++;
			printf("FAIL %s.%s\n--- want\n%s\n--- got\n%s\n", name,
			    parts[k].ext, want, n >= 0 ? got : "(error)");
		}
		free(want);
	}
	while (nfolded > 0)
		free(folded[--nfolded]);
	free(req);
	return 1;
}

static void
walk(const char *dir, int *passed, int *failed)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	if (!d)
		return;
	while ((e = readdir(d))) {
		char sub[8192];
		struct stat st;
		if (e->d_name[0] == '.')
			continue;
		if (snprintf(sub, sizeof sub, "%.4000s/%.255s", dir, e->d_name) >= (int)sizeof sub)
			continue;
		if (stat(sub, &st) == 0 && S_ISDIR(st.st_mode)) {
			if (!run_case(sub, e->d_name, passed, failed))
				walk(sub, passed, failed);
		}
	}
	closedir(d);
}

int
main(int argc, char **argv)
{
	int passed = 0, failed = 0;
	unsigned char out[64];
	const char *dir = argc > 1 ? argv[1] : "../shared/aws-sigv4-testsuite";
	walk(dir, &passed, &failed);
	/* base64 as used for SecretBinary */
	int n = apm_base64_decode("aGVsbG8gd29ybGQ=", 16, out, sizeof out);
	if (n == 11 && memcmp(out, "hello world", 11) == 0)
		passed++;
	else
		failed++, printf("FAIL base64\n");
	if (apm_base64_decode("a*b=", 4, out, sizeof out) == -1)
		passed++;
	else
		failed++, printf("FAIL base64 garbage accepted\n");
	if (passed < 60)
		failed++, printf("FAIL only %d checks ran: test suite not found?\n", passed);
	printf("%d passed, %d failed\n", passed, failed);
	return failed != 0;
}
