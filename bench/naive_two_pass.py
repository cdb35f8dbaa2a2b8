"""S2HPruner written the straightforward way, in plain PyTorch: the baseline (b) of the step benchmark.

The same algorithm as :class:`s2hk.S2HPruner` (ALGORITHMS.md §1, decoupled KD), implemented as one would
first write it:

- the hard path runs the network at **full width**, multiplying the pruned channels by 0 (0/1 masks applied by
  forward hooks), so it costs a dense forward and a dense backward whatever the FLOPs target;
- the soft and hard paths are two separate forward passes of the user's model, with the gates applied by the
  same forward hooks (after the norm where one follows, as the engine does);
- the mask math (softmax, reverse cumulative sum, expected width, straight-through hard width, importance
  ranks, gradient balancing) is a Python loop over the groups with one small op at a time, and every group's
  hard width is read from the device with its own ``.item()``;
- the FLOPs regulariser is a Python sum over the layers.

Only the setup -- which channels must be pruned together, which layer output carries the gate, each layer's
MACs per channel pair -- comes from s2hk's graph analysis, so that both implementations prune the same
groups; everything a training step does is written here. ``tests/test_bench_naive.py`` checks that its soft
and hard logits and its losses match s2hk's with the same widths pinned.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from s2hk.config import S2HConfig
from s2hk.graph import analyze
from s2hk.masks import WIDTH_ROUNDING_SLACK, default_granularity, max_init_logits

__all__ = ["NaiveS2HPruner"]


class NaiveS2HPruner:
    """Straightforward two-pass S2HPruner over ``model`` (trained in place).

    Args:
        model: the network (plain ``nn.Module``; its layers are hooked, not replaced).
        example_inputs: one batch of one image, for the analysis and the FLOPs count.
        target_flops: T.
        config / overrides: as for :class:`s2hk.S2HPruner` (kd must be "decoupled").
    """

    def __init__(self, model: nn.Module, example_inputs: Tensor, target_flops: Optional[float] = None,
                 config: Optional[S2HConfig] = None, **overrides: Any) -> None:
        values = (config or S2HConfig()).to_dict()
        values.update(overrides)
        if target_flops is not None:
            values["target_flops"] = target_flops
        self.config = cfg = S2HConfig.from_dict(values)
        if cfg.kd != "decoupled" or cfg.importance != "dynamic":
            raise ValueError("the two-pass baseline implements kd='decoupled' with dynamic importance only")
        self.model = model
        analysis = analyze(model, example_inputs, cfg.ignore)
        self.groups = analysis.groups
        self.prunable = [g for g in self.groups if g.prunable]
        self.slot = {g.index: i for i, g in enumerate(self.prunable)}
        device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.granularity = [self._granularity(g.name, g.channels) for g in self.prunable]
        self.logits = [nn.Parameter(max_init_logits(g.channels, d, cfg.tau).to(device))
                       for g, d in zip(self.prunable, self.granularity)]
        self.ranks = [torch.arange(g.channels, device=device) for g in self.prunable]
        self.pinned: dict[int, int] = {}
        self.mode: Optional[str] = None            # None (hooks pass through), "soft" or "hard"
        self.layer_factor: dict[str, Tensor] = {}  # per gated layer: gates or 0/1 masks of its outputs

        # layers by module: the gate / mask goes on the outputs of layers whose spec says so
        modules = dict(model.named_modules())
        self.gated: dict[str, Any] = {}
        self.norms: list[nn.Module] = []
        self.producers: list[tuple[nn.Module, Any]] = []  # (conv / linear, out layout) for the importance
        self.flops_terms: list[tuple[int, Any, Any, int]] = []  # (MACs per pair, out layout, in layout, divisor)
        seen: set[str] = set()
        for spec in analysis.layers.values():
            if spec.target in seen:
                raise ValueError(f"layer {spec.target} is called more than once; the hooks need one call")
            seen.add(spec.target)
            module = modules[spec.target]
            if spec.gate:
                self.gated[spec.target] = spec
                module.register_forward_hook(self._hook(spec.target))
            shape = analysis.node_shapes[spec.node]
            if spec.kind == "norm":
                if getattr(module, "running_mean", None) is not None:
                    self.norms.append(module)
                continue
            self.producers.append((module, spec.out_layout))
            if spec.kind == "conv":
                macs = shape[0] * math.prod(shape[2:]) * math.prod(module.kernel_size)
                self.flops_terms.append((macs, spec.out_layout, None if spec.depthwise else spec.in_layout,
                                         module.groups))
            else:
                self.flops_terms.append((math.prod(shape[:-1]), spec.out_layout, spec.in_layout, 1))
        self.hard_stats = {m: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                           for m in self.norms}
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            was = model.training
            model.eval()
            model(example_inputs)
            model.train(was)
        self.dense_flops = float(counter.get_total_flops())
        full = [float(g.channels) for g in self.groups]
        self.constant_flops = self.dense_flops - self._flops(full)
        self.widths = [g.channels for g in self.prunable]
        self.refresh()

    # ------------------------------------------------------------------ setup
    def _granularity(self, name: str, channels: int) -> int:
        g = self.config.granularity
        if isinstance(g, int):
            return g
        if isinstance(g, Mapping) and name in g:
            return int(g[name])
        return default_granularity(channels, self.config.max_choices)

    def _hook(self, target: str):
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
            if self.mode is None:
                return output
            factor = self.layer_factor[target]
            axis = output.dim() - 1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1
            shape = [1] * output.dim()
            shape[axis] = -1
            return output * factor.view(shape)
        return hook

    def weight_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def set_hard_widths(self, widths: Optional[Mapping[str, int]]) -> None:
        """Pin each named group at a width (its most important channels), or unpin all with ``None``."""
        if widths is None:
            self.pinned = {}
        else:
            by_name = {g.name: i for i, g in enumerate(self.prunable)}
            self.pinned.update({by_name[name]: int(k) for name, k in widths.items()})
        self.refresh()

    # ------------------------------------------------------------------ mask math, one group at a time
    def gates(self) -> tuple[list[Tensor], list[Tensor]]:
        """Per group: soft keep-probabilities (physical order) and the straight-through hard width."""
        tau = self.config.tau
        keeps, widths = [], []
        for slot, (u, d, g) in enumerate(zip(self.logits, self.granularity, self.prunable)):
            p = torch.softmax(u / tau, dim=0)
            keeps.append(p.flip(0).cumsum(0).flip(0)[self.ranks[slot] // d])
            choices = d * torch.arange(1, u.numel() + 1, dtype=torch.float64, device=u.device)
            expected = (torch.softmax(u.double() / tau, dim=0) * choices).sum()
            if slot in self.pinned:
                widths.append(torch.tensor(float(self.pinned[slot]), dtype=torch.float64, device=u.device))
            else:
                whole = torch.ceil(expected.detach() - WIDTH_ROUNDING_SLACK)
                hard = torch.clamp(d * torch.ceil(whole / d), max=g.channels)
                widths.append(hard + (expected - expected.detach()))
        return keeps, widths

    def _layer_vectors(self, per_group: Sequence[Tensor]) -> dict[str, Tensor]:
        out = {}
        for target, spec in self.gated.items():
            parts = []
            for seg in spec.out_layout:
                slot = self.slot.get(seg.group)
                parts.append(per_group[slot] if slot is not None else
                             torch.ones(seg.size, dtype=per_group[0].dtype, device=per_group[0].device))
            out[target] = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out

    def _flops(self, widths: Sequence[Any]) -> Any:
        total = 0.0
        for macs, out_layout, in_layout, divisor in self.flops_terms:
            out_w = sum(seg.repeat * widths[seg.group] for seg in out_layout)
            in_w = 1.0 if in_layout is None else sum(seg.repeat * widths[seg.group] for seg in in_layout) / divisor
            total = total + 2.0 * macs * out_w * in_w
        return total

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-rank every group by mean filter L1 norm and read each group's next hard width (one .item())."""
        norms: list[list[Tensor]] = [[] for _ in self.prunable]
        dtype = torch.float64 if any(m.weight.dtype == torch.float64 for m, _ in self.producers) else torch.float32
        for module, layout in self.producers:
            offset = 0
            for seg in layout:
                slot = self.slot.get(seg.group)
                if slot is not None:
                    w = module.weight[offset:offset + seg.size]
                    norms[slot].append(w.abs().reshape(seg.size, -1).sum(1, dtype=torch.float64))
                offset += seg.size
        for slot, parts in enumerate(norms):
            score = torch.stack(parts).mean(0).to(dtype)
            order = torch.sort(score, descending=True, stable=True).indices
            ranks = torch.empty_like(order)
            ranks[order] = torch.arange(order.numel(), device=order.device)
            self.ranks[slot] = ranks
        _, widths = self.gates()
        self.widths = [int(round(w.item())) for w in widths]
        self.masks = [(r < k).to(self.dtype) for r, k in zip(self.ranks, self.widths)]

    # ------------------------------------------------------------------ forwards
    def forward_soft(self, x: Tensor) -> Tensor:
        keeps, _ = self.gates()
        return self._run("soft", x, keeps)

    def forward_hard(self, x: Tensor) -> Tensor:
        return self._run("hard", x, self.masks)

    def _run(self, mode: str, x: Tensor, per_group: Sequence[Tensor]) -> Tensor:
        self.layer_factor = self._layer_vectors(per_group)
        self.mode = mode
        if mode == "hard":  # the hard network keeps its own BatchNorm statistics
            for m in self.norms:
                saved = (m.running_mean, m.running_var, m.num_batches_tracked)
                m.running_mean, m.running_var, m.num_batches_tracked = self.hard_stats[m]
                self.hard_stats[m] = saved
        try:
            return self.model(x)
        finally:
            self.mode = None
            if mode == "hard":
                for m in self.norms:
                    saved = (m.running_mean, m.running_var, m.num_batches_tracked)
                    m.running_mean, m.running_var, m.num_batches_tracked = self.hard_stats[m]
                    self.hard_stats[m] = saved

    # ------------------------------------------------------------------ one step
    def train_step(self, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """One S2HPruner step: soft pass, hard pass at full width, losses, mask-only backward of G_s, weight
        backward of L + G_h, balanced mask update, weight step, re-rank and read the hard widths."""
        cfg = self.config
        optimizer.zero_grad(set_to_none=True)
        for u in self.logits:
            u.grad = None
        keeps, widths = self.gates()
        soft = self._run("soft", x, keeps)
        hard = self._run("hard", x, self.masks)

        task = F.cross_entropy(soft, y)
        t = cfg.kd_temperature
        log_p, log_q = F.log_softmax(soft / t, dim=-1), F.log_softmax(hard / t, dim=-1)
        log_p_bar, log_q_bar = log_p.detach(), log_q.detach()
        kd_hard = cfg.alpha * (log_p_bar.exp() * (log_p_bar - log_q)).sum(-1).mean()   # G_h: weights, hard path
        kd_soft = cfg.alpha * (log_p.exp() * (log_p - log_q_bar)).sum(-1).mean()       # G_s: masks, soft path

        all_widths = [float(g.channels) for g in self.groups]
        for slot, g in enumerate(self.prunable):
            all_widths[g.index] = widths[slot]
        ratio = (self.constant_flops + self._flops(all_widths)) / self.dense_flops
        flops_loss = cfg.flops_weight * (ratio - cfg.target_flops) ** 2
        if isinstance(flops_loss, Tensor) and flops_loss.requires_grad:
            flops_grads = torch.autograd.grad(flops_loss, self.logits, allow_unused=True)
        else:
            flops_grads = [None] * len(self.logits)
            flops_loss = torch.as_tensor(flops_loss, dtype=torch.float64)
        kd_soft_grads = torch.autograd.grad(kd_soft, self.logits, retain_graph=True, allow_unused=True)
        (task + kd_hard).backward()

        # balanced SGD on each group's logits
        lr = cfg.mask_lr * _lr_scale(optimizer)
        r = flops_loss.item()
        dyn = min(r / (cfg.flops_weight * cfg.tolerance ** 2), 1.0)
        with torch.no_grad():
            for u, g_s, g_f in zip(self.logits, kd_soft_grads, flops_grads):
                g_d = (u.grad if u.grad is not None else torch.zeros_like(u))
                if g_s is not None:
                    g_d = g_d + g_s
                g_f = torch.zeros_like(u) if g_f is None else g_f.to(u.dtype)
                norm_d, norm_f = g_d.norm().item(), g_f.norm().item()
                if dyn > 0:
                    weighted_f = cfg.balance / dyn * norm_f
                    if 0 < norm_d < weighted_f:
                        g_d = g_d * _capped(weighted_f / norm_d, cfg.max_balance_scale)
                    elif 0 < weighted_f <= norm_d:
                        g_f = g_f * _capped(norm_d / weighted_f, cfg.max_balance_scale)
                u.sub_(lr * (g_d + g_f))
                if cfg.recenter:
                    u.sub_(u.mean())
        optimizer.step()
        ratio = ratio.detach() if isinstance(ratio, Tensor) else ratio
        metrics = {"loss": task.item(), "kd_hard": kd_hard.item(), "kd_soft": kd_soft.item(),
                   "flops_loss": r, "soft_flops_ratio": float(ratio),
                   "soft_acc": (soft.argmax(-1) == y).float().mean().item(),
                   "hard_acc": (hard.argmax(-1) == y).float().mean().item()}
        self.refresh()
        return metrics


def _capped(scale: float, cap: Optional[float]) -> float:
    return scale if cap is None else min(scale, cap)


def _lr_scale(optimizer: torch.optim.Optimizer) -> float:
    group = optimizer.param_groups[0]
    initial = group.get("initial_lr", group["lr"])
    return group["lr"] / initial if initial else 1.0

