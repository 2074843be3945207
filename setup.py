"""Build the optional compiled max-times kernel (`sipp_onnx/_maxtimes.c`).

Everything else is in pyproject.toml. The extension is optional: where no C compiler or Python
headers are available the install still succeeds and `sipp_onnx.sensitivity` runs its NumPy
path (the report's `max_times_kernel` says which ran).
"""

import os

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sipp_onnx._maxtimes",
            ["sipp_onnx/_maxtimes.c"],
            extra_compile_args=["/O2"] if os.name == "nt" else ["-O3"],
            optional=True,
        )
    ]
)
