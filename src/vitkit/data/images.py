"""Reading images robustly and preparing them the way a checkpoint expects.

Every failure becomes an ImageError whose message names the file and the reason, so a command can report
it on one line and go on with the other inputs.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a cut-off file is an error, not a half-grey picture
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's decompression-bomb limit


class ImageError(ValueError):
    """An input image that cannot be used; str() is the one-line report."""


def load_image(path: str | Path, max_pixels: int | None = None) -> tuple[Image.Image, str | None]:
    """Open an image as 8-bit RGB. Returns (image, note); the note tells what was converted, if worth saying.

    Grayscale, CMYK, palette, alpha (composited on white) and 16-bit images are converted; an animated
    image gives its first frame. Missing, empty, truncated, corrupt, non-image and oversized files raise.
    """
    path = Path(path)
    limit = max_pixels or MAX_PIXELS
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file")
    old_limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = limit
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                frames = getattr(img, "n_frames", 1)
                img.load()
                rgb, note = _to_rgb(img)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{path}: image too large (over {limit:,} pixels, decompression-bomb limit)") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageError(f"{path}: corrupt or truncated image ({e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
    if frames > 1:
        note = f"animated image with {frames} frames: using the first"
    return rgb, note


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    mode = img.mode
    if mode == "RGB":
        return img.copy(), None
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / 32-bit grayscale: scale to 8 bits, not clip
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB"), f"{mode} image scaled to 8 bits"
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB"), None
    return img.convert("RGB"), None


def iter_image_paths(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given (even without an image suffix, so the reader can say what is wrong with them);
    folders walked recursively in sorted order for image files."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield p


_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                  "nearest": InterpolationMode.NEAREST}


def eval_transform(preprocess: dict, img_size: tuple[int, int]) -> v2.Compose:
    """Resize so that a crop_pct center crop has img_size, crop, scale to [0, 1], normalise."""
    crop_pct = preprocess.get("crop_pct", 1.0)
    h, w = img_size
    resize = math.floor(h / crop_pct) if h == w else (math.floor(h / crop_pct), math.floor(w / crop_pct))
    interp = preprocess.get("interpolation", "bicubic")
    if interp not in _INTERPOLATION:
        raise ValueError(f"unknown interpolation {interp!r} (use one of {sorted(_INTERPOLATION)})")
    return v2.Compose([  # resize and crop the PIL image, as timm and torchvision do, for identical pixels
        v2.Resize(resize, interpolation=_INTERPOLATION[interp], antialias=True),
        v2.CenterCrop((h, w)),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(preprocess["mean"]), list(preprocess["std"])),
    ])
