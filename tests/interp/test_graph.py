"""The neuron graph G = E D_x: blocks, blockwise scans, modularity against baselines, fits, heads."""

import numpy as np
import pytest
import torch

from bdh import BDH, BDHConfig
from bdh.interp import analyse_neuron_graph, fit_degree_power_law, neuron_graph
from bdh.interp.graph import graph_factors, lowrank_top, scan_graph, tail_scan


def modular_model(communities=8, inhibitory_head=1, seed=0):
    """tiny BDH (n = 512) whose G is large within planted neuron communities; one head's E is negated."""
    g = torch.Generator().manual_seed(seed)
    model = BDH(BDHConfig.from_name("tiny"))
    nh, D, N = model.encoder.shape
    n = nh * N
    member = torch.randint(0, communities, (n,), generator=g)
    centres = torch.randn(communities, D, generator=g)
    with torch.no_grad():
        E = centres[member] + 0.3 * torch.randn(n, D, generator=g)  # n, D
        Dx = centres[member].T + 0.3 * torch.randn(D, n, generator=g)  # D, n
        E[inhibitory_head * N:(inhibitory_head + 1) * N] *= -1
        model.decoder.copy_(E)
        model.encoder.copy_(Dx.reshape(D, nh, N).permute(1, 0, 2))
    return model


def test_blocks_are_E_of_one_head_times_D_x_of_another():
    model = BDH(BDHConfig.from_name("tiny"))
    G = neuron_graph(model)
    nh, D, N = model.encoder.shape
    assert G.shape == (nh * N, nh * N)
    E = model.decoder.detach()
    for h in range(nh):
        for h2 in range(nh):
            block = E[h * N:(h + 1) * N] @ model.encoder.detach()[h2]
            torch.testing.assert_close(G[h * N:(h + 1) * N, h2 * N:(h2 + 1) * N], block)


def test_blockwise_scans_agree_with_the_dense_graph(monkeypatch):
    import bdh.interp.graph as graph

    monkeypatch.setattr(graph, "BLOCK_ENTRIES", 512 * 100)  # force several row blocks per head
    model = BDH(BDHConfig.from_name("tiny"))
    E, Dx, N = graph_factors(model)
    G = (E @ Dx).fill_diagonal_(float("nan"))
    off = G[~torch.isnan(G)]
    scan = scan_graph(E, Dx, N, k=300)
    assert scan["mean"] == pytest.approx(float(off.mean()), abs=1e-9)
    assert scan["std"] == pytest.approx(float(off.std()), rel=1e-3)
    assert scan["max"] == pytest.approx(float(off.max()))
    torch.testing.assert_close(scan["top_values"], torch.sort(off, descending=True).values[:300])
    rows, cols = scan["top_index"] // 512, scan["top_index"] % 512
    assert (rows != cols).all()
    torch.testing.assert_close(G[rows, cols], scan["top_values"])
    betas = [float(scan["top_values"][99]), 0.0]
    tails = tail_scan(E, Dx, N, betas, beta_ref=betas[0], lo=scan["min"], hi=scan["max"])
    assert tails["counts"] == [float((off >= b).sum()) for b in betas]
    assert tails["pos"].sum() == 100 and tails["neg"].sum() == float((off <= -betas[0]).sum())


def test_planted_communities_beat_both_baselines_and_a_negated_head_looks_inhibitory():
    model = modular_model()
    result = analyse_neuron_graph(model, n_betas=4, max_edges=6000, seeds=2)
    sweep = [row for row in result["sweep"] if row["modularity"] is not None]
    assert len(sweep) == 4
    assert all(a["beta"] > b["beta"] for a, b in zip(result["sweep"], result["sweep"][1:]))
    for row in sweep:
        gnm, low = row["baselines"]["gnm"], row["baselines"]["lowrank"]
        assert gnm["edges"] == row["edges"]
        assert low["edges"] == row["edges"]
        assert row["edges"] <= row["edges_directed"]
    densest = sweep[-1]
    assert densest["modularity"] > 0.5
    assert densest["modularity"] > densest["baselines"]["gnm"]["modularity"] + 0.25
    assert densest["modularity"] > densest["baselines"]["lowrank"]["modularity"] + 0.25
    heads = result["head_blocks"]["heads"]
    assert [h["inhibitory"] for h in heads] == [False, True]
    assert heads[1]["pos_share"] < 0.25 < heads[0]["pos_share"]
    assert result["degrees"]["edges_directed"] == 8 * 512
    assert sum(result["degrees"]["out"]["counts"]) == 512


def test_given_betas_beyond_max_edges_are_counted_but_not_clustered():
    model = BDH(BDHConfig.from_name("tiny"))
    result = analyse_neuron_graph(model, betas=[0.0, 1.0], max_edges=1000, seeds=1)
    high, low = result["sweep"]
    assert high["beta"] == 1.0 and high["edges_directed"] == 0 and high["modularity"] is None
    assert low["edges_directed"] > 1000 and low["modularity"] is None and "skipped" in low
    assert not result["betas_auto"]


def test_lowrank_baseline_is_the_top_of_a_random_product():
    values, index = lowrank_top(n=64, rank=4, k=50, N=32, seed=3)
    g = torch.Generator().manual_seed(3)
    P1, P2 = torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g)
    M = (P1 @ P2.T).fill_diagonal_(-float("inf"))
    torch.testing.assert_close(values, torch.topk(M.reshape(-1), 50).values)


def test_power_law_fit_prefers_power_laws_only_for_heavy_tails():
    rng = np.random.default_rng(0)
    heavy = fit_degree_power_law(rng.zipf(2.5, 4000))
    assert heavy["ok"] and heavy["alpha"] == pytest.approx(2.5, abs=0.2)
    assert heavy["vs_exponential"]["R"] > 0
    light = fit_degree_power_law(rng.geometric(0.2, 4000))
    assert light["ok"] and light["vs_exponential"]["R"] < heavy["vs_exponential"]["R"]
    assert fit_degree_power_law(np.array([1, 1, 2])) == {"ok": False, "reason": "too few distinct positive values (2 of 3)"}
