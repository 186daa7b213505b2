"""Each model at its own best settings: a short search on a slice held out from the training split.

Before an experiment trains a run for its report, it trains one short *trial* per point of a
small grid (default: the learning rates 1e-3, 3e-3 and 1e-2, a factor of about 3 apart, around
the 1e-3 that BDH and nanoGPT-sized GPTs are usually trained at) and keeps the point with the
lowest loss on the held-out slice. The rules:

- Trials train on the training split minus its last `holdout` share (5%) and are scored on that
  share (`TrainConfig.holdout_fraction`, `bdh.data.hold_out`): the validation split that the
  reported numbers come from is never looked at, and no training window overlaps a scored one.
- A trial is the run scaled down by `share` (a quarter): its steps, warm-up, decay and time
  budget; the learning-rate schedule has the run's shape. Short trials favour higher learning
  rates than the full run would (the short-horizon bias); the grid is small so that the search
  costs `share` x its size of the runs (0.75x with the defaults), and its cost is reported.
- min_lr moves with lr (their ratio stays that of the settings); a trial that diverges scores
  infinity; ties go to the first point of the grid.
- A best rate at an edge of the grid says the best lies beyond it. So where the grid searches the
  learning rate alone and its best point is its highest (or lowest) rate, one more trial is run
  one grid step further (the ratio of the two outermost rates), and again, up to `extend` times,
  until the best point has a worse (or diverged) neighbour on both sides.
- Each trial is a normal run directory (DIR/tune/<run>-<point>/), so a killed search resumes
  and a finished one is reused, like every run of an experiment.

Only fields of TUNABLE can be searched: lr, warmup_iters, weight_decay.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bdh.errors import UserError
from bdh.experiments import runs
from bdh.experiments.runs import RunFailed, RunPlan
from bdh.train.args import TrainConfig

TUNABLE = {"lr": float, "warmup_iters": int, "weight_decay": float}
DEFAULT_GRID = {"lr": (1e-3, 3e-3, 1e-2)}
SHORT = {"lr": "lr", "warmup_iters": "wu", "weight_decay": "wd"}
TUNE_DIR = "tune"


@dataclass
class TuneSpec:
    """The search: its grid (empty: no search), trial budget share, held-out share, batches scored."""

    grid: dict[str, tuple] = field(default_factory=lambda: dict(DEFAULT_GRID))
    share: float = 0.25  # trial budget / run budget (steps, warm-up, decay, minutes)
    holdout: float = 0.05  # share of the training split held out for scoring the trials
    eval_iters: int = 0  # batches of the held-out slice scored at a trial's end (0: all of it)
    extend: int = 2  # trials added beyond a learning-rate grid's edge while its best point sits there

    def __post_init__(self) -> None:
        self.grid = check_grid(self.grid)
        if not 0.0 < self.share <= 1.0:
            raise UserError(f"the trial share must lie in (0, 1], got {self.share!r}")
        if not 0.0 < self.holdout < 0.5:
            raise UserError(f"the held-out share of the training split must lie in (0, 0.5), got {self.holdout!r}")
        if self.eval_iters < 0:
            raise UserError(f"the trial evaluation batches must be 0 (all) or positive, got {self.eval_iters!r}")
        if self.extend < 0:
            raise UserError(f"the trials beyond the grid's edge must be 0 or more, got {self.extend!r}")

    @property
    def active(self) -> bool:
        return bool(self.grid)

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the grid, in the grid's order."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]

    def to_dict(self) -> dict[str, Any]:
        return {"grid": {k: list(v) for k, v in self.grid.items()}, "share": self.share, "holdout": self.holdout,
                "eval_iters": self.eval_iters, "extend": self.extend}

    @classmethod
    def off(cls) -> "TuneSpec":
        return cls(grid={})


def check_grid(grid: dict[str, Any]) -> dict[str, tuple]:
    checked = {}
    for key, values in grid.items():
        if key not in TUNABLE:
            raise UserError(f"cannot tune {key!r}: the search covers {', '.join(TUNABLE)}")
        values = tuple(values)
        if not values or len(set(values)) != len(values):
            raise UserError(f"the grid of {key} must list distinct values, got {list(values)}")
        try:
            values = tuple(TUNABLE[key](v) for v in values)
        except (TypeError, ValueError):
            raise UserError(f"the grid of {key} must hold numbers, got {list(values)}") from None
        if any(v < 0 or (key == "lr" and v <= 0) for v in values):
            raise UserError(f"the grid of {key} must hold {'positive' if key == 'lr' else 'non-negative'} "
                            f"values, got {list(values)}")
        checked[key] = values
    return checked


def parse_grid(items: list[str]) -> dict[str, tuple]:
    """['lr=1e-3,3e-3', 'weight_decay=0,0.1'] -> {'lr': (0.001, 0.003), 'weight_decay': (0.0, 0.1)}."""
    grid: dict[str, tuple] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"--tune expects KEY=V1,V2,..., got {item!r}")
        if key in grid:
            raise UserError(f"--tune gives {key} twice")
        if key not in TUNABLE:
            raise UserError(f"cannot tune {key!r}: the search covers {', '.join(TUNABLE)}")
        try:
            grid[key] = tuple(TUNABLE[key](float(v)) if TUNABLE[key] is int else float(v)
                              for v in values.split(",") if v.strip())
        except ValueError:
            raise UserError(f"--tune {key}= expects comma-separated numbers, got {values!r}") from None
    return check_grid(grid)


def point_name(point: dict[str, Any]) -> str:
    """A file-safe name of a grid point, e.g. 'lr3e-03-wd0.1'."""
    parts = []
    for key, value in point.items():
        text = f"{value:.0e}" if key == "lr" else f"{value:g}"
        parts.append(f"{SHORT[key]}{text}")
    return "-".join(parts)


def apply(cfg: TrainConfig, point: dict[str, Any]) -> TrainConfig:
    """cfg at a grid point; min_lr keeps its ratio to lr."""
    values = dict(point)
    if "lr" in values:
        values["min_lr"] = values["lr"] * cfg.min_lr / cfg.lr
    return dataclasses.replace(cfg, **values)


def trial_config(cfg: TrainConfig, point: dict[str, Any], spec: TuneSpec, out: Path) -> TrainConfig:
    """A trial: cfg at the point, scaled down by spec.share, scored on the held-out end of the training split."""
    run = apply(cfg, point)
    steps = max(1, math.ceil(run.max_iters * spec.share))
    warmup = min(round(run.warmup_iters * spec.share), steps - 1)
    decay = None if run.decay_iters is None else max(warmup + 1, round(run.decay_iters * spec.share))
    minutes = None if run.max_minutes is None else run.max_minutes * spec.share
    seconds = None if run.train_seconds is None else run.train_seconds * spec.share
    return dataclasses.replace(run, max_iters=steps, warmup_iters=warmup, decay_iters=decay, max_minutes=minutes,
                               train_seconds=seconds,
                               eval_interval=0, final_eval_iters=spec.eval_iters, holdout_fraction=spec.holdout,
                               ckpt_interval=0, sample_tokens=0, out=str(out))


def choose(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The trial with the lowest held-out loss (the first of equal ones); diverged trials never win."""
    finished = [t for t in trials if t.get("status") == "done" and math.isfinite(t["holdout_loss"])]
    if not finished:
        raise UserError("every trial of the search diverged: give a grid of lower learning rates (--tune lr=...)")
    return min(finished, key=lambda t: t["holdout_loss"])


def search(name: str, cfg: TrainConfig, spec: TuneSpec, out: Path, overwrite: bool,
           say: Callable[[str], None] = print) -> tuple[TrainConfig, dict[str, Any] | None]:
    """(cfg at the chosen point, the search's record) for the run called name; (cfg, None) without a grid."""
    if not spec.active:
        return cfg, None
    trials = []
    points = spec.points()

    def trial(point: dict[str, Any], where: str) -> None:
        trial_dir = out / TUNE_DIR / f"{name}-{point_name(point)}"
        plan = RunPlan(f"{name} trial {point_name(point)}", trial_config(cfg, point, spec, trial_dir))
        status = runs.inspect_run(plan, overwrite)
        say(f"  search {name} [{where}] {point_name(point)}: {status.kind} -> {trial_dir}")
        trials.append(run_trial(plan, status, point))

    for i, point in enumerate(points, 1):
        trial(point, f"{i}/{len(points)}")
    for _ in range(spec.extend if list(spec.grid) == ["lr"] else 0):
        beyond = beyond_edge([t["point"]["lr"] for t in trials], choose(trials)["point"]["lr"])
        if beyond is None:
            break
        trial({"lr": beyond}, "beyond the grid's edge")
    best = choose(trials)
    record = {
        "grid": {k: list(v) for k, v in spec.grid.items()}, "share": spec.share, "holdout": spec.holdout,
        "trial_steps": trials[0]["max_iters"], "trial_seconds": trials[0]["train_seconds"],
        "trials": trials, "chosen": best["point"],
        "cost": {"runs": len(trials), "tokens": sum(t.get("tokens_seen") or 0 for t in trials),
                 "time_s": sum(t.get("train_time_s") or 0.0 for t in trials)},
    }
    say(f"  search {name}: chose {point_name(best['point'])} (held-out loss {best['holdout_loss']:.4f}); "
        f"cost {record['cost']['time_s']:.0f} s, {record['cost']['tokens']:,} tokens")
    return apply(cfg, best["point"]), record


def beyond_edge(tried: list[float], best: float) -> float | None:
    """The next learning rate past the edge of the rates tried where the best one sits there, one
    step as wide as the outermost step at that edge; None where the best has a neighbour both sides."""
    rates = sorted(set(tried))
    if len(rates) < 2 or rates[0] < best < rates[-1]:
        return None
    if best == rates[-1]:
        return float(f"{best * best / rates[-2]:.3g}")
    return float(f"{best * best / rates[1]:.3g}")


def run_trial(plan: RunPlan, status: runs.RunStatus, point: dict[str, Any]) -> dict[str, Any]:
    base = {"point": point, "run_dir": f"{TUNE_DIR}/{plan.run_dir.name}", "max_iters": plan.cfg.max_iters,
            "train_seconds": plan.cfg.train_seconds}
    try:
        if status.kind != "finished":
            runs.train_run(plan, status)
    except RunFailed as err:
        if err.status != "diverged":
            raise
        return {**base, "status": "diverged", "holdout_loss": math.inf, "message": str(err)}
    s = runs.summarize(plan.run_dir)
    return {**base, "status": "done", "holdout_loss": s["final_val_loss"], "holdout_se": s["final_val_se"],
            "steps": s["steps"], "tokens_seen": s["tokens_seen"], "tokens_per_s": s["tokens_per_s"],
            "train_time_s": s["train_time_s"]}


def describe(record: dict[str, Any] | None, fixed_lr: float | None = None) -> str:
    """One line for the reports."""
    if record is None:
        return f"not tuned (lr {fixed_lr:g} as given)" if fixed_lr is not None else "not tuned"
    scores = ", ".join(f"{point_name(t['point'])}: " + (f"{t['holdout_loss']:.4f}" if t["status"] == "done"
                                                          else "diverged") for t in record["trials"])
    cost = record["cost"]
    seconds = record.get("trial_seconds")
    if seconds:  # a time budget: the steps it took are each trial's own
        steps = "/".join(f"{t['steps']:,}" for t in record["trials"] if t["status"] == "done")
        after = f"{seconds:.4g} s of training steps, {steps} steps"
    else:
        after = f"{record['trial_steps']} steps"
    return (f"chose {point_name(record['chosen'])} of {scores} (held-out loss after {after}); "
            f"search cost {cost['time_s']:,.0f} s, {cost['tokens']:,} tokens")
