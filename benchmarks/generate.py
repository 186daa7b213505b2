"""Generation speed: per-token latency from the state at several context positions, against
re-running the whole prefix for every new token (how the authors' reference code generates).

    python benchmarks/generate.py --presets small paper-25m --out benchmarks/results/generate.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch
from common import add_out_args, check_out, emit, median, timed

from bdh import BDH, BDHConfig


def reference_style_next_token(model, idx):
    """The authors' generate(): a full forward over the whole prefix for each new token.

    `model` should compute as their code does: the quadratic form op by op (attn_impl="naive").
    """
    logits = model(idx, return_state=False).logits[:, -1]
    return torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)


def state_at(model, position: int, chunk: int = 512):
    """A state after `position` tokens of random text (prefilled in chunks to bound memory)."""
    g = torch.Generator().manual_seed(0)
    state = None
    done = 0
    while done < position:
        n = min(chunk, position - done)
        state = model(torch.randint(0, model.config.vocab_size, (1, n), generator=g), state=state).state
        done += n
    return state


def decode_latency(model, state, tokens: int) -> float:
    """Median seconds per decoded token from this state (the state is updated in place)."""
    token = torch.zeros(1, 1, dtype=torch.long)

    def one():
        nonlocal state
        state = model.step(token, state).state

    return median(timed(one, tokens, warmup=2))


@torch.no_grad()
def bench_preset(preset: str, positions: list[int], tokens: int, prefix_context: int, prefix_repeats: int) -> dict:
    torch.manual_seed(0)
    model = BDH(BDHConfig.from_name(preset, dropout=0.0, sparse_decode_below=0.0)).eval()
    per_position = {}
    for pos in positions:
        per_position[str(pos)] = decode_latency(model, state_at(model, pos), tokens)
    authors_form = BDH(replace(model.config, attn_impl="naive")).eval()
    authors_form.load_state_dict(model.state_dict())
    idx = torch.randint(0, 256, (1, prefix_context))
    rerun = median(timed(lambda: reference_style_next_token(authors_form, idx), prefix_repeats, warmup=1))
    stateful = per_position.get(str(prefix_context)) or decode_latency(model, state_at(model, prefix_context), tokens)
    lat = list(per_position.values())
    return {
        "preset": preset,
        "seconds_per_token_at_position": {k: round(v, 5) for k, v in per_position.items()},
        "max_over_min_latency": round(max(lat) / min(lat), 3),
        "rerun_prefix_seconds_per_token": round(rerun, 4),
        "rerun_prefix_context": prefix_context,
        "speedup_vs_rerun_prefix": round(rerun / stateful, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["small", "paper-25m"])
    p.add_argument("--positions", nargs="+", type=int, default=[64, 1000, 4096])
    p.add_argument("--tokens", type=int, default=30, help="decoded tokens timed per position")
    p.add_argument("--prefix-context", type=int, default=1000)
    p.add_argument("--prefix-repeats", type=int, default=3)
    add_out_args(p)
    args = p.parse_args(argv)
    check_out(args)
    rows = [bench_preset(pr, args.positions, args.tokens, args.prefix_context, args.prefix_repeats) for pr in args.presets]
    emit("generate", {"results": rows}, args.out, args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
