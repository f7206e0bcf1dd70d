// 2-D convolution on CPU (fp32, NCHW), forward and backward, as MindSpore AOT ops.
//
//   conv2d_fwd[_nobias]   y = conv(x, w) (+ b): x (N, C, H, W), w (O, C, KH, KW), b (O,), symmetric zero padding p,
//                         stride s (same along H and W); y (N, O, Ho, Wo), Ho = (H + 2p - KH) / s + 1.
//   conv2d_bwd[_nobias]   (x, w, scalars, dy) -> dx, dw (, db).
//   conv2d_bwd_input      (w, scalars, dy, size) -> dx: a frozen weight's backward, without x; size is any
//                         (H, W) tensor (only its shape is read: dx's height and width, which a strided conv's
//                         dy does not determine).
//
// Scalars arrive as a small fp32 tensor [stride, padding]. The products run in oneDNN's sgemm (dnnl_sgemm, the C
// API of the libdnnl.so.3 that MindSpore's CPU build ships and has loaded already; its threadpool runtime makes
// each call single-threaded), the parallelism is ours (OpenMP, OMP_NUM_THREADS):
//
//   forward   work items = (image, band of output rows); each thread unfolds its band (im2col, rows c*KH*KW +
//             ki*KW + kj -- the order of w.reshape(O, -1)) into its own buffer and multiplies
//             w (O x CKK) x columns (CKK x band) straight into y's NCHW plane, then adds the bias while the band
//             is in cache. A 1x1 stride-1 unpadded conv multiplies w by the input plane itself.
//   backward  threads form a grid of image groups x channel slices. Per image and band, a thread unfolds its
//             channel slice of x, accumulates dw[:, slice] += dy_band x columns^T, reuses the buffer for
//             columns = w[:, slice]^T x dy_band and folds them back (col2im, overlapping windows summed) into
//             dx[n, slice]. Channel slices write disjoint parts of dw and dx, so they need no reduction; image
//             groups after the first accumulate into private copies of dw, summed at the end. db is a row sum
//             of dy. Nothing is kept from the forward.
//
// Bands keep the unfolded buffer near L2 size (the GEMM streams it once, the unfold writes it once).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

extern "C" int dnnl_sgemm(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                          int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc);

namespace {

using tav::is_f32;
using tav::max_threads;
using tav::thread_id;

// Tuning (see conv_set_tuning): columns per band target, size cap of the unfolded buffer, backward split.
int64_t g_band_columns = 0;           // 0 = automatic
int64_t g_buffer_bytes = 2 << 20;     // cap of one thread's unfolded band
int g_backward_split = 0;             // 0 auto, 1 images, 2 channels
int64_t g_partial_bytes = 64 << 20;   // cap of the private dw copies (image split)


struct Geometry {
  int64_t n, c, h, w, o, kh, kw, s, p, ho, wo;
  int64_t kk() const { return kh * kw; }
  int64_t ckk() const { return c * kh * kw; }
  int64_t in_plane() const { return h * w; }
  int64_t out_plane() const { return ho * wo; }
  bool pointwise() const { return kh == 1 && kw == 1 && s == 1 && p == 0; }
};

bool read_geometry(int *ndims, int64_t **shapes, int x_index, int w_index, const float *scalars, Geometry *g) {
  if (ndims[x_index] != 4 || ndims[w_index] != 4) return false;
  const int64_t *xs = shapes[x_index], *ws = shapes[w_index];
  g->n = xs[0], g->c = xs[1], g->h = xs[2], g->w = xs[3];
  g->o = ws[0], g->kh = ws[2], g->kw = ws[3];
  if (ws[1] != g->c) return false;
  const float s = scalars[0], p = scalars[1];
  g->s = static_cast<int64_t>(s + 0.5f);
  g->p = static_cast<int64_t>(p + 0.5f);
  if (g->s < 1 || g->p < 0) return false;
  const int64_t span_h = g->h + 2 * g->p - g->kh, span_w = g->w + 2 * g->p - g->kw;
  if (span_h < 0 || span_w < 0) return false;
  g->ho = span_h / g->s + 1;
  g->wo = span_w / g->s + 1;
  return true;
}

// First and one-past-last output index o with 0 <= o*s - p + k < size (the taps that read inside the image).
inline void valid_range(int64_t size, int64_t out, int64_t s, int64_t p, int64_t k, int64_t *lo, int64_t *hi) {
  const int64_t shift = p - k;  // input index = o*s - shift
  int64_t first = shift > 0 ? (shift + s - 1) / s : 0;
  const int64_t last_in = size - 1 + shift;  // o*s <= last_in
  int64_t end = last_in < 0 ? 0 : last_in / s + 1;
  first = std::min(first, out);
  end = std::min(std::max(end, first), out);
  *lo = first;
  *hi = end;
}

// Rows of output positions [oy0, oy1) of image x (C, H, W), channels [c0, c1), unfolded into buf
// ((c1 - c0) * KH * KW rows, (oy1 - oy0) * Wo columns, contiguous).
void im2col(const float *x, const Geometry &g, int64_t c0, int64_t c1, int64_t oy0, int64_t oy1, float *buf) {
  const int64_t cols = (oy1 - oy0) * g.wo;
  const int64_t s = g.s, p = g.p, W = g.w, Wo = g.wo;
  for (int64_t c = c0; c < c1; ++c) {
    const float *plane = x + c * g.in_plane();
    for (int64_t ki = 0; ki < g.kh; ++ki) {
      for (int64_t kj = 0; kj < g.kw; ++kj) {
        float *row = buf + ((c - c0) * g.kk() + ki * g.kw + kj) * cols;
        int64_t ox0, ox1;
        valid_range(W, Wo, s, p, kj, &ox0, &ox1);
        for (int64_t oy = oy0; oy < oy1; ++oy) {
          float *dst = row + (oy - oy0) * Wo;
          const int64_t iy = oy * s - p + ki;
          if (iy < 0 || iy >= g.h) {
            std::memset(dst, 0, sizeof(float) * Wo);
            continue;
          }
          const float *src = plane + iy * W - p + kj;  // src[ox * s] = x[c, iy, ox*s - p + kj]
          for (int64_t ox = 0; ox < ox0; ++ox) dst[ox] = 0.0f;
          if (s == 1) {
            std::memcpy(dst + ox0, src + ox0, sizeof(float) * (ox1 - ox0));
          } else {
            for (int64_t ox = ox0; ox < ox1; ++ox) dst[ox] = src[ox * s];
          }
          for (int64_t ox = ox1; ox < Wo; ++ox) dst[ox] = 0.0f;
        }
      }
    }
  }
}

// The adjoint of im2col: dx[c, iy, ix] += buf[row, column] over the same index map (dx channels [c0, c1)).
void col2im(const float *buf, const Geometry &g, int64_t c0, int64_t c1, int64_t oy0, int64_t oy1, float *dx) {
  const int64_t cols = (oy1 - oy0) * g.wo;
  const int64_t s = g.s, p = g.p, W = g.w, Wo = g.wo;
  for (int64_t c = c0; c < c1; ++c) {
    float *plane = dx + c * g.in_plane();
    for (int64_t ki = 0; ki < g.kh; ++ki) {
      for (int64_t kj = 0; kj < g.kw; ++kj) {
        const float *row = buf + ((c - c0) * g.kk() + ki * g.kw + kj) * cols;
        int64_t ox0, ox1;
        valid_range(W, Wo, s, p, kj, &ox0, &ox1);
        for (int64_t oy = oy0; oy < oy1; ++oy) {
          const int64_t iy = oy * s - p + ki;
          if (iy < 0 || iy >= g.h) continue;
          const float *src = row + (oy - oy0) * Wo;
          float *dst = plane + iy * W - p + kj;
          if (s == 1) {
            for (int64_t ox = ox0; ox < ox1; ++ox) dst[ox] += src[ox];
          } else {
            for (int64_t ox = ox0; ox < ox1; ++ox) dst[ox * s] += src[ox];
          }
        }
      }
    }
  }
}

// Output rows per band: about g_band_columns columns (automatic: as many as keep rows x columns x 4 bytes of
// the unfolded band under g_buffer_bytes, at least 256 columns), never more than the image.
int64_t band_rows(const Geometry &g, int64_t rows_of_buffer) {
  int64_t columns = g_band_columns;
  if (columns <= 0) {
    columns = g_buffer_bytes / (4 * std::max<int64_t>(rows_of_buffer, 1));
    columns = std::max<int64_t>(columns, 256);
  }
  int64_t rows = std::max<int64_t>(1, columns / std::max<int64_t>(g.wo, 1));
  rows = std::min(rows, g.ho);
  // Even bands: the same number of rows in each.
  const int64_t bands = (g.ho + rows - 1) / rows;
  return (g.ho + bands - 1) / bands;
}

void add_bias(float *y, const float *bias, int64_t o, int64_t cols, int64_t ld) {
  for (int64_t i = 0; i < o; ++i) {
    float *row = y + i * ld;
    const float b = bias[i];
    for (int64_t j = 0; j < cols; ++j) row[j] += b;
  }
}

int gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const float *a, int64_t lda, const float *b, int64_t ldb,
         float beta, float *c, int64_t ldc) {
  if (m <= 0 || n <= 0) return 0;
  if (k <= 0) {  // an empty sum: oneDNN may not touch C
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : c[i * ldc + j] * beta;
    return 0;
  }
  return dnnl_sgemm(ta, tb, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
}

int conv_forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool has_bias) {
  const int expected = has_bias ? 5 : 4;
  if (nparam != expected) return 1;
  for (int i = 0; i < nparam; ++i)
    if (!is_f32(dtypes[i])) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *bias = has_bias ? static_cast<const float *>(params[2]) : nullptr;
  const float *scalars = static_cast<const float *>(params[has_bias ? 3 : 2]);
  float *y = static_cast<float *>(params[nparam - 1]);
  Geometry g;
  if (!read_geometry(ndims, shapes, 0, 1, scalars, &g)) return 2;
  const int64_t *ys = shapes[nparam - 1];
  if (ndims[nparam - 1] != 4 || ys[0] != g.n || ys[1] != g.o || ys[2] != g.ho || ys[3] != g.wo) return 2;
  if (has_bias && (ndims[2] != 1 || shapes[2][0] != g.o)) return 2;
  if (g.n == 0 || g.o == 0 || g.out_plane() == 0) return 0;

  const bool pointwise = g.pointwise();
  const int64_t ckk = g.ckk();
  int64_t rows = band_rows(g, pointwise ? g.c : ckk);
  const int threads = max_threads();
  if (g.n < threads) {  // too few images to go round: more bands
    const int64_t wanted = (threads + g.n - 1) / g.n;
    rows = std::min(rows, std::max<int64_t>(1, (g.ho + wanted - 1) / wanted));
  }
  const int64_t bands = (g.ho + rows - 1) / rows;
  const int64_t items = g.n * bands;
  const int64_t out_plane = g.out_plane(), in_plane = g.in_plane();
  int status = 0;
#pragma omp parallel
  {
    std::vector<float> buffer;
    if (!pointwise) buffer.resize(static_cast<size_t>(ckk * rows * g.wo));
    int local = 0;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t n = item / bands, band = item % bands;
      const int64_t oy0 = band * rows, oy1 = std::min(g.ho, oy0 + rows);
      const int64_t cols = (oy1 - oy0) * g.wo;
      float *out = y + n * g.o * out_plane + oy0 * g.wo;
      if (pointwise) {
        local |= gemm('N', 'N', g.o, cols, g.c, w, g.c, x + n * g.c * in_plane + oy0 * g.wo, in_plane, 0.0f, out,
                      out_plane);
      } else {
        im2col(x + n * g.c * in_plane, g, 0, g.c, oy0, oy1, buffer.data());
        local |= gemm('N', 'N', g.o, cols, ckk, w, ckk, buffer.data(), cols, 0.0f, out, out_plane);
      }
      if (bias != nullptr) add_bias(out, bias, g.o, cols, out_plane);
    }
    if (local != 0) {
#pragma omp atomic write
      status = 3;
    }
  }
  return status;
}

// dx (and, when need_dweight, dw and db) of the convolution of geometry g. x is read only for dw: the frozen-weight
// entry point passes none, so autodiff does not keep the layer's input alive until the backward.
int conv_backward_core(const Geometry &g, const float *x, const float *w, const float *dy, float *dx, float *dw,
                       float *db, bool need_dweight) {
  const bool pointwise = g.pointwise();
  const int64_t ckk = g.ckk(), kk = g.kk();
  const int64_t in_plane = g.in_plane(), out_plane = g.out_plane();
  const int64_t weight_size = g.o * ckk;

  if (db != nullptr) {
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < g.o; ++o) {
      double total = 0.0;
      for (int64_t n = 0; n < g.n; ++n) {
        const float *row = dy + (n * g.o + o) * out_plane;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 8 <= out_plane; i += 8)
          for (int j = 0; j < 8; ++j) acc[j] += row[i + j];
        for (; i < out_plane; ++i) acc[0] += row[i];
        for (int j = 0; j < 8; ++j) total += acc[j];
      }
      db[o] = static_cast<float>(total);
    }
  }
  if (g.n == 0 || out_plane == 0 || g.o == 0) {
    std::memset(dx, 0, sizeof(float) * g.n * g.c * in_plane);
    if (dw != nullptr) std::memset(dw, 0, sizeof(float) * weight_size);
    return 0;
  }

  // Thread grid: groups of images x channel slices.
  const int threads = max_threads();
  int groups = 1;
  int split = g_backward_split;
  if (split == 0) {
    // Channel slices need enough channels per thread to keep the GEMMs wide; otherwise split images, whose
    // private dw copies are cheap exactly when C is small.
    split = (g.c >= 16 * threads || g.n < threads) ? 2 : 1;
  }
  if (!need_dweight) split = g.n >= threads ? 1 : 2;  // no dw: images split freely, no partial copies
  if (split == 1) {
    groups = static_cast<int>(std::min<int64_t>(threads, g.n));
    const int64_t affordable = g_partial_bytes / std::max<int64_t>(1, 4 * weight_size) + 1;
    if (need_dweight) groups = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(groups, affordable)));
  }
  const int slices_wanted = std::max(1, threads / groups);
  const int slices = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(slices_wanted, g.c)));
  std::vector<float> partial(need_dweight ? static_cast<size_t>(groups - 1) * weight_size : 0);
  if (!need_dweight && dw != nullptr) std::memset(dw, 0, sizeof(float) * weight_size);

  const int64_t rows = band_rows(g, pointwise ? 0 : (g.c + slices - 1) / slices * kk);
  const int64_t bands = (g.ho + rows - 1) / rows;
  int status = 0;
  const int units = groups * slices;
#pragma omp parallel num_threads(units)
  {
    std::vector<float> buffer;
    int local = 0;
#ifdef _OPENMP
    const int team = omp_get_num_threads();
#else
    const int team = 1;
#endif
    // One unit per thread normally; a smaller team (nested parallelism, OMP_DYNAMIC) takes several each.
    for (int unit = thread_id(); unit < units; unit += team) {
      const int group = unit / slices, slice = unit % slices;
      const int64_t n0 = g.n * group / groups, n1 = g.n * (group + 1) / groups;
      const int64_t c0 = g.c * slice / slices, c1 = g.c * (slice + 1) / slices;
      const int64_t csize = c1 - c0;
      float *dw_group = (group == 0 || !need_dweight) ? dw : partial.data() + (group - 1) * weight_size;
      if (!pointwise) buffer.resize(static_cast<size_t>(csize * kk * rows * g.wo));
      bool first = true;
      for (int64_t n = n0; n < n1; ++n) {
        const float *xn = x + n * g.c * in_plane;
        const float *dyn = dy + n * g.o * out_plane;
        float *dxn = dx + n * g.c * in_plane;
        if (!pointwise) std::memset(dxn + c0 * in_plane, 0, sizeof(float) * csize * in_plane);
        for (int64_t band = 0; band < bands; ++band) {
          const int64_t oy0 = band * rows, oy1 = std::min(g.ho, oy0 + rows);
          const int64_t cols = (oy1 - oy0) * g.wo;
          const float *dy_band = dyn + oy0 * g.wo;
          const float beta = first ? 0.0f : 1.0f;
          first = false;
          if (pointwise) {
            if (need_dweight)
              local |= gemm('N', 'T', g.o, csize, cols, dy_band, out_plane, xn + c0 * in_plane + oy0 * g.wo,
                            in_plane, beta, dw_group + c0, g.c);
            local |= gemm('T', 'N', csize, cols, g.o, w + c0, g.c, dy_band, out_plane, 0.0f,
                          dxn + c0 * in_plane + oy0 * g.wo, in_plane);
          } else {
            float *buf = buffer.data();
            if (need_dweight) {
              im2col(xn, g, c0, c1, oy0, oy1, buf);
              local |= gemm('N', 'T', g.o, csize * kk, cols, dy_band, out_plane, buf, cols, beta,
                            dw_group + c0 * kk, ckk);
            }
            local |= gemm('T', 'N', csize * kk, cols, g.o, w + c0 * kk, ckk, dy_band, out_plane, 0.0f, buf, cols);
            col2im(buf, g, c0, c1, oy0, oy1, dxn);
          }
        }
      }
      if (first && need_dweight) {  // no image in this group: its part of dw is zero
        for (int64_t o = 0; o < g.o; ++o)
          std::memset(dw_group + o * ckk + c0 * kk, 0, sizeof(float) * csize * kk);
      }
    }
    if (local != 0) {
#pragma omp atomic write
      status = 3;
    }
  }
  if (groups > 1 && need_dweight) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < weight_size; ++i) {
      float total = dw[i];
      for (int k = 0; k < groups - 1; ++k) total += partial[k * weight_size + i];
      dw[i] = total;
    }
  }
  return status;
}

int conv_backward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool has_bias) {
  // inputs x, w, scalars, dy; outputs dx, dw (, db)
  const int expected = has_bias ? 7 : 6;
  if (nparam != expected) return 1;
  for (int i = 0; i < nparam; ++i)
    if (!is_f32(dtypes[i])) return 1;
  const float *scalars = static_cast<const float *>(params[2]);
  Geometry g;
  if (!read_geometry(ndims, shapes, 0, 1, scalars, &g)) return 2;
  // scalars[2] = 0: the weight is frozen: skip the dW products, return zeros.
  const bool need_dweight = shapes[2][0] < 3 || scalars[2] != 0.0f;
  const int64_t *dys = shapes[3];
  if (ndims[3] != 4 || dys[0] != g.n || dys[1] != g.o || dys[2] != g.ho || dys[3] != g.wo) return 2;
  return conv_backward_core(g, static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                            static_cast<const float *>(params[3]), static_cast<float *>(params[4]),
                            static_cast<float *>(params[5]), has_bias ? static_cast<float *>(params[6]) : nullptr,
                            need_dweight);
}

int conv_backward_input(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  // inputs w, scalars, dy, size (H, W: only its shape is read); output dx, whose shape gives the geometry
  if (nparam != 5) return 1;
  for (int i = 0; i < nparam; ++i)
    if (!is_f32(dtypes[i])) return 1;
  Geometry g;
  if (!read_geometry(ndims, shapes, 4, 0, static_cast<const float *>(params[1]), &g)) return 2;
  const int64_t *dys = shapes[2];
  if (ndims[2] != 4 || dys[0] != g.n || dys[1] != g.o || dys[2] != g.ho || dys[3] != g.wo) return 2;
  return conv_backward_core(g, nullptr, static_cast<const float *>(params[0]), static_cast<const float *>(params[2]),
                            static_cast<float *>(params[4]), nullptr, nullptr, false);
}

}  // namespace

extern "C" {

int conv2d_fwd(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return conv_forward(n, p, nd, s, t, true);
}
int conv2d_fwd_nobias(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return conv_forward(n, p, nd, s, t, false);
}
int conv2d_bwd(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return conv_backward(n, p, nd, s, t, true);
}
int conv2d_bwd_nobias(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return conv_backward(n, p, nd, s, t, false);
}
int conv2d_bwd_input(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return conv_backward_input(n, p, nd, s, t);
}

// For benchmarks: band columns (0 = automatic), buffer cap in bytes, backward split (0 auto, 1 images,
// 2 channels), cap of the private dw copies in bytes. A non-positive value leaves that setting unchanged,
// except band columns and split, where 0 restores the automatic choice.
void conv_set_tuning(int64_t band_columns, int64_t buffer_bytes, int backward_split, int64_t partial_bytes) {
  if (band_columns >= 0) g_band_columns = band_columns;
  if (buffer_bytes > 0) g_buffer_bytes = buffer_bytes;
  if (backward_split >= 0) g_backward_split = backward_split;
  if (partial_bytes > 0) g_partial_bytes = partial_bytes;
}

}  // extern "C"
