"""Concept synapses (monosemanticity): which synapses tell concept sentences from control ones.

Each sentence is read from an empty state and gives its own synapse state sigma(s) (bdh.interp.
synapses, same layer pairing and decay). A synapse is "about" the concept when its value is
larger after concept sentences than after control sentences, tested per synapse by a one-sided
Mann-Whitney U (scipy), with the rank-biserial correlation r = 2U / (n1 n0) - 1 as effect size
(1: every concept sentence beats every control sentence; 0: no difference).

Testing all nh N^2 synapses of every layer exactly would need every per-sentence value of every
synapse, so the search has two stages: (1) one pass per group keeps the mean and variance of every
synapse over sentences, and the `candidates` synapses with the largest Welch t-score (concept
minus control) are kept; (2) a second pass collects those candidates' per-sentence values and
runs the exact test on them. When the model has no more synapses than `candidates`, stage 1
keeps them all. p_bonferroni multiplies p by the number of synapses searched (all of them, not
only the candidates), so it also pays for the pre-selection.

By default a sentence's value is sigma divided by its length in tokens (normalize="mean"), so a
longer sentence does not win by length alone; normalize="sum" gives the paper's raw sigma.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from bdh.errors import UserError
from bdh.interp.capture import batch_activations, unwrap
from bdh.interp.synapses import MAX_SYNAPSE_ENTRIES, check_size, model_decay, synapse_dict, synapse_layers
from bdh.interp.tokens import token_words

CONTRAST_DIR = Path(__file__).parent / "contrast"
NORMALIZE = ("mean", "sum")


# the shipped contrast sets --------------------------------------------------------------------
def read_sentences(path: str | Path) -> list[str]:
    """One sentence per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"no such sentence file: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read sentence file {path}: {err}") from None
    sentences = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if len(sentences) < 2:
        raise UserError(f"{path} holds {len(sentences)} sentence(s); a contrast set needs at least 2 (one per line)")
    return sentences


def contrast_sets() -> list[str]:
    """Names of the contrast sets shipped with the package (e.g. "money_en", "weather_es")."""
    return sorted(p.stem for p in CONTRAST_DIR.glob("*.txt"))


def contrast_set(name: str) -> list[str]:
    """The sentences of a shipped contrast set."""
    if name not in contrast_sets():
        raise UserError(f"unknown contrast set {name!r}; shipped: {', '.join(contrast_sets())}")
    return read_sentences(CONTRAST_DIR / f"{name}.txt")


# statistics -----------------------------------------------------------------------------------
def mann_whitney(concept: np.ndarray, control: np.ndarray) -> dict[str, np.ndarray]:
    """One-sided (concept > control) Mann-Whitney U per column: concept (n1, K), control (n0, K).

    Returns U (for the concept group), p, and rank_biserial = 2U / (n1 n0) - 1, each (K,).
    """
    from scipy.stats import mannwhitneyu

    concept, control = np.asarray(concept, dtype=np.float64), np.asarray(control, dtype=np.float64)
    n1, n0 = concept.shape[0], control.shape[0]
    if concept.shape[1] == 0:
        empty = np.zeros(0)
        return {"U": empty, "p": empty, "rank_biserial": empty}
    res = mannwhitneyu(concept, control, alternative="greater", axis=0)
    U, p = np.atleast_1d(res.statistic), np.atleast_1d(res.pvalue)
    # columns that are constant in both groups give nan: no evidence either way
    U = np.where(np.isnan(U), n1 * n0 / 2, U)
    p = np.where(np.isnan(p), 1.0, p)
    return {"U": U, "p": p, "rank_biserial": 2 * U / (n1 * n0) - 1}


# per-sentence synapse values ------------------------------------------------------------------
def _token_weights(lengths: Sequence[int], T: int, decay: torch.Tensor | None, nh: int, normalize: str) -> torch.Tensor:
    """(B, nh, T) weight of each token in its sentence's sigma: 0 on padding, 1/T_s for "mean",
    times lambda_h^(T_s - 1 - tau) with decay."""
    w = torch.zeros(len(lengths), nh, T)
    for b, n in enumerate(lengths):
        steps = torch.arange(n - 1, -1, -1, dtype=torch.float64)
        row = torch.ones(nh, n, dtype=torch.float64) if decay is None else torch.exp(torch.log(decay.double())[:, None] * steps)
        w[b, :, :n] = (row / (n if normalize == "mean" else 1)).float()
    return w


def _encode_all(tokenizer, sentences: Sequence[str], max_len: int) -> list[list[int]]:
    seqs = [list(tokenizer.encode(s))[:max_len] for s in sentences]
    if any(len(s) == 0 for s in seqs):
        raise UserError("a contrast sentence encodes to no tokens; remove empty lines")
    return seqs


def sigma_moments(model: nn.Module, seqs: Sequence[Sequence[int]], layers: Sequence[int], normalize: str = "mean",
                  batch_size: int = 8) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Mean and (population) variance over sentences of every synapse: layer -> ((nh,N,N), (nh,N,N))."""
    model = unwrap(model)
    c = model.config
    nh, N = c.n_head, c.neurons_per_head
    decay = model_decay(model)
    sums = {l: torch.zeros(nh, N, N) for l in layers}
    squares = {l: torch.zeros(nh, N, N) for l in layers}
    buf = torch.empty(nh, N, N)
    needed = sorted({l - 1 for l in layers} | set(layers))
    by_length = sorted(seqs, key=len)  # less padding; the order of the sum does not matter
    for _, lengths, acts in batch_activations(model, by_length, ("x", "y"), needed, batch_size):
        w = _token_weights(lengths, max(lengths), decay, nh, normalize)  # B, nh, T
        for l in layers:
            y = acts[("y", l - 1)] * w[..., None]  # B, nh, T, N
            x = acts[("x", l)]
            for b in range(len(lengths)):
                torch.bmm(y[b].transpose(1, 2), x[b], out=buf)  # nh, N, N
                sums[l] += buf
                squares[l].addcmul_(buf, buf)
    n = len(seqs)
    for l in layers:
        sums[l] /= n
        squares[l] = (squares[l] / n - sums[l] ** 2).clamp_(min=0)
    return {l: (sums[l], squares[l]) for l in layers}


def synapse_values(model: nn.Module, seqs: Sequence[Sequence[int]], synapses: Sequence[Sequence[int]],
                   normalize: str = "mean", batch_size: int = 8, per_token: bool = False):
    """Value of each synapse (layer, head, i, j) after reading each sequence: (n_seqs, K).

    With per_token, also a list (per sequence) of (K, T_s) per-token contributions.
    """
    model = unwrap(model)
    c = model.config
    decay = model_decay(model)
    syn = np.asarray(synapses, dtype=np.int64).reshape(-1, 4)
    by_layer = {int(l): np.nonzero(syn[:, 0] == l)[0] for l in np.unique(syn[:, 0])}
    values = np.zeros((len(seqs), len(syn)))
    tokens: list[np.ndarray] = [np.zeros(0)] * len(seqs)
    needed = sorted({l - 1 for l in by_layer} | set(by_layer))
    # batches of similar lengths waste less on padding; rows go back to their places below
    order = sorted(range(len(seqs)), key=lambda s: len(seqs[s]))
    for first, lengths, acts in batch_activations(model, [seqs[s] for s in order], ("x", "y"), needed, batch_size):
        rows_out = order[first:first + len(lengths)]
        w = _token_weights(lengths, max(lengths), decay, c.n_head, normalize)  # B, nh, T
        contrib = torch.zeros(len(syn), len(lengths), max(lengths))  # K, B, T
        for l, rows in by_layer.items():
            h, i, j = (torch.as_tensor(syn[rows, k]) for k in (1, 2, 3))
            y = acts[("y", l - 1)] * w[..., None]  # B, nh, T, N
            contrib[torch.as_tensor(rows)] = y[:, h, :, i] * acts[("x", l)][:, h, :, j]  # K_l, B, T
        values[rows_out] = contrib.sum(dim=2).T.double().numpy()
        if per_token:
            for b, (row, n) in enumerate(zip(rows_out, lengths)):
                tokens[row] = contrib[:, b, :n].double().numpy()
    return (values, tokens) if per_token else values


def _candidates(moments1, moments0, n1: int, n0: int, k: int) -> np.ndarray:
    """The k synapses (layer, head, i, j) with the largest positive Welch t-score."""
    scored = []
    for l in moments1:
        (m1, v1), (m0, v0) = moments1[l], moments0[l]
        diff = m1 - m0
        scale = float(torch.maximum(m1.abs().max(), m0.abs().max())) * 1e-6 + 1e-30
        t = diff / torch.sqrt(v1 / n1 + v0 / n0 + scale ** 2)
        t = torch.where(diff > 0, t, torch.full_like(t, -float("inf")))
        top_t, flat = torch.topk(t.reshape(-1), min(k, t.numel()))
        N = t.shape[-1]
        for score, f in zip(top_t.tolist(), flat.tolist()):
            if score > -float("inf"):
                h, rest = divmod(f, N * N)
                scored.append((score, l, h, rest // N, rest % N))
    scored.sort(key=lambda s: -s[0])
    return np.asarray([s[1:] for s in scored[:k]], dtype=np.int64).reshape(-1, 4)


def concept_synapses(model: nn.Module, tokenizer, concept: Sequence[str], control: Sequence[str],
                     layers: Sequence[int] | None = None, top_k: int = 20, candidates: int = 4096,
                     normalize: str = "mean", batch_size: int = 8, max_len: int = 256,
                     max_entries: int = MAX_SYNAPSE_ENTRIES, drivers: int = 5) -> dict:
    """Rank synapses by how much more they grow on concept sentences than on control ones.

    Returns plain types: {"n_concept", "n_control", "normalize", "n_synapses", "n_candidates",
    "top": [synapse dict + U, U_max, p, p_bonferroni, rank_biserial, mean_concept, mean_control,
    t_score, values_concept, values_control, drivers (words whose tokens grew the synapse most
    over the concept sentences, with their share of the growth), example (best single context)]}.
    """
    if normalize not in NORMALIZE:
        raise UserError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    model = unwrap(model)
    c = model.config
    syn_layers = synapse_layers(c.n_layer, layers)
    check_size(len(syn_layers), c.n_head, c.neurons_per_head, max_entries, arrays=4)
    seqs1, seqs0 = _encode_all(tokenizer, concept, max_len), _encode_all(tokenizer, control, max_len)
    n1, n0 = len(seqs1), len(seqs0)
    if n1 < 2 or n0 < 2:
        raise UserError("the concept and control sets need at least 2 sentences each")
    mom1 = sigma_moments(model, seqs1, syn_layers, normalize, batch_size)
    mom0 = sigma_moments(model, seqs0, syn_layers, normalize, batch_size)
    n_synapses = len(syn_layers) * c.n_head * c.neurons_per_head ** 2
    cand = _candidates(mom1, mom0, n1, n0, candidates)
    del mom1, mom0
    vals1 = synapse_values(model, seqs1, cand, normalize, batch_size)
    vals0 = synapse_values(model, seqs0, cand, normalize, batch_size)
    stats = mann_whitney(vals1, vals0)
    t_score = (vals1.mean(0) - vals0.mean(0)) / np.sqrt(vals1.var(0) / n1 + vals0.var(0) / n0 + 1e-30)
    order = np.lexsort((-t_score, -stats["rank_biserial"], stats["p"]))[:top_k]
    top = []
    for k in order:
        l, h, i, j = (int(v) for v in cand[k])
        top.append(synapse_dict(
            l, h, i, j, c.neurons_per_head,
            U=float(stats["U"][k]), U_max=n1 * n0, p=float(stats["p"][k]),
            p_bonferroni=float(min(1.0, stats["p"][k] * n_synapses)),
            rank_biserial=float(stats["rank_biserial"][k]), t_score=float(t_score[k]),
            mean_concept=float(vals1[:, k].mean()), mean_control=float(vals0[:, k].mean()),
            values_concept=vals1[:, k].tolist(), values_control=vals0[:, k].tolist()))
    if top and drivers:
        _add_drivers(model, tokenizer, seqs1, top, normalize, batch_size, drivers)
    return {"n_concept": n1, "n_control": n0, "normalize": normalize, "layers": syn_layers,
            "n_synapses": n_synapses, "n_candidates": int(len(cand)), "top": top}


def _add_drivers(model, tokenizer, seqs, top: list[dict], normalize: str, batch_size: int, keep: int) -> None:
    """For each top synapse, the words whose tokens made it grow over the concept sentences."""
    synapses = [(d["layer"], d["head"], d["i"], d["j"]) for d in top]
    _, per_token = synapse_values(model, seqs, synapses, normalize, batch_size, per_token=True)
    words = [token_words(tokenizer, s) for s in seqs]
    for k, d in enumerate(top):
        by_word: dict[str, float] = defaultdict(float)
        count: dict[str, int] = defaultdict(int)
        best = (0.0, 0, 0)
        for s, contrib in enumerate(per_token):
            row = contrib[k]
            for t in np.nonzero(row > 0)[0]:
                word = words[s][0][t].lower()
                by_word[word] += float(row[t])
                count[word] += 1
                if row[t] > best[0]:
                    best = (float(row[t]), s, int(t))
        total = sum(by_word.values()) or 1.0
        ranked = sorted(by_word.items(), key=lambda kv: -kv[1])[:keep]
        d["drivers"] = [{"word": w, "share": v / total, "count": count[w]} for w, v in ranked]
        if best[0] > 0:
            _, s, t = best
            d["example"] = _context(tokenizer, seqs[s], t)


def _context(tokenizer, seq: Sequence[int], t: int) -> str:
    from bdh.interp.tokens import describe_token

    return describe_token(tokenizer, seq, t, width=40)["context"]


def evaluate_synapses(model: nn.Module, tokenizer, synapses: Sequence[Sequence[int]], concept: Sequence[str],
                      control: Sequence[str], normalize: str = "mean", batch_size: int = 8,
                      max_len: int = 256) -> list[dict]:
    """The same test for given synapses on other sentences (e.g. another language): U, p, r each."""
    seqs1, seqs0 = _encode_all(tokenizer, concept, max_len), _encode_all(tokenizer, control, max_len)
    vals1 = synapse_values(model, seqs1, synapses, normalize, batch_size)
    vals0 = synapse_values(model, seqs0, synapses, normalize, batch_size)
    stats = mann_whitney(vals1, vals0)
    return [{"U": float(stats["U"][k]), "U_max": len(seqs1) * len(seqs0), "p": float(stats["p"][k]),
             "rank_biserial": float(stats["rank_biserial"][k]),
             "mean_concept": float(vals1[:, k].mean()), "mean_control": float(vals0[:, k].mean())}
            for k in range(len(synapses))]
