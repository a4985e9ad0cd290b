"""Safetensors files whose every tensor starts on a 64-byte boundary, so a memory map serves them in place.

The safetensors writer packs tensors back to back after a header of any length, so their offsets are
multiples of 8 at best. torch's int8/int4 CPU kernels need aligned pointers (misaligned ones crashed torch
2.13), and copying a whole model out of the map to fix that costs its load time and doubles nothing but
memory. So this writer pads the header to 64 bytes and puts a `__pad.N` tensor (uint8 zeros) before each tensor
that would start off the boundary; the format forbids gaps, not extra tensors, so every safetensors reader
still opens the file. `PAD_PREFIX` names the padding so that readers can drop it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

ALIGN = 64
PAD_PREFIX = "__pad."
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
           torch.bool: "BOOL"}


def save_aligned(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write `tensors` (CPU) and string `metadata` to `path` with 64-byte aligned tensor data."""
    header: dict[str, object] = {"__metadata__": metadata}
    pieces: list[torch.Tensor | bytes] = []
    offset = 0
    for name, tensor in tensors.items():
        if name.startswith(PAD_PREFIX):
            raise ValueError(f"tensor name {name!r} is reserved for padding")
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} has no safetensors name")
        pad = -offset % ALIGN
        if pad:
            header[f"{PAD_PREFIX}{len(pieces)}"] = {"dtype": "U8", "shape": [pad],
                                                    "data_offsets": [offset, offset + pad]}
            pieces.append(bytes(pad))
            offset += pad
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        nbytes = flat.numel() * flat.element_size()
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        pieces.append(flat)
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % ALIGN)  # the data starts on a boundary too
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for piece in pieces:
            # the tensor's own buffer, not a `tobytes()` copy: converting a large model writes its 1 GB head
            f.write(piece if isinstance(piece, bytes) else memoryview(piece.view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


def without_padding(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(PAD_PREFIX)}
