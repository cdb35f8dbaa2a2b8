"""Ops: each op of the extension s2hk._C against its per-group PyTorch composition (``*_reference``), CPU.

Question: does one call for all channel groups beat the per-group loop of small PyTorch ops, in time and in
dispatched operators (launches on a GPU)? On resnet50's channel groups (37 prunable groups, 11,456 channels,
32x32 input):

- ``gates``: soft keep-probabilities, straight-through hard widths and masks, forward and backward;
- ``decoupled_kd``: the two KL terms and their routed logit gradients, batch 64 x 10 classes and 256 x 1000;
- ``group_importance``: filter L1 importance, order and ranks of every group from resnet50's weights;
- the mask computation of one training step as the engine runs it: gates forward and backward, the balanced
  mask update, re-ranking and the next hard plan (one host read).

Target (DESIGN.md, "Where the speed is"): one launch for all groups' mask math instead of ~10 small ops per
group -- operator calls independent of the number of groups, and the op faster than the reference loop.
The Triton kernels are GPU-only (bench/test_bench_kernels.py).
"""
from __future__ import annotations

import time

import pytest
import torch

from s2hk import S2HPruner, dispatch, ops
from s2hk.benchmarking import count_ops
from s2hk.models import get_model

pytestmark = pytest.mark.skipif(dispatch.extension(warn=False) is None, reason="s2hk._C is not built")

TARGET = "extension faster than the per-group reference (speedup > 1), operator calls independent of the groups"


@pytest.fixture(scope="module")
def resnet50(sizes):
    torch.manual_seed(0)
    model = get_model("resnet50", num_classes=10).train()
    pruner = S2HPruner(model, torch.randn(1, 3, 32, 32), target_flops=0.35).train()
    with torch.no_grad():  # logits away from max-init, so that widths and gradients are not trivial
        pruner.mask_logits.add_(torch.randn_like(pruner.mask_logits))
    pruner.refresh_plan()
    return pruner


def _cpu_time(fn, calls: int) -> float:
    """Mean process CPU time (all threads) of one call."""
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls


def _compare(benchmark, interleaved, rounds_for, op: str, fn, **info) -> None:
    """Benchmark ``fn`` with the extension; time it with the references in the same rounds; count operators."""
    def with_impl(kind):
        def run():
            with dispatch.use_impl(kind):
                fn()
        return run

    cpp, ref = with_impl("cpp"), with_impl("reference")
    rounds = rounds_for(ref)
    times = interleaved(cpp, {"reference": ref}, rounds=rounds)
    ops_cpp, ops_ref = count_ops(cpp), count_ops(ref)
    benchmark.extra_info.update(
        question="ops", op=op, performance_target=TARGET, cpp_s=times["target"], reference_s=times["reference"],
        speedup=times["reference"] / times["target"], cpu_time_cpp_s=_cpu_time(cpp, rounds),
        cpu_time_reference_s=_cpu_time(ref, rounds), op_calls_cpp=ops_cpp["calls"],
        op_calls_reference=ops_ref["calls"], ops_total_cpp=ops_cpp["total"], ops_total_reference=ops_ref["total"],
        **info)


def test_gates(benchmark, interleaved, rounds_for, resnet50):
    """``ops.gates`` forward + backward for resnet50's groups: extension vs per-group reference.

    Target: one operator call each way instead of ~10 per group; faster than the reference loop."""
    p = resnet50
    g_keep = torch.randn(p.ranks.numel())
    g_width = torch.randn(len(p.prunable), dtype=torch.float64)

    def fwd_bwd():
        out = ops.gates(p.mask_logits, p.ranks, p.gate_layout, p.tau)
        loss = (out.keep_probs * g_keep).sum() + (out.hard_widths * g_width).sum()
        torch.autograd.grad(loss, p.mask_logits)

    _compare(benchmark, interleaved, rounds_for, "gates (forward + backward)", fwd_bwd,
             groups=len(p.prunable), channels=p.ranks.numel())


@pytest.mark.parametrize("shape", [(64, 10), (256, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_decoupled_kd(benchmark, interleaved, rounds_for, shape):
    """``ops.decoupled_kd`` (losses and routed logit gradients) vs its PyTorch composition.

    Target: one fused pass over the logits, faster than the reference's separate softmax / KL / gradient ops."""
    soft, hard = torch.randn(*shape), torch.randn(*shape)
    _compare(benchmark, interleaved, rounds_for, "decoupled_kd", lambda: ops.decoupled_kd(soft, hard, 1.0, 1.0),
             shape=list(shape))


def test_group_importance(benchmark, interleaved, rounds_for, resnet50):
    """``ops.group_importance`` over resnet50's producing layers vs the per-group reference.

    Target: one call for all groups; faster than the per-group loop (norms, stack, mean, sort, scatter)."""
    weights, slots = resnet50.producer_weights()
    _compare(benchmark, interleaved, rounds_for, "group_importance", lambda: ops.group_importance(weights, slots),
             groups=len(resnet50.prunable), layers=len(weights),
             weight_elements=sum(w.numel() for w in weights))


def test_mask_computation(benchmark, interleaved, rounds_for, resnet50):
    """The mask computation of one training step on resnet50's groups, as the engine runs it: gates forward
    and backward, the balanced mask update, re-ranking and the next hard plan with its one host read.

    Target: operator calls per step independent of the number of groups; faster than the per-group loop."""
    p = resnet50
    saved = p.mask_logits.detach().clone()
    g_keep = torch.randn(p.ranks.numel()) * 1e-3
    flops_loss = torch.tensor(1e-3, dtype=torch.float64)

    def mask_step():
        keep, widths = p.gates()
        (data_grad,) = torch.autograd.grad((keep * g_keep).sum(), p.mask_logits, retain_graph=True)
        (flops_grad,) = torch.autograd.grad(1e-3 * widths.sum(), p.mask_logits)
        p.mask_optimizer.step(data_grad, flops_grad.float(), flops_loss)
        with torch.no_grad():
            p.mask_logits.copy_(saved)  # the same work every round
        p.refresh_plan()

    _compare(benchmark, interleaved, rounds_for, "mask computation per step", mask_step,
             groups=len(p.prunable), channels=p.ranks.numel())
