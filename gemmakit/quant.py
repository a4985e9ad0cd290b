"""Weight-only int8 / int4 layers on torch's own CPU kernels, and `quantize_model` to convert a Transformer.

Why weight-only: decoding one token reads every weight once and does two flops per weight, so on a CPU the
speed is set by the bytes of weights read, not by arithmetic. Storing weights in 8 or 4 bits and keeping the
activations in bf16 cuts those bytes 4-8x against fp32. The kernels are torch's:

- int8: `aten._weight_int8pack_mm(A, W_int8 [N, K], scales [N])`, symmetric per output row.
- int4: `aten._weight_int4pack_mm_for_cpu(A, packed, group, scales_and_zeros [K/g, N, 2])`, asymmetric per
  group of `group` inputs, w = (q - 8) * scale + zero (the tinygemm/gpt-fast convention).

Both want bf16 (or fp16) activations to be fast: with fp32 activations they fall back to slow loops (measured
10-40x slower), so quantised models run in bf16 and keep only the RMSNorm weights in fp32.

The tied embedding is the largest tensor of a small Gemma (262144 x 640 in Gemma 3 270M: 62% of the
weights), and it is both the token lookup and the LM head. `QuantEmbedding` keeps one quantised copy for
both: the head is a quantised matmul, the lookup dequantises only the rows it needs. For int4 this needs the
CPU packing layout, which torch calls opaque; it is [N/64, K, 32] bytes where byte j of a 64-row block holds
row j in its low nibble and row j + 32 in its high one (checked by `test_quant.py`, which fails if a torch
release changes it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit import ranker as ranker_layout
from gemmakit.blocks import BlockLinear
from gemmakit.decoding.sampling import top_indices
from gemmakit.errors import InputError
from gemmakit.memory import release_freed
from gemmakit.ranker import Int3Ranker
from gemmakit.scratch import weight_buffer
from gemmakit.weights.raw import RawTensor

INT4_GROUPS = (32, 64, 128, 256)
_PACK_BLOCK = 64  # rows per block in torch's CPU int4 layout


@dataclass(frozen=True)
class Scheme:
    """A quantisation recipe: the format of the per-layer linears, of the tied embedding/head, the int4 group.

    Formats: "int8", "int4", "bf16" (no quantisation, bf16 weights), or for layers "gguf": a GGUF file's own
    blocks where the native kernels compute with their type (`BlockLinear`), int8 for any other tensor.
    """

    layers: str
    head: str
    group: int = 32
    coarse_head: bool = False  # also keep an int4 copy of the head to pick candidates (see QuantEmbedding)

    def __post_init__(self) -> None:
        for part, fmt in (("layers", self.layers), ("head", self.head)):
            if fmt not in ("int8", "int4", "bf16") and (part, fmt) != ("layers", "gguf"):
                raise InputError(f"quant scheme {part}={fmt!r}: expected 'int8', 'int4' or 'bf16' (or 'gguf' for "
                                 "layers)")
        if self.group not in INT4_GROUPS:
            raise InputError(f"int4 group size {self.group} not supported; expected one of {INT4_GROUPS}")


# Named schemes accepted by `load(quant=...)` and `gemmakit quantize`. "int8" is the accurate one (perplexity
# within 1% of fp32 on the 270M); "int8-rescore" is int8 plus an int4 copy of the head that decoding uses to
# pick 128 candidates, re-scored exactly in int8 (reads ~40% fewer head bytes per token); "int4" reads the fewest
# bytes but costs +18% perplexity; "int8-head4" keeps the layers at int8 and puts only the head at int4.
# "gguf-rescore" keeps a GGUF's layers as the file stores them (Q4_K, Q6_K, ...: the file's own model, and its bytes
# a token) with int8-rescore's head; from a source without blocks (HF, F16 GGUF) its layers are int8.
SCHEMES: dict[str, Scheme] = {
    "gguf-rescore": Scheme("gguf", "int8", 64, coarse_head=True),
    "bf16": Scheme("bf16", "bf16"),
    "int8": Scheme("int8", "int8"),
    "int8-rescore": Scheme("int8", "int8", 64, coarse_head=True),
    "int4": Scheme("int4", "int4", 32),
    "int4-g64": Scheme("int4", "int4", 64),
    "int4-g128": Scheme("int4", "int4", 128),
    "int8-head4": Scheme("int8", "int4", 32),
    "int4-head8": Scheme("int4", "int8", 32),
}


def scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise InputError(f"unknown quant={name!r}; expected one of {', '.join(SCHEMES)} (or None for none)")
    return SCHEMES[name]


def has_fast_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX), where bf16 activations pay off."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        flags = ""
    return "avx512_bf16" in flags or "amx_bf16" in flags or torch.backends.cpu.get_cpu_capability() == "AVX512_BF16"


# --- quantisers: plain functions over tensors ------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q [N, K] int8, scales [N] fp32) with w ~ q * scale."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


_CLIP_CANDIDATES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def quantize_int4(w: torch.Tensor, group: int, rows_per_chunk: int = 8192,
                  search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group: (q [N, K] int32 in 0..15, scales_and_zeros [N, K/g, 2] fp32).

    For each group the range is shrunk by the factor (of `_CLIP_CANDIDATES`) that gives the least squared
    error: clipping a rare outlier buys finer steps for all other weights. It costs six trial roundings at
    conversion time and nothing when running; `search=False` keeps the plain min/max range.
    """
    candidates = _CLIP_CANDIDATES if search else (1.0,)
    n, k = w.shape
    q_out = torch.empty(n, k, dtype=torch.int32)
    sz_out = torch.empty(n, k // group, 2)
    for start in range(0, n, rows_per_chunk):
        wg = w[start:start + rows_per_chunk].float().view(-1, k // group, group)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        mid = (lo + hi) / 2
        best_err = best_q = best_scale = best_min = None
        for c in candidates:
            mn, mx = mid + (lo - mid) * c, mid + (hi - mid) * c
            scale = ((mx - mn) / 15).clamp(min=1e-10)
            q = torch.round((wg - mn) / scale).clamp(0, 15)
            err = ((q * scale + mn - wg) ** 2).sum(-1, keepdim=True)
            if best_err is None:
                best_err, best_q, best_scale, best_min = err, q, scale, mn
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_q = torch.where(better, q, best_q)
                best_scale = torch.where(better, scale, best_scale)
                best_min = torch.where(better, mn, best_min)
        rows = wg.shape[0]
        q_out[start:start + rows] = best_q.view(rows, k).to(torch.int32)
        zero = best_min + 8 * best_scale
        sz_out[start:start + rows] = torch.cat([best_scale, zero], dim=-1)
    return q_out, sz_out


def unpack_int4_rows(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes [len(rows), K] (uint8, 0..15) of the given rows of a CPU-packed int4 weight."""
    blocks, k, _ = packed.shape
    byte = packed[rows // _PACK_BLOCK, :, rows % (_PACK_BLOCK // 2)]  # [R, K]
    high = (rows % _PACK_BLOCK >= _PACK_BLOCK // 2).view(-1, 1)
    return torch.where(high, byte >> 4, byte & 15)


# --- modules -------------------------------------------------------------------------------------------------
def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a 2-D [rows, features] matrix in `dtype` (the dtype check is in Python: decoding calls this ~150
    times a token, and a no-op `.to` still costs a dispatcher round trip)."""
    a = x.reshape(-1, x.shape[-1])
    return a if a.dtype == dtype else a.to(dtype)


class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 [N, K] and one scale per output row (in the activation dtype)."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)

    @classmethod
    def from_weight(cls, w: torch.Tensor, dtype: torch.dtype) -> Int8Linear:
        q, s = quantize_int8(w)
        return cls(q, s.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = _flat(x, self.scales.dtype)
        if a.shape[0] >= DENSE_ROWS:
            if torch.is_grad_enabled() and a.requires_grad:  # autograd keeps the weight: a tensor of its own
                w = self.weight_int8.to(a.dtype)
            else:
                w = weight_buffer(self.out_features, self.in_features, a.dtype).copy_(self.weight_int8)
            y = F.linear(a, w) * self.scales
        else:
            y = torch.ops.aten._weight_int8pack_mm(a, self.weight_int8, self.scales)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.weight_int8[rows].to(self.scales.dtype) * self.scales[rows, None]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-row"


class Int4Linear(nn.Module):
    """y = x W^T with W in 4 bits, packed for torch's CPU kernel, scale and zero per group of `group` inputs."""

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> None:
        super().__init__()
        self.group = group
        self.out_features = packed.shape[0] * _PACK_BLOCK if packed.dim() == 3 else packed.shape[0]
        self.in_features = scales_zeros.shape[0] * group
        # stored as [N/64, K, 32]: the kernel's layout, shaped so rows can be read back for lookups
        self.register_buffer("weight_int4", packed.view(-1, self.in_features, _PACK_BLOCK // 2))
        self.register_buffer("scales_zeros", scales_zeros)  # [K/g, N, 2], activation dtype

    @staticmethod
    def supports(w: torch.Tensor | RawTensor, group: int) -> bool:
        """Whether a [N, K] weight fits torch's int4 layout (reads only its shape: a RawTensor is not decoded)."""
        n, k = w.shape
        return n % _PACK_BLOCK == 0 and k % group == 0

    @classmethod
    def from_weight(cls, w: torch.Tensor, group: int, dtype: torch.dtype, search: bool = True) -> Int4Linear:
        q, sz = quantize_int4(w, group, search=search)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        return cls(packed, sz.transpose(0, 1).contiguous().to(dtype), group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = _flat(x, self.scales_zeros.dtype)
        if a.shape[0] >= DENSE_ROWS:
            rows = torch.arange(self.out_features, device=a.device)
            y = F.linear(a, self.dequantized_rows(rows))
        else:
            w = self.weight_int4.view(self.out_features, self.in_features // 2)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(a, w, self.group, self.scales_zeros)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized_rows(self, rows: torch.Tensor) -> torch.Tensor:
        q = unpack_int4_rows(self.weight_int4, rows).to(self.scales_zeros.dtype)  # [R, K]
        sz = self.scales_zeros[:, rows]  # [K/g, R, 2]
        scale = sz[..., 0].t().repeat_interleave(self.group, dim=1)
        zero = sz[..., 1].t().repeat_interleave(self.group, dim=1)
        return (q - 8) * scale + zero

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 group={self.group}"


QuantLinear = Int8Linear | Int4Linear
# Above this many rows (prefill, scoring) a weight is dequantised to bf16 for one dense matmul: the weight-only
# kernels are built for decode (few rows) and were measured 3x slower than bf16 GEMM on 512-token windows.
DENSE_ROWS = 32


Weight = torch.Tensor | RawTensor  # a float tensor, or a tensor as a file stores it (decoded on demand)


def decoded(w: Weight, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """The fp32 rows [start, stop) of a weight: a `RawTensor`'s rows decoded (only those bytes are read), a float
    tensor's cast (a view, no copy, when it is fp32 already). Every conversion decodes through here, so the fp32
    copy of one tensor, or of one chunk of rows, is all a conversion holds at a time."""
    if isinstance(w, RawTensor):
        rows = w.shape[0] if w.shape else 1
        stop = rows if stop is None else min(stop, rows)
        if start == 0 and stop == rows:
            return w.dequantize()
        width = w.row_bytes() * (w.numel() // rows // w.shape[-1])
        part = RawTensor(w.data[start * width:stop * width], w.ggml_type, (stop - start, *w.shape[1:]), w.source,
                         w.name, w.shift)
        return part.dequantize()
    return w[start:stop].float()


def make_linear(w: Weight, fmt: str, group: int, dtype: torch.dtype) -> nn.Module:
    """The quantised form `fmt` of a [N, K] weight, falling back to int8 when int4's shape rules fail.

    fmt "gguf": the file's own blocks (`BlockLinear`, not decoded) for a `RawTensor` of a type the native kernels
    compute with; anything else (a float tensor, an F16 or Q4_1 tensor...) is decoded and stored as int8."""
    if fmt == "gguf":
        if isinstance(w, RawTensor) and BlockLinear.supports(w):
            return BlockLinear.from_raw(w)
        fmt = "int8"
    w = decoded(w)
    if fmt == "int4" and Int4Linear.supports(w, group):
        return Int4Linear.from_weight(w, group, dtype)
    if fmt in ("int4", "int8"):
        return Int8Linear.from_weight(w, dtype)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    return lin


# Rows of the tied embedding/head converted at a time: a 262144 x 3584 head is 3.8 GB in fp32, a chunk 235 MB.
# A multiple of 64, so that int4 packing ([N, K/2], 64-row blocks) and the 3-bit ranker's 64-row blocks
# concatenate chunk by chunk into exactly the whole tensor's layout (tested bitwise).
HEAD_CHUNK_ROWS = 16384


def decoded_as(w: Weight, dtype: torch.dtype, rows_per_chunk: int = HEAD_CHUNK_ROWS) -> torch.Tensor:
    """The whole weight in `dtype`, decoded `rows_per_chunk` rows at a time (never all of it in fp32)."""
    rows = w.shape[0]
    out = torch.empty(tuple(w.shape), dtype=dtype)
    for start in range(0, rows, rows_per_chunk):
        out[start:start + rows_per_chunk] = decoded(w, start, start + rows_per_chunk).to(dtype)
    return out


def make_head(w: Weight, spec: Scheme, dtype: torch.dtype, rows_per_chunk: int = HEAD_CHUNK_ROWS) -> QuantEmbedding:
    """The tied embedding/head [N, K] as a `QuantEmbedding` for `spec` (int8 or int4 table; with `coarse_head`,
    the int4 candidate head and the 3-bit ranker), converted `rows_per_chunk` rows at a time: each chunk is
    decoded once and feeds all three, so the head is never whole in fp32. Every quantiser works per row (int8)
    or per 64-row block (int4 packing, ranker), so the result equals the whole-tensor conversion bit for bit."""
    if rows_per_chunk % 64:
        raise ValueError(f"rows_per_chunk must be a multiple of 64, got {rows_per_chunk}")
    n, k = (int(d) for d in w.shape)
    # the shape checks read only `w.shape`, so a RawTensor is not decoded for them
    int4_table = spec.head == "int4" and Int4Linear.supports(w, spec.group)
    with_coarse = spec.coarse_head and Int4Linear.supports(w, spec.group)
    with_ranker = with_coarse and Int3Ranker.supports(w)
    if int4_table:
        table_q, table_s = torch.empty(n, k // 2, dtype=torch.uint8), torch.empty(k // spec.group, n, 2, dtype=dtype)
    else:
        table_q, table_s = torch.empty(n, k, dtype=torch.int8), torch.empty(n, dtype=dtype)
    if with_coarse:
        coarse_q, coarse_s = torch.empty(n, k // 2, dtype=torch.uint8), torch.empty(k // spec.group, n, 2, dtype=dtype)
    planes = None
    if with_ranker:
        planes = torch.empty(n // ranker_layout.BLOCK, k // ranker_layout.GROUP, 4, ranker_layout.QUARTER_BYTES,
                             dtype=torch.uint8)
    for a in range(0, n, rows_per_chunk):
        b = min(a + rows_per_chunk, n)
        chunk = decoded(w, a, b)
        if int4_table:
            _int4_into(chunk, spec.group, True, table_q[a:b], table_s[:, a:b])
        else:
            q, s = quantize_int8(chunk)
            table_q[a:b], table_s[a:b] = q, s.to(dtype)
        if with_coarse:  # only ranks candidates, so the plain min/max range is enough (5x faster to convert)
            _int4_into(chunk, spec.group, False, coarse_q[a:b], coarse_s[:, a:b])
        if planes is not None:
            blocks = slice(a // ranker_layout.BLOCK, b // ranker_layout.BLOCK)
            planes[blocks] = ranker_layout.pack(*ranker_layout.quantize(chunk))
        del chunk
    table = Int4Linear(table_q, table_s, spec.group) if int4_table else Int8Linear(table_q, table_s)
    coarse = Int4Linear(coarse_q, coarse_s, spec.group) if with_coarse else None
    return QuantEmbedding(table, dtype, coarse, Int3Ranker(planes) if planes is not None else None)


def _int4_into(w: torch.Tensor, group: int, search: bool, packed_out: torch.Tensor, sz_out: torch.Tensor) -> None:
    """`Int4Linear.from_weight`'s conversion of rows w, written into slices of preallocated outputs."""
    q, sz = quantize_int4(w, group, search=search)
    packed_out.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
    sz_out.copy_(sz.transpose(0, 1).to(sz_out.dtype))


class QuantEmbedding(nn.Module):
    """The tied embedding in quantised form: `forward(ids)` looks rows up, `project(x, rows)` is the LM head."""

    # Tokens whose logits are recomputed exactly at decode time. The others keep the int4 head's values: on
    # the real 270M over 400 tokens of prose, 128 candidates leave the sampling distribution within a total
    # variation of 0.019 (median) of the exact int8 head's, half the 0.035 that int8 quantisation itself puts
    # between that head and the fp32 model (64 candidates: 0.027; 256: 0.012, for 1.5% more time a token).
    CANDIDATES = 128

    def __init__(self, table: nn.Module, dtype: torch.dtype, coarse: nn.Module | None = None,
                 ranker: nn.Module | None = None) -> None:
        super().__init__()
        self.table = table
        self.coarse = coarse
        self.ranker = ranker  # a 3-bit `Int3Ranker`: the native greedy step picks its candidates with it
        self.act_dtype = dtype
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def _decode_logits(self, lin: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits [M, N] of `lin` for a few rows x [M, K] (the native decoder has its own head kernels)."""
        return lin(_flat(x, self.act_dtype)).float()

    @property
    def dtype(self) -> torch.dtype:
        return self.act_dtype

    @property
    def device(self) -> torch.device:
        return next(self.table.buffers()).device

    def _rescored(self, x: torch.Tensor) -> torch.Tensor:
        """Decode-time head: int4 logits for the whole vocabulary, then the top `CANDIDATES` of each row
        recomputed from the int8 table. The int4 pass reads 40% fewer bytes than int8; the argmax (greedy) and
        every likely token get int8 values, only the unlikely tail keeps int4 ones."""
        a = _flat(x, self.act_dtype)
        logits = self._decode_logits(self.coarse, x.reshape(a.shape))
        top = top_indices(logits, self.CANDIDATES)  # [M, C]
        rows = self.table.dequantized_rows(top.reshape(-1)).view(*top.shape, -1)  # [M, C, K]
        exact = torch.bmm(rows.float(), a.float().unsqueeze(-1)).squeeze(-1)
        logits.scatter_(-1, top, exact)
        return logits.view(*x.shape[:-1], -1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.dequantized_rows(ids.reshape(-1))
        return rows.view(*ids.shape, self.embedding_dim).to(self.act_dtype)

    def project(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits x E^T over the whole vocabulary, or over `rows` only (dequantising just those rows).

        Decoding (few positions) gets fp32 logits: sampling and argmax read them, and on CPU both are several
        times slower over a 262k-wide bf16 row than over fp32 (measured: argmax ~3x).
        """
        if rows is None and x.numel() // x.shape[-1] < DENSE_ROWS:
            if self.coarse is None:
                flat = x.reshape(-1, x.shape[-1])
                return self._decode_logits(self.table, flat).view(*x.shape[:-1], self.num_embeddings)
            return self._rescored(x)
        if rows is None:  # many positions: dequantise the vocabulary in slices, never the whole table at once
            a = x.to(self.act_dtype)
            step = 16384
            return torch.cat([F.linear(a, self.table.dequantized_rows(torch.arange(i, min(i + step,
                              self.num_embeddings), device=a.device))) for i in range(0, self.num_embeddings, step)],
                             dim=-1)
        return F.linear(x.to(self.act_dtype), self.table.dequantized_rows(rows).to(self.act_dtype))


# --- conversion of a whole model ---------------------------------------------------------------------------------
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_model(model: nn.Module, mode: str | Scheme, dtype: torch.dtype = torch.bfloat16,
                   progress: Callable[[int], None] | None = None,
                   state: dict[str, Weight] | None = None) -> nn.Module:
    """Convert a `Transformer` in place: linears and the tied embedding to `mode`, norms kept in fp32.

    In memory (`state=None`): the module's own (fp32) weights are converted, e.g. after training or merging.
    Streaming (`state` given, the module built on the meta device): each weight is taken out of `state` by its
    canonical name (a float tensor or a `RawTensor`), decoded alone, converted and installed, so only one tensor
    (or one chunk of the head's rows) is ever in fp32; `state` is left empty. Both ways share the per-tensor
    code (`make_linear`, `make_head`), so they give the same modules bit for bit.
    Returns the model. `progress(n)` is called after each converted tensor (for a progress bar).
    """
    spec = scheme(mode) if isinstance(mode, str) else mode
    model.quant_scheme = spec

    def take(name: str, held: torch.Tensor) -> Weight:
        return state.pop(name) if state is not None else held.detach()

    for i, block in enumerate(model.model.layers):
        for part, parent in (("self_attn", block.self_attn), ("mlp", block.mlp)):
            for name in LINEAR_NAMES:
                lin = getattr(parent, name, None)
                if isinstance(lin, nn.Linear):
                    w = take(f"model.layers.{i}.{part}.{name}.weight", lin.weight)
                    setattr(parent, name, make_linear(w, spec.layers, spec.group, dtype))
                    del w, lin
                    if state is not None:
                        release_freed()
                    if progress:
                        progress(1)
    emb = model.model.embed_tokens
    if isinstance(emb, nn.Embedding):
        w = take("model.embed_tokens.weight", emb.weight)
        if spec.head != "bf16":
            model.model.embed_tokens = make_head(w, spec, dtype)
        elif state is None:
            emb.weight.data = emb.weight.data.to(dtype)
        else:
            emb.weight = nn.Parameter(decoded_as(w, dtype), requires_grad=False)
        del w
        if state is not None:
            release_freed()
        if progress:
            progress(1)
    for name, module in model.named_modules():  # norms: fp32 weights, they cost nothing and keep the (1 + w) exact
        if hasattr(module, "eps") and isinstance(getattr(module, "weight", None), nn.Parameter):
            if state is None:
                module.weight.data = module.weight.data.float()
            else:
                module.weight = nn.Parameter(decoded(state.pop(f"{name}.weight")).clone(), requires_grad=False)
    return model


def count_convertible(model: nn.Module) -> int:
    """How many tensors `quantize_model` converts (the length of its progress bar)."""
    return sum(1 for m in model.modules() if isinstance(m, nn.Linear)) + 1


def conversion_bytes(shapes: dict[str, Weight], spec: Scheme) -> tuple[int, int]:
    """(bytes the converted model holds, the largest transient of the conversion) for the tensors of `shapes`
    (canonical names; only `.shape`, and a `RawTensor`'s type, are read), as `quantize_model` converts them
    to `spec`. The transient is the fp32 copy of the largest layer tensor with the quantiser's temporaries
    (about 3x), or a chunk of the head's rows with int4's clipping search (about 10x): an estimate for
    `gemmakit.memory.check_fits`, not an exact figure."""
    layer_bytes = {"int8": lambda n, k: n * k + 2 * n, "bf16": lambda n, k: 2 * n * k,
                   "int4": lambda n, k: n * k // 2 + 4 * n * (k // spec.group)}
    total = transient = 0
    for name, w in shapes.items():
        shape = tuple(int(d) for d in w.shape)
        numel = math.prod(shape)
        if len(shape) != 2:  # norms, in fp32
            total += 4 * numel
            continue
        n, k = shape
        if name == "model.embed_tokens.weight":
            int4_fits = Int4Linear.supports(w, spec.group)
            head = "int4" if spec.head == "int4" and int4_fits else spec.head
            total += layer_bytes.get(head, layer_bytes["int8"])(n, k)
            if spec.coarse_head and head != "bf16" and int4_fits:
                ranker = 3 * n * k // 8 + 4 * n * (k // 64) if Int3Ranker.supports(w) else 0
                total += layer_bytes["int4"](n, k) + ranker
            transient = max(transient, 10 * 4 * min(n, HEAD_CHUNK_ROWS) * k)
            continue
        if spec.layers == "gguf" and isinstance(w, RawTensor) and BlockLinear.supports(w):
            total += w.nbytes + 8  # + its block_type buffer
            continue
        fmt = spec.layers if spec.layers in layer_bytes else "int8"
        if fmt == "int4" and not (n % 64 == 0 and k % spec.group == 0):
            fmt = "int8"
        total += layer_bytes[fmt](n, k)
        transient = max(transient, 3 * 4 * numel)
    return total, transient


def weight_bytes_per_token(model: nn.Module, ranked: bool = False) -> int:
    """Bytes of weights one decode step reads: every linear, the whole head, one embedding row (ignored). With a
    coarse head, the head is its candidate-picking copy plus CANDIDATES rows of the exact one; the copy is the
    3-bit ranker when `ranked` (the native greedy step: `NativeDecoder.greedy_reads_ranker`), else the int4
    head (sampling, and every other decode path)."""
    total = 0
    emb = model.model.embed_tokens
    skip: list[nn.Module] = []
    if isinstance(emb, QuantEmbedding) and emb.coarse is not None:
        skip.append(emb.table)
        total += emb.CANDIDATES * sum(t.numel() * t.element_size() for t in emb.table.buffers()) // emb.num_embeddings
        if ranked and emb.ranker is not None:
            skip.append(emb.coarse)
            total += emb.ranker.planes.numel()
    for module in model.modules():
        if any(module is s for s in skip):
            continue
        if isinstance(module, (Int8Linear, Int4Linear, BlockLinear, nn.Linear)):
            total += sum(t.numel() * t.element_size() for t in module.buffers(recurse=False))
            total += sum(t.numel() * t.element_size() for t in module.parameters(recurse=False))
        elif isinstance(module, nn.Embedding):
            total += module.weight.numel() * module.weight.element_size()
    return total


def is_quantized_state(state: dict[str, torch.Tensor]) -> bool:
    """True for the state dict of a quantised model (int8/int4 buffers, as `quantize_model` leaves them)."""
    return any(k.endswith((".weight_int8", ".weight_int4", ".weight_blocks")) for k in state)


def install_quantized(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give a (meta) `Transformer` the quantised modules `state` holds, so that `load_state_dict` can fill it.

    The kind of each linear is read from its buffer names (`weight_int8`, `weight_int4`, or a plain `weight`), and
    the activation dtype from the scales, so the state alone says how the model was converted. Used by the one
    builder, `gemmakit.loader.build_model`.
    """
    for i, block in enumerate(model.model.layers):
        for part, parent in (("self_attn", block.self_attn), ("mlp", block.mlp)):
            for name in LINEAR_NAMES:
                if getattr(parent, name, None) is not None:
                    setattr(parent, name, _linear_from_state(state, f"model.layers.{i}.{part}.{name}"))
    if "model.embed_tokens.weight" not in state:
        table = _linear_from_state(state, "model.embed_tokens.table")
        dtype = table.scales.dtype if isinstance(table, Int8Linear) else table.scales_zeros.dtype
        coarse = ranker = None
        if any(k.startswith("model.embed_tokens.coarse.") for k in state):
            coarse = _linear_from_state(state, "model.embed_tokens.coarse")
        if "model.embed_tokens.ranker.planes" in state:
            ranker = Int3Ranker(state["model.embed_tokens.ranker.planes"])
        model.model.embed_tokens = QuantEmbedding(table, dtype, coarse, ranker)


def _linear_from_state(state: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    if f"{prefix}.weight_blocks" in state:
        return BlockLinear(state[f"{prefix}.weight_blocks"], state[f"{prefix}.block_type"])
    if f"{prefix}.weight_int8" in state:
        return Int8Linear(state[f"{prefix}.weight_int8"], state[f"{prefix}.scales"])
    if f"{prefix}.weight_int4" in state:
        packed, sz = state[f"{prefix}.weight_int4"], state[f"{prefix}.scales_zeros"]
        return Int4Linear(packed, sz, packed.shape[1] // sz.shape[0])
    w = state.get(f"{prefix}.weight")
    if w is None:
        raise KeyError(f"{prefix}.weight")  # the builder reports it with the file's name
    with torch.device("meta"):
        return nn.Linear(w.shape[1], w.shape[0], bias=False)
