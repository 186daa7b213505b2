"""Chunked linear attention: linear in T, carrying the state from chunk to chunk.

Within a chunk of C tokens the quadratic form is exact and cheap; across chunks the state S
(N x D per head) carries everything earlier. Per token: C N + C D for the chunk, 2 N D for the
state read and write, against T (N + D) for the quadratic form over the whole sequence.
"""

from __future__ import annotations

import torch

from bdh.ops.naive import naive_attention


def chunked_attention(q, k, v, initial_state=None, decay=None, output_final_state=True, chunk_size=128):
    """Same signature and result as bdh.ops.naive.naive_attention; see there for shapes."""
    T = q.shape[-2]
    state = initial_state
    outs = []
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        last = end == T
        o, state = naive_attention(
            q[:, :, start:end],  # B, nh, C, N
            k[:, :, start:end],
            v[:, :, start:end],  # B, 1|nh, C, D
            initial_state=state,
            decay=decay,
            output_final_state=output_final_state or not last,
        )
        outs.append(o)
    return torch.cat(outs, dim=2), state  # B, nh, T, D
