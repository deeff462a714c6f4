"""`vitkit train` unchanged under torchrun: 2 CPU processes (gloo), DDP and FSDP. The replicas must end
bit-identical, and the result must match one process with the same global batch (up to float rounding:
the gradient mean is summed in another order)."""
from __future__ import annotations

import fcntl
import os
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


def torchrun(*args: str, timeout: float = 300, path: str | None = None) -> subprocess.CompletedProcess:
    """torchrun with 2 processes; a hang fails the test (torchrun is stopped, and it stops its workers). path:
    a folder put first on every process's PYTHONPATH."""
    environ = env()
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [path, environ["PYTHONPATH"]]))
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "vitkit", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT, env=environ, start_new_session=True)
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
    (saving gathers every rank's RNG state), or one waits in the gather while the other all-reduces gradients.
    So must a time budget's: its fits, and its warm-up by the clock until the first (rank 0's learning rate)."""
    recipe = write_recipe(tmp_path / "r.yaml", train={"epochs": 1000, "threads": 1, "amp": "none",
                                                      "checkpoint_minutes": 0.003}, schedule={"warmup_fraction": 0.05})
    done = torchrun("train", "--recipe", str(recipe), "--out", str(tmp_path / "run"), "--time-budget", "0.1",
                    timeout=120)
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


@pytest.mark.parametrize("fault", ["OSError(errno.EIO, 'Input/output error')", "ValueError('a bug in the export')"])
def test_rank_0_failing_to_save_stops_every_rank(tmp_path, fault):
    """Only rank 0 writes. When its checkpoint write fails, rank 1 must stop as well rather than wait in the next
    collective for good: a disk error is said once in one line, anything else (a bug) with rank 0's traceback.
    The epoch-1 state stays; on a disk error rank 0 draws the curves up to it before torchrun ends the run."""
    (tmp_path / "sitecustomize.py").write_text(  # rank 0's export of the weights fails from epoch 2's save on
        "import errno, os\n"
        "if os.environ.get('RANK') == '0':\n"
        "    import vitkit\n"
        "    real, calls = vitkit.save_model, []\n"
        "    def save_model(*args, **kwargs):\n"
        "        calls.append(1)\n"
        "        if len(calls) > 2:  # epoch 1: last and best\n"
        f"            raise {fault}\n"
        "        return real(*args, **kwargs)\n"
        "    vitkit.save_model = save_model\n")
    recipe = write_recipe(tmp_path / "r.yaml", train={"epochs": 3, "threads": 1, "amp": "none"})
    done = torchrun("train", "--recipe", str(recipe), "--out", str(tmp_path / "run"), path=str(tmp_path),
                    timeout=120)
    assert done.returncode != 0
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["step"] == 1438 // 64
    if fault.startswith("OSError"):
        assert (tmp_path / "run" / "curves.png").stat().st_size > 0
        said = [line for line in done.stderr.splitlines() if "cannot write the checkpoint" in line]
        assert len(said) == 1 and "(Input/output error)" in said[0], done.stderr[-3000:]
        assert "state.pt" in said[0], said  # where the run can go on from
        assert "OSError" not in done.stderr and "TrainingError" not in done.stderr, done.stderr[-3000:]
    else:
        assert "ValueError: a bug in the export" in done.stderr, done.stderr[-3000:]


def test_non_finite_loss_is_said_once(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", optim={"lr": 1e6})
    done = torchrun("train", "--recipe", str(recipe), "--out", str(tmp_path / "run"))
    assert done.returncode != 0
    assert done.stderr.count("became non-finite") == 1, done.stderr[-3000:]


def test_sigterm_under_torchrun_then_resume_continues_exactly(tmp_path):
    """Both ranks stop at the same step and save; resumed under torchrun, the run ends with the uninterrupted run's
    weights and metrics (the interrupted epoch's loss and accuracy count every rank's images once)."""
    import time

    from vitkit.train.report import read_metrics

    recipe = write_recipe(tmp_path / "r.yaml", **{**DETERMINISTIC, "train": {**DETERMINISTIC["train"],
                                                                              "checkpoint_every_steps": 2}})
    assert torchrun("train", "--recipe", str(recipe), "--out", str(tmp_path / "ref")).returncode == 0

    def saved_step(run):
        try:
            return torch.load(run / "state.pt", weights_only=True)["step"]
        except (OSError, RuntimeError, EOFError, KeyError):
            return 0

    for attempt in range(3):  # the stop must land inside the first epoch (22 steps)
        run = tmp_path / f"run{attempt}"
        p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "vitkit", "train", "--recipe", str(recipe), "--out", str(run)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env(),
                             start_new_session=True)
        while saved_step(run) < 4 and p.poll() is None:
            time.sleep(0.005)
        p.send_signal(signal.SIGTERM)
        err = p.communicate(timeout=120)[1]
        if 0 < (step := saved_step(run)) < 22:
            break
    else:
        pytest.fail("could not stop the run inside its first epoch")
    assert err.count("stopped by SIGTERM") == 1, err[-3000:]
    assert f"everything is saved: torchrun --nproc_per_node 2 -m vitkit train --resume {run}" in err  # as it ran
    resumed = torchrun("train", "--resume", str(run))
    assert resumed.returncode == 0 and f"resuming at step {step}" in resumed.stderr, resumed.stderr[-3000:]
    a, b = load_file(run / "last.safetensors"), load_file(tmp_path / "ref" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows, ref_rows = read_metrics(run / "metrics.csv"), read_metrics(tmp_path / "ref" / "metrics.csv")
    for key in ("step", "train_loss", "train_acc", "val_top1"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in ref_rows], rel=1e-9), key


def test_a_process_lost_mid_run_is_one_line(tmp_path):
    """Rank 1 killed (the OOM killer, say): rank 0 loses its connection in the next collective and says so in one
    line with how to go on, instead of gloo's traceback."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os, signal\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import torch.nn.functional as F\n"
        "    real, calls = F.cross_entropy, []\n"
        "    def cross_entropy(*args, **kwargs):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 5:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "        return real(*args, **kwargs)\n"
        "    F.cross_entropy = cross_entropy\n")
    recipe = write_recipe(tmp_path / "r.yaml", train={"epochs": 3, "threads": 1, "amp": "none"})
    done = torchrun("train", "--recipe", str(recipe), "--out", str(tmp_path / "run"), path=str(tmp_path), timeout=120)
    assert done.returncode != 0
    assert "[rank0]" not in done.stderr, done.stderr[-3000:]  # no worker traceback (torchrun has its own report)
    said = [line for line in done.stderr.splitlines() if "vitkit train: rank 0 lost another process" in line]
    assert len(said) == 1 and f"--resume {tmp_path / 'run'}" in said[0], done.stderr[-3000:]


def test_fine_tuning_notes_and_the_recipe_are_said_once_and_eval_refuses_torchrun(tmp_path):
    """Rank 0 alone says what every rank would; a micro-batch of one image raises no DDP stride warning."""
    import vitkit

    ckpt = vitkit.save_model(vitkit.ViT(vitkit.ViTConfig(patch_size=2, img_size=8, width=32, depth=1, num_heads=2,
                                                         mlp_dim=64, num_classes=3)), tmp_path / "m.safetensors")
    recipe = write_recipe(tmp_path / "r.yaml", model={"pool": "token", "class_token": True, "fc_norm": False},
                          data={"batch_size": 2}, train={"max_steps": 2, "threads": 1})
    args = ["train", "--recipe", str(recipe), "--weights", str(ckpt), "--img-size", "16", "--out", str(tmp_path / "run")]
    printed = torchrun(*args, "--print-recipe")
    assert printed.returncode == 0 and printed.stdout.count("optim:") == 1, printed.stdout
    done = torchrun(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("position embeddings resampled from 4x4 to 8x8") == 1, done.stderr[-3000:]
    assert done.stderr.count("head replaced") == 1 and "Grad strides" not in done.stderr, done.stderr[-3000:]
    scored = torchrun("eval", "--data", "digits", "--weights", str(tmp_path / "run" / "last.safetensors"))
    assert scored.returncode != 0
    assert scored.stderr.count("vitkit eval: error: vitkit eval runs in one process: start it without torchrun") == 1
