"""Saving and loading models: a Hugging Face style directory (config.json + model.safetensors).

Everything is written under a temporary name and renamed into place, so a kill at any instant
leaves the previous file whole. Nothing is ever unpickled: tensors come from safetensors, the
rest from JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bdh.errors import UserError
from bdh.fileio import atomic_write_bytes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"missing file {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: Path, device=None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"missing file {path}")
    try:
        return load_file(str(path), device=str(device) if device is not None else "cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is truncated or corrupt ({str(err).splitlines()[0]})") from None


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `final` in two renames.

    Between the two renames the old directory survives as `<final>.old`, which
    resolve_checkpoint falls back to, so no instant leaves nothing loadable.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_named_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy tensors into model by name, with an error naming any unexpected, misshapen or missing one."""
    expected = model.state_dict()
    for key, value in tensors.items():
        if key not in expected:
            raise UserError(f"{source}: unexpected tensor {key!r}")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise UserError(f"{source}: tensor {key!r} has shape {tuple(value.shape)}, "
                            f"the model expects {tuple(expected[key].shape)}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise UserError(f"{source}: missing tensor(s) {', '.join(missing)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})


# model registry: model_type in config.json -> (config class, model class)
def model_classes(model_type: str):
    if model_type == "bdh":
        from bdh.config import BDHConfig
        from bdh.model import BDH

        return BDHConfig, BDH
    if model_type == "gpt":
        from bdh.baselines.gpt import GPT, GPTConfig

        return GPTConfig, GPT
    raise UserError(f"unknown model_type {model_type!r} in {CONFIG_FILE}")


def model_type_of(model) -> str:
    return getattr(model, "model_type", "bdh")


def write_model(model, directory: Path) -> None:
    """config.json and model.safetensors into an existing directory."""
    write_json(directory / CONFIG_FILE, {"model_type": model_type_of(model), **model.config.to_dict()})
    save_tensors(dict(model.state_dict()), directory / WEIGHTS_FILE, metadata={"format": "pt"})


def save_model(model, directory: str | Path) -> None:
    """Save a model as a directory, replacing any previous one atomically."""
    with atomic_directory(Path(directory)) as tmp:
        write_model(model, tmp)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, a run directory (its `latest`), or the survivor of a swap."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        target = path / latest.read_text().strip()
        if (target / CONFIG_FILE).is_file():
            return target
    old = path.with_name(path.name + ".old")
    if (old / CONFIG_FILE).is_file():
        return old
    if not path.exists():
        raise UserError(f"no checkpoint at {path}: the path does not exist")
    raise UserError(f"no checkpoint at {path}: expected {CONFIG_FILE} and {WEIGHTS_FILE} (or a run directory with 'latest')")


def load_model(path: str | Path, device=None):
    """Rebuild the model saved at path (checkpoint or run directory), in eval mode."""
    directory = resolve_checkpoint(path)
    values = read_json(directory / CONFIG_FILE)
    if not isinstance(values, dict):
        raise UserError(f"{directory / CONFIG_FILE} must hold a JSON object")
    config_cls, model_cls = model_classes(values.pop("model_type", "bdh"))
    try:
        config = config_cls.from_dict(values)
    except UserError as err:
        raise UserError(f"{directory / CONFIG_FILE}: {err}") from None
    model = model_cls(config)
    model.load_weights(load_tensors(directory / WEIGHTS_FILE), source=str(directory / WEIGHTS_FILE))
    return model.to(device if device is not None else "cpu").eval()
