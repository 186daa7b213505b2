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
import sys
from pathlib import Path
from typing import Any, Callable

from bdh.errors import UserError

PROG = "bdh"


class CLIError(UserError):
    """A command-line mistake found by argparse."""


class ArgParser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so main() prints one line."""

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
        values["out"] = str(resumed.run_dir)
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
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--echo", action=argparse.BooleanOptionalAction, default=True,
                        help="print the prompt before the generated text (default: on)")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from bdh.checkpoint import load_model, resolve_checkpoint
    from bdh.data import encode_prompt
    from bdh.generate import generate

    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must not be negative, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must not be negative, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must lie in (0, 1], got {args.top_p}")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    device = _device(args.device)
    directory = resolve_checkpoint(args.ckpt)
    model = load_model(directory, device=device)
    tokenizer = _tokenizer_for(directory, model)
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


def _device(name: str):
    from bdh.train.distributed import DistEnv
    from bdh.train.loop import resolve_device

    return resolve_device(name, DistEnv())


def _tokenizer_for(directory: Path, model):
    """The checkpoint's tokenizer; a bare saved model of 256 tokens is taken to read bytes."""
    from bdh.data import ByteTokenizer, load_tokenizer
    from bdh.data.tokenizers import TOKENIZER_FILE

    if not (directory / TOKENIZER_FILE).is_file() and model.config.vocab_size == 256:
        return ByteTokenizer()
    return load_tokenizer(directory)


def _check_length(model, total: int) -> None:
    config = model.config
    if getattr(config, "pos_encoding", None) == "learned" and total > config.block_size:
        raise UserError(f"prompt + new tokens = {total} exceeds this model's {config.block_size} learned positions: "
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
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def cmd_eval(args: argparse.Namespace) -> int:
    from bdh.checkpoint import load_model, resolve_checkpoint
    from bdh.data import load_corpus
    from bdh.train.checkpoint import read_trainer_state
    from bdh.train.evaluate import check_eval_length, evaluate, tokens_per_byte

    for name in ("batch_size", "block_size", "max_batches"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    device = _device(args.device)
    directory = resolve_checkpoint(args.ckpt)
    state = read_trainer_state(directory) or {}
    trained = state.get("train_config") if isinstance(state.get("train_config"), dict) else {}
    model = load_model(directory, device=device)
    tokenizer = _tokenizer_for(directory, model)
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
    from bdh.checkpoint import load_model, resolve_checkpoint
    from bdh.train.checkpoint import read_trainer_state

    directory = resolve_checkpoint(args.ckpt)
    model = load_model(directory)
    state = read_trainer_state(directory)
    info = {
        "checkpoint": str(directory),
        "model_type": getattr(model, "model_type", "bdh"),
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

def add_inspect_args(parser: argparse.ArgumentParser) -> None:
    from bdh.interp.cli import add_inspect_arguments

    add_inspect_arguments(parser)


def cmd_inspect(args: argparse.Namespace) -> int:
    from bdh.interp.cli import run_inspect

    return run_inspect(args)


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
