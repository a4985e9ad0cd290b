"""Static, preallocated KV cache: full buffers for global layers, a ring buffer of W slots for sliding layers.

Time indices count every token slot of the batch, left padding included (row b's first real token is at time
`pad[b]`). Keys are stored after rope, so a ring slot needs no re-rotation when it is reused. Masks are built
from the time each slot holds, never from slot order, which keeps generation past the window exact.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import torch

from gemmakit.config import GemmaConfig
from gemmakit.errors import InputError


def attention_mask(q_times: torch.Tensor, k_times: torch.Tensor, pad: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean mask [B, 1, Tq, Tk], True where query time q may see key time k.

    A query sees keys `q - W < k <= q` (W = window, or unbounded), excluding empty slots (k < 0) and the
    row's left padding (k < pad[b]). A padding query sees only itself, so no softmax row is empty (no NaN).
    """
    q = q_times.view(1, -1, 1)
    k = k_times.view(1, 1, -1)
    visible = (k >= 0) & (k <= q)
    if window is not None:
        visible = visible & (k > q - window)
    real_key = k >= pad.view(-1, 1, 1)
    return (visible & (real_key | (k == q))).unsqueeze(1)


@dataclass
class StepPlan:
    """Where this forward's keys live: the times of the keys each kind of layer attends over."""

    start: int
    length: int
    q_times: torch.Tensor
    global_k_times: torch.Tensor
    sliding_k_times: torch.Tensor
    sliding_write_first: bool
    ring_used: int  # leading ring slots sliding layers attend over (times 0.. fill slots 0.. until the ring wraps)


def storage_dtype(dtype: torch.dtype, device: torch.device | str | None) -> torch.dtype:
    """The dtype K/V are stored in for a model computing in `dtype`: fp32 on CPU for bf16/fp16 models.

    Decoding attends in fp32 on CPU (reduced-precision matmuls of one query are slow there), so storing the
    (already rounded) k/v in fp32 is exact and saves converting the whole cache at every layer of every step,
    for twice the cache memory. Other devices keep the model's dtype.
    """
    on_cpu = device is None or torch.device(device).type == "cpu"
    return torch.float32 if on_cpu and dtype in (torch.bfloat16, torch.float16) else dtype


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    """Zeros that take memory (and time) only where they are written, on CPU: an anonymous mapping's pages are the
    kernel's zero page until first written, where torch.zeros (or calloc, once glibc serves large blocks from its
    heap) writes every byte. A slot pool (4096 positions a slot, fp32 keys) would otherwise be resident in full
    before its first token (0.9 GB for one slot of Gemma 2 2B) and cost ~0.1 s to clear per `generate` call on
    the 270M. The mapping is unmapped when the tensor is freed."""
    if torch.device(device or "cpu").type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = 1
    for n in shape:
        count *= n
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


class KVCache:
    """Per-layer K/V buffers of fixed size, so the decode step has (nearly) static shapes."""

    def __init__(self, config: GemmaConfig, batch_size: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        dtype = storage_dtype(dtype, device)
        self.config = config
        self.capacity = capacity
        self.batch_size = batch_size
        self.ring_size = min(config.sliding_window or capacity, capacity)
        shape = (batch_size, config.num_kv_heads)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for layer in range(config.num_layers):
            size = self.ring_size if config.is_sliding(layer) else capacity
            self.keys.append(lazy_zeros((*shape, size, config.head_dim), dtype, device))
            self.values.append(lazy_zeros((*shape, size, config.head_dim), dtype, device))
        self.ring_times = torch.full((self.ring_size,), -1, dtype=torch.long, device=device)
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0

    def clone(self, repeats: int = 1) -> KVCache:
        """An independent copy, each row repeated `repeats` times (row b becomes rows b*r .. b*r + r - 1).

        Prefix caching: prefill a prompt shared by several continuations once, then continue each copy.
        """
        if repeats < 1:
            raise InputError(f"repeats must be >= 1, got {repeats}")
        copy = object.__new__(KVCache)
        copy.config, copy.capacity, copy.ring_size = self.config, self.capacity, self.ring_size
        copy.length = self.length
        copy.batch_size = self.batch_size * repeats
        copy.keys = [k.repeat_interleave(repeats, dim=0) if repeats > 1 else k.clone() for k in self.keys]
        copy.values = [v.repeat_interleave(repeats, dim=0) if repeats > 1 else v.clone() for v in self.values]
        copy.ring_times = self.ring_times.clone()
        copy.pad = self.pad.repeat_interleave(repeats)
        return copy

    def plan(self, num_new: int) -> StepPlan:
        """Reserve `num_new` time steps and say which key times each layer kind will attend over."""
        start = self.length
        if start + num_new > self.capacity:
            raise InputError(
                f"sequence of {start + num_new} tokens exceeds the KV cache capacity of {self.capacity} "
                f"(model context {self.config.max_position}); shorten the prompt or lower max_new_tokens"
            )
        device = self.ring_times.device
        q_times = torch.arange(start, start + num_new, device=device)
        write_first = num_new == 1
        # the used slots, not the empty rest: one new key is written first, a chunk after the ring is read
        ring_used = min(start + 1 if write_first else start, self.ring_size)
        if write_first:  # one new key replaces the slot that just left the window: attend over the ring alone
            self.ring_times[start % self.ring_size] = start
            sliding_k = self.ring_times[:ring_used].clone()
        elif start == 0:  # fresh prefill: the ring is empty, attend over the chunk itself
            sliding_k = q_times
        else:  # a chunk after earlier tokens: the ring's used slots, then the chunk
            sliding_k = torch.cat([self.ring_times[:ring_used], q_times])
        self.length = start + num_new
        return StepPlan(start, num_new, q_times, torch.arange(self.length, device=device), sliding_k, write_first,
                        ring_used)

    def finish(self, plan: StepPlan) -> None:
        """After all layers ran: record which times the ring now holds (multi-token steps write at the end)."""
        if plan.sliding_write_first:
            return
        keep = min(plan.length, self.ring_size)
        times = plan.q_times[-keep:]
        self.ring_times[times % self.ring_size] = times

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k/v [B, Hkv, T, D] for `layer`; return the k/v the layer attends over."""
        keys, values = self.keys[layer], self.values[layer]
        if not self.config.is_sliding(layer):
            keys[:, :, plan.start:plan.start + plan.length] = k
            values[:, :, plan.start:plan.start + plan.length] = v
            return keys[:, :, :self.length], values[:, :, :self.length]
        if plan.sliding_write_first:
            slot = plan.start % self.ring_size
            keys[:, :, slot:slot + 1] = k
            values[:, :, slot:slot + 1] = v
            return keys[:, :, :plan.ring_used], values[:, :, :plan.ring_used]
        attend_k = k if plan.start == 0 else torch.cat([keys[:, :, :plan.ring_used], k], dim=2)
        attend_v = v if plan.start == 0 else torch.cat([values[:, :, :plan.ring_used], v], dim=2)
        keep = min(plan.length, self.ring_size)
        slots = plan.q_times[-keep:] % self.ring_size
        keys[:, :, slots] = k[:, :, -keep:].to(keys.dtype)
        values[:, :, slots] = v[:, :, -keep:].to(values.dtype)
        return attend_k, attend_v


class SlotCache:
    """A pool of cache rows for continuous batching: each row holds its own sequence at its own position.

    Row r is also a one-row `KVCache` (`view(r)`) whose buffers are views into the pool, so prompts are
    prefilled (in chunks) by the module's ordinary forward on that view, and any step decoder can advance it.
    Each row has its own record of the times its sliding-window ring holds (`ring_times[r]`), and no padding:
    a row's time is its position. `reset(r)` empties a row for the next request without touching the others.
    """

    def __init__(self, config: GemmaConfig, rows: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        if rows < 1:
            raise InputError(f"a slot cache needs at least one row, got {rows}")
        pool = KVCache(config, rows, capacity, dtype, device)
        self.config, self.capacity, self.ring_size, self.batch_size = config, capacity, pool.ring_size, rows
        self.keys, self.values = pool.keys, pool.values
        self.ring_times = torch.full((rows, pool.ring_size), -1, dtype=torch.long, device=device)
        self.pad = torch.zeros(rows, dtype=torch.long, device=device)
        self._views = [self._row_view(r) for r in range(rows)]

    def _row_view(self, row: int) -> KVCache:
        view = object.__new__(KVCache)
        view.config, view.capacity, view.ring_size, view.batch_size = self.config, self.capacity, self.ring_size, 1
        view.keys = [k[row:row + 1] for k in self.keys]
        view.values = [v[row:row + 1] for v in self.values]
        view.ring_times = self.ring_times[row]
        view.pad = self.pad[row:row + 1]
        view.length = 0
        return view

    def view(self, row: int) -> KVCache:
        """Row `row` as a one-row KVCache sharing this pool's buffers (its `length` is the row's position)."""
        return self._views[row]

    def length(self, row: int) -> int:
        return self._views[row].length

    def reset(self, row: int) -> None:
        """Empty a row. Its old keys stay in the buffers but are never visible: attention only reads positions
        below the row's length, and the ring's times are cleared."""
        self._views[row].length = 0
        self.ring_times[row].fill_(-1)
