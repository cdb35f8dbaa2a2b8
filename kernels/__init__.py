"""Fused Triton kernels for the two-path network (one file per op; reference beside each).

Each op module holds its Triton kernels, the launcher, its autograd (a ``torch.autograd.Function``, or a
custom op's registered formula), the differentiable entry point the engine dispatches to, and a pure-PyTorch
reference with the same signature:

    dual_linear.dual_linear(x_soft, x_hard, weight, bias, gate, kept_in, kept_out, weight_grad=True)
    dual_conv.dual_conv(x, weight, bias, gate, kept_out, stride, padding, dilation, weight_grad=True)
    bn_gate_act.bn_gate_act(x, weight, bias, running_mean, running_var, gate, residual, activation,
                            momentum, eps, training)

bn_gate_act runs through torch.library custom ops (``torch.ops.s2hk.bn_gate_act_forward``, ``_backward`` and
``bn_update_running_stats``, with fake kernels), so it also runs under ``torch.compile``.

Importing this package imports neither triton nor an op module: ``import s2hk.kernels.dual_linear`` (or
attribute access, ``s2hk.kernels.dual_linear``) does. Triton fixes at that moment whether kernels are
compiled for the GPU or run by its CPU interpreter, so set ``TRITON_INTERPRET=1`` before then to run them
on CPU tensors.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Optional, Union

import torch

OPS = ("dual_linear", "dual_conv", "bn_gate_act")

__all__ = ["OPS", "triton_available", "can_run", "unavailable", *OPS]


def triton_available() -> bool:
    """Whether triton is installed (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def can_run(device: Union[torch.device, str]) -> bool:
    """Whether the kernels can run on tensors of ``device``: CUDA with compiled kernels, or CPU under
    Triton's interpreter."""
    if not triton_available():
        return False
    from ._common import INTERPRETED

    device = torch.device(device)
    if device.type == "cuda":
        return not INTERPRETED and torch.cuda.is_available()
    return device.type == "cpu" and INTERPRETED


# ----------------------------------------------------------------------------------------------------------
# Why the kernels cannot run (for s2hk.dispatch's errors)
# ----------------------------------------------------------------------------------------------------------
def unavailable(device: Union[torch.device, str]) -> Optional[str]:
    """Why the kernels cannot run on tensors of ``device`` here, or ``None`` if they can (as :func:`can_run`).

    Triton is not imported when the answer is already known without it (not installed, an unsupported
    device, CPU tensors while ``TRITON_INTERPRET`` is unset and triton not yet imported), so that setting
    ``TRITON_INTERPRET=1`` afterwards still takes effect.
    """
    device = torch.device(device)
    if not triton_available():
        return "triton is not installed (pip install triton)"
    if device.type not in ("cpu", "cuda"):
        return f"Triton kernels do not run on {device.type} tensors"
    interpret_hint = "set TRITON_INTERPRET=1 before triton is first imported"
    if device.type == "cpu" and "triton" not in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        return f"Triton kernels run on CPU tensors only under its interpreter: {interpret_hint}"
    try:
        from ._common import INTERPRETED
    except Exception as err:  # an installed but broken triton
        return f"triton failed to import ({type(err).__name__}: {err})"
    if device.type == "cpu":
        if not INTERPRETED:
            return f"triton was imported without its interpreter (its kernels run on CUDA tensors); {interpret_hint}"
        return None
    if INTERPRETED:
        return ("triton was imported with TRITON_INTERPRET=1 (its CPU interpreter): the kernels run on CPU tensors "
                "only")
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def __getattr__(name: str):
    if name in OPS:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
