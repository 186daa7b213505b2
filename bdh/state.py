"""The recurrent state of BDH-GPU: one synapse matrix rho per layer, plus the absolute position.

rho[l] has shape (B, nh, N, D) and is kept in float32 whatever the compute dtype; pos (B,) is
the absolute position of the next token of every sequence, so RoPE phases continue across calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bdh.errors import UserError


@dataclass
class BDHState:
    rho: list[torch.Tensor]  # L x (B, nh, N, D) float32
    pos: torch.Tensor  # (B,) int64

    @classmethod
    def zeros(cls, n_layer: int, batch_size: int, n_head: int, N: int, D: int, device=None) -> "BDHState":
        rho = [torch.zeros(batch_size, n_head, N, D, device=device) for _ in range(n_layer)]
        return cls(rho=rho, pos=torch.zeros(batch_size, dtype=torch.long, device=device))

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    def detach(self) -> "BDHState":
        """Cut the graph (truncated backprop through time) without copying."""
        return BDHState([r.detach() for r in self.rho], self.pos.detach())

    def to(self, device) -> "BDHState":
        return BDHState([r.to(device) for r in self.rho], self.pos.to(device))

    def clone(self) -> "BDHState":
        return BDHState([r.clone() for r in self.rho], self.pos.clone())

    def select(self, rows) -> "BDHState":
        """The states of some sequences of the batch."""
        return BDHState([r[rows] for r in self.rho], self.pos[rows])

    @classmethod
    def cat(cls, states: list["BDHState"]) -> "BDHState":
        """Stack the states of separate sequences into one batch (each keeps its own position)."""
        rho = [torch.cat(layer, dim=0) for layer in zip(*(s.rho for s in states))]
        return cls(rho=rho, pos=torch.cat([s.pos for s in states]))

    # persistence: plain tensors in safetensors, nothing is unpickled
    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {f"rho.{i}": r.detach().contiguous() for i, r in enumerate(self.rho)}
        tensors["pos"] = self.pos.detach().contiguous()
        return tensors

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor]) -> "BDHState":
        n_layer = sum(1 for key in tensors if key.startswith("rho."))
        try:
            rho = [tensors[f"rho.{i}"].float() for i in range(n_layer)]
            return cls(rho=rho, pos=tensors["pos"].long())
        except KeyError as err:
            raise UserError(f"state is missing tensor {err.args[0]!r}") from None

    def save(self, path: str | Path) -> None:
        from bdh.checkpoint import save_tensors

        save_tensors(self.state_dict(), Path(path))

    @classmethod
    def load(cls, path: str | Path, device=None) -> "BDHState":
        from bdh.checkpoint import load_tensors

        return cls.from_state_dict(load_tensors(Path(path), device=device))
