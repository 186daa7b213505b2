"""Training checkpoints: the model directory plus everything needed to continue exactly.

    <out>/checkpoints/step-0000500/
        config.json, model.safetensors        the model (bdh.checkpoint.write_model)
        tokenizer.json (+ tokenizer_config.json)
        optimizer.safetensors                 AdamW moments as named tensors, the rest as JSON metadata
        stream_state.safetensors              stream mode only: the carried state of every process
        trainer_state.json                    step, tokens, schedule, data position, RNG states, sha256s
    <out>/latest                              names the newest step directory

A checkpoint is written into a temporary directory and renamed into place, then `latest` is
replaced atomically, then old checkpoints are pruned: a crash at any instant leaves the previous
checkpoint whole and `latest` pointing at a complete one. Nothing is pickled.
"""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from bdh.checkpoint import (CONFIG_FILE, WEIGHTS_FILE, atomic_directory, atomic_write_bytes, load_tensors, read_json,
                            resolve_checkpoint, save_tensors, write_json, write_model)
from bdh.errors import UserError
from bdh.fileio import sha256_file

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STREAM_FILE = "stream_state.safetensors"
LATEST_FILE = "latest"
BEST_FILE = "best"
CHECKPOINTS_DIR = "checkpoints"
FORMAT = "bdh-trainer-state"
VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_REQUIRED = ("step", "tokens_seen", "elapsed_s", "world_size", "stream", "ranks", "train_config", "files")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


# JSON-safe encoding of tensors and arrays (RNG and iterator states) -------------------------

def to_json_safe(obj: Any) -> Any:
    """Tensors and numpy arrays become {"__tensor__": {dtype, shape, base64 data}}; tuples lists."""
    if isinstance(obj, torch.Tensor):
        array = obj.detach().cpu().contiguous().numpy()
        return {"__tensor__": {"dtype": str(array.dtype), "shape": list(array.shape),
                               "data": base64.b64encode(array.tobytes()).decode("ascii")}}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": to_json_safe(torch.from_numpy(np.ascontiguousarray(obj)))["__tensor__"]}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_safe(v) for v in obj]
    return obj


def from_json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return torch.from_numpy(_array(obj["__tensor__"]).copy())
        if set(obj) == {"__ndarray__"}:
            return _array(obj["__ndarray__"]).copy()
        return {k: from_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json_safe(v) for v in obj]
    return obj


def _array(spec: dict) -> np.ndarray:
    data = base64.b64decode(spec["data"])
    return np.frombuffer(data, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"])


# random number generators -------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """Every RNG the training step can touch (dropout uses torch's), as JSON."""
    state = {
        "torch": to_json_safe(torch.get_rng_state()),
        "python": to_json_safe(random.getstate()),
        "numpy": to_json_safe(np.random.get_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [to_json_safe(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(from_json_safe(state["torch"]))
    version, internal, gauss = from_json_safe(state["python"])
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(from_json_safe(state["numpy"])))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [from_json_safe(s) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# optimizer ----------------------------------------------------------------------------------

def optimizer_tensors(optimizer: torch.optim.Optimizer, param_names: list[str]) -> tuple[dict, dict]:
    """AdamW's state_dict as named tensors ("state.<i>.<key>") plus JSON metadata for the rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in sd["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    meta = {"param_groups": json.dumps(to_json_safe(sd["param_groups"])), "scalars": json.dumps(scalars),
            "param_names": json.dumps(param_names)}
    return tensors, meta


def save_optimizer(optimizer: torch.optim.Optimizer, param_names: list[str], path: Path) -> None:
    tensors, meta = optimizer_tensors(optimizer, param_names)
    save_tensors(tensors, path, metadata=meta)


def load_optimizer(optimizer: torch.optim.Optimizer, param_names: list[str], path: Path) -> None:
    """Restore what save_optimizer wrote; a file for other parameters is refused, naming it."""
    tensors = load_tensors(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        groups = json.loads(meta["param_groups"])
        scalars = json.loads(meta["scalars"])
        saved_names = json.loads(meta["param_names"])
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise UserError(f"{path} is truncated or corrupt (bad metadata: {err})") from None
    if saved_names != param_names:
        raise UserError(f"{path} holds the optimizer state of other parameters than this model's")
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, values in scalars.items():
        state.setdefault(int(index), {}).update(values)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"{path} does not fit this optimizer: {str(err).splitlines()[0]}") from None


# whole checkpoints ---------------------------------------------------------------------------

def save_checkpoint(out_dir: Path, step: int, model, tokenizer, optimizer, param_names: list[str],
                    trainer_state: dict[str, Any], stream_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write <out>/checkpoints/step-XXXXXXX atomically, then point <out>/latest at it."""
    name = step_dir_name(step)
    final = out_dir / CHECKPOINTS_DIR / name
    with atomic_directory(final) as tmp:
        write_model(model, tmp)
        tokenizer.save(tmp)
        save_optimizer(optimizer, param_names, tmp / OPTIMIZER_FILE)
        if stream_state is not None:
            save_tensors(stream_state, tmp / STREAM_FILE)
        files = [WEIGHTS_FILE, OPTIMIZER_FILE] + ([STREAM_FILE] if stream_state is not None else [])
        state = {"format": FORMAT, "version": VERSION, **trainer_state,
                 "files": {f: sha256_file(tmp / f) for f in files}}
        write_json(tmp / STATE_FILE, state)
    atomic_write_bytes(out_dir / LATEST_FILE, f"{CHECKPOINTS_DIR}/{name}\n".encode())
    return final


def mark_best(out_dir: Path, step: int) -> None:
    atomic_write_bytes(out_dir / BEST_FILE, f"{CHECKPOINTS_DIR}/{step_dir_name(step)}\n".encode())


def checkpoint_steps(out_dir: Path) -> list[int]:
    folder = out_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    steps = [int(m.group(1)) for p in folder.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(steps)


def prune(out_dir: Path, keep: int, best_step: int | None) -> None:
    """Delete all but the newest `keep` checkpoints and the best one, and leftovers of failed saves."""
    folder = out_dir / CHECKPOINTS_DIR
    steps = checkpoint_steps(out_dir)
    keep_steps = set(steps[-keep:]) | ({best_step} if best_step is not None else set())
    for step in steps:
        if step not in keep_steps:
            shutil.rmtree(folder / step_dir_name(step), ignore_errors=True)
    for leftover in folder.glob(".step-*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


@dataclass
class TrainerCheckpoint:
    path: Path  # the step directory
    state: dict[str, Any]  # trainer_state.json

    @property
    def run_dir(self) -> Path:
        """The run directory holding this checkpoint (its `checkpoints/` parent's parent)."""
        if self.path.parent.name == CHECKPOINTS_DIR:
            return self.path.parent.parent
        return self.path

    def file(self, name: str) -> Path:
        return self.path / name


def load_checkpoint(path: str | Path) -> TrainerCheckpoint:
    """Find and check a training checkpoint (a step directory or a run directory)."""
    directory = resolve_checkpoint(path)
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        raise UserError(f"{directory} is not a training checkpoint: {STATE_FILE} is missing")
    state = read_json(state_path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{state_path} is not a bdh trainer state")
    if state.get("version") != VERSION:
        raise UserError(f"{state_path} has format version {state.get('version')!r}; this bdh reads {VERSION}")
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise UserError(f"{state_path} is incomplete: missing {', '.join(missing)}")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise UserError(f"checkpoint file {directory / name} is missing")
    for name, digest in state["files"].items():
        file = directory / name
        if not file.is_file():
            raise UserError(f"checkpoint file {file} is missing")
        if sha256_file(file) != digest:
            raise UserError(f"checkpoint file {file} is truncated or corrupt (sha256 mismatch)")
    return TrainerCheckpoint(path=directory, state=state)


def read_trainer_state(path: str | Path) -> dict[str, Any] | None:
    """trainer_state.json of the checkpoint at path, or None for a bare model directory."""
    file = resolve_checkpoint(path) / STATE_FILE
    return read_json(file) if file.is_file() else None


# metrics ------------------------------------------------------------------------------------

def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # a line cut short by a crash: everything after it is unusable as well
            break
    return records


def rewrite_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())
