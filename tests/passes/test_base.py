"""Pass configs are checked when built, against their annotated types and each pass's rules."""

from __future__ import annotations

import pytest

import samfx
from samfx.passes import PassConfig, PassError


@pytest.mark.parametrize("make, message", [
    (lambda: samfx.SplitQKVConfig(names=("q", "q", "q")), "names must be three distinct Python identifiers"),
    (lambda: samfx.SplitQKVConfig(names=("q", "k", "class")), "distinct Python identifiers"),
    (lambda: samfx.SplitQKVConfig(names=("q", "k")), r"names must be a list of 3"),
    (lambda: samfx.HyperConfig(max_bits=3.5), "hyper: max_bits must be an integer, got 3.5"),
    (lambda: samfx.HyperConfig(rel_error=float("nan")), "rel_error must be a finite number, got nan"),
    (lambda: samfx.HyperConfig(rel_error="0.02"), "rel_error must be a finite number"),
    (lambda: samfx.PruneConfig(mlp=True), "prune: mlp must be a finite number, got True"),
    (lambda: samfx.PruneConfig(mlp=1.5), r"mlp ratio must be in \[0, 1\)"),
    (lambda: samfx.BF16Config(roles="image_encoder"), "roles must be a list of"),
    (lambda: samfx.BF16Config(dtype="os.system"), r"dtype must be one of \['bfloat16', 'float16'\]"),
    (lambda: samfx.FuseAttentionConfig(kinds=("nope",)), "unknown attention kinds"),
    (lambda: samfx.QuantizeConfig(mode="w3"), "quantize: mode must be one of"),
    (lambda: samfx.QuantizeConfig(prompts_per_image=0), "prompts_per_image"),
    (lambda: samfx.TokenClusterConfig(clusters=0), "clusters must be a count"),
    (lambda: samfx.TokenClusterConfig(location=-1), "location must be >= 0"),
])
def test_bad_options_are_refused_when_built(make, message) -> None:
    with pytest.raises(PassError, match=message):
        make()


def test_lists_become_tuples_so_configs_stay_hashable() -> None:
    config = samfx.PruneConfig(overrides=[["heads:*", 0.5]])
    assert config.overrides == (("heads:*", 0.5),)
    hash(config)


@pytest.mark.parametrize("record, message", [
    ([1], "a pass record is"),
    ({"pass": "bf16", "options": {"dtype": "os.system"}}, "dtype must be one of"),
    ({"pass": "bf16", "options": {"dtyp": "float16"}}, r"unknown options \['dtyp'\]; its options are \['dtype', 'roles'\]"),
    ({"pass": "bf16", "options": []}, "options must be a mapping"),
    ({"pass": "bf16", "version": "1"}, "version must be an integer"),
    ({"pass": "bf16", "version": 2}, "newer than this samfx"),
    ({"pass": "bf16", "extra": 1}, r"unknown keys \['extra'\]"),
    ({"pass": "nope"}, "unknown pass 'nope'"),
])
def test_records_are_checked_against_the_same_schema(record, message) -> None:
    with pytest.raises(PassError, match=message):
        PassConfig.from_dict(record)


def test_every_config_round_trips_through_its_record() -> None:
    for info in samfx.passes.list_passes():
        config = info.config_cls()
        assert PassConfig.from_dict(config.to_dict()) == config
