"""The HTTP server scaffold the fakes share (fake_lambda.py, fake_apm.py,
fake_aws.py): http.server's threading server and request handler, set up the
way the fakes need them.

Server: one daemon thread per connection (a test never waits on a client that
keeps its connection open), the port reusable at once (SO_REUSEADDR), the
address family (AF_INET or AF_INET6) and the fake that owns the server given
to the constructor (handlers reach it as self.server.fake); a client that goes
away (an OSError in a handler: a crashed runtime, a killed extension, a reset)
is not worth a traceback, anything else prints socketserver's report.

Handler: HTTP/1.1 (keep-alive), no request log on stderr, and two pieces for
answering as a Go net/http server does (Lambda's APIs and the APM server are
Go): no_delay() turns Nagle's algorithm off on the accepted socket, and
send_whole() writes an answer, head and body, in one write, so that a client
reads the whole answer in its first segment and never waits on a Nagle or
delayed-ACK pause between head and body.
"""

import http.server
import socket
import sys


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, handler, fake=None, family=socket.AF_INET):
        self.address_family = family
        self.fake = fake
        super().__init__(addr, handler)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):  # ssl.SSLError is one too
            super().handle_error(request, client_address)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet
        pass

    def no_delay(self):
        """TCP_NODELAY on the accepted socket: an answer goes out at once."""
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send_whole(self, status, headers, body=b"", send_body=True):
        """The answer in one sendall: the status line, headers (name, value
        pairs, in order), Content-Length, Connection: close when the connection
        ends after it, then body (unless send_body is false: HEAD)."""
        reason = self.responses.get(status, ("",))[0]
        head = ["HTTP/1.1 %d %s" % (status, reason)]
        head += ["%s: %s" % (k, v) for k, v in headers]
        head.append("Content-Length: %d" % len(body))
        if self.close_connection:
            head.append("Connection: close")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        if send_body:
            data += body
        self.wfile.flush()              # nothing buffered: we bypass it
        self.connection.sendall(data)   # head and body: one write
