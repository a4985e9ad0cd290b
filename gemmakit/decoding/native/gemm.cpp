// Prompt products over a GGUF file's own blocks with int8 activations: y [m, n] = x [m, k] W^T for W [n, k] in
// blocks, on AVX512-VNNI.
//
// Why: a prompt is compute-bound. Decoding the weight to bf16 for torch's GEMM (dequant.cpp) runs near the bf16
// dot product's peak, 32 multiply-adds an instruction; vpdpbusd does 64 on int8, and llama.cpp's prompts use it.
//
// Numerics: the activations are rounded as the decode kernels round them (blocks.h quantize_act: int8 in blocks of
// 32 with one fp32 scale d_x and the codes' sum s_x), so the error bound of tests/decoding/test_block_kernels.py
// holds. A weight row is unpacked to unsigned codes u with per-32 factor a and offset b, w = a u - b (Q4_K/Q5_K:
// a = d sc_j, b = dmin m_j; legacy: a = d, b = d times the code offset, 8, 16 or 128 for Q8_0's q + 128, exact in
// fp32). Each output is sum_j fma(dot_j(u, q_x), a_j d_xj) then - b_j (d_xj s_xj), in the order of j: the same
// operations for an output whatever its lane, tile or batch, so a row's result does not depend on the batch.
//
// Layout: a panel of 32 weight rows is unpacked and transposed to [k/4][32 rows][4 codes] (in L2), two vectors of
// 16 rows a step, and each activation row's 4 codes are broadcast: a step loads two vectors for 2 x kActRows
// products. (Activation rows in the lanes instead, weight codes broadcast, ran 0.85-1.2x the bf16 path: the
// compiler folded the activation loads into every vpdpbusd, one 64-byte load per product.) Q6_K is declined: its
// factors cover 16 values, and the per-16 fp32 steps made it 0.8x the bf16 path.
#include <vector>

#include "blocks.h"

using namespace gk;

#if GK_BLOCKS_VNNI
namespace {

constexpr int kPanel = 32;   // weight rows in a panel: two vectors of 16 lanes
constexpr int kActRows = 4;  // activation rows in the micro-kernel

// One weight row as unsigned codes u [k], factors a and offsets b [k/32] (w = a u - b).
void unpack_row(int64_t type, const uint8_t* row, int64_t k, uint8_t* u, float* a, float* b) {
  int64_t values, bytes;
  block_shape(type, &values, &bytes);
  if (type == kQ4_K || type == kQ5_K) {
    for (int64_t blk_i = 0; blk_i < k / values; ++blk_i) {
      const uint8_t* blk = row + blk_i * bytes;
      const uint8_t* qs = blk + (type == kQ4_K ? 16 : 48);
      uint8_t* out = u + blk_i * kSuper;
      const __m256i low = _mm256_set1_epi8(0x0f);
      const __m256i qh = type == kQ5_K ? load256(blk + 16) : _mm256_setzero_si256();
      for (int c = 0; c < 4; ++c) {  // chunk c: sub-block 2c in the low nibbles, 2c + 1 in the high
        const __m256i q = load256(qs + 32 * c);
        __m256i even = _mm256_and_si256(q, low), odd = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);
        if (type == kQ5_K) {  // bit j of qh[l]: the 5th bit of value l of sub-block j
          const __m256i sixteen = _mm256_set1_epi8(0x10);
          even = _mm256_mask_add_epi8(even, _mm256_test_epi8_mask(qh, _mm256_set1_epi8(1 << (2 * c))), even, sixteen);
          odd = _mm256_mask_add_epi8(odd, _mm256_test_epi8_mask(qh, _mm256_set1_epi8(1 << (2 * c + 1))), odd, sixteen);
        }
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 64 * c), even);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 64 * c + 32), odd);
      }
      const float d = half_to_float(blk), dmin = half_to_float(blk + 2);
      uint8_t sm[16];
      k4_scales(blk + 4, sm);
      for (int j = 0; j < 8; ++j) {
        a[8 * blk_i + j] = d * static_cast<float>(sm[j]);
        b[8 * blk_i + j] = dmin * static_cast<float>(sm[8 + j]);
      }
    }
    return;
  }
  const float offset = type == kQ8_0 ? 128.0f : type == kQ4_0 ? 8.0f : 16.0f;
  for (int64_t blk_i = 0; blk_i < k / values; ++blk_i) {
    const uint8_t* blk = row + blk_i * bytes;
    // unsigned codes: Q8_0's q + 128; Q4_0's and Q5_0's as the decode kernels take them
    const __m256i codes = type == kQ8_0 ? _mm256_xor_si256(load256(blk + 2), _mm256_set1_epi8(static_cast<char>(0x80)))
                          : type == kQ4_0 ? LegacyCodes<kQ4_0>(blk).codes
                                          : LegacyCodes<kQ5_0>(blk).codes;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(u + 32 * blk_i), codes);
    a[blk_i] = half_to_float(blk);
    b[blk_i] = a[blk_i] * offset;
  }
}

// A panel of up to 32 weight rows: codes [k/4][32][4] and factors, offsets [k/32][32] (rows past the matrix zero).
struct Panel {
  std::vector<uint8_t> codes, row;
  std::vector<float> a, b, row_a, row_b;
  void fill(int64_t type, const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t k) {
    const int64_t nb = k / kActBlock;
    codes.assign(kPanel * k, 0);
    a.assign(kPanel * nb, 0.0f);
    b.assign(kPanel * nb, 0.0f);
    row.resize(k);
    row_a.resize(nb);
    row_b.resize(nb);
    for (int64_t r = 0; r < rows; ++r) {
      unpack_row(type, w + r * row_bytes, k, row.data(), row_a.data(), row_b.data());
      for (int64_t i = 0; i < k / 4; ++i) std::memcpy(codes.data() + (i * kPanel + r) * 4, row.data() + 4 * i, 4);
      for (int64_t j = 0; j < nb; ++j) {
        a[j * kPanel + r] = row_a[j];
        b[j * kPanel + r] = row_b[j];
      }
    }
  }
};

// y rows i0 .. i0 + R (of width n, from column n0) = those activation rows (ActRows: codes [m, k], scales [m, k/32])
// against the panel (lanes past n unused); offset_scales [m, k/32] = d_x s_x.
template <int R>
void micro(const Panel& p, const ActRows& acts, const float* offset_scales, int64_t i0, int64_t k, float* y, int64_t n,
           int64_t n0, int64_t cols) {
  const int64_t nb = k / kActBlock;
  __m512 acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  const uint8_t* codes = p.codes.data();
  for (int64_t j = 0; j < nb; ++j) {
    __m512i dot[R][2];
    for (int i = 0; i < R; ++i) dot[i][0] = dot[i][1] = _mm512_setzero_si512();
    for (int s = 0; s < 8; ++s) {
      const int64_t kk = 32 * j + 4 * s;
      const __m512i w0 = _mm512_loadu_si512(codes + kk * kPanel), w1 = _mm512_loadu_si512(codes + kk * kPanel + 64);
      for (int i = 0; i < R; ++i) {
        int32_t four;
        std::memcpy(&four, acts.q.data() + (i0 + i) * k + kk, 4);
        const __m512i x = _mm512_set1_epi32(four);
        dot[i][0] = _mm512_dpbusd_epi32(dot[i][0], w0, x);
        dot[i][1] = _mm512_dpbusd_epi32(dot[i][1], w1, x);
      }
    }
    const __m512 a0 = _mm512_loadu_ps(p.a.data() + j * kPanel), a1 = _mm512_loadu_ps(p.a.data() + j * kPanel + 16);
    const __m512 b0 = _mm512_loadu_ps(p.b.data() + j * kPanel), b1 = _mm512_loadu_ps(p.b.data() + j * kPanel + 16);
    for (int i = 0; i < R; ++i) {
      const int64_t at = (i0 + i) * nb + j;
      const __m512 dx = _mm512_set1_ps(acts.d[at]), dxs = _mm512_set1_ps(offset_scales[at]);
      acc[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i][0]), _mm512_mul_ps(a0, dx), acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i][1]), _mm512_mul_ps(a1, dx), acc[i][1]);
      acc[i][0] = _mm512_fnmadd_ps(b0, dxs, acc[i][0]);
      acc[i][1] = _mm512_fnmadd_ps(b1, dxs, acc[i][1]);
    }
  }
  const __mmask16 keep0 = static_cast<__mmask16>(cols >= 16 ? 0xffffu : (1u << cols) - 1u);
  const __mmask16 keep1 = static_cast<__mmask16>(cols >= 32 ? 0xffffu : cols <= 16 ? 0u : (1u << (cols - 16)) - 1u);
  for (int i = 0; i < R; ++i) {
    _mm512_mask_storeu_ps(y + (i0 + i) * n + n0, keep0, acc[i][0]);
    _mm512_mask_storeu_ps(y + (i0 + i) * n + n0 + 16, keep1, acc[i][1]);
  }
}

}  // namespace
#endif

extern "C" {

// y [m, n] = x [m, k] W^T: W [n, k] as ggml blocks of `type` (Q4_0, Q5_0, Q8_0, Q4_K, Q5_K), x fp32. Panels of 32
// weight rows are shared among `threads`. Returns 0; -1 for another type, k not whole blocks, or a build without
// AVX512-VNNI (the caller then decodes the weight for a float GEMM).
int gk_block_gemm(int64_t type, const uint8_t* w, int64_t n, int64_t k, const float* x, int64_t m, float* y,
                  int threads) {
#if GK_BLOCKS_VNNI
  const int64_t row_bytes = block_row_bytes(type, k);
  if (type == kQ6_K || row_bytes < 0 || k % kActBlock != 0 || m < 0 || n < 0) return -1;
  if (n == 0 || m == 0) return 0;
  threads = std::max(threads, 1);
  ActRows acts;
  acts.reserve(m, k);
  const int64_t nb = k / kActBlock, panels = (n + kPanel - 1) / kPanel;
  std::vector<float> offset_scales(m * nb);  // d_x s_x per row and 32 values: the offsets' factor
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < m; ++i) {
      acts.quantize(x, i);
      for (int64_t j = 0; j < nb; ++j)
        offset_scales[i * nb + j] = acts.d[i * nb + j] * static_cast<float>(acts.sums[i * nb + j]);
    }
    Panel panel;
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t n0 = p * kPanel, cols = std::min<int64_t>(kPanel, n - n0);
      panel.fill(type, w + n0 * row_bytes, row_bytes, cols, k);
      const float* offsets = offset_scales.data();
      int64_t i0 = 0;
      for (; i0 + kActRows <= m; i0 += kActRows) micro<kActRows>(panel, acts, offsets, i0, k, y, n, n0, cols);
      for (; i0 < m; ++i0) micro<1>(panel, acts, offsets, i0, k, y, n, n0, cols);
    }
  }
  return 0;
#else
  (void)type, (void)w, (void)n, (void)k, (void)x, (void)m, (void)y, (void)threads;
  return -1;
#endif
}

}  // extern "C"
