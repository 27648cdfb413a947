"""samfx.tune on a small model within a budget of seconds; its recipe replayed by the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import samfx
from samfx.cli import main
from samfx.tune import Floor, TuneError, pareto_front, parse_budget, tune

from .conftest import small_model

FLOOR = 0.9
BUDGET = 20.0


@pytest.fixture(scope="module")
def tuned() -> tuple[samfx.TuneResult, torch.nn.Module]:
    """A size search on torch (no timing) for a small model: the best recipe is lossy
    (int8 or lattice-coded weights), calibrated on chelsea and checked on coins."""
    model = small_model("sam_vit_b")
    result = tune(model, objective="size", runtime="torch", min_box_iou=FLOOR, budget=BUDGET, calibration=["chelsea"],
                  images=["coins"], model_name="sam_vit_b", small=True, progress=False)
    return result, model


def _captured_code(model: torch.nn.Module) -> dict[str, list[str]]:
    """Every captured component's generated code, per graph variant."""
    components = samfx.capture(model).components
    return {role: [str(graph) for graph in component.graphs.values()] for role, component in components.items()}


def test_front_is_pareto_and_keeps_the_floor(tuned) -> None:
    tuned, _ = tuned
    assert tuned.front and tuned.best is tuned.front[0]
    assert all(c.meets_floor and c.box_iou >= FLOOR for c in tuned.front)
    feasible = [c for c in tuned.candidates if c.status == "measured" and c.meets_floor]

    def dominates(a, b) -> bool:
        return (a.size_bytes <= b.size_bytes and a.box_iou >= b.box_iou
                and (a.size_bytes < b.size_bytes or a.box_iou > b.box_iou))

    for member in tuned.front:
        assert not any(dominates(other, member) for other in feasible)
    for other in feasible:  # the front is complete: every other feasible candidate is dominated
        assert other in tuned.front or any(dominates(member, other) for member in tuned.front)
    assert tuned.best.size_bytes < tuned.candidates[0].size_bytes, "nothing smaller than the original was found"
    assert tuned.images["calibration"] == ["chelsea"] and tuned.images["evaluation"] == ["coins"]
    assert tuned.recipe["isa"]["summary"] and tuned.recipe["floor"]["min_box_iou"] == FLOOR
    assert tuned.recipe["budget_s"] == BUDGET and tuned.recipe["threads"] >= 1


def test_budget_is_kept(tuned) -> None:
    tuned, _ = tuned
    # No candidate starts after the budget; one running when it ends stops at its next stage.
    assert all(c.started_s < BUDGET for c in tuned.candidates)
    assert tuned.elapsed_s < BUDGET + max(c.seconds for c in tuned.candidates) + 5


def test_a_cut_search_returns_its_best_so_far(tmp_path) -> None:
    result = tune(small_model("sam_vit_b"), objective="latency", runtime="torch", min_box_iou=0.5, budget=0.5,
                  calibration=["chelsea"], images=["coins"], repeats=1, progress=False)
    assert result.cut
    assert result.best is result.candidates[0] and result.best.passes == ""  # the original, timed and measured
    assert result.best.speedup == 1.0 and result.best.latency_s > 0 and result.best.box_iou == 1.0
    recipe = json.loads(result.save_recipe(tmp_path / "recipe.json").read_text())
    assert recipe["cut"] and recipe["passes"] == "" and recipe["runtime"] == "torch"


def test_recipe_replays_to_the_same_model(tuned, tmp_path, capsys) -> None:
    tuned, model = tuned
    assert tuned.best.passes and any(samfx.passes.get_pass(c["pass"]).data_driven or c["pass"] == "hyper"
                                     for c in tuned.recipe["configs"])
    recipe = tuned.save_recipe(tmp_path / "recipe.json")
    weights = tmp_path / "small.pth"  # the small model's random weights, for the CLI to rebuild it
    torch.save(model.state_dict(), weights)
    out = tmp_path / "replayed"
    assert main(["optimize", "--recipe", str(recipe), "--checkpoint", str(weights), "--out", str(out),
                 "--no-fidelity", "--quiet"]) == 0
    replayed = samfx.load(out, base=model)
    assert [p.config for p in replayed.samfx_report.passes] == \
        [c.to_dict() for c in samfx.passes.parse_passes(tuned.best.passes)]
    assert _captured_code(replayed) == _captured_code(tuned.best_model)
    mine, theirs = tuned.best_model.state_dict(), replayed.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_front_leaves_out_candidates_below_the_floor() -> None:
    from samfx.tune import TuneCandidate

    low = TuneCandidate(1, "quantize", "start", size_bytes=10, box_iou=0.5, meets_floor=False)
    high = TuneCandidate(2, "prune", "start", size_bytes=20, box_iou=0.95, meets_floor=True)
    worse = TuneCandidate(3, "hyper", "start", size_bytes=30, box_iou=0.94, meets_floor=True)
    assert pareto_front([low, high, worse], "size", Floor(0.9)) == [high]


@pytest.mark.parametrize("argv, message", [
    (["--budget", "soon"], "budget"),
    (["--budget", "0s"], "budget"),
    (["--runtime", "tensorrt"], "invalid choice"),
    (["--min-box-iou", "1.5"], "min_box_iou"),
    (["--max-gt-miou-loss", "0.01"], "--annotations"),
    (["--min-box-iou", "0.9", "--max-gt-miou-loss", "0.01", "--annotations", "x.json"], "one floor"),
])
def test_cli_errors_are_one_line(argv, message, tmp_path, capsys) -> None:
    code = main(["tune", "--model", "sam_vit_b", "--small", "--out", str(tmp_path / "t"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("samfx: error:") and message in err and "\n" not in err


def test_cli_refuses_a_file_that_is_not_a_recipe(tmp_path, capsys) -> None:
    bad = tmp_path / "recipe.json"
    bad.write_text(json.dumps({"passes": "quantize"}))
    assert main(["optimize", "--recipe", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not a recipe written by samfx tune" in capsys.readouterr().err


def test_budget_syntax() -> None:
    assert parse_budget("20m") == 1200 and parse_budget("1h30m") == 5400 and parse_budget("90") == 90
    with pytest.raises(TuneError):
        parse_budget("20 minutes")


def test_ground_truth_floor_on_annotated_slices(tmp_path) -> None:
    """With annotations the floor is on GT mIoU, the annotated images are split, and the split is recorded."""
    import numpy as np

    from samfx.data import package_images

    coins = package_images(["coins"])[0]
    gray = coins.image[:, :, 0]
    labels = np.zeros(gray.shape, np.int32)
    for label, mask in enumerate(coins.objects[:6], start=1):
        labels[mask] = label
    npz = tmp_path / "case.npz"  # a 2-slice volume: coins and its mirror image
    np.savez(npz, imgs=np.stack([gray, gray[:, ::-1]]), gts=np.stack([labels, labels[:, ::-1]]))
    result = tune(small_model("sam_vit_b"), runtime="torch", min_box_iou=None, max_gt_miou_loss=0.05, budget=0.5,
                  annotations=npz, repeats=1, progress=False)
    original = result.candidates[0]
    assert result.floor.metric == "gt_miou" and original.gt_miou == original.gt_miou_original is not None
    assert original.meets_floor and result.best is original
    record = result.recipe["images"]
    assert record["annotations"] == str(npz) and len(record["calibration"]) == len(record["evaluation"]) == 1
    assert set(record["calibration"]) | set(record["evaluation"]) == {"case.npz[0]", "case.npz[1]"}
    assert result.recipe["floor"] == {"min_box_iou": None, "max_gt_miou_loss": 0.05}
