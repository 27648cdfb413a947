"""save/load: exact round trips and clear errors."""

from __future__ import annotations

import json
import shutil

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
    recipe["history"][0]["passes"] = []  # the weights are split, the rebuilt model would not be
    del recipe["history"][0]["output"]
    _reseal(tmp_path, recipe)
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
    recipe = json.loads((tmp_path / "samfx.json").read_text())
    legacy = {"format": "samfx-model/1", "samfx": "0.1.0", "family": recipe["family"], "base": recipe["base"],
              "passes": recipe["history"][0]["passes"]}
    (tmp_path / "samfx.json").write_text(json.dumps(legacy))
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
    _reseal(tmp_path)
    base = small_model("sam_vit_b")
    base.register_buffer("samfx_test_index", torch.zeros(4096, dtype=torch.int64))
    with pytest.raises(CheckpointError, match="zstd/9"):
        samfx.load(tmp_path, base=base)


def _reseal(path, recipe=None, files: bool = True) -> None:
    """Re-sign a save after a test edited it, as a careful forger would: the
    checks behind the hashes must then catch the edit."""
    from samfx.serialization import _recipe_digest, _sha256

    recipe = recipe or json.loads((path / "samfx.json").read_text())
    if files:
        recipe["files"] = {"model.safetensors": _sha256(path / "model.safetensors")}
    recipe["sha256"] = _recipe_digest(recipe)
    (path / "samfx.json").write_text(json.dumps(recipe))


# -- history of chained optimize calls -----------------------------------------------------

@pytest.mark.parametrize("first, second", [
    ("bf16", "split_qkv"),
    ("fuse_attention", "split_qkv"),
    ("split_qkv", "fuse_attention"),
    ("split_qkv", "hyper"),
    ("split_qkv", "bf16"),
])
def test_chained_optimize_calls_reload_equal(tmp_path, first, second) -> None:
    model = small_model("sam_vit_b")
    chained = samfx.optimize(samfx.optimize(model, [first]), [second])
    assert [[r["config"]["pass"] for r in call["passes"]] for call in chained.samfx_history] == [[first], [second]]
    samfx.save(chained, tmp_path)
    loaded = samfx.load(tmp_path)
    saved_state, loaded_state = chained.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    assert all(loaded_state[k].dtype == v.dtype and torch.equal(loaded_state[k], v) for k, v in saved_state.items())
    x = image_input(model)
    with torch.no_grad():
        torch.testing.assert_close(encoder_output(loaded, x), encoder_output(chained, x), rtol=0, atol=0)
    assert len(loaded.samfx_history) == 2


def test_a_chain_that_cannot_be_replayed_is_refused_at_save(tmp_path) -> None:
    first = samfx.optimize(small_model("sam_vit_b"), ["split_qkv"])
    first.register_buffer("user_added", torch.zeros(3))  # load could not rebuild this between the calls
    second = samfx.optimize(first, ["fuse_attention"])
    with pytest.raises(CheckpointError, match="call 2 .* not what call 1 returned"):
        samfx.save(second, tmp_path)
    edited = samfx.optimize(small_model("sam_vit_b"), ["split_qkv"])
    edited.image_encoder.blocks[0].attn.q = torch.nn.Linear(64, 32)
    with pytest.raises(CheckpointError, match="changed after samfx.optimize"):
        samfx.save(edited, tmp_path)
    assert not list(tmp_path.iterdir())


# -- integrity -----------------------------------------------------------------------------

def _flip_exponent_bit(path, key: str) -> None:
    """Set the top exponent bit of the first float32 weight ``key`` (what a
    single flipped bit on disk does: a huge weight, NaN or infinity)."""
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    start = json.loads(raw[8:8 + header_len])[key]["data_offsets"][0] + 8 + header_len
    raw[start + 3] ^= 0x40
    path.write_bytes(bytes(raw))


def test_a_flipped_bit_in_the_weights_is_refused_naming_the_file(tmp_path) -> None:
    samfx.save(samfx.optimize(small_model("sam_vit_b"), ["split_qkv"]), tmp_path)
    _flip_exponent_bit(tmp_path / "model.safetensors", "image_encoder.blocks.0.attn.q.weight")
    with pytest.raises(CheckpointError, match=r"model.safetensors does not match the SHA-256"):
        samfx.load(tmp_path)


def test_an_edited_recipe_is_refused(tmp_path) -> None:
    samfx.save(samfx.optimize(small_model("sam_vit_b"), ["split_qkv"]), tmp_path)
    text = (tmp_path / "samfx.json").read_text()
    (tmp_path / "samfx.json").write_text(text.replace('"q"', '"p"', 1))
    with pytest.raises(CheckpointError, match="samfx.json: does not match its own SHA-256"):
        samfx.load(tmp_path)


def test_damaged_compressed_tensors_give_a_checkpoint_error(tmp_path) -> None:
    samfx.save(samfx.optimize(small_model("sam_vit_b"), [samfx.HyperConfig(min_numel=64)], min_box_iou=None), tmp_path)
    path = tmp_path / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        coded = next(k for k, e in json.loads(handle.metadata()["samfx.tensors"])["tensors"].items()
                     if e["codec"] == "samfx.lattice-codes/1")
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8:8 + header_len])[coded]["data_offsets"]
    for offset in range(begin + 8 + header_len, end + 8 + header_len):
        raw[offset] ^= 0xA5
    path.write_bytes(bytes(raw))
    _reseal(tmp_path)
    with pytest.raises(CheckpointError, match=f"data of {coded} is corrupt"):
        samfx.load(tmp_path)


def test_the_same_optimize_writes_the_same_bytes(tmp_path) -> None:
    model = small_model("sam_vit_b")
    first, second = (samfx.optimize(model, ["split_qkv", samfx.HyperConfig(min_numel=64)], min_box_iou=None)
                     for _ in range(2))
    runs = [(first, "a"), (first, "b"), (first, "c"), (second, "d")]  # metadata maps iterate in random order
    for optimized, run in runs:
        samfx.save(optimized, tmp_path / run)
    for name in ("model.safetensors", "samfx.json"):
        assert len({(tmp_path / run / name).read_bytes() for _, run in runs}) == 1, name


# -- atomic writes -------------------------------------------------------------------------

def test_an_interrupted_save_leaves_the_old_save_whole(tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    samfx.save(samfx.optimize(small_model("sam_vit_b"), ["split_qkv"]), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    from samfx.report import OptimizeReport

    def interrupted(self, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(OptimizeReport, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        samfx.save(samfx.optimize(small_model("sam_vit_b"), ["split_qkv", "fuse_attention"]), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left behind
    samfx.load(out)


def test_saving_over_a_directory(tmp_path) -> None:
    optimized = samfx.optimize(small_model("sam_vit_b"), ["split_qkv"])
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a samfx save"):
        samfx.save(optimized, other)
    assert (other / "notes.txt").read_text() == "mine"
    samfx.save(optimized, other, overwrite=True)
    assert sorted(p.name for p in other.iterdir()) == ["model.safetensors", "report.json", "samfx.json"]
    (other / "pictures").mkdir()
    samfx.save(optimized, other)  # an earlier save is replaced whole: no stale pictures/
    assert sorted(p.name for p in other.iterdir()) == ["model.safetensors", "report.json", "samfx.json"]
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="not a directory"):
        samfx.save(optimized, tmp_path / "file")
    with pytest.raises(CheckpointError, match="is a file"):
        samfx.save(optimized, tmp_path / "file" / "sub")


# -- recipe schema -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def split_save(tmp_path_factory):
    path = tmp_path_factory.mktemp("split_save")
    return samfx.save(samfx.optimize(small_model("sam_vit_b"), ["split_qkv"]), path)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(samfx="99.0"), "newer than this samfx"),
    (lambda r: r.update(samfx=3), "samfx must be the version"),
    (lambda r: r.update(extra=1), "unknown keys"),
    (lambda r: r.update(base={"name": "os.system", "small": True}), "base must be"),
    (lambda r: r.update(history="split_qkv"), "history must be"),
    (lambda r: r["history"][0].update(passes=[1]), "an optimize call is"),
    (lambda r: r["history"][0]["passes"][0]["config"].update(version=99), "newer than this samfx"),
    (lambda r: r["history"][0]["passes"][0]["config"].update(options={"names": ["q", "q", "q"]}), "distinct"),
    (lambda r: r["history"][0]["passes"][0]["config"].update(options={"nmes": ["a", "b", "c"]}), "unknown options"),
    (lambda r: r["history"][0]["passes"][0]["config"].update({"pass": "hyper", "options": {"max_bits": 3.5}}),
     "max_bits must be an integer, got 3.5"),
    (lambda r: r["history"][0]["passes"][0].update(config="split_qkv"), "a pass record is"),
    (lambda r: r.update(files={"../x": "0" * 64}), "files must map"),
])
def test_recipe_files_are_checked_against_the_schema(tmp_path, split_save, edit, message) -> None:
    shutil.copytree(split_save, tmp_path, dirs_exist_ok=True)
    recipe = json.loads((tmp_path / "samfx.json").read_text())
    edit(recipe)
    _reseal(tmp_path, recipe, files="../x" not in recipe["files"])
    with pytest.raises(CheckpointError, match=message):
        samfx.load(tmp_path)


def test_a_tensor_index_with_a_bad_dtype_is_refused(tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    samfx.save(samfx.optimize(small_model("sam_vit_b"), [samfx.HyperConfig(min_numel=64)], min_box_iou=None), tmp_path)
    path = tmp_path / "model.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    index = json.loads(metadata["samfx.tensors"])
    next(iter(index["tensors"].values()))["dtype"] = "os.system"
    save_file(load_file(str(path)), str(path), metadata={"samfx.tensors": json.dumps(index)})
    _reseal(tmp_path)
    with pytest.raises(CheckpointError, match="dtype 'os.system' is not one of"):
        samfx.load(tmp_path)
