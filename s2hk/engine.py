"""The two-path network: one set of weights, a soft path and a hard path (DESIGN.md, "The engine").

:class:`TwoPathNetwork` traces the user's model, finds its channel groups (:mod:`s2hk.graph`), replaces each
conv / linear / norm call by a two-path wrapper sharing the user's parameters (:mod:`s2hk.layers`) and owns
the mask state: one flat buffer of width-choice logits for all prunable groups, the channels' importance
ranks, and the *hard plan* -- each group's kept width and kept channels -- read from the device once per
refresh. Methods (S2HPruner, CR-SFP, STP) are mask policies and loss routings on top of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numbers
import operator

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from . import masks, ops
from .flops import FlopsPolynomial
from .graph import (ChannelGroup, GraphAnalysis, Layout, LayerSpec, analyze, node_argument, reshape_arguments,
                    set_node_argument)
from .layers import ChannelReshape, ChannelSlice, PathState, Selection, wrap_layer

__all__ = ["TwoPathNetwork", "HardPlan"]

Granularity = Union[int, Mapping[str, int], None]

_DUAL_ROOT = "paths"  # the dual graph's name for graph_module
_DUAL_PATH = "dual"   # state.path during run_dual: no wrapper's forward runs then, and dual() ignores it


@dataclass
class HardPlan:
    """The hard network of one step: per prunable group its width ``k`` and kept channels.

    ``selections[g]`` is ``None`` (all channels), ``k`` (the prefix ``0..k-1``) or the sorted kept channel
    indices (int64 tensor on the model's device).
    """

    widths: list[int]
    selections: list[Selection]


class TensorMove:
    """How one move of the network (``.to``, ``.cuda``, ``.double``, ``to_empty``, a state loaded from another
    device) converts the tensors a pruner keeps besides its parameters and buffers.

    Args:
        device: where the network's tensors are after the move.
        fn: the move's conversion of the network's own tensors (what ``nn.Module._apply`` applies), or None
            for a change of device alone.
    """

    def __init__(self, device: torch.device, fn: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        self.device = device
        self.fn = fn

    def place(self, t: Tensor) -> Tensor:
        """``t`` on the new device with its dtype and values: channel indices (int64) and float64 bookkeeping,
        which a ``.half()`` or ``.to(dtype)`` of the network must not round."""
        if t.device == self.device:
            return t
        if t.is_meta:  # a meta tensor has no values to copy: allocated, as torch's to_empty does for parameters
            return torch.empty_like(t, device=self.device)
        return t.to(self.device)

    def convert(self, t: Tensor) -> Tensor:
        """``t`` as the network will read it: a floating point network input (example inputs, remembered
        batches) converted like the network's own tensors (device and dtype), anything else placed."""
        if self.fn is not None and t.is_floating_point():
            return self.fn(t)
        return self.place(t)


class TwoPathNetwork(nn.Module):
    """A model's soft and hard paths over the same weights.

    Args:
        model: the user's network (its parameters are used in place, not copied).
        example_inputs: a tensor or tuple of tensors for one forward; sets spatial sizes for FLOPs.
        ignore: module or node names to keep dense (their channels are frozen).
        granularity: ``d`` for every group (int), per group name (dict; others use the default), or None:
            the largest ``d`` giving at most ``max_choices`` widths.
        max_choices: the bound on width choices used by the default granularity.
        tau: softmax temperature of the width choices.
        importance: "dynamic" (re-rank channels from filter L1 norms at every refresh) or "frozen" (rank once).
        prune_embedding: also prune channels normalised by a LayerNorm (a transformer's embedding width); see
            :func:`s2hk.graph.analyze`.

    Devices and dtypes: ``.to(device)``, ``.cuda()``, ``.double()``, ``.half()``, ``to_empty`` and the like move
    the user's model (all of it, not only the layers the trace calls), the two-path layers and what the engine
    keeps besides parameters and buffers: pinned channel lists, the hard plan's selections, importance orders,
    the example inputs and the FLOPs polynomial's constants (these not to ``"meta"``, where they would lose their
    values); methods add theirs (:meth:`_move_state`). Channel indices stay int64 and float64 bookkeeping stays
    float64 whatever the dtype. A tensor the user's model and the traced graphs share stays one tensor. The soft
    gates and hard selections prepared for a forward are dropped: :meth:`forward` and the methods'
    ``train_step`` prepare them again, code calling :meth:`run` or :meth:`run_dual` itself calls
    :meth:`prepare_soft` / :meth:`prepare_hard` after a move. Moving the user's model alone (``model.to(...)``)
    leaves the pruner behind: the next forward says so. As with any torch module, build optimisers after
    moving: one built before keeps its state on the old device, and where a move makes new parameter objects
    (to or from ``"meta"``, or with ``torch.__future__.set_overwrite_module_params_on_conversion(True)``) it
    holds the old ones.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, *, ignore: Iterable[str] = (),
                 granularity: Granularity = None, max_choices: int = 32, tau: float = 1.0,
                 importance: str = "dynamic", prune_embedding: bool = False) -> None:
        super().__init__()
        if importance not in ("dynamic", "frozen"):
            raise ValueError(f"importance must be 'dynamic' or 'frozen', got {importance!r}")
        object.__setattr__(self, "model", model)  # the user's module: referenced, not registered twice
        self.example_inputs = example_inputs
        self.tau = float(tau)
        self.importance_mode = importance
        self.analysis: GraphAnalysis = analyze(model, example_inputs, ignore, prune_embedding)
        self.groups: list[ChannelGroup] = self.analysis.groups
        self.state = PathState()
        self.graph_module, self.wrappers = self._build_two_path_module()
        # the layer call whose weight tells where the user's model is (see _check_placement)
        self._placement_layer = next((name for name, w in self.wrappers.items()
                                      if isinstance(getattr(w.module, "weight", None), Tensor)), None)
        self.prunable: list[ChannelGroup] = [g for g in self.groups if g.prunable]
        self._group_by_name = {g.name: g for g in self.groups}
        self._slot = {g.index: i for i, g in enumerate(self.prunable)}  # group index -> prunable slot
        self.gate_layout = masks.GateLayout(
            tuple(g.channels for g in self.prunable),
            tuple(self._granularity(g, granularity, max_choices) for g in self.prunable))
        init = [masks.max_init_logits(c, d, self.tau)
                for c, d in zip(self.gate_layout.channels, self.gate_layout.granularities)]
        device = _device_of(model)
        self.mask_logits = nn.Parameter(torch.cat(init).to(device) if init else torch.zeros(0, device=device))
        self.register_buffer("ranks", torch.zeros(sum(self.gate_layout.channels), dtype=torch.long, device=device))
        self._orders: list[Tensor] = []
        self._channel_group: Optional[Tensor] = None
        self._channel_position: Optional[Tensor] = None
        self._ranked = False
        self._keep_loaded_ranks = False  # ranks were loaded (_orders_from_ranks): the next refresh keeps them
        self.flops_polynomial = FlopsPolynomial(self.analysis, model, example_inputs)
        self._pinned: dict[int, Union[int, Tensor]] = {}
        self._pinned_channels: dict[int, list[int]] = {}  # host copies of the explicit lists: read without a sync
        self._pinned_prefix: set[int] = set()
        self.plan = HardPlan([], [])
        self.refresh_plan()
        self._dual = _DualCache()  # run_dual's graph module, built on first use

    # ------------------------------------------------------------------ construction
    def _build_two_path_module(self) -> tuple[fx.GraphModule, dict[str, nn.Module]]:
        source = self.analysis.graph_module
        modules = dict(source.named_modules())
        graph = fx.Graph()
        value_map: dict = {}
        out = graph.graph_copy(source.graph, value_map)
        graph.output(out)
        root: dict[str, Any] = {}
        wrappers: dict[str, nn.Module] = {}
        used_targets: set[str] = set()
        self._insert_path_ops(graph, root)
        for node in graph.nodes:
            if node.op == "call_module" and node.name not in self._path_op_nodes:
                target = str(node.target)
                spec = self.analysis.layers.get(node.name)
                if spec is None:
                    root[target] = modules[target]
                    continue
                new_target = target if target not in used_targets else f"{target}__{node.name}"
                used_targets.add(target)
                wrapper = wrap_layer(modules[target], spec, self.state)
                root[new_target] = wrapper
                wrappers[node.name] = wrapper
                node.target = new_target
            elif node.op == "get_attr":
                root[str(node.target)] = _fetch(source, str(node.target))
        return fx.GraphModule(root, graph, class_name="TwoPathGraph"), wrappers

    def _insert_path_ops(self, graph: fx.Graph, root: dict[str, Any]) -> None:
        """Replace the reshapes whose sizes count channels by :class:`~s2hk.layers.ChannelReshape` calls and put
        a :class:`~s2hk.layers.ChannelSlice` between every constant and the operation combining it with
        channels (the analysis's ``reshapes`` and ``constant_slices``)."""
        nodes = {n.name: n for n in graph.nodes}
        self._path_op_nodes: set[str] = set()
        for spec in self.analysis.reshapes.values():
            node = nodes[spec.node]
            x, sizes, packed = reshape_arguments(node)
            target = f"s2hk_reshape__{node.name}"
            root[target] = ChannelReshape("view" if node.target == "view" else "reshape", spec.dims, self.state,
                                          packed)
            with graph.inserting_before(node):
                new = graph.call_module(target, (x, *sizes))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            self._path_op_nodes.add(new.name)
        for i, spec in enumerate(self.analysis.constant_slices):
            node = nodes[spec.node]
            constant = node_argument(node, spec.arg_path)
            target = f"s2hk_slice__{node.name}_{i}"
            root[target] = ChannelSlice(spec.dim, spec.layout, spec.gate, self.state)
            with graph.inserting_before(node):
                sliced = graph.call_module(target, (constant,))
            set_node_argument(node, spec.arg_path, sliced)
            self._path_op_nodes.add(sliced.name)

    def _build_dual_module(self) -> fx.GraphModule:
        """The traced graph with every node duplicated into a soft and a hard copy, except placeholders and
        attributes (shared by both) and wrapped layer calls, which become one ``wrapper.dual(x_soft, x_hard)``
        call; it returns ``(soft output, hard output)``. Its modules and attributes are those of
        :attr:`graph_module`, reached through it at run time (``paths.<target>``), so devices and train / eval
        modes are shared."""
        graph = fx.Graph()
        soft: dict[fx.Node, fx.Node] = {}
        hard: dict[fx.Node, fx.Node] = {}

        def prefixed(target: Any) -> str:
            return f"{_DUAL_ROOT}.{target}"

        def duplicate(node: fx.Node, env: dict, path: str) -> fx.Node:
            target = prefixed(node.target) if node.op == "call_module" else node.target
            new = graph.create_node(node.op, target, fx.map_arg(node.args, env.__getitem__),
                                    fx.map_arg(node.kwargs, env.__getitem__), name=f"{node.name}_{path}",
                                    type_expr=node.type)
            new.meta = dict(node.meta)
            return new

        for node in self.graph_module.graph.nodes:
            if node.op == "placeholder":
                soft[node] = hard[node] = graph.node_copy(node)
            elif node.op == "get_attr":
                shared = graph.node_copy(node)
                shared.target = prefixed(node.target)
                soft[node] = hard[node] = shared
            elif node.op == "output":
                graph.output((fx.map_arg(node.args[0], soft.__getitem__),
                              fx.map_arg(node.args[0], hard.__getitem__)))
            elif node.op == "call_module" and node.name in self._path_op_nodes:
                op = graph.create_node("get_attr", prefixed(node.target), name=f"{node.name}_op")
                for env, path in ((soft, "soft"), (hard, "hard")):
                    env[node] = graph.create_node("call_method", "apply",
                                                  (op, path, *fx.map_arg(node.args, env.__getitem__)),
                                                  name=f"{node.name}_{path}")
            elif node.op == "call_module" and node.name in self.wrappers:
                if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
                    raise NotImplementedError(f"run_dual: layer call '{node.name}' takes {node.args} {node.kwargs}; "
                                              "only calls on one tensor can run both paths at once")
                (x,) = node.args
                layer = graph.create_node("get_attr", prefixed(node.target), name=f"{node.name}_layer")
                both = graph.create_node("call_method", "dual", (layer, soft[x], hard[x]), name=f"{node.name}_dual")
                soft[node] = graph.create_node("call_function", operator.getitem, (both, 0), name=f"{node.name}_soft")
                hard[node] = graph.create_node("call_function", operator.getitem, (both, 1), name=f"{node.name}_hard")
            else:
                soft[node] = duplicate(node, soft, "soft")
                hard[node] = duplicate(node, hard, "hard")
        module = fx.GraphModule(nn.Module(), fx.Graph(), class_name="DualPathGraph")
        setattr(module, _DUAL_ROOT, self.graph_module)
        module.graph = graph  # compiles the code; targets resolve through graph_module at run time
        return module

    @property
    def dual_module(self) -> fx.GraphModule:
        """The dual-traversal graph module of :meth:`run_dual` (built once, on first use)."""
        cache = self._dual
        if cache.module is None:
            cache.module = self._build_dual_module()
            cache.layouts = self._hard_layouts()
            cache.gated = self._gated_layouts()
        return cache.module

    def _granularity(self, group: ChannelGroup, granularity: Granularity, max_choices: int) -> int:
        if isinstance(granularity, int):
            d = granularity
        elif isinstance(granularity, Mapping) and group.name in granularity:
            d = int(granularity[group.name])
        else:
            return masks.default_granularity(group.channels, max_choices)
        if d < 1 or group.channels % d:
            raise ValueError(f"granularity {d} does not divide the {group.channels} channels of group "
                             f"'{group.name}'")
        return d

    # ------------------------------------------------------------------ devices and dtypes
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "TwoPathNetwork":
        """What ``.to``, ``.cuda``, ``.double``, ``to_empty`` ... run (see the class docstring): ``fn`` applied
        to the parameters and buffers of the user's model, of the two-path modules and of the traced graph the
        export reads, then :meth:`_move_state`."""
        if recurse:
            self._apply_to_modules(fn)
        else:
            super()._apply(fn, recurse=False)
        self._move_state(TensorMove(self.ranks.device, fn))
        return self

    def _apply_to_modules(self, fn: Callable[[Tensor], Tensor]) -> None:
        """``fn`` applied once to every module the pruner reaches: the user's model through its own ``_apply``
        (its overrides run), then each module of the two-path network and of the analysis's traced graph that is
        not the user's. A parameter or buffer held by several modules (the traced graphs' attributes of the
        user's tensors, fx's tensor constants) is converted once, by its first holder, the user's model coming
        first; the other holders then refer to the result, as before the move. So does a plain attribute
        holding such a tensor (fx's tracer leaves the tensor constants it finds on the user's model)."""
        model_modules = list(self.model.modules())
        seen = {id(m) for m in model_modules}
        own: list[nn.Module] = []
        for tree in (self, self.analysis.graph_module):
            for m in tree.modules():
                if id(m) not in seen:
                    seen.add(id(m))
                    own.append(m)
        own_ids = {id(m) for m in own}
        holders: dict[int, tuple[nn.Module, str, str]] = {}
        mirrors: list[tuple[nn.Module, str, str, tuple[nn.Module, str, str]]] = []
        for m in model_modules + own:
            for kind in ("_parameters", "_buffers"):
                for key, t in getattr(m, kind).items():
                    if t is None:
                        continue
                    if id(t) not in holders:
                        holders[id(t)] = (m, kind, key)
                    elif id(m) in own_ids:  # ties inside the user's model are torch's to handle, as without us
                        mirrors.append((m, kind, key, holders[id(t)]))
        for m in model_modules + own:
            mirrors += [(m, "__dict__", key, holders[id(t)]) for key, t in vars(m).items()
                        if isinstance(t, Tensor) and id(t) in holders]
        for m, kind, key, _ in mirrors:
            getattr(m, kind)[key] = None  # _apply skips None entries
        try:
            self.model._apply(fn)
            for m in own:
                if m is self:
                    super()._apply(fn, recurse=False)
                else:
                    m._apply(fn, recurse=False)
        finally:
            for m, kind, key, (holder, holder_kind, holder_key) in mirrors:
                getattr(m, kind)[key] = getattr(holder, holder_kind)[holder_key]

    def _move_state(self, move: TensorMove) -> None:
        """Move what the engine keeps besides parameters and buffers; methods with more such state extend it.

        Pinned channel lists are made again on the new device from their host copies, so they keep their
        channels even through ``"meta"``; the plan's selections of pinned groups are those lists, its others
        and the importance orders are placed (:meth:`TensorMove.place`), the example inputs converted like the
        network. The cached channel -> group maps are dropped (the next refresh rebuilds them on the new device),
        and so are the path states prepared for a forward: their gates hang on the old logits' autograd graph."""
        old = self._pinned
        self._pinned = {gi: self._channel_tensor(self._pinned_channels[gi], move.device) if isinstance(pin, Tensor)
                        else pin for gi, pin in old.items()}
        remade = {id(old[gi]): pin for gi, pin in self._pinned.items() if isinstance(pin, Tensor)}
        self.plan = HardPlan(list(self.plan.widths),
                             [remade[id(s)] if id(s) in remade else move.place(s) if isinstance(s, Tensor) else s
                              for s in self.plan.selections])
        self._orders = [move.place(order) for order in self._orders]
        self._channel_group = self._channel_position = None
        self.state.gates, self.state.selections = {}, {}
        self.example_inputs = _map_tensors(self.example_inputs, move.convert)
        self._move_flops_constants(move)

    def _move_flops_constants(self, move: TensorMove) -> None:
        """The FLOPs polynomial's float64 constants onto the new device, where the widths it is evaluated at
        live (no copy per evaluation); but not to ``"meta"``: a meta tensor keeps no values, and these could not
        be made again when the network comes back from it (``to_empty``, then its weights loaded)."""
        if move.device.type == "meta":
            return
        constants = vars(self.flops_polynomial)
        for name, value in constants.items():
            constants[name] = _map_tensors(value, move.place)

    def _check_placement(self) -> None:
        """A clear error where the user's model was moved without its pruner (``model.to(...)``), which leaves
        the logits, ranks and channel lists behind; the forward would fail later on mixed devices."""
        if self._placement_layer is None:
            return
        weight = self.wrappers[self._placement_layer].module.weight
        if weight.device != self.ranks.device:
            raise RuntimeError(f"the model's weights are on {weight.device} but the pruner's state is on "
                               f"{self.ranks.device}: move the pruner, not only its model (pruner.to(device) "
                               "moves both)")

    def _load_move(self) -> TensorMove:
        """How a loaded state's tensors (saved on any device, in any dtype) become this network's: on its device,
        network inputs in the dtype of its weights."""
        device = self.ranks.device
        dtype = next((p.dtype for p in self.weight_parameters() if p.is_floating_point()), None)
        return TensorMove(device, lambda t: t.to(device, dtype))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, then the engine's state follows the loaded tensors: moved where
        ``assign=True`` put them (a state from another device), the importance order taken from the loaded ranks
        and the hard plan refreshed from the loaded logits."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._move_state(TensorMove(self.ranks.device))
        self._orders_from_ranks()
        if not self.ranks.is_meta:  # a meta network has no values to plan from; its plan waits for real ones
            self.refresh_plan()
        return result

    def adopt_ranks(self) -> None:
        """Take :attr:`ranks` as written from outside (a ranking broadcast from another process): the importance
        orders follow them and the hard plan is made again from them and the current logits, without
        re-ranking."""
        self._orders_from_ranks()
        self.refresh_plan()

    def _orders_from_ranks(self) -> None:
        """Each group's channels in importance order, from :attr:`ranks` (a loaded ranking), which the next
        :meth:`refresh_plan` keeps instead of re-ranking: a checkpoint's plan is made again from the ranks it was
        made from, not from the loaded weights, whose ranking can differ (after warm-up steps, which train the
        weights without refreshing the plan). Dynamic importance re-ranks from the refresh after it."""
        co = self.gate_layout.channel_offsets
        self._orders = [torch.argsort(self.ranks[co[i]:co[i + 1]]) for i in range(len(self.prunable))]
        self._ranked = True
        self._keep_loaded_ranks = True

    # ------------------------------------------------------------------ introspection
    def group(self, name: str) -> ChannelGroup:
        try:
            return self._group_by_name[name]
        except KeyError:
            raise KeyError(f"no channel group named '{name}'; groups: {sorted(self._group_by_name)}") from None

    def weight_parameters(self) -> list[nn.Parameter]:
        """The network's own parameters (what the weight optimiser trains), without the mask logits."""
        seen: set[int] = set()
        out = []
        for p in self.graph_module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def mask_parameters(self) -> list[nn.Parameter]:
        """The width-choice logits of all prunable groups, as one flat parameter."""
        return [self.mask_logits]

    def group_logits(self, slot: int) -> Tensor:
        lo = self.gate_layout.logit_offsets
        return self.mask_logits[lo[slot]:lo[slot + 1]]

    def group_ranks(self, slot: int) -> Tensor:
        co = self.gate_layout.channel_offsets
        return self.ranks[co[slot]:co[slot + 1]]

    # ------------------------------------------------------------------ masks
    def producer_weights(self) -> tuple[list[Tensor], list[int]]:
        """Each prunable group's producing filters: ``(weights, slots)`` with ``weights[i]`` of shape
        ``(C_g, ...)`` (a view of a conv/linear weight's rows) producing group ``prunable[slots[i]]``."""
        weights, slots = [], []
        for spec in self.analysis.layers.values():
            if spec.kind == "norm":
                continue
            weight = self.wrappers[spec.node].module.weight
            offset = 0
            for seg in spec.out_layout:
                slot = self._slot.get(seg.group)
                if slot is not None:  # a channel of several rows (an attention head) is one filter
                    weights.append(weight[offset:offset + seg.size * seg.repeat].reshape(seg.size, -1))
                    slots.append(slot)
                offset += seg.size * seg.repeat
        return weights, slots

    def update_ranks(self) -> None:
        """Rank every prunable group's channels by importance (group-mean filter L1 norm, descending)."""
        if not self.prunable:
            self._ranked = True
            return
        weights, slots = self.producer_weights()
        result = ops.group_importance(weights, slots)
        co = self.gate_layout.channel_offsets
        with torch.no_grad():
            self.ranks.copy_(result.ranks)
        self._orders = [result.order[co[i]:co[i + 1]] for i in range(len(self.prunable))]
        self._ranked = True

    def gates(self) -> tuple[Tensor, Tensor]:
        """Soft keep-probabilities of all prunable channels ``(sum C,)`` and straight-through hard widths of
        all groups ``(G,)`` (float64; frozen groups at full width), differentiable in the mask logits."""
        gates = ops.gates(self.mask_logits, self.ranks, self.gate_layout, self.tau)
        keep, hard = gates.keep_probs, gates.hard_widths
        widths = torch.tensor([float(g.channels) for g in self.groups], dtype=torch.float64,
                              device=self.mask_logits.device)
        if self.prunable:
            slots = torch.tensor([g.index for g in self.prunable], device=widths.device)
            pinned = [self._slot[gi] for gi in self._pinned]
            if pinned:  # a pinned architecture has constant widths: no gradient reaches the logits
                hard = hard.clone()
                for slot, gi in zip(pinned, self._pinned):
                    hard[slot] = float(self.plan.widths[slot])
            widths = widths.index_put((slots,), hard)
        return keep, widths

    def _prefix_counts(self, widths: Tensor) -> Tensor:
        """Per group, how many of the channels at positions ``0..k-1`` are kept (``== k``: a prefix), for all
        groups in one pass; float64 ``(G,)``."""
        if self._channel_group is None:
            channels = torch.tensor(self.gate_layout.channels, device=self.ranks.device)
            self._channel_group = torch.repeat_interleave(torch.arange(len(self.prunable), device=self.ranks.device),
                                                          channels)
            starts = torch.tensor(self.gate_layout.channel_offsets[:-1], device=self.ranks.device)
            self._channel_position = torch.arange(self.ranks.numel(), device=self.ranks.device) - \
                starts[self._channel_group]
        k = widths.to(torch.float64)[self._channel_group]
        kept_in_prefix = (self.ranks < k) & (self._channel_position < k)
        return torch.zeros(len(self.prunable), dtype=torch.float64, device=self.ranks.device).index_add_(
            0, self._channel_group, kept_in_prefix.to(torch.float64))

    def refresh_plan(self, extra: Optional[Tensor] = None) -> list[float]:
        """Recompute the hard network from the current logits (and importance) with one host read for all
        groups; ``extra`` (a 1-D tensor, e.g. a step's metrics) rides along in the same read and is returned.

        Dynamic importance re-ranks the channels first, except in the first refresh after a ranking was loaded
        (:meth:`load_state_dict`, a method's ``load_pruning_state``), which plans from the loaded ranks."""
        if (self.importance_mode == "dynamic" and not self._keep_loaded_ranks) or not self._ranked:
            self.update_ranks()
        self._keep_loaded_ranks = False
        with torch.no_grad():
            hard = ops.gates(self.mask_logits.detach(), self.ranks, self.gate_layout, self.tau).hard_widths.clone()
            pinned_sets: dict[int, Tensor] = {}
            for gi, pin in self._pinned.items():
                slot = self._slot[gi]
                if isinstance(pin, int):
                    hard[slot] = pin
                else:
                    hard[slot] = pin.numel()
                    pinned_sets[slot] = pin
            flags = self._prefix_counts(hard) if self.prunable else None
            parts = [hard.detach(), flags] if flags is not None else []
            if extra is not None:
                parts.append(extra.detach().to(torch.float64).to(self.ranks.device))
            host = torch.cat(parts).tolist() if parts else []
        n = len(self.prunable)
        widths = [int(round(v)) for v in host[:n]]
        selections: list[Selection] = []
        for slot, (group, k) in enumerate(zip(self.prunable, widths)):
            if slot in pinned_sets:
                sel: Selection = k if group.index in self._pinned_prefix else pinned_sets[slot]
            elif k >= group.channels:
                sel = None
            elif int(round(host[n + slot])) == k:
                sel = k
            else:
                sel = self._orders[slot][:k].sort().values
            selections.append(None if isinstance(sel, int) and sel >= group.channels else sel)
        self.plan = HardPlan(widths, selections)
        return host[2 * n:]

    # ------------------------------------------------------------------ pinning
    def hard_widths(self) -> dict[str, int]:
        """Current hard width of every prunable group, by group name."""
        return {g.name: k for g, k in zip(self.prunable, self.plan.widths)}

    def set_hard_widths(self, widths: Optional[Mapping[str, Union[int, Sequence[int]]]]) -> None:
        """Pin the hard architecture: per group name a width (the most important channels are kept) or an
        explicit list of channel indices. ``None`` unpins every group (widths follow the logits again)."""
        if widths is None:
            self.set_pins({})
            return
        pins: dict[int, Union[int, list[int]]] = {}
        for name, value in widths.items():
            group = self.group(name)
            if not group.prunable:
                raise ValueError(f"group '{name}' is frozen ({'; '.join(group.frozen_reasons)}) and cannot be "
                                 "given a width")
            if isinstance(value, Tensor) and value.dim() == 0:
                value = int(value)
            if isinstance(value, numbers.Integral):
                value = int(value)
                if not 1 <= value <= group.channels:
                    raise ValueError(f"width {value} for group '{name}' is outside 1..{group.channels}")
                pins[group.index] = value
            else:
                idx = [int(i) for i in value]
                if not idx or len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= group.channels:
                    raise ValueError(f"channels for group '{name}' must be distinct indices in "
                                     f"0..{group.channels - 1}, got {list(value)}")
                pins[group.index] = sorted(idx)
        kept = {gi: pin for gi, pin in self.pins().items() if gi not in pins}
        self.set_pins({**kept, **pins})

    def pins(self) -> dict[int, Union[int, list[int]]]:
        """The current pins as :meth:`set_pins` takes them (by group index: a width, or the sorted channel list),
        from host copies: no device read."""
        return {gi: pin if isinstance(pin, int) else list(self._pinned_channels[gi])
                for gi, pin in self._pinned.items()}

    def set_pins(self, pins: Mapping[int, Union[int, Sequence[int]]]) -> None:
        """Replace every pin (by group index: a width, or sorted channel indices) and refresh the plan.

        Whether an explicit channel list is the prefix ``0..k-1`` is decided here, once, on the host, so the
        per-step plan refresh needs no further host reads."""
        self._pinned = {}
        self._pinned_channels = {}
        self._pinned_prefix = set()
        for gi, pin in pins.items():
            if isinstance(pin, int):
                self._pinned[gi] = pin
                continue
            channels = [int(c) for c in pin]
            self._pinned_channels[gi] = channels
            self._pinned[gi] = self._channel_tensor(channels, self.ranks.device)
            if channels == list(range(len(channels))):
                self._pinned_prefix.add(gi)
        self.refresh_plan()

    @staticmethod
    def _channel_tensor(channels: Sequence[int], device: torch.device) -> Tensor:
        """Channel indices as the hard path reads them: int64 on ``device``."""
        return torch.tensor(channels, dtype=torch.long, device=device)

    # ------------------------------------------------------------------ forward
    def _layout_gate(self, layout: Layout, keep: Tensor) -> Tensor:
        co = self.gate_layout.channel_offsets
        parts = []
        for seg in layout:
            slot = self._slot.get(seg.group)
            if slot is None:
                parts.append(torch.ones(seg.size * seg.repeat, dtype=keep.dtype, device=keep.device))
            elif seg.repeat == 1:
                parts.append(keep[co[slot]:co[slot + 1]])
            else:  # every position of a channel (an attention head's rows) carries its keep-probability
                parts.append(keep[co[slot]:co[slot + 1]].repeat_interleave(seg.repeat))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _group_selection(self, group: int) -> Selection:
        slot = self._slot.get(group)
        return None if slot is None else self.plan.selections[slot]

    def _layout_selection(self, layout: Layout) -> Selection:
        sels = [self._group_selection(seg.group) for seg in layout]
        if all(s is None for s in sels):
            return None
        if len(layout) == 1:
            seg, sel = layout[0], sels[0]
            if seg.repeat == 1 or isinstance(sel, int):
                return sel * seg.repeat if isinstance(sel, int) else sel
        device = self.ranks.device
        parts, offset = [], 0
        for seg, sel in zip(layout, sels):
            if sel is None:
                idx = torch.arange(seg.size, device=device)
            elif isinstance(sel, int):
                idx = torch.arange(sel, device=device)
            else:
                idx = sel
            if seg.repeat > 1:
                idx = (idx[:, None] * seg.repeat + torch.arange(seg.repeat, device=device)).flatten()
            parts.append(idx + offset)
            offset += seg.size * seg.repeat
        return torch.cat(parts)

    def prepare_soft(self, keep: Tensor) -> None:
        """Fill the path state with the soft gates of every gated layout."""
        self._check_placement()
        self.state.gates = {layout: self._layout_gate(layout, keep) for layout in self._gated_layouts()}

    def _gated_layouts(self) -> tuple:
        """Every layout whose soft gate a layer or a path op reads."""
        layouts = [spec.out_layout for spec in self.analysis.layers.values() if spec.gate]
        layouts += [spec.layout for spec in self.analysis.constant_slices if spec.gate]
        return tuple(dict.fromkeys(layouts))

    def prepare_hard(self) -> None:
        """Fill the path state with the hard plan's channel selections of every layout."""
        self._check_placement()
        self.state.selections = {layout: self._layout_selection(layout) for layout in self._hard_layouts()}

    def _hard_layouts(self) -> tuple:
        """Every layout whose hard-path selection a layer or a path op reads."""
        a = self.analysis
        layouts = [layout for spec in a.layers.values() for layout in (spec.in_layout, spec.out_layout)]
        layouts += [d for spec in a.reshapes.values() for d in spec.dims if isinstance(d, tuple)]
        layouts += [spec.layout for spec in a.constant_slices]
        return tuple(dict.fromkeys(layouts))

    def run(self, path: str, *inputs: Any) -> Any:
        """Run the traced network on the path whose state was prepared."""
        self.state.path = path
        try:
            return self.graph_module(*inputs)
        finally:
            self.state.path = "dense"

    def run_dual(self, *inputs: Any) -> tuple[Any, Any]:
        """Run the soft and the hard path in one traversal of the network: ``(soft output, hard output)``.

        Both path states must be prepared first (:meth:`prepare_soft` and :meth:`prepare_hard`). Each layer
        sees both paths' inputs at once (:meth:`s2hk.layers.GatedConv.dual` and the like), so a fused dual-path
        kernel can compute them in one launch; with the PyTorch implementations the results, gradients and
        running-statistic updates are those of ``run("soft", ...)`` followed by ``run("hard", ...)``. Random
        ops (dropout) draw per node, soft copy first: with more than one of them the draws are interleaved
        differently than in two separate runs.
        """
        module, cache, state = self.dual_module, self._dual, self.state
        if not all(layout in state.selections for layout in cache.layouts) or \
                not all(layout in state.gates for layout in cache.gated):
            raise RuntimeError("run_dual needs both paths prepared first: prepare_soft(keep) and prepare_hard()")
        state.path = _DUAL_PATH
        try:
            return module(*inputs)
        finally:
            state.path = "dense"

    def forward(self, *inputs: Any, path: str = "hard") -> Any:
        """Logits of the ``"soft"``, ``"hard"`` or ``"dense"`` path for ``inputs``."""
        if path == "soft":
            keep, _ = self.gates()
            self.prepare_soft(keep)
        elif path == "hard":
            self.prepare_hard()
        elif path != "dense":
            raise ValueError(f"path must be 'soft', 'hard' or 'dense', got {path!r}")
        return self.run(path, *inputs)

    # ------------------------------------------------------------------ FLOPs
    def all_widths(self, widths: Optional[Sequence[int]] = None) -> list[int]:
        """Width of every group, indexed like :attr:`groups`: the prunable ones at ``widths`` (in the order of
        :attr:`prunable`; default: the hard plan's), the frozen ones at full width."""
        out = [g.channels for g in self.groups]
        for g, k in zip(self.prunable, self.plan.widths if widths is None else widths):
            out[g.index] = int(k)
        return out

    def flops(self, kind: str = "hard") -> int:
        """FLOPs (2 x MACs) of the ``"full"`` (dense) network, or of the ``"hard"`` network at the current
        widths; ``"soft"`` is the regulariser's differentiable count, which by construction equals the hard
        network's (ALGORITHMS.md §1)."""
        if kind == "full":
            return self.flops_polynomial.dense_flops
        if kind == "hard":
            return self.flops_polynomial.flops_at(self.all_widths())
        if kind == "soft":
            with torch.no_grad():
                _, widths = self.gates()
                return int(round(float(self.flops_polynomial(widths))))
        raise ValueError(f"kind must be 'full', 'soft' or 'hard', got {kind!r}")

    # ------------------------------------------------------------------ export
    def export(self) -> fx.GraphModule:
        """The hard network as a plain PyTorch module (a ``torch.fx.GraphModule`` of standard layers with the
        kept channels only, hard-path BN statistics), in eval mode; see :mod:`s2hk.export`."""
        from .export import export_hard_network

        return export_hard_network(self)

    @torch.no_grad()
    def recalibrate_norms(self, batches: Iterable, num_batches: int, paths: Sequence[str]) -> int:
        """Re-estimate the BatchNorm running statistics that each of ``paths`` evaluates with, as the plain
        average over up to ``num_batches`` batches (train mode, no gradient): "soft" or "dense" (one of them:
        they share the model's own statistics), and "hard" (the hard path's). Statistics an EMA gathered while
        the network changed -- the gates falling, the kept channels moving -- belong to no network; evaluating
        with them can put an accurate network at chance. ``batches`` yields ``(x, ...)``; returns the number of
        batches used (0 leaves every statistic as it was)."""
        if len([p for p in paths if p in ("soft", "dense")]) > 1:
            raise ValueError(f"the soft and dense paths share their statistics: re-estimate one of them, got {paths}")
        if num_batches <= 0:
            return 0
        hard = [w for w in self.wrappers.values() if getattr(w, "hard_running_mean", None) is not None]
        modules = list(dict.fromkeys(w.module for w in hard))  # a layer called twice has two wrappers
        saved = [(m, m.momentum) for m in modules]
        was_training = self.training
        self.train()
        try:
            if "hard" in paths:
                for w in hard:
                    w.hard_running_mean.zero_()
                    w.hard_running_var.fill_(1.0)
                    w.hard_num_batches_tracked.zero_()
            if any(p in ("soft", "dense") for p in paths):
                for m in modules:
                    m.reset_running_stats()
            for m, _ in saved:
                m.momentum = None  # cumulative average
            if "soft" in paths:
                keep, _ = self.gates()
                self.prepare_soft(keep)
            if "hard" in paths:
                self.prepare_hard()
            used = 0
            device = self.mask_logits.device
            for batch in batches:
                if used >= num_batches:
                    break
                x = batch[0]
                x = x[0] if isinstance(x, (tuple, list)) else x
                for path in paths:
                    self.run(path, x.to(device))
                used += 1
        finally:
            for m, momentum in saved:
                m.momentum = momentum
            self.train(was_training)
        return used

    def hard_norm_state(self) -> dict[str, dict[str, Tensor]]:
        """Copies of the hard path's BatchNorm statistics (``hard_running_mean`` / ``_var`` /
        ``_num_batches_tracked``) of every norm call that tracks them, by node name: part of a pruning state."""
        return {name: {k: v.detach().clone() for k, v in w.state_dict().items() if k.startswith("hard_")}
                for name, w in self.wrappers.items() if getattr(w, "hard_running_mean", None) is not None}

    def hard_norm_writes(self, saved: Mapping[str, Mapping[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """``(buffer, saved value)`` pairs restoring a :meth:`hard_norm_state`, checked first: a layer call this
        network does not have, or a shape that differs, is a ValueError naming it. Nothing is written here, so a
        caller can check everything it restores before copying any of it."""
        writes = []
        for name, buffers in saved.items():
            if name not in self.wrappers:
                raise ValueError(f"pruning state has hard BN statistics for unknown layer call '{name}'")
            for key, value in buffers.items():
                current = getattr(self.wrappers[name], key)
                if tuple(current.shape) != tuple(value.shape):
                    raise ValueError(f"pruning state entry '{name}.{key}' has shape {tuple(value.shape)}, expected "
                                     f"{tuple(current.shape)}")
                writes.append((current, value))
        return writes

    def skipped_blocks(self) -> list[tuple[str, str]]:
        """``(add, shortcut)`` node pairs of residual blocks the hard network skips (none here; depth-searching
        methods override it): the export replaces each add by its shortcut and drops the block's layers."""
        return []

    def named_layer_selections(self) -> dict[str, tuple[Selection, Selection, LayerSpec]]:
        """For every wrapped layer call: (input selection, output selection, spec), by node name."""
        self.prepare_hard()
        sel = self.state.selections
        return {name: (sel[spec.in_layout], sel[spec.out_layout], spec)
                for name, spec in self.analysis.layers.items()}


class _DualCache:
    """Holds run_dual's graph module and the layouts it reads. A copy (deepcopy, pickle) starts empty and is
    rebuilt on first use, over the copy's own graph module."""

    def __init__(self) -> None:
        self.module: Optional[fx.GraphModule] = None
        self.layouts: tuple = ()
        self.gated: tuple = ()

    def __deepcopy__(self, memo: dict) -> "_DualCache":
        return _DualCache()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def _fetch(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it, through nested dicts, lists and tuples (a container
    holding no tensor is returned as it is)."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, dict):
        mapped = {k: _map_tensors(v, fn) for k, v in value.items()}
        return value if all(mapped[k] is v for k, v in value.items()) else type(value)(mapped)
    if isinstance(value, (list, tuple)):
        mapped = [_map_tensors(v, fn) for v in value]
        if all(a is b for a, b in zip(mapped, value)):
            return value
        return type(value)(*mapped) if hasattr(value, "_fields") else type(value)(mapped)
    return value


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")

