"""`bdh compare`: BDH against other model families (default: the GPT-2 baseline of the same
parameter count), each at its own best learning rate, at equal tokens and at equal wall-clock.

The protocol, the same for every family (bdh.experiments.families says how each is sized):

1. **Search** (bdh.experiments.tuning): for every model, short trials over a small grid
   (default lr 1e-3, 3e-3, 1e-2) scored on a slice held out from the training split; the best
   point becomes that model's settings. A setting given explicitly (--lr) is not searched.
2. **Equal tokens**: every model trained on the same batches, tokenizer, schedule shape, seed and
   --max-iters, at its chosen settings; its final loss scored on the whole validation split (or
   --final-eval-iters batches), with the standard error over batches, and the paired difference
   to BDH on the same batches.
3. **Equal wall-clock** (equal_time): every model trained again for the same seconds of training
   steps (the slowest model's equal-token time, or a given number): a time budget whose
   learning-rate decay runs on that clock (TrainConfig.train_seconds), so each model takes as
   many steps as its speed allows, however that speed changes during training. Its settings come
   from a search of their own at that budget (trials of the search's share of the seconds: a rate
   chosen for 200 steps need not suit 2,000), or with time_search=False the equal-token ones.

Outputs in DIR: one run directory per model (DIR/bdh, DIR/gpt, ...), DIR/<model>-time for the
equal-time runs, DIR/tune/ for the trials, compare.md, compare.json, val_loss_vs_tokens.png and
val_loss_vs_time.png.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from bdh.errors import UserError
from bdh.experiments import plots, runs, tuning
from bdh.experiments.families import (DEFAULT_MODELS, REFERENCE, check_models, family_train_config,
                                      how_sized)
from bdh.fileio import atomic_write_bytes
from bdh.experiments.runs import RunPlan, fmt
from bdh.experiments.tuning import TuneSpec
from bdh.train.args import TrainConfig

MANIFEST = "compare.json"
REPORT = "compare.md"
FIG_TOKENS = "val_loss_vs_tokens.png"
FIG_TIME = "val_loss_vs_time.png"
TIME_SUFFIX = "-time"


def gpt_train_config(cfg: TrainConfig, bdh_model, gpt_fixed: dict[str, Any], out: Path) -> TrainConfig:
    """The GPT run of a comparison: cfg with the matched GPT as its model."""
    return family_train_config(cfg, "gpt", bdh_model, gpt_fixed, out)


def merge_family_args(gpt_fixed: dict[str, Any] | None,
                      family_args: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    merged = {k: dict(v) for k, v in (family_args or {}).items()}
    if gpt_fixed:
        merged["gpt"] = {**merged.get("gpt", {}), **gpt_fixed}
    return merged


def plan_compare(cfg: TrainConfig, out: Path, gpt_fixed: dict[str, Any] | None = None,
                 models=DEFAULT_MODELS, family_args: dict[str, dict[str, Any]] | None = None,
                 tune: TuneSpec | None = None) -> list[RunPlan]:
    """One run per model, after every check that can be made before training (nothing is written)."""
    models = check_models(models)
    family_args = merge_family_args(gpt_fixed, family_args)
    tune = tune if tune is not None else TuneSpec()
    if cfg.model_type != REFERENCE:
        raise UserError("compare trains the models named by --models: leave model_type out of the options")
    runs.check_experiment_dir(out, MANIFEST, cfg.data)
    runs.check_plotting()
    gpt = family_args.get("gpt", {})
    if cfg.stream and "gpt" in models and (gpt.get("pos_encoding") != "alibi" or not gpt.get("kv_cache_size")):
        raise UserError("stream mode needs a GPT with a carried, bounded cache: add --gpt-arg pos_encoding=alibi "
                        "--gpt-arg kv_cache_size=K (K > 0)")
    vocab_size = runs.preflight_data(cfg, tune.holdout if tune.active else 0.0)
    bdh_model = runs.check_model(dataclasses.replace(cfg, out=str(out / REFERENCE)), vocab_size)
    plans = []
    for family in models:
        family_cfg = family_train_config(cfg, family, bdh_model, family_args.get(family, {}), out / family)
        model = bdh_model if family == REFERENCE else runs.check_model(family_cfg, vocab_size)
        plans.append(RunPlan(family, family_cfg, model))
    return plans


def compare(cfg: TrainConfig, out: str | Path, gpt_fixed: dict[str, Any] | None = None, overwrite: bool = False,
            command: str | None = None, say: Callable[[str], None] = print, *, models=DEFAULT_MODELS,
            family_args: dict[str, dict[str, Any]] | None = None, tune: TuneSpec | None = None,
            equal_time: float | str | None = None, time_search: bool = True) -> dict[str, Any]:
    """Search, train (or reuse, or resume) every run and write the comparison; returns compare.json's content.

    tune: the search (default TuneSpec(): lr 1e-3, 3e-3, 1e-2; TuneSpec.off() for none).
    equal_time: None (equal tokens only), "auto" (the slowest model's equal-token training time)
    or a number of seconds of training steps per model.
    time_search: the equal-time runs' settings from a search of their own at the time budget
    (False: the equal-token search's).
    """
    out = Path(out)
    tune = tune if tune is not None else TuneSpec()
    check_equal_time(equal_time)
    plans = plan_compare(cfg, out, gpt_fixed, models, family_args, tune)
    # without a search every run's settings are known now: refuse a directory of other settings before training
    if not tune.active:
        for plan in plans:
            runs.inspect_run(plan, overwrite)
    runs.claim_experiment_dir(out)
    manifest = runs.Manifest(out / MANIFEST)
    if overwrite:
        manifest.data = {"runs": {}}
    manifest.data.update(experiment="compare", command=command, started=runs.now(), machine=runs.machine(),
                         settings={**cfg.to_dict(), "out": str(out)}, models=[p.name for p in plans],
                         family_args=merge_family_args(gpt_fixed, family_args), tune=tune.to_dict(),
                         equal_time=equal_time,
                         equal_time_search=bool(equal_time is not None and time_search and tune.active))
    manifest.data.setdefault("tuning", {})
    # 1. the search: each model's settings (nothing of the reported runs is looked at)
    if tune.active:
        say(f"bdh compare: searching {', '.join(f'{k} in {list(v)}' for k, v in tune.grid.items())} for every model "
            f"on the held-out {tune.holdout:g} of the training split ({tune.share:g} of the budget per trial)")
    tuned = search_all(manifest, plans, tune, out, overwrite, say)
    # 2. equal tokens
    train_all(manifest, tuned, overwrite, say)
    # 3. equal wall-clock
    data = manifest.data
    data["equal_time_runs"] = {}
    if equal_time is not None:
        data["equal_time_target_s"], time_plans = equal_time_plans(tuned, data["runs"], equal_time, out)
        say(f"bdh compare: equal wall-clock, {data['equal_time_target_s']:,.0f} s of training steps per model")
        if data["equal_time_search"]:
            say(f"bdh compare: searching the settings again at this budget ({tune.share:g} of it per trial)")
            time_plans = search_all(manifest, time_plans, tune, out, overwrite, say)
        train_all(manifest, time_plans, overwrite, say)
        data["equal_time_runs"] = {base.name: p.name for base, p in zip(tuned, time_plans)}
    names = [p.name for p in tuned]
    data.update(finished=runs.now(), report=REPORT, figures=[FIG_TOKENS, FIG_TIME])
    ref = data["runs"].get(REFERENCE)
    data["parameter_difference"] = ({n: data["runs"][n]["params"] / ref["params"] - 1 for n in names} if ref else {})
    data["paired"] = paired(out, data, names)
    title = (f"{' vs '.join(n.upper() for n in names)}, {cfg.preset} preset, "
             + " vs ".join(fmt(data['runs'][n]['params']) for n in names) + " parameters")
    curves = {n: data["runs"][n] for n in names}
    plots.plot_curves(curves, "tokens", out / FIG_TOKENS, title + " (equal tokens)")
    timed = {n: data["runs"][data["equal_time_runs"].get(n, n)] for n in names}
    clock = "step_s" if all("step_s" in p for run in timed.values() for p in run["curve"]) else "elapsed_s"
    plots.plot_curves(timed, clock, out / FIG_TIME, title + (" (equal time)" if equal_time else ""))
    atomic_write_bytes(out / REPORT, render(data).encode("utf-8"))
    manifest.save()
    say(f"bdh compare: wrote {out / REPORT}, {out / MANIFEST}, {out / FIG_TOKENS} and {out / FIG_TIME}; "
        f"the runs are {', '.join(str(out / n) for n in names)} (e.g. bdh eval --ckpt {out / names[0]})")
    return data


def search_all(manifest: runs.Manifest, plans: list[RunPlan], tune: TuneSpec, out: Path, overwrite: bool,
               say: Callable[[str], None]) -> list[RunPlan]:
    """Every plan at the settings its own search chose; each search's record goes into the manifest."""
    tuned = []
    for plan in plans:
        chosen, record = tuning.search(plan.name, plan.cfg, tune, out, overwrite, say)
        manifest.data["tuning"][plan.name] = record
        manifest.save()
        tuned.append(RunPlan(plan.name, chosen, plan.model))
    return tuned


def check_equal_time(equal_time) -> None:
    if equal_time is None or equal_time == "auto":
        return
    if isinstance(equal_time, bool) or not isinstance(equal_time, (int, float)) or not equal_time > 0:
        raise UserError(f"--equal-time takes a positive number of seconds (or nothing: the slowest model's "
                        f"time), got {equal_time!r}")


def budget(cfg: TrainConfig) -> str:
    if cfg.train_seconds is None:
        return f"{cfg.max_iters:,} steps"
    return f"{cfg.train_seconds:,.0f} s of training steps, at most {cfg.max_iters:,} steps"


def train_all(manifest: runs.Manifest, plans: list[RunPlan], overwrite: bool, say: Callable[[str], None]) -> None:
    """Inspect every run first (so a directory of other settings is refused before any training), then train."""
    statuses = [runs.inspect_run(plan, overwrite) for plan in plans]
    for i, (plan, status) in enumerate(zip(plans, statuses), 1):
        say(f"bdh compare: [{i}/{len(plans)}] {plan.name} ({plan.model.num_params():,} parameters, "
            f"lr {plan.cfg.lr:g}, {budget(plan.cfg)}): {describe(status)} -> {plan.run_dir}")
        report = runs.train_run(plan, status) if status.kind != "finished" else None
        runs.record_run(manifest, plan.name, plan.run_dir, report, lr=plan.cfg.lr,
                        warmup_iters=plan.cfg.warmup_iters, weight_decay=plan.cfg.weight_decay)


def equal_time_plans(plans: list[RunPlan], done: dict[str, Any], equal_time,
                     out: Path) -> tuple[float, list[RunPlan]]:
    """(seconds of training steps, each model's run of that time).

    Each run is a time budget (TrainConfig.train_seconds): it trains until its training steps have
    taken the seconds, its learning rate decaying on that clock, so a model whose steps get faster
    as it trains (BDH, as y goes sparse) gets every step its time allows. Its warm-up keeps the
    equal-token run's steps; its step cap is TIME_CAP x the steps its equal-token rate fits.
    """
    rates = {p.name: done[p.name]["tokens_per_s"] for p in plans}
    if not all(rates.values()):
        raise UserError("equal time needs the throughput of every equal-token run; a run logged none")
    if equal_time == "auto":
        target = max(done[p.name]["tokens_seen"] / rates[p.name] for p in plans)
    else:
        target = float(equal_time)
    timed = []
    for plan in plans:
        cfg = plan.cfg
        per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
        expected = max(1, round(target * rates[plan.name] / per_step))
        time_cfg = dataclasses.replace(cfg, train_seconds=target, max_iters=TIME_CAP * expected, decay_iters=None,
                                       warmup_iters=min(cfg.warmup_iters, expected - 1),
                                       out=str(out / (plan.name + TIME_SUFFIX)))
        timed.append(RunPlan(plan.name + TIME_SUFFIX, time_cfg, plan.model))
    return target, timed


TIME_CAP = 4  # an equal-time run's step cap, in multiples of the steps its equal-token rate fits in the time


def paired(out: Path, data: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Every model's final loss minus BDH's on the same validation batches, at equal tokens and equal time."""
    result: dict[str, Any] = {}
    if REFERENCE not in names:
        return result
    for budget, mapping in (("tokens", {n: n for n in names}), ("time", data.get("equal_time_runs") or {})):
        if REFERENCE not in mapping:
            continue
        ref = out / data["runs"][mapping[REFERENCE]]["run_dir"]
        for name in names:
            if name != REFERENCE and name in mapping:
                diff = runs.paired_difference(ref, out / data["runs"][mapping[name]]["run_dir"])
                if diff is not None:
                    result.setdefault(budget, {})[name] = diff
    return result


def describe(status: runs.RunStatus) -> str:
    return {"new": "training", "restart": "training from the start",
            "resume": f"resuming at step {status.step}",
            "finished": f"reusing the finished run ({status.step} steps)"}[status.kind]


def model_shape(run: dict[str, Any]) -> str:
    m = run["model"]
    if run["model_type"] == "bdh":
        n = m["mlp_internal_dim_multiplier"] * m["n_embd"]
        return (f"BDH: n_layer={m['n_layer']}, n_embd={m['n_embd']}, n_head={m['n_head']}, "
                f"neurons n={n:,} (multiplier {m['mlp_internal_dim_multiplier']})")
    if run["model_type"] == "gpt":
        ties = "tied" if m["tie_embeddings"] else "untied"
        return (f"GPT: n_layer={m['n_layer']}, n_embd={m['n_embd']}, n_head={m['n_head']}, {m['pos_encoding']} "
                f"positions ({m['block_size']}), {ties} embeddings")
    shown = ", ".join(f"{k}={v}" for k, v in m.items() if k != "model_type" and isinstance(v, (int, float, str))
                      and not isinstance(v, bool))
    return f"{run['model_type'].upper()}: {shown}"


# rows of the tables: label, key, format
ROWS = (
    ("parameters", "params", ",.0f"),
    ("parameters without embeddings", "params_without_embeddings", ",.0f"),
    ("learning rate (chosen by the search)", "lr", "g"),
    ("steps", "steps", ",.0f"),
    ("tokens seen", "tokens_seen", ",.0f"),
    ("final validation loss (nats/token)", "final_val_loss", ".4f"),
    ("standard error over validation batches", "final_val_se", ".4f"),
    ("validation batches scored", "final_val_batches", ",.0f"),
    ("final validation bits/byte", "final_val_bpb", ".4f"),
    ("best validation loss (nats/token; fewer batches)", "best_val_loss", ".4f"),
    ("training throughput (tokens/s)", "tokens_per_s", ",.0f"),
    ("training-step time (s, validation left out)", "step_time_s", ",.1f"),
    ("peak memory (RSS, MiB)", "peak_rss_mib", ",.0f"),
    ("peak CUDA memory (MiB)", "peak_cuda_mib", ",.0f"),
    ("training wall time (s, validation included)", "train_time_s", ",.1f"),
    ("stopped by", "stopped", "s"),
)


def table(runs_: list[dict[str, Any]], names: list[str]) -> list[str]:
    lines = ["| | " + " | ".join(n.upper() for n in names) + " |", "|---|" + "---:|" * len(names)]
    for label, key, spec in ROWS:
        values = [r.get(key) for r in runs_]
        if key == "peak_cuda_mib" and all(v is None for v in values):
            continue
        lines.append(f"| {label} | " + " | ".join(fmt(v, spec) for v in values) + " |")
    return lines


def render(data: dict[str, Any]) -> str:
    """compare.md: what was run, where, the search, the two tables, the figures, the raw metrics."""
    s, names = data["settings"], data["models"]
    rs = [data["runs"][n] for n in names]
    lines = [
        f"# {' vs '.join(n.upper() for n in names)} ({s['preset']} preset)",
        "",
        *runs.provenance(data, "bdh compare"),
        "",
        "Every model was trained alike, on the same batches: " + runs.describe_training(s)
        + " The learning rate (and any other searched setting) is each model's own, chosen as below.",
        "",
    ]
    for n, r in zip(names, rs):
        diff = data["parameter_difference"].get(n)
        rel = f"; {diff:+.1%} parameters relative to BDH" if diff and n != REFERENCE else ""
        lines.append(f"- {model_shape(r)} ({how_sized(n)}){rel}")
    t = data.get("tune") or {}
    lines += ["", "## Settings: a search on a slice held out from the training split", ""]
    if t.get("grid"):
        lines.append(f"Grid {', '.join(f'{k} in {v}' for k, v in t['grid'].items())}; each trial is the run scaled "
                     f"to {t['share']:g} of its budget (steps, warm-up, decay), trained on the training split minus "
                     f"its last {t['holdout']:g} and scored on that {t['holdout']:g} "
                     f"({'all of it' if not t['eval_iters'] else str(t['eval_iters']) + ' batches'}); the validation "
                     "split is never used to choose.")
        lines.append("")
    lines += search_lines(data, names, names)
    lines += ["", "## Equal tokens", "", *table(rs, names), ""]
    lines += paired_lines(data, "tokens")
    if data.get("equal_time_runs"):
        timed_names = [data["equal_time_runs"][n] for n in names]
        timed = [data["runs"][n] for n in timed_names]
        searched = data.get("equal_time_search")
        settings = ("the settings a search of its own at this budget chose (below)" if searched
                    else "the settings of its equal-token run")
        lines += ["## Equal wall-clock", "",
                  f"Each model trained, at {settings}, for {data.get('equal_time_target_s', 0):,.0f} s of "
                  "training steps (validation and checkpoints not counted), its learning rate decaying on that "
                  "clock: it takes the steps its speed allows. The machine's load during the runs changes "
                  "their speed: compare the throughput rows, and read a near tie as a tie.", ""]
        if searched:
            lines += [*search_lines(data, timed_names, names), ""]
        lines += [*table(timed, names), ""]
        lines += paired_lines(data, "time")
    lines += [
        "Bits per byte: validation loss in bits, per byte of validation text (comparable across tokenizers). "
        "The standard error treats validation batches as independent; neighbouring windows of a play are "
        "correlated, so it understates the uncertainty somewhat. Throughput leaves validation and checkpoint time "
        "out; peak memory is the peak resident set size of each run's training process.",
        "",
        f"![validation loss against tokens seen]({FIG_TOKENS})",
        "",
        f"![validation loss against wall-clock time]({FIG_TIME})",
        "",
        "Raw metrics: " + ", ".join(f"`{r['metrics']}`" for r in rs) + f" (one JSON record per logged step); all "
        f"numbers above are in `{MANIFEST}`. The run directories work with `bdh eval/generate/info --ckpt`.",
        "",
    ]
    return "\n".join(lines)


def search_lines(data: dict[str, Any], run_names: list[str], labels: list[str]) -> list[str]:
    """One line per run on its search (labelled by its model), and the search's total cost."""
    lines, total_time, total_tokens = [], 0.0, 0
    for run_name, label in zip(run_names, labels):
        record = data["tuning"].get(run_name)
        lines.append(f"- {label.upper()}: {tuning.describe(record, data['runs'][run_name].get('lr'))}")
        if record:
            total_time += record["cost"]["time_s"]
            total_tokens += record["cost"]["tokens"]
    if total_time:
        lines.append(f"- search cost, all models: {total_time:,.0f} s of training and {total_tokens:,} tokens")
    return lines


def paired_lines(data: dict[str, Any], budget: str) -> list[str]:
    diffs = (data.get("paired") or {}).get(budget) or {}
    if not diffs:
        return []
    lines = ["Paired differences on the same validation batches (final loss minus BDH's, nats/token):", ""]
    for name, d in diffs.items():
        se = f" ± {d['se']:.4f}" if d["se"] is not None else ""
        lines.append(f"- {name.upper()} − BDH: {d['mean']:+.4f}{se} (standard error over {d['batches']} batches)")
    return lines + [""]
