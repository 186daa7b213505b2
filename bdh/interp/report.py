"""The inspection report: every measure of the paper's Section 6 for one model and one text.

`build_report` computes the numbers (plain types only, NaN written as null), `write_report` writes
report.json, the figures (PNG) and report.html, one self-contained page that refers to the PNGs
beside it. `inspect` does both from a checkpoint directory and a text file.

Keys of report.json (schema "bdh.inspect/1"):
  model      config fields, n_neurons, num_params
  text       path, n_tokens, truncated, chunk_len
  sparsity   x_nonzero[l][h], y_nonzero[l][h], *_layer[l], *_mean, *_by_token[l][t],
             training (step, x_nonzero, y_nonzero from the run's metrics.jsonl, or null)
  synapses   definition, summary per synapse layer, top (strongest), degrees (of the strongest
             8 n synapses of the last layer, with power-law fits), traces (values per token,
             driving tokens), file (sigma in safetensors)
  concepts   concept/control names, n_*, n_synapses, n_candidates, top (U, p, p_bonferroni,
             rank_biserial, per-sentence values, driving words), transfer (same test on a
             second-language pair) - or null when skipped
  graph      stats of G, sweep (beta, edges, modularity, baselines), degrees, head_blocks
  figures    name -> {"file", "caption"}
  timing_s   seconds per stage
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from bdh.checkpoint import load_model
from bdh.data import read_text_file
from bdh.errors import UserError
from bdh.fileio import check_output_dir, output_directory
from bdh.interp import figures as figs
from bdh.interp.capture import run_accumulators, unwrap
from bdh.interp.concepts import concept_synapses, contrast_set, evaluate_synapses, read_sentences
from bdh.interp.graph import analyse_neuron_graph, degree_summary
from bdh.interp.html import render_html
from bdh.interp.sparsity import SparsityAccumulator, sparsity_history
from bdh.interp.synapses import (
    MAX_SYNAPSE_ENTRIES, SynapseAccumulator, TraceAccumulator, model_decay, save_synapses, synapse_degrees, synapse_dict,
    synapse_summary, top_synapses,
)
from bdh.interp.tokens import describe_token
from bdh.precision import resolve_device
from bdh.rundir import find_metrics, load_checkpoint_tokenizer, resolve_checkpoint

SCHEMA = "bdh.inspect/1"
SYNAPSE_DEFINITION = ("sigma_l[h][i, j] = sum over tokens tau of lambda_h^(t - tau) y_{tau, l-1}[h, i] x_{tau, l}[h, j]: "
                      "y of layer l-1 (pre-synaptic, row i) with x of layer l (post-synaptic, column j), within "
                      "each head, activations taken before RoPE (so sigma >= 0), lambda_h the model's decay (1 if none)")
#: shipped contrast sets used when the caller gives none: (concept, control), and a second-language pair
DEFAULT_CONTRAST = ("money_en", "weather_en")
DEFAULT_TRANSFER = ("money_es", "weather_es")


def plain(obj, digits: int | None = None):
    """Numbers, strings, lists and dicts only; NaN and infinities become None.

    digits: round floats to that many significant digits (report.json uses 7).
    """
    if isinstance(obj, dict):
        return {str(k): plain(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, digits) for v in obj]
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return plain(obj.tolist(), digits)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        if not math.isfinite(value):
            return None
        return float(f"{value:.{digits}g}") if digits else value
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


class _Timer:
    def __init__(self, log: Callable[[str], None] | None):
        self.log, self.times, self.start = log, {}, time.perf_counter()

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.times[stage] = round(now - self.start, 3)
        if self.log:
            self.log(f"{stage}: {now - self.start:.1f} s")
        self.start = now


def build_report(model: nn.Module, tokenizer, ids: Sequence[int], *, text_path: str | None = None,
                 truncated: bool = False, layers: Sequence[int] | None = None, chunk_len: int = 256,
                 top_k: int = 20, trace: Sequence[Sequence[int]] | None = None, n_trace: int = 4,
                 concept: Sequence[str] | None = None, control: Sequence[str] | None = None,
                 contrast_names: tuple[str, str] = DEFAULT_CONTRAST,
                 transfer: tuple[Sequence[str], Sequence[str]] | None = None,
                 transfer_names: tuple[str, str] = DEFAULT_TRANSFER, concepts: bool = True,
                 candidates: int = 4096, normalize: str = "mean", graph: bool = True,
                 betas: Sequence[float] | None = None, n_betas: int = 7, max_edges: int = 100_000, seeds: int = 5,
                 save_entries: int = 1 << 18, max_synapses: int = MAX_SYNAPSE_ENTRIES, metrics: str | Path | None = None,
                 out_dir: Path | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Compute every section. concept/control None with concepts=True uses the shipped sets
    (money vs weather, English) and tests their top synapses on the Spanish pair as well.
    With out_dir, sigma is saved there (dense per layer up to 2^20 entries, else the
    `save_entries` strongest of each layer; 0 saves nothing). metrics: a metrics.jsonl whose
    sparsity_probe records become sparsity.training."""
    model = unwrap(model)
    c = model.config
    N = c.neurons_per_head
    check_synapses(model, trace or [])
    timer = _Timer(log)
    report: dict = {"schema": SCHEMA}
    report["model"] = {**c.to_dict(), "n_neurons": c.n_neurons, "neurons_per_head": N,
                       "num_params": model.num_params()}
    report["text"] = {"path": text_path, "n_tokens": len(ids), "truncated": truncated, "chunk_len": chunk_len}

    # one streamed pass: sparsity and sigma
    sparse_acc = SparsityAccumulator(c.n_layer, c.n_head)
    syn_acc = SynapseAccumulator(c.n_layer, c.n_head, N, layers, model_decay(model), max_synapses)
    run_accumulators(model, ids, [sparse_acc, syn_acc], chunk_len)
    report["sparsity"] = sparse_acc.result()
    report["sparsity"]["training"] = sparsity_history(metrics) if metrics else None
    sigma = syn_acc.result()
    last = max(sigma)
    out_deg, in_deg, threshold = synapse_degrees(sigma[last], 8 * c.n_neurons)
    report["synapses"] = {
        "definition": SYNAPSE_DEFINITION, "layers": sorted(sigma),
        "summary": synapse_summary(sigma, len(ids)), "top": top_synapses(sigma, top_k),
        "degrees": {"layer": last, "edges": int(out_deg.sum()), "threshold": threshold,
                    "out": degree_summary(out_deg), "in": degree_summary(in_deg)},
    }
    if out_dir is not None and save_entries > 0:
        save_synapses(Path(out_dir) / "synapses.safetensors", sigma, max_entries=save_entries)
        report["synapses"]["file"] = "synapses.safetensors"
    del sigma, syn_acc
    timer.done("activations, sparsity and synapses")

    report["concepts"] = None
    if concepts:
        report["concepts"] = _concepts(model, tokenizer, layers, top_k, candidates, normalize, concept, control,
                                       contrast_names, transfer, transfer_names, max_synapses)
        timer.done("concept synapses")

    report["synapses"]["traces"] = _traces(model, tokenizer, ids, report, trace, n_trace, chunk_len)
    timer.done("synapse traces")

    report["graph"] = None
    if graph:
        report["graph"] = analyse_neuron_graph(model, betas=betas, n_betas=n_betas, max_edges=max_edges, seeds=seeds)
        timer.done("neuron graph")
    report["timing_s"] = timer.times
    return plain(report)


def check_synapses(model: nn.Module, synapses: Sequence[Sequence[int]]) -> None:
    """UserError naming the first (layer, head, i, j) that does not exist in this model."""
    c = model.config
    N = c.neurons_per_head
    for l, h, i, j in synapses:
        if not (1 <= l < c.n_layer and 0 <= h < c.n_head and 0 <= i < N and 0 <= j < N):
            raise UserError(f"no synapse {l}:{h}:{i}:{j}: layer 1..{c.n_layer - 1}, head 0..{c.n_head - 1}, "
                            f"neurons 0..{N - 1}")


def _concepts(model, tokenizer, layers, top_k, candidates, normalize, concept, control, names, transfer,
              transfer_names, max_synapses) -> dict:
    shipped = concept is None and control is None
    if shipped:
        concept, control = contrast_set(names[0]), contrast_set(names[1])
        if transfer is None:
            transfer = (contrast_set(transfer_names[0]), contrast_set(transfer_names[1]))
    result = concept_synapses(model, tokenizer, concept, control, layers=layers, top_k=top_k,
                              candidates=candidates, normalize=normalize, max_entries=max_synapses)
    result.update(concept_name=names[0], control_name=names[1], shipped_sets=shipped, transfer=None)
    if transfer is not None and result["top"]:
        synapses = [(d["layer"], d["head"], d["i"], d["j"]) for d in result["top"]]
        for d, t in zip(result["top"], evaluate_synapses(model, tokenizer, synapses, *transfer, normalize=normalize)):
            d["transfer"] = t
        result["transfer"] = {"concept_name": transfer_names[0], "control_name": transfer_names[1],
                              "n_concept": len(transfer[0]), "n_control": len(transfer[1])}
    return result


def _traces(model, tokenizer, ids, report, trace, n_trace, chunk_len) -> list[dict]:
    """Trace chosen synapses, or the strongest ones and the top concept ones, over the text."""
    N = model.config.neurons_per_head
    chosen: list[tuple[tuple[int, int, int, int], str]] = []
    if trace:
        chosen = [(tuple(int(v) for v in s), "chosen") for s in trace]
    else:
        chosen += [((d["layer"], d["head"], d["i"], d["j"]), "strongest") for d in report["synapses"]["top"][:n_trace]]
        if report.get("concepts"):
            chosen += [((d["layer"], d["head"], d["i"], d["j"]), "concept") for d in report["concepts"]["top"][:n_trace]]
    seen, unique = set(), []
    for s, why in chosen:
        if s not in seen:
            seen.add(s)
            unique.append((s, why))
    if not unique:
        return []
    acc = TraceAccumulator([s for s, _ in unique], model_decay(model))
    run_accumulators(model, ids, [acc], chunk_len)
    result = acc.result()
    out = []
    for k, (s, why) in enumerate(unique):
        inc = result["increments"][k]
        positions = [int(t) for t in np.argsort(-inc)[:5] if inc[t] > 0]
        out.append({"synapse": synapse_dict(*s, N), "why": why, "values": result["values"][k],
                    "final": float(result["values"][k][-1]) if len(ids) else 0.0,
                    "driving_tokens": [{**describe_token(tokenizer, ids, t), "increment": float(inc[t])}
                                       for t in positions]})
    return out


# writing ------------------------------------------------------------------------------------
def make_figures(report: dict, out_dir: Path) -> dict:
    """Draw every figure the report has data for: name -> {"file", "caption"}."""
    out_dir = Path(out_dir)
    jobs = [
        ("sparsity", lambda p: figs.plot_sparsity(report["sparsity"], p)),
        ("density", lambda p: figs.plot_density_over_text(report["sparsity"], p)),
        ("training", lambda p: figs.plot_sparsity_history(report["sparsity"].get("training"), p)),
        ("traces", lambda p: figs.plot_traces(report["synapses"].get("traces", []), p)),
        ("synapse_degrees", lambda p: figs.plot_degrees(
            report["synapses"]["degrees"], p, f"Degrees of the synapse graph (layer {report['synapses']['degrees']['layer']})",
            f"the {report['synapses']['degrees']['edges']:,} strongest synapses of sigma")),
    ]
    if report.get("concepts"):
        jobs.append(("concepts", lambda p: figs.plot_concepts(report["concepts"], p)))
    if report.get("graph"):
        g = report["graph"]
        jobs += [
            ("modularity", lambda p: figs.plot_modularity(g["sweep"], p)),
            ("edges", lambda p: figs.plot_edges(g["sweep"], p)),
            ("graph_degrees", lambda p: figs.plot_degrees(
                g["degrees"], p, "Degrees of the neuron graph G = E D_x",
                f"the neuron graph at beta = {g['degrees']['beta']:.3g} ({g['degrees']['edges_directed']:,} directed edges)")),
            ("heads", lambda p: figs.plot_head_blocks(g["head_blocks"], p)),
        ]
    made = {}
    for name, draw in jobs:
        path = out_dir / f"fig_{name}.png"
        caption = draw(path)
        if caption:
            made[name] = {"file": path.name, "caption": caption}
    return made


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """report.json, the figures and report.html into out_dir (created if needed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report["figures"] = make_figures(report, out_dir)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    json_path.write_text(json.dumps(plain(report, digits=7), indent=1, allow_nan=False) + "\n")
    html_path.write_text(render_html(report), encoding="utf-8")
    return {"json": json_path, "html": html_path}


def inspect(ckpt: str | Path, text_path: str | Path, out_dir: str | Path, max_tokens: int = 8192,
            device: str = "auto", metrics: str | Path | None = None, concept_file: str | Path | None = None,
            control_file: str | Path | None = None, log: Callable[[str], None] | None = None, overwrite: bool = False,
            **options) -> dict:
    """`bdh inspect`: load a checkpoint and its tokenizer, read a text, build and write the report.

    out_dir must be new, empty, or (with overwrite) an earlier report of bdh's; it is built beside
    and moved into place, so files bdh did not write are never replaced.

    metrics: the run's metrics.jsonl (default: found beside the checkpoint); concept_file and
    control_file: own contrast sets, one sentence per line (default: the shipped money/weather
    sets); options: the keyword arguments of build_report. Returns the report.
    """
    for name in ("chunk_len", "top_k", "candidates", "n_betas", "max_edges", "seeds", "max_synapses"):
        if name in options and options[name] < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite, "--overwrite")  # before any work: a refused --out costs nothing
    concept, control, names = _sentences(concept_file, control_file)
    ckpt = resolve_checkpoint(ckpt)  # once: a fallback from a damaged newest checkpoint is said once
    model, tokenizer = load_model_and_tokenizer(ckpt, device)
    ids, truncated = load_text(tokenizer, text_path, max_tokens)
    if metrics is None:
        metrics = find_metrics(ckpt)
    elif not Path(metrics).is_file():
        raise UserError(f"no such metrics file: {metrics}")
    if log:
        log(f"{len(ids):,} tokens{' (truncated)' if truncated else ''}, n = {model.config.n_neurons:,} neurons")
    # built in a temporary sibling, moved into place whole (bdh.fileio.output_directory)
    with output_directory(out_dir, kind="inspect", replace=overwrite, flag="--overwrite") as tmp:
        report = build_report(model, tokenizer, ids, text_path=str(text_path), truncated=truncated, concept=concept,
                              control=control, contrast_names=names or DEFAULT_CONTRAST, metrics=metrics,
                              out_dir=tmp, log=log, **options)
        report["model"]["checkpoint"] = str(ckpt)
        write_report(report, tmp)
    return report


def load_model_and_tokenizer(ckpt, device="auto"):
    """The model in eval mode on device and the tokenizer saved with it (bytes if none and V = 256)."""
    model = load_model(ckpt, device=resolve_device(device))
    if not {"x", "y"} <= set(model.activation_sites):
        raise UserError(f"{ckpt} holds a {model.model_type} model, whose activations cannot be captured: "
                        "inspect reads BDH only")
    return model, load_checkpoint_tokenizer(ckpt, model.config.vocab_size)


def load_text(tokenizer, path, max_tokens: int) -> tuple[list[int], bool]:
    """Token ids of a text file, cut to max_tokens; (ids, whether it was cut)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no such text file: {path}")
    text = read_text_file(path)  # refuses binary and non-UTF-8 files
    ids = list(tokenizer.encode(text))
    if not ids:
        raise UserError(f"{path} is empty: give a text to read")
    if max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    return ids[:max_tokens], len(ids) > max_tokens


def _sentences(concept, control):
    if (concept is None) != (control is None):
        raise UserError("give --concept and --control together (or neither, for the shipped money/weather sets)")
    if concept is None:
        return None, None, None
    names = (Path(concept).stem, Path(control).stem)
    return read_sentences(concept), read_sentences(control), names


def stderr_log(message: str) -> None:
    print(f"[inspect] {message}", file=sys.stderr, flush=True)
