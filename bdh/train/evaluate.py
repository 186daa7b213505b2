"""Validation loss, bits per byte and perplexity on fixed windows of a token array."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

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
    #: translation: {direction: {"loss", "tokens"}}, the loss on that direction's target tokens only
    targets: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, float]:
        out = {"loss": self.loss, "bpb": self.bpb, "ppl": self.ppl, "tokens": self.tokens, "se": self.se,
               "batches": self.batches}
        if self.targets:
            out["targets"] = self.targets
        return out

    def metrics(self, prefix: str = "val_") -> dict[str, float]:
        """Flat metrics: loss, bits/byte, perplexity and (translation) the target loss of each direction."""
        out = {f"{prefix}loss": self.loss, f"{prefix}bpb": self.bpb, f"{prefix}ppl": self.ppl}
        for name, t in self.targets.items():
            if t["loss"] is not None:
                out[f"{prefix}target_loss[{name}]"] = t["loss"]
        return out


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
    return _result(total, count, token_byte_ratio, per_batch=per_batch)


def _result(total: float, count: int, token_byte_ratio: float, targets=None, per_batch=None) -> EvalResult:
    loss = total / max(count, 1)
    per_batch = per_batch or []
    return EvalResult(loss=loss, bpb=bits_per_byte(loss, token_byte_ratio), ppl=math.exp(min(loss, 700.0)),
                      tokens=count, se=standard_error(per_batch), batches=len(per_batch), batch_losses=per_batch,
                      targets=targets or {})


@torch.no_grad()
def evaluate_tagged(model, tagged, batch_size: int, block_size: int, max_batches: int | None, device,
                    token_byte_ratio: float) -> EvalResult:
    """Loss on a tagged stream (bdh.data.parallel.TaggedTokens): over all tokens, and over the target
    tokens of each direction alone.

    A model whose state can be carried reads the stream in `batch_size` lanes that begin at pair
    boundaries, `block_size` tokens at a time with its state carried (as it was trained), so every
    target is scored with its source in context; at most `max_batches` windows per lane (None: the
    whole stream). Other models are scored on independent windows (eval_batches).
    """
    tokens, roles = tagged.tokens, tagged.roles
    check_eval_length(tokens, block_size)
    was_training = model.training
    model.eval()
    n_dir = len(tagged.directions)
    sums = torch.zeros(n_dir + 1, dtype=torch.float64)  # per direction, then all tokens
    counts = torch.zeros(n_dir + 1, dtype=torch.float64)
    per_batch: list[float] = []
    try:
        if model.carries_state:
            batches = _lane_batches(tokens, roles, tagged.pair_starts, batch_size, block_size, max_batches, device)
        else:
            batches = ((x, y, ry) for (x, y), (_, ry) in zip(
                eval_batches(tokens, batch_size, block_size, max_batches, device=device),
                eval_batches(roles, batch_size, block_size, max_batches, device=device)))
        state = None
        for x, y, ry, *fresh in batches:
            out = model(x, state=None if fresh and fresh[0] else state, return_state=model.carries_state)
            state = out.state
            losses = F.cross_entropy(out.logits.flatten(0, 1), y.flatten().clamp(min=0), reduction="none").cpu()
            keep = (y.flatten() >= 0).cpu()
            ry = ry.flatten().cpu()
            sums[-1] += losses[keep].double().sum()
            counts[-1] += keep.sum()
            if keep.any():
                per_batch.append(float(losses[keep].double().mean()))
            for k in range(n_dir):
                mask = keep & (ry == k)
                sums[k] += losses[mask].double().sum()
                counts[k] += mask.sum()
    finally:
        model.train(was_training)
    # a direction with no target in the windows read has no loss (None), not a loss of 0
    targets = {name: {"loss": float(sums[k] / counts[k]) if counts[k] else None, "tokens": int(counts[k])}
               for k, name in enumerate(tagged.directions)}
    return _result(float(sums[-1]), int(counts[-1]), token_byte_ratio, targets, per_batch)


def _lane_batches(tokens, roles, pair_starts, batch_size: int, block_size: int, max_batches: int | None, device):
    """(x, y, target roles, fresh) windows of `batch_size` lanes, each lane a run of whole pairs.

    Past the end of a lane the inputs are 0 and the targets -1 (ignored); fresh is True on the
    first window (no state yet).
    """
    n = len(pair_starts)
    B = max(1, min(batch_size, n))
    cuts = [int(pair_starts[(j * n) // B]) for j in range(B)] + [len(tokens)]
    cuts[0] = 0
    lanes = [(cuts[j], cuts[j + 1]) for j in range(B)]
    longest = max(end - start for start, end in lanes)
    windows = max(1, -(-(longest - 1) // block_size))
    if max_batches is not None:
        windows = min(windows, max_batches)
    T = block_size
    for w in range(windows):
        x = np.zeros((B, T), dtype=np.int64)
        y = np.full((B, T), -1, dtype=np.int64)
        ry = np.full((B, T), -1, dtype=np.int64)
        for j, (start, end) in enumerate(lanes):
            a = start + w * T
            m = max(0, min(T, end - 1 - a))  # inputs with a next token inside the lane
            if m:
                x[j, :m] = tokens[a:a + m]
                y[j, :m] = tokens[a + 1:a + m + 1]
                ry[j, :m] = roles[a + 1:a + m + 1]
        yield (torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), torch.from_numpy(ry).to(device),
               w == 0)
