"""Step timings against the performance model of DESIGN.md.

``floor = t(dense step) + t(training step of the exported narrow model) + t(input-gradient-only backward)``,
each measured in plain PyTorch on the same machine, model and batch; an S2HPruner step should sit within
10% of it. The narrow model is the hard network at the target FLOPs ratio obtained by scaling every
prunable group uniformly (:func:`s2hk.baselines.uniform_l1_widths`).
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["time_once", "time_call", "time_interleaved", "time_interleaved_samples", "summary", "dense_step",
           "narrow_step", "input_grad_backward", "input_grad_backward_time", "s2hk_step", "PinnedModels",
           "pinned_models", "step_timings", "machine_description", "device_name", "versions", "utc_now",
           "measure_bf16_peak", "peak_memory", "count_ops", "count_launches", "git_commit"]


def _cpu_model() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def git_commit(folder: str | os.PathLike) -> Optional[str]:
    """The commit checked out in ``folder`` (benchmark results name the code they measured), or None."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_description() -> dict:
    """CPU model, cores, torch and triton versions and GPU name (if any), for results files."""
    out = {"cpu": _cpu_model(), "cores": torch.get_num_threads(), "logical_cpus": os.cpu_count(),
           "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    out.update({k: v for k, v in versions().items() if k not in out})
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        out["gpu_capability"] = f"{props.major}.{props.minor}"
        out["gpu_memory_gib"] = round(props.total_memory / 2 ** 30, 1)
    return out


def device_name(device: Any = None) -> str:
    """The GPU's name for a CUDA device, else the CPU model."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()


def versions() -> dict:
    """torch, triton (installed distribution, not imported), CUDA and cuDNN versions and Python."""
    from importlib import metadata

    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"torch": torch.__version__, "triton": triton, "cuda": torch.version.cuda, "cudnn": cudnn,
            "python": platform.python_version()}


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def time_interleaved_samples(fns: dict[str, Callable[[], Any]], repeats: int = 5,
                             warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of every timed call of each of ``fns``, timed in turn round by round (one call of each per
    round; the ``warmup`` rounds are not kept).

    On a machine shared with other jobs the load changes over seconds; interleaving the calls exposes every
    function to the same load, so their ratios stay meaningful where back-to-back medians would not. A
    function returning a float reports its own time (see :func:`time_once`)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            t = time_once(fn)
            if i >= warmup:
                samples[name].append(t)
    return samples


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each of ``fns``, timed in turn round by round (:func:`time_interleaved_samples`)."""
    return {name: statistics.median(v) for name, v in time_interleaved_samples(fns, repeats, warmup).items()}


def summary(samples: list[float]) -> dict[str, Optional[float]]:
    """Median, mean, min and max of ``samples`` (``None`` each when there are none)."""
    if not samples:
        return {"median": None, "mean": None, "min": None, "max": None}
    return {"median": statistics.median(samples), "mean": statistics.fmean(samples), "min": min(samples),
            "max": max(samples)}


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


@dataclass
class PinnedModels:
    """A dense model, an S2HPruner over a copy of it with the hard network pinned at a FLOPs target by uniform
    scaling, and that hard network exported as a plain (narrow) model -- all from the same initial weights."""

    dense: nn.Module
    pruner: Any
    widths: dict
    hard_flops_ratio: float
    dense_flops: int
    narrow: nn.Module


def pinned_models(build: Callable[[], nn.Module], example_inputs: torch.Tensor, target_flops: float,
                  **overrides: Any) -> PinnedModels:
    """``build()`` twice (the dense model and the pruned one, given the first one's weights), the hard
    network pinned at ``target_flops`` by :func:`s2hk.baselines.uniform_l1_widths`, and its export (in train
    mode). ``overrides`` go to :class:`s2hk.S2HPruner`."""
    from .baselines import uniform_l1_widths  # baselines imports the methods; keep this module light
    from .s2h import S2HPruner

    dense = build().train()
    model = build().train()
    model.load_state_dict(dense.state_dict())
    pruner = S2HPruner(model, example_inputs, target_flops=target_flops, **overrides).train()
    widths = uniform_l1_widths(pruner, target_flops)
    pruner.set_hard_widths(widths)
    full = pruner.flops("full")
    return PinnedModels(dense, pruner, widths, pruner.flops("hard") / full, full, pruner.export().train())


def step_timings(model_name: str, batch_size: int = 64, image_size: int = 32, target_flops: float = 0.35,
                 repeats: int = 5, num_classes: int = 10, device: Optional[str] = None) -> dict:
    """Times of a dense step, the narrow model's step, the input-gradient-only backward, the floor and an
    S2HPruner step (hard network pinned at ``target_flops`` by uniform scaling), all on one batch; the four are
    timed in turn, round by round (:func:`time_interleaved`), after two warm-up rounds."""
    from .models import get_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    m = pinned_models(lambda: get_model(model_name, num_classes=num_classes).to(device), x[:1], target_flops)
    opt = torch.optim.SGD(m.dense.parameters(), lr=0.01, momentum=0.9)
    narrow_opt = torch.optim.SGD(m.narrow.parameters(), lr=0.01, momentum=0.9)
    popt = torch.optim.SGD(m.pruner.weight_parameters(), lr=0.01, momentum=0.9)
    times = time_interleaved({"dense": dense_step(m.dense, x, y, opt),
                              "narrow": narrow_step(m.narrow, x, y, narrow_opt),
                              "input_grad": input_grad_backward(m.dense, x),
                              "s2hk": s2hk_step(m.pruner, x, y, popt)}, repeats, warmup=2)
    t_dense, t_narrow, t_input_grad, t_s2hk = times["dense"], times["narrow"], times["input_grad"], times["s2hk"]
    floor = t_dense + t_narrow + t_input_grad
    return {
        "model": model_name, "batch_size": batch_size, "image_size": image_size, "device": device,
        "target_flops": target_flops, "hard_flops_ratio": m.hard_flops_ratio,
        "dense_step_s": t_dense, "narrow_step_s": t_narrow, "input_grad_backward_s": t_input_grad,
        "floor_s": floor, "s2hk_step_s": t_s2hk,
        "s2hk_over_dense": t_s2hk / t_dense, "floor_over_dense": floor / t_dense, "s2hk_over_floor": t_s2hk / floor,
        "narrow_over_dense": t_narrow / t_dense, "machine": machine_description(),
    }


def measure_bf16_peak(sizes: tuple = (8192, 16384), iters: int = 20, device: Any = "cuda") -> dict:
    """The device's measured bf16 matmul peak: best TFLOP/s of ``a @ b`` for square bf16 matrices of the given
    sizes (CUDA events, after three warm-up products); sizes that do not fit in memory are skipped."""
    best: dict = {"tflops": 0.0, "n": None, "iters": iters}
    for n in sizes:
        try:
            a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
            b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        except torch.cuda.OutOfMemoryError:
            continue
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        torch.cuda.synchronize()
        tflops = 2.0 * n ** 3 / (start.elapsed_time(end) / 1e3 / iters) / 1e12
        if tflops > best["tflops"]:
            best.update(tflops=tflops, n=n)
        del a, b
        torch.cuda.empty_cache()
    return best


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


_LAUNCH_APIS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cudaLaunchCooperativeKernel", "cuLaunchKernel",
                "cuLaunchKernelEx", "cudaGraphLaunch")


def count_launches(fn: Callable[[], Any], device: Any = None) -> dict[str, Any]:
    """What one call of ``fn`` launches, from ``torch.profiler``.

    CUDA: ``kernels`` (device-side kernel events), ``memcpy_memset`` (device-side copies and fills) and
    ``launch_calls`` (host calls of the kernel-launch APIs, Triton's included). CPU: ``op_calls`` and
    ``ops_total`` of :func:`count_ops` (each outermost operator call is one kernel call there). Call ``fn``
    once before, so that warm-up work (autotuning, compilation) is not counted."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        counts = count_ops(fn)
        return {"kind": "cpu operator calls", "op_calls": counts["calls"], "ops_total": counts["total"]}
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = copies = launches = 0
    for event in prof.events():
        name = event.name
        if event.device_type == DeviceType.CUDA:
            if name.startswith(("Memcpy", "Memset")):
                copies += 1
            else:
                kernels += 1
        elif name in _LAUNCH_APIS:
            launches += 1
    return {"kind": "cuda kernels", "kernels": kernels, "memcpy_memset": copies, "launch_calls": launches}
