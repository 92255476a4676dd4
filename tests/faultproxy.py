"""A small HTTP proxy for fault injection between reid-batch and an S3 server (moto) on loopback.

Every request is read whole (headers and body), then either forwarded to the upstream server on a fresh
connection or answered with a fault:

- ``drop``:  the connection is reset without any reply (what a crashed load balancer looks like);
- ``delay``: the request is held for ``seconds`` and then forwarded;
- ``500``:   ``InternalError`` (HTTP 500), which S3 documents as "retry";
- ``503``:   ``SlowDown`` (HTTP 503), S3's throttling reply.

Faults are armed with :meth:`FaultProxy.inject`, for the next ``count`` requests or for ``seconds`` of wall
time (an outage), optionally only for requests whose method matches. :attr:`FaultProxy.injected` counts what
was actually done, so a test can prove its faults were hit rather than skipped.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_S3_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
}
KINDS = ("drop", "delay", *_S3_ERRORS)


@dataclass
class _Fault:
    kind: str
    remaining: int | None
    until: float | None
    seconds: float
    methods: tuple[str, ...] | None
    match: str | None

    def alive(self, now: float) -> bool:
        return now < self.until if self.until is not None else bool(self.remaining)

    def applies(self, method: str, path: str, now: float) -> bool:
        return (self.alive(now) and (self.methods is None or method in self.methods)
                and (self.match is None or self.match in path))


class FaultProxy:
    """Listens on 127.0.0.1:<port> and forwards to ``upstream`` ("http://host:port")."""

    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self.injected: Counter[str] = Counter()
        self.forwarded = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue answered for us

            def log_message(self, *args) -> None:  # quiet: tests read stderr
                pass

            def _handle(self) -> None:
                body = self._read_body()
                fault = proxy._take(self.command, self.path)
                if fault is not None and fault.kind == "drop":
                    self._reset()
                    return
                if fault is not None and fault.kind == "delay":
                    time.sleep(fault.seconds)
                if fault is not None and fault.kind in _S3_ERRORS:
                    self._s3_error(*_S3_ERRORS[fault.kind])
                    return
                self._forward(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return bytes(data)
                        data += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reset(self) -> None:
                # SO_LINGER 0: close() sends RST, the client sees "connection reset" mid-request.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _s3_error(self, status: int, code: str, message: str) -> None:
                payload = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                           f"<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _forward(self, body: bytes) -> None:
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "expect", "connection", "content-length")}
                headers["Content-Length"] = str(len(body))
                connection = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    connection.request(self.command, self.path, body=body, headers=headers)
                    reply = connection.getresponse()
                    payload = reply.read()
                finally:
                    connection.close()
                with proxy._lock:
                    proxy.forwarded += 1
                self.send_response_only(reply.status, reply.reason)
                for key, value in reply.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(key, value)
                length = reply.getheader("Content-Length") if self.command == "HEAD" else str(len(payload))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def inject(self, kind: str, count: int | None = None, seconds: float | None = None, delay: float = 0.5,
               methods: tuple[str, ...] | None = None, match: str | None = None) -> None:
        """Apply fault `kind` to the next `count` requests, or to every request for the next `seconds`;
        only to requests with one of `methods` and whose path contains `match`, when given."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {KINDS}")
        if (count is None) == (seconds is None):
            raise ValueError("give count or seconds")
        until = time.monotonic() + seconds if seconds is not None else None
        with self._lock:
            self._faults.append(_Fault(kind, count, until, delay, methods, match))

    def pending(self) -> bool:
        """Whether an injected fault is still waiting for requests (or its outage is still on)."""
        now = time.monotonic()
        with self._lock:
            return any(f.alive(now) for f in self._faults)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take(self, method: str, path: str) -> _Fault | None:
        now = time.monotonic()
        with self._lock:
            self._faults = [f for f in self._faults if f.alive(now)]
            for fault in self._faults:
                if fault.applies(method, path, now):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    self.injected[fault.kind] += 1
                    return fault
        return None
