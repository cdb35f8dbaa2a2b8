// Channel importance of every channel group (ALGORITHMS.md §1; reference: s2hk.ops.group_importance_reference).
//
// importance[c] = mean over the group's producing layers of ||weight_l[c]||_1, accumulated in double; then the
// importance-descending order and ranks of each group, ties to the lower channel index (NaN first, as
// torch.sort(descending=True, stable=True) does).
// Two launches, each over all groups: the norms are a bandwidth-bound pass over every weight (one warp per
// channel, the whole GPU busy); the ranks need the group's complete importance vector, a grid-wide dependency.
// Ranks count, for each channel, the channels that sort before it: O(C^2) compares per group, but from shared
// memory tiles and all channels in parallel, which beats a sort for the C <= a few thousand of conv layers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "launchers.h"
#include "warp_reduce.cuh"

namespace s2hk {
namespace {

constexpr int kNormWarpsPerBlock = 8;
constexpr int kNormThreads = kNormWarpsPerBlock * kWarpSize;
constexpr int kRankThreads = 256;
// Both kernels stride over their work, so no grid dimension needs more blocks than this (y takes no more).
constexpr int64_t kMaxGridBlocks = 65535;

inline unsigned grid_blocks(int64_t items, int64_t per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < kMaxGridBlocks ? blocks : kMaxGridBlocks);
}

__device__ __forceinline__ double load_abs(const void* data, int64_t dtype, int64_t i) {
  switch (dtype) {
    case S2HK_FLOAT64: return fabs(static_cast<const double*>(data)[i]);
    case S2HK_FLOAT16: return fabs(static_cast<double>(__half2float(static_cast<const __half*>(data)[i])));
    case S2HK_BFLOAT16:
      return fabs(static_cast<double>(__bfloat162float(static_cast<const __nv_bfloat16*>(data)[i])));
    default: return fabs(static_cast<double>(static_cast<const float*>(data)[i]));
  }
}

// The group owning flat channel `channel`: the last group whose channel offset is <= channel.
__device__ __forceinline__ int64_t find_group(const int64_t* groups, int64_t num_groups, int64_t channel) {
  int64_t lo = 0, hi = num_groups - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (groups[mid * S2HK_IMPORTANCE_COLUMNS + S2HK_GROUP_CHANNEL_OFFSET] <= channel) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename Out>
__global__ void
mean_filter_l1_kernel(const int64_t* __restrict__ layers, const int64_t* __restrict__ groups, int64_t num_groups,
                      int64_t total_channels, Out* __restrict__ importance) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t channel_stride = static_cast<int64_t>(gridDim.x) * kNormWarpsPerBlock;
  // One warp per channel; whole warps leave the loop together, so no shuffle loses a partner.
  for (int64_t channel = static_cast<int64_t>(blockIdx.x) * kNormWarpsPerBlock + threadIdx.x / kWarpSize;
       channel < total_channels; channel += channel_stride) {
    const int64_t* grp = groups + find_group(groups, num_groups, channel) * S2HK_IMPORTANCE_COLUMNS;
    const int64_t local = channel - grp[S2HK_GROUP_CHANNEL_OFFSET];
    const int64_t first_layer = grp[S2HK_GROUP_FIRST_LAYER], num_layers = grp[S2HK_GROUP_NUM_LAYERS];

    double norm_sum = 0.0;  // sum over layers of each filter's L1 norm; the lanes stride over every filter
    for (int64_t l = first_layer; l < first_layer + num_layers; ++l) {
      const int64_t* layer = layers + l * S2HK_IMPORTANCE_COLUMNS;
      const void* data = reinterpret_cast<const void*>(layer[S2HK_LAYER_DATA]);
      const int64_t filter_numel = layer[S2HK_LAYER_FILTER_NUMEL], dtype = layer[S2HK_LAYER_DTYPE];
      for (int64_t i = lane; i < filter_numel; i += kWarpSize) {
        norm_sum += load_abs(data, dtype, local * filter_numel + i);
      }
    }
    norm_sum = warp_sum(norm_sum);
    if (lane == 0) importance[channel] = static_cast<Out>(norm_sum / static_cast<double>(num_layers));
  }
}

// Whether score a (channel i) sorts before score b (channel j): larger first, NaN largest, ties by index.
template <typename Out>
__device__ __forceinline__ bool sorts_before(Out a, int64_t i, Out b, int64_t j) {
  const bool a_nan = isnan(a), b_nan = isnan(b);
  if (a_nan || b_nan) return a_nan && (!b_nan || i < j);
  return a > b || (a == b && i < j);
}

// grid (channel tiles, groups), striding over both: each thread ranks one channel against its group's tiles
// staged in shared memory. The loop bounds are the same for the whole block, so no barrier is skipped by part of
// it. The comparisons are a strict total order (ties by index), so each rank is in [0, channels) and each slot
// of order is written once.
template <typename Out>
__global__ void
importance_ranks_kernel(const int64_t* __restrict__ groups, int64_t num_groups, const Out* __restrict__ importance,
                        int64_t* __restrict__ order, int64_t* __restrict__ ranks) {
  __shared__ Out tile[kRankThreads];
  const int64_t tile_stride = static_cast<int64_t>(gridDim.x) * kRankThreads;
  for (int64_t g = blockIdx.y; g < num_groups; g += gridDim.y) {
    const int64_t* grp = groups + g * S2HK_IMPORTANCE_COLUMNS;
    const int64_t offset = grp[S2HK_GROUP_CHANNEL_OFFSET], channels = grp[S2HK_GROUP_CHANNELS];
    for (int64_t tile_start = static_cast<int64_t>(blockIdx.x) * kRankThreads; tile_start < channels;
         tile_start += tile_stride) {
      const int64_t c = tile_start + threadIdx.x;
      const Out mine = c < channels ? importance[offset + c] : Out(0);
      int64_t rank = 0;
      for (int64_t base = 0; base < channels; base += kRankThreads) {
        __syncthreads();  // the tile before, of this pass or an earlier one, is no longer read
        if (base + threadIdx.x < channels) tile[threadIdx.x] = importance[offset + base + threadIdx.x];
        __syncthreads();
        const int64_t n = min(static_cast<int64_t>(kRankThreads), channels - base);
        if (c < channels) {
          for (int64_t i = 0; i < n; ++i) rank += sorts_before(tile[i], base + i, mine, c);
        }
      }
      if (c < channels) {
        ranks[offset + c] = rank;
        order[offset + rank] = c;
      }
    }
  }
}

template <typename Out>
const char* launch_group_importance(const int64_t* layers, const int64_t* groups, int64_t num_groups,
                                    int64_t total_channels, int64_t max_channels, void* importance, int64_t* order,
                                    int64_t* ranks, cudaStream_t stream) {
  Out* imp = static_cast<Out*>(importance);
  mean_filter_l1_kernel<Out><<<grid_blocks(total_channels, kNormWarpsPerBlock), kNormThreads, 0, stream>>>(
      layers, groups, num_groups, total_channels, imp);
  const dim3 rank_grid(grid_blocks(max_channels, kRankThreads), grid_blocks(num_groups, 1));
  importance_ranks_kernel<Out><<<rank_grid, kRankThreads, 0, stream>>>(groups, num_groups, imp, order, ranks);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace
}  // namespace s2hk

extern "C" const char* s2hk_group_importance_cuda(int out_dtype, const int64_t* layers, const int64_t* groups,
                                                  int64_t num_groups, int64_t total_channels, int64_t max_channels,
                                                  void* importance, int64_t* order, int64_t* ranks, void* stream) {
  if (num_groups == 0 || total_channels == 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (out_dtype == S2HK_FLOAT32) {
    return s2hk::launch_group_importance<float>(layers, groups, num_groups, total_channels, max_channels, importance,
                                                order, ranks, s);
  }
  if (out_dtype == S2HK_FLOAT64) {
    return s2hk::launch_group_importance<double>(layers, groups, num_groups, total_channels, max_channels,
                                                 importance, order, ranks, s);
  }
  return "s2hk group_importance: the importance must be float32 or float64";
}
