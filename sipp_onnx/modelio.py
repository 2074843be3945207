"""Reading and writing ONNX models without losing anything the user had.

The pruned model is the input model with some weight tensors' contents replaced; nothing else is
touched (opsets, ir_version, metadata, names, value_info, functions). Writes are atomic: the
files are written into a temporary directory beside the destination, checked, and moved into
place, so a failure or an interrupt never leaves a partial output and never changes the input.

Tensors stored as external data are never loaded as a whole model: the graph is read without
them, a tensor's values are read when a stage needs them (`read_tensor` with the model's
directory), the pruned ones go straight to the output's data file (`StagedOutput`), and the
writer copies every untouched external tensor from the input's data file to the output's in
chunks. An external tensor's bytes never enter the protobuf, which would keep them until the
model is freed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from .errors import ConfigError, ModelError, OutputError
from .layers import BiasSlot

log = logging.getLogger(__name__)

TWO_GB = 2**31 - 1


@dataclass(frozen=True)
class InputSpec:
    """One graph input the caller must (or may) feed."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]
    """Fixed dims as int, symbolic dims as their name, unknown dims as None."""
    optional: bool = False
    """True when an initializer of the same name provides a default (IR < 4 style)."""
    ranked: bool = True
    """False when the model declares no shape at all (then `shape` is () but the rank unknown)."""

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype} [{dims}]"


def load_model(path: str | Path) -> onnx.ModelProto:
    """Load and check a model file, turning every failure into a one-line `ModelError`.

    External data is not loaded: tensors are read one at a time with `read_tensor`."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file {str(path)!r} does not exist")
    if not path.is_file():
        raise ModelError(f"model path {str(path)!r} is not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelError(f"cannot read {str(path)!r} as an ONNX model: {_first_line(exc)}") from None
    if not model.graph.node:
        raise ModelError(f"{str(path)!r} holds no ONNX graph nodes (is it an ONNX model?)")
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ModelError(f"{str(path)!r} is not a valid ONNX model: {_first_line(exc)}") from None
    return model


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in the model: initializers and tensor attributes, subgraphs included."""

    def graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from graph_tensors(attr.g)
                for sub in attr.graphs:
                    yield from graph_tensors(sub)

    yield from graph_tensors(model.graph)


def _external_info(tensor: onnx.TensorProto) -> tuple[str, int, int | None]:
    """(location, offset, length or None) of an external tensor."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    length = info.get("length")
    return info.get("location", ""), int(info.get("offset", 0) or 0), int(length) if length else None


def _external_file(base_dir: Path, location: str, tensor: str) -> Path:
    """The data file of an external tensor, refusing locations outside the model's directory."""
    if not location or Path(location).is_absolute() or ".." in Path(location).parts:
        raise ModelError(f"tensor {tensor!r} has an unsafe external data location {location!r}")
    return base_dir / location


def model_files(model: onnx.ModelProto, path: Path) -> list[Path]:
    """The files a model loaded from `path` consists of: itself and its external data files."""
    files = [Path(path)]
    for tensor in all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            data = _external_file(Path(path).parent, _external_info(tensor)[0], tensor.name)
            if data not in files:
                files.append(data)
    return files


def check_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Fail early, with one line, when an external tensor's file is missing or too short."""
    sizes: dict[Path, int] = {}
    for tensor in all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        location, offset, length = _external_info(tensor)
        path = _external_file(base_dir, location, tensor.name)
        if path not in sizes:
            try:
                sizes[path] = path.stat().st_size
            except OSError as exc:
                raise ModelError(
                    f"tensor {tensor.name!r} refers to external data {str(path)!r} that cannot be read: "
                    f"{exc.strerror or exc}"
                ) from None
        end = offset + (length if length is not None else 0)
        if end > sizes[path]:
            raise ModelError(
                f"tensor {tensor.name!r} needs bytes {offset}-{end} of {str(path)!r}, "
                f"which has only {sizes[path]} (truncated external data?)"
            )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def np_dtype(elem_type: int) -> np.dtype:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        return np.dtype(object)


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs a caller feeds, with dtype and shape (initializer-backed ones optional)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        tensor_type = value.type.tensor_type
        dims: list[int | str | None] = []
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                dims.append(int(dim.dim_value))
            elif dim.HasField("dim_param"):
                dims.append(dim.dim_param)
            else:
                dims.append(None)
        specs.append(
            InputSpec(
                value.name,
                np_dtype(tensor_type.elem_type),
                tuple(dims),
                value.name in initializers,
                tensor_type.HasField("shape"),
            )
        )
    return specs


MASK_NAMES = ("attention_mask", "input_mask", "padding_mask", "mask")


def resolve_mask_input(inputs: list[InputSpec], option: str) -> str | None:
    """The graph input that masks padding tokens: `option` 'none', 'auto' (by name), or a name."""
    if option == "none":
        return None
    if option == "auto":
        for spec in inputs:
            lowered = spec.name.lower()
            named = lowered in MASK_NAMES or "attention_mask" in lowered
            if named and len(spec.shape) == 2 and spec.dtype.kind in "iub":
                return spec.name
        return None
    spec_by_name = {spec.name: spec for spec in inputs}
    if option not in spec_by_name:
        names = ", ".join(spec_by_name) or "none"
        raise ConfigError(f"mask input {option!r} is not a model input (inputs: {names})")
    if len(spec_by_name[option].shape) != 2:
        raise ConfigError(
            f"mask input {option!r} must be [batch, sequence], got {spec_by_name[option].describe()}"
        )
    return option


def external_tensor_names(model: onnx.ModelProto) -> frozenset[str]:
    """Tensors stored as external data in a model loaded without them (the layout to keep)."""
    return frozenset(t.name for t in all_tensors(model) if external_data_helper.uses_external_data(t))


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held in `node`'s attributes (an If's branches, a Loop's or Scan's body)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def tensor_protos(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and `Constant` node values by tensor name, those of subgraphs included (a
    layer inside an If branch is pruned in place: see branches.py). Names are unique across
    scopes (ONNX forbids a subgraph to shadow an outer name); top-level tensors win regardless."""
    tensors: dict[str, onnx.TensorProto] = {}

    def walk(graph: onnx.GraphProto, top: bool) -> None:
        for node in graph.node:
            for sub in subgraphs(node):
                walk(sub, False)
        if not top:
            _collect(graph, tensors)

    walk(model.graph, True)
    _collect(model.graph, tensors)
    return tensors


def _collect(graph: onnx.GraphProto, tensors: dict[str, onnx.TensorProto]) -> None:
    """`graph`'s own initializers and Constant values into `tensors` (overwriting)."""
    tensors.update((t.name, t) for t in graph.initializer)
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    tensors[node.output[0]] = attr.t


def read_tensor(tensor: onnx.TensorProto, base_dir: str | Path | None = None) -> np.ndarray:
    """A tensor's values; an external tensor is read from its file under `base_dir`, alone.

    The bytes are read here, not by onnx: onnx before 1.18 stored them into the tensor, and
    a protobuf keeps every byte it was given until the whole model is freed."""
    try:
        if not external_data_helper.uses_external_data(tensor):
            return numpy_helper.to_array(tensor)
        if base_dir is None:
            raise ModelError(
                f"tensor {tensor.name!r} is stored as external data, and no model directory was given"
            )
        location, offset, length = _external_info(tensor)
        path = _external_file(Path(base_dir), location, tensor.name)
        dtype = np_dtype(tensor.data_type)
        count = prod(tensor.dims)
        if dtype.kind not in "biufV" or (length is not None and length != count * dtype.itemsize):
            detached = onnx.TensorProto()  # packed or odd types: onnx's reader, on a copy
            detached.CopyFrom(tensor)
            return numpy_helper.to_array(detached, str(base_dir))
        with open(path, "rb") as handle:
            handle.seek(offset)
            values = np.fromfile(handle, dtype=dtype.newbyteorder("<"), count=count)
        if values.size != count:
            raise ModelError(f"external data of tensor {tensor.name!r} in {str(path)!r} is truncated")
        return values.astype(dtype, copy=False).reshape(tuple(tensor.dims))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read tensor {tensor.name!r}: {_first_line(exc)}") from None


def write_tensor(tensor: onnx.TensorProto, values: np.ndarray) -> None:
    """Replace a tensor's contents in place, keeping its name, dtype, dims and doc string."""
    dtype = np_dtype(tensor.data_type)
    new = numpy_helper.from_array(np.ascontiguousarray(values.astype(dtype, copy=False)), tensor.name)
    doc = tensor.doc_string if tensor.HasField("doc_string") else None
    tensor.Clear()
    tensor.CopyFrom(new)
    if doc is not None:
        tensor.doc_string = doc


def shift_bias(
    model: onnx.ModelProto,
    protos: dict[str, onnx.TensorProto],
    slot: BiasSlot,
    shift: np.ndarray,
    dtype: str,
    base_dir: Path | None = None,
) -> str:
    """Add `shift / slot.scale` to the bias at `slot`, creating the bias input when the node has
    none (as a new initializer of `dtype`). Returns the bias tensor's name.

    With `slot.part` (a recurrent op's B), the shift goes into its part of every direction's
    row; the B that an earlier shift of the same node created is reused. An integer bias (a
    quantized op's int32 bias, `slot.scale` its per-output scale) gets the shift rounded to its
    integers and clipped to its type."""
    values = np.asarray(shift, dtype=np.float64) / np.asarray(slot.scale, dtype=np.float64)
    node = model.graph.node[slot.node_index]
    name = slot.tensor
    if name is None and slot.part is not None and len(node.input) > slot.input_index:
        name = node.input[slot.input_index] or None  # created by the other part's refit
    if name is not None:
        tensor = protos[name]
        stored = read_tensor(tensor, base_dir)
        current = stored.astype(np.float64)
        if slot.part is not None:
            start, stop = slot.part
            current[:, start:stop] += values.reshape(current.shape[0], stop - start)
        else:
            current += values.reshape(current.shape)
        if stored.dtype.kind in "iu":
            info = np.iinfo(stored.dtype)
            current = np.clip(np.rint(current), info.min, info.max)
        write_tensor(tensor, current)
        return name
    if slot.part is not None:
        start, stop = slot.part
        width = 2 * (stop - start)
        full = np.zeros((values.size // (stop - start), width))
        full[:, start:stop] = values.reshape(full.shape[0], stop - start)
        values = full
    taken = {t.name for t in model.graph.initializer} | {v.name for v in model.graph.input}
    taken |= {name for n in model.graph.node for name in n.output}
    stem = node.output[0] if node.output and node.output[0] else node.name or node.op_type
    name, suffix = f"{stem}_sipp_bias", 0
    while name in taken:
        suffix += 1
        name = f"{stem}_sipp_bias{suffix}"
    model.graph.initializer.append(numpy_helper.from_array(values.astype(dtype), name))
    while len(node.input) < slot.input_index:
        node.input.append("")
    if len(node.input) > slot.input_index:
        node.input[slot.input_index] = name
    else:
        node.input.append(name)
    protos[name] = model.graph.initializer[-1]
    return name


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """A tensor's data size from its dims and type, without touching (or copying) the data."""
    return prod(tensor.dims) * np_dtype(tensor.data_type).itemsize


def make_sparse(model: onnx.ModelProto, name: str) -> bool:
    """Store the top-level initializer `name` as a sparse initializer when that is smaller.

    ONNX's COO form holds each non-zero's value and its int64 position: (itemsize + 8) bytes
    per non-zero against itemsize per element dense, so it pays below a density of
    itemsize / (itemsize + 8) (a third for float32, 80 % sparsity for float16). ONNX Runtime
    turns it back into a dense tensor when it loads the model. Returns whether it converted.
    """
    index = next((i for i, t in enumerate(model.graph.initializer) if t.name == name), None)
    if index is None:
        return False
    tensor = model.graph.initializer[index]
    if external_data_helper.uses_external_data(tensor):
        return False
    values = numpy_helper.to_array(tensor)
    if values.dtype.kind not in "fiu" or values.ndim == 0:
        return False
    flat = values.reshape(-1)
    positions = np.flatnonzero(flat)
    if positions.size * (values.dtype.itemsize + 8) >= flat.size * values.dtype.itemsize:
        return False
    sparse = onnx.SparseTensorProto()
    sparse.values.CopyFrom(numpy_helper.from_array(flat[positions], name))
    sparse.indices.CopyFrom(numpy_helper.from_array(positions.astype(np.int64), f"{name}_indices"))
    sparse.dims.extend(values.shape)
    del model.graph.initializer[index]
    model.graph.sparse_initializer.append(sparse)
    return True


def over_2gb(model: onnx.ModelProto) -> bool:
    """Whether `model` is too big to serialize as one protobuf.

    The upb protobuf runtime raises (EncodeError) from `ByteSize()` over 2 GB instead of
    returning the size, so that is read as 'over' too."""
    try:
        return model.ByteSize() > TWO_GB
    except Exception:
        return True


def external_data_name(output: Path) -> str:
    """File name of the external data written beside `output`."""
    return output.name + ".data"


def check_output_path(model_path: Path | None, output: Path, overwrite: bool, external: bool) -> None:
    """Refuse, before any work, outputs that would clobber the input or existing files."""
    if model_path is not None and output.resolve() == model_path.resolve():
        raise OutputError(f"output {str(output)!r} is the input model; choose another path with -o")
    if output.exists() and output.is_dir():
        raise OutputError(f"output {str(output)!r} is a directory; give a file path")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {str(parent)!r} is not writable")
    targets = [output] + ([parent / external_data_name(output)] if external else [])
    for target in targets:
        if model_path is not None and external and target.resolve() == model_path.resolve():
            raise OutputError(f"writing {str(target)!r} would overwrite the input model")
        if target.exists() and not overwrite:
            raise OutputError(f"{str(target)!r} already exists; pass --overwrite to replace it")


def _ordinary_permissions(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file via a temporary file in the same directory and a rename."""
    parent = path.parent if str(path.parent) else Path(".")
    tmp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
        tmp = Path(name)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        _ordinary_permissions(tmp)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise OutputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    finally:  # also on an interrupt
        if tmp is not None:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def relocated(
    model: onnx.ModelProto,
    data_file: Path,
    choose: Callable[[onnx.TensorProto], bool],
    base_dir: Path | None = None,
    restore: bool = True,
    staged: frozenset[str] = frozenset(),
) -> Iterator[int]:
    """Store the chosen in-memory tensors in `data_file` while the block runs, then put them back.

    The model's tensors are pointed at `data_file` (relative to its directory) instead of
    copied: serializing the model inside the block writes only the graph, and the caller's
    model is unchanged afterwards (unless `restore` is False: the tensors then stay in the
    data file). Tensors that already live in external files under `base_dir` are copied there
    too, in chunks. Tensors named in `staged` are already in
    `data_file` (see `StagedOutput`), which is then appended to. Yields the number of tensors
    in the data file.
    """
    location = data_file.name
    moved: list[tuple[onnx.TensorProto, bytes | None, list[tuple[str, str]]]] = []
    count = len(staged)
    try:
        with open(data_file, "ab" if staged else "wb") as out:
            for tensor in all_tensors(model):
                if tensor.name in staged:
                    continue
                external = external_data_helper.uses_external_data(tensor)
                if not external and not (tensor.HasField("raw_data") and choose(tensor)):
                    continue
                offset = out.tell()
                if external:
                    if base_dir is None:
                        raise ModelError(
                            f"tensor {tensor.name!r} is external data, but the model has no directory"
                        )
                    _copy_range(tensor, base_dir, out)
                    previous = [(entry.key, entry.value) for entry in tensor.external_data]
                    if restore:
                        moved.append((tensor, None, previous))
                else:
                    data = tensor.raw_data
                    out.write(data)
                    if restore:  # else the bytes are freed now, tensor by tensor
                        moved.append((tensor, data, []))
                    del data
                    tensor.ClearField("raw_data")
                count += 1
                _point_at(
                    tensor,
                    [("location", location), ("offset", str(offset)), ("length", str(out.tell() - offset))],
                )
        if not count:
            data_file.unlink()
        yield count
    finally:
        for tensor, kept, previous in reversed(moved):
            if kept is None:
                _point_at(tensor, previous)
            else:
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
                tensor.raw_data = kept


def _point_at(tensor: onnx.TensorProto, entries: list[tuple[str, str]]) -> None:
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


_COPY_CHUNK = 64 << 20


def _copy_range(tensor: onnx.TensorProto, base_dir: Path, out: BinaryIO) -> None:
    """Append an external tensor's bytes to `out`, a chunk at a time."""
    location, offset, length = _external_info(tensor)
    path = _external_file(base_dir, location, tensor.name)
    try:
        with open(path, "rb") as src:
            src.seek(offset)
            remaining = length if length is not None else path.stat().st_size - offset
            while remaining > 0:
                chunk = src.read(min(_COPY_CHUNK, remaining))
                if not chunk:
                    raise ModelError(f"external data of tensor {tensor.name!r} in {str(path)!r} is truncated")
                out.write(chunk)
                remaining -= len(chunk)
    except FileNotFoundError:
        raise ModelError(f"external data {str(path)!r} of tensor {tensor.name!r} has disappeared") from None


def _staging_directory(output: Path) -> Path:
    """A new hidden directory beside `output` (same file system: the final rename is atomic)."""
    parent = output.parent if str(output.parent) else Path(".")
    try:
        return Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=parent))
    except OSError as exc:
        raise OutputError(f"cannot write into {str(parent)!r}: {exc.strerror or exc}") from None


class StagedOutput:
    """The output's staging directory and data file, open before the pruned tensors exist.

    `put` writes a tensor's new values straight to the data file and leaves only its metadata
    in the protobuf: a protobuf keeps every byte it is given until the whole model is freed,
    so writing a big model's pruned tensors into it would hold them all until the end.
    `save_model_atomic(..., staged=...)` finishes the file and owns the directory from then;
    `discard` removes it when the run stops before.
    """

    def __init__(self, output: Path) -> None:
        self.output = Path(output)
        self.tmpdir = _staging_directory(self.output)
        self.location = external_data_name(self.output)
        self.names: set[str] = set()
        try:
            self._handle: BinaryIO | None = open(self.tmpdir / self.location, "wb")  # noqa: SIM115
        except OSError as exc:
            self.discard()
            raise OutputError(f"cannot write {str(output)!r}: {exc.strerror or exc}") from None

    def put(self, tensor: onnx.TensorProto, values: np.ndarray) -> None:
        """Store `values` as the tensor's data (its name, dtype, dims and doc string stay)."""
        assert self._handle is not None, "put after the output was saved"
        array = np.ascontiguousarray(values.astype(np_dtype(tensor.data_type), copy=False))
        if list(array.shape) != list(tensor.dims):
            raise ValueError(f"{tensor.name}: values of shape {array.shape}, tensor dims {list(tensor.dims)}")
        offset = self._handle.tell()
        try:
            self._handle.write(array.reshape(-1).view(np.uint8).data)
        except OSError as exc:
            raise OutputError(f"cannot write {str(self.output)!r}: {exc.strerror or exc}") from None
        for field in _DATA_FIELDS:
            tensor.ClearField(field)
        _point_at(
            tensor, [("location", self.location), ("offset", str(offset)), ("length", str(array.nbytes))]
        )
        self.names.add(tensor.name)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


_DATA_FIELDS = (
    "raw_data",
    "float_data",
    "int32_data",
    "string_data",
    "int64_data",
    "double_data",
    "uint64_data",
)


def save_model_atomic(
    model: onnx.ModelProto,
    output: Path,
    external_tensors: frozenset[str] = frozenset(),
    check: Callable[[Path], None] | None = None,
    base_dir: Path | None = None,
    detach: bool = False,
    staged: StagedOutput | None = None,
) -> list[Path]:
    """Write `model` to `output` (plus `<output>.data` for external tensors), atomically.

    `external_tensors` names the tensors to store in the external data file (the input file's
    layout): the ones still external in `model` are copied from their files under `base_dir`,
    a chunk at a time; the ones rewritten in memory are written from there. A model over 2 GB
    gets every tensor of 1 KB or more stored there too. `model` is unchanged afterwards, unless
    the caller gives it up with `detach`: the tensors written to the data file then stay there
    (referred to relative to the output's directory), so their bytes are not held in memory
    again while `check` loads the written model. With `staged`, the pruned tensors are already
    in its data file (and the model is given up too).
    The files are written into a temporary directory in the destination directory (same file
    system, so the final rename is atomic), checked by `onnx.checker` and the optional `check`
    callback (which sees the final file names), then moved into place. Nothing is left behind
    on failure. Returns the written paths.
    """
    output = Path(output)
    parent = output.parent if str(output.parent) else Path(".")
    # Sizing the protobuf encodes it: asked only when the in-memory tensors come near 2 GB.
    loose = sum(
        tensor_nbytes(t)
        for t in all_tensors(model)
        if t.name not in external_tensors and not external_data_helper.uses_external_data(t)
    )
    big = loose > TWO_GB // 2 and over_2gb(model)
    if big and not external_tensors:
        log.warning("model is over 2 GB: writing its weights as external data")

    def choose(tensor: onnx.TensorProto) -> bool:
        return tensor.name in external_tensors or (big and tensor_nbytes(tensor) >= 1024)

    tmpdir = staged.tmpdir if staged is not None else _staging_directory(output)
    try:
        model_file = tmpdir / output.name
        data_file = tmpdir / external_data_name(output)
        ready = frozenset(staged.names) if staged is not None else frozenset()
        if staged is not None:
            staged.close()
        try:
            with relocated(
                model, data_file, choose, base_dir, restore=not detach and not ready, staged=ready
            ):
                model_file.write_bytes(model.SerializeToString())
        except OSError as exc:
            raise OutputError(f"cannot write {str(output)!r}: {exc.strerror or exc}") from None
        except ValueError as exc:  # protobuf refuses to serialize over 2 GB
            raise OutputError(f"cannot write {str(output)!r}: {_first_line(exc)}") from None
        written = [output] + ([parent / data_file.name] if data_file.exists() else [])
        try:
            onnx.checker.check_model(str(model_file))
        except Exception as exc:
            raise ModelError(f"the pruned model fails onnx.checker: {_first_line(exc)}") from None
        if check is not None:
            check(model_file)
        for target in written:
            _ordinary_permissions(tmpdir / target.name)
        # Data first, so the model file never points at a missing data file.
        for target in reversed(written):
            os.replace(tmpdir / target.name, target)
        return written
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
