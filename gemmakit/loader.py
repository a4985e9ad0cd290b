"""From a path (or "default") to a `Transformer` + tokenizer, one way: resolve -> read -> build (-> quantise).

- `resolve_source` (weights/source.py) tells the format once; the `Source` travels everywhere after.
- Readers (`weights/`) only read: each returns a `Checkpoint` (config, canonical state dict, tokenizer).
- `build_model` is the one place a state dict becomes a module, float or quantised, so name and shape checks
  are written once for all formats (a converted file included).
- `quantized_module` is the one read -> quantise pipeline, used in memory (`cache=False`) and by `convert`,
  which writes the converted file that later loads only map. It streams: the file is read lazily (each tensor
  a `RawTensor` over its memory map) and decoded, converted and installed one tensor at a time, so a model is
  never whole in fp32 (a 9B model would need ~37 GB); a load that cannot fit is refused before it starts
  (`gemmakit.memory.check_fits`).
- `load_model` chooses among these for `gemmakit.load`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gemmakit.config import GemmaConfig
from gemmakit.errors import FormatError, InputError
from gemmakit.memory import check_fits
from gemmakit.model import Transformer, rope_inv_freq
from gemmakit.weights.raw import RawTensor
from gemmakit.weights.source import Checkpoint, Source, default_model_path, read_checkpoint, resolve_source

if TYPE_CHECKING:
    from gemmakit.quant import Scheme
    from gemmakit.tokenizer import Tokenizer

__all__ = ["DTYPES", "Checkpoint", "LoadedModel", "Source", "build_model", "cached_conversion", "check_dtype",
           "convert", "default_model_path", "default_scheme", "load_model", "quantized_module", "read_checkpoint",
           "resolve", "resolve_source"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    """What `load_model` returns: the module, its tokenizer, the original weights' path and their tensor types."""

    module: Transformer
    tokenizer: Tokenizer
    source: Path
    tensor_types: dict[str, str]


def resolve(path_or_name: str | Path) -> Path:
    """The path of a model argument (`resolve_source(...).path`), for callers that only need where it is."""
    return resolve_source(path_or_name).path


def check_dtype(config: GemmaConfig, dtype: torch.dtype, force_fp16: bool) -> None:
    """fp16 overflows in Gemma 2 27B and all of Gemma 3 (large activations); refuse unless forced."""
    if dtype != torch.float16 or force_fp16:
        return
    if config.family == "gemma3" or (config.family == "gemma2" and config.num_layers == 46):
        raise InputError(
            f"float16 is known to overflow in {config.name or config.family} (activations exceed 65504); use "
            "dtype='bfloat16' or 'float32', or pass force_fp16=True to try anyway"
        )


# --- the one builder -----------------------------------------------------------------------------------------------
def build_model(config: GemmaConfig, state: dict[str, torch.Tensor | RawTensor], dtype: torch.dtype | None = None,
                source: str | Path = "<memory>", device: str | torch.device = "cpu") -> Transformer:
    """A `Transformer` holding `state`; every missing, extra or misshapen tensor is reported by name.

    A float state is cast to `dtype` (None keeps each tensor's stored dtype, e.g. a converted bf16 file's fp32
    norms). A lazy state (`RawTensor`s, from `read_checkpoint(..., lazy=True)`) is decoded one tensor at a time
    into `dtype` (None: the stored float type, fp32 for a GGUF's quantised types), after checking that the model
    fits in memory. A quantised state (int8/int4 buffers, from a converted file) gets the quantised modules its
    buffer names call for (`quant.install_quantized`) and keeps its stored dtypes; it runs on CPU only.
    """
    from gemmakit import quant

    with torch.device("meta"):
        model = Transformer(config)
    if quant.is_quantized_state(state):
        if dtype is not None:
            raise InputError(f"{source}: a quantised state keeps its stored dtypes; build it with dtype=None")
        if torch.device(device).type != "cpu":
            raise InputError(f"{source}: a quantised model runs on CPU only (torch's int8/int4 CPU kernels); "
                             f"got device={device!r}")
        try:
            quant.install_quantized(model, state)
        except KeyError as e:
            raise FormatError(f"{source}: quantised tensors do not match a {config.family} model with "
                              f"{config.num_layers} layers: missing {e.args[0]!r}") from None
    _check_tensors(model, state, source)
    if any(isinstance(t, RawTensor) for t in state.values()):
        if torch.device(device).type == "cpu":
            need = sum(t.numel() * (dtype or _stored_dtype(t)).itemsize for t in state.values())
            check_fits(need, f"building the model in {dtype or 'its stored dtypes'}", str(source))
        state = {name: _materialised(t, dtype, device) for name, t in state.items()}
    elif dtype is not None or torch.device(device).type != "cpu":
        state = {name: t.to(device=device, dtype=dtype if dtype is not None else t.dtype) for name, t in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    return _finished(model, device)


def _check_tensors(model: Transformer, state: dict[str, torch.Tensor | RawTensor], source: str | Path) -> None:
    """Every tensor the (meta) model expects is in `state` with its shape, and nothing else."""
    config = model.config
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise FormatError(f"{source}: tensors do not match a {config.family} model with {config.num_layers} layers: "
                          f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                          f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    for name, shape in expected.items():
        found = tuple(state[name].shape)
        if found != shape:
            raise FormatError(f"{source}: tensor {name!r} has shape {list(found)}, expected {list(shape)} "
                              "from the model's config")


_RAW_FLOAT_DTYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # ggml F32, F16, BF16


def _stored_dtype(t: RawTensor) -> torch.dtype:
    return _RAW_FLOAT_DTYPES.get(t.ggml_type, torch.float32)


def _materialised(t: torch.Tensor | RawTensor, dtype: torch.dtype | None, device: str | torch.device) -> torch.Tensor:
    """One tensor of a lazy state, decoded (a new tensor: nothing aliases the file's map) into dtype on device."""
    if isinstance(t, RawTensor):
        return t.dequantize().to(device=device, dtype=dtype or _stored_dtype(t))
    return t.to(device=device, dtype=dtype or t.dtype)


def _finished(model: Transformer, device: str | torch.device) -> Transformer:
    """The rope buffers (built on meta with the module) made real; eval mode, no gradients."""
    config = model.config
    model.inv_freq_local = _rope_buffer(config, local=True, device=device)
    model.inv_freq_global = _rope_buffer(config, local=False, device=device)
    return model.eval().requires_grad_(False)


def _rope_buffer(config: GemmaConfig, local: bool, device: str | torch.device) -> torch.Tensor:
    if local:
        return rope_inv_freq(config.head_dim, config.rope_theta_local).to(device)
    return rope_inv_freq(config.head_dim, config.rope_theta_global, config.rope_scale_global).to(device)


# --- read -> quantise, one tensor at a time, written once ---------------------------------------------------------
def quantized_module(checkpoint: Checkpoint, scheme_name: str | Scheme, progress: bool = False) -> Transformer:
    """The checkpoint quantised to `scheme_name`, streaming (tqdm bar per tensor with `progress`).

    The model is built on the meta device (no memory), then each tensor of the checkpoint's state (float, or a
    `RawTensor` of a lazy read) is decoded alone, converted and installed, and its fp32 copy dropped
    (`quant.quantize_model(..., state=...)`): the peak is the converted model plus one tensor's conversion, not
    the model in fp32. Before anything is converted the estimate of that peak is checked against the memory
    available (`gemmakit.memory.check_fits`). The checkpoint's state is consumed (left empty).
    """
    from tqdm import tqdm

    from gemmakit.quant import conversion_bytes, count_convertible, quantize_model, scheme

    spec = scheme(scheme_name) if isinstance(scheme_name, str) else scheme_name
    with torch.device("meta"):
        module = Transformer(checkpoint.config)
    state, checkpoint.state = checkpoint.state, {}
    _check_tensors(module, state, checkpoint.source)
    converted_size, transient = conversion_bytes(state, spec)
    check_fits(converted_size + transient, f"converting {Path(checkpoint.source).name} to {scheme_name}",
               str(checkpoint.source))
    with tqdm(total=count_convertible(module), desc=f"converting to {scheme_name}", unit="tensor",
              disable=not progress, leave=False) as bar:
        quantize_model(module, spec, progress=bar.update, state=state)
    if state:
        raise FormatError(f"{checkpoint.source}: tensors left after conversion: {sorted(state)[:5]}")
    module.quant_scheme = scheme_name
    return _finished(module, "cpu")


def convert(source: str | Path | Source, scheme_name: str, out: str | Path | None = None,
            progress: bool = True, digest: str | None = None) -> Path:
    """Read `source`, quantise it to `scheme_name`, write the converted file to `out` (default: the cache).
    `digest`: the source's fingerprint when the caller has computed it."""
    from gemmakit.quant import scheme
    from gemmakit.weights import converted

    scheme(scheme_name)  # validate before the slow read
    source = resolve_source(source)
    if source.kind == "converted":
        raise InputError(f"{source}: already a converted model (scheme {source.header['gemmakit.scheme']}); "
                         "convert the original weights instead")
    digest = digest or converted.fingerprint(source.path)
    out = Path(out) if out is not None else converted.cache_path(source.path, scheme_name, digest)
    if out.is_dir() or out.suffix != ".safetensors":
        raise InputError(f"{out}: the output must be a file name ending in .safetensors")
    start = time.perf_counter()
    checkpoint = read_checkpoint(source, lazy=True)
    module = quantized_module(checkpoint, scheme_name, progress)
    converted.save(out, module.state_dict(), module.config, scheme_name, source.path, checkpoint.tensor_types,
                   checkpoint.tokenizer_metadata, digest)
    if progress:
        print(f"[gemmakit: converted {source.path.name} to {scheme_name} in {time.perf_counter() - start:.0f} s, "
              f"saved {out}]", file=sys.stderr)  # stdout is the command's output (JSON, a reply)
    return out


def cached_conversion(source: Source, scheme_name: str, progress: bool = True) -> Path:
    """The cached conversion of `source`, created on first use (older formats of it are then deleted)."""
    from gemmakit.weights import converted

    digest = converted.fingerprint(source.path)
    path = converted.cache_path(source.path, scheme_name, digest)
    if path.exists():
        return path
    path = convert(source, scheme_name, path, progress, digest)
    converted.remove_older_formats(path, progress)
    return path


# --- gemmakit.load's choice ----------------------------------------------------------------------------------------
def default_scheme(source: Source, dtype: object, device: str) -> str | None:
    """`quant="auto"` on a CPU with fast bf16 when no dtype was asked for: a GGUF keeps its layers' own blocks
    ("gguf-rescore": the file's model, at the file's bytes a token) when the native block kernels are built, else
    int8-rescore; an HF directory gets int8-rescore (converted once, cached, then mapped). None (weights as
    stored, fp32) for everything else: any explicit dtype (e.g. "float32", the exact reference) keeps the float
    path."""
    from gemmakit.quant import has_fast_bf16

    if dtype is not None or device != "cpu" or source.kind not in ("gguf", "hf") or not has_fast_bf16():
        return None
    if source.kind == "gguf":
        from gemmakit.decoding.native import kernels

        if kernels.has_block_kernels():
            return "gguf-rescore"
    return "int8-rescore"


def load_model(path_or_name: str | Path | Source, dtype: str | torch.dtype | None = None, device: str = "cpu",
               force_fp16: bool = False, quant: str | None = "auto", cache: bool = True) -> LoadedModel:
    """`gemmakit.load` without the decoder choice (see its docstring for the arguments): resolves the source once,
    then a converted file is mapped, a quantised load goes through the cache (or `quantized_module` in memory),
    and anything else is read and built in `dtype`."""
    source = resolve_source(path_or_name)
    if source.kind == "converted":
        if device != "cpu":
            raise InputError(f"{source}: a converted (quantised) model runs on CPU only; got device={device!r}")
        return _built(read_checkpoint(source), None, device, source.path)
    if quant == "auto":
        quant = default_scheme(source, dtype, device)
    if dtype is None:
        dtype = "float32"
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if quant is not None:
        from gemmakit.quant import scheme
        from gemmakit.weights import converted

        scheme(quant)
        if device != "cpu":
            raise InputError(f"quant={quant!r} uses torch's CPU kernels; use device='cpu', or quant=None with "
                             "dtype='bfloat16' on a GPU")
        if dtype not in (torch.float32, torch.bfloat16):
            raise InputError(f"quant={quant!r} runs with bf16 activations; dtype={dtype} cannot be combined with it")
        if cache:
            path = cached_conversion(source, quant)
            return _built(converted.read(path), None, device, path)
        checkpoint = read_checkpoint(source, lazy=True)
        module = quantized_module(checkpoint, quant)
        return LoadedModel(module, checkpoint.tokenizer, checkpoint.source, checkpoint.tensor_types)
    checkpoint = read_checkpoint(source, lazy=True)  # decoded tensor by tensor by the builder
    check_dtype(checkpoint.config, dtype, force_fp16)
    return _built(checkpoint, dtype, device, checkpoint.source)


def _built(checkpoint: Checkpoint, dtype: torch.dtype | None, device: str, where: Path) -> LoadedModel:
    """The checkpoint through the one builder; a converted file's module also records its scheme."""
    module = build_model(checkpoint.config, checkpoint.state, dtype, where, device)
    if checkpoint.scheme is not None:
        module.quant_scheme = checkpoint.scheme
    return LoadedModel(module, checkpoint.tokenizer, checkpoint.source, checkpoint.tensor_types)
