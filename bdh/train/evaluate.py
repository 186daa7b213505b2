"""Validation loss, bits per byte and perplexity on fixed windows of a token array."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from bdh.data.batches import eval_batches
from bdh.errors import UserError


@dataclass
class EvalResult:
    loss: float  # mean next-token cross-entropy, nats per token
    bpb: float  # bits per byte of the text
    ppl: float  # per-token perplexity
    tokens: int  # target tokens scored
    se: float | None = None  # standard error of loss over the batches (None with fewer than 2 batches)
    batches: int = 0  # batches scored
    batch_losses: list[float] | None = None  # mean loss of every batch, in window order

    def to_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "bpb": self.bpb, "ppl": self.ppl, "tokens": self.tokens, "se": self.se,
                "batches": self.batches}


def standard_error(values) -> float | None:
    """Standard error of the mean of values (sample standard deviation / sqrt(n)); None below 2 values.

    Over validation batches it treats the batches as independent draws; neighbouring windows of
    one text are correlated, so it is a lower bound of the real uncertainty, not an exact one.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return None
    return float(v.std(ddof=1) / math.sqrt(v.size))


def tokens_per_byte(n_tokens: int, text: str) -> float:
    """Tokens per UTF-8 byte of the text they encode (1 for the byte tokenizer)."""
    n_bytes = len(text.encode("utf-8"))
    return n_tokens / n_bytes if n_bytes else 1.0


def bits_per_byte(loss_nats: float, token_byte_ratio: float) -> float:
    """nats/token -> bits/byte: divide by ln 2, multiply by tokens per byte."""
    return loss_nats / math.log(2) * token_byte_ratio


def check_eval_length(tokens: np.ndarray, block_size: int, what: str = "the validation split") -> None:
    if len(tokens) < block_size + 1:
        raise UserError(f"{what} has {len(tokens)} tokens but one window needs block_size + 1 = {block_size + 1}: "
                        "use a smaller --block-size or more text")


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, batch_size: int, block_size: int, max_batches: int | None,
             device, token_byte_ratio: float) -> EvalResult:
    """Mean loss over the deterministic validation windows (all of them when max_batches is None),
    with its standard error over the batches (every batch holds the same number of tokens)."""
    check_eval_length(tokens, block_size)
    was_training = model.training
    model.eval()
    per_batch: list[float] = []
    total, count = 0.0, 0
    try:
        for x, y in eval_batches(tokens, batch_size, block_size, max_batches, device=device):
            out = model(x, y, return_state=False)
            per_batch.append(float(out.loss))
            total += per_batch[-1] * y.numel()
            count += y.numel()
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return EvalResult(loss=loss, bpb=bits_per_byte(loss, token_byte_ratio), ppl=math.exp(min(loss, 700.0)),
                      tokens=count, se=standard_error(per_batch), batches=len(per_batch), batch_losses=per_batch)
