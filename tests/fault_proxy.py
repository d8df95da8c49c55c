"""A fault-injecting HTTP proxy for S3 tests: it forwards requests to a real S3 server on loopback, and answers a
share of them with 503 SlowDown or 500 InternalError, or drops the connection without an answer, as an
overloaded or failing-over S3 endpoint does; and it can refuse chosen requests with 403 AccessDenied, as a bucket
policy that denies some writes does."""

from __future__ import annotations

import http.client
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    403: ("AccessDenied", "Access Denied"),
}


@dataclass
class FaultCounts:
    forwarded: int = 0
    slow_down: int = 0
    internal_error: int = 0
    dropped: int = 0
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, kind: str) -> None:
        with self.lock:
            setattr(self, kind, getattr(self, kind) + 1)


class FaultProxy:
    """`FaultProxy(upstream, share=0.2).start()`; its `endpoint` is what clients use instead of upstream's.

    Of the requests, `share` get a fault: a third each 503, 500 and a dropped connection. Dropped requests are
    forwarded first, so the upstream may have done what the client never hears of (as on a real network).
    `refuse(method, path)`, called for every request, answers True for those to refuse with 403. Every request
    waits `delay_s` first (a slow link), and is logged in `requests` as (method, path, Range header or None).
    `port` 0 picks a free one."""

    def __init__(self, upstream: str, share: float = 0.2, seed: int = 0,
                 refuse: Callable[[str, str], bool] | None = None, delay_s: float = 0.0, port: int = 0):
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.share = share
        self.refuse = refuse
        self.delay_s = delay_s
        self.requests: list[tuple[str, str, str | None]] = []
        self.random = random.Random(seed)
        self.random_lock = threading.Lock()
        self.counts = FaultCounts()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep the test output clean
                pass

            def do_GET(self):
                proxy.handle(self)

            do_PUT = do_POST = do_HEAD = do_DELETE = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _fault(self) -> str | None:
        with self.random_lock:
            if self.random.random() >= self.share:
                return None
            return self.random.choice(["slow_down", "internal_error", "dropped"])

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        body = _read_body(request)
        with self.random_lock:
            self.requests.append((request.command, request.path, request.headers.get("Range")))
        time.sleep(self.delay_s)
        fault = "refused" if self.refuse and self.refuse(request.command, request.path) else self._fault()
        if fault in ("slow_down", "internal_error", "refused"):
            self.counts.add(fault)
            status = {"slow_down": 503, "internal_error": 500, "refused": 403}[fault]
            code, message = ERRORS[status]
            payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}'
                       f"</Message></Error>").encode()
            request.send_response(status)
            request.send_header("Content-Type", "application/xml")
            request.send_header("Content-Length", str(len(payload)))
            request.end_headers()
            if request.command != "HEAD":
                request.wfile.write(payload)
            return
        status, headers, payload = self._forward(request, body)
        if fault == "dropped":
            self.counts.add("dropped")
            request.close_connection = True
            request.connection.close()  # the request was carried out; its answer is lost
            return
        self.counts.add("forwarded")
        request.send_response(status)
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                request.send_header(name, value)
        # A HEAD answer has no body but tells the object's size.
        length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
        request.send_header("Content-Length", length if request.command == "HEAD" else str(len(payload)))
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(payload)

    def _forward(self, request: BaseHTTPRequestHandler, body: bytes):
        connection = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
        try:
            # The Host header is forwarded as the client signed it (SigV4 covers it).
            headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            connection.request(request.command, request.path, body=body or None, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()


def _read_body(request: BaseHTTPRequestHandler) -> bytes:
    if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(request.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while request.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(request.rfile.read(size))
            request.rfile.readline()
    length = int(request.headers.get("Content-Length") or 0)
    return request.rfile.read(length) if length else b""
