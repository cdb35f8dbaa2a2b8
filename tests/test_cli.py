"""The s2hk command line end to end with tiny settings: prune, eval, export (+ ONNX), report, bench, config
files, and bad input reported as one line with exit code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from s2hk.cli import main

# A shipped model at 8x8 pixels, two epochs of two steps: the whole pipeline in a few seconds.
TINY = ["--image-size", "8", "--batch-size", "32", "--epochs", "2", "--warmup-epochs", "1",
        "--max-steps-per-epoch", "2", "--recalibrate-batches", "1", "--no-progress", "--threads", "1",
        "--set", "mask_lr=20"]

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
        assert main(["prune", "--out", str(out), *TINY]) == 0
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
                 "pruned/model.pt", "pruned/architecture.json"):
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
    assert main(["prune", "--out", str(out), *TINY]) == 0
    assert "pruned" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text() == before


def test_rerun_with_other_settings_is_refused(run, capsys):
    out, _ = run
    err = error_of(capsys, ["prune", "--out", str(out), *TINY, "--target-flops", "0.5"])
    assert "checkpoint" in err and "target_flops: 0.35 -> 0.5" in err


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_and_flags(user_models, tmp_path, capsys, suffix):
    settings = {"model": "cli_user_models:tiny", "dataset": "synthetic", "image_size": 8, "batch_size": 32,
                "epochs": 2, "warmup_epochs": 1, "max_steps_per_epoch": 2, "recalibrate_batches": 1,
                "target_flops": 0.6, "progress": False, "method_options": {"kd": "unidirectional"}}
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
    ("epochs: 2\nwarmup_epochs: 3\n", "exceed epochs"),
])
def test_malformed_config_file(capsys, tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    err = error_of(capsys, ["prune", "--config", str(path), "--out", str(tmp_path)])
    assert str(path) in err or "exceed" in err
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
