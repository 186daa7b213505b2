"""The merging experiment of the paper's Section 7.1 (its Table 2), end to end and resumable.

1. a base model trained on the base pairs (e.g. bible:en-es);
2. one copy of it fine-tuned on each of two other pairs (e.g. bible:en-fr, bible:en-de), --init-from the base;
3. the two fine-tuned copies merged by concatenating their neurons (bdh.merge), without further training;
4. every model scored on the held-out (test) pairs of every language pair: the loss on each
   direction's target tokens, and chrF of greedy translations.
Writes DIR/base, DIR/tune-<pair>/ (run directories), DIR/merged (a checkpoint), DIR/eval/*.json (one
evaluation per model and pair, reused when run again), merging.md, merging.json and merging.png.
Running the same command again reuses every finished step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from bdh.checkpoint import load_model
from bdh.data.parallel import directions_of, load_parallel
from bdh.errors import UserError
from bdh.experiments import runs
from bdh.fileio import atomic_write_bytes, read_json, write_json
from bdh.merge import merge_checkpoints
from bdh.precision import resolve_device
from bdh.rundir import load_checkpoint_tokenizer, resolve_checkpoint
from bdh.train.args import TrainConfig
from bdh.train.translation import evaluate_translation

REPORT, MANIFEST, FIGURE = "merging.md", "merging.json", "merging.png"


def slug(spec: str) -> str:
    return spec.removeprefix("bible:").replace("/", "_").replace("=", "_").replace(",", "_")


def plan_merging(cfg: TrainConfig, out: Path, tunes: list[str]) -> list[runs.RunPlan]:
    """The base run (cfg) and one fine-tuning run per pair in `tunes`, all with cfg's budget."""
    if cfg.task != "translate":
        cfg = dataclasses.replace(cfg, task="translate", stream=True)
    if len(tunes) != 2:
        raise UserError(f"--tunes needs two language pairs, e.g. bible:en-fr,bible:en-de; got {len(tunes)}")
    base = runs.RunPlan("base", dataclasses.replace(cfg, out=str(out / "base"), init_from=None))
    plans = [base]
    for spec in tunes:
        tuned = dataclasses.replace(cfg, data=spec, out=str(out / f"tune-{slug(spec)}"), init_from=str(out / "base"))
        plans.append(runs.RunPlan(f"tune-{slug(spec)}", tuned))
    return plans


def merging(cfg: TrainConfig, out: str | Path, tunes: list[str], pairs: int = 50, eval_batches: int | None = 20,
            overwrite: bool = False, command: str | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    out = Path(out)
    runs.check_experiment_dir(out, MANIFEST, cfg.data)
    runs.check_plotting()
    plans = plan_merging(cfg, out, tunes)
    datasets = [plans[0].cfg.data, *tunes]
    corpora = {spec: load_parallel(spec, val_fraction=cfg.val_fraction) for spec in datasets}
    runs.preflight_data(plans[0].cfg)
    runs.claim_experiment_dir(out)
    manifest = runs.Manifest(out / MANIFEST)
    manifest.data.update(experiment="merging", command=command, started=runs.now(), machine=runs.machine(),
                         settings={**cfg.to_dict(), "out": str(out)}, tunes=tunes, pairs=pairs,
                         eval_batches=eval_batches)
    for i, plan in enumerate(plans, 1):
        status = runs.inspect_run(plan, overwrite)
        say(f"bdh merging: [{i}/{len(plans) + 1}] {plan.name} on {plan.cfg.data}: {status.kind} -> {plan.run_dir}")
        report = runs.train_run(plan, status) if status.kind != "finished" else None
        runs.record_run(manifest, plan.name, plan.run_dir, report)
    merged = out / "merged"
    if overwrite or not merged.is_dir():
        say(f"bdh merging: [{len(plans) + 1}/{len(plans) + 1}] merging {plans[1].name} and {plans[2].name} -> {merged}")
        merge_checkpoints(plans[1].run_dir, plans[2].run_dir, merged, overwrite=True)
    models = {"base": plans[0].run_dir, plans[1].name: plans[1].run_dir, plans[2].name: plans[2].run_dir,
              "merged": merged}
    device = resolve_device(cfg.device)
    results: dict[str, dict[str, Any]] = {}
    for name, path in models.items():
        results[name] = {}
        for spec, corpus in corpora.items():
            file = out / "eval" / f"{name}__{slug(spec)}.json"
            if file.is_file() and not overwrite:
                results[name][spec] = read_json(file)
                continue
            say(f"bdh merging: evaluating {name} on {spec} (test pairs)")
            model = load_model(path, device=device)
            tokenizer = load_checkpoint_tokenizer(resolve_checkpoint(path), model.config.vocab_size)
            report = evaluate_translation(model, tokenizer, corpus, "test", cfg.batch_size, cfg.block_size,
                                          eval_batches, pairs, device)
            report["params"] = model.num_params()
            write_json(file, report)
            results[name][spec] = report
    directions = [d for spec in datasets for d in directions_of(corpora[spec].langs)]
    data = manifest.data
    data.update(finished=runs.now(), datasets=datasets, directions=directions, results=results,
                report=REPORT, figure=FIGURE)
    table = result_table(results, datasets, corpora)
    data["table"] = table
    plot_table(table, directions, out / FIGURE)
    atomic_write_bytes(out / REPORT, render(data, table, directions).encode("utf-8"))
    manifest.save()
    say(f"bdh merging: wrote {out / REPORT}, {out / MANIFEST} and {out / FIGURE}")
    return data


def result_table(results, datasets, corpora) -> dict[str, dict[str, dict[str, float]]]:
    """{model: {direction: {"loss", "chrf"}}} from the evaluations."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, by_spec in results.items():
        row = table.setdefault(name, {})
        for spec in datasets:
            for direction, entry in by_spec[spec]["directions"].items():
                row[direction] = {"loss": entry["target_loss"], "chrf": entry.get("chrf")}
    return table


def render(data: dict[str, Any], table, directions: list[str]) -> str:
    s = data["settings"]
    lines = [f"# Merging: {data['datasets'][0]} base, fine-tuned on {' and '.join(data['tunes'])}, then merged", "",
             *runs.provenance(data, "bdh merging"), "",
             f"Each run: {runs.describe_training(s)}", "",
             f"Scores on the held-out test pairs of each language pair: loss on the target tokens of each direction "
             f"(nats/token; the stream read with the state carried, at most {data['eval_batches']} windows per lane) "
             f"and chrF of greedy translations of the first {data['pairs']} pairs.", "",
             "| model | parameters | " + " | ".join(f"{d} loss" for d in directions) + " |",
             "|---|---|" + "---|" * len(directions)]
    first = data["datasets"][0]
    for name, row in table.items():
        params = data["results"][name][first].get("params")
        lines.append(f"| {name} | {runs.fmt(params)} | " + " | ".join(runs.fmt(row[d]["loss"], ".3f") for d in directions)
                     + " |")
    lines += ["", "| model | " + " | ".join(f"{d} chrF" for d in directions) + " |",
              "|---|" + "---|" * len(directions)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(runs.fmt(row[d]["chrf"], ".1f") for d in directions) + " |")
    lines += ["", f"![target loss per direction]({data['figure']})", ""]
    return "\n".join(lines)


def plot_table(table, directions: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.3))
    width = 0.8 / max(len(table), 1)
    for i, (name, row) in enumerate(table.items()):
        xs = [j + (i - (len(table) - 1) / 2) * width for j in range(len(directions))]
        losses = [row[d]["loss"] if row[d]["loss"] is not None else float("nan") for d in directions]
        ax.bar(xs, losses, width, label=name)
    ax.set_xticks(range(len(directions)), directions)
    ax.set_ylabel("target loss (nats/token), test pairs")
    ax.set_title("Merging fine-tuned copies (paper Section 7.1, Table 2)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
