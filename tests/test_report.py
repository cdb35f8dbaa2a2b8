"""Metrics logging (JSON lines, epoch CSV, resume truncation) and the PNG report built from it."""
from __future__ import annotations

import csv
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from s2hk import metrics as metrics_module
from s2hk.metrics import MetricsLogger, read_metrics
from s2hk.report import ReportError, main, render_report


def _csv_rows(folder: Path) -> list[dict]:
    with open(folder / "epochs.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _csv_header(folder: Path) -> list[str]:
    return (folder / "epochs.csv").read_text(encoding="utf-8").splitlines()[0].split(",")


# ------------------------------------------------------------------------------------------ metrics

def test_log_writes_json_lines_and_epoch_csv(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        record = log.log("step", step=1, epoch=0, loss=torch.tensor(2.5), lr=np.float32(0.5))
        assert record == {"kind": "step", "step": 1, "epoch": 0, "loss": 2.5, "lr": 0.5}
        log.log("epoch", epoch=0, step=1, soft_acc=0.5, hard_acc=0.4)
        log.log("step", step=2, epoch=1, loss=float("nan"), widths=torch.tensor([3, 4]))
        log.log("epoch", epoch=1, step=2, soft_acc=0.6, hard_acc=0.55)
        assert _csv_header(tmp_path) == ["epoch", "step", "soft_acc", "hard_acc"]
        log.log("epoch", epoch=2, step=3, soft_acc=0.7, hard_acc=0.69, gap=0.01)  # a new column appears

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line)["kind"] in ("step", "epoch") for line in lines)
    records = read_metrics(tmp_path)
    assert [r["kind"] for r in records] == ["step", "epoch", "step", "epoch", "epoch"]
    assert math.isnan(records[2]["loss"]) and records[2]["widths"] == [3, 4]
    assert [r["epoch"] for r in read_metrics(tmp_path, kind="epoch")] == [0, 1, 2]
    assert read_metrics(tmp_path / "metrics.jsonl") == records
    assert read_metrics(tmp_path / "elsewhere") == []

    # the header was rewritten with the union of keys; earlier rows have the new column empty
    assert _csv_header(tmp_path) == ["epoch", "step", "soft_acc", "hard_acc", "gap"]
    rows = _csv_rows(tmp_path)
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert rows[0]["gap"] == "" and rows[2]["gap"] == "0.01" and rows[1]["hard_acc"] == "0.55"

    closed = MetricsLogger(tmp_path, tensorboard=False)
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        closed.log("step", step=9)


def test_resume_truncates_records_after_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 11):
            log.log("step", step=step, loss=1.0 / step)
            if step % 5 == 0:
                log.log("epoch", epoch=step // 5 - 1, step=step, hard_acc=step / 10)
        log.log("note", text="logged after step 10, without a step")

    # resume from the checkpoint taken at step 5: steps 6..10, epoch 1 and the late note disappear
    with MetricsLogger(tmp_path, resume_step=5, tensorboard=False) as log:
        assert [r.get("step") for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 5]
        assert [r["epoch"] for r in _csv_rows(tmp_path)] == ["0"]
        for step in range(6, 11):
            log.log("step", step=step, loss=1.0 / step)
        log.log("epoch", epoch=1, step=10, hard_acc=1.0)

    steps = [r["step"] for r in read_metrics(tmp_path, kind="step")]
    assert steps == list(range(1, 11))  # no duplicates
    assert [r["epoch"] for r in _csv_rows(tmp_path)] == ["0", "1"]

    # reopening without resume_step keeps everything
    MetricsLogger(tmp_path, tensorboard=False).close()
    assert len(read_metrics(tmp_path)) == 12


def test_partial_last_line_is_skipped_and_repaired(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log("step", step=1, loss=1.0)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "st')  # a run killed mid-line
    with pytest.warns(RuntimeWarning, match="malformed"):
        assert len(read_metrics(tmp_path)) == 1
    with pytest.warns(RuntimeWarning):
        log = MetricsLogger(tmp_path, tensorboard=False)
    log.log("step", step=2, loss=0.5)
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]  # no warning now: the file is clean


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    log = MetricsLogger(tmp_path / "rank1")
    assert log.log("step", step=1) is None
    log.close()
    assert not (tmp_path / "rank1").exists()
    with MetricsLogger(tmp_path / "all", rank0_only=False, tensorboard=False) as log:
        log.log("step", step=1)
    assert len(read_metrics(tmp_path / "all")) == 1


def test_tensorboard_mirror(tmp_path, monkeypatch):
    calls = []

    class FakeWriter:
        def add_scalar(self, tag, value, global_step=None):
            calls.append((tag, value, global_step))

        def close(self):
            calls.append("closed")

    opened = []
    monkeypatch.setattr(metrics_module, "_open_tensorboard",
                        lambda folder, purge_step: opened.append(purge_step) or FakeWriter())
    with MetricsLogger(tmp_path, resume_step=4) as log:
        log.log("step", step=5, loss=0.25, name="x", flag=True)
        log.log("epoch", epoch=1, hard_acc=0.9)
    assert opened == [5]
    assert calls == [("step/loss", 0.25, 5), ("epoch/hard_acc", 0.9, 1), "closed"]
    # without tensorboard installed the mirror is simply off
    monkeypatch.setattr(metrics_module, "_open_tensorboard", lambda folder, purge_step: None)
    with MetricsLogger(tmp_path / "plain") as log:
        log.log("step", step=1, loss=1.0)


# ------------------------------------------------------------------------------------------ report

def _write_run(folder: Path, epochs: int = 12, steps_per_epoch: int = 20, with_acc: bool = True,
               with_flops: bool = True) -> None:
    rng = np.random.default_rng(0)
    with MetricsLogger(folder, tensorboard=False) as log:
        step = 0
        for epoch in range(epochs):
            for _ in range(steps_per_epoch):
                step += 1
                values = {"loss": float(2.0 / step), "lr": 0.1}
                if with_flops:
                    values.update(hard_flops_ratio=0.5 + 0.5 * math.exp(-step / 60) + rng.normal(0, 0.005),
                                  target_flops=0.5, flops_tolerance=0.02)
                log.log("step", step=step, epoch=epoch, **values)
            if with_acc:
                soft = 0.9 - 0.5 * math.exp(-epoch / 3)
                hard = soft - 0.2 * math.exp(-epoch / 4)
                log.log("epoch", epoch=epoch, step=step, soft_acc=soft, hard_acc=hard, gap=soft - hard)


def _write_architecture(folder: Path, n_convs: int = 60) -> None:
    layers = {}
    for i in range(n_convs):
        dense = 64 * 2 ** (i // 20)
        name = f"layer{i // 20 + 1}.{i % 20 // 2}.conv{i % 2 + 1}"
        layers[name] = {"type": "Conv2d", "in_channels": 3, "out_channels": dense * (30 + i % 30) // 60,
                        "dense_in_channels": 3, "dense_out_channels": dense}
        layers[name.replace("conv", "bn")] = {"type": "BatchNorm2d", "in_channels": dense, "out_channels": dense,
                                              "dense_in_channels": dense, "dense_out_channels": dense}
    layers["fc"] = {"type": "Linear", "in_channels": 256, "out_channels": 10,
                    "dense_in_channels": 256, "dense_out_channels": 10}
    (folder / "architecture.json").write_text(json.dumps({"format": "s2hk-architecture", "version": 1,
                                                          "layers": layers}))


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert data[12:16] == b"IHDR" and len(data) > 10_000, path
    return struct.unpack(">II", data[16:24])


def test_report_renders_three_plots(tmp_path):
    _write_run(tmp_path)
    _write_architecture(tmp_path)
    paths = render_report(tmp_path)
    assert [p.name for p in paths] == ["accuracy.png", "flops.png", "channels.png"]
    sizes = {p.name: _png_size(p) for p in paths}
    assert all(w >= 600 and h >= 400 for w, h in sizes.values())
    assert sizes["channels.png"][1] > 1200  # tall enough for ~60 readable layer names
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_report_skips_missing_parts(tmp_path):
    flops_only = tmp_path / "flops_only"
    _write_run(flops_only, with_acc=False)
    assert [p.name for p in render_report(flops_only)] == ["flops.png"]

    acc_only = tmp_path / "acc_only"
    _write_run(acc_only, with_flops=False, epochs=3)
    out = tmp_path / "out"
    paths = render_report(acc_only, out_folder=out)
    assert paths == [out / "accuracy.png"] and _png_size(paths[0])
    assert not (acc_only / "accuracy.png").exists()

    arch_only = tmp_path / "arch_only"
    arch_only.mkdir()
    _write_architecture(arch_only, n_convs=4)
    with MetricsLogger(arch_only, tensorboard=False) as log:
        log.log("step", step=1, loss=1.0)
    assert [p.name for p in render_report(arch_only)] == ["channels.png"]


def test_report_handles_scheduled_target_and_percent_accuracy(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for epoch in range(5):
            target = 1.0 - 0.1 * epoch  # a target lowered step by step
            log.log("epoch", epoch=epoch, soft_acc=60.0 + epoch, hard_acc=55.0 + 2 * epoch,
                    hard_flops_ratio=target + 0.01, target_flops=target, flops_tolerance=0.03)
    assert [p.name for p in render_report(tmp_path)] == ["accuracy.png", "flops.png"]


def test_report_errors_name_the_folder(tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(ReportError, match="empty_run.*no metrics"):
        render_report(empty)
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(ReportError, match="empty_run.*no records"):
        render_report(empty)

    run = tmp_path / "run"
    _write_run(run, epochs=2)
    (run / "architecture.json").write_text('{"format": "something-else"}')
    with pytest.raises(ReportError, match="architecture.json.*not an s2hk-architecture"):
        render_report(run)
    (run / "architecture.json").write_text("{broken")
    with pytest.raises(ReportError, match="cannot read architecture file"):
        render_report(run)


def test_command_line(tmp_path, capsys):
    _write_run(tmp_path, epochs=2)
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "accuracy.png"), str(tmp_path / "flops.png")]
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "nothing")])
    assert info.value.code == 1
