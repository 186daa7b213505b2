"""Pick a GPT of the same size as a BDH (the paper compares at equal parameter counts; within 5% here)."""

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
    depth = 64, head size 64), then the closest count. Shapes with head sizes 16/32/64/128 are
    tried first; only if none fits, any width that is a multiple of 8 (head size >= 16).
    """
    target = bdh_config.num_params()
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(fixed) - known)
    if unknown:
        raise UserError(f"unknown GPTConfig field(s): {', '.join(unknown)}")
    if not tolerance >= 0:
        raise UserError(f"tolerance must be >= 0, got {tolerance!r}")
    base = {"vocab_size": bdh_config.vocab_size, "dropout": bdh_config.dropout, **fixed}
    _check_fixed(base)
    closest = None
    for fine in (False, True):
        best = None
        for n_layer, n_embd in _sizes(fixed, fine):
            # the count does not depend on the number of heads
            count = GPTConfig.from_dict({**base, "n_layer": n_layer, "n_embd": n_embd, "n_head": 1}).num_params()
            error = abs(count - target) / target
            if closest is None or error < closest[0]:
                closest = (error, n_layer, n_embd, count)
            if error > tolerance:
                continue
            for n_head in _heads(n_embd, fixed.get("n_head"), fine):
                key = (_shape_cost(n_layer, n_embd, n_head), error)
                if best is None or key < best[0]:
                    best = (key, (n_layer, n_embd, n_head))
        if best is not None:
            n_layer, n_embd, n_head = best[1]
            return GPTConfig.from_dict({**base, "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head})
    near = "" if closest is None else (f" (closest: n_layer={closest[1]}, n_embd={closest[2]}, "
                                       f"{closest[3]:,} parameters, {closest[0]:.1%} off)")
    raise UserError(f"no GPT shape within {tolerance:.0%} of the BDH's {target:,} parameters{near}")


def _check_fixed(base: dict[str, Any]) -> None:
    """Reject bad fixed values before the search (with GPTConfig's own message)."""
    n_head = base.get("n_head", 1)
    width = 16 * n_head if isinstance(n_head, int) and not isinstance(n_head, bool) and n_head > 0 else 16
    GPTConfig.from_dict({"n_layer": 1, "n_embd": width, "n_head": 1, **base})


def _sizes(fixed: dict[str, Any], fine: bool):
    """(n_layer, n_embd) pairs of the grid, holding the fixed ones."""
    layers = [fixed["n_layer"]] if "n_layer" in fixed else range(1, MAX_LAYERS + 1)
    if "n_embd" in fixed:
        widths = [fixed["n_embd"]]
    elif fine:
        widths = range(16, MAX_HEADS * HEAD_SIZES[-1] + 1, 8)
    else:
        widths = sorted({h * hd for h in range(1, MAX_HEADS + 1) for hd in HEAD_SIZES})
    n_head = fixed.get("n_head")
    for n_layer in layers:
        for n_embd in widths:
            if any(True for _ in _heads(n_embd, n_head, fine)):
                yield n_layer, n_embd


def _heads(n_embd: int, n_head: int | None, fine: bool):
    """Head counts for this width: head size in HEAD_SIZES, or (fine) any divisor leaving >= 16."""
    for h in [n_head] if n_head is not None else range(1, n_embd // 16 + 1):
        if n_embd % h == 0 and n_embd // h >= 16 and (fine or n_embd // h in HEAD_SIZES):
            yield h


def _shape_cost(n_layer: int, n_embd: int, n_head: int) -> float:
    """How far a shape is from GPT-2's proportions, in octaves (head size counts half)."""
    aspect = abs(math.log2(n_embd / n_layer / GPT2_WIDTH_PER_LAYER))
    head = abs(math.log2(n_embd / n_head / GPT2_HEAD_SIZE))
    return aspect + 0.5 * head


def param_report(model) -> dict[str, Any]:
    """Parameter counts of any model of the package, with and without embeddings."""
    total = model.num_params()
    body = model.num_params(embeddings=False)
    return {"model_type": model.model_type, "params": total, "params_without_embeddings": body,
            "embedding_params": total - body}
