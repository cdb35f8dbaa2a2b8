"""Exact FLOPs accounting (ALGORITHMS.md §4).

Convention: **FLOPs = 2 x MACs**, counting the multiply-accumulates of every convolution, linear layer and
matrix product (attention's ``QK^T`` and ``AV`` included, as matmuls, two-operand ``einsum`` or
``scaled_dot_product_attention``),
the stem and the classifier included; bias adds, norms, activations and pooling are not counted. Counts are
for the ``example_inputs`` as given, batch included: pass a batch of one for per-image FLOPs. This agrees with
``torch.utils.flop_counter`` on conv/linear/matmul models.

Two views of the same count:
- :func:`count_macs` / :func:`count_flops` run a module once and add up what its torch calls really compute;
- :class:`FlopsPolynomial` gives the count as a function of the channel groups' widths (a sum of
  ``macs_per_channel_pair * out_width * in_width`` terms), differentiable in the widths: the FLOPs regulariser
  uses it, and at the hard widths it equals :func:`count_flops` of the exported narrow model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .graph import GraphAnalysis, Layout, einsum_macs, einsum_subscripts

__all__ = ["count_macs", "count_flops", "FlopsPolynomial", "FLOPS_SCOPES"]

#: What a FLOPs *ratio* counts. "all": every conv, linear and matrix product (the convention above).
#: "prunable": only the layers whose width can change, without the stem (it reads the model input) and the
#: classifier (it produces the model output) -- how the S2HPruner authors' regulariser counts, so that a
#: nominal target matches theirs. Absolute FLOPs are always "all".
FLOPS_SCOPES = ("all", "prunable")


def check_scope(scope: str) -> str:
    if scope not in FLOPS_SCOPES:
        raise ValueError(f"flops_scope must be one of {FLOPS_SCOPES}, got {scope!r}")
    return scope


def _prod(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _matmul_macs(a: Tensor, b: Tensor, out: Tensor) -> int:
    inner = a.shape[-1] if a.dim() >= 1 else 1
    return out.numel() * int(inner) if out.dim() > 0 else int(inner)


def _conv_macs(args: tuple, kwargs: dict, out: Tensor) -> int:
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    return out.numel() * _prod(weight.shape[1:])


def _conv_transpose_macs(args: tuple, kwargs: dict, out: Tensor) -> int:
    inp = args[0] if args else kwargs["input"]
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    return inp.numel() * _prod(weight.shape[1:])


def _linear_macs(args: tuple, kwargs: dict, out: Tensor) -> int:
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    return out.numel() * int(weight.shape[1])


def _mm_macs(args: tuple, kwargs: dict, out: Tensor) -> int:
    return _matmul_macs(args[0], args[1], out)


def _addmm_macs(args: tuple, kwargs: dict, out: Tensor) -> int:  # addmm(bias, a, b) and friends
    return _matmul_macs(args[1], args[2], out)


def _sdpa_macs(args: tuple, kwargs: dict, out: Tensor) -> int:
    q, k, v = (args + (None,) * 3)[:3]
    q = q if q is not None else kwargs["query"]
    k = k if k is not None else kwargs["key"]
    v = v if v is not None else kwargs["value"]
    batch = _prod(q.shape[:-2])
    return batch * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def _einsum_macs(args: tuple, kwargs: dict, out: Tensor) -> int:
    operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    if len(operands) != 2:  # one operand: a permute or a sum, no multiplies; more: not counted (see docstring)
        return 0
    inputs, _ = einsum_subscripts(args[0], [o.dim() for o in operands])
    return einsum_macs(inputs, [o.shape for o in operands])


_MAC_RULES = {
    F.conv1d: _conv_macs, F.conv2d: _conv_macs, F.conv3d: _conv_macs,
    F.conv_transpose1d: _conv_transpose_macs, F.conv_transpose2d: _conv_transpose_macs,
    F.conv_transpose3d: _conv_transpose_macs,
    F.linear: _linear_macs,
    torch.matmul: _mm_macs, Tensor.__matmul__: _mm_macs, Tensor.matmul: _mm_macs,
    torch.mm: _mm_macs, Tensor.mm: _mm_macs, torch.bmm: _mm_macs, Tensor.bmm: _mm_macs,
    torch.addmm: _addmm_macs, torch.baddbmm: _addmm_macs, torch.addbmm: _addmm_macs,
    F.scaled_dot_product_attention: _sdpa_macs,
    torch.einsum: _einsum_macs,
}


class _MacCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rule = _MAC_RULES.get(func)
        if rule is not None and isinstance(out, Tensor):
            self.macs += rule(args, kwargs, out)
        elif func is Tensor.__rmatmul__ and isinstance(out, Tensor):
            self.macs += _matmul_macs(args[1], args[0], out)
        return out


def count_macs(module: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward of ``module`` on ``example_inputs`` (eval mode, no grad)."""
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    modes = {m: m.training for m in module.modules()}
    counter = _MacCounter()
    try:
        module.eval()
        with torch.no_grad(), counter:
            module(*inputs)
    finally:
        for m, flag in modes.items():
            m.train(flag)
    return counter.macs


def count_flops(module: nn.Module, example_inputs: Any) -> int:
    """FLOPs (= 2 x MACs) of one forward of ``module`` on ``example_inputs``; see the module docstring."""
    return 2 * count_macs(module, example_inputs)


@dataclass
class _Term:
    layer: str
    macs_per_pair: int       # MACs per (output channel, input channel per group) pair
    out_layout: Layout
    in_layout: Layout | None  # None: a fixed number of input channels per output channel (grouped by whole groups)
    in_per_group_divisor: int = 1
    node: str = ""           # fx node name of the layer call (for excluding skipped residual blocks)


class FlopsPolynomial:
    """The model's FLOPs as a polynomial in the widths of its channel groups.

    ``flops(k) = 2 * (constant + sum_t a_t * out_t(k) * in_t(k))`` where ``out_t`` / ``in_t`` are the widths
    of a layer's output / input channels (linear in the group widths ``k``) and ``a_t`` its MACs per channel
    pair (batch x output positions x kernel size). ``constant`` covers layers that never change width.
    """

    def __init__(self, analysis: GraphAnalysis, model: nn.Module, example_inputs: Any) -> None:
        self.num_groups = len(analysis.groups)
        groups = analysis.groups
        self.full_widths = [g.channels for g in analysis.groups]
        modules = dict(analysis.graph_module.named_modules())
        self.terms: list[_Term] = []
        for spec in analysis.layers.values():
            if spec.kind == "norm":
                continue
            module = modules[spec.target]
            out_shape = analysis.node_shapes[spec.node]
            if spec.kind == "conv":
                a = _prod(out_shape[:1]) * _prod(out_shape[2:]) * _prod(module.kernel_size)
                if spec.depthwise:  # whole groups: each kept output channel reads C_in / groups inputs
                    self.terms.append(_Term(spec.target, a * (module.in_channels // module.groups),
                                            spec.out_layout, None, node=spec.node))
                else:
                    self.terms.append(_Term(spec.target, a, spec.out_layout, spec.in_layout, module.groups,
                                            node=spec.node))
            else:
                self.terms.append(_Term(spec.target, _prod(out_shape[:-1]), spec.out_layout, spec.in_layout,
                                        node=spec.node))
        for matmul in analysis.matmuls.values():  # attention's QK^T and AV: MACs proportional to the kept heads
            self.terms.append(_Term(matmul.node, matmul.macs_per_position, matmul.layout, None, node=matmul.node))
        self._in_scope = {"all": [True] * len(self.terms),
                          "prunable": [self._prunable_term(t, groups) for t in self.terms]}
        self.dense_macs = count_macs(model, example_inputs)
        self.constant_macs = self.dense_macs - self.macs_at(self.full_widths)
        if self.constant_macs < 0:
            raise RuntimeError("FLOPs accounting is inconsistent: the per-layer terms exceed the model's count")
        self._out_matrix, self._in_matrix, self._in_const, self._coef = self._matrices()
        self._scope_mask = {k: torch.tensor(v, dtype=torch.float64) for k, v in self._in_scope.items()}
        self._scope_dense_macs = {"all": self.dense_macs,
                                  "prunable": self.macs_at(self.full_widths, scope="prunable")}

    @staticmethod
    def _prunable_term(term: _Term, groups: Sequence[Any]) -> bool:
        """Whether a layer counts under scope "prunable": a width of it can change, and it is neither the
        stem (reads the model input) nor the classifier (produces the model output)."""
        out_groups = [groups[s.group] for s in term.out_layout]
        in_groups = [] if term.in_layout is None else [groups[s.group] for s in term.in_layout]
        if any(g.from_input for g in in_groups) or any(g.to_output for g in out_groups):
            return False
        return any(g.prunable for g in out_groups + in_groups)

    def _matrices(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        t, g = len(self.terms), self.num_groups
        out_m = torch.zeros(t, g, dtype=torch.float64)
        in_m = torch.zeros(t, g, dtype=torch.float64)
        in_c = torch.zeros(t, dtype=torch.float64)
        coef = torch.zeros(t, dtype=torch.float64)
        for i, term in enumerate(self.terms):
            coef[i] = term.macs_per_pair / term.in_per_group_divisor
            for seg in term.out_layout:
                out_m[i, seg.group] += seg.repeat
            if term.in_layout is None:
                in_c[i] = 1.0
            else:
                for seg in term.in_layout:
                    in_m[i, seg.group] += seg.repeat
        return out_m, in_m, in_c, coef

    @staticmethod
    def _width(layout: Layout, widths: Sequence[int]) -> int:
        return sum(seg.repeat * widths[seg.group] for seg in layout)

    def macs_at(self, widths: Sequence[int], *, skipped_nodes: Collection[str] = (), scope: str = "all") -> int:
        """Exact integer MACs of the layers in the terms at integer group widths (all groups), leaving out the
        terms of the layer calls named in ``skipped_nodes`` (fx node names, e.g. the layers of skipped residual
        blocks, :attr:`s2hk.depth.SkippableBlock.layers`; pass a set for speed) and those outside ``scope``
        (:data:`FLOPS_SCOPES`)."""
        total = 0
        for term, in_scope in zip(self.terms, self._in_scope[check_scope(scope)]):
            if term.node in skipped_nodes or not in_scope:
                continue
            out_w = self._width(term.out_layout, widths)
            in_w = 1 if term.in_layout is None else self._width(term.in_layout, widths) // term.in_per_group_divisor
            total += term.macs_per_pair * out_w * in_w
        return total

    def flops_at(self, widths: Sequence[int], *, skipped_nodes: Collection[str] = ()) -> int:
        """Exact FLOPs of the whole network when every group has the given integer width and the layer calls
        in ``skipped_nodes`` do not run (see :meth:`macs_at`)."""
        return 2 * (self.constant_macs + self.macs_at(widths, skipped_nodes=skipped_nodes))

    @property
    def dense_flops(self) -> int:
        return 2 * self.dense_macs

    def ratio_at(self, widths: Sequence[int], *, skipped_nodes: Collection[str] = (), scope: str = "all") -> float:
        """Remaining-FLOPs ratio at integer group widths under ``scope``: the whole network's FLOPs over the
        dense count ("all"), or the prunable layers' over their dense count ("prunable")."""
        if check_scope(scope) == "all" or self._scope_dense_macs[scope] == 0:  # nothing in scope: like "all"
            return self.flops_at(widths, skipped_nodes=skipped_nodes) / self.dense_flops
        return self.macs_at(widths, skipped_nodes=skipped_nodes, scope=scope) / self._scope_dense_macs[scope]

    def ratio(self, widths: Tensor, scope: str = "all") -> Tensor:
        """Differentiable remaining-FLOPs ratio for a float64 vector of all groups' widths ``(G,)``; 0-dim."""
        if check_scope(scope) == "all" or self._scope_dense_macs[scope] == 0:
            return self(widths) / self.dense_flops
        return self._varying_macs(widths, self._scope_mask[scope]) / self._scope_dense_macs[scope]

    def __call__(self, widths: Tensor) -> Tensor:
        """Differentiable FLOPs for a float64 vector of all groups' widths ``(G,)``; returns a 0-dim tensor."""
        return 2.0 * (self.constant_macs + self._varying_macs(widths, None))

    def _varying_macs(self, widths: Tensor, mask: Tensor | None) -> Tensor:
        out_m, in_m, in_c, coef = (m.to(widths.device) for m in
                                   (self._out_matrix, self._in_matrix, self._in_const, self._coef))
        if mask is not None:
            coef = coef * mask.to(widths.device)
        out_w = out_m @ widths
        in_w = in_m @ widths + in_c
        return (coef * out_w * in_w).sum()
