"""Compute dtypes: float32 by default, autocast to bfloat16/float16 where asked (state stays fp32)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from bdh.errors import UserError

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_for(compute_dtype: str, device: torch.device):
    """The autocast context of a model's compute_dtype on this device (none for float32)."""
    dtype = COMPUTE_DTYPES[compute_dtype]
    if dtype == torch.float32:
        return nullcontext()
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("compute_dtype float16 needs a CUDA device; on the CPU use bfloat16 or float32")
    return torch.autocast(device_type=device.type, dtype=dtype)
