"""One reused buffer per thread for the weights a prompt's GEMM decodes and drops.

Why: a prompt product decodes its layer's weight to bf16 (BlockLinear's blocks, Int8Linear's codes), multiplies
once, and frees it. A fresh 40 MB tensor is a fresh memory map from glibc, and its first touch page-faults every
4 KB: Gemma 2 2B's [9216, 2304] Q4_K weight decoded at 1.2 G values/s into fresh memory and at 6.5 into memory
already touched, about 1 s of a 7 s 512-token prefill. Each thread (the server's worker, a caller's) keeps one
buffer per dtype, grown to the largest weight it has decoded (42 MB for Gemma 2 2B, 103 MB for 9B).
"""

from __future__ import annotations

import threading

import torch

_local = threading.local()


def weight_buffer(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised [rows, cols] tensor in this thread's buffer for `dtype`, valid until its next call.

    Only for a weight used at once and not kept: a product that autograd records must not use it (a later call
    overwrites the buffer, which torch's version counter would then report at backward)."""
    buffers: dict[torch.dtype, torch.Tensor] = _local.__dict__.setdefault("buffers", {})
    held = buffers.get(dtype)
    if held is None or held.numel() < rows * cols:
        with torch.inference_mode(False):  # a normal tensor: an inference one could not be written outside that mode
            held = buffers[dtype] = torch.empty(rows * cols, dtype=dtype)
    return held[: rows * cols].view(rows, cols)
