"""The run directory on disk: what a run writes there, written so that nothing is ever half-saved or lost.

RUN/recipe.yaml, last.safetensors and best.safetensors (vitkit checkpoints), state.pt (everything `--resume`
needs: model, optimizer, EMA, scaler, step, RNG states, data position) and state.prev.pt (the state before the
last save, to go back to after a divergence), .lock (the pid of the run writing it).
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import torch

from ..files import replacing
from .recipe import RecipeError

log = logging.getLogger("vitkit")
STATE, LAST, BEST, RECIPE = "state.pt", "last.safetensors", "best.safetensors", "recipe.yaml"
PREV = "state.prev.pt"  # the state before the last save: a run that diverged right after a save can go back one


def rng_state(device: torch.device = torch.device("cpu")) -> dict:
    """The generators this process draws from: CPU, Python, NumPy and, on a GPU, that GPU's (one: the others
    visible to the process are not used, and need not exist where the run resumes)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []}


def set_rng_state(s: dict, device: torch.device = torch.device("cpu")) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    cuda = s["cuda"]  # one state; states of older versions: one per GPU then visible, this GPU's at its index
    if cuda and device.type == "cuda" and (len(cuda) == 1 or device.index < len(cuda)):
        torch.cuda.set_rng_state(cuda[0] if len(cuda) == 1 else cuda[device.index], device)


def readable_export(path: Path) -> bool:
    """Whether an exported checkpoint can be read; a damaged one is written again at the next save."""
    from ..weights import CheckpointError
    from ..weights.vitkit_format import is_vitkit_checkpoint

    try:
        return path.is_file() and is_vitkit_checkpoint(path)
    except CheckpointError as e:
        log.warning("%s; the run's state has the weights, and the next save writes it again", e)
        return False


def read_state(run_dir: Path, name: str = STATE) -> dict:
    """The training state of a run (`name`: state.pt, or state.prev.pt to go back one save), or a RecipeError
    saying it cannot be read."""
    try:
        state = torch.load(run_dir / name, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, garbage, empty: torch raises a zoo of types (its texts advise unsafe loads)
        why = "empty" if isinstance(e, EOFError) else e.strerror if isinstance(e, OSError) and e.filename else \
            "truncated or damaged" if isinstance(e, OSError) or "zip archive" in str(e) else \
            "it holds Python objects, which are not read" if "GLOBAL" in str(e) else \
            "not a torch checkpoint: overwritten?"
        back = f"; --resume {run_dir / PREV} goes back to the save before" if name == STATE and \
            _peek(run_dir / PREV, "step") is not None else ""
        raise RecipeError(f"--resume {run_dir}: {name} is unreadable ({why}); the run cannot continue from it{back}") \
            from None
    needed = ("step", "total_steps", "model", "optimizer", "class_names", "skipped", "epoch_stats")
    if not isinstance(state, dict) or (missing := [k for k in needed if k not in state]):
        raise RecipeError(f"--resume {run_dir}: {name} is not a vitkit training state (" +
                          (f"no {', '.join(missing[:3])} in it" if isinstance(state, dict) else
                           f"a {type(state).__name__}") + "); the run cannot continue from it")
    return {**state, "file": name}


def keep_previous(run_dir: Path) -> None:
    """The state about to be replaced becomes state.prev.pt: a hard link (no copy, no time), or a copy on a file
    system without them. A failure costs the previous state alone, never the save."""
    try:
        if not (run_dir / STATE).is_file():  # the run's first save: a state.prev.pt here is another run's
            (run_dir / PREV).unlink(missing_ok=True)
            return
        with replacing(run_dir / PREV, sync=True) as tmp:
            try:
                os.link(run_dir / STATE, tmp)
            except OSError:  # a copy: the one it replaces goes first, so that the disk holds at most three states
                (run_dir / PREV).unlink(missing_ok=True)
                shutil.copyfile(run_dir / STATE, tmp)
    except OSError as e:
        log.warning("%s not kept (%s): only the last state is on disk", run_dir / PREV, e.strerror or e)
        (run_dir / PREV).unlink(missing_ok=True)  # an older one would be taken for the save before the last


def lock_run_dir(run_dir: Path):
    """An exclusive lock on the run directory for this process's life: two runs writing one directory would
    interleave their checkpoints and metrics. The open file is the lock; keep it."""
    import fcntl

    f = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise RecipeError(f"{run_dir} is in use by another `vitkit train` (pid {f.read().strip() or '?'}); "
                          "wait for it or pick another --out") from None
    f.seek(0), f.truncate(), f.write(str(os.getpid())), f.flush()
    for tmp in run_dir.glob(".*.tmp"):  # half-written files of a process killed while saving (checkpoint-sized)
        tmp.unlink(missing_ok=True)
    with replacing(run_dir / ".write-check") as tmp:  # files can be made here (an open .lock does not show it):
        tmp.write_bytes(b"")                          # found now, not after an epoch of training
    (run_dir / ".write-check").unlink()
    return f


def atomic_save(obj, path: Path, before=None) -> None:
    """obj written whole to `path` or not at all; `before()` runs once it is on disk, before it replaces path."""
    with replacing(path, sync=True, before=before) as tmp, open(tmp, "wb") as f:  # interrupted or out of space:
        try:  # no half-written file left behind
            torch.save(obj, f)
        except RuntimeError as e:  # torch's zip writer, closed after a failed write, hides its OSError (a full
            if isinstance(e.__context__, OSError):  # disk: "unexpected pos"); the OSError is the news
                raise e.__context__ from None
            raise


@contextlib.contextmanager
def stop_signals():
    """SIGTERM/SIGINT set a flag that the loop checks after each step; a second SIGINT interrupts at once."""
    caught: list[int] = []

    def handler(sig, frame):
        if caught and sig == signal.SIGINT:
            raise KeyboardInterrupt
        caught.append(sig)

    installed = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            installed[sig] = signal.signal(sig, handler)
    try:
        yield caught
    finally:
        for sig, old in installed.items():
            signal.signal(sig, old)


def last_good(run_dir: Path, diverged: bool = False, going_back: bool = False) -> str:
    """Where the run can continue from; `going_back`: it started from state.prev.pt and has not saved since."""
    name = PREV if going_back else STATE
    if (step := _peek(run_dir / name, "step")) is None:
        return "no checkpoint was written yet"
    # a divergence shows one step after the update that caused it: a save in between already holds its weights
    hint = ""
    if diverged and not going_back and (before := _peek(run_dir / PREV, "step")) is not None and before < step:
        hint = (f" (if resuming from it diverges at once, its weights were already off: go back one more save with "
                f"--resume {run_dir / PREV}, step {before})")
    elif diverged and (run_dir / BEST).is_file():
        hint = (f" (if resuming from it diverges at once, its weights were already off: start a new run from an "
                f"earlier epoch's with --weights {run_dir / BEST})")
    return f"the last checkpoint is {run_dir / name} (step {step}){hint}"


def recorded_best(path: Path) -> float:
    """The validation top-1 a best.safetensors records, -1 if none."""
    from ..weights.vitkit_format import read_metadata

    try:
        top1 = ((read_metadata(path) or {}).get("train") or {}).get("val_top1")
    except Exception:  # missing or damaged: nothing to protect
        return -1.0
    return float(top1) if isinstance(top1, (int, float)) else -1.0


def _peek(path: Path, key: str):
    """One value of a saved training state, None if it cannot be read; mmap: not the whole (maybe many-GB) file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)[key]
    except Exception:  # missing or damaged
        return None
