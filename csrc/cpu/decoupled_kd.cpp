// s2hk::decoupled_kd: S2HPruner's decoupled bidirectional distillation terms and their routed gradients in one
// pass over the (N, K) soft and hard logits (ALGORITHMS.md §1; reference: s2hk.ops.decoupled_kd_reference).
// CPU kernel, and the glue to csrc/cuda/decoupled_kd.cu.
//
// With p = softmax(s/T), q = softmax(h/T), KL_n = sum_k p (log p - log q) and c = alpha / (N T):
//   losses = [G_h, G_s], both alpha * mean_n KL_n (equal values; each reaches only its own logits)
//   grad_hard = dG_h/dh = c (q - p)                 the hard network's weight path (soft side detached)
//   grad_soft = dG_s/ds = c p (log p - log q - KL_n)  the soft network's mask-only path (hard side detached)
// The gradients come out of the forward pass itself: the backward only scales them by the incoming gradients.
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

namespace s2hk {
namespace {

// log-sum-exp of x / T over one row, in double.
template <typename T>
double row_log_sum_exp(const T* x, int64_t classes, double temperature) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t k = 0; k < classes; ++k) m = std::max(m, static_cast<double>(x[k]) / temperature);
  double z = 0.0;
  for (int64_t k = 0; k < classes; ++k) z += std::exp(static_cast<double>(x[k]) / temperature - m);
  return m + std::log(z);
}

template <typename T>
void decoupled_kd_cpu_kernel(const T* soft, const T* hard, int64_t rows, int64_t classes, double temperature,
                             double alpha, T* losses, T* grad_hard, T* grad_soft) {
  const double grad_scale = alpha / (static_cast<double>(rows) * temperature);
  std::vector<double> row_kl(rows);
  // Rows are independent; a few hundred logits per task amortise the thread hand-off.
  const int64_t rows_per_task = std::max<int64_t>(1, 4096 / classes);
  at::parallel_for(0, rows, rows_per_task, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* s = soft + n * classes;
      const T* h = hard + n * classes;
      const double log_z_soft = row_log_sum_exp(s, classes, temperature);
      const double log_z_hard = row_log_sum_exp(h, classes, temperature);
      double kl = 0.0;
      for (int64_t k = 0; k < classes; ++k) {
        const double log_p = static_cast<double>(s[k]) / temperature - log_z_soft;
        const double log_q = static_cast<double>(h[k]) / temperature - log_z_hard;
        kl += std::exp(log_p) * (log_p - log_q);
      }
      for (int64_t k = 0; k < classes; ++k) {
        const double log_p = static_cast<double>(s[k]) / temperature - log_z_soft;
        const double log_q = static_cast<double>(h[k]) / temperature - log_z_hard;
        const double p = std::exp(log_p);
        grad_hard[n * classes + k] = static_cast<T>(grad_scale * (std::exp(log_q) - p));
        grad_soft[n * classes + k] = static_cast<T>(grad_scale * p * (log_p - log_q - kl));
      }
      row_kl[n] = kl;
    }
  });
  double total = 0.0;  // summed in row order: the loss does not depend on the thread count
  for (int64_t n = 0; n < rows; ++n) total += row_kl[n];
  losses[0] = losses[1] = static_cast<T>(alpha * total / static_cast<double>(rows));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> decoupled_kd_cpu(const at::Tensor& soft_in, const at::Tensor& hard_in,
                                                                double temperature, double alpha) {
  const KdInputs in = validate_decoupled_kd(soft_in, hard_in, temperature, alpha);
  const at::Tensor &soft = in.soft, &hard = in.hard;
  at::Tensor losses = at::empty({2}, soft.options());
  at::Tensor grad_hard = at::empty_like(hard), grad_soft = at::empty_like(soft);
  AT_DISPATCH_FLOATING_TYPES(soft.scalar_type(), "s2hk::decoupled_kd", [&] {
    decoupled_kd_cpu_kernel<scalar_t>(soft.const_data_ptr<scalar_t>(), hard.const_data_ptr<scalar_t>(), soft.size(0),
                                      soft.size(1), temperature, alpha, losses.mutable_data_ptr<scalar_t>(),
                                      grad_hard.mutable_data_ptr<scalar_t>(), grad_soft.mutable_data_ptr<scalar_t>());
  });
  return {losses, grad_hard, grad_soft};
}

#ifdef S2HK_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> decoupled_kd_cuda(const at::Tensor& soft_in, const at::Tensor& hard_in,
                                                                 double temperature, double alpha) {
  const KdInputs in = validate_decoupled_kd(soft_in, hard_in, temperature, alpha);
  const at::Tensor &soft = in.soft, &hard = in.hard;
  const c10::cuda::CUDAGuard guard(soft.device());
  at::Tensor losses = at::empty({2}, soft.options());
  at::Tensor grad_hard = at::empty_like(hard), grad_soft = at::empty_like(soft);
  at::Tensor row_kl = at::empty({soft.size(0)}, soft.options().dtype(at::kDouble));
  check_launch(s2hk_decoupled_kd_cuda(launcher_dtype(soft.scalar_type()), soft.const_data_ptr(), hard.const_data_ptr(),
                                      soft.size(0), soft.size(1), temperature, alpha, losses.mutable_data_ptr(),
                                      grad_hard.mutable_data_ptr(), grad_soft.mutable_data_ptr(),
                                      row_kl.mutable_data_ptr<double>(), current_cuda_stream()),
               "decoupled_kd");
  return {losses, grad_hard, grad_soft};
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(s2hk, CPU, m) { m.impl("decoupled_kd", &decoupled_kd_cpu); }

#ifdef S2HK_WITH_CUDA
TORCH_LIBRARY_IMPL(s2hk, CUDA, m) { m.impl("decoupled_kd", &decoupled_kd_cuda); }
#endif

}  // namespace s2hk
