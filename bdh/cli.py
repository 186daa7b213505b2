"""The `bdh` command: a table of subcommands, each a plain function of its parsed arguments.

    bdh train     train a model (BDH or the GPT baseline), resume a run, distributed with torchrun
    bdh generate  sample from a checkpoint, streaming the text as it comes
    bdh eval      loss, bits per byte and perplexity of a checkpoint on text
    bdh info      a checkpoint's config, parameter counts and training summary
    bdh compare   BDH against the GPT baseline of the same parameter count, trained alike
    bdh sweep     validation loss against parameter count at several sizes, with power-law fits
    bdh inspect   sparsity, synapses, concept synapses and the neuron graph: report.json + .html
    bdh bench     the speed and memory benchmarks of benchmarks/ (JSON out)

Every problem the user can fix ends as one line `bdh: error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

from bdh.errors import UserError
from bdh.precision import DEVICE_HELP, resolve_device

PROG = "bdh"


class CLIError(UserError):
    """A command-line mistake found by argparse."""


class ArgParser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so main() prints one line.

    Abbreviated options are not accepted: a misspelled one (--max-iter) is an error, not a guess.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise CLIError(f"{message} (see: {self.prog} --help)")


# --------------------------------------------------------------------------------------------
# bdh train

def add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML file of training options (TrainConfig field names; "
                        "a `model:` mapping overrides model-config fields); flags given here win")
    parser.add_argument("--resume", nargs="?", const="", metavar="DIR",
                        help="continue the run in DIR (a run directory or one of its checkpoints; "
                             "without DIR: the --out directory)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an --out directory that already holds a run")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="override one model-config field, e.g. --model-arg dropout=0.1 (repeatable)")
    add_train_fields(parser)


def add_train_fields(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field (but those in skip), its docstring as the help."""
    from bdh.train.args import TrainConfig, field_help, scalar_type, _types

    helps, hints = field_help(), _types()
    for f in dataclasses.fields(TrainConfig):
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        if flag is None or f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        text = helps.get(f.name, "")
        if "(default:" not in text:
            text += f" (default: {default!r})"
        text = text.replace("%", "%%")
        kind = scalar_type(hints[f.name])
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=text)
        else:
            choices = f.metadata.get("choices")
            metavar = None if choices else {int: "N", float: "X"}.get(kind, f.name.upper())
            parser.add_argument(flag, dest=f.name, type=_parse_as(kind), choices=choices,
                                default=argparse.SUPPRESS, metavar=metavar, help=text)


def _parse_as(kind: type) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


def parse_model_args(items: list[str], flag: str = "--model-arg") -> dict[str, Any]:
    """KEY=VALUE pairs; each VALUE is read as YAML (numbers, true/false, lists)."""
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            overrides[key.strip()] = value
    return overrides


def train_config_from_args(args: argparse.Namespace):
    """(TrainConfig, checkpoint to resume or None): defaults or the resumed run's config, then YAML, then flags."""
    from bdh.train import args as train_args
    from bdh.train.checkpoint import load_checkpoint

    flags = {name: getattr(args, name) for name in train_args.field_names() if hasattr(args, name)}
    model_flags = parse_model_args(args.model_arg)
    from_yaml = train_args.load_yaml_config(args.config) if args.config else {}
    values: dict[str, Any] = {}
    resumed = None
    if getattr(args, "resume", None) is not None:
        target = args.resume or flags.get("out") or from_yaml.get("out")
        if not target:
            preset = flags.get("preset") or from_yaml.get("preset") or train_args.TrainConfig.preset
            target = f"runs/{preset}"
        resumed = load_checkpoint(target)
        saved = resumed.state["train_config"]
        if not isinstance(saved, dict):
            raise UserError(f"{resumed.path / 'trainer_state.json'} holds no train_config mapping")
        values.update(saved)
        values["out"] = str(resumed.run.path)
    for layer in (from_yaml, flags):
        overrides = layer.get("model_overrides")
        values.update(layer)
        if overrides is not None:
            values["model_overrides"] = {**values.get("model_overrides", {}), **overrides}
    if model_flags:
        values["model_overrides"] = {**values.get("model_overrides", {}), **model_flags}
    return train_args.TrainConfig.from_dict(values), resumed


def cmd_train(args: argparse.Namespace) -> int:
    from bdh.train.loop import TrainingDiverged, TrainingInterrupted, train

    cfg, resumed = train_config_from_args(args)
    try:
        train(cfg, resume=resumed.path if resumed is not None else None, overwrite=args.overwrite)
    except TrainingDiverged as err:
        _error(str(err))
        return 1
    except TrainingInterrupted as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 130
    return 0


# --------------------------------------------------------------------------------------------
# bdh generate

# more new tokens than anyone reads in one command (hours of decoding even for the small preset)
MAX_NEW_TOKENS = 10_000_000


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, metavar="DIR", help="checkpoint or run directory")
    parser.add_argument("--prompt", default="\n", help="text to continue; '-' reads it from stdin (default: a newline)")
    parser.add_argument("--max-new-tokens", type=_parse_as(int), default=200, metavar="N",
                        help="tokens to generate (default: 200)")
    parser.add_argument("--temperature", type=_parse_as(float), default=1.0, metavar="T",
                        help="sampling temperature; 0 is greedy (default: 1.0)")
    parser.add_argument("--top-k", type=_parse_as(int), default=None, metavar="K",
                        help="sample among the K most likely tokens only (default: all)")
    parser.add_argument("--top-p", type=_parse_as(float), default=None, metavar="P",
                        help="nucleus sampling: the smallest set of tokens with probability >= P (default: off)")
    parser.add_argument("--seed", type=_parse_as(int), default=None, help="random seed (default: unseeded)")
    add_device_arg(parser)
    parser.add_argument("--echo", action=argparse.BooleanOptionalAction, default=True,
                        help="print the prompt before the generated text (default: on)")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from bdh.checkpoint import load_model
    from bdh.data import encode_prompt
    from bdh.generate import generate
    from bdh.rundir import load_checkpoint_tokenizer, resolve_checkpoint

    if not 0 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"--max-new-tokens must lie in [0, {MAX_NEW_TOKENS:,}], got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise UserError(f"--top-p must lie in (0, 1], got {args.top_p}")
    prompt = _read_stdin_prompt() if args.prompt == "-" else args.prompt
    device = resolve_device(args.device)
    directory = resolve_checkpoint(args.ckpt)
    model = load_model(directory, device=device)
    tokenizer = load_checkpoint_tokenizer(directory, model.config.vocab_size)
    ids = encode_prompt(tokenizer, prompt)
    _check_length(model, len(ids) + args.max_new_tokens)
    generator = torch.Generator(device=device)
    if args.seed is not None:
        generator.manual_seed(args.seed)
    else:
        generator.seed()
    out = sys.stdout
    if args.echo:
        out.write(prompt)
        out.flush()
    stream = TextStream(tokenizer, out)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    generate(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
             generator=generator, on_token=lambda tok: stream.push(int(tok[0, 0])))
    stream.close()
    out.write("\n")
    out.flush()
    return 0


def _read_stdin_prompt() -> str:
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"the prompt on stdin is not UTF-8 text (byte {err.start}): convert it to UTF-8") from None


class TextStream:
    """Decode tokens incrementally and print only the new text.

    A token can end inside a multi-byte UTF-8 character (bytes tokenizer, byte-level BPE): its
    text then ends in U+FFFD and is held back until the following tokens complete it.
    """

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were printed already; decoding from prefix keeps context
        self.read = 0

    def push(self, token: int) -> None:
        self.ids.append(token)
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._write(text[len(done):])
            self.prefix, self.read = self.read, len(self.ids)

    def close(self) -> None:
        """Print whatever is still held back (a character that never completed shows as U+FFFD)."""
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) > len(done):
            self._write(text[len(done):])
        self.prefix = self.read = len(self.ids)

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """--device, the same for every command that runs a model."""
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: auto)")


def _check_length(model, total: int) -> None:
    limit = model.max_positions
    if limit is not None and total > limit:
        raise UserError(f"prompt + new tokens = {total} exceeds this model's {limit} positions: "
                        "use a shorter prompt or fewer --max-new-tokens")


# --------------------------------------------------------------------------------------------
# bdh eval

def add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, metavar="DIR", help="checkpoint or run directory")
    parser.add_argument("--data", default=None, metavar="PATH",
                        help="evaluate on all of this text (file, directory, glob or 'shakespeare'); "
                             "default: the validation split of the training data")
    parser.add_argument("--batch-size", type=_parse_as(int), default=None, metavar="N",
                        help="windows per batch (default: the training batch size, else 8)")
    parser.add_argument("--block-size", type=_parse_as(int), default=None, metavar="T",
                        help="tokens per window (default: the training block size, else 256)")
    parser.add_argument("--max-batches", type=_parse_as(int), default=None, metavar="N",
                        help="evaluate at most N batches, spread evenly over the text (default: all)")
    add_device_arg(parser)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def cmd_eval(args: argparse.Namespace) -> int:
    from bdh.checkpoint import load_model
    from bdh.data import load_corpus
    from bdh.rundir import load_checkpoint_tokenizer, read_trainer_state, resolve_checkpoint
    from bdh.train.evaluate import check_eval_length, evaluate, tokens_per_byte

    for name in ("batch_size", "block_size", "max_batches"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    device = resolve_device(args.device)
    directory = resolve_checkpoint(args.ckpt)
    state = read_trainer_state(directory) or {}
    trained = state.get("train_config") if isinstance(state.get("train_config"), dict) else {}
    model = load_model(directory, device=device)
    tokenizer = load_checkpoint_tokenizer(directory, model.config.vocab_size)
    if args.data is not None:
        corpus = load_corpus(args.data)
        text, what = corpus.train + corpus.val, f"all of {args.data}"
    elif trained.get("data"):
        corpus = load_corpus(trained["data"], val_fraction=trained.get("val_fraction", 0.1))
        text, what = corpus.val, f"the validation split of {trained['data']}"
    else:
        raise UserError(f"{directory} records no training data: pass --data PATH")
    block = args.block_size or trained.get("block_size") or 256
    batch = args.batch_size or trained.get("batch_size") or 8
    _check_length(model, block)
    tokens = tokenizer.encode_array(text)
    check_eval_length(tokens, block, what)
    result = evaluate(model, tokens, batch, block, args.max_batches, device, tokens_per_byte(len(tokens), text))
    if args.json:
        print(json.dumps({"checkpoint": str(directory), "data": what, "block_size": block, **result.to_dict()}))
    else:
        print(f"{what}: loss {result.loss:.4f} nats/token, {result.bpb:.4f} bits/byte, "
              f"perplexity {result.ppl:.3f} ({result.tokens:,} tokens scored)")
    return 0


# --------------------------------------------------------------------------------------------
# bdh info

def add_info_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, metavar="DIR", help="checkpoint or run directory")
    parser.add_argument("--json", action="store_true", help="print everything as one JSON object")


def cmd_info(args: argparse.Namespace) -> int:
    from bdh.checkpoint import load_model
    from bdh.rundir import read_trainer_state, resolve_checkpoint

    directory = resolve_checkpoint(args.ckpt)
    model = load_model(directory)
    state = read_trainer_state(directory)
    info = {
        "checkpoint": str(directory),
        "model_type": model.model_type,
        "config": model.config.to_dict(),
        "parameters": model.num_params(),
        "parameters_without_embeddings": model.num_params(embeddings=False),
        "training": _training_summary(state) if isinstance(state, dict) else None,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"checkpoint: {directory}")
    print(f"model: {info['model_type']}")
    for key, value in info["config"].items():
        print(f"  {key}: {value}")
    print(f"parameters: {info['parameters']:,} ({info['parameters_without_embeddings']:,} without embeddings)")
    if info["training"] is None:
        print("training: no trainer_state.json (a saved model, not a training checkpoint)")
    else:
        print("training:")
        for key, value in info["training"].items():
            print(f"  {key}: {value}")
    return 0


def _training_summary(state: dict) -> dict[str, Any]:
    cfg = state.get("train_config") or {}
    last = state.get("last_val") or {}
    return {
        "step": state.get("step"),
        "tokens_seen": state.get("tokens_seen"),
        "elapsed_s": state.get("elapsed_s"),
        "data": (state.get("data") or {}).get("name", cfg.get("data")),
        "tokenizer": (state.get("tokenizer") or {}).get("kind", cfg.get("tokenizer")),
        "stream": state.get("stream"),
        "world_size": state.get("world_size"),
        "last_val_loss": last.get("loss"),
        "last_val_bpb": last.get("bpb"),
        "best_val_loss": state.get("best_val_loss"),
        "best_step": state.get("best_step"),
        "batch_size": cfg.get("batch_size"),
        "block_size": cfg.get("block_size"),
        "max_iters": cfg.get("max_iters"),
    }


# --------------------------------------------------------------------------------------------
# bdh compare, bdh sweep

def add_experiment_args(parser: argparse.ArgumentParser) -> None:
    """What compare and sweep share: the output directory, the model arguments, the training options."""
    parser.add_argument("--out", dest="experiment_dir", required=True, metavar="DIR",
                        help="directory of the experiment: one run directory per model and size, the report, "
                             "the figures; running the same command again reuses finished runs and resumes "
                             "an unfinished one")
    parser.add_argument("--overwrite", action="store_true", help="train every run from the start")
    parser.add_argument("--config", metavar="FILE", help="YAML file of training options shared by every run "
                        "(TrainConfig field names; a `model:` mapping overrides BDH config fields); flags win")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="override one BDH config field, e.g. --model-arg dropout=0.1 (repeatable)")
    parser.add_argument("--gpt-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="hold one field of the matched GPT, e.g. --gpt-arg pos_encoding=alibi "
                             "(repeatable; default: GPT-2 shape with learned positions for --block-size)")
    add_train_fields(parser, skip=("model_type", "out"))


def add_compare_args(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Both models share every training option (data, tokenizer, batches, optimizer, schedule, seed, "
                     "--max-iters and --max-minutes: each model gets the budget, whichever limit comes first; the "
                     "learning rate decays over --max-iters). Writes DIR/bdh, DIR/gpt, compare.md, compare.json, "
                     "val_loss_vs_tokens.png and val_loss_vs_time.png.")
    add_experiment_args(parser)


def add_sweep_args(parser: argparse.ArgumentParser) -> None:
    from bdh.experiments.sweep import DEFAULT_SIZES, FIT_ON, MODELS

    parser.epilog = ("BDH grows only its neuron count; gpt-mK is the GPT of bdh-mK's parameter count. Every run gets "
                     "the same training options and budget (--max-iters / --max-minutes per run). Writes "
                     "DIR/<model>-m<size>/, sweep.md, sweep.json and scaling.png.")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), metavar="M,M,...",
                        help="BDH neuron multipliers (mlp_internal_dim_multiplier) of the --preset to train "
                             f"(default: {','.join(map(str, DEFAULT_SIZES))})")
    parser.add_argument("--models", default=",".join(MODELS), metavar="LIST",
                        help=f"which models to train, comma-separated (default: {','.join(MODELS)})")
    parser.add_argument("--fit-on", choices=FIT_ON, default="auto",
                        help="parameter count of the fit and figure: total, non-embedding, or auto (total when it "
                             "spans 10x for every model) (default: auto)")
    add_experiment_args(parser)


def cmd_compare(args: argparse.Namespace) -> int:
    from bdh.experiments import compare

    cfg, _ = train_config_from_args(args)
    gpt_fixed = parse_model_args(args.gpt_arg, "--gpt-arg")
    return _experiment(lambda: compare(cfg, args.experiment_dir, gpt_fixed, overwrite=args.overwrite,
                                       command=_command_line(args)))


def cmd_sweep(args: argparse.Namespace) -> int:
    from bdh.experiments import sweep
    from bdh.experiments.sweep import parse_models, parse_sizes

    sizes, models = parse_sizes(args.sizes), parse_models(args.models)
    cfg, _ = train_config_from_args(args)
    gpt_fixed = parse_model_args(args.gpt_arg, "--gpt-arg")
    return _experiment(lambda: sweep(cfg, args.experiment_dir, sizes, models, gpt_fixed, fit_on=args.fit_on,
                                     overwrite=args.overwrite, command=_command_line(args)))


def _experiment(run: Callable[[], Any]) -> int:
    """A failed training run is one error line (exit 1); Ctrl-C says how to resume (exit 130)."""
    from bdh.experiments import RunFailed

    try:
        run()
    except RunFailed as err:
        _error(f"{err}; run the same command again to retry (finished runs are kept)")
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def _command_line(args: argparse.Namespace) -> str:
    import shlex

    return shlex.join([PROG, *getattr(args, "argv", [args.command])])


# --------------------------------------------------------------------------------------------
# inspect and bench

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


def add_inspect_args(parser: argparse.ArgumentParser) -> None:
    from bdh.interp.synapses import MAX_SYNAPSE_ENTRIES

    parser.add_argument("--ckpt", required=True, help="checkpoint directory (or run directory with 'latest')")
    parser.add_argument("--text", required=True, help="UTF-8 text file to read")
    parser.add_argument("--out", required=True, help="directory for report.json, report.html and figures "
                        "(new or empty; built beside it and moved into place)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier report of bdh's in --out (never files bdh did not write)")
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
    add_device_arg(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def cmd_inspect(args: argparse.Namespace) -> int:
    from bdh.interp.report import inspect, stderr_log

    if args.betas is not None and not all(math.isfinite(b) and b > 0 for b in args.betas):
        raise UserError(f"--betas must be positive finite numbers, got {args.betas}")

    out = Path(args.out)
    inspect(args.ckpt, args.text, out, max_tokens=args.max_tokens, device=args.device, metrics=args.metrics,
            concept_file=args.concept, control_file=args.control, log=None if args.quiet else stderr_log,
            layers=args.layers, chunk_len=args.chunk_len, top_k=args.top_k, trace=args.trace,
            concepts=not args.no_concepts, candidates=args.candidates, normalize=args.normalize,
            graph=not args.no_graph, betas=args.betas, n_betas=args.n_betas, max_edges=args.max_edges,
            seeds=args.seeds, save_entries=args.synapse_entries, max_synapses=args.max_synapses,
            overwrite=args.overwrite)
    print(f"wrote {out / 'report.html'} and {out / 'report.json'}")
    return 0


BENCHMARKS = ("train_step", "generate", "sparse_decode")


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=BENCHMARKS, help="which benchmark to run")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="its own options (see: bdh bench NAME --help)")


def cmd_bench(args: argparse.Namespace) -> int:
    """Run benchmarks/<name>.py of the source checkout (benchmarks are not installed with the package)."""
    import subprocess

    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"{args.name}.py"
    if not script.is_file():
        raise UserError(f"benchmarks/{args.name}.py not found: bdh bench needs a source checkout "
                        "installed with `pip install -e .`")
    return subprocess.call([sys.executable, str(script), *args.bench_args], cwd=script.parent)


# --------------------------------------------------------------------------------------------
# the table and main

@dataclasses.dataclass(frozen=True)
class Command:
    run: Callable[[argparse.Namespace], int]
    add_args: Callable[[argparse.ArgumentParser], None]
    help: str


COMMANDS: dict[str, Command] = {
    "train": Command(cmd_train, add_train_args, "train a model (resumable; distributed under torchrun)"),
    "generate": Command(cmd_generate, add_generate_args, "sample text from a checkpoint, streamed as it comes"),
    "eval": Command(cmd_eval, add_eval_args, "validation loss, bits per byte and perplexity of a checkpoint"),
    "info": Command(cmd_info, add_info_args, "a checkpoint's config, parameter counts and training summary"),
    "compare": Command(cmd_compare, add_compare_args, "train BDH and a GPT of its size alike; table and curves"),
    "sweep": Command(cmd_sweep, add_sweep_args, "loss against parameters at several sizes, power-law fits"),
    "inspect": Command(cmd_inspect, add_inspect_args, "sparsity, synapses, concepts, neuron graph: a report"),
    "bench": Command(cmd_bench, add_bench_args, "speed and memory benchmarks (JSON)"),
}


def build_parser() -> ArgParser:
    from bdh import __version__

    parser = ArgParser(prog=PROG, description="BDH, the Dragon Hatchling language model: train, sample, evaluate.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, command in COMMANDS.items():
        child = sub.add_parser(name, help=command.help, description=command.help)
        command.add_args(child)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one bdh command; returns the exit status (0 ok, 2 user error)."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            raise CLIError(f"a command is required: {', '.join(COMMANDS)} (see: {PROG} --help)")
        args.argv = list(sys.argv[1:] if argv is None else argv)
        return COMMANDS[args.command].run(args)
    except SystemExit as exit_:  # --help and --version
        return exit_.code if isinstance(exit_.code, int) else 0
    except UserError as err:
        _error(str(err))
        return 2
    except OSError as err:
        _error(f"{err.strerror or err}{f': {err.filename}' if err.filename else ''}")
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _error(message: str) -> None:
    line = " ".join(str(message).split())
    print(f"{PROG}: error: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
