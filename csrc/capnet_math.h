// capnet_math.h: the per-element math (DB-focal loss, QuickGELU) shared by the CPU (C++) and
// CUDA kernels. Torch-free, so capnet_kernels.cu can include it under plain `nvcc -c`.
//
// DB-focal loss, per element (b, c), with y in {0, 1}, inv_n = 1 / n_c, row_sum = sum_k y_bk / n_k
// (method step (7); the specification is capnet.py `db_focal_loss_reference`):
//   r   = inv_n / row_sum,  w = alpha + sigmoid(beta (r - mu))      (w = alpha + 1 if row_sum = 0)
//   z'  = z + bias_c,  z'' = z' if y else lam z',  w' = w if y else w / lam
//   bce = BCEWithLogits(z'', y),  p_t = exp(-bce)
//   loss = balance * (1 - p_t)^g * w' * bce * cw_c,  g = gamma if y else gamma_neg
// Written with the margin t = z'' if y else -z'': bce = softplus(-t), p_t = sigmoid(t) and
// 1 - p_t = sigmoid(-t), all from e = exp(-|t|) (no cancellation, finite for |z| up to 1e4+).
// Gradient: dloss/dt = -K q^g (g p_t bce + q) with q = 1 - p_t, K = balance w' cw_c
// (the q^(g-1) of the chain rule times dq/dt = -q p_t folds into q^g: no 0 * inf at q = 0),
// and dt/dz = +1 (y = 1) or -lam (y = 0).
//
// QuickGELU, CLIP's MLP activation (specification: capnet.py `quick_gelu_reference`):
//   y = x s,  s = sigmoid(1.702 x) = 1 / (1 + exp(-1.702 x))
//   dy/dx = s (1 + 1.702 x (1 - s)), computed as s + y (1.702 (1 - s)): the same value, and no
//   inf * 0 = NaN at huge |x| (there s is exactly 0 or 1, so y = -0 or 1 - s = 0 multiplies a
//   finite factor). exp(-1.702 x) = inf for x << 0 gives s = 0, y = -0, as the reference does.
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define CAPNET_HD __host__ __device__ __forceinline__
#else
#define CAPNET_HD inline
#endif

namespace capnet_math {

template <typename acc_t>
CAPNET_HD acc_t pow_gamma(acc_t q, acc_t gamma) {
  // the common exponents exactly as torch's pow special-cases them
  if (gamma == acc_t(2)) return q * q;
  if (gamma == acc_t(1)) return q;
  if (gamma == acc_t(0)) return acc_t(1);
  using std::pow;
  return pow(q, gamma);
}

// loss and d loss / d z of one element; grad_scale is 1/(B*C) for mean reduction, else 1.
template <typename acc_t>
CAPNET_HD void db_focal_element(acc_t z, bool pos, acc_t inv_n, acc_t bias, acc_t cw,
                                acc_t row_sum, acc_t alpha, acc_t beta, acc_t mu, acc_t lam,
                                acc_t gamma, acc_t gamma_neg, acc_t balance, acc_t grad_scale,
                                acc_t* loss, acc_t* grad) {
  using std::exp; using std::fabs; using std::log1p;
  const acc_t one = acc_t(1);
  const acc_t w = row_sum > acc_t(0) ? alpha + one / (one + exp(-beta * (inv_n / row_sum - mu)))
                                     : alpha + one;  // the r -> inf limit (row without positive)
  const acc_t m = pos ? one : lam;
  const acc_t z2 = m * (z + bias);
  const acc_t wp = pos ? w : w / lam;
  const acc_t t = pos ? z2 : -z2;
  const acc_t e = exp(-fabs(t));
  const acc_t bce = (t < acc_t(0) ? -t : acc_t(0)) + log1p(e);
  const acc_t inv = one / (one + e);
  const acc_t pt = t >= acc_t(0) ? inv : e * inv;
  const acc_t q = t >= acc_t(0) ? e * inv : inv;
  const acc_t k = balance * wp * cw;
  const acc_t g = pos ? gamma : gamma_neg;
  const acc_t qg = pow_gamma(q, g);
  *loss = k * qg * bce;
  if (grad) *grad = -k * qg * (g * pt * bce + q) * (pos ? one : -lam) * grad_scale;
}

template <typename acc_t>
CAPNET_HD acc_t quick_gelu_sigmoid(acc_t x) {
  using std::exp;
  return acc_t(1) / (acc_t(1) + exp(acc_t(-1.702) * x));
}

template <typename acc_t>
CAPNET_HD acc_t quick_gelu_forward(acc_t x) { return x * quick_gelu_sigmoid(x); }

// d loss / d x of one element, from the incoming gradient g and the input x
template <typename acc_t>
CAPNET_HD acc_t quick_gelu_backward(acc_t g, acc_t x) {
  const acc_t s = quick_gelu_sigmoid(x);
  return g * (s + (x * s) * (acc_t(1.702) * (acc_t(1) - s)));
}

}  // namespace capnet_math
