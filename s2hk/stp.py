"""STP on the two-path engine (ALGORITHMS.md §3): stimulative training, KD-guided search, mutating expansion.

Every design choice below is ours (the paper's method section was not available) and is an argument of
:class:`STPruner` / a field of :class:`STPConfig`.

Architecture space
------------------
An :class:`Architecture` is one width per prunable channel group, a multiple of the group's granularity
``d_g`` (:attr:`~s2hk.engine.TwoPathNetwork.gate_layout`) in ``[d_g, C_g]`` -- the kept channels are the
group's most important ones (the engine's ranking) -- and one depth per stage of skippable residual blocks
(:func:`s2hk.depth.find_stages`: blocks whose identity shortcut is the block's input, found from the graph),
in ``[min(min_depth, D_s), D_s]``: the stage keeps its first ``depth`` blocks, the others are the identity.
With ``search_depth=False`` every stage stays at its full depth ``D_s`` (a width-only space). Its FLOPs are
exact: ``flops_polynomial.flops_at`` without the terms of the skipped blocks' layers.

One step (stimulative training)
-------------------------------
The full network runs the dense path and gets ``CE(z_full, y)``; then each of ``num_subnets`` sampled subnets
is pinned (widths: :meth:`~s2hk.engine.TwoPathNetwork.set_hard_widths`; depths: the skipped blocks), runs
the physically narrow (and shallower) hard path and gets
``kd_weight * T^2 * KL(softmax(sg(z_full) / T) || softmax(z_sub / T))`` (batch mean; ``sg``: the teacher is
detached, so subnets train the weights only through their own logits). The gradients are summed and the
optimiser steps once. Dropped weights carry no penalty: a weight outside every sampled subnet gets the CE
gradient of the full network only.

Subnet mutating expansion
-------------------------
Training subnets are mutations of the current best architecture, repaired to the *current* budget
``B(t)``, which goes linearly from 1.0 to ``target_flops`` over the first ``expansion_fraction`` of the joint
epochs (``total_epochs - warmup_epochs - hard_epochs``) and stays at the target afterwards; the budget of the
epoch in progress is the one reached at its end (so a single joint epoch trains at the target). With
``include_anchor`` the first subnet is the best architecture itself (repaired to ``B(t)``). Early budgets
near 1.0 bring the skipped blocks back (repair adds depth when the widths alone cannot reach the budget).

KD-guided exploration
---------------------
:meth:`STPruner.search` (at every epoch end of a joint epoch, and every ``search_every`` steps if > 0) runs a
small evolutionary search at the final budget: a population of ``population`` architectures (the current
best, mutations of it and random ones), then ``generations`` rounds keeping the best half and filling the
rest with uniform-crossover (widths and depths) + mutation children. A mutation moves each group's width with
probability ``mutation_prob`` by up to ``mutation_scale`` of its choices and each stage's depth with the same
probability by one block. Every candidate is repaired to the budget (``|F / F_full - target| <= tolerance``)
at its depths: its widths are scaled by one common factor (bisection), then moved by single ``d_g`` steps (or a
step up in one group and down in another) while that brings the ratio closer; where the widths cannot reach
the budget, one stage (at random) gains or loses a block and the widths are repaired again. Fitness is the KD
loss (KL of the full network's eval-mode distribution to the candidate's, per sample) on held-out training
images -- a part of the training split the weights are never trained on, given by
:meth:`STPruner.set_search_batches` (``s2hk prune`` sets aside ``--search-holdout`` images for it; see
:func:`s2hk.data.make_loaders`' ``holdout``) -- after re-estimating the candidate's BatchNorm statistics from the
last ``calibration_batches`` training batches of the steps, kept in memory (statistics need no held-out data:
they are re-estimated, not learnt; without memory yet, from the held-out batches). Without held-out batches (a
pruner used directly) the fitness falls back to the last ``held_out_batches`` remembered training batches,
which the weights were just trained on, and the first search says so in a warning. The evaluation budget is
fixed: ``population + generations * (population - elite)`` candidates at most. Weights do not change during a
search.

Hard path with skipped blocks
-----------------------------
The hard path of an architecture that skips blocks runs :func:`s2hk.depth.skip_blocks` of the two-path graph
(cached per set of skipped blocks; same layers, same weights): a skipped block's layers neither run, nor get
a gradient from that subnet, nor update their BatchNorm statistics.

Output
------
:meth:`STPruner.export` pins the best architecture and exports it physically -- kept channels only, skipped
blocks removed with their weights; no fine-tuning.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .depth import Stage, find_stages, skip_blocks
from .distributed import all_reduce_mean_
from .engine import TensorMove, TwoPathNetwork
from .s2h import S2HPruner

__all__ = ["STPruner", "STPConfig", "Architecture", "check_options"]

_DEPTH_MODULES_CACHED = 16  # hard-path graphs kept for the most recently used sets of skipped blocks


@dataclass
class STPConfig:
    """STP's settings (see the module docstring).

    Attributes:
        target_flops: remaining-FLOPs ratio of the exported subnet.
        tolerance: allowed ``|ratio - target_flops|`` of a feasible architecture.
        num_subnets: subnets trained by KD per step.
        include_anchor: the first subnet of a step is the best architecture (at the current budget).
        kd_weight: weight of every subnet's KD loss.
        kd_temperature: softmax temperature T of the KD terms (scaled by ``T^2``).
        total_epochs: epochs of the run (the expansion schedule's length).
        warmup_epochs: leading epochs of dense CE training only.
        hard_epochs: trailing epochs training the best subnet alone with CE (0: none, as in STP).
        expansion_fraction: fraction of the joint epochs over which the sampled budget reaches the target.
        search_every: also search every this many steps (0: at joint epoch ends only).
        population: candidates per generation.
        generations: evolution rounds after the initial population.
        search_depth: the space includes per-stage depth (False: every stage keeps all its blocks).
        min_depth: fewest leading blocks a stage keeps (capped at the stage's number of blocks).
        mutation_prob: per-group (width) and per-stage (depth) probability of a mutation.
        mutation_scale: largest mutation step as a fraction of the group's number of width choices.
        held_out_batches: without held-out batches (:meth:`STPruner.set_search_batches`): remembered training
            batches the fitness is measured on instead.
        calibration_batches: remembered training batches re-estimating each candidate's BN statistics (other
            than the ``held_out_batches`` ones without held-out batches).
        seed: seed of STP's own random generator (sampling and search; the global RNG is not used).
        granularity, max_choices, ignore, importance, prune_embedding: passed to
            :class:`~s2hk.engine.TwoPathNetwork`.
    """

    target_flops: float = 0.15
    tolerance: float = 0.01
    num_subnets: int = 2
    include_anchor: bool = True
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    total_epochs: int = 1
    warmup_epochs: int = 0
    hard_epochs: int = 0
    expansion_fraction: float = 0.5
    search_every: int = 0
    population: int = 8
    generations: int = 2
    search_depth: bool = True
    min_depth: int = 1
    mutation_prob: float = 0.3
    mutation_scale: float = 0.15
    held_out_batches: int = 2
    calibration_batches: int = 2
    seed: int = 0
    granularity: Any = None
    max_choices: int = 32
    ignore: tuple = ()
    importance: str = "dynamic"
    prune_embedding: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < float(self.target_flops) <= 1.0:
            raise ValueError(f"target_flops must be in (0, 1], got {self.target_flops}")
        if not float(self.tolerance) >= 0.0:
            raise ValueError(f"tolerance must be >= 0, got {self.tolerance}")
        for name in ("num_subnets", "population", "held_out_batches", "total_epochs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("generations", "search_every", "calibration_batches", "warmup_epochs", "hard_epochs",
                     "min_depth"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_epochs + self.hard_epochs > self.total_epochs:
            raise ValueError("warmup_epochs + hard_epochs exceed total_epochs")
        if not 0.0 < float(self.expansion_fraction) <= 1.0:
            raise ValueError(f"expansion_fraction must be in (0, 1], got {self.expansion_fraction}")
        if not 0.0 <= float(self.mutation_prob) <= 1.0:
            raise ValueError(f"mutation_prob must be in [0, 1], got {self.mutation_prob}")
        if not float(self.mutation_scale) >= 0.0 or not float(self.kd_weight) >= 0.0:
            raise ValueError("mutation_scale and kd_weight must be >= 0")
        if not float(self.kd_temperature) > 0.0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        if not isinstance(self.search_depth, bool):
            raise ValueError(f"search_depth must be true or false, got {self.search_depth!r}")
        self.ignore = tuple(self.ignore)

    def phase(self, epoch: int) -> str:
        """The phase of ``epoch``: "warmup", "joint" or "hard"."""
        if epoch < self.warmup_epochs:
            return "warmup"
        if epoch >= self.total_epochs - self.hard_epochs:
            return "hard"
        return "joint"

    @property
    def joint_epochs(self) -> int:
        return max(self.total_epochs - self.warmup_epochs - self.hard_epochs, 1)


_OPTION_NAMES = {f.name for f in fields(STPConfig)}
_CLI_SET = {"target_flops", "total_epochs", "warmup_epochs", "hard_epochs"}  # set by the CLI's own flags


def check_options(options: dict) -> None:
    """Refuse ``--set`` options STP does not take (or that its own flags set) and bad values; ValueError."""
    unknown = sorted(set(options) - (_OPTION_NAMES - _CLI_SET))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method 'stp'; known: {sorted(_OPTION_NAMES - _CLI_SET)}")
    STPConfig(**options)


@dataclass(frozen=True)
class Architecture:
    """One point of STP's space (hashable: search caches and compares them).

    Attributes:
        widths: kept channels per prunable group, in :attr:`STPruner.prunable` order.
        depths: leading blocks kept per stage, in :attr:`STPruner.stages` order (empty without stages).
    """

    widths: tuple[int, ...]
    depths: tuple[int, ...] = ()


class STPruner(TwoPathNetwork):
    """STP: train the full network and KD-trained subnets, search the best subnet, export it.

    Args:
        model: the network (trained in place).
        example_inputs: one batch (or a batch of one) of the model's input, for tracing and FLOPs.
        target_flops: remaining-FLOPs ratio of the exported subnet.
        num_subnets, search_every, population, generations, ...: see :class:`STPConfig`.
        config: an :class:`STPConfig`; keyword arguments override its fields.

    Attributes:
        stages: the model's stages of skippable residual blocks (:func:`s2hk.depth.find_stages`).
        best: the best :class:`Architecture` found so far (pinned outside a step / a search).

    Inputs are single tensors; a tuple / list ``x`` (two augmented views) uses its first view.

    Example::

        pruner = STPruner(model, torch.randn(1, 3, 32, 32), target_flops=0.15, total_epochs=epochs)
        opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.1, momentum=0.9)
        for epoch in range(epochs):
            pruner.set_phase(pruner.config.phase(epoch))
            for x, y in loader:
                pruner.train_step(x, y, opt)
            pruner.on_epoch_end()               # KD-guided search of the best subnet
        small = pruner.export()
    """

    def __init__(self, model: nn.Module, example_inputs: Any, target_flops: Optional[float] = None,
                 config: Optional[STPConfig] = None, **overrides: Any) -> None:
        values = asdict(config or STPConfig())
        values.update(overrides)
        if target_flops is not None:
            values["target_flops"] = target_flops
        cfg = STPConfig(**values)
        super().__init__(model, example_inputs, ignore=cfg.ignore, granularity=cfg.granularity,
                         max_choices=cfg.max_choices, importance=cfg.importance,
                         prune_embedding=cfg.prune_embedding)
        self.config = cfg
        self.phase = "joint"
        self.epoch = 0   # epochs finished (on_epoch_end calls)
        self.steps = 0   # training steps taken
        self.generator = torch.Generator().manual_seed(int(cfg.seed))
        self._memory: deque = deque(maxlen=cfg.held_out_batches + cfg.calibration_batches)
        self._search_batches: list[tuple[Tensor, Tensor]] = []  # held-out training batches of the fitness
        self._warned_no_search_batches = False
        self._full = [g.channels for g in self.prunable]
        self._step = list(self.gate_layout.granularities)
        self.stages: list[Stage] = find_stages(self.analysis)
        self._max_depths = [s.depth for s in self.stages]
        self._min_depths = [min(cfg.min_depth, d) if cfg.search_depth else d for d in self._max_depths]
        self._skip_sets: dict[tuple[int, ...], tuple[frozenset[str], frozenset[str]]] = {}
        self._depth_modules: OrderedDict[frozenset[str], fx.GraphModule] = OrderedDict()
        self._skipped_adds: frozenset[str] = frozenset()    # of the pinned architecture
        self._skipped_nodes: frozenset[str] = frozenset()   # the branch nodes of its skipped blocks
        self.best: Architecture = self.repair(self.full_architecture(), cfg.target_flops)
        self.best_kd = float("nan")
        self.last_search: Optional[dict] = None
        self._pin(self.best)

    # ------------------------------------------------------------------ architecture space
    def full_architecture(self) -> Architecture:
        """Every group at full width, every stage at full depth (the dense network)."""
        return Architecture(tuple(self._full), tuple(self._max_depths))

    def _check(self, arch: Architecture) -> None:
        if len(arch.widths) != len(self._full) or len(arch.depths) != len(self._max_depths):
            raise ValueError(f"architecture has {len(arch.widths)} widths and {len(arch.depths)} depths; this "
                             f"network has {len(self._full)} prunable groups and {len(self._max_depths)} stages")

    def _skips(self, depths: Sequence[int]) -> tuple[frozenset[str], frozenset[str]]:
        """(add nodes, branch nodes) of the blocks that ``depths`` skip (cached per depth vector); the FLOPs
        terms of the branch nodes (layers, matmuls) are not counted."""
        key = tuple(int(d) for d in depths)
        if key not in self._skip_sets:
            blocks = [b for stage, d in zip(self.stages, key) for b in stage.blocks[d:]]
            self._skip_sets[key] = (frozenset(b.add for b in blocks),
                                    frozenset(n for b in blocks for n in b.branch_nodes))
        return self._skip_sets[key]

    def _ratio(self, widths: Sequence[int], depths: Sequence[int]) -> float:
        flops = self.flops_polynomial.flops_at(self.all_widths(widths), skipped_nodes=self._skips(depths)[1])
        return flops / self.flops_polynomial.dense_flops

    def flops_ratio_of(self, arch: Architecture) -> float:
        """Exact FLOPs ratio of the network at ``arch`` (prunable groups at its widths, others full; the blocks
        its depths skip not counted)."""
        self._check(arch)
        return self._ratio(arch.widths, arch.depths)

    def _snap(self, widths: Sequence[float]) -> list[int]:
        return [int(min(max(round(float(w) / d), 1) * d, c)) for w, d, c in zip(widths, self._step, self._full)]

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def _rand(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def repair(self, arch: Architecture, budget: float) -> Architecture:
        """``arch`` snapped to the space and moved to ``|ratio - budget| <= tolerance`` where reachable: its
        widths are repaired at its depths (:meth:`_repair_widths`); while that misses the budget, one stage (at
        random among those that can move) gains a block (ratio too low) or loses one (too high) and the widths
        are repaired again. Returns the closest architecture met."""
        self._check(arch)
        tol = self.config.tolerance
        depths = [min(max(int(d), lo), hi) for d, lo, hi in zip(arch.depths, self._min_depths, self._max_depths)]
        widths = self._repair_widths(arch.widths, depths, budget)
        ratio = self._ratio(widths, depths)
        best = (abs(ratio - budget), widths, list(depths))
        for _ in range(sum(self._max_depths)):
            if abs(ratio - budget) <= tol:
                break
            sign = 1 if ratio < budget else -1
            movable = [i for i, (d, lo, hi) in enumerate(zip(depths, self._min_depths, self._max_depths))
                       if lo <= d + sign <= hi]
            if not movable:
                break
            depths[movable[self._randint(len(movable))]] += sign
            widths = self._repair_widths(widths, depths, budget)
            ratio = self._ratio(widths, depths)
            if abs(ratio - budget) < best[0]:
                best = (abs(ratio - budget), widths, list(depths))
        return Architecture(tuple(best[1]), tuple(best[2]))

    def _repair_widths(self, widths: Sequence[float], depths: Sequence[int], budget: float) -> list[int]:
        """``widths`` snapped to the space and moved towards ``|ratio - budget| <= tolerance`` at fixed
        ``depths``: one common scale factor (bisection), then single ``d_g`` steps towards the budget -- or,
        where none helps, one group a step towards it and another a step back -- (among the moves landing within
        tolerance a random one, else the closest) while they bring the ratio closer."""
        tol = self.config.tolerance
        w = self._snap(widths)
        if not w:
            return w
        ratio = self._ratio(w, depths)
        if abs(ratio - budget) > tol:
            lo, hi = 0.0, max(c / max(x, 1) for c, x in zip(self._full, w))
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                if self._ratio(self._snap([mid * x for x in w]), depths) > budget:
                    hi = mid
                else:
                    lo = mid
            cands = [self._snap([s * x for x in w]) for s in (lo, hi)]
            w = min(cands, key=lambda c: abs(self._ratio(c, depths) - budget))
            ratio = self._ratio(w, depths)
        for _ in range(4 * sum(c // d for c, d in zip(self._full, self._step))):
            if abs(ratio - budget) <= tol:
                break
            sign = 1 if ratio < budget else -1
            moves = self._moves(w, depths, budget, [(i, sign) for i in range(len(w))])
            if not moves or min(m[0] for m in moves) >= abs(ratio - budget):
                # no single step helps: one group a step towards the budget, another one back
                moves = self._moves(w, depths, budget, [(i, sign, j, -sign) for i in range(len(w))
                                                        for j in range(len(w)) if i != j])
            if not moves:
                break
            inside = [m for m in moves if m[0] <= tol]
            err, cand = inside[self._randint(len(inside))] if inside else min(moves, key=lambda m: m[0])
            if err >= abs(ratio - budget):
                break
            w, ratio = cand, self._ratio(cand, depths)
        return w

    def _moves(self, w: list[int], depths: Sequence[int], budget: float,
               steps: list[tuple]) -> list[tuple[float, list[int]]]:
        """``(|ratio - budget|, widths)`` of ``w`` (at ``depths``) moved by each entry of ``steps`` (pairs
        ``group, direction``, in d_g steps), where the moved widths stay in the space."""
        out = []
        for step in steps:
            cand = list(w)
            for i, sign in zip(step[::2], step[1::2]):
                cand[i] += sign * self._step[i]
            if all(d <= k <= c for k, d, c in zip(cand, self._step, self._full)):
                out.append((abs(self._ratio(cand, depths) - budget), cand))
        return out

    def feasible(self, arch: Architecture, budget: Optional[float] = None) -> bool:
        """Whether ``arch``'s FLOPs ratio is within ``tolerance`` of ``budget`` (default: the target)."""
        budget = self.config.target_flops if budget is None else budget
        return abs(self.flops_ratio_of(arch) - budget) <= self.config.tolerance

    def mutate(self, arch: Architecture) -> Architecture:
        """Each group's width moves with probability ``mutation_prob`` by up to ``mutation_scale`` of its
        choices; each stage's depth (where it can vary) with the same probability by one block."""
        widths = list(arch.widths)
        for i, (d, c) in enumerate(zip(self._step, self._full)):
            if self._rand() < self.config.mutation_prob:
                span = max(1, int(round(self.config.mutation_scale * (c // d))))
                delta = (self._randint(span) + 1) * d * (1 if self._rand() < 0.5 else -1)
                widths[i] = min(max(widths[i] + delta, d), c)
        depths = list(arch.depths)
        for i, (lo, hi) in enumerate(zip(self._min_depths, self._max_depths)):
            if lo < hi and self._rand() < self.config.mutation_prob:
                depths[i] = min(max(depths[i] + (1 if self._rand() < 0.5 else -1), lo), hi)
        return Architecture(tuple(widths), tuple(depths))

    def crossover(self, a: Architecture, b: Architecture) -> Architecture:
        """Uniform crossover: every width and every depth from ``a`` or ``b`` with probability 1/2."""
        def mix(x: Sequence[int], y: Sequence[int]) -> tuple[int, ...]:
            return tuple(xi if self._rand() < 0.5 else yi for xi, yi in zip(x, y))

        return Architecture(mix(a.widths, b.widths), mix(a.depths, b.depths))

    def random_architecture(self, budget: Optional[float] = None) -> Architecture:
        """Uniformly random widths and depths, repaired to ``budget`` (default: the target)."""
        budget = self.config.target_flops if budget is None else budget
        widths = tuple((self._randint(c // d) + 1) * d for d, c in zip(self._step, self._full))
        depths = tuple(lo + self._randint(hi - lo + 1) for lo, hi in zip(self._min_depths, self._max_depths))
        return self.repair(Architecture(widths, depths), budget)

    def current_budget(self) -> float:
        """The FLOPs budget of the subnets sampled in the epoch in progress (mutating expansion)."""
        cfg = self.config
        span = max(1, math.ceil(cfg.expansion_fraction * cfg.joint_epochs))
        progress = min(max((self.epoch - cfg.warmup_epochs + 1) / span, 0.0), 1.0)
        return 1.0 - (1.0 - cfg.target_flops) * progress

    def sample_subnets(self, budget: Optional[float] = None) -> list[Architecture]:
        """The step's training subnets: mutations of the best architecture, repaired to ``budget``."""
        budget = self.current_budget() if budget is None else budget
        anchor = self.repair(self.best, budget)
        out = []
        for i in range(self.config.num_subnets):
            out.append(anchor if i == 0 and self.config.include_anchor else self.repair(self.mutate(anchor), budget))
        return out

    def _pin(self, arch: Architecture) -> None:
        """Make ``arch`` the hard network: its widths pinned, its skipped blocks out of the hard path."""
        if self.prunable:
            self.set_hard_widths({g.name: int(k) for g, k in zip(self.prunable, arch.widths)})
        self._skipped_adds, self._skipped_nodes = self._skips(arch.depths)

    def skipped_blocks(self) -> list[tuple[str, str]]:
        """``(add, shortcut)`` node pairs of the blocks the hard network (the pinned architecture) skips, in
        graph order, for the export (:func:`s2hk.export.graph_edits`). A shortcut that is itself a skipped
        block's add (consecutive pre-activation blocks) is replaced by that block's own shortcut, so the pairs
        can be applied in any order."""
        replaced: dict[str, str] = {}
        for block in (b for s in self.stages for b in s.blocks if b.add in self._skipped_adds):
            replaced[block.add] = replaced.get(block.shortcut, block.shortcut)
        return list(replaced.items())

    def _move_state(self, move: TensorMove) -> None:
        """The engine's state, the remembered and held-out batches (network inputs: converted like the network)
        and no cached hard-path graphs: they hold the two-path graph's attributes as they were before the move,
        and are rebuilt on first use."""
        super()._move_state(move)
        self._memory = deque(((move.convert(x), move.convert(y)) for x, y in self._memory), maxlen=self._memory.maxlen)
        self._search_batches = [(move.convert(x), move.convert(y)) for x, y in self._search_batches]
        self._depth_modules.clear()

    def _depth_module(self, adds: frozenset[str]) -> fx.GraphModule:
        """The two-path graph without the blocks closed by ``adds`` (shared layers; a small LRU cache)."""
        module = self._depth_modules.get(adds)
        if module is None:
            module = skip_blocks(self.graph_module, adds)
            if len(self._depth_modules) >= _DEPTH_MODULES_CACHED:
                self._depth_modules.popitem(last=False)
            self._depth_modules[adds] = module
        self._depth_modules.move_to_end(adds)
        return module

    def run(self, path: str, *inputs: Any) -> Any:
        """Run the traced network on the path whose state was prepared; the ``"hard"`` path skips the blocks
        of the pinned architecture (their layers do not run: no output, gradient or statistics update)."""
        if path != "hard" or not self._skipped_adds:
            return super().run(path, *inputs)
        module = self._depth_module(self._skipped_adds)
        self.state.path = path
        try:
            return module(*inputs)
        finally:
            self.state.path = "dense"

    def flops(self, kind: str = "hard") -> int:
        """As :meth:`TwoPathNetwork.flops <s2hk.engine.TwoPathNetwork.flops>`; ``"hard"`` leaves out the
        layers of the blocks the pinned architecture skips."""
        if kind == "hard":
            return self.flops_polynomial.flops_at(self.all_widths(), skipped_nodes=self._skipped_nodes)
        return super().flops(kind)

    # ------------------------------------------------------------------ one step
    def set_phase(self, phase: str) -> None:
        """"warmup" (dense CE only), "joint" (STP) or "hard" (the best subnet alone, CE)."""
        if phase not in ("warmup", "joint", "hard"):
            raise ValueError(f"phase must be 'warmup', 'joint' or 'hard', got {phase!r}")
        self.phase = phase

    def mask_parameters(self) -> list[nn.Parameter]:
        """STP learns no mask parameters."""
        return []

    def kd_loss(self, z_sub: Tensor, z_teacher: Tensor) -> Tensor:
        """``T^2 KL(softmax(sg(z_teacher) / T) || softmax(z_sub / T))``, batch mean."""
        t = self.config.kd_temperature
        return F.kl_div(F.log_softmax(z_sub / t, -1), F.log_softmax(z_teacher.detach() / t, -1),
                        reduction="batchmean", log_target=True) * (t * t)

    def _remember(self, x: Tensor, y: Tensor) -> None:
        self._memory.append((x.detach().clone(), y.detach().clone()))

    def train_step(self, x: Any, y: Tensor, optimizer: torch.optim.Optimizer,
                   scaler: Optional[torch.amp.GradScaler] = None) -> dict[str, float]:
        """One step on ``(x, y)``; ``optimizer`` holds :meth:`weight_parameters`. Returns loss (CE of the full
        network), kd (mean subnet KD), hard_flops_ratio (of the best architecture), budget (of the sampled
        subnets), soft_acc (full network) and hard_acc (the best subnet's batch accuracy when it was trained
        this step, else NaN).

        ``scaler`` (fp16 training): every loss is backpropagated scaled by it and the optimiser steps through it
        (gradients unscaled; the step skipped when one is not finite); the caller calls ``scaler.update()``."""
        x = x[0] if isinstance(x, (tuple, list)) else x
        scale = scaler.scale if scaler is not None else _unscaled
        optimizer.zero_grad(set_to_none=True)
        self._remember(x, y)
        nan = float("nan")
        if self.phase == "hard":
            self._pin(self.best)
            self.prepare_hard()
            z = self.run("hard", x)
            loss = F.cross_entropy(z, y)
            scale(loss).backward()
            all_reduce_mean_([p.grad for p in self.weight_parameters() if p.grad is not None])
            _optimizer_step(optimizer, scaler)
            loss_v, acc = torch.stack([loss.detach().double(), _accuracy(z, y)]).tolist()
            return {"loss": loss_v, "kd": nan, "hard_flops_ratio": self.flops_ratio_of(self.best),
                    "budget": self.config.target_flops, "soft_acc": nan, "hard_acc": acc}
        z_full = self.run("dense", x)
        ce = F.cross_entropy(z_full, y)
        scale(ce).backward()
        kds, hard_acc = [], None
        budget = 1.0
        if self.phase == "joint":
            budget = self.current_budget()
            teacher = z_full.detach()
            for arch in self.sample_subnets(budget):
                self._pin(arch)
                self.prepare_hard()
                z_sub = self.run("hard", x)
                kd = self.kd_loss(z_sub, teacher)
                scale(self.config.kd_weight * kd).backward()
                kds.append(kd.detach())
                if hard_acc is None and arch == self.best:
                    hard_acc = _accuracy(z_sub, y)
            self._pin(self.best)
        all_reduce_mean_([p.grad for p in self.weight_parameters() if p.grad is not None])
        _optimizer_step(optimizer, scaler)
        kd_mean = torch.stack(kds).mean().double() if kds else ce.detach().double().new_tensor(nan)
        hard = hard_acc if hard_acc is not None else kd_mean.new_tensor(nan)
        loss_v, kd_v, soft_v, hard_v = torch.stack([ce.detach().double(), kd_mean, _accuracy(z_full, y),
                                                    hard]).tolist()
        self.steps += 1
        if self.phase == "joint" and self.config.search_every and self.steps % self.config.search_every == 0:
            self.search()
        return {"loss": loss_v, "kd": kd_v, "hard_flops_ratio": self.flops_ratio_of(self.best), "budget": budget,
                "soft_acc": soft_v, "hard_acc": hard_v}

    def forward(self, *inputs: Any, path: str = "hard") -> Any:
        """Logits of the best subnet (``"hard"``) or the full network (``"dense"``)."""
        if path not in ("hard", "dense"):
            raise ValueError(f"path must be 'hard' or 'dense', got {path!r}")
        return super().forward(*inputs, path=path)

    # ------------------------------------------------------------------ search
    def set_search_batches(self, batches: Iterable[tuple[Any, Tensor]]) -> None:
        """Measure the search's fitness on ``batches`` ``(x, y)`` (``x`` ``(B, C, H, W)``, or views of which the
        first is used; ``y`` ``(B,)``): held-out training images that no step trains on (e.g. the third loader of
        :func:`s2hk.data.make_loaders` with ``holdout``). They are kept on the network's device and are not part
        of :meth:`pruning_state` (give them again before resuming); the memory of training batches then keeps the
        last ``calibration_batches`` only, for BN statistics."""
        move = self._load_move()
        held = [(move.convert(x[0] if isinstance(x, (tuple, list)) else x), move.convert(y)) for x, y in batches]
        if not held:
            raise ValueError("set_search_batches: no batches given; the search needs at least one held-out batch")
        self._search_batches = held
        self._memory = deque(self._memory, maxlen=self.config.calibration_batches)

    def _split_memory(self) -> tuple[list, list]:
        """(calibration batches, fitness batches) of a search (see the module docstring)."""
        batches = list(self._memory)
        if self._search_batches:
            return batches or self._search_batches, self._search_batches
        if batches and not self._warned_no_search_batches:
            self._warned_no_search_batches = True
            warnings.warn("STPruner: no held-out batches (set_search_batches): the search scores candidates on the "
                          f"last {self.config.held_out_batches} remembered training batches, which the weights were "
                          "just trained on; s2hk prune sets training images aside for it (--search-holdout)",
                          UserWarning, stacklevel=2)
        held = batches[-self.config.held_out_batches:]
        calib = batches[:len(batches) - len(held)] or held
        return calib, held

    @torch.no_grad()
    def _teacher(self, held: list) -> list[Tensor]:
        t = self.config.kd_temperature
        return [F.log_softmax(self.run("dense", x) / t, -1) for x, _ in held]

    @torch.no_grad()
    def fitness(self, arch: Architecture, calib: Optional[list] = None, held: Optional[list] = None,
                teacher: Optional[list[Tensor]] = None) -> float:
        """KD loss (per-sample KL of the full network to the subnet, eval mode, temperature T, times ``T^2``)
        of architecture ``arch`` on the held-out batches, after re-estimating its BN statistics. Leaves
        ``arch`` pinned."""
        if calib is None or held is None:
            calib, held = self._split_memory()
        if not held:
            raise RuntimeError("no remembered training batches: run train_step first")
        was_training = self.training
        try:
            if teacher is None:
                self.recalibrate_norms(calib, len(calib), ("dense",))
                self.eval()
                teacher = self._teacher(held)
            self._pin(arch)
            self.recalibrate_norms(calib, len(calib), ("hard",))
            self.eval()
            self.prepare_hard()
            t = self.config.kd_temperature
            total, count = 0.0, 0
            for (x, y), log_t in zip(held, teacher):
                log_s = F.log_softmax(self.run("hard", x) / t, -1)
                total += float(F.kl_div(log_s, log_t, reduction="sum", log_target=True)) * t * t
                count += int(y.shape[0])
        finally:
            self.train(was_training)
        return total / max(count, 1)

    @torch.no_grad()
    def search(self) -> Optional[dict]:
        """KD-guided evolutionary search at the target budget; updates :attr:`best` (pinned, its BN statistics
        re-estimated). Returns ``{"widths", "depths", "kd", "flops_ratio", "evaluations"}`` (widths by group,
        depths by stage name), or None without batches to score on (no held-out batches and no step yet)."""
        cfg = self.config
        calib, held = self._split_memory()
        if not held or not (self.prunable or self.stages):
            return None
        was_training = self.training
        self.recalibrate_norms(calib, len(calib), ("dense",))  # the teacher with statistics of its own
        self.eval()
        teacher = self._teacher(held)
        self.train(was_training)
        cache: dict[Architecture, float] = {}

        def key(arch: Architecture) -> tuple:
            return (not self.feasible(arch), cache[arch])

        def score(arch: Architecture) -> None:
            if arch not in cache:
                cache[arch] = self.fitness(arch, calib, held, teacher)

        target = cfg.target_flops
        pop = [self.repair(self.best, target)]
        tries = 0
        while len(pop) < cfg.population and tries < 20 * cfg.population:
            tries += 1
            cand = self.repair(self.mutate(pop[0]), target) if len(pop) % 2 else self.random_architecture(target)
            if cand not in pop:
                pop.append(cand)
        for arch in pop:
            score(arch)
        pop.sort(key=key)
        elite = max(1, cfg.population // 2)
        for _ in range(cfg.generations):
            parents = pop[:elite]
            children: list[Architecture] = []
            tries = 0
            while len(children) < cfg.population - len(parents) and tries < 20 * cfg.population:
                tries += 1
                a, b = parents[self._randint(len(parents))], parents[self._randint(len(parents))]
                child = self.repair(self.mutate(self.crossover(a, b)), target)
                if child not in cache and child not in children:
                    children.append(child)
            for arch in children:
                score(arch)
            pop = sorted(parents + children, key=key)[:cfg.population]
        self.best = pop[0]
        self.best_kd = cache[self.best]
        self._pin(self.best)
        self.recalibrate_bn(calib, len(calib))
        self.last_search = {"widths": self.best_widths(), "depths": self.best_depths(), "kd": self.best_kd,
                            "flops_ratio": self.flops_ratio_of(self.best), "evaluations": len(cache)}
        return self.last_search

    def on_epoch_end(self) -> None:
        """Search the best subnet after a joint epoch, then advance the expansion schedule."""
        if self.phase == "joint":
            self.search()
        self.epoch += 1

    def best_widths(self) -> dict[str, int]:
        """The best architecture's width of every prunable group, by group name."""
        return {g.name: int(k) for g, k in zip(self.prunable, self.best.widths)}

    def best_depths(self) -> dict[str, int]:
        """The best architecture's depth (leading blocks kept) of every stage, by stage name."""
        return {s.name: int(d) for s, d in zip(self.stages, self.best.depths)}

    # ------------------------------------------------------------------ evaluation / export
    def recalibrate_bn(self, batches: Iterable, num_batches: int = 200) -> int:
        """Re-estimate the BatchNorm statistics of the full network (the model's own) and of the pinned
        subnet (the hard path's) from up to ``num_batches`` batches; returns the number of batches used."""
        return self.recalibrate_norms(batches, num_batches, ("dense", "hard"))

    def recalibrate_norms(self, batches: Iterable, num_batches: int, paths: Sequence[str]) -> int:
        """:meth:`TwoPathNetwork.recalibrate_norms <s2hk.engine.TwoPathNetwork.recalibrate_norms>`, except
        that the hard-path norms of skipped blocks, which do not run, keep their statistics."""
        skipped = [self.wrappers[n] for n in self._skipped_nodes
                   if getattr(self.wrappers.get(n), "hard_running_mean", None) is not None]
        saved = [[b.clone() for b in _hard_stats(w)] for w in skipped]
        used = super().recalibrate_norms(batches, num_batches, paths)
        with torch.no_grad():
            for w, values in zip(skipped, saved):
                for buffer, value in zip(_hard_stats(w), values):
                    buffer.copy_(value)
        return used

    @torch.no_grad()
    def evaluate(self, batches: Iterable, paths: tuple = ("dense", "hard")) -> dict[str, float]:
        """Top-1 accuracy of the full network (``dense_acc``, alias ``soft_acc``) and the best subnet
        (``hard_acc``) over ``batches``, eval mode, and ``gap = soft_acc - hard_acc``."""
        del paths
        self._pin(self.best)
        res = S2HPruner.evaluate(self, batches, paths=("dense", "hard"))
        res["soft_acc"] = res["dense_acc"]
        res["gap"] = res["soft_acc"] - res["hard_acc"]
        return res

    def export(self) -> fx.GraphModule:
        """The best subnet as a plain, physically smaller model (kept channels only, skipped blocks removed with
        their layers; hard-path BN statistics), in eval mode."""
        self._pin(self.best)
        return super().export()

    # ------------------------------------------------------------------ state
    def pruning_state(self) -> dict:
        """Best architecture, schedule position, generator, remembered batches and hard-path BN statistics
        (the model's own weights are in ``model.state_dict()``)."""
        return {"method": "stp", "best": {"widths": list(self.best.widths), "depths": list(self.best.depths)},
                "best_kd": self.best_kd, "epoch": self.epoch,
                "steps": self.steps, "phase": self.phase, "generator": self.generator.get_state(),
                "memory": [[x, y] for x, y in self._memory], "hard_bn": self.hard_norm_state(),
                "groups": [[g.name, g.channels, d] for g, d in zip(self.prunable, self._step)],
                "stages": self._stage_table()}

    def _stage_table(self) -> list[list]:
        return [[s.name, [b.add for b in s.blocks]] for s in self.stages]

    def load_pruning_state(self, state: dict) -> None:
        """Restore :meth:`pruning_state`; a state made for other channel groups or other stages is refused
        whole."""
        mine = [[g.name, g.channels, d] for g, d in zip(self.prunable, self._step)]
        if [list(g) for g in state.get("groups", [])] != mine:
            raise ValueError(f"pruning state was saved for different channel groups: expected {mine}, "
                             f"got {state.get('groups')}")
        stages = self._stage_table()
        if [[name, list(adds)] for name, adds in state.get("stages", [])] != stages:
            raise ValueError(f"pruning state was saved for different stages of residual blocks: expected {stages}, "
                             f"got {state.get('stages')}")
        best = state.get("best")
        if not (isinstance(best, dict) and len(best.get("widths", ())) == len(self._full)
                and len(best.get("depths", ())) == len(self._max_depths)):
            raise ValueError("pruning state has no width + depth architecture of this network (written by an "
                             "older, width-only STP?)")
        writes = self.hard_norm_writes(state["hard_bn"])
        with torch.no_grad():
            for current, saved in writes:
                current.copy_(saved)
        self.best = Architecture(tuple(int(k) for k in state["best"]["widths"]),
                                 tuple(int(d) for d in state["best"]["depths"]))
        self.best_kd = float(state["best_kd"])
        self.epoch, self.steps, self.phase = int(state["epoch"]), int(state["steps"]), state["phase"]
        self.generator.set_state(state["generator"].cpu())  # a CPU generator, whatever map_location loaded it to
        move = self._load_move()
        self._memory.clear()
        for x, y in state["memory"]:
            self._memory.append((move.convert(x), move.convert(y)))
        self._pin(self.best)


def _hard_stats(norm: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """A two-path norm's hard-path running mean ``(C,)``, variance ``(C,)`` and batch count ``()``."""
    return norm.hard_running_mean, norm.hard_running_var, norm.hard_num_batches_tracked


def _unscaled(loss: Tensor) -> Tensor:
    """A loss as backpropagated without a gradient scaler: itself."""
    return loss


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler]) -> None:
    """``optimizer.step()``, through ``scaler`` when there is one (unscaling, skipping a non-finite step)."""
    if scaler is not None:
        scaler.step(optimizer)
    else:
        optimizer.step()


def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.detach().argmax(-1) == y).double().mean()
