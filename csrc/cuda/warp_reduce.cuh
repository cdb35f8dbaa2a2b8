// Warp-wide reductions and scans shared by the s2hk CUDA kernels (CUDA headers only, no torch).
#pragma once

#include <cuda_runtime.h>

namespace s2hk {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullWarp, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = fmax(v, __shfl_xor_sync(kFullWarp, v, offset));
  return v;
}

// Lane i gets v_0 + ... + v_i.
template <typename T>
__device__ __forceinline__ T warp_inclusive_prefix_sum(T v, int lane) {
  for (int offset = 1; offset < kWarpSize; offset <<= 1) {
    const T other = __shfl_up_sync(kFullWarp, v, offset);
    if (lane >= offset) v += other;
  }
  return v;
}

// Lane i gets v_i + ... + v_31.
template <typename T>
__device__ __forceinline__ T warp_inclusive_suffix_sum(T v, int lane) {
  for (int offset = 1; offset < kWarpSize; offset <<= 1) {
    const T other = __shfl_down_sync(kFullWarp, v, offset);
    if (lane + offset < kWarpSize) v += other;
  }
  return v;
}

}  // namespace s2hk
