"""A backend that writes down every request line it receives, for tests about what reaches a backend.

It answers a consumer as a vLLM would at start (``/health``, ``/v1/models``;
no ``/metrics``, so the consumer uses a fixed flow window), and every ``POST``,
whatever its path, with 200 and a small JSON body. The request target is kept
exactly as it arrived (not decoded, not normalised): a test asserts that only
allowed routes ever get here. It runs on a thread of the test process.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson


class RecordingBackend:
    def __init__(self, model: str) -> None:
        self.model = model
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host!s}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="recording-backend", daemon=True
        )
        self._thread.start()

    def lines(self) -> list[str]:
        """Every request line received so far (``POST /v1/completions HTTP/1.1``), in order."""
        with self._lock:
            return list(self._lines)

    def posted(self) -> list[str]:
        """The raw targets of the ``POST`` requests received so far."""
        return [line.split(" ")[1] for line in self.lines() if line.startswith("POST ")]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _record(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                backend._record(self.requestline)
                if self.path == "/health":
                    self._answer(200, b"")
                elif self.path == "/v1/models":
                    card = {"id": backend.model, "object": "model", "max_model_len": 4096}
                    self._answer(200, orjson.dumps({"object": "list", "data": [card]}))
                else:
                    self._answer(404, b'{"detail":"Not Found"}')

            def do_POST(self) -> None:
                backend._record(self.requestline)
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                self._answer(200, orjson.dumps({"object": "recorded", "target": self.path}))

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
