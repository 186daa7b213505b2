"""Sparse-aware decoding: per-token time of the dense and the sparse decode step against the
fraction of active neurons, at synthetic sparsity (D_x columns of the other neurons zeroed) and,
given --ckpt, on a trained model reading real text. Both paths give the same logits (checked).

    python benchmarks/sparse_decode.py --presets small paper-25m --ckpt runs/small --out benchmarks/results/sparse.json
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import add_out_args, check_out, emit, median, timed

from bdh import BDH, BDHConfig, load_model


def silence(model, keep: float, seed: int = 0) -> None:
    """Keep about `keep` of the RoPE pairs able to fire (the rest get zero D_x columns)."""
    nh, _, N = model.encoder.shape
    g = torch.Generator().manual_seed(seed)
    off = (torch.rand(nh, 1, N // 2, generator=g) > keep).repeat_interleave(2, dim=-1)
    with torch.no_grad():
        model.encoder.masked_fill_(off, 0.0)


def active_fraction(model, token, state) -> float:
    """Fraction of RoPE pairs active, averaged over layers, for this token."""
    fractions = []

    def record(site, layer, x):
        if site == "x":
            fractions.append((x.unflatten(-1, (-1, 2)) != 0).any(-1).float().mean().item())

    with model.capture(record):
        model(token, state=state.clone())
    return sum(fractions) / len(fractions)


def per_token(model, state, tokens, threshold: float) -> float:
    model.config.sparse_decode_below = threshold
    state = state.clone()
    it = iter(tokens)

    def one():
        nonlocal state
        state = model.step(next(it), state).state

    return median(timed(one, len(tokens) - 3, warmup=2))


@torch.no_grad()
def measure(model, prompt, tokens) -> dict:
    state = model(prompt).state
    dense = per_token(model, state, tokens, 0.0)
    sparse = per_token(model, state, tokens, 1.0)
    # exactness on the first token
    model.config.sparse_decode_below = 0.0
    a = model.step(tokens[0], state.clone()).logits
    model.config.sparse_decode_below = 1.0
    b = model.step(tokens[0], state.clone()).logits
    return {
        "active_fraction": round(active_fraction(model, tokens[0], state), 4),
        "dense_s_per_token": round(dense, 5),
        "sparse_s_per_token": round(sparse, 5),
        "sparse_over_dense": round(sparse / dense, 3),
        "max_rel_logit_diff": float(((a - b).abs().max() / a.abs().max()).item()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["small", "paper-25m"])
    p.add_argument("--keep", nargs="+", type=float, default=[1.0, 0.5, 0.1, 0.05, 0.02])
    p.add_argument("--ckpt", default=None, help="a trained checkpoint to measure on real text")
    p.add_argument("--tokens", type=int, default=25)
    add_out_args(p)
    args = p.parse_args(argv)
    check_out(args)
    rows = []
    g = torch.Generator().manual_seed(0)
    for preset in args.presets:
        for keep in args.keep:
            torch.manual_seed(0)
            model = BDH(BDHConfig.from_name(preset, dropout=0.0)).eval()
            silence(model, keep)
            prompt = torch.randint(0, 256, (1, 64), generator=g)
            tokens = list(torch.randint(0, 256, (args.tokens, 1, 1), generator=g))
            rows.append({"model": preset, "keep": keep, **measure(model, prompt, tokens)})
    if args.ckpt:
        from bdh.data import load_tokenizer
        from bdh.checkpoint import resolve_checkpoint

        model = load_model(args.ckpt)
        tok = load_tokenizer(resolve_checkpoint(args.ckpt))
        text = "ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n"
        ids = torch.tensor([tok.encode(text)])
        tokens = [ids[:, i : i + 1] for i in range(40, min(ids.shape[1], 40 + args.tokens))]
        rows.append({"model": f"trained:{args.ckpt}", "keep": None, **measure(model, ids[:, :40], tokens)})
    emit("sparse_decode", {"results": rows}, args.out, args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
