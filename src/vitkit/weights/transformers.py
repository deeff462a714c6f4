"""transformers checkpoints: a `save_pretrained` directory (config.json + model.safetensors or
pytorch_model.bin, sharded or not, optional preprocessor_config.json) of ViTModel / ViTForImageClassification
(ViTForMaskedImageModeling: its encoder), the ViTHybrid* classes of transformers 4.x, DeiTModel and
DeiTForImageClassificationWithTeacher, or such a state dict on its own.

transformers keeps q, k and v as separate Linear layers (vitkit: one qkv), calls the pre-training head
`pooler` (Linear + tanh on the [class] token: vitkit's pre_logits) and uses LayerNorm eps 1e-12.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from ..models.registry import GOOGLE
from . import Checkpoint, CheckpointError, infer_config, read_state_dict, rename

# transformers name (without the ViTFor*'s 'vit.' prefix) -> vitkit name; the first matching rule applies
_BIT = r"embeddings\.patch_embeddings\.backbone\.bit\."
_LAYER = r"(?:encoder\.layer|layers)\.(\d+)\."  # files use encoder.layer.N; transformers 5 modules use layers.N
_RENAMES = [(re.compile(a), b) for a, b in [
    (r"embeddings\.cls_token$", "cls_token"),
    (r"embeddings\.distillation_token$", "dist_token"),
    (r"embeddings\.position_embeddings$", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (_BIT + r"embedder\.convolution\.", "patch_embed.backbone.stem.conv."),
    (_BIT + r"embedder\.norm\.", "patch_embed.backbone.stem.norm."),
    (_BIT + r"encoder\.stages\.(\d+)\.layers\.", r"patch_embed.backbone.stages.\1.blocks."),
    (_LAYER + r"layernorm_before\.", r"blocks.\1.norm1."),
    (_LAYER + r"layernorm_after\.", r"blocks.\1.norm2."),
    (_LAYER + r"attention\.(?:output\.dense|o_proj)\.", r"blocks.\1.attn.proj."),
    (_LAYER + r"(?:intermediate\.dense|mlp\.fc1)\.", r"blocks.\1.mlp.fc1."),
    (_LAYER + r"(?:output\.dense|mlp\.fc2)\.", r"blocks.\1.mlp.fc2."),
    (r"layernorm\.", "norm."),
    (r"pooler\.dense\.", "pre_logits."),
    (r"(?:cls_)?classifier\.", "head."),
    (r"distillation_classifier\.", "head_dist."),
]]
_QKV = re.compile(_LAYER + r"attention\.(?:attention\.(query|key|value)|([qkv])_proj)\.(weight|bias)$")
_RESAMPLE = {"antialias": False}  # transformers' interpolate_pos_encoding: bicubic, no antialiasing
# ViTImageProcessor's defaults: 0.5 mean/std, both sides resized (bilinear) straight to the model's size
_STATS = {"mean": GOOGLE["mean"], "std": GOOGLE["std"], "interpolation": "bilinear", "crop_pct": 1.0,
          "crop_mode": "squash"}
# DeiTImageProcessor's defaults: both sides to 256 (bicubic), a 224 center crop, 0.5 mean and std (facebook's DeiT
# repositories give ImageNet's in their preprocessor_config.json)
_DEIT_STATS = {**_STATS, "interpolation": "bicubic", "crop_pct": 224 / 256}
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def matches(sd: dict) -> bool:
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in sd)


def convert(sd: dict, config: dict | None = None) -> Checkpoint:
    """A transformers state dict (with its config.json when known) -> vitkit names and config facts."""
    config = config or {}
    out, qkv = {}, {}
    keys = {k.removeprefix("vit.").removeprefix("deit.") for k in sd}
    if "embeddings.distillation_token" in keys and "classifier.weight" in keys:
        raise CheckpointError("DeiTForImageClassification (one head on the [class] token beside a distillation "
                              "token) is not supported; DeiTForImageClassificationWithTeacher and DeiTModel are")
    # ViTForImageClassification and DeiT's classifiers have no pooler, and transformers ignores one in the file;
    # DeiTModel's reads the [class] token alone, where vitkit's distilled model averages it with the distillation one
    distilled = "embeddings.distillation_token" in keys
    pooler = distilled or any(k.startswith(("classifier.", "cls_classifier.")) for k in keys)
    if pooler and any(k.startswith("pooler.") for k in keys):
        logging.getLogger("vitkit").warning(
            "pooler weights left out: " + ("DeiTModel's pooler reads the [class] token alone (the features are "
                                           "the [class] and distillation tokens averaged)" if distilled else
                                           "beside a classifier, as transformers' *ForImageClassification do"))
    for key, value in sd.items():
        key = key.removeprefix("vit.").removeprefix("deit.")
        # ViTForMaskedImageModeling's mask token and decoder: the encoder is what classifies
        if key == "embeddings.mask_token" or key.startswith("decoder.") or (pooler and key.startswith("pooler.")):
            continue
        if m := _QKV.match(key):  # query / q_proj -> "q"; joined into one qkv below
            qkv.setdefault((int(m[1]), m[4]), {})[(m[2] or m[3])[0]] = value
            continue
        out[rename(key, _RENAMES)] = value
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"layer {i}: attention {kind} has only {sorted(parts)} of q, k, v")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    facts = infer_config(out)
    facts["norm_eps"] = config.get("layer_norm_eps", 1e-12)  # transformers' default; files without config too
    if config:
        facts.update(_config_facts(config, facts))
    return Checkpoint(out, "transformers", config=facts, preprocess=dict(_STATS), class_names=_labels(config),
                      pos_resample=dict(_RESAMPLE),
                      multi_label=config.get("problem_type") == "multi_label_classification")


def _config_facts(config: dict, facts: dict) -> dict:
    if config.get("model_type") not in ("vit", "vit-hybrid", "deit"):
        raise CheckpointError(f"model_type {config.get('model_type')!r} is not a ViT (supported: vit, vit-hybrid, "
                              f"deit)")
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"hidden_act {config['hidden_act']!r}: vitkit's MLP uses exact gelu")
    if facts.get("representation_size") and config.get("pooler_act", "tanh") != "tanh":
        raise CheckpointError(f"pooler_act {config['pooler_act']!r}: vitkit's pre-logits layer uses tanh")
    backbone = config.get("backbone_config") or {}
    if backbone and backbone.get("layer_type", "bottleneck") != "bottleneck":
        raise CheckpointError(f"hybrid backbone layer_type {backbone['layer_type']!r}: only BiT 'bottleneck'")
    size, heads = config.get("image_size", 224), config.get("num_attention_heads")
    if not (isinstance(heads, int) and heads > 0):
        raise CheckpointError(f"num_attention_heads {heads!r} is not a positive number")
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise CheckpointError(f"image_size {config.get('image_size')!r} is not a positive size")
    return {"num_heads": heads, "qkv_bias": config.get("qkv_bias", True), "img_size": size,
            "in_chans": config.get("num_channels", 3)}


def _labels(config: dict) -> list[str] | None:
    names = [v for _, v in sorted((config.get("id2label") or {}).items(), key=lambda kv: int(kv[0]))]
    return None if all(re.fullmatch(r"LABEL_\d+", n) for n in names) else names  # defaults mean "no names"


def _preprocess(folder: Path, deit: bool = False) -> dict:
    """mean/std, interpolation and crop from preprocessor_config.json (without one: the defaults of the model
    type's processor); do_rescale, rescale_factor and do_normalize folded into the mean and std. Sizes as
    transformers reads them: a number is a square for ViT's and DeiT's processors (older files, e.g. DeiT's "size":
    256, "crop_size": 224), the short side for the others; {"height", "width"} resizes both sides ("squash"),
    {"shortest_edge"} the short side, keeping the aspect."""
    pre = dict(_DEIT_STATS if deit else _STATS)
    path = folder / "preprocessor_config.json"
    if not path.exists():
        return pre
    try:
        p = json.loads(path.read_text())
        if not isinstance(p, dict):
            raise ValueError(f"a JSON {type(p).__name__}, not an object")
        pre.update(mean=_three(p.get("image_mean", pre["mean"])), std=_three(p.get("image_std", pre["std"])))
        # transformers computes (x * rescale_factor - mean) / std of 0-255 pixels, vitkit (x / 255 - mean) / std
        factor = 1 / 255 if p.get("rescale_factor") is None else p["rescale_factor"]
        scale = 255 * (factor if p.get("do_rescale", True) else 1)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
            raise ValueError(f"rescale_factor {p.get('rescale_factor')!r} is not a positive number")
        if not p.get("do_normalize", True):
            pre.update(mean=(0.0,) * 3, std=(1.0,) * 3)
        if abs(scale - 1) > 1e-9:  # (1/255 as a JSON file rounds it: no change)
            pre.update(mean=tuple(m / scale for m in pre["mean"]), std=tuple(d / scale for d in pre["std"]))
        kind = str(p.get("image_processor_type") or p.get("feature_extractor_type") or "ViTImageProcessor")
        size, crop = _size(p.get("size"), square=kind.startswith(_SQUARE)), _size(p.get("crop_size"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    resample = p.get("resample")
    if resample in _PIL_RESAMPLE:
        pre["interpolation"] = _PIL_RESAMPLE[resample]
    elif resample in (1, 4, 5):  # lanczos, box, hamming: the nearest of the three vitkit resizes with
        pre["interpolation"] = "bicubic" if resample == 1 else "bilinear"
        logging.getLogger("vitkit").warning("%s: resample %r resized as %s", path, resample, pre["interpolation"])
    elif resample is not None:
        raise CheckpointError(f"{path}: resample {resample!r} is not one of PIL's resampling filters (0-5)")
    if p.get("do_center_crop") and crop and "height" in crop:
        if "shortest_edge" in size:  # the short side, then a center crop: timm's and torchvision's way
            pre.update(crop_pct=crop["height"] / size["shortest_edge"], crop_mode="center")
        elif "height" in size:  # both sides (squashed), then a center crop: DeiTImageProcessor's way
            pre.update(crop_pct=crop["height"] / size["height"])
    return pre


_SQUARE = ("ViTImageProcessor", "ViTFeatureExtractor", "DeiTImageProcessor", "DeiTFeatureExtractor")  # (the
# hybrid's ViTHybrid/BitImageProcessor reads a number as the short side)


def _size(value, square: bool = True) -> dict:
    if value is None:
        return {}
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    if isinstance(value, dict) and all(isinstance(v, int) and v > 0 for v in value.values() if v is not None):
        return {k: v for k, v in value.items() if v is not None}
    raise ValueError(f"size {value!r} is neither a positive number nor a dict of them")


def _three(value) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        value = [value] * 3
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
        raise ValueError(f"image_mean/image_std {value!r}: not three numbers")
    return tuple(float(v) for v in value)


def _weight_files(folder: Path) -> list[Path]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.exists():  # sharded: the index maps every tensor to its shard
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: unreadable shard index ({e})") from None
            return [folder / s for s in shards]
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin (sharded or not)")


def read_dir(folder: Path, weights: Path | None = None) -> Checkpoint:
    """A save_pretrained directory; `weights`: a weights file of it that was named (not one shard of several)."""
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{folder}: a directory without config.json is not a transformers checkpoint")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: unreadable ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: a JSON {type(config).__name__}, not a transformers config object")
    sd, files = {}, _weight_files(folder)
    if weights is not None and Path(weights).resolve() not in {f.resolve() for f in files}:
        files = [Path(weights)]  # (pytorch_model.bin beside model.safetensors, say)
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f}: shard listed in the index is missing")
        sd.update(read_state_dict(f))
    try:
        ckpt = convert(sd, config)
    except CheckpointError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    ckpt.preprocess = _preprocess(folder, deit=config.get("model_type") == "deit")
    return ckpt
