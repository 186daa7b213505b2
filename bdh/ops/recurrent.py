"""Recurrent form: one token at a time, read then write. The form generation uses.

The cost per token is O(N D) per head whatever the context length: the state holds the past.
"""

from __future__ import annotations

import torch

from bdh.ops.naive import state_dtype


def recurrent_step(q_t, k_t, v_t, state, decay=None):
    """One token. q_t, k_t: (B, nh, N); v_t: (B, 1|nh, D); state: (B, nh, N, D) float32 or None.

    Returns o_t (B, nh, D) and the new state; the input state is left as it was (decoding
    updates it in place instead: BDH._dense_layer).
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
    flat = state.view(B * nh, N, D)
    state = torch.baddbmm(flat, keys, values).view(B, nh, N, D)
    if decay is not None:
        state = state * decay.to(device=state.device, dtype=state.dtype).view(1, nh, 1, 1)
    return o_t, state


def active_neurons(x_rows: torch.Tensor, below: float) -> torch.Tensor | None:
    """Indices into nh * N of the neurons in RoPE pairs with any active neuron in any row, or
    None when the active pairs are not fewer than `below` of all. x_rows: (nh, B, N), x >= 0.

    RoPE mixes neurons 2i and 2i+1, so a pair is read and written as soon as one of them fires.
    """
    on = x_rows.unflatten(-1, (-1, 2)).sum(dim=(1, -1)).flatten() > 0  # nh * N/2 (x >= 0: > 0 iff any fires)
    pairs = on.nonzero().squeeze(1)
    if pairs.numel() >= below * on.numel():
        return None
    return torch.stack((2 * pairs, 2 * pairs + 1), dim=1).flatten()  # k, ascending


def sparse_step_inplace(q_active, idx, v_t, state):
    """Read then write only the state rows idx, in place; heads are flattened into the rows.

    q_active: (B, k) rotated queries (= keys) of the active neurons; v_t: (B, D);
    state: (B, M, D) with M = nh N. Returns each active neuron's share of the read-out,
    q_i S_i (B, k, D); summed within a head they give its o_t. Cost O(k D) instead of O(M D).
    """
    q_active = q_active.to(state.dtype).unsqueeze(-1)  # B, k, 1
    reads = q_active * state.index_select(1, idx)  # B, k, D
    state.index_add_(1, idx, q_active * v_t.to(state.dtype).unsqueeze(1))
    return reads


def recurrent_attention(q, k, v, initial_state=None, decay=None, output_final_state=True):
    """Same signature and result as bdh.ops.naive.naive_attention, one token at a time."""
    state = initial_state
    outs = []
    for t in range(q.shape[-2]):
        o_t, state = recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], state, decay)
        outs.append(o_t)
    o = torch.stack(outs, dim=2)  # B, nh, T, D
    return o, (state if output_final_state else None)
