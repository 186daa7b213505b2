"""What the graph form shows: messages per token, synapses touched, thresholded graphs, and how far
the graph form is from BDH-GPU in each layout.

Per token (summed over layers; B = 1), counted where they are sent by a non-zero sender:
    messages_x      x-round: senders with Y_{l-1}(i) > 0 (the token neuron for layer 1) x their
                    out-degree in G_x
    messages_read   read: post-synaptic neurons with X(j) > 0 x the synapses (i, j) with sigma != 0
    messages_y      y-round: (neuron i, head h) with A_h(i) != 0 x i's out-degree into head h in G_y
    messages_out    read-out: neurons with Y_L(i) > 0 x their out-degree in G_out
    synapses_written  Hebbian write: pairs (i, j) with Y_{l-1}(i) > 0 and X_l(j) > 0
    sigma_touched   fraction of all synapse entries read or written at this token
    x_active, y_active  neurons with X > 0 and Y > 0 (summed over layers)
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from bdh.graph.form import GraphBDH, from_model
from bdh.model import BDH

COUNTS = ("messages_x", "messages_read", "messages_y", "messages_out", "synapses_written", "sigma_touched",
          "x_active", "y_active")


class MessageCounter:
    """observe() for GraphBDH.forward: the counts above per token."""

    def __init__(self, graph: GraphBDH, T: int):
        self.graph = graph
        self.counts = {name: torch.zeros(T, dtype=torch.float64) for name in COUNTS}
        self.out_x = [graph.G_x_in.out_degree(), graph.G_x.out_degree()]
        self.out_y = [self._out_by_head(graph.G_y_in), self._out_by_head(graph.G_y)]
        self.out_final = graph.G_out.out_degree()
        self.sigma_entries = sum(graph.vocab_size if l == 0 else graph.n_neurons for l in range(graph.n_layer)) \
            * graph.n_neurons

    def _out_by_head(self, edges):
        """(n_src, nh): edges from each source into each head."""
        heads = edges.dst // self.graph.neurons_per_head
        counts = torch.zeros(edges.n_src * self.graph.n_head, dtype=torch.long)
        counts.index_add_(0, edges.src * self.graph.n_head + heads, torch.ones_like(heads))
        return counts.view(edges.n_src, self.graph.n_head)

    def __call__(self, t, layer, y_prev, x, A, y, sigma):
        c, k = self.counts, min(layer, 1)
        sender, fires = (y_prev[0] > 0), (x[0] > 0)
        c["messages_x"][t] += float(self.out_x[k][sender].sum())
        nonzero = sigma[0] != 0  # n_src, n
        c["messages_read"][t] += float(nonzero[:, fires].sum())
        c["messages_y"][t] += float(self.out_y[k][(A[0] != 0).T].sum())
        c["synapses_written"][t] += float(sender.sum() * fires.sum())
        c["sigma_touched"][t] += float((nonzero | sender[:, None])[:, fires].sum()) / self.sigma_entries
        c["x_active"][t] += float(fires.sum())
        c["y_active"][t] += float((y[0] > 0).sum())
        if layer == self.graph.n_layer - 1:
            c["messages_out"][t] += float(self.out_final[y[0] > 0].sum())


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean cross-entropy of logits (1, T, V) on the next tokens of ids (1, T)."""
    return float(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]))


def count_messages(graph: GraphBDH, ids: torch.Tensor) -> tuple[dict[str, list[float]], float]:
    """Per-token counts (COUNTS) and the loss of the graph on ids (1, T)."""
    counter = MessageCounter(graph, ids.shape[1])
    logits, _ = graph.forward(ids, observe=counter)
    return {k: v.tolist() for k, v in counter.counts.items()}, next_token_loss(logits, ids)


def threshold_sweep(graph: GraphBDH, ids: torch.Tensor, fractions) -> list[dict]:
    """Loss and messages per token with only the strongest fraction of the edges of G_x and G_y."""
    rows = []
    for fraction in fractions:
        g = graph.with_graphs(fraction)
        counts, loss = count_messages(g, ids)
        rows.append({"fraction": float(fraction), "edges_G_x": g.G_x.n_edges, "edges_G_y": g.G_y.n_edges,
                     "loss": loss, **{f"{k}_mean": float(sum(v) / len(v)) for k, v in counts.items()}})
    return rows


LAYOUTS = (("eq8", False), ("eq8", True), ("reference", False), ("reference", True))


def layout_distances(model: BDH, graph: GraphBDH, ids: torch.Tensor) -> list[dict]:
    """The same weights run by BDH-GPU in every layout, with and without LayerNorm, against the graph form:
    loss, and the relative distance of the logits max|l - l_graph| / max|l_graph|."""
    with torch.no_grad():
        g_logits, _ = graph.forward(ids)
    rows = []
    for layout, layernorm in LAYOUTS:
        config = dataclasses.replace(model.config, layout=layout, layernorm=layernorm, dropout=0.0)
        twin = BDH(config).to(torch.float64).eval()
        twin.load_state_dict({k: v.to(torch.float64) for k, v in model.state_dict().items()}, strict=False)
        with torch.no_grad():
            logits = twin(ids.to(twin.lm_head.device)).logits.double().cpu()
        distance = float((logits - g_logits).abs().max() / g_logits.abs().max().clamp(min=1e-300))
        rows.append({"layout": layout, "layernorm": layernorm, "loss": next_token_loss(logits, ids),
                     "relative_distance_to_graph": distance if math.isfinite(distance) else None})
    return rows


def build(model: BDH, ids: torch.Tensor, fractions, dtype=torch.float64) -> dict:
    """Everything `bdh graph` writes, for one model and one token sequence (1, T)."""
    model = model.eval()
    graph = from_model(model, dtype=dtype)
    counts, loss = count_messages(graph, ids)
    with torch.no_grad():
        own = model(ids.to(model.lm_head.device)).logits.cpu()
    return {
        "model": {"n_neurons": graph.n_neurons, "n_head": graph.n_head, "n_layer": graph.n_layer,
                  "n_embd": model.config.n_embd, "layout": model.config.layout, "layernorm": model.config.layernorm,
                  "decay": model.config.decay, "exact": graph.exact},
        "graph": {"edges": {name: getattr(graph, name).n_edges for name in ("G_x_in", "G_y_in", "G_x", "G_y", "G_out")},
                  "sigma_entries": sum(s.numel() for s in graph.init_state(1).sigma), "loss": loss,
                  "model_loss": next_token_loss(own, ids)},
        "per_token": counts,
        "mean": {k: float(sum(v) / len(v)) for k, v in counts.items()},
        "thresholds": threshold_sweep(graph, ids, fractions),
        "layouts": layout_distances(model, graph, ids),
    }
