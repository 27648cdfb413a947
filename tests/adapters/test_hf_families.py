"""Hugging Face SAM 2, SAM-HQ, SAM 3 tracker and EdgeTAM classes (``Sam2Model``,
``SamHQModel``, ``Sam3TrackerModel``, ``EdgeTamModel``): capture, every pass,
export and the runtime, on small configs.

Each family's small model gets ordinary random weights: the Hub initialisation
leaves these small towers' mask logits near 1e-10, where mask comparisons would
measure rounding noise.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import samfx
from samfx.data import package_images
from samfx.emit import runtime
from samfx.fidelity import mask_iou
from samfx.passes import PruneConfig, TokenClusterConfig

from ..conftest import encoder_output, image_input, small_model
from ..passes.test_prune import _check_attention_attributes, _prune, _split, _zeroed

# zoo name -> (adapter, {role: (attention kinds, count)}, fused q/k/v projections, token stages)
FAMILIES = {
    "hf_sam2.1_hiera_tiny": ("hf_sam2", {"image_encoder": ({"hiera"}, 6), "mask_decoder": ({"decoder"}, 7)}, 6, 2),
    "hf_sam_hq_vit_b": ("hf_sam_hq", {"image_encoder": ({"hf_vit"}, 2), "mask_decoder": ({"decoder"}, 7)}, 2, 1),
    # SAM 3's ViT: separate q/k/v projections; its rotary tables are fixed per window: no token stage.
    "hf_sam3_tracker": ("hf_sam3_tracker", {"image_encoder": ({"rope"}, 2), "mask_decoder": ({"decoder"}, 7)}, 0, 0),
    # RepViT: convolutions only.
    "hf_edgetam": ("hf_edgetam", {"image_encoder": (set(), 0), "mask_decoder": ({"decoder"}, 7)}, 0, 0),
}
NAMES = sorted(FAMILIES)

_MODELS: dict[str, nn.Module] = {}


def family_model(name: str) -> nn.Module:
    """A fresh copy of the family's small model with ordinary random weights."""
    if name not in _MODELS:
        model = small_model(name)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                norm_scale = param.dim() == 1 and "norm" in param_name and param_name.endswith("weight")
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1 + float(norm_scale))
        _MODELS[name] = model
    return copy.deepcopy(_MODELS[name])


def _image() -> np.ndarray:
    return package_images(["coins"])[0].image


def _prompts() -> list[dict]:
    sample = package_images(["coins"])[0]
    points = [p.coords for p in sample.prompts if p.kind == "point"][:2]
    boxes = [p.coords for p in sample.prompts if p.kind == "box"][:2]
    prompts = [{"point_coords": np.array([c]), "point_labels": np.array([1])} for c in points]
    prompts += [{"box": np.array(b)} for b in boxes]
    prompts.append({"box": np.array(boxes[0]), "point_coords": np.array([points[1]]), "point_labels": np.array([0])})
    return prompts


def _masks(model: nn.Module) -> list[np.ndarray]:
    predictor = samfx.adapters.find_adapter(model).predictor(model)
    predictor.set_image(_image())
    with torch.no_grad():
        return [predictor.predict(**prompt, multimask_output=True)[0] for prompt in _prompts()]


@pytest.fixture(scope="module")
def eager_masks() -> dict[str, list[np.ndarray]]:
    return {name: _masks(family_model(name)) for name in NAMES}


def _worst_iou(masks: list[np.ndarray], reference: list[np.ndarray]) -> float:
    return min(mask_iou(a, b) for ours, theirs in zip(masks, reference, strict=True) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("name", NAMES)
def test_adapter_describes_the_family(name: str) -> None:
    family, sites, qkv, stages = FAMILIES[name]
    model = family_model(name)
    adapter = samfx.adapters.find_adapter(model)
    assert adapter.name == family and samfx.models.spec(name).family == family
    for spec in adapter.components(model):
        if spec.role in sites:
            kinds, count = sites[spec.role]
            found = adapter.attention_sites(model.get_submodule(spec.path))
            assert {s.kind for s in found} == kinds and len(found) == count, spec.role
    encoder = model.vision_encoder
    assert len(adapter.qkv_sites(encoder)) == qkv
    assert adapter.precision_islands(model.mask_decoder)  # the IoU head and the norms
    assert bool(adapter.mlp_hidden_layers(encoder)) == (name != "hf_edgetam")
    assert len(adapter.token_stages(encoder)) == stages


def _assert_same_outputs(model: nn.Module, optimized: nn.Module, rtol: float) -> None:
    """The Hugging Face forward gives the same masks and scores (points; a box with one
    mask; a mask prompt), and the vision encoder the same feature maps, within ``rtol``
    of each output's size (0: bitwise)."""
    size = model.prompt_encoder.input_image_size
    torch.manual_seed(3)
    pixels = torch.randn(2, 3, size, size)
    side = model.prompt_encoder.image_embedding_size[0]
    calls = [dict(input_points=torch.tensor([[[[10.0, 20.0], [50.0, 40.0]]]] * 2),
                  input_labels=torch.tensor([[[1, 0]]] * 2)),
             dict(input_boxes=torch.tensor([[[10.0, 20.0, 100.0, 120.0]]] * 2), multimask_output=False),
             dict(input_points=torch.tensor([[[[30.0, 60.0]]]] * 2), input_masks=torch.randn(2, 1, 4 * side, 4 * side))]
    for call in calls:
        with torch.no_grad():
            want, got = model(pixel_values=pixels, **call), optimized(pixel_values=pixels, **call)
        for a, b in ((want.pred_masks, got.pred_masks), (want.iou_scores, got.iou_scores)):
            assert a.shape == b.shape and ((a - b).norm() <= rtol * a.norm()), (call, (a - b).norm() / a.norm())
    with torch.no_grad():
        want, got = model.vision_encoder(pixels), optimized.vision_encoder(pixels)
    for a, b in zip(torch.utils._pytree.tree_leaves(want.to_tuple()), torch.utils._pytree.tree_leaves(got.to_tuple()),
                    strict=True):
        assert a.shape == b.shape and ((a - b).norm() <= rtol * a.norm())


@pytest.mark.parametrize("name", NAMES)
def test_captured_model_answers_the_hugging_face_api_exactly(name: str) -> None:
    model = family_model(name)
    _assert_same_outputs(model, samfx.capture(model).model, rtol=0.0)


@pytest.mark.parametrize("name", NAMES)
def test_exact_passes_are_exact_and_the_processor_recipe_works_unchanged(name: str) -> None:
    model = family_model(name)
    captured = samfx.capture(model)
    reports = samfx.pipeline.run_passes(captured, samfx.resolve_passes(["split_qkv", "fuse_attention"])[0],
                                        samfx.passes.PassContext())
    assert reports[0].changed == bool(FAMILIES[name][2]) and all(r.skipped == [] for r in reports)
    fused = reports[1].details["attentions"]
    assert sum(fused.get("image_encoder", {}).values()) == FAMILIES[name][1]["image_encoder"][1]
    assert fused["mask_decoder"] == {"already sdpa": 7}
    assert not any(n.endswith(".qkv") for n, _ in captured.model.named_modules())
    _assert_same_outputs(model, captured.model, rtol=1e-5)
    # The transformers docs' recipe, on the optimized module: processor, model, post-processing.
    predictor = samfx.adapters.find_adapter(model).predictor(model)
    processor = predictor.processor
    inputs = processor(images=_image(), input_points=[[[[120.0, 80.0]]]], input_labels=[[[1]]], return_tensors="pt")
    arguments = {k: v for k, v in inputs.items() if k in ("pixel_values", "input_points", "input_labels")}
    with torch.no_grad():
        want, got = model(**arguments), captured.model(**arguments)
    torch.testing.assert_close(got.pred_masks, want.pred_masks, atol=1e-4, rtol=1e-4)
    sizes = [inputs["original_sizes"]] + ([inputs["reshaped_input_sizes"]] if "reshaped_input_sizes" in inputs else [])
    post = getattr(processor, "post_process_masks", None) or processor.image_processor.post_process_masks
    assert mask_iou(post(got.pred_masks, *sizes)[0].numpy(), post(want.pred_masks, *sizes)[0].numpy()) >= 0.999


# Lossy passes: applied, drop-ins (the predictor runs the processor recipe on them), and
# the image embedding's cosine to the original's on a photo. Masks are not compared: this
# random model's logits sit near the threshold.
LOSSY = {"bf16": 0.999, "hyper": 0.99, "quantize": 0.99}


@pytest.fixture(scope="module")
def eager_embeddings() -> dict[str, torch.Tensor]:
    return {name: _embedding(family_model(name)) for name in NAMES}


def _embedding(model: nn.Module) -> torch.Tensor:
    predictor = samfx.adapters.find_adapter(model).predictor(model)
    predictor.set_image(_image())
    masks, scores = predictor.predict(**_prompts()[0])
    assert masks.shape == (3, *_image().shape[:2]) and np.isfinite(scores).all()
    return predictor.image_embedding.flatten()


# EdgeTAM's convolutions take quantize (the pass its phone target wants); its other lossy
# passes run the same code on the same layer kinds as the other families'.
LOSSY_CASES = [(name, p) for name in NAMES for p in sorted(LOSSY) if name != "hf_edgetam" or p == "quantize"]


@pytest.mark.parametrize("name, pass_name", LOSSY_CASES)
def test_lossy_passes_apply_and_stay_drop_ins(name: str, pass_name: str, eager_embeddings) -> None:
    model = family_model(name)
    optimized = samfx.optimize(model, [pass_name], calibration_images=[_image()], model_name=name)
    report = optimized.samfx_report.passes[-1]
    assert report.changed, report.skipped
    cosine = torch.nn.functional.cosine_similarity(_embedding(optimized), eager_embeddings[name], dim=0)
    assert cosine >= LOSSY[pass_name]


# RoPE pairs dims under a fixed table: whole heads only
PRUNE = {"hf_sam3_tracker": PruneConfig(mlp=0.5, heads=0.5)}


@pytest.mark.parametrize("name", [n for n in NAMES if n != "hf_edgetam"])  # RepViT declares no MLPs
def test_pruned_encoder_computes_what_the_zeroed_original_computes(name: str) -> None:
    model = family_model(name)
    split = _split(model)
    pruned, report = _prune(split, PRUNE.get(name, PruneConfig(mlp=0.5, heads=0.5, head_dims=0.25)))
    assert report.changed and not report.skipped, report.skipped
    assert samfx.stats.parameter_count(pruned) < samfx.stats.parameter_count(model)
    if FAMILIES[name][2]:  # q/k/v were fused, and split under the names the helper checks
        _check_attention_attributes(pruned)
    else:
        for site in samfx.adapters.find_adapter(pruned).attention_sites(pruned.vision_encoder):
            attention = pruned.vision_encoder.get_submodule(site.path)
            assert attention.num_attention_heads * attention.head_dim == attention.q_proj.out_features
            assert attention.k_proj.out_features == attention.v_proj.out_features == attention.o_proj.in_features
    x = image_input(model)
    with torch.no_grad():
        expected, actual = encoder_output(_zeroed(split, report), x), encoder_output(pruned, x)
    torch.testing.assert_close(actual, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-4)


# A block whose map is windowed: (location, window side)
CLUSTER_AT = {"hf_sam2.1_hiera_tiny": (3, 14), "hf_sam_hq_vit_b": (0, 4)}


def test_rope_heads_are_pruned_whole_and_dims_refused() -> None:
    model = family_model("hf_sam3_tracker")
    with pytest.raises(samfx.PassError, match="RoPE rotates pairs of dims"):
        samfx.optimize(model, [PruneConfig(mlp=0.0, heads=0.0, head_dims=0.5)])
    with pytest.raises(samfx.PassError, match="no stage of blocks"):
        samfx.optimize(model, ["token_cluster"])


@pytest.mark.parametrize("name", sorted(CLUSTER_AT))
def test_one_cluster_per_token_reproduces_the_encoder(name: str) -> None:
    model = family_model(name)
    location, window = CLUSTER_AT[name]
    optimized = samfx.optimize(model, [TokenClusterConfig(location=location, clusters=window * window,
                                                          iterations=0, k=1)])
    assert optimized.samfx_report.passes[0].changed, optimized.samfx_report.passes[0].skipped
    x = image_input(model)
    with torch.no_grad():
        want, got = model.vision_encoder(x), optimized.vision_encoder(x)
    for key in ("last_hidden_state", "fpn_hidden_states", "intermediate_embeddings"):
        if getattr(want, key, None) is not None:
            for a, b in zip(torch.utils._pytree.tree_leaves(getattr(want, key)),
                            torch.utils._pytree.tree_leaves(getattr(got, key)), strict=True):
                torch.testing.assert_close(b, a, atol=1e-5 * a.abs().max().item(), rtol=1e-4)


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory):
    done: dict = {}

    def exported(name: str, format: str):
        if (name, format) not in done:
            done[name, format] = samfx.export(family_model(name), tmp_path_factory.mktemp(f"{name}-{format}"),
                                              format=format)
        return done[name, format]

    return exported


# OpenVINO for SAM 2's layout (three encoder outputs); SAM-HQ's two reach it the way
# hf_sam's one does, which tests/emit covers.
@pytest.mark.parametrize("name, format", [(name, "onnx") for name in NAMES] + [("hf_sam2.1_hiera_tiny", "openvino")])
def test_export_and_runtime_match_eager(name: str, format: str, exports, eager_masks) -> None:
    export = exports(name, format)
    assert export.checks["encoder"]["relative_diff"] < 1e-4
    assert min(case["mask_iou"] for case in export.checks["decoder"]) >= 0.999
    assert export.manifest["family"] == FAMILIES[name][0]
    # Against the family's own predictor, whose preprocessing (transformers' resize) the
    # runtime reimplements in numpy: 0.99, as tests/emit/test_runtime.py holds every family.
    predictor = runtime.load(export.directory, threads=1)
    predictor.set_image(_image())
    masks = [predictor.predict(**prompt)[0] for prompt in _prompts()]
    assert _worst_iou(masks, eager_masks[name]) >= 0.99
