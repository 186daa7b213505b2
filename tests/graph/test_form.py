"""The graph form (bdh.graph) equals BDH-GPU in the eq8 layout without LayerNorm (the paper's
Observation 4), its naive per-neuron loop equals its vectorised form, and its sigma is the synapse
state of Eq. 16 that bdh.interp computes."""

import pytest
import torch

from bdh import BDH, BDHConfig, UserError
from bdh.graph import from_model
from bdh.graph.naive import naive_forward
from bdh.interp.synapses import synapse_state
from tests.eq8_rendering import rho_from_state
from tests.test_model import rel_err

U_KINDS = {"identity": {}, "alibi": {"decay": "alibi"}, "rope": {}, "rope-alibi": {"decay": "alibi"}}


def graph_model(U="rope", n_embd=32, n_head=2, multiplier=8, vocab_size=256, **overrides):
    """BDH-Normfree in the eq8 layout, weights scaled so that every part of the logits matters."""
    config = dict(n_layer=3, n_embd=n_embd, n_head=n_head, mlp_internal_dim_multiplier=multiplier,
                  vocab_size=vocab_size, dropout=0.0, layout="eq8", layernorm=False)
    model = BDH(BDHConfig(**{**config, **U_KINDS[U], **overrides}))
    with torch.no_grad():
        for p in (model.encoder, model.encoder_v, model.decoder):
            p.normal_(std=0.1)
        model.embed.weight.normal_(std=1.0)
        model.lm_head.normal_(std=0.3)
        if not U.startswith("rope"):
            model.freqs.zero_()  # no rotation: U is the decay alone (the identity without decay)
    return model.eval()


@pytest.mark.parametrize("U", U_KINDS)
def test_graph_form_equals_bdh_gpu_eq8_normfree(U):
    """n = 256 neurons, 64 tokens, two sequences: per-token logits to 1e-5 relative, and the
    synapse state, read through E (f_e for layer 1), is the model's rho in the paper's frame."""
    model = graph_model(U)
    assert model.config.n_neurons == 256
    idx = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        out = model(idx)
    graph = from_model(model)
    assert graph.exact
    logits, state = graph.forward(idx)
    assert logits.shape == (2, 64, 256)
    assert rel_err(logits, out.logits.double()) < 1e-5
    nh, N = 2, 128
    senders = [model.embed.weight.double()] + [model.decoder.double()] * 2  # n_src, D
    freqs = model.freqs.double()[:, ::2]
    for sigma, W, S in zip(state.sigma, senders, out.state.rho):
        rho = torch.einsum("bid,bihn->bhdn", W.expand(2, -1, -1), sigma.view(2, -1, nh, N))  # B, nh, D, N
        assert rel_err(rho, rho_from_state(S, freqs, 64)) < 1e-5


@pytest.mark.parametrize("U", ["identity", "alibi"])
def test_sigma_is_the_synapse_state_of_interp(U):
    """Without rotation, the head-diagonal blocks of the graph's sigma are bdh.interp's Eq. 16 sigma,
    times lambda_h: the graph's sigma after token t has had U of token t applied (Eq. 6, as the
    model's rho), where bdh.interp counts the newest token with weight 1."""
    model = graph_model(U)
    lam = torch.ones(2, dtype=torch.float64) if model.decay is None else model.decay.double()
    ids = torch.randint(0, 256, (70,))
    _, state = from_model(model).forward(ids[None])
    interp = synapse_state(model, ids.tolist(), chunk_len=32)
    N = model.config.neurons_per_head
    for layer, s in interp.items():
        blocks = torch.stack([state.sigma[layer][0, h * N:(h + 1) * N, h * N:(h + 1) * N] for h in range(2)])
        assert rel_err(blocks, s.double() * lam.view(2, 1, 1)) < 1e-5


def test_graph_state_carries_across_calls():
    model = graph_model("rope-alibi")
    graph = from_model(model)
    idx = torch.randint(0, 256, (1, 20))
    whole, s_whole = graph.forward(idx)
    a, s = graph.forward(idx[:, :7])
    b, s = graph.forward(idx[:, 7:], s)
    assert rel_err(torch.cat((a, b), dim=1), whole) < 1e-10
    assert all(rel_err(x, y) < 1e-10 for x, y in zip(s.sigma, s_whole.sigma))
    assert int(s.pos[0]) == 20


@pytest.mark.parametrize("fraction", [1.0, 0.3], ids=["dense", "thresholded"])
def test_naive_neuron_loop_equals_vectorised(fraction):
    model = graph_model("rope-alibi", n_embd=8, n_head=2, multiplier=4, vocab_size=24)
    graph = from_model(model).with_graphs(fraction)
    assert graph.G_x.n_edges == pytest.approx(fraction * 32 * 32, abs=1)
    idx = torch.randint(0, 24, (2, 6))
    fast, s_fast = graph.forward(idx)
    slow, s_slow = naive_forward(graph, idx[:, :4])
    slow2, s_slow = naive_forward(graph, idx[:, 4:], s_slow)  # the carried state too
    assert rel_err(torch.cat((slow, slow2), dim=1), fast) < 1e-10
    for a, b in zip(s_slow.sigma, s_fast.sigma):
        assert rel_err(a, b) < 1e-10


def test_excitatory_and_inhibitory_parts():
    graph = from_model(graph_model("identity"))
    G = graph.G_x
    assert (G.excite >= 0).all() and (G.inhibit >= 0).all() and not (G.excite * G.inhibit).any()
    model = graph_model("identity")
    want = model.decoder.double() @ model.encoder.double().permute(1, 0, 2).reshape(32, -1)  # E D_x: n x n
    assert rel_err(from_model(model).G_x.to_matrix(), want) < 1e-12


def test_thresholding_keeps_the_strongest_edges():
    G = from_model(graph_model("identity")).G_y
    kept = G.keep_strongest(0.1)
    assert kept.n_edges == -(-G.n_edges // 10)
    assert (kept.excite + kept.inhibit).min() >= torch.kthvalue(-(G.excite + G.inhibit), kept.n_edges).values.neg()
    with pytest.raises(UserError, match="fraction"):
        G.keep_strongest(0.0)


def test_graph_form_of_other_layouts_is_marked_inexact():
    for overrides in ({"layernorm": True}, {"layout": "reference"}):
        assert not from_model(graph_model("identity", **overrides)).exact
