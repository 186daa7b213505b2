"""BDH-GPU: embed -> n_layer passes of ONE shared layer -> lm_head (the paper's Section 3, Eq. 8).

Layouts (`config.layout`), per token t and layer l = 1..L, LN = LayerNorm without weights (the
identity when layernorm=False), U = the per-head decay lambda_h times the RoPE rotation:
- "reference" (the authors' code): x_l = relu(D_x v_{l-1}), a_l = rho_{t-1,l} x_l (read before
  the write rho_{t,l} = (rho_{t-1,l} + v_{l-1} x_l^T) U), y_l = relu(D_y LN(a_l)) * x_l and the
  d-space residual v_l = LN(v_{l-1} + LN(E y_l)).
- "eq8" (the paper's Eq. 8; Eq. 7, BDH-Normfree, with layernorm=False): the residual lives in
  neuron space only. With v*_l = LN(E y_l) the d-vector layer l hands on:
      rho_{t,l} = (rho_{t-1,l} + v*_{t,l-1} x_{t,l}^T) U
      x_{t,l}   = x_{t,l-1} + relu(D_x v*_{t,l-1})
      y_{t,l}   = relu(D_y LN(rho_{t-1,l} x_{t,l})) * x_{t,l}
  What enters the first layer: v*_{t,0} = LN(embed(token_t)) and x_{t,0} = 0, so
  x_{t,1} = relu(D_x v*_{t,0}). What lm_head reads: v*_{t,L} = LN(E y_{t,L}), logits = v*_{t,L} f_d.
- "xacc-residual": x accumulated as in "eq8" and the d-space residual of "reference"; in neither
  the code nor the paper (it is what "eq8" computed before it was made the paper's Eq. 8).
Only "reference" runs through the fused layer; the others run op by op (see `engine`).

Variants (`config.variant`): "gpu" is BDH-GPU. "gpu-prime" is BDH-GPU', which the paper
describes only as BDH-GPU with "xLSTM-like gating of states and logits" that "merges next-token
predictions from all layers"; these equations are OUR reconstruction, in any layout:
    i_{t,l,h} = sigmoid(v_{t,l-1} . w^i_h + b^i_h),  f_{t,l,h} = sigmoid(v_{t,l-1} . w^f_h + b^f_h)
    read a_{t,l,h} = rho_{t-1,l,h} x_{t,l,h}, then rho_{t,l,h} = f lambda_h (rho_{t-1,l,h} + i v_{t,l-1} x^T) R
    g_{t,l} = softmax over l of (v_{t,l} . w^g + b^g_l),   logits_t = (sum_l g_{t,l} v_{t,l}) f_d
with v_{t,l} the d-vector layer l hands on (v_{t,0} the embedding) and R the RoPE rotation;
the gates' weights start N(0, 0.02^2), b^i = b^f = GATE_BIAS (gates near 1: BDH-GPU at the
start), b^g = 0. It runs op by op (bdh.ops.gated) and decodes densely (gated_decode_layer).

Parameter names follow the authors' state_dict (so their checkpoints load as they are):
    encoder   D_x (nh, D, N)   d-space -> neuron space, gives x
    encoder_v D_y (nh, D, N)   attention read-out -> neuron space, gives y
    decoder   E   (nh*N, D)    neuron space -> d-space
    embed     f_e (V, D), lm_head f_d (D, V) (not tied), freqs (nh, N) RoPE cycles per token.

Two explicit paths (docs/architecture.md):
- `forward(idx, targets, state)`: a sequence. Each layer runs either the fused layer
  (bdh.ops.layer, `config.fused`) or op by op with the attention form `config.attn_impl`;
  `engine(T)` says which (from the config, and for the fused layer's attention from
  bdh.ops.plan: the shape and the machine's calibration).
- `step(idx, state)`: one token per sequence for decoding, the state updated in place, dense or
  sparse-aware (bdh.ops.recurrent.decode_layer / sparse_decode_layer).
Activations are seen only on request: inside `with model.capture(callback):` every forward and
step calls callback(site, layer, tensor) for x (B, nh, T, N), a (B, nh, T, D) and y (B, nh, T, N),
and the op-by-op layer runs (the fused layer keeps no activations to show).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bdh.config import BDHConfig
from bdh.errors import UserError
from bdh.ops import apply_rope_complex, get_attention, pairs_share_frequencies, pick_attention, rope_freqs, rope_rotors
from bdh.ops.chunked import CHUNK_SIZE
from bdh.ops.gated import gated_decode_layer, get_gated_attention
from bdh.ops.layer import Rotors, draw_kept, fused_layer, norm
from bdh.ops.plan import (Plan, batched_products, best_of_each, fused_pays, plan_for, sparse_below, synchronize,
                          times_layer_forms)
from bdh.ops.recurrent import active_neurons, decode_layer, decode_neurons, rotate_rows, sparse_decode_layer
from bdh.protocol import ModelBase, ModelOutput, next_positions, next_token_loss
from bdh.precision import autocast_for
from bdh.state import BDHState

REFERENCE_KEYS = ("encoder", "encoder_v", "decoder", "embed.weight", "lm_head", "attn.freqs")
Capture = Callable[[str, int, torch.Tensor], None]
GATE_BIAS = 4.0  # BDH-GPU' input and forget gates start at sigmoid(4) = 0.98


class BDH(ModelBase):
    model_type = "bdh"
    config_class = BDHConfig
    activation_sites = ("x", "a", "y")

    def __init__(self, config: BDHConfig):
        super().__init__()
        self.config = config
        nh, D, N, V = config.n_head, config.n_embd, config.neurons_per_head, config.vocab_size
        self.embed = nn.Embedding(V, D)
        self.encoder = nn.Parameter(torch.empty(nh, D, N))
        self.encoder_v = nn.Parameter(torch.empty(nh, D, N))
        self.decoder = nn.Parameter(torch.empty(nh * N, D))
        self.lm_head = nn.Parameter(torch.empty(D, V))
        if config.variant == "gpu-prime":
            self.gate_in = nn.Parameter(torch.empty(D, nh))
            self.gate_in_bias = nn.Parameter(torch.empty(nh))
            self.gate_forget = nn.Parameter(torch.empty(D, nh))
            self.gate_forget_bias = nn.Parameter(torch.empty(nh))
            self.logit_gate = nn.Parameter(torch.empty(D))
            self.logit_gate_bias = nn.Parameter(torch.empty(config.n_layer))
        self.register_buffer("freqs", rope_freqs(N, config.rope_theta).expand(nh, N).clone())
        decay = None if config.decay is None else torch.tensor(config.decay, dtype=torch.float32)
        self.register_buffer("decay", decay, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self._capture: Capture | None = None
        self._dy_rows = None
        self._rotors = None  # (key, Rotors) for positions 0..T-1: _rope
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02^2) for every weight, as the reference code."""
        for weight in (self.embed.weight, self.encoder, self.encoder_v, self.decoder, self.lm_head):
            nn.init.normal_(weight, mean=0.0, std=0.02)
        if self.config.variant == "gpu-prime":
            for weight in (self.gate_in, self.gate_forget, self.logit_gate):
                nn.init.normal_(weight, mean=0.0, std=0.02)
            nn.init.constant_(self.gate_in_bias, GATE_BIAS)
            nn.init.constant_(self.gate_forget_bias, GATE_BIAS)
            nn.init.zeros_(self.logit_gate_bias)

    # the protocol (bdh.protocol.LanguageModel)
    def num_params(self, embeddings: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total if embeddings else total - self.embed.weight.numel() - self.lm_head.numel()

    def init_state(self, batch_size: int, device=None) -> BDHState:
        c = self.config
        device = device if device is not None else self.lm_head.device
        return BDHState.zeros(c.n_layer, batch_size, c.n_head, c.neurons_per_head, c.n_embd, device)

    @contextmanager
    def capture(self, callback: Capture):
        """Call callback(site, layer, tensor) for x, a and y of every layer while inside (bdh.interp)."""
        previous, self._capture = self._capture, callback
        try:
            yield self
        finally:
            self._capture = previous

    # the sequence path
    def forward(self, idx: torch.Tensor, targets=None, state: BDHState | None = None, return_state: bool = True):
        """idx (B, T) -> ModelOutput(logits (B, T, V), loss or None, state after the last token).

        With a state, the tokens continue the sequences it holds (positions continue too); the
        state passed in is not modified. Pass return_state=False to skip building the outgoing
        state when it is not needed (training).
        """
        B, T = idx.shape
        self._check_state(state, B)
        with autocast_for(self.config.compute_dtype, idx.device):
            logits, rho = self._layers(idx, state, return_state)
        new_state = BDHState(rho=rho, pos=next_positions(state, B, T, idx.device)) if return_state else None
        return ModelOutput(logits=logits.float(), loss=next_token_loss(logits, targets), state=new_state)

    def engine(self, T: int, has_state: bool = False, wants_state: bool = True, batch: int = 1) -> str:
        """How forward computes `batch` sequences of T tokens: "fused:<plan>" (the fused layer,
        its attention as bdh.ops.plan names it: direct/b or chunked/C), or the op-by-op attention
        form ("naive", "chunked", "recurrent")."""
        plan = self._fused_plan(batch, T, has_state, wants_state)
        if plan:
            return f"fused:{plan}"
        c = self.config
        if c.attn_impl != "auto":
            return c.attn_impl
        return pick_attention(T, c.neurons_per_head, c.n_embd, self._chunk_size(), has_state, wants_state)

    def _chunk_size(self) -> int:
        """The chunk length of the op-by-op chunked form."""
        return CHUNK_SIZE if self.config.chunk_size == "auto" else self.config.chunk_size

    def _fused_plan(self, B: int, T: int, has_state: bool, wants_state: bool) -> Plan | None:
        """How the fused layer runs B sequences of T tokens, or None where the op-by-op layer runs.

        fused=False: never. "auto": wherever the fused layer computes the same thing (float32,
        the reference layout, no detach_kv, attn_impl auto or chunked), unless activations are
        being captured or torch.compile is tracing (it fuses the op-by-op layer itself), and, off
        the CPU, unless the op-by-op layer was timed faster for this shape (_fused_pays). With
        chunk_size "auto" the plan is bdh.ops.plan's for the shape; with a number, chunks of
        min(chunk_size, T) when that divides T. fused=True: the same, but an error where it
        cannot run.
        """
        c = self.config
        if c.fused is False:
            return None
        auto = c.chunk_size == "auto"
        C = T if auto else min(c.chunk_size, T)
        why = None
        if c.attn_impl not in ("auto", "chunked") or c.layout != "reference" or c.detach_kv or c.variant != "gpu":
            why = "attn_impl auto or chunked, the reference layout, variant gpu and no detach_kv"
        elif c.compute_dtype != "float32":
            why = "compute_dtype float32"
        elif T < 2 or T % C:
            why = f"chunk_size ({c.chunk_size}) dividing the sequence length ({T})"
        elif self._capture is not None:
            why = "no activation capture"
        elif torch.compiler.is_compiling():
            return None
        if why is None:
            if c.fused == "auto" and times_layer_forms(self.encoder.device) and \
                    not self._fused_pays(B, T, has_state, wants_state):
                return None
            if not auto:
                return Plan(C)
            return plan_for(B, T, c.n_head, c.neurons_per_head, c.n_embd, has_state or wants_state, self.encoder)
        if c.fused is True:
            raise UserError(f"fused=True needs {why}; set fused='auto' to fall back to the op-by-op layer")
        return None

    def _fused_pays(self, B: int, T: int, has_state: bool, wants_state: bool) -> bool:
        """Off the CPU: whether the fused layer is the faster here (bdh.ops.plan.fused_pays: timed once
        per machine and shape, forward and, where gradients are on, backward)."""
        c = self.config
        grad = torch.is_grad_enabled()
        return fused_pays(B, T, c.n_head, c.neurons_per_head, c.n_embd, has_state or wants_state, grad, self.encoder,
                          lambda: self._time_layer_forms(B, T, has_state, wants_state, grad))

    def _time_layer_forms(self, B: int, T: int, has_state: bool, wants_state: bool,
                          grad: bool) -> dict[str, float | None]:
        """Best-of-5 seconds of the layers on B random sequences of T tokens, fused and op by op in
        turns: forward, and with grad a backward from the logits; None for a form that ran out of
        device memory. The random generators, every .grad and config.fused are left as they were."""
        device = self.encoder.device
        params = [p for p in self.parameters() if p.requires_grad] if grad else []

        def run(fused: bool):
            self.config.fused = fused
            try:
                logits, _ = self._layers(idx, state, wants_state)
                if params:
                    torch.autograd.grad(logits.float().square().mean(), params, allow_unused=True)
                synchronize(device)
            finally:
                self.config.fused = "auto"

        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            idx = torch.randint(0, self.config.vocab_size, (B, T), device=device)
            state = self.init_state(B, device) if has_state else None
            return best_of_each({"fused": partial(run, True), "op_by_op": partial(run, False)}, 5)

    def _layers(self, idx, state, return_state):
        c = self.config
        T = idx.shape[1]
        plan = self._fused_plan(idx.shape[0], T, state is not None, return_state)
        shape = (idx.shape[0], T, c.n_head, c.neurons_per_head, c.n_embd, self.encoder)
        sparse = sparse_below(*shape) if plan else 0.0
        batched = batched_products(*shape) if plan else False
        gated = c.variant == "gpu-prime"
        forms = get_gated_attention if gated else get_attention
        attn = None if plan else forms(self.engine(T, state is not None, return_state, batch=idx.shape[0]),
                                       self._chunk_size())
        shared = self._rope(idx, state)  # Rotors: 1|B, nh, T, N/2 complex and what the fused backward derives
        rotors = shared.r
        v = self._ln(self.embed(idx)).unsqueeze(1)  # B, 1, T, D
        x = None
        rho, handed_on = [], []
        for layer in range(c.n_layer):
            s0 = None if state is None else state.rho[layer]
            if plan:
                z, rho_l = fused_layer(v.squeeze(1), self.encoder, self.encoder_v, self._E(), shared, s0, self.decay,
                                       plan.chunk, c.layernorm, self.drop.p if self.training else 0.0, return_state,
                                       plan.block, sparse, batched)
                z = z.unsqueeze(1)  # B, 1, T, D
            else:
                x = self._neurons(v, x, layer)  # B, nh, T, N
                q = apply_rope_complex(x, rotors)  # B, nh, T, N ; keys == queries
                k, values = (q.detach(), v.detach()) if c.detach_kv else (q, v)
                if gated:
                    log_in, log_forget = self._gates(v)  # B, nh, T
                    values = values * torch.exp(log_in).unsqueeze(-1)  # B, nh, T, D
                    a, rho_l = attn(q, k, values, log_forget, s0, return_state)
                else:
                    a, rho_l = attn(q, k, values, s0, self.decay, return_state)
                z = self._read_out(a, x, layer)  # B, 1, T, D
            v = self._hand_on(v, z)  # B, 1, T, D
            rho.append(rho_l)
            handed_on.append(v.squeeze(1))
        return self._read(handed_on) @ self.lm_head, rho  # B, T, V

    def _gates(self, v):
        """BDH-GPU' state gates from the layer input v (B, 1|-, T, D) or (B, D): log i, log f (the
        decay folded in) as (B, nh, T), or (B, nh) for one token."""
        one = v.dim() == 2
        v = v if one else v.squeeze(1)  # B, [T,] D
        log_in = F.logsigmoid(v @ self.gate_in + self.gate_in_bias)  # B, [T,] nh
        log_forget = F.logsigmoid(v @ self.gate_forget + self.gate_forget_bias)
        if self.decay is not None:
            log_forget = log_forget + torch.log(self.decay).to(log_forget.dtype)
        if one:
            return log_in, log_forget
        return log_in.transpose(1, 2), log_forget.transpose(1, 2)

    def _read(self, handed_on):
        """What lm_head reads: the last layer's d-vector (BDH-GPU), or the gated merge (BDH-GPU-prime) of every
        layer's: sum_l softmax_l(v_l . w^g + b^g_l) v_l. handed_on: L x (B, [T,] D)."""
        if self.config.variant != "gpu-prime":
            return handed_on[-1]
        vs = torch.stack(handed_on)  # L, B, [T,] D
        bias = self.logit_gate_bias.view(-1, *([1] * (vs.dim() - 2)))
        weights = torch.softmax(vs @ self.logit_gate + bias, dim=0)  # L, B, [T]
        return (weights.unsqueeze(-1) * vs).sum(0)

    def _emit(self, site: str, layer: int, t: torch.Tensor) -> None:
        if self._capture is not None:
            self._capture(site, layer, t)

    def _E(self):
        c = self.config
        return self.decoder.view(c.n_head, c.neurons_per_head, c.n_embd)  # nh, N, D

    def _accumulates_x(self) -> bool:
        return self.config.layout != "reference"

    def _hand_on(self, v, z):
        """The d-vector the next layer (or lm_head) reads, from this layer's input v and output z = E y:
        LN(v + LN(z)) with the d-space residual (reference, xacc-residual), LN(z) in Eq. 8."""
        if self.config.layout == "eq8":
            return self._ln(z)
        return self._ln(v + self._ln(z))

    def _neurons(self, v, x_prev, layer):
        """x = relu(v D_x): (B, 1, T, D) -> (B, nh, T, N); x_prev + that where x accumulates (Eq. 8)."""
        x = F.relu(head_product(v, self.encoder))
        if x_prev is not None and self._accumulates_x():
            x = x_prev + x
        self._emit("x", layer, x)
        return x

    def _read_out(self, a, x, layer):
        """The layer's output in d-space: y = relu(LN(a) D_y) * x (non-zero only where x is), z = y E.

        a: (B, nh, T, D) attention read-out, x: (B, nh, T, N) -> z (B, 1, T, D).
        """
        self._emit("a", layer, a)
        y = F.relu(head_product(self._ln(a), self.encoder_v)) * x  # B, nh, T, N
        self._emit("y", layer, y)
        if self.training and self.drop.p > 0:
            if y.device.type == "cpu":  # drawn as the fused layer draws it
                y = y * draw_kept(y.shape, self.drop.p, y) / (1 - self.drop.p)
            else:  # torch's one-pass dropout (benchmarks/README.md, "On a GPU")
                y = self.drop(y)
        E = self._E()
        if few_tokens(y):
            return head_product(y, E).sum(dim=1, keepdim=True)  # B, 1, T, D
        return torch.einsum("bhtn,hnd->btd", y, E).unsqueeze(1)  # heads summed inside the contraction

    # the decoding path
    @torch.no_grad()
    def step(self, idx: torch.Tensor, state: BDHState) -> ModelOutput:
        """One token per sequence, idx (B, 1), on top of state, which is updated in place and returned.

        Per layer bdh.ops.recurrent.decode_layer reads then writes the state; when few RoPE pairs
        are active (fraction below config.sparse_decode_below; no decay, eval mode) only the
        state rows, D_y columns and E rows of active neurons are touched (sparse_decode_layer):
        exact, O(k D) instead of O(N D) per head. Captured activations are (B, nh, 1, X) views,
        as in a full forward.
        """
        B, T = idx.shape
        if T != 1 or state is None:
            raise UserError(f"step takes one token per sequence (B, 1) and a state; got shape {tuple(idx.shape)}"
                            f"{'' if state is not None else ' and no state'}")
        self._check_state(state, B)
        c = self.config
        with autocast_for(c.compute_dtype, idx.device):
            rotors = self._rope(idx, state).r[:, :, 0].transpose(0, 1)  # nh, 1|B, N/2
            v = self._ln(self.embed(idx[:, 0]))  # B, D
            E = self._E()
            x = None
            handed_on = []
            for layer in range(c.n_layer):
                x_new = decode_neurons(v, self.encoder)  # nh, B, N
                x = x_new if x is None or not self._accumulates_x() else x + x_new
                self._emit("x", layer, _cols(x))
                q = rotate_rows(x, rotors)  # nh, B, N
                active = self._active(x)
                if c.variant == "gpu-prime":
                    log_in, log_forget = self._gates(v)  # B, nh
                    z, a, y = gated_decode_layer(x, q, v.unsqueeze(1) * torch.exp(log_in).unsqueeze(-1),
                                                 torch.exp(log_forget), state.rho[layer], self.encoder_v, E,
                                                 c.layernorm)
                    self._emit("a", layer, _cols(a))
                    self._emit("y", layer, _cols(y))
                elif active is None:
                    z, a, y = decode_layer(x, q, v, state.rho[layer], self.encoder_v, E, self.decay, c.layernorm)
                    self._emit("a", layer, _cols(a))
                    self._emit("y", layer, _cols(y))
                else:
                    z, a, y_a = sparse_decode_layer(x, q, v, state.rho[layer], active, self._encoder_v_rows(),
                                                    self.decoder, c.layernorm)
                    self._emit("a", layer, a.unsqueeze(2))
                    if self._capture is not None:
                        y = y_a.new_zeros(B, c.n_neurons).index_copy_(1, active, y_a)  # B, n
                        self._emit("y", layer, y.view(B, c.n_head, 1, -1))
                v = self._hand_on(v, z)
                handed_on.append(v)
            logits = (self._read(handed_on) @ self.lm_head).unsqueeze(1)  # B, 1, V
        state.pos += 1
        return ModelOutput(logits=logits.float(), loss=None, state=state)

    def _active(self, x):
        """The active neurons (see active_neurons) when few enough for the sparse path, else None."""
        threshold = self.config.sparse_decode_below
        if threshold <= 0 or self.decay is not None or self.training or self.config.variant != "gpu":
            return None  # off, or decay (or a forget gate) rescales every row of the state: nothing to skip
        return active_neurons(x, threshold)

    def _encoder_v_rows(self) -> torch.Tensor:
        """D_y as rows (nh * N, D), kept while D_y is unchanged: gathering rows of active neurons
        reads contiguous memory, where gathering columns of D_y (nh, D, N) reads with stride N
        (2 ms of a 10 ms sparse token at paper-25m). Costs one more copy of D_y in memory."""
        key = (self.encoder_v.data_ptr(), self.encoder_v._version, self.encoder_v.dtype)
        if self._dy_rows is None or self._dy_rows[0] != key:
            rows = self.encoder_v.detach().transpose(1, 2).reshape(-1, self.config.n_embd)
            self._dy_rows = (key, rows)
        return self._dy_rows[1]

    def _rope(self, idx, state):
        """Rotors exp(i phase) for the absolute positions of these tokens: (1 | B, nh, T, N/2), as a Rotors.

        Without a state (training, scoring) the positions are 0..T-1 on every call, so the table and
        what the fused backward derives from it are kept until T, the device or freqs change: at
        T = 2048 (small) making them took about 5 % of a training step (benchmarks/README.md)."""
        T = idx.shape[1]
        steps = torch.arange(T, device=idx.device)
        if state is None and torch.compiler.is_compiling():
            return Rotors(rope_rotors(steps[None], self.freqs))
        if state is None:
            key = (T, idx.device, self.freqs.data_ptr(), self.freqs._version)
            if self._rotors is None or self._rotors[0] != key:
                self._rotors = (key, Rotors(rope_rotors(steps[None], self.freqs)))  # 1, T
            return self._rotors[1]
        if bool((state.pos == state.pos[0]).all()):
            positions = state.pos[:1, None] + steps  # 1, T: one table serves the whole batch
        else:
            positions = state.pos[:, None] + steps  # B, T
        return Rotors(rope_rotors(positions, self.freqs))

    def _ln(self, x):
        return norm(x) if self.config.layernorm else x

    def _check_state(self, state: BDHState | None, batch_size: int) -> None:
        if state is None:
            return
        c = self.config
        expected = (batch_size, c.n_head, c.neurons_per_head, c.n_embd)
        if len(state.rho) != c.n_layer or tuple(state.rho[0].shape) != expected:
            got = (len(state.rho), tuple(state.rho[0].shape) if state.rho else ())
            raise UserError(f"state does not fit this model: expected {c.n_layer} x {expected}, got {got[0]} x {got[1]}")

    # the authors' checkpoints
    @classmethod
    def from_reference(cls, state_dict, n_layer: int = 6, **overrides) -> "BDH":
        """Build a model from a state_dict (or .pt path) saved by the authors' bdh.py."""
        if isinstance(state_dict, (str, Path)):
            state_dict = _load_pt(Path(state_dict))
        sd = {key.removeprefix("_orig_mod."): value for key, value in state_dict.items()}
        for key in REFERENCE_KEYS:
            if key not in sd:
                raise UserError(f"reference state_dict lacks {key!r} (has: {', '.join(sorted(sd))})")
        nh, D, N = sd["encoder"].shape
        V = sd["embed.weight"].shape[0]
        if (N * nh) % D:
            raise UserError(f"reference 'encoder' shape {tuple(sd['encoder'].shape)}: nh*N must be a multiple of D")
        config = BDHConfig(n_layer=n_layer, n_embd=D, n_head=nh, mlp_internal_dim_multiplier=N * nh // D,
                           vocab_size=V, **overrides)
        model = cls(config)
        ours = {key: sd[key] for key in REFERENCE_KEYS[:-1]}
        ours["freqs"] = sd["attn.freqs"].reshape(-1, N).expand(nh, N)
        model.load_weights(ours, source="reference state_dict")
        return model

    def load_weights(self, tensors: dict[str, torch.Tensor], source: str = "weights") -> None:
        """Copy tensors in by name, with an error naming any missing, extra or misshapen key."""
        if "freqs" in tensors and not pairs_share_frequencies(tensors["freqs"]):
            raise UserError(f"{source}: RoPE frequencies of neurons 2i and 2i+1 differ; the rotation needs pairs")
        super().load_weights(tensors, source)


def _cols(rows: torch.Tensor) -> torch.Tensor:
    """(nh, B, X) rows -> the (B, nh, 1, X) view a full forward has."""
    return rows.transpose(0, 1).unsqueeze(2)


def few_tokens(x: torch.Tensor) -> bool:
    """Decoding-sized input (B x T <= 64 tokens): take the weight-reading matmul path."""
    return x.shape[0] * x.shape[2] <= 64


def head_product(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Per-head x @ W: x (B, 1 | nh, T, K) with W (nh, K, M) -> (B, nh, T, M).

    For a few tokens (decoding) the heads go in the batch of one matmul that reads W in place;
    einsum would first copy the whole weight into its preferred layout (150 us against 18 us per
    call at `small` size). For many tokens (training) einsum's layout is the faster one (37 ms
    against 72 ms forward and backward for B x T = 2048).
    """
    B, h, T, K = x.shape
    if few_tokens(x):
        rows = x.transpose(0, 1).reshape(h, B * T, K)  # 1|nh, B*T, K (a small copy)
        return torch.matmul(rows, W).view(W.shape[0], B, T, -1).transpose(0, 1)
    if h == 1:
        return torch.einsum("btk,hkm->bhtm", x[:, 0], W)
    return torch.einsum("bhtk,hkm->bhtm", x, W)


def _load_pt(path: Path) -> dict[str, torch.Tensor]:
    """A .pt state dict read with weights_only=True: no code from the file is ever executed."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except Exception as err:  # torch raises several types for corrupt or unsafe pickles
        raise UserError(f"cannot read {path} as a weights-only PyTorch file: {str(err).splitlines()[0]}") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise UserError(f"{path} does not hold a state_dict")
    return obj
