"""``share_image_side``: the mask decoder's image-side work once per image, not once per prompt.

SAM's ``MaskDecoder`` (SAM, SAM-HQ, LiteMedSAM, MobileSAM, SAM 2) copies the
image embedding and its positional encoding once per prompt
(``repeat_interleave``) and adds the dense prompt embedding, so the two-way
transformer's first layer projects the same 64 x 64 image tokens once per
box: ``k_proj``/``v_proj`` of the token-to-image attention and ``q_proj`` of
the image-to-token attention. With N boxes and no mask input, that is N
copies of one result (9.7 of LiteMedSAM's 43.5 decoder GMACs for 24 boxes).

The pass removes the copies: ``repeat_interleave(E, n) + D`` becomes
``E + shared_rows(D)``, where :func:`shared_rows` is ``D[:1]`` when ``D`` is a
batch broadcast (stride 0 along the batch: the prompt encoder's no-mask
embedding) and ``D`` otherwise; ``repeat_interleave(P, n)`` becomes ``P``;
the batch size read off the copy becomes ``n``. Batch broadcasting in the
first layer's sums and products does the rest, so the result is exact, with
or without mask inputs. Every rewritten graph is checked on the adapter's
example inputs widened to three prompts (with a shared and with a per-prompt
dense embedding); a graph whose outputs differ is restored and reported.

Example::

    >>> import samfx
    >>> fast = samfx.optimize(samfx.models.build("lite_medsam"), ["share_image_side"])
    >>> fast.samfx_report.passes[0].details["graphs"]  # multimask or not, times the shape conditions
    4
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from ..capture import CapturedModel, Component
from .base import PassConfig, PassContext, PassReport, PassResult, register_pass

__all__ = ["ShareImageSideConfig", "share_image_side", "shared_rows"]

_PROMPTS = 3  # prompts in the check


@dataclass(frozen=True)
class ShareImageSideConfig(PassConfig):
    """Options of :func:`share_image_side` (none: the rewrite is exact or not done)."""


@torch.fx.wrap
def shared_rows(dense: Tensor) -> Tensor:
    """``dense[:1]`` when every row is the same tensor (a batch broadcast), else ``dense``.

    Example::

        >>> shared_rows(torch.ones(1, 4).expand(3, 4)).shape
        torch.Size([1, 4])
        >>> shared_rows(torch.ones(3, 4)).shape
        torch.Size([3, 4])
    """
    return dense[:1] if dense.dim() and dense.shape[0] > 1 and dense.stride(0) == 0 else dense


def _is_repeat(node: fx.Node) -> bool:
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
    return (node.op == "call_function" and node.target is torch.repeat_interleave and dim == 0
            and len(node.args) >= 2)


def _batch_reads(node: fx.Node) -> list[fx.Node]:
    """Nodes reading ``node.shape[0]`` / ``node.size(0)``."""
    reads = []
    for user in node.users:
        if user.op == "call_function" and user.target is getattr and user.args[1] == "shape":
            reads += [u for u in user.users if u.op == "call_function" and u.target is operator.getitem
                      and u.args[1] == 0]
        elif user.op == "call_method" and user.target == "size" and user.args[1:] == (0,):
            reads.append(user)
    return reads


def _rewrite(graph: fx.Graph) -> int:
    """Remove the per-prompt copies in one graph; the number removed."""
    removed = 0
    for node in list(graph.nodes):
        if not _is_repeat(node):
            continue
        source, count = node.args[0], node.args[1]
        users = list(node.users)
        sums = [u for u in users if u.op == "call_function" and u.target in (operator.add, torch.add)]
        if len(users) == 1 and len(sums) == 1 and sums[0].args[0] is node and isinstance(sums[0].args[1], fx.Node):
            total = sums[0]
            for read in _batch_reads(total):
                read.replace_all_uses_with(count)
            with graph.inserting_before(total):
                dense = graph.call_function(shared_rows, (total.args[1],))
            total.args = (source, dense)
        node.replace_all_uses_with(source)
        graph.erase_node(node)
        removed += 1
    return removed


def _widened(component: Component, args: tuple[Any, ...], shared: bool) -> tuple[Any, ...] | None:
    """The example arguments with three prompts; the dense embedding a broadcast or per-prompt."""
    names = list(component.signature.parameters)
    if not {"sparse_prompt_embeddings", "dense_prompt_embeddings"} <= set(names):
        return None
    out = list(args)
    generator = torch.Generator().manual_seed(0)
    sparse = args[names.index("sparse_prompt_embeddings")]
    dense = args[names.index("dense_prompt_embeddings")]
    out[names.index("sparse_prompt_embeddings")] = sparse[:1].repeat(_PROMPTS, *[1] * (sparse.dim() - 1)) + torch.randn(
        _PROMPTS, *sparse.shape[1:], generator=generator)
    out[names.index("dense_prompt_embeddings")] = (
        dense[:1].expand(_PROMPTS, *dense.shape[1:]) if shared else
        torch.randn(_PROMPTS, *dense.shape[1:], generator=generator))
    return tuple(out)


def _outputs(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _outputs(v)]
    return []


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.allclose(x, y, rtol=1e-4, atol=1e-5)
                                    for x, y in zip(a, b))


@register_pass("share_image_side", ShareImageSideConfig, exact=True)
def share_image_side(captured: CapturedModel, config: ShareImageSideConfig, context: PassContext) -> PassResult:
    """Mask decoder: image embedding and positional encoding once per image, not copied per prompt."""
    component = captured.components.get("mask_decoder")
    skipped: list[str] = []
    rewritten = 0
    if component is None:
        skipped.append(f"the {captured.adapter.name} model has no captured mask_decoder")
    else:
        for key in list(component.graphs):
            args = component.example_args(key)
            cases = [_widened(component, args, shared) for shared in (True, False)] if args is not None else []
            if not cases or cases[0] is None:
                skipped.append(f"mask_decoder{list(key)}: no example prompts to check a rewrite with")
                continue
            graph = component.graphs[key]
            try:
                with torch.no_grad():
                    reference = [_outputs(component.root(*case)) for case in cases]
            except (RuntimeError, ValueError) as err:  # a variant for one image per prompt (SAM 2's repeat_image=False)
                skipped.append(f"mask_decoder{list(key)}: takes no batch of prompts on one image ({err})")
                continue
            saved = copy.deepcopy(graph)
            if not _rewrite(graph):
                skipped.append(f"mask_decoder{list(key)}: no per-prompt copy of the image side")
                continue
            component.recompile()
            try:
                with torch.no_grad():
                    same = all(_same(r, _outputs(component.root(*case))) for r, case in zip(reference, cases))
            except RuntimeError as err:  # a use that does not broadcast
                same, why = False, f"{type(err).__name__}: {str(err).splitlines()[0]}"
            else:
                why = "outputs differ"
            if same:
                rewritten += 1
            else:
                component.graphs[key] = saved
                component.recompile()
                skipped.append(f"mask_decoder{list(key)}: restored, the rewrite does not match ({why})")
    summary = f"image side shared in {rewritten} decoder graph(s)" if rewritten else "nothing shared"
    report = PassReport(rewritten > 0, summary, {"graphs": rewritten}, skipped)
    return PassResult(captured, report)
