"""Linear attention with a per-token forget gate (the state update of BDH-GPU', a reconstruction).

Every form here has one signature:

    attn(q, k, v, log_f, initial_state=None, output_final_state=True) -> (o, final_state)

    q, k  : (B, nh, T, N)  rotated neuron activations
    v     : (B, 1 | nh, T, D) values (the input gate already applied by the caller)
    log_f : (B, nh, T) log of the forget factor f_t in (0, 1] applied after token t's write
            (a constant decay lambda is log_f = log lambda)
    initial_state : (B, nh, N, D) or None
    recurrence: o_t = q_t S_{t-1};  S_t = f_t (S_{t-1} + k_t v_t^T)
    o_t = sum_{tau < t} (prod_{s = tau}^{t-1} f_s) (q_t . k_tau) v_tau + (prod_{s < t} f_s) q_t S0

The products are taken as exp of differences of cumulative sums of log_f, which are <= 0, so
nothing overflows however small the gates get.
"""

from __future__ import annotations

import torch

from bdh.ops.layer import norm
from bdh.ops.naive import start_state, state_dtype


def gated_naive(q, k, v, log_f, initial_state=None, output_final_state=True):
    """Quadratic form: scores masked to tau < t and weighted by exp(c_{t-1} - c_{tau-1})."""
    T = q.shape[-2]
    acc = state_dtype(q)
    c = log_f.to(acc).cumsum(-1)  # B, nh, T: c_t = sum_{s <= t} log f_s
    before = c - log_f.to(acc)  # c_{t-1} (0 for t = 0)
    lag = before[..., :, None] - before[..., None, :]  # B, nh, T, T: c_{t-1} - c_{tau-1}
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril(-1)
    weights = torch.exp(lag.masked_fill(~causal, float("-inf"))).to(q.dtype)
    o = ((q @ k.transpose(-1, -2)) * weights) @ v  # B, nh, T, D
    if initial_state is not None:
        o = o + (q @ initial_state.to(q.dtype)) * torch.exp(before).to(q.dtype)[..., None]
    if not output_final_state:
        return o, None
    to_end = torch.exp(c[..., -1:] - before).to(k.dtype)  # B, nh, T: prod_{s = tau}^{T-1} f_s
    state = ((k * to_end[..., None]).transpose(-1, -2) @ v.expand(-1, k.shape[1], -1, -1)).to(acc)
    if initial_state is not None:
        state = state + initial_state.to(acc) * torch.exp(c[..., -1])[..., None, None]
    return o, state


def gated_chunked(q, k, v, log_f, initial_state=None, output_final_state=True, chunk_size=256):
    """Linear in T: the quadratic form within chunks of chunk_size, the state carried between them."""
    T = q.shape[-2]
    state, outs = initial_state, []
    for a in range(0, T, chunk_size):
        b = min(a + chunk_size, T)
        last = b == T
        o, state = gated_naive(q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], log_f[..., a:b], state,
                               output_final_state or not last)
        outs.append(o)
    return torch.cat(outs, dim=-2), state


def gated_recurrent(q, k, v, log_f, initial_state=None, output_final_state=True):
    """Token by token: read o_t = q_t S, then S <- f_t (S + k_t v_t^T)."""
    T = q.shape[2]
    S = start_state(q, v, initial_state)  # B, nh, N, D
    acc = S.dtype
    f = torch.exp(log_f.to(acc))
    outs = []
    for t in range(T):
        outs.append((q[:, :, t].to(acc).unsqueeze(-2) @ S).squeeze(-2))  # B, nh, D
        S = (S + k[:, :, t].to(acc).unsqueeze(-1) * v[:, :, t].to(acc).unsqueeze(-2)) * f[:, :, t, None, None]
    return torch.stack(outs, dim=2).to(q.dtype), (S if output_final_state else None)


def get_gated_attention(name: str, chunk_size: int = 256):
    """The gated form matching an attention form's name (naive, chunked, recurrent)."""
    if name == "chunked":
        return lambda *args, **kw: gated_chunked(*args, **kw, chunk_size=chunk_size)
    table = {"naive": gated_naive, "recurrent": gated_recurrent}
    if name not in table:
        raise ValueError(f"unknown gated attention form {name!r}; choose naive, chunked or recurrent")
    return table[name]


def gated_decode_layer(x, q, v_heads, f, rho, Dy, E, layernorm=True):
    """One layer of one token with gates, dense, rho updated in place: returns (z (B, D), a, y).

    x, q: rows (nh, B, N); v_heads: (B, nh, D) values with the input gate applied; f: (B, nh)
    forget factors (the decay folded in); rho: (B, nh, N, D). Read a = q S, write
    S <- f (S + q v^T), then y = relu(LN(a) D_y) * x and z = sum_h y_h E_h.
    """
    nh, B, N = q.shape
    D = v_heads.shape[-1]
    S = rho.view(B * nh, N, D)
    q_b = q.transpose(0, 1).reshape(B * nh, 1, N).to(S.dtype)
    a = torch.bmm(q_b, S)  # B*nh, 1, D
    S.baddbmm_(q_b.transpose(1, 2), v_heads.to(S.dtype).reshape(B * nh, 1, D))
    S.mul_(f.to(S.dtype).reshape(B * nh, 1, 1))
    a = a.view(B, nh, D).transpose(0, 1).to(v_heads.dtype)  # nh, B, D
    y = torch.matmul(norm(a) if layernorm else a, Dy).relu_().mul_(x)  # nh, B, N
    return torch.matmul(y, E).sum(dim=0), a, y
