"""layout="eq8" is the paper's Eq. 8 (Eq. 7 with layernorm=False) in every path: op-by-op forms,
carried state, decoding (dense and sparse). Checked against tests/eq8_rendering.py, a token-by-token
rendering of the three lines, on logits and on the carried state rho."""

import pytest
import torch

from tests.eq8_rendering import assert_forward_is_rendering, assert_state_equals, render, rho_from_state
from tests.test_generate import silence_most_neurons
from tests.test_model import make_model, rel_err

NORMS = {"ln": {}, "normfree": {"layernorm": False}}
DECAYS = {"nodecay": {}, "alibi": {"decay": "alibi"}}


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("impl", ["naive", "chunked", "recurrent", "auto"])
def test_eq8_forward_is_the_papers_three_lines(impl, norm, decay):
    model = make_model(layout="eq8", attn_impl=impl, chunk_size=5, **NORMS[norm], **DECAYS[decay])
    assert_forward_is_rendering(model, torch.randint(0, 256, (2, 23)))


@pytest.mark.parametrize("layout", ["reference", "xacc-residual"])
def test_other_layouts_are_their_rendering(layout):
    """The rendering is not tailored to eq8: it gives the other layouts too, and they differ from eq8."""
    model = make_model(layout=layout, decay="alibi")
    idx = torch.randint(0, 256, (2, 17))
    logits = assert_forward_is_rendering(model, idx)
    eq8_logits, _ = render(model, idx, layout="eq8")
    assert rel_err(eq8_logits, logits) > 0.1


@pytest.mark.parametrize("norm", NORMS)
def test_eq8_carried_state_continues_the_three_lines(norm):
    """Pieces on a carried state, and a rendering that starts from the model's state, agree."""
    model = make_model(layout="eq8", decay="alibi", chunk_size=4, **NORMS[norm])
    idx = torch.randint(0, 256, (2, 30))
    logits, rho = render(model, idx)
    freqs = model.freqs.double()[:, ::2]
    with torch.no_grad():
        state, pieces = None, []
        for a, b in ((0, 7), (7, 8), (8, 19), (19, 30)):
            out = model(idx[:, a:b], state=state)
            pieces.append(out.logits)
            if a == 8:  # render the rest from the model's own state at position 8
                rest, rest_rho = render(model, idx[:, 8:], rho=[rho_from_state(S, freqs, 8) for S in state.rho])
            state = out.state
    assert rel_err(torch.cat(pieces, dim=1).double(), logits) < 1e-5
    assert rel_err(rest, logits[:, 8:]) < 1e-5
    assert_state_equals(model, state, rho)
    for r, r_full in zip(rest_rho, rho):
        assert rel_err(r, r_full) < 1e-5


@pytest.mark.parametrize("threshold", [0.0, 1.0], ids=["dense", "sparse"])
@pytest.mark.parametrize("norm", NORMS)
def test_eq8_decoding_is_the_three_lines(norm, threshold):
    """Prefill, then model.step token by token (dense, or touching only active neurons)."""
    model = make_model(layout="eq8", sparse_decode_below=threshold, **NORMS[norm])
    with torch.no_grad():
        silence_most_neurons(model)
        idx = torch.randint(0, 256, (3, 14))
        state = model(idx[:, :6]).state
        logits = []
        for t in range(6, 14):
            logits.append(model.step(idx[:, t : t + 1], state).logits)
    want, rho = render(model, idx)
    assert rel_err(torch.cat(logits, dim=1).double(), want[:, 6:]) < 1e-5
    assert_state_equals(model, state, rho)


def test_eq8_decoding_with_decay_is_the_three_lines():
    model = make_model(layout="eq8", decay="alibi", layernorm=False)
    idx = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        state = model.init_state(2)
        logits = [model.step(idx[:, t : t + 1], state).logits for t in range(10)]
    want, rho = render(model, idx)
    assert rel_err(torch.cat(logits, dim=1).double(), want) < 1e-5
    assert_state_equals(model, state, rho)


def test_eq8_hands_on_no_d_space_residual():
    """With one layer, the logits depend on the token only through E y: zeroing E zeroes them (no v + z)."""
    model = make_model(layout="eq8", n_layer=1)
    with torch.no_grad():
        model.decoder.zero_()
        assert model(torch.randint(0, 256, (1, 5))).logits.abs().max() == 0
        model.config.layout = "xacc-residual"
        assert model(torch.randint(0, 256, (1, 5))).logits.abs().max() > 0
