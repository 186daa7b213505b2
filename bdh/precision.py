"""Devices and compute dtypes, one definition for every command and model family.

float32 by default; autocast to bfloat16/float16 where a config asks (states stay float32).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from bdh.errors import UserError

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = tuple(COMPUTE_DTYPES)
DEVICE_HELP = "cpu, cuda, cuda:N, mps or auto (cuda when available)"


def autocast_for(compute_dtype: str, device: torch.device):
    """The autocast context of a model's compute_dtype on this device (none for float32)."""
    dtype = COMPUTE_DTYPES[compute_dtype]
    if dtype == torch.float32:
        return nullcontext()
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("compute_dtype float16 needs a CUDA device; on the CPU use bfloat16 or float32")
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_device_name(name: str) -> None:
    if name != "auto" and name.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise UserError(f"device must be {DEVICE_HELP}; got {name!r}")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device a --device value names; 'cuda' alone is this process's GPU (local_rank)."""
    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {name} was asked for, but CUDA is not available: use --device cpu")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    if name == "mps" and not (torch.backends.mps.is_available()):
        raise UserError("device mps was asked for, but it is not available: use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise UserError(f"bad device {name!r}: {str(err).splitlines()[0]}") from None
