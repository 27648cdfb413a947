"""Save and load optimized models.

A saved model is a directory:

* ``samfx.json``: the format version, how to build the base architecture (a zoo
  name, or nothing when the caller supplies the base model), and the pass
  recipe: each pass's config and the replay data it recorded, so loading redoes
  every rewrite exactly without calibration data;
* ``model.safetensors``: the optimized model's state dict.

Loading rebuilds the base, replays the recipe and loads the tensors strictly,
so a round trip is exact.

Example::

    >>> import samfx, tempfile
    >>> fast = samfx.optimize(samfx.models.build("sam_vit_b", small=True), ["split_qkv"])
    >>> path = samfx.save(fast, tempfile.mkdtemp())
    >>> again = samfx.load(path)
    >>> sorted(again.state_dict()) == sorted(fast.state_dict())
    True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from .models import CheckpointError, build
from .passes.base import PassConfig

__all__ = ["FORMAT", "load", "save"]

FORMAT = "samfx-model/1"
_RECIPE = "samfx.json"
_WEIGHTS = "model.safetensors"


def save(model: nn.Module, path: str | Path) -> Path:
    """Write an optimized model (from :func:`samfx.optimize`) to directory ``path``."""
    from safetensors.torch import save_model

    from . import __version__
    from .pipeline import report_of

    report = report_of(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    recipe = {
        "format": FORMAT,
        "samfx": __version__,
        "family": report.family,
        "base": getattr(model, "samfx_zoo", None),
        "passes": [{"config": p.config, "replay": p.replay} for p in report.passes],
    }
    save_model(model, str(path / _WEIGHTS), metadata={"format": FORMAT})
    (path / _RECIPE).write_text(json.dumps(recipe, indent=2))
    return path


def read_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    recipe_file = path / _RECIPE
    if not recipe_file.is_file():
        raise CheckpointError(f"{path} is not a saved samfx model (no {_RECIPE})")
    try:
        recipe = json.loads(recipe_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{recipe_file} is corrupt: {err}") from err
    if recipe.get("format") != FORMAT:
        raise CheckpointError(f"{recipe_file} has format {recipe.get('format')!r}; this samfx reads {FORMAT!r}")
    return recipe


def load(path: str | Path, base: nn.Module | None = None) -> nn.Module:
    """Load a model saved by :func:`save`.

    Args:
        path: the directory :func:`save` wrote.
        base: the original (unoptimized) model, needed when it did not come from
            the zoo; its weights are replaced by the saved ones.

    Raises:
        CheckpointError: not a samfx directory, an unknown format, a missing
            base, or tensors that do not fit.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from .pipeline import optimize

    recipe = read_recipe(path)
    if base is None:
        if not recipe.get("base"):
            raise CheckpointError(f"{path} was optimized from a model outside the zoo: pass base=<that model>")
        base = build(recipe["base"]["name"], small=recipe["base"]["small"])
    configs = [PassConfig.from_dict(p["config"]) for p in recipe["passes"]]
    replays = [p.get("replay", {}) for p in recipe["passes"]]
    model = optimize(base, configs, replays=replays)
    weights = Path(path) / _WEIGHTS
    try:
        load_model(model, str(weights), strict=True)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"cannot load {weights}: {err}") from err
    return model
