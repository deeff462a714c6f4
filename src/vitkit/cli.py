"""The `vitkit` command. Each subcommand lives with the code it drives and exposes
`add_arguments(parser)` and `run(args) -> exit code`; this file only wires them up."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from pathlib import Path

# name -> (module, one-line help)
COMMANDS = {
    "predict": ("vitkit.predict", "classify images (files or folders)"),
    "convert": ("vitkit.weights.convert", "write any supported checkpoint as a vitkit .safetensors"),
    "models": ("vitkit.weights.convert", "list the model names"),
    "train": ("vitkit.train.cli", "pre-train or fine-tune a ViT"),
    "eval": ("vitkit.train.evaluate", "accuracy of a checkpoint on a dataset"),
    "attention": ("vitkit.inspect.cli", "attention maps (rollout, last layer, one head) as pictures"),
    "inspect": ("vitkit.inspect.cli", "the paper's Figure 7: filters, position similarity, attention distance"),
}


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


def check_writable(path: Path, label: str, folder: bool = False) -> None:
    """UserError, before any work, for an output `path` (a folder if `folder`) that cannot be written: a file
    in the way (the path itself or a folder above it), a read-only place, a name too long. `label`: how
    messages name it ("-o out/", "DST.safetensors")."""
    try:
        if folder and path.exists() and not path.is_dir():
            raise UserError(f"{label}: exists and is not a folder")
        above = next((a for a in path.parents if a.exists()), None)
        if above is not None and not above.is_dir():
            raise UserError(f"{label}: cannot write there: {above} is a file, not a folder")
        writable_at = path if folder and path.is_dir() else above
        if writable_at is not None and not os.access(writable_at, os.W_OK):
            raise UserError(f"{label}: cannot write there: {writable_at} is not writable")
    except OSError as e:
        raise UserError(f"{label}: cannot write ({e.strerror or e})") from None


def failure_summary(command: str, failed: list, done: int | None = None) -> int:
    """The exit code, after one line counting what failed: images that could not be used (of those tried, when
    `done`, the images that worked, is known) and inputs (folders, patterns) that named no image."""
    from .data.images import NoImagesError

    if failed:
        empty = sum(isinstance(e, NoImagesError) for e in failed)
        bad = len(failed) - empty
        said = [f"{bad}{'' if done is None else f' of {bad + done}'} image{'s' * (bad + (done or 0) > 1)} failed"]
        said = (said if bad else []) + ([f"{empty} input{'s' * (empty > 1)} named no images"] if empty else [])
        print(f"vitkit {command}: {'; '.join(said)}", file=sys.stderr)
    return 1 if failed else 0


def user_errors() -> tuple[type[BaseException], ...]:
    from .data.images import ImageError
    from .weights import CheckpointError

    return UserError, CheckpointError, ImageError, FileNotFoundError


def add_model_arguments(p: argparse.ArgumentParser, weights_required: bool = True) -> None:
    p.add_argument("--model", help="model name (vitkit models); not needed for a vitkit checkpoint")
    p.add_argument("--weights", required=weights_required,
                   help="checkpoint: vitkit .safetensors, Google .npz, timm/DeiT/torchvision .pth/.bin/.safetensors, "
                        "or a transformers directory; hf-hub:ORG/REPO and https:// URLs are downloaded once")
    p.add_argument("--img-size", type=image_size, metavar="N|HxW",
                   help="input resolution (position embeddings resampled in 2D); default: the checkpoint's own")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps (default: cuda if there is one)")
    add_fields_argument(p)


def add_fields_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="fields", action="append", default=[], metavar="FIELD=VALUE",
                   help="a field of the architecture where the checkpoint differs from the --model name's, e.g. "
                        "--set depth=6 (repeatable; any ViTConfig field)")


def image_size(text: str) -> int | tuple[int, int]:
    """--img-size 384 or 224x320."""
    try:
        sides = [int(s) for s in text.lower().split("x")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r}: give N or HxW, e.g. 384 or 224x320")
    return sides[0] if len(sides) == 1 else tuple(sides)


def config_fields(texts: list[str]) -> dict:
    """--set FIELD=VALUE texts -> ViTConfig overrides (values read as YAML: 6, true, [3, 4, 9])."""
    import dataclasses

    import yaml

    from .models.vit import ViTConfig

    fields, flagged = {f.name for f in dataclasses.fields(ViTConfig)}, {"num_classes", "img_size"}
    out = {}
    for text in texts:
        key, sep, value = (part.strip() for part in text.partition("="))
        if not sep or not key or not value:
            raise UserError(f"--set {text!r}: expected FIELD=VALUE, e.g. depth=6")
        if key not in fields or key in flagged:
            raise UserError(f"--set {text!r}: " + (f"use --{key.replace('_', '-')}" if key in flagged else
                            f"not a model field (one of {', '.join(sorted(fields - flagged))})"))
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"--set {text!r}: unreadable value ({e.problem})") from None
        out[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


# a ValueError about one of these config fields is about the flag that set it
_FIELD_FLAGS = {"img_size": ("--img-size", "img_size"), "num_classes": ("--num-classes", "num_classes")}


def model_source(args: argparse.Namespace, weights_flag: str = "--weights") -> str:
    """How messages name the model a command was given: by --model, else by its checkpoint."""
    return f"--model {args.model}" if args.model else f"{weights_flag} {args.weights}"


def model_from_args(args: argparse.Namespace, weights_flag: str = "--weights", reads_images: bool = True,
                    **overrides):
    """--model/--weights (and --device, where the command has it) -> an eval-mode model. A vitkit checkpoint
    needs no --model. weights_flag: how the command names the checkpoint in messages (convert: SRC);
    reads_images: the model must take RGB images (all commands but convert)."""
    import torch

    from . import create_model, load_model
    from .api import says_its_architecture
    from .weights import CheckpointError

    if not args.model and args.weights is None:
        raise UserError("give --weights (a vitkit checkpoint) or --model NAME")
    if not args.model and not says_its_architecture(args.weights):
        from .weights.hub import is_remote

        if not is_remote(str(args.weights)) and Path(args.weights).is_dir():
            raise UserError(f"{weights_flag} {args.weights}: a folder without config.json, so not a checkpoint "
                            f"(a transformers save_pretrained folder has one; other formats are files)")
        raise UserError(f"{weights_flag} {args.weights}: not a vitkit checkpoint, so its architecture is unknown; "
                        "add --model NAME (see `vitkit models`)")
    if getattr(args, "img_size", None) is not None:
        overrides.setdefault("img_size", args.img_size)
    fields = config_fields(getattr(args, "fields", None) or [])
    overrides.update(fields)
    device = torch.device("cpu")
    if getattr(args, "device", None) is not None:
        from .train.distributed import resolve_device

        try:
            device = resolve_device(args.device)
        except ValueError as e:
            raise UserError(f"--device {e}") from None
    source = model_source(args, weights_flag)
    try:
        model = create_model(args.model, weights=args.weights, **overrides) if args.model else \
            load_model(args.weights, **overrides)
    except CheckpointError:
        raise
    except ValueError as e:  # a model name or size that cannot be built
        for field, (flag, key) in _FIELD_FLAGS.items():
            if str(e).startswith(field) and overrides.get(key) is not None:
                value = overrides[key]
                shown = "x".join(map(str, value)) if isinstance(value, tuple) else value
                raise UserError(f"{flag} {shown}: {e}") from None
        for key in fields:
            if str(e).startswith(f"{key} "):
                raise UserError(f"--set {key}: {e}") from None
        raise UserError(f"{source}: {e}") from None
    except (MemoryError, RuntimeError) as e:  # what check_memory could not foresee
        if not isinstance(e, MemoryError) and "alloc" not in str(e):
            raise
        raise UserError(f"the model is too large to build here ({str(e).splitlines()[0][:200]}); check "
                        f"--img-size and the model's size") from None
    if reads_images:
        from .data.images import check_rgb_model

        try:
            check_rgb_model(model)
        except ValueError as e:
            raise UserError(f"{source}: {e}") from None
    return model.to(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitkit", description="Vision Transformers in PyTorch")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    after = argparse.ArgumentParser(add_help=False)  # -q after the command too (set only when given there)
    after.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only errors on stderr")
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[after])
        if name == chosen:  # import only the command being run: `vitkit predict` never loads the trainer
            mod = importlib.import_module(module)
            getattr(mod, f"add_{name}_arguments")(p)
            p.set_defaults(_run=getattr(mod, f"run_{name}"))
    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # a file name the terminal's encoding lacks is escaped, not a crash
        with contextlib.suppress(AttributeError, ValueError):  # (a stream replaced by one without reconfigure)
            stream.reconfigure(errors="backslashreplace")
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return int(args._run(args) or 0)
    except user_errors() as e:
        print(f"vitkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # a path the system refuses (name too long, no permission, read-only): still one line
        if e.filename is None and e.errno is not None:
            raise
        where = f"{e.filename}: " if e.filename is not None else ""
        print(f"vitkit {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # python -m vitkit.cli (and torchrun -m vitkit.cli) as python -m vitkit
    sys.exit(main())
