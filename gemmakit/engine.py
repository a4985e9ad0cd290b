"""Generation: prefill once, then decode one token at a time against the static KV cache.

The engine only sees token ids; text, chat templates and detokenisation live with the tokenizer. Batches are
left-padded so that every row's next token sits in the same column; each row's pad count shifts its rope
positions and hides its padding from attention.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from gemmakit.cache import KVCache
from gemmakit.compiled_decode import capacity_for
from gemmakit.errors import InputError
from gemmakit.model import Transformer
from gemmakit.quant import top_indices


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 means greedy (argmax); the filters then do nothing."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise InputError(f"min_p must be in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Scale by temperature and set to -inf every token that top-k, top-p or min-p rules out. logits: [B, V]."""
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = logits.gather(-1, top_indices(logits, sampling.top_k)).amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.min_p is not None and sampling.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        floor = probs.max(dim=-1, keepdim=True).values * sampling.min_p
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        logits = _nucleus(logits, sampling.top_p)
    return logits


# Tokens sorted to find a nucleus before falling back to sorting the whole vocabulary: a nucleus is usually a
# few dozen tokens, and sorting 262,144 logits takes ~20 ms on two cores (a top 1024 and its sort, ~1 ms).
NUCLEUS_SEARCH = 1024


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """-inf for every token outside the smallest set of most likely tokens whose probability reaches top_p: a
    token is dropped when the tokens ranked above it already reach it (the first token always stays)."""
    probs = torch.softmax(logits, dim=-1)
    search = min(NUCLEUS_SEARCH, logits.shape[-1])
    candidates = top_indices(probs, search)
    top, rank = probs.gather(-1, candidates).sort(dim=-1, descending=True)
    order = candidates.gather(-1, rank)
    if not bool((top.sum(dim=-1) >= top_p).all()):  # some row's nucleus is wider: rank its whole vocabulary
        top, order = torch.sort(probs, dim=-1, descending=True)
    drop_sorted = (top.cumsum(dim=-1) - top) >= top_p
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, ~drop_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def draw(probs: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None,
         block: int = 64) -> torch.Tensor:
    """One token per row of probs [B, V] (any non-negative weights), by inverse CDF: one uniform number per row,
    then the first token whose cumulative weight exceeds it, found in two levels (blocks of 64 tokens, then
    inside the chosen block) with float64 sums. torch.multinomial takes ~4.5 ms on a 262k-wide row on two cores,
    a float64 cumsum of the whole row 1.5 ms, this ~0.1. A token of weight 0 is never drawn. With one generator
    per row, row r uses only generator r."""
    rows, width = probs.shape
    if isinstance(generator, (list, tuple)):
        u = torch.cat([torch.rand(1, generator=g, device=probs.device, dtype=torch.float64) for g in generator])
    else:
        u = torch.rand(rows, generator=generator, device=probs.device, dtype=torch.float64)
    block = block if width % block == 0 else width
    blocks = probs.view(rows, width // block, block)
    cdf = blocks.sum(dim=-1, dtype=torch.float64).cumsum(dim=-1)  # [B, blocks]
    target = (u * cdf[:, -1]).unsqueeze(-1)
    chosen = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1)  # [B, 1]
    before = torch.where(chosen > 0, cdf.gather(-1, (chosen - 1).clamp(min=0)), 0.0)
    weights = blocks[torch.arange(rows, device=probs.device), chosen.squeeze(-1)]  # [B, block]
    inner = torch.searchsorted(weights.double().cumsum(dim=-1), target - before, right=True).squeeze(-1)
    # summation order can leave the residual a rounding above the block's own cumsum: take its last real token
    last = (torch.arange(block, device=probs.device) * (weights > 0)).amax(dim=-1)
    return chosen.squeeze(-1) * block + torch.minimum(inner, last)


def argmax_rows(logits: torch.Tensor, block: int = 64) -> torch.Tensor:
    """`logits.argmax(-1)` for [B, V] logits (the first index of the maximum), ~3x faster on wide CPU rows.

    torch's argmax over a 262k-wide row runs at a fraction of memory speed; block maxima (a fast reduction),
    the first block holding the row maximum, and an argmax inside that block give the same index.
    """
    rows, width = logits.shape
    if width % block or logits.device.type != "cpu":
        return logits.argmax(dim=-1)
    blocks = logits.view(rows, width // block, block)
    maxima = blocks.amax(dim=-1)
    first = (maxima == maxima.amax(dim=-1, keepdim=True)).to(torch.uint8).argmax(dim=-1)
    return first * block + blocks[torch.arange(rows), first].argmax(dim=-1)


def choose(logits: torch.Tensor, sampling: Sampling,
           generator: torch.Generator | Sequence[torch.Generator] | None,
           argmax: Callable[[torch.Tensor], torch.Tensor] = argmax_rows) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]. Given one generator per row, row r draws only from
    generator r, so its sample does not depend on which other rows share the batch. `argmax` is the greedy
    choice (a step decoder may bring a faster one with the same result)."""
    if sampling.greedy:
        return argmax(logits)
    return draw(torch.softmax(filter_logits(logits, sampling), dim=-1), generator)


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
    sampling: Sampling = Sampling(),
    stop_ids: frozenset[int] = frozenset(),
    max_context: int | None = None,
    row_seeds: Sequence[int] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row [B] per step, until all rows stopped or `max_new_tokens`.

    A row that produced a stop id keeps being fed (its later tokens are ignored by the caller) so the batch
    keeps static shapes; the stop token itself is yielded so the caller can see why the row ended.
    `row_seeds` (one per prompt, instead of `sampling.seed`) make each row's samples independent of the batch it
    is in, e.g. so data-parallel ranks sample what one process sampling the whole batch would.
    """
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    limit = model.config.max_position if max_context is None else min(max_context, model.config.max_position)
    ids, pad = left_pad(prompts, model.config.pad_id)
    if ids.shape[1] > limit:
        raise InputError(f"prompt has {ids.shape[1]} tokens but the model's context is {limit}; shorten the prompt")
    capacity = capacity_for(model, ids.shape[1] + max_new_tokens, limit)
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
    # a step decoder (torch.compile'd if asked for, else the native int8 step) when it can take this cache
    decoder = getattr(model, "compiled_decoder", None) or getattr(model, "native_decoder", None)
    greedy = getattr(decoder, "argmax", argmax_rows)

    def next_token(token: torch.Tensor) -> torch.Tensor:
        if decoder is not None and decoder.usable(cache):
            if sampling.greedy and hasattr(decoder, "greedy_step"):
                chosen = decoder.greedy_step(token, cache)  # layers, head and argmax in one native call
                if chosen is not None:
                    return chosen
            logits = decoder.step(token.view(-1, 1), cache)
        else:
            logits = model(token.view(-1, 1), cache=cache, last_only=True)[:, -1]
        return choose(logits, sampling, generator, greedy)

    def first_token() -> torch.Tensor:
        if sampling.greedy and hasattr(decoder, "greedy_choice") and decoder.usable(cache):
            h = model.hidden_states(ids.to(device), cache)[:, -1]
            chosen = decoder.greedy_choice(h, cache)  # the head greedy_step uses
            if chosen is not None:
                return chosen
            logits = model.unembed(h[:, None])[:, -1]
        else:
            logits = model(ids.to(device), cache=cache, last_only=True)[:, -1]
        return choose(logits, sampling, generator, greedy)

    with torch.inference_mode():
        token = first_token()
        for step in range(max_new_tokens):
            yield token
            # plain Python on the [B] ids: a few torch ops here cost more than the choice itself
            done = [d or t in stop_ids for d, t in zip(done, token.tolist(), strict=True)]
            if all(done) or step == max_new_tokens - 1 or cache.length >= capacity:
                return
            token = next_token(token)
