"""A thin training loop for any s2hk pruner: schedule, progress, evaluation, checkpoints, export.

The loop only needs the pruner's common surface: ``train_step(x, y, optimizer) -> dict``,
``weight_parameters()``, ``evaluate(batches)``, ``recalibrate_bn(batches, n)``, ``pruning_state()`` /
``load_pruning_state()``, ``set_phase(phase)`` and optionally ``on_epoch_end()``. Resuming from a
checkpoint continues bit-identically: weights, masks, both optimisers, the lr schedule, every RNG and the
position in the (deterministic) data order are restored.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .checkpoint import (CheckpointError, capture_rng_state, checkpoint_path, latest_checkpoint, load_checkpoint,
                         restore_rng_state, rotate_checkpoints, save_checkpoint)
from .metrics import MetricsLogger

__all__ = ["TrainConfig", "Trainer", "cosine_schedule"]


@dataclass
class TrainConfig:
    """Weight-optimiser and loop settings (the method's own settings live in its config).

    Attributes:
        lr: initial SGD learning rate; momentum, nesterov, weight_decay: SGD settings.
        schedule: "cosine" (per step, to 0) or "constant".
        recalibrate_batches: training batches used to re-estimate the hard path's BN statistics before each
            evaluation.
        checkpoint_every: also save every this many steps (0: only at epoch ends).
        keep_last: checkpoints kept in the run folder.
        progress: show a progress bar.
        max_steps_per_epoch: cap on steps per epoch (0: the whole epoch); for smoke runs.
    """

    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    recalibrate_batches: int = 20
    checkpoint_every: int = 0
    keep_last: int = 2
    progress: bool = True
    max_steps_per_epoch: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")


def cosine_schedule(total_steps: int) -> Callable[[int], float]:
    """lr multiplier ``0.5 (1 + cos(pi t / T))`` at step ``t``."""
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


class Trainer:
    """Train ``pruner`` for ``epochs`` (each epoch's phase from ``phase_of(epoch)``).

    Args:
        pruner: an s2hk pruner (e.g. :class:`s2hk.S2HPruner`).
        train_loader, val_loader: s2hk loaders (deterministic; ``set_epoch`` / ``iter_from``).
        epochs: number of epochs.
        phase_of: epoch -> phase name passed to ``pruner.set_phase`` (default: the pruner config's phases).
        config: a :class:`TrainConfig`.
        out_dir: run folder for metrics, checkpoints, the resolved config and the exported model.
        run_config: the resolved configuration written to ``out_dir/config.json``.
    """

    def __init__(self, pruner: nn.Module, train_loader: Any, val_loader: Any, epochs: int,
                 phase_of: Optional[Callable[[int], str]] = None, config: Optional[TrainConfig] = None,
                 out_dir: Optional[str | Path] = None, run_config: Optional[dict] = None) -> None:
        self.pruner = pruner
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.epochs = epochs
        self.config = config or TrainConfig()
        if phase_of is None:
            cfg = getattr(pruner, "config", None)
            phase_of = cfg.phase if hasattr(cfg, "phase") else (lambda epoch: "joint")
        self.phase_of = phase_of
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.run_config = run_config or {}
        self.optimizer = torch.optim.SGD(pruner.weight_parameters(), lr=self.config.lr,
                                         momentum=self.config.momentum, nesterov=self.config.nesterov,
                                         weight_decay=self.config.weight_decay)
        self.steps_per_epoch = len(train_loader)
        if self.config.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, self.config.max_steps_per_epoch)
        total = epochs * self.steps_per_epoch
        factor = cosine_schedule(total) if self.config.schedule == "cosine" else (lambda step: 1.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.epoch, self.batch, self.step = 0, 0, 0
        self.history: list[dict] = []
        self.device = pruner.mask_logits.device

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        return {"model": self.pruner.model.state_dict(), "pruning": self.pruner.pruning_state(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "epoch": self.epoch, "batch": self.batch, "step": self.step, "rng": capture_rng_state(),
                "history": self.history, "config": self.run_config}

    def save(self) -> Optional[Path]:
        if self.out_dir is None or not _is_rank0():
            return None
        path = checkpoint_path(self.out_dir / "checkpoints", self.step)
        save_checkpoint(path, self.state())
        rotate_checkpoints(self.out_dir / "checkpoints", self.config.keep_last)
        return path

    def load(self, path: str | Path) -> None:
        """Restore a checkpoint written by :meth:`save`; refuses one from another model or method."""
        state = load_checkpoint(path)
        missing = {"model", "pruning", "optimizer", "scheduler", "epoch", "batch", "step", "rng"} - set(state)
        if missing:
            raise CheckpointError(path, f"not a training checkpoint (missing {sorted(missing)})")
        try:
            self.pruner.model.load_state_dict(state["model"], strict=True)
            self.pruner.load_pruning_state(state["pruning"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(path, f"does not match this model and method ({err})") from err
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.batch, self.step = int(state["epoch"]), int(state["batch"]), int(state["step"])
        self.history = list(state.get("history", []))
        restore_rng_state(state["rng"])

    def resume_if_possible(self) -> Optional[Path]:
        if self.out_dir is None:
            return None
        path = latest_checkpoint(self.out_dir / "checkpoints")
        if path is not None:
            self.load(path)
        return path

    # ------------------------------------------------------------------ loop
    def fit(self, resume: bool = True, stop_after_steps: Optional[int] = None) -> dict:
        """Train to the end (or ``stop_after_steps`` more steps, for tests of interruption); returns the final
        evaluation (soft/hard accuracy, gap, FLOPs)."""
        if resume:
            self.resume_if_possible()
        if self.out_dir is not None and _is_rank0():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(
                {**self.run_config, "train": asdict(self.config), "epochs": self.epochs}, indent=1, default=str))
        logger = MetricsLogger(self.out_dir, resume_step=self.step) if self.out_dir is not None else None
        steps_left = stop_after_steps
        try:
            while self.epoch < self.epochs:
                self.pruner.set_phase(self.phase_of(self.epoch))
                self.pruner.train()
                self.train_loader.set_epoch(self.epoch)
                bar = _progress(self.config.progress and _is_rank0(), self.steps_per_epoch, self.batch,
                                f"epoch {self.epoch + 1}/{self.epochs}")
                for x, y in self.train_loader.iter_from(self.epoch, self.batch):
                    if self.batch >= self.steps_per_epoch:
                        break
                    if steps_left is not None and steps_left <= 0:
                        return {}
                    metrics = self.pruner.train_step(_to(x, self.device), y.to(self.device), self.optimizer)
                    self.scheduler.step()
                    self.batch += 1
                    self.step += 1
                    if steps_left is not None:
                        steps_left -= 1
                    if logger is not None:
                        logger.log("step", epoch=self.epoch, step=self.step, lr=self.optimizer.param_groups[0]["lr"],
                                   **metrics)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(_postfix(metrics), refresh=False)
                    if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                        self.save()
                if bar is not None:
                    bar.close()
                on_epoch_end = getattr(self.pruner, "on_epoch_end", None)
                if on_epoch_end is not None:
                    on_epoch_end()
                result = self.evaluate()
                record = {"epoch": self.epoch + 1, "step": self.step, "phase": self.phase_of(self.epoch), **result}
                self.history.append(record)
                if logger is not None:
                    logger.log("epoch", **record)
                self.epoch += 1
                self.batch = 0
                self.save()
        finally:
            if logger is not None:
                logger.close()
        return self.history[-1] if self.history else self.evaluate()

    def evaluate(self) -> dict:
        """Recalibrate the hard path's BN statistics, then soft and hard accuracy, gap and FLOPs ratio."""
        started = time.perf_counter()
        calib = (batch for i, batch in zip(range(self.config.recalibrate_batches), self.train_loader.iter_from(0, 0)))
        self.pruner.recalibrate_bn(calib, self.config.recalibrate_batches)
        out = self.pruner.evaluate(self.val_loader)
        out["hard_flops_ratio"] = self.pruner.flops("hard") / self.pruner.flops("full")
        target = getattr(getattr(self.pruner, "config", None), "target_flops", None)
        if target is not None:
            out["target_flops"] = target
        out["eval_seconds"] = time.perf_counter() - started
        return out


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, (tuple, list)):
        return tuple(t.to(device) for t in x)
    return x.to(device)


def _postfix(metrics: dict) -> dict:
    keys = {"loss": "loss", "soft_acc": "soft", "hard_acc": "hard", "hard_flops_ratio": "flops"}
    return {short: f"{metrics[k]:.3f}" for k, short in keys.items()
            if k in metrics and not math.isnan(metrics[k])}


def _progress(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)


def _is_rank0() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0
