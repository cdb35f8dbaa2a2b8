"""Exported model inference: latency of the physically narrow model against the dense one.

Question: does the exported model (``S2HPruner.export()``: standard layers holding the kept channels only)
run as much faster as its FLOPs say? Latency of one forward (eval, ``torch.inference_mode``) at batch 1 and
batch 64 (4 in the smoke run), 32x32, resnet56 and mobilenet_v3_small at remaining-FLOPs targets 15/35/55%.

Target (performance model): latency ratio exported / dense equal to the FLOPs ratio r on large shapes
(``latency_over_flops_ratio`` = 1); narrow layers use the hardware less well and batch 1 is dominated by
per-layer overheads, so the measured ratio sits above r -- this benchmark says by how much.
"""
from __future__ import annotations

import pytest
import torch

TARGET = "latency_ratio (exported / dense) = hard_flops_ratio ideally (latency_over_flops_ratio = 1)"


@pytest.mark.parametrize("batch", ["1", "full"])
def test_exported_inference(benchmark, interleaved, rounds_for, workload, sizes, device, model_name, target,
                            batch):
    """Forward latency of the exported model (benchmarked) vs the dense model in the same rounds.

    Target: exported / dense latency = the FLOPs ratio r (ideal); reported with the ratio of the two.
    """
    w = workload(model_name, target)
    n = 1 if batch == "1" else sizes.batch
    x = torch.randn(n, 3, sizes.image, sizes.image, device=device)
    exported = w.pruner.export().eval()
    dense = w.dense
    was_training = dense.training
    dense.eval()
    try:
        def run(model):
            def forward():
                with torch.inference_mode():
                    model(x)
            return forward

        times = interleaved(run(exported), {"dense": run(dense)}, rounds=rounds_for(run(dense)))
    finally:
        dense.train(was_training)
    ratio = times["target"] / times["dense"]
    benchmark.extra_info.update(
        question="exported inference", model=model_name, target_flops=target,
        hard_flops_ratio=round(w.hard_flops_ratio, 4), batch_size=n, image_size=sizes.image, smoke=sizes.smoke,
        performance_target=TARGET, exported_s=times["target"], dense_s=times["dense"], latency_ratio=ratio,
        speedup=1 / ratio, latency_over_flops_ratio=ratio / w.hard_flops_ratio)
