"""Pass lists written as text, for the command line: ``name:key=value:key=value``,
passes separated by commas.

Values are parsed by the type of the config field they set: ``float``,
``int``, ``bool`` (``true``/``false``, ``yes``/``no``, ``1``/``0``), ``str``,
``none`` where a field may be ``None``, and tuples with ``+`` between items
(``roles=image_encoder+mask_decoder``, an empty value for an empty tuple),
pairs inside a tuple with ``=`` (``overrides=blocks.0.mlp=0.2+blocks.1.mlp=0.1``).

Example::

    >>> from samfx.passes.options import parse_passes
    >>> parse_passes("split_qkv,prune:mlp=0.3:importance=fluctuation")[1]
    PruneConfig(mlp=0.3, heads=0.0, head_dims=0.0, embed=0.0, importance='fluctuation', compensate=True, \
global_ranking=False, round_to=1, overrides=(), calibration_images=8, noise=0.01)
    >>> parse_passes("prune:mlpp=0.3")
    Traceback (most recent call last):
    ...
    samfx.passes.base.PassError: prune has no option 'mlpp'; its options: mlp, heads, head_dims, embed, \
importance, compensate, global_ranking, round_to, overrides, calibration_images, noise
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from .base import PassConfig, PassError, get_pass

__all__ = ["PassOption", "format_value", "parse_pass", "parse_passes", "pass_options"]

_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")
#: separators of tuple items, by nesting depth
_SEPARATORS = ("+", "=")


@dataclass(frozen=True)
class PassOption:
    """One field of a pass's config: its name, type (as the syntax reads) and default."""

    name: str
    type: Any
    default: Any

    @property
    def type_name(self) -> str:
        return _type_name(self.type)

    def __str__(self) -> str:
        return f"{self.name}={format_value(self.default)} ({self.type_name})"


def pass_options(name: str) -> list[PassOption]:
    """The options of pass ``name``, in declaration order."""
    config_cls = get_pass(name).config_cls
    hints = typing.get_type_hints(config_cls)
    return [PassOption(f.name, hints[f.name], f.default) for f in dataclasses.fields(config_cls)]


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _type_name(tp: Any, depth: int = 0) -> str:
    union = _union_args(tp)
    if union is not None:
        return " or ".join("none" if a is type(None) else _type_name(a, depth) for a in union)
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        separator = _SEPARATORS[min(depth, len(_SEPARATORS) - 1)]
        if len(args) == 2 and args[1] is Ellipsis:
            return f"{_type_name(args[0], depth + 1)}{separator}..."
        return separator.join(_type_name(a, depth + 1) for a in args)
    return getattr(tp, "__name__", str(tp))


def format_value(value: Any, depth: int = 0) -> str:
    """A value written in the option syntax (``parse_passes`` reads it back)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return _SEPARATORS[min(depth, len(_SEPARATORS) - 1)].join(format_value(v, depth + 1) for v in value)
    return str(value)


def _parse(text: str, tp: Any, depth: int = 0) -> Any:
    """``text`` as a value of type ``tp``; ValueError when it is not one."""
    union = _union_args(tp)
    if union is not None:
        if type(None) in union and text.lower() in ("none", "null"):
            return None
        for arg in union:
            if arg is not type(None):
                try:
                    return _parse(text, arg, depth)
                except ValueError:
                    continue
        raise ValueError
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        separator = _SEPARATORS[min(depth, len(_SEPARATORS) - 1)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse(item, args[0], depth + 1) for item in text.split(separator)) if text else ()
        items = text.rsplit(separator, len(args) - 1) if depth else text.split(separator)
        if len(items) != len(args):
            raise ValueError
        return tuple(_parse(item, arg, depth + 1) for item, arg in zip(items, args))
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    if tp is str:
        if not text:
            raise ValueError
        return text
    raise ValueError


def parse_pass(spec: str) -> PassConfig:
    """One pass written as ``name`` or ``name:key=value:...``, as its config.

    Raises:
        PassError: an unknown pass, an unknown option (the message lists the
            pass's options), a value that is not of the option's type (the
            message names the option, the value and the type), or a value the
            config rejects.
    """
    name, *assignments = spec.strip().split(":")
    info = get_pass(name.strip())
    options = {o.name: o for o in pass_options(info.name)}
    values: dict[str, Any] = {}
    for assignment in assignments:
        key, equals, text = assignment.partition("=")
        key = key.strip()
        if not equals:
            raise PassError(f"{info.name}: option {assignment!r} is not KEY=VALUE")
        if key not in options:
            raise PassError(f"{info.name} has no option {key!r}; its options: {', '.join(options)}")
        if key in values:
            raise PassError(f"{info.name}: option {key} given twice")
        try:
            values[key] = _parse(text.strip(), options[key].type)
        except ValueError:
            raise PassError(f"{info.name}: option {key}={text!r} is not a {options[key].type_name}") from None
    try:
        return info.config_cls(**values)
    except PassError:
        raise
    except (TypeError, ValueError) as err:
        raise PassError(f"{info.name}: {err}") from None


def parse_passes(text: str) -> list[PassConfig]:
    """A comma-separated pass list (see the module doc) as configs; empty items are skipped."""
    return [parse_pass(spec) for spec in text.split(",") if spec.strip()]
