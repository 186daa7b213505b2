"""Where the sparse read-out pays: the fused layer's dense read-out against bdh.ops.sparse.

The read-out's forward and backward as the fused layer runs them densely (bdh.ops.plan.dense_readout:
g, y and z forward; g made again, dE, dy, dg', dD_y, da and dy * g backward) against the same with y
held sparse (bdh.ops.plan.sparse_readout_pass: building the CSR matrix included), at several
densities of y on the shapes of a training step (default: small, 2,048 tokens). This is the
measurement bdh.ops.plan.sparse_below makes once per machine to choose between them. Both give the
same results (checked here for z; tests/test_sparse_readout.py checks every gradient). The trained
small model has 4-6 % of y non-zero, a fresh one about 25 %.

    python benchmarks/sparse_readout.py --densities 0.01 0.02 0.05 0.1 0.25 --out benchmarks/results/sparse_readout.json
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import add_out_args, check_out, emit

from bdh import BDHConfig
from bdh.ops.plan import dense_readout, measure_readout, readout_inputs, sparse_readout_pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--tokens", type=int, default=2048, help="B x T of the step (B = tokens / T)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--densities", nargs="+", type=float, default=[0.01, 0.02, 0.05, 0.1, 0.25])
    p.add_argument("--repeats", type=int, default=3)
    add_out_args(p)
    args = p.parse_args(argv)
    check_out(args)
    c = BDHConfig.from_name(args.preset)
    shape = (max(1, args.tokens // args.seq), c.n_head, args.seq, c.neurons_per_head, c.n_embd,
             torch.device("cpu"), torch.float32)
    results = []
    for density in args.densities:
        inputs = readout_inputs(*shape, density)
        measured = torch.relu(inputs[1] @ inputs[2]).mul_(inputs[0]).ne(0).float().mean().item()
        # z, dE, dD_y and da (dx differs off x's support, which the layer's [x > 0] mask removes)
        diff = max((a - b).abs().max().item()
                   for a, b in zip(dense_readout(*inputs)[:4], sparse_readout_pass(*inputs)[:4]))
        dense_s, sparse_s = measure_readout(*shape, density=density, repeats=args.repeats)
        results.append({"density": round(measured, 4), "dense_ms": round(dense_s * 1e3, 2),
                        "sparse_ms": round(sparse_s * 1e3, 2), "speedup": round(dense_s / sparse_s, 2),
                        "pays": sparse_s < dense_s, "max_abs_diff": diff})
    emit("sparse_readout", {"preset": args.preset, "batch": shape[0], "seq": args.seq, "results": results},
         args.out, args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
