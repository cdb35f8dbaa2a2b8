"""S2HPruner's mask optimiser settings on the embedded job: does every run end in the target band, and smoothly?

    # screening: one seed at the hard target, appended run by run
    OMP_NUM_THREADS=1 nice -n 10 python bench/mask_optimiser.py --append --candidates plain-lr20 m0.9n-lr1 \\
        --targets 0.15 --seeds 0 --out bench/results/mask_optimiser_screen.json
    # the chosen setting against the plain step: 3 seeds x 2 targets
    OMP_NUM_THREADS=1 nice -n 10 python bench/mask_optimiser.py --candidates m0.9n-lr2-wd5e-4 plain-lr20 \\
        --out bench/results/mask_optimiser_defaults.json

The embedded job is what ``s2hk prune`` runs with its defaults: resnet56 on the bundled digits dataset at
16x16, batch 64, 12 epochs (2 dense warm-up + 10 joint), SGD (lr 0.05, momentum 0.9, nesterov, weight decay
5e-4, cosine over all steps), 20 BN-recalibration batches before each evaluation. It is driven by
:class:`s2hk.trainer.Trainer` as the CLI drives it (same seeding: ``torch.manual_seed(seed)``, loaders of that
seed, then the model). A candidate is a set of :class:`s2hk.S2HConfig` overrides (:data:`CANDIDATES`).

Per run it records every epoch's held-out hard and soft accuracy and the hard network's FLOPs ratio under
both scopes, the exported model's FLOPs ratio, and the two criteria:

- ``in_band``: the final hard FLOPs ratio (under the run's ``flops_scope``) is within ``tolerance`` of the
  target;
- ``smooth``: no joint epoch's hard accuracy is more than :data:`MAX_DROP` below the previous epoch's.

Writes ``--out`` (JSON) after every run and the markdown table next to it (same name, ``.md``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

import s2hk  # noqa: E402
from s2hk.benchmarking import git_commit, machine_description  # noqa: E402
from s2hk.data import make_loaders  # noqa: E402
from s2hk.flops import count_flops  # noqa: E402
from s2hk.trainer import TrainConfig, Trainer  # noqa: E402

#: ``s2hk prune``'s defaults (s2hk/cli.py DEFAULTS; warm-up = epochs // 6).
JOB = {"model": "resnet56", "dataset": "digits", "image_size": 16, "batch_size": 64, "epochs": 12,
       "warmup_epochs": 2, "lr": 0.05, "weight_decay": 5e-4, "recalibrate_batches": 20}

#: Largest allowed fall of the held-out hard accuracy from one epoch to the next in the joint phase (fraction).
MAX_DROP = 0.20

#: Candidate mask-optimiser settings (S2HConfig overrides).
_PLAIN = {"mask_momentum": 0.0, "mask_nesterov": False, "mask_weight_decay": 0.0, "task_grad_scale": None}
_NESTEROV = {"mask_momentum": 0.9, "mask_nesterov": True, "mask_weight_decay": 0.0, "task_grad_scale": None}
CANDIDATES: dict[str, dict[str, Any]] = {
    "default": {},  # S2HConfig's defaults as shipped
    "plain-lr20": {**_PLAIN, "mask_lr": 20.0},
    "plain-lr5": {**_PLAIN, "mask_lr": 5.0},
    "plain-lr20-tgs1": {**_PLAIN, "mask_lr": 20.0, "task_grad_scale": 1.0},
    "m0.9n-lr1": {**_NESTEROV, "mask_lr": 1.0},
    "m0.9n-lr0.5": {**_NESTEROV, "mask_lr": 0.5},
    "m0.9n-lr1-tgs1": {**_NESTEROV, "mask_lr": 1.0, "task_grad_scale": 1.0},
    "m0.9n-lr0.7-tgs1": {**_NESTEROV, "mask_lr": 0.7, "task_grad_scale": 1.0},
    "m0.9n-lr1-tgs1-wd5e-4": {**_NESTEROV, "mask_lr": 1.0, "task_grad_scale": 1.0, "mask_weight_decay": 5e-4},
    "m0.9n-lr1-wd5e-4": {**_NESTEROV, "mask_lr": 1.0, "mask_weight_decay": 5e-4},
    "m0.9n-lr1.5-tgs1-wd5e-4": {**_NESTEROV, "mask_lr": 1.5, "task_grad_scale": 1.0, "mask_weight_decay": 5e-4},
    "m0.9n-lr2-tgs1-wd5e-4": {**_NESTEROV, "mask_lr": 2.0, "task_grad_scale": 1.0, "mask_weight_decay": 5e-4},
    "m0.9n-lr1.75-tgs1-wd1e-4": {**_NESTEROV, "mask_lr": 1.75, "task_grad_scale": 1.0, "mask_weight_decay": 1e-4},
    "m0.9n-lr2-tgs2-wd5e-4": {**_NESTEROV, "mask_lr": 2.0, "task_grad_scale": 2.0, "mask_weight_decay": 5e-4},
    "m0.9n-lr2-tgs0.5-wd5e-4": {**_NESTEROV, "mask_lr": 2.0, "task_grad_scale": 0.5, "mask_weight_decay": 5e-4},
    "m0.9n-lr2-tgs4-wd5e-4": {**_NESTEROV, "mask_lr": 2.0, "task_grad_scale": 4.0, "mask_weight_decay": 5e-4},
    "m0.9n-lr2-wd5e-4": {**_NESTEROV, "mask_lr": 2.0, "mask_weight_decay": 5e-4},
}


def run_one(name: str, overrides: dict, target: float, seed: int, threads: int, max_steps_per_epoch: int = 0) -> dict:
    """Train the embedded job with ``overrides`` to ``target`` from ``seed``; the run's record."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    train, val = make_loaders(JOB["dataset"], batch_size=JOB["batch_size"], image_size=JOB["image_size"], seed=seed)
    model = s2hk.models.get_model(JOB["model"], num_classes=train.num_classes)
    example = torch.zeros(1, train.info.channels, JOB["image_size"], JOB["image_size"])
    started = time.perf_counter()
    pruner = s2hk.S2HPruner(model, example, target_flops=target, warmup_epochs=JOB["warmup_epochs"],
                            joint_epochs=JOB["epochs"] - JOB["warmup_epochs"], hard_epochs=0, **overrides)
    config = TrainConfig(lr=JOB["lr"], weight_decay=JOB["weight_decay"], progress=False,
                         recalibrate_batches=JOB["recalibrate_batches"], max_steps_per_epoch=max_steps_per_epoch)
    trainer = Trainer(pruner, train, val, epochs=JOB["epochs"], config=config)
    evaluate = trainer.evaluate
    trainer.evaluate = lambda: {**evaluate(), **pruner.hard_flops_ratios()}  # both scopes, every epoch
    trainer.fit(resume=False)
    wall = time.perf_counter() - started
    cfg = pruner.config
    epochs = []
    for record in trainer.history:
        epochs.append({"epoch": record["epoch"], "phase": record["phase"], "hard_acc": record["hard_acc"],
                       "soft_acc": record["soft_acc"],
                       **{k: v for k, v in record.items() if k.startswith("hard_flops_ratio")}})
    final = pruner.hard_flops_ratios()
    drops = [prev["hard_acc"] - cur["hard_acc"] for prev, cur in zip(epochs, epochs[1:]) if cur["phase"] == "joint"]
    return {
        "candidate": name, "overrides": overrides, "target": target, "seed": seed,
        "config": {k: v for k, v in cfg.to_dict().items() if k.startswith("mask_") or k in
                   ("task_grad_scale", "flops_scope", "balance", "tolerance", "flops_weight", "max_balance_scale")},
        "epochs": epochs, "final": final,
        "exported_flops_ratio_all": count_flops(pruner.export(), example) / pruner.flops("full"),
        "final_hard_acc": epochs[-1]["hard_acc"],
        "miss": abs(final["hard_flops_ratio"] - target),
        "max_drop": max(drops),
        "in_band": abs(final["hard_flops_ratio"] - target) <= cfg.tolerance + 1e-12,
        "smooth": max(drops) <= MAX_DROP,
        "wall_seconds": wall,
    }


# ================================================================================================ output

def markdown(data: dict) -> str:
    """Summary per (candidate, target), then every run with its per-epoch hard accuracy and FLOPs ratio."""
    m = data["machine"]
    lines = [f"# S2HPruner mask optimiser on the embedded job ({JOB['model']}, {JOB['dataset']} "
             f"{JOB['image_size']}x{JOB['image_size']}, {JOB['epochs']} epochs = {JOB['warmup_epochs']} warm-up "
             f"+ {JOB['epochs'] - JOB['warmup_epochs']} joint)",
             "",
             f"Machine: {m.get('cpu')}, {m.get('logical_cpus')} logical CPUs, {m.get('intra_op_threads')} intra-op "
             f"thread(s), torch {m.get('torch')}; {data['started']} - {data.get('finished') or 'unfinished'}; "
             f"commit {data.get('git_commit') or '?'}",
             "",
             f"Criteria: **in band**: final hard FLOPs ratio within the tolerance (0.01) of the target; **smooth**: "
             f"no joint epoch's held-out hard accuracy more than {100 * MAX_DROP:.0f} points below the previous "
             "epoch's. FLOPs ratios are under each run's `flops_scope` (\"all\": every conv and linear).",
             "",
             "| candidate | target | runs | in band | smooth | final FLOPs ratio (per seed) | worst miss | "
             "worst drop (pts) | final hard acc % (per seed) |",
             "|---|---:|---:|---:|---:|---|---:|---:|---|"]
    keys = list(dict.fromkeys((r["candidate"], r["target"]) for r in data["runs"]))
    for cand, target in keys:
        rows = [r for r in data["runs"] if r["candidate"] == cand and r["target"] == target]
        lines.append(f"| {cand} | {target:.2f} | {len(rows)} | {sum(r['in_band'] for r in rows)}/{len(rows)} | "
                     f"{sum(r['smooth'] for r in rows)}/{len(rows)} | "
                     + ", ".join(f"{r['final']['hard_flops_ratio']:.3f}" for r in rows)
                     + f" | {max(r['miss'] for r in rows):.3f} | {100 * max(r['max_drop'] for r in rows):.1f} | "
                     + ", ".join(f"{100 * r['final_hard_acc']:.1f}" for r in rows) + " |")
    lines += ["", "Candidates (the mask optimiser's settings each ran with):", ""]
    for cand in dict.fromkeys(r["candidate"] for r in data["runs"]):
        settings = next(r["config"] for r in data["runs"] if r["candidate"] == cand)
        lines.append(f"- `{cand}`: `{json.dumps(settings)}`")
    lines += ["", "Per run, per epoch: hard accuracy % / hard FLOPs ratio (epochs 1-2: dense warm-up).", ""]
    width = max((len(r["epochs"]) for r in data["runs"]), default=0)
    lines += ["| candidate | target | seed | " + " | ".join(str(i + 1) for i in range(width)) + " | in band | smooth |",
              "|---|---:|---:|" + "---|" * width + "---|---|"]
    for r in data["runs"]:
        cells = [f"{100 * e['hard_acc']:.1f} / {e['hard_flops_ratio']:.3f}" for e in r["epochs"]]
        lines.append(f"| {r['candidate']} | {r['target']:.2f} | {r['seed']} | " + " | ".join(cells)
                     + f" | {'yes' if r['in_band'] else 'NO'} | {'yes' if r['smooth'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def write(data: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(data))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=sorted(CANDIDATES))
    p.add_argument("--targets", type=float, nargs="+", default=[0.15, 0.35])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--max-steps-per-epoch", type=int, default=0, help="cap steps per epoch (smoke runs; 0: all)")
    p.add_argument("--out", default="bench/results/mask_optimiser.json")
    p.add_argument("--append", action="store_true", help="add to the runs already in --out")
    p.add_argument("--markdown-only", action="store_true", help="only rewrite the table from --out's JSON")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.markdown_only:
        write(json.loads(out.read_text()), out)
        return 0
    torch.set_num_threads(args.threads)
    machine = machine_description()
    machine["intra_op_threads"] = args.threads
    data: dict[str, Any] = {"job": JOB, "max_drop": MAX_DROP, "machine": machine, "git_commit": git_commit(ROOT),
                            "started": _now(), "finished": None, "runs": []}
    if args.append and out.exists():  # the earlier runs, and when they started
        earlier = json.loads(out.read_text())
        data["runs"], data["started"] = earlier["runs"], earlier["started"]
    for cand in args.candidates:
        for target in args.targets:
            for seed in args.seeds:
                record = run_one(cand, CANDIDATES[cand], target, seed, args.threads, args.max_steps_per_epoch)
                data["runs"].append(record)
                write(data, out)
                print(f"{cand} T={target} seed {seed}: final {record['final']['hard_flops_ratio']:.4f}, hard acc "
                      f"{100 * record['final_hard_acc']:.1f}%, max drop {100 * record['max_drop']:.1f} pts, in band "
                      f"{record['in_band']}, smooth {record['smooth']}, {record['wall_seconds']:.0f} s",
                      file=sys.stderr, flush=True)
    data["finished"] = _now()
    try:
        data["machine"]["load_average_1min_end"] = os.getloadavg()[0]
    except OSError:
        pass
    write(data, out)
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
