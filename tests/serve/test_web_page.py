"""The chat page in real headless Chromium (Debian's, driven by Playwright; never a downloaded browser): type a
message, watch the reply stream, stop it (the server must cancel the request and free its slot), screenshot.

With GEMMAKIT_SCREENSHOTS=1 the screenshot is written to docs/images/chat.png (how that image was made).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")

from gemmakit.serve import ServeOptions  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
DOCS_IMAGE = Path(__file__).resolve().parents[2] / "docs" / "images" / "chat.png"


@pytest.fixture(scope="module")
def server(real_gemma, start_server):
    with start_server(real_gemma, ServeOptions(model_name="gemma-3-270m", slots=2)) as s:
        yield s


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_chat_page_streams_stops_and_shows_notice(server, tmp_path):
    from gemmakit.chat import base_model_notice

    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1180, "height": 760})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('status').textContent.includes('ready')")
        notice = base_model_notice(server.state.gemma)
        assert page.is_visible("#notice") == (notice is not None)
        if notice:
            assert page.inner_text("#notice") == notice

        # a first, complete exchange (settings from the side panel)
        page.fill("#system", "Answer in one short sentence.")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "24")
        page.fill("#input", "What is the capital of France?")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 1 && "
                               "document.querySelector('.msg.assistant').dataset.finish", timeout=120_000)
        first = page.locator(".msg.assistant").nth(0)
        assert first.locator(".content").inner_text().strip()
        assert "tok/s" in first.locator(".meta").inner_text()

        # a long second reply: watch it grow, then stop it
        page.fill("#max_tokens", "3000")
        page.fill("#input", "Write a long story about a lighthouse keeper, with a code block of Python at the end.")
        page.press("#input", "Enter")
        reply = page.locator(".msg.assistant").nth(1).locator(".content")
        page.wait_for_function("document.querySelectorAll('.msg.assistant')[1]?.querySelector('.content')"
                               ".textContent.length > 20", timeout=120_000)
        seen = len(reply.inner_text())
        page.wait_for_function(f"document.querySelectorAll('.msg.assistant')[1].querySelector('.content')"
                               f".textContent.length > {seen}", timeout=60_000)
        assert server.state.backend.stats()["busy_slots"] == 1
        assert page.is_enabled("#stop")
        page.click("#stop")
        page.wait_for_function("document.querySelectorAll('.msg.assistant')[1].dataset.finish === 'stopped'")
        deadline = time.monotonic() + 5
        while server.state.backend.stats()["busy_slots"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.state.backend.stats()["busy_slots"] == 0, "stopping must cancel the request on the server"
        stopped_at = len(reply.inner_text())
        time.sleep(0.3)
        assert len(reply.inner_text()) == stopped_at  # nothing arrives after stop
        assert page.is_enabled("#send") and not page.is_enabled("#stop")

        shot = tmp_path / "chat.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("GEMMAKIT_SCREENSHOTS") == "1":
            DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, DOCS_IMAGE)
        browser.close()
    assert not errors, errors
