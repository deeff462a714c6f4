"""The public entry points: create_model, load_model, save_model."""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from .models import ViT, ViTConfig, build_config, preprocess_at
from .weights import CheckpointError, read_checkpoint, load_into

log = logging.getLogger("vitkit")

# facts a checkpoint states about itself that win over the model name's defaults
_FROM_CHECKPOINT = ("class_token", "distilled", "pool", "fc_norm", "representation_size", "qkv_bias", "norm_eps",
                    "in_chans")


def create_model(name: str, *, weights: str | Path | Mapping | None = None, num_classes: int | None = None,
                 img_size: int | tuple[int, int] | None = None, pos_resample: str | None = None, **overrides) -> ViT:
    """Build a ViT by name ("ViT-B/16", "vit_base_patch16_224", "vit_b_16", ...), optionally with weights.

    With weights, the checkpoint's own head size is kept unless num_classes says otherwise (then the head is
    replaced by a zero-initialised one), and so is its resolution unless img_size says otherwise (then position
    embeddings are resampled in 2D): a 384 px checkpoint runs at 384 px under a name whose default is 224.
    pos_resample: how ("bicubic", "bilinear", "vit_jax"); by default as the checkpoint's own codebase does it.
    weights: a file or transformers directory of any supported format, a URL, "hf-hub:ORG/REPO", or a state dict
    in memory (timm's, torchvision's, ...: `model.state_dict()` of the peer).
    """
    if pos_resample is not None and weights is None:
        raise ValueError(f"pos_resample {pos_resample!r}: it says how weights being loaded are resampled; give weights")
    ckpt = read_checkpoint(weights) if weights is not None else None
    source = "the state dict" if isinstance(weights, Mapping) else weights
    return _build(name, ckpt, source, num_classes, img_size, pos_resample, overrides)


def _build(name: str, ckpt, source, num_classes: int | None, img_size, pos_resample: str | None,
           overrides: dict) -> ViT:
    """create_model with its checkpoint read (None: no weights); `source` names it in notes."""
    facts = {}
    if ckpt is not None:
        facts = {k: ckpt.config[k] for k in _FROM_CHECKPOINT if k in ckpt.config}
        if num_classes is None:
            num_classes = ckpt.config.get("num_classes")
    cfg, preprocess = build_config(name, **{**facts, **overrides}, num_classes=num_classes, img_size=img_size)
    if ckpt is not None and img_size is None and (native := _native_size(ckpt, cfg)) != cfg.img_size:
        cfg, _ = build_config(name, **{**facts, **overrides}, num_classes=num_classes, img_size=native)
        preprocess = preprocess_at(name, cfg.img_size)
    if ckpt is not None or torch.empty(0).device.type == "cpu":  # weights in memory (the caller's device: any torch)
        check_memory(cfg)
    # no random init for weights about to be loaded; else the caller's device (`with torch.device("meta")`: no memory)
    with torch.device("meta") if ckpt is not None else contextlib.nullcontext():
        model = ViT(cfg)
    model.preprocess.update(preprocess)
    if ckpt is not None:
        _load(model, ckpt, source, pos_resample)
    return model.eval()


def available_memory() -> int | None:
    """Bytes of memory this process could still get (Linux: MemAvailable, within a cgroup limit); None if unknown."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            found.append(int(limit))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_memory(cfg: ViTConfig) -> None:
    """ValueError, before anything is allocated, for a model whose weights alone cannot fit in this machine's
    memory (e.g. img_size=100000: position embeddings of 39 million tokens; num_classes=10**11). Linux hands out
    memory it does not have, and the process is then killed without a word, so this is checked up front."""
    available = available_memory()
    if available is None:
        return
    tokens = cfg.grid[0] * cfg.grid[1] + 2
    head = cfg.num_classes * (cfg.representation_size or cfg.width) * (2 if cfg.distilled else 1)
    blocks = cfg.depth * (4 * cfg.width ** 2 + 2 * cfg.width * cfg.mlp_dim)
    parts = {"img_size": 2 * tokens * cfg.width, "num_classes": head, "blocks": blocks}  # 2: a resampled copy
    need = 4 * sum(parts.values())
    if need <= available:
        return
    gib = (f"the model's weights alone would take about {need / 2**30:,.1f} GiB, more than the "
           f"{available / 2**30:,.1f} GiB available")
    biggest = max(parts, key=parts.get)
    if biggest == "img_size":
        raise ValueError(f"img_size {cfg.img_size[0]}x{cfg.img_size[1]} is too large here: "
                         f"{cfg.grid[0]}x{cfg.grid[1]} patches; {gib}")
    if biggest == "num_classes":
        raise ValueError(f"num_classes {cfg.num_classes:,} is too large here: {gib}")
    raise ValueError(f"the model ({cfg.depth} blocks of width {cfg.width}) is too large here: {gib}")


def _native_size(ckpt, cfg: ViTConfig) -> tuple[int, int]:
    """The resolution a checkpoint was made for: stated in its config (transformers), else a square grid of
    position embeddings times the name's patch size; the name's own size when neither tells."""
    if "img_size" in ckpt.config:
        return tuple(ckpt.config["img_size"])
    pos = ckpt.state_dict.get("pos_embed")
    if pos is None or pos.ndim != 3:
        return cfg.img_size
    n = pos.shape[1] - sum(t in ckpt.state_dict for t in ("cls_token", "dist_token"))
    side = math.isqrt(n)
    return (side * cfg.reduction,) * 2 if side * side == n and n > 0 else cfg.img_size


def _load(model: ViT, ckpt, source: str | Path, pos_resample: str | None = None) -> None:
    """Load, saying what had to be fitted (head replaced, position embeddings resampled)."""
    for note in load_into(model, ckpt, source=str(source), pos_resample=pos_resample):
        log.warning("%s: %s", source, note)


ARCHITECTURE = ("width", "depth", "num_heads", "mlp_dim", "patch_size", "img_size")  # what shapes do not all show


def load_model(path: str | Path, *, pos_resample: str | None = None, **overrides) -> ViT:
    """Rebuild a model from a checkpoint that says its architecture, nothing else needed: a vitkit checkpoint
    (.safetensors with its config), a transformers directory or hub repository (its config.json), or a timm hub
    repository (config.json names the model); overrides such as img_size change it (pos_resample: as in
    create_model)."""
    from .weights import timm
    from .weights.hub import fetch, is_remote

    local = fetch(path) if isinstance(path, str) and is_remote(path) else path  # downloaded once
    ckpt = read_checkpoint(local)
    if ckpt.format != "vitkit" and not all(k in ckpt.config for k in ARCHITECTURE):
        if config := timm.hub_config(local):  # a timm repository's config.json names the model and its arguments
            if not timm.known_architecture(config):
                raise CheckpointError(f"{path}: its config.json names {config['architecture']}, a timm model vitkit "
                                      f"has no name for: name the nearest one (--model NAME; create_model(NAME, "
                                      f"weights=...))")
            overrides = {**timm.model_overrides(config, ckpt, path), **overrides}
            return _build(config["architecture"], ckpt, path, overrides.pop("num_classes", None),
                          overrides.pop("img_size", None), pos_resample, overrides)
        raise CheckpointError(f"{path}: a {ckpt.format} checkpoint, which does not say its architecture: name it "
                              f"(--model NAME; create_model(NAME, weights=...)), or `vitkit convert` it first")
    cfg = ViTConfig.from_dict({**ckpt.config, **overrides})
    check_memory(cfg)
    with torch.device("meta"):
        model = ViT(cfg)
    _load(model, ckpt, path, pos_resample)
    return model.eval()


def says_its_architecture(spec: str | Path) -> bool:
    """Whether load_model can build from `spec` alone: a vitkit checkpoint, a transformers directory (config.json)
    or a weights file of one, timm weights beside timm's config.json, a hub repository (transformers' and timm's
    say it). Of URLs only one of a .safetensors file can (fetched to see)."""
    from urllib.parse import urlparse

    from .weights import timm
    from .weights.hub import HF_PREFIX, fetch, is_remote, transformers_folder
    from .weights.vitkit_format import is_vitkit_checkpoint

    spec = str(spec)
    if not is_remote(spec):
        return is_vitkit_checkpoint(spec) or (Path(spec).is_dir() and (Path(spec) / "config.json").is_file()) \
            or timm.known_architecture(timm.hub_config(spec)) \
            or transformers_folder(spec) is not None
    return spec.startswith(HF_PREFIX) or (urlparse(spec).path.endswith(".safetensors")
                                          and is_vitkit_checkpoint(fetch(spec)))


def save_model(model: ViT, path: str | Path, **extra) -> Path:
    from .weights.vitkit_format import save

    return save(model, path, extra or None)
