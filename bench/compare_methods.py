"""STP vs S2HPruner vs uniform L1 pruning on the embedded digits dataset: same FLOPs target, same epochs.

    python bench/compare_methods.py --seeds 0 1 2 --epochs 10 --target 0.35 --model small_cnn \\
        --out bench/results/compare_methods_digits.json
    python bench/compare_methods.py --model resnet56 --image-size 16 ...   # any shipped model

For every seed, every method starts from the *same* initial weights (the model built after
``torch.manual_seed(seed)``), sees the same training batches (``make_loaders("digits", seed=seed)``: order and
augmentation are a function of the seed) and is evaluated on the same held-out split (digits' fixed stratified
20% validation split, ``split_seed=0``, 359 images). Each method is driven by :class:`s2hk.trainer.Trainer`
exactly as ``s2hk prune`` drives it (SGD, nesterov, cosine schedule over all steps, BN recalibration of the
hard path before every evaluation), then exported; recorded per method and seed:

- ``hard_acc``: top-1 accuracy of the **exported** (physically pruned) model on the validation split;
- ``flops_ratio``: ``s2hk.flops.count_flops(exported) / count_flops(dense model)`` at ``1 x 3 x S x S``;
- ``wall_seconds``: pruner construction + training (with its per-epoch evaluations) + export.

Methods and settings (each method's public API with its defaults, except):

- all: ``lr`` 0.05, weight decay 5e-4, batch 64, 20 recalibration batches (``s2hk prune``'s defaults; the
  Trainer's own default lr is 0.1);
- ``s2h`` (:class:`s2hk.S2HPruner`): ``target_flops``; ``warmup_epochs`` = ``--warmup-epochs`` (default
  ``round(0.2 * epochs)``, i.e. ``s2hk prune``'s 2 for 10-12 epochs), ``joint_epochs`` = the rest;
- ``stp`` (:class:`s2hk.STPruner`): ``target_flops``, ``total_epochs`` = epochs, ``warmup_epochs`` as s2h,
  ``seed`` = the run's seed (STP's own generator; its default is 0 for every run);
- ``uniform_l1`` (:class:`s2hk.baselines.UniformL1Pruner`): dense training for ``round(dense_fraction *
  epochs)`` epochs (``--dense-fraction``, default 0.5), pruning every group to one keep-ratio by filter L1
  norm (widths nearest the target in exact FLOPs), CE fine-tuning of the narrow network for the rest;
- ``crsfp`` (optional, :class:`s2hk.CRSFPruner`): it has no FLOPs target; ``prune_rate`` = ``1 - r`` with ``r``
  the uniform keep-ratio of the target (so its FLOPs land near it), two-view training batches (its API).

Writes ``--out`` (JSON: settings, machine, every run, summary) after every run, and the markdown table
(mean +- sample std over seeds) next to it (same name, ``.md``).
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

import s2hk  # noqa: E402
from s2hk.baselines import UniformL1Pruner, uniform_l1_plan  # noqa: E402
from s2hk.benchmarking import git_commit, machine_description  # noqa: E402
from s2hk.data import make_loaders  # noqa: E402
from s2hk.flops import count_flops  # noqa: E402
from s2hk.trainer import TrainConfig, Trainer  # noqa: E402

METHODS = ("s2h", "stp", "uniform_l1", "crsfp")
DEFAULT_METHODS = ("s2h", "stp", "uniform_l1")
DATASET = "digits"
NUM_CLASSES = 10  # digits


# ================================================================================================ models

def small_cnn(num_classes: int = 10) -> nn.Sequential:
    """The 4-conv CNN of tests/test_convergence.py (known to reach > 90% on digits 8x8 in 10 epochs)."""
    def block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 64, 2), *block(64, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))


def build_model(name: str, num_classes: int) -> nn.Module:
    """``small_cnn`` or a shipped model (``s2hk.models.list_models()``)."""
    if name == "small_cnn":
        return small_cnn(num_classes)
    return s2hk.models.get_model(name, num_classes=num_classes)


# ================================================================================================ settings

def default_warmup(epochs: int) -> int:
    """Dense warm-up epochs of s2h and stp: ``round(0.2 * epochs)`` (half up)."""
    return int(math.floor(0.2 * epochs + 0.5))


def method_settings(method: str, args: argparse.Namespace, seed: int, keep_ratio: float) -> dict:
    """The constructor keyword arguments of ``method`` that differ from its defaults (recorded in the JSON)."""
    warmup = args.warmup_epochs if args.warmup_epochs is not None else default_warmup(args.epochs)
    if method == "s2h":
        return {"target_flops": args.target, "warmup_epochs": warmup, "joint_epochs": args.epochs - warmup,
                "hard_epochs": 0}
    if method == "stp":
        return {"target_flops": args.target, "total_epochs": args.epochs, "warmup_epochs": warmup, "hard_epochs": 0,
                "seed": seed}
    if method == "uniform_l1":
        return {"target_flops": args.target, "epochs": args.epochs, "dense_fraction": args.dense_fraction}
    if method == "crsfp":
        return {"prune_rate": round(1.0 - keep_ratio, 6)}
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")


def build_pruner(method: str, model: nn.Module, example: torch.Tensor, settings: dict) -> nn.Module:
    """The method's pruner around ``model`` (public constructors only)."""
    if method == "s2h":
        return s2hk.S2HPruner(model, example, **settings)
    if method == "stp":
        return s2hk.STPruner(model, example, **settings)
    if method == "uniform_l1":
        return UniformL1Pruner(model, example, **settings)
    if method == "crsfp":
        return s2hk.CRSFPruner(model, example, **settings)
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")


# ================================================================================================ one run

@torch.inference_mode()
def accuracy(model: nn.Module, loader: Any) -> float:
    """Top-1 accuracy of ``model`` (eval mode) over ``loader``."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        x = x[0] if isinstance(x, (tuple, list)) else x
        correct += int((model(x).argmax(-1) == y).sum())
        total += int(y.numel())
    return correct / max(total, 1)


def run_one(method: str, seed: int, init_state: dict, args: argparse.Namespace, keep_ratio: float,
            dense_flops: int) -> dict:
    """Train ``method`` from ``init_state`` with ``seed``'s data order; the exported model's numbers."""
    train, val = make_loaders(DATASET, batch_size=args.batch_size, image_size=args.image_size, seed=seed,
                              two_views=(method == "crsfp"))
    model = build_model(args.model, train.num_classes)
    model.load_state_dict(init_state)
    example = torch.zeros(1, train.info.channels, args.image_size, args.image_size)
    settings = method_settings(method, args, seed, keep_ratio)
    torch.manual_seed(seed)
    started = time.perf_counter()
    pruner = build_pruner(method, model, example, settings)
    config = TrainConfig(lr=args.lr, weight_decay=args.weight_decay, progress=False,
                         max_steps_per_epoch=args.max_steps_per_epoch, recalibrate_batches=args.recalibrate_batches)
    trainer = Trainer(pruner, train, val, epochs=args.epochs, config=config)
    final = trainer.fit(resume=False)
    exported = pruner.export()
    wall = time.perf_counter() - started
    record = {
        "method": method, "seed": seed, "settings": settings,
        "hard_acc": accuracy(exported, val),
        "flops_ratio": count_flops(exported, example) / dense_flops,
        "wall_seconds": wall,
        "trainer_hard_acc": final.get("hard_acc"), "trainer_soft_acc": final.get("soft_acc"),
        "trainer_hard_flops_ratio": final.get("hard_flops_ratio"),
        "widths": pruner.hard_widths(),
        "steps": trainer.step, "val_images": val.num_samples,
        "history": [{k: v for k, v in h.items() if isinstance(v, (int, float, str))} for h in trainer.history],
    }
    if hasattr(pruner, "best_depths"):  # STP: blocks kept per stage of skippable residual blocks
        record["depths"] = pruner.best_depths()
        record["full_depths"] = [stage.depth for stage in pruner.stages]
    plan = getattr(pruner, "uniform_plan", None)
    if plan is not None:
        record["uniform_keep_ratio"] = plan.keep_ratio
        record["uniform_plan_flops_ratio"] = plan.flops_ratio
    return record


# ================================================================================================ summary / output

def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict], methods: Sequence[str]) -> dict:
    """Per method: n, and mean / sample std (0 for one seed) of hard_acc, flops_ratio, wall_seconds."""
    out = {}
    for method in methods:
        rows = [r for r in runs if r["method"] == method]
        if not rows:
            continue
        entry: dict[str, Any] = {"n": len(rows), "seeds": [r["seed"] for r in rows]}
        for key in ("hard_acc", "flops_ratio", "wall_seconds"):
            entry[f"{key}_mean"], entry[f"{key}_std"] = _mean_std([r[key] for r in rows])
        out[method] = entry
    return out


def machine_info() -> dict:
    info = machine_description()
    info["intra_op_threads"] = torch.get_num_threads()
    try:
        info["load_average_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def markdown(data: dict) -> str:
    """The results as markdown: summary table (mean +- std over seeds), per-seed table, settings."""
    s, m = data["settings"], data["machine"]
    lines = [f"# {', '.join(s['methods'])} on {DATASET} ({s['model']}, {s['image_size']}x{s['image_size']}), "
             f"FLOPs target {s['target']:.2f}, {s['epochs']} epochs",
             "",
             f"Machine: {m.get('cpu')}, {m.get('logical_cpus')} logical CPUs, {m.get('intra_op_threads')} intra-op "
             f"thread(s), torch {m.get('torch')}; {data.get('started')} - {data.get('finished') or 'unfinished'}; "
             f"commit {data.get('git_commit') or '?'}",
             "",
             f"Hard accuracy: the exported model on the held-out split ({data.get('val_images', '?')} images, the same "
             "for every run). FLOPs ratio: count_flops(exported) / count_flops(dense). Mean +- sample std over "
             "seeds " + ", ".join(str(x) for x in s["seeds"]) + ".",
             "",
             "| method | seeds | hard acc (%) | FLOPs ratio | wall time (s) |",
             "|---|---:|---:|---:|---:|"]
    for method, e in data["summary"].items():
        lines.append(f"| {method} | {e['n']} | {100 * e['hard_acc_mean']:.2f} ± {100 * e['hard_acc_std']:.2f} | "
                     f"{e['flops_ratio_mean']:.4f} ± {e['flops_ratio_std']:.4f} | "
                     f"{e['wall_seconds_mean']:.1f} ± {e['wall_seconds_std']:.1f} |")
    lines += ["", "Per run:", "", "| method | seed | hard acc (%) | FLOPs ratio | wall time (s) |",
              "|---|---:|---:|---:|---:|"]
    for r in data["runs"]:
        lines.append(f"| {r['method']} | {r['seed']} | {100 * r['hard_acc']:.2f} | {r['flops_ratio']:.4f} | "
                     f"{r['wall_seconds']:.1f} |")
    lines += ["", "Settings that differ from each method's defaults:", ""]
    for method, note in data["method_notes"].items():
        lines.append(f"- {method}: {note}")
    common = {k: s[k] for k in ("batch_size", "lr", "weight_decay", "recalibrate_batches", "max_steps_per_epoch")}
    lines += [f"- all: {json.dumps(common)} (SGD nesterov, momentum 0.9, cosine schedule over all steps)", ""]
    return "\n".join(lines)


def method_notes(args: argparse.Namespace) -> dict:
    warmup = args.warmup_epochs if args.warmup_epochs is not None else default_warmup(args.epochs)
    dense = int(math.floor(args.dense_fraction * args.epochs + 0.5))
    notes = {
        "s2h": f"S2HPruner, target_flops={args.target}, warmup_epochs={warmup}, joint_epochs={args.epochs - warmup}",
        "stp": f"STPruner, target_flops={args.target}, total_epochs={args.epochs}, warmup_epochs={warmup}, "
               "seed=run seed",
        "uniform_l1": f"UniformL1Pruner, target_flops={args.target}: {dense} dense epochs, prune (uniform keep-ratio, "
                      f"filter L1), {args.epochs - dense} fine-tuning epochs of the narrow network",
        "crsfp": "CRSFPruner, prune_rate = 1 - uniform keep-ratio at the target; two-view training batches",
    }
    return {m: notes[m] for m in args.methods}


def write(data: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(data))


# ================================================================================================ main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--target", type=float, default=0.35, help="remaining-FLOPs target (pruned / dense)")
    p.add_argument("--model", default="small_cnn", help="small_cnn or a shipped model (resnet56, ...)")
    p.add_argument("--image-size", type=int, default=None, help="default: 8 for small_cnn, 16 otherwise")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help="dense warm-up epochs of s2h and stp (default: round(0.2 * epochs))")
    p.add_argument("--dense-fraction", type=float, default=0.5,
                   help="uniform_l1: fraction of the epochs trained dense before pruning")
    p.add_argument("--recalibrate-batches", type=int, default=20)
    p.add_argument("--max-steps-per-epoch", type=int, default=0, help="cap steps per epoch (smoke runs; 0: all)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--out", default="bench/results/compare_methods_digits.json")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.image_size is None:
        args.image_size = 8 if args.model == "small_cnn" else 16
    warmup = args.warmup_epochs if args.warmup_epochs is not None else default_warmup(args.epochs)
    if args.epochs < 1 or not 0 <= warmup < args.epochs or not 0.0 < args.target <= 1.0 \
            or not 0.0 <= args.dense_fraction <= 1.0:
        raise SystemExit("need epochs >= 1, 0 <= warmup-epochs < epochs, 0 < target <= 1, 0 <= dense-fraction <= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    example = torch.zeros(1, 3, args.image_size, args.image_size)
    dense_flops = count_flops(build_model(args.model, NUM_CLASSES), example)
    # the uniform keep-ratio of the target (crsfp's prune rate); it depends on the architecture only
    keep_ratio = uniform_l1_plan(s2hk.TwoPathNetwork(build_model(args.model, NUM_CLASSES), example), args.target).keep_ratio
    settings = {k: v for k, v in vars(args).items() if k not in ("quiet",)}
    settings["warmup_epochs"] = warmup
    settings["dataset"] = DATASET
    data: dict[str, Any] = {
        "settings": settings, "machine": machine_info(), "git_commit": git_commit(ROOT),
        "started": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "finished": None,
        "dense_flops": dense_flops, "method_notes": method_notes(args), "runs": [], "summary": {},
    }
    for seed in args.seeds:
        torch.manual_seed(seed)
        init_state = copy.deepcopy(build_model(args.model, NUM_CLASSES).state_dict())
        for method in args.methods:
            record = run_one(method, seed, init_state, args, keep_ratio, dense_flops)
            data["runs"].append(record)
            data["val_images"] = record["val_images"]
            data["summary"] = summarize(data["runs"], args.methods)
            write(data, out)
            if not args.quiet:
                print(f"seed {seed} {method:>10}: hard acc {100 * record['hard_acc']:.2f}%, FLOPs ratio "
                      f"{record['flops_ratio']:.4f} (target {args.target}), {record['wall_seconds']:.1f} s",
                      file=sys.stderr, flush=True)
    data["finished"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    data["machine"]["load_average_1min_end"] = machine_info().get("load_average_1min")
    write(data, out)
    if not args.quiet:
        print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
