"""Check a GPU machine in one call, within one deadline, and record what it saw.

    bash bench/gpu_check.sh                   # = python3 bench/gpu_check.py; 8 minutes in all
    python3 bench/gpu_check.py --deadline-s 600 --test-timeout 180
    python3 bench/gpu_check.py --dry-run      # probe and e2e only (no build, no tests)

In order, each step given what is left of the deadline:

1. probe: the device (torch.cuda), torch / triton / CUDA / cuDNN versions, nvcc and the driver;
2. build: the extension for the device it runs on
   (``TORCH_CUDA_ARCH_LIST=<the device's capability> MAX_JOBS=<cores> python -m pip install --no-deps
   --no-build-isolation --no-index -e .``), its time, and whether ``s2hk._C`` then loads with its CUDA ops;
3. tests: ``pytest tests bench --benchmark-disable`` (``bench`` only where pytest-benchmark is installed), in
   parallel with pytest-xdist where installed (else serially), each test under a time limit (pytest-timeout
   where installed, else this module's own pytest plugin, below) and ``faulthandler_timeout`` (10 s later)
   for the stacks of a test hung in native code. Counts, failures, crashed workers and timed-out tests are read from ``--junitxml``; if the
   run is cut short, from the plugin's progress log instead, which also names the tests still running then;
4. e2e: ``bench/gpu_e2e.py`` with the time left (``--deadline-s``); on a machine without CUDA, its CPU smoke
   size instead.

It writes ONE JSON, ``bench/results/gpu-check-<device>.json`` (for example gpu-check-nvidia-h200.json),
rewritten after every step, copies it with the step logs (pytest output, junit XML, build and e2e output)
to ``$OUT`` when that variable is set, and prints a short table last. Exit status 0 when the build, every
test and the e2e run succeeded, 1 otherwise.

Only the standard library (and, in the child processes, torch and pytest); Python >= 3.10.

The same module is the pytest plugin of the test step (``PYTEST_PLUGINS=bench.gpu_check``): with ``S2HK_CHECK_TIMEOUT``
set, each test in the process that runs it (the xdist worker, or the only process) fails with
"Timeout >N s" when it runs longer (SIGALRM), and an xdist worker stuck in native code past N + 30 s exits,
which xdist reports as a crashed test and replaces; with ``S2HK_CHECK_LOG`` set, the controlling process
appends one JSON line per test start and per report to that file.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CPU_SMOKE_E2E = ["--device", "cpu", "--model", "resnet56", "--sizes", "32", "--batch-sizes", "4", "--repeats", "1"]
TIMEOUT_RE = re.compile(r"Timeout \(?>\s*\d")  # this plugin's "Timeout >120s", pytest-timeout's "Timeout (>120s)"
CRASH_RE = re.compile(r"crashed while running|worker .* crashed|node down")


# ================================================================================================ helpers
def slug(text: str) -> str:
    """A file-name part: lower case, runs of anything but letters and digits become one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


class Interrupted(Exception):
    """SIGTERM / SIGINT: stop, record what was seen."""


def _on_signal(signum, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def run(cmd: list[str], timeout: float, log: Path, env: Optional[dict] = None) -> dict:
    """Run ``cmd`` from the repository root in its own process group, output to ``log``; on timeout (or when
    this script is interrupted) the group gets SIGTERM, then SIGKILL 10 s later. Returns rc, seconds,
    timed_out and the output's tail."""
    start = time.monotonic()
    timed_out = interrupted = False
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
        except Interrupted:
            interrupted = True
        if proc.poll() is None:
            _stop_group(proc)
    text = log.read_text(errors="replace")
    res = {"command": " ".join(cmd), "rc": proc.returncode, "seconds": round(time.monotonic() - start, 2),
           "timed_out": timed_out, "output_tail": tail(text)}
    if interrupted:
        raise Interrupted(json.dumps(res))
    return res


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ================================================================================================ probe
PROBE = r"""
import json, platform
out = {"python": platform.python_version()}
try:
    import torch
    out.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(device_name=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                   capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1))
except Exception as err:
    out["torch_error"] = f"{type(err).__name__}: {err}"
try:
    from importlib import metadata
    out["triton"] = metadata.version("triton")
except Exception:
    out["triton"] = None
print(json.dumps(out))
"""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe(timeout: float = 120) -> dict:
    """The device and versions, from a child process (this one never initialises CUDA)."""
    try:
        proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=timeout,
                              cwd=ROOT)
        info = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
        if proc.returncode:
            info["probe_error"] = tail(proc.stderr, 2000)
    except (subprocess.TimeoutExpired, ValueError, IndexError) as err:
        info = {"probe_error": f"{type(err).__name__}: {err}"}
    info.setdefault("cuda_available", False)
    info["cpu"] = cpu_model()
    info["cores"] = os.cpu_count()
    info["platform"] = platform.platform()
    info["host"] = platform.node()
    info["nvcc"] = _output_line(["nvcc", "--version"], "release")
    info["driver"] = _output_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    info["plugins"] = {m: has_module(m) for m in ("pytest", "xdist", "pytest_timeout", "pytest_benchmark")}
    if info.get("cuda_available"):
        info["device"] = info["device_name"]
    else:
        info["device"] = f"CPU {info['cpu']}"
    info["device_slug"] = slug(info["device_name"]) if info.get("cuda_available") else slug(f"cpu {info['cpu']}")
    return info


def _output_line(cmd: list[str], containing: str = "") -> Optional[str]:
    """The first non-empty line of ``cmd``'s output containing ``containing``; None if it cannot run."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip() and containing in ln]
    return lines[0] if lines else None


# ================================================================================================ build
CHECK_EXTENSION = r"""
import json
try:
    import s2hk._C as c
    print(json.dumps({"extension_loads": True, "extension_with_cuda": bool(getattr(c, "WITH_CUDA", 0)),
                      "extension_file": c.__file__}))
except Exception as err:
    print(json.dumps({"extension_loads": False, "extension_error": f"{type(err).__name__}: {err}"}))
"""


def build(info: dict, timeout: float, logs: Path) -> dict:
    """The editable install that builds s2hk._C for this device, then whether the extension loads."""
    env = dict(os.environ)
    if info.get("capability"):
        env["TORCH_CUDA_ARCH_LIST"] = info["capability"]
    env["MAX_JOBS"] = str(os.cpu_count() or 1)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."]
    res = run(cmd, timeout, logs / "build.log", env)
    res["env"] = {k: env[k] for k in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS") if k in env}
    text = (logs / "build.log").read_text(errors="replace")
    res["extension_build_failed"] = "s2hk: building" in text or "was not built" in text
    try:
        proc = subprocess.run([sys.executable, "-c", CHECK_EXTENSION], capture_output=True, text=True, timeout=120,
                              cwd=ROOT)
        res.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    except (subprocess.TimeoutExpired, ValueError, IndexError) as err:
        res.update(extension_loads=False, extension_error=f"{type(err).__name__}: {err}")
    ok = res["rc"] == 0 and not res["timed_out"] and res.get("extension_loads")
    if info.get("cuda_available"):
        ok = ok and res.get("extension_with_cuda")
    res["status"] = "timeout" if res["timed_out"] else ("ok" if ok else "failed")
    return res


# ================================================================================================ tests
def test_command(info: dict, junit: Path, per_test: float, workers: Optional[int],
                 paths: Optional[list[str]] = None) -> tuple[list[str], dict, dict]:
    """The pytest command line, its environment and what was chosen (paths, parallelism, timeout mechanism).
    ``paths`` default: tests and bench (bench only where pytest-benchmark is installed)."""
    plugins = info["plugins"]
    default = paths is None
    if default:
        paths = ["tests"] + (["bench"] if plugins.get("pytest_benchmark") else [])
    # test ids (and so the failure names recorded) are relative to the root dir: fix it rather than let pytest
    # derive it from wherever the paths and the working directory happen to meet
    full = [os.path.abspath(os.path.join(ROOT, p)) for p in paths]
    inside = all(os.path.commonpath([str(ROOT), f]) == str(ROOT) for f in full)
    rootdir = str(ROOT) if inside else os.path.commonpath([f if os.path.isdir(f) else os.path.dirname(f)
                                                           for f in full])
    cmd = [sys.executable, "-m", "pytest", *paths, "-q", "-rfE", "-p", "no:cacheprovider", f"--rootdir={rootdir}",
           f"--junitxml={junit}",
           # stacks of a test hung in native code, which no alarm interrupts; later than the timeout itself,
           # since faulthandler reading the stack while the alarm unwinds it can crash the interpreter
           "-o", f"faulthandler_timeout={round(per_test) + 10}"]
    if "bench" in paths and plugins.get("pytest_benchmark"):
        cmd.append("--benchmark-disable")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    for name in ("S2HK_IMPL", "S2HK_CHECK_TIMEOUT", "S2HK_CHECK_LOG"):  # nothing from a check this one runs in
        env.pop(name, None)
    # this module as a plugin of every pytest process, the xdist workers included (they inherit the environment)
    env["PYTEST_PLUGINS"] = ",".join([p for p in env.get("PYTEST_PLUGINS", "").split(",") if p] + ["bench.gpu_check"])
    chosen = {"paths": paths, "timeout_per_test_s": per_test,
              "bench_note": None if "bench" in paths or not default else
              "bench/ not run: pytest-benchmark is not installed"}
    if plugins.get("pytest_timeout"):
        cmd.append(f"--timeout={per_test}")
        chosen["timeout_mechanism"] = "pytest-timeout"
    else:
        env["S2HK_CHECK_TIMEOUT"] = str(per_test)
        chosen["timeout_mechanism"] = "bench/gpu_check.py plugin (SIGALRM; xdist workers stuck past +30 s exit)"
    n = workers if workers is not None else min(os.cpu_count() or 1, 16)
    if plugins.get("xdist") and n > 1:
        cmd += ["-n", str(n)]
        chosen["workers"] = n
    else:
        chosen["workers"] = 1
        if n > 1:
            chosen["parallel_note"] = "pytest-xdist is not installed: serial run"
    return cmd, env, chosen


def run_tests(info: dict, timeout: float, logs: Path, per_test: float, workers: Optional[int],
              paths: Optional[list[str]] = None) -> dict:
    if not info["plugins"].get("pytest"):
        return {"status": "skipped", "reason": "pytest is not installed"}
    junit, progress = logs / "junit.xml", logs / "progress.jsonl"
    for f in (junit, progress):
        f.unlink(missing_ok=True)
    cmd, env, chosen = test_command(info, junit, per_test, workers, paths)
    env["S2HK_CHECK_LOG"] = str(progress)
    res = {**chosen, **run(cmd, timeout, logs / "pytest.log", env)}
    res.update(summarize_tests(junit, progress))
    counts = res["counts"]
    if res["timed_out"]:
        res["status"] = "timeout"
    elif res["rc"] == 0:
        res["status"] = "ok"
    elif counts.get("total") or counts.get("failed") or counts.get("errors"):
        res["status"] = "failed"
    else:
        res["status"] = "error"  # pytest itself failed (usage, collection before any test)
    return res


def _nodeid(classname: str, name: str) -> str:
    """tests.test_x.TestY + test_z[a] -> tests/test_x.py::TestY::test_z[a] (the longest prefix that is a file)."""
    parts = classname.split(".") if classname else []
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i]) + ".py"
        if (ROOT / path).exists():
            return "::".join([path, *parts[i:], name])
    return "::".join([*([classname] if classname else []), name])


def _failure(nodeid: str, kind: str, short: str, text: str, crashed: list, timed_out: list) -> dict:
    """One failed test; ``kind`` becomes "crashed" (its xdist worker died) or "timeout" where the text says so,
    and the test is added to ``crashed`` / ``timed_out``."""
    kind = "failed" if kind == "failed" else "error"
    if CRASH_RE.search(text):
        kind = "crashed"
        crashed.append(nodeid)
    elif TIMEOUT_RE.search(text):
        kind = "timeout"
        timed_out.append(nodeid)
    return {"test": nodeid, "kind": kind, "message": short[:500]}


def parse_junit(path: Path) -> dict:
    """Counts and names from a pytest junit XML file: passed / failed / errors / skipped, and among the failed
    the crashed (an xdist worker died) and the timed-out tests; the ten slowest tests."""
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures: list[dict] = []
    crashed: list[str] = []
    timed_out: list[str] = []
    durations: list[tuple[float, str]] = []
    for case in root.iter("testcase"):
        nodeid = _nodeid(case.get("classname", ""), case.get("name", ""))
        try:
            durations.append((float(case.get("time", 0) or 0), nodeid))
        except ValueError:
            pass
        failure, error, skipped = case.find("failure"), case.find("error"), case.find("skipped")
        bad = failure if failure is not None else error
        if bad is not None:
            message = (bad.get("message") or "") + "\n" + (bad.text or "")
            kind = "failed" if failure is not None else "errors"
            counts[kind] += 1
            short = bad.get("message") or ((bad.text or "").strip().splitlines() or [""])[-1]
            failures.append(_failure(nodeid, kind, short, message, crashed, timed_out))
        elif skipped is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    counts["total"] = sum(counts.values())
    durations.sort(reverse=True)
    return {"counts": counts, "failures": failures, "crashed_tests": crashed, "timed_out_tests": timed_out,
            "slowest": [{"test": t, "seconds": round(s, 2)} for s, t in durations[:10]]}


def parse_progress(path: Path) -> dict:
    """Counts and names from the plugin's progress log (a run cut short leaves no junit XML): each test's
    outcome from its reports, and the tests that started without a final report (running when it ended)."""
    started: dict[str, None] = {}
    reports: dict[str, list[dict]] = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "start":
            started.setdefault(event["nodeid"], None)
        elif event.get("event") == "report":
            reports.setdefault(event["nodeid"], []).append(event)
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, crashed, timed_out, unfinished = [], [], [], []
    for nodeid in {**started, **dict.fromkeys(reports)}:
        evs = reports.get(nodeid, [])
        whens = {e["when"] for e in evs}
        failed = [e for e in evs if e["outcome"] == "failed"]
        if failed:
            e = failed[0]
            kind = "failed" if e["when"] in ("call", "???") else "errors"
            counts[kind] += 1
            failures.append(_failure(nodeid, kind, e.get("message", ""), e.get("message", ""), crashed, timed_out))
        elif any(e["outcome"] == "skipped" for e in evs):
            counts["skipped"] += 1
        elif "teardown" in whens or "call" in whens:
            counts["passed"] += 1
        else:
            unfinished.append(nodeid)
    counts["total"] = sum(counts.values())
    return {"counts": counts, "failures": failures, "crashed_tests": crashed, "timed_out_tests": timed_out,
            "unfinished_tests": unfinished}


def summarize_tests(junit: Path, progress: Path) -> dict:
    if junit.exists():
        try:
            out = parse_junit(junit)
            out["source"] = "junit"
            return out
        except ET.ParseError as err:
            note = f"junit XML unreadable: {err}"
    else:
        note = "no junit XML (run cut short)"
    if progress.exists():
        out = parse_progress(progress)
        out["source"] = f"progress log; {note}"
        return out
    return {"counts": {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "total": 0}, "failures": [],
            "crashed_tests": [], "timed_out_tests": [], "source": f"none; {note}"}


# ================================================================================================ e2e
def run_e2e(info: dict, seconds: float, logs: Path, extra: list[str]) -> dict:
    """bench/gpu_e2e.py with ``--deadline-s`` a little under ``seconds`` (it stops starting workloads then)."""
    out_json = logs / "gpu_e2e.json"
    out_json.unlink(missing_ok=True)
    args = list(extra) if extra else ([] if info.get("cuda_available") else list(CPU_SMOKE_E2E))
    deadline = max(5.0, seconds - 30.0)
    cmd = [sys.executable, "bench/gpu_e2e.py", *args, "--deadline-s", f"{deadline:.0f}", "--json", str(out_json)]
    res = run(cmd, seconds, logs / "gpu_e2e.log")
    res["deadline_s"] = deadline
    result = None
    if out_json.exists():
        try:
            result = json.loads(out_json.read_text())
        except ValueError as err:
            res["json_error"] = str(err)
    res["result"] = result
    if res["timed_out"]:
        res["status"] = "timeout"
    elif res["rc"] == 0 and result is not None:
        res["status"] = "ok" if result.get("complete") else "partial"
    else:
        res["status"] = "failed"
    return res


# ================================================================================================ table
def _f(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def table(record: dict) -> str:
    """The short summary printed last: one line per step, one per e2e workload, the first failures."""
    info = record.get("probe", {})
    steps = record.get("steps", {})
    lines = [f"gpu-check {record.get('date_utc', '')}: {info.get('device', '?')}"
             f"{' (sm_' + info['capability'].replace('.', '') + ')' if info.get('capability') else ''}, "
             f"torch {info.get('torch', '?')}, triton {info.get('triton', '?')}, python {info.get('python', '?')}, "
             f"{_f(record.get('elapsed_s'), '.0f')} of {_f(record.get('deadline_s'), '.0f')} s"]
    rows = [("step", "status", "time s", "details")]
    for name in ("build", "tests", "e2e"):
        s = steps.get(name)
        if s is None:
            continue
        detail = s.get("reason", "")
        if name == "build" and "rc" in s:
            detail = (f"s2hk._C loads: {_yes(s.get('extension_loads'))}, CUDA ops: {_yes(s.get('extension_with_cuda'))}"
                      f", arch {s.get('env', {}).get('TORCH_CUDA_ARCH_LIST', '-')}")
        elif name == "tests" and "counts" in s:
            c = s["counts"]
            detail = (f"{c.get('passed', 0)} passed, {c.get('failed', 0)} failed, {c.get('errors', 0)} errors, "
                      f"{c.get('skipped', 0)} skipped; {len(s.get('crashed_tests', []))} crashed, "
                      f"{len(s.get('timed_out_tests', []))} timed out"
                      + (f", {len(s['unfinished_tests'])} unfinished" if s.get("unfinished_tests") else "")
                      + f"; {s.get('workers', 1)} workers, {s.get('timeout_mechanism', '?').split(' ')[0]}")
        elif name == "e2e" and "result" in s:
            r = s.get("result") or {}
            detail = (f"{len(r.get('results', []))} workloads, {len(r.get('skipped', []))} skipped, "
                      f"{len(r.get('errors', []))} errors")
        if s.get("error"):
            detail = s["error"][:160]
        rows.append((name, s.get("status", "?"), _f(s.get("seconds"), ".0f"), detail))
    lines += _columns(rows)
    e2e = (steps.get("e2e") or {}).get("result") or {}
    if e2e.get("results"):
        peak = (e2e.get("bf16_peak") or {}).get("tflops")
        lines.append("")
        lines.append(f"e2e ({e2e.get('settings', {}).get('precision', '?')}; bf16 peak {_f(peak, '.0f')} TFLOP/s; "
                     "ms are medians; unpinned: mean over its steps)")
        rows = [("model", "px", "batch", "r", "dense", "floor", "pinned", "/floor", "target", "unpinned", "/pinned",
                 "target", "2-pass", "img/s", "TFLOP/s", "%peak", "launches")]
        for res in e2e["results"]:
            u = res.get("unpinned", {})
            counts = res.get("launches", {}).get("s2hk") or {}
            kernels = counts.get("kernels", counts.get("op_calls"))  # CUDA kernels; operator calls on CPU
            rows.append((res["model"], res["image_size"], res["batch_size"], _f(res.get("hard_flops_ratio"), ".3f"),
                         _ms(res.get("dense_step_s")), _ms(res.get("floor_s")), _ms(res.get("s2hk_step_s")),
                         _f(res.get("s2hk_over_floor")), _f(res.get("pinned_target_over_floor")),
                         _ms(u.get("mean_s")), _f(res.get("unpinned_mean_over_pinned_mean")), "1.10",
                         _ms(res.get("naive_step_s")), _f(res.get("s2hk_images_per_s"), ".0f"),
                         _f(res.get("s2hk_tflops"), ".3g"), _f(res.get("s2hk_percent_of_peak"), ".1f"),
                         _f(kernels, "d")))
        lines += _columns(rows)
    for skipped in e2e.get("skipped", []):
        lines.append(f"e2e skipped {skipped['model']} {skipped['image_size']}px: {skipped['reason']}")
    for err in e2e.get("errors", []):
        lines.append(f"e2e error {err['model']} {err['image_size']}px: {err['error'][:200]}")
    tests = steps.get("tests") or {}
    bad = tests.get("failures", [])
    if bad:
        lines.append("")
        lines.append(f"failed tests ({len(bad)}; all in the JSON):")
        lines += [f"  {f['test']}: {' '.join(f['message'].split())[:160]}" for f in bad[:15]]
    for nodeid in (tests.get("unfinished_tests") or [])[:10]:
        lines.append(f"  still running at the end: {nodeid}")
    return "\n".join(lines)


def _yes(v: Any) -> str:
    return "-" if v is None else ("yes" if v else "no")


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.1f}"


def _columns(rows: list[tuple]) -> list[str]:
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(len(r) for r in rows))]
    return ["  ".join(c.ljust(widths[i]) if i == len(r) - 1 or i == 0 else c.rjust(widths[i])
                      for i, c in enumerate(r)).rstrip() for r in rows]


# ================================================================================================ main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deadline-s", type=float, default=480.0, help="seconds for everything (default 480)")
    parser.add_argument("--e2e-s", type=float, default=180.0,
                        help="seconds kept for the e2e benchmark; the tests get the rest (default 180)")
    parser.add_argument("--test-timeout", type=float, default=120.0, help="seconds per test (default 120)")
    parser.add_argument("--workers", type=int, default=None, help="pytest-xdist workers (default: cores, <= 16)")
    parser.add_argument("--test-paths", nargs="+", default=None,
                        help="what pytest runs (default: tests, and bench where pytest-benchmark is installed)")
    parser.add_argument("--dry-run", action="store_true", help="no build and no tests: probe, e2e, JSON, table")
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--e2e-args", default="", help="arguments for bench/gpu_e2e.py, as one string (default: "
                        "its defaults on CUDA, its CPU smoke size without CUDA)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON goes (bench/results)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.deadline_s

    def left() -> float:
        return deadline - time.monotonic()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    logs = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    record: dict = {"script": "bench/gpu_check.py", "date_utc": utc_now(), "argv": sys.argv[1:] if argv is None
                    else list(argv), "deadline_s": args.deadline_s, "logs_dir": str(logs), "steps": {}}
    out_path: Optional[Path] = None

    def save() -> None:
        record["elapsed_s"] = round(time.monotonic() - start, 1)
        if out_path is not None:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = out_path.with_name(out_path.name + ".tmp")
            tmp.write_text(json.dumps(record, indent=1, default=str))
            tmp.replace(out_path)

    try:
        info = record["probe"] = probe(timeout=min(120.0, max(10.0, left())))
        out_path = args.results_dir / f"gpu-check-{info['device_slug']}.json"
        print(f"probe: {info['device']}, torch {info.get('torch')}, triton {info.get('triton')}, "
              f"plugins {', '.join(k for k, v in info['plugins'].items() if v) or 'none'}", flush=True)
        save()
        if args.dry_run or args.skip_build:
            record["steps"]["build"] = {"status": "skipped", "reason": "--dry-run" if args.dry_run else "--skip-build"}
        else:
            budget = min(300.0, left() - (0 if args.skip_e2e else args.e2e_s) - 60.0)
            record["steps"]["build"] = guarded(build, info, max(30.0, budget), logs) if budget > 0 else {
                "status": "skipped", "reason": f"deadline ({left():.0f} s left)"}
            print(f"build: {record['steps']['build']['status']} "
                  f"({_f(record['steps']['build'].get('seconds'), '.0f')} s)", flush=True)
        save()
        if args.dry_run or args.skip_tests:
            record["steps"]["tests"] = {"status": "skipped", "reason": "--dry-run" if args.dry_run else "--skip-tests"}
        else:
            budget = left() - (0 if args.skip_e2e else args.e2e_s) - 10.0
            if budget > 30:
                record["steps"]["tests"] = guarded(run_tests, info, budget, logs, args.test_timeout, args.workers,
                                                   args.test_paths)
            else:
                record["steps"]["tests"] = {"status": "skipped", "reason": f"deadline ({left():.0f} s left)"}
            t = record["steps"]["tests"]
            print(f"tests: {t['status']} {t.get('counts', '')} ({_f(t.get('seconds'), '.0f')} s)", flush=True)
        save()
        if args.skip_e2e:
            record["steps"]["e2e"] = {"status": "skipped", "reason": "--skip-e2e"}
        elif left() > 40:
            record["steps"]["e2e"] = guarded(run_e2e, info, left() - 10.0, logs, args.e2e_args.split())
            print(f"e2e: {record['steps']['e2e']['status']} ({_f(record['steps']['e2e'].get('seconds'), '.0f')} s)",
                  flush=True)
        else:
            record["steps"]["e2e"] = {"status": "skipped", "reason": f"deadline ({left():.0f} s left)"}
    except Interrupted as why:
        record["interrupted"] = str(why)[:2000]
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        save()
    statuses = [s.get("status") for s in record["steps"].values()]
    record["ok"] = bool(statuses) and all(s in ("ok", "skipped") for s in statuses) and "interrupted" not in record
    save()
    copied = copy_out(out_path, logs)
    if out_path is not None:
        print(f"wrote {out_path}" + (f" (and {len(copied)} files to $OUT)" if copied else ""))
    print(table(record), flush=True)
    return 0 if record["ok"] else 1


def guarded(fn, *args) -> dict:
    """``fn(*args)``; an unexpected exception becomes the step's record (status "error") instead of ending the
    check before its JSON and table."""
    try:
        return fn(*args)
    except Interrupted:
        raise
    except Exception as err:
        import traceback

        return {"status": "error", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}


def copy_out(out_path: Optional[Path], logs: Path) -> list[str]:
    """The JSON and the step logs to $OUT, if set."""
    dest = os.environ.get("OUT")
    if not dest:
        return []
    dest_dir = Path(dest)
    dest_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    files = [out_path] if out_path is not None and out_path.exists() else []
    files += [p for p in sorted(logs.iterdir()) if p.is_file()]
    for f in files:
        name = f.name if f == out_path else f"gpu-check-{f.name}"
        try:
            shutil.copyfile(f, dest_dir / name)
            copied.append(name)
        except OSError:
            pass
    return copied


# ================================================================================================ pytest plugin
# Loaded through PYTEST_PLUGINS=bench.gpu_check by the test step; its hooks act only when their environment
# variables are set.
_plugin: dict[str, Any] = {"runs_tests": False, "logs": False, "deadline": None, "timeout": None}


def pytest_configure(config) -> None:
    is_worker = hasattr(config, "workerinput")
    distributed = bool(getattr(config.option, "numprocesses", None)) and not is_worker
    timeout = os.environ.get("S2HK_CHECK_TIMEOUT")
    _plugin["runs_tests"] = not distributed
    _plugin["logs"] = not is_worker and bool(os.environ.get("S2HK_CHECK_LOG"))
    if timeout and not distributed and hasattr(signal, "SIGALRM"):
        _plugin["timeout"] = float(timeout)
        if is_worker:  # native hangs: leave, so that xdist reports the test as crashed and replaces the worker
            threading.Thread(target=_watchdog, name="s2hk-test-watchdog", daemon=True).start()


def _watchdog() -> None:
    import faulthandler

    while True:
        time.sleep(1.0)
        deadline = _plugin["deadline"]
        if deadline is not None and time.monotonic() > deadline + 30.0:
            sys.stderr.write(f"\ntest still running {_plugin['timeout'] + 30:.0f} s after it started: exiting\n")
            faulthandler.dump_traceback(all_threads=True)
            sys.stderr.flush()
            os._exit(70)


def _alarm(signum, frame) -> None:
    import pytest

    pytest.fail(f"Timeout >{_plugin['timeout']:g}s", pytrace=True)


def _log(event: dict) -> None:
    with open(os.environ["S2HK_CHECK_LOG"], "a") as f:
        f.write(json.dumps(event) + "\n")


def pytest_runtest_logstart(nodeid, location) -> None:
    if _plugin["runs_tests"] and _plugin["timeout"]:
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, _plugin["timeout"])
        _plugin["deadline"] = time.monotonic() + _plugin["timeout"]
    if _plugin["logs"]:
        _log({"event": "start", "nodeid": nodeid, "t": time.time()})


def pytest_runtest_logfinish(nodeid, location) -> None:
    if _plugin["runs_tests"] and _plugin["timeout"]:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _plugin["deadline"] = None


def pytest_runtest_logreport(report) -> None:
    if not _plugin["logs"]:
        return
    message = ""
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = getattr(crash, "message", None) or str(report.longrepr).strip().splitlines()[-1:] or [""]
        message = message if isinstance(message, str) else message[0]
    _log({"event": "report", "nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
          "message": message[:500], "duration": getattr(report, "duration", None)})


if __name__ == "__main__":
    sys.exit(main())
