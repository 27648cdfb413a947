"""The zoo and checkpoint loading: every builder, every bad file."""

from __future__ import annotations

import pytest
import torch

import samfx
from samfx.models import CheckpointError, apply_state_dict, load_checkpoint

from .conftest import small_model


@pytest.mark.parametrize("name", list(samfx.models.list_models()))
def test_every_zoo_model_builds_small(name: str) -> None:
    model = samfx.models.build(name, small=True)
    assert not model.training
    assert samfx.adapters.find_adapter(model).name == samfx.models.spec(name).family
    assert model.samfx_zoo == {"name": name, "small": True}


def test_unknown_model_lists_the_zoo() -> None:
    with pytest.raises(KeyError, match="lite_medsam"):
        samfx.models.build("sam_vit_x")


def test_lite_medsam_has_its_real_weights() -> None:
    model = small_model("lite_medsam")
    # Trained weights, not an initialisation: the LayerNorm gains are not all ones.
    weight = model.image_encoder.layers[1].blocks[0].attn.norm.weight
    assert not torch.allclose(weight, torch.ones_like(weight))


def test_checkpoint_round_trip_pth_and_safetensors(tmp_path) -> None:
    from safetensors.torch import save_file

    model = small_model("sam_vit_b")
    state = model.state_dict()
    torch.save({"model": state}, tmp_path / "wrapped.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "plain.safetensors")
    for name in ("wrapped.pth", "plain.safetensors"):
        loaded = samfx.models.build("sam_vit_b", small=True, checkpoint=tmp_path / name)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")


def test_truncated_checkpoint(tmp_path) -> None:
    path = tmp_path / "cut.pth"
    torch.save(small_model("sam_vit_b").state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_corrupt_safetensors(tmp_path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(path)


class _Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_pickle_with_code_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "extra": _Payload()}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*: it is unsafe, it holds Python objects \(builtins.print\)"):
        load_checkpoint(path)
    torch.save({"extra": _Payload()}, path, _use_new_zipfile_serialization=False)  # torch's legacy format
    with pytest.raises(CheckpointError, match="unsafe"):
        load_checkpoint(path)


def test_empty_and_text_files_named_pth_are_refused(tmp_path) -> None:
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pth is empty"):
        load_checkpoint(tmp_path / "empty.pth")
    (tmp_path / "text.pth").write_text("hello world\n")
    with pytest.raises(CheckpointError, match="text.pth is not a torch checkpoint"):
        load_checkpoint(tmp_path / "text.pth")


def test_a_flipped_exponent_bit_in_a_safetensors_checkpoint_is_detected(tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "flipped.safetensors"
    save_file({"w": torch.ones(4)}, path)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x40  # 1.0 -> infinity
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="w holds 1 NaN/infinite values of 4 .*carry no checksum"):
        load_checkpoint(path)


def test_not_a_state_dict(tmp_path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_checkpoint(path)


def test_mismatched_checkpoint_names_the_differences() -> None:
    model = small_model("sam_vit_b")
    state = dict(model.state_dict())
    state.pop("mask_decoder.iou_token.weight")
    state["extra.weight"] = torch.zeros(1)
    state["image_encoder.pos_embed"] = torch.zeros(1, 2, 2, 64)
    with pytest.raises(CheckpointError, match="1 missing: mask_decoder.iou_token.weight.*1 unexpected: extra.weight"
                                              ".*wrong shape: image_encoder.pos_embed"):
        apply_state_dict(model, state)


def test_identify_finds_the_architecture() -> None:
    state = samfx.models.build("sam_vit_b", small=False).state_dict()
    assert samfx.models.identify(state) == "sam_vit_b"
    with pytest.raises(CheckpointError, match="several zoo architectures .*lite_medsam"):
        samfx.models.identify(small_model("lite_medsam").state_dict())



def test_full_size_mobile_sam_is_tinyvit_5m_at_1024_pixels() -> None:
    model = samfx.models.build("mobile_sam")
    encoder = model.image_encoder
    assert encoder.img_size == 1024
    assert [conv.c.stride for conv in (encoder.patch_embed.seq[0], encoder.patch_embed.seq[2])] == [(2, 2), (2, 2)]
    assert 5.6e6 < sum(p.numel() for p in encoder.parameters()) < 5.9e6
    # A forward on fake tensors: the 64 x 64 embedding MobileSAM's TinyViT hard-codes.
    assert samfx.stats.component_macs(model)["image_encoder"] > 1e10
