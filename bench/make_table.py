"""Markdown tables (for the README) and a PNG chart from benchmark results in bench/results/.

    python bench/make_table.py                          # every bench/results/*.json
    python bench/make_table.py bench/results/cpu.json   # one file

For each ``NAME.json`` it writes ``NAME.md`` and ``NAME.png`` beside it and prints the markdown. Reads the
pytest-benchmark JSON of ``pytest bench/ --benchmark-json=...`` (numbers from each benchmark's
``extra_info``) and the JSON of ``bench/gpu_e2e.py --json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2 ** 20


def _table(header: list[str], rows: Iterable[list[Any]]) -> str:
    rows = [[_cell(v) for v in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _machine(data: dict) -> str:
    info = data.get("machine_info", {})
    m = info.get("s2hk") or data.get("machine") or {}
    parts = [m.get("cpu", info.get("cpu", {}).get("brand_raw", "?")), f"{m.get('cores', '?')} cores",
             f"torch {m.get('torch', '?')}"]
    if m.get("gpu"):
        parts.append(m["gpu"])
    text = ", ".join(str(p) for p in parts)
    threads = sorted({b["extra_info"]["threads"] for b in data.get("benchmarks", [])
                      if "threads" in b.get("extra_info", {})})
    if threads:
        text += f" ({'/'.join(map(str, threads))} intra-op thread{'s' if threads != [1] else ''})"
    if info.get("malloc_keeps_freed_memory"):
        text += "; malloc keeps freed memory (--bench-keep-freed-memory)"
    if info.get("loadavg_1min_at_start") is not None:
        text += f"; 1-min load average {info['loadavg_1min_at_start']:.2f} at start"
        if "loadavg_1min_at_end" in info:
            text += f", {info['loadavg_1min_at_end']:.2f} at end"
    if data.get("datetime"):
        text += f"; {data['datetime'][:16].replace('T', ' ')} UTC"
    return text


def _by_question(data: dict, question: str) -> list[dict]:
    out = []
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info", {}))
        if info.get("question") == question:
            stats = bench.get("stats") or {}
            info["_median"] = stats.get("median")
            info["_rounds"] = stats.get("rounds")
            out.append(info)
    return sorted(out, key=lambda i: (i.get("model", ""), i.get("target_flops", 0), i.get("batch_size", 0),
                                      i.get("op", "")))


def step_table(rows: list[dict]) -> str:
    size = f"batch {rows[0]['batch_size']}, {rows[0]['image_size']}x{rows[0]['image_size']}"
    return (f"**Training step** ({size}; times are medians of interleaved rounds; target: s2hk / floor <= 1.10)\n\n"
            + _table(["model", "target", "r", "dense step (ms)", "floor / dense", "s2hk / dense", "s2hk / floor",
                      "two-pass / dense", "speedup over two-pass", "FLOPs ideal / dense", "within 10% of floor",
                      "s2hk page faults per step (MiB)", "operator calls per step: extension / reference"],
                     [[i["model"], f"{100 * i['target_flops']:.0f}%", i["hard_flops_ratio"], 1e3 * i["dense_step_s"],
                       i["floor_over_dense"], i["s2hk_over_dense"], i["s2hk_over_floor"], i["naive_over_dense"],
                       i["speedup_over_naive"], i["flops_ideal_over_dense"], i["meets_target"],
                       _faults_mib(i, "target"),
                       f"{i.get('op_calls_step_cpp', '-')} / {i.get('op_calls_step_reference', '-')}"] for i in rows]))


def _faults_mib(info: dict, name: str) -> Optional[float]:
    """Minor page faults of one call, as MiB of 4 KiB pages."""
    faults = info.get("minor_page_faults", {}).get(name)
    return None if faults is None else faults * 4096 / MIB


def memory_table(rows: list[dict]) -> str:
    rows = [i for i in rows if "peak_s2hk_bytes" in i]
    if not rows:
        return ""
    return ("**Peak memory of one step** (tensor bytes above the step's start; target: s2hk <= 1.10 x "
            "(dense + narrow))\n\n"
            + _table(["model", "target", "dense (MiB)", "narrow (MiB)", "s2hk (MiB)", "s2hk / dense",
                      "s2hk / (dense + narrow)", "incl. resident state: s2hk / dense"],
                     [[i["model"], f"{100 * i['target_flops']:.0f}%", i["peak_dense_bytes"] / MIB,
                       i["peak_narrow_bytes"] / MIB, i["peak_s2hk_bytes"] / MIB, i["s2hk_over_dense"],
                       i["s2hk_over_memory_floor"], i["total_s2hk_over_dense"]] for i in rows]))


def inference_table(rows: list[dict]) -> str:
    return ("**Exported model inference** (eval, inference_mode; ideal: latency ratio = FLOPs ratio r)\n\n"
            + _table(["model", "target", "r", "batch", "dense (ms)", "exported (ms)", "latency ratio",
                      "latency ratio / r"],
                     [[i["model"], f"{100 * i['target_flops']:.0f}%", i["hard_flops_ratio"], i["batch_size"],
                       1e3 * i["dense_s"], 1e3 * i["exported_s"], i["latency_ratio"], i["latency_over_flops_ratio"]]
                      for i in rows]))


def ops_table(rows: list[dict]) -> str:
    def label(i: dict) -> str:
        return i["op"] + (f" {i['shape'][0]}x{i['shape'][1]}" if "shape" in i else "")

    return ("**Extension ops vs per-group PyTorch references** (CPU, resnet50's groups; operator calls from "
            "torch.profiler, outermost calls)\n\n"
            + _table(["op", "reference (ms)", "extension (ms)", "speedup", "CPU time: reference (ms)",
                      "CPU time: extension (ms)", "operator calls: reference", "operator calls: extension"],
                     [[label(i), 1e3 * i["reference_s"], 1e3 * i["cpp_s"], i["speedup"],
                       _ms(i.get("cpu_time_reference_s")), _ms(i.get("cpu_time_cpp_s")), i["op_calls_reference"],
                       i["op_calls_cpp"]] for i in rows]))


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else 1e3 * seconds


def gpu_table(data: dict) -> str:
    """The end-to-end table of bench/gpu_e2e.py (GPU or its CPU smoke mode, where no peak is measured)."""
    peak = (data.get("bf16_peak") or {}).get("tflops")
    where = f"measured bf16 matmul peak {peak:.0f} TFLOP/s" if peak else "no bf16 peak measured on this device"
    settings = data.get("settings") or {}
    precision = settings.get("precision", "bf16 autocast")
    return (f"**End to end on {data.get('device_name', 'the device')}** ({precision}; {where}; targets: s2hk pinned "
            "/ floor and unpinned / pinned as stated per row)\n\n"
            + _table(["model", "image", "batch", "r", "s2hk img/s", "s2hk TFLOP/s", "% of peak", "dense img/s",
                      "s2hk / dense", "floor / dense", "s2hk / floor", "target", "unpinned / pinned",
                      "two-pass / dense"],
                     [[i["model"], i["image_size"], i["batch_size"], i["hard_flops_ratio"], i["s2hk_images_per_s"],
                       i["s2hk_tflops"], i.get("s2hk_percent_of_peak"), i["dense_images_per_s"],
                       i["s2hk_over_dense"], i["floor_over_dense"], i["s2hk_over_floor"],
                       i.get("pinned_target_over_floor"), i.get("unpinned_mean_over_pinned_mean"),
                       i.get("naive_over_dense")]
                      for i in data["results"]]))


def markdown(data: dict) -> str:
    parts = [f"Machine: {_machine(data)}"]
    if "results" in data and "bf16_peak" in data:
        parts.append(gpu_table(data))
        return "\n\n".join(parts) + "\n"
    smoke = any(b.get("extra_info", {}).get("smoke") for b in data.get("benchmarks", []))
    if smoke:
        parts.append("(smoke-size run: not a measurement)")
    for question, render in (("training step", step_table), ("peak memory", memory_table),
                             ("exported inference", inference_table), ("ops", ops_table)):
        rows = _by_question(data, question)
        if rows:
            text = render(rows)
            if text:
                parts.append(text)
    return "\n\n".join(parts) + "\n"


def chart(data: dict, path: Path) -> Optional[Path]:
    steps = _by_question(data, "training step")
    inference = _by_question(data, "exported inference")
    if not steps and not inference:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k, rows in (("steps", steps), ("inference", inference)) if rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(13 if len(panels) == 2 else 9, 4.5), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1] if len(panels) == 2 else [1]})
    axes = dict(zip(panels, axes[0]))
    if steps:
        ax = axes["steps"]
        labels = [f"{i['model'].replace('mobilenet_v3_small', 'mnv3-s')}\n{100 * i['target_flops']:.0f}%"
                  for i in steps]
        series = [("dense step", [1.0] * len(steps)), ("floor", [i["floor_over_dense"] for i in steps]),
                  ("s2hk step", [i["s2hk_over_dense"] for i in steps]),
                  ("two-pass baseline", [i["naive_over_dense"] for i in steps])]
        width = 0.2
        for k, (name, values) in enumerate(series):
            ax.bar([x + (k - 1.5) * width for x in range(len(steps))], values, width, label=name)
        ax.plot([x for x in range(len(steps))], [i["flops_ideal_over_dense"] for i in steps], "k_", markersize=20,
                label="FLOPs ideal (4+3r)/3")
        ax.set_xticks(range(len(steps)))
        ax.set_xticklabels(labels)
        ax.set_ylabel("time / dense step")
        ax.set_title("Training step (remaining-FLOPs target)")
        ax.legend(fontsize=8)
    if inference:
        ax = axes["inference"]
        markers = dict(zip(sorted({i["model"] for i in inference}), "o^sDvP"))
        for k, batch in enumerate(sorted({i["batch_size"] for i in inference})):
            for model, marker in markers.items():
                pts = [i for i in inference if i["batch_size"] == batch and i["model"] == model]
                ax.scatter([i["hard_flops_ratio"] for i in pts], [i["latency_ratio"] for i in pts], marker=marker,
                           color=f"C{k}", label=f"{model}, batch {batch}")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="latency ratio = FLOPs ratio")
        ax.set_xlim(0, 0.7)
        ax.set_ylim(0, max(1.0, max(i["latency_ratio"] for i in inference) * 1.1))
        ax.set_xlabel("FLOPs ratio r")
        ax.set_ylabel("latency exported / dense")
        ax.set_title("Exported model inference")
        ax.legend(fontsize=8)
    fig.suptitle(_machine(data), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Markdown tables and a PNG chart from bench/results/*.json")
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--no-chart", action="store_true")
    args = parser.parse_args(argv)
    files = args.files or sorted(RESULTS.glob("*.json"))
    if not files:
        print(f"no results in {RESULTS}", file=sys.stderr)
        return 1
    for file in files:
        data = json.loads(file.read_text())
        text = markdown(data)
        file.with_suffix(".md").write_text(text)
        print(f"## {file.name}\n\n{text}")
        if not args.no_chart:
            png = chart(data, file.with_suffix(".png"))
            if png:
                print(f"chart: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
