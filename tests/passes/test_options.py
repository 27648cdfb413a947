"""Pass lists written as text (``--passes``): values parsed by the config field's type, clear errors."""

from __future__ import annotations

import pytest

from samfx.passes import (HyperConfig, PassError, PruneConfig, QuantizeConfig, TokenClusterConfig, list_passes,
                          parse_passes, pass_options)
from samfx.passes.options import format_value, parse_pass


def test_values_are_parsed_by_the_field_type() -> None:
    split, prune, hyper = parse_passes("split_qkv, prune:mlp=0.3:importance=fluctuation:round_to=8:compensate=no,"
                                       "hyper:rel_error=0.01:overrides=image_encoder.neck.0=0.05+mask_decoder=0.1")
    assert split.name == "split_qkv"
    assert prune == PruneConfig(mlp=0.3, importance="fluctuation", round_to=8, compensate=False)
    assert hyper == HyperConfig(rel_error=0.01, overrides=(("image_encoder.neck.0", 0.05), ("mask_decoder", 0.1)))
    (cluster,) = parse_passes("token_cluster:location=none:clusters=9+9:locations=3+4")
    assert cluster == TokenClusterConfig(location=None, clusters=(9, 9), locations=(3, 4))
    assert parse_pass("token_cluster:clusters=64").clusters == 64
    assert parse_pass("quantize:keep_float=:min_mask_iou=0.97") == QuantizeConfig(keep_float=(), min_mask_iou=0.97)
    assert parse_passes("") == []


def test_every_default_reads_back_as_itself() -> None:
    for info in list_passes():
        options = pass_options(info.name)
        text = ":".join([info.name] + [f"{o.name}={format_value(o.default)}" for o in options])
        assert parse_pass(text) == info.config_cls(), text


@pytest.mark.parametrize("text,message", [
    ("nope", "unknown pass 'nope'"),
    ("prune:ratio=0.3", "prune has no option 'ratio'; its options: mlp, heads, head_dims"),
    ("prune:mlp=0.3:mlp=0.2", "prune: option mlp given twice"),
    ("prune:round_to=1.5", "prune: option round_to='1.5' is not a int"),
    ("token_cluster:clusters=9+9+9", "option clusters='9+9+9' is not a int or int+int"),
    ("hyper:overrides=blocks.0", "option overrides='blocks.0' is not a str=float+..."),
    ("prune:mlp=1.5", "prune"),  # the config's own range check, still a PassError
])
def test_bad_options_are_pass_errors_that_say_what_is_wrong(text, message) -> None:
    with pytest.raises(PassError, match=message.replace("+", r"\+").replace(".", r"\.")):
        parse_passes(text)
