"""What samfx needs to know about a model family, in one place.

An :class:`Adapter` tells samfx where a family keeps its components, how to trace
each of them with torch.fx (:class:`TraceRecipe`), how its fused attention
projections are laid out (:class:`QKVLayout`) and how to run it on an image
(:class:`Predictor`). Passes ask the adapter; they never test model classes
themselves.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Mapping

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from .deploy import Deployment, VideoDeployment

__all__ = [
    "PRESENT",
    "Adapter",
    "AttentionSite",
    "ComponentSpec",
    "Predictor",
    "PromptError",
    "QKVLayout",
    "QKVSite",
    "ShapeCondition",
    "TokenStage",
    "TraceRecipe",
    "UnsupportedModelError",
    "check_image",
    "check_prompts",
    "class_name",
    "is_norm",
    "query_projection",
]


class _Present:
    """Marks an optional argument that is traced as a graph input when given.

    A singleton that survives copying and pickling, since graph keys hold it.
    """

    def __repr__(self) -> str:
        return "PRESENT"

    def __copy__(self) -> "_Present":
        return self

    def __deepcopy__(self, memo: dict) -> "_Present":
        return self

    def __reduce__(self) -> str:
        return "PRESENT"


PRESENT = _Present()


def class_name(obj_or_cls: Any) -> str:
    """``module.QualName`` of a class or of an instance's class."""
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class ShapeCondition:
    """A Python branch on tensor sizes inside ``function`` (``module.QualName``).

    The component gets one graph per outcome; at run time ``evaluate`` (given the
    forward arguments by name) picks the graph, as Dynamo's guards would. A
    condition known to hold for every valid input lists one outcome.
    """

    function: str
    evaluate: Callable[[Mapping[str, Any]], bool]
    outcomes: tuple[bool, ...] = (True, False)


@dataclass(frozen=True)
class TraceRecipe:
    """How to symbolically trace one component.

    Attributes:
        autowrap_functions: free functions recorded as single ``call_function``
            nodes (their bodies branch on shapes, which torch.fx cannot trace).
        leaf_modules: qualified class names of modules kept as ``call_module``.
        opaque_methods: ``(class name, method)`` pairs recorded as one opaque
            node each (methods that mutate tensors in place or branch on shapes).
        static_args: forward arguments the graph is specialised on, with the values
            to trace (``PRESENT`` for "given as a tensor"). The captured module
            dispatches on them at run time, one graph per combination.
        shape_conditions: branches on sizes the graph is specialised on.
        output_wrapper: rebuilds the upstream output type from the graph's output
            (e.g. a Hugging Face ``ModelOutput``).
        trace_body: traced instead of ``forward`` when upstream ``forward`` is
            wrapped in decorators that torch.fx cannot see through; it takes the
            module and the forward arguments.
        traced_methods: ``(class name, method, body)``: while tracing, that
            method of every such submodule is ``body(module, *args)``, traced
            through (its layers stay visible to passes, under the module's path)
            where upstream's own code cannot be traced (SAM 2's RoPE attention
            assigns attributes, branches on sizes and computes in complex numbers).
    """

    autowrap_functions: tuple[Callable[..., Any], ...] = ()
    leaf_modules: tuple[str, ...] = ()
    opaque_methods: tuple[tuple[str, str], ...] = ()
    static_args: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    shape_conditions: tuple[ShapeCondition, ...] = ()
    output_wrapper: Callable[[Any], Any] | None = None
    trace_body: Callable[..., Any] | None = None
    traced_methods: tuple[tuple[str, str, Callable[..., Any]], ...] = ()


@dataclass(frozen=True)
class ComponentSpec:
    """A capturable part of a model.

    Attributes:
        role: what the component does: ``image_encoder``, ``prompt_encoder`` or
            ``mask_decoder``.
        path: attribute path from the model root ("" when the model *is* the
            component, e.g. a bare image encoder).
        recipe: how to trace it.
        example_inputs: builds small keyword arguments for ``forward`` (every
            optional input given), used to observe ranks and propagate shapes.
    """

    role: str
    path: str
    recipe: TraceRecipe = TraceRecipe()
    example_inputs: Callable[[], dict[str, Any]] | None = None

    def variant_example(self, concrete: Mapping[str, Any]) -> dict[str, Any] | None:
        """Example inputs for the graph specialised on ``concrete`` arguments."""
        if self.example_inputs is None:
            return None
        example = self.example_inputs()
        example.update(concrete)
        return example


@dataclass(frozen=True)
class QKVLayout:
    """Row layout of a fused query/key/value projection.

    ``blocked``: rows are ``[q | k | v]`` (SAM, SAM 2, HF ``SamModel``).
    ``head_interleaved``: rows are grouped per head, ``[q_h | k_h | v_h]`` for each
    head ``h`` (TinyViT), and the projection output is first viewed as
    ``(..., num_heads, q_h + k_h + v_h)``.

    ``sizes`` are the q, k, v widths per head for ``head_interleaved`` and the
    full q, k, v widths for ``blocked``.
    """

    kind: str
    num_heads: int
    sizes: tuple[int, int, int]

    def __post_init__(self) -> None:
        if self.kind not in ("blocked", "head_interleaved"):
            raise ValueError(f"unknown QKV layout kind {self.kind!r}")

    def part_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row indices of the fused weight that belong to q, k and v, in the
        order each separate projection must produce them."""
        if self.kind == "blocked":
            starts = np.cumsum((0,) + self.sizes[:-1])
            return tuple(torch.arange(s, s + n) for s, n in zip(starts, self.sizes))  # type: ignore[return-value]
        per_head = sum(self.sizes)
        offsets = np.cumsum((0,) + self.sizes[:-1])
        rows = []
        for offset, size in zip(offsets, self.sizes):
            head_base = torch.arange(self.num_heads)[:, None] * per_head + int(offset)
            rows.append((head_base + torch.arange(size)[None, :]).reshape(-1))
        return tuple(rows)  # type: ignore[return-value]


@dataclass(frozen=True)
class QKVSite:
    """One fused projection: the Linear's path inside its component, its layout."""

    linear: str
    layout: QKVLayout


@dataclass(frozen=True)
class AttentionSite:
    """One attention module inside a component, as attention-rewriting passes see it.

    Attributes:
        path: the attention module's path in the component; graph nodes that
            belong to it carry it last in ``node.meta["nn_module_stack"]``.
        kind: the layout family: ``sam_vit`` (SAM / SAM-HQ ViT attention,
            decomposed relative positions), ``hf_vit`` (Hugging Face
            ``SamVisionAttention``), ``hiera`` (SAM 2, pooled q at stage changes),
            ``tinyvit`` (attention biases), ``rope`` (SAM 3's ViT: 2-D rotary
            position encodings on q and k, dims rotated in pairs), ``decoder``
            (the two-way transformer's attentions with q/k/v/out projections).
        num_heads: heads.
        head_dim: query/key width per head.
        value_dim: value width per head.
        window_size: tokens per side of the window the block attends in
            (0: global attention over the whole map; ``None``: not a windowed block).
        rel_pos: whether decomposed relative-position terms are added.
        block: path of the enclosing block, if any.
        rel_pos_tables: attributes of the attention module that hold those
            relative-position tables (their last dimension is ``head_dim``).
    """

    path: str
    kind: str
    num_heads: int
    head_dim: int
    value_dim: int
    window_size: int | None = None
    rel_pos: bool = False
    block: str | None = None
    rel_pos_tables: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenStage:
    """Consecutive encoder blocks that all read and write one token map, as
    token-reducing passes (``token_cluster``) see them.

    Every block takes the ``(B, H, W, C)`` map as its only tensor input and
    returns a map of the same size; a block that changes the resolution or the
    width (Hiera's pooling blocks) belongs to no stage.

    Attributes:
        blocks: paths of the blocks inside the component, in order.
        indices: each block's position among all the encoder's blocks (what
            users give as a location).
        windows: each block's window side (0: attention over the whole map).
        layout: ``"map"``: blocks pass ``(B, H, W, C)`` maps and read their
            size from them; windowed blocks split the map with the calls that
            :meth:`Adapter.window_call` recognises. ``"sequence"``: blocks pass
            ``(B, H * W, C)`` row-major sequences of a ``size`` their code
            fixes (TinyViT); :meth:`Adapter.resized_block` makes blocks for
            another size.
        size: ``(H, W)`` of a ``"sequence"`` stage.
    """

    blocks: tuple[str, ...]
    indices: tuple[int, ...]
    windows: tuple[int, ...]
    layout: str = "map"
    size: tuple[int, int] | None = None


class UnsupportedModelError(TypeError):
    """No registered adapter recognises the model, or it lacks what was asked of it."""


class PromptError(ValueError):
    """An image or prompt a predictor cannot use (the message says why)."""


def check_image(image: Any) -> np.ndarray:
    """``image`` if it is an ``H x W x 3`` uint8 RGB array, else :class:`PromptError`."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        raise PromptError(f"expected an H x W x 3 uint8 RGB array, got {type(image).__name__} "
                          f"{getattr(image, 'dtype', '')} of shape {shape}")
    if min(image.shape[:2]) < 1:
        raise PromptError(f"the image is empty (shape {image.shape})")
    return image


def check_prompts(
    point_coords: Any, point_labels: Any, box: Any, image_hw: tuple[int, int]
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Prompts as a family predictor takes them, checked once for every family.

    Points are ``N x 2`` pixel ``(x, y)`` with ``N`` labels (1 foreground, 0
    background, 2/3 box corners); a box is ``x0, y0, x1, y1``. At least one
    prompt is needed (SAM would otherwise run on its padding point alone);
    coordinates must be finite; an inverted box has its corners swapped and
    prompts outside the image are kept, each with a warning.

    Raises:
        PromptError: no prompt, non-finite or malformed coordinates, or labels
            that do not match the points.

    Example::

        >>> points, labels, box = check_prompts([[10, 20]], [1], None, (100, 100))
        >>> points.tolist(), labels.tolist(), box
        ([[10.0, 20.0]], [1], None)
    """
    height, width = image_hw
    points = labels = None
    if point_coords is not None:
        points = np.asarray(point_coords, dtype=np.float32)
        if points.ndim != 2 or points.shape[1] != 2:
            raise PromptError(f"point_coords must be N x 2 pixel (x, y), got shape {points.shape}")
        if point_labels is None:
            raise PromptError("point_labels are needed with point_coords (1 foreground, 0 background)")
        labels = np.asarray(point_labels)
        if labels.shape != (len(points),) or not np.isin(labels, (0, 1, 2, 3)).all():
            raise PromptError(f"point_labels must be {len(points)} labels in {{0, 1, 2, 3}}, got {labels.tolist()}")
        if not np.isfinite(points).all():
            raise PromptError(f"point coordinates must be finite, got {points.tolist()}")
        if not len(points):
            points = labels = None
    if box is not None:
        box = np.asarray(box, dtype=np.float32).reshape(-1)
        if box.shape != (4,) or not np.isfinite(box).all():
            raise PromptError(f"a box is 4 finite numbers x0, y0, x1, y1, got {box.tolist()}")
        if box[0] > box[2] or box[1] > box[3]:
            fixed = np.array([min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])],
                             np.float32)
            warnings.warn(f"the box {box.tolist()} is inverted (x0 > x1 or y0 > y1); using {fixed.tolist()}",
                          stacklevel=3)
            box = fixed
    if points is None and box is None:
        raise PromptError("give at least one point or a box: without a prompt SAM segments its padding point")
    corners = [p for p in ([] if points is None else points.tolist()) + ([] if box is None else
                                                                          box.reshape(2, 2).tolist())]
    outside = [c for c in corners if not (0 <= c[0] <= width and 0 <= c[1] <= height)]
    if outside:
        warnings.warn(f"prompt coordinates {outside} lie outside the {width} x {height} image", stacklevel=3)
    return points, labels, box


class Predictor:
    """Runs a SAM-family model on one image with point and box prompts.

    The interface follows ``segment_anything.SamPredictor``: ``set_image`` once,
    then ``predict`` per prompt. Coordinates are in the image's own pixels (x, y).
    Images and prompts are checked here (:func:`check_image`,
    :func:`check_prompts`) for every family; families implement
    ``_set_image`` and ``_predict``.
    """

    #: prompt kinds the model was trained with; box-only models (LiteMedSAM) give
    #: empty masks for single clicks, so segment-everything warns about them and
    #: fidelity reports lead with the trained kinds.
    trained_prompts: tuple[str, ...] = ("point", "box")
    _image_hw: tuple[int, int] | None = None
    #: why other prompt kinds' figures mean little (shown next to them in reports)
    untrained_prompts_note: str = ""

    def set_image(self, image: np.ndarray) -> None:
        """Embed an ``H x W x 3`` uint8 RGB image."""
        self._set_image(check_image(image))
        self._image_hw = tuple(image.shape[:2])

    def _set_image(self, image: np.ndarray) -> None:
        raise NotImplementedError

    @property
    def image_embedding(self) -> torch.Tensor:
        """The main image embedding of the last ``set_image`` (for cosine checks)."""
        raise NotImplementedError

    def encoder_input(self, image: np.ndarray) -> torch.Tensor:
        """The image encoder's input for an ``H x W x 3`` uint8 RGB image
        (resized, normalised and padded the way ``set_image`` does it)."""
        raise NotImplementedError

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        multimask_output: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(masks, scores)``: ``M x H x W`` bools and ``M`` predicted IoUs.

        Raises:
            PromptError: no image set, no prompt, or bad coordinates (see :func:`check_prompts`).
        """
        if self._image_hw is None:
            raise PromptError("call set_image before predict")
        points, labels, box = check_prompts(point_coords, point_labels, box, self._image_hw)
        return self._predict(points, labels, box, multimask_output)

    def _predict(self, point_coords: np.ndarray | None, point_labels: np.ndarray | None, box: np.ndarray | None,
                 multimask_output: bool) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def predict_boxes(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run ``N`` box prompts ``(x0, y0, x1, y1)`` on the current image, each
        its own prompt asking for one mask, as :meth:`predict` with ``box`` does.

        Returns ``(masks, scores)``: ``N x H x W`` bools and ``N`` predicted
        IoUs. This default runs the boxes one by one; families whose decoder
        takes a batch of prompts override it.
        """
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        outputs = [self.predict(box=box, multimask_output=False) for box in boxes]
        if not outputs:
            return np.zeros((0, 0, 0), bool), np.zeros(0, np.float32)
        return np.stack([m[0] for m, _ in outputs]), np.array([float(s[0]) for _, s in outputs], np.float32)

    def predict_clicks(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run ``N`` single positive clicks ``(x, y)`` on the current image, each its
        own prompt, and keep the most confident of each click's masks (SAM's
        protocol for one click, which is ambiguous).

        Returns ``(masks, scores)``: ``N x H x W`` bools and ``N`` predicted IoUs. One
        decoder batch where the family runs :meth:`predict_points`, else click by click.
        """
        points = np.asarray(points, np.float32).reshape(-1, 2)
        try:
            low_res, scores = self.predict_points(points, multimask_output=True)
        except NotImplementedError:
            outputs = [self.predict(np.asarray([point]), np.array([1]), None, True) for point in points]
            best = [int(np.argmax(s)) for _, s in outputs]
            if not outputs:
                return np.zeros((0, 0, 0), bool), np.zeros(0, np.float32)
            return (np.stack([m[i] for (m, _), i in zip(outputs, best)]),
                    np.array([float(s[i]) for (_, s), i in zip(outputs, best)], np.float32))
        best = scores.argmax(dim=1)
        rows = torch.arange(len(low_res))
        masks = self.logits_to_image(low_res[rows, best]) > 0
        return masks.cpu().numpy(), scores[rows, best].float().cpu().numpy()

    def predict_points(
        self, points: np.ndarray | torch.Tensor, multimask_output: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``N`` single positive clicks through the decoder in one batch.

        This is what segment-everything needs (:mod:`samfx.segment_everything`); any
        runtime that implements it, with :meth:`set_image` and
        :meth:`logits_to_image`, can be used there (an ONNX model pair, say).

        Args:
            points: ``N x 2`` click positions ``(x, y)`` in the pixels of the image
                given to :meth:`set_image`; each is its own prompt.
            multimask_output: ask for the decoder's multiple masks per click.

        Returns:
            ``(low_res_logits, iou_predictions)``: ``N x M x h x w`` mask logits at
            the decoder's resolution and ``N x M`` predicted IoUs (``M`` masks per
            click, family-dependent: 3 for SAM with ``multimask_output``, 1 for
            SAM-HQ, which merges its outputs).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot run batched point prompts")

    def logits_to_image(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        """Resize ``K x h x w`` low-resolution logits from :meth:`predict_points`
        to ``K x H x W`` logits over the image of the last :meth:`set_image`, as
        the family's own predictor does (masks are ``logits > 0``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot resize decoder logits")


class Adapter:
    """Family knowledge. Subclass, set ``name``, and register with
    :func:`samfx.adapters.register_adapter`.

    Class names are compared as strings (``module.QualName``) so that matching a
    model never imports a family's package.
    """

    name: ClassVar[str] = ""
    #: qualified names of the model classes this adapter handles (MRO-matched)
    model_classes: ClassVar[tuple[str, ...]] = ()

    def matches(self, model: nn.Module) -> bool:
        return self.match_depth(model) is not None

    def match_depth(self, model: nn.Module) -> int | None:
        """How far up ``model``'s MRO the nearest class this adapter handles is
        (0: the model's own class), or ``None``: the most specific adapter wins
        (SAM 2's video predictor is a ``SAM2Base`` too)."""
        names = [class_name(c) for c in type(model).__mro__]
        depths = [names.index(n) for n in self.model_classes if n in names]
        return min(depths) if depths else None

    def components(self, model: nn.Module) -> list[ComponentSpec]:
        """The components of ``model`` that samfx can capture."""
        raise NotImplementedError

    def qkv_sites(self, component_root: nn.Module) -> list[QKVSite]:
        """Fused q/k/v projections inside a component."""
        return [
            QKVSite(f"{path}.{attr}" if path else attr, layout)
            for path, module in component_root.named_modules()
            for attr, layout in self._qkv_layouts(module)
        ]

    def _qkv_layouts(self, module: nn.Module) -> Iterator[tuple[str, QKVLayout]]:
        """Yield ``(attribute, layout)`` for fused projections owned by ``module``."""
        return iter(())

    def attention_sites(self, component_root: nn.Module) -> list[AttentionSite]:
        """Attention modules inside a component, in module order."""
        modules = dict(component_root.named_modules())
        sites = []
        for path, module in modules.items():
            parent_path = path.rpartition(".")[0] if path else None
            parent = modules.get(parent_path) if parent_path is not None else None
            site = self._attention_site(path, module, parent, parent_path)
            if site is not None:
                sites.append(site)
        return sites

    def _attention_site(
        self, path: str, module: nn.Module, parent: nn.Module | None, parent_path: str | None
    ) -> AttentionSite | None:
        """Describe ``module`` if it is an attention this family knows."""
        return None

    def precision_islands(self, component_root: nn.Module) -> list[str]:
        """Modules of a component that reduced-precision passes keep in float32:
        normalisations (their statistics lose most in bfloat16), and what the
        family adds through :meth:`_precision_island` (heads whose outputs are
        compared or thresholded, positional encodings)."""
        return [
            path
            for path, module in component_root.named_modules()
            if path and (is_norm(module) or self._precision_island(path, module))
        ]

    def _precision_island(self, path: str, module: nn.Module) -> bool:
        """Whether the family keeps ``module`` (at ``path`` in its component) in float32."""
        return False

    def token_stages(self, component_root: nn.Module) -> list[TokenStage]:
        """Runs of blocks over one token map inside an image encoder (none by default)."""
        return []

    def window_call(self, component_root: nn.Module, node: Any) -> str | None:
        """``"partition"`` or ``"unpartition"`` when the graph node ``node`` calls
        the family's window split or its inverse, with SAM's signatures:
        ``partition(x, window) -> (windows, (Hp, Wp))`` and
        ``unpartition(windows, window, (Hp, Wp), (H, W)) -> x``."""
        return None

    def resized_block(self, component_root: nn.Module, path: str, size: tuple[int, int],
                      window: tuple[int, int]) -> nn.Module:
        """A copy of the ``"sequence"``-stage block at ``path`` that runs on a
        ``size`` map in ``window`` windows, sharing the block's weights.

        Raises:
            ValueError: the block cannot run that way (the reason is reported).
        """
        raise ValueError(f"{self.name} blocks cannot be resized")

    def predictor(self, model: nn.Module) -> Predictor:
        """The family's own way to run ``model`` on an image with prompts.

        Raises:
            UnsupportedModelError: ``model`` is a bare component (an image
                encoder alone cannot turn prompts into masks).
        """
        try:
            roles = [spec.role for spec in self.components(model)]
        except TypeError:  # a part with no trace recipe (another runtime's encoder swapped in) still predicts
            roles = ["mask_decoder"]
        if "mask_decoder" not in roles:
            raise UnsupportedModelError(
                f"a bare {' + '.join(roles) or 'component'} of a {self.name} model has no predictor: prompts need "
                "the whole model (image encoder, prompt encoder and mask decoder); optimize the whole model, or use "
                "passes and options that need no masks")
        return self._predictor(model)

    def _predictor(self, model: nn.Module) -> Predictor:
        raise NotImplementedError(f"adapter {self.name!r} has no predictor")

    def encoder_features(self, output: Any) -> list[torch.Tensor]:
        """The feature maps in an image encoder's output that the mask decoder
        reads (the image embedding first)."""
        if isinstance(output, torch.Tensor):
            return [output]
        raise NotImplementedError(f"adapter {self.name!r} does not know the encoder output {type(output).__name__}")

    # -- structural edits (pruning) ------------------------------------------
    def mlp_hidden_layers(self, component_root: nn.Module) -> list[str]:
        """Paths of the layers whose outputs are feed-forward hidden channels
        (an MLP's first Linear, an inverted residual's expansion conv)."""
        return []

    def parameter_channel_dims(self, component_root: nn.Module) -> dict[str, int]:
        """Parameters held outside layers (position embeddings, ...) that are added
        to activations, with the dimension that indexes the channels. 1-D
        parameters (norm scales) need not be listed: their only dimension is it."""
        return {}

    def resize_attention(self, module: nn.Module, kept_heads: list[int], kept_dims: list[int]) -> None:
        """Make an attention module agree with q/k/v projections that now keep the
        heads ``kept_heads`` (original indices) and, in every kept head, the dims
        ``kept_dims``: head counts and widths, and per-head or per-dim tensors
        (relative-position tables, attention biases)."""
        raise NotImplementedError(f"adapter {self.name!r} cannot resize {class_name(module)}")

    def sync_width_attributes(self, component_root: nn.Module) -> None:
        """After layers changed width, set the attributes that record widths
        (``dim``, ``embed_dim``, ...) from the layers themselves."""

    def deployment(self, model: nn.Module, multimask_output: bool = True) -> "Deployment":
        """The model as an image encoder and a SAM-convention prompt decoder
        (:class:`samfx.adapters.deploy.Deployment`), for exporters.

        ``multimask_output`` picks the decoder's output: the three candidate
        masks or the single one, as in the family's predictor.
        """
        raise NotImplementedError(f"adapter {self.name!r} does not describe how to deploy its models")

    def video_deployment(self, model: nn.Module) -> VideoDeployment:
        """A video model's per-frame steps and loop settings
        (:class:`samfx.adapters.deploy.VideoDeployment`), for the video export;
        ``model`` is a captured copy (its RoPE attention traced in real arithmetic).

        Raises:
            ValueError: not a video model, or one whose video path the exported
                loop does not follow (the reason is named).
        """
        raise ValueError(f"export_video takes a video predictor (SAM 2's SAM2VideoPredictor, Hugging Face's "
                         f"Sam2VideoModel or Sam3TrackerVideoModel), not a {self.name} model")

    def track_video(self, model: nn.Module, frames: str | Path, points: Any, labels: Any) -> list[torch.Tensor]:
        """Track the object clicked at ``points`` (``(x, y)`` pixels, labels 1/0) on
        the first of the JPEG ``frames`` (a folder of ``00000.jpg``, ...) with the
        family's own video API: mask logits per frame at the video's size
        (masks are ``logits > 0``), the reference the video export is checked on."""
        raise ValueError(f"{self.name} models do not track video")


def query_projection(attention: nn.Module) -> nn.Module | None:
    """The query Linear of an attention whose fused q/k/v projection was split
    (by ``split_qkv``, under the names it was given), or ``None``."""
    return getattr(attention, getattr(attention, "samfx_qkv_names", ("q",))[0], None)


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's own, or a channels-first ``LayerNorm2d`` as
    SAM, SAM 2 and their derivatives define it."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
        return True
    return type(module).__name__.endswith("LayerNorm2d")
