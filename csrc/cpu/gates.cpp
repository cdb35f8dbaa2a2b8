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
#include <vector>

#include "common.h"

// E within this many channels above an integer rounds to it (float64 noise must not add a step);
// the same slack as s2hk.masks.WIDTH_ROUNDING_SLACK.
static constexpr double kWidthRoundingSlack = 1e-6;

namespace s2hk {
namespace {

constexpr int64_t kLayoutColumns = 4;  // channel offset, logit offset, channels, granularity

struct GateGroup {
  int64_t channel_offset, logit_offset, channels, granularity;

  int64_t choices() const { return channels / granularity; }
  double width(int64_t choice) const { return static_cast<double>(granularity * (choice + 1)); }
};

GateGroup gate_group(const int64_t* layout, int64_t g) {
  const int64_t* row = layout + g * kLayoutColumns;
  return {row[0], row[1], row[2], row[3]};
}

void check_gate_tensors(const at::Tensor& logits, const at::Tensor& ranks, const at::Tensor& layout,
                        const char* op) {
  TORCH_CHECK(logits.dim() == 1, "s2hk::", op, ": logits must be the flat (sum L_g,) buffer, got shape ",
              logits.sizes());
  TORCH_CHECK(is_float32_or_64(logits), "s2hk::", op, ": logits must be float32 or float64, got ",
              logits.scalar_type());
  TORCH_CHECK(ranks.dim() == 1 && ranks.scalar_type() == at::kLong, "s2hk::", op,
              ": ranks must be the flat int64 (sum C_g,) buffer, got ", ranks.scalar_type(), " ", ranks.sizes());
  TORCH_CHECK(layout.dim() == 2 && layout.size(1) == kLayoutColumns && layout.scalar_type() == at::kLong, "s2hk::",
              op, ": layout must be int64 (G, 4) rows of [channel offset, logit offset, channels, granularity]");
  check_same_device(logits, ranks, op, "logits", "ranks");
  check_same_device(logits, layout, op, "logits", "layout");
}

// A CPU layout is read for free: check that it tiles the flat buffers and that each group's ranks are a
// permutation of 0..C-1 (the CUDA kernels assume both; their callers build the layout from a GateLayout).
void check_gate_layout_cpu(const int64_t* layout, int64_t num_groups, int64_t num_logits, const int64_t* ranks,
                           int64_t num_channels, const char* op) {
  int64_t channel_offset = 0, logit_offset = 0;
  std::vector<char> seen;
  for (int64_t g = 0; g < num_groups; ++g) {
    const GateGroup grp = gate_group(layout, g);
    TORCH_CHECK(grp.channels >= 1 && grp.granularity >= 1 && grp.channels % grp.granularity == 0, "s2hk::", op,
                ": group ", g, ": granularity ", grp.granularity, " must be a positive divisor of its ",
                grp.channels, " channels");
    TORCH_CHECK(grp.channel_offset == channel_offset && grp.logit_offset == logit_offset, "s2hk::", op,
                ": group ", g, ": offsets (", grp.channel_offset, ", ", grp.logit_offset,
                ") do not follow the previous groups (", channel_offset, ", ", logit_offset, ")");
    channel_offset += grp.channels;
    logit_offset += grp.choices();
    if (ranks == nullptr || channel_offset > num_channels) continue;
    seen.assign(grp.channels, 0);
    for (int64_t c = 0; c < grp.channels; ++c) {
      const int64_t r = ranks[grp.channel_offset + c];
      TORCH_CHECK(r >= 0 && r < grp.channels && !seen[r], "s2hk::", op, ": group ", g,
                  ": ranks must be a permutation of 0..", grp.channels - 1, " (channel ", c, " has rank ", r, ")");
      seen[r] = 1;
    }
  }
  TORCH_CHECK(channel_offset == num_channels && logit_offset == num_logits, "s2hk::", op, ": the layout covers ",
              channel_offset, " channels and ", logit_offset, " logits, the buffers hold ", num_channels, " and ",
              num_logits);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> allocate_gate_outputs(const at::Tensor& logits,
                                                                                 const at::Tensor& ranks,
                                                                                 int64_t num_groups) {
  const auto f64 = logits.options().dtype(at::kDouble);
  return {at::empty({ranks.numel()}, logits.options()), at::empty({num_groups}, f64), at::empty({num_groups}, f64),
          at::empty({ranks.numel()}, logits.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gates_cpu(const at::Tensor& logits_in,
                                                                     const at::Tensor& ranks_in,
                                                                     const at::Tensor& layout_in, double tau) {
  check_gate_tensors(logits_in, ranks_in, layout_in, "gates");
  const at::Tensor logits = logits_in.contiguous(), ranks = ranks_in.contiguous(), layout = layout_in.contiguous();
  const int64_t num_groups = layout.size(0);
  check_gate_layout_cpu(layout.const_data_ptr<int64_t>(), num_groups, logits.numel(), ranks.const_data_ptr<int64_t>(),
                        ranks.numel(), "gates");
  auto [keep_probs, hard_widths, expected, mask] = allocate_gate_outputs(logits, ranks, num_groups);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "s2hk::gates", [&] {
    gates_forward_cpu_kernel<scalar_t>(logits.const_data_ptr<scalar_t>(), ranks.const_data_ptr<int64_t>(),
                                       layout.const_data_ptr<int64_t>(), num_groups, tau,
                                       keep_probs.mutable_data_ptr<scalar_t>(), mask.mutable_data_ptr<float>(),
                                       hard_widths.mutable_data_ptr<double>(), expected.mutable_data_ptr<double>());
  });
  return {keep_probs, hard_widths, expected, mask};
}

void check_gate_grads(const at::Tensor& grad_keep_probs, const at::Tensor& grad_hard_widths,
                      const at::Tensor& grad_expected, const at::Tensor& logits, const at::Tensor& ranks,
                      const at::Tensor& layout) {
  check_gate_tensors(logits, ranks, layout, "gates_backward");
  TORCH_CHECK(grad_keep_probs.sizes() == ranks.sizes() && grad_keep_probs.scalar_type() == logits.scalar_type(),
              "s2hk::gates_backward: grad_keep_probs must match keep_probs: (sum C_g,) of the logits' dtype");
  for (const at::Tensor* grad : {&grad_hard_widths, &grad_expected}) {
    TORCH_CHECK(grad->dim() == 1 && grad->size(0) == layout.size(0) && grad->scalar_type() == at::kDouble,
                "s2hk::gates_backward: the width gradients must be float64 (G,)");
    check_same_device(logits, *grad, "gates_backward", "logits", "a width gradient");
  }
  check_same_device(logits, grad_keep_probs, "gates_backward", "logits", "grad_keep_probs");
}

at::Tensor gates_backward_cpu(const at::Tensor& grad_keep_probs_in, const at::Tensor& grad_hard_widths_in,
                              const at::Tensor& grad_expected_in, const at::Tensor& logits_in,
                              const at::Tensor& ranks_in, const at::Tensor& layout_in, double tau) {
  check_gate_grads(grad_keep_probs_in, grad_hard_widths_in, grad_expected_in, logits_in, ranks_in, layout_in);
  const at::Tensor grad_keep_probs = grad_keep_probs_in.contiguous(),
                   grad_hard_widths = grad_hard_widths_in.contiguous(), grad_expected = grad_expected_in.contiguous(),
                   logits = logits_in.contiguous(), ranks = ranks_in.contiguous(), layout = layout_in.contiguous();
  const int64_t num_groups = layout.size(0);
  check_gate_layout_cpu(layout.const_data_ptr<int64_t>(), num_groups, logits.numel(), ranks.const_data_ptr<int64_t>(),
                        ranks.numel(), "gates_backward");
  at::Tensor grad_logits = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "s2hk::gates_backward", [&] {
    gates_backward_cpu_kernel<scalar_t>(
        grad_keep_probs.const_data_ptr<scalar_t>(), grad_hard_widths.const_data_ptr<double>(),
        grad_expected.const_data_ptr<double>(), logits.const_data_ptr<scalar_t>(), ranks.const_data_ptr<int64_t>(),
        layout.const_data_ptr<int64_t>(), num_groups, tau, grad_logits.mutable_data_ptr<scalar_t>());
  });
  return grad_logits;
}

#ifdef S2HK_WITH_CUDA
// The CUDA kernels trust the layout's contents (reading them here would synchronise with the device).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gates_cuda(const at::Tensor& logits_in,
                                                                      const at::Tensor& ranks_in,
                                                                      const at::Tensor& layout_in, double tau) {
  check_gate_tensors(logits_in, ranks_in, layout_in, "gates");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous(), ranks = ranks_in.contiguous(), layout = layout_in.contiguous();
  const int64_t num_groups = layout.size(0);
  auto [keep_probs, hard_widths, expected, mask] = allocate_gate_outputs(logits, ranks, num_groups);
  at::Tensor choice_scratch = at::empty({logits.numel()}, logits.options().dtype(at::kDouble));
  check_launch(s2hk_gates_forward_cuda(launcher_dtype(logits.scalar_type()), logits.const_data_ptr(),
                                       ranks.const_data_ptr<int64_t>(), layout.const_data_ptr<int64_t>(), num_groups,
                                       tau, keep_probs.mutable_data_ptr(), mask.mutable_data_ptr<float>(),
                                       hard_widths.mutable_data_ptr<double>(), expected.mutable_data_ptr<double>(),
                                       choice_scratch.mutable_data_ptr<double>(), current_cuda_stream()),
               "gates");
  return {keep_probs, hard_widths, expected, mask};
}

at::Tensor gates_backward_cuda(const at::Tensor& grad_keep_probs_in, const at::Tensor& grad_hard_widths_in,
                               const at::Tensor& grad_expected_in, const at::Tensor& logits_in,
                               const at::Tensor& ranks_in, const at::Tensor& layout_in, double tau) {
  check_gate_grads(grad_keep_probs_in, grad_hard_widths_in, grad_expected_in, logits_in, ranks_in, layout_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor grad_keep_probs = grad_keep_probs_in.contiguous(),
                   grad_hard_widths = grad_hard_widths_in.contiguous(), grad_expected = grad_expected_in.contiguous(),
                   logits = logits_in.contiguous(), ranks = ranks_in.contiguous(), layout = layout_in.contiguous();
  at::Tensor grad_logits = at::empty_like(logits);
  at::Tensor channel_scratch = at::empty({ranks.numel()}, logits.options().dtype(at::kDouble));
  at::Tensor choice_scratch = at::empty({logits.numel()}, logits.options().dtype(at::kDouble));
  check_launch(s2hk_gates_backward_cuda(launcher_dtype(logits.scalar_type()), grad_keep_probs.const_data_ptr(),
                                        grad_hard_widths.const_data_ptr<double>(),
                                        grad_expected.const_data_ptr<double>(), logits.const_data_ptr(),
                                        ranks.const_data_ptr<int64_t>(), layout.const_data_ptr<int64_t>(),
                                        layout.size(0), tau, grad_logits.mutable_data_ptr(),
                                        channel_scratch.mutable_data_ptr<double>(),
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
