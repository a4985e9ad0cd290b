// Elementwise steps of the eager forward on bf16 tensors (a prompt's prefill on CPU), fused into one pass each.
//
// Why: torch runs an RMSNorm of bf16 rows as five passes (to fp32, squares, mean, two products, back to bf16),
// q/k's norm and rope as about ten over [T, heads, head_dim], and gelu(gate) * up as two; on the 270M's 1024-token
// prefill those passes were over 20% of the time (ablation, about 1 s, 2 threads: q/k norms 50-70 ms, rope 30-50
// ms, gelu 40-55 ms, the four hidden-state norms a layer 88 ms). Here each row is read once and written once.
//
// Numerics follow the eager path's: values are fp32 between the bf16 input and output, and the places where torch
// rounds to bf16 (after the norm, after gelu) round here too (to nearest, ties to even). What can differ is the
// last bit of a result where torch's vectorised tanh and sum order differ from these, as between any two kernels.
#include "common.h"

namespace gk {
namespace {

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest, ties to even (torch's float -> bfloat16); NaN stays a quiet NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float bf16_round(float f) { return bf16_to_float(float_to_bf16(f)); }

}  // namespace
}  // namespace gk

using namespace gk;

extern "C" {

// out = rope(bf16(norm(x))) per head, for x [rows, heads, d] bf16 (contiguous): norm is RMSNorm with multiplier
// `mult` [d] (1 + w, fp32; null: no norm), rope uses row r's cos/sin [rows, d] (sin carrying rope's sign; both
// null: no rope, so heads = 1 is the plain RMSNorm of bf16 rows). Returns -1 for an odd d with rope.
int gk_bf16_norm_rope(const uint16_t* x, int64_t rows, int64_t heads, int64_t d, const float* mult, float eps,
                      const float* cos, const float* sin, uint16_t* out, int threads) {
  if (d <= 0 || (cos != nullptr && d % 2 != 0)) return -1;
#pragma omp parallel num_threads(std::max(threads, 1))
  {
    std::vector<float> v(d);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < rows * heads; ++t) {
      const uint16_t* in = x + t * d;
      for (int64_t i = 0; i < d; ++i) v[i] = bf16_to_float(in[i]);
      if (mult != nullptr) {
        rms_norm(v.data(), mult, eps, v.data(), d);
        for (int64_t i = 0; i < d; ++i) v[i] = bf16_round(v[i]);
      }
      if (cos != nullptr) rope(v.data(), cos + t / heads * d, sin + t / heads * d, d);
      uint16_t* o = out + t * d;
      for (int64_t i = 0; i < d; ++i) o[i] = float_to_bf16(v[i]);
    }
  }
  return 0;
}

// out = bf16(bf16(gelu_tanh(gate)) * up) for n bf16 values.
void gk_bf16_geglu(const uint16_t* gate, const uint16_t* up, int64_t n, uint16_t* out, int threads) {
  constexpr int64_t kChunk = 1024;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel num_threads(std::max(threads, 1))
  {
    std::vector<float> g(kChunk), ones(kChunk, 1.0f), y(kChunk);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t start = c * kChunk, count = std::min(kChunk, n - start);
      for (int64_t i = 0; i < count; ++i) g[i] = bf16_to_float(gate[start + i]);
      geglu(g.data(), ones.data(), y.data(), count);  // gelu_tanh(g) * 1
      for (int64_t i = 0; i < count; ++i)
        out[start + i] = float_to_bf16(bf16_round(y[i]) * bf16_to_float(up[start + i]));
    }
  }
}

}  // extern "C"
