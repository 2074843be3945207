"""Calibration data: loading, validation against the model, and batching.

Accepted forms (the conventions of ModelOpt and Polygraphy):
- `.npz` keyed by the model's input names; a single-input model also accepts a file holding
  exactly one array under any key. Arrays that no input uses are reported.
- `.npy` for a single-input model.
- a directory of such files (read one file at a time, in name order).
- from Python: a mapping of input name -> array.

The first axis of every array counts samples. Everything is validated (names, ranks, fixed
dimensions, dtypes, NaN/inf, sample counts) before the model runs; files are opened with
`allow_pickle=False`.

Files are streamed: the arrays of a `.npy`, or of an `.npz` (stored or compressed), are read a
block of samples at a time, once to validate them and once per calibration pass, so memory does
not grow with the number of samples (256 ResNet-50 inputs are 154 MB). Arrays that cannot be read
row by row (Fortran order, a newer header version) are loaded whole, as before.
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

from .errors import CalibrationError
from .modelio import InputSpec

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


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

    def blocks(self, size: int, take: int) -> Iterator[Arrays]:
        if self.stream is not None:
            yield from self.stream(size, take)
            return
        arrays = self.arrays()
        for start in range(0, take, size):
            yield {name: a[start : min(start + size, take)] for name, a in arrays.items()}


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
            for block in chunk.blocks(size, take):
                if not self.fixed_batch:
                    yield {name: block[name] for name in self.inputs}
                    continue
                pending.append(block)
                pending_n += next(iter(block.values())).shape[0]
                if pending_n < size:
                    continue
                joined = {name: np.concatenate([p[name] for p in pending]) for name in self.inputs}
                full = pending_n - pending_n % size
                for start in range(0, full, size):
                    yield {name: joined[name][start : start + size] for name in self.inputs}
                pending = [{name: joined[name][full:] for name in self.inputs}]
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
    path: Path, layout: dict[str, tuple[tuple[int, ...], np.dtype]], specs: list[InputSpec]
) -> tuple[_Chunk, list[str], list[str], list[str]]:
    """A chunk that reads `path` block by block, validated once in full before it is used: the
    same checks and messages as a whole load (a block that fails is re-checked on the whole file,
    so the message counts and places problems in the file, not in the block). Also returns the
    inputs it feeds, the unused arrays and the cast warnings."""
    label = str(path)
    mapping, unused = _map_keys(label, list(layout), specs)
    counts = {name: layout[key][0][0] for name, key in mapping.items()}
    if len(set(counts.values())) > 1:
        raise CalibrationError(f"{label}: inputs have different sample counts {counts}")
    samples = next(iter(counts.values()))
    keys = list(mapping.values())

    def stream(size: int, take: int) -> Iterator[Arrays]:
        for block in _read_blocks(path, keys, size, take):
            yield _validated_chunk(label, block, specs)[0]

    casts: list[str] = []
    try:
        if samples == 0:  # nothing to stream: the whole-load checks say what is wrong
            _validated_chunk(label, _read_file(path), specs)
        for block in _read_blocks(path, keys, _VALIDATE_BLOCK, samples):
            casts = _validated_chunk(label, block, specs)[2]
    except CalibrationError:
        _validated_chunk(label, _read_file(path), specs)  # the whole-file message
        raise
    load = lambda: _validated_chunk(label, _read_file(path), specs)[0]  # noqa: E731
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


def _check_array(label: str, spec: InputSpec, arr: np.ndarray) -> np.ndarray:
    """Validate one array against its input spec; returns it (cast when the kind matches)."""
    where = f"{label}: input {spec.name!r}"
    if arr.dtype == spec.dtype and spec.dtype.name in _NARROW_FLOATS:
        arr = arr.astype(np.float32)  # validated as float32, converted back below
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise CalibrationError(f"{where} has dtype {arr.dtype}; expected {spec.dtype}")
    if spec.shape and arr.ndim != len(spec.shape):
        raise CalibrationError(
            f"{where} has shape {list(arr.shape)} (rank {arr.ndim}); the model expects rank "
            f"{len(spec.shape)} {_dims(spec)} with samples on the first axis"
        )
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise CalibrationError(f"{where} has no samples (shape {list(arr.shape)})")
    for axis, (got, want) in enumerate(zip(arr.shape, spec.shape, strict=False)):
        if axis > 0 and isinstance(want, int) and want > 0 and got != want:
            raise CalibrationError(
                f"{where} has shape {list(arr.shape)}; the model expects {_dims(spec)} "
                f"(axis {axis} must be {want})"
            )
    if arr.dtype.kind == "f":
        _check_finite(where, arr, "NaN/inf values")
    if arr.dtype != spec.dtype:
        kind = "f" if spec.dtype.name in _NARROW_FLOATS else spec.dtype.kind
        if kind != arr.dtype.kind or spec.dtype == np.dtype(object):
            raise CalibrationError(f"{where} has dtype {arr.dtype}; the model expects {spec.dtype}")
        with np.errstate(over="ignore"):
            converted = arr.astype(spec.dtype)
        if converted.dtype.kind == "f":
            _check_finite(where, converted, f"values too large for {spec.dtype}")
        elif not np.array_equal(converted, arr):
            raise CalibrationError(f"{where} has values that do not fit the model's {spec.dtype}")
        arr = converted
    return arr


def _check_finite(where: str, arr: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        first = int(np.argwhere(bad)[0][0])
        raise CalibrationError(f"{where} has {int(bad.sum())} {what} (first in sample {first})")


def _dims(spec: InputSpec) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in spec.shape) + "]"


def _validated_chunk(
    label: str, arrays: Arrays, specs: list[InputSpec]
) -> tuple[Arrays, list[str], list[str]]:
    mapping, unused = _map_keys(label, list(arrays), specs)
    by_name = {s.name: s for s in specs}
    out: Arrays = {}
    casts = []
    for name, key in mapping.items():
        arr = np.asarray(arrays[key])
        checked = _check_array(label, by_name[name], arr)
        if checked.dtype != arr.dtype:
            casts.append(f"{label}: input {name!r} cast from {arr.dtype} to {checked.dtype}")
        out[name] = checked
    counts = {name: a.shape[0] for name, a in out.items()}
    if len(set(counts.values())) > 1:
        raise CalibrationError(f"{label}: inputs have different sample counts {counts}")
    return out, unused, casts


def open_calibration(
    source: str | Path | Mapping[str, np.ndarray],
    specs: list[InputSpec],
    max_samples: int | None = None,
) -> CalibrationData:
    """Open and fully validate calibration data for a model with inputs `specs`."""
    chunks: list[_Chunk] = []
    unused: set[str] = set()
    warnings: list[str] = []
    fed: list[set[str]] = []
    if isinstance(source, Mapping):
        arrays, extra, casts = _validated_chunk("calibration data", dict(source), specs)
        chunks.append(
            _Chunk("calibration data", lambda: arrays, next(iter(arrays.values())).shape[0], arrays)
        )
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
        for file in files:
            layout = _layout(file)
            if layout is not None:
                chunk, fed_names, extra, casts = _streamed_chunk(file, layout, specs)
            else:
                arrays, extra, casts = _validated_chunk(str(file), _read_file(file), specs)

                def load(file: Path = file) -> Arrays:
                    return _validated_chunk(str(file), _read_file(file), specs)[0]

                samples = next(iter(arrays.values())).shape[0]
                chunk = _Chunk(str(file), load, samples, arrays if single else None)
                fed_names = list(arrays)
            unused.update(f"{file.name}:{k}" if not single else k for k in extra)
            warnings += casts
            fed.append(set(fed_names))
            chunks.append(chunk)
    available = sum(c.samples for c in chunks)
    used = min(available, max_samples) if max_samples else available
    fixed = _fixed_batch(specs)
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
    return CalibrationData(names, chunks, used, available, tuple(sorted(unused)), fixed, warnings)


def _fixed_batch(specs: list[InputSpec]) -> int | None:
    """The batch size the model fixes on its first axis (None when dynamic)."""
    for spec in specs:
        if not spec.optional and spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0:
            return spec.shape[0]
    return None
