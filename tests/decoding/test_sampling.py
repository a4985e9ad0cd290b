"""Sampling: the inverse-CDF draw follows the distribution it is given, and the nucleus (top-p) search that
avoids sorting the vocabulary keeps exactly the tokens a full sort keeps."""

from __future__ import annotations

import torch

from gemmakit.decoding.sampling import NUCLEUS_SEARCH, _nucleus, draw


def test_draw_follows_the_distribution_and_never_draws_a_zero():
    """50,000 draws of one distribution over 4 blocks of 64 tokens (a few heavy tokens, a long light tail,
    zeros inside and at both ends, unnormalised weights): every frequency lies within 5 standard deviations
    of its probability, and no zero-weight token is ever drawn."""
    gen = torch.Generator().manual_seed(0)
    weights = torch.rand(256, generator=gen) ** 4
    weights[[0, 63, 64, 130, 255]] = 0.0
    weights[[10, 100, 200]] = torch.tensor([20.0, 8.0, 3.0])
    weights *= 3.0  # draw takes weights, not only probabilities
    draws = 50_000
    tokens = draw(weights.expand(draws, -1).contiguous(), torch.Generator().manual_seed(1))
    assert tokens.shape == (draws,) and tokens.dtype == torch.long
    freq = torch.bincount(tokens, minlength=256).double() / draws
    probs = (weights / weights.sum()).double()
    assert bool((freq[probs == 0] == 0).all())
    sigma = (probs * (1 - probs) / draws).sqrt()
    assert bool(((freq - probs).abs() <= 5 * sigma + 1e-12).all())


def test_draw_with_one_generator_per_row_matches_each_row_alone():
    gen = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(3, 1000, generator=gen), dim=-1)  # 1000: not whole blocks of 64
    seeds = [5, 6, 7]
    together = draw(probs, [torch.Generator().manual_seed(s) for s in seeds])
    alone = [draw(probs[r:r + 1], torch.Generator().manual_seed(s)).item() for r, s in enumerate(seeds)]
    assert together.tolist() == alone


def full_sort_nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The reference: sort the whole vocabulary, drop a token when the tokens ranked above it reach top_p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, (probs.cumsum(dim=-1) - probs) >= top_p)
    return logits.masked_fill(drop, float("-inf"))


def test_nucleus_keeps_what_a_full_sort_keeps():
    """Peaked rows (nucleus inside the first NUCLEUS_SEARCH tokens) and a flat batch (nucleus wider: the
    whole vocabulary gets ranked), over 16,384 tokens and several top_p."""
    gen = torch.Generator().manual_seed(3)
    peaked = torch.randn(4, 16384, generator=gen) * 4
    flat = torch.randn(2, 16384, generator=gen) * 0.1
    for logits in (peaked, flat):
        for top_p in (0.5, 0.9, 0.99):
            got, want = _nucleus(logits, top_p), full_sort_nucleus(logits, top_p)
            assert torch.equal(got.isinf(), want.isinf()), top_p
            assert torch.equal(got[~got.isinf()], logits[~got.isinf()])
    kept = (~_nucleus(flat, 0.9).isinf()).sum(dim=-1)
    assert bool((kept > NUCLEUS_SEARCH).all())  # the flat case did need the fallback
    assert bool(((~_nucleus(peaked, 0.9).isinf()).sum(dim=-1) < NUCLEUS_SEARCH).all())
