"""Training-step speed of recipes/cifar10.yaml's model and variants of it, each with and without channels-last.

    .venv/bin/python benchmarks/bench_cifar_step.py [--variant NAME SECTION.KEY=VALUE ...]... [--rounds 4]

A variant is the recipe with `--set`-style overrides (default: the recipe itself, and its pooling stem with 3
blocks); each runs in the default memory format and in channels-last (`train.channels_last: true`). A step is
bench_train.py's (forward, label-smoothed cross-entropy, backward, clipping at 1, AdamW) in the precision and
with the attention kernel that `vitkit train` picks on this machine, on random data at the recipe's batch
size. The peers take turns, `--rounds` times; the table gives the median round, in images/s, and every round,
because this host's speed drifts from minute to minute.
"""
from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import torch

from bench_train import step_rate
from vitkit.train import recipe as R
from vitkit.train.evaluate import training_precision
from vitkit.train.trainer import attention_kernel, build_model, make_optimizer, pick_attention

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "cifar10.yaml"
DEFAULT_VARIANTS = [["recipe"], ["pool stem, 3 blocks", "model.depth=3", "model.conv_stem_pool=true"]]


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", nargs="+", action="append", metavar="NAME [SECTION.KEY=VALUE]",
                    help="a name, then recipe overrides; repeat for more variants")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per turn (after 2 warm-up steps)")
    args = ap.parse_args()
    torch.set_flush_denormal(True)  # as vitkit train does
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
