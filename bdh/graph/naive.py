"""The graph form as a plain loop over neurons and synapses, in Python floats: the ground truth
that bdh.graph.form (sparse matrix products over the same edge lists) is tested against.

Each round is written from the point of view of one neuron (or one synapse) and uses only what
arrives along its own edges; see bdh.graph.form for the rules. Slow: for graphs of a few dozen
neurons.
"""

from __future__ import annotations

import math

import torch

from bdh.graph.form import Edges, GraphBDH, GraphState


def incoming(edges: Edges) -> list[list[tuple[int, float, float]]]:
    """For every target neuron, its incoming edges (source, excitatory weight, inhibitory weight)."""
    lists = [[] for _ in range(edges.n_dst)]
    for i, j, e, h in zip(edges.src.tolist(), edges.dst.tolist(), edges.excite.tolist(), edges.inhibit.tolist()):
        lists[j].append((i, e, h))
    return lists


def listen(edges_in: list[tuple[int, float, float]], value) -> float:
    """What a neuron receives: excitatory minus inhibitory messages weighted by their synapse."""
    total = 0.0
    for i, excite, inhibit in edges_in:
        total += excite * value(i)
        total -= inhibit * value(i)
    return total


def naive_forward(g: GraphBDH, idx: torch.Tensor, state: GraphState | None = None):
    """Same contract as GraphBDH.forward: idx (B, T) -> (logits (B, T, V) float64, state after)."""
    B, T = idx.shape
    n, V, nh, N = g.n_neurons, g.vocab_size, g.n_head, g.neurons_per_head
    head = [j // N for j in range(n)]
    lam = [1.0] * nh if g.decay is None else [float(v) for v in g.decay]
    turn = [0.0] * n  # the angle by which U turns the post-synaptic pair (j, j + 1), j even
    if g.freqs is not None:
        for j in range(0, n, 2):
            cycles = float(g.freqs[head[j], (j % N) // 2])
            turn[j] = (cycles - math.floor(cycles)) * 2 * math.pi
    graphs = [(incoming(g.G_x_in), incoming(g.G_y_in))] + [(incoming(g.G_x), incoming(g.G_y))] * (g.n_layer > 1)
    read_out = incoming(g.G_out)
    state = g.init_state(B) if state is None else state
    sigma = [[s.tolist() for s in layer] for layer in state.sigma]  # L x B x n_src x n
    logits = torch.zeros(B, T, V, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            y_prev = [0.0] * V
            y_prev[int(idx[b, t])] = 1.0  # the token neuron fires
            x = [0.0] * n
            for layer in range(g.n_layer):
                G_x, G_y = graphs[min(layer, 1)]
                S = sigma[layer][b]
                # x-round: neuron j listens to the Y of its G_x sources
                for j in range(n):
                    x[j] += max(listen(G_x[j], lambda i: y_prev[i]), 0.0)
                # read: each synapse (i, j) whose post-synaptic neuron fires tells i sigma(i, j) X(j),
                # filed under the head of j
                A = [[0.0] * len(S) for _ in range(nh)]
                for i, row in enumerate(S):
                    for j in range(n):
                        if x[j] != 0.0:
                            A[head[j]][i] += row[j] * x[j]
                # y-round: an active neuron j listens to its G_y sources' A in its own head's slot
                y = [0.0] * n
                for j in range(n):
                    if x[j] != 0.0:
                        y[j] = max(listen(G_y[j], lambda i, h=head[j]: A[h][i]), 0.0) * x[j]
                # Hebbian write on every synapse, then U local to each post-synaptic pair
                for i, row in enumerate(S):
                    for j in range(n):
                        row[j] += y_prev[i] * x[j]
                    for j in range(0, n, 2):
                        c, s, k = math.cos(turn[j]), math.sin(turn[j]), lam[head[j]]
                        a, a2 = row[j], row[j + 1]
                        row[j], row[j + 1] = k * (a * c + a2 * s), k * (a2 * c - a * s)
                y_prev = y
            for o in range(V):
                logits[b, t, o] = listen(read_out[o], lambda i: y_prev[i])
    out = GraphState(pos=state.pos + T, sigma=[torch.tensor(layer, dtype=torch.float64) for layer in sigma])
    return logits, out
