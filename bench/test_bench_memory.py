"""Peak memory: one s2hk ``train_step`` against one dense training step of the same model and batch.

Question: how much memory does the S2HPruner step need beyond a dense step? Measured as the peak bytes held
by tensors during one step above what was held before it (activations, gradients, temporaries), after a
warm-up step so that optimiser state exists; plus the resident state (parameters, gradients, buffers,
optimiser state, and for s2hk the mask logits, ranks and hard-path BatchNorm statistics). CPU: allocation
events of ``torch.profiler(profile_memory=True)``; GPU: ``torch.cuda.max_memory_allocated``.

Target (from the performance model's accounting of what a step holds): the soft graph (a dense step's
activations) and the hard graph (the narrow network's) are alive together until the one backward, nothing
else is kept, so ``s2hk peak <= 1.10 x (dense step peak + narrow step peak)`` (above-start peaks).
"""
from __future__ import annotations

import itertools

import torch

from s2hk.benchmarking import peak_memory

TARGET = ("s2hk_over_memory_floor <= 1.10: the step's peak above its start within 10% of the dense step's plus "
          "the narrow model's step's (both graphs alive together, nothing more)")


def _resident_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = itertools.chain(module.parameters(), module.buffers(),
                              (p.grad for p in module.parameters() if p.grad is not None),
                              (v for state in optimizer.state.values() for v in state.values()
                               if isinstance(v, torch.Tensor)))
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def test_peak_memory(benchmark, workload, sizes, device, model_name, target):
    """Peak tensor memory of one s2hk step (benchmarked: the profiled step) vs a dense step and the narrow
    model's step.

    Target: s2hk peak above start <= 1.10 x (dense step's + narrow step's), i.e. no more than both graphs.
    """
    w = workload(model_name, target)
    dense, narrow, s2hk = w.dense_step(), w.narrow_step(), w.s2hk_step()
    for step in (dense, narrow, s2hk):  # optimiser state and allocator caches exist before the measurement
        step()
    peak_dense, peak_narrow = peak_memory(dense, device), peak_memory(narrow, device)
    peak_s2hk = benchmark.pedantic(peak_memory, args=(s2hk, device), rounds=1, iterations=1)
    res_dense = _resident_bytes(w.dense, w._opts["dense"])
    res_s2hk = _resident_bytes(w.pruner, w._opts["s2hk"])
    info = dict(question="peak memory", model=model_name, target_flops=target,
                hard_flops_ratio=round(w.hard_flops_ratio, 4), batch_size=sizes.batch, image_size=sizes.image,
                smoke=sizes.smoke, device=device, performance_target=TARGET,
                resident_dense_bytes=res_dense, resident_s2hk_bytes=res_s2hk)
    if None not in (peak_dense, peak_narrow, peak_s2hk):
        floor = peak_dense + peak_narrow
        info.update(peak_dense_bytes=peak_dense, peak_narrow_bytes=peak_narrow, peak_s2hk_bytes=peak_s2hk,
                    s2hk_over_dense=peak_s2hk / peak_dense, memory_floor_over_dense=floor / peak_dense,
                    s2hk_over_memory_floor=peak_s2hk / floor,
                    total_s2hk_over_dense=(res_s2hk + peak_s2hk) / (res_dense + peak_dense),
                    meets_target=peak_s2hk <= 1.10 * floor)
    benchmark.extra_info.update(info)
