"""Concept synapses across languages: the best synapses of one language are re-tested on another's sentences."""

from __future__ import annotations

import pytest

from bdh import BDH, BDHConfig
from bdh.cli import main
from bdh.data import ByteTokenizer
from bdh.interp.bilingual import bilingual_concepts
from bdh.interp.concepts import contrast_set


def test_same_sentences_in_two_languages_give_the_same_test():
    """Re-testing a synapse on the very sentences it was found on reproduces its U exactly."""
    model = BDH(BDHConfig.from_name("tiny", mlp_internal_dim_multiplier=4)).eval()
    concept, control = contrast_set("money_en")[:8], contrast_set("weather_en")[:8]
    result = bilingual_concepts(model, ByteTokenizer(), {"en": (concept, control), "xx": (concept, control)},
                                tagged=False, top_k=3)
    for lang, other in (("en", "xx"), ("xx", "en")):
        top = result[lang]["top"]
        assert len(top) == 3 and result[lang]["n_synapses"] == 1 * 2 * 64 ** 2  # synapse layers (n_layer - 1) x heads x N^2
        for d in top:
            # (p may differ: scipy picks the exact or the asymptotic method from the ties of all columns tested)
            assert d["other"][other]["U"] == d["U"]
            assert d["other"][other]["rank_biserial"] == pytest.approx(d["rank_biserial"])


def test_concepts_command(tmp_path, capsys):
    from bdh.checkpoint import save_model

    save_model(BDH(BDHConfig.from_name("tiny", mlp_internal_dim_multiplier=4)), tmp_path / "m")
    assert main(["concepts", "--ckpt", str(tmp_path / "m"), "--top-k", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("en: ") and "\nes: " in out and "in es: U" in out
