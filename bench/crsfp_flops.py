"""FLOPs removed by CR-SFP's P-NN at prune rate 0.3 on ImageNet ResNet-18 / ResNet-50, beside the paper.

    python bench/crsfp_flops.py [--rate 0.3] [--size 224] [--out bench/results/crsfp_flops.json]

For each model (:func:`s2hk.models.resnet18` / :func:`s2hk.models.resnet50` with ``stem="imagenet"`` and 1000
classes) and each structure of :class:`s2hk.CRSFPruner` (``"layers"``, the default and the authors' training:
every block convolution masked on its own; ``"groups"``: whole channel groups, stem and shortcuts included),
the pruner is built at ``prune_rate`` and recorded:

- ``dense_flops`` / ``dense_macs``: the model at ``1 x 3 x S x S``;
- ``pnn_flops`` / ``pnn_macs``: the exported P-NN, counted by :func:`s2hk.count_flops` (the reference counter);
  the script stops if :meth:`~s2hk.CRSFPruner.flops` ``("hard")`` says otherwise;
- ``reduction``: ``1 - pnn_flops / dense_flops``;
- ``block_reduction`` (``"layers"``): the same within the masked (block) convolutions alone, leaving out the
  stem, the shortcuts and the classifier, which the P-NN keeps whole.

Convention: FLOPs = 2 x MACs of every convolution and linear layer (stem, shortcuts and classifier included),
for one image; bias adds, norms, activations, pooling and the export's constant adds are not counted.
The paper reports ">41.8%" for ResNet-18 at rate 0.3 (ALGORITHMS.md §2; no ResNet-50 figure there).
Writes ``--out`` (JSON) and the markdown table next to it (same name, ``.md``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

from s2hk import CRSFPruner, count_flops  # noqa: E402
from s2hk.crsfp_layers import conv_roles, term_macs  # noqa: E402
from s2hk.models import resnet18, resnet50  # noqa: E402

MODELS = {"resnet18": resnet18, "resnet50": resnet50}
PAPER = {"resnet18": ">41.8%"}  # FLOPs reduction at rate 0.3, ALGORITHMS.md §2
STRUCTURES = ("layers", "groups")


def block_reduction(pruner: CRSFPruner) -> float:
    """FLOPs removed from the masked (block) convolutions alone: ``1 - P-NN / dense`` over their MACs."""
    roles = conv_roles(pruner.analysis)
    terms = [t for t in term_macs(pruner.flops_polynomial, pruner.masked_layers) if roles.get(t[0]) == "block"]
    return 1.0 - sum(pnn for _, _, pnn in terms) / sum(dense for _, dense, _ in terms)


def measure(name: str, structure: str, rate: float, size: int) -> dict:
    """One model and structure: dense and exported P-NN FLOPs / MACs, the reduction(s)."""
    torch.manual_seed(0)
    model = MODELS[name](num_classes=1000, stem="imagenet")
    example = torch.zeros(1, 3, size, size)
    dense_flops = count_flops(model, example)
    pruner = CRSFPruner(model, example, prune_rate=rate, structure=structure)
    pnn_flops = count_flops(pruner.export(), example)
    if pnn_flops != pruner.flops("hard") or dense_flops != pruner.flops("full"):
        raise SystemExit(f"{name} ({structure}): flops() = {pruner.flops('hard')} / {pruner.flops('full')} but the "
                         f"counter gives {pnn_flops} / {dense_flops}")
    row = {"model": name, "structure": structure, "rate": rate, "input": f"1x3x{size}x{size}",
           "dense_flops": dense_flops, "dense_macs": dense_flops // 2, "pnn_flops": pnn_flops,
           "pnn_macs": pnn_flops // 2, "reduction": 1.0 - pnn_flops / dense_flops,
           "paper_reduction": PAPER.get(name) if size == 224 and rate == 0.3 else None}
    if structure == "layers":
        row["masked_convs"] = len(pruner.masked_layers)
        row["block_reduction"] = block_reduction(pruner)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | structure | input | dense GFLOPs | P-NN GFLOPs | FLOPs removed | within block convs | paper |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        block = f"{100 * r['block_reduction']:.1f}%" if "block_reduction" in r else "-"
        lines.append(f"| {r['model']} | {r['structure']} | {r['input']} | {r['dense_flops'] / 1e9:.3f} | "
                     f"{r['pnn_flops'] / 1e9:.3f} | {100 * r['reduction']:.1f}% | {block} | "
                     f"{r['paper_reduction'] or '-'} |")
    lines += ["", "FLOPs = 2 x MACs of every convolution and linear layer (stem, shortcuts and classifier included), "
              f"one image, prune rate {rows[0]['rate']}. P-NN: the exported model, counted by s2hk.count_flops. "
              "\"layers\" (the default) masks every block convolution on its own, as the authors train CR-SFP; "
              "\"groups\" prunes whole channel groups, stem and shortcuts included."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=0.3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "crsfp_flops.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(name, structure, args.rate, args.size) for name in MODELS for structure in STRUCTURES]
    result = {"date": _dt.date.today().isoformat(), "torch": torch.__version__,
              "convention": "FLOPs = 2 x MACs of every conv and linear, one image", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(rows)
    args.out.with_suffix(".md").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
