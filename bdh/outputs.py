"""What every language model in the package returns, BDH and baselines alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ModelOutput:
    logits: torch.Tensor  # B, T, V (float32)
    loss: torch.Tensor | None  # mean next-token cross-entropy, None without targets
    state: Any  # the model's state after the last token (BDHState, or a baseline's cache)
