"""Meta predictive learning (MPL; Chan Li, Junbin Qiu, Haiping Huang, "Meta predictive learning
model of languages in neural circuits", arXiv 2309.04106, Phys. Rev. E 109, 044309 (2024)).

A one-layer vanilla RNN whose every weight w follows a spike-and-slab distribution
P(w) = pi delta(w) + (1 - pi) N(w; m, Xi). Only (m, pi, Xi) are learned, by predictive coding,
without backpropagation through time. With the moments mu = (1 - pi) m, rho = (1 - pi)(m^2 + Xi)
and var = rho - mu^2 = (1 - pi)(Xi + pi m^2), the mean-field pre-activation of the beliefs r is

    h^t = mu_rec f(r^{t-1}) + mu_in x^t + eps^t * sqrt(Delta^t),
    Delta^t = var_rec f(r^{t-1})^2 + var_in (x^t)^2,

the read-out z^t = mu_out f(r^t) + eps_z^t * sqrt(var_out f(r^t)^2), y_hat = softmax(z), and the
energy (the paper's variational free energy)

    F = sum_t 1/2 ||r^t - h^t||^2 + sum_{t in O} CE(y^t, y_hat^t)

(O: every step with a target; -1 targets are ignored, so a classifier scores only its last step).
The noise eps ~ N(0, 1) is drawn once per batch and frozen while the beliefs settle.

Training, `model(idx, targets)` in training mode (learning="pc"):
  1. inference: beliefs initialised by a forward pass (r = h), then `inference_steps` gradient
     steps on r (SGD or Adam), the parameters held fixed;
  2. learning: the returned loss is F per token at the converged beliefs r* (detached), so
     `loss.backward()` gives dF/dtheta there: the local rule, postsynaptic error x presynaptic
     activity (`local_gradients` writes it out; tests check it against autograd).
pi in [0, 1] and Xi >= 0 are kept by projection: every training forward first clamps the stored
parameters in place (the paper clamps after each update; the trainer's optimizer step happens
between two forwards), and the moments clamp functionally too, so a checkpoint saved right after
an update is read the same way.

Evaluation and generation (eval mode, or no targets) run the mean network forward, r^t = h^t
with eps = 0 (`eval_noise=True` samples one member of the ensemble instead): predicting the next
token is the paper's prediction phase, where no target exists to drive inference.

learning="bptt" is the control the paper compares with: the same network (the same forward, frozen
noise included) trained by backpropagation through time of the cross-entropy.

Release quirk, off by default: `quirk_variance_grad` gives the variance path the gradient factor
s = 1/2 instead of d sqrt(Delta)/dDelta = 1/(2 sqrt(Delta)) (the authors' numpy code multiplies the
exact variance-path gradient by sqrt(Delta)), in inference and learning alike.

Dimension legend: B batch, T time, N hidden units, V vocabulary (outputs), I inputs.
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
from bdh.protocol import ModelBase, ModelOutput, next_positions, next_token_loss
from bdh.state import TensorState

ACTIVATIONS = ("tanh", "relu")
INFERENCE_OPTIMIZERS = ("sgd", "adam")
LEARNING_RULES = ("pc", "bptt")
GROUPS = ("w_in", "w_rec", "w_out")


@dataclass
class MPLConfig(ModelConfig):
    """The MPL network and its inference; the learning rate is the trainer's."""

    # V: outputs (the vocabulary for language, the classes for a classifier)
    vocab_size: int = 256
    # N: hidden units (the paper: 100 for sequential MNIST, 512 for Penn Treebank)
    n_hidden: int = 256
    # I: dense inputs per step; 0 = one-hot tokens of vocab_size (language)
    input_size: int = 0
    # f: the paper uses ReLU for sequential MNIST and tanh for language
    activation: str = "tanh"
    # "pc": predictive coding (inference, then the local update); "bptt": the control
    learning: str = "pc"
    # K: gradient steps on the beliefs per batch (the paper: 100 to 200)
    inference_steps: int = 20
    # eta of the belief updates (the paper: SGD 0.1, Adam 0.01 for the language model)
    inference_lr: float = 0.01
    inference_optimizer: str = "adam"
    # frozen noise eps sqrt(Delta) while training; False trains the mean network
    noise: bool = True
    # evaluate / generate with one noise draw instead of the mean network
    eval_noise: bool = False
    # added to Delta under the square root, so its gradient stays finite where Delta = 0
    var_eps: float = 1e-6
    # initial pi ~ U(0, init_pi); Xi = init_xi * the slab variance of the group's m
    init_pi: float = 0.1
    init_xi: float = 0.1
    # the authors' variance-path gradient factor (see the module docstring)
    quirk_variance_grad: bool = False
    # the network runs in float32 (the field exists because the trainer asks every family)
    compute_dtype: str = "float32"

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(n_hidden=32, inference_steps=5),
        "small": dict(n_hidden=256, inference_steps=20),
    }

    def __post_init__(self) -> None:
        self._check_positive_ints("vocab_size", "n_hidden")
        for name in ("input_size", "inference_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                self._fail(name, "be an integer >= 0", value)
        self._check_choice("activation", ACTIVATIONS)
        self._check_choice("learning", LEARNING_RULES)
        self._check_choice("inference_optimizer", INFERENCE_OPTIMIZERS)
        self._check_choice("compute_dtype", ("float32",))
        self._check_bools("noise", "eval_noise", "quirk_variance_grad")
        for name in ("inference_lr", "var_eps", "init_xi"):
            if not getattr(self, name) > 0:
                self._fail(name, "be > 0", getattr(self, name))
        if not 0.0 <= self.init_pi <= 1.0:
            self._fail("init_pi", "be in [0, 1]", self.init_pi)

    @property
    def n_inputs(self) -> int:
        """I: one-hot tokens (vocab_size) or dense inputs (input_size)."""
        return self.input_size or self.vocab_size

    def num_params(self) -> int:
        """3 numbers (m, pi, Xi) per weight of W_in (N x I), W_rec (N x N), W_out (V x N)."""
        N = self.n_hidden
        return 3 * (N * self.n_inputs + N * N + self.vocab_size * N)


@dataclass
class MPLState(TensorState):
    """The belief of the last step, r^T: one (B, N) tensor."""

    r: list[torch.Tensor] = dataclasses.field(default_factory=list)  # 1 x (B, N)


# --------------------------------------------------------------------------------------------
# the maths, as functions of tensors (the model and the tests share them)

@dataclass
class Moments:
    """mu and var = rho - mu^2 of one weight group (out, in)."""

    mu: torch.Tensor
    var: torch.Tensor


def spike_slab_moments(m: torch.Tensor, pi: torch.Tensor, xi: torch.Tensor) -> Moments:
    """mu = (1 - pi) m, var = (1 - pi)(m^2 + Xi) - mu^2 = (1 - pi)(Xi + pi m^2), pi and Xi clamped."""
    pi, xi = pi.clamp(0.0, 1.0), xi.clamp(min=0.0)
    keep = 1.0 - pi
    return Moments(mu=keep * m, var=keep * (xi + pi * m * m))


class _SqrtHalfGrad(torch.autograd.Function):
    """sqrt whose backward uses 1/2 instead of 1/(2 sqrt(x)): the release's variance-path gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.sqrt()

    @staticmethod
    def backward(ctx, grad):
        return 0.5 * grad


def noise_scale(var: torch.Tensor, var_eps: float, quirk: bool) -> torch.Tensor:
    """sqrt(Delta + var_eps), with the release's gradient when quirk."""
    x = var + var_eps
    return _SqrtHalfGrad.apply(x) if quirk else x.sqrt()


def activation(name: str):
    return torch.tanh if name == "tanh" else torch.relu


def input_drive(w_in: Moments, idx: torch.Tensor | None = None, x: torch.Tensor | None = None):
    """mu_in x^t and var_in (x^t)^2: (B, T, N) each; idx (B, T) one-hot tokens or x (B, T, I)."""
    if idx is not None:
        return w_in.mu.t()[idx], w_in.var.t()[idx]  # a one-hot x picks a column
    return x @ w_in.mu.t(), (x * x) @ w_in.var.t()


@dataclass
class Noise:
    """The frozen noise of one batch: eps for the beliefs (B, T, N) and the read-out (B, T, V); None: none."""

    h: torch.Tensor | None
    z: torch.Tensor | None


def readout(r: torch.Tensor, w_out: Moments, f, eps_z, var_eps: float, quirk: bool) -> torch.Tensor:
    """z^t = mu_out f(r^t) (+ eps_z sqrt(var_out f(r^t)^2)): (B, T, V)."""
    a = f(r)
    z = a @ w_out.mu.t()
    if eps_z is not None:
        z = z + eps_z * noise_scale((a * a) @ w_out.var.t(), var_eps, quirk)
    return z


def predictions(r: torch.Tensor, r0: torch.Tensor, drive, w_rec: Moments, f, eps_h, var_eps: float,
                quirk: bool) -> torch.Tensor:
    """h^t from the beliefs of the step before (r^0 for t = 1), all steps at once: (B, T, N)."""
    prev = f(torch.cat([r0[:, None], r[:, :-1]], dim=1))  # B, T, N
    h = drive[0] + prev @ w_rec.mu.t()
    if eps_h is not None:
        h = h + eps_h * noise_scale(drive[1] + (prev * prev) @ w_rec.var.t(), var_eps, quirk)
    return h


def energy_terms(r, r0, drive, w_rec: Moments, w_out: Moments, noise: Noise, targets, f, var_eps: float,
                 quirk: bool = False):
    """The two parts of F per (sequence, step): 1/2 ||r^t - h^t||^2 and CE(y^t, softmax(z^t)) (0 where
    the target is -1), each (B, T)."""
    h = predictions(r, r0, drive, w_rec, f, noise.h, var_eps, quirk)
    z = readout(r, w_out, f, noise.z, var_eps, quirk)
    gauss = 0.5 * (r - h).pow(2).sum(-1)
    ce = F.cross_entropy(z.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none").view_as(gauss)
    return gauss, ce


def forward_beliefs(r0, drive, w_rec: Moments, f, eps_h, var_eps: float) -> torch.Tensor:
    """The forward pass r^t = h^t, step by step: (B, T, N)."""
    rs, r = [], r0
    for t in range(drive[0].shape[1]):
        a = f(r)
        h = drive[0][:, t] + a @ w_rec.mu.t()
        if eps_h is not None:
            h = h + eps_h[:, t] * (drive[1][:, t] + (a * a) @ w_rec.var.t() + var_eps).sqrt()
        rs.append(h)
        r = h
    return torch.stack(rs, dim=1)


def infer(r_init, r0, drive, w_rec: Moments, w_out: Moments, noise: Noise, targets, f, cfg: MPLConfig):
    """K gradient steps on the beliefs, the parameters (moments, drive) fixed: r* (B, T, N), detached.

    The gradient is that of the energy summed over the batch, so each sequence's beliefs move as
    they would alone, whatever the batch size.
    """
    moments = [Moments(w.mu.detach(), w.var.detach()) for w in (w_rec, w_out)]
    drive = tuple(d.detach() for d in drive)
    r = r_init.detach().clone()
    m1 = torch.zeros_like(r)
    m2 = torch.zeros_like(r)
    for k in range(1, cfg.inference_steps + 1):
        with torch.enable_grad():
            r.requires_grad_(True)
            gauss, ce = energy_terms(r, r0.detach(), drive, *moments, noise, targets, f, cfg.var_eps,
                                     cfg.quirk_variance_grad)
            (grad,) = torch.autograd.grad((gauss + ce).sum(), r)
        r = r.detach()
        if cfg.inference_optimizer == "sgd":
            r -= cfg.inference_lr * grad
        else:  # Adam (Kingma and Ba), default betas
            m1.mul_(0.9).add_(grad, alpha=0.1)
            m2.mul_(0.999).addcmul_(grad, grad, value=0.001)
            step = m1 / (1 - 0.9 ** k) / ((m2 / (1 - 0.999 ** k)).sqrt() + 1e-8)
            r -= cfg.inference_lr * step
    return r.detach()


def local_gradients(r, r0, x_or_idx, moments: dict[str, Moments], params: dict[str, dict[str, torch.Tensor]],
                    noise: Noise, targets, f, var_eps: float, quirk: bool = False, one_hot_vocab: int = 0):
    """dF/d(m, pi, Xi) of every group at the beliefs r, written out as local rules (the reference
    for autograd; F summed over the batch and steps).

    Per group with presynaptic activity a_j and postsynaptic error g_i = dF/d(pre-activation)_i
    (-(r_i - h_i) for the beliefs, softmax(z)_i - y_i for the read-out):
        dF/dmu_ij = sum g_i a_j,   dF/dvar_ij = sum g_i eps_i s_i a_j^2,  s_i = 1 / (2 sqrt(Delta_i))
    (s = 1/2 with the quirk), then through mu = (1-pi) m and var = (1-pi)(Xi + pi m^2) to m, pi, Xi.
    """
    w_in, w_rec, w_out = (moments[g] for g in GROUPS)
    if one_hot_vocab:
        x = F.one_hot(x_or_idx, one_hot_vocab).to(r.dtype)
    else:
        x = x_or_idx
    prev = f(torch.cat([r0[:, None], r[:, :-1]], dim=1))  # B, T, N
    a = f(r)
    delta_h = (x * x) @ w_in.var.t() + (prev * prev) @ w_rec.var.t() + var_eps
    h = x @ w_in.mu.t() + prev @ w_rec.mu.t()
    delta_z = (a * a) @ w_out.var.t() + var_eps
    z = a @ w_out.mu.t()
    if noise.h is not None:
        h = h + noise.h * delta_h.sqrt()
    if noise.z is not None:
        z = z + noise.z * delta_z.sqrt()
    g_h = -(r - h)  # B, T, N
    seen = (targets >= 0).to(r.dtype)[..., None]
    g_z = (z.softmax(-1) - F.one_hot(targets.clamp(min=0), z.shape[-1]).to(r.dtype)) * seen  # B, T, V

    def var_error(g, eps, delta):
        if eps is None:
            return torch.zeros_like(g)
        s = 0.5 if quirk else 0.5 / delta.sqrt()
        return g * eps * s

    v_h, v_z = var_error(g_h, noise.h, delta_h), var_error(g_z, noise.z, delta_z)
    outer = {  # group -> (dF/dmu, dF/dvar), each (out, in)
        "w_in": (_outer(g_h, x), _outer(v_h, x * x)),
        "w_rec": (_outer(g_h, prev), _outer(v_h, prev * prev)),
        "w_out": (_outer(g_z, a), _outer(v_z, a * a)),
    }
    grads = {}
    for group, (d_mu, d_var) in outer.items():
        m, pi, xi = (params[group][k] for k in ("m", "pi", "xi"))
        grads[group] = {
            "m": d_mu * (1 - pi) + d_var * 2 * pi * (1 - pi) * m,
            "pi": -d_mu * m + d_var * (-xi + (1 - 2 * pi) * m * m),
            "xi": d_var * (1 - pi),
        }
    return grads


def _outer(post: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """sum over batch and time of post_i pre_j: (out, in)."""
    return torch.einsum("bti,btj->ij", post, pre)


# --------------------------------------------------------------------------------------------
# the model

class SpikeSlab(nn.Module):
    """One weight group (out, in): the slab mean m, the spike probability pi, the slab variance Xi."""

    def __init__(self, n_out: int, n_in: int, std: float, init_pi: float, init_xi: float):
        super().__init__()
        self.m = nn.Parameter(torch.randn(n_out, n_in) * std)
        self.pi = nn.Parameter(torch.rand(n_out, n_in) * init_pi)
        self.xi = nn.Parameter(torch.full((n_out, n_in), init_xi * std * std))

    def moments(self) -> Moments:
        return spike_slab_moments(self.m, self.pi, self.xi)

    @torch.no_grad()
    def project_(self) -> None:
        """The paper's clamp after an update: pi in [0, 1], Xi >= 0."""
        self.pi.clamp_(0.0, 1.0)
        self.xi.clamp_(min=0.0)


class MPL(ModelBase):
    model_type = "mpl"
    config_class = MPLConfig
    activation_sites = ()
    # (m, pi, Xi) are distribution parameters: weight decay would push pi and Xi to 0 by itself
    no_weight_decay = True

    def __init__(self, config: MPLConfig):
        super().__init__()
        self.config = config
        N, I, V = config.n_hidden, config.n_inputs, config.vocab_size
        in_std = 1.0 if config.input_size == 0 else 1.0 / math.sqrt(I)
        self.w_in = SpikeSlab(N, I, in_std, config.init_pi, config.init_xi)
        self.w_rec = SpikeSlab(N, N, 1.0 / math.sqrt(N), config.init_pi, config.init_xi)
        self.w_out = SpikeSlab(V, N, 1.0 / math.sqrt(N), config.init_pi, config.init_xi)

    @property
    def f(self):
        return activation(self.config.activation)

    def groups(self) -> dict[str, SpikeSlab]:
        return {name: getattr(self, name) for name in GROUPS}

    def num_params(self, embeddings: bool = True) -> int:
        """All parameters, or without the input and read-out groups."""
        total = sum(p.numel() for p in self.parameters())
        if embeddings:
            return total
        return sum(p.numel() for p in self.w_rec.parameters())

    def init_state(self, batch_size: int, device=None) -> MPLState:
        device = device if device is not None else self.w_rec.m.device
        return MPLState(r=[torch.zeros(batch_size, self.config.n_hidden, device=device)],
                        pos=torch.zeros(batch_size, dtype=torch.long, device=device))

    def draw_noise(self, B: int, T: int, device) -> Noise:
        c = self.config
        noisy = c.noise if self.training else c.eval_noise
        if not noisy:
            return Noise(None, None)
        return Noise(h=torch.randn(B, T, c.n_hidden, device=device), z=torch.randn(B, T, c.vocab_size, device=device))

    def forward(self, idx: torch.Tensor, targets=None, state: MPLState | None = None, return_state: bool = True):
        """idx (B, T) tokens -> ModelOutput(logits (B, T, V), loss, state after the last token).

        Training with targets (learning="pc"): loss is the energy F per token at the converged
        beliefs (so backward gives the local update) and logits are the forward pass's
        predictions. Otherwise: the forward pass and its mean next-token cross-entropy.
        """
        if idx.dim() != 2:
            raise UserError(f"MPL takes token ids (B, T), got shape {tuple(idx.shape)}")
        return self.run(idx, None, targets, state, return_state)

    def run(self, idx, x, targets, state, return_state=True) -> ModelOutput:
        """The shared path of tokens (idx) and dense inputs (x (B, T, I), input_size > 0)."""
        B, T = idx.shape if idx is not None else x.shape[:2]
        device = self.w_rec.m.device
        r0 = self._start(state, B, device)
        if self.training and targets is not None:
            for group in self.groups().values():
                group.project_()
        moments = {name: g.moments() for name, g in self.groups().items()}
        noise = self.draw_noise(B, T, device)
        drive = input_drive(moments["w_in"], idx=idx, x=x)
        pc = self.training and targets is not None and self.config.learning == "pc"
        if pc:
            loss, r, z = self._pc_loss(r0, drive, moments, noise, targets)
        else:
            r = forward_beliefs(r0, drive, moments["w_rec"], self.f, noise.h, self.config.var_eps)
            z = readout(r, moments["w_out"], self.f, noise.z, self.config.var_eps, False)
            loss = next_token_loss(z, targets)
        new_state = None
        if return_state:
            new_state = MPLState(r=[r[:, -1].detach()], pos=next_positions(state, B, T, device))
        return ModelOutput(logits=z.float(), loss=loss, state=new_state)

    def _start(self, state, B, device) -> torch.Tensor:
        if state is None:
            return torch.zeros(B, self.config.n_hidden, device=device)
        if not isinstance(state, MPLState) or len(state.r) != 1 or tuple(state.r[0].shape) != (B, self.config.n_hidden):
            raise UserError(f"state does not fit this MPL model: expected one belief (B, N) = ({B}, {self.config.n_hidden})")
        return state.r[0].detach()

    def _pc_loss(self, r0, drive, moments, noise, targets):
        """Inference on frozen parameters and noise, then F per token at r* (the graph reaches only theta)."""
        c, f = self.config, self.f
        w_rec, w_out = moments["w_rec"], moments["w_out"]
        with torch.no_grad():
            r_init = forward_beliefs(r0, tuple(d.detach() for d in drive), Moments(w_rec.mu.detach(), w_rec.var.detach()),
                                     f, noise.h, c.var_eps)
            z = readout(r_init, Moments(w_out.mu.detach(), w_out.var.detach()), f, noise.z, c.var_eps, False)
        r_star = infer(r_init, r0, drive, w_rec, w_out, noise, targets, f, c)
        gauss, ce = energy_terms(r_star, r0, drive, w_rec, w_out, noise, targets, f, c.var_eps, c.quirk_variance_grad)
        return (gauss + ce).mean(), r_star, z

    @torch.no_grad()
    def step(self, idx: torch.Tensor, state: MPLState) -> ModelOutput:
        """One token per sequence (B, 1) on top of the belief: the forward pass with T = 1."""
        return self(idx, state=state)
