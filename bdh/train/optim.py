"""AdamW with weight decay by tensor rank, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from bdh.protocol import ModelBase


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                   device_type: str = "cpu") -> torch.optim.AdamW:
    """Decay matrices and embeddings (dim >= 2), never biases or norms (nanoGPT's rule).

    BDH's weights are raw nn.Parameters, so choosing by module type (minGPT) would miss them.
    A family whose class sets `no_weight_decay = True` (e.g. MPL, whose parameters are
    those of weight distributions) gets no decay at all.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(model, ModelBase) and model.no_weight_decay:
        weight_decay = 0.0
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # the fused kernel exists for CUDA; elsewhere the default (foreach) implementation is used
    extra = {"fused": True} if device_type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **extra)


def lr_at(step: int, lr: float, min_lr: float, warmup_iters: int, decay_iters: int, decay: str = "cosine") -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then decay to min_lr."""
    if step < warmup_iters:
        return lr * (step + 1) / (warmup_iters + 1)
    return decayed(min(1.0, (step - warmup_iters) / max(1, decay_iters - warmup_iters)), lr, min_lr, decay)


def lr_on_clock(step: int, clock_s: float, warm_s: float, budget_s: float, lr: float, min_lr: float,
                warmup_iters: int, decay: str = "cosine") -> float:
    """Learning rate of step `step` when the run is a time budget (TrainConfig.train_seconds): the
    warm-up as in lr_at (steps), then the decay over the budget's seconds left after it, by the
    clock of training steps: clock_s seconds spent so far, warm_s when the warm-up ended."""
    if step < warmup_iters:
        return lr_at(step, lr, min_lr, warmup_iters, warmup_iters + 1, decay)
    return decayed(min(1.0, max(0.0, (clock_s - warm_s) / max(budget_s - warm_s, 1e-9))), lr, min_lr, decay)


def decayed(ratio: float, lr: float, min_lr: float, decay: str) -> float:
    """The decay from lr (ratio 0) to min_lr (ratio 1)."""
    if decay == "constant":
        return lr
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio)) if decay == "cosine" else 1.0 - ratio
    return min_lr + coeff * (lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
