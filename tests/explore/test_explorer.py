"""What bdh explore shows, checked against direct computations on the model."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bdh import UserError
from bdh.explore import explorer as explorer_module
from bdh.explore.explorer import Explorer
from bdh.generate import generate
from bdh.interp import capture_activations, neuron_graph, synapse_state, top_synapses
from tests.explore.helpers import TEXT, tiny_checkpoint


@pytest.fixture(scope="module")
def ex(tmp_path_factory):
    return Explorer.load(tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny"), device="cpu")


def acts(ex, ids):
    return capture_activations(ex.model, ids, ("x", "y"))  # (site, layer) -> (nh, T, N)


def close(shown, exact, rel=1e-3, atol=1e-7):
    """Values the page gets (4 significant digits, or 5 decimals) against the exact ones."""
    np.testing.assert_allclose(np.asarray(shown, dtype=float), np.asarray(exact, dtype=float), rtol=rel, atol=atol)


def test_read_gives_each_positions_loss_candidates_and_active_counts(ex, monkeypatch):
    ids = ex.encode(TEXT)
    out = ex.read(TEXT, top=3)
    assert out["ids"] == ids and len(out["pieces"]) == len(ids) == out["n_tokens"]
    assert out["pieces"][3] == "␣"  # whitespace made visible
    logits = ex.model(torch.tensor([ids])).logits[0]
    loss = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    close(out["loss"][:-1], loss.detach().numpy())
    assert out["loss"][-1] is None
    probs = torch.softmax(logits, -1)
    best = torch.topk(probs, 3, dim=-1)
    assert [[c["id"] for c in row] for row in out["top"]] == best.indices.tolist()
    close([[c["p"] for c in row] for row in out["top"]], best.values.detach().numpy(), rel=0, atol=5.1e-6)
    a = acts(ex, ids)
    for site in ("x", "y"):
        counts = np.asarray(out[f"{site}_active"])  # T, L, nh
        for layer in range(ex.n_layer):
            assert counts[:, layer].T.tolist() == (a[(site, layer)] > 0).sum(-1).tolist()
    assert 0 < np.asarray(out["y_active"]).sum() < np.asarray(out["x_active"]).sum()
    # reading in pieces of a few tokens, the state carried, changes nothing
    monkeypatch.setattr(explorer_module, "CHUNK", 5)
    pieces = ex.read(TEXT, top=3)
    assert pieces["x_active"] == out["x_active"] and pieces["top"] == out["top"]
    close(pieces["loss"][:-1], out["loss"][:-1])


def test_position_shows_that_positions_neurons_and_the_most_active(ex):
    ids = ex.encode(TEXT)
    t = 9
    out = ex.position(TEXT, t)
    a = acts(ex, ids)
    for site in ("x", "y"):
        exact = torch.stack([a[(site, l)][:, t] for l in range(ex.n_layer)])  # L, nh, N
        close(out[site], exact.numpy())
        assert out[f"{site}_active"] == (exact > 0).sum(-1).tolist()
    y = torch.stack([a[("y", l)][:, t] for l in range(ex.n_layer)])
    first = out["top_y"][0]
    assert y[first["layer"], first["head"], first["neuron"]] == y.max()
    assert out["token"]["context"].startswith("The king [a]nd")
    with pytest.raises(UserError, match="outside the text"):
        ex.position(TEXT, len(ids))


def test_neuron_values_positions_and_edges_of_the_neuron_graph(ex):
    ids = ex.encode(TEXT)
    layer, head, i = 1, 1, ex.position(TEXT, 5)["top_y"][0]["neuron"]
    out = ex.neuron(TEXT, layer, head, i, site="y", top=4, edges=5)
    exact = acts(ex, ids)[("y", layer)][head, :, i]
    close(out["values"], exact.numpy())
    assert out["fires"] == int((exact > 0).sum())
    assert [s["position"] for s in out["strongest"]] == torch.argsort(exact, descending=True)[:4].tolist()
    G = neuron_graph(ex.model)
    g = head * ex.N + i
    assert out["index"] == g
    for key, weights in (("out_edges", G[g].clone()), ("in_edges", G[:, g].clone())):
        weights[g] = -float("inf")  # no self-loop
        assert [e["index"] for e in out[key]] == torch.topk(weights, 5).indices.tolist()
        close([e["weight"] for e in out[key]], torch.topk(weights, 5).values.numpy())
    with pytest.raises(UserError, match="no neuron"):
        ex.neuron(TEXT, ex.n_layer, 0, 0)


def test_synapses_after_a_position_are_eq16_and_a_trace_grows_to_them(ex):
    ids = ex.encode(TEXT)
    t = 20
    out = ex.synapses(TEXT, t, k=5)
    expected = top_synapses(synapse_state(ex.model, ids[:t + 1]), 5)
    assert [(d["layer"], d["head"], d["i"], d["j"]) for d in out["top"]] == \
        [(d["layer"], d["head"], d["i"], d["j"]) for d in expected]
    best = out["top"][0]
    a = acts(ex, ids)
    l, h, i, j = best["layer"], best["head"], best["i"], best["j"]
    eq16 = float((a[("y", l - 1)][h, :t + 1, i] * a[("x", l)][h, :t + 1, j]).sum())  # sum over tau <= t
    close([best["value"]], [eq16])
    trace = ex.trace(TEXT, l, h, i, j)
    assert len(trace["values"]) == len(ids)
    close([trace["values"][t]], [eq16])
    close(np.cumsum(trace["increments"]), trace["values"], rel=2e-3)
    with pytest.raises(UserError, match="no synapse"):
        ex.trace(TEXT, 0, 0, 0, 0)


def test_generation_prefills_once_then_steps_on_the_carried_state(ex, monkeypatch):
    calls = {"forward": 0, "step": 0}
    forward, step = ex.model.forward, ex.model.step

    def counting_forward(*a, **k):
        calls["forward"] += 1
        return forward(*a, **k)

    def counting_step(*a, **k):
        calls["step"] += 1
        return step(*a, **k)

    monkeypatch.setattr(ex.model, "forward", counting_forward)
    monkeypatch.setattr(ex.model, "step", counting_step)
    events = list(ex.generate(TEXT, 12, temperature=0.0))
    assert calls == {"forward": 1, "step": 12}
    monkeypatch.undo()
    ids = ex.encode(TEXT)
    greedy = generate(ex.model, torch.tensor([ids]), 12, temperature=0)[0, len(ids):].tolist()
    assert [e["id"] for e in events] == greedy
    assert "".join(e["text"] for e in events) == ex.tokenizer.decode(greedy)
    assert [e["position"] for e in events] == list(range(len(ids), len(ids) + 12))
    assert all(len(e["y_active"]) == ex.n_layer and 0 < sum(e["x_active"]) for e in events)
    sampled = [e["id"] for e in ex.generate(TEXT, 8, temperature=1.0, top_k=10, seed=3)]
    assert sampled == [e["id"] for e in ex.generate(TEXT, 8, temperature=1.0, top_k=10, seed=3)]
    with pytest.raises(UserError, match="temperature"):
        ex.generate(TEXT, 4, temperature=-1)


def test_concept_synapses_of_a_contrast_set_and_where_they_fire(ex, monkeypatch):
    sets = {"money_en": ["I paid the bank.", "Money in the bank.", "He owes me money."],
            "weather_en": ["It rains today.", "The sun is hot.", "Snow fell at night."]}
    monkeypatch.setattr(explorer_module, "contrast_set", lambda name: sets[name])
    out = ex.concepts(TEXT, "money_en", "weather_en", top=4)
    assert out["concept"] == "money_en" and len(out["top"]) == 4
    ids = ex.encode(TEXT)
    a = acts(ex, ids)
    for d, fires in zip(out["top"], out["fires"]):
        inc = a[("y", d["layer"] - 1)][d["head"], :, d["i"]] * a[("x", d["layer"])][d["head"], :, d["j"]]
        assert fires == torch.nonzero(inc > 0).flatten().tolist()
    s = out["top"][0]
    assert ex._concept_keys()[(s["layer"], s["head"], s["i"], s["j"])] == "money_en vs weather_en"


def test_a_model_without_neurons_is_refused(tmp_path):
    from bdh.baselines.gpt import GPT, GPTConfig
    from bdh import save_model

    save_model(GPT(GPTConfig.from_name("tiny")), tmp_path / "gpt")
    with pytest.raises(UserError, match="give a BDH checkpoint"):
        Explorer.load(tmp_path / "gpt")
