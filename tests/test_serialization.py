"""save/load: exact round trips and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import samfx
from samfx.models import CheckpointError

from .conftest import encoder_output, image_input, small_model


def test_round_trip_is_exact(tmp_path) -> None:
    model = small_model("sam2.1_hiera_t")
    optimized = samfx.optimize(model, ["split_qkv"])
    samfx.save(optimized, tmp_path)
    loaded = samfx.load(tmp_path)
    assert loaded.state_dict().keys() == optimized.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in optimized.state_dict().items())
    x = image_input(model)
    with torch.no_grad():
        torch.testing.assert_close(encoder_output(loaded, x), encoder_output(optimized, x), rtol=0, atol=0)


def test_model_outside_the_zoo_needs_its_base(tmp_path) -> None:
    model = small_model("sam_vit_b")
    del model.samfx_zoo
    optimized = samfx.optimize(model, ["split_qkv"])
    samfx.save(optimized, tmp_path)
    with pytest.raises(CheckpointError, match="base="):
        samfx.load(tmp_path)
    base = small_model("sam_vit_b")
    with torch.no_grad():
        for param in base.parameters():
            param.add_(1.0)  # the base gives the architecture; every weight comes from the file
    loaded = samfx.load(tmp_path, base=base)
    saved = optimized.state_dict()
    assert loaded.state_dict().keys() == saved.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())


def test_not_a_samfx_directory(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not a saved samfx model"):
        samfx.load(tmp_path)


def test_unknown_format_is_refused(tmp_path) -> None:
    samfx.save(samfx.optimize(small_model("sam_vit_b"), ["split_qkv"]), tmp_path)
    recipe = json.loads((tmp_path / "samfx.json").read_text())
    recipe["format"] = "samfx-model/99"
    (tmp_path / "samfx.json").write_text(json.dumps(recipe))
    with pytest.raises(CheckpointError, match="samfx-model/99"):
        samfx.load(tmp_path)


def test_weights_that_do_not_fit_are_refused(tmp_path) -> None:
    samfx.save(samfx.optimize(small_model("sam_vit_b"), ["split_qkv"]), tmp_path)
    recipe = json.loads((tmp_path / "samfx.json").read_text())
    recipe["passes"] = []  # the weights are split, the rebuilt model would not be
    (tmp_path / "samfx.json").write_text(json.dumps(recipe))
    with pytest.raises(CheckpointError, match="cannot load"):
        samfx.load(tmp_path)


def test_saving_a_plain_model_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="did not come from samfx.optimize"):
        samfx.save(small_model("sam_vit_b"), tmp_path)


def test_integer_tables_are_deflated_and_tied_tensors_stored_once(tmp_path) -> None:
    from safetensors import safe_open

    model = small_model("sam_vit_b")
    model.register_buffer("samfx_test_index", torch.arange(4096).remainder(7))
    optimized = samfx.optimize(model, ["split_qkv"])
    blocks = optimized.image_encoder.blocks
    blocks[0].norm2.weight = blocks[0].norm1.weight  # tie two tensors
    samfx.save(optimized, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        index = json.loads(handle.metadata()["samfx.tensors"])
        assert index["tensors"]["samfx_test_index"]["codec"] == "zlib/1"
        assert handle.get_tensor("samfx_test_index").numel() < 4096
        assert index["aliases"] == {"image_encoder.blocks.0.norm2.weight": "image_encoder.blocks.0.norm1.weight"}
    base = small_model("sam_vit_b")
    base.register_buffer("samfx_test_index", torch.zeros(4096, dtype=torch.int64))
    loaded = samfx.load(tmp_path, base=base)
    assert torch.equal(loaded.samfx_test_index, optimized.samfx_test_index)
    assert torch.equal(loaded.image_encoder.blocks[0].norm2.weight, blocks[0].norm1.weight)


def test_plain_safetensors_files_still_load(tmp_path) -> None:
    """Files written before tensor codecs existed hold plain tensors and no index."""
    from safetensors.torch import save_model

    optimized = samfx.optimize(small_model("sam_vit_b"), ["split_qkv"])
    samfx.save(optimized, tmp_path)
    save_model(optimized, str(tmp_path / "model.safetensors"), metadata={"format": "samfx-model/1"})
    loaded = samfx.load(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in optimized.state_dict().items())


def test_unknown_tensor_codec_is_refused(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    model = small_model("sam_vit_b")
    model.register_buffer("samfx_test_index", torch.arange(4096).remainder(7))
    samfx.save(samfx.optimize(model, ["split_qkv"]), tmp_path)
    path = tmp_path / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    index = json.loads(metadata["samfx.tensors"])
    index["tensors"]["samfx_test_index"]["codec"] = "zstd/9"
    save_file(load_file(str(path)), str(path), metadata={**metadata, "samfx.tensors": json.dumps(index)})
    base = small_model("sam_vit_b")
    base.register_buffer("samfx_test_index", torch.zeros(4096, dtype=torch.int64))
    with pytest.raises(CheckpointError, match="zstd/9"):
        samfx.load(tmp_path, base=base)
