"""bdh.ops.sparse: the read-out with y held sparse, against its dense rendering under autograd."""

import pytest
import torch

from bdh.ops.sparse import SparseY, sparse_readout, sparse_readout_backward

B, NH, T, N, D = 2, 3, 5, 8, 4


def readout_inputs(x_density, p, seed=0):
    """x, a_hat, Dy, E, the dropout multiplier, dz: float64, x and the mask sparse."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = rand(B, NH, T, N).relu() * (torch.rand(B, NH, T, N, generator=g, dtype=torch.float64) < x_density)
    keep = (torch.rand(B, NH, T, N, generator=g, dtype=torch.float64) >= p).double() / (1 - p)
    return x, rand(B, NH, T, D), rand(NH, D, N), rand(NH, N, D), keep, rand(B, T, D)


def dense(x, a_hat, Dy, E, keep):
    """The read-out as the paper writes it: y = relu(LN(a) D_y) * x (dropped), z = sum_h y_h E_h."""
    y = torch.relu(a_hat @ Dy) * x * keep  # B, nh, T, N
    return y, torch.einsum("bhtn,hnd->btd", y, E)


@pytest.mark.parametrize("x_density, p", [(0.0, 0.0), (0.1, 0.0), (0.5, 0.0), (1.0, 0.0), (0.5, 0.25)])
def test_sparse_readout_and_its_backward_equal_the_dense_ones(x_density, p):
    x, a_hat, Dy, E, keep, dz = readout_inputs(x_density, p)
    leaves = [t.clone().requires_grad_() for t in (x, a_hat, Dy, E)]
    y, z_dense = dense(*leaves, keep)
    dx_ref, da_ref, dDy_ref, dE_ref = torch.autograd.grad(z_dense, leaves, dz)

    sy = SparseY(y.detach())
    assert sy.density() == (y != 0).double().mean().item()
    z = sparse_readout(sy, E)
    dz_heads = dz.unsqueeze(1).expand(B, NH, T, D).contiguous()
    dE, dDy, da, dx = sparse_readout_backward(sy, E, Dy, x, a_hat, dz_heads, 1 / (1 - p))
    for got, want in ((z, z_dense), (dE, dE_ref), (dDy, dDy_ref), (da, da_ref)):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
    # dx here is the read-out's share, dy * g; autograd's also has dy * g where x = 0 (g > 0), which the
    # layer's [x > 0] mask removes: compare on x's support
    assert torch.allclose(dx, dx_ref * (x > 0), rtol=0, atol=1e-12)
    assert torch.equal(dx != 0, (dx_ref * (x > 0) != 0))


def test_heads_sit_side_by_side_in_the_csr_matrix():
    y = torch.zeros(1, 2, 1, 3)
    y[0, 1, 0, 2] = 5.0  # head 1, neuron 2 -> column 1 * 3 + 2
    dense = SparseY(y).Y.to_dense()
    assert dense.shape == (2, 6) and dense[1, 5] == 5.0 and dense.abs().sum() == 5.0
