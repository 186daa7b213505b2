"""BDH-GPU: embed -> n_layer passes of ONE shared layer -> lm_head (bdh-spec.md section 2).

Parameter names follow the authors' state_dict (so their checkpoints load as they are):
    encoder   D_x (nh, D, N)   d-space -> neuron space, gives x
    encoder_v D_y (nh, D, N)   attention read-out -> neuron space, gives y
    decoder   E   (nh*N, D)    neuron space -> d-space
    embed     f_e (V, D), lm_head f_d (D, V) (not tied), freqs (nh, N) RoPE cycles per token.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bdh.checkpoint import load_named_tensors
from bdh.config import BDHConfig
from bdh.errors import UserError
from bdh.ops import apply_rope_complex, get_attention, pairs_share_frequencies, pick_attention, rope_freqs, rope_rotors
from bdh.ops.layer import fused_layer, norm
from bdh.ops.recurrent import active_neurons, sparse_step_inplace
from bdh.outputs import ModelOutput, next_positions, next_token_loss
from bdh.precision import autocast_for
from bdh.state import BDHState

REFERENCE_KEYS = ("encoder", "encoder_v", "decoder", "embed.weight", "lm_head", "attn.freqs")


class BDH(nn.Module):
    def __init__(self, config: BDHConfig):
        super().__init__()
        self.config = config
        nh, D, N, V = config.n_head, config.n_embd, config.neurons_per_head, config.vocab_size
        self.embed = nn.Embedding(V, D)
        self.encoder = nn.Parameter(torch.empty(nh, D, N))
        self.encoder_v = nn.Parameter(torch.empty(nh, D, N))
        self.decoder = nn.Parameter(torch.empty(nh * N, D))
        self.lm_head = nn.Parameter(torch.empty(D, V))
        self.register_buffer("freqs", rope_freqs(N, config.rope_theta).expand(nh, N).clone())
        decay = None if config.decay is None else torch.tensor(config.decay, dtype=torch.float32)
        self.register_buffer("decay", decay, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        # identity modules that forward hooks can capture, once per layer (see bdh.interp)
        self.hook_x = nn.Identity()  # B, nh, T, N  neuron activations (before RoPE)
        self.hook_a = nn.Identity()  # B, nh, T, D  attention read-out
        self.hook_y = nn.Identity()  # B, nh, T, N  gated activations
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02^2) for every weight, as the reference code."""
        for weight in (self.embed.weight, self.encoder, self.encoder_v, self.decoder, self.lm_head):
            nn.init.normal_(weight, mean=0.0, std=0.02)

    # sizes
    def num_params(self, embeddings: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total if embeddings else total - self.embed.weight.numel() - self.lm_head.numel()

    def init_state(self, batch_size: int, device=None) -> BDHState:
        c = self.config
        device = device if device is not None else self.lm_head.device
        return BDHState.zeros(c.n_layer, batch_size, c.n_head, c.neurons_per_head, c.n_embd, device)

    # forward
    def forward(self, idx: torch.Tensor, targets=None, state: BDHState | None = None, return_state: bool = True,
                inplace_state: bool = False):
        """idx (B, T) -> ModelOutput(logits (B, T, V), loss or None, state after the last token).

        With a state, the tokens continue the sequences it holds (positions continue too). Pass
        return_state=False to skip building the outgoing state when it is not needed (training).
        inplace_state=True lets a one-token step without autograd update the state tensors in
        place (generation owns its state): no N x D copy per token, and only the rows of active
        neurons are touched when few fire (see _decode_step).
        """
        B, T = idx.shape
        self._check_state(state, B)
        decoding = inplace_state and T == 1 and state is not None and not torch.is_grad_enabled()
        with autocast_for(self.config.compute_dtype, idx.device):
            logits, rho = self._decode_step(idx, state) if decoding else self._layers(idx, state, return_state)
        new_state = BDHState(rho=rho, pos=next_positions(state, B, T, idx.device)) if return_state else None
        return ModelOutput(logits=logits.float(), loss=next_token_loss(logits, targets), state=new_state)

    def _layers(self, idx, state, return_state):
        c = self.config
        T = idx.shape[1]
        chunk = self._fused_chunk(T)
        attn = None if chunk else self._attention(T, state is not None, return_state)
        rotors = self._rope(idx, state)  # 1|B, nh, T, N/2 complex
        v = self._ln(self.embed(idx)).unsqueeze(1)  # B, 1, T, D
        x = None
        rho = []
        for layer in range(c.n_layer):
            s0 = None if state is None else state.rho[layer]
            if chunk:
                z, rho_l = fused_layer(v.squeeze(1), self.encoder, self.encoder_v, self._E(), rotors, s0, self.decay,
                                       chunk, c.layernorm, self.drop.p if self.training else 0.0, return_state)
                z = z.unsqueeze(1)  # B, 1, T, D
            else:
                x = self._neurons(v, x)  # B, nh, T, N
                q = apply_rope_complex(x, rotors)  # B, nh, T, N ; keys == queries
                k, values = (q.detach(), v.detach()) if c.detach_kv else (q, v)
                a, rho_l = attn(q, k, values, s0, self.decay, return_state)
                z = self._read_out(a, x)  # B, 1, T, D
            v = self._ln(v + self._ln(z))  # B, 1, T, D
            rho.append(rho_l)
        return v.squeeze(1) @ self.lm_head, rho  # B, T, V

    def _fused_chunk(self, T: int) -> int | None:
        """The chunk length for the fused layer (bdh.ops.layer), or None where it does not apply.

        It serves attn_impl="auto" in the reference layout, float32, with no hooks to call
        (bdh.interp captures through them), outside torch.compile, for T > 1 tokens, in chunks
        of min(chunk_size, T) when that divides T; otherwise the op-by-op layer runs.
        """
        c = self.config
        op_by_op = c.attn_impl != "auto" or c.layout != "reference" or c.detach_kv or c.compute_dtype != "float32"
        if op_by_op or self._hooked():
            return None
        if torch.compiler.is_compiling():
            return None  # under torch.compile the op-by-op layer is traced and fused by the compiler
        C = min(c.chunk_size, T)
        return C if T > 1 and T % C == 0 else None

    def _E(self):
        c = self.config
        return self.decoder.view(c.n_head, c.neurons_per_head, c.n_embd)  # nh, N, D

    def _neurons(self, v, x_prev):
        """x = relu(v D_x): (B, 1, T, D) -> (B, nh, T, N); accumulated over layers in the eq8 layout."""
        x = F.relu(head_product(v, self.encoder))
        if x_prev is not None and self.config.layout == "eq8":
            x = x_prev + x
        return self.hook_x(x)

    def _read_out(self, a, x):
        """The layer's output in d-space: y = relu(LN(a) D_y) * x (non-zero only where x is), z = y E.

        a: (B, nh, T, D) attention read-out, x: (B, nh, T, N) -> z (B, 1, T, D).
        """
        a = self.hook_a(a)
        y = F.relu(head_product(self._ln(a), self.encoder_v)) * x  # B, nh, T, N
        y = self.hook_y(y)
        if self.training and self.drop.p > 0:
            y = self.drop(y.contiguous())  # contiguous: dropout draws as the fused layer does
        E = self._E()
        if few_tokens(y):
            return head_product(y, E).sum(dim=1, keepdim=True)  # B, 1, T, D
        return torch.einsum("bhtn,hnd->btd", y, E).unsqueeze(1)  # heads summed inside the contraction

    def _decode_step(self, idx, state):
        """One token per sequence, the state updated in place; sparse-aware per layer.

        Activations are kept as rows (nh, B, X) so that every weight and state is read in place
        by one batched matmul, with few ops per layer (per-op overhead is most of a token's time
        at small sizes). When few RoPE pairs are active (fraction below
        config.sparse_decode_below), only the state rows, D_y columns and E rows of active
        neurons are read or written (_sparse_layer): exact, O(k D) instead of O(N D) per head.
        The hooks see (B, nh, 1, X) views, as in a full forward.
        """
        c = self.config
        B, nh, N, D = idx.shape[0], c.n_head, c.neurons_per_head, c.n_embd
        hooked = self._hooked()
        rotors = self._rope(idx, state)[:, :, 0].transpose(0, 1)  # nh, 1|B, N/2
        v = self._ln(self.embed(idx[:, 0]))  # B, D
        E = self._E()
        x = None
        for layer in range(c.n_layer):
            rho = state.rho[layer]  # B, nh, N, D
            x_new = torch.matmul(v, self.encoder).relu_()  # nh, B, N
            x = x_new if x is None or c.layout != "eq8" else x + x_new
            if hooked:
                x = _rows(self.hook_x(_cols(x)))
            pairs = torch.view_as_complex(x.reshape(nh, B, N // 2, 2)) * rotors
            q = torch.view_as_real(pairs).view(nh, B, N)  # nh, B, N
            active = self._active(x)
            if active is not None:
                z = self._sparse_layer(x, q, v, rho, active, hooked)
            else:
                z = self._dense_layer(x, q, v, rho, E, hooked)
            v = self._ln(v + self._ln(z))
        return (v @ self.lm_head).unsqueeze(1), state.rho  # B, 1, V

    def _dense_layer(self, x, q, v, rho, E, hooked):
        """z (B, D) of one decoded token from rows x, q (nh, B, N) and v (B, D); rho updated in place."""
        nh, B, N = q.shape
        D = v.shape[-1]
        S = rho.view(B * nh, N, D)
        q_b = q.transpose(0, 1).reshape(B * nh, 1, N).to(S.dtype)  # a copy only when B > 1
        a = torch.bmm(q_b, S)  # B*nh, 1, D: read, then write
        S.baddbmm_(q_b.transpose(1, 2), v.to(S.dtype).unsqueeze(1).expand(B, nh, D).reshape(B * nh, 1, D))
        if self.decay is not None:
            S.view(B, nh, N * D).mul_(self.decay.to(S.dtype).view(1, nh, 1))
        a = a.view(B, nh, D).transpose(0, 1).to(v.dtype)  # nh, B, D
        if hooked:
            a = _rows(self.hook_a(_cols(a)))
        y = torch.matmul(self._ln(a), self.encoder_v).relu_().mul_(x)  # nh, B, N
        if hooked:
            y = _rows(self.hook_y(_cols(y)))
        return torch.matmul(y, E).sum(dim=0)  # B, D

    def _encoder_v_rows(self) -> torch.Tensor:
        """D_y as rows (nh * N, D), kept while D_y is unchanged: gathering rows of active neurons
        reads contiguous memory, where gathering columns of D_y (nh, D, N) reads with stride N
        (2 ms of a 10 ms sparse token at paper-25m). Costs one more copy of D_y in memory."""
        key = (self.encoder_v.data_ptr(), self.encoder_v._version, self.encoder_v.dtype)
        cached = getattr(self, "_dy_rows", None)
        if cached is None or cached[0] != key:
            rows = self.encoder_v.detach().transpose(1, 2).reshape(-1, self.config.n_embd)
            self._dy_rows = cached = (key, rows)
        return cached[1]

    def _hooked(self) -> bool:
        return any(m._forward_hooks or m._forward_pre_hooks for m in (self.hook_x, self.hook_a, self.hook_y))

    def _active(self, x):
        """The active neurons (see active_neurons) when few enough for the sparse path, else None."""
        threshold = self.config.sparse_decode_below
        if threshold <= 0 or self.decay is not None or self.training:
            return None  # off, or decay rescales every row of the state: nothing to skip
        return active_neurons(x, threshold)

    def _sparse_layer(self, x, q, v, rho, active, hooked):
        """z (B, D) touching only the active neurons (indices into nh * N); rho updated in place.

        x, q: rows (nh, B, N); v: (B, D). All heads at once: the state rows, D_y columns and
        E rows of the active neurons are gathered, each neuron's read-out share is summed into
        its head, and the gated y of the active neurons is decoded by their E rows.
        """
        nh, B, N = x.shape
        D = v.shape[-1]
        heads = torch.div(active, N, rounding_mode="floor")  # k: the head of each active neuron
        x_a = x.transpose(0, 1).reshape(B, nh * N)[:, active]  # B, k
        q_a = q.transpose(0, 1).reshape(B, nh * N)[:, active]
        reads = sparse_step_inplace(q_a, active, v, rho.view(B, nh * N, D))  # B, k, D
        a = reads.new_zeros(B, nh, D).index_add_(1, heads, reads).to(v.dtype)  # B, nh, D
        if hooked:
            a = self.hook_a(a.unsqueeze(2)).squeeze(2)
        a_hat = self._ln(a)
        columns = self._encoder_v_rows().index_select(0, active)  # k, D: D_y column of each active neuron
        y_a = F.relu((a_hat[:, heads] * columns).sum(dim=-1)) * x_a  # B, k
        if hooked:
            y = y_a.new_zeros(B, nh * N).index_copy_(1, active, y_a)
            y_a = _rows(self.hook_y(_cols(y.view(B, nh, N).transpose(0, 1))))
            y_a = y_a.transpose(0, 1).reshape(B, nh * N)[:, active]
        return y_a @ self.decoder.index_select(0, active)  # B, D

    def _attention(self, T: int, has_state: bool, wants_state: bool):
        c = self.config
        name = c.attn_impl
        if name == "auto":
            name = pick_attention(T, c.neurons_per_head, c.n_embd, c.chunk_size, has_state, wants_state)
        return get_attention(name, c.chunk_size)

    def _rope(self, idx, state):
        """Rotors exp(i phase) for the absolute positions of these tokens: (1 | B, nh, T, N/2)."""
        T = idx.shape[1]
        steps = torch.arange(T, device=idx.device)
        if state is None:
            positions = steps[None]  # 1, T
        elif bool((state.pos == state.pos[0]).all()):
            positions = state.pos[:1, None] + steps  # 1, T: one table serves the whole batch
        else:
            positions = state.pos[:, None] + steps  # B, T
        return rope_rotors(positions, self.freqs)

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

    # generation
    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k=None, top_p=None, generator=None):
        """Prefill the prompt once, then decode token by token from the state. See bdh.generate."""
        from bdh.generate import generate

        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

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
        load_named_tensors(self, tensors, source)


def _cols(rows: torch.Tensor) -> torch.Tensor:
    """(nh, B, X) rows -> the (B, nh, 1, X) view a full forward has."""
    return rows.transpose(0, 1).unsqueeze(2)


def _rows(cols: torch.Tensor) -> torch.Tensor:
    """(B, nh, 1, X) -> (nh, B, X) rows (a view)."""
    return cols.squeeze(2).transpose(0, 1)


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
