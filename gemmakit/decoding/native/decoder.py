"""The native step decoder: every layer of a token in one C++ call, for int8-quantised models on CPU.

Why: the eager decode step of a small Gemma runs ~1,500 torch ops per token and spends as much time
dispatching them as reading the weights; torch.compile removes part of that for a minute of compiling. The
native step runs every layer in one OpenMP region of plain loops (int8 x fp32 dot products at memory speed,
norms, rope, attention over the cache, GeGLU), so a token costs little more than reading the weights once.
The library also embeds the token ids and runs `int8-rescore`'s LM head (final norm, int4 candidate head or
3-bit ranker, exact int8 rescoring of the candidates), so a greedy token is one call (`greedy_step`).

Numerics: activations stay fp32 through the layers (the eager bf16 path rounds them after every op), so the
step computes the fp32 model whose weights are the dequantised int8 ones, to fp32 rounding; tests/decoding
checks exactly that. A `SlotCache`'s rows each run at their own position in the same call (continuous
batching); a row's values never depend on which other rows share the step.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from gemmakit.blocks import BlockLinear
from gemmakit.cache import KVCache, SlotCache
from gemmakit.decoding.native import abi
from gemmakit.decoding.native.kernels import int8_matvec
from gemmakit.decoding.protocol import StepDecoder
from gemmakit.decoding.sampling import argmax_rows
from gemmakit.errors import InputError
from gemmakit.model import RMSNorm, Transformer
from gemmakit.quant import Int4Linear, Int8Linear, QuantEmbedding
from gemmakit.ranker import Int3Ranker

# Rows decoded together in one call at most (a larger slot pool is stepped in groups of this many). Our row-by-row
# dot products stop gaining at about 8 rows: total tok/s on the 270M, native vs eager, 343 vs 262 at 8 rows and
# 339 vs 307 at 16; a 32-slot server fell back to the eager step before pools were split (35 vs 195 tok/s).
MAX_BATCH = 16

# A prompt chunk of at most this many tokens (over all its rows) runs through the native step, each token an entry
# at its own time: the step writes every entry's key and value before any entry attends, so the entry at time t
# sees exactly times 0..t, and each entry's values are those of feeding the tokens one step at a time, bit for bit.
# Longer chunks go through the module's forward, whose batched matmuls win from about 120 tokens (on the 270M, 2
# threads: 9 tokens 23 vs 51 ms, 60 tokens 106 vs 133 ms, 120 tokens 251 vs 253 ms).
PROMPT_ENTRIES = 64


def supports(model: Transformer) -> bool:
    """True for a CPU model whose every layer linear is int8 (`quant` schemes "int8", "int8-rescore", ...) or a
    GGUF file's own blocks of a type the kernels take (`BlockLinear`, schemes "gguf-rescore", ...)."""
    linears = [getattr(part, name) for block in model.model.layers for part, names in
               ((block.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                (block.mlp, ("gate_proj", "up_proj", "down_proj"))) for name in names]
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    return (model.device.type == "cpu" and all(type(lin) in (Int8Linear, BlockLinear) for lin in linears)
            and all(norm.weight.dtype == torch.float32 for norm in norms))


def layer_formats(model: Transformer) -> str:
    """The layer linears' formats, e.g. "int8" or "Q4_K/Q5_0/Q6_K/Q8_0" ("" when none is int8 or blocks): what the
    decoder choice's reason and the CLI's load line name."""
    names = {lin.type_name if isinstance(lin, BlockLinear) else "int8"
             for block in model.model.layers for lin in block.modules() if isinstance(lin, (Int8Linear, BlockLinear))}
    return "/".join(sorted(names))


def _matrix(lin: Int8Linear | BlockLinear, keep: list[torch.Tensor]) -> abi.Matrix:
    """The GkMatrix of one layer linear; the tensors it points into are appended to `keep`."""
    if isinstance(lin, BlockLinear):
        blocks = lin.weight_blocks.contiguous()
        keep.append(blocks)
        return abi.Matrix(data=blocks.data_ptr(), scales=None, type=lin.ggml_type)
    weights, scales = lin.weight_int8.contiguous(), lin.scales.float().contiguous()
    keep += [weights, scales]
    return abi.Matrix(data=weights.data_ptr(), scales=scales.data_ptr(), type=abi.INT8_ROWS)


@dataclass
class _HeadBinding:
    """The LM head's view of one model's weights (no cache involved): gk_rescored_head's arguments when the native
    head serves this model, the fp32 copy of the int8 table's scales (shared with the step's embedding), and every
    tensor they point into."""

    head: abi.Head | None  # the native LM head, when it serves this model
    table_scales: torch.Tensor | None  # fp32 row scales of an int8 embedding table
    tensors: list[torch.Tensor]
    vocab: int
    greedy: bool  # whether gk_greedy_step may choose tokens (a native head; Gemma 2's cap is applied there)


@dataclass
class _Binding:
    """The step's view of one model and one cache: the C structs, the head's binding, and every tensor the
    structs point into."""

    struct: abi.Model
    layers: ctypes.Array
    tensors: list[torch.Tensor]
    head_binding: _HeadBinding
    scratch: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # h, logits by row count

    @property
    def head(self) -> abi.Head | None:
        return self.head_binding.head

    @property
    def vocab(self) -> int:
        return self.head_binding.vocab

    @property
    def greedy(self) -> bool:
        return self.head_binding.greedy


def _bind_head(lib: ctypes.CDLL, model: Transformer) -> _HeadBinding:
    """The head's binding: read from the weights now (so weights changed between generations are seen)."""
    emb = model.model.embed_tokens
    table = emb.table if isinstance(emb, QuantEmbedding) and type(emb.table) is Int8Linear else None
    table_scales = None if table is None else table.scales.float()  # one fp32 copy for the embedding and the head
    tensors: list[torch.Tensor] = []
    head = None if table is None else _head(lib, emb, model.model.norm, table_scales, tensors,
                                             model.config.final_softcap)
    return _HeadBinding(head, table_scales, tensors, model.config.vocab_size, greedy=head is not None)


def _head(lib: ctypes.CDLL, emb: QuantEmbedding, norm: RMSNorm, table_scales: torch.Tensor,
          keep: list[torch.Tensor], final_softcap: float | None) -> abi.Head | None:
    """gk_rescored_head's view of `int8-rescore`'s head, given the fp32 copy of its int8 table's scales, or None
    when the model's head is not that pair (or the CPU lacks VNNI). The tensors it points into are appended to
    `keep`."""
    coarse, table = emb.coarse, emb.table
    if not (lib.gk_has_int4_matvec() and type(coarse) is Int4Linear and type(table) is Int8Linear
            and coarse.scales_zeros.dtype == torch.bfloat16 and coarse.out_features // 64 >= emb.CANDIDATES):
        return None
    multiplier = norm.multiplier()
    keep += [multiplier, table_scales]
    ranker = emb.ranker
    ranks = (type(ranker) is Int3Ranker and ranker.planes.is_contiguous()
             and (ranker.out_features, ranker.in_features) == (coarse.out_features, coarse.in_features))
    return abi.Head(norm=multiplier.data_ptr(), eps=norm.eps, packed=coarse.weight_int4.data_ptr(),
                 scales_zeros=coarse.scales_zeros.data_ptr(), n=coarse.out_features, k=coarse.in_features,
                 group=coarse.group, table=table.weight_int8.data_ptr(), table_scale=table_scales.data_ptr(),
                 candidates=emb.CANDIDATES, ranker=ranker.planes.data_ptr() if ranks else None,
                 final_softcap=final_softcap or 0.0)


def _bind(model: Transformer, cache: KVCache | SlotCache, head_binding: _HeadBinding) -> _Binding:
    """Pointers to the weights (read now, so weights changed between generations are seen) and to `cache`'s
    buffers, which the step writes in place. A `KVCache` shares one ring record among its rows (one timeline);
    a `SlotCache` keeps one per row."""
    config = model.config
    tensors: list[torch.Tensor] = []

    def ptr(t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        t = t.contiguous()
        tensors.append(t)
        return t.data_ptr()

    def buffer(t: torch.Tensor) -> int:  # written in place, so never a copy
        if not t.is_contiguous() or t.device.type != "cpu":
            raise InputError("the native decode step needs contiguous CPU cache buffers")
        return ptr(t)

    def norm(module: RMSNorm | None) -> int | None:
        return None if module is None else ptr(module.multiplier())

    layers = (abi.Layer * config.num_layers)()
    for i, block in enumerate(model.model.layers):
        attn, mlp, entry = block.self_attn, block.mlp, layers[i]
        for key, lin in dict(q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, o=attn.o_proj, g=mlp.gate_proj,
                             u=mlp.up_proj, d=mlp.down_proj).items():
            setattr(entry, f"w{key}", _matrix(lin, tensors))
        entry.input_norm = norm(block.input_layernorm)
        if block.sandwich:  # Gemma 2/3: norms after attention and after the MLP, and one before the MLP
            entry.post_attn_norm = norm(block.post_attention_layernorm)
            entry.pre_ffw_norm = norm(block.pre_feedforward_layernorm)
            entry.post_ffw_norm = norm(block.post_feedforward_layernorm)
        else:  # Gemma 1: HF's `post_attention_layernorm` is the pre-MLP norm
            entry.pre_ffw_norm = norm(block.post_attention_layernorm)
        entry.q_norm, entry.k_norm = norm(attn.q_norm), norm(attn.k_norm)
        entry.keys, entry.values = buffer(cache.keys[i]), buffer(cache.values[i])
        entry.slots = cache.keys[i].shape[2]
        entry.sliding = int(block.sliding)
    tables = {sliding: model.rope_table(sliding, cache.capacity) for sliding in (True, False)}
    softcap = config.attn_softcap
    emb = model.model.embed_tokens
    table = emb.table if isinstance(emb, QuantEmbedding) and type(emb.table) is Int8Linear else None
    struct = abi.Model(
        batch=cache.batch_size, hidden=config.hidden_size, heads=config.num_heads, kv_heads=config.num_kv_heads,
        head_dim=config.head_dim, intermediate=config.intermediate_size, num_layers=config.num_layers,
        eps=config.rms_norm_eps, scale=config.query_pre_attn_scalar ** -0.5,
        attn_softcap=softcap if softcap is not None else 0.0, layers=layers,
        cos_local=ptr(tables[True][0]), sin_local=ptr(tables[True][1]),
        cos_global=ptr(tables[False][0]), sin_global=ptr(tables[False][1]),
        pad=buffer(cache.pad), ring_times=buffer(cache.ring_times), ring=cache.ring_size,
        ring_stride=cache.ring_size if isinstance(cache, SlotCache) else 0,
        # the embedding in fp32, E[id] * sqrt(d) with the dequantised int8 row (the eager path rounds it to bf16)
        embed_table=None if table is None else ptr(table.weight_int8),
        embed_scales=ptr(head_binding.table_scales),
        normaliser=config.hidden_size ** 0.5)
    return _Binding(struct, layers, tensors, head_binding)


class NativeDecoder(StepDecoder):
    """Decode steps of an int8 `model` through the native library.

    Each cache gets its own binding, kept only as long as the cache lives, so generations running at the same
    time in several threads never share one.
    """

    name = "native"
    rows_independent = True

    def __init__(self, model: Transformer, lib: ctypes.CDLL) -> None:
        super().__init__(model)
        self.lib = lib
        self._bindings: weakref.WeakKeyDictionary[KVCache | SlotCache, _Binding] = weakref.WeakKeyDictionary()
        self._last: tuple[weakref.ref, _Binding] | None = None  # the binding used last, looked up first
        self._head: tuple[tuple, _HeadBinding] | None = None  # the head's binding, keyed by the weights

    def usable(self, cache: KVCache | SlotCache) -> bool:
        """fp32 cache (CPU storage), no hooks (they need the eager path), and a shared-timeline batch of at most
        MAX_BATCH rows (a slot pool of any size is stepped MAX_BATCH rows at a time)."""
        return (cache.keys[0].dtype == torch.float32 and not self._hooks.any()
                and (isinstance(cache, SlotCache) or cache.batch_size <= MAX_BATCH))

    # --- layers -----------------------------------------------------------------------------------------------------
    def advance(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        rows = ids.shape[0]
        if cache.length >= cache.capacity:
            raise InputError(f"the KV cache is full ({cache.capacity} positions)")
        h = self._run(self._binding(cache), ids, torch.arange(rows), torch.full((rows,), cache.length))
        cache.length += 1
        return h

    def advance_rows(self, ids: torch.Tensor, slots: SlotCache, rows: Sequence[int]) -> torch.Tensor:
        if len(rows) > MAX_BATCH:  # each row is computed alone, so groups give the same values
            return torch.cat([self.advance_rows(ids[i:i + MAX_BATCH], slots, rows[i:i + MAX_BATCH])
                              for i in range(0, len(rows), MAX_BATCH)])
        times = self._times(slots, rows)
        h = self._run(self._binding(slots), ids, torch.tensor(list(rows), dtype=torch.long), times)
        for row in rows:
            slots.view(row).length += 1
        return h

    def prefill(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """A short chunk ids [B, T] as B * T entries of one native step (see PROMPT_ENTRIES) when no sliding ring
        wraps inside it (a wrap would overwrite keys that the chunk's earlier tokens still see); otherwise the
        module's forward."""
        batch, count = ids.shape
        start = cache.length
        if batch * count > PROMPT_ENTRIES or start + count > cache.ring_size or not self.usable(cache):
            return super().prefill(ids, cache)
        rows = torch.arange(batch).repeat_interleave(count)
        times = (start + torch.arange(count)).repeat(batch)
        h = self._run(self._binding(cache), ids.reshape(-1), rows, times)
        cache.length += count
        return h.view(batch, count, -1)[:, -1]

    def hidden_states(self, ids: torch.Tensor, cache: KVCache, embedded: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream [B, 1, d] (fp32) after the last layer for ids [B, 1] (or their `embedded` inputs
        [B, 1, d]), written into `cache` as the model's own `hidden_states` would."""
        rows = ids.shape[0]
        h = self._run(self._binding(cache), ids.reshape(rows), torch.arange(rows), torch.full((rows,), cache.length),
                      embedded)
        cache.length += 1
        return h.unsqueeze(1)

    # --- head -------------------------------------------------------------------------------------------------------
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        binding = self._head_binding()
        h = h.to(torch.float32).contiguous()
        if binding.head is not None:
            logits = torch.empty(h.shape[0], binding.vocab)
            done = self.lib.gk_rescored_head(h.data_ptr(), h.shape[0], ctypes.byref(binding.head), logits.data_ptr(),
                                             0, None, torch.get_num_threads())
            if done == 0:
                return self.model.cap_logits(logits)
        emb = self.model.model.embed_tokens
        if isinstance(emb, QuantEmbedding) and emb.coarse is None and type(emb.table) is Int8Linear:
            # an int8 head: exact, fp32 activations
            return self.model.cap_logits(int8_matvec(emb.table, self.model.model.norm(h), binding.table_scales))
        return super().logits(h)

    def greedy(self, h: torch.Tensor) -> torch.Tensor:
        """With the head's 3-bit ranker: the best of its candidates by exact int8 logit (so a greedy generation
        never reads the int4 head); else the argmax of `logits`."""
        binding = self._head_binding()
        if not (binding.greedy and binding.head.ranker):
            return self.argmax(self.logits(h))
        h = h.to(torch.float32).contiguous()
        logits, best = torch.empty(h.shape[0], binding.vocab), torch.empty(h.shape[0], dtype=torch.long)
        done = self.lib.gk_rescored_head(h.data_ptr(), h.shape[0], ctypes.byref(binding.head), logits.data_ptr(), 1,
                                         best.data_ptr(), torch.get_num_threads())
        if done != 0:
            raise RuntimeError(f"native rescored head failed ({done})")
        return best

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits.argmax(-1)` (first index of the maximum, NaN counted largest) in one pass over [B, V] fp32
        logits, while they are still in cache; other tensors go to `argmax_rows`."""
        if logits.dtype != torch.float32 or logits.dim() != 2 or not logits.is_contiguous() or logits.is_cuda:
            return argmax_rows(logits)
        out = torch.empty(logits.shape[0], dtype=torch.long)
        self.lib.gk_argmax(logits.data_ptr(), logits.shape[0], logits.shape[1], out.data_ptr())
        return out

    # --- fused greedy steps -----------------------------------------------------------------------------------------
    def greedy_step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The greedy next token [B] after ids [B]: layers, head and choice in one library call where the head
        is the native one (Gemma 2's final cap included), else `greedy(advance(...))` (the same tokens)."""
        rows = ids.shape[0]
        binding = self._binding(cache)
        if not binding.greedy:
            return super().greedy_step(ids, cache)
        out = self._fused(binding, ids, torch.arange(rows), torch.full((rows,), cache.length))
        cache.length += 1
        return out

    def greedy_rows(self, ids: torch.Tensor, slots: SlotCache, rows: Sequence[int]) -> torch.Tensor:
        if len(rows) > MAX_BATCH:
            return torch.cat([self.greedy_rows(ids[i:i + MAX_BATCH], slots, rows[i:i + MAX_BATCH])
                              for i in range(0, len(rows), MAX_BATCH)])
        binding = self._binding(slots)
        if not binding.greedy:
            return super().greedy_rows(ids, slots, rows)
        out = self._fused(binding, ids, torch.tensor(list(rows), dtype=torch.long), self._times(slots, rows))
        for row in rows:
            slots.view(row).length += 1
        return out

    @property
    def greedy_reads_ranker(self) -> bool:
        """Whether greedy decoding picks its candidates with the head's 3-bit ranker (and so reads it instead of
        the int4 head)."""
        binding = self._head_binding()
        return binding.greedy and bool(binding.head.ranker)

    # --- plumbing ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _times(slots: SlotCache, rows: Sequence[int]) -> torch.Tensor:
        lengths = [slots.length(row) for row in rows]
        if max(lengths) >= slots.capacity:
            raise InputError(f"a slot's KV cache is full ({slots.capacity} positions)")
        return torch.tensor(lengths, dtype=torch.long)

    def _fused(self, binding: _Binding, ids: torch.Tensor, rows: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        n = ids.shape[0]
        ids = ids.to(torch.long).contiguous()
        if n not in binding.scratch:
            binding.scratch[n] = (torch.empty(n, self.model.config.hidden_size), torch.empty(n, binding.vocab))
        h, logits = binding.scratch[n]
        out = torch.empty(n, dtype=torch.long)
        done = self.lib.gk_greedy_step(ctypes.byref(binding.struct), ctypes.byref(binding.head), ids.data_ptr(),
                                       rows.data_ptr(), times.data_ptr(), n, h.data_ptr(), logits.data_ptr(),
                                       out.data_ptr(), torch.get_num_threads())
        if done != 0:
            raise RuntimeError(f"native greedy step failed ({done})")
        return out

    def _run(self, binding: _Binding, ids: torch.Tensor, rows: torch.Tensor, times: torch.Tensor,
             embedded: torch.Tensor | None = None) -> torch.Tensor:
        """One step through the layers: h [n, d] fp32, embedded by the library when it holds the table."""
        n = ids.shape[0]
        threads = torch.get_num_threads()
        if embedded is None and binding.struct.embed_table:
            h = torch.empty(n, self.model.config.hidden_size)
            tokens = ids.reshape(n).to(torch.long).contiguous()
            done = self.lib.gk_decode_step(ctypes.byref(binding.struct), h.data_ptr(), tokens.data_ptr(),
                                           rows.data_ptr(), times.data_ptr(), n, threads)
        else:
            h = self.model.embed(ids.reshape(n, 1)) if embedded is None else embedded
            h = h.to(torch.float32).reshape(n, -1).contiguous()
            done = self.lib.gk_decode_step(ctypes.byref(binding.struct), h.data_ptr(), None, rows.data_ptr(),
                                           times.data_ptr(), n, threads)
        if done != 0:
            raise RuntimeError(f"native decode step failed ({done})")
        return h

    def _binding(self, cache: KVCache | SlotCache) -> _Binding:
        if self._last is not None and self._last[0]() is cache:
            return self._last[1]
        binding = self._bindings.get(cache)
        if binding is None:
            binding = self._bindings[cache] = _bind(self.model, cache, self._head_binding())
        self._last = (weakref.ref(cache), binding)
        return binding

    def _head_binding(self) -> _HeadBinding:
        """The head's binding, shared by head products and every cache's step; rebuilt when the embedding's
        buffers change (their pointers or versions)."""
        emb = self.model.model.embed_tokens
        key = tuple((t.data_ptr(), t._version) for t in emb.buffers()) if isinstance(emb, QuantEmbedding) else ()
        if self._head is None or self._head[0] != key:
            self._head = (key, _bind_head(self.lib, self.model))
        return self._head[1]
