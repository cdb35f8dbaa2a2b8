"""The ``s2hk`` command line: prune, eval, export, report, bench.

``s2hk prune`` with no arguments runs the main job: a shipped CNN pruned on the embedded digits dataset to
the default FLOPs target, on the CPU, in a few minutes. Settings come from defaults, then a YAML/JSON file
(``--config``), then flags; the resolved settings are written to the run folder as ``config.json``.

Bad input (an unknown model or dataset, a missing dataset folder, a malformed config file, a model whose
channels cannot be followed, a damaged checkpoint) is reported as one line on stderr with exit code 2.

Data-parallel training: ``torchrun --standalone --nproc_per_node=N -m s2hk.cli prune ...`` (gloo on the CPU,
nccl with ``--device cuda``); ``--batch-size`` is the global batch, split evenly over the ranks.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = ["main", "build_parser", "resolve_prune_config", "DEFAULTS", "UsageError"]

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
    "prune_rate": 0.3,
    "lr": 0.05,
    "weight_decay": 5e-4,
    "seed": 0,
    "device": "cpu",
    "threads": 0,
    "num_workers": 0,
    "max_steps_per_epoch": 0,
    "recalibrate_batches": 20,
    "checkpoint_every": 0,
    "out": "runs/latest",
    "progress": True,
    "resume": True,
    "method_options": {},
}

# Settings whose value type is not the type of their default.
_NULLABLE_STR = {"data_root"}
_FLOAT_SETTINGS = {"target_flops", "prune_rate", "lr", "weight_decay"}
_NON_NEGATIVE = {"warmup_epochs", "hard_epochs", "seed", "threads", "num_workers", "max_steps_per_epoch",
                 "recalibrate_batches", "checkpoint_every"}
_POSITIVE = {"image_size", "batch_size", "epochs"}

# Settings that may change between an interrupted run and its resumption (they do not change the numbers).
RESUME_IGNORE = frozenset({"out", "progress", "resume", "threads", "device", "data_root", "num_workers",
                           "checkpoint_every", "config_file", "world_size"})

# Method options given by their own flags (the training schedule), not by --set.
_SCHEDULE_OPTIONS = {"target_flops", "warmup_epochs", "joint_epochs", "hard_epochs"}

METHODS = ("s2h", "crsfp", "sfp", "stp")


class UsageError(Exception):
    """Bad input on the command line or in a config file: reported as one line, exit code 2."""


# ================================================================================================ config

def _read_config_file(path: str) -> dict:
    """The settings mapping of a YAML (``.yaml``/``.yml``) or JSON file."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {p}: not found")
    text = p.read_text()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # YAML and JSON raise different types; both mean a malformed file
        raise UsageError(f"config file {p}: cannot be parsed ({_one_line(err)})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {p}: expected a mapping of settings at the top level, "
                         f"got {type(data).__name__}")
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise UsageError(f"config file {p}: unknown settings {unknown}; known: {sorted(DEFAULTS)}")
    return data


def _parse_value(text: str) -> Any:
    """A ``--set`` value: YAML scalars and lists (``3``, ``0.5``, ``true``, ``null``, ``[a, b]``), else the text."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _parse_set(items: Sequence[str]) -> dict:
    """``["key=value", ...]`` as a dict of method options."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        out[key] = _parse_value(value)
    return out


def _check_setting(key: str, value: Any, where: str) -> Any:
    """``value`` converted to the type of setting ``key``; a UsageError naming ``where`` otherwise."""
    default = DEFAULTS[key]
    if key in _NULLABLE_STR:
        ok = value is None or isinstance(value, str)
    elif key in _FLOAT_SETTINGS:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = isinstance(value, str)
    if not ok:
        expected = "a string or null" if key in _NULLABLE_STR else type(default).__name__
        raise UsageError(f"{where}: setting {key!r} must be {expected}, got {value!r}")
    if key in _POSITIVE and value < 1:
        raise UsageError(f"{where}: setting {key!r} must be >= 1, got {value}")
    if key in _NON_NEGATIVE and value < 0:
        raise UsageError(f"{where}: setting {key!r} must be >= 0, got {value}")
    return value


def _check_method_options(cfg: dict) -> None:
    """Refuse method options the method does not have, or that belong to a schedule flag."""
    from .config import S2HConfig

    options = cfg["method_options"]
    if cfg["method"] in ("crsfp", "sfp"):
        from .crsfp import check_options

        if not 0.0 <= cfg["prune_rate"] < 1.0:
            raise UsageError(f"--prune-rate must be in [0, 1), got {cfg['prune_rate']}")
        try:
            check_options(cfg["method"], options)
        except ValueError as err:
            raise UsageError(f"method options: {_one_line(err)}") from err
        return
    if cfg["method"] == "stp":
        from .stp import check_options as check_stp_options

        try:
            check_stp_options(options)
        except (ValueError, TypeError) as err:
            raise UsageError(f"method options: {_one_line(err)}") from err
        return
    scheduled = sorted(set(options) & _SCHEDULE_OPTIONS)
    if scheduled:
        flags = ", ".join("--" + k.replace("_", "-") for k in scheduled if k != "joint_epochs")
        raise UsageError(f"method option(s) {scheduled} are set by their own flags ({flags or '--epochs'}), "
                         "not by --set")
    values = {**options, "target_flops": cfg["target_flops"]}
    try:
        S2HConfig.from_dict(values)
    except (ValueError, TypeError) as err:
        raise UsageError(f"method options: {_one_line(err)}") from err


def resolve_prune_config(args: argparse.Namespace) -> dict:
    """The run's settings: defaults < config file < flags (``--set`` adds to the file's method options)."""
    cfg = dict(DEFAULTS)
    cfg["method_options"] = {}
    if args.config:
        for key, value in _read_config_file(args.config).items():
            cfg[key] = _check_setting(key, value, f"config file {args.config}")
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None and key != "method_options":
            cfg[key] = _check_setting(key, value, "--" + key.replace("_", "-"))
    cfg["method_options"] = {**cfg["method_options"], **_parse_set(args.set or [])}
    cfg["config_file"] = str(args.config) if args.config else None
    _check_schedule(cfg)
    if cfg["method"] not in METHODS:
        raise UsageError(f"method {cfg['method']!r} is not available; available: {', '.join(METHODS)}")
    _check_method_options(cfg)
    return cfg


def _check_schedule(cfg: dict) -> None:
    """Warm-up and hard epochs must fit in the run."""
    if cfg["warmup_epochs"] + cfg["hard_epochs"] > cfg["epochs"]:
        raise UsageError(f"warmup_epochs ({cfg['warmup_epochs']}) + hard_epochs ({cfg['hard_epochs']}) exceed "
                         f"epochs ({cfg['epochs']})")


# ================================================================================================ models

def _model_factory(name: str) -> Callable[..., Any]:
    """A shipped model's constructor, or ``package.module:function`` for one of your own."""
    if ":" not in name:
        from . import models

        if name not in models.list_models():
            raise UsageError(f"unknown model {name!r}; shipped models: {', '.join(models.list_models())} "
                             "(or give your own as package.module:function)")
        return models.MODELS[name]
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(f"model {name!r}: cannot import {module_name!r} ({_one_line(err)})") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"model {name!r}: {module_name} has no callable {attr!r}")
    return factory


def _model_kwargs(name: str, num_classes: int, image_size: int) -> dict[str, Any]:
    """Constructor arguments of model ``name``: ``num_classes``, and ``image_size`` where the constructor takes
    one (a transformer's token grid is fixed at construction)."""
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    try:
        if "image_size" in inspect.signature(_model_factory(name)).parameters:
            kwargs["image_size"] = image_size
    except (TypeError, ValueError):  # no signature to inspect (a builtin): num_classes only
        pass
    return kwargs


def _build_model(name: str, kwargs: dict[str, Any]) -> Any:
    """Instantiate model ``name`` with :func:`_model_kwargs`' arguments."""
    factory = _model_factory(name)
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as err:
        settings = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        raise UsageError(f"model {name!r} cannot be built with {settings} ({_one_line(err)})") from err


def _build_pruner(cfg: dict, num_classes: int, channels: int, image_size: int, device: Any) -> Any:
    """The method's pruner around a fresh model (the method options were checked by resolve_prune_config)."""
    import torch

    from .s2h import S2HPruner

    model = _build_model(cfg["model"], _model_kwargs(cfg["model"], num_classes, image_size)).to(device)
    example = torch.zeros(1, channels, image_size, image_size, device=device)
    if cfg["method"] in ("crsfp", "sfp"):
        from .crsfp import CRSFPruner, SFPruner

        cls = CRSFPruner if cfg["method"] == "crsfp" else SFPruner
        return cls(model, example, prune_rate=cfg["prune_rate"], **cfg["method_options"])
    if cfg["method"] == "stp":
        from .stp import STPruner

        return STPruner(model, example, target_flops=cfg["target_flops"], total_epochs=cfg["epochs"],
                        warmup_epochs=cfg["warmup_epochs"], hard_epochs=cfg["hard_epochs"], **cfg["method_options"])
    joint = cfg["epochs"] - cfg["warmup_epochs"] - cfg["hard_epochs"]
    return S2HPruner(model, example, target_flops=cfg["target_flops"], warmup_epochs=cfg["warmup_epochs"],
                     joint_epochs=joint, hard_epochs=cfg["hard_epochs"], **cfg["method_options"])


# ================================================================================================ prune

def _resolve_device(name: str) -> Any:
    """``torch.device`` for ``name``; plain "cuda" under torchrun means this process's local GPU."""
    import torch

    from .distributed import local_rank

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"--device {name!r}: {_one_line(err)}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name!r}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank() if "LOCAL_RANK" in os.environ else torch.cuda.current_device())
    return device


def _make_loaders(cfg: dict, device: Any, val_batch_size: Optional[int] = None) -> tuple[Any, Any]:
    """The run's deterministic (train, val) loaders (two augmented views per image for crsfp); bad dataset
    names and sizes become UsageErrors."""
    from .data import DatasetError, make_loaders

    extra: dict[str, Any] = {"device": device} if device.type == "cuda" else {}
    if cfg.get("method") == "crsfp":
        extra["two_views"] = True
    if val_batch_size is not None:
        extra["val_batch_size"] = val_batch_size
    try:
        return make_loaders(cfg["dataset"], root=cfg["data_root"], batch_size=cfg["batch_size"],
                            image_size=cfg["image_size"], seed=cfg["seed"], num_workers=cfg["num_workers"], **extra)
    except DatasetError:
        raise
    except (ValueError, TypeError) as err:
        raise UsageError(f"dataset {cfg['dataset']!r}: {_one_line(err)}") from err


def _start_distributed(cfg: dict) -> bool:
    """Join torchrun's process group (gloo on the CPU, nccl on GPUs); False outside torchrun."""
    from .distributed import init_from_env, world_size

    backend = "nccl" if str(cfg["device"]).startswith("cuda") else "gloo"
    started = init_from_env(backend)
    if started and cfg["batch_size"] % world_size():
        raise UsageError(f"--batch-size {cfg['batch_size']} (the global batch) does not split evenly over "
                         f"{world_size()} processes")
    return started


def cmd_prune(args: argparse.Namespace) -> int:
    """Train with the method to the FLOPs target; export the pruned model and print a summary."""
    from .distributed import shutdown

    cfg = resolve_prune_config(args)
    started = _start_distributed(cfg)
    try:
        return _run_prune(cfg)
    finally:
        if started:
            shutdown()


def _run_prune(cfg: dict) -> int:
    """Build data, pruner and trainer from ``cfg``, train, and (rank 0) write the outputs."""
    import torch

    from .distributed import barrier, is_rank0, world_size
    from .trainer import TrainConfig, Trainer

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    cfg["world_size"] = world_size()
    device = _resolve_device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    started = time.perf_counter()
    train, val = _make_loaders(cfg, device)
    pruner = _build_pruner(cfg, train.num_classes, train.info.channels, train.image_size, device)
    out = Path(cfg["out"])
    train_config = TrainConfig(lr=cfg["lr"], weight_decay=cfg["weight_decay"], progress=cfg["progress"],
                               max_steps_per_epoch=cfg["max_steps_per_epoch"],
                               recalibrate_batches=cfg["recalibrate_batches"],
                               checkpoint_every=cfg["checkpoint_every"])
    trainer = Trainer(pruner, train, val, epochs=cfg["epochs"], config=train_config, out_dir=out,
                      run_config=cfg, resume_ignore=RESUME_IGNORE)
    result = trainer.fit(resume=cfg["resume"])
    if is_rank0():
        summary = _write_outputs(cfg, pruner, train, result, out, time.perf_counter() - started)
        print(_format_summary(summary))
    barrier()
    return 0


def _write_outputs(cfg: dict, pruner: Any, train: Any, result: dict, out: Path, seconds: float) -> dict:
    """Export the pruned model to ``out/pruned`` and write ``out/architecture.json`` and ``out/summary.json``."""
    import torch

    from .export import save_pruned
    from .flops import count_macs

    pruned_dir = out / "pruned"
    save_pruned(pruner, pruned_dir, model_name=cfg["model"],
                model_kwargs=_model_kwargs(cfg["model"], train.num_classes, train.image_size))
    shutil.copyfile(pruned_dir / "architecture.json", out / "architecture.json")
    example = torch.zeros(1, train.info.channels, train.image_size, train.image_size, device=pruner.mask_logits.device)
    dense_macs = int(pruner.flops_polynomial.dense_macs)
    pruned_macs = int(count_macs(pruner.export(), example))
    summary = {
        "method": cfg["method"], "model": cfg["model"], "dataset": cfg["dataset"],
        "input": f"1x{train.info.channels}x{train.image_size}x{train.image_size}",
        "dense_flops": 2 * dense_macs, "dense_macs": dense_macs,
        "pruned_flops": 2 * pruned_macs, "pruned_macs": pruned_macs,
        "remaining_flops": pruned_macs / dense_macs,
        "target_flops": cfg["target_flops"] if cfg["method"] in ("s2h", "stp") else None,
        "soft_acc": result.get("soft_acc"), "hard_acc": result.get("hard_acc"), "gap": result.get("gap"),
        "epochs": cfg["epochs"], "world_size": cfg["world_size"],
        "wall_seconds": seconds, "out": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _format_summary(s: dict) -> str:
    """The short summary printed at the end of ``s2hk prune``."""
    def pct(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"

    return "\n".join([
        f"s2hk prune: {s['method']} on {s['model']} / {s['dataset']} (input {s['input']})",
        f"  dense  : {s['dense_flops'] / 1e6:10.2f} MFLOPs  ({s['dense_macs'] / 1e6:.2f} M MACs)",
        f"  pruned : {s['pruned_flops'] / 1e6:10.2f} MFLOPs  ({s['pruned_macs'] / 1e6:.2f} M MACs)  "
        f"= {pct(s['remaining_flops'])} of dense (target {pct(s['target_flops'])}); FLOPs = 2 x MACs",
        f"  accuracy: soft {pct(s['soft_acc'])}, hard {pct(s['hard_acc'])}, gap (soft - hard) {pct(s['gap'])}",
        f"  time   : {s['wall_seconds']:.0f} s",
        f"  output : {s['out']}  (pruned model in {Path(s['out']) / 'pruned'}; plots: s2hk report {s['out']})",
    ])


# ================================================================================================ eval / export

def _run_config(run: Path) -> dict:
    """The run folder's ``config.json`` ({} when absent)."""
    path = run / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not valid JSON ({err})") from err
    return data if isinstance(data, dict) else {}


def _pruned_folder(run: Path) -> Path:
    """``run/pruned`` when present, else ``run`` itself; it must hold model.pt and architecture.json."""
    if not run.exists():
        raise UsageError(f"{run}: no such run folder")
    folder = run / "pruned" if (run / "pruned").is_dir() else run
    for name in ("architecture.json", "model.pt"):
        if not (folder / name).is_file():
            raise UsageError(f"{folder / name}: missing; expected a run folder of s2hk prune (with pruned/) or "
                             "a folder written by s2hk.save_pruned")
    return folder


def _load_pruned_model(folder: Path) -> Any:
    """The pruned model of ``folder``; a model given as package.module:function is rebuilt through it."""
    from .export import load_pruned

    try:
        arch = json.loads((folder / "architecture.json").read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{folder / 'architecture.json'}: not valid JSON ({err})") from err
    model_info = (arch.get("model") if isinstance(arch, dict) else None) or {}
    name = model_info.get("name")
    dense = None
    if isinstance(name, str) and ":" in name:
        dense = _model_factory(name)(**model_info.get("kwargs", {}))
    try:
        return load_pruned(folder, model=dense)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(_one_line(err)) from err


def cmd_eval(args: argparse.Namespace) -> int:
    """Top-1 accuracy of a pruned model on its dataset's validation split."""
    import torch

    run = Path(args.run)
    folder = _pruned_folder(run)
    config = _run_config(run)
    model = _load_pruned_model(folder)
    cfg = {**DEFAULTS, **config}
    cfg.update({k: v for k, v in (("dataset", args.dataset), ("data_root", args.data_root),
                                  ("image_size", args.image_size)) if v is not None})
    cfg["num_workers"] = 0
    _, val = _make_loaders(cfg, torch.device("cpu"), val_batch_size=args.batch_size)
    correct = total = 0
    with torch.no_grad():
        for x, y in val:
            correct += int((model(x).argmax(-1) == y).sum())
            total += y.numel()
    result = {"run": str(run), "dataset": cfg["dataset"], "accuracy": correct / max(total, 1), "images": total}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{folder}: top-1 accuracy {100 * result['accuracy']:.2f}% on {total} {cfg['dataset']} "
              "validation images")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Copy the pruned model (PyTorch state + JSON architecture) to ``--out``, and write ONNX with ``--onnx``."""
    run = Path(args.run)
    folder = _pruned_folder(run)
    model = _load_pruned_model(folder)
    out = Path(args.out) if args.out else folder
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("model.pt", "architecture.json"):
        if (out / name).resolve() != (folder / name).resolve():
            shutil.copyfile(folder / name, out / name)
        written.append(out / name)
    if args.onnx:
        written.append(_export_onnx(model, folder, out / "model.onnx"))
    for path in written:
        print(path)
    return 0


def _export_onnx(model: Any, folder: Path, path: Path) -> Path:
    """Write ``model`` as ONNX for the example input shape recorded in ``folder/architecture.json``."""
    import torch

    try:
        import onnx  # noqa: F401  (the exporter needs it; say so up front rather than mid-export)
    except ImportError as err:
        raise UsageError("ONNX export needs the onnx package: pip install onnx onnxscript") from err
    arch = json.loads((folder / "architecture.json").read_text())
    shape = arch["example_input_shapes"][0]
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export's, which takes ~10x longer on these
        # plain conv nets and specialises the batch size; both give the same graph for them.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(shape),), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return path


# ================================================================================================ report / bench

def cmd_report(args: argparse.Namespace) -> int:
    """Render the run's PNG plots and print their paths."""
    from .report import render_report

    for path in render_report(args.run, args.out):
        print(path)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Time a dense step, the narrow model's step, the performance floor and an s2hk step."""
    import torch

    from .benchmarking import step_timings

    if ":" in args.model:
        raise UsageError(f"bench times the shipped models only, got {args.model!r}")
    _model_factory(args.model)  # a clear error for an unknown name before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    device = str(_resolve_device(args.device)) if args.device else None
    result = step_timings(args.model, batch_size=args.batch_size, image_size=args.image_size,
                          target_flops=args.target_flops, repeats=args.repeats, device=device)
    print(json.dumps(result, indent=1) if args.json else _format_timings(result))
    return 0


def _format_timings(r: dict) -> str:
    """Human-readable step timings."""
    rows = [("dense step", r["dense_step_s"]), ("narrow (exported) step", r["narrow_step_s"]),
            ("input-gradient backward", r["input_grad_backward_s"]), ("floor (sum of the three)", r["floor_s"]),
            ("s2hk step", r["s2hk_step_s"])]
    lines = [f"s2hk bench: {r['model']}, batch {r['batch_size']}, {r['image_size']}x{r['image_size']}, "
             f"{r['device']}, hard FLOPs ratio {r['hard_flops_ratio']:.3f}"]
    lines += [f"  {name:<26}{1e3 * t:10.2f} ms" for name, t in rows]
    lines.append(f"  s2hk / dense {r['s2hk_over_dense']:.2f}x, s2hk / floor {r['s2hk_over_floor']:.2f}x, "
                 f"narrow / dense {r['narrow_over_dense']:.2f}x")
    return "\n".join(lines)


# ================================================================================================ parser

def _add_prune_parser(sub: Any) -> None:
    """``s2hk prune`` and its flags (all default to None so that a config file can set them)."""
    p = sub.add_parser("prune", help="train with a pruning method to a FLOPs target (default: the embedded job)",
                       description="Train with a pruning method to a FLOPs target. With no arguments: "
                                   f"{DEFAULTS['model']} on the embedded digits set to "
                                   f"{DEFAULTS['target_flops']:.0%} of its FLOPs.")
    p.add_argument("--config", help="YAML or JSON file of settings (flags override it)")
    p.add_argument("--method", help=f"pruning method ({', '.join(METHODS)})")
    p.add_argument("--model", help="shipped model name (see s2hk.models.list_models()) or package.module:function")
    p.add_argument("--dataset", help="digits | cifar10 | cifar100 | tinyimagenet | imagefolder | synthetic")
    p.add_argument("--data-root", dest="data_root", help="dataset folder (not needed for digits / synthetic)")
    p.add_argument("--image-size", dest="image_size", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int, help="global batch (split over torchrun ranks)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--warmup-epochs", dest="warmup_epochs", type=int)
    p.add_argument("--hard-epochs", dest="hard_epochs", type=int)
    p.add_argument("--target-flops", dest="target_flops", type=float, help="remaining FLOPs ratio, e.g. 0.35")
    p.add_argument("--prune-rate", dest="prune_rate", type=float,
                   help="crsfp / sfp: fraction of every prunable group's channels masked, e.g. 0.3")
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", dest="weight_decay", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, help="torch CPU threads (0: torch's default)")
    p.add_argument("--num-workers", dest="num_workers", type=int, help="loader processes for image-file datasets")
    p.add_argument("--max-steps-per-epoch", dest="max_steps_per_epoch", type=int, help="cap (0: whole epochs)")
    p.add_argument("--recalibrate-batches", dest="recalibrate_batches", type=int,
                   help="training batches re-estimating the pruned network's BatchNorm statistics before evaluation")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int,
                   help="also checkpoint every N steps (0: at epoch ends only)")
    p.add_argument("--out", help="run folder")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="continue from the run folder's last checkpoint (--no-resume: start over)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="method option, e.g. --set kd=none --set mask_lr=5 (repeatable)")
    p.set_defaults(func=cmd_prune)


def _add_eval_parser(sub: Any) -> None:
    """``s2hk eval RUN``."""
    p = sub.add_parser("eval", help="evaluate a pruned model on its dataset's validation split")
    p.add_argument("run", help="run folder (or a folder with model.pt + architecture.json)")
    p.add_argument("--dataset")
    p.add_argument("--data-root", dest="data_root")
    p.add_argument("--image-size", dest="image_size", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=256)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_eval)


def _add_export_parser(sub: Any) -> None:
    """``s2hk export RUN [--onnx]``."""
    p = sub.add_parser("export", help="export a pruned model (PyTorch state + JSON architecture, and ONNX)")
    p.add_argument("run", help="run folder (or a folder with model.pt + architecture.json)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx")
    p.add_argument("--out", help="destination folder (default: the pruned model's folder)")
    p.set_defaults(func=cmd_export)


def _add_report_parser(sub: Any) -> None:
    """``s2hk report RUN``."""
    p = sub.add_parser("report", help="render PNG plots of a run (gap, FLOPs, kept channels)")
    p.add_argument("run")
    p.add_argument("--out", help="destination folder (default: the run folder)")
    p.set_defaults(func=cmd_report)


def _add_bench_parser(sub: Any) -> None:
    """``s2hk bench``."""
    p = sub.add_parser("bench", help="time a training step: dense, s2hk, and the performance model's floor")
    p.add_argument("--model", default="resnet56")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    p.add_argument("--image-size", dest="image_size", type=int, default=32)
    p.add_argument("--target-flops", dest="target_flops", type=float, default=0.35)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", action="store_true", help="print the timings as JSON")
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    """The ``s2hk`` argument parser."""
    parser = argparse.ArgumentParser(prog="s2hk", description="Prune networks while they train.")
    sub = parser.add_subparsers(dest="command")
    for add in (_add_prune_parser, _add_eval_parser, _add_export_parser, _add_report_parser, _add_bench_parser):
        add(sub)
    return parser


# ================================================================================================ errors

def _one_line(err: BaseException) -> str:
    """An exception's message on one line."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text or type(err).__name__


def _user_error_types() -> tuple[type, ...]:
    """Exceptions that mean bad input, not a bug: reported without a traceback."""
    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .graph import UnsupportedModelError
    from .report import ReportError

    return UsageError, DatasetError, UnsupportedModelError, CheckpointError, ReportError


def _report_error(message: str) -> None:
    """Print ``message`` as the one-line error of the command."""
    print(f"s2hk: error: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``s2hk`` command line; returns the exit code (2 for bad input, 130 when interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        hint = "; run the same command again to resume from the last checkpoint" if args.command == "prune" else ""
        _report_error("interrupted" + hint)
        return 130
    except Exception as err:
        if not isinstance(err, _user_error_types()):
            raise
        _report_error(_one_line(err))
        return 2


if __name__ == "__main__":
    sys.exit(main())
