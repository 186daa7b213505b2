"""Synapse state sigma (paper Eq. 16), its strongest synapses, and token-by-token traces.

Definition used here (the paper's Eq. 16). Synapse layer l, for 1 <= l < n_layer, pairs the
gated activation y of layer l-1 with the neuron activation x of layer l, head by head:

    sigma_l[h] (N x N) = sum over tau <= t of  lambda_h^(t - tau) * y_{tau, l-1}[h]^T  x_{tau, l}[h]

Row i is the pre-synaptic neuron (its y fired in layer l-1), column j the post-synaptic neuron
(its x fired in layer l): the Hebbian write "Y(i), X(j) -> sigma(i, j)" of paper Eq. 6, which
happens once x_l has been computed from y_{l-1}. Layer 0 has no y before it, so there are
n_layer - 1 synapse layers. Only pairs within a head are formed, because BDH-GPU's attention
state rho_h is per head. lambda_h is the model's per-head decay (1 when it has none; the newest
token counts with weight 1). RoPE is left out: the activations are taken before the rotation, so
with x, y >= 0 every entry is non-negative and there are no negative (rotation) entries for the
threshold of the paper to drop; a positive threshold is applied only when storing sparsely.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from bdh.errors import UserError
from bdh.fileio import save_tensors
from bdh.interp.capture import Chunk, run_accumulators, unwrap

#: refuse to hold more synapse entries than this at once unless told otherwise (4 bytes each)
MAX_SYNAPSE_ENTRIES = 1 << 27


def synapse_layers(n_layer: int, layers: Sequence[int] | None = None) -> list[int]:
    """The synapse layers asked for (default all of 1 .. n_layer - 1), checked."""
    if n_layer < 2:
        raise UserError("the synapse state pairs y of one layer with x of the next: the model needs >= 2 layers")
    if layers is None:
        return list(range(1, n_layer))
    out = sorted(set(int(l) for l in layers))
    bad = [l for l in out if not 1 <= l < n_layer]
    if bad:
        raise UserError(f"synapse layer(s) {bad} do not exist: synapse layer l pairs y of layer l-1 with x of "
                        f"layer l, so l runs from 1 to {n_layer - 1}")
    return out


def check_size(n_layers: int, n_head: int, N: int, max_entries: int = MAX_SYNAPSE_ENTRIES, arrays: int = 1) -> None:
    """Refuse before allocating `arrays` synapse arrays of n_layers x nh x N^2 entries beyond the limit."""
    entries = arrays * n_layers * n_head * N * N
    if entries > max_entries:
        times = f"{arrays} arrays x " if arrays > 1 else ""
        raise UserError(f"this needs {entries:,} synapse entries at once ({times}{n_layers} layer(s) x {n_head} heads x "
                        f"{N}^2, 4 bytes each); choose fewer layers (--layers), or raise the limit "
                        f"(--max-synapses, now {max_entries:,})")


def model_decay(model: nn.Module) -> torch.Tensor | None:
    decay = unwrap(model).decay
    return None if decay is None else decay.detach().float().cpu()


def decay_weights(decay: torch.Tensor | None, T: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(lambda^(T-1-tau) for tau < T as (nh, T), lambda^T as (nh,)) computed in float64."""
    if decay is None:
        return None
    steps = torch.arange(T - 1, -1, -1, dtype=torch.float64)
    log = torch.log(decay.double())[:, None]
    return torch.exp(log * steps).float(), torch.exp(log[:, 0] * T).float()


class SynapseAccumulator:
    """sigma_l for the chosen synapse layers, summed chunk by chunk with in-place batched matmuls."""

    sites = ("x", "y")

    def __init__(self, n_layer: int, n_head: int, N: int, layers: Sequence[int] | None = None,
                 decay: torch.Tensor | None = None, max_entries: int = MAX_SYNAPSE_ENTRIES):
        self.syn_layers = synapse_layers(n_layer, layers)
        check_size(len(self.syn_layers), n_head, N, max_entries)
        self.layers = sorted({l - 1 for l in self.syn_layers} | set(self.syn_layers))
        self.decay = decay
        self.sigma = {l: torch.zeros(n_head, N, N) for l in self.syn_layers}
        self.n_tokens = 0

    def update(self, chunk: Chunk) -> None:
        T = len(chunk.ids)
        weights = decay_weights(self.decay, T)
        for l in self.syn_layers:
            y = chunk.acts[("y", l - 1)]  # nh, T, N
            x = chunk.acts[("x", l)]  # nh, T, N
            if weights is not None:
                self.sigma[l].mul_(weights[1].view(-1, 1, 1))
                y = y * weights[0][:, :, None]
            self.sigma[l].baddbmm_(y.transpose(1, 2), x)  # nh, N, N
        self.n_tokens += T

    def result(self) -> dict[int, torch.Tensor]:
        return self.sigma


class TraceAccumulator:
    """Token-by-token value of chosen synapses (layer, head, i, j) and each token's increment."""

    sites = ("x", "y")

    def __init__(self, synapses: Sequence[Sequence[int]], decay: torch.Tensor | None = None):
        self.synapses = [tuple(int(v) for v in s) for s in synapses]
        self.layers = sorted({s[0] - 1 for s in self.synapses} | {s[0] for s in self.synapses})
        self.decay = decay
        self.parts: list[list[torch.Tensor]] = [[] for _ in self.synapses]

    def update(self, chunk: Chunk) -> None:
        for k, (l, h, i, j) in enumerate(self.synapses):
            self.parts[k].append(chunk.acts[("y", l - 1)][h, :, i] * chunk.acts[("x", l)][h, :, j])  # T

    def result(self) -> dict[str, np.ndarray]:
        """{"increments": (S, T) y_i x_j per token, "values": (S, T) sigma_t(i, j) after token t}."""
        if not self.synapses:
            return {"increments": np.zeros((0, 0)), "values": np.zeros((0, 0))}
        inc = torch.stack([torch.cat(p) for p in self.parts]).double().numpy()  # S, T
        if self.decay is None:
            return {"increments": inc, "values": np.cumsum(inc, axis=1)}
        from scipy.signal import lfilter

        values = np.stack([lfilter([1.0], [1.0, -float(self.decay[h])], row)
                           for (_, h, _, _), row in zip(self.synapses, inc)])
        return {"increments": inc, "values": values}


def synapse_state(model: nn.Module, ids, layers: Sequence[int] | None = None, chunk_len: int = 256,
                  max_entries: int = MAX_SYNAPSE_ENTRIES) -> dict[int, torch.Tensor]:
    """sigma after reading the token sequence ids: synapse layer l -> (nh, N, N) float32."""
    model = unwrap(model)
    c = model.config
    acc = SynapseAccumulator(c.n_layer, c.n_head, c.neurons_per_head, layers, model_decay(model), max_entries)
    run_accumulators(model, ids, [acc], chunk_len)
    return acc.result()


def synapse_traces(model: nn.Module, ids, synapses: Sequence[Sequence[int]], chunk_len: int = 256) -> dict[str, np.ndarray]:
    """sigma_t(i, j) for every token t and each chosen synapse (layer, head, i, j). See TraceAccumulator."""
    model = unwrap(model)
    acc = TraceAccumulator(synapses, model_decay(model))
    run_accumulators(model, ids, [acc], chunk_len)
    return acc.result()


def synapse_dict(layer: int, head: int, i: int, j: int, N: int, **extra) -> dict:
    """A synapse named in plain types: layer, head, neuron indices within the head and overall."""
    return {"layer": int(layer), "head": int(head), "i": int(i), "j": int(j),
            "pre": int(head * N + i), "post": int(head * N + j), **extra}


def top_synapses(sigma: dict[int, torch.Tensor], k: int = 20) -> list[dict]:
    """The k largest entries over all synapse layers and heads, largest first."""
    found = []
    for layer, s in sigma.items():
        nh, N, _ = s.shape
        values, flat = torch.topk(s.reshape(-1), min(k, s.numel()))
        for v, f in zip(values.tolist(), flat.tolist()):
            h, rest = divmod(f, N * N)
            found.append(synapse_dict(layer, h, *divmod(rest, N), N, value=float(v)))
    return sorted(found, key=lambda d: -d["value"])[:k]


def synapse_summary(sigma: dict[int, torch.Tensor], n_tokens: int) -> list[dict]:
    """Per synapse layer: size, total, mean per token, max, share of non-zero entries, per head."""
    out = []
    for layer, s in sigma.items():
        nh = s.shape[0]
        flat = s.reshape(nh, -1)
        out.append({
            "layer": int(layer),
            "pairs": f"y[layer {layer - 1}] -> x[layer {layer}]",
            "entries": int(s.numel()),
            "nonzero_fraction": float((s > 0).float().mean()),
            "max": float(s.max()),
            "total": float(s.double().sum()),
            "mean_per_token": float(s.double().mean() / max(1, n_tokens)),
            "head_total": flat.double().sum(dim=1).tolist(),
            "head_nonzero_fraction": (flat > 0).float().mean(dim=1).tolist(),
        })
    return out


def synapse_degrees(sigma_layer: torch.Tensor, edges: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Out- and in-degrees over all n = nh N neurons of the graph of the `edges` strongest synapses.

    sigma is block diagonal over heads; rows are pre-synaptic (out), columns post-synaptic (in).
    Returns (out_degree (n,), in_degree (n,), the threshold reached).
    """
    nh, N, _ = sigma_layer.shape
    flat = sigma_layer.reshape(-1)
    edges = min(edges, int((flat > 0).sum()))
    out_deg, in_deg = np.zeros(nh * N, dtype=np.int64), np.zeros(nh * N, dtype=np.int64)
    if edges == 0:
        return out_deg, in_deg, 0.0
    values, idx = torch.topk(flat, edges)
    h, rest = idx // (N * N), idx % (N * N)
    pre, post = (h * N + rest // N).numpy(), (h * N + rest % N).numpy()
    np.add.at(out_deg, pre, 1)
    np.add.at(in_deg, post, 1)
    return out_deg, in_deg, float(values[-1])


# storage ------------------------------------------------------------------------------------
def synapse_tensors(sigma: dict[int, torch.Tensor], max_dense: int = 1 << 20,
                    max_entries: int = 1 << 18) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata for safetensors: dense when a layer is small, else its strongest entries.

    Dense: "sigma.{l}" (nh, N, N). Sparse: "sigma.{l}.index" (nnz, 3) int32 rows (head, i, j) and
    "sigma.{l}.value" (nnz,), the `max_entries` largest positive entries (metadata gives the
    threshold that kept them, so a reader knows what was dropped).
    """
    tensors, meta = {}, {}
    for layer, s in sigma.items():
        nh, N, _ = s.shape
        info = {"shape": [nh, N, N], "pairs": f"y[{layer - 1}] x[{layer}]^T"}
        if s.numel() <= max_dense:
            tensors[f"sigma.{layer}"] = s.contiguous()
            info["format"] = "dense"
        else:
            flat = s.reshape(-1)
            keep = min(max_entries, int((flat > 0).sum()))
            values, idx = torch.topk(flat, keep)
            h, rest = idx // (N * N), idx % (N * N)
            tensors[f"sigma.{layer}.index"] = torch.stack([h, rest // N, rest % N], dim=1).int()
            tensors[f"sigma.{layer}.value"] = values.contiguous()
            info.update(format="sparse", kept=keep, threshold=float(values[-1]) if keep else 0.0)
        meta[f"sigma.{layer}"] = json.dumps(info)
    return tensors, meta


def save_synapses(path: str | Path, sigma: dict[int, torch.Tensor], **kwargs) -> None:
    """Write sigma to a .safetensors file (see synapse_tensors for the layout)."""

    tensors, meta = synapse_tensors(sigma, **kwargs)
    save_tensors(tensors, Path(path), metadata=meta)


def load_synapses(path: str | Path) -> dict[int, torch.Tensor]:
    """Read back save_synapses: layer -> dense (nh, N, N) or sparse COO tensor of that shape."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for key, text in meta.items():
            if not key.startswith("sigma."):
                continue
            layer, info = int(key.split(".")[1]), json.loads(text)
            if info["format"] == "dense":
                out[layer] = f.get_tensor(key)
            else:
                index = f.get_tensor(f"{key}.index").long().T
                out[layer] = torch.sparse_coo_tensor(index, f.get_tensor(f"{key}.value"), info["shape"],
                                                     check_invariants=True).coalesce()
    return dict(sorted(out.items()))
