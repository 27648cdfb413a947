"""Capture: every family's components become graphs that match eager exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import samfx
from samfx.adapters import Adapter, ComponentSpec, TraceRecipe, UnsupportedModelError, register_adapter
from samfx.adapters import _REGISTRY

from .conftest import SMALL_FAMILIES, encoder_output, image_input, small_model

RNG = np.random.default_rng(0)
IMAGE = (RNG.random((90, 120, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("name", SMALL_FAMILIES)
def test_image_encoder_matches_eager(name: str) -> None:
    model = small_model(name)
    captured = samfx.capture(model)
    assert "image_encoder" in captured.components
    x = image_input(model, 1 if name == "lite_medsam" else 2)  # TinyViT at 256 px costs 2 s an image here
    with torch.no_grad():
        torch.testing.assert_close(encoder_output(captured.model, x), encoder_output(model, x), rtol=0, atol=0)


def test_captured_encoder_takes_any_batch() -> None:
    model = small_model("sam_vit_b")
    captured = samfx.capture(model)
    for batch in (1, 3):
        x = image_input(model, batch)
        with torch.no_grad():
            torch.testing.assert_close(encoder_output(captured.model, x), encoder_output(model, x), rtol=0, atol=0)


@pytest.mark.parametrize("name", SMALL_FAMILIES + ["mobile_sam"])
def test_predictor_on_captured_model_matches_original(name: str) -> None:
    """Prompt encoder and decoder graphs, with several prompt counts and both
    mask modes, through the family's own predictor."""
    model = small_model(name)
    captured = samfx.capture(model).model
    adapter = samfx.adapters.find_adapter(model)
    reference, candidate = adapter.predictor(model), adapter.predictor(captured)
    reference.set_image(IMAGE)
    candidate.set_image(IMAGE)
    prompts = [
        dict(point_coords=np.array([[30.0, 40.0]]), point_labels=np.array([1]), multimask_output=True),
        dict(point_coords=np.array([[30.0, 40.0], [80.0, 20.0], [5.0, 70.0]]), point_labels=np.array([1, 0, 1]),
             multimask_output=False),
        dict(box=np.array([10.0, 12.0, 90.0, 70.0]), multimask_output=False),
        dict(point_coords=np.array([[50.0, 50.0]]), point_labels=np.array([1]), box=np.array([10.0, 12.0, 90.0, 70.0]),
             multimask_output=True),
    ]
    for prompt in prompts:
        masks_a, scores_a = reference.predict(**prompt)
        masks_b, scores_b = candidate.predict(**prompt)
        np.testing.assert_array_equal(masks_a, masks_b)
        np.testing.assert_allclose(scores_a, scores_b, rtol=0, atol=1e-6)


def test_capture_never_touches_the_input_model() -> None:
    model = small_model("sam_vit_b")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    samfx.capture(model)
    assert [type(m) for m in model.modules()] == modules_before
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_fake_runs_leave_no_fake_tensor_in_module_caches() -> None:
    # SAM 2's sine position encoding memoises one tensor per feature size in a dict.
    model = small_model("sam2.1_hiera_t")
    samfx.stats.model_stats(model)
    optimized = samfx.optimize(model, ["split_qkv"])
    for m in (model, optimized):
        cached = [v for mod in m.modules() for v in getattr(mod, "cache", {}).values()]
        assert not any(isinstance(v, torch._subclasses.FakeTensor) for v in cached)
    with torch.no_grad():
        positions = optimized.image_encoder(image_input(model))["vision_pos_enc"]
    assert not any(isinstance(p, torch._subclasses.FakeTensor) for p in positions)


def test_captured_component_keeps_its_class_and_attributes() -> None:
    model = small_model("sam_vit_b")
    captured = samfx.capture(model).model
    encoder = captured.image_encoder
    assert isinstance(encoder, type(model.image_encoder))
    assert encoder.img_size == model.image_encoder.img_size
    assert torch.equal(captured.prompt_encoder.get_dense_pe(), model.prompt_encoder.get_dense_pe())


def test_decoder_graphs_are_specialised_on_python_arguments() -> None:
    captured = samfx.capture(small_model("sam_vit_b"))
    assert set(captured.component("mask_decoder").graphs) == {(True,), (False,)}
    assert len(captured.component("prompt_encoder").graphs) == 8


def test_shape_condition_picks_the_graph_at_run_time(lite_medsam: nn.Module) -> None:
    """LiteMedSAM repeats the image embedding only when image and prompt batches
    differ; both the batched forward and the one-image predictor must match."""
    captured = samfx.capture(lite_medsam)
    assert len(captured.component("mask_decoder").graphs) == 4
    embeddings = torch.randn(2, 256, 64, 64)
    pe = lite_medsam.prompt_encoder.get_dense_pe()
    for images, boxes in ((2, 2), (1, 3)):
        sparse, dense = lite_medsam.prompt_encoder(points=None, boxes=torch.rand(boxes, 4) * 200, masks=None)
        args = (embeddings[:images], pe, sparse, dense, False)
        with torch.no_grad():
            expected = lite_medsam.mask_decoder(*args)
            actual = captured.model.mask_decoder(*args)
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_upstream_input_checks_still_raise() -> None:
    model = small_model("hf_sam_vit_b")
    captured = samfx.capture(model).model
    with pytest.raises(ValueError, match="input rejected by the model's own check"):
        captured.vision_encoder(torch.randn(1, 3, 96, 96))


def test_invalid_argument_combination_raises_like_upstream() -> None:
    model = small_model("hf_sam_vit_b")
    captured = samfx.capture(model).model
    points = torch.rand(1, 1, 2, 2)
    with pytest.raises(ValueError, match="labels must also be provided"):
        model.prompt_encoder(points, None, None, None)
    with pytest.raises(ValueError, match="labels must also be provided"):
        captured.prompt_encoder(points, None, None, None)


def test_unknown_model_is_rejected_with_the_supported_families() -> None:
    with pytest.raises(UnsupportedModelError, match="sam2"):
        samfx.capture(nn.Linear(2, 2))


class _DataDependentEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent: no graph can express this
            return self.proj(x)
        return x


class _ToyAdapter(Adapter):
    name = "toy_for_tests"
    model_classes = (f"{__name__}._DataDependentEncoder",)

    def components(self, model: nn.Module) -> list[ComponentSpec]:
        return [ComponentSpec("image_encoder", "", TraceRecipe(), lambda: {"x": torch.zeros(1, 4)})]


def test_untraceable_component_gives_a_capture_error_naming_it() -> None:
    register_adapter(_ToyAdapter())
    try:
        with pytest.raises(samfx.CaptureError, match="image_encoder .*_DataDependentEncoder"):
            samfx.capture(_DataDependentEncoder())
    finally:
        _REGISTRY.pop(_ToyAdapter.name)


def test_capturing_a_captured_model_keeps_its_graphs() -> None:
    once = samfx.capture(small_model("sam_vit_b"))
    twice = samfx.capture(once.model)
    assert set(twice.components) == set(once.components)
    assert twice.model is not once.model


def test_torch_compile_traces_a_captured_component_without_graph_breaks() -> None:
    import torch._dynamo

    model = small_model("sam_vit_b")
    encoder = samfx.capture(model).model.image_encoder
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(encoder, backend="eager")
    x = image_input(model, 1)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model.image_encoder(x))
    assert not counters["graph_break"]
