"""The read-out z = sum_h y_h E_h and its backward with y held sparse (CSR), exactly.

y = relu(LN(a) D_y) * x is sparse after training (4-6 % non-zero in the trained small model;
about 25 % at initialisation). The three products of the read-out that touch y can skip its
zeros exactly:

    z  = Y E                 (B T, nh N) @ (nh N, D)       sparse @ dense
    dE = Y^T dz              (nh N, B T) @ (B T, D)        sparse^T @ dense
    dy = (dz E^T) at Y's non-zeros                         sampled dense-dense product

with Y the (B T, nh N) matrix of y (heads side by side, as E stacks them). The rest of the
backward only reads dy where y is non-zero (dg = dy * x * [g > 0] and dy * g both vanish
elsewhere), so the sampled dy loses nothing. `dense_readout` is the twin these are tested
against. Whether the sparse form is faster depends on the density and on the machine:
benchmarks/sparse_readout.py measures where it pays (benchmarks/README.md).
"""

from __future__ import annotations

import warnings

import torch


def rows(y: torch.Tensor) -> torch.Tensor:
    """y (B, nh, T, N) -> Y (B T, nh N) as a CSR matrix (heads side by side, like E's rows)."""
    B, nh, T, N = y.shape
    with warnings.catch_warnings():  # "sparse CSR support is in beta": said once per process, not useful here
        warnings.simplefilter("ignore", UserWarning)
        return y.permute(0, 2, 1, 3).reshape(B * T, nh * N).to_sparse_csr()


def sparse_readout(Y: torch.Tensor, E: torch.Tensor, B: int) -> torch.Tensor:
    """z (B, T, D) = Y E; Y from rows(y), E (nh, N, D)."""
    nh, N, D = E.shape
    return (Y @ E.reshape(nh * N, D)).view(B, -1, D)


def sparse_readout_backward(Y: torch.Tensor, E: torch.Tensor, dz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dE (nh, N, D) = Y^T dz, and dy on Y's non-zeros only: a CSR (B T, nh N) with Y's pattern."""
    nh, N, D = E.shape
    dz_rows = dz.reshape(-1, D)  # B T, D
    dE = (Y.t() @ dz_rows).view(nh, N, D)
    dy = torch.sparse.sampled_addmm(Y, dz_rows, E.reshape(nh * N, D).t(), beta=0.0)
    return dE, dy


def dense_readout(y: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """The dense twin: z (B, T, D) = sum_h y_h E_h, y (B, nh, T, N)."""
    return torch.einsum("bhtn,hnd->btd", y, E)
