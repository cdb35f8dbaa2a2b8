"""Depth as an architecture choice: residual blocks that can be skipped, found from the torch.fx graph.

A *skippable block* is an add ``a = branch + shortcut`` (``operator.add``, ``torch.add`` or ``Tensor.add``,
either operand order, no ``alpha``) where

- ``shortcut`` is the block's input itself (a tensor node; a projection shortcut -- a conv / BN of the input --
  is not the input, so such blocks are never skippable),
- ``branch`` is computed from ``shortcut`` (``shortcut`` is an ancestor of ``branch``),
- every node strictly between them (an ancestor of ``branch`` and a descendant of ``shortcut``) is read only
  inside the block: nothing outside the block sees an intermediate of its branch,
- the branch reads no other tensor that depends on the model input (it is a function of ``shortcut`` and of
  parameters; a term that sees the input only through its size, ``pos[:, :x.shape[1]]``, is not a branch),
- ``a`` has the shape of ``shortcut`` (the identity can stand in for the block).

*Skipping* the block replaces every use of ``a`` by ``shortcut``; the branch becomes dead code and is removed,
so a skipped block is the identity. In a post-activation ResNet (``relu(branch + x)``) the ReLU after the add
stays and computes ``relu(x)``, which is ``x`` because ``x`` is itself a ReLU output (or the stem's): the
skipped block is the identity there too. Where an in-place op reads the add (``out += x; relu_(out)``), it
reads a copy of the shortcut instead, which the layers before it may have saved for their backward.

A *stage* is a run of skippable blocks, in graph order, along one uninterrupted residual stream: the shortcut
of each block after the first is reached from the previous block's add through shape-preserving elementwise
nodes only (a ReLU, a dropout, ...). A stage at depth ``d`` keeps its first ``d`` blocks and skips the rest.

Nothing here is model-specific: the shipped ResNets, the WideResNet and MobileNetV3's inverted residuals are
all handled by the same rules.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.fx as fx

from .graph import _ELEMENTWISE_FUNCTIONS, _ELEMENTWISE_METHODS, _ELEMENTWISE_MODULES, GraphAnalysis

__all__ = ["SkippableBlock", "Stage", "find_stages", "skip_blocks", "identity", "is_inplace"]

_ADD_FUNCTIONS = (operator.add, torch.add)

ShapeOf = Callable[[fx.Node], Optional[tuple]]


@dataclass(frozen=True)
class SkippableBlock:
    """One residual block that can be replaced by the identity.

    Attributes:
        add: fx node name of the residual add (its output has the shape of ``shortcut``).
        shortcut: fx node name of the block's input, the add's identity operand.
        branch_nodes: fx node names of the residual branch, in graph order (removed when the block is skipped).
        layers: the wrapped conv / linear / norm calls among ``branch_nodes`` (keys of
            :attr:`GraphAnalysis.layers`), whose FLOPs a skipped block does not cost.
    """

    add: str
    shortcut: str
    branch_nodes: tuple[str, ...]
    layers: tuple[str, ...]


@dataclass(frozen=True)
class Stage:
    """Consecutive skippable blocks on one residual stream; depth ``d`` keeps ``blocks[:d]``.

    ``name``: the blocks' modules' common dotted prefix (``"layer2"``; one block: its module, ``"layer2.1"``),
    or ``"<first block>..<last block>"`` where that prefix is empty or names another stage too.
    """

    name: str
    blocks: tuple[SkippableBlock, ...]

    @property
    def depth(self) -> int:
        """Full depth: the number of skippable blocks."""
        return len(self.blocks)


def _is_residual_add(node: fx.Node) -> bool:
    """``a + b`` of two graph values, as ``operator.add``, ``torch.add`` or ``Tensor.add`` (no ``alpha``)."""
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or \
        (node.op == "call_method" and node.target == "add")
    return is_add and len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)


def _closure(start: fx.Node, step: Callable[[fx.Node], Iterable[fx.Node]]) -> set[fx.Node]:
    """Every node reached from ``start`` by repeating ``step`` (``start`` itself excluded)."""
    seen: set[fx.Node] = set()
    stack = [start]
    while stack:
        for nxt in step(stack.pop()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _is_size_query(node: fx.Node) -> bool:
    """``x.shape`` / ``x.size()`` / ``x.dim()`` / ``x.numel()``: reads a tensor's size, not its values."""
    return (node.op == "call_function" and node.target is getattr) or \
        (node.op == "call_method" and node.target in ("size", "dim", "numel"))


def _value_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs whose values ``node`` reads (size queries left out)."""
    return [a for a in node.all_input_nodes if not _is_size_query(a)]


def _block_of(add: fx.Node, shape_of: ShapeOf) -> Optional[tuple[int, set[fx.Node], set[fx.Node]]]:
    """``(position of the shortcut in add.args, branch nodes, all ancestors of the branch)`` when ``add`` closes
    a skippable block (module docstring), else None. Shapes are compared where ``shape_of`` knows both."""
    if not _is_residual_add(add):
        return None
    for position in (1, 0):
        shortcut, branch = add.args[position], add.args[1 - position]
        if branch is shortcut or shortcut.op == "get_attr":
            continue
        if shortcut not in _closure(branch, _value_inputs):  # reaching it only through its size does not count
            continue
        before = _closure(branch, lambda n: n.all_input_nodes)
        inner = (_closure(shortcut, lambda n: n.users) & before) | {branch}
        if any(user is not add and user not in inner for node in inner for user in node.users):
            return None  # an intermediate of the branch is read outside the block
        outside = {a for node in inner for a in _value_inputs(node)} - inner - {shortcut}
        if any(_reads_the_input(a) for a in outside):
            return None  # the branch also reads a tensor from before the block: it is not f(shortcut)
        out_shape, in_shape = shape_of(add), shape_of(shortcut)
        if out_shape is not None and in_shape is not None and tuple(out_shape) != tuple(in_shape):
            return None
        return position, inner, before
    return None


def _reads_the_input(node: fx.Node) -> bool:
    """Whether ``node``'s value depends on a model input (else it is made from parameters and buffers)."""
    return node.op == "placeholder" or any(n.op == "placeholder" for n in _closure(node, _value_inputs))


def is_inplace(node: fx.Node, modules: dict) -> bool:
    """Whether ``node`` writes into its input (``nn.ReLU(inplace=True)``, ``F.relu(x, inplace=True)``,
    ``x.relu_()``)."""
    if node.op == "call_module":
        return bool(getattr(modules.get(str(node.target)), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).endswith("__")
    return node.op == "call_function" and bool(node.kwargs.get("inplace", False))


def _meta_shape(node: fx.Node) -> Optional[tuple]:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _is_stream_op(node: fx.Node, modules: dict, shapes: dict[str, tuple]) -> bool:
    """A shape-preserving elementwise node of one tensor input (the residual stream passes through it)."""
    if len(node.all_input_nodes) != 1:
        return False
    src = node.all_input_nodes[0]
    if shapes.get(node.name) is None or shapes.get(node.name) != shapes.get(src.name):
        return False
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _ELEMENTWISE_MODULES)
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in _ELEMENTWISE_METHODS


def _block_module(add: fx.Node) -> str:
    """The module whose forward made the residual add (innermost ``nn_module_stack`` entry), else its node name."""
    stack = add.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else add.name


def _stage_names(groups: list[list[fx.Node]]) -> list[str]:
    """Per stage (its adds): the module names' common dotted prefix (one block: its module name), or
    ``"first..last"`` where that prefix is empty or shared with another stage."""
    spans = [[_block_module(a) for a in adds] for adds in groups]
    prefixes = []
    for names in spans:
        common: list[str] = []
        for column in zip(*(n.split(".") for n in names)):
            if len(set(column)) > 1:
                break
            common.append(column[0])
        prefixes.append(".".join(common))
    return [p if p and prefixes.count(p) == 1 else f"{names[0]}..{names[-1]}" for p, names in zip(prefixes, spans)]


def find_stages(analysis: GraphAnalysis) -> list[Stage]:
    """The skippable blocks of ``analysis``'s traced model, grouped into stages (module docstring), in graph
    order. Models without identity residual blocks have no stages."""
    gm = analysis.graph_module
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    modules = dict(gm.named_modules())
    shapes = analysis.node_shapes
    groups: list[list[tuple[fx.Node, SkippableBlock]]] = []
    previous: Optional[fx.Node] = None
    for node in nodes:
        found = _block_of(node, lambda n: shapes.get(n.name))
        if found is None:
            continue
        position, inner, _ = found
        shortcut = node.args[position]
        branch = sorted(inner, key=order.__getitem__)
        block = SkippableBlock(node.name, shortcut.name, tuple(n.name for n in branch),
                               tuple(n.name for n in branch if n.name in analysis.layers))
        source = shortcut
        while source is not previous and _is_stream_op(source, modules, shapes):
            source = source.all_input_nodes[0]
        if previous is not None and source is previous:
            groups[-1].append((node, block))
        else:
            groups.append([(node, block)])
        previous = node
    names = _stage_names([[add for add, _ in group] for group in groups])
    return [Stage(name, tuple(block for _, block in group)) for name, group in zip(names, groups)]


def skip_blocks(gm: fx.GraphModule, adds: Iterable[str]) -> fx.GraphModule:
    """A new GraphModule computing ``gm`` with the skippable blocks closed by the add nodes ``adds`` replaced
    by the identity (each add's uses read its shortcut; the branches are removed as dead code).

    ``gm`` and its graph are not changed. The result shares ``gm``'s submodules and attributes (same
    objects, so parameters, buffers, devices and train / eval modes are shared) but holds only those its
    graph still uses: a state_dict without the skipped blocks' entries. Shapes are checked where the nodes
    carry ``tensor_meta`` (traced graphs of :func:`s2hk.graph.analyze` and the graphs copied from them).

    Raises:
        ValueError: an entry of ``adds`` names no node of ``gm``, or a node that does not close a skippable
            block (a projection shortcut, an intermediate read outside the branch, a non-add ...).
    """
    adds = list(dict.fromkeys(adds))
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    by_name = {n.name: n for n in graph.nodes}
    blocks = []
    for name in adds:
        node = by_name.get(name)
        if node is None:
            raise ValueError(f"skip_blocks: the graph has no node named '{name}'")
        found = _block_of(node, _meta_shape)
        if found is None:
            raise ValueError(f"skip_blocks: '{name}' does not close a skippable residual block (an add of the "
                             "block's input and a branch computed only from it, of the input's shape)")
        blocks.append((node, *found))
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    doomed: set[fx.Node] = set()
    feeders: set[fx.Node] = set()
    modules = dict(gm.named_modules())
    for add, position, inner, before in sorted(blocks, key=lambda b: order[b[0]]):
        # read the shortcut now: an earlier skipped block may have replaced it by its own shortcut
        add.replace_all_uses_with(identity(graph, add, add.args[position], modules))
        doomed |= inner | {add}
        feeders |= before
    for node in reversed(nodes):  # users first; a feeder goes once nothing reads it any more
        if node in doomed or (node in feeders and not node.users and node.op not in ("placeholder", "output")):
            graph.erase_node(node)
    graph.lint()
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__)


def identity(graph: fx.Graph, add: fx.Node, shortcut: fx.Node, modules: dict) -> fx.Node:
    """What stands in for a skipped block's ``add``: its ``shortcut``, or a copy of it where an in-place op
    (``nn.ReLU(inplace=True)`` after ``out += x``) reads the add -- it would otherwise overwrite the shortcut,
    which the layers before it saved for their backward."""
    if not any(is_inplace(user, modules) for user in add.users):
        return shortcut
    with graph.inserting_after(shortcut):
        return graph.call_method("clone", (shortcut,))
