// Plain-C entry points of the CUDA kernels in csrc/cuda/*.cu.
//
// This header is the only contact between the CUDA sources and the torch glue in csrc/cpu/*.cpp: nvcc never
// parses a torch header (a torch include costs nvcc tens of seconds per file) and the host compiler never
// parses CUDA code. Pointers are raw device pointers, sizes are element counts, `stream` is a cudaStream_t.
// Every launcher only enqueues work and returns NULL, or the CUDA error string of a failed launch.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types of the `dtype` arguments (the torch glue maps at::ScalarType onto these).
enum s2hk_dtype { S2HK_FLOAT32 = 0, S2HK_FLOAT64 = 1, S2HK_FLOAT16 = 2, S2HK_BFLOAT16 = 3 };

// Columns of the int64 (G, 4) group table of the gate ops: where group g lives in the flat buffers.
enum s2hk_gate_layout_column {
  S2HK_GATE_CHANNEL_OFFSET = 0,  // first channel of the group in ranks / keep_probs / mask
  S2HK_GATE_LOGIT_OFFSET = 1,    // first width-choice logit of the group
  S2HK_GATE_CHANNELS = 2,        // C_g
  S2HK_GATE_GRANULARITY = 3,     // d_g (divides C_g; L_g = C_g / d_g)
  S2HK_GATE_LAYOUT_COLUMNS = 4
};

// The gate kernels index the flat buffers through the device `layout` and `ranks`, which the host does not read
// (that would synchronise with the device every call); it validates a CPU copy of the layout instead. The
// kernels stay inside the buffers whatever these two hold: `num_channels` (sum C_g: ranks, keep_probs, mask,
// grad_keep_probs, channel_scratch) and `num_logits` (sum L_g: logits, grad_logits, choice_scratch) bound every
// access. A group whose layout row does not fit them is skipped, its hard width and expected width NaN; a group
// whose ranks are not a permutation of 0..C_g-1 gets NaN outputs and NaN logit gradients.

// gates forward, one block per group: keep_probs (dtype), mask (float32), hard_widths and expected (float64).
const char* s2hk_gates_forward_cuda(int dtype, const void* logits, const int64_t* ranks, const int64_t* layout,
                                    int64_t num_groups, int64_t num_channels, int64_t num_logits, double tau,
                                    void* keep_probs, float* mask, double* hard_widths, double* expected,
                                    double* channel_scratch, double* choice_scratch, void* stream);

// gates backward, one block per group: grad_logits (dtype) from the gradients of keep_probs (dtype) and of
// hard_widths and expected (float64; both reach the logits through E, straight-through).
const char* s2hk_gates_backward_cuda(int dtype, const void* grad_keep_probs, const double* grad_hard_widths,
                                     const double* grad_expected, const void* logits, const int64_t* ranks,
                                     const int64_t* layout, int64_t num_groups, int64_t num_channels,
                                     int64_t num_logits, double tau, void* grad_logits, double* channel_scratch,
                                     double* choice_scratch, void* stream);

// decoupled KD, one warp per row of the (N, K) soft and hard logits (contiguous, N >= 1, K >= 1): the batch-mean
// KL terms losses[0] = losses[1] = alpha * KL(softmax(s/T) || softmax(h/T)) (dtype, 2 elements) and the routed
// gradients grad_hard = dG_h/dh, grad_soft = dG_s/ds (dtype, N x K), computed in double for either dtype.
// `row_kl` holds N doubles. dtype: S2HK_FLOAT32 or S2HK_FLOAT64.
const char* s2hk_decoupled_kd_cuda(int dtype, const void* soft, const void* hard, int64_t rows, int64_t classes,
                                   double temperature, double alpha, void* losses, void* grad_hard,
                                   void* grad_soft, double* row_kl, void* stream);

// Columns of the int64 tables of group_importance (rows of S2HK_IMPORTANCE_COLUMNS).
enum s2hk_importance_column {
  // layer rows, sorted by group: the weight's device address, the size of one output filter, its s2hk_dtype
  S2HK_LAYER_DATA = 0,
  S2HK_LAYER_FILTER_NUMEL = 1,
  S2HK_LAYER_DTYPE = 2,
  // group rows: the group's first channel in the flat outputs, C_g, its first layer row and its layer count
  S2HK_GROUP_CHANNEL_OFFSET = 0,
  S2HK_GROUP_CHANNELS = 1,
  S2HK_GROUP_FIRST_LAYER = 2,
  S2HK_GROUP_NUM_LAYERS = 3,
  S2HK_IMPORTANCE_COLUMNS = 4
};

// group_importance: one launch for the mean filter L1 norms of every channel of every group (importance, of
// `out_dtype`, S2HK_FLOAT32 or S2HK_FLOAT64), one launch for the importance-descending order and the ranks
// (int64, per-group local indices). Each layer's filters are contiguous runs of filter_numel elements.
// `layers` (num_layers rows) and `groups` (num_groups rows) are device tables laid out as above;
// `max_channels` = max C_g sizes the rank grid.
const char* s2hk_group_importance_cuda(int out_dtype, const int64_t* layers, const int64_t* groups,
                                       int64_t num_groups, int64_t total_channels, int64_t max_channels,
                                       void* importance, int64_t* order, int64_t* ranks, void* stream);

#ifdef __cplusplus
}  // extern "C"
#endif
