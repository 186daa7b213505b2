"""Where the sparse read-out pays: the fused layer's dense read-out products against bdh.ops.sparse.

The three products of the read-out that touch y (z = Y E, dE = Y^T dz, and dy = dz E^T, which the
sparse form computes only at y's non-zeros), timed at several densities of y on the shapes of a
training step (default: small, 2,048 tokens). The sparse time includes building the CSR matrix
from y. Both give the same z and dE (checked here; tests/test_sparse_readout.py checks the
gradients too). The trained small model has 4-6 % of y non-zero, a fresh one about 25 %.

    python benchmarks/sparse_readout.py --densities 0.01 0.02 0.05 0.1 0.25 --out benchmarks/results/sparse_readout.json
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import add_out_args, check_out, emit, median, timed

from bdh import BDHConfig
from bdh.ops.layer import per_head, weight_grad
from bdh.ops.sparse import rows, sparse_readout, sparse_readout_backward


def dense(y, E, dz_heads):
    z = per_head(y, E).sum(dim=1)
    return z, weight_grad(y, dz_heads), per_head(dz_heads, E.transpose(-1, -2))


def sparse(y, E, dz):
    Y = rows(y)
    z = sparse_readout(Y, E, y.shape[0])
    dE, dy = sparse_readout_backward(Y, E, dz)
    return z, dE, dy


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--tokens", type=int, default=2048, help="B x T of the step (B = tokens / T)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--densities", nargs="+", type=float, default=[0.01, 0.02, 0.05, 0.1, 0.25])
    p.add_argument("--repeats", type=int, default=5)
    add_out_args(p)
    args = p.parse_args(argv)
    check_out(args)
    c = BDHConfig.from_name(args.preset)
    nh, N, D, T = c.n_head, c.neurons_per_head, c.n_embd, args.seq
    B = max(1, args.tokens // T)
    g = torch.Generator().manual_seed(0)
    E = torch.randn(nh, N, D, generator=g) * 0.02
    dz = torch.randn(B, T, D, generator=g)
    dz_heads = dz.unsqueeze(1).expand(B, nh, T, D).contiguous()
    results = []
    for density in args.densities:
        y = torch.rand(B, nh, T, N, generator=g)
        y *= torch.rand(y.shape, generator=g) < density
        z_d, dE_d, _ = dense(y, E, dz_heads)
        z_s, dE_s, _ = sparse(y, E, dz)
        err = max((z_d - z_s).abs().max().item(), (dE_d - dE_s).abs().max().item())
        t_dense = median(timed(lambda: dense(y, E, dz_heads), args.repeats))
        t_sparse = median(timed(lambda: sparse(y, E, dz), args.repeats))
        results.append({"density": density, "measured_density": round((y != 0).float().mean().item(), 4),
                        "dense_ms": round(t_dense * 1e3, 2), "sparse_ms": round(t_sparse * 1e3, 2),
                        "speedup": round(t_dense / t_sparse, 2), "pays": t_sparse < t_dense, "max_abs_diff": err})
    emit("sparse_readout", {"preset": args.preset, "batch": B, "seq": T, "results": results}, args.out, args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
