"""The ctypes mirrors of the native library's structs (`common.h`), checked against the compiler's own layout.

Why a check: ctypes lays a Structure out from the field list written here, the compiler from the C++; if one
side gains or reorders a field, the library reads garbage pointers and the process crashes far from the cause.
`check(lib)` compares every size and offset with what `gk_abi` (abi.cpp) reports, once, when the library loads.
"""

from __future__ import annotations

import ctypes

from gemmakit.errors import GemmaKitError

_ptr = ctypes.c_void_p
_i64 = ctypes.c_int64
_f32 = ctypes.c_float


class Matrix(ctypes.Structure):
    """GkMatrix: one weight matrix, gemmakit's int8 rows with fp32 scales (type INT8_ROWS) or ggml blocks (type =
    the ggml type id, no scales)."""

    _fields_ = [("data", _ptr), ("scales", _ptr), ("type", _i64)]


INT8_ROWS = -1  # Matrix.type of gemmakit's int8 weights (kInt8Rows in common.h)


class Layer(ctypes.Structure):
    """GkLayer: one layer's matrices, norm multipliers (1 + w) and its KV buffers."""

    _fields_ = [(name, Matrix) for name in ("wq", "wk", "wv", "wo", "wg", "wu", "wd")] + \
               [(name, _ptr) for name in ("input_norm", "post_attn_norm", "pre_ffw_norm", "post_ffw_norm",
                                          "q_norm", "k_norm", "keys", "values")] + [("slots", _i64), ("sliding", _i64)]


class Model(ctypes.Structure):
    """GkModel: sizes, the layers, rope tables, the cache's row bookkeeping and the int8 embedding table."""

    _fields_ = [(name, _i64) for name in ("batch", "hidden", "heads", "kv_heads", "head_dim", "intermediate",
                                          "num_layers")] + \
               [("eps", _f32), ("scale", _f32), ("attn_softcap", _f32), ("layers", ctypes.POINTER(Layer))] + \
               [(name, _ptr) for name in ("cos_local", "sin_local", "cos_global", "sin_global", "pad",
                                          "ring_times")] + \
               [("ring", _i64), ("ring_stride", _i64), ("embed_table", _ptr), ("embed_scales", _ptr),
                ("normaliser", _f32)]


class Head(ctypes.Structure):
    """GkHead: int8-rescore's decode-time LM head (final norm, int4 candidate head, int8 table, 3-bit ranker)."""

    _fields_ = [("norm", _ptr), ("eps", _f32), ("packed", _ptr), ("scales_zeros", _ptr),
                ("n", _i64), ("k", _i64), ("group", _i64), ("table", _ptr), ("table_scale", _ptr),
                ("candidates", _i64), ("ranker", _ptr), ("final_softcap", _f32)]


STRUCTS: tuple[type[ctypes.Structure], ...] = (Matrix, Layer, Model, Head)  # in gk_abi's order


def expected_layout() -> list[int]:
    """What gk_abi must report: per struct, its size, then each field's offset in declaration order."""
    layout: list[int] = []
    for struct in STRUCTS:
        layout.append(ctypes.sizeof(struct))
        layout += [getattr(struct, name).offset for name, _ in struct._fields_]
    return layout


def check(lib: ctypes.CDLL) -> None:
    """Raise if the library's struct layouts differ from these mirrors (a mismatch would corrupt memory)."""
    expected = expected_layout()
    out = (_i64 * (len(expected) + 16))()
    lib.gk_abi.argtypes = [ctypes.POINTER(_i64), _i64]
    lib.gk_abi.restype = _i64
    count = lib.gk_abi(out, len(out))
    reported = list(out[:max(count, 0)])
    if reported != expected:
        raise GemmaKitError(f"the native library's struct layout ({count} values: {reported}) differs from "
                            f"gemmakit/decoding/native/abi.py's ({len(expected)} values: {expected}); the C++ "
                            "structs in common.h and their ctypes mirrors must change together")


def bind_functions(lib: ctypes.CDLL) -> None:
    """Declare the exported functions' signatures, so ctypes converts and checks every argument."""
    lib.gk_decode_step.argtypes = [ctypes.POINTER(Model), _ptr, _ptr, _ptr, _ptr, _i64, ctypes.c_int]
    lib.gk_decode_step.restype = ctypes.c_int
    lib.gk_greedy_step.argtypes = [ctypes.POINTER(Model), ctypes.POINTER(Head), _ptr, _ptr, _ptr, _i64, _ptr, _ptr,
                                   _ptr, ctypes.c_int]
    lib.gk_greedy_step.restype = ctypes.c_int
    lib.gk_rescored_head.argtypes = [_ptr, _i64, ctypes.POINTER(Head), _ptr, ctypes.c_int, _ptr, ctypes.c_int]
    lib.gk_rescored_head.restype = ctypes.c_int
    lib.gk_int4_matvec.argtypes = [_ptr, _ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, ctypes.c_int]
    lib.gk_int4_matvec.restype = ctypes.c_int
    lib.gk_int8_matvec.argtypes = [_ptr, _ptr, _i64, _i64, _ptr, _i64, _ptr, ctypes.c_int]
    lib.gk_int8_matvec.restype = None
    lib.gk_argmax.argtypes = [_ptr, _i64, _i64, _ptr]
    lib.gk_argmax.restype = None
    lib.gk_has_int4_matvec.argtypes = []
    lib.gk_has_int4_matvec.restype = ctypes.c_int
    for name in ("gk_block_matvec", "gk_block_matvec_scalar"):  # blocks.cpp
        getattr(lib, name).argtypes = [_i64, _ptr, _i64, _i64, _ptr, _i64, _ptr, ctypes.c_int]
        getattr(lib, name).restype = ctypes.c_int
    lib.gk_block_dequantize.argtypes = [_i64, _ptr, _i64, _i64, _ptr, _ptr, ctypes.c_int]  # dequant.cpp
    lib.gk_block_dequantize.restype = ctypes.c_int
    lib.gk_block_gemm.argtypes = [_i64, _ptr, _i64, _i64, _ptr, _i64, _ptr, ctypes.c_int]  # gemm.cpp
    lib.gk_block_gemm.restype = ctypes.c_int
    lib.gk_quantize_act.argtypes = [_ptr, _i64, _ptr, _ptr, _ptr]
    lib.gk_quantize_act.restype = None
    lib.gk_bf16_norm_rope.argtypes = [_ptr, _i64, _i64, _i64, _ptr, ctypes.c_float, _ptr, _ptr, _ptr, ctypes.c_int]
    lib.gk_bf16_norm_rope.restype = ctypes.c_int  # prompt.cpp
    lib.gk_bf16_geglu.argtypes = [_ptr, _ptr, _i64, _ptr, ctypes.c_int]
    lib.gk_bf16_geglu.restype = None
    lib.gk_block_kernels_vnni.argtypes = []
    lib.gk_block_kernels_vnni.restype = ctypes.c_int
