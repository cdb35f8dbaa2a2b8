"""CR-SFP's per-layer structure: which convolutions are masked, and the P-NN they leave (ALGORITHMS.md §2).

Masked layers
-------------
The authors mask every convolution inside a residual block, each on its own (the block's last convolution,
whose output meets the shortcut in the residual sum, included), and never the stem or a shortcut. Here that
is read off the traced graph, for any model, by giving every convolution call a role (:func:`conv_roles`):

- ``"stem"``: its input channels are the model input's;
- ``"output"``: its output channels are the model output's (they are the classes);
- ``"depthwise"`` / ``"grouped"``: each filter reads only its own slice of the input channels, so a filter
  is tied to the channels feeding it rather than being an independent unit; never masked;
- ``"shortcut"``: the only convolution on one operand of a residual add (norms and pointwise ops may follow
  it), whose input -- reached back through ops of one input and no weights, such as ResNet-D's pooling --
  is a tensor from which the add's other operand is computed with at least two convolutions: a projection
  (downsample) shortcut, ResNet's 1x1 conv + BN or WideResNet's pre-activation 1x1. A one-convolution branch
  beside the identity, or two one-convolution branches side by side, are block convolutions;
- ``"block"``: every other convolution; these are masked.

The P-NN and its export
-----------------------
In training the P-NN is the network whose block convolutions use ``weight * mask`` (one mask per conv
module, :class:`MaskedLayer`). A masked filter outputs its bias (0 without one) at every position, so after
its BatchNorm and pointwise ops the channel is one constant (BN in eval mode:
``beta - gamma * mean / sqrt(var + eps)``), which still flows into whatever reads it. The export removes the
masked filters and keeps those constants exactly:

- the masked conv's filters and its BatchNorms' channels are sliced away (:func:`layer_selections`);
- a *convolution* reading the channels (the next conv of the block) loses those input channels and adds
  their response instead: the conv applied to the constant maps. With zero padding that response is not
  uniform -- positions near the border see fewer taps of the constant -- so it is stored as a map
  ``(C_out, H_out, W_out)`` for the example input's spatial size (exact; other input sizes fail at that add
  with a shape error); without padding (1x1 convs) or with a non-zero padding mode it is uniform and stored
  as ``(C_out, 1, 1)``, valid at any size;
- a *residual add* receiving them (the block's last conv) gets the constants back: the export computes
  ``torch.index_add(other + constant, 1, kept, branch)`` with ``constant`` ``(C, 1, 1)`` zero at the kept
  channels, so the residual stream keeps its full width and the sum is the P-NN's.

A masked conv is *removable* when it is called once and every node its channels reach is a BatchNorm, a
pointwise op of one input, a convolution with ``groups == 1`` reading them as its only input, or a residual
add of two same-shaped tensors whose other operand does not carry another removable conv's channels.
Otherwise the export keeps its masked filters, zeroed:
still exact, not smaller (MobileNet's expand convs feed depthwise convs; a conv before global pooling feeds
no conv). The FLOPs of the exported P-NN (:func:`pnn_flops`) count each removable conv with
``C_out - int(C_out * rate)`` filters and each conv reading its channels with that many fewer inputs; the
constants' adds are not counted (FLOPs = 2 x MACs of convs, linears and matmuls, see :mod:`s2hk.flops`).

The export's graph changes are plain data (:func:`pnn_edits`, JSON-serialisable; the constants are buffers
``s2hk_pnn_<i>`` in the exported ``state_dict``), applied by :func:`apply_pnn_edits`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .depth import _closure, _is_residual_add
from .graph import _ELEMENTWISE_FUNCTIONS, _ELEMENTWISE_METHODS, _ELEMENTWISE_MODULES, GraphAnalysis, layout_width
from .layers import Selection, _conv

if TYPE_CHECKING:
    from .crsfp import CRSFPruner
    from .flops import FlopsPolynomial

__all__ = ["ROLES", "MaskedLayer", "conv_roles", "plan_layers", "layer_selections", "term_macs", "pnn_flops",
           "pnn_edits", "apply_pnn_edits", "finish_export"]

ROLES = ("block", "stem", "output", "depthwise", "grouped", "shortcut")

# Pointwise functions keep a channel that is constant over the positions constant, and do not mix channels;
# the engine's elementwise list also holds pooling and resizing, which change values at the borders.
_POINTWISE_FUNCTIONS = frozenset(f for f in _ELEMENTWISE_FUNCTIONS
                                 if "pool" not in getattr(f, "__name__", "") and f is not F.interpolate)


@dataclass(frozen=True)
class MaskedLayer:
    """One masked convolution and where its output channels go.

    Attributes:
        target: the conv module's name (the unit a mask belongs to).
        nodes: its call nodes (fx names), in graph order.
        channels: ``C_out``.
        masked: ``int(C_out * rate)``, the filters masked at every re-ranking.
        removable: whether the export removes the masked filters (module docstring); else it keeps them zeroed.
        chain: nodes carrying the channels one to one after the conv (BatchNorms, pointwise ops), graph order.
        norms: the BatchNorm calls among ``chain`` (sliced with the conv).
        conv_consumers: ``(conv node, node it reads)`` for every convolution reading the channels.
        add_consumers: ``(add node, operand position, operand node)`` for every residual add receiving them.
    """

    target: str
    nodes: tuple[str, ...]
    channels: int
    masked: int
    removable: bool
    chain: tuple[str, ...] = ()
    norms: tuple[str, ...] = ()
    conv_consumers: tuple[tuple[str, str], ...] = ()
    add_consumers: tuple[tuple[str, int, str], ...] = ()

    @property
    def node(self) -> str:
        """The first call of the conv."""
        return self.nodes[0]

    @property
    def removes(self) -> bool:
        """Whether the export is narrower here: removable, and at least one filter masked."""
        return self.removable and self.masked > 0


class _Graph:
    """What the role and plan rules read of an analysis: nodes, modules, shapes, layer specs."""

    def __init__(self, analysis: GraphAnalysis) -> None:
        self.analysis = analysis
        self.nodes = list(analysis.graph_module.graph.nodes)
        self.by_name = {n.name: n for n in self.nodes}
        self.modules = dict(analysis.graph_module.named_modules())
        self.shapes = analysis.node_shapes

    def module(self, node: fx.Node) -> Optional[nn.Module]:
        return self.modules.get(str(node.target)) if node.op == "call_module" else None

    def is_conv(self, node: fx.Node) -> bool:
        spec = self.analysis.layers.get(node.name)
        return spec is not None and spec.kind == "conv"

    def is_plain_conv(self, node: fx.Node) -> bool:
        """A convolution with one group (each filter reads every input channel)."""
        return self.is_conv(node) and not self.analysis.layers[node.name].depthwise and self.module(node).groups == 1

    def is_batch_norm(self, node: fx.Node) -> bool:
        spec = self.analysis.layers.get(node.name)
        return spec is not None and spec.kind == "norm" and \
            isinstance(self.module(node), nn.modules.batchnorm._BatchNorm)

    def passes_channels(self, node: fx.Node) -> bool:
        """A node of one tensor input and the same shape that maps each channel to itself, position by
        position: a BatchNorm or a pointwise op (a constant channel stays one constant)."""
        inputs = node.all_input_nodes
        if len(inputs) != 1 or self.shapes.get(node.name) is None or \
                self.shapes.get(node.name) != self.shapes.get(inputs[0].name):
            return False
        if node.op == "call_module":
            return self.is_batch_norm(node) or (node.name not in self.analysis.layers and
                                                isinstance(self.module(node), _ELEMENTWISE_MODULES))
        if node.op == "call_function":
            return node.target in _POINTWISE_FUNCTIONS
        return node.op == "call_method" and node.target in _ELEMENTWISE_METHODS

    def is_sum_of_equals(self, node: fx.Node) -> bool:
        """A residual add of two distinct tensors of the same shape."""
        return _is_residual_add(node) and node.args[0] is not node.args[1] and \
            self.shapes.get(node.args[0].name) is not None and \
            self.shapes.get(node.args[0].name) == self.shapes.get(node.args[1].name) == self.shapes.get(node.name)


def conv_roles(analysis: GraphAnalysis) -> dict[str, str]:
    """The role (:data:`ROLES`, module docstring) of every convolution call, by fx node name, in graph order."""
    g = _Graph(analysis)
    shortcuts = _shortcut_convs(g)
    roles = {}
    for node in g.nodes:
        if not g.is_conv(node):
            continue
        spec = analysis.layers[node.name]
        if spec.depthwise:
            role = "depthwise"
        elif g.module(node).groups != 1:
            role = "grouped"
        elif any(analysis.groups[s.group].from_input for s in spec.in_layout):
            role = "stem"
        elif any(analysis.groups[s.group].to_output for s in spec.out_layout):
            role = "output"
        elif node.name in shortcuts:
            role = "shortcut"
        else:
            role = "block"
        roles[node.name] = role
    return roles


def _shortcut_convs(g: _Graph) -> set[str]:
    """Conv calls that are the projection shortcut of a residual add (module docstring)."""
    found: set[str] = set()
    for add in g.nodes:
        if not _is_residual_add(add):
            continue
        for position in (0, 1):
            conv, other = add.args[position], add.args[1 - position]
            while not g.is_conv(conv) and g.passes_channels(conv):
                conv = conv.all_input_nodes[0]
            if not g.is_conv(conv) or not conv.args or not isinstance(conv.args[0], fx.Node):
                continue
            feeds_other = _closure(other, lambda n: n.all_input_nodes) | {other}
            root = conv.args[0]
            while root not in feeds_other and root.op != "placeholder" and root.name not in g.analysis.layers \
                    and len(root.all_input_nodes) == 1:
                root = root.all_input_nodes[0]
            if root not in feeds_other:
                continue  # the conv's branch does not start where the other operand's does
            other_branch = feeds_other & _closure(root, lambda n: n.users)
            if sum(g.is_conv(n) for n in other_branch) >= 2:
                found.add(conv.name)
    return found




def plan_layers(analysis: GraphAnalysis, rate: float) -> list[MaskedLayer]:
    """The masked convolutions (role ``"block"``), one per module in graph order, ``int(C * rate)`` filters
    masked in each, and where their channels go (whether the export can remove them)."""
    g = _Graph(analysis)
    calls: dict[str, list[str]] = {}
    for name, role in conv_roles(analysis).items():
        if role == "block":
            calls.setdefault(analysis.layers[name].target, []).append(name)
    layers = []
    for target, nodes in calls.items():
        channels = g.modules[target].out_channels
        masked = int(channels * rate)
        flow = _follow_channels(g, g.by_name[nodes[0]]) if len(nodes) == 1 else None
        if flow is None:
            layers.append(MaskedLayer(target, tuple(nodes), channels, masked, False))
        else:
            chain, convs, adds = flow
            norms = tuple(n for n in chain if g.is_batch_norm(g.by_name[n]))
            layers.append(MaskedLayer(target, tuple(nodes), channels, masked, True, chain, norms, convs, adds))
    return _without_two_sided_adds(g, layers)


def _follow_channels(g: _Graph, conv: fx.Node) -> Optional[tuple[tuple, tuple, tuple]]:
    """``(chain, conv consumers, add consumers)`` of a conv call's output channels (see :class:`MaskedLayer`),
    or None where they reach anything else."""
    chain: list[fx.Node] = []
    convs: list[tuple[str, str]] = []
    adds: list[tuple[str, int, str]] = []
    frontier = [conv]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if g.passes_channels(user):
                chain.append(user)
                frontier.append(user)
            elif g.is_plain_conv(user) and len(user.args) == 1 and not user.kwargs and user.args[0] is node:
                convs.append((user.name, node.name))
            elif g.is_sum_of_equals(user):
                adds.append((user.name, user.args.index(node), node.name))
            else:
                return None
    order = {n: i for i, n in enumerate(g.nodes)}
    chain.sort(key=order.__getitem__)
    return tuple(n.name for n in chain), tuple(convs), tuple(adds)


def _without_two_sided_adds(g: _Graph, layers: list[MaskedLayer]) -> list[MaskedLayer]:
    """``layers``, those made unremovable whose channels meet, in an add, channels of another removable conv:
    the export puts one narrowed operand of a sum back onto the other's full width, not two narrowed ones."""
    while True:
        carriers = {name: i for i, layer in enumerate(layers) if layer.removable
                    for name in (*layer.nodes, *layer.chain)}
        clash = set()
        for i, layer in enumerate(layers):
            for add, position, _ in layer.add_consumers if layer.removable else ():
                other = g.by_name[add].args[1 - position].name
                if other in carriers:
                    clash |= {i, carriers[other]}
        if not clash:
            return layers
        layers = [MaskedLayer(l.target, l.nodes, l.channels, l.masked, False) if i in clash else l
                  for i, l in enumerate(layers)]


# ------------------------------------------------------------------------------------------ the exported P-NN

def layer_selections(layers: Sequence[MaskedLayer], kept: Mapping[str, Sequence[int]],
                     device: torch.device) -> dict[str, tuple[Selection, Selection]]:
    """``(input selection, output selection)`` of every layer call the export narrows, by fx node name: each
    removing conv's kept filters (``kept`` by module name), its BatchNorms' kept channels, and the kept input
    channels of the convs reading them. Selections are int64 index tensors on ``device``."""
    sel_in: dict[str, Tensor] = {}
    sel_out: dict[str, Tensor] = {}
    for layer in layers:
        if not layer.removes:
            continue
        idx = torch.tensor(list(kept[layer.target]), dtype=torch.long, device=device)
        sel_out[layer.node] = idx
        for norm in layer.norms:
            sel_in[norm] = sel_out[norm] = idx
        for consumer, _ in layer.conv_consumers:
            sel_in[consumer] = idx
    return {name: (sel_in.get(name), sel_out.get(name)) for name in {**sel_in, **sel_out}}


def term_macs(poly: "FlopsPolynomial", layers: Sequence[MaskedLayer]) -> list[tuple[str, int, int]]:
    """``(layer call, dense MACs, P-NN MACs)`` of every term of ``poly`` (each conv, linear and matmul call),
    the P-NN's with each removing conv at ``C_out - masked`` filters and each conv reading its channels at that
    many fewer inputs. Independent of which filters are masked."""
    fewer_out: dict[str, int] = {}
    fewer_in: dict[str, int] = {}
    for layer in layers:
        if layer.removes:
            fewer_out[layer.node] = layer.masked
            fewer_in.update({consumer: layer.masked for consumer, _ in layer.conv_consumers})
    out = []
    for term in poly.terms:
        dense_out = layout_width(term.out_layout)
        dense_in = 1 if term.in_layout is None else layout_width(term.in_layout) // term.in_per_group_divisor
        pnn_out = dense_out - fewer_out.get(term.node, 0)
        pnn_in = 1 if term.in_layout is None else \
            (layout_width(term.in_layout) - fewer_in.get(term.node, 0)) // term.in_per_group_divisor
        out.append((term.node, term.macs_per_pair * dense_out * dense_in, term.macs_per_pair * pnn_out * pnn_in))
    return out


def pnn_flops(poly: "FlopsPolynomial", layers: Sequence[MaskedLayer]) -> int:
    """Exact FLOPs (2 x MACs) of the exported P-NN: ``poly``'s layers at their P-NN widths (:func:`term_macs`)
    plus its MACs that no width changes."""
    return 2 * (poly.constant_macs + sum(pnn for _, _, pnn in term_macs(poly, layers)))


@dataclass(frozen=True)
class _Site:
    """Where the export adds the constants of a removing layer's masked channels: after the conv ``node``
    reading them from ``source`` (``kind == "conv"``), or in the residual add ``node`` whose operand
    ``position`` is ``source`` (``kind == "add"``)."""

    kind: str
    node: str
    source: str
    layer: MaskedLayer
    position: int = 0


def _sites(layers: Sequence[MaskedLayer]) -> list[_Site]:
    sites = []
    for layer in layers:
        if layer.removes:
            sites += [_Site("conv", consumer, source, layer) for consumer, source in layer.conv_consumers]
            sites += [_Site("add", add, source, layer, position) for add, position, source in layer.add_consumers]
    return sites


def _uniform_response(conv: nn.Module) -> bool:
    """Whether the conv's response to a constant input is the same at every output position: no zero padding
    (a non-zero padding mode pads a constant map with the same constant)."""
    if conv.padding_mode != "zeros" or conv.padding == "valid":
        return True
    if conv.padding == "same":
        return all(k == 1 for k in conv.kernel_size)
    return all(p == 0 for p in conv.padding)


def pnn_edits(pruner: "CRSFPruner") -> list[dict]:
    """The export's graph changes for ``pruner``'s current masks, as JSON-serialisable data (module
    docstring): ``{"kind": "conv", "node", "buffer", "shape"}`` adds buffer ``buffer`` (``shape``) to conv
    ``node``'s output; ``{"kind": "add", "node", "operand", "kept", "buffer", "shape"}`` makes the residual add
    ``node`` read its narrowed ``operand`` (kept channels ``kept``) onto the other operand plus ``buffer``."""
    layers = {layer.node: layer for layer in pruner.masked_layers}
    kept = pruner.kept_channels()
    modules = dict(pruner.analysis.graph_module.named_modules())
    edits = []
    for site in _sites(pruner.masked_layers):
        buffer = f"s2hk_pnn_{len(edits)}"
        if site.kind == "conv":
            consumer = layers.get(site.node)
            rows = consumer.channels - consumer.masked if consumer is not None and consumer.removes else \
                modules[pruner.analysis.layers[site.node].target].out_channels
            spatial = list(pruner.analysis.node_shapes[site.node][2:])
            if _uniform_response(modules[pruner.analysis.layers[site.node].target]):
                spatial = [1] * len(spatial)
            edits.append({"kind": "conv", "node": site.node, "buffer": buffer, "shape": [rows, *spatial]})
        else:
            ndim = len(pruner.analysis.node_shapes[site.node])
            edits.append({"kind": "add", "node": site.node, "operand": site.position,
                          "kept": list(kept[site.layer.target]), "buffer": buffer,
                          "shape": [site.layer.channels] + [1] * (ndim - 2)})
    return edits


def apply_pnn_edits(gm: fx.GraphModule, edits: Sequence[Mapping[str, Any]]) -> None:
    """Apply :func:`pnn_edits` to ``gm`` (a narrowed copy of the model's traced graph), in place: each edit's
    constant becomes a zero buffer of its shape (the values come with the ``state_dict``, or from
    :func:`finish_export`), kept-channel lists int64 buffers ``<buffer>_kept``."""
    nodes = {n.name: n for n in gm.graph.nodes}
    ref = next(iter(gm.parameters()))
    for edit in edits:
        node, name = nodes[edit["node"]], edit["buffer"]
        gm.register_buffer(name, torch.zeros(edit["shape"], dtype=ref.dtype, device=ref.device))
        if edit["kind"] == "conv":
            with gm.graph.inserting_after(node):
                constant = gm.graph.get_attr(name)
            with gm.graph.inserting_after(constant):
                summed = gm.graph.call_function(operator.add, (node, constant))
            node.replace_all_uses_with(summed, delete_user_cb=lambda user: user is not summed)
        else:
            gm.register_buffer(f"{name}_kept", torch.tensor(edit["kept"], dtype=torch.long, device=ref.device))
            position = edit["operand"]
            branch, other = node.args[position], node.args[1 - position]
            with gm.graph.inserting_before(node):
                base = gm.graph.call_function(operator.add, (other, gm.graph.get_attr(name)))
                restored = gm.graph.call_function(torch.index_add, (base, 1, gm.graph.get_attr(f"{name}_kept"),
                                                                    branch))
            node.replace_all_uses_with(restored)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


class _Recorder(fx.Interpreter):
    """Runs a graph module and keeps the outputs of the nodes named in ``names``."""

    def __init__(self, module: fx.GraphModule, names: set[str]) -> None:
        super().__init__(module)
        self.names = names
        self.values: dict[str, Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.name in self.names:  # a copy: an in-place op further on (ReLU(inplace=True)) may overwrite it
            self.values[n.name] = result.detach().clone()
        return result


def _node_values(pruner: "CRSFPruner", names: set[str]) -> dict[str, Tensor]:
    """The P-NN's (hard path, eval mode) outputs of the named nodes for zero inputs of the example inputs'
    shapes: the removed channels' values do not depend on the input, but a non-finite one (the example
    inputs hold no values after a trip through ``"meta"``) would reach them through ``0 * x``."""
    inputs = pruner.example_inputs if isinstance(pruner.example_inputs, (tuple, list)) else (pruner.example_inputs,)
    inputs = tuple(torch.zeros_like(t) if isinstance(t, Tensor) and t.is_floating_point() else t for t in inputs)
    recorder = _Recorder(pruner.graph_module, names)
    was_training = pruner.training
    pruner.eval()
    pruner.prepare_hard()
    pruner.state.path = "hard"
    try:
        with torch.no_grad():
            recorder.run(*inputs)
    finally:
        pruner.state.path = "dense"
        pruner.train(was_training)
    return recorder.values


def _masked_filters(layer: MaskedLayer, kept: Sequence[int], device: torch.device) -> Tensor:
    """The masked filters of ``layer`` (int64 indices on ``device``)."""
    keep = set(kept)
    return torch.tensor([c for c in range(layer.channels) if c not in keep], dtype=torch.long, device=device)


@torch.no_grad()
def finish_export(pruner: "CRSFPruner", exported: fx.GraphModule) -> None:
    """Make the engine's export of ``pruner`` (narrowed by :func:`layer_selections`) the P-NN, in place: the
    masked filters it keeps are zeroed, and the constants of the removed ones are added where they flow
    (:func:`pnn_edits`), computed from the P-NN's own outputs at those nodes."""
    kept = pruner.kept_channels()
    for layer in pruner.masked_layers:
        if layer.masked and not layer.removes:
            weight = exported.get_submodule(layer.target).weight
            weight.index_fill_(0, _masked_filters(layer, kept[layer.target], weight.device), 0.0)
    edits = pnn_edits(pruner)
    apply_pnn_edits(exported, edits)
    sites = _sites(pruner.masked_layers)
    values = _node_values(pruner, {site.source for site in sites})
    layers = {layer.node: layer for layer in pruner.masked_layers}
    for site, edit in zip(sites, edits):
        device = values[site.source].device
        removed = _masked_filters(site.layer, kept[site.layer.target], device)
        # each removed channel is one constant over the positions: read it at the first
        constants = values[site.source][0].index_select(0, removed).flatten(1)[:, 0]
        if site.kind == "add":
            full = torch.zeros(site.layer.channels, dtype=constants.dtype, device=device)
            value = full.index_copy_(0, removed, constants)
        else:
            value = _conv_response(pruner, site, layers.get(site.node), removed, constants, kept)
        buffer = exported.get_buffer(edit["buffer"])
        buffer.copy_(value.reshape(buffer.shape))


def _conv_response(pruner: "CRSFPruner", site: _Site, consumer: Optional[MaskedLayer], removed: Tensor,
                   constants: Tensor, kept: Mapping[str, Sequence[int]]) -> Tensor:
    """The P-NN consumer conv's output from the removed input channels alone, each the constant map of its
    value at the source's spatial size: ``(C_out kept, *out spatial)``, or its first position where uniform."""
    conv = pruner.wrappers[site.node].module
    weight = conv.weight.index_select(1, removed)
    if consumer is not None and consumer.masked:  # the consumer's P-NN weight: its own masked filters are zero
        weight = weight.index_fill(0, _masked_filters(consumer, kept[consumer.target], weight.device), 0.0)
    spatial = pruner.analysis.node_shapes[site.source][2:]
    maps = constants.reshape(1, -1, *[1] * len(spatial)).expand(1, constants.numel(), *spatial)
    response = _conv(conv, maps, weight, None, 1)[0]
    if consumer is not None and consumer.removes:
        response = response.index_select(0, torch.tensor(list(kept[consumer.target]), dtype=torch.long,
                                                         device=response.device))
    if _uniform_response(conv):
        response = response[(slice(None),) + (slice(0, 1),) * len(spatial)]
    return response
