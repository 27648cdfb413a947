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
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from ..capture import CapturedModel

__all__ = [
    "BackoffFn",
    "FidelityFloorError",
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


class FidelityFloorError(PassError):
    """A lossy pass could not keep the model above the fidelity floor.

    Raised by :func:`samfx.pipeline.run_passes` when the pass's output, and
    every weaker config its back-off offered, measured a box-prompt mask IoU
    against the original below ``min_box_iou`` on the held-out images. The
    message names the pass, the best figure, the floor and what to try; the
    model is left as it was before the pass.

    Attributes:
        pass_name: the pass.
        floor: the ``min_box_iou`` asked for.
        attempts: per config tried, its options and measured figures.
    """

    def __init__(self, message: str, pass_name: str = "", floor: float = 0.0,
                 attempts: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(message)
        self.pass_name, self.floor, self.attempts = pass_name, floor, list(attempts)


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
        min_box_iou: the fidelity floor the pipeline holds every lossy pass to
            (box-prompt mask IoU against the original on :meth:`held_out_set`);
            ``None``: no floor.
        held_out_images: images (names, files, arrays or
            :class:`samfx.data.ImageSample`) the floor is measured on; empty:
            the package's fidelity photos that no pass calibrates on.
    """

    calibration_images: list[np.ndarray] = field(default_factory=list)
    seed: int = 0
    progress: bool = False
    replay: dict[str, Any] | None = None
    min_box_iou: float | None = None
    held_out_images: list[Any] = field(default_factory=list)

    def calibration_set(self, default: Sequence[str | np.ndarray] = ()) -> list[str | np.ndarray]:
        """The images every data-driven pass of one run calibrates on: the
        caller's ``calibration_images``, else ``default`` (the pass's package
        image names, which are never among :meth:`held_out_set`'s defaults).
        Fidelity is measured on other images.

        Example::

            >>> PassContext().calibration_set(("chelsea",))
            ['chelsea']
        """
        return list(self.calibration_images) or list(default)

    def held_out_set(self) -> list[Any]:
        """The images the fidelity floor is measured on, never ones a pass
        calibrates on: the caller's ``held_out_images``, else the package's
        fidelity photos (:data:`samfx.data.DEFAULT_IMAGES`) that are not among
        the calibration images.

        Raises:
            PassError: a held-out image is also a calibration image, or no
                default photo is left.

        Example::

            >>> PassContext().held_out_set()
            ['coins', 'astronaut', 'coffee']
        """
        from ..data import DEFAULT_IMAGES, ImageSample, image_digest, load_images

        def digests(items: Sequence[Any]) -> dict[str, str]:
            samples = [i for i in items if isinstance(i, ImageSample)]
            others = [i for i in items if not isinstance(i, ImageSample)]
            named = {image_digest(s.image): s.name for s in samples}
            if others:
                named.update({image_digest(a): n for a, n in zip(*load_images(others, "held-out"))})
            return named

        calibration = digests(self.calibration_images) if self.calibration_images else {}
        if self.held_out_images:
            overlap = [name for digest, name in digests(self.held_out_images).items() if digest in calibration]
            if overlap:
                raise PassError(f"the held-out images {overlap} are also calibration images: the fidelity floor "
                                "is measured on images no pass calibrates on; give disjoint images")
            return list(self.held_out_images)
        held_out = [name for digest, name in digests(list(DEFAULT_IMAGES)).items() if digest not in calibration]
        if not held_out:
            raise PassError("the calibration images include every default held-out photo "
                            f"({', '.join(DEFAULT_IMAGES)}): give held-out images for the fidelity floor "
                            "(optimize(..., held_out_images=[...]), or --images on the CLI)")
        return held_out


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
        fidelity_floor: for a lossy pass held to a floor (filled in by the
            pipeline): ``min_box_iou``, the held-out ``images`` and ``boxes``,
            every config tried with its measured ``box_iou`` (mean and worst)
            and ``gt_miou`` where there is ground truth, and ``backed_off``.
    """

    changed: bool
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    replay: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    time_s: float = 0.0
    fidelity_floor: dict[str, Any] | None = None


@dataclass
class PassResult:
    model: CapturedModel
    report: PassReport


PassFn = Callable[[CapturedModel, PassConfig, PassContext], PassResult]
#: A pass's own postcondition on the model it returned; raises when it does not hold.
EnsuresFn = Callable[[CapturedModel, PassConfig], None]
#: A lossy pass's next weaker config (fewer channels pruned, more layers kept
#: float, ...) after one that fell below the fidelity floor; ``None`` when
#: nothing weaker is left.
BackoffFn = Callable[[PassConfig], "PassConfig | None"]


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
        ensures: the pass's own check of its output, run by the pipeline after
            the general one (graphs lint and run on the meta device).
        backoff: for a lossy pass, its next weaker config; the pipeline re-runs
            the pass from the model before it with that config while the
            output falls below the fidelity floor (``None``: it refuses at once).
    """

    name: str
    config_cls: type[PassConfig]
    run: PassFn
    requires: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    exact: bool = False
    doc: str = ""
    data_driven: bool = False
    ensures: EnsuresFn | None = None
    backoff: BackoffFn | None = None

    @property
    def guarded(self) -> bool:
        """Whether the pipeline holds the pass to the fidelity floor (every pass
        that does not promise float-exact outputs)."""
        return not self.exact


_PASSES: dict[str, PassInfo] = {}


def register_pass(
    name: str,
    config_cls: type[PassConfig],
    *,
    requires: tuple[str, ...] = (),
    after: tuple[str, ...] = (),
    exact: bool = False,
    data_driven: bool = False,
    ensures: EnsuresFn | None = None,
    backoff: BackoffFn | None = None,
) -> Callable[[PassFn], PassFn]:
    """Register a pass entry point under ``name``.

    ``requires`` and ``after`` order it among other passes; ``ensures`` checks
    the model it returns; ``backoff`` gives a lossy pass's weaker configs for
    the fidelity floor (see :class:`PassInfo`).

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
                                 data_driven, ensures, backoff)
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
