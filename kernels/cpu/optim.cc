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
#pragma GCC optimize("fp-contract=off")
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

bool is_f32(const char *dtype) { return std::strcmp(dtype, "float32") == 0 || std::strcmp(dtype, "float") == 0; }

int adamw(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 8) return 1;
  for (int i = 0; i < nparam; ++i)
    if (!is_f32(dtypes[i])) return 1;
  int64_t n = 1;
  for (int i = 0; i < ndims[0]; ++i) n *= shapes[0][i];
  for (int t = 1; t < 4; ++t) {
    int64_t m = 1;
    for (int i = 0; i < ndims[t]; ++i) m *= shapes[t][i];
    if (m != n) return 2;
  }
  const float *p = static_cast<const float *>(params[0]);
  const float *g = static_cast<const float *>(params[1]);
  const float *m = static_cast<const float *>(params[2]);
  const float *v = static_cast<const float *>(params[3]);
  const float *s = static_cast<const float *>(params[4]);
  float *p_out = static_cast<float *>(params[5]);
  float *m_out = static_cast<float *>(params[6]);
  float *v_out = static_cast<float *>(params[7]);
  const float step_size = s[0], decay = s[1], bc2 = s[2], one_minus_beta1 = s[3], beta2 = s[4];
  const float one_minus_beta2 = s[5], eps = s[6];
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const float grad = g[i];
    const float exp_avg = m[i] + one_minus_beta1 * (grad - m[i]);
    const float exp_avg_sq = beta2 * v[i] + one_minus_beta2 * grad * grad;
    const float denom = std::sqrt(exp_avg_sq) / bc2 + eps;
    p_out[i] = p[i] * decay - step_size * exp_avg / denom;
    m_out[i] = exp_avg;
    v_out[i] = exp_avg_sq;
  }
  return 0;
}

}  // namespace

extern "C" int adamw_update(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return adamw(n, p, nd, s, t);
}
