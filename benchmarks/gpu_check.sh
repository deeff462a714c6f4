#!/usr/bin/env bash
# Issue 3's GPU checks in one call on a lent device machine (which starts bare and reaches no network). It
# uses that machine's own python3 (torch, timm, scikit-learn, pytest are there) and vitkit from src/; CIFAR-10
# travels in .gpu/, which git ignores. Here, before the call:
#   mkdir -p .gpu && cp ../shared/data/cifar10/train.tar.gz .gpu/train.tar.gz      (16 MB)
# then the device tool's run with command "bash benchmarks/gpu_check.sh", carry [".gpu"], timeout_s 600.
# Each check has its own time limit (595 s at most together; three times that with QUICK); a failed check is recorded and the next
# one runs. $OUT gets summary.txt (a line per check), checks.log (every check's output) and the CIFAR-10
# run's metrics.csv and curves (the tool brings back 8 files at most).
# Without a GPU, `DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh` walks the same steps, shortened.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-}  # shorter budgets and fewer repeats, for trying the script out
PY=${PYTHON:-python3}
W=$(mktemp -d)
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
mkdir -p "$OUT"
: >"$OUT/summary.txt"; : >"$OUT/checks.log"

check() {  # check NAME SECONDS FUNCTION: run it with a time limit, its output to checks.log, one summary line
  local name=$1 limit=$2; shift 2
  [ -n "$QUICK" ] && limit=$((limit * 3))  # a CPU walks through the checks slowly
  local t0=$SECONDS
  timeout "$limit" bash -c "$*" >"$W/$name.log" 2>&1  # timeout signals the check's whole process group
  local rc=$?
  { echo "===== $name (rc $rc)"; cat "$W/$name.log"; } >>"$OUT/checks.log"
  printf '%-8s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$W/$name.log")" | tee -a "$OUT/summary.txt"
}

vitkit() { "$PY" -m vitkit "$@"; }
evaluate() {  # vitkit eval ... --json, the whole result in the log, then "top1 ... top5 ... n ..." as its last line
  vitkit eval --json "$@" >"$W/eval.json" && cat "$W/eval.json" &&
    "$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); print("top1 %(top1).4f top5 %(top5).4f n %(n)d, %(split)s, tta %(tta)s" % r)' "$W/eval.json"
}

info() {
  nvidia-smi -L || true
  "$PY" - "$DEVICE" <<'PY'
import sys, torch, timm
d = torch.device(sys.argv[1])
name = torch.cuda.get_device_name(d) if d.type == "cuda" else "cpu"
bf16 = torch.cuda.is_bf16_supported() if d.type == "cuda" else "n/a"
print(f"torch {torch.__version__}, timm {timm.__version__}, {name}, bf16 {bf16}")
PY
}

# the README's main job on the device: train on digits, evaluate the held-out split
digits() {
  vitkit train --data digits --recipe recipes/digits.yaml --device "$DEVICE" --out "$W/digits" &&
    evaluate --data digits --weights "$W/digits/best.safetensors" --device "$DEVICE" --out "$W/digits"
}

# the CIFAR-10 recipe under a short time budget (bf16 where the GPU has it), then its held-out accuracy
cifar() {
  vitkit train --data .gpu/train.tar.gz --recipe recipes/cifar10.yaml --device "$DEVICE" --out "$W/cifar" \
      --time-budget "$([ -n "$QUICK" ] && echo 0.5 || echo 2)" &&
    cp "$W/cifar/metrics.csv" "$OUT/cifar-metrics.csv" && cp "$W"/cifar/*.png "$OUT/" &&
    evaluate --data .gpu/train.tar.gz --weights "$W/cifar/last.safetensors" --device "$DEVICE" --tta flip --out "$W/cifar-eval"
}

# the committed checkpoint on the device: the held-out accuracy BENCHMARKS records on CPU (fp32, no TTA)
zoo() {
  evaluate --data .gpu/train.tar.gz --weights zoo/cifar10-vit.safetensors --device "$DEVICE" --amp none --out "$W/zoo-eval"
}

# kill -9 mid-epoch, then resume: bit-identical on CPU; this shows whether it is on the GPU too
resume() {
  "$PY" -m pytest -x -q -p no:cacheprovider tests/test_train_resume.py
}

# one process under torchrun: the NCCL / GPU-per-rank path of a multi-GPU run
torchrun1() {
  "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m vitkit train --data digits \
    --recipe recipes/digits.yaml --epochs 3 --device "${DEVICE%%:*}" --out "$W/torchrun" &&
    evaluate --data digits --weights "$W/torchrun/last.safetensors" --device "$DEVICE" --out "$W/torchrun"
}

# training throughput against timm in bf16, both models at bench_train's batches (each peer in its own process)
bench() {
  if [ -n "$QUICK" ]; then set -- --models cifar --repeats 2; else set -- --repeats 20; fi
  "$PY" benchmarks/bench_train.py --device "$DEVICE" --amp bf16 "$@"
}

export PY DEVICE QUICK W OUT
export -f vitkit evaluate info digits cifar zoo resume torchrun1 bench
check info 30 info
check digits 75 digits
check bench 140 bench
if [ -f .gpu/train.tar.gz ]; then check cifar 160 cifar; check zoo 50 zoo; else echo "cifar, zoo: no .gpu/train.tar.gz" | tee -a "$OUT/summary.txt"; fi
check resume 90 resume
check torchrun 50 torchrun1
rm -rf "$W"
