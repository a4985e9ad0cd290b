"""GGUF files (llama.cpp) to canonical names: rename, dequantise, and undo llama.cpp's +1 on norm weights.

llama.cpp stores each RMSNorm weight as the effective multiplier (1 + w); our model computes (1 + w) itself,
so 1 is subtracted here, once, for every tensor whose name ends in `norm.weight` (q/k norms included); a lazy
read leaves it to the `RawTensor` (`shift=-1.0`), which subtracts it when the tensor is decoded.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from gemmakit.config import GemmaConfig
from gemmakit.errors import FormatError
from gemmakit.tokenizer import Tokenizer
from gemmakit.weights.gguf_reader import GGUFFile
from gemmakit.weights.raw import RawTensor
from gemmakit.weights.source import Checkpoint

_COMMON = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# GGUF's `ffn_norm` is always the pre-MLP norm; HF calls that `post_attention_layernorm` in Gemma 1 only.
_BY_FAMILY = {
    "gemma": {"ffn_norm": "post_attention_layernorm"},
    "gemma2": {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
}
_BY_FAMILY["gemma3"] = _BY_FAMILY["gemma2"]
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def hf_name(gguf_name: str, family: str) -> str | None:
    """Canonical name of a GGUF tensor, or None when the tensor is not part of the text model."""
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    match = _BLOCK.match(gguf_name)
    if not match:
        return None
    layer, part = match.groups()
    target = _BY_FAMILY[family].get(part) or _COMMON.get(part)
    return f"model.layers.{layer}.{target}.weight" if target else None


def gguf_name(hf: str, family: str) -> str:
    """The inverse of `hf_name`, for writers."""
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    inverse = {v: k for k, v in {**_COMMON, **_BY_FAMILY[family]}.items()}
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{inverse[rest.removesuffix('.weight')]}.weight"


def read(path: str | Path, lazy: bool = False) -> Checkpoint:
    """The state dict in canonical names, the config and tokenizer from the metadata, each tensor's GGUF type
    (by canonical name), and the `tokenizer.*` keys (a converted file stores them).

    `lazy=False`: every tensor decoded to fp32 (4 bytes a weight, the whole model at once). `lazy=True`: each
    tensor a `RawTensor`, a zero-copy view of the file's memory map decoded only when asked (norms carry
    `shift=-1.0`), so a streaming conversion holds one decoded tensor at a time; the map stays open as long as
    a view of it lives.
    """
    path = Path(path)
    with GGUFFile(path) as f:
        config = GemmaConfig.from_gguf_metadata(f.metadata, source=str(path))
        tokenizer = Tokenizer.from_gguf_metadata(f.metadata, source=str(path))
        tokenizer_metadata = {k: v for k, v in f.metadata.items() if k.startswith("tokenizer.")}
        state: dict[str, torch.Tensor | RawTensor] = {}
        types: dict[str, str] = {}
        for name, info in f.tensors.items():
            canon = hf_name(name, config.family)
            if canon is None:
                if name == "output.weight":
                    continue  # an untied copy of the embedding; Gemma ties them
                raise FormatError(f"{path}: unexpected tensor {name!r} for architecture {config.family}")
            raw = RawTensor(f.raw(name), info.ggml_type, info.shape, str(path), name,
                            shift=-1.0 if name.endswith("norm.weight") else 0.0)
            state[canon] = raw if lazy else raw.dequantize()
            types[canon] = info.type_name
    if "model.embed_tokens.weight" not in state:
        raise FormatError(f"{path}: no token_embd.weight tensor")
    return Checkpoint(config, state, tokenizer, path, types, tokenizer_metadata=tokenizer_metadata)
