"""Structured-pruning benchmark: quality against MACs removed, latency, size and prune time.

    python tools/bench_structured.py [--models resnet,mobilenet,minilm,...] [--out bench_results/structured]

For each model: one calibration pass (`prepare_structured(..., everything=True)`), then
- every score (pfp, l1, act) with every compensation (refit, bias, none) at 30 % of the MACs,
  and pfp+refit and l1+refit at 10 / 20 / 30 / 40 / 50 %: the task metric of the
  pruned model on the model's evaluation data (accuracy with labels, else fidelity to the dense
  model: top-1 agreement, the cosine of the named output, or for open_nsfw, whose top-1 is the
  same on every photo, the correlation of the log-odds);
- ONNX Runtime CPU latency at batch 1 and 32 of the dense and the pruned model (pfp+refit),
  measured alternately, median of 20 runs; file size;
- the time of a full `sipp-onnx prune --structured` against the unstructured default prune of
  the same model, both measured in this run.
Models: the reference models in models/ and those of tools/fetch_benchmark_models.py in
bench_models/. Writes OUT/structured.json and prints Markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sipp_onnx import PruneConfig, prune_model
from sipp_onnx.config import Provider
from sipp_onnx.evaluate import evaluate
from sipp_onnx.structured.latency import compare_latency
from sipp_onnx.structured.pipeline import StructuredConfig, apply_structured, prepare_structured

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Model:
    name: str
    model: Path
    calib: Path
    eval: Path
    metric: str
    output: str | None = None


def models(bench: Path) -> dict[str, Model]:
    ref = ROOT / "models"
    return {
        "lenet300": Model(
            "lenet300",
            ref / "lenet300.onnx",
            ref / "lenet300_calib.npz",
            ref / "lenet300_test.npz",
            "accuracy",
        ),
        "cnn": Model("cnn", ref / "cnn.onnx", ref / "cnn_calib.npz", ref / "cnn_test.npz", "accuracy"),
        "tokens": Model(
            "tokens", ref / "tokens.onnx", ref / "tokens_calib.npz", ref / "tokens_test.npz", "accuracy"
        ),
        "magika": Model(
            "magika",
            bench / "magika.onnx",
            bench / "magika_calib.npz",
            bench / "magika_eval.npz",
            "top1_agreement",
            "target_label",
        ),
        "minilm": Model(
            "minilm",
            bench / "minilm.onnx",
            bench / "minilm_calib.npz",
            bench / "minilm_eval.npz",
            "cosine",
            "461",
        ),
        "resnet": Model(
            "resnet",
            bench / "resnet.onnx",
            bench / "resnet_calib.npz",
            bench / "resnet_eval.npz",
            "logodds_corr",
        ),
        "mobilenet": Model(
            "mobilenet",
            bench / "mobilenet.onnx",
            bench / "mobilenet_calib.npz",
            bench / "mobilenet_eval.npz",
            "accuracy",
        ),
    }


def logodds_correlation(m: Model, pruned: Path) -> float:
    """Pearson correlation of log(p1 / p0) between the dense and the pruned model: the fidelity
    of a two-class softmax whose top-1 never changes on the data (open_nsfw calls every photo
    'safe', so top-1 agreement and the probabilities' cosine stay near 1 whatever happens)."""
    data = np.load(m.eval)
    values = []
    for path in (m.model, pruned):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        probs = np.concatenate(
            [session.run(None, {name: data[name][i : i + 32]})[0] for i in range(0, len(data[name]), 32)]
        ).astype(np.float64)
        probs = np.clip(probs, 1e-12, 1.0)
        values.append(np.log(probs[:, 1]) - np.log(probs[:, 0]))
    return float(np.corrcoef(values[0], values[1])[0, 1])


def metric(m: Model, pruned: Path) -> float:
    if m.metric == "logodds_corr":
        return logodds_correlation(m, pruned)
    report = evaluate(m.model, m.eval, pruned, "labels", m.output, 64, Provider.CPU)
    c = report.compare
    assert c is not None
    if m.metric == "accuracy":
        return float(c.accuracy if c.accuracy is not None else c.top1_agreement or 0.0)
    if m.metric == "top1_agreement":
        return float(c.top1_agreement or 0.0)
    return float(c.cosine)


def dense_metric(m: Model) -> float:
    if m.metric == "accuracy":
        report = evaluate(m.model, m.eval, None, "labels", m.output, 64, Provider.CPU)
        return float(report.model.accuracy or 0.0)
    return 1.0


def bench_model(m: Model, out: Path, sparsities: list[float], max_samples: int) -> dict:
    print(f"## {m.name}", flush=True)
    base = StructuredConfig(max_samples=max_samples, verify=False)
    t0 = time.perf_counter()
    prepared = prepare_structured(m.model, m.calib, base, everything=True)
    prepare_s = time.perf_counter() - t0
    rows = []
    path = out / f"{m.name}.s.onnx"
    points = [(s, c, 0.3) for s in ("pfp", "l1", "act") for c in ("refit", "bias", "none")]
    points += [(s, "refit", sp) for s in ("pfp", "l1") for sp in sparsities if sp != 0.3]
    for score, comp, sp in points:
        config = StructuredConfig(
            sparsity=sp, score=score, compensation=comp, verify=False, max_samples=max_samples
        )
        result = apply_structured(prepared, config, output=path, overwrite=True)
        value = metric(m, path)
        rows.append(
            {
                "score": score,
                "compensation": comp,
                "sparsity": sp,
                "macs_removed": result.report.macs_removed,
                "metric": value,
            }
        )
        print(
            f"{score:4s} {comp:6s} {sp:.2f} MACs -{result.report.macs_removed:.3f} {m.metric} {value:.4f}",
            flush=True,
        )
    # latency, size and timing of the default at 30 %
    config = StructuredConfig(sparsity=0.3, max_samples=max_samples)
    t1 = time.perf_counter()
    from sipp_onnx.structured.pipeline import prune_structured

    prune_structured(m.model, m.calib, config, output=path, overwrite=True)
    structured_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    prune_model(
        m.model,
        m.calib,
        PruneConfig(max_samples=max_samples),
        output=out / f"{m.name}.u.onnx",
        overwrite=True,
    )
    unstructured_s = time.perf_counter() - t2
    sample = next(iter([dict(np.load(m.calib))]))
    sample = {k: v[:32] for k, v in sample.items()}
    before, after = compare_latency(m.model, path, sample, (1, 32), runs=20, base_dir=m.model.parent)
    latency = {
        str(b.batch): {
            "dense_ms": b.seconds * 1e3,
            "pruned_ms": a.seconds * 1e3,
            "speedup": b.seconds / a.seconds,
        }
        for b, a in zip(before, after, strict=True)
    }
    print(f"latency {latency}; prune {structured_s:.1f}s vs unstructured {unstructured_s:.1f}s", flush=True)
    return {
        "model": m.name,
        "metric": m.metric,
        "dense": dense_metric(m),
        "rows": rows,
        "prepare_seconds": prepare_s,
        "structured_prune_seconds": structured_s,
        "unstructured_prune_seconds": unstructured_s,
        "latency": latency,
        "size_dense": m.model.stat().st_size,
        "size_pruned": path.stat().st_size,
    }


def markdown(result: dict) -> str:
    lines = [f"### {result['model']}: {result['metric']} (dense {result['dense']:.4f})", ""]
    lines.append(
        "| score | compensation | " + " | ".join(f"{s:.0%}" for s in (0.1, 0.2, 0.3, 0.4, 0.5)) + " |"
    )
    lines.append("|---|---|" + "---|" * 5)
    by = {(r["score"], r["compensation"], r["sparsity"]): r for r in result["rows"]}
    for score in ("pfp", "l1", "act"):
        for comp in ("refit", "bias", "none"):
            cells = []
            for sp in (0.1, 0.2, 0.3, 0.4, 0.5):
                r = by.get((score, comp, sp))
                cells.append(f"{r['metric']:.4f} ({r['macs_removed']:.0%})" if r else "")
            lines.append(f"| {score} | {comp} | " + " | ".join(cells) + " |")
    lat = result["latency"]
    lines.append("")
    one, many = lat["1"], lat["32"]
    lines.append(
        f"pfp+refit at 30 %: ORT CPU latency batch 1 {one['dense_ms']:.2f} -> {one['pruned_ms']:.2f} ms "
        f"({one['speedup']:.2f}x), batch 32 {many['dense_ms']:.1f} -> {many['pruned_ms']:.1f} ms "
        f"({many['speedup']:.2f}x); file {result['size_dense'] / 1e6:.2f} -> "
        f"{result['size_pruned'] / 1e6:.2f} MB; prune {result['structured_prune_seconds']:.1f} s against "
        f"{result['unstructured_prune_seconds']:.1f} s for the unstructured default"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="cnn,lenet300,tokens,magika,minilm,mobilenet,resnet")
    parser.add_argument("--bench-dir", type=Path, default=ROOT / "bench_models")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "structured")
    parser.add_argument("--max-samples", type=int, default=128)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    table = models(args.bench_dir)
    results = []
    for name in args.models.split(","):
        results.append(bench_model(table[name], args.out, [0.1, 0.2, 0.3, 0.4, 0.5], args.max_samples))
        (args.out / "structured.json").write_text(json.dumps(results, indent=2))
        print(markdown(results[-1]), flush=True)


if __name__ == "__main__":
    main()
