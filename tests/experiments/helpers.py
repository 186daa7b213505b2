"""Stand-in for the child process of experiment runs."""

from __future__ import annotations

from pathlib import Path

from bdh.experiments import runs


class Runs:
    """Stands in for runs.run_in_child: trains in this process, counts the calls, can stop early.

    stop_at: the call (1-based) that trains a single step (as if killed after its first checkpoint)
    and then raises KeyboardInterrupt, like a Ctrl-C / kill in the middle of an experiment.
    """

    def __init__(self, stop_at: int | None = None):
        self.specs: list[dict] = []
        self.stop_at = stop_at

    def __call__(self, spec: dict) -> dict:
        self.specs.append(spec)
        if len(self.specs) == self.stop_at:
            # a time budget this small ends the run after its first step, with a checkpoint
            runs.execute({**spec, "config": {**spec["config"], "max_minutes": 1e-9}})
            raise KeyboardInterrupt
        return runs.execute(spec)

    @property
    def names(self) -> list[str]:
        return [Path(s["config"]["out"]).name for s in self.specs]
