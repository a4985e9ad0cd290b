"""The one interface every step decoder implements, and the eager decoder that defines its meaning.

A step decoder advances a KV cache by one token per row and turns the resulting residual stream into logits or a
greedy choice. Three implementations exist: `EagerDecoder` (the module's own forward: the reference, and the
only one that runs hooks), `CompiledDecoder` (torch.compile'd layers) and `NativeDecoder` (all layers in one C++
call, int8 models on CPU). The engine and the scheduler only call the methods below, so which decoder runs is
decided in one place (`gemmakit.decoding.choice`), never by probing attributes.

Two kinds of cache are advanced:
- `KVCache`: one timeline shared by a left-padded batch (`advance`, `step`, `greedy_step`);
- `SlotCache`: a pool of rows, each its own sequence at its own position (`advance_rows`, `greedy_rows`), which
  is what continuous batching needs. The default `advance_rows` runs each row alone through its row view, so any
  decoder serves a `SlotCache`; the native decoder steps all rows in one call.
Each row's result never depends on the other rows of the step (tests/decoding check this), so a request decodes
the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gemmakit.cache import KVCache, SlotCache
from gemmakit.decoding.sampling import argmax_rows
from gemmakit.model import HookWatch, Transformer


class StepDecoder:
    """Base class and protocol. Subclasses override `advance` (and may override the rest for speed)."""

    name = "abstract"
    # Whether `logits`/`greedy` of n rows equal those of each row alone, bit for bit. torch's matmuls may take
    # another kernel (and summation order) for 2 rows than for 1, so the scheduler runs a decoder without this
    # promise one row at a time; the native kernels compute every row alone by construction.
    rows_independent = False

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self._hooks = HookWatch(model)

    def usable(self, cache: KVCache | SlotCache) -> bool:
        """Whether this decoder can advance `cache` now; when not, the caller takes the eager decoder for that
        step (hooks, for instance, only run in the eager forward)."""
        return True

    # --- one token per row ----------------------------------------------------------------------------------------
    def advance(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed ids [B] (one token per row of a shared-timeline cache); return the residual [B, d] after the last
        layer (before the final norm), fp32 or the model's dtype."""
        raise NotImplementedError

    def advance_rows(self, ids: torch.Tensor, slots: SlotCache, rows: Sequence[int]) -> torch.Tensor:
        """Feed ids [n] to rows `rows` of `slots` (each at its own position); return residuals [n, d]."""
        return torch.cat([self.advance(ids[i:i + 1], slots.view(row)) for i, row in enumerate(rows)])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits [B, V] of residuals h [B, d]: final norm, LM head, Gemma 2's soft-cap."""
        return self.model.unembed(h.unsqueeze(1))[:, -1].float()

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The greedy choice over logits [B, V] (the first index of the maximum, as torch's argmax)."""
        return argmax_rows(logits)

    def greedy(self, h: torch.Tensor) -> torch.Tensor:
        """The greedy token [B] for residuals h [B, d]."""
        return self.argmax(self.logits(h))

    # --- compositions (a decoder may fuse them) -------------------------------------------------------------------
    def step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.logits(self.advance(ids, cache))

    def greedy_step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.greedy(self.advance(ids, cache))

    def greedy_rows(self, ids: torch.Tensor, slots: SlotCache, rows: Sequence[int]) -> torch.Tensor:
        return self.greedy(self.advance_rows(ids, slots, rows))

    def prefill(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed a prompt chunk ids [B, T]; return the residual [B, d] at its last position. Prompts always run
        through the module's forward (batched matmuls are fast there; hooks see them)."""
        return self.model.hidden_states(ids, cache)[:, -1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class EagerDecoder(StepDecoder):
    """The module's own forward, one token per row: the reference every other decoder is tested against."""

    name = "eager"

    def advance(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.model.hidden_states(ids.view(-1, 1), cache)[:, -1]
