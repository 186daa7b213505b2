"""What every language model in the package returns, BDH and baselines alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
    """Mean cross-entropy of logits (B, T, V) against targets (B, T), in float32; -1 targets are ignored."""
    if targets is None:
        return None
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)


def next_positions(state, batch_size: int, T: int, device) -> torch.Tensor:
    """Absolute position (B,) after T more tokens on top of a state's (or from 0 without one)."""
    start = state.pos if state is not None else torch.zeros(batch_size, dtype=torch.long, device=device)
    return start + T


@dataclass
class ModelOutput:
    logits: torch.Tensor  # B, T, V (float32)
    loss: torch.Tensor | None  # mean next-token cross-entropy, None without targets
    state: Any  # the model's state after the last token (BDHState, or a baseline's cache)
