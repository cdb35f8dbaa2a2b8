"""Every kernel specialisation compiles ahead of time for sm_90 (H100) on a machine without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole GPU pipeline down to
ptxas, which catches what the interpreter lets through (layouts, shared-memory budgets, register spills).
It must run in a process where TRITON_INTERPRET is unset (the interpreter decides at decoration time), so
this file re-runs itself as a worker: two workers, each compiling half of the variants the kernel files
list in ``aot_variants()``. Checks, per variant:
  * GEMM kernels use the sm_90 tensor-core instruction (``wgmma.mma_async``),
  * shared memory <= 227 KiB (the H100 per-block limit),
  * no local memory: ptxas reports 0 bytes of spill stores/loads and the PTX has no ld/st.local.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from typing import Dict, List

import pytest

pytest.importorskip("triton")

H100_SHARED_BYTES = 227 * 1024
MODULES = ("dual_linear", "dual_conv", "bn_gate_act")
WORKERS = 2


def _variants():
    import importlib

    return [v for m in MODULES for v in importlib.import_module(f"s2hk.kernels.{m}").aot_variants()]


def _compile(worker: int, workers: int) -> None:
    """Worker: compile every ``workers``-th variant, print one JSON line per variant."""
    import triton
    from triton.backends.compiler import GPUTarget

    for variant in _variants()[worker::workers]:
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
            kernel = triton.compile(variant.source(), target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})
        ptx = kernel.asm["ptx"]
        spills = [int(a) + int(b) for a, b in
                  re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())]
        registers = [int(r) for r in re.findall(r"Used (\d+) registers", log.getvalue())]
        print(json.dumps(dict(
            name=variant.name, uses_dot=variant.uses_dot, shared=kernel.metadata.shared,
            wgmma="wgmma.mma_async" in ptx, mma_sync="mma.sync" in ptx,
            ptx_local=bool(re.search(r"\b(ld|st)\.local\b", ptx)),
            spill_bytes=sum(spills) if spills else None, registers=max(registers) if registers else None)),
            flush=True)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> List[Dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))  # fresh: ptxas runs and logs
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(i), str(WORKERS)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(WORKERS)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=280)
        assert proc.returncode == 0, f"AOT compile worker failed:\n{err[-4000:]}"
        results += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return results


def test_every_variant_compiles_for_sm90(compiled):
    expected = {v.name for v in _variants()}
    assert expected and {r["name"] for r in compiled} == expected
    print("\n" + "\n".join(f"{r['name']:64s} shared={r['shared']:7d} B  regs={r['registers']}"
                           f"  wgmma={r['wgmma']}" for r in compiled))


def test_gemm_kernels_use_wgmma(compiled):
    gemms = [r for r in compiled if r["uses_dot"]]
    assert gemms, "no GEMM kernel among the AOT variants"
    missing = [r["name"] for r in gemms if not r["wgmma"]]
    assert not missing, f"no wgmma.mma_async in the PTX of {missing}"


def test_shared_memory_fits_h100(compiled):
    over = {r["name"]: r["shared"] for r in compiled if r["shared"] > H100_SHARED_BYTES}
    assert not over, f"shared memory above {H100_SHARED_BYTES} bytes: {over}"


def test_no_local_memory_spills(compiled):
    unknown = [r["name"] for r in compiled if r["spill_bytes"] is None]
    assert not unknown, f"no ptxas -v report for {unknown}"
    spilled = {r["name"]: r["spill_bytes"] for r in compiled if r["spill_bytes"] or r["ptx_local"]}
    assert not spilled, f"local memory (spills) in {spilled}"


if __name__ == "__main__":
    _compile(int(sys.argv[1]), int(sys.argv[2]))
