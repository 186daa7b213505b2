"""Figures of the inspection report, one function each, drawn from the report's plain-type sections.

Matplotlib is used through Figure + the Agg canvas directly, so no global backend is switched.
Every function writes one PNG and returns its caption (None when there was nothing to draw).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DPI = 110


def _figure(width: float = 7.5, height: float = 4.2, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _save(fig, path: Path) -> None:
    fig.savefig(path)


def plot_sparsity(sparsity: dict, path: Path) -> str:
    """Bars: % non-zero x and y per layer; dots: each head."""
    fig, ax = _figure()
    L = len(sparsity["x_nonzero_layer"])
    pos = np.arange(L)
    for k, (site, colour) in enumerate((("x", "tab:blue"), ("y", "tab:orange"))):
        layer = 100 * np.asarray(sparsity[f"{site}_nonzero_layer"])
        ax.bar(pos + (k - 0.5) * 0.38, layer, width=0.36, color=colour, alpha=0.75, label=f"{site} (head mean)")
        heads = 100 * np.asarray(sparsity[f"{site}_nonzero"])  # L, nh
        for h in range(heads.shape[1]):
            ax.plot(pos + (k - 0.5) * 0.38, heads[:, h], "o", color="black", ms=3, alpha=0.6,
                    label="single heads" if (k == 0 and h == 0) else None)
    ax.set_xticks(pos, [f"layer {l}" for l in range(L)])
    ax.set_ylabel("non-zero activations (% of neurons x tokens)")
    ax.set_title("Sparsity of x and y per layer")
    ax.legend(frameon=False)
    _save(fig, path)
    return ("Share of neurons with x > 0 and y > 0, averaged over every token of the text; bars are "
            "head means, dots single heads. The paper reports y about 2.5-7.5% non-zero in trained models.")


def plot_sparsity_history(history: dict, path: Path) -> str | None:
    """% non-zero x and y (sparsity_probe, logged in metrics.jsonl) against the training step."""
    if not history or not history.get("step"):
        return None
    fig, ax = _figure(height=3.6)
    steps = np.asarray(history["step"], dtype=float)
    for site, colour in (("x", "tab:blue"), ("y", "tab:orange")):
        values = np.asarray([np.nan if v is None else 100 * v for v in history[f"{site}_nonzero"]], dtype=float)
        ax.plot(steps, values, "-", color=colour, label=f"{site} non-zero")
    ax.set_xlabel("training step")
    ax.set_ylabel("non-zero activations (% of neurons)")
    ax.set_title("Sparsity during training")
    ax.legend(frameon=False)
    _save(fig, path)
    return ("Share of non-zero x and y on training batches (mean over layers and heads), as logged in "
            "metrics.jsonl by sparsity_probe during training.")


def plot_density_over_text(sparsity: dict, path: Path, window: int = 32) -> str | None:
    """y density token by token (moving average), one line per layer."""
    rows = sparsity.get("y_nonzero_by_token")
    if not rows or not rows[0]:
        return None
    fig, ax = _figure(height=3.6)
    for layer, row in enumerate(rows):
        row = 100 * np.asarray(row)
        w = max(1, min(window, len(row)))
        smooth = np.convolve(row, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(len(smooth)) + w - 1, smooth, lw=1, label=f"layer {layer}")
    ax.set_xlabel("token position in the text")
    ax.set_ylabel(f"y non-zero (% of n, {window}-token mean)")
    ax.set_title("Density of y while reading the text")
    ax.legend(frameon=False, ncols=min(4, len(rows)))
    _save(fig, path)
    return (f"Share of all neurons with y > 0 at each token ({window}-token moving average). The paper finds "
            "y denser on new material than on material the model has already seen in the text.")


def plot_degrees(degrees: dict, path: Path, title: str, what: str) -> str | None:
    """Empirical CCDF of in- and out-degree on log-log axes, with the fitted power-law tails."""
    fig, ax = _figure()
    drawn = False
    for key, colour in (("out", "tab:red"), ("in", "tab:blue")):
        d = degrees[key]
        values, counts = np.asarray(d["values"], dtype=float), np.asarray(d["counts"], dtype=float)
        keep = values > 0
        values, counts = values[keep], counts[keep]
        if not len(values):
            continue
        ccdf = counts[::-1].cumsum()[::-1] / counts.sum()  # P(degree >= value) among degree > 0
        ax.loglog(values, ccdf, "o", ms=3, color=colour, alpha=0.7, label=f"{key}-degree")
        fit = d.get("fit", {})
        if fit.get("ok"):
            xmin, alpha = fit["xmin"], fit["alpha"]
            at = ccdf[np.searchsorted(values, xmin)] if xmin <= values[-1] else ccdf[-1]
            xs = np.geomspace(xmin, values.max(), 50)
            ax.loglog(xs, at * (xs / xmin) ** (1 - alpha), "--", color=colour,
                      label=f"power law, alpha={alpha:.2f} (x >= {xmin:g})")
        drawn = True
    if not drawn:
        return None
    ax.set_xlabel("degree (edges per neuron)")
    ax.set_ylabel("P(degree >= k)")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8)
    _save(fig, path)
    return (f"Complementary cumulative distribution of {what} on log-log axes (neurons with degree 0 "
            "left out). Dashed: the power law fitted by the powerlaw package above its x_min; a straight "
            "tail means a power law, a tail that bends down means an exponential or lognormal fits better.")


def plot_modularity(sweep: list[dict], path: Path) -> str | None:
    """Modularity of the thresholded neuron graph against beta, beside the two random baselines."""
    rows = [r for r in sweep if r.get("modularity") is not None]
    if not rows:
        return None
    fig, ax = _figure()
    beta = [r["beta"] for r in rows]
    ax.plot(beta, [r["modularity"] for r in rows], "o-", color="black", label="G = E D_x")
    for key, label, colour in (("gnm", "G(n, m), same edge count", "tab:gray"),
                               ("lowrank", "random low-rank P1 P2^T, same edge count", "tab:green")):
        ax.plot(beta, [r["baselines"][key]["modularity"] for r in rows], "s--", color=colour, label=label)
    for r in rows:
        ax.annotate(f"{r['edges']:,}", (r["beta"], r["modularity"]), textcoords="offset points",
                    xytext=(0, 6), fontsize=7, ha="center")
    ax.set_xlabel("threshold beta (keep entries of G >= beta)")
    ax.set_ylabel("Newman modularity (best of Louvain runs)")
    ax.set_title("Community structure of the neuron graph against beta")
    ax.legend(frameon=False, fontsize=8)
    _save(fig, path)
    return ("Modularity of the undirected graph of entries G_ij >= beta (numbers: undirected edges), beside "
            "random graphs with the same edge count. The paper finds trained models well above both baselines.")


def plot_edges(sweep: list[dict], path: Path) -> str | None:
    """Edges kept against beta, and what a Gaussian G with the same mean and std would keep."""
    rows = [r for r in sweep if r.get("gaussian_expected_edges") is not None]
    if not rows:
        return None
    fig, ax = _figure(height=3.6)
    beta = [r["beta"] for r in rows]
    ax.semilogy(beta, [max(r["edges_directed"], 0.5) for r in rows], "o-", color="black", label="G = E D_x")
    ax.semilogy(beta, [max(r["gaussian_expected_edges"], 0.5) for r in rows], "--", color="tab:purple",
                label="Gaussian entries, same mean and std")
    ax.set_xlabel("threshold beta")
    ax.set_ylabel("directed edges with G_ij >= beta")
    ax.set_title("Edges of the neuron graph against beta")
    ax.legend(frameon=False, fontsize=8)
    _save(fig, path)
    return ("Directed edges kept at each beta, and the count expected if the entries of G were Gaussian noise. "
            "Where the curves part, the graph holds more strong connections than noise would.")


def plot_head_blocks(head_blocks: dict, path: Path) -> str:
    """Left: histogram of G entries per source head (log counts); right: positive share of strong entries per block."""
    fig, (left, right) = _figure(width=10, height=4.0, ncols=2)
    edges = np.asarray(head_blocks["histogram_edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    for head in head_blocks["heads"]:
        mark = " (inhibitory?)" if head["inhibitory"] else ""
        left.semilogy(centres, np.maximum(np.asarray(head["histogram"]), 0.5), lw=1, label=f"head {head['head']}{mark}")
    beta = head_blocks["beta_ref"]
    for x in (beta, -beta):
        left.axvline(x, color="gray", ls=":", lw=1)
    left.set_xlabel("entry G_ij (source neuron i in this head)")
    left.set_ylabel("count")
    left.set_title("Entries of G by source head")
    left.legend(frameon=False, fontsize=8)
    nh = len(head_blocks["heads"])
    share = np.full((nh, nh), np.nan)
    for h, row in enumerate(head_blocks["blocks"]):
        for g, block in enumerate(row):
            tail = block["pos_tail"] + block["neg_tail"]
            share[h, g] = block["pos_tail"] / tail if tail else np.nan
    im = right.imshow(share, vmin=0, vmax=1, cmap="coolwarm")
    right.set_xticks(range(nh))
    right.set_yticks(range(nh))
    right.set_xlabel("target head h'")
    right.set_ylabel("source head h")
    right.set_title(f"Positive share of |G| >= {beta:.3g}")
    fig.colorbar(im, ax=right, label="positive / (positive + negative)")
    _save(fig, path)
    return ("Left: distribution of the entries of G whose source neuron lies in each head (dotted: +-beta_ref, "
            "the threshold of the degree analysis). Right: for each head block, the share of strong entries that "
            "are positive; a head whose row is blue has (almost) no positive tail and looks inhibitory.")


def plot_traces(traces: list[dict], path: Path) -> str | None:
    """sigma_t(i, j) token by token for the traced synapses."""
    if not traces:
        return None
    fig, ax = _figure(height=4.0)
    for tr in traces:
        s = tr["synapse"]
        values = np.asarray(tr["values"])
        peak = values.max() if len(values) and values.max() > 0 else 1.0
        ax.plot(values / peak, lw=1, label=f"{tr['why']}: L{s['layer']} h{s['head']} {s['i']}->{s['j']} (max {peak:.3g})")
    ax.set_xlabel("token position in the text")
    ax.set_ylabel("sigma_t(i, j) / its largest value")
    ax.set_title("Synapse traces while reading the text")
    ax.legend(frameon=False, fontsize=7)
    _save(fig, path)
    return ("How the chosen synapses grow token by token (each scaled by its own largest value, given in the "
            "legend). A step is a token where the pre-synaptic y_i and the post-synaptic x_j fired together.")


def plot_concepts(concepts: dict, path: Path, show: int = 6) -> str | None:
    """Per-sentence values of the top concept synapses, concept against control."""
    top = concepts.get("top", [])[:show]
    if not top:
        return None
    cols = min(3, len(top))
    rows = (len(top) + cols - 1) // cols
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.4 * cols, 2.9 * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
    rng = np.random.default_rng(0)
    for ax, d in zip(axes, top):
        for k, (key, colour) in enumerate((("values_concept", "tab:red"), ("values_control", "tab:blue"))):
            v = np.asarray(d[key])
            ax.plot(k + rng.uniform(-0.15, 0.15, len(v)), v, "o", ms=3, alpha=0.6, color=colour)
            ax.plot([k - 0.25, k + 0.25], [np.median(v)] * 2, color="black")
        ax.set_xticks([0, 1], [concepts.get("concept_name", "concept"), concepts.get("control_name", "control")])
        words = ", ".join(w["word"] for w in d.get("drivers", [])[:2])
        ax.set_title(f"L{d['layer']} h{d['head']} {d['i']}->{d['j']}  r={d['rank_biserial']:.2f}\n"
                     f"p={d['p']:.1e}  driven by: {words}", fontsize=8)
        ax.set_ylabel("sigma after the sentence" + (" / tokens" if concepts.get("normalize") == "mean" else ""),
                      fontsize=8)
    for ax in axes[len(top):]:
        ax.set_visible(False)
    fig.suptitle("Top concept synapses: one dot per sentence")
    fig.savefig(path)
    return ("Each panel is one synapse; dots are its value after each concept (left) and control (right) "
            "sentence, bars the medians. r is the rank-biserial correlation of the one-sided Mann-Whitney test "
            "(1 = every concept sentence above every control sentence).")
