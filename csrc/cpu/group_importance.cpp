// s2hk::group_importance: channel importance, importance order and ranks of every channel group in one call
// (ALGORITHMS.md §1; reference: s2hk.ops.group_importance_reference). CPU kernel, and the glue to
// csrc/cuda/group_importance.cu.
//
// Layer l (weight (C_out, ...)) produces the channels of group groups[l]. For each channel c of group g:
//   importance[c] = mean over g's layers of ||weight_l[c]||_1   (accumulated in double)
// then the importance-descending order of each group and the rank of each channel, ties to the lower index and
// NaN first (torch.sort(descending=True, stable=True)); order and ranks hold per-group local channel indices.
// The ranks are taken from the importance values as returned, so they are consistent with them.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "common.h"

namespace s2hk {
namespace {

template <typename T>
double filter_l1(const void* data, int64_t begin, int64_t count) {
  const T* x = static_cast<const T*>(data) + begin;
  double sum = 0.0;
  for (int64_t i = 0; i < count; ++i) sum += std::abs(static_cast<double>(x[i]));
  return sum;
}

using FilterL1 = double (*)(const void*, int64_t, int64_t);

FilterL1 filter_l1_for(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return &filter_l1<double>;
    case at::kHalf: return &filter_l1<c10::Half>;
    case at::kBFloat16: return &filter_l1<c10::BFloat16>;
    default: return &filter_l1<float>;
  }
}

// Larger first, NaN largest; std::stable_sort keeps equal scores in index order.
template <typename Out>
bool sorts_before(Out a, Out b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && !std::isnan(b);
  return a > b;
}

template <typename Out>
void group_importance_cpu_kernel(const ImportancePlan& plan, Out* importance, int64_t* order, int64_t* ranks) {
  const int64_t num_groups = static_cast<int64_t>(plan.channels.size());
  std::vector<int64_t> group_of_channel(plan.total_channels);
  for (int64_t g = 0; g < num_groups; ++g) {
    std::fill_n(group_of_channel.begin() + plan.channel_offsets[g], plan.channels[g], g);
  }
  std::vector<const void*> data;
  std::vector<int64_t> filter_numel;
  std::vector<FilterL1> l1;
  for (const at::Tensor& w : plan.weights) {
    data.push_back(w.const_data_ptr());
    filter_numel.push_back(w.numel() / w.size(0));
    l1.push_back(filter_l1_for(w.scalar_type()));
  }

  at::parallel_for(0, plan.total_channels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      const int64_t g = group_of_channel[ch];
      const int64_t local = ch - plan.channel_offsets[g];
      double norm_sum = 0.0;
      for (const int64_t l : plan.group_layers[g]) norm_sum += l1[l](data[l], local * filter_numel[l], filter_numel[l]);
      importance[ch] = static_cast<Out>(norm_sum / static_cast<double>(plan.group_layers[g].size()));
    }
  });

  at::parallel_for(0, num_groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t offset = plan.channel_offsets[g], channels = plan.channels[g];
      const Out* score = importance + offset;
      int64_t* group_order = order + offset;
      std::iota(group_order, group_order + channels, int64_t{0});
      std::stable_sort(group_order, group_order + channels,
                       [score](int64_t a, int64_t b) { return sorts_before(score[a], score[b]); });
      for (int64_t r = 0; r < channels; ++r) ranks[offset + group_order[r]] = r;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_importance_outputs(const ImportancePlan& plan,
                                                                           const at::TensorOptions& options) {
  return {at::empty({plan.total_channels}, options.dtype(plan.out_dtype)),
          at::empty({plan.total_channels}, options.dtype(at::kLong)),
          at::empty({plan.total_channels}, options.dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_importance_cpu(const at::TensorList weights,
                                                                    const at::IntArrayRef groups) {
  const ImportancePlan plan = validate_group_importance(weights, groups);
  auto [importance, order, ranks] = allocate_importance_outputs(plan, weights[0].options());
  if (plan.out_dtype == at::kDouble) {
    group_importance_cpu_kernel<double>(plan, importance.mutable_data_ptr<double>(), order.mutable_data_ptr<int64_t>(),
                                        ranks.mutable_data_ptr<int64_t>());
  } else {
    group_importance_cpu_kernel<float>(plan, importance.mutable_data_ptr<float>(), order.mutable_data_ptr<int64_t>(),
                                       ranks.mutable_data_ptr<int64_t>());
  }
  return {importance, order, ranks};
}

#ifdef S2HK_WITH_CUDA
// The kernels read the weights through a table of device addresses: built here, sent in one asynchronous copy
// from pinned memory (the caching host allocator keeps the buffer alive until the copy has run).
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_importance_cuda(const at::TensorList weights,
                                                                     const at::IntArrayRef groups) {
  const ImportancePlan plan = validate_group_importance(weights, groups);
  const c10::cuda::CUDAGuard guard(weights[0].device());
  const int64_t num_groups = static_cast<int64_t>(plan.channels.size());
  const int64_t num_layers = static_cast<int64_t>(plan.weights.size());
  at::Tensor host_table = at::empty({(num_layers + num_groups) * S2HK_IMPORTANCE_COLUMNS},
                                    at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* layer_rows = host_table.mutable_data_ptr<int64_t>();
  int64_t* group_rows = layer_rows + num_layers * S2HK_IMPORTANCE_COLUMNS;
  int64_t row = 0;  // layers sorted by group, so each group's layers are one run of rows
  for (int64_t g = 0; g < num_groups; ++g) {
    int64_t* grp = group_rows + g * S2HK_IMPORTANCE_COLUMNS;
    grp[S2HK_GROUP_CHANNEL_OFFSET] = plan.channel_offsets[g];
    grp[S2HK_GROUP_CHANNELS] = plan.channels[g];
    grp[S2HK_GROUP_FIRST_LAYER] = row;
    grp[S2HK_GROUP_NUM_LAYERS] = static_cast<int64_t>(plan.group_layers[g].size());
    for (const int64_t l : plan.group_layers[g]) {
      const at::Tensor& w = plan.weights[l];
      int64_t* layer = layer_rows + (row++) * S2HK_IMPORTANCE_COLUMNS;
      layer[S2HK_LAYER_DATA] = reinterpret_cast<int64_t>(w.const_data_ptr());
      layer[S2HK_LAYER_FILTER_NUMEL] = w.numel() / w.size(0);
      layer[S2HK_LAYER_DTYPE] = launcher_dtype(w.scalar_type());
      layer[S2HK_IMPORTANCE_COLUMNS - 1] = 0;
    }
  }
  const at::Tensor table = host_table.to(weights[0].options().dtype(at::kLong), /*non_blocking=*/true);
  auto [importance, order, ranks] = allocate_importance_outputs(plan, weights[0].options());
  const int64_t* device_layers = table.const_data_ptr<int64_t>();
  check_launch(s2hk_group_importance_cuda(launcher_dtype(plan.out_dtype), device_layers,
                                          device_layers + num_layers * S2HK_IMPORTANCE_COLUMNS, num_groups,
                                          plan.total_channels, plan.max_channels, importance.mutable_data_ptr(),
                                          order.mutable_data_ptr<int64_t>(), ranks.mutable_data_ptr<int64_t>(),
                                          current_cuda_stream()),
               "group_importance");
  return {importance, order, ranks};
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(s2hk, CPU, m) { m.impl("group_importance", &group_importance_cpu); }

#ifdef S2HK_WITH_CUDA
TORCH_LIBRARY_IMPL(s2hk, CUDA, m) { m.impl("group_importance", &group_importance_cuda); }
#endif

}  // namespace s2hk
