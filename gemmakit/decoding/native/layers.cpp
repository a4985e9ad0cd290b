// One decode step of a Gemma model with int8 weight-only linears, all layers in one OpenMP region.
//
// Why this exists: decoding one token of a small Gemma through torch runs ~1,500 small ops, and their
// dispatch costs about as much as reading every weight. Here each layer is a handful of loops over raw
// pointers: int8 x fp32 dot products (weights read once, at memory speed), norms, rope, attention over the
// KV cache and GeGLU, with threads meeting at barriers instead of being forked and joined per op.
// The step embeds token ids itself (or takes the caller's embeddings). The LM heads are in head.cpp.
// A layer's matrices may be gemmakit's int8 rows or a GGUF file's own blocks (Q4_K, Q6_K, ... : blocks.h), each
// matrix in its own format, as a Q4_K_M file mixes them.
#include "blocks.h"
#include "common.h"

#include <type_traits>
#include <utility>

namespace gk {
namespace {
// --- matrix-vector products over a layer's matrices, whatever their format ---------------------------------------
// Round the rows of x [rows, k] for the block kernels (called by every thread of the region).
void quantize_rows(const float* x, int64_t rows, ActRows& out) {
#pragma omp for schedule(static)
  for (int64_t b = 0; b < rows; ++b) out.quantize(x, b);
}

// One product y [batch, rows] = x [batch, cols] W^T of a layer; `xq` is x rounded (used by block matrices).
struct Job {
  const GkMatrix* w;
  int64_t rows, cols;
  const float* x;
  const ActRows* xq;
  float* y;
};

// Rows [n0, n1) of the job's matrix against every activation row: one sequential read of the rows either way.
void job_rows(const Job& job, int64_t n0, int64_t n1, int64_t batch) {
  const GkMatrix& w = *job.w;
  if (w.type == kInt8Rows) {
    const MatVec mv = {static_cast<const int8_t*>(w.data), w.scales, job.rows, job.cols, job.x, job.y};
    for (int64_t n = n0; n < n1; ++n) one_row(mv, n, batch);
    return;
  }
  // y[m * rows + n] for every activation row m, each bitwise what the row gives alone
  const int64_t row_bytes = block_row_bytes(w.type, job.cols);
  block_dot_run(w.type, static_cast<const uint8_t*>(w.data) + n0 * row_bytes, row_bytes, n1 - n0,
                job.xq->rows.data(), static_cast<int>(batch), job.cols, job.y + n0, job.rows);
}

// The rows of a layer's products shared among the team's threads (common.h's share_rows).
void layer_matvecs(const Job* jobs, int count, int64_t batch) { share_rows(jobs, count, batch, job_rows); }

// Whether any of the layer's matrices is stored as blocks (its inputs must then be rounded first).
inline bool has_blocks(const GkLayer& L) {
  for (const GkMatrix* w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.wg, &L.wu, &L.wd})
    if (w->type != kInt8Rows) return true;
  return false;
}

// Every matrix of every layer in a format this library computes with, in whole blocks per row.
bool formats_ok(const GkModel& m) {
  const int64_t qd = m.heads * m.head_dim;
  for (int64_t l = 0; l < m.num_layers; ++l) {
    const GkLayer& L = m.layers[l];
    const std::pair<const GkMatrix*, int64_t> inputs[] = {{&L.wq, m.hidden}, {&L.wk, m.hidden}, {&L.wv, m.hidden},
                                                          {&L.wo, qd}, {&L.wg, m.hidden}, {&L.wu, m.hidden},
                                                          {&L.wd, m.intermediate}};
    for (const auto& [w, cols] : inputs) {
      if (w->data == nullptr) return false;
      if (w->type == kInt8Rows ? w->scales == nullptr : block_row_bytes(w->type, cols) < 0) return false;
    }
  }
  return true;
}
// --- attention ------------------------------------------------------------------------------------------------
// May cache row `row` at time `now` see the key held at `time`? (the cache's causal and padding rules; the window
// needs no test: a sliding layer's ring has at most `window` slots, so it only ever holds the last `window` times)
inline bool visible(const GkModel& m, int64_t row, int64_t time, int64_t now) {
  if (time < 0 || time > now) return false;
  return time >= m.pad[row] || time == now;
}

// Scores of up to 4 query heads q [G, d] against one key: out[j] = q_j . key. With AVX-512 and a head_dim that is
// a multiple of 64 (every Gemma's: 128 or 256), the key is read once for all of them (a kv head serves `groups`
// query heads); otherwise one `dot` per head.
template <int G>
void dot_heads(const float* q, int64_t d, const float* key, float* out) {
#if defined(__AVX512F__)
  if (d % 64 == 0) {
    __m512 acc[G];
    for (int j = 0; j < G; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
      const __m512 k = _mm512_loadu_ps(key + i);
      for (int j = 0; j < G; ++j) acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(q + j * d + i), k, acc[j]);
    }
    for (int j = 0; j < G; ++j) out[j] = _mm512_reduce_add_ps(acc[j]);
    return;
  }
#endif
  for (int j = 0; j < G; ++j) out[j] = dot(q + j * d, key, d);
}

// out_j = sum_i w[j * n + i] * values[slots[i]] for up to 4 query heads (out_j at out + j * stride). With AVX-512
// and a head_dim that is a multiple of 64, 64 values of the head at a time in registers: each value is read once
// for all the heads and the outputs are written once; otherwise one axpy per key and head (each reading and
// writing the whole output).
template <int G>
void weighted_values(const float* w, int64_t n, const float* values, const int64_t* slots, int64_t d, float* out,
                     int64_t stride) {
#if defined(__AVX512F__)
  if (d % 64 == 0) {
    for (int64_t t = 0; t < d; t += 64) {
      __m512 acc[G][4];
      for (int j = 0; j < G; ++j)
        for (int c = 0; c < 4; ++c) acc[j][c] = _mm512_setzero_ps();
      for (int64_t i = 0; i < n; ++i) {
        const float* v = values + slots[i] * d + t;
        const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16), v2 = _mm512_loadu_ps(v + 32),
                     v3 = _mm512_loadu_ps(v + 48);
        for (int j = 0; j < G; ++j) {
          const __m512 s = _mm512_set1_ps(w[j * n + i]);
          acc[j][0] = _mm512_fmadd_ps(s, v0, acc[j][0]);
          acc[j][1] = _mm512_fmadd_ps(s, v1, acc[j][1]);
          acc[j][2] = _mm512_fmadd_ps(s, v2, acc[j][2]);
          acc[j][3] = _mm512_fmadd_ps(s, v3, acc[j][3]);
        }
      }
      for (int j = 0; j < G; ++j)
        for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + j * stride + t + 16 * c, acc[j][c]);
    }
    return;
  }
#endif
  for (int j = 0; j < G; ++j) {
    std::memset(out + j * stride, 0, sizeof(float) * d);
    for (int64_t i = 0; i < n; ++i) axpy(w[j * n + i], values + slots[i] * d, out + j * stride, d);
  }
}

// The query heads j0 .. j0 + G of a kv head (G <= 4) through `kernel`<G>: one instance per count, so the
// accumulators stay in registers.
template <typename Kernel>
void by_fours(int64_t groups, Kernel kernel) {
  for (int64_t j0 = 0; j0 < groups; j0 += 4) {
    switch (std::min<int64_t>(4, groups - j0)) {
      case 1: kernel(std::integral_constant<int, 1>(), j0); break;
      case 2: kernel(std::integral_constant<int, 2>(), j0); break;
      case 3: kernel(std::integral_constant<int, 3>(), j0); break;
      default: kernel(std::integral_constant<int, 4>(), j0); break;
    }
  }
}

// Flash-decoding: the keys are cut into chunks attended in parallel, each giving per query head its largest
// score, the sum of exp(score - largest) and the unnormalised output; `merge_chunks` combines them exactly.
// A chunk serves all query heads that share its kv head, so each key and value is read once per chunk.
// part: [groups, 2 + head_dim] (largest score, sum, output) for the rows' query heads q [groups, head_dim].
void attend_chunk(const GkModel& m, const GkLayer& layer, int64_t row, int64_t kv, int64_t now, int64_t lo,
                  int64_t hi, const float* q, float* part, std::vector<float>& scores, std::vector<int64_t>& slots) {
  const int64_t d = m.head_dim, groups = m.heads / m.kv_heads;
  const float* keys = layer.keys + (row * m.kv_heads + kv) * layer.slots * d;
  const float* values = layer.values + (row * m.kv_heads + kv) * layer.slots * d;
  const int64_t* ring_times = m.ring_times + row * m.ring_stride;
  slots.clear();
  for (int64_t s = lo; s < hi; ++s)
    if (visible(m, row, layer.sliding ? ring_times[s] : s, now)) slots.push_back(s);
  const int64_t n = static_cast<int64_t>(slots.size());
  scores.resize(groups * n);
  float score[4];
  for (int64_t i = 0; i < n; ++i) {
    const float* key = keys + slots[i] * d;
    by_fours(groups, [&](auto g, int64_t j0) {
      constexpr int G = decltype(g)::value;
      dot_heads<G>(q + j0 * d, d, key, score);
      for (int j = 0; j < G; ++j) {
        float s = score[j] * m.scale;
        if (m.attn_softcap > 0) s = std::tanh(s / m.attn_softcap) * m.attn_softcap;
        scores[(j0 + j) * n + i] = s;
      }
    });
  }
  for (int64_t j = 0; j < groups; ++j) {
    float* row = scores.data() + j * n;
    float largest = -INFINITY;
    for (int64_t i = 0; i < n; ++i) largest = row[i] > largest ? row[i] : largest;
    part[j * (d + 2)] = largest;
    part[j * (d + 2) + 1] = exp_shifted(row, n, largest);  // 0 for an empty chunk
  }
  by_fours(groups, [&](auto g, int64_t j0) {
    weighted_values<decltype(g)::value>(scores.data() + j0 * n, n, values, slots.data(), d, part + j0 * (d + 2) + 2,
                                        d + 2);
  });
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

// The slots a query at time `now` attends over: the ring's used slots, or every time up to now.
inline int64_t key_count(const GkLayer& L, int64_t now) {
  return L.sliding ? (now + 1 < L.slots ? now + 1 : L.slots) : now + 1;
}

// How many chunks `used` keys are attended in: at least 32 keys a chunk, at most `max_chunks`.
inline int64_t key_chunks(int64_t used, int64_t max_chunks) {
  return std::max<int64_t>(1, std::min<int64_t>(max_chunks, used / 32));
}

}  // namespace
}  // namespace gk

using namespace gk;

extern "C" {

// Advance the n rows of `h` ([n, hidden] fp32, updated in place) through all layers: entry b is cache row
// rows[b] at time times[b] (each row may have its own timeline), writing this step's keys and values into the
// cache and each row's time into its ring record. With `ids` ([n] token ids), h is first filled with their
// embeddings, E[id] * sqrt(hidden) in fp32. Every row is computed alone (its attention chunks depend only on its
// own time), so a row's result does not depend on which other rows share the step.
int gk_decode_step(const GkModel* model, float* h, const int64_t* ids, const int64_t* rows, const int64_t* times,
                   int64_t n, int threads) {
  const GkModel& m = *model;
  if (!formats_ok(m)) return -3;
  for (int64_t b = 0; b < n; ++b) {
    if (rows[b] < 0 || rows[b] >= m.batch || times[b] < 0) return -2;
    m.ring_times[rows[b] * m.ring_stride + times[b] % m.ring] = times[b];
  }
  if (ids != nullptr) {
    if (m.embed_table == nullptr) return -1;
    for (int64_t b = 0; b < n; ++b) {
      const int8_t* row = m.embed_table + ids[b] * m.hidden;
      const float scale = m.embed_scales[ids[b]] * m.normaliser;
      for (int64_t i = 0; i < m.hidden; ++i) h[b * m.hidden + i] = static_cast<float>(row[i]) * scale;
    }
  }
  const int64_t B = n, D = m.hidden, hd = m.head_dim, I = m.intermediate;
  const int64_t qd = m.heads * hd, kvd = m.kv_heads * hd;
  std::vector<float> xn(B * D), q(B * qd), k(B * kvd), v(B * kvd), att(B * qd), o(B * D);
  std::vector<float> gate(B * I), up(B * I), act(B * I), down(B * D);
  const int64_t groups = m.heads / m.kv_heads, max_chunks = 2 * threads;
  std::vector<float> parts(B * m.kv_heads * max_chunks * groups * (hd + 2));
  std::vector<int64_t> pos(B);
  ActRows xn_q, att_q, act_q;  // rounded inputs of the block matrices (sized only if a layer has any)
  bool blocks = false;
  for (int64_t l = 0; l < m.num_layers; ++l) blocks = blocks || has_blocks(m.layers[l]);
  if (blocks) {
    xn_q.reserve(B, D);
    att_q.reserve(B, qd);
    act_q.reserve(B, I);
  }
  for (int64_t b = 0; b < B; ++b) pos[b] = times[b] - m.pad[rows[b]] > 0 ? times[b] - m.pad[rows[b]] : 0;

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

      const bool rounded = has_blocks(L);  // the same for every thread: the barriers below stay matched
      if (rounded) quantize_rows(xn.data(), B, xn_q);
      const Job qkv[3] = {{&L.wq, qd, D, xn.data(), &xn_q, q.data()},
                          {&L.wk, kvd, D, xn.data(), &xn_q, k.data()},
                          {&L.wv, kvd, D, xn.data(), &xn_q, v.data()}};
      layer_matvecs(qkv, 3, B);

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
          const int64_t slot = L.sliding ? times[b] % L.slots : times[b];
          const int64_t at = ((rows[b] * m.kv_heads + kvh) * L.slots + slot) * hd;
          std::memcpy(L.keys + at, x, sizeof(float) * hd);
          std::memcpy(L.values + at, v.data() + b * kvd + kvh * hd, sizeof(float) * hd);
        }
      }

      // attention: each row's keys in chunks of at least 32, up to two per thread, then the merge per query head
#pragma omp for schedule(static)
      for (int64_t t = 0; t < B * m.kv_heads * max_chunks; ++t) {
        const int64_t b = t / (m.kv_heads * max_chunks), kv = t / max_chunks % m.kv_heads, c = t % max_chunks;
        const int64_t used = key_count(L, times[b]), chunks = key_chunks(used, max_chunks);
        if (c >= chunks) continue;
        attend_chunk(m, L, rows[b], kv, times[b], c * used / chunks, (c + 1) * used / chunks,
                     q.data() + b * qd + kv * groups * hd, parts.data() + t * groups * (hd + 2), scores, slots);
      }
#pragma omp for schedule(static)
      for (int64_t t = 0; t < B * m.heads; ++t) {
        const int64_t b = t / m.heads, head = t % m.heads, kv = head / groups;
        merge_chunks(parts.data() + (b * m.kv_heads + kv) * max_chunks * groups * (hd + 2),
                     key_chunks(key_count(L, times[b]), max_chunks), groups, head % groups, hd,
                     att.data() + b * qd + head * hd);
      }

      if (rounded) quantize_rows(att.data(), B, att_q);
      const Job out_proj[1] = {{&L.wo, D, qd, att.data(), &att_q, o.data()}};
      layer_matvecs(out_proj, 1, B);

#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        add_branch(h + b * D, o.data() + b * D, L.post_attn_norm, m.eps, D);
        rms_norm(h + b * D, L.pre_ffw_norm, m.eps, xn.data() + b * D, D);
      }

      if (rounded) quantize_rows(xn.data(), B, xn_q);
      const Job gate_up[2] = {{&L.wg, I, D, xn.data(), &xn_q, gate.data()},
                              {&L.wu, I, D, xn.data(), &xn_q, up.data()}};
      layer_matvecs(gate_up, 2, B);

      const int64_t chunks = (B * I + 255) / 256;
#pragma omp for schedule(static)
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t start = c * 256, n = start + 256 <= B * I ? 256 : B * I - start;
        geglu(gate.data() + start, up.data() + start, act.data() + start, n);
      }

      if (rounded) quantize_rows(act.data(), B, act_q);
      const Job down_proj[1] = {{&L.wd, D, I, act.data(), &act_q, down.data()}};
      layer_matvecs(down_proj, 1, B);

#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) add_branch(h + b * D, down.data() + b * D, L.post_ffw_norm, m.eps, D);
    }
  }
  return 0;
}

}  // extern "C"
