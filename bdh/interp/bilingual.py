"""Concept synapses in a bilingual model: the paper's question, asked in two languages.

For each language, the synapses that grow more on concept sentences than on control sentences are
ranked by the one-sided Mann-Whitney test of bdh.interp.concepts (p_bonferroni corrects for every
synapse searched); the best ones of each language are then tested, unchanged, on the other
language's sentences. A synapse that is significant in one language after the correction and
also significant in the other (there one test per synapse, so no search to correct for) is what
the paper calls a monosemantic synapse found in two languages.

Sentences are read as the translation stream shows them (`<lang> sentence`), when `tagged`.
"""

from __future__ import annotations

from typing import Sequence

from bdh.data.parallel import tag
from bdh.interp.concepts import concept_synapses, evaluate_synapses


def bilingual_concepts(model, tokenizer, sets: dict[str, tuple[Sequence[str], Sequence[str]]], tagged: bool = True,
                       top_k: int = 5, candidates: int = 4096, alpha: float = 0.05) -> dict:
    """{lang: {"n_synapses", "significant" (count with p_bonferroni < alpha), "top": [synapse, U, p,
    p_bonferroni, rank_biserial, "other": {lang: {U, p, rank_biserial}}]}} for sets {lang: (concept, control)}."""
    def read(lang, sentences):
        return [f"{tag(lang)} {s}" for s in sentences] if tagged else list(sentences)

    out = {}
    for lang, (concept, control) in sets.items():
        found = concept_synapses(model, tokenizer, read(lang, concept), read(lang, control), top_k=top_k,
                                 candidates=candidates, drivers=3)
        top = found["top"]
        keys = [(d["layer"], d["head"], d["i"], d["j"]) for d in top]
        for d in top:
            d.pop("values_concept", None)
            d.pop("values_control", None)
            d["other"] = {}
        for other, (c1, c0) in sets.items():
            if other == lang or not keys:
                continue
            for d, res in zip(top, evaluate_synapses(model, tokenizer, keys, read(other, c1), read(other, c0))):
                d["other"][other] = {k: res[k] for k in ("U", "U_max", "p", "rank_biserial")}
        out[lang] = {"n_synapses": found["n_synapses"], "n_concept": found["n_concept"],
                     "n_control": found["n_control"],
                     "significant": sum(d["p_bonferroni"] < alpha for d in top), "top": top}
    return out
