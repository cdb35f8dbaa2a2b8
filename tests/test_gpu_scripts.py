"""The GPU scripts of bench/ on a CPU: gpu_e2e.py's smoke mode and gpu_check.py's parts.

Both scripts run for real only on a GPU machine, in one call; what can break before then is checked here:
the e2e script's CPU smoke run and the figures it derives from its times, its workload list and deadline, and
the check script's junit / progress-log parsing, its per-test timeout plugin, its table and its dry run.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402
import gpu_e2e  # noqa: E402

SMOKE = ["--device", "cpu", "--model", "resnet56", "--sizes", "32", "--batch-sizes", "4", "--repeats", "1"]


# ------------------------------------------------------------------------------------------ gpu_e2e.py
@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    """The CPU smoke run, as CI runs it."""
    out = tmp_path_factory.mktemp("e2e") / "e2e.json"
    proc = subprocess.run([sys.executable, "bench/gpu_e2e.py", *SMOKE, "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resnet56 32px batch 4" in proc.stdout
    return json.loads(out.read_text())


def test_e2e_smoke_names_device_versions_and_settings(smoke):
    assert smoke["device"] == "cpu" and smoke["device_name"]
    assert smoke["versions"]["torch"] and "triton" in smoke["versions"] and smoke["date_utc"].endswith("Z")
    assert smoke["settings"]["precision"] == "float32" and smoke["settings"]["unpinned_steps"] == 3
    assert smoke["settings"]["threads"] == 1
    assert smoke["bf16_peak"]["tflops"] is None
    assert smoke["complete"] and not smoke["errors"] and not smoke["skipped"]
    (res,) = smoke["results"]
    assert (res["model"], res["image_size"], res["batch_size"], res["device_name"]) == \
        ("resnet56", 32, 4, smoke["device_name"])
    assert res["versions"] == smoke["versions"] and res["date_utc"].endswith("Z")


def test_e2e_smoke_figures_follow_from_the_times(smoke):
    (res,) = smoke["results"]
    samples = res["samples_s"]
    assert set(samples) == {"s2hk", "dense", "narrow", "input_grad", "naive"}
    assert all(len(v) == 1 for v in samples.values())
    med = {k: statistics.median(v) for k, v in samples.items()}
    assert res["dense_step_s"] == med["dense"] and res["s2hk_step_s"] == med["s2hk"]
    floor = med["dense"] + med["narrow"] + med["input_grad"]
    assert res["floor_s"] == pytest.approx(floor)
    assert res["s2hk_over_floor"] == pytest.approx(med["s2hk"] / floor)
    assert res["s2hk_over_dense"] == pytest.approx(med["s2hk"] / med["dense"])
    assert res["speedup_over_naive"] == pytest.approx(med["naive"] / med["s2hk"])
    r = res["hard_flops_ratio"]
    assert 0 < r < 1 and res["flops_ideal_over_dense"] == pytest.approx((4 + 3 * r) / 3)
    flops = res["dense_forward_flops_per_image"]
    assert res["images_per_s"]["s2hk"] == pytest.approx(4 / med["s2hk"])
    assert res["tflops"]["s2hk"] == pytest.approx((4 + 3 * r) * flops * 4 / med["s2hk"] / 1e12)
    assert res["tflops"]["dense"] == pytest.approx(3 * flops * 4 / med["dense"] / 1e12)
    assert res["percent_of_peak"]["s2hk"] is None  # no peak measured on a CPU

    u = res["unpinned"]
    assert u["steps_done"] == u["steps_requested"] == 3 and len(u["step_s"]) == 3 and u["stopped_early"] is None
    assert u["mean_s"] == pytest.approx(statistics.fmean(u["step_s"]))
    assert u["median_s"] == pytest.approx(statistics.median(u["step_s"]))
    assert u["hard_flops_ratio_per_step"][0] == 1.0  # from the max init: the first step's hard path is full width
    pinned_mean = statistics.fmean(samples["s2hk"])
    assert res["s2hk_pinned_mean_s"] == pytest.approx(pinned_mean)
    assert res["unpinned_mean_over_pinned_mean"] == pytest.approx(u["mean_s"] / pinned_mean)

    checks = {c["figure"]: c for c in res["checks"]}
    assert set(checks) == {"s2hk_pinned_over_floor", "s2hk_unpinned_mean_over_pinned_mean",
                           "s2hk_unpinned_over_pinned_per_work"}
    pinned = checks["s2hk_pinned_over_floor"]
    assert pinned["target"] == 1.10 and pinned["measured"] == pytest.approx(res["s2hk_over_floor"])
    assert pinned["met"] == (pinned["measured"] <= 1.10) and pinned["basis"]
    assert checks["s2hk_unpinned_mean_over_pinned_mean"]["target"] == 1.10

    assert set(res["peak_memory_mib"]) == set(samples)
    for name in ("s2hk", "dense", "narrow", "input_grad"):
        assert res["launches"][name]["op_calls"] > 0
    assert res["launches"]["floor"]["op_calls"] == sum(res["launches"][k]["op_calls"]
                                                       for k in ("dense", "narrow", "input_grad"))


def test_e2e_results_render_as_a_table(smoke):
    import make_table

    text = make_table.markdown(smoke)
    row = [line for line in text.splitlines() if line.startswith("| resnet56 |")]
    assert len(row) == 1 and "no bf16 peak measured" in text
    assert f"{smoke['results'][0]['s2hk_over_floor']:.3g}" in row[0]


def test_e2e_workloads_and_targets():
    assert gpu_e2e.workloads(None, None, None) == [("resnet50", 32, 256), ("resnet50", 224, 128),
                                                   ("resnet56", 32, 256)]
    assert gpu_e2e.workloads(["resnet56"], [32], [4]) == [("resnet56", 32, 4)]
    assert gpu_e2e.workloads(["resnet50"], None, None) == [("resnet50", 32, 256), ("resnet50", 224, 128)]
    assert gpu_e2e.workloads(["resnet50", "resnet56"], [32, 64], [8]) == \
        [("resnet50", 32, 8), ("resnet50", 64, 8), ("resnet56", 32, 8), ("resnet56", 64, 8)]
    with pytest.raises(ValueError):
        gpu_e2e.workloads(["resnet56"], [32, 64, 96], [1, 2])
    args = gpu_e2e.parse_args(["--device", "cpu", "--model", "resnet56,resnet50", "--sizes", "32",
                               "--batch-sizes", "4"])
    assert args.workloads == [("resnet56", 32, 4), ("resnet50", 32, 4)]
    assert (args.repeats, args.warmup, args.unpinned_steps, args.precision) == (3, 1, 3, "fp32")
    assert gpu_e2e.pinned_target("cpu", "resnet50", 224) == 1.10
    assert gpu_e2e.pinned_target("cuda", "resnet50", 32) == 1.15
    assert gpu_e2e.pinned_target("cuda", "resnet50", 224) == 1.10
    assert gpu_e2e.pinned_target("cuda", "resnet56", 32) == 1.3
    assert gpu_e2e.check("x", 1.2, 1.1, "b")["met"] is False
    assert gpu_e2e.check("x", None, 1.1, "b")["met"] is None
    assert gpu_e2e.check("x", math.nan, 1.1, "b")["met"] is None


def test_e2e_deadline_skips_workloads_and_still_writes(tmp_path):
    out = tmp_path / "e2e.json"
    assert gpu_e2e.main([*SMOKE, "--deadline-s", "0", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["results"] == [] and not data["complete"]
    assert data["skipped"][0]["model"] == "resnet56" and "deadline" in data["skipped"][0]["reason"]


def test_e2e_a_failing_step_kind_is_recorded_and_the_rest_measured(tmp_path, monkeypatch):
    import naive_two_pass

    def broken(self, x, y, optimizer):
        raise RuntimeError("two-pass step broke")

    monkeypatch.setattr(naive_two_pass.NaiveS2HPruner, "train_step", broken)
    out = tmp_path / "e2e.json"
    argv = [*SMOKE, "--warmup", "0", "--unpinned-steps", "1", "--no-launches", "--json", str(out)]
    assert gpu_e2e.main(argv) == 1
    data = json.loads(out.read_text())
    (res,) = data["results"]
    assert "two-pass step broke" in res["errors"]["naive"]["error"] and set(res["errors"]) == {"naive"}
    assert data["errors"][0]["part"] == "naive" and not data["complete"]
    assert res["naive_step_s"] is None and res["speedup_over_naive"] is None and "naive" not in res["samples_s"]
    assert res["s2hk_over_floor"] == pytest.approx(res["s2hk_step_s"] / res["floor_s"])
    assert res["unpinned"]["steps_done"] == 1


# ------------------------------------------------------------------------------------------ gpu_check.py
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest" errors="2"
failures="2" skipped="1" tests="7" time="3.0"><testcase classname="tests.test_gpu_scripts" name="test_ok" time="2.5"/>
<testcase classname="tests.test_gpu_scripts.TestThing" name="test_case[a-1]" time="0.1"/>
<testcase classname="tests.test_x" name="test_skip" time="0.0"><skipped type="pytest.skip" message="x">x</skipped>
</testcase><testcase classname="tests.test_x" name="test_fail" time="0.0"><failure message="assert 1 == 2">E assert
</failure></testcase><testcase classname="tests.test_x" name="test_slow" time="120.0"><failure
message="Failed: Timeout &gt;120s">...</failure></testcase><testcase classname="tests.test_x" name="test_crash"
time="0.0"><error message="failed on setup with &quot;worker 'gw1' crashed while running 'tests/test_x.py::test_crash'
&quot;">worker 'gw1' crashed</error></testcase><testcase classname="tests.test_x" name="test_setup" time="0.0"><error
message="failed on setup with &quot;RuntimeError: broke&quot;">RuntimeError</error></testcase></testsuite></testsuites>
"""


def test_check_slug_and_device_file_name():
    assert gpu_check.slug("NVIDIA H200") == "nvidia-h200"
    assert gpu_check.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gpu_check.slug("cpu Intel(R) Xeon(R) CPU @ 2.20GHz") == "cpu-intel-r-xeon-r-cpu-2-20ghz"
    assert gpu_check.slug("  ") == "unknown"


def test_check_parses_junit(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    out = gpu_check.parse_junit(path)
    assert out["counts"] == {"passed": 2, "failed": 2, "errors": 2, "skipped": 1, "total": 7}
    assert out["timed_out_tests"] == ["tests.test_x::test_slow"]  # no such file: the class name stays as is
    assert out["crashed_tests"] == ["tests.test_x::test_crash"]
    kinds = {f["test"]: f["kind"] for f in out["failures"]}
    assert kinds == {"tests.test_x::test_fail": "failed", "tests.test_x::test_slow": "timeout",
                     "tests.test_x::test_crash": "crashed", "tests.test_x::test_setup": "error"}
    assert out["slowest"][0] == {"test": "tests.test_x::test_slow", "seconds": 120.0}
    # a class name that is a file of the repository becomes a pytest node id
    assert {s["test"] for s in out["slowest"]} >= {"tests/test_gpu_scripts.py::test_ok",
                                                   "tests/test_gpu_scripts.py::TestThing::test_case[a-1]"}


def test_check_parses_a_progress_log_cut_short(tmp_path):
    events = [{"event": "start", "nodeid": "a.py::ok"},
              *({"event": "report", "nodeid": "a.py::ok", "when": w, "outcome": "passed"} for w in
                ("setup", "call", "teardown")),
              {"event": "start", "nodeid": "a.py::bad"},
              {"event": "report", "nodeid": "a.py::bad", "when": "call", "outcome": "failed",
               "message": "Failed: Timeout >5s"},
              {"event": "start", "nodeid": "a.py::gone"},
              {"event": "report", "nodeid": "a.py::gone", "when": "???", "outcome": "failed",
               "message": "worker 'gw0' crashed while running 'a.py::gone'"},
              {"event": "start", "nodeid": "a.py::skip"},
              {"event": "report", "nodeid": "a.py::skip", "when": "setup", "outcome": "skipped"},
              {"event": "start", "nodeid": "a.py::running"}]
    log = tmp_path / "progress.jsonl"
    log.write_text("\n".join(json.dumps(e) for e in events) + "\n{not json\n")
    out = gpu_check.parse_progress(log)
    assert out["counts"] == {"passed": 1, "failed": 2, "errors": 0, "skipped": 1, "total": 4}
    assert out["unfinished_tests"] == ["a.py::running"]
    assert out["timed_out_tests"] == ["a.py::bad"] and out["crashed_tests"] == ["a.py::gone"]
    summary = gpu_check.summarize_tests(tmp_path / "missing.xml", log)
    assert summary["source"].startswith("progress log") and summary["unfinished_tests"] == ["a.py::running"]


def test_check_test_command_degrades_without_plugins(tmp_path, monkeypatch):
    monkeypatch.setenv("S2HK_CHECK_TIMEOUT", "5")  # as inside a check's own test run: not passed on
    none = {"pytest": True, "xdist": False, "pytest_timeout": False, "pytest_benchmark": False}
    cmd, env, chosen = gpu_check.test_command({"plugins": none}, tmp_path / "j.xml", 90, 16)
    assert "-n" not in cmd and "--benchmark-disable" not in cmd and not any(c.startswith("--timeout") for c in cmd)
    assert chosen["paths"] == ["tests"] and chosen["workers"] == 1 and "pytest-benchmark" in chosen["bench_note"]
    assert env["S2HK_CHECK_TIMEOUT"] == "90" and "bench.gpu_check" in env["PYTEST_PLUGINS"]
    assert f"--junitxml={tmp_path / 'j.xml'}" in cmd and "faulthandler_timeout=100" in cmd
    every = dict.fromkeys(none, True)
    cmd, env, chosen = gpu_check.test_command({"plugins": every}, tmp_path / "j.xml", 90, 16)
    assert cmd[cmd.index("-n") + 1] == "16" and "--timeout=90" in cmd and "--benchmark-disable" in cmd
    assert chosen["paths"] == ["tests", "bench"] and "S2HK_CHECK_TIMEOUT" not in env


def test_check_runs_tests_with_its_timeout_plugin(tmp_path):
    """The fallback per-test timeout fails a slow test and the run goes on; counts come from the junit XML."""
    (tmp_path / "test_synthetic.py").write_text(
        "import time, pytest\n"
        "def test_pass(): pass\n"
        "def test_fail(): assert 1 == 2\n"
        "@pytest.mark.skip(reason='x')\n"
        "def test_skip(): pass\n"
        "def test_slow(): time.sleep(30)\n"
        "def test_after(): pass\n")
    info = {"plugins": {"pytest": True, "xdist": False, "pytest_timeout": False, "pytest_benchmark": False}}
    out = gpu_check.run_tests(info, 120, tmp_path, 1.0, 1, [str(tmp_path / "test_synthetic.py")])
    assert out["source"] == "junit" and out["status"] == "failed" and out["seconds"] < 25
    assert out["counts"] == {"passed": 2, "failed": 2, "errors": 0, "skipped": 1, "total": 5}
    assert out["timed_out_tests"] == ["test_synthetic::test_slow"]
    progress = gpu_check.parse_progress(tmp_path / "progress.jsonl")
    assert progress["counts"] == out["counts"] and progress["timed_out_tests"] == ["test_synthetic.py::test_slow"]


def test_check_table():
    record = {"date_utc": "2026-01-01T00:00:00Z", "deadline_s": 480, "elapsed_s": 300,
              "probe": {"device": "NVIDIA H200", "capability": "9.0", "torch": "2.11.0+cu130", "triton": "3.6.0",
                        "python": "3.12.3"},
              "steps": {"build": {"status": "ok", "seconds": 21, "rc": 0, "extension_loads": True,
                                  "extension_with_cuda": True, "env": {"TORCH_CUDA_ARCH_LIST": "9.0"}},
                        "tests": {"status": "failed", "seconds": 250, "workers": 16, "timeout_mechanism": "pytest-timeout",
                                  "counts": {"passed": 10, "failed": 1, "errors": 0, "skipped": 2, "total": 13},
                                  "failures": [{"test": "tests/test_a.py::test_b", "kind": "failed",
                                                "message": "assert 0"}],
                                  "crashed_tests": [], "timed_out_tests": [], "unfinished_tests": ["tests/test_c.py::t"]},
                        "e2e": {"status": "partial", "seconds": 170, "result": {
                            "bf16_peak": {"tflops": 800.0}, "settings": {"precision": "bf16 autocast"},
                            "skipped": [{"model": "resnet56", "image_size": 32, "reason": "deadline: 3 s left"}],
                            "errors": [],
                            "results": [{"model": "resnet50", "image_size": 32, "batch_size": 256,
                                         "hard_flops_ratio": 0.35, "dense_step_s": 0.025, "floor_s": 0.05,
                                         "s2hk_step_s": 0.06, "s2hk_over_floor": 1.2, "pinned_target_over_floor": 1.15,
                                         "unpinned": {"mean_s": 0.5}, "unpinned_mean_over_pinned_mean": 8.3,
                                         "naive_step_s": 0.2, "s2hk_images_per_s": 4266.0, "s2hk_tflops": 55.0,
                                         "s2hk_percent_of_peak": 6.9, "launches": {"s2hk": {"kernels": 4691}}}]}}}}
    text = gpu_check.table(record)
    assert text.startswith("gpu-check 2026-01-01T00:00:00Z: NVIDIA H200 (sm_90), torch 2.11.0+cu130")
    lines = text.splitlines()
    assert any(ln.startswith("build") and "CUDA ops: yes" in ln for ln in lines)
    assert any(ln.startswith("tests") and "10 passed, 1 failed" in ln and "1 unfinished" in ln for ln in lines)
    assert any(ln.startswith("resnet50") and "4691" in ln and "1.20" in ln and "1.15" in ln for ln in lines)
    assert any("skipped resnet56 32px" in ln for ln in lines)
    assert any("tests/test_a.py::test_b: assert 0" in ln for ln in lines)
    assert any("still running at the end: tests/test_c.py::t" in ln for ln in lines)


def test_check_dry_run_writes_one_json_and_prints_the_table(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--skip-e2e", "--results-dir",
                           str(tmp_path / "results")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = (tmp_path / "results").glob("gpu-check-*.json")
    record = json.loads(path.read_text())
    assert path.name == f"gpu-check-{record['probe']['device_slug']}.json"
    assert {k: v["status"] for k, v in record["steps"].items()} == \
        {"build": "skipped", "tests": "skipped", "e2e": "skipped"}
    assert record["ok"] and record["probe"]["torch"] and "plugins" in record["probe"]
    assert (tmp_path / "out" / path.name).exists()
    assert proc.stdout.rstrip().splitlines()[-1].startswith("e2e")  # the table comes last
