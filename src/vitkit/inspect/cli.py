"""`vitkit attention IMAGE... -o OUT` (attention maps as pictures) and `vitkit inspect -o DIR` (Figure 7)."""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from matplotlib.figure import Figure

from ..cli import (UserError, add_model_arguments, check_writable, failure_summary, model_from_args, model_source,
                   user_errors)
from ..data.images import (ImageError, _to_rgb, eval_transform, image_suffixes, is_url, iter_image_paths,
                           load_image)
from ..predict import class_names, probabilities
from .attention import METHODS, check_index, prepare, row_description, to_image_size, token_map
from .figure7 import FIGURES, MAX_ASPECT, save_figure, write_figure7


@contextlib.contextmanager
def _value_errors_as_user_errors(prefix: str = ""):
    """A plain ValueError from the library (unknown model name, no readable image) is the user's input problem."""
    try:
        yield
    except user_errors():
        raise
    except ValueError as e:
        raise UserError(f"{prefix}{e}") from None


def _load_model(args: argparse.Namespace):
    with _value_errors_as_user_errors(f"--model {args.model}: " if args.model else ""):
        model = model_from_args(args)
    if not model.blocks:
        raise UserError(f"{model_source(args)}: the model has no transformer blocks, so no attention to show")
    return model


def _report(command: str, failed: list):
    def on_error(err: Exception):
        failed.append(err)
        print(f"vitkit {command}: error: {err}", file=sys.stderr, flush=True)
    return on_error


# --- vitkit attention ------------------------------------------------------------------------------
def add_attention_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, folders (walked recursively), quoted glob patterns ('photos/*.jpg'), or - for "
                        "an image piped to standard input")
    add_model_arguments(p)
    p.add_argument("--method", choices=METHODS, default="rollout",
                   help="rollout: all layers (Abnar & Zuidema); last-layer: the last layer, heads averaged; "
                        "head: one --layer/--head (default rollout)")
    p.add_argument("--layer", type=int, help="with --method head: layer index (default the last; -1 = last)")
    p.add_argument("--head", type=int, help="with --method head: head index (default all heads averaged)")
    p.add_argument("-o", "--output", required=True,
                   help="a .png file for one image; otherwise a folder (created) with IMAGE-NAME_METHOD.png per "
                        "image (--method head: IMAGE-NAME_layerL-headH.png, or IMAGE-NAME_layerL-mean.png without "
                        "--head; maps are PNG only: another image suffix such as .jpg is refused)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")


def attention_figure(image, amap: np.ndarray, title: str, path: Path) -> None:
    """The image, the map, and the map over the image, side by side; an image more elongated than MAX_ASPECT
    is stretched to it."""
    h, w = amap.shape
    ratio = min(max(h / w, 1 / MAX_ASPECT), MAX_ASPECT)
    aspect = "equal" if ratio == h / w else "auto"  # "auto" fills the capped panel: stretched, but visible
    fig = Figure(figsize=(12, 4 * ratio + 0.7))
    axes = fig.subplots(1, 3)
    axes[0].imshow(image, aspect=aspect)
    axes[0].set_title("image" if aspect == "equal" else "image (stretched)", fontsize=9)
    im = axes[1].imshow(amap, cmap="inferno", vmin=0, vmax=1, aspect=aspect)
    axes[1].set_title("attention", fontsize=9)
    fig.colorbar(im, cax=axes[1].inset_axes([1.03, 0, 0.04, 1]))  # beside the map: the three panels stay one size
    axes[2].imshow(image, aspect=aspect)
    axes[2].imshow(amap, cmap="inferno", alpha=0.5, vmin=0, vmax=1, aspect=aspect)  # one colour scale: the bar's
    axes[2].set_title("overlay", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=10, parse_math=False)  # file and class names as written: "$5" is no maths
    save_figure(fig, path)


def _prediction(model, image, whole_logits) -> str:
    """The top class as `vitkit predict` gives it (resized and center-cropped as the model was evaluated); from
    the map's own pass over the whole image where the image is too elongated to crop."""
    if not model.cfg.num_classes:
        return "no classifier head"
    try:
        x = eval_transform(model.preprocess, model.cfg.img_size)(_to_rgb(image)[0])[None]
        with torch.no_grad():
            logits, how = model(x.to(model.pos_embed.device, model.pos_embed.dtype)), ""
    except ImageError:
        logits, how = whole_logits, " on the whole image"
    prob, index = probabilities(model, logits[0]).max(dim=-1)
    return f"predicted{how}: {class_names(model)[index]} ({prob:.1%})"


def _method_label(args, model) -> tuple[str, str]:
    """(file-name tag, description) of the chosen map."""
    depth = len(model.blocks)
    if args.method == "rollout":
        return "rollout", f"attention rollout over {depth} layer{'s' * (depth != 1)}"
    if args.method == "last-layer":
        return "last-layer", f"last layer ({depth - 1}), heads averaged"
    layer = depth - 1 if args.layer is None else args.layer % depth
    if args.head is None:
        return f"layer{layer}-mean", f"layer {layer}, heads averaged"
    head = args.head % model.cfg.num_heads
    return f"layer{layer}-head{head}", f"layer {layer}, head {head}"


def run_attention(args: argparse.Namespace) -> int:
    if args.method != "head" and (args.layer is not None or args.head is not None):
        raise UserError(f"--layer/--head pick one layer and head: use them with --method head, not {args.method}")
    out = _output_path(args.output)
    single_file = out.suffix.lower() == ".png"
    if not single_file and out.suffix.lower() in image_suffixes():  # surely meant as a file, not a folder
        raise UserError(f"-o {out}: maps are written as PNG: give a .png file (one image) or a folder")
    check_writable(out, f"-o {out}", folder=not single_file)
    failed: list = []
    on_error = _report("attention", failed)
    paths = list(iter_image_paths(args.images, on_error, skip=None if single_file else out, urls=True))
    if single_file and len(paths) > 1:
        raise UserError(f"-o {out}: {len(paths)} images need an output folder, not one .png file")
    done = 0
    if not paths:
        return failure_summary("attention", failed, done)
    model = _load_model(args)
    try:
        if args.layer is not None:
            check_index("layer", args.layer, len(model.blocks))
        if args.head is not None:
            check_index("head", args.head, model.cfg.num_heads)
    except IndexError as e:
        raise UserError(f"--{e}") from None
    tag, description = _method_label(args, model)
    targets = [out] if single_file else _output_names(paths, out, tag)
    inputs = {_real(p) for p in paths if not is_url(p)}
    for path, target in zip(paths, targets):
        try:
            problem = _target_problem(target, inputs, args.force)
        except OSError as e:  # a name too long for the file system
            problem = OSError(f"{target}: cannot write ({e.strerror or e})")
        if problem:
            on_error(problem)
            continue
        try:
            image, note = load_image(path)
        except ImageError as e:
            on_error(e)
            continue
        if note:
            logging.getLogger("vitkit").info("%s: %s", path, note)
        x, _ = prepare(model, image)
        with _value_errors_as_user_errors():  # memory for the attention kept: the same for every image
            logits, grid = token_map(model, x, args.method, args.layer, args.head)
        prediction = _prediction(model, image, logits)
        title = f"{_name(path)}: {prediction}\n{description}, {row_description(model)}"
        shown = _shown(image)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            attention_figure(shown, to_image_size(grid, (shown.height, shown.width)), title, target)
        except OSError as e:
            on_error(OSError(f"{target}: cannot write ({e.strerror or e})"))
            continue
        print(f"{path} -> {target} ({prediction})", flush=True)
        done += 1
    return failure_summary("attention", failed, done)


def _target_problem(target: Path, inputs: set[str], force: bool) -> Exception | None:
    if _real(target) in inputs:  # --force means replacing earlier maps, never an image being read
        return FileExistsError(f"{target}: is one of the input images; not overwritten (choose another -o)")
    if target.is_dir():
        return IsADirectoryError(f"{target}: is a folder, not a .png file")
    if target.exists() and not force:
        return FileExistsError(f"{target}: exists (use --force to overwrite)")
    return None


def _shown(image, longest: int = 2048):
    """The image as drawn: a figure 12 inches wide has no use for more pixels, and a 9000 px photo drawn three
    times at full size takes gigabytes."""
    if max(image.size) <= longest:
        return image
    shown = image.copy()
    shown.thumbnail((longest, longest))
    return shown


def _name(path: Path | str) -> str:
    """A file's name; a URL's last path segment (https://host/a/cat.jpg?s=2: cat.jpg)."""
    return Path(urlparse(path).path).name if is_url(path) else Path(path).name


def _real(path: Path) -> str:
    try:
        return str(path.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return str(path.absolute())


def _output_path(text: str) -> Path:
    if not text.strip():
        raise UserError("-o '': give a file or folder name (an empty one would write into the current folder)")
    return Path(text)


def _output_names(paths: list[Path], folder: Path, tag: str) -> list[Path]:
    """folder/NAME_TAG.png per image (stdin_TAG.png for "-", the image piped in); a repeated name gets -2, -3...,
    the first number no other image's name has taken (a.png twice and a-2.png: a, a-3, a-2)."""
    stems = ["stdin" if str(p) == "-" else Path(_name(p)).stem or "download" for p in paths]
    own, used, names = set(stems), set(), []
    for stem in stems:
        name, n = stem, 1
        while name in used or (n > 1 and name in own):
            n += 1
            name = f"{stem}-{n}"
        used.add(name)
        names.append(folder / f"{name}_{tag}.png")
    return names


# --- vitkit inspect ------------------------------------------------------------------------------------
def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="folder for filters.png, position_similarity.png, attention_distance.png, summary.json")
    p.add_argument("--images", nargs="+", metavar="PATH",
                   help="images (files, folders or quoted glob patterns) to measure attention distance on; default "
                        "../shared/data/imagenet-samples when present, else 16 generated images")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")


def run_inspect(args: argparse.Namespace) -> int:
    """Every input is checked, and the images read, before anything is written (the -o folder included)."""
    out = _output_path(args.output)
    check_writable(out, f"-o {out}", folder=True)
    existing = [out / f for f in FIGURES if (out / f).exists()]
    if existing and not args.force:
        raise UserError(f"-o {out}: {', '.join(p.name for p in existing)} already there (use --force to overwrite)")
    failed: list = []
    on_error = _report("inspect", failed)
    images, source = None, None
    if args.images:
        images, source = list(iter_image_paths(args.images, on_error)), " ".join(args.images)
    model = _load_model(args)
    try:
        with _value_errors_as_user_errors():
            summary = write_figure7(model, out, images, source, on_error=on_error)
    except OSError as e:  # images are read as ImageErrors: an OSError here is about writing the output
        raise UserError(f"-o {out}: cannot write ({e.strerror or e})") from None
    dist = summary["attention_distance"]
    n = dist["images"]
    print(f"wrote {', '.join(str(out / f) for f in FIGURES)} (attention distance over {n} image{'s' * (n != 1)})")
    return failure_summary("inspect", failed)
