// S2HPruner's decoupled bidirectional distillation terms and their routed gradients in one pass over the logits
// (ALGORITHMS.md §1; reference: s2hk.ops.decoupled_kd_reference).
//
// With p = softmax(s/T), q = softmax(h/T), KL_n = sum_k p (log p - log q) and c = alpha / (N T):
//   G_h = G_s = alpha * mean_n KL_n                       (same value; they differ only in what they reach)
//   dG_h/dh = c (q - p)                                   (soft detached: the weight path of the hard network)
//   dG_s/ds = c p (log p - log q - KL_n)                  (hard detached: the mask-only path of the soft network)
// One warp per row: classifier rows are short (10..1000 logits), so a warp keeps every lane busy without block
// synchronisation. The arithmetic is csrc/cpu/decoupled_kd.cpp's, in double for float32 logits too: log p - log q
// is a small difference of terms as large as |s/T|, and in float32 its rounding error alone, scaled by c, is
// far above a float32 ulp of the gradient. Logits are read and converted on the fly, so double costs registers
// and FP64 throughput only, not memory traffic, in a kernel bound by memory. The batch mean is a second,
// single-block launch that sums the per-row KL in a fixed order, so the loss is deterministic.
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "launchers.h"
#include "warp_reduce.cuh"

namespace s2hk {
namespace {

constexpr int kRowsPerBlock = 4;
constexpr int kRowThreads = kRowsPerBlock * kWarpSize;
constexpr int kBatchSumThreads = 256;
// The rows kernel strides over the rows, so the grid never needs more blocks than this (any grid dimension
// takes it) to fill the GPU.
constexpr int64_t kMaxRowBlocks = 65535;

// log-sum-exp of x / T over one row, by one full warp: max first, then the sum of exp(x / T - max).
template <typename T>
__device__ double warp_log_sum_exp(const T* x, int64_t classes, double temperature, int lane) {
  double m = -INFINITY;
  for (int64_t k = lane; k < classes; k += kWarpSize) m = fmax(m, static_cast<double>(x[k]) / temperature);
  m = warp_max(m);
  double z = 0.0;
  for (int64_t k = lane; k < classes; k += kWarpSize) z += exp(static_cast<double>(x[k]) / temperature - m);
  return m + log(warp_sum(z));
}

template <typename T>
__global__ void
decoupled_kd_rows_kernel(const T* __restrict__ soft, const T* __restrict__ hard, int64_t rows, int64_t classes,
                         double temperature, double grad_scale, T* __restrict__ grad_hard, T* __restrict__ grad_soft,
                         double* __restrict__ row_kl) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  // Whole warps share a row, so they leave the loop together: no shuffle loses a partner.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize; row < rows;
       row += row_stride) {
    const T* s = soft + row * classes;
    const T* h = hard + row * classes;
    const double log_z_soft = warp_log_sum_exp(s, classes, temperature, lane);
    const double log_z_hard = warp_log_sum_exp(h, classes, temperature, lane);

    double kl = 0.0;
    for (int64_t k = lane; k < classes; k += kWarpSize) {
      const double log_p = static_cast<double>(s[k]) / temperature - log_z_soft;
      const double log_q = static_cast<double>(h[k]) / temperature - log_z_hard;
      kl += exp(log_p) * (log_p - log_q);
    }
    kl = warp_sum(kl);

    for (int64_t k = lane; k < classes; k += kWarpSize) {
      const double log_p = static_cast<double>(s[k]) / temperature - log_z_soft;
      const double log_q = static_cast<double>(h[k]) / temperature - log_z_hard;
      const double p = exp(log_p);
      grad_hard[row * classes + k] = static_cast<T>(grad_scale * (exp(log_q) - p));
      grad_soft[row * classes + k] = static_cast<T>(grad_scale * p * (log_p - log_q - kl));
    }
    if (lane == 0) row_kl[row] = kl;
  }
}

// losses[0] = losses[1] = alpha * (sum of the row KL) / N, summed in a fixed order (one block).
template <typename T>
__global__ void
decoupled_kd_batch_sum_kernel(const double* __restrict__ row_kl, int64_t rows, double alpha, T* __restrict__ losses) {
  __shared__ double warp_totals[kBatchSumThreads / kWarpSize];
  double total = 0.0;
  for (int64_t n = threadIdx.x; n < rows; n += kBatchSumThreads) total += row_kl[n];
  total = warp_sum(total);
  if (threadIdx.x % kWarpSize == 0) warp_totals[threadIdx.x / kWarpSize] = total;
  __syncthreads();
  if (threadIdx.x < kWarpSize) {
    total = threadIdx.x < kBatchSumThreads / kWarpSize ? warp_totals[threadIdx.x] : 0.0;
    total = warp_sum(total);
    if (threadIdx.x < 2) losses[threadIdx.x] = static_cast<T>(alpha * total / static_cast<double>(rows));
  }
}

template <typename T>
const char* launch_decoupled_kd(const void* soft, const void* hard, int64_t rows, int64_t classes,
                                double temperature, double alpha, void* losses, void* grad_hard, void* grad_soft,
                                double* row_kl, cudaStream_t stream) {
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  decoupled_kd_rows_kernel<T><<<static_cast<unsigned>(blocks < kMaxRowBlocks ? blocks : kMaxRowBlocks),
                                kRowThreads, 0, stream>>>(
      static_cast<const T*>(soft), static_cast<const T*>(hard), rows, classes, temperature,
      alpha / (static_cast<double>(rows) * temperature), static_cast<T*>(grad_hard), static_cast<T*>(grad_soft),
      row_kl);
  decoupled_kd_batch_sum_kernel<T><<<1, kBatchSumThreads, 0, stream>>>(row_kl, rows, alpha, static_cast<T*>(losses));
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace
}  // namespace s2hk

extern "C" const char* s2hk_decoupled_kd_cuda(int dtype, const void* soft, const void* hard, int64_t rows,
                                              int64_t classes, double temperature, double alpha, void* losses,
                                              void* grad_hard, void* grad_soft, double* row_kl, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == S2HK_FLOAT32) {
    return s2hk::launch_decoupled_kd<float>(soft, hard, rows, classes, temperature, alpha, losses, grad_hard,
                                            grad_soft, row_kl, s);
  }
  if (dtype == S2HK_FLOAT64) {
    return s2hk::launch_decoupled_kd<double>(soft, hard, rows, classes, temperature, alpha, losses, grad_hard,
                                             grad_soft, row_kl, s);
  }
  return "s2hk decoupled_kd: logits must be float32 or float64";
}
