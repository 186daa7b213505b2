"""Concept synapses: the planted concept is found, the statistics are right, the sets ship."""

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from bdh.data import make_tokenizer
from bdh.errors import UserError
from bdh.interp import capture_activations, concept_synapses, contrast_set, contrast_sets, mann_whitney, read_sentences
from bdh.interp import synapse_state, synapse_values, top_synapses
from bdh.interp.concepts import sigma_moments
from tests.interp.helpers import DISTRACTOR, PLANTED, planted_model, planted_sentences, tiny_model

PLANTED_SYNAPSES = {(1, 1, i, j) for i in PLANTED for j in PLANTED}


@pytest.fixture(scope="module")
def planted():
    model, tok = planted_model(), make_tokenizer("bytes")
    concept, control = planted_sentences(30, True, seed=1), planted_sentences(30, False, seed=2)
    return model, tok, concept, control


def key(d):
    return (d["layer"], d["head"], d["i"], d["j"])


def test_the_planted_concept_synapses_come_first(planted):
    model, tok, concept, control = planted
    # magnitude alone would point at the space-driven distractor, in concept and control text alike
    strongest = top_synapses(synapse_state(model, tok.encode(" ".join(concept))), k=4)
    assert {(d["head"], d["i"]) for d in strongest} <= {(0, i) for i in range(256)}
    assert strongest[0]["i"] in DISTRACTOR

    result = concept_synapses(model, tok, concept, control, candidates=500, top_k=10)
    assert result["n_synapses"] == 2 * 256 * 256 and result["n_candidates"] == 500
    # every synapse tested exactly: the ranking itself, not the pre-selection, must find them
    exhaustive = concept_synapses(model, tok, concept, control, candidates=2 * 256 * 256, top_k=4, drivers=0)
    assert exhaustive["n_candidates"] > 1000
    assert {key(d) for d in exhaustive["top"]} == PLANTED_SYNAPSES
    top = result["top"]
    assert {key(d) for d in top[:4]} == PLANTED_SYNAPSES
    for d in top[:4]:
        assert d["U"] == d["U_max"] == 900 and d["rank_biserial"] == 1.0
        assert d["p"] < 1e-10 and d["p_bonferroni"] < 1e-5
        assert d["drivers"][0]["word"] == "$" and d["drivers"][0]["share"] == pytest.approx(1.0)
        assert "[$]" in d["example"]
        assert max(d["values_control"]) == 0.0
    # nothing else separates the sets: the rest of every sentence is drawn from the same words
    assert all(d["rank_biserial"] < 0.7 for d in top[4:])


def test_reported_values_and_statistics_are_recomputable(planted):
    model, tok, concept, control = planted
    top = concept_synapses(model, tok, concept, control, candidates=200, top_k=6)["top"]
    d = top[5]
    l, h, i, j = key(d)

    def value(sentence):
        acts = capture_activations(model, tok.encode(sentence), ("x", "y"))
        y, x = acts[("y", l - 1)][h, :, i], acts[("x", l)][h, :, j]
        return float((y * x).sum()) / len(tok.encode(sentence))

    assert d["values_concept"] == pytest.approx([value(s) for s in concept], rel=1e-4, abs=1e-9)
    assert d["values_control"] == pytest.approx([value(s) for s in control], rel=1e-4, abs=1e-9)
    ref = mannwhitneyu(d["values_concept"], d["values_control"], alternative="greater")
    assert d["U"] == pytest.approx(ref.statistic) and d["p"] == pytest.approx(ref.pvalue)


def test_sentence_values_pair_y_of_one_layer_with_x_of_the_next():
    model, tok = tiny_model(n_layer=3), make_tokenizer("bytes")
    sentences = ["a short one", "and a somewhat longer sentence", "mid length text"]
    seqs = [tok.encode(s) for s in sentences]
    synapses = [(1, 0, 3, 7), (2, 1, 10, 2), (2, 0, 5, 5)]
    values = synapse_values(model, seqs, synapses, batch_size=2)
    moments = sigma_moments(model, seqs, [1, 2], batch_size=2)
    per_sentence = {1: [], 2: []}
    for row, seq in enumerate(seqs):
        acts = capture_activations(model, seq, ("x", "y"))
        for l in (1, 2):
            per_sentence[l].append(torch.einsum("hti,htj->hij", acts[("y", l - 1)], acts[("x", l)]) / len(seq))
        for k, (l, h, i, j) in enumerate(synapses):
            assert values[row, k] == pytest.approx(float(per_sentence[l][row][h, i, j]), rel=1e-4, abs=1e-7)
    for l in (1, 2):
        stack = torch.stack(per_sentence[l])
        torch.testing.assert_close(moments[l][0], stack.mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(moments[l][1], stack.var(0, unbiased=False), rtol=1e-3, atol=1e-6)


def test_the_test_is_one_sided(planted):
    model, tok, concept, control = planted
    swapped = concept_synapses(model, tok, control, concept, candidates=500, top_k=10, drivers=0)
    assert not {key(d) for d in swapped["top"]} & PLANTED_SYNAPSES
    assert all(d["rank_biserial"] < 0.9 for d in swapped["top"])


def test_mann_whitney_counts_pairs():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, (12, 5)), rng.normal(0, 1, (9, 5))
    a[:, 4], b[:, 4] = 0.0, 0.0  # all ties: no evidence
    stats = mann_whitney(a, b)
    for k in range(4):
        wins = sum((x > y) + 0.5 * (x == y) for x in a[:, k] for y in b[:, k])
        assert stats["U"][k] == pytest.approx(wins)
        assert stats["rank_biserial"][k] == pytest.approx(2 * wins / (12 * 9) - 1)
        assert stats["p"][k] == pytest.approx(mannwhitneyu(a[:, k], b[:, k], alternative="greater").pvalue)
    assert stats["rank_biserial"][4] == 0.0 and stats["p"][4] == 1.0


def test_contrast_sets_ship_in_two_languages(tmp_path):
    assert {"money_en", "weather_en", "money_es", "weather_es"} <= set(contrast_sets())
    for name, least in (("money_en", 50), ("weather_en", 50), ("money_es", 12), ("weather_es", 12)):
        sentences = contrast_set(name)
        assert len(sentences) >= least and len(set(sentences)) == len(sentences)
        assert not any(s.startswith("#") for s in sentences)
    assert "dinero" in " ".join(contrast_set("money_es"))
    with pytest.raises(UserError, match="unknown contrast set"):
        contrast_set("nope")
    path = tmp_path / "one.txt"
    path.write_text("# comment\nonly one\n\n")
    with pytest.raises(UserError, match="at least 2"):
        read_sentences(path)
