"""The attention math. Every form has one signature (see bdh.ops.naive) and one result."""

from __future__ import annotations

from functools import partial

from bdh.ops.chunked import CHUNK_SIZE, chunked_attention
from bdh.ops.naive import loop_attention, naive_attention
from bdh.ops.recurrent import recurrent_attention, recurrent_step
from bdh.ops.rope import apply_rope, apply_rope_complex, pairs_share_frequencies, rope_freqs, rope_rotors, rope_tables

__all__ = [
    "apply_rope", "apply_rope_complex", "chunked_attention", "pairs_share_frequencies", "rope_rotors", "get_attention", "loop_attention", "naive_attention",
    "pick_attention", "recurrent_attention", "recurrent_step", "rope_freqs", "rope_tables",
]


def get_attention(name: str, chunk_size: int = CHUNK_SIZE):
    """The attention function of a fixed form: naive, chunked, recurrent or loop."""
    table = {
        "naive": naive_attention,
        "chunked": partial(chunked_attention, chunk_size=chunk_size),
        "recurrent": recurrent_attention,
        "loop": loop_attention,
    }
    if name not in table:
        raise ValueError(f"unknown attention form {name!r}; choose one of {', '.join(table)}")
    return table[name]


def pick_attention(T: int, N: int, D: int, chunk_size: int, has_state: bool, wants_state: bool) -> str:
    """The cheapest exact form for this shape, by a cost per token and head.

    quadratic: T (N + D) multiply-adds for scores and weighted sum, + N D to read an incoming
    state and N D to build the outgoing one; chunked: C (N + D) within a chunk + 2 N D for the
    state carried between chunks, weighted 4x because those (nc, N, D) state tensors are read
    and written several times per training step at memory speed, not matmul speed. The weight
    is calibrated on benchmarks/train_step.py (2-core CPU, C = 256): see benchmarks/README.md.
    One token: recurrent.
    """
    if T == 1:
        return "recurrent"
    naive_cost = T * (N + D) + N * D * (int(has_state) + int(wants_state))
    chunked_cost = min(chunk_size, T) * (N + D) + 8 * N * D
    return "chunked" if chunked_cost < naive_cost else "naive"
