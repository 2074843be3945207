"""sipp-onnx: sensitivity-informed provable pruning (SiPP) of ONNX models.

from sipp_onnx import prune_model, PruneConfig
result = prune_model("model.onnx", "calib.npz", PruneConfig(sparsity=0.7), output="pruned.onnx")
print(result.report.format_table())
"""

__version__ = "0.1.0"

from .checking import PatternReport, check_pattern  # noqa: E402
from .config import Method, Provider, PruneConfig, Reduction, Refit, Terms  # noqa: E402
from .discover import discover  # noqa: E402
from .errors import (  # noqa: E402
    CalibrationError,
    ConfigError,
    ModelError,
    NoPrunableLayersError,
    OutputError,
    ProviderError,
    SippError,
)
from .inspection import inspect_model  # noqa: E402
from .pipeline import PruneResult, prune_model  # noqa: E402
from .report import PruneReport  # noqa: E402
from .structured.pipeline import StructuredConfig, StructuredResult, prune_structured  # noqa: E402

__all__ = [
    "CalibrationError",
    "ConfigError",
    "Method",
    "ModelError",
    "NoPrunableLayersError",
    "OutputError",
    "PatternReport",
    "Provider",
    "ProviderError",
    "PruneConfig",
    "PruneReport",
    "PruneResult",
    "Reduction",
    "Refit",
    "SippError",
    "StructuredConfig",
    "StructuredResult",
    "Terms",
    "__version__",
    "check_pattern",
    "discover",
    "inspect_model",
    "prune_model",
    "prune_structured",
]
