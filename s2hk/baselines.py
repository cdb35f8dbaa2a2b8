"""Baselines on the two-path engine: uniform L1-norm filter pruning ("train, prune, fine-tune").

Uniform L1 pruning keeps the same fraction ``r`` of the channels in every prunable channel group, the group's
highest filter-L1-norm channels (the engine's ranking: group-mean filter L1 norm over the layers producing the
group, :meth:`s2hk.engine.TwoPathNetwork.update_ranks`), with ``r`` chosen so that the pruned network's exact
FLOPs ratio (:attr:`~s2hk.engine.TwoPathNetwork.flops_polynomial`, the counter of the regulariser and of the
report) is as close as possible to the target.

The schedule (:class:`UniformL1Pruner`) reuses S2HPruner's phases instead of a loop of its own:

1. ``"warmup"``: the dense network is trained with cross-entropy for the first ``dense_epochs`` epochs
   (S2HPruner's warm-up, masks untouched);
2. on entering ``"hard"``: the widths of :func:`uniform_l1_widths` are computed from the weights *now*, pinned
   (:meth:`~s2hk.engine.TwoPathNetwork.set_hard_widths`: the most important channels), and S2HPruner's hard
   phase freezes the kept channel sets themselves;
3. ``"hard"``: the physically narrow network is fine-tuned with cross-entropy for the remaining epochs
   (S2HPruner's hard-only phase), then :meth:`export` gives the plain small model.

With :class:`s2hk.trainer.Trainer` this is one call::

    pruner = UniformL1Pruner(model, torch.zeros(1, 3, 8, 8), target_flops=0.35, epochs=10)  # 5 dense + 5 fine-tune
    Trainer(pruner, train, val, epochs=10).fit(resume=False)
    small = pruner.export()

By hand: ``pruner.set_phase("warmup")``, train; ``pruner.set_phase("hard")`` (prunes), train; ``export()``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import torch.nn as nn

from .engine import TwoPathNetwork
from .s2h import S2HPruner

__all__ = ["UniformPlan", "uniform_widths_at", "flops_ratio_at", "uniform_l1_plan", "uniform_l1_widths",
           "UniformL1Pruner"]


@dataclass(frozen=True)
class UniformPlan:
    """The uniform architecture chosen for a FLOPs target.

    Attributes:
        widths: kept channels per prunable group, by group name.
        keep_ratio: the common keep-ratio ``r`` (each width is ``r * C_g`` rounded to the group's granularity).
        flops_ratio: exact FLOPs ratio (pruned / dense) of the network at ``widths``.
        target_flops: the target it was chosen for.
    """

    widths: dict[str, int]
    keep_ratio: float
    flops_ratio: float
    target_flops: float


def uniform_widths_at(net: TwoPathNetwork, keep_ratio: float) -> list[int]:
    """Every prunable group's width at keep-ratio ``r``: ``r * C_g`` rounded (half up) to a multiple of the
    group's granularity ``d_g``, at least ``d_g`` and at most ``C_g``; in the order of ``net.prunable``."""
    out = []
    for group, d in zip(net.prunable, net.gate_layout.granularities):
        steps = math.floor(keep_ratio * group.channels / d + 0.5)
        out.append(int(min(max(steps, 1) * d, group.channels)))
    return out


def flops_ratio_at(net: TwoPathNetwork, widths: Sequence[int]) -> float:
    """Exact FLOPs ratio (pruned / dense) of ``net`` with its prunable groups at ``widths`` (frozen groups full)."""
    return net.flops_polynomial.flops_at(net.all_widths(widths)) / net.flops_polynomial.dense_flops


def uniform_l1_plan(net: TwoPathNetwork, target_flops: float, iterations: int = 60) -> UniformPlan:
    """The common keep-ratio ``r`` whose uniform widths' exact FLOPs ratio is closest to ``target_flops``.

    The ratio is a non-decreasing step function of ``r``; bisection finds the step where it crosses the
    target, and of the architectures on either side of it the one nearer the target is taken (ties: the
    smaller). The result is granularity-limited: no uniform architecture is nearer the target.
    """
    if not 0.0 < float(target_flops) <= 1.0:
        raise ValueError(f"target_flops must be in (0, 1], got {target_flops}")
    if not net.prunable:
        return UniformPlan({}, 1.0, 1.0, float(target_flops))
    lo, hi = 0.0, 1.0
    if flops_ratio_at(net, uniform_widths_at(net, hi)) > target_flops:  # 1.0 always is; keep the invariant
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            if flops_ratio_at(net, uniform_widths_at(net, mid)) > target_flops:
                hi = mid
            else:
                lo = mid
    candidates = [(abs(flops_ratio_at(net, uniform_widths_at(net, r)) - target_flops), i, r)
                  for i, r in enumerate((lo, hi))]
    _, _, r = min(candidates)
    widths = uniform_widths_at(net, r)
    return UniformPlan({g.name: k for g, k in zip(net.prunable, widths)}, float(r), flops_ratio_at(net, widths),
                       float(target_flops))


def uniform_l1_widths(net: TwoPathNetwork, target_flops: float) -> dict[str, int]:
    """Per prunable group name, the width of the uniform architecture nearest ``target_flops`` in exact FLOPs
    (see :func:`uniform_l1_plan`, which also reports ``r`` and the ratio reached). Pass the result to
    ``net.set_hard_widths`` to keep each group's highest filter-L1-norm channels."""
    return uniform_l1_plan(net, target_flops).widths


class UniformL1Pruner(S2HPruner):
    """Uniform L1-norm filter pruning: train dense, prune every group to the same keep-ratio, fine-tune.

    Args:
        model: the network (trained in place; :meth:`export` gives the small model).
        example_inputs: one batch (or a batch of one) of the model's input, for tracing and FLOPs.
        target_flops: remaining-FLOPs ratio the uniform architecture is chosen for (nearest reachable).
        epochs: total epochs (dense training + fine-tuning).
        dense_epochs: epochs of dense training before pruning (default: ``round(dense_fraction * epochs)``).
        dense_fraction: see ``dense_epochs`` (default 0.5: dense for half the epochs, fine-tune the rest).
        **overrides: further :class:`s2hk.S2HConfig` fields (``granularity``, ``ignore``, ...).

    The phases are S2HPruner's: ``config.phase(epoch)`` is "warmup" for the dense epochs and "hard" after.
    :attr:`uniform_plan` holds the :class:`UniformPlan` once the network was pruned.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, target_flops: float = 0.35, epochs: int = 10,
                 dense_epochs: Optional[int] = None, dense_fraction: float = 0.5, **overrides: Any) -> None:
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if dense_epochs is None:
            if not 0.0 <= float(dense_fraction) <= 1.0:
                raise ValueError(f"dense_fraction must be in [0, 1], got {dense_fraction}")
            dense_epochs = int(math.floor(dense_fraction * epochs + 0.5))
        if not 0 <= dense_epochs <= epochs:
            raise ValueError(f"dense_epochs must be in 0..{epochs}, got {dense_epochs}")
        clash = sorted({"warmup_epochs", "joint_epochs", "hard_epochs"} & set(overrides))
        if clash:
            raise ValueError(f"{clash} are set by epochs / dense_epochs")
        super().__init__(model, example_inputs, target_flops=target_flops, warmup_epochs=dense_epochs,
                         joint_epochs=0, hard_epochs=epochs - dense_epochs, **overrides)
        self.uniform_plan: Optional[UniformPlan] = None
        self.phase = "warmup"

    def prune(self) -> UniformPlan:
        """Pin the uniform L1 architecture for the current weights (ranks refreshed from the filter norms);
        returns the plan. Called on entering the hard phase."""
        plan = uniform_l1_plan(self, self.config.target_flops)
        self.update_ranks()
        if plan.widths:
            self.set_hard_widths(plan.widths)
        self.uniform_plan = plan
        return plan

    def pruning_state(self) -> dict:
        """S2HPruner's state plus the uniform plan (None before pruning)."""
        state = super().pruning_state()
        state["uniform_plan"] = None if self.uniform_plan is None else asdict(self.uniform_plan)
        return state

    def load_pruning_state(self, state: dict) -> None:
        """Restore :meth:`pruning_state` (the pinned channels come back through S2HPruner's state)."""
        super().load_pruning_state(state)
        plan = state.get("uniform_plan")
        self.uniform_plan = None if plan is None else UniformPlan(**plan)

    def set_phase(self, phase: str) -> None:
        """"warmup" (dense CE training) or "hard" (the first time: prune to the uniform L1 widths and freeze the
        kept channels; then CE fine-tuning of the narrow network). "joint" is S2HPruner's and not used here."""
        if phase == "hard" and self.phase != "hard":
            self.prune()
        super().set_phase(phase)
