"""Moving a pruner moves everything it holds: ``.to(device)``, ``.to(dtype)``, ``.double()``, ``.cuda()``,
``to_empty``, ``load_state_dict`` and ``load_pruning_state``.

Every method is built on the CPU with its hard network pinned to explicit (non-prefix) channel lists, trained a
step so that plans, caches, accumulators and remembered batches exist, and moved. A generic walker then visits
every tensor reachable from the pruner object -- attributes, containers, modules' parameters and buffers, the
user's model, the traced graphs -- and nothing may be left behind. CPU-only machines check this through the
``meta`` device and through dtypes; the tests marked ``gpu`` do the same with CUDA.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import io
import types
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
from torch import Tensor

from helpers import ResidualNet, TwoConvNet
from s2hk import S2HPruner
from s2hk.baselines import UniformL1Pruner
from s2hk.crsfp import CRSFPruner, SFPruner
from s2hk.engine import TwoPathNetwork
from s2hk.models import get_model
from s2hk.models.resnet import BasicBlock, ResNet
from s2hk.stp import Architecture, STPruner

NUM_CLASSES = 5

# ----------------------------------------------------------------------------------------- the walker

_ATOMS = (str, bytes, int, float, bool, complex, type(None), type, types.FunctionType, types.BuiltinFunctionType,
          types.MethodType, types.ModuleType, types.MethodDescriptorType, types.WrapperDescriptorType,
          types.MethodWrapperType, types.GetSetDescriptorType, torch.dtype, torch.device,
          torch.Generator)  # not a tensor: STP samples on the host with a CPU generator wherever the network is


def reachable_tensors(root: Any) -> list[tuple[str, Tensor]]:
    """Every tensor reachable from ``root`` (each once, with the first path found to it): through object
    attributes (``__dict__`` and ``__slots__``, so dataclasses, modules' parameter / buffer / submodule dicts
    and plain attributes alike), dict keys and values, lists, tuples, sets and deques, and a tensor's ``.grad``.
    Functions, classes and modules of code are not entered."""
    seen: set[int] = set()
    found: list[tuple[str, Tensor]] = []
    stack: list[tuple[Any, str]] = [(root, "pruner")]
    while stack:
        obj, path = stack.pop()
        if isinstance(obj, _ATOMS) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            found.append((path, obj))
            if obj.is_leaf and obj.grad is not None:
                stack.append((obj.grad, f"{path}.grad"))
            continue
        if isinstance(obj, dict):
            for key, value in obj.items():
                stack += [(key, f"{path}<key {key!r}>"), (value, f"{path}[{key!r}]")]
        elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
            stack += [(value, f"{path}[{i}]") for i, value in enumerate(obj)]
        else:
            stack += [(value, f"{path}.{name}") for name, value in getattr(obj, "__dict__", {}).items()]
            for cls in type(obj).__mro__:
                slots = getattr(cls, "__slots__", ())
                for name in [slots] if isinstance(slots, str) else slots:
                    if hasattr(obj, name):
                        stack.append((getattr(obj, name), f"{path}.{name}"))
    return found


def off_device(pruner: nn.Module, device: str) -> list[str]:
    """Where a tensor reachable from ``pruner`` is not on ``device`` (a device type: "meta", "cuda", "cpu")."""
    return [f"{path} ({t.device})" for path, t in reachable_tensors(pruner) if t.device.type != device]


def off_meta(pruner: nn.Module) -> list[str]:
    """:func:`off_device` for ``"meta"``, less the FLOPs polynomial's constants: they stay where they hold values
    (a meta tensor holds none, and they could not be made again when the network comes back)."""
    return [path for path in off_device(pruner, "meta") if not path.startswith("pruner.flops_polynomial.")]


def not_int64(pruner: nn.Module) -> list[str]:
    """Where a tensor reachable from ``pruner`` is neither floating point nor int64: every integer tensor
    here (channel indices, ranks, batch counts, labels, position indices) is int64 and must stay so."""
    return [f"{path} ({t.dtype})" for path, t in reachable_tensors(pruner)
            if not t.is_floating_point() and t.dtype != torch.int64]


def of_dtype(pruner: nn.Module, dtype: torch.dtype) -> list[str]:
    """Where a tensor reachable from ``pruner`` has ``dtype``."""
    return [path for path, t in reachable_tensors(pruner) if t.dtype == dtype]


def test_walker_sees_plain_attributes_containers_dataclasses_and_grads():
    @dataclasses.dataclass
    class Holder:
        items: list

    class Slotted:
        __slots__ = ("value",)

        def __init__(self) -> None:
            self.value = torch.zeros(1)

    lin = nn.Linear(2, 2)
    lin.weight.grad = torch.zeros(2, 2)
    lin.plain = {"deep": collections.deque([(torch.zeros(3),)])}
    root = Holder([lin, Slotted(), {torch.zeros(4): "keyed"}])
    shapes = sorted(tuple(t.shape) for _, t in reachable_tensors(root))
    assert shapes == [(1,), (2,), (2, 2), (2, 2), (3,), (4,)]  # bias, weight and its grad, deque, slot, dict key


# ----------------------------------------------------------------------------------------- the pruners

@dataclasses.dataclass
class Case:
    """A pruner in the state a move must carry, a batch for it, and how to train it one step."""

    pruner: nn.Module
    x: Tensor
    y: Tensor

    def step(self, x: Tensor, y: Tensor) -> None:
        """One training step (and for STP a search: it runs the remembered batches)."""
        p = self.pruner
        p.train()
        opt = torch.optim.SGD(p.weight_parameters(), lr=0.01)
        if type(p) is TwoPathNetwork:  # the bare engine has no train_step
            p(x, path="soft").sum().backward()
        else:
            p.train_step(x, y, opt)
        if isinstance(p, STPruner):
            p.search()


def _batch(n: int, size: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen), torch.randint(0, NUM_CLASSES, (n,), generator=gen)


def _scattered(p: TwoPathNetwork, slot: int, keep: int) -> list[int]:
    """``keep`` channels of prunable group ``slot`` that are not its prefix (every other one, from 1)."""
    return list(range(1, p.prunable[slot].channels, 2))[:keep]


def _reload(p: nn.Module) -> None:
    """Save and load the pruner's own pruning state through bytes, as a checkpoint would."""
    buffer = io.BytesIO()
    torch.save(p.pruning_state(), buffer)
    buffer.seek(0)
    p.load_pruning_state(torch.load(buffer, weights_only=False))


def build_engine() -> Case:
    x, y = _batch(8, 8)
    p = TwoPathNetwork(ResidualNet(8, 6, NUM_CLASSES), x[:1], granularity=2)
    p.set_hard_widths({p.prunable[0].name: _scattered(p, 0, 4), p.prunable[1].name: [0, 1, 2]})
    case = Case(p, x, y)
    case.step(x, y)
    p(x, path="hard")
    return case


def build_s2h() -> Case:
    x, y = _batch(8, 8)
    p = S2HPruner(ResidualNet(8, 6, NUM_CLASSES), x[:1], target_flops=0.5, granularity=2)
    case = Case(p, x, y)
    case.step(x, y)
    p.set_hard_widths({p.prunable[0].name: _scattered(p, 0, 4)})
    case.step(x, y)
    _reload(p)
    return case


def build_swin() -> Case:
    """A transformer whose graph reads the model's tensors directly (relative position tables and indices,
    window masks) and holds fx tensor constants: attributes the two traced graphs share with the model."""
    x, y = _batch(2, 16)
    model = get_model("swin_tiny_cifar", depths=(2, 2), num_heads=(3, 6), embed_dim=24, image_size=16,
                      num_classes=NUM_CLASSES)
    p = S2HPruner(model, x[:1], target_flops=0.5)
    case = Case(p, x, y)
    slot = next(i for i, g in enumerate(p.prunable) if g.channels > 8)
    p.set_hard_widths({p.prunable[slot].name: _scattered(p, slot, 8)})
    case.step(x, y)
    return case


def build_crsfp() -> Case:
    x, y = _batch(8, 8)
    p = CRSFPruner(TwoConvNet(), x[:1], prune_rate=0.4, criterion="taylor", structure="groups")
    case = Case(p, x, y)
    case.step(x, y)  # Taylor accumulators filled
    _reload(p)
    return case


def build_crsfp_layers() -> Case:
    """CR-SFP as its authors train it: every block conv masked on its own (masks held by the conv wrappers)."""
    x, y = _batch(8, 8)
    p = CRSFPruner(ResidualNet(8, 6, NUM_CLASSES), x[:1], prune_rate=0.4, criterion="taylor")
    case = Case(p, x, y)
    case.step(x, y)
    return case


def build_sfp() -> Case:
    x, y = _batch(8, 8)
    p = SFPruner(TwoConvNet(), x[:1], prune_rate=0.4, criterion="fpgm", structure="groups")
    case = Case(p, x, y)
    case.step(x, y)
    return case


def build_stp() -> Case:
    """Two stages of two blocks: the pinned best architecture skips a block (a cached hard-path graph)."""
    x, y = _batch(8, 8)
    model = ResNet(BasicBlock, (2, 2), widths=(8, 16), num_classes=NUM_CLASSES, stem_width=8)
    p = STPruner(model, x[:1], target_flops=0.5, granularity=2, population=2, generations=0,
                 held_out_batches=1, calibration_batches=1)
    case = Case(p, x, y)
    case.step(x, y)  # remembered batches
    p.best = p.repair(Architecture(p.full_architecture().widths, (1, 2)), 0.5)
    p._pin(p.best)
    p(x, path="hard")
    _reload(p)
    assert p._depth_modules and p._skipped_adds
    return case


def build_uniform() -> Case:
    x, y = _batch(8, 8)
    p = UniformL1Pruner(ResidualNet(8, 6, NUM_CLASSES), x[:1], target_flops=0.5, epochs=2, granularity=2)
    case = Case(p, x, y)
    case.step(x, y)  # dense
    p.set_phase("hard")  # prunes: explicit channel lists pinned
    case.step(x, y)
    _reload(p)
    return case


BUILDERS: dict[str, Callable[[], Case]] = {
    "engine": build_engine, "s2h": build_s2h, "swin": build_swin, "crsfp": build_crsfp, "crsfp_layers": build_crsfp_layers, "sfp": build_sfp,
    "stp": build_stp, "uniform": build_uniform}
WITH_STATE = [name for name in BUILDERS if name != "engine"]  # methods with a pruning state


def build(name: str) -> Case:
    torch.manual_seed(0)  # the same weights for every build of a name
    return BUILDERS[name]()


def hard_and_export(p: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The hard path's and the export's eval-mode outputs on ``x``."""
    p.eval()
    with torch.no_grad():
        return p(x, path="hard"), p.export()(x)


def index_tensors(p: TwoPathNetwork) -> list[Tensor]:
    """The engine's channel indices: ranks, pinned lists, the plan's selections, importance orders."""
    out = [p.ranks, *p._orders]
    out += [pin for pin in p._pinned.values() if isinstance(pin, Tensor)]
    return out + [s for s in p.plan.selections if isinstance(s, Tensor)]


# ----------------------------------------------------------------------------------------- (a) nothing stays behind

@pytest.mark.parametrize("name", list(BUILDERS))
def test_move_to_meta_leaves_no_tensor_on_the_cpu(name):
    case = build(name)
    held = [s for s in case.pruner.plan.selections if isinstance(s, Tensor)] + \
        [w.keep for w in case.pruner.wrappers.values() if hasattr(w, "keep")]
    assert held  # explicit channel lists (or per-layer masks) are held
    case.pruner.to("meta")
    assert off_meta(case.pruner) == []


def test_tensors_shared_by_the_model_and_the_traced_graphs_stay_shared():
    """The graph of a transformer reads the model's own tensors (get_attr): the model, the two-path graph and
    the graph the export reads must keep holding the same objects after moves; the tensor constants fx traced
    live in the two graphs only (not on the user's model) and stay shared between them."""
    p = build("swin").pruner

    def holders() -> list[list[Any]]:
        targets = [str(n.target) for n in p.graph_module.graph.nodes if n.op == "get_attr"]
        return [[o for o in (_resolve(p.graph_module, t), _resolve(p.analysis.graph_module, t), _resolve(p.model, t))
                 if o is not None] for t in targets]

    def shared(group: list[Any], target: str) -> bool:
        expected = 2 if target.startswith("_tensor_constant") else 3
        return len(group) == expected and all(o is group[0] for o in group)

    targets = [str(n.target) for n in p.graph_module.graph.nodes if n.op == "get_attr"]
    assert any(t.startswith("_tensor_constant") for t in targets) and any(not t.startswith("_") for t in targets)
    assert holders() and all(shared(g, t) for g, t in zip(holders(), targets))
    for move in (lambda: p.to(torch.float64), lambda: p.to("meta")):
        move()
        assert all(shared(g, t) for g, t in zip(holders(), targets))
    assert off_meta(p) == []


def _resolve(obj: Any, target: str) -> Any:
    """The attribute at the dotted ``target`` of ``obj``, or None where there is none."""
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def test_moving_only_the_model_is_a_clear_error():
    case = build("s2h")
    case.pruner.model.to("meta")
    for path in ("hard", "soft"):
        with pytest.raises(RuntimeError, match=r"on meta but the pruner's state is on cpu: move the pruner"):
            case.pruner(case.x, path=path)


# ----------------------------------------------------------------------------------------- (b) dtypes

@pytest.mark.parametrize("name", list(BUILDERS))
def test_float64_and_back_keeps_indices_and_bookkeeping_and_hard_equals_export(name):
    case = build(name)
    p = case.pruner
    hard32, export32 = hard_and_export(p, case.x)
    torch.testing.assert_close(hard32, export32, rtol=1e-5, atol=1e-5)
    bookkeeping = sorted(of_dtype(p, torch.float64))  # FLOPs constants, Taylor accumulators

    p.to(torch.float64)
    assert of_dtype(p, torch.float32) == []  # inputs remembered for later (example inputs, batches) too
    assert all(t.dtype == torch.int64 for t in index_tensors(p)) and not_int64(p) == []
    x64 = case.x.double()
    hard64, export64 = hard_and_export(p, x64)
    torch.testing.assert_close(hard64, export64, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hard64, hard32.double(), rtol=1e-4, atol=1e-4)
    case.step(x64, case.y)  # a step (and STP's search of its remembered batches) runs in float64

    p.float()
    assert sorted(of_dtype(p, torch.float64)) == bookkeeping
    assert all(t.dtype == torch.int64 for t in index_tensors(p)) and not_int64(p) == []
    hard, export = hard_and_export(p, case.x)
    torch.testing.assert_close(hard, export, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["s2h", "crsfp", "stp"])
def test_half_keeps_indices_int64_and_bookkeeping_float64(name):
    p = build(name).pruner
    bookkeeping = sorted(of_dtype(p, torch.float64))
    p.half()
    assert all(t.dtype == torch.int64 for t in index_tensors(p)) and not_int64(p) == []
    assert sorted(of_dtype(p, torch.float64)) == bookkeeping
    assert of_dtype(p, torch.float32) == []


# ----------------------------------------------------------------------------------------- (c) round trips

@pytest.mark.parametrize("name", WITH_STATE)
def test_round_trip_through_meta_and_back_restores_the_hard_network(name):
    """CPU -> meta -> CPU (``to_empty``), then the saved weights and pruning state loaded: the same hard
    network as before, equal to its export, and nothing left on the meta device."""
    case = build(name)
    p = case.pruner
    reference, _ = hard_and_export(p, case.x)
    plan = (list(p.plan.widths), [s.tolist() if isinstance(s, Tensor) else s for s in p.plan.selections])
    weights = copy.deepcopy(p.state_dict())
    saved = io.BytesIO()
    torch.save(p.pruning_state(), saved)
    widths = torch.tensor([float(w) for w in p.all_widths()], dtype=torch.float64)
    flops = p.flops_polynomial(widths)

    p.to("meta")
    assert off_meta(p) == []
    p.to_empty(device="cpu")
    assert off_device(p, "cpu") == []
    p.load_state_dict(weights)
    saved.seek(0)
    p.load_pruning_state(torch.load(saved, weights_only=False))
    assert off_device(p, "cpu") == []
    assert (list(p.plan.widths), [s.tolist() if isinstance(s, Tensor) else s for s in p.plan.selections]) == plan
    assert p.flops_polynomial(widths) == flops
    hard, export = hard_and_export(p, case.x)
    torch.testing.assert_close(hard, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(export, reference, rtol=1e-5, atol=1e-5)
    case.step(case.x, case.y)


@pytest.mark.parametrize("name", WITH_STATE)
def test_pruning_state_takes_the_dtype_of_the_network_it_loads_into(name):
    """A state saved by a float32 pruner loaded into a float64 one: remembered inputs become float64 (STP
    searches them), nothing float32 is left, and the hard path equals the export."""
    case = build(name)
    saved = io.BytesIO()
    torch.save(case.pruner.pruning_state(), saved)
    target = build(name)
    target.pruner.to(torch.float64)
    saved.seek(0)
    target.pruner.load_pruning_state(torch.load(saved, weights_only=False))
    assert of_dtype(target.pruner, torch.float32) == []
    hard, export = hard_and_export(target.pruner, case.x.double())
    torch.testing.assert_close(hard, export, rtol=1e-10, atol=1e-10)
    target.step(case.x.double(), case.y)


def test_load_state_dict_with_assign_moves_the_engine_state_to_the_loaded_tensors():
    """``load_state_dict(assign=True)`` of a CPU state into a meta pruner puts its tensors on the CPU: the
    pinned lists, plan and orders follow, and the plan is the loaded logits' and ranks'."""
    case = build("s2h")
    p = case.pruner
    reference, _ = hard_and_export(p, case.x)
    weights = copy.deepcopy(p.state_dict())
    p.to("meta")
    p.load_state_dict(weights, assign=True)
    assert off_device(p, "cpu") == [] and p.mask_optimizer.logits is p.mask_logits
    hard, _ = hard_and_export(p, case.x)
    torch.testing.assert_close(hard, reference, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------- CUDA

@pytest.mark.gpu
@pytest.mark.parametrize("name", list(BUILDERS))
def test_cuda_move_leaves_nothing_on_the_cpu_and_hard_equals_export(name, full_float32):
    case = build(name)
    p = case.pruner.to("cuda")
    assert off_device(p, "cuda") == []
    x, y = case.x.cuda(), case.y.cuda()
    hard, export = hard_and_export(p, x)
    torch.testing.assert_close(hard, export, rtol=1e-4, atol=1e-4)
    case.step(x, y)
    assert off_device(p, "cuda") == []
    p.cuda().double()
    assert all(t.dtype == torch.int64 and t.is_cuda for t in index_tensors(p))
    hard, export = hard_and_export(p, x.double())
    torch.testing.assert_close(hard, export, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("name", WITH_STATE)
def test_cuda_pruning_states_load_on_either_device(name, full_float32):
    """A state saved on the GPU loads into a CPU pruner and one saved on the CPU into a GPU pruner, loaded
    with or without a map_location: every loaded tensor lands on the loading pruner's device."""
    gpu = build(name)
    gpu.pruner.cuda()
    gpu.step(gpu.x.cuda(), gpu.y.cuda())
    saved = io.BytesIO()
    torch.save(gpu.pruner.pruning_state(), saved)
    for map_location, target_device in ((None, "cpu"), ("cpu", "cpu"), ("cuda", "cuda"), ("cpu", "cuda")):
        target = build(name)
        target.pruner.to(target_device)
        saved.seek(0)
        target.pruner.load_pruning_state(torch.load(saved, map_location=map_location, weights_only=False))
        assert off_device(target.pruner, target_device) == []
        x = target.x.to(target_device)
        hard, export = hard_and_export(target.pruner, x)
        torch.testing.assert_close(hard, export, rtol=1e-4, atol=1e-4)
        target.step(x, target.y.to(target_device))
