// Block matrices decoded to floats, for prompts the int8 GEMM (gemm.cpp) does not take (Q6_K, builds without
// AVX512-VNNI): a prompt of many tokens is compute-bound, and torch's bf16 GEMM (oneDNN, AVX512-BF16) multiplies
// faster than per-pair block dot products, so BlockLinear decodes its weight once per prompt chunk here and hands
// it to F.linear (decode steps keep the block kernels of blocks.h).
// Values are the GGUF definitions (gguf-py's `dequantize`): legacy d * q; Q6_K d * scale16 * q; Q4_K/Q5_K
// d * scale * q - dmin * min, computed in fp32, then rounded to bf16 (to nearest, ties to even) when asked.
#include "blocks.h"

using namespace gk;

namespace {

constexpr int kGroup = 16;  // values sharing one factor in every type (Q6_K's scale covers 16)

// fp32 -> bf16 bits, rounded to nearest (ties to even), NaN kept quiet.
inline uint16_t to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// Per group of 16 values, the factor and offset of w = factor * code - offset: legacy d and 0; Q6_K d * scale (the
// product gguf-py forms first) and 0; Q4_K/Q5_K d * sc_j and dmin * m_j. Returns the number of groups (2 or 16).
int block_factors(int64_t type, const uint8_t* blk, float* factor, float* offset) {
  if (type == kQ4_0 || type == kQ5_0 || type == kQ8_0) {
    factor[0] = factor[1] = half_to_float(blk);
    offset[0] = offset[1] = 0.0f;
    return 2;
  }
  if (type == kQ6_K) {
    const float d = half_to_float(blk + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    for (int g = 0; g < 16; ++g) {
      factor[g] = d * static_cast<float>(sc[g]);
      offset[g] = 0.0f;
    }
    return 16;
  }
  const float d = half_to_float(blk), dmin = half_to_float(blk + 2);
  uint8_t sm[16];
  k4_scales(blk + 4, sm);
  for (int g = 0; g < 16; ++g) {
    factor[g] = d * static_cast<float>(sm[g / 2]);
    offset[g] = dmin * static_cast<float>(sm[8 + g / 2]);
  }
  return 16;
}

// dst = factor * codes - offset for one group of 16 values, as fp32 (dst32) or bf16 bits (dst16): the vector
// rounding is to_bf16's, bit for bit.
inline void store_group(const int32_t* codes, float factor, float offset, float* dst32, uint16_t* dst16) {
#if defined(__AVX512F__)
  const __m512 v = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(factor), _mm512_cvtepi32_ps(_mm512_loadu_si512(codes))),
                                 _mm512_set1_ps(offset));
  if (dst32 != nullptr) {
    _mm512_storeu_ps(dst32, v);
    return;
  }
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i high = _mm512_srli_epi32(bits, 16);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(high, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7fff));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  const __m512i out = _mm512_mask_blend_epi32(nan, rounded, _mm512_or_si512(high, _mm512_set1_epi32(0x40)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst16), _mm512_cvtepi32_epi16(out));
#else
  for (int j = 0; j < kGroup; ++j) {
    const float v = factor * static_cast<float>(codes[j]) - offset;
    if (dst32 != nullptr)
      dst32[j] = v;
    else
      dst16[j] = to_bf16(v);
  }
#endif
}

// One block decoded into dst32 or dst16 (exactly one non-null).
void decode_block(int64_t type, const uint8_t* blk, float* dst32, uint16_t* dst16) {
  float factor[kSuper / kGroup], offset[kSuper / kGroup];
  int32_t codes[kSuper];
  const int groups = block_factors(type, blk, factor, offset);
  decode_codes(type, blk, codes);
  for (int g = 0; g < groups; ++g)
    store_group(codes + kGroup * g, factor[g], offset[g], dst32 == nullptr ? nullptr : dst32 + kGroup * g,
                dst16 == nullptr ? nullptr : dst16 + kGroup * g);
}

}  // namespace

extern "C" {

// out [rows, cols] = the decoded matrix, as fp32 (out_f32) or bf16 bits (out_bf16): exactly one of them non-null.
// Rows are shared among `threads`. Returns 0, or -1 for an unsupported type or cols that are not whole blocks.
int gk_block_dequantize(int64_t type, const uint8_t* w, int64_t rows, int64_t cols, float* out_f32,
                        uint16_t* out_bf16, int threads) {
  const int64_t row_bytes = block_row_bytes(type, cols);
  if (row_bytes < 0 || (out_f32 == nullptr) == (out_bf16 == nullptr)) return -1;
  int64_t values, bytes;
  block_shape(type, &values, &bytes);
#pragma omp parallel for schedule(static) num_threads(std::max(threads, 1))
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < cols / values; ++b) {
      const int64_t at = r * cols + b * values;
      decode_block(type, w + r * row_bytes + b * bytes, out_f32 == nullptr ? nullptr : out_f32 + at,
                   out_bf16 == nullptr ? nullptr : out_bf16 + at);
    }
  return 0;
}

}  // extern "C"
