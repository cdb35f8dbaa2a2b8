"""Training step: s2hk's ``train_step`` against the dense step, the measured floor and the two-pass baseline.

Question: what does one S2HPruner step cost, relative to (a) a plain dense training step of the same model
and batch, (b) the straightforward two-pass implementation of the same algorithm (bench/naive_two_pass.py:
hard path at full width with 0/1 masks, separate passes, per-group Python mask code, one ``.item()`` per
group), and (c) the performance model's floor?

Target (DESIGN.md, "Performance model"): the s2hk step within 10% of the measured floor,
``floor = t(dense step) + t(training step of the exported narrow model) + t(input-gradient-only backward)``,
each in plain PyTorch on the same machine, model and batch. In FLOPs the ideal is ``(4 + 3r) / 3`` dense
steps. The hard network is pinned at the target by scaling every group uniformly
(:func:`s2hk.benchmarking.uniform_widths`), on resnet56 and mobilenet_v3_small, 32x32, batch 64, at
remaining-FLOPs targets 15/35/55%.

Run:  pytest bench/test_bench_step.py --benchmark-json bench/results/NAME.json
"""
from __future__ import annotations

from s2hk import dispatch
from s2hk.benchmarking import count_ops

TARGET = ("s2hk_over_floor <= 1.10: the s2hk step within 10% of floor = dense step + narrow model's step + "
          "input-gradient-only backward (DESIGN.md, Performance model)")


def test_train_step(benchmark, interleaved, workload, sizes, model_name, target):
    """One s2hk ``train_step`` (benchmarked); the dense step, the narrow model's step, the input-gradient-only
    backward and the two-pass baseline's step are timed in the same rounds.

    Target: s2hk step <= 1.10 x floor (floor = dense + narrow + input-gradient-only backward); reported:
    s2hk / dense, floor / dense, s2hk / floor, speedup over the two-pass baseline, the FLOPs ideal (4+3r)/3,
    and the operators one step dispatches with the extension and with the references (torch.profiler).
    """
    w = workload(model_name, target)
    times = interleaved(w.s2hk_step(), {"dense": w.dense_step(), "narrow": w.narrow_step(),
                                        "input_grad": w.input_grad_backward(), "naive": w.naive_step()})
    t_s2hk, t_dense = times["target"], times["dense"]
    floor = t_dense + times["narrow"] + times["input_grad"]
    r = w.hard_flops_ratio
    benchmark.extra_info.update(
        question="training step", model=model_name, target_flops=target, hard_flops_ratio=round(r, 4),
        batch_size=sizes.batch, image_size=sizes.image, smoke=sizes.smoke, performance_target=TARGET,
        s2hk_step_s=t_s2hk, dense_step_s=t_dense, narrow_step_s=times["narrow"],
        input_grad_backward_s=times["input_grad"], floor_s=floor, naive_step_s=times["naive"],
        s2hk_over_dense=t_s2hk / t_dense, floor_over_dense=floor / t_dense, s2hk_over_floor=t_s2hk / floor,
        naive_over_dense=times["naive"] / t_dense, speedup_over_naive=times["naive"] / t_s2hk,
        flops_ideal_over_dense=(4 + 3 * r) / 3, meets_target=t_s2hk <= 1.10 * floor)
    step = w.s2hk_step()
    for impl in ("cpp", "reference"):
        if impl == "cpp" and dispatch.extension(warn=False) is None:
            continue
        with dispatch.use_impl(impl):
            counts = count_ops(step)
        benchmark.extra_info[f"op_calls_step_{impl}"] = counts["calls"]
        benchmark.extra_info[f"ops_total_step_{impl}"] = counts["total"]
