"""google/gemma_pytorch `.ckpt` files: a torch-saved state dict with a fused qkv projection.

Loaded with `weights_only=True`, so a hostile file cannot run code. The file carries no config: a
`config.json` beside it wins; otherwise the released size is recognised from the tensor shapes.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from gemmakit.config import PRESETS, GemmaConfig
from gemmakit.errors import ConfigError, FormatError
from gemmakit.tokenizer import Tokenizer
from gemmakit.weights.source import Checkpoint

_RENAMES = {"embedder.weight": "model.embed_tokens.weight", ".self_attn.query_norm.": ".self_attn.q_norm.",
            ".self_attn.key_norm.": ".self_attn.k_norm."}


def load_raw(path: Path) -> dict[str, torch.Tensor]:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise FormatError(f"{path}: not a loadable weights-only torch checkpoint: {e}") from e
    state = raw.get("model_state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FormatError(f"{path}: expected a dict of tensors (optionally under 'model_state_dict')")
    if any(k.endswith("weight_scaler") for k in state):
        raise FormatError(f"{path}: int8-quantised gemma_pytorch checkpoints are not supported; use the bf16 one")
    return state


def family_of(state: dict[str, torch.Tensor]) -> str:
    if any(".query_norm." in k for k in state):
        return "gemma3"
    if any(".pre_feedforward_layernorm." in k for k in state):
        return "gemma2"
    return "gemma"


def infer_config(state: dict[str, torch.Tensor], path: Path) -> GemmaConfig:
    """The released preset whose family, depth and width match the tensors; vocab taken from the file."""
    family = family_of(state)
    vocab, hidden = state["embedder.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("model.layers."))
    for preset in PRESETS.values():
        if (preset.family, preset.num_layers, preset.hidden_size) == (family, layers, hidden):
            return preset.replace(vocab_size=int(vocab))
    raise ConfigError(f"{path}: no released {family} size has {layers} layers of width {hidden}; put the model's "
                      "config.json beside the checkpoint")


def to_canonical(state: dict[str, torch.Tensor], config: GemmaConfig) -> dict[str, torch.Tensor]:
    """Rename to HF names and split each fused qkv_proj into q, k and v."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith(".qkv_proj.weight"):
            q, k, v = torch.split(tensor, [config.q_dim, config.kv_dim, config.kv_dim], dim=0)
            stem = name.removesuffix("qkv_proj.weight")
            out[stem + "q_proj.weight"], out[stem + "k_proj.weight"], out[stem + "v_proj.weight"] = q, k, v
            continue
        for old, new in _RENAMES.items():
            name = name.replace(old, new)
        out[name] = tensor
    return out


def read(path: str | Path) -> Checkpoint:
    """The canonical state dict, the config (beside the file, or recognised), the tokenizer beside the file."""
    path = Path(path)
    state = load_raw(path)
    if "embedder.weight" not in state:
        raise FormatError(f"{path}: no 'embedder.weight'; not a gemma_pytorch checkpoint")
    beside = path.parent / "config.json"
    config = GemmaConfig.from_hf_config(beside) if beside.exists() else infer_config(state, path)
    canonical = to_canonical(state, config)
    types = {name: str(t.dtype).removeprefix("torch.") for name, t in canonical.items()}
    return Checkpoint(config, canonical, Tokenizer.from_dir(path.parent), path, types)
