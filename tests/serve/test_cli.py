"""`gemmakit serve` as a user starts it: a subprocess on a free port, /health 503 until loaded then 200, keys from
the flag, a file and the environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("uvicorn")


def test_serve_help_lists_the_options():
    out = subprocess.run([sys.executable, "-m", "gemmakit.cli", "serve", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--host", "--port", "--api-key", "--api-key-file", "--slots", "--context", "--prefix-cache-mb",
                 "--guard", "--moderation-model", "--moderation-adapter", "--log-file"):
        assert flag in out


def test_serve_subprocess_comes_up_and_answers(tmp_path: Path, tiny_chat_gemma):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keys = tmp_path / "keys.txt"
    keys.write_text("# one per line\nfile-key\n")
    log = tmp_path / "serve.log"
    env = {**os.environ, "GEMMAKIT_API_KEYS": "env-key", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gemmakit.cli", "serve", str(tiny_chat_gemma.source), "--port", str(port),
           "--api-key", "flag-key", "--api-key-file", str(keys), "--served-model-name", "tiny", "--slots", "2",
           "--log-file", str(log)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        statuses = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                statuses.append(httpx.get(url + "/health", timeout=2).status_code)
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()[1][-2000:]
            if statuses and statuses[-1] == 200:
                break
            time.sleep(0.1)
        assert statuses and statuses[-1] == 200 and set(statuses) <= {200, 503}
        for key in ("flag-key", "file-key", "env-key"):
            r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
        assert httpx.get(url + "/v1/models").status_code == 401
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
        r = httpx.post(url + "/v1/chat/completions", json=body, headers={"X-Api-Key": "env-key"}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert "loading" in err and "ready at" in err
    assert "POST /v1/chat/completions" in log.read_text()
