"""The models BDH is compared against, with BDH's call contract (baselines-spec.md)."""

from bdh.baselines.gpt import GPT, GPTConfig, KVCache
from bdh.baselines.match import match_gpt_config, param_report

__all__ = ["GPT", "GPTConfig", "KVCache", "match_gpt_config", "param_report"]
