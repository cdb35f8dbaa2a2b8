"""s2hk.dispatch: S2HK_IMPL, in-process overrides, quiet fallback, clear errors, the once-only warning, and
the table of measured Triton wins read from the benchmark results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from s2hk import dispatch, ops
from s2hk.masks import GateLayout


@pytest.fixture
def no_extension(monkeypatch):
    """A process in which s2hk._C failed to load (fresh load state, import raising ImportError)."""

    def missing():
        raise ImportError("simulated: s2hk._C was not built")

    monkeypatch.setattr(dispatch, "_ext", dispatch._ExtensionState())
    monkeypatch.setattr(dispatch, "_import_extension", missing)
    monkeypatch.delenv("S2HK_IMPL", raising=False)


def test_default_is_auto(clean_env):
    assert dispatch.requested_impl() == "auto"


def test_env_var_and_use_impl(monkeypatch):
    monkeypatch.setenv("S2HK_IMPL", "reference")
    assert dispatch.requested_impl() == "reference"
    assert dispatch.choose("gates", "cpu", ("cpp",)) == "reference"
    with dispatch.use_impl("auto"):
        assert dispatch.requested_impl() == "auto"
        with dispatch.use_impl("cpp"):
            assert dispatch.requested_impl() == "cpp"
        assert dispatch.requested_impl() == "auto"
    assert dispatch.requested_impl() == "reference"


def test_invalid_values_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="S2HK_IMPL must be one of"):
        with dispatch.use_impl("fast"):
            pass
    monkeypatch.setenv("S2HK_IMPL", "cuda")
    with pytest.raises(ValueError, match="got 'cuda'"):
        dispatch.choose("gates", "cpu", ("cpp",))


@pytest.mark.skipif(dispatch.extension(warn=False) is None, reason="s2hk._C is not loaded")
def test_auto_prefers_the_extension_on_cpu(clean_env):
    assert dispatch.choose("gates", "cpu", ("cpp",)) == "cpp"
    assert dispatch.choose("group_importance", torch.device("cpu"), ("cpp",)) == "cpp"


def test_auto_never_picks_triton_for_cpu_tensors(clean_env):
    assert dispatch.choose("some_op", "cpu", ("triton",)) == "reference"


def test_naming_an_op_with_a_kind_it_lacks_raises(clean_env):
    with dispatch.use_impl("triton", ops=("gates",)):
        with pytest.raises(dispatch.ImplementationUnavailable, match="'gates' has no triton implementation"):
            dispatch.choose("gates", "cpu", ("cpp",))
    with dispatch.use_impl("cpp", ops=("bn_act",)):
        with pytest.raises(dispatch.ImplementationUnavailable, match="'bn_act' has no cpp implementation"):
            dispatch.choose("bn_act", "cpu", ("triton",))


def test_request_for_every_op_leaves_ops_without_that_kind_to_auto(clean_env, monkeypatch):
    with dispatch.use_impl("triton"):
        assert dispatch.choose("gates", "cpu", ("cpp",)) == "cpp"       # no Triton kernel: as auto
        assert dispatch.choose("other", "cpu", ()) == "reference"
    monkeypatch.setenv("S2HK_IMPL", "cpp")
    assert dispatch.choose("bn_act", "cpu", ("triton",)) == "reference"  # auto never runs Triton on CPU


def test_explicit_cpp_without_extension_raises(no_extension):
    with pytest.warns(RuntimeWarning):
        with dispatch.use_impl("cpp"):
            with pytest.raises(dispatch.ImplementationUnavailable) as err:
                dispatch.choose("gates", "cpu", ("cpp",))
    message = str(err.value)
    assert "'gates'" in message and "s2hk._C" in message and "simulated" in message
    assert "pip install -e . --no-build-isolation" in message


def test_explicit_cpp_raises_through_the_public_ops(no_extension):
    layout = GateLayout((4,), (2,))
    with pytest.warns(RuntimeWarning), dispatch.use_impl("cpp"):
        with pytest.raises(dispatch.ImplementationUnavailable, match="'gates'"):
            ops.gates(torch.zeros(2), torch.arange(4), layout)
        with pytest.raises(dispatch.ImplementationUnavailable, match="'decoupled_kd'"):
            ops.decoupled_kd(torch.zeros(2, 3), torch.zeros(2, 3))
        with pytest.raises(dispatch.ImplementationUnavailable, match="'group_importance'"):
            ops.group_importance([torch.ones(3, 2)], [0])


def test_auto_falls_back_to_the_reference_and_warns_once(no_extension):
    layout = GateLayout((1, 7, 96), (1, 7, 3))
    logits = torch.randn(sum(layout.num_choices))
    ranks = torch.cat([torch.randperm(c) for c in layout.channels])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dispatch.choose("gates", "cpu", ("cpp",)) == "reference"
        got = ops.gates(logits, ranks, layout)
        ops.decoupled_kd(torch.randn(2, 3), torch.randn(2, 3))
        assert dispatch.extension() is None
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "s2hk._C" in messages[0] and "simulated" in messages[0] and "pip install" in messages[0]
    want = ops.gates_reference(logits, ranks, layout)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_extension_without_warning_stays_silent(no_extension):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.extension(warn=False) is None
        with dispatch.use_impl("reference"):
            assert dispatch.choose("gates", "cpu", ("cpp",)) == "reference"


@pytest.mark.skipif(getattr(dispatch.extension(warn=False), "WITH_CUDA", True),
                    reason="needs an s2hk._C built without CUDA kernels")
def test_cpp_for_cuda_tensors_needs_the_cuda_kernels(clean_env):
    cuda = torch.device("cuda")
    assert dispatch.choose("gates", cuda, ("cpp",)) == "reference"  # auto: quietly the reference
    with dispatch.use_impl("cpp"), pytest.raises(dispatch.ImplementationUnavailable, match="without its CUDA kernels"):
        dispatch.choose("gates", cuda, ("cpp",))


def test_triton_request_names_what_is_missing(clean_env, monkeypatch):
    monkeypatch.setattr(dispatch.importlib.util, "find_spec", lambda name: None)
    with dispatch.use_impl("triton"):
        with pytest.raises(dispatch.ImplementationUnavailable, match="triton is not installed"):
            dispatch.choose("dual_conv", "cpu", ("triton",))


def test_import_without_extension_never_fails():
    """A fresh interpreter where s2hk._C cannot be imported: s2hk imports, ops run on the references."""
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["s2hk._C"] = None  # makes `import s2hk._C` raise ImportError
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            import s2hk, s2hk.ops, s2hk.dispatch
            import torch
            from s2hk.masks import GateLayout
            out = s2hk.ops.gates(torch.zeros(3), torch.arange(3), GateLayout((3,), (1,)))
            s2hk.ops.gates(torch.zeros(3), torch.arange(3), GateLayout((3,), (1,)))
        assert s2hk.dispatch.extension(warn=False) is None
        print(sum("s2hk._C" in str(w.message) for w in caught), out.hard_widths.tolist())
    """)
    env = {k: v for k, v in os.environ.items() if k != "S2HK_IMPL"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "1", result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------------------
# Measured Triton wins (bench/kernels_gpu.py's JSON, one file per GPU model)
# ----------------------------------------------------------------------------------------------------------
H200, A100 = "NVIDIA H200", "NVIDIA A100-SXM4-80GB"


def _write_results(directory) -> None:
    """Two GPU models' measurements, a broken file and a file the loader must not read."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, record in (("kernels-nvidia-h200.json", {"device": H200, "wins": ["bn_gate_act"], "cases": []}),
                         ("kernels-nvidia-a100.json", {"device": A100, "wins": ["bn_gate_act", "dual_linear"]}),
                         ("gpu-check-nvidia-h200.json", {"device": H200, "wins": ["dual_conv"]})):
        (directory / name).write_text(json.dumps(record))
    (directory / "kernels-broken.json").write_text("{not json")


def test_loader_reads_every_gpu_models_wins(tmp_path):
    _write_results(tmp_path)
    assert dispatch.load_triton_wins(tmp_path) == {"bn_gate_act": (A100, H200), "dual_linear": (A100,)}
    assert dispatch.load_triton_wins(tmp_path / "missing") == {}


def test_table_is_filled_at_import_from_the_results_directory(tmp_path):
    _write_results(tmp_path)
    script = "import s2hk.dispatch as d; print(sorted(d.TRITON_WINS.items()))"
    env = {**os.environ, "S2HK_KERNEL_RESULTS": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(sorted({"bn_gate_act": (A100, H200), "dual_linear": (A100,)}.items()))


def test_auto_takes_triton_only_on_a_gpu_model_measured_faster(tmp_path, monkeypatch, clean_env):
    from s2hk import kernels

    _write_results(tmp_path)
    monkeypatch.setattr(dispatch, "TRITON_WINS", dispatch.load_triton_wins(tmp_path))
    monkeypatch.setattr(dispatch, "_gpu_name", lambda index: H200)
    monkeypatch.setattr(kernels, "unavailable", lambda device: None)  # as if the kernels could run anywhere
    assert dispatch.choose("bn_gate_act", "cuda:0", ("triton",)) == "triton"
    assert dispatch.choose("dual_linear", "cuda:0", ("triton",)) == "reference"  # a win on another GPU only
    assert dispatch.choose("dual_conv", "cuda:0", ("triton",)) == "reference"    # never measured faster
    assert dispatch.choose("bn_gate_act", "cpu", ("triton",)) == "reference"     # never the CPU interpreter
    with dispatch.use_impl("triton"):  # an explicit request does not consult the table
        assert dispatch.choose("dual_conv", "cuda:0", ("triton",)) == "triton"
    monkeypatch.setattr(dispatch, "_gpu_name", lambda index: A100)
    assert dispatch.choose("dual_linear", "cuda:0", ("triton",)) == "triton"
    monkeypatch.setattr(kernels, "unavailable", lambda device: "CUDA is not available")
    assert dispatch.choose("dual_linear", "cuda:0", ("triton",)) == "reference"  # measured, cannot run: back
