"""The synapse state of Eq. 16: brute force agreement, chunking, decay, traces, storage."""

import pytest
import torch

from bdh.errors import UserError
from bdh.interp import (
    capture_activations, load_synapses, save_synapses, synapse_degrees, synapse_state, synapse_traces, top_synapses,
)
from tests.interp.helpers import tiny_model


def brute_force_sigma(model, ids, decay=None):
    """sigma_l[h] = sum_tau lambda_h^(T-1-tau) y_{tau,l-1}[h]^T x_{tau,l}[h], from captured activations."""
    acts = capture_activations(model, ids, ("x", "y"))
    T = len(ids)
    out = {}
    for l in range(1, model.config.n_layer):
        y, x = acts[("y", l - 1)].double(), acts[("x", l)].double()  # nh, T, N
        if decay is not None:
            w = torch.stack([decay[h].double() ** torch.arange(T - 1, -1, -1) for h in range(len(decay))])  # nh, T
            y = y * w[:, :, None]
        out[l] = torch.einsum("hti,htj->hij", y, x)
    return out


def test_sigma_pairs_y_of_one_layer_with_x_of_the_next():
    model = tiny_model(n_layer=3)
    ids = torch.randint(0, 256, (40,))
    sigma = synapse_state(model, ids, chunk_len=9)
    expected = brute_force_sigma(model, ids)
    assert sorted(sigma) == [1, 2]
    for l in sigma:
        assert sigma[l].shape == (2, 256, 256)
        assert sigma[l].min() >= 0
        torch.testing.assert_close(sigma[l].double(), expected[l], rtol=1e-4, atol=1e-4)
    # y of the same layer would give another matrix: the pairing is really l-1 -> l
    acts = capture_activations(model, ids, ("x", "y"))
    same_layer = torch.einsum("hti,htj->hij", acts[("y", 1)], acts[("x", 1)])
    assert not torch.allclose(sigma[1], same_layer, rtol=1e-2)


def test_sigma_with_decay_and_chosen_layers():
    model = tiny_model(n_layer=3, decay=[0.9, 0.97])
    ids = torch.randint(0, 256, (30,))
    sigma = synapse_state(model, ids, layers=[2], chunk_len=7)
    assert list(sigma) == [2]
    expected = brute_force_sigma(model, ids, decay=model.decay)[2]
    torch.testing.assert_close(sigma[2].double(), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="l runs from 1 to 2"):
        synapse_state(model, ids, layers=[0])


def test_top_synapses_and_traces_agree_with_sigma():
    model = tiny_model(decay=[0.95, 1.0])
    ids = torch.randint(0, 256, (37,))
    sigma = synapse_state(model, ids)
    top = top_synapses(sigma, k=5)
    assert [d["value"] for d in top] == sorted((d["value"] for d in top), reverse=True)
    assert top[0]["value"] == pytest.approx(float(sigma[1].max()))
    d = top[0]
    assert sigma[d["layer"]][d["head"], d["i"], d["j"]] == pytest.approx(d["value"])
    assert d["pre"] == d["head"] * 256 + d["i"]
    chosen = [(t["layer"], t["head"], t["i"], t["j"]) for t in top] + [(1, 1, 3, 4)]
    traces = synapse_traces(model, ids, chosen, chunk_len=10)
    assert traces["values"].shape == (6, 37)
    for k, (l, h, i, j) in enumerate(chosen):
        assert traces["values"][k, -1] == pytest.approx(float(sigma[l][h, i, j]), rel=1e-4, abs=1e-6)
    # each step of a trace is the decayed previous value plus that token's y_i x_j
    lam = float(model.decay[top[0]["head"]])
    v, inc = traces["values"][0], traces["increments"][0]
    assert v[1:] == pytest.approx(lam * v[:-1] + inc[1:], rel=1e-6, abs=1e-9)


def test_storage_round_trip_dense_and_sparse(tmp_path):
    model = tiny_model()
    sigma = synapse_state(model, torch.randint(0, 256, (20,)))
    save_synapses(tmp_path / "dense.safetensors", sigma)
    assert torch.equal(load_synapses(tmp_path / "dense.safetensors")[1], sigma[1])
    save_synapses(tmp_path / "sparse.safetensors", sigma, max_dense=10, max_entries=100)
    sparse = load_synapses(tmp_path / "sparse.safetensors")[1]
    assert sparse.is_sparse and sparse.shape == sigma[1].shape and sparse._nnz() == 100
    dense = sparse.to_dense()
    kept = dense > 0
    assert torch.equal(dense[kept], sigma[1][kept])
    assert dense[kept].min() >= sigma[1][~kept].max()


def test_synapse_degrees_count_the_strongest_edges():
    sigma = torch.zeros(2, 4, 4)
    sigma[0, 0, 1], sigma[0, 0, 2], sigma[1, 3, 3], sigma[1, 2, 0] = 5.0, 4.0, 3.0, 0.5
    out_deg, in_deg, threshold = synapse_degrees(sigma, edges=3)
    assert threshold == 3.0
    assert out_deg.tolist() == [2, 0, 0, 0, 0, 0, 0, 1]
    assert in_deg.tolist() == [0, 1, 1, 0, 0, 0, 0, 1]


def test_too_large_a_state_is_refused_before_allocating():
    model = tiny_model()
    with pytest.raises(UserError, match="--max-synapses"):
        synapse_state(model, torch.randint(0, 256, (5,)), max_entries=1000)
