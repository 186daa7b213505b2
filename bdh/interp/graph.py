"""The neuron graph G_x = E D_x read from the parameters (the paper's Section 5).

G (n x n): entry (i, j) = E[i] . D_x[:, j], neuron i -> d-space -> neuron j, in nh x nh blocks of
N x N (block (h, h') = E[head h rows] @ D_x[h']). The reference code calls E "decoder" (nh N, D)
and D_x "encoder" (nh, D, N). Self-loops (the diagonal) are left out of everything below.

G is never held whole: it is computed in row blocks, twice. Pass 1 keeps moments per head block,
the extremes, and the K largest entries with their positions (K = the most edges any analysis
needs), which give the exact thresholds and edge lists of every beta that keeps at most K edges.
Pass 2 counts entries above betas outside that range, the tails of every head block, and per-head
histograms. So memory is O(rows x n + K) and n = 32768 works as well as n = 4096.

The beta sweep keeps the entries >= beta as directed edges. By default (betas=None) the grid is
chosen by edge count, geometric from n to `max_edges` directed edges, because the absolute
scale of G depends on training (the paper's beta ~ 1 belongs to its trained models): each beta
is reported both as a value and in units of G's standard deviation. Modularity (Newman, best of
`seeds` Louvain runs, igraph) is computed on the undirected simple graph (an edge when either
direction passes); betas that keep more than `max_edges` edges get counts but no modularity.
Baselines with the same number m of undirected edges: G(n, m), and a random low-rank product
P1 P2^T (P1, P2 ~ N(0, 1) of shape n x D) thresholded where its undirected graph reaches m edges.
"""

from __future__ import annotations

import contextlib
import io
import random
import warnings
from typing import Sequence

import numpy as np
import torch
from torch import nn

from bdh.interp.capture import unwrap

#: row blocks of G hold about this many entries
BLOCK_ENTRIES = 1 << 24
#: a head looks inhibitory when less than this share of its strong entries (|G| >= beta_ref) are positive
INHIBITORY_SHARE = 0.25


def graph_factors(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(E (n, D), D_x as (D, n), N) in float32 on the CPU: G = E @ D_x."""
    model = unwrap(model)
    E = model.decoder.detach().float().cpu()
    nh, D, N = model.encoder.shape
    Dx = model.encoder.detach().float().cpu().permute(1, 0, 2).reshape(D, nh * N)  # D, n (head-major)
    return E, Dx, N


def neuron_graph(model: nn.Module) -> torch.Tensor:
    """The dense G (n, n); for small models and tests (the analysis below never builds it)."""
    E, Dx, _ = graph_factors(model)
    return E @ Dx


def _row_blocks(n: int, N: int):
    """(start, end, head) row ranges that never straddle two heads."""
    rows = max(1, min(N, BLOCK_ENTRIES // max(1, n)))
    for head in range(n // N):
        for r0 in range(head * N, (head + 1) * N, rows):
            yield r0, min(r0 + rows, (head + 1) * N), head


def _blocks(E: torch.Tensor, Dx: torch.Tensor, N: int):
    """Yield (r0, block (rows, n) of G = E[r0:r1] @ Dx, head of those rows, positions of the diagonal)."""
    n = E.shape[0]
    for r0, r1, head in _row_blocks(n, N):
        rows = torch.arange(r1 - r0)
        yield r0, E[r0:r1] @ Dx, head, (rows, rows + r0)


class _TopK:
    """The k largest values seen so far and their flat positions i * n + j.

    Once k values are held, a block only contributes the entries above the current k-th value,
    found by one comparison, so a pass costs about one elementwise sweep per block.
    """

    def __init__(self, k: int):
        self.k = k
        self.values = torch.empty(0)
        self.index = torch.empty(0, dtype=torch.long)

    def add(self, block: torch.Tensor, offset: int) -> None:
        flat = block.reshape(-1)
        if len(self.values) == self.k:
            index = torch.nonzero(flat > self.values[-1]).squeeze(1)
            if not len(index):
                return
            values = flat[index]
        else:
            values, index = torch.topk(flat, min(self.k, flat.numel()))
        values, index = torch.cat([self.values, values]), torch.cat([self.index, index + offset])
        keep = torch.topk(values, min(self.k, values.numel()))
        self.values, self.index = keep.values, index[keep.indices]


def _per_head_sum(cols: torch.Tensor) -> torch.Tensor:
    """(rows, nh, N) -> (nh,) sums in float64 (each block sum in float32 first: fast, pairwise)."""
    return cols.sum(dim=(0, 2)).double()


def scan_graph(E: torch.Tensor, Dx: torch.Tensor, N: int, k: int) -> dict:
    """Pass 1: moments per head block, extremes, and the k largest off-diagonal entries."""
    n = E.shape[0]
    nh = n // N
    s1, s2, s3, count = (torch.zeros(nh, nh, dtype=torch.float64) for _ in range(4))
    lo, hi = float("inf"), -float("inf")
    top = _TopK(k)
    for r0, blk, head, diag in _blocks(E, Dx, N):
        rows = blk.shape[0]
        d = blk[diag].double()  # the self-loops, all in column block `head`: taken out of every sum
        power = blk.clone()
        for moment, p in ((s1, 1), (s2, 2), (s3, 3)):
            if p > 1:
                power.mul_(blk)
            moment[head] += _per_head_sum(power.view(rows, nh, N))
            moment[head, head] -= float((d ** p).sum())
        count[head] += rows * N
        count[head, head] -= rows
        blk[diag] = float("inf")
        lo = min(lo, float(blk.min()))
        blk[diag] = -float("inf")
        hi = max(hi, float(blk.max()))
        top.add(blk, r0 * n)
    total = count.sum()
    mean = float(s1.sum() / total)
    std = float(torch.sqrt((s2.sum() / total - mean ** 2).clamp(min=0)))
    return {"n": n, "N": N, "mean": mean, "std": std, "min": lo, "max": hi,
            "block_moments": (s1, s2, s3, count), "top_values": top.values, "top_index": top.index}


def _block_stats(s1, s2, s3, count) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean = s1 / count
    var = (s2 / count - mean ** 2).clamp(min=1e-300)
    third = s3 / count - 3 * mean * s2 / count + 2 * mean ** 3
    return mean, var.sqrt(), third / var ** 1.5


def _count(mask: torch.Tensor) -> torch.Tensor:
    """Column counts of a (rows, n) bool mask as float64 (n,): summed as bytes, much faster than bool sums."""
    return mask.view(torch.uint8).sum(dim=0, dtype=torch.int32).double()


def tail_scan(E: torch.Tensor, Dx: torch.Tensor, N: int, betas: Sequence[float], beta_ref: float,
              lo: float, hi: float, bins: int = 80) -> dict:
    """Pass 2: entries >= each beta, per-block tails at +-beta_ref, per-head histograms (no self-loops)."""
    n = E.shape[0]
    nh = n // N
    counts = torch.zeros(len(betas), dtype=torch.float64)
    pos, neg = torch.zeros(nh, nh, dtype=torch.float64), torch.zeros(nh, nh, dtype=torch.float64)
    hist = torch.zeros(nh, bins, dtype=torch.float64)
    mask = torch.empty(0, dtype=torch.bool)
    for _, blk, head, diag in _blocks(E, Dx, N):
        d = blk[diag]
        if mask.shape != blk.shape:
            mask = torch.empty(blk.shape, dtype=torch.bool)
        for k, beta in enumerate(betas):
            counts[k] += float(_count(torch.ge(blk, beta, out=mask)).sum() - (d >= beta).sum())
        pos[head] += _count(torch.ge(blk, beta_ref, out=mask)).view(nh, N).sum(dim=1)
        pos[head, head] -= float((d >= beta_ref).sum())
        neg[head] += _count(torch.le(blk, -beta_ref, out=mask)).view(nh, N).sum(dim=1)
        neg[head, head] -= float((d <= -beta_ref).sum())
        hist[head] += (torch.histc(blk, bins=bins, min=lo, max=hi) - torch.histc(d, bins=bins, min=lo, max=hi)).double()
    return {"counts": counts.tolist(), "pos": pos, "neg": neg, "hist": hist,
            "hist_edges": torch.linspace(lo, hi, bins + 1).tolist()}


# graphs and modularity ------------------------------------------------------------------------
def edges_from_top(top_values: torch.Tensor, top_index: torch.Tensor, n: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Source and target arrays of the `count` largest entries."""
    index = top_index[:count].numpy()
    return index // n, index % n


def first_undirected(top_index: torch.Tensor, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The first m distinct undirected pairs of a list of directed entries, largest first."""
    index = top_index.numpy()
    src, dst = index // n, index % n
    pairs = np.minimum(src, dst) * n + np.maximum(src, dst)
    _, first = np.unique(pairs, return_index=True)
    keep = np.sort(first)[:m]
    return src[keep], dst[keep]


def undirected(n: int, src: np.ndarray, dst: np.ndarray):
    """The undirected simple igraph Graph on n vertices (both directions merged, no loops)."""
    import igraph as ig

    g = ig.Graph(n=n, edges=np.stack([src, dst], axis=1).tolist(), directed=False)
    g.simplify(multiple=True, loops=True)
    return g


def louvain_modularity(graph, seeds: int = 5) -> tuple[float | None, int]:
    """Best Newman modularity over `seeds` Louvain runs (seed s = 0 .. seeds-1) and its community count."""
    import igraph as ig

    if graph.ecount() == 0:
        return None, graph.vcount()
    best = (-1.0, 0)
    for seed in range(seeds):
        ig.set_random_number_generator(random.Random(seed))
        try:
            part = graph.community_multilevel()
        finally:
            ig.set_random_number_generator(random)
        q = float(part.modularity)
        if q > best[0]:
            best = (q, len(part))
    return best


def gnm_graph(n: int, m: int, seed: int = 0):
    """G(n, m): m edges placed uniformly at random (undirected, simple)."""
    import igraph as ig

    ig.set_random_number_generator(random.Random(seed))
    try:
        return ig.Graph.Erdos_Renyi(n=n, m=m, directed=False, loops=False)
    finally:
        ig.set_random_number_generator(random)


def lowrank_top(n: int, rank: int, k: int, N: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest off-diagonal entries of P1 P2^T, P1, P2 ~ N(0, 1) (n, rank): values, flat index."""
    g = torch.Generator().manual_seed(seed)
    P1, P2 = torch.randn(n, rank, generator=g), torch.randn(n, rank, generator=g)
    top = _TopK(k)
    for r0, blk, _, diag in _blocks(P1, P2.T.contiguous(), N):
        blk[diag] = -float("inf")
        top.add(blk, r0 * n)
    return top.values, top.index


# degrees and power laws -----------------------------------------------------------------------
def degrees(n: int, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(out-degree, in-degree) of every neuron in a directed edge list."""
    return np.bincount(src, minlength=n), np.bincount(dst, minlength=n)


def fit_degree_power_law(values: np.ndarray) -> dict:
    """powerlaw.Fit(discrete=True) of the positive values, compared with exponential and lognormal.

    R is the normalised log-likelihood ratio (positive: the power law fits better), p its
    significance. Returns {"ok": False, "reason"} when there is too little to fit.
    """
    d = np.asarray(values)
    d = d[d > 0]
    if len(d) < 20 or len(np.unique(d)) < 4:
        return {"ok": False, "reason": f"too few distinct positive values ({len(np.unique(d))} of {len(d)})"}
    import powerlaw

    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        np_err = np.seterr(all="ignore")
        try:
            fit = powerlaw.Fit(d, discrete=True, verbose=False)
            r_exp, p_exp = fit.distribution_compare("power_law", "exponential", normalized_ratio=True)
            r_log, p_log = fit.distribution_compare("power_law", "lognormal", normalized_ratio=True)
        finally:
            np.seterr(**np_err)
    return {"ok": True, "alpha": float(fit.power_law.alpha), "sigma": float(getattr(fit.power_law, "standard_err", None) or fit.power_law.sigma),
            "xmin": float(fit.xmin), "ks_distance": float(fit.power_law.D), "n": int(len(d)),
            "n_tail": int((d >= fit.xmin).sum()),
            "vs_exponential": {"R": float(r_exp), "p": float(p_exp)},
            "vs_lognormal": {"R": float(r_log), "p": float(p_log)}}


def degree_summary(deg: np.ndarray) -> dict:
    """Counts per degree value (for CCDF plots), moments, and the power-law fit."""
    values, counts = np.unique(deg, return_counts=True)
    return {"mean": float(deg.mean()), "max": int(deg.max()) if len(deg) else 0,
            "zero_fraction": float((deg == 0).mean()), "gini": gini(deg),
            "values": values.tolist(), "counts": counts.tolist(), "fit": fit_degree_power_law(deg)}


def gini(values: np.ndarray) -> float:
    """Gini coefficient: 0 when every neuron has the same degree, near 1 when a few hold all edges."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    if v.sum() == 0:
        return 0.0
    n = len(v)
    return float((2 * np.arange(1, n + 1) - n - 1).dot(v) / (n * v.sum()))


# the whole analysis ---------------------------------------------------------------------------
def auto_betas(top_values: torch.Tensor, n: int, n_betas: int, max_edges: int) -> list[float]:
    """Betas keeping geometrically spaced edge counts from n to max_edges (directed, off-diagonal)."""
    available = int(torch.isfinite(top_values).sum())
    hi = min(max_edges, available)
    lo = max(1, min(n, hi))
    counts = sorted({int(round(c)) for c in np.geomspace(lo, hi, n_betas)})
    return sorted({float(top_values[c - 1]) for c in counts}, reverse=True)


def analyse_neuron_graph(model: nn.Module, betas: Sequence[float] | None = None, n_betas: int = 7,
                         max_edges: int = 100_000, seeds: int = 5, degree_edges: int | None = None,
                         baseline_seed: int = 0) -> dict:
    """The whole neuron-graph analysis as plain types: sweep, baselines, degrees, head blocks.

    degree_edges: directed edges of the graph whose degrees are fitted (default 8 n, mean degree 8);
    its threshold beta_ref also defines the tails of the head-block statistics.
    """
    from scipy.stats import norm

    betas_auto = betas is None
    E, Dx, N = graph_factors(model)
    n = E.shape[0]
    nh = n // N
    degree_edges = min(degree_edges or 8 * n, n * (n - 1))
    k = max(max_edges, degree_edges)
    scan = scan_graph(E, Dx, N, k)
    top_v, top_i = scan["top_values"], scan["top_index"]
    betas = auto_betas(top_v, n, n_betas, max_edges) if betas is None else sorted((float(b) for b in betas), reverse=True)
    beta_ref = float(top_v[min(degree_edges, len(top_v)) - 1])
    # above the k-th largest entry the top-k list holds every entry, so it counts them exactly
    kth = float(top_v[-1]) if len(top_v) == k else -float("inf")
    outside = [b for b in betas if b <= kth]
    tails = tail_scan(E, Dx, N, outside, beta_ref, scan["min"], scan["max"])
    scanned = dict(zip(outside, tails["counts"]))
    counts = [scanned[b] if b in scanned else int((top_v >= b).sum()) for b in betas]
    mean, std = scan["mean"], scan["std"]
    pairs = n * (n - 1)

    sweep = []
    low_v = low_i = None
    for beta, directed in zip(betas, counts):
        directed = int(directed)
        row = {"beta": beta, "beta_over_std": (beta - mean) / std if std > 0 else None,
               "edges_directed": directed,
               "gaussian_expected_edges": float(pairs * norm.sf((beta - mean) / std)) if std > 0 else None}
        if directed > max_edges or directed > len(top_v):
            row.update(edges=None, modularity=None, communities=None, baselines=None,
                       skipped=f"{directed} directed edges > max_edges {max_edges}")
            sweep.append(row)
            continue
        src, dst = edges_from_top(top_v, top_i, n, directed)
        g = undirected(n, src, dst)
        q, comms = louvain_modularity(g, seeds)
        row.update(edges=g.ecount(), modularity=q, communities=comms)
        gnm = gnm_graph(n, g.ecount(), baseline_seed)
        if low_v is None:
            # twice the directed entries, so that m distinct undirected pairs are always among them
            low_v, low_i = lowrank_top(n, E.shape[1], min(2 * max_edges, pairs), N, baseline_seed)
        low = undirected(n, *first_undirected(low_i, n, g.ecount()))
        row["baselines"] = {
            "gnm": dict(zip(("modularity", "communities"), louvain_modularity(gnm, seeds)), edges=gnm.ecount()),
            "lowrank": dict(zip(("modularity", "communities"), louvain_modularity(low, seeds)), edges=low.ecount()),
        }
        sweep.append(row)

    src, dst = edges_from_top(top_v, top_i, n, degree_edges)
    out_deg, in_deg = degrees(n, src, dst)
    b_mean, b_std, b_skew = _block_stats(*scan["block_moments"])
    pos, neg = tails["pos"], tails["neg"]
    blocks = [[{"mean": float(b_mean[h, g]), "std": float(b_std[h, g]), "skew": float(b_skew[h, g]),
                "pos_tail": int(pos[h, g]), "neg_tail": int(neg[h, g])} for g in range(nh)] for h in range(nh)]
    heads = []
    s1, s2, s3, cnt = (m.sum(dim=1, keepdim=True) for m in scan["block_moments"])
    h_mean, h_std, h_skew = _block_stats(s1, s2, s3, cnt)
    for h in range(nh):
        p, q = int(pos[h].sum()), int(neg[h].sum())
        share = p / (p + q) if p + q else None
        heads.append({"head": h, "mean": float(h_mean[h, 0]), "std": float(h_std[h, 0]), "skew": float(h_skew[h, 0]),
                      "pos_tail": p, "neg_tail": q, "pos_share": share,
                      "inhibitory": bool(share is not None and share < INHIBITORY_SHARE),
                      "histogram": tails["hist"][h].tolist()})
    return {
        "n": n, "N": N, "n_head": nh, "D": int(E.shape[1]),
        "stats": {"mean": mean, "std": std, "min": scan["min"], "max": scan["max"]},
        "max_edges": max_edges, "seeds": seeds, "betas_auto": betas_auto,
        "sweep": sweep,
        "degrees": {"beta": beta_ref, "edges_directed": int(len(src)),
                    "out": degree_summary(out_deg), "in": degree_summary(in_deg)},
        "head_blocks": {"beta_ref": beta_ref, "inhibitory_share": INHIBITORY_SHARE, "blocks": blocks,
                        "heads": heads, "histogram_edges": tails["hist_edges"]},
    }
