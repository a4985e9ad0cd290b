"""The native kernels over a GGUF file's own blocks (gemmakit/decoding/native/blocks.h) against llama.cpp's own
dequantiser (`gguf.quants.dequantize`) times the activations in float64.

The bound each product is checked against, for one weight row w and one activation row x (k values):

1. Activation rounding. Each block b of 32 inputs is stored as x_hat = d_b * q with d_b = max|x_b| / 127 (fp32) and
   q = rint(fl(x / d_b)). |x / d_b| <= 127, so fl(x / d_b) is within 127 u of x / d_b (u = 2^-24), and
   |x - x_hat| <= d_b (1/2 + 127 u). The weights are used exactly (the kernel's integers are the file's codes), so
   |sum w x_hat - sum w x| <= sum_b d_b (1/2 + 127 u) sum_{i in b} |w_i|.
2. fp32 arithmetic. Every integer block sum is exact (int32, far from overflow). What the kernel adds in fp32 are
   terms t = (product of <= 3 rounded fp32 factors) * (an exact integer), each a partial sum over some values of
   a_i x_hat_i or of b_i x_hat_i, where w_i = a_i - b_i splits a K-quant's weight into its scaled code
   (d * sc * q) and its min (dmin * m); b = 0 and a = w for the formats without mins. Every term passes through
   at most k/16 additions (the scalar kernel's one chain, two per block with mins; the vector kernel's chains are
   shorter) and <= 6 more in the horizontal sums and the final subtraction, so with n = k/16 + 10 (3 factor
   roundings, 1 spare) the error is <= gamma_n * T, gamma_n = n u / (1 - n u), T = sum_i (|a_i| + |b_i|) |x_hat_i|
   (the standard worst-case bound on a floating-point sum of terms with relative errors). We use
   |x_hat_i| <= |x_i| + d_b.
3. The reference. gguf's dequantiser rounds d * sc * q - dmin * m once to fp32 (u (|a_i| + |b_i|) per weight); the
   float64 product adds about k 2^-53 relative: both are covered by adding 2 to n.

So |kernel - ref| <= sum_b d_b (1/2 + 127 u) sum_b |w_i| + gamma_{k/16+12} sum_i (|a_i| + |b_i|)(|x_i| + d_b).
The first term dominates (d_b / 2 is 1/254 of the block's largest activation); the second is a worst case that
random rounding errors stay far below. The bound is not vacuous: the same check against weights whose first 256
values' scales are negated fails for most rows (test_wrong_weights_fail_the_bound).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemmakit.decoding.native import kernels
from gemmakit.decoding.native.build import library, unavailable_reason
from gemmakit.errors import InputError

gguf = pytest.importorskip("gguf", reason="the reference dequantiser is llama.cpp's gguf package")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants  # noqa: E402

TYPES = {"Q4_0": 2, "Q5_0": 6, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
U = 2.0**-24


@pytest.fixture(scope="module", autouse=True)
def native() -> None:
    if library() is None:
        pytest.skip(f"the native library is unavailable: {unavailable_reason()}")


def qtype(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name]


def scale_offsets(name: str) -> tuple[int, int | None]:
    """Byte offsets, within a block, of its fp16 scale d and (K-quants with mins) its fp16 dmin."""
    return {"Q6_K": (208, None), "Q4_K": (0, 2), "Q5_K": (0, 2)}.get(name, (0, None))


def random_blocks(name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, row_bytes]: legacy types quantised by gguf from normal weights (per-row spread), K-quants random
    bytes whose fp16 d (and dmin) are overwritten with small finite values of either sign."""
    block, size = GGML_QUANT_SIZES[qtype(name)]
    if block == 32:
        w = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(0.01, 0.1, (rows, 1)).astype(np.float32)
        return np.ascontiguousarray(quants.quantize(w, qtype(name)))
    blocks = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for offset in scale_offsets(name):
        if offset is not None:
            values = rng.uniform(1e-4, 2e-3, len(blocks)) * rng.choice([-1.0, 1.0], len(blocks))
            blocks[:, offset:offset + 2] = values.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def random_activations(m: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Normal activations with a few large outliers (as Gemma's residual stream has) and an all-zero block."""
    x = rng.standard_normal((m, cols)).astype(np.float32)
    spots = rng.integers(0, cols, (m, 3))
    np.put_along_axis(x, spots, rng.uniform(20, 200, (m, 3)).astype(np.float32), axis=1)
    x[0, 32:64] = 0.0
    return x


def reference_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy's version of quantize_act: fp32 d = max|x_b| / 127, q = rint(x / d) clamped to +-127, 0 where d = 0."""
    xb = x.astype(np.float32).reshape(-1, 32)
    d = (np.abs(xb).max(axis=1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.rint(xb / d[:, None])
    q = np.where(d[:, None] == 0, 0, np.clip(r, -127, 127)).astype(np.int8)
    return q.reshape(-1), d, q.astype(np.int32).sum(axis=1).astype(np.int32)


# The code offsets of the legacy formats whose kernels add the codes' products and take the offset off apart
OFFSETS = {"Q4_0": 8, "Q5_0": 16}


def split_weights(name: str, blocks: np.ndarray, cols: int,
                  offsets: dict[str, int] = OFFSETS) -> tuple[np.ndarray, np.ndarray]:
    """(w, |a| + |b|) in float64 [rows, cols], decoded by gguf: a = the weights with dmin zeroed (d * sc * q),
    b = minus the weights with d zeroed (dmin * m); for Q4_0/Q5_0, a = d * q and b = d * offset (w = d (q - offset));
    |w| for the other formats without mins."""
    rows = blocks.shape[0]
    t = qtype(name)
    w = quants.dequantize(blocks, t).reshape(rows, cols).astype(np.float64)
    d_off, m_off = scale_offsets(name)
    size = GGML_QUANT_SIZES[t][1]
    if name in offsets:
        unit = blocks.reshape(-1, size).copy()
        d = unit[:, :2].copy().view(np.float16).astype(np.float64)  # [blocks, 1]
        unit[:, :2] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)  # d = 1: the codes minus the offset
        q = quants.dequantize(unit.reshape(rows, -1), t).reshape(-1, GGML_QUANT_SIZES[t][0]) + offsets[name]
        return w, (np.abs(d) * (q + offsets[name])).reshape(rows, cols)
    if m_off is None:
        return w, np.abs(w)
    parts = []
    for zeroed in (m_off, d_off):
        b = blocks.reshape(-1, size).copy()
        b[:, zeroed:zeroed + 2] = 0
        parts.append(quants.dequantize(b.reshape(rows, -1), t).reshape(rows, cols).astype(np.float64))
    return w, np.abs(parts[0]) + np.abs(parts[1])


def reference_and_bound(name: str, blocks: np.ndarray, x: np.ndarray,
                        offsets: dict[str, int] = OFFSETS) -> tuple[np.ndarray, np.ndarray]:
    """x W^T in float64 from gguf's dequantised W, and the bound of the module docstring, both [m, rows]."""
    m, cols = x.shape
    w, ab = split_weights(name, blocks, cols, offsets)
    x64 = x.astype(np.float64)
    d = np.stack([reference_quantize(row)[1] for row in x]).astype(np.float64)  # [m, cols/32]
    d_each = np.repeat(d, 32, axis=1)  # [m, cols]
    rounding = (d_each * (0.5 + 127 * U)) @ np.abs(w).T
    n = cols / 16 + 12
    gamma = n * U / (1 - n * U)
    arithmetic = gamma * ((np.abs(x64) + d_each) @ ab.T)
    return x64 @ w.T, rounding + arithmetic


def run(name: str, blocks: np.ndarray, x: np.ndarray, scalar: bool = False) -> np.ndarray:
    y = kernels.block_matvec(TYPES[name], torch.from_numpy(blocks), torch.from_numpy(x), scalar=scalar)
    return y.numpy().astype(np.float64)


@pytest.mark.parametrize("scalar", [False, True], ids=["vector", "scalar"])
@pytest.mark.parametrize("name", list(TYPES))
def test_random_blocks_within_bound(name: str, scalar: bool) -> None:
    rng = np.random.default_rng(TYPES[name])
    rows, cols = 96, 1024
    blocks = random_blocks(name, rows, cols, rng)
    x = random_activations(5, cols, rng)
    ref, bound = reference_and_bound(name, blocks, x)
    y = run(name, blocks, x, scalar=scalar)
    assert np.all(np.isfinite(y))
    excess = np.abs(y - ref) - bound
    assert excess.max() <= 0, f"{name}: |kernel - ref| exceeds the bound by {excess.max():.3g} " \
                              f"(bound up to {bound.max():.3g})"


@pytest.mark.parametrize("name", list(TYPES))
def test_vector_and_scalar_kernels_agree(name: str) -> None:
    """Both compute the same integer block sums; only their fp32 combination order differs (well inside the
    arithmetic part of the bound, which is all that is allowed between them)."""
    rng = np.random.default_rng(100 + TYPES[name])
    rows, cols = 64, 768 if GGML_QUANT_SIZES[qtype(name)][0] == 256 else 800
    blocks = random_blocks(name, rows, cols, rng)
    x = random_activations(3, cols, rng)
    _, ab = split_weights(name, blocks, cols)
    n = cols / 16 + 12
    slack = 2 * n * U * ((np.abs(x.astype(np.float64)) + 1.0) @ ab.T)
    assert np.all(np.abs(run(name, blocks, x) - run(name, blocks, x, scalar=True)) <= slack)


@pytest.mark.parametrize("name", list(TYPES))
def test_wrong_weights_fail_the_bound(name: str) -> None:
    """The check can fail: with the scale of the first 256 values negated the same bound is exceeded (a kernel that
    misread one scale would fail this test's sibling)."""
    rng = np.random.default_rng(200 + TYPES[name])
    rows, cols = 64, 1024
    blocks = random_blocks(name, rows, cols, rng)
    x = rng.standard_normal((2, cols)).astype(np.float32)
    wrong = blocks.copy()
    size = GGML_QUANT_SIZES[qtype(name)][1]
    per_256 = 256 // GGML_QUANT_SIZES[qtype(name)][0]
    d_off, _ = scale_offsets(name)
    for j in range(per_256):
        wrong[:, j * size + d_off + 1] ^= 0x80  # the fp16 sign bit
    ref_wrong, bound_wrong = reference_and_bound(name, wrong, x)
    failed = np.abs(run(name, blocks, x) - ref_wrong) > bound_wrong
    assert failed.mean() > 0.5, f"{name}: only {failed.mean():.0%} of products notice a negated scale"


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_is_gguf_dequantize(name: str) -> None:
    """The prompt path's decoded weights (dequant.cpp): gguf's values exactly in fp32, and those values rounded to
    nearest-even bf16, also when decoded into a given tensor."""
    blocks = random_blocks(name, 48, 512, np.random.default_rng(11))
    expected = torch.from_numpy(quants.dequantize(blocks, qtype(name)))
    stored = torch.from_numpy(blocks)
    assert torch.equal(kernels.block_dequantize(TYPES[name], stored, torch.float32), expected)
    out = torch.full((48, 512), 3.0, dtype=torch.bfloat16)
    assert kernels.block_dequantize(TYPES[name], stored, torch.bfloat16, out=out) is out
    assert torch.equal(out, expected.to(torch.bfloat16))
    with pytest.raises(InputError, match="out must be"):
        kernels.block_dequantize(TYPES[name], stored, torch.bfloat16, out=out[:, :256])


# The prompt GEMM (gemm.cpp) takes every legacy type's codes unsigned: Q8_0's as q + 128, offset 128
GEMM_OFFSETS = {**OFFSETS, "Q8_0": 128}


@pytest.mark.parametrize("name", list(TYPES))
def test_prompt_gemm_within_bound(name: str) -> None:
    """The prompt GEMM rounds activations as the decode kernels do and is held to the same bound (Q8_0's terms
    are d (q + 128) x and 128 d x there), and to the decode kernels' own results within fp32 rounding. 37
    activation rows (groups of 4 and a tail of 1) against 72 weight rows (two 32-row panels and a partial one);
    each row's result is bitwise the same alone, and on 1 thread or 2. Q6_K is declined (its factors cover 16
    values: slower than decoding it for the bf16 GEMM)."""
    if not library().gk_block_kernels_vnni():
        pytest.skip("the prompt GEMM needs AVX512-VNNI")
    rng = np.random.default_rng(700 + TYPES[name])
    rows, cols = 72, 512
    blocks = random_blocks(name, rows, cols, rng)
    x = random_activations(37, cols, rng)
    stored, acts = torch.from_numpy(blocks), torch.from_numpy(x)
    y = kernels.block_gemm(TYPES[name], stored, acts)
    if name == "Q6_K":
        assert y is None
        return
    got = y.numpy().astype(np.float64)
    ref, bound = reference_and_bound(name, blocks, x, GEMM_OFFSETS)
    excess = np.abs(got - ref) - bound
    assert excess.max() <= 0, f"{name}: |gemm - ref| exceeds the bound by {excess.max():.3g}"
    # the decode kernels' integer block sums are the same: only the fp32 combination may differ (a code offset
    # off by one, well inside the bound above, is far outside this)
    _, ab = split_weights(name, blocks, cols, GEMM_OFFSETS)
    slack = 2 * (cols / 16 + 12) * U * ((np.abs(x.astype(np.float64)) + 1.0) @ ab.T)
    assert np.all(np.abs(got - run(name, blocks, x)) <= slack)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = kernels.block_gemm(TYPES[name], stored, acts)
    finally:
        torch.set_num_threads(threads)
    alone = torch.cat([kernels.block_gemm(TYPES[name], stored, acts[i:i + 1]) for i in (0, 5, 36)])
    assert torch.equal(y, one_thread) and torch.equal(y[[0, 5, 36]], alone)


def test_quantize_act_matches_numpy() -> None:
    rng = np.random.default_rng(7)
    x = random_activations(1, 4096, rng)[0]
    x[64:96] = np.float32(1e-30) * rng.standard_normal(32).astype(np.float32)  # tiny but normal
    x[96:128] = np.array([127, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -126.5] * 4, np.float32)  # d = 1: ties to even
    x[128:160] = 0.0
    x[128] = np.float32(190 * 2.0**-149)  # subnormal: d rounds to 2^-149, x / d = 190 is clamped to 127
    lib = library()
    q = np.zeros(x.size, np.int8)
    d = np.zeros(x.size // 32, np.float32)
    s = np.zeros(x.size // 32, np.int32)
    lib.gk_quantize_act(x.ctypes.data, x.size, q.ctypes.data, d.ctypes.data, s.ctypes.data)
    q_ref, d_ref, s_ref = reference_quantize(x)
    assert np.array_equal(d, d_ref) and np.array_equal(q, q_ref) and np.array_equal(s, s_ref)
    assert d[1] == 0 and not q[32:64].any()  # the all-zero block
    assert list(q[97:104]) == [0, 2, 2, 0, -2, 4, -126] and q[128] == 127


@pytest.mark.parametrize("name", list(TYPES))
def test_batch_and_thread_invariance(name: str) -> None:
    """A row's result is bitwise the same alone or in a batch of 7, on 1 thread or 2."""
    rng = np.random.default_rng(300 + TYPES[name])
    rows, cols = 50, 512
    blocks = torch.from_numpy(random_blocks(name, rows, cols, rng))
    x = torch.from_numpy(random_activations(7, cols, rng))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        batch = kernels.block_matvec(TYPES[name], blocks, x)
        torch.set_num_threads(1)
        alone = torch.cat([kernels.block_matvec(TYPES[name], blocks, x[i:i + 1]) for i in range(7)])
        batch_one = kernels.block_matvec(TYPES[name], blocks, x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batch, alone) and torch.equal(batch, batch_one)


@pytest.mark.parametrize("scalar", [False, True], ids=["vector", "scalar"])
@pytest.mark.parametrize("name", list(TYPES))
def test_multi_row_kernels_equal_one_row_calls(name: str, scalar: bool) -> None:
    """The kernels unpack each weight block once for up to 8 activation rows; every m = 1..9 (so every count 1..8
    and a chunk of 8 and 1 after it) gives bitwise the results of one-row calls. The widths leave a legacy type
    whole groups of 8 blocks and a last group of 1, 4 (a 640-wide row), 6 or 7 blocks (an odd count splits a pair
    in the multi-row kernel); a K-quant 3 super-blocks."""
    rng = np.random.default_rng(500 + TYPES[name])
    legacy = GGML_QUANT_SIZES[qtype(name)][0] == 32
    for cols in (800, 640, 704, 736) if legacy else (768,):
        rows = 23
        blocks = torch.from_numpy(random_blocks(name, rows, cols, rng))
        x = torch.from_numpy(random_activations(9, cols, rng))
        alone = torch.cat([kernels.block_matvec(TYPES[name], blocks, x[i:i + 1], scalar=scalar) for i in range(9)])
        assert torch.isfinite(alone).all() and alone.abs().max() > 0
        for m in range(1, 10):
            batch = kernels.block_matvec(TYPES[name], blocks, x[:m], scalar=scalar)
            same = batch.view(torch.int32) == alone[:m].view(torch.int32)
            assert same.all(), (f"{name}, {cols} wide, m = {m}: {int((~same).sum())} of {same.numel()} values differ "
                                "from one-row calls")


def test_bad_inputs_raise() -> None:
    x = torch.zeros(1, 256)
    with pytest.raises(InputError, match="Q4_1"):
        kernels.block_matvec(3, torch.zeros(4, 20 * 8, dtype=torch.uint8), x)
    with pytest.raises(InputError, match="whole Q4_K blocks"):
        kernels.block_matvec(12, torch.zeros(4, 100, dtype=torch.uint8), x)
    with pytest.raises(InputError, match="whole Q8_0 blocks"):
        kernels.block_matvec(8, torch.zeros(4, 272), x)  # float, not uint8
    with pytest.raises(InputError, match="width 256"):
        kernels.block_matvec(8, torch.zeros(4, 34 * 4, dtype=torch.uint8), x)  # 128 inputs
    assert kernels.has_block_kernels()


REAL_TYPES = ("Q4_K", "Q5_0", "Q6_K", "Q8_0")


@pytest.fixture(scope="module")
def real_tensors(real_gguf_path) -> dict[str, tuple[str, np.ndarray]]:
    """The first 2-D tensor of each of the real 270M's block types: (name, its first 256 rows of blocks)."""
    reader = gguf.GGUFReader(str(real_gguf_path))
    found: dict[str, tuple[str, np.ndarray]] = {}
    for tensor in reader.tensors:
        name = tensor.tensor_type.name
        if name in REAL_TYPES and name not in found and len(tensor.shape) == 2:
            found[name] = (tensor.name, np.array(tensor.data[:256]))  # a writable copy
    return found


@pytest.mark.parametrize("name", REAL_TYPES)
def test_real_270m_tensors_within_bound(name: str, real_tensors) -> None:
    if name not in real_tensors:
        pytest.skip(f"the real 270M has no 2-D {name} tensor")
    tensor, blocks = real_tensors[name]
    block, size = GGML_QUANT_SIZES[qtype(name)]
    cols = blocks.shape[1] // size * block
    x = random_activations(3, cols, np.random.default_rng(400 + TYPES[name]))
    ref, bound = reference_and_bound(name, blocks, x)
    y = run(name, blocks, x)
    excess = np.abs(y - ref) - bound
    assert excess.max() <= 0, f"{tensor} ({name}): exceeds the bound by {excess.max():.3g}"
