"""The training loop: prepare everything (checking it all before touching the run directory),
then step, log, evaluate, checkpoint, and sample at the end.

Two batch modes:
- random (default): independent windows, `model(x, y, return_state=False)`;
- stream: row i of each batch continues row i of the previous one and the model's state is
  carried between steps, detached (truncated backprop through time), and dropped when the lanes
  wrap around. The carried state is saved with every checkpoint, so a resumed run continues the
  same streams from the same state.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bdh import registry
from bdh.checkpoint import read_model_config
from bdh.data import (RandomBatches, StreamBatches, check_outside_data, encode_prompt, load_corpus, make_tokenizer,
                      tokenize_corpus)
from bdh.data.batches import eval_batches, hold_out
from bdh.data.parallel import is_parallel_spec, load_parallel, tag, translation_corpus, translation_tokens
from bdh.errors import UserError
from bdh.fileio import OUTPUT_MARKER, claim_directory, load_tensors, read_marker
from bdh.generate import generate
from bdh.interp.sparsity import sparsity_probe
from bdh.precision import resolve_device
from bdh.rundir import (MODEL_CONFIG_FILE, STREAM_FILE, TRAINER_STATE_FILE, WEIGHTS_FILE, RunDir,
                        load_checkpoint_tokenizer, resolve_checkpoint)
from bdh.train import checkpoint as ckpt_io
from bdh.train import distributed
from bdh.train.args import TrainConfig
from bdh.train.evaluate import EvalResult, check_eval_length, evaluate, evaluate_tagged, tokens_per_byte
from bdh.train.optim import lr_at, lr_on_clock, make_optimizer, set_lr


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: the run stops, the bad step is not saved."""


class TrainingInterrupted(Exception):
    """Ctrl-C: a checkpoint of the last completed step was saved (when there was one)."""

    def __init__(self, step: int, checkpoint: Path | None, out_dir: Path):
        self.step, self.checkpoint, self.out_dir = step, checkpoint, out_dir
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no step completed, nothing saved"
        super().__init__(f"interrupted at step {step}: {where}; continue with: bdh train --resume {out_dir}")


@dataclass
class Progress:
    """Counters that a checkpoint carries over to the resumed run."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    step_s: float = 0.0  # seconds spent in training steps (the clock of TrainConfig.train_seconds)
    warm_s: float | None = None  # step_s when the warm-up ended (train_seconds' decay starts there)
    best_val_loss: float | None = None
    best_step: int | None = None
    best_ckpt_step: int | None = None
    best_ckpt_val: float | None = None
    last_val: dict | None = None  # {"step", "loss", "bpb", "ppl"} of the latest evaluation


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    tokens_seen: int
    stopped: str  # "max_iters", "max_minutes" or "train_seconds"
    val: EvalResult | None = None
    checkpoint: Path | None = None
    sample: str | None = None


@dataclass
class Run:
    """Everything prepared for training, before anything is written."""

    cfg: TrainConfig
    env: distributed.DistEnv
    device: torch.device
    rundir: RunDir
    corpus: Any
    tokenizer: Any
    tokens: Any
    token_byte_ratio: float
    model: torch.nn.Module  # the plain model (checkpoints, evaluation, sampling)
    train_model: torch.nn.Module  # DDP and/or compiled wrapper used for the training steps
    optimizer: torch.optim.Optimizer
    param_names: list[str]
    batches: Any
    scaler: Any
    progress: Progress = field(default_factory=Progress)
    carried: Any = None  # stream mode: the detached state of the last step
    resumed_from: ckpt_io.TrainerCheckpoint | None = None
    overwrite: bool = False

    @property
    def out_dir(self) -> Path:
        return self.rundir.path

    @property
    def tokens_per_step(self) -> int:
        c = self.cfg
        return c.batch_size * c.block_size * c.grad_accum * self.env.world_size


# --------------------------------------------------------------------------------------------
# entry point

def train(cfg: TrainConfig, resume: str | Path | None = None, overwrite: bool = False,
          env: distributed.DistEnv | None = None, init_method: str = "env://") -> TrainResult:
    """Train as `cfg` says; resume from a checkpoint or run directory when given."""
    env = env or distributed.from_environ()
    device = resolve_device(cfg.device, env.local_rank)
    distributed.init(env, device, init_method)
    run, finished = None, False
    try:
        run = prepare(cfg, resume, overwrite, env, device)
        result = Trainer(run).fit()
        finished = True
        return result
    finally:
        if run is not None:
            # DDP's reducer must be gone before its process group is destroyed, or exit can hang
            run.train_model = None
        distributed.shutdown(env, finished)


# --------------------------------------------------------------------------------------------
# preparation: every check happens here, before the run directory is touched

def prepare(cfg: TrainConfig, resume, overwrite: bool, env, device) -> Run:
    resumed = ckpt_io.load_checkpoint(resume) if resume is not None else None
    rundir = RunDir(cfg.out_dir)
    check_outside_data(cfg.data, cfg.out_dir)
    check_out_dir(rundir, resumed, overwrite)
    if resumed is not None:
        check_resumable(cfg, resumed, env)
    base = resolve_checkpoint(cfg.init_from) if cfg.init_from else None
    model_config = build_model_config(cfg, vocab_size=None, base=base)  # early check of preset and overrides
    corpus, tokenizer, tokens = load_data(cfg, resumed.path if resumed is not None else base)
    model_config = build_model_config(cfg, tokenizer.vocab_size, base=base)
    check_model_fits(cfg, model_config, device)
    if cfg.sample_tokens and cfg.task == "lm":
        encode_prompt(tokenizer, cfg.sample_prompt)
    tokens, token_byte_ratio = split_tokens(cfg, corpus, tokens)
    batches = make_batches(cfg, tokens.train, env, device)

    # the same initial weights on every process; then each its own dropout stream
    torch.manual_seed(cfg.seed)
    model = registry.get(cfg.model_type)(model_config)
    torch.manual_seed(cfg.seed + env.rank)
    if resumed is not None:
        load_resumed_weights(model, model_config, cfg, resumed)
    elif base is not None:
        model.load_weights(load_tensors(base / WEIGHTS_FILE), source=str(base / WEIGHTS_FILE))
    else:
        model.fit_corpus(tokens.train)  # corpus statistics a family keeps in buffers (BriLLM's bigrams)
    model.to(device)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device.type)
    names = param_names(model, optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=model_config.compute_dtype == "float16")
    run = Run(cfg=cfg, env=env, device=device, rundir=rundir, corpus=corpus, tokenizer=tokenizer, tokens=tokens,
              token_byte_ratio=token_byte_ratio, model=model, train_model=model,
              optimizer=optimizer, param_names=names, batches=batches, scaler=scaler, resumed_from=resumed,
              overwrite=overwrite)
    if resumed is not None:
        restore(run, resumed)
    run.train_model = distributed.wrap(model, env, device)
    if cfg.compile:
        run.train_model = torch.compile(run.train_model)
    return run


def split_tokens(cfg: TrainConfig, corpus, tokens):
    """(tokens to train and validate on, tokens per byte of the validated text).

    With cfg.holdout_fraction the end of the training split replaces the validation split
    (bdh.data.hold_out); its tokens per byte are those of the whole training text.
    """
    if cfg.holdout_fraction:
        ratio = tokens_per_byte(len(tokens.train), corpus.train)
        tokens = hold_out(tokens, cfg.holdout_fraction)
        check_eval_length(tokens.val, cfg.block_size, "the held-out end of the training split")
        return tokens, ratio
    check_eval_length(tokens.val, cfg.block_size)
    return tokens, tokens_per_byte(len(tokens.val), corpus.val)


def check_out_dir(rundir: RunDir, resumed, overwrite: bool) -> None:
    out_dir = rundir.path
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory")
    ours = read_marker(out_dir) is not None
    if not rundir.holds_run():
        if not ours and out_dir.is_dir() and any(out_dir.iterdir()):
            raise UserError(f"--out {out_dir} holds files bdh did not write: bdh does not write among them; "
                            "choose another --out (an empty or new directory)")
        return
    if overwrite:
        if not ours:
            raise UserError(f"--out {out_dir} holds a run without bdh's marker ({OUTPUT_MARKER}): --overwrite "
                            "replaces only what bdh marked as its own; choose another --out or remove it yourself")
        return
    if resumed is None:
        raise UserError(f"{out_dir} already holds a run: pass --resume to continue it, --overwrite to start "
                        "over, or choose another --out")
    if not resumed.run.same_as(rundir):
        raise UserError(f"{out_dir} already holds another run: resume into its own directory "
                        f"({resumed.run.path}), pass --overwrite, or choose another --out")


def check_resumable(cfg: TrainConfig, resumed, env) -> None:
    state = resumed.state
    where = resumed.path / TRAINER_STATE_FILE
    if state["world_size"] != env.world_size:
        raise UserError(f"{where} was written by {state['world_size']} process(es); resume it with the same "
                        f"number (this run has {env.world_size})")
    if bool(state["stream"]) != cfg.stream:
        flag = "--stream" if state["stream"] else "--no-stream"
        raise UserError(f"{where} comes from a run with stream={state['stream']}: pass {flag} to resume it")
    if cfg.max_iters <= state["step"]:
        raise UserError(f"the checkpoint is already at step {state['step']} and max_iters is {cfg.max_iters}: "
                        "pass a larger --max-iters to train further")
    if len(state["ranks"]) != env.world_size:
        raise UserError(f"{where} is inconsistent: {len(state['ranks'])} process states for world size "
                        f"{state['world_size']}")


def load_data(cfg: TrainConfig, checkpoint: Path | None):
    """(corpus, tokenizer, tokens) of the run; the tokenizer is the checkpoint's when resuming or
    fine-tuning, else made as --tokenizer says (BPE trained on the training split)."""
    if cfg.task == "translate":
        if not is_parallel_spec(cfg.data):
            raise UserError(f"--task translate needs pairs, not {cfg.data!r}: pass --data bible:en-es, a .tsv of pairs "
                            "whose header row names the two languages, or en=FILE,es=FILE")
        pairs = load_parallel(cfg.data, val_fraction=cfg.val_fraction)
        corpus = translation_corpus(pairs)
    else:
        corpus = load_corpus(cfg.data, val_fraction=cfg.val_fraction)
    if checkpoint is not None:
        tokenizer = load_checkpoint_tokenizer(checkpoint, read_model_config(checkpoint)[1].vocab_size)
    else:
        tokenizer = make_tokenizer(cfg.tokenizer, corpus.train)
    tokens = translation_tokens(pairs, tokenizer) if cfg.task == "translate" else tokenize_corpus(corpus, tokenizer)
    return corpus, tokenizer, tokens


def build_model_config(cfg: TrainConfig, vocab_size: int | None, base: Path | None = None):
    """The preset (or the config of the checkpoint fine-tuned from), then the `model:` overrides, then the
    tokenizer's vocabulary size and --dtype."""
    if base is not None:
        return _base_model_config(cfg, base)
    config_cls = registry.get(cfg.model_type).config_class
    overrides = dict(cfg.model_overrides)
    if vocab_size is not None:
        given = overrides.get("vocab_size")
        if isinstance(given, int) and given < vocab_size:
            raise UserError(f"model vocab_size {given} is smaller than the tokenizer's {vocab_size}")
        overrides.setdefault("vocab_size", vocab_size)
    if cfg.dtype is not None and "compute_dtype" in {f for f in config_cls.__dataclass_fields__}:
        overrides["compute_dtype"] = cfg.dtype
    try:
        return config_cls.from_name(cfg.preset, **overrides)
    except TypeError as err:
        raise UserError(f"bad model override: {err}") from None


def _base_model_config(cfg: TrainConfig, base: Path):
    """The config of the checkpoint a fine-tuning run starts from, with the run's overrides and --dtype."""
    model_class, config = read_model_config(base)
    if model_class.model_type != cfg.model_type:
        raise UserError(f"--init-from {base} holds a {model_class.model_type} model: pass --model {model_class.model_type}")
    values = {**config.to_dict(), **cfg.model_overrides}
    if cfg.dtype is not None and "compute_dtype" in values:
        values["compute_dtype"] = cfg.dtype
    try:
        return model_class.config_class.from_dict(values)
    except TypeError as err:
        raise UserError(f"bad model override: {err}") from None


def check_model_fits(cfg: TrainConfig, config, device: torch.device) -> None:
    """What the model family says of itself (bdh.protocol) against the run's settings."""
    if config.compute_dtype == "float16" and device.type != "cuda":
        raise UserError("float16 needs a CUDA device; on the CPU use --dtype bfloat16 or float32")
    if cfg.stream and not config.carries_state:
        hint = (" (the gpt model needs a carried, bounded cache: --model-arg pos_encoding=alibi "
                "--model-arg kv_cache_size=256)" if cfg.model_type == "gpt" else "")
        raise UserError(f"stream mode needs a model whose state can be carried across batches; this "
                        f"{cfg.model_type} model's cannot{hint}")
    params = config.num_params()
    need, have = 16 * params, _memory_bytes(device)  # fp32 weights, gradients and AdamW's two moments
    if have is not None and need > have:
        raise UserError(f"the model has {params:,} parameters: its weights, gradients and optimizer state alone need "
                        f"{need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB of {device.type} memory here; "
                        "choose a smaller preset or smaller --model-arg sizes")
    limit = config.max_positions
    if limit is not None and cfg.block_size > limit:
        raise UserError(f"block_size {cfg.block_size} exceeds the {cfg.model_type} model's {limit} positions: "
                        "lower --block-size or raise the model's block_size")


def _memory_bytes(device: torch.device) -> int | None:
    """Total memory of the device (physical memory for the CPU), or None where unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[1]
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError, RuntimeError):
        pass
    return None


def make_batches(cfg: TrainConfig, tokens, env, device):
    if cfg.stream:
        return StreamBatches(tokens, cfg.batch_size, cfg.block_size, rank=env.rank, world_size=env.world_size,
                             device=device)
    return RandomBatches(tokens, cfg.batch_size, cfg.block_size, seed=cfg.seed + env.rank, device=device)


def param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order (its state is saved by index)."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def load_resumed_weights(model, model_config, cfg: TrainConfig, resumed) -> None:
    model_class, config = read_model_config(resumed.path)
    if model_class.model_type != cfg.model_type:
        raise UserError(f"{resumed.path} holds a {model_class.model_type} model, not a {cfg.model_type} one")
    saved, ours = (json.loads(json.dumps(c.to_dict())) for c in (config, model_config))
    differ = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
    if differ:
        detail = ", ".join(f"{k}: {saved.get(k)!r} != {ours.get(k)!r}" for k in differ)
        raise UserError(f"{resumed.path / MODEL_CONFIG_FILE} does not match the model of this run ({detail})")
    path = resumed.path / WEIGHTS_FILE
    model.load_weights(load_tensors(path), source=str(path))


def restore(run: Run, resumed) -> None:
    """Optimizer, counters, data position, RNG states and carried state from a checkpoint."""
    state, env = resumed.state, run.env
    ckpt_io.load_optimizer(run.optimizer, run.param_names, resumed.path / ckpt_io.OPTIMIZER_FILE)
    p = run.progress
    p.step, p.tokens_seen, p.elapsed_s = int(state["step"]), int(state["tokens_seen"]), float(state["elapsed_s"])
    p.step_s, p.warm_s = float(state.get("step_s", p.elapsed_s)), state.get("warm_s")  # older checkpoints: wall time
    p.best_val_loss, p.best_step = state.get("best_val_loss"), state.get("best_step")
    p.best_ckpt_step, p.best_ckpt_val = state.get("best_ckpt_step"), state.get("best_ckpt_val")
    p.last_val = state.get("last_val")
    mine = state["ranks"][env.rank]
    try:
        run.batches.load_state_dict(ckpt_io.from_json_safe(mine["data"]))
        ckpt_io.set_rng_state(mine["rng"])
        if state.get("scaler") and run.scaler.is_enabled():
            run.scaler.load_state_dict(state["scaler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"{resumed.path / TRAINER_STATE_FILE} is corrupt: cannot restore the data position or "
                        f"random state ({type(err).__name__}: {err})") from None
    if run.cfg.stream:
        run.carried = load_stream_state(run, resumed)


def load_stream_state(run: Run, resumed):
    path = resumed.path / STREAM_FILE
    if not path.is_file():
        return None
    tensors = load_tensors(path, device=run.device)
    B, rank = run.cfg.batch_size, run.env.rank
    rows = tensors["pos"].shape[0] if "pos" in tensors else -1
    if rows != B * run.env.world_size:
        # another batch size: the stream lanes restart anyway, and so does the state
        return None
    state_type = type(run.model.init_state(1, device="meta"))
    mine = {k: v[rank * B:(rank + 1) * B] for k, v in tensors.items()}
    try:
        return state_type.from_state_dict(mine)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None


# --------------------------------------------------------------------------------------------
# one optimizer step (also used by the distributed test)

def forward_backward(model, batches, grad_accum: int = 1, stream: bool = False, state=None, scaler=None):
    """Accumulate the gradients of grad_accum micro-batches: (summed mean loss, carried state).

    Under DDP only the last micro-batch synchronises gradients.
    """
    loss_sum = 0.0
    for micro in range(grad_accum):
        batch = next(batches)
        if stream:
            x, y, reset = batch
            state = None if reset else state
        else:
            x, y = batch
        with distributed.no_sync(model, micro < grad_accum - 1):
            out = model(x, y, state=state) if stream else model(x, y, return_state=False)
            loss = out.loss / grad_accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if stream:
            state = out.state.detach()
        loss_sum = loss_sum + loss.detach()
    return loss_sum, state


# --------------------------------------------------------------------------------------------
# the loop

class Trainer:
    def __init__(self, run: Run):
        self.run = run
        self.cfg = run.cfg
        self.main = run.env.is_main
        self.stop_requested = False
        self.boundary: dict[str, Any] = {}
        self.last_ckpt_step: int | None = None
        self.last_ckpt_path: Path | None = None
        resumed = run.resumed_from
        if resumed is not None and resumed.run.same_as(run.rundir):
            self.last_ckpt_step, self.last_ckpt_path = run.progress.step, resumed.path

    # output
    def say(self, text: str) -> None:
        if self.main:
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()

    def fit(self) -> TrainResult:
        run, cfg, p = self.run, self.cfg, self.run.progress
        if self.main:
            self.init_out_dir()
        self.snapshot()
        self.t0 = time.monotonic()
        self.elapsed0 = p.elapsed_s
        self.window = (time.monotonic(), p.tokens_seen)
        bar = tqdm(total=cfg.max_iters, initial=p.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not self.main, file=sys.stderr, mininterval=0.5)
        # a resumed time budget may be spent already (every process has the checkpoint's clock); later,
        # only the clock agreed in each step's collective decides, so that every process stops together
        stopped = "train_seconds" if self.budget_spent(p.step_s) else "max_iters"
        try:
            with self.sigint_flag():
                while p.step < cfg.max_iters and stopped == "max_iters":
                    loss, lr, stop = self.step()
                    self.after_step(loss, lr, bar, last=stop is not None or p.step >= cfg.max_iters)
                    if stop:
                        stopped = stop
                        break
        except KeyboardInterrupt:
            stopped = "interrupted"
        finally:
            bar.close()
        if stopped == "interrupted":
            path = self.save() if p.step > 0 else None
            raise TrainingInterrupted(p.step, path, run.out_dir)
        return self.finish(stopped)

    def step(self) -> tuple[float, float, str | None]:
        """One optimizer step: (mean loss, its learning rate, why training stops after it or None)."""
        run, cfg, p = self.run, self.cfg, self.run.progress
        start = time.monotonic()
        run.optimizer.zero_grad(set_to_none=True)
        loss, state = forward_backward(run.train_model, run.batches, cfg.grad_accum, cfg.stream, run.carried,
                                       run.scaler if run.scaler.is_enabled() else None)
        local = float(loss)
        over_time = cfg.max_minutes is not None and time.monotonic() - self.t0 > cfg.max_minutes * 60
        # one collective per step: the mean loss, whether any process saw a bad loss or wants to stop,
        # and the mean clock of training steps (this step's gradients included), which sets the learning rate
        total, bad, stop, clock = distributed.all_reduce_sum(
            [local if math.isfinite(local) else 0.0, float(not math.isfinite(local)),
             float(over_time or self.stop_requested), p.step_s + time.monotonic() - start], run.env, run.device)
        clock /= run.env.world_size
        if bad:
            self.diverged(local if not math.isfinite(local) else float("nan"))
        if p.step == cfg.warmup_iters:
            p.warm_s = clock  # the decay on the clock starts here
        lr = self.lr_now(clock)
        set_lr(run.optimizer, lr)
        if cfg.grad_clip > 0:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.carried = state
        p.step += 1
        p.tokens_seen += run.tokens_per_step
        p.step_s += time.monotonic() - start  # this process's own clock; the collective above averages them
        self.snapshot()
        why = ("interrupted" if self.stop_requested else "max_minutes") if stop else None
        return total / run.env.world_size, lr, why or ("train_seconds" if self.budget_spent(clock) else None)

    def lr_now(self, clock: float) -> float:
        """The learning rate of the step about to be taken: by its step number, or, with a time
        budget, by the clock of training steps after the warm-up."""
        cfg, p = self.cfg, self.run.progress
        if cfg.train_seconds is None:
            return lr_at(p.step, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.schedule_iters, cfg.decay)
        warm = clock if p.warm_s is None else p.warm_s
        return lr_on_clock(p.step, clock, warm, cfg.train_seconds, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.decay)

    def budget_spent(self, clock: float) -> bool:
        return self.cfg.train_seconds is not None and clock >= self.cfg.train_seconds

    def snapshot(self) -> None:
        """Data position and RNG states at the boundary between two steps (what a checkpoint holds)."""
        self.boundary = {"data": self.run.batches.state_dict(), "torch": torch.get_rng_state()}
        if self.run.device.type == "cuda":
            self.boundary["cuda"] = torch.cuda.get_rng_state_all()

    def diverged(self, loss: float) -> None:
        where = self.last_ckpt_path or self.run.rundir.latest()
        keep = f"the last good checkpoint is {where}" if where else "no checkpoint was written yet"
        raise TrainingDiverged(f"loss became {loss} at step {self.run.progress.step + 1}: training stopped "
                               f"without saving that step; {keep} (try a lower --lr or --grad-clip)")

    def after_step(self, loss: float, lr: float, bar, last: bool) -> None:
        """Progress bar, then validation, metrics line and checkpoint when they are due.

        The last step is always validated and logged (an interrupted run is not: it only saves).
        """
        cfg, p = self.cfg, self.run.progress
        now = time.monotonic()
        tok_s = (p.tokens_seen - self.window[1]) / max(now - self.window[0], 1e-9)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}", refresh=False)
        bar.update(1)
        last = last and not self.stop_requested
        val = None
        if last:
            val = self.validate(final=True)
        elif cfg.eval_interval and p.step % cfg.eval_interval == 0:
            val = self.validate()
        if p.step % cfg.log_interval == 0 or val is not None or last:
            self.log({"train_loss": loss, "lr": lr, "tokens_per_s": tok_s}, val, final=last)
            self.window = (time.monotonic(), p.tokens_seen)
        if cfg.ckpt_interval and p.step % cfg.ckpt_interval == 0:
            self.save()
            self.window = (time.monotonic(), p.tokens_seen)

    def elapsed(self) -> float:
        return self.elapsed0 + time.monotonic() - self.t0

    def validate(self, final: bool = False) -> EvalResult | None:
        """Validation loss on rank 0 (the others go on and wait at the next collective); the
        evaluation after the last step scores cfg.final_eval_iters batches."""
        run, p = self.run, self.run.progress
        if not self.main:
            return None
        batches = self.cfg.final_eval_batches if final else self.cfg.eval_iters
        if run.tokens.val_tagged is not None:
            result = evaluate_tagged(run.model, run.tokens.val_tagged, self.cfg.batch_size, self.cfg.block_size,
                                     batches, run.device, run.token_byte_ratio)
        else:
            result = evaluate(run.model, run.tokens.val, self.cfg.batch_size, self.cfg.block_size, batches,
                              run.device, run.token_byte_ratio)
        p.last_val = {"step": p.step, **result.to_dict()}
        if p.best_val_loss is None or result.loss < p.best_val_loss:
            p.best_val_loss, p.best_step = result.loss, p.step
        targets = "".join(f", {name} target loss {t['loss']:.4f}" for name, t in result.targets.items()
                          if t["loss"] is not None)
        self.say(f"step {p.step}: val loss {result.loss:.4f}, {result.bpb:.4f} bits/byte, ppl {result.ppl:.2f}{targets}")
        return result

    def log(self, train: dict[str, float], val: EvalResult | None, final: bool = False) -> None:
        if not self.main:
            return
        p = self.run.progress
        record = {"step": p.step, "tokens": p.tokens_seen, **train, "elapsed_s": round(self.elapsed(), 3),
                  "step_s": round(p.step_s, 3)}
        if val is not None:
            record.update(val.metrics("val_"), val_loss_se=val.se, val_batches=val.batches)
            if final:
                record["val_batch_losses"] = val.batch_losses  # for paired comparisons of runs
            record.update(self.sparsity())
        self.run.rundir.append_metrics(record)

    def sparsity(self) -> dict[str, float]:
        """Fraction of non-zero x and y on one validation batch (BDH only), to plot its evolution."""
        model = distributed.unwrap(self.run.model)
        if not {"x", "y"} <= set(model.activation_sites):
            return {}
        x, _ = next(iter(eval_batches(self.run.tokens.val, self.cfg.batch_size, self.cfg.block_size, 1,
                                      device=self.run.device)))
        return sparsity_probe(model, x)

    # checkpoints
    def save(self) -> Path | None:
        """All processes hand their data position, RNG and carried state to rank 0, which writes."""
        run, p = self.run, self.run.progress
        if self.last_ckpt_step == p.step:
            return self.last_ckpt_path
        mine = {"data": ckpt_io.to_json_safe(self.boundary["data"]), "rng": self.rng_payload()}
        ranks = distributed.gather_objects(mine, run.env)
        stream = self.gather_stream_state()
        if not self.main:
            self.last_ckpt_step = p.step
            return None
        val = p.last_val if p.last_val and p.last_val.get("step") == p.step else None
        if val is not None and (p.best_ckpt_val is None or val["loss"] < p.best_ckpt_val):
            p.best_ckpt_step, p.best_ckpt_val = p.step, val["loss"]
        path = ckpt_io.save_checkpoint(run.rundir, p.step, run.model, run.tokenizer, run.optimizer,
                                       run.param_names, self.trainer_state(ranks, val), stream)
        if p.best_ckpt_step == p.step:
            run.rundir.point_best(p.step)
        run.rundir.prune(self.cfg.keep_checkpoints, p.best_ckpt_step)
        self.last_ckpt_step, self.last_ckpt_path = p.step, path
        return path

    def rng_payload(self) -> dict[str, Any]:
        rng = ckpt_io.rng_state()
        rng["torch"] = ckpt_io.to_json_safe(self.boundary["torch"])
        if "cuda" in self.boundary:
            rng["cuda"] = [ckpt_io.to_json_safe(s) for s in self.boundary["cuda"]]
        return rng

    def gather_stream_state(self) -> dict[str, torch.Tensor] | None:
        run = self.run
        if not self.cfg.stream:
            return None
        have = float(run.carried is not None)
        if distributed.all_reduce_sum([have], run.env, run.device)[0] < run.env.world_size:
            return None
        tensors = run.carried.state_dict()
        gathered = {key: distributed.gather_tensor(value, run.env) for key, value in sorted(tensors.items())}
        return gathered if self.main else None

    def trainer_state(self, ranks: list, val: dict | None) -> dict[str, Any]:
        run, cfg, p = self.run, self.cfg, self.run.progress
        return {
            "step": p.step, "tokens_seen": p.tokens_seen, "elapsed_s": round(self.elapsed(), 3),
            "step_s": round(p.step_s, 3), "warm_s": p.warm_s,
            "best_val_loss": p.best_val_loss, "best_step": p.best_step,
            "best_ckpt_step": p.best_ckpt_step, "best_ckpt_val": p.best_ckpt_val,
            "val": val, "last_val": p.last_val,
            "schedule": {"lr": cfg.lr, "min_lr": cfg.min_lr, "warmup_iters": cfg.warmup_iters,
                         "decay": cfg.decay, "decay_iters": cfg.schedule_iters,
                         "train_seconds": cfg.train_seconds, "next_lr": self.lr_now(p.step_s)},
            "world_size": run.env.world_size, "stream": cfg.stream, "model_type": cfg.model_type,
            "ranks": ranks, "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
            "train_config": cfg.to_dict(),
            "tokenizer": {"kind": run.tokenizer.kind, "vocab_size": run.tokenizer.vocab_size},
            "data": self.data_summary(),
        }

    def data_summary(self) -> dict[str, Any]:
        run = self.run
        return {"name": run.corpus.name, "train_tokens": int(len(run.tokens.train)),
                "val_tokens": int(len(run.tokens.val)), "val_tokens_per_byte": run.token_byte_ratio}

    def init_out_dir(self) -> None:
        """Rank 0, after every check passed: clear an overwritten run, carry metrics over, save the config."""
        run = self.run
        resumed = run.resumed_from
        same_dir = resumed is not None and resumed.run.same_as(run.rundir)
        if run.overwrite and not same_dir:
            run.rundir.clear()
        claim_directory(run.out_dir, kind="run", adopt=same_dir)  # a run of before the marker: resumed in place
        if resumed is not None:
            records = resumed.run.read_metrics()
            run.rundir.rewrite_metrics([r for r in records if r.get("step", 0) <= run.progress.step])
        resolved = self.resolved_config()
        run.rundir.write_train_config(resolved)
        self.say("bdh train: resolved config\n" + json.dumps(resolved, indent=2, sort_keys=True))
        if resumed is not None:
            self.say(f"resuming from {resumed.path} at step {run.progress.step}")

    def resolved_config(self) -> dict[str, Any]:
        run = self.run
        model = run.model
        return {
            "train": run.cfg.to_dict(),
            "model": {"model_type": run.cfg.model_type, **model.config.to_dict()},
            "parameters": sum(q.numel() for q in model.parameters()),
            "world_size": run.env.world_size, "device": str(run.device),
            "tokenizer": {"kind": run.tokenizer.kind, "vocab_size": run.tokenizer.vocab_size},
            "data": self.data_summary(),
            "tokens_per_step": run.tokens_per_step,
        }

    # the end
    def finish(self, stopped: str) -> TrainResult:
        run, p = self.run, self.run.progress
        val = None
        if self.main:
            if p.last_val and p.last_val.get("step") == p.step:
                val = EvalResult(**{k: p.last_val[k] for k in ("loss", "bpb", "ppl", "tokens", "targets") if k in p.last_val},
                                 se=p.last_val.get("se"), batches=p.last_val.get("batches", 0))
            else:
                val = self.validate(final=True)
                self.log({}, val, final=True)
        path = self.save()
        sample = self.sample() if self.main and self.cfg.sample_tokens else None
        if self.main:
            how = "time budget reached" if stopped in ("max_minutes", "train_seconds") else "done"
            self.say(f"{how}: step {p.step}, {p.tokens_seen:,} tokens, val loss {val.loss:.4f} "
                     f"({val.bpb:.4f} bits/byte); checkpoint {path}")
        return TrainResult(out_dir=run.out_dir, step=p.step, tokens_seen=p.tokens_seen, stopped=stopped, val=val,
                           checkpoint=path, sample=sample)

    def sample(self) -> str:
        run, cfg = self.run, self.cfg
        if cfg.task == "translate":
            return self.sample_translation()
        ids = encode_prompt(run.tokenizer, cfg.sample_prompt)
        n = cfg.sample_tokens
        limit = run.model.max_positions
        if limit is not None:
            n = max(0, min(n, limit - len(ids)))
        generator = torch.Generator(device=run.device).manual_seed(cfg.seed)
        idx = torch.tensor([ids], dtype=torch.long, device=run.device)
        out = generate(run.model, idx, n, temperature=0.8, top_k=200, generator=generator)
        text = run.tokenizer.decode(out[0, len(ids):].tolist())
        self.say(f"--- sample ({n} tokens) ---\n{cfg.sample_prompt}{text}\n---")
        return text

    def sample_translation(self) -> str:
        """The first validation pair translated greedily in each direction."""
        from bdh.train.translation import translate

        run = self.run
        tagged = run.tokens.val_tagged
        lines = []
        for name in tagged.directions:
            src, tgt = name.split("->")
            source = first_source(run.corpus.val, src, tgt)
            if source is None:
                continue
            out = translate(run.model, run.tokenizer, [source], src, tgt, max_new_tokens=self.cfg.sample_tokens)[0]
            lines.append(f"[{name}] {source}\n   -> {out}")
        text = "\n".join(lines)
        self.say(f"--- translations of validation sentences (greedy) ---\n{text}\n---")
        return text

    @contextmanager
    def sigint_flag(self):
        """The first Ctrl-C asks to stop after the current step; a second one stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self.stop_requested = True
            signal.signal(signal.SIGINT, previous)
            self.say("stopping after this step (Ctrl-C again to stop at once)")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def first_source(stream: str, src: str, tgt: str) -> str | None:
    """The source sentence of the first pair of a tagged stream that reads from src to tgt."""
    lines = stream.split("\n")
    for prompt, target in zip(lines[::2], lines[1::2]):
        if prompt.startswith(tag(src) + " ") and target.startswith(tag(tgt) + " "):
            return prompt[len(tag(src)) + 1:]
    return None
