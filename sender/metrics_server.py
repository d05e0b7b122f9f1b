"""The sender's Prometheus endpoint, on a port of its own (``SENDER_METRICS_HOST``/``SENDER_METRICS_PORT``).

The metrics name tokens, so they never share the API's port, which the
ingress routes to: only what can reach this port (Prometheus, through the
chart's NetworkPolicy) reads them. A small threaded WSGI server, as
``prometheus_client`` serves it, answers ``GET /metrics`` and 404 to the rest.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


def _only_metrics(metrics: WsgiApp) -> WsgiApp:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") in ("/metrics", "/metrics/"):
            return metrics(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: the metrics are at /metrics\n"]

    return app


class MetricsServer:
    """``GET /metrics`` of ``registry`` on ``host:port``, served from a thread of its own."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server = make_server(
            host, port, _only_metrics(make_wsgi_app(registry)), _Server, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        port: int = self._server.server_address[1]
        return port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
