"""`vitkit train` unchanged under torchrun: 2 CPU processes (gloo), DDP and FSDP. The replicas must end
bit-identical, and the result must match one process with the same global batch (up to float rounding:
the gradient mean is summed in another order)."""
from __future__ import annotations

import fcntl
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from train_utils import ROOT, digit_images, env, train_in_subprocess, write_recipe

# no randomness that differs by rank (dropout, Mixup), so one process and two see the same computation;
# shifts and flips are drawn per image (seed, epoch, index), the same in both
DETERMINISTIC = dict(data={"batch_size": 64}, train={"epochs": 2, "threads": 1}, optim={"lr": 0.001},
                     augment={"crop": "pad", "padding": 1, "hflip": 0.5})


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """torchrun with 2 processes; a hang fails the test (torchrun is stopped, and it stops its workers)."""
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "vitkit", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT, env=env(), start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)  # torchrun: SIGTERM to the workers, SIGKILL 30 s later
        out, err = p.communicate()
        raise AssertionError(f"hung for {timeout} s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    recipe, run = train_in_subprocess(tmp_path_factory.mktemp("ddp"), **DETERMINISTIC)
    return recipe, load_file(run / "last.safetensors")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(single, tmp_path, strategy):
    recipe, reference = single
    done = torchrun("train", "--recipe", str(recipe), "--out", str(tmp_path / "run"), "--set",
                    f"train.distributed={strategy}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(32 per process x 1 accumulation)" in done.stderr
    if strategy == "ddp":  # every rank's weights hashed and compared at the end
        assert "2 processes end with identical weights" in done.stderr
    weights = load_file(tmp_path / "run" / "last.safetensors")
    assert weights.keys() == reference.keys()
    worst = max((weights[k] - reference[k]).abs().max().item() for k in weights)
    assert worst < 2e-5, f"largest difference from the 1-process run: {worst:.2e}"
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["world"] == 2 and len(state["rng"]) == 2 and state["step"] == 2 * (1438 // 64)


def test_time_based_checkpoints_do_not_deadlock(tmp_path):
    """train.checkpoint_minutes is judged by each rank's clock: the ranks must decide to save together
    (saving gathers every rank's RNG state), or one waits in the gather while the other all-reduces gradients."""
    recipe = write_recipe(tmp_path / "r.yaml", train={"epochs": 3, "threads": 1, "amp": "none",
                                                      "checkpoint_minutes": 0.003})
    done = torchrun("train", "--recipe", str(recipe), "--out", str(tmp_path / "run"), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes end with identical weights" in done.stderr


def test_a_micro_batch_of_unreadable_images_on_one_rank(tmp_path):
    """A rank whose whole micro-batch is unreadable still joins the gradient all-reduce (zero gradients), else
    the ranks' collectives mismatch (gloo aborts); every rank's skipped images are listed."""
    files = digit_images(tmp_path / "data", [str(c) for c in range(4)], per_class=6)
    for c in files:
        for k in range(2):
            (tmp_path / "data" / c / f"zz_bad{k}.png").write_bytes(b"not an image")
    recipe = write_recipe(tmp_path / "r.yaml", data={"path": str(tmp_path / "data"), "batch_size": 2,
                                                     "val_split": 0.2, "preload": False},
                          train={"epochs": 1, "threads": 1, "amp": "none"})
    done = torchrun("train", "--recipe", str(recipe), "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    listed = [line for line in done.stderr.splitlines() if "zz_bad" in line]
    assert len(listed) == len(set(listed)) >= 7  # 8 bad files; the val split may hold some, seen there too


def test_a_locked_run_directory_is_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    recipe = write_recipe(tmp_path / "r.yaml")
    with open(run / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = torchrun("train", "--recipe", str(recipe), "--out", str(run))
    assert done.returncode != 0
    assert done.stderr.count("is in use by another") == 1
    assert "[rank" not in done.stderr  # no worker traceback


def test_non_finite_loss_is_said_once(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", optim={"lr": 1e6})
    done = torchrun("train", "--recipe", str(recipe), "--out", str(tmp_path / "run"))
    assert done.returncode != 0
    assert done.stderr.count("became non-finite") == 1, done.stderr[-3000:]
