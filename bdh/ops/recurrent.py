"""Recurrent form: one token at a time, read then write. The form generation uses.

The cost per token is O(N D) per head whatever the context length: the state holds the past.
"""

from __future__ import annotations

import torch

from bdh.ops.naive import state_dtype


def recurrent_step(q_t, k_t, v_t, state, decay=None):
    """One token. q_t, k_t: (B, nh, N); v_t: (B, 1|nh, D); state: (B, nh, N, D) float32 or None.

    Returns o_t (B, nh, D) and the new state; the input state is not modified.
    """
    B, nh, N = q_t.shape
    D = v_t.shape[-1]
    acc = state_dtype(q_t)
    if state is None:
        o_t = q_t.new_zeros(B, nh, D)
        state = q_t.new_zeros(B, nh, N, D, dtype=acc)
    else:
        o_t = (q_t.to(state.dtype).unsqueeze(-2) @ state).squeeze(-2).to(q_t.dtype)  # B, nh, D
    keys = k_t.to(state.dtype).reshape(B * nh, N, 1)  # B*nh, N, 1
    values = v_t.to(state.dtype).expand(B, nh, D).reshape(B * nh, 1, D)  # B*nh, 1, D
    state = torch.baddbmm(state.reshape(B * nh, N, D), keys, values).view(B, nh, N, D)
    if decay is not None:
        state = state * decay.to(device=state.device, dtype=state.dtype).view(1, nh, 1, 1)
    return o_t, state


def recurrent_attention(q, k, v, initial_state=None, decay=None, output_final_state=True):
    """Same signature and result as bdh.ops.naive.naive_attention, one token at a time."""
    state = initial_state
    outs = []
    for t in range(q.shape[-2]):
        o_t, state = recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], state, decay)
        outs.append(o_t)
    o = torch.stack(outs, dim=2)  # B, nh, T, D
    return o, (state if output_final_state else None)
