"""The pass contract: a frozen config, one entry point, declared ordering.

A pass is a module under ``samfx/passes`` that defines a config dataclass and a
function ``(captured, config, context) -> PassResult``, registered with
:func:`register_pass`. The function receives a private :class:`CapturedModel`
(never the user's model), rewrites its graphs and module tree, and returns the
model with a :class:`PassReport`.
"""

from __future__ import annotations

import dataclasses
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
    :func:`register_pass`. A config round-trips through :meth:`to_dict` /
    :meth:`from_dict`, so a pass list is a reproducible recipe.
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.name, "version": self.version, "options": dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "PassConfig":
        info = get_pass(data["pass"])
        if data.get("version", 1) > info.config_cls.version:
            raise PassError(
                f"{data['pass']} config version {data['version']} is newer than this samfx "
                f"(supports {info.config_cls.version})"
            )
        return info.config_cls(**_tuples(data.get("options", {})))


def _tuples(options: dict[str, Any]) -> dict[str, Any]:
    """JSON turns tuples into lists; configs are frozen and hashable."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


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
        data_driven: whether the pass may use calibration images (its options say when).
    """

    name: str
    config_cls: type[PassConfig]
    run: PassFn
    requires: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    exact: bool = False
    doc: str = ""
    data_driven: bool = False


_PASSES: dict[str, PassInfo] = {}


def register_pass(
    name: str,
    config_cls: type[PassConfig],
    *,
    requires: tuple[str, ...] = (),
    after: tuple[str, ...] = (),
    exact: bool = False,
    data_driven: bool = False,
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
        _PASSES[name] = PassInfo(name, config_cls, fn, tuple(requires), tuple(after), exact, doc[0] if doc else "",
                                 data_driven)
        return fn

    return decorate


def get_pass(name: str) -> PassInfo:
    try:
        return _PASSES[name]
    except KeyError:
        raise PassError(f"unknown pass {name!r}; available passes: {', '.join(sorted(_PASSES))}") from None


def list_passes() -> list[PassInfo]:
    return list(_PASSES.values())
