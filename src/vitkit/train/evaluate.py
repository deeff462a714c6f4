"""`vitkit eval`: top-1, top-5 and per-class accuracy of a checkpoint on a labelled dataset, and its
confusion matrix as a picture. Dataset classes are matched to the checkpoint's classes by name.

The `evaluate` function is also what training validates with.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

log = logging.getLogger("vitkit")


@dataclass
class EvalResult:
    confusion: torch.Tensor  # (K, K) counts; rows: true class, columns: predicted class
    top5_correct: int
    loss_sum: float
    class_names: list[str]
    skipped: list[str] = field(default_factory=list)
    data: str = ""  # what was evaluated (set by evaluate_model)
    split: str = ""

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    @property
    def top1(self) -> float:
        return float(self.confusion.diag().sum()) / max(self.n, 1)

    @property
    def top5(self) -> float:
        return self.top5_correct / max(self.n, 1)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n, 1)

    def per_class(self) -> dict[str, dict]:
        """Accuracy and count of every class that has samples."""
        counts = self.confusion.sum(1)
        return {name: {"accuracy": float(self.confusion[i, i]) / int(counts[i]), "n": int(counts[i])}
                for i, name in enumerate(self.class_names) if counts[i]}

    def to_json(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "n": self.n, "loss": self.loss,
                "per_class": self.per_class(), "skipped": self.skipped}


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 in hardware: GPUs that report it; CPUs with AVX-512 bf16 or AMX. On an
    AVX2-only CPU bf16 matmuls and convolutions fall back to slow reference kernels (a bf16 training step of the
    CIFAR-10 model measured 10x slower than fp32 there)."""
    if device.type == "cuda":  # Ampere (sm80) or later; is_bf16_supported() also says True for the emulated bf16
        # of a V100 / T4, several times slower than fp32 there
        return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                              "_is_amx_tile_supported"))
    return False


def training_precision(device: torch.device, amp: str) -> str:
    """train.amp resolved: 'auto' is bf16 where it is native (on such CPUs it trained about 2.4x faster than
    fp32), else full precision ('none')."""
    if amp == "auto":
        return "bf16" if native_bf16(device) else "none"
    if amp == "bf16" and not native_bf16(device):
        why = "a GPU older than Ampere: fp16 is its fast precision" if device.type == "cuda" else "no AVX-512 bf16/AMX"
        log.warning("train.amp=bf16 on a %s without native bf16 (%s): expect it to run several times slower than "
                    "train.amp=none", device.type.upper(), why)
    return amp


def autocast(device: torch.device, amp: str):
    """bf16/fp16 autocast, or nothing. 'auto': bf16 on a GPU that has it, full precision on a CPU."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and native_bf16(device) else "none"
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def eval_loader(dataset, transform, batch_size: int, workers: int, rank: int = 0, world: int = 1) -> DataLoader:
    """In order, each rank taking every world-th image (no padding, so nothing is counted twice)."""
    from ..data.datasets import ShardStream, Transformed, collate, worker_init

    if isinstance(dataset, ShardStream):
        ds = dataset.configure(transform, rank=rank, world=world, batch=batch_size)
    else:
        ds = Transformed(Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset, transform)
    return DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate, worker_init_fn=worker_init)


@torch.no_grad()
def evaluate(model, loader, class_names: list[str], device: torch.device, amp: str = "none",
             channels_last: bool = False, dist=None, progress: bool = False, tta: str = "none") -> EvalResult:
    from tqdm import tqdm

    from ..predict import tta_logits

    k = len(class_names)
    was_training = model.training
    model.eval()
    confusion = torch.zeros(k, k, dtype=torch.long, device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # top-5 correct, loss
    skipped: list[str] = []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # an FSDP-sharded model all-gathers its weights in every forward pass, so every rank must make as many: ranks
    # whose share of the data is used up (or whose batch was unreadable) join the others with a blank image
    lockstep = dist is not None and dist.world > 1 and _sharded(model)
    bar = tqdm(_in_lockstep(loader, dist) if lockstep else loader, desc="eval", leave=False, unit="batch",
               disable=None if progress else True)  # None: a terminal only, so piped output and logs get no bar
    for x, y, bad in bar:
        skipped += bad
        if x is None:
            if lockstep:
                with autocast(device, amp):
                    tta_logits(model, torch.zeros(1, model.cfg.in_chans, *model.cfg.img_size, device=device), tta)
            continue
        x, y = x.to(device, non_blocking=True).contiguous(memory_format=fmt), y.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = tta_logits(model, x, tta)
        logits = logits.float()
        confusion.index_put_((y, logits.argmax(1)), torch.ones_like(y), accumulate=True)
        sums[0] += (logits.topk(min(5, k), dim=1).indices == y[:, None]).any(1).sum()
        sums[1] += F.cross_entropy(logits, y, reduction="sum")
    if dist is not None:
        dist.sum(confusion), dist.sum(sums)
    model.train(was_training)
    return EvalResult(confusion.cpu(), int(sums[0]), float(sums[1]), class_names, skipped)


def _sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _in_lockstep(loader, dist):
    """The loader's batches, then (None, None, []) until every rank's are used up (one all-reduce per batch)."""
    batches = iter(loader)
    while True:
        item = next(batches, None)
        if not dist.any(item is not None)[0]:
            return
        yield item if item is not None else (None, None, [])


# --- the command ----------------------------------------------------------------------------------------
def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import add_model_arguments
    from ..predict import add_tta_argument

    p.add_argument("--data", required=True,
                   help="ImageFolder dir (its val/ or valid/, else its test/, else all of it), .tar(.gz), digits, "
                        "cifar10, cifar100, or WebDataset shards")
    add_model_arguments(p)
    p.add_argument("--val-split", type=float,
                   help="evaluate only this held-out fraction (default: the split recorded in the checkpoint "
                        "when DATA is its training data)")
    p.add_argument("--split-seed", type=int, help="seed of the held-out split (default: the checkpoint's, or 0)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, help="image-decoding processes (default: none for data decoded in "
                                                "memory, else up to 4)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto")
    p.add_argument("--data-root", help="where torchvision's CIFAR lives (downloaded there when online)")
    p.add_argument("--out", default=".", help="folder for confusion.png and confusion.csv (default: current folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object (top1, top5, n, per_class, ...)")
    add_tta_argument(p)


def run_data(weights: str | None) -> dict:
    """What a vitkit training run recorded in its checkpoint about its data (path, split, held-out files)."""
    from ..weights.hub import fetch, is_remote
    from ..weights.vitkit_format import read_metadata

    if not weights or not str(weights).endswith(".safetensors"):
        return {}
    local = fetch(str(weights)) if is_remote(str(weights)) else Path(weights)  # a URL's download (cached)
    return ((read_metadata(local) or {}).get("data")) or {}


def recorded_split(weights: str | None, data: str, rec: dict | None = None) -> dict:
    """The held-out split a vitkit training run recorded in its checkpoint (`rec`: run_data's, when read
    already), if DATA is that run's data."""
    rec = run_data(weights) if rec is None else rec
    here, there = Path(data), Path(rec.get("path", ""))
    if rec.get("resolved") and here.exists():  # a local path: the same place, whichever the working directory
        same = Path(rec["resolved"]) == here.resolve()
    else:  # recorded by an older version: a relative path is taken as relative to this working directory
        same = rec.get("path") == data or (here.exists() and there.resolve() == here.resolve())
    same = same or (here.is_file() and here.name == there.name and here.stat().st_size == rec.get("bytes"))
    return rec if same else {}


def evaluate_model(model, data: str, *, weights: str | Path | None = None, val_split: float | None = None,
                   split_seed: int | None = None, batch_size: int = 256, workers: int | None = None,
                   amp: str = "auto", tta: str = "none", data_root: str | None = None,
                   progress: bool = False, channels_last: bool | None = None) -> EvalResult:
    """`vitkit eval` from Python: a model (or the path of a vitkit checkpoint) on DATA (what `vitkit train` takes),
    classes matched by name. When DATA is the data the checkpoint (`weights`: its path, for a model given as
    such) was trained on, its held-out split is evaluated unless val_split says otherwise. Returns top1, top5,
    loss, n, per_class(), the confusion matrix. Problems with the data or the arguments raise ValueError
    (DataError) before any work. channels_last converts the model in place (faster convolutions); by default
    only a model this function loads itself and only if it has a convolutional stem: a model passed in is left
    as it is."""
    from ..api import load_model
    from ..data.datasets import DataError, describe, fingerprint, in_memory, open_data, relabel, stratified_split
    from ..data.images import check_rgb_model, eval_transform
    from ..predict import TTA, imagenet_wnids

    data = os.fspath(data)
    problems = [(f"--batch-size {batch_size}", "must be an integer >= 1")
                if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1 else None,
                (f"--workers {workers}", "must be an integer >= 0") if workers is not None and (
                    isinstance(workers, bool) or not isinstance(workers, int) or workers < 0) else None,
                (f"--split-seed {split_seed}", "must be an integer in [0, 2**63)") if split_seed is not None and (
                    isinstance(split_seed, bool) or not isinstance(split_seed, int)
                    or not 0 <= split_seed < 2**63) else None,
                (f"--amp {amp}", "must be one of auto, bf16, fp16, none")
                if amp not in ("auto", "bf16", "fp16", "none") else None,
                (f"--tta {tta}", f"must be one of {', '.join(TTA)}") if tta not in TTA else None]
    if problem := next((p for p in problems if p), None):
        raise DataError(f"{problem[0]}: {problem[1]}")
    if isinstance(model, (str, Path)):
        weights, model = model, load_model(model)
        channels_last = has_conv_stem(model) if channels_last is None else channels_last
    try:
        check_rgb_model(model)
    except ValueError as e:
        raise DataError(f"--weights {weights}: {e}" if weights else str(e)) from None
    model = model.eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    device = next(model.parameters()).device
    if val_split is not None and (isinstance(val_split, bool) or not isinstance(val_split, (int, float))
                                  or not 0 <= val_split < 1):
        raise DataError(f"--val-split {val_split}: must be in [0, 1) (0: evaluate everything)")
    rec = run_data(weights and str(weights))
    split = recorded_split(weights and str(weights), data, rec)
    # elsewhere (copied, moved, renamed), the run's data is known by its held-out files, drawn again
    moved = rec if not split and val_split is None and split_seed is None and rec.get("val_split") and \
        rec.get("held_out") else {}
    val_split = val_split if val_split is not None else split.get("val_split", 0.0)
    split_seed = split_seed if split_seed is not None else split.get("split_seed", 0)
    ds = open_data(data, val_split=val_split, split_seed=split_seed, root=data_root, evaluate_only=True,
                   preload=(split or moved).get("preload", "auto"))
    if moved and ds.val_name == "all" and (labels := getattr(ds.val, "labels", None)) is not None:
        _, held = stratified_split(labels, moved["val_split"], moved["split_seed"])
        if fingerprint(part := Subset(ds.val, held.tolist())) == moved["held_out"]:
            log.warning("%s holds the files %s was trained on (its data was %s): evaluating the %.0f%% it held out "
                        "(seed %d), as there; --val-split 0 scores everything", data, weights, moved["path"],
                        100 * moved["val_split"], moved["split_seed"])
            split, val_split, split_seed = moved, moved["val_split"], moved["split_seed"]
            ds.val, ds.val_name = part, f"held-out {val_split:.0%} (seed {split_seed})"
            ds.split.update(val_split=val_split, split_seed=split_seed, held_out=moved["held_out"])
    names = model.class_names
    if model.cfg.num_classes == 1000 and set(ds.class_names) <= set(imagenet_wnids()) \
            and not set(ds.class_names) <= set(names or ()):  # (names such as transformers' "tench, Tinca tinca")
        names = imagenet_wnids()  # ImageNet folders (n01440764/...) for an ImageNet-1k head: matched by WordNet ID
    if names is None:  # a checkpoint without class names: only positions can be matched
        if len(ds.class_names) != model.cfg.num_classes:
            raise DataError(f"--weights {weights}: the checkpoint names no classes and has {model.cfg.num_classes}, "
                            f"the data {len(ds.class_names)}; cannot match them")
        log.warning("the checkpoint names no classes: matching the data's %d classes by position", len(ds.class_names))
        names = ds.class_names
    same_split = (val_split, split_seed) == (split.get("val_split"), split.get("split_seed"))
    if same_split and split.get("held_out") and ds.split.get("held_out") not in (None, split["held_out"]):
        log.warning("%s changed since %s was trained (files added, removed or renamed): its held-out %.0f%% is drawn "
                    "from other files now, so these may include images it trained on", data, weights,
                    100 * split["val_split"])
    if not same_split and split.get("val_split") and isinstance(ds.val, Subset):  # another split of the run's data
        _, run_held = stratified_split(ds.val.dataset.labels, split["val_split"], split["split_seed"])
        if trained := len(set(ds.val.indices) - set(run_held.tolist())):
            log.warning("%d of these %d images are ones %s trained on: it held out %.0f%% with seed %d (eval takes "
                        "that split unless --val-split or --split-seed say otherwise)", trained, len(ds.val),
                        weights, 100 * split["val_split"], split["split_seed"])
    ds = relabel(ds, names)
    what = ds.val_name
    if split and what == "all":  # these are the run's training images (it validated elsewhere, or not at all)
        log.warning("%s is the data %s was trained on (%s): these are training images", data, weights,
                    f"it validated on {split['val']}" if split.get("val") else
                    f"--val-split 0: its held-out {split['val_split']:.0%} among them" if split.get("val_split") else
                    "without a held-out part")
    log.info("evaluating on %s: %s", describe(ds), what)
    workers = workers if workers is not None else 0 if in_memory(ds.val) else min(4, os.cpu_count() or 1)
    loader = eval_loader(ds.val, eval_transform(model.preprocess, model.cfg.img_size), batch_size, workers)
    result = evaluate(model, loader, list(names), device, amp, bool(channels_last), progress=progress, tta=tta)
    result.skipped = ds.skipped + result.skipped  # found while preloading, and while evaluating
    if not result.n:
        raise DataError(f"{data}: none of its images could be read ({len(result.skipped)} unreadable, e.g. "
                        f"{min(result.skipped, default='?')})")
    result.data, result.split = ds.name, what
    return result


def has_conv_stem(model) -> bool:
    """A ResNet or a stack of convolutions before the patches: channels-last makes evaluating these faster
    (the CIFAR-10 recipe's model: 1.4x, BENCHMARKS.md); a plain ViT gains nothing from it."""
    return bool(model.cfg.conv_stem or model.cfg.hybrid_layers)


def run_eval(args: argparse.Namespace) -> int:
    from ..cli import UserError, check_writable, model_from_args
    from .cli import keep_freed_memory
    from .report import plot_confusion, shown, write_confusion

    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # every rank would score all of it and write the same files
        if int(os.environ.get("RANK", 0)):
            return 2
        raise UserError("vitkit eval runs in one process: start it without torchrun")
    out = Path(args.out)  # checked before any work: an evaluation whose results cannot be written is lost time
    check_writable(out, f"--out {out}: cannot write confusion.png there", folder=True)
    model = model_from_args(args)
    keep_freed_memory()  # as `vitkit train` does: batches reuse the last one's pages instead of faulting in new ones
    try:
        result = evaluate_model(model, args.data, weights=args.weights, val_split=args.val_split,
                                split_seed=args.split_seed, batch_size=args.batch_size, workers=args.workers,
                                amp=args.amp, tta=args.tta, data_root=args.data_root, progress=not args.json,
                                channels_last=has_conv_stem(model))
    except ValueError as e:  # DataError included
        raise UserError(str(e)) from None
    names = result.class_names
    present = sorted({i for i, c in enumerate(result.confusion.sum(1).tolist()) if c} |
                     {i for i, c in enumerate(result.confusion.sum(0).tolist()) if c})
    try:
        out.mkdir(parents=True, exist_ok=True)
        png = plot_confusion(result.confusion[present][:, present], [names[i] for i in present], out / "confusion.png",
                             f"{Path(args.weights).name} on {result.data}: top-1 {result.top1:.2%}")
        table = write_confusion(result.confusion, list(names), out / "confusion.csv")
    except OSError as e:  # the numbers are printed all the same
        log.warning("--out %s: confusion matrix not written (%s)", out, e.strerror or e)
        png = table = None
    if args.json:
        print(json.dumps({**result.to_json(), "data": result.data, "split": result.split, "tta": args.tta,
                          "weights": str(args.weights), "confusion_png": str(png) if png else None,
                          "confusion_csv": str(table) if table else None}))
    else:
        width = max(len(n) for n in result.per_class())
        for name, c in result.per_class().items():
            print(f"  {shown(name):<{width}}  {c['accuracy']:7.2%}  ({c['n']})")
        print(f"top-1 {result.top1:.2%}  top-5 {result.top5:.2%}  loss {result.loss:.4f}  on {result.n} images"
              + (f"  confusion matrix: {png}" if png else ""))
    if result.skipped:
        log.warning("%d unreadable images skipped:\n  %s", len(result.skipped), "\n  ".join(result.skipped))
    return 0
