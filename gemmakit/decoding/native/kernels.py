"""The native LM-head kernels as plain functions of a quantised linear and activations (fp32 in, fp32 out).

The decoder's int8 head calls `int8_matvec`; the int4 kernel runs inside the rescored head, and its wrapper exists
so it can be checked against its definition on its own (tests/decoding/test_native_decode.py). `block_matvec`
multiplies by a GGUF tensor's own blocks, `block_gemm` does it for a prompt's many rows (gemmakit/blocks.py's
BlockLinear; both checked in tests/decoding/test_block_kernels.py).
"""

from __future__ import annotations

import torch

from gemmakit.blocks import BLOCK_TYPES
from gemmakit.decoding.native.build import library
from gemmakit.errors import InputError
from gemmakit.quant import Int4Linear, Int8Linear
from gemmakit.weights.gguf_quants import BLOCK_SIZES, type_name

# ggml type ids the block kernels (blocks.h) compute with
BLOCK_KERNEL_TYPES = frozenset(BLOCK_TYPES.values())


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


def has_block_kernels() -> bool:
    """True when the native library is available: its block kernels (blocks.cpp) are always built, with the VNNI
    path or the scalar one, which compute the same integers."""
    return library() is not None


def block_matvec(ggml_type: int, blocks: torch.Tensor, x: torch.Tensor, *, scalar: bool = False) -> torch.Tensor:
    """x [M, cols] W^T -> [M, rows] for W stored as ggml blocks, uint8 [rows, row_bytes] exactly as a GGUF holds it.

    x is rounded to int8 in blocks of 32 values (one fp32 scale each) and every block's integer dot product is exact;
    each output is a function of its own weight row and activation row only (the same in any batch, with any thread
    count). `scalar=True` runs the portable reference kernel instead of the vector one (for tests).
    """
    lib, rows, cols = _checked_blocks("block_matvec", ggml_type, blocks)
    ggml_type = int(ggml_type)
    if x.shape[-1] != cols:
        raise InputError(f"block_matvec: activations of width {x.shape[-1]} do not match the weight's {cols} "
                         f"inputs ({type_name(ggml_type)} [{rows}, {cols}])")
    blocks = blocks.contiguous()
    x = x.reshape(-1, cols).to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], rows)
    fn = lib.gk_block_matvec_scalar if scalar else lib.gk_block_matvec
    if fn(ggml_type, blocks.data_ptr(), rows, cols, x.data_ptr(), x.shape[0], y.data_ptr(),
          torch.get_num_threads()) != 0:
        raise InputError(f"block_matvec: the native kernel refused {type_name(ggml_type)} [{rows}, {cols}]")
    return y


def block_gemm(ggml_type: int, blocks: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """x [M, cols] W^T -> [M, rows] for a prompt (gemm.cpp): int8 activations rounded as `block_matvec` rounds
    them, VNNI products over the weight's own codes. None where the kernel does not run (a build without
    AVX512-VNNI, Q6_K): the caller decodes the weight for a float GEMM instead."""
    lib, rows, cols = _checked_blocks("block_gemm", ggml_type, blocks)
    x = x.reshape(-1, cols).to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], rows)
    if lib.gk_block_gemm(int(ggml_type), blocks.contiguous().data_ptr(), rows, cols, x.data_ptr(), x.shape[0],
                         y.data_ptr(), torch.get_num_threads()) != 0:
        return None
    return y


def block_dequantize(ggml_type: int, blocks: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """The block matrix decoded to [rows, cols] fp32 or bf16 (rounded to nearest even) by the native library, as
    gguf-py's `dequantize` defines the values: what a prompt's GEMM multiplies with (BlockLinear). `out`, when
    given, is a contiguous [rows, cols] tensor of `dtype` to decode into (a reused buffer: gemmakit/scratch.py)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise InputError(f"block_dequantize: dtype must be float32 or bfloat16, got {dtype}")
    lib, rows, cols = _checked_blocks("block_dequantize", ggml_type, blocks)
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype)
    elif out.shape != (rows, cols) or out.dtype != dtype or not out.is_contiguous():
        raise InputError(f"block_dequantize: out must be a contiguous {dtype} [{rows}, {cols}] tensor, got "
                         f"{out.dtype} {list(out.shape)}")
    f32, bf16 = (out.data_ptr(), None) if dtype == torch.float32 else (None, out.data_ptr())
    if lib.gk_block_dequantize(int(ggml_type), blocks.contiguous().data_ptr(), rows, cols, f32, bf16,
                               torch.get_num_threads()) != 0:
        raise InputError(f"block_dequantize: the native library refused {type_name(int(ggml_type))} [{rows}, {cols}]")
    return out


def _checked_blocks(what: str, ggml_type: int, blocks: torch.Tensor):
    """(library, rows, cols) of a block matrix, or an InputError saying what is wrong with it."""
    ggml_type = int(ggml_type)
    if ggml_type not in BLOCK_KERNEL_TYPES:
        raise InputError(f"{what}: ggml type {type_name(ggml_type)} has no native block kernel (supported: "
                         f"{', '.join(type_name(t) for t in sorted(BLOCK_KERNEL_TYPES))})")
    lib = library()
    if lib is None:
        raise InputError(f"{what}: the native library is unavailable")
    block, size = BLOCK_SIZES[ggml_type]
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % size:
        raise InputError(f"{what}: expected uint8 rows of whole {type_name(ggml_type)} blocks ({size} bytes "
                         f"each), got {blocks.dtype} {list(blocks.shape)}")
    return lib, blocks.shape[0], blocks.shape[1] // size * block


def fused_bf16_usable(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """Whether the eager forward may hand `x`'s elementwise steps (with a norm's `weight`) to the native bf16
    kernels (prompt.cpp): a contiguous CPU bf16 tensor, no gradient wanted for it or the weight, outside a
    torch.compile trace, with the library loaded. Otherwise the torch ops run (the same functions, step by step)."""
    grads = torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.is_contiguous() and not grads
            and not torch.compiler.is_compiling() and library() is not None)


def bf16_norm_rope(x: torch.Tensor, heads: int, mult: torch.Tensor | None, eps: float, cos: torch.Tensor | None,
                   signed_sin: torch.Tensor | None) -> torch.Tensor:
    """rope(bf16(rms_norm(x))) per head for x [..., T, heads * d] bf16: the norm's multiplier `mult` [d] (1 + w,
    fp32; None: no norm), cos/signed_sin [..., T, d] fp32 one row per position of x (None: no rope). Returns x's
    shape, bf16."""
    d = x.shape[-1] // heads
    rows = x.numel() // (heads * d)
    if cos is not None:
        cos, signed_sin = cos.reshape(rows, d).contiguous(), signed_sin.reshape(rows, d).contiguous()
    out = torch.empty_like(x)
    if library().gk_bf16_norm_rope(x.data_ptr(), rows, heads, d, None if mult is None else mult.contiguous().data_ptr(),
                                   eps, None if cos is None else cos.data_ptr(),
                                   None if signed_sin is None else signed_sin.data_ptr(), out.data_ptr(),
                                   torch.get_num_threads()) != 0:
        raise InputError(f"bf16_norm_rope: head size {d} is not even")
    return out


def bf16_rms_norm(x: torch.Tensor, mult: torch.Tensor, eps: float) -> torch.Tensor:
    """bf16(rms_norm(x) * mult) over the last dimension of a bf16 x, in fp32 inside (what the eager RMSNorm
    gives a bf16 input); `mult` [d] fp32 is 1 + w. (bf16_norm_rope without rope: one head a row.)"""
    return bf16_norm_rope(x, 1, mult, eps, None, None)


def bf16_geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """bf16(bf16(gelu_tanh(gate)) * up) for two bf16 tensors of one shape (what torch's gelu, then the product,
    give in bf16)."""
    out = torch.empty_like(gate)
    library().gk_bf16_geglu(gate.data_ptr(), up.contiguous().data_ptr(), gate.numel(), out.data_ptr(),
                            torch.get_num_threads())
    return out
