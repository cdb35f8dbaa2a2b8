"""Plots of a training run: accuracy gap, FLOPs against target, channels kept per layer.

:func:`render_report` reads ``metrics.jsonl`` (see :mod:`s2hk.metrics`) and, when present,
``architecture.json`` and ``config.json`` from a run folder and writes PNG files (:data:`PLOT_FILES`):

- ``accuracy.png``: the accuracy per epoch of the method's two networks and the gap between them -- S2HPruner's
  soft (relaxed masks) and hard (pruned) network and their "discretization gap", CR-SFP's / SFP's R-NN and
  P-NN, STP's full network and subnet (:func:`network_names`; the method is ``config.json``'s, else told by
  the records' keys);
- ``flops.png``: the pruned network's FLOPs ratio over training, against the target (and its tolerance band
  when the records carry ``flops_tolerance``, in the same ratio units) where the run has one;
- ``channels.png``: kept vs original output channels per layer.

A plot whose data is absent is skipped. Figures are drawn on the Agg canvas directly, never through
``pyplot``, so rendering works headless and leaves the caller's matplotlib state untouched.

Command line: ``python -m s2hk.report RUN_FOLDER [OUT_FOLDER]``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .atomic import atomic_write
from .metrics import METRICS_FILE, read_metrics

__all__ = ["ReportError", "render_report", "network_names", "ARCHITECTURE_FILE", "ARCHITECTURE_FORMAT",
           "PLOT_FILES"]

PLOT_FILES = ("accuracy.png", "flops.png", "channels.png")
ARCHITECTURE_FILE = "architecture.json"
ARCHITECTURE_FORMAT = "s2hk-architecture"
_ARCHITECTURE_VERSION = 1
_DPI = 120


class ReportError(RuntimeError):
    """A run folder cannot be reported on (no metrics, or an unreadable architecture file)."""


# The two networks whose accuracies a method's evaluate() returns as soft_acc / hard_acc: short name, legend.
_NETWORKS = {
    "s2h": (("soft", "soft network (relaxed masks)"), ("hard", "hard network (pruned)")),
    "crsfp": (("R-NN", "R-NN (full width)"), ("P-NN", "P-NN (pruned)")),
    "stp": (("full", "full network"), ("subnet", "subnet (best found, exported)")),
}
_NETWORKS["sfp"] = _NETWORKS["crsfp"]


def network_names(method: str | None) -> tuple[tuple[str, str], tuple[str, str]]:
    """``((short, long), (short, long))`` names of the networks a method reports as ``soft_acc`` and ``hard_acc``:
    S2HPruner's soft / hard network, CR-SFP's and SFP's R-NN / P-NN, STP's full network / subnet (unknown
    methods: soft / hard)."""
    return _NETWORKS.get(method or "", _NETWORKS["s2h"])


def _method_of(run: Path, records: list[dict]) -> str | None:
    """The run's method: ``config.json``'s ``method``, else told by the evaluation keys (``rnn_acc``: CR-SFP,
    ``dense_acc``: STP), else None."""
    try:
        method = json.loads((run / "config.json").read_text(encoding="utf-8")).get("method")
    except (OSError, ValueError, AttributeError):
        method = None
    if isinstance(method, str):
        return method
    keys = set().union(*(r.keys() for r in records if r.get("kind") == "epoch"))
    return "crsfp" if "rnn_acc" in keys else "stp" if "dense_acc" in keys else None


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None for anything missing, non-numeric or non-finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _save(fig: Figure, path: Path) -> Path:
    # Write then rename, so a viewer refreshing during training never sees a half-written PNG.
    FigureCanvasAgg(fig)
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=_DPI))


def _capitalized(text: str) -> str:
    """``text`` with its first letter upper-case (a title starting with a network's name)."""
    return text[:1].upper() + text[1:]


def _integer_axis(ax: Any, xs: list[float]) -> None:
    """Whole-number ticks for epochs and steps, even on a run of one or two points."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if xs and max(xs) - min(xs) < 2:  # otherwise the locator falls back to fractional ticks
        ax.set_xlim(min(xs) - 1, max(xs) + 1)


# ------------------------------------------------------------------------------------------ accuracy

def _accuracy_rows(records: list[dict]) -> tuple[list[dict], str]:
    """Per-epoch rows carrying an accuracy; per-step rows if the run logged no epoch accuracy."""
    for kind, axis in (("epoch", "epoch"), ("step", "step")):
        rows = [r for r in records if r.get("kind") == kind
                and any(_number(r.get(k)) is not None for k in ("soft_acc", "hard_acc", "gap"))]
        if rows:
            return rows, axis
    return [], "epoch"


def _plot_accuracy(records: list[dict], path: Path, method: str | None) -> Path | None:
    rows, axis = _accuracy_rows(records)
    if not rows:
        return None
    xs = [_number(r.get(axis)) if _number(r.get(axis)) is not None else float(i) for i, r in enumerate(rows)]
    soft = [_number(r.get("soft_acc")) for r in rows]
    hard = [_number(r.get("hard_acc")) for r in rows]
    gap = [s - h if s is not None and h is not None else _number(r.get("gap"))
           for s, h, r in zip(soft, hard, rows)]

    # Accuracies may be logged as fractions or as percentages; show percent either way.
    accs = [v for v in soft + hard if v is not None] or [abs(v) for v in gap if v is not None]
    scale = 100.0 if accs and max(abs(v) for v in accs) <= 1.0 else 1.0

    def scaled(values: list[float | None]) -> list[float]:
        return [v * scale if v is not None else math.nan for v in values]

    soft_s, hard_s, gap_s = scaled(soft), scaled(hard), scaled(gap)
    fig = Figure(figsize=(8, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    marker = "o" if len(rows) <= 60 else None
    (a_short, a_long), (b_short, b_long) = network_names(method)
    gap_name = "discretization gap" if method in (None, "s2h") else "gap"
    if any(v is not None for v in soft):
        top.plot(xs, soft_s, marker=marker, markersize=3, label=a_long)
    if any(v is not None for v in hard):
        top.plot(xs, hard_s, marker=marker, markersize=3, label=b_long)
    both = [s is not None and h is not None for s, h in zip(soft, hard)]
    if any(both):
        top.fill_between(xs, hard_s, soft_s, where=both, interpolate=True, alpha=0.25, color="tab:red",
                         label=f"{gap_name} ({a_short} − {b_short})")
    top.set_ylabel("accuracy (%)")
    top.set_title(_capitalized(f"{a_short} vs {b_short} accuracy and the {gap_name}"))
    top.grid(True, alpha=0.3)
    if top.lines or top.collections:
        top.legend(loc="best")

    if any(v is not None for v in gap):
        bottom.plot(xs, gap_s, color="tab:red", marker=marker, markersize=3, label="gap")
    bottom.axhline(0.0, color="black", linewidth=0.8)
    bottom.set_ylabel("gap (pp)")
    bottom.set_xlabel(axis)
    _integer_axis(bottom, xs)
    bottom.grid(True, alpha=0.3)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------ FLOPs

def _plot_flops(records: list[dict], path: Path, method: str | None) -> Path | None:
    rows, axis = [], "step"
    for kind, axis in (("step", "step"), ("epoch", "epoch")):
        rows = [r for r in records if r.get("kind") == kind and _number(r.get("hard_flops_ratio")) is not None]
        if rows:
            break
    if not rows:
        return None
    xs = [_number(r.get(axis)) if _number(r.get(axis)) is not None else float(i) for i, r in enumerate(rows)]
    ratio = [_number(r["hard_flops_ratio"]) for r in rows]

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    pruned = network_names(method)[1][0]
    ax.plot(xs, ratio, linewidth=1.2, marker="o" if len(rows) <= 60 else None, markersize=3,
            label=f"{pruned} FLOPs ratio", zorder=3)

    targets = [_number(r.get("target_flops")) for r in rows]
    tolerances = [_number(r.get("flops_tolerance")) for r in rows]
    if not any(t is not None for t in targets):
        # The target may be logged once (e.g. in a config or epoch record) rather than on every row.
        targets = [next((_number(r.get("target_flops")) for r in records
                         if _number(r.get("target_flops")) is not None), None)] * len(rows)
    if not any(t is not None for t in tolerances):
        tolerances = [next((_number(r.get("flops_tolerance")) for r in records
                            if _number(r.get("flops_tolerance")) is not None), None)] * len(rows)
    known = sorted({t for t in targets if t is not None})
    if len(known) == 1:
        target = known[0]
        ax.axhline(target, color="tab:green", linestyle="--", label=f"target {target:.3g}")
        tols = sorted({t for t in tolerances if t is not None})
        if tols:
            tol = tols[-1]
            ax.axhspan(target - tol, target + tol, color="tab:green", alpha=0.15,
                       label=f"tolerance ±{tol:.3g}")
    elif known:
        # A scheduled target: draw it as it changed.
        t_line = [t if t is not None else math.nan for t in targets]
        ax.plot(xs, t_line, color="tab:green", linestyle="--", drawstyle="steps-post", label="target")
        if any(t is not None for t in tolerances):
            lo = [t - d if t is not None and d is not None else math.nan for t, d in zip(targets, tolerances)]
            hi = [t + d if t is not None and d is not None else math.nan for t, d in zip(targets, tolerances)]
            ax.fill_between(xs, lo, hi, step="post", color="tab:green", alpha=0.15, label="tolerance")
    ax.set_title(_capitalized(f"{pruned} FLOPs ratio" + (" against the target" if known else "")))
    ax.set_xlabel(axis)
    _integer_axis(ax, xs)
    ax.set_ylabel("FLOPs ratio (pruned / dense)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, path)


# ------------------------------------------------------------------------------------------ channels

def _read_architecture(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        arch = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ReportError(f"cannot read architecture file {str(path)!r}: {e}") from e
    if not isinstance(arch, dict) or arch.get("format") != ARCHITECTURE_FORMAT:
        raise ReportError(f"{str(path)!r} is not an {ARCHITECTURE_FORMAT} file (format marker missing)")
    version = arch.get("version")
    if not isinstance(version, int) or version > _ARCHITECTURE_VERSION:
        raise ReportError(f"{str(path)!r} has architecture format version {version!r}; "
                          f"this s2hk reads up to {_ARCHITECTURE_VERSION}")
    if not isinstance(arch.get("layers"), dict):
        raise ReportError(f"{str(path)!r} has no 'layers' mapping")
    return arch


def _channel_rows(arch: dict) -> list[tuple[str, int, int]]:
    rows = []
    for name, layer in arch["layers"].items():
        if not isinstance(layer, dict):
            continue
        kept, dense = layer.get("out_channels"), layer.get("dense_out_channels")
        if layer.get("removed") is True:  # the layer of a skipped residual block: nothing kept
            kept = 0
        if isinstance(kept, int) and isinstance(dense, int) and dense > 0:
            rows.append((str(name), kept, dense, str(layer.get("type", ""))))
    # Normalization layers repeat the width of the layer feeding them; showing them would double every bar.
    producers = [r for r in rows if "Norm" not in r[3]]
    return [r[:3] for r in (producers or rows)]


def _plot_channels(arch: dict, path: Path) -> Path | None:
    rows = _channel_rows(arch)
    if not rows:
        return None
    names = [r[0] for r in rows]
    kept = [r[1] for r in rows]
    dense = [r[2] for r in rows]
    n = len(rows)
    # Height grows with the layer count so ~60 names stay legible (about 0.2 inch per bar).
    fig = Figure(figsize=(9, max(3.5, 0.2 * n + 1.6)), layout="constrained")
    ax = fig.subplots()
    ys = list(range(n))
    ax.barh(ys, dense, color="lightgray", edgecolor="gray", linewidth=0.5, label="original")
    ax.barh(ys, kept, height=0.6, color="tab:blue", label="kept")
    label_size = 8 if n <= 30 else 6.5
    for y, k, d in zip(ys, kept, dense):
        ax.text(d, y, f" {k}/{d}" if k else " block skipped", va="center", ha="left", fontsize=label_size - 1)
    ax.set_yticks(ys, names, fontsize=label_size)
    ax.set_ylim(n - 0.5, -0.5)  # first layer on top, in model order
    ax.set_xlim(0, max(dense) * 1.15)  # room for the k/d labels
    total_kept, total_dense = sum(kept), sum(dense)
    ax.set_title(f"Output channels kept per layer: {total_kept}/{total_dense} "
                 f"({100.0 * total_kept / total_dense:.1f}%)", loc="left")
    ax.set_xlabel("output channels")
    ax.grid(True, axis="x", alpha=0.3)
    # Above the axes, beside the title: inside them it would cover bars, whatever their lengths.
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2, frameon=False, borderaxespad=0.2)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------ entry point

def render_report(run_folder: os.PathLike | str, out_folder: os.PathLike | str | None = None) -> list[Path]:
    """Write ``accuracy.png``, ``flops.png`` and ``channels.png`` for ``run_folder``; return the written paths.

    Output goes to ``out_folder`` (default: the run folder). A plot whose data is missing is skipped. The
    networks are named by the run's method (:func:`network_names`).
    Raises :class:`ReportError` when the run folder has no metrics records, or when ``architecture.json``
    exists but is not a readable s2hk architecture file.
    """
    run = Path(run_folder)
    metrics_path = run / METRICS_FILE
    if not metrics_path.is_file():
        raise ReportError(f"run folder {str(run)!r} has no metrics ({METRICS_FILE} not found)")
    records = read_metrics(run)
    if not records:
        raise ReportError(f"run folder {str(run)!r} has no metrics ({METRICS_FILE} has no records)")
    arch = _read_architecture(run / ARCHITECTURE_FILE)

    out = Path(out_folder) if out_folder is not None else run
    out.mkdir(parents=True, exist_ok=True)
    method = _method_of(run, records)
    accuracy, flops, channels = (out / name for name in PLOT_FILES)
    written = [
        _plot_accuracy(records, accuracy, method),
        _plot_flops(records, flops, method),
        _plot_channels(arch, channels) if arch is not None else None,
    ]
    return [p for p in written if p is not None]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: render the report and print the written paths."""
    parser = argparse.ArgumentParser(prog="python -m s2hk.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_folder", help="folder holding metrics.jsonl (and optionally architecture.json)")
    parser.add_argument("out_folder", nargs="?", default=None, help="where to write the PNGs (default: run folder)")
    args = parser.parse_args(argv)
    try:
        paths = render_report(args.run_folder, args.out_folder)
    except ReportError as e:
        parser.exit(1, f"error: {e}\n")
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
