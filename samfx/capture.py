"""Capture SAM-family components as torch.fx graphs that passes rewrite.

Design (see ``docs/design.md``): each component (image encoder, prompt encoder,
mask decoder) is symbolically traced with a recipe from its family's adapter.
The traced graphs keep tensor shapes symbolic, so a captured encoder accepts any
batch and a captured decoder any number of prompts, and they keep every
``nn.Linear``/``nn.Conv2d`` as a ``call_module`` node, so passes can swap
modules. Python arguments that steer control flow (``multimask_output``, which
prompts are given) are specialised: one graph per value, chosen at run time.

A captured component stays an instance of its original class (a subclass, to
be exact) with all attributes and helper methods upstream tools use
(``img_size``, ``get_dense_pe()``, ...); only ``forward`` runs the graph. The
graph's code refers to submodules through ``self``, so the module tree of the
component is the single owner of every parameter.
"""

from __future__ import annotations

import builtins
import contextlib
import dis
import copy
import inspect
import itertools
import linecache
import operator
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from .adapters import Adapter, find_adapter
from .adapters.base import PRESENT, ComponentSpec, TraceRecipe, class_name

__all__ = [
    "CaptureError",
    "CapturedModel",
    "Component",
    "OpaqueMethodCall",
    "SourcedFloat",
    "SourcedInt",
    "capture",
    "fake_run",
    "input_check",
    "literal_source",
    "meta_args",
    "module_caches_kept",
    "on_meta",
]


class CaptureError(RuntimeError):
    """A component could not be turned into a graph."""


GraphKey = tuple[Any, ...]


@dataclass
class Component:
    """One captured part of a model.

    Attributes:
        role: ``image_encoder``, ``prompt_encoder`` or ``mask_decoder``.
        path: attribute path from the model root ("" for a bare component).
        root: the component module; owns every parameter the graphs use.
        graphs: one ``torch.fx.Graph`` per specialisation of the static arguments.
        spec: the adapter's spec it was captured with.
    """

    role: str
    path: str
    root: nn.Module
    graphs: dict[GraphKey, fx.Graph]
    spec: ComponentSpec
    signature: inspect.Signature
    static_names: tuple[str, ...]
    invalid: dict[GraphKey, ValueError] = field(default_factory=dict)
    _compiled: dict[GraphKey, Callable[..., Any]] = field(default_factory=dict, repr=False)
    _replaced: set[str] = field(default_factory=set, repr=False)

    # -- analysis views -------------------------------------------------------
    def graph_module(self, key: GraphKey | None = None) -> fx.GraphModule:
        """A ``GraphModule`` view of one graph over the live module tree.

        Its submodules are the component's own objects, so analysis through the
        view sees the current weights; structural edits must still go through
        :meth:`set_submodule` so that every graph sees them.
        """
        if key is None:
            key = next(iter(self.graphs))
        return fx.GraphModule(self.root, self.graphs[key], class_name=f"{type(self.root).__name__}Graph")

    def example_args(self, key: GraphKey) -> tuple[Any, ...] | None:
        """Positional example arguments for the graph ``key`` (from the adapter)."""
        statics = {n: v for n, v in zip(self.static_names, key) if v is not PRESENT}
        example = self.spec.variant_example(statics)
        if example is None:
            return None
        return tuple(example.get(name, p.default) for name, p in self.signature.parameters.items())

    def propagate_shapes(self) -> None:
        """Record ``node.meta["val"]`` (a fake tensor or value) on every node of
        every graph, from the adapter's example inputs; computes nothing real."""
        for key, graph in self.graphs.items():
            args = self.example_args(key)
            if args is None:
                raise CaptureError(f"{self.role}: the adapter gave no example inputs to propagate shapes with")
            with fake_run(self.root) as fakes:
                _ShapeRecorder(self.root, graph).run(*fakes(args))

    def nodes(self) -> Iterator[tuple[GraphKey, fx.Node]]:
        for key, graph in self.graphs.items():
            for node in graph.nodes:
                yield key, node

    def trace_submodule(self, path: str, module: nn.Module) -> fx.Graph:
        """Trace ``module``, meant to be installed at ``path``, with this
        component's recipe; call targets and module stacks are given from the
        component's root, so the nodes can be copied into its graphs.

        Passes that change what a block computes in ways its graph does not
        expose (sizes baked into upstream code) trace a changed copy of the block.
        """
        recipe = self.spec.recipe
        try:
            with _patched(module, recipe):
                graph = _tidy(_RecipeTracer(recipe, None, {}).trace(module), module)
        except Exception as err:  # torch.fx and upstream code raise many types; name the module
            raise CaptureError(f"cannot trace {type(module).__name__} for {path}: {type(err).__name__}: {err}") from err
        for node in graph.nodes:
            if node.op in ("call_module", "get_attr"):
                node.target = f"{path}.{node.target}"
            stack = node.meta.get("nn_module_stack", {})
            node.meta["nn_module_stack"] = {path: (path, type(module)),
                                            **{f"{path}.{k}": (f"{path}.{v[0]}", v[1]) for k, v in stack.items()}}
        return graph

    # -- edits ----------------------------------------------------------------
    def set_submodule(self, target: str, module: nn.Module) -> None:
        """Install ``module`` at ``target`` (creating parents), replacing any."""
        parent_path, _, name = target.rpartition(".")
        parent = self.root.get_submodule(parent_path) if parent_path else self.root
        setattr(parent, name, module)

    def delete_unused_submodules(self) -> list[str]:
        """Remove leaf modules and parameters no graph refers to any more.

        Only targets that some pass replaced are candidates: modules that the
        graphs never referred to (helpers upstream methods use) are kept.
        """
        used = {
            node.target
            for _, node in self.nodes()
            if node.op in ("call_module", "get_attr")
        }
        removed = []
        for target in sorted(self._replaced - used):
            parent_path, _, name = target.rpartition(".")
            parent = self.root.get_submodule(parent_path) if parent_path else self.root
            if hasattr(parent, name):
                delattr(parent, name)
                removed.append(target)
        self._replaced -= set(removed)
        return removed

    def mark_replaced(self, target: str) -> None:
        """Record that ``target`` is no longer used by the rewritten graphs."""
        self._replaced.add(target)

    def recompile(self) -> None:
        """Lint the graphs and regenerate the code ``forward`` runs.

        Code is generated here, not on first call, so that ``torch.compile``
        tracing the captured ``forward`` never meets code generation.
        """
        self._compiled = {}
        for key, graph in self.graphs.items():
            graph.lint()
            self._compiled[key] = _compile_graph(graph, f"{self.role}{list(key) if key else ''}")

    def check(self) -> None:
        """Lint every graph and run each (compiled) variant on the meta device with
        the adapter's example inputs: a graph a rewrite left inconsistent (a
        dangling node, a width that no longer fits) fails here, computing nothing.
        Variants whose sizes depend on values (``nonzero``, which has no meta
        kernel) are skipped.

        Raises:
            CaptureError: naming the variant, with the original error as ``__cause__``.
        """
        self.recompile()
        with on_meta(self.root), torch.no_grad():
            for key, forward in self._compiled.items():
                args = self.example_args(key)
                if args is None:
                    continue
                try:
                    forward(self.root, *meta_args(args))
                except NotImplementedError:
                    continue  # an op without a meta kernel (nonzero on prompt labels): not checkable without data
                except Exception as err:  # any op may reject what a rewrite left: name the variant
                    variant = dict(zip(self.key_names(), key))
                    raise CaptureError(f"{self.role} {variant} does not run: {type(err).__name__}: {err}") from err

    # -- execution ------------------------------------------------------------
    def key_for(self, bound: inspect.BoundArguments) -> GraphKey:
        """The graph key of a call: static argument values, then shape conditions."""
        key = []
        for name in self.static_names:
            value = bound.arguments.get(name, self.signature.parameters[name].default)
            if value is not None and not isinstance(value, (bool, int, float, str)):
                value = PRESENT
            key.append(value)
        if self.spec.recipe.shape_conditions:
            arguments = {n: bound.arguments.get(n, p.default) for n, p in self.signature.parameters.items()}
            key.extend(bool(c.evaluate(arguments)) for c in self.spec.recipe.shape_conditions)
        return tuple(key)

    def key_names(self) -> tuple[str, ...]:
        return self.static_names + tuple(c.function for c in self.spec.recipe.shape_conditions)


@contextlib.contextmanager
def fake_run(root: nn.Module) -> Iterator[Callable[[Any], Any]]:
    """Fake-tensor mode for running ``root`` without computing anything.

    Yields a function that turns (nested) arguments into fake tensors. Upstream
    modules memoise tensors in plain dict attributes (SAM 2's sine position
    encoding keeps one per feature size); entries added during the run are
    dropped afterwards, so no fake tensor stays behind in the model.
    """
    with module_caches_kept(root), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield lambda args: fx.node.map_aggregate(
            args, lambda v: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v
        )


@contextlib.contextmanager
def module_caches_kept(root: nn.Module) -> Iterator[None]:
    """Entries added to the modules' plain dict attributes (memoised tensors)
    during the block are dropped afterwards: a run on fake or meta tensors
    must leave none of them behind."""
    caches = [
        (value, dict(value))
        for module in root.modules()
        for name, value in vars(module).items()
        if not name.startswith("_") and isinstance(value, dict)
    ]
    memoised = _method_lru_caches(root)
    misses = [cache.cache_info().misses for cache in memoised]
    try:
        yield
    finally:
        for cache, saved in caches:
            if cache.keys() != saved.keys():
                cache.clear()
                cache.update(saved)
        for cache, before in zip(memoised, misses):
            if cache.cache_info().misses != before:
                cache.cache_clear()


def _method_lru_caches(root: nn.Module) -> list[Any]:
    """The ``functools.lru_cache`` memos behind the methods of ``root``'s module
    classes. transformers keeps its sine position encodings in one per class
    (keyed by shape, device and dtype, which a fake or meta tensor shares with a
    real one), directly or inside a wrapper's closure."""
    found: dict[int, Any] = {}
    for cls in {type(module) for module in root.modules()}:
        for klass in cls.__mro__:
            for value in vars(klass).values():
                function = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
                candidates = [function]
                for cell in getattr(function, "__closure__", None) or ():
                    try:
                        candidates.append(cell.cell_contents)
                    except ValueError:  # an empty cell
                        continue
                for candidate in candidates:
                    if callable(getattr(candidate, "cache_clear", None)) and hasattr(candidate, "cache_info"):
                        found[id(candidate)] = candidate
    return list(found.values())


@contextlib.contextmanager
def on_meta(root: nn.Module) -> Iterator[dict[int, str]]:
    """Parameters and buffers of ``root`` on the meta device for the duration:
    running the model then computes only shapes, at no cost (torch-pruning
    traces by running it; :meth:`Component.check` runs every graph).

    Parameters stay ``nn.Parameter`` (requiring grad, for tracers that follow
    gradients); training flags and memoised module caches are restored after.
    Yields a map from the meta parameters' ids to their names.
    """
    saved: list[tuple[dict[str, Any], str, Any]] = []
    names: dict[int, str] = {}
    modes = {m: m.training for m in root.modules()}
    with module_caches_kept(root):  # sine position encodings memoise per size: no meta tensor may stay
        try:
            for path, module in root.named_modules():
                for store in (module._parameters, module._buffers):
                    for name, tensor in list(store.items()):
                        if tensor is None:
                            continue
                        saved.append((store, name, tensor))
                        meta = torch.empty_like(tensor, device="meta")
                        if store is module._parameters:
                            meta = nn.Parameter(meta, requires_grad=True)
                            names[id(meta)] = f"{path}.{name}" if path else name
                        store[name] = meta
            yield names
        finally:
            for store, name, tensor in saved:
                store[name] = tensor
            for module, mode in modes.items():  # tracers call eval(); set flags back without train() hooks
                module.training = mode


def meta_args(args: Any) -> Any:
    """(Nested) arguments with every tensor on the meta device."""
    return fx.node.map_aggregate(args, lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v)


class _ShapeRecorder(fx.Interpreter):
    """Runs a graph on fake tensors and keeps every node's value in its meta."""

    def __init__(self, root: nn.Module, graph: fx.Graph) -> None:
        super().__init__(root, graph=graph)

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        n.meta["val"] = value
        return value


def _compile_graph(graph: fx.Graph, label: str) -> Callable[..., Any]:
    code = graph.python_code(root_module="self")
    filename = f"<samfx:{label}:{id(graph):x}>"
    # Registered with linecache so that tracebacks show the graph's code.
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)
    return namespace["forward"]


def _captured_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    component: Component = self.__dict__["_samfx_component"]
    try:
        bound = component.signature.bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"captured {component.role}: {err}") from None
    key = component.key_for(bound)
    if key in component.invalid:
        err = component.invalid[key]
        raise type(err)(*err.args)
    if key not in component.graphs:
        names = component.key_names()
        known = ", ".join(str(dict(zip(names, k))) for k in component.graphs)
        raise ValueError(
            f"captured {component.role} has no graph for {dict(zip(names, key))}; it was specialised on: {known}"
        )
    bound.apply_defaults()
    out = component._compiled[key](self, *bound.args, **bound.kwargs)
    wrapper = component.spec.recipe.output_wrapper
    return wrapper(out) if wrapper is not None else out


_CAPTURED_CLASSES: dict[type, type] = {}


def _captured_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``forward`` runs the captured graphs.

    Being a subclass keeps ``isinstance`` checks and helper methods of upstream
    code working on the captured module.
    """
    if getattr(cls, "_samfx_captured", False):
        return cls
    sub = _CAPTURED_CLASSES.get(cls)
    if sub is None:
        sub = type(
            cls.__name__,
            (cls,),
            {"forward": _captured_forward, "_samfx_captured": True, "__module__": cls.__module__},
        )
        _CAPTURED_CLASSES[cls] = sub
    return sub


def original_class(module: nn.Module) -> type:
    """The upstream class of a (possibly captured) module."""
    cls = type(module)
    return cls.__mro__[1] if getattr(cls, "_samfx_captured", False) else cls


class _RankedProxy(fx.Proxy):
    """A proxy that knows its rank when the module that received it was observed.

    Upstream code branches on ``x.ndim`` (TinyViT's ``PatchMerging``); ranks do
    not change with batch size or prompt count, so answering them keeps the graph
    general while sizes stay symbolic.
    """

    @property
    def ndim(self) -> int:
        return self._rank()

    def dim(self) -> int:
        return self._rank()

    def _rank(self) -> int:
        rank = self.__dict__.get("_samfx_rank")
        if rank is None:
            raise _NeedRanks()
        return rank


def _traced_len(obj: Any) -> Any:
    """``len`` that records ``size(0)`` for traced tensors."""
    return obj.size(0) if isinstance(obj, fx.Proxy) else builtins.len(obj)


_CONTROL_OPS = ("JUMP", "RETURN", "FOR_ITER", "YIELD", "SEND")


def _raises_from(instructions: list[dis.Instruction], start: int) -> bool:
    """Whether straight-line code from ``start`` ends in ``raise``."""
    for ins in instructions[start:]:
        if ins.opname == "RAISE_VARARGS":
            return True
        if any(op in ins.opname for op in _CONTROL_OPS):
            return False
    return False


def _validation_outcome(frame: types.FrameType | None) -> bool | None:
    """If the frame branches on a traced value and one side of the branch only
    raises (an ``assert``, an ``if bad: raise ...`` input check), the outcome
    that avoids the raise; otherwise ``None``."""
    if frame is None:
        return None
    instructions = list(dis.get_instructions(frame.f_code))
    index = next((i for i, ins in enumerate(instructions) if ins.offset == frame.f_lasti), None)
    if index is None or "POP_JUMP" not in instructions[index].opname:
        return None
    jump = instructions[index]
    jumps_when = "IF_TRUE" in jump.opname
    target = next((i for i, ins in enumerate(instructions) if ins.offset == jump.argval), None)
    if target is not None and _raises_from(instructions, target):
        return not jumps_when
    if _raises_from(instructions, index + 1):
        return jumps_when
    return None


def input_check(condition: Any, expected: bool, where: str) -> None:
    """Raise like the original code would when an input check traced as
    passing does not hold for the actual inputs."""
    if bool(condition) != expected:
        raise ValueError(f"input rejected by the model's own check at {where}")


class _NeedRanks(Exception):
    """Raised inside tracing when a module input's rank must be observed first."""


class _RecipeTracer(fx.Tracer):
    """torch.fx tracer driven by an adapter's :class:`TraceRecipe`.

    Beyond plain ``fx.Tracer`` it answers ``x.ndim`` for module inputs (ranks
    observed in one run on fake tensors, when first needed), records ``len(x)``
    as ``x.size(0)``, drops upstream input checks on traced values (``assert``
    and ``if bad: raise``, which a symbolic trace cannot evaluate), and takes
    the recipe's outcome for its declared shape conditions.
    """

    def __init__(
        self,
        recipe: TraceRecipe,
        input_ranks: dict[int, tuple[int | None, ...]] | None,
        condition_values: dict[str, bool],
    ) -> None:
        super().__init__(autowrap_functions=tuple(recipe.autowrap_functions))
        self._leaf_names = frozenset(recipe.leaf_modules)
        self._input_ranks = input_ranks
        self._condition_values = condition_values

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, OpaqueMethodCall) or any(class_name(c) in self._leaf_names for c in type(m).__mro__):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _RankedProxy(node, self)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        for arg, rank in zip(args, (self._input_ranks or {}).get(id(m), ())):
            if isinstance(arg, fx.Proxy) and rank is not None:
                arg.__dict__["_samfx_rank"] = rank
        return super().call_module(m, forward, args, kwargs)

    def to_bool(self, obj: fx.Proxy) -> bool:
        # to_bool <- Proxy.__bool__ <- the upstream code being traced
        caller = inspect.currentframe()
        caller = caller.f_back.f_back if caller is not None and caller.f_back is not None else None
        outcome = _validation_outcome(caller)
        if outcome is not None:
            # Keep upstream's input check: the graph raises where the original would.
            where = f"{caller.f_code.co_filename}:{caller.f_lineno} ({caller.f_code.co_qualname})"
            self.create_proxy("call_function", input_check, (obj, outcome, where), {})
            return outcome
        if caller is not None:
            function = f"{caller.f_globals.get('__name__')}.{caller.f_code.co_qualname}"
            if function in self._condition_values:
                return self._condition_values[function]
        return super().to_bool(obj)


def _observe_input_ranks(root: nn.Module, example: dict[str, Any] | None) -> dict[int, tuple[int | None, ...]]:
    """Ranks of each module's positional tensor inputs, from one run on fake tensors."""
    if not example:
        return {}
    ranks: dict[int, tuple[int | None, ...]] = {}

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        ranks.setdefault(id(module), tuple(a.dim() if isinstance(a, torch.Tensor) else None for a in args))

    handles = [m.register_forward_pre_hook(record) for m in root.modules()]
    try:
        with fake_run(root) as fakes, torch.no_grad():
            root(**fakes(example))
    except Exception:
        # Data-dependent shapes (boolean masks in prompt code) stop a fake run;
        # the ranks recorded up to there are still right, and tracing reports
        # any rank it then lacks.
        pass
    finally:
        for handle in handles:
            handle.remove()
    return ranks


class OpaqueMethodCall(nn.Module):
    """Calls one method of its owner module; traced as a single ``call_module`` node.

    Used for upstream methods that torch.fx cannot trace (in-place writes into
    tensors, Python branches on shapes) but that passes never need to see into.
    The owner is held without registering it, so parameters are not duplicated.
    """

    def __init__(self, owner: nn.Module, method: str) -> None:
        super().__init__()
        self.__dict__["owner"] = owner
        self.method = method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(original_class(self.owner), self.method)(self.owner, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{type(self.owner).__name__}.{self.method}"


class _Sourced:
    """A literal that remembers ``source = (module path, attribute)``; mixed into
    a number type, whose value, hash, arithmetic and printed form it keeps."""

    source: tuple[str, str]
    _number: type

    def __new__(cls, value: Any, source: tuple[str, str]) -> "_Sourced":
        literal = super().__new__(cls, value)
        literal.source = source
        return literal

    def __repr__(self) -> str:
        return self._number.__repr__(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self._number(self), self.source)


class SourcedInt(_Sourced, int):
    """An ``int`` module attribute read while tracing, e.g. ``self.num_heads``.

    It lands in node arguments as an ordinary literal (same value, hash and
    generated code) that remembers ``source = (module path, attribute)``, so a
    pass that changes a layer's width can find every literal derived from it.
    Arithmetic in Python returns plain numbers: only direct reads keep a source.
    """

    _number = int


class SourcedFloat(_Sourced, float):
    """A ``float`` module attribute read while tracing (``self.scale``); see :class:`SourcedInt`."""

    _number = float


def literal_source(value: Any) -> tuple[str, str] | None:
    """``(module path, attribute)`` a graph literal was read from, if known."""
    return value.source if isinstance(value, (SourcedInt, SourcedFloat)) else None


def _source_attributes(root: nn.Module) -> list[tuple[nn.Module, str, Any]]:
    """Replace the plain ``int``/``float`` attributes of every module by sourced
    literals; returns what to restore."""
    replaced = []
    for path, module in root.named_modules():
        for name, value in list(vars(module).items()):
            if type(value) is int:
                module.__dict__[name] = SourcedInt(value, (path, name))
            elif type(value) is float:
                module.__dict__[name] = SourcedFloat(value, (path, name))
            else:
                continue
            replaced.append((module, name, value))
    return replaced


def _opaque_attr(method: str) -> str:
    return f"_samfx_{method.lstrip('_')}"


@contextlib.contextmanager
def _patched(root: nn.Module, recipe: TraceRecipe) -> Iterator[list[tuple[nn.Module, str]]]:
    """Install the recipe's opaque-method shims, traced methods and trace body for the duration.

    Yields the shims it added; the caller keeps them when tracing succeeds.
    """
    shims: list[tuple[nn.Module, str]] = []
    redirected: list[tuple[nn.Module, str]] = []
    len_patched: list[dict[str, Any]] = []
    original_cls = type(root)
    sourced: list[tuple[nn.Module, str, Any]] = []
    try:
        sourced = _source_attributes(root)
        for module in root.modules():
            namespace = sys.modules[type(module).__module__].__dict__
            if "len" not in namespace:
                namespace["len"] = _traced_len
                len_patched.append(namespace)
        for owner_class, method in recipe.opaque_methods:
            for module in list(root.modules()):
                if any(class_name(c) == owner_class for c in type(module).__mro__):
                    attr = _opaque_attr(method)
                    if attr not in module._modules:
                        module.add_module(attr, OpaqueMethodCall(module, method))
                        shims.append((module, attr))
                    shim = module._modules[attr]
                    module.__dict__[method] = lambda *a, _shim=shim, **k: _shim(*a, **k)
                    redirected.append((module, method))
        for owner_class, method, body in recipe.traced_methods:
            for module in list(root.modules()):
                if any(class_name(c) == owner_class for c in type(module).__mro__):
                    module.__dict__[method] = types.MethodType(body, module)
                    redirected.append((module, method))
        if recipe.trace_body is not None:
            # fx traces ``type(root).forward``: give the root a class whose forward is the body.
            root.__class__ = type(original_cls.__name__, (original_cls,), {"forward": recipe.trace_body})
        yield shims
    except BaseException:
        for module, attr in shims:
            del module._modules[attr]
        raise
    finally:
        root.__class__ = original_cls
        for module, name, value in sourced:
            module.__dict__[name] = value
        for namespace in len_patched:
            namespace.pop("len", None)
        for module, method in redirected:
            module.__dict__.pop(method, None)


def _trace_component(
    root: nn.Module, spec: ComponentSpec
) -> tuple[dict[GraphKey, fx.Graph], dict[GraphKey, ValueError], inspect.Signature, tuple[str, ...]]:
    recipe = spec.recipe
    body = recipe.trace_body if recipe.trace_body is not None else type(root).forward
    signature = inspect.signature(body)
    signature = signature.replace(parameters=list(signature.parameters.values())[1:])  # drop self
    static_names = tuple(recipe.static_args)
    for name in static_names:
        if name not in signature.parameters:
            raise CaptureError(f"{spec.role}: static argument {name!r} is not a parameter of forward{signature}")
    conditions = [c.function for c in recipe.shape_conditions]
    choices = [recipe.static_args[n] for n in static_names] + [c.outcomes for c in recipe.shape_conditions]
    graphs: dict[GraphKey, fx.Graph] = {}
    invalid: dict[GraphKey, ValueError] = {}
    with _patched(root, recipe):
        for combo in itertools.product(*choices):
            statics, outcomes = combo[: len(static_names)], combo[len(static_names):]
            concrete = {n: v for n, v in zip(static_names, statics) if v is not PRESENT}
            where = f" with {dict(zip(static_names + tuple(conditions), combo))}" if combo else ""
            try:
                graph = _trace_variant(root, recipe, spec.variant_example(concrete), concrete,
                                       dict(zip(conditions, outcomes)))
            except ValueError as err:
                if isinstance(err, fx.proxy.TraceError):
                    raise CaptureError(f"cannot trace {spec.role} ({class_name(root)}){where}: {err}") from err
                # Upstream rejects this combination itself (e.g. points without
                # labels): a call with it raises the same error.
                invalid[tuple(combo)] = err
                continue
            except Exception as err:  # torch.fx raises many types; name the component
                raise CaptureError(
                    f"cannot trace {spec.role} ({class_name(root)}){where}: {type(err).__name__}: {err}"
                ) from err
            graphs[tuple(combo)] = graph
    if not graphs:
        raise CaptureError(f"cannot trace {spec.role} ({class_name(root)}): every variant was rejected: {invalid}")
    return graphs, invalid, signature, static_names


def _trace_variant(
    root: nn.Module,
    recipe: TraceRecipe,
    example: dict[str, Any] | None,
    concrete: dict[str, Any],
    outcomes: dict[str, bool],
) -> fx.Graph:
    try:
        graph = _RecipeTracer(recipe, None, outcomes).trace(root, concrete_args=concrete or None)
    except _NeedRanks:
        if example is None:
            raise CaptureError("tracing needs tensor ranks but the adapter gave no example inputs") from None
        ranks = _observe_input_ranks(root, example)
        graph = _RecipeTracer(recipe, ranks, outcomes).trace(root, concrete_args=concrete or None)
    return _tidy(graph, root)


def _tidy(graph: fx.Graph, root: nn.Module) -> fx.Graph:
    """A fresh trace as passes see it (components and the blocks passes re-trace alike):
    parameter dtypes folded, and what upstream code computes but never uses removed
    (Hugging Face's Hiera attention computes its probabilities, then calls SDPA)."""
    _fold_parameter_dtypes(graph, root)
    graph.eliminate_dead_code(is_impure_node=_may_have_effects)
    return graph


def _fold_parameter_dtypes(graph: fx.Graph, root: nn.Module) -> None:
    """Replace reads of a parameter's ``dtype`` by the traced dtype.

    Hugging Face casts layer inputs to the layer's weight dtype
    (``x.to(conv.weight.dtype)``); once a pass swaps the layer (int8 weights) or
    casts it (bfloat16, with its own casts around every op), that read would give
    the wrong compute dtype. The float32 the graph was traced with is the right one.
    """
    for node in list(graph.nodes):
        source = node.args[0] if node.op == "call_function" and node.target is getattr else None
        if not (isinstance(source, fx.Node) and source.op == "get_attr" and node.args[1] == "dtype"):
            continue
        dtype = operator.attrgetter(source.target)(root).dtype
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a: dtype if a is node else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: dtype if a is node else a)
        graph.erase_node(node)


def _may_have_effects(node: fx.Node) -> bool:
    """Whether removing ``node`` when its result is unused could change what the
    graph does: anything but a pure function or method call (module calls may be
    opaque methods that write in place; in-place methods end with ``_``)."""
    if node.op not in ("call_function", "call_method", "get_attr"):
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return node.target is input_check or name.endswith("_") or node.is_impure()


@dataclass
class CapturedModel:
    """A model whose components run captured graphs.

    ``model`` is a deep copy of the user's model; the user's model is never
    touched. ``components`` maps each role to its :class:`Component`.
    """

    model: nn.Module
    adapter: Adapter
    components: dict[str, Component]

    def component(self, role: str) -> Component:
        try:
            return self.components[role]
        except KeyError:
            raise KeyError(
                f"{self.adapter.name} model has no captured {role!r}; it has {sorted(self.components)}"
            ) from None

    def recompile(self) -> None:
        for component in self.components.values():
            component.recompile()


def capture(
    model: nn.Module,
    *,
    adapter: Adapter | None = None,
    roles: tuple[str, ...] | None = None,
    copy_model: bool = True,
) -> CapturedModel:
    """Capture a SAM-family model (or a bare component) as torch.fx graphs.

    Args:
        model: a model the adapters recognise (``samfx.adapters.list_adapters()``).
        adapter: force a family adapter instead of detecting it.
        roles: capture only these components (default: all the adapter lists).
        copy_model: deep-copy ``model`` first (default). ``False`` captures in
            place, for callers that already own a private copy.

    Returns:
        A :class:`CapturedModel` whose ``model`` behaves like the input.

    Raises:
        CaptureError: a component cannot be traced; nothing is left half-captured.

    Example::

        >>> import samfx
        >>> sam = samfx.models.build("sam_vit_b", small=True)
        >>> captured = samfx.capture(sam)
        >>> sorted(captured.components)
        ['image_encoder', 'mask_decoder', 'prompt_encoder']
    """
    adapter = adapter or find_adapter(model)
    specs = adapter.components(model)
    if roles is not None:
        unknown = set(roles) - {s.role for s in specs}
        if unknown:
            raise CaptureError(f"{adapter.name} models have no component {sorted(unknown)}")
        specs = [s for s in specs if s.role in roles]
    work = copy.deepcopy(model) if copy_model else model
    components: dict[str, Component] = {}
    traced = []
    for spec in specs:
        root = work.get_submodule(spec.path) if spec.path else work
        if getattr(type(root), "_samfx_captured", False):
            # Already captured (a model from an earlier optimize): keep its graphs.
            components[spec.role] = root.__dict__["_samfx_component"]
            continue
        graphs, invalid, signature, static_names = _trace_component(root, spec)
        component = Component(spec.role, spec.path, root, graphs, spec, signature, static_names, invalid)
        traced.append((root, component))
    # Install only once every component traced, so a failure leaves nothing changed.
    for root, component in traced:
        component.recompile()
        root.__dict__["_samfx_component"] = component
        root.__class__ = _captured_class(type(root))
        components[component.role] = component
    return CapturedModel(work, adapter, components)
