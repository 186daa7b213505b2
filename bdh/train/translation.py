"""Translating with a model trained on the tagged stream, and scoring it on held-out pairs.

A translation is the continuation of the prompt `<src> source\\n<tgt> ` (bdh.data.parallel), up to
the newline that ends every target in the stream. The scores are the loss on each direction's
target tokens (bdh.train.evaluate.evaluate_tagged) and chrF / BLEU of greedy translations,
computed by sacrebleu.
"""

from __future__ import annotations

from typing import Any

import torch

from bdh.data.parallel import ParallelCorpus, TARGET_END, check_lang, source_prompt, tagged_split, tokenize_tagged
from bdh.errors import UserError
from bdh.generate import generate
from bdh.train.evaluate import evaluate_tagged, tokens_per_byte


def stop_tokens(tokenizer) -> set[int]:
    """Ids whose text holds a newline (the end of a target): just 10 for bytes."""
    if tokenizer.kind == "bytes":
        return {ord(TARGET_END)}
    return {i for i in range(tokenizer.vocab_size) if TARGET_END in tokenizer.decode([i])}


@torch.no_grad()
def translate(model, tokenizer, texts: list[str], src: str, tgt: str, max_new_tokens: int | None = None,
              temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
              generator: torch.Generator | None = None, batch_size: int = 32) -> list[str]:
    """Each text translated from src to tgt (greedy unless temperature > 0), in batches of batch_size.

    max_new_tokens defaults to twice the prompt's tokens plus 16 (targets are at most about twice
    as long as their source in the training pairs).
    """
    src, tgt = check_lang(src, "--from"), check_lang(tgt, "--to")
    device = next(model.parameters()).device
    stop = stop_tokens(tokenizer)
    out: list[str] = []
    for i in range(0, len(texts), batch_size):
        prompts = [tokenizer.encode(source_prompt(src, tgt, t)) for t in texts[i:i + batch_size]]
        limit = max_new_tokens if max_new_tokens is not None else 2 * max(len(p) for p in prompts) + 16
        if model.max_positions is not None:
            limit = min(limit, model.max_positions - max(len(p) for p in prompts))
            if limit < 1:
                raise UserError(f"a prompt is longer than this model's {model.max_positions} positions")
        rows = generate(model, [torch.tensor(p, dtype=torch.long, device=device) for p in prompts], limit,
                        temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, stop=stop)
        for prompt, row in zip(prompts, rows):
            text = tokenizer.decode(row[len(prompt):].tolist())
            out.append(text.split(TARGET_END, 1)[0].strip())
    return out


def score(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus chrF and BLEU (sacrebleu's defaults) of hypotheses against one reference each."""
    try:
        import sacrebleu
    except ImportError:
        raise UserError("chrF and BLEU need sacrebleu: pip install 'bdh[translate]'") from None
    return {"chrf": float(sacrebleu.corpus_chrf(hypotheses, [references]).score),
            "bleu": float(sacrebleu.corpus_bleu(hypotheses, [references]).score)}


def evaluate_translation(model, tokenizer, corpus: ParallelCorpus, split: str = "test", batch_size: int = 8,
                         block_size: int = 256, max_batches: int | None = None, n_pairs: int = 100,
                         device="cpu", examples: int = 3) -> dict[str, Any]:
    """Loss (all tokens and each direction's targets) on the split's tagged stream, and chrF / BLEU of
    greedy translations of its first n_pairs pairs in both directions (0: no translations)."""
    tagged_text = tagged_split(corpus, split)
    tagged = tokenize_tagged(tagged_text, tokenizer)
    result = evaluate_tagged(model, tagged, batch_size, block_size, max_batches, device,
                             tokens_per_byte(len(tagged.tokens), tagged_text.text))
    report: dict[str, Any] = {"data": corpus.name, "split": split, "pairs": len(corpus.split(split)),
                              "loss": result.loss, "bpb": result.bpb, "tokens": result.tokens, "directions": {}}
    pairs = corpus.split(split)[:n_pairs]
    a, b = corpus.langs
    for name, (src, tgt, sources, refs) in zip(tagged.directions, (
            (a, b, [p[0] for p in pairs], [p[1] for p in pairs]),
            (b, a, [p[1] for p in pairs], [p[0] for p in pairs]))):
        entry: dict[str, Any] = {"target_loss": result.targets[name]["loss"],
                                 "target_tokens": result.targets[name]["tokens"]}
        if pairs:
            hyps = translate(model, tokenizer, sources, src, tgt)
            entry.update(score(hyps, refs), scored_pairs=len(pairs))
            entry["examples"] = [{"source": s, "reference": r, "translation": h}
                                 for s, r, h in list(zip(sources, refs, hyps))[:examples]]
        report["directions"][name] = entry
    return report
