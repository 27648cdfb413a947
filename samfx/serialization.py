"""Save and load optimized models.

A saved model is a directory:

* ``samfx.json``: the format version, how to build the base architecture (a zoo
  name, or nothing when the caller supplies the base model), the pass history
  (every :func:`samfx.optimize` call that made the model, each pass's config
  and the replay data it recorded, so loading redoes every rewrite exactly
  without calibration data), the SHA-256 of every other file, and its own;
* ``model.safetensors``: the optimized model's state dict. A module can ask for
  some of its tensors to be stored through a lossless tensor codec
  (``module.samfx_tensor_codecs()``, see :mod:`samfx.codecs`): the hyper pass's
  fixed-width runtime codes are entropy-coded this way, and integer index
  tables are deflated. The header's ``samfx.tensors`` entry (versioned JSON)
  names each encoded tensor's codec, parameters, dtype and shape; files without
  it hold plain tensors;
* ``report.json``: the optimize report (timings; not needed to load, not hashed).

Integrity: loading checks every hash before it reads a tensor and validates
the recipe against the pass configs' schema, so a damaged or edited file is
refused with a :class:`~samfx.models.CheckpointError` naming it. Writing is
atomic: files go into a temporary sibling directory that then replaces the
target, so an interrupted save leaves the old save or none, never a mix. The
same model saves to the same bytes (sorted metadata, no timestamps).

Loading rebuilds the base, replays the history, decodes the tensors and loads
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

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import CheckpointError, build, first_nonfinite, list_models
from .passes.base import PassConfig, PassError

__all__ = ["FORMAT", "check_output_dir", "load", "read_recipe", "save"]

FORMAT = "samfx-model/2"
#: Format 1 (one optimize call, no hashes) is still read.
_FORMATS = ("samfx-model/1", FORMAT)
_RECIPE = "samfx.json"
_WEIGHTS = "model.safetensors"
_REPORT = "report.json"
_TENSORS = "samfx.tensors"
_TENSORS_VERSION = 1
#: Integer tensors at least this large are deflated when that saves a tenth.
_DEFLATE_MIN = 1024
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.bool)}


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
        index = _tensor_index(weights, metadata[_TENSORS])
        state = {}
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            entry = index["tensors"].get(key)
            if entry is not None:
                try:
                    codec = get_tensor_codec(entry["codec"])
                except KeyError as err:
                    raise CheckpointError(f"{weights}: {key} uses {err.args[0]}") from None
                try:
                    tensor = codec.decode(tensor.numpy().tobytes(), entry["params"], _DTYPES[entry["dtype"]],
                                          tuple(entry["shape"]))
                except Exception as err:  # noqa: BLE001 - damaged codes fail anywhere in a decoder
                    raise CheckpointError(f"{weights}: the {entry['codec']} data of {key} is corrupt "
                                          f"({type(err).__name__}: {err})") from err
            state[key] = tensor
    for alias, key in index["aliases"].items():
        if key not in state:
            raise CheckpointError(f"{weights}: {alias} is stored as {key}, which the file does not hold")
        state[alias] = state[key]
    return state


def _tensor_index(weights: Path, text: str) -> dict[str, Any]:
    """The ``samfx.tensors`` header entry, checked field by field."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{weights}: the {_TENSORS} header entry is malformed: {what}")

    try:
        index = json.loads(text)
    except json.JSONDecodeError as err:
        raise bad(str(err)) from None
    if not isinstance(index, dict) or not isinstance(index.get("version", 1), int):
        raise bad("expected an object with an integer version")
    if index.get("version", 1) > _TENSORS_VERSION:
        raise CheckpointError(f"{weights} stores tensors in version {index['version']} of samfx's format; "
                              f"this samfx reads version {_TENSORS_VERSION}: upgrade samfx")
    tensors, aliases = index.setdefault("tensors", {}), index.setdefault("aliases", {})
    if not isinstance(tensors, dict) or not isinstance(aliases, dict):
        raise bad("tensors and aliases must be objects")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise bad("aliases map tensor names to tensor names")
    for key, entry in tensors.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("codec"), str)
                and isinstance(entry.get("params", {}), dict)):
            raise bad(f"{key}: expected codec (a string) and params (an object), got {entry!r}")
        if entry.get("dtype") not in _DTYPES:
            raise bad(f"{key}: dtype {entry.get('dtype')!r} is not one of {sorted(_DTYPES)}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                 for n in shape):
            raise bad(f"{key}: shape must be a list of sizes >= 0, got {shape!r}")
        entry.setdefault("params", {})
    return index


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _recipe_digest(recipe: dict[str, Any]) -> str:
    body = {k: v for k, v in recipe.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _replayable_history(model: nn.Module) -> list[dict[str, Any]]:
    """The model's optimize history, if :func:`load` can rebuild the model from it."""
    from .pipeline import history_of, structure_digest

    history = history_of(model)
    for call in range(1, len(history)):
        if history[call]["input"] != history[call - 1]["output"]:
            raise CheckpointError(
                f"cannot save: optimize call {call + 1} of this model's history was given a model that is not what "
                f"call {call} returned (its tensors' names, shapes or dtypes differ), so samfx.load could not "
                "rebuild it; optimize the original with every pass instead")
    if structure_digest(model) != history[-1]["output"]:
        raise CheckpointError(
            "cannot save: the model's tensors (names, shapes or dtypes) changed after samfx.optimize returned it, "
            "so samfx.load could not rebuild it from its recorded passes")
    return [{"passes": call["passes"], "input": call["input"], "output": call["output"]} for call in history]


def check_output_dir(path: str | Path, *, overwrite: bool = False) -> Path:
    """Check that :func:`save` may write directory ``path``; call it before long work.

    A missing directory (and missing parents) is fine, and so is an empty one
    or an earlier samfx save (replaced whole); anything else needs ``overwrite``.

    Raises:
        CheckpointError: ``path`` or a parent is a file, the nearest existing
            parent is not writable, or ``path`` holds other files and
            ``overwrite`` is false.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / _RECIPE).is_file() and not overwrite:
        raise CheckpointError(f"{path} is a directory that holds other files, not a samfx save; "
                              "refusing to replace it (overwrite=True, or --overwrite, replaces it)")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(f"cannot create {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {path}: {parent} is not writable")
    return path


def save(model: nn.Module, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write an optimized model (from :func:`samfx.optimize`) to directory ``path``, atomically.

    Args:
        model: the optimized model; its whole optimize history is recorded.
        path: the directory; an earlier save there is replaced whole.
        overwrite: also replace a directory that is not a samfx save.

    Raises:
        PassError: the model did not come from :func:`samfx.optimize`.
        CheckpointError: the output path is unusable (see :func:`check_output_dir`),
            or the model's history cannot be replayed (the reason is given).
    """
    from safetensors.torch import save_file

    from . import __version__
    from .pipeline import report_of

    report = report_of(model)
    history = _replayable_history(model)
    path = check_output_dir(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, index = _encoded_state(model)
    staging = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.samfx-tmp"
    staging.mkdir()
    try:
        # One metadata entry: safetensors writes its metadata map in hash order.
        save_file(tensors, str(staging / _WEIGHTS), metadata={_TENSORS: json.dumps(index, sort_keys=True)})
        recipe = {
            "format": FORMAT,
            "samfx": __version__,
            "family": report.family,
            "base": getattr(model, "samfx_zoo", None),
            "history": history,
            "files": {_WEIGHTS: _sha256(staging / _WEIGHTS)},
        }
        recipe["sha256"] = _recipe_digest(recipe)
        (staging / _RECIPE).write_text(json.dumps(recipe, indent=2, sort_keys=True))
        report.save(staging / _REPORT)
        _replace_dir(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _replace_dir(new: Path, path: Path) -> None:
    """Put directory ``new`` at ``path`` by renames: ``path`` holds the old files
    or the new ones, never a mix (a crash between the renames leaves the old
    directory beside it, hidden)."""
    if not path.exists():
        os.rename(new, path)
        return
    old = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.samfx-old"
    os.rename(path, old)
    os.rename(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _version(text: Any) -> tuple[int, ...] | None:
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?\S*", text) if isinstance(text, str) else None
    return tuple(int(g or 0) for g in match.groups()) if match else None


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The checked recipe of a saved model, with its history as ``"history"``
    (format 1 files hold one optimize call).

    Raises:
        CheckpointError: not a samfx directory, a corrupt or edited recipe, an
            unknown or newer format, or a field of the wrong type or value.
    """
    from . import __version__

    path = Path(path)
    recipe_file = path / _RECIPE
    if not recipe_file.is_file():
        raise CheckpointError(f"{path} is not a saved samfx model (no {_RECIPE})")
    try:
        recipe = json.loads(recipe_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{recipe_file} is corrupt: {err}") from err

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{recipe_file}: {what}")

    if not isinstance(recipe, dict):
        raise bad("expected a JSON object")
    if recipe.get("format") not in _FORMATS:
        raise bad(f"has format {recipe.get('format')!r}; this samfx reads {', '.join(_FORMATS)}")
    legacy = recipe["format"] != FORMAT
    allowed = {"format", "samfx", "family", "base"} | ({"passes"} if legacy else {"history", "files", "sha256"})
    unknown = sorted(set(recipe) - allowed)
    if unknown:
        raise bad(f"unknown keys {unknown} (allowed: {sorted(allowed)})")
    if not legacy and recipe.get("sha256") != _recipe_digest(recipe):
        raise bad("does not match its own SHA-256: the file is damaged or was edited")
    written = _version(recipe.get("samfx"))
    if written is None:
        raise bad(f"samfx must be the version that wrote it (like {__version__!r}), got {recipe.get('samfx')!r}")
    if written[:2] > _version(__version__)[:2]:
        raise bad(f"was written by samfx {recipe['samfx']}, newer than this samfx {__version__}: upgrade samfx")
    if not isinstance(recipe.get("family"), str):
        raise bad(f"family must be an adapter name, got {recipe.get('family')!r}")
    base = recipe.get("base")
    if base is not None and not (isinstance(base, dict) and set(base) == {"name", "small"}
                                 and base["name"] in list_models() and isinstance(base["small"], bool)):
        raise bad(f"base must be null or {{'name': a zoo model, 'small': true/false}}, got {base!r}")
    if legacy:
        recipe["history"] = [{"passes": recipe.pop("passes", None)}]
        recipe["files"] = {}
    history = recipe.get("history")
    if not isinstance(history, list) or not history:
        raise bad("history must be a non-empty list of optimize calls")
    for call in history:
        records = call.get("passes") if isinstance(call, dict) else None
        if not isinstance(records, list) or not all(
                isinstance(r, dict) and set(r) <= {"config", "replay"} and isinstance(r.get("replay", {}), dict)
                for r in records):
            raise bad(f"an optimize call is {{'passes': [{{'config': ..., 'replay': ...}}]}}, got {call!r}")
        try:
            call["configs"] = [PassConfig.from_dict(r.get("config")) for r in records]
        except PassError as err:
            raise bad(str(err)) from None
    files = recipe.get("files")
    if not isinstance(files, dict) or not all(
            f in (_WEIGHTS,) and isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h) for f, h in files.items()):
        raise bad(f"files must map {_WEIGHTS} to its SHA-256, got {files!r}")
    return recipe


def load(path: str | Path, base: nn.Module | None = None) -> nn.Module:
    """Load a model saved by :func:`save`.

    Args:
        path: the directory :func:`save` wrote.
        base: the original (unoptimized) model, needed when it did not come from
            the zoo; its weights are replaced by the saved ones (it is not modified).

    Raises:
        CheckpointError: not a samfx directory, an unknown format, a damaged or
            edited file (named), a missing or different base, or tensors that
            do not fit.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from .pipeline import optimize, structure_digest

    path = Path(path)
    recipe = read_recipe(path)
    for name, expected in recipe["files"].items():
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name} is missing")
        if _sha256(path / name) != expected:
            raise CheckpointError(f"{path / name} does not match the SHA-256 recorded in {path / _RECIPE}: "
                                  "the file is damaged or was changed")
    if base is None:
        if not recipe.get("base"):
            raise CheckpointError(f"{path} was optimized from a model outside the zoo: pass base=<that model>")
        base = build(recipe["base"]["name"], small=recipe["base"]["small"])
    model = base
    for number, call in enumerate(recipe["history"], 1):
        if "input" in call and structure_digest(model) != call["input"]:
            what = "the base model" if number == 1 else f"the result of optimize call {number - 1}"
            raise CheckpointError(f"{path}: {what} does not have the tensors (names, shapes, dtypes) that optimize "
                                  f"call {number} was given when the model was saved")
        try:
            model = optimize(model, call["configs"], replays=[r.get("replay", {}) for r in call["passes"]])
        except PassError as err:
            raise CheckpointError(f"{path}: cannot replay optimize call {number}: {err}") from err
    weights = path / _WEIGHTS
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
    bad = first_nonfinite(model.state_dict())
    if bad:
        raise CheckpointError(f"{weights} is corrupt: {bad}")
    return model
