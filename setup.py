"""Build script: the Python package, the Triton kernels (shipped as ``s2hk.kernels``) and the optional
C++/CUDA extension ``s2hk._C``.

Install with ``pip install -e . --no-build-isolation`` on top of an installed torch. The extension is
optional: if torch's C++ toolchain is unusable here the build prints why and the package installs as pure
Python (every op has a PyTorch reference; ``s2hk.dispatch`` says once what is missing).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extension_modules():
    """The s2hk._C extension: csrc/cpu/*.cpp always, csrc/cuda/*.cu when torch has CUDA and nvcc exists."""
    if os.environ.get("S2HK_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch  # noqa: F401  (needed only to build the extension)
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("s2hk: torch is not importable at build time; installing without the s2hk._C extension",
              file=sys.stderr)
        return [], {}
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not cpu_sources:
        return [], {}
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    import torch

    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and shutil.which("nvcc") is not None
    extra = {"cxx": ["-O3"]}  # torch picks the C++ standard its headers need
    if use_cuda:
        extra["nvcc"] = ["-O3", "-std=c++17"]
        ext = CUDAExtension("s2hk._C", cpu_sources + cuda_sources, extra_compile_args=extra,
                            define_macros=[("S2HK_WITH_CUDA", "1")])
    else:
        ext = CppExtension("s2hk._C", cpu_sources, extra_compile_args=extra)

    class OptionalBuildExtension(BuildExtension):
        """Builds s2hk._C, but a failed build leaves a working pure-Python install instead of no install."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # compiler missing or broken: report once, keep installing
                print(f"s2hk: the C++ extension s2hk._C was not built ({err}); "
                      "the PyTorch reference implementations will be used", file=sys.stderr)

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as err:
                print(f"s2hk: building {extension.name} failed ({err}); "
                      "the PyTorch reference implementations will be used", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extension_modules()
TRITON = 'triton; sys_platform == "linux"'

setup(
    name="s2hk",
    version="0.1.0",
    description="Prune neural networks while they train (S2HPruner, CR-SFP, STP), with fused GPU kernels",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["s2hk", "s2hk.models", "s2hk.data", "s2hk.kernels"],
    # The Triton kernels live in the top-level kernels/ folder and are imported as s2hk.kernels.
    package_dir={"s2hk": "s2hk", "s2hk.kernels": "kernels"},
    package_data={"s2hk.data": ["*.npz"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # torch itself is not listed: it must be installed first (pip install torch==<version>), so that no
    # dependency resolution ever replaces it with another build.
    install_requires=["numpy", "tqdm", "pyyaml", "matplotlib", "pillow"],
    # Triton (~290 MB) is never a requirement of the package itself: plain `pip install -e .` stays small. The
    # dev extra pulls it for the kernel tests (they run in Triton's interpreter on CPU-only machines); Triton
    # ships Linux wheels only, so elsewhere those tests are skipped instead of the install failing.
    extras_require={
        "triton": [TRITON],
        "onnx": ["onnx", "onnxscript"],
        "dev": ["pytest", "pytest-benchmark", TRITON, "onnx", "onnxscript"],
    },
    entry_points={"console_scripts": ["s2hk = s2hk.cli:main"]},
)
