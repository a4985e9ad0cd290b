// The block kernels (blocks.h) as plain entry points: a matrix-vector product over a GGUF tensor's own blocks, for
// the eager path (gemmakit/blocks.py's BlockLinear) and for the tests that check the kernels against gguf-py.
#include "blocks.h"

using namespace gk;

extern "C" {

// 1 when the AVX512-VNNI path is compiled in (for the bench's report; the results do not depend on it beyond fp32
// rounding of the per-block combination).
int gk_block_kernels_vnni() { return GK_BLOCKS_VNNI; }

void gk_quantize_act(const float* x, int64_t k, int8_t* q, float* d, int32_t* sums) {
  if (k > 0 && k % kActBlock == 0) quantize_act(x, k, q, d, sums);
}

}  // extern "C"

namespace {

// y [m, rows] = x [m, cols] W^T (see gk_block_matvec), with the vector kernels or the scalar reference.
int matvec(int64_t type, const uint8_t* w, int64_t rows, int64_t cols, const float* x, int64_t m, float* y,
           int threads, bool scalar) {
  const int64_t row_bytes = block_row_bytes(type, cols);
  if (row_bytes < 0 || cols % kActBlock != 0 || rows < 0 || m < 0) return -1;
  if (rows == 0 || m == 0) return 0;
  ActRows acts;
  acts.reserve(m, cols);
#pragma omp parallel num_threads(std::max(threads, 1))
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < m; ++i) acts.quantize(x, i);
    // Runs of weight rows small enough to stay in L2 (about 128 KB) while every activation row passes over them,
    // so a long prompt's activations (m x cols bytes, megabytes) are streamed once per run, not once per row.
    // (and at least four runs a thread, so a small matrix still keeps every thread busy)
    const int64_t per_thread = (rows + 4 * threads - 1) / (4 * std::max(threads, 1));
    const int64_t run = std::max<int64_t>(1, std::min<int64_t>((128 << 10) / row_bytes, per_thread));
    std::vector<float> out(scalar ? m : 0);
#pragma omp for schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += run) {
      const int64_t r1 = std::min(rows, r0 + run);
      if (!scalar) {
        block_dot_run(type, w + r0 * row_bytes, row_bytes, r1 - r0, acts.rows.data(), static_cast<int>(m), cols,
                      y + r0, rows);
        continue;
      }
      for (int64_t r = r0; r < r1; ++r) {
        block_dot_scalar_rows(type, w + r * row_bytes, acts.rows.data(), static_cast<int>(m), cols, out.data());
        for (int64_t i = 0; i < m; ++i) y[i * rows + r] = out[i];
      }
    }
  }
  return 0;
}

}  // namespace

extern "C" {

// y [m, rows] = x [m, cols] W^T for W [rows, cols] stored as ggml blocks of `type`, rows of block_row_bytes each.
// Each activation row is quantised once; runs of rows of W (about 128 KB each) are split among the threads, and
// each run is dotted with all m activation rows (kMaxRows at a time, block_dot_run) while it is in L2. Every y value
// is bitwise that of its own weight row and activation row alone, so it is the same whatever m or the thread count.
// Returns 0, or -1 for an unsupported type or cols that are not whole blocks.
int gk_block_matvec(int64_t type, const uint8_t* w, int64_t rows, int64_t cols, const float* x, int64_t m, float* y,
                    int threads) {
  return matvec(type, w, rows, cols, x, m, y, threads, false);
}

// The same with the scalar reference kernel whatever the build (so the tests check it on a VNNI machine too: it
// computes the same integer block sums, combined in another fp32 order).
int gk_block_matvec_scalar(int64_t type, const uint8_t* w, int64_t rows, int64_t cols, const float* x, int64_t m,
                           float* y, int threads) {
  return matvec(type, w, rows, cols, x, m, y, threads, true);
}

}  // extern "C"
