"""Checkpoints: read any supported format into vitkit's parameter names, fit it to a model, load it.

Formats (one module each): vitkit's own .safetensors (`vitkit_format`), Google's .npz (`npz`),
timm and DeiT state dicts (`timm`), transformers directories (`transformers`), torchvision (`torchvision`).
Every difference between a checkpoint and the model it goes into is settled in `fit_state_dict`.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint, or one that does not fit the model. The message says why."""


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]  # in vitkit's (timm's) parameter names
    format: str
    config: dict = field(default_factory=dict)  # architecture facts the file states (ViTConfig fields)
    preprocess: dict | None = None
    class_names: list[str] | None = None
    pos_resample: dict = field(default_factory=dict)  # resample_pos_embed options of the source codebase
    multi_label: bool = False  # its head scores each class on its own (sigmoid), not one class of all (softmax)


def read_state_dict(path: Path) -> dict:
    """Tensors from a .safetensors file, or a torch pickle read with weights_only=True (never a full unpickle)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic != b"PK" and magic[:1] != b"\x80":  # torch.save writes a zip archive (or, before 1.6, a pickle)
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        with warnings.catch_warnings(record=True) as said:  # torch's note on a pickle protocol it may not read
            warnings.simplefilter("always")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        if refused := re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", text):  # weights_only saw an object
            raise CheckpointError(f"{path}: refused to load: it holds a Python object ({refused[1]}), and only "
                                  f"tensors and plain containers are read (weights_only=True)") from None
        if protocol := next((m for w in said if (m := re.search(r"pickle protocol (\d+)", str(w.message)))), None):
            raise CheckpointError(f"{path}: a pickle of protocol {protocol[1]}, not written by torch.save (protocol "
                                  "2), which weights_only=True does not read; save it with torch.save") from None
        detail = re.search(r"WeightsUnpickler error: \s*(\S.*)", text)
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: "
                              f"{detail[1] if detail else text.splitlines()[0] if text else ''})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def rename(key: str, rules: list[tuple[re.Pattern, str]]) -> str:
    """A foreign parameter name in vitkit's: the first (pattern, replacement) rule that matches; else unchanged,
    so that a misfit names it."""
    for pattern, repl in rules:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return key


def unwrap(obj: dict) -> dict:
    """Training checkpoints nest the weights: DeiT {'model': ...}, Lightning {'state_dict': ...}, EMA copies."""
    for key in ("model", "state_dict", "model_ema", "module"):
        if key in obj and isinstance(obj[key], dict) and not isinstance(obj[key], torch.Tensor):
            return unwrap(obj[key])
    if obj and all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_checkpoint(path: str | Path | Mapping) -> Checkpoint:
    """Open a checkpoint of any supported format; the format is detected from the file itself.
    `hf-hub:ORG/REPO` ids and http(s) URLs are downloaded first (weights/hub.py). A state dict already in memory
    (timm's, torchvision's, transformers', DeiT's) is read as its file would be."""
    from . import hub, npz, timm, transformers, vitkit_format

    if isinstance(path, Mapping):
        return _from_state_dict(path, "the state dict")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"weights: a file, a transformers directory, a URL, 'hf-hub:ORG/REPO' or a state dict, not "
                        f"{type(path).__name__} {path!r}"[:300])
    if isinstance(path, str) and hub.is_remote(path):
        path = hub.fetch(path)
    path = Path(path)
    try:
        exists, is_dir = path.exists(), path.is_dir()
        empty = exists and not is_dir and path.stat().st_size == 0
    except OSError as e:  # a name too long, a permission denied
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not exists:
        raise CheckpointError(f"{path}: no such file or directory")
    if is_dir:
        return transformers.read_dir(path)
    if empty:
        raise CheckpointError(f"{path}: empty file")
    if npz.is_npz(path):
        return npz.read(path)
    if path.suffix == ".safetensors" and (ckpt := vitkit_format.read(path)) is not None:
        return ckpt
    if folder := hub.transformers_folder(path):  # its config.json (architecture, eps, labels) and processor too
        return transformers.read_dir(folder, path)
    ckpt = _from_state_dict(read_state_dict(path), path)
    if ckpt.format == "timm" and (config := timm.hub_config(path)):  # save_for_hf's: preprocessing, class names
        timm.read_hub_config(ckpt, config, path)
    return ckpt


def _from_state_dict(raw: Mapping, source) -> Checkpoint:
    from . import timm, torchvision, transformers

    tensors = {k: v for k, v in unwrap(raw).items() if isinstance(v, torch.Tensor)}
    for fmt in (torchvision, transformers, timm):
        if fmt.matches(tensors):
            return timm.convert(tensors, deit="model" in raw) if fmt is timm else fmt.convert(tensors)
    sample = ", ".join(list(tensors)[:5]) or "no tensors"
    raise CheckpointError(f"{source}: not a ViT checkpoint of a known format (keys: {sample})")


def infer_config(sd: dict[str, torch.Tensor]) -> dict:
    """Architecture facts that a vitkit-named state dict shows by itself."""
    cfg = {}
    if "pos_embed" in sd:
        cfg["width"] = sd["pos_embed"].shape[-1]
    cfg["class_token"] = "cls_token" in sd
    cfg["distilled"] = "dist_token" in sd
    if not cfg["class_token"]:
        cfg["pool"] = "gap"
    if "fc_norm.weight" in sd:
        cfg.update(pool="gap", fc_norm=True)
    cfg["representation_size"] = sd["pre_logits.weight"].shape[0] if "pre_logits.weight" in sd else None
    cfg["num_classes"] = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    cfg["qkv_bias"] = "blocks.0.attn.qkv.bias" in sd
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    if blocks:
        cfg["depth"] = max(blocks) + 1
    if "blocks.0.mlp.fc1.weight" in sd:
        cfg["mlp_dim"] = sd["blocks.0.mlp.fc1.weight"].shape[0]
    if "patch_embed.proj.weight" in sd:
        cfg["patch_size"] = sd["patch_embed.proj.weight"].shape[-1]
    first = "patch_embed.backbone.stem.conv.weight" if "patch_embed.backbone.stem.conv.weight" in sd else \
        "patch_embed.proj.weight" if not any(k.startswith("patch_embed.backbone.") for k in sd) else None
    if first in sd:  # input channels (a conv stem's first layer is not a fact this reader knows)
        cfg["in_chans"] = sd[first].shape[1]
    stages = sorted({int(k.split(".")[3]) for k in sd if k.startswith("patch_embed.backbone.stages.")})
    if stages:
        cfg["hybrid_width"] = sd["patch_embed.backbone.stem.conv.weight"].shape[0]
        cfg["hybrid_layers"] = tuple(
            len({k.split(".")[5] for k in sd if k.startswith(f"patch_embed.backbone.stages.{s}.blocks.")})
            for s in stages)
    return cfg


def fit_state_dict(sd: dict[str, torch.Tensor], model, resample: dict | None = None,
                   old_size: tuple[int, int] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every checkpoint-compatibility fix, in one place. Returns the fitted state dict and notes for the user.

    - position embeddings of another grid: resampled in 2D (bicubic, or the source codebase's own way given
      by `resample`: Checkpoint.pos_resample), the [class] position kept; the old grid is the checkpoint's
      stated image size `old_size` over the model's patch size where that fits, else guessed from the count;
    - a head of another size (or none where the model has one): dropped, the model keeps a zeroed head;
    - a pre-logits layer the model does not have: dropped (fine-tuning replaces the pre-training head).
    """
    from ..models.vit import resample_pos_embed

    sd, notes = dict(sd), []
    own = model.state_dict()
    if "reg_token" in sd:  # else the extra positions read as a grid that cannot be
        raise CheckpointError(f"reg_token: a model with {sd['reg_token'].shape[1]} register tokens (timm's "
                              f"reg_tokens), which vitkit's ViT does not have")
    pos, prefix = sd.get("pos_embed"), model.num_prefix_tokens
    stated = tuple(side // model.cfg.reduction for side in old_size) if old_size else None
    if pos is not None and stated and stated[0] * stated[1] != pos.shape[1] - prefix:
        stated = None  # a size that does not match the positions (another patch size): the count decides
    if pos is not None and pos.shape[-1] == own["pos_embed"].shape[-1] and (
            pos.shape != own["pos_embed"].shape or (stated and stated != tuple(model.cfg.grid))):
        old = pos.shape[1] - prefix  # as many positions on a transposed grid (224x320 -> 320x224) still move
        if old <= 0:
            raise CheckpointError(f"pos_embed: checkpoint has {pos.shape[1]} positions, model needs {prefix} "
                                  f"prefix tokens")
        if prefix and not stated and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1] and math.isqrt(old) ** 2 != old:
            raise CheckpointError(f"pos_embed: {pos.shape[1]} positions for the patches alone, none for the [class] "
                                  f"token (timm's no_embed_class=True), which vitkit's ViT does not do")
        old_grid = stated or _grid_for(old, model.cfg.grid)
        sd["pos_embed"] = resample_pos_embed(pos, model.cfg.grid, old_grid, prefix, **(resample or {}))
        growth = max(n / o for n, o in zip(model.cfg.grid, old_grid))
        notes.append(f"position embeddings resampled from {old_grid[0]}x{old_grid[1]} to "
                     f"{model.cfg.grid[0]}x{model.cfg.grid[1]}" + (
                         f" ({growth:.0f}x per side: {math.prod(model.cfg.grid)} tokens, each step as much slower and "
                         f"larger; is img_size {model.cfg.img_size[0]}x{model.cfg.img_size[1]} meant?)"
                         if growth > 4 else ""))
    head_w = sd.get("head.weight")
    model_classes = model.cfg.num_classes
    drop_pre_logits = "pre_logits.weight" in sd and "pre_logits.weight" not in own
    drop_said = False  # the head's note says it
    if head_w is not None and (not model_classes or head_w.shape != own["head.weight"].shape or drop_pre_logits):
        for k in ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias"):
            sd.pop(k, None)
        if model_classes:
            model.reset_head(model_classes)
            other = head_w.shape != own["head.weight"].shape
            why = f"checkpoint has {head_w.shape[0]} classes, model {model_classes}" if other else \
                "the pre-training head (pre-logits layer + classifier) goes, as the paper fine-tunes"
            notes.append(f"head replaced: {why} (new head initialised to zero)")
            drop_said = drop_pre_logits and not other
    elif head_w is None and model_classes:
        model.reset_head(model_classes)
        notes.append(f"checkpoint has no classifier; new {model_classes}-class head initialised to zero")
    if model_classes and "head.weight" not in sd:  # the new zero head(s) are loaded like the rest
        sd.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
        if model.head_dist is not None:
            sd.update({f"head_dist.{k}": v for k, v in model.head_dist.state_dict().items()})
    if drop_pre_logits:  # the paper's fine-tuning: the whole pre-training head goes, a zero head comes
        sd.pop("pre_logits.weight"), sd.pop("pre_logits.bias", None)
        if not drop_said:
            notes.append("pre-logits layer of the checkpoint dropped")
    return sd, notes


def _grid_for(n: int, like: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of n positions: square if possible, else the one with the model's aspect ratio."""
    side = math.isqrt(n)
    if side * side == n:
        return side, side
    for h in range(1, n + 1):
        if n % h == 0 and h * like[1] == (n // h) * like[0]:
            return h, n // h
    raise CheckpointError(f"pos_embed: cannot tell the grid of {n} positions; give the checkpoint's own "
                          f"img_size (e.g. --img-size HxW) to load it (to use it at another size: `vitkit convert` "
                          f"it with that --img-size first)")


# ways to resample position embeddings to another grid, by name (default: the source codebase's own way)
POS_RESAMPLE = {"bicubic": {}, "bilinear": {"mode": "bilinear", "antialias": False},
                # the official code's scipy.ndimage.zoom(order=1) (vit_jax/checkpoint.py): corners aligned
                "vit_jax": {"mode": "bilinear", "antialias": False, "align_corners": True}}


def load_into(model, ckpt: Checkpoint, source: str = "checkpoint", pos_resample: str | None = None) -> list[str]:
    """Fit and load; a mismatch raises CheckpointError naming every differing key and shape. `pos_resample`: a
    POS_RESAMPLE name, else the checkpoint's codebase's way."""
    if pos_resample is not None and pos_resample not in POS_RESAMPLE:
        raise ValueError(f"pos_resample {pos_resample!r}: must be one of {sorted(POS_RESAMPLE)}")
    try:
        resample = POS_RESAMPLE[pos_resample] if pos_resample else ckpt.pos_resample
        size = ckpt.config.get("img_size")
        sd, notes = fit_state_dict(ckpt.state_dict, model, resample, (size, size) if isinstance(size, int) else size)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("shape mismatch", shapes), ("missing in checkpoint", missing),
                             ("not in model", unexpected)):
            if items:
                more = f" (+{len(items) - 6} more)" if len(items) > 6 else ""
                parts.append(f"{label}: {'; '.join(items[:6])}{more}")
        # a shape no name has: the fields to give (a width comes with its head count, which no shape shows)
        shape = ("depth", "mlp_dim", "patch_size") if ckpt.config.get("width") == model.cfg.width else ()
        if differ := [f"{k}={ckpt.config[k]}" for k in shape if ckpt.config.get(k, getattr(model.cfg, k)) !=
                      getattr(model.cfg, k)]:
            parts.append(f"it holds a model with {', '.join(differ)}: pick a name of that shape, or give them (--set "
                         f"{' --set '.join(differ)} on the command line; create_model(..., {', '.join(differ)}))")
        raise CheckpointError(f"{source} does not fit {model.cfg.width}-wide, {len(model.blocks)}-block model: "
                              + " | ".join(parts))
    nonfinite = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:  # a damaged or diverged checkpoint: every prediction would be NaN, printed as if it were one
        more = f" (+{len(nonfinite) - 6} more)" if len(nonfinite) > 6 else ""
        raise CheckpointError(f"{source}: holds NaN or infinite values in {', '.join(nonfinite[:6])}{more}; the "
                              f"file is damaged or its training diverged")
    heads = ckpt.config.get("num_heads")  # invisible in the shapes: a mismatch would silently mis-split q/k/v
    if heads and heads != model.cfg.num_heads:
        raise CheckpointError(f"{source} has {heads} attention heads, the model {model.cfg.num_heads}: choose a "
                              f"model name with {heads} heads or pass num_heads={heads}")
    # assign: a model built on the meta device takes the checkpoint's tensors as they are (no second copy)
    model.load_state_dict({k: v.to(own[k].dtype).contiguous() for k, v in sd.items()}, assign=True)
    if ckpt.preprocess:  # JSON metadata gives lists: the mean and std are tuples as the model's own defaults
        model.preprocess.update({k: tuple(v) if isinstance(v, list) else v for k, v in ckpt.preprocess.items()})
    model.stated_stats = bool(ckpt.preprocess) and {"mean", "std"} <= set(ckpt.preprocess)
    model.pos_resample = dict(resample)  # the way chosen: dynamic_img_size and a saved copy resample alike
    # a head kept as it is keeps its kind of scores; a new one is trained as vitkit trains, one class of all
    model.multi_label = ckpt.multi_label and len(ckpt.state_dict.get("head.weight", ())) == model.cfg.num_classes
    if ckpt.class_names and len(ckpt.class_names) == model.cfg.num_classes:
        model.class_names = list(ckpt.class_names)
    elif ckpt.class_names and "head.weight" in ckpt.state_dict and len(ckpt.state_dict["head.weight"]) == \
            model.cfg.num_classes:  # (not a head replaced for another number of classes: that one has no names yet)
        notes.append(f"its {len(ckpt.class_names)} class names do not fit its {model.cfg.num_classes}-class head: "
                     f"left out (classes are named by index)")
    if ckpt.format == "vitkit" and (missing := [k for k in ("mean", "std") if k not in (ckpt.preprocess or {})]):
        notes.append(f"its metadata gives no input {' or '.join(missing)}: vitkit's default "
                     f"{', '.join(f'{k} {model.preprocess[k]}' for k in missing)} is used")
    return notes
