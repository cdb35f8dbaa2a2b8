"""How well s2hk.latency.LatencyModel predicts the latency of exported pruned networks.

For each model: build the latency model (fresh, no cache; its build time is reported), draw random architectures
(every prunable group at a width drawn uniformly from its grid; seeded), export each and time it, and compare:

- absolute error: predicted seconds vs the measured seconds of the export;
- ratio error: predicted latency / predicted dense vs measured latency / dense measured in the same rounds (what
  a latency regulariser or budget uses, and robust to a machine whose speed drifts between the build and now);
- the FLOPs baseline: dense latency x FLOPs ratio, the estimate a FLOPs budget implies.

The exports (and the dense one) are timed in rounds, one call of each per round, and their median kept, so that a
change in the machine's load affects them alike. Results go to bench/results/latency_accuracy_<tag>.{json,md}.

    python bench/latency_accuracy.py                       # resnet56 and mobilenet_v3_small, CPU, batch 64
    python bench/latency_accuracy.py --allocator caching   # glibc keeps freed memory mapped (see --help)
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from s2hk import models  # noqa: E402
from s2hk.benchmarking import machine_description, utc_now  # noqa: E402
from s2hk.engine import TwoPathNetwork  # noqa: E402
from s2hk.latency import LatencyModel, export_at  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def keep_freed_memory_mapped() -> None:
    """glibc: never return freed memory to the system nor serve large blocks by fresh mappings, as caching
    allocators (jemalloc, tcmalloc, PyTorch's CUDA allocator) do. Freshly mapped memory costs a page fault per
    4 KiB page on first touch -- about 3 us on this virtual machine, where it made up a third of resnet56's
    time -- and how much of it a forward meets depends on the allocator's state more than on the network."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30)):
        raise RuntimeError("mallopt refused the thresholds")


def random_widths(net: TwoPathNetwork, rng: random.Random) -> list[int]:
    """All groups' widths, every prunable group at a width drawn uniformly from its grid."""
    widths = [g.channels for g in net.groups]
    for g, d in zip(net.prunable, net.gate_layout.granularities):
        widths[g.index] = rng.choice(range(d, g.channels + 1, d))
    return widths


def run_model(name: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model = models.get_model(name, num_classes=10)
    net = TwoPathNetwork(model, torch.randn(1, 3, args.image_size, args.image_size))
    start = time.perf_counter()
    latency = LatencyModel.build(net, torch.randn(args.batch_size, 3, args.image_size, args.image_size),
                                 num_threads=args.threads, clock=args.clock, budget_s=args.budget, cache=False,
                                 progress=not args.no_progress)
    build_s = time.perf_counter() - start
    rng = random.Random(args.seed)
    full = [g.channels for g in net.groups]
    archs = [full] + [random_widths(net, rng) for _ in range(args.archs)]
    exports = [export_at(net, w) for w in archs]
    samples: list[list[float]] = [[] for _ in archs]
    for _ in range(args.rounds):
        for i, module in enumerate(exports):
            samples[i].append(latency.measure(module))
    measured = [statistics.median(s) for s in samples]
    dense = measured[0]
    poly = net.flops_polynomial
    rows = []
    for widths, seconds, timed in zip(archs[1:], measured[1:], samples[1:]):
        predicted = latency.predict(widths)
        flops = poly.flops_at(widths) / poly.dense_flops
        ratio_pred, ratio_meas = predicted / latency.dense_latency, seconds / dense
        rows.append({"flops_ratio": flops, "predicted_s": predicted, "measured_s": seconds, "rounds_s": timed,
                     "error": (predicted - seconds) / seconds,
                     "predicted_ratio": ratio_pred, "measured_ratio": ratio_meas,
                     "ratio_error": (ratio_pred - ratio_meas) / ratio_meas,
                     "flops_baseline_error": (dense * flops - seconds) / seconds,
                     "widths": {g.name: widths[g.index] for g in net.prunable}})

    def mape(key: str) -> float:
        return 100 * statistics.fmean(abs(r[key]) for r in rows)

    meta = latency.metadata
    return {
        "model": name, "build_s": build_s, "grid": meta["grid"], "grid_reduced": meta["grid_reduced"],
        "points": meta["points"], "tables": meta["tables"], "timer_calls": meta["timer_calls"],
        "coefficients": latency.coefficients, "dense_latency_at_build_s": latency.dense_latency,
        "dense_measured_s": dense, "dense_rounds_s": samples[0], "mape": mape("error"),
        "ratio_mape": mape("ratio_error"),
        "flops_baseline_mape": mape("flops_baseline_error"), "architectures": rows,
    }


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Latency model accuracy: {s['device']}, batch {s['batch_size']}, {s['threads']} thread(s), "
             f"clock {s['clock']}, allocator {s['allocator']}", "",
             f"Machine: {result['machine']['cpu']} ({result['machine']['logical_cpus']} logical CPUs), "
             f"torch {result['machine']['torch']}; {result['date']}. Load average {result['load_before']} before, "
             f"{result['load_after']} after (the cores were shared with other jobs: timings are noisy).", "",
             "MAPE: mean absolute percentage error of the predicted latency against the measured one; ratio: of the "
             "latency relative to dense (each measured in the same rounds); FLOPs baseline: dense latency x FLOPs "
             f"ratio. {s['archs']} random architectures per model (seed {s['seed']}), fp32 inference, exports timed "
             f"in {s['rounds']} rounds. Build: the whole LatencyModel.build (dense export, tables, calibration), "
             "no cache.", "",
             "Clock 'cpu' is the process's CPU time: on cores shared with other jobs it leaves out the time spent "
             "waiting for a core (not the slowdown from sharing caches and memory bandwidth). Allocator 'default' is "
             "glibc as it comes; 'caching' keeps freed memory mapped (mallopt), as jemalloc or tcmalloc do, so no "
             "forward pays page faults for fresh memory (about 3 us per 4 KiB page on this virtual machine).", "",
             "| model | build (s) | grid | points | MAPE | ratio MAPE | FLOPs-baseline MAPE | dense (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["models"]:
        lines.append(f"| {r['model']} | {r['build_s']:.1f} | {r['grid']}{' (reduced)' if r['grid_reduced'] else ''}"
                     f" | {r['points']} | {r['mape']:.1f}% | {r['ratio_mape']:.1f}% | {r['flops_baseline_mape']:.1f}%"
                     f" | {r['dense_measured_s']:.4f} |")
    for r in result["models"]:
        coef = ", ".join(f"{k} {v:.3g}" for k, v in r["coefficients"].items())
        lines += ["", f"## {r['model']}", "", f"Fit: {coef}. Dense {r['dense_latency_at_build_s']:.4f} s at build, "
                  f"{r['dense_measured_s']:.4f} s in the rounds.", "",
                  "| # | FLOPs | predicted (s) | measured (s) | error | predicted ratio | measured ratio |"
                  " ratio error | FLOPs-baseline error |", "|---|---|---|---|---|---|---|---|---|"]
        for i, a in enumerate(r["architectures"]):
            lines.append(f"| {i} | {a['flops_ratio']:.3f} | {a['predicted_s']:.4f} | {a['measured_s']:.4f} | "
                         f"{100 * a['error']:+.1f}% | {a['predicted_ratio']:.3f} | {a['measured_ratio']:.3f} | "
                         f"{100 * a['ratio_error']:+.1f}% | {100 * a['flops_baseline_error']:+.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet56", "mobilenet_v3_small"])
    p.add_argument("--archs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["wall", "cpu"], default="cpu",
                   help="cpu: the process's CPU time, which leaves out waiting for a core on a shared machine")
    p.add_argument("--allocator", choices=["default", "caching"], default="default",
                   help="caching: glibc keeps freed memory mapped (see keep_freed_memory_mapped)")
    p.add_argument("--budget", type=float, default=None, help="profiling budget in seconds (default: the model's)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tag", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.allocator == "caching":
        keep_freed_memory_mapped()
    torch.set_num_threads(args.threads)
    load_before = [round(v, 2) for v in os.getloadavg()]
    results = [run_model(name, args) for name in args.models]
    result = {"date": utc_now(), "machine": machine_description(), "load_before": load_before,
              "load_after": [round(v, 2) for v in os.getloadavg()],
              "settings": {"device": "cpu", "batch_size": args.batch_size, "image_size": args.image_size,
                           "threads": args.threads, "clock": args.clock, "allocator": args.allocator,
                           "dtype": "float32", "mode": "inference", "archs": args.archs, "seed": args.seed,
                           "rounds": args.rounds, "budget_s": args.budget},
              "models": results}
    tag = args.tag or f"cpu-{args.threads}thread-{args.clock}clock-{args.allocator}alloc"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"latency_accuracy_{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"latency_accuracy_{tag}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
