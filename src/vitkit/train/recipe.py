"""Training recipes: one nested dict (model, data, augment, optim, schedule, train), read from YAML,
overridden from the command line (`--set optim.lr=0.1`), and checked in full before any work starts.

Every key has a default and a check below; a recipe file only states what differs. Unknown keys and bad
values are reported together in one error.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

import yaml

from ..models.vit import ViTConfig
from ..predict import TTA
from ..weights.hub import is_remote
from .distributed import resolve_device


class RecipeError(ValueError):
    """An invalid recipe (file, value or override); the message names every bad key."""


# --- value checks: each returns None when fine, else what is wrong --------------------------------------
def _number(lo=None, hi=None, integer=False, optional=False, lo_open=False, hi_open=False) -> Callable:
    def check(v):
        if v is None:
            return None if optional else "is required"
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            return f"must be {'an integer' if integer else 'a number'}, not {v!r}"
        if isinstance(v, float) and not math.isfinite(v):  # nan passes every comparison below
            return f"must be a finite number, not {v}"
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return f"must be {'>' if lo_open else '>='} {lo}, not {v}"
        if hi is not None and (v > hi or (hi_open and v == hi)):
            return f"must be {'<' if hi_open else '<='} {hi}, not {v}"
        return None
    check.real = not integer  # a real number: load() makes 1 1.0 (torch's Beta sampler, for one, takes no int)
    return check


def _choice(*options, optional=False) -> Callable:
    def check(v):
        if v is None and optional:
            return None
        return None if v in options else f"must be one of {list(options)}, not {v!r}"
    return check


def _flag(optional=False) -> Callable:
    return lambda v: None if isinstance(v, bool) or (optional and v is None) else f"must be true or false, not {v!r}"


def _text(optional=True) -> Callable:
    def check(v):
        if v is None:
            return None if optional else "is required"
        return None if isinstance(v, str) else f"must be a string, not {v!r}"
    return check


def _numbers(length=None, lo=None, hi=None, optional=True, integer=False) -> Callable:
    item = _number(lo, hi, integer=integer)

    def check(v):
        if v is None and optional:
            return None
        if not isinstance(v, (list, tuple)) or (length is not None and len(v) != length):
            return f"must be a list of {length or 'some'} numbers, not {v!r}"
        return next((f"item {i + 1} {e}" for i, x in enumerate(v) if (e := item(x))), None)
    return check


def _size(v):
    """An image size: one integer or [height, width]."""
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
        return None
    if not isinstance(v, (list, tuple)):
        return f"must be a positive integer or [height, width], not {v!r}"
    return _numbers(2, lo=1, optional=False, integer=True)(v)


def _lr(v):
    """A learning rate, or [epochs, lr] pairs: the peak tuned for runs of those lengths (trainer.peak_lr)."""
    if not isinstance(v, list):
        return _number(0, lo_open=True)(v)
    pair = _numbers(2, lo=0)
    if not v or (bad := next((p for p in v if pair(p) or min(p) == 0), None)) is not None:
        return f"must be a number > 0 or a list of [epochs, lr] pairs of numbers > 0, not {bad if v else v!r}"
    return None if len({p[0] for p in v}) == len(v) else f"names the same epochs twice: {v!r}"


_opt_int = _number(lo=1, integer=True, optional=True)
_seed = _number(0, 2**63 - 1, integer=True)  # torch's generators take 64-bit seeds (and a rank is added)
_rate = _number(0, 1, optional=True, hi_open=True)

# section -> key -> (default, check). Sources of the values are cited in recipes/*.yaml.
SCHEMA: dict[str, dict[str, tuple[Any, Callable]]] = {
    "model": {
        "name": (None, _text()),  # a `vitkit models` name; None: build from the fields below
        "weights": (None, _text()),  # start from a checkpoint (fine-tuning); head and positions are fitted
        # how its position embeddings are resampled to another grid; None: as the checkpoint's codebase does
        "pos_resample": (None, _choice("bicubic", "bilinear", "vit_jax", optional=True)),
        "img_size": (None, _size), "patch_size": (None, _opt_int), "width": (None, _opt_int),
        "depth": (None, _opt_int), "num_heads": (None, _opt_int), "mlp_dim": (None, _opt_int),
        "pool": (None, _choice("token", "gap", optional=True)), "class_token": (None, _flag(True)),
        "fc_norm": (None, _flag(True)), "qkv_bias": (None, _flag(True)),
        # the pre-logits layer's width; 0: none; "width": as wide as the model (the paper's pre-training head)
        "representation_size": (None, lambda v: None if v == "width" else _number(0, integer=True, optional=True)(v)),
        "hybrid_layers": (None, _numbers(lo=1, integer=True)), "dropout": (None, _rate),
        "attn_dropout": (None, _rate), "drop_path": (None, _rate), "zero_head": (None, _flag(True)),
        "mean": (None, _numbers(3)), "std": (None, _numbers(3, lo=1e-6)),
        "crop_pct": (None, _number(0, 1, optional=True, lo_open=True)),
        "interpolation": (None, _choice("bicubic", "bilinear", "nearest", optional=True)),
        # evaluation resize: "center" (short side, then center crop: timm, torchvision) or "squash" (both sides
        # to the input size: the official ViT code's and transformers' evaluation)
        "crop_mode": (None, _choice("center", "squash", optional=True)),
        # a new model's first conv_stem layer from the training images' patch principal components (airbench)
        "stem_init": (None, _choice("whiten", optional=True)),
    },
    "data": {
        "path": (None, _text(optional=False)),  # folder, .tar(.gz), digits, cifar10, cifar100, shards-{..}.tar
        "val": (None, _text()),  # a separate validation DATA (else val/ of the folder, or val_split)
        "val_split": (0.0, _number(0, 1, hi_open=True)),  # held-out fraction of train (stratified)
        "split_seed": (0, _seed),
        "batch_size": (64, _number(1, integer=True)),  # global: all processes and accumulation steps
        "eval_batch_size": (256, _number(1, integer=True)),
        "num_workers": (0, _number(0, 256, integer=True)),
        "preload": ("auto", _choice("auto", True, False)),  # decode small images once into a tensor cache
        "cache_dir": (None, _text()),  # default $VITKIT_CACHE or ~/.cache/vitkit
        "root": (None, _text()),  # torchvision CIFAR root (downloaded there when online)
        "epoch_size": (None, _opt_int),  # WebDataset: samples per epoch (counted from the shards if unset)
        "shuffle_buffer": (2000, _number(1, integer=True)),  # WebDataset sample shuffle buffer
    },
    "augment": {
        "crop": ("pad", _choice("pad", "random_resized", "resize")),
        "padding": (0, _number(0, integer=True)),  # "pad": random crop after zero padding (CIFAR: 4)
        "scale": ([0.08, 1.0], _numbers(2, lo=0.0, hi=1.0, optional=False)),  # "random_resized" area range
        "hflip": (0.0, _number(0, 1)),
        "auto_augment": (None, _choice("randaugment", "trivialaugment", optional=True)),
        "randaugment_ops": (2, _number(1, integer=True)),
        "randaugment_magnitude": (9, _number(0, 10, integer=True)),  # of 10, as timm's and DeiT's "rand-m9"
        "mixup": (0.0, _number(0)), "cutmix": (0.0, _number(0)),  # Beta(alpha, alpha); 0 = off
        "label_smoothing": (0.0, _number(0, 1, hi_open=True)),
        "random_erasing": (0.0, _number(0, 1)),
    },
    "optim": {
        "name": ("adamw", _choice("adamw", "adam", "sgd")),
        "lr": (1e-3, _lr),  # or [[epochs, lr], ...]: the peak by the run's planned length
        # the batch size lr is given for: the peak scales with the run's data.batch_size / lr_batch (DeiT's
        # linear rule, lr 5e-4 x batch / 512); None: lr as it is
        "lr_batch": (None, _number(1, integer=True, optional=True)),
        "weight_decay": (0.0, _number(0)),  # not applied to biases, norms, position embeddings, [class] token
        "betas": ([0.9, 0.999], _numbers(2, lo=0.0, hi=0.999999, optional=False)),
        "momentum": (0.9, _number(0, 1, hi_open=True)), "nesterov": (False, _flag()),
        "clip_grad_norm": (None, _number(0, lo_open=True, optional=True)),  # global norm
        "accum_steps": (1, _number(1, integer=True)),
    },
    "schedule": {
        "name": ("cosine", _choice("cosine", "linear", "constant")),
        "warmup_steps": (0, _number(0, integer=True)),
        "warmup_fraction": (0.0, _number(0, 1, hi_open=True)),  # of all steps; the larger warm-up wins
        "min_lr": (0.0, _number(0)),
    },
    "train": {
        "epochs": (10, _number(1, integer=True)),  # with a time budget: the most epochs to run
        "max_steps": (None, _opt_int),
        "time_budget": (None, _number(0, lo_open=True, optional=True)),  # minutes, the whole run
        "seed": (0, _seed),
        "device": ("auto", _text(optional=False)),
        # CPU threads for the math (default: torch's, one per core)
        "threads": (None, _number(1, 4096, integer=True, optional=True)),
        "amp": ("auto", _choice("auto", "bf16", "fp16", "none")),  # auto: bf16 where native (GPU, AVX-512 bf16, AMX)
        "channels_last": (False, _flag()), "compile": (False, _flag()),
        "grad_checkpointing": (False, _flag()),  # recompute activations in the backward pass: less memory (L, H)
        # attention kernel; auto: "math" on a CPU under bf16/fp16 autocast, else torch's choice ("default")
        "attention": ("auto", _choice("auto", "default", "math", "flash", "efficient")),
        "ema_decay": (None, _number(0, 1, optional=True, lo_open=True, hi_open=True)),
        "eval_every": (1, _number(1, integer=True)),  # epochs
        "eval_tta": ("none", _choice(*TTA)),  # validation with test-time augmentation (vitkit eval --tta)
        "checkpoint_minutes": (10.0, _number(0, lo_open=True)),  # mid-epoch training-state saves
        "checkpoint_every_steps": (None, _opt_int),
        "log_every": (10, _number(1, integer=True)),
        "distributed": ("ddp", _choice("ddp", "fsdp")),
    },
}
VIT_FIELDS = {f.name for f in dataclasses.fields(ViTConfig)}
# the other ViTConfig fields, checked by type like the rest (building the config does not check types: a string
# norm_eps or in_chans 0 would only fail with a traceback at the first step, after the run directory is made)
_OTHER_FIELDS = {"conv_stem": _numbers(lo=1, integer=True), "conv_stem_pool": _flag(True), "distilled": _flag(True),
                 "dynamic_img_size": _flag(True), "hybrid_width": _opt_int,
                 # every image is decoded as RGB: another channel count fails at the first step
                 "in_chans": lambda v: None if v is None or (type(v) is int and v == 3) else
                 f"must be 3 (images are read as RGB), not {v!r}",
                 "norm_eps": _number(0, optional=True, lo_open=True)}
SCHEMA["model"].update({f: (None, _OTHER_FIELDS.get(f, lambda v: None))
                        for f in sorted(VIT_FIELDS - set(SCHEMA["model"])) if f != "num_classes"})
PREPROCESS_KEYS = ("mean", "std", "crop_pct", "interpolation", "crop_mode")


def defaults() -> dict:
    return {s: {k: copy.deepcopy(d) for k, (d, _) in keys.items()} for s, keys in SCHEMA.items()}


def _unknown(section, key=None) -> str:
    section, key = str(section), None if key is None else str(key)  # YAML keys may be numbers
    if key is None:
        near = difflib.get_close_matches(section, SCHEMA, n=1)
        return f"unknown section {section!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
    near = difflib.get_close_matches(key, SCHEMA[section], n=1)
    return f"unknown key {section}.{key}" + (f" (did you mean {section}.{near[0]}?)" if near else "")


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _numeric(v):
    """YAML 1.1 reads 1e-3 as a string; a number is meant (an integer where it is one, "1e2" and "5" too)."""
    if isinstance(v, list):
        return [_numeric(x) for x in v]
    if not (isinstance(v, str) and _NUMBER.fullmatch(v.strip())):
        return v
    f = float(v)
    return int(f) if f.is_integer() and "." not in v and abs(f) < 2**63 else f


def merge(recipe: dict, update: dict, source: str) -> dict:
    """Recipe values from `update` (nested dict) over `recipe`; unknown keys are errors."""
    if not isinstance(update, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of sections, not {type(update).__name__}")
    problems = []
    for section, values in update.items():
        if section not in SCHEMA:
            problems.append(_unknown(section))
        elif not isinstance(values, dict):
            problems.append(f"{section}: must be a mapping of keys, not {values!r}")
        else:
            for key, value in values.items():
                if key in SCHEMA[section]:
                    recipe[section][key] = _numeric(value)
                else:
                    problems.append(_unknown(section, key))
    if problems:
        raise RecipeError(f"{source}: " + "; ".join(problems))
    return recipe


def parse_override(text: str) -> tuple[str, str, Any]:
    """'optim.lr=0.1' -> ('optim', 'lr', 0.1); the value is read as YAML (numbers, lists, null, true)."""
    key, sep, value = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise RecipeError(f"--set {text!r}: expected SECTION.KEY=VALUE, e.g. optim.lr=0.01")
    try:
        return section, name, yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {text!r}: unreadable value ({e.problem})") from None


def load(path: str | Path | None, overrides: dict[str, Any] | None = None, base: dict | None = None,
         resuming: bool = False) -> dict:
    """Defaults <- recipe file (or `base`) <- overrides {"section.key": value}; then validated (resuming: the
    starting checkpoint model.weights is not needed, the run's state holds the weights)."""
    recipe = copy.deepcopy(base) if base is not None else defaults()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"--recipe {path}: {'a directory, not a file' if path.is_dir() else 'no such file'}")
        # a checkpoint `vitkit train` wrote holds the recipe it was made with
        try:
            merge(recipe, checkpoint_recipe(path) if path.suffix == ".safetensors" else yaml_recipe(path), str(path))
        except UnicodeDecodeError:
            raise RecipeError(f"--recipe {path}: not a text file (a recipe is YAML, or a .safetensors checkpoint "
                              "`vitkit train` wrote)") from None
    nested: dict = {}
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        nested.setdefault(section, {})[key] = value
    merge(recipe, nested, "--set")
    validate(recipe, resuming)
    for section, keys in SCHEMA.items():
        for key, (_, check) in keys.items():
            if getattr(check, "real", False) and type(recipe[section][key]) is int:
                recipe[section][key] = float(recipe[section][key])
    return recipe


def yaml_recipe(path: Path):
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        why = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}: not valid YAML{where} ({why})") from None


def checkpoint_recipe(path: Path) -> dict:
    """The resolved recipe stored in a vitkit checkpoint by the run that wrote it."""
    from ..weights import CheckpointError
    from ..weights.vitkit_format import read_metadata

    try:
        meta = read_metadata(path)
    except CheckpointError as e:
        raise RecipeError(f"--recipe {e}") from None
    if not meta or not isinstance(meta.get("recipe"), dict):
        raise RecipeError(f"--recipe {path}: this checkpoint holds no recipe (only checkpoints written by "
                          "`vitkit train` do); give a recipe YAML")
    for resume in (meta.get("train") or {}).get("resumed") or []:
        logging.getLogger("vitkit").warning(
            "--recipe %s: its run was resumed at step %d with %s; the recipe holds the values in force at the end, "
            "so training with it gives other weights", path, resume["step"],
            ", ".join(f"{k} {old} -> {new}" for k, (old, new) in resume["changed"].items()))
    return meta["recipe"]


def validate(r: dict, resuming: bool = False) -> None:
    """Check every value and the combinations that cannot work; one RecipeError listing all problems."""
    problems = [f"{s}.{k} {err}" for s, keys in SCHEMA.items() for k, (_, check) in keys.items()
                if (err := check(r[s][k]))]
    problems = [p + " (give --data)" if p == "data.path is required" else p for p in problems]
    m, d, o = r["model"], r["data"], r["optim"]
    if not problems:
        missing = [k for k in ("img_size", "patch_size", "width", "depth", "num_heads", "mlp_dim") if m[k] is None]
        if resuming:
            pass  # the architecture is the run's own
        elif not m["name"] and not m["weights"] and missing:
            problems.append(f"model: give model.name (see `vitkit models`), model.weights, or the fields "
                            f"{', '.join('model.' + k for k in missing)}")
        elif m["weights"] and m["stem_init"]:
            problems.append(f"model.stem_init {m['stem_init']} initialises a new model; model.weights "
                            f"{m['weights']} brings its own (drop one of them)")
        elif m["weights"] and not is_remote(m["weights"]) and not Path(m["weights"]).exists():
            problems.append(f"model.weights {m['weights']}: no such file")
        elif m["weights"] and Path(m["weights"]).name in ("state.pt", "state.prev.pt"):
            problems.append(f"model.weights {m['weights']}: a run's training state; give the run's best.safetensors "
                            f"or last.safetensors (or --resume the run)")
        else:  # the architecture must be buildable: the name's or the checkpoint's, with the recipe's fields
            from ..api import says_its_architecture
            from ..models.registry import build_config
            from ..weights import CheckpointError
            from ..weights.hub import fetch
            from ..weights.vitkit_format import is_vitkit_checkpoint, read_metadata
            fields = model_fields(m)
            if fields.get("representation_size") == "width":  # as wide as the model: known once it is built
                fields["representation_size"] = 1
            try:
                # downloaded here (once: the model is built from the cached copy)
                local = fetch(m["weights"]) if m["weights"] and is_remote(m["weights"]) else m["weights"]
                own = local and is_vitkit_checkpoint(local)  # brings its architecture
                if local and not own and says_its_architecture(local):  # a transformers or timm config.json says
                    pass  # it: checked as the model is built
                elif m["name"] and not own:
                    build_config(m["name"], **fields, num_classes=2)
                elif m["weights"] and not own:
                    problems.append(f"model.weights {m['weights']}: does not say its architecture, so set model.name "
                                    f"too (--model)")
                else:
                    base = read_metadata(Path(local))["config"] if own else {}
                    ViTConfig.from_dict({**base, **fields, "num_classes": 2})
                    if problem := not_rgb(m["weights"], base.get("in_chans", 3)):
                        problems.append(problem)
                    problems += [f"model.{k} {fields[k]}: model.weights {m['weights']} holds a model with {k} "
                                 f"{base[k]}, and a vitkit checkpoint brings its architecture (drop model.{k})"
                                 for k in _SHAPE_FIELDS if own and k in fields and k in base and
                                 comparable(fields[k]) != comparable(base[k])]
            except CheckpointError as e:
                problems.append(f"model.weights {e}")
            except (ValueError, TypeError) as e:
                problems.append(f"model{'.name' if 'unknown model' in str(e) else ''}: {e}")
        try:
            device = resolve_device(r["train"]["device"])
            if r["train"]["attention"] == "efficient" and device.type != "cuda":
                problems.append(f"train.attention efficient is a CUDA kernel; on {device.type} use auto, default, "
                                "math or flash")
        except ValueError as e:
            problems.append(f"train.device (--device) {e}")
        sharded = r["train"]["distributed"] == "fsdp" and int(os.environ.get("WORLD_SIZE", 1)) > 1
        if r["train"]["ema_decay"] and sharded:
            problems.append("train.ema_decay is not supported with train.distributed=fsdp (use ddp, or no EMA)")
        if (scale := r["augment"]["scale"])[0] > scale[1]:
            problems.append(f"augment.scale {scale}: must be [min, max]")
        if o["name"] == "sgd" and o["nesterov"] and not o["momentum"]:
            problems.append("optim.nesterov needs optim.momentum > 0")
        if d["batch_size"] % o["accum_steps"]:
            problems.append(f"data.batch_size {d['batch_size']} is not divisible by optim.accum_steps "
                            f"{o['accum_steps']}")
    if problems:
        raise RecipeError("invalid recipe: " + "; ".join(problems))


# what a checkpoint's weights are shaped by: a recipe cannot change these for a vitkit checkpoint's model
_SHAPE_FIELDS = ("patch_size", "width", "depth", "num_heads", "mlp_dim", "conv_stem", "conv_stem_pool",
                 "hybrid_layers", "hybrid_width", "class_token", "distilled", "qkv_bias")


def comparable(value, size: bool = False):
    """A value as compared with a saved one: JSON and YAML give lists for tuples; an image size N is (N, N)."""
    if size and isinstance(value, int) and not isinstance(value, bool):
        return value, value
    return tuple(value) if isinstance(value, list) else value


def not_rgb(weights, in_chans: int) -> str | None:
    """The problem with training weights that take other than 3-channel input (images are read as RGB)."""
    return None if in_chans == 3 else (f"model.weights {weights}: the model takes {in_chans}-channel input, and "
                                       f"images are read as RGB (3 channels)")


def model_fields(m: dict) -> dict:
    """The recipe's ViTConfig fields that are set."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in m.items() if k in VIT_FIELDS and v is not None}


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists on one line."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def to_yaml(r: dict) -> str:
    return yaml.dump(r, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
