"""Sites on tiny random models: capture equals the value computed by hand from the model's parts; an exact
(identity-like) SAE spliced in leaves the logits unchanged; steering adds its vector; stores and metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemmakit import InputError, scope
from gemmakit.cache import attention_mask
from support.scope_support import one_thread, tiny_gemma

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module", params=["gemma", "gemma2", "gemma3"])
def model(request, tmp_path_factory):
    return tiny_gemma(request.param, tmp_path_factory.mktemp("models"))


def hand_rope(x: torch.Tensor, times: torch.Tensor, module, block) -> torch.Tensor:
    """Rotate-half rope written out: angle t * inv_freq[i] for the pair (x[i], x[i + d/2])."""
    inv = module.inv_freq_local if block.sliding else module.inv_freq_global
    angles = times.float()[:, None] * inv[None, :]  # [T, D/2]
    cos, sin = angles.cos(), angles.sin()
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


def hand_attention(module, block, h: torch.Tensor) -> torch.Tensor:
    """Concatenated heads before o_proj, written out from the attention module's weights."""
    attn, c = block.self_attn, module.config
    b, t, _ = h.shape
    x = block.input_layernorm(h)
    q = attn.q_proj(x).view(b, t, c.num_heads, c.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    times = torch.arange(t)
    q, k = hand_rope(q, times, module, block), hand_rope(k, times, module, block)
    groups = c.num_heads // c.num_kv_heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(2, 3) * c.query_pre_attn_scalar ** -0.5
    if c.attn_softcap is not None:
        scores = torch.tanh(scores / c.attn_softcap) * c.attn_softcap
    mask = attention_mask(times, times, torch.zeros(b, dtype=torch.long), c.sliding_window if block.sliding else None)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).reshape(b, t, c.num_heads * c.head_dim)


def test_capture_equals_hand_computation_at_every_site(model):
    module = model.module
    ids = torch.randint(4, 512, (2, 20))
    ids[:, 0] = 2
    sites = [f"layers.{i}.{kind}" for i in range(module.config.num_layers) for kind in scope.KINDS]
    with scope.capture(model, sites) as acts:
        logits = model.logits(ids)
    assert torch.allclose(logits, module(ids), atol=1e-5)  # capturing changes nothing
    h = module.embed(ids)
    with torch.no_grad():
        for i, block in enumerate(module.model.layers):
            z = hand_attention(module, block, h)
            assert torch.allclose(acts[f"layers.{i}.attn_out"], z, atol=1e-4), f"attn_out {i}"
            a = block.self_attn.o_proj(z)
            if block.sandwich:
                mid = h + block.post_attention_layernorm(a)
                m = block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(mid)))
            else:
                mid = h + a
                m = block.mlp(block.post_attention_layernorm(mid))
            assert torch.allclose(acts[f"layers.{i}.mlp_out"], m, atol=1e-4), f"mlp_out {i}"
            h = mid + m
            assert torch.allclose(acts[f"layers.{i}.resid_post"], h, atol=1e-4), f"resid_post {i}"
            assert acts[f"layers.{i}.resid_post"].shape == (2, 20, module.config.hidden_size)
    assert not any(s._forward_hooks for b in module.model.layers for s in (b.resid_post, b.mlp_out))


def test_activations_stop_after_the_last_requested_layer(model):
    module = model.module
    ids = torch.randint(4, 512, (1, 12))
    calls = []
    last = module.model.layers[-1]
    handle = last.register_forward_hook(lambda *a: calls.append(1))
    try:
        acts = scope.activations(model, ids, ["layers.0.mlp_out", "layers.1.resid_post"])
    finally:
        handle.remove()
    assert not calls  # the last layer never ran
    assert torch.allclose(acts["layers.1.resid_post"], module.hidden_states(ids, stop_after_layer=1), atol=1e-5)
    with pytest.raises(InputError, match="layer 99"):
        scope.activations(model, ids, ["layers.99.resid_post"])
    with pytest.raises(InputError, match="unknown site"):
        scope.parse_site("layers.1.resid_pre")


def identity_sae(d: int) -> scope.JumpReLUSAE:
    """f = [relu(x), relu(-x)], x_hat = f[:d] - f[d:] = x exactly (threshold 0)."""
    sae = scope.JumpReLUSAE(d, 2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


@pytest.mark.parametrize("kind", scope.KINDS)
def test_splicing_an_exact_sae_leaves_logits_unchanged(model, kind):
    module = model.module
    site = f"layers.1.{kind}"
    ids = torch.randint(4, 512, (2, 16))
    d = scope.activations(model, ids, [site])[site].shape[-1]
    clean = model.logits(ids)
    with scope.splice(model, site, identity_sae(d)):
        spliced = model.logits(ids)
    assert torch.allclose(spliced, clean, atol=1e-5)
    broken = identity_sae(d)
    with torch.no_grad():  # an offset, not a scale: Gemma 2/3 normalise attention output after o_proj
        broken.b_dec.add_(torch.randn(d))
    with scope.splice(model, site, broken):
        assert not torch.allclose(model.logits(ids), clean, atol=1e-3)  # the splice really is in the path
    assert torch.allclose(model.logits(ids), clean)  # and is gone afterwards
    del module


def test_steer_adds_the_vector_during_generation(model):
    site = "layers.1.resid_post"
    d = model.config.hidden_size
    vec = torch.randn(d)
    ids = torch.randint(4, 512, (1, 10))
    ids[0, 0] = 2
    base = scope.activations(model, ids, [site])[site]
    with scope.steer(model, site, vec, coeff=3.0), scope.capture(model, [site]) as acts:
        model.logits(ids)
    # the capture hook runs after the steering hook, so it sees the steered value; bos (position 0) is skipped
    assert torch.allclose(acts[site][0, 1:], base[0, 1:] + 3.0 * vec, atol=1e-4)
    assert torch.allclose(acts[site][0, 0], base[0, 0])
    plain = model.generate("hello", max_new_tokens=6)
    with scope.steer(model, site, vec * 50):
        steered = model.generate("hello", max_new_tokens=6)
    assert steered != plain
    assert model.generate("hello", max_new_tokens=6) == plain


def test_store_excludes_specials_and_resumes(tmp_path, model, monkeypatch):
    text = "the quick brown fox jumps over the lazy dog. " * 12
    site = "layers.1.resid_post"
    full = scope.build_store(model, text, tmp_path / "full", [site], context=16, batch_size=4, progress=False,
                             dtype="float32")
    seqs = full.sequences()
    assert (seqs[:, 0] == 2).all() and len(full) == seqs.shape[0] * 15  # one bos per window, never stored
    expected = scope.activations(model, torch.from_numpy(seqs.astype(np.int64)), [site])[site][:, 1:]
    assert torch.allclose(full.rows(torch.arange(len(full))), expected.reshape(-1, expected.shape[-1]), atol=1e-5)
    # interrupt a build after one batch, then resume: same rows as an uninterrupted build
    import gemmakit.scope.store as store_mod

    real, count = store_mod.activations, {"n": 0}

    def flaky(*args, **kwargs):
        count["n"] += 1
        if count["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(store_mod, "activations", flaky)
    with pytest.raises(KeyboardInterrupt):
        scope.build_store(model, text, tmp_path / "part", [site], context=16, batch_size=4, progress=False)
    with pytest.raises(InputError, match="incomplete"):
        scope.ActivationStore(tmp_path / "part")
    monkeypatch.setattr(store_mod, "activations", real)
    resumed = scope.build_store(model, text, tmp_path / "part", [site], context=16, batch_size=4, progress=False)
    bf16 = full.rows(torch.arange(len(full))).to(torch.bfloat16).float()
    assert torch.equal(resumed.rows(torch.arange(len(resumed))), bf16)
    batches = list(resumed.batches(32, seed=1))
    assert len(batches) == len(resumed) // 32 and batches[0].shape == (32, model.config.hidden_size)


def test_metrics_of_an_exact_sae(model):
    site = "layers.1.resid_post"
    seqs = np.random.default_rng(0).integers(4, 512, size=(4, 12))
    seqs[:, 0] = 2
    m = scope.evaluate(model, identity_sae(model.config.hidden_size), site, seqs, batch_size=2)
    assert m.tokens == 4 * 11 and m.fvu < 1e-10 and abs(m.delta_ce) < 1e-5
    assert m.l0 == pytest.approx(model.config.hidden_size, abs=1)  # one of relu(x), relu(-x) per dim
    assert 0 <= m.dead_fraction <= 1 and m.dense_fraction > 0
