// Shared pieces of the torch glue of s2hk._C: the input checks (validate.h), and the bridge to the plain-C CUDA
// launchers.
//
// Only light ATen headers are included (no torch/extension.h, no pybind11): each translation unit then compiles
// in seconds, which keeps the whole extension build well inside CI's budget on two cores.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "validate.h"

#ifdef S2HK_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../cuda/launchers.h"
#endif

#ifdef S2HK_WITH_CUDA
namespace s2hk {

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

}  // namespace s2hk
#endif
