// capnet_ops.cpp: schemas, input checks and CPU kernels of the two fused ops of CAPNet.
//
// capnet::db_focal_loss -- distribution-balanced focal loss with negative-tolerant
//   regularisation (method step (7); specification: capnet.py `db_focal_loss_reference`):
//     w_bc = alpha + sigmoid(beta ((1/n_c) / sum_k y_bk / n_k - mu))   (alpha + 1 if no positive)
//     z' = z + bias_c, bias_c = -kappa / lam log(N / n_c - 1); z'' = z' (y = 1) or lam z' (y = 0)
//     loss = balance (1 - p_t)^g w' bce(z'', y) cw_c, p_t = exp(-bce), w' = w or w / lam,
//     g = gamma (y = 1) or gamma_neg (y = 0)
//   One pass per row computes the loss and, when asked, d loss / d logits, which autograd's
//   backward (capnet.py) then only multiplies by the incoming gradient.
// capnet::graph_propagate -- out = act(adj @ (x @ weight)), act = LeakyReLU(negative_slope) or
//   identity (specification: capnet.py `graph_propagate_reference`). GEMMs go to ATen (MKL /
//   cuBLAS); the activation is fused into one pass over the product, and the output is saved
//   for backward (for slope >= 0, out > 0 exactly where the pre-activation is > 0).
//   capnet::graph_propagate_backward gives the grads of adj, x and weight.
//
// capnet::quick_gelu -- y = x sigmoid(1.702 x), CLIP's MLP activation (specification: capnet.py
//   `quick_gelu_reference`, formula in capnet_math.h), in one pass instead of the reference's three
//   (and five backward); capnet::quick_gelu_backward gives dx = g s (1 + 1.702 x (1 - s)) from x
//   alone, so autograd saves x only. float16/bfloat16/float32 in: float32 math, the output in the
//   input's dtype, rounded once; float64: double math.
//
// All are deterministic: no atomics, reductions in a fixed order.
#include "capnet.h"
#include "capnet_math.h"

#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

namespace capnet {

// ---------------------------------------------------------------------------- checks

DbFocalInputs check_db_focal_inputs(const at::Tensor& logits, const at::Tensor& targets,
                                    const at::Tensor& class_freq,
                                    const c10::optional<at::Tensor>& class_weight,
                                    double num_images, double lam, double gamma,
                                    double gamma_neg, int64_t reduction) {
  TORCH_CHECK(logits.dim() == 2, "db_focal_loss: logits must be 2-D (B, C), got shape ",
              logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()),
              "db_focal_loss: logits must be a floating tensor, got ", logits.scalar_type());
  TORCH_CHECK(targets.sizes() == logits.sizes(), "db_focal_loss: targets shape ",
              targets.sizes(), " must equal logits shape ", logits.sizes());
  TORCH_CHECK(at::isFloatingType(targets.scalar_type()) || targets.scalar_type() == at::kBool ||
                  at::isIntegralType(targets.scalar_type(), /*includeBool=*/false),
              "db_focal_loss: targets must be a 0/1 tensor (floating, integer or bool), got ",
              targets.scalar_type());
  const int64_t C = logits.size(1);
  TORCH_CHECK(class_freq.dim() == 1 && class_freq.size(0) == C,
              "db_focal_loss: class_freq must have shape (C,) = (", C, ",), got ",
              class_freq.sizes());
  TORCH_CHECK(!class_freq.is_complex() && class_freq.scalar_type() != at::kBool,
              "db_focal_loss: class_freq must be real counts, got ", class_freq.scalar_type());
  TORCH_CHECK(targets.device() == logits.device() && class_freq.device() == logits.device(),
              "db_focal_loss: logits (", logits.device(), "), targets (", targets.device(),
              ") and class_freq (", class_freq.device(), ") must be on the same device");
  TORCH_CHECK(std::isfinite(num_images) && num_images > 0,
              "db_focal_loss: num_images must be a positive number, got ", num_images);
  TORCH_CHECK(lam > 0, "db_focal_loss: lam must be > 0, got ", lam);
  TORCH_CHECK(gamma >= 0, "db_focal_loss: gamma must be >= 0, got ", gamma);
  TORCH_CHECK(gamma_neg >= 0, "db_focal_loss: gamma_neg must be >= 0, got ", gamma_neg);
  TORCH_CHECK(reduction >= 0 && reduction <= 2,
              "db_focal_loss: reduction code must be 0 (none), 1 (mean) or 2 (sum), got ",
              reduction);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  DbFocalInputs in;
  in.logits = logits.contiguous();
  in.targets = targets.to(logits.scalar_type()).contiguous();
  in.class_freq = class_freq.to(acc).contiguous();
  if (class_weight.has_value() && class_weight->defined()) {
    const auto& cw = *class_weight;
    TORCH_CHECK(cw.dim() == 1 && cw.size(0) == C,
                "db_focal_loss: class_weight must have shape (C,) = (", C, ",), got ",
                cw.sizes());
    TORCH_CHECK(at::isFloatingType(cw.scalar_type()),
                "db_focal_loss: class_weight must be floating, got ", cw.scalar_type());
    TORCH_CHECK(cw.device() == logits.device(), "db_focal_loss: class_weight is on ",
                cw.device(), " but logits on ", logits.device());
    in.class_weight = cw.to(acc).contiguous();
  } else {
    in.class_weight = at::ones({C}, logits.options().dtype(acc));
  }
  return in;
}

void check_graph_inputs(const at::Tensor& adj, const at::Tensor& x, const at::Tensor& weight,
                        double negative_slope) {
  TORCH_CHECK(adj.dim() == 2 && adj.size(0) == adj.size(1),
              "graph_propagate: adj must be square (C, C), got shape ", adj.sizes());
  TORCH_CHECK(x.dim() == 2 && x.size(0) == adj.size(0),
              "graph_propagate: x must be (C, Din) with C = ", adj.size(0), ", got shape ",
              x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == x.size(1),
              "graph_propagate: weight must be (Din, Dout) with Din = ", x.size(1),
              ", got shape ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "graph_propagate: x must be floating, got ", x.scalar_type());
  TORCH_CHECK(adj.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
              "graph_propagate: adj (", adj.scalar_type(), "), x (", x.scalar_type(),
              ") and weight (", weight.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(adj.device() == x.device() && weight.device() == x.device(),
              "graph_propagate: adj (", adj.device(), "), x (", x.device(), ") and weight (",
              weight.device(), ") must be on the same device");
  TORCH_CHECK(negative_slope >= 0 && std::isfinite(negative_slope),
              "graph_propagate: negative_slope must be finite and >= 0, got ", negative_slope);
}

void check_quick_gelu_inputs(const char* op, const at::Tensor& x, const at::Tensor* grad) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble, op,
              ": x must be a floating tensor (float16, bfloat16, float32 or float64), got ", t);
  if (grad == nullptr) return;
  TORCH_CHECK(grad->sizes() == x.sizes(), op, ": grad shape ", grad->sizes(),
              " must equal x shape ", x.sizes());
  TORCH_CHECK(grad->scalar_type() == t, op, ": grad (", grad->scalar_type(), ") and x (", t,
              ") must have the same dtype");
  TORCH_CHECK(grad->device() == x.device(), op, ": grad (", grad->device(), ") and x (",
              x.device(), ") must be on the same device");
}

// ---------------------------------------------------------------------------- graph_propagate (any device)

std::tuple<at::Tensor, at::Tensor> graph_propagate_impl(const at::Tensor& adj,
                                                        const at::Tensor& x,
                                                        const at::Tensor& weight,
                                                        double negative_slope, bool activation,
                                                        LeakyForwardFn epilogue) {
  check_graph_inputs(adj, x, weight, negative_slope);
  at::Tensor h = at::mm(x, weight);    // (C, Dout), saved for the adj gradient
  at::Tensor out = at::mm(adj, h);     // (C, Dout) pre-activation, made `out` in place
  if (activation) epilogue(out, negative_slope);
  return {out, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> graph_propagate_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& adj, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& h, const at::Tensor& out, double negative_slope,
    bool activation, std::array<bool, 3> output_mask, LeakyBackwardFn epilogue_backward) {
  check_graph_inputs(adj, x, weight, negative_slope);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && h.sizes() == out.sizes(),
              "graph_propagate_backward: grad_out ", grad_out.sizes(), ", h ", h.sizes(),
              " and out ", out.sizes(), " must all be (C, Dout)");
  const at::Tensor g = activation ? epilogue_backward(grad_out, out, negative_slope)
                                  : grad_out;                              // (C, Dout)
  at::Tensor g_adj, g_x, g_w;
  if (output_mask[0]) g_adj = at::mm(g, h.t());                            // (C, C)
  if (output_mask[1] || output_mask[2]) {
    const at::Tensor g_h = at::mm(adj.t(), g);                             // (C, Dout)
    if (output_mask[1]) g_x = at::mm(g_h, weight.t());                     // (C, Din)
    if (output_mask[2]) g_w = at::mm(x.t(), g_h);                          // (Din, Dout)
  }
  // an unneeded gradient is returned as an empty tensor (the schema has no optional returns)
  auto empty = [&]() { return at::empty({0}, x.options()); };
  return {g_adj.defined() ? g_adj : empty(), g_x.defined() ? g_x : empty(),
          g_w.defined() ? g_w : empty()};
}

// ---------------------------------------------------------------------------- CPU kernels

namespace {

// CPU epilogue: ATen's own vectorised (AVX2/AVX-512 by CPU dispatch) LeakyReLU, in place on the
// GEMM output, and its backward from the saved output (self_is_result, exact for slope >= 0).
// Hand-written loops here, built for the baseline ISA, were 4-5x slower than these kernels and
// made the op slower than the unfused reference.
void leaky_forward_cpu(at::Tensor& pre, double slope) { at::leaky_relu_(pre, slope); }

at::Tensor leaky_backward_cpu(const at::Tensor& grad_out, const at::Tensor& out, double slope) {
  return at::leaky_relu_backward(grad_out, out, slope, /*self_is_result=*/true);
}

std::tuple<at::Tensor, at::Tensor> graph_propagate_cpu(const at::Tensor& adj,
                                                       const at::Tensor& x,
                                                       const at::Tensor& weight,
                                                       double negative_slope, bool activation) {
  return graph_propagate_impl(adj, x, weight, negative_slope, activation, leaky_forward_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> graph_propagate_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& adj, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& h, const at::Tensor& out, double negative_slope,
    bool activation, std::array<bool, 3> output_mask) {
  return graph_propagate_backward_impl(grad_out, adj, x, weight, h, out, negative_slope,
                                       activation, output_mask, leaky_backward_cpu);
}


// ---- AVX2 row kernel. The loss needs three transcendentals per element; glibc's scalar exp and
// log1p made the fused loss no faster than the reference, whose elementwise ops run vectorised
// through SLEEF. So the rows are computed 8 floats / 4 doubles at a time with GCC vector types and
// the SLEEF functions libtorch_cpu exports (1-ulp exp/log1p/pow), chosen at run time when the CPU
// has AVX2 + FMA; the scalar loop (same formula, capnet_math.h) handles the tails and other CPUs.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(_MSC_VER)
#define CAPNET_HAVE_AVX2_PATH 1
#include <immintrin.h>
extern "C" {
__m256 Sleef_expf8_u10(__m256);
__m256 Sleef_log1pf8_u10(__m256);
__m256 Sleef_powf8_u10(__m256, __m256);
__m256d Sleef_expd4_u10(__m256d);
__m256d Sleef_log1pd4_u10(__m256d);
__m256d Sleef_powd4_u10(__m256d, __m256d);
}
#define CAPNET_AVX2 __attribute__((target("avx2,fma")))
typedef float f8 __attribute__((vector_size(32)));
typedef double d4 __attribute__((vector_size(32)));
template <typename T> struct Vec;
template <> struct Vec<float> { using type = f8; static constexpr int width = 8; };
template <> struct Vec<double> { using type = d4; static constexpr int width = 4; };
CAPNET_AVX2 inline f8 vexp(f8 x) { return Sleef_expf8_u10(x); }
CAPNET_AVX2 inline d4 vexp(d4 x) { return Sleef_expd4_u10(x); }
CAPNET_AVX2 inline f8 vlog1p(f8 x) { return Sleef_log1pf8_u10(x); }
CAPNET_AVX2 inline d4 vlog1p(d4 x) { return Sleef_log1pd4_u10(x); }
CAPNET_AVX2 inline f8 vpow(f8 x, f8 y) { return Sleef_powf8_u10(x, y); }
CAPNET_AVX2 inline d4 vpow(d4 x, d4 y) { return Sleef_powd4_u10(x, y); }
// q^gamma lane-wise, the common exponents exactly as capnet_math::pow_gamma
template <typename V, typename acc_t>
CAPNET_AVX2 inline V vpow_gamma(V q, acc_t gamma) {
  if (gamma == acc_t(2)) return q * q;
  if (gamma == acc_t(1)) return q;
  if (gamma == acc_t(0)) return V{} + acc_t(1);
  return vpow(q, V{} + gamma);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// elements [0, C - C % width) of one row; returns how many were done. Same math as
// capnet_math::db_focal_element, lane-wise; `w` depends on the row only through row_sum.
template <typename acc_t>
CAPNET_AVX2 int64_t db_focal_row_avx2(const acc_t* z, const acc_t* y, const acc_t* inv_n,
                                      const acc_t* bias, const acc_t* cw, int64_t C,
                                      acc_t row_sum, acc_t alpha, acc_t beta, acc_t mu, acc_t lam,
                                      acc_t gamma, acc_t gamma_neg, acc_t balance,
                                      acc_t grad_scale, acc_t* loss_out, acc_t* grad_out,
                                      double* row_loss) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = Vec<acc_t>::width;
  const V zero = V{} , one = zero + acc_t(1);
  const V lamv = zero + lam, neg_lam = zero - lam;
  int64_t c = 0;
  for (; c + W <= C; c += W) {
    V zv, yv, nv, bv, cv;
    __builtin_memcpy(&zv, z + c, sizeof(V));
    __builtin_memcpy(&yv, y + c, sizeof(V));
    __builtin_memcpy(&nv, inv_n + c, sizeof(V));
    __builtin_memcpy(&bv, bias + c, sizeof(V));
    __builtin_memcpy(&cv, cw + c, sizeof(V));
    const V w = row_sum > acc_t(0) ? alpha + one / (one + vexp(-beta * (nv / row_sum - mu)))
                                   : zero + (alpha + acc_t(1));
    const auto pos = yv != zero;
    const V m = pos ? one : lamv;
    const V z2 = m * (zv + bv);
    const V wp = pos ? w : w / lam;
    const V t = pos ? z2 : -z2;
    const auto tpos = t >= zero;
    const V e = vexp(tpos ? -t : t);                    // exp(-|t|)
    const V bce = (tpos ? zero : -t) + vlog1p(e);
    const V inv = one / (one + e);
    const V pt = tpos ? inv : e * inv;
    const V q = tpos ? e * inv : inv;
    const V k = balance * wp * cv;
    const V qg = gamma == gamma_neg ? vpow_gamma(q, gamma)  // q^g, g by the target's sign
                 : (pos ? vpow_gamma(q, gamma) : vpow_gamma(q, gamma_neg));
    const V g = pos ? zero + gamma : zero + gamma_neg;
    const V lv = k * qg * bce;
    if (grad_out) {
      const V gv = -k * qg * (g * pt * bce + q) * (pos ? one : neg_lam) * grad_scale;
      __builtin_memcpy(grad_out + c, &gv, sizeof(V));
    }
    if (loss_out) __builtin_memcpy(loss_out + c, &lv, sizeof(V));
    double s = 0;
    for (int i = 0; i < W; ++i) s += static_cast<double>(lv[i]);
    *row_loss += s;
  }
  return c;
}
#endif

template <typename scalar_t>
void db_focal_rows_cpu(const DbFocalInputs& in, double num_images, double alpha, double beta,
                       double mu, double kappa, double lam, double gamma, double gamma_neg,
                       double balance, int64_t reduction, scalar_t* loss_elems, double* loss_rows,
                       scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = in.logits.size(0), C = in.logits.size(1);
  const scalar_t* z = in.logits.data_ptr<scalar_t>();
  const scalar_t* y = in.targets.data_ptr<scalar_t>();
  const acc_t* n = in.class_freq.data_ptr<acc_t>();
  const acc_t* cwp = in.class_weight.data_ptr<acc_t>();
  // per-class constants, once per call: 1 / n_c and the NTR bias
  std::vector<acc_t> inv_n(C), bias(C);
  for (int64_t c = 0; c < C; ++c) {
    TORCH_CHECK(n[c] > 0 && n[c] < num_images, "db_focal_loss: class ", c,
                " has training count ", static_cast<double>(n[c]),
                "; the DB loss needs 0 < n_c < num_images (", num_images, ")");
    inv_n[c] = acc_t(1) / n[c];
    bias[c] = static_cast<acc_t>(-kappa / lam) * std::log(static_cast<acc_t>(num_images) / n[c] - acc_t(1));
  }
  const acc_t a = alpha, be = beta, m = mu, l = lam, bal = balance;
  const acc_t g = gamma, gn = gamma_neg;
  const acc_t grad_scale = reduction == 1 ? acc_t(1) / static_cast<acc_t>(B * C) : acc_t(1);
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(C, 1));
#ifdef CAPNET_HAVE_AVX2_PATH
  const bool use_avx2 = cpu_has_avx2();
#endif
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* zr = z + b * C;
      const scalar_t* yr = y + b * C;
      acc_t row_sum = 0;   // sum_k y_bk / n_k
      bool binary = true;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t yv = static_cast<acc_t>(yr[c]);
        binary &= (yv == acc_t(0)) | (yv == acc_t(1));
        row_sum += yv * inv_n[c];
      }
      TORCH_CHECK(binary, "db_focal_loss: targets must be 0 or 1; row ", b,
                  " has another value");
      double row_loss = 0;
      int64_t c0 = 0;
#ifdef CAPNET_HAVE_AVX2_PATH
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (use_avx2)
          c0 = db_focal_row_avx2<acc_t>(zr, yr, inv_n.data(), bias.data(), cwp, C, row_sum, a, be,
                                        m, l, g, gn, bal, grad_scale,
                                        loss_elems ? loss_elems + b * C : nullptr,
                                        grad ? grad + b * C : nullptr, &row_loss);
      }
#endif
      for (int64_t c = c0; c < C; ++c) {
        acc_t lv, gv;
        capnet_math::db_focal_element<acc_t>(static_cast<acc_t>(zr[c]),
                                             static_cast<acc_t>(yr[c]) != acc_t(0), inv_n[c],
                                             bias[c], cwp[c], row_sum, a, be, m, l, g, gn, bal,
                                             grad_scale, &lv, grad ? &gv : nullptr);
        if (grad) grad[b * C + c] = static_cast<scalar_t>(gv);
        if (loss_elems) loss_elems[b * C + c] = static_cast<scalar_t>(lv);
        row_loss += static_cast<double>(lv);
      }
      if (loss_rows) loss_rows[b] = row_loss;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> db_focal_loss_cpu(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& class_freq,
    double num_images, double alpha, double beta, double mu, double kappa, double lam,
    double gamma, double gamma_neg, double balance,
    const c10::optional<at::Tensor>& class_weight, int64_t reduction, bool compute_grad) {
  const DbFocalInputs in = check_db_focal_inputs(logits, targets, class_freq, class_weight,
                                                 num_images, lam, gamma, gamma_neg, reduction);
  const int64_t B = logits.size(0), C = logits.size(1);
  at::Tensor loss = reduction == 0 ? at::empty({B, C}, in.logits.options())
                                   : at::empty({}, in.logits.options());
  at::Tensor grad = compute_grad ? at::empty({B, C}, in.logits.options())
                                 : at::empty({0}, in.logits.options());
  std::vector<double> rows(reduction == 0 ? 0 : B);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(),
                                  "db_focal_loss_cpu", [&] {
    db_focal_rows_cpu<scalar_t>(in, num_images, alpha, beta, mu, kappa, lam, gamma, gamma_neg,
                                balance, reduction,
                                reduction == 0 ? loss.data_ptr<scalar_t>() : nullptr,
                                reduction == 0 ? nullptr : rows.data(),
                                compute_grad ? grad.data_ptr<scalar_t>() : nullptr);
    if (reduction != 0) {
      double total = 0;   // rows summed in order: deterministic for any thread count
      for (double r : rows) total += r;
      if (reduction == 1) total /= static_cast<double>(B * C);
      loss.fill_(total);
    }
  });
  return {loss, grad};
}

// ---- QuickGELU: one pass that reads x (and g) once and writes once. Measured on an AMD EPYC, one
// core: ~0.8 ns per element in cache with AVX-512 lanes (1.5-2x the AVX2 lanes), and 2.5-4 ns at
// the MLP size (ViT-B/16: 32 x 197 x 3072 = 19M elements), which is memory traffic and the first
// touch of the fresh output, as for torch.sigmoid alone. Lanes of 8 (AVX2 + FMA + F16C) or 16
// (AVX-512) floats, chosen at run time; half types are widened to float32 in the registers:
// bfloat16 by a 16-bit shift, stored rounded to nearest even exactly as c10::BFloat16 (NaN ->
// 0x7FC0); float16 by F16C (vcvtph2ps / vcvtps2ph, round to nearest even). exp is SLEEF's 1-ulp
// one and the sigmoid 1 / (1 + exp(-1.702 x)) as ATen's, so the float32 forward equals the
// reference bit for bit on AVX-512 (as checked on the EPYC). Every element takes the same path wherever it lies (a last partial
// vector is zero-padded), so a slice's result equals those elements of the whole tensor's. float64
// (gradcheck) and CPUs without AVX2 take the scalar loop of capnet_math.h.
constexpr int64_t kQuickGeluGrain = 32768;   // elements per parallel_for chunk

#ifdef CAPNET_HAVE_AVX2_PATH
#define CAPNET_QG_AVX2 __attribute__((target("avx2,fma,f16c")))
#define CAPNET_QG_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define CAPNET_QG_INLINE inline __attribute__((always_inline))
extern "C" __m512 Sleef_expf16_u10(__m512);

template <int W> struct QgLanes;
template <> struct QgLanes<8> {
  typedef float f __attribute__((vector_size(32)));
  typedef uint32_t u32 __attribute__((vector_size(32)));
  typedef uint16_t u16 __attribute__((vector_size(16)));
  CAPNET_QG_AVX2 static void exp(f* v) { *v = Sleef_expf8_u10(*v); }
  CAPNET_QG_AVX2 static void from_half(const u16* h, f* v) {
    *v = _mm256_cvtph_ps(reinterpret_cast<__m128i>(*h));
  }
  CAPNET_QG_AVX2 static void to_half(const f* v, u16* h) {
    *h = reinterpret_cast<u16>(_mm256_cvtps_ph(*v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};
template <> struct QgLanes<16> {
  typedef float f __attribute__((vector_size(64)));
  typedef uint32_t u32 __attribute__((vector_size(64)));
  typedef uint16_t u16 __attribute__((vector_size(32)));
  CAPNET_QG_AVX512 static void exp(f* v) { *v = Sleef_expf16_u10(*v); }
  CAPNET_QG_AVX512 static void from_half(const u16* h, f* v) {
    *v = _mm512_maskz_cvtph_ps(0xFFFF, reinterpret_cast<__m256i>(*h));
  }
  CAPNET_QG_AVX512 static void to_half(const f* v, u16* h) {
    *h = reinterpret_cast<u16>(
        _mm512_maskz_cvtps_ph(0xFFFF, *v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

// W elements of T (float, at::BFloat16 or at::Half) to W floats and back (vectors passed by
// pointer: these are inlined into the target("avx2") / target("avx512f") callers below)
template <int W, typename T>
CAPNET_QG_INLINE void qg_load(const T* p, typename QgLanes<W>::f* v) {
  using L = QgLanes<W>;
  if constexpr (std::is_same_v<T, float>) {
    __builtin_memcpy(v, p, sizeof(*v));
  } else {
    typename L::u16 h;
    __builtin_memcpy(&h, p, sizeof(h));
    if constexpr (std::is_same_v<T, at::Half>) L::from_half(&h, v);
    else *v = reinterpret_cast<typename L::f>(__builtin_convertvector(h, typename L::u32) << 16);
  }
}

template <int W, typename T>
CAPNET_QG_INLINE void qg_store(T* p, const typename QgLanes<W>::f* v) {
  using L = QgLanes<W>;
  if constexpr (std::is_same_v<T, float>) {
    __builtin_memcpy(p, v, sizeof(*v));
  } else {
    typename L::u16 h;
    if constexpr (std::is_same_v<T, at::Half>) {
      L::to_half(v, &h);
    } else {  // c10::BFloat16's round_to_nearest_even, lane-wise
      const auto u = reinterpret_cast<typename L::u32>(*v);
      const typename L::u32 r = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
      h = __builtin_convertvector(*v != *v ? typename L::u32{} + 0x7FC0u : r, typename L::u16);
    }
    __builtin_memcpy(p, &h, sizeof(h));
  }
}

// n % W == 0 elements; capnet_math::quick_gelu_forward / _backward lane-wise
template <int W, typename T>
CAPNET_QG_INLINE void qg_lanes(const T* x, const T* g, T* out, int64_t n) {
  using V = typename QgLanes<W>::f;
  const V one = V{} + 1.0f, k = V{} + 1.702f;
  V xv, gv, e, r;
  for (int64_t i = 0; i < n; i += W) {
    qg_load<W>(x + i, &xv);
    e = -k * xv;
    QgLanes<W>::exp(&e);
    const V s = one / (one + e);                           // sigmoid(1.702 x)
    if (g == nullptr) {
      r = xv * s;
    } else {
      qg_load<W>(g + i, &gv);
      r = gv * (s + (xv * s) * (k * (one - s)));
    }
    qg_store<W>(out + i, &r);
  }
}

template <typename T>
CAPNET_QG_AVX2 void qg_lanes_avx2(const T* x, const T* g, T* out, int64_t n) {
  qg_lanes<8>(x, g, out, n);
}
template <typename T>
CAPNET_QG_AVX512 void qg_lanes_avx512(const T* x, const T* g, T* out, int64_t n) {
  qg_lanes<16>(x, g, out, n);
}

// vector width: 16 (AVX-512 F/BW/VL), 8 (AVX2 + FMA + F16C) or 0 (the scalar loop), as the CPU
// allows and capped, like ATen's own kernels, by ATEN_CPU_CAPABILITY=avx2 or =default (read once;
// the tests run every path that way)
int qg_width() {
  static const int w = [] {
    const bool avx2 = cpu_has_avx2() && __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    const char* env = std::getenv("ATEN_CPU_CAPABILITY");
    const std::string cap = env ? env : "";
    if (cap == "default") return 0;
    if (cap == "avx2") return avx2 ? 8 : 0;
    return avx512 ? 16 : avx2 ? 8 : 0;
  }();
  return w;
}

template <typename T>
bool quick_gelu_vectorised(const T* x, const T* g, T* out, int64_t n) {
  const int W = qg_width();
  if (W == 0) return false;
  auto lanes = [&](const T* xp, const T* gp, T* op, int64_t m) {
    if (W == 16) qg_lanes_avx512<T>(xp, gp, op, m);
    else qg_lanes_avx2<T>(xp, gp, op, m);
  };
  const int64_t full = n / W * W;
  at::parallel_for(0, full / W, kQuickGeluGrain / W, [&](int64_t b0, int64_t b1) {
    lanes(x + b0 * W, g ? g + b0 * W : nullptr, out + b0 * W, (b1 - b0) * W);
  });
  if (full < n) {  // the last partial vector, zero-padded
    T xb[16] = {}, gb[16] = {}, ob[16];
    std::copy(x + full, x + n, xb);
    if (g) std::copy(g + full, g + n, gb);
    lanes(xb, g ? gb : nullptr, ob, W);
    std::copy(ob, ob + (n - full), out + full);
  }
  return true;
}
#endif

// out = quick_gelu(x) (g == nullptr) or its backward g * dy/dx, over n contiguous elements
template <typename scalar_t>
void quick_gelu_cpu_kernel(const scalar_t* x, const scalar_t* g, scalar_t* out, int64_t n) {
#ifdef CAPNET_HAVE_AVX2_PATH
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (quick_gelu_vectorised<scalar_t>(x, g, out, n)) return;
  }
#endif
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, kQuickGeluGrain, [&](int64_t i0, int64_t i1) {
    if (g == nullptr) {
      for (int64_t i = i0; i < i1; ++i)
        out[i] = static_cast<scalar_t>(
            capnet_math::quick_gelu_forward<acc_t>(static_cast<acc_t>(x[i])));
    } else {
      for (int64_t i = i0; i < i1; ++i)
        out[i] = static_cast<scalar_t>(capnet_math::quick_gelu_backward<acc_t>(
            static_cast<acc_t>(g[i]), static_cast<acc_t>(x[i])));
    }
  });
}

at::Tensor quick_gelu_cpu(const at::Tensor& x) {
  check_quick_gelu_inputs("quick_gelu", x, nullptr);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(xc.sizes(), xc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "quick_gelu_cpu",
                                  [&] {
    quick_gelu_cpu_kernel<scalar_t>(xc.data_ptr<scalar_t>(), nullptr, y.data_ptr<scalar_t>(),
                                    xc.numel());
  });
  return y;
}

at::Tensor quick_gelu_backward_cpu(const at::Tensor& grad, const at::Tensor& x) {
  check_quick_gelu_inputs("quick_gelu_backward", x, &grad);
  const at::Tensor xc = x.contiguous(), gc = grad.contiguous();
  at::Tensor dx = at::empty(xc.sizes(), xc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(),
                                  "quick_gelu_backward_cpu", [&] {
    quick_gelu_cpu_kernel<scalar_t>(xc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(),
                                    dx.data_ptr<scalar_t>(), xc.numel());
  });
  return dx;
}

}  // namespace


// ---------------------------------------------------------------------------- autograd (any device)
// C++ autograd Functions (not torch.library's Python register_autograd): the Python round trip
// cost about 0.1 ms per forward + backward, as much as the fused loss kernel itself at B=256, C=80.
// Both redispatch to the ops below autograd, so torch.compile traces them with the meta kernels
// below.

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class DbFocalLossFunction : public torch::autograd::Function<DbFocalLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits,
                               const at::Tensor& targets, const at::Tensor& class_freq,
                               double num_images, double alpha, double beta, double mu,
                               double kappa, double lam, double gamma, double gamma_neg,
                               double balance, const c10::optional<at::Tensor>& class_weight,
                               int64_t reduction, bool compute_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("capnet::db_focal_loss", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                             double, double, double, double, double, double, double, double,
                             const c10::optional<at::Tensor>&, int64_t, bool)>();
    // the gradient is needed exactly when autograd records this call
    const bool need =
        compute_grad || (c10::GradMode::is_enabled() && logits.requires_grad());
    auto [loss, grad] = op.call(logits, targets, class_freq, num_images, alpha, beta, mu, kappa,
                                lam, gamma, gamma_neg, balance, class_weight, reduction, need);
    ctx->save_for_backward({grad});
    ctx->mark_non_differentiable({grad});
    return {loss, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor dloss_dlogits = ctx->get_saved_variables()[0];  // (B, C), 1/(B C) for mean
    variable_list out(15);
    out[0] = grads[0] * dloss_dlogits;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> db_focal_loss_autograd(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& class_freq,
    double num_images, double alpha, double beta, double mu, double kappa, double lam,
    double gamma, double gamma_neg, double balance,
    const c10::optional<at::Tensor>& class_weight, int64_t reduction, bool compute_grad) {
  auto r = DbFocalLossFunction::apply(logits, targets, class_freq, num_images, alpha, beta, mu,
                                      kappa, lam, gamma, gamma_neg, balance, class_weight,
                                      reduction, compute_grad);
  return {r[0], r[1]};
}

class GraphPropagateFunction : public torch::autograd::Function<GraphPropagateFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& adj, const at::Tensor& x,
                               const at::Tensor& weight, double negative_slope,
                               bool activation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("capnet::graph_propagate", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                             bool)>();
    auto [out, h] = op.call(adj, x, weight, negative_slope, activation);
    ctx->save_for_backward({adj, x, weight, h, out});
    ctx->mark_non_differentiable({h});
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["activation"] = activation;
    return {out, h};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("capnet::graph_propagate_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                             bool, std::array<bool, 3>)>();
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      ctx->needs_input_grad(2)};
    auto [g_adj, g_x, g_w] =
        op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                ctx->saved_data["negative_slope"].toDouble(),
                ctx->saved_data["activation"].toBool(), mask);
    return {mask[0] ? g_adj : at::Tensor(), mask[1] ? g_x : at::Tensor(),
            mask[2] ? g_w : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> graph_propagate_autograd(const at::Tensor& adj,
                                                            const at::Tensor& x,
                                                            const at::Tensor& weight,
                                                            double negative_slope,
                                                            bool activation) {
  auto r = GraphPropagateFunction::apply(adj, x, weight, negative_slope, activation);
  return {r[0], r[1]};
}

class QuickGeluFunction : public torch::autograd::Function<QuickGeluFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("capnet::quick_gelu", "")
                         .typed<at::Tensor(const at::Tensor&)>();
    ctx->save_for_backward({x});   // the backward needs x only (s is recomputed)
    return op.call(x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("capnet::quick_gelu_backward", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
    return {op.call(grads[0], ctx->get_saved_variables()[0])};
  }
};

at::Tensor quick_gelu_autograd(const at::Tensor& x) { return QuickGeluFunction::apply(x); }

}  // namespace

// ---------------------------------------------------------------------------- meta (shapes only)
// Output shapes and dtypes without computing anything: torch.compile traces the ops through these
// (as fake kernels), and torch.library.opcheck compares them with the CPU and CUDA kernels.

namespace {

at::Tensor empty_or_none(const at::Tensor& like, at::IntArrayRef shape, bool keep) {
  return keep ? like.new_empty(shape) : like.new_empty({0});
}

std::tuple<at::Tensor, at::Tensor> db_focal_loss_meta(
    const at::Tensor& logits, const at::Tensor&, const at::Tensor&, double, double, double,
    double, double, double, double, double, double, const c10::optional<at::Tensor>&,
    int64_t reduction, bool compute_grad) {
  const at::Tensor loss = reduction == 0 ? logits.new_empty(logits.sizes()) : logits.new_empty({});
  return {loss, empty_or_none(logits, logits.sizes(), compute_grad)};
}

std::tuple<at::Tensor, at::Tensor> graph_propagate_meta(const at::Tensor&, const at::Tensor& x,
                                                        const at::Tensor& weight, double, bool) {
  return {x.new_empty({x.size(0), weight.size(1)}), x.new_empty({x.size(0), weight.size(1)})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> graph_propagate_backward_meta(
    const at::Tensor&, const at::Tensor& adj, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor&, const at::Tensor&, double, bool, std::array<bool, 3> mask) {
  return {empty_or_none(x, adj.sizes(), mask[0]), empty_or_none(x, x.sizes(), mask[1]),
          empty_or_none(x, weight.sizes(), mask[2])};
}

at::Tensor quick_gelu_meta(const at::Tensor& x) { return x.new_empty(x.sizes()); }

at::Tensor quick_gelu_backward_meta(const at::Tensor&, const at::Tensor& x) {
  return x.new_empty(x.sizes());
}

}  // namespace

TORCH_LIBRARY(capnet, m) {
  m.def(
      "db_focal_loss(Tensor logits, Tensor targets, Tensor class_freq, float num_images, "
      "float alpha, float beta, float mu, float kappa, float lam, float gamma, float gamma_neg, "
      "float balance, "
      "Tensor? class_weight, int reduction, bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "graph_propagate(Tensor adj, Tensor x, Tensor weight, float negative_slope, "
      "bool activation) -> (Tensor, Tensor)");
  m.def(
      "graph_propagate_backward(Tensor grad_out, Tensor adj, Tensor x, Tensor weight, "
      "Tensor h, Tensor out, float negative_slope, bool activation, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("quick_gelu(Tensor x) -> Tensor");
  m.def("quick_gelu_backward(Tensor grad, Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(capnet, CPU, m) {
  m.impl("db_focal_loss", &db_focal_loss_cpu);
  m.impl("graph_propagate", &graph_propagate_cpu);
  m.impl("graph_propagate_backward", &graph_propagate_backward_cpu);
  m.impl("quick_gelu", &quick_gelu_cpu);
  m.impl("quick_gelu_backward", &quick_gelu_backward_cpu);
}

TORCH_LIBRARY_IMPL(capnet, Meta, m) {
  m.impl("db_focal_loss", &db_focal_loss_meta);
  m.impl("graph_propagate", &graph_propagate_meta);
  m.impl("graph_propagate_backward", &graph_propagate_backward_meta);
  m.impl("quick_gelu", &quick_gelu_meta);
  m.impl("quick_gelu_backward", &quick_gelu_backward_meta);
}

TORCH_LIBRARY_IMPL(capnet, Autograd, m) {
  m.impl("db_focal_loss", &db_focal_loss_autograd);
  m.impl("graph_propagate", &graph_propagate_autograd);
  m.impl("quick_gelu", &quick_gelu_autograd);
}

}  // namespace capnet

// `import capnet_ext` loads this library, which registers torch.ops.capnet.*; the module
// itself only reports how it was built.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "CAPNet fused ops: torch.ops.capnet.db_focal_loss, graph_propagate, quick_gelu";
#ifdef CAPNET_WITH_CUDA
  mod.attr("WITH_CUDA") = true;
#else
  mod.attr("WITH_CUDA") = false;
#endif
}
