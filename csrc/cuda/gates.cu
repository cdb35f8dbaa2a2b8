// S2HPruner gates of every channel group in one launch (ALGORITHMS.md §1; reference: s2hk.masks.compute_gates).
//
// One block per group. Warp 0 does the O(L) work on the width-choice logits (softmax, expected width, reverse
// cumulative sum), walking them in 32-wide tiles so any L works; then the whole block does the O(C) work on the
// channels (gather the keep-probability by rank, compare the rank with the hard width). Everything on the
// choices is computed in double, as the reference does for E, so ceil(E) lands on the same integer.
// The host reads neither the device layout nor the ranks; the kernels bound every access by the buffer sizes
// (launchers.h says what a bad row or bad ranks give).
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "launchers.h"
#include "warp_reduce.cuh"

// E within this many channels above an integer rounds to it (float64 noise must not add a step);
// the same slack as s2hk.masks.WIDTH_ROUNDING_SLACK.
__device__ constexpr double kWidthRoundingSlack = 1e-6;

namespace s2hk {
namespace {

constexpr int kGateThreads = 128;

struct GateGroup {
  int64_t channel_offset, logit_offset, channels, granularity;

  __device__ int64_t choices() const { return channels / granularity; }
  __device__ double width(int64_t choice) const { return static_cast<double>(granularity * (choice + 1)); }
};

__device__ __forceinline__ GateGroup load_gate_group(const int64_t* layout, int64_t group) {
  const int64_t* row = layout + group * S2HK_GATE_LAYOUT_COLUMNS;
  return {row[S2HK_GATE_CHANNEL_OFFSET], row[S2HK_GATE_LOGIT_OFFSET], row[S2HK_GATE_CHANNELS],
          row[S2HK_GATE_GRANULARITY]};
}

// max and normaliser of softmax(u / tau) over the group's L choices, computed by one full warp.
struct SoftmaxStats {
  double max, sum;
  __device__ double prob(double scaled_logit) const { return exp(scaled_logit - max) / sum; }
};

template <typename T>
__device__ SoftmaxStats warp_softmax_stats(const T* u, int64_t choices, double tau, int lane) {
  double m = -INFINITY;
  for (int64_t j = lane; j < choices; j += kWarpSize) m = fmax(m, static_cast<double>(u[j]) / tau);
  m = warp_max(m);
  double z = 0.0;
  for (int64_t j = lane; j < choices; j += kWarpSize) z += exp(static_cast<double>(u[j]) / tau - m);
  return {m, warp_sum(z)};
}

// Whether a row of the device layout describes a group inside the buffers. The host validated its CPU copy of
// the layout, not this table: one that differs from the copy must still not send a block outside the buffers.
__device__ __forceinline__ bool fits_buffers(const GateGroup& grp, int64_t num_channels, int64_t num_logits) {
  return grp.channels >= 1 && grp.granularity >= 1 && grp.channels % grp.granularity == 0 &&
         grp.channel_offset >= 0 && grp.channel_offset <= num_channels - grp.channels && grp.logit_offset >= 0 &&
         grp.logit_offset <= num_logits - grp.choices();
}

// The ranks are never checked on the host (reading them would synchronise with the device every call), so the
// kernels check them on the way: a rank outside [0, C) is never used as an index, and a group whose ranks are
// not a permutation of 0..C-1 gets NaN outputs and NaN gradients, so that the error shows in the loss instead
// of as plausible but wrong gates.
template <typename T>
__global__ void
gates_forward_kernel(const T* __restrict__ logits, const int64_t* __restrict__ ranks,
                     const int64_t* __restrict__ layout, int64_t num_channels, int64_t num_logits, double tau,
                     T* __restrict__ keep_probs, float* __restrict__ mask, double* __restrict__ hard_widths,
                     double* __restrict__ expected, double* __restrict__ channel_scratch,
                     double* __restrict__ choice_scratch) {
  const int64_t g = blockIdx.x;
  const GateGroup grp = load_gate_group(layout, g);
  if (!fits_buffers(grp, num_channels, num_logits)) {  // the same for the whole block: no barrier is split
    if (threadIdx.x == 0) hard_widths[g] = expected[g] = NAN;
    return;
  }
  const int64_t choices = grp.choices();
  const T* u = logits + grp.logit_offset;
  const int64_t* group_ranks = ranks + grp.channel_offset;
  double* block_keep = choice_scratch + grp.logit_offset;  // W_b, read back by every thread below
  // covered[r] != 0: some channel has rank r. C ranks in [0, C) cover all C slots only if none repeats, so this
  // checks the permutation without a sort.
  double* covered = channel_scratch + grp.channel_offset;
  __shared__ double hard_width, expected_width;

  for (int64_t c = threadIdx.x; c < grp.channels; c += blockDim.x) covered[c] = 0.0;
  __syncthreads();
  bool bad_ranks = false;
  for (int64_t c = threadIdx.x; c < grp.channels; c += blockDim.x) {
    const int64_t r = group_ranks[c];
    if (r >= 0 && r < grp.channels) {
      covered[r] = 1.0;
    } else {
      bad_ranks = true;
    }
  }

  if (threadIdx.x < kWarpSize) {
    const int lane = threadIdx.x;
    const SoftmaxStats sm = warp_softmax_stats(u, choices, tau, lane);
    // Walk the tiles from the widest choice down: W_b = sum_{j >= b} p_j is then an in-tile suffix scan plus
    // the carried total of the tiles already walked.
    double carry = 0.0, width_part = 0.0;
    for (int64_t base = (choices - 1) / kWarpSize * kWarpSize; base >= 0; base -= kWarpSize) {
      const int64_t j = base + lane;
      const double p = j < choices ? sm.prob(static_cast<double>(u[j]) / tau) : 0.0;
      width_part += p * grp.width(j);
      const double suffix = warp_inclusive_suffix_sum(p, lane);
      if (j < choices) block_keep[j] = carry + suffix;
      carry += __shfl_sync(kFullWarp, suffix, 0);
    }
    const double e = warp_sum(width_part);
    if (lane == 0) {
      const double d = static_cast<double>(grp.granularity);
      hard_width = fmin(static_cast<double>(grp.channels), d * ceil(ceil(e - kWidthRoundingSlack) / d));
      expected_width = e;
    }
  }
  __syncthreads();  // covered, block_keep (global) and the widths (shared) are complete and visible to the block

  for (int64_t c = threadIdx.x; c < grp.channels; c += blockDim.x) bad_ranks |= covered[c] == 0.0;
  const bool poisoned = __syncthreads_or(bad_ranks) != 0;
  const double k = poisoned ? NAN : hard_width;
  if (threadIdx.x == 0) {
    hard_widths[g] = k;
    expected[g] = poisoned ? NAN : expected_width;
  }
  for (int64_t c = threadIdx.x; c < grp.channels; c += blockDim.x) {
    if (poisoned) {
      keep_probs[grp.channel_offset + c] = static_cast<T>(NAN);
      mask[grp.channel_offset + c] = NAN;
    } else {
      const int64_t r = group_ranks[c];  // in [0, C): checked above
      keep_probs[grp.channel_offset + c] = static_cast<T>(block_keep[r / grp.granularity]);
      mask[grp.channel_offset + c] = static_cast<double>(r) < k ? 1.0f : 0.0f;
    }
  }
}

template <typename T>
__global__ void
gates_backward_kernel(const T* __restrict__ grad_keep_probs, const double* __restrict__ grad_hard_widths,
                      const double* __restrict__ grad_expected, const T* __restrict__ logits,
                      const int64_t* __restrict__ ranks, const int64_t* __restrict__ layout, int64_t num_channels,
                      int64_t num_logits, double tau, T* __restrict__ grad_logits,
                      double* __restrict__ channel_scratch, double* __restrict__ choice_scratch) {
  const int64_t g = blockIdx.x;
  const GateGroup grp = load_gate_group(layout, g);
  // Such a row says nothing of where the group's logits are, so they are left alone (the forward of the same
  // table gives the group NaN widths).
  if (!fits_buffers(grp, num_channels, num_logits)) return;
  const int64_t choices = grp.choices();

  // 1. Lay the incoming channel gradients out in rank order, so that the d channels sharing W_b are one run.
  // A slot that no rank in [0, C) fills stays NaN, which the scan and the softmax's dot product below carry into
  // every logit gradient of the group: ranks that are not a permutation give NaN gradients.
  double* by_rank = channel_scratch + grp.channel_offset;
  for (int64_t c = threadIdx.x; c < grp.channels; c += blockDim.x) by_rank[c] = NAN;
  __syncthreads();
  for (int64_t c = threadIdx.x; c < grp.channels; c += blockDim.x) {
    const int64_t r = ranks[grp.channel_offset + c];
    if (r >= 0 && r < grp.channels) by_rank[r] = static_cast<double>(grad_keep_probs[grp.channel_offset + c]);
  }
  __syncthreads();
  if (threadIdx.x >= kWarpSize) return;

  // 2. dL/dp_j = sum_{b <= j} dL/dW_b + dL/dE * n_j: an ascending prefix scan over the blocks of ranks.
  const int lane = threadIdx.x;
  const T* u = logits + grp.logit_offset;
  double* grad_probs = choice_scratch + grp.logit_offset;  // each lane reads back only what it wrote
  const SoftmaxStats sm = warp_softmax_stats(u, choices, tau, lane);
  const double grad_e = grad_hard_widths[g] + grad_expected[g];  // straight-through: dk/dE = 1
  double carry = 0.0, dot_part = 0.0;
  for (int64_t base = 0; base < choices; base += kWarpSize) {
    const int64_t j = base + lane;
    double grad_block = 0.0;
    if (j < choices) {
      for (int64_t i = 0; i < grp.granularity; ++i) grad_block += by_rank[j * grp.granularity + i];
    }
    const double prefix = warp_inclusive_prefix_sum(grad_block, lane);
    if (j < choices) {
      const double gp = carry + prefix + grad_e * grp.width(j);
      grad_probs[j] = gp;
      dot_part += sm.prob(static_cast<double>(u[j]) / tau) * gp;
    }
    carry += __shfl_sync(kFullWarp, prefix, kWarpSize - 1);
  }
  const double dot = warp_sum(dot_part);

  // 3. Softmax backward: du_j = p_j (dL/dp_j - sum_i p_i dL/dp_i) / tau.
  for (int64_t j = lane; j < choices; j += kWarpSize) {
    const double p = sm.prob(static_cast<double>(u[j]) / tau);
    grad_logits[grp.logit_offset + j] = static_cast<T>(p * (grad_probs[j] - dot) / tau);
  }
}

const char* launch_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace
}  // namespace s2hk

extern "C" const char* s2hk_gates_forward_cuda(int dtype, const void* logits, const int64_t* ranks,
                                               const int64_t* layout, int64_t num_groups, int64_t num_channels,
                                               int64_t num_logits, double tau, void* keep_probs, float* mask,
                                               double* hard_widths, double* expected, double* channel_scratch,
                                               double* choice_scratch, void* stream) {
  using namespace s2hk;
  if (num_groups == 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(num_groups));
  if (dtype == S2HK_FLOAT32) {
    gates_forward_kernel<float><<<grid, kGateThreads, 0, s>>>(
        static_cast<const float*>(logits), ranks, layout, num_channels, num_logits, tau,
        static_cast<float*>(keep_probs), mask, hard_widths, expected, channel_scratch, choice_scratch);
  } else if (dtype == S2HK_FLOAT64) {
    gates_forward_kernel<double><<<grid, kGateThreads, 0, s>>>(
        static_cast<const double*>(logits), ranks, layout, num_channels, num_logits, tau,
        static_cast<double*>(keep_probs), mask, hard_widths, expected, channel_scratch, choice_scratch);
  } else {
    return "s2hk gates: logits must be float32 or float64";
  }
  return launch_status();
}

extern "C" const char* s2hk_gates_backward_cuda(int dtype, const void* grad_keep_probs,
                                                const double* grad_hard_widths, const double* grad_expected,
                                                const void* logits, const int64_t* ranks, const int64_t* layout,
                                                int64_t num_groups, int64_t num_channels, int64_t num_logits,
                                                double tau, void* grad_logits, double* channel_scratch,
                                                double* choice_scratch, void* stream) {
  using namespace s2hk;
  if (num_groups == 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(num_groups));
  if (dtype == S2HK_FLOAT32) {
    gates_backward_kernel<float><<<grid, kGateThreads, 0, s>>>(
        static_cast<const float*>(grad_keep_probs), grad_hard_widths, grad_expected,
        static_cast<const float*>(logits), ranks, layout, num_channels, num_logits, tau,
        static_cast<float*>(grad_logits), channel_scratch, choice_scratch);
  } else if (dtype == S2HK_FLOAT64) {
    gates_backward_kernel<double><<<grid, kGateThreads, 0, s>>>(
        static_cast<const double*>(grad_keep_probs), grad_hard_widths, grad_expected,
        static_cast<const double*>(logits), ranks, layout, num_channels, num_logits, tau,
        static_cast<double*>(grad_logits), channel_scratch, choice_scratch);
  } else {
    return "s2hk gates_backward: logits must be float32 or float64";
  }
  return launch_status();
}
