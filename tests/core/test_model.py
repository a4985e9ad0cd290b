"""Our forward pass and cache against transformers' eager forward on tiny random Gemma 1/2/3 models."""

from __future__ import annotations

import pytest
import torch

from gemmakit.cache import KVCache
from gemmakit.decoding import Sampling, generate_tokens
from gemmakit.loader import build_model
from gemmakit.weights import hf
from support.tiny_models import VOCAB, WINDOW, save_hf_model

FAMILIES = ["gemma", "gemma2", "gemma3"]
SEQ = 5 * WINDOW  # well past the sliding window


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(transformers model, our model) with the same weights, read back from the saved HF directory."""
    directory = tmp_path_factory.mktemp(request.param)
    reference = save_hf_model(request.param, directory)
    ours = build_model(hf.read_config(directory), hf.read_state_dict(directory), torch.float32, directory)
    return reference, ours


def test_logits_match_transformers(pair):
    reference, ours = pair
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_bfloat16_close_to_transformers_bfloat16(pair):
    reference, ours = pair
    ids = torch.randint(3, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(2))
    ours16 = build_model(ours.config, {k: v for k, v in ours.state_dict().items()}, torch.bfloat16, "test")
    with torch.no_grad():
        expected = reference.to(torch.bfloat16)(ids).logits.float()
        got = ours16(ids).float()
        reference.float()
    # bf16 has ~3 significant digits; the two implementations round in slightly different places
    assert (got - expected).abs().max().item() <= 0.1 * expected.abs().max().item()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.9


def test_chunked_prefill_through_cache_equals_full_forward(pair):
    """Feeding the sequence in uneven chunks (longer and shorter than the window) reproduces the full pass."""
    _, ours = pair
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(ids)
        cache = KVCache(ours.config, 2, SEQ, torch.float32)
        pieces, start = [], 0
        for size in [3, WINDOW + 5, 1, 1, WINDOW - 1, 2 * WINDOW, 1]:
            pieces.append(ours(ids[:, start:start + size], cache=cache))
            start += size
        pieces.append(ours(ids[:, start:], cache=cache))
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-4


def test_greedy_generation_with_cache_equals_recomputing(pair):
    _, ours = pair
    prompt = torch.randint(3, VOCAB, (5,), generator=torch.Generator().manual_seed(4)).tolist()
    cached = [int(t) for t in generate_tokens(ours, [prompt], 64)]
    assert len(cached) == 64
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(64):
            ids.append(int(ours(torch.tensor([ids]))[0, -1].argmax()))
    assert cached == ids[len(prompt):]


def test_batched_left_padded_generation_equals_single_rows(pair):
    _, ours = pair
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (3, 11, 6)]
    batched = torch.stack(list(generate_tokens(ours, prompts, 2 * WINDOW))).T.tolist()
    for prompt, row in zip(prompts, batched, strict=True):
        single = [int(t) for t in generate_tokens(ours, [prompt], 2 * WINDOW)]
        assert row == single


def test_seeded_sampling_is_reproducible_and_respects_top_k(pair):
    _, ours = pair
    prompt = [5, 6, 7]
    sampling = Sampling(temperature=1.0, top_k=1, seed=0)
    greedy = [int(t) for t in generate_tokens(ours, [prompt], 10)]
    assert [int(t) for t in generate_tokens(ours, [prompt], 10, sampling)] == greedy  # top-1 sampling is greedy
    hot = Sampling(temperature=2.0, top_p=0.9, seed=7)
    first = [int(t) for t in generate_tokens(ours, [prompt], 10, hot)]
    assert first == [int(t) for t in generate_tokens(ours, [prompt], 10, hot)]


def test_argmax_rows_is_torch_argmax_including_ties():
    from gemmakit.decoding.sampling import argmax_rows

    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 64 * 50, generator=gen)
    logits[1, [5, 700, 3000]] = 9.0  # ties across blocks: the first wins
    logits[2, [130, 131]] = 9.0  # ties inside a block
    logits[3] = 0.0  # all equal
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))
    odd = torch.randn(2, 1000, generator=gen)  # not a multiple of the block: plain argmax
    assert torch.equal(argmax_rows(odd), odd.argmax(dim=-1))
