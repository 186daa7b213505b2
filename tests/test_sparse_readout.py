"""bdh.ops.sparse: the read-out with y held sparse, against the dense read-out and autograd."""

import pytest
import torch

from bdh.ops.sparse import dense_readout, rows, sparse_readout, sparse_readout_backward


def sparse_y(density, B=2, nh=3, T=5, N=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(B, nh, T, N, generator=g, dtype=torch.float64)
    return y * (torch.rand(y.shape, generator=g, dtype=torch.float64) < density)


@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 1.0])
def test_sparse_readout_and_its_backward_equal_the_dense_ones(density):
    y = sparse_y(density).requires_grad_()
    g = torch.Generator().manual_seed(1)
    E = torch.randn(3, 8, 4, generator=g, dtype=torch.float64, requires_grad=True)
    dz = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    z_dense = dense_readout(y, E)
    dy_dense, dE_dense = torch.autograd.grad(z_dense, (y, E), dz)

    Y = rows(y.detach())
    z = sparse_readout(Y, E.detach(), B=2)
    dE, dy = sparse_readout_backward(Y, E.detach(), dz)
    assert torch.allclose(z, z_dense, rtol=0, atol=1e-12)
    assert torch.allclose(dE, dE_dense, rtol=0, atol=1e-12)
    # dy is kept where y is non-zero, and there equals the dense gradient
    mask = rows(y.detach()).to_dense() != 0
    dense_rows = dy_dense.permute(0, 2, 1, 3).reshape(10, 24)
    assert torch.equal(dy.to_dense() != 0, mask & (dense_rows != 0))
    assert torch.allclose(dy.to_dense(), dense_rows * mask, rtol=0, atol=1e-12)


def test_rows_put_heads_side_by_side_like_the_decoder():
    y = sparse_y(1.0, B=1, nh=2, T=1, N=3)
    assert torch.equal(rows(y).to_dense()[0], torch.cat([y[0, 0, 0], y[0, 1, 0]]))
