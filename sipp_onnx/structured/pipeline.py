"""`prune_structured`: the order of the structured stages.

load -> channel graph -> calibration pass (the consumers' inputs, streamed into the same
accumulators the unstructured path uses) -> scores -> allocation -> compensation -> surgery ->
check, save atomically, verify -> latency (when asked) -> report.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .. import __version__
from ..branches import candidate_count
from ..calibration import CalibrationSource, open_calibration
from ..capture import Accumulator, CaptureResult, capture
from ..config import BatchAxisItems, Provider, batch_axis_items, exclude_patterns
from ..errors import ConfigError, ModelError, NoPrunableLayersError
from ..modelio import (
    check_external_data,
    check_output_path,
    external_tensor_names,
    load_model,
    model_files,
    model_inputs,
    over_2gb,
    read_tensor,
    resolve_mask_input,
    save_model_atomic,
    tensor_protos,
)
from ..patches import output_spatial
from ..pipeline import outputs_match
from ..report import OutputCheck
from ..runtime import make_session
from ..sensitivity import ConvAccumulator, DenseAccumulator, LayerStatistics
from ..sizes import FileSize, files_size
from .allocate import allocate
from .channels import ChannelGraph, build_channel_graph
from .compensate import COMPENSATIONS, Compensation, compensate
from .groups import Plan
from .latency import Latency, compare_latency
from .probe import Probe
from .report import GroupReport, StructuredReport
from .scores import SCORES, component_scores, layer_rows, scored_groups
from .surgery import apply_surgery

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
TARGETS = ("macs", "params")
PROBE_ROUNDS = 4
"""Allocation rounds: each measures the groups the last one cut deeper than measured."""


@dataclass(frozen=True)
class StructuredConfig:
    """Everything that decides the result of `prune_structured`."""

    sparsity: float = 0.3
    """Fraction of the weight layers' MACs (or parameters) to remove."""
    target: str = "macs"
    score: str = "pfp"
    compensation: str = "refit"
    channel_multiple: int = 8
    """Kept channel counts are multiples of this (heads and conv groups count whole)."""
    max_samples: int | None = None
    batch_size: int = 32
    batch_axes: BatchAxisItems = ()
    """Overrides of the calibration inputs' batch axes, as `PruneConfig.batch_axes`."""
    max_points: int | None = 16384
    provider: Provider = Provider.AUTO
    mask_input: str = "auto"
    exclude: tuple[str, ...] = ()
    seed: int = 0
    verify: bool = True
    latency: bool = False
    """Measure ONNX Runtime latency of the dense and the pruned model (batch 1 and the
    calibration batch size, median of `latency_runs`)."""
    latency_runs: int = 20
    probe: bool = True
    """Put the groups' scores on one scale by each group's measured effect on the model output
    (one run of the model per group, see `probe`); False: compare raw scores."""

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= float(self.sparsity) < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        for name, allowed in (("target", TARGETS), ("score", SCORES), ("compensation", COMPENSATIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.channel_multiple < 1:
            raise ConfigError(f"channel_multiple must be a positive integer, got {self.channel_multiple}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size}")
        if self.latency_runs < 1:
            raise ConfigError(f"latency_runs must be a positive integer, got {self.latency_runs}")
        object.__setattr__(self, "provider", Provider(self.provider))
        object.__setattr__(self, "exclude", exclude_patterns(self.exclude))
        object.__setattr__(self, "batch_axes", batch_axis_items(self.batch_axes))


@dataclass
class StructuredResult:
    model: onnx.ModelProto
    report: StructuredReport
    output: Path | None = None
    written: list[Path] = field(default_factory=list)


class _Shapes:
    """Records the first input shape a layer sees (for its output positions per sample)."""

    def __init__(self) -> None:
        self.shape: tuple[int, ...] | None = None

    def update(self, x: np.ndarray, token_mask: np.ndarray | None = None) -> None:
        if self.shape is None:
            self.shape = tuple(x.shape)


def structured_plan(
    model: onnx.ModelProto, base_dir: Path | None = None, exclude: tuple[str, ...] = ()
) -> Plan:
    """The channel graph of `model` as groups (no calibration data needed)."""
    graph = build_channel_graph(model, str(base_dir) if base_dir is not None else None)
    _exclude(graph, exclude)
    return Plan(graph)


def _exclude(graph: ChannelGraph, exclude: tuple[str, ...]) -> None:
    patterns = [re.compile(p) for p in exclude]
    if not patterns:
        return
    for i, layer in enumerate(graph.layers):
        if any(p.search(layer.name) for p in patterns):
            for node, origin in enumerate(graph.origin):
                if origin == i:
                    graph.frozen.setdefault(node, f"excluded by --exclude ({layer.name!r})")
            if layer.in_layout:
                for node in graph.layouts[layer.input].tolist():
                    graph.frozen.setdefault(node, f"excluded by --exclude ({layer.name!r})")


def no_groups_message(plan: Plan) -> str:
    reasons = list(dict.fromkeys(r for g in plan.groups for r in g.reasons))
    if not plan.groups:
        return "no structured pruning possible: the model has no Conv, Gemm or MatMul with a constant weight"
    shown = "; ".join(reasons[:3]) + (f" (and {len(reasons) - 3} more)" if len(reasons) > 3 else "")
    return f"no prunable channel group: {shown}"


@dataclass
class PreparedStructured:
    """A loaded model, its channel groups and its calibration statistics: everything
    `apply_structured` needs to prune it with any score, compensation and target, without
    another calibration pass."""

    model_path: Path
    proto: onnx.ModelProto
    external: frozenset[str]
    plan: Plan
    weights: dict[int, np.ndarray]
    stats: dict[int, LayerStatistics]
    captured: CaptureResult
    config: StructuredConfig
    timings: dict[str, float]
    size_before: FileSize | None
    warnings: list[str]
    fixed_batch: int | None

    @property
    def base_dir(self) -> Path:
        return self.model_path.parent


def prune_structured(
    model: str | Path,
    calibration: CalibrationSource,
    config: StructuredConfig | None = None,
    *,
    output: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> StructuredResult:
    """Remove channels, neurons and heads of `model` until `config.sparsity` of its weight
    layers' MACs (or parameters) is gone; write the result to `output` when given."""
    config = config or StructuredConfig()
    if output is not None:
        check_output_path(Path(model), Path(output), overwrite, False)  # fail before the long part
    prepared = prepare_structured(model, calibration, config, progress)
    return apply_structured(prepared, config, output=output, overwrite=overwrite, progress=progress)


def prepare_structured(
    model: str | Path,
    calibration: CalibrationSource,
    config: StructuredConfig,
    progress: Progress | None = None,
    *,
    everything: bool = False,
) -> PreparedStructured:
    """Load, find the groups and run the calibration pass once (measuring what `config` needs,
    or with `everything` what any score and compensation needs)."""
    t0 = time.perf_counter()
    model_path = Path(model)
    proto = load_model(model_path)
    external = external_tensor_names(proto)
    check_external_data(proto, model_path.parent)
    base_dir = model_path.parent
    size_before: FileSize | None = files_size(model_files(proto, model_path))
    plan = structured_plan(proto, base_dir, config.exclude)
    if not any(g.prunable for g in plan.groups):
        message = no_groups_message(plan)
        if not plan.groups and candidate_count(proto.graph):
            message += (
                " at the top level (its layers lie inside If/Loop/Scan subgraphs, which structured "
                "pruning does not enter; the unstructured `prune` reaches If branches)"
            )
        raise NoPrunableLayersError(message)
    inputs = model_inputs(proto)
    data = open_calibration(calibration, inputs, config.max_samples, dict(config.batch_axes))
    mask_input = resolve_mask_input(inputs, config.mask_input)
    protos = tensor_protos(proto)
    weights = {i: read_tensor(protos[layer.weight], base_dir) for i, layer in enumerate(plan.layers)}
    for i, w in weights.items():
        if not np.isfinite(w).all():
            raise ModelError(f"weight {plan.layers[i].weight!r} holds NaN/inf values; the model is broken")
    timings = {"load": time.perf_counter() - t0}
    sensitivity = everything or config.score == "pfp"
    gram = everything or config.compensation != "none" or config.score == "act"
    stats, shapes, captured = _calibrate(
        proto, plan, weights, data, config, mask_input, base_dir, progress, sensitivity, gram
    )
    timings.update(session=captured.session_seconds, capture=captured.run_seconds)
    timings["statistics"] = captured.stats_seconds
    _fill_positions(plan, shapes)
    return PreparedStructured(
        model_path,
        proto,
        external,
        plan,
        weights,
        stats,
        captured,
        config,
        timings,
        size_before,
        list(data.warnings),
        data.fixed_batch,
    )


def apply_structured(
    prepared: PreparedStructured,
    config: StructuredConfig,
    *,
    output: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> StructuredResult:
    """Score, allocate, compensate, cut and (optionally) save a copy of the prepared model."""
    plan, stats, weights, captured = prepared.plan, prepared.stats, prepared.weights, prepared.captured
    base_dir = prepared.base_dir
    if config.score == "pfp" and not any(st.sensitivity is not None for st in stats.values()):
        raise ConfigError("the pfp score needs sensitivities; the calibration pass did not measure them")
    if (config.compensation != "none" or config.score == "act") and not any(
        st.gram is not None for st in stats.values()
    ):
        raise ConfigError("this compensation needs Gram matrices; the calibration pass did not measure them")
    timings = dict(prepared.timings)
    t0 = time.perf_counter()
    out_path = Path(output) if output is not None else None
    if out_path is not None:
        check_output_path(prepared.model_path, out_path, overwrite, bool(prepared.external))
    scores = component_scores(plan, config.score, weights, stats)
    allowed = {g.index for g in plan.groups if g.prunable} & scored_groups(plan, stats)
    if not allowed:
        raise NoPrunableLayersError(no_groups_message(plan) + "; no group has a consumer layer to score it")
    t_alloc = time.perf_counter()
    allocation = allocate(plan, scores, config.sparsity, config.target, config.channel_multiple, allowed)
    if config.probe:
        probe = Probe(
            prepared.proto,
            plan,
            scores,
            lambda keep: _compensate(plan, keep, weights, stats, config.compensation),
            captured.first_feed,
            captured.first_outputs,
            config.channel_multiple,
            base_dir,
            axes=captured.batch_axes,
        )
        probe.start(allowed)
        for round_ in range(PROBE_ROUNDS + 1):
            allocation = allocate(
                plan, probe.scaled(), config.sparsity, config.target, config.channel_multiple, allowed
            )
            deeper = probe.beyond(allocation.keep)
            if not deeper or round_ == PROBE_ROUNDS:
                break
            for g, cut in deeper:
                probe.measure(g, cut)
        timings["probe_runs"] = probe.runs
    timings["allocate"] = time.perf_counter() - t_alloc
    if progress is not None:
        progress("allocate", 1, 1)

    t2 = time.perf_counter()
    compensations = _compensate(plan, allocation.keep, weights, stats, config.compensation)
    timings["compensate"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    pruned = onnx.ModelProto()
    pruned.CopyFrom(prepared.proto)
    apply_surgery(pruned, plan, allocation.keep, compensations, base_dir=base_dir)
    _check(pruned)
    timings["surgery"] = time.perf_counter() - t3

    t4 = time.perf_counter()
    checks: list[OutputCheck] = []

    def verify(path: Path | None) -> None:
        if config.verify:
            source: onnx.ModelProto | Path = path if path is not None else pruned
            session, _ = make_session(source, Provider(captured.provider), base_dir=base_dir)
            checks.extend(outputs_match(session, captured.first_feed, captured.first_outputs))

    written: list[Path] = []
    if out_path is not None:
        written = save_model_atomic(pruned, out_path, prepared.external, verify, base_dir)
    else:
        verify(None)
    timings["save"] = time.perf_counter() - t4
    timings["total"] = sum(timings.get(k, 0.0) for k in ("load", "session", "capture", "statistics"))
    timings["total"] += time.perf_counter() - t0

    before: list[Latency] = []
    after: list[Latency] = []
    if config.latency:
        t5 = time.perf_counter()
        batches = tuple(dict.fromkeys((1, prepared.fixed_batch or config.batch_size)))
        sample = captured.first_feed
        before, after = compare_latency(
            prepared.model_path,
            written[0] if written else pruned,
            sample,
            batches,
            runs=config.latency_runs,
            base_dir=base_dir,
            axes=captured.batch_axes,
        )
        timings["latency"] = time.perf_counter() - t5

    report = _report(
        prepared.model_path,
        out_path,
        config,
        plan,
        allocation.keep,
        compensations,
        captured.samples,
        captured.provider,
        timings,
        checks,
        (before, after),
        (prepared.size_before, files_size(written) if written else None),
        prepared.warnings,
        {name: axis for name, axis in captured.batch_axes.items() if axis != 0},
    )
    return StructuredResult(pruned, report, out_path, written)


def _calibrate(
    proto: onnx.ModelProto,
    plan: Plan,
    weights: Mapping[int, np.ndarray],
    data: object,
    config: StructuredConfig,
    mask_input: str | None,
    base_dir: Path,
    progress: Progress | None,
    sensitivity: bool,
    gram: bool,
) -> tuple[dict[int, LayerStatistics], dict[int, tuple[int, ...]], CaptureResult]:
    """One pass: every consumer's input into an accumulator (sensitivities for PFP, Gram
    matrices for the refit and the activation score); the input shape of every layer whose
    positions per sample the graph does not fix."""
    samples = getattr(data, "samples", 1)
    cap = None if config.max_points is None else max(1, math.ceil(config.max_points / max(samples, 1)))
    accs: dict[str, list[Accumulator]] = {}
    by_layer: dict[int, DenseAccumulator | ConvAccumulator] = {}
    recorders: dict[int, _Shapes] = {}
    for i, layer in enumerate(plan.layers):
        if layer.in_layout:
            rows = layer_rows(layer, weights[i])
            acc: DenseAccumulator | ConvAccumulator
            if layer.conv is not None:
                acc = ConvAccumulator(
                    rows, layer.conv, "max", sensitivity, "absolute", gram, cap, config.seed
                )
            else:
                acc = DenseAccumulator(rows, False, sensitivity, "max", "absolute", gram, cap, config.seed)
            accs.setdefault(layer.input, []).append(acc)
            by_layer[i] = acc
        recorders[i] = _Shapes()
        accs.setdefault(layer.input, []).append(recorders[i])
    captured = capture(proto, data, accs, config.batch_size, config.provider, progress, mask_input, base_dir)  # type: ignore[arg-type]
    accs.clear()
    stats = {i: acc.result() for i, acc in by_layer.items()}
    shapes = {i: r.shape for i, r in recorders.items() if r.shape is not None}
    return stats, shapes, captured


def _fill_positions(plan: Plan, shapes: Mapping[int, tuple[int, ...]]) -> None:
    """Output positions per sample of the layers whose shapes the graph leaves open."""
    for i, layer in enumerate(plan.layers):
        if plan.positions.get(i) or i not in shapes:
            continue
        shape = shapes[i]
        if layer.conv is not None:
            plan.positions[i] = math.prod(output_spatial(layer.conv, tuple(shape[2:])))
        else:
            plan.positions[i] = math.prod(shape[1:-1]) if len(shape) > 2 else 1


def _compensate(
    plan: Plan,
    keep: np.ndarray,
    weights: Mapping[int, np.ndarray],
    stats: Mapping[int, LayerStatistics],
    mode: str,
) -> dict[int, Compensation]:
    """Compensation of every consumer that loses input channels."""
    out = {}
    for i, layer in enumerate(plan.layers):
        comps = plan.layer_in[i]
        if comps is None or i not in stats:
            continue
        kept = keep[comps]
        if kept.all():
            continue
        per = layer.kernel if layer.op == "Conv" else 1
        cols = np.repeat(kept, per)
        st = stats[i]
        rows = layer_rows(layer, weights[i])
        if st.gram is None or st.input_sum is None:
            masked = np.where(cols, rows, 0).astype(np.float64)
            out[i] = Compensation(masked, None, float("nan"), float("nan"), "none")
            continue
        has_bias = layer.bias is not None or layer.bias_add is not None or layer.op in ("Conv", "Gemm")
        out[i] = compensate(rows, cols, st.gram[0], st.input_sum[0], st.points, mode, has_bias)
    return out


def _check(model: onnx.ModelProto) -> None:
    """The pruned model must pass the full checker and strict shape inference."""
    if over_2gb(model):
        return
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ModelError(f"the structured model fails onnx.checker: {str(exc).splitlines()[0]}") from None


def _report(
    model: Path,
    output: Path | None,
    config: StructuredConfig,
    plan: Plan,
    keep: np.ndarray,
    compensations: Mapping[int, Compensation],
    samples: int,
    provider: str,
    timings: dict[str, float],
    checks: list[OutputCheck],
    latency: tuple[list[Latency], list[Latency]],
    sizes: tuple[FileSize | None, FileSize | None],
    warnings: list[str],
    batch_axes: dict[str, int | None] | None = None,
) -> StructuredReport:
    dense = plan.all_kept()
    groups = []
    for g in plan.groups:
        producers = plan.producers(g)
        consumers = [i for i in g.layers if plan.layer_in[i] is not None and i in compensations]
        consumers = [i for i in consumers if np.isin(plan.layer_in[i], g.components).any()]  # type: ignore[arg-type]
        kept_units = int(keep[g.components].sum())
        errors = [compensations[i] for i in consumers]
        groups.append(
            GroupReport(
                name=g.name,
                kind=g.kind,
                channels_before=g.size * g.width,
                channels_after=kept_units * g.width,
                units_before=g.size,
                units_after=kept_units,
                macs_before=sum(plan.layer_macs(dense, i) for i in producers),
                macs_after=sum(plan.layer_macs(keep, i) for i in producers),
                params_before=sum(plan.layer_params(dense, i) for i in producers),
                params_after=sum(plan.layer_params(keep, i) for i in producers),
                layers=tuple(plan.layers[i].name for i in g.layers),
                frozen=g.frozen,
                reasons=g.reasons,
                error_none=max((c.error_none for c in errors), default=None),
                error_after=max((c.error_after for c in errors), default=None),
                compensation=", ".join(sorted({c.how for c in errors})),
            )
        )
    return StructuredReport(
        model=str(model),
        output=str(output) if output is not None else None,
        score=config.score,
        compensation=config.compensation,
        target=config.target,
        sparsity_target=config.sparsity,
        channel_multiple=config.channel_multiple,
        macs_before=plan.macs(dense),
        macs_after=plan.macs(keep),
        params_before=plan.params(dense),
        params_after=plan.params(keep),
        groups=groups,
        samples=samples,
        provider=provider,
        timings={k: round(v, 4) for k, v in timings.items()},
        verification=checks,
        latency_before=latency[0],
        latency_after=latency[1],
        size_before=sizes[0],
        size_after=sizes[1],
        warnings=warnings,
        batch_axes=batch_axes or {},
        versions={"sipp-onnx": __version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
    )
