"""A thin training loop for any s2hk pruner: schedule, progress, evaluation, checkpoints.

The loop only needs the pruner's common surface: ``train_step(x, y, optimizer) -> dict``,
``weight_parameters()``, ``evaluate(batches)``, ``recalibrate_bn(batches, n)``, ``pruning_state()`` /
``load_pruning_state()``, ``set_phase(phase)``, ``flops(kind)`` and optionally ``on_epoch_end()`` and
``adopt_ranks()`` or ``refresh_plan()``.

Mixed precision (``TrainConfig.precision``): "bf16" or "fp16" run each training step, the evaluations and the
end-of-epoch hook (a search, a re-ranking) under :func:`torch.autocast` on the run's device; the weights, their
gradients and the optimiser state stay float32. bf16 needs no loss scaling and also runs on the CPU. fp16 runs
on CUDA only, with a :class:`torch.amp.GradScaler`, and only for a pruner whose ``train_step`` takes it: a
``scaler`` keyword argument, with which the method backpropagates ``scaler.scale(loss)`` for every loss and
steps through ``scaler.step(optimizer)`` (unscaling its gradients and skipping the step when one is not finite);
the trainer calls ``scaler.update()`` after the step. A method that updates more than the weight optimiser's
parameters from its own gradients (S2HPruner's mask logits, through its own mask optimiser) would also have to
unscale those and skip their update with the step.

Resuming from a checkpoint continues bit-identically: weights, masks, both optimisers, the lr schedule, the
gradient scaler, every RNG and the position in the (deterministic) data order are restored, and the metric
records written after the checkpoint by the interrupted run are dropped before they are written again. A
damaged newest checkpoint is passed over for the newest intact one, with one line saying so. An epoch's
checkpoint is written before its evaluation, so a failing evaluation (an unreadable validation image) never
loses the epoch's training. Starting over (``fit(resume=False)``) never deletes: the earlier attempt's files
are moved into ``out_dir/previous-<UTC time>/``.

Data-parallel runs (``torchrun``, see :mod:`s2hk.distributed`): every rank builds the same global batch,
trains on its shard of it, and starts from rank 0's weights and mask logits; evaluation is split over the
ranks and summed, so every rank gets the same result. Only rank 0 writes files and shows progress.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from . import distributed as dist_utils
from .checkpoint import (CheckpointError, capture_rng_state, checkpoint_path, list_checkpoints, load_checkpoint,
                         restore_rng_state, rotate_checkpoints, save_checkpoint)
from .metrics import MetricsLogger

__all__ = ["TrainConfig", "Trainer", "SCHEDULES", "PRECISIONS", "cosine_schedule", "step_schedule",
           "precision_problem"]

SCHEDULES = ("cosine", "step", "constant")  # TrainConfig.schedule
PRECISIONS = ("fp32", "bf16", "fp16")  # TrainConfig.precision
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_STATE_KEYS = frozenset({"model", "pruning", "optimizer", "scheduler", "epoch", "batch", "step", "rng"})


@dataclass
class TrainConfig:
    """Weight-optimiser and loop settings (the method's own settings live in its config).

    Attributes:
        lr: initial SGD learning rate; momentum, nesterov, weight_decay: SGD settings.
        schedule: "cosine" (per step, to 0), "step" (``lr`` times ``gamma`` every ``step_epochs`` epochs, as
            CR-SFP's authors train: lr / 10 every 30 epochs) or "constant".
        step_epochs: epochs between two decays of the "step" schedule (counted in steps: ``step_epochs``
            times the steps of an epoch).
        gamma: factor of each decay of the "step" schedule, in (0, 1].
        precision: "fp32", or "bf16" / "fp16" autocast of the training steps and evaluations (see the module
            docstring; fp16 needs CUDA and a pruner whose ``train_step`` takes a gradient scaler).
        recalibrate_batches: training batches used to re-estimate the hard path's BN statistics before each
            evaluation.
        checkpoint_every: also save every this many steps (0: only at epoch ends).
        keep_last: checkpoints kept in the run folder.
        progress: show a progress bar (rank 0 only).
        max_steps_per_epoch: cap on steps per epoch (0: the whole epoch); for smoke runs.
    """

    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    step_epochs: int = 30
    gamma: float = 0.1
    precision: str = "fp32"
    recalibrate_batches: int = 20
    checkpoint_every: int = 0
    keep_last: int = 2
    progress: bool = True
    max_steps_per_epoch: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if isinstance(self.step_epochs, bool) or not isinstance(self.step_epochs, int) or self.step_epochs < 1:
            raise ValueError(f"step_epochs must be an integer >= 1, got {self.step_epochs!r}")
        if not 0.0 < float(self.gamma) <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("recalibrate_batches", "checkpoint_every", "max_steps_per_epoch"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {self.keep_last}")


def precision_problem(precision: str, device_type: str, pruner_type: type) -> Optional[str]:
    """Why a run of ``pruner_type`` cannot train in ``precision`` on a ``device_type`` device, or None when it can:
    fp16 needs a gradient scaler, which the method's ``train_step`` must take (it runs its own backward and
    optimiser steps), and a CUDA device."""
    if precision != "fp16":
        return None
    if "scaler" not in inspect.signature(pruner_type.train_step).parameters:
        return (f"fp16 needs a gradient scaler, and {pruner_type.__name__}.train_step takes none (it runs its own "
                "backward and optimiser steps, so it would have to scale its losses and unscale what it updates); "
                "use bf16, which needs no scaling")
    if device_type != "cuda":
        return f"fp16 trains on CUDA devices only, not on {device_type}; use bf16 there"
    return None


def cosine_schedule(total_steps: int) -> Callable[[int], float]:
    """lr multiplier ``0.5 (1 + cos(pi t / T))`` at step ``t``."""
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def step_schedule(period_steps: int, gamma: float) -> Callable[[int], float]:
    """lr multiplier ``gamma ** (t // period_steps)`` at step ``t`` (a pure function of the step, so a resumed run
    continues it exactly)."""
    return lambda step: float(gamma) ** (step // max(period_steps, 1))


class Trainer:
    """Train ``pruner`` for ``epochs`` (each epoch's phase from ``phase_of(epoch)``).

    Args:
        pruner: an s2hk pruner (e.g. :class:`s2hk.S2HPruner`).
        train_loader, val_loader: s2hk loaders (deterministic; ``set_epoch`` / ``iter_from`` / ``batch``).
        epochs: number of epochs.
        phase_of: epoch -> phase name passed to ``pruner.set_phase`` (default: the pruner config's phases).
        config: a :class:`TrainConfig`.
        out_dir: run folder for ``metrics.jsonl``, ``epochs.csv``, ``config.json`` and ``checkpoints/``.
        run_config: the resolved configuration, written to ``out_dir/config.json`` and into every checkpoint.
        resume_ignore: keys of ``run_config`` that may differ when resuming (paths, thread counts, ...); any
            other difference between the checkpoint's settings and ``run_config`` refuses the checkpoint.
        other_outputs: names of files or folders in ``out_dir`` that the caller writes for the run (a summary,
            plots); starting over moves them aside with the trainer's own.
        started: the :func:`time.perf_counter` value at which this invocation began (default: now); the
            wall time counted in checkpoints and :attr:`wall_seconds` runs from it.
    """

    #: files and folders the trainer writes in ``out_dir``
    OUTPUTS = ("checkpoints", "metrics.jsonl", "epochs.csv", "config.json", "tensorboard")

    def __init__(self, pruner: nn.Module, train_loader: Any, val_loader: Any, epochs: int,
                 phase_of: Optional[Callable[[int], str]] = None, config: Optional[TrainConfig] = None,
                 out_dir: Optional[str | Path] = None, run_config: Optional[dict] = None,
                 resume_ignore: Iterable[str] = (), other_outputs: Iterable[str] = (),
                 started: Optional[float] = None) -> None:
        self.pruner = pruner
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.epochs = int(epochs)
        self.config = config or TrainConfig()
        self.phase_of = phase_of or _default_phases(pruner)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.run_config = dict(run_config or {})
        self.resume_ignore = frozenset(resume_ignore)
        self.outputs = tuple(self.OUTPUTS) + tuple(other_outputs)
        self.started = time.perf_counter() if started is None else float(started)
        self.optimizer = torch.optim.SGD(pruner.weight_parameters(), lr=self.config.lr,
                                         momentum=self.config.momentum, nesterov=self.config.nesterov,
                                         weight_decay=self.config.weight_decay)
        self.steps_per_epoch = len(train_loader)
        if self.config.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, self.config.max_steps_per_epoch)
        self.total_steps = self.epochs * self.steps_per_epoch
        if self.config.schedule == "cosine":
            factor = cosine_schedule(self.total_steps)
        elif self.config.schedule == "step":
            factor = step_schedule(self.config.step_epochs * self.steps_per_epoch, self.config.gamma)
        else:
            factor = _constant
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.epoch, self.batch, self.step = 0, 0, 0
        self.epoch_ended = False  # the current epoch's training and on_epoch_end are done; evaluation is not
        self.wall_seconds_before = 0.0  # wall time of earlier invocations, up to the checkpoint resumed from (s)
        self.history: list[dict] = []
        self.resumed_from: Optional[Path] = None
        self.device = pruner.mask_logits.device
        problem = precision_problem(self.config.precision, self.device.type, type(pruner))
        if problem is not None:
            raise ValueError(f"precision {self.config.precision}: {problem}")
        self.scaler = torch.amp.GradScaler(self.device.type) if self.config.precision == "fp16" else None

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Optional[Path]:
        """``out_dir/checkpoints`` (None without a run folder)."""
        return self.out_dir / "checkpoints" if self.out_dir is not None else None

    @property
    def wall_seconds(self) -> float:
        """Wall time of the whole run in seconds: earlier invocations up to the checkpoint this one resumed
        from, plus this invocation since ``started`` (time an interrupted invocation spent after its last
        checkpoint is not known, so not counted)."""
        return self.wall_seconds_before + self.invocation_seconds

    @property
    def invocation_seconds(self) -> float:
        """Wall time of this invocation in seconds, since ``started``."""
        return time.perf_counter() - self.started

    def state(self) -> dict:
        """Everything a bit-identical resume needs, as plain data for :func:`s2hk.checkpoint.save_checkpoint`
        (and the run's wall time so far, in seconds, which does not change the numbers)."""
        return {"model": self.pruner.model.state_dict(), "pruning": self.pruner.pruning_state(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "precision": self.config.precision,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "epoch": self.epoch, "batch": self.batch, "step": self.step, "epoch_ended": self.epoch_ended,
                "rng": capture_rng_state(), "history": self.history, "config": self.run_config,
                "wall_seconds": self.wall_seconds}

    def save(self) -> Optional[Path]:
        """Write a checkpoint of the current step (rank 0 only) and drop the oldest beyond ``keep_last``."""
        if self.checkpoint_dir is None or not dist_utils.is_rank0():
            return None
        path = checkpoint_path(self.checkpoint_dir, self.step)
        save_checkpoint(path, self.state())
        rotate_checkpoints(self.checkpoint_dir, self.config.keep_last)
        return path

    def load(self, path: str | Path) -> None:
        """Restore a checkpoint written by :meth:`save`.

        Raises:
            CheckpointError: the file is damaged or foreign, was written for another model or method, or by
                a run with other settings (see ``resume_ignore``).
        """
        self._restore(path, load_checkpoint(path))

    def _restore(self, path: str | Path, state: dict) -> None:
        """Restore the loaded checkpoint ``state`` of ``path`` (refusals as :meth:`load`)."""
        missing = _STATE_KEYS - set(state)
        if missing:
            raise CheckpointError(path, f"not an s2hk training checkpoint (missing {sorted(missing)})")
        self._check_same_run(path, state.get("config") or {})
        precision = state.get("precision", "fp32")  # checkpoints from before mixed precision trained in fp32
        if precision != self.config.precision:
            raise CheckpointError(path, f"was written by a run in precision {precision}, this one trains in "
                                        f"{self.config.precision}; resume with the same precision")
        try:
            self.pruner.model.load_state_dict(state["model"], strict=True)
            self.pruner.load_pruning_state(state["pruning"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None:
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(path, f"was written for another model or method ({reason})") from err
        self.epoch, self.batch, self.step = int(state["epoch"]), int(state["batch"]), int(state["step"])
        self.epoch_ended = bool(state.get("epoch_ended", False))
        self.wall_seconds_before = float(state.get("wall_seconds", 0.0))
        self.history = list(state.get("history", []))
        restore_rng_state(state["rng"])

    def _check_same_run(self, path: str | Path, saved: dict) -> None:
        """Refuse a checkpoint whose run settings differ from ours outside ``resume_ignore``."""
        if not saved or not self.run_config:
            return
        keys = sorted((set(saved) | set(self.run_config)) - self.resume_ignore)
        diffs = [f"{k}: {saved.get(k)!r} -> {self.run_config.get(k)!r}" for k in keys
                 if saved.get(k) != self.run_config.get(k)]
        if diffs:
            raise CheckpointError(path, "was written by a run with other settings (" + "; ".join(diffs) +
                                  "); resume with the same settings, write this run to another folder, or "
                                  "start over without resuming (the folder's files are then moved aside)")

    def resume_if_possible(self) -> Optional[Path]:
        """Load the newest intact checkpoint of the run folder, if any; returns its path.

        Damaged or foreign checkpoints newer than it are passed over, and one line on stderr (rank 0) names the
        newest of them and the checkpoint resumed from; they stay in place (the run overwrites them when it
        reaches their step again).

        Raises:
            CheckpointError: no checkpoint is intact (naming the newest), or the one found is refused by
                :meth:`load` (another model or method, other settings).
        """
        damaged: list[CheckpointError] = []
        self.resumed_from = None
        paths = list_checkpoints(self.checkpoint_dir) if self.checkpoint_dir is not None else []
        for path in reversed(paths):
            try:
                state = load_checkpoint(path)
            except CheckpointError as err:
                damaged.append(err)
                continue
            self._restore(path, state)
            self.resumed_from = path
            if damaged and dist_utils.is_rank0():
                more = f" (and {len(damaged) - 1} older damaged one(s))" if len(damaged) > 1 else ""
                print(f"s2hk: warning: checkpoint {damaged[0].path} is damaged ({damaged[0].reason}){more}; "
                      f"resuming from {path}, the newest intact checkpoint", file=sys.stderr, flush=True)
            return path
        if damaged:
            raise damaged[0]
        return None

    def set_aside(self) -> Optional[Path]:
        """Move the run files already in ``out_dir`` (:attr:`outputs`) into ``out_dir/previous-<UTC time>/``
        (rank 0) so the run starts over without deleting anything; returns that folder (None: nothing there)."""
        if self.out_dir is None or not dist_utils.is_rank0():
            return None
        present = [self.out_dir / name for name in self.outputs if (self.out_dir / name).exists()]
        if not present:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        target = self.out_dir / f"previous-{stamp}"
        suffix = 1
        while target.exists():
            suffix += 1
            target = self.out_dir / f"previous-{stamp}-{suffix}"
        target.mkdir()
        for path in present:
            path.rename(target / path.name)
        print(f"s2hk: starting over in {self.out_dir}: the earlier files were moved to {target}",
              file=sys.stderr, flush=True)
        return target

    # ------------------------------------------------------------------ data parallel
    def synchronize_initial_state(self) -> None:
        """Give every rank rank 0's weights, buffers and mask logits, then rebuild the hard plan from them (from
        rank 0's channel ranking, as a resumed run must: re-ranking from the weights would not give a checkpoint's
        ranks after warm-up steps)."""
        if not dist_utils.is_distributed():
            return
        dist_utils.broadcast_(_unique(list(self.pruner.parameters()) + list(self.pruner.buffers())))
        rebuild = getattr(self.pruner, "adopt_ranks", None) or getattr(self.pruner, "refresh_plan", None)
        if rebuild is not None:
            rebuild()

    def _average_buffers(self) -> None:
        """Average the model's floating-point buffers (BatchNorm running statistics) over the ranks."""
        if dist_utils.is_distributed():
            dist_utils.all_reduce_mean_([b for b in self.pruner.model.buffers() if b.is_floating_point()])

    # ------------------------------------------------------------------ loop
    def fit(self, resume: bool = True, stop_after_steps: Optional[int] = None) -> dict:
        """Train to the end and return the final evaluation (soft/hard accuracy, gap, FLOPs ratio).

        Args:
            resume: continue from the run folder's newest intact checkpoint; False starts over, moving the
                folder's earlier run files aside (:meth:`set_aside`; nothing is deleted).
            stop_after_steps: return ``{}`` after this many more steps (simulates an interruption in tests).
        """
        if resume:
            self.resume_if_possible()
        else:
            self.set_aside()
        self.synchronize_initial_state()
        self._write_config()
        self._announce_resume()
        logger = (MetricsLogger(self.out_dir, resume_step=self.step, pending_epoch=self.epoch_ended)
                  if self.out_dir is not None else None)
        budget = [stop_after_steps]
        try:
            while self.epoch < self.epochs:
                if not self._train_epoch(logger, budget):
                    return {}
                self._finish_epoch(logger)
        finally:
            if logger is not None:
                logger.close()
        return self.history[-1] if self.history else self.evaluate()

    def _train_epoch(self, logger: Optional[MetricsLogger], budget: list[Optional[int]]) -> bool:
        """Run the rest of the current epoch; False when the step budget ran out first."""
        self.pruner.set_phase(self.phase_of(self.epoch))
        self.pruner.train()
        self.train_loader.set_epoch(self.epoch)
        bar = _progress(self.config.progress and dist_utils.is_rank0(), self.steps_per_epoch, self.batch,
                        f"epoch {self.epoch + 1}/{self.epochs} {self.phase_of(self.epoch)}")
        try:
            for x, y in self._epoch_batches():
                if budget[0] is not None:
                    if budget[0] <= 0:
                        return False
                    budget[0] -= 1
                lr = self.optimizer.param_groups[0]["lr"]  # this step's; the scheduler sets the next one's
                metrics = self._train_step(x, y)
                if logger is not None:
                    logger.log("step", epoch=self.epoch, step=self.step, lr=lr, **metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(_postfix(metrics), refresh=False)
                if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        return True

    def _epoch_batches(self) -> Iterator[tuple[Any, Tensor]]:
        """The global batches of the current epoch from the resume position, capped at ``steps_per_epoch``."""
        if self.batch >= self.steps_per_epoch:
            return
        for x, y in self.train_loader.iter_from(self.epoch, self.batch):
            yield x, y
            if self.batch >= self.steps_per_epoch:
                return

    def _train_step(self, x: Any, y: Tensor) -> dict:
        """One optimisation step on this rank's shard of the global batch; returns rank-averaged metrics.

        A global batch that lost images to unreadable files (a loader skipping them) is cut to a multiple of
        the number of ranks, so that it still splits evenly."""
        size = dist_utils.world_size()
        if y.shape[0] % size:
            keep = y.shape[0] - y.shape[0] % size
            x = tuple(t[:keep] for t in x) if isinstance(x, (tuple, list)) else x[:keep]
            y = y[:keep]
        x, y = dist_utils.shard_batch(x, y)
        scaler = {"scaler": self.scaler} if self.scaler is not None else {}
        with self.autocast():
            metrics = self.pruner.train_step(_to(x, self.device), y.to(self.device), self.optimizer, **scaler)
        if self.scaler is not None:
            self.scaler.update()
        self.scheduler.step()
        self.batch += 1
        self.step += 1
        return _mean_over_ranks(metrics, self.device)

    def _finish_epoch(self, logger: Optional[MetricsLogger]) -> None:
        """End-of-epoch hook and a checkpoint, then evaluation, the epoch record and the epoch's checkpoint.

        The first checkpoint keeps the epoch's training when the evaluation fails (an unreadable validation
        image); a resume from it evaluates again without repeating the hook. The second, of the same step,
        replaces it once the record exists."""
        if not self.epoch_ended:
            on_epoch_end = getattr(self.pruner, "on_epoch_end", None)
            if on_epoch_end is not None:
                with self.autocast():
                    on_epoch_end()
            self.epoch_ended = True
            self.save()
        result = self.evaluate()
        record = {"epoch": self.epoch + 1, "step": self.step, "phase": self.phase_of(self.epoch), **result}
        self.history.append(record)
        if logger is not None:
            logger.log("epoch", **record)
        if self.config.progress and dist_utils.is_rank0():
            _write_line(_epoch_line(record, self.epochs))
        self.epoch += 1
        self.batch = 0
        self.epoch_ended = False
        self.save()

    def _write_config(self) -> None:
        """Write the resolved configuration to ``out_dir/config.json`` (rank 0)."""
        if self.out_dir is None or not dist_utils.is_rank0():
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        resolved = {**self.run_config, "train": asdict(self.config), "epochs": self.epochs,
                    "steps_per_epoch": self.steps_per_epoch}
        (self.out_dir / "config.json").write_text(json.dumps(resolved, indent=1, default=str) + "\n")

    def _announce_resume(self) -> None:
        """Say where a resumed run continues from (rank 0, with progress on)."""
        if self.resumed_from is not None and self.config.progress and dist_utils.is_rank0():
            _write_line(f"resuming from {self.resumed_from} (epoch {min(self.epoch + 1, self.epochs)}/"
                        f"{self.epochs}, step {self.step}/{self.total_steps})")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's precision as a context: :func:`torch.autocast` on the run's device to bf16 or fp16, nothing
        for fp32."""
        dtype = _AUTOCAST_DTYPES.get(self.config.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        """Recalibrate the hard path's BN statistics, then soft and hard accuracy, gap and FLOPs ratio (both in the
        run's precision).

        The result holds no wall-clock values, so the metric records of a resumed run equal an uninterrupted
        run's exactly.
        """
        self._average_buffers()
        with self.autocast():
            self.pruner.recalibrate_bn(self._calibration_batches(), self.config.recalibrate_batches)
            out = self._evaluate_paths()
        out["hard_flops_ratio"] = self.pruner.flops("hard") / self.pruner.flops("full")
        cfg = getattr(self.pruner, "config", None)
        if getattr(cfg, "target_flops", None) is not None:
            out["target_flops"] = cfg.target_flops
        if getattr(cfg, "tolerance", None) is not None:
            out["flops_tolerance"] = cfg.tolerance
        return out

    def _calibration_batches(self) -> Iterator[tuple[Any, Tensor]]:
        """The first ``recalibrate_batches`` global training batches of epoch 0 (the same on every rank)."""
        for _, batch in zip(range(self.config.recalibrate_batches), self.train_loader.iter_from(0, 0)):
            yield batch

    def _evaluate_paths(self) -> dict:
        """``pruner.evaluate`` over the validation set; in a data-parallel run each rank takes every
        ``world_size``-th batch and the correct counts are summed."""
        if not dist_utils.is_distributed():
            return self.pruner.evaluate(self.val_loader)
        counted = _Counted(self._rank_val_batches())
        local = self.pruner.evaluate(counted)
        keys = sorted(k for k in local if k.endswith("_acc"))
        totals = torch.tensor([local[k] * counted.images for k in keys] + [float(counted.images)],
                              dtype=torch.float64, device=self.device)
        dist_utils.all_reduce_mean_([totals])
        totals *= dist_utils.world_size()
        images = max(round(float(totals[-1])), 1)
        out = {k: round(v) / images for k, v in zip(keys, totals[:-1].tolist())}
        if "soft_acc" in out and "hard_acc" in out:
            out["gap"] = out["soft_acc"] - out["hard_acc"]
        return out

    def _rank_val_batches(self) -> Iterator[tuple[Any, Tensor]]:
        """This rank's validation batches: indices ``rank, rank + world_size, ...``."""
        rank, size = dist_utils.rank(), dist_utils.world_size()
        if hasattr(self.val_loader, "batch"):
            for i in range(rank, len(self.val_loader), size):
                yield self.val_loader.batch(0, i)
            return
        for i, batch in enumerate(self.val_loader):
            if i % size == rank:
                yield batch


class _Counted:
    """Iterate ``batches`` and count the images seen (``images``)."""

    def __init__(self, batches: Iterable[tuple[Any, Tensor]]) -> None:
        self.batches = batches
        self.images = 0

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        for x, y in self.batches:
            self.images += int(y.shape[0])
            yield x, y


def _default_phases(pruner: nn.Module) -> Callable[[int], str]:
    """The pruner config's epoch -> phase map, or "joint" throughout."""
    cfg = getattr(pruner, "config", None)
    return cfg.phase if hasattr(cfg, "phase") else (lambda epoch: "joint")


def _constant(step: int) -> float:
    """lr multiplier of the constant schedule."""
    return 1.0


def _unique(tensors: list[Tensor]) -> list[Tensor]:
    """``tensors`` without repeats (shared parameters appear once), order kept."""
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _mean_over_ranks(metrics: dict, device: torch.device) -> dict:
    """Average a step's float metrics over the ranks (one small all-reduce on ``device``, which nccl needs to
    be a GPU; identity in one process)."""
    if not dist_utils.is_distributed() or not metrics:
        return metrics
    keys = list(metrics)  # the same insertion order on every rank: train_step builds the dict identically
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist_utils.all_reduce_mean_([values])
    return dict(zip(keys, values.tolist()))


def _to(x: Any, device: torch.device) -> Any:
    """Move a tensor or a tuple of tensors to ``device``."""
    if isinstance(x, (tuple, list)):
        return tuple(t.to(device) for t in x)
    return x.to(device)


def _postfix(metrics: dict) -> dict:
    """The progress bar's short fields: loss, soft/hard batch accuracy, hard FLOPs ratio."""
    keys = {"loss": "loss", "soft_acc": "soft", "hard_acc": "hard", "hard_flops_ratio": "flops"}
    return {short: f"{metrics[k]:.3f}" for k, short in keys.items()
            if k in metrics and not math.isnan(metrics[k])}


def _epoch_line(record: dict, epochs: int) -> str:
    """One line per finished epoch: phase, soft and hard accuracy, gap, FLOPs ratio against the target."""
    def pct(key: str) -> str:
        value = record.get(key)
        return "n/a" if value is None else f"{100 * value:.2f}%"

    target = record.get("target_flops")
    flops = f"FLOPs {record['hard_flops_ratio']:.3f}" + (f" (target {target:.3f})" if target is not None else "")
    return (f"epoch {record['epoch']}/{epochs} {record['phase']}: soft {pct('soft_acc')}, hard {pct('hard_acc')}, "
            f"gap {pct('gap')}, {flops}")


def _progress(enabled: bool, total: int, initial: int, desc: str) -> Any:
    """A tqdm bar for one epoch, or None when progress is off."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)


def _write_line(text: str) -> None:
    """Print a line without breaking an active progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(text)
