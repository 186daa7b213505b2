"""Pick a GPT of the same size as a BDH (baselines-spec.md: match parameter counts within 5%)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from bdh.baselines.gpt import GPTConfig
from bdh.errors import UserError

# the grid: head sizes a GPT would use, up to 64 heads, up to 48 layers
HEAD_SIZES = (16, 32, 64, 128)
MAX_HEADS = 64
MAX_LAYERS = 48
# GPT-2 small (768 / 12) and nanoGPT's shakespeare model (384 / 6) both have width / depth = 64
GPT2_WIDTH_PER_LAYER = 64.0
GPT2_HEAD_SIZE = 64.0


def match_gpt_config(bdh_config, tolerance: float = 0.05, **fixed: Any) -> GPTConfig:
    """The GPT-2-shaped GPTConfig whose parameter count is within tolerance of bdh_config's.

    fixed: GPTConfig fields to hold (pos_encoding, block_size, tie_embeddings, or even n_layer,
    n_embd, n_head to search only the others). vocab_size and dropout default to the BDH's.
    Among the shapes within tolerance the one closest to GPT-2's aspect ratios wins (width /
    depth = 64, head size 64), then the closest count.
    """
    target = bdh_config.num_params()
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(fixed) - known)
    if unknown:
        raise UserError(f"unknown GPTConfig field(s): {', '.join(unknown)}")
    if not tolerance >= 0:
        raise UserError(f"tolerance must be >= 0, got {tolerance!r}")
    base = {"vocab_size": bdh_config.vocab_size, "dropout": bdh_config.dropout, **fixed}
    GPTConfig.from_dict({**base, "n_layer": 1, "n_embd": 64, "n_head": 1, **fixed})  # reject bad fixed values now
    best, closest = None, None
    for n_layer, n_embd, n_head in _grid(fixed):
        config = GPTConfig.from_dict({**base, "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head})
        error = abs(config.num_params() - target) / target
        if closest is None or error < closest[0]:
            closest = (error, config)
        if error <= tolerance:
            key = (_shape_cost(n_layer, n_embd, n_head), error)
            if best is None or key < best[0]:
                best = (key, config)
    if best is None:
        near = "" if closest is None else (f" (closest: n_layer={closest[1].n_layer}, n_embd={closest[1].n_embd}, "
                                           f"{closest[1].num_params():,} parameters, {closest[0]:.1%} off)")
        raise UserError(f"no GPT shape within {tolerance:.0%} of the BDH's {target:,} parameters{near}")
    return best[1]


def _grid(fixed: dict[str, Any]):
    """(n_layer, n_embd, n_head) triples: n_embd = n_head * head size, head size >= 16."""
    layers = [fixed["n_layer"]] if "n_layer" in fixed else range(1, MAX_LAYERS + 1)
    if "n_embd" in fixed or "n_head" in fixed:
        shapes = _shapes_with(fixed.get("n_embd"), fixed.get("n_head"))
    else:
        shapes = sorted({(h * hd, h) for h in range(1, MAX_HEADS + 1) for hd in HEAD_SIZES})
    for n_layer in layers:
        for n_embd, n_head in shapes:
            yield n_layer, n_embd, n_head


def _shapes_with(n_embd: int | None, n_head: int | None) -> list[tuple[int, int]]:
    if n_embd is not None and n_head is not None:
        return [(n_embd, n_head)]
    if n_embd is not None:
        return [(n_embd, h) for h in range(1, n_embd // 16 + 1) if n_embd % h == 0]
    return [(n_head * hd, n_head) for hd in HEAD_SIZES]


def _shape_cost(n_layer: int, n_embd: int, n_head: int) -> float:
    """How far a shape is from GPT-2's proportions, in octaves (head size counts half)."""
    aspect = abs(math.log2(n_embd / n_layer / GPT2_WIDTH_PER_LAYER))
    head = abs(math.log2(n_embd / n_head / GPT2_HEAD_SIZE))
    return aspect + 0.5 * head


def param_report(model) -> dict[str, Any]:
    """Parameter counts of any model of the package, with and without embeddings."""
    from bdh.checkpoint import model_type_of

    total = model.num_params()
    body = model.num_params(embeddings=False)
    return {"model_type": model_type_of(model), "params": total, "params_without_embeddings": body,
            "embedding_params": total - body}
