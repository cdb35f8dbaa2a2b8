"""The install's requirements: plain ``pip install -e .`` never pulls Triton; the dev extra pulls it only where
Triton has wheels (Linux), so a dev install elsewhere succeeds and the kernel tests skip."""
from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import setuptools

SETUP = Path(__file__).resolve().parent.parent / "setup.py"


@pytest.fixture(scope="module")
def setup_kwargs() -> dict:
    """The keyword arguments setup.py passes to setuptools.setup (without building the extension)."""
    captured: dict = {}
    patch = pytest.MonkeyPatch()
    patch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    patch.setenv("S2HK_NO_EXTENSION", "1")
    try:
        runpy.run_path(str(SETUP), run_name="__main__")
    finally:
        patch.undo()
    return captured


def test_plain_install_has_no_triton(setup_kwargs):
    assert not [r for r in setup_kwargs["install_requires"] if "triton" in r.lower()]


@pytest.mark.parametrize("extra", ["dev", "triton"])
def test_triton_comes_with_a_linux_marker(setup_kwargs, extra):
    (triton,) = [r for r in setup_kwargs["extras_require"][extra] if r.lower().startswith("triton")]
    from packaging.requirements import Requirement

    marker = Requirement(triton).marker
    assert marker is not None
    assert marker.evaluate({"sys_platform": "linux"}) and not marker.evaluate({"sys_platform": "darwin"})
    assert not marker.evaluate({"sys_platform": "win32"})
