"""Linears that keep a GGUF file's own quantised blocks (Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K) and compute with them.

Why: a Q4_K_M file's layers are 4.5-6.5 bits a weight; re-quantising them to int8 doubles the bytes every decode
step reads, and computes a model that is not the file's. A `BlockLinear` holds the rows of blocks exactly as the
file stores them (a zero-copy view of its memory map, or of a converted file) and multiplies with the native
block kernels (`gemmakit/decoding/native/blocks.h`): activations are rounded to int8 in blocks of 32 with one fp32
scale (the error bound is derived and tested in tests/decoding/test_block_kernels.py), the integer dot products
are exact, and each output row is computed alone, so a row's result does not depend on the other rows of a call
taking the same path (the path follows the call's row count, as below).
From GEMM_ROWS rows (a prompt chunk), on AVX512-VNNI, the native int8 GEMM multiplies the weight's own codes instead
(gemm.cpp; activations rounded as above, outputs per row, so still batch-independent); from PROMPT_ROWS rows, Q6_K
or a build without VNNI decodes the weight to bf16 (into the thread's reused buffer, gemmakit/scratch.py) for torch's
GEMM (bf16 activations, like int8 layers' prompts). Without the native library, or when gradients are needed
(salience), the weight is decoded to float.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.scratch import weight_buffer
from gemmakit.weights.gguf_quants import BLOCK_SIZES, dequantize, type_name
from gemmakit.weights.raw import RawTensor

# From this many rows (a prompt chunk) a product runs a GEMM (gemm.cpp, or the weight decoded for torch's bf16 one).
# On a [9216, 2304] matrix (2 threads) the multi-row block kernels ran 65-91 GMAC/s at any row count; decoding +
# bf16 GEMM ran 28-55 GMAC/s at 64 rows, 68-89 at 128 (even) and 144-152 at 512; at 512 rows the int8 GEMM ran
# 290-300 GMAC/s where decoding + bf16 GEMM ran 205 (Gemma 2 2B's Q4_K shapes: 1.37-1.45x).
PROMPT_ROWS = 128
# From this many rows the int8 GEMM (gemm.cpp) runs where it takes the type: against the multi-row block kernels it
# was 0.86-1.24x at 16 rows, 1.25-2.16x at 32 and 1.8-2.6x at 64 (Gemma 2 2B's and the real 270M's shapes).
GEMM_ROWS = 32

# ggml type ids the native kernels compute with
BLOCK_TYPES = {"Q4_0": 2, "Q5_0": 6, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}


class BlockLinear(nn.Module):
    """y = x W^T with W [out, in] as ggml blocks: `weight_blocks` uint8 [out, row_bytes], `block_type` [ggml id]."""

    def __init__(self, weight_blocks: torch.Tensor, block_type: torch.Tensor | int) -> None:
        super().__init__()
        ggml_type = int(block_type)
        if ggml_type not in BLOCK_TYPES.values():
            raise ValueError(f"BlockLinear: ggml type {type_name(ggml_type)} has no native kernel")
        block, size = BLOCK_SIZES[ggml_type]
        if weight_blocks.dtype != torch.uint8 or weight_blocks.dim() != 2 or weight_blocks.shape[1] % size:
            raise ValueError(f"BlockLinear: expected uint8 rows of whole {type_name(ggml_type)} blocks, got "
                             f"{weight_blocks.dtype} {list(weight_blocks.shape)}")
        self.ggml_type = ggml_type
        self.out_features = weight_blocks.shape[0]
        self.in_features = weight_blocks.shape[1] // size * block
        self.register_buffer("weight_blocks", weight_blocks)
        self.register_buffer("block_type", torch.tensor([ggml_type], dtype=torch.int64))

    @staticmethod
    def supports(raw: RawTensor) -> bool:
        """True for a 2-D tensor of a type the kernels compute with, in whole blocks per row."""
        if raw.ggml_type not in BLOCK_TYPES.values() or len(raw.shape) != 2:
            return False
        return raw.shape[1] % BLOCK_SIZES[raw.ggml_type][0] == 0

    @classmethod
    def from_raw(cls, raw: RawTensor) -> BlockLinear:
        """The tensor's stored rows, not decoded (zero-copy when `raw` views a file's map)."""
        return cls(raw.blocks(), raw.ggml_type)

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight decoded to [out, in] in `dtype`."""
        return dequantize(self.weight_blocks, self.ggml_type, (self.out_features, self.in_features)).to(dtype)

    def dequantized_rows(self, rows: torch.Tensor) -> torch.Tensor:
        picked = self.weight_blocks[rows.reshape(-1)]
        return dequantize(picked, self.ggml_type, (picked.shape[0], self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from gemmakit.decoding.native import kernels

        flat = x.reshape(-1, self.in_features)
        if not (torch.is_grad_enabled() and x.requires_grad) and kernels.has_block_kernels():
            rows = flat.shape[0]
            y = kernels.block_gemm(self.ggml_type, self.weight_blocks, flat) if rows >= GEMM_ROWS else None
            if y is None and rows >= PROMPT_ROWS:  # compute-bound: the weight decoded for torch's bf16 GEMM
                w = kernels.block_dequantize(self.ggml_type, self.weight_blocks, torch.bfloat16,
                                             out=weight_buffer(self.out_features, self.in_features, torch.bfloat16))
                y = F.linear(flat.to(torch.bfloat16), w)
            elif y is None:
                y = kernels.block_matvec(self.ggml_type, self.weight_blocks, flat.float())
        else:
            y = F.linear(flat.float(), self.dequantized())
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.type_name} blocks"
