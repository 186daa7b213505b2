"""`bdh graph`: graph.json, the plots, the counts it reports, and the errors a user can make."""

import json

import pytest
import torch

from bdh import save_model
from bdh.cli import main
from bdh.graph import from_model
from bdh.graph.measure import count_messages, layout_distances
from tests.graph.test_form import graph_model
from tests.helpers import one_line_error


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph")
    dirs = []
    for multiplier in (2, 4):
        torch.manual_seed(0)
        model = graph_model("rope-alibi", n_embd=16, multiplier=multiplier, n_layer=2)
        save_model(model, root / f"m{multiplier}")
        dirs.append(root / f"m{multiplier}")
    text = root / "text.txt"
    text.write_text("the king and the queen sat by the fire. " * 3)
    return dirs, text


def test_bdh_graph_writes_json_and_plots(checkpoints, tmp_path, capsys):
    dirs, text = checkpoints
    out = tmp_path / "out"
    assert main(["graph", "--ckpt", *map(str, dirs), "--text", str(text), "--out", str(out), "--max-tokens", "24",
                 "--fractions", "1,0.2", "--quiet"]) == 0
    report = json.loads((out / "graph.json").read_text())
    assert report["schema"] == "bdh.graph/1" and report["n_tokens"] == 24
    assert [r["model"]["n_neurons"] for r in report["runs"]] == [32, 64]
    for run in report["runs"]:
        assert run["model"]["exact"] and len(run["per_token"]["messages_x"]) == 24
        assert abs(run["graph"]["loss"] - run["graph"]["model_loss"]) < 1e-5  # eq8 Normfree: the same model
        assert [r["fraction"] for r in run["thresholds"]] == [1.0, 0.2]
        assert run["thresholds"][0]["loss"] == pytest.approx(run["graph"]["loss"])
        exact = [r for r in run["layouts"] if r["layout"] == "eq8" and not r["layernorm"]][0]
        assert exact["relative_distance_to_graph"] < 1e-5
    for name in ("messages", "thresholds", "growth"):
        assert (out / report["figures"][name]).stat().st_size > 1000


def test_bdh_graph_errors_are_one_line(checkpoints, tmp_path, capsys):
    dirs, text = checkpoints
    assert main(["graph", "--ckpt", str(dirs[0]), "--text", str(tmp_path / "none.txt"), "--out", str(tmp_path)]) == 2
    one_line_error(capsys, "no such text file")
    assert main(["graph", "--ckpt", str(dirs[0]), "--text", str(text), "--out", str(tmp_path),
                 "--fractions", "0,1"]) == 2
    one_line_error(capsys, "--fractions")


def test_message_counts_follow_their_definition():
    """On a hand-checkable case: one layer, the first token (sigma empty) and the second."""
    model = graph_model("identity", n_embd=8, multiplier=4, vocab_size=16, n_layer=1)
    graph = from_model(model)
    ids = torch.tensor([[3, 5]])
    counts, _ = count_messages(graph, ids)
    n = graph.n_neurons
    x0 = (graph.G_x_in.to_matrix()[3].relu() > 0)  # neurons the first token makes fire
    assert counts["x_active"][0] == x0.sum()
    assert counts["messages_x"][0] == n  # the token neuron reaches every neuron (dense G)
    assert counts["messages_read"][0] == 0 and counts["y_active"][0] == 0  # nothing stored yet
    assert counts["synapses_written"][0] == x0.sum()  # one token neuron x the neurons that fire
    x1 = (graph.G_x_in.to_matrix()[5].relu() > 0)
    both = (x0 & x1).sum()
    assert 0 < both < x1.sum()
    assert counts["messages_read"][1] == both  # sigma(3, j) != 0 only where token 3 made j fire
    assert counts["sigma_touched"][1] == pytest.approx(float(both + x1.sum()) / (16 * n))  # read row 3, write row 5


def test_layout_distances_name_every_layout():
    model = graph_model("rope")
    rows = layout_distances(model, from_model(model), torch.randint(0, 256, (1, 12)))
    assert {(r["layout"], r["layernorm"]) for r in rows} == {("eq8", False), ("eq8", True), ("reference", False),
                                                              ("reference", True)}
    by = {(r["layout"], r["layernorm"]): r["relative_distance_to_graph"] for r in rows}
    assert by[("eq8", False)] < 1e-5 and by[("reference", True)] > 1e-3
