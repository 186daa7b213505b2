"""Ground truth for BDH's linear attention: the quadratic form and the token-by-token loop.

Every attention form in bdh/ops has this signature:

    attn(q, k, v, initial_state=None, decay=None, output_final_state=True) -> (o, final_state)

    q, k : (B, nh, T, N)  rotated neuron activations (BDH uses k = q)
    v    : (B, 1 | nh, T, D)
    initial_state : (B, nh, N, D) float32 or None (= zeros)
    decay : (nh,) per-head lambda in (0, 1] or None (= 1)
    o    : (B, nh, T, D)   o_t = sum_{tau < t} lambda^(t - tau) (q_t . k_tau) v_tau + lambda^t q_t S0
    final_state : (B, nh, N, D) float32, S_T = lambda^T S0 + sum_tau lambda^(T - tau) k_tau v_tau^T
                  (None when output_final_state is False)

The read at t sees only tau < t (strictly causal, no softmax, no scaling); the write follows it.
"""

from __future__ import annotations

import torch


def state_dtype(x: torch.Tensor) -> torch.dtype:
    """The state accumulates in float32, or in float64 when the inputs are (tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def decay_powers(decay: torch.Tensor | None, steps: torch.Tensor) -> torch.Tensor | None:
    """lambda_h ** steps for every head: (nh,) x (...) -> (nh, ...) float64, in log space."""
    if decay is None:
        return None
    log_decay = torch.log(decay.to(torch.float64))
    shape = (-1,) + (1,) * steps.dim()
    return torch.exp(log_decay.view(shape) * steps.to(device=decay.device, dtype=torch.float64))


def causal_scores(q: torch.Tensor, k: torch.Tensor, decay: torch.Tensor | None) -> torch.Tensor:
    """tril(q k^T, -1), times lambda^(t - tau) when decaying: (B, nh, ..., T, T), heads on dim 1."""
    T = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)).tril(diagonal=-1)  # B, nh, ..., T, T
    if decay is not None:
        t = torch.arange(T, device=q.device)
        lags = (t[:, None] - t[None, :]).clamp(min=0)  # T, T
        weights = decay_powers(decay, lags).to(dtype=scores.dtype)  # nh, T, T
        scores = scores * weights.view(-1, *([1] * (scores.dim() - 4)), T, T)
    return scores


def naive_attention(q, k, v, initial_state=None, decay=None, output_final_state=True):
    """Quadratic form: the reference code's tril(QK^T, -1) V, plus the incoming state's share."""
    T = q.shape[-2]
    o = causal_scores(q, k, decay) @ v  # B, nh, T, D
    steps = torch.arange(T + 1, device=q.device)
    powers = decay_powers(decay, steps)  # nh, T+1  (lambda^0 .. lambda^T)
    if initial_state is not None:
        read = q @ initial_state.to(q.dtype)  # B, nh, T, D
        if powers is not None:
            read = read * powers[None, :, :T, None].to(device=q.device, dtype=read.dtype)
        o = o + read
    if not output_final_state:
        return o, None
    return o, _final_state(k, v, initial_state, powers)


def _final_state(k, v, initial_state, powers):
    """S_T = lambda^T S0 + sum_tau lambda^(T - tau) k_tau v_tau^T, accumulated in float32."""
    T = k.shape[-2]
    if powers is not None:
        weights = powers[:, 1:].flip(-1).to(device=k.device, dtype=k.dtype)  # nh, T: lambda^(T - tau)
        k = k * weights[None, :, :, None]
    acc = state_dtype(k)
    state = (k.transpose(-1, -2) @ v).to(acc)  # B, nh, N, D
    if initial_state is not None:
        carried = initial_state.to(acc)
        if powers is not None:
            carried = carried * powers[None, :, T, None, None].to(device=carried.device, dtype=acc)
        state = state + carried
    return state


def start_state(q: torch.Tensor, v: torch.Tensor, initial_state=None) -> torch.Tensor:
    """The state a token loop starts from: (B, nh, N, D) zeros in the state dtype, plus initial_state."""
    B, nh, _, N = q.shape
    state = torch.zeros(B, nh, N, v.shape[-1], dtype=state_dtype(q), device=q.device)
    return state if initial_state is None else state + initial_state.to(state.dtype)


def loop_attention(q, k, v, initial_state=None, decay=None, output_final_state=True):
    """Token-by-token recurrence in float32: read a_t = q_t^T S, then write S <- lambda (S + k_t v_t^T)."""
    nh, T = q.shape[1], q.shape[2]
    state = start_state(q, v, initial_state)
    acc = state.dtype
    lam = None if decay is None else decay.to(device=q.device, dtype=acc).view(1, nh, 1, 1)
    outs = []
    for t in range(T):
        q_t, k_t, v_t = q[:, :, t].to(acc), k[:, :, t].to(acc), v[:, :, t].to(acc)  # B,nh,N / B,*,D
        outs.append((q_t.unsqueeze(-2) @ state).squeeze(-2))  # B, nh, D
        state = state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)  # B, nh, N, D
        if lam is not None:
            state = state * lam
    o = torch.stack(outs, dim=2).to(q.dtype)  # B, nh, T, D
    return o, (state if output_final_state else None)
