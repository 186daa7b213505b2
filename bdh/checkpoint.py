"""Saving and loading models: a Hugging Face style directory (config.json + model.safetensors).

config.json holds {"model_type": ..., config fields}; the model class comes from bdh.registry,
the file primitives from bdh.fileio, the file names from bdh.rundir. Nothing is ever unpickled.
"""

from __future__ import annotations

from pathlib import Path

from bdh import registry
from bdh.errors import UserError
from bdh.fileio import load_tensors, output_directory, read_json, save_tensors, write_json
from bdh.rundir import MODEL_CONFIG_FILE, WEIGHTS_FILE, resolve_checkpoint


def write_model(model, directory: Path) -> None:
    """config.json and model.safetensors into an existing directory."""
    write_json(directory / MODEL_CONFIG_FILE, {"model_type": model.model_type, **model.config.to_dict()})
    save_tensors(dict(model.state_dict()), directory / WEIGHTS_FILE, metadata={"format": "pt"})


def save_model(model, directory: str | Path, overwrite: bool = True) -> None:
    """Save a model as a directory, built beside it and moved into place.

    An earlier model that bdh saved there is replaced (unless overwrite=False); a directory holding
    anything bdh did not write is refused with a UserError and left as it is.
    """
    with output_directory(Path(directory), kind="model", replace=overwrite, flag="overwrite=True") as tmp:
        write_model(model, tmp)


def read_model_config(directory: Path):
    """(model class, config) from a checkpoint directory's config.json."""
    path = directory / MODEL_CONFIG_FILE
    values = read_json(path)
    if not isinstance(values, dict):
        raise UserError(f"{path} must hold a JSON object")
    try:
        model_class = registry.get(values.pop("model_type", "bdh"))
        return model_class, model_class.config_class.from_dict(values)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None


def load_model(path: str | Path, device=None):
    """Rebuild the model saved at path (checkpoint or run directory), in eval mode."""
    directory = resolve_checkpoint(path)
    model_class, config = read_model_config(directory)
    model = model_class(config)
    model.load_weights(load_tensors(directory / WEIGHTS_FILE), source=str(directory / WEIGHTS_FILE))
    return model.to(device if device is not None else "cpu").eval()
