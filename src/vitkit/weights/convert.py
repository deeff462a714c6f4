"""`vitkit convert SRC DST --model NAME` and `vitkit models`."""
from __future__ import annotations

import argparse

from ..cli import add_fields_argument, image_size


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint of any supported format, hf-hub:ORG/REPO or an https:// URL")
    p.add_argument("dst", help="output .safetensors (vitkit format)")
    p.add_argument("--model", help="model name; not needed if SRC is already a vitkit checkpoint")
    p.add_argument("--num-classes", type=int, help="replace the head by a new zero-initialised one")
    p.add_argument("--img-size", type=image_size, metavar="N|HxW",
                   help="resample position embeddings to this resolution")
    p.add_argument("--class-names", help="text file, one class name per line, stored in the checkpoint")
    add_fields_argument(p)
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")


def run_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..api import save_model
    from ..cli import UserError, check_writable, model_from_args

    dst = Path(args.dst)
    try:  # every check on DST and --class-names before the checkpoint is read (large ones take a while)
        if dst.suffix != ".safetensors" or dst.is_dir():
            raise UserError(f"{dst}: the output must be a .safetensors file"
                            + (", not a directory" if dst.is_dir() else ""))
        if dst.exists() and not args.force:
            raise UserError(f"{dst} already exists (use --force to overwrite)")
    except OSError as e:  # a name too long
        raise UserError(f"{dst}: cannot write ({e.strerror or e})") from None
    check_writable(dst, str(dst))
    names = None
    if args.class_names:
        try:
            names = [n.strip() for n in Path(args.class_names).read_text(encoding="utf-8").splitlines() if n.strip()]
        except UnicodeDecodeError as e:
            raise UserError(f"--class-names {args.class_names}: not UTF-8 text ({e.reason} at byte {e.start})") \
                from None
        except OSError as e:  # missing, a directory, a name too long
            raise UserError(f"--class-names {args.class_names}: cannot read ({e.strerror or e})") from None
    if args.num_classes is not None and args.num_classes < 0:
        raise UserError(f"--num-classes {args.num_classes}: must be 0 (no head) or more")
    args.weights = args.src
    overrides = {k: v for k, v in (("num_classes", args.num_classes), ("img_size", args.img_size)) if v is not None}
    model = model_from_args(args, weights_flag="SRC", reads_images=False, **overrides)
    if names is not None:
        if len(names) != model.cfg.num_classes:
            raise UserError(f"--class-names {args.class_names}: {len(names)} names for {model.cfg.num_classes} classes")
        model.class_names = names
    try:
        save_model(model, args.dst)
    except OSError as e:  # read-only file system, disk full: the message names DST
        raise UserError(str(e)) from None
    print(f"wrote {args.dst} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{model.cfg.num_classes} classes, {model.cfg.img_size[0]}x{model.cfg.img_size[1]} px)")
    return 0


def add_models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--filter", default="", help="only names containing this text")


def run_models(args: argparse.Namespace) -> int:
    from ..models import list_models, resolve

    names = [n for n in list_models() if args.filter.lower() in n.lower()]
    if not names:
        import sys

        print(f"vitkit models: no model name contains {args.filter!r} (`vitkit models` lists them all)",
              file=sys.stderr)
        return 1
    for name in names:
        cfg, _ = resolve(name)
        print(f"{name:28s} width {cfg['width']:4d}  depth {cfg['depth']:2d}  patch {cfg['patch_size']:2d}  "
              f"{cfg['img_size']} px{'  hybrid R50' if cfg.get('hybrid_layers') else ''}")
    return 0
