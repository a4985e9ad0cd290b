"""Exploration on a tiny model, and the dashboard rendered by headless Chromium with no console errors.

The browser test needs Debian's `chromium` (apt-get install chromium); without it that test is skipped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from gemmakit import scope
from gemmakit.scope.dashboard import dashboard_data, neighbours, render_html, write_dashboard
from gemmakit.scope.explore import feature_examples, index_features, logit_effects, text_features
from support.scope_support import one_thread, tiny_gemma

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SITE = "layers.2.resid_post"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_gemma("gemma3", tmp_path_factory.mktemp("models"))
    sae = scope.make_sae("jumprelu", 64, 96).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(64, 96, generator=g) * 0.2)
        sae.W_dec.copy_(torch.randn(96, 64, generator=g))
        sae.threshold.fill_(1.5)
    seqs = np.random.default_rng(0).integers(4, 512, size=(12, 20))
    seqs[:, 0] = 2
    return model, sae, seqs


def test_index_and_feature_queries_agree_with_a_direct_encode(setup):
    model, sae, seqs = setup
    index = index_features(model, sae, SITE, seqs, batch_size=5)
    x = scope.activations(model, torch.from_numpy(seqs), [SITE])[SITE]
    f = sae.encode(x)
    f[:, 0] = 0  # <bos> is excluded
    assert index.n_tokens == 12 * 19
    assert torch.allclose(index.density(), (f > 0).float().sum((0, 1)) / index.n_tokens)
    feature = int(index.density().argmax())
    ex = feature_examples(model, index, feature, n_top=3)
    best = f[..., feature].amax(1)
    assert ex["top"][0]["max"] == pytest.approx(float(best.max()), rel=1e-4)
    assert [e["seq"] for e in ex["top"]] == best.argsort(descending=True)[:3].tolist()
    effects = logit_effects(model, sae, SITE, [feature], k=4)[0]
    direct = sae.W_dec[feature] @ model.module.model.embed_tokens.weight.t()
    assert effects["pos"][0][1] == pytest.approx(float(direct.max()), rel=1e-4)
    rows = text_features(model, sae, SITE, "abc")
    assert len(rows) == 4 and rows[0]["features"] == []  # <bos> shows no features


def run_chromium(html_file: Path, out: Path, fragment: str = "") -> tuple[str, str]:
    """(dumped DOM, browser log) for the page; a screenshot is written to `out`."""
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-extensions", "--no-first-run", "--enable-logging=stderr", "--v=0",
            "--window-size=1200,900", f"--user-data-dir={out.parent / 'profile'}"]
    url = html_file.resolve().as_uri() + fragment
    shot = subprocess.run([*base, f"--screenshot={out}", url], capture_output=True, text=True, timeout=90)
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=90)
    return dom.stdout, shot.stderr + dom.stderr


def console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_dashboard_renders_in_headless_chromium_without_console_errors(setup, tmp_path):
    model, sae, seqs = setup
    data = dashboard_data(model, sae, SITE, seqs, n_features=6, texts=["Hi <b>&</b> </script>"],
                          steer_prompt="Once", steer_tokens=3)
    page = write_dashboard(tmp_path / "dash.html", data)
    text = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # self-contained: nothing fetched
    first = data["features"][0]["id"]
    dom, log = run_chromium(page, tmp_path / "feature.png", f"#f{first}")
    assert console_errors(log) == [], console_errors(log)
    assert 'data-rendered="feature"' in dom and f"Feature {first}" in dom and "<svg" in dom
    assert "Neighbouring features" in dom and dom.count("<tr>", dom.index('id="neighbours"')) >= 8
    png = (tmp_path / "feature.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    dom, log = run_chromium(page, tmp_path / "home.png", "#texts")
    assert console_errors(log) == [] and "Features per text" in dom
    # the check can fail: a page whose script breaks is caught
    broken = tmp_path / "broken.html"
    broken.write_text(render_html(data).replace("route();\n</script>", "route(); missingFunction();\n</script>"))
    _, log = run_chromium(broken, tmp_path / "broken.png")
    assert any("missingFunction" in line for line in console_errors(log))


def test_dashboard_data_is_plain_json(setup):
    model, sae, seqs = setup
    data = dashboard_data(model, sae, SITE, seqs, features=[0, 1, 2])
    assert [f["id"] for f in data["features"]] == [0, 1, 2]
    json.dumps(data)


def test_neighbours_are_the_closest_decoder_directions(setup):
    """A planted near-copy of feature 3 comes first; the rest follow the cosine ranking computed directly."""
    _, sae, _ = setup
    planted = sae.W_dec.detach().clone()
    planted[7] = planted[3] * 2.5 + 0.01 * torch.randn(64, generator=torch.Generator().manual_seed(1))
    copy = scope.make_sae("jumprelu", 64, 96).requires_grad_(False)
    copy.W_dec.copy_(planted)
    near = neighbours(copy, [3, 50], n=5)
    assert near[0][0][0] == 7 and near[0][0][1] > 0.99
    cos = torch.nn.functional.cosine_similarity(planted[:, None], planted[None], dim=-1)
    for f, row in zip([3, 50], near, strict=True):
        ranking = [int(i) for i in cos[f].argsort(descending=True) if int(i) != f][:5]
        assert [i for i, _ in row] == ranking
        assert [c for _, c in row] == pytest.approx([float(cos[f, i]) for i in ranking], abs=1e-5)
    assert neighbours(copy, [3], n=0) == [[]]
