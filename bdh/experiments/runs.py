"""One training run of an experiment: see how far an earlier attempt got, train the rest in a
child process that measures its own peak memory, and summarise the run's metrics.

Each run directory is a normal `bdh train` run directory (`bdh eval/generate/info --ckpt DIR`
work on it), so an experiment that was killed picks its runs up from their checkpoints:
a finished run is reused, an unfinished one resumed, one killed before its first checkpoint
started over. A directory holding a run with other settings is refused unless overwriting.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bdh import registry
from bdh.baselines import param_report
from bdh.data import check_outside_data, encode_prompt, hold_out
from bdh.errors import UserError
from bdh.fileio import claim_directory, read_json, read_marker, write_json
from bdh.precision import resolve_device
from bdh.rundir import RunDir, read_trainer_state
from bdh.train import checkpoint as ckpt_io
from bdh.train.args import TrainConfig
from bdh.train.distributed import DistEnv
from bdh.train.evaluate import check_eval_length, standard_error
from bdh.train.loop import (TrainingDiverged, TrainingInterrupted, build_model_config, check_model_fits, load_data,
                            make_batches, train)

# settings that may differ between attempts at the same run: where it is and how it is run;
# max_minutes is the time left of the budget, which shrinks from one attempt to the next
NOT_IDENTITY = ("out", "max_minutes", "device", "compile")


class RunFailed(Exception):
    """A training run ended without finishing: diverged, crashed or killed."""

    def __init__(self, name: str, status: str, message: str):
        self.name, self.status = name, status
        super().__init__(f"run {name} {status}: {message}")


@dataclass
class RunPlan:
    """One run of an experiment. cfg.out is its directory; cfg.max_minutes its whole time budget."""

    name: str
    cfg: TrainConfig
    model: Any = None  # the model config the run builds (set by the experiment's checks)

    @property
    def run_dir(self) -> Path:
        return self.cfg.out_dir

    @property
    def rundir(self) -> RunDir:
        return RunDir(self.cfg.out_dir)


@dataclass
class RunStatus:
    """What an earlier attempt left: nothing ("new"), a finished run, one to resume or to restart."""

    kind: str  # "new", "finished", "resume", "restart"
    step: int = 0
    elapsed_s: float = 0.0


# --------------------------------------------------------------------------------------------
# checks before anything is written

def preflight_data(cfg: TrainConfig, holdout: float = 0.0) -> int:
    """Load the corpus, build the tokenizer and check both splits are long enough (and, with
    holdout > 0, the two parts of the training split a search uses); the vocabulary size.

    The tokenized corpus lands in the token cache, so the training runs find it there.
    """
    _, tokenizer, tokens = load_data(cfg, None)
    if cfg.sample_tokens and cfg.task == "lm":
        encode_prompt(tokenizer, cfg.sample_prompt)
    check_eval_length(tokens.val, cfg.block_size)
    make_batches(cfg, tokens.train, DistEnv(), torch.device("cpu"))
    if holdout:
        held = hold_out(tokens, holdout)
        check_eval_length(held.val, cfg.block_size, f"the held-out {holdout:g} of the training split")
        make_batches(cfg, held.train, DistEnv(), torch.device("cpu"))
    return tokenizer.vocab_size


def check_model(cfg: TrainConfig, vocab_size: int):
    """The model config the run will build, checked against the device and batch settings."""
    config = build_model_config(cfg, vocab_size)
    check_model_fits(cfg, config, resolve_device(cfg.device))
    return config


def check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("the figures need matplotlib: pip install 'bdh[analysis]'") from None


def check_experiment_dir(directory: Path, manifest: str, data: str) -> None:
    """--out must be new, empty, or an experiment bdh wrote (its marker, or its `manifest` file from
    before markers existed), and outside the text data: files bdh did not write are never written among."""
    if directory.exists() and not directory.is_dir():
        raise UserError(f"--out {directory} exists and is not a directory")
    check_outside_data(data, directory)
    if (directory.is_dir() and any(directory.iterdir()) and read_marker(directory) is None
            and not (directory / manifest).is_file()):
        raise UserError(f"--out {directory} holds files bdh did not write: choose another --out "
                        "(an empty or new directory, or an earlier experiment's)")


def claim_experiment_dir(directory: Path) -> None:
    """Mark --out as bdh's (after check_experiment_dir passed)."""
    claim_directory(directory, kind="experiment", adopt=True)


def inspect_run(plan: RunPlan, overwrite: bool) -> RunStatus:
    """How far an earlier attempt at this run got; refuses a directory holding a different run."""
    rundir = plan.rundir
    out = rundir.path
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    if not rundir.holds_run():
        return RunStatus("new")
    if overwrite:
        return RunStatus("restart")
    saved = _saved_train_config(rundir)
    differ = differences(saved, plan.cfg.to_dict())
    if differ:
        raise UserError(f"{out} holds a run with other settings ({differ}): pass --overwrite to start over, "
                        "or choose another --out")
    if rundir.latest() is None:
        # killed before its first checkpoint: nothing to resume
        return RunStatus("restart")
    state = ckpt_io.load_checkpoint(out).state
    status = RunStatus("resume", step=int(state["step"]), elapsed_s=float(state["elapsed_s"]))
    if is_finished(plan.cfg, status.step, status.elapsed_s, float(state.get("step_s", status.elapsed_s))):
        status.kind = "finished"
    return status


def is_finished(cfg: TrainConfig, step: int, elapsed_s: float, step_s: float) -> bool:
    """Whether a run that stopped there has met its budget (steps, wall-clock minutes or training seconds)."""
    if step >= cfg.max_iters:
        return True
    if cfg.train_seconds is not None and step_s >= cfg.train_seconds:
        return True
    return cfg.max_minutes is not None and elapsed_s >= cfg.max_minutes * 60


def _saved_train_config(rundir: RunDir) -> dict[str, Any]:
    path = rundir.train_config_file
    if not path.is_file():
        raise UserError(f"{path.parent} holds a run whose {path.name} is missing: pass --overwrite to start over, "
                        "or choose another --out")
    saved = rundir.read_train_config()
    train = saved.get("train") if isinstance(saved, dict) else None
    if not isinstance(train, dict):
        raise UserError(f"{path} holds no 'train' mapping: pass --overwrite to start over, or choose another --out")
    return train


def differences(saved: dict[str, Any], planned: dict[str, Any]) -> str:
    """'key: saved != planned' for the settings that make a run what it is; '' when none differ."""
    planned = json.loads(json.dumps(planned))
    keys = sorted(k for k in set(saved) | set(planned) if k not in NOT_IDENTITY and saved.get(k) != planned.get(k))
    return ", ".join(f"{k}: {saved.get(k)!r} != {planned.get(k)!r}" for k in keys)


# --------------------------------------------------------------------------------------------
# training

def train_run(plan: RunPlan, status: RunStatus) -> dict[str, Any]:
    """Train (or resume) the run in a child process; its report (peak memory, step, ...)."""
    cfg = plan.cfg
    if cfg.max_minutes is not None:
        # the budget is for the whole run: a resumed attempt gets what the earlier ones left
        left = cfg.max_minutes - status.elapsed_s / 60 if status.kind == "resume" else cfg.max_minutes
        cfg = dataclasses.replace(cfg, max_minutes=left)
    spec = {"config": cfg.to_dict(), "resume": str(plan.run_dir) if status.kind == "resume" else None,
            "overwrite": status.kind == "restart"}
    report = run_in_child(spec)
    if report.get("status") != "ok":
        raise RunFailed(plan.name, report.get("status", "failed"), report.get("message", "no report"))
    return report


def run_in_child(spec: dict[str, Any]) -> dict[str, Any]:
    """`execute(spec)` in a fresh Python process (`python -m bdh.experiments.worker`).

    A fresh process per run keeps the runs apart and lets each measure its own peak memory.
    Ctrl-C reaches the child too: it stops after its current step and saves a checkpoint.
    """
    with tempfile.TemporaryDirectory(prefix="bdh-run-") as tmp:
        spec_path, report_path = Path(tmp) / "spec.json", Path(tmp) / "report.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "bdh.experiments.worker", str(spec_path), str(report_path)]
        proc = subprocess.Popen(cmd, env=env)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            # the child got the same Ctrl-C: let it save its checkpoint before giving up
            proc.wait()
            raise
        if report_path.is_file():
            report = json.loads(report_path.read_text())
            if report.get("status") == "interrupted":
                raise KeyboardInterrupt
            return report
        why = f"killed by signal {-code} (out of memory?)" if code < 0 else f"exit status {code}"
        return {"status": "crashed", "message": f"the training process ended without a report ({why})"}


def execute(spec: dict[str, Any]) -> dict[str, Any]:
    """Train as the spec says, in this process; a report instead of an exception."""
    try:
        cfg = TrainConfig.from_dict(spec["config"])
        result = train(cfg, resume=spec.get("resume"), overwrite=bool(spec.get("overwrite")))
    except TrainingDiverged as err:
        return {"status": "diverged", "message": str(err)}
    except (TrainingInterrupted, KeyboardInterrupt) as err:
        return {"status": "interrupted", "message": str(err) or "interrupted"}
    except UserError as err:
        return {"status": "error", "message": str(err)}
    return {"status": "ok", "step": result.step, "tokens_seen": result.tokens_seen, "stopped": result.stopped}


def peak_memory() -> dict[str, float | None]:
    """This process's peak resident memory and (if CUDA was used) peak CUDA allocation, in MiB.

    VmHWM, not ru_maxrss: after fork + exec, Linux's ru_maxrss still counts the parent's pages.
    """
    rss = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 1024
    except OSError:
        import resource

        scale = 2**20 if sys.platform == "darwin" else 2**10  # bytes on macOS, KiB elsewhere
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.max_memory_allocated() / 2**20
    return {"peak_rss_mib": rss, "peak_cuda_mib": cuda}


# --------------------------------------------------------------------------------------------
# results

def summarize(run_dir: Path) -> dict[str, Any]:
    """Parameters, validation curve, final and best loss, throughput and time of a run directory."""
    rundir = RunDir(run_dir)
    resolved = rundir.read_train_config()
    records = rundir.read_metrics()
    state = read_trainer_state(run_dir) or {}
    curve = [{"step": r["step"], "tokens": r["tokens"], "elapsed_s": r["elapsed_s"], "val_loss": r["val_loss"],
              "val_bpb": r["val_bpb"], **({"step_s": r["step_s"]} if "step_s" in r else {})}
             for r in records if "val_loss" in r]
    if not curve:
        raise UserError(f"{rundir.metrics_file} holds no validation loss")
    final, best = curve[-1], min(curve, key=lambda p: p["val_loss"])
    last = [r for r in records if "val_loss" in r][-1]
    model = dict(resolved["model"])
    cfg = resolved["train"]
    tokens_per_s = throughput(records)
    tokens_seen = int(state.get("tokens_seen", final["tokens"]))
    return {
        "model_type": model["model_type"], "model": model, **param_counts(model),
        "steps": int(state.get("step", final["step"])), "tokens_seen": tokens_seen,
        "stopped": stop_reason(cfg, int(state.get("step", final["step"]))),
        "final_val_loss": final["val_loss"], "final_val_bpb": final["val_bpb"],
        "final_val_se": last.get("val_loss_se"), "final_val_batches": last.get("val_batches"),
        "best_val_loss": best["val_loss"], "best_val_bpb": best["val_bpb"], "best_step": best["step"],
        "tokens_per_s": tokens_per_s, "train_time_s": float(state.get("elapsed_s", final["elapsed_s"])),
        # seconds of training steps alone (validation and checkpoints left out): the clock of the
        # trainer (runs of older versions: from the throughput logged)
        "step_time_s": float(state["step_s"]) if "step_s" in state else
        (tokens_seen / tokens_per_s if tokens_per_s else None),
        "curve": curve,
    }


def stop_reason(cfg: dict[str, Any], step: int) -> str:
    if step >= cfg["max_iters"]:
        return "max_iters"
    return "train_seconds" if cfg.get("train_seconds") is not None else "max_minutes"


def final_batch_losses(run_dir: Path) -> list[float] | None:
    """Per-batch losses of a run's last evaluation (None if it did not record them)."""
    records = [r for r in RunDir(run_dir).read_metrics() if "val_loss" in r]
    return records[-1].get("val_batch_losses") if records else None


def paired_difference(run_a: Path, run_b: Path) -> dict[str, Any] | None:
    """Final loss of b minus a on the same validation batches: mean, standard error of the per-batch
    differences, and the batch count; None unless both scored the same number of batches.

    Both runs of an experiment are scored on the same windows, so the difference is far more
    precise than either loss alone (what the batches share cancels).
    """
    a, b = final_batch_losses(run_a), final_batch_losses(run_b)
    if not a or not b or len(a) != len(b):
        return None
    diff = [y - x for x, y in zip(a, b)]
    return {"mean": sum(diff) / len(diff), "se": standard_error(diff), "batches": len(diff)}


def param_counts(model: dict[str, Any]) -> dict[str, int]:
    """Parameters with and without embeddings of a model config dict (with its model_type),
    counted on the model itself, built on the meta device (no memory, no initialisation)."""
    values = {k: v for k, v in model.items() if k != "model_type"}
    model_class = registry.get(model["model_type"])
    with torch.device("meta"):
        report = param_report(model_class(model_class.config_class.from_dict(values)))
    return {"params": report["params"], "params_without_embeddings": report["params_without_embeddings"]}


def throughput(records: list[dict[str, Any]]) -> float | None:
    """Training tokens per second over the logged windows (validation and checkpoint time left out)."""
    tokens = seconds = 0.0
    last = 0
    for r in records:
        rate = r.get("tokens_per_s")
        if rate and rate > 0 and r["tokens"] > last:
            tokens += r["tokens"] - last
            seconds += (r["tokens"] - last) / rate
        last = r.get("tokens", last)
    return tokens / seconds if seconds > 0 else None


# --------------------------------------------------------------------------------------------
# the experiment's record

class Manifest:
    """A JSON record of an experiment, rewritten atomically after every run."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"runs": {}}
        if path.is_file():
            try:
                saved = read_json(path)
            except UserError:
                saved = None  # a manifest that cannot be read only loses its memory figures
            if isinstance(saved, dict) and isinstance(saved.get("runs"), dict):
                self.data = saved

    @property
    def runs(self) -> dict[str, Any]:
        return self.data["runs"]

    def save(self) -> None:
        write_json(self.path, self.data)


def record_run(manifest: Manifest, name: str, run_dir: Path, report: dict[str, Any] | None,
               **extra: Any) -> dict[str, Any]:
    """Summarise a finished run into the manifest, keeping the largest peak memory of its attempts."""
    earlier = manifest.runs.get(name) or {}
    summary = {**extra, **summarize(run_dir)}
    for key in ("peak_rss_mib", "peak_cuda_mib"):
        values = [v for v in (earlier.get(key), (report or {}).get(key)) if v is not None]
        summary[key] = max(values) if values else None
    summary["run_dir"] = run_dir.name
    summary["metrics"] = f"{run_dir.name}/{RunDir(run_dir).metrics_file.name}"
    summary["status"] = "done"
    manifest.runs[name] = summary
    manifest.save()
    return summary


def provenance(data: dict[str, Any], default_command: str) -> list[str]:
    """The command and the machine, as the first lines of a report."""
    m = data["machine"]
    gpu = f", {m['cuda']}" if m.get("cuda") else ""
    return [f"Command: `{data['command'] or default_command}`  ",
            f"Finished {data['finished']} on {m['platform']}, {m.get('cpu_model', m['processor'])}, {m['cpus']} CPUs, "
            f"torch {m['torch']} "
            f"({m['torch_threads']} threads){gpu}."]


def describe_training(s: dict[str, Any]) -> str:
    """One sentence of the shared training settings (a TrainConfig dict), for the reports."""
    step = f"{s['batch_size']} sequences of {s['block_size']} tokens per step"
    if s["grad_accum"] > 1:
        step += f" (x {s['grad_accum']} accumulated)"
    budget = f"{s['max_iters']:,} steps"
    if s["max_minutes"] is not None:
        budget += f" or {s['max_minutes']:g} minutes per run, whichever came first"
    stream = ", stream mode (state carried between batches)" if s["stream"] else ""
    return (f"data `{s['data']}` (validation share {s['val_fraction']:g}), tokenizer `{s['tokenizer']}`, {step}, "
            f"{budget}; AdamW lr {s['lr']:g} ({s['warmup_iters']} warm-up steps, {s['decay']} decay to "
            f"{s['min_lr']:g}), weight decay {s['weight_decay']:g}, gradient clip {s['grad_clip']:g}, seed "
            f"{s['seed']}{stream}; validation every {s['eval_interval']} steps on {s['eval_iters']} batches, "
            f"the final one on {final_batches(s)}.")


def final_batches(s: dict[str, Any]) -> str:
    """How much of the validation split the final evaluation of a run (a TrainConfig dict) scores."""
    n = s.get("final_eval_iters")
    n = s["eval_iters"] if n is None else n
    return "the whole validation split" if n == 0 else f"{n} batches"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what platform knows of it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def fmt(value: Any, spec: str = ",.0f", missing: str = "n/a") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)
