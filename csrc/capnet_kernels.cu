// capnet_kernels.cu: CUDA kernels of CAPNet's fused ops, torch-free (raw pointers, sizes, a
// cudaStream_t) so that plain `nvcc -c csrc/capnet_kernels.cu` compiles it on any machine with
// the CUDA toolkit; capnet_cuda.cpp is the torch glue (checks, allocation, current stream).
//
// db_focal_loss (specification: capnet.py `db_focal_loss_reference`, formula in capnet_math.h):
//   one block per row: a tree reduction gives the row's sum_k y_bk / n_k, then every thread
//   computes the loss and d loss / d logits of its elements, and a second tree reduction the
//   row's loss sum; a one-block pass adds the row sums in a fixed order. No atomics, so the
//   result is bitwise reproducible.
// graph_propagate (specification: `graph_propagate_reference`): the GEMMs run in cuBLAS from
//   the glue; here are the fused LeakyReLU epilogue and its backward.
// quick_gelu (specification: `quick_gelu_reference`, formula in capnet_math.h): one grid-stride
//   pass, forward y = x sigmoid(1.702 x), backward grad_x = grad dy/dx from x alone.
// Half types are loaded and stored as fp16/bf16 and computed in float32.
#include "capnet_kernels.h"
#include "capnet_math.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace capnet_cuda {
namespace {

constexpr int kMaxThreads = 256;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <typename T> __device__ __forceinline__ T from_acc(double v) { return static_cast<T>(v); }

// sum of v over the block's threads, in a fixed tree order (blockDim.x a power of two)
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  const acc_t total = shared[0];
  __syncthreads();  // shared is reused by the caller's next reduction
  return total;
}

template <typename T>
__global__ void db_focal_rows_kernel(const T* __restrict__ logits, const T* __restrict__ targets,
                                     const typename AccOf<T>::type* __restrict__ class_freq,
                                     const typename AccOf<T>::type* __restrict__ class_weight,
                                     int64_t C, typename AccOf<T>::type num_images,
                                     typename AccOf<T>::type alpha, typename AccOf<T>::type beta,
                                     typename AccOf<T>::type mu, typename AccOf<T>::type kappa,
                                     typename AccOf<T>::type lam, typename AccOf<T>::type gamma,
                                     typename AccOf<T>::type gamma_neg,
                                     typename AccOf<T>::type balance,
                                     typename AccOf<T>::type grad_scale, T* __restrict__ loss,
                                     typename AccOf<T>::type* __restrict__ loss_rows,
                                     T* __restrict__ grad) {
  using acc_t = typename AccOf<T>::type;
  __shared__ acc_t shared[kMaxThreads];
  const int64_t b = blockIdx.x;
  const T* zr = logits + b * C;
  const T* yr = targets + b * C;
  acc_t part = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
    part += to_acc(yr[c]) / class_freq[c];
  const acc_t row_sum = block_sum(part, shared);   // sum_k y_bk / n_k
  acc_t row_loss = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const acc_t n = class_freq[c];
    const acc_t bias = -kappa / lam * log(num_images / n - acc_t(1));
    const acc_t cw = class_weight ? class_weight[c] : acc_t(1);
    acc_t lv, gv;
    capnet_math::db_focal_element<acc_t>(to_acc(zr[c]), to_acc(yr[c]) != acc_t(0), acc_t(1) / n,
                                         bias, cw, row_sum, alpha, beta, mu, lam, gamma, gamma_neg,
                                         balance, grad_scale, &lv, grad ? &gv : nullptr);
    if (grad) grad[b * C + c] = from_acc<T>(gv);
    if (loss_rows) row_loss += lv; else loss[b * C + c] = from_acc<T>(lv);
  }
  if (loss_rows) {
    const acc_t total = block_sum(row_loss, shared);
    if (threadIdx.x == 0) loss_rows[b] = total;
  }
}

template <typename T>
__global__ void sum_rows_kernel(const typename AccOf<T>::type* __restrict__ loss_rows, int64_t B,
                                typename AccOf<T>::type scale, T* __restrict__ loss) {
  using acc_t = typename AccOf<T>::type;
  __shared__ acc_t shared[kMaxThreads];
  acc_t part = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) part += loss_rows[b];
  const acc_t total = block_sum(part, shared);
  if (threadIdx.x == 0) loss[0] = from_acc<T>(total * scale);
}

int threads_for(int64_t n) {
  int t = 32;
  while (t < kMaxThreads && t < n) t *= 2;
  return t;
}

template <typename T>
cudaError_t db_focal_typed(const void* logits, const void* targets, const void* class_freq,
                           const void* class_weight, int64_t B, int64_t C, double num_images,
                           double alpha, double beta, double mu, double kappa, double lam,
                           double gamma, double gamma_neg, double balance, int reduction,
                           void* loss,
                           void* loss_rows, void* grad, cudaStream_t stream) {
  using acc_t = typename AccOf<T>::type;
  if (B == 0 || C == 0) return cudaSuccess;  // the glue fills the empty reductions
  const acc_t grad_scale = reduction == 1 ? acc_t(1) / acc_t(B * C) : acc_t(1);
  acc_t* rows = reduction == 0 ? nullptr : static_cast<acc_t*>(loss_rows);
  db_focal_rows_kernel<T><<<static_cast<unsigned>(B), threads_for(C), 0, stream>>>(
      static_cast<const T*>(logits), static_cast<const T*>(targets),
      static_cast<const acc_t*>(class_freq), static_cast<const acc_t*>(class_weight), C,
      acc_t(num_images), acc_t(alpha), acc_t(beta), acc_t(mu), acc_t(kappa), acc_t(lam),
      acc_t(gamma), acc_t(gamma_neg), acc_t(balance), grad_scale, static_cast<T*>(loss), rows,
      static_cast<T*>(grad));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || reduction == 0) return err;
  const acc_t scale = reduction == 1 ? acc_t(1) / acc_t(B * C) : acc_t(1);
  sum_rows_kernel<T><<<1, kMaxThreads, 0, stream>>>(rows, B, scale, static_cast<T*>(loss));
  return cudaGetLastError();
}

template <typename T>
__global__ void leaky_inplace_kernel(T* data, int64_t n, float slope_f, double slope_d) {
  using acc_t = typename AccOf<T>::type;
  const acc_t slope = sizeof(acc_t) == 8 ? acc_t(slope_d) : acc_t(slope_f);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const acc_t v = to_acc(data[i]);
    data[i] = from_acc<T>(v > acc_t(0) ? v : v * slope);
  }
}

template <typename T>
__global__ void leaky_backward_kernel(const T* grad_out, const T* out, T* grad_pre, int64_t n,
                                      float slope_f, double slope_d) {
  using acc_t = typename AccOf<T>::type;
  const acc_t slope = sizeof(acc_t) == 8 ? acc_t(slope_d) : acc_t(slope_f);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const acc_t g = to_acc(grad_out[i]);
    grad_pre[i] = from_acc<T>(to_acc(out[i]) > acc_t(0) ? g : g * slope);
  }
}

unsigned blocks_for(int64_t n) {
  const int64_t b = (n + kMaxThreads - 1) / kMaxThreads;
  return static_cast<unsigned>(b < 4096 ? (b > 0 ? b : 1) : 4096);  // grid-stride beyond
}

// grad == nullptr: out = quick_gelu(x); else out = grad * d quick_gelu / dx
template <typename T>
__global__ void quick_gelu_kernel(const T* __restrict__ x, const T* __restrict__ grad,
                                  T* __restrict__ out, int64_t n) {
  using acc_t = typename AccOf<T>::type;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const acc_t v = to_acc(x[i]);
    out[i] = from_acc<T>(grad ? capnet_math::quick_gelu_backward<acc_t>(to_acc(grad[i]), v)
                              : capnet_math::quick_gelu_forward<acc_t>(v));
  }
}

cudaError_t quick_gelu_launch(Dtype dtype, const void* x, const void* grad, void* out,
                              int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
#define CAPNET_QG_CALL(T)                                                                     \
  quick_gelu_kernel<T><<<blocks_for(n), kMaxThreads, 0, stream>>>(                            \
      static_cast<const T*>(x), static_cast<const T*>(grad), static_cast<T*>(out), n)
  switch (dtype) {
    case Dtype::f16: CAPNET_QG_CALL(__half); break;
    case Dtype::bf16: CAPNET_QG_CALL(__nv_bfloat16); break;
    case Dtype::f32: CAPNET_QG_CALL(float); break;
    case Dtype::f64: CAPNET_QG_CALL(double); break;
    default: return cudaErrorInvalidValue;
  }
#undef CAPNET_QG_CALL
  return cudaGetLastError();
}

}  // namespace

cudaError_t db_focal_loss_forward(Dtype dtype, const void* logits, const void* targets,
                                  const void* class_freq, const void* class_weight, int64_t B,
                                  int64_t C, double num_images, double alpha, double beta,
                                  double mu, double kappa, double lam, double gamma,
                                  double gamma_neg, double balance, int reduction, void* loss,
                                  void* loss_rows, void* grad, cudaStream_t stream) {
#define CAPNET_DB_CALL(T)                                                                      \
  db_focal_typed<T>(logits, targets, class_freq, class_weight, B, C, num_images, alpha, beta, \
                    mu, kappa, lam, gamma, gamma_neg, balance, reduction, loss, loss_rows, grad, stream)
  switch (dtype) {
    case Dtype::f16: return CAPNET_DB_CALL(__half);
    case Dtype::bf16: return CAPNET_DB_CALL(__nv_bfloat16);
    case Dtype::f32: return CAPNET_DB_CALL(float);
    case Dtype::f64: return CAPNET_DB_CALL(double);
  }
#undef CAPNET_DB_CALL
  return cudaErrorInvalidValue;
}

cudaError_t leaky_relu_inplace(Dtype dtype, void* data, int64_t n, double slope,
                               cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const float sf = static_cast<float>(slope);
  switch (dtype) {
    case Dtype::f16: leaky_inplace_kernel<__half><<<blocks_for(n), kMaxThreads, 0, stream>>>(static_cast<__half*>(data), n, sf, slope); break;
    case Dtype::bf16: leaky_inplace_kernel<__nv_bfloat16><<<blocks_for(n), kMaxThreads, 0, stream>>>(static_cast<__nv_bfloat16*>(data), n, sf, slope); break;
    case Dtype::f32: leaky_inplace_kernel<float><<<blocks_for(n), kMaxThreads, 0, stream>>>(static_cast<float*>(data), n, sf, slope); break;
    case Dtype::f64: leaky_inplace_kernel<double><<<blocks_for(n), kMaxThreads, 0, stream>>>(static_cast<double*>(data), n, sf, slope); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t leaky_relu_backward(Dtype dtype, const void* grad_out, const void* out,
                                void* grad_pre, int64_t n, double slope, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const float sf = static_cast<float>(slope);
#define CAPNET_LB_CALL(T)                                                                      \
  leaky_backward_kernel<T><<<blocks_for(n), kMaxThreads, 0, stream>>>(                        \
      static_cast<const T*>(grad_out), static_cast<const T*>(out), static_cast<T*>(grad_pre), \
      n, sf, slope)
  switch (dtype) {
    case Dtype::f16: CAPNET_LB_CALL(__half); break;
    case Dtype::bf16: CAPNET_LB_CALL(__nv_bfloat16); break;
    case Dtype::f32: CAPNET_LB_CALL(float); break;
    case Dtype::f64: CAPNET_LB_CALL(double); break;
    default: return cudaErrorInvalidValue;
  }
#undef CAPNET_LB_CALL
  return cudaGetLastError();
}

cudaError_t quick_gelu_forward(Dtype dtype, const void* x, void* y, int64_t n,
                               cudaStream_t stream) {
  return quick_gelu_launch(dtype, x, nullptr, y, n, stream);
}

cudaError_t quick_gelu_backward(Dtype dtype, const void* grad, const void* x, void* grad_x,
                                int64_t n, cudaStream_t stream) {
  return quick_gelu_launch(dtype, x, grad, grad_x, n, stream);
}

}  // namespace capnet_cuda
