"""The pass contract: a frozen config, one entry point, declared ordering.

A pass is a module under ``samfx/passes`` that defines a config dataclass and a
function ``(captured, config, context) -> PassResult``, registered with
:func:`register_pass`. The function receives a private :class:`CapturedModel`
(never the user's model), rewrites its graphs and module tree, and returns the
model with a :class:`PassReport` of what it did; the pipeline
(:func:`samfx.pipeline.run_passes`) fills the report's name, config and time,
checks the model after the pass (every graph linted and run on fake tensors,
then the pass's own ``ensures``) and names the pass in any error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from ..capture import CapturedModel

__all__ = [
    "PassConfig",
    "PassContext",
    "PassError",
    "PassFailed",
    "PassInfo",
    "PassReport",
    "PassResult",
    "get_pass",
    "list_passes",
    "register_pass",
    "unregister_pass",
]


class PassError(ValueError):
    """A pass list that cannot run: unknown names, bad order, bad options."""


class PassFailed(PassError, RuntimeError):
    """A pass raised, or left a model that fails the pipeline's checks.

    The message names the pass and the passes before it; the original error is
    ``__cause__``. It is a :class:`PassError` (the CLI reports it in one line)
    and a ``RuntimeError`` (what an error from inside a pass used to be).
    """


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

    def calibration_set(self, default: Sequence[str | np.ndarray] = ()) -> list[str | np.ndarray]:
        """The held-out images every data-driven pass of one run calibrates on:
        the caller's ``calibration_images``, else ``default`` (the pass's
        package image names). Fidelity is measured on other images.

        Example::

            >>> PassContext().calibration_set(("chelsea",))
            ['chelsea']
        """
        return list(self.calibration_images) or list(default)


@dataclass
class PassReport:
    """What one pass did.

    A pass gives what it did; the pipeline fills in which pass, with which
    config, and how long it took.

    Attributes:
        changed: whether the pass rewrote anything.
        summary: one line for tables.
        details: counts and measurements, JSON-serialisable.
        skipped: reasons for parts the pass left untouched.
        replay: what a later :func:`samfx.load` needs to redo the pass exactly
            without data (for data-driven passes).
        name: the pass (filled in by the pipeline).
        config: the config as a dict (filled in by the pipeline).
        time_s: wall time (filled in by the pipeline).
    """

    changed: bool
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    replay: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    time_s: float = 0.0


@dataclass
class PassResult:
    model: CapturedModel
    report: PassReport


PassFn = Callable[[CapturedModel, PassConfig, PassContext], PassResult]
#: A pass's own postcondition on the model it returned; raises when it does not hold.
EnsuresFn = Callable[[CapturedModel, PassConfig], None]


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
        ensures: the pass's own check of its output, run by the pipeline after
            the general one (graphs lint and run on fake tensors).
    """

    name: str
    config_cls: type[PassConfig]
    run: PassFn
    requires: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    exact: bool = False
    doc: str = ""
    ensures: EnsuresFn | None = None


_PASSES: dict[str, PassInfo] = {}


def register_pass(
    name: str,
    config_cls: type[PassConfig],
    *,
    requires: tuple[str, ...] = (),
    after: tuple[str, ...] = (),
    exact: bool = False,
    ensures: EnsuresFn | None = None,
) -> Callable[[PassFn], PassFn]:
    """Register a pass entry point under ``name``.

    ``requires`` and ``after`` order it among other passes; ``ensures`` checks
    the model it returns (see :class:`PassInfo`).

    Example::

        >>> from dataclasses import dataclass
        >>> from samfx.passes import PassConfig, PassReport, PassResult, register_pass, unregister_pass
        >>> @dataclass(frozen=True)
        ... class NoOpConfig(PassConfig):
        ...     pass
        >>> @register_pass("no_op_example", NoOpConfig, exact=True)
        ... def no_op(captured, config, context):
        ...     return PassResult(captured, PassReport(changed=False, summary="nothing"))
        >>> import samfx
        >>> model = samfx.optimize(samfx.models.build("sam_vit_b", small=True), ["no_op_example"])
        >>> report = model.samfx_report.passes[0]
        >>> report.name, report.config["pass"], report.summary
        ('no_op_example', 'no_op_example', 'nothing')
        >>> unregister_pass("no_op_example").name
        'no_op_example'
    """

    def decorate(fn: PassFn) -> PassFn:
        if not (dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen):
            raise TypeError(f"{config_cls.__name__} must be a frozen dataclass")
        config_cls.name = name
        doc = (fn.__doc__ or "").strip().splitlines()
        _PASSES[name] = PassInfo(name, config_cls, fn, tuple(requires), tuple(after), exact, doc[0] if doc else "",
                                 ensures)
        return fn

    return decorate


def unregister_pass(name: str) -> PassInfo:
    """Remove the pass registered under ``name`` (a plug-in or a test's); returns it."""
    return _PASSES.pop(get_pass(name).name)


def get_pass(name: str) -> PassInfo:
    try:
        return _PASSES[name]
    except KeyError:
        raise PassError(f"unknown pass {name!r}; available passes: {', '.join(sorted(_PASSES))}") from None


def list_passes() -> list[PassInfo]:
    return list(_PASSES.values())
