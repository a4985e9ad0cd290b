"""Hugging Face model directories: `config.json` + (sharded) safetensors, read into canonical names.

Safetensors never executes code and its header is bounded by the library, so this is the safe format. We
only rename (multimodal Gemma 3 checkpoints nest the text model under `language_model`) and drop the tied
`lm_head.weight`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gemmakit.config import GemmaConfig
from gemmakit.errors import FormatError
from gemmakit.weights.source import Checkpoint

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


def read_config(directory: str | Path) -> GemmaConfig:
    return GemmaConfig.from_hf_config(Path(directory))


def read(directory: str | Path) -> Checkpoint:
    """Config, state dict and tokenizer of an HF model directory; tensor types are the stored dtypes."""
    from gemmakit.tokenizer import Tokenizer

    directory = Path(directory)
    config = read_config(directory)
    state = read_state_dict(directory)
    types = {name: str(t.dtype).removeprefix("torch.") for name, t in state.items()}
    return Checkpoint(config, state, Tokenizer.from_dir(directory), directory, types)
