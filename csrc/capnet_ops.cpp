// capnet_ops.cpp: schemas, input checks and CPU kernels of the two fused ops of CAPNet.
//
// capnet::db_focal_loss -- distribution-balanced focal loss with negative-tolerant
//   regularisation (SPEC section 3; specification: capnet.py `db_focal_loss_reference`):
//     w_bc = alpha + sigmoid(beta ((1/n_c) / sum_k y_bk / n_k - mu))   (alpha + 1 if no positive)
//     z' = z + bias_c, bias_c = -kappa / lam log(N / n_c - 1); z'' = z' (y = 1) or lam z' (y = 0)
//     loss = balance (1 - p_t)^gamma w' bce(z'', y) cw_c, p_t = exp(-bce), w' = w or w / lam
//   One pass per row computes the loss and, when asked, d loss / d logits, which autograd's
//   backward (capnet.py) then only multiplies by the incoming gradient.
// capnet::graph_propagate -- out = act(adj @ (x @ weight)), act = LeakyReLU(negative_slope) or
//   identity (specification: capnet.py `graph_propagate_reference`). GEMMs go to ATen (MKL /
//   cuBLAS); the activation is fused into one pass over the product, and the output is saved
//   for backward (for slope >= 0, out > 0 exactly where the pre-activation is > 0).
//   capnet::graph_propagate_backward gives the grads of adj, x and weight.
//
// Both are deterministic: no atomics, reductions in a fixed order.
#include "capnet.h"
#include "capnet_math.h"

#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <torch/extension.h>

#include <cmath>
#include <vector>

namespace capnet {

// ---------------------------------------------------------------------------- checks

DbFocalInputs check_db_focal_inputs(const at::Tensor& logits, const at::Tensor& targets,
                                    const at::Tensor& class_freq,
                                    const c10::optional<at::Tensor>& class_weight,
                                    double num_images, double lam, double gamma,
                                    int64_t reduction) {
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

void leaky_forward_cpu(at::Tensor& pre, double slope) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.scalar_type(), "leaky_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* p = pre.data_ptr<scalar_t>();
    const acc_t s = static_cast<acc_t>(slope);
    at::parallel_for(0, pre.numel(), 16384, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {   // branch-free select: vectorises
        const acc_t v = static_cast<acc_t>(p[i]);
        p[i] = static_cast<scalar_t>(v > acc_t(0) ? v : v * s);
      }
    });
  });
}

at::Tensor leaky_backward_cpu(const at::Tensor& grad_out, const at::Tensor& out, double slope) {
  const at::Tensor g = grad_out.contiguous(), o = out.contiguous();
  at::Tensor res = at::empty_like(o);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.scalar_type(), "leaky_bw_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* op = o.data_ptr<scalar_t>();
    scalar_t* rp = res.data_ptr<scalar_t>();
    const acc_t s = static_cast<acc_t>(slope);
    at::parallel_for(0, o.numel(), 16384, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const acc_t gv = static_cast<acc_t>(gp[i]);
        rp[i] = static_cast<scalar_t>(static_cast<acc_t>(op[i]) > acc_t(0) ? gv : gv * s);
      }
    });
  });
  return res;
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

template <typename scalar_t>
void db_focal_rows_cpu(const DbFocalInputs& in, double num_images, double alpha, double beta,
                       double mu, double kappa, double lam, double gamma, double balance,
                       int64_t reduction, scalar_t* loss_elems, double* loss_rows,
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
  const acc_t a = alpha, be = beta, m = mu, l = lam, g = gamma, bal = balance;
  const acc_t grad_scale = reduction == 1 ? acc_t(1) / static_cast<acc_t>(B * C) : acc_t(1);
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(C, 1));
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
      for (int64_t c = 0; c < C; ++c) {
        acc_t lv, gv;
        capnet_math::db_focal_element<acc_t>(static_cast<acc_t>(zr[c]),
                                             static_cast<acc_t>(yr[c]) != acc_t(0), inv_n[c],
                                             bias[c], cwp[c], row_sum, a, be, m, l, g, bal,
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
    double gamma, double balance, const c10::optional<at::Tensor>& class_weight,
    int64_t reduction, bool compute_grad) {
  const DbFocalInputs in = check_db_focal_inputs(logits, targets, class_freq, class_weight,
                                                 num_images, lam, gamma, reduction);
  const int64_t B = logits.size(0), C = logits.size(1);
  at::Tensor loss = reduction == 0 ? at::empty({B, C}, in.logits.options())
                                   : at::empty({}, in.logits.options());
  at::Tensor grad = compute_grad ? at::empty({B, C}, in.logits.options())
                                 : at::empty({0}, in.logits.options());
  std::vector<double> rows(reduction == 0 ? 0 : B);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(),
                                  "db_focal_loss_cpu", [&] {
    db_focal_rows_cpu<scalar_t>(in, num_images, alpha, beta, mu, kappa, lam, gamma, balance,
                                reduction, reduction == 0 ? loss.data_ptr<scalar_t>() : nullptr,
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

}  // namespace

TORCH_LIBRARY(capnet, m) {
  m.def(
      "db_focal_loss(Tensor logits, Tensor targets, Tensor class_freq, float num_images, "
      "float alpha, float beta, float mu, float kappa, float lam, float gamma, float balance, "
      "Tensor? class_weight, int reduction, bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "graph_propagate(Tensor adj, Tensor x, Tensor weight, float negative_slope, "
      "bool activation) -> (Tensor, Tensor)");
  m.def(
      "graph_propagate_backward(Tensor grad_out, Tensor adj, Tensor x, Tensor weight, "
      "Tensor h, Tensor out, float negative_slope, bool activation, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(capnet, CPU, m) {
  m.impl("db_focal_loss", &db_focal_loss_cpu);
  m.impl("graph_propagate", &graph_propagate_cpu);
  m.impl("graph_propagate_backward", &graph_propagate_backward_cpu);
}

}  // namespace capnet

// `import capnet_ext` loads this library, which registers torch.ops.capnet.*; the module
// itself only reports how it was built.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "CAPNet fused ops: torch.ops.capnet.db_focal_loss, graph_propagate";
#ifdef CAPNET_WITH_CUDA
  mod.attr("WITH_CUDA") = true;
#else
  mod.attr("WITH_CUDA") = false;
#endif
}
