"""Reuse of computed keys and values across requests whose prompts begin alike (a system prompt, earlier turns).

An entry is a snapshot of one cache row at one length n: the keys and values of positions [0, n) of every global
layer, and the ring of every sliding-window layer exactly as it stood at n (its last min(n, W) positions), with
the ring's record of times. The rule for sliding layers follows from that: a snapshot can only be restored at
exactly its own length, because positions before n - W are gone from its ring, so an entry is never truncated to
serve a shorter prefix. Lookup takes the longest entry whose tokens begin the new prompt and leave at least one
prompt token to compute (the request's first logits come from it).

Snapshots are taken where a prompt's prefill passes a chunk boundary (positions that are multiples of the
scheduler's chunk size), and only there: a prompt restored from a snapshot then computes its remaining chunks
exactly as a cold run computes them, from bit-identical keys and values, so a cache hit never changes a
request's tokens. Memory is bounded by a byte budget; the least recently used entries are evicted first, and an
entry larger than the whole budget is never stored.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gemmakit.cache import SlotCache


@dataclass
class Snapshot:
    tokens: tuple[int, ...]
    keys: list[torch.Tensor]  # per layer [Hkv, n or min(n, ring), D]
    values: list[torch.Tensor]
    ring_times: torch.Tensor  # [ring]
    nbytes: int


class PrefixCache:
    """Snapshots of cache rows keyed by their tokens, within `budget_bytes` (0 turns the cache off)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = max(0, int(budget_bytes))
        self._entries: OrderedDict[tuple[int, ...], Snapshot] = OrderedDict()
        self._lengths: dict[int, int] = {}  # entry length -> how many entries have it
        self.nbytes = 0
        self.hits = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: Sequence[int]) -> Snapshot | None:
        """The longest snapshot whose tokens are a proper prefix of `prompt` (marked as recently used), or None."""
        for n in sorted(self._lengths, reverse=True):
            if n >= len(prompt):
                continue
            snap = self._entries.get(tuple(prompt[:n]))
            if snap is not None:
                self._entries.move_to_end(snap.tokens)
                return snap
        return None

    def restore(self, snap: Snapshot, slots: SlotCache, row: int) -> int:
        """Write a snapshot into an empty row; returns the row's new length (the tokens reused)."""
        for layer, (k, v) in enumerate(zip(snap.keys, snap.values, strict=True)):
            slots.keys[layer][row, :, :k.shape[1]] = k
            slots.values[layer][row, :, :v.shape[1]] = v
        slots.ring_times[row] = snap.ring_times
        slots.view(row).length = len(snap.tokens)
        self.hits += 1
        self.reused_tokens += len(snap.tokens)
        return len(snap.tokens)

    def save(self, slots: SlotCache, row: int, tokens: Sequence[int]) -> bool:
        """Snapshot a row whose cache holds exactly `tokens`; False when it is already stored or cannot fit."""
        key = tuple(tokens)
        if self.budget == 0 or key in self._entries or slots.length(row) != len(key):
            return False
        n = len(key)
        used = min(n, slots.ring_size)
        keys, values = [], []
        for layer in range(slots.config.num_layers):
            width = used if slots.config.is_sliding(layer) else n
            keys.append(slots.keys[layer][row, :, :width].clone())
            values.append(slots.values[layer][row, :, :width].clone())
        nbytes = sum(t.numel() * t.element_size() for t in (*keys, *values))
        if nbytes > self.budget:
            return False
        while self.nbytes + nbytes > self.budget:
            self._evict()
        self._entries[key] = Snapshot(key, keys, values, slots.ring_times[row].clone(), nbytes)
        self._lengths[n] = self._lengths.get(n, 0) + 1
        self.nbytes += nbytes
        return True

    def _evict(self) -> None:
        _, snap = self._entries.popitem(last=False)
        n = len(snap.tokens)
        self._lengths[n] -= 1
        if self._lengths[n] == 0:
            del self._lengths[n]
        self.nbytes -= snap.nbytes
