"""A real S3 endpoint on loopback for the tests (moto's server mode), and a fault-injecting HTTP proxy.

Everything reaches them over HTTP through boto3 and pyarrow exactly as production reaches AWS or MinIO;
no client is patched.
"""

from __future__ import annotations

import http.client
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from moto.server import ThreadedMotoServer

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
FAULTS = [
    (503, "SlowDown", "Please reduce your request rate."),
    (500, "InternalError", "We encountered an internal error. Please try again."),
]


def start_moto() -> tuple[ThreadedMotoServer, str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


class FaultProxy:
    """Forwards every request to ``upstream``, except every ``every``-th one, answered with an S3 error
    (503 SlowDown and 500 InternalError in turn), or every one with ``deny_all`` (403 AccessDenied).
    ``drop_headers`` (lower case) are removed from the requests it forwards: with ``if-none-match`` it is
    a store that ignores conditional writes."""

    def __init__(
        self, upstream: str, every: int = 5, deny_all: bool = False, drop_headers: frozenset[str] = frozenset()
    ) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.every = every
        self.deny_all = deny_all
        self.drop_headers = drop_headers
        self.requests = 0
        self.injected: dict[str, int] = {}
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._fault(self.command)
                if fault:
                    status, code, message = fault
                    payload = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload if self.command != "HEAD" else b"")
                    return
                connection = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | proxy.drop_headers}
                headers["Content-Length"] = str(len(body))
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_BY_HOP | {"content-length"}:
                        self.send_header(key, value)
                self.send_header("Content-Length", response.getheader("Content-Length") or str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _fault(self, method: str) -> tuple[int, str, str] | None:
        with self._lock:
            self.requests += 1
            if self.deny_all:
                return 403, "AccessDenied", "Access Denied"
            if self.requests % self.every:
                return None
            fault = FAULTS[(self.requests // self.every) % len(FAULTS)]
            self.injected[f"{method} {fault[0]}"] = self.injected.get(f"{method} {fault[0]}", 0) + 1
            return fault

    def stop(self) -> None:
        self.server.shutdown()
