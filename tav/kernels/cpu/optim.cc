// torch.optim.AdamW's update of one parameter (fp32), fused: the optimiser step of a tuning run was ~15 MindSpore
// ops per trainable tensor, and MindSpore's graph compiler keeps a fixed amount of memory per op (~0.5 MiB on
// CPU), so the optimiser alone held ~300 MiB of a small-bench train step.
//
//   adamw_update  inputs param, grad, exp_avg, exp_avg_sq (same shape), scalars [step_size, decay,
//                 bias_correction2_sqrt, 1 - beta1, beta2, 1 - beta2, eps]; outputs param', exp_avg', exp_avg_sq'
//                 (1 - beta computed by the caller in double, as the op-by-op form's Python constants are)
// Same arithmetic, in the same order, as tav.training.AdamW's op-by-op form (itself torch's):
//   m' = m + (1 - b1) (g - m);  v' = b2 v + (1 - b2) g g;  p' = p decay - step_size m' / (sqrt(v') / bc2 + eps)
// No fused multiply-adds: the same roundings as the separate MindSpore ops.
//
// The host-side update of a CPU train step (tav.training.TrainStep) calls two plain C functions through ctypes on
// numpy views of the tensors (Tensor.asnumpy shares a CPU tensor's storage), instead of ~10 eager MindSpore ops
// per tensor (~75 ms a step at the small bench config):
//   tav_unscaled_sum_squares(g, n, denominator, &finite) -> sum of (g / denominator)^2 in double; finite = 0 when
//                 any g / denominator is not finite
//   tav_adamw_step(p, g, m, v, n, scalars [denominator, clip_coef, step_size, decay, bc2, 1 - b1, b2, 1 - b2,
//                 eps]) updates p, m, v in place with the gradient (g / denominator) * clip_coef: torch's unscale_,
//                 clip_grad_norm_'s multiply, then the step above.
#pragma GCC optimize("fp-contract=off")
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace {

struct AdamWScalars {
  float step_size, decay, bc2, one_minus_beta1, beta2, one_minus_beta2, eps;
};

inline void adamw_element(float p, float grad, float m, float v, const AdamWScalars &s, float *p_out, float *m_out,
                          float *v_out) {
  const float exp_avg = m + s.one_minus_beta1 * (grad - m);
  const float exp_avg_sq = s.beta2 * v + s.one_minus_beta2 * grad * grad;
  const float denom = std::sqrt(exp_avg_sq) / s.bc2 + s.eps;
  *p_out = p * s.decay - s.step_size * exp_avg / denom;
  *m_out = exp_avg;
  *v_out = exp_avg_sq;
}

using tav::is_f32;
using tav::numel;

int adamw(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 8) return 1;
  for (int i = 0; i < nparam; ++i)
    if (!is_f32(dtypes[i])) return 1;
  const int64_t n = numel(ndims[0], shapes[0]);
  for (int t = 1; t < 4; ++t)
    if (numel(ndims[t], shapes[t]) != n) return 2;
  const float *p = static_cast<const float *>(params[0]);
  const float *g = static_cast<const float *>(params[1]);
  const float *m = static_cast<const float *>(params[2]);
  const float *v = static_cast<const float *>(params[3]);
  const float *s = static_cast<const float *>(params[4]);
  float *p_out = static_cast<float *>(params[5]);
  float *m_out = static_cast<float *>(params[6]);
  float *v_out = static_cast<float *>(params[7]);
  const AdamWScalars scalars{s[0], s[1], s[2], s[3], s[4], s[5], s[6]};
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) adamw_element(p[i], g[i], m[i], v[i], scalars, p_out + i, m_out + i, v_out + i);
  return 0;
}

}  // namespace

extern "C" {

int adamw_update(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return adamw(n, p, nd, s, t);
}

double tav_unscaled_sum_squares(const float *g, int64_t n, float denominator, int *finite) {
  double total = 0.0;
  int all_finite = 1;
#pragma omp parallel for schedule(static) reduction(+ : total) reduction(& : all_finite) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const float x = g[i] / denominator;
    all_finite &= std::isfinite(x) ? 1 : 0;
    total += static_cast<double>(x) * static_cast<double>(x);
  }
  *finite = all_finite;
  return total;
}

void tav_adamw_step(float *p, const float *g, float *m, float *v, int64_t n, const float *s) {
  const float denominator = s[0], clip_coef = s[1];
  const AdamWScalars scalars{s[2], s[3], s[4], s[5], s[6], s[7], s[8]};
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const float grad = (g[i] / denominator) * clip_coef;
    adamw_element(p[i], grad, m[i], v[i], scalars, p + i, m + i, v + i);
  }
}

}  // extern "C"
