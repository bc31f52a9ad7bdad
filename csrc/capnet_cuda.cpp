// capnet_cuda.cpp: CUDA torch glue of CAPNet's fused ops (compiled only in CUDA builds).
// Validates inputs with the shared checks (capnet.h), allocates outputs, and calls the
// torch-free launchers of capnet_kernels.cu on the current stream. Formulas: capnet_ops.cpp.
#include "capnet.h"
#include "capnet_kernels.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace capnet {
namespace {

capnet_cuda::Dtype to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return capnet_cuda::Dtype::f16;
    case at::kBFloat16: return capnet_cuda::Dtype::bf16;
    case at::kFloat: return capnet_cuda::Dtype::f32;
    case at::kDouble: return capnet_cuda::Dtype::f64;
    default: TORCH_CHECK(false, "capnet CUDA kernels: unsupported dtype ", t,
                         " (float16, bfloat16, float32, float64)");
  }
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA error: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> db_focal_loss_cuda(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& class_freq,
    double num_images, double alpha, double beta, double mu, double kappa, double lam,
    double gamma, double gamma_neg, double balance,
    const c10::optional<at::Tensor>& class_weight, int64_t reduction, bool compute_grad) {
  TORCH_CHECK(logits.is_cuda(), "db_focal_loss: CUDA kernel called with logits on ",
              logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  // value checks of class_freq / targets need a host sync on CUDA and are left to the caller
  // (capnet.make_criterion validates the counts once); shapes, dtypes, devices are checked here.
  const DbFocalInputs in = check_db_focal_inputs(logits, targets, class_freq, class_weight,
                                                 num_images, lam, gamma, gamma_neg,
                                                 reduction);
  const int64_t B = logits.size(0), C = logits.size(1);
  const auto acc = in.class_freq.scalar_type();
  at::Tensor loss = reduction == 0 ? at::empty({B, C}, in.logits.options())
                                   : at::empty({}, in.logits.options());
  at::Tensor grad = compute_grad ? at::empty({B, C}, in.logits.options())
                                 : at::empty({0}, in.logits.options());
  at::Tensor rows = at::empty({reduction == 0 ? 0 : B}, in.logits.options().dtype(acc));
  if (reduction != 0 && B * C == 0) loss.fill_(reduction == 1 ? NAN : 0.0);  // as torch's mean/sum
  check_cuda(capnet_cuda::db_focal_loss_forward(
                 to_kernel_dtype(in.logits.scalar_type()), in.logits.data_ptr(),
                 in.targets.data_ptr(), in.class_freq.data_ptr(), in.class_weight.data_ptr(),
                 B, C, num_images, alpha, beta, mu, kappa, lam, gamma, gamma_neg, balance,
                 static_cast<int>(reduction), loss.data_ptr(),
                 reduction == 0 ? nullptr : rows.data_ptr(),
                 compute_grad ? grad.data_ptr() : nullptr,
                 at::cuda::getCurrentCUDAStream()),
             "db_focal_loss");
  return {loss, grad};
}

void leaky_forward_cuda(at::Tensor& pre, double slope) {
  check_cuda(capnet_cuda::leaky_relu_inplace(to_kernel_dtype(pre.scalar_type()), pre.data_ptr(),
                                             pre.numel(), slope,
                                             at::cuda::getCurrentCUDAStream()),
             "graph_propagate");
}

at::Tensor leaky_backward_cuda(const at::Tensor& grad_out, const at::Tensor& out, double slope) {
  const at::Tensor g = grad_out.contiguous(), o = out.contiguous();
  at::Tensor res = at::empty_like(o);
  check_cuda(capnet_cuda::leaky_relu_backward(to_kernel_dtype(o.scalar_type()), g.data_ptr(),
                                              o.data_ptr(), res.data_ptr(), o.numel(), slope,
                                              at::cuda::getCurrentCUDAStream()),
             "graph_propagate_backward");
  return res;
}

std::tuple<at::Tensor, at::Tensor> graph_propagate_cuda(const at::Tensor& adj,
                                                        const at::Tensor& x,
                                                        const at::Tensor& weight,
                                                        double negative_slope, bool activation) {
  const c10::cuda::CUDAGuard guard(x.device());
  return graph_propagate_impl(adj, x, weight, negative_slope, activation, leaky_forward_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> graph_propagate_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& adj, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& h, const at::Tensor& out, double negative_slope,
    bool activation, std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return graph_propagate_backward_impl(grad_out, adj, x, weight, h, out, negative_slope,
                                       activation, output_mask, leaky_backward_cuda);
}

at::Tensor quick_gelu_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "quick_gelu: CUDA kernel called with x on ", x.device());
  check_quick_gelu_inputs("quick_gelu", x, nullptr);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(xc.sizes(), xc.options());
  check_cuda(capnet_cuda::quick_gelu_forward(to_kernel_dtype(xc.scalar_type()), xc.data_ptr(),
                                             y.data_ptr(), xc.numel(),
                                             at::cuda::getCurrentCUDAStream()),
             "quick_gelu");
  return y;
}

at::Tensor quick_gelu_backward_cuda(const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "quick_gelu_backward: CUDA kernel called with x on ", x.device());
  check_quick_gelu_inputs("quick_gelu_backward", x, &grad);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), gc = grad.contiguous();
  at::Tensor dx = at::empty(xc.sizes(), xc.options());
  check_cuda(capnet_cuda::quick_gelu_backward(to_kernel_dtype(xc.scalar_type()), gc.data_ptr(),
                                              xc.data_ptr(), dx.data_ptr(), xc.numel(),
                                              at::cuda::getCurrentCUDAStream()),
             "quick_gelu_backward");
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(capnet, CUDA, m) {
  m.impl("db_focal_loss", &db_focal_loss_cuda);
  m.impl("graph_propagate", &graph_propagate_cuda);
  m.impl("graph_propagate_backward", &graph_propagate_backward_cuda);
  m.impl("quick_gelu", &quick_gelu_cuda);
  m.impl("quick_gelu_backward", &quick_gelu_backward_cuda);
}

}  // namespace capnet
