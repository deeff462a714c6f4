"""Model names: the paper's ("ViT-B/16", "R50+ViT-B/16"), timm's ("vit_base_patch16_224") and
torchvision's ("vit_b_16") all decode to one ViTConfig plus the preprocessing its weights expect."""
from __future__ import annotations

import dataclasses
import difflib
import re

from .vit import WIDTHS, ViTConfig

GOOGLE = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
TORCHVISION = {**IMAGENET, "crop_pct": 224 / 256, "interpolation": "bilinear"}
TV_L16_CROP = 224 / 242  # vit_l_16's IMAGENET1K_V1 weights resize to 242, the others to 256
DEIT = {**IMAGENET, "crop_pct": 0.875, "interpolation": "bicubic"}

_TIMM_SIZE = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H"}
_TV_SIZE = {"b": "B", "l": "L", "h": "H"}

# (variant, patch, image size) as released by Google (vision_transformer / AugReg) and timm
_RELEASED = [("Ti", 16, 224), ("Ti", 16, 384), ("S", 8, 224), ("S", 16, 224), ("S", 16, 384), ("S", 32, 224),
             ("S", 32, 384), ("B", 8, 224), ("B", 16, 224), ("B", 16, 384), ("B", 32, 224), ("B", 32, 384),
             ("L", 16, 224), ("L", 16, 384), ("L", 32, 224), ("L", 32, 384), ("H", 14, 224)]
_TIMM_NAME = {v: k for k, v in _TIMM_SIZE.items()}
_DEIT = [("Ti", 224), ("S", 224), ("B", 224), ("B", 384)]


def decode_variant(variant: str, patch: int) -> dict:
    """'B', 16 -> the ViTConfig fields of ViT-B/16."""
    width, depth, mlp, heads = WIDTHS[variant]
    return dict(width=width, depth=depth, mlp_dim=mlp, num_heads=heads, patch_size=patch)


def _entries() -> dict[str, tuple[dict, dict]]:
    """name -> (ViTConfig fields, preprocessing)."""
    out = {}
    for v, p, size in _RELEASED:
        cfg = dict(decode_variant(v, p), img_size=size)
        pre = {**GOOGLE, "crop_pct": 0.9 if size == 224 else 1.0}
        out[f"vit_{_TIMM_NAME[v]}_patch{p}_{size}"] = (cfg, pre)
        if size == 224:
            out[f"ViT-{v}/{p}"] = (cfg, pre)
        if v in _TV_SIZE.values() and (p, size) in ((16, 224), (32, 224), (14, 224)) and (v, p) != ("B", 8):
            tv_pre = {**TORCHVISION, "crop_pct": 1.0, "interpolation": "bicubic"} if v == "H" else \
                {**TORCHVISION, "crop_pct": TV_L16_CROP} if (v, p) == ("L", 16) else TORCHVISION
            out[f"vit_{v.lower()}_{p}"] = (cfg, tv_pre)
    for size in (224, 384):
        cfg = dict(decode_variant("B", 1), img_size=size, hybrid_layers=(3, 4, 9))
        out[f"vit_base_r50_s16_{size}"] = (cfg, {**GOOGLE, "crop_pct": 0.9 if size == 224 else 1.0})
    out["R50+ViT-B/16"] = out["vit_base_r50_s16_384"]
    # timm's only weights of this name are DINO's (Caron et al. 2021), trained on ImageNet-normalised inputs
    out["vit_small_patch8_224"] = (out["vit_small_patch8_224"][0], {**IMAGENET, "crop_pct": 0.9,
                                                                     "interpolation": "bicubic"})
    for v, size in _DEIT:
        pre = {**DEIT, "crop_pct": 0.875 if size == 224 else 1.0}
        out[f"deit_{_TIMM_NAME[v]}_patch16_{size}"] = (dict(decode_variant(v, 16), img_size=size), pre)
        out[f"deit_{_TIMM_NAME[v]}_distilled_patch16_{size}"] = (dict(decode_variant(v, 16), img_size=size,
                                                                      distilled=True), pre)
    return out


MODELS = _entries()


def list_models() -> list[str]:
    """The registered names; a paper-style "ViT-<variant>/<patch>[@<size>]" (e.g. "ViT-S/14@336") is accepted too."""
    return sorted(MODELS, key=str.lower)


def resolve(name: str) -> tuple[dict, dict]:
    """A model name (any of the spellings, case-insensitive, spaces ignored; paper names take '@384', the R50 hybrid
    too: "R50+ViT-B/16@224") -> (config, preprocess)."""
    if not isinstance(name, str):
        raise TypeError(f"a model name is a str such as 'ViT-B/16', not {type(name).__name__} {name!r}")
    text, lower = name.lower().replace(" ", ""), {k.lower(): k for k in MODELS}
    key = lower.get(text)
    if key:
        cfg, pre = MODELS[key]
        return dict(cfg), dict(pre)
    m = re.fullmatch(r"(r50\+)?(?:vit[-_]?)?(ti|s|b|l|h)/(\d+)(?:@(\d+))?", text)
    if m and (not m[1] or m[3] == "16"):  # any paper-style variant, released or not, e.g. "ViT-S/14@336"
        v = {"ti": "Ti"}.get(m[2], m[2].upper())
        size = int(m[4] or (384 if m[1] else 224))  # (the R50 hybrids were released at 384)
        cfg = dict(decode_variant(v, 1), hybrid_layers=(3, 4, 9)) if m[1] else decode_variant(v, int(m[3]))
        return dict(cfg, img_size=size), {**GOOGLE, "crop_pct": 0.9 if size == 224 else 1.0}
    arch, _, tag = text.removeprefix("timm/").partition(".")
    if tag and arch in lower:  # timm's "architecture.pretrained_tag" names weights
        raise ValueError(f"unknown model {name!r}: '.{tag}' names timm's pretrained weights; give the architecture "
                         f"and the weights: create_model({arch!r}, weights='hf-hub:timm/{arch}.{tag}')")
    close = difflib.get_close_matches(name.lower(), lower, n=3, cutoff=0.75)
    hint = f"did you mean {' or '.join(lower[c] for c in close)}? " if close else ""
    raise ValueError(f"unknown model {name!r}; {hint}`vitkit models` lists the names (e.g. ViT-B/16, "
                     f"vit_base_patch16_224, vit_b_16)")


def preprocess_at(name: str, img_size: tuple[int, int]) -> dict:
    """How inputs are prepared for `name`'s architecture made for another size (a checkpoint of that native size):
    a released sibling's at that size with the same normalisation (vit_base_patch16_384's for ViT-B/16 at 384),
    else the name's without a crop, as timm's, DeiT's and torchvision's higher-resolution weights are evaluated."""
    cfg, pre = resolve(name)
    if (cfg["img_size"],) * 2 == tuple(img_size):
        return pre
    for other_cfg, other_pre in MODELS.values():
        if (other_cfg["img_size"],) * 2 == tuple(img_size) and {**other_cfg, "img_size": 0} == {**cfg, "img_size": 0} \
                and (other_pre["mean"], other_pre["std"]) == (pre["mean"], pre["std"]):
            return dict(other_pre)
    return {**pre, "crop_pct": 1.0}


def build_config(name: str, **overrides) -> tuple[ViTConfig, dict]:
    cfg, pre = resolve(name)
    known = {f.name for f in dataclasses.fields(ViTConfig)}
    if unknown := sorted(set(overrides) - known):
        hints = {u: difflib.get_close_matches(u, known, n=1) for u in unknown}
        said = ", ".join(f"{u!r}" + (f" (did you mean {hints[u][0]!r}?)" if hints[u] else "") for u in unknown)
        raise TypeError(f"unknown model option {said}; the options are the fields of vitkit.ViTConfig: "
                        f"{', '.join(sorted(known))}")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return ViTConfig(**cfg), pre
