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
        assert _csv_header(tmp_path) == ["epoch", "step", "hard_acc", "soft_acc"]
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
    assert _csv_header(tmp_path) == ["epoch", "step", "gap", "hard_acc", "soft_acc"]
    rows = _csv_rows(tmp_path)
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert rows[0]["gap"] == "" and rows[2]["gap"] == "0.01" and rows[1]["hard_acc"] == "0.55"

    closed = MetricsLogger(tmp_path, tensorboard=False)
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        closed.log("step", step=9)


def test_non_finite_values_are_strict_json_null_read_back_as_nan(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log("step", step=1, loss=float("nan"), kd=torch.tensor(float("inf")), lr=np.float64("-inf"),
                widths=[1.0, float("nan")])
        log.log("epoch", epoch=0, step=1, hard_acc=float("nan"))
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        assert "NaN" not in line and "Infinity" not in line
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    step = read_metrics(tmp_path, "step")[0]
    assert math.isnan(step["loss"]) and math.isnan(step["kd"]) and math.isnan(step["lr"])
    assert step["widths"] == [1.0, None]
    assert _csv_rows(tmp_path)[0]["hard_acc"] == ""
    # a file written with bare NaN by an earlier version is rewritten as JSON when the logger repairs it
    (tmp_path / "metrics.jsonl").write_text('{"kind": "step", "step": 1, "loss": NaN}\n{"kind": "st')
    with pytest.warns(RuntimeWarning, match="malformed"):
        MetricsLogger(tmp_path, tensorboard=False).close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"kind": "step", "step": 1, "loss": null}\n'


def test_epoch_csv_columns_do_not_depend_on_key_order(tmp_path):
    """A data-parallel run builds its evaluation dict in another key order than one process: same header."""
    for folder, order in ((tmp_path / "single", ["soft_acc", "hard_acc", "gap"]),
                          (tmp_path / "ddp", ["gap", "hard_acc", "soft_acc"])):
        with MetricsLogger(folder, tensorboard=False) as log:
            values = {"soft_acc": 0.5, "hard_acc": 0.4, "gap": 0.1, "hard_flops_ratio": 0.5}
            log.log("epoch", phase="joint", **{k: values[k] for k in order}, epoch=1, step=8, hard_flops_ratio=0.5)
    assert (tmp_path / "single" / "epochs.csv").read_text() == (tmp_path / "ddp" / "epochs.csv").read_text()
    assert _csv_header(tmp_path / "single") == ["epoch", "step", "phase", "gap", "hard_acc", "hard_flops_ratio",
                                                "soft_acc"]


def test_resume_before_an_epoch_record_drops_it(tmp_path):
    """A checkpoint taken after an epoch's training but before its evaluation: the interrupted run may have
    logged the epoch record; the resumed run logs it again, so it is dropped."""
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in (1, 2):
            log.log("step", step=step, loss=1.0)
        log.log("epoch", epoch=0, step=2, hard_acc=0.5)
    with MetricsLogger(tmp_path, resume_step=2, pending_epoch=True, tensorboard=False):
        assert [r["kind"] for r in read_metrics(tmp_path)] == ["step", "step"]
        assert not (tmp_path / "epochs.csv").exists()


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


def _rendered(monkeypatch) -> dict:
    """Capture the figures render_report draws, by file name."""
    import s2hk.report as report

    figures = {}
    save = report._save
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.__setitem__(path.name, fig) or save(fig, path))
    return figures


def _texts(fig) -> tuple[str, list[str], int]:
    """Title, legend entries and the number of horizontal lines / spans (a target) of a figure's first axes."""
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    return ax.get_title(), legend, sum(1 for line in ax.lines if line.get_linestyle() == "--")


@pytest.mark.parametrize("method, keys, legend, title", [
    ("s2h", {}, ["soft network (relaxed masks)", "hard network (pruned)", "discretization gap (soft − hard)"],
     "Soft vs hard accuracy and the discretization gap"),
    ("crsfp", {"rnn_acc": 0.8, "pnn_acc": 0.7}, ["R-NN (full width)", "P-NN (pruned)", "gap (R-NN − P-NN)"],
     "R-NN vs P-NN accuracy and the gap"),
    ("stp", {"dense_acc": 0.8}, ["full network", "subnet (best found, exported)", "gap (full − subnet)"],
     "Full vs subnet accuracy and the gap"),
])
@pytest.mark.parametrize("with_config", [True, False])
def test_plots_name_each_methods_networks(tmp_path, monkeypatch, method, keys, legend, title, with_config):
    """The networks are named by the method (from config.json, else from the evaluation keys); a target line
    is drawn only where the run has a target (CR-SFP has none)."""
    figures = _rendered(monkeypatch)
    target = {} if method == "crsfp" else {"target_flops": 0.35, "flops_tolerance": 0.01}
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for epoch in range(3):
            log.log("epoch", epoch=epoch, step=epoch, soft_acc=0.8, hard_acc=0.7, gap=0.1, hard_flops_ratio=0.5,
                    **keys, **target)
    if with_config:
        (tmp_path / "config.json").write_text(json.dumps({"method": method}))
    render_report(tmp_path)
    got_title, got_legend, _ = _texts(figures["accuracy.png"])
    assert got_legend == legend and got_title == title
    flops_title, flops_legend, dashed = _texts(figures["flops.png"])
    if method == "crsfp":
        assert flops_title == "P-NN FLOPs ratio" and dashed == 0 and flops_legend == ["P-NN FLOPs ratio"]
    else:
        assert flops_title.endswith("FLOPs ratio against the target") and dashed == 1
        assert flops_legend[1:] == ["target 0.35", "tolerance ±0.01"]
