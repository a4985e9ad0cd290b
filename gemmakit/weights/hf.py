"""Hugging Face model directories: `config.json` + (sharded) safetensors, read into canonical names.

Safetensors never executes code and its header is bounded by the library, so this is the safe format. We
only rename (multimodal Gemma 3 checkpoints nest the text model under `language_model`) and drop the tied
`lm_head.weight`.

A lazy read (`read(..., lazy=True)`, what a quantised load uses) copies nothing: each tensor is a `RawTensor`
over a memory map of its shard (a safetensors tensor is raw little-endian F32/F16/BF16, the same bytes as the
ggml types of those names), decoded one at a time by the streaming conversion. The library's `get_tensor`
copies each tensor into anonymous memory, so an eager read of a bf16 9B directory holds 18 GB before the first
tensor is converted. The header is parsed here with every offset checked against the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from gemmakit.config import GemmaConfig
from gemmakit.errors import FormatError
from gemmakit.weights.raw import RawTensor
from gemmakit.weights.source import Checkpoint

# safetensors dtype -> (ggml type id, bytes per value, torch name): the float types a checkpoint stores
_LAZY_DTYPES = {"F32": (0, 4, "float32"), "F16": (1, 2, "float16"), "BF16": (30, 2, "bfloat16")}
_MAX_HEADER = 100 << 20  # the safetensors library's own bound on a header

_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.")


def canonical_name(name: str) -> str | None:
    """transformers' text-model parameter name, or None for tensors a text model does not use."""
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    if name.startswith("model.") or name == "lm_head.weight":
        return name
    return None  # vision tower, projector, ...


def shard_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory, in the order the index lists them."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise FormatError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from e
        return [directory / name for name in dict.fromkeys(weight_map.values())]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{directory}: no *.safetensors files; expected an HF model directory")
    return files


def read_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """All text-model tensors of an HF directory under canonical names (tied lm_head dropped)."""
    directory = Path(directory)
    state: dict[str, torch.Tensor] = {}
    for path in shard_files(directory):
        if not path.exists():
            raise FormatError(f"{path}: listed in the safetensors index but missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    canon = canonical_name(name)
                    if canon is not None:
                        state[canon] = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise FormatError(f"{path}: cannot read safetensors file: {e}") from e
    lm_head = state.pop("lm_head.weight", None)
    if lm_head is not None and "model.embed_tokens.weight" in state:
        if not torch.equal(lm_head, state["model.embed_tokens.weight"]):
            raise FormatError(f"{directory}: lm_head.weight differs from the embedding; Gemma ties them")
    return state


def read_lazy_state_dict(directory: str | Path) -> dict[str, RawTensor]:
    """`read_state_dict` without reading: each tensor a `RawTensor` over a (copy-on-write) memory map."""
    directory = Path(directory)
    state: dict[str, RawTensor] = {}
    for path in shard_files(directory):
        if not path.exists():
            raise FormatError(f"{path}: listed in the safetensors index but missing")
        for name, raw in _mapped_tensors(path).items():
            canon = canonical_name(name)
            if canon is not None:
                state[canon] = raw
    lm_head = state.pop("lm_head.weight", None)
    embed = state.get("model.embed_tokens.weight")
    if lm_head is not None and embed is not None:
        same = (np.array_equal(lm_head.data, embed.data) if lm_head.ggml_type == embed.ggml_type
                else torch.equal(lm_head.dequantize(), embed.dequantize()))
        if not same:
            raise FormatError(f"{directory}: lm_head.weight differs from the embedding; Gemma ties them")
    return state


def _mapped_tensors(path: Path) -> dict[str, RawTensor]:
    """The tensors of one safetensors file as views of its memory map; the header's every field is checked."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise FormatError(f"{path}: safetensors header length {n} exceeds the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{path}: safetensors header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    data_size = size - 8 - n
    mapped = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + n, shape=(data_size,)) if data_size else None
    out: dict[str, RawTensor] = {}
    for name, entry in header.items():
        if name == "__metadata__" or canonical_name(name) is None:
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{path}: tensor {name!r}: malformed header entry {entry!r}") from e
        if dtype not in _LAZY_DTYPES:
            raise FormatError(f"{path}: tensor {name!r} has dtype {dtype}; expected one of {', '.join(_LAZY_DTYPES)}")
        ggml_type, width, _ = _LAZY_DTYPES[dtype]
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_size) \
                or end - start != numel * width or any(d < 0 for d in shape):
            raise FormatError(f"{path}: tensor {name!r}: bytes {start}..{end} do not hold {dtype} {list(shape)} "
                              f"within the file's {data_size} data bytes")
        data = mapped[start:end] if mapped is not None else np.zeros(0, np.uint8)
        out[name] = RawTensor(data, ggml_type, shape, str(path), name)
    return out


def read_config(directory: str | Path) -> GemmaConfig:
    return GemmaConfig.from_hf_config(Path(directory))


def read(directory: str | Path, lazy: bool = False) -> Checkpoint:
    """Config, state dict and tokenizer of an HF model directory; tensor types are the stored dtypes.
    `lazy=True`: the tensors as `RawTensor`s over memory maps (see the module docstring)."""
    from gemmakit.tokenizer import Tokenizer

    directory = Path(directory)
    config = read_config(directory)
    if lazy:
        lazy_state = read_lazy_state_dict(directory)
        names = {ggml: torch_name for ggml, _, torch_name in _LAZY_DTYPES.values()}
        types = {name: names[raw.ggml_type] for name, raw in lazy_state.items()}
        state: dict[str, torch.Tensor | RawTensor] = dict(lazy_state)
    else:
        state = dict(read_state_dict(directory))
        types = {name: str(t.dtype).removeprefix("torch.") for name, t in state.items()}
    return Checkpoint(config, state, Tokenizer.from_dir(directory), directory, types)
