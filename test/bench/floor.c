/* The floor for test/bench/bench.py: the least a Lambda extension can do. Blocking
 * sockets, one keep-alive connection to AWS_LAMBDA_RUNTIME_API (numeric
 * IPv4 host:port): register for INVOKE and SHUTDOWN, then loop on
 * /event/next until SHUTDOWN, exit 0. Any error: exit 1.
 * musl-gcc -std=c11 -Os -static -s -o build/floor test/bench/floor.c */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

static char buf[65536], id[128];
static int fd;

/* Send a request, read the whole answer into buf; returns the status. */
static int call(const char *req, size_t n, char **body) {
	if (write(fd, req, n) != (ssize_t)n) return -1;
	size_t len = 0, want = 0;
	char *end = NULL;
	for (;;) {
		ssize_t r = read(fd, buf + len, sizeof buf - 1 - len);
		if (r <= 0) return -1;
		buf[len += (size_t)r] = 0;
		if (!end && (end = strstr(buf, "\r\n\r\n"))) {
			char *cl = strcasestr(buf, "\r\nContent-Length:");
			want = (size_t)(end + 4 - buf) + (cl && cl < end ? strtoul(cl + 17, NULL, 10) : 0);
			*body = end + 4;
		}
		if (end && len >= want) return atoi(buf + 9);
		if (len == sizeof buf - 1) return -1;
	}
}

/* Concatenate the NULL-terminated list of strings into out; returns the length. */
static size_t cat(char *out, ...) {
	va_list ap;
	char *p = out;
	va_start(ap, out);
	for (const char *s; (s = va_arg(ap, const char *));) p = stpcpy(p, s);
	va_end(ap);
	return (size_t)(p - out);
}

int main(int argc, char **argv) {
	const char *api = getenv("AWS_LAMBDA_RUNTIME_API"), *colon = api ? strrchr(api, ':') : NULL;
	const char *name = argc > 0 ? strrchr(argv[0], '/') : NULL, *body = "{\"events\":[\"INVOKE\",\"SHUTDOWN\"]}";
	name = name ? name + 1 : argc > 0 ? argv[0] : "floor";
	struct sockaddr_in sa = { .sin_family = AF_INET };
	char host[64], req[512], *resp;
	if (!colon || colon - api >= (int)sizeof host) return 1;
	memcpy(host, api, (size_t)(colon - api));
	host[colon - api] = 0;
	sa.sin_port = htons((unsigned short)atoi(colon + 1));
	if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) return 1;
	if ((fd = socket(AF_INET, SOCK_STREAM, 0)) < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) return 1;
	char len[8] = "", *p = len + 7;
	for (size_t l = strlen(body); l || p == len + 7; l /= 10) *--p = (char)('0' + l % 10);
	if (strlen(api) + strlen(name) > 300) return 1;
	size_t n = cat(req, "POST /2020-01-01/extension/register HTTP/1.1\r\nHost: ", api,
	    "\r\nLambda-Extension-Name: ", name, "\r\nContent-Type: application/json\r\nContent-Length: ",
	    p, "\r\n\r\n", body, NULL);
	if (call(req, n, &resp) != 200) return 1;
	char *h = strcasestr(buf, "\r\nLambda-Extension-Identifier:");
	if (!h) return 1;
	h += 30 + strspn(h + 30, " \t");
	size_t il = strcspn(h, "\r\n ");
	if (!il || il >= sizeof id) return 1;
	memcpy(id, h, il);
	n = cat(req, "GET /2020-01-01/extension/event/next HTTP/1.1\r\nHost: ", api,
	    "\r\nLambda-Extension-Identifier: ", id, "\r\n\r\n", NULL);
	for (;;) {
		if (call(req, n, &resp) != 200) return 1;
		if (strstr(resp, "\"SHUTDOWN\"")) return 0;
	}
}
