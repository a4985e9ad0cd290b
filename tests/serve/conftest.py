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


@pytest.fixture(scope="session")
def real_gemma(real_gguf_path: Path):
    """The real 270M, loaded once for every server module (each module's server has its own scheduler)."""
    import gemmakit

    return gemmakit.load(real_gguf_path)


@pytest.fixture(scope="session")
def tiny_chat_gemma(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Gemma 3 with a 512-piece SentencePiece tokenizer (chat turn markers included), for tests that
    need a server but not the real model's words."""
    import gemmakit
    from support.train_helpers import save_tiny_model

    return gemmakit.load(save_tiny_model("gemma3", tmp_path_factory.mktemp("tiny-serve") / "tiny"))


def sse_events(raw: str) -> list[str]:
    """The `data:` payloads of an SSE body, checking OpenAI's framing: events separated by one blank line, each a
    single `data: ` line, the body ending with the blank line after `data: [DONE]`."""
    assert raw.endswith("\n\n"), repr(raw[-40:])
    blocks = raw[:-2].split("\n\n")
    out = []
    for block in blocks:
        assert "\n" not in block, f"an event spans several lines: {block!r}"
        assert block.startswith("data: "), f"not a data line: {block!r}"
        out.append(block[len("data: "):])
    assert out[-1] == "[DONE]"
    return out


@pytest.fixture(scope="session")
def start_server():
    """`with start_server(gemma, ServeOptions(...)) as server:` a live server (server.url, server.state)."""
    return live_server


@pytest.fixture(scope="session")
def parse_sse():
    return sse_events
