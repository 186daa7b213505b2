"""Recurrent states: the one state protocol every model family uses, and BDH's state.

`TensorState` is written once for every family: a dataclass whose fields are lists of per-layer
tensors plus `pos` (B,), the absolute position of the next token of every sequence. detach, to,
clone, select, cat, state_dict / from_state_dict, save and load work on any such dataclass
(bdh.baselines.gpt.KVCache is one too).

BDHState: rho[l] has shape (B, nh, N, D) and is kept in float32 whatever the compute dtype, so
RoPE phases and the synapse state continue exactly across calls.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch

from bdh.errors import UserError
from bdh.fileio import load_tensors, save_tensors

S = TypeVar("S", bound="TensorState")


@dataclass
class TensorState:
    """Base of every state: list-of-tensor fields (one entry per layer) and pos (B,) int64."""

    pos: torch.Tensor  # (B,) int64

    @classmethod
    def layer_fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "pos"]

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    def map(self: S, fn: Callable[[torch.Tensor], torch.Tensor]) -> S:
        """A state of the same type with fn applied to every tensor (pos included)."""
        layers = {name: [fn(t) for t in getattr(self, name)] for name in self.layer_fields()}
        return type(self)(pos=fn(self.pos), **layers)

    def detach(self: S) -> S:
        """Cut the graph (truncated backprop through time) without copying."""
        return self.map(torch.Tensor.detach)

    def to(self: S, device) -> S:
        return self.map(lambda t: t.to(device))

    def clone(self: S) -> S:
        return self.map(torch.Tensor.clone)

    def select(self: S, rows) -> S:
        """The states of some sequences of the batch."""
        return self.map(lambda t: t[rows])

    @classmethod
    def cat(cls: type[S], states: list[S]) -> S:
        """Stack the states of separate sequences into one batch (each keeps its own position)."""
        layers = {name: [torch.cat(layer, dim=0) for layer in zip(*(getattr(s, name) for s in states))]
                  for name in cls.layer_fields()}
        return cls(pos=torch.cat([s.pos for s in states]), **layers)

    # persistence: plain tensors in safetensors ("<field>.<layer>" and "pos"), nothing is unpickled
    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {f"{name}.{i}": t.detach().contiguous()
                   for name in self.layer_fields() for i, t in enumerate(getattr(self, name))}
        tensors["pos"] = self.pos.detach().contiguous()
        return tensors

    @classmethod
    def from_state_dict(cls: type[S], tensors: dict[str, torch.Tensor]) -> S:
        names = cls.layer_fields()
        n_layer = sum(1 for key in tensors if key.startswith(f"{names[0]}."))
        try:
            layers = {name: [cls.load_tensor(tensors[f"{name}.{i}"]) for i in range(n_layer)] for name in names}
            return cls(pos=tensors["pos"].long(), **layers)
        except KeyError as err:
            raise UserError(f"{cls.__name__} is missing tensor {err.args[0]!r}") from None

    @staticmethod
    def load_tensor(t: torch.Tensor) -> torch.Tensor:
        """How a saved per-layer tensor comes back (as saved; BDHState keeps float32)."""
        return t

    def save(self, path: str | Path) -> None:
        save_tensors(self.state_dict(), Path(path))

    @classmethod
    def load(cls: type[S], path: str | Path, device=None) -> S:
        return cls.from_state_dict(load_tensors(Path(path), device=device))


@dataclass
class BDHState(TensorState):
    rho: list[torch.Tensor] = dataclasses.field(default_factory=list)  # L x (B, nh, N, D) float32

    @classmethod
    def zeros(cls, n_layer: int, batch_size: int, n_head: int, N: int, D: int, device=None) -> "BDHState":
        rho = [torch.zeros(batch_size, n_head, N, D, device=device) for _ in range(n_layer)]
        return cls(rho=rho, pos=torch.zeros(batch_size, dtype=torch.long, device=device))

    @staticmethod
    def load_tensor(t: torch.Tensor) -> torch.Tensor:
        return t.float()
