// Shared pieces of the torch glue of s2hk._C: input checks, and the bridge to the plain-C CUDA launchers.
//
// Only light ATen headers are included (no torch/extension.h, no pybind11): each translation unit then compiles
// in seconds, which keeps the whole extension build well inside CI's budget on two cores.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#ifdef S2HK_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../cuda/launchers.h"
#endif

namespace s2hk {

inline bool is_float32_or_64(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* a_name,
                              const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), "s2hk::", op, ": ", a_name, " is on ", a.device(), " but ", b_name,
              " is on ", b.device());
}

#ifdef S2HK_WITH_CUDA
inline int launcher_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return S2HK_FLOAT32;
    case at::kDouble: return S2HK_FLOAT64;
    case at::kHalf: return S2HK_FLOAT16;
    case at::kBFloat16: return S2HK_BFLOAT16;
    default: TORCH_CHECK(false, "s2hk: no CUDA kernel for dtype ", t);
  }
}

inline void* current_cuda_stream() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

inline void check_launch(const char* error, const char* op) {
  TORCH_CHECK(error == nullptr, "s2hk::", op, ": CUDA kernel launch failed: ", error);
}
#endif

}  // namespace s2hk
