"""Save and load optimized models.

A saved model is a directory:

* ``samfx.json``: the format version, how to build the base architecture (a zoo
  name, or nothing when the caller supplies the base model), and the pass
  recipe: each pass's config and the replay data it recorded, so loading redoes
  every rewrite exactly without calibration data;
* ``model.safetensors``: the optimized model's state dict. A module can ask for
  some of its tensors to be stored through a lossless tensor codec
  (``module.samfx_tensor_codecs()``, see :mod:`samfx.codecs`): the hyper pass's
  fixed-width runtime codes are entropy-coded this way, and integer index
  tables are deflated. The header's ``samfx.tensors`` entry (versioned JSON)
  names each encoded tensor's codec, parameters, dtype and shape; files without
  it hold plain tensors.

Loading rebuilds the base, replays the recipe, decodes the tensors and loads
them strictly, so a round trip is exact.

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

import torch
from torch import nn

from .models import CheckpointError, build
from .passes.base import PassConfig

__all__ = ["FORMAT", "load", "save"]

FORMAT = "samfx-model/1"
_RECIPE = "samfx.json"
_WEIGHTS = "model.safetensors"
_TENSORS = "samfx.tensors"
_TENSORS_VERSION = 1
#: Integer tensors at least this large are deflated when that saves a tenth.
_DEFLATE_MIN = 1024


def _declared_codecs(model: nn.Module) -> dict[str, tuple[str, dict[str, Any]]]:
    declared = {}
    for prefix, module in model.named_modules():
        codecs = getattr(module, "samfx_tensor_codecs", None)
        if callable(codecs):
            for local, codec in codecs().items():
                declared[f"{prefix}.{local}" if prefix else local] = codec
    return declared


def _encoded_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict to write: tensors through their codecs, aliases (tied
    weights) stored once."""
    from .codecs import ZLIB, get_tensor_codec

    declared = _declared_codecs(model)
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key, tensor in model.state_dict().items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                    tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        name, params = declared.get(key, (None, {}))
        if name is None and not tensor.is_floating_point() and tensor.numel() >= _DEFLATE_MIN:
            name = ZLIB.name
        data = get_tensor_codec(name).encode(tensor, params) if name else None
        if data is None or (name == ZLIB.name and len(data) > 0.9 * tensor.numel() * tensor.element_size()):
            tensors[key] = tensor.detach().cpu().contiguous()
            continue
        tensors[key] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
        entries[key] = {"codec": name, "params": params, "dtype": str(tensor.dtype).removeprefix("torch."),
                        "shape": list(tensor.shape)}
    return tensors, {"version": _TENSORS_VERSION, "tensors": entries, "aliases": aliases}


def _read_state(weights: Path) -> dict[str, torch.Tensor] | None:
    """The decoded state dict of a file written by :func:`save`, or ``None`` for
    a file of plain tensors (earlier samfx versions)."""
    from safetensors import safe_open

    from .codecs import get_tensor_codec

    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if _TENSORS not in metadata:
            return None
        index = json.loads(metadata[_TENSORS])
        if index.get("version", 1) > _TENSORS_VERSION:
            raise CheckpointError(f"{weights} stores tensors in version {index['version']} of samfx's format; "
                                  f"this samfx reads version {_TENSORS_VERSION}: upgrade samfx")
        state = {}
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            entry = index["tensors"].get(key)
            if entry is not None:
                try:
                    codec = get_tensor_codec(entry["codec"])
                except KeyError as err:
                    raise CheckpointError(f"{weights}: {key} uses {err.args[0]}") from None
                tensor = codec.decode(tensor.numpy().tobytes(), entry["params"], getattr(torch, entry["dtype"]),
                                      tuple(entry["shape"]))
            state[key] = tensor
    for alias, key in index.get("aliases", {}).items():
        state[alias] = state[key]
    return state


def save(model: nn.Module, path: str | Path) -> Path:
    """Write an optimized model (from :func:`samfx.optimize`) to directory ``path``."""
    from safetensors.torch import save_file

    from ._version import __version__
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
    tensors, index = _encoded_state(model)
    save_file(tensors, str(path / _WEIGHTS), metadata={"format": FORMAT, _TENSORS: json.dumps(index)})
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
        state = _read_state(weights)
        if state is None:
            load_model(model, str(weights), strict=True)
        else:
            model.load_state_dict(state, strict=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"cannot load {weights}: {err}") from err
    return model
