"""Training checkpoints: the model directory plus everything needed to continue exactly.

In a step directory of the run (bdh.rundir has the layout and every name):
    config.json, model.safetensors        the model (bdh.checkpoint.write_model)
    tokenizer.json (+ tokenizer_config.json)
    optimizer.safetensors                 AdamW moments as named tensors, the rest as JSON metadata
    stream_state.safetensors              stream mode only: the carried state of every process
    trainer_state.json                    step, tokens, schedule, data position, RNG states, sha256s

A checkpoint is written into a temporary directory, every file and the directory fsynced, renamed
into place (bdh.fileio.output_directory, which also writes its manifest), and only then is `latest`
replaced atomically, then old checkpoints are pruned: a crash or power loss at any instant leaves
the previous checkpoint whole and `latest` pointing at a complete one. Nothing is pickled.
"""

from __future__ import annotations

import base64
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from bdh.checkpoint import write_model
from bdh.errors import UserError
from bdh.fileio import load_tensors, output_directory, read_json, save_tensors, sha256_file, write_json
from bdh.rundir import (MODEL_CONFIG_FILE, OPTIMIZER_FILE, STREAM_FILE, TRAINER_STATE_FILE, WEIGHTS_FILE, RunDir,
                        resolve_checkpoint)

FORMAT = "bdh-trainer-state"
VERSION = 1
_REQUIRED = ("step", "tokens_seen", "elapsed_s", "world_size", "stream", "ranks", "train_config", "files")


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

def save_checkpoint(run: RunDir, step: int, model, tokenizer, optimizer, param_names: list[str],
                    trainer_state: dict[str, Any], stream_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the run's step directory atomically, then point `latest` at it."""
    final = run.step_dir(step)
    with output_directory(final, kind="checkpoint", replace=True) as tmp:
        write_model(model, tmp)
        tokenizer.save(tmp)
        save_optimizer(optimizer, param_names, tmp / OPTIMIZER_FILE)
        if stream_state is not None:
            save_tensors(stream_state, tmp / STREAM_FILE)
        files = [WEIGHTS_FILE, OPTIMIZER_FILE] + ([STREAM_FILE] if stream_state is not None else [])
        state = {"format": FORMAT, "version": VERSION, **trainer_state,
                 "files": {f: sha256_file(tmp / f) for f in files}}
        write_json(tmp / TRAINER_STATE_FILE, state)
    run.point_latest(step)
    return final


@dataclass
class TrainerCheckpoint:
    path: Path  # the step directory
    state: dict[str, Any]  # trainer_state.json

    @property
    def run(self) -> RunDir:
        """The run this checkpoint belongs to."""
        return RunDir.of_checkpoint(self.path)


def load_checkpoint(path: str | Path) -> TrainerCheckpoint:
    """Find and check a training checkpoint (a step directory, or a run directory: its newest good one)."""
    directory = resolve_checkpoint(path)
    state_path = directory / TRAINER_STATE_FILE
    if not state_path.is_file():
        raise UserError(f"{directory} is not a training checkpoint: {TRAINER_STATE_FILE} is missing")
    state = read_json(state_path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{state_path} is not a bdh trainer state")
    if state.get("version") != VERSION:
        raise UserError(f"{state_path} has format version {state.get('version')!r}; this bdh reads {VERSION}")
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise UserError(f"{state_path} is incomplete: missing {', '.join(missing)}")
    for name in (MODEL_CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise UserError(f"checkpoint file {directory / name} is missing")
    # resolve_checkpoint checked every file against the manifest and state["files"] (sha256s)
    return TrainerCheckpoint(path=directory, state=state)
