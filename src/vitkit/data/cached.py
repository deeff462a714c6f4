"""A small image dataset decoded once into one uint8 tensor and cached on disk.

Decoding 50,000 CIFAR JPEGs takes tens of seconds; training then reads one (N, 3, H, W) uint8 tensor
from a safetensors file and augments whole batches on the tensor (see `vitkit.data.cached.augment_batch`),
which costs little next to the model on a CPU.

    data = load_cached("../shared/data/cifar10/train.tar.gz")
    train_idx, val_idx = holdout_split(len(data.labels), 5000)
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import IMAGE_SUFFIXES, ImageError, _to_rgb

DEFAULT_CACHE = Path(os.environ.get("VITKIT_CACHE", Path.home() / ".cache" / "vitkit"))
CACHE_VERSION = "1"


@dataclass
class CachedImages:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64, index into classes
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # "member: reason" for images that could not be used


def _members(source: Path):
    """Yield (relative path 'class/file', bytes reader) of every image in an ImageFolder tar or directory."""
    if source.is_dir():
        for p in sorted(source.rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                yield p.relative_to(source).as_posix(), p.read_bytes
        return
    with tarfile.open(source) as tar:  # one sequential pass: a .tar.gz cannot seek cheaply
        for m in tar:
            if m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES:
                data = tar.extractfile(m).read()
                yield m.name, lambda data=data: data


def _decode(name: str, data: bytes, size: int | None) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb, _ = _to_rgb(img)
    except Exception as e:  # any decoder failure means: skip this one image
        raise ImageError(f"{name}: corrupt or unreadable image ({e})") from None
    x = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
    if size is not None and tuple(x.shape[1:]) != (size, size):
        x = F.interpolate(x[None].float(), size=(size, size), mode="bilinear", antialias=True)[0]
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x


def _existing(source: str | Path) -> Path:
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or directory")
    return source


def decode_folder(source: str | Path, size: int | None = None, subset: str | None = None) -> CachedImages:
    """Decode an ImageFolder (directory or .tar/.tar.gz, `[root/]class/image`) into one tensor.

    Classes are the sorted folder names; images are ordered by (class, path) so the result does not depend
    on the archive order. Unreadable images are skipped and listed. Without `size`, all images must share
    one size. `subset` keeps only images below a folder of that name (e.g. "train" of train/ + val/).
    """
    source = _existing(source)
    found, skipped = [], []
    for name, read in _members(source):
        parts = Path(name).parts
        if subset is not None and subset not in parts[:-2]:
            continue
        if len(parts) < 2:
            skipped.append(f"{name}: not inside a class folder")
            continue
        try:
            found.append((parts[-2], name, _decode(name, read(), size)))
        except ImageError as e:
            skipped.append(str(e))
    if not found:
        raise ValueError(f"{source}: no readable images in class folders")
    found.sort(key=lambda t: (t[0], t[1]))
    shapes = {tuple(t[2].shape) for t in found}
    if len(shapes) > 1:
        raise ValueError(f"{source}: images have different sizes {sorted(shapes)[:3]}...; pass size=N to resize")
    classes = sorted({t[0] for t in found})
    index = {c: i for i, c in enumerate(classes)}
    return CachedImages(torch.stack([t[2] for t in found]), torch.tensor([index[t[0]] for t in found]),
                        classes, skipped)


def cache_path(source: str | Path, size: int | None = None, cache_dir: str | Path | None = None,
               subset: str | None = None) -> Path:
    """Where the decoded copy of `source` lives: keyed by its absolute path, bytes, mtime, `size` and `subset`."""
    source = _existing(source).resolve()
    st = source.stat()
    key = f"{CACHE_VERSION}|{source}|{st.st_size}|{st.st_mtime_ns}|{size}|{subset}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return Path(cache_dir or DEFAULT_CACHE) / f"{source.name.split('.')[0]}-{digest}.safetensors"


def load_cached(source: str | Path, size: int | None = None, cache_dir: str | Path | None = None,
                subset: str | None = None) -> CachedImages:
    """`decode_folder(...)`, read from the cache when there, else decoded and written (atomically)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = cache_path(source, size, cache_dir, subset)
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                return CachedImages(f.get_tensor("images"), f.get_tensor("labels"), json.loads(meta["classes"]),
                                    json.loads(meta["skipped"]))
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    data = decode_folder(source, size, subset)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({"images": data.images.contiguous(), "labels": data.labels}, tmp,
                  metadata={"classes": json.dumps(data.classes), "skipped": json.dumps(data.skipped),
                            "source": str(Path(source).resolve())})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return data


def holdout_split(n: int, val_size: int | float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices): a seeded permutation of range(n), its last `val_size` held out.

    `val_size` is a count, or a fraction of n when below 1.
    """
    k = round(val_size * n) if val_size < 1 else int(val_size)
    if not 0 < k < n:
        raise ValueError(f"validation size {val_size} leaves no training or no validation images (n={n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:-k], perm[-k:]


def augment_batch(x: torch.Tensor, padding: int = 4, flip: bool = True,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding + horizontal flip, one draw per image, for a whole (B, C, H, W) batch.

    Works on any dtype (uint8 included); a gather with per-image offsets, no Python loop over images.
    """
    B, C, H, W = x.shape
    if padding:
        x = F.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (B, 1, 1), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (B, 1, 1), generator=generator)
        rows = (torch.arange(H).view(1, H, 1) + dy).expand(B, H, W)
        cols = (torch.arange(W).view(1, 1, W) + dx).expand(B, H, W)
        if flip:  # mirror the column index instead of a second pass over the pixels
            mirror = torch.rand(B, 1, 1, generator=generator) < 0.5
            cols = torch.where(mirror, (W - 1 + 2 * dx) - cols, cols)
        flat = (rows * (W + 2 * padding) + cols).view(B, 1, H * W).expand(B, C, H * W)
        return x.flatten(2).gather(2, flat).view(B, C, H, W)
    if flip:
        mirror = torch.rand(B, generator=generator) < 0.5
        x = torch.where(mirror.view(B, 1, 1, 1), x.flip(-1), x)
    return x
