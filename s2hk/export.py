"""Export of the hard network as a plain, physically smaller PyTorch model, and its save/load.

The exported model is a ``torch.fx.GraphModule`` over standard ``torch.nn`` layers (no s2hk type inside it):
the traced graph of the user's model with every conv / linear / norm replaced by a narrow copy holding only
the kept channels (and the hard path's BatchNorm statistics). Its module names are the user's, so its
``state_dict`` keys are the dense model's keys.

Saving writes ``model.pt`` (a plain ``state_dict``, loadable with ``weights_only=True``) and
``architecture.json`` (each layer's kept shape and kept channel indices, the model's registry name when it is
one of :mod:`s2hk.models`, the FLOPs, and the SHA-256 of ``model.pt``), each atomically. Loading rebuilds the
dense model, traces it and narrows its layers from the JSON -- no class is ever unpickled -- after checking
the JSON's schema (:func:`read_architecture`), every entry against the dense model's layer, the weights'
checksum, and every weight's shape against the architecture; the rebuilt model must then run on the saved
example input. Each refusal is a ValueError naming the file and the entry.
"""
from __future__ import annotations

import hashlib
import io
import json
import operator
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from .atomic import atomic_write
from .depth import identity
from .graph import layout_width, node_argument, reshape_arguments, set_node_argument, trace
from .layers import GatedNorm, Selection, count_selected, select

if TYPE_CHECKING:
    from .engine import TwoPathNetwork

__all__ = ["export_hard_network", "attention_heads", "architecture", "save_pruned", "load_pruned",
           "read_architecture", "ARCHITECTURE_FORMAT"]

ARCHITECTURE_FORMAT = "s2hk-architecture"
ARCHITECTURE_VERSION = 1
WEIGHTS_FILE = "model.pt"
ARCHITECTURE_FILE = "architecture.json"


def _indices(sel: Selection, full: int) -> list[int]:
    if sel is None:
        return list(range(full))
    if isinstance(sel, int):
        return list(range(sel))
    return [int(i) for i in sel.tolist()]


def _narrow_module(module: nn.Module, in_idx: list[int], out_idx: list[int], depthwise: bool) -> nn.Module:
    """An empty standard layer of the narrowed shape (same type and hyper-parameters)."""
    k_in, k_out = len(in_idx), len(out_idx)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        # pruned by whole groups (depthwise: groups of one channel): the kept groups stay groups
        groups = k_out // (module.out_channels // module.groups) if depthwise else module.groups
        return type(module)(k_in, k_out, module.kernel_size, module.stride, module.padding,
                            module.dilation, groups, module.bias is not None, module.padding_mode,
                            device=module.weight.device, dtype=module.weight.dtype)
    if isinstance(module, nn.Linear):
        return nn.Linear(k_in, k_out, module.bias is not None, device=module.weight.device,
                         dtype=module.weight.dtype)
    if isinstance(module, nn.LayerNorm):
        ref = module.weight if module.weight is not None else None
        kwargs = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        return nn.LayerNorm(k_out, module.eps, module.elementwise_affine, bias=module.bias is not None, **kwargs)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        ref = module.weight if module.weight is not None else module.running_mean
        kwargs = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        return type(module)(k_out, module.eps, module.momentum, module.affine, module.track_running_stats, **kwargs)
    raise TypeError(f"cannot narrow a {type(module).__name__}")


def _fill_narrowed(new: nn.Module, old: nn.Module, wrapper: Optional[nn.Module], sel_in: Selection,
                   sel_out: Selection, depthwise: bool) -> None:
    """Copy the kept weights (and hard-path statistics) of ``old`` into the narrow ``new``."""
    with torch.no_grad():
        if isinstance(old, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            weight = select(old.weight, 0, sel_out)
            if not depthwise and getattr(old, "groups", 1) == 1:
                weight = select(weight, 1, sel_in)
            new.weight.copy_(weight)
            if old.bias is not None:
                new.bias.copy_(select(old.bias, 0, sel_out))
            return
        if getattr(old, "weight", None) is not None:
            new.weight.copy_(select(old.weight, 0, sel_out))
        if getattr(old, "bias", None) is not None:
            new.bias.copy_(select(old.bias, 0, sel_out))
        if isinstance(old, nn.modules.batchnorm._BatchNorm) and old.running_mean is not None:
            source = wrapper if isinstance(wrapper, GatedNorm) and wrapper.hard_running_mean is not None else None
            mean = source.hard_running_mean if source is not None else old.running_mean
            var = source.hard_running_var if source is not None else old.running_var
            tracked = source.hard_num_batches_tracked if source is not None else old.num_batches_tracked
            new.running_mean.copy_(select(mean, 0, sel_out))
            new.running_var.copy_(select(var, 0, sel_out))
            new.num_batches_tracked.copy_(tracked)


def export_hard_network(net: "TwoPathNetwork") -> fx.GraphModule:
    """Build the hard network of ``net``'s current plan as a plain GraphModule (eval mode)."""
    source = net.analysis.graph_module
    modules = dict(source.named_modules())
    selections = net.named_layer_selections()
    root: dict[str, Any] = {}
    shapes: dict[str, tuple] = {}
    for node in source.graph.nodes:
        if node.op == "get_attr":
            value = _fetch(source, str(node.target))
            if isinstance(value, nn.Parameter):  # stays trainable in the export (a LayerScale, a class token)
                value = nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad)
            elif isinstance(value, Tensor):
                value = value.detach().clone()
            root[str(node.target)] = value
        if node.op != "call_module":
            continue
        target = str(node.target)
        old = modules[target]
        if node.name not in selections:
            root.setdefault(target, _copy_module(old))
            continue
        sel_in, sel_out, spec = selections[node.name]
        in_w = getattr(old, "in_channels", getattr(old, "in_features", None))
        out_w = getattr(old, "out_channels", getattr(old, "out_features", None))
        if out_w is None:  # norms
            out_w = old.num_features if hasattr(old, "num_features") else old.normalized_shape[0]
            in_w = out_w
        in_idx, out_idx = _indices(sel_in, in_w), _indices(sel_out, out_w)
        shape = (tuple(in_idx), tuple(out_idx))
        if target in shapes:
            if shapes[target] != shape:
                raise RuntimeError(f"layer '{target}' is called at several places with different kept channels; "
                                   "it cannot be exported as one narrow layer")
            continue
        shapes[target] = shape
        new = _narrow_module(old, in_idx, out_idx, spec.depthwise)
        _fill_narrowed(new, old, net.wrappers[node.name], sel_in, sel_out, spec.depthwise)
        root[target] = new
    graph = fx.Graph()
    graph.output(graph.graph_copy(source.graph, {}))
    exported = fx.GraphModule(root, graph, class_name="PrunedModel")
    apply_graph_edits(exported, graph_edits(net))
    _set_head_counts(exported, attention_heads(net))
    return exported.eval()


def _set_head_counts(gm: fx.GraphModule, heads: dict[str, dict]) -> None:
    """``num_heads`` = the kept heads on each attention's module of ``gm`` (the container of its narrow layers),
    for whoever inspects the pruned model; its forward already uses them."""
    for name, entry in heads.items():
        try:
            gm.get_submodule(name).num_heads = int(entry["heads"])
        except AttributeError:  # no layer of that module is left (a skipped block)
            pass


def attention_heads(net: "TwoPathNetwork") -> dict[str, dict]:
    """Per module whose forward splits channels into heads (a reshape into ``(..., heads, head_dim)``): the kept
    and the dense head count and the head size, by module name (``"blocks.0.attn"``)."""
    net.prepare_hard()
    sel = net.state.selections
    nodes = {n.name: n for n in net.analysis.graph_module.graph.nodes}
    out: dict[str, dict] = {}
    for name, spec in net.analysis.reshapes.items():
        for i, d in enumerate(spec.dims[:-1]):
            head_dim = spec.dims[i + 1]
            if not isinstance(d, tuple) or not isinstance(head_dim, int) or any(seg.repeat != 1 for seg in d):
                continue
            stack = nodes[name].meta.get("nn_module_stack") or {}
            module = list(stack.values())[-1][0] if stack else name
            out.setdefault(module, {"heads": count_selected(sel[d], layout_width(d)), "dense_heads": layout_width(d),
                                    "head_dim": head_dim})
    return out


def graph_edits(net: "TwoPathNetwork") -> dict:
    """What the narrow model changes in the traced graph besides its layers, as JSON-serialisable data:

    - ``reshapes``: per reshape / view node, the new size of every output dimension that counts channels (None:
      as traced) -- attention modules then carry the kept head count;
    - ``constant_slices``: constants combined with channels (position embeddings, per-head biases), cut to the
      kept channels along ``dim`` before ``node`` uses them;
    - ``skipped_blocks``: ``[add, shortcut]`` node pairs of residual blocks removed whole (the add's result
      becomes its shortcut; the block's layers are dropped).
    """
    net.prepare_hard()
    sel = net.state.selections
    reshapes = {name: [count_selected(sel[d], layout_width(d)) if isinstance(d, tuple) else d for d in spec.dims]
                for name, spec in net.analysis.reshapes.items()}
    slices = []
    for spec in net.analysis.constant_slices:
        s = sel[spec.layout]
        if s is not None:
            kept = list(range(s)) if isinstance(s, int) else [int(i) for i in s.tolist()]
            slices.append({"node": spec.node, "arg_path": list(spec.arg_path), "dim": spec.dim, "kept": kept})
    skipped = [list(pair) for pair in net.skipped_blocks()]
    return {"reshapes": reshapes, "constant_slices": slices, "skipped_blocks": skipped}


def apply_graph_edits(gm: fx.GraphModule, edits: dict) -> None:
    """Apply :func:`graph_edits` to ``gm`` (a traced copy of the dense model's graph with narrowed layers), in
    place: reshape sizes, constant cuts (index buffers ``s2hk_kept_<i>``, saved in its ``state_dict``), skipped
    blocks (their layers deleted)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, dims in edits.get("reshapes", {}).items():
        node = nodes[name]
        x, sizes, packed = reshape_arguments(node)
        if packed:  # one size sequence computed at run time: replace its entries with tuple ops in the graph
            with gm.graph.inserting_before(node):
                shape = gm.graph.call_function(tuple, (sizes[0],))
                for i, d in enumerate(dims):
                    if d is not None:
                        head = gm.graph.call_function(operator.getitem, (shape, slice(None, i)))
                        tail = gm.graph.call_function(operator.getitem, (shape, slice(i + 1, None)))
                        shape = gm.graph.call_function(operator.add, (
                            gm.graph.call_function(operator.add, (head, (int(d),))), tail))
            sizes = (shape,)
        else:
            sizes = tuple(s if d is None else int(d) for s, d in zip(sizes, dims))
        node.args, node.kwargs = ((x, *sizes) if node.op == "call_method" else (x, sizes)), {}
    for i, cut in enumerate(edits.get("constant_slices", [])):
        node, path, dim, kept = nodes[cut["node"]], tuple(cut["arg_path"]), int(cut["dim"]), cut["kept"]
        constant = node_argument(node, path)
        with gm.graph.inserting_before(node):
            if kept == list(range(len(kept))):
                sliced = gm.graph.call_function(torch.narrow, (constant, dim, 0, len(kept)))
            else:
                buffer = f"s2hk_kept_{i}"
                device = next((t.device for t in gm.parameters()), torch.device("cpu"))
                gm.register_buffer(buffer, torch.tensor(kept, dtype=torch.long, device=device))
                sliced = gm.graph.call_function(torch.index_select, (constant, dim, gm.graph.get_attr(buffer)))
        set_node_argument(node, path, sliced)
    replaced: dict[str, str] = {}
    modules = dict(gm.named_modules())
    for add, shortcut in edits.get("skipped_blocks", []):
        if add not in nodes or shortcut not in nodes:
            raise ValueError(f"skipped block '{add}' (shortcut '{shortcut}') is not in the model's graph")
        while shortcut in replaced:  # the shortcut is itself a skipped block's output: use that block's input
            shortcut = replaced[shortcut]
        nodes[add].replace_all_uses_with(identity(gm.graph, nodes[add], nodes[shortcut], modules))
        replaced[add] = shortcut
    # what no longer reaches the output goes, random ops (a functional dropout) included
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
    gm.delete_all_unused_submodules()
    gm.recompile()


def _copy_module(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def _fetch(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def architecture(net: "TwoPathNetwork", model_name: Optional[str] = None, model_kwargs: Optional[dict] = None,
                 exported: Optional[fx.GraphModule] = None) -> dict:
    """The JSON-serialisable description of ``net``'s hard network (schema ``s2hk-architecture`` v1);
    ``exported``: its export, when the caller has it (else it is made where skipped blocks need it)."""
    layers: dict[str, dict] = {}
    modules = dict(net.analysis.graph_module.named_modules())
    for node_name, (sel_in, sel_out, spec) in net.named_layer_selections().items():
        old = modules[spec.target]
        if spec.target in layers:
            continue
        if spec.kind == "norm":
            dense = old.num_features if hasattr(old, "num_features") else old.normalized_shape[0]
            dense_in = dense_out = dense
        else:
            dense_in = getattr(old, "in_channels", getattr(old, "in_features", 0))
            dense_out = getattr(old, "out_channels", getattr(old, "out_features", 0))
        in_idx, out_idx = _indices(sel_in, dense_in), _indices(sel_out, dense_out)
        layers[spec.target] = {
            "type": type(old).__name__, "kind": spec.kind, "depthwise": spec.depthwise,
            "in_channels": len(in_idx), "out_channels": len(out_idx),
            "dense_in_channels": dense_in, "dense_out_channels": dense_out,
            "kept_in_channels": in_idx, "kept_out_channels": out_idx,
        }
    if net.skipped_blocks():  # layers of skipped residual blocks are not in the pruned model
        present = dict((exported if exported is not None else export_hard_network(net)).named_modules())
        for target, layer in layers.items():
            layer["removed"] = target not in present
    inputs = net.example_inputs if isinstance(net.example_inputs, (tuple, list)) else (net.example_inputs,)
    return {
        "format": ARCHITECTURE_FORMAT, "version": ARCHITECTURE_VERSION,
        "model": {"name": model_name, "kwargs": model_kwargs or {}},
        "ignore": list(net.analysis.ignore),  # the trace keeps ignored modules whole: load_pruned must too
        "example_input_shapes": [list(t.shape) for t in inputs],
        "example_input_dtypes": [str(t.dtype).removeprefix("torch.") for t in inputs],
        "flops": {"dense": net.flops("full"), "pruned": net.flops("hard"),
                  "convention": "FLOPs = 2 x MACs of every conv, linear and matmul, for example_input_shapes"},
        "groups": {g.name: {"channels": g.channels, "kept": w} for g, w in zip(net.prunable, net.plan.widths)},
        "layers": layers,
        "graph_edits": graph_edits(net),
        "attention_heads": attention_heads(net),
        "channel_constants": channel_constants(net),
    }


def channel_constants(net: "TwoPathNetwork") -> list[dict]:
    """The constants a per-layer CR-SFP / SFP P-NN folds in for its removed filters (their BN outputs, into
    the next conv and into residual sums): :func:`s2hk.crsfp_layers.pnn_edits`; empty for other networks."""
    if getattr(net, "structure", None) != "layers":
        return []
    from .crsfp_layers import pnn_edits

    return pnn_edits(net)


def save_pruned(net: "TwoPathNetwork", folder: str | Path, model_name: Optional[str] = None,
                model_kwargs: Optional[dict] = None) -> Path:
    """Write ``folder/model.pt`` (state_dict of the exported model) and ``folder/architecture.json`` (which
    records model.pt's size in bytes and SHA-256), each atomically, model.pt first: a crash between the two
    leaves a pair that :func:`load_pruned` refuses rather than one that loads wrong."""
    folder = Path(folder)
    exported = net.export()
    buffer = io.BytesIO()
    torch.save(exported.state_dict(), buffer)
    data = buffer.getvalue()
    arch = architecture(net, model_name, model_kwargs, exported)
    arch["weights"] = {"file": WEIGHTS_FILE, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write(folder / WEIGHTS_FILE, lambda f: f.write(data), durable=True)
    atomic_write(folder / ARCHITECTURE_FILE, lambda f: f.write(json.dumps(arch, indent=1).encode()), durable=True)
    return folder


# ------------------------------------------------------------------------------------------ reading

def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


class _Schema:
    """Checks of one architecture.json; every failure is a ValueError naming the file and the entry."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, what: str) -> ValueError:
        return ValueError(f"{self.path}: {where}: {what}")

    def mapping(self, value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a JSON object, got {json.dumps(value)[:60]}")
        return value

    def integer(self, value: Any, where: str, low: int = 0) -> int:
        if not _is_int(value, low):
            raise self.fail(where, f"expected an integer >= {low}, got {json.dumps(value)[:60]}")
        return value

    def indices(self, value: Any, where: str, count: int, bound: int) -> None:
        """A list of ``count`` distinct channel indices in ``0 .. bound - 1``."""
        if not isinstance(value, list) or not all(_is_int(i) and i < bound for i in value) \
                or len(set(value)) != len(value):
            raise self.fail(where, f"expected a list of distinct channel indices in 0..{bound - 1}, got "
                                   f"{json.dumps(value)[:60]}")
        if len(value) != count:
            raise self.fail(where, f"lists {len(value)} channels, but the entry says {count}")

    def layer(self, name: str, entry: Any) -> None:
        where = f"layers[{name!r}]"
        entry = self.mapping(entry, where)
        for key in ("type", "kind"):
            if not isinstance(entry.get(key), str):
                raise self.fail(f"{where}.{key}", f"expected a string, got {json.dumps(entry.get(key))}")
        for key in ("depthwise", "removed"):
            if key in entry and not isinstance(entry[key], bool):
                raise self.fail(f"{where}.{key}", f"expected true or false, got {json.dumps(entry[key])}")
        if "depthwise" not in entry:
            raise self.fail(f"{where}.depthwise", "missing")
        for side in ("in", "out"):
            kept = self.integer(entry.get(f"{side}_channels"), f"{where}.{side}_channels")
            dense = self.integer(entry.get(f"dense_{side}_channels"), f"{where}.dense_{side}_channels")
            self.indices(entry.get(f"kept_{side}_channels"), f"{where}.kept_{side}_channels", kept, dense)

    def check(self, arch: Any) -> dict:
        if not isinstance(arch, dict) or arch.get("format") != ARCHITECTURE_FORMAT \
                or arch.get("version") != ARCHITECTURE_VERSION:
            raise ValueError(f"{self.path}: not an {ARCHITECTURE_FORMAT} v{ARCHITECTURE_VERSION} file")
        if not isinstance(arch.get("layers"), dict):
            raise ValueError(f"{self.path}: has no 'layers' table; expected a file written by s2hk.save_pruned")
        model = self.mapping(arch.get("model", {}), "model")
        if model.get("name") is not None and not isinstance(model["name"], str):
            raise self.fail("model.name", f"expected a string or null, got {json.dumps(model['name'])}")
        self.mapping(model.get("kwargs", {}), "model.kwargs")
        shapes = arch.get("example_input_shapes")
        if not isinstance(shapes, list) or not shapes or not all(
                isinstance(s, list) and all(_is_int(d, 1) for d in s) for s in shapes):
            raise self.fail("example_input_shapes", f"expected a list of shapes (lists of sizes >= 1), got "
                                                    f"{json.dumps(shapes)[:60]}")
        dtypes = arch.get("example_input_dtypes", ["float32"] * len(shapes))
        if not isinstance(dtypes, list) or len(dtypes) != len(shapes) or not all(
                isinstance(getattr(torch, str(d), None), torch.dtype) for d in dtypes):
            raise self.fail("example_input_dtypes", f"expected one torch dtype name per example input, got "
                                                    f"{json.dumps(dtypes)[:60]}")
        for name, entry in arch["layers"].items():
            self.layer(name, entry)
        self.graph_edits(self.mapping(arch.get("graph_edits", {}), "graph_edits"))
        for name, entry in self.mapping(arch.get("attention_heads", {}), "attention_heads").items():
            where = f"attention_heads[{name!r}]"
            entry = self.mapping(entry, where)
            heads = self.integer(entry.get("heads"), f"{where}.heads")
            dense = self.integer(entry.get("dense_heads"), f"{where}.dense_heads", 1)
            self.integer(entry.get("head_dim"), f"{where}.head_dim", 1)
            if heads > dense:
                raise self.fail(f"{where}.heads", f"{heads} kept heads of {dense}")
        if "weights" in arch:
            weights = self.mapping(arch["weights"], "weights")
            if weights.get("file") != WEIGHTS_FILE or not _is_int(weights.get("bytes")) or \
                    not re.fullmatch(r"[0-9a-f]{64}", str(weights.get("sha256"))):
                raise self.fail("weights", f"expected file {WEIGHTS_FILE!r}, bytes and a sha256 hex digest, got "
                                           f"{json.dumps(weights)[:80]}")
        return arch

    def graph_edits(self, edits: dict) -> None:
        for name, dims in self.mapping(edits.get("reshapes", {}), "graph_edits.reshapes").items():
            if not isinstance(dims, list) or not all(d is None or _is_int(d, -1) for d in dims):
                raise self.fail(f"graph_edits.reshapes[{name!r}]", f"expected a list of sizes or nulls, got "
                                                                  f"{json.dumps(dims)[:60]}")
        slices = edits.get("constant_slices", [])
        if not isinstance(slices, list):
            raise self.fail("graph_edits.constant_slices", "expected a list")
        for i, cut in enumerate(slices):
            where = f"graph_edits.constant_slices[{i}]"
            cut = self.mapping(cut, where)
            if not isinstance(cut.get("node"), str) or not isinstance(cut.get("arg_path"), list) or \
                    not all(_is_int(a) for a in cut["arg_path"]) or not isinstance(cut.get("dim"), int) or \
                    not isinstance(cut.get("kept"), list) or not all(_is_int(k) for k in cut["kept"]):
                raise self.fail(where, "expected node (string), arg_path (integers), dim (integer) and kept "
                                       "(channel indices)")
        blocks = edits.get("skipped_blocks", [])
        if not isinstance(blocks, list) or not all(isinstance(b, list) and len(b) == 2 and
                                                   all(isinstance(n, str) for n in b) for b in blocks):
            raise self.fail("graph_edits.skipped_blocks", f"expected [add, shortcut] pairs of node names, got "
                                                          f"{json.dumps(blocks)[:60]}")


def read_architecture(path: str | Path) -> dict:
    """The contents of an ``architecture.json`` written by :func:`save_pruned`, its schema checked.

    Raises:
        ValueError: the file is unreadable, not JSON, not an s2hk architecture of this version, or an entry has
            the wrong type or an impossible value; the message names the file and the entry.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot be read ({err})") from err
    try:
        arch = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    return _Schema(path).check(arch)


def _dense_sizes(module: nn.Module) -> Optional[tuple[int, int]]:
    """(in, out) channels of a conv / linear / norm layer; None for another kind of module."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features, module.num_features
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return module.normalized_shape[0], module.normalized_shape[0]
    return None


def _check_layers(arch: dict, modules: dict[str, nn.Module], schema: _Schema) -> None:
    """Every layers entry names a layer of the dense model, of its type and dense sizes."""
    for name, entry in arch["layers"].items():
        where = f"layers[{name!r}]"
        module = modules.get(name)
        if module is None:
            raise schema.fail(where, "the model has no such layer (another model, or other constructor arguments?)")
        if type(module).__name__ != entry["type"]:
            raise schema.fail(f"{where}.type", f"{entry['type']}, but the model's layer is a {type(module).__name__}")
        if _dense_sizes(module) != (entry["dense_in_channels"], entry["dense_out_channels"]):
            raise schema.fail(where, f"dense channels (in, out) = ({entry['dense_in_channels']}, "
                                     f"{entry['dense_out_channels']}), but the model's layer has {_dense_sizes(module)}")
        if entry["depthwise"] and not _whole_groups(module, entry["kept_in_channels"], entry["kept_out_channels"]):
            raise schema.fail(where, "a grouped layer keeps whole groups: as many of its input as of its output")


def _whole_groups(module: nn.Module, kept_in: list, kept_out: list) -> bool:
    """Whether kept input and output channels are the same number of whole groups of a grouped conv."""
    groups = getattr(module, "groups", 1)
    in_unit, out_unit = _dense_sizes(module)[0] // groups, _dense_sizes(module)[1] // groups
    return len(kept_in) % in_unit == 0 and len(kept_out) % out_unit == 0 and \
        len(kept_in) // in_unit == len(kept_out) // out_unit


def _check_heads(arch: dict, gm: fx.GraphModule, schema: _Schema) -> None:
    """Each attention's kept heads x head_dim must be the split its reshapes make (graph_edits.reshapes)."""
    edits = arch.get("graph_edits", {}).get("reshapes", {})
    owner: dict[str, list] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        if node.name in edits and stack:
            owner.setdefault(list(stack.values())[-1][0], []).append(edits[node.name])
    for name, entry in arch.get("attention_heads", {}).items():
        pair = [entry["heads"], entry["head_dim"]]
        if not any(dims[i:i + 2] == pair for dims in owner.get(name, []) for i in range(len(dims) - 1)):
            raise schema.fail(f"attention_heads[{name!r}]", f"{entry['heads']} heads of {entry['head_dim']} "
                                                            "channels is not how the module's reshapes "
                                                            "(graph_edits.reshapes) split its channels")


def _check_weights(state: dict, pruned: fx.GraphModule, arch: dict, weights_path: Path, arch_path: Path) -> None:
    """Every tensor of ``state`` has the shape the architecture gives it; none is missing or extra."""
    expected = pruned.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"{weights_path}: does not match {arch_path} (missing {missing[:5]}, unexpected "
                         f"{extra[:5]})")
    for key, value in state.items():
        if not isinstance(value, Tensor) or tuple(value.shape) != tuple(expected[key].shape):
            layer = key.rpartition(".")[0]
            source = f"layers[{layer!r}]" if layer in arch["layers"] else "the dense model"
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{weights_path}: {key!r} has shape {shape}, but {arch_path} {source} gives "
                             f"{tuple(expected[key].shape)}")


def _read_weights(arch: dict, weights_path: Path, arch_path: Path) -> dict:
    """model.pt's state_dict after checking its size and SHA-256 against architecture.json (a file saved
    without them, by an older s2hk, is loaded with a warning)."""
    data = weights_path.read_bytes()
    recorded = arch.get("weights")
    if recorded is None:
        warnings.warn(f"{arch_path} records no checksum of {weights_path} (saved by an older s2hk); its weights "
                      "are loaded unverified", RuntimeWarning, stacklevel=3)
    elif len(data) != recorded["bytes"] or hashlib.sha256(data).hexdigest() != recorded["sha256"]:
        raise ValueError(f"{weights_path}: checksum mismatch with {arch_path} ({len(data)} bytes, "
                         f"{recorded['bytes']} recorded): the file is corrupt or was replaced after saving; export "
                         "the run again (s2hk export RUN)")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling and zip errors have many types; all mean an unreadable file
        raise ValueError(f"{weights_path}: not a readable PyTorch state_dict ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        raise ValueError(f"{weights_path}: holds a {type(state).__name__}, not a state_dict")
    return state


def load_pruned(folder: str | Path, model: Optional[nn.Module] = None) -> fx.GraphModule:
    """Rebuild a saved pruned model: the dense ``model`` (or the registry model named in the JSON) is traced
    and its layers narrowed to the saved shapes, then the saved weights are loaded strictly.

    Raises:
        FileNotFoundError: model.pt or architecture.json is missing.
        ValueError: architecture.json is malformed or does not fit the model (naming the entry), model.pt fails
            its checksum or a weight's shape disagrees with the architecture, or the rebuilt model does not run
            on the saved example input.
    """
    folder = Path(folder)
    arch_path, weights_path = folder / ARCHITECTURE_FILE, folder / WEIGHTS_FILE
    for path in (arch_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; expected a folder written by s2hk.save_pruned")
    arch = read_architecture(arch_path)
    schema = _Schema(arch_path)
    state = _read_weights(arch, weights_path, arch_path)
    if model is None:
        name = (arch.get("model") or {}).get("name")
        if not name:
            raise ValueError(f"{arch_path}: names no shipped model; pass the dense model: load_pruned(folder, model=...)")
        from .models import get_model

        try:
            model = get_model(name, **arch["model"].get("kwargs", {}))
        except (TypeError, ValueError) as err:
            raise schema.fail("model", f"cannot build {name!r} ({err})") from err
    ignore = arch.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(name, str) for name in ignore):
        raise schema.fail("ignore", f"must be a list of module names, got {ignore!r}")
    gm = trace(model, ignore)
    modules = dict(gm.named_modules())
    _check_layers(arch, modules, schema)
    root: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            root[str(node.target)] = _fetch(gm, str(node.target))
        elif node.op == "call_module":
            target = str(node.target)
            entry = arch["layers"].get(target)
            old = modules[target]
            root[target] = old if entry is None else _narrow_module(
                old, entry["kept_in_channels"], entry["kept_out_channels"], entry["depthwise"])
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    pruned = fx.GraphModule(root, graph, class_name="PrunedModel")
    _check_heads(arch, gm, schema)
    try:
        apply_graph_edits(pruned, arch.get("graph_edits", {}))
        if arch.get("channel_constants"):
            from .crsfp_layers import apply_pnn_edits

            apply_pnn_edits(pruned, arch["channel_constants"])
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise ValueError(f"{arch_path}: its graph edits do not fit the model's graph ({err})") from err
    _set_head_counts(pruned, arch.get("attention_heads", {}))
    _check_weights(state, pruned, arch, weights_path, arch_path)
    pruned.load_state_dict(state, strict=True)
    pruned.eval()
    shapes = arch["example_input_shapes"]
    dtypes = arch.get("example_input_dtypes", ["float32"] * len(shapes))
    inputs = [torch.zeros(shape, dtype=getattr(torch, dtype)) for shape, dtype in zip(shapes, dtypes)]
    try:
        with torch.no_grad():
            pruned(*inputs)
    except Exception as err:  # any failure here means the saved pieces do not fit together
        raise ValueError(f"{arch_path}: the rebuilt model does not run on its example input "
                         f"{arch['example_input_shapes']} ({type(err).__name__}: {err})") from err
    return pruned
