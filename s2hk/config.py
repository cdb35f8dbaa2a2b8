"""Every S2HPruner hyper-parameter with its default, in one place (ALGORITHMS.md §1).

Defaults follow the specification; where it leaves a choice open, the choice and its reason are noted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Optional

from .flops import FLOPS_SCOPES

__all__ = ["S2HConfig", "KD_MODES"]

KD_MODES = ("decoupled", "unidirectional", "mutual", "none")


@dataclass
class S2HConfig:
    """S2HPruner settings.

    Attributes:
        target_flops: T, the hard network's target remaining-FLOPs ratio (pruned / dense, same counter).
        kd: gradient routing of the distillation terms: "decoupled" (the method), "unidirectional"
            (no soft-from-hard term), "mutual" (both terms reach everything upstream of their student) or
            "none" (plain differentiable-mask pruning, no hard network training).
        alpha: weight of each KL term (G_h, G_s).
        kd_temperature: softmax temperature of the KL terms (our choice: 1, as the spec's KD has none).
        tau: temperature of the width-choice softmax.
        granularity: channels per width choice ``d``: one int for all groups, a dict by group name, or None
            (the largest ``d`` giving at most ``max_choices`` choices).
        max_choices: bound on width choices per group for the default granularity.
        importance: "dynamic" (re-rank channels by filter L1 norm every step) or "frozen" (rank once).
        flops_weight: lambda of R = lambda * (F / F_full - T)^2.
        flops_scope: what the FLOPs ratio of R and of the reported ``*_flops_ratio`` metrics counts
            (:data:`s2hk.flops.FLOPS_SCOPES`): "all" (default: every conv, linear and matmul, stem and classifier
            included -- the report's counter, ALGORITHMS.md §4) or "prunable" (only the layers whose width can
            change, stem and classifier out -- how the S2HPruner authors' regulariser counts, so their nominal
            targets compare). The hard network's ratio under the other scope is reported too
            (``hard_flops_ratio_prunable`` / ``hard_flops_ratio_all``).
        tolerance: rho, the band around the target in which the FLOPs gradient fades.
        balance: beta, the data / FLOPs gradient balance factor.
        max_balance_scale: optional cap on the balancing up-scale factor (None: uncapped, as specified).
        mask_lr: learning rate of the mask logits at the weight optimiser's initial lr; it follows the weight
            lr schedule (scaled by lr / initial_lr). Our choice: 20, measured on the embedded job (resnet56,
            digits, 264 steps) to bring the max-initialised logits (u_L ~ 5) to the target within the first
            half of the joint phase; longer runs (ImageNet: thousands of steps per epoch) want a smaller one.
        mask_momentum, mask_nesterov, mask_weight_decay: the mask optimiser's SGD settings on the logits, with
            torch.optim.SGD's semantics (weight decay added to the balanced gradient, then momentum, Nesterov's
            look-ahead). The S2HPruner authors' mask optimiser has all three.
        task_grad_scale: with kd="decoupled", rescale each group's dL/du to ``task_grad_scale * ||dG_s/du||``
            before forming g_D = dG_s/du + dL/du (the authors' ``sup_soft_dis_scale``): the task loss then moves
            the masks in proportion to what the hard network teaches them, whatever the loss scales. None: the
            raw sum (the spec's g_D); 0: dL/du left out. Other kd modes have no separate dG_s/du and use the
            raw data gradient.
        recenter: subtract each group's mean logit after every update (softmax is shift-invariant).
        fused_paths: run both paths in one traversal so fused dual-path kernels can share launches; same
            results (:meth:`s2hk.engine.TwoPathNetwork.run_dual`; only where the hard path runs: kd != "none").
        prune_embedding: also prune channels normalised by a LayerNorm (a transformer's embedding width, shared
            by its residual stream and every LayerNorm on it); off by default (see :func:`s2hk.graph.analyze`).
        warmup_epochs / joint_epochs / hard_epochs: dense warm-up (masks fixed at full width), joint soft + hard
            training with mask updates, and final hard-only training with frozen masks.
    """

    target_flops: float = 0.35
    kd: str = "decoupled"
    alpha: float = 1.0
    kd_temperature: float = 1.0
    tau: float = 1.0
    granularity: Any = None
    max_choices: int = 32
    importance: str = "dynamic"
    flops_weight: float = 1.0
    tolerance: float = 0.01
    balance: float = 1.0
    max_balance_scale: Optional[float] = None
    mask_lr: float = 20.0
    mask_momentum: float = 0.0
    mask_nesterov: bool = False
    mask_weight_decay: float = 0.0
    task_grad_scale: Optional[float] = None
    flops_scope: str = "all"
    recenter: bool = False
    fused_paths: bool = False
    prune_embedding: bool = False
    warmup_epochs: int = 0
    joint_epochs: int = 10
    hard_epochs: int = 0
    ignore: tuple = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not 0.0 < self.target_flops <= 1.0:
            raise ValueError(f"target_flops must be in (0, 1], got {self.target_flops}")
        if self.kd not in KD_MODES:
            raise ValueError(f"kd must be one of {KD_MODES}, got {self.kd!r}")
        if self.importance not in ("dynamic", "frozen"):
            raise ValueError(f"importance must be 'dynamic' or 'frozen', got {self.importance!r}")
        for name in ("tau", "kd_temperature", "tolerance"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_epochs", "joint_epochs", "hard_epochs", "mask_lr", "mask_weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.mask_momentum < 1.0:
            raise ValueError(f"mask_momentum must be in [0, 1), got {self.mask_momentum}")
        if self.mask_nesterov and self.mask_momentum == 0:
            raise ValueError("mask_nesterov needs mask_momentum > 0 (Nesterov's look-ahead is along the momentum)")
        if self.task_grad_scale is not None and not 0.0 <= self.task_grad_scale < float("inf"):
            raise ValueError(f"task_grad_scale must be None or a finite number >= 0, got {self.task_grad_scale}")
        if self.max_balance_scale is not None and not self.max_balance_scale >= 1.0:
            raise ValueError(f"max_balance_scale caps an up-scaling factor: None or >= 1, got {self.max_balance_scale}")
        if self.flops_scope not in FLOPS_SCOPES:
            raise ValueError(f"flops_scope must be one of {FLOPS_SCOPES}, got {self.flops_scope!r}")
        self.ignore = tuple(self.ignore)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "S2HConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown S2HPruner settings {unknown}; known: {sorted(known)}")
        return cls(**dict(values))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ignore"] = list(self.ignore)
        return out

    @property
    def total_epochs(self) -> int:
        return self.warmup_epochs + self.joint_epochs + self.hard_epochs

    def phase(self, epoch: int) -> str:
        """"warmup", "joint" or "hard" for a 0-based epoch."""
        if epoch < self.warmup_epochs:
            return "warmup"
        if epoch < self.warmup_epochs + self.joint_epochs:
            return "joint"
        return "hard"
