"""Test configuration shared by every tier.

Triton runs on the CPU only through its interpreter, which must be selected before triton is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """Test tensors are tiny: one intra-op thread is faster, and far faster when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def clean_env(monkeypatch):
    """No S2HK_IMPL from the caller's environment: each test chooses its implementation itself."""
    monkeypatch.delenv("S2HK_IMPL", raising=False)


@pytest.fixture(scope="module")
def full_float32():
    """No TF32 convolutions or matmuls on a GPU, so comparisons can use float32 tolerances."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
