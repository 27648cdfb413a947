"""optimize(): pass resolution, ordering, reports, never mutating the input."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import samfx
from samfx.passes import PassConfig, PassError, PassReport, PassResult, register_pass
from samfx.passes.base import _PASSES
from samfx.pipeline import resolve_passes

from .conftest import small_model


@dataclass(frozen=True)
class _AfterSplitConfig(PassConfig):
    pass


@pytest.fixture
def after_split_pass():
    calls = []

    @register_pass("needs_split_for_tests", _AfterSplitConfig, requires=("split_qkv",))
    def needs_split(captured, config, context):
        calls.append(config)
        return PassResult(captured, PassReport(config.name, config.to_dict(), False, "nothing"))

    yield calls
    _PASSES.pop("needs_split_for_tests")


def test_unknown_pass_names_the_available_ones() -> None:
    with pytest.raises(PassError, match="unknown pass 'prun'.*split_qkv"):
        resolve_passes(["prun"])


def test_duplicate_pass_is_rejected() -> None:
    with pytest.raises(PassError, match="twice"):
        resolve_passes(["split_qkv", "split_qkv"])


def test_required_pass_is_added_and_order_checked(after_split_pass) -> None:
    configs, notes = resolve_passes(["needs_split_for_tests"])
    assert [c.name for c in configs] == ["split_qkv", "needs_split_for_tests"]
    assert "added split_qkv" in notes[0]
    with pytest.raises(PassError, match="needs_split_for_tests must run after split_qkv"):
        resolve_passes(["needs_split_for_tests", "split_qkv"])


def test_configs_and_names_mix(after_split_pass) -> None:
    configs, _ = resolve_passes([samfx.SplitQKVConfig(names=("a", "b", "c")), "needs_split_for_tests"])
    assert configs[0].names == ("a", "b", "c")


def test_config_round_trips_through_a_dict() -> None:
    config = samfx.SplitQKVConfig(names=("a", "b", "c"))
    assert PassConfig.from_dict(config.to_dict()) == config


def test_optimize_returns_a_new_model_and_a_report() -> None:
    model = small_model("sam_vit_b")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    optimized = samfx.optimize(model, ["split_qkv"])
    assert optimized is not model
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    report = samfx.report_of(optimized)
    assert report.family == "sam" and report.model == "sam_vit_b"
    assert report.before.params == report.after.params
    assert report.before.macs["image_encoder"] == report.after.macs["image_encoder"] > 0
    table = report.table()
    assert "split_qkv" in table and "MACs image_encoder" in table


def test_report_table_gives_box_prompt_fidelity_apart() -> None:
    # Box-prompted models (LiteMedSAM) give near-empty click masks: the table shows boxes alone too.
    optimized = samfx.optimize(small_model("sam_vit_b"), ["split_qkv"], fidelity=["coins"])
    fidelity = samfx.report_of(optimized).fidelity
    assert f"box prompts only     mean {fidelity.box_mask_iou_mean:.4f}" in samfx.report_of(optimized).table()


def test_failing_pass_leaves_the_input_untouched() -> None:
    @dataclass(frozen=True)
    class BoomConfig(PassConfig):
        pass

    @register_pass("boom_for_tests", BoomConfig)
    def boom(captured, config, context):
        captured.model.image_encoder.blocks[0].attn.qkv = None  # half-way through...
        raise RuntimeError("boom")

    try:
        model = small_model("sam_vit_b")
        with pytest.raises(RuntimeError, match="boom"):
            samfx.optimize(model, ["boom_for_tests"])
        assert isinstance(model.image_encoder.blocks[0].attn.qkv, torch.nn.Linear)
    finally:
        _PASSES.pop("boom_for_tests")


def test_report_json_round_trip(tmp_path) -> None:
    import json

    optimized = samfx.optimize(small_model("sam_vit_b"), ["split_qkv"])
    path = optimized.samfx_report.save(tmp_path / "report.json")
    data = json.loads(path.read_text())
    assert data["passes"][0]["name"] == "split_qkv"
    assert data["environment"]["torch"] == torch.__version__


def test_a_bare_pass_name_is_one_pass() -> None:
    assert [c.name for c in resolve_passes("split_qkv")[0]] == ["split_qkv"]
    assert [c.name for c in resolve_passes(samfx.SplitQKVConfig())[0]] == ["split_qkv"]


def test_non_finite_weights_are_refused_naming_the_tensor() -> None:
    model = small_model("sam_vit_b")
    with torch.no_grad():
        model.image_encoder.blocks[0].mlp.lin1.weight[0, 0] = float("nan")
    for passes in (["split_qkv"], ["fuse_attention"], ["prune"], ["bf16"]):
        with pytest.raises(PassError, match=r"image_encoder\.blocks\.0\.mlp\.lin1\.weight holds 1 NaN"):
            samfx.optimize(model, passes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_optimized_as_float32_copies(dtype) -> None:
    model = small_model("sam_vit_b").to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = samfx.optimize(model, ["split_qkv"])
    assert any("float32 copy" in note for note in fast.samfx_report.notes)
    assert fast.image_encoder.patch_embed.proj.weight.dtype == torch.float32
    assert all(v.dtype == dtype and torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_quantize_config_errors_surface_when_built() -> None:
    with pytest.raises(PassError, match="quantize: mode must be one of"):
        samfx.QuantizeConfig(mode="w3")
