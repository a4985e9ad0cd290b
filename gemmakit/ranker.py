"""A 3-bit copy of the LM head that only ranks candidates for greedy decoding.

Why: a greedy token needs the largest logit, not the whole distribution. `int8-rescore` already recomputes the
top 128 candidates of a coarse head exactly from the int8 table; for sampling that coarse head is int4 (its tail
values are part of the distribution), but greedy decoding only needs the exact maximum to be among the 128.
3 bits per weight (one bf16 scale and minimum per 64 inputs) do that on the real Gemma 3 270M: over 1,436
tokens of three texts the exact int8 argmax ranked at worst 20th in the 3-bit logits (int4: 9th), with
int8 activations as the kernel uses them. The pass reads 73 MB instead of 94 MB a token.

Layout (one sequential stream for `gk_greedy_step`, see `native/decode_step.cpp`): `planes` [N/64, K/64, 4, 448]
bytes. For each block of 64 rows, each group of 64 inputs, each quarter of 16 rows:
  - 4 x 64 bytes of the codes' two low bits: chunk c (inputs 16c..16c+15), lane l (row 16 r4 + l), byte j
    holds inputs 16c + 4s + j at bits 2s..2s+1 (s = 0..3);
  - 2 x 64 bytes of their high bit: chunk c (inputs 32c..32c+31), lane l, byte j holds input 32c + 4s + j at
    bit s (s = 0..7);
  - 64 bytes of (scale, minimum) bf16 pairs, one per row: w = code * scale + minimum.
So one shift and one mask turn a vector into 16 rows x 4 consecutive inputs, ready for a VNNI dot product.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from gemmakit.weights.raw import RawTensor

GROUP = 64  # inputs per scale; the layout above is built around it
BLOCK = 64  # rows per block
QUARTER_BYTES = 4 * 64 + 2 * 64 + 64


class Int3Ranker(nn.Module):
    """The 3-bit candidate ranker of a [N, K] head (no forward: only the native greedy step reads it)."""

    def __init__(self, planes: torch.Tensor) -> None:
        super().__init__()
        if planes.dim() != 4 or planes.shape[2:] != (4, QUARTER_BYTES) or planes.dtype != torch.uint8:
            raise ValueError(f"Int3Ranker planes must be uint8 [N/64, K/64, 4, {QUARTER_BYTES}], got "
                             f"{planes.dtype} {list(planes.shape)}")
        self.register_buffer("planes", planes)
        self.out_features, self.in_features = planes.shape[0] * BLOCK, planes.shape[1] * GROUP

    @staticmethod
    def supports(weight: torch.Tensor | RawTensor) -> bool:
        """Whether a [N, K] weight fits the layout (reads only its shape: a RawTensor is not decoded)."""
        return len(weight.shape) == 2 and weight.shape[0] % BLOCK == 0 and weight.shape[1] % GROUP == 0

    @classmethod
    def from_weight(cls, weight: torch.Tensor, rows_per_chunk: int = 16384) -> Int3Ranker:
        """Round each group of 64 inputs to 8 levels between its minimum and maximum (bf16 scale and minimum,
        the codes computed against the rounded pair). Converted in chunks of rows to bound memory."""
        if not cls.supports(weight):
            raise ValueError(f"Int3Ranker needs rows divisible by {BLOCK} and inputs by {GROUP}, got "
                             f"{list(weight.shape)}")
        chunks = [pack(*quantize(weight[i:i + rows_per_chunk].float()))
                  for i in range(0, weight.shape[0], rows_per_chunk)]
        return cls(torch.cat(chunks))

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes [N, K] uint8 in 0..7, scale [N, K/64], minimum [N, K/64]), fp32, read back from the layout."""
        return unpack(self.planes)

    def dequantized(self) -> torch.Tensor:
        codes, scale, minimum = self.unpacked()
        n, k = codes.shape
        w = codes.view(n, k // GROUP, GROUP).float() * scale[..., None] + minimum[..., None]
        return w.view(n, k)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, in_features={self.in_features}, bits=3, group={GROUP}"


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes [N, K] (0..7), scale and minimum [N, K/64] (fp32 values of bf16) for fp32 weights [N, K]."""
    n, k = w.shape
    groups = w.view(n, k // GROUP, GROUP)
    minimum = groups.amin(-1).bfloat16().float()
    scale = ((groups.amax(-1) - minimum) / 7).clamp_min(1e-30).bfloat16().float()
    codes = ((groups - minimum[..., None]) / scale[..., None]).round().clamp(0, 7).to(torch.uint8)
    return codes.view(n, k), scale, minimum


def pack(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """The layout of the module docstring, [N/64, K/64, 4, 448] uint8."""
    n, k = codes.shape
    nb, g = n // BLOCK, k // GROUP
    q = codes.view(nb, 4, 16, g, GROUP)  # block, quarter, lane, group, input
    shifts2 = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    low = ((q & 3).view(nb, 4, 16, g, 4, 4, 4) << shifts2.view(4, 1)).sum(-2, dtype=torch.uint8)  # [.., c, s, j]
    shifts1 = torch.arange(8, dtype=torch.uint8)
    high = (((q >> 2) & 1).view(nb, 4, 16, g, 2, 8, 4) << shifts1.view(8, 1)).sum(-2, dtype=torch.uint8)
    low = low.permute(0, 3, 1, 4, 2, 5).reshape(nb, g, 4, 4 * 64)
    high = high.permute(0, 3, 1, 4, 2, 5).reshape(nb, g, 4, 2 * 64)
    pairs = torch.stack([scale.bfloat16().view(torch.int16), minimum.bfloat16().view(torch.int16)], dim=-1)
    pairs = pairs.view(nb, 4, 16, g, 2).permute(0, 3, 1, 2, 4).contiguous().view(torch.uint8).view(nb, g, 4, 64)
    return torch.cat([low, high, pairs], dim=-1).contiguous()


def unpack(planes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `pack` (for tests and for reading a ranker back)."""
    nb, g = planes.shape[:2]
    low = planes[..., :256].to(torch.int32).view(nb, g, 4, 4, 16, 4)  # block, group, quarter, c, lane, j
    high = planes[..., 256:384].to(torch.int32).view(nb, g, 4, 2, 16, 4)
    low_codes = (low.unsqueeze(-2) >> torch.tensor([0, 2, 4, 6], dtype=torch.int32).view(4, 1)) & 3  # [.., s, j]
    high_codes = (high.unsqueeze(-2) >> torch.arange(8, dtype=torch.int32).view(8, 1)) & 1
    # to [block, quarter, lane, group, input]
    low_codes = low_codes.permute(0, 2, 4, 1, 3, 5, 6).reshape(nb, 4, 16, g, GROUP)
    high_codes = high_codes.permute(0, 2, 4, 1, 3, 5, 6).reshape(nb, 4, 16, g, GROUP)
    codes = (low_codes | (high_codes << 2)).to(torch.uint8).view(nb * BLOCK, g * GROUP)
    pairs = planes[..., 384:].contiguous().view(torch.bfloat16).view(nb, g, 4, 16, 2).float()
    pairs = pairs.permute(0, 2, 3, 1, 4).reshape(nb * BLOCK, g, 2)
    return codes, pairs[..., 0], pairs[..., 1]
