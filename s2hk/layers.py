"""Two-path wrappers around a model's own conv, linear and norm layers.

Each wrapper holds the user's layer (parameters shared, nothing copied) and reads the current path from a
shared :class:`PathState` that the engine fills before a forward:

- ``"dense"``: the layer as it is;
- ``"soft"``: the full layer, its output scaled per channel by the keep-probabilities ``w`` (folded into the
  norm's affine parameters where the layer is a norm: ``BN(x) * w = xhat * (gamma w) + beta w``, exact);
- ``"hard"``: only the kept channels: weights sliced to ``[kept_out, kept_in]`` -- a view when the kept set is
  a prefix, a gather of the small weight tensor otherwise. Norms keep separate running statistics for the
  hard path, because the narrow network's activations differ from the full one's.

A channel selection is ``None`` (all channels), an ``int`` k (the prefix ``0..k-1``) or an int64 index tensor.

Implementations (:mod:`s2hk.dispatch`, op ``"bn_gate_act"``): a gated BatchNorm on the soft path and every
BatchNorm on the hard path run either the PyTorch composition below or the fused Triton kernel
``s2hk.kernels.bn_gate_act`` (normalisation and gate in one pass per direction; activations and residual adds
are separate graph nodes here, so its activation is the identity and it gets no residual). ``S2HK_IMPL=triton``
(or ``bn_gate_act=triton``) forces the kernel; ``auto`` takes it only where :data:`s2hk.dispatch.TRITON_WINS`
lists it, and only for channels_last (or 2-D) activations, the layout measured; ``reference`` and ``cpp`` run
the composition (there is no C++ op: ``F.batch_norm`` is aten's own). The dense path, and an ungated norm on
the soft path, is the user's layer itself; LayerNorm always runs the composition.

Path ops (not layers): :class:`ChannelReshape` gives a reshape into attention heads the kept head count on the
hard path, and :class:`ChannelSlice` cuts a parameter-derived tensor meeting channels (a position embedding) to
the kept channels there; both are the plain op on the soft and dense paths.

Convolutions and linear layers stay on the composition (cuDNN / cuBLAS) in :meth:`forward`, which sees one
path at a time. Both paths at once: ``dual(x_soft, x_hard) -> (y_soft, y_hard)``, called by the engine's
dual traversal (:meth:`s2hk.engine.TwoPathNetwork.run_dual`), which needs the soft gates and the hard
selections prepared and ignores ``state.path``. By default it is exactly the soft and the hard computation of
:meth:`forward`, one after the other (same results as two separate forwards). Where dispatch picks Triton, a
linear layer runs ``s2hk.kernels.dual_linear`` (op ``"dual_linear"``: both GEMMs in one launch) and a
convolution whose two inputs are the same tensor (the stem: both paths see the image) runs
``s2hk.kernels.dual_conv`` (op ``"dual_conv"``: one read of the input, the hard output a channel subset of the
soft one's pre-gate value) when it is a 2-D convolution with ``groups == 1`` and zero padding. ``auto`` takes
them only where :data:`s2hk.dispatch.TRITON_WINS` lists them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from .graph import Layout, LayerSpec, layout_width

Selection = Optional[Union[int, Tensor]]

__all__ = ["PathState", "GatedConv", "GatedLinear", "GatedNorm", "ChannelReshape", "ChannelSlice", "select",
           "count_selected", "wrap_layer"]


@dataclass
class PathState:
    """What every wrapper needs for one forward: the path, soft gates and hard channel selections by layout."""

    path: str = "dense"
    gates: dict = field(default_factory=dict)        # layout -> (C,) keep-probabilities
    selections: dict = field(default_factory=dict)   # layout -> Selection


def select(t: Optional[Tensor], dim: int, sel: Selection) -> Optional[Tensor]:
    """Channels ``sel`` of ``t`` along ``dim`` (a view for prefixes)."""
    if t is None or sel is None:
        return t
    if isinstance(sel, int):
        return t.narrow(dim, 0, sel)
    return t.index_select(dim, sel)


def count_selected(sel: Selection, full: int) -> int:
    """How many of ``full`` positions the selection ``sel`` keeps."""
    if sel is None:
        return full
    return sel if isinstance(sel, int) else sel.numel()


def _gate_shape(ndim: int, axis: int) -> list[int]:
    shape = [1] * ndim
    shape[axis] = -1
    return shape


class _Wrapper(nn.Module):
    def __init__(self, module: nn.Module, spec: LayerSpec, state: PathState) -> None:
        super().__init__()
        self.module = module
        self.spec = spec
        # the state is shared by every wrapper and must not be registered as a submodule or buffer
        object.__setattr__(self, "state", state)

    def extra_repr(self) -> str:
        return f"gate={self.spec.gate}"

    def forward(self, x: Tensor) -> Tensor:
        path = self.state.path
        if path == "hard":
            return self._hard(x)
        if path == "soft":
            return self._soft(x)
        return self.module(x)

    def _soft_gate(self) -> Optional[Tensor]:
        """The soft path's gate of this layer's output, or None where the layer carries none."""
        return self.state.gates[self.spec.out_layout] if self.spec.gate else None


class GatedConv(_Wrapper):
    """A ``nn.ConvNd`` on both paths; grouped (and depthwise) convs keep whole groups."""

    def dual(self, x_soft: Tensor, x_hard: Tensor) -> tuple[Tensor, Tensor]:
        """``(soft output, hard output)``; one ``dual_conv`` launch for a shared input where dispatch picks
        Triton, else the two computations of :meth:`forward`."""
        conv = self.module
        if x_soft is x_hard and self._dual_kernel_fits() and \
                dispatch.choose(_DUAL_CONV_OP, x_soft.device, ("triton",)) == "triton":
            from .kernels import dual_conv as kernel  # imports triton: only once it was chosen

            return kernel.dual_conv(x_soft, conv.weight, conv.bias, self._soft_gate(), self._sel_out(), conv.stride,
                                    conv.padding, conv.dilation)
        return self._soft(x_soft), self._hard(x_hard)

    def _dual_kernel_fits(self) -> bool:
        """Whether ``dual_conv`` computes this layer: a 2-D convolution, one group, zero padding given as
        numbers, all input channels on the hard path (the input is shared)."""
        conv = self.module
        return (conv.weight.dim() == 4 and conv.groups == 1 and not self.spec.depthwise
                and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
                and self.state.selections[self.spec.in_layout] is None)

    def _sel_out(self) -> Selection:
        return self.state.selections[self.spec.out_layout]

    def _soft(self, x: Tensor) -> Tensor:
        y = self.module(x)
        if self.spec.gate:
            y = y * self.state.gates[self.spec.out_layout].view(_gate_shape(y.dim(), 1))
        return y

    def _hard(self, x: Tensor) -> Tensor:
        conv = self.module
        sel_out = self._sel_out()
        weight = select(conv.weight, 0, sel_out)
        groups = conv.groups
        if self.spec.depthwise:  # whole groups kept: as many groups as kept units of C_out / groups channels
            groups = count_selected(sel_out, conv.out_channels) // (conv.out_channels // conv.groups)
        elif groups == 1:
            weight = select(weight, 1, self.state.selections[self.spec.in_layout])
        return _conv(conv, x, weight, select(conv.bias, 0, sel_out), groups)


def _conv(conv: nn.Module, x: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int) -> Tensor:
    fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
    padding = conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    return fn(x, weight, bias, conv.stride, padding, conv.dilation, groups)


class GatedLinear(_Wrapper):
    """A ``nn.Linear`` on both paths (channels on the last dimension)."""

    def dual(self, x_soft: Tensor, x_hard: Tensor) -> tuple[Tensor, Tensor]:
        """``(soft output, hard output)``; one ``dual_linear`` launch where dispatch picks Triton, else the two
        computations of :meth:`forward`."""
        if dispatch.choose(_DUAL_LINEAR_OP, x_soft.device, ("triton",)) == "triton":
            from .kernels import dual_linear as kernel  # imports triton: only once it was chosen

            lin, sel = self.module, self.state.selections
            return kernel.dual_linear(x_soft, x_hard, lin.weight, lin.bias, self._soft_gate(),
                                      sel[self.spec.in_layout], sel[self.spec.out_layout])
        return self._soft(x_soft), self._hard(x_hard)

    def _soft(self, x: Tensor) -> Tensor:
        y = self.module(x)
        if self.spec.gate:
            y = y * self.state.gates[self.spec.out_layout]
        return y

    def _hard(self, x: Tensor) -> Tensor:
        lin = self.module
        sel_out = self.state.selections[self.spec.out_layout]
        weight = select(select(lin.weight, 0, sel_out), 1, self.state.selections[self.spec.in_layout])
        return F.linear(x, weight, select(lin.bias, 0, sel_out))


class GatedNorm(_Wrapper):
    """A BatchNorm or (channel-wise) LayerNorm on both paths, with hard-path running statistics."""

    def __init__(self, module: nn.Module, spec: LayerSpec, state: PathState) -> None:
        super().__init__(module, spec, state)
        self.is_layer_norm = isinstance(module, nn.LayerNorm)
        self.channel_axis = -1 if self.is_layer_norm else 1
        tracked = getattr(module, "running_mean", None) is not None
        if tracked:
            self.register_buffer("hard_running_mean", module.running_mean.detach().clone())
            self.register_buffer("hard_running_var", module.running_var.detach().clone())
            self.register_buffer("hard_num_batches_tracked", module.num_batches_tracked.detach().clone())
        else:
            self.hard_running_mean = self.hard_running_var = self.hard_num_batches_tracked = None

    def forward(self, x: Tensor) -> Tensor:
        path = self.state.path
        if path == "dense" or (path == "soft" and not self.spec.gate):
            return self.module(x)
        if path == "soft":
            return self._soft(x, self.state.gates[self.spec.out_layout])
        return self._hard(x, self.state.selections[self.spec.out_layout])

    def dual(self, x_soft: Tensor, x_hard: Tensor) -> tuple[Tensor, Tensor]:
        """``(soft output, hard output)``: the soft and then the hard computation of :meth:`forward` (each
        path updates its own running statistics)."""
        if self.spec.gate:
            y_soft = self._soft(x_soft, self.state.gates[self.spec.out_layout])
        else:
            y_soft = self.module(x_soft)
        return y_soft, self._hard(x_hard, self.state.selections[self.spec.out_layout])

    def _soft(self, x: Tensor, gate: Tensor) -> Tensor:
        m = self.module
        if not self.is_layer_norm:
            return _batch_norm(m, x, m.running_mean, m.running_var, m.num_batches_tracked, m.weight, m.bias, gate)
        if m.weight is None:  # no affine parameters to fold the gate into
            y = self.module(x)
            return y * gate.view(_gate_shape(y.dim(), self.channel_axis))
        return F.layer_norm(x, m.normalized_shape, m.weight * gate, m.bias * gate, m.eps)

    def _hard(self, x: Tensor, sel: Selection) -> Tensor:
        m = self.module
        weight, bias = select(m.weight, 0, sel), select(m.bias, 0, sel)
        if self.is_layer_norm:
            return F.layer_norm(x, (x.shape[-1],), weight, bias, m.eps)
        if self.hard_running_mean is None:
            return _batch_norm(m, x, None, None, None, weight, bias)
        mean, var = select(self.hard_running_mean, 0, sel), select(self.hard_running_var, 0, sel)
        y = _batch_norm(m, x, mean, var, self.hard_num_batches_tracked, weight, bias)
        if isinstance(sel, Tensor) and m.training:
            # a gathered copy was updated: write the kept channels' statistics back
            with torch.no_grad():
                self.hard_running_mean.index_copy_(0, sel, mean)
                self.hard_running_var.index_copy_(0, sel, var)
        return y


_BN_OP = "bn_gate_act"
_DUAL_LINEAR_OP = "dual_linear"
_DUAL_CONV_OP = "dual_conv"


def _bn_impl(x: Tensor) -> str:
    """``"triton"`` where dispatch picks the fused kernel for a BatchNorm on ``x``'s device, else
    ``"reference"``; raises ImplementationUnavailable where Triton is forced but cannot run there. ``auto``
    considers the kernel only for activations with channels innermost in memory (channels_last, 2-D): the
    layout GPU training uses and the one its measured wins are for."""
    requested = dispatch.requested_impl(_BN_OP)
    if requested in ("reference", "cpp") or (requested == "auto" and not x.movedim(1, -1).is_contiguous()):
        return "reference"
    return dispatch.choose(_BN_OP, x.device, ("triton",))


def _batch_norm(m: nn.Module, x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                num_batches_tracked: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                gate: Optional[Tensor] = None) -> Tensor:
    """``nn.BatchNorm``'s forward with explicit statistics and affine parameters (same momentum rules), its
    output scaled per channel by ``gate`` when given: ``BN(x) * gate``."""
    momentum = 0.0 if m.momentum is None else m.momentum
    if m.training and m.track_running_stats and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        momentum = 1.0 / float(num_batches_tracked) if m.momentum is None else m.momentum
    use_batch_stats = m.training or running_mean is None
    if not m.training or m.track_running_stats:
        stats = (running_mean, running_var)
    else:
        stats = (None, None)
    if _bn_impl(x) == "triton":
        from .kernels import bn_gate_act  # imports triton: only once it was chosen

        return bn_gate_act.bn_gate_act(x, weight, bias, *stats, gate=gate, residual=None, activation="identity",
                                       momentum=float(momentum), eps=m.eps, training=use_batch_stats)
    if gate is None:
        return F.batch_norm(x, *stats, weight, bias, use_batch_stats, momentum, m.eps)
    if weight is None:  # no affine parameters to fold the gate into
        y = F.batch_norm(x, *stats, None, None, use_batch_stats, momentum, m.eps)
        return y * gate.view(_gate_shape(y.dim(), 1))
    # BN(x) * w = xhat * (gamma w) + beta w: the gate folded into the affine parameters, exact
    return F.batch_norm(x, *stats, weight * gate, bias * gate, use_batch_stats, momentum, m.eps)


def wrap_layer(module: nn.Module, spec: LayerSpec, state: PathState) -> nn.Module:
    """The wrapper for one analysed layer call."""
    if spec.kind == "conv":
        return GatedConv(module, spec, state)
    if spec.kind == "linear":
        return GatedLinear(module, spec, state)
    return GatedNorm(module, spec, state)


class _PathOp(nn.Module):
    """A tensor operation whose hard-path form depends on the kept channels (not a layer with weights).
    ``forward`` follows ``state.path``; ``apply(path, ...)`` runs a given path (the dual traversal)."""

    def __init__(self, state: PathState) -> None:
        super().__init__()
        object.__setattr__(self, "state", state)

    def forward(self, *args: Any) -> Tensor:
        return self.apply(self.state.path, *args)

    def kept_positions(self, layout: Layout) -> int:
        """Positions of ``layout`` on the hard path."""
        return count_selected(self.state.selections[layout], layout_width(layout))


class ChannelReshape(_PathOp):
    """``x.reshape(*sizes)`` (or ``view``) where some output sizes count channels (attention heads, a flattened
    embedding): on the hard path those sizes are the kept counts, whatever the traced code passes (a head count
    fixed at construction, say). ``dims[i]`` is the layout counted by output dimension ``i``, its fixed size
    (an int), or None (as passed). ``packed``: the sizes come as one sequence computed at run time."""

    def __init__(self, method: str, dims: tuple, state: PathState, packed: bool = False) -> None:
        super().__init__(state)
        self.method = method
        self.dims = dims
        self.packed = packed

    def extra_repr(self) -> str:
        return f"{self.method}, channel dims={[i for i, d in enumerate(self.dims) if d is not None]}"

    def apply(self, path: str, x: Tensor, *sizes: Any) -> Tensor:
        if self.packed and isinstance(sizes[0], (tuple, list)):
            sizes = tuple(sizes[0])
        if path == "hard":
            sizes = tuple(s if d is None else d if isinstance(d, int) else self.kept_positions(d)
                          for s, d in zip(sizes, self.dims))
        return getattr(x, self.method)(*sizes)


class ChannelSlice(_PathOp):
    """A constant tensor (parameter, buffer, or made from them) meeting channels: on the hard path, only the kept
    channels of ``layout`` along ``dim``; on the soft path, scaled by their keep-probabilities where ``gate``
    (it is added to channels that carry them); unchanged on the dense path."""

    def __init__(self, dim: int, layout: Layout, gate: bool, state: PathState) -> None:
        super().__init__(state)
        self.dim = dim
        self.layout = layout
        self.gate = gate

    def extra_repr(self) -> str:
        return f"dim={self.dim}, gate={self.gate}"

    def apply(self, path: str, t: Tensor) -> Tensor:
        if path == "hard":
            return select(t, self.dim, self.state.selections[self.layout])
        if path == "soft" and self.gate:
            return t * self.state.gates[self.layout].view(_gate_shape(t.dim(), self.dim))
        return t
