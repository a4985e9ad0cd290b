"""GGML quant layouts and vectorised torch dequantisers.

Each dequantiser turns a ``(n_blocks, bytes_per_block)`` uint8 tensor into ``(n_blocks,
values_per_block)`` float32 with vectorised torch ops over chunks of many blocks (no Python
loop over blocks): the Gemma 3 270M Q4_K_M file takes ~1 s of CPU, under half of gguf's numpy
time, and the same code runs bit-identically on CUDA.

The results are bit-identical to ``gguf.quants.dequantize`` (llama.cpp's numpy reference, our
test oracle). That only holds if every float32 operation happens in the same order as there,
so each function below mirrors the reference's arithmetic: e.g. Q4_K computes
``(d * sc) * q - (dmin * m)`` and never ``d * (sc * q)``. Integer steps (unpacking bits,
subtracting offsets) are exact and may be done in any order.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import numpy as np
import torch

from gemmakit.errors import FormatError

QK_K = 256  # values per k-quant super-block

# ggml type id -> name, every type llama.cpp can still write (ggml.h `enum ggml_type`).
# Ids 4, 5 and 31-33, 36-38 were removed from ggml and are rejected as unknown.
GGML_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
    22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}
_ID = {name: type_id for type_id, name in GGML_TYPES.items()}

# ggml type id -> (values per block, bytes per block); same numbers as gguf's GGML_QUANT_SIZES.
# Kept here (not imported) so the reader can size every tensor, even ones we cannot dequantise.
BLOCK_SIZES: dict[int, tuple[int, int]] = {
    _ID["F32"]: (1, 4), _ID["F16"]: (1, 2), _ID["BF16"]: (1, 2), _ID["F64"]: (1, 8),
    _ID["I8"]: (1, 1), _ID["I16"]: (1, 2), _ID["I32"]: (1, 4), _ID["I64"]: (1, 8),
    _ID["Q4_0"]: (32, 18), _ID["Q4_1"]: (32, 20), _ID["Q5_0"]: (32, 22), _ID["Q5_1"]: (32, 24),
    _ID["Q8_0"]: (32, 34), _ID["Q8_1"]: (32, 40),
    _ID["Q2_K"]: (QK_K, 84), _ID["Q3_K"]: (QK_K, 110), _ID["Q4_K"]: (QK_K, 144),
    _ID["Q5_K"]: (QK_K, 176), _ID["Q6_K"]: (QK_K, 210), _ID["Q8_K"]: (QK_K, 292),
    _ID["IQ2_XXS"]: (QK_K, 66), _ID["IQ2_XS"]: (QK_K, 74), _ID["IQ3_XXS"]: (QK_K, 98),
    _ID["IQ1_S"]: (QK_K, 50), _ID["IQ4_NL"]: (32, 18), _ID["IQ3_S"]: (QK_K, 110),
    _ID["IQ2_S"]: (QK_K, 82), _ID["IQ4_XS"]: (QK_K, 136), _ID["IQ1_M"]: (QK_K, 56),
    _ID["TQ1_0"]: (QK_K, 54), _ID["TQ2_0"]: (QK_K, 66), _ID["MXFP4"]: (32, 17),
    _ID["NVFP4"]: (64, 36), _ID["Q1_0"]: (128, 18),
}

# Non-linear 4-bit codebook shared by IQ4_NL and IQ4_XS (ggml-common.h kvalues_iq4nl).
_IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

# Chunking (values per chunk), chosen per call by _chunk_values(). Measured on the 270M file
# and on random tensors:
# - Small CPU chunks keep every temporary below torch's intra-op grain size (32768 elements),
#   so each op runs on the calling thread and never opens an OpenMP region. With 2 cores
#   shared with other busy processes (load ~8) this took ~2 s for the whole file, while
#   2^18-value or whole-tensor chunks took 0.5 s on the idle machine but 5-28 s under that
#   load (OpenMP threads waiting on descheduled peers). 24576 = 96 super-blocks.
# - With many threads OpenMP pays: on an idle 16-core machine 2^22-value chunks ran Q8_0 at
#   2.2 Gvalues/s against 0.29 for the small serial chunks (Q5_0: 0.59 vs 0.11).
# - On accelerators small chunks only add kernel launches; big ones just bound peak memory.
_CHUNK_VALUES = 24576
_CHUNK_VALUES_PARALLEL = 1 << 22
_CHUNK_VALUES_ACCELERATOR = 1 << 26
_MIN_THREADS_FOR_PARALLEL = 4  # with 2 threads the gain is <=2x and the risk above is 20x


def type_name(ggml_type: int) -> str:
    """Human name of a ggml type id, for messages (unknown ids print as ``type 99``)."""
    return GGML_TYPES.get(ggml_type, f"type {ggml_type}")


# ---------------------------------------------------------------- field helpers


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte ``start`` of every block, as float32 of shape (n, 1)."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _split_bits(x: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """(..., k) bytes -> (..., len(shifts), k): ``(x >> s) & mask`` for each s, as uint8.

    Works on 8 bytes at a time (x viewed as int64, mask repeated in every byte), so one shift
    and one AND unpack a whole field: ~2.5x faster than shifting byte tensors one by one for
    the 4- and 8-way splits of the k-quants.
    Needs k % 8 == 0, which holds for every quant field it is used on.
    """
    x = x.contiguous()
    if x.storage_offset() % 8:
        x = x.clone()  # an int64 view needs an 8-byte aligned start
    words = x.view(torch.int64).unsqueeze(-2)
    out = (words >> _shift_column(shifts, x.device)) & (mask * 0x0101010101010101)
    return out.view(torch.uint8)


@functools.cache
def _shift_column(shifts: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(shifts, dtype=torch.int64, device=device).reshape(-1, 1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 2, k): all low nibbles, then all high nibbles (ggml order).

    Two plain byte ops: for a 2-way split that beats ``_split_bits`` (measured)."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _shifted(x: torch.Tensor, shifts: list[int], dim: int) -> torch.Tensor:
    """``x >> s`` for every s, stacked as a new axis at ``dim`` (for the few-byte scale fields)."""
    return torch.stack([x >> s for s in shifts], dim=dim)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte 6-bit scales/mins of Q4_K and Q5_K into two (n, 8) uint8 tensors.

    Bytes 0-3 hold sc0-3 (low 6 bits), 4-7 hold m0-3, 8-11 hold the low 4 bits of sc4-7 and
    m4-7 in their two nibbles; the top 2 bits of bytes 0-7 are the high bits of sc4-7/m4-7.
    """
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return sc, mn


# ---------------------------------------------------------------- per-type block decoders


# Each decoder writes its blocks into ``out`` (float32, (n_blocks, values_per_block)) with its
# last op, saving a copy. Small ints enter float ops directly (int8/uint8 * float32 promotes,
# converting exactly), which equals the reference's explicit astype(float32) first.


def _q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(b, 0)
    q = _nibbles(b[:, 2:18]).reshape(-1, 32).to(torch.int8) - 8
    torch.mul(d, q, out=out)


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 4:20]).reshape(-1, 32)
    torch.add(d * q, m, out=out)


def _q5_bits(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """5-bit values of Q5_0/Q5_1: low nibbles from qs, bit 4 from the little-endian u32 qh."""
    bits = qh.contiguous().view(torch.int32) >> torch.arange(32, dtype=torch.int32, device=qh.device)
    return _nibbles(qs).reshape(-1, 32) | ((bits & 1).to(torch.uint8) << 4)


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(b, 0)
    q = _q5_bits(b[:, 2:6], b[:, 6:22]).to(torch.int8) - 16
    torch.mul(d, q, out=out)


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _q5_bits(b[:, 4:8], b[:, 8:24])
    torch.add(d * q, m, out=out)


def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    torch.mul(b[:, 2:34].view(torch.int8), _f16(b, 0), out=out)


def _q2_k(b: torch.Tensor, out: torch.Tensor) -> None:
    scales, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F)).reshape(-1, 16, 1)
    ml = (dmin * (scales >> 4)).reshape(-1, 16, 1)
    q = _split_bits(qs.reshape(-1, 2, 32), (0, 2, 4, 6), 0x03).reshape(-1, 16, 16)
    torch.sub(dl * q, ml, out=out.view(-1, 16, 16))


def _q3_k(b: torch.Tensor, out: torch.Tensor) -> None:
    hmask, qs, scales = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    low = _nibbles(scales[:, 0:8]).reshape(-1, 16)
    high = _shifted(scales[:, 8:12], [0, 2, 4, 6], dim=1).reshape(-1, 16) & 0x03
    sc = (low | (high << 4)).to(torch.int8) - 32
    dl = (d * sc).reshape(-1, 16, 1)
    ql = _split_bits(qs.reshape(-1, 2, 32), (0, 2, 4, 6), 0x03).reshape(-1, 16, 16)
    qh = _split_bits(hmask, tuple(range(8)), 0x01).reshape(-1, 16, 16)
    q = ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)  # a set mask bit means "no -4"
    torch.mul(dl, q, out=out.view(-1, 16, 16))


def _sub_block_scales_k4(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K and Q5_K's per-sub-block multiplier and offset, (n, 8, 1) each: value = dl * q - ml."""
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    return (d * sc).reshape(-1, 8, 1), (dmin * mn).reshape(-1, 8, 1)


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    dl, ml = _sub_block_scales_k4(b)
    q = _nibbles(b[:, 16:144].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    torch.sub(dl * q, ml, out=out.view(-1, 8, 32))


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    dl, ml = _sub_block_scales_k4(b)
    ql = _nibbles(b[:, 48:176].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    qh = _split_bits(b[:, 16:48], tuple(range(8)), 0x01).reshape(-1, 8, 32)
    torch.sub(dl * (ql | (qh << 4)), ml, out=out.view(-1, 8, 32))


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    ql, qh = b[:, 0:128], b[:, 128:192]
    scales = b[:, 192:208].view(torch.int8)
    d = (_f16(b, 208) * scales).reshape(-1, 16, 1)
    low = _nibbles(ql.reshape(-1, 2, 64)).reshape(-1, 8, 32)
    high = _split_bits(qh.reshape(-1, 2, 32), (0, 2, 4, 6), 0x03).reshape(-1, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(-1, 16, 16)
    torch.mul(d, q, out=out.view(-1, 16, 16))


def _q8_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # {float d; int8 qs[256]; int16 bsums[16]}; bsums are only used by dot products.
    d = b[:, 0:4].contiguous().view(torch.float32)
    torch.mul(d, b[:, 4:260].view(torch.int8), out=out)


_IQ4_TABLES: dict[torch.device, torch.Tensor] = {}


def _iq4_lookup(idx: torch.Tensor) -> torch.Tensor:
    """IQ4 codebook values for 4-bit indices, as float32 of idx's shape.

    index_select with int32 indices, because on CPU advanced indexing and torch.take run an
    OpenMP loop even for small chunks and were measured 100x slower with 2 threads.
    """
    table = _IQ4_TABLES.get(idx.device)
    if table is None:
        table = torch.tensor(_IQ4NL_VALUES, dtype=torch.float32, device=idx.device)
        _IQ4_TABLES[idx.device] = table
    return table.index_select(0, idx.reshape(-1).to(torch.int32)).reshape(idx.shape)


def _iq4_nl(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(b, 0)
    torch.mul(d, _iq4_lookup(_nibbles(b[:, 2:18]).reshape(-1, 32)), out=out)


def _iq4_xs(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(b, 0)
    scales_h = b[:, 2:4].contiguous().view(torch.int16).to(torch.int32)  # (n, 1)
    low = _shifted(b[:, 4:8], [0, 4], dim=2).reshape(-1, 8) & 0x0F
    shifts = torch.arange(0, 16, 2, dtype=torch.int32, device=b.device)
    high = ((scales_h >> shifts) & 0x03).to(torch.uint8)
    sc = (low | (high << 4)).to(torch.int8) - 32
    dl = (d * sc).reshape(-1, 8, 1)
    qs = _iq4_lookup(_nibbles(b[:, 8:136].reshape(-1, 8, 16)).reshape(-1, 8, 32))
    torch.mul(dl, qs, out=out.view(-1, 8, 32))


_BLOCK_DECODERS: dict[int, Callable[[torch.Tensor, torch.Tensor], None]] = {
    _ID["Q4_0"]: _q4_0, _ID["Q4_1"]: _q4_1, _ID["Q5_0"]: _q5_0, _ID["Q5_1"]: _q5_1,
    _ID["Q8_0"]: _q8_0, _ID["Q2_K"]: _q2_k, _ID["Q3_K"]: _q3_k, _ID["Q4_K"]: _q4_k,
    _ID["Q5_K"]: _q5_k, _ID["Q6_K"]: _q6_k, _ID["Q8_K"]: _q8_k, _ID["IQ4_NL"]: _iq4_nl,
    _ID["IQ4_XS"]: _iq4_xs,
}

# Plain element types: reinterpret the bytes, then convert to float32.
_PLAIN_DTYPES: dict[int, torch.dtype] = {
    _ID["F32"]: torch.float32, _ID["F16"]: torch.float16, _ID["F64"]: torch.float64,
    _ID["I8"]: torch.int8, _ID["I16"]: torch.int16, _ID["I32"]: torch.int32,
    _ID["I64"]: torch.int64,
}

SUPPORTED_TYPES: frozenset[int] = frozenset(
    {*_BLOCK_DECODERS, *_PLAIN_DTYPES, _ID["BF16"]}
)


# ---------------------------------------------------------------- public entry point


def _as_byte_tensor(raw: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A flat uint8 torch view of ``raw`` without copying (read-only numpy input included)."""
    if isinstance(raw, torch.Tensor):
        if raw.dtype != torch.uint8:
            raise TypeError(f"dequantize: expected a uint8 tensor of raw bytes, got {raw.dtype}")
        flat = raw.reshape(-1)
        # dtype views (fp16/f32 fields, plain types) need an aligned start within the storage
        return flat.clone() if flat.storage_offset() % 8 else flat
    arr = np.asarray(raw)
    if arr.dtype != np.uint8:
        raise TypeError(f"dequantize: expected a uint8 array of raw bytes, got {arr.dtype}")
    arr = arr.reshape(-1)
    if arr.flags.writeable:
        return torch.from_numpy(arr)
    # A read-only view (e.g. of a memory-mapped file) is safe here: nothing below writes to
    # its input, so torch's "not writable" warning would only be noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)


def dequantize(
    raw: np.ndarray | torch.Tensor, ggml_type: int, shape: tuple[int, ...]
) -> torch.Tensor:
    """Decode the raw bytes of one ggml tensor into a float32 tensor of ``shape``.

    ``raw`` holds exactly the tensor's bytes (``n_elements / block * bytes_per_block``); the
    result is a new tensor on ``raw``'s device that never aliases ``raw``. Raises FormatError
    for types we cannot decode and for byte counts that do not match the shape.
    """
    name = type_name(ggml_type)
    if ggml_type not in SUPPORTED_TYPES:
        known = ", ".join(GGML_TYPES[t] for t in sorted(SUPPORTED_TYPES))
        raise FormatError(f"cannot dequantise ggml type {name}: supported types are {known}")
    block, type_size = BLOCK_SIZES[ggml_type]
    shape = tuple(int(s) for s in shape)
    n_values = int(np.prod(shape, dtype=object)) if shape else 1
    if n_values % block:
        raise FormatError(
            f"{name} tensor of shape {shape}: {n_values} values is not a multiple of the "
            f"block size {block}"
        )
    flat = _as_byte_tensor(raw)
    n_blocks = n_values // block
    if flat.numel() != n_blocks * type_size:
        raise FormatError(
            f"{name} tensor of shape {shape}: expected {n_blocks * type_size} bytes "
            f"({n_blocks} blocks of {type_size}), found {flat.numel()}"
        )
    if ggml_type in _PLAIN_DTYPES:
        values = flat.view(_PLAIN_DTYPES[ggml_type])
        return values.to(torch.float32, copy=True).reshape(shape)
    if ggml_type == _ID["BF16"]:
        # bf16 is the top half of an fp32: shift the bits up (exact, NaN payloads included).
        bits = flat.view(torch.int16).to(torch.int32) << 16
        return bits.view(torch.float32).reshape(shape)
    return _dequantize_blocks(flat.view(n_blocks, type_size), ggml_type, block).reshape(shape)


def _chunk_values(device: torch.device) -> int:
    """How many values to decode per step on ``device`` (see the measurements at the top)."""
    if device.type != "cpu":
        return _CHUNK_VALUES_ACCELERATOR
    if torch.get_num_threads() >= _MIN_THREADS_FOR_PARALLEL:
        return _CHUNK_VALUES_PARALLEL
    return _CHUNK_VALUES


def _dequantize_blocks(blocks: torch.Tensor, ggml_type: int, block: int) -> torch.Tensor:
    """Run the type's block decoder over chunks of blocks, each writing its slice of one output."""
    decode = _BLOCK_DECODERS[ggml_type]
    n_blocks = blocks.shape[0]
    out = torch.empty((n_blocks, block), dtype=torch.float32, device=blocks.device)
    step = max(1, _chunk_values(blocks.device) // block)
    for start in range(0, n_blocks, step):
        decode(blocks[start : start + step], out[start : start + step])
    return out
