"""Calibration data: loading, validation against the model, and batching.

Accepted forms (the conventions of ModelOpt and Polygraphy):
- `.npz` keyed by the model's input names; a single-input model also accepts a file holding
  exactly one array under any key. Arrays that no input uses are reported.
- `.npy` for a single-input model.
- a directory of such files (read one file at a time, in name order).
- from Python: a mapping of input name -> array; an iterable of feed dicts, or an object with ONNX
  Runtime's `CalibrationDataReader` interface (`get_next()` -> a feed dict, None at the end),
  each feed one batch (see `_open_feeds`).

Each input has a batch axis, the axis that counts samples, inferred from the model's declared
input shapes (see `resolve_batch_axes`): axis 0, unless the model fixes axis 0 (a recurrent
state `[2, batch, 128]`) and another axis is the batch dimension. An input whose declared shape is
fully fixed and whose array has exactly that shape (a rank-0 sample rate) is a constant: fed
whole with every batch. `batch_axes` (CLI `--batch-axis NAME=AXIS|none`) overrides the inference.
Everything is validated (names, ranks, fixed dimensions, dtypes, NaN/inf, sample counts along the
batch axes) before the model runs; files are opened with `allow_pickle=False`.

Files are streamed: the arrays of a `.npy`, or of an `.npz` (stored or compressed), are read a
block of samples at a time, once to validate them and once per calibration pass, so memory does
not grow with the number of samples (256 ResNet-50 inputs are 154 MB). Arrays that cannot be read
row by row (Fortran order, a newer header version) are loaded whole, as before; so is a file
with a constant input or an input batched on another axis than the first (their samples are not
contiguous in the file).

Inputs given one per sample: an array whose rank is its input's declared rank + 1 holds one full
input per sample along a new leading axis (silero-vad's `state` `[2, N, 128]` given as
`[N, 2, 1, 128]`, its rank-0 `sr` as `[N]`), as pipelines that record a model's inputs run by run
store them. The ranks decide the reading (one fitting neither is an error naming the input). Such
data is fed one sample per run: those arrays give `arr[i]`, the ordinary arrays their batch-1
slice along their batch axis, constants stay whole. `batch_axes` still name the batch axis of
each input (of each sample's input for these arrays): they decide the slicing, not the reading.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, cast

import numpy as np

from .errors import CalibrationError, ConfigError
from .modelio import InputSpec

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
BatchAxes = Mapping[str, int | None]
"""Input name -> the axis that counts its samples; None: a constant input, fed whole with every
batch. An input not named has its samples on axis 0."""


class FeedReader(Protocol):
    """ONNX Runtime's `CalibrationDataReader` interface: one feed dict per call, None at the end."""

    def get_next(self) -> Mapping[str, Any] | None: ...


CalibrationSource = str | os.PathLike[str] | Mapping[str, Any] | Iterable[Mapping[str, Any]] | FeedReader
"""What calibration (and evaluation) data may be: a .npz/.npy file or a directory of them, a
mapping input name -> array, an iterable of feed dicts, or a reader (see `open_calibration`)."""


def take_samples(feed: Mapping[str, np.ndarray], axes: BatchAxes, start: int, stop: int) -> Arrays:
    """Samples `start:stop` of every batched input (constants and rank-0 arrays as they are)."""
    out: Arrays = {}
    for name, value in feed.items():
        axis = axes.get(name, 0)
        if axis is None or value.ndim == 0:
            out[name] = value
        elif axis == 0:
            out[name] = value[start:stop]
        else:  # one contiguous copy, reused by every consumer of the batch
            out[name] = np.ascontiguousarray(value[(slice(None),) * axis + (slice(start, stop),)])
    return out


def count_samples(feed: Mapping[str, np.ndarray], axes: BatchAxes) -> int:
    """Samples in a feed: the batch-axis size of its first batched input."""
    for name, value in feed.items():
        axis = axes.get(name, 0)
        if axis is not None and value.ndim > axis:
            return int(value.shape[axis])
    raise CalibrationError(f"no input of the feed {sorted(feed)} carries samples")


def repeat_samples(feed: Mapping[str, np.ndarray], axes: BatchAxes, n: int) -> Arrays:
    """A feed of exactly `n` samples, repeating the feed's own samples as needed."""
    have = count_samples(feed, axes)
    out: Arrays = {}
    for name, value in feed.items():
        axis = axes.get(name, 0)
        if axis is None or value.ndim == 0:
            out[name] = value
            continue
        reps = [1] * value.ndim
        reps[axis] = -(-n // have)
        out[name] = take_samples({name: np.tile(value, reps)}, axes, 0, n)[name]
    return out


def _join(parts: list[Arrays], axes: BatchAxes) -> Arrays:
    """Blocks of samples joined along each input's batch axis (constants: the first block's)."""
    out: Arrays = {}
    for name, first in parts[0].items():
        axis = axes.get(name, 0)
        out[name] = first if axis is None else np.concatenate([p[name] for p in parts], axis=axis)
    return out


@dataclass
class _Chunk:
    """One calibration file (or in-memory mapping): how to read it and how many samples it has."""

    label: str
    load: Callable[[], Arrays]
    samples: int
    cached: Arrays | None = None
    stream: Callable[[int, int], Iterator[Arrays]] | None = None
    """`stream(size, take)`: validated blocks of `size` samples of the first `take`, read from
    the file in order; None when the chunk is loaded whole."""

    def arrays(self) -> Arrays:
        return self.cached if self.cached is not None else self.load()

    def blocks(self, size: int, take: int, axes: BatchAxes) -> Iterator[Arrays]:
        if self.stream is not None:
            yield from self.stream(size, take)
            return
        arrays = self.arrays()
        for start in range(0, take, size):
            yield take_samples(arrays, axes, start, min(start + size, take))


@dataclass
class CalibrationData:
    """Validated calibration data, streamed in batches."""

    inputs: tuple[str, ...]
    chunks: list[_Chunk]
    samples: int
    """Samples that will be used (after --max-samples)."""
    available: int
    """Samples present in the data."""
    unused_arrays: tuple[str, ...] = ()
    fixed_batch: int | None = None
    """Set when the model fixes its batch dimension; batches then have exactly this size."""
    warnings: list[str] = field(default_factory=list)
    axes: dict[str, int | None] = field(default_factory=dict)
    """Every fed input's batch axis in the feeds (None: constant, fed whole with every batch)."""
    per_sample: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Inputs given one per sample (array rank = input rank + 1): name -> the shape of one
    sample's input. When any is, every feed holds one sample (`fixed_batch` is 1)."""
    spill: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)
    """The temporary copy of data read from an iterable or a reader (see `_open_feeds`)."""

    @property
    def layout(self) -> dict[str, int | None]:
        """The inputs whose samples are not on axis 0 (batch axis, or None for a constant), but
        for those given one per sample (`per_sample`)."""
        return {n: axis for n, axis in self.axes.items() if axis != 0 and n not in self.per_sample}

    def count(self, feed: Mapping[str, np.ndarray]) -> int:
        """Samples in one of this data's feeds (along the batch axes)."""
        return 1 if self.per_sample else count_samples(feed, self.axes)

    def close(self) -> None:
        """Remove the temporary copy of data read from an iterable or a reader (also done when
        this object is garbage collected); `batches` cannot be read after."""
        if self.spill is not None:
            self.spill.cleanup()
            self.spill = None

    def batches(self, batch_size: int) -> Iterator[Arrays]:
        """Feed dicts of at most `batch_size` samples (exactly `fixed_batch` when set).

        With a fixed batch, samples left over at the end of one file are joined with the start
        of the next, so only the last `samples % fixed_batch` samples go unused (and warned).
        Data given one per sample is fed one sample per feed, read `batch_size` at a time.
        """
        if self.per_sample:
            yield from self._single_samples(batch_size)
            return
        size = self.fixed_batch or batch_size
        left = self.samples
        pending: list[Arrays] = []
        pending_n = 0
        for chunk in self.chunks:
            if left <= 0:
                break
            take = min(chunk.samples, left)
            left -= take
            for block in chunk.blocks(size, take, self.axes):
                block = {name: block[name] for name in self.inputs}
                if not self.fixed_batch:
                    yield block
                    continue
                pending.append(block)
                pending_n += self.count(block)
                if pending_n < size:
                    continue
                joined = _join(pending, self.axes)
                full = pending_n - pending_n % size
                for start in range(0, full, size):
                    yield take_samples(joined, self.axes, start, start + size)
                pending = [take_samples(joined, self.axes, full, pending_n)]
                pending_n -= full

    def _single_samples(self, block: int) -> Iterator[Arrays]:
        """One sample per feed: `arr[i]` of the inputs given one per sample, the batch-1 slice of
        the others along their batch axis, constants whole."""
        axes = _array_axes(self.axes, self.per_sample)
        left = self.samples
        for chunk in self.chunks:
            if left <= 0:
                break
            take = min(chunk.samples, left)
            left -= take
            for part in chunk.blocks(block, take, axes):
                for i in range(count_samples(part, axes)):
                    yield {
                        name: part[name][i, ...]  # a 0-d array, not a NumPy scalar, for rank 0
                        if name in self.per_sample
                        else take_samples({name: part[name]}, axes, i, i + 1)[name]
                        for name in self.inputs
                    }

    def n_batches(self, batch_size: int) -> int:
        if self.fixed_batch:
            return self.samples // self.fixed_batch
        total, left = 0, self.samples
        for chunk in self.chunks:
            take = min(chunk.samples, left)
            total += -(-take // batch_size)
            left -= take
        return total


def _read_file(path: Path) -> Arrays:
    """All arrays of a .npz / .npy file, as CalibrationError on any problem."""
    try:
        if path.suffix == ".npy":
            arrays = {"": np.load(path, allow_pickle=False)}
        else:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
    except ValueError as exc:
        if "Object arrays" in str(exc):
            raise CalibrationError(
                f"{path}: holds object (pickled) arrays, which are not loaded for safety; "
                "save plain numeric arrays"
            ) from None
        # NumPy takes any file that is neither a zip nor a .npy for a pickle ("Cannot load file
        # containing pickled data ..." before 2.x, "This file contains pickled (object) data" since)
        if "pickled" in str(exc):
            raise CalibrationError(
                f"{path}: cannot read as .npy/.npz: not a NumPy file (loading it would mean unpickling)"
            ) from None
        raise CalibrationError(f"{path}: cannot read as .npy/.npz: {exc}") from None
    except Exception as exc:  # zipfile.BadZipFile, OSError, EOFError, ...
        raise CalibrationError(f"{path}: cannot read as .npy/.npz: {exc or type(exc).__name__}") from None
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray):  # NumPy returns a member that is not .npy as bytes
            raise CalibrationError(f"{path}: member {key!r} is not a NumPy array (.npy); save with np.savez")
    return arrays


_VALIDATE_BLOCK = 256
"""Samples per read when a streamed file is validated."""


def _header(f: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the .npy data that follows in `f`; ValueError when it cannot be read
    row by row (another header version, Fortran order, objects, no sample axis)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"npy format {version}")
    if fortran or dtype.hasobject or len(shape) == 0:
        raise ValueError("not streamable")
    return tuple(shape), dtype


def _layout(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]] | None:
    """Shape and dtype of every array of a .npy/.npz file from the headers alone, or None when
    some array cannot be streamed (the file is then loaded whole, with its usual errors)."""
    try:
        if path.suffix == ".npy":
            with open(path, "rb") as f:
                return {"": _header(f)}
        out = {}
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if not name.endswith(".npy"):
                    return None
                with z.open(name) as f:
                    out[name[: -len(".npy")]] = _header(f)
        return out
    except Exception:  # noqa: BLE001 - any unreadable file takes the whole-load path
        return None


def _read_blocks(path: Path, keys: list[str], size: int, take: int) -> Iterator[Arrays]:
    """The first `take` samples of the arrays `keys` of a .npy/.npz file, `size` at a time."""
    with contextlib.ExitStack() as stack:
        files: dict[str, IO[bytes]]
        if path.suffix == ".npy":
            files = {"": stack.enter_context(open(path, "rb"))}
        else:
            archive = stack.enter_context(zipfile.ZipFile(path))
            files = {key: stack.enter_context(archive.open(key + ".npy")) for key in keys}
        layouts = {key: _header(f) for key, f in files.items()}
        for start in range(0, take, size):
            n = min(size, take - start)
            block = {}
            for key, f in files.items():
                shape, dtype = layouts[key]
                buffer = bytearray(n * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
                view, filled = memoryview(buffer), 0
                while filled < len(buffer):
                    got = cast(io.BufferedIOBase, f).readinto(view[filled:])
                    if not got:
                        raise CalibrationError(f"{path}: array {key!r} ends early (truncated file)")
                    filled += got
                block[key] = np.frombuffer(buffer, dtype=dtype).reshape(n, *shape[1:])
            yield block


def _streamed_chunk(
    path: Path,
    layout: dict[str, tuple[tuple[int, ...], np.dtype]],
    specs: list[InputSpec],
    axes: BatchAxes,
    per_sample: Collection[str] = (),
) -> tuple[_Chunk, list[str], list[str], list[str]]:
    """A chunk that reads `path` block by block, validated once in full before it is used: the
    same checks and messages as a whole load (a block that fails is re-checked on the whole file,
    so the message counts and places problems in the file, not in the block). Also returns the
    inputs it feeds, the unused arrays and the cast warnings. Every input it feeds has its
    samples on axis 0 of the file (its batch axis, or the leading axis of one input per sample)."""
    label = str(path)
    mapping, unused = _map_keys(label, list(layout), specs)
    counts = {name: layout[key][0][0] for name, key in mapping.items()}
    if len(set(counts.values())) > 1:
        raise CalibrationError(f"{label}: inputs have different sample counts {counts}")
    samples = next(iter(counts.values()))
    keys = list(mapping.values())

    def stream(size: int, take: int) -> Iterator[Arrays]:
        for block in _read_blocks(path, keys, size, take):
            yield _validated_chunk(label, block, specs, axes, per_sample)[0]

    casts: list[str] = []
    try:
        if samples == 0:  # nothing to stream: the whole-load checks say what is wrong
            _validated_chunk(label, _read_file(path), specs, axes, per_sample)
        for block in _read_blocks(path, keys, _VALIDATE_BLOCK, samples):
            casts = _validated_chunk(label, block, specs, axes, per_sample)[2]
    except CalibrationError:
        _validated_chunk(label, _read_file(path), specs, axes, per_sample)  # the whole-file message
        raise
    load = lambda: _validated_chunk(label, _read_file(path), specs, axes, per_sample)[0]  # noqa: E731
    return _Chunk(label, load, samples, None, stream), list(mapping), unused, casts


def _map_keys(label: str, keys: list[str], specs: list[InputSpec]) -> tuple[dict[str, str], list[str]]:
    """input name -> array key, and the unused keys."""
    required = [s for s in specs if not s.optional]
    names = [s.name for s in specs]
    if not keys:
        raise CalibrationError(f"{label}: holds no arrays")
    if len(required) == 1 and len(keys) == 1 and keys[0] not in names:
        return {required[0].name: keys[0]}, []
    if keys == [""]:  # .npy
        raise CalibrationError(
            f"{label}: a .npy file holds one array, but the model has {len(required)} inputs "
            f"{[s.name for s in required]}; use an .npz keyed by input name"
        )
    missing = [s.name for s in required if s.name not in keys]
    if missing:
        raise CalibrationError(
            f"{label}: has arrays {sorted(keys)}, the model expects {names}; missing {missing}"
        )
    mapping = {name: name for name in names if name in keys}
    return mapping, sorted(k for k in keys if k not in mapping)


# Float types NumPy has only through ml_dtypes (kind 'V'): fed from float arrays.
_NARROW_FLOATS = ("bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")


def _check_array(
    label: str, spec: InputSpec, arr: np.ndarray, batch: int | None = 0, per_sample: bool = False
) -> np.ndarray:
    """Validate one array against its input spec, samples on axis `batch` (None: a constant), or
    with `per_sample` one input per sample on its leading axis (`batch`: the batch axis of each,
    which must then hold one sample); returns it (cast when the kind matches)."""
    where = f"{label}: input {spec.name!r}"
    if arr.dtype == spec.dtype and spec.dtype.name in _NARROW_FLOATS:
        arr = arr.astype(np.float32)  # validated as float32, converted back below
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise CalibrationError(f"{where} has dtype {arr.dtype}; expected {spec.dtype}")
    lead = 1 if per_sample else 0
    held = (
        "one input per sample on the first axis"
        if per_sample
        else "as a constant"
        if batch is None
        else f"with samples on {_axis_name(batch)}"
    )
    if spec.ranked and arr.ndim != len(spec.shape) + lead:
        raise CalibrationError(
            f"{where} has shape {list(arr.shape)} (rank {arr.ndim}); the model expects rank "
            f"{len(spec.shape) + lead} {_dims(spec)} {held}"
        )
    samples_axis = 0 if per_sample else batch
    if samples_axis is not None and (arr.ndim <= samples_axis or arr.shape[samples_axis] == 0):
        raise CalibrationError(f"{where} has no samples on axis {samples_axis} (shape {list(arr.shape)})")
    why = where
    if per_sample:  # say why the array is read so: its rank
        why = f"{where} has shape {list(arr.shape)} (rank {arr.ndim}: one input per sample on its first axis)"
    for axis, (got, want) in enumerate(zip(arr.shape[lead:], spec.shape, strict=False)):
        if per_sample and isinstance(want, int) and want > 0 and got != want:
            raise CalibrationError(f"{why}; each must be {_dims(spec)} (axis {axis} must be {want})")
        if axis != batch and isinstance(want, int) and want > 0 and got != want:
            raise CalibrationError(
                f"{where} has shape {list(arr.shape)}; the model expects {_dims(spec)} "
                f"(axis {axis} must be {want}) {held}"
            )
    if per_sample and batch is not None and batch < len(spec.shape) and arr.shape[1 + batch] != 1:
        raise CalibrationError(
            f"{why}; each must be a batch of one (axis {batch}, its batch axis, is "
            f"{arr.shape[1 + batch]}; or give --batch-axis {spec.name}=none to feed each whole)"
        )
    if arr.dtype.kind == "f":
        _check_finite(where, arr, "NaN/inf values", samples_axis)
    if arr.dtype != spec.dtype:
        kind = "f" if spec.dtype.name in _NARROW_FLOATS else spec.dtype.kind
        if kind != arr.dtype.kind or spec.dtype == np.dtype(object):
            raise CalibrationError(f"{where} has dtype {arr.dtype}; the model expects {spec.dtype}")
        with np.errstate(over="ignore"):
            converted = arr.astype(spec.dtype)
        if converted.dtype.kind == "f":
            _check_finite(where, converted, f"values too large for {spec.dtype}", samples_axis)
        elif not np.array_equal(converted, arr):
            raise CalibrationError(f"{where} has values that do not fit the model's {spec.dtype}")
        arr = converted
    return arr


def _check_finite(where: str, arr: np.ndarray, what: str, batch: int | None = 0) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        if batch is None:
            place = f"at index {tuple(int(i) for i in np.argwhere(bad)[0])}" if arr.ndim else "(a scalar)"
        else:
            place = f"in sample {int(np.argwhere(np.moveaxis(bad, batch, 0))[0][0])}"
        raise CalibrationError(f"{where} has {int(bad.sum())} {what} (first {place})")


def _axis_name(axis: int) -> str:
    return "the first axis" if axis == 0 else f"axis {axis}"


def _dims(spec: InputSpec) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in spec.shape) + "]"


def _validated_chunk(
    label: str,
    arrays: Mapping[str, Any],
    specs: list[InputSpec],
    axes: BatchAxes,
    per_sample: Collection[str] = (),
) -> tuple[Arrays, list[str], list[str]]:
    mapping, unused = _map_keys(label, list(arrays), specs)
    by_name = {s.name: s for s in specs}
    out: Arrays = {}
    casts = []
    for name, key in mapping.items():
        arr = np.asarray(arrays[key])
        checked = _check_array(label, by_name[name], arr, axes.get(name, 0), name in per_sample)
        if checked.dtype != arr.dtype:
            casts.append(f"{label}: input {name!r} cast from {arr.dtype} to {checked.dtype}")
        out[name] = checked
    counts = {}
    for name, a in out.items():
        axis = axes.get(name, 0)
        if name in per_sample:
            counts[f"{name} (one per sample)"] = a.shape[0]
        elif axis is not None:
            counts[name if axis == 0 else f"{name} (axis {axis})"] = a.shape[axis]
    if len(set(counts.values())) > 1:
        raise CalibrationError(f"{label}: inputs have different sample counts {counts}")
    return out, unused, casts


def open_calibration(
    source: CalibrationSource,
    specs: list[InputSpec],
    max_samples: int | None = None,
    batch_axes: BatchAxes | None = None,
) -> CalibrationData:
    """Open and fully validate calibration data for a model with inputs `specs`.

    `source`: a .npz/.npy file or a directory of them, a mapping input name -> array, an
    iterable of feed dicts or a reader with `get_next()` (see `_open_feeds`). `batch_axes`
    overrides the inferred batch axis of the inputs it names (None: a constant); see
    `resolve_batch_axes`. An iterable or reader is copied to a temporary directory, removed by
    `CalibrationData.close()` or when the data is garbage collected."""
    overrides = check_batch_axes(batch_axes or {}, specs)
    if isinstance(source, Mapping):
        return _finish(_open_mapping(source, specs, overrides), specs, max_samples)
    if isinstance(source, (str, os.PathLike)):
        return _finish(_open_files(Path(source), specs, overrides), specs, max_samples)
    if isinstance(source, np.ndarray):
        raise CalibrationError(
            "calibration data is a bare NumPy array; give {input name: array}, a file, "
            "or an iterable of feed dicts"
        )
    if callable(getattr(source, "get_next", None)) or isinstance(source, Iterable):
        return _finish(_open_feeds(source, specs, overrides, max_samples), specs, max_samples)
    raise CalibrationError(
        "calibration data must be a path, a mapping of arrays, an iterable of feed dicts or a "
        f"reader with get_next(); got {type(source).__name__}"
    )


@dataclass
class _Opened:
    """What the readers of each source form hand to `_finish`."""

    chunks: list[_Chunk]
    unused: set[str]
    warnings: list[str]
    fed: list[set[str]]
    """The inputs each chunk feeds."""
    axes: dict[str, int | None]
    per_sample: dict[str, tuple[int, ...]]
    """Inputs given one per sample -> the shape of one sample's input."""
    spill: tempfile.TemporaryDirectory[str] | None = None


def _open_mapping(source: Mapping[str, Any], specs: list[InputSpec], overrides: BatchAxes) -> _Opened:
    given = dict(source)
    label = "calibration data"
    axes, per_sample = _reading(label, {k: np.shape(v) for k, v in given.items()}, specs, overrides)
    arrays, extra, casts = _validated_chunk(label, given, specs, axes, per_sample)
    samples = count_samples(arrays, _array_axes(axes, per_sample))
    chunk = _Chunk(label, lambda: arrays, samples, arrays)
    return _Opened([chunk], set(extra), casts, [set(arrays)], axes, per_sample)


def _open_files(path: Path, specs: list[InputSpec], overrides: BatchAxes) -> _Opened:
    if not path.exists():
        raise CalibrationError(f"calibration data {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy") and p.is_file())
        if not files:
            raise CalibrationError(f"calibration directory {str(path)!r} holds no .npz or .npy files")
    elif path.suffix in (".npz", ".npy"):
        files = [path]
    else:
        raise CalibrationError(f"calibration data {str(path)!r} must be a .npz, a .npy or a directory")
    single = len(files) == 1
    # The first file decides the batch axes (a fully fixed input is a constant when its array
    # has exactly the declared shape) and which inputs are given one per sample; every file is
    # then validated against them.
    first_layout = _layout(files[0])
    first_arrays = _read_file(files[0]) if first_layout is None else None
    shapes = (
        {k: tuple(a.shape) for k, a in first_arrays.items()}
        if first_arrays is not None
        else {k: shape for k, (shape, _) in (first_layout or {}).items()}
    )
    axes, per_sample = _reading(str(files[0]), shapes, specs, overrides)
    array_axes = _array_axes(axes, per_sample)
    opened = _Opened([], set(), [], [], axes, per_sample)
    for index, file in enumerate(files):
        layout = first_layout if index == 0 else _layout(file)
        mapped = _map_keys(str(file), list(layout), specs)[0] if layout is not None else {}
        if layout is not None and all(array_axes.get(name, 0) == 0 for name in mapped):
            chunk, fed_names, extra, casts = _streamed_chunk(file, layout, specs, axes, per_sample)
        else:
            loaded = first_arrays if index == 0 and first_arrays is not None else _read_file(file)
            arrays, extra, casts = _validated_chunk(str(file), loaded, specs, axes, per_sample)

            def load(file: Path = file) -> Arrays:
                return _validated_chunk(str(file), _read_file(file), specs, axes, per_sample)[0]

            chunk = _Chunk(str(file), load, count_samples(arrays, array_axes), arrays if single else None)
            fed_names = list(arrays)
        opened.unused.update(f"{file.name}:{k}" if not single else k for k in extra)
        opened.warnings.extend(casts)
        opened.fed.append(set(fed_names))
        opened.chunks.append(chunk)
    return opened


def iter_feeds(source: Iterable[Any] | FeedReader) -> Iterator[Any]:
    """The feeds of an iterable, or of a reader's `get_next()` until it returns None."""
    get_next = getattr(source, "get_next", None)
    if callable(get_next):
        while (feed := get_next()) is not None:
            yield feed
    else:
        yield from cast(Iterable[Any], source)


def _open_feeds(
    source: Iterable[Any] | FeedReader, specs: list[InputSpec], overrides: BatchAxes, max_samples: int | None
) -> _Opened:
    """Calibration data from an iterable of feed dicts or an ONNX Runtime CalibrationDataReader.

    Each feed is one batch `{input name: array}`, read as one file of a directory would be: the
    same checks (its label `calibration reader: batch I`, I counted from 0), the first feed
    deciding the batch axes and the inputs given one per sample, every feed having to give the
    inputs the first gave. A feed is split into runs of at most `batch_size` samples and never
    joined with the next (unless the model fixes its batch size: then runs are joined to exactly
    that size); feeds given one per sample run one sample at a time. Feeds stop being pulled once
    `max_samples` samples are held, so an endless generator is fine with a limit.

    Why a copy on disk: the pipeline reads the data several times (the If-branch plan, the
    calibration pass, sequential re-passes, the probe, the verification), a generator or reader
    gives it once, and holding every feed in memory would make memory grow with the calibration
    set, which the file readers avoid (256 ResNet-50 inputs are 154 MB; a few thousand, gigabytes).
    So each validated feed is written as it arrives to a temporary directory (one uncompressed
    .npy per input, a disk write at a few GB/s) and read back one feed at a time: memory holds
    about one feed, whatever the number of feeds. The directory goes with the data
    (`CalibrationData.close()`, called by `prune_model`, or garbage collection)."""
    spill = tempfile.TemporaryDirectory(prefix="sipp-onnx-calibration-")
    try:
        opened = _read_feeds(source, specs, overrides, max_samples, Path(spill.name))
    except BaseException:
        spill.cleanup()
        raise
    opened.spill = spill
    return opened


def _read_feeds(
    source: Iterable[Any] | FeedReader,
    specs: list[InputSpec],
    overrides: BatchAxes,
    max_samples: int | None,
    folder: Path,
) -> _Opened:
    opened: _Opened | None = None
    first_keys: list[str] = []
    held = 0
    for index, feed in enumerate(iter_feeds(source)):
        label = f"calibration reader: batch {index}"
        if not isinstance(feed, Mapping):
            raise CalibrationError(f"{label} is not a dict (got {type(feed).__name__})")
        if opened is None:
            shapes = {k: np.shape(v) for k, v in feed.items()}
            axes, per_sample = _reading(label, shapes, specs, overrides)
            opened = _Opened([], set(), [], [], axes, per_sample)
            first_keys = list(_map_keys(label, list(feed), specs)[0].values())
        missing = [key for key in first_keys if key not in feed]
        if missing:
            raise CalibrationError(f"{label} lacks input {missing[0]!r} (batch 0 gave it)")
        arrays, extra, casts = _validated_chunk(label, feed, specs, opened.axes, opened.per_sample)
        if opened.fed and set(arrays) != opened.fed[0]:
            new = sorted(set(arrays) - opened.fed[0])
            raise CalibrationError(f"{label} gives input {new[0]!r}, which batch 0 did not")
        samples = count_samples(arrays, _array_axes(opened.axes, opened.per_sample))
        opened.chunks.append(_Chunk(label, _spilled(folder, index, arrays, label), samples))
        opened.unused.update(extra)
        for line in casts:  # once per input, not once per feed
            line = line.replace(label, "calibration reader", 1)
            if line not in opened.warnings:
                opened.warnings.append(line)
        opened.fed.append(set(arrays))
        held += samples
        if max_samples and held >= max_samples:
            break
    if opened is None:
        raise CalibrationError("calibration reader: gave no batches")
    return opened


def _spilled(folder: Path, index: int, arrays: Arrays, label: str) -> Callable[[], Arrays]:
    """Write a validated feed to `folder` (one .npy per input); returns its loader. Float types
    NumPy knows only through ml_dtypes are stored as unsigned integers of their size."""
    stored = []
    for j, (name, arr) in enumerate(arrays.items()):
        path = folder / f"{index:06d}-{j}.npy"
        plain = arr.view(f"u{arr.dtype.itemsize}") if arr.dtype.kind == "V" else arr
        np.save(path, plain, allow_pickle=False)
        stored.append((name, path, arr.dtype))

    def load() -> Arrays:
        try:
            return {name: np.load(path, allow_pickle=False).view(dtype) for name, path, dtype in stored}
        except FileNotFoundError:
            raise CalibrationError(f"{label}: its temporary copy is gone (the data was closed)") from None

    return load


def _finish(opened: _Opened, specs: list[InputSpec], max_samples: int | None) -> CalibrationData:
    """The sample counts, the batch size the model fixes, the warnings and the log lines."""
    chunks, unused, warnings, axes, per_sample = (
        opened.chunks,
        opened.unused,
        opened.warnings,
        opened.axes,
        opened.per_sample,
    )
    available = sum(c.samples for c in chunks)
    used = min(available, max_samples) if max_samples else available
    fixed = _fixed_batch(specs, axes)
    if per_sample:
        if fixed not in (None, 1):
            raise _closing(
                opened,
                f"the model fixes its batch size to {fixed}, but calibration inputs {sorted(per_sample)} "
                "are given one per sample (fed one sample per run)",
            )
        fixed = 1
    if fixed and used % fixed:
        warnings.append(
            f"the model fixes its batch size to {fixed}: the last {used % fixed} sample(s) are not used"
        )
    if unused:
        warnings.append(f"calibration arrays not used by any model input: {sorted(unused)}")
    if fixed and used < fixed:  # before the warnings: a failed run prints its error line only
        raise _closing(
            opened,
            f"the model fixes its batch size to {fixed} but only {used} calibration sample(s) are given",
        )
    fed = opened.fed
    names = tuple(s.name for s in specs if s.name in fed[0])
    if any(set(f) != set(names) for f in fed):
        raise _closing(opened, "calibration files do not all provide the same model inputs")
    for message in warnings:
        log.warning(message)
    axes = {name: axes.get(name, 0) for name in names}
    data = CalibrationData(
        names, chunks, used, available, tuple(sorted(unused)), fixed, warnings, axes, per_sample, opened.spill
    )
    for line in describe_layout(data.layout) + describe_per_sample(data.per_sample):
        log.info("%s", line)
    return data


def _closing(opened: _Opened, message: str) -> CalibrationError:
    """The error to raise, the temporary copy removed first."""
    if opened.spill is not None:
        opened.spill.cleanup()
    return CalibrationError(message)


def describe_per_sample(per_sample: Mapping[str, Collection[int]]) -> list[str]:
    """One line per input given one per sample (for logs and reports)."""
    return [
        f"calibration input {name!r}: one input per sample ({_shape_text(shape)}), fed one sample per run"
        for name, shape in per_sample.items()
    ]


def _shape_text(shape: Collection[int]) -> str:
    return "[" + ", ".join(["N", *(str(d) for d in shape)]) + "]"


def _array_axes(axes: BatchAxes, per_sample: Collection[str]) -> dict[str, int | None]:
    """The axis that counts samples in the arrays as given: the leading axis of the inputs given
    one per sample, the batch axis of the others."""
    return {name: 0 if name in per_sample else axis for name, axis in axes.items()}


def describe_layout(layout: BatchAxes) -> list[str]:
    """One line per input whose samples are not on axis 0 (for logs and reports)."""
    return [
        f"calibration input {name!r}: constant, fed whole with every batch"
        if axis is None
        else f"calibration input {name!r}: samples on axis {axis}"
        for name, axis in layout.items()
    ]


def _fixed_batch(specs: list[InputSpec], axes: BatchAxes) -> int | None:
    """The batch size the model fixes on a batched input's batch axis (None when dynamic)."""
    for spec in specs:
        axis = axes.get(spec.name, 0)
        if spec.optional or axis is None or len(spec.shape) <= axis:
            continue
        dim = spec.shape[axis]
        if isinstance(dim, int) and dim > 0:
            return dim
    return None


# ----------------------------------------------------------------------------- batch axes


def check_batch_axes(axes: BatchAxes, specs: list[InputSpec]) -> dict[str, int | None]:
    """Validated overrides: every name a model input, every axis within its declared rank
    (negative axes count from the end); ConfigError otherwise."""
    by_name = {s.name: s for s in specs}
    out: dict[str, int | None] = {}
    for name, axis in axes.items():
        if name not in by_name:
            known = ", ".join(by_name) or "none"
            raise ConfigError(f"batch axis for {name!r}: not a model input (inputs: {known})")
        if axis is not None:
            if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
                raise ConfigError(f"batch axis for {name!r} must be an integer or None, got {axis!r}")
            rank = len(by_name[name].shape)
            if rank and not -rank <= axis < rank:
                raise ConfigError(
                    f"batch axis {axis} for {name!r} is out of range: the input is "
                    f"{_dims(by_name[name])} (rank {rank})"
                )
            axis = int(axis) % rank if rank else int(axis)
        out[name] = axis
    return out


def _fixed(shape: tuple[int | str | None, ...]) -> bool:
    return all(isinstance(d, int) and d > 0 for d in shape)


def resolve_batch_axes(
    specs: list[InputSpec],
    shapes: Mapping[str, tuple[int, ...]],
    overrides: BatchAxes | None = None,
    *,
    carried: bool = False,
) -> dict[str, int | None]:
    """The batch axis of every fed input (`shapes`: input name -> calibration array shape).

    - `overrides` win (validated by `check_batch_axes`).
    - An input whose declared shape is fully fixed and whose array has exactly that shape (a
      rank-0 sample rate, a fixed-size state) is a constant (None), unless no other input would
      carry samples: then it is a fixed-batch input, batched on axis 0 as before.
    - Otherwise axis 0, unless the model fixes axis 0 (a recurrent state `[2, batch, 128]`) and
      another axis is the batch: the one axis holding a symbolic dim that is another input's
      axis-0 dim, or else the only symbolic/unknown axis when another input has a dynamic
      axis 0 (so a fixed-batch model `[1, 3, 48, W]` stays batched on axis 0).

    `carried`: the samples are counted elsewhere (inputs given one per sample; `shapes` then
    holds one sample's shape for them), so no input needs a batch axis.
    """
    by_name = {s.name: s for s in specs}
    overrides = check_batch_axes(overrides or {}, specs)
    dynamic = [s for s in specs if s.name in shapes and s.shape and not _fixed(s.shape[:1])]
    batch_dims = {s.shape[0] for s in dynamic if isinstance(s.shape[0], str)}
    axes: dict[str, int | None] = {}
    constants = []
    for name, shape in shapes.items():
        spec = by_name[name]
        if name in overrides:
            axes[name] = overrides[name]
        elif _fixed(spec.shape) and tuple(shape) == tuple(spec.shape):
            axes[name] = None
            constants.append(name)
        else:
            others = any(s.name != name for s in dynamic)
            axes[name] = _declared_axis(spec, batch_dims, others)
    if constants and all(axis is None for axis in axes.values()):
        for name in constants:
            if by_name[name].shape:  # rank 0 has no samples to count: left a constant
                axes[name] = 0
    if shapes and not carried and all(axis is None for axis in axes.values()):
        raise CalibrationError(
            f"no calibration input carries samples: {sorted(shapes)} are all constants "
            "(give one a batch axis with --batch-axis NAME=AXIS)"
        )
    return axes


def _declared_axis(spec: InputSpec, batch_dims: set[str], others: bool) -> int:
    """The batch axis the declared shape implies when axis 0 is not it (see resolve_batch_axes)."""
    dims = spec.shape
    if not dims or not _fixed(dims[:1]):
        return 0
    open_axes = [i for i, d in enumerate(dims) if not _fixed((d,))]
    named = [i for i in open_axes if isinstance(dims[i], str) and dims[i] in batch_dims]
    if len(named) == 1:
        return named[0]
    if len(open_axes) == 1 and others:
        return open_axes[0]
    return 0


def _reading(
    label: str, shapes: Mapping[str, tuple[int, ...]], specs: list[InputSpec], overrides: BatchAxes
) -> tuple[dict[str, int | None], dict[str, tuple[int, ...]]]:
    """How arrays of these shapes (by array key) are read: every input's batch axis (in the
    feeds), and the inputs given one per sample (array rank = declared rank + 1) with the shape
    of one sample's input. A rank that fits neither reading is an error naming the input."""
    mapping, _ = _map_keys(label, list(shapes), specs)
    by_name = {s.name: s for s in specs}
    per_sample: dict[str, tuple[int, ...]] = {}
    element: dict[str, tuple[int, ...]] = {}
    for name, key in mapping.items():
        spec, shape = by_name[name], tuple(shapes[key])
        rank = len(spec.shape)
        if spec.ranked and len(shape) == rank + 1:
            per_sample[name] = element[name] = shape[1:]
        elif spec.ranked and len(shape) != rank:
            ordinary = "a constant" if rank == 0 else "samples along a batch axis"
            raise CalibrationError(
                f"{label}: input {name!r} has shape {list(shape)} (rank {len(shape)}); the model "
                f"declares {_dims(spec)}: give rank {rank} ({ordinary}) or rank {rank + 1} "
                "(one input per sample on a new first axis)"
            )
        else:
            element[name] = shape
    axes = resolve_batch_axes(specs, element, overrides, carried=bool(per_sample))
    return axes, per_sample
