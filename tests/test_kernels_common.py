"""Checks shared by the kernel tests (tolerances, poisoned allocations, gradient comparison) and tests of
s2hk.kernels' package-level functions."""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence

import pytest
import torch

pytest.importorskip("triton")

import s2hk.kernels as kernels  # noqa: E402
from s2hk.kernels import _common  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

#: Dtypes every op is tested in. bf16 runs under the interpreter too: its loads, stores and casts are
#: exact there, and the kernels widen 16-bit dot operands to fp32 when interpreted.
DTYPES = [torch.float32, torch.bfloat16]


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Every floating-point ``torch.empty`` / ``empty_like`` made from Python inside the block is filled
    with NaN, so an element a kernel forgets to write shows up in the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def assert_matches(got: Optional[torch.Tensor], ref: Optional[torch.Tensor], dtype: torch.dtype, what: str) -> None:
    """``got`` (computed in ``dtype``) against a float64 reference; ``atol`` scales with the reference's size."""
    if ref is None:
        assert got is None, f"{what}: expected no gradient, got one"
        return
    assert got is not None, f"{what}: gradient missing"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    tol = _common.tolerance(dtype)
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(got.double(), ref, atol=tol["atol"] * scale, rtol=tol["rtol"],
                               msg=lambda m: f"{what} ({dtype}): {m}")


def rounded_leaves(tensors: Dict[str, Optional[torch.Tensor]], dtype: torch.dtype,
                   requires_grad: Sequence[str]) -> tuple:
    """(float64 copies, ``dtype`` copies) of the same values (rounded to ``dtype`` first), so the
    reference sees exactly the kernel's inputs; the named ones require grad."""
    ref, low = {}, {}
    for name, t in tensors.items():
        if t is None or not t.is_floating_point():
            ref[name] = low[name] = t
            continue
        rounded = t.to(DEVICE, dtype)
        ref[name] = rounded.double().requires_grad_(name in requires_grad)
        low[name] = rounded.clone().requires_grad_(name in requires_grad)
    return ref, low


def gradients(outputs: Sequence[torch.Tensor], upstream: Sequence[Optional[torch.Tensor]],
              leaves: Dict[str, Optional[torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
    """d(sum_i <outputs_i, upstream_i>)/d(leaf) for every leaf that requires grad (an upstream of None
    leaves that output out of the loss); a leaf the loss does not reach gets zeros."""
    names = [k for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    loss = sum((o * u.to(o.dtype)).sum() for o, u in zip(outputs, upstream) if u is not None)
    grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True, materialize_grads=True)
    return dict(zip(names, grads))


def compare_all(got_out: List[torch.Tensor], ref_out: List[torch.Tensor], got_grads: Dict, ref_grads: Dict,
                dtype: torch.dtype, names: Sequence[str]) -> None:
    for name, g, r in zip(names, got_out, ref_out):
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}"
        assert_matches(g, r.detach(), dtype, name)
    assert got_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_matches(got_grads[name], ref_grads[name], dtype, f"d{name}")


def make_kept(spec: str, full: int):
    """'all' -> None, 'prefix:k' -> int k, 'prefix_tensor:k' -> arange(k), 'perm:k' / 'perm32:k' -> k random
    channels in random order (int64 / int32), 'empty' -> empty index tensor, 'full_perm' -> all, shuffled."""
    kind, _, k = spec.partition(":")
    if kind == "all":
        return None
    if kind == "prefix":
        return int(k)
    if kind == "prefix_tensor":
        return torch.arange(int(k), device=DEVICE)
    if kind in ("perm", "perm32"):
        idx = torch.randperm(full, device=DEVICE)[:int(k)]
        return idx.int() if kind == "perm32" else idx
    if kind == "empty":
        return torch.empty(0, dtype=torch.int64, device=DEVICE)
    if kind == "full_perm":
        return torch.randperm(full, device=DEVICE)
    raise ValueError(spec)


def kept_len(kept, full: int) -> int:
    return full if kept is None else (kept if isinstance(kept, int) else kept.numel())


# ----------------------------------------------------------------------------------------------------------
# Package-level functions
# ----------------------------------------------------------------------------------------------------------
def test_package_import_is_lazy_and_ops_resolve():
    assert set(kernels.OPS) == {"dual_linear", "dual_conv", "bn_gate_act"}
    for op in kernels.OPS:
        module = getattr(kernels, op)
        assert callable(getattr(module, op)) and callable(getattr(module, f"{op}_reference"))
    with pytest.raises(AttributeError):
        kernels.no_such_op  # noqa: B018


def test_can_run_matches_device():
    assert kernels.triton_available()
    assert kernels.can_run(DEVICE)
    other = "cpu" if DEVICE.type == "cuda" else "cuda"
    assert not kernels.can_run(other)
    with pytest.raises(RuntimeError):
        _common.check_runnable(torch.zeros(1, device=DEVICE).to("meta"))


def test_tolerances_cover_tested_dtypes_and_kept_set_helpers():
    for dtype in DTYPES:
        tol = _common.tolerance(dtype)
        assert 0 < tol["atol"] < 0.1 and 0 < tol["rtol"] < 0.1
    assert _common.kept_count(None, 7) == 7 and _common.kept_count(3, 7) == 3
    assert _common.kept_count(torch.tensor([4, 1], dtype=torch.int32), 7) == 2
    with pytest.raises(ValueError):
        _common.kept_count(8, 7)
    with pytest.raises(ValueError):
        _common.kept_count(torch.tensor([0.5]), 7)
    assert _common.kept_index(3, 7, torch.device("cpu")).tolist() == [0, 1, 2]


def test_poisoned_allocations_fill_nan_and_restore():
    empty, empty_like = torch.empty, torch.empty_like
    with poisoned_allocations():
        assert torch.isnan(torch.empty(3)).all() and torch.isnan(torch.empty_like(torch.zeros(2))).all()
        assert torch.empty(2, dtype=torch.int32).dtype == torch.int32
    assert torch.empty is empty and torch.empty_like is empty_like
