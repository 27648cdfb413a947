"""Doctest collection over ``samfx`` (pytest.ini adds ``--doctest-modules``).

Triton kernels import Triton at module level; where it is not installed (CPUs
without it, macOS) their modules are not collected.
"""

import importlib.util
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

collect_ignore = [] if importlib.util.find_spec("triton") else [
    "samfx/kernels/hyper_triton.py",
    "samfx/kernels/rel_pos_triton.py",
]
