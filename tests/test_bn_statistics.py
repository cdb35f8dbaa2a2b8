"""Every evaluated network is tested with BatchNorm statistics of its own (ALGORITHMS.md, "BN statistics").

While the soft gates fall from 1 to the target, the model's EMA running statistics describe no network that
ever existed; the Trainer re-estimates them for the soft (and the hard) network before each evaluation. The
reported accuracies must then agree with a fresh re-estimate from many more batches.
"""
from __future__ import annotations

import torch

import s2hk
from s2hk.data import make_loaders
from s2hk.trainer import TrainConfig, Trainer
from test_convergence import small_cnn


def fresh_estimate(pruner: s2hk.S2HPruner, train, val) -> dict:
    """Accuracies after re-estimating the statistics from every training batch of epoch 0."""
    batches = list(train.iter_from(0, 0))
    pruner.recalibrate_norms(batches, len(batches), ("soft", "hard"))
    return pruner.evaluate(val)


def test_soft_accuracy_is_that_of_the_soft_network_while_its_gates_fall():
    torch.manual_seed(0)
    train, val = make_loaders("digits", batch_size=64, image_size=8, seed=0)
    pruner = s2hk.S2HPruner(small_cnn(), torch.zeros(1, 3, 8, 8), target_flops=0.35, warmup_epochs=1,
                            joint_epochs=2)
    trainer = Trainer(pruner, train, val, epochs=3,
                      config=TrainConfig(lr=0.05, progress=False, recalibrate_batches=10))
    checks = []
    evaluate = trainer.evaluate

    def evaluate_and_check() -> dict:
        reported = evaluate()
        ratio = pruner.flops("hard") / pruner.flops("full")
        checks.append((reported, fresh_estimate(pruner, train, val), ratio))
        return reported

    trainer.evaluate = evaluate_and_check
    trainer.fit(resume=False)
    ratios = [ratio for _, _, ratio in checks]
    assert ratios[0] == 1.0 and ratios[-1] < 0.5, ratios  # the gates did fall during the run
    for reported, fresh, _ in checks:
        assert abs(reported["soft_acc"] - fresh["soft_acc"]) <= 0.01, (reported, fresh)
        assert abs(reported["hard_acc"] - fresh["hard_acc"]) <= 0.01, (reported, fresh)
        assert fresh["soft_acc"] > 0.5, fresh  # the networks learned: far from chance (0.1)
