"""The ``s2hk`` command line: prune, eval, export, report, bench.

``s2hk prune`` with no arguments runs the main job: a shipped CNN pruned on the embedded digits dataset to
the default FLOPs target, on the CPU, in a few minutes. Settings come from defaults, then a YAML/JSON file
(``--config``), then flags; the resolved settings are written to the run folder as ``config.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["main", "DEFAULTS"]

DEFAULTS: dict[str, Any] = {
    "method": "s2h",
    "model": "resnet56",
    "dataset": "digits",
    "data_root": None,
    "image_size": 16,
    "batch_size": 64,
    "epochs": 12,
    "warmup_epochs": 2,
    "hard_epochs": 0,
    "target_flops": 0.35,
    "lr": 0.05,
    "weight_decay": 5e-4,
    "seed": 0,
    "device": "cpu",
    "threads": 0,
    "out": "runs/latest",
    "progress": True,
    "resume": True,
    "method_options": {},
}


def _load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"s2hk: config file {p}: not found")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as err:  # YAML and JSON raise different types; both mean a malformed file
        raise SystemExit(f"s2hk: config file {p}: cannot be parsed ({err})") from err
    if not isinstance(data, dict):
        raise SystemExit(f"s2hk: config file {p}: expected a mapping of settings at the top level")
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise SystemExit(f"s2hk: config file {p}: unknown settings {unknown}; known: {sorted(DEFAULTS)}")
    return data


def _parse_set(items: Sequence[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"s2hk: --set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def resolve_prune_config(args: argparse.Namespace) -> dict:
    """Defaults < config file < flags."""
    cfg = dict(DEFAULTS)
    if args.config:
        cfg.update(_load_config_file(args.config))
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    cfg["method_options"] = {**cfg.get("method_options", {}), **_parse_set(args.set or [])}
    return cfg


def _build_pruner(cfg: dict, num_classes: int, image_size: int, channels: int = 3):
    import torch

    from . import models

    model = models.get_model(cfg["model"], num_classes=num_classes).to(cfg["device"])
    example = torch.zeros(1, channels, image_size, image_size, device=cfg["device"])
    options = dict(cfg.get("method_options", {}))
    if cfg["method"] == "s2h":
        from .s2h import S2HPruner

        epochs = cfg["epochs"]
        joint = max(epochs - cfg["warmup_epochs"] - cfg["hard_epochs"], 0)
        return S2HPruner(model, example, target_flops=cfg["target_flops"], warmup_epochs=cfg["warmup_epochs"],
                         joint_epochs=joint, hard_epochs=cfg["hard_epochs"], **options)
    raise SystemExit(f"s2hk: method {cfg['method']!r} is not available; available: s2h")


def cmd_prune(args: argparse.Namespace) -> int:
    import torch

    from .data import make_loaders
    from .export import save_pruned
    from .flops import count_macs
    from .trainer import TrainConfig, Trainer

    cfg = resolve_prune_config(args)
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(cfg["seed"])
    started = time.perf_counter()
    train, val = make_loaders(cfg["dataset"], root=cfg["data_root"], batch_size=cfg["batch_size"],
                              image_size=cfg["image_size"], seed=cfg["seed"])
    pruner = _build_pruner(cfg, train.num_classes, train.image_size)
    out = Path(cfg["out"])
    trainer = Trainer(pruner, train, val, epochs=cfg["epochs"],
                      config=TrainConfig(lr=cfg["lr"], weight_decay=cfg["weight_decay"], progress=cfg["progress"]),
                      out_dir=out, run_config=cfg)
    result = trainer.fit(resume=cfg["resume"])
    pruned_dir = out / "pruned"
    save_pruned(pruner, pruned_dir, model_name=cfg["model"], model_kwargs={"num_classes": train.num_classes})
    (out / "architecture.json").write_text((pruned_dir / "architecture.json").read_text())
    exported = pruner.export()
    example = torch.zeros(1, 3, train.image_size, train.image_size, device=cfg["device"])
    dense_macs, pruned_macs = pruner.flops_polynomial.dense_macs, count_macs(exported, example)
    summary = {
        "method": cfg["method"], "model": cfg["model"], "dataset": cfg["dataset"],
        "input": f"1x3x{train.image_size}x{train.image_size}",
        "dense_flops": 2 * dense_macs, "dense_macs": dense_macs,
        "pruned_flops": 2 * pruned_macs, "pruned_macs": pruned_macs,
        "remaining_flops": pruned_macs / dense_macs, "target_flops": cfg["target_flops"],
        "soft_acc": result.get("soft_acc"), "hard_acc": result.get("hard_acc"), "gap": result.get("gap"),
        "wall_seconds": time.perf_counter() - started, "out": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(_format_summary(summary))
    return 0


def _format_summary(s: dict) -> str:
    def pct(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"

    return "\n".join([
        f"s2hk prune: {s['method']} on {s['model']} / {s['dataset']} (input {s['input']})",
        f"  dense  : {s['dense_flops'] / 1e6:10.2f} MFLOPs  ({s['dense_macs'] / 1e6:.2f} M MACs)",
        f"  pruned : {s['pruned_flops'] / 1e6:10.2f} MFLOPs  ({s['pruned_macs'] / 1e6:.2f} M MACs)  "
        f"= {pct(s['remaining_flops'])} of dense (target {pct(s['target_flops'])}); FLOPs = 2 x MACs",
        f"  accuracy: soft {pct(s['soft_acc'])}, hard {pct(s['hard_acc'])}, gap (soft - hard) {pct(s['gap'])}",
        f"  time   : {s['wall_seconds']:.0f} s",
        f"  output : {s['out']}  (pruned model in {s['out']}/pruned, plots: s2hk report {s['out']})",
    ])


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .data import make_loaders
    from .export import load_pruned

    run = Path(args.run)
    config = _run_config(run)
    model = load_pruned(run / "pruned" if (run / "pruned").is_dir() else run)
    dataset = args.dataset or config.get("dataset", "digits")
    _, val = make_loaders(dataset, root=args.data_root or config.get("data_root"),
                          batch_size=args.batch_size, image_size=args.image_size or config.get("image_size"),
                          seed=config.get("seed", 0))
    correct = total = 0
    with torch.no_grad():
        for x, y in val:
            correct += int((model(x).argmax(-1) == y).sum())
            total += y.numel()
    print(json.dumps({"run": str(run), "dataset": dataset, "accuracy": correct / max(total, 1), "images": total}))
    return 0


def _run_config(run: Path) -> dict:
    path = run / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {}


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .export import load_pruned

    run = Path(args.run)
    folder = run / "pruned" if (run / "pruned").is_dir() else run
    model = load_pruned(folder)
    arch = json.loads((folder / "architecture.json").read_text())
    shape = arch["example_input_shapes"][0]
    out = Path(args.out or folder)
    out.mkdir(parents=True, exist_ok=True)
    if args.onnx:
        path = out / "model.onnx"
        torch.onnx.export(model, (torch.zeros(shape),), str(path), input_names=["input"], output_names=["logits"],
                          dynamo=False)
        print(f"wrote {path}")
    else:
        print(f"pruned model: {folder / 'model.pt'} + {folder / 'architecture.json'} (load with s2hk.load_pruned)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import render_report

    for path in render_report(args.run, args.out):
        print(path)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .benchmarking import step_timings

    result = step_timings(args.model, batch_size=args.batch_size, image_size=args.image_size,
                          target_flops=args.target_flops, repeats=args.repeats)
    print(json.dumps(result, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2hk", description="Prune networks while they train.")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("prune", help="train with a pruning method to a FLOPs target (default: the embedded job)")
    p.add_argument("--config", help="YAML or JSON file of settings (flags override it)")
    p.add_argument("--method", choices=["s2h"], help="pruning method")
    p.add_argument("--model", help="shipped model name (see s2hk.models.list_models())")
    p.add_argument("--dataset", help="digits | cifar10 | cifar100 | tinyimagenet | imagefolder | synthetic")
    p.add_argument("--data-root", dest="data_root", help="dataset folder (not needed for digits / synthetic)")
    p.add_argument("--image-size", dest="image_size", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--warmup-epochs", dest="warmup_epochs", type=int)
    p.add_argument("--hard-epochs", dest="hard_epochs", type=int)
    p.add_argument("--target-flops", dest="target_flops", type=float, help="remaining FLOPs ratio, e.g. 0.35")
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", dest="weight_decay", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--threads", type=int, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", help="run folder")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    p.add_argument("--no-resume", dest="resume", action="store_const", const=False,
                   help="start over even if the run folder has checkpoints")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="method option, e.g. --set kd=none")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="evaluate a pruned model on its dataset's validation split")
    p.add_argument("run", help="run folder (or a folder with model.pt + architecture.json)")
    p.add_argument("--dataset")
    p.add_argument("--data-root", dest="data_root")
    p.add_argument("--image-size", dest="image_size", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=256)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export a pruned model (PyTorch state + JSON architecture, or ONNX)")
    p.add_argument("run")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx")
    p.add_argument("--out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="render PNG plots of a run (gap, FLOPs, kept channels)")
    p.add_argument("run")
    p.add_argument("--out")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="time a training step: dense, s2hk, and the performance model's floor")
    p.add_argument("--model", default="resnet56")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    p.add_argument("--image-size", dest="image_size", type=int, default=32)
    p.add_argument("--target-flops", dest="target_flops", type=float, default=0.35)
    p.add_argument("--repeats", type=int, default=5)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
