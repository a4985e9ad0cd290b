// Shared by the native library's sources (layers.cpp, head.cpp, abi.cpp): the structs Python fills through
// ctypes (their layout is checked at load: see abi.cpp and gemmakit/decoding/native/abi.py) and the small math
// every kernel uses (dot products, norms, the int8 matrix-vector jobs).
//
// Numerics: activations stay fp32 from the embedding to the final residual (torch's quantised path rounds
// them to bf16 between ops); weights are w = q * scale exactly as `gemmakit.quant.Int8Linear` defines them.
// So the step computes the fp32 model whose weights are the dequantised int8 ones, to fp32 rounding.
//
// Built by gemmakit.decoding.native.build with g++ -O3 -march=native -fopenmp and called through ctypes; the
// OpenMP runtime it links is the one torch has already loaded (same soname), so threads are shared.
#pragma once
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

// One weight matrix [rows, cols]: gemmakit's int8 with one fp32 scale per row (type kInt8Rows), or a GGUF file's
// own blocks (type = the ggml type id, scales null; the kernels are in blocks.h).
struct GkMatrix {
  const void* data;
  const float* scales;
  int64_t type;
};

// One layer's tensors. Norm multipliers are (1 + w) in fp32; absent ones are null (Gemma 1 has no norms after
// attention and MLP, and no q/k norms; its pre-MLP norm goes in pre_ffw_norm).
struct GkLayer {
  GkMatrix wq, wk, wv, wo, wg, wu, wd;
  const float *input_norm, *post_attn_norm, *pre_ffw_norm, *post_ffw_norm, *q_norm, *k_norm;
  float *keys, *values;  // [B, kv_heads, slots, head_dim]
  int64_t slots;         // capacity for global layers, ring size for sliding ones
  int64_t sliding;
};

struct GkModel {
  int64_t batch;  // rows of the cache buffers (a step may advance any subset of them)
  int64_t hidden, heads, kv_heads, head_dim, intermediate, num_layers;
  float eps, scale, attn_softcap;  // softcap <= 0: none
  const GkLayer* layers;
  const float *cos_local, *sin_local, *cos_global, *sin_global;  // [positions, head_dim]; sin carries rope's sign
  const int64_t* pad;         // [batch] left padding of each cache row (0 where each row has its own timeline)
  int64_t* ring_times;        // time held by each sliding slot (-1: empty), row r's at ring_times + r * ring_stride;
  int64_t ring;               // the step records each row's time in it
  int64_t ring_stride;        // 0: one ring record shared by all rows (a batch on one timeline); ring: one per row
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
  float final_softcap;    // Gemma 2's cap on the logits (<= 0: none); greedy choices compare capped logits
};

}  // extern "C"

// Internal linkage: each source gets its own copy of these small functions (they inline anyway).
namespace gk {
namespace {

constexpr int64_t kInt8Rows = -1;  // GkMatrix::type of gemmakit's int8 weights with fp32 row scales

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

// x * cos + roll(x, d/2) * signed_sin, in place, for one head
void rope(float* x, const float* cos, const float* sin, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    float lo = x[i], hi = x[i + half];
    x[i] = lo * cos[i] + hi * sin[i];
    x[i + half] = hi * cos[i + half] + lo * sin[i + half];
  }
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
// interleaving four rows (four streams 640 bytes apart) was measured 1.7x slower on the 270M's layers. (Converting
// each weight row once for four activation rows instead gained nothing at 8 rows and cost 6% at 1, in one process.)
void one_row(const MatVec& job, int64_t n, int64_t batch) {
  const int8_t* w = job.w + n * job.cols;
  for (int64_t m = 0; m < batch; ++m) job.y[m * job.rows + n] = dot(w, job.x + m * job.cols, job.cols) * job.scale[n];
}

// Share the rows of several matrices among the team's threads (called by every thread of the region), in guided
// runs (large contiguous runs first, smaller ones as the rows run out) of tiles of kTileRows rows, and
// run_fn(job, n0, n1, batch) computes rows [n0, n1) of a job. Guided, not static halves: a thread slowed by the host
// (another process, an interrupt) no longer holds the other at the barrier; in-process A/B on the 270M's fused
// step, 0.97x the time at 1 row, 0.94-0.98x at 8. Tiles, not single rows: a kernel called for a run of rows keeps
// its constants and dispatch out of the loop over them. Each row is computed alone, so which thread takes it
// changes no value.
constexpr int64_t kTileRows = 8;

template <typename Job, typename RunFn>
void share_rows(const Job* jobs, int count, int64_t batch, RunFn run_fn) {
  auto tiles_of = [](const Job& job) { return (job.rows + kTileRows - 1) / kTileRows; };
  int64_t tiles = 0;
  for (int j = 0; j < count; ++j) tiles += tiles_of(jobs[j]);
#pragma omp for schedule(guided)
  for (int64_t t = 0; t < tiles; ++t) {
    int64_t n = t;  // tile n of job j
    int j = 0;
    while (n >= tiles_of(jobs[j])) n -= tiles_of(jobs[j++]);
    run_fn(jobs[j], n * kTileRows, std::min(jobs[j].rows, (n + 1) * kTileRows), batch);
  }
}

void matvecs(const MatVec* jobs, int count, int64_t batch) {
  share_rows(jobs, count, batch, [](const MatVec& job, int64_t n0, int64_t n1, int64_t rows) {
    for (int64_t n = n0; n < n1; ++n) one_row(job, n, rows);
  });
}

}  // namespace
}  // namespace gk

extern "C" {
// Advance `n` rows through all layers: entry i is cache row rows[i] at time times[i] (defined in layers.cpp).
int gk_decode_step(const GkModel* model, float* h, const int64_t* ids, const int64_t* rows, const int64_t* times,
                   int64_t n, int threads);
}
