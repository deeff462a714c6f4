"""The paper's Figure 7 (section 4.5) for any model: principal components of the patch-embedding filters,
cosine similarity of position embeddings, and mean attention distance per head against depth.

Each `*_figure` function computes its numbers (the attention distances are given: reading images can fail, so
they come before anything is written), draws them with matplotlib (Agg) and returns the numbers for summary.json.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure  # drawn on matplotlib's Agg canvas; pyplot's global state is not touched
from PIL import Image, ImageDraw, ImageFilter

from ..data.images import ImageError, iter_image_paths
from ..files import replacing
from ..models.resnetv2 import StdConv2d
from .attention import attention_bytes, forward_with_attention, prepare

# ../shared/data/imagenet-samples from where vitkit runs, else beside the vitkit checkout
SAMPLES = [Path("..", "shared", "data", "imagenet-samples"),
           Path(__file__).resolve().parents[3].parent / "shared" / "data" / "imagenet-samples"]
MAX_MATRIX = 1024  # positions up to which summary.json keeps the full similarity matrix
MAX_ASPECT = 4  # pictures at most 4x taller than wide or wider than tall, whatever the image or grid
MAX_PIXELS = 8000  # the longest side of a picture
DPI = 120


# --- filters ---------------------------------------------------------------------------------------
def embedding_filters(model) -> tuple[torch.Tensor, str]:
    """The filters that see raw pixels, (out, C, k, k), and where they come from.

    With a stem (hybrid ResNet, or a conv stem) the patch embedding works on stem features, so there is
    nothing to see in pixel space; the stem's first conv is shown instead (weight-standardised when the
    stem applies it so, as the BiT ResNet does)."""
    if not hasattr(model.patch_embed, "backbone"):
        return model.patch_embed.proj.weight.detach().float().cpu(), "patch_embed.proj"
    name, conv = next((n, m) for n, m in model.patch_embed.backbone.named_modules() if isinstance(m, torch.nn.Conv2d))
    w = conv.weight.detach().float().cpu()
    if isinstance(conv, StdConv2d):
        std = w.std(dim=(1, 2, 3), unbiased=False, keepdim=True).clamp_min(1e-8)
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / std
    return w, f"patch_embed.backbone.{name} (the stem's first conv: the patch embedding works on stem features)"


def filter_components(weights: torch.Tensor, k: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Top-k principal components of the filters (as (k, C, kh, kw)) and their explained variance ratios."""
    flat = weights.detach().flatten(1).double().cpu()  # a model's Parameter as it is, or its copy
    _, s, vt = torch.linalg.svd(flat - flat.mean(dim=0), full_matrices=False)
    k = min(k, vt.shape[0])
    var = s**2
    return vt[:k].reshape(k, *weights.shape[1:]).numpy(), (var[:k] / var.sum()).numpy()


def _as_rgb(f: np.ndarray) -> np.ndarray:
    """(C, kh, kw) -> (kh, kw, 3) in [0, 1]; other channel counts are shown as gray (mean over channels)."""
    img = f.transpose(1, 2, 0) if f.shape[0] == 3 else np.repeat(f.mean(axis=0)[..., None], 3, axis=-1)
    lo, hi = img.min(), img.max()
    return (img - lo) / (hi - lo) if hi > lo else np.full_like(img, 0.5)


def filters_figure(model, path: Path) -> dict:
    weights, source = embedding_filters(model)
    comps, explained = filter_components(weights)
    cols = 7
    rows = math.ceil(len(comps) / cols)
    fig = Figure(figsize=(cols * 1.1, rows * 1.1 + 0.8))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, c, v in zip(axes.flat, comps, explained):
        ax.imshow(_as_rgb(c), interpolation="nearest")
        ax.set_title(f"{v:.1%}", fontsize=7)
    title = "RGB embedding filters (first principal components)"
    if source != "patch_embed.proj":
        title = "stem's first conv filters (first principal components);\nthe patch embedding works on stem features"
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
    return {"source": source, "filter_shape": list(weights.shape), "explained_variance_ratio": _round(explained),
            "components": _round(comps)}


# --- position embeddings ---------------------------------------------------------------------------
def position_similarity(model) -> np.ndarray:
    """Cosine similarity of every patch position's embedding with every other's: (h*w, h*w), row-major."""
    pos = model.pos_embed[0, model.num_prefix_tokens:].detach().float().cpu()
    pos = F.normalize(pos, dim=-1)
    return (pos @ pos.T).clamp(-1, 1).fill_diagonal_(1).numpy()  # each is itself, even an all-zero embedding


def grid_distances(grid: tuple[int, int]) -> np.ndarray:
    """Euclidean distance between every pair of grid cells (row-major), in cells."""
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    cells = np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.float64)
    return np.sqrt(((cells[:, None] - cells[None]) ** 2).sum(-1))


def similarity_mosaic(sim: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """One small (h, w) heat map per position, tiled in an h x w layout with 1-cell NaN gutters."""
    h, w = grid
    tiles = np.full((h, w, h + 1, w + 1), np.nan)
    tiles[:, :, :h, :w] = sim.reshape(h, w, h, w)
    return tiles.transpose(0, 2, 1, 3).reshape(h * (h + 1), w * (w + 1))[:-1, :-1]


def position_figure(model, path: Path) -> dict:
    grid = model.cfg.grid
    sim = position_similarity(model)
    if sim.shape[0] != math.prod(grid):
        raise ValueError(f"{sim.shape[0]} position embeddings do not match the {grid[0]}x{grid[1]} patch grid")
    mosaic = similarity_mosaic(sim, grid)
    ratio = min(max(mosaic.shape[0] / mosaic.shape[1], 1 / MAX_ASPECT), MAX_ASPECT)
    fig = Figure(figsize=(6.4, 6.4 * ratio + 0.6), dpi=DPI)
    ax = fig.subplots()
    im = ax.imshow(mosaic, cmap="viridis", vmin=-1, vmax=1, interpolation="nearest",
                   aspect="equal" if ratio == mosaic.shape[0] / mosaic.shape[1] else "auto")
    for axis, n, set_ticks in ((1, grid[1], ax.set_xticks), (0, grid[0], ax.set_yticks)):
        shown = np.arange(0, n, math.ceil(n / 32))  # at most 32 labels a side
        set_ticks(shown * (grid[axis] + 1) + grid[axis] / 2 - 0.5, shown + 1, fontsize=6)
    ax.set(xlabel="input patch column", ylabel="input patch row",
           title=f"position embedding similarity ({grid[0]}x{grid[1]} patches)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    fig.tight_layout()  # then grown until every similarity gets 3x3 pixels, up to MAX_PIXELS a side
    box, size = ax.get_window_extent(), fig.get_size_inches()
    grow = min(max(3 * mosaic.shape[1] / box.width, 3 * mosaic.shape[0] / box.height, 1),
               MAX_PIXELS / (max(size) * DPI))
    fig.set_size_inches(*(size * grow))
    if mosaic.shape[1] > box.width * grow or mosaic.shape[0] > box.height * grow:
        im.set_interpolation("antialiased")  # still more cells than pixels: averaged, not dropped
    save_figure(fig, path)
    dist = grid_distances(grid)
    values, which = np.unique(dist, return_inverse=True)  # one pass (a 64x64 grid has 1,576 distances)
    means = np.bincount(which.ravel(), weights=sim.ravel()) / np.bincount(which.ravel())
    by_distance = {f"{d:.3f}": float(m) for d, m in zip(values, means)}
    out = {"grid": list(grid), "diagonal": [float(sim.diagonal().min()), float(sim.diagonal().max())],
           "mean_by_distance": by_distance, "neighbours_mean": float(sim[dist == 1].mean()) if dist.max() else None}
    if sim.shape[0] <= MAX_MATRIX:
        out["matrix"] = _round(sim)
    return out


# --- attention distance ----------------------------------------------------------------------------
def mean_attention_distance(attn: torch.Tensor, grid: tuple[int, int], prefix: int, pixels: int) -> torch.Tensor:
    """(B, heads, N, N) probabilities -> (B, heads) mean distance in pixels between a patch query and the
    patches it attends to; attention among patch tokens only, re-normalised over them."""
    a = attn[..., prefix:, prefix:].double()
    a = a / a.sum(dim=-1, keepdim=True)
    dist = torch.from_numpy(grid_distances(grid) * pixels).to(a.device)
    return (a * dist).sum(dim=-1).mean(dim=-1)


def synthetic_images(n: int = 16, size: int = 224, seed: int = 0) -> list[Image.Image]:
    """Stand-in pictures when no sample photos are available: blurred colour noise with random shapes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(rng.integers(2, 6)):
            corner = rng.integers(0, size * 3 // 4, 2)
            box = [*corner.tolist(), *(corner + rng.integers(size // 8, size // 2, 2)).tolist()]
            fill = tuple(rng.integers(0, 256, 3).tolist())
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        out.append(img.filter(ImageFilter.GaussianBlur(1)))
    return out


def default_images() -> tuple[list, str]:
    """The bundled ImageNet samples when present (../shared/data), else generated pictures."""
    # an empty samples folder is no error: generated pictures stand in
    for folder in SAMPLES:
        if folder.is_dir() and (paths := list(iter_image_paths([folder], on_error=lambda e: None))):
            return paths, str(folder)
    return synthetic_images(), "16 generated images (blurred colour noise with shapes; no sample photos found)"


def attention_distances(model, images: Iterable, on_error: Callable[[Exception], None] | None = None,
                        batch_size: int = 8) -> tuple[np.ndarray, int]:
    """Mean attention distance (layers, heads) in pixels, averaged over the images that could be read. images:
    what `prepare` takes, one or many; a path may be a folder or a glob pattern, as on the command line."""
    grid, prefix, pixels = model.cfg.grid, model.num_prefix_tokens, model.cfg.reduction
    if isinstance(images, (str, Path, Image.Image, np.ndarray, torch.Tensor)):
        images = [images]  # one image, not its characters or rows
    images = (item for entry in images for item in
              (iter_image_paths([entry], on_error) if isinstance(entry, (str, Path)) else [entry]))
    total, count, batch = 0.0, 0, []

    from ..api import available_memory

    available = available_memory()  # a batch that fits, down to one image (whose fit forward_with_attention checks)
    one = attention_bytes(model, (1, model.cfg.in_chans, *model.cfg.img_size))
    batch_size = max(1, min(batch_size, available // one)) if available else batch_size

    def flush():
        _, attn = forward_with_attention(model, torch.cat(batch))
        per_layer = torch.stack([mean_attention_distance(attn[i], grid, prefix, pixels) for i in sorted(attn)])
        batch.clear()
        return per_layer.sum(dim=1).cpu().numpy()  # (layers, heads), summed over the batch

    for image in images:
        try:
            x = prepare(model, image)[0]
            if tuple(x.shape[-2:]) != model.cfg.img_size:  # (only a preprocessed tensor can be another size)
                raise ValueError(f"a preprocessed tensor of {x.shape[-2]}x{x.shape[-1]} px: attention distance is "
                                 f"measured at the model's {model.cfg.img_size[0]}x{model.cfg.img_size[1]}")
            batch.append(x)
        except ImageError as e:
            if on_error is None:
                raise
            on_error(e)
            continue
        count += 1
        if len(batch) == batch_size:
            total = total + flush()
    if batch:
        total = total + flush()
    if not count:
        raise ValueError("no readable images to measure attention distance on")
    return total / count, count


def distance_figure(model, path: Path, dist: np.ndarray, count: int, source: str) -> dict:
    """Draws the (layers, heads) result of `attention_distances` over `count` images."""
    uniform = float(grid_distances(model.cfg.grid).mean() * model.cfg.reduction)
    layers, heads = dist.shape
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    colours = matplotlib.colormaps["tab20" if heads > 10 else "tab10"]
    for h in range(heads):
        ax.scatter(np.arange(1, layers + 1), dist[:, h], s=14, color=colours(h % colours.N), label=f"head {h + 1}")
    ax.axhline(uniform, ls="--", color="gray", lw=1, label="uniform attention")
    ax.set(xlabel="network depth (layer)", ylabel="mean attention distance (pixels)",
           ylim=(0, 1.1 * max(uniform, float(dist.max())) or 1),  # a 1x1 grid: every distance 0
           title=f"mean attention distance over {count} image{'s' if count > 1 else ''}")
    ax.set_xticks(np.arange(1, layers + 1))
    if heads <= 16:
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    save_figure(fig, path)
    return {"unit": "pixels", "images": count, "image_source": source, "uniform_attention": uniform,
            "per_layer_head": _round(dist), "per_layer_mean": _round(dist.mean(axis=1))}


# --- common --------------------------------------------------------------------------------------------
def save_figure(fig, path: Path, dpi: int = DPI) -> None:
    """The figure as a picture in the format of path's suffix, replacing an earlier file only once complete.
    A character the font lacks (a CJK file name in a title) is drawn as a box without matplotlib's warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.tight_layout()
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=Path(path).suffix.lstrip(".").lower() or "png")


def _round(a: np.ndarray, digits: int = 4) -> list:
    return np.round(np.asarray(a, dtype=np.float64), digits).tolist()


FIGURES = ("filters.png", "position_similarity.png", "attention_distance.png", "summary.json")


def write_figure7(model, out_dir: str | Path, images: Iterable | None = None, source: str | None = None,
                  on_error=None) -> dict:
    """Write the four files of FIGURES into out_dir (created; existing files are replaced). The images are read
    first, so when none can be read (ValueError) nothing is written."""
    import json

    if images is None:
        images, source = default_images()
    distances = attention_distances(model, images, on_error)  # first: it raises when no image can be read
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    summary = {
        "model": {"width": cfg.width, "depth": cfg.depth, "heads": cfg.num_heads, "patch_size": cfg.patch_size,
                  "img_size": list(cfg.img_size), "grid": list(cfg.grid), "pool": cfg.pool,
                  "hybrid": bool(cfg.hybrid_layers)},
        "filters": filters_figure(model, out_dir / FIGURES[0]),
        "position_similarity": position_figure(model, out_dir / FIGURES[1]),
        "attention_distance": distance_figure(model, out_dir / FIGURES[2], *distances, source or "given images"),
    }
    # one line per section: readable keys, without a line per number of the matrices
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in summary.items()]
    with replacing(out_dir / FIGURES[3]) as tmp:
        tmp.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    return summary
