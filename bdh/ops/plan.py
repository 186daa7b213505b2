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
the fastest is kept in a cache file per machine (CPU model or GPU name, torch version, threads,
the version of the kernels):
later runs read it. The same cache holds, per shape, the density of y below which the read-out
is faster held sparse (sparse_below; bdh.ops.sparse): the dense and the sparse read-out timed at a
few densities. Small shapes (under CALIBRATE_FROM elements per N-wide tensor), or
BDH_CALIBRATE=0, use the count alone and never the sparse read-out. Every choice computes the
same function; only rounding and speed differ. Delete the cache file to measure again.

The same cache holds, per shape, whether the fused layer's weight products go one per sequence
or as one product over all sequences (batched_products: both timed on the layer's three kinds of
product).

Off the CPU the same cache also says, per shape, whether the fused layer runs at all
(fused_pays): the model's layers are timed fused and op by op, and the faster is kept. On the
CPU the fused layer was the faster at every shape measured; on an H100 it was not, at T = 128
and 512 (benchmarks/README.md, "On a GPU").
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import torch

from bdh.errors import UserError
from bdh.fileio import cache_root, read_json, write_json
from bdh.ops.chunked import Weights, attend, attend_backward, attend_direct, attend_direct_backward
from bdh.ops.layer import keeps_scores, per_head, relu_backward_, weight_grad
from bdh.ops.sparse import SparseY, sparse_readout, sparse_readout_backward

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


def calibrating(B: int, nh: int, T: int, N: int) -> bool:
    """Whether shapes like this are timed: big enough, and BDH_CALIBRATE is not 0."""
    return B * nh * T * N >= CALIBRATE_FROM and os.environ.get(CALIBRATE_ENV, "1") != "0"


def plan_for(B: int, T: int, nh: int, N: int, D: int, states: bool, like: torch.Tensor) -> Plan:
    """The plan for this shape: from the machine's cache, measured now, or by the count alone."""
    ranked = sorted(candidates(T, states), key=lambda p: counted_cost(p, T, N, D))
    if len(ranked) == 1 or not calibrating(B, nh, T, N):
        return ranked[0]
    shape = (B, nh, T, N, D, like.device, like.dtype)
    key = f"{_shape_key(*shape)} states{int(states)}"
    entry = _cached(key, lambda: _fastest({str(p): measure(p, *shape) for p in ranked[:TIMED]}))
    return Plan.parse(entry["plan"], T)


def batched_products(B: int, T: int, nh: int, N: int, D: int, like: torch.Tensor) -> bool:
    """Whether the fused layer's weight products run as one product over all sequences (per_head,
    weight_grad: batched) rather than one per sequence: timed once per machine and shape
    (measure_products), then cached. Shapes too small to calibrate (or BDH_CALIBRATE=0): one per
    sequence on the CPU, one product elsewhere, as measured on a 2-core CPU and on an H200
    (benchmarks/README.md)."""
    if not calibrating(B, nh, T, N):
        return like.device.type != "cpu"
    shape = (B, nh, T, N, D, like.device, like.dtype)
    entry = lambda seconds: {"batched": _faster(seconds, "True"), "seconds": seconds}  # noqa: E731
    return _cached(f"{_shape_key(*shape)} weight-products", lambda: entry(measure_products(*shape)))["batched"]


def measure_products(B, nh, T, N, D, device, dtype, repeats: int = 2) -> dict[str, float | None]:
    """Best-of-repeats seconds of the layer's three kinds of weight product on random data: D to N
    (x, g, dy), N to D (z, dv, da) and a weight gradient, one per sequence ("False") and batched
    ("True"), in turns; the N-wide products into a buffer made beforehand, as the layer writes them
    into its scratch buffers."""
    g = torch.Generator(device=device).manual_seed(0)
    a_D, a_N = (torch.randn(B, nh, T, X, device=device, dtype=dtype, generator=g) for X in (D, N))
    W = torch.randn(nh, D, N, device=device, dtype=dtype, generator=g)
    out = torch.empty_like(a_N)

    def run(batched: bool):
        per_head(a_D, W, out, batched)
        per_head(a_N, W.transpose(-1, -2), batched=batched)
        weight_grad(a_D, a_N, batched)
        synchronize(device)

    return best_of_each({str(b): partial(run, b) for b in (False, True)}, repeats)


def times_layer_forms(device: torch.device) -> bool:
    """Whether fused="auto" times the fused layer against the op-by-op one on this device (off the CPU)."""
    return device.type != "cpu"


def fused_pays(B: int, T: int, nh: int, N: int, D: int, states: bool, grad: bool, like: torch.Tensor,
               timings) -> bool:
    """Whether the fused layer is faster than the op-by-op one for this shape, with or without a
    backward (grad). timings() -> {"fused": seconds, "op_by_op": seconds} (None: ran out of
    memory, the slowest) is called once per machine and shape, then cached. Shapes too small to
    calibrate (or BDH_CALIBRATE=0) take the op-by-op layer, the faster at every shape timed on a
    GPU before this choice was made."""
    if not calibrating(B, nh, T, N):
        return False
    entry = lambda seconds: {"fused": _faster(seconds, "fused"), "seconds": seconds}  # noqa: E731
    return _cached(_layer_form_key(B, T, nh, N, D, states, grad, like), lambda: entry(timings()))["fused"]


def layer_form_seconds(B: int, T: int, nh: int, N: int, D: int, states: bool, grad: bool,
                       like: torch.Tensor) -> dict | None:
    """The seconds fused_pays timed for this shape ({"fused": s, "op_by_op": s}), None if it timed none."""
    key = _layer_form_key(B, T, nh, N, D, states, grad, like)
    entry = _memo.get(key) or _read_table(_cache_path()).get(key)
    return entry and entry["seconds"]


def _layer_form_key(B, T, nh, N, D, states, grad, like) -> str:
    return f"{_shape_key(B, nh, T, N, D, like.device, like.dtype)} states{int(states)} grad{int(grad)} layer-form"


def _faster(seconds: dict, name: str) -> bool:
    """Whether form `name` was timed faster than the other form(s) (None: ran out of memory, the slowest)."""
    t = {k: float("inf") if v is None else v for k, v in seconds.items()}
    return all(t[name] < v for k, v in t.items() if k != name)


def sparse_below(B: int, T: int, nh: int, N: int, D: int, like: torch.Tensor) -> float:
    """The density of y under which the fused layer's read-out runs sparse (bdh.ops.sparse), 0 for never.

    Measured once per machine and shape: the dense and the sparse read-out (forward and backward) at
    each of DENSITIES; the answer is where the sparse one stops being faster, interpolated between
    the densities tried (_crossover). Uncalibrated shapes (small ones, BDH_CALIBRATE=0) never run
    sparse.
    """
    if not calibrating(B, nh, T, N) or like.device.type != "cpu":
        return 0.0
    shape = (B, nh, T, N, D, like.device, like.dtype)
    return _cached(f"{_shape_key(*shape)} sparse-readout", lambda: _crossover(shape))["below"]


DENSITIES = (0.02, 0.05, 0.1, 0.2)


def _crossover(shape) -> dict:
    """The density where the sparse read-out stops paying: between the last density tried at which it
    was faster and the next, where the ratio of times crosses 1 (both times grow about linearly)."""
    seconds = {str(d): measure_readout(*shape, density=d) for d in DENSITIES}
    below, ratio = 0.0, 0.0
    for d in DENSITIES:
        dense_s, sparse_s = seconds[str(d)]
        r = sparse_s / dense_s
        if r >= 1:
            if below > 0:
                below += (d - below) * (1 - ratio) / (r - ratio)
            break
        below, ratio = d, r
    return {"below": round(below, 4), "seconds_dense_sparse": seconds}


def _fastest(timings: dict) -> dict:
    return {"plan": min(timings, key=timings.get), "seconds": timings}


# The version of the kernels timed: raised when a change to the fused layer or the sparse read-out
# makes earlier timings stale, so that each machine measures again (older entries stay unread).
KERNELS = 3


def _shape_key(B, nh, T, N, D, device, dtype) -> str:
    return f"{machine_key(device)} kernels{KERNELS} {dtype} B{B} T{T} nh{nh} N{N} D{D}"


_memo: dict[str, dict] = {}


def _cached(key: str, calibrate) -> dict:
    """The cache file's entry for key, made by calibrate() (and written) when it has none.

    A cache that cannot be read is measured again; one that cannot be written (no writable cache
    directory) is kept for this process only: training never stops for it.
    """
    if key in _memo:
        return _memo[key]
    path = _cache_path()
    table = _read_table(path)
    if key not in table:
        entry = calibrate()
        table = _read_table(path)  # another process may have written meanwhile
        table[key] = entry
        if path is not None:
            try:
                write_json(path, table)
            except OSError:
                pass
    _memo[key] = table[key]
    return _memo[key]


def _cache_path() -> Path | None:
    try:
        return cache_root() / CACHE_FILE
    except UserError:  # the cache directory cannot be made
        return None


def _read_table(path: Path | None) -> dict:
    if path is None:
        return {}
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
        synchronize(device)

    return best_of(run, repeats)


def readout_inputs(B, nh, T, N, D, device, dtype, density, seed=0):
    """x, LN(a), D_y, E and dz per head such that y = relu(LN(a) D_y) * x has about `density` non-zeros."""
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)  # noqa: E731
    uniform = lambda *s: torch.rand(*s, device=device, dtype=dtype, generator=g)  # noqa: E731
    x = uniform(B, nh, T, N) * (uniform(B, nh, T, N) < 2 * density)  # relu(LN(a) D_y) > 0 about half the time
    dz_heads = rand(B, 1, T, D).expand(B, nh, T, D).contiguous()
    return x, rand(B, nh, T, D), rand(nh, D, N) / D**0.5, rand(nh, N, D) / N**0.5, dz_heads


def dense_readout(x, a_hat, Dy, E, dz_heads):
    """The fused layer's dense read-out, forward and backward (bdh.ops.layer: g made again in backward),
    for timing against sparse_readout_pass."""
    z = per_head(per_head(a_hat, Dy).relu_().mul_(x), E).sum(dim=1)  # forward
    g = per_head(a_hat, Dy).relu_()  # backward
    dE = weight_grad(g * x, dz_heads)
    dy = per_head(dz_heads, E.transpose(-1, -2))
    dg = relu_backward_(dy * x, g)
    return z, dE, weight_grad(a_hat, dg), per_head(dg, Dy.transpose(-1, -2)), g.mul_(dy)


def sparse_readout_pass(x, a_hat, Dy, E, dz_heads):
    """The same with y held sparse (bdh.ops.sparse), building the CSR matrix included."""
    sy = SparseY(torch.relu(per_head(a_hat, Dy)).mul_(x))
    return (sparse_readout(sy, E), *sparse_readout_backward(sy, E, Dy, x, a_hat, dz_heads, 1.0))


def measure_readout(B, nh, T, N, D, device, dtype, density: float, repeats: int = 2) -> tuple[float, float]:
    """Best-of-repeats seconds of the dense and of the sparse read-out at this density of y."""
    args = readout_inputs(B, nh, T, N, D, device, dtype, density)
    return tuple(best_of(lambda: fn(*args), repeats) for fn in (dense_readout, sparse_readout_pass))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (GPUs run asynchronously: a timer needs this)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def best_of(run, repeats: int) -> float:
    """The fewest seconds of `repeats` calls of run() after one untimed call (off the CPU, run
    synchronises the device itself); running out of GPU memory is raised."""
    seconds = best_of_each({"run": run}, repeats)["run"]
    if seconds is None:
        raise torch.cuda.OutOfMemoryError("out of GPU memory while timing")
    return seconds


def best_of_each(runs: dict, repeats: int) -> dict[str, float | None]:
    """best_of for each of several forms {name: run}, their calls taking turns so that a slower
    stretch of the machine (a GPU's clocks still rising, a busy neighbour) falls on every form
    alike; None for a form that ran out of GPU memory (it is not called again)."""
    best = dict.fromkeys(runs, float("inf"))
    for timed in (False,) + (True,) * repeats:  # first one untimed call of each
        for name, run in runs.items():
            if best[name] is None:
                continue
            start = time.perf_counter()
            try:
                run()
            except torch.cuda.OutOfMemoryError:
                best[name] = None
                torch.cuda.empty_cache()
                continue
            if timed:
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: None if s is None else round(s, 5) for name, s in best.items()}


def machine_key(device: torch.device) -> str:
    """What the timings belong to: the processor (or GPU), torch's version, vector extensions and threads."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:  # the extensions torch's kernels use (ATEN_CPU_CAPABILITY can lower them) and MKL's (MKL_ENABLE_INSTRUCTIONS)
        name = f"{cpu_name()} {torch.backends.cpu.get_cpu_capability()} mkl:{os.environ.get('MKL_ENABLE_INSTRUCTIONS', '')}"
    return f"{name} torch{torch.__version__} threads{torch.get_num_threads()}"


@lru_cache(maxsize=1)
def cpu_name() -> str:
    """The processor's model name (Linux: /proc/cpuinfo); read once per process, since every
    forward asks for the plan's cache key."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
