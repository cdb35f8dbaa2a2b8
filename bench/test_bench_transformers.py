"""Vision transformers: forward latency of the hard path and of the exported model against the plain model.

Question: at 35% of the dense FLOPs (heads and MLP widths scaled uniformly, embedding width kept), does the
hard path of a shipped transformer -- sliced q/k/v/proj weights, fewer heads in the attention reshapes --
run as much faster as its FLOPs say, and what does the exported model (plain layers, new head counts) gain on
top? Eval mode, ``torch.inference_mode``, batch 64 at 32x32 (smoke run: batch 4 at 16x16).

Target (performance model): latency / plain-model latency = the FLOPs ratio r (``latency_over_flops_ratio``
= 1). The parts not pruned (patch embedding, LayerNorms, softmax, the classifier) and the gathers of
scattered heads keep the measured ratio above r; this benchmark says by how much.
"""
from __future__ import annotations

import pytest
import torch

from s2hk import S2HPruner
from s2hk.baselines import uniform_l1_widths
from s2hk.models import get_model

TRANSFORMERS = ("vit_tiny_cifar", "swin_tiny_cifar")
TARGET_FLOPS = 0.35
TARGET = "latency ratio (hard path or exported / plain model) = hard_flops_ratio (latency_over_flops_ratio = 1)"


@pytest.mark.parametrize("transformer", TRANSFORMERS)
def test_transformer_hard_path_latency(benchmark, interleaved, rounds_for, sizes, device, transformer):
    """Hard path (benchmarked), exported model and plain model, timed in the same rounds."""
    torch.manual_seed(0)
    x = torch.randn(sizes.batch, 3, sizes.image, sizes.image, device=device)
    model = get_model(transformer, num_classes=10, image_size=sizes.image).to(device).eval()
    pruner = S2HPruner(model, x[:1], target_flops=TARGET_FLOPS)
    pruner.set_hard_widths(uniform_l1_widths(pruner, TARGET_FLOPS))
    pruner.eval()
    pruner.prepare_hard()
    exported = pruner.export()
    ratio_flops = pruner.flops("hard") / pruner.flops("full")

    def run(fn):
        def forward():
            with torch.inference_mode():
                fn(x)
        return forward

    def hard(inputs):
        return pruner.run("hard", inputs)

    plain = run(model)
    times = interleaved(run(hard), {"plain": plain, "exported": run(exported)}, rounds=rounds_for(plain))
    benchmark.extra_info.update(
        question="transformer hard path", model=transformer, target_flops=TARGET_FLOPS,
        hard_flops_ratio=round(ratio_flops, 4), dense_flops=pruner.flops("full"), batch_size=sizes.batch,
        image_size=sizes.image, smoke=sizes.smoke, performance_target=TARGET, hard_s=times["target"],
        exported_s=times["exported"], plain_s=times["plain"],
        hard_latency_ratio=times["target"] / times["plain"],
        exported_latency_ratio=times["exported"] / times["plain"],
        hard_latency_over_flops_ratio=times["target"] / times["plain"] / ratio_flops,
        widths=pruner.hard_widths())
