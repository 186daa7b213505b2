"""Chunked linear attention: linear in T, carrying the state from chunk to chunk.

Within a chunk of C tokens the quadratic form is exact and cheap; across chunks the state S
(N x D per head) carries everything earlier. Per token and head: C (N + D) multiply-adds for the
chunk, 2 N D for the state read and write, against T (N + D) for the quadratic form over the
whole sequence. All full chunks are computed at once (batched matmuls, no Python loop over
chunks except the decaying state scan); a ragged tail goes through the quadratic form.

For chunk c with rotated queries Q_c, keys K_c, values V_c and entering state S_c:
    o_c = (tril(Q_c K_c^T, -1) * lambda^(i - j)) V_c + lambda^i Q_c S_c
    S_{c+1} = lambda^C S_c + (K_c * lambda^(C - j))^T V_c
"""

from __future__ import annotations

import torch

from bdh.ops.naive import causal_scores, decay_powers, naive_attention, state_dtype


def chunked_attention(q, k, v, initial_state=None, decay=None, output_final_state=True, chunk_size=128):
    """Same signature and result as bdh.ops.naive.naive_attention; see there for shapes."""
    T = q.shape[-2]
    C = chunk_size
    full = (T // C) * C
    if T <= C:
        return naive_attention(q, k, v, initial_state, decay, output_final_state)
    o, state = _full_chunks(q[:, :, :full], k[:, :, :full], v[:, :, :full], initial_state, decay, C,
                            need_state=output_final_state or full < T)
    if full == T:
        return o, state
    o_tail, state = naive_attention(q[:, :, full:], k[:, :, full:], v[:, :, full:], state, decay, output_final_state)
    return torch.cat([o, o_tail], dim=2), state  # B, nh, T, D


def _full_chunks(q, k, v, initial_state, decay, C, need_state):
    """T a multiple of C: returns o (B, nh, T, D) and the state after the last chunk."""
    B, nh, T, N = q.shape
    D = v.shape[-1]
    nc = T // C
    qc = q.reshape(B, nh, nc, C, N)
    kc = k.reshape(B, nh, nc, C, N)
    vc = v.reshape(B, v.shape[1], nc, C, D)
    o = causal_scores(qc, kc, decay) @ vc  # B, nh, nc, C, D
    kv = _chunk_writes(kc, vc, decay, C)  # B, nh, nc, N, D: each chunk's write, weighted to its end
    entering, final = _scan_states(kv, initial_state, decay, C, need_state)  # B, nh, nc, N, D
    if entering is not None:
        read = qc @ entering.to(q.dtype)  # B, nh, nc, C, D
        if decay is not None:
            steps = torch.arange(C, device=q.device)
            read = read * decay_powers(decay, steps)[:, None, :, None].to(dtype=read.dtype)
        o = o + read
    return o.reshape(B, nh, T, D), final


def _chunk_writes(kc, vc, decay, C):
    if decay is not None:
        steps = torch.arange(C - 1, -1, -1, device=kc.device) + 1  # C - j for j = 0..C-1
        kc = kc * decay_powers(decay, steps)[:, None, :, None].to(dtype=kc.dtype)
    return (kc.transpose(-1, -2) @ vc).to(state_dtype(kc))  # B, nh, nc, N, D


def _scan_states(kv, initial_state, decay, C, need_state):
    """States entering every chunk (None if all zero) and the state after the last one."""
    nc = kv.shape[2]
    if decay is None:
        totals = kv.cumsum(dim=2)  # B, nh, nc, N, D: state after each chunk, from zero
        if initial_state is not None:
            totals = totals + initial_state.to(kv.dtype).unsqueeze(2)
        start = initial_state.to(kv.dtype).unsqueeze(2) if initial_state is not None else torch.zeros_like(kv[:, :, :1])
        entering = torch.cat([start, totals[:, :, :-1]], dim=2)
        return entering, (totals[:, :, -1] if need_state else None)
    lam_c = decay_powers(decay, torch.tensor(C, device=kv.device)).to(kv.dtype).view(1, -1, 1, 1)  # 1, nh, 1, 1
    state = initial_state.to(kv.dtype) if initial_state is not None else torch.zeros_like(kv[:, :, 0])
    entering = []
    for c in range(nc):
        entering.append(state)
        state = state * lam_c + kv[:, :, c]
    return torch.stack(entering, dim=2), (state if need_state else None)
