"""Reading images robustly and preparing them the way a checkpoint expects.

Every failure becomes an ImageError whose message names the file and the reason, so a command can report
it on one line and go on with the other inputs.
"""
from __future__ import annotations

import glob
import io
import math
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a cut-off file is an error, not a half-grey picture
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's decompression-bomb limit
_MAX_BYTES = 4 * MAX_PIXELS  # a piped or downloaded image: any 8-bit image file under the pixel limit, even raw


# formats PIL only identifies, or reads with outside programs (EPS: Ghostscript), or that hold no photo
_NOT_WALKED = {"EPS", "WMF", "BUFR", "GRIB", "HDF5", "MPEG", "IPTC", "GBR", "FTEX", "PCD"}
EXIF_ORIENTATION = 0x0112
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the transpose that makes the picture upright


@lru_cache(maxsize=1)
def image_suffixes() -> frozenset[str]:
    """The file name suffixes folders are walked for: every format this PIL reads (.jpg ... .avif, .qoi)."""
    Image.init()
    return frozenset(e for e, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN and fmt not in _NOT_WALKED) | {".mpo"}  # (MPO: JPEG's reader)


class ImageError(ValueError):
    """An input image that cannot be used; str() is the one-line report."""


class NoImagesError(ImageError):
    """A folder or glob pattern given as input that holds no image files."""


def load_image(path: str | Path, max_pixels: int | None = None) -> tuple[Image.Image, str | None]:
    """Open an image as 8-bit RGB, upright as its EXIF orientation says (a phone photo as it was taken). Returns
    (image, note); the note tells what was converted, if worth saying.

    Grayscale, CMYK, palette, alpha (composited on white), 16-bit and float images are converted; an animated
    image gives its first frame. Missing, empty, truncated, corrupt, non-image and oversized files raise.
    "-" (where no file has that name) is the image piped to standard input, read once; an http(s) URL is
    downloaded.
    """
    limit = max_pixels or MAX_PIXELS
    if is_url(path):
        return decode(_download(str(path)), str(path), limit)
    path = Path(path)
    try:
        if str(path) == "-" and not path.exists():  # `curl -s URL | vitkit predict -`
            source = _standard_input()
        elif not path.exists():
            raise ImageError(f"{path}: " + ("a symbolic link to nothing (broken, or a loop)" if path.is_symlink()
                                            else "no such file"))
        elif path.is_dir():
            raise ImageError(f"{path}: is a directory")
        elif path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file")
        else:
            source = path
    except OSError as e:  # a name too long, a permission denied: the file cannot even be looked at
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
    return decode(source, str(path), limit)


def is_url(path) -> bool:
    return isinstance(path, str) and path[:8].lower().startswith(("http://", "https://"))


def decode(source, name: str, limit: int = MAX_PIXELS) -> tuple[Image.Image, str | None]:
    """An image file (a path or a file object) as 8-bit RGB and load_image's note; ImageError naming `name` for
    anything that is not a readable image within `limit` pixels."""
    old_limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = limit
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PIL's notes on damaged metadata: errors are said below
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                img.load()
                return _to_rgb(img)
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: image too large (over {limit:,} pixels, decompression-bomb limit)") from None
    except Exception as e:  # truncated or corrupt data: PIL's decoders raise many kinds (a TIFF: TypeError)
        if "Ghostscript" in str(e):  # EPS: PIL reads it through an outside program
            raise ImageError(f"{name}: an EPS/PS file, which PIL reads with Ghostscript, not installed here") from None
        raise ImageError(f"{name}: corrupt or truncated image ({type(e).__name__}: {e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit


def _standard_input() -> io.BytesIO:
    if sys.stdin is None or sys.stdin.isatty():
        raise ImageError("-: standard input is not a pipe (pipe an image in: cat photo.jpg | vitkit predict -)")
    data = sys.stdin.buffer.read(_MAX_BYTES + 1)
    if not data:  # nothing piped, or a second "-": the first one read it
        raise ImageError("-: no image on standard input")
    if len(data) > _MAX_BYTES:
        raise ImageError(f"-: more than {_MAX_BYTES // 2**20} MiB on standard input, the limit for a piped image "
                         "(give a larger one as a file)")
    return io.BytesIO(data)


def _download(url: str, timeout: float = 30.0, deadline: float = 120.0) -> io.BytesIO:
    """An image at an http(s) URL: `timeout` seconds for each network wait, `deadline` for the whole download."""
    import time
    from urllib.error import HTTPError
    from urllib.request import Request, urlopen

    start, data = time.monotonic(), bytearray()
    try:  # (some servers refuse urllib's default User-Agent)
        with urlopen(Request(url, headers={"User-Agent": "vitkit"}), timeout=timeout) as response:
            if int(response.headers.get("Content-Length") or 0) > _MAX_BYTES:
                raise ImageError(f"{url}: more than {_MAX_BYTES // 2**20} MiB, the limit for a downloaded image")
            while chunk := response.read1(1 << 16):
                data += chunk
                if len(data) > _MAX_BYTES:
                    raise ImageError(f"{url}: more than {_MAX_BYTES // 2**20} MiB, the limit for a downloaded image")
                if time.monotonic() - start > deadline:
                    raise ImageError(f"{url}: download failed (not done after {deadline:.0f} s)")
    except HTTPError as e:
        raise ImageError(f"{url}: download failed (HTTP {e.code} {e.reason})") from None
    except (OSError, ValueError) as e:  # no network, DNS, refused, timeout, a malformed URL, a redirect loop
        if isinstance(e, ImageError):
            raise
        why = str(getattr(e, "reason", None) or e).splitlines()[0]
        raise ImageError(f"{url}: download failed ({why})") from None
    if not data:
        raise ImageError(f"{url}: empty download")
    return io.BytesIO(bytes(data))


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """A PIL image (a file just opened, or one given from Python) as 8-bit RGB, upright, and a note as
    load_image's."""
    rgb, note = _convert(img)
    if (turn := _UPRIGHT.get(_orientation(img))) is not None:  # (FLIP_LEFT_RIGHT is 0)
        rgb = rgb.transpose(turn)
        rgb.info = {}  # no EXIF or XMP orientation left to turn it a second time
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        note = f"animated image with {frames} frames: using " + (f"frame {img.tell()}" if img.tell() else "the first")
    return rgb, note


def array_image(a: np.ndarray) -> Image.Image:
    """An image array from Python as a PIL image: HxW, HxWx1, HxWx3 or HxWx4 of uint8 (or other ints in 0-255),
    uint16 (0-65535), bool, or floats in [0, 1] (as matplotlib and scikit-image hold images). ValueError otherwise."""
    what = f"a {a.dtype} array of shape {a.shape}"
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ValueError(f"{what} is not an image: give an HxW or HxWx3 uint8 array (or a PIL image)"
                         + ("; this looks like (C, H, W): a.transpose(1, 2, 0)"
                            if a.ndim == 3 and a.shape[0] in (1, 3, 4) else ""))
    if a.size == 0 or a.dtype == np.uint8:
        a = a.astype(np.uint8, copy=False)
    elif a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = np.round(a / 257.0).astype(np.uint8)
    elif a.dtype.kind == "f" and np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1:
        a = np.round(a * 255.0).astype(np.uint8)
    elif a.dtype.kind in "iu" and a.min() >= 0 and a.max() <= 255:
        a = a.astype(np.uint8)
    else:
        raise ValueError(f"{what} is not an image: pixels are uint8 or ints in 0-255, uint16, or floats in [0, 1] "
                         f"(these are {a.min()} to {a.max()})")
    return Image.fromarray(np.ascontiguousarray(a))


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1: as stored); transformers' load_image applies it too, timm and torchvision do not."""
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # damaged EXIF data: the pixels as stored
        return 1


def _convert(img: Image.Image) -> tuple[Image.Image, str | None]:
    mode = img.mode
    if mode == "RGB":
        return img.copy(), None
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / 32-bit grayscale: scale to 8 bits, not clip
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = arr.min(), arr.max()
        if mode.startswith("I;16") or (mode == "I" and lo >= 0 and 255 < hi <= 65535):
            lo, hi = 0.0, 65535.0  # 16-bit data, also when PIL holds it as 32-bit "I"
        elif mode == "F" and lo >= 0 and hi <= 1:
            lo, hi = 0.0, 1.0  # the usual range of float images
        elif lo >= 0 and hi <= 255:
            lo, hi = 0.0, 255.0
        # else no standard range fits (negative or huge values): min..max is stretched to 0..255
        arr = np.clip((arr - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB"), f"{mode} image scaled to 8 bits"
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB"), None
    return img.convert("RGB"), None


def is_junk(name: str) -> bool:
    """Hidden entries and macOS archive debris (`.DS_Store`, AppleDouble `._x.jpg`, `__MACOSX/`)."""
    return name.startswith(".") or name == "__MACOSX"


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder`, sorted; symlinked folders followed (as torchvision's ImageFolder does; each real
    folder once), hidden entries and macOS debris skipped. A broken symlink is kept, so that its reader says so."""
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        if (real := os.path.realpath(top)) in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not is_junk(d)]
        found += [f for name in files if not is_junk(name) and Path(name).suffix.lower() in image_suffixes()
                  and ((f := Path(top, name)).is_file() or f.is_symlink() and not f.exists())]  # broken: said
    return sorted(found)


def _within(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder)
    except (OSError, RuntimeError):  # a symlink loop: read, and said to be unreadable, as before
        return False


def iter_image_paths(paths: Iterable[str | Path], on_error=None, skip: Path | None = None,
                     urls: bool = False) -> Iterator[Path | str]:
    """Files as given (even without an image suffix, so the reader can say what is wrong with them), http(s) URLs
    as given strings where `urls` (load_image downloads them);
    folders walked recursively in sorted order for image files; a glob pattern that is not a file name (a
    quoted 'photos/*.jpg', or one from Python) expanded, sorted; hidden files and macOS debris in folders skipped,
    and so is the folder `skip` (where a command writes its pictures: a rerun must not read them as inputs).
    A folder without images or a pattern matching nothing is passed to on_error(ImageError) and skipped; without
    on_error it raises."""
    skip = skip.resolve() if skip is not None else None

    def fail(message, error=NoImagesError):
        if on_error is None:
            raise error(message)
        on_error(error(message))

    for p in paths:
        if isinstance(p, str) and "://" in p:  # (Path() would fold "//" to "/")
            if urls and is_url(p):
                yield p
            else:
                fail(f"{p}: " + ("only http(s) URLs are downloaded" if urls else
                                 "a URL: download the image first (curl -O URL)"), ImageError)
            continue
        if not str(p):  # Path("") is the current folder, which would be walked
            fail('"": an empty path', ImageError)
            continue
        p = Path(p)
        try:
            is_dir, exists = p.is_dir(), p.exists()
        except OSError as e:  # a name too long for the file system, a folder without permission
            fail(f"{p}: cannot read ({e.strerror or e})", ImageError)
            continue
        if is_dir:
            found = [f for f in image_files(p) if not (skip and _within(f, skip))]
            if not found:
                fail(f"{p}: no images found in this folder")
            yield from found
        elif not exists and any(c in str(p) for c in "*?["):
            found = _unique_files(glob.glob(str(p), recursive=True))
            if not found:
                fail(f"{p}: no files match this pattern")
            yield from iter_image_paths(found, on_error, skip)
        else:
            yield p


def _unique_files(matches: list[str]) -> list[str]:
    """Glob matches, sorted, each file once: '**' follows symlinked folders, so a link back to a parent folder
    would otherwise repeat every image below it once per level (up to the OS's symlink limit)."""
    seen, out = set(), []
    for m in sorted(matches):
        try:
            key = os.path.realpath(m)
        except (OSError, ValueError):
            key = m
        if key not in seen:
            seen.add(key)
            out.append(m)
    return out


def check_rgb_model(model) -> None:
    """ValueError for a model whose input is not 3 channels: images are read as RGB."""
    if model.cfg.in_chans != 3:
        raise ValueError(f"the model takes {model.cfg.in_chans}-channel input, and images are read as RGB "
                         f"(3 channels)")


def check_resized_size(img: Image.Image, preprocess: dict, img_size: tuple[int, int]) -> None:
    """Raise ImageError if resizing the short side to the model's input (`eval_transform`) would make an image
    larger than the decompression-bomb limit: a 400000x1 PNG is a few hundred bytes and under the limit, but
    resized for a 224 px model it would be 89,600,000x224 pixels (60 GB)."""
    h, w = img_size
    crop_pct = preprocess.get("crop_pct", 1.0)
    if h != w or preprocess.get("crop_mode", "center") == "squash" or min(img.size) == 0:
        return  # resized straight to a fixed size
    short = math.floor(h / crop_pct)
    long = max(img.size) * short / min(img.size)
    if long * short > MAX_PIXELS:
        raise ImageError(f"{img.width}x{img.height} is too elongated: resized for the model (short side "
                         f"{short} px) it would have {long * short:,.0f} pixels, over the {MAX_PIXELS:,}-pixel "
                         f"decompression-bomb limit")


_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                  "nearest": InterpolationMode.NEAREST}


class _SizeGuard:
    """ImageError (the image is skipped) where resizing would make gigabytes of a few hundred bytes of PNG. A class,
    not a closure: loader workers started by spawn (macOS, Windows) receive the transform pickled."""

    def __init__(self, preprocess: dict, img_size: tuple[int, int]):
        self.preprocess, self.img_size = dict(preprocess), img_size

    def __call__(self, img):
        if isinstance(img, Image.Image):
            check_resized_size(img, self.preprocess, self.img_size)
        return img


def eval_transform(preprocess: dict, img_size: tuple[int, int]) -> v2.Compose:
    """Resize so that a crop_pct center crop has img_size, crop, scale to [0, 1], normalise.

    crop_mode "center" (timm, torchvision) resizes the short side, keeping the aspect ratio; "squash"
    (transformers' ViTImageProcessor) resizes both sides, so nothing beyond crop_pct is cut away."""
    crop_pct = preprocess.get("crop_pct", 1.0)
    h, w = img_size
    squash = preprocess.get("crop_mode", "center") == "squash"
    resize = math.floor(h / crop_pct) if h == w and not squash else (math.floor(h / crop_pct), math.floor(w / crop_pct))
    interp = preprocess.get("interpolation", "bicubic")
    if interp not in _INTERPOLATION:
        raise ValueError(f"unknown interpolation {interp!r} (use one of {sorted(_INTERPOLATION)})")
    return v2.Compose([  # resize and crop the PIL image, as timm and torchvision do, for identical pixels
        _SizeGuard(preprocess, img_size),
        v2.Resize(resize, interpolation=_INTERPOLATION[interp], antialias=True),
        v2.CenterCrop((h, w)),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(preprocess["mean"]), list(preprocess["std"])),
    ])
