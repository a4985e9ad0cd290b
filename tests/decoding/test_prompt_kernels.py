"""The native bf16 passes of the eager forward (prompt.cpp) against the torch ops they stand in for.

Rope alone is the same fp32 products and sum as torch's, so it must be bit-identical; in the norms and in gelu
the two differ only where torch's vectorised rsqrt/tanh and sum order round differently from the native ones,
so results may differ by about one bf16 rounding of the intermediate, never more.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gemmakit.decoding.native import kernels
from gemmakit.decoding.native.build import library
from gemmakit.loader import build_model
from gemmakit.model import RMSNorm, apply_rope, rope_cos_sin
from gemmakit.weights import hf
from support.tiny_models import VOCAB, save_hf_model

pytestmark = pytest.mark.skipif(library() is None, reason="the native library could not be built here")

ULP = 2.0**-8  # a bf16 value's rounding error, relative (8 significant bits)


def projection(b: int, t: int, heads: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A bf16 projection output [b, t, heads * d] and rope's cos / signed sin for positions 3.. (fp32)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, t, heads * d, generator=g) * 3).bfloat16()
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    cos, signed_sin = rope_cos_sin(torch.arange(3, 3 + t).expand(b, t), inv)
    return x, cos, signed_sin


def torch_norm_rope(x, heads, norm, cos, signed_sin):
    b, t, _ = x.shape
    y = x.view(b, t, heads, -1).transpose(1, 2)
    if norm is not None:
        y = norm(y)
    return apply_rope(y, cos, signed_sin).transpose(1, 2).reshape(b, t, -1)


def test_rope_alone_is_bit_identical_to_torch():
    x, cos, signed_sin = projection(2, 7, 3, 16, seed=0)
    ours = kernels.bf16_norm_rope(x, 3, None, 0.0, cos, signed_sin)
    assert ours.dtype == torch.bfloat16 and ours.shape == x.shape
    assert torch.equal(ours, torch_norm_rope(x, 3, None, cos, signed_sin))


def test_norm_and_rope_within_one_rounding_of_torch():
    x, cos, signed_sin = projection(2, 9, 4, 32, seed=1)
    norm = RMSNorm(32, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, generator=torch.Generator().manual_seed(2)) * 0.5)
    with torch.inference_mode():
        expected = torch_norm_rope(x, 4, norm, cos, signed_sin).float()
        ours = kernels.bf16_norm_rope(x, 4, norm.multiplier(), norm.eps, cos, signed_sin).float()
        normed = norm(x.view(2, 9, 4, 32)).float()  # torch's bf16 norm output, the rope's input
    # one bf16 rounding of each normed input (through |cos| and |sin|) and of the output
    c, s = cos[:, 0].unsqueeze(2), signed_sin[:, 0].unsqueeze(2).abs()
    size = (normed.abs() * c.abs() + torch.roll(normed.abs(), 16, dims=-1) * s).reshape(2, 9, -1)
    bound = 2 * ULP * (size + expected.abs()) + 1e-30
    assert ((ours - expected).abs() <= bound).all()
    assert (ours == expected).float().mean().item() > 0.8  # most values round alike
    # the bound is tight enough to catch a missing norm
    unnormed = kernels.bf16_norm_rope(x, 4, None, 0.0, cos, signed_sin).float()
    assert not ((unnormed - expected).abs() <= bound).all()


def test_geglu_within_one_rounding_of_exact_and_of_torch():
    """Against gelu_tanh(g) * u in fp64: two bf16 roundings at most. Against torch's bf16 ops: the same where
    torch's 0.5 x (1 + tanh(...)) does not cancel (g > -3; below, torch loses the small values that this
    kernel's x * sigmoid(...) form keeps: gelu(-5.25) is -2e-7, torch's bf16 gelu says -0)."""
    g = torch.Generator().manual_seed(3)
    gate = (torch.randn(3, 1000, generator=g) * 2).bfloat16()
    up = torch.randn(3, 1000, generator=g).bfloat16()
    ours = kernels.bf16_geglu(gate, up)
    assert ours.dtype == torch.bfloat16 and ours.shape == gate.shape
    x = gate.double()
    # 0.5 x (1 + tanh(z)) = x sigmoid(2 z), the form that does not cancel for very negative x
    exact = x * torch.sigmoid(2 * (2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)) * up.double()
    assert ((ours.double() - exact).abs() <= 2.5 * ULP * exact.abs()).all()
    assert not ((kernels.bf16_geglu(gate, gate).double() - exact).abs() <= 2.5 * ULP * exact.abs()).all()  # can fail
    torch_ops = (F.gelu(gate, approximate="tanh") * up).double()
    kept = gate.float() > -3
    assert ((ours.double() - torch_ops).abs() <= 5 * ULP * exact.abs())[kept].all()
    assert (ours.double() == torch_ops)[kept].float().mean().item() > 0.9


def test_rms_norm_within_one_rounding_of_torch():
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 11, 96, generator=g) * 4).bfloat16()
    norm = RMSNorm(96, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=g) * 0.5)
    with torch.inference_mode():
        expected = F.rms_norm(x.float(), (96,), norm.multiplier(), norm.eps)  # torch's fp32 value, unrounded
        ours = kernels.bf16_rms_norm(x, norm.multiplier(), norm.eps)
        torch_bf16 = expected.bfloat16()
    assert ours.dtype == torch.bfloat16 and ours.shape == x.shape
    assert ((ours.float() - expected).abs() <= 1.01 * ULP * expected.abs()).all()  # one rounding of the fp32 value
    assert (ours == torch_bf16).float().mean().item() > 0.95
    wrong = kernels.bf16_rms_norm(x, torch.ones(96), norm.eps)  # the weight left out: must fail the bound
    assert not ((wrong.float() - expected).abs() <= 1.01 * ULP * expected.abs()).all()


def test_usable_only_for_contiguous_cpu_bf16_outside_autograd():
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    assert kernels.fused_bf16_usable(x)
    assert not kernels.fused_bf16_usable(x.float())
    assert not kernels.fused_bf16_usable(x.t())
    assert not kernels.fused_bf16_usable(x.clone().requires_grad_(True))
    weight = torch.zeros(8, requires_grad=True)  # a norm being trained: its gradient needs torch's ops
    assert not kernels.fused_bf16_usable(x, weight)
    with torch.no_grad():
        assert kernels.fused_bf16_usable(x, weight)


@pytest.mark.parametrize("family", ["gemma", "gemma3"])
def test_bf16_forward_takes_the_native_passes_and_stays_close(family, tmp_path, monkeypatch):
    """A bf16 model's eager forward runs the fused passes (norms, q/k norm and rope, geglu) and gives the logits
    of the torch ops within bf16 rounding."""
    save_hf_model(family, tmp_path)
    model = build_model(hf.read_config(tmp_path), hf.read_state_dict(tmp_path), torch.bfloat16, tmp_path)
    ids = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(4))
    calls = []
    for name in ("bf16_norm_rope", "bf16_geglu", "bf16_rms_norm"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    with torch.inference_mode():
        fused = model(ids).float()
        layers = model.config.num_layers
        norms = (4 if model.config.sandwich_norms else 2) * layers + 1  # the final norm too
        assert calls.count("bf16_rms_norm") == norms and calls.count("bf16_geglu") == layers
        # q and k of every layer, and each RMSNorm (bf16_norm_rope without rope)
        assert calls.count("bf16_norm_rope") == 2 * layers + norms
        monkeypatch.setattr(kernels, "fused_bf16_usable", lambda *a: False)
        plain = model(ids).float()
    assert (fused - plain).abs().max().item() <= 0.05 * plain.abs().max().item()
    assert (fused.argmax(-1) == plain.argmax(-1)).float().mean().item() >= 0.9
