"""A tensor as a GGUF file stores it, not yet decoded: the unit that streaming loads pass along.

Why: decoding a whole model to fp32 before converting it needs 4 bytes per weight at once (37 GB for a 9B
model). A `RawTensor` is a zero-copy view of the file's bytes (from the reader's memory map) that is decoded
only when asked, one tensor at a time, or kept as it is: the native kernels compute with Q4_K, Q5_0, Q6_K and
Q8_0 blocks directly (`gemmakit.blocks`), so those layers are never decoded at all.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from gemmakit.errors import FormatError
from gemmakit.weights.gguf_quants import BLOCK_SIZES, dequantize, type_name


@dataclass(frozen=True)
class RawTensor:
    """One tensor's bytes as stored (`data`, read-only uint8), its ggml type and its torch-order shape.

    `shift` is added after decoding: GGUF stores Gemma's norm weights as w + 1, canonical names hold w.
    """

    data: np.ndarray
    ggml_type: int
    shape: tuple[int, ...]
    source: str = "<memory>"
    name: str = ""
    shift: float = 0.0

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The decoded tensor (a new fp32 tensor, cast to `dtype`)."""
        try:
            values = dequantize(self.data, self.ggml_type, self.shape)
        except FormatError as err:
            raise FormatError(f"{self.source}: tensor {self.name!r}: {err}") from None
        if self.shift:
            values += self.shift
        return values if dtype == torch.float32 else values.to(dtype)

    def row_bytes(self) -> int:
        """Bytes of one row (the last dimension) in the stored format."""
        block, size = BLOCK_SIZES[self.ggml_type]
        cols = self.shape[-1]
        if cols % block:
            raise FormatError(f"{self.source}: tensor {self.name!r}: rows of {cols} values are not whole "
                              f"{self.type_name} blocks of {block}")
        return cols // block * size

    def blocks(self) -> torch.Tensor:
        """The stored bytes as a uint8 tensor [rows, row_bytes], zero-copy (it keeps the file's map alive)."""
        rows = self.numel() // self.shape[-1]
        with warnings.catch_warnings():  # read-only views of the map: nothing writes through them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(self.data.reshape(-1)).view(rows, self.row_bytes())
