"""The pass contract: a frozen config, one entry point, declared ordering.

A pass is a module under ``samfx/passes`` that defines a config dataclass and a
function ``(captured, config, context) -> PassResult``, registered with
:func:`register_pass`. The function receives a private :class:`CapturedModel`
(never the user's model), rewrites its graphs and module tree, and returns the
model with a :class:`PassReport`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from ..capture import CapturedModel

__all__ = [
    "PassConfig",
    "PassContext",
    "PassError",
    "PassInfo",
    "PassReport",
    "PassResult",
    "get_pass",
    "list_passes",
    "register_pass",
]


class PassError(ValueError):
    """A pass list that cannot run: unknown names, bad order, bad options."""


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass configuration.

    Subclasses are frozen dataclasses; ``name`` and ``version`` are filled in by
    :func:`register_pass`. A config is checked when it is built: every option
    against its annotated type (lists become tuples), then against the pass's
    own rules in :meth:`validate`, so a bad option fails before any capture. A
    config round-trips through :meth:`to_dict` / :meth:`from_dict`, so a pass
    list is a reproducible recipe; recipe files go through the same checks.

    Example::

        >>> import samfx
        >>> samfx.HyperConfig(max_bits=3.5)
        Traceback (most recent call last):
        ...
        samfx.passes.base.PassError: hyper: max_bits must be an integer, got 3.5
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for option in dataclasses.fields(self):
            value = _tuples(getattr(self, option.name))
            if not _conforms(value, hints[option.name]):
                raise PassError(f"{self.name or type(self).__name__}: {option.name} must be "
                                f"{_describe(hints[option.name])}, got {value!r}")
            object.__setattr__(self, option.name, value)
        self.validate()

    def validate(self) -> None:
        """Check the options against the pass's rules; raise :class:`PassError`
        naming the option, its value and what is allowed. Types are already checked."""

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.name, "version": self.version, "options": dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: Any) -> "PassConfig":
        """The config a :meth:`to_dict` record describes.

        Raises:
            PassError: not a record, an unknown pass or option, a newer config
                version, or an option of the wrong type or out of range.
        """
        if not isinstance(data, dict) or not isinstance(data.get("pass"), str):
            raise PassError(f"a pass record is {{'pass': name, 'version': n, 'options': {{...}}}}, got {data!r}")
        unknown = sorted(set(data) - {"pass", "version", "options"})
        if unknown:
            raise PassError(f"{data['pass']}: unknown keys {unknown} in the pass record (allowed: pass, version, options)")
        info = get_pass(data["pass"])
        version = data.get("version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise PassError(f"{info.name}: version must be an integer >= 1, got {version!r}")
        if version > info.config_cls.version:
            raise PassError(f"{info.name} config version {version} is newer than this samfx "
                            f"(supports {info.config_cls.version}): upgrade samfx")
        options = data.get("options", {})
        if not isinstance(options, dict):
            raise PassError(f"{info.name}: options must be a mapping of option names to values, got {options!r}")
        allowed = [f.name for f in dataclasses.fields(info.config_cls)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise PassError(f"{info.name}: unknown options {unknown}; its options are {allowed}")
        return info.config_cls(**options)


def _tuples(value: Any) -> Any:
    """JSON turns tuples into lists; configs are frozen and hashable."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the type ``hint`` names (the subset configs use)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args))
    return isinstance(value, origin or hint)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of ({_describe(args[0])})"
        return f"a list of {len(args)}: ({', '.join(_describe(a) for a in args)})"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
            type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))


@dataclass
class PassContext:
    """What a pass may use besides the model.

    Attributes:
        calibration_images: unlabeled ``H x W x 3`` uint8 images for data-driven
            passes (none for data-free ones).
        seed: seed for any randomness a pass uses.
        progress: whether to show progress bars on long steps.
        replay: what this pass recorded in ``PassReport.replay`` when the model
            was first optimized; given when :func:`samfx.load` redoes the pass.
    """

    calibration_images: list[np.ndarray] = field(default_factory=list)
    seed: int = 0
    progress: bool = False
    replay: dict[str, Any] | None = None


@dataclass
class PassReport:
    """What one pass did.

    Attributes:
        name: the pass.
        config: the config as a dict.
        changed: whether the pass rewrote anything.
        summary: one line for tables.
        details: counts and measurements, JSON-serialisable.
        skipped: reasons for parts the pass left untouched.
        replay: what a later :func:`samfx.load` needs to redo the pass exactly
            without data (for data-driven passes).
        time_s: wall time, filled in by the pipeline.
    """

    name: str
    config: dict[str, Any]
    changed: bool
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    replay: dict[str, Any] = field(default_factory=dict)
    time_s: float = 0.0


@dataclass
class PassResult:
    model: CapturedModel
    report: PassReport


PassFn = Callable[[CapturedModel, PassConfig, PassContext], PassResult]


@dataclass(frozen=True)
class PassInfo:
    """A registered pass.

    Attributes:
        name: the name users write.
        config_cls: its config dataclass.
        run: the entry point.
        requires: passes that must run before this one; added if missing.
        after: passes that, when present, must come before this one.
        exact: whether the pass promises float-exact outputs.
        doc: one line for ``samfx passes``.
    """

    name: str
    config_cls: type[PassConfig]
    run: PassFn
    requires: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    exact: bool = False
    doc: str = ""


_PASSES: dict[str, PassInfo] = {}


def register_pass(
    name: str,
    config_cls: type[PassConfig],
    *,
    requires: tuple[str, ...] = (),
    after: tuple[str, ...] = (),
    exact: bool = False,
) -> Callable[[PassFn], PassFn]:
    """Register a pass entry point under ``name``.

    Example::

        >>> from dataclasses import dataclass
        >>> from samfx.passes import PassConfig, PassReport, PassResult, register_pass
        >>> @dataclass(frozen=True)
        ... class NoOpConfig(PassConfig):
        ...     pass
        >>> @register_pass("no_op_example", NoOpConfig, exact=True)
        ... def no_op(captured, config, context):
        ...     return PassResult(captured, PassReport("no_op_example", config.to_dict(), False, "nothing"))
    """

    def decorate(fn: PassFn) -> PassFn:
        if not (dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen):
            raise TypeError(f"{config_cls.__name__} must be a frozen dataclass")
        config_cls.name = name
        doc = (fn.__doc__ or "").strip().splitlines()
        _PASSES[name] = PassInfo(name, config_cls, fn, tuple(requires), tuple(after), exact, doc[0] if doc else "")
        return fn

    return decorate


def get_pass(name: str) -> PassInfo:
    try:
        return _PASSES[name]
    except KeyError:
        raise PassError(f"unknown pass {name!r}; available passes: {', '.join(sorted(_PASSES))}") from None


def list_passes() -> list[PassInfo]:
    return list(_PASSES.values())
