"""`bdh compare`: BDH against the GPT-2 baseline with the same parameter count, trained alike.

Both runs share one TrainConfig (data, tokenizer, batch and block size, optimizer, schedule, seed,
step or time budget); only the model differs. The GPT is the GPT-2-shaped config within 5% of
the BDH's parameters (bdh.baselines.match_gpt_config), with learned positions for exactly the
training block size. Outputs in DIR: bdh/ and gpt/ (run directories), compare.md, compare.json,
val_loss_vs_tokens.png and val_loss_vs_time.png.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from bdh.baselines import GPTConfig, match_gpt_config
from bdh.errors import UserError
from bdh.fileio import atomic_write_bytes
from bdh.experiments import plots, runs
from bdh.experiments.runs import RunPlan, fmt
from bdh.train.args import TrainConfig

MANIFEST = "compare.json"
REPORT = "compare.md"
FIG_TOKENS = "val_loss_vs_tokens.png"
FIG_TIME = "val_loss_vs_time.png"


def gpt_train_config(cfg: TrainConfig, bdh_model, gpt_fixed: dict[str, Any], out: Path) -> TrainConfig:
    """The GPT run of a comparison: cfg with the matched GPT as its model."""
    fixed = {"block_size": cfg.block_size, "compute_dtype": bdh_model.compute_dtype, **gpt_fixed}
    gpt = match_gpt_config(bdh_model, **fixed)
    # every field is given, so the preset only names the run
    preset = cfg.preset if cfg.preset in GPTConfig.presets else "small"
    return dataclasses.replace(cfg, model_type="gpt", preset=preset, model_overrides=gpt.to_dict(), out=str(out))


def plan_compare(cfg: TrainConfig, out: Path, gpt_fixed: dict[str, Any] | None = None) -> list[RunPlan]:
    """The two runs, after every check that can be made before training (nothing is written)."""
    gpt_fixed = dict(gpt_fixed or {})
    if cfg.model_type != "bdh":
        raise UserError("compare trains both models: leave model_type out of the options")
    runs.check_experiment_dir(out, MANIFEST, cfg.data)
    runs.check_plotting()
    if cfg.stream and (gpt_fixed.get("pos_encoding") != "alibi" or not gpt_fixed.get("kv_cache_size")):
        raise UserError("stream mode needs a GPT with a carried, bounded cache: add --gpt-arg pos_encoding=alibi "
                        "--gpt-arg kv_cache_size=K (K > 0)")
    vocab_size = runs.preflight_data(cfg)
    bdh_cfg = dataclasses.replace(cfg, out=str(out / "bdh"))
    bdh_model = runs.check_model(bdh_cfg, vocab_size)
    gpt_cfg = gpt_train_config(cfg, bdh_model, gpt_fixed, out / "gpt")
    gpt_model = runs.check_model(gpt_cfg, vocab_size)
    return [RunPlan("bdh", bdh_cfg, bdh_model), RunPlan("gpt", gpt_cfg, gpt_model)]


def compare(cfg: TrainConfig, out: str | Path, gpt_fixed: dict[str, Any] | None = None, overwrite: bool = False,
            command: str | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or reuse, or resume) both runs and write the comparison; returns compare.json's content."""
    out = Path(out)
    plans = plan_compare(cfg, out, gpt_fixed)
    statuses = [runs.inspect_run(plan, overwrite) for plan in plans]
    runs.claim_experiment_dir(out)
    manifest = runs.Manifest(out / MANIFEST)
    if overwrite:
        manifest.data = {"runs": {}}
    manifest.data.update(experiment="compare", command=command, started=runs.now(), machine=runs.machine(),
                         settings={**cfg.to_dict(), "out": str(out)}, gpt_fixed=dict(gpt_fixed or {}))
    for i, (plan, status) in enumerate(zip(plans, statuses), 1):
        say(f"bdh compare: [{i}/{len(plans)}] {plan.name} ({plan.model.num_params():,} parameters): "
            f"{describe(status)} -> {plan.run_dir}")
        report = runs.train_run(plan, status) if status.kind != "finished" else None
        runs.record_run(manifest, plan.name, plan.run_dir, report)
    data = manifest.data
    bdh, gpt = data["runs"]["bdh"], data["runs"]["gpt"]
    data.update(finished=runs.now(), parameter_difference=gpt["params"] / bdh["params"] - 1,
                report=REPORT, figures=[FIG_TOKENS, FIG_TIME])
    title = f"BDH vs GPT, {cfg.preset} preset, {fmt(bdh['params'])} vs {fmt(gpt['params'])} parameters"
    curves = {"bdh": bdh, "gpt": gpt}
    plots.plot_curves(curves, "tokens", out / FIG_TOKENS, title)
    plots.plot_curves(curves, "elapsed_s", out / FIG_TIME, title)
    atomic_write_bytes(out / REPORT, render(data).encode("utf-8"))
    manifest.save()
    say(f"bdh compare: wrote {out / REPORT}, {out / MANIFEST}, {out / FIG_TOKENS} and {out / FIG_TIME}; "
        f"the runs are {out / 'bdh'} and {out / 'gpt'} (e.g. bdh eval --ckpt {out / 'bdh'})")
    return data


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
    ties = "tied" if m["tie_embeddings"] else "untied"
    return (f"GPT: n_layer={m['n_layer']}, n_embd={m['n_embd']}, n_head={m['n_head']}, {m['pos_encoding']} "
            f"positions ({m['block_size']}), {ties} embeddings")


# rows of the table: label, key, format
ROWS = (
    ("parameters", "params", ",.0f"),
    ("parameters without embeddings", "params_without_embeddings", ",.0f"),
    ("steps", "steps", ",.0f"),
    ("tokens seen", "tokens_seen", ",.0f"),
    ("final validation loss (nats/token)", "final_val_loss", ".4f"),
    ("best validation loss (nats/token)", "best_val_loss", ".4f"),
    ("final validation bits/byte", "final_val_bpb", ".4f"),
    ("best validation bits/byte", "best_val_bpb", ".4f"),
    ("step of the best validation loss", "best_step", ",.0f"),
    ("training throughput (tokens/s)", "tokens_per_s", ",.0f"),
    ("peak memory (RSS, MiB)", "peak_rss_mib", ",.0f"),
    ("peak CUDA memory (MiB)", "peak_cuda_mib", ",.0f"),
    ("training wall time (s, validation included)", "train_time_s", ",.1f"),
    ("stopped by", "stopped", "s"),
)


def render(data: dict[str, Any]) -> str:
    """compare.md: what was run, where, the table, the figures, the raw metrics."""
    s, bdh, gpt = data["settings"], data["runs"]["bdh"], data["runs"]["gpt"]
    lines = [
        f"# BDH vs GPT at the same parameter count ({s['preset']} preset)",
        "",
        *runs.provenance(data, "bdh compare"),
        "",
        "Both models were trained alike, on the same batches: " + runs.describe_training(s),
        "",
        f"- {model_shape(bdh)}",
        f"- {model_shape(gpt)}; {data['parameter_difference']:+.1%} parameters relative to BDH",
        "",
        "| | BDH | GPT |",
        "|---|---:|---:|",
    ]
    for label, key, spec in ROWS:
        if bdh.get(key) is None and gpt.get(key) is None and key == "peak_cuda_mib":
            continue
        lines.append(f"| {label} | {fmt(bdh.get(key), spec)} | {fmt(gpt.get(key), spec)} |")
    lines += [
        "",
        "Bits per byte: validation loss in bits, per byte of validation text (comparable across tokenizers). "
        "Throughput leaves validation and checkpoint time out; peak memory is the peak resident set size of "
        "each run's training process (of the attempts measured to their end: a run resumed after a kill "
        "shows the resumed attempt's peak).",
        "",
        f"![validation loss against tokens seen]({FIG_TOKENS})",
        "",
        f"![validation loss against wall-clock time]({FIG_TIME})",
        "",
        f"Raw metrics: `{bdh['metrics']}` and `{gpt['metrics']}` (one JSON record per logged step); all numbers "
        f"above are in `{MANIFEST}`. The run directories work with `bdh eval/generate/info --ckpt`.",
        "",
    ]
    return "\n".join(lines)
