"""Fixtures for the server tests: a real uvicorn server on 127.0.0.1 (a free port) in a thread of the test process.

One server per test module (module-scoped fixtures) keeps CI fast: the real 270M loads once per module.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra (fastapi, uvicorn)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app, port: int) -> None:
        import uvicorn

        self.app, self.port = app, port
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def state(self):
        return self.app.state.serve


@contextmanager
def live_server(gemma, options=None, **kwargs) -> Iterator[LiveServer]:
    from gemmakit.serve import create_app

    server = LiveServer(create_app(gemma, options, **kwargs), free_port()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def real_gemma(real_gguf_path: Path):
    import gemmakit

    return gemmakit.load(real_gguf_path)
