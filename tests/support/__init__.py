"""Reusable test infrastructure: real servers on 127.0.0.1 (uvicorn for ASGI apps; moto for S3 in s3.py)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from iota.orchestrator.guards import guarded_http


@contextmanager
def running_server(app: Any, startup_timeout_s: float = 10.0) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free 127.0.0.1 port in a thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # The orchestrator's guarded protocol, as in production: bare httptools would answer junk after a body itself.
    config = uvicorn.Config(app, log_level="warning", lifespan="off", http=guarded_http(10.0, 0))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


class Clock:
    """An orchestrator's (and its store's) clock: real time plus an offset a test moves past leases and deadlines
    (signatures keep real time)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset
