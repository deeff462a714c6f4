"""timm VisionTransformer state dicts (.pth/.bin/.safetensors), DeiT's {'model': state_dict} files included
(`weights.unwrap` opens the container). vitkit uses timm's parameter names, so only old spellings change."""
from __future__ import annotations

from ..models.registry import IMAGENET
from . import Checkpoint, infer_config


def matches(sd: dict) -> bool:
    return "patch_embed.proj.weight" in sd or "patch_embed.backbone.stem.conv.weight" in sd


def convert(sd: dict, deit: bool = False) -> Checkpoint:
    """deit: the file was a {'model': ...} container, as DeiT (and other facebookresearch ViTs) release them;
    those are trained on ImageNet statistics, whereas plain timm files follow the model name's preprocessing."""
    sd = {k.replace("pre_logits.fc.", "pre_logits."): v for k, v in sd.items()}  # timm < 0.9
    return Checkpoint(sd, "deit" if deit else "timm", config=infer_config(sd),
                      preprocess=dict(IMAGENET) if deit else None)
