"""Activation capture: per-layer, per-head x, y and attention read-outs, without editing the model.

A model that lists activation sites (BDH: "x", "a", "y"; see bdh.protocol) calls the callback
given to `model.capture(callback)` with (site, layer, tensor) for every layer of every forward
and decoding step run inside it; that explicit request is also what makes BDH run its op-by-op
layer, the one whose activations exist. `ActivationCapture` keeps the sites and layers asked
for while it is entered; `stream_activations`
reads a long text in chunks, carrying the recurrent state, and yields one chunk's activations at
a time, so memory stays bounded by the chunk, never by the text.

Shapes (legend in bdh.config): x and y (B, nh, T, N), a (B, nh, T, D); the streamed form drops B.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

SITES = ("x", "a", "y")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain BDH inside a torch.compile or DistributedDataParallel wrapper."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


@contextmanager
def eval_mode(model: nn.Module):
    """Dropout off while looking inside; the previous train/eval mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _check_sites(sites: Sequence[str]) -> tuple[str, ...]:
    bad = [s for s in sites if s not in SITES]
    if bad:
        raise ValueError(f"unknown activation site(s) {bad}; choose from {SITES}")
    return tuple(sites)


class ActivationCapture:
    """Context manager that records chosen activations of every forward run inside it.

    sites: any of "x", "a", "y"; layers/heads: indices to keep (None = all). With keep=True the
    tensors are stored (float32, detached, on `device`) and read with `get(site, layer)`; a
    `callback(site, layer, tensor)` sees each one as it is made, for reductions that store nothing.
    """

    def __init__(self, model: nn.Module, sites: Sequence[str] = ("x", "y"), layers: Sequence[int] | None = None,
                 heads: Sequence[int] | None = None, keep: bool = True,
                 callback: Callable[[str, int, torch.Tensor], None] | None = None, device="cpu"):
        self.model = unwrap(model)
        self.sites = _check_sites(sites)
        self.layers = None if layers is None else set(int(l) for l in layers)
        self.heads = None if heads is None else list(heads)
        self.keep, self.callback, self.device = keep, callback, device
        self.records: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)

    def __enter__(self) -> "ActivationCapture":
        missing = [site for site in self.sites if site not in self.model.activation_sites]
        if missing:
            raise ValueError(f"a {self.model.model_type} model has no activation site(s) {missing}")
        self._context = self.model.capture(self._record)
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)

    def _record(self, site: str, layer: int, output: torch.Tensor) -> None:
        if site not in self.sites or (self.layers is not None and layer not in self.layers):
            return
        t = output.detach()
        if self.heads is not None:
            t = t[:, self.heads]
        t = t.to(device=self.device, dtype=torch.float32)
        if self.callback is not None:
            self.callback(site, layer, t)
        if self.keep:
            self.records[(site, layer)].append(t)

    def keys(self) -> list[tuple[str, int]]:
        return sorted(self.records)

    def get(self, site: str, layer: int) -> torch.Tensor:
        """Everything recorded for (site, layer), forwards joined along time: (B, nh, T, N|D)."""
        parts = self.records.get((site, layer))
        if not parts:
            raise KeyError(f"nothing captured for site {site!r} at layer {layer}")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def clear(self) -> None:
        self.records.clear()


@dataclass
class Chunk:
    """One piece of a streamed text: its first position, its tokens and its activations."""

    start: int
    ids: torch.Tensor  # T_c
    acts: dict[tuple[str, int], torch.Tensor]  # (site, layer) -> (nh, T_c, N | D)


def _as_ids(ids) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() != 1:
        raise ValueError(f"expected one sequence of token ids (T,), got shape {tuple(ids.shape)}")
    return ids


def stream_activations(model: nn.Module, ids, sites: Sequence[str] = ("x", "y"), layers: Sequence[int] | None = None,
                       heads: Sequence[int] | None = None, chunk_len: int = 256) -> Iterator[Chunk]:
    """Read one token sequence in chunks (state carried, so results equal one pass) and yield them.

    Only the activations asked for are captured, and only one chunk's are alive at a time.
    """
    model = unwrap(model)
    ids = _as_ids(ids)
    device = next(model.parameters()).device
    state = None
    with eval_mode(model), torch.no_grad(), ActivationCapture(model, sites, layers, heads) as cap:
        for start in range(0, len(ids), chunk_len):
            piece = ids[start:start + chunk_len]
            state = model(piece[None].to(device), state=state).state
            acts = {key: cap.get(*key)[0] for key in cap.keys()}
            cap.clear()
            yield Chunk(start=start, ids=piece, acts=acts)


def capture_activations(model: nn.Module, ids, sites: Sequence[str] = ("x", "y"), layers: Sequence[int] | None = None,
                        heads: Sequence[int] | None = None, chunk_len: int = 256) -> dict[tuple[str, int], torch.Tensor]:
    """All asked activations of a (short) text: (site, layer) -> (nh, T, N | D). Streams internally."""
    parts: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)
    for chunk in stream_activations(model, ids, sites, layers, heads, chunk_len):
        for key, value in chunk.acts.items():
            parts[key].append(value)
    return {key: torch.cat(values, dim=1) for key, values in parts.items()}


def batch_activations(model: nn.Module, sequences: Sequence[Sequence[int]], sites: Sequence[str] = ("x", "y"),
                      layers: Sequence[int] | None = None, batch_size: int = 16):
    """Many short sequences, right-padded into batches: yields (first index, lengths, acts).

    acts maps (site, layer) -> (B, nh, T_max, N | D); positions past a sequence's length are
    padding (causality keeps them from touching the real tokens) and the caller must ignore them.
    """
    model = unwrap(model)
    device = next(model.parameters()).device
    with eval_mode(model), torch.no_grad(), ActivationCapture(model, sites, layers) as cap:
        for first in range(0, len(sequences), batch_size):
            group = [list(s) for s in sequences[first:first + batch_size]]
            lengths = [len(s) for s in group]
            idx = torch.zeros(len(group), max(lengths), dtype=torch.long)
            for row, seq in enumerate(group):
                idx[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            model(idx.to(device), return_state=False)
            acts = {key: cap.get(*key) for key in cap.keys()}
            cap.clear()
            yield first, lengths, acts


def run_accumulators(model: nn.Module, ids, accumulators: Sequence, chunk_len: int = 256) -> None:
    """One streamed pass over a text feeding every accumulator (each names its sites and layers)."""
    sites = sorted({s for acc in accumulators for s in acc.sites})
    layer_sets = [acc.layers for acc in accumulators]
    layers = None if any(ls is None for ls in layer_sets) else sorted(set().union(*map(set, layer_sets)))
    for chunk in stream_activations(model, ids, sites, layers, chunk_len=chunk_len):
        for acc in accumulators:
            acc.update(chunk)
