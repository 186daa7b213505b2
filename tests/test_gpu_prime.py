"""BDH-GPU' (variant="gpu-prime", our reconstruction): every path against a token-by-token rendering
of its equations (tests/eq8_rendering.py), the gated attention forms against each other (outputs,
states, gradients), checkpoints and the command line."""

import pytest
import torch

from bdh import BDHConfig, UserError, load_model, save_model
from bdh.cli import main
from bdh.ops.gated import gated_chunked, gated_naive, gated_recurrent
from tests.eq8_rendering import assert_forward_is_rendering, assert_state_equals, render
from tests.helpers import losses, tiny_args, write_text
from tests.test_model import make_model, rel_err


def prime_model(**overrides):
    """Gates far from 1, so that they matter in the logits."""
    model = make_model(variant="gpu-prime", n_layer=3, **overrides)
    with torch.no_grad():
        for p in (model.gate_in, model.gate_forget, model.logit_gate):
            p.normal_(std=0.5)
        model.gate_in_bias.normal_(std=1.0)
        model.gate_forget_bias.normal_(std=1.0)
        model.logit_gate_bias.normal_(std=1.0)
    return model


@pytest.mark.parametrize("layout", ["reference", "eq8"])
@pytest.mark.parametrize("decay", [None, "alibi"], ids=["nodecay", "alibi"])
@pytest.mark.parametrize("impl", ["naive", "chunked", "recurrent", "auto"])
def test_gpu_prime_forward_is_its_equations(impl, decay, layout):
    model = prime_model(attn_impl=impl, chunk_size=5, decay=decay, layout=layout)
    idx = torch.randint(0, 256, (2, 19))
    logits = assert_forward_is_rendering(model, idx)
    model.config.variant = "gpu"  # the same weights without the gates give other logits
    assert rel_err(render(model, idx)[0], logits) > 0.05


def test_gpu_prime_carried_state_and_decoding_are_its_equations():
    model = prime_model(decay="alibi", chunk_size=4, sparse_decode_below=1.0)
    idx = torch.randint(0, 256, (2, 24))
    want, rho = render(model, idx)
    with torch.no_grad():
        state, pieces = None, []
        for a, b in ((0, 6), (6, 7), (7, 15)):
            out = model(idx[:, a:b], state=state)
            pieces.append(out.logits)
            state = out.state
        for t in range(15, 24):
            pieces.append(model.step(idx[:, t : t + 1], state).logits)  # O(1) decoding, state in place
    assert rel_err(torch.cat(pieces, dim=1).double(), want) < 1e-5
    assert_state_equals(model, state, rho)


@pytest.mark.parametrize("form", [gated_chunked, gated_recurrent], ids=["chunked", "recurrent"])
def test_gated_forms_equal_on_outputs_states_and_gradients(form):
    torch.manual_seed(0)
    B, nh, T, N, D = 2, 3, 11, 8, 4
    q = torch.randn(B, nh, T, N, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, nh, T, N, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, nh, T, D, dtype=torch.float64, requires_grad=True)
    log_f = (-torch.rand(B, nh, T, dtype=torch.float64) * 3).requires_grad_()  # gates down to e^-3
    S0 = torch.randn(B, nh, N, D, dtype=torch.float64, requires_grad=True)
    results = []
    for fn in (gated_naive, form):
        kw = {"chunk_size": 4} if fn is gated_chunked else {}
        o, S = fn(q, k, v, log_f, S0, **kw)
        grads = torch.autograd.grad((o * o.detach().sin()).sum() + (S * 0.1).sum(), (q, k, v, log_f, S0))
        results.append((o, S, *grads))
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-10


def test_gated_naive_survives_tiny_gates():
    """A forget gate of e^-200 per token over 64 tokens: no overflow (differences of cumulative logs)."""
    q, k = torch.rand(1, 1, 64, 4), torch.rand(1, 1, 64, 4)
    o, S = gated_naive(q, k, torch.rand(1, 1, 64, 2), torch.full((1, 1, 64), -200.0))
    assert torch.isfinite(o).all() and torch.isfinite(S).all()


def test_gpu_prime_runs_op_by_op_and_says_so():
    model = prime_model()
    assert model.engine(16) in ("naive", "chunked")
    assert make_model().engine(16) == "fused:chunked/16"
    with pytest.raises(UserError, match="variant gpu"):
        prime_model(fused=True)(torch.zeros(1, 16, dtype=torch.long))


def test_gpu_prime_trains_with_gradients_on_every_gate():
    model = prime_model().train()
    idx = torch.randint(0, 256, (2, 12))
    model(idx, targets=idx).loss.backward()
    for name in ("gate_in", "gate_in_bias", "gate_forget", "gate_forget_bias", "logit_gate", "logit_gate_bias"):
        assert getattr(model, name).grad.abs().sum() > 0, name


def test_gpu_prime_parameters_and_checkpoint(tmp_path):
    model = prime_model()
    assert model.num_params() == model.config.num_params()
    c = model.config
    assert c.num_params() - BDHConfig.from_name("tiny", n_layer=3).num_params() == \
        2 * (c.n_embd * c.n_head + c.n_head) + c.n_embd + c.n_layer
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config.variant == "gpu-prime"
    idx = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(idx).logits, model(idx).logits)
    with pytest.raises(UserError, match="variant must be one of"):
        BDHConfig(variant="gpu2")


def test_bdh_train_model_arg_variant_gpu_prime(tmp_path):
    data = write_text(tmp_path / "data.txt")
    run = tmp_path / "run"
    assert main(tiny_args(data, run, "--model-arg", "variant=gpu-prime", steps=3)) == 0
    assert len(losses(run)) == 3
    assert load_model(run).config.variant == "gpu-prime"
