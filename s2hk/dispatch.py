"""Which implementation runs a hot op: the one rule for every op in s2hk.

Every op has a PyTorch ``reference`` (the ground truth, always available) and may have a ``cpp`` op in the
extension ``s2hk._C`` (csrc/, CPU and CUDA kernels) and/or a ``triton`` kernel (s2hk.kernels). The choice:

- ``S2HK_IMPL`` = ``auto`` (default) | ``reference`` | ``cpp`` | ``triton``, overridden in-process by
  :func:`use_impl` (innermost wins). A request for every op (``S2HK_IMPL=triton``) applies to the ops that have
  that kind of implementation; an op with no implementation of that kind at all chooses as ``auto`` (the same
  math, so results do not change). A request can name ops: ``S2HK_IMPL=bn_gate_act=triton`` (or
  ``S2HK_IMPL=cpp,bn_gate_act=triton``; ``use_impl("triton", ops=("bn_gate_act",))``) -- naming an op with a
  kind it does not have raises;
- ``auto`` takes the first implementation the op lists (fastest first) that can run on the tensors' device, and
  falls back quietly to the reference. A Triton kernel is taken by ``auto`` only where :data:`TRITON_WINS`
  records it measured faster on that very GPU model (by name) -- never for CPU tensors (its CPU interpreter is
  for tests);
- an explicit request that cannot be honoured raises :class:`ImplementationUnavailable`, naming the op and
  what is missing.

Importing s2hk never needs a GPU, nvcc or the built extension: :func:`extension` returns ``s2hk._C`` or
``None``, and the first time it is missing and wanted, one warning (per process) says why and how to build it.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional, Sequence, Union

import torch

__all__ = ["IMPLS", "TRITON_WINS", "RESULTS_DIR", "ImplementationUnavailable", "extension", "requested_impl",
           "use_impl", "choose", "load_triton_wins"]

#: Values of ``S2HK_IMPL`` / :func:`use_impl`.
IMPLS = ("auto", "reference", "cpp", "triton")

#: Where ``bench/kernels_gpu.py`` writes its measurements, one file per GPU model: ``kernels-<device>.json``
#: (bench/results of the source tree; ``S2HK_KERNEL_RESULTS`` names another directory).
RESULTS_DIR = Path(os.environ.get("S2HK_KERNEL_RESULTS")
                   or Path(__file__).resolve().parent.parent / "bench" / "results")


def load_triton_wins(directory: Union[str, Path] = RESULTS_DIR) -> dict[str, tuple[str, ...]]:
    """op -> the names of the GPU models (``torch.cuda.get_device_name``) on which ``bench/kernels_gpu.py``
    measured the op's Triton kernel faster than the implementation it replaces, read from every
    ``kernels-*.json`` in ``directory`` (its ``"device"`` and ``"wins"`` entries). A missing directory, or an
    unreadable file, contributes no win: ``auto`` then keeps the PyTorch composition."""
    wins: dict[str, list[str]] = {}
    for path in sorted(Path(directory).glob("kernels-*.json")):
        try:
            record = json.loads(path.read_text())
            device, ops = str(record["device"]), [str(op) for op in record["wins"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        for op in ops:
            wins.setdefault(op, []).append(device)
    return {op: tuple(devices) for op, devices in wins.items()}


#: The table of measured wins, read at import from the committed measurements (:func:`load_triton_wins`):
#: op -> the GPU models on which its Triton kernel was measured faster than the PyTorch composition (or C++ op)
#: it replaces, in every case the benchmark's verdict counts. ``auto`` runs a Triton kernel only on a GPU
#: listed here for the op; an explicit ``triton`` request does not consult it.
TRITON_WINS: dict[str, tuple[str, ...]] = load_triton_wins()


@functools.lru_cache(maxsize=None)
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _measured_win(op: str, device: torch.device) -> bool:
    """Whether :data:`TRITON_WINS` lists ``device``'s GPU model for ``op`` (no device query when it lists none)."""
    names = TRITON_WINS.get(op, ())
    if device.type != "cuda" or not names:
        return False
    return _gpu_name(device.index if device.index is not None else torch.cuda.current_device()) in names


_BUILD_HINT = ("build it with `pip install -e . --no-build-isolation` from the s2hk source tree (needs a C++17 "
               "compiler; its CUDA kernels also need a CUDA build of torch and nvcc at build time)")


@dataclass(frozen=True)
class _Request:
    """A requested implementation: ``default`` for every op (None: not set at this level), ``per_op`` for the
    named ops (later entries win)."""

    default: Optional[str] = None
    per_op: tuple[tuple[str, str], ...] = ()

    def kind_for(self, op: Optional[str]) -> Optional[str]:
        named = self.named_kind(op)
        return named if named is not None else self.default

    def named_kind(self, op: Optional[str]) -> Optional[str]:
        """The kind requested for ``op`` by name (not through the default), if any."""
        if op is not None:
            for name, kind in reversed(self.per_op):
                if name == op:
                    return kind
        return None


_override: contextvars.ContextVar[Optional[_Request]] = contextvars.ContextVar("s2hk_impl", default=None)


class ImplementationUnavailable(RuntimeError):
    """An explicitly requested implementation of an op cannot run here."""


@dataclass
class _ExtensionState:
    loaded: bool = False
    module: Optional[ModuleType] = None
    error: Optional[str] = None
    warned: bool = False


_ext = _ExtensionState()


def _import_extension() -> ModuleType:
    return importlib.import_module("s2hk._C")


def extension(warn: bool = True) -> Optional[ModuleType]:
    """The loaded extension ``s2hk._C`` (its ops are then ``torch.ops.s2hk.*``), or ``None`` if it is missing.

    The import is tried once per process. With ``warn`` (default), the first call that finds it missing emits a
    single ``RuntimeWarning`` saying what failed and how to build it.
    """
    if not _ext.loaded:
        _ext.loaded = True
        try:
            _ext.module = _import_extension()
        except Exception as err:  # not built, or built against another torch: both leave the references working
            _ext.error = f"{type(err).__name__}: {err}"
    if _ext.module is None and warn and not _ext.warned:
        _ext.warned = True
        warnings.warn(f"s2hk: the C++ extension s2hk._C is not available ({_ext.error}); the PyTorch reference "
                      f"implementations are used instead. To get the C++/CUDA ops, {_BUILD_HINT}.",
                      RuntimeWarning, stacklevel=2)
    return _ext.module


def _checked(kind: str) -> str:
    if kind not in IMPLS:
        raise ValueError(f"S2HK_IMPL must be one of {', '.join(IMPLS)}; got {kind!r}")
    return kind


@functools.lru_cache(maxsize=16)
def _parse_env(value: str) -> _Request:
    """``S2HK_IMPL``: comma-separated entries, each a kind (for every op) or ``op=kind``."""
    default, per_op = None, []
    for entry in value.strip().lower().split(","):
        entry = entry.strip()
        if not entry:
            continue
        if "=" in entry:
            op, _, kind = entry.partition("=")
            per_op.append((op.strip(), _checked(kind.strip())))
        else:
            default = _checked(entry)
    return _Request(default, tuple(per_op))


def requested_impl(op: Optional[str] = None) -> str:
    """The implementation asked for here (for ``op`` when given): the innermost :func:`use_impl` that covers it,
    else ``S2HK_IMPL``, else ``auto``."""
    return _requested(op)[0]


def _requested(op: Optional[str]) -> tuple[str, bool]:
    """``(kind, named)``: the requested kind for ``op`` and whether the request named ``op`` explicitly."""
    for request in (_override.get(), _parse_env(os.environ.get("S2HK_IMPL", "auto"))):
        if request is None:
            continue
        named = request.named_kind(op)
        if named is not None:
            return named, True
        if request.default is not None:
            return request.default, False
    return "auto", False


@contextlib.contextmanager
def use_impl(kind: str, ops: Optional[Sequence[str]] = None) -> Iterator[None]:
    """Run the enclosed code with ``kind`` as the requested implementation (as ``S2HK_IMPL=kind`` would), for
    every op, or only for the ops named in ``ops`` (as ``S2HK_IMPL=op=kind`` would; other ops keep what the
    enclosing code requested)."""
    kind = _checked(kind)
    outer = _override.get() or _Request()
    if ops is None:
        request = _Request(kind)
    else:
        if isinstance(ops, str):
            ops = (ops,)
        request = _Request(outer.default, outer.per_op + tuple((op, kind) for op in ops))
    token = _override.set(request)
    try:
        yield
    finally:
        _override.reset(token)


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _missing(op: str, kind: str, device: torch.device) -> Optional[str]:
    """Why ``kind`` cannot run ``op`` on ``device`` here, or ``None`` if it can."""
    if kind == "cpp":
        module = extension()
        if module is None:
            return f"the C++ extension s2hk._C is not available ({_ext.error}); {_BUILD_HINT}"
        key = _DISPATCH_KEYS.get(device.type)
        name = f"s2hk::{op}"
        if key is None:
            return f"s2hk._C has no kernels for {device.type} tensors"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(name, key):
            if key == "CUDA" and not getattr(module, "WITH_CUDA", False):
                return ("s2hk._C was built without its CUDA kernels (torch had no CUDA or nvcc was missing at build "
                        f"time); {_BUILD_HINT}")
            return f"s2hk._C has no {key} kernel for {name} (an outdated build?); {_BUILD_HINT}"
        return None
    if kind == "triton":
        from s2hk import kernels  # the package alone: triton is imported only if it is installed and may run

        return kernels.unavailable(device)
    return None


def choose(op: str, device: Union[torch.device, str], kinds: Sequence[str]) -> str:
    """The implementation to run ``op`` with on ``device``: ``"reference"`` or one of ``kinds``.

    Args:
        op: the op's name (for C++ ops, its name in ``torch.ops.s2hk``).
        device: where the op's tensors live.
        kinds: the op's implementations besides the reference, fastest first (e.g. ``("cpp",)``).
    Raises:
        ImplementationUnavailable: an explicitly requested implementation does not exist for ``op`` or cannot
            run on ``device`` here.
    """
    device = torch.device(device)
    requested, named = _requested(op)
    if requested not in ("auto", "reference") and requested not in kinds and not named:
        requested = "auto"  # a request for every op leaves the ops without that kind to the usual choice
    if requested == "reference":
        return "reference"
    if requested == "auto":
        for kind in kinds:
            if kind == "triton" and not _measured_win(op, device):
                continue
            if _missing(op, kind, device) is None:
                return kind
        return "reference"
    if requested not in kinds:
        have = ", ".join(("reference", *kinds))
        raise ImplementationUnavailable(f"S2HK_IMPL={requested} was requested, but op {op!r} has no {requested} "
                                        f"implementation (it has: {have})")
    reason = _missing(op, requested, device)
    if reason is not None:
        raise ImplementationUnavailable(f"S2HK_IMPL={requested} was requested for op {op!r} on {device.type} "
                                        f"tensors, but {reason}")
    return requested
