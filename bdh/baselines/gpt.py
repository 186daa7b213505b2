"""GPT-2-style baseline (the paper's Transformer baseline, its Section 4.2), with BDH's call contract.

token embedding (+ learned positions, or ALiBi biases inside attention) -> n_layer pre-LN blocks
of causal softmax self-attention and a 4D GELU MLP -> final LN -> lm_head (tied to the token
embedding unless tie_embeddings=False). Parameter names follow nanoGPT's.

The state is a KV cache. With kv_cache_size K > 0 every query sees itself and at most the K
keys before it, in one parallel forward as in a cached, piecewise one, so a model can train on
consecutive minibatches with the (detached) cache carried across them, like BDH's state.

Dimension legend: B batch, T new tokens, S cached entries, L n_layer, nh heads, hd head size,
D n_embd, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bdh.config import ModelConfig
from bdh.errors import UserError
from bdh.ops.alibi import alibi_slopes
from bdh.precision import DTYPE_NAMES, autocast_for
from bdh.protocol import ModelBase, ModelOutput, next_positions, next_token_loss
from bdh.state import TensorState

POS_ENCODINGS = ("learned", "alibi")


@dataclass
class GPTConfig(ModelConfig):
    """nanoGPT's hyper-parameters, plus the ALiBi / carried-cache variant of the paper's comparison."""

    # number of transformer blocks
    n_layer: int = 6
    # D: residual stream width
    n_embd: int = 384
    # nh: attention heads; head size hd = D / nh
    n_head: int = 6
    # V: 256 for the byte tokenizer
    vocab_size: int = 256
    # most positions a sequence may reach with learned position embeddings (unused by ALiBi)
    block_size: int = 1024
    # dropout on attention weights, residual branches and embeddings, training only
    dropout: float = 0.0
    # biases in the linear layers and LayerNorms (GPT-2 has them)
    bias: bool = True
    # "learned": GPT-2 position embeddings; "alibi": distance-only attention biases, no length limit
    pos_encoding: str = "learned"
    # K: each query sees at most the K previous keys, and the cache keeps the last K (FIFO); 0 = all
    kv_cache_size: int = 0
    # lm_head shares the token embedding matrix (GPT-2 does)
    tie_embeddings: bool = True
    # matmul dtype under autocast; logits and the loss stay in float32
    compute_dtype: str = "float32"

    # tiny: unit tests (< 100k parameters). small and paper-25m: within 5% of the BDH presets of
    # the same name (bdh.baselines.match.match_gpt_config picks these shapes; tests check the
    # counts). gpt2: the 124M GPT-2 shape (pass vocab_size for a BPE tokenizer).
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(n_layer=2, n_embd=32, n_head=2, block_size=64),
        "small": dict(n_layer=4, n_embd=192, n_head=4, block_size=512),
        "paper-25m": dict(n_layer=8, n_embd=512, n_head=8, block_size=512, dropout=0.1),
        "gpt2": dict(n_layer=12, n_embd=768, n_head=12, block_size=1024),
    }

    def __post_init__(self) -> None:
        self._check_positive_ints("n_layer", "n_embd", "n_head", "vocab_size", "block_size")
        k = self.kv_cache_size
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            self._fail("kv_cache_size", "be an integer >= 0 (0 = unlimited)", k)
        self._check_divisible("n_embd", "n_head")
        self._check_probability("dropout")
        self._check_bools("bias", "tie_embeddings")
        self._check_choice("pos_encoding", POS_ENCODINGS)
        self._check_choice("compute_dtype", DTYPE_NAMES)

    @property
    def max_positions(self) -> int | None:
        """Learned position embeddings end at block_size; ALiBi has no limit."""
        return self.block_size if self.pos_encoding == "learned" else None

    @property
    def carries_state(self) -> bool:
        """A carried cache needs positions that go on (ALiBi) and a bounded window (kv_cache_size)."""
        return self.pos_encoding == "alibi" and self.kv_cache_size > 0

    @property
    def head_size(self) -> int:
        """hd."""
        return self.n_embd // self.n_head

    def num_params(self, embeddings: bool = True) -> int:
        """The model's parameter count, from the fields alone (GPT(config).num_params() agrees)."""
        D, V, b = self.n_embd, self.vocab_size, int(self.bias)
        norm = D * (1 + b)
        block = 12 * D * D + 9 * D * b + 2 * norm  # qkv 3D^2, proj D^2, mlp 8D^2 (+ 9D biases), 2 LN
        body = self.n_layer * block + norm  # + final LN
        if not embeddings:
            return body
        positions = self.block_size * D if self.pos_encoding == "learned" else 0
        return body + V * D * (1 if self.tie_embeddings else 2) + positions


@dataclass
class KVCache(TensorState):
    """Keys and values of every layer, plus the absolute position of the next token.

    Entries are right-aligned: slot j of S holds the token S - j places before the next one, in
    every row, and a row whose sequence is shorter than S (pos < S) leaves its first S - pos
    slots empty (masked). Sequences of different lengths therefore share one tensor.
    """

    k: list[torch.Tensor] = dataclasses.field(default_factory=list)  # L x (B, nh, S, hd)
    v: list[torch.Tensor] = dataclasses.field(default_factory=list)  # L x (B, nh, S, hd)

    @classmethod
    def empty(cls, n_layer: int, batch_size: int, n_head: int, head_size: int, device=None,
              dtype: torch.dtype = torch.float32) -> "KVCache":
        def blank():
            return torch.zeros(batch_size, n_head, 0, head_size, device=device, dtype=dtype)

        return cls(k=[blank() for _ in range(n_layer)], v=[blank() for _ in range(n_layer)],
                   pos=torch.zeros(batch_size, dtype=torch.long, device=device))

    @property
    def size(self) -> int:
        """S: cached slots per row (some may be empty in rows with pos < S)."""
        return self.k[0].shape[2] if self.k else 0

    @classmethod
    def cat(cls, states: list["KVCache"]) -> "KVCache":
        """Stack the caches of separate sequences into one batch; shorter ones are left-padded."""
        S = max(s.size for s in states)

        def pad(t):  # B, nh, S_i, hd -> B, nh, S, hd
            return F.pad(t, (0, 0, S - t.shape[2], 0))

        return super().cat([KVCache(k=[pad(t) for t in s.k], v=[pad(t) for t in s.v], pos=s.pos) for s in states])

    def reset_rows(self, mask: torch.Tensor) -> "KVCache":
        """Start the rows where mask (B,) is True over: position 0, so their old entries are masked."""
        return KVCache(k=list(self.k), v=list(self.v), pos=torch.where(mask, 0, self.pos))

    def filled(self) -> torch.Tensor:
        """(B, S) True where a slot holds a token of the row's sequence."""
        back = torch.arange(self.size, 0, -1, device=self.pos.device)  # S: how far back each slot is
        return back[None] <= self.pos[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        D = config.n_embd
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(D, 3 * D, bias=config.bias)
        self.c_proj = nn.Linear(D, D, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask, past):
        """x (B, T, D), mask None (plain causal) or float (.., T, S+T), past (k, v) or None."""
        B, T, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)  # B, T, D each
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))  # B, nh, T, hd
        if past is not None:
            k = torch.cat([past[0].to(k.dtype), k], dim=2)  # B, nh, S+T, hd
            v = torch.cat([past[1].to(v.dtype), v], dim=2)
        p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), dropout_p=p)  # B, nh, T, hd
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        D = config.n_embd
        self.c_fc = nn.Linear(D, 4 * D, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * D, D, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask, past):
        a, kv = self.attn(self.ln_1(x), mask, past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


class GPT(ModelBase):
    model_type = "gpt"
    config_class = GPTConfig
    activation_sites = ()

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        D = config.n_embd
        modules = dict(wte=nn.Embedding(config.vocab_size, D), drop=nn.Dropout(config.dropout),
                       h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                       ln_f=nn.LayerNorm(D, bias=config.bias))
        if config.pos_encoding == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, D)
        self.transformer = nn.ModuleDict(modules)
        # tied: the logits reuse wte.weight, so the weight is stored once (safetensors refuses aliases)
        self.lm_head = None if config.tie_embeddings else nn.Linear(D, config.vocab_size, bias=False)
        slopes = torch.tensor(alibi_slopes(config.n_head)) if config.pos_encoding == "alibi" else None
        self.register_buffer("alibi_slopes", slopes, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02^2), residual projections scaled by 1/sqrt(2 n_layer), zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.transformer.h:
            nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=std)
            nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=std)

    # sizes
    def num_params(self, embeddings: bool = True) -> int:
        """All parameters, or without token/position embeddings and an untied lm_head."""
        total = sum(p.numel() for p in self.parameters())
        if embeddings:
            return total
        total -= self.transformer.wte.weight.numel()
        if "wpe" in self.transformer:
            total -= self.transformer.wpe.weight.numel()
        if self.lm_head is not None:
            total -= self.lm_head.weight.numel()
        return total

    def init_state(self, batch_size: int, device=None) -> KVCache:
        c = self.config
        device = device if device is not None else self.transformer.wte.weight.device
        return KVCache.empty(c.n_layer, batch_size, c.n_head, c.head_size, device)

    # forward
    def forward(self, idx: torch.Tensor, targets=None, state: KVCache | None = None, return_state: bool = True):
        """idx (B, T) -> ModelOutput(logits (B, T, V), loss or None, KV cache after the last token).

        With a state, the tokens continue the sequences it holds (positions continue too). Pass
        return_state=False to skip building the outgoing cache when it is not needed.
        """
        B, T = idx.shape
        self._check_state(state, B)
        with autocast_for(self.config.compute_dtype, idx.device):
            logits, kv = self._layers(idx, state, return_state)
        new_state = None
        if return_state:
            new_state = KVCache(k=[k for k, _ in kv], v=[v for _, v in kv], pos=next_positions(state, B, T, idx.device))
        return ModelOutput(logits=logits.float(), loss=next_token_loss(logits, targets), state=new_state)

    def _layers(self, idx, state, return_state):
        x = self.transformer.wte(idx)  # B, T, D
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(self._positions(idx, state))
        x = self.transformer.drop(x)
        mask = self._mask(idx.shape[1], state)
        K = self.config.kv_cache_size
        kv = []
        for layer, block in enumerate(self.transformer.h):
            past = None if state is None else (state.k[layer], state.v[layer])
            x, (k, v) = block(x, mask, past)  # k, v: B, nh, S+T, hd
            if return_state:
                kv.append((k[:, :, -K:], v[:, :, -K:]) if K else (k, v))
        x = self.transformer.ln_f(x)
        weight = self.transformer.wte.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, weight), kv  # B, T, V

    def _positions(self, idx, state):
        """Absolute positions of the new tokens: (1 | B, T)."""
        T = idx.shape[1]
        steps = torch.arange(T, device=idx.device)
        last = T if state is None else int(state.pos.max()) + T
        if last > self.config.block_size:
            raise UserError(f"position {last - 1} is beyond block_size {self.config.block_size} of this GPT "
                            "(learned positions); use shorter sequences or pos_encoding='alibi'")
        return steps[None] if state is None else state.pos[:, None] + steps

    def _mask(self, T: int, state: KVCache | None):
        """None for the plain causal case, else a float mask (1|B, 1|nh, T, S+T) added to the scores.

        Key slot s sits d = S + t - s tokens before query t, in every row (the cache is
        right-aligned); ALiBi adds -m_h * d, the window drops d > K, empty cache slots drop out.
        """
        c = self.config
        K, alibi = c.kv_cache_size, c.pos_encoding == "alibi"
        S = 0 if state is None else state.size
        if S == 0 and not alibi and (K == 0 or K >= T - 1):
            return None
        device = self.transformer.wte.weight.device
        t = torch.arange(T, device=device)[:, None]
        s = torch.arange(S + T, device=device)[None]
        d = S + t - s  # T, S+T
        allowed = (d >= 0) & (d <= K) if K else d >= 0
        mask = torch.zeros(T, S + T, device=device).masked_fill(~allowed, float("-inf"))
        if alibi:
            mask = mask - self.alibi_slopes.float().view(-1, 1, 1) * d.clamp(min=0)  # nh, T, S+T
        if S and bool((state.pos < S).any()):
            present = torch.cat([state.filled(), torch.ones(state.batch_size, T, dtype=torch.bool, device=device)], dim=1)
            mask = mask.masked_fill(~present[:, None, None, :], float("-inf"))  # B, 1|nh, T, S+T
        return mask

    def _check_state(self, state: KVCache | None, batch_size: int) -> None:
        if state is None:
            return
        c = self.config
        if not isinstance(state, KVCache):
            raise UserError(f"GPT needs a KVCache state, got {type(state).__name__}")
        expected = (batch_size, c.n_head, c.head_size)
        got = tuple(state.k[0].shape[:2]) + tuple(state.k[0].shape[3:]) if state.k else ()
        if len(state.k) != c.n_layer or len(state.v) != c.n_layer or got != expected or state.batch_size != batch_size:
            raise UserError(f"state does not fit this model: expected {c.n_layer} layers of (B, nh, S, hd) = "
                            f"({batch_size}, {c.n_head}, S, {c.head_size}), got {len(state.k)} of {tuple(state.k[0].shape) if state.k else ()}")

    @torch.no_grad()
    def step(self, idx: torch.Tensor, state: KVCache) -> ModelOutput:
        """One token per sequence (B, 1) on top of the cache: the sequence path with T = 1 (the
        cache grows by concatenation, so a new one is returned)."""
        return self(idx, state=state)
