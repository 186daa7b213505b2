"""BriLLM (Hai Zhao et al., "BriLLM: Brain-inspired Large Language Model", arXiv 2503.11299), with
BDH's call contract.

"Signal Fully-connected flowing" (SiFu): every token is a node of a directed graph and every
ordered pair (u, v) an edge with its own matrix W_uv (d x d) and bias b_uv (d); each node has a
bias beta_u (d); a (max_len,) holds learned position logits (initialised to 1). For a sequence
u_0, u_1, ...:

    s_0        = GELU(1/d * 1 + beta_{u_0} + PE_0)
    E_{i+1}(v) = GELU(c_i W_{u_i v} + b_{u_i v} + PE_{i+1})             for every candidate v
    c_0 = s_0,   c_i = sum_{j=1..i} softmax(a_{1:i})_j E_j   (i >= 1; E_j = E_j(u_j), the true path)
    energy     l_i(v) = || E_{i+1}(v) ||_2

logits[:, i, v] = l_i(v): the next token is the candidate with the largest energy. PE is the
sinusoidal encoding of width d. Training (model.train() with targets) uses the paper's sampled
softmax: cross-entropy of the true next token against k negatives (`negatives`); evaluation
(model.eval(), or no targets) returns the energies of all V candidates, so the standard
cross-entropy gives a full-vocabulary probability and a held-out loss in the same unit as BDH and
GPT. (The paper reports only the training-set perplexity of its sampled softmax.)

Negatives (`sampling`): "frequent", the k most frequent successors of u_i in the training corpus,
read by `fit_corpus(train_tokens)` (the training loop calls it once, before the first step; ties
and tokens with fewer than k successors are filled with the most frequent tokens overall);
"uniform", k tokens drawn uniformly from the vocabulary at every position and step (with
replacement); "mixed" (default), the ceil(k/2) most frequent successors and floor(k/2) uniform
draws. Until fit_corpus has run, all k are uniform. A negative equal to the true next token is
masked out. "frequent" alone never shows the model a rare successor as a negative, so their
energies only ever go up and the full-vocabulary loss is poor; uniform draws alone are mostly
easy negatives and learn slowly (README, BriLLM section).

Sparse variant (`max_edges` M > 0): only the M most frequent bigrams of the training corpus (all
the bigrams seen, when there are at most M) own an edge matrix; every other pair shares one
matrix, slot 0. The set of owned bigrams is a buffer (`edge_keys`, saved with the weights) that
`fit_corpus` fills; the parameter shapes depend on the config only. `max_edges = 0` is the dense
model: V^2 edges.

Parameters: V^2 (d^2 + d) + V d + max_len dense, (M + 1)(d^2 + d) + V d + max_len sparse
(BriLLMConfig.num_params reports both).

The state is fixed-size: the running sums of the position-weighted context (an online softmax
over a_1..a_i), s_0 and the last token, so decoding costs the same at every position.

Release quirks, each a flag and off by default: `pe_multiply` (the release's sinusoid multiplies
the position by 10000^(2k/d) instead of dividing), `decode_pe_shift` (its decoding uses PE index
i instead of i + 1 for the new edges; here in `step`), `exclude_self` (its decoding never
proposes the current token again; here the logits of v = u_i are -inf in every output, not in
the training loss). The release applies the sampling temperature after the softmax, which has no
effect; bdh.generate applies it to the energies, and nothing reproduces the no-op.

Dimension legend: B batch, T new tokens, d edge width, V vocabulary, K candidates per position,
S edge slots (V^2 dense, M + 1 sparse).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bdh.config import ModelConfig
from bdh.errors import UserError
from bdh.protocol import ModelBase, ModelOutput, next_token_loss
from bdh.state import TensorState

CONTEXTS = ("weighted", "start")
SAMPLINGS = ("mixed", "uniform", "frequent")
# gathered edge matrices per chunk of the candidate product (floats): bounds its memory
GATHER_BUDGET = 1 << 24


@dataclass
class BriLLMConfig(ModelConfig):
    """BriLLM's hyper-parameters (arXiv 2503.11299; the release uses d = 32, k = 400, 32 tokens)."""

    # V: 256 for the byte tokenizer
    vocab_size: int = 256
    # d: width of the signal flowing along the edges
    d: int = 32
    # L_max: learned position logits a_1..a_L; sequences of at most max_len tokens
    max_len: int = 64
    # k: negatives per position in the training loss (0: the full-vocabulary softmax)
    negatives: int = 32
    # how negatives are drawn: "frequent" = the k most frequent successors of the current token in
    # the training corpus (fixed: rare successors are never pushed down, see the docs); "uniform"
    # = k tokens drawn uniformly at every step; "mixed" = the ceil(k/2) most frequent successors
    # and floor(k/2) uniform draws
    sampling: str = "mixed"
    # M: bigrams that own an edge matrix (sparse variant); 0 = dense, every ordered pair owns one
    max_edges: int = 0
    # "weighted": c_i = position-weighted average of the path's edge outputs (the model);
    # "start": c_i = s_0 for every i (the ablation of the sanity bar)
    context: str = "weighted"
    # BriLLM computes in float32 only (the training loop reads this field of every family)
    compute_dtype: str = "float32"
    # release quirks (off: the paper's equations)
    pe_multiply: bool = False
    decode_pe_shift: bool = False
    exclude_self: bool = False

    # tiny: unit tests. small: the 2-core CPU preset; 2,048 edges hold every byte bigram of the
    # default corpus's training split (2,043 of them).
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(d=8, max_len=64, negatives=32, max_edges=512),
        "small": dict(d=32, max_len=64, negatives=32, max_edges=2048),
    }

    def __post_init__(self) -> None:
        self._check_positive_ints("vocab_size", "d", "max_len")
        for name in ("negatives", "max_edges"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                self._fail(name, "be an integer >= 0", value)
        if self.negatives >= self.vocab_size:
            self._fail("negatives", f"be below vocab_size ({self.vocab_size})", self.negatives)
        if self.d % 2:
            self._fail("d", "be even (sinusoidal positions come in sin/cos pairs)", self.d)
        self._check_choice("context", CONTEXTS)
        self._check_choice("sampling", SAMPLINGS)
        self._check_choice("compute_dtype", ("float32",))
        self._check_bools("pe_multiply", "decode_pe_shift", "exclude_self")

    @property
    def max_positions(self) -> int:
        return self.max_len

    @property
    def carries_state(self) -> bool:
        """Positions are absolute (a_1..a_L), so a state cannot go on across batches."""
        return False

    @property
    def sparse(self) -> bool:
        return self.max_edges > 0

    @property
    def edge_slots(self) -> int:
        """S: edge matrices stored (the shared one included)."""
        return self.max_edges + 1 if self.sparse else self.vocab_size ** 2

    def num_params(self, dense: bool | None = None) -> int:
        """S (d^2 + d) + V d + max_len; dense=True: as if every pair owned its edge (V^2 slots)."""
        slots = self.vocab_size ** 2 if dense or (dense is None and not self.sparse) else self.max_edges + 1
        return slots * (self.d ** 2 + self.d) + self.vocab_size * self.d + self.max_len


@dataclass
class BriLLMState(TensorState):
    """After the tokens so far (pos of them): the context's online softmax and what starts a step.

    num = sum_j exp(a_j - top) E_j, den = sum_j exp(a_j - top), top = max_j a_j (j = 1..pos-1),
    so c = num / den; start = s_0; last = the last token u_{pos-1}.
    """

    start: list[torch.Tensor] = dataclasses.field(default_factory=list)  # [(B, d)]
    num: list[torch.Tensor] = dataclasses.field(default_factory=list)  # [(B, d)]
    den: list[torch.Tensor] = dataclasses.field(default_factory=list)  # [(B,)]
    top: list[torch.Tensor] = dataclasses.field(default_factory=list)  # [(B,)]
    last: list[torch.Tensor] = dataclasses.field(default_factory=list)  # [(B,)] int64

    @classmethod
    def empty(cls, batch_size: int, d: int, device=None) -> "BriLLMState":
        zeros = torch.zeros(batch_size, d, device=device)
        return cls(start=[zeros], num=[zeros.clone()], den=[torch.zeros(batch_size, device=device)],
                   top=[torch.full((batch_size,), -math.inf, device=device)],
                   last=[torch.zeros(batch_size, dtype=torch.long, device=device)],
                   pos=torch.zeros(batch_size, dtype=torch.long, device=device))


def sinusoidal_positions(n: int, d: int, multiply: bool = False) -> torch.Tensor:
    """(n, d): PE[p, 2k] = sin(p / 10000^(2k/d)), PE[p, 2k+1] = cos(same); multiply: p * 10000^(2k/d)."""
    p = torch.arange(n, dtype=torch.float64)[:, None]
    scale = 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = p * scale if multiply else p / scale  # n, d/2
    pe = torch.zeros(n, d, dtype=torch.float64)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(angle), torch.cos(angle)
    return pe.float()


class BriLLM(ModelBase):
    model_type = "brillm"
    config_class = BriLLMConfig
    activation_sites = ()

    def __init__(self, config: BriLLMConfig):
        super().__init__()
        self.config = config
        c, S = config, config.edge_slots
        self.edge_weight = nn.Parameter(torch.empty(S, c.d, c.d))  # S, d, d
        self.edge_bias = nn.Parameter(torch.empty(S, c.d))  # S, d
        self.node_bias = nn.Parameter(torch.empty(c.vocab_size, c.d))  # V, d
        self.position_logits = nn.Parameter(torch.empty(c.max_len))  # a_1..a_L
        # sparse: sorted keys u * V + v of the bigrams owning slots 1..M (V^2 = none), from fit_corpus
        keys = torch.full((c.max_edges,), c.vocab_size ** 2, dtype=torch.long) if c.sparse else None
        self.register_buffer("edge_keys", keys)
        # the k most frequent successors of every token (-1: not fitted yet, negatives are uniform)
        successors = torch.full((c.vocab_size, c.negatives), -1, dtype=torch.long) if c.negatives else None
        self.register_buffer("successors", successors)
        self.register_buffer("pe", sinusoidal_positions(c.max_len + 1, c.d, c.pe_multiply), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The release's init: U(-0.5, 0.5) for edge matrices, edge and node biases; a = 1."""
        for p in (self.edge_weight, self.edge_bias, self.node_bias):
            nn.init.uniform_(p, -0.5, 0.5)
        nn.init.ones_(self.position_logits)

    # ----------------------------------------------------------------------------------------
    # what the model reads off the training corpus

    @property
    def fitted(self) -> bool:
        """Whether fit_corpus has run (negatives from counts; sparse edges assigned)."""
        if self.successors is not None:
            return bool(self.successors[0, 0] >= 0)
        return self.edge_keys is None or bool(self.edge_keys[0] < self.config.vocab_size ** 2)

    @torch.no_grad()
    def fit_corpus(self, tokens) -> None:
        """Bigram counts of the training tokens (1-D ids) -> owned edges (sparse) and negatives."""
        c, V = self.config, self.config.vocab_size
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 1 or len(ids) < 2:
            raise UserError("BriLLM.fit_corpus needs a 1-D array of at least 2 token ids")
        if ids.min() < 0 or ids.max() >= V:
            raise UserError(f"BriLLM.fit_corpus: token ids must lie in [0, {V})")
        keys, counts = np.unique(ids[:-1] * V + ids[1:], return_counts=True)
        if c.sparse:
            # the M most frequent bigrams (ties: smaller key first), stored sorted by key
            order = np.lexsort((keys, -counts))[:c.max_edges]
            owned = np.sort(keys[order])
            self.edge_keys.fill_(V * V)
            self.edge_keys[:len(owned)] = torch.from_numpy(owned).to(self.edge_keys.device)
        if c.negatives:
            self.successors.copy_(frequent_successors(keys, counts, np.bincount(ids, minlength=V), V, c.negatives))

    def seen_bigrams(self) -> int:
        """How many bigrams own an edge matrix (V^2 dense)."""
        if self.edge_keys is None:
            return self.config.vocab_size ** 2
        return int((self.edge_keys < self.config.vocab_size ** 2).sum())

    def parameter_report(self) -> dict[str, int]:
        """The parameter count both ways: as stored (sparse) and as the dense model would have it."""
        return {"parameters": self.num_params(), "dense_equivalent": self.config.num_params(dense=True),
                "edge_matrices": self.config.edge_slots, "bigrams_owning_an_edge": self.seen_bigrams()}

    # ----------------------------------------------------------------------------------------
    # sizes and state

    def num_params(self, embeddings: bool = True) -> int:
        """All parameters, or without the node biases beta (BriLLM's per-token vectors)."""
        total = sum(p.numel() for p in self.parameters())
        return total if embeddings else total - self.node_bias.numel()

    def init_state(self, batch_size: int, device=None) -> BriLLMState:
        device = device if device is not None else self.edge_weight.device
        return BriLLMState.empty(batch_size, self.config.d, device)

    # ----------------------------------------------------------------------------------------
    # forward

    def forward(self, idx: torch.Tensor, targets=None, state: BriLLMState | None = None,
                return_state: bool = True) -> ModelOutput:
        """idx (B, T) -> ModelOutput(logits (B, T, V) energies, loss, state after the last token).

        In training mode with targets, the loss is the sampled softmax over the true next token
        and k negatives, and the logits hold those candidates' energies (-inf elsewhere); in eval
        mode, or with negatives = 0, all V energies and the full-vocabulary cross-entropy.
        """
        return self._run(idx, targets, state, return_state, pe_shift=0)

    @torch.no_grad()
    def step(self, idx: torch.Tensor, state: BriLLMState) -> ModelOutput:
        """One token per sequence (B, 1) on top of the state: the sequence path with T = 1."""
        return self._run(idx, None, state, True, pe_shift=int(self.config.decode_pe_shift))

    def _run(self, idx, targets, state, return_state, pe_shift: int) -> ModelOutput:
        B, T = idx.shape
        state = self._check_state(state, B, idx.device)
        pos = state.pos[:, None] + torch.arange(T, device=idx.device)  # B, T: absolute positions
        if int(pos.max()) >= self.config.max_len:
            raise UserError(f"position {int(pos.max())} is beyond max_len {self.config.max_len} of this BriLLM "
                            "(learned position logits); use shorter sequences or a larger max_len")
        contexts, new_state = self.path(idx, state, pos, pe_shift)  # B, T, d
        sampled = self.training and targets is not None and self.config.negatives > 0
        pe_pos = (pos + 1 - pe_shift).clamp(min=0)  # B, T: PE index of the candidate edges
        if sampled:
            candidates, valid = self.sampled_candidates(idx, targets)  # B, T, K
            energies = self.energies(contexts, idx, candidates, pe_pos).masked_fill(~valid, -math.inf)
        else:
            candidates = torch.arange(self.config.vocab_size, device=idx.device).expand(B, T, -1)
            energies = self.all_energies(contexts, idx, pe_pos)  # B, T, V
            if self.config.exclude_self:  # the outputs only; the training loss keeps repeats
                energies = energies.masked_fill(candidates == idx[..., None], -math.inf)
        if sampled:
            logits = torch.full((B, T, self.config.vocab_size), -math.inf, device=idx.device)
            logits = logits.scatter_reduce(2, candidates, energies.detach(), reduce="amax")  # masked: -inf
            loss = F.cross_entropy(energies.flatten(0, 1), torch.zeros_like(targets).flatten().masked_fill(
                targets.flatten() < 0, -1), ignore_index=-1)
        else:
            logits, loss = energies, next_token_loss(energies, targets)
        return ModelOutput(logits=logits, loss=loss, state=new_state if return_state else None)

    def path(self, idx, state: BriLLMState, pos, pe_shift: int):
        """The true path, token by token: the contexts c (B, T, d) and the state after it.

        At position p, token u: p = 0 starts the path (c = s_0); p >= 1 adds the edge from the
        previous token, E_p = GELU(c_{p-1} W + b + PE_p), to the online softmax of a_1..a_p.
        """
        c = self.config
        start, num, den, top, last = state.start[0], state.num[0], state.den[0], state.top[0], state.last[0]
        # c_{p-1} of the state's last token: s_0 after one token (unused where p = 0)
        after_one = (state.pos <= 1)[:, None]
        prev = torch.where(after_one, start, num / den.clamp_min(1e-30)[:, None]) if c.context == "weighted" else start
        # everything indexed is gathered once (one backward each), then unbound per step
        slots = self.edge_slot(torch.cat([last[:, None], idx[:, :-1]], dim=1), idx)  # B, T: edge into each token
        weights = self.edge_weight[slots].unbind(1)  # T x (B, d, d)
        shifts = (self.edge_bias[slots] + self.pe[(pos - pe_shift).clamp(min=0)]).unbind(1)  # T x (B, d)
        starts = F.gelu(1.0 / c.d + self.node_bias[idx] + self.pe[0]).unbind(1)  # T x (B, d): s_0 if p = 0
        logits_a = self.position_logits[(pos - 1).clamp(min=0)].unbind(1)  # T x (B,): a_p
        firsts = (pos == 0).unbind(1)  # T x (B,)
        contexts = []
        for W, shift, s0, a, first in zip(weights, shifts, starts, logits_a, firsts):
            edge = F.gelu(torch.bmm(prev[:, None], W)[:, 0] + shift)  # B, d: E_p
            # online softmax; where p = 0 nothing is added (num = den = 0 there, so top may move)
            new_top = torch.maximum(top, a)
            scale = torch.exp(top - new_top)  # 0 while top = -inf
            weight = torch.exp(a - new_top)
            first = first[:, None]
            num = torch.where(first, num, num * scale[:, None] + weight[:, None] * edge)
            den = torch.where(first[:, 0], den, den * scale + weight)
            top, start = new_top, torch.where(first, s0, start)
            if c.context == "start":
                prev = start
            else:
                prev = torch.where(first, s0, num / den.clamp_min(1e-30)[:, None])
            contexts.append(prev)
        last = idx[:, -1]
        new_state = BriLLMState(start=[start], num=[num], den=[den], top=[top], last=[last], pos=pos[:, -1] + 1)
        return torch.stack(contexts, dim=1), new_state

    def energies(self, contexts, idx, candidates, pe_pos):
        """||GELU(c W_{u v} + b_{u v} + PE)|| for every candidate v: (B, T, K), one batched product.

        contexts (B, T, d), idx (B, T) the current tokens u, candidates (B, T, K), pe_pos (B, T).
        The gathered matrices are processed in chunks of positions to bound their memory.
        """
        B, T, K = candidates.shape
        d = self.config.d
        slots = self.edge_slot(idx[..., None], candidates).flatten(0, 1)  # N, K
        ctx, pe = contexts.flatten(0, 1), self.pe[pe_pos.flatten()]  # N, d
        chunk = max(1, GATHER_BUDGET // (K * d * d))
        out = []
        for i in range(0, slots.shape[0], chunk):
            s = slots[i:i + chunk]
            h = torch.matmul(ctx[i:i + chunk, None, None], self.edge_weight[s])[:, :, 0]  # n, K, d
            h = F.gelu(h + self.edge_bias[s] + pe[i:i + chunk, None])
            out.append(torch.linalg.vector_norm(h, dim=-1))  # n, K
        return torch.cat(out).view(B, T, K)

    def all_energies(self, contexts, idx, pe_pos):
        """(B, T, V): the energy of every candidate. Sparse: each source token's owned edges are
        computed one by one; every other candidate has slot 0's energy, computed once a position."""
        c, V = self.config, self.config.vocab_size
        B, T = idx.shape
        if not c.sparse:
            return self.energies(contexts, idx, torch.arange(V, device=idx.device).expand(B, T, -1), pe_pos)
        h = F.gelu(contexts @ self.edge_weight[0] + self.edge_bias[0] + self.pe[pe_pos])  # B, T, d
        shared = torch.linalg.vector_norm(h, dim=-1)  # B, T
        owned = self.owned_successors()[idx]  # B, T, Kmax (-1: none)
        if owned.shape[-1] == 0:
            return shared[..., None].expand(B, T, V).clone()
        energies = self.energies(contexts, idx, owned.clamp(min=0), pe_pos)  # B, T, Kmax
        # owned energies over the shared one; the padding goes to an extra column V, dropped
        columns = torch.where(owned >= 0, owned, V)
        base = torch.cat([shared[..., None].expand(B, T, V), shared.new_zeros(B, T, 1)], dim=-1)
        return base.scatter(2, columns, energies)[..., :V]

    def owned_successors(self) -> torch.Tensor:
        """(V, Kmax): the successors v of every token u whose bigram owns an edge (-1 padding)."""
        V = self.config.vocab_size
        keys = self.edge_keys[self.edge_keys < V * V]  # sorted, so grouped by source
        u, v = keys // V, keys % V
        counts = torch.bincount(u, minlength=V)
        rank = torch.arange(len(keys), device=keys.device) - (torch.cumsum(counts, 0) - counts)[u]
        table = torch.full((V, int(counts.max()) if len(keys) else 0), -1, dtype=torch.long, device=keys.device)
        table[u, rank] = v
        return table

    def edge_slot(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The slot of edge (u, v), broadcast: u * V + v dense; sparse 1..M if the bigram owns one, else 0."""
        V = self.config.vocab_size
        key = u * V + v
        if self.edge_keys is None:
            return key
        at = torch.searchsorted(self.edge_keys, key.contiguous()).clamp(max=self.config.max_edges - 1)
        return torch.where(self.edge_keys[at] == key, at + 1, 0)

    def sampled_candidates(self, idx, targets):
        """(B, T, K = 1 + k) candidates, the true next token first, and which of them count."""
        c = self.config
        k = c.negatives
        frequent = {"frequent": k, "mixed": k - k // 2, "uniform": 0}[c.sampling] if self.fitted else 0
        negatives = torch.cat([self.successors[idx][..., :frequent],  # B, T, frequent
                               torch.randint(0, c.vocab_size, (*idx.shape, k - frequent), device=idx.device)], dim=-1)
        true = targets.clamp(min=0)[..., None]  # B, T, 1 (ignored targets: any token, masked by the loss)
        candidates = torch.cat([true, negatives], dim=-1)
        valid = torch.cat([torch.ones_like(true, dtype=torch.bool), negatives != true], dim=-1)
        return candidates, valid

    def _check_state(self, state, batch_size: int, device) -> BriLLMState:
        if state is None:
            return self.init_state(batch_size, device)
        if not isinstance(state, BriLLMState):
            raise UserError(f"BriLLM needs a BriLLMState, got {type(state).__name__}")
        if state.batch_size != batch_size or tuple(state.num[0].shape) != (batch_size, self.config.d):
            raise UserError(f"state does not fit this model: expected (B, d) = ({batch_size}, {self.config.d}), "
                            f"got {tuple(state.num[0].shape)}")
        return state


def frequent_successors(keys: np.ndarray, counts: np.ndarray, unigram: np.ndarray, V: int, k: int) -> torch.Tensor:
    """(V, k): each token's k most frequent successors (bigram keys u * V + v with counts), ties
    and missing ones filled by the most frequent tokens overall (then the smaller id)."""
    table = np.empty((V, k), dtype=np.int64)
    # rank every token by overall frequency: 0 = most frequent
    by_freq = np.lexsort((np.arange(V), -unigram))
    fill_rank = np.empty(V, dtype=np.int64)
    fill_rank[by_freq] = np.arange(V)
    rows = 256
    for u0 in range(0, V, rows):
        n = min(rows, V - u0)
        score = np.zeros((n, V), dtype=np.float64)  # bigram count, then the fill order as a fraction
        inside = (keys // V >= u0) & (keys // V < u0 + n)
        score[keys[inside] // V - u0, keys[inside] % V] = counts[inside]
        score -= fill_rank[None] / V  # in (-1, 0]: breaks ties, never beats one more count
        table[u0:u0 + n] = np.argsort(-score, axis=1, kind="stable")[:, :k]
    return torch.from_numpy(table)
