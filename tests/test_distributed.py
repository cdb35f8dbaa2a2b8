"""Data-parallel training on 2 CPU processes (gloo): identical masks on both ranks, the single-process result
on the same global batches, and files written by rank 0 only."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from s2hk import S2HPruner
from s2hk import distributed as dist_utils
from s2hk.data import make_loaders
from s2hk.metrics import read_metrics
from s2hk.trainer import TrainConfig, Trainer

WORLD = 2
GLOBAL_BATCH = 16
STEPS_PER_EPOCH = 6
EPOCHS = 3  # warm-up, then two joint epochs (mask updates)


def bn_free_model() -> nn.Module:
    """conv-ReLU-conv-ReLU-pool-linear: no per-rank BatchNorm statistics, so ranks may match one process."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def make_trainer(out_dir: Path | None, seed: int = 0) -> Trainer:
    """The same run in every process (``seed`` only changes the initial weights)."""
    torch.manual_seed(seed)
    train, val = make_loaders("synthetic", batch_size=GLOBAL_BATCH, image_size=8, seed=0,
                              train_size=GLOBAL_BATCH * STEPS_PER_EPOCH, val_size=40, val_batch_size=8)
    pruner = S2HPruner(bn_free_model(), torch.zeros(1, 3, 8, 8), target_flops=0.4, warmup_epochs=1,
                       joint_epochs=EPOCHS - 1)
    config = TrainConfig(lr=0.05, progress=False, recalibrate_batches=1, checkpoint_every=4)
    return Trainer(pruner, train, val, epochs=EPOCHS, config=config, out_dir=out_dir)


def final_state(trainer: Trainer, result: dict) -> dict:
    return {"model": {k: v.clone() for k, v in trainer.pruner.model.state_dict().items()},
            "mask_logits": trainer.pruner.mask_logits.detach().clone(),
            "widths": trainer.pruner.hard_widths(), "history": trainer.history, "result": result}


def _worker(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        # Different initial weights per rank: the trainer must start every rank from rank 0's.
        trainer = make_trainer(Path(folder) / "run", seed=rank)
        seen: list[int] = []
        trainer.pruner.train_step = _recording(trainer.pruner.train_step, seen)
        result = trainer.fit()
        torch.save({**final_state(trainer, result), "batch_sizes": seen}, Path(folder) / f"rank{rank}.pt")
        dist_utils.barrier()
    finally:
        dist.destroy_process_group()


def _recording(train_step, seen: list):
    """``train_step`` that also records the size of every batch it is given."""
    def step(x, y, optimizer):
        seen.append(int(y.shape[0]))
        return train_step(x, y, optimizer)
    return step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list[dict], dict, Path]:
    """(the two ranks' final states, the single-process final state, the distributed run folder)."""
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(folder)), nprocs=WORLD, join=True)
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    single = make_trainer(None)
    result = single.fit()
    return ranks, final_state(single, result), folder / "run"


def test_masks_and_architectures_identical_on_every_rank(runs):
    ranks, _, _ = runs
    assert torch.equal(ranks[0]["mask_logits"], ranks[1]["mask_logits"])
    assert ranks[0]["widths"] == ranks[1]["widths"]
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key]), key


def test_each_rank_trains_on_its_shard_of_the_global_batch(runs):
    ranks, _, _ = runs
    for state in ranks:
        assert state["batch_sizes"] == [GLOBAL_BATCH // WORLD] * (EPOCHS * STEPS_PER_EPOCH)


def test_evaluation_identical_on_every_rank(runs):
    ranks, _, _ = runs
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["result"] == ranks[1]["result"]


def test_matches_single_process_on_the_same_global_batches(runs):
    ranks, single, _ = runs
    # the joint epochs really pruned, so the comparison covers mask updates
    assert any(w < c for w, c in zip(single["widths"].values(), (16, 32)))
    assert ranks[0]["widths"] == single["widths"]
    torch.testing.assert_close(ranks[0]["mask_logits"], single["mask_logits"], rtol=1e-4, atol=1e-5)
    for key, value in single["model"].items():
        torch.testing.assert_close(ranks[0]["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    for a, b in zip(ranks[0]["history"], single["history"]):
        assert a["hard_flops_ratio"] == b["hard_flops_ratio"]
        assert a["soft_acc"] == pytest.approx(b["soft_acc"], abs=1 / 40)
        assert a["hard_acc"] == pytest.approx(b["hard_acc"], abs=1 / 40)


def test_only_rank0_writes_and_metrics_are_logged_once(runs):
    _, single, folder = runs
    steps = read_metrics(folder, "step")
    assert [r["step"] for r in steps] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert len(read_metrics(folder, "epoch")) == EPOCHS
    assert (folder / "config.json").is_file() and (folder / "epochs.csv").is_file()
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["checkpoint-000000016.pt",
                                                                          "checkpoint-000000018.pt"]


def test_shard_batch_outside_a_process_group_is_the_whole_batch():
    x, y = torch.zeros(6, 3), torch.arange(6)
    assert dist_utils.shard_batch(x, y) == (x, y)
    assert dist_utils.rank() == 0 and dist_utils.world_size() == 1 and dist_utils.is_rank0()
    dist_utils.barrier()  # nothing to wait for


def test_cli_prune_under_torchrun(tmp_path):
    """``torchrun --nproc_per_node=2 -m s2hk.cli prune``: both ranks finish, rank 0 alone prints and writes."""
    (tmp_path / "ddp_models.py").write_text(textwrap.dedent("""
        from torch import nn

        def tiny(num_classes=10):
            return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
    """))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               "-m", "s2hk.cli", "prune", "--model", "ddp_models:tiny", "--dataset", "synthetic",
               "--image-size", "8", "--batch-size", "16", "--epochs", "2", "--warmup-epochs", "1",
               "--max-steps-per-epoch", "3", "--recalibrate-batches", "1", "--no-progress", "--out", str(out),
               "--allow-missed-target"]  # three steps cannot reach the target: the run is about DDP's plumbing
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("s2hk prune:") == 1  # the summary, from rank 0 only
    assert json.loads((out / "config.json").read_text())["world_size"] == WORLD
    assert json.loads((out / "summary.json").read_text())["world_size"] == WORLD
    assert [r["step"] for r in read_metrics(out, "step")] == list(range(1, 7))
    assert (out / "pruned" / "model.pt").is_file()
