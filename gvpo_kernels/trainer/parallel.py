"""Data parallelism on torch.distributed: which rank this is, wrapping the policy in DDP or FSDP2, per-rank seeds,
and the sums over ranks that make the logged metrics those of the whole step.

Under ``torchrun --nproc-per-node W gvpo-train ...`` every rank holds the policy (DDP) or a shard of it (FSDP2's
``fully_shard``, ``--fsdp``), rolls out its W-th of the step's prompts with its own seed, and the gradient is
averaged over ranks. Groups stay whole on a rank and every rank holds the same number of them, so the average of
the ranks' losses (each a mean over its groups) is the mean over all groups of the step: the loss one process
holding the whole step would minimise, with no rescaling. One process without torchrun is world size 1.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes (size 1: no torch.distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints and writes files."""
        return self.rank == 0


def world_from_env() -> World:
    """The world torchrun describes (RANK, WORLD_SIZE), or an already initialised process group, or one process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def init(world: World, device: torch.device) -> bool:
    """Join the process group torchrun set up (NCCL on CUDA, else gloo); True when this call created it (the caller
    then destroys it at the end). A group initialised by the caller is used as it is."""
    if world.size == 1 or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10))
    return True


def rank_device(name: str | None, world: World) -> torch.device:
    """``name``, else cuda when available, else cpu; on CUDA with several ranks, the rank's own GPU (LOCAL_RANK)."""
    device = torch.device(name if name else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and world.size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", world.rank % torch.cuda.device_count())))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The sampling seed of ``rank`` from rollout step ``step``: ``seed`` itself on rank 0 from the start (one
    process runs exactly as it always did), a distinct stream derived from (seed, rank, step) otherwise."""
    return seed if rank == step == 0 else random.Random(f"{seed}:rank{rank}:step{step}").getrandbits(63)


def wrap(module: torch.nn.Module, world: World, device: torch.device, fsdp: bool) -> torch.nn.Module:
    """``module`` as the update calls it: itself (one process), DDP, or FSDP2 with each decoder layer and then the
    whole module sharded (``fully_shard``). Every use of the weights must go through ``module.forward``, where
    DDP and FSDP hook in."""
    if world.size == 1:
        return module
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world.size,))
        for layer in decoder_layers(module):
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers decoder (the ModuleList with the most parameters), FSDP's units."""
    lists = [m for m in module.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"fsdp: {type(module).__name__} has no ModuleList of decoder layers to shard")
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def is_fsdp(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def gradient_sync(policy: torch.nn.Module, sync: bool):
    """A context in which backward passes average gradients over ranks (``sync``) or only accumulate them."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(policy, "no_sync"):  # DDP
        return policy.no_sync()
    if is_fsdp(policy):
        return _fsdp_no_sync(policy)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(policy):
    policy.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        policy.set_requires_gradient_sync(True)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's shards) gathered into a plain tensor; any other tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """``values`` summed over the ranks of ``world`` (float64), in one collective; as they are with one process."""
    if world.size == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_max(value: float, world: World, device: torch.device) -> float:
    if world.size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def gather_objects(obj, world: World) -> list:
    """Every rank's ``obj`` (a list on every rank, in rank order)."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
