"""Step timings against the performance model of DESIGN.md.

``floor = t(dense step) + t(training step of the exported narrow model) + t(input-gradient-only backward)``,
each measured in plain PyTorch on the same machine, model and batch; an S2HPruner step should sit within
10% of it. The narrow model is the hard network at the target FLOPs ratio obtained by scaling every
prunable group uniformly (:func:`s2hk.baselines.uniform_l1_widths`).
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["time_once", "time_call", "time_interleaved", "dense_step", "narrow_step",
           "input_grad_backward", "input_grad_backward_time", "s2hk_step", "step_timings", "machine_description",
           "peak_memory", "count_ops"]


def machine_description() -> dict:
    """CPU model, cores, torch version and GPU name (if any), for results files."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    out = {"cpu": cpu, "cores": torch.get_num_threads(), "logical_cpus": os.cpu_count(), "torch": torch.__version__,
           "python": platform.python_version(), "platform": platform.platform()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_once(fn: Callable[[], Any]) -> float:
    """Seconds of one call of ``fn`` (CUDA-synchronised); a ``fn`` that returns a float reports its own time
    (e.g. a backward whose forward must not be counted)."""
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    elapsed = time.perf_counter() - start
    return float(out) if isinstance(out, float) else elapsed


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each of ``fns``, timed in turn round by round (one call of each per round).

    On a machine shared with other jobs the load changes over seconds; interleaving the calls exposes every
    function to the same load, so their ratios stay meaningful where back-to-back medians would not. A
    function returning a float reports its own time (see :func:`time_once`)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            t = time_once(fn)
            if i >= warmup:
                samples[name].append(t)
    return {name: statistics.median(v) for name, v in samples.items()}


def time_call(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds (CUDA-synchronised when a GPU is in use)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def dense_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> Callable:
    """A closure doing one plain training step (forward, CE, backward, SGD step)."""
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return step


narrow_step = dense_step  # a training step of the exported narrow model is a plain step of a smaller model


def input_grad_backward(model: nn.Module, x: torch.Tensor) -> Callable[[], float]:
    """A closure that runs a forward of ``model`` (not timed) and a backward computing the input gradient only
    (no weight gradient), and returns the seconds of that backward: the cost of S2HPruner's mask-only backward
    through the soft path."""
    params = list(model.parameters())

    def run() -> float:
        flags = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(False)
            xi = x.detach().requires_grad_(True)
            out = model(xi)
            grad = torch.ones_like(out) / out.numel()
            _sync()
            start = time.perf_counter()
            torch.autograd.grad(out, xi, grad)
            _sync()
            return time.perf_counter() - start
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
    return run


def input_grad_backward_time(model: nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    """Median time of a backward that computes input gradients only (see :func:`input_grad_backward`)."""
    run = input_grad_backward(model, x)
    run()
    return statistics.median(run() for _ in range(repeats))


def s2hk_step(pruner: Any, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> Callable:
    def step() -> None:
        pruner.train_step(x, y, optimizer)
    return step


def step_timings(model_name: str, batch_size: int = 64, image_size: int = 32, target_flops: float = 0.35,
                 repeats: int = 5, num_classes: int = 10, device: Optional[str] = None) -> dict:
    """Times of a dense step, the narrow model's step, the input-gradient-only backward, the floor and an
    S2HPruner step (hard network pinned at ``target_flops`` by uniform scaling), all on one batch; the four are
    timed in turn, round by round (:func:`time_interleaved`), after two warm-up rounds."""
    from .baselines import uniform_l1_widths  # baselines imports the methods; keep this module light
    from .models import get_model
    from .s2h import S2HPruner

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    model = get_model(model_name, num_classes=num_classes).to(device).train()
    dense = get_model(model_name, num_classes=num_classes).to(device).train()
    dense.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(dense.parameters(), lr=0.01, momentum=0.9)

    pruner = S2HPruner(model, x[:1], target_flops=target_flops).train()
    pruner.set_hard_widths(uniform_l1_widths(pruner, target_flops))
    ratio = pruner.flops("hard") / pruner.flops("full")
    narrow = pruner.export().train()
    narrow_opt = torch.optim.SGD(narrow.parameters(), lr=0.01, momentum=0.9)
    popt = torch.optim.SGD(pruner.weight_parameters(), lr=0.01, momentum=0.9)
    times = time_interleaved({"dense": dense_step(dense, x, y, opt),
                              "narrow": narrow_step(narrow, x, y, narrow_opt),
                              "input_grad": input_grad_backward(dense, x),
                              "s2hk": s2hk_step(pruner, x, y, popt)}, repeats, warmup=2)
    t_dense, t_narrow, t_input_grad, t_s2hk = times["dense"], times["narrow"], times["input_grad"], times["s2hk"]
    floor = t_dense + t_narrow + t_input_grad
    return {
        "model": model_name, "batch_size": batch_size, "image_size": image_size, "device": device,
        "target_flops": target_flops, "hard_flops_ratio": ratio,
        "dense_step_s": t_dense, "narrow_step_s": t_narrow, "input_grad_backward_s": t_input_grad,
        "floor_s": floor, "s2hk_step_s": t_s2hk,
        "s2hk_over_dense": t_s2hk / t_dense, "floor_over_dense": floor / t_dense, "s2hk_over_floor": t_s2hk / floor,
        "narrow_over_dense": t_narrow / t_dense, "machine": machine_description(),
    }


def peak_memory(fn: Callable[[], Any], device: Optional[str] = None) -> Optional[int]:
    """Peak bytes allocated by tensors during one call of ``fn``, above what was allocated before it.

    CUDA: the caching allocator's ``max_memory_allocated``. CPU: the allocation events recorded by
    ``torch.profiler`` with ``profile_memory=True`` (every tensor allocation and free, in time order);
    ``None`` if this torch's profiler does not expose them."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        tree = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError:
        return None
    allocations = []
    stack = list(tree)
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        extra = event.extra_fields
        if type(extra).__name__ == "_ExtraFields_Allocation" and str(extra.device).startswith("cpu"):
            allocations.append((event.start_time_ns, extra.alloc_size))
    current = peak = 0
    for _, size in sorted(allocations, key=lambda a: a[0]):
        current += size
        peak = max(peak, current)
    return peak


def count_ops(fn: Callable[[], Any]) -> dict[str, int]:
    """Operators dispatched by one call of ``fn``, from ``torch.profiler``: ``calls`` counts the outermost
    operator calls (what Python or autograd dispatches: one launch each on a GPU, one kernel call on CPU),
    ``total`` every operator including those called inside others."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def is_op(event: Any) -> bool:
        return "::" in event.name and not event.name.startswith(("autograd::", "profiler::"))

    calls = total = 0
    for event in prof.events():
        if not is_op(event):
            continue
        total += 1
        parent = event.cpu_parent
        while parent is not None and not is_op(parent):
            parent = parent.cpu_parent
        calls += parent is None
    return {"calls": calls, "total": total}
