"""Named recipes: a pass list with its configs and the images it calibrates on.

A preset is what the benchmarks found best for one model on one kind of
machine, ready to run with :func:`samfx.optimize`. Its calibration photos are
the package photos that fidelity reports never evaluate on, so the figures a
preset is judged by are held out.

Example::

    >>> import samfx
    >>> from samfx.presets import get_preset
    >>> preset = get_preset("lite_medsam_cpu")
    >>> [type(p).__name__ for p in preset.passes]
    ['ShareImageSideConfig', 'QuantizeConfig']
    >>> fast = preset.optimize(samfx.models.build("lite_medsam"))  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .distillation import DEFAULT_TRAINING_IMAGES
from .passes import BF16Config, PassConfig, QuantizeConfig, ShareImageSideConfig

__all__ = ["PRESETS", "Preset", "get_preset"]


@dataclass(frozen=True)
class Preset:
    """A pass list, the calibration images its data-driven passes use, and what it is for."""

    name: str
    description: str
    passes: tuple[PassConfig, ...]
    calibration_images: tuple[str, ...] = DEFAULT_TRAINING_IMAGES

    def optimize(self, model: nn.Module, **options: Any) -> nn.Module:
        """``samfx.optimize(model, passes, calibration_images=...)``; ``options`` go to it too."""
        from .data import load_images
        from .pipeline import optimize

        images, _ = load_images(list(self.calibration_images), "calibration")
        return optimize(model, list(self.passes), calibration_images=images, **options)


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "lite_medsam_cpu",
            "LiteMedSAM for CPU runtimes (OpenVINO, onnxruntime; export as QDQ), one image with many boxes: "
            "the decoder's image side once per image instead of once per box (exact), then W8A8 int8 on "
            "encoder and decoder (8-bit weights where the CPU has VNNI/AMX, NNCF's mean-of-extremes ranges). "
            "Pruning (MLP 20-30%, fluctuation) fell below box IoU 0.98 without distillation.",
            (ShareImageSideConfig(), QuantizeConfig()),
        ),
        Preset(
            "lite_medsam_cpu_bf16",
            "LiteMedSAM for OpenVINO on CPUs that multiply bfloat16 natively (AVX-512 BF16, AMX): the decoder's "
            "image side once per image (exact), W8A8 int8 on the encoder only, and bfloat16 for the rest, which "
            "the export hands to OpenVINO as its precision hint (float32 where the CPU lacks native bfloat16). "
            "The decoder is memory-bound with many boxes: bfloat16 halves its traffic where int8's "
            "quantize/dequantize steps add to it.",
            (ShareImageSideConfig(), QuantizeConfig(roles=("image_encoder",)), BF16Config()),
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a ``KeyError`` naming the known ones otherwise."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]
