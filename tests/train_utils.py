"""Shared pieces of the training tests: a tiny recipe, ways to run `vitkit`, digit images on disk."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# a 1-block, 32-wide ViT on 8x8 digits: ~2 s per epoch on one core
TINY = {
    "model": {"img_size": 8, "patch_size": 2, "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64,
              "pool": "gap", "class_token": False, "fc_norm": True, "crop_pct": 1.0},
    "data": {"path": "digits", "val_split": 0.2, "batch_size": 64},
    "augment": {"crop": "resize"},
    "optim": {"lr": 0.003},
    "train": {"epochs": 2, "threads": 1, "amp": "none"},
}


def write_recipe(path: Path, **sections) -> Path:
    """TINY with some sections' keys replaced, written as YAML."""
    recipe = {s: {**TINY.get(s, {}), **sections.get(s, {})} for s in {*TINY, *sections}}
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_vitkit(*args: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """`python -m vitkit ARGS` in a fresh process, one math thread (as in the runs it is compared with)."""
    return subprocess.run([sys.executable, "-m", "vitkit", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=env(), **popen)


def train_in_subprocess(folder: Path, **sections) -> tuple[Path, Path]:
    """Write TINY + sections as folder/recipe.yaml, train it into folder/run; (recipe, run dir)."""
    recipe = write_recipe(folder / "recipe.yaml", **sections)
    done = run_vitkit("train", "--recipe", str(recipe), "--out", str(folder / "run"))
    assert done.returncode == 0, done.stderr
    return recipe, folder / "run"


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def digit_images(folder: Path, classes: list[str], per_class: int = 12, offset: int = 0) -> dict[str, list[Path]]:
    """sklearn digits written as 8x8 RGB PNGs into folder/<class>/; returns the files per class."""
    from sklearn.datasets import load_digits

    d = load_digits()
    files = {}
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        idx = np.flatnonzero(d.target == int(c))[offset: offset + per_class]
        files[c] = []
        for i in idx:
            px = np.rint(d.images[i] * (255 / 16)).astype(np.uint8)
            path = folder / c / f"{i:04d}.png"
            Image.fromarray(np.stack([px] * 3, -1)).save(path)
            files[c].append(path)
    return files
