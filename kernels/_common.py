"""What every kernel file shares: where the kernels may run, which tile configs to try, dot precision,
tolerances per dtype, and the description of an ahead-of-time compile.

Triton decides at decoration time whether a ``@triton.jit`` function is compiled for a GPU or run by its
CPU interpreter (``TRITON_INTERPRET=1``), so :data:`INTERPRETED` is read once, when this module is first
imported -- before any kernel in this package is defined.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import triton
import triton.language as tl

#: True when the kernels of this package are run by Triton's CPU interpreter (CPU tensors only).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

#: A kept channel set: an index tensor (int32/int64, unique entries, any order) or an int ``k`` meaning the
#: prefix ``0..k-1``. The int form needs no index loads and no device-to-host read of the set.
KeptSet = Union[torch.Tensor, int]

#: Absolute and relative tolerances of a kernel against a float64 reference, per input dtype (fp32
#: accumulation in every case). ``"tf32"`` is fp32 storage with TF32 tensor-core products, used on a GPU
#: when ``torch.backends.cuda.matmul.allow_tf32`` is set.
TOLERANCES: Dict[Union[torch.dtype, str], Dict[str, float]] = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-4, rtol=2e-4),
    "tf32": dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=4e-2),
}


def tolerance(dtype: torch.dtype) -> Dict[str, float]:
    """``dict(atol=..., rtol=...)`` for comparing a kernel computed in ``dtype`` with a float64 reference."""
    if dtype == torch.float32 and not INTERPRETED and torch.backends.cuda.matmul.allow_tf32:
        return dict(TOLERANCES["tf32"])
    return dict(TOLERANCES[dtype])


def check_runnable(*tensors: Optional[torch.Tensor]) -> torch.device:
    """The device of the given tensors, after checking that this package's kernels can run there.

    CUDA tensors need compiled kernels (no ``TRITON_INTERPRET``); CPU tensors need the interpreter.
    """
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cuda" and INTERPRETED:
        raise RuntimeError("s2hk.kernels were imported with TRITON_INTERPRET=1; they run on CPU tensors only")
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("s2hk.kernels run on CPU tensors only under Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before triton is first imported")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"s2hk.kernels do not run on {device.type} tensors")
    return device


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` runs convolutions and matmuls in on ``device``'s type, or None where it
    is off there."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def autocast_operands(dtype: Optional[torch.dtype], *tensors: torch.Tensor) -> List[torch.Tensor]:
    """The operands of a GEMM-like op as autocast casts them for ``dtype`` (None: autocast off, unchanged):
    float32 / float16 / bfloat16 tensors in ``dtype`` (a differentiable cast, so an fp32 weight's gradient
    comes back to it in fp32), float64 left alone as autocast leaves it."""
    if dtype is None:
        return list(tensors)
    return [t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors]


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision that matches what torch would use for a matmul in ``dtype``."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee" if dtype == torch.float32 else "tf32"  # the precision flag is ignored for 16-bit inputs


def configs(gpu: Sequence[triton.Config], interpreter: triton.Config) -> List[triton.Config]:
    """The autotune configs of a kernel: one config under the interpreter (nothing to tune), else ``gpu``."""
    return [interpreter] if INTERPRETED else list(gpu)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a small constant under the interpreter); cached, as every
    launch asks."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def kept_count(kept: Optional[KeptSet], full: int) -> int:
    """How many channels a kept set holds (``None`` = all ``full`` channels); no device read."""
    if kept is None:
        return full
    if isinstance(kept, int):
        if not 0 <= kept <= full:
            raise ValueError(f"prefix length {kept} outside [0, {full}]")
        return kept
    if kept.dim() != 1 or kept.dtype not in (torch.int32, torch.int64):
        raise ValueError("a kept index set must be a 1-D int32/int64 tensor")
    return kept.numel()


def kept_index(kept: Optional[KeptSet], full: int, device: torch.device) -> torch.Tensor:
    """The kept set as an int64 index tensor on ``device`` (for references and torch fallbacks)."""
    if kept is None:
        kept = full
    if isinstance(kept, int):
        return torch.arange(kept, device=device)
    return kept.to(device=device, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------------
# Operand rounding inside tl.dot. The interpreter multiplies 16-bit operands incorrectly (it hands the raw
# bits to numpy), so there the operands are widened to fp32 first; bf16 x bf16 products are exact in fp32,
# so the result is what the tensor cores compute (up to summation order).
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """acc + a @ b with fp32 accumulation."""
    if WIDEN:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


WIDEN_DOT_OPERANDS: bool = INTERPRETED


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compiles (no GPU needed): each kernel file lists the specialisations it launches.
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AotVariant:
    """One specialisation of a kernel, described well enough for ``triton.compile(ASTSource(...))``.

    ``types`` maps every runtime argument to a Triton type string (``"*bf16"``, ``"i32"``, ``"fp32"``);
    ``constexprs`` maps every constexpr argument to its value; pointers and the arguments named in
    ``aligned`` are marked 16-divisible as the launcher would see them for aligned shapes.
    """

    name: str
    kernel: Any
    types: Dict[str, str]
    constexprs: Dict[str, Any]
    num_warps: int
    num_stages: int
    aligned: Sequence[str] = ()
    uses_dot: bool = False

    def source(self) -> "triton.compiler.ASTSource":
        fn = self.kernel
        while not isinstance(fn, triton.runtime.JITFunction):  # unwrap autotune / heuristics
            fn = fn.fn
        signature = {}
        attrs = {}
        for i, arg in enumerate(fn.arg_names):
            if arg in self.constexprs:
                signature[arg] = "constexpr"
                continue
            if arg not in self.types:
                raise KeyError(f"{self.name}: no type given for argument {arg}")
            signature[arg] = self.types[arg]
            if self.types[arg].startswith("*") or arg in self.aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=dict(self.constexprs),
                                         attrs=attrs)


def config_variants(name: str, kernel: Any, types: Dict[str, str], constexprs: Dict[str, Any],
                    gpu_configs: Sequence[triton.Config], aligned: Sequence[str] = (),
                    uses_dot: bool = False) -> List[AotVariant]:
    """One :class:`AotVariant` per GPU autotune config, the config's meta-parameters merged in."""
    out = []
    for cfg in gpu_configs:
        tag = "_".join(f"{k}{v}" for k, v in cfg.kwargs.items())
        out.append(AotVariant(f"{name}[{tag},w{cfg.num_warps},s{cfg.num_stages}]", kernel, dict(types),
                              {**constexprs, **cfg.kwargs}, cfg.num_warps, cfg.num_stages, aligned, uses_dot))
    return out

