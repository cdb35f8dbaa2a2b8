"""The Triton kernels on one GPU against what they replace; the verdict ``s2hk.dispatch`` reads.

    python bench/kernels_gpu.py                     # writes bench/results/kernels-<device>.json (about 2-4 min)
    python bench/kernels_gpu.py --smoke --json /tmp/kernels-smoke.json    # tiny shapes, once each; without a
                                                    # GPU on CPU tensors under Triton's interpreter

Timed, per case, in forward mode (the forward alone, autograd recording as in training) and full mode
(forward + backward; ``backward`` = full - forward): every implementation in turn round by round (CUDA
events, several calls per round, median of the rounds), on channels_last activations:

- ``bn_gate_act`` against the PyTorch composition and, in bf16, against ``torch.compile`` of that composition.
  Shapes: ResNet-50's BatchNorms with a CIFAR stem at 32 px (32x32 .. 4x4) and with an ImageNet stem at 224 px
  (56x56 .. 7x7), batch 64 and 256; the hard path's narrow widths (about 0.6x, not multiples of 8). Variants:
    ``hard``  BN alone                           vs F.batch_norm                              (GatedNorm, hard)
    ``soft``  BN with the gate folded in         vs F.batch_norm(x, .., gamma*w, beta*w)       (GatedNorm, soft)
    ``fused`` relu(BN(x) * w + residual)         vs relu(F.batch_norm(x, .., gamma*w, beta*w) + residual)
  bf16 everywhere; fp16 and fp32 on a subset; NCHW on a subset. Bandwidth: the bytes an op must move (each
  input read once, each output written once) over its time, as a share of the device's copy bandwidth
  (measured here: one large device-to-device copy).
- ``dual_conv`` against its reference (two cuDNN convolutions and the gate multiply) on the stems, where both
  paths read the same image: CIFAR's 3x3 at 32 px and ImageNet's 7x7/2 at 224 px.
- ``dual_linear`` against its reference (two cuBLAS GEMMs) at small M: ResNet-50's classifier (2048 inputs,
  10 to 1000 classes, batch 64 and 256) and a 768-wide layer at M = 256.

Verdict, per op (the JSON's ``wins``, read by :func:`s2hk.dispatch.load_triton_wins`): the op wins on this GPU
when every planned case of what the engine would run it for was measured and its Triton kernel was at least
as fast as the composition in every one of them, in forward and in full mode -- so that ``auto`` never slows
the default path. For ``bn_gate_act`` those are the ``hard`` and ``soft`` variants on channels_last (GatedNorm's
calls: the engine fuses neither the activation nor the residual add, and auto takes the kernel for
channels_last activations only); ``fused`` is reported against its targets (>= 1.5x over the composition in
full mode, >= 60% of the copy bandwidth), NCHW for information; neither is part of the verdict.

Then, time permitting, a sweep of bn_gate_act's launch configuration (tile size, warps, programs per SM; the
module's ``_TILE``, ``_WARPS``, ``_PROGRAMS_PER_SM``) on three fused bf16 shapes, for tuning: ``bn_sweep``.

``--deadline-s`` bounds the run: no case starts past it, an op with unmeasured cases gets no win, and the JSON
is rewritten after every op. Exit status 0 when no case failed.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # gpu_check (slug), also when imported from elsewhere
from gpu_check import slug  # noqa: E402

RESULTS = BENCH / "results"
OPS = ("bn_gate_act", "dual_linear", "dual_conv")
MODES = ("forward", "full")
FUSED_SPEEDUP_TARGET = 1.5
BANDWIDTH_TARGET_PERCENT = 60.0
VERDICT_RULE = ("win = every planned case of the variants the engine runs (bn_gate_act: hard, soft; dual ops: all) "
                "measured, Triton at least as fast as the composition in each, forward and full mode")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# ResNet-50's BatchNorms, (channels, spatial side): CIFAR stem at 32 px, ImageNet stem at 224 px (56 .. 7)
RESNET50_32 = [(64, 32), (256, 32), (128, 16), (512, 16), (256, 8), (1024, 8), (512, 4), (2048, 4)]
RESNET50_56 = [(64, 56), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14), (512, 7), (2048, 7)]
NARROW = [(38, 32), (151, 32), (76, 16), (604, 8)]  # the hard path at ~35% FLOPs: widths about 0.6x
SUBSET = [(64, 32), (256, 56), (1024, 8), (151, 32)]  # fp16, fp32 and NCHW
BATCHES = (64, 256)
# bn_gate_act's launch configuration: (tile elements, warps) pairs (each a compile), programs per SM (grid only)
SWEEP_TILES = [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16)]
SWEEP_PROGRAMS_PER_SM = (2, 4, 8)
SWEEP_SHAPES = [(256, 64, 32, 32), (256, 256, 56, 56), (256, 2048, 4, 4)]


@dataclass
class Case:
    op: str
    variant: str
    shape: tuple
    dtype: str = "bf16"
    layout: str = "channels_last"  # of 4-D activations; "rows" for a linear layer's (M, K)
    decides: bool = True        # part of the op's verdict (set by plan())
    compiled: bool = False      # also timed against torch.compile of the composition
    kept: Optional[int] = None  # dual ops: kept output channels (conv) / kept inputs (linear), a prefix
    extra: dict = field(default_factory=dict)


def plan(smoke: bool) -> list[Case]:
    """Every case: first those the verdicts need (so that a run cut short by its deadline still decides),
    then the figures for the targets and the comparisons with torch.compile."""
    if smoke:
        cases = [Case("bn_gate_act", v, (2, 6, 3, 5)) for v in ("hard", "soft")]
        cases += [Case("dual_linear", "classifier", (4, 24, 5), layout="rows", kept=14),
                  Case("dual_conv", "stem", (2, 3, 6, 6, 8, 3, 1, 1), kept=5)]
        cases += [Case("bn_gate_act", v, (2, 6, 3, 5), compiled=True) for v in ("soft", "fused")]
        cases += [Case("bn_gate_act", "soft", (2, 6, 3, 5), dtype="fp32", layout="nchw")]
    else:
        resnet50 = [(n, c, side, side) for table in (RESNET50_32, RESNET50_56) for c, side in table for n in BATCHES]
        subset = [(256, c, side, side) for c, side in SUBSET]
        cases = [Case("bn_gate_act", v, shape) for shape in resnet50 for v in ("hard", "soft")]
        cases += [Case("bn_gate_act", "hard", (n, c, side, side)) for c, side in NARROW for n in BATCHES]
        cases += [Case("bn_gate_act", v, shape, dtype=d) for shape in subset for v in ("hard", "soft")
                  for d in ("fp16", "fp32")]
        cases += [Case("dual_linear", "classifier", (m, 2048, classes), layout="rows", kept=1229) for m in BATCHES
                  for classes in (10, 100, 1000)]
        cases.append(Case("dual_linear", "hidden", (256, 768, 768), layout="rows", kept=460))
        # (N, C_in, H, W, C_out, kernel, stride, padding)
        cases += [Case("dual_conv", "cifar-stem", (n, 3, 32, 32, 64, 3, 1, 1), kept=38) for n in BATCHES]
        cases.append(Case("dual_conv", "imagenet-stem", (64, 3, 224, 224, 64, 7, 2, 3), kept=38))
        # for the targets and against torch.compile (bf16, the largest batch)
        cases += [Case("bn_gate_act", "fused", shape, compiled=shape[0] == BATCHES[-1]) for shape in resnet50]
        cases += [Case("bn_gate_act", v, shape, compiled=True) for shape in resnet50 if shape[0] == BATCHES[-1]
                  for v in ("hard", "soft")]
        cases += [Case("bn_gate_act", "fused", shape, dtype=d) for shape in subset for d in ("fp16", "fp32")]
        cases += [Case("bn_gate_act", v, shape, layout="nchw") for shape in subset for v in ("hard", "soft", "fused")]
    for c in cases:
        # the engine fuses no residual, auto takes the kernel for channels_last only (s2hk.layers); the
        # torch.compile comparisons repeat deciding cases
        c.decides = c.variant != "fused" and c.layout != "nchw" and not c.compiled
    return cases


# ------------------------------------------------------------------------------------------ workloads
def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" and t.dim() == 4 else t


def bn_workload(case: Case, device: torch.device, compile_backend: Optional[str], compiled_cache: dict) -> dict:
    """``{"inputs", "bytes", "impls": {name: fn}}`` of one bn_gate_act case; each fn returns the output."""
    from s2hk.kernels.bn_gate_act import bn_gate_act

    dtype = DTYPES[case.dtype]
    n, c = case.shape[:2]
    x = _layout(torch.randn(case.shape, device=device, dtype=dtype), case.layout).requires_grad_()
    weight = (torch.rand(c, device=device) + 0.5).requires_grad_()
    bias = torch.randn(c, device=device, requires_grad=True)
    gate = torch.rand(c, device=device, requires_grad=True) if case.variant != "hard" else None
    residual = None
    if case.variant == "fused":
        residual = _layout(torch.randn(case.shape, device=device, dtype=dtype), case.layout).requires_grad_()
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    activation = "relu" if case.variant == "fused" else "identity"

    def triton_op():
        return bn_gate_act(x, weight, bias, rm, rv, gate=gate, residual=residual, activation=activation)

    def composition(x, weight, bias, gate, residual, rm, rv):  # GatedNorm's composition, + add and relu
        if gate is not None:
            weight, bias = weight * gate, bias * gate
        y = F.batch_norm(x, rm, rv, weight, bias, True, 0.1, 1e-5)
        return F.relu(y + residual) if residual is not None else y

    args = (x, weight, bias, gate, residual, rm, rv)
    impls = {"triton": triton_op, "torch": lambda: composition(*args)}
    if case.compiled and compile_backend:
        key = case.variant
        if key not in compiled_cache:
            compiled_cache[key] = torch.compile(composition, backend=compile_backend)
        impls["compiled"] = lambda: compiled_cache[key](*args)
    elements = x.numel() * x.element_size()
    fused = case.variant == "fused"
    forward = (2 + fused) * elements                 # x [, residual] read; y written
    backward = (3 + 2 * fused) * elements            # dy, x [, residual] read; dx [, dresidual] written
    inputs = [t for t in (x, weight, bias, gate, residual) if t is not None]
    return dict(inputs=inputs, impls=impls, bytes=dict(forward=forward, backward=backward, full=forward + backward))


def dual_linear_workload(case: Case, device: torch.device, *_) -> dict:
    from s2hk.kernels.dual_linear import dual_linear, dual_linear_reference

    m, k, n = case.shape
    dtype = DTYPES[case.dtype]
    gated = case.variant == "hidden"  # a classifier's logits carry no gate and keep every class
    x_soft = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    x_hard = torch.randn(m, case.kept, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5).requires_grad_()
    bias = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
    gate = torch.rand(n, device=device, dtype=dtype, requires_grad=True) if gated else None
    kept_out = case.kept if gated else None
    args = (x_soft, x_hard, weight, bias, gate, case.kept, kept_out)
    inputs = [t for t in (x_soft, x_hard, weight, bias, gate) if t is not None]
    flops = 2.0 * m * n * k + 2.0 * m * (case.kept if gated else n) * case.kept
    impls = {"triton": lambda: dual_linear(*args), "torch": lambda: dual_linear_reference(*args)}
    return dict(inputs=inputs, impls=impls, flops=dict(forward=flops, full=3 * flops))


def dual_conv_workload(case: Case, device: torch.device, *_) -> dict:
    from s2hk.kernels.dual_conv import dual_conv, dual_conv_reference

    n, c_in, h, w, c_out, k, stride, padding = case.shape
    dtype = DTYPES[case.dtype]
    x = _layout(torch.randn(n, c_in, h, w, device=device, dtype=dtype), case.layout)  # the image: no gradient
    weight = (torch.randn(c_out, c_in, k, k, device=device, dtype=dtype) / (c_in * k * k) ** 0.5).requires_grad_()
    bias = torch.randn(c_out, device=device, dtype=dtype, requires_grad=True)
    gate = torch.rand(c_out, device=device, dtype=dtype, requires_grad=True)
    args = (x, weight, bias, gate, case.kept, stride, padding)
    side = lambda s: (s + 2 * padding - k) // stride + 1  # noqa: E731
    flops = 2.0 * n * side(h) * side(w) * (c_out + case.kept) * c_in * k * k
    return dict(inputs=[weight, bias, gate], impls={"triton": lambda: dual_conv(*args),
                                                    "torch": lambda: dual_conv_reference(*args)},
                flops=dict(forward=flops, full=2 * flops))  # no input gradient: forward + weight gradient


WORKLOADS = {"bn_gate_act": bn_workload, "dual_linear": dual_linear_workload, "dual_conv": dual_conv_workload}


# ------------------------------------------------------------------------------------------ timing
def _outputs(out: Any) -> list:
    return [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o.requires_grad]


def step_fn(impl: Callable[[], Any], inputs: list, mode: str, upstream: dict) -> Callable[[], None]:
    """One call of ``impl`` in ``mode``: the forward, or the forward and the gradients of every input."""
    if mode == "forward":
        return impl

    def full() -> None:
        outs = _outputs(impl())
        if "dy" not in upstream:
            upstream["dy"] = [torch.randn_like(o) for o in outs]
        torch.autograd.grad(outs, inputs, upstream["dy"])
    return full


class Timer:
    """Seconds per call of a function: CUDA events around ``reps`` calls, or wall time on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any], reps: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / reps
        begin = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - begin) / reps


def time_interleaved(fns: dict[str, Callable[[], Any]], timer: Timer, rounds: int, block_s: float) -> dict:
    """Median seconds per call of each of ``fns``, timed in turn round by round; each round times enough calls
    to fill ``block_s`` (after two warm-up calls: compiles, autotuning, allocator)."""
    reps = {}
    for name, fn in fns.items():
        fn()
        reps[name] = max(1, min(200, int(block_s / max(timer(fn, 1), 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(timer(fn, reps[name]))
    return {name: statistics.median(v) for name, v in samples.items()}


def copy_bandwidth(device: torch.device, timer: Timer, smoke: bool) -> float:
    """Bytes per second of a large device-to-device copy (read + write), the best of several."""
    n = 2 ** 16 if smoke else 2 ** 29  # 1 GiB of bf16 each way
    src = torch.empty(n, device=device, dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(timer(lambda: dst.copy_(src), 1 if smoke else 10) for _ in range(1 if smoke else 5))
    return 2 * src.numel() * src.element_size() / best


def run_case(case: Case, device: torch.device, timer: Timer, args: argparse.Namespace, compiled: dict,
             bandwidth: float) -> dict:
    torch.manual_seed(0)
    work = WORKLOADS[case.op](case, device, args.compile_backend, compiled)
    record = {**asdict(case), "shape": list(case.shape), "ms": {}, "speedup": {}}
    for mode in MODES:
        upstream: dict = {}
        fns = {name: step_fn(fn, work["inputs"], mode, upstream) for name, fn in work["impls"].items()}
        record["ms"][mode] = {k: v * 1e3 for k, v in time_interleaved(fns, timer, args.rounds, args.block_s).items()}
    record["ms"]["backward"] = {k: record["ms"]["full"][k] - record["ms"]["forward"][k] for k in work["impls"]}
    for mode, ms in record["ms"].items():
        record["speedup"][mode] = {f"vs_{k}": ms[k] / ms["triton"] for k in ms if k != "triton" and ms["triton"] > 0}
    if "bytes" in work:
        record["gbps"] = {m: work["bytes"][m] / (record["ms"][m]["triton"] / 1e3) / 1e9
                          for m in ("forward", "backward", "full") if record["ms"][m]["triton"] > 0}
        record["percent_of_copy_bandwidth"] = {m: 100 * v * 1e9 / bandwidth for m, v in record["gbps"].items()}
    if "flops" in work:
        record["tflops"] = {m: work["flops"][m] / (record["ms"][m]["triton"] / 1e3) / 1e12 for m in MODES}
    return record


@contextlib.contextmanager
def launch_configuration(tile: int, warps: int, programs_per_sm: int) -> Iterator[None]:
    """bn_gate_act's streaming kernels launched with the given configuration inside the block."""
    from s2hk.kernels import bn_gate_act as module

    saved = module._TILE, module._WARPS, module._PROGRAMS_PER_SM
    module._TILE, module._WARPS, module._PROGRAMS_PER_SM = tile, warps, programs_per_sm
    try:
        yield
    finally:
        module._TILE, module._WARPS, module._PROGRAMS_PER_SM = saved


def sweep(device: torch.device, timer: Timer, args: argparse.Namespace, deadline: float,
          bandwidth: float) -> list[dict]:
    """Milliseconds of the fused bn_gate_act (forward, full) and its share of the copy bandwidth (full), per
    launch configuration and shape."""
    from s2hk.kernels import bn_gate_act as module

    out = []
    shapes = [(2, 6, 3, 5)] if args.smoke else SWEEP_SHAPES
    tiles = SWEEP_TILES[:1] if args.smoke else SWEEP_TILES
    for shape in shapes:
        work = bn_workload(Case("bn_gate_act", "fused", shape), device, None, {})
        for (tile, warps), per_sm in itertools.product(tiles, SWEEP_PROGRAMS_PER_SM):
            if time.monotonic() > deadline:
                return out
            if args.smoke:  # the interpreter's tile: the tests' sizes
                tile = module._TILE
            with launch_configuration(tile, warps, per_sm):
                ms = {}
                for mode in MODES:
                    fn = step_fn(work["impls"]["triton"], work["inputs"], mode, {})
                    ms[mode] = time_interleaved({"triton": fn}, timer, args.rounds, args.block_s)["triton"] * 1e3
            percent = 100 * work["bytes"]["full"] / (ms["full"] / 1e3) / bandwidth if ms["full"] > 0 else None
            out.append(dict(shape=list(shape), tile=tile, warps=warps, programs_per_sm=per_sm, ms=ms,
                            percent_of_copy_bandwidth_full=percent))
    return out


# ------------------------------------------------------------------------------------------ verdict
def verdicts(planned: list[Case], records: list[dict]) -> dict:
    """Per op: planned / measured deciding cases, the worst and geometric-mean speedup over the composition
    (forward and full mode), and whether it wins (see the module docstring)."""
    out = {}
    for op in OPS:
        deciding = [c for c in planned if c.op == op and c.decides]
        if not deciding:
            continue
        measured = [r for r in records if r["op"] == op and r["decides"] and "error" not in r]
        speedups = [r["speedup"][m]["vs_torch"] for r in measured for m in MODES]
        worst = min(speedups) if speedups else None
        out[op] = dict(planned=len(deciding), measured=len(measured), worst_speedup=worst,
                       geomean_speedup=math.exp(statistics.fmean(map(math.log, speedups))) if speedups else None,
                       win=len(measured) == len(deciding) and worst is not None and worst >= 1.0)
    return out


def targets(records: list[dict]) -> dict:
    """The fused bn_gate_act against its targets: speedup (full mode) and bandwidth, worst and median case."""
    fused = [r for r in records if r["op"] == "bn_gate_act" and r["variant"] == "fused" and "error" not in r]
    if not fused:
        return {}
    speedup = [r["speedup"]["full"]["vs_torch"] for r in fused]
    percent = [r["percent_of_copy_bandwidth"]["full"] for r in fused]
    return {"fused_speedup_full": dict(target=FUSED_SPEEDUP_TARGET, worst=min(speedup),
                                       median=statistics.median(speedup), met=min(speedup) >= FUSED_SPEEDUP_TARGET),
            "fused_percent_of_copy_bandwidth_full": dict(target=BANDWIDTH_TARGET_PERCENT, worst=min(percent),
                                                         median=statistics.median(percent),
                                                         met=min(percent) >= BANDWIDTH_TARGET_PERCENT)}


def summary_table(records: list[dict]) -> str:
    lines = [f"{'op':12s} {'variant':14s} {'dtype':5s} {'layout':13s} {'shape':22s} {'fwd x':>6s} {'full x':>6s} "
             f"{'vs compile':>10s} {'%bw':>5s}"]
    for r in records:
        if "error" in r:
            lines.append(f"{r['op']:12s} {r['variant']:14s} ERROR {r['error'].splitlines()[-1][:80]}")
            continue
        s = r["speedup"]
        comp = s["full"].get("vs_compiled")
        bw = r.get("percent_of_copy_bandwidth", {}).get("full")
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['op']:12s} {r['variant']:14s} {r['dtype']:5s} {r['layout']:13s} {shape:22s} "
                     f"{s['forward']['vs_torch']:6.2f} {s['full']['vs_torch']:6.2f} "
                     f"{'' if comp is None else f'{comp:.2f}':>10s} {'' if bw is None else f'{bw:.0f}':>5s}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one round of one call (CI)")
    parser.add_argument("--json", type=Path, default=None,
                        help="output file (default bench/results/kernels-<device>.json; required with --smoke)")
    parser.add_argument("--deadline-s", type=float, default=420.0, help="start no case after this many seconds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per case and mode (default 7)")
    parser.add_argument("--block-s", type=float, default=None,
                        help="seconds of calls per round and implementation (default 0.004)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the compiled composition (default inductor; aot_eager with "
                             "--smoke); 'none' skips it")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    args = parser.parse_args(argv)
    if args.smoke and args.json is None:
        parser.error("--smoke needs --json (smoke figures never go to bench/results)")
    args.rounds = args.rounds or (1 if args.smoke else 7)
    args.block_s = args.block_s if args.block_s is not None else (0.0 if args.smoke else 0.004)
    backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    args.compile_backend = None if backend == "none" else backend
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    if not torch.cuda.is_available():  # the kernels then run on CPU tensors, under Triton's interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from s2hk.benchmarking import device_name, machine_description, utc_now

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = device_name(device)
    path = args.json or RESULTS / f"kernels-{slug(name)}.json"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as GPU training runs: cuDNN's fastest algorithm per shape
    timer = Timer(device)
    bandwidth = copy_bandwidth(device, timer, args.smoke)
    planned = [c for c in plan(args.smoke) if c.op in args.ops]
    record: dict = {"script": "bench/kernels_gpu.py", "argv": sys.argv[1:] if argv is None else list(argv),
                    "date_utc": utc_now(), "device": name, "machine": machine_description(), "smoke": args.smoke,
                    "copy_bandwidth_gbps": bandwidth / 1e9, "verdict_rule": VERDICT_RULE, "wins": [],
                    "verdicts": {}, "targets": {}, "cases": [], "skipped_for_deadline": 0, "bn_sweep": []}

    def save() -> None:
        record["verdicts"] = verdicts(planned, record["cases"])
        record["wins"] = sorted(op for op, v in record["verdicts"].items() if v["win"])
        record["targets"] = targets(record["cases"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")

    compiled: dict = {}
    failed = 0
    for i, case in enumerate(planned):
        if time.monotonic() - start > args.deadline_s:
            record["skipped_for_deadline"] = len(planned) - i
            break
        try:
            record["cases"].append(run_case(case, device, timer, args, compiled, bandwidth))
        except Exception:  # one failing case (out of memory, a compile error) must not lose the others
            failed += 1
            record["cases"].append({**asdict(case), "shape": list(case.shape), "error": traceback.format_exc()})
        if i + 1 == len(planned) or planned[i + 1].op != case.op:
            save()
    if "bn_gate_act" in args.ops:
        try:
            record["bn_sweep"] = sweep(device, timer, args, start + args.deadline_s, bandwidth)
        except Exception:
            failed += 1
            record["bn_sweep_error"] = traceback.format_exc()
    save()
    print(summary_table(record["cases"]))
    for shape in {tuple(r["shape"]) for r in record["bn_sweep"]}:
        best = min((r for r in record["bn_sweep"] if tuple(r["shape"]) == shape), key=lambda r: r["ms"]["full"])
        print(f"bn_gate_act fused {'x'.join(map(str, shape))}: fastest full step with tile {best['tile']}, "
              f"{best['warps']} warps, {best['programs_per_sm']} programs/SM: {best['ms']['full']:.3f} ms")
    print(json.dumps({"device": name, "copy_bandwidth_gbps": round(bandwidth / 1e9), "wins": record["wins"],
                      "verdicts": record["verdicts"], "targets": record["targets"],
                      "skipped_for_deadline": record["skipped_for_deadline"], "json": str(path)}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
