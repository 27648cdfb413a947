"""Doctest collection over ``samfx`` (pytest.ini adds ``--doctest-modules``), and how
the suite shares a 2-core machine between two pytest-xdist workers.

Triton kernels import Triton at module level; where it is not installed (CPUs
without it, macOS) their modules are not collected.
"""

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

collect_ignore = [] if importlib.util.find_spec("triton") else [
    "samfx/kernels/hyper_triton.py",
    "samfx/kernels/rel_pos_triton.py",
]


def pytest_configure(config):
    # pytest-xdist (pytest.ini: -n 2): one torch thread per worker, so two workers use the two cores.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Each test file runs whole on one worker (``--dist loadgroup``), so its module
    fixtures are built once; tests that name their own group keep it (tests/emit's
    shared exports: the ONNX ones on one worker while the other makes the OpenVINO ones)."""
    import pytest

    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(str(Path(str(item.fspath)))))
