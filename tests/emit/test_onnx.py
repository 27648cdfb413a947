"""The ONNX graphs: the SAM convention, dynamic prompt batches, points and image sizes, external weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import samfx
from samfx.emit.export import export_onnx
from samfx.emit.onnx import DECODER_INPUTS, DECODER_OUTPUTS

from ..conftest import small_model
from .conftest import shared_exports


@shared_exports("onnx")
def test_decoder_follows_the_sam_convention(exported) -> None:
    export = exported("sam_vit_b")
    model = onnx.load(str(export.decoder))
    assert [i.name for i in model.graph.input] == ["image_embeddings", *DECODER_INPUTS]
    assert [o.name for o in model.graph.output] == list(DECODER_OUTPUTS)
    assert model.opset_import[0].version >= 17
    prompts, points = model.graph.input[1].type.tensor_type.shape.dim[:2]
    assert points.dim_param and not points.dim_value  # the number of points is symbolic
    assert prompts.dim_param and not prompts.dim_value  # and so is the number of prompts decoded at once


@shared_exports("onnx")
def test_decoder_runs_for_point_counts_and_image_sizes_it_was_not_traced_with(exported) -> None:
    export = exported("sam_vit_b")
    session = onnxruntime.InferenceSession(str(export.decoder), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((1, 32, 8, 8)).astype(np.float32)
    for prompts, points, hw in [(1, 1, (17, 1000)), (5, 9, (1000, 17)), (1, 40, (128, 128))]:
        feeds = {
            "image_embeddings": embeddings,
            "point_coords": rng.uniform(0, 128, (prompts, points, 2)).astype(np.float32),
            "point_labels": rng.integers(-1, 4, (prompts, points)).astype(np.float32),
            "mask_input": np.zeros((prompts, 1, 32, 32), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array(hw, np.float32),
        }
        masks, scores, low_res = session.run(None, feeds)
        assert masks.shape == (prompts, 3, *hw) and scores.shape == (prompts, 3)
        assert low_res.shape == (prompts, 3, 32, 32)


def test_external_weights_and_the_model_left_as_it_was(tmp_path) -> None:
    model = small_model("sam_vit_b").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export = export_onnx(model, tmp_path, external_data=True)
    # The export ran in eval mode and gave the model back as it was.
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    data = {p.name: p.stat().st_size for p in tmp_path.iterdir() if p.suffix == ".data"}
    assert sorted(data) == ["decoder.onnx.data", "decoder_no_mask.onnx.data", "encoder.onnx.data"]
    assert data["encoder.onnx.data"] + export.encoder.stat().st_size == export.sizes["encoder"]
    assert data["encoder.onnx.data"] > 4 * sum(p.numel() for p in model.image_encoder.parameters()) * 0.99
    assert export.worst_mask_iou >= 0.999  # checked with the external weights loaded


def test_bad_requests_are_refused_with_the_reason(tmp_path) -> None:
    with pytest.raises(ValueError, match="opset 17 or newer"):
        export_onnx(small_model("sam_vit_b"), tmp_path, opset=16)
    with pytest.raises(ValueError, match="no prompt decoder"):
        export_onnx(small_model("sam_vit_b").image_encoder, tmp_path)
    with pytest.raises(ValueError, match="format must be one of"):
        samfx.export(small_model("sam_vit_b"), tmp_path, format="tflite")
    assert not any(tmp_path.iterdir())  # nothing written for a refused model
