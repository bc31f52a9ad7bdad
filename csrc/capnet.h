// capnet.h: what the CPU and CUDA torch glue share (input checks, the GEMM part of the
// propagation). Not seen by nvcc: capnet_kernels.cu stays torch-free.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>
#include <array>
#include <tuple>

namespace capnet {

// DB-focal loss: validates inputs and returns them converted to the kernel's layout
// (contiguous; targets in logits' dtype; class_freq and class_weight in the accumulation
// dtype, ones for a missing class_weight).
struct DbFocalInputs {
  at::Tensor logits, targets, class_freq, class_weight;
};
DbFocalInputs check_db_focal_inputs(const at::Tensor& logits, const at::Tensor& targets,
                                    const at::Tensor& class_freq,
                                    const c10::optional<at::Tensor>& class_weight,
                                    double num_images, double lam, double gamma,
                                    double gamma_neg, int64_t reduction);

// graph propagation: validates adj (C, C), x (C, Din), weight (Din, Dout), same device/dtype.
void check_graph_inputs(const at::Tensor& adj, const at::Tensor& x, const at::Tensor& weight,
                        double negative_slope);

// QuickGELU: x of a floating dtype (float16, bfloat16, float32, float64); for the backward
// (grad != nullptr) grad of x's shape, dtype and device. `op` names the op in the messages.
void check_quick_gelu_inputs(const char* op, const at::Tensor& x, const at::Tensor* grad);

// the epilogues are the device-specific part of the propagation
using LeakyForwardFn = void (*)(at::Tensor& pre, double slope);             // in place
using LeakyBackwardFn = at::Tensor (*)(const at::Tensor& grad_out, const at::Tensor& out,
                                       double slope);                       // -> grad_pre

std::tuple<at::Tensor, at::Tensor> graph_propagate_impl(const at::Tensor& adj,
                                                        const at::Tensor& x,
                                                        const at::Tensor& weight,
                                                        double negative_slope, bool activation,
                                                        LeakyForwardFn epilogue);

std::tuple<at::Tensor, at::Tensor, at::Tensor> graph_propagate_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& adj, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& h, const at::Tensor& out, double negative_slope,
    bool activation, std::array<bool, 3> output_mask, LeakyBackwardFn epilogue_backward);

}  // namespace capnet
