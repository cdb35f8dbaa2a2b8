"""The ``s2hk`` command line: prune, eval, export, report, bench.

``s2hk prune`` with no arguments runs the main job: a shipped CNN pruned on the embedded digits dataset to
the default FLOPs target, on the CPU, in a few minutes. Settings come from defaults, then a YAML/JSON file
(``--config``), then flags; the resolved settings are written to the run folder as ``config.json``.

Every run gets its own folder by default, ``runs/<method>-<model>-<dataset>-<UTC time>``, and ``runs/latest``
points to the newest (a symbolic link; a one-line text file naming it where links are not available).
``--out DIR`` writes to (and resumes) ``DIR``; ``--resume`` alone resumes ``runs/latest``.

Bad input (an unknown model or dataset, a missing dataset folder, a malformed config file, a setting the
chosen method or dataset does not use, a model whose channels cannot be followed, a damaged checkpoint, an
unreadable image) is reported as one line on stderr with exit code 2, before any training where it can be
checked up front. A run whose pruned network ends outside its FLOPs target band says so in its summary and
exits with code 3 (:data:`EXIT_MISSED_TARGET`).

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

__all__ = ["main", "build_parser", "resolve_prune_config", "DEFAULTS", "UsageError", "EXIT_BAD_INPUT",
           "EXIT_MISSED_TARGET", "RUNS_DIR"]

EXIT_BAD_INPUT = 2       # bad input: one line on stderr, nothing trained
EXIT_MISSED_TARGET = 3   # the run finished, but its pruned network is outside the FLOPs target band
EXIT_INTERRUPTED = 130   # Ctrl-C; the same command with --resume (or --out <run folder>) continues

RUNS_DIR = Path("runs")  # where run folders are created (relative to the working directory)
LATEST = "latest"        # RUNS_DIR / LATEST points to the newest run folder

# Warm-up epochs when not given, for the methods with a warm-up (s2h, stp): this fraction of --epochs, rounded
# down (2 of the default 12; none below 6 epochs), and always leaving at least one joint epoch.
WARMUP_FRACTION = 1 / 6

# Held-out training images of STP's search when --search-holdout is not given: this fraction of the training
# images, at most this many batches of them (5% of digits' 1438 training images: 72; of CIFAR's 50000 at batch
# 128: 512).
SEARCH_HOLDOUT_FRACTION = 0.05
SEARCH_HOLDOUT_BATCHES = 4

DEFAULTS: dict[str, Any] = {
    "method": "s2h",
    "model": "resnet56",
    "dataset": "digits",
    "data_root": None,
    "image_size": 16,
    "batch_size": 64,
    "epochs": 12,
    "warmup_epochs": None,  # None: WARMUP_FRACTION of the epochs (s2h, stp); crsfp / sfp have no warm-up
    "hard_epochs": 0,
    "target_flops": 0.35,
    "prune_rate": 0.3,
    "lr": 0.05,
    "weight_decay": 5e-4,
    "schedule": "cosine",
    "lr_step_epochs": 30,   # --schedule step only (None in config.json otherwise)
    "lr_gamma": 0.1,        # --schedule step only (None in config.json otherwise)
    "precision": "fp32",
    "search_holdout": None,  # stp: images (>= 1) or a fraction; None: the default above; 0: none
    "seed": 0,
    "device": "cpu",
    "threads": 0,
    "num_workers": 0,
    "max_steps_per_epoch": 0,
    "recalibrate_batches": 20,
    "checkpoint_every": 0,
    "out": None,  # None: a new folder RUNS_DIR/<method>-<model>-<dataset>-<UTC time>
    "progress": True,
    "resume": True,
    "skip_bad_files": False,
    "allow_missed_target": False,
    "method_options": {},
}

# Settings whose value type is not the type of their default.
_NULLABLE_STR = {"data_root", "out"}
_NULLABLE_INT = {"warmup_epochs"}
_NULLABLE_NUMBER = {"search_holdout"}
_FLOAT_SETTINGS = {"target_flops", "prune_rate", "lr", "weight_decay", "lr_gamma"}
_NON_NEGATIVE = {"warmup_epochs", "hard_epochs", "seed", "threads", "num_workers", "max_steps_per_epoch",
                 "recalibrate_batches", "checkpoint_every"}
_POSITIVE = {"image_size", "batch_size", "epochs", "lr_step_epochs"}

# Settings that may change between an interrupted run and its resumption (they do not change the numbers).
# skip_bad_files may be turned on to get past an image that failed mid-run; allow_missed_target changes the exit
# status only.
RESUME_IGNORE = frozenset({"out", "progress", "resume", "threads", "device", "data_root", "num_workers",
                           "checkpoint_every", "config_file", "world_size", "skip_bad_files",
                           "allow_missed_target"})

# Method options given by their own flags (the training schedule), not by --set.
_SCHEDULE_OPTIONS = {"target_flops", "warmup_epochs", "joint_epochs", "hard_epochs"}

METHODS = ("s2h", "crsfp", "sfp", "stp")
_TARGET_METHODS = ("s2h", "stp")  # prune to --target-flops, with warm-up / joint / hard-only epochs
_RATE_METHODS = ("crsfp", "sfp")  # prune --prune-rate of every group, no phases

# What s2hk prune writes into a run folder besides the trainer's files (moved aside with them by --no-resume).
_RUN_OUTPUTS = ("summary.json", "architecture.json", "pruned")


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
    elif key in _NULLABLE_INT:
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
    elif key in _NULLABLE_NUMBER:
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
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
        expected = ("a string or null" if key in _NULLABLE_STR else "int or null" if key in _NULLABLE_INT
                    else "a number or null" if key in _NULLABLE_NUMBER else type(default).__name__)
        raise UsageError(f"{where}: setting {key!r} must be {expected}, got {value!r}")
    if key in _POSITIVE and value < 1:
        raise UsageError(f"{where}: setting {key!r} must be >= 1, got {value}")
    if key in _NON_NEGATIVE and value is not None and value < 0:
        raise UsageError(f"{where}: setting {key!r} must be >= 0, got {value}")
    if key == "search_holdout" and value is not None:
        value = _holdout_setting(value, where)
    choices = _choices().get(key)
    if choices is not None and value not in choices:
        raise UsageError(f"{where}: setting {key!r} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _holdout_setting(value: float, where: str) -> float:
    """``--search-holdout``: a number of images (an integer >= 1, as an int), a fraction in (0, 1) or 0 (none)."""
    if value < 0 or (value >= 1 and value != int(value)):
        raise UsageError(f"{where}: setting 'search_holdout' must be a number of images (an integer >= 1), a "
                         f"fraction in (0, 1) or 0 (none), got {value!r}")
    return int(value) if value >= 1 or value == 0 else float(value)


def _choices() -> dict[str, tuple[str, ...]]:
    """The values a string setting may take, by setting."""
    from .trainer import PRECISIONS, SCHEDULES

    return {"schedule": SCHEDULES, "precision": PRECISIONS}


def _flag(key: str) -> str:
    """The command-line flag of setting ``key``."""
    return "--" + key.replace("_", "-")


def _check_method_settings(cfg: dict) -> None:
    """Build the method's settings as its pruner will (so that every bad value is refused before any work);
    refuse options the method does not have or that belong to a flag."""
    from .config import S2HConfig

    options = cfg["method_options"]
    if cfg["method"] in _RATE_METHODS:
        from .crsfp import check_options

        if not 0.0 <= cfg["prune_rate"] < 1.0:
            raise UsageError(f"--prune-rate must be in [0, 1), got {cfg['prune_rate']}")
        try:
            check_options(cfg["method"], options)
        except ValueError as err:
            raise UsageError(f"method options: {_one_line(err)}") from err
        return
    schedule = {"target_flops": cfg["target_flops"], "warmup_epochs": cfg["warmup_epochs"],
                "hard_epochs": cfg["hard_epochs"]}
    if cfg["method"] == "stp":
        from .stp import STPConfig, check_options as check_stp_options

        try:
            check_stp_options(options)
            STPConfig(**options, **schedule, total_epochs=cfg["epochs"])
        except (ValueError, TypeError) as err:
            raise UsageError(f"method options: {_one_line(err)}") from err
        return
    scheduled = sorted(set(options) & _SCHEDULE_OPTIONS)
    if scheduled:
        flags = ", ".join(_flag(k) for k in scheduled if k != "joint_epochs")
        raise UsageError(f"method option(s) {scheduled} are set by their own flags ({flags or '--epochs'}), "
                         "not by --set")
    joint = cfg["epochs"] - cfg["warmup_epochs"] - cfg["hard_epochs"]
    try:
        S2HConfig.from_dict({**options, **schedule, "joint_epochs": joint})
    except (ValueError, TypeError) as err:
        raise UsageError(f"method options: {_one_line(err)}") from err


def _refuse_unused(cfg: dict, explicit: set[str]) -> None:
    """Refuse settings given explicitly (by flag or config file) that the chosen method or dataset would ignore,
    and clear the unused ones in ``cfg`` so that config.json shows only what the run uses."""
    from .data import DATASETS, canonical_name

    method = cfg["method"]
    if method in _RATE_METHODS:
        if "target_flops" in explicit:
            raise UsageError(f"--target-flops: method {method} takes no FLOPs target; it masks a fixed fraction "
                             "of every group's channels (--prune-rate)")
        for key, phase in (("warmup_epochs", "warm-up"), ("hard_epochs", "hard-only")):
            if key in explicit and cfg[key]:
                raise UsageError(f"{_flag(key)} {cfg[key]}: method {method} has no {phase} epochs (it trains "
                                 "its R-NN and P-NN together in every epoch)")
        cfg.update(target_flops=None, warmup_epochs=0, hard_epochs=0)
    else:
        if "prune_rate" in explicit:
            raise UsageError(f"--prune-rate: method {method} prunes to a FLOPs target (--target-flops); "
                             f"--prune-rate is for {' / '.join(_RATE_METHODS)}")
        cfg["prune_rate"] = None
    if method != "stp":
        if "search_holdout" in explicit and cfg["search_holdout"] is not None:
            raise UsageError(f"--search-holdout: method {method} has no search; it sets training images aside for "
                             "stp's search")
        cfg["search_holdout"] = None
    try:
        spec = DATASETS[canonical_name(cfg["dataset"])]
    except ValueError as err:
        raise UsageError(_one_line(err)) from err
    if "data_root" in explicit and cfg["data_root"] is not None and not spec.needs_root:
        raise UsageError(f"--data-root: dataset {spec.name} reads no folder ({spec.description})")
    if "skip_bad_files" in explicit and cfg["skip_bad_files"] and not spec.image_files:
        raise UsageError(f"--skip-bad-files: dataset {spec.name} has no image files to skip ({spec.description})")


def _check_train_settings(cfg: dict, explicit: set[str]) -> None:
    """Refuse weight-optimiser settings that the run would ignore (the step schedule's, with another schedule) or
    that are out of range; clear the unused ones in ``cfg`` so that config.json shows only what the run uses."""
    if cfg["schedule"] != "step":
        for key in ("lr_step_epochs", "lr_gamma"):
            if key in explicit:
                raise UsageError(f"{_flag(key)}: applies to --schedule step only (this run's schedule is "
                                 f"{cfg['schedule']})")
        cfg.update(lr_step_epochs=None, lr_gamma=None)
    elif not 0.0 < cfg["lr_gamma"] <= 1.0:
        raise UsageError(f"--lr-gamma must be in (0, 1], got {cfg['lr_gamma']}")
    import torch

    from .trainer import precision_problem

    try:
        device_type = torch.device(cfg["device"]).type
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"--device {cfg['device']!r}: {_one_line(err)}") from err
    problem = precision_problem(cfg["precision"], device_type, _pruner_type(cfg["method"]))
    if problem is not None:
        raise UsageError(f"--precision {cfg['precision']}: {problem}")


def _train_config(cfg: dict) -> Any:
    """The run's :class:`s2hk.trainer.TrainConfig` (settings checked by resolve_prune_config)."""
    from .trainer import TrainConfig

    step = {"step_epochs": cfg["lr_step_epochs"], "gamma": cfg["lr_gamma"]} if cfg["schedule"] == "step" else {}
    return TrainConfig(lr=cfg["lr"], weight_decay=cfg["weight_decay"], schedule=cfg["schedule"], **step,
                       precision=cfg["precision"], progress=cfg["progress"],
                       max_steps_per_epoch=cfg["max_steps_per_epoch"], recalibrate_batches=cfg["recalibrate_batches"],
                       checkpoint_every=cfg["checkpoint_every"])


def _resolve_schedule(cfg: dict) -> None:
    """Warm-up epochs when not given (:data:`WARMUP_FRACTION` of the epochs); the target methods need at least
    one joint epoch, the only epochs in which they prune."""
    if cfg["method"] not in _TARGET_METHODS:
        return
    epochs, hard = cfg["epochs"], cfg["hard_epochs"]
    if cfg["warmup_epochs"] is None:
        cfg["warmup_epochs"] = max(min(int(epochs * WARMUP_FRACTION), epochs - hard - 1), 0)
    warmup = cfg["warmup_epochs"]
    if warmup + hard >= epochs:
        raise UsageError(f"warmup_epochs ({warmup}) + hard_epochs ({hard}) leave no joint epoch of the {epochs} "
                         f"epochs: {cfg['method']} prunes only in joint epochs, so nothing would be pruned; lower "
                         "them or raise --epochs")


def resolve_prune_config(args: argparse.Namespace) -> dict:
    """The run's settings: defaults < config file < flags (``--set`` adds to the file's method options), each
    checked for the chosen method and dataset before any work."""
    cfg = dict(DEFAULTS)
    cfg["method_options"] = {}
    explicit: set[str] = set()
    if args.config:
        for key, value in _read_config_file(args.config).items():
            cfg[key] = _check_setting(key, value, f"config file {args.config}")
            explicit.add(key)
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None and key != "method_options":
            cfg[key] = _check_setting(key, value, _flag(key))
            explicit.add(key)
    cfg["method_options"] = {**cfg["method_options"], **_parse_set(args.set or [])}
    cfg["config_file"] = str(args.config) if args.config else None
    if cfg["method"] not in METHODS:
        raise UsageError(f"method {cfg['method']!r} is not available; available: {', '.join(METHODS)}")
    _refuse_unused(cfg, explicit)
    _resolve_schedule(cfg)
    _check_train_settings(cfg, explicit)
    _check_method_settings(cfg)
    _model_factory(cfg["model"])
    _resolve_out(cfg, explicit)
    return cfg


def _resolve_out(cfg: dict, explicit: set[str]) -> None:
    """``cfg["out"]``: the given folder (``runs/latest`` followed to the run it names), ``runs/latest``'s run
    for ``--resume`` without ``--out``, else None (a new folder, named when the run starts)."""
    if cfg["out"] is not None:
        cfg["out"] = str(_follow_latest(Path(cfg["out"])))
    elif "resume" in explicit and cfg["resume"]:
        latest = RUNS_DIR / LATEST
        target = _follow_latest(latest)
        if not target.is_dir():
            raise UsageError(f"--resume: no run to resume ({latest} does not exist); leave out --resume to start "
                             "a new run, or name the run folder with --out")
        cfg["out"] = str(target)


# ================================================================================================ run folders

def _follow_latest(path: Path) -> Path:
    """The run folder ``path`` points to when it is a ``runs/latest`` pointer (a symbolic link, or a one-line
    text file naming a folder beside it); else ``path`` itself."""
    if path.is_symlink():
        target = Path(os.readlink(path))
        return target if target.is_absolute() else path.parent / target
    if path.is_file() and path.stat().st_size < 4096:
        name = path.read_text(errors="replace").strip()
        if name and "\n" not in name and (path.parent / name).is_dir():
            return path.parent / name
    return path


def _slug(text: str) -> str:
    """``text`` usable as part of a folder name (a model given as package.module:function)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def _new_run_folder(cfg: dict) -> Path:
    """Create ``RUNS_DIR/<method>-<model>-<dataset>-<UTC YYYYmmdd-HHMMSS>`` (``-2``, ``-3``, ... when a run of
    the same second holds the name) and point ``RUNS_DIR/latest`` to it."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = f"{cfg['method']}-{_slug(cfg['model'])}-{_slug(cfg['dataset'])}-{stamp}"
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        folder = RUNS_DIR / (base if n == 1 else f"{base}-{n}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        _point_latest(folder)
        return folder
    raise UsageError(f"{RUNS_DIR}: no free run folder name for {base}")


def _point_latest(folder: Path) -> None:
    """Make ``folder.parent/latest`` point to ``folder``, replacing the previous pointer atomically: a relative
    symbolic link, or where links cannot be made a text file holding the folder's name. A real folder named
    ``latest`` (a run of an earlier s2hk) is left as it is, with a note."""
    from .atomic import atomic_write

    link = folder.parent / LATEST
    if link.is_dir() and not link.is_symlink():
        print(f"s2hk: note: {link} is a run folder of an earlier s2hk version; it is kept, so it does not point "
              f"to {folder} (rename it to let {link} follow the newest run)", file=sys.stderr)
        return
    tmp = folder.parent / f".{LATEST}-{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)  # a pointer left half-made by a killed run of the same process id
    try:
        os.symlink(folder.name, tmp, target_is_directory=True)
    except (OSError, NotImplementedError):  # no symbolic links here (some Windows setups, some network shares)
        atomic_write(link, lambda f: f.write((folder.name + "\n").encode()))
        return
    try:
        os.replace(tmp, link)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        print(f"s2hk: note: {link} could not be pointed to {folder} ({err})", file=sys.stderr)


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


def _pruner_type(method: str) -> type:
    """The pruner class of ``method``."""
    if method in _RATE_METHODS:
        from .crsfp import CRSFPruner, SFPruner

        return CRSFPruner if method == "crsfp" else SFPruner
    if method == "stp":
        from .stp import STPruner

        return STPruner
    from .s2h import S2HPruner

    return S2HPruner


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


def _make_loaders(cfg: dict, device: Any, val_batch_size: Optional[int] = None,
                  search_holdout: bool = False) -> tuple[Any, Any, Any]:
    """The run's deterministic ``(train, val, held_out)`` loaders (two augmented views per image for crsfp;
    unreadable image files left out with ``skip_bad_files``). ``held_out``: with ``search_holdout``, the training
    images ``cfg["search_holdout"]`` sets aside for STP's search (None: :data:`SEARCH_HOLDOUT_FRACTION` of them,
    at most :data:`SEARCH_HOLDOUT_BATCHES` batches), removed from ``train``; else None. Bad dataset names,
    sizes and held-out parts become UsageErrors."""
    from .data import DatasetError, make_loaders

    extra: dict[str, Any] = {"device": device} if device.type == "cuda" else {}
    if cfg.get("method") == "crsfp":
        extra["two_views"] = True
    if cfg.get("skip_bad_files"):
        extra["skip_bad_files"] = True
    if val_batch_size is not None:
        extra["val_batch_size"] = val_batch_size
    if search_holdout and cfg["search_holdout"] is None:
        extra.update(holdout=SEARCH_HOLDOUT_FRACTION, holdout_max=SEARCH_HOLDOUT_BATCHES * cfg["batch_size"])
    elif search_holdout:
        extra["holdout"] = cfg["search_holdout"]
    try:
        loaders = make_loaders(cfg["dataset"], root=cfg["data_root"], batch_size=cfg["batch_size"],
                               image_size=cfg["image_size"], seed=cfg["seed"], num_workers=cfg["num_workers"],
                               **extra)
    except DatasetError:
        raise
    except (ValueError, TypeError) as err:
        if search_holdout and str(err).startswith("holdout"):
            raise UsageError(f"--search-holdout {cfg['search_holdout']}: {_one_line(err)}") from err
        raise UsageError(f"dataset {cfg['dataset']!r}: {_one_line(err)}") from err
    return loaders if len(loaders) == 3 else (*loaders, None)


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
    """Train with the method to the FLOPs target; export the pruned model, plot the run and print a summary.
    Returns 0, or :data:`EXIT_MISSED_TARGET` when the pruned network is outside the target band (on every
    rank, unless ``--allow-missed-target``)."""
    from .distributed import shutdown

    cfg = resolve_prune_config(args)
    started = _start_distributed(cfg)
    try:
        return _run_prune(cfg)
    finally:
        if started:
            shutdown()


def _run_prune(cfg: dict) -> int:
    """Build data, pruner and trainer from ``cfg``, train, and (rank 0) write the outputs; the exit status."""
    import torch

    from .distributed import barrier, is_rank0, world_size
    from .report import PLOT_FILES
    from .trainer import Trainer

    started = time.perf_counter()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    cfg["world_size"] = world_size()
    device = _resolve_device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    train, val, held_out = _make_loaders(cfg, device, search_holdout=cfg["method"] == "stp")
    pruner = _build_pruner(cfg, train.num_classes, train.info.channels, train.image_size, device)
    if held_out is not None:
        pruner.set_search_batches(held_out)
        cfg["search_holdout"] = held_out.num_samples  # resolved: what config.json records and a resume compares
    out = _claim_run_folder(cfg)
    trainer = Trainer(pruner, train, val, epochs=cfg["epochs"], config=_train_config(cfg), out_dir=out,
                      run_config=cfg, resume_ignore=RESUME_IGNORE, other_outputs=_RUN_OUTPUTS + PLOT_FILES,
                      started=started)
    result = trainer.fit(resume=cfg["resume"])
    skipped = _skipped_files(train, val)
    status = 0
    if is_rank0():
        summary = _write_outputs(cfg, pruner, train, result, out, trainer, skipped)
        print(_format_summary(summary))
        if summary["target_met"] is False and not cfg["allow_missed_target"]:
            status = EXIT_MISSED_TARGET
    status = _from_rank0(status)
    barrier()
    return status


def _claim_run_folder(cfg: dict) -> Path:
    """The run folder: ``cfg["out"]``, or a new one created by rank 0 (:func:`_new_run_folder`) whose name every
    rank gets; ``cfg["out"]`` is set to it."""
    if cfg["out"] is None:
        from .distributed import is_rank0

        cfg["out"] = _from_rank0(str(_new_run_folder(cfg)) if is_rank0() else None)
    return Path(cfg["out"])


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (``value`` itself in one process)."""
    from .distributed import is_distributed

    if not is_distributed():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _skipped_files(train: Any, val: Any) -> list[str]:
    """The unreadable image files the loaders left out (``--skip-bad-files``), over all ranks, sorted."""
    from .distributed import is_distributed

    files = set(train.skipped_files) | set(val.skipped_files)
    if is_distributed():
        import torch.distributed as dist

        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(files))
        files = set().union(*gathered)
    return sorted(files)


def _write_outputs(cfg: dict, pruner: Any, train: Any, result: dict, out: Path, trainer: Any,
                   skipped: list[str]) -> dict:
    """Export the pruned model to ``out/pruned``, write ``out/architecture.json``, the PNG plots and
    ``out/summary.json``; returns the summary."""
    import torch

    from .export import save_pruned
    from .flops import count_macs
    from .report import render_report

    pruned_dir = out / "pruned"
    save_pruned(pruner, pruned_dir, model_name=cfg["model"],
                model_kwargs=_model_kwargs(cfg["model"], train.num_classes, train.image_size))
    shutil.copyfile(pruned_dir / "architecture.json", out / "architecture.json")
    plots = [str(p) for p in render_report(out)]
    example = torch.zeros(1, train.info.channels, train.image_size, train.image_size, device=pruner.mask_logits.device)
    dense_macs = int(pruner.flops_polynomial.dense_macs)
    pruned_macs = int(count_macs(pruner.export(), example))
    remaining = pruned_macs / dense_macs
    target = cfg["target_flops"]
    tolerance = getattr(pruner.config, "tolerance", None) if target is not None else None
    summary = {
        "method": cfg["method"], "model": cfg["model"], "dataset": cfg["dataset"],
        "input": f"1x{train.info.channels}x{train.image_size}x{train.image_size}",
        "dense_flops": 2 * dense_macs, "dense_macs": dense_macs,
        "pruned_flops": 2 * pruned_macs, "pruned_macs": pruned_macs,
        "remaining_flops": remaining, "target_flops": target, "flops_tolerance": tolerance,
        "target_met": None if target is None else abs(remaining - target) <= tolerance + 1e-12,
        "allow_missed_target": cfg["allow_missed_target"],
        "soft_acc": result.get("soft_acc"), "hard_acc": result.get("hard_acc"), "gap": result.get("gap"),
        "epochs": cfg["epochs"], "world_size": cfg["world_size"],
        "skipped_files": len(skipped), "skipped_file_list": skipped,
        "plots": plots, "out": str(out),
    }
    this = trainer.invocation_seconds
    summary["wall_seconds"] = trainer.wall_seconds_before + this  # the whole run, over its invocations
    summary["wall_seconds_this_invocation"] = this
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _format_summary(s: dict) -> str:
    """The short summary printed at the end of ``s2hk prune`` (a WARNING line when the target was missed)."""
    def pct(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"

    from .report import network_names

    (a, _), (b, _) = network_names(s["method"])
    target = "" if s["target_flops"] is None else \
        f" (target {pct(s['target_flops'])} +- {pct(s['flops_tolerance'])})"
    lines = [
        f"s2hk prune: {s['method']} on {s['model']} / {s['dataset']} (input {s['input']})",
        f"  dense  : {s['dense_flops'] / 1e6:10.2f} MFLOPs  ({s['dense_macs'] / 1e6:.2f} M MACs)",
        f"  pruned : {s['pruned_flops'] / 1e6:10.2f} MFLOPs  ({s['pruned_macs'] / 1e6:.2f} M MACs)  "
        f"= {pct(s['remaining_flops'])} of dense{target}; FLOPs = 2 x MACs",
        f"  accuracy: {a} {pct(s['soft_acc'])}, {b} {pct(s['hard_acc'])}, gap ({a} - {b}) {pct(s['gap'])}",
    ]
    if s["target_met"] is False:
        status = ("exit status 0 (--allow-missed-target)" if s["allow_missed_target"] else
                  f"exit status {EXIT_MISSED_TARGET} (--allow-missed-target: 0)")
        lines.append(f"  WARNING: target missed: the pruned network has {pct(s['remaining_flops'])} of the dense "
                     f"FLOPs, outside {pct(s['target_flops'])} +- {pct(s['flops_tolerance'])}; train longer "
                     f"(--epochs) or widen the band (--set tolerance=...); {status}")
    if s["skipped_files"]:
        lines.append(f"  skipped: {s['skipped_files']} unreadable image file(s), listed in summary.json")
    this = s["wall_seconds_this_invocation"]
    lines.append(f"  time   : {s['wall_seconds']:.0f} s" +
                 (f" in all, {this:.0f} s in this invocation" if s["wall_seconds"] - this >= 0.5 else ""))
    lines.append(f"  plots  : {', '.join(s['plots']) or 'none'}")
    lines.append(f"  output : {s['out']}  (pruned model in {Path(s['out']) / 'pruned'})")
    return "\n".join(lines)


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
    from .export import load_pruned, read_architecture

    try:
        model_info = read_architecture(folder / "architecture.json")["model"]
        name = model_info.get("name")
        dense = None
        if isinstance(name, str) and ":" in name:
            dense = _build_model(name, model_info.get("kwargs", {}))
        return load_pruned(folder, model=dense)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(_one_line(err)) from err


def cmd_eval(args: argparse.Namespace) -> int:
    """Top-1 accuracy of a pruned model on its dataset's validation split."""
    import torch

    run = _follow_latest(Path(args.run))
    folder = _pruned_folder(run)
    config = _run_config(run)
    model = _load_pruned_model(folder)
    cfg = {**DEFAULTS, **config}
    cfg.update({k: v for k, v in (("dataset", args.dataset), ("data_root", args.data_root),
                                  ("image_size", args.image_size)) if v is not None})
    cfg["num_workers"] = 0
    _, val, _ = _make_loaders(cfg, torch.device("cpu"), val_batch_size=args.batch_size)
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
    run = _follow_latest(Path(args.run))
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

    for path in render_report(_follow_latest(Path(args.run)), args.out):
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

_EXIT_CODES = (f"exit status: 0 done; {EXIT_BAD_INPUT} bad input (one line on stderr, nothing trained); "
               f"{EXIT_MISSED_TARGET} finished, but the pruned network is outside the FLOPs target band "
               f"(target_met: false in summary.json; --allow-missed-target gives 0); {EXIT_INTERRUPTED} "
               "interrupted (add --resume, or --out <its run folder>, to continue)")


def _default(key: str) -> str:
    """`` (default: ...)`` of setting ``key`` for a flag's help."""
    value = DEFAULTS[key]
    if isinstance(value, bool):
        value = "--" + ("" if value else "no-") + key.replace("_", "-")
    return f" (default: {value})"


def _add_prune_parser(sub: Any) -> None:
    """``s2hk prune`` and its flags (all default to None so that a config file can set them; the help names
    the built-in default)."""
    p = sub.add_parser("prune", help="train with a pruning method to a FLOPs target (default: the embedded job)",
                       description="Train with a pruning method to a FLOPs target. With no arguments: "
                                   f"{DEFAULTS['model']} on the embedded digits set to "
                                   f"{DEFAULTS['target_flops']:.0%} of its FLOPs.",
                       epilog=_EXIT_CODES)
    p.add_argument("--config", help="YAML or JSON file of settings (flags override it)")
    p.add_argument("--method", help=f"pruning method ({', '.join(METHODS)})" + _default("method"))
    p.add_argument("--model", help="shipped model name (see s2hk.models.list_models()) or package.module:function"
                   + _default("model"))
    p.add_argument("--dataset", help="digits | cifar10 | cifar100 | tinyimagenet | imagefolder | synthetic"
                   + _default("dataset"))
    p.add_argument("--data-root", dest="data_root",
                   help="dataset folder (cifar10, cifar100, tinyimagenet, imagefolder; refused for digits and "
                        "synthetic, which read none)")
    p.add_argument("--image-size", dest="image_size", type=int, help="side of the served images, pixels"
                   + _default("image_size"))
    p.add_argument("--batch-size", dest="batch_size", type=int, help="global batch (split over torchrun ranks)"
                   + _default("batch_size"))
    p.add_argument("--epochs", type=int, help="training epochs" + _default("epochs"))
    p.add_argument("--warmup-epochs", dest="warmup_epochs", type=int,
                   help="s2h / stp: dense epochs before pruning starts (default: epochs // 6, e.g. 2 of 12, "
                        "leaving at least one joint epoch; crsfp / sfp have none)")
    p.add_argument("--hard-epochs", dest="hard_epochs", type=int,
                   help="s2h / stp: final epochs training the pruned network alone" + _default("hard_epochs"))
    p.add_argument("--target-flops", dest="target_flops", type=float,
                   help="s2h / stp: remaining FLOPs ratio, e.g. 0.35" + _default("target_flops"))
    p.add_argument("--search-holdout", dest="search_holdout", type=float,
                   help="stp: training images set aside (never trained on) to score the search's candidates: a "
                        "number of images, a fraction of the training set, or 0 for none (scores on the last "
                        f"training batches) (default: {SEARCH_HOLDOUT_FRACTION:.0%}% of the training images, at most "
                        f"{SEARCH_HOLDOUT_BATCHES} batches)")
    p.add_argument("--prune-rate", dest="prune_rate", type=float,
                   help="crsfp / sfp: fraction of every prunable group's channels masked" + _default("prune_rate"))
    p.add_argument("--lr", type=float, help="initial SGD learning rate (see --schedule)" + _default("lr"))
    p.add_argument("--schedule", help="learning-rate schedule: cosine (per step, to 0), step (times --lr-gamma every "
                                      "--lr-step-epochs epochs, as CR-SFP's authors train: 0.1 every 30) or "
                                      "constant" + _default("schedule"))
    p.add_argument("--lr-step-epochs", dest="lr_step_epochs", type=int,
                   help="--schedule step: epochs between two decays" + _default("lr_step_epochs"))
    p.add_argument("--lr-gamma", dest="lr_gamma", type=float,
                   help="--schedule step: factor of each decay, in (0, 1]" + _default("lr_gamma"))
    p.add_argument("--precision", help="fp32, or autocast of the training steps and evaluations to bf16 (CPU or GPU) "
                                       "or fp16 (GPU, with a gradient scaler; stp only)" + _default("precision"))
    p.add_argument("--weight-decay", dest="weight_decay", type=float, help="SGD weight decay"
                   + _default("weight_decay"))
    p.add_argument("--seed", type=int, help="seed of weights, data order and augmentation" + _default("seed"))
    p.add_argument("--device", help="cpu | cuda | cuda:N" + _default("device"))
    p.add_argument("--threads", type=int, help="torch CPU threads (0: torch's default)" + _default("threads"))
    p.add_argument("--num-workers", dest="num_workers", type=int, help="loader processes for image-file datasets"
                   + _default("num_workers"))
    p.add_argument("--max-steps-per-epoch", dest="max_steps_per_epoch", type=int, help="cap (0: whole epochs)"
                   + _default("max_steps_per_epoch"))
    p.add_argument("--recalibrate-batches", dest="recalibrate_batches", type=int,
                   help="training batches re-estimating the pruned network's BatchNorm statistics before evaluation"
                   + _default("recalibrate_batches"))
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int,
                   help="also checkpoint every N steps (0: at epoch ends only)" + _default("checkpoint_every"))
    p.add_argument("--out", help=f"run folder; an existing one is resumed (default: a new folder "
                                 f"{RUNS_DIR}/<method>-<model>-<dataset>-<UTC time>, and {RUNS_DIR / LATEST} "
                                 "points to it)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar"
                   + _default("progress"))
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help=f"continue the --out folder's run from its last intact checkpoint; without --out, the run "
                        f"{RUNS_DIR / LATEST} points to. --no-resume: start the --out folder over, its earlier "
                        "files moved to previous-<UTC time>/ (nothing is deleted) (default: --resume when --out is "
                        "given)")
    p.add_argument("--skip-bad-files", dest="skip_bad_files", action="store_true", default=None,
                   help="image-file datasets: leave out unreadable images (counted and listed in summary.json) "
                        "instead of refusing the run (default: refuse, naming the file, before training)")
    p.add_argument("--allow-missed-target", dest="allow_missed_target", action="store_true", default=None,
                   help=f"exit 0 even when the pruned network ends outside the FLOPs target band (smoke runs; "
                        f"default: exit {EXIT_MISSED_TARGET})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="method option, e.g. --set kd=none --set mask_lr=5 (repeatable)")
    p.set_defaults(func=cmd_prune)


def _add_eval_parser(sub: Any) -> None:
    """``s2hk eval RUN``."""
    p = sub.add_parser("eval", help="evaluate a pruned model on its dataset's validation split",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p = sub.add_parser("bench", help="time a training step: dense, s2hk, and the performance model's floor",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    parser = argparse.ArgumentParser(prog="s2hk", description="Prune networks while they train.", epilog=_EXIT_CODES)
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
    """Run the ``s2hk`` command line; returns the exit code (:data:`EXIT_BAD_INPUT` for bad input,
    :data:`EXIT_MISSED_TARGET` for a pruned network outside its target band, 130 when interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        hint = ""
        if args.command == "prune":
            hint = ("; run the same command again to resume from the last checkpoint" if args.out else
                    f"; resume with the same command and --resume (the run {RUNS_DIR / LATEST} points to)")
        _report_error("interrupted" + hint)
        return EXIT_INTERRUPTED
    except Exception as err:
        if not isinstance(err, _user_error_types()):
            raise
        _report_error(_one_line(err))
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
