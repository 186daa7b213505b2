"""The contract every model family implements, BDH and baselines alike.

A family is an nn.Module class (usually a `ModelBase`) with a `model_type`, a `config_class` (a
bdh.config.ModelConfig dataclass) and the methods of `LanguageModel` below; it is registered in
bdh.registry. Callers (generate, train, eval, interp, experiments) ask these attributes instead
of probing types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from bdh.errors import UserError


@dataclass
class ModelOutput:
    logits: torch.Tensor  # B, T, V (float32)
    loss: torch.Tensor | None  # mean next-token cross-entropy, None without targets
    state: Any  # the model's state after the last token (a bdh.state.TensorState), None if not asked


@runtime_checkable
class LanguageModel(Protocol):
    model_type: ClassVar[str]  # the name in config.json and on the command line (--model)
    config_class: ClassVar[type]  # its config dataclass
    activation_sites: ClassVar[tuple[str, ...]]  # what bdh.interp can capture ("x", "a", "y"; () for none)
    config: Any

    def __call__(self, idx: torch.Tensor, targets: torch.Tensor | None = None, state: Any = None,
                 return_state: bool = True) -> ModelOutput:
        """The sequence path: idx (B, T) continuing `state` (None: fresh sequences)."""

    def step(self, idx: torch.Tensor, state: Any) -> ModelOutput:
        """One token per sequence (B, 1) on top of `state`, for decoding; may update state in place."""

    def init_state(self, batch_size: int, device=None) -> Any:
        """The state of empty sequences."""

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model can take (None: unbounded)."""

    @property
    def carries_state(self) -> bool:
        """Whether its state can be carried across consecutive batches (stream mode)."""

    def num_params(self, embeddings: bool = True) -> int:
        """Parameters, all or without embeddings / read-out."""

    def load_weights(self, tensors: dict[str, torch.Tensor], source: str = "weights") -> None:
        """Copy named tensors in, with an error naming any missing, extra or misshapen one."""

    def fit_corpus(self, tokens) -> None:
        """Read statistics off the training tokens (1-D ids) before the first step, into buffers
        saved with the weights (BriLLM: its bigrams; the others: nothing)."""


class ModelBase(nn.Module):
    """What every family's model class shares: the protocol's answers that come from its config,
    and loading weights by name."""

    # True: the optimizer decays none of its parameters (bdh.train.optim.make_optimizer)
    no_weight_decay: ClassVar[bool] = False

    @property
    def max_positions(self) -> int | None:
        return self.config.max_positions

    @property
    def carries_state(self) -> bool:
        return self.config.carries_state

    def load_weights(self, tensors: dict[str, torch.Tensor], source: str = "weights") -> None:
        """Copy tensors in by name, with an error naming any missing, extra or misshapen key."""
        load_named_tensors(self, tensors, source)

    def fit_corpus(self, tokens) -> None:
        """Most families learn everything by gradient: nothing to read off the corpus."""

    def parameter_report(self) -> dict[str, int]:
        """Parameter counts beyond num_params that a family wants `bdh info` to show (none by default)."""
        return {}


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
    """Mean cross-entropy of logits (B, T, V) against targets (B, T), in float32; -1 targets are ignored."""
    if targets is None:
        return None
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)


def next_positions(state, batch_size: int, T: int, device) -> torch.Tensor:
    """Absolute position (B,) after T more tokens on top of a state's (or from 0 without one)."""
    start = state.pos if state is not None else torch.zeros(batch_size, dtype=torch.long, device=device)
    return start + T


def load_named_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy tensors into model by name, with an error naming any unexpected, misshapen or missing one."""
    expected = model.state_dict()
    for key, value in tensors.items():
        if key not in expected:
            raise UserError(f"{source}: unexpected tensor {key!r}")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise UserError(f"{source}: tensor {key!r} has shape {tuple(value.shape)}, "
                            f"the model expects {tuple(expected[key].shape)}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise UserError(f"{source}: missing tensor(s) {', '.join(missing)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
