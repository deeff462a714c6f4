"""`vitkit train`: a recipe (YAML) + flags -> a run directory. Named flags are shortcuts for recipe keys;
`--set SECTION.KEY=VALUE` reaches any key. Runs unchanged under `torchrun --nproc_per_node N`."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import time
from pathlib import Path

from ..cli import image_size

# flag -> recipe key
FLAG_KEYS = {"data": "data.path", "val_data": "data.val", "val_split": "data.val_split", "model": "model.name",
             "weights": "model.weights", "img_size": "model.img_size", "batch_size": "data.batch_size",
             "workers": "data.num_workers", "lr": "optim.lr", "epochs": "train.epochs",
             "time_budget": "train.time_budget", "seed": "train.seed", "device": "train.device"}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="ImageFolder dir (train/ + val/, or class folders with --val-split), .tar(.gz) "
                                  "of one, digits, cifar10, cifar100, or WebDataset shards 'shards-{000..099}.tar'")
    p.add_argument("--recipe", help="recipe YAML (recipes/*.yaml; values not in it take the defaults), or a "
                   "checkpoint `vitkit train` wrote: train again with the recipe stored in it")
    p.add_argument("--model", help="model name (`vitkit models`), e.g. ViT-B/16")
    p.add_argument("--weights", help="start from this checkpoint (fine-tuning): any format `vitkit predict` reads, "
                                     "hf-hub:ORG/REPO or an https:// URL")
    p.add_argument("--out", help="run directory (default runs/<data>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run exactly where its last checkpoint left off "
                   "(RUN_DIR/state.prev.pt: where the save before it left off)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="stop gracefully after this long (the schedule is fitted to it), then evaluate and save")
    p.add_argument("--img-size", type=image_size, metavar="N|HxW")
    p.add_argument("--batch-size", type=int, help="global batch (all processes, all accumulation steps)")
    p.add_argument("--lr", type=float, help="peak learning rate, whatever the run's length (a recipe may give "
                   "[epochs, lr] pairs instead: --set 'optim.lr=[[16, 0.1], [40, 0.05]]')")
    p.add_argument("--val-split", type=float, help="hold out this fraction of the training images")
    p.add_argument("--val-data", help="a separate validation DATA")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="data-loading processes")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda if available; under torchrun each "
                                     "process takes the GPU of its LOCAL_RANK)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any recipe value, e.g. --set optim.lr=0.01 --set augment.mixup=0.8 (repeatable)")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")


def resolve_recipe(args: argparse.Namespace, values: dict | None = None) -> tuple[dict, Path, dict | None]:
    """(validated recipe, run dir, the run's training state when resuming) from the flags (and `values`,
    {"section.key": value}, last); every problem raised as one RecipeError."""
    from . import recipe as R

    flagged = {key: flag for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None}
    overrides = {key: list(v) if isinstance(v := getattr(args, flag), tuple) else v for key, flag in flagged.items()}
    for text in args.set:
        section, key, value = R.parse_override(text)
        overrides[f"{section}.{key}"] = value
        flagged.pop(f"{section}.{key}", None)
    if bad := [k for k in values or {} if not isinstance(k, str) or "." not in k]:
        raise R.RecipeError(f"values: keys are 'section.key' strings, e.g. {{'optim.lr': 0.01}}, not {bad[0]!r}")
    overrides.update(values or {})
    for key in values or {}:
        flagged.pop(key, None)
    try:
        return _resolve(args, overrides)
    except R.RecipeError as e:  # name the flag a value came from beside its recipe key
        text = str(e)
        for key, flag in flagged.items():
            text = re.sub(rf"(?<![\w.]){re.escape(key)}(?![\w.]| \(--)", f"{key} (--{flag.replace('_', '-')})", text)
        raise R.RecipeError(text) from None


def _resolve(args: argparse.Namespace, overrides: dict) -> tuple[dict, Path, dict | None]:
    from . import recipe as R
    from .rundir import PREV, STATE, read_state

    if args.resume:
        run, name = Path(args.resume), STATE
        if args.recipe or args.out:
            raise R.RecipeError("--resume RUN_DIR takes its recipe and directory from the run; drop --recipe/--out")
        if run.is_symlink() and run.is_file():  # a link to a run's state file: the run is where the file is
            run = run.resolve()
        if run.name in (STATE, PREV) and not run.is_dir():  # a state file of a run: state.prev.pt goes back a save
            if not run.is_file():
                back = f"; --resume {run.parent / PREV} continues from the save before it" \
                    if (run.parent / PREV).is_file() else ""
                raise R.RecipeError(f"--resume {run}: no such file" + (" (a run keeps the state before the last "
                                    "from its second save on)" if run.name == PREV else back))
            run, name = run.parent, run.name
        elif run.is_file():
            raise R.RecipeError(f"--resume {run}: a file; --resume takes a run directory (or its {PREV}, to go "
                                "back one save)")
        if name == STATE and not (run / STATE).is_file():
            if (run / PREV).is_file():
                raise R.RecipeError(f"--resume {run}: no {STATE} (removed?); --resume {run / PREV} continues from "
                                    "the save before it")
            if kept := _weights_kept(run):
                raise R.RecipeError(f"--resume {run}: no {STATE} (removed?), only its weights; start a new run from "
                                    f"them with --weights {kept} and another --out")
            if (run / "recipe.yaml").is_file():
                raise R.RecipeError(f"--resume {run}: the run stopped before its first checkpoint (no state.pt); "
                                    f"start it again with --recipe {run / 'recipe.yaml'} --out {run} (its files are "
                                    "replaced)")
            raise R.RecipeError(f"--resume {run}: not a run directory (no state.pt in it)")
        state = read_state(run, name)  # read once: the trainer continues from it
        saved = R.load(None, base=_run_recipe(run, state), resuming=True)
        if "model.weights" in overrides and overrides["model.weights"] != saved["model"]["weights"]:
            raise R.RecipeError(f"--resume {run} continues from the run's own weights, not --weights "
                                f"{overrides['model.weights']}; drop it, or start a new run from those weights")
        recipe = R.load(None, overrides, base=saved, resuming=True)
        for key in ("data.path", "data.val"):  # the same folder named another way (./imgs, imgs/, absolute)
            if _same_place(_at(saved, key), _at(recipe, key), state.get("cwd")):
                recipe[key.split(".")[0]][key.split(".")[1]] = _at(saved, key)
        fixed = [f"model.{k}" for k in saved["model"] if k != "weights"] + \
            [f"data.{k}" for k in ("path", "val", "val_split", "split_seed", "batch_size")] + ["optim.name"]
        size = "model.img_size"
        changed = [key for key in fixed if R.comparable(_at(recipe, key), key == size) !=
                   R.comparable(_at(saved, key), key == size)]
        if changed:  # the state holds this model (and this optimizer's moments), trained on this split with steps
            # of this size
            raise R.RecipeError(f"--resume {run}: {', '.join(changed)} cannot change in a run "
                                f"({', '.join(f'{_at(saved, k)} -> {_at(recipe, k)}' for k in changed)}); "
                                f"start a new one from it with --weights {run / 'last.safetensors'}")
        return recipe, run, state
    recipe = R.load(args.recipe, overrides)
    name = Path(recipe["data"]["path"]).name.split(".")[0] or "run"
    run = Path(args.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if file := next((p for p in (run, *run.parents) if p.exists() and not p.is_dir()), None):
        raise R.RecipeError(f"--out {run}: {file} is a file, not a directory")
    if (run / STATE).exists() or (run / PREV).exists():
        continue_with = run if (run / STATE).exists() else run / PREV
        raise R.RecipeError(f"--out {run} already holds a run; continue it with --resume {continue_with} or pick "
                            "another --out")
    if kept := _weights_kept(run):  # a run whose state was removed (to free space, say): its weights
        raise R.RecipeError(f"--out {run} holds a run's weights ({kept.name}) that this run would replace; pick "
                            f"another --out (--weights {kept} starts from them)")
    for data in (recipe["data"]["path"], recipe["data"]["val"]):
        if data and Path(data).is_dir() and run.resolve().is_relative_to(Path(data).resolve()):
            raise R.RecipeError(f"--out {run} is inside the data folder {data}: the run's files would become "
                                "part of the data; pick another --out")
    if run.is_dir() and any(run.iterdir()) and not ((run / "recipe.yaml").is_file() or (run / ".lock").is_file()):
        raise R.RecipeError(f"--out {run}: a folder with other files in it, not a run directory; pick a new or "
                            "empty one")
    return recipe, run, None


def _weights_kept(run: Path) -> Path | None:
    """A run directory's exported weights (last.safetensors, else best.safetensors), None if it has none."""
    from .rundir import BEST, LAST

    return next((run / n for n in (LAST, BEST) if (run / n).exists()), None)


def _run_recipe(run: Path, state: dict) -> dict:
    """The recipe a run was trained with: the one its state holds (saved with it, atomically), else (runs of
    older versions) recipe.yaml."""
    from . import recipe as R

    if isinstance(state.get("recipe"), dict):
        with contextlib.suppress(OSError):  # (an edit would otherwise be overwritten without a word)
            if state.get("file") == "state.pt" and (run / "recipe.yaml").read_text(errors="replace") != \
                    R.to_yaml(state["recipe"]):
                logging.getLogger("vitkit").warning(
                    "%s differs from the recipe the run's state holds (edited?): the run goes on with the state's, "
                    "and recipe.yaml is written again; change values with flags (--epochs, --set KEY=VALUE)",
                    run / "recipe.yaml")
        return R.merge(R.defaults(), state["recipe"], f"{run / state.get('file', 'state.pt')}")
    if not (run / "recipe.yaml").is_file():
        raise R.RecipeError(f"--resume {run}: no recipe.yaml beside its state.pt (a run of an older version)")
    try:
        return R.merge(R.defaults(), R.yaml_recipe(run / "recipe.yaml"), str(run / "recipe.yaml"))
    except UnicodeDecodeError:
        raise R.RecipeError(f"--resume {run}: recipe.yaml is not text (damaged?)") from None


def _same_place(saved, given, started_in: str | None) -> bool:
    """Whether a path given on resuming names the run's own (recorded relative to where the run started)."""
    from ..data.datasets import BUILTIN

    if not (isinstance(saved, str) and isinstance(given, str)) or saved == given or "://" in saved + given \
            or saved in BUILTIN or given in BUILTIN:  # "digits" is scikit-learn's, "./digits" a folder
        return False
    try:
        return (Path(started_in or ".") / saved).resolve() == Path(given).resolve()
    except (OSError, RuntimeError):
        return False


def _at(recipe: dict, dotted: str):
    section, key = dotted.split(".")
    return recipe[section][key]


def run_train(args: argparse.Namespace) -> int:
    from ..cli import UserError
    from ..data.datasets import DataError
    from . import recipe as R
    from .trainer import TrainingError

    rank, run = int(os.environ.get("RANK", 0)), None
    logger, level = logging.getLogger("vitkit"), logging.getLogger("vitkit").level
    if rank:  # rank 0 says what every rank would (notes on the weights, the data); errors stay on
        logger.setLevel(logging.ERROR)
    try:
        recipe, run, state = resolve_recipe(args)
        if args.print_recipe:
            if not rank:
                print(R.to_yaml(recipe), end="")
            return 0
        code = _train(recipe, run, state)
    except (R.RecipeError, DataError) as e:
        if rank:  # under torchrun every rank finds it: rank 0 says it
            return 2
        raise UserError(str(e)) from None
    except TrainingError as e:
        if not rank:  # every rank stops on it (they agree on it): rank 0 says it
            logger.error("vitkit train: %s", e)
        return 1
    except RuntimeError as e:  # a process of the run gone (killed, out of memory): the others lose its connection
        if int(os.environ.get("WORLD_SIZE", 1)) == 1 or not _peer_lost(e):
            raise
        logger.error(
            "vitkit train: rank %d lost another process of the run (%s); the last save is kept: start the run again "
            "with --resume %s", rank, str(e).splitlines()[0][:160], run)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, at once: where the run can go on from
        if rank or run is None:
            raise
        from .rundir import PREV, STATE, last_good

        if (run / STATE).is_file() or (run / PREV).is_file():
            logger.error("vitkit train: interrupted; %s: vitkit train --resume %s", last_good(run), run)
        else:
            logger.error("vitkit train: interrupted before the run's first checkpoint: start it again with "
                         "vitkit train --recipe %s --out %s", run / "recipe.yaml", run)
        return 130
    finally:
        logger.setLevel(level)  # (main() in a test or a notebook: the next command logs as before)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # torchrun: the run is over, written and closed. Leave now:
        # gloo's threads can abort the interpreter's own teardown (SIGABRT after both ranks had destroyed their
        # process group: 1 in 35 two-process FSDP runs), and torchrun would report the finished run as failed
        logging.shutdown()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    return code


def _peer_lost(e: RuntimeError) -> bool:
    import torch.distributed

    return isinstance(e, torch.distributed.DistError) or any(
        text in str(e) for text in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def train_model(recipe: str | Path | None = None, *, out: str | Path | None = None,
                resume: str | Path | None = None, values: dict | None = None, **flags) -> Path:
    """`vitkit train` from Python; returns the run directory (best.safetensors, last.safetensors, metrics.csv...).

    flags: the command's named options (data, model, weights, epochs, time_budget, img_size, batch_size, lr,
    val_split, val_data, seed, workers, device); values: any recipe value, {"optim.lr": 0.01, ...}. Bad input
    raises RecipeError or DataError before any work; a failed run raises TrainingError; a run stopped by
    SIGINT/SIGTERM (everything saved) raises KeyboardInterrupt: train_model(resume=RUN) goes on with it. Python
    hands signals to the main thread alone: called from another thread, a run is not stopped by them (SIGTERM ends
    the process at once, and the run goes on from its last save).
    """
    if unknown := sorted(set(flags) - set(FLAG_KEYS)):
        raise TypeError(f"train_model() got unknown options {unknown}; any recipe value goes in values=")
    flags = {flag: os.fspath(v) if isinstance(v, os.PathLike) else v for flag, v in flags.items()}
    args = argparse.Namespace(recipe=recipe and str(recipe), out=out and str(out), resume=resume and str(resume),
                              set=[], print_recipe=False, **{flag: flags.get(flag) for flag in FLAG_KEYS})
    logger = logging.getLogger("vitkit")
    said, level = None, logger.level  # logging left unconfigured (a notebook, a script): the run's lines shown as
    if not logger.handlers and not logging.getLogger().handlers and not level:  # the command shows them
        said = logging.StreamHandler(sys.stderr)
        said.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(said), logger.setLevel(logging.INFO)
    try:
        recipe_, run, state = resolve_recipe(args, values)
        stopped = _train(recipe_, run, state)
    finally:
        if said is not None:
            logger.removeHandler(said), logger.setLevel(level)
    if stopped:
        raise KeyboardInterrupt(f"training stopped by a signal, everything saved: train_model(resume={str(run)!r})")
    return run


def _train(recipe: dict, run: Path, state: dict | None) -> int:
    """Train with the process set up as a run wants it (threads, denormals, malloc), restored afterwards."""
    import torch

    from .trainer import train

    threads = torch.get_num_threads()
    try:
        if recipe["train"]["threads"]:
            torch.set_num_threads(recipe["train"]["threads"])
        # late in a run, with a small learning rate, denormal floats made CPU steps ~8x slower (cifar10 trials)
        torch.set_flush_denormal(True)
        keep_freed_memory()
        return train(recipe, run, state)
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for the next step instead of returning it to the OS.

    By default glibc maps every block above its mmap threshold (at most 32 MB) fresh from the OS and unmaps it
    when freed, so each training step page-faults its large activations back in, zero-filled: a batch of
    256 CIFAR images through the conv stem allocates 67 MB blocks. Serving all blocks from the heap and never
    trimming it makes a step reuse the previous step's pages (about 20x fewer page faults, BENCHMARKS.md); the
    process keeps its peak memory. Process-wide and permanent; False where the C library is not glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's <malloc.h>
    return mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1
