"""Training-step speed of recipes/cifar10.yaml's model and variants of it, each with and without channels-last.

    .venv/bin/python benchmarks/bench_cifar_step.py [--variant NAME SECTION.KEY=VALUE ...]... [--rounds 4]

A variant is the recipe with `--set`-style overrides (default: the recipe itself, and the session-2 model:
strided stem, 6 blocks); each runs in the default memory format and in channels-last (what
`train.channels_last` switches). A step is bench_train.py's (forward, label-smoothed cross-entropy, backward,
clipping at 1, AdamW) in the precision and with the attention kernel that `vitkit train` picks on this machine,
with its malloc settings, on random data at the recipe's batch size. The peers take turns, `--rounds` times;
the table gives the median round, in images/s, and every round, because this host's speed drifts from minute
to minute.

Before the table it times the data side of a step: augmenting one batch of in-memory 32 px images with the
recipe's shifts and flips, torchvision's per-image pipeline (`train_transform`, the general path) against
the batched path `vitkit train` takes for such data (`BatchShiftFlip`).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from bench_train import step_rate
from vitkit.data.augment import BatchShiftFlip, train_transform
from vitkit.data.datasets import TensorImages, Transformed
from vitkit.models.vit import ViTConfig
from vitkit.train import recipe as R
from vitkit.train.cli import keep_freed_memory
from vitkit.train.evaluate import training_precision
from vitkit.train.trainer import attention_kernel, build_model, make_optimizer, pick_attention

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "cifar10.yaml"
DEFAULT_VARIANTS = [["recipe"], ["session-2 recipe (strided stem, 6 blocks)", "model.depth=6",
                                 "model.conv_stem_pool=false"]]


def peers(name: str, sets: list[str]) -> dict:
    """(name, memory format) -> (model, optimizer, images, labels, precision, kernel name)."""
    r = R.load(RECIPE, {f"{s}.{k}": v for s, k, v in map(R.parse_override, sets)})
    cpu = torch.device("cpu")
    amp = training_precision(cpu, r["train"]["amp"])
    out = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = build_model(r["model"], [str(i) for i in range(10)]).train()
        x = torch.randn(r["data"]["batch_size"], 3, *model.cfg.img_size)
        if channels_last:
            model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        kernel = pick_attention(r["train"]["attention"], cpu, amp, model.num_prefix_tokens + math.prod(model.cfg.grid))
        out[name, "channels-last" if channels_last else "default"] = (
            model, make_optimizer(model, r["optim"]), x, torch.randint(0, 10, (len(x),)), amp, kernel)
    return out


def augmentation_ms(rounds: int) -> tuple[int, float, float]:
    """(batch size, ms to augment one batch with per-image transforms, ms batched), medians of `rounds`."""
    r = R.load(RECIPE)
    n, size = r["data"]["batch_size"], ViTConfig(img_size=r["model"]["img_size"]).img_size
    images = TensorImages(torch.randint(0, 256, (n, 3, *size), dtype=torch.uint8), torch.arange(n) % 10)
    pre = {k: r["model"][k] for k in ("mean", "std", "interpolation")}
    per_image = Transformed(images, train_transform(r["augment"], size, pre), seed=0)
    batched = BatchShiftFlip.applies(r["augment"], images, size, pre, seed=0)
    ways = {"per-image": lambda e: [per_image[(e, i)] for i in range(n)],
            "batched": lambda e: batched.collate([batched[(e, i)] for i in range(n)])}
    times = {k: [] for k in ways}
    for epoch in range(rounds):
        for k, augment in ways.items():
            t = time.perf_counter()
            augment(epoch)
            times[k].append(1000 * (time.perf_counter() - t))
    return n, statistics.median(times["per-image"]), statistics.median(times["batched"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", nargs="+", action="append", metavar="NAME [SECTION.KEY=VALUE]",
                    help="a name, then recipe overrides; repeat for more variants")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per turn (after 2 warm-up steps)")
    args = ap.parse_args()
    torch.set_flush_denormal(True)  # as vitkit train does, and it keeps freed memory for the next step
    keep_freed_memory()
    n, per_image, batched = augmentation_ms(5 * args.rounds)
    print(f"augmenting one batch ({n} images, the recipe's shifts and flips): "
          f"per-image transforms {per_image:.1f} ms, batched {batched:.1f} ms ({per_image / batched:.1f}x), "
          f"medians of {5 * args.rounds}")
    setups = {k: v for name, *sets in args.variant or DEFAULT_VARIANTS for k, v in peers(name, sets).items()}
    rates: dict[tuple, list[float]] = {k: [] for k in setups}
    for _ in range(args.rounds):
        for key, (model, optimizer, x, y, amp, kernel) in setups.items():
            rates[key].append(step_rate(model, optimizer, x, y, amp, attention_kernel(kernel), args.repeats))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, precision "
          f"{next(iter(setups.values()))[4]}, {args.rounds} rounds of {args.repeats} steps\n")
    print("| model | params | memory format | img/s (median round) | vs default format | rounds |\n|---|---|---|---|---|---|")
    for key, (model, *_rest) in setups.items():
        name, fmt = key
        base = statistics.median(rates[name, "default"])
        print(f"| {name} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M | {fmt} | "
              f"{statistics.median(rates[key]):.0f} | {statistics.median(rates[key]) / base:.2f}x | "
              f"{', '.join(f'{v:.0f}' for v in rates[key])} |")


if __name__ == "__main__":
    main()
