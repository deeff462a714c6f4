"""Never lose a run: kill -9 in the middle of an epoch, resume, and end bit-identical to a run that was never
interrupted; SIGTERM saves and exits cleanly. Every source of randomness is on (augmentation, Mixup/CutMix,
dropout, stochastic depth, random erasing, EMA), so an RNG state or data position that is not restored
exactly shows up as different weights."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from train_utils import ROOT, env, run_vitkit, train_in_subprocess

STEPS_PER_EPOCH = 1438 // 32  # 44
NOISY = dict(model={"dropout": 0.1, "drop_path": 0.1},
             data={"batch_size": 32},
             augment={"crop": "pad", "padding": 1, "auto_augment": "trivialaugment", "mixup": 0.2, "cutmix": 1.0,
                      "label_smoothing": 0.1, "random_erasing": 0.25},
             train={"epochs": 2, "ema_decay": 0.99, "checkpoint_every_steps": 3, "threads": 1})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: (its recipe, its run dir)."""
    return train_in_subprocess(tmp_path_factory.mktemp("resume"), **NOISY)


def assert_same_run(run, reference):
    for name in ("last.safetensors", "best.safetensors"):
        a, b = load_file(run / name), load_file(reference / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = (torch.load(p / "state.pt", weights_only=True) for p in (run, reference))
    assert a["step"] == b["step"] == 2 * STEPS_PER_EPOCH
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # the raw weights (EMA above)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def start(recipe, run, *args, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vitkit", "train", "--recipe", str(recipe), "--out", str(run), *args],
                            cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def saved_step(run) -> int:
    try:
        return torch.load(run / "state.pt", weights_only=True)["step"]
    except (OSError, RuntimeError, EOFError, KeyError):  # not written yet
        return 0


def test_sigkill_mid_epoch_then_resume_is_bit_identical(reference, tmp_path):
    recipe, ref = reference
    for attempt in range(3):  # the kill must land after a mid-epoch save; retry if it lands after an epoch's end
        run = tmp_path / f"killed{attempt}"
        proc = start(recipe, run)
        while (step := saved_step(run)) <= STEPS_PER_EPOCH + 3 and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        step = saved_step(run)
        if 0 < step < 2 * STEPS_PER_EPOCH and step % STEPS_PER_EPOCH:
            break
    else:
        pytest.fail("could not kill the run in the middle of an epoch")
    assert proc.returncode == -signal.SIGKILL
    resumed = run_vitkit("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {step}" in resumed.stderr
    assert_same_run(run, ref)


def test_sigterm_saves_then_resume_is_bit_identical(reference, tmp_path):
    recipe, ref = reference
    run = tmp_path / "terminated"
    proc = start(recipe, run)
    while saved_step(run) < 5 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and f"--resume {run}" in err
    step = saved_step(run)
    assert 0 < step < 2 * STEPS_PER_EPOCH and (run / "last.safetensors").is_file()
    resumed = run_vitkit("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run, ref)


def test_sigterm_to_the_process_group_with_loader_workers_still_saves(reference, tmp_path):
    """torchrun, Slurm, docker stop and Ctrl-C signal the whole process group. Loader workers were in it, died first,
    and failed the loader with a traceback before anything was saved; now they leave the group."""
    import os

    recipe, ref = reference
    run = tmp_path / "group"
    proc = start(recipe, run, "--workers", "1", start_new_session=True)
    while saved_step(run) < 5 and proc.poll() is None:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert 5 <= saved_step(run) < 2 * STEPS_PER_EPOCH
    resumed = run_vitkit("train", "--resume", str(run))  # loader workers change nothing: the same run
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run, ref)
