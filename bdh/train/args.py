"""Training arguments: one dataclass whose field docstrings are also the CLI help (litgpt style).

Values are resolved in this order, later wins: the dataclass defaults (or, on --resume, the
config the run was started with), then a YAML file, then command-line flags.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from bdh import registry
from bdh.errors import UserError
from bdh.precision import DTYPE_NAMES, check_device_name

DECAYS = ("cosine", "linear", "constant")
TASKS = ("lm", "translate")


@dataclass
class TrainConfig:
    """Everything `bdh train` needs besides the model's own hyper-parameters."""

    model_type: str = field(default="bdh", metadata={"flag": "--model", "choices": registry.names()})
    """which model family to train: bdh, or a baseline (bdh.registry)"""
    preset: str = "small"
    """named model preset (bdh: tiny, small, paper-25m)"""
    model_overrides: dict = field(default_factory=dict, metadata={"flag": None})
    """model-config fields that replace the preset's (YAML `model:` mapping, --model-arg KEY=VALUE)"""
    task: str = field(default="lm", metadata={"choices": TASKS})
    """lm: predict the next token of text; translate: sentence pairs as one tagged stream, always trained in stream mode, validated also on the target tokens of each direction alone"""
    data: str = "shakespeare"
    """corpus: 'shakespeare', a text file, a directory of .txt files, or a glob; with task translate, pairs: bible:LANGS (two of en es fr it de, joined by a dash), a .tsv whose header names the two languages, or LANG=FILE,LANG=FILE"""
    init_from: str | None = None
    """start from the weights of this checkpoint (to fine tune it): its model config and tokenizer, a fresh optimizer and schedule"""
    val_fraction: float = 0.1
    """share of the corpus held out for validation"""
    tokenizer: str = "bytes"
    """tokenizer: 'bytes', 'bpe:<vocab size>' (trained on the train split) or 'gpt2'"""
    out: str | None = None
    """run directory for metrics and checkpoints (default: runs/<preset>)"""
    batch_size: int = 16
    """sequences per micro-batch, per process"""
    block_size: int = 128
    """tokens per sequence (the truncated-BPTT window in stream mode)"""
    max_iters: int = 1500
    """optimizer steps to train for (the run stops at max_iters or max_minutes, whichever first)"""
    max_minutes: float | None = None
    """wall-clock budget of this invocation in minutes (default: none)"""
    train_seconds: float | None = None
    """a time budget: train for this many seconds of training steps (validation, checkpoints and logging not counted, resumed runs included), the learning rate's decay running on that clock instead of on steps; max_iters stays an upper bound (default: none)"""
    lr: float = 1e-3
    """peak learning rate, reached at the end of the warm-up"""
    min_lr: float = 1e-4
    """learning rate at the end of the decay"""
    warmup_iters: int = 100
    """steps of linear warm-up from ~0 to lr"""
    decay: str = field(default="cosine", metadata={"choices": DECAYS})
    """shape of the decay from lr to min_lr after the warm-up"""
    decay_iters: int | None = None
    """step at which the decay reaches min_lr (default: max_iters)"""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to tensors with 2 or more dimensions only"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.999
    """AdamW beta2"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0: no clipping)"""
    grad_accum: int = 1
    """micro-batches accumulated per optimizer step"""
    eval_interval: int = 250
    """steps between validations (0: only at the end)"""
    eval_iters: int = 20
    """validation batches per evaluation"""
    final_eval_iters: int | None = None
    """validation batches of the evaluation after the last step (default: eval_iters; 0: the whole split)"""
    holdout_fraction: float = 0.0
    """share of the training split, taken from its end, kept out of training and validated on instead of the validation split (for hyper-parameter searches; 0: off)"""
    log_interval: int = 10
    """steps between metrics lines"""
    ckpt_interval: int = 500
    """steps between checkpoints (0: only at the end)"""
    keep_checkpoints: int = 2
    """how many of the latest checkpoints to keep (the best one is always kept too)"""
    seed: int = 1337
    """random seed (model init, batches; process r draws its batches with seed + r)"""
    stream: bool = False
    """consecutive-stream mode: batches continue each other and the model state is carried (truncated BPTT)"""
    sample_tokens: int = 200
    """tokens to sample and print at the end (0: no sample)"""
    sample_prompt: str = "\n"
    """prompt of the final sample"""
    compile: bool = False
    """compile the model with torch.compile (slow to start, faster steps)"""
    device: str = "auto"
    """the device: cpu, cuda, cuda:N, mps or auto (cuda when available)"""
    dtype: str | None = field(default=None, metadata={"choices": DTYPE_NAMES})
    """matmul dtype under autocast (default: the model config's; float16 needs CUDA)"""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), _types()[f.name]))
        if self.task == "translate":
            self.stream = True  # pairs follow each other, the state carried: how the paper trains translation
        self.validate()

    def validate(self) -> None:
        _positive(self, "batch_size", "block_size", "max_iters", "grad_accum", "eval_iters", "log_interval",
                  "keep_checkpoints")
        _non_negative(self, "warmup_iters", "eval_interval", "ckpt_interval", "sample_tokens", "min_lr",
                      "weight_decay", "grad_clip", "seed")
        if self.lr <= 0:
            raise UserError(f"lr must be positive, got {self.lr!r}")
        if self.min_lr > self.lr:
            raise UserError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise UserError(f"max_minutes must be positive, got {self.max_minutes!r}")
        if self.train_seconds is not None and self.train_seconds <= 0:
            raise UserError(f"train_seconds must be positive, got {self.train_seconds!r}")
        if self.train_seconds is not None and self.decay_iters is not None:
            raise UserError("train_seconds runs the decay on the clock to the end of the budget: leave decay_iters unset")
        if self.decay_iters is not None and self.decay_iters <= self.warmup_iters:
            raise UserError(f"decay_iters ({self.decay_iters}) must be larger than warmup_iters ({self.warmup_iters})")
        if self.final_eval_iters is not None and self.final_eval_iters < 0:
            raise UserError(f"final_eval_iters must be 0 (the whole split) or positive, got {self.final_eval_iters!r}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise UserError(f"holdout_fraction must lie in [0, 1), got {self.holdout_fraction!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"val_fraction must lie strictly between 0 and 1, got {self.val_fraction!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"{name} must lie in [0, 1), got {getattr(self, name)!r}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise UserError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}")
        check_device_name(self.device)
        for name in ("data", "tokenizer", "preset"):
            if not getattr(self, name).strip():
                raise UserError(f"{name} must not be empty")

    @property
    def out_dir(self) -> Path:
        return Path(self.out if self.out else f"runs/{self.preset}")

    @property
    def final_eval_batches(self) -> int | None:
        """Batches of the last evaluation: None for all of them."""
        n = self.eval_iters if self.final_eval_iters is None else self.final_eval_iters
        return n or None

    @property
    def schedule_iters(self) -> int:
        return self.decay_iters if self.decay_iters is not None else self.max_iters

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "train config") -> "TrainConfig":
        unknown = sorted(set(values) - set(field_names()))
        if unknown:
            raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}; "
                            f"known: {', '.join(field_names())}")
        return cls(**values)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


@lru_cache(maxsize=None)
def _types() -> dict[str, Any]:
    import typing

    return typing.get_type_hints(TrainConfig)


@lru_cache(maxsize=None)
def field_help() -> dict[str, str]:
    """The docstring under every field of TrainConfig, read from the class source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(TrainConfig)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    helps = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            helps[node.target.id] = " ".join(str(nxt.value.value).split())
    return helps


def scalar_type(annotation) -> type:
    """int for `int`, `int | None` and so on; the type a CLI flag parses its value to."""
    args = [a for a in getattr(annotation, "__args__", (annotation,)) if a is not type(None)]
    return args[0] if args else str


def _coerce(name: str, value: Any, annotation) -> Any:
    """Accept what YAML and the CLI give (e.g. '1e-3' as a string) and check the type."""
    kind = scalar_type(annotation)
    if value is None:
        if type(None) in getattr(annotation, "__args__", ()):
            return None
        raise UserError(f"{name} must not be empty")
    if kind is dict:
        if not isinstance(value, dict):
            raise UserError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"{name} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, float)):
            raise UserError(f"{name} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise UserError(f"{name} must be an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise UserError(f"{name} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{name} must be a number, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise UserError(f"{name} must be a finite number, got {value!r}")
        return number
    if not isinstance(value, str):
        raise UserError(f"{name} must be a string, got {value!r}")
    return value


def _positive(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise UserError(f"{name} must be a positive integer, got {getattr(cfg, name)!r}")


def _non_negative(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise UserError(f"{name} must not be negative, got {getattr(cfg, name)!r}")


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """TrainConfig fields from a YAML file; its `model:` mapping holds model-config overrides."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read config file {path}: {getattr(err, 'strerror', None) or err}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if values is None:
        raise UserError(f"config file {path} is empty: give a mapping of field names to values, or leave --config out")
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of field names to values")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    model = values.pop("model", None)
    if isinstance(model, str):
        values["model_type"] = model
    elif isinstance(model, dict):
        values["model_overrides"] = {**values.get("model_overrides", {}), **model}
    elif model is not None:
        raise UserError(f"config file {path}: 'model' must be a mapping of model-config fields")
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise UserError(f"config file {path}: unknown key(s) {', '.join(unknown)}")
    return values
