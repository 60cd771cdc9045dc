"""A local HTTP server on 127.0.0.1 that misbehaves on purpose, for the downloader's tests and benchmark.

It serves a dict ``{path: bytes}``; any other path is a 404. Each request may, by chance
(``fail_rate``, ``truncate_rate``, seeded) or by plan (``plan[path]``: the modes of its first
requests in order), get one of:

``500``          an Internal Server Error
``503``          Service Unavailable with ``Retry-After: {retry_after}``
``429``          Too Many Requests with ``Retry-After: {retry_after}``
``reset``        the connection closed with a TCP reset before any answer
``short_length`` ``Content-Length`` of the whole file, half the body, then the connection closed
``short_close``  no ``Content-Length``, half the body, connection closed (looks complete to HTTP)
``slow``         a pause of ``slow_seconds`` before answering normally
``ok``           the file

Every request is counted per path (``requests``) with its time and mode (``log``).
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAIL_MODES = ("500", "503", "reset")
TRUNCATE_MODES = ("short_length", "short_close")


class FlakyServer:
    def __init__(self, files: dict[str, bytes], fail_rate: float = 0.0, truncate_rate: float = 0.0,
                 plan: dict[str, list[str]] | None = None, retry_after: str = "0", slow_seconds: float = 0.0,
                 latency: float = 0.0, seed: int = 0):
        self.files = dict(files)
        self.fail_rate = fail_rate
        self.truncate_rate = truncate_rate
        self.plan = {k: list(v) for k, v in (plan or {}).items()}
        self.retry_after = retry_after
        self.slow_seconds = slow_seconds
        self.latency = latency
        self.requests: Counter = Counter()
        self.log: list[tuple[float, str, str]] = []  # (time, path, mode)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------------
    def __enter__(self) -> FlakyServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                server._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def count(self, mode: str) -> int:
        with self._lock:
            return sum(1 for _, _, m in self.log if m == mode)

    # -- one request -----------------------------------------------------------------------------
    def _mode(self, path: str) -> str:
        with self._lock:
            self.requests[path] += 1
            if path not in self.files:
                mode = "404"
            elif self.plan.get(path):
                mode = self.plan[path].pop(0)
            else:
                r = self._rng.random()
                if r < self.fail_rate:
                    mode = self._rng.choice(FAIL_MODES)
                elif r < self.fail_rate + self.truncate_rate:
                    mode = self._rng.choice(TRUNCATE_MODES)
                else:
                    mode = "ok"
            self.log.append((time.monotonic(), path, mode))
            return mode

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        # a proxy request carries the whole URL; serve it by its path all the same
        path = urlsplit(h.path).path if "://" in h.path else h.path.split("?", 1)[0]
        mode = self._mode(path)
        if self.latency:
            time.sleep(self.latency)
        body = self.files.get(path, b"")
        if mode == "404":
            self._answer(h, 404, b"not found", {"Content-Type": "text/plain"})
        elif mode == "500":
            self._answer(h, 500, b"server error", {"Content-Type": "text/plain"})
        elif mode in ("503", "429"):
            self._answer(h, int(mode), b"busy", {"Content-Type": "text/plain", "Retry-After": self.retry_after})
        elif mode == "reset":
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
        elif mode == "short_length":
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[: len(body) // 2])
            h.close_connection = True
        elif mode == "short_close":
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(body[: len(body) // 2])
            h.close_connection = True
        else:
            if mode == "slow":
                time.sleep(self.slow_seconds)
            self._answer(h, 200, body, {"Content-Type": "image/jpeg"})

    @staticmethod
    def _answer(h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str]) -> None:
        try:
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. its read timeout)
            h.close_connection = True
