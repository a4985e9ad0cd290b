"""Generation: prefill once, then decode one token at a time against the static KV cache.

The engine only sees token ids; text, chat templates and detokenisation live with the tokenizer. Batches are
left-padded so that every row's next token sits in the same column; each row's pad count shifts its rope
positions and hides its padding from attention.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from gemmakit.cache import KVCache
from gemmakit.decoding.compiled import capacity_for
from gemmakit.decoding.protocol import EagerDecoder, StepDecoder
from gemmakit.decoding.sampling import GREEDY, Sampling, choose
from gemmakit.errors import InputError
from gemmakit.model import Transformer


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] with each prompt right-aligned, and each row's pad count [B]."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
    pad = torch.tensor([width - len(p) for p in prompts], dtype=torch.long)
    return ids, pad


def generate_tokens(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    stop_ids: frozenset[int] = frozenset(),
    max_context: int | None = None,
    row_seeds: Sequence[int] | None = None,
    decoder: StepDecoder | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row [B] per step, until all rows stopped or `max_new_tokens`.

    One left-padded batch that starts and ends together (training's on-policy sampling, benchmarks); requests
    that come and go use `gemmakit.decoding.Scheduler`. `decoder` (default: the eager one) runs the steps; for a
    step it cannot take (`usable`), the eager decoder runs it. A row that produced a stop id keeps being fed
    (its later tokens are ignored by the caller) so the batch keeps static shapes; the stop token itself is
    yielded so the caller can see why the row ended. `row_seeds` (one per prompt, instead of `sampling.seed`)
    make each row's samples independent of the batch it is in, e.g. so data-parallel ranks sample what one
    process sampling the whole batch would.
    """
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    limit = model.config.max_position if max_context is None else min(max_context, model.config.max_position)
    ids, pad = left_pad(prompts, model.config.pad_id)
    if ids.shape[1] > limit:
        raise InputError(f"prompt has {ids.shape[1]} tokens but the model's context is {limit}; shorten the prompt")
    eager = EagerDecoder(model)
    decoder = decoder or eager
    capacity = capacity_for(decoder, ids.shape[1] + max_new_tokens, limit)
    if max_new_tokens == 0:
        return
    device = model.device
    cache = KVCache(model.config, ids.shape[0], capacity, model.dtype, device)
    cache.pad.copy_(pad)
    generator: torch.Generator | list[torch.Generator] | None = None
    if row_seeds is not None:
        if len(row_seeds) != len(prompts):
            raise InputError(f"{len(row_seeds)} row seeds for {len(prompts)} prompts")
        generator = [torch.Generator(device=device).manual_seed(s) for s in row_seeds]
    elif sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    done = [False] * ids.shape[0]

    def now() -> StepDecoder:  # checked every step: hooks may be added while generating
        return decoder if decoder.usable(cache) else eager

    def pick(d: StepDecoder, h: torch.Tensor) -> torch.Tensor:
        return d.greedy(h) if sampling.greedy else choose(d.logits(h), sampling, generator, d.argmax)

    with torch.inference_mode():
        token = pick(now(), decoder.prefill(ids.to(device), cache))
        for step in range(max_new_tokens):
            yield token
            # plain Python on the [B] ids: a few torch ops here cost more than the choice itself
            done = [d or t in stop_ids for d, t in zip(done, token.tolist(), strict=True)]
            if all(done) or step == max_new_tokens - 1 or cache.length >= capacity:
                return
            d = now()
            token = d.greedy_step(token, cache) if sampling.greedy else pick(d, d.advance(token, cache))
