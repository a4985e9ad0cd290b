// Block matrices decoded to floats, for prompts: a prompt of many tokens is compute-bound, and torch's bf16 GEMM
// (oneDNN, AVX512-BF16) multiplies faster than per-pair block dot products, so BlockLinear decodes its weight
// once per prompt chunk here and hands it to F.linear (decode steps keep the block kernels of blocks.h).
// Values are the GGUF definitions (gguf-py's `dequantize`): legacy d * q; Q6_K d * scale16 * q; Q4_K/Q5_K
// d * scale * q - dmin * min, computed in fp32, then rounded to bf16 (to nearest, ties to even) when asked.
#include "blocks.h"

using namespace gk;

namespace {

inline uint16_t to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// One block's values into out[0 .. values).
void decode_block(int64_t type, const uint8_t* blk, float* out) {
  int32_t codes[kSuper];
  decode_codes(type, blk, codes);
  if (type == kQ4_0 || type == kQ5_0 || type == kQ8_0) {
    const float d = half_to_float(blk);
    for (int j = 0; j < 32; ++j) out[j] = d * static_cast<float>(codes[j]);
    return;
  }
  if (type == kQ6_K) {
    const float d = half_to_float(blk + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    for (int j = 0; j < kSuper; ++j) out[j] = d * static_cast<float>(sc[j / 16]) * static_cast<float>(codes[j]);
    return;
  }
  const float d = half_to_float(blk), dmin = half_to_float(blk + 2);
  uint8_t sm[16];
  k4_scales(blk + 4, sm);
  for (int s = 0; s < 8; ++s) {
    const float scale = d * static_cast<float>(sm[s]), low = dmin * static_cast<float>(sm[8 + s]);
    for (int l = 0; l < 32; ++l) out[32 * s + l] = scale * static_cast<float>(codes[32 * s + l]) - low;
  }
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
  for (int64_t r = 0; r < rows; ++r) {
    float block[kSuper];
    for (int64_t b = 0; b < cols / values; ++b) {
      decode_block(type, w + r * row_bytes + b * bytes, block);
      if (out_f32 != nullptr) {
        std::memcpy(out_f32 + r * cols + b * values, block, sizeof(float) * values);
      } else {
        uint16_t* dst = out_bf16 + r * cols + b * values;
        for (int64_t j = 0; j < values; ++j) dst[j] = to_bf16(block[j]);
      }
    }
  }
  return 0;
}

}  // extern "C"
