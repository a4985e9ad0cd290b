"""Attention for reduced-precision (bf16/fp16) models on CPU, where torch's fused kernel is the slow choice.

Measured on the 2-core machine, Gemma 3 270M shapes (4 query heads, 1 kv head, head_dim 256, 1 thread):
- one query (decoding): the fused kernel spends ~0.3 ms per call on setup, ten times the arithmetic, and bf16
  matmuls of this shape are slower than fp32 ones; two fp32 matmuls and an fp32 softmax take a fraction;
- many queries (prefill, scoring): the fused kernel with a mask computes every query-key pair (49 ms for 1024
  tokens) and reaches ~60 GFLOP/s; query blocks that multiply only the keys they can see (causal, window)
  with bf16 GEMMs take 23 ms.

Both compute what transformers' eager attention computes for a bf16 model: scores scaled (and soft-capped for
Gemma 2) before the mask, softmax in fp32, probabilities rounded to the activation dtype before P @ V (the
decode path keeps them in fp32, a rounding fewer). The fp32 reference path never comes here.
"""

from __future__ import annotations

import torch

QUERY_BLOCK = 256  # queries per block: big enough for efficient GEMMs, small enough to skip unseen keys


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    scores = torch.bmm(q, k.transpose(1, 2)) * scale
    if softcap is not None:  # Gemma 2: cap before the mask
        scores = torch.tanh(scores / softcap) * softcap
    return scores


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                     softcap: float | None) -> torch.Tensor:
    """One query per row: q [B, H, 1, D], k/v [B, Hkv, L, D] (fp32 in a CPU cache), mask [B, 1, 1, L]."""
    b, h, _, d = q.shape
    kv_heads = k.shape[1]
    groups = h // kv_heads
    k = k.reshape(b * kv_heads, -1, d)
    v = v.reshape(b * kv_heads, -1, d)
    qg = q.reshape(b * kv_heads, groups, d).float()
    scores = _scores(qg, k if k.dtype == torch.float32 else k.float(), scale, softcap)
    length = scores.shape[-1]
    scores = torch.where(mask, scores.view(b, kv_heads, groups, length), float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(b * kv_heads, groups, length)
    out = torch.bmm(probs, v if v.dtype == torch.float32 else v.float())
    return out.to(q.dtype).view(b, h, 1, d)


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                      softcap: float | None) -> torch.Tensor:
    """Many queries: q [B, H, T, D], k/v [B, Hkv, L, D] in q's dtype, mask [B, 1, T, L] (True = visible).

    Each block of queries attends over the smallest contiguous span of keys that holds every key the block's
    mask lets it see, so causal and sliding-window structure cost nothing to compute.
    """
    b, h, t, d = q.shape
    kv_heads = k.shape[1]
    groups = h // kv_heads
    out = torch.empty_like(q)
    for start in range(0, t, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, t)
        block_mask = mask[:, :, start:stop]
        seen = block_mask.any(dim=2).any(dim=0).view(-1).nonzero()
        lo, hi = int(seen[0]), int(seen[-1]) + 1  # every row sees at least itself, so `seen` is never empty
        n = stop - start
        qb = q[:, :, start:stop].reshape(b * kv_heads, groups * n, d)
        kb = k[:, :, lo:hi].reshape(b * kv_heads, hi - lo, d)
        vb = v[:, :, lo:hi].reshape(b * kv_heads, hi - lo, d)
        scores = _scores(qb, kb, scale, softcap).view(b, kv_heads, groups, n, hi - lo).float()
        visible = block_mask[..., lo:hi].view(b, 1, 1, n, hi - lo)
        probs = torch.softmax(torch.where(visible, scores, float("-inf")), dim=-1).to(q.dtype)
        out[:, :, start:stop] = torch.bmm(probs.view(b * kv_heads, groups * n, hi - lo), vb).view(b, h, n, d)
    return out
