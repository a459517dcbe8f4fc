"""pytest configuration of the benchmark suites.

* Files named ``bench_*.py`` are collected (``pytest benchmarks``; the test suite's ``testpaths`` is tests/).
* ``--bench-fast`` (or ``TAILLOR_BENCH_FAST=1``): toy shapes, one round, so CI runs every benchmark once in
  seconds (with ``--benchmark-disable`` pytest-benchmark runs each target once and skips its statistics).
* Every benchmark measures its reference in the same run, interleaved with the method round by round (the
  reference runs in pytest-benchmark's ``setup``, timed by us; the method is the timed target), and stores the
  median of the per-round ratios in ``benchmark.extra_info``.
"""
from __future__ import annotations

import os
import runpy
from pathlib import Path

import pytest


# The same guard as the test suite's: PyPI's ``kernels`` before the repository's kernels/ folder can shadow it.
runpy.run_path(str(Path(__file__).parents[1] / "tests" / "pypi_kernels.py"))["import_pypi_kernels"]()


def pytest_addoption(parser):
    parser.addoption("--bench-fast", action="store_true", default=False,
                     help="taillor benchmarks: toy shapes, one round (same as TAILLOR_BENCH_FAST=1)")


def pytest_configure(config):
    # Must happen before the bench modules build their parameter lists (at collection).
    if config.getoption("--bench-fast", default=False):
        os.environ["TAILLOR_BENCH_FAST"] = "1"


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself; collecting it here too would run it twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    """``TAILLOR_BENCH_THREADS=N`` pins torch's intra-op threads (on a loaded CPU, 1 avoids scheduler stalls)."""
    threads = os.environ.get("TAILLOR_BENCH_THREADS")
    if threads:
        import torch
        torch.set_num_threads(int(threads))
    yield
