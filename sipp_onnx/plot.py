"""The sweep picture: metric against sparsity, one line per method, the dense model as a
reference line. matplotlib is an optional extra (`pip install sipp-onnx[plot]`): everything
else works without it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Method
from .errors import OutputError

if TYPE_CHECKING:
    from .sweep import SweepResult


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot_sweep(result: SweepResult, path: Path, title: str | None = None) -> Path:
    """Draw `result` into a PNG at `path` (written atomically); returns `path`."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(
            "no plot: matplotlib is not installed (pip install 'sipp-onnx[plot]')"
        ) from None
    scale = 100.0 if result.metric == "accuracy" else 1.0
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    try:
        xs = [s * 100 for s in result.sparsities]
        cmap = plt.get_cmap("tab20" if len(result.variants) > 10 else "tab10")
        ours = {m.value for m in Method}
        for i, variant in enumerate(result.variants):
            ys = [result.value(variant, s) * scale for s in result.sparsities]
            own = variant.split("+")[0].split("[")[0] in ours
            style = "-" if own else ":"  # other tools' lines dotted
            ax.plot(xs, ys, marker="o", linestyle=style, color=cmap(i % cmap.N), label=variant)
        ax.axhline(result.dense * scale, color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel(result.metric + (" (%)" if result.metric == "accuracy" else ""))
        ax.set_title(title or Path(result.model).name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
        os.close(fd)
        try:
            fig.savefig(name, format="png")
            os.chmod(name, 0o644)
            os.replace(name, path)
        except OSError as exc:
            Path(name).unlink(missing_ok=True)
            raise OutputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return path
