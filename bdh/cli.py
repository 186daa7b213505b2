"""The `bdh` command: a table of subcommands, each a plain function of its parsed arguments.

    bdh train     train a model (BDH or the GPT baseline), resume a run, distributed with torchrun
    bdh generate  sample from a checkpoint, streaming the text as it comes
    bdh eval      loss, bits per byte and perplexity of a checkpoint on text (--task translate: per direction)
    bdh translate translate text with a model trained on --task translate
    bdh merge     merge two BDH models by concatenating their neurons
    bdh info      a checkpoint's config, parameter counts and training summary
    bdh compare   BDH against the GPT of its parameter count (or other families), each at its own best lr
    bdh sweep     validation loss against parameter count at several sizes, with power-law fits
    bdh inspect   sparsity, synapses, concept synapses and the neuron graph: report.json + .html
    bdh graph     BDH as a graph of neurons (bdh.graph): messages per token, thresholds: graph.json + plots
    bdh bench     the speed and memory benchmarks of benchmarks/ (JSON out)
    bdh explore   a local web app to watch a model read, fire neurons, grow synapses and write

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

from bdh.data.tokenizers import TextStream
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


def train_config_from_args(args: argparse.Namespace, defaults: dict[str, Any] | None = None):
    """(TrainConfig, checkpoint to resume or None): defaults or the resumed run's config, then YAML, then flags.

    defaults: values that replace TrainConfig's own defaults (the experiments' final evaluation)."""
    from bdh.train import args as train_args
    from bdh.train.checkpoint import load_checkpoint

    flags = {name: getattr(args, name) for name in train_args.field_names() if hasattr(args, name)}
    model_flags = parse_model_args(args.model_arg)
    from_yaml = train_args.load_yaml_config(args.config) if args.config else {}
    values: dict[str, Any] = dict(defaults or {})
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
    add_sampling_args(parser, temperature=1.0)
    add_device_arg(parser)
    parser.add_argument("--echo", action=argparse.BooleanOptionalAction, default=True,
                        help="print the prompt before the generated text (default: on)")


def add_sampling_args(parser: argparse.ArgumentParser, temperature: float) -> None:
    """--temperature --top-k --top-p --seed, shared by generate and translate."""
    parser.add_argument("--temperature", type=_parse_as(float), default=temperature, metavar="T",
                        help=f"sampling temperature; 0 is greedy (default: {temperature:g})")
    parser.add_argument("--top-k", type=_parse_as(int), default=None, metavar="K",
                        help="sample among the K most likely tokens only (default: all)")
    parser.add_argument("--top-p", type=_parse_as(float), default=None, metavar="P",
                        help="nucleus sampling: the smallest set of tokens with probability >= P (default: off)")
    parser.add_argument("--seed", type=_parse_as(int), default=None, help="random seed (default: unseeded)")


def check_sampling_args(args: argparse.Namespace) -> None:
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise UserError(f"--top-p must lie in (0, 1], got {args.top_p}")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from bdh.checkpoint import load_model
    from bdh.data import encode_prompt
    from bdh.generate import generate
    from bdh.rundir import load_checkpoint_tokenizer, resolve_checkpoint

    if not 0 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"--max-new-tokens must lie in [0, {MAX_NEW_TOKENS:,}], got {args.max_new_tokens}")
    check_sampling_args(args)
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
    translate = parser.add_argument_group("--task translate")
    translate.add_argument("--task", choices=("lm", "translate"), default=None,
                           help="translate: per-direction target loss and chrF/BLEU on held-out pairs "
                                "(default: the task the checkpoint was trained on, else lm)")
    translate.add_argument("--split", choices=("test", "val"), default="test",
                           help="which held-out pairs to score (default: test)")
    translate.add_argument("--pairs", type=_parse_as(int), default=100, metavar="N",
                           help="pairs translated greedily in each direction for chrF/BLEU; 0: loss only (default: 100)")


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
    if (args.task or trained.get("task", "lm")) == "translate":
        return _eval_translation(args, directory, model, tokenizer, trained, device)
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


def _eval_translation(args, directory, model, tokenizer, trained: dict, device) -> int:
    from bdh.data.parallel import load_parallel
    from bdh.train.translation import evaluate_translation

    data = args.data or trained.get("data")
    if not data:
        raise UserError(f"{directory} records no training data: pass --data bible:en-es (or pairs)")
    if args.pairs < 0:
        raise UserError(f"--pairs must not be negative, got {args.pairs}")
    corpus = load_parallel(data, val_fraction=trained.get("val_fraction", 0.1))
    block = args.block_size or trained.get("block_size") or 256
    batch = args.batch_size or trained.get("batch_size") or 8
    report = evaluate_translation(model, tokenizer, corpus, args.split, batch, block, args.max_batches, args.pairs,
                                  device)
    report = {"checkpoint": str(directory), "block_size": block, **report}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{corpus.name} ({args.split}, {report['pairs']} pairs): loss {report['loss']:.4f} nats/token over "
          f"{report['tokens']:,} tokens")
    for name, entry in report["directions"].items():
        scores = f", chrF {entry['chrf']:.1f}, BLEU {entry['bleu']:.1f} on {entry['scored_pairs']} pairs" \
            if "chrf" in entry else ""
        loss = "n/a (no target read)" if entry["target_loss"] is None else f"{entry['target_loss']:.4f}"
        print(f"  {name}: target loss {loss}{scores}")
    return 0


# --------------------------------------------------------------------------------------------
# bdh translate

def add_translate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="?", default="-", help="text to translate; '-' or nothing reads stdin, one "
                        "sentence per line")
    parser.add_argument("--ckpt", required=True, metavar="DIR", help="checkpoint or run directory")
    parser.add_argument("--from", dest="src", required=True, metavar="LANG", help="source language tag, e.g. en")
    parser.add_argument("--to", dest="tgt", required=True, metavar="LANG", help="target language tag, e.g. es")
    parser.add_argument("--max-new-tokens", type=_parse_as(int), default=None, metavar="N",
                        help="longest translation (default: twice the prompt's tokens plus 16)")
    add_sampling_args(parser, temperature=0.0)
    add_device_arg(parser)


def cmd_translate(args: argparse.Namespace) -> int:
    import torch

    from bdh.checkpoint import load_model
    from bdh.rundir import load_checkpoint_tokenizer, resolve_checkpoint
    from bdh.train.translation import translate

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    check_sampling_args(args)
    text = sys.stdin.read() if args.text == "-" else args.text
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError("nothing to translate: pass TEXT or lines on stdin")
    device = resolve_device(args.device)
    directory = resolve_checkpoint(args.ckpt)
    model = load_model(directory, device=device)
    tokenizer = load_checkpoint_tokenizer(directory, model.config.vocab_size)
    generator = torch.Generator(device=device)
    if args.seed is not None:
        generator.manual_seed(args.seed)
    else:
        generator.seed()
    for line in translate(model, tokenizer, lines, args.src, args.tgt, args.max_new_tokens, args.temperature,
                          args.top_k, args.top_p, generator):
        print(line)
    return 0


# --------------------------------------------------------------------------------------------
# bdh merge

def add_merge_args(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Concatenates the two BDH models' neurons head by head (D_x, D_y, RoPE frequencies, E) and "
                     "averages the embedding and read-out (the paper's Section 7.1); the models must share D, heads, "
                     "layers, vocabulary and tokenizer.")
    parser.add_argument("a", metavar="A", help="first checkpoint or run directory")
    parser.add_argument("b", metavar="B", help="second checkpoint or run directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory of the merged checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")


def cmd_merge(args: argparse.Namespace) -> int:
    from bdh.merge import merge_checkpoints

    model = merge_checkpoints(args.a, args.b, args.out, overwrite=args.overwrite)
    c = model.config
    print(f"wrote {args.out}: {c.n_head} heads x {c.neurons_per_head} neurons ({model.num_params():,} parameters)")
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
        **({"parameter_report": model.parameter_report()} if model.parameter_report() else {}),
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
    for key, value in info.get("parameter_report", {}).items():
        print(f"  {key}: {value:,}")
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
    parser.add_argument("--family-arg", action="append", default=[], metavar="FAMILY:KEY=VALUE",
                        help="one config field of another model family: held by its parameter matcher, or "
                             "overriding its preset (repeatable; --gpt-arg K=V is --family-arg gpt:K=V)")
    tune = parser.add_argument_group("the search of each model's settings (on a slice held out from the "
                                     "training split; never on the validation split)")
    tune.add_argument("--tune", action="append", default=None, metavar="KEY=V1,V2,...",
                      help="a grid to search for every model (repeatable; keys: lr, warmup_iters, weight_decay; "
                           "default: lr=1e-3,3e-3,1e-2). A field given as an option (--lr X) is held, not searched")
    tune.add_argument("--no-tune", action="store_true",
                      help="no search: every model trains at the given (or default) settings")
    tune.add_argument("--tune-share", type=_parse_as(float), default=0.25, metavar="X",
                      help="a trial's budget as a share of the run's (steps, warm-up, decay, minutes) (default: 0.25)")
    tune.add_argument("--tune-holdout", type=_parse_as(float), default=0.05, metavar="X",
                      help="share of the training split (its end) held out to score the trials (default: 0.05)")
    tune.add_argument("--tune-eval-iters", type=_parse_as(int), default=0, metavar="N",
                      help="batches of the held-out slice a trial is scored on; 0: all of it (default: 0)")
    tune.add_argument("--tune-extend", type=_parse_as(int), default=2, metavar="N",
                      help="where a grid of learning rates alone has its best at an edge, up to N more trials "
                           "one grid step further each, until the best is inside (default: 2; 0: the grid only)")
    # the search sets holdout_fraction for its trials; a reported run always validates on the validation split
    add_train_fields(parser, skip=("model_type", "out", "holdout_fraction", "init_from"))


def add_compare_args(parser: argparse.ArgumentParser) -> None:
    from bdh.experiments.families import DEFAULT_MODELS

    parser.epilog = ("Every model shares every training option (data, tokenizer, batches, schedule shape, seed, "
                     "--max-iters and --max-minutes) but the settings its own search chose (--tune). The final "
                     "loss is scored on the whole validation split (--final-eval-iters N for N batches), with its "
                     "standard error. Writes DIR/<model>, DIR/<model>-time (--equal-time), DIR/tune, compare.md, "
                     "compare.json, val_loss_vs_tokens.png and val_loss_vs_time.png.")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), metavar="LIST",
                        help="registered model families to train, comma-separated; BDH is the reference the others "
                             f"are sized by (default: {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--equal-time", nargs="?", const="auto", default=None, metavar="SECONDS",
                        help="also train every model for the same wall-clock time: SECONDS of training steps, or "
                             "without a value the slowest model's equal-token time (default: equal tokens only)")
    parser.add_argument("--reuse-settings", action="store_true",
                        help="with --equal-time: train the equal-time runs at the settings the equal-token search "
                             "chose, rather than searching again at the time budget (trials of --tune-share of it)")
    add_experiment_args(parser)


def add_sweep_args(parser: argparse.ArgumentParser) -> None:
    from bdh.experiments.families import DEFAULT_MODELS as MODELS
    from bdh.experiments.sweep import DEFAULT_SIZES, FIT_ON

    parser.epilog = ("BDH grows only its neuron count; gpt-mK is the GPT of bdh-mK's parameter count. Every run gets "
                     "the same training options and budget (--max-iters / --max-minutes per run) but the settings its "
                     "own search chose (--tune); final losses on the whole validation split. Writes "
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


# an experiment scores its final losses on the whole validation split unless told otherwise
EXPERIMENT_DEFAULTS = {"final_eval_iters": 0}


def experiment_inputs(args: argparse.Namespace):
    """(TrainConfig, family args, TuneSpec) of compare and sweep; a field given as an option is not searched."""
    from bdh.experiments.families import parse_family_args
    from bdh.experiments.tuning import DEFAULT_GRID, TuneSpec, parse_grid
    from bdh.train import args as train_args

    cfg, _ = train_config_from_args(args, EXPERIMENT_DEFAULTS)
    family_args = parse_family_args(args.family_arg)
    gpt = parse_model_args(args.gpt_arg, "--gpt-arg")
    if gpt:
        family_args["gpt"] = {**family_args.get("gpt", {}), **gpt}
    given = {n for n in train_args.field_names() if hasattr(args, n)}
    if args.config:
        given |= set(train_args.load_yaml_config(args.config))
    if args.no_tune:
        if args.tune:
            raise UserError("--no-tune and --tune contradict each other: pass one")
        grid = {}
    elif args.tune:
        grid = parse_grid(args.tune)
        held = sorted(set(grid) & given)
        if held:
            raise UserError(f"{', '.join(held)} is both given (--{held[0].replace('_', '-')}) and searched (--tune): "
                            "drop one")
    else:
        grid = {k: v for k, v in DEFAULT_GRID.items() if k not in given}
    tune = TuneSpec(grid=grid, share=args.tune_share, holdout=args.tune_holdout, eval_iters=args.tune_eval_iters,
                    extend=args.tune_extend)
    return cfg, family_args, tune


def cmd_compare(args: argparse.Namespace) -> int:
    from bdh.experiments import compare
    from bdh.experiments.families import parse_models

    models = parse_models(args.models)
    equal_time = args.equal_time
    if equal_time not in (None, "auto"):
        equal_time = _parse_as(float)(equal_time) if _is_number(equal_time) else equal_time
        if not isinstance(equal_time, float):
            raise UserError(f"--equal-time takes a number of seconds, got {args.equal_time!r}")
    if args.reuse_settings and equal_time is None:
        raise UserError("--reuse-settings is about the equal-time runs: add --equal-time, or drop it")
    cfg, family_args, tune = experiment_inputs(args)
    return _experiment(lambda: compare(cfg, args.experiment_dir, overwrite=args.overwrite, command=_command_line(args),
                                       models=models, family_args=family_args, tune=tune, equal_time=equal_time,
                                       time_search=not args.reuse_settings))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def cmd_sweep(args: argparse.Namespace) -> int:
    from bdh.experiments import sweep
    from bdh.experiments.families import parse_models
    from bdh.experiments.sweep import parse_sizes

    sizes, models = parse_sizes(args.sizes), parse_models(args.models)
    cfg, family_args, tune = experiment_inputs(args)
    return _experiment(lambda: sweep(cfg, args.experiment_dir, sizes, models, fit_on=args.fit_on,
                                     overwrite=args.overwrite, command=_command_line(args), family_args=family_args,
                                     tune=tune))


def add_merging_args(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Trains a base model on --data (default bible:en-es), fine-tunes a copy of it on each pair of "
                     "--tunes, merges the two copies (bdh merge) and scores the four models on the test pairs of "
                     "every pair: per-direction target loss and chrF. Every run gets the training options given "
                     "(--max-iters / --max-minutes per run). Writes DIR/base, DIR/tune-*, DIR/merged, merging.md, "
                     "merging.json and merging.png; running it again reuses what is finished.")
    parser.add_argument("--out", dest="experiment_dir", required=True, metavar="DIR", help="directory of the experiment")
    parser.add_argument("--overwrite", action="store_true", help="train and evaluate everything from the start")
    parser.add_argument("--config", metavar="FILE", help="YAML file of training options shared by every run")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="override one BDH config field of the base model (repeatable)")
    parser.add_argument("--tunes", default="bible:en-fr,bible:en-de", metavar="PAIRS",
                        help="the two language pairs of the fine-tuned copies (default: bible:en-fr,bible:en-de)")
    parser.add_argument("--pairs", type=_parse_as(int), default=50, metavar="N",
                        help="test pairs translated per direction for chrF (default: 50)")
    parser.add_argument("--eval-batches", type=_parse_as(int), default=20, metavar="N",
                        help="windows per lane for the test loss (default: 20)")
    add_train_fields(parser, skip=("model_type", "out", "init_from", "task"))
    parser.set_defaults(data="bible:en-es")


def cmd_merging(args: argparse.Namespace) -> int:
    from bdh.experiments.merging import merging

    args.task = "translate"
    cfg, _ = train_config_from_args(args)
    tunes = [t.strip() for t in args.tunes.split(",") if t.strip()]
    return _experiment(lambda: merging(cfg, args.experiment_dir, tunes, args.pairs, args.eval_batches,
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


def add_concepts_args(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("For each language: the synapses that grow most on the concept sentences against the control "
                     "ones (one-sided Mann-Whitney U, Bonferroni over every synapse), then the best ones tested on "
                     "the other languages' sentences: is there a monosemantic synapse, and is it the same in both?")
    parser.add_argument("--ckpt", required=True, metavar="DIR", help="checkpoint or run directory (a BDH model)")
    parser.add_argument("--concept", default="money", help="shipped concept set, read as NAME_<lang> (default: money)")
    parser.add_argument("--control", default="weather", help="shipped control set (default: weather)")
    parser.add_argument("--langs", default="en,es", help="languages, comma-separated (default: en,es)")
    parser.add_argument("--top-k", type=_parse_as(int), default=5, metavar="K", help="synapses kept per language")
    parser.add_argument("--no-tags", action="store_true", help="read sentences without the `<lang> ` tag")
    add_device_arg(parser)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def cmd_concepts(args: argparse.Namespace) -> int:
    from bdh.checkpoint import load_model
    from bdh.interp.bilingual import bilingual_concepts
    from bdh.interp.concepts import contrast_set
    from bdh.rundir import load_checkpoint_tokenizer, resolve_checkpoint

    langs = [lang.strip() for lang in args.langs.split(",") if lang.strip()]
    sets = {lang: (contrast_set(f"{args.concept}_{lang}"), contrast_set(f"{args.control}_{lang}")) for lang in langs}
    directory = resolve_checkpoint(args.ckpt)
    model = load_model(directory, device=resolve_device(args.device))
    tokenizer = load_checkpoint_tokenizer(directory, model.config.vocab_size)
    result = bilingual_concepts(model, tokenizer, sets, tagged=not args.no_tags, top_k=args.top_k)
    if args.json:
        print(json.dumps(result))
        return 0
    for lang, r in result.items():
        print(f"{lang}: {r['n_synapses']:,} synapses searched, {r['n_concept']} + {r['n_control']} sentences; "
              f"{r['significant']} of the top {len(r['top'])} significant after Bonferroni")
        for d in r["top"]:
            other = ", ".join(f"in {o}: U {v['U']:.0f}/{v['U_max']}, p {v['p']:.2g}" for o, v in d["other"].items())
            print(f"  layer {d['layer']} head {d['head']} {d['i']}->{d['j']}: U {d['U']:.0f}/{d['U_max']}, "
                  f"p {d['p']:.2g}, Bonferroni p {d['p_bonferroni']:.2g}, r {d['rank_biserial']:.2f}; {other}")
    return 0


BENCHMARKS = ("train_step", "vs_authors", "generate", "sparse_decode", "sparse_readout", "weight_products",
              "profile_step")


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
# bdh explore

def add_explore_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, action="append", metavar="DIR",
                        help="checkpoint or run directory; give it twice to see two models side by side")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=_parse_as(int), default=8765, metavar="N",
                        help="port to listen on; 0 picks a free one (default: 8765)")
    parser.add_argument("--no-browser", action="store_true", help="serve without opening a browser")
    parser.add_argument("--max-chars", type=_parse_as(int), default=4000, metavar="N",
                        help="longest text a request may carry, in characters (default: 4000)")
    parser.add_argument("--max-new-tokens", type=_parse_as(int), default=500, metavar="N",
                        help="most tokens one generation may ask for (default: 500)")
    parser.add_argument("--max-concurrent", type=_parse_as(int), default=4, metavar="N",
                        help="requests served at once; more are refused with 429 (default: 4)")
    add_device_arg(parser)


def cmd_explore(args: argparse.Namespace) -> int:
    from bdh.explore import require_web, serve

    require_web()  # one line, not an ImportError, without the explore extra
    from bdh.explore.server import Limits

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must lie in 0..65535, got {args.port}")
    limits = Limits(max_chars=args.max_chars, max_new_tokens=args.max_new_tokens, max_concurrent=args.max_concurrent)
    serve(args.ckpt, host=args.host, port=args.port, open_browser=not args.no_browser,
          device=resolve_device(args.device), limits=limits)
    return 0


# --------------------------------------------------------------------------------------------
# graph

def add_graph_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, nargs="+",
                        help="checkpoint directory (or run directory); several give the growth with n")
    parser.add_argument("--text", required=True, help="UTF-8 text file to read")
    parser.add_argument("--out", required=True, help="directory for graph.json and the plots")
    parser.add_argument("--max-tokens", type=int, default=256, help="read at most this many tokens (default 256)")
    parser.add_argument("--fractions", type=_float_list, default=None,
                        help="fractions of the G_x, G_y edges kept in the threshold sweep (default 1,.5,.2,.1,.05,.02)")
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"),
                        help="arithmetic of the graph form (default float64)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier `bdh graph` output in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def cmd_graph(args: argparse.Namespace) -> int:
    from bdh.graph.report import DEFAULT_FRACTIONS, graph_report

    log = None if args.quiet else (lambda message: print(f"[graph] {message}", file=sys.stderr, flush=True))
    graph_report(args.ckpt, args.text, args.out, max_tokens=args.max_tokens,
                 fractions=args.fractions or DEFAULT_FRACTIONS, dtype=args.dtype, log=log, overwrite=args.overwrite)
    print(f"wrote {Path(args.out) / 'graph.json'}")
    return 0


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
    "translate": Command(cmd_translate, add_translate_args, "translate text with a translation model"),
    "merge": Command(cmd_merge, add_merge_args, "merge two BDH models, neurons side by side"),
    "info": Command(cmd_info, add_info_args, "a checkpoint's config, parameter counts and training summary"),
    "compare": Command(cmd_compare, add_compare_args, "BDH vs a GPT of its size, each at its best lr; curves"),
    "sweep": Command(cmd_sweep, add_sweep_args, "loss against parameters at several sizes, power-law fits"),
    "merging": Command(cmd_merging, add_merging_args, "the merging experiment, table and plot"),
    "inspect": Command(cmd_inspect, add_inspect_args, "sparsity, synapses, concepts, neuron graph: a report"),
    "concepts": Command(cmd_concepts, add_concepts_args, "concept synapses tested across languages"),
    "graph": Command(cmd_graph, add_graph_args, "BDH as a graph of neurons: messages, thresholds, layouts"),
    "bench": Command(cmd_bench, add_bench_args, "speed and memory benchmarks (JSON)"),
    "explore": Command(cmd_explore, add_explore_args, "a local web app: watch a model read, think and write"),
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
