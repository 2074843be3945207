"""Calibration data: loading, validation against the model, and batching.

Accepted forms (the conventions of ModelOpt and Polygraphy):
- `.npz` keyed by the model's input names; a single-input model also accepts a file holding
  exactly one array under any key. Arrays that no input uses are reported.
- `.npy` for a single-input model.
- a directory of such files (read one file at a time, in name order).
- from Python: a mapping of input name -> array.

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
"""

from __future__ import annotations

import contextlib
import io
import logging
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

import numpy as np

from .errors import CalibrationError, ConfigError
from .modelio import InputSpec

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
BatchAxes = Mapping[str, int | None]
"""Input name -> the axis that counts its samples; None: a constant input, fed whole with every
batch. An input not named has its samples on axis 0."""


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
    """Every fed input's batch axis (None: constant, fed whole with every batch)."""

    @property
    def layout(self) -> dict[str, int | None]:
        """The inputs whose samples are not on axis 0: batch axis, or None for a constant."""
        return {name: axis for name, axis in self.axes.items() if axis != 0}

    def count(self, feed: Mapping[str, np.ndarray]) -> int:
        """Samples in one of this data's feeds (along the batch axes)."""
        return count_samples(feed, self.axes)

    def batches(self, batch_size: int) -> Iterator[Arrays]:
        """Feed dicts of at most `batch_size` samples (exactly `fixed_batch` when set).

        With a fixed batch, samples left over at the end of one file are joined with the start
        of the next, so only the last `samples % fixed_batch` samples go unused (and warned).
        """
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
) -> tuple[_Chunk, list[str], list[str], list[str]]:
    """A chunk that reads `path` block by block, validated once in full before it is used: the
    same checks and messages as a whole load (a block that fails is re-checked on the whole file,
    so the message counts and places problems in the file, not in the block). Also returns the
    inputs it feeds, the unused arrays and the cast warnings. Every input it feeds has its
    samples on axis 0."""
    label = str(path)
    mapping, unused = _map_keys(label, list(layout), specs)
    counts = {name: layout[key][0][0] for name, key in mapping.items()}
    if len(set(counts.values())) > 1:
        raise CalibrationError(f"{label}: inputs have different sample counts {counts}")
    samples = next(iter(counts.values()))
    keys = list(mapping.values())

    def stream(size: int, take: int) -> Iterator[Arrays]:
        for block in _read_blocks(path, keys, size, take):
            yield _validated_chunk(label, block, specs, axes)[0]

    casts: list[str] = []
    try:
        if samples == 0:  # nothing to stream: the whole-load checks say what is wrong
            _validated_chunk(label, _read_file(path), specs, axes)
        for block in _read_blocks(path, keys, _VALIDATE_BLOCK, samples):
            casts = _validated_chunk(label, block, specs, axes)[2]
    except CalibrationError:
        _validated_chunk(label, _read_file(path), specs, axes)  # the whole-file message
        raise
    load = lambda: _validated_chunk(label, _read_file(path), specs, axes)[0]  # noqa: E731
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


def _check_array(label: str, spec: InputSpec, arr: np.ndarray, batch: int | None = 0) -> np.ndarray:
    """Validate one array against its input spec, samples on axis `batch` (None: a constant);
    returns it (cast when the kind matches)."""
    where = f"{label}: input {spec.name!r}"
    if arr.dtype == spec.dtype and spec.dtype.name in _NARROW_FLOATS:
        arr = arr.astype(np.float32)  # validated as float32, converted back below
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise CalibrationError(f"{where} has dtype {arr.dtype}; expected {spec.dtype}")
    held = "as a constant" if batch is None else f"with samples on {_axis_name(batch)}"
    if spec.shape and arr.ndim != len(spec.shape):
        raise CalibrationError(
            f"{where} has shape {list(arr.shape)} (rank {arr.ndim}); the model expects rank "
            f"{len(spec.shape)} {_dims(spec)} {held}"
        )
    if batch is not None and (arr.ndim <= batch or arr.shape[batch] == 0):
        raise CalibrationError(f"{where} has no samples on axis {batch} (shape {list(arr.shape)})")
    for axis, (got, want) in enumerate(zip(arr.shape, spec.shape, strict=False)):
        if axis != batch and isinstance(want, int) and want > 0 and got != want:
            raise CalibrationError(
                f"{where} has shape {list(arr.shape)}; the model expects {_dims(spec)} "
                f"(axis {axis} must be {want}) {held}"
            )
    if arr.dtype.kind == "f":
        _check_finite(where, arr, "NaN/inf values", batch)
    if arr.dtype != spec.dtype:
        kind = "f" if spec.dtype.name in _NARROW_FLOATS else spec.dtype.kind
        if kind != arr.dtype.kind or spec.dtype == np.dtype(object):
            raise CalibrationError(f"{where} has dtype {arr.dtype}; the model expects {spec.dtype}")
        with np.errstate(over="ignore"):
            converted = arr.astype(spec.dtype)
        if converted.dtype.kind == "f":
            _check_finite(where, converted, f"values too large for {spec.dtype}", batch)
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
    label: str, arrays: Arrays, specs: list[InputSpec], axes: BatchAxes
) -> tuple[Arrays, list[str], list[str]]:
    mapping, unused = _map_keys(label, list(arrays), specs)
    by_name = {s.name: s for s in specs}
    out: Arrays = {}
    casts = []
    for name, key in mapping.items():
        arr = np.asarray(arrays[key])
        checked = _check_array(label, by_name[name], arr, axes.get(name, 0))
        if checked.dtype != arr.dtype:
            casts.append(f"{label}: input {name!r} cast from {arr.dtype} to {checked.dtype}")
        out[name] = checked
    counts = {}
    for name, a in out.items():
        axis = axes.get(name, 0)
        if axis is not None:
            counts[name if axis == 0 else f"{name} (axis {axis})"] = a.shape[axis]
    if len(set(counts.values())) > 1:
        raise CalibrationError(f"{label}: inputs have different sample counts {counts}")
    return out, unused, casts


def open_calibration(
    source: str | Path | Mapping[str, np.ndarray],
    specs: list[InputSpec],
    max_samples: int | None = None,
    batch_axes: BatchAxes | None = None,
) -> CalibrationData:
    """Open and fully validate calibration data for a model with inputs `specs`.

    `batch_axes` overrides the inferred batch axis of the inputs it names (None: a constant);
    see `resolve_batch_axes`."""
    chunks: list[_Chunk] = []
    unused: set[str] = set()
    warnings: list[str] = []
    fed: list[set[str]] = []
    overrides = check_batch_axes(batch_axes or {}, specs)
    if isinstance(source, Mapping):
        given = dict(source)
        axes = _axes_of("calibration data", {k: np.shape(v) for k, v in given.items()}, specs, overrides)
        arrays, extra, casts = _validated_chunk("calibration data", given, specs, axes)
        chunks.append(_Chunk("calibration data", lambda: arrays, count_samples(arrays, axes), arrays))
        unused.update(extra)
        warnings += casts
        fed.append(set(arrays))
    else:
        path = Path(source)
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
        # has exactly the declared shape); every file is then validated against them.
        first_layout = _layout(files[0])
        first_arrays = _read_file(files[0]) if first_layout is None else None
        shapes = (
            {k: tuple(a.shape) for k, a in first_arrays.items()}
            if first_arrays is not None
            else {k: shape for k, (shape, _) in (first_layout or {}).items()}
        )
        axes = _axes_of(str(files[0]), shapes, specs, overrides)
        for index, file in enumerate(files):
            layout = first_layout if index == 0 else _layout(file)
            mapped = _map_keys(str(file), list(layout), specs)[0] if layout is not None else {}
            if layout is not None and all(axes.get(name, 0) == 0 for name in mapped):
                chunk, fed_names, extra, casts = _streamed_chunk(file, layout, specs, axes)
            else:
                loaded = first_arrays if index == 0 and first_arrays is not None else _read_file(file)
                arrays, extra, casts = _validated_chunk(str(file), loaded, specs, axes)

                def load(file: Path = file) -> Arrays:
                    return _validated_chunk(str(file), _read_file(file), specs, axes)[0]

                chunk = _Chunk(str(file), load, count_samples(arrays, axes), arrays if single else None)
                fed_names = list(arrays)
            unused.update(f"{file.name}:{k}" if not single else k for k in extra)
            warnings += casts
            fed.append(set(fed_names))
            chunks.append(chunk)
    available = sum(c.samples for c in chunks)
    used = min(available, max_samples) if max_samples else available
    fixed = _fixed_batch(specs, axes)
    if fixed and used % fixed:
        warnings.append(
            f"the model fixes its batch size to {fixed}: the last {used % fixed} sample(s) are not used"
        )
    if unused:
        warnings.append(f"calibration arrays not used by any model input: {sorted(unused)}")
    if fixed and used < fixed:  # before the warnings: a failed run prints its error line only
        raise CalibrationError(
            f"the model fixes its batch size to {fixed} but only {used} calibration sample(s) are given"
        )
    names = tuple(s.name for s in specs if s.name in fed[0])
    if any(set(f) != set(names) for f in fed):
        raise CalibrationError("calibration files do not all provide the same model inputs")
    for message in warnings:
        log.warning(message)
    axes = {name: axes.get(name, 0) for name in names}
    data = CalibrationData(names, chunks, used, available, tuple(sorted(unused)), fixed, warnings, axes)
    for line in describe_layout(data.layout):
        log.info("%s", line)
    return data


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
    specs: list[InputSpec], shapes: Mapping[str, tuple[int, ...]], overrides: BatchAxes | None = None
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
    if shapes and all(axis is None for axis in axes.values()):
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


def _axes_of(
    label: str, shapes: Mapping[str, tuple[int, ...]], specs: list[InputSpec], overrides: BatchAxes
) -> dict[str, int | None]:
    """The batch axes of the inputs fed by arrays of these shapes (by array key)."""
    mapping, _ = _map_keys(label, list(shapes), specs)
    return resolve_batch_axes(specs, {name: shapes[key] for name, key in mapping.items()}, overrides)
