"""The authors' BDH-GPU forward pass, restated from their public bdh.py for equivalence tests.

Deliberately written the way the reference computes it (float32 phases from arange * freqs,
tril(QK^T, -1) V over the whole sequence, heads concatenated before the decoder), and sharing no
code with the package.
"""

import math

import torch
import torch.nn.functional as F


def reference_freqs(N, theta=2.0**16):
    k = torch.arange(0, N, 1, dtype=torch.float32)
    return (1.0 / (theta ** ((k / 2).floor() * 2 / N)) / (2 * math.pi)).view(1, 1, 1, N)


def reference_rope(phases, x):
    x_rot = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).view(*x.size())
    phases = (phases % 1) * (2 * math.pi)
    return x * torch.cos(phases) + x_rot * torch.sin(phases)


def reference_forward(sd, idx, n_layer):
    """sd: a reference-style state_dict; idx (B, T) -> logits (B, T, V)."""
    enc, enc_v, dec = sd["encoder"], sd["encoder_v"], sd["decoder"]
    nh, D, N = enc.shape
    B, T = idx.shape
    ln = lambda t: F.layer_norm(t, (D,), eps=1e-5)  # noqa: E731
    x = ln(F.embedding(idx, sd["embed.weight"]).unsqueeze(1))  # B,1,T,D
    phases = torch.arange(0, T, dtype=torch.float32).view(1, 1, -1, 1) * sd["attn.freqs"]
    for _ in range(n_layer):
        x_sparse = F.relu(x @ enc)  # B,nh,T,N
        qr = reference_rope(phases, x_sparse)
        scores = (qr @ qr.mT).tril(diagonal=-1)
        yKV = ln(scores @ x)
        y_sparse = F.relu(yKV @ enc_v)
        xy = x_sparse * y_sparse
        yMLP = xy.transpose(1, 2).reshape(B, 1, T, N * nh) @ dec
        x = ln(x + ln(yMLP))
    return x.view(B, T, D) @ sd["lm_head"]


def random_reference_state_dict(nh=2, D=32, N=64, V=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    return {
        "encoder": randn(nh, D, N), "encoder_v": randn(nh, D, N), "decoder": randn(nh * N, D),
        "embed.weight": randn(V, D), "lm_head": randn(D, V), "lm_gate": randn(D, 1),
        "attn.freqs": reference_freqs(N),
    }
