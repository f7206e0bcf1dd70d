// Linear layer y = x W^T + b (fp32), forward and backward, as MindSpore AOT ops.
//
// MindSpore 2.10's CPU MatMul ran the UNet's Linears at ~3x PyTorch's addmm time (111 calls, 330 ms of a small
// bench sampling step) and needs a separate BiasAdd. Here the rows of x are split among OpenMP threads and each
// block is one oneDNN sgemm (the libdnnl.so.3 MindSpore ships; single-threaded per call, row-major) with the bias
// added while the block is still in cache.
//
//   linear_fwd[_nobias]   x (..., K), w (N, K)[, b (N)]                         -> y (..., N)
//   linear_bwd[_nobias]   x, w, dy (..., N), flags [need_dweight]               -> dx, dw[, db]
//   linear_bwd_input      dy (..., N), w (N, K)                                 -> dx (..., K)
// need_dweight = 0 skips the dW product and returns zeros: autodiff would not compute it either. A frozen weight
// (every Linear but the trainable set when tuning) takes linear_bwd_input instead, which does not read x, so the
// graph need not keep the layer's input alive until the backward.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.h"

extern "C" int dnnl_sgemm(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                          int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc);

namespace {

using tav::is_f32;
using tav::max_threads;
using tav::rows_of;


// Row blocks: one per thread, at least 32 rows so tiny products stay on one thread.
int64_t block_count(int64_t rows) {
  const int64_t threads = max_threads();
  return std::max<int64_t>(1, std::min<int64_t>(threads, rows / 32));
}

int linear_forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool has_bias) {
  const int expected = has_bias ? 4 : 3;
  if (nparam != expected) return 1;
  for (int i = 0; i < nparam; ++i)
    if (!is_f32(dtypes[i])) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *b = has_bias ? static_cast<const float *>(params[2]) : nullptr;
  float *y = static_cast<float *>(params[nparam - 1]);
  const int64_t k = shapes[0][ndims[0] - 1], n = shapes[1][0], m = rows_of(ndims[0], shapes[0]);
  if (ndims[1] != 2 || shapes[1][1] != k || shapes[nparam - 1][ndims[nparam - 1] - 1] != n) return 2;
  if (has_bias && shapes[2][0] != n) return 2;
  const int64_t blocks = block_count(m);
  int status = 0;
#pragma omp parallel for schedule(static) num_threads(blocks) reduction(| : status)
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t r0 = m * block / blocks, r1 = m * (block + 1) / blocks;
    if (r1 == r0) continue;
    status |= dnnl_sgemm('N', 'T', r1 - r0, n, k, 1.0f, x + r0 * k, k, w, k, 0.0f, y + r0 * n, n);
    if (b != nullptr)
      for (int64_t r = r0; r < r1; ++r) {
        float *row = y + r * n;
        for (int64_t j = 0; j < n; ++j) row[j] += b[j];
      }
  }
  return status == 0 ? 0 : 3;
}

// dx = dy W for dy (m, n), w (n, k), rows split among threads.
int input_gradient(const float *dy, const float *w, float *dx, int64_t m, int64_t n, int64_t k) {
  const int64_t blocks = block_count(m);
  int status = 0;
#pragma omp parallel for schedule(static) num_threads(blocks) reduction(| : status)
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t r0 = m * block / blocks, r1 = m * (block + 1) / blocks;
    if (r1 > r0) status |= dnnl_sgemm('N', 'N', r1 - r0, k, n, 1.0f, dy + r0 * n, n, w, k, 0.0f, dx + r0 * k, k);
  }
  return status;
}

int linear_backward_input(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  // inputs: dy, w; output: dx
  if (nparam != 3) return 1;
  for (int i = 0; i < nparam; ++i)
    if (!is_f32(dtypes[i])) return 1;
  const int64_t n = shapes[1][0], k = shapes[1][1], m = rows_of(ndims[0], shapes[0]);
  if (ndims[1] != 2 || shapes[0][ndims[0] - 1] != n || shapes[2][ndims[2] - 1] != k ||
      rows_of(ndims[2], shapes[2]) != m)
    return 2;
  return input_gradient(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                        static_cast<float *>(params[2]), m, n, k) == 0 ? 0 : 3;
}

int linear_backward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool has_bias) {
  // inputs: x, w, dy, flags; outputs: dx, dw[, db]
  const int expected = has_bias ? 7 : 6;
  if (nparam != expected) return 1;
  for (int i = 0; i < nparam; ++i)
    if (!is_f32(dtypes[i])) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  const bool need_dweight = static_cast<const float *>(params[3])[0] != 0.0f;
  float *dx = static_cast<float *>(params[4]);
  float *dw = static_cast<float *>(params[5]);
  float *db = has_bias ? static_cast<float *>(params[6]) : nullptr;
  const int64_t k = shapes[0][ndims[0] - 1], n = shapes[1][0], m = rows_of(ndims[0], shapes[0]);
  if (shapes[2][ndims[2] - 1] != n || rows_of(ndims[2], shapes[2]) != m) return 2;
  const int threads = max_threads();
  int status = input_gradient(dy, w, dx, m, n, k);
  if (!need_dweight) {
    std::memset(dw, 0, sizeof(float) * n * k);
    if (db != nullptr) std::memset(db, 0, sizeof(float) * n);
    return status == 0 ? 0 : 3;
  }
  // dW = dy^T x and db = column sums of dy, output rows (features) split among threads: no shared writes.
  const int64_t feature_blocks = std::max<int64_t>(1, std::min<int64_t>(threads, n / 8));
#pragma omp parallel for schedule(static) num_threads(feature_blocks) reduction(| : status)
  for (int64_t block = 0; block < feature_blocks; ++block) {
    const int64_t f0 = n * block / feature_blocks, f1 = n * (block + 1) / feature_blocks;
    if (f1 == f0) continue;
    status |= dnnl_sgemm('T', 'N', f1 - f0, k, m, 1.0f, dy + f0, n, x, k, 0.0f, dw + f0 * k, k);
    if (db != nullptr) {
      for (int64_t j = f0; j < f1; ++j) db[j] = 0.0f;
      // Row by row into double accumulators would be exact but slow; fp32 partial sums per 256 rows then double.
      double partial[64];
      for (int64_t j0 = f0; j0 < f1; j0 += 64) {
        const int64_t j1 = std::min(f1, j0 + 64);
        for (int64_t j = j0; j < j1; ++j) partial[j - j0] = 0.0;
        for (int64_t r0 = 0; r0 < m; r0 += 256) {
          const int64_t r1 = std::min(m, r0 + 256);
          float chunk[64] = {0};
          for (int64_t r = r0; r < r1; ++r) {
            const float *row = dy + r * n;
            for (int64_t j = j0; j < j1; ++j) chunk[j - j0] += row[j];
          }
          for (int64_t j = j0; j < j1; ++j) partial[j - j0] += chunk[j - j0];
        }
        for (int64_t j = j0; j < j1; ++j) db[j] = static_cast<float>(partial[j - j0]);
      }
    }
  }
  return status == 0 ? 0 : 3;
}

}  // namespace

extern "C" {

int linear_fwd(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return linear_forward(n, p, nd, s, t, true);
}
int linear_fwd_nobias(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return linear_forward(n, p, nd, s, t, false);
}
int linear_bwd(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return linear_backward(n, p, nd, s, t, true);
}
int linear_bwd_nobias(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return linear_backward(n, p, nd, s, t, false);
}
int linear_bwd_input(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return linear_backward_input(n, p, nd, s, t);
}

}  // extern "C"
