"""Feature attribution through an SAE on tiny models: an identity-like SAE gives back the plain gradient x
activation at the site; a lossy SAE's latents + bias + error add up to it exactly; summaries read a real
activation store; steering by clamping changes the site as stated."""

from __future__ import annotations

import pytest
import torch

from gemmakit import scope
from gemmakit.errors import InputError
from gemmakit.explain.features import attribute, clamp_hook, steer_generate, store_index
from gemmakit.explain.salience import make_problem, no_param_grads, span_logprob
from gemmakit.scope.explore import index_features
from support.scope_support import one_thread, tiny_gemma

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)
SITE = "layers.1.resid_post"
PROMPT, TARGET = "the sea and the ship", " sailed away."


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_gemma("gemma2", tmp_path_factory.mktemp("models"))


def identity_sae(d: int) -> scope.SAE:
    """f = [relu(x), relu(-x)], x_hat = f @ [I; -I] = x exactly."""
    sae = scope.make_sae("jumprelu", d, 2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    sae.info.site = SITE
    return sae.requires_grad_(False)


def random_sae(d: int, width: int = 96) -> scope.SAE:
    sae = scope.make_sae("jumprelu", d, width)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, width, generator=g) * 0.3)
        sae.W_dec.copy_(torch.randn(width, d, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
        sae.threshold.fill_(0.5)
    return sae.requires_grad_(False)


def plain_gradient_x_activation(model, problem) -> torch.Tensor:
    """x . dlogp/dx at the site [T] with no SAE: the site's activation made a leaf by a hook."""
    state = {}

    def leaf(x):
        state["x"] = x.detach().requires_grad_()
        return state["x"]

    ids = torch.tensor(problem.ids)
    with no_param_grads(model.module), torch.enable_grad(), scope.hook(model, SITE, leaf):
        logp = span_logprob(model.module, ids, problem.absolute_span)
        (g,) = torch.autograd.grad(logp.sum(), state["x"])
    return state["x"].detach()[0], g[0]


def test_identity_like_sae_equals_plain_gradient_x_activation(model):
    d = model.config.hidden_size
    problem = make_problem(model, PROMPT, target=TARGET)
    x, g = plain_gradient_x_activation(model, problem)
    result = attribute(model, identity_sae(d), PROMPT, target=TARGET, summaries=False)
    per_dim = result.attributions[:, :d] + result.attributions[:, d:]
    assert torch.allclose(per_dim, x * g, atol=1e-6 * float((x * g).abs().max()), rtol=0)
    assert float(result.error.abs().max()) == 0.0 and result.error_share == 0.0
    assert torch.allclose(result.total, (x * g).sum(-1), rtol=1e-5, atol=1e-6)


def test_lossy_sae_decomposes_exactly_and_reports_the_error_share(model):
    problem = make_problem(model, PROMPT, target=TARGET, span="0:3")
    x, g = plain_gradient_x_activation(model, problem)
    result = attribute(model, random_sae(model.config.hidden_size), PROMPT, target=TARGET, span="0:3",
                       site=SITE, top=5)
    parts = result.attributions.sum(-1) + result.bias + result.error
    assert torch.allclose(parts, (x * g).sum(-1), rtol=1e-4, atol=1e-5)
    assert 0.0 < result.error_share < 1.0
    feats = result.features
    assert len(feats) == 5
    sums = result.attributions[1:].sum(0)
    assert [f["feature"] for f in feats] == sums.abs().topk(5).indices.tolist()
    for f in feats:
        assert f["attribution"] == pytest.approx(sum(p["attribution"] for p in f["positions"]), rel=1e-5, abs=1e-7)
        assert len(f["summary"]["logits_pos"]) == 6
    pairs = result.top_pairs(3)
    assert abs(pairs[0]["attribution"]) >= abs(pairs[-1]["attribution"])
    assert abs(pairs[0]["attribution"]) == pytest.approx(float(result.attributions[1:].abs().max()))
    assert result.to_dict()["error_share"] == result.error_share


def test_summaries_from_an_activation_store_match_a_model_run(model, tmp_path):
    sae = random_sae(model.config.hidden_size)
    store = scope.build_store(model, "the king and the queen sailed the sea. " * 12, tmp_path / "store", [SITE],
                              context=16, dtype="float32", progress=False)
    index = store_index(store, sae, batch=37)
    direct = index_features(model, sae, SITE, store.sequences())
    assert index.n_tokens == direct.n_tokens
    assert torch.allclose(index.density(), direct.density())
    assert torch.allclose(index.max_activation(), direct.max_activation(), rtol=1e-5, atol=1e-6)
    result = attribute(model, sae, PROMPT, target=TARGET, site=SITE, top=3, store=tmp_path / "store")
    for f in result.features:
        s = f["summary"]
        assert s["density"] == pytest.approx(float(direct.density()[f["feature"]]))
        assert all(ex["max"] <= s["max_activation"] + 1e-4 for ex in s["top"])
    with pytest.raises(InputError):
        attribute(model, sae, PROMPT, target=TARGET, site="layers.0.resid_post", store=tmp_path / "store")


def test_clamp_holds_the_decoded_contribution_and_steering_changes_generation(model):
    sae = random_sae(model.config.hidden_size)
    sae.info.site = SITE
    ids = torch.tensor([model.encode(PROMPT)])
    with scope.capture(model, [SITE]) as before:
        model.logits(ids)
    with scope.hook(model, SITE, clamp_hook(sae, 7, 4.0)), scope.capture(model, [SITE]) as after:
        model.logits(ids)
    x, y = before[SITE][0], after[SITE][0]
    f = sae.encode(x)[:, 7]
    assert torch.equal(y[0], x[0])  # <bos> untouched
    assert torch.allclose(y[1:] - x[1:], (4.0 - f[1:, None]) * sae.W_dec[7], atol=1e-5)
    out = steer_generate(model, sae, None, 7, 40.0, PROMPT, mode="clamp", max_new_tokens=6)
    assert out["default"] == model.generate(PROMPT, 6) and out["steered"] != out["default"]
    with pytest.raises(InputError):
        steer_generate(model, sae, None, 7, 1.0, PROMPT, mode="pin")
