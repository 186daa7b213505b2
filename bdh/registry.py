"""The model families, by model_type: the one place that maps a name to a class.

A family is a module defining an nn.Module class that implements bdh.protocol.LanguageModel,
with class attributes `model_type` (the name in config.json and after `--model`) and
`config_class` (its bdh.config.ModelConfig dataclass). Adding a family is writing its module
and one `register(...)` line below.
"""

from __future__ import annotations

from bdh.baselines.brillm import BriLLM
from bdh.baselines.gpt import GPT
from bdh.baselines.mpl import MPL
from bdh.errors import UserError
from bdh.model import BDH

FAMILIES: dict[str, type] = {}


def register(model_class: type) -> type:
    FAMILIES[model_class.model_type] = model_class
    return model_class


register(BDH)
register(GPT)
register(BriLLM)
register(MPL)


def names() -> tuple[str, ...]:
    return tuple(FAMILIES)


def get(model_type: str) -> type:
    """The model class of a model_type (its config class is `.config_class`)."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UserError(f"unknown model type {model_type!r}; choose one of: {', '.join(FAMILIES)}") from None
