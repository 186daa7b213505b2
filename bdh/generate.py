"""Sampling from any model of the package: prefill the prompt once, then one token at a time.

Any model of the package will do (bdh.protocol.LanguageModel): `model(idx, state=None)`
prefills the prompt and returns the state after its last token, then `model.step(token, state)`
decodes one token at a time, so the cost of a new token does not grow with the context (BDH's
state is fixed-size; GPT's KV cache grows).
"""

from __future__ import annotations

from typing import Callable, Collection, Sequence

import torch


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B, 1). temperature 0 or top_k 1 is greedy."""
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError("need temperature >= 0, top_k >= 1 and 0 < top_p <= 1")
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # B, 1
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        logits = _nucleus(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@torch.no_grad()
def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None, stop: Collection[int] | None = None):
    """Prompt(s) followed by max_new_tokens sampled tokens.

    idx: a (B, T) tensor of prompts of equal length, or a list of 1-D prompts of different
    lengths (each is prefilled on its own, then all decode together as one batch; the result
    is then a list). on_token receives each new (B, 1) batch of tokens as it is sampled. With
    `stop` (token ids), decoding ends early once every row has sampled one of them (rows that
    stopped earlier go on sampling until then: cut them at their first stop token).
    """
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    was_training = model.training
    model.eval()
    try:
        if isinstance(idx, torch.Tensor):
            return _generate_batch(model, idx, max_new_tokens, temperature, top_k, top_p, generator, on_token, stop)
        return _generate_ragged(model, idx, max_new_tokens, temperature, top_k, top_p, generator, on_token, stop)
    finally:
        model.train(was_training)


def _generate_batch(model, idx, max_new_tokens, temperature, top_k, top_p, generator, on_token, stop=None):
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError("idx must be a (B, T) tensor with T >= 1")
    out = model(idx, state=None)
    new = _decode(model, out.logits[:, -1], out.state, max_new_tokens, temperature, top_k, top_p, generator, on_token,
                  stop)
    return torch.cat([idx, new], dim=1)


def _generate_ragged(model, prompts: Sequence, max_new_tokens, temperature, top_k, top_p, generator, on_token,
                     stop=None):
    device = next(model.parameters()).device
    prompts = [torch.as_tensor(p, dtype=torch.long, device=device).view(-1) for p in prompts]
    if not prompts or any(p.numel() == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    outs = [model(p[None], state=None) for p in prompts]
    state = type(outs[0].state).cat([o.state for o in outs])
    last = torch.cat([o.logits[:, -1] for o in outs])  # B, V
    new = _decode(model, last, state, max_new_tokens, temperature, top_k, top_p, generator, on_token, stop)
    return [torch.cat([p, row]) for p, row in zip(prompts, new)]


def _decode(model, logits, state, max_new_tokens, temperature, top_k, top_p, generator, on_token, stop=None):
    """Sample, feed the sample back with the state, repeat: (B, <= max_new_tokens) new tokens."""
    tokens = []
    stop_ids = torch.tensor(sorted(stop), dtype=torch.long, device=logits.device) if stop else None
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # B, 1
        tokens.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if stop_ids is not None:
            done |= torch.isin(nxt[:, 0], stop_ids)
            if bool(done.all()):
                break
        if step + 1 < max_new_tokens:
            # the state is generate's own (made by the prefill), so step may update it in place
            out = model.step(nxt, state)
            logits, state = out.logits[:, -1], out.state
    if not tokens:
        return logits.new_zeros(logits.shape[0], 0, dtype=torch.long)
    return torch.cat(tokens, dim=1)
