"""Recurrent form: one token at a time, read then write.

Two kinds of functions live here:
- recurrent_step / recurrent_attention: the attention alone with the common signature (see
  bdh.ops.naive), a pure function of its inputs, tested against the token loop there;
- decode_layer / sparse_decode_layer: one whole BDH layer for one token, updating the state in
  place: the decoding step (BDH.step) calls them, and the tests hold them equal to the
  token-by-token loop (bdh.ops.naive.loop_attention) and to the model's sequence forward.

The cost per token is O(N D) per head whatever the context length: the state holds the past.
Decoding keeps activations as rows (nh, B, X) so that every weight and state is read in place
by one batched matmul, with few ops per layer (per-op overhead is most of a token's time at
small sizes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bdh.ops.layer import norm
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


def _ln(x, layernorm: bool):
    return norm(x) if layernorm else x


def decode_neurons(v: torch.Tensor, Dx: torch.Tensor) -> torch.Tensor:
    """x = relu(v D_x) as rows: v (B, D), D_x (nh, D, N) -> (nh, B, N)."""
    return torch.matmul(v, Dx).relu_()


def rotate_rows(x: torch.Tensor, rotors: torch.Tensor) -> torch.Tensor:
    """RoPE of rows x (nh, B, N) with rotors (nh, 1|B, N/2): the queries (= keys) q (nh, B, N)."""
    nh, B, N = x.shape
    pairs = torch.view_as_complex(x.reshape(nh, B, N // 2, 2)) * rotors
    return torch.view_as_real(pairs).view(nh, B, N)


def decode_layer(x, q, v, rho, Dy, E, decay=None, layernorm=True):
    """One layer of one token, dense: returns (z (B, D), a (nh, B, D), y (nh, B, N)); rho updated in place.

    x, q: rows (nh, B, N); v: (B, D); rho: (B, nh, N, D) float32; Dy: (nh, D, N); E: (nh, N, D);
    decay: (nh,) or None. Read a = q S, then write S <- lambda (S + q v^T), then
    y = relu(LN(a) D_y) * x and z = sum_h y_h E_h.
    """
    nh, B, N = q.shape
    D = v.shape[-1]
    S = rho.view(B * nh, N, D)
    q_b = q.transpose(0, 1).reshape(B * nh, 1, N).to(S.dtype)  # a copy only when B > 1
    a = torch.bmm(q_b, S)  # B*nh, 1, D: read, then write
    S.baddbmm_(q_b.transpose(1, 2), v.to(S.dtype).unsqueeze(1).expand(B, nh, D).reshape(B * nh, 1, D))
    if decay is not None:
        S.view(B, nh, N * D).mul_(decay.to(S.dtype).view(1, nh, 1))
    a = a.view(B, nh, D).transpose(0, 1).to(v.dtype)  # nh, B, D
    y = torch.matmul(_ln(a, layernorm), Dy).relu_().mul_(x)  # nh, B, N
    return torch.matmul(y, E).sum(dim=0), a, y  # B, D


def sparse_decode_layer(x, q, v, rho, active, Dy_rows, E_rows, layernorm=True):
    """decode_layer touching only the active neurons: returns (z (B, D), a (B, nh, D), y_active (B, k)).

    active: (k,) indices into nh * N (see active_neurons); Dy_rows: D_y as rows (nh * N, D);
    E_rows: E (nh * N, D). All heads at once: the state rows, D_y columns and E rows of the
    active neurons are gathered, each neuron's read-out share is summed into its head, and the
    gated y of the active neurons is decoded by their E rows. O(k D) instead of O(N D) per
    head. Exact only without decay (decay rescales every row of the state).
    """
    nh, B, N = x.shape
    D = v.shape[-1]
    heads = torch.div(active, N, rounding_mode="floor")  # k: the head of each active neuron
    x_a = x.transpose(0, 1).reshape(B, nh * N)[:, active]  # B, k
    q_a = q.transpose(0, 1).reshape(B, nh * N)[:, active]
    reads = sparse_step_inplace(q_a, active, v, rho.view(B, nh * N, D))  # B, k, D
    a = reads.new_zeros(B, nh, D).index_add_(1, heads, reads).to(v.dtype)  # B, nh, D
    columns = Dy_rows.index_select(0, active)  # k, D: D_y column of each active neuron
    y_a = F.relu((_ln(a, layernorm)[:, heads] * columns).sum(dim=-1)) * x_a  # B, k
    return y_a @ E_rows.index_select(0, active), a, y_a  # B, D
