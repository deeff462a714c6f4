"""Cost of an attention map against a plain forward pass: ViT-B/16, one 224 px image, CPU, fp32.

    .venv/bin/python benchmarks/bench_attention.py [--repeats 9] [--model ViT-B/16] [--threads N]

Random weights (speed does not depend on their values). Rows, each timed in turn in one loop so that they
share the machine's state (other load, caches), median of --repeats after warm-up:
  forward            model(x) on a preprocessed (1, 3, 224, 224) tensor, torch.inference_mode (as predict)
  rollout / last-layer / head   vitkit.inspect.attention_map(model, x, method): capture + map at 224x224
  from the photo     preprocessing included: eval_transform + model(x) versus attention_map(model, photo),
                     which resizes the map back to the photo's own size
Target (issue 4): the rollout map costs no more than about 1.5x the forward pass.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import vitkit
from vitkit.data.images import eval_transform, load_image
from vitkit.inspect import attention_map
from vitkit.inspect.figure7 import SAMPLES, synthetic_images


def photo():
    paths = sorted(SAMPLES.glob("*.JPEG")) if SAMPLES.is_dir() else []
    if paths:
        image, _ = load_image(paths[0])
        return image, paths[0].name
    return synthetic_images(1, 500)[0], "generated 500x500 image"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B/16")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = vitkit.create_model(args.model)
    image, name = photo()
    transform = eval_transform(model.preprocess, model.cfg.img_size)
    x = transform(image)[None]

    def forward():
        with torch.inference_mode():
            model(x)

    def forward_from_photo():
        with torch.inference_mode():
            model(transform(image)[None])

    cases = {
        "forward": forward,
        "rollout": lambda: attention_map(model, x, "rollout"),
        "last-layer": lambda: attention_map(model, x, "last-layer"),
        "head (layer 5, head 0)": lambda: attention_map(model, x, "head", layer=5, head=0),
        "forward, from the photo": forward_from_photo,
        "rollout, from the photo": lambda: attention_map(model, image, "rollout"),
    }
    for fn in cases.values():  # warm-up
        fn(), fn()
    times = {k: [] for k in cases}
    for _ in range(args.repeats):
        for k, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"{args.model}, {model.cfg.img_size[0]} px, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"median of {args.repeats}; photo: {name} ({image.width}x{image.height})\n")
    print("| case | median ms | vs forward |")
    print("|---|---:|---:|")
    for k, ms in med.items():
        base = med["forward, from the photo"] if "photo" in k else med["forward"]
        print(f"| {k} | {ms:.1f} | {ms / base:.2f}x |")


if __name__ == "__main__":
    main()
