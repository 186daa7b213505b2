"""Data-parallel training: the same `bdh train` under `torchrun --nproc_per_node K`.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; every process then builds the same model, wraps it
in DistributedDataParallel (gradients are averaged across processes in backward) and draws its
own batches. Only rank 0 prints, evaluates and writes files.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bdh.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environ(environ=None) -> DistEnv:
    """The process's place in a torchrun job (a world of one when not launched by torchrun)."""
    environ = os.environ if environ is None else environ
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init(env: DistEnv, device: torch.device, init_method: str = "env://") -> None:
    """Join the process group (gloo on the CPU, nccl on CUDA); nothing to do for one process."""
    if not env.enabled or (dist.is_available() and dist.is_initialized()):
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), init_method=init_method, rank=env.rank,
                            world_size=env.world_size)


def shutdown(env: DistEnv, finished: bool = True) -> None:
    """Leave the process group. After a finished run every rank first waits for the others, so
    that none tears its connections down while a peer still uses them (gloo then aborts the
    process: SIGABRT, "terminate called without an active exception", about 1 run in 10 of the
    DDP test). After a failure it leaves at once: the peers may never reach the barrier."""
    if env.enabled and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, env: DistEnv, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the model when there are several processes."""
    if not env.enabled:
        return model
    ids = [device.index if device.index is not None else env.local_rank] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def no_sync(model: nn.Module, skip: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (only the last one syncs)."""
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP and torch.compile wrappers (what checkpoints hold)."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def all_reduce_sum(values: list[float], env: DistEnv, device: torch.device) -> list[float]:
    """Sum a few floats over all processes (one collective)."""
    if not env.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def gather_objects(obj: Any, env: DistEnv) -> list[Any] | None:
    """Every process's obj on rank 0 (None elsewhere); JSON-like objects only."""
    if not env.enabled:
        return [obj]
    out = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def gather_tensor(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor | None:
    """Concatenate every process's tensor along dim 0 on rank 0 (None elsewhere)."""
    if not env.enabled:
        return tensor
    tensor = tensor.contiguous()
    if backend_for(tensor.device) == "nccl":
        parts = [torch.empty_like(tensor) for _ in range(env.world_size)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts) if env.is_main else None
    parts = [torch.empty_like(tensor) for _ in range(env.world_size)] if env.is_main else None
    dist.gather(tensor, parts, dst=0)
    return torch.cat(parts) if env.is_main else None


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's obj on every process."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()
