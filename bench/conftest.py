"""Shared fixtures of the benchmark suites: sizes, cached workloads, interleaved timing, machine description.

Two modes, chosen by pytest-benchmark's own flag:

- ``pytest bench/ --benchmark-disable`` (CI smoke test): every benchmark body runs once at small sizes
  (batch 4, 16x16 images) on one intra-op thread, so that the whole directory stays well under three minutes
  on two cores even when they are shared (two OpenMP threads on a loaded two-core machine wait at every
  parallel region for a descheduled thread: tiny ops then cost milliseconds each);
- ``pytest bench/ --benchmark-json=bench/results/NAME.json`` (measurement): batch 64, 32x32, several rounds,
  torch's default thread count unless ``--bench-threads N`` says otherwise. Measure on a quiet machine.

``--bench-keep-freed-memory`` (glibc): by default malloc hands the top of the heap back to the OS once more
than a few MiB are free, so a step whose peak exceeds what the other calls use page-faults that memory in
again every step; the option keeps it (``mallopt``). The minor page faults of every timed call are recorded
in ``extra_info["minor_page_faults"]`` (medians per call, 4 KiB pages).

Timing: the benchmarked call is timed by pytest-benchmark (``benchmark.pedantic``); the calls it is compared
with run in the ``setup`` of every round, so that all of them see the same load on a shared machine (see
:func:`s2hk.benchmarking.time_interleaved`), and their medians go into ``benchmark.extra_info``.

The results file carries :func:`s2hk.benchmarking.machine_description` under ``machine_info["s2hk"]`` and the
1-minute load average when the session started and ended.
"""
from __future__ import annotations

import copy
import ctypes
import ctypes.util
import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytest
import torch

from s2hk import S2HPruner
from s2hk.benchmarking import (dense_step, input_grad_backward, machine_description, narrow_step, s2hk_step,
                               time_once)
from s2hk.baselines import uniform_l1_widths
from s2hk.models import get_model

MODELS = ("resnet56", "mobilenet_v3_small")
TARGETS = (0.15, 0.35, 0.55)
NUM_CLASSES = 10
_LOAD_AT_START = pytest.StashKey[float]()
_KEEP_FREED = pytest.StashKey[bool]()


def pytest_generate_tests(metafunc):
    """Every benchmark taking ``model_name`` / ``target`` runs for both models at the three FLOPs targets."""
    if "model_name" in metafunc.fixturenames:
        metafunc.parametrize("model_name", MODELS)
    if "target" in metafunc.fixturenames:
        metafunc.parametrize("target", TARGETS, ids=[f"T{int(round(100 * t))}" for t in TARGETS])


# ------------------------------------------------------------------------------------------ options
def pytest_addoption(parser):
    parser.addoption("--bench-threads", type=int, default=None,
                     help="torch intra-op threads for the s2hk benchmarks (default: 1 with --benchmark-disable, "
                          "else torch's default)")
    parser.addoption("--bench-keep-freed-memory", action="store_true", default=False,
                     help="glibc only: stop malloc from returning freed memory to the OS (mallopt M_TRIM_THRESHOLD "
                          "2 GiB, M_MMAP_THRESHOLD 32 MiB), so that a step's peak is not page-faulted in again at "
                          "every step")


def _keep_freed_memory() -> bool:
    """glibc's mallopt: keep up to 2 GiB of freed heap, serve blocks up to 32 MiB from the heap."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(-3, 32 * 2 ** 20)) and bool(libc.mallopt(-1, 2 ** 31 - 1))  # MMAP, TRIM
    except (OSError, AttributeError):
        return False


def pytest_configure(config):
    if config.getoption("bench_keep_freed_memory", False):
        config.stash[_KEEP_FREED] = _keep_freed_memory()


# ------------------------------------------------------------------------------------------ results file
def pytest_sessionstart(session):
    session.config.stash[_LOAD_AT_START] = os.getloadavg()[0]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["s2hk"] = machine_description()
    machine_info["loadavg_1min_at_start"] = config.stash.get(_LOAD_AT_START, None)
    machine_info["malloc_keeps_freed_memory"] = config.stash.get(_KEEP_FREED, False)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["machine_info"]["loadavg_1min_at_end"] = os.getloadavg()[0]


# ------------------------------------------------------------------------------------------ sizes
@dataclass(frozen=True)
class Sizes:
    smoke: bool
    batch: int
    image: int
    rounds: int
    warmup: int

    def rounds_for(self, seconds: float) -> int:
        """More rounds for fast calls (about five seconds per benchmark), at least ``self.rounds``."""
        if self.smoke:
            return 1
        return max(self.rounds, min(200, int(5.0 / max(seconds, 1e-4))))


@pytest.fixture(scope="session")
def sizes(request) -> Sizes:
    smoke = bool(request.config.getoption("benchmark_disable"))
    threads = request.config.getoption("bench_threads") or (1 if smoke else None)
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    if smoke:
        yield Sizes(smoke=True, batch=4, image=16, rounds=1, warmup=0)
    else:
        yield Sizes(smoke=False, batch=64, image=32, rounds=7, warmup=2)
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def _seed_and_load(request):
    torch.manual_seed(0)
    if "benchmark" in request.fixturenames:
        benchmark = request.getfixturevalue("benchmark")
        benchmark.extra_info["loadavg_1min"] = round(os.getloadavg()[0], 2)
        benchmark.extra_info["threads"] = torch.get_num_threads()
    yield


# ------------------------------------------------------------------------------------------ workloads
@dataclass
class Workload:
    """One model at one FLOPs target: the dense model, the S2HPruner (hard widths pinned by uniform scaling),
    the exported narrow model and, on demand, the two-pass baseline -- all from the same initial weights."""

    model_name: str
    target: float
    x: torch.Tensor
    y: torch.Tensor
    dense: torch.nn.Module
    pruner: S2HPruner
    widths: dict
    hard_flops_ratio: float
    narrow: torch.nn.Module
    _naive: Any = None
    _opts: dict = field(default_factory=dict)

    def _opt(self, key: str, params) -> torch.optim.Optimizer:
        if key not in self._opts:
            self._opts[key] = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        return self._opts[key]

    def dense_step(self) -> Callable[[], None]:
        return dense_step(self.dense, self.x, self.y, self._opt("dense", self.dense.parameters()))

    def narrow_step(self) -> Callable[[], None]:
        return narrow_step(self.narrow, self.x, self.y, self._opt("narrow", self.narrow.parameters()))

    def input_grad_backward(self) -> Callable[[], float]:
        return input_grad_backward(self.dense, self.x)

    def s2hk_step(self) -> Callable[[], None]:
        return s2hk_step(self.pruner, self.x, self.y, self._opt("s2hk", self.pruner.weight_parameters()))

    @property
    def naive(self):
        if self._naive is None:
            from naive_two_pass import NaiveS2HPruner

            model = get_model(self.model_name, num_classes=NUM_CLASSES).to(self.x.device)
            model.load_state_dict(self.dense.state_dict())
            self._naive = NaiveS2HPruner(model.train(), self.x[:1], target_flops=self.target)
            self._naive.set_hard_widths(self.widths)
        return self._naive

    def naive_step(self) -> Callable[[], None]:
        naive = self.naive
        opt = self._opt("naive", naive.weight_parameters())

        def step() -> None:
            naive.train_step(self.x, self.y, opt)
        return step


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def workload(sizes, device) -> Callable[[str, float], Workload]:
    """``workload(model_name, target)``: built once per session (tracing and export are not free)."""
    cache: dict = {}

    def make(model_name: str, target: float) -> Workload:
        key = (model_name, target)
        if key not in cache:
            torch.manual_seed(0)
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(sizes.batch, 3, sizes.image, sizes.image, generator=gen).to(device)
            y = torch.randint(0, NUM_CLASSES, (sizes.batch,), generator=gen).to(device)
            model = get_model(model_name, num_classes=NUM_CLASSES).to(device).train()
            dense = copy.deepcopy(model)
            pruner = S2HPruner(model, x[:1], target_flops=target).train()
            widths = uniform_l1_widths(pruner, target)
            pruner.set_hard_widths(widths)
            ratio = pruner.flops("hard") / pruner.flops("full")
            cache[key] = Workload(model_name, target, x, y, dense, pruner, widths, ratio, pruner.export().train())
        return cache[key]
    return make


# ------------------------------------------------------------------------------------------ timing
@pytest.fixture
def interleaved(benchmark, sizes) -> Callable[..., dict[str, float]]:
    """``interleaved(target, others, rounds=None)``: benchmark ``target`` with pytest-benchmark while timing
    each of ``others`` (a dict of callables) once per round in the round's untimed setup; returns the median
    seconds of all of them (``target``'s under ``"target"``). A callable returning a float reports its own
    time. With ``--benchmark-disable``: one call of each, times still returned."""

    def run(target: Callable[[], Any], others: dict[str, Callable[[], Any]],
            rounds: Optional[int] = None) -> dict[str, float]:
        n = 1 if sizes.smoke else (rounds or sizes.rounds)
        warmup = 0 if sizes.smoke else sizes.warmup
        samples: dict[str, list[float]] = {name: [] for name in others}
        samples["target"] = []
        faults: dict[str, list[int]] = {name: [] for name in samples}

        def once(name: str, fn: Callable[[], Any]) -> None:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            samples[name].append(time_once(fn))
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

        def setup() -> None:
            for name, fn in others.items():
                once(name, fn)

        benchmark.pedantic(lambda: once("target", target), setup=setup, rounds=n, warmup_rounds=warmup,
                           iterations=1)
        benchmark.extra_info["minor_page_faults"] = {name: statistics.median(v[-n:]) for name, v in faults.items()}
        return {name: statistics.median(v[-n:]) for name, v in samples.items()}
    return run


@pytest.fixture
def rounds_for(sizes) -> Callable[[Callable[[], Any]], int]:
    """``rounds_for(fn)``: a round count giving about five seconds of ``fn`` (after one warm-up call)."""

    def count(fn: Callable[[], Any]) -> int:
        if sizes.smoke:
            return 1
        fn()
        start = time.perf_counter()
        time_once(fn)
        return sizes.rounds_for(time.perf_counter() - start)
    return count
