"""The models BDH is compared against, each a family with BDH's call contract (bdh.protocol)."""

from bdh.baselines.gpt import GPT, GPTConfig, KVCache
from bdh.baselines.mpl import MPL, MPLConfig, MPLState
from bdh.baselines.match import match_gpt_config, param_report

__all__ = ["GPT", "GPTConfig", "KVCache", "match_gpt_config", "param_report", "MPL", "MPLConfig", "MPLState"]
