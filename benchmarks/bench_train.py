"""Training throughput: a vitkit training step vs timm's ViT of the same shape under a plain PyTorch loop.

    .venv/bin/python benchmarks/bench_train.py [--repeats 5] [--amp bf16 none] [--models cifar S/16] [--compile]
                                               [--device cuda] [--batch N]

Models: a CIFAR-size ViT (ViT-Ti widths, patch 4, 32 px, 10 classes, batch 128) and ViT-S/16 at 224 px
(1000 classes, batch 32), random weights and data. One step is the same code for everyone: forward under the
precision's autocast, label-smoothed cross-entropy, backward, gradient-norm clipping at 1, AdamW step.

- vitkit: model, optimizer, autocast and attention kernel as `vitkit train` sets them up (`make_optimizer`:
  the fused AdamW kernel; `autocast`; `attention_kernel` with the recipe default `train.attention: auto`), in
  a process whose malloc keeps freed memory, as `vitkit train` leaves it (`keep_freed_memory`). Its model
  runs the last block for the [class] token alone, the only token the head reads.
- timm: `timm.models.VisionTransformer` with `torch.optim.AdamW` (torch's default: a per-tensor loop on
  CPU), torch's own kernel choice and glibc's malloc defaults, which is what a plain loop gets; and again
  with vitkit's settings (vitkit's optimizer, the kernel pinned the way vitkit pins it, malloc as vitkit
  leaves it), to show where a difference comes from.

Every peer runs in a fresh process of its own (the malloc settings are process-wide and permanent).
`--compile` adds both models under torch.compile (vitkit's `train.compile: true`); the first warm-up step
compiles. bf16 rows are measured by default only where bf16 is native (GPUs, CPUs with AVX-512 bf16 / AMX).
`--device cuda` runs every peer on the GPU (timed with synchronisation); `--batch` replaces both batch sizes.

Each peer runs `--repeats` timed steps after two warm-up steps; two interleaved rounds, best median kept.
`--kernel-sweep` instead times timm's ViT-S/16 (and Ti/4) in the first `--amp` precision with the math and
the flash kernel at several sequence lengths: the measurement behind `train.attention: auto`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import vitkit
from vitkit.models.registry import decode_variant
from vitkit.train.evaluate import autocast, native_bf16
from vitkit.train.cli import keep_freed_memory
from vitkit.train.trainer import attention_kernel, make_optimizer, pick_attention

SETUPS = {  # name -> (ViTConfig fields, batch)
    "cifar": (dict(decode_variant("Ti", 4), img_size=32, num_classes=10), 128),
    "S/16": (dict(decode_variant("S", 16), img_size=224, num_classes=1000), 32),
}
PEERS = ["vitkit", "timm", "timm, vitkit's settings"]
OPTIM = {"name": "adamw", "lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.05}


def timm_model(cfg: dict) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=cfg["img_size"], patch_size=cfg["patch_size"], num_classes=cfg["num_classes"],
                             embed_dim=cfg["width"], depth=cfg["depth"], num_heads=cfg["num_heads"],
                             mlp_ratio=cfg["mlp_dim"] / cfg["width"])


def step_rate(model, optimizer, x, y, amp: str, kernel, repeats: int) -> float:
    """Images/s of full training steps (median of `repeats` after 2 warm-up steps)."""
    # GPU work is asynchronous; synchronize() without a device waits for the current one (cuda:0), not x's
    sync = (lambda: torch.cuda.synchronize(x.device)) if x.is_cuda else (lambda: None)
    times = []
    with kernel:
        for i in range(2 + repeats):
            sync()
            t = time.perf_counter()
            with autocast(x.device, amp):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if i >= 2:
                times.append(time.perf_counter() - t)
    return len(x) / statistics.median(times)


def peer(name: str, setup: str, amp: str, attention: str, device: torch.device):
    """(model, optimizer, kernel context factory, kernel name) of one peer, set up in this process."""
    cfg, _ = SETUPS[setup]
    torch.manual_seed(0)
    ours = vitkit.ViT(vitkit.ViTConfig(**cfg)).train().to(device)
    kernel = pick_attention(attention, device, amp, ours.num_prefix_tokens + math.prod(ours.cfg.grid))
    pinned = lambda: attention_kernel(kernel)  # noqa: E731
    if name.startswith("vitkit"):
        model, optimizer, ctx = ours, make_optimizer(ours, OPTIM), pinned
    else:
        model = timm_model(cfg).train().to(device)
        n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, model))
        assert n_ours == n_theirs, f"{setup}: {n_ours} vs {n_theirs} parameters"
        if name == "timm, vitkit's settings":
            optimizer, ctx = make_optimizer(model, OPTIM), pinned
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=OPTIM["lr"], weight_decay=OPTIM["weight_decay"])
            ctx = contextlib.nullcontext
    if name in ("vitkit", "vitkit, compiled", "timm, vitkit's settings"):
        keep_freed_memory()  # what `vitkit train` does to the process
    if name.endswith("compiled"):  # what train.compile: true does (torch.compile of the model)
        model = torch.compile(model)
    return model, optimizer, ctx, kernel


def rate_in_child(name: str, setup: str, amp: str, args: argparse.Namespace) -> tuple[float, str | None]:
    """Each peer in a fresh process: `vitkit train`'s malloc settings are process-wide."""
    out = subprocess.run([sys.executable, __file__, "--child", name, "--models", setup, "--amp", amp,
                          "--attention", args.attention, "--repeats", str(args.repeats), "--device", args.device,
                          *(["--batch", str(args.batch)] if args.batch else [])],
                         capture_output=True, text=True, check=True).stdout
    rate, kernel = json.loads(out.splitlines()[-1])
    return rate, kernel


def kernel_sweep(amp: str, repeats: int, device: torch.device) -> None:
    print("| model | img px | tokens | batch | math img/s | flash img/s | math / flash |")
    print("|---|---|---|---|---|---|---|")
    for variant, patch, size, batch in (("S", 16, 128, 32), ("S", 16, 160, 32), ("S", 16, 192, 32),
                                        ("S", 16, 224, 32), ("Ti", 4, 32, 128), ("Ti", 4, 48, 128)):
        cfg = dict(decode_variant(variant, patch), img_size=size, num_classes=10)
        torch.manual_seed(0)
        model = timm_model(cfg).train().to(device)
        optimizer = torch.optim.AdamW(model.parameters())
        x, y = torch.randn(batch, 3, size, size, device=device), torch.randint(0, 10, (batch,), device=device)
        rate = {k: max(step_rate(model, optimizer, x, y, amp, attention_kernel(k), repeats) for _ in range(2))
                for k in ("math", "flash")}
        print(f"| ViT-{variant}/{patch} | {size} | {(size // patch) ** 2 + 1} | {batch} | {rate['math']:.1f} | "
              f"{rate['flash']:.1f} | {rate['math'] / rate['flash']:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    ap.add_argument("--batch", type=int, help="batch size for every model (default: 128 for Ti/4, 32 for S/16)")
    ap.add_argument("--amp", nargs="+", choices=["bf16", "none"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--attention", default="auto", help="vitkit's train.attention (default: the recipe default)")
    ap.add_argument("--kernel-sweep", action="store_true", help="math vs flash kernel by sequence length")
    ap.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    ap.add_argument("--child", choices=PEERS + ["vitkit, compiled", "timm, compiled"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    args.amp = args.amp or (["bf16", "none"] if native_bf16(device) else ["none"])
    if args.kernel_sweep:
        return kernel_sweep(args.amp[0], args.repeats, device)
    if args.child:  # one peer, one setup, one precision: print [images/s, kernel]
        cfg, batch = SETUPS[args.models[0]]
        batch = args.batch or batch
        torch.manual_seed(1)
        x = torch.randn(batch, 3, cfg["img_size"], cfg["img_size"]).to(device)
        y = torch.randint(0, cfg["num_classes"], (batch,)).to(device)
        model, optimizer, ctx, kernel = peer(args.child, args.models[0], args.amp[0], args.attention, device)
        return print(json.dumps([step_rate(model, optimizer, x, y, args.amp[0], ctx(), args.repeats), kernel]))
    gpu = f", GPU: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
          f"({torch.backends.cpu.get_cpu_capability()}, native bf16: {native_bf16(torch.device('cpu'))}{gpu}), "
          f"load average {os.getloadavg()[0]:.2f}\n")
    header = None
    for setup in args.models:
        batch = args.batch or SETUPS[setup][1]
        for amp in args.amp:
            names = PEERS + (["vitkit, compiled", "timm, compiled"] if args.compile else [])
            rates: dict[str, list[float]] = {}
            for _ in range(2):  # interleaved, so drift in machine speed hits every peer alike
                for name in names:
                    rate, kernel = rate_in_child(name, setup, amp, args)
                    rates.setdefault(name, []).append(rate)
            best = {name: max(v) for name, v in rates.items()}
            ratios = {"vitkit / timm": best["vitkit"] / best["timm"],
                      "vitkit / timm, vitkit's settings": best["vitkit"] / best["timm, vitkit's settings"]}
            if args.compile:
                ratios["vitkit compiled / timm"] = best["vitkit, compiled"] / best["timm"]
                ratios["vitkit compiled / timm compiled"] = best["vitkit, compiled"] / best["timm, compiled"]
            if header is None:
                header = ["model", "batch", "precision", "vitkit kernel", *best, *ratios]
                print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
            label = "ViT-Ti/4 @ 32 px" if setup == "cifar" else "ViT-S/16 @ 224 px"
            cells = [label, str(batch), "bf16 autocast" if amp == "bf16" else "fp32", kernel or "default",
                     *(f"{v:.1f}" for v in best.values()), *(f"{v:.2f}x" for v in ratios.values())]
            print("| " + " | ".join(cells) + " |", flush=True)
    print(f"\nimages/s of full training steps, best of 2 interleaved rounds of the median of {args.repeats} steps; "
          f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
