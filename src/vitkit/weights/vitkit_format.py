"""vitkit's own checkpoint: one .safetensors file whose metadata holds everything needed to rebuild the
model (architecture, classes, preprocessing), so `vitkit.load_model(path)` needs no other argument."""
from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

from ..files import replacing
from . import Checkpoint, CheckpointError

FORMAT_KEY, FORMAT_VERSION = "vitkit", "1"


def save(model, path: str | Path, extra: dict | None = None) -> Path:
    """Write `model` (weights + config + preprocessing + class names) atomically: temp file, then rename."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a vitkit checkpoint is a .safetensors file")
    if path.is_dir():  # something in the way on disk (as a read-only folder would be): an OSError
        raise IsADirectoryError(errno.EISDIR, f"{path} is a directory, not a .safetensors file", str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, a read-only file system, a name too long
        raise OSError(f"{path}: cannot write ({_reason(e)})") from None
    meta = {"arch": "vit", "config": model.cfg.to_dict(), "preprocess": dict(model.preprocess),
            "class_names": model.class_names, "pos_resample": dict(model.pos_resample),
            **({"multi_label": True} if model.multi_label else {}), **(extra or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    try:
        with replacing(path, sync=True) as tmp:  # on disk before it replaces the previous file
            save_file(tensors, tmp, metadata={FORMAT_KEY: FORMAT_VERSION, "config": json.dumps(meta)})
            umask = os.umask(0o022)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # safetensors creates files readable by their owner alone
    except Exception as e:  # safetensors' own error type for I/O too: one OSError naming the file, whatever wrote it
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
            error = OSError(f"{path}: cannot write ({_reason(e)})")
            # the cause's number kept (a full disk: a trainer makes room and tries again); safetensors says it
            # in its text, "... (os error 28)"
            error.errno = e.errno if isinstance(e, OSError) else \
                int(m[1]) if (m := re.search(r"os error (\d+)", str(e))) else None
            raise error from None
        raise
    return path


def _reason(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    return text.split("I/O error: ", 1)[-1].split(" at path ")[0] if "I/O error: " in text else text


def read_metadata(path: Path) -> dict | None:
    """The JSON config of a vitkit checkpoint, or None for a safetensors file of another origin."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if FORMAT_KEY not in meta:
        return None
    try:
        return json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: vitkit checkpoint with unreadable config metadata ({e})") from None


def is_vitkit_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    try:
        run_dir, exists, is_file = (path / "best.safetensors").is_file(), path.exists(), path.is_file()
    except OSError as e:  # a name too long, a permission denied
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if run_dir:  # a `vitkit train` run directory
        raise CheckpointError(f"{path}: a run directory; give its {path / 'best.safetensors'} (or last.safetensors)")
    if not exists:
        raise CheckpointError(f"{path}: no such file")
    return path.suffix == ".safetensors" and is_file and read_metadata(path) is not None


def read(path: Path) -> Checkpoint | None:
    meta = read_metadata(path)
    if meta is None:
        return None
    if problem := _problem(meta):
        raise CheckpointError(f"{path}: vitkit checkpoint with {problem}")
    from safetensors.torch import load_file

    return Checkpoint(load_file(str(path)), "vitkit", config=meta["config"], preprocess=meta.get("preprocess"),
                      class_names=meta.get("class_names"), pos_resample=meta.get("pos_resample") or {},
                      multi_label=meta.get("multi_label") is True)


def _problem(meta) -> str | None:
    """What is wrong with a checkpoint's metadata, or None."""
    from ..models.vit import ViTConfig
    from ..train.recipe import PREPROCESS_KEYS, SCHEMA

    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        return "no config object in its metadata"
    pre, names, resample = meta.get("preprocess") or {}, meta.get("class_names"), meta.get("pos_resample") or {}
    if not isinstance(pre, dict) or not isinstance(resample, dict):
        return "preprocess or pos_resample metadata that is not an object"
    flags = (resample.get(k, True) for k in ("antialias", "align_corners"))
    if set(resample) - {"mode", "antialias", "align_corners"} or not all(isinstance(f, bool) for f in flags) \
            or resample.get("mode", "bicubic") not in ("bicubic", "bilinear"):
        return f"pos_resample {resample!r} that vitkit cannot apply"
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        return "class_names that are not a list of strings"
    checks = SCHEMA["model"]  # the recipe's checks of the same preprocessing keys
    if bad := next((f"{k} {why}" for k, v in pre.items() if k in PREPROCESS_KEYS and (why := checks[k][1](v))), None):
        return f"an unusable preprocess {bad}"
    try:
        ViTConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        return f"an unusable config ({e})"
    return None
