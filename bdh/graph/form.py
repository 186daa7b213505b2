"""BDH in graph form (the paper's Section 2, Eq. 6, Table 1): neurons that talk only along synapses.

The graph, built from a BDH-GPU by `from_model` (the paper's Observation 4, G_x = D_x E,
G_y = D_y E, G_s = all ones), in this package's orientation (a message goes from row to column):

    token neurons (V)   the token read at t fires its neuron with activity 1 (the "y" before layer 1)
    neurons (n = nh N)  each holds X (accumulated over layers), A (one slot per head) and Y
    output neurons (V)  the logits
    G_x_in = f_e D_x, G_y_in = f_e D_y   token neuron -> neuron   (layer 1)
    G_x    = E D_x,   G_y    = E D_y     neuron -> neuron         (layers 2..L)
    G_out  = E f_d                       neuron -> output neuron
    sigma_l(i, j)                        a synapse state for EVERY pair (G_s = 1): pre-synaptic
                                         i (a token neuron for l = 1), post-synaptic neuron j

Every graph is an explicit edge list, split into an excitatory and an inhibitory non-negative
part (G = G^e - G^i). Per token t and layer l, the rounds of Table 1 (y_0 = the token neuron):

    x-round   Y(i) -> X(j):      X(j) += relu(sum_{i->j in G_x} (G^e - G^i)(i, j) Y_{l-1}(i))
    read      X(j), sigma(i, j) -> A(i): A_{head(j)}(i) += sigma(i, j) X(j)
    y-round   A(i), X(j) -> Y(j): Y(j) = relu(sum_{i->j in G_y} (G^e - G^i)(i, j) A_{head(j)}(i)) X(j)
    write     Y(i), X(j) -> sigma(i, j): sigma(i, j) += Y_{l-1}(i) X_l(j), then U
    U         sigma(i, j) *= lambda_{head(j)} (decay), and the pair (sigma(i, 2k), sigma(i, 2k+1))
              turned by -2 pi f_k (RoPE): local to the post-synaptic pair of neurons

A neuron's A has one slot per head because BDH-GPU's attention state is per head: a message that
arrives along sigma(i, j) is filed under the head of j, and neuron j reads only its own head's
slot. logits(t) = sum_{i->o in G_out} (G^e - G^i)(i, o) Y_L(i).

This is BDH-GPU in the eq8 layout without LayerNorm (`layout="eq8", layernorm=False`, Eq. 7)
exactly, dropout aside (tests/graph/test_form.py). For any other layout or with LayerNorm the
graph form is a different function of the same weights (see `GraphBDH.exact`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bdh.errors import UserError
from bdh.model import BDH
from bdh.state import TensorState


@dataclass
class Edges:
    """A weighted directed graph from n_src to n_dst neurons as an edge list src[e] -> dst[e],
    with non-negative excitatory and inhibitory weights (G = G^e - G^i, never both non-zero)."""

    src: torch.Tensor  # m, int64
    dst: torch.Tensor  # m, int64
    excite: torch.Tensor  # m, >= 0
    inhibit: torch.Tensor  # m, >= 0
    n_src: int
    n_dst: int

    @classmethod
    def from_matrix(cls, M: torch.Tensor) -> "Edges":
        """Every non-zero entry of M (n_src, n_dst) as an edge."""
        src, dst = M.nonzero(as_tuple=True)
        w = M[src, dst]
        return cls(src, dst, w.clamp(min=0), (-w).clamp(min=0), M.shape[0], M.shape[1])

    @property
    def weight(self) -> torch.Tensor:
        return self.excite - self.inhibit

    @property
    def n_edges(self) -> int:
        return int(self.src.numel())

    def out_degree(self) -> torch.Tensor:
        return torch.bincount(self.src, minlength=self.n_src)  # n_src

    def to_matrix(self) -> torch.Tensor:
        M = self.excite.new_zeros(self.n_src, self.n_dst)
        M[self.src, self.dst] = self.weight
        return M

    def keep_strongest(self, fraction: float) -> "Edges":
        """The graph of the ceil(fraction * m) edges of largest |G|."""
        if not 0.0 < fraction <= 1.0:
            raise UserError(f"the fraction of edges to keep must be in (0, 1], got {fraction}")
        k = max(1, math.ceil(fraction * self.n_edges))
        keep = torch.topk((self.excite + self.inhibit), k).indices.sort().values
        return Edges(self.src[keep], self.dst[keep], self.excite[keep], self.inhibit[keep], self.n_src, self.n_dst)

    def send(self, values: torch.Tensor) -> torch.Tensor:
        """values (B, n_src) -> (B, n_dst): each edge carries G(i, j) * value(i), summed at its target j.

        The edge list is held sorted by target (a CSR matrix, one row of incoming edges per target
        neuron), so the sum at every target is one sparse matrix product.
        """
        return (self._incoming()[0] @ values.T).T

    def send_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """slots (B, nh, n_src) -> (B, n_dst): each edge carries the source's value in the slot of the
        head of its target (the n_dst targets are nh equal blocks of neurons, one per head)."""
        blocks = self._incoming(slots.shape[1])
        return torch.cat([(block @ slots[:, h].T).T for h, block in enumerate(blocks)], dim=1)

    def _incoming(self, n_blocks: int = 1) -> list[torch.Tensor]:
        """G^T (n_dst, n_src) as CSR, split into n_blocks row blocks of targets; G = G^e - G^i."""
        key = ("csr", n_blocks)
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            size = self.n_dst // n_blocks
            blocks = []
            for b in range(n_blocks):
                mine = (self.dst >= b * size) & (self.dst < (b + 1) * size)
                index = torch.stack((self.dst[mine] - b * size, self.src[mine]))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch calls its sparse CSR support beta
                    coo = torch.sparse_coo_tensor(index, self.weight[mine], (size, self.n_src), check_invariants=True)
                    blocks.append(coo.coalesce().to_sparse_csr())
            cache[key] = blocks
        return cache[key]


@dataclass
class GraphState(TensorState):
    """sigma[l]: (B, n_src_l, n) synapse states, n_src = V for layer 1 and n after; pos (B,)."""

    sigma: list[torch.Tensor]


@dataclass
class GraphBDH:
    """The graph form; call it on token ids: graph(idx) -> logits (B, T, V)."""

    n_layer: int
    n_head: int
    neurons_per_head: int
    vocab_size: int
    G_x_in: Edges
    G_y_in: Edges
    G_x: Edges
    G_y: Edges
    G_out: Edges
    decay: torch.Tensor | None  # nh, lambda_h
    freqs: torch.Tensor | None  # nh, N/2: cycles per token of each neuron pair (None: no rotation)
    exact: bool  # built from a model in the eq8 layout without LayerNorm: computes the same function
    source: dict

    @property
    def n_neurons(self) -> int:
        return self.n_head * self.neurons_per_head

    @property
    def dtype(self):
        return self.G_x.excite.dtype

    def head_of(self) -> torch.Tensor:
        """The head of every neuron: (n,)."""
        return torch.arange(self.n_neurons) // self.neurons_per_head

    def graphs(self, layer: int) -> tuple[Edges, Edges]:
        return (self.G_x_in, self.G_y_in) if layer == 0 else (self.G_x, self.G_y)

    def init_state(self, batch_size: int) -> GraphState:
        n, V = self.n_neurons, self.vocab_size
        sigma = [torch.zeros(batch_size, V if l == 0 else n, n, dtype=self.dtype) for l in range(self.n_layer)]
        return GraphState(pos=torch.zeros(batch_size, dtype=torch.long), sigma=sigma)

    def with_graphs(self, fraction: float) -> "GraphBDH":
        """The same model with only the strongest `fraction` of the edges of G_x and G_y (neuron to neuron)."""
        return GraphBDH(**{**self.__dict__, "G_x": self.G_x.keep_strongest(fraction),
                           "G_y": self.G_y.keep_strongest(fraction)})

    def __call__(self, idx: torch.Tensor, state: GraphState | None = None, observe=None):
        return self.forward(idx, state, observe)[0]

    def forward(self, idx: torch.Tensor, state: GraphState | None = None, observe=None):
        """idx (B, T) -> (logits (B, T, V), the state after the last token). The state passed in is
        not modified. observe(t, layer, y_prev, x, A, y, sigma_before_write) is called per layer."""
        B, T = idx.shape
        state = self.init_state(B) if state is None else state.clone()
        sigma = state.sigma
        logits = []
        for t in range(T):
            y_prev = F.one_hot(idx[:, t], self.vocab_size).to(self.dtype)  # B, V: the token neuron fires
            x = y_prev.new_zeros(B, self.n_neurons)
            for layer in range(self.n_layer):
                G_x, G_y = self.graphs(layer)
                x = x + G_x.send(y_prev).relu()  # x-round: Y(i) -> X(j)
                A = self.read(sigma[layer], x)  # read: X(j), sigma(i, j) -> A_head(j)(i); B, nh, n_src
                y = G_y.send_slots(A).relu() * x  # y-round: A(i), X(j) -> Y(j)
                if observe is not None:
                    observe(t, layer, y_prev, x, A, y, sigma[layer])
                sigma[layer] = self.U(sigma[layer] + y_prev[:, :, None] * x[:, None, :])  # write, then U
                y_prev = y
            logits.append(self.G_out.send(y_prev))
        return torch.stack(logits, dim=1), GraphState(pos=state.pos + T, sigma=sigma)

    def read(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A_h(i) = sum over j in head h of sigma(i, j) X(j): sigma (B, n_src, n), x (B, n) -> (B, nh, n_src)."""
        B, n_src, n = sigma.shape
        per_head = sigma.view(B, n_src, self.n_head, -1) * x.view(B, 1, self.n_head, -1)
        return per_head.sum(-1).transpose(1, 2)

    def U(self, sigma: torch.Tensor) -> torch.Tensor:
        """Decay by the head of the post-synaptic neuron, then turn each post-synaptic pair by -2 pi f."""
        B, n_src, n = sigma.shape
        nh, N = self.n_head, self.neurons_per_head
        if self.decay is not None:
            sigma = (sigma.view(B, n_src, nh, N) * self.decay.view(1, 1, nh, 1).to(sigma.dtype)).view(B, n_src, n)
        if self.freqs is not None:
            phase = torch.frac(self.freqs.double()) * (2 * math.pi)  # nh, N/2
            rotor = torch.polar(torch.ones_like(phase), -phase).to(torch.complex128 if sigma.dtype == torch.float64
                                                                    else torch.complex64)
            pairs = torch.view_as_complex(sigma.reshape(B, n_src, nh, N // 2, 2).contiguous()) * rotor
            sigma = torch.view_as_real(pairs).reshape(B, n_src, n)
        return sigma


def from_model(model: BDH, dtype: torch.dtype = torch.float64, rotation: bool = True) -> GraphBDH:
    """The graph form of a BDH-GPU (Observation 4): dense n x n graphs (threshold with with_graphs).

    rotation=False leaves out RoPE (U without the turn); a model whose frequencies are all zero
    has none anyway.
    """
    if not isinstance(model, BDH):
        raise UserError(f"the graph form is built from a BDH model, got {type(model).__name__}")
    if model.config.variant != "gpu":
        raise UserError(f"the graph form covers BDH-GPU only (variant 'gpu'), not {model.config.variant!r}")
    c = model.config
    nh, N, D = c.n_head, c.neurons_per_head, c.n_embd
    with torch.no_grad():
        Dx = model.encoder.detach().to("cpu", dtype).permute(1, 0, 2).reshape(D, nh * N)  # D, n
        Dy = model.encoder_v.detach().to("cpu", dtype).permute(1, 0, 2).reshape(D, nh * N)
        E = model.decoder.detach().to("cpu", dtype)  # n, D
        fe = model.embed.weight.detach().to("cpu", dtype)  # V, D
        fd = model.lm_head.detach().to("cpu", dtype)  # D, V
        freqs = model.freqs.detach().to("cpu", torch.float64)[:, ::2]
    rotate = rotation and bool((freqs != 0).any())
    return GraphBDH(
        n_layer=c.n_layer, n_head=nh, neurons_per_head=N, vocab_size=c.vocab_size,
        G_x_in=Edges.from_matrix(fe @ Dx), G_y_in=Edges.from_matrix(fe @ Dy),
        G_x=Edges.from_matrix(E @ Dx), G_y=Edges.from_matrix(E @ Dy), G_out=Edges.from_matrix(E @ fd),
        decay=None if model.decay is None else model.decay.detach().cpu().double(),
        freqs=freqs if rotate else None,
        exact=c.layout == "eq8" and not c.layernorm,
        source={"layout": c.layout, "layernorm": c.layernorm, "n_embd": D},
    )
