"""timm VisionTransformer state dicts (.pth/.bin/.safetensors), DeiT's {'model': state_dict} files included
(`weights.unwrap` opens the container). vitkit uses timm's parameter names, so only old spellings change."""
from __future__ import annotations

from . import Checkpoint, infer_config


def matches(sd: dict) -> bool:
    return "patch_embed.proj.weight" in sd or "patch_embed.backbone.stem.conv.weight" in sd


def convert(sd: dict) -> Checkpoint:
    sd = {k.replace("pre_logits.fc.", "pre_logits."): v for k, v in sd.items()}  # timm < 0.9
    return Checkpoint(sd, "timm", config=infer_config(sd))
