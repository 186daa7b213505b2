"""report.html: one self-contained page (inline CSS, no scripts) showing the report's figures and tables.

Figures are referenced by file name, so the page works where report.json and the PNGs lie.
Each section opens with a short paragraph saying what was measured and how to read it.
"""

from __future__ import annotations

from html import escape

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1050px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
p.lead { color: #333; } p.caption { color: #555; font-size: .9em; margin-top: .2em; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: .85em; margin: .8em 0; }
td, th { border: 1px solid #ddd; padding: .25em .5em; text-align: right; vertical-align: top; }
th { background: #f4f4f4; } td.l { text-align: left; } code { background: #f4f4f4; padding: 0 .2em; }
"""


def fmt(value, digits: int = 3) -> str:
    """Numbers for tables: integers with separators, floats with `digits` significant digits."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if 1e3 <= abs(value) < 1e7 and value == int(value):
            return f"{int(value):,}"
        if abs(value) >= 1e5 or abs(value) < 1e-3:
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return escape(str(value))


def table(header: list[str], rows: list[list], left: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class='l'>{c}</td>" if k in left else f"<td>{c}</td>"
                                    for k, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def figure(report: dict, name: str) -> str:
    fig = report.get("figures", {}).get(name)
    if not fig:
        return ""
    return (f"<figure><img src='{escape(fig['file'])}' alt='{escape(name)}'>"
            f"<p class='caption'>{escape(fig['caption'])}</p></figure>")


def syn_name(d: dict) -> str:
    return f"L{d['layer']} h{d['head']} {d['i']}&rarr;{d['j']}"


def section_header(report: dict) -> str:
    m, t = report["model"], report["text"]
    timing = ", ".join(f"{escape(k)} {v:.1f} s" for k, v in report.get("timing_s", {}).items())
    return (f"<h1>BDH inspection report</h1><p class='lead'>Model: {m['n_layer']} layers, {m['n_head']} heads, "
            f"D = {m['n_embd']}, N = {m['neurons_per_head']} neurons per head (n = {m['n_neurons']:,}), "
            f"{m['num_params']:,} parameters, layout {escape(str(m['layout']))}"
            f"{', checkpoint ' + escape(str(m['checkpoint'])) if m.get('checkpoint') else ''}. "
            f"Text: {escape(str(t['path']))}, {t['n_tokens']:,} tokens"
            f"{' (truncated)' if t['truncated'] else ''}, read in chunks of {t['chunk_len']} with the state carried. "
            f"Every number shown here is in <code>report.json</code>. Time: {timing}.</p>")


def section_sparsity(report: dict) -> str:
    s = report["sparsity"]
    rows = [[f"layer {l}", fmt(100 * x, 3) + " %", fmt(100 * y, 3) + " %"]
            for l, (x, y) in enumerate(zip(s["x_nonzero_layer"], s["y_nonzero_layer"]))]
    return ("<h2>1. Sparsity</h2><p class='lead'>BDH's neurons are positive (ReLU) and mostly silent. For every "
            "layer, the share of (token, neuron) pairs with x &gt; 0 (the neuron's input from the residual stream) "
            "and y &gt; 0 (its output after the attention gate; y can only fire where x does).</p>"
            + figure(report, "sparsity") + table(["layer", "x non-zero", "y non-zero"], rows, {0})
            + figure(report, "density") + figure(report, "training"))


def section_synapses(report: dict) -> str:
    s = report["synapses"]
    rows = [[f"{d['layer']}", escape(d["pairs"]), fmt(d["entries"]), fmt(100 * d["nonzero_fraction"]) + " %",
             fmt(d["max"]), fmt(d["mean_per_token"])] for d in s["summary"]]
    top = [[syn_name(d), fmt(d["pre"]), fmt(d["post"]), fmt(d["value"])] for d in s["top"][:10]]
    traces = [[syn_name(t["synapse"]), escape(t["why"]), fmt(t["final"]),
               "<br>".join(f"{escape(d['context'])} <small>(+{fmt(d['increment'])})</small>" for d in t["driving_tokens"][:3])]
              for t in s.get("traces", [])]
    deg = s["degrees"]
    return ("<h2>2. Synapses (the state, Eq. 16)</h2><p class='lead'>While reading, BDH strengthens the synapse "
            "between neuron i and neuron j whenever i's output y (in one layer) and j's input x (in the next) "
            f"fire on the same token. Definition used: {escape(s['definition'])}. The full matrices are in "
            f"<code>{escape(str(s.get('file', '(not saved)')))}</code> (dense when small, else the strongest "
            "entries).</p>"
            + table(["synapse layer", "pairs", "entries", "non-zero", "max", "mean per token"], rows, {1})
            + "<h3>Strongest synapses after the text</h3>"
            + table(["synapse", "pre neuron", "post neuron", "sigma"], top, {0})
            + "<h3>Traces</h3>" + figure(report, "traces")
            + table(["synapse", "chosen as", "final sigma", "tokens that grew it most [token]"], traces, {0, 1, 3})
            + f"<h3>Degrees of the synapse graph</h3><p>The {deg['edges']:,} strongest synapses of layer "
              f"{deg['layer']} (sigma &ge; {fmt(deg['threshold'])}) as a directed graph over all neurons.</p>"
            + figure(report, "synapse_degrees") + fit_table(deg))


def fit_table(deg: dict) -> str:
    rows = []
    for key in ("out", "in"):
        d, f = deg[key], deg[key]["fit"]
        if f.get("ok"):
            rows.append([f"{key}-degree", fmt(d["mean"]), fmt(d["max"]), fmt(d["gini"]), fmt(f["alpha"]),
                         fmt(f["xmin"]), fmt(f["n_tail"]), f"{fmt(f['vs_exponential']['R'])} (p {fmt(f['vs_exponential']['p'])})",
                         f"{fmt(f['vs_lognormal']['R'])} (p {fmt(f['vs_lognormal']['p'])})"])
        else:
            rows.append([f"{key}-degree", fmt(d["mean"]), fmt(d["max"]), fmt(d["gini"]),
                         escape(f.get("reason", "no fit")), "", "", "", ""])
    return (table(["", "mean", "max", "Gini", "alpha", "x_min", "tail size", "R vs exponential", "R vs lognormal"],
                  rows, {0})
            + "<p class='caption'>R: normalised log-likelihood ratio of the power law against the alternative "
              "(R &gt; 0 favours the power law), p: its significance (powerlaw package, discrete fit).</p>")


def section_concepts(report: dict) -> str:
    c = report.get("concepts")
    if not c:
        return "<h2>3. Concept synapses</h2><p>Skipped.</p>"
    tr = c.get("transfer")
    rows = []
    for d in c["top"][:15]:
        drivers = ", ".join(f"{escape(w['word'])} ({100 * w['share']:.0f}%)" for w in d.get("drivers", [])[:3])
        row = [syn_name(d), f"{fmt(d['U'])} / {fmt(d['U_max'])}", fmt(d["p"]), fmt(d["p_bonferroni"]),
               fmt(d["rank_biserial"]), f"{fmt(d['mean_concept'])} vs {fmt(d['mean_control'])}", drivers,
               escape(d.get("example", ""))]
        if tr:
            t = d.get("transfer", {})
            row.append(f"r {fmt(t.get('rank_biserial'))}, p {fmt(t.get('p'))}")
        rows.append(row)
    header = ["synapse", "U / max", "p", "p Bonferroni", "rank-biserial r", "mean concept vs control",
              "driving words (share)", "strongest example [token]"] + (["second language"] if tr else [])
    source = "the sets shipped with bdh" if c.get("shipped_sets") else "the given sets"
    transfer = (f" The same synapses are then tested on {escape(tr['concept_name'])} vs {escape(tr['control_name'])} "
                f"({tr['n_concept']} + {tr['n_control']} sentences in a second language): a synapse that separates "
                "both pairs tracks the concept, not the words." if tr else "")
    return ("<h2>3. Concept synapses (monosemanticity)</h2><p class='lead'>Each sentence is read from an empty "
            f"state; a synapse's value after it (divided by its length: {escape(c['normalize'])}) is compared "
            f"between {c['n_concept']} <b>{escape(c['concept_name'])}</b> and {c['n_control']} "
            f"<b>{escape(c['control_name'])}</b> sentences ({source}) by a one-sided Mann-Whitney U test. "
            f"{c['n_candidates']:,} of the {c['n_synapses']:,} synapses with the largest Welch t-score were tested "
            f"exactly; p Bonferroni multiplies p by all synapses. Rank-biserial r = 2U/(n1 n0) - 1.{transfer}</p>"
            + figure(report, "concepts") + table(header, rows, {0, 6, 7}))


def section_graph(report: dict) -> str:
    g = report.get("graph")
    if not g:
        return "<h2>4. Neuron graph</h2><p>Skipped.</p>"
    rows = []
    for r in g["sweep"]:
        b = r.get("baselines") or {}
        rows.append([fmt(r["beta"]), fmt(r["beta_over_std"]), fmt(r["edges_directed"]),
                     fmt(r["gaussian_expected_edges"]), fmt(r.get("edges")), fmt(r.get("modularity")),
                     fmt(r.get("communities")), fmt(b.get("gnm", {}).get("modularity")),
                     fmt(b.get("lowrank", {}).get("modularity"))])
    heads = [[f"head {h['head']}", fmt(h["mean"]), fmt(h["std"]), fmt(h["skew"]), fmt(h["pos_tail"]),
              fmt(h["neg_tail"]), fmt(h["pos_share"]), fmt(h["inhibitory"])] for h in g["head_blocks"]["heads"]]
    st = g["stats"]
    grid = ("chosen by edge count (geometric from n to max_edges)" if g.get("betas_auto") else "given")
    return ("<h2>4. Neuron graph G = E D<sub>x</sub></h2><p class='lead'>The parameters read as a graph: entry "
            "(i, j) of G = E D_x is how strongly neuron i drives neuron j through the d-space, in head blocks of "
            f"N x N. Entries: mean {fmt(st['mean'])}, std {fmt(st['std'])}, range {fmt(st['min'])} to "
            f"{fmt(st['max'])}. Keeping the entries &ge; beta ({grid}) gives a directed graph; its modularity "
            f"(best of {g['seeds']} Louvain runs on the undirected graph) is compared with G(n, m) and with a "
            "thresholded random low-rank product of the same edge count.</p>"
            + figure(report, "modularity")
            + table(["beta", "beta / std", "directed edges", "Gaussian expectation", "undirected edges",
                     "modularity", "communities", "G(n,m)", "low-rank"], rows)
            + figure(report, "edges")
            + f"<h3>Degree distributions</h3><p>At beta_ref = {fmt(g['degrees']['beta'])} "
              f"({g['degrees']['edges_directed']:,} directed edges, mean degree 8).</p>"
            + figure(report, "graph_degrees") + fit_table(g["degrees"])
            + "<h3>Heads</h3>" + figure(report, "heads")
            + table(["source head", "mean", "std", "skew", f"entries &ge; {fmt(g['head_blocks']['beta_ref'])}",
                     "entries &le; -beta_ref", "positive share", "inhibitory?"], heads, {0})
            + f"<p class='caption'>A head is flagged inhibitory when under {100 * g['head_blocks']['inhibitory_share']:.0f}% "
              "of its strong outgoing entries are positive.</p>")


def render_html(report: dict) -> str:
    body = "".join(f(report) for f in (section_header, section_sparsity, section_synapses, section_concepts,
                                       section_graph))
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>BDH inspection report</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")
