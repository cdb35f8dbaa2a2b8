"""CR-SFP and SFP on the two-path engine (ALGORITHMS.md §2).

Soft filter pruning masks, in every pruning unit, the ``int(C * rate)`` least important of its ``C`` filters
(criterion ``l2``, ``fpgm`` or ``taylor``), re-ranked at construction and after every epoch; a masked filter
may come back at the next re-ranking. The pruned network (P-NN) is the engine's *hard* path, the reference
network (R-NN) its *dense* path, on the same weights.

Structures
----------
``structure="layers"`` (the default) is the authors' training. The units are the block convolutions, each
masked on its own: every convolution except the stem, projection shortcuts, depthwise / grouped convolutions
and convolutions producing the model output (:mod:`s2hk.crsfp_layers` finds them in any model's graph).

- The P-NN runs at full width (every channel group pinned whole) with each block convolution computing with
  ``weight * mask``: a masked filter gets exactly zero gradient from the P-NN loss, and the P-NN is the
  network with its masked filters zeroed. The R-NN uses the full weights, so masked filters get gradient from
  the R-NN loss.
- The masked filters are zeroed in place in the weights at every re-ranking (construction and
  :meth:`CRSFPruner.on_epoch_end`), and regrow from zero through the R-NN loss until the next one. A zeroed
  filter whose BatchNorm is followed by a ReLU regrows only where the BatchNorm's shift is positive: at a
  shift of 0 (its initial value) the channel is exactly 0 before the ReLU, whose gradient is 0 there, so the
  filter and the shift stay put -- as in the authors' code. With ``criterion="fpgm"`` the masked filters'
  gradients are zeroed at every step as well (the authors' code does so, after the FPGM paper), so only
  momentum moves them between re-rankings.
- :meth:`CRSFPruner.export` removes the masked filters and folds the constants their channels still carry (a
  BatchNorm of a zero output) into the convolution reading them or the residual sum receiving them: the
  export equals the P-NN (:mod:`s2hk.crsfp_layers`), and :meth:`CRSFPruner.flops` ``("hard")`` is its exact
  count.

``structure="groups"`` keeps, in every prunable engine channel group, the ``C - int(C * rate)`` best channels,
pinned with :meth:`~s2hk.engine.TwoPathNetwork.set_hard_widths`: the hard path runs the physically narrow
network, and nothing is zeroed (a masked channel takes no part in the P-NN, so it gets no gradient from the
P-NN loss, and keeps training through the R-NN loss). Convolutions whose outputs meet in a residual sum form
one group, pruned as a whole -- shortcut and stem included -- which is how the narrow network can drop those
channels; groups the engine freezes (channels reaching the model output or coming from the input, ignored
layers) are never pruned. The export is the narrow network itself.

Both structures share everything between the two networks but the classifier: CR-SFP adds a second head for
the P-NN (the R-NN keeps the model's own; BatchNorm affine parameters are shared) and each network keeps its
own BatchNorm running statistics, the R-NN the model's and the P-NN the hard path's, which
:meth:`CRSFPruner.recalibrate_bn` re-estimates before evaluation. The loss is

    CE(z_P, y) + CE(z_R, y) + alpha / 2 [KL(sg(p_R) || p_P) + KL(sg(p_P) || p_R)]

with the P-NN on view ``x1`` and the R-NN on view ``x2`` (temperature 1, batch-mean KL, ``sg`` = no gradient);
``symmetric=True`` also runs the swapped views and averages the two losses. :class:`SFPruner` is plain SFP on
this engine: ``alpha = 0`` and a single head shared by both paths.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .crsfp_layers import MaskedLayer, finish_export, layer_selections, plan_layers, pnn_flops
from .distributed import all_reduce_mean_
from .engine import TensorMove, TwoPathNetwork
from .graph import LayerSpec
from .layers import GatedConv, GatedLinear, Selection, _conv, select
from .s2h import S2HPruner

__all__ = ["CRSFPruner", "SFPruner", "CRITERIA", "STRUCTURES", "check_options", "filter_scores"]

CRITERIA = ("l2", "fpgm", "taylor")
STRUCTURES = ("layers", "groups")
_OUTPUT_REASON = "reaches the model output"


def check_options(method: str, options: dict) -> None:
    """Refuse method options that ``method`` ("crsfp" or "sfp") does not take, or bad values; ValueError."""
    known = {"criterion", "symmetric", "ignore", "prune_embedding", "structure"} | \
        ({"alpha"} if method == "crsfp" else set())
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; known: {sorted(known)}")
    if "criterion" in options and options["criterion"] not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {options['criterion']!r}")
    if "structure" in options and options["structure"] not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {options['structure']!r}")
    if "alpha" in options:
        alpha = options["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
    for flag in ("symmetric", "prune_embedding"):
        if flag in options and not isinstance(options[flag], bool):
            raise ValueError(f"{flag} must be true or false, got {options[flag]!r}")


def filter_scores(weights: Sequence[Tensor], criterion: str, taylor: Optional[Sequence[Tensor]] = None) -> Tensor:
    """Importance of the ``C`` channels produced by the layers of ``weights`` (each ``(C, ...)``), float64,
    averaged over the layers: ``l2`` the filter's L2 norm; ``fpgm`` the sum of the filter's Euclidean
    distances to the layer's other filters (filters near the geometric median score low); ``taylor`` the
    accumulated ``|w * grad|`` given in ``taylor`` (one ``(C,)`` tensor per layer)."""
    scores = []
    for i, w in enumerate(weights):
        flat = w.detach().reshape(w.shape[0], -1).to(torch.float64)
        if criterion == "l2":
            scores.append(flat.norm(dim=1))
        elif criterion == "fpgm":
            scores.append(torch.cdist(flat, flat).sum(dim=1))
        elif criterion == "taylor":
            scores.append(taylor[i].to(torch.float64))
        else:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    return torch.stack(scores).mean(0)


def kept_channels(scores: Tensor, rate: float) -> list[int]:
    """The ``C - int(C * rate)`` highest-scoring channels (ties to the lower index), sorted."""
    c = scores.numel()
    keep = max(c - int(c * rate), 1)
    order = torch.sort(-scores, stable=True).indices
    return sorted(order[:keep].tolist())


class _TwoHeadLinear(GatedLinear):
    """The classifier's wrapper with a separate P-NN head: the dense path uses the model's own layer
    (``module``), the hard path ``hard_module`` (same shapes, its own parameters)."""

    def __init__(self, source: GatedLinear) -> None:
        super().__init__(source.module, source.spec, source.state)
        self.hard_module = copy.deepcopy(source.module)

    def _hard(self, x: Tensor) -> Tensor:
        lin = self.hard_module
        sel_out = self.state.selections[self.spec.out_layout]
        weight = select(select(lin.weight, 0, sel_out), 1, self.state.selections[self.spec.in_layout])
        return F.linear(x, weight, select(lin.bias, 0, sel_out))

    def dual(self, x_soft: Tensor, x_hard: Tensor) -> tuple[Tensor, Tensor]:
        return self._soft(x_soft), self._hard(x_hard)


class _MaskedConv(GatedConv):
    """A block convolution of the per-layer P-NN: on the hard path it computes with ``weight * keep`` at full
    width (``keep``: ``(C_out,)`` buffer in the weight's dtype, 1 for a kept filter and 0 for a masked one), so a
    masked filter's gradient from that path is exactly zero; the other paths are the model's own conv."""

    def __init__(self, source: GatedConv) -> None:
        super().__init__(source.module, source.spec, source.state)
        weight = source.module.weight
        self.register_buffer("keep", torch.ones(weight.shape[0], dtype=weight.dtype, device=weight.device))

    def keep_mask(self) -> Tensor:
        """``keep`` shaped to broadcast over the weight ``(C_out, 1, ...)``."""
        return self.keep.view(-1, *[1] * (self.module.weight.dim() - 1))

    def _hard(self, x: Tensor) -> Tensor:
        conv = self.module
        return _conv(conv, x, conv.weight * self.keep_mask(), conv.bias, conv.groups)

    def dual(self, x_soft: Tensor, x_hard: Tensor) -> tuple[Tensor, Tensor]:
        return self._soft(x_soft), self._hard(x_hard)


class CRSFPruner(TwoPathNetwork):
    """CR-SFP: soft filter pruning with a P-NN / R-NN pair and bidirectional KD (see the module docstring).

    Args:
        model: the network (trained in place; :meth:`export` gives the pruned P-NN).
        example_inputs: one batch (or a batch of one) of the model's input, for tracing and FLOPs; with
            ``structure="layers"`` also the spatial size the export is made for (see :mod:`s2hk.crsfp_layers`).
        prune_rate: ``int(C * rate)`` of every unit's ``C`` filters are masked.
        criterion: "l2" (default), "fpgm" or "taylor" (``|w * grad|`` accumulated over the epoch; the
            ranking at construction, before any gradient, falls back to l2).
        alpha: weight of the KD terms (0: no KD).
        symmetric: also train on the swapped views and average the two losses.
        ignore: module or node names to keep dense.
        prune_embedding: also prune channels normalised by a LayerNorm (a transformer's embedding width).
        two_heads: give the P-NN its own copy of the classifier (CR-SFP); False: both paths share the head.
        structure: the pruning units (module docstring): "layers" (default; every block convolution on its own,
            masked filters zeroed at every re-ranking) or "groups" (the engine's channel groups, nothing zeroed).

    Example::

        pruner = CRSFPruner(model, torch.randn(1, 3, 32, 32), prune_rate=0.3)
        opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.1, momentum=0.9, nesterov=True)
        for epoch in range(epochs):
            for (x1, x2), y in loader:          # make_loaders(..., two_views=True)
                pruner.train_step((x1, x2), y, opt)
            pruner.on_epoch_end()               # re-rank: masked filters may come back
        small = pruner.export()
    """

    def __init__(self, model: nn.Module, example_inputs: Any, prune_rate: float = 0.3, criterion: str = "l2",
                 alpha: float = 1.0, symmetric: bool = False, ignore: Iterable[str] = (),
                 two_heads: bool = True, prune_embedding: bool = False, structure: str = "layers") -> None:
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        if not 0.0 <= float(prune_rate) < 1.0:
            raise ValueError(f"prune_rate must be in [0, 1), got {prune_rate}")
        if not float(alpha) >= 0.0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        super().__init__(model, example_inputs, ignore=ignore, prune_embedding=prune_embedding)
        self.prune_rate = float(prune_rate)
        self.criterion = criterion
        self.alpha = float(alpha)
        self.symmetric = bool(symmetric)
        self.two_heads = bool(two_heads)
        self.structure = structure
        self.phase = "joint"
        self.config = None
        self.head_node: Optional[str] = self._find_head()
        if self.two_heads:
            if self.head_node is None:
                raise ValueError("CR-SFP needs a Linear classifier whose output is the model output; none found "
                                 "(use SFPruner, or two_heads=False)")
            self._install_pnn_head()
        # the pruning units, (name, channels): block convolutions by module name, or prunable groups by name
        self.masked_layers: list[MaskedLayer] = []
        self._units: list[tuple[str, int]] = []
        # producers of every unit's filters: (node name, unit, row offset, channels, rows per channel -- an
        # attention head spans head_dim rows)
        self._producers: list[tuple[str, int, int, int, int]] = []
        if structure == "layers":
            self._build_layers()
        else:
            self._build_groups()
        self._kept: dict[str, list[int]] = {}  # layers: each unit's kept filters (host copies)
        self._taylor: list[Tensor] = [torch.zeros(channels, dtype=torch.float64, device=self.ranks.device)
                                      for _, _, _, channels, _ in self._producers]
        self._taylor_steps = 0
        self.update_masks()

    def _move_state(self, move: TensorMove) -> None:
        """The engine's state, and the Taylor accumulators (float64 sums: placed, never rounded to the network's
        dtype)."""
        super()._move_state(move)
        self._taylor = [move.place(t) for t in self._taylor]

    # ------------------------------------------------------------------ construction
    def _build_layers(self) -> None:
        """Units = block convolutions, each call's wrapper made a :class:`_MaskedConv`; the P-NN at full width."""
        self.masked_layers = plan_layers(self.analysis, self.prune_rate)
        for layer in self.masked_layers:
            for node in layer.nodes:
                self._replace_wrapper(node, _MaskedConv(self.wrappers[node]))
        if self.prunable:
            self.set_hard_widths({g.name: g.channels for g in self.prunable})
        self._units = [(layer.target, layer.channels) for layer in self.masked_layers]
        self._producers = [(layer.node, i, 0, layer.channels, 1) for i, layer in enumerate(self.masked_layers)]
        self._pnn_flops = pnn_flops(self.flops_polynomial, self.masked_layers)

    def _build_groups(self) -> None:
        """Units = the prunable channel groups, produced by every layer writing their channels."""
        self._units = [(g.name, g.channels) for g in self.prunable]
        for spec in self.analysis.layers.values():
            if spec.kind == "norm":
                continue
            offset = 0
            for seg in spec.out_layout:
                slot = self._slot.get(seg.group)
                if slot is not None:
                    self._producers.append((spec.node, slot, offset, seg.size, seg.repeat))
                offset += seg.size * seg.repeat

    def _find_head(self) -> Optional[str]:
        """The last Linear call whose output channels reach the model output."""
        head = None
        for spec in self.analysis.layers.values():
            if spec.kind == "linear" and spec.out_layout and all(
                    _OUTPUT_REASON in self.groups[seg.group].frozen_reasons for seg in spec.out_layout):
                head = spec.node
        return head

    def _install_pnn_head(self) -> None:
        """Replace the classifier's wrapper in the traced module by one holding a P-NN copy of the head."""
        node = next(n for n in self.graph_module.graph.nodes if n.op == "call_module" and n.name == self.head_node)
        target = str(node.target)
        old = self.graph_module.get_submodule(target)
        if not isinstance(old, GatedLinear):
            raise ValueError(f"classifier call '{self.head_node}' is not a linear layer wrapper")
        self._replace_wrapper(self.head_node, _TwoHeadLinear(old))

    def _replace_wrapper(self, node_name: str, new: nn.Module) -> None:
        """Put ``new`` in place of the wrapper that layer call ``node_name`` runs in the traced module."""
        node = next(n for n in self.graph_module.graph.nodes if n.op == "call_module" and n.name == node_name)
        parent_name, _, child = str(node.target).rpartition(".")
        parent = self.graph_module.get_submodule(parent_name) if parent_name else self.graph_module
        setattr(parent, child, new)
        self.wrappers[node_name] = new

    @property
    def pnn_head(self) -> Optional[nn.Module]:
        """The P-NN's classifier (None for a single head)."""
        wrapper = self.wrappers.get(self.head_node) if self.head_node is not None else None
        return getattr(wrapper, "hard_module", None)

    # ------------------------------------------------------------------ masks
    def _producer_weights(self) -> list[Tensor]:
        return [self.wrappers[name].module.weight[offset:offset + channels * rows].reshape(channels, -1)
                for name, _, offset, channels, rows in self._producers]

    def unit_scores(self) -> list[Tensor]:
        """Current importance (float64) of every unit's filters under the criterion: ``(C,)`` per unit."""
        criterion = self.criterion
        if criterion == "taylor" and self._taylor_steps == 0:
            criterion = "l2"
        weights = self._producer_weights()
        out = []
        for slot in range(len(self._units)):
            idx = [i for i, p in enumerate(self._producers) if p[1] == slot]
            out.append(filter_scores([weights[i] for i in idx], criterion, [self._taylor[i] for i in idx]))
        return out

    @torch.no_grad()
    def update_masks(self) -> dict[str, list[int]]:
        """Re-rank every unit and keep its ``C - int(C * rate)`` best filters in the P-NN; with
        ``structure="layers"`` the others are zeroed in the weights. Resets the Taylor accumulators. Returns the
        kept filters by unit name."""
        kept = {name: kept_channels(s, self.prune_rate) for (name, _), s in zip(self._units, self.unit_scores())}
        self._set_kept(kept)
        if self.structure == "layers":
            for layer in self.masked_layers:
                wrapper = self.wrappers[layer.node]
                wrapper.module.weight.masked_fill_(wrapper.keep_mask() == 0, 0.0)
        for t in self._taylor:
            t.zero_()
        self._taylor_steps = 0
        return kept

    def _set_kept(self, kept: dict[str, list[int]]) -> None:
        """Make ``kept`` (by unit name) the P-NN: the masks of every call of each block conv, or the pinned
        channels of each group."""
        if self.structure == "layers":
            self._kept = {name: list(channels) for name, channels in kept.items()}
            for layer in self.masked_layers:
                keep = torch.zeros(layer.channels, dtype=torch.float64)
                keep[self._kept[layer.target]] = 1.0
                for node in layer.nodes:
                    buffer = self.wrappers[node].keep
                    buffer.copy_(keep.to(buffer.device, buffer.dtype))
        elif kept:
            self.set_hard_widths(kept)
        self._flops_ratio = self.flops("hard") / self.flops("full")

    def on_epoch_end(self) -> None:
        """SFP's per-epoch re-ranking (masked filters whose importance grew come back; the others are zeroed
        again with ``structure="layers"``)."""
        self.update_masks()

    def kept_channels(self) -> dict[str, list[int]]:
        """The P-NN's kept filters of every unit, by unit name (block conv module or channel group)."""
        if self.structure == "layers":
            return {name: list(channels) for name, channels in self._kept.items()}
        out = {}
        for g, sel in zip(self.prunable, self.plan.selections):
            if sel is None:
                out[g.name] = list(range(g.channels))
            elif isinstance(sel, int):
                out[g.name] = list(range(sel))
            else:
                out[g.name] = sel.tolist()
        return out

    @torch.no_grad()
    def _accumulate_taylor(self) -> None:
        for acc, (name, _, offset, channels, rows) in zip(self._taylor, self._producers):
            w = self.wrappers[name].module.weight
            if w.grad is not None:
                end = offset + channels * rows
                g = (w[offset:end] * w.grad[offset:end]).abs()
                acc += g.reshape(channels, -1).sum(1, dtype=torch.float64)
        self._taylor_steps += 1

    # ------------------------------------------------------------------ one step
    def set_phase(self, phase: str) -> None:
        """Phases do not change CR-SFP's step; the name is kept for the records."""
        self.phase = phase

    def mask_parameters(self) -> list[nn.Parameter]:
        """CR-SFP learns no mask parameters."""
        return []

    def losses(self, z_p: Tensor, z_r: Tensor, y: Tensor) -> dict[str, Tensor]:
        """The CR-SFP loss of P-NN logits ``z_p`` and R-NN logits ``z_r``: ``loss``, ``ce_pnn``, ``ce_rnn``, ``kd``
        (``kd = [KL(sg(p_R) || p_P) + KL(sg(p_P) || p_R)] / 2``; ``loss = ce_pnn + ce_rnn + alpha * kd``)."""
        ce_p = F.cross_entropy(z_p, y)
        ce_r = F.cross_entropy(z_r, y)
        if self.alpha > 0:
            log_p, log_r = F.log_softmax(z_p, -1), F.log_softmax(z_r, -1)
            kl_rp = F.kl_div(log_p, log_r.detach(), reduction="batchmean", log_target=True)
            kl_pr = F.kl_div(log_r, log_p.detach(), reduction="batchmean", log_target=True)
            kd = 0.5 * (kl_rp + kl_pr)
            loss = ce_p + ce_r + self.alpha * kd
        else:
            kd = ce_p.detach().new_zeros(())
            loss = ce_p + ce_r
        return {"loss": loss, "ce_pnn": ce_p, "ce_rnn": ce_r, "kd": kd}

    def _views_loss(self, x_p: Any, x_r: Any, y: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        z_p = self.run("hard", x_p)
        z_r = self.run("dense", x_r)
        return self.losses(z_p, z_r, y), z_p, z_r

    def train_step(self, x: Any, y: Tensor, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """One step on the batch ``((x1, x2), y)`` (a single tensor ``x``: both views are ``x``); ``optimizer``
        holds :meth:`weight_parameters`. Returns loss, ce_pnn, ce_rnn, kd, pnn_acc, rnn_acc, hard_flops_ratio,
        and soft_acc / hard_acc (= rnn_acc / pnn_acc)."""
        x1, x2 = (x[0], x[1]) if isinstance(x, (tuple, list)) else (x, x)
        optimizer.zero_grad(set_to_none=True)
        self.prepare_hard()
        terms, z_p, z_r = self._views_loss(x1, x2, y)
        pnn_acc, rnn_acc = _accuracy(z_p, y), _accuracy(z_r, y)
        if self.symmetric:
            swapped, z_p2, z_r2 = self._views_loss(x2, x1, y)
            terms = {k: 0.5 * (v + swapped[k]) for k, v in terms.items()}
            pnn_acc = 0.5 * (pnn_acc + _accuracy(z_p2, y))
            rnn_acc = 0.5 * (rnn_acc + _accuracy(z_r2, y))
        terms["loss"].backward()
        all_reduce_mean_([p.grad for p in self.weight_parameters() if p.grad is not None])
        if self.structure == "layers" and self.criterion == "fpgm":
            self._freeze_masked_filters()
        if self.criterion == "taylor":
            self._accumulate_taylor()
        optimizer.step()
        keys = ("loss", "ce_pnn", "ce_rnn", "kd")
        host = torch.stack([terms[k].detach().double() for k in keys] + [pnn_acc, rnn_acc]).tolist()
        metrics = dict(zip(keys + ("pnn_acc", "rnn_acc"), host))
        metrics["hard_flops_ratio"] = self._flops_ratio
        metrics["soft_acc"], metrics["hard_acc"] = metrics["rnn_acc"], metrics["pnn_acc"]
        return metrics

    @torch.no_grad()
    def _freeze_masked_filters(self) -> None:
        """Zero the gradient of every masked filter (FPGM's training, as the authors' code does for fpgm)."""
        for layer in self.masked_layers:
            wrapper = self.wrappers[layer.node]
            grad = wrapper.module.weight.grad
            if grad is not None:
                grad.masked_fill_(wrapper.keep_mask() == 0, 0.0)

    def forward(self, *inputs: Any, path: str = "hard") -> Any:
        """Logits of the P-NN (``"hard"`` / ``"pnn"``) or the R-NN (``"dense"`` / ``"rnn"``)."""
        path = {"pnn": "hard", "rnn": "dense"}.get(path, path)
        if path not in ("hard", "dense"):
            raise ValueError(f"path must be 'hard' (P-NN) or 'dense' (R-NN), got {path!r}")
        return super().forward(*inputs, path=path)

    # ------------------------------------------------------------------ evaluation
    def recalibrate_bn(self, batches: Iterable, num_batches: int = 200) -> int:
        """Re-estimate the BatchNorm statistics of the R-NN (the model's own) and of the P-NN (the hard
        path's) from up to ``num_batches`` training batches; returns the number of batches used."""
        return self.recalibrate_norms(batches, num_batches, ("dense", "hard"))

    @torch.no_grad()
    def evaluate(self, batches: Iterable, paths: tuple = ("dense", "hard")) -> dict[str, float]:
        """Top-1 accuracy of the R-NN (``rnn_acc``, alias ``soft_acc``) and the P-NN (``pnn_acc``, alias
        ``hard_acc``) over ``batches`` in eval mode, and ``gap = rnn_acc - pnn_acc``."""
        del paths  # both networks are always evaluated
        res = S2HPruner.evaluate(self, batches, paths=("dense", "hard"))
        out = {"rnn_acc": res["dense_acc"], "pnn_acc": res["hard_acc"]}
        out.update(soft_acc=out["rnn_acc"], hard_acc=out["pnn_acc"], gap=out["rnn_acc"] - out["pnn_acc"])
        return out

    def flops(self, kind: str = "hard") -> int:
        """FLOPs (2 x MACs of every conv, linear and matmul) of the ``"full"`` network or of the P-NN
        (``"hard"``: the exact count of :meth:`export`); ``"soft"`` as in the engine."""
        if kind == "hard" and self.structure == "layers":
            return self._pnn_flops
        return super().flops(kind)

    # ------------------------------------------------------------------ export
    def named_layer_selections(self) -> dict[str, tuple[Selection, Selection, LayerSpec]]:
        """For every wrapped layer call: (input selection, output selection, spec) of the exported P-NN. With
        ``structure="layers"``: the removable block convs' kept filters, their BatchNorms' kept channels and the
        kept inputs of the convs reading them (:func:`s2hk.crsfp_layers.layer_selections`)."""
        if self.structure == "groups":
            return super().named_layer_selections()
        narrowed = layer_selections(self.masked_layers, self._kept, self.ranks.device)
        return {name: (*narrowed.get(name, (None, None)), spec) for name, spec in self.analysis.layers.items()}

    def export(self) -> Any:
        """The P-NN as a plain, physically smaller model (kept filters and channels only, hard-path BN
        statistics, the P-NN head; with ``structure="layers"`` the removed channels' constants folded in), in
        eval mode; its outputs equal the hard path's in eval mode."""
        exported = super().export()
        head = self.pnn_head
        if head is not None:
            sel_in, sel_out, spec = self.named_layer_selections()[self.head_node]
            small = exported.get_submodule(spec.target)
            with torch.no_grad():
                small.weight.copy_(select(select(head.weight, 0, sel_out), 1, sel_in))
                if head.bias is not None:
                    small.bias.copy_(select(head.bias, 0, sel_out))
        if self.structure == "layers":
            finish_export(self, exported)
        return exported

    # ------------------------------------------------------------------ state
    def pruning_state(self) -> dict:
        """Structure, units (``[name, channels]`` under the key ``"layers"`` or ``"groups"``), kept filters,
        Taylor accumulators, hard-path BN statistics and the P-NN head (the model's own weights are in
        ``model.state_dict()``)."""
        head = self.pnn_head
        return {"method": "crsfp" if self.two_heads else "sfp", "structure": self.structure,
                self.structure: [[name, channels] for name, channels in self._units], "kept": self.kept_channels(),
                "taylor": [t.clone() for t in self._taylor], "taylor_steps": self._taylor_steps,
                "phase": self.phase, "hard_bn": self.hard_norm_state(),
                "pnn_head": {k: v.detach().clone() for k, v in head.state_dict().items()} if head is not None else None}

    def load_pruning_state(self, state: dict) -> None:
        """Restore :meth:`pruning_state` (the weights are not zeroed again: they come with the model's state).
        Everything is checked before anything is written: a state made for another structure, other units,
        another rate or heads is refused whole (ValueError)."""
        structure = state.get("structure", "groups")  # states saved before the per-layer structure: groups
        if structure != self.structure:
            raise ValueError(f"pruning state was saved with structure={structure!r}, this pruner has "
                             f"structure={self.structure!r}")
        mine = [[name, channels] for name, channels in self._units]
        if [list(u) for u in state.get(structure, [])] != mine:
            units = "block convolutions" if structure == "layers" else "channel groups"
            raise ValueError(f"pruning state was saved for different {units}: expected {mine}, got "
                             f"{state.get(structure)}")
        if (state.get("pnn_head") is None) != (self.pnn_head is None):
            raise ValueError("pruning state and pruner differ in having a separate P-NN head")
        kept = state["kept"]
        for name, channels in self._units:
            idx = kept.get(name)
            if idx is None or len(set(idx)) != len(idx) or len(idx) != channels - int(channels * self.prune_rate) \
                    or not all(0 <= int(i) < channels for i in idx):
                raise ValueError(f"pruning state keeps {idx} of the {channels} filters of '{name}'; prune_rate "
                                 f"{self.prune_rate} keeps {channels - int(channels * self.prune_rate)} distinct ones")
        if [tuple(t.shape) for t in state["taylor"]] != [tuple(t.shape) for t in self._taylor]:
            raise ValueError("pruning state's Taylor accumulators do not fit this pruner's units")
        writes = self.hard_norm_writes(state["hard_bn"])
        with torch.no_grad():
            for current, saved in writes:
                current.copy_(saved)
            if self.pnn_head is not None:
                self.pnn_head.load_state_dict(state["pnn_head"])
            for t, saved in zip(self._taylor, state["taylor"]):
                t.copy_(saved)
            self._set_kept({name: [int(i) for i in kept[name]] for name, _ in self._units})
        self._taylor_steps = int(state["taylor_steps"])
        self.phase = state["phase"]


class SFPruner(CRSFPruner):
    """Plain SFP on the engine: CR-SFP with ``alpha = 0`` and one classifier head shared by the P-NN (hard
    path) and the R-NN (dense path); one view serves both paths unless two are given."""

    def __init__(self, model: nn.Module, example_inputs: Any, prune_rate: float = 0.3, criterion: str = "l2",
                 symmetric: bool = False, ignore: Iterable[str] = (), prune_embedding: bool = False,
                 structure: str = "layers") -> None:
        super().__init__(model, example_inputs, prune_rate=prune_rate, criterion=criterion, alpha=0.0,
                         symmetric=symmetric, ignore=ignore, two_heads=False, prune_embedding=prune_embedding,
                         structure=structure)


def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.detach().argmax(-1) == y).double().mean()
