"""ALiBi slopes, the one definition: GPT's attention biases and BDH's per-head state decay."""

from __future__ import annotations

import math


def alibi_slopes(n_head: int) -> list[float]:
    """m_h = 2^(-8h/nh), h = 1..nh (the ALiBi paper's geometric slopes)."""
    return [2.0 ** (-8.0 * h / n_head) for h in range(1, n_head + 1)]


def alibi_decays(n_head: int) -> list[float]:
    """The slopes read as a multiplicative per-token state decay: lambda_h = exp(-m_h) (the paper's U)."""
    return [math.exp(-m) for m in alibi_slopes(n_head)]
