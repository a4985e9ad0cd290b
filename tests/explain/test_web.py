"""The explorer served for real (uvicorn on 127.0.0.1) over a tiny Gemma 3 with an SAE and an activation store:
its JSON API against the library's own results, and the page in Debian's headless Chromium driven by Playwright
(select a span with the mouse, colours appear and change with the method, SAE card and steering; a screenshot)."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest
import torch

from gemmakit import scope
from gemmakit.explain.salience import salience
from gemmakit.explain.segments import aggregate
from support.scope_support import one_thread, tiny_gemma

pytest.importorskip("fastapi", reason="the explorer needs fastapi and uvicorn (pip install gemmakit[serve])")
uvicorn = pytest.importorskip("uvicorn", reason="the explorer needs uvicorn (pip install gemmakit[serve])")
httpx = pytest.importorskip("httpx", reason="the API tests use httpx")

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SITE = "layers.2.resid_post"
PROMPT, TARGET = "the sea and the ship. the king sailed", " to the city"


def _sae(d: int) -> scope.SAE:
    sae = scope.make_sae("jumprelu", d, 80)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, 80, generator=g) * 0.3)
        sae.W_dec.copy_(torch.randn(80, d, generator=g) * 0.3)
        sae.threshold.fill_(0.3)
    sae.info.site = SITE
    return sae.requires_grad_(False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from gemmakit.explain.web import app

    root = tmp_path_factory.mktemp("explore")
    model = tiny_gemma("gemma3", root)
    sae = _sae(model.config.hidden_size)
    scope.build_store(model, "the king and the queen sailed the sea to the city. " * 8, root / "store", [SITE],
                      context=16, dtype="float32", progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(app(model, sae, store=root / "store"), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", model, sae
    srv.should_exit = True
    thread.join(timeout=10)


def test_api_answers_what_the_library_computes(server):
    base, model, sae = server
    with httpx.Client(base_url=base, timeout=60) as c:
        info = c.get("/explore/api/info").json()
        assert info["sae"]["site"] == SITE and "integrated_gradients" in info["methods"]
        toks = c.post("/explore/api/tokenize", json={"prompt": PROMPT, "target": TARGET}).json()
        assert "".join(toks["prompt"]) == PROMPT and "".join(toks["target"]) == TARGET
        body = {"prompt": PROMPT, "target": TARGET, "span": [1, 4], "method": "grad_dot_input", "granularity": "word"}
        r = c.post("/explore/api/salience", json=body).json()
        direct = salience(model, PROMPT, target=TARGET, span=(1, 4), method="grad_dot_input")
        assert r["tokens"] == direct.tokens and r["scores"] == pytest.approx(direct.scores, abs=1e-6)
        words = aggregate(*direct.part("prompt"), "word")
        assert r["segment_scores"][: len(words)] == pytest.approx([w.score for w in words], abs=1e-6)
        for k, w in enumerate(words):  # each word's score is the sum of the tokens the page puts in it
            members = [i for i, s in enumerate(r["segment_of"]) if s == k]
            assert members == w.tokens
            assert sum(r["scores"][i] for i in members) == pytest.approx(r["segment_scores"][k], abs=1e-6)
        att = c.post("/explore/api/attribute", json={"prompt": PROMPT, "target": TARGET, "span": [1, 4]}).json()
        assert att["site"] == SITE and 0 <= att["error_share"] <= 1
        assert att["total"] == pytest.approx(att["latents"] + att["bias"] + att["error"], rel=1e-4, abs=1e-6)
        rows = c.post("/explore/api/features", json={"text": "the sea"}).json()["rows"]
        assert [row["token"] for row in rows][1:] == list("the sea")
        fired = next(f for row in rows for f in row["features"])
        card = c.get(f"/explore/api/feature/{fired[0]}").json()
        assert card["feature"] == fired[0] and len(card["logits_pos"]) == 10 and card["density"] > 0
        assert card["top"] and card["top"][0]["max"] == pytest.approx(card["max_activation"], rel=1e-4)
        steer = c.post("/explore/api/steer", json={"prompt": "the", "feature": fired[0], "value": 50.0,
                                                   "max_new_tokens": 5}).json()
        assert steer["default"] == model.generate("the", 5)
        bad = c.post("/explore/api/salience", json={**body, "method": "saliency"})
        assert bad.status_code == 400 and "saliency" in bad.json()["detail"]
        assert c.get(f"/explore/api/feature/{sae.d_sae}").status_code == 400


def test_a_shared_float_model_is_never_hooked_in_place(server):
    """Inside `gemmakit serve` other requests run on the loaded model: the explorer computes on its own copy."""
    from gemmakit.explain.web import Explorer

    _, model, sae = server
    shared = Explorer(model, sae, isolate=True)
    work = shared.work()
    assert work is not model and work.module is not model.module
    assert all(torch.equal(a, b) for a, b in zip(work.module.state_dict().values(),
                                                 model.module.state_dict().values(), strict=True))
    r = shared.salience(PROMPT, TARGET, [0, 2], "grad_l2", "token", None)
    assert r["scores"] == salience(model, PROMPT, target=TARGET, span=(0, 2)).scores
    assert "private copy" in r["details"]["weights"]
    assert Explorer(model, sae, isolate=False).work() is model


def _backgrounds(page) -> list[str]:
    return page.eval_on_selector_all("#prompt-view .tok", "els => els.map(e => getComputedStyle(e).backgroundColor)")


def test_page_in_chromium_select_a_span_and_see_colours(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    base, _, _ = server
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(base + "/explore")
        page.fill("#prompt", PROMPT)
        page.fill("#target", TARGET)
        page.wait_for_function("document.body.dataset.ready === '1'")
        page.wait_for_function(f"document.querySelectorAll('#target-tokens .tok').length === {len(TARGET)}")
        assert _backgrounds(page) == [] and page.inner_text("#prompt-view") == PROMPT  # plain text before a span
        first, last = page.locator("#target-tokens .tok").nth(1), page.locator("#target-tokens .tok").nth(3)
        a, b = first.bounding_box(), last.bounding_box()
        page.mouse.move(a["x"] + a["width"] / 2, a["y"] + a["height"] / 2)
        page.mouse.down()
        page.mouse.move(b["x"] + b["width"] / 2, b["y"] + b["height"] / 2, steps=4)
        page.mouse.up()
        page.wait_for_function("document.body.dataset.rendered === '1'")
        assert page.locator("#target-tokens .tok.sel").count() == 3
        grad = _backgrounds(page)
        assert len(set(grad[: len(PROMPT)])) > 3  # the prompt is shaded, token by token
        assert page.locator("#prompt-view .tok.in-span").count() == 3
        page.select_option("#method", "grad_dot_input")
        page.wait_for_function("document.body.dataset.rendered === '2'")
        signed = _backgrounds(page)
        assert signed != grad
        page.select_option("#granularity", "word")
        page.wait_for_function("document.body.dataset.rendered === '3'")
        words = _backgrounds(page)
        assert words[0] == words[1] == words[2]  # "the" is one word: one colour
        page.screenshot(path=str(tmp_path / "explore.png"), full_page=True)
        assert (tmp_path / "explore.png").stat().st_size > 5000

        page.wait_for_selector("#span-features .feat")
        page.click(".tab[data-tab=sae]")
        page.fill("#sae-text", "the sea")
        page.click("#sae-go")
        page.wait_for_selector("#sae-tokens .tok")
        page.locator("#sae-tokens .tok").nth(2).click()
        page.locator("#sae-rows .feat").first.click()
        page.wait_for_selector("#card h3")
        assert "Top activating contexts" in page.inner_text("#card")
        page.fill("#steer-value", "50")
        page.click("#steer-go")
        page.wait_for_selector("#steered")
        assert page.inner_text("#steered").startswith("I think that")
        browser.close()
    assert errors == []
