// S2HPruner's decoupled bidirectional distillation terms and their routed gradients in one pass over the logits
// (ALGORITHMS.md §1; reference: s2hk.ops.decoupled_kd_reference).
//
// With p = softmax(s/T), q = softmax(h/T), KL_n = sum_k p (log p - log q) and c = alpha / (N T):
//   G_h = G_s = alpha * mean_n KL_n                       (same value; they differ only in what they reach)
//   dG_h/dh = c (q - p)                                   (soft detached: the weight path of the hard network)
//   dG_s/ds = c p (log p - log q - KL_n)                  (hard detached: the mask-only path of the soft network)
// One warp per row: classifier rows are short (10..1000 logits), so a warp keeps every lane busy without block
// synchronisation. Rows make three passes (online log-sum-exp of both rows, KL, gradients); the batch mean is a
// second, single-block launch that sums the per-row terms in a fixed order, so the loss is deterministic.
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

// Running (max, sum of exp(x - max)) of a log-sum-exp; `sum == 0` marks an empty partial.
template <typename Acc>
struct LogSumExp {
  Acc max = -INFINITY, sum = 0;

  __device__ void add(Acc x) {
    if (x > max) {
      sum = sum * exp(max - x) + Acc(1);
      max = x;
    } else {
      sum += exp(x - max);
    }
  }
  __device__ void merge(Acc other_max, Acc other_sum) {
    const Acc m = fmax(max, other_max);
    sum = (sum == Acc(0) ? Acc(0) : sum * exp(max - m)) +
          (other_sum == Acc(0) ? Acc(0) : other_sum * exp(other_max - m));
    max = m;
  }
  __device__ Acc warp_value() {
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
      const Acc other_max = __shfl_xor_sync(kFullWarp, max, offset);
      const Acc other_sum = __shfl_xor_sync(kFullWarp, sum, offset);
      merge(other_max, other_sum);
    }
    return max + log(sum);
  }
};

template <typename T, typename Acc>
__global__ void
decoupled_kd_rows_kernel(const T* __restrict__ soft, const T* __restrict__ hard, int64_t rows, int64_t classes,
                         Acc temperature, Acc grad_scale, Acc loss_scale, T* __restrict__ grad_hard,
                         T* __restrict__ grad_soft, Acc* __restrict__ row_terms) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= rows) return;  // whole warps leave together: no shuffle loses a partner
  const T* s = soft + row * classes;
  const T* h = hard + row * classes;

  LogSumExp<Acc> soft_lse, hard_lse;
  for (int64_t k = lane; k < classes; k += kWarpSize) {
    soft_lse.add(static_cast<Acc>(s[k]) / temperature);
    hard_lse.add(static_cast<Acc>(h[k]) / temperature);
  }
  const Acc log_z_soft = soft_lse.warp_value();
  const Acc log_z_hard = hard_lse.warp_value();

  Acc kl = 0;
  for (int64_t k = lane; k < classes; k += kWarpSize) {
    const Acc log_p = static_cast<Acc>(s[k]) / temperature - log_z_soft;
    const Acc log_q = static_cast<Acc>(h[k]) / temperature - log_z_hard;
    kl += exp(log_p) * (log_p - log_q);
  }
  kl = warp_sum(kl);

  for (int64_t k = lane; k < classes; k += kWarpSize) {
    const Acc log_p = static_cast<Acc>(s[k]) / temperature - log_z_soft;
    const Acc log_q = static_cast<Acc>(h[k]) / temperature - log_z_hard;
    const Acc p = exp(log_p);
    grad_hard[row * classes + k] = static_cast<T>(grad_scale * (exp(log_q) - p));
    grad_soft[row * classes + k] = static_cast<T>(grad_scale * p * (log_p - log_q - kl));
  }
  if (lane == 0) row_terms[row] = loss_scale * kl;
}

// losses[0] = losses[1] = sum of the row terms, in a fixed order (one block).
template <typename T, typename Acc>
__global__ void
decoupled_kd_batch_sum_kernel(const Acc* __restrict__ row_terms, int64_t rows, T* __restrict__ losses) {
  __shared__ Acc warp_totals[kBatchSumThreads / kWarpSize];
  Acc total = 0;
  for (int64_t n = threadIdx.x; n < rows; n += kBatchSumThreads) total += row_terms[n];
  total = warp_sum(total);
  if (threadIdx.x % kWarpSize == 0) warp_totals[threadIdx.x / kWarpSize] = total;
  __syncthreads();
  if (threadIdx.x < kWarpSize) {
    total = threadIdx.x < kBatchSumThreads / kWarpSize ? warp_totals[threadIdx.x] : Acc(0);
    total = warp_sum(total);
    if (threadIdx.x < 2) losses[threadIdx.x] = static_cast<T>(total);
  }
}

template <typename T, typename Acc>
const char* launch_decoupled_kd(const void* soft, const void* hard, int64_t rows, int64_t classes,
                                double temperature, double alpha, void* losses, void* grad_hard, void* grad_soft,
                                void* row_scratch, cudaStream_t stream) {
  Acc* row_terms = static_cast<Acc*>(row_scratch);
  if (rows > 0) {
    const unsigned blocks = static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
    decoupled_kd_rows_kernel<T, Acc><<<blocks, kRowThreads, 0, stream>>>(
        static_cast<const T*>(soft), static_cast<const T*>(hard), rows, classes, static_cast<Acc>(temperature),
        static_cast<Acc>(alpha / (static_cast<double>(rows) * temperature)),
        static_cast<Acc>(alpha / static_cast<double>(rows)), static_cast<T*>(grad_hard), static_cast<T*>(grad_soft),
        row_terms);
  }
  decoupled_kd_batch_sum_kernel<T, Acc><<<1, kBatchSumThreads, 0, stream>>>(row_terms, rows, static_cast<T*>(losses));
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace
}  // namespace s2hk

extern "C" const char* s2hk_decoupled_kd_cuda(int dtype, const void* soft, const void* hard, int64_t rows,
                                              int64_t classes, double temperature, double alpha, void* losses,
                                              void* grad_hard, void* grad_soft, void* row_scratch, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == S2HK_FLOAT32) {
    return s2hk::launch_decoupled_kd<float, float>(soft, hard, rows, classes, temperature, alpha, losses, grad_hard,
                                                   grad_soft, row_scratch, s);
  }
  if (dtype == S2HK_FLOAT64) {
    return s2hk::launch_decoupled_kd<double, double>(soft, hard, rows, classes, temperature, alpha, losses,
                                                     grad_hard, grad_soft, row_scratch, s);
  }
  return "s2hk decoupled_kd: logits must be float32 or float64";
}
