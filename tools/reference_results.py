"""Accuracy kept by every method at several sparsities on the shipped reference models.

    python tools/reference_results.py [--write-readme] [--sparsities 0.3,0.5,0.7,0.9]

Prunes each `models/NAME.onnx` with its `NAME_calib.npz` and evaluates the result on
`NAME_test.npz` (400 labelled images; one image is 0.25 points). Prints a Markdown table and,
with --write-readme, replaces the "## Pruning results" section of models/README.md with it.
The variants are every method with its default reduction, plus the SiPP reductions of the spec
(max, mean) so their effect is visible.
"""

from __future__ import annotations

import argparse
import logging
import platform
import re
import sys
import time
from pathlib import Path

from sipp_onnx import PruneConfig, __version__, prune_model
from sipp_onnx.evaluate import evaluate

MODELS = ("lenet300", "cnn", "tokens")
VARIANTS = (
    ("sipp-hybrid", "auto"),
    ("sipp-det", "auto"),
    ("sipp-rand", "auto"),
    ("sipp-det", "max"),
    ("sipp-det", "mean"),
    ("sipp-hybrid", "max"),
    ("sipp-rand", "max"),
    ("magnitude", "auto"),
    ("wanda", "auto"),
)


def run(models_dir: Path, sparsities: list[float], seed: int) -> list[dict]:
    rows = []
    for name in MODELS:
        model = models_dir / f"{name}.onnx"
        calib, test = models_dir / f"{name}_calib.npz", models_dir / f"{name}_test.npz"
        dense = evaluate(model, test).model.accuracy
        for method, reduction in VARIANTS:
            accs = []
            for sparsity in sparsities:
                config = PruneConfig(sparsity=sparsity, method=method, reduction=reduction, seed=seed)
                result = prune_model(model, calib, config)
                accs.append(evaluate(model, test, compare=result.model).compare.accuracy)
            rows.append(
                {"model": name, "dense": dense, "method": method, "reduction": reduction, "acc": accs}
            )
            print(
                f"{name:<9} {method:<12} {reduction:<8} " + " ".join(f"{a * 100:5.1f}" for a in accs),
                file=sys.stderr,
            )
    return rows


def markdown(rows: list[dict], sparsities: list[float], seconds: float) -> str:
    head = "| model (dense) | method | reduction | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |"
    lines = [
        "Test accuracy (%) after pruning to each sparsity; produced by `python tools/reference_results.py "
        f"--write-readme` (sipp-onnx {__version__}, {platform.machine()}, {seconds:.0f} s). "
        "The default method and reduction come first. `auto` is `mean` for Conv and `expected` for "
        "Gemm/MatMul (see docs/algorithm.md). 400 test images: 0.25 points each.",
        "",
        head,
        "|" + "---|" * (3 + len(sparsities)),
    ]
    for r in rows:
        cells = " | ".join(f"{a * 100:.1f}" for a in r["acc"])
        lines.append(
            f"| {r['model']} ({r['dense'] * 100:.2f}) | {r['method']} | {r['reduction']} | {cells} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--sparsities", default="0.3,0.5,0.7,0.9")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    t0 = time.perf_counter()
    rows = run(args.models, sparsities, args.seed)
    table = markdown(rows, sparsities, time.perf_counter() - t0)
    print(table)
    if args.write_readme:
        readme = args.models / "README.md"
        text = readme.read_text()
        section = "## Pruning results\n\n" + table
        new, count = re.subn(r"## Pruning results\n.*?(?=\n## |\Z)", lambda _: section, text, flags=re.S)
        if count != 1:
            print("models/README.md has no '## Pruning results' section", file=sys.stderr)
            return 1
        readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
