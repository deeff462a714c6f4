"""The training loop, top to bottom: data -> model -> optimizer -> steps -> evaluate/save each epoch.

Never lose a run: the training state (model, optimizer, EMA, scaler, step, RNG states, data position) is
written atomically every epoch, every `checkpoint_minutes` and on SIGTERM/SIGINT (the one before it kept as
state.prev.pt, to go back to after a divergence); `--resume` continues from it exactly, mid-epoch included,
because the data order and every augmentation draw are functions of (seed, epoch, index) and the learning rate
is a function of (step, total_steps).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..data.augment import BatchShiftFlip, batch_mixer, train_transform
from ..data.datasets import (BUILTIN, ShardStream, Transformed, collate, describe, fingerprint, is_shards, open_data,
                             worker_init)
from ..data.images import eval_transform
from ..files import replacing
from ..models.convstem import ConvStem
from ..models.registry import build_config
from ..models.vit import ViT, ViTConfig
from .distributed import Dist, full_state, load_full_state, wrap
from .evaluate import autocast, eval_loader, evaluate, training_precision
from .recipe import PREPROCESS_KEYS, RecipeError, model_fields, not_rgb, to_yaml
from .report import Metrics, plot_curves
from .rundir import (BEST, LAST, PREV, RECIPE, STATE, atomic_save, keep_previous, last_good, lock_run_dir,
                     readable_export, recorded_best, rng_state, set_rng_state, stop_signals)

log = logging.getLogger("vitkit")
PROBE_STEPS = 20  # steps timed (after 3 warm-up steps) to fit the schedule into a time budget


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss); the message says where and what is still on disk. `together`:
    every rank of a distributed run raises it at the same step (they agree on it before stopping)."""

    def __init__(self, message: str, together: bool = True):
        super().__init__(message)
        self.together = together


# --- building blocks ------------------------------------------------------------------------------------
def build_model(m: dict, class_names: list[str]) -> ViT:
    """From a checkpoint (fine-tuning: zero head for new classes, positions resampled; one that says its
    architecture, as vitkit's, transformers' and timm's hub files do, brings it), a name, or fields."""
    from .. import create_model, load_model
    from ..api import says_its_architecture
    from ..weights import CheckpointError, read_checkpoint

    fields, k = model_fields(m), len(class_names)
    own = m["weights"] and says_its_architecture(m["weights"])  # its architecture, whatever model.name says
    if fields.get("representation_size") == "width":  # as wide as the model that is built
        fields["representation_size"] = fields.get("width") or (
            read_checkpoint(m["weights"]).config.get("width") if own else
            build_config(m["name"])[0].width if m["name"] else ViTConfig.width)
    try:
        if own:
            if m["name"]:
                log.warning("%s: says its own architecture, built as it does (model.name %s not used)", m["weights"],
                            m["name"])
            model = load_model(m["weights"], pos_resample=m["pos_resample"], **{**fields, "num_classes": k})
        elif m["name"]:
            model = create_model(m["name"], weights=m["weights"],  # (a recipe's pos_resample waits for weights)
                                 pos_resample=m["pos_resample"] if m["weights"] else None,
                                 **{**fields, "num_classes": k})
        elif m["weights"]:
            raise RecipeError(f"model.weights {m['weights']}: does not say its architecture, so set model.name too "
                              f"(--model)")
        else:
            model = ViT(ViTConfig(**fields, num_classes=k))
    except CheckpointError as e:  # its hints name fields as the other commands take them: here they are model.*
        text = re.sub(r"; create_model\(\.\.\., [^)]*\)", "", str(e))  # (train takes recipe values, not these)
        raise CheckpointError(re.sub(r"--set (?=\w+=)", "--set model.", text)) from None
    if problem := not_rgb(m["weights"], model.cfg.in_chans):  # (the recipe check sees a vitkit file's alone)
        raise RecipeError(problem)
    other_classes = model.class_names is not None and model.class_names != list(class_names)
    if m["weights"] and (m["zero_head"] or other_classes):  # the paper's zero-initialised head for new classes,
        if model.head.weight.any():  # even when as many (a head of another size was replaced when loading)
            log.warning("%s: head replaced by a zero-initialised one (%s)", m["weights"],
                        "the data's classes are not the checkpoint's" if other_classes else "model.zero_head")
        model.reset_head(k)
    elif m["weights"] and model.class_names is None and model.head.weight.any():  # as many classes, unnamed
        log.warning("%s: its %d-class head is kept, its classes taken as the data's in order (%s); "
                    "--set model.zero_head=true replaces it", m["weights"], k,
                    ", ".join(class_names[:3]) + ", ..." * (k > 3))
    preprocess = {key: m[key] for key in PREPROCESS_KEYS if m[key] is not None}
    if m["weights"] and model.stated_stats:  # weights expect inputs normalised their way, whatever the recipe says
        ignored = [key for key in ("mean", "std") if tuple(preprocess.pop(key, model.preprocess[key])) !=
                   tuple(model.preprocess[key])]
        if ignored:
            log.warning("%s: keeps its own input normalisation (%s), not the recipe's model.%s", m["weights"],
                        ", ".join(f"{key} {list(model.preprocess[key])}" for key in ignored), "/".join(ignored))
    model.preprocess.update(preprocess)
    model.class_names = list(class_names)
    model.multi_label = False  # trained with cross-entropy over the classes: one of them
    return model.train()


def whiten_stem(model: ViT, train, seed: int, most: int = 1000, patches: int = 1_000_000) -> int:
    """model.stem_init whiten: the first conv_stem layer from training images drawn with the run's seed: `most`,
    fewer where they hold more than about `patches` 3x3 patches (at 224 px 20, not gigabytes); how many."""
    h, w = model.cfg.img_size
    n = min(len(train), most, max(1, patches // ((h - 2) * (w - 2))))  # 1 image of 1024 px: 1M patches
    images = Transformed(train, eval_transform(model.preprocess, model.cfg.img_size))
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    x, _, _ = collate([images[i] for i in pick])
    if x is not None:  # else (every one unreadable) the default initialisation; training reports them
        model.patch_embed.backbone.whiten_(x.to(next(model.parameters()).device))
    return n


def make_optimizer(model: torch.nn.Module, o: dict) -> torch.optim.Optimizer:
    """Weight decay on weight matrices only: not on biases, norms, position embeddings, the [class] or distillation
    token (timm/DeiT's no_weight_decay)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in model.no_weight_decay() else decay).append(p)
    groups = [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    # torch's default on CPU is a Python loop over the tensors (its foreach kernels are GPU-only); the fused
    # kernel (CPU and GPU) does the whole update in one pass. Sharded (DTensor) parameters keep the default.
    fused = all(type(p) is torch.nn.Parameter for p in decay + no_decay) or None
    lr = peak_lr(o["lr"], 1)  # a start: the schedule sets the learning rate of every step
    if o["name"] == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o["momentum"], nesterov=o["nesterov"], fused=fused)
    cls = torch.optim.AdamW if o["name"] == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr, betas=tuple(o["betas"]), fused=fused)


def batch_scale(r: dict) -> float:
    """How optim.lr scales with the batch: data.batch_size / optim.lr_batch (1 without lr_batch)."""
    lr_batch = r["optim"].get("lr_batch")
    return r["data"]["batch_size"] / lr_batch if lr_batch else 1.0


def warmup_length(total: int, s: dict) -> int:
    return min(max(s["warmup_steps"], round(s["warmup_fraction"] * total)), max(total - 1, 0))


def peak_lr(lr: float | list, epochs: float, batch_scale: float = 1.0) -> float:
    """optim.lr for a run of `epochs` (its planned length: train.epochs, or what a time budget fits), times
    batch_scale (data.batch_size / optim.lr_batch). A list of [epochs, lr] pairs holds peaks tuned for runs of
    those lengths (a longer run wants a lower one): between two pairs the power law through them (straight on
    log-log axes), beyond the ends the nearest pair's."""
    if not isinstance(lr, list):
        return lr * batch_scale
    (e0, lr0), *rest = pairs = sorted(lr)
    epochs = min(max(epochs, e0), pairs[-1][0])
    for e1, lr1 in rest:
        if epochs <= e1:
            return lr0 * (lr1 / lr0) ** (math.log(epochs / e0) / math.log(e1 / e0)) * batch_scale
        e0, lr0 = e1, lr1
    return lr0 * batch_scale  # a single pair


def lr_at(step: int, total: int, s: dict, base_lr: float, start: tuple | None = None) -> float:
    """Linear warm-up, then cosine / linear decay to min_lr (or constant). `start` (step, lr): a time-budget
    run's warm-up, which ran by the clock until the schedule was first fitted (warmup_by_clock) and whose end
    moves with every fit, rises on from the learning rate it had at the last fit."""
    s0, lr0 = start or (0, 0.0)
    end = warmup_length(total, s)
    if s0 <= step < end:
        return lr0 + (base_lr - lr0) * (step + 1 - s0) / (end - s0)
    # progress after this step, as vit_jax's schedule (1-based steps): the last step (total - 1) is at min_lr
    p = min((step + 1 - end) / max(total - end, 1), 1.0)
    shape = {"cosine": 0.5 * (1 + math.cos(math.pi * p)), "linear": 1 - p, "constant": 1.0}[s["name"]]
    return s["min_lr"] + (base_lr - s["min_lr"]) * shape


def warmup_by_clock(step: int, seconds: float, seconds_to_train: float, s: dict, base_lr: float,
                    limit: int) -> float:
    """The warm-up of a time-budget run before its steps are timed, when its length is not known yet: a
    warm-up given as a fraction of the steps runs by the clock meanwhile (that fraction of the time there is to
    train), so that it is as long as the one the fitted schedule then continues (lr_at). No fit exceeds the step
    limit (train.epochs, train.max_steps), so no warm-up is slower than the limit's, and past its end every
    warm-up is over: the limit's schedule goes on (a run that reaches the limit unfitted ends at min_lr)."""
    slowest = lr_at(step, limit, s, base_lr)
    if step >= warmup_length(limit, s):
        return slowest
    ramps = [base_lr * (step + 1) / s["warmup_steps"]] if s["warmup_steps"] else []  # the longer warm-up wins
    if s["warmup_fraction"]:
        ramps.append(base_lr * seconds / max(s["warmup_fraction"] * seconds_to_train, 1e-9))
    return max(min([base_lr, *ramps]), slowest)


def ema_model(model: torch.nn.Module, decay: float):
    """Exponential moving average of the weights; the decay is min(decay, (1+n)/(10+n)) at update n: a cap reached
    after about (10 decay - 1)/(1 - decay) updates (9,000 for 0.999)."""
    from torch.optim.swa_utils import AveragedModel

    def update(averaged, current, n):  # called once per (device, dtype) group
        if not averaged[0].is_floating_point():  # BatchNorm's num_batches_tracked: a count, copied
            torch._foreach_copy_(averaged, current)
            return
        d = min(decay, (1 + float(n)) / (10 + float(n)))
        torch._foreach_lerp_(averaged, current, 1 - d)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


class EpochSampler(DistributedSampler):
    """DistributedSampler yielding (epoch, index) keys, optionally from a position within the epoch."""

    def __init__(self, dataset, world: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self):
        return ((self.epoch, i) for i in list(super().__iter__())[self.start:])

    def __len__(self):
        return self.num_samples - self.start


def pick_attention(name: str | None, device: torch.device, amp: str, tokens: int) -> str | None:
    """The scaled_dot_product_attention kernel a run pins ("math", "flash", "efficient"; None: torch chooses).
    "auto": on a CPU under bf16/fp16 autocast, for sequences of up to 160 tokens, the unfused "math" kernel:
    there its backward pass beats the fused flash kernel's (whole steps 1.31x faster at 65 tokens, 1.10x at 145,
    0.95x at 197: BENCHMARKS.md, training throughput); elsewhere torch's choice."""
    if name == "auto":
        return "math" if device.type == "cpu" and amp in ("bf16", "fp16") and tokens <= 160 else None
    if name == "flash" and device.type == "cuda" and amp not in ("bf16", "fp16"):  # CUDA's flash kernel: fp16/bf16
        raise RecipeError("train.attention=flash on a GPU needs train.amp bf16 or fp16 (its flash kernel has no "
                          "fp32); use efficient or default")
    return None if name == "default" else name


def attention_kernel(kernel: str | None):
    """Pin scaled_dot_product_attention to one implementation (None: leave torch's choice)."""
    if kernel is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([{"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                         "efficient": SDPBackend.EFFICIENT_ATTENTION}[kernel]])


# --- the run --------------------------------------------------------------------------------------------
def train(r: dict, run_dir: Path, state: dict | None = None) -> int:
    """Train as the recipe says into run_dir; `state`: the run's training state (read_state), to resume it.

    The run directory's lock and the TensorBoard writer are released however the run ends: a TrainingError kept
    by the caller (an interactive session keeps the last traceback, and with it the frame's locals) must not
    keep the directory locked against `train_model(resume=...)` in the same process."""
    held: dict = {}
    try:
        return _train(r, run_dir, state, held)
    except TrainingError as stopped:  # the curves up to the last epoch, as a run that ends otherwise leaves them
        if held.get("metrics") is not None and held["metrics"].enabled:
            try:
                plot_curves(held["metrics"].csv_path, run_dir / "curves.png")
            except Exception as e:  # a full disk, say: the TrainingError is the message that matters
                log.warning("curves.png not drawn (%s)", e)
        # every rank meets it: the others wait for rank 0's curves, as torchrun stops the rest once one rank has
        # left, before rank 0 could say why
        if held.get("dist") is not None and stopped.together:
            try:
                held["dist"].barrier()
            except Exception:  # a rank gone after all: the TrainingError is still the message
                pass
        raise
    finally:
        if held.get("metrics") is not None:
            held["metrics"].close()
        if held.get("lock") is not None:
            held["lock"].close()


def _train(r: dict, run_dir: Path, state: dict | None, held: dict) -> int:
    resume = state is not None
    t0 = time.time()
    M, D, A, O, T = r["model"], r["data"], r["augment"], r["optim"], r["train"]
    try:
        d = held["dist"] = Dist.init(T["device"])
    except RecipeError:
        raise
    except ValueError as e:
        raise RecipeError(f"train.device (--device) {e}") from None

    # data: every problem with it is reported here, before any work
    started_in = (state or {}).get("cwd") or os.getcwd()
    here = {k: D[k] and _where(D[k], started_in) for k in ("path", "val", "root", "cache_dir")}
    data = open_data(here["path"], val=here["val"], val_split=D["val_split"], split_seed=D["split_seed"],
                     root=here["root"], preload=D["preload"], cache_dir=here["cache_dir"],
                     shards={"epoch_size": D["epoch_size"], "shuffle_buffer": D["shuffle_buffer"]})
    names = data.class_names
    sizes = [len(ds) if ds is not None else 0 for ds in (data.train, data.val)]
    files = [fingerprint(ds) for ds in (data.train, data.val)]  # which images: as many others would also move
    if state is not None and state["class_names"] != names:
        raise RecipeError(f"--resume: the data's classes {names[:5]}... differ from the run's "
                          f"{state['class_names'][:5]}...")
    if state is not None and state.get("data_sizes", sizes) != sizes:  # steps would land elsewhere in an epoch
        raise RecipeError(f"--resume: the data changed since the run started ({state['data_sizes'][0]} training and "
                          f"{state['data_sizes'][1]} validation images then, {sizes[0]} and {sizes[1]} now); start a "
                          f"new run from it with --weights {run_dir / LAST}")
    if state is not None and any(a and b and a != b for a, b in zip(state.get("data_files", files), files)):
        # as many images, other ones (None: not known, e.g. from a preload cache of an older version)
        raise RecipeError(f"--resume: the data changed since the run started (as many images, but other files: "
                          f"added, removed or renamed); start a new run from it with --weights {run_dir / LAST}")
    accum = O["accum_steps"]
    micro, rest = divmod(D["batch_size"], d.world * accum)
    if rest or not micro:
        fits = [n for n in range(1, D["batch_size"] // accum + 1) if D["batch_size"] % (n * accum) == 0]
        raise RecipeError(f"data.batch_size (--batch-size) {D['batch_size']} is not divisible by {d.world} "
                          f"process{'es' * (d.world != 1)} x {accum} accumulation step{'s' * (accum != 1)}"
                          + (f"; this run's batch divides among {', '.join(map(str, fits[:12]))} processes"
                             if state is not None else ""))
    stream = isinstance(data.train, ShardStream)
    n_train = len(data.train)
    steps_per_epoch = n_train // D["batch_size"]
    if steps_per_epoch == 0:
        raise RecipeError(f"data.batch_size {D['batch_size']} is larger than the {n_train} training images")

    # model, optimizer, EMA, precision
    torch.manual_seed(T["seed"])  # the same initial weights on every rank
    # a resume builds the run's own model (the state's weights go in below), never from the file it started from:
    # from its last export, or where none is readable yet (killed before the first epoch ended), as the state says
    exported = resume and readable_export(run_dir / LAST)
    recorded = state.get("model_meta") if resume and not exported else None
    if exported:
        M = {**M, "weights": str(run_dir / LAST), "name": None, "zero_head": None}
    elif recorded:
        M = {**M, **{k: v for k, v in recorded["config"].items() if k in M}, "weights": None, "name": None,
             "zero_head": None}
    model, problem = None, None  # a problem of one rank (its memory, its GPU) is said by all, below
    try:
        model = build_model(M, names).to(d.device)
        if recorded:
            model.preprocess, model.pos_resample = dict(recorded["preprocess"]), dict(recorded["pos_resample"])
    except ValueError as e:  # vitkit.api.check_memory: refused before allocating (Linux would kill the process)
        if "too large here" not in str(e):
            raise
        problem = f"model: {e}; check model.img_size (--img-size) and the model's size"
    except (MemoryError, RuntimeError) as e:  # img_size 100000: position embeddings beyond any memory
        if not isinstance(e, MemoryError) and "alloc" not in str(e):
            raise
        problem = (f"model: too large to build here ({str(e).splitlines()[0][:200]}); check model.img_size "
                   "(--img-size) and the model's size")
    if model is not None and M["stem_init"] and not resume:  # a resume has its weights
        if not isinstance(getattr(model.patch_embed, "backbone", None), ConvStem):
            problem = f"model.stem_init {M['stem_init']} needs a model with a conv_stem"
        elif stream:
            problem = f"model.stem_init {M['stem_init']} needs indexable training data, not WebDataset shards"
        else:
            whiten_stem(model, data.train, T["seed"])
    if model is not None:
        img_size = model.cfg.img_size
        amp = training_precision(d.device, T["amp"])
        tokens = model.num_prefix_tokens + math.prod(model.cfg.grid)
        kernel = pick_attention(T["attention"], d.device, amp, tokens)  # a RecipeError before any work
        if T["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        model.set_grad_checkpointing(T["grad_checkpointing"])
    # the run directory, locked by rank 0 once everything else checked out; every rank learns whether any rank
    # has a problem before the first collective (wrapping the model)
    lock, made = None, not run_dir.exists()
    if d.main and problem is None:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = held["lock"] = lock_run_dir(run_dir)
        except RecipeError as e:
            problem = str(e)
        except OSError as e:  # read-only, no permission, a file in the way
            problem = f"cannot write the run directory {run_dir} ({e.strerror or e})"
    if d.world > 1:
        problems = [None] * d.world
        torch.distributed.all_gather_object(problems, problem)
        problem = next((f"{p} (rank {r})" if r else p for r, p in enumerate(problems) if p), None)
    if problem:
        if lock is not None:  # another rank's problem: nothing of this run is left behind
            held.pop("lock").close()
            if made:
                shutil.rmtree(run_dir, ignore_errors=True)
        d.close()
        raise RecipeError(problem)
    # going back one save: state.prev.pt stays what it is until the run's first save replaces the later state.pt
    # with the new one (stopped before that, nothing of the run is lost)
    going_back = resume and state["file"] == PREV
    keep_prev = True  # until the disk has no room for it
    if going_back and d.main:
        log.warning("--resume: going back to %s (step %d); %s is replaced by this run's first save", PREV,
                    state["step"], STATE)
    ema = ema_model(model, T["ema_decay"]) if T["ema_decay"] else None
    wrapped = wrap(model, d, T["distributed"])
    sharded = d.world > 1 and T["distributed"] == "fsdp"
    optimizer = make_optimizer(model, O)
    scaler = torch.amp.GradScaler(d.device.type, enabled=amp == "fp16")
    step_model = torch.compile(wrapped) if T["compile"] else wrapped
    eval_model = ema.module if ema is not None else (wrapped if sharded else model)
    mixer = batch_mixer(A, len(names))
    fmt = torch.channels_last if T["channels_last"] else torch.contiguous_format
    train_tf = train_transform(A, img_size, model.preprocess)
    val_loader = None if data.val is None else eval_loader(
        data.val, eval_transform(model.preprocess, img_size), D["eval_batch_size"], D["num_workers"], d.rank, d.world)

    # where we are: fresh, or exactly where the saved state left off
    step, best, elapsed_before, skipped, history = 0, -1.0, 0.0, set(data.skipped), []
    warm_start = tuple(state["warm_start"]) if state is not None and state.get("warm_start") else None  # lr_at

    def peak(steps: int) -> float:  # optim.lr for a run planned at this many steps
        return peak_lr(O["lr"], steps / steps_per_epoch, batch_scale(r))

    total = limit = min(T["epochs"] * steps_per_epoch, T["max_steps"] or sys.maxsize)  # a budget fits total <= limit
    budget = T["time_budget"] * 60 if T["time_budget"] else None  # seconds for the whole run, resumed parts too
    epoch_stats = torch.zeros(3, dtype=torch.float64, device=d.device)  # loss sum, correct, images (this epoch)
    torch.manual_seed(T["seed"] + d.rank)  # per-rank randomness (dropout, mixup) from here on
    if state is not None:
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        load_full_state(wrapped if sharded else model, optimizer, state["model"], state["optimizer"], sharded)
        for group, recipe_settings in zip(optimizer.param_groups, settings):  # the run's moments, and the
            group.update(recipe_settings)  # recipe's hyperparameters: a resume may change weight decay, betas...
        if ema is not None and state["ema"] is not None:
            ema.load_state_dict(state["ema"])
        if state["scaler"]:  # empty: saved by a disabled scaler (a bf16/fp32 run now resumed under fp16)
            scaler.load_state_dict(state["scaler"])
        step, best, elapsed_before = state["step"], state["best_top1"], state["elapsed"]
        # best.safetensors may hold a better evaluation than the state knows: the later ones of a run gone back
        # to state.prev.pt, or one a killed process exported before its state; a new best must beat it too.
        # Without a readable one (removed, or a first save killed before it), the next evaluation writes it.
        best = max(best, recorded_best(run_dir / BEST)) if readable_export(run_dir / BEST) else -1.0
        history = list(state.get("resumed", []))  # resumes that changed recipe values: the recipe alone no
        before = state.get("recipe") or {}  # longer retrains these weights
        if changes := {f"{sec}.{k}": [before[sec].get(k), v] for sec, keys in r.items() for k, v in keys.items()
                       if sec in before and before[sec].get(k) != v}:
            history.append({"step": step, "changed": changes})
            log.info("resumed at step %d with changed values: %s", step,
                     "; ".join(f"{key} {old} -> {new}" for key, (old, new) in changes.items()))
        if budget is not None:  # the fitted schedule goes on, unless the budget or the step limit changed
            changed = any(f"train.{k}" in changes for k in ("time_budget", "epochs", "max_steps"))
            # until the first probe refits it: the mean time per step so far, evaluations and saves included
            total = _fit(step, limit, budget - elapsed_before, elapsed_before / max(step, 1), d) if changed \
                else state["total_steps"]
        skipped |= set(state["skipped"])
        # the saved statistics are every rank's together: counted once, by rank 0
        epoch_stats = (state["epoch_stats"] if d.main else torch.zeros_like(state["epoch_stats"])).to(d.device)
        if step >= total and d.main:
            log.warning("--resume: the run is at step %d of %d already (train.epochs %d, train.max_steps %s%s): "
                        "raise %s to train on", step, total, T["epochs"], T["max_steps"],
                        f", train.time_budget {T['time_budget']:g} min" if budget else "",
                        "--time-budget or --epochs" if budget else "--epochs or --set train.max_steps")
        elif budget is not None and elapsed_before >= 0.95 * budget and d.main:  # more epochs, no time left
            log.warning("--resume: the run's time budget of %g min is spent already (%.1f min trained): raise "
                        "--time-budget to train on", T["time_budget"], elapsed_before / 60)
        elif total != state["total_steps"] and d.main:  # a longer (or shorter) run: the schedule stretches
            before = state.get("recipe") or r  # the schedule and base learning rate it had
            now = lr_at(step, total, r["schedule"], peak(total), warm_start)
            then = lr_at(step, state["total_steps"], before["schedule"],
                         peak_lr(before["optim"]["lr"], state["total_steps"] / steps_per_epoch,
                                 batch_scale(before) if "data" in before else 1.0), warm_start)
            log.warning("--resume: the schedule now ends at step %d instead of %d%s", total, state["total_steps"],
                        f", so the learning rate at step {step} is {now:.3g} instead of {then:.3g}" if
                        f"{now:.3g}" != f"{then:.3g}" else "")
        if state["world"] == d.world:
            set_rng_state(state["rng"][d.rank], d.device)
        elif d.main:
            log.warning("resuming with %d process%s instead of %d: random draws will differ", d.world,
                        "es" * (d.world != 1), state["world"])
    elif d.main:
        with replacing(run_dir / RECIPE) as tmp:  # a restart with --recipe RUN/recipe.yaml reads the one it replaces
            tmp.write_text(to_yaml(r))
    # a fresh run in a directory where an earlier attempt died before its first checkpoint drops that attempt's rows
    metrics = held["metrics"] = Metrics(run_dir, d.main, upto_step=step, defer=going_back)
    if d.main:
        px = f"{img_size[0]}px" if img_size[0] == img_size[1] else f"{img_size[0]}x{img_size[1]}px"
        log.info("%s | %s | %s params | %s | %d steps of %d images (%d per process x %d accumulation) | %s",
                 describe(data), f"ViT {model.cfg.width}w x {model.cfg.depth} @ {px}",
                 f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M",
                 "fp32" if amp == "none" else f"{amp} autocast", total, D["batch_size"], micro, accum,
                 f"resuming at step {step}" if state is not None else f"run dir {run_dir}")
        if isinstance(O["lr"], list) and budget is None:  # a budget's fit says it once the length is known
            log.info("peak lr %.3g for %.1f epochs (optim.lr %s)", peak(total),
                     total / steps_per_epoch, O["lr"])
        if budget is None and total > 1 and (warm := warmup_length(total, r["schedule"])) >= total / 2:
            log.warning("the warm-up takes %d of the run's %d steps%s (schedule.warmup_steps %d, warmup_fraction "
                        "%g): lower it for a run this short", warm, total,
                        ", so the rate falls from its peak to the end in one step" if warm >= total - 1 else "",
                        r["schedule"]["warmup_steps"], r["schedule"]["warmup_fraction"])
        if O["lr_batch"] and not isinstance(O["lr"], list):
            log.info("peak lr %.3g: optim.lr %g for batch %d, scaled to batch %d (optim.lr_batch)", peak(total),
                     O["lr"], O["lr_batch"], D["batch_size"])

    def clock() -> float:
        return elapsed_before + time.time() - t0

    def batches(epoch: int, position: int):
        """The epoch's optimizer steps from `position` on, each a list of `accum` micro-batches."""
        if stream:
            ds = data.train.configure(train_tf, T["seed"], epoch, d.rank, d.world, repeat=True, batch=micro)
            loader = iter(DataLoader(ds, batch_size=micro, num_workers=D["num_workers"], collate_fn=collate,
                                     worker_init_fn=worker_init, generator=torch.Generator().manual_seed(T["seed"])))
            for _ in range(position * accum):  # a stream can only be skipped by reading it
                next(loader)
        else:
            sampler.set_epoch(epoch)
            sampler.start = position * micro * accum
            loader = iter(train_loader)
        for _ in range(steps_per_epoch - position):
            yield [next(loader) for _ in range(accum)]

    if not stream:
        sampler = EpochSampler(data.train, d.world, d.rank, T["seed"])
        batched = BatchShiftFlip.applies(A, data.train, img_size, model.preprocess, T["seed"])
        train_loader = DataLoader(batched or Transformed(data.train, train_tf, T["seed"]), batch_size=micro,
                                  sampler=sampler, drop_last=True, num_workers=D["num_workers"],
                                  collate_fn=batched.collate if batched else collate,
                                  persistent_workers=D["num_workers"] > 0, pin_memory=d.device.type == "cuda",
                                  worker_init_fn=worker_init,
                                  generator=torch.Generator().manual_seed(T["seed"]))  # keeps global RNG untouched

    def save(weights: bool, val=None, improved: bool = False) -> None:
        """The training state; with `weights` also last.safetensors (and best.safetensors when val `improved` on
        every earlier evaluation: the epoch the log marks with *, the first of equal ones)."""
        nonlocal going_back
        model_sd, optim_sd = full_state(wrapped if sharded else model, optimizer, sharded)
        rngs = [rng_state(d.device)]
        if d.world > 1:
            rngs = [None] * d.world
            torch.distributed.all_gather_object(rngs, rng_state(d.device))
        everywhere = gather_skipped()  # and the whole epoch's statistics so far, every rank's
        stats = d.sum(epoch_stats.clone()).cpu()
        problem = failure = None
        if d.main:
            try:
                problem = write_or_say(weights, val, improved, model_sd, optim_sd, rngs, everywhere, stats)
            except Exception as e:  # not the disk: a bug, said with its traceback once the others know
                failure = e
        said, crashed = d.any(problem is not None, failure is not None)  # every rank stops (the others would
        if failure is not None:                                            # wait for rank 0 for good)
            raise failure
        if crashed:  # rank 0 leaves with its traceback: nobody to wait for
            raise TrainingError("rank 0 failed while writing the checkpoint", together=False)
        if said:
            raise TrainingError(problem or "rank 0 could not write the checkpoint")
        going_back = False  # on every rank (rank 0's _write cleared its own once state.pt was written)

    def write_or_say(*written) -> str | None:
        """_write(*written) on rank 0; a full disk first gives up state.prev.pt, and an OSError that remains is
        said as the one-line problem returned."""
        nonlocal keep_prev
        for attempt in (1, 2):
            try:
                _write(*written)
                return None
            except OSError as e:  # a full disk, say (save_model says safetensors' errors as OSError too)
                if attempt == 1 and e.errno == errno.ENOSPC and keep_prev and not going_back and \
                        (run_dir / PREV).is_file():  # the previous state makes room, from now on for good
                    log.warning("disk full: %s removed to make room for the new checkpoint; from now on only the "
                                "last state is kept", run_dir / PREV)
                    (run_dir / PREV).unlink()
                    keep_prev = False
                    continue
                return (f"cannot write the checkpoint in {run_dir} ({getattr(e, 'strerror', '') or e}); "
                        f"{last_good(run_dir, going_back=going_back)}")

    def gather_skipped() -> set:
        """Unreadable images found by any rank (each meets its own share of the data)."""
        if d.world == 1:
            return skipped
        found = [None] * d.world
        torch.distributed.all_gather_object(found, sorted(skipped))
        return set().union(*found)

    def _write(weights: bool, val, improved: bool, model_sd: dict, optim_sd: dict, rngs: list, everywhere: set,
               stats: torch.Tensor) -> None:
        """The exported weights first, the training state last: state.pt is the commit point a resume starts
        from, and re-exports anything after it. The first save writes the state first: a run killed between
        them then still has a state to resume from (which writes the weights again), not weights alone."""
        def commit_state() -> None:
            nonlocal going_back
            training_state = {"step": step, "total_steps": total, "model": model_sd, "optimizer": optim_sd,
                              "ema": ema.state_dict() if ema is not None else None, "scaler": scaler.state_dict(),
                              "rng": rngs, "best_top1": best, "elapsed": clock(), "epoch_stats": stats,
                              "skipped": sorted(everywhere), "class_names": names, "data_sizes": sizes,
                              "data_files": files, "world": d.world, "recipe": r, "resumed": history,
                              "cwd": started_in, "warm_start": list(warm_start) if warm_start else None,
                              "fitted": fitted or budget is None,
                              "ramp_seconds": ramp_before + time.time() - train_t0,
                              "model_meta": {"config": model.cfg.to_dict(), "preprocess": dict(model.preprocess),
                                             "pos_resample": dict(model.pos_resample)}}
            atomic_save(training_state, run_dir / STATE,
                        before=(lambda: keep_previous(run_dir)) if keep_prev and not going_back else None)
            going_back = False  # state.pt is this run's now: whatever fails next, the run continues from it

        first = not (run_dir / STATE).exists()
        if first:
            commit_state()
        if weights:
            export = ema.module if ema is not None else _plain(model, model_sd, sharded)
            extra = {"data": data.split, "train": {"step": step, "epoch": step / steps_per_epoch,
                                                   "val_top1": val.top1 if val else None, "val_tta": T["eval_tta"],
                                                   "ema": ema is not None, "resumed": history},
                     "recipe": r}  # the resolved recipe in force: how this checkpoint was made
            from .. import save_model

            save_model(export, run_dir / LAST, **extra)
            if improved or data.val is None:
                save_model(export, run_dir / BEST, **extra)
        if not first:
            commit_state()
        metrics.commit()
        try:
            changed = resume and (run_dir / RECIPE).read_text(errors="replace") != to_yaml(r)  # on resuming
        except OSError:  # removed (the state holds the recipe): written again
            changed = True
        if changed:
            with replacing(run_dir / RECIPE) as tmp:
                tmp.write_text(to_yaml(r))

    def stopped(caught: list, step: int) -> int:
        if d.main:
            log.warning("stopped by %s at step %d; everything is saved: %svitkit train --resume %s",
                        signal.Signals(caught[0]).name if caught else "a signal on another rank", step,
                        f"torchrun --nproc_per_node {d.world} -m " if d.world > 1 else "", run_dir)
        return 128 + (caught[0] if caught else 0)

    def gradients(group: list) -> tuple[torch.Tensor, bool]:
        """Forward and backward over the step's micro-batches, gradients clipped: (mean loss, non-finite?)."""
        step_loss = torch.zeros((), dtype=torch.float64, device=d.device)
        # every readable image weighs the same in the step, as in one big batch: a micro-batch (or a rank) that lost
        # unreadable images weighs less. With every image read, each weighs 1 (exactly: the same math as before)
        readable = sum(len(y) for x, y, _ in group if x is not None)
        total = int(d.sum(torch.tensor([readable], device=d.device)).item()) if d.world > 1 else readable
        full = max(total, 1) / (accum * d.world)  # images per micro-batch, on average over the step
        for i, (x, y, bad) in enumerate(group):
            skipped.update(bad)
            sync = i == accum - 1 or not hasattr(wrapped, "no_sync")  # DDP: all-reduce on the last one only
            if x is None:  # every image of this micro-batch was unreadable
                if d.world > 1:  # the others' forward/backward hold collectives: join them with zero gradients
                    model.eval()  # (no BatchNorm statistics from a blank image, no dropped blocks)
                    with contextlib.nullcontext() if sync else wrapped.no_sync(), autocast(d.device, amp):
                        blank = torch.zeros(1, model.cfg.in_chans, *img_size, device=d.device)
                        scaler.scale(step_model(blank.contiguous(memory_format=fmt)).float().sum() * 0).backward()
                    model.train()
                continue
            x = x.to(d.device, non_blocking=True).contiguous(memory_format=fmt)
            y = hard = y.to(d.device, non_blocking=True)
            if mixer is not None:
                x, y = mixer(x, y)
            with contextlib.nullcontext() if sync else wrapped.no_sync():
                with autocast(d.device, amp):
                    logits = step_model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=A["label_smoothing"])
                weighted = loss * (len(hard) / full)
                scaler.scale(weighted / accum).backward()
            step_loss += weighted.detach() / accum
            epoch_stats[0] += loss.detach().double() * len(hard)  # on the device: no GPU sync per micro-batch
            epoch_stats[1] += (logits.argmax(1) == hard).sum()
            epoch_stats[2] += len(hard)
        scaler.unscale_(optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), O["clip_grad_norm"] or float("inf"))
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
        return step_loss, not (torch.isfinite(step_loss) and (torch.isfinite(gnorm) or amp == "fp16"))

    # --- the loop -------------------------------------------------------------------------------------------
    last_ckpt, last_plot, steps_here = time.time(), time.time(), 0
    train_s_here = 0.0  # seconds of training steps (no evaluation, no saving) in this process
    eval_times, save_times = [], []  # seconds of each evaluation and each epoch's save in this process
    eval_guess, probe_t, warm_s = 0.0, None, 0.0  # warm_s: training seconds before the probe (compiling, ...)
    exit_code = 0

    def typical(times: list, guess: float = 0.0) -> float:  # one stall (a busy disk, a paused process) must
        return statistics.median(times) if times else guess  # not shorten the whole rest of the run

    def mean_step(train_s: float) -> float:
        """Seconds per step so far, the first (warm-up, compiling) steps left out when there are later ones."""
        timed = steps_here - 3 if probe_t is not None and steps_here > 3 else 0
        return (train_s - warm_s) / timed if timed else train_s / max(steps_here, 1)

    def refit(per_step: float, epoch_end: bool = False) -> int:
        """The schedule's end fitted to the time budget: steps of `per_step` seconds, each epoch's evaluation and
        save, and the final ones (at an epoch's end: also that epoch's, which come next)."""
        nonlocal eval_guess
        if not eval_times and data.val is not None:  # until one is timed: eval ~3x train speed per view
            eval_guess = len(data.val) * (2 if T["eval_tta"] == "flip" else 1) / (3 * D["batch_size"] / per_step)
        eval_s, save_s = typical(eval_times, eval_guess), typical(save_times)
        per_epoch = eval_s / T["eval_every"] + save_s
        due = eval_s * (data.val is not None and (step // steps_per_epoch) % T["eval_every"] == 0) + save_s
        # the time kept for the end as `time_up` keeps it: the final evaluation and save, and 1% of the budget
        left = budget - clock() - eval_s - save_s - 0.01 * budget - (due if epoch_end else 0)
        return _fit(step, limit, left, per_step + per_epoch / steps_per_epoch, d)

    def fit(per_step: float, epoch_end: bool = False) -> tuple[int, tuple | None]:
        """refit, and where the warm-up rises on from: this step's learning rate when the step is within the
        new warm-up (a fit moves its end, not the learning rate), else where it rose from before."""
        new = refit(per_step, epoch_end)
        return new, (step, lr) if step < warmup_length(new, r["schedule"]) else warm_start

    # the schedule's length is known (a run without a budget, or one fitted by an earlier process; states of
    # older versions do not say: they were fitted unless saved in their first 23 steps); until then the warm-up
    # runs by a clock of training seconds, which an earlier process's part of also counts
    fitted, ramp_before = (state.get("fitted", True), state.get("ramp_seconds", 0.0)) if resume else (False, 0.0)
    train_t0 = time.time()
    with stop_signals() as caught, attention_kernel(kernel), logging_redirect_tqdm():  # log lines above the bar
        if resume and step >= total and d.any(not readable_export(run_dir / LAST) or (
                val_loader is not None and not readable_export(run_dir / BEST)))[0]:
            # killed in its last save (the state first, then the weights): the weights are written now, from it
            if d.main:
                log.warning("%s: the run's last save was cut short; its weights are written from %s", run_dir,
                            state["file"])
            val = evaluate(eval_model, val_loader, names, d.device, amp, T["channels_last"], d, tta=T["eval_tta"]) \
                if val_loader is not None else None
            improved = val is not None and val.top1 > best
            best = max(best, val.top1) if val is not None else best
            save(weights=True, val=val, improved=improved)
        while step < total:
            epoch, position = divmod(step, steps_per_epoch)
            if position == 0:
                epoch_stats.zero_()
            epoch_t, epoch_step0 = time.time(), step
            bar = tqdm(total=steps_per_epoch, initial=position, desc=f"epoch {epoch + 1}", unit="step",
                       leave=False, disable=not d.main or None, dynamic_ncols=True)
            stop = stop_after_epoch = nonfinite = False
            for group in batches(epoch, position):
                lr = lr_at(step, total, r["schedule"], peak(total), warm_start) if budget is None or fitted else \
                    d.broadcast(warmup_by_clock(  # rank 0's clock: the training seconds of the run, of those it has
                        step, ramp_before + time.time() - train_t0,
                        budget - (elapsed_before - ramp_before) - (train_t0 - t0), r["schedule"],
                        peak(limit), limit))
                for g in optimizer.param_groups:
                    g["lr"] = lr
                step_loss, bad_step = gradients(group)
                time_up = budget is not None and \
                    clock() + typical(eval_times, eval_guess) + typical(save_times) + 0.01 * budget >= budget
                # every decision that leads to a collective (saving gathers the RNG states) is taken together
                late = time.time() - last_ckpt > 60 * T["checkpoint_minutes"]  # each rank's own clock
                nonfinite, stop_now, time_up, late = d.any(bad_step, bool(caught), time_up, late)
                if nonfinite:
                    break
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update_parameters(model)
                step, steps_here = step + 1, steps_here + 1
                if d.main:
                    rate = (step - epoch_step0) * D["batch_size"] / (time.time() - epoch_t)
                    left = (budget - clock()) if budget else (total - step) * D["batch_size"] / rate
                    bar.set_postfix(loss=f"{step_loss.item():.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}",
                                    left=_hms(left), refresh=False)
                    bar.update()
                    if step % T["log_every"] == 0:
                        metrics.scalars(step, **{"train/loss_step": step_loss.item(), "train/lr": lr})
                # fit the schedule to a time budget: time PROBE_STEPS steps, then how many fit; fitted again
                # every PROBE_STEPS steps with the mean step time so far, so that the decay ends with the budget
                if budget is not None and steps_here == 3:
                    probe_t = time.time()
                    warm_s = train_s_here + probe_t - epoch_t
                if budget is not None and steps_here >= 3 + PROBE_STEPS and (steps_here - 3) % PROBE_STEPS == 0:
                    probed = steps_here == 3 + PROBE_STEPS
                    # training seconds only: an epoch shorter than the probe evaluated and saved inside it
                    per_step = mean_step(train_s_here + time.time() - epoch_t)
                    (total, warm_start), fitted = fit(per_step), True
                    if probed and d.main:
                        log.info("time budget: %.2f s/step -> %d steps (%.1f epochs)%s", per_step, total,
                                 total / steps_per_epoch, f", peak lr {peak(total):.3g}"
                                 if isinstance(O["lr"], list) else "")
                mid_save = T["checkpoint_every_steps"] and step % T["checkpoint_every_steps"] == 0 or late
                if stop_now or time_up or step >= total or step % steps_per_epoch == 0:
                    stop = stop_now and step < total and step % steps_per_epoch  # at an epoch's end: finish it
                    stop_after_epoch = stop_now and not stop
                    break
                if mid_save:
                    save(weights=False)
                    last_ckpt = time.time()
            bar.close()
            if nonfinite:
                raise TrainingError(
                    f"loss or gradient became non-finite at step {step + 1} (epoch {epoch + 1}, lr {lr:.3g}); "
                    f"stopped without saving: {last_good(run_dir, diverged=True, going_back=going_back)}. "
                    "Try a lower optim.lr, optim.clip_grad_norm or train.amp=none")
            if stop:
                save(weights=True)
                exit_code = stopped(caught, step)
                break

            # end of an epoch, or of the run: evaluate, save, log
            train_s = time.time() - epoch_t
            train_s_here += train_s
            finished = step >= total or time_up
            if budget is not None and not finished:  # re-fit the budget with the real times so far
                # the mean step time so far, not the last epoch's: one slow epoch on a shared machine should
                # not shorten the run for good (the count may grow back, up to the recipe's limit)
                (total, warm_start), fitted = fit(mean_step(train_s_here), epoch_end=True), True
                finished = step >= total  # no time left for another step: this is the last evaluation
            val = None
            if val_loader is not None and ((epoch + 1) % T["eval_every"] == 0 or finished):
                t_eval = time.time()
                val = evaluate(eval_model, val_loader, names, d.device, amp, T["channels_last"], d, tta=T["eval_tta"])
                eval_times.append(time.time() - t_eval)
                skipped.update(val.skipped)
                if not math.isfinite(val.loss):  # the weights diverged: keep the last good checkpoint
                    raise TrainingError(
                        f"validation loss became non-finite after step {step} (epoch {epoch + 1}, lr {lr:.3g}); "
                        f"stopped without saving: {last_good(run_dir, diverged=True, going_back=going_back)}. "
                        "Try a lower optim.lr or optim.clip_grad_norm")
            epoch_stats_all = d.sum(epoch_stats.clone()).cpu()
            unread = "training" if step > epoch_step0 and not epoch_stats_all[2] else \
                "validation" if val is not None and not val.n else None
            if unread:  # every image skipped: the numbers would be made up and the weights untrained
                everywhere = gather_skipped()
                where = D["val"] if unread == "validation" and D["val"] else D["path"]
                raise TrainingError(f"no {unread} image of {where} could be read in epoch {epoch + 1} "
                                    f"({len(everywhere)} unreadable, e.g. {min(everywhere, default='?')}); stopped "
                                    f"without saving: {last_good(run_dir, going_back=going_back)}")
            improved = val is not None and val.top1 > best
            if val is not None:
                best = max(best, val.top1)
            if d.main:
                loss_avg, acc = (epoch_stats_all[0] / epoch_stats_all[2].clamp(min=1)).item(), \
                    (epoch_stats_all[1] / epoch_stats_all[2].clamp(min=1)).item()
                rate = (step - epoch_step0) * D["batch_size"] / max(train_s, 1e-9)
                metrics.row(epoch=round(step / steps_per_epoch, 3), step=step, lr=lr, train_loss=loss_avg,
                            train_acc=acc, val_loss=val.loss if val else "", val_top1=val.top1 if val else "",
                            val_top5=val.top5 if val else "", images_per_s=rate, elapsed_s=clock())
                shown = (f"  val {val.top1:6.2%} (top-5 {val.top5:.2%}, loss {val.loss:.3f}){' *' if improved else ''}"
                         if val else "")
                digits = 1 if 10 * total >= steps_per_epoch else 3  # 3 steps of a 390-step epoch: 0.008, not 0.0
                planned = f"{total / steps_per_epoch:.{0 if total % steps_per_epoch == 0 else digits}f}"
                left = budget - clock() if budget else (total - step) * (time.time() - t0) / max(steps_here, 1)
                print(f"epoch {step / steps_per_epoch:5.{digits}f}/{planned}  loss {loss_avg:.4f}  "
                      f"acc {acc:6.2%}{shown}  lr {lr:.2e}  {rate:,.{0 if rate >= 10 else 2}f} img/s  {_hms(clock())}"
                      + (f" ({_hms(left)} left)" if step < total and not time_up else ""), flush=True)
            t_save = time.time()
            save(weights=True, val=val, improved=improved)  # after the row: a resume drops rows past its state
            last_ckpt = time.time()
            save_times.append(last_ckpt - t_save)
            if d.main and (finished or time.time() - last_plot > 60):
                plot_curves(metrics.csv_path, run_dir / "curves.png")
                last_plot = time.time()
            if time_up:
                if d.main:
                    log.info("time budget of %g min reached at step %d", T["time_budget"], step)
                break
            # a signal that came while this epoch was evaluated or saved: all of it is on disk now, so stop here
            # rather than after one more step and a second save (every rank takes this decision together)
            stop_after_epoch = d.any(stop_after_epoch or bool(caught))[0]
            if stop_after_epoch and not finished:
                exit_code = stopped(caught, step)
                break
    if d.world > 1 and not sharded:  # DDP replicas must agree bit for bit; say so
        same, digest = d.same_weights(model)
        if d.main:
            (log.info if same else log.error)("%d processes end with %s weights (sha1 of rank 0: %s)", d.world,
                                              "identical" if same else "DIFFERENT", digest[:12])
    skipped = gather_skipped()
    if d.main:
        plot_curves(metrics.csv_path, run_dir / "curves.png")
        metrics.close()
        if skipped:
            log.warning("%d unreadable images were skipped:\n  %s", len(skipped), "\n  ".join(sorted(skipped)))
        if exit_code == 0:
            log.info("done in %s: best val top-1 %s -> %s", _hms(clock()), f"{best:.2%}" if best >= 0 else "n/a",
                     run_dir / BEST)
    d.barrier()  # the ranks leave together: one tearing down its process group while another works aborted it
    d.close()
    return exit_code


def _fit(step: int, cap: int, seconds_left: float, per_step: float, d: Dist) -> int:
    """Steps of `per_step` seconds that fit in the time left, at most `cap`; rank 0's count."""
    fit = step + int(max(seconds_left, 0) / per_step)
    return int(d.broadcast(max(step, min(cap, fit))))


def _plain(model: ViT, sd: dict, sharded: bool) -> ViT:
    """The model as a plain (unsharded) ViT for saving."""
    if not sharded:
        return model
    plain = ViT(model.cfg)
    plain.load_state_dict(sd)
    plain.preprocess, plain.class_names, plain.pos_resample = dict(model.preprocess), model.class_names, \
        dict(model.pos_resample)
    return plain


def _where(path: str, started_in: str) -> str:
    """A relative data path as the run meant it: from the folder the run started in (a resume from elsewhere would
    read other data, or none); the path as given where that folder no longer has it."""
    if path in BUILTIN or "://" in path or Path(path).is_absolute():
        return path
    there = os.path.join(started_in, path)
    if not (Path(there).parent.is_dir() if is_shards(path) else Path(there).exists()) or \
            os.path.realpath(there) == os.path.realpath(path):
        return path
    log.info("%s: read from the folder the run started in: %s", path, there)
    return there


def _hms(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"
