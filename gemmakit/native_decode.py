"""Decoding through gemmakit's own C++ step (`gemmakit/native/decode_step.cpp`) for int8-quantised models on CPU.

Why: the eager decode step of a small Gemma runs ~1,500 torch ops per token and spends as much time
dispatching them as reading the weights; torch.compile removes part of that for a minute of compiling. The
native step runs every layer in one OpenMP region of plain loops (int8 x fp32 dot products at memory speed,
norms, rope, attention over the cache, GeGLU), so a token costs little more than reading the weights once.
The library also embeds the token ids and runs `int8-rescore`'s LM head (final norm, int4 candidate head,
exact int8 rescoring of the candidates), so a greedy token is one call (`NativeDecoder.greedy_step`); Python
keeps the cache's length and the choice of sampled tokens. `NativeHead` serves the eager paths' head products.

Numerics: activations stay fp32 through the layers (the eager bf16 path rounds them after every op), so the
step computes the fp32 model whose weights are the dequantised int8 ones, to fp32 rounding; `tests/
test_native_decode.py` checks exactly that.

The library is compiled on first use with the system's C++ compiler (`g++ -O3 -march=native -fopenmp`, a few
seconds) into `$GEMMAKIT_CACHE/native/`, keyed by the source, the compiler and the CPU. Without a compiler, or
with `GEMMAKIT_NATIVE=0`, decoding stays on the eager path (a warning says why, once).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from gemmakit.cache import KVCache
from gemmakit.engine import argmax_rows
from gemmakit.errors import InputError
from gemmakit.model import HookWatch, RMSNorm, Transformer
from gemmakit.quant import Int4Linear, Int8Linear, QuantEmbedding
from gemmakit.ranker import Int3Ranker

SOURCE = Path(__file__).with_name("native") / "decode_step.cpp"
# Rows decoded together at most. Our row-by-row dot products stop gaining at about 8 rows, torch's GEMMs keep
# gaining: total tok/s on the 270M, native vs eager, 343 vs 262 at 8 rows and 339 vs 307 at 16.
MAX_BATCH = 16
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")

_ptr = ctypes.c_void_p
_i64 = ctypes.c_int64


class _Layer(ctypes.Structure):
    _fields_ = [(name, _ptr) for name in ("wq", "wk", "wv", "wo", "wg", "wu", "wd",
                                          "sq", "sk", "sv", "so", "sg", "su", "sd",
                                          "input_norm", "post_attn_norm", "pre_ffw_norm", "post_ffw_norm",
                                          "q_norm", "k_norm", "keys", "values")] + [("slots", _i64), ("sliding", _i64)]


class _Model(ctypes.Structure):
    _fields_ = [(name, _i64) for name in ("batch", "hidden", "heads", "kv_heads", "head_dim", "intermediate",
                                          "num_layers")] + \
               [("eps", ctypes.c_float), ("scale", ctypes.c_float), ("attn_softcap", ctypes.c_float),
                ("layers", ctypes.POINTER(_Layer))] + \
               [(name, _ptr) for name in ("cos_local", "sin_local", "cos_global", "sin_global", "pad",
                                          "ring_times")] + \
               [("ring", _i64), ("embed_table", _ptr), ("embed_scales", _ptr), ("normaliser", ctypes.c_float)]


class _Head(ctypes.Structure):
    _fields_ = [("norm", _ptr), ("eps", ctypes.c_float), ("packed", _ptr), ("scales_zeros", _ptr),
                ("n", _i64), ("k", _i64), ("group", _i64), ("table", _ptr), ("table_scale", _ptr),
                ("candidates", _i64), ("ranker", _ptr)]


# --- building and loading the library ---------------------------------------------------------------------------
def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def library_path(compiler: str) -> Path:
    """Where the library built from this source by this compiler for this CPU lives."""
    from gemmakit.weights.converted import cache_root

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + " ".join(_FLAGS).encode() + _cpu_flags().encode())
    return cache_root() / "native" / f"decode_step-{key.hexdigest()[:16]}.so"


def build(compiler: str) -> Path:
    """Compile the library if it is not cached yet; the file appears atomically (safe with parallel builds)."""
    target = library_path(compiler)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    print(f"[gemmakit: building the native decode step with {Path(compiler).name} (once, a few seconds)]",
          file=sys.stderr, flush=True)
    try:
        proc = subprocess.run([compiler, *_FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE}:\n{proc.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


_LIBRARY: ctypes.CDLL | None = None
_UNAVAILABLE: str | None = None


def library() -> ctypes.CDLL | None:
    """The loaded library, building it the first time; None (with one warning) when it cannot be had."""
    global _LIBRARY, _UNAVAILABLE
    if _LIBRARY is not None or _UNAVAILABLE is not None:
        return _LIBRARY
    compiler = _compiler()
    try:
        if os.environ.get("GEMMAKIT_NATIVE", "1") == "0":
            raise RuntimeError("GEMMAKIT_NATIVE=0")
        if compiler is None:
            raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
        lib = ctypes.CDLL(str(build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        _UNAVAILABLE = str(err)
        if os.environ.get("GEMMAKIT_NATIVE") != "0":
            warnings.warn(f"gemmakit's native decode step is unavailable, decoding stays eager: {err}", stacklevel=2)
        return None
    lib.gk_decode_step.argtypes = [ctypes.POINTER(_Model), _ptr, _ptr, _i64, ctypes.c_int]
    lib.gk_argmax.argtypes = [_ptr, _i64, _i64, _ptr]
    lib.gk_argmax.restype = None
    lib.gk_decode_step.restype = ctypes.c_int
    lib.gk_int4_matvec.argtypes = [_ptr, _ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, ctypes.c_int]
    lib.gk_int4_matvec.restype = ctypes.c_int
    lib.gk_rescored_head.argtypes = [_ptr, _i64, ctypes.POINTER(_Head), _ptr, ctypes.c_int, _ptr, ctypes.c_int]
    lib.gk_rescored_head.restype = ctypes.c_int
    lib.gk_greedy_step.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(_Head), _ptr, _i64, _ptr, _ptr, _ptr,
                                   ctypes.c_int]
    lib.gk_greedy_step.restype = ctypes.c_int
    lib.gk_int8_matvec.argtypes = [_ptr, _ptr, _i64, _i64, _ptr, _i64, _ptr, ctypes.c_int]
    lib.gk_int8_matvec.restype = None
    _LIBRARY = lib
    return lib


# --- the decoder -----------------------------------------------------------------------------------------------
def supports(model: Transformer) -> bool:
    """True for a CPU model whose every layer linear is int8 (`quant` schemes "int8", "int8-rescore", ...)."""
    linears = [getattr(part, name) for block in model.model.layers for part, names in
               ((block.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                (block.mlp, ("gate_proj", "up_proj", "down_proj"))) for name in names]
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    return (model.device.type == "cpu" and all(type(lin) is Int8Linear for lin in linears)
            and all(norm.weight.dtype == torch.float32 for norm in norms))


@dataclass
class _Binding:
    """The step's view of one model and one cache: the C structs, the LM head's arguments (when the native
    head serves this model), and every tensor they point into."""

    struct: _Model
    layers: ctypes.Array
    tensors: list[torch.Tensor]
    head: _Head | None  # the native LM head, when it serves this model
    vocab: int
    greedy: bool  # whether gk_greedy_step may choose tokens (a native head, and no final soft-cap)
    scratch: tuple[torch.Tensor, torch.Tensor] | None = None  # gk_greedy_step's h and logits, made on first use


def _head(lib: ctypes.CDLL, emb: QuantEmbedding, norm: RMSNorm, table_scales: torch.Tensor,
          keep: list[torch.Tensor]) -> _Head | None:
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
    return _Head(norm=multiplier.data_ptr(), eps=norm.eps, packed=coarse.weight_int4.data_ptr(),
                 scales_zeros=coarse.scales_zeros.data_ptr(), n=coarse.out_features, k=coarse.in_features,
                 group=coarse.group, table=table.weight_int8.data_ptr(), table_scale=table_scales.data_ptr(),
                 candidates=emb.CANDIDATES, ranker=ranker.planes.data_ptr() if ranks else None)


def _bind(lib: ctypes.CDLL, model: Transformer, cache: KVCache) -> _Binding:
    """Pointers to the weights (read now, so weights changed between generations are seen) and to `cache`'s
    buffers, which the step writes in place."""
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

    layers = (_Layer * config.num_layers)()
    for i, block in enumerate(model.model.layers):
        attn, mlp, entry = block.self_attn, block.mlp, layers[i]
        for key, lin in dict(q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, o=attn.o_proj, g=mlp.gate_proj,
                             u=mlp.up_proj, d=mlp.down_proj).items():
            setattr(entry, f"w{key}", ptr(lin.weight_int8))
            setattr(entry, f"s{key}", ptr(lin.scales.float()))
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
    table_scales = None if table is None else table.scales.float()  # one fp32 copy for the embedding and the head
    struct = _Model(
        batch=cache.batch_size, hidden=config.hidden_size, heads=config.num_heads, kv_heads=config.num_kv_heads,
        head_dim=config.head_dim, intermediate=config.intermediate_size, num_layers=config.num_layers,
        eps=config.rms_norm_eps, scale=config.query_pre_attn_scalar ** -0.5,
        attn_softcap=softcap if softcap is not None else 0.0, layers=layers,
        cos_local=ptr(tables[True][0]), sin_local=ptr(tables[True][1]),
        cos_global=ptr(tables[False][0]), sin_global=ptr(tables[False][1]),
        pad=buffer(cache.pad), ring_times=buffer(cache.ring_times), ring=cache.ring_size,
        # the embedding in fp32, E[id] * sqrt(d) with the dequantised int8 row (the eager path rounds it to bf16)
        embed_table=None if table is None else ptr(table.weight_int8),
        embed_scales=ptr(table_scales),
        normaliser=config.hidden_size ** 0.5)
    head = None if table is None else _head(lib, emb, model.model.norm, table_scales, tensors)
    return _Binding(struct, layers, tensors, head, config.vocab_size,
                    greedy=head is not None and config.final_softcap is None)


class NativeDecoder:
    """Runs decode steps of an int8 `model` through the native library (same interface as CompiledDecoder).

    Each cache gets its own binding, kept only as long as the cache lives, so generations running at the same
    time in several threads never share one.
    """

    def __init__(self, model: Transformer, lib: ctypes.CDLL) -> None:
        # the model holds this decoder, so only a weak reference back: `del model` must free it at once
        self._model = weakref.ref(model)
        self.lib = lib
        self._hooks = HookWatch(model)
        self._bindings: weakref.WeakKeyDictionary[KVCache, _Binding] = weakref.WeakKeyDictionary()
        self._last: tuple[weakref.ref[KVCache], _Binding] | None = None  # the binding used last, looked up first

    @property
    def model(self) -> Transformer:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this NativeDecoder has been freed")
        return model

    def usable(self, cache: KVCache) -> bool:
        """fp32 cache (CPU storage), at most MAX_BATCH rows, room left, and no hooks (they need the eager path)."""
        return (cache.keys[0].dtype == torch.float32 and cache.batch_size <= MAX_BATCH
                and cache.length < cache.capacity and not self._hooks.any())

    def step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, V] for one new token per row; advances `cache` exactly as an eager forward would."""
        binding = self._binding(cache)
        h = self._advance(binding, ids, cache, None)
        if binding.head is not None:
            logits = torch.empty(h.shape[0], binding.vocab)
            done = self.lib.gk_rescored_head(h.data_ptr(), h.shape[0], ctypes.byref(binding.head), logits.data_ptr(),
                                             0, None, torch.get_num_threads())
            if done == 0:
                return self.model.cap_logits(logits)
        return self.model.unembed(h.unsqueeze(1))[:, -1]

    def greedy_step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
        """The greedy next token [B] after ids [B] (int64), in one library call with no Python between the
        layers, the head and the choice. With the head's 3-bit ranker: the best of its candidates by exact int8
        logit, which is `argmax(step(ids, cache))` whenever that token is among them (on the real 270M it always
        was: tests/test_quant.py); without: that argmax. None (nothing done) when this model's head is not the
        native one, or its logits are soft-capped."""
        binding = self._binding(cache)
        if not binding.greedy or ids.dtype != torch.long or not ids.is_contiguous():
            return None
        if binding.scratch is None:
            binding.scratch = (torch.empty(cache.batch_size, self.model.config.hidden_size),
                               torch.empty(cache.batch_size, binding.vocab))
        h, logits = binding.scratch
        out = torch.empty(cache.batch_size, dtype=torch.long)
        now = cache.length
        done = self.lib.gk_greedy_step(ctypes.byref(binding.struct), ctypes.byref(binding.head), ids.data_ptr(), now,
                                       h.data_ptr(), logits.data_ptr(), out.data_ptr(), torch.get_num_threads())
        if done != 0:
            raise RuntimeError(f"native greedy step failed ({done})")
        cache.length = now + 1
        return out

    def greedy_choice(self, h: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
        """The greedy token [B] for last-position residuals h [B, d] (before the final norm, e.g. a prompt's),
        chosen as `greedy_step` chooses with the 3-bit ranker; None when there is no ranker. A greedy
        generation then never reads the int4 head (94 MB that would stay resident)."""
        binding = self._binding(cache)
        if not binding.greedy or not binding.head.ranker:
            return None
        h = h.to(torch.float32).contiguous()
        logits, best = torch.empty(h.shape[0], binding.vocab), torch.empty(h.shape[0], dtype=torch.long)
        done = self.lib.gk_rescored_head(h.data_ptr(), h.shape[0], ctypes.byref(binding.head), logits.data_ptr(), 1,
                                         best.data_ptr(), torch.get_num_threads())
        if done != 0:
            raise RuntimeError(f"native rescored head failed ({done})")
        return best

    @property
    def greedy_reads_ranker(self) -> bool:
        """Whether greedy decoding picks its candidates with the head's 3-bit ranker (and so reads it instead of
        the int4 head): the same test `_bind` applies, without a cache."""
        model = self.model
        emb = model.model.embed_tokens
        if (model.config.final_softcap is not None or not isinstance(emb, QuantEmbedding)
                or type(emb.table) is not Int8Linear):
            return False
        head = _head(self.lib, emb, model.model.norm, emb.table.scales.float(), [])
        return head is not None and bool(head.ranker)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits.argmax(-1)` (first index of the maximum, NaN counted largest) in one pass over [B, V] fp32
        logits, while they are still in cache; other tensors go to `engine.argmax_rows`."""
        if logits.dtype != torch.float32 or logits.dim() != 2 or not logits.is_contiguous() or logits.is_cuda:
            return argmax_rows(logits)
        out = torch.empty(logits.shape[0], dtype=torch.long)
        self.lib.gk_argmax(logits.data_ptr(), logits.shape[0], logits.shape[1], out.data_ptr())
        return out

    def hidden_states(self, ids: torch.Tensor, cache: KVCache, embedded: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream [B, 1, d] (fp32) after the last layer for ids [B, 1] (or their `embedded` inputs
        [B, 1, d]), written into `cache` as the model's own `hidden_states` would."""
        return self._advance(self._binding(cache), ids, cache, embedded).unsqueeze(1)

    def _binding(self, cache: KVCache) -> _Binding:
        if self._last is not None and self._last[0]() is cache:
            return self._last[1]
        binding = self._bindings.get(cache)
        if binding is None:
            binding = self._bindings[cache] = _bind(self.lib, self.model, cache)
        self._last = (weakref.ref(cache), binding)
        return binding

    def _advance(self, binding: _Binding, ids: torch.Tensor, cache: KVCache,
                 embedded: torch.Tensor | None) -> torch.Tensor:
        """One step through the layers: h [B, d] fp32, embedded by the library when it holds the table."""
        now = cache.length
        rows = ids.shape[0]
        threads = torch.get_num_threads()
        if embedded is None and binding.struct.embed_table:
            h = torch.empty(rows, self.model.config.hidden_size)
            tokens = ids.reshape(rows).to(torch.long).contiguous()
            done = self.lib.gk_decode_step(ctypes.byref(binding.struct), h.data_ptr(), tokens.data_ptr(), now, threads)
        else:
            h = self.model.embed(ids) if embedded is None else embedded
            h = h.to(torch.float32).reshape(rows, -1).contiguous()
            done = self.lib.gk_decode_step(ctypes.byref(binding.struct), h.data_ptr(), None, now, threads)
        if done != 0:
            raise RuntimeError(f"native decode step failed ({done})")
        cache.length = now + 1
        return h


class NativeHead:
    """Decode-time LM head products for `QuantEmbedding.matvec`: int8 heads exactly (fp32 activations, one
    sequential stream per row), and the int4 candidate-picking head of `int8-rescore` with int8 activations
    (one scale per group of inputs) and VNNI dot products. The latter adds the activations' rounding to the
    int4 head's own error; it only ranks candidates (whose logits are recomputed from the int8 table) and
    fills the unlikely tail."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.int4 = bool(lib.gk_has_int4_matvec())
        # fp32 copies of int8 heads' scales, by data pointer and version (an in-place change makes a new copy)
        self._scales: dict[tuple[int, int], torch.Tensor] = {}

    def _fp32_scales(self, lin: Int8Linear) -> torch.Tensor:
        key = (lin.scales.data_ptr(), lin.scales._version)
        scales = self._scales.get(key)
        if scales is None:
            scales = self._scales[key] = lin.scales.float()
        return scales

    def __call__(self, lin: torch.nn.Module, x: torch.Tensor, coarse: bool = False) -> torch.Tensor | None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
        rows = x.shape[0]
        threads = torch.get_num_threads()
        if type(lin) is Int8Linear and rows <= MAX_BATCH:
            scales = self._fp32_scales(lin)
            y = torch.empty(rows, lin.out_features)
            self.lib.gk_int8_matvec(lin.weight_int8.data_ptr(), scales.data_ptr(), lin.out_features,
                                    lin.in_features, x.data_ptr(), rows, y.data_ptr(), threads)
            return y
        if (coarse and self.int4 and type(lin) is Int4Linear and lin.scales_zeros.dtype == torch.bfloat16
                and rows <= MAX_BATCH):
            y = torch.empty(rows, lin.out_features)
            done = self.lib.gk_int4_matvec(lin.weight_int4.data_ptr(), lin.scales_zeros.data_ptr(), lin.out_features,
                                           lin.in_features, lin.group, x.data_ptr(), rows, y.data_ptr(), threads)
            return y if done == 0 else None
        return None


def enable(model: Transformer) -> bool:
    """Make generation decode `model` through the native step when it can; False (nothing changed) if not."""
    if not supports(model):
        return False
    lib = library()
    if lib is None:
        return False
    model.native_decoder = NativeDecoder(model, lib)
    if isinstance(model.model.embed_tokens, QuantEmbedding):
        model.model.embed_tokens.matvec = NativeHead(lib)
    return True
