// One decode step of a Gemma model with int8 weight-only linears, all layers in one OpenMP region.
//
// Why this exists: decoding one token of a small Gemma through torch runs ~1,500 small ops, and their
// dispatch costs about as much as reading every weight. Here each layer is a handful of loops over raw
// pointers: int8 x fp32 dot products (weights read once, at memory speed), norms, rope, attention over the
// KV cache and GeGLU, with threads meeting at barriers instead of being forked and joined per op.
//
// Numerics: activations stay fp32 from the embedding to the final residual (torch's quantised path rounds
// them to bf16 between ops); weights are w = q * scale exactly as `gemmakit.quant.Int8Linear` defines them.
// So this step computes the fp32 model whose weights are the dequantised int8 ones, to fp32 rounding.
// The step embeds token ids itself (or takes the caller's embeddings). The LM heads follow at the end of this
// file: gk_int8_matvec, gk_int4_matvec, and gk_rescored_head (final norm, candidates from the int4 head or the
// 3-bit ranker of gemmakit/ranker.py, exact int8 rescoring of the candidates in one call); gk_greedy_step
// runs a whole greedy token (layers, ranked head, choice) in one call.
//
// Built by gemmakit.native_decode with g++ -O3 -march=native -fopenmp and called through ctypes; the
// OpenMP runtime it links is the one torch has already loaded (same soname), so threads are shared.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

extern "C" {

// One layer's tensors. Norm multipliers are (1 + w) in fp32; absent ones are null (Gemma 1 has no norms after
// attention and MLP, and no q/k norms; its pre-MLP norm goes in pre_ffw_norm).
struct GkLayer {
  const int8_t *wq, *wk, *wv, *wo, *wg, *wu, *wd;
  const float *sq, *sk, *sv, *so, *sg, *su, *sd;
  const float *input_norm, *post_attn_norm, *pre_ffw_norm, *post_ffw_norm, *q_norm, *k_norm;
  float *keys, *values;  // [B, kv_heads, slots, head_dim]
  int64_t slots;         // capacity for global layers, ring size for sliding ones
  int64_t sliding;
};

struct GkModel {
  int64_t batch, hidden, heads, kv_heads, head_dim, intermediate, num_layers;
  float eps, scale, attn_softcap;  // softcap <= 0: none
  const GkLayer* layers;
  const float *cos_local, *sin_local, *cos_global, *sin_global;  // [positions, head_dim]; sin carries rope's sign
  const int64_t* pad;         // [B] left padding of each row
  int64_t* ring_times;        // [ring] time held by each sliding slot (-1: empty); the step records `now` in it
  int64_t ring;
  const int8_t* embed_table;  // the int8 embedding [vocab, hidden] with fp32 row scales, or null (the caller embeds)
  const float* embed_scales;
  float normaliser;           // sqrt(hidden), Gemma's embedding scale
};

// The decode-time LM head of scheme int8-rescore: final norm (multiplier 1 + w), the int4 candidate head in
// torch's CPU layout ([n/64, k, 32] bytes, bf16 (scale, zero) pairs [k/group, n, 2]) and the exact int8 table
// [n, k] with fp32 row scales, of which the `candidates` best rows are recomputed.
struct GkHead {
  const float* norm;
  float eps;
  const uint8_t* packed;
  const uint16_t* scales_zeros;
  int64_t n, k, group;
  const int8_t* table;
  const float* table_scale;
  int64_t candidates;
  const uint8_t* ranker;  // the 3-bit ranker (gemmakit/ranker.py) greedy decoding picks candidates with, or null
};

}  // extern "C"

namespace {

// --- vector helpers -------------------------------------------------------------------------------------------
#if defined(__AVX512F__)
// exp(x) for 16 floats: Cephes' range reduction and degree-5 polynomial (about 1 ulp), then scalef by 2^n.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif

// sum_i w[i] x[i] for fp32 or int8 w, read as one sequential stream: four accumulators and a software prefetch
// 6 KB ahead, one per cache line, made the 270M's layers ~15% faster than two accumulators and a prefetch 4 KB
// ahead every 32 inputs (measured in one process against each other: 2.27 vs 2.70 ms for all 18 layers).
constexpr int64_t kPrefetchAhead = 6144;

template <typename T>
float dot(const T* w, const float* x, int64_t k) {
  float sum = 0.0f;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  for (; i + 64 <= k; i += 64) {
    for (size_t line = 0; line < sizeof(T); ++line)  // 64 inputs are sizeof(T) cache lines
      _mm_prefetch(reinterpret_cast<const char*>(w + i) + kPrefetchAhead + 64 * line, _MM_HINT_T0);
    a0 = _mm512_fmadd_ps(load16(w + i), _mm512_loadu_ps(x + i), a0);
    a1 = _mm512_fmadd_ps(load16(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
    a2 = _mm512_fmadd_ps(load16(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
    a3 = _mm512_fmadd_ps(load16(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
  }
  for (; i + 16 <= k; i += 16) a0 = _mm512_fmadd_ps(load16(w + i), _mm512_loadu_ps(x + i), a0);
  sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
  for (; i < k; ++i) sum += static_cast<float>(w[i]) * x[i];
  return sum;
}

// y += alpha * x
void axpy(float alpha, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 va = _mm512_set1_ps(alpha);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// out = x / rms(x) * mult, over n values (mult is 1 + w)
void rms_norm(const float* x, const float* mult, float eps, float* out, int64_t n) {
  float inv = 1.0f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inv * mult[i];
}

// h += norm(branch), or h += branch when there is no norm: the residual update after attention and after the MLP
void add_branch(float* h, float* branch, const float* norm, float eps, int64_t n) {
  if (norm != nullptr) rms_norm(branch, norm, eps, branch, n);
  for (int64_t i = 0; i < n; ++i) h[i] += branch[i];
}

// gelu_tanh(g) * u, written as g * sigmoid(2 * sqrt(2/pi) * (g + 0.044715 g^3)) * u
void geglu(const float* g, const float* u, float* out, int64_t n) {
  const float c = 2.0f * 0.7978845608028654f;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vc = _mm512_set1_ps(c), vk = _mm512_set1_ps(0.044715f), one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= n; i += 16) {
    __m512 x = _mm512_loadu_ps(g + i);
    __m512 inner = _mm512_mul_ps(vc, _mm512_fmadd_ps(_mm512_mul_ps(vk, x), _mm512_mul_ps(x, x), x));
    __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), inner))));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(x, sig), _mm512_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) {
    float x = g[i];
    out[i] = x / (1.0f + std::exp(-c * (x + 0.044715f * x * x * x))) * u[i];
  }
}

// s[i] = exp(s[i] - shift) in place; returns their sum
float exp_shifted(float* s, int64_t n, float shift) {
  float sum = 0.0f;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 vshift = _mm512_set1_ps(shift), vsum = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i), vshift));
    _mm512_storeu_ps(s + i, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  sum = _mm512_reduce_add_ps(vsum);
#endif
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - shift);
    sum += s[i];
  }
  return sum;
}

// --- int8 weight-only matrix-vector products --------------------------------------------------------------------
// One job: y[m, n] = scale[n] * sum_k w[n, k] x[m, k] for rows n of one [rows, cols] int8 matrix.
struct MatVec {
  const int8_t* w;
  const float* scale;
  int64_t rows, cols;
  const float* x;  // [batch, cols]
  float* y;        // [batch, rows]
};

// Row n against every activation row. One row at a time, so the weights are read as one sequential stream:
// interleaving four rows (four streams 640 bytes apart) was measured 1.7x slower on the 270M's layers.
void one_row(const MatVec& job, int64_t n, int64_t batch) {
  const int8_t* w = job.w + n * job.cols;
  for (int64_t m = 0; m < batch; ++m) job.y[m * job.rows + n] = dot(w, job.x + m * job.cols, job.cols) * job.scale[n];
}

// Share the rows of several matrices among the team's threads (called by every thread of the region): each
// thread gets one contiguous run of rows.
void matvecs(const MatVec* jobs, int count, int64_t batch) {
  int64_t rows = 0;
  for (int j = 0; j < count; ++j) rows += jobs[j].rows;
#pragma omp for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    int64_t n = r;
    int j = 0;
    while (n >= jobs[j].rows) n -= jobs[j++].rows;
    one_row(jobs[j], n, batch);
  }
}

// --- attention ------------------------------------------------------------------------------------------------
// May row `b` at time `now` see the key held at `time`? (the cache's causal and padding rules; the window needs
// no test: a sliding layer's ring has at most `window` slots, so it only ever holds the last `window` times)
inline bool visible(const GkModel& m, int64_t b, int64_t time, int64_t now) {
  if (time < 0 || time > now) return false;
  return time >= m.pad[b] || time == now;
}

// Flash-decoding: the keys are cut into chunks attended in parallel, each giving per query head its largest
// score, the sum of exp(score - largest) and the unnormalised output; `merge_chunks` combines them exactly.
// A chunk serves all query heads that share its kv head, so each key and value is read once per chunk.
// part: [groups, 2 + head_dim] (largest score, sum, output) for the rows' query heads q [groups, head_dim].
void attend_chunk(const GkModel& m, const GkLayer& layer, int64_t b, int64_t kv, int64_t now, int64_t lo,
                  int64_t hi, const float* q, float* part, std::vector<float>& scores, std::vector<int64_t>& slots) {
  const int64_t d = m.head_dim, groups = m.heads / m.kv_heads;
  const float* keys = layer.keys + (b * m.kv_heads + kv) * layer.slots * d;
  const float* values = layer.values + (b * m.kv_heads + kv) * layer.slots * d;
  slots.clear();
  for (int64_t s = lo; s < hi; ++s)
    if (visible(m, b, layer.sliding ? m.ring_times[s] : s, now)) slots.push_back(s);
  const int64_t n = static_cast<int64_t>(slots.size());
  scores.resize(groups * n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < groups; ++j) {
      float score = dot(q + j * d, keys + slots[i] * d, d) * m.scale;
      if (m.attn_softcap > 0) score = std::tanh(score / m.attn_softcap) * m.attn_softcap;
      scores[j * n + i] = score;
    }
  for (int64_t j = 0; j < groups; ++j) {
    float* row = scores.data() + j * n;
    float largest = -INFINITY;
    for (int64_t i = 0; i < n; ++i) largest = row[i] > largest ? row[i] : largest;
    part[j * (d + 2)] = largest;
    part[j * (d + 2) + 1] = exp_shifted(row, n, largest);  // 0 for an empty chunk
    std::memset(part + j * (d + 2) + 2, 0, sizeof(float) * d);
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < groups; ++j) axpy(scores[j * n + i], values + slots[i] * d, part + j * (d + 2) + 2, d);
}

// softmax(scores) @ values for query head j from the chunks' partial results [chunks, groups, 2 + head_dim].
// A chunk with no visible key has largest -inf, sum 0 and output 0, so its weight exp(-inf) is 0.
void merge_chunks(const float* parts, int64_t chunks, int64_t groups, int64_t j, int64_t d, float* out) {
  float largest = -INFINITY;
  for (int64_t c = 0; c < chunks; ++c) largest = std::max(largest, parts[(c * groups + j) * (d + 2)]);
  float total = 0.0f;
  std::memset(out, 0, sizeof(float) * d);
  for (int64_t c = 0; c < chunks; ++c) {
    const float* part = parts + (c * groups + j) * (d + 2);
    const float weight = std::exp(part[0] - largest);
    total += weight * part[1];
    axpy(weight, part + 2, out, d);
  }
  for (int64_t i = 0; i < d; ++i) out[i] /= total;  // every query sees at least itself: total > 0
}

// x * cos + roll(x, d/2) * signed_sin, in place, for one head
void rope(float* x, const float* cos, const float* sin, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    float lo = x[i], hi = x[i + half];
    x[i] = lo * cos[i] + hi * sin[i];
    x[i + half] = hi * cos[i + half] + lo * sin[i + half];
  }
}

}  // namespace

extern "C" {

// Advance every row of `h` ([B, hidden] fp32, updated in place) through all layers at time `now`, writing
// this step's keys and values into the cache and `now` into the ring's slot. With `ids` ([B] token ids), h is
// first filled with their embeddings, E[id] * sqrt(hidden) in fp32.
int gk_decode_step(const GkModel* model, float* h, const int64_t* ids, int64_t now, int threads) {
  const GkModel& m = *model;
  m.ring_times[now % m.ring] = now;
  if (ids != nullptr) {
    if (m.embed_table == nullptr) return -1;
    for (int64_t b = 0; b < m.batch; ++b) {
      const int8_t* row = m.embed_table + ids[b] * m.hidden;
      const float scale = m.embed_scales[ids[b]] * m.normaliser;
      for (int64_t i = 0; i < m.hidden; ++i) h[b * m.hidden + i] = static_cast<float>(row[i]) * scale;
    }
  }
  const int64_t B = m.batch, D = m.hidden, hd = m.head_dim, I = m.intermediate;
  const int64_t qd = m.heads * hd, kvd = m.kv_heads * hd;
  std::vector<float> xn(B * D), q(B * qd), k(B * kvd), v(B * kvd), att(B * qd), o(B * D);
  std::vector<float> gate(B * I), up(B * I), act(B * I), down(B * D);
  const int64_t groups = m.heads / m.kv_heads, max_chunks = 2 * threads;
  std::vector<float> parts(B * m.kv_heads * max_chunks * groups * (hd + 2));
  std::vector<int64_t> pos(B);
  for (int64_t b = 0; b < B; ++b) pos[b] = now - m.pad[b] > 0 ? now - m.pad[b] : 0;

#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores;
    std::vector<int64_t> slots;
    for (int64_t l = 0; l < m.num_layers; ++l) {
      const GkLayer& L = m.layers[l];
      const float* cos = L.sliding ? m.cos_local : m.cos_global;
      const float* sin = L.sliding ? m.sin_local : m.sin_global;
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) rms_norm(h + b * D, L.input_norm, m.eps, xn.data() + b * D, D);

      const MatVec qkv[3] = {{L.wq, L.sq, qd, D, xn.data(), q.data()},
                             {L.wk, L.sk, kvd, D, xn.data(), k.data()},
                             {L.wv, L.sv, kvd, D, xn.data(), v.data()}};
      matvecs(qkv, 3, B);

      // q/k norms and rope per head; k and v go into the cache
#pragma omp for schedule(static)
      for (int64_t t = 0; t < B * (m.heads + m.kv_heads); ++t) {
        const int64_t b = t / (m.heads + m.kv_heads), head = t % (m.heads + m.kv_heads);
        const bool is_q = head < m.heads;
        float* x = is_q ? q.data() + b * qd + head * hd : k.data() + b * kvd + (head - m.heads) * hd;
        const float* norm = is_q ? L.q_norm : L.k_norm;
        if (norm != nullptr) rms_norm(x, norm, m.eps, x, hd);
        rope(x, cos + pos[b] * hd, sin + pos[b] * hd, hd);
        if (!is_q) {
          const int64_t kvh = head - m.heads;
          const int64_t slot = L.sliding ? now % L.slots : now;
          const int64_t at = ((b * m.kv_heads + kvh) * L.slots + slot) * hd;
          std::memcpy(L.keys + at, x, sizeof(float) * hd);
          std::memcpy(L.values + at, v.data() + b * kvd + kvh * hd, sizeof(float) * hd);
        }
      }

      // attention: chunks of at least 32 keys, up to two per thread, then the merge per query head
      const int64_t used = L.sliding ? (now + 1 < L.slots ? now + 1 : L.slots) : now + 1;
      const int64_t key_chunks = std::max<int64_t>(1, std::min<int64_t>(max_chunks, used / 32));
#pragma omp for schedule(static)
      for (int64_t t = 0; t < B * m.kv_heads * key_chunks; ++t) {
        const int64_t b = t / (m.kv_heads * key_chunks), kv = t / key_chunks % m.kv_heads, c = t % key_chunks;
        attend_chunk(m, L, b, kv, now, c * used / key_chunks, (c + 1) * used / key_chunks,
                     q.data() + b * qd + kv * groups * hd, parts.data() + t * groups * (hd + 2), scores, slots);
      }
#pragma omp for schedule(static)
      for (int64_t t = 0; t < B * m.heads; ++t) {
        const int64_t b = t / m.heads, head = t % m.heads, kv = head / groups;
        merge_chunks(parts.data() + (b * m.kv_heads + kv) * key_chunks * groups * (hd + 2), key_chunks, groups,
                     head % groups, hd, att.data() + b * qd + head * hd);
      }

      const MatVec out_proj[1] = {{L.wo, L.so, D, qd, att.data(), o.data()}};
      matvecs(out_proj, 1, B);

#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        add_branch(h + b * D, o.data() + b * D, L.post_attn_norm, m.eps, D);
        rms_norm(h + b * D, L.pre_ffw_norm, m.eps, xn.data() + b * D, D);
      }

      const MatVec gate_up[2] = {{L.wg, L.sg, I, D, xn.data(), gate.data()},
                                 {L.wu, L.su, I, D, xn.data(), up.data()}};
      matvecs(gate_up, 2, B);

      const int64_t chunks = (B * I + 255) / 256;
#pragma omp for schedule(static)
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t start = c * 256, n = start + 256 <= B * I ? 256 : B * I - start;
        geglu(gate.data() + start, up.data() + start, act.data() + start, n);
      }

      const MatVec down_proj[1] = {{L.wd, L.sd, D, I, act.data(), down.data()}};
      matvecs(down_proj, 1, B);

#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) add_branch(h + b * D, down.data() + b * D, L.post_ffw_norm, m.eps, D);
    }
  }
  return 0;
}

}  // extern "C"

// --- LM heads -----------------------------------------------------------------------------------------------------
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
// quarter of 16 rows, one shift and one mask leave 16 rows x 4 consecutive inputs of one bit plane, ready for
// vpdpbusd against those 4 inputs' activations; the high bit is masked in place as 4 (so both planes add up in
// one accumulator). The block is one sequential stream: 7 cache lines per quarter, prefetched 8 KB ahead.
constexpr int64_t kQuarterBytes = 448;  // 16 rows x 64 inputs: 4 + 2 planes of 64 bytes, 64 bytes of pairs

void int3_block(const uint8_t* block, int64_t groups, const int8_t* xq, const float* x_scales,
                const float* group_sums, float* y) {
  const __m512i low2 = _mm512_set1_epi8(0x03), four = _mm512_set1_epi8(0x04);
  const __m512i high16 = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 out[4];
  for (auto& o : out) o = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    int32_t quads[16];  // activations of inputs 4i..4i+3 of this group
    std::memcpy(quads, xq + g * 64, 64);
    const __m512 xs = _mm512_set1_ps(x_scales[g]), sums = _mm512_set1_ps(group_sums[g]);
    for (int r4 = 0; r4 < 4; ++r4) {
      const uint8_t* q = block + (g * 4 + r4) * kQuarterBytes;
      for (int line = 0; line < 7; ++line) _mm_prefetch(reinterpret_cast<const char*>(q) + kHeadAhead + 64 * line,
                                                        _MM_HINT_T0);
      __m512i acc = _mm512_setzero_si512();
      for (int c = 0; c < 4; ++c) {  // low planes: byte j of a lane holds inputs 16c + 4s + j at bits 2s, 2s+1
        const __m512i v = _mm512_loadu_si512(q + c * 64);
        for (int s = 0; s < 4; ++s)
          acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(v, 2 * s), low2),
                                    _mm512_set1_epi32(quads[c * 4 + s]));
      }
      for (int c = 0; c < 2; ++c) {  // high planes: byte j holds input 32c + 4s + j at bit s, moved to bit 2
        const __m512i v = _mm512_loadu_si512(q + 256 + c * 64);
        for (int s = 0; s < 8; ++s) {
          const __m512i at2 = s <= 2 ? _mm512_slli_epi16(v, 2 - s) : _mm512_srli_epi16(v, s - 2);
          acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(at2, four), _mm512_set1_epi32(quads[c * 8 + s]));
        }
      }
      const __m512i pairs = _mm512_loadu_si512(q + 384);  // (scale, minimum) bf16 of the quarter's 16 rows
      const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      const __m512 minimum = _mm512_castsi512_ps(_mm512_and_si512(pairs, high16));
      out[r4] = _mm512_fmadd_ps(scale, _mm512_mul_ps(_mm512_cvtepi32_ps(acc), xs), out[r4]);
      out[r4] = _mm512_fmadd_ps(minimum, sums, out[r4]);
    }
  }
  for (int r4 = 0; r4 < 4; ++r4) _mm512_storeu_ps(y + 16 * r4, out[r4]);
}

// y [batch, n] from the 3-bit ranker of a [n, k] head, and each 64-row block's largest value [batch, n / 64].
void int3_matvec(const uint8_t* planes, int64_t n, int64_t k, const float* x, int64_t batch, float* y,
                 float* block_max, int threads) {
  const Int8Activations a = quantize_rows(x, batch, k, 64);
  const int64_t blocks = n / 64;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t b = 0; b < batch; ++b) {
      float* out = y + b * n + blk * 64;
      int3_block(planes + blk * (k / 64) * 4 * kQuarterBytes, k / 64, a.codes.data() + b * k, a.scales.data() + b * (k / 64),
                 a.sums.data() + b * (k / 64), out);
      block_max[b * blocks + blk] = max64(out);
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
inline bool beats(const float* y, int64_t a, int64_t b) {
  const bool nan_a = y[a] != y[a], nan_b = y[b] != y[b];
  if (nan_a || nan_b) return nan_a && (!nan_b || a < b);
  return y[a] > y[b] || (y[a] == y[b] && a < b);
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
      best[b] = rows[0];
      for (int64_t row : rows) best[b] = beats(yb, row, best[b]) ? row : best[b];
    }
  }
#endif
  return 0;
}

}  // namespace

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

// Greedy decoding's whole step for ids [B]: the layers (h [B, hidden] is scratch), then the head into `logits`
// [B, n] (scratch) and each row's token into `out` [B]. With a 3-bit ranker, the token is the best candidate it
// proposes by exact int8 logit; without, torch's argmax of the int4 head's rescored logits.
int gk_greedy_step(const GkModel* model, const GkHead* head, const int64_t* ids, int64_t now, float* h,
                   float* logits, int64_t* out, int threads) {
  int done = gk_decode_step(model, h, ids, now, threads);
  if (done != 0) return done;
  if (head->ranker != nullptr) return rescored_head(h, model->batch, head, logits, threads, true, out);
  done = rescored_head(h, model->batch, head, logits, threads, false, nullptr);
  if (done == 0) gk_argmax(logits, model->batch, head->n, out);
  return done;
}

}  // extern "C"
