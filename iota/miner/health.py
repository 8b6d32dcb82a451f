"""A tiny health and metrics port for daemons (miners, validators): GET /health and GET /metrics."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve_health(
    port: int, snapshot: Callable[[], dict[str, float | int | str | None]], host: str = "127.0.0.1"
) -> ThreadingHTTPServer:
    """Serve `snapshot()` as JSON on /health and as Prometheus gauges (numbers only) on /metrics, in a thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            values = snapshot()
            if self.path == "/health":
                body, kind = json.dumps(values).encode(), "application/json"
            elif self.path == "/metrics":
                lines = [f"iota_{k} {v}" for k, v in values.items() if isinstance(v, int | float)]
                body, kind = ("\n".join(lines) + "\n").encode(), "text/plain; version=0.0.4"
            else:
                self.send_error(404, "try /health or /metrics")
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the stdlib's name)
            return  # scrapes every few seconds would drown the daemon's own log

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
