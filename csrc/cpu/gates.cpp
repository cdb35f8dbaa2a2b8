// s2hk::gates and s2hk::gates_backward: the S2HPruner mask math of every channel group in one call
// (ALGORITHMS.md §1; reference: s2hk.masks.compute_gates). CPU kernels, and the glue to csrc/cuda/gates.cu.
//
// Per group g (C channels, granularity d, L = C / d choices, logits u):
//   p = softmax(u / tau), W_b = sum_{j >= b} p_j, keep[c] = W_{rank[c] / d},
//   E = sum_j p_j (j + 1) d, k = min(C, d ceil(ceil(E) / d)), mask[c] = rank[c] < k.
// The choice-side math runs in double, as the reference does for E, so that ceil(E) agrees with it.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "common.h"

// E within this many channels above an integer rounds to it (float64 noise must not add a step);
// the same slack as s2hk.masks.WIDTH_ROUNDING_SLACK.
static constexpr double kWidthRoundingSlack = 1e-6;

namespace s2hk {
namespace {

// The CPU reads its tables for free, so it also checks what validate_gates leaves to the CUDA kernels: that the
// layout it computes with is the validated host_layout, and that each group's ranks are a permutation of 0..C-1.
void check_gate_tables_cpu(const GateInputs& in, const char* op) {
  const int64_t* layout = in.layout.const_data_ptr<int64_t>();
  const int64_t* host_layout = in.host_layout.const_data_ptr<int64_t>();
  TORCH_CHECK(std::equal(layout, layout + in.num_groups * kGateLayoutColumns, host_layout), "s2hk::", op,
              ": layout differs from its copy host_layout");
  const int64_t* ranks = in.ranks.const_data_ptr<int64_t>();
  std::vector<char> seen;
  for (int64_t g = 0; g < in.num_groups; ++g) {
    const GateGroup grp = gate_group(host_layout, g);
    seen.assign(grp.channels, 0);
    for (int64_t c = 0; c < grp.channels; ++c) {
      const int64_t r = ranks[grp.channel_offset + c];
      TORCH_CHECK(r >= 0 && r < grp.channels && !seen[r], "s2hk::", op, ": ranks of group ", g,
                  " must be a permutation of 0..", grp.channels - 1, " (channel ", c, " has rank ", r, ")");
      seen[r] = 1;
    }
  }
}

// p = softmax(u / tau) in double.
template <typename T>
void softmax_probs(const T* u, int64_t choices, double tau, std::vector<double>& probs) {
  probs.resize(choices);
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < choices; ++j) m = std::max(m, static_cast<double>(u[j]) / tau);
  double z = 0.0;
  for (int64_t j = 0; j < choices; ++j) z += (probs[j] = std::exp(static_cast<double>(u[j]) / tau - m));
  for (int64_t j = 0; j < choices; ++j) probs[j] /= z;
}

// Groups are small (L <= a few dozen, C <= a few thousand): hand a thread several at a time.
constexpr int64_t kGroupsPerTask = 8;

template <typename T>
void gates_forward_cpu_kernel(const T* logits, const int64_t* ranks, const int64_t* layout, int64_t num_groups,
                              double tau, T* keep_probs, float* mask, double* hard_widths, double* expected) {
  at::parallel_for(0, num_groups, kGroupsPerTask, [&](int64_t begin, int64_t end) {
    std::vector<double> probs, block_keep;
    for (int64_t g = begin; g < end; ++g) {
      const GateGroup grp = gate_group(layout, g);
      const int64_t choices = grp.choices();
      softmax_probs(logits + grp.logit_offset, choices, tau, probs);
      block_keep.resize(choices);
      double suffix = 0.0, e = 0.0;
      for (int64_t j = choices - 1; j >= 0; --j) block_keep[j] = (suffix += probs[j]);
      for (int64_t j = 0; j < choices; ++j) e += probs[j] * grp.width(j);
      const double d = static_cast<double>(grp.granularity);
      const double k = std::min(static_cast<double>(grp.channels), d * std::ceil(std::ceil(e - kWidthRoundingSlack) / d));
      hard_widths[g] = k;
      expected[g] = e;
      for (int64_t c = grp.channel_offset; c < grp.channel_offset + grp.channels; ++c) {
        keep_probs[c] = static_cast<T>(block_keep[ranks[c] / grp.granularity]);
        mask[c] = static_cast<double>(ranks[c]) < k ? 1.0f : 0.0f;
      }
    }
  });
}

template <typename T>
void gates_backward_cpu_kernel(const T* grad_keep_probs, const double* grad_hard_widths, const double* grad_expected,
                               const T* logits, const int64_t* ranks, const int64_t* layout, int64_t num_groups,
                               double tau, T* grad_logits) {
  at::parallel_for(0, num_groups, kGroupsPerTask, [&](int64_t begin, int64_t end) {
    std::vector<double> probs, grad_probs;
    for (int64_t g = begin; g < end; ++g) {
      const GateGroup grp = gate_group(layout, g);
      const int64_t choices = grp.choices();
      softmax_probs(logits + grp.logit_offset, choices, tau, probs);
      // dL/dW_b: the channels whose rank falls in block b share W_b.
      grad_probs.assign(choices, 0.0);
      for (int64_t c = grp.channel_offset; c < grp.channel_offset + grp.channels; ++c) {
        grad_probs[ranks[c] / grp.granularity] += static_cast<double>(grad_keep_probs[c]);
      }
      // dL/dp_j = sum_{b <= j} dL/dW_b + dL/dE n_j, with dL/dE from both k (straight-through) and E.
      const double grad_e = grad_hard_widths[g] + grad_expected[g];
      double prefix = 0.0, dot = 0.0;
      for (int64_t j = 0; j < choices; ++j) {
        prefix += grad_probs[j];
        grad_probs[j] = prefix + grad_e * grp.width(j);
        dot += probs[j] * grad_probs[j];
      }
      for (int64_t j = 0; j < choices; ++j) {
        grad_logits[grp.logit_offset + j] = static_cast<T>(probs[j] * (grad_probs[j] - dot) / tau);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> allocate_gate_outputs(const GateInputs& in) {
  const auto f64 = in.logits.options().dtype(at::kDouble);
  return {at::empty({in.ranks.numel()}, in.logits.options()), at::empty({in.num_groups}, f64),
          at::empty({in.num_groups}, f64), at::empty({in.ranks.numel()}, in.logits.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gates_cpu(const at::Tensor& logits, const at::Tensor& ranks,
                                                                     const at::Tensor& layout,
                                                                     const at::Tensor& host_layout, double tau) {
  const GateInputs in = validate_gates(logits, ranks, layout, host_layout, tau, "gates");
  check_gate_tables_cpu(in, "gates");
  at::Tensor keep_probs, hard_widths, expected, mask;  // not structured bindings: C++17 lambdas cannot capture those
  std::tie(keep_probs, hard_widths, expected, mask) = allocate_gate_outputs(in);
  AT_DISPATCH_FLOATING_TYPES(in.logits.scalar_type(), "s2hk::gates", [&] {
    gates_forward_cpu_kernel<scalar_t>(in.logits.const_data_ptr<scalar_t>(), in.ranks.const_data_ptr<int64_t>(),
                                       in.layout.const_data_ptr<int64_t>(), in.num_groups, tau,
                                       keep_probs.mutable_data_ptr<scalar_t>(), mask.mutable_data_ptr<float>(),
                                       hard_widths.mutable_data_ptr<double>(), expected.mutable_data_ptr<double>());
  });
  return {keep_probs, hard_widths, expected, mask};
}

at::Tensor gates_backward_cpu(const at::Tensor& grad_keep_probs, const at::Tensor& grad_hard_widths,
                              const at::Tensor& grad_expected, const at::Tensor& logits, const at::Tensor& ranks,
                              const at::Tensor& layout, const at::Tensor& host_layout, double tau) {
  const GateGradInputs in =
      validate_gates_backward(grad_keep_probs, grad_hard_widths, grad_expected, logits, ranks, layout, host_layout, tau);
  const GateInputs& g = in.gates;
  check_gate_tables_cpu(g, "gates_backward");
  at::Tensor grad_logits = at::empty_like(g.logits);
  AT_DISPATCH_FLOATING_TYPES(g.logits.scalar_type(), "s2hk::gates_backward", [&] {
    gates_backward_cpu_kernel<scalar_t>(
        in.grad_keep_probs.const_data_ptr<scalar_t>(), in.grad_hard_widths.const_data_ptr<double>(),
        in.grad_expected.const_data_ptr<double>(), g.logits.const_data_ptr<scalar_t>(),
        g.ranks.const_data_ptr<int64_t>(), g.layout.const_data_ptr<int64_t>(), g.num_groups, tau,
        grad_logits.mutable_data_ptr<scalar_t>());
  });
  return grad_logits;
}

#ifdef S2HK_WITH_CUDA
// Nothing on the device is read here (that would synchronise with it): the kernels take the validated sizes of
// the buffers and stay inside them whatever the device layout and the ranks hold (csrc/cuda/gates.cu).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gates_cuda(const at::Tensor& logits,
                                                                      const at::Tensor& ranks,
                                                                      const at::Tensor& layout,
                                                                      const at::Tensor& host_layout, double tau) {
  const GateInputs in = validate_gates(logits, ranks, layout, host_layout, tau, "gates");
  const c10::cuda::CUDAGuard guard(in.logits.device());
  auto [keep_probs, hard_widths, expected, mask] = allocate_gate_outputs(in);
  const auto f64 = in.logits.options().dtype(at::kDouble);
  at::Tensor channel_scratch = at::empty({in.ranks.numel()}, f64);
  at::Tensor choice_scratch = at::empty({in.logits.numel()}, f64);
  check_launch(s2hk_gates_forward_cuda(launcher_dtype(in.logits.scalar_type()), in.logits.const_data_ptr(),
                                       in.ranks.const_data_ptr<int64_t>(), in.layout.const_data_ptr<int64_t>(),
                                       in.num_groups, in.ranks.numel(), in.logits.numel(), tau,
                                       keep_probs.mutable_data_ptr(), mask.mutable_data_ptr<float>(),
                                       hard_widths.mutable_data_ptr<double>(), expected.mutable_data_ptr<double>(),
                                       channel_scratch.mutable_data_ptr<double>(),
                                       choice_scratch.mutable_data_ptr<double>(), current_cuda_stream()),
               "gates");
  return {keep_probs, hard_widths, expected, mask};
}

at::Tensor gates_backward_cuda(const at::Tensor& grad_keep_probs, const at::Tensor& grad_hard_widths,
                               const at::Tensor& grad_expected, const at::Tensor& logits, const at::Tensor& ranks,
                               const at::Tensor& layout, const at::Tensor& host_layout, double tau) {
  const GateGradInputs in =
      validate_gates_backward(grad_keep_probs, grad_hard_widths, grad_expected, logits, ranks, layout, host_layout, tau);
  const GateInputs& g = in.gates;
  const c10::cuda::CUDAGuard guard(g.logits.device());
  at::Tensor grad_logits = at::empty_like(g.logits);
  const auto f64 = g.logits.options().dtype(at::kDouble);
  at::Tensor channel_scratch = at::empty({g.ranks.numel()}, f64);
  at::Tensor choice_scratch = at::empty({g.logits.numel()}, f64);
  check_launch(s2hk_gates_backward_cuda(launcher_dtype(g.logits.scalar_type()), in.grad_keep_probs.const_data_ptr(),
                                        in.grad_hard_widths.const_data_ptr<double>(),
                                        in.grad_expected.const_data_ptr<double>(), g.logits.const_data_ptr(),
                                        g.ranks.const_data_ptr<int64_t>(), g.layout.const_data_ptr<int64_t>(),
                                        g.num_groups, g.ranks.numel(), g.logits.numel(), tau,
                                        grad_logits.mutable_data_ptr(), channel_scratch.mutable_data_ptr<double>(),
                                        choice_scratch.mutable_data_ptr<double>(), current_cuda_stream()),
               "gates_backward");
  return grad_logits;
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(s2hk, CPU, m) {
  m.impl("gates", &gates_cpu);
  m.impl("gates_backward", &gates_backward_cpu);
}

#ifdef S2HK_WITH_CUDA
TORCH_LIBRARY_IMPL(s2hk, CUDA, m) {
  m.impl("gates", &gates_cuda);
  m.impl("gates_backward", &gates_backward_cuda);
}
#endif

}  // namespace s2hk
