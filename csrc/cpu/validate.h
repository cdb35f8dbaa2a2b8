// Input validation of every s2hk operator, shared by its CPU kernel and its CUDA glue.
//
// Each op has one validate_* function that both of its entry points call before they allocate or launch
// anything, so the CPU test suite runs every check the CUDA kernels rely on. A validator reads tensor
// metadata and host memory only: reading the contents of a CUDA tensor would synchronise with the device on
// every call. The device data it cannot read (the gate ranks, and the device copy of the gate layout) is made
// harmless inside the kernels instead (csrc/cuda/gates.cu says how).
//
// Messages read "s2hk::<op>: <argument> ...", so that an error names both.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace s2hk {

// Python's names, which the messages use.
inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    default: return c10::toString(t);
  }
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name, const char* shape) {
  TORCH_CHECK(t.dim() == dim, "s2hk::", op, ": ", name, " must be ", shape, ", got shape ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, "s2hk::", op, ": ", name, " must be ", dtype_name(dtype), ", got ",
              dtype_name(t.scalar_type()));
}

inline void check_float32_or_64(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "s2hk::", op, ": ", name,
              " must be float32 or float64, got ", dtype_name(t.scalar_type()));
}

inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                         const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "s2hk::", op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
}

// ------------------------------------------------------------------------------------------------ gates

constexpr int64_t kGateLayoutColumns = 4;  // channel offset, logit offset, channels C_g, granularity d_g
// The CUDA kernels run one block per group, and a grid holds at most 2^31 - 1 blocks.
constexpr int64_t kMaxGateGroups = std::numeric_limits<int32_t>::max();

struct GateGroup {
  int64_t channel_offset, logit_offset, channels, granularity;

  int64_t choices() const { return channels / granularity; }
  double width(int64_t choice) const { return static_cast<double>(granularity * (choice + 1)); }
};

inline GateGroup gate_group(const int64_t* layout, int64_t g) {
  const int64_t* row = layout + g * kGateLayoutColumns;
  return {row[0], row[1], row[2], row[3]};
}

// The gate inputs, validated and contiguous.
struct GateInputs {
  at::Tensor logits, ranks, layout, host_layout;
  int64_t num_groups;
};

// `layout` is the group table the kernels read, on the logits' device; `host_layout` is its CPU copy, the one
// whose contents are checked here: the groups must tile the flat logits and ranks exactly, in order.
inline GateInputs validate_gates(const at::Tensor& logits_in, const at::Tensor& ranks_in, const at::Tensor& layout_in,
                                 const at::Tensor& host_layout_in, double tau, const char* op) {
  check_dim(logits_in, 1, op, "logits", "the flat (sum L_g,) buffer");
  check_float32_or_64(logits_in, op, "logits");
  check_dim(ranks_in, 1, op, "ranks", "the flat (sum C_g,) buffer");
  check_dtype(ranks_in, at::kLong, op, "ranks");
  check_device(ranks_in, logits_in, op, "ranks", "logits");
  for (const auto& [t, name] : {std::pair{&layout_in, "layout"}, std::pair{&host_layout_in, "host_layout"}}) {
    TORCH_CHECK(t->dim() == 2 && t->size(1) == kGateLayoutColumns, "s2hk::", op, ": ", name,
                " must be (G, 4) rows of [channel offset, logit offset, channels, granularity], got shape ",
                t->sizes());
    check_dtype(*t, at::kLong, op, name);
  }
  check_device(layout_in, logits_in, op, "layout", "logits");
  TORCH_CHECK(host_layout_in.device().is_cpu(), "s2hk::", op, ": host_layout must be the CPU copy of layout, got a ",
              "tensor on ", host_layout_in.device());
  TORCH_CHECK(host_layout_in.size(0) == layout_in.size(0), "s2hk::", op, ": host_layout has ",
              host_layout_in.size(0), " groups but layout has ", layout_in.size(0));
  TORCH_CHECK(tau > 0.0, "s2hk::", op, ": tau must be positive, got ", tau);
  const int64_t num_groups = layout_in.size(0);
  TORCH_CHECK(num_groups <= kMaxGateGroups, "s2hk::", op, ": layout has ", num_groups, " groups, more than the ",
              kMaxGateGroups, " one call takes");

  GateInputs in{logits_in.contiguous(), ranks_in.contiguous(), layout_in.contiguous(), host_layout_in.contiguous(),
                num_groups};
  const int64_t* rows = in.host_layout.const_data_ptr<int64_t>();
  const int64_t num_channels = in.ranks.numel(), num_logits = in.logits.numel();
  int64_t channel_offset = 0, logit_offset = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    const GateGroup grp = gate_group(rows, g);
    TORCH_CHECK(grp.channels >= 1 && grp.granularity >= 1 && grp.channels % grp.granularity == 0, "s2hk::", op,
                ": host_layout group ", g, ": granularity ", grp.granularity, " must be a positive divisor of its ",
                grp.channels, " channels");
    TORCH_CHECK(grp.channel_offset == channel_offset && grp.logit_offset == logit_offset, "s2hk::", op,
                ": host_layout group ", g, ": offsets (", grp.channel_offset, ", ", grp.logit_offset,
                ") do not follow the previous groups (", channel_offset, ", ", logit_offset, ")");
    // Compared before they are added, so that no sum overflows.
    TORCH_CHECK(grp.channels <= num_channels - channel_offset && grp.choices() <= num_logits - logit_offset,
                "s2hk::", op, ": host_layout group ", g, " (", grp.channels, " channels, ", grp.choices(),
                " choices) runs past the ", num_channels, " ranks or the ", num_logits, " logits");
    channel_offset += grp.channels;
    logit_offset += grp.choices();
  }
  TORCH_CHECK(channel_offset == num_channels && logit_offset == num_logits, "s2hk::", op, ": host_layout covers ",
              channel_offset, " channels and ", logit_offset, " logits, but ranks hold ", num_channels,
              " and logits ", num_logits);
  return in;
}

struct GateGradInputs {
  GateInputs gates;
  at::Tensor grad_keep_probs, grad_hard_widths, grad_expected;
};

inline GateGradInputs validate_gates_backward(const at::Tensor& grad_keep_probs, const at::Tensor& grad_hard_widths,
                                              const at::Tensor& grad_expected, const at::Tensor& logits,
                                              const at::Tensor& ranks, const at::Tensor& layout,
                                              const at::Tensor& host_layout, double tau) {
  constexpr const char* op = "gates_backward";
  GateInputs in = validate_gates(logits, ranks, layout, host_layout, tau, op);
  check_dim(grad_keep_probs, 1, op, "grad_keep_probs", "(sum C_g,), as keep_probs");
  TORCH_CHECK(grad_keep_probs.size(0) == ranks.size(0), "s2hk::", op, ": grad_keep_probs has ",
              grad_keep_probs.size(0), " elements but ranks ", ranks.size(0));
  check_dtype(grad_keep_probs, logits.scalar_type(), op, "grad_keep_probs");
  check_device(grad_keep_probs, logits, op, "grad_keep_probs", "logits");
  for (const auto& [t, name] : {std::pair{&grad_hard_widths, "grad_hard_widths"},
                                std::pair{&grad_expected, "grad_expected"}}) {
    check_dim(*t, 1, op, name, "(G,)");
    TORCH_CHECK(t->size(0) == in.num_groups, "s2hk::", op, ": ", name, " has ", t->size(0),
                " elements but layout has ", in.num_groups, " groups");
    check_dtype(*t, at::kDouble, op, name);
    check_device(*t, logits, op, name, "logits");
  }
  return {std::move(in), grad_keep_probs.contiguous(), grad_hard_widths.contiguous(), grad_expected.contiguous()};
}

// ----------------------------------------------------------------------------------------- decoupled KD

struct KdInputs {
  at::Tensor soft, hard;
};

inline KdInputs validate_decoupled_kd(const at::Tensor& soft, const at::Tensor& hard, double temperature,
                                      double alpha) {
  constexpr const char* op = "decoupled_kd";
  check_dim(soft, 2, op, "soft", "(N, K) logits");
  check_float32_or_64(soft, op, "soft");
  TORCH_CHECK(soft.size(0) >= 1 && soft.size(1) >= 1, "s2hk::", op, ": soft must hold N >= 1 rows of K >= 1 ",
              "classes, got shape ", soft.sizes());
  TORCH_CHECK(hard.sizes() == soft.sizes(), "s2hk::", op, ": hard must have the shape of soft ", soft.sizes(),
              ", got ", hard.sizes());
  check_dtype(hard, soft.scalar_type(), op, "hard");
  check_device(hard, soft, op, "hard", "soft");
  TORCH_CHECK(temperature > 0.0, "s2hk::", op, ": temperature must be positive, got ", temperature);
  TORCH_CHECK(std::isfinite(alpha), "s2hk::", op, ": alpha must be finite, got ", alpha);
  return {soft.contiguous(), hard.contiguous()};
}

// ------------------------------------------------------------------------------------- group importance

// Which layers feed which group, and where each group's channels sit in the flat outputs.
struct ImportancePlan {
  std::vector<at::Tensor> weights;                 // filters laid out as contiguous runs (a copy only if needed)
  std::vector<std::vector<int64_t>> group_layers;  // per group: indices into `weights`, in the caller's order
  std::vector<int64_t> channels, channel_offsets;  // per group
  int64_t total_channels = 0, max_channels = 0;
  at::ScalarType out_dtype = at::kFloat;
};

// Each output filter weight[c] is the run [c * F, (c + 1) * F) of the storage, F = numel / C_out: true for
// contiguous and channels_last weights alike (the order inside a filter does not change its L1 norm).
inline bool filters_are_runs(const at::Tensor& w) {
  return w.is_non_overlapping_and_dense() && (w.size(0) <= 1 || w.stride(0) * w.size(0) == w.numel());
}

inline ImportancePlan validate_group_importance(const at::TensorList weights, const at::IntArrayRef groups) {
  constexpr const char* op = "group_importance";
  TORCH_CHECK(!weights.empty(), "s2hk::", op, ": weights must hold at least one weight");
  TORCH_CHECK(weights.size() == groups.size(), "s2hk::", op, ": groups must hold one index per weight, got ",
              groups.size(), " for ", weights.size(), " weights");
  const int64_t num_layers = static_cast<int64_t>(weights.size());
  for (int64_t l = 0; l < num_layers; ++l) {
    // Every group has a layer, so no index reaches the number of layers: this bounds the tables below.
    TORCH_CHECK(groups[l] >= 0 && groups[l] < num_layers, "s2hk::", op, ": groups[", l, "] = ", groups[l],
                " is not a group index in 0..", num_layers - 1);
  }
  ImportancePlan plan;
  const int64_t num_groups = *std::max_element(groups.begin(), groups.end()) + 1;
  plan.group_layers.resize(num_groups);
  plan.channels.assign(num_groups, -1);
  for (int64_t l = 0; l < num_layers; ++l) {
    const at::Tensor& w = weights[l];
    const int64_t g = groups[l];
    TORCH_CHECK(w.dim() >= 1 && w.size(0) >= 1, "s2hk::", op, ": weights[", l,
                "] must be (C_out, ...) with C_out >= 1, got shape ", w.sizes());
    const at::ScalarType t = w.scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, "s2hk::", op,
                ": weights[", l, "] must be float32, float64, float16 or bfloat16, got ", dtype_name(t));
    TORCH_CHECK(w.device() == weights[0].device(), "s2hk::", op, ": weights[", l, "] is on ", w.device(),
                " but weights[0] is on ", weights[0].device());
    TORCH_CHECK(plan.channels[g] < 0 || plan.channels[g] == w.size(0), "s2hk::", op, ": weights[", l, "] has ",
                w.size(0), " output channels but the other layers of group ", g, " have ", plan.channels[g]);
    plan.channels[g] = w.size(0);
    plan.group_layers[g].push_back(l);
    plan.weights.push_back(filters_are_runs(w) ? w : w.contiguous());
    if (t == at::kDouble) plan.out_dtype = at::kDouble;
  }
  for (int64_t g = 0; g < num_groups; ++g) {
    TORCH_CHECK(!plan.group_layers[g].empty(), "s2hk::", op, ": groups has no layer of group ", g,
                " (the indices must cover 0..G-1)");
    plan.channel_offsets.push_back(plan.total_channels);
    plan.total_channels += plan.channels[g];
    plan.max_channels = std::max(plan.max_channels, plan.channels[g]);
  }
  return plan;
}

}  // namespace s2hk
