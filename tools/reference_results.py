"""Accuracy kept by every method at several sparsities on the shipped reference models.

    python tools/reference_results.py [--write-readme] [--sparsities 0.3,0.5,0.7,0.9]

Prunes each `models/NAME.onnx` with its `NAME_calib.npz` and evaluates the result on
`NAME_test.npz` (400 labelled images; one image is 0.25 points). Prints a Markdown table and,
with --write-readme, replaces the "## Pruning results" section of models/README.md with it.
The variants are every method with and without the OBS refit, the bias refit and --sequential
on the default, and the SiPP reductions and terms of the spec (mask only) so their effect is
visible.
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
# (method, reduction, terms, refit, sequential); the default first, then the alternatives.
# METHOD@ALLOCATION overrides the default allocation (auto: output for sipp-det, global otherwise).
VARIANTS = (
    ("sipp-det", "max", "absolute", "obs", False),
    ("sipp-det@error", "max", "absolute", "obs", False),
    ("sipp-det@global", "max", "absolute", "obs", False),
    ("sipp-det", "max", "absolute", "obs", True),
    ("sipp-det", "max", "absolute", "bias", False),
    ("sipp-det", "max", "absolute", "none", False),
    ("sipp-hybrid", "max", "absolute", "obs", False),
    ("sipp-hybrid", "max", "absolute", "none", False),
    ("sipp-rand", "max", "absolute", "obs", False),
    ("sipp-rand", "max", "absolute", "none", False),
    ("sipp-det", "mean", "absolute", "none", False),
    ("sipp-hybrid", "expected", "absolute", "none", False),
    ("sipp-det", "max", "signed", "none", False),
    ("sipp-det", "mean", "signed", "none", False),
    ("sipp-hybrid", "max", "signed", "none", False),
    ("magnitude", "max", "absolute", "obs", False),
    ("magnitude", "max", "absolute", "none", False),
    ("magnitude@error", "max", "absolute", "obs", False),
    ("wanda", "max", "absolute", "obs", False),
    ("wanda@error", "max", "absolute", "obs", False),
    ("wanda", "max", "absolute", "none", False),
)


def run(models_dir: Path, sparsities: list[float], seed: int, variants) -> list[dict]:
    rows = []
    for name in MODELS:
        model = models_dir / f"{name}.onnx"
        calib, test = models_dir / f"{name}_calib.npz", models_dir / f"{name}_test.npz"
        dense = evaluate(model, test).model.accuracy
        for method, reduction, terms, refit, sequential in variants:
            accs = []
            base_method, _, allocation = method.partition("@")
            for sparsity in sparsities:
                config = PruneConfig(
                    sparsity=sparsity,
                    method=base_method,
                    allocation=allocation or "auto",
                    reduction=reduction,
                    terms=terms,
                    refit=refit,
                    sequential=sequential,
                    seed=seed,
                )
                result = prune_model(model, calib, config)
                accs.append(evaluate(model, test, compare=result.model).compare.accuracy)
            rows.append(
                {
                    "model": name,
                    "dense": dense,
                    "method": method,
                    "reduction": reduction,
                    "terms": terms,
                    "refit": refit + (" +seq" if sequential else ""),
                    "acc": accs,
                }
            )
            print(
                f"{name:<9} {method:<12} {reduction:<8} {terms:<8} {rows[-1]['refit']:<8} "
                + " ".join(f"{a * 100:5.1f}" for a in accs),
                file=sys.stderr,
            )
    return rows


def markdown(rows: list[dict], sparsities: list[float], seconds: float) -> str:
    head = (
        "| model (dense) | method | reduction | terms | refit | "
        + " | ".join(f"{s:.0%}" for s in sparsities)
        + " |"
    )
    lines = [
        "Test accuracy (%) after pruning to each sparsity; produced by `python tools/reference_results.py "
        f"--write-readme` (sipp-onnx {__version__}, {platform.machine()}, {seconds:.0f} s). "
        "The default (sipp-det, max, absolute, refit obs, layer floor 0.25, allocation auto = output) comes "
        "first, then `@error` (the layer-error allocation, the default before) and `@global` (the "
        "one-threshold allocation, the default before that), the other SiPP "
        "variants, with and without refit, and the spec's signed terms; reduction and terms do not "
        "apply to magnitude and wanda. '+seq' is --sequential. See docs/algorithm.md for what they "
        "mean. 400 test images: 0.25 points each.",
        "",
        head,
        "|" + "---|" * (5 + len(sparsities)),
    ]
    for r in rows:
        cells = " | ".join(f"{a * 100:.1f}" for a in r["acc"])
        sipp = r["method"].startswith("sipp")
        how = f"{r['reduction']} | {r['terms']}" if sipp else "- | -"
        lines.append(
            f"| {r['model']} ({r['dense'] * 100:.2f}) | {r['method']} | {how} | {r['refit']} | {cells} |"
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
    parser.add_argument(
        "--variants",
        default=None,
        help="method:reduction:terms:refit[:seq],... instead of the standard set",
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    t0 = time.perf_counter()
    variants = VARIANTS
    if args.variants:
        parts = [v.split(":") for v in args.variants.split(",")]
        variants = tuple((p[0], p[1], p[2], p[3], len(p) > 4 and p[4] == "seq") for p in parts)
    rows = run(args.models, sparsities, args.seed, variants)
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
