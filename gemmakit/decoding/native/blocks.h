// Dot products over a GGUF file's own quantised blocks (Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K) and int8 activations.
//
// Why: a Q4_K_M file's layers are 4.5-6.5 bits a weight; decoding reads every weight once per token, so computing
// straight from the file's blocks reads about the file's bytes instead of int8's (twice as many for Q4_K), and the
// model computed is the file's own (w = the dequantised weights of gguf.quants / ggml-quants.c, exactly).
//
// Numerics: an activation row is rounded to int8 in blocks of 32 values with one fp32 scale, x ~= d * q (error at
// most d/2 a value; the test derives its bound from that). Each weight block's integer dot product with the q's is
// exact (int32); the per-block scales then combine in fp32: d_w * sc * d_x * sum(q_w q_x) - dmin * m * d_x * sum(q_x)
// for the K-quants with mins, d_w * d_x * sum((q_w - offset) q_x) for the others. The float work is in a fixed order
// that depends only on k, so one (weight row, activation row) pair gives one value whatever the batch, the threads
// or the call order (the engine's batch invariance); a build with and one without AVX512-VNNI give the same
// integers but may round their float combination differently.
//
// Block layouts (llama.cpp's ggml-common.h; gguf-py's quants.py decodes the same):
//   Q4_0  (32 values, 18 bytes): fp16 d, qs[16]: value j < 16 = low nibble of qs[j], j >= 16 = high nibble of
//         qs[j - 16]; w = d * (q - 8).
//   Q5_0  (32, 22): fp16 d, uint32 qh (bit j: value j's 5th bit), qs[16] as Q4_0; w = d * (q - 16).
//   Q8_0  (32, 34): fp16 d, int8 qs[32]; w = d * q.
//   Q4_K  (256, 144): fp16 d, fp16 dmin, scales[12] (8 six-bit scales and 8 six-bit mins), qs[128]: chunk c of 32
//         bytes holds sub-block 2c in its low nibbles and 2c + 1 in its high nibbles; w = d * sc_j * q - dmin * m_j.
//   Q5_K  (256, 176): as Q4_K with qh[32] before qs: bit j of qh[l] is the 5th bit of value l of sub-block j.
//   Q6_K  (256, 210): ql[128], qh[64], int8 scales[16] (one per 16 values), fp16 d; half h (128 values) uses
//         ql[64h..64h+64) and qh[32h..32h+32): its quarter s, value l takes a nibble of ql[64h + 32(s & 1) + l] (low
//         for s < 2) and bits 2s, 2s+1 of qh[32h + l] as bits 4-5; w = d * scales[i / 16] * (q - 32).
#pragma once
#include "common.h"

#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define GK_BLOCKS_VNNI 1
#else
#define GK_BLOCKS_VNNI 0
#endif

namespace gk {
namespace {

constexpr int64_t kActBlock = 32;  // activations are quantised in blocks of 32 values

// One activation row quantised: q[k] int8, d[k/32] fp32 scales (x ~= d * q), sums[k/32] = sum of the 32 q's, and
// offset_lanes[k/32][8] = {-8 sums, -8 sums, 0, ...}: the lanes a legacy kernel's vpdpbusd starts from, so that the
// codes' offset (16 for Q5_0: both lanes; 8 for Q4_0: lane 0) is taken off in the exact integers (see dot_legacy).
struct ActRow {
  const int8_t* q;
  const float* d;
  const int32_t* sums;
  const int32_t* offset_lanes;
};

constexpr int64_t kQ4_0 = 2, kQ5_0 = 6, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14;
constexpr int64_t kSuper = 256;  // values in a K-quant super-block

// fp16 bits -> fp32, exactly (subnormals, infinities and NaNs included); F16C's instruction where there is one.
inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

bool block_supported(int64_t ggml_type) {
  switch (ggml_type) {
    case kQ4_0: case kQ5_0: case kQ8_0: case kQ4_K: case kQ5_K: case kQ6_K: return true;
    default: return false;
  }
}

// Values per block and bytes per block of a supported type (0, 0 otherwise).
inline void block_shape(int64_t ggml_type, int64_t* values, int64_t* bytes) {
  switch (ggml_type) {
    case kQ4_0: *values = 32; *bytes = 18; return;
    case kQ5_0: *values = 32; *bytes = 22; return;
    case kQ8_0: *values = 32; *bytes = 34; return;
    case kQ4_K: *values = kSuper; *bytes = 144; return;
    case kQ5_K: *values = kSuper; *bytes = 176; return;
    case kQ6_K: *values = kSuper; *bytes = 210; return;
    default: *values = 0; *bytes = 0; return;
  }
}

// Bytes of one row of k values; -1 if the type is unsupported or k is not whole blocks.
int64_t block_row_bytes(int64_t ggml_type, int64_t k) {
  int64_t values, bytes;
  block_shape(ggml_type, &values, &bytes);
  if (values == 0 || k <= 0 || k % values != 0) return -1;
  return k / values * bytes;
}

// x[k] (k % 32 == 0) -> q, d, sums. d = max|x_block| / 127, q = x / d rounded to nearest (ties to even, the
// default rounding mode) and clamped to [-127, 127] (only reachable when d is subnormal); d == 0 -> q = 0.
// The vector and scalar loops compute the same IEEE operations, so both give the same bytes.
void quantize_act(const float* x, int64_t k, int8_t* q, float* d, int32_t* sums) {
  for (int64_t b = 0; b < k / kActBlock; ++b) {
    const float* xb = x + b * kActBlock;
    int8_t* qb = q + b * kActBlock;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    const float db = amax / 127.0f;
    d[b] = db;
    if (!(db != 0.0f)) {  // zero (or NaN: then the block is garbage anyway, but deterministic)
      std::memset(qb, 0, kActBlock);
      sums[b] = 0;
      continue;
    }
    const __m512 vd = _mm512_set1_ps(db), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    // max(r, -127) returns -127 for a NaN r, as std::fmax does
    const __m512 r0 = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_div_ps(x0, vd), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi);
    const __m512 r1 = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_div_ps(x1, vd), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi);
    const __m512i i0 = _mm512_cvtps_epi32(r0), i1 = _mm512_cvtps_epi32(r1);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtepi32_epi8(i0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtepi32_epi8(i1));
    sums[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
#else
    float amax = 0.0f;
    for (int64_t i = 0; i < kActBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float db = amax / 127.0f;
    d[b] = db;
    int32_t s = 0;
    for (int64_t i = 0; i < kActBlock; ++i) {
      int v = 0;
      if (db != 0.0f) v = static_cast<int>(std::fmin(std::fmax(std::nearbyint(xb[i] / db), -127.0f), 127.0f));
      qb[i] = static_cast<int8_t>(v);
      s += v;
    }
    sums[b] = s;
#endif
  }
}

// Activation rows rounded for the block kernels: codes [rows, k], per-32 scales, code sums and offset lanes, and
// each row's view (what the kernels take: `rows.data()` for any number of them).
struct ActRows {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> sums, offset_lanes;
  std::vector<ActRow> rows;
  int64_t k = 0;
  void reserve(int64_t count, int64_t width) {
    k = width;
    const int64_t nb = width / kActBlock;
    q.resize(count * width);
    d.resize(count * nb);
    sums.resize(count * nb);
    offset_lanes.assign(count * nb * 8, 0);
    rows.resize(count);
    for (int64_t i = 0; i < count; ++i)
      rows[i] = {q.data() + i * k, d.data() + i * nb, sums.data() + i * nb, offset_lanes.data() + i * nb * 8};
  }
  // round row i of x [count, k]
  void quantize(const float* x, int64_t i) {
    const int64_t nb = k / kActBlock;
    int32_t* s = sums.data() + i * nb;
    quantize_act(x + i * k, k, q.data() + i * k, d.data() + i * nb, s);
    int32_t* lanes = offset_lanes.data() + i * nb * 8;
    for (int64_t b = 0; b < nb; ++b) lanes[8 * b] = lanes[8 * b + 1] = -8 * s[b];
  }
};

// Q4_K/Q5_K's twelve scale bytes -> out[0..8) the six-bit scales, out[8..16) the six-bit mins (ggml's
// get_scale_min_k4 for all eight sub-blocks at once, on 32-bit words).
inline void k4_scales(const uint8_t* packed, uint8_t out[16]) {
  uint32_t u[4];
  std::memcpy(u, packed, 12);
  const uint32_t m1 = 0x3f3f3f3fu, m2 = 0x0f0f0f0fu, m3 = 0x03030303u;
  u[3] = ((u[2] >> 4) & m2) | (((u[1] >> 6) & m3) << 4);
  const uint32_t mins_lo = u[1] & m1;
  u[1] = (u[2] & m2) | (((u[0] >> 6) & m3) << 4);
  u[2] = mins_lo;
  u[0] &= m1;
  std::memcpy(out, u, 16);
}

inline void prefetch_bytes(const uint8_t* p, int64_t bytes) {
#if defined(__AVX512F__) || defined(__AVX2__)
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchAhead + o), _MM_HINT_T0);
#else
  (void)p;
  (void)bytes;
#endif
}

// Activation rows a weight row is dotted with per kernel call: each weight block's codes and scales are unpacked
// once for all of them. 8 against 4, in one process on the 270M's step: equal at 4 and 16 rows, 2.5% faster at 8.
constexpr int kMaxRows = 8;

// --- scalar reference: the same integers as the vector path -------------------------------------------------------
// Decoded codes of one block (q - offset for the symmetric types, the unsigned code for Q4_K/Q5_K), 32 or 256.
inline void decode_codes(int64_t type, const uint8_t* blk, int32_t* out) {
  switch (type) {
    case kQ8_0:
      for (int j = 0; j < 32; ++j) out[j] = static_cast<int8_t>(blk[2 + j]);
      return;
    case kQ4_0:
      for (int j = 0; j < 16; ++j) {
        out[j] = (blk[2 + j] & 0xf) - 8;
        out[j + 16] = (blk[2 + j] >> 4) - 8;
      }
      return;
    case kQ5_0: {
      uint32_t qh;
      std::memcpy(&qh, blk + 2, 4);
      for (int j = 0; j < 16; ++j) {
        out[j] = ((blk[6 + j] & 0xf) | (((qh >> j) & 1) << 4)) - 16;
        out[j + 16] = ((blk[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16;
      }
      return;
    }
    case kQ4_K:
    case kQ5_K: {
      const uint8_t* qs = blk + (type == kQ4_K ? 16 : 48);
      for (int c = 0; c < 4; ++c)
        for (int l = 0; l < 32; ++l) {
          out[64 * c + l] = qs[32 * c + l] & 0xf;
          out[64 * c + 32 + l] = qs[32 * c + l] >> 4;
        }
      if (type == kQ5_K)
        for (int j = 0; j < 8; ++j)
          for (int l = 0; l < 32; ++l) out[32 * j + l] |= ((blk[16 + l] >> j) & 1) << 4;
      return;
    }
    case kQ6_K:
      for (int h = 0; h < 2; ++h)
        for (int s = 0; s < 4; ++s)
          for (int l = 0; l < 32; ++l) {
            const uint8_t lo = blk[64 * h + 32 * (s & 1) + l];
            const int nib = s < 2 ? (lo & 0xf) : (lo >> 4);
            out[128 * h + 32 * s + l] = (nib | (((blk[128 + 32 * h + l] >> (2 * s)) & 3) << 4)) - 32;
          }
      return;
    default:
      return;
  }
}

// out[r] = the row against xs[r], r < count (any count): each block decoded once for all rows; per row the same
// float operations in the same order whatever count is, so out[r] is bitwise that of a one-row call.
void block_dot_scalar_rows(int64_t type, const uint8_t* row, const ActRow* xs, int count, int64_t k, float* out) {
  for (; count > kMaxRows; count -= kMaxRows, xs += kMaxRows, out += kMaxRows)
    block_dot_scalar_rows(type, row, xs, kMaxRows, k, out);
  int64_t values, bytes;
  block_shape(type, &values, &bytes);
  float sum[kMaxRows] = {};
  int32_t codes[kSuper];
  for (int64_t blk_i = 0; values > 0 && blk_i < k / values; ++blk_i) {
    const uint8_t* blk = row + blk_i * bytes;
    decode_codes(type, blk, codes);
    if (values == 32) {  // Q4_0, Q5_0, Q8_0: one activation block
      const float d = half_to_float(blk);
      for (int r = 0; r < count; ++r) {
        const int8_t* xq = xs[r].q + blk_i * values;
        int32_t dot = 0;
        for (int j = 0; j < 32; ++j) dot += codes[j] * xq[j];
        sum[r] += d * xs[r].d[blk_i] * static_cast<float>(dot);
      }
      continue;
    }
    if (type == kQ6_K) {
      const float d = half_to_float(blk + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
      for (int r = 0; r < count; ++r) {
        const int8_t* xq = xs[r].q + blk_i * values;
        const float* dx = xs[r].d + blk_i * 8;
        for (int b = 0; b < 8; ++b) {
          int32_t dot = 0;
          for (int l = 0; l < 32; ++l) dot += sc[2 * b + l / 16] * codes[32 * b + l] * xq[32 * b + l];
          sum[r] += d * dx[b] * static_cast<float>(dot);
        }
      }
      continue;
    }
    const float d = half_to_float(blk), dmin = half_to_float(blk + 2);
    uint8_t sm[16];
    k4_scales(blk + 4, sm);
    for (int r = 0; r < count; ++r) {
      const int8_t* xq = xs[r].q + blk_i * values;
      const float* dx = xs[r].d + blk_i * 8;
      const int32_t* sx = xs[r].sums + blk_i * 8;
      for (int j = 0; j < 8; ++j) {
        int32_t dot = 0;
        for (int l = 0; l < 32; ++l) dot += codes[32 * j + l] * xq[32 * j + l];
        sum[r] += d * static_cast<float>(sm[j]) * dx[j] * static_cast<float>(dot);
        sum[r] -= dmin * static_cast<float>(sm[8 + j]) * dx[j] * static_cast<float>(sx[j]);
      }
    }
  }
  for (int r = 0; r < count; ++r) out[r] = sum[r];
}

// --- AVX512-VNNI path ----------------------------------------------------------------------------------------------
// vpdpbusd multiplies unsigned weight codes by signed activations, four products into each int32 lane, exactly;
// each lane (a partial sum over 4 values) is converted to fp32 and multiplied into a float accumulator by its
// block's factor, so there is no horizontal sum per block. Signed codes go in as |q| against the activations negated
// where q < 0 (Q8_0), as q with the offset's products taken off by a second vpdpbusd (Q6_K), or as the unsigned codes
// q with the offset's share offset * d * sum(x) taken off in fp32 (Q4_0, Q5_0; Q4_K/Q5_K's mins likewise): every lane
// is an exact integer, and every float term a partial sum of a * x_hat or of b * x_hat, where w = a - b splits a weight
// into its scaled code and its offset or min, so the fp32 error stays relative to sum (|a| + |b|) |x_hat| (the
// test's bound relies on it).
// Each kernel is a template on N, the number of activation rows (1..kMaxRows): a weight block's codes, its scales
// and the lane permutations are computed once and used for the N rows, each row with its own accumulators and the
// same float operations in the same order as N = 1 (the one-row instance), so a row's result does not
// depend on the rows it shares a call with. Measured on one Zen 4 core, m = 1: Q4_K streams 11-14 GB/s of its own
// bytes from memory, Q6_K 16-17, gemmakit's int8 kernel 8-10 (bench/block_kernels.py; --rows for M rows).
#if GK_BLOCKS_VNNI
inline __m256i load256(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// The zmm whose low 256 bits are `lo` and high 256 bits `hi`.
inline __m512i join(__m256i lo, __m256i hi) { return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); }

// Permutation indices: lanes 0-7 take element a, lanes 8-15 element b.
inline __m512i pair_index(int a, int b) { return join(_mm256_set1_epi32(a), _mm256_set1_epi32(b)); }

// Q4_0 and Q5_0: 16 bytes of nibbles -> 32 codes (value j < 16 low nibbles, j >= 16 high)
inline __m256i nibbles32(const uint8_t* qs) {
  // the 16 bytes in both halves, the high half shifted by 4 (a broadcast load, one masked shift, one mask)
  const __m256i q = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
  return _mm256_and_si256(_mm256_mask_srli_epi16(q, 0xFF00u, q, 4), _mm256_set1_epi8(0x0f));
}

inline __m256 broadcast_lane(__m256 v, int j) { return _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(j)); }

// The fp16 scales of 8 blocks `bytes` apart, as 8 floats (gathered in general registers, one conversion).
inline __m256 eight_halves(const uint8_t* blk, int64_t bytes) {
  uint64_t packed[2] = {0, 0};
  for (int j = 0; j < 8; ++j) {
    uint16_t h;
    std::memcpy(&h, blk + bytes * j, 2);
    packed[j / 4] |= static_cast<uint64_t>(h) << (16 * (j % 4));
  }
  return _mm256_cvtph_ps(_mm_set_epi64x(static_cast<int64_t>(packed[1]), static_cast<int64_t>(packed[0])));
}

// The 32 codes of one legacy block, as vpdpbusd's unsigned operand: Q4_0 and Q5_0 their unsigned codes q (w = d *
// (q - offset)); Q8_0 |q| (q = -128 becomes 128), with `sign_from` = q, whose sign flips the activations.
template <int64_t kType>
struct LegacyCodes {
  __m256i codes, sign_from;
  explicit LegacyCodes(const uint8_t* blk) {
    if constexpr (kType == kQ8_0) {
      sign_from = load256(blk + 2);
      codes = _mm256_abs_epi8(sign_from);
    } else if constexpr (kType == kQ4_0) {
      codes = nibbles32(blk + 2);
    } else {  // Q5_0: qh's bit j is value j's 5th bit, added where set
      uint32_t qh;
      std::memcpy(&qh, blk + 2, 4);
      codes = nibbles32(blk + 6);
      codes = _mm256_mask_add_epi8(codes, static_cast<__mmask32>(qh), codes, _mm256_set1_epi8(0x10));
    }
  }
};

// Q8_0, Q4_0, Q5_0: eight blocks at a time, their factors d_w * d_x in one vector per row. Each int32 lane of a block
// is an exact partial sum over 4 values, converted to fp32 and multiplied into a float accumulator by its block's
// factor (no horizontal sum per block). Q8_0's lanes are sums of q x (|q| against x with q's sign). Q4_0's and Q5_0's
// are sums of the unsigned codes' products q x, and the offset's share, offset * d_w * d_x * sum(x codes), is taken
// off once at the end from per-block sums accumulated in fp32 (one multiply-add per 8 blocks and row, from the
// activation rows' block sums), which spares a second vpdpbusd or a sign flip per block and row. A row's last
// blocks after its groups of 8 (a 640-wide row has 4) instead start their vpdpbusd from the activation row's offset
// lanes, -offset * sum(x codes) spread over one or two lanes, so their lanes sum to sum((q - offset) x) exactly: a
// scalar correction per block and row there cost the 270M's fused step 2-4% at 8 rows (in one process), and starting
// every block so costs the one-row loop a load a block (Q5_0 [6912, 1152] 1.04x slower).
// One row: 256-bit vectors, one block each (two blocks per 512-bit vector measured slower there on Zen 4: the joins
// and 512-bit masks cost more than they save where 512-bit operations issue as two 256-bit halves). Several rows:
// two blocks per 512-bit vector, the even block in the low half, so the low half of its accumulator is the even
// blocks' accumulator of the one-row loop and the high half the odd blocks': lane for lane the same operations.
template <int64_t kType, int N>
void dot_legacy(const uint8_t* row, const ActRow* xs, int64_t k, float* out) {
  constexpr int64_t bytes = kType == kQ8_0 ? 34 : kType == kQ4_0 ? 18 : 22;
  constexpr bool kOffset = kType != kQ8_0;
  constexpr float offset = kType == kQ4_0 ? 8.0f : 16.0f;
  const int64_t nb = k / 32;
  __m256 acc[N][2], corr[N];  // corr: lane j, the offset's share of block j of each group of 8
  for (int r = 0; r < N; ++r) acc[r][0] = acc[r][1] = corr[r] = _mm256_setzero_ps();
  // Lanes of one block's (or, 512 bits, two blocks') products with the activations from block b on: q x, or with
  // `exact`, (q - offset) x.
  auto lanes = [](const __m256i& codes, const __m256i& sign_from, const ActRow& x, int64_t b, bool exact) {
    const __m256i xv = load256(x.q + 32 * b);
    if constexpr (!kOffset) return _mm256_dpbusd_epi32(_mm256_setzero_si256(), codes, _mm256_sign_epi8(xv, sign_from));
    const __m256i start = !exact ? _mm256_setzero_si256()
                          : kType == kQ5_0 ? load256(x.offset_lanes + 8 * b)
                                           : _mm256_maskz_loadu_epi32(0x01, x.offset_lanes + 8 * b);
    return _mm256_dpbusd_epi32(start, codes, xv);
  };
  auto lanes2 = [](const __m512i& codes, __mmask64 negative, const ActRow& x, int64_t b, bool exact) {
    const __m512i xv = _mm512_loadu_si512(x.q + 32 * b);
    if constexpr (!kOffset)
      return _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, _mm512_mask_sub_epi8(xv, negative, _mm512_setzero_si512(), xv));
    const __m512i start = !exact ? _mm512_setzero_si512()
                          : kType == kQ5_0 ? _mm512_loadu_si512(x.offset_lanes + 8 * b)
                                           : _mm512_maskz_loadu_epi32(0x0101, x.offset_lanes + 8 * b);
    return _mm512_dpbusd_epi32(start, codes, xv);
  };
  auto negative_of = [](const LegacyCodes<kType>& even, const LegacyCodes<kType>& odd) -> __mmask64 {
    if constexpr (kOffset) return 0;
    return _mm512_movepi8_mask(join(even.sign_from, odd.sign_from));
  };
  int64_t b = 0;
  if constexpr (N > 1) {  // the same lanes and float operations as below, two blocks per 512-bit vector
    __m512 acc2[N];
    for (int r = 0; r < N; ++r) acc2[r] = _mm512_setzero_ps();  // low half: the even blocks' acc, high: the odd's
    for (; b + 8 <= nb; b += 8) {
      const uint8_t* blk = row + bytes * b;
      prefetch_bytes(blk, 8 * bytes);
      const __m256 halves = eight_halves(blk, bytes);
      __m512 f[N];
      for (int r = 0; r < N; ++r) {
        const __m256 f8 = _mm256_mul_ps(halves, _mm256_loadu_ps(xs[r].d + b));
        if constexpr (kOffset) corr[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(load256(xs[r].sums + b)), f8, corr[r]);
        f[r] = _mm512_castps256_ps512(f8);
      }
      for (int j = 0; j < 8; j += 2) {
        const LegacyCodes<kType> even(blk + bytes * j), odd(blk + bytes * (j + 1));
        const __m512i codes = join(even.codes, odd.codes);
        const __mmask64 negative = negative_of(even, odd);
        const __m512i index = pair_index(j, j + 1);
        for (int r = 0; r < N; ++r) {
          const __m512i p = lanes2(codes, negative, xs[r], b + j, false);
          acc2[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(index, f[r]), acc2[r]);
        }
      }
    }
    for (; b + 2 <= nb; b += 2) {  // the last blocks in pairs
      const uint8_t* blk = row + bytes * b;
      const LegacyCodes<kType> even(blk), odd(blk + bytes);
      const __m512i codes = join(even.codes, odd.codes);
      const __mmask64 negative = negative_of(even, odd);
      const float d0 = half_to_float(blk), d1 = half_to_float(blk + bytes);
      for (int r = 0; r < N; ++r) {
        const __m512 f = _mm512_insertf32x8(_mm512_set1_ps(d0 * xs[r].d[b]), _mm256_set1_ps(d1 * xs[r].d[b + 1]), 1);
        acc2[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes2(codes, negative, xs[r], b, true)), f, acc2[r]);
      }
    }
    for (int r = 0; r < N; ++r) {
      acc[r][0] = _mm512_castps512_ps256(acc2[r]);
      acc[r][1] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc2[r]), 1));
    }
  }
  for (; b + 8 <= nb; b += 8) {  // (N > 1: b is past them all already)
    const uint8_t* blk = row + bytes * b;
    prefetch_bytes(blk, 8 * bytes);
    const __m256 halves = eight_halves(blk, bytes);
    __m256 f[N];
    for (int r = 0; r < N; ++r) {
      f[r] = _mm256_mul_ps(halves, _mm256_loadu_ps(xs[r].d + b));
      if constexpr (kOffset) corr[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(load256(xs[r].sums + b)), f[r], corr[r]);
    }
    for (int j = 0; j < 8; ++j) {
      const LegacyCodes<kType> w(blk + bytes * j);
      for (int r = 0; r < N; ++r) {
        const __m256i p = lanes(w.codes, w.sign_from, xs[r], b + j, false);
        acc[r][j & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), broadcast_lane(f[r], j), acc[r][j & 1]);
      }
    }
  }
  for (; b < nb; ++b) {  // the last blocks one at a time
    const uint8_t* blk = row + bytes * b;
    const LegacyCodes<kType> w(blk);
    const float d = half_to_float(blk);
    for (int r = 0; r < N; ++r) {
      const __m256i p = lanes(w.codes, w.sign_from, xs[r], b, true);
      acc[r][b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * xs[r].d[b]), acc[r][b & 1]);
    }
  }
  for (int r = 0; r < N; ++r) {
    out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
    if constexpr (kOffset) out[r] -= offset * hsum(corr[r]);
  }
}

// Q4_K and Q5_K: per super-block, the 8 sub-blocks' factors d * sc_j * d_x,j in one vector per row, and the mins'
// term dmin * m_j * d_x,j * sum(q_x) for all 8 sub-blocks in one multiply-add. A 32-byte chunk of codes holds two
// sub-blocks (low and high nibbles) whose activations are 64 consecutive bytes: one 512-bit vpdpbusd each, the
// two factors spread over its halves by one permute (1.05-1.12x faster than two 256-bit halves, measured in one
// process on a Zen 4 core).
template <bool kFive, int N>
void dot_q4_k_q5_k(const uint8_t* row, const ActRow* xs, int64_t k, float* out) {
  constexpr int64_t bytes = kFive ? 176 : 144;
  const int64_t ns = k / kSuper;
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  const __m512i bit4 = _mm512_set1_epi8(0x10);
  __m512 acc[N][2];
  __m256 mins[N];
  for (int r = 0; r < N; ++r) {
    acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    mins[r] = _mm256_setzero_ps();
  }
  for (int64_t s = 0; s < ns; ++s) {
    const uint8_t* blk = row + bytes * s;
    prefetch_bytes(blk, bytes);
    uint32_t u[4];
    k4_scales(blk + 4, reinterpret_cast<uint8_t*>(u));
    const __m128i smv = _mm_set_epi32(static_cast<int>(u[3]), static_cast<int>(u[2]), static_cast<int>(u[1]),
                                      static_cast<int>(u[0]));
    const __m256 scf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(smv));
    const __m256 mf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(smv, 8)));
    uint32_t d_dmin;  // fp16 d and dmin, converted together
    std::memcpy(&d_dmin, blk, 4);
    const __m128 dd = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(d_dmin)));
    const __m256 dsc = _mm256_mul_ps(_mm256_broadcastss_ps(dd), scf);
    const __m256 dm = _mm256_mul_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(dd)), mf);
    __m512 f[N];
    for (int r = 0; r < N; ++r) {
      const __m256 dxv = _mm256_loadu_ps(xs[r].d + 8 * s);
      f[r] = _mm512_castps256_ps512(_mm256_mul_ps(dsc, dxv));
      mins[r] = _mm256_fmadd_ps(_mm256_mul_ps(dm, dxv), _mm256_cvtepi32_ps(load256(xs[r].sums + 8 * s)), mins[r]);
    }
    const uint8_t* qs = blk + (kFive ? 48 : 16);
    __m512i qh;
    if (kFive) qh = _mm512_broadcast_i64x4(load256(blk + 16));
    for (int c = 0; c < 4; ++c) {
      // the chunk's 32 bytes in both halves, the high half shifted by 4: low nibbles | high nibbles (3 operations
      // where two 256-bit halves and their join took 5)
      const __m512i q = _mm512_broadcast_i64x4(load256(qs + 32 * c));
      __m512i codes = _mm512_and_si512(_mm512_mask_srli_epi16(q, 0xFFFF0000u, q, 4), low4);
      if (kFive) {  // sub-block 2c's 5th bits are bit 2c of qh, 2c + 1's bit 2c + 1
        const __m512i bits = join(_mm256_set1_epi8(static_cast<char>(1 << (2 * c))),
                                  _mm256_set1_epi8(static_cast<char>(1 << (2 * c + 1))));
        codes = _mm512_mask_add_epi8(codes, _mm512_test_epi8_mask(qh, bits), codes, bit4);
      }
      const __m512i index = pair_index(2 * c, 2 * c + 1);
      for (int r = 0; r < N; ++r) {
        const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes,
                                              _mm512_loadu_si512(xs[r].q + kSuper * s + 64 * c));
        acc[r][c & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(index, f[r]), acc[r][c & 1]);
      }
    }
  }
  for (int r = 0; r < N; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1])) - hsum(mins[r]);
}

// Q6_K: per lane, sum((q - 32) x) times the lane's int8 scale (lanes 0-3 of a block are its first 16 values, 4-7
// its last 16) is exact in fp32 (|lane| <= 4 * 32 * 127, |scale| <= 128: the product is below 2^24), then one fp32
// factor d * d_x per block. Two activation blocks (64 consecutive values, their codes from one 64-byte load of ql)
// per 512-bit vector.
template <int N>
void dot_q6_k(const uint8_t* row, const ActRow* xs, int64_t k, float* out) {
  const int64_t ns = k / kSuper;
  const __m512i low4 = _mm512_set1_epi8(0x0f), bits45 = _mm512_set1_epi8(0x30), offset = _mm512_set1_epi8(32);
  // per 16-bit element: the first 256 bits shift by the first count, the rest by the second
  const __m512i shift_42 = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
  const __m512i shift_02 = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);
  __m512 acc[N][2];
  for (int r = 0; r < N; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t s = 0; s < ns; ++s) {
    const uint8_t* blk = row + 210 * s;
    prefetch_bytes(blk, 210);
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192))));
    const __m256 d = _mm256_set1_ps(half_to_float(blk + 208));
    __m512 f[N];
    for (int r = 0; r < N; ++r) f[r] = _mm512_castps256_ps512(_mm256_mul_ps(d, _mm256_loadu_ps(xs[r].d + 8 * s)));
    for (int h = 0; h < 2; ++h) {
      const __m512i l = _mm512_loadu_si512(blk + 64 * h);
      const __m512i qh = _mm512_broadcast_i64x4(load256(blk + 128 + 32 * h));
      const __m512i codes[2] = {  // quarters 0 and 1 (low nibbles), 2 and 3 (high nibbles) of this half
          _mm512_or_si512(_mm512_and_si512(l, low4), _mm512_and_si512(_mm512_sllv_epi16(qh, shift_42), bits45)),
          _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), low4),
                          _mm512_and_si512(_mm512_srlv_epi16(qh, shift_02), bits45)),
      };
      for (int pair = 0; pair < 2; ++pair) {
        const int b = 4 * h + 2 * pair;  // its activation blocks are b and b + 1, their scales 2b .. 2b + 3
        const __m512 lane_scale = _mm512_permutexvar_ps(
            _mm512_set_epi32(2 * b + 3, 2 * b + 3, 2 * b + 3, 2 * b + 3, 2 * b + 2, 2 * b + 2, 2 * b + 2, 2 * b + 2,
                             2 * b + 1, 2 * b + 1, 2 * b + 1, 2 * b + 1, 2 * b, 2 * b, 2 * b, 2 * b), sc);
        const __m512i index = pair_index(b, b + 1);
        for (int r = 0; r < N; ++r) {
          const __m512i xv = _mm512_loadu_si512(xs[r].q + kSuper * s + 32 * b);
          const __m512i lanes = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), codes[pair], xv),
                                                 _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, xv));
          const __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(lanes), lane_scale);
          acc[r][pair] = _mm512_fmadd_ps(dot, _mm512_permutexvar_ps(index, f[r]), acc[r][pair]);
        }
      }
    }
  }
  for (int r = 0; r < N; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}

// Calls kernel(row, xs, k, out) for the N-row kernel of `ggml_type` (kernel is a generic lambda: each type's kernel
// is inlined into it, so a loop over weight rows in it keeps its constants and dispatch out of the loop).
template <int N, typename Body>
inline void with_kernel(int64_t ggml_type, Body body) {
  switch (ggml_type) {
    case kQ8_0: return body([](auto... a) { dot_legacy<kQ8_0, N>(a...); });
    case kQ4_0: return body([](auto... a) { dot_legacy<kQ4_0, N>(a...); });
    case kQ5_0: return body([](auto... a) { dot_legacy<kQ5_0, N>(a...); });
    case kQ4_K: return body([](auto... a) { dot_q4_k_q5_k<false, N>(a...); });
    case kQ5_K: return body([](auto... a) { dot_q4_k_q5_k<true, N>(a...); });
    case kQ6_K: return body([](auto... a) { dot_q6_k<N>(a...); });
    default: return body([](const uint8_t*, const ActRow*, int64_t, float* out) {
      for (int r = 0; r < N; ++r) out[r] = 0.0f;
    });
  }
}

// y[r * y_stride + n] = weight row n (of nrows, row_bytes apart from w) against xs[r], r < N.
template <int N>
void dot_run(int64_t ggml_type, const uint8_t* w, int64_t row_bytes, int64_t nrows, const ActRow* xs, int64_t k,
             float* y, int64_t y_stride) {
  with_kernel<N>(ggml_type, [&](auto kernel) {
    for (int64_t n = 0; n < nrows; ++n) {
      float out[N];
      kernel(w + n * row_bytes, xs, k, out);
      for (int r = 0; r < N; ++r) y[r * y_stride + n] = out[r];
    }
  });
}
#endif  // GK_BLOCKS_VNNI

// y[r * y_stride + n] = sum_i w_n[i] * xs[r][i] for the nrows weight rows w_n (stored as ggml blocks, row_bytes
// apart from w) and the `count` quantised activation rows xs[r] (any count; kMaxRows at a time, each weight block
// unpacked once for them); 0 for an unsupported type. Each value is bitwise that of a one-row call: the
// batch a row is computed in never changes its result. (The run of weight rows is a loop inside the kernels'
// dispatch: a call per weight row costs 5-15% at a decode step's row widths, measured.)
void block_dot_run(int64_t ggml_type, const uint8_t* w, int64_t row_bytes, int64_t nrows, const ActRow* xs, int count,
                   int64_t k, float* y, int64_t y_stride) {
#if GK_BLOCKS_VNNI
  for (; count > 0; count -= kMaxRows, xs += kMaxRows, y += kMaxRows * y_stride) {
    switch (std::min(count, kMaxRows)) {
      case 1: dot_run<1>(ggml_type, w, row_bytes, nrows, xs, k, y, y_stride); break;
      case 2: dot_run<2>(ggml_type, w, row_bytes, nrows, xs, k, y, y_stride); break;
      case 3: dot_run<3>(ggml_type, w, row_bytes, nrows, xs, k, y, y_stride); break;
      case 4: dot_run<4>(ggml_type, w, row_bytes, nrows, xs, k, y, y_stride); break;
      case 5: dot_run<5>(ggml_type, w, row_bytes, nrows, xs, k, y, y_stride); break;
      case 6: dot_run<6>(ggml_type, w, row_bytes, nrows, xs, k, y, y_stride); break;
      case 7: dot_run<7>(ggml_type, w, row_bytes, nrows, xs, k, y, y_stride); break;
      default: dot_run<8>(ggml_type, w, row_bytes, nrows, xs, k, y, y_stride); break;
    }
  }
#else
  for (int64_t n = 0; n < nrows; ++n) {
    float out[kMaxRows];
    for (int done = 0; done < count; done += kMaxRows) {
      const int c = std::min(count - done, kMaxRows);
      if (block_supported(ggml_type))
        block_dot_scalar_rows(ggml_type, w + n * row_bytes, xs + done, c, k, out);
      else
        for (int r = 0; r < c; ++r) out[r] = 0.0f;
      for (int r = 0; r < c; ++r) y[(done + r) * y_stride + n] = out[r];
    }
  }
#endif
}

}  // namespace
}  // namespace gk
