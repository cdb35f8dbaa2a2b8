"""End-to-end training-step throughput of S2HPruner against the performance model of DESIGN.md.

    python bench/gpu_e2e.py --json bench/results/gpu_e2e.json          # the default workloads on the GPU
    python bench/gpu_e2e.py --device cpu --model resnet56 --sizes 32 --batch-sizes 4 --repeats 1   # smoke

Default workloads: resnet50 at 32 px (CIFAR stem, batch 256) and at 224 px (ImageNet stem, batch 128),
resnet56 at 32 px (batch 256). On CUDA: bf16 autocast, channels_last, cuDNN autotuning, TF32 on. On CPU: float32
(``--precision bf16`` for bf16 autocast), contiguous tensors, one intra-op thread (``--threads``).

Per workload, timed in turn round by round (:func:`s2hk.benchmarking.time_interleaved_samples`):

- the dense step, the step of the exported narrow model, the input-gradient-only backward, and their sum, the
  floor (DESIGN.md, "Performance model");
- the s2hk step PINNED: the hard network fixed at the FLOPs target by uniform scaling
  (:func:`s2hk.baselines.uniform_l1_widths`);
- the straightforward two-pass step (bench/naive_two_pass.py) at the same widths;

then the s2hk step UNPINNED: a fresh S2HPruner from the max init (hard network at full width), widths free
and the mask optimiser on, ``--unpinned-steps`` steps timed one by one. While widths move, every new
convolution shape is autotuned again by cuDNN: the per-step times, their median and mean are reported.

Reported: images/s; achieved TFLOP/s counting the work the performance model assigns to each step --
``(4 + 3r) F`` per image for an s2hk step (soft forward + backward 3F, hard forward + backward 3rF, mask-only
backward F), ``3F`` for a dense step, ``3rF`` for the narrow step, with ``F`` the dense forward FLOPs of one
image and ``r`` the hard network's FLOPs ratio (per step, when unpinned); percent of the measured bf16 matmul
peak (CUDA); peak memory of each step above what was allocated before it; kernel launches of one step
(CUDA kernels from torch.profiler; operator calls on CPU) for the pinned s2hk step and the floor's parts.

Every figure with a target from the performance model states the target, the measured ratio and whether it
is met: the pinned s2hk step <= 1.10 x floor on CPU; on a GPU <= 1.15 x floor at 32 px and <= 1.10 x at 224 px
(resnet50), <= 1.3 x for resnet56; the unpinned mean step <= 1.10 x the pinned mean step.

``--deadline-s`` bounds the run: no workload starts once less than ``--min-workload-s`` is left, each
workload's unpinned phase stops at its share of the time left, and the JSON is rewritten after every workload,
so a run cut short still leaves what it measured. Exit status: 0 when every workload ran (or was skipped for
the deadline) without an error, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # naive_two_pass, also when imported from elsewhere

DEFAULT_WORKLOADS = (("resnet50", 32, 256), ("resnet50", 224, 128), ("resnet56", 32, 256))
UNPINNED_OVER_PINNED = 1.10
DESIGN = "DESIGN.md, Performance model"


# ------------------------------------------------------------------------------------------ targets
def pinned_target(device: str, model: str, image_size: int) -> float:
    """The performance model's bound on s2hk pinned step / floor for this device, model and image size."""
    if device != "cuda":
        return 1.10
    if model == "resnet56":
        return 1.3
    return 1.15 if image_size <= 64 else 1.10


def check(figure: str, measured: Optional[float], target: float, basis: str) -> dict:
    """One figure against its target (``measured <= target``); ``met`` is None when not measured."""
    met = None if measured is None or not math.isfinite(measured) else bool(measured <= target)
    return {"figure": figure, "measured": measured, "target": target, "comparison": "<=", "met": met,
            "basis": basis}


# ------------------------------------------------------------------------------------------ workloads
def workloads(models: Optional[list[str]], sizes: Optional[list[int]],
              batch_sizes: Optional[list[int]]) -> list[tuple[str, int, int]]:
    """(model, image size, batch) triples: the defaults, or every model at every size.

    ``sizes`` defaults to 32 and 224 (32 only for resnet56, a CIFAR network); ``batch_sizes`` is one value per
    size or a single value for all (default: 256 at <= 64 px, 128 above)."""
    if not models and not sizes and not batch_sizes:
        return list(DEFAULT_WORKLOADS)
    models = models or sorted({m for m, _, _ in DEFAULT_WORKLOADS})
    if batch_sizes and sizes and len(batch_sizes) not in (1, len(sizes)):
        raise ValueError("give one --batch-sizes value per --sizes value, or a single one")
    out = []
    for model in models:
        model_sizes = sizes or ([32] if model == "resnet56" else [32, 224])
        for i, size in enumerate(model_sizes):
            if batch_sizes:
                batch = batch_sizes[i] if sizes and len(batch_sizes) == len(sizes) else batch_sizes[0]
            else:
                batch = 256 if size <= 64 else 128
            out.append((model, size, batch))
    return out


def _split(values: Optional[list[str]], kind: Callable = str) -> Optional[list]:
    """Repeatable options that also take comma-separated lists: ``--model a --model b,c``."""
    if not values:
        return None
    return [kind(v) for item in values for v in str(item).split(",") if v.strip()]


# ------------------------------------------------------------------------------------------ one workload
class Context:
    """The run's settings: device, precision, memory format, timing rounds, deadline."""

    def __init__(self, args: argparse.Namespace, peak_tflops: Optional[float], start: float) -> None:
        self.device = args.device
        self.cuda = args.device == "cuda"
        self.bf16 = args.precision == "bf16"
        self.memory_format = torch.channels_last if self.cuda else torch.contiguous_format
        self.repeats, self.warmup = args.repeats, args.warmup
        self.unpinned_steps = args.unpinned_steps
        self.target = args.target_flops
        self.peak_tflops = peak_tflops
        self.launches = not args.no_launches
        self.start = start
        self.deadline = None if args.deadline_s is None else self.start + args.deadline_s
        self.min_workload_s = args.min_workload_s

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def wrap(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` under bf16 autocast when asked for."""
        if not self.bf16:
            return fn

        def run() -> Any:
            with torch.autocast(self.device, dtype=torch.bfloat16):
                return fn()
        return run

    def tflops(self, flops: float, seconds: Optional[float]) -> Optional[float]:
        return None if not seconds else flops / seconds / 1e12

    def percent(self, tflops: Optional[float]) -> Optional[float]:
        return None if tflops is None or not self.peak_tflops else 100.0 * tflops / self.peak_tflops


def _sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def _mib(n: Optional[int]) -> Optional[float]:
    return None if n is None else n / 2 ** 20


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


def _error(err: BaseException) -> dict:
    return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=8)}


def run_workload(ctx: Context, model_name: str, image_size: int, batch_size: int, stop_at: float) -> dict:
    """Measure one (model, image size, batch); the unpinned phase stops at ``stop_at`` (monotonic seconds).

    A step kind that fails (building it, its first call, its memory or launch count, the unpinned phase) is
    recorded under ``errors`` and left out; the others are still measured, and figures needing it are None."""
    from s2hk.benchmarking import (count_launches, dense_step, device_name, input_grad_backward, narrow_step,
                                   peak_memory, pinned_models, s2hk_step, time_interleaved_samples, time_once,
                                   utc_now, versions)
    from s2hk.models import get_model

    from naive_two_pass import NaiveS2HPruner

    began = time.monotonic()
    device, cl = ctx.device, ctx.memory_format
    stem = "cifar" if image_size <= 64 else "imagenet"
    num_classes = 10 if image_size <= 64 else 1000
    kwargs = {"stem": stem} if model_name != "resnet56" and model_name.startswith("resnet") else {}
    errors: dict[str, dict] = {}

    def build() -> torch.nn.Module:
        model = get_model(model_name, num_classes=num_classes, **kwargs).to(device).to(memory_format=cl)
        return model.train()

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=gen).to(device).contiguous(memory_format=cl)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
    m = pinned_models(build, x[:1], ctx.target)
    narrow = m.narrow.to(memory_format=cl)
    r, flops = m.hard_flops_ratio, float(m.dense_flops)
    fns = {"s2hk": ctx.wrap(s2hk_step(m.pruner, x, y, _sgd(m.pruner.weight_parameters()))),
           "dense": ctx.wrap(dense_step(m.dense, x, y, _sgd(m.dense.parameters()))),
           "narrow": ctx.wrap(narrow_step(narrow, x, y, _sgd(narrow.parameters()))),
           "input_grad": ctx.wrap(input_grad_backward(m.dense, x))}
    try:
        naive_model = build()
        naive_model.load_state_dict(m.dense.state_dict())
        naive = NaiveS2HPruner(naive_model, x[:1], target_flops=ctx.target)
        naive.set_hard_widths(m.widths)
        naive_opt = _sgd(naive.weight_parameters())
        fns["naive"] = ctx.wrap(lambda: naive.train_step(x, y, naive_opt))
    except Exception as err:
        errors["naive"] = _error(err)
    for name in list(fns):  # one call each first: a kind that fails is left out of the timing
        try:
            time_once(fns[name])
        except Exception as err:
            errors[name] = _error(err)
            del fns[name]
    samples = time_interleaved_samples(fns, repeats=ctx.repeats, warmup=ctx.warmup)
    med: dict[str, Optional[float]] = {k: None for k in ("s2hk", "dense", "narrow", "input_grad", "naive")}
    med.update({k: statistics.median(v) for k, v in samples.items()})
    parts = [med["dense"], med["narrow"], med["input_grad"]]
    floor = None if None in parts else sum(parts)
    pinned_mean = statistics.fmean(samples["s2hk"]) if "s2hk" in samples else None

    # peak memory of each step above what it found allocated; launches of one step (after the timed ones)
    memory: dict[str, Optional[float]] = {}
    for name, fn in fns.items():
        try:
            memory[name] = _mib(peak_memory(fn, device))
        except Exception as err:
            memory[name] = None
            errors[f"peak_memory_{name}"] = _error(err)
    launches: dict[str, Any] = {}
    if ctx.launches:
        for name in ("s2hk", "dense", "narrow", "input_grad"):
            try:
                launches[name] = count_launches(fns[name], device)
            except Exception as err:  # a profiler without CUDA activity (no CUPTI), or a failed kind
                launches[name] = {"error": f"{type(err).__name__}: {err}"}
        launches["floor"] = _sum_counts([launches[k] for k in ("dense", "narrow", "input_grad")])
        launches["note"] = "input_grad counts its forward too (the closure runs one, untimed)"
    fns.clear()
    naive = naive_model = naive_opt = None  # noqa: F841  (free the two-pass model before the unpinned phase)
    if ctx.cuda:
        torch.cuda.empty_cache()

    try:
        unpinned = run_unpinned(ctx, build, x, y, flops, stop_at)
    except Exception as err:
        errors["unpinned"] = _error(err)
        unpinned = {"steps_requested": ctx.unpinned_steps, "steps_done": 0, "mean_s": None, "median_s": None,
                    "images_per_s": None, "tflops": None, "seconds_per_work": None, "error": errors["unpinned"]["error"]}
        if ctx.cuda:
            torch.cuda.empty_cache()

    work = {"s2hk": (4 + 3 * r) * flops * batch_size, "naive": (4 + 3 * r) * flops * batch_size,
            "dense": 3 * flops * batch_size, "narrow": 3 * r * flops * batch_size}
    images = {k: _ratio(batch_size, med[k]) for k in ("dense", "narrow", "s2hk", "naive")}
    tflops = {k: ctx.tflops(w, med[k]) for k, w in work.items()}
    images["s2hk_unpinned"] = unpinned["images_per_s"]
    tflops["s2hk_unpinned"] = unpinned["tflops"]
    percent = {k: ctx.percent(v) for k, v in tflops.items()}
    target = pinned_target(device, model_name, image_size)
    per_work = None if pinned_mean is None else pinned_mean / work["s2hk"]
    checks = [check("s2hk_pinned_over_floor", _ratio(med["s2hk"], floor), target,
                    f"{DESIGN}: s2hk step (pinned, median) within {target:.2f} x floor = dense + narrow + "
                    f"input-gradient-only backward on {'GPU' if ctx.cuda else 'CPU'}"),
              check("s2hk_unpinned_mean_over_pinned_mean", _ratio(unpinned["mean_s"], pinned_mean),
                    UNPINNED_OVER_PINNED,
                    f"{DESIGN} / first GPU run: widths moving (real training) cost at most "
                    f"{UNPINNED_OVER_PINNED:.2f} x the pinned step, mean over the unpinned steps"),
              check("s2hk_unpinned_over_pinned_per_work", _ratio(unpinned["seconds_per_work"], per_work),
                    UNPINNED_OVER_PINNED,
                    "the same, per unit of the performance model's work (4 + 3r) F: the unpinned steps start at "
                    "full width (r = 1), so this separates re-autotuning and plan changes from the wider hard path")]
    return {
        "model": model_name, "stem": stem, "image_size": image_size, "batch_size": batch_size,
        "device": device, "device_name": device_name(device), "versions": versions(), "date_utc": utc_now(),
        "num_classes": num_classes,
        "precision": "bf16 autocast" if ctx.bf16 else "float32",
        "memory_format": "channels_last" if ctx.cuda else "contiguous",
        "target_flops": ctx.target, "hard_flops_ratio": r, "dense_forward_flops_per_image": flops,
        "hard_widths": m.widths,
        "dense_step_s": med["dense"], "narrow_step_s": med["narrow"], "input_grad_backward_s": med["input_grad"],
        "floor_s": floor, "s2hk_step_s": med["s2hk"], "s2hk_pinned_mean_s": pinned_mean,
        "naive_step_s": med["naive"], "samples_s": samples, "rounds": ctx.repeats, "warmup_rounds": ctx.warmup,
        "unpinned": unpinned,
        "images_per_s": images, "tflops": tflops, "percent_of_peak": percent,
        "work_per_image_flops": {k: w / batch_size for k, w in work.items()},
        "peak_memory_mib": memory, "launches": launches,
        # flat figures, as bench/make_table.py reads them
        "s2hk_images_per_s": images["s2hk"], "dense_images_per_s": images["dense"],
        "s2hk_tflops": tflops["s2hk"], "dense_tflops": tflops["dense"],
        "s2hk_percent_of_peak": percent["s2hk"], "dense_percent_of_peak": percent["dense"],
        "s2hk_over_dense": _ratio(med["s2hk"], med["dense"]), "floor_over_dense": _ratio(floor, med["dense"]),
        "s2hk_over_floor": _ratio(med["s2hk"], floor), "narrow_over_dense": _ratio(med["narrow"], med["dense"]),
        "naive_over_dense": _ratio(med["naive"], med["dense"]), "speedup_over_naive": _ratio(med["naive"], med["s2hk"]),
        "flops_ideal_over_dense": (4 + 3 * r) / 3,
        "unpinned_mean_over_pinned_mean": checks[1]["measured"],
        "unpinned_over_pinned_per_work": checks[2]["measured"],
        "pinned_target_over_floor": target, "meets_target": checks[0]["met"],
        "checks": checks, "errors": errors, "elapsed_s": time.monotonic() - began,
    }


def _sum_counts(parts: list[dict]) -> dict:
    if any("error" in p for p in parts):
        return {"error": "not every part was counted"}
    keys = [k for k, v in parts[0].items() if isinstance(v, int)]
    return {"kind": parts[0].get("kind"), **{k: sum(p[k] for p in parts) for k in keys}}


def run_unpinned(ctx: Context, build: Callable[[], torch.nn.Module], x: torch.Tensor, y: torch.Tensor,
                 flops: float, stop_at: float) -> dict:
    """A real joint phase: a fresh S2HPruner from the max init, widths free, the mask optimiser on; every step
    timed on its own. Stops early (after at least one step) once ``stop_at`` has passed."""
    from s2hk import S2HPruner
    from s2hk.benchmarking import summary, time_once

    torch.manual_seed(0)
    pruner = S2HPruner(build(), x[:1], target_flops=ctx.target).train()
    opt = _sgd(pruner.weight_parameters())
    full = pruner.flops("full")
    ratios = [pruner.flops("hard") / full]  # the hard network each step runs: the previous step's plan
    widths = [tuple(pruner.hard_widths().values())]
    metrics: list[dict] = []
    step = ctx.wrap(lambda: metrics.append(pruner.train_step(x, y, opt)))
    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    stopped = None
    for i in range(ctx.unpinned_steps):
        if i and time.monotonic() > stop_at:
            stopped = "deadline"
            break
        times.append(time_once(step))
        ratios.append(metrics[-1]["hard_flops_ratio"])
        widths.append(tuple(pruner.hard_widths().values()))
    ratios, widths = ratios[:len(times)], widths[:len(times)]
    stats = summary(times)
    batch = x.shape[0]
    total_work = sum((4 + 3 * q) * flops * batch for q in ratios)
    total_time = sum(times)
    seconds_per_work = total_time / total_work if total_work else None
    out = {
        "steps_requested": ctx.unpinned_steps, "steps_done": len(times), "stopped_early": stopped,
        "step_s": times, "median_s": stats["median"], "mean_s": stats["mean"], "min_s": stats["min"],
        "max_s": stats["max"],
        "mean_after_first_s": statistics.fmean(times[1:]) if len(times) > 1 else None,
        "mean_last_half_s": statistics.fmean(times[len(times) // 2:]) if times else None,
        "hard_flops_ratio_per_step": ratios, "distinct_hard_architectures": len(set(widths)),
        "images_per_s": batch * len(times) / total_time if total_time else None,
        "tflops": ctx.tflops(total_work, total_time), "seconds_per_work": seconds_per_work,
        "peak_memory_allocated_mib": _mib(torch.cuda.max_memory_allocated()) if ctx.cuda else None,
        "final_hard_flops_ratio": metrics[-1]["hard_flops_ratio"] if metrics else None,
    }
    del pruner, opt
    if ctx.cuda:
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------ the run
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--model", action="append", help="repeatable or comma-separated (default: the three "
                        "default workloads)")
    parser.add_argument("--sizes", nargs="+", help="image sizes (space- or comma-separated)")
    parser.add_argument("--batch-sizes", nargs="+", help="one per size, or one for all")
    parser.add_argument("--target-flops", type=float, default=0.35)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 20 cuda, 3 cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: 5 cuda, 1 cpu)")
    parser.add_argument("--unpinned-steps", type=int, default=None,
                        help="steps of the unpinned joint phase (default: 50 cuda, 3 cpu)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                        help="bf16 autocast or float32 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's on cuda; 1 on cpu, where this script is a "
                             "smoke run: on shared cores tiny ops on two threads wait for each other)")
    parser.add_argument("--no-launches", action="store_true", help="skip the profiler's launch counts")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="seconds from the script's start after which no workload starts; the JSON holds what "
                             "was measured")
    parser.add_argument("--min-workload-s", type=float, default=None,
                        help="do not start a workload with less than this left before the deadline "
                             "(default: 30 cuda, 5 cpu)")
    parser.add_argument("--json", type=Path, help="write the results here (rewritten after every workload)")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    for name, on_cuda, on_cpu in (("repeats", 20, 3), ("warmup", 5, 1), ("unpinned_steps", 50, 3),
                                  ("precision", "bf16", "fp32"), ("min_workload_s", 30.0, 5.0)):
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)
    if args.repeats < 1 or args.unpinned_steps < 1 or args.warmup < 0:
        parser.error("--repeats and --unpinned-steps must be >= 1, --warmup >= 0")
    try:
        args.workloads = workloads(_split(args.model), _split(args.sizes, int), _split(args.batch_sizes, int))
    except ValueError as err:
        parser.error(str(err))
    return args


def write(path: Optional[Path], out: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1, default=str))
    tmp.replace(path)


def line(res: dict) -> str:
    """One workload in one line; "-" for what was not measured."""
    def fmt(v: Optional[float], spec: str = ".2f", scale: float = 1.0) -> str:
        return "-" if v is None else format(scale * v, spec)

    u = res["unpinned"]
    text = (f"{res['model']} {res['image_size']}px batch {res['batch_size']} r={res['hard_flops_ratio']:.3f}: "
            f"dense {fmt(res['dense_step_s'], '.1f', 1e3)} ms, floor {fmt(res['floor_s'], '.1f', 1e3)} ms, "
            f"s2hk pinned {fmt(res['s2hk_step_s'], '.1f', 1e3)} ms ({fmt(res['s2hk_over_floor'])} x floor, target "
            f"{res['pinned_target_over_floor']:.2f}), unpinned mean {fmt(u['mean_s'], '.1f', 1e3)} ms / median "
            f"{fmt(u['median_s'], '.1f', 1e3)} ms over {u['steps_done']} steps "
            f"({fmt(res['unpinned_mean_over_pinned_mean'])} x pinned mean, target {UNPINNED_OVER_PINNED:.2f}), "
            f"two-pass {fmt(res['naive_step_s'], '.1f', 1e3)} ms; s2hk {fmt(res['s2hk_images_per_s'], '.0f')} img/s, "
            f"{fmt(res['s2hk_tflops'], '.3g')} TFLOP/s ({fmt(res['s2hk_percent_of_peak'], '.1f')}% of peak)")
    if res.get("errors"):
        text += "; FAILED: " + ", ".join(f"{k} ({v['error'][:120]})" for k, v in res["errors"].items())
    return text


def main(argv=None) -> int:
    start = time.monotonic()  # --deadline-s counts from here, the peak measurement included
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu_e2e.py --device cuda needs a CUDA device, but torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}); use --device cpu for the smoke run.", file=sys.stderr)
        return 2
    threads = args.threads or (None if args.device == "cuda" else 1)
    if threads:
        torch.set_num_threads(threads)
    from s2hk.benchmarking import device_name, machine_description, measure_bf16_peak, utc_now, versions

    cuda = args.device == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        peak = measure_bf16_peak()
        print(f"{torch.cuda.get_device_name()}: measured bf16 matmul peak {peak['tflops']:.1f} TFLOP/s "
              f"(n={peak['n']})", flush=True)
    else:
        peak = {"tflops": None, "n": None, "note": "not measured on cpu: percent of peak is reported on CUDA only"}
    ctx = Context(args, peak["tflops"], start)
    out: dict = {
        "script": "bench/gpu_e2e.py", "date_utc": utc_now(), "device": args.device,
        "device_name": device_name(args.device), "versions": versions(), "machine": machine_description(),
        "settings": {"precision": "bf16 autocast" if ctx.bf16 else "float32",
                     "memory_format": "channels_last" if cuda else "contiguous",
                     "cudnn_benchmark": bool(cuda and torch.backends.cudnn.benchmark), "tf32": cuda,
                     "threads": torch.get_num_threads(), "repeats": args.repeats, "warmup": args.warmup,
                     "unpinned_steps": args.unpinned_steps, "target_flops": args.target_flops,
                     "deadline_s": args.deadline_s, "min_workload_s": args.min_workload_s,
                     "workloads": [list(w) for w in args.workloads]},
        "bf16_peak": peak, "targets": {"s2hk_pinned_over_floor": {"cpu": 1.10, "cuda_resnet50_32px": 1.15,
                                                                  "cuda_resnet50_224px": 1.10, "cuda_resnet56": 1.3},
                                       "s2hk_unpinned_mean_over_pinned_mean": UNPINNED_OVER_PINNED,
                                       "basis": DESIGN},
        "results": [], "skipped": [], "errors": [], "complete": False,
    }
    write(args.json, out)
    for i, (model, size, batch) in enumerate(args.workloads):
        left = ctx.left()
        if left < args.min_workload_s:
            out["skipped"].append({"model": model, "image_size": size, "batch_size": batch,
                                   "reason": f"deadline: {left:.0f} s left < --min-workload-s {args.min_workload_s}"})
            print(f"skipped {model} {size}px batch {batch}: deadline ({left:.0f} s left)", flush=True)
            continue
        # the unpinned phase of this workload may use its share of the time left
        stop_at = math.inf if ctx.deadline is None else time.monotonic() + left / (len(args.workloads) - i)
        try:
            res = run_workload(ctx, model, size, batch, stop_at)
            out["results"].append(res)
            out["errors"] += [{"model": model, "image_size": size, "batch_size": batch, "part": part, **err}
                              for part, err in res["errors"].items()]
            print(line(res), flush=True)
        except Exception as err:
            out["errors"].append({"model": model, "image_size": size, "batch_size": batch,
                                  "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()})
            print(f"error in {model} {size}px batch {batch}: {type(err).__name__}: {err}", file=sys.stderr,
                  flush=True)
            if cuda:
                torch.cuda.empty_cache()
        out["elapsed_s"] = time.monotonic() - ctx.start
        write(args.json, out)
    out["complete"] = not out["errors"] and not out["skipped"]
    out["elapsed_s"] = time.monotonic() - ctx.start
    write(args.json, out)
    if args.json:
        print(f"wrote {args.json}")
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
