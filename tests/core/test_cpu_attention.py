"""The CPU attention kernels for bf16 models equal attention written out in fp64 on the same bf16 inputs.

Cases cover what the kernels exploit: causal and sliding-window masks (blocks that skip unseen keys), left
padding, grouped kv heads, Gemma 2's soft-cap, and query blocks smaller than the sequence.
"""

from __future__ import annotations

import pytest
import torch

from gemmakit import cpu_attention
from gemmakit.cache import attention_mask

SCALE = 0.125


def reference(q, k, v, mask, softcap):
    groups = q.shape[1] // k.shape[1]
    k64, v64 = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    scores = q.double() @ k64.transpose(2, 3) * SCALE
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v64


def inputs(t: int, window: int | None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, t, 32, generator=g).bfloat16()
    k = torch.randn(2, 2, t, 32, generator=g).bfloat16()
    v = torch.randn(2, 2, t, 32, generator=g).bfloat16()
    times = torch.arange(t)
    mask = attention_mask(times, times, torch.tensor([0, 7]), window)
    return q, k, v, mask


@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_blocked_attention_equals_reference(monkeypatch, window, softcap):
    monkeypatch.setattr(cpu_attention, "QUERY_BLOCK", 16)  # several blocks, each seeing part of the keys
    q, k, v, mask = inputs(70, window)
    ours = cpu_attention.blocked_attention(q, k, v, mask, SCALE, softcap)
    ref = reference(q, k, v, mask, softcap)
    # bf16 scores and probabilities (as a bf16 model computes them): errors of a few bf16 ulps of O(1) values
    assert (ours.double() - ref).abs().max().item() < 3e-2
    assert ours.dtype == torch.bfloat16


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_decode_attention_equals_reference(softcap):
    q, k, v, mask = inputs(40, 24, seed=1)
    last = mask[:, :, -1:]  # the newest query against all 40 keys
    ours = cpu_attention.decode_attention(q[:, :, -1:], k.float(), v.float(), last, SCALE, softcap)
    ref = reference(q[:, :, -1:], k, v, last, softcap)
    assert (ours.double() - ref).abs().max().item() < 1e-2
