"""Reading and writing ONNX models without losing anything the user had.

The pruned model is the input model with some weight tensors' contents replaced; nothing else is
touched (opsets, ir_version, metadata, names, value_info, functions). Writes are atomic: the
files are written into a temporary directory beside the destination, checked, and moved into
place, so a failure or an interrupt never leaves a partial output and never changes the input.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype} [{dims}]"


def load_model(path: str | Path, load_external: bool = True) -> onnx.ModelProto:
    """Load and check a model file, turning every failure into a one-line `ModelError`."""
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
    if load_external:
        load_external_data(model, path)
    return model


def load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Read the external tensors of `model`, loaded from `path` without them, into memory."""
    try:
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (FileNotFoundError, OSError) as exc:
        raise ModelError(f"model {str(path)!r} refers to external data that cannot be read: {exc}") from None


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
            InputSpec(value.name, np_dtype(tensor_type.elem_type), tuple(dims), value.name in initializers)
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
    """Initializers stored as external data in a model loaded without them (the layout to keep)."""
    return frozenset(t.name for t in model.graph.initializer if external_data_helper.uses_external_data(t))


def tensor_protos(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Top-level initializers and `Constant` node values, by tensor name."""
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    tensors[node.output[0]] = attr.t
    return tensors


def read_tensor(tensor: onnx.TensorProto, base_dir: str | None = None) -> np.ndarray:
    return numpy_helper.to_array(tensor, base_dir or "")


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
    model: onnx.ModelProto, protos: dict[str, onnx.TensorProto], slot: BiasSlot, shift: np.ndarray, dtype: str
) -> str:
    """Add `shift / slot.scale` to the bias at `slot`, creating the bias input when the node has
    none (as a new initializer of `dtype`). Returns the bias tensor's name."""
    values = np.asarray(shift, dtype=np.float64) / slot.scale
    if slot.tensor is not None:
        tensor = protos[slot.tensor]
        current = numpy_helper.to_array(tensor)
        write_tensor(tensor, current.astype(np.float64) + values.reshape(current.shape))
        return slot.tensor
    node = model.graph.node[slot.node_index]
    taken = {t.name for t in model.graph.initializer} | {v.name for v in model.graph.input}
    taken |= {name for n in model.graph.node for name in n.output}
    name, suffix = f"{node.output[0]}_sipp_bias", 0
    while name in taken:
        suffix += 1
        name = f"{node.output[0]}_sipp_bias{suffix}"
    model.graph.initializer.append(numpy_helper.from_array(values.astype(dtype), name))
    while len(node.input) < slot.input_index:
        node.input.append("")
    if len(node.input) > slot.input_index:
        node.input[slot.input_index] = name
    else:
        node.input.append(name)
    protos[name] = model.graph.initializer[-1]
    return name


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
    except OSError as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None


def save_model_atomic(
    model: onnx.ModelProto,
    output: Path,
    external_tensors: frozenset[str] = frozenset(),
    check: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Write `model` to `output` (plus `<output>.data` for external tensors), atomically.

    `external_tensors` names the initializers to store in the external data file (the input
    file's layout); a model over 2 GB gets every initializer of 1 KB or more stored there.
    The files are written into a temporary directory in the destination directory (same file
    system, so the final rename is atomic), checked by `onnx.checker` and the optional `check`
    callback (which sees the final file names), then moved into place. Nothing is left behind
    on failure. Returns the written paths.
    """
    output = Path(output)
    parent = output.parent if str(output.parent) else Path(".")
    data_name = external_data_name(output)
    copy = onnx.ModelProto()  # the caller's model keeps its bytes in memory
    copy.CopyFrom(model)
    big = copy.ByteSize() > TWO_GB
    if big and not external_tensors:
        log.warning("model is over 2 GB: writing its weights as external data")
    externals = 0
    for tensor in copy.graph.initializer:
        chosen = tensor.name in external_tensors or (big and len(tensor.raw_data) >= 1024)
        if chosen and tensor.HasField("raw_data"):
            external_data_helper.set_external_data(tensor, location=data_name)
            externals += 1
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=parent))
    try:
        staged = tmpdir / output.name
        written = [output] + ([parent / data_name] if externals else [])
        try:
            onnx.save_model(copy, str(staged))
        except OSError as exc:
            raise OutputError(f"cannot write {str(output)!r}: {exc.strerror or exc}") from None
        try:
            onnx.checker.check_model(str(staged))
        except Exception as exc:
            raise ModelError(f"the pruned model fails onnx.checker: {_first_line(exc)}") from None
        if check is not None:
            check(staged)
        for target in written:
            _ordinary_permissions(tmpdir / target.name)
        # Data first, so the model file never points at a missing data file.
        for target in reversed(written):
            os.replace(tmpdir / target.name, target)
        return written
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
