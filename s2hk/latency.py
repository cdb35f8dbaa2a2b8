"""A latency model: the time of the exported hard network as a function of its channel groups' widths.

FLOPs are not time. Narrow layers keep kernel-launch and framework overheads, norms and activations scale with
the activations rather than the MACs, and kernels run in blocks of channels (8 / 16 / 32 lanes or tensor-core
tiles), so that 15 and 16 channels can cost the same while 16 and 17 do not. On an H200 the exported ResNet-50
at 35% of its FLOPs infers at 0.92-0.98x of dense; on two CPU cores resnet56 at 34% takes 0.65-0.75x. As HALP
(Shen et al., NeurIPS 2022) does, :class:`LatencyModel` budgets time instead, from a per-layer lookup table
measured on the device and settings the user trains or deploys with:

    latency(w) = s * sum_t T_t(in_t(w), out_t(w)) + c_0 + sum_r c_r R_r(w)        (seconds)

- ``t`` runs over every conv / linear call of the graph analysis (the terms of
  :class:`s2hk.flops.FlopsPolynomial`); ``in_t(w)`` and ``out_t(w)`` are its input and output channel counts at
  the group widths ``w``. ``T_t`` is measured by timing the layer alone -- one ``nn.Conv*`` / ``nn.Linear``
  call on an input of the layer's real shape at the chosen batch, with its stride, padding, dilation and groups
  (a depthwise conv keeps in = out) -- at a grid of (in, out) width pairs, and interpolated bilinearly between
  them. Layers of the same shape share one table.
- The rest (norms, activations, residual adds, pooling, attention's matrix products, layers that are not conv
  or linear, framework overhead) is ``c_0 + sum_r c_r R_r(w)``. It is not all fixed -- a BatchNorm and a ReLU
  cost in proportion to the activations they touch, so at 30% width they cost about 30% -- and is modelled as
  linear in ``R_activations(w)``, the elements written by the conv / linear layers (what the norms, activations
  and adds after them read and write, and the memory the allocator hands out for them), and, for models with
  attention, ``R_attention_macs(w)``, the MACs of attention's matrix products, which scale with the kept heads
  (they are not tabulated: they sit in this part, fitted rather than measured alone).
- ``s`` scales the tables: a layer inside the network can cost more or less than alone (caches warm from the
  previous layer, the allocator's state).

``s``, ``c_r >= 0`` are fitted by least squares to the exported network's latency at a few random architectures
drawn around given fractions of the full widths (``calibration``), timed in rounds with the dense export, with a
prior pulling ``s`` towards 1; ``c_0`` then makes the prediction at full width equal the measured dense latency.

The width grid of a layer's axis is every width the groups it reads or writes can take (multiples of each
prunable group's granularity ``d``, frozen groups at full width). Where that grid is larger than the budget
allows, a subset is sampled: the smallest and largest width, then, for each alignment ``a`` in 512, 256, ...,
16, 8, every multiple of ``a`` on the grid *together with its two neighbours on the grid*. Kernels change cost
in steps at these multiples (a CPU's 8- or 16-lane vector blocks, tensor cores' 8-channel fragments, GEMM tiles
of 64 to 256 channels): sampling the multiple and its neighbours puts a knot on each side of every step, so
the interpolation keeps the step sharp instead of spreading it over the gap to the next sample, and it is
exact at every sampled width; between knots, where the kernel does the same blocked work, it is linear. The
levels are nested, coarsest first -- on a wide layer the large alignments are also an even coarse grid -- and
are measured in that order while the budget lasts; :attr:`LatencyModel.metadata` says which was reached.

:meth:`LatencyModel.ratio` is the prediction over the dense latency, differentiable in float widths: it can sit
where the FLOPs polynomial sits in S2HPruner's regulariser, with the straight-through hard widths; its gradient
is the interpolation's slope in each cell (at a knot, the slope of the cell below: what a narrower width gains).

Measurements are cached as JSON under ``~/.cache/s2hk/latency/`` (or ``$S2HK_CACHE_DIR/latency/``, or the
``cache_dir`` given), keyed by the device's name, the torch / CUDA / cuDNN versions, the settings and a hash of
the graph analysis, so a model is measured once per machine and settings.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Optional, Sequence, Union

try:
    import resource
except ImportError:  # not on Windows: page faults are not counted there
    resource = None

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from .atomic import atomic_write
from .benchmarking import device_name, versions
from .graph import Layout

if TYPE_CHECKING:
    from .engine import TwoPathNetwork

__all__ = ["LatencyModel", "LatencySettings", "LayerProbe", "ModelProbe", "MeasuredTimer", "MODES",
           "MEMORY_FORMATS", "CLOCKS", "ALIGNMENTS", "default_cache_dir"]

MODES = ("inference", "train")
MEMORY_FORMATS = ("contiguous", "channels_last")
CLOCKS = ("wall", "cpu")
#: The channel counts at which kernels are assumed to change cost in steps, coarsest first (see the module
#: docstring): each refines the sampled grid of the one before.
ALIGNMENTS = (512, 256, 128, 64, 32, 16, 8)
CACHE_FORMAT = "s2hk-latency"
CACHE_VERSION = 1
#: Default profiling budgets in seconds: resnet56 on two CPU cores and ResNet-50 on a GPU fit in them.
DEFAULT_BUDGET_S = {"cpu": 120.0, "cuda": 60.0}
#: Fractions of the prunable groups' widths around which the calibration architectures are drawn (the exported
#: network is timed at each to fit the non-layer part and the tables' scale).
DEFAULT_CALIBRATION = (0.25, 0.45, 0.65, 0.85)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FAULT_SLACK = 16  # page faults a call may cause beyond the fewest seen and still count as fault-free


def default_cache_dir() -> Path:
    """``$S2HK_CACHE_DIR/latency`` when the variable is set, else ``~/.cache/s2hk/latency``."""
    root = os.environ.get("S2HK_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "s2hk") / "latency"


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class LatencySettings:
    """What a latency is measured under.

    Attributes:
        device: "cpu", "cuda" or "cuda:N".
        dtype: the activations' and weights' dtype, by name ("float32", "bfloat16", "float16").
        memory_format: "contiguous" or "channels_last" (for 4-D / 5-D activations and conv weights).
        batch_size: samples per forward.
        mode: "inference" (an eval-mode forward under ``torch.inference_mode``) or "train" (a train-mode forward
            and the backward of a training step: weight gradients, and input gradients where the step needs
            them; no optimiser step).
        num_threads: CPU intra-op threads while measuring (None on CUDA).
        cudnn_benchmark: ``torch.backends.cudnn.benchmark`` while measuring (None on CPU).
        clock: "wall" (elapsed time; CUDA events on a GPU) or "cpu" (the process's CPU time: on a CPU shared with
            other jobs, with one thread, it leaves out the time the process waits for a core; CPU only).
    """

    device: str = "cpu"
    dtype: str = "float32"
    memory_format: str = "contiguous"
    batch_size: int = 1
    mode: str = "inference"
    num_threads: Optional[int] = None
    cudnn_benchmark: Optional[bool] = None
    clock: str = "wall"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {self.memory_format!r}")
        if self.clock not in CLOCKS:
            raise ValueError(f"clock must be one of {CLOCKS}, got {self.clock!r}")
        if self.clock == "cpu" and self.device_type != "cpu":
            raise ValueError("clock='cpu' times CPU work only; a GPU is timed with CUDA events (clock='wall')")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"dtype must name a torch dtype, got {self.dtype!r}")

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def _memory_format(settings: LatencySettings, ndim: int) -> Optional[torch.memory_format]:
    """The memory format of an ``ndim``-dimensional activation under ``settings`` (None: leave it as it is)."""
    if settings.memory_format != "channels_last":
        return None
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim)


# ---------------------------------------------------------------------------------------------- probes
@dataclass(frozen=True)
class LayerProbe:
    """One standalone conv or linear call to time.

    Attributes:
        kind: "conv" or "linear".
        input_shape: the input's full shape at the measured batch, with ``in_channels`` on the channel axis
            (dimension 1 for a conv, the last for a linear).
        in_channels / out_channels: the layer's kept input and output channels (features for a linear).
        kernel_size, stride, padding, dilation, groups, padding_mode: the conv's hyper-parameters (``groups``
            equals ``in_channels`` for a depthwise conv).
        bias: whether the layer has a bias.
        input_grad: in "train" mode, whether the training step computes the gradient of this layer's input
            (not for a layer reading the model's input).
    """

    kind: str
    input_shape: tuple
    in_channels: int
    out_channels: int
    kernel_size: tuple = ()
    stride: tuple = ()
    padding: Any = ()
    dilation: tuple = ()
    groups: int = 1
    padding_mode: str = "zeros"
    bias: bool = False
    input_grad: bool = True

    def layer(self, device: Any, dtype: torch.dtype) -> nn.Module:
        """The layer at these widths, freshly initialised."""
        if self.kind == "linear":
            return nn.Linear(self.in_channels, self.out_channels, self.bias, device=device, dtype=dtype)
        conv = _CONV_TYPES[len(self.kernel_size) - 1]
        return conv(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
                    self.groups, self.bias, self.padding_mode, device=device, dtype=dtype)


@dataclass(frozen=True, eq=False)
class ModelProbe:
    """A whole model to time: ``module`` (the timer converts and runs a copy) on ``inputs`` (the batch, as
    tensors); ``widths`` are all groups' widths when ``module`` is the exported network at those widths, None for
    any other module."""

    module: nn.Module
    inputs: tuple
    widths: Optional[tuple] = None


Probe = Union[LayerProbe, ModelProbe]
#: A timing function: seconds of one call of what the probe describes, under the model's settings.
Timer = Callable[[Probe], float]


class MeasuredTimer:
    """Times probes on the device: a layer's median of ``repeats`` calls after ``warmup`` calls, a whole model's
    of ``model_repeats`` after ``model_warmup`` (its calls are long and the calibration repeats them in rounds).

    A GPU is timed with CUDA events around each call (``cudnn.benchmark`` set as the settings say, so its
    autotuning happens in the warm-up), a CPU with the settings' clock and thread count. Inference calls run under
    ``torch.inference_mode`` in eval mode; train calls run a train-mode forward and ``torch.autograd.grad`` of
    the weights (and of the input where the probe says so), so no ``.grad`` is written anywhere.
    """

    def __init__(self, settings: LatencySettings, warmup: int = 2, repeats: int = 7, model_warmup: int = 1,
                 model_repeats: int = 3) -> None:
        if min(warmup, model_warmup) < 0 or min(repeats, model_repeats) < 1:
            raise ValueError("need warm-up calls >= 0 and timed calls >= 1, got "
                             f"{warmup}, {repeats}, {model_warmup}, {model_repeats}")
        self.settings = settings
        self.warmup, self.repeats = warmup, repeats
        self.model_warmup, self.model_repeats = model_warmup, model_repeats

    def __call__(self, probe: Probe) -> float:
        s = self.settings
        threads = torch.get_num_threads()
        benchmark = torch.backends.cudnn.benchmark
        try:
            if s.num_threads is not None:
                torch.set_num_threads(s.num_threads)
            if s.cudnn_benchmark is not None:
                torch.backends.cudnn.benchmark = s.cudnn_benchmark
            if s.device_type == "cpu":
                _settle_allocator()
            # CUDA events are recorded on the current device's stream: make it the measured device
            with torch.cuda.device(s.device) if s.device_type == "cuda" else contextlib.nullcontext():
                if isinstance(probe, LayerProbe):
                    return self._median_time(self._layer_call(probe), self.warmup, self.repeats,
                                             s.device_type == "cpu")
                return self._median_time(self._model_call(probe), self.model_warmup, self.model_repeats, False)
        finally:
            torch.set_num_threads(threads)
            torch.backends.cudnn.benchmark = benchmark

    def _layer_call(self, probe: LayerProbe) -> Callable[[], Any]:
        s = self.settings
        device, dtype = torch.device(s.device), s.torch_dtype
        layer = probe.layer(device, dtype)
        x = torch.randn(probe.input_shape, device=device, dtype=dtype)
        fmt = _memory_format(s, x.dim())
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
            layer = layer.to(memory_format=fmt)
        if s.mode == "inference":
            layer.eval()

            def infer() -> None:
                with torch.inference_mode():
                    layer(x)
            return infer
        x.requires_grad_(probe.input_grad)
        wrt = list(layer.parameters()) + ([x] if probe.input_grad else [])
        with torch.no_grad():
            grad_out = torch.randn_like(layer(x))
        return lambda: torch.autograd.grad(layer(x), wrt, grad_out)

    def _model_call(self, probe: ModelProbe) -> Callable[[], Any]:
        s = self.settings
        device, dtype = torch.device(s.device), s.torch_dtype
        module = copy.deepcopy(probe.module).to(device, dtype)  # the caller's module is neither moved nor trained
        inputs = tuple(_convert_input(t, s) for t in probe.inputs)
        fmt = _memory_format(s, 4)
        if fmt is not None:
            module = module.to(memory_format=fmt)
        if s.mode == "inference":
            module.eval()

            def infer() -> None:
                with torch.inference_mode():
                    module(*inputs)
            return infer
        module.train()
        params = [p for p in module.parameters() if p.requires_grad]

        def step() -> None:
            outs = [t for t in _tensors(module(*inputs)) if t.is_floating_point()]
            torch.autograd.grad(sum(t.float().mean() for t in outs), params)
        return step

    def _median_time(self, run: Callable[[], Any], warmup: int, repeats: int, fewest_faults: bool) -> float:
        """Median seconds of ``repeats`` calls of ``run`` after ``warmup`` calls. ``fewest_faults`` (a CPU
        layer): the median of ``repeats`` calls among those that caused the fewest page faults, drawn from at most
        three times as many calls (see :meth:`_cpu_samples`)."""
        s = self.settings
        for _ in range(warmup):
            run()
        if s.device_type == "cuda":
            torch.cuda.synchronize(s.device)
            samples = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            return statistics.median(samples)
        return statistics.median(self._cpu_samples(run, repeats, fewest_faults))

    def _cpu_samples(self, run: Callable[[], Any], repeats: int, fewest_faults: bool) -> list[float]:
        """Seconds of timed CPU calls. With ``fewest_faults``, only calls that caused (within a few pages) the
        fewest minor page faults count: a call whose output or scratch buffers land on memory the allocator has
        just mapped pays for faulting it in -- on a virtual machine that can double a convolution's time -- a cost
        set by the allocator's state, not by the layer, which the fit of the non-layer part charges to the
        activations instead (a whole model's time keeps it: its layers' allocations are what it is)."""
        clock = time.perf_counter if self.settings.clock == "wall" else time.process_time
        faults = _minor_faults if fewest_faults else (lambda: 0)
        samples: list[tuple[int, float]] = []
        for _ in range(3 * repeats):
            f0, t0 = faults(), clock()
            run()
            t1, f1 = clock(), faults()
            samples.append((f1 - f0, t1 - t0))
            low = min(f for f, _ in samples)
            kept = [t for f, t in samples if f <= low + _FAULT_SLACK]
            if len(kept) >= repeats:
                break
        return kept


_ALLOCATOR_SETTLED = False


def _settle_allocator() -> None:
    """Free one 31 MiB block, once per process, before timing on the CPU.

    glibc serves a block above its mmap threshold (128 KiB at start) with a fresh mapping, which costs a page
    fault per 4 KiB page on first touch and is unmapped when freed; freeing such a block raises the threshold to
    its size (up to 32 MiB). Until then a convolution of a few MiB can fault its output and scratch buffers in
    at every call -- about 3 us a page on a virtual machine, as much as the convolution itself -- or at none,
    depending on the heap's history. A long-running process (a training run) has freed blocks that large long
    ago; this gives the measurement that state. The block is never touched: it costs no fault."""
    global _ALLOCATOR_SETTLED
    if not _ALLOCATOR_SETTLED:
        del_me = torch.empty(31 * 2 ** 20, dtype=torch.uint8)
        del del_me
        _ALLOCATOR_SETTLED = True


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where the platform does not count them)."""
    if resource is None:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _tensors(value: Any) -> list[Tensor]:
    """The tensors in a module's output (a tensor, or nested tuples / lists / dicts of them)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _convert_input(t: Any, settings: LatencySettings) -> Any:
    """A model input on the settings' device, floating point ones in its dtype and memory format."""
    if not isinstance(t, Tensor):
        return t
    t = t.to(settings.device)
    if t.is_floating_point():
        t = t.to(settings.torch_dtype)
        fmt = _memory_format(settings, t.dim())
        if fmt is not None:
            t = t.contiguous(memory_format=fmt)
    return t


# ---------------------------------------------------------------------------------------------- layer terms
@dataclass
class _Term:
    """One conv / linear call: its widths as linear functions of the group widths, and its table."""

    node: str
    table: str                # key of its table (layers of the same shape share one)
    out_row: list[float]      # out width = out_row . w
    in_row: list[float]       # in width = in_row . w + in_const
    in_const: float
    activations: int          # output elements per output channel (batch x positions)


@dataclass
class _TableSpec:
    """What one table measures: a layer shape, and the widths its input and output axes can take."""

    key: str
    template: LayerProbe      # in / out channels are placeholders, set per sampled pair
    channel_axis: int
    depthwise: bool
    in_values: list[int]      # every reachable width, ascending ([1] for a depthwise conv: in follows out)
    out_values: list[int]

    def probe(self, in_w: int, out_w: int) -> LayerProbe:
        cin = out_w if self.depthwise else in_w
        shape = list(self.template.input_shape)
        shape[self.channel_axis] = cin
        groups = cin if self.depthwise else self.template.groups
        return LayerProbe(**{**asdict(self.template), "input_shape": tuple(shape), "in_channels": cin,
                             "out_channels": out_w, "groups": groups})


def _axis_values(layout: Layout, widths: Sequence[Sequence[int]]) -> list[int]:
    """Every channel count a layout can take when group ``g`` takes the widths ``widths[g]``: exact for one
    varying group; for several (a concat), the widths from the least to the most in steps of the gcd of
    theirs, a superset of the reachable sums that keeps the grid small."""
    varying = [(seg.repeat, widths[seg.group]) for seg in layout if len(widths[seg.group]) > 1]
    fixed = sum(seg.repeat * widths[seg.group][0] for seg in layout if len(widths[seg.group]) == 1)
    if len(varying) <= 1:
        return sorted({fixed + r * v for r, vs in varying for v in vs} or {fixed})
    low = fixed + sum(r * min(vs) for r, vs in varying)
    high = fixed + sum(r * max(vs) for r, vs in varying)
    step = 0
    for r, vs in varying:
        step = math.gcd(step, *(r * (b - a) for a, b in zip(vs, vs[1:])))
    return list(range(low, high + 1, step))


def _axis_subsets(values: Sequence[int]) -> list[list[int]]:
    """Nested samples of one axis, coarsest first: its ends, then for each of :data:`ALIGNMENTS` the multiples
    on the axis with their neighbours on it (see the module docstring), then every value."""
    values = sorted(values)
    chosen = {values[0], values[-1]}
    levels = [sorted(chosen)]
    for a in ALIGNMENTS:
        for i, v in enumerate(values):
            if v % a == 0:
                chosen.update(values[max(i - 1, 0):i + 2])
        levels.append(sorted(chosen))
    levels.append(list(values))
    return levels


def _scaled_batch(shape: Sequence[int], example_batch: int, batch: int) -> tuple:
    """``shape`` (traced at the example inputs' batch) at the measured batch: the leading dimension scaled."""
    if shape[0] % example_batch:
        raise ValueError(f"cannot scale a shape {tuple(shape)} traced at batch {example_batch} to batch {batch}: "
                         "its leading dimension is not a multiple of the batch")
    return (shape[0] // example_batch * batch, *shape[1:])


def _needs_grad(gm: fx.GraphModule) -> dict[str, bool]:
    """Per node, whether its value depends on a parameter (so a training step computes its gradient)."""
    params = {name for name, _ in gm.named_parameters()}
    modules = dict(gm.named_modules())
    out: dict[str, bool] = {}
    for node in gm.graph.nodes:
        own = (node.op == "call_module" and any(True for _ in modules[node.target].parameters())) or \
            (node.op == "get_attr" and str(node.target) in params)
        out[node.name] = own or any(out.get(a.name, False) for a in node.all_input_nodes)
    return out


class _Layers:
    """The conv / linear terms of a network and the tables they need, at a batch size."""

    def __init__(self, net: "TwoPathNetwork", batch_size: int) -> None:
        analysis = net.analysis
        gm = analysis.graph_module
        modules = dict(gm.named_modules())
        nodes = {n.name: n for n in gm.graph.nodes}
        grads = _needs_grad(gm)
        example_batch = _example_batch(net.example_inputs)
        granularity = dict(zip((g.index for g in net.prunable), net.gate_layout.granularities))
        self.group_widths = [list(range(granularity[g.index], g.channels + 1, granularity[g.index]))
                             if g.index in granularity else [g.channels] for g in net.groups]
        self.num_groups = len(net.groups)
        self.terms: list[_Term] = []
        self.tables: dict[str, _TableSpec] = {}
        for spec in analysis.layers.values():
            if spec.kind == "norm":
                continue
            module = modules[spec.target]
            x = nodes[spec.node].args[0]
            in_shape = _scaled_batch(analysis.node_shapes[x.name], example_batch, batch_size)
            out_shape = _scaled_batch(analysis.node_shapes[spec.node], example_batch, batch_size)
            out_values = _axis_values(spec.out_layout, self.group_widths)
            in_values = [1] if spec.depthwise else _axis_values(spec.in_layout, self.group_widths)
            if spec.kind == "conv":
                axis = 1
                template = LayerProbe("conv", in_shape, 0, 0, tuple(module.kernel_size), tuple(module.stride),
                                      module.padding, tuple(module.dilation), module.groups, module.padding_mode,
                                      module.bias is not None, grads.get(x.name, False))
                if module.groups > 1 and not spec.depthwise and (len(in_values) > 1 or len(out_values) > 1):
                    raise ValueError(f"grouped conv '{spec.target}' has a prunable width; the analysis keeps "
                                     "grouped convs dense")
            else:
                axis = len(in_shape) - 1
                template = LayerProbe("linear", in_shape, 0, 0, bias=module.bias is not None,
                                      input_grad=grads.get(x.name, False))
            shape = list(in_shape)
            shape[axis] = 0  # the channel count varies within a table
            template = LayerProbe(**{**asdict(template), "input_shape": tuple(shape)})
            key = json.dumps([asdict(template), spec.depthwise], sort_keys=True, default=str)
            table = self.tables.get(key)
            if table is None:
                table = self.tables[key] = _TableSpec(key, template, axis, spec.depthwise, [], [])
            table.in_values = sorted(set(table.in_values) | set(in_values))
            table.out_values = sorted(set(table.out_values) | set(out_values))
            out_row = [0.0] * self.num_groups
            in_row = [0.0] * self.num_groups
            for seg in spec.out_layout:
                out_row[seg.group] += seg.repeat
            if not spec.depthwise:
                for seg in spec.in_layout:
                    in_row[seg.group] += seg.repeat
            out_channels = out_shape[1] if spec.kind == "conv" else out_shape[-1]
            self.terms.append(_Term(spec.node, key, out_row, in_row, 1.0 if spec.depthwise else 0.0,
                                    _numel(out_shape) // out_channels))
        self.attention_row = [0.0] * self.num_groups
        for matmul in analysis.matmuls.values():  # MACs per kept head, at the measured batch
            for seg in matmul.layout:
                self.attention_row[seg.group] += seg.repeat * matmul.macs_per_position * batch_size / example_batch

    def regressors(self) -> dict[str, list[float]]:
        """The non-layer part's regressors as rows over the group widths (``R_r(w) = row . w``)."""
        act = [0.0] * self.num_groups
        for t in self.terms:
            for g, r in enumerate(t.out_row):
                act[g] += r * t.activations
        rows = {"activations": act}
        if any(self.attention_row):
            rows["attention_macs"] = self.attention_row
        return rows


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _example_batch(example_inputs: Any) -> int:
    first = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    return int(first.shape[0])


def _batch(example_inputs: Any, batch_size: int) -> tuple:
    """The example inputs repeated along the batch to ``batch_size`` samples."""
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    out = []
    for t in inputs:
        if isinstance(t, Tensor) and t.dim() > 0:
            t = t.detach()[torch.arange(batch_size, device=t.device) % t.shape[0]]
        out.append(t)
    return tuple(out)


# ---------------------------------------------------------------------------------------------- signature
def model_signature(net: "TwoPathNetwork") -> str:
    """SHA-256 of what a latency depends on in the network: its traced code, every leaf module's type and
    hyper-parameters, the traced shapes, the groups (sizes, prunable, granularities) and the layer specs."""
    analysis = net.analysis
    gm = analysis.graph_module
    granularity = dict(zip((g.index for g in net.prunable), net.gate_layout.granularities))
    leaves = [(name, repr(m)) for name, m in gm.named_modules() if not any(True for _ in m.children())]
    layers = [(s.node, s.target, s.kind, s.depthwise, repr(s.in_layout), repr(s.out_layout))
              for s in analysis.layers.values()]
    content = {
        "code": gm.code,
        "leaves": leaves,
        "shapes": sorted((k, list(v)) for k, v in analysis.node_shapes.items()),
        "groups": [(g.channels, g.prunable, granularity.get(g.index)) for g in net.groups],
        "layers": layers,
        "matmuls": sorted((m.node, repr(m.layout), m.macs_per_position) for m in analysis.matmuls.values()),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- the model
class LatencyModel:
    """Predicted latency (seconds) of a network's exported hard network at any widths of its channel groups.

    Build it with :meth:`build`. ``widths`` are always those of all groups, indexed like ``net.groups`` (frozen
    groups at full width), as :meth:`s2hk.engine.TwoPathNetwork.all_widths` gives them.

    Attributes:
        settings: the :class:`LatencySettings` measured under.
        dense_latency: measured seconds of the exported network at full width.
        metadata: how it was built: build seconds, timer calls, points sampled, the grid's alignment level and
            whether the budget reduced it, the calibration architectures and the non-layer part's fit.
    """

    def __init__(self, net: "TwoPathNetwork", layers: _Layers, settings: LatencySettings, tables: dict,
                 dense_latency: float, coefficients: dict[str, float], metadata: dict, timer: Timer,
                 inputs: tuple) -> None:
        self.settings = settings
        self.dense_latency = float(dense_latency)
        self.metadata = metadata
        self.timer = timer
        self._inputs = inputs
        self._layers = layers
        self._tables = tables  # key -> (in values, out values, seconds [in][out])
        self.coefficients = dict(coefficients)
        self._num_groups = len(net.groups)
        self._full = [g.channels for g in net.groups]
        self._nodes = [t.node for t in layers.terms]
        self._constants = _term_constants(layers, tables, self._num_groups, self.coefficients)
        self._on_device: dict[torch.device, dict[str, Tensor]] = {}
        full = torch.tensor(self._full, dtype=torch.float64)
        at_full = self.coefficients["layers"] * self._layer_seconds(full, self._constants, None) + \
            self._fixed_varying(full, self._constants, None)
        self.constant = self.dense_latency - float(at_full)  # the prediction at full width is the dense latency

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, net: "TwoPathNetwork", example_inputs: Any = None, *, device: Any = None,
              dtype: Optional[torch.dtype] = None, memory_format: str = "contiguous",
              batch_size: Optional[int] = None, mode: str = "inference", num_threads: Optional[int] = None,
              cudnn_benchmark: Optional[bool] = None, clock: str = "wall", budget_s: Optional[float] = None,
              calibration: Sequence[float] = DEFAULT_CALIBRATION, rounds: int = 2, warmup: int = 2,
              repeats: int = 7, model_warmup: int = 1, model_repeats: int = 3,
              cache: bool = True, cache_dir: Optional[Union[str, os.PathLike]] = None, progress: bool = True,
              timer: Optional[Timer] = None) -> "LatencyModel":
        """Measure (or load from the cache) the latency model of ``net``.

        Args:
            net: the two-path network (a pruner) whose hard network is to be timed.
            example_inputs: a batch shaped like ``net``'s example inputs (same shape after the batch dimension);
                its batch is the measured one unless ``batch_size`` is given. Default: ``net.example_inputs``.
            device: default: where ``net`` is. dtype: default: the dtype of ``net``'s weights (pass
                ``torch.bfloat16`` for a bf16-autocast run).
            memory_format, mode, clock: see :class:`LatencySettings`.
            num_threads: CPU threads while measuring (default: torch's current count).
            cudnn_benchmark: default: torch's current setting.
            budget_s: seconds the measurement may take (default 120 on a CPU, 60 on a GPU); the grid is sampled
                more coarsely to fit (see the module docstring).
            calibration: width fractions around which random architectures (seeded) are drawn and their exports
                timed, to fit the non-layer part and the tables' scale (more: a better fit, a longer build).
            rounds: how many times the dense and calibration exports are each timed, in turn.
            warmup, repeats: a layer's calls before timing, and timed calls (their median is kept).
            model_warmup, model_repeats: the same for a whole network (per round of the calibration).
            cache: read and write the JSON cache.
            cache_dir: the cache folder (default :func:`default_cache_dir`).
            progress: show a progress bar while measuring.
            timer: a timing function of a :class:`LayerProbe` or :class:`ModelProbe` (default: a
                :class:`MeasuredTimer` for these settings); tests pass a deterministic cost.
        """
        example_inputs = net.example_inputs if example_inputs is None else example_inputs
        _check_inputs(net.example_inputs, example_inputs)
        device = torch.device(device) if device is not None else net.ranks.device
        if dtype is None:
            dtype = next((p.dtype for p in net.weight_parameters() if p.is_floating_point()), torch.float32)
        settings = LatencySettings(
            device=str(device), dtype=str(dtype).removeprefix("torch."), memory_format=memory_format,
            batch_size=int(batch_size or _example_batch(example_inputs)), mode=mode,
            num_threads=(num_threads or torch.get_num_threads()) if device.type == "cpu" else None,
            cudnn_benchmark=(torch.backends.cudnn.benchmark if cudnn_benchmark is None else cudnn_benchmark)
            if device.type == "cuda" else None, clock=clock)
        budget = float(budget_s if budget_s is not None else DEFAULT_BUDGET_S.get(device.type, 60.0))
        layers = _Layers(net, settings.batch_size)
        inputs = _batch(example_inputs, settings.batch_size)
        timer = timer or MeasuredTimer(settings, warmup, repeats, model_warmup, model_repeats)
        sampling = {"budget_s": budget, "calibration": [float(f) for f in calibration], "rounds": rounds,
                    "warmup": warmup, "repeats": repeats, "model_warmup": model_warmup,
                    "model_repeats": model_repeats, "alignments": list(ALIGNMENTS)}
        key = cache_key(net, settings, sampling)
        path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = path / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]}.json"
        if cache and path.exists():
            loaded = _read_cache(path, key, layers)
            if loaded is not None:
                tables, dense, coefficients, metadata = loaded
                return cls(net, layers, settings, tables, dense, coefficients, {**metadata, "cache": str(path)},
                           timer, inputs)
        tables, dense, coefficients, metadata = _measure(net, layers, inputs, timer, budget, list(calibration),
                                                         rounds, progress, (warmup + repeats,
                                                                            model_warmup + model_repeats))
        model = cls(net, layers, settings, tables, dense, coefficients, metadata, timer, inputs)
        if cache:
            _write_cache(path, key, model)
            model.metadata["cache"] = str(path)
        return model

    # ------------------------------------------------------------------ prediction
    def _device_constants(self, device: torch.device) -> dict[str, Tensor]:
        if device not in self._on_device:
            self._on_device[device] = {k: v.to(device) for k, v in self._constants.items()}
        return self._on_device[device]

    @staticmethod
    def _layer_seconds(widths: Tensor, c: dict[str, Tensor], keep: Optional[Tensor]) -> Tensor:
        """Sum of the layers' interpolated seconds at float widths ``(G,)`` (times ``keep`` per layer)."""
        seconds = _interpolate(c, c["in_m"] @ widths + c["in_c"], c["out_m"] @ widths)
        if keep is not None:
            seconds = seconds * keep
        return seconds.sum()

    @staticmethod
    def _fixed_varying(widths: Tensor, c: dict[str, Tensor], keep: Optional[Tensor]) -> Tensor:
        """The non-layer part less its constant: the activations of the layers that run (a skipped layer's output
        is neither written nor normed) and attention's matrix products, with their fitted coefficients."""
        activations = c["activations"] * (c["out_m"] @ widths)
        if keep is not None:
            activations = activations * keep
        return activations.sum() + c["attention"] @ widths

    def _keep_mask(self, skipped_nodes: Collection[str], device: torch.device) -> Optional[Tensor]:
        if not skipped_nodes:
            return None
        return torch.tensor([n not in skipped_nodes for n in self._nodes], dtype=torch.float64, device=device)

    def latency(self, widths: Tensor, *, skipped_nodes: Collection[str] = ()) -> Tensor:
        """Predicted seconds at float widths of all groups ``(G,)`` (any float dtype and device), differentiable
        in them; 0-dim float64. ``skipped_nodes``: fx node names of layer calls that do not run (the layers of
        skipped residual blocks, :attr:`s2hk.depth.SkippableBlock.layers`): their table and their share of the
        activation regressor are left out; the rest of the non-layer part is not."""
        if widths.shape != (self._num_groups,):
            raise ValueError(f"widths must have shape ({self._num_groups},) (all groups), got {tuple(widths.shape)}")
        w = widths.to(torch.float64)
        c = self._device_constants(w.device)
        keep = self._keep_mask(skipped_nodes, w.device)
        return self.coefficients["layers"] * self._layer_seconds(w, c, keep) + \
            self._fixed_varying(w, c, keep) + self.constant

    def predict(self, widths: Sequence[int], *, skipped_nodes: Collection[str] = ()) -> float:
        """Predicted seconds of the exported network at integer widths of all groups (as
        :meth:`s2hk.flops.FlopsPolynomial.flops_at`); see :meth:`latency`."""
        return float(self.latency(torch.tensor([float(w) for w in widths], dtype=torch.float64),
                                  skipped_nodes=skipped_nodes))

    def ratio(self, widths: Tensor, *, skipped_nodes: Collection[str] = ()) -> Tensor:
        """Predicted latency over the dense latency for float widths of all groups ``(G,)``, differentiable
        (the straight-through widths of ``net.gates()``); 0-dim float64, on the widths' device."""
        return self.latency(widths, skipped_nodes=skipped_nodes) / self.dense_latency

    def ratio_at(self, widths: Sequence[int], *, skipped_nodes: Collection[str] = ()) -> float:
        """:meth:`ratio` at integer widths, as a float."""
        return self.predict(widths, skipped_nodes=skipped_nodes) / self.dense_latency

    # ------------------------------------------------------------------ measurement
    def measure(self, module: nn.Module) -> float:
        """Measured seconds of one call of ``module`` (an exported network) on the batch, under the settings."""
        return self.timer(ModelProbe(module, self._inputs))

    def measure_at(self, net: "TwoPathNetwork", widths: Sequence[int]) -> float:
        """Measured seconds of ``net``'s export at integer widths of all groups; ``net`` is left as it was."""
        return self.timer(ModelProbe(export_at(net, widths), self._inputs, tuple(int(w) for w in widths)))

    def layer_seconds(self, node: str, in_width: float, out_width: float) -> float:
        """The standalone seconds of layer call ``node`` at ``in_width`` input and ``out_width`` output channels,
        interpolated from its table (before the fit's scale ``coefficients["layers"]``); a depthwise conv's input
        follows its output (pass 1 as ``in_width``, as its table's input axis says)."""
        k = self._term_index(node)
        c = {name: v[k:k + 1] for name, v in self._constants.items() if name in ("x", "y", "v", "last")}
        x, y = (torch.tensor([float(v)], dtype=torch.float64) for v in (in_width, out_width))
        return float(_interpolate(c, x, y)[0])

    def _term_index(self, node: str) -> int:
        if node not in self._nodes:
            raise KeyError(f"no conv / linear layer call named '{node}'")
        return self._nodes.index(node)

    def table(self, node: str) -> tuple[list[int], list[int], list[list[float]]]:
        """The measured table of layer call ``node``: sampled input widths, output widths and seconds
        ``[in][out]`` (a depthwise conv's input axis is ``[1]``: its input follows its output)."""
        term = self._layers.terms[self._term_index(node)]
        in_v, out_v, sec = self._tables[term.table]
        return list(in_v), list(out_v), [list(r) for r in sec]

    def to_json(self) -> dict:
        """The measurements as JSON-ready data (what the cache stores besides its key)."""
        return {"tables": [{"key": k, "in": v[0], "out": v[1], "seconds": v[2]} for k, v in self._tables.items()],
                "dense_s": self.dense_latency, "coefficients": self.coefficients,
                "metadata": {k: v for k, v in self.metadata.items() if k != "cache"}}


def _term_constants(layers: _Layers, tables: dict, num_groups: int, coefficients: dict[str, float]
                    ) -> dict[str, Tensor]:
    """Per term, its table padded to the largest grid (float64): axes ``x`` / ``y`` (T, K) continued past the
    last value by +1 steps, seconds ``v`` (T, Kin, Kout) repeating the last row and column, so a padded cell is
    flat and never entered by a width on the axis; ``last`` the index of each axis' last real cell. Also the
    width maps (``in_m``, ``in_c``, ``out_m``) and the non-layer part's regressors times their coefficients:
    ``activations`` per term (per output channel), ``attention`` per group."""
    terms = layers.terms
    n = len(terms)
    kin = max([len(tables[t.table][0]) for t in terms] + [2])
    kout = max([len(tables[t.table][1]) for t in terms] + [2])
    xs = torch.zeros(n, kin, dtype=torch.float64)
    ys = torch.zeros(n, kout, dtype=torch.float64)
    vs = torch.zeros(n, kin, kout, dtype=torch.float64)
    last = torch.zeros(n, 2, dtype=torch.long)
    for i, t in enumerate(terms):
        in_v, out_v, sec = tables[t.table]
        xs[i] = _padded_axis(in_v, kin)
        ys[i] = _padded_axis(out_v, kout)
        table = torch.tensor(sec, dtype=torch.float64)
        table = torch.cat([table, table[-1:].expand(kin - len(in_v), -1)], 0)
        vs[i] = torch.cat([table, table[:, -1:].expand(-1, kout - len(out_v))], 1)
        last[i] = torch.tensor([max(len(in_v) - 2, 0), max(len(out_v) - 2, 0)])
    attention = torch.tensor(layers.attention_row, dtype=torch.float64)
    return {"x": xs, "y": ys, "v": vs, "last": last,
            "out_m": torch.tensor([t.out_row for t in terms], dtype=torch.float64).reshape(n, num_groups),
            "in_m": torch.tensor([t.in_row for t in terms], dtype=torch.float64).reshape(n, num_groups),
            "in_c": torch.tensor([t.in_const for t in terms], dtype=torch.float64),
            # the regressors' rows scaled by their coefficients ("layers", the tables' scale, is applied apart)
            "activations": coefficients["activations"] * torch.tensor([float(t.activations) for t in terms],
                                                                      dtype=torch.float64),
            "attention": coefficients.get("attention_macs", 0.0) * attention}


def _interpolate(c: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Per term, its table interpolated bilinearly at input width ``x`` and output width ``y`` (both ``(T,)``);
    differentiable in them (the slopes of the cell, which is the one below at a knot)."""
    i = _cell(c["x"], x, c["last"][:, 0])
    j = _cell(c["y"], y, c["last"][:, 1])
    a = _fraction(c["x"], x, i)
    b = _fraction(c["y"], y, j)
    rows = torch.arange(len(x), device=x.device)
    v = c["v"]
    return (1 - a) * (1 - b) * v[rows, i, j] + a * (1 - b) * v[rows, i + 1, j] + \
        (1 - a) * b * v[rows, i, j + 1] + a * b * v[rows, i + 1, j + 1]


def _padded_axis(values: Sequence[int], size: int) -> Tensor:
    """An axis' values continued by +1 steps to ``size`` entries (strictly increasing, for searchsorted)."""
    tail = [values[-1] + k for k in range(1, size - len(values) + 1)]
    return torch.tensor(list(values) + tail, dtype=torch.float64)


def _cell(axes: Tensor, x: Tensor, last: Tensor) -> Tensor:
    """Per term, the cell ``[axes[i], axes[i+1]]`` holding ``x``; at a knot, the cell below it."""
    i = torch.searchsorted(axes, x.detach().unsqueeze(1)).squeeze(1) - 1
    return torch.minimum(i.clamp(min=0), last)


def _fraction(axes: Tensor, x: Tensor, i: Tensor) -> Tensor:
    """Position of ``x`` in its cell, 0 at the lower knot, 1 at the upper (clamped: flat outside the grid)."""
    rows = torch.arange(len(x), device=x.device)
    lo, hi = axes[rows, i], axes[rows, i + 1]
    return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)


def export_at(net: "TwoPathNetwork", widths: Sequence[int]) -> fx.GraphModule:
    """``net``'s export with every prunable group at its width in ``widths`` (all groups' widths, the most
    important channels kept); ``net``'s pins are restored afterwards."""
    saved = net.pins()
    try:
        net.set_pins({g.index: int(widths[g.index]) for g in net.prunable})
        return net.export()
    finally:
        net.set_pins(saved)


def _check_inputs(reference: Any, given: Any) -> None:
    ref = reference if isinstance(reference, (tuple, list)) else (reference,)
    new = given if isinstance(given, (tuple, list)) else (given,)
    shapes = [tuple(t.shape[1:]) if isinstance(t, Tensor) else None for t in ref]
    if len(ref) != len(new) or shapes != [tuple(t.shape[1:]) if isinstance(t, Tensor) else None for t in new]:
        raise ValueError("example_inputs must have the network's example input shapes after the batch dimension "
                         f"({shapes}): the layer shapes were traced at them")


# ---------------------------------------------------------------------------------------------- measuring
def _calibration_widths(net: "TwoPathNetwork", fraction: float, rng: random.Random) -> list[int]:
    """All groups' widths with every prunable group at a random width on its grid around ``fraction`` of its
    channels (between half and one and a half times it): architectures of a given overall size whose groups
    differ, as a search visits them."""
    widths = [g.channels for g in net.groups]
    for g, d in zip(net.prunable, net.gate_layout.granularities):
        target = fraction * g.channels * rng.uniform(0.5, 1.5)
        widths[g.index] = min(g.channels, max(d, d * round(target / d)))
    return widths


def _measure(net: "TwoPathNetwork", layers: _Layers, inputs: tuple, timer: Timer, budget: float,
             calibration: list[float], rounds: int, progress: bool, calls: tuple[int, int]) -> tuple:
    """Time the dense export, the tables (refined level by level while the budget lasts) and the calibration
    exports; returns ``(tables, dense seconds, coefficients, metadata)``.

    The budget is planned from what each timer call costs: the larger of its elapsed wall time and the seconds
    it reports times its calls (``calls``: a layer's and a network's warm-up and timed calls). The ends of every
    axis are measured first; the cost of measuring any other point is estimated by interpolating the costs of
    its table's corners bilinearly, and a calibration export's by the dense one's (an upper bound). The finest
    alignment level whose estimate fits is planned; if the real time runs over, measuring stops at once and the
    levels completed are used.

    On a machine whose load changes while it is measured, what is measured close in time is comparable: each
    level's points are timed in a shuffled order across the tables (a slow minute slows no table more than
    another), and the calibration exports are timed in ``rounds`` rounds, each with the dense export, their
    medians fitted against the dense median."""
    start = time.perf_counter()
    full = [g.channels for g in net.groups]
    bar = _progress_bar(progress)
    shuffle = random.Random(0).shuffle  # a fixed order: the same network is measured the same way
    spent = {"timer_calls": 0}

    def timed(probe: Probe) -> tuple[float, float]:
        t0 = time.perf_counter()
        seconds = timer(probe)
        spent["timer_calls"] += 1
        if bar is not None:
            bar.update(1)
        return seconds, max(time.perf_counter() - t0, calls[isinstance(probe, ModelProbe)] * seconds)

    try:
        specs = list(layers.tables.values())
        grids = [(_axis_subsets(s.in_values), _axis_subsets(s.out_values)) for s in specs]
        levels = len(grids[0][0]) if grids else 1
        points: list[dict[tuple[int, int], tuple[float, float]]] = [{} for _ in specs]  # (seconds, cost)

        def new_points(level: int) -> list[tuple[int, tuple[int, int]]]:
            """(table, (in, out)) of the points a level adds to what is measured, in a shuffled order."""
            todo = [(k, (i, o)) for k, (ins, outs) in enumerate(grids) for i in ins[level] for o in outs[level]
                    if (i, o) not in points[k]]
            shuffle(todo)
            return todo

        def measure_level(level: int, bounded: bool = True) -> bool:
            """Measure the points ``level`` adds; False if the budget ran out first (the level is then unused)."""
            for k, pair in new_points(level):
                if bounded and time.perf_counter() - start + reserve > budget:
                    return False
                points[k][pair] = timed(specs[k].probe(*pair))
            return True

        models = rounds * (1 + len(calibration))
        if bar is not None:
            bar.reset(total=1 + len(new_points(0)) + models)
            bar.set_description("latency: dense model and table corners")
        full_export = export_at(net, full)
        first_dense, model_cost = timed(ModelProbe(full_export, inputs, tuple(full)))
        reserve = model_cost * models  # the calibration exports are narrower: each costs at most the dense one
        measure_level(0, bounded=False)
        elapsed = time.perf_counter() - start
        planned = 0  # the ends of every axis are always measured; finer levels while the estimate fits
        for level in range(1, levels):
            todo = sum(_corner_estimate(points[k], pair) for k, pair in new_points(level))
            if elapsed + reserve + todo > budget:
                break
            planned = level
        if bar is not None:
            bar.reset(total=spent["timer_calls"] + len(new_points(planned)) + models)
            bar.update(spent["timer_calls"])
            bar.set_description("latency: layer tables")
        reached = 0
        for level in range(1, planned + 1):
            if not measure_level(level):
                break  # measured more slowly than planned: keep the levels completed
            reached = level
        tables = {}
        for k, spec in enumerate(specs):
            ins, outs = grids[k][0][reached], grids[k][1][reached]
            tables[spec.key] = (ins, outs, [[points[k][(i, o)][0] for o in outs] for i in ins])
        if bar is not None:
            bar.set_description("latency: calibration exports")
        rng = random.Random(0)
        archs = [(full, full_export)] + [(w, export_at(net, w)) for w in
                                         (_calibration_widths(net, f, rng) for f in calibration)]
        samples: list[list[float]] = [[first_dense]] + [[] for _ in calibration]
        for _ in range(rounds):
            for a, (widths, module) in enumerate(archs):
                samples[a].append(timed(ModelProbe(module, inputs, tuple(widths)))[0])
    finally:
        if bar is not None:
            bar.close()
    dense = statistics.median(samples[0])
    calib = [(w, statistics.median(v)) for (w, _), v in zip(archs[1:], samples[1:])]
    coefficients, fit = _fit_fixed(layers, tables, dense, full, calib)
    level_names = ["ends"] + [f"multiples of {a}" for a in ALIGNMENTS] + ["every width"]
    metadata = {
        "build_s": time.perf_counter() - start,
        "timer_calls": spent["timer_calls"],
        "tables": len(tables),
        "points": sum(len(v[0]) * len(v[1]) for v in tables.values()),
        "grid": level_names[reached],
        "grid_reduced": reached < levels - 1,
        "budget_s": budget,
        "dense_samples_s": samples[0],
        "calibration": [{"widths": w, "measured_s": s} for w, s in calib],
        "fit": fit,
    }
    return tables, dense, coefficients, metadata


def _corner_estimate(measured: dict[tuple[int, int], tuple[float, float]], pair: tuple[int, int]) -> float:
    """The cost of measuring ``pair``, interpolated bilinearly from the measured costs of its table's corners."""
    ins = sorted({i for i, _ in measured})
    outs = sorted({o for _, o in measured})
    a = (pair[0] - ins[0]) / (ins[-1] - ins[0]) if ins[-1] > ins[0] else 0.0
    b = (pair[1] - outs[0]) / (outs[-1] - outs[0]) if outs[-1] > outs[0] else 0.0
    corner = {(i, o): measured[(i, o)][1] for i in (ins[0], ins[-1]) for o in (outs[0], outs[-1])}
    return (1 - a) * (1 - b) * corner[ins[0], outs[0]] + a * (1 - b) * corner[ins[-1], outs[0]] + \
        (1 - a) * b * corner[ins[0], outs[-1]] + a * b * corner[ins[-1], outs[-1]]


def _progress_bar(enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=1, desc="latency", leave=False, dynamic_ncols=True)


def _fit_fixed(layers: _Layers, tables: dict, dense: float, full: list[int],
               calib: list[tuple[list[int], float]]) -> tuple[dict[str, float], dict]:
    """Non-negative least-squares coefficients of the model's regressors -- ``layers``, the scale of the summed
    tables, and the non-layer part's rows -- fitted to the calibration exports' latencies relative to the dense
    one (the constant then follows from the dense anchor). The scale absorbs what a layer costs inside the
    network beyond or below its standalone time (caches warm from the previous layer, the allocator's state);
    without calibration it is 1."""
    rows = layers.regressors()
    constants = _term_constants(layers, tables, len(full), {n: 0.0 for n in rows})

    def regressors(widths: Sequence[int]) -> list[float]:
        layer_sum = float(LatencyModel._layer_seconds(torch.tensor(widths, dtype=torch.float64), constants, None))
        return [layer_sum] + [sum(r * w for r, w in zip(row, widths)) for row in rows.values()]

    names = ["layers", *rows]
    at_full = regressors(full)
    design = [[r - f for r, f in zip(regressors(w), at_full)] for w, _ in calib]
    targets = [s - dense for _, s in calib]
    if not calib:
        return dict(zip(names, [1.0] + [0.0] * len(rows))), {"regressors": names, "layers_at_full_s": at_full[0],
                                                               "residuals_s": []}
    # a prior row pulls the scale towards 1 with the weight of the data's own layer column: a few noisy
    # timings cannot scale the tables away (to 0, where the prediction would ignore them)
    weight = math.sqrt(sum(row[0] ** 2 for row in design))
    coef = _nonnegative_lstsq(design + [[weight] + [0.0] * len(rows)], targets + [weight])
    return dict(zip(names, coef)), {"regressors": names, "layers_at_full_s": at_full[0],
                                     "residuals_s": [t - sum(c * d for c, d in zip(coef, row))
                                                     for t, row in zip(targets, design)]}


def _nonnegative_lstsq(design: list[list[float]], targets: list[float]) -> list[float]:
    """``argmin ||design c - targets||`` over ``c >= 0``, by trying every subset of free columns (there are at
    most three)."""
    n = len(design[0]) if design else 0
    a = torch.tensor(design, dtype=torch.float64).reshape(len(design), n)
    b = torch.tensor(targets, dtype=torch.float64)
    best, best_err = [0.0] * n, float(b.pow(2).sum())
    for mask in range(1, 2 ** n):
        cols = [k for k in range(n) if mask >> k & 1]
        sub = a[:, cols]
        if torch.linalg.matrix_rank(sub) < len(cols):
            continue
        sol = torch.linalg.lstsq(sub, b.unsqueeze(1), driver="gelsd").solution.squeeze(1)
        if (sol < 0).any():
            continue
        err = float((sub @ sol - b).pow(2).sum())
        if err < best_err:
            best_err = err
            best = [0.0] * n
            for k, v in zip(cols, sol.tolist()):
                best[k] = v
    return best


# ---------------------------------------------------------------------------------------------- cache
def cache_key(net: "TwoPathNetwork", settings: LatencySettings, sampling: dict) -> dict:
    """What a cached model is valid for: the device's name, the library versions, the settings, how it was
    sampled and the network's :func:`model_signature`."""
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION,
            "device": device_name(settings.device), "versions": versions(), "settings": asdict(settings),
            "sampling": sampling, "model": model_signature(net)}


def _write_cache(path: Path, key: dict, model: LatencyModel) -> None:
    data = json.dumps({"key": key, **model.to_json()}, indent=1, sort_keys=True).encode()
    atomic_write(path, lambda f: f.write(data))


def _read_cache(path: Path, key: dict, layers: _Layers) -> Optional[tuple]:
    """The cached ``(tables, dense seconds, coefficients, metadata)``, or None (with a warning naming the file)
    when the file is unreadable, is for another key or does not cover every layer of the network."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("key") != key:
            raise ValueError("its key is not this model's and settings'")
        tables = {}
        for t in data["tables"]:
            ins, outs, sec = [int(v) for v in t["in"]], [int(v) for v in t["out"]], t["seconds"]
            if not ins or not outs or ins != sorted(set(ins)) or outs != sorted(set(outs)):
                raise ValueError(f"table '{t['key']}' has unsorted or empty axes")
            if len(sec) != len(ins) or any(len(r) != len(outs) for r in sec):
                raise ValueError(f"table '{t['key']}' does not match its axes")
            sec = [[_finite(v) for v in r] for r in sec]
            tables[str(t["key"])] = (ins, outs, sec)
        for spec in layers.tables.values():
            if spec.key not in tables:
                raise ValueError(f"no table for a layer of shape {spec.template.input_shape}")
            ins, outs, _ = tables[spec.key]
            if ins[0] > spec.in_values[0] or ins[-1] < spec.in_values[-1] or \
                    outs[0] > spec.out_values[0] or outs[-1] < spec.out_values[-1]:
                raise ValueError(f"table '{spec.key}' does not span the layer's widths")
        expected = {"layers", *layers.regressors()}
        coefficients = {str(k): _finite(v) for k, v in data["coefficients"].items()}
        if set(coefficients) != expected:
            raise ValueError(f"coefficients {sorted(coefficients)} are not {sorted(expected)}")
        dense = _finite(data["dense_s"])
        if dense <= 0:
            raise ValueError("its dense latency is not positive")
        metadata = data["metadata"]
        if not isinstance(metadata, dict):
            raise ValueError("its metadata is not a mapping")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        warnings.warn(f"latency cache file {path} is unusable ({type(e).__name__}: {e}); it is ignored and the "
                      "model is measured again", stacklevel=3)
        return None
    return tables, dense, coefficients, metadata


def _finite(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")
    return float(value)
