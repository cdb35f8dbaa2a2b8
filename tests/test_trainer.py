"""s2hk.trainer: bit-identical resumption after an interruption, refused checkpoints, run-folder outputs."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from s2hk import S2HPruner
from s2hk.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from s2hk.data import DatasetError, make_loaders
from s2hk.metrics import read_metrics
from s2hk.trainer import TrainConfig, Trainer, cosine_schedule, step_schedule

STEPS_PER_EPOCH = 8  # 128 synthetic images, batch 16
EPOCHS = 4           # warm-up, two joint epochs, hard
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH


def tiny_model(width: int = 16) -> nn.Module:
    """conv-BN-ReLU-conv-BN-ReLU-pool-linear: two prunable groups, BatchNorm on both paths."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def make_trainer(out_dir: Path | None, checkpoint_every: int = 0, width: int = 16,
                 run_config: dict | None = None, **settings: object) -> Trainer:
    """A fresh model, pruner, loaders and trainer, all seeded: two calls give identical runs (``settings``: more
    TrainConfig settings)."""
    torch.manual_seed(0)
    train, val = make_loaders("synthetic", batch_size=16, image_size=8, seed=0, train_size=128, val_size=64)
    pruner = S2HPruner(tiny_model(width), torch.zeros(1, 3, 8, 8), target_flops=0.5, warmup_epochs=1,
                       joint_epochs=2, hard_epochs=1)
    config = TrainConfig(lr=0.05, progress=False, recalibrate_batches=2, checkpoint_every=checkpoint_every,
                         **settings)
    return Trainer(pruner, train, val, epochs=EPOCHS, config=config, out_dir=out_dir, run_config=run_config)


def snapshot(trainer: Trainer) -> dict:
    """What must match between an uninterrupted and a resumed run."""
    return {"model": {k: v.clone() for k, v in trainer.pruner.model.state_dict().items()},
            "mask_logits": trainer.pruner.mask_logits.detach().clone(),
            "widths": trainer.pruner.hard_widths(), "history": trainer.history, "step": trainer.step}


def assert_same_run(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] == TOTAL_STEPS
    assert a["widths"] == b["widths"]
    assert torch.equal(a["mask_logits"], b["mask_logits"])
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["history"] == b["history"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, Path]:
    """The uninterrupted run: its final state and its run folder."""
    out = tmp_path_factory.mktemp("reference")
    trainer = make_trainer(out)
    trainer.fit()
    return snapshot(trainer), out


def metric_lines(folder: Path) -> list[str]:
    return (folder / "metrics.jsonl").read_text().splitlines()


# ------------------------------------------------------------------ resumption

@pytest.mark.parametrize("stop_after, checkpoint_every", [
    (7, 3),    # killed in the warm-up epoch: resumes from the warm-up checkpoint of step 6
    (8, 0),    # stopped at the end of warm-up: resumes from its epoch-end checkpoint, before the first joint step
    (11, 3),   # killed mid joint epoch, two steps after a mid-epoch checkpoint
    (16, 5),   # stopped at an epoch boundary: resumes from the epoch-end checkpoint of step 16
    (27, 0),   # killed mid hard epoch; only the epoch-end checkpoint of step 24 exists
])
def test_resume_after_interruption_is_bit_identical(reference, tmp_path, stop_after, checkpoint_every):
    ref_state, ref_dir = reference
    first = make_trainer(tmp_path, checkpoint_every=checkpoint_every)
    assert first.fit(stop_after_steps=stop_after) == {}
    assert first.step == stop_after
    # the interrupted run logged steps past its last checkpoint; resuming must not duplicate them
    assert len([r for r in read_metrics(tmp_path, "step")]) == stop_after
    assert list_checkpoints(tmp_path / "checkpoints")

    resumed = make_trainer(tmp_path, checkpoint_every=checkpoint_every)
    resumed.fit()
    assert resumed.resumed_from is not None
    assert_same_run(ref_state, snapshot(resumed))
    assert metric_lines(tmp_path) == metric_lines(ref_dir)
    assert (tmp_path / "epochs.csv").read_text() == (ref_dir / "epochs.csv").read_text()


def test_resume_after_sigkill_is_bit_identical(reference, tmp_path):
    """A separate process is killed (SIGKILL) inside a step; a fresh trainer here finishes the run."""
    ref_state, ref_dir = reference
    script = textwrap.dedent(f"""
        import os, signal, sys
        import torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        torch.set_num_threads(1)
        from test_trainer import make_trainer
        trainer = make_trainer({str(tmp_path)!r}, checkpoint_every=4)
        step = trainer.pruner.train_step
        def dying_step(*args):
            if trainer.step == 14:  # inside step 15, after step 12's checkpoint
                os.kill(os.getpid(), signal.SIGKILL)
            return step(*args)
        trainer.pruner.train_step = dying_step
        trainer.fit()
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")][-1] == "checkpoint-000000012.pt"

    resumed = make_trainer(tmp_path, checkpoint_every=4)
    resumed.fit()
    assert_same_run(ref_state, snapshot(resumed))
    assert metric_lines(tmp_path) == metric_lines(ref_dir)


def test_finished_run_resumes_to_its_result(reference, tmp_path):
    first = make_trainer(tmp_path)
    result = first.fit()
    again = make_trainer(tmp_path)
    assert again.fit() == result
    assert again.step == TOTAL_STEPS
    assert_same_run(reference[0], snapshot(again))


def test_no_resume_starts_over_moving_the_earlier_files_aside(tmp_path, capsys):
    make_trainer(tmp_path, checkpoint_every=4).fit(stop_after_steps=10)
    earlier = sorted(p.name for p in list_checkpoints(tmp_path / "checkpoints"))
    (tmp_path / "notes.txt").write_text("the user's own file")
    trainer = make_trainer(tmp_path)
    trainer.fit(resume=False, stop_after_steps=3)
    assert trainer.resumed_from is None and trainer.step == 3
    assert list_checkpoints(tmp_path / "checkpoints") == []
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    (previous,) = tmp_path.glob("previous-*")  # nothing deleted: the earlier attempt is kept whole
    assert [p.name for p in list_checkpoints(previous / "checkpoints")] == earlier
    assert [r["step"] for r in read_metrics(previous, "step")] == list(range(1, 11))
    assert (tmp_path / "notes.txt").read_text() == "the user's own file"  # not a run file: left in place
    assert f"the earlier files were moved to {previous}" in capsys.readouterr().err


class FailingSecondPass:
    """A validation loader whose second pass raises (an unreadable image); the others work."""

    def __init__(self, loader) -> None:
        self.loader, self.passes = loader, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.passes += 1
        if self.passes == 2:
            raise DatasetError("val/b/1.png: unreadable image")
        return iter(self.loader)


def test_failed_evaluation_keeps_the_epoch(reference, tmp_path):
    """The evaluation ending the first joint epoch fails: the epoch's checkpoint is already written, and the
    rerun evaluates from it (no step repeated) and finishes exactly as the uninterrupted run."""
    ref_state, ref_dir = reference
    first = make_trainer(tmp_path)
    first.val_loader = FailingSecondPass(first.val_loader)
    with pytest.raises(DatasetError):
        first.fit()
    assert list_checkpoints(tmp_path / "checkpoints")[-1].name == "checkpoint-000000016.pt"
    resumed = make_trainer(tmp_path)
    steps = []
    step = resumed.pruner.train_step
    resumed.pruner.train_step = lambda *args: steps.append(resumed.step) or step(*args)
    resumed.fit()
    assert resumed.resumed_from.name == "checkpoint-000000016.pt" and steps[0] == 16
    assert_same_run(ref_state, snapshot(resumed))
    assert metric_lines(tmp_path) == metric_lines(ref_dir)


def test_damaged_newest_checkpoint_falls_back_to_the_intact_one(reference, tmp_path, capsys):
    ref_state, _ = reference
    make_trainer(tmp_path, checkpoint_every=3).fit(stop_after_steps=14)
    older, newest = list_checkpoints(tmp_path / "checkpoints")  # steps 9 and 12
    data = bytearray(newest.read_bytes())
    data[-100] ^= 0xFF
    newest.write_bytes(bytes(data))
    resumed = make_trainer(tmp_path, checkpoint_every=3)
    resumed.fit()
    assert resumed.resumed_from == older
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "damaged" in ln]
    assert str(newest) in line and "checksum mismatch" in line and str(older) in line
    assert_same_run(ref_state, snapshot(resumed))


def test_wall_time_accumulates_over_resumes(tmp_path):
    first = make_trainer(tmp_path)
    first.fit(stop_after_steps=9)  # the checkpoint of step 8 records the time so far
    resumed = make_trainer(tmp_path)
    resumed.started -= 1000.0  # as if this invocation had run for 1000 s more
    resumed.fit()
    assert resumed.wall_seconds_before > 0
    assert resumed.wall_seconds == pytest.approx(resumed.wall_seconds_before + resumed.invocation_seconds, abs=0.1)
    assert resumed.invocation_seconds > 1000
    again = make_trainer(tmp_path)
    again.fit()
    assert again.wall_seconds_before > 1000 + resumed.wall_seconds_before - 1e-6


# ------------------------------------------------------------------ refused checkpoints

def write_checkpoints(folder: Path, steps: int = 8) -> Path:
    make_trainer(folder).fit(stop_after_steps=steps + 1)  # the epoch-end checkpoint of step 8
    return list_checkpoints(folder / "checkpoints")[-1]


def test_truncated_checkpoint_is_refused_naming_the_file(tmp_path):
    path = write_checkpoints(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        make_trainer(tmp_path).fit()
    assert str(path) in str(info.value)


def test_foreign_file_is_refused(tmp_path):
    path = tmp_path / "checkpoints" / "checkpoint-000000005.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": tiny_model().state_dict()}, path)
    with pytest.raises(CheckpointError, match="not an s2hk-checkpoint file") as info:
        make_trainer(tmp_path).fit()
    assert str(path) in str(info.value)


def test_checkpoint_without_training_state_is_refused(tmp_path):
    path = tmp_path / "checkpoints" / "checkpoint-000000005.pt"
    save_checkpoint(path, {"model": tiny_model().state_dict()})
    with pytest.raises(CheckpointError, match="not an s2hk training checkpoint") as info:
        make_trainer(tmp_path).fit()
    assert str(path) in str(info.value)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    path = write_checkpoints(tmp_path)
    with pytest.raises(CheckpointError, match="another model") as info:
        make_trainer(tmp_path, width=24).fit()
    assert str(path) in str(info.value)


def test_checkpoint_of_a_run_with_other_settings_is_refused(tmp_path):
    make_trainer(tmp_path, run_config={"target_flops": 0.5, "out": "a"}).fit(stop_after_steps=9)
    with pytest.raises(CheckpointError, match=r"other settings \(target_flops: 0.5 -> 0.3\)"):
        make_trainer(tmp_path, run_config={"target_flops": 0.3, "out": "a"}).fit()
    trainer = make_trainer(tmp_path, run_config={"target_flops": 0.5, "out": "b"})
    trainer.resume_ignore = frozenset({"out"})
    trainer.fit(stop_after_steps=1)
    assert trainer.step == 9


# ------------------------------------------------------------------ outputs

def test_run_folder_outputs(reference):
    _, folder = reference
    config = json.loads((folder / "config.json").read_text())
    assert config["epochs"] == EPOCHS and config["steps_per_epoch"] == STEPS_PER_EPOCH
    assert config["train"]["lr"] == 0.05 and config["train"]["progress"] is False
    steps = read_metrics(folder, "step")
    assert [r["step"] for r in steps] == list(range(1, TOTAL_STEPS + 1))
    assert {"loss", "soft_acc", "hard_acc", "hard_flops_ratio", "lr"} <= set(steps[-1])
    epochs = read_metrics(folder, "epoch")
    assert [r["phase"] for r in epochs] == ["warmup", "joint", "joint", "hard"]
    for record in epochs:
        assert {"soft_acc", "hard_acc", "gap", "hard_flops_ratio", "target_flops", "flops_tolerance"} <= set(record)
        assert record["gap"] == pytest.approx(record["soft_acc"] - record["hard_acc"])
    with open(folder / "epochs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert len(list_checkpoints(folder / "checkpoints")) == 2  # keep_last


def test_pruning_moves_toward_the_target(reference):
    history = reference[0]["history"]
    assert history[0]["hard_flops_ratio"] == 1.0  # warm-up: dense
    assert history[-1]["hard_flops_ratio"] < 0.8


def test_without_run_folder_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = make_trainer(None)
    result = trainer.fit(stop_after_steps=STEPS_PER_EPOCH + 1)
    assert result == {} and list(tmp_path.iterdir()) == []
    assert trainer.save() is None


def test_train_config_validation():
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="keep_last"):
        TrainConfig(keep_last=0)
    with pytest.raises(ValueError, match="checkpoint_every"):
        TrainConfig(checkpoint_every=-1)
    with pytest.raises(ValueError, match="step_epochs"):
        TrainConfig(schedule="step", step_epochs=0)
    for gamma in (0.0, 1.5):
        with pytest.raises(ValueError, match="gamma"):
            TrainConfig(schedule="step", gamma=gamma)


def test_cosine_schedule_ends_at_zero():
    f = cosine_schedule(10)
    assert f(0) == 1.0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(0.0) and f(20) == f(10)


def test_step_schedule_multiplies_by_gamma_every_period():
    f = step_schedule(4, 0.1)
    assert [f(t) for t in (0, 3, 4, 7, 8, 12)] == [1.0, 1.0, 0.1, 0.1, 0.1 ** 2, 0.1 ** 3]


def test_step_schedule_decays_at_epoch_starts_and_resumes_bit_identically(tmp_path):
    """lr times gamma every step_epochs epochs (of max_steps_per_epoch-capped epochs: steps, not images);
    an interrupted run continues the schedule exactly."""
    settings = {"schedule": "step", "step_epochs": 1, "gamma": 0.5}
    ref_dir = tmp_path / "reference"
    reference_run = make_trainer(ref_dir, **settings)
    reference_run.fit()
    lrs = [r["lr"] for r in read_metrics(ref_dir, "step")]
    assert lrs == [0.05 * 0.5 ** (t // STEPS_PER_EPOCH) for t in range(TOTAL_STEPS)]

    out = tmp_path / "interrupted"
    make_trainer(out, checkpoint_every=3, **settings).fit(stop_after_steps=11)
    resumed = make_trainer(out, checkpoint_every=3, **settings)
    resumed.fit()
    assert_same_run(snapshot(reference_run), snapshot(resumed))
    assert metric_lines(out) == metric_lines(ref_dir)


# ------------------------------------------------------------------ mixed precision

def autocast_dtypes(trainer: Trainer) -> list:
    """Spy on the pruner: the CPU autocast dtype (None when off) at every train_step, BN recalibration,
    evaluation and end-of-epoch hook call, in order."""
    seen = []
    for name in ("train_step", "recalibrate_bn", "evaluate", "on_epoch_end"):
        method = getattr(trainer.pruner, name, None)
        if method is None:
            continue

        def spy(*args, _method=method, _name=name, **kwargs):
            on = torch.is_autocast_enabled("cpu")
            seen.append((_name, torch.get_autocast_dtype("cpu") if on else None))
            return _method(*args, **kwargs)

        setattr(trainer.pruner, name, spy)
    return seen


@pytest.mark.parametrize("precision, dtype", [("fp32", None), ("bf16", torch.bfloat16)])
def test_steps_and_evaluations_run_in_the_precision(precision, dtype):
    trainer = make_trainer(None, precision=precision)
    seen = autocast_dtypes(trainer)
    trainer.fit(stop_after_steps=STEPS_PER_EPOCH + 1)
    assert {name for name, _ in seen} >= {"train_step", "recalibrate_bn", "evaluate"}
    assert [d for _, d in seen] == [dtype] * len(seen)


def test_bf16_resume_is_bit_identical(tmp_path):
    ref_dir = tmp_path / "reference"
    reference_run = make_trainer(ref_dir, precision="bf16")
    reference_run.fit()
    out = tmp_path / "interrupted"
    make_trainer(out, checkpoint_every=3, precision="bf16").fit(stop_after_steps=11)
    resumed = make_trainer(out, checkpoint_every=3, precision="bf16")
    resumed.fit()
    assert_same_run(snapshot(reference_run), snapshot(resumed))
    assert metric_lines(out) == metric_lines(ref_dir)
    # bf16 changes the numbers: an fp32 run refuses its checkpoints
    with pytest.raises(CheckpointError, match="precision bf16, this one trains in fp32"):
        make_trainer(out).fit()


def tiny_stp(**overrides):
    from s2hk import STPruner

    return STPruner(tiny_model(), torch.zeros(1, 3, 8, 8), target_flops=0.5, total_epochs=2, population=2,
                    generations=0, **overrides)


def make_stp_trainer(out_dir: Path, checkpoint_every: int = 0) -> Trainer:
    """An STP run whose search scores on 16 held-out training images (two epochs of four steps)."""
    torch.manual_seed(0)
    train, val, held = make_loaders("synthetic", batch_size=16, image_size=8, seed=0, train_size=80, val_size=32,
                                    holdout=16)
    pruner = tiny_stp()
    pruner.set_search_batches(held)
    config = TrainConfig(lr=0.05, progress=False, recalibrate_batches=2, checkpoint_every=checkpoint_every)
    return Trainer(pruner, train, val, epochs=2, config=config, out_dir=out_dir)


def test_stp_searching_on_held_out_batches_resumes_bit_identically(tmp_path):
    reference_run = make_stp_trainer(tmp_path / "reference")
    reference_run.fit()
    out = tmp_path / "interrupted"
    make_stp_trainer(out, checkpoint_every=3).fit(stop_after_steps=7)
    resumed = make_stp_trainer(out, checkpoint_every=3)
    resumed.fit()
    assert resumed.resumed_from.name == "checkpoint-000000006.pt" and resumed.step == reference_run.step == 8
    assert resumed.pruner.best == reference_run.pruner.best and resumed.pruner.best_kd == reference_run.pruner.best_kd
    for key, value in reference_run.pruner.model.state_dict().items():
        assert torch.equal(value, resumed.pruner.model.state_dict()[key]), key
    assert resumed.history == reference_run.history
    assert metric_lines(out) == metric_lines(tmp_path / "reference")


def test_fp16_is_refused_where_it_cannot_train():
    with pytest.raises(ValueError, match=r"precision fp16: fp16 needs a gradient scaler, and "
                                         r"S2HPruner.train_step takes none .*use bf16"):
        make_trainer(None, precision="fp16")
    train, val = make_loaders("synthetic", batch_size=16, image_size=8, seed=0, train_size=32, val_size=16)
    with pytest.raises(ValueError, match="precision fp16: fp16 trains on CUDA devices only, not on cpu; use bf16"):
        Trainer(tiny_stp(), train, val, epochs=1, config=TrainConfig(precision="fp16", progress=False))
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        TrainConfig(precision="half")


@pytest.mark.gpu
def test_fp16_stp_run_on_cuda_steps_through_the_gradient_scaler(tmp_path):
    """fp16 on a GPU: every STP step runs under fp16 autocast and gets the trainer's gradient scaler, whose state
    the checkpoints carry and a resumed trainer restores. (Bit-identical resumption is tested with bf16 on the CPU:
    CUDA kernels need not be deterministic.)"""
    train, val = make_loaders("synthetic", batch_size=16, image_size=8, seed=0, train_size=64, val_size=32)

    def make() -> Trainer:
        torch.manual_seed(0)
        config = TrainConfig(lr=0.05, progress=False, recalibrate_batches=2, precision="fp16")
        return Trainer(tiny_stp().to("cuda"), train, val, epochs=2, config=config, out_dir=tmp_path)

    first = make()
    seen = []
    step = first.pruner.train_step

    def spy(x, y, optimizer, scaler=None):
        seen.append((torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None, scaler))
        return step(x, y, optimizer, scaler=scaler)

    first.pruner.train_step = spy
    first.fit(stop_after_steps=5)  # the checkpoint of step 4 ends the first epoch
    assert seen == [(torch.float16, first.scaler)] * 5
    saved = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    assert saved["precision"] == "fp16" and saved["scaler"]["scale"] > 0
    resumed = make()
    resumed.resume_if_possible()
    assert resumed.step == 4 and resumed.scaler.state_dict() == saved["scaler"]
    resumed.fit()
    assert resumed.step == 8
    assert all(torch.isfinite(p).all() for p in resumed.pruner.weight_parameters())
