"""MPL (Li, Qiu, Huang, arXiv 2309.04106): the energy against a direct rendering of the paper's
equations, the local update against autograd, inference lowering the energy, the training
forward's gradient being dF/dtheta at the converged beliefs, and a short toy-language run."""

import math

import pytest
import torch

from bdh.baselines.mpl import (GROUPS, MPL, MPLConfig, Noise, energy_terms, forward_beliefs, infer, input_drive,
                               local_gradients, spike_slab_moments)
from bdh.errors import UserError
from bdh.train.optim import make_optimizer



@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def tiny_model(**overrides):
    torch.manual_seed(0)
    values = dict(vocab_size=7, n_hidden=5, inference_steps=8, inference_optimizer="sgd", inference_lr=0.1,
                  init_pi=0.4, init_xi=0.5)
    model = MPL(MPLConfig(**{**values, **overrides}))
    with torch.no_grad():  # interior values, so the clamps are inactive
        for g in model.groups().values():
            g.pi.uniform_(0.05, 0.6)
            g.xi.uniform_(0.05, 0.5)
    return model


def batch(model, B=3, T=4):
    V = model.config.vocab_size
    idx = torch.randint(0, V, (B, T))
    targets = torch.randint(0, V, (B, T))
    targets[0, 1] = -1  # an ignored target
    noise = Noise(h=torch.randn(B, T, model.config.n_hidden), z=torch.randn(B, T, V))
    return idx, targets, noise


def direct_energy(model, r, r0, idx, targets, noise):
    """F written element by element from the paper's equations (no shared code but f)."""
    f, eps = model.f, model.config.var_eps
    W = {}
    for name, g in model.groups().items():
        m, pi, xi = g.m, g.pi, g.xi
        mu = (1 - pi) * m
        rho = (1 - pi) * (m ** 2 + xi)
        W[name] = (mu, rho - mu ** 2)
    B, T, N = r.shape
    total = torch.zeros(())
    for b in range(B):
        prev = r0[b]
        for t in range(T):
            x = torch.zeros(model.config.vocab_size)
            x[idx[b, t]] = 1.0
            for i in range(N):
                mean = sum(W["w_rec"][0][i, j] * f(prev[j]) for j in range(N)) + sum(
                    W["w_in"][0][i, j] * x[j] for j in range(len(x)))
                delta = sum(W["w_rec"][1][i, j] * f(prev[j]) ** 2 for j in range(N)) + sum(
                    W["w_in"][1][i, j] * x[j] ** 2 for j in range(len(x)))
                h = mean + noise.h[b, t, i] * torch.sqrt(delta + eps)
                total = total + 0.5 * (r[b, t, i] - h) ** 2
            z = []
            for k in range(model.config.vocab_size):
                mean = sum(W["w_out"][0][k, j] * f(r[b, t, j]) for j in range(N))
                delta = sum(W["w_out"][1][k, j] * f(r[b, t, j]) ** 2 for j in range(N))
                z.append(mean + noise.z[b, t, k] * torch.sqrt(delta + eps))
            z = torch.stack(z)
            if targets[b, t] >= 0:
                total = total - (z[targets[b, t]] - torch.logsumexp(z, 0))
            prev = r[b, t]
    return total


def energy(model, r, r0, idx, targets, noise, quirk=False):
    moments = {name: g.moments() for name, g in model.groups().items()}
    drive = input_drive(moments["w_in"], idx=idx)
    gauss, ce = energy_terms(r, r0, drive, moments["w_rec"], moments["w_out"], noise, targets, model.f,
                             model.config.var_eps, quirk)
    return (gauss + ce).sum()


def test_moments_are_the_spike_and_slab_mean_and_variance():
    m, pi, xi = torch.tensor([0.7, -1.2]), torch.tensor([0.3, 0.0]), torch.tensor([0.2, 0.5])
    mo = spike_slab_moments(m, pi, xi)
    # P(w) = pi delta(w) + (1 - pi) N(m, Xi): E w = (1 - pi) m, E w^2 = (1 - pi)(m^2 + Xi)
    assert torch.allclose(mo.mu, (1 - pi) * m)
    assert torch.allclose(mo.var, (1 - pi) * (m ** 2 + xi) - ((1 - pi) * m) ** 2)
    # sampled weights agree
    torch.manual_seed(0)
    n = 200_000
    w = torch.where(torch.rand(n, 2) < pi, 0.0, m + xi.sqrt() * torch.randn(n, 2))
    assert torch.allclose(w.mean(0), mo.mu, atol=0.01) and torch.allclose(w.var(0), mo.var, atol=0.02)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_energy_matches_the_paper_equations_written_out(activation):
    model = tiny_model(activation=activation)
    idx, targets, noise = batch(model)
    r = torch.randn(3, 4, 5)
    r0 = torch.randn(3, 5)
    assert torch.allclose(energy(model, r, r0, idx, targets, noise), direct_energy(model, r, r0, idx, targets, noise))


@pytest.mark.parametrize("quirk", [False, True])
@pytest.mark.parametrize("with_noise", [True, False])
def test_local_update_equals_autograd_of_the_energy(quirk, with_noise):
    model = tiny_model()
    idx, targets, noise = batch(model)
    noise = noise if with_noise else Noise(None, None)
    r, r0 = torch.randn(3, 4, 5), torch.randn(3, 5)
    energy(model, r, r0, idx, targets, noise, quirk).backward()
    params = {name: {"m": g.m, "pi": g.pi, "xi": g.xi} for name, g in model.groups().items()}
    moments = {name: g.moments() for name, g in model.groups().items()}
    with torch.no_grad():
        local = local_gradients(r, r0, idx, moments, params, noise, targets, model.f, model.config.var_eps, quirk,
                                one_hot_vocab=7)
    for name in GROUPS:
        for key in ("m", "pi", "xi"):
            grad = params[name][key].grad  # None: no path (Xi without noise)
            assert torch.allclose(local[name][key], torch.zeros(()) if grad is None else grad, atol=1e-10), (name, key)


def test_quirk_changes_only_the_variance_path_gradient():
    model = tiny_model()
    idx, targets, noise = batch(model)
    r, r0 = torch.randn(3, 4, 5), torch.randn(3, 5)
    grads = []
    for quirk in (False, True):
        model.zero_grad()
        value = energy(model, r, r0, idx, targets, noise, quirk)
        value.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert torch.allclose(value, energy(model, r, r0, idx, targets, noise, False))
    assert not torch.allclose(grads[0]["w_rec.xi"], grads[1]["w_rec.xi"])


def test_inference_steps_lower_the_energy():
    model = tiny_model(inference_steps=1)
    idx, targets, noise = batch(model)
    r0 = torch.zeros(3, 5)
    moments = {name: g.moments() for name, g in model.groups().items()}
    drive = input_drive(moments["w_in"], idx=idx)
    with torch.no_grad():
        r = forward_beliefs(r0, drive, moments["w_rec"], model.f, noise.h, model.config.var_eps)
    values = [float(energy(model, r, r0, idx, targets, noise).detach())]
    for _ in range(30):
        r = infer(r, r0, drive, moments["w_rec"], moments["w_out"], noise, targets, model.f, model.config)
        values.append(float(energy(model, r, r0, idx, targets, noise).detach()))
    # the forward pass zeroes the prediction errors; inference trades them for a lower CE
    assert all(b < a for a, b in zip(values, values[1:]))
    assert values[-1] < values[0] - 1.0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_forward_gives_the_local_update_at_the_converged_beliefs(optimizer):
    model = tiny_model(inference_optimizer=optimizer, inference_lr=0.1 if optimizer == "sgd" else 0.01).train()
    idx, targets, _ = batch(model)
    torch.manual_seed(5)
    out = model(idx, targets)
    out.loss.backward()
    # redo the same batch by hand: same noise (same RNG draws), same inference, then the local rule
    torch.manual_seed(5)
    noise = model.draw_noise(3, 4, None)
    moments = {name: g.moments() for name, g in model.groups().items()}
    drive = input_drive(moments["w_in"], idx=idx)
    r0 = torch.zeros(3, 5)
    with torch.no_grad():
        r = forward_beliefs(r0, drive, moments["w_rec"], model.f, noise.h, model.config.var_eps)
        r_star = infer(r, r0, drive, moments["w_rec"], moments["w_out"], noise, targets, model.f, model.config)
        params = {name: {"m": g.m, "pi": g.pi, "xi": g.xi} for name, g in model.groups().items()}
        local = local_gradients(r_star, r0, idx, moments, params, noise, targets, model.f, model.config.var_eps,
                                one_hot_vocab=7)
    assert torch.allclose(out.loss * 12, energy(model, r_star, r0, idx, targets, noise))
    for name in GROUPS:
        for key in ("m", "pi", "xi"):
            got = getattr(model.groups()[name], key).grad
            assert torch.allclose(got, local[name][key] / 12, atol=1e-10), (name, key)


def test_training_forward_clamps_pi_and_xi():
    model = tiny_model().train()
    with torch.no_grad():
        model.w_rec.pi[0, 0] = 1.3
        model.w_out.pi[0, 0] = -0.2
        model.w_in.xi[0, 0] = -0.1
    idx, targets, _ = batch(model)
    model(idx, targets)
    with torch.no_grad():
        assert float(model.w_rec.pi[0, 0]) == 1.0 and float(model.w_out.pi[0, 0]) == 0.0
        assert float(model.w_in.xi[0, 0]) == 0.0


def test_eval_is_the_mean_network_and_bptt_is_its_cross_entropy():
    model = tiny_model().eval()
    idx, targets, _ = batch(model)
    out = model(idx, targets)
    # eval: r^t = mu_rec f(r^{t-1}) + mu_in x^t, no noise; loss = mean CE of the read-out
    mu = {name: g.moments().mu for name, g in model.groups().items()}
    r, logits = torch.zeros(3, 5), []
    for t in range(4):
        r = model.f(r) @ mu["w_rec"].t() + mu["w_in"][:, idx[:, t]].t()
        logits.append(model.f(r) @ mu["w_out"].t())
    logits = torch.stack(logits, 1)
    assert out.logits.dtype == torch.float32 and torch.allclose(out.logits.double(), logits, atol=1e-5)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    assert torch.allclose(out.loss.double(), ce, atol=1e-5)
    bptt = tiny_model(learning="bptt", noise=False).train()
    assert torch.allclose(bptt(idx, targets).loss.double(), ce, atol=1e-5)


def test_no_weight_decay_for_distribution_parameters():
    opt = make_optimizer(tiny_model(), lr=1e-3, weight_decay=0.1)
    assert all(group["weight_decay"] == 0.0 for group in opt.param_groups)


def test_bad_config_is_one_line_error():
    with pytest.raises(UserError, match="MPLConfig.learning must be one of pc, bptt"):
        MPLConfig(learning="backprop")
    assert MPLConfig.from_name("tiny").num_params() == MPL(MPLConfig.from_name("tiny")).num_params()


def test_short_toy_language_run_learns_the_rule():
    torch.set_default_dtype(torch.float32)
    from bdh.experiments.mpl_tasks import Fit, toy_run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: a shared 2-core machine runs them fastest on one thread
    try:
        row = toy_run(100, "pc", fit=Fit(epochs=5, lr=0.03), n_samples=200, n_hidden=32, inference_steps=20)
    finally:
        torch.set_num_threads(threads)
    assert row["ratio_before"] < 0.3  # chance: 2 of 26 letters
    assert row["ratio"] > 0.85
    assert math.isfinite(row["train_loss"])
