"""The native LM-head kernels as plain functions of a quantised linear and activations (fp32 in, fp32 out).

The decoder's int8 head calls `int8_matvec`; the int4 kernel runs inside the rescored head, and its wrapper exists
so it can be checked against its definition on its own (tests/decoding/test_native_decode.py).
"""

from __future__ import annotations

import torch

from gemmakit.decoding.native.build import library
from gemmakit.errors import InputError
from gemmakit.quant import Int4Linear, Int8Linear


def int8_matvec(lin: Int8Linear, x: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] W^T for an int8 W with its row scales: exact products of the dequantised weights in fp32.
    `scales`: the fp32 copy of `lin.scales` when the caller keeps one (a 262k-row head's is 1 MB to convert)."""
    lib = library()
    x = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
    scales = (lin.scales.float() if scales is None else scales).contiguous()
    y = torch.empty(x.shape[0], lin.out_features)
    lib.gk_int8_matvec(lin.weight_int8.data_ptr(), scales.data_ptr(), lin.out_features, lin.in_features,
                       x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads())
    return y


def int4_matvec(lin: Int4Linear, x: torch.Tensor) -> torch.Tensor:
    """x [M, K] W^T for an int4 W in torch's CPU layout, with x rounded to int8 per group of inputs (VNNI)."""
    lib = library()
    if not lib.gk_has_int4_matvec() or lin.scales_zeros.dtype != torch.bfloat16:
        raise InputError("the native int4 kernel needs AVX512-VNNI and bf16 (scale, zero) pairs")
    x = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], lin.out_features)
    done = lib.gk_int4_matvec(lin.weight_int4.data_ptr(), lin.scales_zeros.data_ptr(), lin.out_features,
                              lin.in_features, lin.group, x.data_ptr(), x.shape[0], y.data_ptr(),
                              torch.get_num_threads())
    if done != 0:
        raise InputError(f"the native int4 kernel does not take a [{lin.out_features}, {lin.in_features}] weight "
                         f"with groups of {lin.group}")
    return y
