// Normalisation and activation kernels for the UNet on CPU (fp32), forward and backward, as MindSpore AOT ops.
//
//   group_norm[_silu]_{fwd,bwd}  GroupNorm on frames folded into the batch: x is ((B F), C, S...) and the
//                                statistics of sample b, group g span its F frames, the group's C/G channels and
//                                all S positions -- the official model's GroupNorm on (B, C, F, H, W), without
//                                transposing to that layout. The _silu variants apply SiLU after the affine.
//   layer_norm_{fwd,bwd}         LayerNorm over the last axis (PyTorch semantics: biased variance, eps inside).
//   geglu_{fwd,bwd}              diffusers' GEGLU after its projection: (N, 2I) -> hidden * gelu(gate), hidden
//                                = the first I columns, gate the last I; exact (erf) GELU.
//
// Calling convention (MindSpore AOT): params = inputs then outputs; shapes/ndims describe each. Scalars (eps,
// frames, groups) arrive as small fp32 tensors. Statistics are accumulated in double, two-pass (mean, then centred
// squares), so they agree with PyTorch's to fp32 rounding. OpenMP threads: OMP_NUM_THREADS.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

using tav::is_f32;
using tav::numel;

// Sums with 8 independent fp32 lanes (which the compiler vectorises; a single running sum cannot be reordered
// without -ffast-math), folded into double every 1024 elements so long rows keep fp32-level accuracy.
constexpr int kLanes = 8;

double lane_sum(const float *p, int64_t n) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += 1024) {
    const int64_t end = start + 1024 < n ? start + 1024 : n;
    float acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = start;
    for (; i + kLanes <= end; i += kLanes)
      for (int j = 0; j < kLanes; ++j) acc[j] += p[i + j];
    for (; i < end; ++i) acc[0] += p[i];
    for (int j = 0; j < kLanes; ++j) total += acc[j];
  }
  return total;
}

double lane_centred_squares(const float *p, int64_t n, float mu) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += 1024) {
    const int64_t end = start + 1024 < n ? start + 1024 : n;
    float acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = start;
    for (; i + kLanes <= end; i += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const float d = p[i + j] - mu;
        acc[j] += d * d;
      }
    for (; i < end; ++i) {
      const float d = p[i] - mu;
      acc[0] += d * d;
    }
    for (int j = 0; j < kLanes; ++j) total += acc[j];
  }
  return total;
}


// exp for fp32 without a libm call, so loops vectorise (Cephes expf: range reduction by ln 2, degree-6
// polynomial, scaling by 2^n through the exponent bits); ~1 ulp on [-87, 88].
inline float fast_exp(float x) {
  x = x > 88.3762626647949f ? 88.3762626647949f : x;
  x = x < -87.3365447505531f ? -87.3365447505531f : x;
  float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  float r2 = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r2 + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }

// erf(x), Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, the formula PyTorch's vectorised erf uses).
inline float fast_erf(float x) {
  float sign = x < 0.0f ? -1.0f : 1.0f;
  float a = std::fabs(x);
  float t = 1.0f / (1.0f + 0.3275911f * a);
  float poly = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
  return sign * (1.0f - poly * fast_exp(-a * a));
}

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// ---- GroupNorm --------------------------------------------------------------------------------------------------

struct GroupShape {
  int64_t batch, frames, channels, groups, per_group, spatial;
};

bool group_shape(int ndim, const int64_t *x_shape, int64_t frames, int64_t groups, GroupShape *out) {
  if (ndim < 2 || frames < 1 || groups < 1) return false;
  out->frames = frames;
  out->batch = x_shape[0] / frames;
  out->channels = x_shape[1];
  out->groups = groups;
  out->per_group = x_shape[1] / groups;
  out->spatial = numel(ndim - 2, x_shape + 2);
  return out->batch * frames == x_shape[0] && out->per_group * groups == out->channels;
}

// Mean and 1/sqrt(var + eps) of every (b, g), two-pass in double.
void group_stats(const float *x, const GroupShape &s, float eps, std::vector<float> *mean, std::vector<float> *rstd) {
  const int64_t items = s.batch * s.groups;
  mean->assign(items, 0.0f);
  rstd->assign(items, 0.0f);
  const int64_t count = s.frames * s.per_group * s.spatial;
#pragma omp parallel for schedule(static)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t b = item / s.groups, g = item % s.groups;
    const int64_t n = s.per_group * s.spatial;
    double sum = 0.0;
    for (int64_t f = 0; f < s.frames; ++f)
      sum += lane_sum(x + ((b * s.frames + f) * s.channels + g * s.per_group) * s.spatial, n);
    const double mu = sum / count;
    const float muf = static_cast<float>(mu);
    double squares = 0.0;
    for (int64_t f = 0; f < s.frames; ++f)
      squares += lane_centred_squares(x + ((b * s.frames + f) * s.channels + g * s.per_group) * s.spatial, n, muf);
    // var from values centred on the fp32 mean, corrected for the rounding of that mean.
    const double shift = mu - static_cast<double>(muf);
    const double var = squares / count - shift * shift;
    (*mean)[item] = muf;
    (*rstd)[item] = static_cast<float>(1.0 / std::sqrt((var > 0.0 ? var : 0.0) + static_cast<double>(eps)));
  }
}

template <bool kSilu>
int group_norm_forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  // inputs: x, weight (C), bias (C), scalars [eps, frames, groups]; output: y
  if (nparam != 5 || !is_f32(dtypes[0])) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *weight = static_cast<const float *>(params[1]);
  const float *bias = static_cast<const float *>(params[2]);
  const float *scalars = static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  GroupShape s;
  if (!group_shape(ndims[0], shapes[0], static_cast<int64_t>(scalars[1]), static_cast<int64_t>(scalars[2]), &s)) return 2;
  std::vector<float> mean, rstd;
  group_stats(x, s, scalars[0], &mean, &rstd);
  const int64_t planes = s.batch * s.frames * s.channels;
#pragma omp parallel for schedule(static)
  for (int64_t plane = 0; plane < planes; ++plane) {
    const int64_t c = plane % s.channels;
    const int64_t b = plane / (s.channels * s.frames);
    const int64_t item = b * s.groups + c / s.per_group;
    const float a = rstd[item] * weight[c];
    const float shift = bias[c] - mean[item] * a;
    const float *src = x + plane * s.spatial;
    float *dst = y + plane * s.spatial;
    for (int64_t i = 0; i < s.spatial; ++i) {
      const float v = src[i] * a + shift;
      dst[i] = kSilu ? v * sigmoid(v) : v;
    }
  }
  return 0;
}

template <bool kSilu>
int group_norm_backward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  // inputs: x, weight, bias, scalars, dy; outputs: dx, dweight, dbias
  if (nparam != 8 || !is_f32(dtypes[0])) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *weight = static_cast<const float *>(params[1]);
  const float *bias = static_cast<const float *>(params[2]);
  const float *scalars = static_cast<const float *>(params[3]);
  const float *dy = static_cast<const float *>(params[4]);
  float *dx = static_cast<float *>(params[5]);
  float *dweight = static_cast<float *>(params[6]);
  float *dbias = static_cast<float *>(params[7]);
  GroupShape s;
  if (!group_shape(ndims[0], shapes[0], static_cast<int64_t>(scalars[1]), static_cast<int64_t>(scalars[2]), &s)) return 2;
  std::vector<float> mean, rstd;
  group_stats(x, s, scalars[0], &mean, &rstd);
  const int64_t items = s.batch * s.groups;
  // Per (b, c): sum of dy_affine * xhat and of dy_affine (dy_affine = the gradient at the affine output).
  std::vector<double> dw_part(s.batch * s.channels, 0.0), db_part(s.batch * s.channels, 0.0);
  const double count = static_cast<double>(s.frames * s.per_group * s.spatial);
#pragma omp parallel for schedule(static)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t b = item / s.groups, g = item % s.groups;
    const float mu = mean[item], r = rstd[item];
    // Pass 1: per-channel sums of g*xhat and g (g = dy through SiLU), for dweight/dbias and the dx correction.
    for (int64_t cg = 0; cg < s.per_group; ++cg) {
      const int64_t c = g * s.per_group + cg;
      const float w = weight[c], bc = bias[c];
      double sum_gx = 0.0, sum_g = 0.0;
      for (int64_t f = 0; f < s.frames; ++f) {
        const int64_t offset = ((b * s.frames + f) * s.channels + c) * s.spatial;
        float part_gx = 0.0f, part_g = 0.0f;
        for (int64_t i = 0; i < s.spatial; ++i) {
          const float xhat = (x[offset + i] - mu) * r;
          float grad = dy[offset + i];
          if (kSilu) {
            const float v = xhat * w + bc;
            const float sg = sigmoid(v);
            grad *= sg * (1.0f + v * (1.0f - sg));
          }
          part_gx += grad * xhat;
          part_g += grad;
        }
        sum_gx += part_gx;
        sum_g += part_g;
      }
      dw_part[b * s.channels + c] = sum_gx;
      db_part[b * s.channels + c] = sum_g;
    }
    // dx = r * (w g - mean_group(w g) - xhat * mean_group(w g xhat))
    double mean_wg = 0.0, mean_wgx = 0.0;
    for (int64_t cg = 0; cg < s.per_group; ++cg) {
      const int64_t c = g * s.per_group + cg;
      mean_wg += weight[c] * db_part[b * s.channels + c];
      mean_wgx += weight[c] * dw_part[b * s.channels + c];
    }
    const float m1 = static_cast<float>(mean_wg / count), m2 = static_cast<float>(mean_wgx / count);
    for (int64_t cg = 0; cg < s.per_group; ++cg) {
      const int64_t c = g * s.per_group + cg;
      const float w = weight[c], bc = bias[c];
      for (int64_t f = 0; f < s.frames; ++f) {
        const int64_t offset = ((b * s.frames + f) * s.channels + c) * s.spatial;
        for (int64_t i = 0; i < s.spatial; ++i) {
          const float xhat = (x[offset + i] - mu) * r;
          float grad = dy[offset + i];
          if (kSilu) {
            const float v = xhat * w + bc;
            const float sg = sigmoid(v);
            grad *= sg * (1.0f + v * (1.0f - sg));
          }
          dx[offset + i] = r * (w * grad - m1 - xhat * m2);
        }
      }
    }
  }
  for (int64_t c = 0; c < s.channels; ++c) {
    double w_sum = 0.0, b_sum = 0.0;
    for (int64_t b = 0; b < s.batch; ++b) {
      w_sum += dw_part[b * s.channels + c];
      b_sum += db_part[b * s.channels + c];
    }
    dweight[c] = static_cast<float>(w_sum);
    dbias[c] = static_cast<float>(b_sum);
  }
  return 0;
}

// ---- LayerNorm --------------------------------------------------------------------------------------------------

void row_stats(const float *row, int64_t n, float eps, float *mean_out, float *rstd_out) {
  const float mu = static_cast<float>(lane_sum(row, n) / n);
  const double squares = lane_centred_squares(row, n, mu);
  *mean_out = mu;
  *rstd_out = static_cast<float>(1.0 / std::sqrt(squares / n + static_cast<double>(eps)));
}

int layer_norm_forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  // inputs: x (..., D), weight (D), bias (D), scalars [eps]; output: y
  if (nparam != 5 || !is_f32(dtypes[0])) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *weight = static_cast<const float *>(params[1]);
  const float *bias = static_cast<const float *>(params[2]);
  const float eps = static_cast<const float *>(params[3])[0];
  float *y = static_cast<float *>(params[4]);
  const int64_t d = shapes[0][ndims[0] - 1];
  const int64_t rows = numel(ndims[0], shapes[0]) / d;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const float *src = x + row * d;
    float *dst = y + row * d;
    float mu, r;
    row_stats(src, d, eps, &mu, &r);
    for (int64_t i = 0; i < d; ++i) dst[i] = (src[i] - mu) * r * weight[i] + bias[i];
  }
  return 0;
}

int layer_norm_backward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  // inputs: x, weight, bias, scalars, dy; outputs: dx, dweight, dbias
  if (nparam != 8 || !is_f32(dtypes[0])) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *weight = static_cast<const float *>(params[1]);
  const float eps = static_cast<const float *>(params[3])[0];
  const float *dy = static_cast<const float *>(params[4]);
  float *dx = static_cast<float *>(params[5]);
  float *dweight = static_cast<float *>(params[6]);
  float *dbias = static_cast<float *>(params[7]);
  const int64_t d = shapes[0][ndims[0] - 1];
  const int64_t rows = numel(ndims[0], shapes[0]) / d;
  int threads = 1;
#pragma omp parallel
  {
#pragma omp single
    threads = tav::team_size();
  }
  std::vector<double> dw_part(static_cast<size_t>(threads) * d, 0.0), db_part(static_cast<size_t>(threads) * d, 0.0);
#pragma omp parallel
  {
    const int t = tav::thread_id();
    double *dw_t = dw_part.data() + static_cast<int64_t>(t) * d;
    double *db_t = db_part.data() + static_cast<int64_t>(t) * d;
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const float *src = x + row * d;
      const float *grad = dy + row * d;
      float *out = dx + row * d;
      float mu, r;
      row_stats(src, d, eps, &mu, &r);
      float sum_wg = 0.0f, sum_wgx = 0.0f;
      for (int64_t i = 0; i < d; ++i) {
        const float xhat = (src[i] - mu) * r;
        const float wg = weight[i] * grad[i];
        sum_wg += wg;
        sum_wgx += wg * xhat;
        dw_t[i] += grad[i] * xhat;
        db_t[i] += grad[i];
      }
      const float m1 = sum_wg / d, m2 = sum_wgx / d;
      for (int64_t i = 0; i < d; ++i) {
        const float xhat = (src[i] - mu) * r;
        out[i] = r * (weight[i] * grad[i] - m1 - xhat * m2);
      }
    }
  }
  for (int64_t i = 0; i < d; ++i) {
    double w_sum = 0.0, b_sum = 0.0;
    for (int t = 0; t < threads; ++t) {
      w_sum += dw_part[static_cast<int64_t>(t) * d + i];
      b_sum += db_part[static_cast<int64_t>(t) * d + i];
    }
    dweight[i] = static_cast<float>(w_sum);
    dbias[i] = static_cast<float>(b_sum);
  }
  return 0;
}

// ---- GEGLU ------------------------------------------------------------------------------------------------------

int geglu_forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  // input: projected (..., 2I); output: (..., I)
  if (nparam != 2 || !is_f32(dtypes[0])) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const int64_t width = shapes[0][ndims[0] - 1], inner = width / 2;
  const int64_t rows = numel(ndims[0], shapes[0]) / width;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const float *hidden = x + row * width;
    const float *gate = hidden + inner;
    float *out = y + row * inner;
    for (int64_t i = 0; i < inner; ++i) {
      const float g = gate[i];
      out[i] = hidden[i] * (0.5f * g * (1.0f + fast_erf(g * kInvSqrt2)));
    }
  }
  return 0;
}

int geglu_backward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  // inputs: projected (..., 2I), dy (..., I); output: dprojected (..., 2I)
  if (nparam != 3 || !is_f32(dtypes[0])) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  const int64_t width = shapes[0][ndims[0] - 1], inner = width / 2;
  const int64_t rows = numel(ndims[0], shapes[0]) / width;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const float *hidden = x + row * width;
    const float *gate = hidden + inner;
    const float *grad = dy + row * inner;
    float *d_hidden = dx + row * width;
    float *d_gate = d_hidden + inner;
    for (int64_t i = 0; i < inner; ++i) {
      const float g = gate[i];
      const float cdf = 0.5f * (1.0f + fast_erf(g * kInvSqrt2));
      const float pdf = kInvSqrt2Pi * fast_exp(-0.5f * g * g);
      d_hidden[i] = grad[i] * g * cdf;
      d_gate[i] = grad[i] * hidden[i] * (cdf + g * pdf);
    }
  }
  return 0;
}

}  // namespace

extern "C" {

int group_norm_fwd(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return group_norm_forward<false>(n, p, nd, s, t);
}
int group_norm_silu_fwd(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return group_norm_forward<true>(n, p, nd, s, t);
}
int group_norm_bwd(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return group_norm_backward<false>(n, p, nd, s, t);
}
int group_norm_silu_bwd(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return group_norm_backward<true>(n, p, nd, s, t);
}
int layer_norm_fwd(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return layer_norm_forward(n, p, nd, s, t);
}
int layer_norm_bwd(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return layer_norm_backward(n, p, nd, s, t);
}
int geglu_fwd(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return geglu_forward(n, p, nd, s, t);
}
int geglu_bwd(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return geglu_backward(n, p, nd, s, t);
}

}  // extern "C"
