// capnet_kernels.h: torch-free declarations of the CUDA kernels' launchers.
//
// Everything here takes raw device pointers, sizes and a cudaStream_t, so capnet_kernels.cu
// compiles with plain `nvcc -c` (no torch headers; the CPU torch wheel ships none for CUDA).
// The torch glue in capnet_cuda.cpp validates tensors, allocates outputs and calls these.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace capnet_cuda {

// Element types the launchers accept; half types are computed in float32.
enum class Dtype : int { f16 = 0, bf16 = 1, f32 = 2, f64 = 3 };

// DB-focal loss forward (see capnet.py db_focal_loss_reference, method step (7)), one block per row.
// logits, targets: (B, C) row-major of `dtype`; class_freq, class_weight: (C,) of the accumulation
// type (double for f64, else float); class_weight may be null (all ones).
// Writes loss_rows (B,) partial sums in the accumulation type when reduction != 0, else loss (B, C);
// writes grad (B, C) = d loss / d logits (scaled by 1/(B*C) for mean) when grad != null.
// reduction: 0 none, 1 mean, 2 sum. For 1/2, `loss` is one element written by a second,
// single-block pass that sums loss_rows in a fixed order (deterministic, no atomics).
cudaError_t db_focal_loss_forward(Dtype dtype, const void* logits, const void* targets,
                                  const void* class_freq, const void* class_weight,
                                  int64_t B, int64_t C, double num_images, double alpha,
                                  double beta, double mu, double kappa, double lam, double gamma,
                                  double gamma_neg, double balance, int reduction, void* loss, void* loss_rows,
                                  void* grad, cudaStream_t stream);

// In-place LeakyReLU epilogue on the propagation output: y = y > 0 ? y : slope * y.
cudaError_t leaky_relu_inplace(Dtype dtype, void* data, int64_t n, double slope,
                               cudaStream_t stream);

// Backward of the epilogue from the saved output (valid for slope >= 0, where
// out > 0 exactly when the pre-activation > 0): grad_pre = out > 0 ? g : slope * g.
cudaError_t leaky_relu_backward(Dtype dtype, const void* grad_out, const void* out,
                                void* grad_pre, int64_t n, double slope, cudaStream_t stream);

// QuickGELU (see capnet.py quick_gelu_reference, formula in capnet_math.h), elementwise over n
// contiguous elements of `dtype`: y = x sigmoid(1.702 x), and its backward from the incoming
// gradient and the input, grad_x = grad dy/dx. Half types are computed in float32.
cudaError_t quick_gelu_forward(Dtype dtype, const void* x, void* y, int64_t n,
                               cudaStream_t stream);
cudaError_t quick_gelu_backward(Dtype dtype, const void* grad, const void* x, void* grad_x,
                                int64_t n, cudaStream_t stream);

}  // namespace capnet_cuda
