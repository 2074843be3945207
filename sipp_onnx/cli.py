"""The `sipp-onnx` command line: a thin shell over the library.

Tables and JSON go to stdout, progress and warnings to stderr. Errors caused by the input are
one line on stderr and exit status 1; an interrupt (Ctrl-C, SIGINT) exits 130 and SIGTERM exits
143, both without leaving partial output: SIGTERM is turned into the same exception as Ctrl-C,
so the writers' clean-up runs instead of the process dying with a temporary directory left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

import click
import numpy as np

from . import __version__
from .calibration import describe_layout, describe_per_sample, open_calibration
from .checking import check_pattern
from .config import (
    PRUNABLE_OP_TYPES,
    Allocation,
    Method,
    Provider,
    PruneConfig,
    Ranking,
    Reduction,
    Refit,
    Terms,
    batch_axis_items,
)
from .errors import ConfigError, OutputError, SippError
from .evaluate import EvalReport, evaluate
from .inspection import inspect_model
from .modelio import check_output_path, load_model, model_inputs
from .pattern import Pattern, parse_pattern
from .pipeline import prune_model
from .sizes import describe as describe_sizes
from .structured.compensate import COMPENSATIONS
from .structured.inspection import inspect_structured
from .structured.latency import compare_latency
from .structured.pipeline import TARGETS, StructuredConfig, prune_structured
from .structured.scores import SCORES
from .sweep import SWEEP_FILES, SweepPoint, Variant, sweep, write_sweep


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that the
    `finally` blocks of the writers run (the default action kills the process on the spot)."""


def _raise_terminated(_signum: int, _frame: object) -> None:
    raise _Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises `_Terminated` (main thread only: elsewhere Python
    cannot install handlers, and the default action stays)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _run(action: Callable[[], Any], written: list[Path] | None = None) -> Any:
    """Run a command body, turning input errors into one line and a non-zero exit.

    `written` is filled by the body with the files it has finished writing, so that an interrupt
    after them says so instead of claiming nothing was written.
    """
    try:
        with _sigterm_as_interrupt():
            return action()
    except SippError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, _Terminated)
        done = "after writing " + ", ".join(map(str, written)) if written else "nothing was written"
        click.echo(f"interrupted: {'SIGTERM, ' if terminated else ''}{done}", err=True)
        sys.exit(143 if terminated else 130)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


class _StderrLog(logging.Handler):
    """Library warnings to stderr as 'warning: ...' lines."""

    def emit(self, record: logging.LogRecord) -> None:
        level = "warning" if record.levelno >= logging.WARNING else "info"
        click.echo(f"{level}: {record.getMessage()}", err=True)


def _setup_logging(verbose: bool, quiet: bool) -> None:
    logger = logging.getLogger("sipp_onnx")
    logger.handlers[:] = [_StderrLog()]
    logger.setLevel(logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING)
    logger.propagate = False


class _Progress:
    """Progress lines on stderr: a live counter on a terminal, a few lines otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.last_line = ""

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        line = f"{stage}: {done}/{total}"
        if self.tty:
            click.echo(f"\r{line}", err=True, nl=done >= total)
        elif done >= total or done == 1 or done % max(1, total // 10) == 0:
            click.echo(line, err=True)


def _split_op_types(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[str, ...]:
    ops = tuple(op.strip() for op in value.split(",") if op.strip())
    unknown = [op for op in ops if op not in PRUNABLE_OP_TYPES]
    if unknown or not ops:
        raise click.BadParameter(f"expected a comma-separated subset of {','.join(PRUNABLE_OP_TYPES)}")
    return ops


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sipp-onnx")
def main() -> None:
    """Prune ONNX model weights with SiPP (sensitivity-informed provable pruning)."""


# Options of prune and sweep that decide how the calibration statistics are measured and
# used. Their parameter names are PruneConfig's field names, so the values go straight in.
def _enum_option(flag: str, enum: type[StrEnum], default: StrEnum, help: str) -> Callable[..., Any]:
    """A --flag whose choices are an enum's values, defaulting to PruneConfig's."""
    return click.option(
        flag, type=click.Choice([e.value for e in enum]), default=default.value, show_default=True, help=help
    )


_BATCH_AXIS_HELP = (
    "The axis of calibration input NAME that counts samples, or NAME=none for a constant fed whole "
    "with every batch (repeatable). Default: inferred from the model's input shapes (axis 0, the "
    "batch axis of a state such as [2, batch, 128]; a fully fixed input given at exactly its shape "
    "is a constant)."
)

_MEASURE_OPTIONS = (
    _enum_option(
        "--reduction",
        Reduction,
        PruneConfig.reduction,
        "How relative contributions are reduced over calibration points: max (the paper's worst "
        "case), mean (per-sample average, worst sample), expected (average).",
    ),
    _enum_option(
        "--terms",
        Terms,
        PruneConfig.terms,
        "A weight's share of a point: absolute (|w a| in the row's absolute mass) or signed "
        "(the spec: within each sign part, inputs split by sign).",
    ),
    _enum_option(
        "--allocation",
        Allocation,
        PruneConfig.allocation,
        "How the target is split across layers: global (one threshold over all scores), sipp "
        "(SiPP's shared error bound eps; sipp-det), error (each layer's measured output-error "
        "curve, least summed error), output (those curves weighted by each layer's measured effect "
        "on the model's outputs). sipp-rand/-hybrid always use their own sampling bound.",
    ),
    _enum_option(
        "--ranking",
        Ranking,
        PruneConfig.ranking,
        "sipp-det with the error allocation: measured (prune each layer in SiPP's order or "
        "Wanda's |w|*||a|| order, whichever measured the lower error at its count) or own "
        "(SiPP's order only).",
    ),
    click.option(
        "--layer-floor",
        type=click.FloatRange(0.0, 1.0),
        default=PruneConfig.layer_floor,
        show_default=True,
        help="sipp-det/magnitude: every weight tensor keeps at least this fraction of the average kept "
        "fraction, so one global threshold cannot wipe out a layer. 0: off.",
    ),
    click.option(
        "--max-points",
        type=click.IntRange(min=1),
        default=PruneConfig.max_points,
        show_default=True,
        help="Calibration points per layer for the max reduction (conv positions/tokens beyond it are "
        "sampled per batch).",
    ),
    click.option(
        "--mask-input",
        default=PruneConfig.mask_input,
        show_default=True,
        help="Input marking padding tokens with 0 (e.g. attention_mask); padding is not calibration "
        "data. auto: detect by name; none: off.",
    ),
    click.option(
        "--seed",
        type=int,
        default=PruneConfig.seed,
        show_default=True,
        help="Seed of sipp-rand/sipp-hybrid and of the --max-points subsets.",
    ),
    click.option("--max-samples", type=int, default=None, help="Use at most N calibration samples."),
    click.option(
        "--batch-size",
        type=int,
        default=PruneConfig.batch_size,
        show_default=True,
        help="Samples per ONNX Runtime run.",
    ),
    click.option(
        "--batch-axis",
        "batch_axes",
        multiple=True,
        metavar="NAME=AXIS",
        help=_BATCH_AXIS_HELP,
    ),
    click.option(
        "--provider",
        type=click.Choice([p.value for p in Provider]),
        default=PruneConfig.provider.value,
        show_default=True,
        help="ONNX Runtime execution provider for the calibration pass.",
    ),
    click.option(
        "--exclude",
        multiple=True,
        metavar="REGEX",
        help="Leave nodes whose name matches REGEX unpruned (repeatable).",
    ),
    click.option(
        "--op-types",
        default=",".join(PRUNABLE_OP_TYPES),
        show_default=True,
        callback=_split_op_types,
        help="Op types to prune.",
    ),
    click.option(
        "--pattern",
        default="unstructured",
        show_default=True,
        help="unstructured, or N:M (e.g. 2:4 for NVIDIA sparse tensor cores via TensorRT): every M "
        "consecutive weights along each layer's input channels keep the N with the highest score; "
        "sets the sparsity of each layer it fits to 1 - N/M (--sparsity(ies) not used) and leaves "
        "the others unpruned. `sipp-onnx check` verifies a model.",
    ),
)


def _measure_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Apply `_MEASURE_OPTIONS` (in --help order)."""
    for option in reversed(_MEASURE_OPTIONS):
        command = option(command)
    return command


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("calibration", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Pruned model path [default: MODEL.pruned.onnx beside the input].",
)
@click.option(
    "--sparsity",
    type=float,
    default=0.5,
    show_default=True,
    help="Fraction of the prunable weights set to zero, in [0, 1).",
)
@click.option(
    "--method",
    type=click.Choice([m.value for m in Method]),
    default=PruneConfig.method.value,
    show_default=True,
    help="Which weights to keep.",
)
@click.option(
    "--refit",
    type=click.Choice([r.value for r in Refit]),
    default=PruneConfig.refit.value,
    show_default=True,
    help="After the mask: none (keep values), bias (undo each output's mean shift through its "
    "bias), obs (re-solve the kept weights for the least output error, then the bias).",
)
@click.option(
    "--sequential",
    is_flag=True,
    help="Measure each layer on the outputs of the already pruned earlier layers and refit it to "
    "the dense model's outputs (one calibration pass per layer depth).",
)
@click.option(
    "--store",
    type=click.Choice(["dense", "sparse"]),
    default="dense",
    show_default=True,
    help="sparse: write pruned initializers as ONNX sparse initializers where that is smaller "
    "(below a third non-zero for float32). ONNX Runtime densifies them on load: a smaller file, "
    "not a faster model.",
)
@click.option(
    "--structured",
    is_flag=True,
    help="Remove whole channels, neurons and attention heads (graph surgery: a smaller, faster model) "
    "until --sparsity of the weight layers' MACs (or --target params) is gone.",
)
@click.option(
    "--target",
    type=click.Choice(list(TARGETS)),
    default="macs",
    show_default=True,
    help="--structured: what --sparsity counts.",
)
@click.option(
    "--score",
    type=click.Choice(list(SCORES)),
    default="pfp",
    show_default=True,
    help="--structured: channel importance: pfp (max relative contribution at its consumers), l1 "
    "(filter norm), act (activation variance x consumer column norm, FLAP).",
)
@click.option(
    "--compensation",
    type=click.Choice(list(COMPENSATIONS)),
    default="refit",
    show_default=True,
    help="--structured: refit (least squares of each consumer's kept inputs), bias (fold the removed "
    "channels' mean into the bias), none.",
)
@click.option(
    "--channel-multiple",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="--structured: kept channel counts are multiples of this (heads count whole).",
)
@click.option(
    "--latency",
    is_flag=True,
    help="--structured: measure ONNX Runtime latency before and after (batch 1 and the calibration "
    "batch, median of 20 runs).",
)
@_measure_options
@click.option(
    "--report",
    "report_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the full report as JSON to this path.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--no-verify", is_flag=True, help="Skip running the pruned model in ONNX Runtime.")
@click.option("-q", "--quiet", is_flag=True, help="No progress, no table; errors only.")
@click.option("-v", "--verbose", is_flag=True, help="Log every stage.")
def prune(
    model: Path,
    calibration: Path,
    output: Path | None,
    sparsity: float,
    method: str,
    refit: str,
    sequential: bool,
    store: str,
    structured: bool,
    target: str,
    score: str,
    compensation: str,
    channel_multiple: int,
    latency: bool,
    report_path: Path | None,
    overwrite: bool,
    no_verify: bool,
    quiet: bool,
    verbose: bool,
    **measure: Any,
) -> None:
    """Prune MODEL using CALIBRATION data (.npz keyed by input name, .npy, or a directory)."""
    _setup_logging(verbose, quiet)
    written: list[Path] = []
    if structured:
        options = (target, score, compensation, channel_multiple, latency)
        _run(
            lambda: _prune_structured(
                model,
                calibration,
                output,
                sparsity,
                options,
                report_path,
                overwrite,
                no_verify,
                quiet,
                measure,
                written,
            ),
            written,
        )
        return

    def body() -> None:
        config = PruneConfig(
            sparsity=sparsity,
            method=Method(method),
            refit=Refit(refit),
            sequential=sequential,
            verify=not no_verify,
            store=store,
            **measure,
        )
        out = output if output is not None else _default_output(model)
        _check_report_path(model, out, report_path, overwrite)
        result = prune_model(
            model, calibration, config, output=out, overwrite=overwrite, progress=_Progress(not quiet)
        )
        written.extend(result.written)
        report = result.report
        _write_report(report, report_path, written)
        if quiet:
            return
        click.echo(report.format_table())
        click.echo()
        split = report.allocation in ("global", "sipp", "error", "output")  # not 'pattern' or 'sampling'
        label = (
            report.method
            + (f" ({report.reduction}, {report.terms} terms)" if report.method.startswith("sipp") else "")
            + (f", {report.max_times_kernel} kernel" if report.max_times_kernel else "")
            + (f", pattern {report.pattern}" if report.pattern != "unstructured" else "")
            + (f", allocation {report.allocation}" if split else "")
            + (f", refit {report.refit}" if report.refit != "none" else "")
            + (", sequential" if report.sequential else "")
        )
        click.echo(
            f"{label}: sparsity {report.sparsity_achieved:.2%} "
            f"(target {report.sparsity_target:.2%}), {report.params_kept:,} of {report.params_total:,} "
            f"prunable weights kept"
        )
        if report.census is not None:
            click.echo(report.census.share_line())
        if report.provider:
            calib = f"{report.samples} calibration samples"
            if report.mask_input:
                calib += f", padding masked by {report.mask_input!r}"
            if report.recommended_samples:
                calib += f" (recommended >= {report.recommended_samples})"
            click.echo(f"provider: {report.provider}; {calib}")
        _echo_layout(report.batch_axes, report.per_sample_inputs)
        for line in report.branches:
            click.echo(line)
        for check in report.verification:
            click.echo(
                f"output {check.output!r}: relative L2 error {check.rel_l2_error:.4g}, "
                f"cosine {check.cosine:.6f} vs the original (first calibration batch)"
            )
        click.echo("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items()))
        if report.size_before is not None:
            click.echo(describe_sizes(report.size_before, report.size_after))
        for layer in report.layers:
            if layer.pattern.startswith("not applied"):
                click.echo(f"{','.join(layer.nodes)}: pattern {layer.pattern}")
        if report.skipped:
            click.echo(f"{len(report.skipped)} candidate(s) not pruned; see `sipp-onnx inspect`")
        click.echo(f"wrote {result.output}")

    _run(body, written)


def _prune_structured(
    model: Path,
    calibration: Path,
    output: Path | None,
    sparsity: float,
    options: tuple[str, str, str, int, bool],
    report_path: Path | None,
    overwrite: bool,
    no_verify: bool,
    quiet: bool,
    measure: dict[str, Any],
    written: list[Path],
) -> None:
    """`prune --structured`: the structured pipeline with the shared options that apply to it."""
    if measure.get("pattern", "unstructured") != "unstructured":
        raise ConfigError("--structured removes whole channels; --pattern N:M is for unstructured pruning")
    target, score, compensation, multiple, latency = options
    config = StructuredConfig(
        sparsity=sparsity,
        target=target,
        score=score,
        compensation=compensation,
        channel_multiple=multiple,
        max_samples=measure["max_samples"],
        batch_size=measure["batch_size"],
        batch_axes=measure["batch_axes"],
        max_points=measure["max_points"],
        provider=Provider(measure["provider"]),
        mask_input=measure["mask_input"],
        exclude=measure["exclude"],
        seed=measure["seed"],
        verify=not no_verify,
        latency=latency,
    )
    out = output if output is not None else _default_output(model)
    _check_report_path(model, out, report_path, overwrite)
    result = prune_structured(
        model, calibration, config, output=out, overwrite=overwrite, progress=_Progress(not quiet)
    )
    written.extend(result.written)
    _write_report(result.report, report_path, written)
    if quiet:
        return
    report = result.report
    click.echo(report.format_table())
    click.echo()
    for line in report.summary():
        click.echo(line)
    click.echo(f"provider: {report.provider}; {report.samples} calibration samples")
    _echo_layout(report.batch_axes)
    for check in report.verification:
        click.echo(
            f"output {check.output!r}: relative L2 error {check.rel_l2_error:.4g}, "
            f"cosine {check.cosine:.6f} vs the original (first calibration batch)"
        )
    click.echo("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items()))
    if report.size_before is not None:
        click.echo(describe_sizes(report.size_before, report.size_after))
    click.echo(f"wrote {result.output}")


def _echo_layout(batch_axes: dict[str, int | None], per_sample: dict[str, list[int]] | None = None) -> None:
    """One line per calibration input not batched on axis 0 (inferred or --batch-axis), and per
    input given one per sample."""
    for line in describe_layout(batch_axes) + describe_per_sample(per_sample or {}):
        click.echo(line)


def _check_report_path(model: Path, out: Path, report_path: Path | None, overwrite: bool) -> None:
    if report_path is not None:
        check_output_path(model, report_path, overwrite, external=False)
        if report_path.resolve() in (out.resolve(), out.resolve().with_name(out.name + ".data")):
            raise OutputError(f"--report {str(report_path)!r} is the pruned model's own path")


def _write_report(report: Any, report_path: Path | None, written: list[Path]) -> None:
    """Write the JSON report; model and report are one result: all or nothing."""
    if report_path is None:
        return
    try:
        report.write_json(report_path)
    except BaseException:
        _remove(written)
        written.clear()
        raise
    written.append(report_path)


def _default_output(model: Path) -> Path:
    name = model.name[: -len(".onnx")] if model.name.endswith(".onnx") else model.name
    return model.with_name(f"{name}.pruned.onnx")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--exclude", multiple=True, metavar="REGEX", help="As for prune.")
@click.option(
    "--op-types",
    default=",".join(PRUNABLE_OP_TYPES),
    show_default=True,
    callback=_split_op_types,
    help="As for prune.",
)
@click.option("--structured", is_flag=True, help="List the channel groups (structured pruning) instead.")
def inspect(
    model: Path, as_json: bool, exclude: tuple[str, ...], op_types: tuple[str, ...], structured: bool
) -> None:
    """List the prunable layers of MODEL and the candidates that are skipped, with the reason."""
    _setup_logging(False, False)

    def body() -> None:
        PruneConfig(exclude=exclude, op_types=op_types)  # validates the options
        if structured:
            groups = inspect_structured(model, exclude)
            click.echo(json.dumps(groups.to_dict(), indent=2) if as_json else groups.format_table())
            return
        report = inspect_model(model, op_types, exclude)
        if as_json:
            click.echo(json.dumps(report.to_dict(), indent=2))
        else:
            click.echo(report.format_table())

    _run(body)


def _parse_pattern(_ctx: click.Context, _param: click.Parameter, value: str) -> Pattern:
    try:
        pattern = parse_pattern(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if pattern is None:
        raise click.BadParameter(f"expected an N:M pattern such as 2:4, got {value!r}")
    return pattern


@main.command("check")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--pattern",
    required=True,
    callback=_parse_pattern,
    metavar="N:M",
    help="At most N non-zeros in every M consecutive input channels, e.g. 2:4 (TensorRT's sparse "
    "tensor cores).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def check_command(model: Path, pattern: Pattern, as_json: bool) -> None:
    """Check whether each prunable layer of MODEL follows an N:M structured-sparsity pattern:
    for each output channel and each kernel position, every M consecutive input channels hold at
    most N non-zeros.

    Layers whose input channels are not a multiple of M are not applicable. Exit status 4 when a
    layer that should comply does not.
    """
    _setup_logging(False, False)

    def body() -> int:
        report = check_pattern(model, pattern)
        if as_json:
            click.echo(json.dumps(report.to_dict(), indent=2))
        else:
            click.echo(report.format_table())
        if not report.ok:
            click.echo(f"fail: {len(report.violating)} layer(s) violate {pattern.label}", err=True)
            return 4
        return 0

    sys.exit(_run(body))


@main.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option(
    "--compare",
    type=click.Path(path_type=Path),
    default=None,
    help="A pruned model to compare with MODEL on the same data.",
)
@click.option("--labels", "labels_key", default="labels", show_default=True, help="Key of the labels array.")
@click.option("--output", "output_name", default=None, help="Model output to score [default: the first].")
@click.option(
    "--max-drop",
    type=float,
    default=None,
    help="Exit with status 3 when the accuracy drop exceeds this many points.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--batch-axis", "batch_axes", multiple=True, metavar="NAME=AXIS", help=_BATCH_AXIS_HELP)
@click.option("--provider", type=click.Choice([p.value for p in Provider]), default="auto", show_default=True)
@click.option(
    "--latency",
    is_flag=True,
    help="With --compare: ONNX Runtime CPU latency of both models at batch 1 and 32 (median of 20 runs, "
    "measured alternately).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def eval_command(
    model: Path,
    data: Path,
    compare: Path | None,
    labels_key: str,
    output_name: str | None,
    max_drop: float | None,
    batch_size: int,
    batch_axes: tuple[str, ...],
    provider: str,
    latency: bool,
    as_json: bool,
) -> None:
    """Accuracy of MODEL on DATA (.npz with the inputs and a labels array), and with --compare the
    fidelity of a pruned model to MODEL and the accuracy it lost."""
    _setup_logging(False, False)

    def body() -> int:
        if max_drop is not None and compare is None:
            raise ConfigError("--max-drop needs --compare PRUNED")
        if latency and compare is None:
            raise ConfigError("--latency needs --compare PRUNED")
        axes = dict(batch_axis_items(batch_axes))
        report = evaluate(
            model, data, compare, labels_key, output_name, batch_size, Provider(provider), batch_axes=axes
        )
        if latency and compare is not None:
            report = dataclasses.replace(report, latency=_eval_latency(model, data, compare, axes))
        if max_drop is not None and report.compare is not None and report.compare.accuracy_drop is None:
            raise ConfigError(f"--max-drop needs labels, and DATA has no {labels_key!r} array")
        if as_json:
            click.echo(json.dumps(report.to_dict(), indent=2))
        else:
            click.echo(_format_eval(report))
        drop = report.compare.accuracy_drop if report.compare is not None else None
        if max_drop is not None and drop is not None and drop > max_drop:
            click.echo(f"fail: accuracy drop {drop:.2f} points exceeds --max-drop {max_drop}", err=True)
            return 3
        return 0

    code = _run(body)
    sys.exit(code)


def _eval_latency(
    model: Path, data: Path, compare: Path, batch_axes: dict[str, int | None]
) -> dict[str, Any]:
    """Latency of MODEL and the compared model, fed from DATA's first samples."""
    specs = model_inputs(load_model(model))
    with np.load(data, allow_pickle=False) as npz:
        arrays = {spec.name: npz[spec.name] for spec in specs if spec.name in npz.files}
    calib = open_calibration(arrays, specs, 32, batch_axes)
    sample = next(calib.batches(32))
    before, after = compare_latency(model, compare, sample, (1, 32), base_dir=model.parent, axes=calib.axes)
    return {
        "batch": [b.batch for b in before],
        "model_seconds": [b.seconds for b in before],
        "compare_seconds": [a.seconds for a in after],
        "runs": [a.runs for a in after],
    }


def _format_eval(report: EvalReport) -> str:
    lines = [f"samples: {report.model.samples} (output {report.output!r})"]
    if report.model.accuracy is not None:
        lines.append(f"accuracy: {report.model.accuracy:.2%}")
    c = report.compare
    if c is not None:
        if c.accuracy is not None and c.accuracy_drop is not None:
            lines.append(f"compared accuracy: {c.accuracy:.2%} (drop {c.accuracy_drop:+.2f} points)")
        if c.top1_agreement is not None:
            lines.append(f"top-1 agreement: {c.top1_agreement:.2%}")
        lines.append(f"relative L2 error: {c.rel_l2_error:.4g}; mean cosine similarity: {c.cosine:.6f}")
    if report.latency:
        lat = report.latency
        for batch, a, b in zip(lat["batch"], lat["model_seconds"], lat["compare_seconds"], strict=True):
            lines.append(
                f"ONNX Runtime CPU latency, batch {batch}: {a * 1e3:.2f} ms -> {b * 1e3:.2f} ms "
                f"({a / b:.2f}x)"
            )
    return "\n".join(lines)


@main.command("sweep")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("calibration", type=click.Path(path_type=Path))
@click.argument("evaluation", type=click.Path(path_type=Path))
@click.option(
    "--methods",
    default="sipp-det,sipp-det+none,sipp-hybrid,magnitude,wanda",
    show_default=True,
    help="Comma-separated METHOD[+REFIT][@ALLOCATION] (e.g. sipp-det+none,magnitude+obs,"
    "sipp-det@error); a bare METHOD uses --refit and --allocation.",
)
@click.option("--sparsities", default="0.3,0.5,0.7,0.9", show_default=True, help="Comma-separated targets.")
@click.option(
    "--refit",
    type=click.Choice([r.value for r in Refit]),
    default=PruneConfig.refit.value,
    show_default=True,
    help="Refit of the methods given without one.",
)
@click.option(
    "--metric",
    type=click.Choice(["accuracy", "top1_agreement", "cosine"]),
    default=None,
    help="[default: accuracy with labels, else top-1 agreement for classifiers, else cosine]",
)
@click.option("--labels", "labels_key", default="labels", show_default=True, help="Key of the labels array.")
@click.option("--output", "output_name", default=None, help="Model output to score [default: the first].")
@_measure_options
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Directory for sweep.json/csv/png.",
)
@click.option("--overwrite", is_flag=True, help="Replace sweep.json/csv/png already in OUT.")
@click.option("-q", "--quiet", is_flag=True, help="No progress; the table only.")
def sweep_command(
    model: Path,
    calibration: Path,
    evaluation: Path,
    methods: str,
    sparsities: str,
    refit: str,
    metric: str | None,
    labels_key: str,
    output_name: str | None,
    out_dir: Path,
    overwrite: bool,
    quiet: bool,
    **measure: Any,
) -> None:
    """Prune MODEL at every sparsity with every method; evaluate each result on EVALUATION.

    One calibration pass serves every point. Writes OUT/sweep.json, sweep.csv and sweep.png.
    """
    _setup_logging(False, quiet)

    def body() -> None:
        variants = [Variant.parse(m, Refit(refit)) for m in methods.split(",") if m.strip()]
        try:
            targets = [float(s) for s in sparsities.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--sparsities must be comma-separated numbers, got {sparsities!r}") from None
        config = PruneConfig(**measure)
        if out_dir.exists() and not out_dir.is_dir():
            raise OutputError(f"--out {str(out_dir)!r} exists and is not a directory")
        taken = [n for n in SWEEP_FILES if (out_dir / n).exists()]
        if taken and not overwrite:
            raise OutputError(f"{str(out_dir / taken[0])!r} already exists (use --overwrite to replace it)")
        total = len(variants) * len(targets)
        done = [0]
        progress = _Progress(not quiet)

        def point_done(point: SweepPoint) -> None:
            done[0] += 1
            progress("sweep", done[0], total)

        result = sweep(
            model,
            calibration,
            evaluation,
            variants,
            targets,
            config,
            metric=metric,
            labels_key=labels_key,
            output_name=output_name,
            progress=progress,
            point_done=point_done,
        )
        written = write_sweep(result, out_dir)
        click.echo(result.format_table())
        click.echo(
            f"{result.calibration_passes} calibration pass ({result.prepare_seconds:.2f}s) for "
            f"{len(result.points)} points"
        )
        if not any(p.name == "sweep.png" for p in written):
            click.echo("no plot: matplotlib is not installed (pip install 'sipp-onnx[plot]')")
        click.echo("wrote " + ", ".join(str(p) for p in written))

    _run(body)


if __name__ == "__main__":  # pragma: no cover
    main()
