"""The model families an experiment trains, and the config each one gets.

BDH is the reference: its config is --preset with --model-arg. Every other family named in
--models is a family registered in `bdh.registry`, and its config is made by one rule:

- a family with a *matcher* below gets the config of the same parameter count as the BDH
  (the GPT: `bdh.baselines.match_gpt_config`, the GPT-2 shape within 5%);
- a family without one trains its own preset of the same name as --preset (for BDH's `small`
  its `small`), so a newly registered family takes part in `bdh compare --models bdh,NAME` at
  once; the report shows both parameter counts. Give it a matcher here to compare at equal size.

Family arguments (`--family-arg NAME:KEY=VALUE`, `--gpt-arg KEY=VALUE`) are held fixed by the
matcher, or override the family's preset.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from bdh import registry
from bdh.baselines import match_gpt_config
from bdh.errors import UserError
from bdh.train.args import TrainConfig

REFERENCE = "bdh"
DEFAULT_MODELS = ("bdh", "gpt")


def match_gpt(bdh_model, cfg: TrainConfig, fixed: dict[str, Any]) -> dict[str, Any]:
    """The GPT of the BDH's parameter count, with learned positions for exactly cfg.block_size."""
    fixed = {"block_size": cfg.block_size, "compute_dtype": bdh_model.compute_dtype, **fixed}
    return match_gpt_config(bdh_model, **fixed).to_dict()


# family -> (BDH model config, shared TrainConfig, fixed fields) -> every field of its config
MATCHERS: dict[str, Callable[[Any, TrainConfig, dict[str, Any]], dict[str, Any]]] = {"gpt": match_gpt}


def parse_models(text: str) -> list[str]:
    """'bdh,gpt' -> ['bdh', 'gpt']: registered families, distinct, in the order given."""
    models = [m for m in text.replace(" ", "").split(",") if m]
    return check_models(models)


def check_models(models) -> list[str]:
    models = list(models)
    unknown = [m for m in models if m not in registry.names()]
    if not models or unknown:
        raise UserError(f"--models expects a comma-separated list of registered model families "
                        f"({', '.join(registry.names())}), got {','.join(map(str, models)) or 'nothing'}")
    if len(set(models)) != len(models):
        raise UserError(f"--models names a family twice: {','.join(models)}")
    return models


def parse_family_args(items: list[str]) -> dict[str, dict[str, Any]]:
    """['gpt:n_layer=4', ...] -> {'gpt': {'n_layer': 4}} (values read as YAML)."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        family, sep, rest = item.partition(":")
        key, eq, value = rest.partition("=")
        if not sep or not eq or not family.strip() or not key.strip():
            raise UserError(f"--family-arg expects FAMILY:KEY=VALUE, got {item!r}")
        registry.get(family.strip())
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        out.setdefault(family.strip(), {})[key.strip()] = parsed
    return out


def how_sized(family: str) -> str:
    """One phrase for the reports: how this family's config was made."""
    if family == REFERENCE:
        return "the reference (--preset, --model-arg)"
    if family in MATCHERS:
        return "matched to BDH's parameter count"
    return "its own preset of the same name (no parameter matcher)"


def family_train_config(cfg: TrainConfig, family: str, bdh_model, fixed: dict[str, Any], out) -> TrainConfig:
    """The run of `family` in an experiment: cfg (the BDH run's settings) with this family's model."""
    if family == REFERENCE:
        return dataclasses.replace(cfg, out=str(out))
    config_class = registry.get(family).config_class
    matcher = MATCHERS.get(family)
    if matcher is not None:
        overrides = matcher(bdh_model, cfg, dict(fixed))
        # every field is given, so the preset only names the run
        preset = cfg.preset if cfg.preset in config_class.presets else next(iter(config_class.presets), cfg.preset)
    else:
        if cfg.preset not in config_class.presets:
            raise UserError(f"{family} has no parameter matcher and no preset {cfg.preset!r} (its presets: "
                            f"{', '.join(config_class.presets)}): use a --preset both families have")
        preset, overrides = cfg.preset, dict(fixed)
    return dataclasses.replace(cfg, model_type=family, preset=preset, model_overrides=overrides, out=str(out))


__all__ = ["DEFAULT_MODELS", "MATCHERS", "REFERENCE", "check_models", "family_train_config",
           "how_sized", "parse_family_args", "parse_models"]
