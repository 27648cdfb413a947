"""ONNX export: every family, plain and after every pass, runs in onnxruntime like eager."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import samfx
from samfx.emit.onnx import DECODER_INPUTS, DECODER_OUTPUTS, export_onnx

from ..conftest import small_model
from .conftest import ONNX_CASES, case_id, optimized_small


@pytest.mark.parametrize("case", ONNX_CASES, ids=case_id)
def test_exported_pair_matches_eager(exported, case: tuple[str, tuple[str, ...]]) -> None:
    name, passes = case
    export = exported(name, passes)
    checks = export.checks
    assert checks["encoder"]["relative_diff"] < 1e-4
    # Prompts with 1 to 4 points (box corners and padding included), with and without a
    # mask input, on three image sizes, one of them 3x the image.
    assert {case["points"] for case in checks["decoder"]} >= {2, 3, 4}
    assert len({tuple(case["image_hw"]) for case in checks["decoder"]}) == 3
    # onnxruntime's int8 kernels and oneDNN's may round an activation to neighbouring
    # steps: a step moves the random small model's near-zero logits across the threshold.
    # The bar for every pass is a mask IoU of 0.99.
    min_iou, max_score_diff = (0.99, 1e-2) if "quantize" in passes else (0.999, 1e-4)
    for case in checks["decoder"]:
        assert case["mask_iou"] >= min_iou, case
        assert case["iou_max_abs_diff"] < max_score_diff, case
    meta = json.loads((export.directory / "samfx_onnx.json").read_text())
    assert meta["family"] == samfx.adapters.find_adapter(small_model(name)).name
    resolved, _ = samfx.resolve_passes(passes)  # with the passes they require (prune: split_qkv first)
    assert [p["pass"] for p in meta["passes"]] == [c.name for c in resolved]


def test_decoder_follows_the_sam_convention(exported) -> None:
    export = exported("sam_vit_b")
    model = onnx.load(str(export.decoder))
    assert [i.name for i in model.graph.input] == ["image_embeddings", *DECODER_INPUTS]
    assert [o.name for o in model.graph.output] == list(DECODER_OUTPUTS)
    assert model.opset_import[0].version >= 17
    points = model.graph.input[1].type.tensor_type.shape.dim[1]
    assert points.dim_param and not points.dim_value  # the number of points is symbolic


def test_decoder_runs_for_point_counts_and_image_sizes_it_was_not_traced_with(exported) -> None:
    export = exported("sam_vit_b")
    session = onnxruntime.InferenceSession(str(export.decoder), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((1, 32, 8, 8)).astype(np.float32)
    for points, hw in [(1, (17, 1000)), (9, (1000, 17)), (40, (128, 128))]:
        feeds = {
            "image_embeddings": embeddings,
            "point_coords": rng.uniform(0, 128, (1, points, 2)).astype(np.float32),
            "point_labels": rng.integers(-1, 4, (1, points)).astype(np.float32),
            "mask_input": np.zeros((1, 1, 32, 32), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array(hw, np.float32),
        }
        masks, scores, low_res = session.run(None, feeds)
        assert masks.shape == (1, 3, *hw) and scores.shape == (1, 3) and low_res.shape == (1, 3, 32, 32)


def test_external_weights_and_the_model_left_as_it_was(tmp_path) -> None:
    model = small_model("sam_vit_b").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export = export_onnx(model, tmp_path, external_data=True)
    # The export ran in eval mode and gave the model back as it was.
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    data = {p.name: p.stat().st_size for p in tmp_path.iterdir() if p.suffix == ".data"}
    assert sorted(data) == ["decoder.onnx.data", "encoder.onnx.data"]
    assert data["encoder.onnx.data"] + export.encoder.stat().st_size == export.sizes["encoder"]
    assert data["encoder.onnx.data"] > 4 * sum(p.numel() for p in model.image_encoder.parameters()) * 0.99
    assert export.worst_mask_iou >= 0.999  # checked with the external weights loaded


def test_bad_requests_are_refused_with_the_reason(tmp_path) -> None:
    with pytest.raises(ValueError, match="opset 17 or newer"):
        export_onnx(small_model("sam_vit_b"), tmp_path, opset=16)
    with pytest.raises(ValueError, match="no prompt decoder"):
        export_onnx(small_model("sam_vit_b").image_encoder, tmp_path)
    if "bf16" in [info.name for info in samfx.passes.list_passes()]:
        with pytest.raises(ValueError, match="bfloat16 weights"):
            export_onnx(optimized_small("sam_vit_b", ("bf16",)), tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written for a refused model
