"""Figures of the experiments: learning curves of a comparison, the log-log scaling plot of a sweep.

Matplotlib is used through Figure + the Agg canvas directly, so no global backend is switched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

DPI = 110
COLOURS = {"bdh": "tab:orange", "gpt": "tab:blue"}
LABELS = {"bdh": "BDH", "gpt": "GPT"}


def _figure(width: float = 7.0, height: float = 4.3):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def plot_curves(runs: dict[str, dict[str, Any]], x: str, path: Path, title: str) -> None:
    """Validation loss of every run against tokens seen (x="tokens"), seconds of training steps
    (x="step_s", validation not counted) or wall-clock time (x="elapsed_s", validation included)."""
    fig, ax = _figure()
    longest = max(p[x] for run in runs.values() for p in run["curve"])
    minutes = x != "tokens" and longest > 600
    for name, run in runs.items():
        xs = np.array([p[x] for p in run["curve"]], dtype=float) / (60 if minutes else 1)
        ys = [p["val_loss"] for p in run["curve"]]
        ax.plot(xs, ys, "o-", ms=3, color=COLOURS.get(run["model_type"]),
                label=f"{LABELS.get(run['model_type'], name)} ({run['params']:,} parameters)")
    unit = "min" if minutes else "s"
    ax.set_xlabel({"tokens": "training tokens seen", "step_s": f"time in training steps ({unit}, validation not counted)",
                   "elapsed_s": f"training wall-clock time ({unit}, validation included)"}[x])
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    fig.savefig(path)


def plot_scaling(points: dict[str, list[tuple[float, float]]], fits: dict[str, Any], path: Path, xlabel: str,
                 title: str) -> None:
    """Log-log: final validation loss against parameters per model, with the fitted power laws."""
    fig, ax = _figure()
    for model, pts in points.items():
        if not pts:
            continue
        colour = COLOURS.get(model)
        xs, ys = np.array(pts, dtype=float).T
        ax.plot(xs, ys, "o", color=colour, label=f"{LABELS.get(model, model)} runs")
        fit = fits.get(model)
        if fit is not None:
            grid = np.geomspace(xs.min() / 1.2, xs.max() * 1.2, 100)
            ax.plot(grid, fit.predict(grid), "-", color=colour, alpha=0.8,
                    label=f"{LABELS.get(model, model)} fit: {fit.describe()}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # losses span a narrow range: plain numbers on the minor ticks read better than 4 x 10^0
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final validation loss (nats/token, log scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(frameon=False, fontsize="small")
    fig.savefig(path)
