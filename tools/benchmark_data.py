"""Build calibration and evaluation inputs for the third-party benchmark models.

    python tools/benchmark_data.py [--dest bench_models] [--no-check]

The inputs come from real data that every machine has: the standard library of the running
interpreter. Its files are a mix of source, text, markup, images, audio, archives, bytecode and
shared objects (good for magika, a file-type classifier), and its docstrings are English
sentences (good for MiniLM, a sentence encoder). The sets are deterministic for one interpreter
installation, and calibration and evaluation are disjoint: the split of an item is decided by a
stable hash of its own key (relative path or sentence text), never by its position, so no item
can be in both splits whatever else the stdlib holds.

Needs DEST/magika_config.json, DEST/minilm.onnx and DEST/minilm_tokenizer.json (written by
tools/fetch_benchmark_models.py). Writes:

    DEST/magika_calib.npz, DEST/magika_eval.npz   key "bytes": int32 [N, 2048]
    DEST/minilm_calib.npz, DEST/minilm_eval.npz   keyed by the model's input names: int64 [N, 64]
    DEST/benchmark_data.json                      where every row came from (paths, sentences)

No labels are written: the benchmark measures agreement of the pruned model with the dense one.
Unless --no-check, the dense models are then run on a few samples (onnxruntime, CPU) as a sanity
check of the features, the tokenization and the choice of output.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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


def collect_sentences(root: Path) -> list[str]:
    """Distinct docstring summary sentences of MIN_WORDS..MAX_WORDS words, sorted."""
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
    dest: Path, root: Path, n_calib: int = N_CALIB, n_eval: int = N_EVAL
) -> dict[str, list[str]]:
    """Write DEST/minilm_calib.npz and DEST/minilm_eval.npz; return the sentences of each split."""
    tokenizer = load_tokenizer(dest / "minilm_tokenizer.json", MINILM_SEQ_LEN)
    input_names = model_input_names(dest / "minilm.onnx")
    sentences = collect_sentences(root)
    calib, evaluation = split_by_hash(sentences, n_calib, n_eval)
    for name, split in (("calib", calib), ("eval", evaluation)):
        arrays = tokenize(tokenizer, split, input_names)
        write_npz_atomic(dest / f"minilm_{name}.npz", arrays)
        mask = arrays["attention_mask"]
        truncated = int((mask[:, -1] == 1).sum())
        shapes = ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in arrays.items())
        print(
            f"minilm_{name}.npz: {shapes}; mean length {mask.sum(1).mean():.1f} tokens, {truncated} truncated"
        )
    print(f"  from {len(sentences)} distinct docstring sentences")
    return {"calib": calib, "eval": evaluation}


# ------------------------------------------------------------------------------------- checks


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


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
    pairs = [
        ("A man is eating food.", "A man is eating a piece of bread."),
        ("Return the number of items in the list.", "Count how many elements the list holds."),
        ("The file could not be opened for reading.", "Opening the file for reading failed."),
    ]
    sentences = [s for pair in pairs for s in pair]
    feeds = tokenize(tokenizer, sentences, input_names)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    embedding = outputs["461"]
    mask = feeds["attention_mask"][..., None]
    pooled = (outputs["onnx::Shape_422"] * mask).sum(1) / mask.sum(1)
    related = [_cosine(embedding[2 * i], embedding[2 * i + 1]) for i in range(len(pairs))]
    unrelated = [
        _cosine(embedding[2 * i], embedding[2 * j + 1])
        for i in range(len(pairs))
        for j in range(len(pairs))
        if i != j
    ]
    ok = min(related) > max(unrelated)
    pooling_error = float(np.abs(embedding - pooled).max())
    print(
        f"minilm check: output '461' = mean-pooled hidden state (max diff {pooling_error:.1e}); "
        f"cosine paraphrases {np.mean(related):.2f} (min {min(related):.2f}) "
        f"vs unrelated {np.mean(unrelated):.2f} (max {max(unrelated):.2f}): {'ok' if ok else 'FAILED'}"
    )
    return ok


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


# --------------------------------------------------------------------------------------- main


def build_all(dest: Path, check: bool = True) -> bool:
    """Build every data set into ``dest``; return False when a sanity check failed."""
    root = stdlib_root()
    print(f"data source: stdlib of Python {sys.version.split()[0]} at {root}")
    magika = build_magika(dest, root)
    minilm = build_minilm(dest, root)
    write_json_atomic(
        dest / "benchmark_data.json",
        {
            "python": sys.version,
            "stdlib": str(root),
            "magika_files": magika,
            "minilm_sentences": minilm,
        },
    )
    if not check:
        return True
    return check_minilm(dest) & check_magika(dest, magika["eval"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=Path("bench_models"), help="model/data directory")
    parser.add_argument("--no-check", action="store_true", help="skip running the dense models")
    args = parser.parse_args(argv)
    missing = [
        name
        for name in ("magika_config.json", "minilm.onnx", "minilm_tokenizer.json")
        + (() if args.no_check else ("magika.onnx",))
        if not (args.dest / name).is_file()
    ]
    if missing:
        print(
            f"error: missing {', '.join(missing)} in {args.dest} (run tools/fetch_benchmark_models.py)",
            file=sys.stderr,
        )
        return 1
    return 0 if build_all(args.dest, check=not args.no_check) else 1


if __name__ == "__main__":
    sys.exit(main())
