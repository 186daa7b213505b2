"""Chunked linear attention: linear in T, carrying the state from chunk to chunk.

Within a chunk of C tokens the quadratic form is exact and cheap; across chunks the state S
(N x D per head) carries everything earlier. Per token and head: C (N + D) multiply-adds for the
chunk, 2 N D for the state read and write, against T (N + D) for the quadratic form over the
whole sequence. All full chunks are computed at once (batched matmuls); a ragged tail goes
through the quadratic form. With one chunk (C = T) this is the quadratic form itself, with the
backward pass below.

For chunk c with rotated queries Q_c, keys K_c, values V_c, entering state S_c, and
M = tril(ones, -1) * lambda^(i - j) (i, j positions inside the chunk):
    A_c = (Q_c K_c^T) * M
    O_c = A_c V_c + lambda^i Q_c S_c
    S_{c+1} = lambda^C S_c + (lambda^(C - j) K_c)^T V_c

The backward pass is written out (attend_backward) so that only q, k, v and the incoming
state are kept: the C x C scores and the chunk states are recomputed, not stored. With
G_c = dL/dS_c, running from G_nc = dL/dS_final backwards:
    G_c  = lambda^C G_{c+1} + (lambda^i Q_c)^T dO_c
    dA_c = (dO_c V_c^T) * M
    dQ_c = dA_c K_c + lambda^i dO_c S_c^T
    dK_c = dA_c^T Q_c + lambda^(C - j) V_c G_{c+1}^T
    dV_c = A_c^T dO_c + lambda^(C - j) K_c G_{c+1}
When keys are the queries (BDH), dQ + dK = (dA + dA^T) Q + ...: one matmul instead of two.

attend/attend_backward work on plain tensors (no autograd) so that the fused training layer
(bdh.ops.layer) can call them; ChunkedAttention wraps them for autograd.
"""

from __future__ import annotations

import torch

from bdh.ops.naive import decay_powers, naive_attention, state_dtype

# the default chunk length (memory/speed trade-off only, results are the same); 128 and 256 are
# within 8 % of each other for small and paper-25m (benchmarks/README.md)
CHUNK_SIZE = 256


def chunked_attention(q, k, v, initial_state=None, decay=None, output_final_state=True, chunk_size=CHUNK_SIZE):
    """Same signature and result as bdh.ops.naive.naive_attention; see there for shapes."""
    T = q.shape[-2]
    C = chunk_size
    full = (T // C) * C
    if T <= C:
        return naive_attention(q, k, v, initial_state, decay, output_final_state)
    need_state = output_final_state or full < T  # a ragged tail starts from the full chunks' state
    o, state = ChunkedAttention.apply(q[:, :, :full], k[:, :, :full], v[:, :, :full], initial_state, decay, C,
                                      need_state)
    if full == T:
        return o, state
    o_tail, state = naive_attention(q[:, :, full:], k[:, :, full:], v[:, :, full:], state, decay, output_final_state)
    return torch.cat([o, o_tail], dim=2), state  # B, nh, T, D


class Weights:
    """Decay factors of one chunk, or None each when nothing decays (then no pass is spent on them).

    M (nh, C, C) = lambda^(i - j) below the diagonal, read (nh, C, 1) = lambda^i,
    write (nh, C, 1) = lambda^(C - j), whole (nh, 1, 1) = lambda^C.
    """

    def __init__(self, lam, C, dtype):
        self.M = self.read = self.write = self.whole = None
        if lam is None:
            return
        steps = torch.arange(C, device=lam.device)
        lags = (steps[:, None] - steps[None, :]).clamp(min=0)
        self.M = (decay_powers(lam, lags) * torch.ones(C, C, device=lam.device).tril(diagonal=-1)).to(dtype)
        self.read = decay_powers(lam, steps).to(dtype).unsqueeze(-1)
        self.write = decay_powers(lam, C - steps).to(dtype).unsqueeze(-1)
        self.whole = decay_powers(lam, torch.tensor(C, device=lam.device)).view(-1, 1, 1)

    def mask(self, scores):
        """Causal (strictly lower) and decayed scores, in place: (B, nh, nc, C, C)."""
        return scores.tril_(diagonal=-1) if self.M is None else scores.mul_(self.M[:, None])


def _chunks(x, C):
    """(B, h, T, X) -> (B, h, nc, C, X), a view of a contiguous tensor."""
    B, h, T, X = x.shape
    return x.reshape(B, h, T // C, C, X)


def _bmm(a, b, add_to=None):
    """Batched matmul over all leading dims: (..., m, k) @ (..., k, n) -> (..., m, n).

    The leading dims are folded into one batch as views (no copies, unlike matmul with
    broadcast batch dims), so both operands must have the same leading shape. With add_to
    (its leading dims foldable, e.g. one chunk of a contiguous tensor), the product is
    accumulated into it in place (baddbmm, no temporary).
    """
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    if add_to is not None:
        add_to.view(-1, *add_to.shape[-2:]).baddbmm_(a3, b3)  # view: fails loudly rather than copy
        return add_to
    return torch.bmm(a3, b3).view(*a.shape[:-2], a.shape[-2], b.shape[-1])


def _scores(qc, kc, w):
    """Masked chunk scores A_c = (Q_c K_c^T) * M: (B, nh, nc, C, C)."""
    return w.mask(_bmm(qc, kc.transpose(-1, -2)))


def uses_states(T: int, C: int, s0, need_states: bool) -> bool:
    """Whether chunk states are involved: several chunks, an incoming state, or one asked for."""
    return T != C or s0 is not None or need_states


def attend(q, k, v, s0, w: Weights, C: int, need_states: bool):
    """Forward of the chunked form over full chunks (T a multiple of C).

    q, k: (B, nh, T, N); v: (B, nh, T, D) (heads already expanded); s0: (B, nh, N, D) or None.
    Returns o (B, nh, T, D) and the final state (None when uses_states is False). The chunks
    are read and written in order with one running state: no per-chunk states are kept.
    """
    B, nh, T, N = q.shape
    D = v.shape[-1]
    qc, kc, vc = _chunks(q, C), _chunks(k, C), _chunks(v, C)  # B, nh, nc, C, N|D
    o = _bmm(_scores(qc, kc, w), vc)  # B, nh, nc, C, D
    if not uses_states(T, C, s0, need_states):
        return o.view(B, nh, T, D), None
    state, nc = s0, T // C
    for c in range(nc):
        if state is not None:
            _add_product(o[:, :, c], qc[:, :, c], state, w.read)  # O_c += lambda^i Q_c S_c
        if c < nc - 1 or need_states:
            state = _advance(state, kc[:, :, c], vc[:, :, c], w.write, w.whole, owned=c > 0)
    return o.view(B, nh, T, D), (state if need_states else None)


def attend_backward(q, k, v, s0, has_states: bool, w: Weights, C: int, d_o, d_final, shared_qk: bool,
                    dq_into=None):
    """Gradients of attend: dq, dk (None when shared_qk: then dq holds dq + dk), dv, d(s0).

    s0 and has_states as attend had them (has_states = uses_states(...)); d_final may be None;
    dq_into: a contiguous tensor like q that dq is added to (and returned as). The state terms
    take two passes over the chunks, each with one running N x D tensor per head: forwards with
    the state S_c (for dQ), backwards with its gradient G_{c+1} (for dK, dV, and G_0 = d s0).
    """
    B, nh, T, N = q.shape
    qc, kc, vc = _chunks(q, C), _chunks(k, C), _chunks(v, C)
    doc = _chunks(d_o.to(q.dtype).contiguous(), C)  # B, nh, nc, C, D
    dA = _scores(doc, vc, w)  # B, nh, nc, C, C
    A = _scores(qc, kc, w)
    dv = _bmm(A.transpose(-1, -2), doc)  # B, nh, nc, C, D
    if shared_qk:
        dA.add_(dA.transpose(-1, -2).clone())  # k = q: dQ + dK = (dA + dA^T) Q
        dq, dk = _product_into(dq_into, dA, qc, C), None
    else:
        dq, dk = _product_into(dq_into, dA, kc, C), _bmm(dA.transpose(-1, -2), qc)
    d_s0 = None
    if has_states:
        nc = T // C
        state = s0
        for c in range(nc):  # dQ_c += lambda^i dO_c S_c^T
            if state is not None:
                _add_product(dq[:, :, c], doc[:, :, c], state.transpose(-1, -2), w.read)
            if c < nc - 1:
                state = _advance(state, kc[:, :, c], vc[:, :, c], w.write, w.whole, owned=c > 0)
        into_keys = dq if shared_qk else dk
        grad = d_final
        for c in range(nc - 1, -1, -1):  # G_{c+1} -> dK_c, dV_c; then G_c
            if grad is not None:
                _add_product(into_keys[:, :, c], _per_row(vc[:, :, c], w.write), grad.transpose(-1, -2), None)
                _add_product(dv[:, :, c], _per_row(kc[:, :, c], w.write), grad, None)
            grad = _advance(grad, qc[:, :, c], doc[:, :, c], w.read, w.whole, owned=c < nc - 1)
        d_s0 = grad
    unchunk = lambda t: None if t is None else t.view(B, nh, T, -1)  # noqa: E731
    return unchunk(dq), unchunk(dk), unchunk(dv), d_s0


def attend_direct(q, v, w: Weights, block: int, keep_scores: bool = False):
    """The quadratic form with k = q and no states, in row blocks that skip the zero upper triangle.

    q: (B, nh, T, N); v: (B, nh, T, D); w: Weights of one chunk of T (C = T); block divides T.
    Rows lo:hi see keys 0:hi only, so the scores cost (T + block) / 2 instead of T per token:
        o[lo:hi] = (Q[lo:hi] K[:hi]^T * M[lo:hi, :hi]) V[:hi]
    Returns o (B, nh, T, D) and, with keep_scores, the row blocks' masked scores (a list of
    (B, nh, block, hi): T (T + block) / 2 numbers per head and sequence) for the backward, else None.
    """
    B, nh, T, _ = q.shape
    o = v.new_empty(B, nh, T, v.shape[-1])
    kept = [] if keep_scores else None
    for lo in range(0, T, block):
        hi = lo + block
        A = _row_scores(q, q, w, lo, hi)  # B, nh, block, hi
        o[:, :, lo:hi] = _bmm(A, v[:, :, :hi])  # B, nh, block, D
        if kept is not None:
            kept.append(A)
    return o, kept


def attend_direct_backward(q, v, w: Weights, block: int, d_o, dq_into=None, scores=None):
    """Gradients of attend_direct: dq (the keys' share included, added to dq_into if given) and dv.

    Per row block the scores A (unless forward kept them: scores) and dA = (dO V^T) * M are made
    again (the triangle only). dQ + dK = (dA + dA^T) Q costs one full product; since dA is zero on
    and above the diagonal, dA + dA^T is dA below it and dA^T above, and each row block's dA is
    written straight into both halves of one (B, nh, T, T) matrix (every entry written once: no
    zeroing, no transposed copy of the whole).
    """
    B, nh, T, _ = q.shape
    d_o = d_o.to(q.dtype).contiguous()
    sym = q.new_empty(B, nh, T, T)  # dA + dA^T
    dv = torch.zeros_like(v)  # B, nh, T, D
    for i, lo in enumerate(range(0, T, block)):
        hi = lo + block
        dA = _row_scores(d_o, v, w, lo, hi)  # B, nh, block, hi
        sym[:, :, lo:hi, :lo] = dA[..., :lo]
        sym[:, :, :lo, lo:hi] = dA[..., :lo].transpose(-1, -2)
        sym[:, :, lo:hi, lo:hi] = dA[..., lo:] + dA[..., lo:].transpose(-1, -2)  # the diagonal block
        A = scores[i] if scores is not None else _row_scores(q, q, w, lo, hi)
        _bmm(A.transpose(-1, -2), d_o[:, :, lo:hi], add_to=dv[:, :, :hi])
    dq = _bmm(sym, q) if dq_into is None else _bmm(sym, q, add_to=dq_into)
    return dq, dv


def _row_scores(a, b, w: Weights, lo: int, hi: int):
    """Masked scores of rows lo:hi against columns 0:hi: (a[lo:hi] b[:hi]^T) * M[lo:hi, :hi], (B, nh, hi - lo, hi)."""
    scores = _bmm(a[:, :, lo:hi], b[:, :, :hi].transpose(-1, -2))
    return scores.tril_(diagonal=lo - 1) if w.M is None else scores.mul_(w.M[:, lo:hi, :hi])


def _product_into(into, a, b, C):
    """a @ b (B, nh, nc, C, X), added to `into` (B, nh, T, X) if given, else a new tensor."""
    return _bmm(a, b) if into is None else _bmm(a, b, add_to=_chunks(into, C))


def _advance(state, a_c, b_c, rows, whole, owned: bool):
    """lambda^C state + (rows * a_c)^T b_c, the state recurrence (and its gradient's, reversed).

    state (B, nh, N, D) or None (zeros); a_c (B, nh, C, N), b_c (B, nh, C, D); rows (nh, C, 1)
    per-position factors or None; whole (nh, 1, 1) or None. In place when the state is ours
    (owned), else a new tensor in the state dtype (float32 at least).
    """
    a_c = _per_row(a_c, rows)
    if state is None:
        acc = state_dtype(a_c)
        return _bmm(a_c.transpose(-1, -2).to(acc), b_c.to(acc))
    if not owned:
        state = state.clone()
    if whole is not None:
        state.mul_(whole)
    return _bmm(a_c.transpose(-1, -2).to(state.dtype), b_c.to(state.dtype), add_to=state)


def _add_product(out, a, b, rows):
    """out (B, nh, C, X) += rows * (a @ b), in place; rows (nh, C, 1) per-position factors or None."""
    if rows is None and a.dtype == b.dtype == out.dtype:
        _bmm(a, b, add_to=out)
        return
    product = a.to(b.dtype) @ b
    out += _per_row(product, rows).to(out.dtype)


def _per_row(x, rows):
    """x (B, nh, C, X) times per-head, per-position factors (nh, C, 1), if any."""
    return x if rows is None else x * rows


def autocast_state(device_type: str) -> dict:
    """torch.autocast's arguments that reproduce the autocast in force now on this device type
    (autograd runs a Function's backward outside forward's autocast; torch.amp.custom_bwd does this
    for one device type fixed in advance)."""
    return {"device_type": device_type, "enabled": torch.is_autocast_enabled(device_type),
            "dtype": torch.get_autocast_dtype(device_type)}


class ChunkedAttention(torch.autograd.Function):
    """Full chunks only (T a multiple of C). Keeps q, k, v and the incoming state (or None) for backward."""

    @staticmethod
    def forward(ctx, q, k, v, s0, lam, C, need_state):
        nh, T = q.shape[1], q.shape[2]
        v_heads = v.expand(-1, nh, -1, -1).contiguous()  # B, nh, T, D: foldable batches for bmm
        w = Weights(lam, C, q.dtype)
        o, final = attend(q.contiguous(), k.contiguous(), v_heads, s0, w, C, need_state)
        ctx.save_for_backward(q, k, v_heads, s0, lam)
        ctx.C, ctx.v_heads, ctx.has_states = C, v.shape[1], uses_states(T, C, s0, need_state)
        ctx.autocast = autocast_state(q.device.type)
        return o, final

    @staticmethod
    def backward(ctx, d_o, d_final):
        q, k, v_heads, s0, lam = ctx.saved_tensors
        w = Weights(lam, ctx.C, q.dtype)
        with torch.autocast(**ctx.autocast):  # backward's products cast as forward's were (mixed q and v dtypes)
            dq, dk, dv, d_s0 = attend_backward(q.contiguous(), k.contiguous(), v_heads, s0, ctx.has_states, w, ctx.C,
                                               d_o, d_final, shared_qk=False)
        if ctx.v_heads == 1 and q.shape[1] > 1:
            dv = dv.sum(dim=1, keepdim=True)  # values were shared by every head
        return dq, dk, dv, d_s0 if ctx.needs_input_grad[3] else None, None, None, None
