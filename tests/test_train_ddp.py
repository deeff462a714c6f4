"""`vitkit train` unchanged under torchrun: 2 CPU processes (gloo), DDP and FSDP. The replicas must end
bit-identical, and the result must match one process with the same global batch (up to float rounding:
the gradient mean is summed in another order)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from train_utils import ROOT, env, train_in_subprocess

# no randomness that differs by rank (dropout, Mixup), so one process and two see the same computation;
# shifts and flips are drawn per image (seed, epoch, index), the same in both
DETERMINISTIC = dict(data={"batch_size": 64}, train={"epochs": 2, "threads": 1}, optim={"lr": 0.001},
                     augment={"crop": "pad", "padding": 1, "hflip": 0.5})


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "vitkit", *args], capture_output=True, text=True, cwd=ROOT, env=env(), timeout=300)


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
