"""bench/kernels_gpu.py, the kernel benchmark (a script: ``python bench/kernels_gpu.py`` on the GPU writes
bench/results/kernels-<device>.json): its smallest sizes once each -- the compiled kernels on a GPU, else CPU
tensors under Triton's interpreter -- writing the JSON that s2hk.dispatch reads; and its verdict rule."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from s2hk import dispatch

import kernels_gpu  # noqa: E402  (bench/ is on sys.path: pytest puts a test file's folder there)
from kernels_gpu import Case  # noqa: E402

SCRIPT = Path(kernels_gpu.__file__)


def test_smoke_run_writes_what_dispatch_reads(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "kernels-smoke.json"
    env = {k: v for k, v in os.environ.items() if k != "S2HK_IMPL"}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json", str(out)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["smoke"] and record["copy_bandwidth_gbps"] > 0
    assert {c["op"] for c in record["cases"]} == set(kernels_gpu.OPS)
    for case in record["cases"]:
        assert "error" not in case, case["error"]
        for mode in ("forward", "full"):
            assert case["ms"][mode]["triton"] > 0 and case["ms"][mode]["torch"] > 0, case
    assert any("compiled" in c["ms"]["full"] for c in record["cases"])  # the torch.compile baseline ran
    assert all(c["percent_of_copy_bandwidth"]["full"] > 0 for c in record["cases"] if c["op"] == "bn_gate_act")
    assert record["bn_sweep"] and all(r["ms"]["full"] > 0 for r in record["bn_sweep"])
    assert set(record["verdicts"]) == set(kernels_gpu.OPS)
    wins = dispatch.load_triton_wins(tmp_path)
    assert sorted(wins) == record["wins"] and all(devices == (record["device"],) for devices in wins.values())


def _measured(case: Case, forward: float, full: float, error: bool = False) -> dict:
    record = {**asdict(case), "speedup": {"forward": {"vs_torch": forward}, "full": {"vs_torch": full}}}
    return {**record, "error": "out of memory"} if error else record


def test_verdict_needs_every_deciding_case_at_least_as_fast():
    hard, soft = Case("bn_gate_act", "hard", (1,)), Case("bn_gate_act", "soft", (1,))
    fused = Case("bn_gate_act", "fused", (1,), decides=False)
    stem = Case("dual_conv", "stem", (1,))
    planned = [hard, soft, fused, stem]
    records = [_measured(hard, 1.2, 1.1), _measured(soft, 1.0, 1.3), _measured(fused, 0.5, 0.5),
               _measured(stem, 1.5, 0.99)]
    verdict = kernels_gpu.verdicts(planned, records)
    assert verdict["bn_gate_act"]["win"] and verdict["bn_gate_act"]["worst_speedup"] == 1.0  # fused: reported only
    assert not verdict["dual_conv"]["win"]  # slower in full mode
    assert "dual_linear" not in verdict  # not planned: no verdict, no win
    assert not kernels_gpu.verdicts(planned, records[:1] + records[2:])["bn_gate_act"]["win"]  # soft not measured
    failed = [records[0], _measured(soft, 2.0, 2.0, error=True), records[2]]
    assert not kernels_gpu.verdicts(planned, failed)["bn_gate_act"]["win"]


def test_plan_decides_on_what_the_engine_runs():
    cases = kernels_gpu.plan(smoke=False)
    deciding = {(c.op, c.variant, c.layout) for c in cases if c.decides}
    assert ("bn_gate_act", "hard", "channels_last") in deciding and ("bn_gate_act", "soft", "channels_last") in deciding
    assert not any(v == "fused" or layout == "nchw" for op, v, layout in deciding if op == "bn_gate_act")
    assert {c.op for c in cases if c.decides} == set(kernels_gpu.OPS)
    assert not any(c.decides for c in cases if c.compiled)  # repeats of deciding cases, for torch.compile
    assert {c.variant for c in cases if c.compiled} == {"hard", "soft", "fused"}
    first_informative = next(i for i, c in enumerate(cases) if not c.decides)
    assert all(not c.decides for c in cases[first_informative:])  # a run cut short still decides


def test_a_run_cut_short_by_its_deadline_decides_nothing(tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # what main() would set, undone after the test
    out = tmp_path / "kernels-cut.json"
    assert kernels_gpu.main(["--smoke", "--json", str(out), "--deadline-s", "0", "--ops", "dual_linear"]) == 0
    record = json.loads(out.read_text())
    assert record["cases"] == [] and record["skipped_for_deadline"] == 1 and record["wins"] == []
    assert record["verdicts"]["dual_linear"]["measured"] == 0 and not record["verdicts"]["dual_linear"]["win"]
