// The LM heads of the native library: gk_int8_matvec, gk_int4_matvec, and gk_rescored_head (final norm,
// candidates from the int4 head or the 3-bit ranker of gemmakit/ranker.py, exact int8 rescoring of the
// candidates in one call); gk_argmax; gk_greedy_step runs a whole greedy token (layers, ranked head, choice).
#include "common.h"

namespace gk {
namespace {

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
constexpr int kInt4Head = 1;

// One 64-row block of torch's CPU int4 layout ([K, 32] bytes: byte j holds row j in its low nibble and row
// j + 32 in its high one; w = (q - 8) * scale + zero per group of `group` inputs) against int8 activations.
// Four inputs at a time are transposed so that each 32-bit lane holds one row's four codes, and vpdpbusd
// multiplies them by four int8 activations in one instruction. Lane l of accumulator a (a = 0..3) holds row
// 4a + (l & 3) + 16 * (l >> 2) of the block (the order the byte unpacks leave), and +32 for the high nibbles.
//
// Software prefetches keep more of memory's bandwidth busy than the hardware's alone: the codes' stream 8 KB
// ahead and the (scale, zero) pairs' ten strided streams two blocks ahead made the 262144-row head ~1.3x faster
// (in one process, alternating: 1.8 vs 2.2 ms with the codes' prefetch, then 2.4 vs 2.85 with both on a busier
// machine). The 3-bit ranker's single stream takes the same distance (4-16 KB measured alike).
constexpr int64_t kHeadAhead = 8192;

// The largest of 64 values.
inline float max64(const float* v) {
  float mx = v[0];
  for (int r = 1; r < 64; ++r) mx = v[r] > mx ? v[r] : mx;
  return mx;
}

void int4_block(const uint8_t* block, const uint16_t* sz, int64_t rows, int64_t k, int64_t group,
                const int8_t* xq, const float* x_scales, const float* group_sums, float* y) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), high16 = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 out[8];
  for (auto& o : out) o = _mm256_setzero_ps();
  for (int64_t g0 = 0; g0 < k; g0 += group) {
    __m256i acc[8];
    for (auto& a : acc) a = _mm256_setzero_si256();
    for (int64_t i = g0; i < g0 + group; i += 4) {
      _mm_prefetch(reinterpret_cast<const char*>(block + i * 32) + kHeadAhead, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(block + i * 32) + kHeadAhead + 64, _MM_HINT_T0);
      const __m256i r0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + i * 32));
      const __m256i r1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + (i + 1) * 32));
      const __m256i r2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + (i + 2) * 32));
      const __m256i r3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + (i + 3) * 32));
      const __m256i t0 = _mm256_unpacklo_epi8(r0, r1), t1 = _mm256_unpackhi_epi8(r0, r1);
      const __m256i t2 = _mm256_unpacklo_epi8(r2, r3), t3 = _mm256_unpackhi_epi8(r2, r3);
      const __m256i u[4] = {_mm256_unpacklo_epi16(t0, t2), _mm256_unpackhi_epi16(t0, t2),
                            _mm256_unpacklo_epi16(t1, t3), _mm256_unpackhi_epi16(t1, t3)};
      int32_t quad;
      std::memcpy(&quad, xq + i, 4);
      const __m256i xv = _mm256_set1_epi32(quad);
      for (int a = 0; a < 4; ++a) {
        acc[a] = _mm256_dpbusd_epi32(acc[a], _mm256_and_si256(u[a], low4), xv);
        acc[a + 4] = _mm256_dpbusd_epi32(acc[a + 4], _mm256_and_si256(_mm256_srli_epi16(u[a], 4), low4), xv);
      }
    }
    const float xs = group_sums[g0 / group];
    const uint16_t* gsz = sz + (g0 / group) * rows * 2;
    for (int line = 0; line < 4; ++line)  // this group's pairs two blocks on: 64 rows x 4 bytes
      _mm_prefetch(reinterpret_cast<const char*>(gsz + 2 * 64 * 2) + 64 * line, _MM_HINT_T0);
    for (int a = 0; a < 8; ++a) {
      const int64_t row = 4 * (a & 3) + 32 * (a >> 2);  // lanes 0-3: row..row+3; lanes 4-7: row+16..row+19
      const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(gsz + row * 2));
      const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(gsz + (row + 16) * 2));
      const __m256i pairs = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
      const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
      const __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(pairs, high16));
      const __m256 dot = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[a]), _mm256_set1_ps(x_scales[g0 / group]));
      // sum_k ((q - 8) * scale + zero) * x = scale * (q . x) + (zero - 8 * scale) * sum_k x
      out[a] = _mm256_fmadd_ps(scale, dot, out[a]);
      out[a] = _mm256_fmadd_ps(_mm256_fnmadd_ps(_mm256_set1_ps(8.0f), scale, zero), _mm256_set1_ps(xs), out[a]);
    }
  }
  for (int a = 0; a < 8; ++a) {
    const int64_t row = 4 * (a & 3) + 32 * (a >> 2);
    _mm_storeu_ps(y + row, _mm256_castps256_ps128(out[a]));
    _mm_storeu_ps(y + row + 16, _mm256_extractf128_ps(out[a], 1));
  }
}
#else
constexpr int kInt4Head = 0;
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
// Activations for int4_block: int8 codes with one scale per group of the weight's groups (an outlier in the
// normed residual then coarsens only its own group), and each group's exact fp32 sum.
struct Int8Activations {
  std::vector<int8_t> codes;
  std::vector<float> scales, sums;  // [batch, k / group] each
};

Int8Activations quantize_rows(const float* x, int64_t batch, int64_t k, int64_t group) {
  const int64_t groups = batch * (k / group);
  Int8Activations a{std::vector<int8_t>(batch * k), std::vector<float>(groups), std::vector<float>(groups)};
  for (int64_t g = 0; g < groups; ++g) {  // rows are whole numbers of groups, so groups run over all rows
    const float* xg = x + g * group;
    float amax = 0.0f, sum = 0.0f;
    for (int64_t i = 0; i < group; ++i) {
      amax = std::fabs(xg[i]) > amax ? std::fabs(xg[i]) : amax;
      sum += xg[i];
    }
    a.scales[g] = amax > 0 ? amax / 127.0f : 1.0f;
    a.sums[g] = sum;
    for (int64_t i = 0; i < group; ++i) a.codes[g * group + i] = static_cast<int8_t>(std::nearbyint(xg[i] / a.scales[g]));
  }
  return a;
}

// y [batch, n] for the int4 weight; with `block_max`, also each 64-row block's largest output [batch, n / 64].
void int4_matvec(const uint8_t* packed, const uint16_t* sz, int64_t n, int64_t k, int64_t group, const float* x,
                 int64_t batch, float* y, float* block_max, int threads) {
  const Int8Activations a = quantize_rows(x, batch, k, group);
  const int64_t blocks = n / 64;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t b = 0; b < batch; ++b) {
      float* out = y + b * n + blk * 64;
      int4_block(packed + blk * k * 32, sz + blk * 64 * 2, n, k, group, a.codes.data() + b * k,
                 a.scales.data() + b * (k / group), a.sums.data() + b * (k / group), out);
      if (block_max != nullptr) block_max[b * blocks + blk] = max64(out);
    }
}

// One 64-row block of the 3-bit ranker (layout: gemmakit/ranker.py) against int8 activations [k] with one scale
// and one exact sum per 64 inputs: y[64] = sum over groups of scale * (codes . x) + minimum * sum(x). For each
// quarter of 16 rows and each 4 consecutive inputs, a shift and a mask take their two low bits from a low plane and
// a shift and a mask their high bit (as 4) from a high plane; one ternary-logic op joins them into the 3-bit codes
// (0..7), ready for vpdpbusd against those 4 inputs' activations. So each activation row costs one vpdpbusd per 4
// inputs of 16 rows (adding the high plane in a second vpdpbusd doubled that: the head of 8 rows ran 12.8 ms, not
// 7, on the 270M). The block is one sequential stream: 7 cache lines per quarter, prefetched 8 KB ahead.
constexpr int64_t kQuarterBytes = 448;  // 16 rows x 64 inputs: 4 + 2 planes of 64 bytes, 64 bytes of pairs
constexpr int kRankerRows = 8;          // activation rows sharing one unpacking of a block

template <int R>
void int3_block(const uint8_t* block, int64_t groups, const int8_t* xq, const float* x_scales,
                const float* group_sums, int64_t k, int64_t n, float* y) {
  // R activation rows at once (row r's codes at xq + r * k, its per-group scales and sums at + r * groups, its
  // output at y + r * n): the bit planes are unpacked once for all R rows. Each row's integer dot products are exact
  // and its float steps are those of a row alone, in the same order, so results do not depend on R.
  const __m512i low2 = _mm512_set1_epi8(0x03), four = _mm512_set1_epi8(0x04);
  const __m512i high16 = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 out[R][4];
  for (int r = 0; r < R; ++r)
    for (auto& o : out[r]) o = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* quads[R];  // this group's activations, per row
    __m512 xs[R], sums[R];
    for (int r = 0; r < R; ++r) {
      quads[r] = xq + r * k + g * 64;
      xs[r] = _mm512_set1_ps(x_scales[r * groups + g]);
      sums[r] = _mm512_set1_ps(group_sums[r * groups + g]);
    }
    for (int r4 = 0; r4 < 4; ++r4) {
      const uint8_t* q = block + (g * 4 + r4) * kQuarterBytes;
      for (int line = 0; line < 7; ++line) _mm_prefetch(reinterpret_cast<const char*>(q) + kHeadAhead + 64 * line,
                                                        _MM_HINT_T0);
      __m512i acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
      // low planes: byte j of a lane holds inputs 16c + 4s + j at bits 2s, 2s+1 (c < 4, s < 4); high planes: byte
      // j holds input 32c + 4s + j at bit s (c < 2, s < 8). Inputs 4i..4i+3: low plane i / 4, high plane i / 8.
      const __m512i high[2] = {_mm512_loadu_si512(q + 256), _mm512_loadu_si512(q + 320)};
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const __m512i low = _mm512_loadu_si512(q + c * 64);
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) {
          const int i = 4 * c + s, bit = i & 7;
          const __m512i h = high[i >> 3];
          const __m512i at2 = bit <= 2 ? _mm512_slli_epi16(h, 2 - bit) : _mm512_srli_epi16(h, bit - 2);
          // (low >> 2s) & 3 | (at2 & 4)
          const __m512i codes = _mm512_ternarylogic_epi32(_mm512_srli_epi16(low, 2 * s), low2,
                                                          _mm512_and_si512(at2, four), 0xEA);
          for (int r = 0; r < R; ++r) {
            int32_t quad;  // inputs 4i..4i+3 of row r
            std::memcpy(&quad, quads[r] + 4 * i, 4);
            acc[r] = _mm512_dpbusd_epi32(acc[r], codes, _mm512_set1_epi32(quad));
          }
        }
      }
      const __m512i pairs = _mm512_loadu_si512(q + 384);  // (scale, minimum) bf16 of the quarter's 16 rows
      const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      const __m512 minimum = _mm512_castsi512_ps(_mm512_and_si512(pairs, high16));
      for (int r = 0; r < R; ++r) {
        out[r][r4] = _mm512_fmadd_ps(scale, _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r]), xs[r]), out[r][r4]);
        out[r][r4] = _mm512_fmadd_ps(minimum, sums[r], out[r][r4]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int r4 = 0; r4 < 4; ++r4) _mm512_storeu_ps(y + r * n + 16 * r4, out[r][r4]);
}

// int3_block for `rows` (1..kRankerRows) activation rows.
void int3_block_rows(int64_t rows, const uint8_t* block, int64_t groups, const int8_t* xq, const float* x_scales,
                     const float* group_sums, int64_t k, int64_t n, float* y) {
  switch (rows) {
    case 1: return int3_block<1>(block, groups, xq, x_scales, group_sums, k, n, y);
    case 2: return int3_block<2>(block, groups, xq, x_scales, group_sums, k, n, y);
    case 3: return int3_block<3>(block, groups, xq, x_scales, group_sums, k, n, y);
    case 4: return int3_block<4>(block, groups, xq, x_scales, group_sums, k, n, y);
    case 5: return int3_block<5>(block, groups, xq, x_scales, group_sums, k, n, y);
    case 6: return int3_block<6>(block, groups, xq, x_scales, group_sums, k, n, y);
    case 7: return int3_block<7>(block, groups, xq, x_scales, group_sums, k, n, y);
    default: return int3_block<8>(block, groups, xq, x_scales, group_sums, k, n, y);
  }
}

// y [batch, n] from the 3-bit ranker of a [n, k] head, and each 64-row block's largest value [batch, n / 64].
void int3_matvec(const uint8_t* planes, int64_t n, int64_t k, const float* x, int64_t batch, float* y,
                 float* block_max, int threads) {
  const Int8Activations a = quantize_rows(x, batch, k, 64);
  const int64_t blocks = n / 64;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const uint8_t* block = planes + blk * (k / 64) * 4 * kQuarterBytes;
    for (int64_t b = 0; b < batch;) {  // up to kRankerRows activation rows per pass over the block
      const int64_t rows = std::min<int64_t>(kRankerRows, batch - b), groups = k / 64;
      const int8_t* codes = a.codes.data() + b * k;
      const float *scales = a.scales.data() + b * groups, *sums = a.sums.data() + b * groups;
      float* out = y + b * n + blk * 64;
      int3_block_rows(rows, block, groups, codes, scales, sums, k, n, out);
      for (int64_t r = 0; r < rows; ++r) block_max[(b + r) * blocks + blk] = max64(out + r * n);
      b += rows;
    }
  }
}
#endif

// Whether the int4 kernel is compiled in and takes this shape: whole 64-row blocks, whole groups of 4k inputs.
bool int4_shape_ok(int64_t n, int64_t k, int64_t group) {
  return kInt4Head && n % 64 == 0 && k % group == 0 && group % 4 == 0;
}

// The `count` largest of values[0..n) (their indices, in no particular order), among `pool` indices.
std::vector<int64_t> largest(const float* values, std::vector<int64_t> pool, int64_t count) {
  auto greater = [values](int64_t a, int64_t b) { return values[a] > values[b] || (values[a] == values[b] && a < b); };
  if (static_cast<int64_t>(pool.size()) > count) {
    std::nth_element(pool.begin(), pool.begin() + count, pool.end(), greater);
    pool.resize(count);
  }
  return pool;
}

// Whether `a` beats `b` as torch's argmax sees it: larger, a NaN before any number, the lower index on ties.
inline bool beats(float ya, int64_t a, float yb, int64_t b) {
  const bool nan_a = ya != ya, nan_b = yb != yb;
  if (nan_a || nan_b) return nan_a && (!nan_b || a < b);
  return ya > yb || (ya == yb && a < b);
}

// The decode-time LM head of scheme int8-rescore: x = rms_norm(h) * (1 + w); coarse logits [batch, n] from the
// int4 head (or, with `ranked`, the 3-bit ranker); then the `candidates` largest of each row recomputed exactly
// from the int8 table (fp32 x). The largest logits lie in the blocks of 64 rows with the largest maxima (a block
// holding one of them has a maximum at least as large, and only `candidates` blocks can), so the search reads
// 64 x candidates values. With `best`, best[b] is the best candidate of row b by its exact logit.
int rescored_head(const float* h, int64_t batch, const GkHead* head, float* y, int threads, bool ranked,
                  int64_t* best) {
  const int64_t n = head->n, k = head->k, candidates = head->candidates;
  if (!int4_shape_ok(n, k, head->group) || candidates > n / 64 || (ranked && (head->ranker == nullptr || k % 64)))
    return -1;
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
  std::vector<float> x(batch * k), block_max(batch * (n / 64));
  for (int64_t b = 0; b < batch; ++b) rms_norm(h + b * k, head->norm, head->eps, x.data() + b * k, k);
  if (ranked)
    int3_matvec(head->ranker, n, k, x.data(), batch, y, block_max.data(), threads);
  else
    int4_matvec(head->packed, head->scales_zeros, n, k, head->group, x.data(), batch, y, block_max.data(), threads);
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<int64_t> blocks(n / 64);
    for (int64_t i = 0; i < n / 64; ++i) blocks[i] = i;
    // the candidates-th largest block maximum is a floor for the candidates largest values (the chosen blocks'
    // maxima are that many values at least as large), so only values above it need ranking
    const float* maxima = block_max.data() + b * (n / 64);
    const std::vector<int64_t> chosen = largest(maxima, blocks, candidates);
    float floor = INFINITY;
    for (int64_t blk : chosen) floor = std::min(floor, maxima[blk]);
    float* yb = y + b * n;
    std::vector<int64_t> rows;
    for (int64_t blk : chosen)
      for (int64_t r = blk * 64; r < blk * 64 + 64; ++r)
        if (yb[r] >= floor) rows.push_back(r);
    rows = largest(yb, rows, candidates);
    for (int64_t row : rows) yb[row] = dot(head->table + row * k, x.data() + b * k, k) * head->table_scale[row];
    if (best != nullptr) {
      // Gemma 2 compares capped logits: tanh is monotone, so the candidates are the same, but two logits may
      // cap to one fp32 value, and the lower index must then win as in the capped logits' argmax
      const float cap = head->final_softcap;
      auto value = [&](int64_t row) { return cap > 0 ? std::tanh(yb[row] / cap) * cap : yb[row]; };
      int64_t top = rows[0];
      float top_value = value(top);
      for (int64_t row : rows) {
        const float v = value(row);
        if (beats(v, row, top_value, top)) top = row, top_value = v;
      }
      best[b] = top;
    }
  }
#endif
  return 0;
}

}  // namespace
}  // namespace gk

using namespace gk;

extern "C" {

// 1 when gk_int4_matvec is compiled in (it needs AVX512-VNNI); the caller keeps torch's kernel otherwise.
int gk_has_int4_matvec() { return kInt4Head; }

// y [batch, n] = x [batch, k] W^T for W int4 in torch's CPU layout ([n/64, k, 32] bytes) with bf16 (scale, zero)
// pairs [k/group, n, 2]. The activations are rounded to int8 with one scale per group of inputs (the head's own
// error dominates: this is for heads that only rank candidates). Returns -1 if unsupported.
int gk_int4_matvec(const uint8_t* packed, const uint16_t* scales_zeros, int64_t n, int64_t k, int64_t group,
                   const float* x, int64_t batch, float* y, int threads) {
  if (!int4_shape_ok(n, k, group)) return -1;
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
  int4_matvec(packed, scales_zeros, n, k, group, x, batch, y, nullptr, threads);
#endif
  return 0;
}

// rescored_head: coarse logits from the int4 head (sampling), or with `ranked` from the 3-bit ranker (what greedy
// decoding ranks by; its tail is too coarse to sample from); `best` may be null.
int gk_rescored_head(const float* h, int64_t batch, const GkHead* head, float* y, int ranked, int64_t* best,
                     int threads) {
  return rescored_head(h, batch, head, y, threads, ranked != 0, best);
}

// out[b] = the index of the first largest value of row b of y [rows, n], as torch's argmax (a NaN counts as
// the largest, as there). One vectorised pass over logits the head has just written, still in cache.
void gk_argmax(const float* y, int64_t rows, int64_t n, int64_t* out) {
  for (int64_t b = 0; b < rows; ++b) {
    const float* row = y + b * n;
    // pass 1: the largest value, and whether there is a NaN
    float top = row[0];
    bool nan = false;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 vtop = _mm512_set1_ps(top);
    __mmask16 nans = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512 v = _mm512_loadu_ps(row + i);
      nans |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      vtop = _mm512_max_ps(vtop, v);
    }
    top = _mm512_reduce_max_ps(vtop);
    nan = nans != 0;
#endif
    for (; i < n; ++i) {
      nan = nan || row[i] != row[i];
      top = row[i] > top ? row[i] : top;
    }
    // pass 2: the first index holding it (or the first NaN)
    i = 0;
#if defined(__AVX512F__)
    const __m512 target = _mm512_set1_ps(top);
    for (; i + 16 <= n; i += 16) {
      const __m512 v = _mm512_loadu_ps(row + i);
      const __mmask16 hit = nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(v, target, _CMP_EQ_OQ);
      if (hit != 0) break;
    }
#endif
    while (i < n && !(nan ? row[i] != row[i] : row[i] == top)) ++i;
    out[b] = i;
  }
}

// y [batch, n] = x [batch, k] W^T for W int8 [n, k] with fp32 row scales (an int8 LM head).
void gk_int8_matvec(const int8_t* w, const float* scale, int64_t n, int64_t k, const float* x, int64_t batch,
                    float* y, int threads) {
  const MatVec job = {w, scale, n, k, x, y};
#pragma omp parallel num_threads(threads)
  matvecs(&job, 1, batch);
}

// Greedy decoding's whole step for ids [n] (rows and times as gk_decode_step's): the layers (h [n, hidden] is
// scratch), then the head into `logits` [n, vocab] (scratch) and each row's token into `out` [n]. With a 3-bit
// ranker, the token is the best candidate it proposes by exact int8 logit; without, torch's argmax of the int4
// head's rescored logits.
int gk_greedy_step(const GkModel* model, const GkHead* head, const int64_t* ids, const int64_t* rows,
                   const int64_t* times, int64_t n, float* h, float* logits, int64_t* out, int threads) {
  int done = gk_decode_step(model, h, ids, rows, times, n, threads);
  if (done != 0) return done;
  if (head->ranker != nullptr) return rescored_head(h, n, head, logits, threads, true, out);
  done = rescored_head(h, n, head, logits, threads, false, nullptr);
  if (done != 0) return done;
  if (head->final_softcap > 0)
    for (int64_t i = 0; i < n * head->n; ++i) logits[i] = std::tanh(logits[i] / head->final_softcap) * head->final_softcap;
  gk_argmax(logits, n, head->n, out);
  return 0;
}

}  // extern "C"
