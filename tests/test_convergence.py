"""End-to-end S2HPruner runs on the embedded digits dataset (8x8 images, a small CNN, ~220 steps each).

Checks the method's claims on a real (if small) dataset: the hard network's FLOPs ratio reaches the target,
the hard network stays within 2 points of the soft one with the decoupled KD, and without KD ("none", plain
differentiable-mask pruning) the discretization gap is larger on the same run.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import s2hk
from s2hk.data import make_loaders
from s2hk.trainer import TrainConfig, Trainer


def small_cnn(num_classes: int = 10) -> nn.Sequential:
    def block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 64, 2), *block(64, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))


def prune_digits(kd: str, target: float, seed: int, epochs: int = 10, warmup: int = 2) -> dict:
    torch.manual_seed(seed)
    train, val = make_loaders("digits", batch_size=64, image_size=8, seed=seed)
    pruner = s2hk.S2HPruner(small_cnn(), torch.zeros(1, 3, 8, 8), target_flops=target, kd=kd,
                            warmup_epochs=warmup, joint_epochs=epochs - warmup)
    trainer = Trainer(pruner, train, val, epochs=epochs, config=TrainConfig(lr=0.05, progress=False))
    return trainer.fit(resume=False)


@pytest.mark.parametrize("target", [0.35, 0.2])
def test_decoupled_kd_reaches_target_and_closes_gap_while_none_does_not(target):
    with_kd = prune_digits("decoupled", target, seed=1)
    without_kd = prune_digits("none", target, seed=1)
    assert abs(with_kd["hard_flops_ratio"] - target) <= 0.02, with_kd
    assert abs(without_kd["hard_flops_ratio"] - target) <= 0.02, without_kd
    assert with_kd["soft_acc"] > 0.9, with_kd  # the run really learned the task
    assert with_kd["gap"] <= 0.02, with_kd
    assert without_kd["gap"] > with_kd["gap"], (with_kd, without_kd)


def test_training_is_deterministic_for_a_fixed_seed():
    def short_run() -> tuple[dict, torch.Tensor]:
        torch.manual_seed(3)
        train, val = make_loaders("digits", batch_size=64, image_size=8, seed=3)
        pruner = s2hk.S2HPruner(small_cnn(), torch.zeros(1, 3, 8, 8), target_flops=0.35, warmup_epochs=0,
                                joint_epochs=1)
        trainer = Trainer(pruner, train, val, epochs=1,
                          config=TrainConfig(lr=0.05, progress=False, max_steps_per_epoch=6))
        result = trainer.fit(resume=False)
        weights = torch.cat([p.detach().flatten() for p in pruner.weight_parameters()])
        return result, torch.cat([weights, pruner.mask_logits.detach()])

    first, state_a = short_run()
    second, state_b = short_run()
    assert torch.equal(state_a, state_b)
    assert {k: v for k, v in first.items() if k != "eval_seconds"} == \
        {k: v for k, v in second.items() if k != "eval_seconds"}
