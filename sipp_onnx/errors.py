"""The project's error types.

Every problem caused by the user's input (model, calibration data, options) raises a subclass of
`SippError` whose message is one line saying what was expected and what was found. The CLI prints
that line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class SippError(Exception):
    """Base class of all errors caused by bad input to sipp-onnx."""


class ModelError(SippError):
    """The model file is missing, unreadable, invalid, or cannot run."""


class CalibrationError(SippError):
    """The calibration data does not fit the model or cannot be read."""


class ConfigError(SippError):
    """An option is out of range or inconsistent with the others."""


class NoPrunableLayersError(SippError):
    """The model (after --exclude / --op-types) has no layer that can be pruned."""


class OutputError(SippError):
    """The output path cannot be written or would overwrite something it must not."""


class ProviderError(SippError):
    """The requested ONNX Runtime execution provider is not available."""
