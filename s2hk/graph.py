"""Channel-group analysis of any ``nn.Module``, from its torch.fx graph.

A *channel space* is created by every layer that makes new channels (a conv's or linear's outputs, the model
input). Operations that couple channels merge spaces: a residual add, an SE-style channel multiply, a
depthwise conv (output channel c is input channel c), a norm layer (tied to its producer). Each merged class
is a :class:`ChannelGroup`: its channels must be kept or removed together. A grouped convolution ties its
input's and output's conv groups: its channels are pruned by whole groups (units of ``C / groups``).

Tensors carry a :class:`Layout`: the sequence of channel-space segments along their channel axis (a concat
produces several segments; a flatten of ``(N, C, H, W)`` into a linear gives one segment whose channels each
occupy ``H * W`` consecutive features). The channel axis is followed through permutes, transposes, reshapes
that keep it whole, and indexing of other dimensions.

Attention: a reshape that splits the channel axis into ``(heads, head_dim)`` -- or ``(3, heads, head_dim)``
for a fused q/k/v projection -- *refines* the producer's channel space so that one channel is one head, a
segment with ``repeat = head_dim`` in the projection's output (and in the output projection's input, after the
heads are merged back); the three parts of a fused projection keep the same heads (the reshaped tensor is
rectangular). A matrix product or ``scaled_dot_product_attention`` batched over heads merges the heads of its
operands. Such reshapes are recorded (:class:`ReshapeSpec`): the hard path and the export give them the kept
head count. Tensors computed from parameters and buffers alone (a position embedding, Swin's relative
position bias) that meet channels are recorded too (:class:`ConstantSlice`): they are cut to the kept
channels. Matrix products over heads (:class:`MatmulSpec`) carry their MACs per head for the FLOPs.

A group is *frozen* (never pruned) when its channels reach the model output, come from the model input, meet
a layer handled only at full width (GroupNorm, nn.MultiheadAttention...), are normalised by a LayerNorm (an embedding
width; unless ``prune_embedding``), or touch a layer the user asked to ignore. Operations the analysis does not understand are errors naming the layer,
unless listed in ``ignore`` (then they run dense, and every group they touch is frozen).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["Segment", "Layout", "ChannelGroup", "LayerSpec", "ReshapeSpec", "ConstantSlice", "MatmulSpec",
           "GraphAnalysis", "UnsupportedModelError", "analyze", "trace"]


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
        from_input: the channels are the model input's (a stem reads them).
        to_output: the channels reach the model output (a classifier produces them).
    """

    index: int
    name: str
    channels: int
    producers: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    frozen_reasons: list[str] = field(default_factory=list)
    from_input: bool = False
    to_output: bool = False

    @property
    def prunable(self) -> bool:
        return not self.frozen_reasons


@dataclass
class LayerSpec:
    """How one call of a conv / linear / norm layer is sliced on the hard path and gated on the soft path.

    ``kind`` is "conv", "linear" or "norm"; ``in_layout``/``out_layout`` give the channel segments of its
    input and output; ``depthwise`` marks a grouped conv pruned by whole groups (kept groups of input and
    output channels are tied; a depthwise conv's groups are single channels); ``gate`` says whether
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
class ReshapeSpec:
    """A reshape / view whose output sizes depend on kept channels: on the hard path (and in the export) the
    size of output dimension ``i`` becomes the number of kept positions of ``dims[i]`` when it is a layout, the
    traced size when it is an int (a head's size, computed by the code from a width that may shrink), and
    stays as the code passes it when None."""

    node: str
    dims: tuple  # per output dimension: a Layout (its kept positions), an int (fixed size) or None (as traced)


@dataclass
class ConstantSlice:
    """A tensor that does not depend on the input (a parameter, buffer or something computed from them) meeting
    channels: on the hard path it is cut to the kept channels of ``layout`` along ``dim`` before ``node`` uses
    it; where it is *added* to channels (``gate``: an add, a concat, an attention mask), the soft path scales
    it by the keep-probabilities like the channels it joins, so a removed channel is zero on both paths.
    ``arg_path`` locates it in the call (:func:`node_argument`)."""

    node: str
    arg_path: tuple
    dim: int
    layout: Layout
    gate: bool = False


@dataclass
class MatmulSpec:
    """A matrix product whose batch dimension carries channels (attention heads): its MACs are
    ``macs_per_position`` times the kept positions of ``layout``."""

    node: str
    layout: Layout
    macs_per_position: int


@dataclass
class _TensorInfo:
    layout: Layout
    axis: int            # channel dimension (non-negative)
    ndim: int
    shape: tuple
    parts_axis: Optional[int] = None  # a dimension indexing equal parts of the channels (fused q / k / v)


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
_PERMUTE = {"permute", "transpose", "swapaxes", torch.permute, torch.transpose, torch.swapaxes}
_UNSQUEEZE = {"unsqueeze", torch.unsqueeze}
_SQUEEZE = {"squeeze", torch.squeeze}
_EXPAND = {"expand", "expand_as"}
_SOFTMAX = {"softmax", "log_softmax", torch.softmax, torch.log_softmax, F.softmax, F.log_softmax}
_ROLL = {"roll", torch.roll}
_FUNCTIONAL_NORMS = {F.layer_norm, F.group_norm, F.batch_norm, F.instance_norm, torch.layer_norm,
                     torch.group_norm}
_MATMUL = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"}
_UNBIND = {"unbind", torch.unbind}
_CHUNK = {"chunk", torch.chunk}


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether the qualified name ``name`` is one of ``patterns`` or lies inside one (``pattern.``...)."""
    return any(name == p or name.startswith(p + ".") for p in patterns)


def autograd_function_of(node: fx.Node) -> Optional[type]:
    """The custom ``torch.autograd.Function`` a node applies, or None (see :class:`_Tracer`)."""
    return getattr(node.target, "_s2hk_autograd_function", None) if node.op == "call_function" else None


def _apply_target(function: type) -> Any:
    """A plain function calling ``function.apply``: a graph node's target keeps the function's backward."""
    target = _APPLY_TARGETS.get(function)
    if target is None:
        def target(*args: Any, **kwargs: Any) -> Any:
            return function.apply(*args, **kwargs)

        target.__name__ = target.__qualname__ = f"{function.__name__}_apply"
        target._s2hk_autograd_function = function
        _APPLY_TARGETS[function] = target
    return target


_APPLY_TARGETS: dict[type, Any] = {}


def _has_proxy(values: Any) -> bool:
    found = []
    fx.node.map_aggregate(values, lambda v: found.append(isinstance(v, fx.Proxy)))
    return any(found)


class _Tracer(fx.Tracer):
    """``torch.fx`` tracing as s2hk needs it.

    - Modules named in ``leaves`` (the user's ``ignore``) are kept as single calls, so code fx cannot trace
      can be ignored, as the error advises.
    - A custom ``torch.autograd.Function`` becomes one node calling its ``apply``: fx would otherwise inline
      its forward and silently drop its backward (a gradient-reversal layer would train the wrong way).
    - The module being traced is remembered, so a failure names the layer at fault.
    """

    def __init__(self, leaves: Sequence[str]) -> None:
        super().__init__()
        self.leaves = tuple(leaves)
        self.entered: list[str] = []  # modules whose forward is being traced, outermost first

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _matches(qualname, self.leaves) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        self.entered.append(self.path_of_module(m))
        result = super().call_module(m, forward, args, kwargs)
        self.entered.pop()  # left in place when tracing fails: the innermost entry is the culprit
        return result

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        base = torch.autograd.Function
        original = base.__dict__["apply"]
        tracer = self

        def apply(function: type, *args: Any, **kwargs: Any) -> Any:
            if _has_proxy((args, kwargs)):
                return tracer.create_proxy("call_function", _apply_target(function), args, kwargs)
            return original.__func__(function, *args, **kwargs)

        base.apply = classmethod(apply)
        try:
            return super().trace(root, concrete_args)
        finally:
            base.apply = original


def trace(model: nn.Module, leaves: Iterable[str] = ()) -> fx.GraphModule:
    """Trace ``model`` with torch.fx in eval mode; ``leaves`` are module names kept as single calls.

    Tracing runs Python control flow once: a model in train mode would have its train-only branches
    (``if self.training:``, stochastic depth, functional dropout) frozen into the graph as taken, so the
    hard path and the export would drop residual branches at random. The trace therefore sees the model as
    in eval mode (its modules' flags are restored afterwards); dropout and norm *modules* stay leaves and keep
    following ``.train()`` / ``.eval()`` at run time.

    Raises:
        UnsupportedModelError: when tracing fails, naming the innermost module being traced and saying
            how to make it a leaf.
    """
    tracer = _Tracer(tuple(leaves))
    was_training = {m: m.training for m in model.modules()}
    attributes = set(vars(model))
    model.eval()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises many types; all mean the same thing to the user
        inner = tracer.entered[-1] if tracer.entered else ""
        where = f" in module '{inner}'" if inner else ""
        advice = (f"pass ignore=['{inner}'] to run that module as one dense call (its channels are kept)"
                  if inner else "keep Python control flow in forward() independent of tensor values, or move "
                  "the untraceable part into a submodule and pass its name in ignore=[...]")
        raise UnsupportedModelError(
            f"{type(model).__name__} cannot be traced by torch.fx{where} ({type(err).__name__}: {err}). s2hk "
            f"follows channels through the traced graph: {advice}") from err
    finally:
        for m, flag in was_training.items():
            m.training = flag
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    # fx stows tensor constants of forward() as _tensor_constant<i> attributes of the model itself; the graph
    # module has its copies, and leaving them would renumber the next trace's constants (_tensor_constant1 ...)
    for name in set(vars(model)) - attributes:
        if name.startswith("_tensor_constant"):
            delattr(model, name)
    return gm


@dataclass
class GraphAnalysis:
    """Result of :func:`analyze`: the traced graph, the channel groups and how each layer is handled."""

    graph_module: fx.GraphModule
    groups: list[ChannelGroup]
    layers: dict[str, LayerSpec]          # by node name
    node_shapes: dict[str, tuple]         # output shape of every tensor node, from example_inputs
    opaque_nodes: list[str]               # nodes run at full width (ignored or frozen-only)
    reshapes: dict[str, ReshapeSpec] = field(default_factory=dict)          # by node name
    constant_slices: list[ConstantSlice] = field(default_factory=list)
    matmuls: dict[str, MatmulSpec] = field(default_factory=dict)            # by node name
    ignore: tuple = ()                    # the user's ignore list: ignored modules are leaves of the trace

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


def analyze(model: nn.Module, example_inputs: Any, ignore: Iterable[str] = (),
            prune_embedding: bool = False) -> GraphAnalysis:
    """Trace ``model`` and find its channel groups.

    Args:
        model: any module built from standard layers (conv, linear, norms, activations, pooling, add/mul/cat,
            and the tensor ops of attention: reshape/view, permute/transpose, unbind, matmul, softmax,
            scaled_dot_product_attention).
        example_inputs: a tensor or tuple of tensors accepted by ``model.forward`` (shapes set spatial sizes).
        ignore: module names (or fx node names) to run dense; channels they touch are frozen.
        prune_embedding: also prune channels normalised by a LayerNorm (a transformer's embedding width, shared
            by its residual stream and every LayerNorm on it). Off by default: a LayerNorm normalises over all
            channels on the soft path but over the kept ones on the hard path, so the two paths differ more.
    Raises:
        UnsupportedModelError: listing every layer whose channels cannot be followed, with the reason.
    """
    ignore = tuple(ignore)
    gm = trace(model, ignore)
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    was_training = {m: m.training for m in gm.modules()}
    try:
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    finally:
        for m, flag in was_training.items():
            m.train(flag)
    return _Analyzer(gm, tuple(ignore), prune_embedding).run()


class _Analyzer:
    def __init__(self, gm: fx.GraphModule, ignore: Sequence[str], prune_embedding: bool = False) -> None:
        self.gm = gm
        self.prune_embedding = prune_embedding
        self.refined: dict[int, tuple] = {}         # space -> the Segments of new spaces that replaced it
        self.tuple_info: dict[str, list] = {}       # tuple-valued node (unbind, chunk) -> _TensorInfo per element
        self.tuple_shapes: dict[str, list] = {}
        self.reshapes: dict[str, ReshapeSpec] = {}
        self.constant_slices: list[ConstantSlice] = []
        self.matmuls: dict[str, MatmulSpec] = {}
        self.layer_norm_spaces: dict[int, str] = {}  # space -> a LayerNorm normalising over it
        self.size_values: set[str] = set()           # traced sizes and arithmetic on them (not tensors)
        self.size_derived: set[str] = set()          # tensors created from traced sizes, and what follows
        self.modules = dict(gm.named_modules())
        self.ignore = ignore
        self.uf = _UnionFind()
        self.frozen: dict[int, list[str]] = {}     # space -> reasons
        self.boundary: dict[int, set[str]] = {}    # space -> {"input", "output"}: it is the model's input / output
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

    def resolve(self, layout: Layout) -> Layout:
        """``layout`` with every refined space replaced by the spaces that replaced it."""
        out: list[Segment] = []
        for seg in layout:
            subs = self.refined.get(seg.group)
            if subs is None:
                out.append(seg)
            else:
                out.extend(self.resolve(tuple(Segment(s.group, s.size, s.repeat * seg.repeat) for s in subs)))
        return tuple(out)

    def layout(self, info: _TensorInfo) -> Layout:
        info.layout = self.resolve(info.layout)
        return info.layout

    def refine(self, space: int, pieces: Sequence[tuple[int, int]]) -> None:
        """Re-express ``space`` -- and every space merged with it, in parallel -- as consecutive new spaces:
        piece ``i`` has ``n_i`` units, each ``m_i`` of the old units (splitting a linear's outputs into q / k / v,
        or its channels into whole attention heads)."""
        root = self.uf.find(space)
        members = [s for s in range(len(self.uf.parent)) if s not in self.refined and self.uf.find(s) == root]
        first: Optional[tuple] = None
        for s in members:
            subs = tuple(Segment(self.new_space(n, producer=self.producer_of.get(s)), n, m) for n, m in pieces)
            for sub in subs:
                if s in self.frozen:
                    self.frozen[sub.group] = list(self.frozen[s])
                if s in self.layer_norm_spaces:
                    self.layer_norm_spaces[sub.group] = self.layer_norm_spaces[s]
            self.refined[s] = subs
            if first is None:
                first = subs
            else:
                for a, b in zip(first, subs):
                    self.uf.union(a.group, b.group)

    def to_units(self, layout: Layout, unit: int) -> Layout:
        """``layout`` re-expressed along a new axis whose every index spans ``unit`` positions of the old one
        (a split of ``(.., C)`` into ``(.., C / unit, unit)``); spaces are coarsened so a unit is one channel."""
        out: list[Segment] = []
        for original in layout:
            for seg in self.resolve((original,)):
                if seg.repeat % unit == 0:
                    out.append(Segment(seg.group, seg.size, seg.repeat // unit))
                    continue
                m = unit // seg.repeat
                if unit % seg.repeat or seg.size % m:
                    raise _Unsupported(f"reshape into units of {unit} splits a channel group of {seg.size} x "
                                       f"{seg.repeat} positions")
                self.refine(seg.group, [(seg.size // m, m)])
                (coarse,) = self.resolve((seg,))
                out.append(Segment(coarse.group, coarse.size, 1))
        return tuple(out)

    def split_parts(self, layout: Layout, parts: int) -> list[Layout]:
        """``layout`` cut into ``parts`` equal runs of positions, refining spaces that straddle a cut."""
        step = layout_width(layout) // parts
        queue = list(self.resolve(layout))
        out: list[list[Segment]] = [[]]
        filled = 0
        while queue:
            if filled == step:
                out.append([])
                filled = 0
            seg = queue.pop(0)
            room = step - filled
            if seg.size * seg.repeat <= room:
                out[-1].append(seg)
                filled += seg.size * seg.repeat
                continue
            if room % seg.repeat:
                raise _Unsupported("a split of the channel dimension cuts through a channel unit")
            first = room // seg.repeat
            self.refine(seg.group, [(first, 1), (seg.size - first, 1)])
            queue[:0] = list(self.resolve((seg,)))
        return [tuple(p) for p in out]

    def freeze(self, layout: Layout, reason: str) -> None:
        for seg in self.resolve(layout):
            self.frozen.setdefault(seg.group, []).append(reason)

    def unify(self, a: Layout, b: Layout, where: str) -> bool:
        """Merge two layouts segment by segment; if their segment boundaries differ, freeze both."""
        a, b = self.resolve(a), self.resolve(b)
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

    def tracked_args(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes
                if a.name in self.info or a.name in self.tuple_info or a.name in self.opaque_set]

    def make_info(self, node: fx.Node, layout: Layout, axis: int, parts_axis: Optional[int] = None) -> None:
        shape = self.shapes[node.name]
        self.info[node.name] = _TensorInfo(layout, axis % len(shape), len(shape), shape,
                                           None if parts_axis is None else parts_axis % len(shape))

    # ----------------------------------------------------------------- main loop
    def run(self) -> GraphAnalysis:
        for node in self.gm.graph.nodes:
            meta = node.meta.get("tensor_meta")
            if meta is not None and hasattr(meta, "shape"):
                self.shapes[node.name] = tuple(meta.shape)
            elif isinstance(meta, (tuple, list)) and meta and all(hasattr(m, "shape") or m is None for m in meta) \
                    and any(m is not None for m in meta):  # None: an element that is no tensor
                self.tuple_shapes[node.name] = [None if m is None else tuple(m.shape) for m in meta]
        for node in self.gm.graph.nodes:
            try:
                self.visit(node)
            except _Unsupported as err:
                self.errors.append(f"{self.scope(node)}: {err}")
                # carry on as if it were ignored, so every later unsupported layer is listed in one go
                self.info.pop(node.name, None)
                self.opaque_node(node, "unsupported")
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
                if any(u.op == "call_module" and isinstance(self.modules.get(str(u.target)), nn.Linear)
                       for u in node.users):
                    axis = len(shape) - 1  # tokens (N, L, D) read by a linear layer: channels last
                space = self.new_space(shape[axis], frozen=f"model input '{node.name}'")
                self.boundary.setdefault(space, set()).add("input")
                self.make_info(node, (Segment(space, shape[axis]),), axis)
            return
        if node.op == "output":
            layouts = [self.info[arg.name].layout for arg in self.tensor_args(node)]
            layouts += [info.layout for arg in node.all_input_nodes for info in self.tuple_info.get(arg.name, ())
                        if info is not None]
            for layout in layouts:
                self.freeze(layout, "reaches the model output")
                for seg in self.resolve(layout):
                    self.boundary.setdefault(seg.group, set()).add("output")
            return
        if node.op == "get_attr":
            return
        if not self.tracked_args(node):
            # constants (parameters, buffers and what is computed from them alone) and shape arithmetic; a
            # tensor *created* from a traced size (torch.arange(x.shape[-1])) would already have the hard path's
            # width there: remember which
            inputs = node.all_input_nodes
            tensors = [a for a in inputs if a.name in self.shapes]
            if node.name not in self.shapes:
                if any(a.name in self.size_values for a in inputs):
                    self.size_values.add(node.name)
            elif any(a.name in self.size_derived for a in tensors) or \
                    (not tensors and any(a.name in self.size_values for a in inputs)):
                self.size_derived.add(node.name)
            return
        if self.ignored(node):
            self.opaque_node(node, "ignored by the user")
            return
        function = autograd_function_of(node)
        if function is not None:
            raise _Unsupported(f"custom autograd.Function {function.__name__}: s2hk cannot tell how it maps "
                               "channels, nor give its backward sliced channels")
        if node.op == "call_function" and node.target is operator.getitem and \
                node.args[0].name not in self.tuple_info and \
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
        for arg in node.all_input_nodes:
            for info in self.tuple_info.get(arg.name, ()):
                if info is not None:
                    self.freeze(info.layout, where)
        inputs = [self.info[a.name] for a in self.tensor_args(node)]
        shape = self.shapes.get(node.name)
        if shape is not None:
            info = self.opaque_info(shape, inputs, where)
            if info is not None:
                self.info[node.name] = info
        elif node.name in self.tuple_shapes:  # (attention output, weights): each element on its own
            self.tuple_info[node.name] = [None if s is None else self.opaque_info(s, inputs, where)
                                          for s in self.tuple_shapes[node.name]]
        self.opaque.append(node.name)
        self.opaque_set.add(node.name)

    def opaque_info(self, shape: tuple, inputs: list[_TensorInfo], where: str) -> Optional[_TensorInfo]:
        """New frozen channels for a tensor that an opaque operation outputs: in the dimension its input's
        channels had (tokens keep them last), else dimension 1."""
        if len(shape) < 2:
            return None
        axis = 1 if len(shape) >= 3 else len(shape) - 1
        same_rank = [i for i in inputs if i.ndim == len(shape)]
        if same_rank:
            axis = same_rank[0].axis
        elif any(i.axis == i.ndim - 1 for i in inputs):
            axis = len(shape) - 1
        space = self.new_space(shape[axis], frozen=where)
        return _TensorInfo((Segment(space, shape[axis]),), axis, len(shape), shape)

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
            if inp.axis != inp.ndim - 1 or inp.parts_axis is not None:
                raise _Unsupported("nn.Linear applied along a dimension that is not the channel dimension")
            self.check_width(inp, module.in_features, name)
            space = self.new_space(module.out_features, producer=name)
            self.layers[node.name] = LayerSpec(node.name, name, "linear", self.layout(inp),
                                               (Segment(space, module.out_features),))
            self.make_info(node, self.layers[node.name].out_layout, -1)
        elif isinstance(module, _NORM):
            inp = self.single_input(node)
            if isinstance(module, nn.LayerNorm) and (len(module.normalized_shape) != 1 or inp.axis != inp.ndim - 1):
                self.opaque_node(node, "LayerNorm over more than the channel dimension runs dense")
                return
            layout = self.layout(inp)
            if isinstance(module, nn.LayerNorm):
                for seg in layout:
                    self.layer_norm_spaces.setdefault(seg.group, name)
            self.layers[node.name] = LayerSpec(node.name, name, "norm", layout, layout)
            self.make_info(node, layout, inp.axis)
        elif isinstance(module, nn.MultiheadAttention):
            self.opaque_node(node, "nn.MultiheadAttention runs at full width (its heads are not pruned)")
        elif isinstance(module, (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)):
            self.opaque_node(node, f"{type(module).__name__} runs at full width")
        elif isinstance(module, nn.PReLU) and module.num_parameters > 1:
            self.opaque_node(node, "PReLU with per-channel slopes runs at full width")
        elif isinstance(module, (nn.Softmax, nn.LogSoftmax)):
            self.visit_softmax(node, module.dim)
        elif isinstance(module, _ELEMENTWISE_MODULES + _POOL_MODULES + (nn.PReLU,)):
            inp = self.single_input(node)
            self.make_info(node, inp.layout, inp.axis, inp.parts_axis)
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
        if inp.axis != 1 or inp.parts_axis is not None:
            raise _Unsupported("convolution over a tensor whose channels are not in dimension 1")
        self.check_width(inp, conv.in_channels, name)
        layout = self.layout(inp)
        if conv.groups == 1:
            space = self.new_space(conv.out_channels, producer=name)
            spec = LayerSpec(node.name, name, "conv", layout, (Segment(space, conv.out_channels),))
        elif conv.groups == conv.in_channels == conv.out_channels:
            spec = LayerSpec(node.name, name, "conv", layout, layout, depthwise=True)
        else:
            spec = self.grouped_conv(node, conv, layout)
        self.layers[node.name] = spec
        self.make_info(node, spec.out_layout, 1)

    def grouped_conv(self, node: fx.Node, conv: nn.Module, layout: Layout) -> LayerSpec:
        """A convolution with ``1 < groups``: pruned by whole groups (RegNet, ResNeXt). Group ``j`` of its
        output reads only group ``j`` of its input, so the input's channels are coarsened into ``groups``
        units of ``C_in / groups`` channels, tied to the output's units of ``C_out / groups``; the hard path
        keeps whole groups and the conv's group count becomes the kept units. Where the input's channels do
        not split into such units (a concat across a group boundary), the conv runs at full width."""
        name = str(node.target)
        groups, in_unit, out_unit = conv.groups, conv.in_channels // conv.groups, conv.out_channels // conv.groups
        try:
            units = self.to_units(layout, in_unit)
        except _Unsupported:
            units = ()
        if len(units) != 1 or units[0].size != groups:
            reason = f"grouped convolution {name} (groups={groups}) over channels that do not split into its groups"
            self.freeze(layout, reason)
            space = self.new_space(conv.out_channels, producer=name, frozen=reason)
            return LayerSpec(node.name, name, "conv", layout, (Segment(space, conv.out_channels),))
        space = self.new_space(groups, producer=name)
        self.uf.union(units[0].group, space)
        return LayerSpec(node.name, name, "conv", self.resolve(layout), (Segment(space, groups, out_unit),),
                         depthwise=True)

    # ----------------------------------------------------------------- functions and methods
    def visit_function(self, node: fx.Node) -> None:
        target = node.target
        is_method = node.op == "call_method"
        if target is getattr and node.name in self.shapes:  # a tensor attribute, not x.shape
            if node.args[1] not in ("real", "imag", "data"):
                raise _Unsupported(f"tensor attribute .{node.args[1]} is not one s2hk knows how to prune through")
            self.passthrough(node)
            return
        if (is_method and target in _SHAPE_QUERIES) or target is getattr:
            self.size_values.add(node.name)
            return
        if target is operator.getitem:
            self.visit_getitem(node)
        elif target in _ELEMENTWISE_FUNCTIONS or (is_method and target in _ELEMENTWISE_METHODS):
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
        elif target in _PERMUTE:
            self.visit_permute(node)
        elif target in _UNSQUEEZE or target in _SQUEEZE or target in _EXPAND:
            self.visit_broadcast_shape(node)
        elif target in _SOFTMAX:
            self.visit_softmax(node, _arg(node, 1, "dim"))
        elif target in _ROLL:
            dims = _arg(node, 2, "dims")
            info = self.single_input(node)
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            if not dims or any(d % info.ndim in (info.axis, info.parts_axis) for d in dims):
                raise _Unsupported("rolls along the channel dimension")
            self.make_info(node, info.layout, info.axis, info.parts_axis)
        elif target in _MATMUL:
            self.visit_matmul(node)
        elif target is F.scaled_dot_product_attention:
            self.visit_attention(node)
        elif target is torch.einsum:
            self.visit_einsum(node)
        elif target in _FUNCTIONAL_NORMS:
            self.visit_functional_norm(node)
        elif target in _UNBIND:
            self.visit_unbind(node)
        elif target in _CHUNK:
            self.visit_chunk(node)
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
        self.make_info(node, info.layout, info.axis, info.parts_axis)

    def visit_softmax(self, node: fx.Node, dim: Any) -> None:
        info = self.single_input(node)
        if dim is None or int(dim) % info.ndim in (info.axis, info.parts_axis):
            raise _Unsupported("softmax over the channel dimension")
        self.make_info(node, info.layout, info.axis, info.parts_axis)

    def visit_getitem(self, node: fx.Node) -> None:
        source, index = node.args[0], node.args[1]
        if source.name in self.tuple_info:
            element = self.tuple_info[source.name][index]
            if element is not None:  # None: no tensor, or one without a channel dimension
                self.make_info(node, element.layout, element.axis, element.parts_axis)
            return
        info = self.info[source.name]
        items = index if isinstance(index, tuple) else (index,)
        if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in items):
            raise _Unsupported("indexing with a tensor or list")
        consuming = sum(1 for i in items if i is not None and i is not Ellipsis)
        expanded: list = []
        for i in items:
            expanded.extend([slice(None)] * (info.ndim - consuming) if i is Ellipsis else [i])
        expanded += [slice(None)] * (info.ndim - sum(1 for i in expanded if i is not None))
        in_dim = out_dim = 0
        axis = parts_axis = None
        for i in expanded:
            if i is None:
                out_dim += 1
                continue
            if in_dim == info.axis:
                if i != slice(None):
                    raise _Unsupported("indexing that selects part of the channel dimension")
                axis = out_dim
            elif in_dim == info.parts_axis and isinstance(i, slice):
                if i != slice(None):
                    raise _Unsupported("indexing that selects some of the fused parts of the channels")
                parts_axis = out_dim
            in_dim += 1
            out_dim += 0 if isinstance(i, int) else 1
        self.make_info(node, info.layout, axis, parts_axis)

    def visit_permute(self, node: fx.Node) -> None:
        info = self.single_input(node)
        if node.target in ("transpose", torch.transpose, "swapaxes", torch.swapaxes):
            a, b = (int(d) % info.ndim for d in (_arg(node, 1, "dim0"), _arg(node, 2, "dim1")))
            order = list(range(info.ndim))
            order[a], order[b] = order[b], order[a]
        else:
            dims = node.args[1:] if node.op == "call_method" else (_arg(node, 1, "dims"),)
            if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = tuple(dims[0])
            order = [int(d) % info.ndim for d in dims]
        moved = None if info.parts_axis is None else order.index(info.parts_axis)
        self.make_info(node, info.layout, order.index(info.axis), moved)

    def visit_broadcast_shape(self, node: fx.Node) -> None:
        """unsqueeze / squeeze / expand: dimensions of size one come or go; the channel dimension is found by
        its position from the end, or from the start when dimensions were added or removed after it."""
        if node.target in _EXPAND:
            source = node.args[0]
            if source.name not in self.info:
                return  # a constant expanded to a traced shape stays a constant
            info = self.info[source.name]
        else:
            info = self.single_input(node)
        shape = self.shapes[node.name]
        if node.target in _EXPAND:
            shift = len(shape) - info.ndim
        elif node.target in _UNSQUEEZE:
            d = int(_arg(node, 1, "dim")) % len(shape)
            shift = 1 if d <= info.axis else 0
        else:
            d = _arg(node, 1, "dim")
            if d is None:
                raise _Unsupported("squeeze() without a dimension")
            d = int(d) % info.ndim
            if d == info.axis:
                raise _Unsupported("squeezes the channel dimension")
            shift = -1 if d < info.axis else 0
        axis = info.axis + shift
        if not 0 <= axis < len(shape) or shape[axis] != info.shape[info.axis] or info.parts_axis is not None:
            raise _Unsupported("changes the channel dimension")
        self.make_info(node, info.layout, axis)

    def visit_reshape(self, node: fx.Node) -> None:
        info = self.single_input(node)
        shape = self.shapes[node.name]
        if shape == info.shape:
            self.make_info(node, info.layout, info.axis, info.parts_axis)
            return
        if info.parts_axis is not None:
            raise _Unsupported("reshape of a tensor whose channels are split into fused parts")
        explicit = node.op != "call_module" and node.target not in ("flatten", torch.flatten)
        a, channels, layout = info.axis, info.shape[info.axis], self.layout(info)
        before, after = _numel(info.shape[:a]), _numel(info.shape[a + 1:])
        j = 0
        while j < len(shape) and _numel(shape[:j]) < before:
            j += 1
        while j < len(shape) - 1 and shape[j] == 1 and channels != 1:
            j += 1
        if j >= len(shape) or _numel(shape[:j]) != before:
            raise _Unsupported(f"reshape {tuple(info.shape)} -> {tuple(shape)} mixes the channel dimension "
                               "with the dimensions before it")
        dims: list = [None] * len(shape)
        if shape[j] == channels:                              # channels intact, maybe moved
            self.make_info(node, layout, j)
            dims[j] = layout
        elif shape[j] % channels == 0 and any(_numel(info.shape[a + 1:a + 1 + t]) == shape[j] // channels
                                              for t in range(1, info.ndim - a)):
            merged = shape[j] // channels                    # channels flattened with the dimensions after them
            new = tuple(Segment(s.group, s.size, s.repeat * merged) for s in layout)
            self.make_info(node, new, j)
            dims[j] = new
        else:                                                 # channels split into (parts,) units, unit size
            end = j + 1
            while end <= len(shape) and _numel(shape[j:end]) < channels:
                end += 1
            split = shape[j:end]
            if _numel(split) != channels or len(split) not in (2, 3) or _numel(shape[end:]) != after:
                raise _Unsupported(f"reshape {tuple(info.shape)} -> {tuple(shape)} splits the channel dimension "
                                   "in a way s2hk cannot follow (supported: (C) -> (units, size) or "
                                   "(parts, units, size), e.g. attention heads)")
            dims[j:end] = split  # the parts and the unit size are fixed, whatever the code computes them from
            if len(split) == 2:
                units = self.to_units(layout, split[1])
                self.make_info(node, units, j)
                dims[j] = units
            else:
                parts = [self.to_units(p, split[2]) for p in self.split_parts(layout, split[0])]
                for other in parts[1:]:  # the reshaped tensor is rectangular: every part keeps the same units
                    self.unify(parts[0], other, self.scope(node))
                self.make_info(node, parts[0], j + 1, j)
                dims[j + 1] = parts[0]
        if explicit:
            self.reshapes[node.name] = ReshapeSpec(node.name, tuple(dims))

    def visit_reduce(self, node: fx.Node) -> None:
        info = self.single_input(node)
        shape = self.shapes[node.name]
        dim = _arg(node, 1, "dim")
        keepdim = bool(_arg(node, 2, "keepdim") or False)
        if dim is None or info.parts_axis is not None:
            raise _Unsupported("reduction over the channel dimension")
        dims = {int(d) % info.ndim for d in ((dim,) if isinstance(dim, int) else dim)}
        if info.axis in dims:
            raise _Unsupported("reduction over the channel dimension")
        axis = info.axis if keepdim else info.axis - sum(1 for d in dims if d < info.axis)
        if shape[axis] != info.shape[info.axis]:
            raise _Unsupported("reduction over the channel dimension")
        self.make_info(node, info.layout, axis)

    def visit_binary(self, node: fx.Node, multiply: bool) -> None:
        operands = self.tensor_args(node)
        shape = self.shapes.get(node.name)
        if shape is None:
            return
        if len(operands) == 1:
            info = self.info[operands[0].name]
            self.slice_constants(node, info)
            self.make_info(node, info.layout, info.axis + len(shape) - info.ndim,
                           None if info.parts_axis is None else info.parts_axis + len(shape) - info.ndim)
            return
        a, b = (self.info[o.name] for o in operands[:2])
        if a.ndim - a.axis != b.ndim - b.axis and a.shape[a.axis] != 1 and b.shape[b.axis] != 1:
            raise _Unsupported("operands have their channels in different dimensions")
        self.unify(a.layout, b.layout, self.scope(node))
        sizes = [self.unexpanded_numel(o) for o in operands[:2]]
        if multiply and sizes[0] != sizes[1]:
            # a channel multiply (SE / gating): the smaller, broadcast operand is the attention branch; its
            # producer must not be gated too, or the product would carry the keep-probability twice. (An
            # elementwise product of equal shapes, a GLU, keeps both gates: at 0 / 1 it is the hard product.)
            self.mark_attention(operands[1 if sizes[1] < sizes[0] else 0], node)
        main = a if _numel(a.shape) >= _numel(b.shape) else b
        self.make_info(node, main.layout, main.axis + len(shape) - main.ndim,
                       None if main.parts_axis is None else main.parts_axis + len(shape) - main.ndim)

    def unexpanded_numel(self, node: fx.Node) -> int:
        """Elements of ``node``'s value before any ``expand`` / ``expand_as`` made it bigger."""
        while node.target in _EXPAND and isinstance(node.args[0], fx.Node) and node.args[0].name in self.info:
            node = node.args[0]
        return _numel(self.info[node.name].shape)

    def slice_constants(self, node: fx.Node, info: _TensorInfo) -> None:
        """A tensor computed without the model input (a parameter, buffer, or what is made from them) combined
        with channels: cut to the kept channels on the hard path (a position embedding, a per-head bias)."""
        from_end = info.ndim - info.axis
        gate = node.target in _ADD_LIKE
        for i, arg in [*enumerate(node.args), *node.kwargs.items()]:
            if not isinstance(arg, fx.Node) or arg.name in self.info or arg.name not in self.shapes:
                continue
            cshape = self.shapes[arg.name]
            d = len(cshape) - from_end
            if d < 0 or cshape[d] == 1:
                continue  # broadcast along the channels
            if cshape[d] != info.shape[info.axis]:
                raise _Unsupported(f"combines '{arg.name}' of shape {tuple(cshape)} with {info.shape[info.axis]} "
                                   "channels")
            if arg.name in self.size_derived:
                self.freeze(info.layout, f"{self.scope(node)}: combined with '{arg.name}', made from a tensor's "
                                         "size (its width would not follow the kept channels)")
                continue
            self.constant_slices.append(ConstantSlice(node.name, (i,), d, info.layout, gate))

    def mark_attention(self, start: fx.Node, where: fx.Node) -> None:
        node = start
        while True:
            if node.target in _EXPAND:  # y.expand_as(x): the attention is y
                node = node.args[0]
                continue
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
        if any(not isinstance(t, fx.Node) or (t.name not in self.info and t.name not in self.shapes)
               for t in tensors):
            raise _Unsupported("concatenation of tensors whose channels are unknown")
        ref = next(self.info[t.name] for t in tensors if t.name in self.info)
        axis = dim % ref.ndim
        if axis == ref.axis:
            layout: list[Segment] = []
            for t in tensors:
                if t.name in self.info:
                    layout.extend(self.layout(self.info[t.name]))
                else:
                    width = self.shapes[t.name][axis]
                    space = self.new_space(width, frozen=f"{self.scope(node)}: constant concatenated along channels")
                    layout.append(Segment(space, width))
            self.make_info(node, tuple(layout), axis)
            return
        for i, t in enumerate(tensors):
            if t.name in self.info:
                self.unify(ref.layout, self.info[t.name].layout, self.scope(node))
            elif t.name in self.size_derived:
                self.freeze(ref.layout, f"{self.scope(node)}: concatenated with '{t.name}', made from a tensor's size")
            elif self.shapes[t.name][ref.axis] != 1:
                self.constant_slices.append(ConstantSlice(node.name, (0, i), ref.axis, ref.layout, True))
        self.make_info(node, ref.layout, ref.axis, ref.parts_axis)

    def visit_matmul(self, node: fx.Node) -> None:
        """``a @ b`` of two channel-carrying tensors whose channels are a batch dimension (attention heads):
        the heads of both operands are the same channels; the MACs scale with the kept heads."""
        operands = self.tensor_args(node)
        shape = self.shapes[node.name]
        if len(operands) != 2:
            raise _Unsupported("matrix product of channels with a constant (use nn.Linear)")
        a, b = (self.info[o.name] for o in operands)
        from_end = a.ndim - a.axis
        if from_end <= 2 or b.ndim - b.axis != from_end or a.parts_axis is not None or b.parts_axis is not None:
            raise _Unsupported("matrix product over the channel dimension (only products batched over channels, "
                               "as attention heads, are supported)")
        self.unify(a.layout, b.layout, self.scope(node))
        self.make_info(node, a.layout, len(shape) - from_end)
        macs = _numel(shape) * a.shape[-1]
        self.matmuls[node.name] = MatmulSpec(node.name, a.layout, macs // layout_width(a.layout))

    def visit_functional_norm(self, node: fx.Node) -> None:
        """``F.layer_norm`` / ``F.group_norm`` / ``F.batch_norm`` called with parameters of the model (a
        ConvNeXt-style LayerNorm2d): the channels pass through unchanged but run at full width, since the
        weights are not a layer s2hk can slice."""
        info = self.tensor_args(node)
        if not info or node.args[0] is not info[0]:
            raise _Unsupported("normalisation whose statistics come from the input's channels")
        inp = self.info[info[0].name]
        name = getattr(node.target, "__name__", str(node.target))
        self.freeze(inp.layout, f"{self.scope(node)}: functional {name} runs at full width")
        self.make_info(node, inp.layout, inp.axis, inp.parts_axis)

    def visit_einsum(self, node: fx.Node) -> None:
        """``torch.einsum`` of two channel-carrying tensors whose channel letter is the same and survives into
        the output (a product batched over channels, as attention heads): like :meth:`visit_matmul`."""
        equation = node.args[0]
        operands = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
            else list(node.args[1:])
        if not isinstance(equation, str) or len(operands) != 2 or \
                not all(isinstance(o, fx.Node) and o.name in self.info for o in operands):
            raise _Unsupported("einsum other than a product of two channel-carrying tensors (for a weight, use "
                               "nn.Linear)")
        infos = [self.info[o.name] for o in operands]
        inputs, output = einsum_subscripts(equation, [i.ndim for i in infos])
        letters = {inputs[0][infos[0].axis], inputs[1][infos[1].axis]}
        if len(letters) != 1 or next(iter(letters)) not in output or \
                any(i.parts_axis is not None for i in infos):
            raise _Unsupported(f"einsum '{equation}' mixes or contracts the channel dimension (only products "
                               "batched over channels, as attention heads, are supported)")
        self.unify(infos[0].layout, infos[1].layout, self.scope(node))
        self.make_info(node, infos[0].layout, output.index(next(iter(letters))))
        macs = einsum_macs(inputs, [i.shape for i in infos])
        self.matmuls[node.name] = MatmulSpec(node.name, infos[0].layout, macs // layout_width(infos[0].layout))

    def visit_attention(self, node: fx.Node) -> None:
        q, k, v = (node.args[i] if len(node.args) > i else node.kwargs.get(n)
                   for i, n in enumerate(("query", "key", "value")))
        if any(not isinstance(t, fx.Node) or t.name not in self.info for t in (q, k, v)):
            raise _Unsupported("attention over tensors whose channels are unknown")
        infos = [self.info[t.name] for t in (q, k, v)]
        from_end = infos[0].ndim - infos[0].axis
        if from_end <= 2 or any(i.ndim - i.axis != from_end or i.parts_axis is not None for i in infos):
            raise _Unsupported("attention whose channels are not a batch dimension (heads)")
        mask_path: tuple = (3,) if len(node.args) > 3 else ("attn_mask",)
        mask = node_argument(node, mask_path) if len(node.args) > 3 or "attn_mask" in node.kwargs else None
        if isinstance(mask, fx.Node) and mask.name in self.info:
            raise _Unsupported("attention mask computed from the input's channels")
        if isinstance(mask, fx.Node) and mask.name in self.shapes:  # a constant mask per head is cut with them
            mshape = self.shapes[mask.name]
            d = len(mshape) - from_end
            if d >= 0 and mshape[d] != 1:
                self.constant_slices.append(ConstantSlice(node.name, mask_path, d, infos[0].layout, True))
        for other in infos[1:]:
            self.unify(infos[0].layout, other.layout, self.scope(node))
        shape = self.shapes[node.name]
        self.make_info(node, infos[0].layout, len(shape) - from_end)
        qs, ks, vs = (i.shape for i in infos)
        macs = _numel(qs[:-2]) * qs[-2] * ks[-2] * (qs[-1] + vs[-1])
        self.matmuls[node.name] = MatmulSpec(node.name, infos[0].layout, macs // layout_width(infos[0].layout))

    def visit_unbind(self, node: fx.Node) -> None:
        info = self.single_input(node)
        d = int(_arg(node, 1, "dim") or 0) % info.ndim
        if d == info.axis:
            raise _Unsupported("unbind along the channel dimension")
        shapes = self.tuple_shapes[node.name]
        axis = info.axis - (1 if d < info.axis else 0)
        parts_axis = None
        if info.parts_axis is not None and d != info.parts_axis:
            parts_axis = info.parts_axis - (1 if d < info.parts_axis else 0)
        self.tuple_info[node.name] = [_TensorInfo(info.layout, axis, len(s), s, parts_axis) for s in shapes]

    def visit_chunk(self, node: fx.Node) -> None:
        info = self.single_input(node)
        chunks = int(_arg(node, 1, "chunks"))
        d = int(_arg(node, 2, "dim") or 0) % info.ndim
        shapes = self.tuple_shapes[node.name]
        if d == info.parts_axis:
            raise _Unsupported("chunk along the fused parts of the channels")
        if d == info.axis:
            if info.shape[d] % chunks:
                raise _Unsupported("chunk of the channel dimension into unequal parts")
            layouts = self.split_parts(self.layout(info), chunks)
            for other in layouts[1:]:  # the hard path splits the kept channels evenly: equal parts
                self.unify(layouts[0], other, self.scope(node))
        else:
            layouts = [info.layout] * len(shapes)
        self.tuple_info[node.name] = [_TensorInfo(l, info.axis, len(s), s, info.parts_axis)
                                      for l, s in zip(layouts, shapes)]

    # ----------------------------------------------------------------- groups
    def finish(self) -> GraphAnalysis:
        roots: dict[int, int] = {}
        groups: list[ChannelGroup] = []
        canonical: dict[int, int] = {}
        for space in range(len(self.uf.parent)):
            if space in self.refined:
                continue
            root = self.uf.find(space)
            if root not in roots:
                roots[root] = len(groups)
                groups.append(ChannelGroup(len(groups), self.producer_of.get(root, f"group{len(groups)}"),
                                           self.uf.size[root]))
            canonical[space] = roots[root]
        for space, reasons in self.frozen.items():
            if space in canonical:
                groups[canonical[space]].frozen_reasons.extend(reasons)
        for space, sides in self.boundary.items():
            if space in canonical:
                g = groups[canonical[space]]
                g.from_input, g.to_output = g.from_input or "input" in sides, g.to_output or "output" in sides
        if not self.prune_embedding:
            for space, norm in self.layer_norm_spaces.items():
                if space in canonical:
                    groups[canonical[space]].frozen_reasons.append(
                        f"normalised by LayerNorm '{norm}' (an embedding width: pass prune_embedding=True to "
                        "prune it)")
        for space, producer in self.producer_of.items():
            if space not in canonical:
                continue
            g = groups[canonical[space]]
            if producer not in g.producers:
                g.producers.append(producer)
        for g in groups:
            if g.producers:
                g.name = g.producers[0]

        def remap(layout: Layout) -> Layout:
            return tuple(Segment(canonical[s.group], s.size, s.repeat) for s in self.resolve(layout))

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
        reshapes = {name: ReshapeSpec(name, tuple(remap(d) if isinstance(d, tuple) else d for d in r.dims))
                    for name, r in self.reshapes.items()}
        slices = [ConstantSlice(c.node, c.arg_path, c.dim, remap(c.layout), c.gate) for c in self.constant_slices]
        matmuls = {name: MatmulSpec(name, remap(m.layout), m.macs_per_position) for name, m in self.matmuls.items()}
        return GraphAnalysis(self.gm, groups, self.layers, self.shapes, self.opaque, reshapes, slices, matmuls,
                             tuple(self.ignore))


class _Unsupported(Exception):
    pass


def einsum_subscripts(equation: str, ndims: Sequence[int]) -> tuple[list[str], str]:
    """The per-operand subscripts and the output subscripts of an einsum ``equation`` for operands of the
    given ranks, with ``...`` expanded to one digit per broadcast dimension and an implicit output made
    explicit (the letters used once, in alphabetical order after the broadcast dimensions)."""
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    parts = lhs.split(",")
    if len(parts) != len(ndims):
        raise ValueError(f"einsum '{equation}' names {len(parts)} operands, {len(ndims)} given")
    broadcast = max((n - len(p.replace("...", "")) for p, n in zip(parts, ndims) if "..." in p), default=0)
    dots = "".join(str(i) for i in range(broadcast))

    def expand(sub: str, ndim: int) -> str:
        if "..." not in sub:
            return sub
        extra = ndim - len(sub.replace("...", ""))
        return sub.replace("...", dots[broadcast - extra:])

    inputs = [expand(p, n) for p, n in zip(parts, ndims)]
    if arrow:
        output = rhs.replace("...", dots)
    else:
        counts: dict[str, int] = {}
        for letter in "".join(inputs):
            counts[letter] = counts.get(letter, 0) + 1
        output = dots + "".join(sorted(c for c, n in counts.items() if n == 1 and not c.isdigit()))
    return inputs, output


def einsum_macs(inputs: Sequence[str], shapes: Sequence[Sequence[int]]) -> int:
    """Multiply-accumulates of a two-operand einsum: the product of the sizes of every index it names (each
    output element sums over the contracted indices once)."""
    sizes: dict[str, int] = {}
    for sub, shape in zip(inputs, shapes):
        for letter, size in zip(sub, shape):
            sizes[letter] = max(sizes.get(letter, 1), int(size))
    return _numel(sizes.values())


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _arg(node: fx.Node, position: int, name: str) -> Any:
    """Argument ``name`` of a call, given by position (``self`` counted for methods) or keyword."""
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name)


def node_argument(node: fx.Node, path: tuple) -> Any:
    """The argument of ``node`` at ``path``: ``(i,)`` the i-th positional one, ``(i, j)`` the j-th element of a
    list argument (``torch.cat``), ``("name",)`` a keyword one."""
    value: Any = node.kwargs if isinstance(path[0], str) else node.args
    for i in path:
        value = value[i]
    return value


def set_node_argument(node: fx.Node, path: tuple, new: Any) -> None:
    """Replace the argument of ``node`` at ``path`` (see :func:`node_argument`) by ``new``."""
    def replaced(container: Any, rest: tuple) -> Any:
        if isinstance(container, dict):
            return {**container, rest[0]: new if len(rest) == 1 else replaced(container[rest[0]], rest[1:])}
        items = list(container)
        items[rest[0]] = new if len(rest) == 1 else replaced(items[rest[0]], rest[1:])
        return type(container)(items)

    if isinstance(path[0], str):
        node.kwargs = replaced(node.kwargs, path)
    else:
        node.args = replaced(node.args, path)


def reshape_arguments(node: fx.Node) -> tuple[Any, tuple, bool]:
    """``(tensor, sizes, packed)`` of a ``reshape`` / ``view`` call: the sizes one by one, however they are
    given (varargs, a sequence, ``torch.reshape(x, shape)``, ``shape=``); ``packed`` when they are one value
    computed at run time (``t.size()[:-1] + (heads, -1)``), returned as a one-element tuple."""
    x = node.args[0]
    if node.op == "call_method":
        sizes = node.args[1:] or (node.kwargs.get("shape", node.kwargs.get("size")),)
    else:
        sizes = (node.args[1] if len(node.args) > 1 else node.kwargs["shape"],)
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        return x, tuple(sizes[0]), False
    packed = len(sizes) == 1 and isinstance(sizes[0], fx.Node)
    return x, tuple(sizes), packed
