"""BriLLM written straight from the paper's equations (arXiv 2503.11299), one loop per sequence,
position and candidate: the ground truth the vectorised bdh.baselines.brillm is tested against.

It reads the model's parameters but none of its index arithmetic: the owned bigrams of the sparse
variant come from a plain dict, positions from math.sin / math.cos.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F


def positional(p: int, d: int, multiply: bool = False) -> torch.Tensor:
    out = []
    for k in range(0, d, 2):
        angle = p * 10000.0 ** (k / d) if multiply else p / 10000.0 ** (k / d)
        out += [math.sin(angle), math.cos(angle)]
    return torch.tensor(out)


def edge_table(model) -> dict[tuple[int, int], int]:
    """(u, v) -> slot of every bigram owning an edge matrix (the rest share slot 0 when sparse)."""
    V = model.config.vocab_size
    if not model.config.sparse:
        return {(u, v): u * V + v for u in range(V) for v in range(V)}
    keys = [int(k) for k in model.edge_keys if int(k) < V * V]
    return {(k // V, k % V): i + 1 for i, k in enumerate(sorted(keys))}


def edge(model, table, c, u, v, p):
    """E(v) = GELU(c W_uv + b_uv + PE_p)."""
    slot = table.get((u, v), 0)
    pe = positional(p, model.config.d, model.config.pe_multiply)
    return F.gelu(c @ model.edge_weight[slot] + model.edge_bias[slot] + pe)


def sequence_energies(model, seq: list[int], candidates=None, pe_shift: int = 0) -> list[list[torch.Tensor]]:
    """energies[i][j] = ||E_{i+1}(v_j)|| for candidate v_j of position i (all V when None)."""
    cfg = model.config
    table = edge_table(model)
    s0 = F.gelu(torch.full((cfg.d,), 1.0 / cfg.d) + model.node_bias[seq[0]] + positional(0, cfg.d, cfg.pe_multiply))
    path = []  # E_1, E_2, ...: the edge outputs along the true path
    out = []
    for i, u in enumerate(seq):
        if i == 0 or cfg.context == "start":
            c = s0
        else:
            w = torch.softmax(model.position_logits[:i], dim=0)  # softmax(a_1..a_i)
            c = sum(w[j] * path[j] for j in range(i))
        vs = range(cfg.vocab_size) if candidates is None else candidates[i]
        row = []
        for v in vs:
            e = torch.linalg.vector_norm(edge(model, table, c, u, v, i + 1 - pe_shift))
            row.append(-math.inf * torch.ones(()) if cfg.exclude_self and v == u else e)
        out.append(row)
        if i + 1 < len(seq):
            path.append(edge(model, table, c, u, seq[i + 1], i + 1 - pe_shift))
    return out


def logits(model, idx: torch.Tensor, pe_shift: int = 0) -> torch.Tensor:
    """(B, T, V) energies of every candidate."""
    return torch.stack([torch.stack([torch.stack(row) for row in sequence_energies(model, seq.tolist(), None, pe_shift)])
                        for seq in idx])


def successors(tokens: list[int], V: int, k: int) -> list[list[int]]:
    """Each token's k most frequent successors; ties and missing ones: most frequent tokens overall."""
    pairs = Counter(zip(tokens[:-1], tokens[1:]))
    unigram = Counter(tokens)
    fill = sorted(range(V), key=lambda v: (-unigram[v], v))
    table = []
    for u in range(V):
        table.append(sorted(range(V), key=lambda v: (-pairs[(u, v)], fill.index(v)))[:k])
    return table


def owned_bigrams(tokens: list[int], m: int) -> set[tuple[int, int]]:
    """The m most frequent bigrams (ties: the smaller (u, v) first)."""
    pairs = Counter(zip(tokens[:-1], tokens[1:]))
    return set(sorted(pairs, key=lambda uv: (-pairs[uv], uv))[:m])


def sampled_loss(model, idx: torch.Tensor, targets: torch.Tensor, negatives) -> torch.Tensor:
    """Mean over positions of -log softmax over {true next} + (negatives != true next), true first.

    negatives[b][t]: the list of negatives of position t of sequence b."""
    terms = []
    for seq, tgt, negs in zip(idx.tolist(), targets.tolist(), negatives):
        cands = [[t] + [v for v in neg if v != t] for t, neg in zip(tgt, negs)]
        for row in sequence_energies(model, seq, cands):
            terms.append(-torch.log_softmax(torch.stack(row), dim=0)[0])
    return torch.stack(terms).mean()
