"""Sparsity: the fraction of neurons with non-zero x and y, per layer and head (the paper's Section 6).

`sparsity` reads a whole text (streamed) and also keeps, for every token, the fraction of all n
neurons that are active, so one can see density rise on new material and fall on repeats.
`sparsity_probe` is the cheap version the trainer logs into metrics.jsonl, and
`sparsity_history` reads those records back for the report.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bdh.fileio import read_jsonl
from bdh.interp.capture import ActivationCapture, Chunk, eval_mode, stream_activations, unwrap



class SparsityAccumulator:
    """Counts non-zero x and y per layer and head over streamed chunks."""

    sites = ("x", "y")

    def __init__(self, n_layer: int, n_head: int, per_token: bool = True):
        self.layers = None
        self.per_token = per_token
        self.nonzero = {s: torch.zeros(n_layer, n_head, dtype=torch.float64) for s in self.sites}
        self.by_token: dict[str, list[list[torch.Tensor]]] = {s: [[] for _ in range(n_layer)] for s in self.sites}
        self.entries = 0  # tokens x neurons per head seen, per (layer, head)
        self.n_tokens = 0

    def update(self, chunk: Chunk) -> None:
        for (site, layer), act in chunk.acts.items():
            if site not in self.sites:
                continue
            active = act > 0  # nh, T, N
            self.nonzero[site][layer] += active.sum(dim=(1, 2)).double()
            if self.per_token:
                self.by_token[site][layer].append(active.float().mean(dim=(0, 2)))  # T
        x0 = chunk.acts[("x", 0)]  # nh, T, N
        self.entries += x0.shape[1] * x0.shape[2]
        self.n_tokens += x0.shape[1]

    def result(self) -> dict:
        out: dict = {"n_tokens": self.n_tokens}
        for site in self.sites:
            frac = self.nonzero[site] / max(1, self.entries)  # L, nh
            out[f"{site}_nonzero"] = frac.tolist()
            out[f"{site}_nonzero_layer"] = frac.mean(dim=1).tolist()
            out[f"{site}_nonzero_mean"] = float(frac.mean())
            if self.per_token:
                out[f"{site}_nonzero_by_token"] = [torch.cat(parts).tolist() if parts else []
                                                   for parts in self.by_token[site]]
        return out


def sparsity(model: nn.Module, ids, chunk_len: int = 256, per_token: bool = True) -> dict:
    """Fractions of non-zero x and y over one text.

    Returns plain lists: `x_nonzero[l][h]`, `y_nonzero[l][h]` (per layer and head),
    `*_nonzero_layer[l]` (head average), `*_nonzero_mean` (all layers), and with per_token
    `*_nonzero_by_token[l][t]` (fraction of all n neurons active at token t).
    """
    model = unwrap(model)
    c = model.config
    acc = SparsityAccumulator(c.n_layer, c.n_head, per_token)
    for chunk in stream_activations(model, ids, acc.sites, chunk_len=chunk_len):
        acc.update(chunk)
    return acc.result()


@torch.no_grad()
def sparsity_probe(model: nn.Module, idx: torch.Tensor, per_layer: bool = False) -> dict[str, float]:
    """Mean fraction of non-zero x and y (over layers, heads, tokens) on a batch idx (B, T).

    Cheap enough for a training loop: one forward under no_grad in eval mode (the model's mode is
    restored), nothing stored but counts. Returns {"x_nonzero": .., "y_nonzero": ..}, plus
    "x_nonzero_l{i}" / "y_nonzero_l{i}" per layer when per_layer is True.
    """
    model = unwrap(model)
    counts: dict[tuple[str, int], float] = {}

    def count(site: str, layer: int, act: torch.Tensor) -> None:
        counts[(site, layer)] = float((act > 0).float().mean())

    with eval_mode(model), ActivationCapture(model, ("x", "y"), keep=False, callback=count, device=idx.device):
        model(idx, return_state=False)
    out: dict[str, float] = {}
    for site in ("x", "y"):
        values = [v for (s, _), v in sorted(counts.items()) if s == site]
        out[f"{site}_nonzero"] = sum(values) / len(values)
        if per_layer:
            out.update({f"{site}_nonzero_l{layer}": v for (s, layer), v in sorted(counts.items()) if s == site})
    return out


def sparsity_history(path: str | Path) -> dict | None:
    """The sparsity_probe values a training run logged into metrics.jsonl, for plotting.

    Returns {"file", "step": [...], "x_nonzero": [...], "y_nonzero": [...]} over the records
    holding those keys, or None when there are none. A line cut short by a crash ends the read.
    """
    steps, xs, ys = [], [], []
    for record in read_jsonl(Path(path)):
        if isinstance(record, dict) and ("x_nonzero" in record or "y_nonzero" in record):
            steps.append(record.get("step", len(steps)))
            xs.append(record.get("x_nonzero"))
            ys.append(record.get("y_nonzero"))
    return {"file": str(path), "step": steps, "x_nonzero": xs, "y_nonzero": ys} if steps else None
