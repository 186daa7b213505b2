"""Experiments that check the paper's claims: BDH against the GPT baseline of the same size
(`compare`), and validation loss against parameter count at several sizes (`sweep`). Both follow
one protocol (docs/comparisons.md): each model's learning rate from a search on a slice held out
from the training split (`TuneSpec`), final losses on the whole validation split with their
standard error, any registered family in the models list.

Every run is a normal `bdh train` run directory, trained in a child process that measures its
peak memory; an experiment that was killed resumes where it stopped when run again.
"""

from bdh.experiments.compare import compare, plan_compare
from bdh.experiments.runs import RunFailed
from bdh.experiments.sweep import DEFAULT_SIZES, PowerLaw, fit_scaling_law, plan_sweep, sweep
from bdh.experiments.tuning import TuneSpec

__all__ = ["DEFAULT_SIZES", "PowerLaw", "RunFailed", "TuneSpec", "compare", "fit_scaling_law", "plan_compare",
           "plan_sweep", "sweep"]
