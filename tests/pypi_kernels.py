"""Import the PyPI package ``kernels`` before the repository's kernels/ folder can shadow it (one definition, run by
tests/conftest.py and benchmarks/conftest.py)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def import_pypi_kernels() -> None:
    """Import the PyPI package ``kernels`` (when installed) before anything else does. The repository's kernels/
    folder is the package taillor._kernels; whenever the repository root is on sys.path (``python -m pytest``, or
    pytest importing benchmarks/ as a package) it would also be found as a top-level ``kernels`` and shadow the
    PyPI package, which transformers >= 5.25 imports."""
    root = Path(__file__).resolve().parents[1]
    cached = sys.modules.get("kernels")
    if cached is not None and root in Path(getattr(cached, "__file__", None) or "/").resolve().parents:
        del sys.modules["kernels"]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        if importlib.util.find_spec("kernels") is not None:
            importlib.import_module("kernels")
    finally:
        sys.path[:] = saved

