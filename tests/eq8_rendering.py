"""The paper's three lines of Eq. 8 (Eq. 7 without LayerNorm), rendered token by token in float64.

Shares no code with the package. Per token t and layer l, in the paper's orientation (rho is
D x N per head, read as rho x):

    rho_{t,l} = (rho_{t-1,l} + v*_{t,l-1} x_{t,l}^T) U
    x_{t,l}   = x_{t,l-1} + relu(D_x v*_{t,l-1})
    y_{t,l}   = relu(D_y LN(rho_{t-1,l} x_{t,l})) * x_{t,l}
    v*_{t,l}  = LN(E y_{t,l})

with v*_{t,0} = LN(embed(token_t)), x_{t,0} = 0 and logits = v*_{t,L} f_d. U is the per-head
decay lambda_h times the rotation R_1 acting on the neuron index (pairs 2i, 2i+1 turned by
-2 pi f_i per token), so that rho x_t reads the past with the relative rotation that RoPE gives.

With variant "gpu-prime" it renders BDH-GPU' as bdh/model.py reconstructs it: per-head gates
i = sigmoid(v*_{t,l-1} . w^i_h + b^i_h), f likewise, rho_{t,l} = f (rho_{t-1,l} + i v* x^T) U, and
logits = (sum_l softmax_l(v*_{t,l} . w^g + b^g_l) v*_{t,l}) f_d.

The same function renders the other two layouts, to test them the same way: "reference" (x not
accumulated, v_l = LN(v_{l-1} + LN(E y_l))) and "xacc-residual" (x accumulated, that residual).
"""

import math

import torch
import torch.nn.functional as F


def weights(model):
    c = model.config
    nh, N, D = c.n_head, c.neurons_per_head, c.n_embd
    w = {
        "Dx": model.encoder.detach().double(),  # nh, D, N
        "Dy": model.encoder_v.detach().double(),  # nh, D, N
        "E": model.decoder.detach().double().view(nh, N, D),
        "fe": model.embed.weight.detach().double(),  # V, D
        "fd": model.lm_head.detach().double(),  # D, V
        "freqs": model.freqs.detach().double()[:, ::2],  # nh, N/2
        "decay": (torch.ones(nh, dtype=torch.float64) if model.decay is None else model.decay.double()),
    }
    return w


def turn(rho, freqs, steps):
    """rho (B, nh, D, N) with its neuron pairs turned by -2 pi f steps (R_steps on the right)."""
    B, nh, D, N = rho.shape
    phase = torch.frac(freqs * steps) * (2 * math.pi)  # nh, N/2
    rotor = torch.polar(torch.ones_like(phase), -phase)[None, :, None, :]
    pairs = torch.view_as_complex(rho.reshape(B, nh, D, N // 2, 2).contiguous()) * rotor
    return torch.view_as_real(pairs).reshape(B, nh, D, N)


def rho_from_state(state_rho, freqs, pos):
    """The package's state S (B, nh, N, D), kept in absolute RoPE frames, as the paper's rho at position pos."""
    return turn(state_rho.double().transpose(-1, -2), freqs, pos)


def render(model, idx, layout=None, rho=None):
    """idx (B, T) -> logits (B, T, V) float64 and the final rho, list of L x (B, nh, D, N).

    rho: the incoming states in the paper's orientation (None = zeros).
    """
    c = model.config
    layout = layout or c.layout
    w = weights(model)
    nh, N, D, L = c.n_head, c.neurons_per_head, c.n_embd, c.n_layer
    B, T = idx.shape
    ln = (lambda t: F.layer_norm(t, (t.shape[-1],), eps=1e-5)) if c.layernorm else (lambda t: t)
    rho = [torch.zeros(B, nh, D, N, dtype=torch.float64) for _ in range(L)] if rho is None else list(rho)
    lam = w["decay"].view(1, nh, 1, 1)
    prime = c.variant == "gpu-prime"
    if prime:
        g = {name: getattr(model, name).detach().double() for name in (
            "gate_in", "gate_in_bias", "gate_forget", "gate_forget_bias", "logit_gate", "logit_gate_bias")}
    out = []
    for t in range(T):
        v = ln(w["fe"][idx[:, t]])  # B, D
        x = torch.zeros(B, nh, N, dtype=torch.float64)
        handed_on = []
        for l in range(L):
            i_gate = f_gate = torch.ones(B, nh, 1, 1, dtype=torch.float64)
            if prime:
                i_gate = torch.sigmoid(v @ g["gate_in"] + g["gate_in_bias"])[:, :, None, None]  # B, nh, 1, 1
                f_gate = torch.sigmoid(v @ g["gate_forget"] + g["gate_forget_bias"])[:, :, None, None]
            x_new = F.relu(torch.einsum("bd,hdn->bhn", v, w["Dx"]))
            x = x + x_new if layout != "reference" else x_new
            a = torch.einsum("bhdn,bhn->bhd", rho[l], x)  # rho_{t-1,l} x_{t,l}: read before the write
            y = F.relu(torch.einsum("bhd,hdn->bhn", ln(a), w["Dy"])) * x
            rho[l] = turn(f_gate * lam * (rho[l] + i_gate * v[:, None, :, None] * x[:, :, None, :]), w["freqs"], 1)
            z = torch.einsum("bhn,hnd->bd", y, w["E"])
            v = ln(z) if layout == "eq8" else ln(v + ln(z))
            handed_on.append(v)
        if prime:
            scores = torch.stack([u @ g["logit_gate"] + g["logit_gate_bias"][l] for l, u in enumerate(handed_on)])
            v = (torch.softmax(scores, dim=0)[..., None] * torch.stack(handed_on)).sum(0)
        out.append(v @ w["fd"])
    return torch.stack(out, dim=1), rho


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_state_equals(model, state, rho, tol=1e-5):
    """The model's carried state (absolute RoPE frames) is the rendered rho."""
    freqs = model.freqs.double()[:, ::2]
    for S, r in zip(state.rho, rho):
        assert rel_err(rho_from_state(S, freqs, int(state.pos[0])), r) < tol


def assert_forward_is_rendering(model, idx, tol=1e-5):
    """model(idx) gives the rendered logits and state; returns the rendered logits."""
    with torch.no_grad():
        out = model(idx)
    logits, rho = render(model, idx)
    assert rel_err(out.logits.double(), logits) < tol
    assert_state_equals(model, out.state, rho, tol)
    return logits
