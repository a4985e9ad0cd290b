"""Decoding through a compiled step: one token per row through every layer with static shapes (torch.compile).

Why: eager decoding of a small Gemma runs ~1,500 tiny torch ops per token, and on a CPU each costs a few
microseconds of dispatch, about as much as reading all of the 270M's weights. torch.compile (inductor with its
C++ wrapper) fuses the elementwise work and calls the matmul kernels from generated C++, so that overhead
nearly vanishes. The price is compiling: a minute or two the first time on two cores, ~15 s in later processes
(inductor's on-disk cache), once per batch size and cache capacity bucket. So it is opt-in:
`gemmakit.load(..., compile=True)`. The graph covers the layers; the LM head runs eagerly after it (one
quantised matmul), so the compiled and eager decoders share the head and its greedy choice.

Static shapes: each layer attends over its whole cache buffer (the ring for sliding layers, the full capacity
for global ones) with a mask built from the step's position, and writes its k/v with `index_copy_` at a slot
held in a tensor, so one graph serves every step. The values equal the eager path's: the same modules run in
the same order; only empty or out-of-window slots are added, and they are masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemmakit.cache import KVCache
from gemmakit.decoding.protocol import StepDecoder
from gemmakit.model import LayerInputs, Transformer

CAPACITY_BUCKET = 256  # caches are sized in multiples of this, so new lengths rarely mean a new compilation


@dataclass
class _Slots:
    """Where this step's k/v go: the time itself in global layers, time % ring in sliding ones."""

    global_slot: torch.Tensor
    sliding_slot: torch.Tensor


class _StaticCache:
    """What `Attention.forward` sees as its cache inside the compiled step."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: _Slots) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        slot = slots.sliding_slot if self.cache.config.is_sliding(layer) else slots.global_slot
        keys.index_copy_(2, slot, k.to(keys.dtype))
        values.index_copy_(2, slot, v.to(values.dtype))
        return keys, values


def _layer_inputs(model: Transformer, cache: KVCache, time: torch.Tensor, sliding: bool) -> LayerInputs:
    """Rope tables and mask [B, 1, 1, S] over a whole buffer for the query at `time` (a [1] tensor)."""
    positions = (time.view(1, 1) - cache.pad.view(-1, 1)).clamp(min=0)
    cos, signed_sin = model._rope_lookup(positions, sliding, cache.capacity)
    size = cache.ring_size if sliding else cache.capacity
    slots = torch.arange(size, device=time.device)
    # the latest time <= now each slot holds; a ring of `size` <= window slots holds exactly the last `size`
    # times, so the window needs no test of its own
    times = time - (time - slots) % size if sliding else slots
    visible = (times >= 0) & (times <= time)
    own_row = (times.view(1, -1) >= cache.pad.view(-1, 1)) | (times == time).view(1, -1)
    return LayerInputs(cos, signed_sin, (visible.view(1, -1) & own_row).view(-1, 1, 1, size))


def _step(model: Transformer, ids: torch.Tensor, time: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """The residual [B, d] after the last layer for ids [B, 1] at `time`, writing their k/v into `cache`."""
    kinds = {sliding: _layer_inputs(model, cache, time, sliding) for sliding in (False, True)}
    slots = _Slots(time, time % cache.ring_size)
    static = _StaticCache(cache)
    h = model.embed(ids)
    for layer in model.model.layers:
        h = layer(h, kinds[layer.sliding], static, slots)
    return h[:, -1]


class CompiledDecoder(StepDecoder):
    """Decode steps of `model` through one compiled graph per (batch size, capacity)."""

    name = "compiled"

    def __init__(self, model: Transformer) -> None:
        super().__init__(model)
        self._compiled = torch.compile(_step, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})

    def usable(self, cache) -> bool:
        """Hooks (scope's capture and steering) need the eager path: the graph would not see hooks added later."""
        return not self._hooks.any()

    def advance(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        for sliding in (False, True):  # grow the rope tables outside the graph, never inside it
            self.model.rope_table(sliding, cache.capacity)
        now = cache.length
        time = torch.tensor([now], device=cache.pad.device)
        h = self._compiled(self.model, ids.view(-1, 1), time, cache)
        cache.ring_times[now % cache.ring_size] = now
        cache.length = now + 1
        return h


def capacity_for(decoder: StepDecoder, needed: int, limit: int) -> int:
    """The cache capacity to allocate: rounded up to a bucket when decoding is compiled (fewer graphs)."""
    if not isinstance(decoder, CompiledDecoder):
        return needed
    return min(limit, -(-needed // CAPACITY_BUCKET) * CAPACITY_BUCKET)
