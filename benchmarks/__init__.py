"""pytest-benchmark suites of taillor (run with ``pytest benchmarks``; see benchmarks/conftest.py)."""
