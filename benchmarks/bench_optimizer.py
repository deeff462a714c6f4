"""The optimizer step alone: torch's default AdamW on CPU (a per-tensor loop) vs `make_optimizer`'s fused kernel.

    .venv/bin/python benchmarks/bench_optimizer.py [--variant S/16] [--rounds 3]

ViT parameters of the given variant at 224 px with random gradients; each round times 10 steps of each
optimizer (after 2 warm-up steps) and prints the median in milliseconds.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import vitkit
from vitkit.models.registry import decode_variant
from vitkit.train.trainer import make_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="S/16")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    name, patch = args.variant.split("/")
    torch.manual_seed(0)
    model = vitkit.ViT(vitkit.ViTConfig(**dict(decode_variant(name, int(patch)), img_size=224, num_classes=1000)))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    hyper = {"name": "adamw", "lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.05}
    defaults = torch.optim.AdamW(model.parameters(), lr=hyper["lr"], betas=hyper["betas"],
                                 weight_decay=hyper["weight_decay"])
    optimizers = {"torch.optim.AdamW (default)": defaults,
                  "vitkit make_optimizer (fused)": make_optimizer(model, hyper)}
    rounds = {k: [] for k in optimizers}
    for _ in range(args.rounds):
        for k, opt in optimizers.items():
            times = []
            for _ in range(12):
                t = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t)
            rounds[k].append(statistics.median(times[2:]) * 1e3)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"ViT-{args.variant}, {n:.1f}M parameters, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for k, ms in rounds.items():
        print(f"{k}: median {statistics.median(ms):.1f} ms per step (rounds: {', '.join(f'{x:.1f}' for x in ms)})")


if __name__ == "__main__":
    main()
