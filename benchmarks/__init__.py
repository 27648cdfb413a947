"""Benchmark suites: ``python -m benchmarks SUITE ...`` (see ``benchmarks/__main__.py``)."""
