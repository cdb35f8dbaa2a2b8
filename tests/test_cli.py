"""The s2hk command line end to end with tiny settings: prune, eval, export (+ ONNX), report, bench, config
files, and bad input reported as one line with exit code 2."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from s2hk.cli import UsageError, build_parser, main, resolve_prune_config

# A shipped model at 8x8 pixels, two epochs of two steps: the whole pipeline in a few seconds (too short to
# reach the FLOPs target: exit status 3 unless --allow-missed-target).
TINY = ["--image-size", "8", "--batch-size", "32", "--epochs", "2", "--warmup-epochs", "1",
        "--max-steps-per-epoch", "2", "--recalibrate-batches", "1", "--no-progress", "--threads", "1",
        "--set", "mask_lr=20"]
ALLOW = ["--allow-missed-target"]
# A user model on the synthetic set: the fastest run (one epoch of two steps).
QUICK = ["--model", "cli_user_models:tiny", "--dataset", "synthetic", "--image-size", "8", "--batch-size", "16",
         "--epochs", "1", "--max-steps-per-epoch", "2", "--recalibrate-batches", "1", "--no-progress",
         "--threads", "1", *ALLOW]

USER_MODELS = textwrap.dedent("""
    import torch
    from torch import nn

    def tiny(num_classes=10):
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    class Sliced(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.head = nn.Conv2d(4, num_classes, 1)

        def forward(self, x):
            return self.head(self.conv(x)[:, :4]).mean((2, 3))  # which channels survive is unknowable
""")


@pytest.fixture(scope="module")
def user_models(tmp_path_factory) -> str:
    """A module ``cli_user_models`` with a tiny CNN and a model s2hk cannot follow, importable by name."""
    folder = tmp_path_factory.mktemp("user_models")
    (folder / "cli_user_models.py").write_text(USER_MODELS)
    sys.path.insert(0, str(folder))
    yield str(folder)
    sys.path.remove(str(folder))
    sys.modules.pop("cli_user_models", None)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, str]:
    """One finished ``s2hk prune`` run of resnet56 on digits (its folder and its stdout)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    import io
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert main(["prune", "--out", str(out), *TINY, *ALLOW]) == 0
    return out, buffer.getvalue()


def error_of(capsys, argv: list[str]) -> str:
    """Run ``argv``, expect exit code 2 and return stderr (one line)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("s2hk: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    return err


# ------------------------------------------------------------------ prune

def test_prune_writes_the_run_folder(run):
    out, stdout = run
    for name in ("config.json", "summary.json", "metrics.jsonl", "epochs.csv", "architecture.json",
                 "pruned/model.pt", "pruned/architecture.json", "accuracy.png", "flops.png", "channels.png"):
        assert (out / name).is_file(), name
    assert list((out / "checkpoints").glob("checkpoint-*.pt"))
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "resnet56" and config["dataset"] == "digits" and config["image_size"] == 8
    assert config["method_options"] == {"mask_lr": 20} and config["world_size"] == 1
    assert config["train"]["max_steps_per_epoch"] == 2 and config["epochs"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dense_flops"] == 2 * summary["dense_macs"] > 0
    assert summary["pruned_flops"] == 2 * summary["pruned_macs"] <= summary["dense_flops"]
    assert summary["gap"] == pytest.approx(summary["soft_acc"] - summary["hard_acc"])
    arch = json.loads((out / "architecture.json").read_text())
    assert arch["flops"]["pruned"] == summary["pruned_flops"]
    for label in ("dense", "pruned", "MFLOPs", "MACs", "soft", "hard", "gap", str(out)):
        assert label in stdout, label
    # the plots of s2hk report are written by every run and named in the summary
    assert summary["plots"] == [str(out / name) for name in ("accuracy.png", "flops.png", "channels.png")]
    assert "plots  : " + ", ".join(summary["plots"]) in stdout
    # formats: strict JSON lines (no bare NaN), one wall time of the whole run and one of this invocation
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
    assert 0 < summary["wall_seconds_this_invocation"] <= summary["wall_seconds"]


def test_a_missed_target_is_reported_with_exit_status_3(run, capsys):
    """The tiny run ends at 100% of the dense FLOPs, far outside 35% +- 1%: the summary says so and the exit
    status is 3 (the rerun resumes the finished run, so this costs no training)."""
    out, stdout = run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target_met"] is False and summary["flops_tolerance"] == 0.01
    assert "WARNING: target missed" in stdout and "exit status 0 (--allow-missed-target)" in stdout
    assert main(["prune", "--out", str(out), *TINY]) == 3
    printed = capsys.readouterr().out
    assert "WARNING: target missed: the pruned network has 100.00% of the dense FLOPs, outside 35.00% +- " \
           "1.00%" in printed and "exit status 3 (--allow-missed-target: 0)" in printed
    assert json.loads((out / "summary.json").read_text())["target_met"] is False


def test_schedule_scales_with_the_epochs():
    """Without --warmup-epochs the warm-up is a sixth of the epochs (2 of the default 12, none of 2), so a short
    run still has joint epochs that prune; explicit epochs leaving no joint epoch are refused."""
    def resolved(*argv: str) -> dict:
        return resolve_prune_config(build_parser().parse_args(["prune", *argv]))

    assert resolved()["warmup_epochs"] == 2 and resolved("--epochs", "6")["warmup_epochs"] == 1
    for argv in (["--epochs", "2"], ["--model", "vit_tiny_cifar", "--epochs", "2"], ["--method", "stp", "--epochs",
                                                                                        "2"]):
        cfg = resolved(*argv)
        assert cfg["warmup_epochs"] == 0 and cfg["epochs"] - cfg["warmup_epochs"] - cfg["hard_epochs"] == 2
    assert resolved("--epochs", "3", "--hard-epochs", "2")["warmup_epochs"] == 0
    for argv in (["--epochs", "2", "--warmup-epochs", "2"], ["--method", "stp", "--epochs", "3",
                                                             "--warmup-epochs", "1", "--hard-epochs", "2"]):
        with pytest.raises(UsageError, match="leave no joint epoch"):
            resolved(*argv)


def test_eval_reports_the_pruned_accuracy(run, capsys):
    out, _ = run
    assert main(["eval", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert result["images"] == 359 and result["dataset"] == "digits"
    assert result["accuracy"] == pytest.approx(summary["hard_acc"], abs=1e-9)
    assert main(["eval", str(out)]) == 0
    assert "top-1 accuracy" in capsys.readouterr().out


def test_export_state_architecture_and_onnx(run, tmp_path, capsys):
    out, _ = run
    dest = tmp_path / "exported"
    assert main(["export", str(out), "--out", str(dest), "--onnx"]) == 0
    printed = capsys.readouterr().out.split()
    for name in ("model.pt", "architecture.json", "model.onnx"):
        assert (dest / name).is_file() and str(dest / name) in printed
    import onnx

    model = onnx.load(str(dest / "model.onnx"))
    onnx.checker.check_model(model)
    assert model.graph.input[0].name == "input"
    from onnx.reference import ReferenceEvaluator

    from s2hk import load_pruned

    x = torch.randn(3, 3, 8, 8)  # another batch size than the export's example: the batch axis is dynamic
    onnx_logits = ReferenceEvaluator(model).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(onnx_logits), load_pruned(dest)(x), rtol=1e-4, atol=1e-4)


def test_report_renders_pngs(run, tmp_path, capsys):
    out, _ = run
    assert main(["report", str(out), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    names = sorted(Path(p).name for p in printed)
    assert names == ["accuracy.png", "channels.png", "flops.png"]
    for name in names:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_resumes_the_finished_run(run, capsys):
    out, _ = run
    before = (out / "metrics.jsonl").read_text()
    first = json.loads((out / "summary.json").read_text())
    assert main(["prune", "--out", str(out), *TINY, *ALLOW]) == 0
    assert "pruned" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text() == before
    # the wall time accumulates over the invocations (the checkpoint carries it)
    again = json.loads((out / "summary.json").read_text())
    earlier = again["wall_seconds"] - again["wall_seconds_this_invocation"]  # as of the last checkpoint
    assert 0 < earlier <= first["wall_seconds"]


def test_rerun_with_other_settings_is_refused(run, capsys):
    out, _ = run
    err = error_of(capsys, ["prune", "--out", str(out), *TINY, "--target-flops", "0.5"])
    assert "checkpoint" in err and "target_flops: 0.35 -> 0.5" in err


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_and_flags(user_models, tmp_path, capsys, suffix):
    settings = {"model": "cli_user_models:tiny", "dataset": "synthetic", "image_size": 8, "batch_size": 32,
                "epochs": 2, "warmup_epochs": 1, "max_steps_per_epoch": 2, "recalibrate_batches": 1,
                "target_flops": 0.6, "progress": False, "method_options": {"kd": "unidirectional"},
                "allow_missed_target": True}
    path = tmp_path / f"run{suffix}"
    if suffix == ".yaml":
        import yaml

        path.write_text(yaml.safe_dump(settings))
    else:
        path.write_text(json.dumps(settings))
    out = tmp_path / "out"
    # a flag overrides the file; --set adds to the file's method options
    assert main(["prune", "--config", str(path), "--out", str(out), "--target-flops", "0.5",
                 "--set", "mask_lr=5"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "cli_user_models:tiny" and config["dataset"] == "synthetic"
    assert config["target_flops"] == 0.5 and config["config_file"] == str(path)
    assert config["method_options"] == {"kd": "unidirectional", "mask_lr": 5}
    capsys.readouterr()
    # a user model's pruned folder is rebuilt through its factory
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 512


def test_bench_prints_timings(capsys):
    assert main(["bench", "--batch-size", "2", "--image-size", "8", "--repeats", "1", "--device", "cpu",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("dense_step_s", "narrow_step_s", "floor_s", "s2hk_step_s"):
        assert result[key] > 0


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "prune" in capsys.readouterr().out


# ------------------------------------------------------------------ bad input

def test_missing_dataset_folder(capsys, tmp_path):
    err = error_of(capsys, ["prune", "--dataset", "cifar10", "--data-root", "/nonexistent/cifar",
                            "--out", str(tmp_path)])
    assert "/nonexistent/cifar" in err


def test_unknown_model_and_dataset(capsys, tmp_path):
    assert "unknown model 'resnet57'" in error_of(capsys, ["prune", "--model", "resnet57", "--out", str(tmp_path)])
    assert "no_such_module" in error_of(capsys, ["prune", "--model", "no_such_module:f", "--out", str(tmp_path)])
    assert "unknown dataset 'mnist'" in error_of(capsys, ["prune", "--dataset", "mnist", "--out", str(tmp_path)])


def test_unsupported_model(user_models, capsys, tmp_path):
    err = error_of(capsys, ["prune", "--model", "cli_user_models:Sliced", "--dataset", "synthetic",
                            "--image-size", "8", "--out", str(tmp_path), "--no-progress"])
    assert "getitem" in err and "ignore" in err


@pytest.mark.parametrize("text, message", [
    ("epochs: [1,\n", "cannot be parsed"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("epochz: 3\n", "unknown settings ['epochz']"),
    ("epochs: three\n", "'epochs' must be int"),
    ("target_flops: high\n", "'target_flops' must be float"),
    ("epochs: 2\nwarmup_epochs: 3\n", "leave no joint epoch"),
])
def test_malformed_config_file(capsys, tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    err = error_of(capsys, ["prune", "--config", str(path), "--out", str(tmp_path)])
    assert str(path) in err or "joint epoch" in err
    assert message in err


def test_malformed_json_config_and_missing_file(capsys, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{\"epochs\": 2,")
    assert "cannot be parsed" in error_of(capsys, ["prune", "--config", str(path)])
    assert "not found" in error_of(capsys, ["prune", "--config", str(tmp_path / "none.yaml")])


@pytest.mark.parametrize("item, message", [
    ("mask_lr", "expects KEY=VALUE"),
    ("mask_rate=3", "unknown S2HPruner settings ['mask_rate']"),
    ("kd=sideways", "kd must be one of"),
    ("target_flops=0.2", "--target-flops"),
])
def test_bad_set(capsys, item, message):
    assert message in error_of(capsys, ["prune", "--set", item])


def test_bad_flag_values(capsys):
    assert "'epochs' must be >= 1" in error_of(capsys, ["prune", "--epochs", "0"])
    assert "target_flops must be in (0, 1]" in error_of(capsys, ["prune", "--target-flops", "1.5"])
    assert "not available" in error_of(capsys, ["prune", "--method", "magic"])


def test_eval_export_report_of_a_missing_run(capsys, tmp_path):
    missing = tmp_path / "nothing"
    assert str(missing) in error_of(capsys, ["eval", str(missing)])
    assert str(missing) in error_of(capsys, ["export", str(missing)])
    tmp_path.joinpath("empty").mkdir()
    assert "metrics" in error_of(capsys, ["report", str(tmp_path / "empty")])
    assert "architecture.json: missing" in error_of(capsys, ["export", str(tmp_path / "empty")])


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["prune", "--epochs", "many"])
    assert info.value.code == 2


def test_console_entry_point_exit_code(tmp_path):
    """A real process: one line on stderr, exit status 2, no traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "s2hk.cli", "prune", "--dataset", "cifar10", "--data-root",
                           str(tmp_path / "absent"), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and str(tmp_path / "absent") in proc.stderr
    assert proc.stdout == ""


# ------------------------------------------------------------------ settings checked before any work

@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a prune run starts loading data."""
    import s2hk.cli

    def refuse(*args, **kwargs):
        raise AssertionError("the run started loading data before refusing its settings")

    monkeypatch.setattr(s2hk.cli, "_make_loaders", refuse)


@pytest.mark.parametrize("argv, message", [
    (["--method", "stp", "--target-flops", "0"], "target_flops must be in (0, 1], got 0.0"),
    (["--method", "stp", "--set", "population=0"], "population must be >= 1"),
    (["--method", "s2h", "--target-flops", "0"], "target_flops must be in (0, 1], got 0.0"),
    (["--method", "crsfp", "--prune-rate", "1.0"], "--prune-rate must be in [0, 1)"),
    (["--method", "crsfp", "--target-flops", "0.5"], "--target-flops: method crsfp takes no FLOPs target"),
    (["--method", "sfp", "--warmup-epochs", "2"], "--warmup-epochs 2: method sfp has no warm-up epochs"),
    (["--method", "crsfp", "--hard-epochs", "1"], "--hard-epochs 1: method crsfp has no hard-only epochs"),
    (["--method", "stp", "--prune-rate", "0.5"], "--prune-rate: method stp prunes to a FLOPs target"),
    (["--prune-rate", "0.5"], "--prune-rate: method s2h prunes to a FLOPs target"),
    (["--data-root", "/data/cifar"], "--data-root: dataset digits reads no folder"),
    (["--dataset", "synthetic", "--data-root", "/data"], "--data-root: dataset synthetic reads no folder"),
    (["--dataset", "cifar10", "--data-root", "/data", "--skip-bad-files"],
     "--skip-bad-files: dataset cifar10 has no image files"),
    (["--schedule", "linear"], "--schedule: setting 'schedule' must be one of cosine, step, constant, got 'linear'"),
    (["--lr-gamma", "0.5"], "--lr-gamma: applies to --schedule step only (this run's schedule is cosine)"),
    (["--schedule", "constant", "--lr-step-epochs", "3"], "--lr-step-epochs: applies to --schedule step only"),
    (["--schedule", "step", "--lr-gamma", "0"], "--lr-gamma must be in (0, 1], got 0.0"),
    (["--schedule", "step", "--lr-step-epochs", "0"], "setting 'lr_step_epochs' must be >= 1"),
    (["--precision", "half"], "--precision: setting 'precision' must be one of fp32, bf16, fp16, got 'half'"),
    (["--precision", "fp16"], "--precision fp16: fp16 needs a gradient scaler, and S2HPruner.train_step takes none"),
    (["--method", "stp", "--precision", "fp16"], "--precision fp16: fp16 trains on CUDA devices only, not on cpu"),
    (["--search-holdout", "0.1"], "--search-holdout: method s2h has no search; it sets training images aside for stp"),
    (["--method", "stp", "--search-holdout", "1.5"], "--search-holdout: setting 'search_holdout' must be a number of "
                                                     "images (an integer >= 1), a fraction in (0, 1) or 0 (none)"),
    (["--method", "stp", "--search-holdout", "-1"], "setting 'search_holdout' must be a number of images"),
])
def test_settings_are_refused_before_any_work(capsys, tmp_path, no_work, argv, message):
    assert message in error_of(capsys, ["prune", *argv, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_settings_a_method_uses_are_accepted(no_work):
    """Defaults that a method ignores are not refused, only explicit flags; a zero warm-up for crsfp agrees
    with what it does; config.json then shows only the settings the method uses."""
    def resolved(*argv: str) -> dict:
        return resolve_prune_config(build_parser().parse_args(["prune", *argv]))

    cfg = resolved("--method", "crsfp", "--warmup-epochs", "0")
    assert cfg["target_flops"] is None and cfg["warmup_epochs"] == 0 and cfg["prune_rate"] == 0.3
    assert resolved("--method", "stp")["prune_rate"] is None
    assert resolved()["lr_step_epochs"] is None and resolved()["lr_gamma"] is None  # used by the step schedule only
    cfg = resolved("--method", "crsfp", "--schedule", "step", "--lr-step-epochs", "3", "--lr-gamma", "0.5")
    assert (cfg["schedule"], cfg["lr_step_epochs"], cfg["lr_gamma"]) == ("step", 3, 0.5)
    assert resolved("--schedule", "step")["lr_step_epochs"] == 30 and resolved("--schedule", "step")["lr_gamma"] == 0.1
    assert resolved("--method", "stp", "--search-holdout", "100")["search_holdout"] == 100
    assert resolved("--method", "stp", "--search-holdout", "0.1")["search_holdout"] == 0.1
    assert resolved("--method", "stp")["search_holdout"] is None and resolved()["search_holdout"] is None


def test_a_held_out_part_taking_every_training_image_is_refused(capsys, tmp_path):
    err = error_of(capsys, ["prune", "--method", "stp", "--search-holdout", "5000", "--out", str(tmp_path / "run")])
    assert "--search-holdout 5000: holdout of 5000 images leaves none of the 1438 training images" in err


def test_prune_help_shows_defaults_and_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--epochs EPOCHS training epochs (default: 12)", "(default: 0.35)", "(default: resnet56)",
                     "(default: 64)", "(default: 0.05)", "default: epochs // 6", "runs/latest",
                     "3 finished, but the pruned network is outside the FLOPs target band"):
        assert expected in text, expected


# ------------------------------------------------------------------ run folders

def run_quietly(argv: list[str]) -> tuple[int, str]:
    import io
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = main(argv)
    return code, buffer.getvalue()


def test_every_run_gets_its_own_folder(user_models, tmp_path, monkeypatch, capsys):
    """Runs without --out never collide (the second one has other settings, as the README's DDP command would);
    runs/latest points to the newest, --out runs/latest and --resume continue it, eval follows it."""
    monkeypatch.chdir(tmp_path)
    assert run_quietly(["prune", *QUICK])[0] == 0
    assert run_quietly(["prune", *QUICK, "--target-flops", "0.5"])[0] == 0
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name != "latest")
    assert len(folders) == 2 and all(re.fullmatch(r"s2h-cli_user_models_tiny-synthetic-\d{8}-\d{6}(-2)?", f)
                                     for f in folders), folders
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink()
    newest = latest.resolve()
    assert json.loads((newest / "config.json").read_text())["target_flops"] == 0.5
    assert json.loads((newest / "summary.json").read_text())["out"] == str(Path("runs") / newest.name)
    before = (newest / "metrics.jsonl").read_text()
    for argv in (["--resume"], ["--out", "runs/latest"]):
        code, printed = run_quietly(["prune", *QUICK, "--target-flops", "0.5", *argv])
        assert code == 0 and f"output : runs/{newest.name}" in printed
        assert (newest / "metrics.jsonl").read_text() == before  # resumed the finished run: nothing retrained
    assert len(list((tmp_path / "runs").iterdir())) == 3
    capsys.readouterr()
    assert main(["eval", "runs/latest", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run"] == str(Path("runs") / newest.name)


def test_latest_is_a_text_file_where_links_cannot_be_made(user_models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def no_links(*args, **kwargs):
        raise OSError("symbolic links are not supported here")

    monkeypatch.setattr(os, "symlink", no_links)
    assert run_quietly(["prune", *QUICK])[0] == 0
    latest = tmp_path / "runs" / "latest"
    assert latest.is_file() and not latest.is_symlink()
    folder = tmp_path / "runs" / latest.read_text().strip()
    assert (folder / "summary.json").is_file()
    code, printed = run_quietly(["prune", *QUICK, "--resume"])
    assert code == 0 and f"output : runs/{folder.name}" in printed
    assert main(["eval", "runs/latest", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run"] == str(Path("runs") / folder.name)


def test_resume_without_a_run_and_an_old_latest_folder(user_models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert "--resume: no run to resume (runs/latest does not exist)" in error_of(capsys, ["prune", *QUICK,
                                                                                         "--resume"])
    old = tmp_path / "runs" / "latest"  # the run folder of an earlier s2hk, which wrote to runs/latest
    old.mkdir(parents=True)
    (old / "summary.json").write_text("{}")
    assert run_quietly(["prune", *QUICK])[0] == 0
    assert old.is_dir() and not old.is_symlink() and (old / "summary.json").read_text() == "{}"
    assert "runs/latest is a run folder of an earlier s2hk version; it is kept" in capsys.readouterr().err


def test_no_resume_moves_the_earlier_files_aside(user_models, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_quietly(["prune", *QUICK, "--out", str(out)])[0] == 0
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    summary = (out / "summary.json").read_text()
    capsys.readouterr()
    assert run_quietly(["prune", *QUICK, "--out", str(out), "--no-resume", "--target-flops", "0.5"])[0] == 0
    assert "the earlier files were moved to" in capsys.readouterr().err
    (previous,) = out.glob("previous-*")
    assert sorted(p.name for p in (previous / "checkpoints").iterdir()) == checkpoints
    assert (previous / "summary.json").read_text() == summary
    assert {"accuracy.png", "pruned", "metrics.jsonl", "config.json"} <= {p.name for p in previous.iterdir()}
    assert json.loads((out / "config.json").read_text())["target_flops"] == 0.5


# ------------------------------------------------------------------ unreadable images

@pytest.fixture
def image_folder(tmp_path) -> Path:
    """An ImageNet-style folder of 8x8 PNGs, 2 classes, 8 training and 3 validation images each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for split, count in (("train", 8), ("val", 3)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for k in range(count):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / cls / f"{k}.png")
    return root


def test_an_unreadable_image_is_refused_up_front_or_skipped(user_models, image_folder, tmp_path, capsys):
    bad = image_folder / "val" / "b" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    argv = ["prune", "--model", "cli_user_models:tiny", "--dataset", "imagefolder", "--data-root",
            str(image_folder), "--image-size", "8", "--batch-size", "4", "--epochs", "1", "--max-steps-per-epoch",
            "2", "--recalibrate-batches", "1", "--no-progress", "--threads", "1", *ALLOW]
    out = tmp_path / "run"
    err = error_of(capsys, [*argv, "--out", str(out)])
    assert str(bad) in err and "unreadable image" in err and "--skip-bad-files" in err
    assert not out.exists()  # refused before anything was written
    code, printed = run_quietly([*argv, "--out", str(out), "--skip-bad-files"])
    assert code == 0 and "skipped: 1 unreadable image file(s)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_files"] == 1 and summary["skipped_file_list"] == [str(bad)]


# ------------------------------------------------------------------ saved models

def test_eval_of_a_damaged_pruned_model_is_one_line(run, tmp_path, capsys):
    out, _ = run
    copy = tmp_path / "copy"
    copy.mkdir()
    arch = json.loads((out / "pruned" / "architecture.json").read_text())
    name = next(iter(arch["layers"]))
    arch["layers"][name]["kept_in_channels"] = "0-2"
    (copy / "architecture.json").write_text(json.dumps(arch))
    (copy / "model.pt").write_bytes((out / "pruned" / "model.pt").read_bytes())
    err = error_of(capsys, ["eval", str(copy)])
    assert str(copy / "architecture.json") in err and f"layers['{name}'].kept_in_channels" in err


def test_training_settings_reach_the_trainer(user_models, tmp_path, capsys):
    """--schedule step with its period and factor: the trainer decays lr at the start of every epoch (steps capped
    by --max-steps-per-epoch); --precision bf16; config.json records the settings."""
    from s2hk.metrics import read_metrics

    out = tmp_path / "run"
    code, _ = run_quietly(["prune", *QUICK, "--epochs", "2", "--out", str(out), "--schedule", "step",
                           "--lr-step-epochs", "1", "--lr-gamma", "0.5", "--precision", "bf16"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert (config["schedule"], config["lr_step_epochs"], config["lr_gamma"]) == ("step", 1, 0.5)
    assert (config["train"]["schedule"], config["train"]["step_epochs"], config["train"]["gamma"]) == ("step", 1, 0.5)
    assert config["precision"] == config["train"]["precision"] == "bf16"
    assert [r["lr"] for r in read_metrics(out, "step")] == [0.05, 0.05, 0.025, 0.025]
