"""Batching of the fused layer's weight products: one bmm per sequence against one large product.

The fused layer multiplies (B, nh, T, K) activations by per-head weights with one batched matmul
per sequence (bdh.ops.layer.per_head), and accumulates weight gradients sequence by sequence
(weight_grad). The alternative is one product over all B T rows, which needs the activations
laid out (nh, B T, K) first: a copy. This times both on the shapes of a training step so that the
choice rests on a measurement of the machine at hand (GFLOP/s, 2 per multiply-add).

    python benchmarks/weight_products.py --preset small --seq 128 512 --out benchmarks/results/weight_products.json
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import add_out_args, check_out, emit, median, timed

from bdh import BDHConfig
from bdh.ops.layer import per_head, weight_grad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--seq", nargs="+", type=int, default=[128, 512])
    p.add_argument("--repeats", type=int, default=5)
    add_out_args(p)
    args = p.parse_args(argv)
    check_out(args)
    c = BDHConfig.from_name(args.preset)
    nh, N, D = c.n_head, c.neurons_per_head, c.n_embd
    rows = []
    for T in args.seq:
        B = max(1, args.tokens // T)
        g = torch.Generator().manual_seed(0)
        v = torch.randn(B, nh, T, D, generator=g)
        x = torch.randn(B, nh, T, N, generator=g)
        W = torch.randn(nh, D, N, generator=g)
        out = torch.empty(B, nh, T, N)
        gflop = 2 * B * nh * T * D * N / 1e9

        def one_product_forward():
            return torch.bmm(v.transpose(0, 1).reshape(nh, B * T, D), W)  # the copy included

        def one_product_grad():
            return torch.bmm(v.transpose(0, 1).reshape(nh, B * T, D).transpose(1, 2),
                             x.transpose(0, 1).reshape(nh, B * T, N))

        cases = {"per_sequence_forward": lambda: per_head(v, W, out=out), "one_product_forward": one_product_forward,
                 "per_sequence_weight_grad": lambda: weight_grad(v, x), "one_product_weight_grad": one_product_grad}
        result = {name: round(gflop / median(timed(fn, args.repeats)), 1) for name, fn in cases.items()}
        rows.append({"T": T, "batch": B, "gflops": result})
    emit("weight_products", {"preset": args.preset, "results": rows}, args.out, args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
