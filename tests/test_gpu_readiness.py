"""What a GPU run depends on, checked without one: torch.cuda is stubbed where the code asks it something."""
from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vitkit.train import distributed as D
from vitkit.train import trainer as TR
from vitkit.train.evaluate import autocast, native_bf16, training_precision
from vitkit.train.recipe import RecipeError

from train_utils import run_vitkit, train_in_subprocess

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.fixture
def gpus(monkeypatch):
    """A machine with `n` visible GPUs (set gpus.n); set_device and init_process_group recorded."""
    class G:
        n, calls = 2, []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: G.n)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: G.calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: G.calls.append((backend, kw)))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"uuid": "GPU-a"})())
    monkeypatch.setattr(D, "_refuse_shared_gpu", lambda rank, world, gpu: G.calls.append((rank, world, gpu)) or "store")
    return G


def torchrun_env(monkeypatch, rank, world=2, local=None):
    for k, v in dict(WORLD_SIZE=world, RANK=rank, LOCAL_RANK=rank if local is None else local).items():
        monkeypatch.setenv(k, str(v))


def test_each_rank_takes_its_local_gpu_and_binds_nccl_to_it(gpus, monkeypatch):
    for rank in (0, 1):
        torchrun_env(monkeypatch, rank)
        assert D.Dist.init("auto").device == torch.device("cuda", rank)
    assert gpus.calls == [("set_device", CUDA0), ("nccl", {"device_id": CUDA0}),
                          ("set_device", CUDA1), ("nccl", {"device_id": CUDA1})]


def test_an_explicit_gpu_index_under_torchrun_is_refused(gpus, monkeypatch):
    """--device cuda:1 on every rank put both processes on one GPU (NCCL: duplicate GPU)."""
    torchrun_env(monkeypatch, 0)
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        D.Dist.init("cuda:1")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: any GPU it names
    assert D.Dist.init("cuda:1").device == CUDA1


def test_one_visible_gpu_per_process(gpus, monkeypatch):
    """Launchers that give each rank its own CUDA_VISIBLE_DEVICES: LOCAL_RANK 3 sees one GPU, cuda:0."""
    gpus.n = 1
    torchrun_env(monkeypatch, 3, world=4)
    assert D.Dist.init("cuda").device == CUDA0
    gpus.n = 2
    with pytest.raises(ValueError, match="LOCAL_RANK 3, but this process sees 2 GPUs"):
        D.Dist.init("cuda")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("uuids", [("GPU-a", "GPU-a"), ("GPU-a", "GPU-b")])
def test_two_processes_on_the_one_gpu_they_both_see_are_refused(monkeypatch, uuids):
    """torchrun --nproc_per_node 2 on a one-GPU machine looks, from each process, like a launcher giving each
    its own GPU: the GPUs' UUIDs, exchanged through the rendezvous store, tell them apart (both ranks say it)."""
    import threading

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    found = {}

    def rank(r):
        try:
            found[r] = D._refuse_shared_gpu(r, 2, uuids[r])
        except RecipeError as e:  # not said as a --device problem
            found[r] = str(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if uuids[0] == uuids[1]:
        assert found == {r: "torchrun: ranks 0, 1 would share GPU GPU-a: start at most as many processes per machine as it "
                            "has GPUs (torchrun --nproc_per_node)" for r in (0, 1)}
    else:
        assert all(isinstance(found[r], dist.PrefixStore) for r in (0, 1))


def test_the_gpu_check_runs_where_each_process_sees_one(gpus, monkeypatch):
    torchrun_env(monkeypatch, 1, world=4)
    gpus.n = 1
    D.Dist.init("auto")
    gpus.n = 2  # one GPU per LOCAL_RANK: nothing to check
    D.Dist.init("auto")
    assert gpus.calls == [("set_device", CUDA0), (1, 4, "GPU-a"),
                          ("nccl", {"device_id": CUDA0, "store": "store", "rank": 1, "world_size": 4}),
                          ("set_device", CUDA1), ("nccl", {"device_id": CUDA1})]


def test_cuda_rng_state_is_the_run_gpus_own(monkeypatch):
    """One state, of the GPU the run uses; restored there, on a machine with fewer GPUs too (the old
    get/set_rng_state_all raised IndexError there); a CPU resume ignores it."""
    states, restored = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}, []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: states[torch.device(device).index])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((int(s), torch.device(device))))
    s = TR.rng_state(CUDA1)
    assert [int(t) for t in s["cuda"]] == [1]
    TR.set_rng_state(s, CUDA0)  # resumed with --device cuda:0, or on a one-GPU machine
    TR.set_rng_state(s, torch.device("cpu"))
    old = {**s, "cuda": [states[0], states[1]]}  # written by the previous version: every visible GPU's
    TR.set_rng_state(old, CUDA1)
    TR.set_rng_state(old, torch.device("cuda", 5))  # no such state: left as seeded
    assert restored == [(1, CUDA0), (1, CUDA1)]
    assert TR.rng_state()["cuda"] == []


@pytest.mark.parametrize("major, native", [(7, False), (8, True), (9, True)])
def test_auto_precision_on_gpus(monkeypatch, major, native):
    """bf16 only where the GPU has it (Ampere on): torch.cuda.is_bf16_supported() also says True for a V100/T4,
    which only emulate it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    gpu = torch.device("cuda")
    assert native_bf16(gpu) == native
    assert training_precision(gpu, "auto") == ("bf16" if native else "none")
    ctx = autocast(gpu, "auto")
    assert (getattr(ctx, "fast_dtype", None) == torch.bfloat16) == native


def test_flash_attention_on_a_gpu_needs_half_precision():
    gpu = torch.device("cuda")
    with pytest.raises(RecipeError, match="flash"):
        TR.pick_attention("flash", gpu, "none", 197)
    assert TR.pick_attention("flash", gpu, "bf16", 197) == "flash"
    assert TR.pick_attention("efficient", gpu, "none", 197) == "efficient"
    assert TR.pick_attention("flash", torch.device("cpu"), "none", 197) == "flash"  # the CPU one has fp32


def test_resume_under_fp16_after_a_run_without_it(tmp_path):
    """A bf16/fp32 run's scaler state is empty: resumed with train.amp=fp16 (say, moved to a V100) it starts a
    fresh loss scale instead of failing in GradScaler.load_state_dict."""
    _, run = train_in_subprocess(tmp_path, train={"epochs": 1})
    resumed = run_vitkit("train", "--resume", str(run), "--epochs", "2", "--set", "train.amp=fp16")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.load(run / "state.pt", weights_only=True)["scaler"]["scale"] > 0


def _fsdp_eval(rank: int, port: int, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    from vitkit.models.vit import ViT, ViTConfig
    from vitkit.train.evaluate import eval_loader, evaluate

    torch.manual_seed(0)
    model = ViT(ViTConfig(img_size=8, patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=16, num_classes=2))
    d = D.Dist(rank, 2, rank, torch.device("cpu"))
    data = [(torch.zeros(3, 8, 8), 0)] * 3  # rank 0 gets two images, rank 1 one: two batches against one
    r = evaluate(D.wrap(model, d, "fsdp"), eval_loader(data, lambda x: x, 1, 0, rank, 2), ["a", "b"], d.device, dist=d)
    out.put((rank, r.n))
    out.close()
    out.join_thread()
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # as `vitkit train` under torchrun: gloo's threads can abort the interpreter's teardown


def test_fsdp_validation_with_uneven_shares_of_the_data():
    """A sharded model all-gathers in every forward pass: a rank with one batch more used to wait forever."""
    port = _free_port()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_fsdp_eval, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(out.get(timeout=5) for _ in procs) == [(0, 3), (1, 3)]


def _build_fails_on_rank_1(rank: int, port: int, folder: str, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from pathlib import Path

    from vitkit.train import recipe as R

    build = TR.build_model

    def short_of_memory(*args, **kwargs):
        if rank == 1:  # this rank's machine (or GPU) has less memory
            raise ValueError("img_size 8x8 is too large here: about 9 GiB, more than the 1 GiB available")
        return build(*args, **kwargs)

    TR.build_model = short_of_memory
    from train_utils import write_recipe

    recipe = R.load(write_recipe(Path(folder) / "r.yaml"), {"train.device": "cpu"})
    try:
        TR.train(recipe, Path(folder) / "run")
        out.put((rank, "trained"))
    except RecipeError as e:
        out.put((rank, str(e)))
    out.close()
    out.join_thread()
    os._exit(0)


def test_a_problem_of_one_rank_is_said_by_every_rank(tmp_path):
    """A model too large for one rank's memory: that rank used to return quietly (only rank 0 speaks) while rank
    0 waited in a collective; every rank now stops with the same line, naming the rank."""
    ctx, port = mp.get_context("spawn"), _free_port()
    out = ctx.Queue()
    procs = [ctx.Process(target=_build_fails_on_rank_1, args=(r, port, str(tmp_path), out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    said = dict(out.get(timeout=5) for _ in procs)
    assert said[0] == said[1] and said[0].startswith("model: img_size 8x8 is too large here") and "(rank 1)" in said[0]
    assert not (tmp_path / "run").exists()  # no run directory made
