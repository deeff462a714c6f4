"""Inference throughput of ViT-Ti/16, S/16, B/16: vitkit vs timm, transformers and torchvision, side by side.

    .venv/bin/python benchmarks/bench_inference.py [--repeats 7] [--models Ti/16 S/16 B/16] [--batches 1 8]

fp32, 224 px, random weights (speed does not depend on their values), torch.inference_mode, each library's
model in eval mode, run in turn in one process so they share the machine's state; median images/s of
`--repeats` timed calls after warm-up. Also measures the machine's fp32 matmul rate and the peak memory
of `vitkit predict` with ViT-B/16, and prints a Markdown table with ratios.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import vitkit

SIZES = {"Ti/16": (192, 12, 3, 768), "S/16": (384, 12, 6, 1536), "B/16": (768, 12, 12, 3072)}
TIMM = {"Ti/16": "vit_tiny_patch16_224", "S/16": "vit_small_patch16_224", "B/16": "vit_base_patch16_224"}


def peers(variant: str) -> dict[str, torch.nn.Module]:
    width, depth, heads, mlp = SIZES[variant]
    models = {"vitkit": vitkit.create_model(f"ViT-{variant}")}
    try:
        import timm
        models["timm"] = timm.create_model(TIMM[variant])
    except ImportError:
        pass
    try:
        from transformers import ViTConfig, ViTForImageClassification
        cfg = ViTConfig(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=mlp,
                        num_labels=1000, attn_implementation="sdpa")
        hf = ViTForImageClassification(cfg)
        models["transformers"] = _Logits(hf)
    except ImportError:
        pass
    from torchvision.models.vision_transformer import VisionTransformer
    models["torchvision"] = VisionTransformer(224, 16, depth, heads, width, mlp)
    return {k: m.eval() for k, m in models.items()}


class _Logits(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(pixel_values=x).logits


def images_per_second(model, batch: int, repeats: int) -> float:
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def matmul_gflops(n: int = 2048, repeats: int = 7) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def model_gflop(variant: str) -> float:
    """2 x multiply-adds of one 224 px forward pass, attention products included (counted on the unfused path)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = vitkit.create_model(f"ViT-{variant}")
    with FlopCounterMode(display=False) as counter, torch.no_grad(), vitkit.capture_attention(model):
        model(torch.randn(1, 3, 224, 224))
    return counter.get_total_flops() / 1e9


def predict_peak_memory_mb() -> float:
    """Peak RSS of `vitkit predict` with ViT-B/16 on 16 images, in a child process."""
    samples = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-samples"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "b16.safetensors"
        vitkit.save_model(vitkit.create_model("ViT-B/16"), ckpt)
        images = sorted(samples.glob("*.JPEG"))[:16]
        if not images:
            from PIL import Image
            images = [Path(tmp) / f"{i}.png" for i in range(16)]
            for i, p in enumerate(images):
                Image.new("RGB", (500, 375), (i * 10, 80, 160)).save(p)
        child = subprocess.Popen([sys.executable, "-m", "vitkit", "predict", *map(str, images), "--weights",
                                  str(ckpt), "--batch-size", "8"], stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the largest of all children
        if status:
            raise RuntimeError("vitkit predict failed")
    return usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    rate = matmul_gflops()
    print(f"fp32 matmul rate (2048x2048 @ 2048x2048, median): {rate:.1f} GFLOP/s\n")
    print("| model | batch | " + " | ".join(["vitkit", "timm", "transformers", "torchvision"]) +
          " | vitkit / best peer | vitkit GFLOP/s (% of matmul) |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in args.models:
        models = peers(variant)
        flop = model_gflop(variant)
        for batch in args.batches:
            speed = {}
            for _ in range(2):  # interleave two rounds so drift in machine speed hits everyone alike
                for name, model in models.items():
                    speed.setdefault(name, []).append(images_per_second(model, batch, args.repeats))
            speed = {k: max(v) for k, v in speed.items()}
            best_peer = max(v for k, v in speed.items() if k != "vitkit")
            achieved = speed["vitkit"] * flop
            cells = " | ".join(f"{speed[k]:.1f}" if k in speed else "-"
                               for k in ("vitkit", "timm", "transformers", "torchvision"))
            print(f"| ViT-{variant} | {batch} | {cells} | {speed['vitkit'] / best_peer:.2f}x | "
                  f"{achieved:.1f} ({achieved / rate:.0%}) |", flush=True)
    print(f"\nimages/s, best of 2 interleaved rounds of the median of {args.repeats} calls; "
          f"GFLOP per image counted as 2 x multiply-adds: " +
          ", ".join(f"{v} {model_gflop(v):.2f}" for v in args.models))
    if not args.skip_memory:
        print(f"peak memory of `vitkit predict` (ViT-B/16, 16 images, batch 8): {predict_peak_memory_mb():.0f} MB")


if __name__ == "__main__":
    main()
