"""`bdh sweep`: the scaling experiment at CPU scale, validation loss against parameter count.

BDH grows only its neuron count n (mlp_internal_dim_multiplier), as in the paper; at every BDH
size the GPT is the GPT-2-shaped config with the same parameter count (within 5%), and any other
family of --models is sized by bdh.experiments.families. All runs share one TrainConfig (data,
tokenizer, batches, schedule shape, seed, budget per run) but their searched settings: every run
gets its own learning rate from a short search on a slice held out from the training split
(bdh.experiments.tuning; trials in DIR/tune/), and its final loss on the whole validation split.
Each run lives in DIR/<model>-m<multiplier>/ (gpt-m8 is the GPT matched to bdh-m8); sweep.json
is rewritten after every run, so the same command run again skips the finished runs and
resumes an unfinished one. Power laws L = a N^-alpha are fitted per model by least squares in
log-log space; sweep.md holds the table and the fits, scaling.png the log-log plot.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bdh.errors import UserError
from bdh.experiments import plots, runs, tuning
from bdh.experiments.compare import merge_family_args, model_shape
from bdh.experiments.families import DEFAULT_MODELS, REFERENCE, check_models, family_train_config
from bdh.fileio import atomic_write_bytes
from bdh.experiments.runs import RunFailed, RunPlan, fmt
from bdh.experiments.tuning import TuneSpec
from bdh.train.args import TrainConfig

# the small preset's n = 512 ... 8192 neurons: 0.26 M to 3.2 M parameters (12x), 2x steps
DEFAULT_SIZES = (4, 8, 16, 32, 64)
MODELS = DEFAULT_MODELS
FIT_ON = ("auto", "total", "non-embedding")
MIN_SIZES = 4
MIN_SPAN = 10.0
MANIFEST = "sweep.json"
REPORT = "sweep.md"
FIGURE = "scaling.png"
SIZE_FIELD = "mlp_internal_dim_multiplier"


# --------------------------------------------------------------------------------------------
# the fit

@dataclass
class PowerLaw:
    """loss = c + a * N^-alpha (c = 0 for the two-parameter fit)."""

    a: float
    alpha: float
    c: float
    r2: float  # of log loss, over the points fitted
    points: int

    def predict(self, n) -> np.ndarray:
        return self.c + self.a * np.asarray(n, dtype=float) ** -self.alpha

    def describe(self) -> str:
        irreducible = f" + {self.c:.3g}" if self.c else ""
        return f"L = {self.a:.3g} N^-{self.alpha:.3f}{irreducible} (R² {self.r2:.3f})"

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def fit_scaling_law(params: Sequence[float], losses: Sequence[float], irreducible: bool = False) -> PowerLaw:
    """Least-squares power law through (N, loss) points.

    Two parameters (default): a straight line through (log N, log loss), needs 2 points.
    irreducible=True adds a floor c >= 0 (scipy curve_fit, started from the two-parameter fit),
    needs 4 points: with the few noisy points of a CPU sweep it is often ill-determined.
    """
    n = np.asarray(params, dtype=float)
    loss = np.asarray(losses, dtype=float)
    if n.shape != loss.shape or n.ndim != 1:
        raise ValueError("params and losses must be two sequences of the same length")
    if len(n) < (4 if irreducible else 2) or len(set(n.tolist())) < 2:
        raise ValueError(f"a power-law fit needs at least {4 if irreducible else 2} distinct sizes")
    if (n <= 0).any() or (loss <= 0).any():
        raise ValueError("parameters and losses must be positive")
    slope, intercept = np.polyfit(np.log(n), np.log(loss), 1)
    a, alpha, c = math.exp(intercept), -slope, 0.0
    if irreducible:
        from scipy.optimize import curve_fit

        def model(x, a_, alpha_, c_):
            return c_ + a_ * x ** -alpha_

        (a, alpha, c), _ = curve_fit(model, n, loss, p0=(a, max(alpha, 1e-3), 0.0),
                                     bounds=([0.0, 0.0, 0.0], [np.inf, 10.0, float(loss.min())]), maxfev=20000)
    fitted = PowerLaw(float(a), float(alpha), float(c), 0.0, len(n))
    residual = np.log(loss) - np.log(fitted.predict(n))
    spread = np.log(loss) - np.log(loss).mean()
    total = float((spread ** 2).sum())
    fitted.r2 = 1.0 - float((residual ** 2).sum()) / total if total > 0 else 1.0
    return fitted


# --------------------------------------------------------------------------------------------
# the runs

def run_name(model: str, size: int) -> str:
    return f"{model}-m{size}"


def parse_sizes(text: str) -> list[int]:
    """'4,8,16' -> [4, 8, 16]: positive, distinct multipliers, at least two."""
    try:
        sizes = [int(item) for item in text.replace(" ", "").split(",") if item]
    except ValueError:
        raise UserError(f"--sizes expects comma-separated integers (neuron multipliers), got {text!r}") from None
    return check_sizes(sizes)


def check_sizes(sizes: Sequence[int]) -> list[int]:
    sizes = list(sizes)
    if len(sizes) < 2:
        raise UserError(f"a sweep needs at least 2 sizes, got {sizes}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
        raise UserError(f"sizes must be positive integers (mlp_internal_dim_multiplier values), got {sizes}")
    if len(set(sizes)) != len(sizes):
        raise UserError(f"sizes must be distinct, got {sizes}")
    return sorted(sizes)


def plan_sweep(cfg: TrainConfig, out: Path, sizes: Sequence[int], models: Sequence[str] = MODELS,
               gpt_fixed: dict[str, Any] | None = None, family_args: dict[str, dict[str, Any]] | None = None,
               tune: TuneSpec | None = None) -> list[tuple[int, RunPlan]]:
    """(size, run) for every run, smallest first, after every check possible before training."""
    sizes = check_sizes(sizes)
    models = check_models(models)
    family_args = merge_family_args(gpt_fixed, family_args)
    tune = tune if tune is not None else TuneSpec()
    gpt = family_args.get("gpt", {})
    if cfg.model_type != REFERENCE:
        raise UserError("sweep trains the models named by --models: leave model_type out of the options")
    if SIZE_FIELD in cfg.model_overrides:
        raise UserError(f"sweep sets {SIZE_FIELD} from --sizes: do not override it")
    if cfg.stream and "gpt" in models and (gpt.get("pos_encoding") != "alibi" or not gpt.get("kv_cache_size")):
        raise UserError("stream mode needs a GPT with a carried, bounded cache: add --gpt-arg pos_encoding=alibi "
                        "--gpt-arg kv_cache_size=K (K > 0), or --models bdh")
    runs.check_experiment_dir(out, MANIFEST, cfg.data)
    runs.check_plotting()
    vocab_size = runs.preflight_data(cfg, tune.holdout if tune.active else 0.0)
    plans = []
    for size in sizes:
        bdh_cfg = dataclasses.replace(cfg, model_overrides={**cfg.model_overrides, SIZE_FIELD: size})
        bdh_model = runs.check_model(bdh_cfg, vocab_size)
        for family in models:
            try:
                family_cfg = family_train_config(bdh_cfg if family == REFERENCE else cfg, family, bdh_model,
                                                 family_args.get(family, {}), out / run_name(family, size))
            except UserError as err:
                raise UserError(f"size {size}: {err}") from None
            model = bdh_model if family == REFERENCE else runs.check_model(family_cfg, vocab_size)
            plans.append((size, RunPlan(run_name(family, size), family_cfg, model)))
    return plans


def size_notes(plans: list[tuple[int, RunPlan]]) -> list[str]:
    """Warnings when the sizes fall short of the experiment's bar (4 sizes spanning 10x)."""
    notes = []
    for model in dict.fromkeys(p.cfg.model_type for _, p in plans):
        counts = [p.model.num_params() for _, p in plans if p.cfg.model_type == model]
        if not counts:
            continue
        if len(counts) < MIN_SIZES:
            notes.append(f"{model}: only {len(counts)} sizes (the scaling experiment asks for at least {MIN_SIZES})")
        if max(counts) / min(counts) < MIN_SPAN:
            notes.append(f"{model}: total parameters span only {max(counts) / min(counts):.1f}x "
                         f"(the scaling experiment asks for {MIN_SPAN:g}x)")
    return notes


def sweep(cfg: TrainConfig, out: str | Path, sizes: Sequence[int] = DEFAULT_SIZES, models: Sequence[str] = MODELS,
          gpt_fixed: dict[str, Any] | None = None, fit_on: str = "auto", overwrite: bool = False,
          command: str | None = None, say: Callable[[str], None] = print, *,
          family_args: dict[str, dict[str, Any]] | None = None, tune: TuneSpec | None = None) -> dict[str, Any]:
    """Search each run's settings, train every size (skipping finished runs, resuming an unfinished
    one), fit, write; sweep.json's content. tune: the search (default TuneSpec(); TuneSpec.off())."""
    out = Path(out)
    if fit_on not in FIT_ON:
        raise UserError(f"fit_on must be one of {', '.join(FIT_ON)}, got {fit_on!r}")
    tune = tune if tune is not None else TuneSpec()
    models = check_models(models)
    plans = plan_sweep(cfg, out, sizes, models, gpt_fixed, family_args, tune)
    # without a search every run's settings are known now: refuse a directory of other settings before training
    statuses = [None if tune.active else runs.inspect_run(plan, overwrite) for _, plan in plans]
    notes = size_notes(plans)
    for note in notes:
        say(f"bdh sweep: note: {note}")
    runs.claim_experiment_dir(out)
    manifest = runs.Manifest(out / MANIFEST)
    if overwrite:
        manifest.data = {"runs": {}}
    manifest.data.update(experiment="sweep", command=command, started=runs.now(), machine=runs.machine(),
                         settings={**cfg.to_dict(), "out": str(out)}, sizes=list(check_sizes(sizes)),
                         models=list(models), family_args=merge_family_args(gpt_fixed, family_args),
                         tune=tune.to_dict(), notes=notes)
    manifest.data.setdefault("tuning", {})
    tuned = []
    for i, ((size, plan), status) in enumerate(zip(plans, statuses), 1):
        if tune.active:
            chosen, record = tuning.search(plan.name, plan.cfg, tune, out, overwrite, say)
            manifest.data["tuning"][plan.name] = record
            manifest.save()
            plan = RunPlan(plan.name, chosen, plan.model)
            status = runs.inspect_run(plan, overwrite)
        tuned.append((size, plan))
        train_one(manifest, size, plan, status, f"[{i}/{len(plans)}]", say)
    return write_outputs(manifest, out, tuned, fit_on, say)


def train_one(manifest: runs.Manifest, size: int, plan: RunPlan, status: runs.RunStatus, counter: str,
              say: Callable[[str], None]) -> None:
    """Train, resume or reuse one run and record it; a diverged run is recorded and skipped from then on."""
    from bdh.experiments.compare import describe

    head = f"bdh sweep: {counter} {plan.name} ({plan.model.num_params():,} parameters)"
    earlier = manifest.runs.get(plan.name) or {}
    if status.kind != "finished" and earlier.get("status") == "diverged":
        say(f"{head}: skipped, it diverged before ({earlier.get('message')}); --overwrite retrains it")
        return
    say(f"{head}, lr {plan.cfg.lr:g}: {describe(status)} -> {plan.run_dir}")
    try:
        report = runs.train_run(plan, status) if status.kind != "finished" else None
    except RunFailed as err:
        if err.status != "diverged":
            raise
        say(f"{head}: diverged, left out of the fit: {err}")
        counts = runs.param_counts({"model_type": plan.cfg.model_type, **plan.model.to_dict()})
        manifest.runs[plan.name] = {"status": "diverged", "message": str(err), "size": size, "lr": plan.cfg.lr,
                                    "model_type": plan.cfg.model_type, "run_dir": plan.run_dir.name, **counts}
        manifest.save()
        return
    runs.record_run(manifest, plan.name, plan.run_dir, report, size=size, lr=plan.cfg.lr,
                    warmup_iters=plan.cfg.warmup_iters, weight_decay=plan.cfg.weight_decay)


def fit_axis(points: dict[str, list[dict[str, Any]]], fit_on: str) -> str:
    """'total' or 'non-embedding': auto takes total parameters when they span 10x for every model."""
    if fit_on != "auto":
        return fit_on
    spans = [max(r["params"] for r in rs) / min(r["params"] for r in rs) for rs in points.values() if rs]
    return "total" if spans and min(spans) >= MIN_SPAN else "non-embedding"


def write_outputs(manifest: runs.Manifest, out: Path, plans: list[tuple[int, RunPlan]], fit_on: str,
                  say: Callable[[str], None]) -> dict[str, Any]:
    data = manifest.data
    done = {m: [data["runs"][p.name] for _, p in plans
                if p.cfg.model_type == m and data["runs"].get(p.name, {}).get("status") == "done"]
            for m in dict.fromkeys(p.cfg.model_type for _, p in plans)}
    done = {m: rs for m, rs in done.items() if rs}
    axis = fit_axis(done, fit_on)
    key = "params" if axis == "total" else "params_without_embeddings"
    fits, all_fits = {}, {}
    for model, rs in done.items():
        all_fits[model] = {}
        for name, k in (("total", "params"), ("non-embedding", "params_without_embeddings")):
            try:
                fit = fit_scaling_law([r[k] for r in rs], [r["final_val_loss"] for r in rs])
            except ValueError:
                continue
            all_fits[model][name] = fit.to_dict()
            if k == key:
                fits[model] = fit
    data.update(finished=runs.now(), fit_on=axis, fits=all_fits, report=REPORT, figure=FIGURE)
    xlabel = "parameters (total)" if axis == "total" else "parameters without embeddings"
    s = data["settings"]
    budget = f"{s['max_iters']:,} steps" + (f" / {s['max_minutes']:g} min" if s["max_minutes"] is not None else "")
    title = f"Scaling: {s['preset']} preset, {budget} per run"
    points = {m: [(r[key], r["final_val_loss"]) for r in rs] for m, rs in done.items()}
    plots.plot_scaling(points, fits, out / FIGURE, xlabel, title)
    atomic_write_bytes(out / REPORT, render(data, plans).encode("utf-8"))
    manifest.save()
    say(f"bdh sweep: wrote {out / REPORT}, {out / MANIFEST} and {out / FIGURE}; runs in {out}/<model>-m<size>")
    return data


def search_sentence(data: dict[str, Any]) -> str:
    t = data.get("tune") or {}
    records = [r for r in (data.get("tuning") or {}).values() if r]
    if not t.get("grid") or not records:
        return "no search (the settings above for every run)."
    time_s = sum(r["cost"]["time_s"] for r in records)
    tokens = sum(r["cost"]["tokens"] for r in records)
    return (f"grid {', '.join(f'{k} in {v}' for k, v in t['grid'].items())}, each trial the run scaled to "
            f"{t['share']:g} of its budget, trained on the training split minus its last {t['holdout']:g} and scored "
            f"on that share (never on the validation split); the search cost {time_s:,.0f} s and {tokens:,} tokens "
            "in all (below).")


def render(data: dict[str, Any], plans: list[tuple[int, RunPlan]]) -> str:
    """sweep.md: what was run, the table of runs, the fits, the figure."""
    s = data["settings"]
    lines = [
        f"# Scaling sweep ({s['preset']} preset, BDH neuron multipliers {', '.join(map(str, data['sizes']))})",
        "",
        *runs.provenance(data, "bdh sweep"),
        "",
        "BDH scales only its neuron count n (mlp_internal_dim_multiplier x n_embd); gpt-mK is the GPT-2-shaped "
        "model with the parameter count of bdh-mK (within 5%). Every run was trained alike: "
        + runs.describe_training(s) + " The learning rate (and any other searched setting) is each run's own: "
        + search_sentence(data),
        "",
        "| run | model | parameters | without embeddings | lr | tokens seen | final val loss ± SE | best val loss "
        "| final bits/byte | tokens/s | peak RSS (MiB) | wall time (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for _, plan in plans:
        r = data["runs"].get(plan.name) or {}
        if r.get("status") == "done":
            shape = model_shape(r).split(": ", 1)[1]
            lines.append(f"| {plan.name} | {shape} | {fmt(r['params'])} | {fmt(r['params_without_embeddings'])} "
                         f"| {fmt(r.get('lr'), 'g')} | {fmt(r['tokens_seen'])} | {fmt(r['final_val_loss'], '.4f')}"
                         f"{' ± ' + fmt(r.get('final_val_se'), '.4f') if r.get('final_val_se') else ''} "
                         f"| {fmt(r['best_val_loss'], '.4f')} | {fmt(r['final_val_bpb'], '.4f')} "
                         f"| {fmt(r['tokens_per_s'])} | {fmt(r.get('peak_rss_mib'))} | {fmt(r['train_time_s'], ',.1f')} |")
        else:
            state = r.get("status", "not trained")
            lines.append(f"| {plan.name} | {state} | {fmt(r.get('params'))} "
                         f"| {fmt(r.get('params_without_embeddings'))} | {fmt(r.get('lr'), 'g')} | | | | | | | |")
    axis = "total parameters" if data["fit_on"] == "total" else "parameters without embeddings"
    lines += ["", "## Power-law fits: final validation loss L (nats/token) against N", "",
              f"Least squares of log L on log N, L = a N^-alpha. The figure uses N = {axis} "
              "(total parameters when they span 10x for every model, else parameters without embeddings).", ""]
    for model, fits in data["fits"].items():
        for name, fit in fits.items():
            law = runs.fmt(fit["a"], ".3g")
            lines.append(f"- {model.upper()}, N = {name} parameters: L = {law} N^-{fit['alpha']:.4f}, "
                         f"R² {fit['r2']:.3f} over {fit['points']} runs")
    if not data["fits"]:
        lines.append("- no model has two finished runs yet")
    for note in data.get("notes") or []:
        lines.append(f"- note: {note}")
    lines += ["", "## The search of each run's settings", ""]
    for _, plan in plans:
        lines.append(f"- {plan.name}: {tuning.describe((data.get('tuning') or {}).get(plan.name), plan.cfg.lr)}")
    lines += ["", f"![validation loss against parameters, log-log]({FIGURE})", "",
              f"Raw metrics: `<run>/metrics.jsonl`; all numbers above are in `{MANIFEST}`.", ""]
    return "\n".join(lines)
