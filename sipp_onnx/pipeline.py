"""`prune_model`: the only module that knows the order of the stages.

load -> discover -> calibration -> capture (+ sensitivity) -> select -> rewrite -> save/verify
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from . import __version__, influence
from .branches import BranchPlan, calibration_model, candidate_count, on_model, plan_branches
from .budgets import ErrorCurve, error_curve, floor_counts, mask_cost, norm_shares, refit_curve, uninformative
from .calibration import CalibrationData, CalibrationSource, open_calibration, take_samples
from .capture import Accumulator, CaptureResult, Dequantized, capture, dequantized
from .census import Census, census
from .config import Allocation, Method, Provider, PruneConfig, Ranking, Refit
from .discover import SUBGRAPH_OF_IF, discover
from .errors import CalibrationError, ConfigError, ModelError, NoPrunableLayersError
from .layers import Discovery, Layer, PrunableWeight, from_rows, to_rows
from .maxtimes import kernel as max_times_kernel
from .modelio import (
    StagedOutput,
    check_external_data,
    check_output_path,
    external_tensor_names,
    load_model,
    make_sparse,
    model_files,
    model_inputs,
    over_2gb,
    read_tensor,
    resolve_mask_input,
    save_model_atomic,
    shift_bias,
    tensor_protos,
)
from .pattern import pattern_problem
from .recurrent import HiddenStateAccumulator, SequenceInputAccumulator
from .refit import RefitOutcome, damped, refit_layer
from .report import LayerReport, OutputCheck, PruneReport, RefitReport, SensitivityStats
from .runtime import make_session, run_error
from .select import (
    SelectedWeight,
    WeightScores,
    budget,
    pattern_score,
    select,
    select_count,
    select_counts,
    select_pattern,
)
from .sensitivity import ConvAccumulator, DenseAccumulator, LayerStatistics
from .sizes import FileSize, bytes_size, files_size
from .weightchain import read_weight, write_weight

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
DELTA = 1e-16


@dataclass
class PruneResult:
    """The pruned model (in memory), its report, and where it was written (if anywhere)."""

    model: onnx.ModelProto
    """Tensors stored as external data stay external (not loaded): they are read from
    `base_dir`."""
    report: PruneReport
    output: Path | None = None
    written: list[Path] = field(default_factory=list)
    base_dir: Path | None = None
    """Where `model`'s external tensors are: the output's directory after `prune_model` wrote it,
    else the input model's; None for a model given in memory and not written."""


def recommended_samples(layers: list[Layer], stats: Mapping[str, LayerStatistics]) -> int:
    """|S| = ceil(3 ln(8 eta eta_max / delta)) of spec section 3 (eta: output neurons)."""
    neurons = []
    for layer in layers:
        patches = stats[layer.node].patches_per_sample if layer.node in stats else 1
        neurons.append(layer.n_out * (patches if layer.conv is not None else 1))
    eta, eta_max = sum(neurons), max(neurons)
    return math.ceil(3.0 * math.log(8.0 * eta * eta_max / DELTA))


def gram_bytes(found: Discovery) -> int:
    """Memory of the refit's statistics: per layer and group, a `K x K` float64 Gram matrix."""
    return sum(layer.groups * layer.fan_in**2 * 8 for layer in found.layers)


def _read_weights(
    found: Discovery, protos: dict[str, onnx.TensorProto], base_dir: Path | None, timings: dict[str, float]
) -> dict[str, np.ndarray]:
    """Every pruned weight as its layers read it (float32), checked for NaN/inf; time -> load."""
    t0 = time.perf_counter()
    weights = {w.name: read_weight(w, protos, base_dir) for w in found.weights}
    for w in found.weights:
        if not np.isfinite(weights[w.name]).all():
            bad = int(np.count_nonzero(~np.isfinite(weights[w.name])))
            raise ModelError(f"weight {w.stored_name!r} holds {bad} NaN/inf value(s); the model is broken")
    timings["load"] += time.perf_counter() - t0
    return weights


LayerAccumulator = DenseAccumulator | ConvAccumulator | HiddenStateAccumulator


def _accumulator(
    layer: Layer,
    weight: np.ndarray,
    config: PruneConfig,
    sensitivity: bool,
    gram: bool,
    samples: int,
    constants: Mapping[str, np.ndarray] | None = None,
) -> LayerAccumulator:
    """The accumulator of one layer; `constants`: a recurrent layer's constant `initial_h` and
    `sequence_lens`."""
    constants = constants or {}
    rows = to_rows(weight, layer.layout, groups=layer.groups)
    reduction, terms, seed = config.reduction.value, config.terms.value, config.seed
    cap = None if config.max_points is None else max(1, math.ceil(config.max_points / max(samples, 1)))
    if layer.conv is not None:
        return ConvAccumulator(rows, layer.conv, reduction, sensitivity, terms, gram, cap, seed)
    if layer.recurrent is not None and layer.recurrent.hidden:
        return HiddenStateAccumulator(
            rows,
            layer.recurrent,
            constants.get("initial_h"),
            reduction,
            sensitivity,
            terms,
            gram,
            cap,
            seed,
            constants.get("sequence_lens"),
        )
    if layer.recurrent is not None:
        return SequenceInputAccumulator(
            rows,
            layer.recurrent,
            constants.get("sequence_lens"),
            compute_sensitivity=sensitivity,
            reduction=reduction,
            terms=terms,
            gram=gram,
            max_points_per_sample=cap,
            seed=seed,
        )
    return DenseAccumulator(
        rows, layer.transpose_input, sensitivity, reduction, terms, gram, cap, seed, layer.input_axes
    )


def _constants(
    layer: Layer, protos: Mapping[str, onnx.TensorProto], base_dir: Path | None
) -> dict[str, np.ndarray]:
    """A recurrent layer's `initial_h` and `sequence_lens` where they are constants of the model."""
    geom = layer.recurrent
    if geom is None:
        return {}
    out = {}
    if geom.initial_h and geom.initial_h_constant:
        out["initial_h"] = read_tensor(protos[geom.initial_h], base_dir)
    if geom.sequence_lens and geom.sequence_lens_constant:
        out["sequence_lens"] = read_tensor(protos[geom.sequence_lens], base_dir)
    return out


def _feeds(layer: Layer, acc: LayerAccumulator) -> dict[str, Accumulator]:
    """Captured tensor name -> what receives it, for one layer's accumulator."""
    if isinstance(acc, HiddenStateAccumulator | SequenceInputAccumulator):
        geom = layer.recurrent
        assert geom is not None
        names = {
            "x": layer.input,
            "Y": layer.input,
            "initial_h": geom.initial_h,
            "sequence_lens": geom.sequence_lens,
        }
        return {names[kind]: feeder for kind, feeder in acc.feeders().items()}
    return {layer.input: acc}


@contextlib.contextmanager
def _named_outputs(proto: onnx.ModelProto, found: Discovery) -> Iterator[None]:
    """Name the unused Y outputs that recurrent R layers read, for the calibration pass only."""
    renamed = []
    for layer in found.layers:
        if layer.recurrent is not None and layer.recurrent.name_output:
            # Found by what it reads (node indices differ in a calibration copy with inlined Ifs).
            node = next(
                n
                for n in proto.graph.node
                if n.op_type == layer.op_type and len(n.input) > 2 and n.input[2] == layer.weight
            )
            if not node.output:
                node.output.append("")
            renamed.append((node, node.output[0]))
            node.output[0] = layer.input
    try:
        yield
    finally:
        for node, name in reversed(renamed):
            node.output[0] = name
            while node.output and not node.output[-1]:
                node.output.pop()  # trailing empty outputs: as the model had them (or none)


def _merge(weight: PrunableWeight, stats: Mapping[str, LayerStatistics], attr: str) -> np.ndarray:
    """Element-wise max of a statistic over a weight's uses, in the primary use's rows."""
    if len(weight.layers) == 1:  # already in the primary use's rows: no copy
        return np.asarray(getattr(stats[weight.primary.node], attr))
    merged: np.ndarray | None = None
    for layer in weight.layers:
        # Kept in the accumulator's dtype: float32 sensitivities as float64 would be 8 bytes per
        # weight of the model more, and the max of float32 values is exact.
        value = np.asarray(getattr(stats[layer.node], attr))
        stored = from_rows(np.ascontiguousarray(value), layer.layout, weight.shape, groups=layer.groups)
        merged = stored if merged is None else np.maximum(merged, stored)
    assert merged is not None
    return to_rows(merged, weight.primary.layout, groups=weight.primary.groups)


def outputs_match(
    session: ort.InferenceSession, feed: dict[str, np.ndarray], reference: dict[str, np.ndarray]
) -> list[OutputCheck]:
    names = list(reference)
    try:
        got = session.run(names, feed)
    except Exception as exc:
        raise ModelError(f"the pruned model fails in ONNX Runtime: {run_error(exc)}") from None
    checks = []
    for name, new in zip(names, got, strict=True):
        ref = np.asarray(reference[name], dtype=np.float64).ravel()
        new = np.asarray(new, dtype=np.float64).ravel()
        ref_norm, new_norm = np.linalg.norm(ref), np.linalg.norm(new)
        rel = float(np.linalg.norm(new - ref) / ref_norm) if ref_norm > 0 else float(np.linalg.norm(new))
        cos = float(ref @ new / (ref_norm * new_norm)) if ref_norm > 0 and new_norm > 0 else float("nan")
        checks.append(OutputCheck(name, rel, cos))
    return checks


@dataclass
class Prepared:
    """A loaded model with its calibration statistics: everything `apply` needs to prune it at
    any sparsity, with any method the statistics allow, without another calibration pass."""

    source: str | Path | onnx.ModelProto
    proto: onnx.ModelProto
    """The original model, its external tensors not loaded; `apply` works on a copy."""
    model_path: Path | None
    external: frozenset[str]
    """The tensors the input stores as external data (read from the model's directory)."""
    found: Discovery
    weights: dict[str, np.ndarray]
    stats: dict[str, LayerStatistics]
    data: CalibrationData
    samples: int
    provider: str
    feed: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    config: PruneConfig
    """The configuration the statistics were measured for (reduction, terms, refit statistics)."""
    has_sensitivity: bool
    has_gram: bool
    timings: dict[str, float]
    mask_input: str | None = None
    size_before: FileSize | None = None
    """The input model on disk and compressed."""
    branches: BranchPlan | None = None
    """If branches inlined for calibration (see branches.py)."""
    census: Census | None = None
    """Where the model's parameters are, the taken If branches' layers counted as prunable."""

    @property
    def base_dir(self) -> Path | None:
        """Where the external tensors of `proto` are read from."""
        return self.model_path.parent if self.model_path is not None else None


def prune_model(
    model: str | Path | onnx.ModelProto,
    calibration: CalibrationSource,
    config: PruneConfig | None = None,
    *,
    output: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> PruneResult:
    """Prune `model` with SiPP (or a baseline) and optionally write it to `output`.

    `model` is a path or a loaded ModelProto (which is not modified); `calibration` is a path
    (.npz, .npy, directory) or a mapping input name -> array with samples on the first axis
    (or the batch axis inferred or given by `config.batch_axes`; see calibration.py), or an
    iterable of feed dicts / an ONNX Runtime CalibrationDataReader, one batch per feed (copied
    to a temporary directory for the passes, removed on return).
    Raises a `SippError` subclass for any problem with the inputs.
    """
    config = config or PruneConfig()
    if output is not None and not isinstance(model, onnx.ModelProto):
        check_output_path(Path(model), Path(output), overwrite, False)  # fail before the long part
    prepared = prepare(model, calibration, config, progress)
    try:
        return apply(
            prepared, config, output=output, overwrite=overwrite, progress=progress, copy_model=False
        )
    finally:
        prepared.data.close()


def prepare(
    model: str | Path | onnx.ModelProto,
    calibration: CalibrationSource,
    config: PruneConfig,
    progress: Progress | None = None,
    *,
    sensitivity: bool | None = None,
    gram: bool | None = None,
    statistics: bool | None = None,
) -> Prepared:
    """Load, discover and run the calibration pass once.

    By default the pass measures what `config` needs; `sensitivity` and `gram` force the SiPP
    sensitivities and the refit statistics on or off, `statistics` the pass itself (Wanda's input
    norms need it alone). A sweep asks for everything its methods need at once.
    """
    t0 = time.perf_counter()
    model_path = Path(model) if not isinstance(model, onnx.ModelProto) else None
    if model_path is not None:
        proto = load_model(model_path)
        external = external_tensor_names(proto)
        check_external_data(proto, model_path.parent)
        size_before: FileSize | None = files_size(model_files(proto, model_path))
    else:
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        external = frozenset()
        size_before = None if over_2gb(proto) else bytes_size(proto.SerializeToString())
    if not proto.graph.output:
        raise ModelError("the model has no graph outputs (nothing to run or to check)")
    found = discover(proto, config.op_types, config.exclude)
    in_branches = candidate_count(proto.graph)
    if not found.weights and not in_branches:
        raise NoPrunableLayersError(_no_layers_message(found))
    inputs = model_inputs(proto)
    data = open_calibration(calibration, inputs, config.max_samples, dict(config.batch_axes))
    mask_input = resolve_mask_input(inputs, config.mask_input)
    if mask_input is not None and config.mask_input == "auto":
        log.info("padding mask: input %r (tokens where it is 0 are not calibration points)", mask_input)
    base_dir = model_path.parent if model_path is not None else None
    branches = None
    if in_branches:
        branches, found = _resolve_branches(proto, found, data, config, base_dir)
        if not found.weights:
            raise NoPrunableLayersError(_no_layers_message(found))
    protos = tensor_protos(proto)
    timings = {"load": time.perf_counter() - t0}

    want_sens = sensitivity if sensitivity is not None else config.method.value.startswith("sipp")
    want_gram = gram if gram is not None else config.refit is not Refit.NONE
    if want_sens:
        log.info("max-times product: %s kernel", max_times_kernel())
    measure = (
        statistics
        if statistics is not None
        else config.method is Method.WANDA or config.effective_allocation.curves
    )
    # The weights are read when first needed: before the pass for the sensitivities, after it
    # otherwise, so that they and ONNX Runtime's copy of the model are not in memory together.
    weights: dict[str, np.ndarray] = {}
    if (want_sens or want_gram or measure) and config.sparsity > 0:
        if want_sens:
            weights = _read_weights(found, protos, base_dir, timings)
        stats, captured = _calibrate(
            proto,
            found,
            weights,
            data,
            config,
            progress,
            want_sens,
            want_gram,
            mask_input,
            base_dir,
            branches=branches,
        )
        timings["session"] = captured.session_seconds
        timings["capture"] = captured.run_seconds
        timings["sensitivity"] = captured.stats_seconds
        feed, reference, provider, samples = (
            captured.first_feed,
            captured.first_outputs,
            captured.provider,
            captured.samples,
        )
    else:  # nothing to measure; still run the original once, to verify the result against it
        want_sens = want_gram = False
        stats, samples = {}, 0
        feed = next(data.batches(config.batch_size))
        t_session = time.perf_counter()
        session, provider = make_session(proto, config.provider, base_dir=base_dir)
        timings["session"] = time.perf_counter() - t_session
        try:
            outputs = session.run(None, feed)
        except Exception as exc:
            raise CalibrationError(f"ONNX Runtime failed on calibration batch 0: {run_error(exc)}") from None
        reference = dict(zip([o.name for o in session.get_outputs()], outputs, strict=True))
        del session
    if not weights:
        weights = _read_weights(found, protos, base_dir, timings)
    return Prepared(
        model,
        proto,
        model_path,
        external,
        found,
        weights,
        stats,
        data,
        samples,
        provider,
        feed,
        reference,
        config,
        want_sens,
        want_gram,
        timings,
        mask_input,
        size_before,
        branches,
        census(proto, found).summary(),
    )


def _resolve_branches(
    proto: onnx.ModelProto,
    found: Discovery,
    data: CalibrationData,
    config: PruneConfig,
    base_dir: Path | None,
) -> tuple[BranchPlan | None, Discovery]:
    """Plan the If branches the calibration data takes (see branches.py) and discover the layers
    of the calibration copy, restated for `proto`."""
    plan = plan_branches(proto, lambda: data.batches(config.batch_size), config.provider, base_dir)
    for line in plan.describe():
        log.info("%s", line)
    generic = [s for s in found.skipped if not s.reason.startswith(SUBGRAPH_OF_IF)]
    if not plan.steps:
        return None, Discovery(found.weights, (*generic, *plan.skipped))
    inlined = discover(calibration_model(proto, plan), config.op_types, config.exclude)
    return plan, on_model(inlined, plan)


def apply(
    prepared: Prepared,
    config: PruneConfig,
    *,
    output: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    copy_model: bool = True,
) -> PruneResult:
    """Select, refit, rewrite and (optionally) save, on a copy of the prepared model.

    `config` may differ from the one used by `prepare` in method, sparsity, refit and seed, as
    long as the prepared statistics cover it (else ConfigError). `copy_model=False` rewrites the
    prepared model itself (one prune, no second copy of the weights in memory); `prepared` is
    then used up: each weight is dropped once written, the mask-only methods without a refit
    zero its entries in place, and the pruned tensors of a model with external data go straight
    to the output's data file.
    """
    _check_covers(prepared, config)
    t0 = time.perf_counter()
    timings = dict(prepared.timings)
    found, weights, stats, data = prepared.found, prepared.weights, prepared.stats, prepared.data
    proto = prepared.proto
    if copy_model:
        proto = onnx.ModelProto()
        proto.CopyFrom(prepared.proto)
    protos = tensor_protos(proto)
    out_path = Path(output) if output is not None else None
    if out_path is not None:
        check_output_path(prepared.model_path, out_path, overwrite, bool(prepared.external))

    t1 = time.perf_counter()
    scores = [_scores(w, weights[w.name], stats) for w in found.weights]
    before = [_before(s) for s in scores]  # the weights may be pruned in place below
    auto_output = config.allocation is Allocation.AUTO and config.effective_allocation is Allocation.OUTPUT
    held = sum(values.nbytes for values in weights.values())
    if auto_output and held > influence.MAX_BYTES:  # the probe session holds a second copy
        log.info("allocation: error, not output (%.1f GB of weights: the probe would copy them)", held / 1e9)
        config = replace(config, allocation=Allocation.ERROR)
    allocation = config.effective_allocation
    weighed: influence.Influence | None = None
    factors: dict[str, dict[int, np.ndarray]] = {}
    """Weight -> the sweep factors the error allocation computed, for the refit to reuse."""
    notes = [""] * len(scores)
    if allocation is not Allocation.GLOBAL and config.method.value.startswith("sipp"):
        scores, notes = _informative(scores)
    if config.sparsity == 0:
        selected = [
            SelectedWeight(s.rows, int(np.count_nonzero(s.rows)), 0.0 if stats else None) for s in scores
        ]
    else:
        curves = None
        if allocation.curves and config.structure is None:
            t_alloc = time.perf_counter()
            curves = _curves(found, scores, stats, config, factors)
            timings["allocation"] = time.perf_counter() - t_alloc
            if allocation is Allocation.OUTPUT:
                t_alloc = time.perf_counter()
                weighed = _influence(prepared, config, scores, curves, factors, progress)
                curves = weighed.curves
                timings["influence"] = time.perf_counter() - t_alloc
        # A used-up model keeps only the masked weights when nothing needs the original values.
        in_place = not copy_model and config.refit is Refit.NONE and not config.sequential
        selected = select(
            scores,
            config.method.value,
            config.sparsity,
            config.seed,
            config.layer_floor,
            in_place,
            config.structure,
            "error" if allocation.curves else allocation.value,
            curves,
        )
    timings["selection"] = time.perf_counter() - t1
    if progress is not None:
        progress("select", 1, 1)

    refits: list[RefitReport | None] = [None] * len(selected)
    if stats and config.sparsity > 0 and config.sequential:
        t_seq = time.perf_counter()
        refits = _sequential(prepared, proto, protos, scores, selected, config, progress)
        timings["sequential"] = time.perf_counter() - t_seq
    elif config.refit is not Refit.NONE and config.sparsity > 0:
        t_refit = time.perf_counter()
        for i, (w, score) in enumerate(zip(found.weights, scores, strict=True)):
            selected[i], refits[i] = _refit(
                proto,
                protos,
                w,
                score,
                selected[i],
                stats,
                config.refit,
                prepared.base_dir,
                factors.pop(w.name, None),
            )
            if progress is not None:
                progress("refit", i + 1, len(selected))
        timings["refit"] = time.perf_counter() - t_refit

    t2 = time.perf_counter()
    sipp = config.method.value.startswith("sipp")
    recommended = recommended_samples(list(found.layers), stats) if stats and sipp else None
    # A used-up model with external data writes its pruned tensors straight to the output.
    staged = StagedOutput(out_path) if out_path is not None and not copy_model and prepared.external else None
    try:
        layer_reports = []
        for i, w in enumerate(found.weights):
            score, sel = scores[i], selected[i]
            layer_reports.append(
                _layer_report(w, before[i], sel, refits[i], config, score.kernel_size, notes[i])
            )
            if weighed is not None and weighed.gains[i]:
                pruned = layer_reports[-1].nonzero_before - layer_reports[-1].kept
                gain = influence.interpolated_gain(weighed.gains[i], np.array([pruned]))[0]
                layer_reports[-1] = replace(layer_reports[-1], influence=float(gain))
            counted = layer_reports[-1]
            changed = counted.kept != counted.nonzero_before or (
                sel.rows is not score.rows and not np.array_equal(sel.rows, score.rows)
            )
            if changed:  # untouched tensors keep their bytes
                values = from_rows(sel.rows, w.primary.layout, w.shape, groups=w.primary.groups)
                if not np.isfinite(values).all():  # a broken statistic must not reach the file
                    raise ModelError(
                        f"internal error: the pruned values of weight {w.stored_name!r} hold NaN/inf; "
                        "nothing was written (please report this model)"
                    )
                if staged is not None and w.stored_name in prepared.external:
                    write_weight(w, protos, values, prepared.base_dir, staged.put)
                else:
                    write_weight(w, protos, values, prepared.base_dir)
            if not copy_model:  # the prepared model is used up: hold each weight once
                del score, sel
                scores[i] = selected[i] = None  # type: ignore[call-overload]
                prepared.weights.pop(w.name, None)
                for layer in w.layers:
                    stats.pop(layer.node, None)
        if config.store == "sparse":
            _store_sparse(proto, found, layer_reports)
        checks: list[OutputCheck] = []
        provider = prepared.provider

        def verify(path: Path | None) -> None:
            if config.verify:
                source = path if path is not None else proto
                session, _ = make_session(source, Provider(provider), base_dir=prepared.base_dir)
                checks.extend(outputs_match(session, prepared.feed, prepared.reference))

        written: list[Path] = []
        if out_path is not None:
            written = save_model_atomic(
                proto, out_path, prepared.external, verify, prepared.base_dir, not copy_model, staged
            )
        else:
            verify(None)
    except BaseException:
        if staged is not None:  # the writer removes its directory; this covers the rest
            staged.discard()
        raise
    timings["save"] = time.perf_counter() - t2
    if progress is not None:
        progress("save", 1, 1)
    size_after = files_size(written) if written else None
    timings["total"] = sum(timings.get(stage, 0.0) for stage in ("load", "session", "capture", "sensitivity"))
    timings["total"] += time.perf_counter() - t0

    report = _report(
        prepared.mask_input,
        prepared.source,
        out_path,
        config,
        found,
        layer_reports,
        recommended,
        data,
        prepared.samples,
        provider,
        timings,
        checks,
        (prepared.size_before, size_after),
        prepared.branches,
        prepared.census,
    )
    for check in checks:
        log.info(
            "output %s: relative L2 error %.4g on the first calibration batch",
            check.output,
            check.rel_l2_error,
        )
    # Given up to the writer, the model's external tensors are now the output's.
    base_dir = out_path.parent if out_path is not None and not copy_model else prepared.base_dir
    return PruneResult(proto, report, out_path, written, base_dir)


def _store_sparse(proto: onnx.ModelProto, found: Discovery, layers: list[LayerReport]) -> None:
    """Write the pruned initializers that are smaller sparse as sparse initializers."""
    converted = []
    for i, (w, layer) in enumerate(zip(found.weights, layers, strict=True)):
        if (
            w.source == "initializer"
            and layer.kept < layer.nonzero_before
            and make_sparse(proto, w.stored_name)
        ):
            layers[i] = replace(layer, stored_as="sparse")
            converted.append(w.stored_name)
    if converted:
        log.warning(
            "%d weight tensor(s) written as sparse initializers; ONNX Runtime makes them dense again "
            "when it loads the model (a smaller file, not a faster model)",
            len(converted),
        )
    else:
        log.warning(
            "--store sparse: no pruned tensor is smaller as a sparse initializer (needs < 1/3 non-zero)"
        )


def _check_covers(prepared: Prepared, config: PruneConfig) -> None:
    """Refuse a config that needs statistics the prepared pass did not measure."""
    if config.sparsity == 0:
        return
    if config.method.value.startswith("sipp") and not prepared.has_sensitivity:
        raise ConfigError(f"{config.method.value} needs sensitivities; prepare() did not measure them")
    if config.method is Method.WANDA and not prepared.stats:
        raise ConfigError("wanda needs calibration statistics; prepare() did not measure them")
    if config.refit is not Refit.NONE and not prepared.has_gram:
        raise ConfigError(
            f"refit {config.refit.value} needs input statistics; prepare() did not measure them"
        )
    base = prepared.config
    if prepared.has_sensitivity and (config.reduction, config.terms) != (base.reduction, base.terms):
        raise ConfigError("reduction and terms must match the ones the sensitivities were measured with")


def _calibrate(
    proto: onnx.ModelProto,
    found: Discovery,
    weights: dict[str, np.ndarray],
    data: CalibrationData,
    config: PruneConfig,
    progress: Progress | None,
    sensitivity: bool,
    gram: bool,
    mask_input: str | None,
    base_dir: Path | None,
    teacher: onnx.ModelProto | None = None,
    paired: dict[str, LayerStatistics] | None = None,
    branches: BranchPlan | None = None,
) -> tuple[dict[str, LayerStatistics], CaptureResult]:
    """One streamed pass over the calibration data; statistics per layer node. With a `teacher`
    (the dense model), `paired` receives, per layer node that `_pairable`, the Gram matrix of its
    input here concatenated with its input in the teacher (see `_teacher_target`). With
    `branches`, the pass runs on the calibration copy with those If branches inlined."""
    if gram:
        size = gram_bytes(found)
        if size > 2**30:
            log.warning(
                "the refit keeps a K x K float64 Gram matrix per layer: %.1f GB for this model "
                "(--refit bias or none needs none)",
                size / 1e9,
            )
    accumulators: dict[str, list[Accumulator | Dequantized]] = {}
    by_node: dict[str, LayerAccumulator] = {}
    protos = tensor_protos(proto)
    for w in found.weights:
        # Without sensitivities only the weight's shape matters: a zero-strided stand-in.
        values = weights[w.name] if sensitivity else np.broadcast_to(np.float32(0), w.shape)
        for layer in w.layers:
            acc = _accumulator(
                layer, values, config, sensitivity, gram, data.samples, _constants(layer, protos, base_dir)
            )
            for name, feeder in _feeds(layer, acc).items():
                fed: Accumulator | Dequantized = (
                    feeder if layer.input_quant is None else dequantized(feeder, layer.input_quant, protos)
                )
                accumulators.setdefault(name, []).append(fed)
            by_node[layer.node] = acc
    pairs: dict[str, tuple[int, list[Accumulator]]] = {}
    pair_nodes: dict[str, DenseAccumulator | ConvAccumulator] = {}
    if teacher is not None:
        for w in found.weights:
            layer = w.primary
            if not _pairable(w):
                continue
            n, k = to_rows(np.broadcast_to(np.float32(0), w.shape), layer.layout, groups=layer.groups).shape
            rows = np.broadcast_to(np.float32(0), (n, 2 * k))
            seed, terms = config.seed, config.terms.value
            pair: DenseAccumulator | ConvAccumulator
            if layer.conv is not None:
                pair = ConvAccumulator(rows, layer.conv, "max", False, terms, True, None, seed)
            else:
                pair = DenseAccumulator(rows, False, False, "max", terms, True, None, seed)
            pairs.setdefault(layer.input, (1 if layer.conv is not None else -1, []))[1].append(pair)
            pair_nodes[layer.node] = pair
    if branches is not None and branches.steps:
        proto = calibration_model(proto, branches)
        teacher = calibration_model(teacher, branches) if teacher is not None else None
    with _named_outputs(proto, found):
        captured = capture(
            proto,
            data,
            accumulators,
            config.batch_size,
            config.provider,
            progress,
            mask_input,
            base_dir,
            teacher,
            pairs,
        )
    accumulators.clear()
    pairs.clear()
    results = {}
    for node in list(by_node):  # each accumulator's running statistics freed after its result
        results[node] = by_node.pop(node).result()
    if paired is not None:
        for node in list(pair_nodes):
            paired[node] = pair_nodes.pop(node).result()
    return results, captured


def _pairable(weight: PrunableWeight) -> bool:
    """Whether the sequential refit can fit this weight to the dense model's outputs: one use,
    and an input whose points concatenate along one axis (a Gemm/MatMul without transA, an
    Einsum with its points on the last axis, or an ungrouped Conv)."""
    layer = weight.primary
    if len(weight.layers) != 1 or layer.recurrent is not None:
        return False
    if layer.input_quant is not None:  # the pairs would be integers
        return False
    if layer.conv is not None:
        return layer.conv.group == 1
    return not layer.transpose_input and not layer.input_axes


def _teacher_target(rows: np.ndarray, pair: LayerStatistics) -> tuple[np.ndarray, np.ndarray]:
    """The rows `w*` whose output on this model's inputs `x~` is closest to the dense layer's
    output `w0 x` on the dense inputs, and the bias shift that makes their means agree.

    With `H~ = sum x~ x~^T` and `C = sum x~ x^T` (the blocks of the paired Gram matrix), `w* = H~^-1
    C w0` (damped as the refit damps). The refit of `w*` under `H~` then minimises
    `sum (w x~ - w0 x)^2` for the kept weights: the dense model's outputs are the target, so the
    errors of earlier layers do not compound. `w0 m - w* m~` (`m`, `m~` the mean inputs) is what
    remains of the mean difference."""
    assert pair.gram is not None and pair.input_sum is not None
    k = rows.shape[1]
    gram, sums = pair.gram[0], pair.input_sum[0]
    w0 = rows.astype(np.float64)
    target = np.linalg.solve(damped(gram[:k, :k]), gram[:k, k:] @ w0.T).T
    # An input that is always 0 in this model (a unit whose weights were all pruned upstream)
    # gets w* = 0; its weights keep their dense values, so the kept count stays the budget.
    target = np.where((target == 0) & (w0 != 0), w0, target)
    points = max(pair.points, 1)
    shift = w0 @ (sums[k:] / points) - target @ (sums[:k] / points)
    return target, shift


def layer_stages(proto: onnx.ModelProto, found: Discovery) -> list[list[int]]:
    """Indices into `found.weights`, grouped by how many pruned layers lie upstream of them.

    A weight's stage is the longest chain of prunable layers before any of its uses (top-level
    data flow; tensors a subgraph reads implicitly are not followed). Weights of one stage never
    feed each other, so one calibration pass measures a whole stage.
    """
    layer_nodes = {layer.index for w in found.weights for layer in w.layers}
    depth: dict[str, int] = {}
    node_depth: dict[int, int] = {}
    for i, node in enumerate(proto.graph.node):
        d = max((depth.get(t, 0) for t in node.input if t), default=0)
        node_depth[i] = d
        for t in node.output:
            depth[t] = d + 1 if i in layer_nodes else d
    stage_of = [max(node_depth[layer.index] for layer in w.layers) for w in found.weights]
    return [[i for i, s in enumerate(stage_of) if s == stage] for stage in sorted(set(stage_of))]


def _sequential(
    prepared: Prepared,
    proto: onnx.ModelProto,
    protos: dict[str, onnx.TensorProto],
    scores: list[WeightScores],
    selected: list[SelectedWeight],
    config: PruneConfig,
    progress: Progress | None,
) -> list[RefitReport | None]:
    """Re-measure, re-select and refit stage by stage on the partly pruned model.

    Each weight keeps the number of weights the global selection gave it (the budget is global);
    which ones, and their refitted values, come from statistics of its inputs in the model whose
    earlier stages are already pruned. `scores`, `selected` and `proto` are updated in place.
    """
    found, weights, data = prepared.found, prepared.weights, prepared.data
    refits: list[RefitReport | None] = [None] * len(selected)
    stages = layer_stages(proto, found)
    teacher = None
    if config.refit is Refit.OBS:  # the dense model, before any stage is written
        teacher = onnx.ModelProto()
        teacher.CopyFrom(proto)
    for n, stage in enumerate(stages):
        sub = Discovery(tuple(found.weights[i] for i in stage), ())
        sens = config.method.value.startswith("sipp")
        gram = config.refit is not Refit.NONE
        paired: dict[str, LayerStatistics] = {}
        stats, _ = _calibrate(
            proto,
            sub,
            weights,
            data,
            config,
            None,
            sens,
            gram,
            prepared.mask_input,
            prepared.base_dir,
            teacher if n > 0 else None,  # the first stage's inputs are the dense model's
            paired,
            prepared.branches,
        )
        for i in stage:
            w = found.weights[i]
            score = _scores(w, weights[w.name], stats)
            sel = selected[i]
            if config.structure is not None:
                sel = select_pattern([score], config.method.value, config.structure)[0]
            elif config.method is not Method.MAGNITUDE:
                sel = select_count([score], config.method.value, selected[i].kept, config.seed)[0]
            if config.refit is not Refit.NONE:
                pair = paired.get(w.primary.node)
                target = _teacher_target(score.rows, pair) if pair is not None else None
                sel, refits[i] = _refit(
                    proto, protos, w, score, sel, stats, config.refit, prepared.base_dir, target=target
                )
            scores[i], selected[i] = score, sel
            write_weight(
                w,
                protos,
                from_rows(sel.rows, w.primary.layout, w.shape, groups=w.primary.groups),
                prepared.base_dir,
            )
        if progress is not None:
            progress("sequential", n + 1, len(stages))
    return refits


def _allocation_label(config: PruneConfig) -> str:
    if config.structure is not None:
        return "pattern"
    if config.method in (Method.SIPP_RAND, Method.SIPP_HYBRID):
        return "sampling"
    return config.effective_allocation.value


def _informative(scores: list[WeightScores]) -> tuple[list[WeightScores], list[str]]:
    """Scores whose sensitivities carry no ranking (`budgets.uninformative`: one-hot inputs)
    replaced by the per-row normalised |w| ||a||, and a report note for each one replaced."""
    out, notes = [], []
    for score in scores:
        if (
            score.sensitivity is not None
            and score.input_sqnorm is not None
            and uninformative(score.sensitivity, score.rows)
        ):
            out.append(replace(score, sensitivity=norm_shares(score.rows, score.input_sqnorm)))
            notes.append("sensitivities uninformative (one-hot or constant inputs): ranked by |w|*||a||")
        else:
            out.append(score)
            notes.append("")
    return out, notes


def _curves(
    found: Discovery,
    scores: list[WeightScores],
    stats: Mapping[str, LayerStatistics],
    config: PruneConfig,
    factors: dict[str, dict[int, np.ndarray]],
) -> list[ErrorCurve]:
    """Every weight's error curve for the error allocation (see `budgets.refit_curve`), in the
    method's own order, each ending where the layer floor stops it.

    With `--ranking measured` (sipp-det) each curve carries its twin in Wanda's order.
    The refit's error where it will re-solve the weight. A layer with fewer calibration points
    than inputs per row gets its mask's error instead: its least-squares refit has more unknowns
    than equations, fits the calibration points exactly and says nothing about new data
    (PP-LCNet's classifier after global pooling: 128 points, 1280 inputs). Without Gram
    matrices (no refit asked), the mask's per-weight costs, cross terms ignored."""
    sizes = [s.rows.size for s in scores]
    keep = budget(sum(sizes), config.sparsity)
    floors = floor_counts(sizes, keep, config.layer_floor) or [0] * len(scores)
    method = config.method.value
    alternative = config.ranking is Ranking.MEASURED and config.method is Method.SIPP_DET
    out = []
    for i, (weight, score) in enumerate(zip(found.weights, scores, strict=True)):
        st = stats.get(weight.primary.node)
        if st is None or score.input_sqnorm is None:
            raise ConfigError("allocation error needs calibration statistics of every layer")
        key = pattern_score(score, method)
        live = score.rows != 0
        most = max(0, int(live.sum()) - floors[i])
        per_row = method == "wanda"
        measure: Callable[..., ErrorCurve]
        if st.gram is None or len(weight.layers) > 1:
            cost, energy = mask_cost(score.rows, score.input_sqnorm)
            measure = partial(error_curve, cost, energy, live=live, most=most)
        else:
            refit = (
                config.refit is Refit.OBS
                and st.points >= score.rows.shape[1]
                and not weight.primary.refit_problem
            )
            mine = (
                factors.setdefault(weight.name, {})
                if config.refit is Refit.OBS and not config.sequential
                else None
            )
            measure = partial(
                refit_curve,
                score.rows,
                live=live,
                gram=st.gram,
                refit=refit,
                most=most,
                seed=config.seed,
                factors=mine,
            )
        curve = measure(key=key, per_row=per_row)
        if alternative:
            curve = replace(curve, alternative=measure(key=pattern_score(score, "wanda"), per_row=True))
        out.append(curve)
    return out


def _influence(
    prepared: Prepared,
    config: PruneConfig,
    scores: list[WeightScores],
    curves: list[ErrorCurve],
    factors: dict[str, dict[int, np.ndarray]],
    progress: Progress | None = None,
) -> influence.Influence:
    """The error curves weighted by each weight's measured influence on the outputs (see
    influence.py): each weight pruned alone, as `apply` will prune it, in one probe session."""
    found, stats = prepared.found, prepared.stats
    protos = tensor_protos(prepared.proto)
    top = {t.name for t in prepared.proto.graph.initializer}
    top |= {n.output[0] for n in prepared.proto.graph.node if n.op_type == "Constant" and n.output}
    biases = {w.name: w.primary.bias.tensor for w in found.weights if w.primary.bias is not None}
    wanted = {w.stored_name for w in found.weights} | {b for b in biases.values() if b}

    def probe_on(
        size: int, trim: bool, samples: int = influence.SAMPLES
    ) -> tuple[influence.OutputProbe, int]:
        """The probe on the first `samples` samples (`trim`: exactly those, however the data is
        split into feeds), in batches of at most `size`."""
        feeds, have = [], 0
        for feed in prepared.data.batches(min(size, samples) if trim else size):
            n = prepared.data.count(feed)
            if trim and have + n > samples and not prepared.data.per_sample:
                feed = take_samples(feed, prepared.data.axes, 0, samples - have)
                n = samples - have
            feeds.append(feed)
            have += n
            if have >= samples:
                break
        provider = Provider(prepared.provider)
        return influence.OutputProbe(prepared.proto, wanted & top, feeds, prepared.base_dir, provider), have

    trim = True
    try:
        probe, have = probe_on(config.batch_size, trim)
    except Exception:  # noqa: BLE001 - any ONNX Runtime failure of the smaller batches
        # A constant in the model may fix the batch (an LSTM's sequence_lens or initial_h):
        # the calibration's own batches then run.
        trim = False
        probe, have = probe_on(config.batch_size, trim)
    # Expected runs: every weight once, some again, both splits; kept within the budget.
    runs = 2 * len(found.weights) + 2
    budget_s = influence.BUDGET * (
        prepared.timings.get("capture", 0.0) + prepared.timings.get("sensitivity", 0.0)
    )
    if trim and have > 1 and probe.seconds * runs > max(budget_s, influence.BUDGET_FLOOR_S):
        fewer = max(1, int(have * budget_s / (probe.seconds * runs)))
        log.info("influence: %d samples per measurement, not %d (time budget)", fewer, have)
        probe, have = probe_on(config.batch_size, trim, fewer)

    def prune_alone(i: int, kept: int) -> dict[str, np.ndarray]:
        weight, score = found.weights[i], scores[i]
        sel = select_counts([score], config.method.value, [kept], [curves[i]], config.seed)[0]
        rows, shift = sel.rows, None
        if config.refit is not Refit.NONE:
            outcome = _refit_outcome(weight, score, sel, stats, config.refit, factors.get(weight.name))
            if isinstance(outcome, RefitOutcome):
                rows, shift = outcome.rows, outcome.bias_shift
        values = from_rows(rows, weight.primary.layout, weight.shape, groups=weight.primary.groups)
        fed: dict[str, np.ndarray] = {}
        write_weight(
            weight, protos, values, prepared.base_dir, lambda _, v: fed.__setitem__(weight.stored_name, v)
        )
        slot, name = weight.primary.bias, biases.get(weight.name)
        if shift is not None and slot is not None and name in probe.feedable:
            scratch = onnx.TensorProto()
            scratch.CopyFrom(protos[name])
            shift_bias(prepared.proto, {name: scratch}, slot, shift, weight.dtype, prepared.base_dir)
            fed[name] = read_tensor(scratch, prepared.base_dir)
        return fed

    lives = [int(np.count_nonzero(s.rows)) for s in scores]
    keep = budget(sum(s.rows.size for s in scores), config.sparsity)
    feedable = [w.stored_name in probe.feedable for w in found.weights]
    held = sum(values.nbytes for values in prepared.weights.values())  # one more copy at most
    found_influence = influence.weigh_curves(
        curves, lives, keep, feedable, prune_alone, probe, held, progress
    )
    log.info(
        "influence: %d weights measured, %d model runs on %d samples, %d rounds (%s split kept)",
        sum(1 for g in found_influence.gains if g),
        found_influence.runs,
        have,
        found_influence.rounds,
        found_influence.chosen,
    )
    return found_influence


def _scores(weight: PrunableWeight, values: np.ndarray, stats: Mapping[str, LayerStatistics]) -> WeightScores:
    """Selection inputs of one weight: its rows and its statistics merged over its uses."""
    primary = stats.get(weight.primary.node)
    return WeightScores(
        rows=to_rows(values, weight.primary.layout, groups=weight.primary.groups),
        sensitivity=_merge(weight, stats, "sensitivity")
        if primary and primary.sensitivity is not None
        else None,
        input_sqnorm=_merge(weight, stats, "input_sqnorm") if primary else None,
        patches=primary.patches_per_sample if primary else 1,
        kernel_size=weight.primary.kernel_size,
    )


def _refit_outcome(
    weight: PrunableWeight,
    score: WeightScores,
    sel: SelectedWeight,
    stats: Mapping[str, LayerStatistics],
    mode: Refit,
    factors: dict[int, np.ndarray] | None = None,
    target: tuple[np.ndarray, np.ndarray] | None = None,
) -> RefitOutcome | RefitReport:
    """The refit of one weight's kept entries (and its bias shift), or why there is none."""
    layer = weight.primary
    if len(weight.layers) > 1:
        return RefitReport("skipped", f"shared by {len(weight.layers)} layers: mask only")
    st = stats[layer.node]
    if st.gram is None or st.input_sum is None:  # pragma: no cover - gram is always asked for
        return RefitReport("skipped", "no calibration statistics")
    if np.array_equal(sel.rows, score.rows):
        return RefitReport("none", "nothing pruned", 0.0, 0.0)
    reference = score.rows if target is None else target[0]
    return refit_layer(
        reference,
        sel.rows if target is None else np.where(sel.rows != 0, reference, 0.0),
        st.gram,
        st.input_sum,
        st.points,
        weights=mode is Refit.OBS and not layer.refit_problem,
        bias=layer.bias is not None,
        factors=factors,
    )


def _refit(
    proto: onnx.ModelProto,
    protos: dict[str, onnx.TensorProto],
    weight: PrunableWeight,
    score: WeightScores,
    sel: SelectedWeight,
    stats: Mapping[str, LayerStatistics],
    mode: Refit,
    base_dir: Path | None,
    factors: dict[int, np.ndarray] | None = None,
    target: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[SelectedWeight, RefitReport]:
    """Refit one weight's kept entries (and its bias); the bias tensor is updated in `proto`.
    `factors`: the sweep factors the error allocation already computed (see refit_layer).
    `target`: rows to refit towards instead of the dense ones, and a bias shift to add (the
    sequential refit's `_teacher_target`)."""
    layer = weight.primary
    outcome = _refit_outcome(weight, score, sel, stats, mode, factors, target)
    if isinstance(outcome, RefitReport):
        return sel, outcome
    bias_tensor = None
    if layer.bias is not None and outcome.bias_shift is not None:
        shift = outcome.bias_shift if target is None else outcome.bias_shift + target[1]
        bias_tensor = shift_bias(proto, protos, layer.bias, shift, weight.dtype, base_dir)
    how = outcome.solver if mode is Refit.OBS and not layer.refit_problem else "bias"
    note = layer.bias_problem if layer.bias is None else layer.refit_problem
    log.debug("refit %s: output error %.4g -> %.4g", weight.name, outcome.error_before, outcome.error_after)
    return (
        replace(sel, rows=outcome.rows),
        RefitReport(how, note, outcome.error_before, outcome.error_after, outcome.rows_refitted, bias_tensor),
    )


def _no_layers_message(found: Discovery) -> str:
    if not found.skipped:
        return "the model has no Gemm, MatMul, Conv or Einsum node to prune"
    reasons = "; ".join(f"{s.node}: {s.reason}" for s in found.skipped[:3])
    more = f" (and {len(found.skipped) - 3} more)" if len(found.skipped) > 3 else ""
    return f"no prunable layer: {reasons}{more}"


_Before = tuple[int, SensitivityStats | None, bool]


def _before(score: WeightScores) -> _Before:
    """What the report says of a weight before pruning: its non-zeros and sensitivities."""
    measured = score.sensitivity is not None
    stats = SensitivityStats.of(score.sensitivity, score.rows) if score.sensitivity is not None else None
    return int(np.count_nonzero(score.rows)), stats, measured


def _layer_report(
    w: PrunableWeight,
    before: _Before,
    sel: SelectedWeight,
    refit: RefitReport | None,
    config: PruneConfig,
    kernel_size: int,
    note: str = "",
) -> LayerReport:
    kept = int(np.count_nonzero(sel.rows))
    nonzero, sensitivity, measured = before
    pattern = ""
    if config.structure is not None:
        problem = pattern_problem(w.primary.fan_in, kernel_size, config.structure)
        pattern = f"not applied: {problem}" if problem else config.structure.label
    return LayerReport(
        weight=w.name,
        nodes=tuple(layer.node for layer in w.layers),
        op_type=w.primary.op_type,
        shape=w.shape,
        params=w.size,
        nonzero_before=nonzero,
        kept=kept,
        sparsity=1.0 - kept / w.size,
        sensitivity=sensitivity,
        bound=sel.bound,
        sampled_row_parts=sel.sampled_row_parts,
        reduction=config.reduction.value if measured else None,
        refit=refit,
        stored=w.stored,
        via=w.via,
        pattern=pattern,
        score_note=note,
        ranking=_ranking(config, sel),
    )


def _ranking(config: PruneConfig, sel: SelectedWeight) -> str | None:
    """The order a weight was pruned in, where `--ranking measured` chose one."""
    if config.ranking is not Ranking.MEASURED or config.method is not Method.SIPP_DET:
        return None
    if not config.effective_allocation.curves or config.sparsity == 0:
        return None
    return sel.ranking or "sensitivity"


def _report(
    mask_input: str | None,
    model: str | Path | onnx.ModelProto,
    out_path: Path | None,
    config: PruneConfig,
    found: Discovery,
    layers: list[LayerReport],
    recommended: int | None,
    data: CalibrationData,
    samples: int,
    provider: str,
    timings: dict[str, float],
    checks: list[OutputCheck],
    sizes: tuple[FileSize | None, FileSize | None] = (None, None),
    branches: BranchPlan | None = None,
    model_census: Census | None = None,
) -> PruneReport:
    total = sum(layer.params for layer in layers)
    kept = sum(layer.kept for layer in layers)
    warnings = list(data.warnings)
    if recommended is not None and samples < recommended:
        message = (
            f"{samples} calibration samples used; spec section 3 recommends at least "
            f"{recommended} for this model"
        )
        warnings.append(message)
        log.warning(message)
    return PruneReport(
        model=str(model) if not isinstance(model, onnx.ModelProto) else "<in-memory model>",
        output=str(out_path) if out_path is not None else None,
        method=config.method.value,
        reduction=config.reduction.value,
        terms=config.terms.value,
        refit=config.refit.value,
        sequential=config.sequential,
        mask_input=mask_input,
        layer_floor=config.layer_floor,
        max_points=config.max_points,
        seed=config.seed,
        sparsity_target=config.sparsity,
        pattern=config.pattern,
        allocation=_allocation_label(config),
        max_times_kernel=max_times_kernel() if any(layer.reduction for layer in layers) else None,
        size_before=sizes[0],
        size_after=sizes[1],
        sparsity_achieved=1.0 - kept / total,
        params_total=total,
        params_kept=kept,
        samples=samples,
        samples_available=data.available,
        recommended_samples=recommended,
        batch_size=data.fixed_batch or config.batch_size,
        provider=provider,
        timings={k: round(v, 4) for k, v in timings.items()},
        layers=layers,
        skipped=list(found.skipped),
        verification=checks,
        unused_calibration_arrays=data.unused_arrays,
        batch_axes=data.layout,
        per_sample_inputs={name: list(shape) for name, shape in data.per_sample.items()},
        branches=branches.describe() if branches is not None else [],
        census=model_census,
        warnings=warnings,
        versions={
            "sipp-onnx": __version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
    )
