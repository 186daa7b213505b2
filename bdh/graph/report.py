"""`bdh graph`: the graph form of one or more checkpoints on a text, written as graph.json and plots.

graph.json (schema "bdh.graph/1"): {"schema", "text", "n_tokens", "truncated", "runs": [one entry
per checkpoint, see bdh.graph.measure.build, plus "checkpoint"], "figures": name -> file}.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bdh.errors import UserError
from bdh.fileio import check_output_dir, output_directory, write_json
from bdh.graph.measure import build
from bdh.interp.report import load_model_and_tokenizer, load_text

SCHEMA = "bdh.graph/1"
DEFAULT_FRACTIONS = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02)
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def graph_report(ckpts: Sequence[str | Path], text_path: str | Path, out_dir: str | Path, max_tokens: int = 256,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS, dtype: str = "float64", log=None,
                 overwrite: bool = False) -> dict:
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite, "--overwrite")  # before any work: files bdh did not write are refused
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    bad = [f for f in fractions if not 0.0 < f <= 1.0]
    if bad:
        raise UserError(f"--fractions must lie in (0, 1], got {bad}")
    runs, meta = [], None
    for ckpt in ckpts:
        model, tokenizer = load_model_and_tokenizer(ckpt, "cpu")
        if model.config.variant != "gpu":
            raise UserError(f"{ckpt}: the graph form covers BDH-GPU (variant 'gpu') only")
        ids, truncated = load_text(tokenizer, text_path, max_tokens)
        if len(ids) < 2:
            raise UserError(f"{text_path} gives {len(ids)} token: the loss needs at least 2")
        if log:
            log(f"{ckpt}: n = {model.config.n_neurons:,} neurons, {len(ids)} tokens")
        run = build(model, torch.tensor([ids]), fractions, DTYPES[dtype])
        run["checkpoint"] = str(ckpt)
        runs.append(run)
        meta = meta or {"n_tokens": len(ids), "truncated": truncated}
    report = {"schema": SCHEMA, "text": str(text_path), **meta, "runs": runs}
    # built in a temporary sibling, moved into place whole (bdh.fileio.output_directory)
    with output_directory(out_dir, kind="graph", replace=overwrite, flag="--overwrite") as tmp:
        report["figures"] = write_figures(runs, tmp)
        write_json(tmp / "graph.json", _finite(report))
    return report


def _finite(obj):
    """NaN and infinities as null (JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _figure(ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * ncols, 3.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def write_figures(runs: list[dict], out_dir: Path) -> dict[str, str]:
    files = {}
    fig, ax = _figure()
    for run in runs:
        label = f"n={run['model']['n_neurons']}"
        for name, style in (("messages_x", "-"), ("messages_read", "--"), ("messages_y", ":")):
            ax.plot(run["per_token"][name], style, label=f"{name} {label}")
    ax.set(xlabel="token", ylabel="messages", yscale="log", title="messages per token (all layers)")
    ax.legend(fontsize=7)
    fig.savefig(out_dir / "messages.png")
    files["messages"] = "messages.png"

    fig, (left, right) = _figure(2)
    for run in runs:
        rows = run["thresholds"]
        frac = [r["fraction"] for r in rows]
        label = f"n={run['model']['n_neurons']}"
        left.plot(frac, [r["loss"] for r in rows], "o-", label=label)
        right.plot(frac, [r["messages_x_mean"] + r["messages_y_mean"] for r in rows], "o-", label=label)
    left.set(xscale="log", xlabel="fraction of G_x, G_y edges kept", ylabel="loss (nats/token)",
             title="thresholded graph: loss")
    right.set(xscale="log", yscale="log", xlabel="fraction of G_x, G_y edges kept",
              ylabel="x- and y-round messages / token", title="thresholded graph: messages")
    left.legend(fontsize=7)
    fig.savefig(out_dir / "thresholds.png")
    files["thresholds"] = "thresholds.png"

    if len(runs) > 1:
        fig, ax = _figure()
        n = np.array([run["model"]["n_neurons"] for run in runs])
        order = np.argsort(n)
        for name in ("messages_x", "messages_read", "messages_y", "synapses_written"):
            ax.plot(n[order], np.array([run["mean"][name] for run in runs])[order], "o-", label=name)
        ax.set(xscale="log", yscale="log", xlabel="neurons n", ylabel="per token (mean)", title="growth with n")
        ax.legend(fontsize=7)
        fig.savefig(out_dir / "growth.png")
        files["growth"] = "growth.png"
    return files
