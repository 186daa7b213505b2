"""`bdh inspect`: write report.json and report.html for a checkpoint and a text.

bdh.cli wires `add_inspect_arguments` and `run_inspect` in as a subcommand; `main(argv)` runs the
same thing on its own (python -m bdh.interp.cli).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bdh.errors import UserError
from bdh.interp.synapses import MAX_SYNAPSE_ENTRIES

DEFAULT_MAX_TOKENS = 8192


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _synapse_list(text: str) -> list[tuple[int, int, int, int]]:
    out = []
    for item in text.replace(",", " ").split():
        parts = item.split(":")
        if len(parts) != 4 or not all(p.lstrip("-").isdigit() for p in parts):
            raise argparse.ArgumentTypeError(f"synapse {item!r}: write LAYER:HEAD:I:J, e.g. 1:0:17:101")
        out.append(tuple(int(p) for p in parts))
    return out


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `bdh inspect`."""
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (or run directory with 'latest')")
    parser.add_argument("--text", required=True, help="UTF-8 text file to read")
    parser.add_argument("--out", required=True, help="directory for report.json, report.html and figures")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help=f"read at most this many tokens of the text (default {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--chunk-len", type=int, default=256,
                        help="tokens per streamed chunk; memory only, results do not change (default 256)")
    parser.add_argument("--layers", type=_int_list, default=None,
                        help="synapse layers to analyse, e.g. 1,3 (layer l pairs y of l-1 with x of l; default all)")
    parser.add_argument("--top-k", type=int, default=20, help="strongest and concept synapses to list (default 20)")
    parser.add_argument("--trace", type=_synapse_list, default=None, metavar="L:H:I:J,...",
                        help="synapses to trace over the text (default: the 4 strongest and the 4 top concept ones)")
    parser.add_argument("--synapse-entries", type=int, default=1 << 18,
                        help="strongest synapses per layer saved to synapses.safetensors when a layer has more "
                             "than 2^20 (smaller layers are saved whole); 0 saves no file (default 262144)")
    parser.add_argument("--max-synapses", type=int, default=MAX_SYNAPSE_ENTRIES,
                        help="most synapse entries held at once, 4 bytes each: layers x heads x N^2 for sigma, "
                             f"four times that for the concept search (default {MAX_SYNAPSE_ENTRIES:,})")
    concept = parser.add_argument_group("concept synapses")
    concept.add_argument("--concept", default=None, help="file of concept sentences, one per line")
    concept.add_argument("--control", default=None, help="file of control sentences, one per line")
    concept.add_argument("--no-concepts", action="store_true", help="skip the concept analysis")
    concept.add_argument("--candidates", type=int, default=4096,
                         help="synapses tested exactly after the t-score pre-selection (default 4096)")
    concept.add_argument("--normalize", choices=("mean", "sum"), default="mean",
                         help="a sentence's synapse value: sigma / tokens (mean, default) or raw sigma (sum)")
    graph = parser.add_argument_group("neuron graph")
    graph.add_argument("--betas", type=_float_list, default=None,
                       help="thresholds for G = E D_x, e.g. 0.5,1,1.5 (default: chosen by edge count)")
    graph.add_argument("--n-betas", type=int, default=7, help="automatic thresholds in the sweep (default 7)")
    graph.add_argument("--max-edges", type=int, default=100_000,
                       help="largest directed edge count given a modularity (default 100000)")
    graph.add_argument("--seeds", type=int, default=5, help="Louvain runs per graph, best kept (default 5)")
    graph.add_argument("--no-graph", action="store_true", help="skip the neuron graph analysis")
    parser.add_argument("--metrics", default=None,
                        help="metrics.jsonl with sparsity logged during training (default: the checkpoint's run)")
    parser.add_argument("--device", default="cpu", help="torch device for the forward passes (default cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def load_model_and_tokenizer(ckpt):
    """The model in eval mode and the tokenizer saved with it (bytes if none and V = 256)."""
    from bdh.checkpoint import load_model, resolve_checkpoint
    from bdh.data import load_tokenizer, make_tokenizer

    model = load_model(ckpt)
    if not hasattr(model, "hook_x"):
        raise UserError(f"{ckpt} holds a {type(model).__name__}, not a BDH model: inspect reads BDH only")
    directory = resolve_checkpoint(ckpt)
    for place in (directory, Path(ckpt), directory.parent):
        if (place / "tokenizer.json").is_file():
            return model, load_tokenizer(place)
    if model.config.vocab_size == 256:
        return model, make_tokenizer("bytes")
    raise UserError(f"no tokenizer.json next to {directory}; the model has vocabulary {model.config.vocab_size}, "
                    "so it cannot be the byte tokenizer: save the tokenizer into the checkpoint directory")


def load_text(tokenizer, path, max_tokens: int) -> tuple[list[int], bool]:
    """Token ids of a text file, cut to max_tokens; (ids, whether it was cut)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise UserError(f"no such text file: {path}") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    ids = list(tokenizer.encode(text))
    if not ids:
        raise UserError(f"{path} is empty: give a text to read")
    if max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    return ids[:max_tokens], len(ids) > max_tokens


def _sentences(concept, control):
    from bdh.interp.concepts import read_sentences

    if (concept is None) != (control is None):
        raise UserError("give --concept and --control together (or neither, for the shipped money/weather sets)")
    if concept is None:
        return None, None, None
    names = (Path(concept).stem, Path(control).stem)
    return read_sentences(concept), read_sentences(control), names


def run_inspect(args) -> int:
    """Build and write the report; prints where it went. Raises UserError on bad input."""
    import torch

    from bdh.interp.report import DEFAULT_CONTRAST, build_report, stderr_log, write_report
    from bdh.interp.sparsity import find_metrics

    for name in ("chunk_len", "top_k", "candidates", "n_betas", "max_edges", "seeds", "max_synapses"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    log = None if args.quiet else stderr_log
    concept, control, names = _sentences(args.concept, args.control)
    model, tokenizer = load_model_and_tokenizer(args.ckpt)
    try:
        model = model.to(torch.device(args.device))
    except (RuntimeError, AssertionError) as err:
        raise UserError(f"cannot use device {args.device!r}: {str(err).splitlines()[0]}") from None
    ids, truncated = load_text(tokenizer, args.text, args.max_tokens)
    metrics = args.metrics or find_metrics(args.ckpt)
    if args.metrics and not Path(args.metrics).is_file():
        raise UserError(f"no such metrics file: {args.metrics}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if log:
        log(f"{len(ids):,} tokens{' (truncated)' if truncated else ''}, n = {model.config.n_neurons:,} neurons")
    report = build_report(
        model, tokenizer, ids, text_path=str(args.text), truncated=truncated, layers=args.layers,
        chunk_len=args.chunk_len, top_k=args.top_k, trace=args.trace, concept=concept, control=control,
        contrast_names=names or DEFAULT_CONTRAST, concepts=not args.no_concepts, candidates=args.candidates,
        normalize=args.normalize, graph=not args.no_graph, betas=args.betas, n_betas=args.n_betas,
        max_edges=args.max_edges, seeds=args.seeds, save_entries=args.synapse_entries, max_synapses=args.max_synapses, metrics=metrics, out_dir=out,
        log=log)
    report["model"]["checkpoint"] = str(args.ckpt)
    paths = write_report(report, out)
    print(f"wrote {paths['html']} and {paths['json']}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bdh inspect", description=__doc__.splitlines()[0])
    add_inspect_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_inspect(args)
    except UserError as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    raise SystemExit(main())
