"""The package's layering, checked on its source: no import cycle, no upward import,
runtime modules outside passes.

Imports are read with :mod:`ast` (module level and inside functions alike: a lazy
import is still a dependency), so the checks cost no model and no import.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest
from torch import nn

import samfx

ROOT = Path(samfx.__file__).parent

#: Lowest first. A module may import its own layer and the layers below it.
#: A module matches its longest listed prefix (``samfx`` itself is the package root).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("samfx._version", "samfx.codecs", "samfx.kernels", "samfx.data", "samfx.masks", "samfx.models",
                    "samfx.annotations", "samfx.machine")),
    ("runtime modules", ("samfx.modules",)),
    ("capture", ("samfx.adapters", "samfx.capture")),
    ("graph helpers", ("samfx.graph",)),
    ("measurement", ("samfx.fidelity", "samfx.stats", "samfx.calibration", "samfx.segment_everything",
                     "samfx.distillation")),
    ("passes", ("samfx.passes",)),
    ("pipeline", ("samfx.pipeline", "samfx.report", "samfx.serialization", "samfx.pictures", "samfx.evaluation",
                  "samfx.presets")),
    ("emitters", ("samfx.emit",)),
    ("api", ("samfx", "samfx.bench", "samfx.tune")),
    ("cli", ("samfx.cli",)),
]

#: What code outside ``samfx/passes`` may import from it: the registry, never a pass.
PASS_API = {"samfx.passes", "samfx.passes.base"}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, is a package ``__init__``)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


MODULES = _modules()


def _imported(name: str, package: bool, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The samfx modules one import statement loads (``from pkg import mod`` names ``pkg.mod``)."""
    if isinstance(node, ast.Import):
        targets = {alias.name for alias in node.names}
    else:
        if node.level:
            base = name.split(".")[: len(name.split(".")) - node.level + package]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        targets = {f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names}
    return {t for t in targets if t in MODULES and t != name}


def _imports() -> dict[str, set[str]]:
    graph = {}
    for name, (path, package) in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        graph[name] = set().union(*(_imported(name, package, node) for node in ast.walk(tree)
                                    if isinstance(node, (ast.Import, ast.ImportFrom))))
    return graph


IMPORTS = _imports()


def _layer(name: str) -> int:
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if name == prefix or (prefix != "samfx" and name.startswith(prefix + "."))]
    if not matches:
        raise AssertionError(f"{name} is in no layer: add it to LAYERS in {__file__}")
    return max(matches)[1]


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


def test_no_import_cycle():
    # A package's __init__ may load its own submodules (to re-export or register
    # them) while they import its names; every other edge must be acyclic.
    graph = {name: {t for t in targets if not (MODULES[name][1] and t.startswith(name + "."))}
             for name, targets in IMPORTS.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_no_upward_import():
    upward = [f"{name} ({LAYERS[_layer(name)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
              for name, targets in sorted(IMPORTS.items()) for target in sorted(targets)
              if _layer(target) > _layer(name)]
    assert not upward, "\n".join(upward)


def test_passes_are_reached_through_the_registry():
    reaching = [f"{name} imports {target}" for name, targets in sorted(IMPORTS.items())
                if not name.startswith("samfx.passes") for target in sorted(targets)
                if target.startswith("samfx.passes") and target not in PASS_API]
    assert not reaching, "\n".join(reaching)


PASS_MODULES = sorted(name for name in MODULES if name.startswith("samfx.passes."))


@pytest.mark.parametrize("name", PASS_MODULES)
def test_passes_define_no_runtime_module(name):
    # What an optimized model runs lives in samfx.modules (or samfx.capture), so
    # that loading or exporting a model never needs a pass.
    module = importlib.import_module(name)
    defined = [cls.__name__ for _, cls in inspect.getmembers(module, inspect.isclass)
               if cls.__module__ == name and issubclass(cls, nn.Module)]
    assert not defined, f"{name} defines nn.Module subclasses {defined}: move them to samfx.modules"


def test_checks_see_the_package():
    # The checks above pass vacuously if the import reader finds nothing.
    assert "samfx.capture" in IMPORTS["samfx.passes.base"]
    assert {"samfx.passes", "samfx.pipeline"} <= IMPORTS["samfx"]
    assert len(PASS_MODULES) >= 7
