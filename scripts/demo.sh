#!/usr/bin/env bash
# The README's main job, offline on a fresh machine: train a small ViT on scikit-learn's bundled digits,
# evaluate it on the held-out 20%, then classify a few digit pictures written as PNG files.
#   scripts/demo.sh [RUN_DIR]        (default runs/digits; about 40 s on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh  # creates .venv and installs vitkit the first time
VITKIT=${VITKIT:-$( [ -x .venv/bin/vitkit ] && echo .venv/bin/vitkit || echo vitkit )}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
RUN=${1:-runs/digits}

if [ -f "$RUN/state.pt" ]; then
  echo "== $RUN already holds a run: skipping training (delete it to train again)"
else
  echo "== train"
  "$VITKIT" train --data digits --recipe recipes/digits.yaml --out "$RUN"
fi

echo "== evaluate on the held-out split recorded in the checkpoint"
"$VITKIT" eval --data digits --weights "$RUN/best.safetensors" --out "$RUN"

echo "== write a few held-out digits as PNG (file name = true label), then predict them"
mkdir -p "$RUN/samples"
"$PYTHON" - "$RUN/samples" <<'PY'
import sys
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from vitkit.data.datasets import stratified_split
import torch

digits = load_digits()
_, held_out = stratified_split(torch.from_numpy(digits.target), 0.2, 0)  # the split training held out
for n, i in enumerate(held_out[::36][:10].tolist()):
    pixels = np.rint(digits.images[i] * (255 / 16)).astype(np.uint8)
    Image.fromarray(pixels).resize((32, 32), Image.NEAREST).save(f"{sys.argv[1]}/{n}_true{digits.target[i]}.png")
PY
"$VITKIT" predict "$RUN/samples" --weights "$RUN/best.safetensors" --top-k 1
