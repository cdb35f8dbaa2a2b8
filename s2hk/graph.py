"""Channel-group analysis of any ``nn.Module``, from its torch.fx graph.

A *channel space* is created by every layer that makes new channels (a conv's or linear's outputs, the model
input). Operations that couple channels merge spaces: a residual add, an SE-style channel multiply, a
depthwise conv (output channel c is input channel c), a norm layer (tied to its producer). Each merged class
is a :class:`ChannelGroup`: its channels must be kept or removed together.

Tensors carry a :class:`Layout`: the sequence of channel-space segments along their channel axis (a concat
produces several segments; a flatten of ``(N, C, H, W)`` into a linear gives one segment whose channels each
occupy ``H * W`` consecutive features).

A group is *frozen* (never pruned) when its channels reach the model output, come from the model input, meet
a layer handled only at full width (grouped conv, GroupNorm, a parameter added along channels...), or touch a
layer the user asked to ignore. Operations the analysis does not understand are errors naming the layer,
unless listed in ``ignore`` (then they run dense, and every group they touch is frozen).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["Segment", "Layout", "ChannelGroup", "LayerSpec", "GraphAnalysis", "UnsupportedModelError",
           "analyze", "trace"]


class UnsupportedModelError(ValueError):
    """The model has operations whose channels s2hk cannot follow; the message lists each, by layer name."""


@dataclass(frozen=True)
class Segment:
    """``size`` channels of group ``group`` laid out along a tensor's channel axis, each ``repeat`` wide."""

    group: int
    size: int
    repeat: int = 1


Layout = tuple  # tuple[Segment, ...]


def layout_width(layout: Layout) -> int:
    """Number of positions the layout spans along the channel axis."""
    return sum(s.size * s.repeat for s in layout)


@dataclass
class ChannelGroup:
    """Channels that are pruned together.

    Attributes:
        index: position in :attr:`GraphAnalysis.groups`.
        name: the first layer (in execution order) that produces these channels.
        channels: number of channels ``C``.
        producers: layers whose output filters are these channels (conv/linear, depthwise convs included).
        members: norm layers and depthwise convs tied to these channels.
        consumers: layers reading these channels as input.
        frozen_reasons: why the group is kept at full width (empty for prunable groups).
    """

    index: int
    name: str
    channels: int
    producers: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    frozen_reasons: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.frozen_reasons


@dataclass
class LayerSpec:
    """How one call of a conv / linear / norm layer is sliced on the hard path and gated on the soft path.

    ``kind`` is "conv", "linear" or "norm"; ``in_layout``/``out_layout`` give the channel segments of its
    input and output; ``depthwise`` convs have one input channel per output channel; ``gate`` says whether
    the soft keep-probabilities multiply this layer's output (after a norm, else after the producer).
    """

    node: str
    target: str
    kind: str
    in_layout: Layout
    out_layout: Layout
    depthwise: bool = False
    gate: bool = False


@dataclass
class _TensorInfo:
    layout: Layout
    axis: int            # channel dimension (non-negative)
    ndim: int
    shape: tuple


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []

    def add(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm)
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, F.hardsigmoid, torch.sigmoid,
    F.sigmoid, torch.tanh, F.tanh, F.mish, F.elu, F.selu, F.softplus, F.hardtanh, F.dropout, F.dropout2d,
    torch.clamp, torch.clip, operator.neg, torch.neg, torch.abs, operator.abs, torch.exp,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.interpolate,
}
_ELEMENTWISE_METHODS = {
    "relu", "sigmoid", "tanh", "clamp", "clip", "contiguous", "clone", "float", "half", "bfloat16", "to",
    "type_as", "neg", "abs", "exp", "detach",
}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"flatten", "view", "reshape"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax}
_REDUCE_METHODS = {"mean", "sum", "amax"}
_ADD_LIKE = {operator.add, operator.sub, torch.add, torch.sub, operator.iadd, operator.isub, "add", "sub",
             "add_", "sub_"}
_MUL_LIKE = {operator.mul, torch.mul, operator.imul, operator.truediv, torch.div, "mul", "mul_", "div"}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_SHAPE_QUERIES = {"size", "dim", "numel"}


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with an error that says what to do when the model cannot be traced."""
    try:
        return fx.symbolic_trace(model)
    except Exception as err:  # fx raises many types; all mean the same thing to the user
        raise UnsupportedModelError(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(err).__name__}: {err}). s2hk follows "
            "channels through the traced graph: keep Python control flow in forward() independent of tensor "
            "values, or wrap the untraceable part in a module and pass its name in ignore=[...]") from err


@dataclass
class GraphAnalysis:
    """Result of :func:`analyze`: the traced graph, the channel groups and how each layer is handled."""

    graph_module: fx.GraphModule
    groups: list[ChannelGroup]
    layers: dict[str, LayerSpec]          # by node name
    node_shapes: dict[str, tuple]         # output shape of every tensor node, from example_inputs
    opaque_nodes: list[str]               # nodes run at full width (ignored or frozen-only)

    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def report(self) -> str:
        """A human-readable table of the groups: name, channels, layers, and why a group is frozen."""
        lines = [f"{'group':<40} {'C':>6}  {'status':<9} layers"]
        for g in self.groups:
            status = "prunable" if g.prunable else "frozen"
            layers = ", ".join(g.producers[:3]) + (" ..." if len(g.producers) > 3 else "")
            lines.append(f"{g.name:<40} {g.channels:>6}  {status:<9} {layers}")
            for reason in dict.fromkeys(g.frozen_reasons):
                lines.append(f"{'':<40} {'':>6}  {'':<9} - {reason}")
        return "\n".join(lines)


def analyze(model: nn.Module, example_inputs: Any, ignore: Iterable[str] = ()) -> GraphAnalysis:
    """Trace ``model`` and find its channel groups.

    Args:
        model: any module built from standard layers (conv, linear, norms, activations, pooling, add/mul/cat).
        example_inputs: a tensor or tuple of tensors accepted by ``model.forward`` (shapes set spatial sizes).
        ignore: module names (or fx node names) to run dense; channels they touch are frozen.
    Raises:
        UnsupportedModelError: listing every layer whose channels cannot be followed, with the reason.
    """
    gm = trace(model)
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    was_training = {m: m.training for m in gm.modules()}
    try:
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    finally:
        for m, flag in was_training.items():
            m.train(flag)
    return _Analyzer(gm, tuple(ignore)).run()


class _Analyzer:
    def __init__(self, gm: fx.GraphModule, ignore: Sequence[str]) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.ignore = ignore
        self.uf = _UnionFind()
        self.frozen: dict[int, list[str]] = {}     # space -> reasons
        self.producer_of: dict[int, str] = {}      # space -> producing layer (first)
        self.info: dict[str, _TensorInfo] = {}
        self.layers: dict[str, LayerSpec] = {}
        self.errors: list[str] = []
        self.opaque: list[str] = []
        self.opaque_set: set[str] = set()
        self.ungated: set[str] = set()              # producers feeding a channel multiply as its "attention"
        self.shapes: dict[str, tuple] = {}

    # ----------------------------------------------------------------- helpers
    def new_space(self, size: int, producer: str | None = None, frozen: str | None = None) -> int:
        s = self.uf.add(size)
        if producer is not None:
            self.producer_of[s] = producer
        if frozen is not None:
            self.frozen.setdefault(s, []).append(frozen)
        return s

    def freeze(self, layout: Layout, reason: str) -> None:
        for seg in layout:
            self.frozen.setdefault(seg.group, []).append(reason)

    def unify(self, a: Layout, b: Layout, where: str) -> bool:
        """Merge two layouts segment by segment; if their segment boundaries differ, freeze both."""
        if len(a) == len(b) and all(x.size == y.size and x.repeat == y.repeat for x, y in zip(a, b)):
            for x, y in zip(a, b):
                self.uf.union(x.group, y.group)
            return True
        reason = f"{where}: channel segments of its operands do not align"
        self.freeze(a, reason)
        self.freeze(b, reason)
        return False

    def scope(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return str(node.target)
        stack = node.meta.get("nn_module_stack") or {}
        inner = list(stack.values())[-1][0] if stack else ""
        return f"{inner} ({node.name})" if inner else node.name

    def ignored(self, node: fx.Node) -> bool:
        names = {node.name}
        if node.op == "call_module":
            names.add(str(node.target))
        for stack_entry in (node.meta.get("nn_module_stack") or {}).values():
            names.add(stack_entry[0])
        for pattern in self.ignore:
            for name in names:
                if name == pattern or name.startswith(pattern + "."):
                    return True
        return False

    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a.name in self.info]

    def make_info(self, node: fx.Node, layout: Layout, axis: int) -> None:
        shape = self.shapes[node.name]
        self.info[node.name] = _TensorInfo(layout, axis % len(shape), len(shape), shape)

    # ----------------------------------------------------------------- main loop
    def run(self) -> GraphAnalysis:
        for node in self.gm.graph.nodes:
            meta = node.meta.get("tensor_meta")
            if meta is not None and hasattr(meta, "shape"):
                self.shapes[node.name] = tuple(meta.shape)
        for node in self.gm.graph.nodes:
            try:
                self.visit(node)
            except _Unsupported as err:
                self.errors.append(f"{self.scope(node)}: {err}")
        if self.errors:
            listing = "\n  - ".join(self.errors)
            raise UnsupportedModelError(
                "s2hk cannot follow the channels of these layers:\n  - " + listing +
                "\nPass their names in ignore=[...] to keep them (and the channels they touch) dense.")
        return self.finish()

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            shape = self.shapes.get(node.name)
            if shape is not None and len(shape) >= 2:
                axis = 1 if len(shape) >= 3 else len(shape) - 1
                space = self.new_space(shape[axis], frozen=f"model input '{node.name}'")
                self.make_info(node, (Segment(space, shape[axis]),), axis)
            return
        if node.op == "output":
            for arg in self.tensor_args(node):
                self.freeze(self.info[arg.name].layout, "reaches the model output")
            return
        if node.op == "get_attr":
            return
        if node.name not in self.shapes and not self.tensor_args(node):
            return  # shape arithmetic, constants
        if self.ignored(node):
            self.opaque_node(node, "ignored by the user")
            return
        if node.op == "call_function" and node.target is operator.getitem and \
                any(a.name in self.opaque_set for a in node.all_input_nodes):
            self.opaque_node(node, "part of an ignored operation's output")
            return
        if node.op == "call_module":
            self.visit_module(node, self.modules[str(node.target)])
        else:
            self.visit_function(node)

    def opaque_node(self, node: fx.Node, reason: str) -> None:
        where = f"{self.scope(node)} ({reason})"
        for arg in self.tensor_args(node):
            self.freeze(self.info[arg.name].layout, where)
        shape = self.shapes.get(node.name)
        if shape is not None and len(shape) >= 2:
            axis = 1 if len(shape) >= 3 else len(shape) - 1
            space = self.new_space(shape[axis], frozen=where)
            self.make_info(node, (Segment(space, shape[axis]),), axis)
        self.opaque.append(node.name)
        self.opaque_set.add(node.name)

    def single_input(self, node: fx.Node) -> _TensorInfo:
        args = self.tensor_args(node)
        if len(args) != 1:
            raise _Unsupported(f"expected one tensor input with known channels, found {len(args)}")
        return self.info[args[0].name]

    # ----------------------------------------------------------------- modules
    def visit_module(self, node: fx.Node, module: nn.Module) -> None:
        name = str(node.target)
        if isinstance(module, _CONV):
            self.visit_conv(node, module)
        elif isinstance(module, nn.Linear):
            inp = self.single_input(node)
            if inp.axis != inp.ndim - 1:
                raise _Unsupported("nn.Linear applied along a dimension that is not the channel dimension")
            self.check_width(inp, module.in_features, name)
            space = self.new_space(module.out_features, producer=name)
            self.layers[node.name] = LayerSpec(node.name, name, "linear", inp.layout,
                                               (Segment(space, module.out_features),))
            self.make_info(node, self.layers[node.name].out_layout, -1)
        elif isinstance(module, _NORM):
            inp = self.single_input(node)
            if isinstance(module, nn.LayerNorm) and (len(module.normalized_shape) != 1 or inp.axis != inp.ndim - 1):
                self.opaque_node(node, "LayerNorm over more than the channel dimension runs dense")
                return
            if any(seg.repeat != 1 for seg in inp.layout):
                raise _Unsupported("norm layer over flattened channels")
            self.layers[node.name] = LayerSpec(node.name, name, "norm", inp.layout, inp.layout)
            self.make_info(node, inp.layout, inp.axis)
        elif isinstance(module, (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)):
            self.opaque_node(node, f"{type(module).__name__} runs at full width")
        elif isinstance(module, nn.PReLU) and module.num_parameters > 1:
            self.opaque_node(node, "PReLU with per-channel slopes runs at full width")
        elif isinstance(module, _ELEMENTWISE_MODULES + _POOL_MODULES + (nn.PReLU,)):
            inp = self.single_input(node)
            self.make_info(node, inp.layout, inp.axis)
        elif isinstance(module, nn.Flatten):
            self.visit_reshape(node)
        else:
            raise _Unsupported(f"{type(module).__name__} is not a layer s2hk knows how to prune through")

    def check_width(self, inp: _TensorInfo, expected: int, name: str) -> None:
        if layout_width(inp.layout) != expected:
            raise _Unsupported(f"{name} expects {expected} input channels but the traced input has "
                               f"{layout_width(inp.layout)}")

    def visit_conv(self, node: fx.Node, conv: nn.Conv2d) -> None:
        name = str(node.target)
        inp = self.single_input(node)
        if inp.axis != 1:
            raise _Unsupported("convolution over a tensor whose channels are not in dimension 1")
        self.check_width(inp, conv.in_channels, name)
        if any(seg.repeat != 1 for seg in inp.layout):
            raise _Unsupported("convolution over flattened channels")
        if conv.groups == 1:
            space = self.new_space(conv.out_channels, producer=name)
            spec = LayerSpec(node.name, name, "conv", inp.layout, (Segment(space, conv.out_channels),))
        elif conv.groups == conv.in_channels == conv.out_channels:
            spec = LayerSpec(node.name, name, "conv", inp.layout, inp.layout, depthwise=True)
        else:
            reason = f"grouped convolution {name} (groups={conv.groups}) runs at full width"
            self.freeze(inp.layout, reason)
            space = self.new_space(conv.out_channels, producer=name, frozen=reason)
            spec = LayerSpec(node.name, name, "conv", inp.layout, (Segment(space, conv.out_channels),))
        self.layers[node.name] = spec
        self.make_info(node, spec.out_layout, 1)

    # ----------------------------------------------------------------- functions and methods
    def visit_function(self, node: fx.Node) -> None:
        target = node.target
        is_method = node.op == "call_method"
        if is_method and target in _SHAPE_QUERIES:
            return
        if target in _ELEMENTWISE_FUNCTIONS or (is_method and target in _ELEMENTWISE_METHODS):
            self.passthrough(node)
        elif target in _RESHAPE_FUNCTIONS or (is_method and target in _RESHAPE_METHODS):
            self.visit_reshape(node)
        elif target in _REDUCE_FUNCTIONS or (is_method and target in _REDUCE_METHODS):
            self.visit_reduce(node)
        elif target in _ADD_LIKE:
            self.visit_binary(node, multiply=False)
        elif target in _MUL_LIKE:
            self.visit_binary(node, multiply=True)
        elif target in _CAT:
            self.visit_cat(node)
        else:
            name = getattr(target, "__name__", str(target))
            raise _Unsupported(f"operation '{name}' is not one s2hk knows how to prune through")

    def passthrough(self, node: fx.Node) -> None:
        inp = self.tensor_args(node)
        if not inp:
            return
        info = self.info[inp[0].name]
        shape = self.shapes.get(node.name)
        if shape is None:
            return
        if len(shape) != info.ndim or shape[info.axis] != info.shape[info.axis]:
            raise _Unsupported("changes the channel dimension")
        self.make_info(node, info.layout, info.axis)

    def visit_reshape(self, node: fx.Node) -> None:
        info = self.single_input(node)
        shape = self.shapes[node.name]
        if shape == info.shape:
            self.make_info(node, info.layout, info.axis)
            return
        # the one reshape that keeps channels intact: (N, C, *rest) -> (N, C * prod(rest))
        rest = 1
        for s in info.shape[info.axis + 1:]:
            rest *= s
        if (info.axis == 1 and len(shape) == 2 and shape[0] == info.shape[0]
                and shape[1] == info.shape[1] * rest):
            layout = tuple(Segment(s.group, s.size, s.repeat * rest) for s in info.layout)
            self.make_info(node, layout, 1)
            return
        raise _Unsupported(f"reshape {tuple(info.shape)} -> {tuple(shape)} changes the channel dimension")

    def visit_reduce(self, node: fx.Node) -> None:
        info = self.single_input(node)
        shape = self.shapes[node.name]
        if len(shape) >= 2 and shape[0] == info.shape[0] and shape[1] == info.shape[info.axis] and info.axis == 1:
            self.make_info(node, info.layout, 1)
            return
        raise _Unsupported("reduction over the channel dimension")

    def visit_binary(self, node: fx.Node, multiply: bool) -> None:
        operands = self.tensor_args(node)
        shape = self.shapes.get(node.name)
        if shape is None:
            return
        if not operands:
            if any(a.op not in ("get_attr",) for a in node.all_input_nodes):
                raise _Unsupported("its operands come from operations whose channels are unknown")
            return
        if len(operands) == 1:
            info = self.info[operands[0].name]
            self.check_constant_operand(node, info)
            self.make_info(node, info.layout, info.axis)
            return
        a, b = (self.info[o.name] for o in operands[:2])
        if a.axis != b.axis and a.shape[a.axis] != 1 and b.shape[b.axis] != 1:
            raise _Unsupported("operands have their channels in different dimensions")
        self.unify(a.layout, b.layout, self.scope(node))
        if multiply:
            # a channel multiply (SE / gating): the smaller, broadcast operand is the attention branch; its
            # producer must not be gated too, or the product would carry the keep-probability twice
            attention = 1 if _numel(b.shape) <= _numel(a.shape) else 0
            self.mark_attention(operands[attention], node)
        main = a if _numel(a.shape) >= _numel(b.shape) else b
        self.make_info(node, main.layout, main.axis)

    def check_constant_operand(self, node: fx.Node, info: _TensorInfo) -> None:
        """A parameter or buffer combined along the channel axis fixes the width of those channels."""
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                value = _fetch_attr(self.gm, str(arg.target))
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    axis_from_end = info.ndim - info.axis
                    if value.dim() >= axis_from_end and value.shape[value.dim() - axis_from_end] != 1:
                        self.freeze(info.layout, f"{self.scope(node)}: combined with '{arg.target}' along "
                                                 "the channel dimension")

    def mark_attention(self, start: fx.Node, where: fx.Node) -> None:
        node = start
        while True:
            if node.op == "call_module" and node.name in self.layers:
                spec = self.layers[node.name]
                if spec.kind in ("conv", "linear") and not spec.depthwise:
                    self.ungated.add(node.name)
                    return
                if spec.kind == "norm":
                    self.ungated.add(node.name)
                    return
            inputs = self.tensor_args(node)
            if len(inputs) != 1:
                raise _Unsupported(f"the channel-multiply operand of {where.name} does not come from one layer")
            node = inputs[0]

    def visit_cat(self, node: fx.Node) -> None:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        infos = [self.info[t.name] for t in tensors if isinstance(t, fx.Node) and t.name in self.info]
        if len(infos) != len(tensors):
            raise _Unsupported("concatenation of tensors whose channels are unknown")
        axis = dim % infos[0].ndim
        if axis == infos[0].axis:
            layout = tuple(seg for info in infos for seg in info.layout)
            self.make_info(node, layout, axis)
        else:
            for other in infos[1:]:
                self.unify(infos[0].layout, other.layout, self.scope(node))
            self.make_info(node, infos[0].layout, infos[0].axis)

    # ----------------------------------------------------------------- groups
    def finish(self) -> GraphAnalysis:
        roots: dict[int, int] = {}
        groups: list[ChannelGroup] = []
        canonical: dict[int, int] = {}
        for space in range(len(self.uf.parent)):
            root = self.uf.find(space)
            if root not in roots:
                roots[root] = len(groups)
                groups.append(ChannelGroup(len(groups), self.producer_of.get(root, f"group{len(groups)}"),
                                           self.uf.size[root]))
            canonical[space] = roots[root]
        for space, reasons in self.frozen.items():
            groups[canonical[space]].frozen_reasons.extend(reasons)
        for space, producer in self.producer_of.items():
            g = groups[canonical[space]]
            if producer not in g.producers:
                g.producers.append(producer)
        for g in groups:
            if g.producers:
                g.name = g.producers[0]

        def remap(layout: Layout) -> Layout:
            return tuple(Segment(canonical[s.group], s.size, s.repeat) for s in layout)

        users = {n.name: list(n.users) for n in self.gm.graph.nodes}
        for spec in self.layers.values():
            spec.in_layout, spec.out_layout = remap(spec.in_layout), remap(spec.out_layout)
            for seg in spec.out_layout:
                g = groups[seg.group]
                if spec.kind == "norm" or spec.depthwise:
                    if spec.target not in g.members:
                        g.members.append(spec.target)
            if spec.depthwise:
                g = groups[spec.out_layout[0].group]
                if spec.target not in g.producers:
                    g.producers.append(spec.target)
            if spec.kind != "norm" and not spec.depthwise:
                for seg in spec.in_layout:
                    if spec.target not in groups[seg.group].consumers:
                        groups[seg.group].consumers.append(spec.target)
            prunable_out = any(groups[s.group].prunable for s in spec.out_layout)
            followed_by_norm = bool(users[spec.node]) and all(
                u.name in self.layers and self.layers[u.name].kind == "norm" for u in users[spec.node])
            spec.gate = (prunable_out and spec.node not in self.ungated
                         and (spec.kind == "norm" or not followed_by_norm))
        for g in groups:  # a group with a single choice of width cannot be pruned
            if g.channels <= 1 and g.prunable:
                g.frozen_reasons.append("a single channel")
        return GraphAnalysis(self.gm, groups, self.layers, self.shapes, self.opaque)


class _Unsupported(Exception):
    pass


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
