"""Where a ViT looks: every layer's attention probabilities, attention rollout, and maps at image resolution.

Which query row a map reads: the [class] token's row for models pooled on it (pool="token"); for models
pooled with "gap" (mean of the patch tokens, often no [class] token at all) the mean over the patch tokens'
rows, i.e. the attention that reaches the mean-pooled output. Keys are always the patch tokens.

Images are resized whole to the model's input size (no center crop, unlike `vitkit predict`), so the map
covers every pixel of the original image; it comes back at the original (H, W), scaled to max 1.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..data.images import ImageError, _to_rgb, array_image, check_rgb_model, eval_transform, load_image
from ..models.vit import ViT, capture_attention

METHODS = ("rollout", "last-layer", "head")


def prepare(model, image) -> tuple[torch.Tensor, tuple[int, int]]:
    """A path, PIL image (converted as files are, see `load_image`), HxWx3 uint8 array or a preprocessed
    (C, H, W) / (1, C, H, W) tensor -> (a batch of one on the model's device, (H, W) of the original)."""
    if not isinstance(model, ViT):
        raise TypeError(f"{type(model).__name__} is not a vitkit ViT; load it with vitkit.create_model/load_model")
    if isinstance(image, (str, Path)):
        image, _ = load_image(image)
    if isinstance(image, np.ndarray):
        image = array_image(image)
    if isinstance(image, Image.Image):
        check_rgb_model(model)
        if image.width == 0 or image.height == 0:
            raise ImageError(f"the image is empty ({image.width}x{image.height} pixels)")
        size = (image.height, image.width)
        interp = InterpolationMode[model.preprocess.get("interpolation", "bicubic").upper()]
        whole = TF.resize(_to_rgb(image)[0], list(model.cfg.img_size), interpolation=interp, antialias=True)
        x = eval_transform({**model.preprocess, "crop_pct": 1.0}, model.cfg.img_size)(whole)[None]
    elif isinstance(image, torch.Tensor):
        x = image if image.ndim == 4 else image[None]
        if x.ndim != 4:
            raise ValueError(f"a tensor of shape {tuple(image.shape)} is not an image: give a preprocessed "
                             f"(3, H, W) or (1, 3, H, W) tensor")
        if x.shape[0] != 1:
            raise ValueError(f"one image at a time, got a batch of {x.shape[0]}")
        if x.shape[1] != model.cfg.in_chans:
            raise ValueError(f"a tensor of shape {tuple(image.shape)} has {x.shape[1]} channels, the model takes "
                             f"{model.cfg.in_chans}: give a preprocessed (3, H, W) or (1, 3, H, W) tensor"
                             + (" (an H, W, 3 image: pass it as a numpy array or PIL image)"
                                if x.shape[-1] == model.cfg.in_chans else ""))
        if not x.is_floating_point():  # raw 0-255 pixels read as normalised values: a meaningless map
            raise ValueError(f"a {x.dtype} tensor is raw pixels, not a preprocessed image: pass the image as a PIL "
                             f"image or numpy array, or normalise it as model.preprocess says")
        size = tuple(x.shape[-2:])
    else:
        raise TypeError(f"image: expected a path, PIL image, HxWx3 uint8 array or preprocessed tensor, not "
                        f"{type(image).__name__}")
    return x.to(model.pos_embed.device, model.pos_embed.dtype), size


def attention_bytes(model, shape: tuple[int, ...], layers: int | None = None) -> int:
    """Memory that keeping `layers` (default all) layers' attention probabilities for inputs of `shape` (B, C, H, W)
    takes, with room for a float32 copy of them (rollout stacks them)."""
    r = model.cfg.reduction
    tokens = model.num_prefix_tokens + (shape[-2] // r) * (shape[-1] // r)
    return 2 * (len(model.blocks) if layers is None else layers) * shape[0] * model.cfg.num_heads * tokens ** 2 * 4


def check_attention_memory(model, shape: tuple[int, ...], layers: int | None = None) -> None:
    """ValueError, before computing, where the attention to be kept cannot fit in memory (a process over it is
    killed without a word): N tokens take N^2 per head and layer."""
    from ..api import available_memory

    need, available = attention_bytes(model, shape, layers), available_memory()
    if available is not None and need > available:
        r = model.cfg.reduction
        raise ValueError(f"keeping the attention of {len(model.blocks) if layers is None else layers} layers for "
                         f"{shape[-2]}x{shape[-1]} px ({(shape[-2] // r) * (shape[-1] // r)} patches) takes about "
                         f"{need / 2**30:,.1f} GiB, more than the {available / 2**30:,.1f} GiB available: give a "
                         f"smaller --img-size")


@torch.no_grad()
def forward_with_attention(model, x: torch.Tensor, layers: list[int] | None = None):
    """(logits, {layer: (B, heads, N, N) probabilities}) from one eval-mode call; the model is left as it was."""
    if x.device.type == "cpu":  # (a GPU says so itself, as an out-of-memory error)
        check_attention_memory(model, tuple(x.shape), None if layers is None else len(layers))
    was_training = model.training
    model.eval()
    try:
        with capture_attention(model, layers) as attn:
            logits = model(x)
    finally:
        model.train(was_training)
    return logits, attn


def all_attentions(model, image) -> torch.Tensor:
    """Every layer's attention probabilities for one input: (layers, heads, N, N), N = prefix + patch tokens."""
    _, attn = forward_with_attention(model, prepare(model, image)[0])
    return torch.stack([attn[i][0] for i in sorted(attn)]).float().cpu()


def rollout(attentions: torch.Tensor) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of (layers, heads, N, N): heads averaged, identity added for
    the residual, rows re-normalised, multiplied through the layers (last layer on the left) -> (N, N)."""
    eye = torch.eye(attentions.shape[-1], dtype=attentions.dtype, device=attentions.device)
    joint = eye
    for a in attentions.mean(dim=1):
        a = a + eye
        joint = (a / a.sum(dim=-1, keepdim=True)) @ joint
    return joint


def read_row(matrix: torch.Tensor, model) -> torch.Tensor:
    """(N, N) token-to-token matrix -> attention on each patch token, from the row the module docstring names."""
    prefix = model.num_prefix_tokens
    rows = matrix[0] if model.cfg.pool == "token" else matrix[prefix:].mean(dim=0)
    return rows[prefix:]


def row_description(model) -> str:
    return "[class] token row" if model.cfg.pool == "token" else "mean over all patch-token rows (gap model)"


def check_index(kind: str, i: int, n: int) -> int:
    if not -n <= i < n:
        raise IndexError(f"{kind} {i} is out of range: the model has {n} {kind}s (0..{n - 1}, or -1 for the last)")
    return i % n


def token_map(model, x: torch.Tensor, method: str = "rollout", layer: int | None = None, head: int | None = None):
    """(logits, attention per patch as an (h, w) grid tensor, scaled to max 1) for a batch of one."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if method != "head" and (layer is not None or head is not None):
        raise ValueError(f"layer and head choose one layer/head for method 'head', not {method!r}")
    depth, heads = len(model.blocks), model.cfg.num_heads
    layer = depth - 1 if layer is None else check_index("layer", layer, depth)
    if head is not None:
        head = check_index("head", head, heads)
    logits, attn = forward_with_attention(model, x, None if method == "rollout" else [layer])
    if method == "rollout":
        matrix = rollout(torch.stack([attn[i][0] for i in sorted(attn)]).float())
    else:
        a = attn[layer][0].float()
        matrix = a.mean(dim=0) if head is None else a[head]
    r = model.cfg.reduction
    grid = read_row(matrix, model).reshape(x.shape[-2] // r, x.shape[-1] // r)
    return logits, grid / grid.max().clamp_min(1e-12)


def to_image_size(grid: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(h, w) map -> (H, W) numpy, bilinear, scaled to max 1."""
    amap = F.interpolate(grid[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
    return (amap / amap.max().clamp_min(1e-12)).cpu().numpy()


def attention_map(model, image, method: str = "rollout", layer: int | None = None,
                  head: int | None = None) -> np.ndarray:
    """Where the model looks in `image`, as an (H, W) float array in [0, 1] at the image's resolution.

    method: "rollout" (all layers), "last-layer" (last layer, heads averaged), "head" (one `layer`, default
    the last; one `head`, default all heads averaged). `image`: see `prepare`.
    """
    x, size = prepare(model, image)
    return to_image_size(token_map(model, x, method, layer, head)[1], size)
