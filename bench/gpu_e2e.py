"""GPU end-to-end throughput of S2HPruner's ``train_step``: images/s, achieved TFLOP/s, percent of measured peak.

Run (needs a CUDA device; exits with a message otherwise):

    python bench/gpu_e2e.py                                   # resnet50 at 32x32 and 224x224
    python bench/gpu_e2e.py --sizes 224 --batch-sizes 128 --json bench/results/gpu_e2e_h100.json

For each image size: resnet50 (CIFAR stem at 32x32, ImageNet stem at 224x224), bf16 autocast, channels_last,
cuDNN autotuning, the hard network pinned at the FLOPs target by uniform scaling
(:func:`s2hk.benchmarking.uniform_widths`). Timed in turn, round by round: the s2hk step, a dense step of
the same model and batch, a step of the exported narrow model and an input-gradient-only backward
(the performance model's floor is the sum of the last three; DESIGN.md, "Performance model").

Achieved TFLOP/s counts the work the performance model assigns to each step: ``(4 + 3r) F`` per image for the
s2hk step (soft forward + backward 3F, hard forward + backward 3rF, mask-only backward F) and ``3F`` for the
dense step, with ``F`` the dense forward FLOPs (2 x MACs) of one image and ``r`` the hard network's FLOPs
ratio. The peak is measured, not looked up: the best rate of large bf16 matmuls (8192^3, 16384^3) on the
device. Targets: the s2hk step within 10% of the floor; percent of peak as high as the dense step's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch


def measure_bf16_peak(sizes=(8192, 16384), iters: int = 20) -> dict:
    """Best TFLOP/s of ``a @ b`` for square bf16 matrices (CUDA events, after warm-up)."""
    best = {"tflops": 0.0, "n": None}
    for n in sizes:
        try:
            a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
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
        seconds = start.elapsed_time(end) / 1e3 / iters
        tflops = 2.0 * n ** 3 / seconds / 1e12
        if tflops > best["tflops"]:
            best = {"tflops": tflops, "n": n}
        del a, b
        torch.cuda.empty_cache()
    return best


def autocast(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    def run() -> Any:
        with torch.autocast(device, dtype=torch.bfloat16):
            return fn()
    return run


def run_size(model_name: str, image_size: int, batch_size: int, target: float, repeats: int, warmup: int,
             peak_tflops: float, device: str = "cuda") -> dict:
    """Time the four calls for one image size; ``device`` is "cuda" (``main`` runs nothing else)."""
    from s2hk import S2HPruner
    from s2hk.benchmarking import (dense_step, input_grad_backward, narrow_step, s2hk_step, time_interleaved,
                                   uniform_widths)
    from s2hk.models import get_model

    torch.manual_seed(0)
    cl = torch.channels_last
    stem = "cifar" if image_size <= 64 else "imagenet"
    num_classes = 10 if image_size <= 64 else 1000
    kwargs = {"stem": stem} if model_name.startswith("resnet") and model_name != "resnet56" else {}

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return get_model(model_name, num_classes=num_classes, **kwargs).to(device).to(memory_format=cl).train()

    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=cl)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    dense = build()
    pruner = S2HPruner(build(), x[:1], target_flops=target).train()
    pruner.set_hard_widths(uniform_widths(pruner, target))
    flops_image = pruner.flops("full")
    r = pruner.flops("hard") / flops_image
    narrow = pruner.export().to(memory_format=cl).train()

    def sgd(params) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)

    fns = {"s2hk": autocast(s2hk_step(pruner, x, y, sgd(pruner.weight_parameters())), device),
           "dense": autocast(dense_step(dense, x, y, sgd(dense.parameters())), device),
           "narrow": autocast(narrow_step(narrow, x, y, sgd(narrow.parameters())), device),
           "input_grad": autocast(input_grad_backward(dense, x), device)}
    on_gpu = device == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    times = time_interleaved(fns, repeats=repeats, warmup=warmup)
    floor = times["dense"] + times["narrow"] + times["input_grad"]
    s2hk_flops = (4 + 3 * r) * flops_image * batch_size
    dense_flops = 3 * flops_image * batch_size
    s2hk_tflops = s2hk_flops / times["s2hk"] / 1e12
    dense_tflops = dense_flops / times["dense"] / 1e12
    return {
        "model": model_name, "stem": stem, "image_size": image_size, "batch_size": batch_size,
        "target_flops": target, "hard_flops_ratio": r, "dense_forward_flops_per_image": flops_image,
        "precision": "bf16 autocast", "memory_format": "channels_last",
        "s2hk_step_s": times["s2hk"], "dense_step_s": times["dense"], "narrow_step_s": times["narrow"],
        "input_grad_backward_s": times["input_grad"], "floor_s": floor,
        "s2hk_images_per_s": batch_size / times["s2hk"], "dense_images_per_s": batch_size / times["dense"],
        "s2hk_tflops": s2hk_tflops, "dense_tflops": dense_tflops,
        "s2hk_percent_of_peak": 100 * s2hk_tflops / peak_tflops,
        "dense_percent_of_peak": 100 * dense_tflops / peak_tflops,
        "s2hk_over_dense": times["s2hk"] / times["dense"], "floor_over_dense": floor / times["dense"],
        "s2hk_over_floor": times["s2hk"] / floor, "meets_target": times["s2hk"] <= 1.10 * floor,
        "max_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if on_gpu else None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224], help="image sizes")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="one per size (default: 256 at <= 64 px, 128 above)")
    parser.add_argument("--target-flops", type=float, default=0.35)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench/gpu_e2e.py measures GPU throughput and needs a CUDA device, but torch.cuda.is_available() "
              f"is False here (torch {torch.__version__}). Run it on a machine with an NVIDIA GPU and a CUDA build "
              "of torch; the CPU benchmarks are `pytest bench/`.", file=sys.stderr)
        return 2
    batch_sizes = args.batch_sizes or [256 if s <= 64 else 128 for s in args.sizes]
    if len(batch_sizes) != len(args.sizes):
        parser.error("give one --batch-sizes value per --sizes value")

    from s2hk.benchmarking import machine_description

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    peak = measure_bf16_peak()
    print(f"{torch.cuda.get_device_name()}: measured bf16 matmul peak {peak['tflops']:.1f} TFLOP/s "
          f"(n={peak['n']})", flush=True)
    results = []
    for size, batch in zip(args.sizes, batch_sizes):
        res = run_size(args.model, size, batch, args.target_flops, args.repeats, args.warmup, peak["tflops"])
        results.append(res)
        print(f"{args.model} {size}x{size} batch {batch} r={res['hard_flops_ratio']:.3f}: "
              f"s2hk {res['s2hk_images_per_s']:.0f} img/s, {res['s2hk_tflops']:.1f} TFLOP/s "
              f"({res['s2hk_percent_of_peak']:.1f}% of peak); dense {res['dense_images_per_s']:.0f} img/s, "
              f"{res['dense_tflops']:.1f} TFLOP/s ({res['dense_percent_of_peak']:.1f}%); "
              f"s2hk/dense {res['s2hk_over_dense']:.2f}, floor/dense {res['floor_over_dense']:.2f}, "
              f"s2hk/floor {res['s2hk_over_floor']:.2f}", flush=True)
    out = {"machine": machine_description(), "bf16_peak": peak, "results": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
