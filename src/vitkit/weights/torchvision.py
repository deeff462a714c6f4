"""torchvision VisionTransformer state dicts (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14).

torchvision uses nn.MultiheadAttention (in_proj = q, k, v stacked like vitkit's qkv), an MLP Sequential
(mlp.0 / mlp.3; `mlp.linear_1/2` before torchvision 0.13) and `heads.{pre_logits,head}`. The [class] token
gets its own position, as in vitkit. Class names are not stored: predict uses torchvision's ImageNet-1k list.
"""
from __future__ import annotations

import math
import re

from ..models.registry import IMAGENET, TORCHVISION, TV_L16_CROP
from . import Checkpoint, CheckpointError, infer_config, rename

_LAYER = r"encoder\.layers\.encoder_layer_(\d+)\."
_RENAMES = [(re.compile(a), b) for a, b in [
    (r"conv_proj\.", "patch_embed.proj."),
    (r"class_token$", "cls_token"),
    (r"encoder\.pos_embedding$", "pos_embed"),
    (_LAYER + r"ln_1\.", r"blocks.\1.norm1."),
    (_LAYER + r"ln_2\.", r"blocks.\1.norm2."),
    (_LAYER + r"self_attention\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (_LAYER + r"self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (_LAYER + r"mlp\.(?:0|linear_1)\.", r"blocks.\1.mlp.fc1."),
    (_LAYER + r"mlp\.(?:3|linear_2)\.", r"blocks.\1.mlp.fc2."),
    (r"encoder\.ln\.", "norm."),
    (r"heads\.pre_logits\.", "pre_logits."),
    (r"heads\.head\.", "head."),
]]
# torchvision.models.vision_transformer.interpolate_embeddings: bicubic with align_corners=True
_RESAMPLE = {"align_corners": True, "antialias": False}


def matches(sd: dict) -> bool:
    return "class_token" in sd and "encoder.pos_embedding" in sd


def convert(sd: dict) -> Checkpoint:
    if "conv_proj.weight" not in sd:
        raise CheckpointError("torchvision ViT with a convolutional stem (conv_proj.conv_*) is not supported")
    out = {rename(k, _RENAMES): v for k, v in sd.items()}
    return Checkpoint(out, "torchvision", config=infer_config(out), preprocess=_preprocess(out),
                      pos_resample=dict(_RESAMPLE))


def _preprocess(sd: dict) -> dict:
    """The IMAGENET1K_V1 weights: bilinear, resize 256 (vit_l_16: 242), crop 224. The SWAG ones (vit_h_14 at any
    size, the others above 224 px): bicubic, resized straight to the input size."""
    width, _, _, patch = sd["patch_embed.proj.weight"].shape
    side = math.isqrt(sd["pos_embed"].shape[1] - 1) * patch
    if side != 224 or patch == 14:
        return {**IMAGENET, "interpolation": "bicubic", "crop_pct": 1.0}
    return {**TORCHVISION, "crop_pct": TV_L16_CROP} if (width, patch) == (1024, 16) else dict(TORCHVISION)
