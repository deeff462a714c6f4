"""Classify images: `vitkit.classify(model, images)` from Python, `vitkit predict` from the shell."""
from __future__ import annotations

import argparse
import json
import logging
import numbers
import os
import sys
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.images import (ImageError, _to_rgb, array_image, check_rgb_model, eval_transform, iter_image_paths,
                          load_image)

log = logging.getLogger("vitkit")


@lru_cache(maxsize=1)
def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names bundled with torchvision (no download)."""
    from torchvision.models import ViT_B_16_Weights

    return list(ViT_B_16_Weights.IMAGENET1K_V1.meta["categories"])


@lru_cache(maxsize=1)
def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet IDs in label order (sorted: index i is the i-th), as the folders of an
    ImageNet validation set in ImageFolder layout are named."""
    return (Path(__file__).parent / "data" / "imagenet_wnids.txt").read_text().split()


TTA = ("none", "flip")
MAX_THREADS = 4096  # as the recipe's train.threads


def tta_logits(model, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """The model's logits for a batch; tta="flip" averages them with the logits of the mirrored images
    (test-time augmentation: where a mirror image is as natural as the image, as in most photos, two views
    err less than one; the price is a second forward pass)."""
    if tta not in TTA:
        raise ValueError(f"tta={tta!r}: expected one of {', '.join(TTA)}")
    logits = model(x)
    return (logits + model(x.flip(-1))) / 2 if tta == "flip" else logits


def class_names(model) -> list[str]:
    if model.class_names:
        return list(model.class_names)
    n = model.cfg.num_classes
    return imagenet_labels() if n == 1000 else [str(i) for i in range(n)]


def classify(model, images, top_k: int = 5, batch_size: int = 8, on_error=None, tta: str = "none") -> Iterator[dict]:
    """Yield {"path", "input", "top_k": [{"label", "index", "prob"}]} per image, in input order.

    Images are file paths or http(s) URLs (folders are walked, glob patterns expanded), PIL images or image arrays
    (see `array_image`), converted alike (see `load_image`; notes on conversions go to the "vitkit" logger).
    "path" is the file or URL (None for an image in memory), "input" the position in `images` of the item it
    came from. An unreadable file, empty folder or pattern matching nothing is passed to on_error(ImageError) and
    skipped; without on_error it raises. The model runs in eval mode (each module's own mode is restored after
    each batch). tta: see `tta_logits`. The arguments are checked at the call, the images as they are read.
    """
    if not hasattr(model, "cfg") or not hasattr(model, "preprocess"):
        raise TypeError(f"{type(model).__name__} is not a vitkit ViT; load it with vitkit.create_model/load_model")
    if not model.cfg.num_classes:
        raise ValueError("the model has no classifier head (num_classes=0): nothing to classify")
    check_rgb_model(model)
    for arg, value in (("top_k", top_k), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, not {value!r}")
    if tta not in TTA:
        raise ValueError(f"tta={tta!r}: expected one of {', '.join(TTA)}")
    if on_error is not None and not callable(on_error):
        raise TypeError(f"on_error must be a function taking the error, not {type(on_error).__name__}")
    return _classify(model, _as_iterable(images), top_k, batch_size, on_error, tta)


def probabilities(model, logits: torch.Tensor) -> torch.Tensor:
    """A softmax over the classes; for a multi-label head (transformers' problem_type multi_label_classification)
    each class's sigmoid, as transformers' pipeline gives them."""
    return logits.float().sigmoid() if model.multi_label else logits.float().softmax(dim=-1)


def _classify(model, images, top_k, batch_size, on_error, tta) -> Iterator[dict]:
    transform = eval_transform(model.preprocess, model.cfg.img_size)
    labels = class_names(model)
    k = min(top_k, len(labels))
    weight = next(model.parameters())  # inputs go where the model is, in its precision (a .half() model too)

    def flush(batch):  # results and on_error calls in input order
        ready = [b for b in batch if not isinstance(b, Exception)]
        if ready:
            modes = [(m, m.training) for m in model.modules()]  # a model mid-training: dropout off, BatchNorm's
            try:  # running statistics used and left as they are
                model.eval()
                with torch.inference_mode():
                    x = torch.stack([t for *_, t in ready]).to(weight.device, weight.dtype)
                    probs = probabilities(model, tta_logits(model, x, tta))
            finally:
                for m, training in modes:
                    m.training = training
            top = iter(zip(*probs.topk(k, dim=-1)))
        for b in batch:
            if isinstance(b, Exception):
                on_error(b)
                continue
            (name, position, _), (p, i) = b, next(top)
            yield {"path": name, "input": position,
                   "top_k": [{"label": labels[j], "index": j, "prob": q} for q, j in zip(p.tolist(), i.tolist())]}

    batch, count = [], 0  # images to classify, and the failures between them (reported in their place)
    for position, item, given in _expand(images, on_error and batch.append):
        name = None if isinstance(item, Image.Image) else str(item)
        shown = name or f"images[{position}] ({given})"
        try:
            img, note = _pil_to_rgb(item, shown) if name is None else load_image(item)
            try:
                x = transform(img)
            except ImageError as e:  # eval_transform's guard: too elongated to resize for the model
                raise ImageError(f"{shown}: {e}") from None
        except ImageError as e:
            if on_error is None:
                raise
            e.path, e.input = name, position
            batch.append(e)
            continue
        if note:
            log.info("%s: %s", shown, note)
        batch.append((name, position, x))
        count += 1
        if count == batch_size:
            yield from flush(batch)
            batch.clear()  # (the same list: failures met while expanding the inputs are appended to it)
            count = 0
    if batch:
        yield from flush(batch)


def _pil_to_rgb(img: Image.Image, shown: str):
    """A PIL image given from Python, as `_to_rgb`, its failures as ImageErrors."""
    if img.width == 0 or img.height == 0:
        raise ImageError(f"{shown}: empty ({img.width}x{img.height} pixels)")
    try:
        img.load()
    except Exception as e:  # PIL's own assertion or OSError for an image whose file was closed before loading
        raise ImageError(f"{shown}: its pixels cannot be read ({type(e).__name__}{': ' * bool(str(e))}{e}); an image "
                         f"opened in a `with` block must be loaded (.load() or .copy()) inside it") from None
    try:
        return _to_rgb(img)
    except (OSError, ValueError) as e:  # a mode PIL cannot convert, e.g. "La"
        raise ImageError(f"{shown}: cannot convert mode {img.mode!r} to RGB ({e})") from None


def _pixels(a) -> bool:
    """An array that is one image (HxW or HxWxC numbers), not an array of paths."""
    return isinstance(a, np.ndarray) and a.dtype.kind in "uifb" and a.ndim in (2, 3)


def _at(on_error, position: int, item):
    """on_error for what an input names (an empty folder, a pattern matching nothing), told where it came from."""
    def report(e: Exception):
        e.path, e.input = str(item), position
        on_error(e)
    return report


def _as_iterable(images) -> Iterable:
    if isinstance(images, (str, Path, Image.Image)) or _pixels(images):
        return [images]
    if not isinstance(images, Iterable) or isinstance(images, (bytes, bytearray)):
        raise TypeError(f"images: expected a path, URL, PIL image, image array or a list of them, "
                        f"not {type(images).__name__}")
    return images  # (not listed: a stream of images is read as it comes)


def _expand(images: Iterable, on_error) -> Iterator[tuple[int, Image.Image | Path | str, str]]:
    """(position in `images`, a PIL image or a file path or URL, the type of what was given)."""
    for position, item in enumerate(images):
        given = type(item).__name__
        if _pixels(item):
            try:
                item = array_image(item)
            except ValueError as e:
                error = ImageError(f"images[{position}]: {e}")
                if on_error is None:
                    raise error from None
                error.path, error.input = None, position
                on_error(error)
                continue
        if isinstance(item, Image.Image):
            yield position, item, given
        elif isinstance(item, (str, os.PathLike)):
            found = iter_image_paths([item], on_error and _at(on_error, position, item), urls=True)
            yield from ((position, p, given) for p in found)
        else:
            raise TypeError(f"images[{position}]: expected a path, URL, PIL image or image array, not "
                            f"{type(item).__name__}" + (" (vitkit.classify prepares images itself; call the model "
                                                        "on tensors directly)" if isinstance(item, torch.Tensor)
                                                        else ""))


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import add_model_arguments

    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image files, http(s) URLs, folders (walked recursively), quoted glob patterns "
                        "('photos/*.jpg'), or - for an image piped to standard input")
    add_model_arguments(p)
    p.add_argument("--top-k", type=int, default=5, help="labels per image (default 5)")
    p.add_argument("--json", action="store_true",
                   help='one JSON object per line: {"path", "input", "top_k"} per image, {"path", "input", "error"} '
                        'per input that failed')
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    add_tta_argument(p)


def add_tta_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta", choices=TTA, default="none",
                   help="test-time augmentation: 'flip' averages the logits of each image and its mirror image "
                        "(two forward passes; default: none)")


def run_predict(args: argparse.Namespace) -> int:
    from .cli import UserError, failure_summary, model_from_args

    for flag, value in (("--top-k", args.top_k), ("--batch-size", args.batch_size), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    if args.threads is not None and args.threads > MAX_THREADS:  # as train.threads: each thread maps its stack
        raise UserError(f"--threads {args.threads}: must be at most {MAX_THREADS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = model_from_args(args)
    if not model.cfg.num_classes:  # a backbone saved without its head: nothing to rank
        raise UserError(f"--weights {args.weights}: the model has no classifier head (num_classes=0)")
    failed = []

    def report(err: ImageError):
        failed.append(err)
        print(f"vitkit predict: error: {err}", file=sys.stderr, flush=True)
        if args.json:  # the stream holds every input, in order
            print(json.dumps({"path": getattr(err, "path", None), "input": getattr(err, "input", None),
                              "error": str(err)}), flush=True)

    done = 0
    for result in classify(model, args.paths, args.top_k, args.batch_size, on_error=report, tta=args.tta):
        done += 1
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            tops = ", ".join(f"{t['label']} ({t['prob']:.1%})" for t in result["top_k"])
            print(f"{result['path']}: {tops}", flush=True)
    return failure_summary("predict", failed, done)
