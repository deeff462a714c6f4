"""One process or many (torchrun): the same code path. DDP by default, FSDP (fully_shard) for big models;
only rank 0 writes files."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


def resolve_device(name: str) -> torch.device:
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps', ... -> a device this machine has;
    ValueError saying why not."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name!r} is not a device name (cpu, cuda, cuda:N, mps, auto)") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise ValueError(f"{name!r}: this machine has no {dev.type} device")
    count = getattr(backend, "device_count", lambda: 1)()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"{name!r}: this machine has {count} {dev.type} device(s), numbered from 0")
    return dev


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def init(cls, device: str = "auto") -> "Dist":
        """Joins the process group when started by torchrun (WORLD_SIZE > 1)."""
        world = int(os.environ.get("WORLD_SIZE", 1))
        rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
        dev = resolve_device(device)
        if dev.type == "cuda":
            if world > 1 and dev.index is not None:  # every rank would take that one GPU: NCCL refuses duplicates
                raise ValueError(f"{device!r} under torchrun: each process takes the GPU of its LOCAL_RANK; "
                                 "give cuda (or auto)")
            if dev.index is None:
                count = torch.cuda.device_count()  # 1 where the launcher shows each process its own GPU only
                if local >= count > 1:
                    raise ValueError(f"LOCAL_RANK {local}, but this process sees {count} GPUs")
                dev = torch.device("cuda", local if local < count else 0)
            torch.cuda.set_device(dev)
        if world > 1 and not dist.is_initialized():  # device_id: NCCL bound to this GPU (barrier, object collectives)
            kw = {"device_id": dev} if dev.type == "cuda" else {}
            if dev.type == "cuda" and torch.cuda.device_count() == 1:  # its own GPU, or one GPU for all?
                gpu = str(torch.cuda.get_device_properties(dev).uuid)
                kw.update(store=_refuse_shared_gpu(rank, world, gpu), rank=rank, world_size=world)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", **kw)
        return cls(rank, world, local, dev)

    def any(self, *flags: bool) -> list[bool]:
        """Each flag true on every rank if it is true on any (to stop together); one all-reduce."""
        if self.world == 1:
            return [bool(f) for f in flags]
        t = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def broadcast(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.broadcast(t, 0)
        return t.item()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def same_weights(self, model: nn.Module) -> tuple[bool, str]:
        """Whether every rank holds bit-identical weights (DDP replicas must); with the digest of rank 0's."""
        import hashlib

        h = hashlib.sha1()
        for t in model.state_dict().values():
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digests = [h.hexdigest()]
        if self.world > 1:
            digests = [None] * self.world
            dist.all_gather_object(digests, h.hexdigest())
        return len(set(digests)) == 1, digests[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _refuse_shared_gpu(rank: int, world: int, gpu: str) -> dist.Store:
    """Each process sees one GPU: a launcher gave each its own, or torchrun started more processes than the
    machine has GPUs. GPU UUIDs tell which, through the rendezvous store, before NCCL stops with its own
    "Duplicate GPU" error. Returns the store for init_process_group."""
    from datetime import timedelta

    from .recipe import RecipeError

    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timedelta(minutes=10)))
    key = f"vitkit/gpu/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/"  # a restarted job: fresh keys
    store.set(key + str(rank), gpu)
    sharing = [r for r in range(world) if store.get(key + str(r)).decode() == gpu]
    store.set(f"{key}read/{rank}", "1")
    if rank == 0:  # the store's server may live in this process: it stays until every rank has read (a
        # rank 0 that raised at once closed it under rank 1's reads, once in the test suite: a network error there)
        store.wait([f"{key}read/{r}" for r in range(world)])
    if len(sharing) > 1:
        raise RecipeError(f"torchrun: ranks {', '.join(map(str, sharing))} would share GPU {gpu}: start at most as "
                          "many processes per machine as it has GPUs (torchrun --nproc_per_node)")
    return dist.PrefixStore("default_pg", store)


def wrap(model: nn.Module, d: Dist, strategy: str) -> nn.Module:
    """DDP, or FSDP2 sharding each block and then the rest (parameters, gradients, optimizer state sharded)."""
    if d.world == 1:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    # a micro-batch of one image gives the [class] token's gradient as a strided view (the expand's backward is
    # then a no-op): DDP copies those 192-odd numbers into its bucket, and says so on every rank
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def full_state(model: nn.Module, optimizer=None, sharded: bool = False) -> tuple[dict, dict | None]:
    """Model (and optimizer) state as full CPU tensors, under every strategy (FSDP gathers the shards;
    then only rank 0 gets them)."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=opts),
            get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None)


def load_full_state(model: nn.Module, optimizer, model_sd: dict, optim_sd: dict | None, sharded: bool) -> None:
    if not sharded:
        model.load_state_dict(model_sd)
        if optim_sd is not None:
            optimizer.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=opts)
    if optim_sd is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
