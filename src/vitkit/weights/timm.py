"""timm VisionTransformer state dicts (.pth/.bin/.safetensors), DeiT's {'model': state_dict} files included
(`weights.unwrap` opens the container). vitkit uses timm's parameter names, so only old spellings change.

timm's hub repositories (and `save_for_hf`) keep a config.json beside the weights: the model's name
(`architecture`), the arguments it was built with (`model_args`), its preprocessing (`pretrained_cfg`) and class
names (`label_names`); `hub_config` reads it, `model_overrides` turns its arguments into ViTConfig fields.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..models.registry import IMAGENET
from . import Checkpoint, CheckpointError, infer_config

log = logging.getLogger("vitkit")


def matches(sd: dict) -> bool:
    return "patch_embed.proj.weight" in sd or "patch_embed.backbone.stem.conv.weight" in sd


def convert(sd: dict, deit: bool = False) -> Checkpoint:
    """deit: the file was a {'model': ...} container, as DeiT (and other facebookresearch ViTs) release them;
    those are trained on ImageNet statistics, whereas plain timm files follow the model name's preprocessing."""
    sd = {k.replace("pre_logits.fc.", "pre_logits."): v for k, v in sd.items()}  # timm < 0.9
    return Checkpoint(sd, "deit" if deit else "timm", config=infer_config(sd),
                      preprocess=dict(IMAGENET) if deit else None)


def hub_config(path: str | Path) -> dict | None:
    """timm's config.json beside a weights file, if there is one ({"architecture": NAME, ...}; a transformers
    config.json, which has a model_type, is not)."""
    try:
        config = json.loads((Path(path).parent / "config.json").read_text()) if Path(path).is_file() else None
    except (OSError, ValueError):
        return None
    ok = isinstance(config, dict) and isinstance(config.get("architecture"), str) and "model_type" not in config
    return config if ok else None


def known_architecture(config: dict | None) -> bool:
    """Whether vitkit has a name for the model config.json names (timm has many ViT variants it does not)."""
    from ..models.registry import resolve

    if config is None:
        return False
    try:
        resolve(config["architecture"])
        return True
    except ValueError:
        return False


def read_hub_config(ckpt: Checkpoint, config: dict, source) -> None:
    """The preprocessing and class names timm's config.json gives, into `ckpt` (as timm's resolve_data_config and
    its label_names would use them)."""
    from ..train.recipe import SCHEMA  # the checks of a recipe's same preprocessing keys

    pre = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else config  # (old: flat)
    stats = {k: pre[k] for k in ("mean", "std", "interpolation", "crop_pct", "crop_mode") if pre.get(k) is not None}
    near = {"lanczos": "bicubic", "box": "bilinear", "hamming": "bilinear", "border": "center", "random": "bicubic"}
    for key in ("interpolation", "crop_mode"):  # timm's others: the nearest of vitkit's, said
        if stats.get(key) in near:
            log.warning("%s: config.json's %s %r taken as %s", source, key, stats[key], near[stats[key]])
            stats[key] = near[stats[key]]
    if bad := next((f"{k} {why}" for k, v in stats.items() if (why := SCHEMA["model"][k][1](v))), None):
        raise CheckpointError(f"{source}: config.json's pretrained_cfg {bad}")
    if stats:
        ckpt.preprocess = {**(ckpt.preprocess or {}), **stats}
    names = config.get("label_names", pre.get("label_names", pre.get("labels")))
    if isinstance(names, dict):  # {index: name}, where indices have gaps
        names = [names.get(str(i), names.get(i, str(i))) for i in range(ckpt.config.get("num_classes", 0))]
    from ..predict import imagenet_wnids

    if isinstance(names, list) and all(isinstance(n, str) for n in names) and names != imagenet_wnids():
        ckpt.class_names = names  # (ImageNet-1k's WordNet IDs: left unnamed, so words are shown, IDs matched)


# timm VisionTransformer arguments -> ViTConfig fields; arguments of training only are passed over
_ARGS = {"patch_size": "patch_size", "img_size": "img_size", "num_heads": "num_heads", "num_classes": "num_classes",
         "in_chans": "in_chans", "class_token": "class_token", "qkv_bias": "qkv_bias", "fc_norm": "fc_norm",
         "dynamic_img_size": "dynamic_img_size"}
_SHAPES = {"embed_dim": "width", "depth": "depth", "mlp_ratio": "mlp_dim"}  # read from the weights themselves
_TRAINING = {"drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate",
             "weight_init", "fix_init", "global_pool"}
# timm's defaults of the arguments vitkit does not vary (others: none, false or 0 is the plain ViT)
_PLAIN = {"final_norm": True, "pos_embed": "learn", "proj_bias": True, "act_layer": "gelu", "mlp_layer": "mlp",
          "embed_norm_layer": None, "norm_layer": None}


def model_overrides(config: dict, ckpt: Checkpoint, source) -> dict:
    """ViTConfig fields from config.json's model_args (timm's save_for_hf records what the model was built with);
    an argument that changes the architecture in a way vitkit does not build is refused."""
    args = config.get("model_args") if isinstance(config.get("model_args"), dict) else {}
    out = {_ARGS[k]: v for k, v in args.items() if k in _ARGS and v is not None}
    out.update({f: ckpt.config[f] for k, f in _SHAPES.items() if k in args and f in ckpt.config})
    pool = args.get("global_pool", config.get("global_pool"))
    if pool is not None:
        if pool not in ("token", "avg"):
            raise CheckpointError(f"{source}: timm's global_pool {pool!r} is not one vitkit builds (token, avg)")
        out["pool"] = "token" if pool == "token" else "gap"
        if out.get("fc_norm") is None and pool == "avg":
            out["fc_norm"] = "fc_norm.weight" in ckpt.state_dict
    if out.get("fc_norm") is None:
        out.pop("fc_norm", None)
    if other := [f"{k}={v!r}" for k, v in args.items() if k not in _ARGS and k not in _SHAPES and k not in _TRAINING
                 and (v != _PLAIN[k] if k in _PLAIN else v not in (None, False, 0, ""))]:
        raise CheckpointError(f"{source}: config.json's model_args {', '.join(other)}: not an architecture vitkit "
                              f"builds")
    return out
