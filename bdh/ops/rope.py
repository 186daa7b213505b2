"""Rotary position encoding in neuron space.

Each neuron k has its own frequency (cycles per token); neurons 2i and 2i+1 share one and are
rotated as a pair. Frequencies are stored per head and neuron in the model (merging concatenates
them), never recomputed from N at load.
"""

from __future__ import annotations

import math

import torch


def rope_freqs(n_neurons: int, theta: float = 65536.0) -> torch.Tensor:
    """Reference frequencies: f[k] = theta^(-2 floor(k/2) / N) / (2 pi), in float32 as the authors."""
    k = torch.arange(n_neurons, dtype=torch.float32)
    paired = torch.floor(k / 2) * 2
    return 1.0 / (theta ** (paired / n_neurons)) / (2 * math.pi)  # N


def rope_tables(positions: torch.Tensor, freqs: torch.Tensor, dtype: torch.dtype = torch.float32):
    """cos and sin of the phases 2 pi frac(t f_k), exact at large absolute positions.

    positions: (P, T) int64 absolute positions (P = 1 or B); freqs: (nh, N).
    Returns cos, sin of shape (P, nh, T, N). The product t * f is formed in float64 and reduced
    mod 1 before the cast, so the phase error stays ~1e-7 rad even at t = 1e7 (float32 would
    drift by ~0.05 rad at t = 1e6). cos and sin are taken in float64 too: torch 2.13's float32
    cos on this AVX-512 CPU was off by up to 1.5e-4 in about one process in five, which made
    tests/test_model.py::test_logits_equal_reference_code fail at random.
    """
    cycles = positions.to(torch.float64)[:, None, :, None] * freqs.to(torch.float64)[None, :, None, :]
    phase = torch.frac(cycles) * (2 * math.pi)  # P, nh, T, N, float64
    return torch.cos(phase).to(dtype), torch.sin(phase).to(dtype)


def rope_rotors(positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """exp(i phase) for every neuron pair: complex64 (P, nh, T, N/2); pairs share a frequency."""
    cos, sin = rope_tables(positions, freqs[:, ::2])
    return torch.complex(cos, sin)


def apply_rope_complex(x: torch.Tensor, rotors: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """apply_rope as one complex multiply per pair (a + ib)(cos + i sin): a third of the passes.

    out: a contiguous tensor like x (float32/float64) to write into instead of a fresh one.
    """
    real = x if x.dtype in (torch.float32, torch.float64) else x.float()
    pairs = torch.view_as_complex(real.unflatten(-1, (-1, 2)))  # B, nh, T, N/2
    if out is not None:
        torch.mul(pairs, rotors, out=torch.view_as_complex(out.unflatten(-1, (-1, 2))))
        return out
    return torch.view_as_real(pairs * rotors).flatten(-2).to(x.dtype)  # B, nh, T, N


def pairs_share_frequencies(freqs: torch.Tensor) -> bool:
    """The rotation pairs neurons 2i and 2i+1, which is a rotation only if they share f."""
    return freqs.shape[-1] % 2 == 0 and bool(torch.equal(freqs[..., ::2], freqs[..., 1::2]))


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """rot(x)[2i] = -x[2i+1], rot(x)[2i+1] = x[2i]."""
    pairs = x.unflatten(-1, (-1, 2))  # ..., N/2, 2
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x cos + rot(x) sin; x: (B, nh, T, N), cos/sin broadcastable to it."""
    return x * cos + rotate_pairs(x) * sin


def rotate_(x: torch.Tensor, rotors: torch.Tensor) -> torch.Tensor:
    """apply_rope_complex in place: x (B, nh, T, N) contiguous float32/float64."""
    torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(rotors)  # B, nh, T, N/2
    return x
