"""The fused layer's read-out with y held sparse (CSR), forward and backward, exactly.

y = relu(LN(a) D_y) * x (times the dropout scale) is sparse after training (4-6 % non-zero in
the trained small model; about 25 % at initialisation). Every product of the read-out that
touches y, or a gradient with y's pattern, can skip its zeros:

    z     = sum_h y_h E_h                      sparse @ dense
    dE_h  = y_h^T dz                           sparse^T @ dense
    dy    = dz E_h^T, at y's non-zeros only    sampled dense-dense product (SDDMM)
    g     = relu(LN(a) D_y), at y's non-zeros  SDDMM (for dx below)
    dg'   = dy x                                on y's pattern (g > 0 there)
    dD_y  = LN(a)^T dg'                        sparse^T @ dense
    da    = dg' D_y^T                          sparse @ dense (then the LayerNorm backward)
    dx    = dy g  (+ the attention's share)    scattered into the dense dx

Nothing is lost by sampling dy: dg' = dy * x * [g > 0] and dy * g * [x > 0] vanish wherever y does
(x = 0, g = 0 or a dropped entry). The rows of the CSR matrix are y's own (b, h, t) rows, and
row (b, h, t) keeps its non-zeros in columns h N .. (h + 1) N: then the per-head weights stacked
as (nh N, D) serve every head in one product, and the weight gradients come out per head.

Whether this is faster than the dense products depends on the density and the machine:
bdh.ops.plan measures the crossover once per machine and shape (sparse_below), and
benchmarks/sparse_readout.py reports it. The dense form (bdh.ops.layer) is the twin these
are tested against (tests/test_sparse_readout.py).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch


class SparseY:
    """y (B, nh, T, N) as a CSR matrix (B nh T, nh N), and where its non-zeros sit in y's own layout.

    Built from one nonzero() pass over y (torch's dense-to-CSR conversion makes three), and with
    the pattern of its transpose made once (a stable sort of the columns) for the two products
    with a transposed y-patterned matrix in backward (dE, dD_y): transposing a CSR matrix for a
    product otherwise converts it anew each time, which cost more than the product itself.
    """

    def __init__(self, y: torch.Tensor, kept_of: Callable[[int], torch.Tensor] | None = None, scale: float = 1.0):
        """kept_of: dropout on y's non-zeros (a dropped zero stays zero): n -> which of the n
        non-zeros to keep (bool, n); the kept ones are multiplied by scale."""
        B, nh, T, N = self.shape = tuple(y.shape)
        flat = y.reshape(-1)
        self.flat = torch.nonzero(flat).squeeze(1)  # nnz: positions in y.view(-1), row-major
        values = flat[self.flat]
        if kept_of is not None:
            kept = kept_of(self.flat.numel())
            self.flat, values = self.flat[kept], values[kept] * scale
        self.rows = self.flat.div(N, rounding_mode="floor")  # nnz: the (b, h, t) row
        self.wide_col = self.flat - self.rows * N + (self.rows // T % nh) * N  # nnz: column, heads side by side
        self.crow = _offsets(self.rows, B * nh * T)
        self._transpose = None
        self.Y = self.matrix(values)

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        """A CSR (B nh T, nh N) with y's pattern and these values (nnz, in y's row-major order)."""
        B, nh, T, N = self.shape
        return _csr(self.crow, self.wide_col, values, (B * nh * T, nh * N))

    def matrix_t(self, values: torch.Tensor) -> torch.Tensor:
        """The transpose (nh N, B nh T) of matrix(values), as a CSR matrix of its own."""
        B, nh, T, N = self.shape
        if self._transpose is None:
            order = torch.argsort(self.wide_col, stable=True)  # nnz: by column, rows ascending within one
            self._transpose = (order, _offsets(self.wide_col[order], nh * N), self.rows[order])
        order, crow, col = self._transpose
        return _csr(crow, col, values[order], (nh * N, B * nh * T))

    def density(self) -> float:
        return self.flat.numel() / max(1, self.Y.shape[0] * self.shape[-1])


def _offsets(sorted_rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """CSR row offsets (n_rows + 1) of entries whose (ascending) row indices these are."""
    crow = sorted_rows.new_zeros(n_rows + 1)
    torch.cumsum(torch.bincount(sorted_rows, minlength=n_rows), 0, out=crow[1:])
    return crow


def _csr(crow, col, values, size) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": said once per process, not useful here
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def stacked(W: torch.Tensor) -> torch.Tensor:
    """Per-head weights (nh, N, D) -> (nh N, D): head h's rows at h N .. (h + 1) N."""
    return W.reshape(-1, W.shape[-1])


def sparse_readout(sy: SparseY, E: torch.Tensor) -> torch.Tensor:
    """z (B, T, D) = sum_h y_h E_h; E (nh, N, D)."""
    B, nh, T, _ = sy.shape
    return (sy.Y @ stacked(E)).view(B, nh, T, -1).sum(dim=1)


def sparse_readout_backward(sy: SparseY, E, Dy, x, a_hat, dz_heads, scale: float, out=None):
    """dE (nh, N, D), dD_y (nh, D, N), d a_hat (B, nh, T, D) and dy * g (B, nh, T, N, dense; zero off y's
    pattern), for y = relu(a_hat D_y) * x * dropout; scale: the dropout scale 1 / (1 - p) of kept entries.

    x: (B, nh, T, N); a_hat: (B, nh, T, D), LN(a) or a; dz_heads: (B, nh, T, D), dz per head;
    out: a contiguous tensor like x to write dy * g into.
    """
    B, nh, T, N = sy.shape
    D = dz_heads.shape[-1]
    dz_rows, a_rows = dz_heads.reshape(-1, D), a_hat.reshape(-1, D)  # B nh T, D
    dE = (sy.matrix_t(sy.Y.values()) @ dz_rows).view(nh, N, D)
    E_wide = stacked(E).t()  # D, nh N
    Dy_wide = Dy.transpose(0, 1).reshape(D, nh * N)  # D, nh N: head h's D_y in columns h N ..
    dy = torch.sparse.sampled_addmm(sy.Y, dz_rows, E_wide, beta=0.0).values()  # nnz
    if scale != 1.0:
        dy = dy * scale
    g = torch.sparse.sampled_addmm(sy.Y, a_rows, Dy_wide, beta=0.0).values().relu_()  # nnz, > 0 on y's pattern
    dg = dy * x.reshape(-1)[sy.flat]  # nnz
    dDy = (sy.matrix_t(dg) @ a_rows).view(nh, N, D).transpose(1, 2)  # nh, D, N
    da = (sy.matrix(dg) @ stacked(Dy.transpose(1, 2))).view(B, nh, T, D)
    dx = x.new_zeros(B, nh, T, N) if out is None else out.zero_()
    dx.view(-1)[sy.flat] = dy * g
    return dE, dDy, da, dx
