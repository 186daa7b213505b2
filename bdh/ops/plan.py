"""How the fused layer computes its attention for one shape: measured once per machine, then cached.

Two exact forms serve a sequence of T tokens (bdh.ops.chunked):

    direct/b    the quadratic form in row blocks of b tokens, skipping the zero upper triangle
                (only without states: no incoming state, none asked for)
    chunked/C   chunks of C tokens carrying an N x D state per head between them

Their costs, in multiply-adds per head and token over forward and backward (scores and weighted
sums; dQ + dK is one full T x T product because k = q):

    direct/b    (T + b) / 2 * (2 N + 3 D) + T N
    chunked/C   3 C (N + D) + 7 N D (T - C) / T     (state reads and writes, both passes)

Which is faster on a given machine depends on how well its matrix units run products of those
sizes, not only on their counts. So with calibration on (the default), the first time a shape
is seen the cheapest candidates by the count above are timed on random data of that shape and
the fastest is kept in a cache file per machine (CPU model or GPU name, torch version, threads):
later runs read it. Small shapes (under CALIBRATE_FROM elements per N-wide tensor), or
BDH_CALIBRATE=0, use the count alone. Every plan computes the same function; only rounding and
speed differ.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from bdh.fileio import cache_root, read_json, write_json
from bdh.ops.chunked import Weights, attend, attend_backward, attend_direct, attend_direct_backward
from bdh.ops.layer import keeps_scores

BLOCKS = (32, 64, 128, 256)  # row blocks of the direct form, and chunk lengths of the chunked form
CALIBRATE_FROM = 1 << 22  # B * nh * T * N at which a shape is worth timing (~0.1 s of attention)
CALIBRATE_ENV = "BDH_CALIBRATE"
CACHE_FILE = "fused_plans.json"
TIMED = 3  # candidates timed per shape, cheapest by the count first


@dataclass(frozen=True)
class Plan:
    """chunk: the state chunk length C (C = T: no states); block: the direct form's row block, or None."""

    chunk: int
    block: int | None = None

    def __str__(self) -> str:
        return f"direct/{self.block}" if self.block else f"chunked/{self.chunk}"

    @classmethod
    def parse(cls, text: str, T: int) -> "Plan":
        form, size = text.split("/")
        return cls(chunk=T, block=int(size)) if form == "direct" else cls(chunk=int(size))


def candidates(T: int, states: bool) -> list[Plan]:
    """Every plan for T tokens; with states (an incoming state, or one asked for) chunked ones only."""
    sizes = [b for b in BLOCKS if b < T and T % b == 0] + [T]
    return [Plan(C) for C in sizes] if states else [Plan(T, b) for b in sizes] + [Plan(C) for C in sizes[:-1]]


def counted_cost(plan: Plan, T: int, N: int, D: int) -> float:
    """Multiply-adds per head and token of the attention, forward and backward (module docstring)."""
    if plan.block:
        return (T + plan.block) / 2 * (2 * N + 3 * D) + T * N
    C = plan.chunk
    return 3 * C * (N + D) + 7 * N * D * (T - C) / T


def plan_for(B: int, T: int, nh: int, N: int, D: int, states: bool, like: torch.Tensor) -> Plan:
    """The plan for this shape: from the machine's cache, measured now, or by the count alone."""
    ranked = sorted(candidates(T, states), key=lambda p: counted_cost(p, T, N, D))
    if len(ranked) == 1 or B * nh * T * N < CALIBRATE_FROM or os.environ.get(CALIBRATE_ENV, "1") == "0":
        return ranked[0]
    key = f"{machine_key(like.device)} {like.dtype} B{B} T{T} nh{nh} N{N} D{D} states{int(states)}"
    return Plan.parse(_cached(key, tuple(ranked[:TIMED]), B, nh, T, N, D, like.device, like.dtype), T)


@lru_cache(maxsize=None)
def _cached(key, ranked, B, nh, T, N, D, device, dtype) -> str:
    path = cache_root() / CACHE_FILE
    table = _read_table(path)
    if key not in table:
        timings = {str(p): measure(p, B, nh, T, N, D, device, dtype) for p in ranked}
        table = _read_table(path)  # another process may have written meanwhile
        table[key] = {"plan": min(timings, key=timings.get), "seconds": timings}
        write_json(path, table)
    return table[key]["plan"]


def _read_table(path: Path) -> dict:
    try:
        table = read_json(path)
    except Exception:  # missing or unreadable: measured again and rewritten
        return {}
    return table if isinstance(table, dict) else {}


def measure(plan: Plan, B, nh, T, N, D, device, dtype, repeats: int = 2) -> float:
    """Best-of-repeats seconds of the attention's forward and backward under plan, on random data."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, nh, T, N, device=device, dtype=dtype, generator=g).relu_()
    v, d_o = (torch.randn(B, nh, T, D, device=device, dtype=dtype, generator=g) for _ in range(2))
    w = Weights(None, plan.chunk, dtype)

    def run():
        if plan.block:
            _, scores = attend_direct(q, v, w, plan.block, keeps_scores(B, nh, T, plan.block, q.element_size()))
            attend_direct_backward(q, v, w, plan.block, d_o, scores=scores)
        else:
            states = plan.chunk != T
            attend(q, q, v, None, w, plan.chunk, False)
            attend_backward(q, q, v, None, states, w, plan.chunk, d_o, None, shared_qk=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return round(best, 5)


def machine_key(device: torch.device) -> str:
    """What the timings belong to: the processor (or GPU), torch's version and thread count."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_name()
    return f"{name} torch{torch.__version__} threads{torch.get_num_threads()}"


def cpu_name() -> str:
    """The processor's model name (Linux: /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
