"""What a model takes on disk, and compressed: the payoff users see from zeros without a sparse
runtime (zeros compress; ONNX Runtime does not run them faster).

The compressed size is DEFLATE at level 6, what `gzip` and `zip` give by default. zlib runs at
about 10 MB/s on float weights (MiniLM's 60 MB cost 2.5 s, more than its whole magnitude prune),
so models over `_EXACT_LIMIT` (4 MB) get an estimate: the ratio of `_SAMPLES` evenly spaced
128 KB chunks, compressed alone (DEFLATE's window is 32 KB, so a chunk compresses as it would
inside the file), times the total: at most about 0.4 s per model.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 128 << 10
_EXACT_LIMIT = 4 << 20
_SAMPLES = 32
LEVEL = 6


@dataclass(frozen=True)
class FileSize:
    """Bytes on disk of a model (its .onnx and external data files) and DEFLATE-compressed."""

    bytes: int
    compressed: int
    estimated: bool = False
    """True when `compressed` comes from a sample of the data (models over 4 MB)."""

    @property
    def ratio(self) -> float:
        return self.compressed / self.bytes if self.bytes else 1.0


def files_size(paths: Iterable[Path]) -> FileSize:
    """The size of `paths` together, as one stream."""
    paths = [Path(p) for p in paths]
    sizes = [p.stat().st_size for p in paths]
    total = sum(sizes)
    if total <= _EXACT_LIMIT:
        compressor = zlib.compressobj(LEVEL)
        out = 0
        for path in paths:
            with open(path, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    out += len(compressor.compress(chunk))
        return FileSize(total, out + len(compressor.flush()))
    raw = packed = 0
    for offset in _sample_offsets(total):
        chunk = _read_at(paths, sizes, offset)
        raw += len(chunk)
        packed += len(zlib.compress(chunk, LEVEL))
    return FileSize(total, round(total * packed / raw), estimated=True)


def bytes_size(data: bytes) -> FileSize:
    """The size of a serialized model held in memory (same rule as `files_size`)."""
    if len(data) <= _EXACT_LIMIT:
        return FileSize(len(data), len(zlib.compress(data, LEVEL)))
    view = memoryview(data)
    raw = packed = 0
    for offset in _sample_offsets(len(data)):
        chunk = view[offset : offset + _CHUNK]
        raw += len(chunk)
        packed += len(zlib.compress(chunk, LEVEL))
    return FileSize(len(data), round(len(data) * packed / raw), estimated=True)


def _sample_offsets(total: int) -> list[int]:
    step = (total - _CHUNK) / (_SAMPLES - 1)
    return [int(i * step) for i in range(_SAMPLES)]


def _read_at(paths: list[Path], sizes: list[int], offset: int) -> bytes:
    """`_CHUNK` bytes from `offset` of the files laid end to end."""
    out = b""
    for path, size in zip(paths, sizes, strict=True):
        if offset >= size:
            offset -= size
            continue
        with open(path, "rb") as handle:
            handle.seek(offset)
            out += handle.read(_CHUNK - len(out))
        offset = 0
        if len(out) >= _CHUNK:
            break
    return out


def describe(before: FileSize | None, after: FileSize | None) -> str:
    """One line for the CLI: on disk and compressed, before -> after."""
    if before is None:
        return ""
    line = f"size on disk {_human(before.bytes)}"
    if after is not None:
        line += f" -> {_human(after.bytes)}"
    line += f"; gzip -{LEVEL} {_human(before.compressed)}"
    if after is not None:
        line += f" -> {_human(after.compressed)} ({after.compressed / before.compressed:.0%})"
    if before.estimated or (after is not None and after.estimated):
        line += f" (estimated from {_SAMPLES} samples of {_CHUNK >> 10} KB)"
    return line


def _human(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
