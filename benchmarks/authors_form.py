"""The authors' BDH-GPU training forward, restated in this project's code for benchmarking.

Same operations in the same order as their public bdh.py (pathwaycom/bdh): float32 RoPE phases
from arange * freqs, keys equal to the rotated queries, tril(Q K^T, -1) V over the whole sequence
with every intermediate a fresh autograd tensor, dropout on x * y, heads concatenated before the
decoder, LayerNorms without affine weights. Not part of the package: it exists so that
benchmarks/vs_authors.py can time the default path of `bdh` against the computation a user of
their code runs, on the same weights (`AuthorsForm.from_bdh`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AuthorsForm(nn.Module):
    def __init__(self, n_layer: int, n_embd: int, n_head: int, N: int, vocab_size: int, dropout: float):
        super().__init__()
        self.n_layer, self.N = n_layer, N
        self.encoder = nn.Parameter(torch.empty(n_head, n_embd, N))
        self.encoder_v = nn.Parameter(torch.empty(n_head, n_embd, N))
        self.decoder = nn.Parameter(torch.empty(n_head * N, n_embd))
        self.embed = nn.Embedding(vocab_size, n_embd)
        self.lm_head = nn.Parameter(torch.empty(n_embd, vocab_size))
        self.register_buffer("freqs", torch.empty(1, 1, 1, N))
        self.drop = nn.Dropout(dropout)
        self.ln = nn.LayerNorm(n_embd, elementwise_affine=False, bias=False)

    @classmethod
    def from_bdh(cls, model) -> "AuthorsForm":
        """The same weights as a bdh.BDH (whose RoPE frequencies are the authors' per neuron)."""
        c = model.config
        form = cls(c.n_layer, c.n_embd, c.n_head, c.neurons_per_head, c.vocab_size, c.dropout)
        with torch.no_grad():
            for name in ("encoder", "encoder_v", "decoder", "lm_head"):
                getattr(form, name).copy_(getattr(model, name))
            form.embed.weight.copy_(model.embed.weight)
            form.freqs.copy_(model.freqs[0].view(1, 1, 1, -1))
        return form

    @staticmethod
    def rope(phases, v):
        v_rot = torch.stack((-v[..., 1::2], v[..., ::2]), dim=-1).view(*v.size())
        phases = (phases % 1) * (2 * math.pi)
        return v * torch.cos(phases) + v_rot * torch.sin(phases)

    def attention(self, Q, V):
        T = Q.size(-2)
        phases = torch.arange(0, T, device=Q.device, dtype=torch.float32).view(1, 1, -1, 1) * self.freqs
        QR = self.rope(phases, Q)
        KR = QR
        return (QR @ KR.mT).tril(diagonal=-1) @ V

    def forward(self, idx, targets=None):
        B, T = idx.size()
        D = self.embed.embedding_dim
        nh = self.encoder.shape[0]
        x = self.ln(self.embed(idx).unsqueeze(1))  # B, 1, T, D
        for _ in range(self.n_layer):
            x_sparse = F.relu(x @ self.encoder)  # B, nh, T, N
            yKV = self.ln(self.attention(x_sparse, x))
            y_sparse = F.relu(yKV @ self.encoder_v)
            xy_sparse = self.drop(x_sparse * y_sparse)  # B, nh, T, N
            yMLP = xy_sparse.transpose(1, 2).reshape(B, 1, T, self.N * nh) @ self.decoder  # B, 1, T, D
            x = self.ln(x + self.ln(yMLP))
        logits = x.view(B, T, D) @ self.lm_head
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss
