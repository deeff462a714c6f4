"""Transfer at our scale (the paper's claim): a ViT pre-trained on CIFAR-10 at 32 px, fine-tuned at 48 px,
against the same model trained from scratch with the same data, epochs and steps.

    .venv/bin/python benchmarks/bench_transfer.py [--targets cifar-1k digits-few digits-all] [--seeds 0 1 2]

The pre-trained model is benchmarks/transfer/pretrained-cifar10.safetensors (the 60-minute CIFAR-10 run of
session 2, zoo/cifar10-vit.safetensors until session 8: 6 blocks, strided stem, 85.58% held-out). Fine-tuning
interpolates its 4x4 position embeddings to the 6x6 token grid of 48 px inputs and starts from a zero head.
Arms (recipes in benchmarks/transfer/, everything else equal):
- fine-tune, SGD: the paper's fine-tuning optimiser (SGD momentum 0.9, no weight decay, clipping at 1);
- fine-tune, AdamW: the pre-trained start with the from-scratch optimiser (AdamW 6e-4, weight decay 0.05);
- fine-tune, SGD, 32 px: the first arm at the pre-training resolution, to separate the effect of resolution;
- scratch, AdamW / scratch, SGD: the same model from random weights with either optimiser.
Targets:
- cifar-1k: CIFAR-10 images the pre-training never saw (its 5,000 held-out ones, the split recorded in the
  checkpoint), upsampled to 48 px: 1,000 for training (100 per class), 4,000 held out; 20 epochs of 32;
- digits-few / digits-all: scikit-learn's digits at 48 px, 10% (180) / 80% (1,437) for training, the rest
  held out; 60 epochs of 32 / 15 epochs of 64.
Each run is `vitkit train` in a child process; the table gives the held-out top-1 at the end of the run
(mean and range over seeds) and the median training time per run (metrics.csv).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "benchmarks" / "transfer"
ZOO = RECIPES / "pretrained-cifar10.safetensors"
SGD = ["--set", "optim.name=sgd", "--set", "optim.lr=0.01", "--set", "optim.momentum=0.9",
       "--set", "optim.weight_decay=0.0"]
ADAMW = ["--set", "optim.name=adamw", "--set", "optim.lr=0.0006", "--set", "optim.betas=[0.9, 0.99]",
         "--set", "optim.weight_decay=0.05"]
ARMS = {  # run-folder name -> (table label, flags)
    "finetune-sgd": ("fine-tune, SGD", ["--recipe", str(RECIPES / "finetune48.yaml"), *SGD]),
    "finetune-adamw": ("fine-tune, AdamW", ["--recipe", str(RECIPES / "finetune48.yaml"), *ADAMW]),
    "finetune-sgd-32px": ("fine-tune, SGD, 32 px", ["--recipe", str(RECIPES / "finetune48.yaml"), *SGD,
                                                    "--img-size", "32"]),
    "scratch-adamw": ("scratch, AdamW", ["--recipe", str(RECIPES / "scratch48.yaml"), *ADAMW]),
    "scratch-sgd": ("scratch, SGD", ["--recipe", str(RECIPES / "scratch48.yaml"), *SGD]),
}
TARGETS = {  # name -> (data flags, training length)
    "cifar-1k": (["--val-split", "0.8"], ["--epochs", "20", "--batch-size", "32", "--set", "train.eval_every=10"]),
    "digits-few": (["--data", "digits", "--val-split", "0.9"],
                   ["--epochs", "60", "--batch-size", "32", "--set", "train.eval_every=10"]),
    "digits-all": (["--data", "digits", "--val-split", "0.2"], ["--epochs", "15", "--batch-size", "64"]),
}


def unseen_cifar(folder: Path) -> Path:
    """The pre-trained model's held-out CIFAR-10 images written once as an ImageFolder of PNGs."""
    if (folder / "done").is_file():
        return folder
    from PIL import Image

    from vitkit.data.datasets import open_data
    from vitkit.weights.vitkit_format import read_metadata

    split = read_metadata(ZOO)["data"]  # the very split the pre-training held out
    data = open_data(str(ROOT / split["path"]), val_split=split["val_split"], split_seed=split["split_seed"])
    for n, i in enumerate(data.val.indices):
        image, label = data.val.dataset.images[i], int(data.val.dataset.labels[i])
        (folder / data.class_names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / data.class_names[label] / f"{n:04d}.png")
    (folder / "done").touch()
    return folder


def finished(out: Path) -> bool:
    from vitkit.weights.vitkit_format import read_metadata

    if not (out / "last.safetensors").is_file():
        return False
    epochs = yaml.safe_load((out / "recipe.yaml").read_text())["train"]["epochs"]
    return read_metadata(out / "last.safetensors")["train"]["epoch"] >= epochs


def run(args: list[str], out: Path) -> tuple[float, float]:
    """(final held-out top-1, training seconds) of one `vitkit train` run; a finished run in `out` is reused."""
    from vitkit.weights.vitkit_format import read_metadata

    if not finished(out):  # a run cut short (killed, machine restarted) continues where it stopped
        resume = ["--resume", str(out)] if (out / "state.pt").is_file() else [*args, "--out", str(out)]
        done = subprocess.run([sys.executable, "-m", "vitkit", "train", *resume], cwd=ROOT,
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{out}: vitkit train failed:\n{done.stderr[-2000:]}")
    with open(out / "metrics.csv") as f:
        seconds = float(list(csv.DictReader(f))[-1]["elapsed_s"])
    return read_metadata(out / "last.safetensors")["train"]["val_top1"], seconds


def no_finetuning(folder: Path, val_split: str) -> float:
    """The pre-trained model as it is (32 px, its own head) on the same held-out images: the CIFAR-10 reference."""
    done = subprocess.run([sys.executable, "-m", "vitkit", "eval", "--data", str(folder), "--weights", str(ZOO),
                           "--val-split", val_split, "--json", "--out", str(folder.parent)], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"vitkit eval failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)["top1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", default="runs/transfer")
    args = ap.parse_args()
    if not ZOO.is_file():
        raise SystemExit(f"{ZOO}: missing; it is the pre-trained model")
    out = ROOT / args.out
    rows = []
    for target in args.targets:
        data, length = TARGETS[target]
        if target == "cifar-1k":
            folder = unseen_cifar(out / "cifar10-unseen")
            data = ["--data", str(folder), *data]
            acc = no_finetuning(folder, data[data.index("--val-split") + 1])
            print(f"{target:10} {'no fine-tuning':22}: {acc:.2%} held-out (the checkpoint at 32 px)", flush=True)
            rows.append((target, "pre-trained, no fine-tuning (32 px)", [acc], 0.0))
        for folder in args.arms:
            label, flags = ARMS[folder]
            accs, secs = [], []
            for seed in args.seeds:
                acc, sec = run([*flags, *data, *length, "--seed", str(seed)], out / f"{target}-{folder}-seed{seed}")
                accs.append(acc), secs.append(sec)
                print(f"{target:10} {label:22} seed {seed}: {acc:.2%} held-out, {sec:.0f} s of training", flush=True)
            rows.append((target, label, accs, statistics.median(secs)))
    print(f"\n| target | arm | held-out top-1, mean of {len(args.seeds)} seeds (min-max) | training s per run (median) |")
    print("|---|---|---|---|")
    for target, label, accs, sec in rows:
        print(f"| {target} | {label} | {statistics.mean(accs):.2%} ({min(accs):.2%}-{max(accs):.2%}) | {sec:.0f} |")


if __name__ == "__main__":
    main()
