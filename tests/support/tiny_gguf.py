"""GGUF files written with llama.cpp's own `gguf` package: a tiny complete Gemma 3, or a full-size one without data.

`write_tiny_gguf` has real (random) tensors, small enough to load in tests. `write_gguf_without_data` declares
every tensor of a real-size model in the header and then extends the file to its full length without writing
the data region (a sparse file: the size is there, the disk blocks are not), so a reader that only needs the
header is fast on it and one that reads tensor data would take many seconds and gigabytes of memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

GEMMA3_PARTS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
                "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm")


def _tokens(n: int) -> tuple[list[str], list[int]]:
    """Control, byte and a few ordinary pieces, padded with made-up ones to `n` (at least 263)."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)] + ["▁", "a", "b"]
    types = [3, 3, 3, 2] + [6] * 256 + [1, 1, 1]
    tokens += [f"tok{i}" for i in range(n - len(tokens))]
    types += [1] * (n - len(types))
    return tokens, types


def _header(writer, hidden: int, layers: int, ffn: int, heads: int, kv_heads: int, head_dim: int, context: int,
            window: int, n_tokens: int, name: str | None) -> int:
    if name:
        writer.add_name(name)
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_sliding_window(window)
    writer.add_tokenizer_model("llama")
    tokens, types = _tokens(n_tokens)
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    return len(tokens)


def _shapes(n_tokens: int, hidden: int, layers: int, ffn: int, heads: int, kv_heads: int,
            head_dim: int) -> dict[str, tuple[int, ...]]:
    """Torch-order shapes of every tensor of a Gemma 3 text model, under GGUF names."""
    q, kv = heads * head_dim, kv_heads * head_dim
    per_layer = {"attn_norm": (hidden,), "attn_q": (q, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden),
                 "attn_output": (hidden, q), "attn_q_norm": (head_dim,), "attn_k_norm": (head_dim,),
                 "post_attention_norm": (hidden,), "ffn_norm": (hidden,), "ffn_gate": (ffn, hidden),
                 "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn), "post_ffw_norm": (hidden,)}
    shapes = {"token_embd.weight": (n_tokens, hidden), "output_norm.weight": (hidden,)}
    for layer in range(layers):
        for part, shape in per_layer.items():
            shapes[f"blk.{layer}.{part}.weight"] = shape
    return shapes


def write_tiny_gguf(path: Path) -> Path:
    """A small but complete gemma3 GGUF (1 layer, width 16, 263 tokens, random fp32 tensors)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "gemma3")
    n = _header(writer, hidden=16, layers=1, ffn=32, heads=2, kv_heads=1, head_dim=8, context=64, window=4,
                n_tokens=263, name=None)
    gen = torch.Generator().manual_seed(0)
    for name, shape in _shapes(n, 16, 1, 32, 2, 1, 8).items():
        writer.add_tensor(name, torch.randn(shape, generator=gen).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_gguf_without_data(path: Path, *, hidden: int, layers: int, ffn: int, heads: int, kv_heads: int,
                            head_dim: int, n_tokens: int, name: str = "big-test-model") -> int:
    """A gemma3 GGUF whose header declares full-size fp32 tensors and whose data region is a hole of the right
    length (nothing written there). Returns the bytes of tensor data the header declares."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "gemma3")
    n = _header(writer, hidden=hidden, layers=layers, ffn=ffn, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                context=8192, window=1024, n_tokens=n_tokens, name=name)
    total = 0
    for tensor, shape in _shapes(n, hidden, layers, ffn, heads, kv_heads, head_dim).items():
        nbytes = int(np.prod(shape)) * 4
        writer.add_tensor_info(tensor, shape, np.dtype(np.float32), nbytes)
        total += -(-nbytes // writer.data_alignment) * writer.data_alignment
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    header = path.stat().st_size
    data_start = -(-header // writer.data_alignment) * writer.data_alignment
    os.truncate(path, data_start + total)  # the data region: a hole, read back as zeros if anything reads it
    return total
