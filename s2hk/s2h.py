"""S2HPruner: soft-to-hard distillation with decoupled bidirectional KD (ALGORITHMS.md §1).

One :meth:`S2HPruner.train_step` does: the soft forward and task loss, the hard forward (the physically
narrow network of the current plan), the KD terms routed as :mod:`s2hk.routing` says, the FLOPs regulariser
through the straight-through hard widths, the balanced mask update (:mod:`s2hk.mask_optim`), the weight
optimiser's step, and the next step's hard plan -- read from the device together with the step's metrics
in one host transfer.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import S2HConfig
from .distributed import all_reduce_mean_
from .engine import TensorMove, TwoPathNetwork
from .flops import FLOPS_SCOPES
from .mask_optim import MaskOptimizer
from .routing import logit_gradients, route

__all__ = ["S2HPruner"]


class S2HPruner(TwoPathNetwork):
    """Prune ``model`` to ``target_flops`` of its dense FLOPs while training it.

    Args:
        model: the network to prune (trained in place; :meth:`export` gives the small model).
        example_inputs: one batch (or a batch of one) of the model's input, for tracing and FLOPs.
        target_flops: remaining-FLOPs ratio T of the hard network.
        config: an :class:`S2HConfig`; keyword arguments override its fields.

    Example::

        pruner = S2HPruner(model, torch.randn(1, 3, 32, 32), target_flops=0.35)
        opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.1, momentum=0.9)
        for x, y in loader:
            metrics = pruner.train_step(x, y, opt)
        small = pruner.export()
    """

    def __init__(self, model: nn.Module, example_inputs: Any, target_flops: Optional[float] = None,
                 config: Optional[S2HConfig] = None, **overrides: Any) -> None:
        values = (config or S2HConfig()).to_dict()
        values.update(overrides)
        if target_flops is not None:
            values["target_flops"] = target_flops
        self_config = S2HConfig.from_dict(values)
        super().__init__(model, example_inputs, ignore=self_config.ignore, granularity=self_config.granularity,
                         max_choices=self_config.max_choices, tau=self_config.tau,
                         importance=self_config.importance, prune_embedding=self_config.prune_embedding)
        self.config = self_config
        c = self_config
        self.mask_optimizer = MaskOptimizer(self.mask_logits, self.gate_layout, c.mask_lr, c.flops_weight,
                                            c.tolerance, c.balance, c.max_balance_scale, c.recenter,
                                            c.mask_momentum, c.mask_nesterov, c.mask_weight_decay, c.task_grad_scale)
        self.phase = "joint"
        self._warn_if_target_unreachable()

    def _warn_if_target_unreachable(self) -> None:
        """Say at construction when the masks cannot reach the target: nothing is prunable (the weights are
        trained, the masks never move), or layers that keep their width hold more FLOPs than the target
        allows even with every prunable group at its narrowest width."""
        if not self.prunable:
            warnings.warn("S2HPruner: no channel group of this model is prunable (every group is frozen, ignored "
                          "or feeds the model's output); train_step trains the weights and never moves a mask, so "
                          f"the FLOPs ratio stays 1.0 whatever target_flops ({self.config.target_flops})",
                          UserWarning, stacklevel=3)
            return
        narrowest = self.all_widths(self.gate_layout.granularities)
        minimum = self.flops_polynomial.ratio_at(narrowest, scope=self.config.flops_scope)
        if minimum > self.config.target_flops:
            warnings.warn(f"S2HPruner: target_flops {self.config.target_flops} is unreachable: with every prunable "
                          f"group at its narrowest width the FLOPs ratio (scope {self.config.flops_scope!r}) is "
                          f"{minimum:.4f}, held up by the layers whose width cannot change; the masks will go to "
                          "the narrowest widths and stop there", UserWarning, stacklevel=3)

    # ------------------------------------------------------------------ losses
    def flops_ratio(self, widths: Tensor) -> Tensor:
        """Differentiable F_soft / F_full under :attr:`S2HConfig.flops_scope` for all groups' (straight-through)
        widths."""
        return self.flops_polynomial.ratio(widths, self.config.flops_scope)

    def hard_flops_ratios(self) -> dict[str, float]:
        """The hard network's remaining-FLOPs ratio under both scopes, as metrics: ``hard_flops_ratio`` under
        :attr:`S2HConfig.flops_scope` (what R drives to the target) and ``hard_flops_ratio_<other scope>``
        (``hard_flops_ratio_prunable`` by default)."""
        widths = self.all_widths()
        out = {}
        for scope in sorted(FLOPS_SCOPES, key=lambda s: s != self.config.flops_scope):
            key = "hard_flops_ratio" if scope == self.config.flops_scope else f"hard_flops_ratio_{scope}"
            out[key] = self.flops_polynomial.ratio_at(widths, scope=scope)
        return out

    def flops_loss(self, widths: Tensor) -> tuple[Tensor, Tensor]:
        """``(R, ratio)`` with ``R = lambda (F_soft / F_full - T)^2``."""
        ratio = self.flops_ratio(widths)
        return self.config.flops_weight * (ratio - self.config.target_flops) ** 2, ratio

    # ------------------------------------------------------------------ one step
    def set_phase(self, phase: str) -> None:
        """"warmup" (dense training, masks fixed), "joint" (S2HPruner) or "hard" (hard network only, masks
        frozen at the current architecture)."""
        if phase not in ("warmup", "joint", "hard"):
            raise ValueError(f"phase must be 'warmup', 'joint' or 'hard', got {phase!r}")
        if phase == "hard" and self.phase != "hard":
            # freeze the architecture: pin the kept channels themselves, not just the widths
            self.set_hard_widths({g.name: sel.tolist() if isinstance(sel, Tensor) else list(range(k))
                                  for g, k, sel in zip(self.prunable, self.plan.widths, self.plan.selections)})
        self.phase = phase

    def train_step(self, x: Any, y: Tensor, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """One S2HPruner step on the batch ``(x, y)``; ``optimizer`` holds :meth:`weight_parameters`.

        Returns the step's metrics as floats: loss (task CE of the soft path), kd_hard (G_h), kd_soft (G_s),
        flops_loss (R), soft_flops_ratio (F_soft / F_full), hard_flops_ratio (of the next step's hard
        network), both under ``flops_scope``, hard_flops_ratio_<other scope> (:meth:`hard_flops_ratios`),
        soft_acc and hard_acc (batch accuracies).
        """
        inputs = x if isinstance(x, tuple) else (x,)
        optimizer.zero_grad(set_to_none=True)
        if self.phase == "warmup":
            return self._plain_step(inputs, y, optimizer, "dense")
        if self.phase == "hard":
            return self._plain_step(inputs, y, optimizer, "hard")
        cfg = self.config
        keep, widths = self.gates()
        self.prepare_soft(keep)
        if cfg.fused_paths and cfg.kd != "none":
            self.prepare_hard()
            soft, hard = self.run_dual(*inputs)
        else:
            soft = self.run("soft", *inputs)
            hard = None
            if cfg.kd != "none":
                self.prepare_hard()
                hard = self.run("hard", *inputs)
        grads = logit_gradients(soft, hard, y, cfg.alpha, cfg.kd_temperature)
        flops_loss, ratio = self.flops_loss(widths)
        if self.prunable:  # taken before route's backward frees the gates' graph, which R shares
            (flops_grad,) = torch.autograd.grad(flops_loss, self.mask_logits, retain_graph=True)
        task_grad, kd_grad = route(cfg.kd, soft, hard, grads, self.mask_logits)
        mask_grads = [task_grad] + ([] if kd_grad is None else [kd_grad])
        # data-parallel: average what depends on this rank's shard (R depends on the logits alone)
        all_reduce_mean_([p.grad for p in self.weight_parameters()] + mask_grads)
        if self.prunable:  # with nothing to prune there are no logits to update (R is a constant)
            self.mask_optimizer.step(task_grad, flops_grad.to(task_grad.dtype), flops_loss, _lr_scale(optimizer),
                                     kd_grad)
        optimizer.step()
        soft_acc = _accuracy(soft, y)
        hard_acc = _accuracy(hard, y) if hard is not None else soft_acc.new_tensor(float("nan"))
        values = torch.stack([grads.task_loss.double(), grads.kd_hard.double(), grads.kd_soft.double(),
                              flops_loss.detach().double(), ratio.detach().double(), soft_acc, hard_acc])
        host = self.refresh_plan(extra=values)
        keys = ("loss", "kd_hard", "kd_soft", "flops_loss", "soft_flops_ratio", "soft_acc", "hard_acc")
        metrics = dict(zip(keys, host))
        metrics.update(self.hard_flops_ratios())
        return metrics

    def _plain_step(self, inputs: tuple, y: Tensor, optimizer: torch.optim.Optimizer, path: str) -> dict[str, float]:
        """Cross-entropy training of one path (dense warm-up, or the frozen hard network)."""
        if path == "hard":
            self.prepare_hard()
        logits = self.run(path, *inputs)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        all_reduce_mean_([p.grad for p in self.weight_parameters()])
        optimizer.step()
        acc = _accuracy(logits, y)
        loss_v, acc_v = torch.stack([loss.detach().double(), acc]).tolist()
        nan = float("nan")
        return {"loss": loss_v, "kd_hard": nan, "kd_soft": nan, "flops_loss": nan, "soft_flops_ratio": nan,
                **self.hard_flops_ratios(), "soft_acc": acc_v if path == "dense" else nan,
                "hard_acc": acc_v if path == "hard" else nan}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def recalibrate_bn(self, batches: Iterable, num_batches: int = 200) -> int:
        """Re-estimate the BatchNorm statistics of both networks :meth:`evaluate` tests -- the soft one (the
        model's own statistics, at the current keep-probabilities) and the hard one -- from up to
        ``num_batches`` training batches (:meth:`~s2hk.engine.TwoPathNetwork.recalibrate_norms`); returns the
        number of batches used."""
        return self.recalibrate_norms(batches, num_batches, ("soft", "hard"))

    @torch.no_grad()
    def evaluate(self, batches: Iterable, paths: tuple = ("soft", "hard")) -> dict[str, float]:
        """Top-1 accuracy (fraction) of each path over ``batches``, eval mode; with both paths also the
        discretization gap ``soft_acc - hard_acc``."""
        was_training = self.training
        self.eval()
        correct = {p: torch.zeros((), dtype=torch.float64, device=self.mask_logits.device) for p in paths}
        total = 0
        try:
            if "soft" in paths:
                keep, _ = self.gates()
                self.prepare_soft(keep)
            if "hard" in paths:
                self.prepare_hard()
            for x, y in batches:
                x = x[0] if isinstance(x, (tuple, list)) else x
                x, y = x.to(self.mask_logits.device), y.to(self.mask_logits.device)
                for p in paths:
                    correct[p] += (self.run(p, x).argmax(-1) == y).sum()
                total += y.numel()
        finally:
            self.train(was_training)
        values = torch.stack(list(correct.values())).tolist()
        out = {f"{p}_acc": v / max(total, 1) for p, v in zip(paths, values)}
        if "soft" in paths and "hard" in paths:
            out["gap"] = out["soft_acc"] - out["hard_acc"]
        return out

    # ------------------------------------------------------------------ state
    def pruning_state(self) -> dict:
        """Mask logits, ranks, pinned widths, phase and hard-path BN statistics (the model's own weights are
        in ``model.state_dict()``)."""
        return {"mask_logits": self.mask_logits.detach().clone(), "ranks": self.ranks.clone(),
                "pinned": {str(gi): pin for gi, pin in self.pins().items()},
                "phase": self.phase, "hard_bn": self.hard_norm_state(),
                "mask_optimizer": self.mask_optimizer.state_dict(),
                "groups": self._group_signature()}

    def load_pruning_state(self, state: dict) -> None:
        """Restore :meth:`pruning_state`. Every shape is checked before anything is written, so a state made
        for other channel groups (another model, width or ignore list) is refused and nothing is half-loaded."""
        mine = self._group_signature()
        theirs = [list(g) for g in state.get("groups", [])]
        if theirs != mine:
            raise ValueError(f"pruning state was saved for different channel groups: expected {mine}, got {theirs}")
        checks = [(self.mask_logits, state["mask_logits"], "mask_logits"), (self.ranks, state["ranks"], "ranks")]
        for current, saved, name in checks:
            if tuple(current.shape) != tuple(saved.shape):
                raise ValueError(f"pruning state entry '{name}' has shape {tuple(saved.shape)}, expected "
                                 f"{tuple(current.shape)}")
        writes = [(current, saved) for current, saved, _ in checks] + self.hard_norm_writes(state["hard_bn"])
        with torch.no_grad():
            for current, saved in writes:
                current.copy_(saved)
        self._orders_from_ranks()
        self.phase = state["phase"]
        self.mask_optimizer.load_state_dict(state["mask_optimizer"])
        self.set_pins({int(gi): v for gi, v in state["pinned"].items()})

    def _move_state(self, move: TensorMove) -> None:
        """The engine's state, and the mask optimiser pointed at the logits again: a move to or from ``"meta"``
        (or torch's overwrite-on-conversion mode) and ``load_state_dict(assign=True)`` replace the parameter
        object."""
        super()._move_state(move)
        self.mask_optimizer.logits = self.mask_logits
        self.mask_optimizer.momentum_buffer = _move_buffer(self.mask_optimizer.momentum_buffer, move)

    def _group_signature(self) -> list[list]:
        return [[g.name, g.channels, d] for g, d in zip(self.prunable, self.gate_layout.granularities)]

def _move_buffer(buffer: Optional[Tensor], move: TensorMove) -> Optional[Tensor]:
    """The mask optimiser's momentum buffer converted like the logits it follows; dropped when it leaves
    ``"meta"``, where it kept no values (the momentum restarts, as after construction)."""
    if buffer is None or (buffer.is_meta and move.device.type != "meta"):
        return None
    return move.convert(buffer)


def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.detach().argmax(-1) == y).double().mean()


def _lr_scale(optimizer: torch.optim.Optimizer) -> float:
    group = optimizer.param_groups[0]
    initial = group.get("initial_lr", group["lr"])
    return group["lr"] / initial if initial else 1.0

