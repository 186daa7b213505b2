"""One BDH layer as a single autograd Function: the training fast path.

The layer (the authors' reference code, the paper's Section 3; reference layout), from its input v (B, T, D):
    x = relu(v D_x)                       B, nh, T, N
    q = RoPE(x)                           keys are the queries
    a = attention(q, q, v)                B, nh, T, D   (direct or chunked form, bdh.ops.plan)
    g = relu(LN(a) D_y),  y = g * x       B, nh, T, N   (dropout on y when training)
    z = sum_h y_h E_h                     B, T, D       (the output; residual and LN stay outside)

Written with autograd op by op (BDH._layers with attn_impl naive/chunked, the reference), every
N-wide intermediate is a fresh tensor and most are kept for backward: about ten (B, nh, T, N)
tensors per layer, each written through fresh pages. Here v and a (B, nh, T, D) are kept (and
the incoming state), and x and g while they fit a memory budget (KEEP_BYTES); q, y, the scores
and the chunk states are recomputed in backward (and x, twice, and g when they do not fit: three
extra matmuls per layer). The backward is
written out below with in-place elementwise passes into three reused buffers (Scratch), and
dq + dk costs one matmul because k = q:
    dE   = y^T dz                 dy  = dz E^T (* dropout mask)
    dg'  = dy * x * [g > 0]       dD_y = LN(a)^T dg'      da = LN'(dg' D_y^T)
    dq   = attention backward(da)  (dq + dk, shared keys)
    dx   = (dy * g + RoPE^-1(dq)) * [x > 0]
    dD_x = v^T dx                 dv  = dx D_x^T + (attention's dv, summed over heads)
Where y is sparse enough (sparse_below, measured per machine by bdh.ops.plan), the read-out and
the first two lines run on y's non-zeros only (bdh.ops.sparse); the dense form is its tested twin.
There, dropout draws its mask for y's non-zeros alone (a dropped zero stays zero): the same
Bernoulli(1 - p) per entry, at the cost of a draw per non-zero rather than per entry of y.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import torch
import torch.nn.functional as F

from bdh.ops.chunked import Weights, attend, attend_backward, attend_direct, attend_direct_backward, uses_states
from bdh.ops.rope import apply_rope_complex, rotate_
from bdh.ops.sparse import SparseY, sparse_readout, sparse_readout_backward


def norm(x: torch.Tensor) -> torch.Tensor:
    """BDH's LayerNorm: no affine parameters, over the last dim."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-5)


def fused_layer(v, Dx, Dy, E, rotors, s0=None, decay=None, chunk_size=None, layernorm=True, dropout=0.0,
                need_state=False, block=None, sparse_below=0.0, batched=False):
    """z (B, T, D) and the final state (B, nh, N, D) or None, as the op-by-op layer computes them.

    v: (B, T, D); Dx, Dy: (nh, D, N); E: (nh, N, D); rotors: (1 | B, nh, T, N/2) complex;
    s0: (B, nh, N, D) or None; decay: (nh,) or None; chunk_size must divide T (None: T, the
    quadratic form); rotors may also be a Rotors (shared by the layers of one forward);
    dropout: probability of dropping each y entry (0 when not training);
    block: the quadratic form in row blocks of this length (bdh.ops.plan: direct/b), which needs
    chunk_size T (or None), no s0 and need_state False; sparse_below: where fewer than this share
    of y's entries are non-zero, the read-out and its backward skip the zeros (bdh.ops.sparse);
    batched: the weight products as one product over all sequences rather than one per sequence
    (per_head; which is faster, bdh.ops.plan.batched_products says).
    """
    T = v.shape[1]
    C = chunk_size or T
    if T % C:
        raise ValueError(f"fused_layer needs the chunk size ({C}) to divide the sequence length ({T})")
    if block is not None and (C != T or s0 is not None or need_state or T % block):
        raise ValueError(f"fused_layer's row blocks ({block}) need one chunk of T ({T}) that they divide, no states")
    rot = rotors if isinstance(rotors, Rotors) else Rotors(rotors)
    return FusedLayer.apply(v, Dx, Dy, E, rot, s0, decay, C, layernorm, dropout, need_state, block, sparse_below,
                            batched)


class FusedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, Dx, Dy, E, rot, s0, lam, C, layernorm, p, need_state, block, sparse_below, batched):
        B, T, D = v.shape
        nh, _, N = Dx.shape
        big = (B, nh, T, N)
        v_heads = _heads(v, nh)  # B, nh, T, D
        keep_x, keep_g = kept(big, v.element_size())
        x = _neurons(v_heads, Dx, None if keep_x else SCRATCH.get(1, big, v), batched)  # B, nh, T, N
        q = apply_rope_complex(x, rot.r, out=SCRATCH.get(0, big, v))
        w = Weights(lam, C, q.dtype)
        ctx.scores = None
        if block:
            keep_scores = keeps_scores(B, nh, T, block, q.element_size())
            (a, ctx.scores), final = attend_direct(q, v_heads, w, block, keep_scores), None  # B, nh, T, D
        else:
            a, final = attend(q, q, v_heads, s0, w, C, need_state)
        del v_heads
        g = per_head(norm(a) if layernorm else a, Dy, None if keep_g else q, batched).relu_()  # q is spent: reuse it
        y = torch.mul(g, x, out=q) if keep_g else g.mul_(x)  # B, nh, T, N
        keep, ctx.sy = None, None
        if sparse_below > 0 and density(y) * (1 - p) < sparse_below:
            dropout = (lambda n: draw_kept((n,), p, y), 1 / (1 - p)) if p > 0 else ()  # on y's non-zeros only
            ctx.sy = SparseY(y, *dropout)
        elif p > 0:
            mask = SCRATCH.get(2, big, v)  # free in forward
            keep = draw_kept(y.shape, p, y, as_float=mask)  # bool kept for backward: a quarter of the float's memory
            y.mul_(mask)  # the scale 1 / (1 - p) goes on z, D wide rather than N
        z = sparse_readout(ctx.sy, E) if ctx.sy is not None else per_head(y, E, batched=batched).sum(dim=1)  # B, T, D
        if keep is not None:
            z.mul_(1 / (1 - p))
        ctx.save_for_backward(v, Dx, Dy, E, a, s0, keep, lam, x if keep_x else None, g if keep_g else None)
        ctx.rot = rot
        ctx.C, ctx.block, ctx.layernorm, ctx.p, ctx.batched = C, block, layernorm, p, batched
        ctx.has_states = uses_states(T, C, s0, need_state)
        return z, final

    @staticmethod
    def backward(ctx, dz, d_final):
        v, Dx, Dy, E, a, s0, keep, lam, kept_x, kept_g = ctx.saved_tensors
        rot, rotors = ctx.rot, ctx.rot.r
        B, T, D = v.shape
        nh, _, N = Dx.shape
        big = (B, nh, T, N)
        v_heads, dz_heads = _heads(v, nh), _heads(dz, nh)  # B, nh, T, D
        a_hat, norm_backward = _norm_with_backward(a, ctx.layernorm)
        sy, ctx.sy = ctx.sy, None
        if sy is not None:  # the read-out on y's non-zeros only
            x = kept_x if kept_x is not None else _neurons(v_heads, Dx, SCRATCH.get(0, big, v), ctx.batched)
            dE, dDy, da, dx = sparse_readout_backward(sy, E, Dy, x, a_hat, dz_heads, 1 / (1 - ctx.p),
                                                      out=SCRATCH.get(1, big, v))
            da = norm_backward(da)
            q = apply_rope_complex(x, rotors, out=SCRATCH.get(2, big, v))
        else:
            x, q, dx, dE, dDy, da = _dense_readout_backward(v_heads, Dx, Dy, E, rotors, a_hat, norm_backward,
                                                            dz_heads, keep, ctx.p, kept_x, kept_g, ctx.batched)
        w = Weights(lam, ctx.C, q.dtype)
        dq_into = rotate_(dx, rot.inverse_conj(dx.dtype))
        if ctx.block:
            _, dv_heads = attend_direct_backward(q, v_heads, w, ctx.block, da, dq_into=dq_into, scores=ctx.scores)
            ctx.scores = None
            d_s0 = None
        else:
            _, _, dv_heads, d_s0 = attend_backward(q, q, v_heads, s0, ctx.has_states, w, ctx.C, da, d_final,
                                                   shared_qk=True, dq_into=dq_into)
        dx = relu_backward_(rotate_(dx, rot.conj()), x)  # unrotated: B, nh, T, N
        dDx = weight_grad(v_heads, dx, ctx.batched)  # nh, D, N
        dv = per_head(dx, Dx.transpose(-1, -2), batched=ctx.batched).sum(dim=1) + dv_heads.sum(dim=1)  # B, T, D
        d_s0 = d_s0 if ctx.needs_input_grad[5] else None
        return dv, dDx, dDy, dE, None, d_s0, None, None, None, None, None, None, None, None


def _dense_readout_backward(v_heads, Dx, Dy, E, rotors, a_hat, norm_backward, dz_heads, keep, p, kept_x, kept_g,
                            batched):
    """The read-out's backward on every entry: x, q, dx (the gating's share), dE, dD_y, da.

    x and g (unless kept) and y are made again into three buffers, which then hold dg, dx, dy.
    keep: dropout's mask of y (bool) or None. It goes on g (then y = g x, dx = g dy and dg's
    [g > 0] all carry it: one pass), its scale 1 / (1 - p) on dz (D wide, not N).
    """
    B, nh, T, _ = v_heads.shape
    big = (B, nh, T, Dx.shape[-1])
    x = kept_x if kept_x is not None else _neurons(v_heads, Dx, SCRATCH.get(0, big, v_heads), batched)  # B, nh, T, N
    g = kept_g if kept_g is not None else per_head(a_hat, Dy, SCRATCH.get(1, big, v_heads), batched).relu_()
    if keep is not None:
        mask = SCRATCH.get(2, big, v_heads).copy_(keep.view(torch.uint8))  # 0/1 (from bytes: 4x faster than bool)
        g = torch.mul(g, mask, out=SCRATCH.get(1, big, v_heads))  # a kept g is not changed in place
        dz_heads = dz_heads * (1 / (1 - p))
    y = torch.mul(g, x, out=SCRATCH.get(2, big, v_heads))
    dE = weight_grad(y, dz_heads, batched)  # nh, N, D
    dy = per_head(dz_heads, E.transpose(-1, -2), y, batched)  # y is spent; the mask is on g
    # dy * x into x's memory when x was made again (it is made again below), else a buffer
    dg = torch.mul(dy, x, out=SCRATCH.get(0, big, v_heads) if kept_x is not None else x)
    dg = relu_backward_(dg, g)
    dx = torch.mul(g, dy, out=SCRATCH.get(1, big, v_heads))  # the gating's share of dx (into g's memory if made)
    dDy = weight_grad(a_hat, dg, batched)  # nh, D, N
    da = norm_backward(per_head(dg, Dy.transpose(-1, -2), batched=batched))  # B, nh, T, D
    x = kept_x if kept_x is not None else _neurons(v_heads, Dx, dg, batched)
    q = apply_rope_complex(x, rotors, out=dy)
    return x, q, dx, dE, dDy, da


def density(y: torch.Tensor, every: int = 16) -> float:
    """y's share of non-zero entries, for choosing the read-out's path (both are exact): counted on
    every `every`-th row of N (that share of the memory read) where y has at least every x 256
    rows, else on all."""
    rows = y.reshape(-1, y.shape[-1])
    if rows.shape[0] >= every * 256:
        rows = rows[::every]
    return rows.count_nonzero().item() / max(1, rows.numel())


def draw_kept(shape, p: float, like: torch.Tensor, as_float: torch.Tensor | None = None) -> torch.Tensor:
    """Which entries of a tensor of this shape dropout keeps (bool): each with probability 1 - p.

    as_float: a contiguous float tensor of this shape that also receives the mask as 0/1
    (multiplying by a bool tensor converts it to a fresh float one first). On the CPU the op-by-op
    layer draws its mask of y with this function too, so it and the fused layer's dense read-out drop
    the same entries under the same seed; the sparse read-out draws for y's non-zeros only (shape
    (nnz,)), a different draw of the same distribution.

    On the CPU the draw is a 16-bit number u per entry from numpy's SFC64 generator, seeded by one
    draw of torch's generator (torch.manual_seed and a saved torch RNG state still fix it), in
    streams of STREAM entries that torch.get_num_threads() threads draw at once. With
    p 2^16 = K + f (K whole, 0 <= f < 1) an entry is dropped where u < K, kept where u > K, and
    where u = K (one entry in 65,536) dropped with probability f by one more draw: exactly
    probability p, as F.dropout. torch.rand's mt19937 draws a 32-bit float on one thread: for a
    (16, 4, 128, 768) mask that took 23-30 ms here, against ~4 ms for these (benchmarks/README.md).
    """
    numpy_draws = like.device.type == "cpu" and (as_float is None or (as_float.device.type == "cpu" and
                                                                      as_float.is_contiguous()))
    if not numpy_draws:
        kept = torch.rand(shape, device=like.device) >= p
        if as_float is not None:
            as_float.copy_(kept)
        return kept
    kept = np.empty(math.prod(shape), dtype=np.bool_)
    floats = None if as_float is None else as_float.numpy().reshape(-1)
    whole, part = divmod(p * 65536, 1)
    whole = int(whole)  # u is compared with an integer

    def draw(lo: int, hi: int, rng: np.random.Generator) -> None:
        u = rng.bit_generator.random_raw((hi - lo + 3) // 4).view(np.uint16)[:hi - lo]  # 4 per 64-bit draw
        np.greater(u, whole, out=kept[lo:hi])
        ties = np.flatnonzero(u == whole)
        kept[lo + ties] = rng.random(ties.size) >= part
        if floats is not None:
            floats[lo:hi] = kept[lo:hi]

    _in_streams(kept.size, draw)
    return torch.from_numpy(kept).view(shape)


# A CPU draw of more entries than this comes in several streams of this many, drawn by threads at
# once. The split depends on the size alone, so the draws do not depend on the thread count.
STREAM = 1 << 20


def _in_streams(n: int, work) -> None:
    """work(lo, hi, rng) for each stream [lo, hi) of n entries, rng seeded for that stream from one
    draw of torch's default generator; several streams go to the draw threads at once."""
    seed = int(torch.randint(0, 2**63 - 1, (1,)))
    starts = range(0, n, STREAM)
    seeds = np.random.SeedSequence(seed).spawn(len(starts))

    def stream(i: int) -> None:
        work(starts[i], min(n, starts[i] + STREAM), np.random.Generator(np.random.SFC64(seeds[i])))

    if len(starts) > 1:
        list(_draw_pool().map(stream, range(len(starts))))
    elif n:
        stream(0)


_POOL: tuple[int, int, ThreadPoolExecutor] | None = None


def _draw_pool() -> ThreadPoolExecutor:
    """Threads for the streams, as many as torch's; made again after a fork or a thread count change."""
    global _POOL
    key = (os.getpid(), torch.get_num_threads())
    if _POOL is None or _POOL[:2] != key:
        if _POOL is not None and _POOL[0] == key[0]:
            _POOL[2].shutdown(wait=False)  # the old threads end once idle
        _POOL = (*key, ThreadPoolExecutor(max_workers=key[1], thread_name_prefix="bdh-draw"))
    return _POOL[2]


class Rotors:
    """RoPE's rotors r (1 | B, nh, T, N/2) complex, and what the backward derives from them, made
    once and shared by every layer of a forward (the model passes one Rotors to all its layers):
    at T = 2048 each derived tensor cost a pass of 10-20 ms per layer."""

    def __init__(self, r: torch.Tensor):
        self.r = r
        self._conj = None
        self._inverse: dict[torch.dtype, torch.Tensor] = {}

    def conj(self) -> torch.Tensor:
        """conj(r) as a tensor (rotating by it unrotates; a lazy conjugate is 3x slower to multiply)."""
        if self._conj is None:
            self._conj = self.r.conj().resolve_conj()
        return self._conj

    def inverse_conj(self, dtype: torch.dtype) -> torch.Tensor:
        """1 / conj(r) in the precision of dtype: rotating by it, then unrotating (by conj(r)), is the
        identity. (Rotating by r itself would scale by |r|^2, which differs from 1 by up to 1e-7 in complex64.)"""
        if dtype not in self._inverse:
            wide = self.r.to(torch.complex128 if dtype == torch.float64 else torch.complex64)
            self._inverse[dtype] = 1 / wide.conj()
        return self._inverse[dtype]


def _neurons(v_heads, Dx, out, batched):
    """x = relu(v D_x): (B, nh, T, D) -> (B, nh, T, N), written into out (None: a new tensor)."""
    return per_head(v_heads, Dx, out, batched).relu_()


def _heads(v, nh):
    """v (B, T, D) repeated for every head, contiguous: (B, nh, T, D), so that bmm batches fold."""
    B, T, D = v.shape
    return v.unsqueeze(1).expand(B, nh, T, D).contiguous()


# x and g are kept from forward to backward, rather than made again there (x twice, g once: one
# (B, nh, T, N) product each), while each takes at most this many bytes per layer, and the direct
# form's scores while they take half of it: a memory budget, not a length. For small (n = 3,072)
# x fits up to 2,730 tokens per step and g with it up to 1,365; for paper-25m (n = 32,768) 256
# and 128, so its default batch of 8 x 512 makes them again. (A 64 MiB budget, keeping g too at
# 2,048 tokens of small, gained 0-6 % for up to 100 MiB more peak memory: benchmarks/README.md.)
KEEP_BYTES = 32 << 20


def kept(big, element_size: int) -> tuple[bool, bool]:
    """Whether x, and whether also g, of shape big fit the budget (g only with x: the x tensor is needed first)."""
    size = element_size
    for d in big:
        size *= d
    return size <= KEEP_BYTES, 2 * size <= KEEP_BYTES


def keeps_scores(B: int, nh: int, T: int, block: int, element_size: int) -> bool:
    """Whether the direct form's row-block scores (T (T + block) / 2 per head and sequence) fit half the budget."""
    return B * nh * T * (T + block) // 2 * element_size <= KEEP_BYTES // 2


class Scratch(threading.local):
    """Reused buffers for the layer's N-wide temporaries on the CPU, one set per thread.

    Without a caching allocator, every fresh (B, nh, T, N) tensor is written through new pages:
    12 ms per 50 MB here against 2 ms for a pass over memory already mapped. Three buffers serve
    every layer, forward and backward (none escapes a call: outputs and gradients are fresh
    tensors). On CUDA, PyTorch's caching allocator already does this: fresh tensors are returned.
    """

    def __init__(self):
        self.buffers: dict[int, torch.Tensor] = {}

    def get(self, slot: int, shape, like: torch.Tensor) -> torch.Tensor:
        if like.device.type != "cpu":
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        buf = self.buffers.get(slot)
        if buf is None or buf.shape != torch.Size(shape) or buf.dtype != like.dtype:
            self.buffers[slot] = None  # free the old one first
            buf = self.buffers[slot] = torch.empty(shape, dtype=like.dtype)
        return buf

    def clear(self) -> None:
        """Give the buffers back (they are made again when next needed)."""
        self.buffers.clear()


SCRATCH = Scratch()


def per_head(a: torch.Tensor, W: torch.Tensor, out: torch.Tensor | None = None, batched: bool = False) -> torch.Tensor:
    """a (B, nh, T, K) @ W (nh, K, M) -> (B, nh, T, M), into out if given.

    One batched matmul over the heads per sequence, reading W in place (torch.matmul would first
    copy W once per sequence: B x the weight, 38 MB per product at B = 16, small); with batched,
    one product over every sequence, the heads moved to the front (copies made).
    Which is faster depends on the machine: bdh.ops.plan.batched_products.
    """
    B, nh, T, _ = a.shape
    if batched:
        product = torch.einsum("bhtk,hkm->bhtm", a, W)
        return product if out is None else out.copy_(product)
    out = a.new_empty(B, nh, T, W.shape[-1]) if out is None else out
    for b in range(B):
        torch.bmm(a[b], W, out=out[b])
    return out


def weight_grad(a: torch.Tensor, g: torch.Tensor, batched: bool = False) -> torch.Tensor:
    """sum_b a[b]^T g[b]: a (B, nh, T, K), g (B, nh, T, M) -> (nh, K, M), accumulated in place one
    sequence at a time, or with batched one product (per_head)."""
    if batched:
        return torch.einsum("bhtk,bhtm->hkm", a, g)
    total = torch.bmm(a[0].transpose(1, 2), g[0])
    for b in range(1, a.shape[0]):
        total.baddbmm_(a[b].transpose(1, 2), g[b])
    return total


def relu_backward_(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """grad * [out > 0] in place, out a ReLU's output: one pass (a bool mask multiply is 8x slower)."""
    return torch.ops.aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)


def _norm_with_backward(a, layernorm: bool):
    """LN(a) and a function taking d LN(a) to d a (identity maps without LayerNorm)."""
    if not layernorm:
        return a, lambda d: d
    with torch.enable_grad():
        leaf = a.detach().requires_grad_()
        out = norm(leaf)
    return out.detach(), lambda d: torch.autograd.grad(out, leaf, d)[0]
