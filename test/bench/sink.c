/* An HTTP/1.1 sink, the APM server of test/bench/bench.py: reads requests
 * (Content-Length or chunked bodies, pipelined, keep-alive) and answers each
 * one "202 Accepted" with an empty body, as soon as its body is in. Bodies
 * are counted, never stored. GET /__sink/stats answers 200 with
 * {"requests":R,"body_bytes":B,"connections":C} (not counted itself).
 *
 *   cc -O2 -o build/sink test/bench/sink.c
 *   build/sink [port]     binds 127.0.0.1:port (0 or none: any free port),
 *                         prints the port on stdout, serves until killed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_CONNS 256
#define HEAD_MAX 16384
#define OUT_MAX 4096

enum { S_HEAD, S_BODY, S_CHUNK_SIZE, S_CHUNK_EXT, S_CHUNK_LF, S_CHUNK_DATA,
	S_CHUNK_CR, S_TRAILER };

struct conn {
	int fd;
	int state;
	int close_after;        /* answer, then close (Connection: close, 1.0) */
	int stats;              /* this request is GET /__sink/stats */
	uint64_t left;          /* body or chunk bytes still to skip */
	uint64_t size;          /* chunk size being parsed */
	int digits;
	size_t line_len;        /* trailer line length so far */
	size_t head_len;
	char head[HEAD_MAX];
	size_t out_len;
	char out[OUT_MAX];
};

static struct conn *conns[MAX_CONNS];
static struct pollfd pfd[MAX_CONNS + 1];
static uint64_t n_requests, n_body_bytes, n_conns;

static void conn_close(int i)
{
	close(conns[i]->fd);
	free(conns[i]);
	conns[i] = NULL;
}

/* Queue bytes to send; they leave at the next flush. */
static int out_put(struct conn *c, const char *p, size_t n)
{
	if (c->out_len + n > sizeof c->out)
		return -1;
	memcpy(c->out + c->out_len, p, n);
	c->out_len += n;
	return 0;
}

static int flush_out(struct conn *c)
{
	while (c->out_len) {
		ssize_t w = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL);
		if (w < 0)
			return errno == EAGAIN || errno == EINTR ? 0 : -1;
		memmove(c->out, c->out + w, c->out_len - (size_t)w);
		c->out_len -= (size_t)w;
	}
	return 0;
}

/* The whole request is in: answer it. */
static int request_done(struct conn *c)
{
	char b[256];
	int n;
	if (c->stats) {
		char body[160];
		int bl = snprintf(body, sizeof body, "{\"requests\":%llu,\"body_bytes\":%llu,"
		    "\"connections\":%llu}", (unsigned long long)n_requests,
		    (unsigned long long)n_body_bytes, (unsigned long long)n_conns);
		n = snprintf(b, sizeof b, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
		    "Content-Length: %d\r\n%s\r\n%s", bl, c->close_after ?
		    "Connection: close\r\n" : "", body);
	} else {
		n_requests++;
		n = snprintf(b, sizeof b, "HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n%s\r\n",
		    c->close_after ? "Connection: close\r\n" : "");
	}
	c->state = S_HEAD;
	c->head_len = 0;
	return out_put(c, b, (size_t)n);
}

static const char *header(const char *head, const char *name)
{
	size_t nl = strlen(name);
	for (const char *p = strstr(head, "\r\n"); p && p[2] != '\r'; p = strstr(p + 2, "\r\n"))
		if (strncasecmp(p + 2, name, nl) == 0 && p[2 + nl] == ':') {
			p += 3 + nl;
			return p + strspn(p, " \t");
		}
	return NULL;
}

/* A complete head (NUL-terminated, ends with the empty line). */
static int head_done(struct conn *c)
{
	const char *h = c->head;
	const char *sp = strchr(h, ' ');
	const char *eol = strstr(h, "\r\n");
	if (!sp || sp > eol)
		return -1;
	c->stats = strncmp(h, "GET /__sink/stats ", 18) == 0;
	int http10 = eol - h >= 8 && strncmp(eol - 8, "HTTP/1.0", 8) == 0;
	const char *conn = header(h, "Connection");
	c->close_after = conn ? strncasecmp(conn, "close", 5) == 0 :
	    http10;
	if (conn && strncasecmp(conn, "keep-alive", 10) == 0)
		c->close_after = 0;
	const char *ex = header(h, "Expect");
	if (ex && strncasecmp(ex, "100-continue", 12) == 0 &&
	    out_put(c, "HTTP/1.1 100 Continue\r\n\r\n", 25) < 0)
		return -1;
	const char *te = header(h, "Transfer-Encoding");
	if (te && strcasestr(te, "chunked") && strcasestr(te, "chunked") < strstr(te, "\r\n")) {
		c->state = S_CHUNK_SIZE;
		c->size = 0;
		c->digits = 0;
		return 0;
	}
	const char *cl = header(h, "Content-Length");
	c->left = cl ? strtoull(cl, NULL, 10) : 0;
	if (c->left == 0)
		return request_done(c);
	c->state = S_BODY;
	return 0;
}

static int hexval(int ch)
{
	if (ch >= '0' && ch <= '9') return ch - '0';
	if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
	if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
	return -1;
}

/* Feed received bytes to the parser; -1 on a protocol error. */
static int feed(struct conn *c, const char *p, size_t n)
{
	while (n) {
		switch (c->state) {
		case S_HEAD: {
			size_t take = 0;
			int found = 0;
			while (take < n) {
				if (c->head_len == 0 && (p[take] == '\r' || p[take] == '\n')) {
					take++; /* stray CRLF between requests */
					continue;
				}
				if (c->head_len >= HEAD_MAX - 1)
					return -1;
				c->head[c->head_len++] = p[take++];
				if (c->head_len >= 4 && memcmp(c->head + c->head_len - 4,
				    "\r\n\r\n", 4) == 0) {
					found = 1;
					break;
				}
			}
			p += take;
			n -= take;
			if (found) {
				c->head[c->head_len] = 0;
				if (head_done(c) < 0)
					return -1;
			}
			break;
		}
		case S_BODY:
		case S_CHUNK_DATA: {
			size_t k = n < c->left ? n : (size_t)c->left;
			n_body_bytes += k;
			c->left -= k;
			p += k;
			n -= k;
			if (c->left == 0) {
				if (c->state == S_BODY) {
					if (request_done(c) < 0)
						return -1;
				} else {
					c->state = S_CHUNK_CR;
				}
			}
			break;
		}
		case S_CHUNK_SIZE: {
			int v = hexval((unsigned char)*p);
			if (v >= 0) {
				if (++c->digits > 15)
					return -1;
				c->size = c->size * 16 + (uint64_t)v;
			} else if (c->digits && (*p == ';' || *p == ' ' || *p == '\t')) {
				c->state = S_CHUNK_EXT;
			} else if (c->digits && *p == '\r') {
				c->state = S_CHUNK_LF;
			} else {
				return -1;
			}
			p++;
			n--;
			break;
		}
		case S_CHUNK_EXT:
			if (*p == '\r')
				c->state = S_CHUNK_LF;
			p++;
			n--;
			break;
		case S_CHUNK_LF:
			if (*p != '\n')
				return -1;
			p++;
			n--;
			if (c->size == 0) {
				c->state = S_TRAILER;
				c->line_len = 0;
			} else {
				c->state = S_CHUNK_DATA;
				c->left = c->size;
			}
			break;
		case S_CHUNK_CR: /* CRLF after the chunk data */
			if (*p == '\r') {
				p++;
				n--;
				break;
			}
			if (*p != '\n')
				return -1;
			p++;
			n--;
			c->state = S_CHUNK_SIZE;
			c->size = 0;
			c->digits = 0;
			break;
		case S_TRAILER: /* trailer lines until an empty one */
			if (*p == '\n') {
				if (c->line_len == 0) {
					if (request_done(c) < 0)
						return -1;
				}
				c->line_len = 0;
			} else if (*p != '\r') {
				c->line_len++;
			}
			p++;
			n--;
			break;
		}
	}
	return 0;
}

int main(int argc, char **argv)
{
	signal(SIGPIPE, SIG_IGN);
	int port = argc > 1 ? atoi(argv[1]) : 0;
	int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	int one = 1;
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
		.sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t sl = sizeof sa;
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
	    listen(lfd, 128) < 0 || getsockname(lfd, (struct sockaddr *)&sa, &sl) < 0) {
		perror("sink: listen");
		return 1;
	}
	printf("%d\n", ntohs(sa.sin_port));
	fflush(stdout);
	static char rx[1 << 18];
	for (;;) {
		int np = 0, idx[MAX_CONNS + 1];
		pfd[np].fd = lfd;
		pfd[np].events = POLLIN;
		idx[np++] = -1;
		for (int i = 0; i < MAX_CONNS; i++)
			if (conns[i]) {
				pfd[np].fd = conns[i]->fd;
				pfd[np].events = POLLIN | (conns[i]->out_len ? POLLOUT : 0);
				idx[np++] = i;
			}
		if (poll(pfd, (nfds_t)np, -1) < 0) {
			if (errno == EINTR)
				continue;
			perror("sink: poll");
			return 1;
		}
		for (int k = 1; k < np; k++) {
			if (!pfd[k].revents)
				continue;
			int i = idx[k];
			struct conn *c = conns[i];
			int dead = 0;
			if (pfd[k].revents & (POLLIN | POLLHUP | POLLERR)) {
				for (;;) {
					ssize_t r = recv(c->fd, rx, sizeof rx, 0);
					if (r > 0) {
						if (feed(c, rx, (size_t)r) < 0) {
							dead = 1;
							break;
						}
						if ((size_t)r < sizeof rx)
							break;
						continue;
					}
					if (r < 0 && (errno == EAGAIN || errno == EINTR))
						break;
					dead = 1; /* EOF or error */
					break;
				}
			}
			if (!dead && flush_out(c) < 0)
				dead = 1;
			if (dead || (c->close_after && c->out_len == 0 && c->state == S_HEAD &&
			    c->head_len == 0))
				conn_close(i);
		}
		if (pfd[0].revents & POLLIN) {
			for (;;) {
				int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
				if (fd < 0)
					break;
				int i = 0;
				while (i < MAX_CONNS && conns[i])
					i++;
				struct conn *c = i < MAX_CONNS ? calloc(1, sizeof *c) : NULL;
				if (!c) {
					close(fd);
					continue;
				}
				setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
				c->fd = fd;
				conns[i] = c;
				n_conns++;
			}
		}
	}
}
