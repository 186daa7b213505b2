"""Where a run keeps its files: every file and folder name of a run directory, in one place.

    <run>/
        train_config.json         the resolved configuration (bdh train writes it first)
        metrics.jsonl             one JSON record per logged step (train loss, lr, validation)
        latest                    names the newest checkpoint, e.g. "checkpoints/step-0000500"
        best                      names the checkpoint of the best validation loss
        checkpoints/step-XXXXXXX/
            config.json           {"model_type": ..., config fields}   (bdh.checkpoint)
            model.safetensors     the weights                          (bdh.checkpoint)
            tokenizer.json (+ tokenizer_config.json)                   (bdh.data.tokenizers)
            optimizer.safetensors, stream_state.safetensors, trainer_state.json  (bdh.train.checkpoint)

A checkpoint directory is any directory with config.json and model.safetensors (`bdh.save_model`
writes one); a run directory stands for its newest good checkpoint wherever a checkpoint is asked
for (resolve_checkpoint): `latest`, or, when that one is missing or fails its checksums, the newest
older one that passes, with a one-line warning naming the step that was lost. Every directory bdh
writes here carries bdh.fileio.OUTPUT_MARKER (a checkpoint's with its manifest of sizes and
sha256s). This module knows names and paths, never a model class.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from bdh.data.tokenizers import TOKENIZER_FILE, ByteTokenizer, load_tokenizer
from bdh.errors import UserError
from bdh.fileio import (append_jsonl, atomic_write_bytes, check_files, foreign_files, read_json, read_jsonl, read_marker,
                        rewrite_jsonl, sha256_file, write_json)

# a checkpoint directory
MODEL_CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STREAM_FILE = "stream_state.safetensors"
# a run directory
TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
LATEST_FILE = "latest"
BEST_FILE = "best"
CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


class RunDir:
    """The files of one training run (see the module docstring for the layout)."""

    # files that mark a directory as holding a run (refused as --out unless resuming or overwriting)
    MARKERS = (LATEST_FILE, CHECKPOINTS_DIR, METRICS_FILE, TRAIN_CONFIG_FILE)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> "RunDir":
        """The run a checkpoint directory belongs to (itself when it is not under checkpoints/)."""
        checkpoint = Path(checkpoint)
        return cls(checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS_DIR else checkpoint)

    # paths
    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def train_config_file(self) -> Path:
        return self.path / TRAIN_CONFIG_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def step_dir(self, step: int) -> Path:
        return self.checkpoints_dir / step_dir_name(step)

    def holds_run(self) -> bool:
        return any((self.path / name).exists() for name in self.MARKERS)

    def same_as(self, other: "RunDir") -> bool:
        return self.path.resolve() == other.path.resolve()

    # checkpoints
    def checkpoint_steps(self) -> list[int]:
        folder = self.checkpoints_dir
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name)))

    def latest(self) -> Path | None:
        """The checkpoint `latest` names, or None before the first one."""
        pointer = self.path / LATEST_FILE
        return self.path / pointer.read_text().strip() if pointer.is_file() else None

    def point_latest(self, step: int) -> None:
        atomic_write_bytes(self.path / LATEST_FILE, f"{CHECKPOINTS_DIR}/{step_dir_name(step)}\n".encode())

    def point_best(self, step: int) -> None:
        atomic_write_bytes(self.path / BEST_FILE, f"{CHECKPOINTS_DIR}/{step_dir_name(step)}\n".encode())

    def prune(self, keep: int, best_step: int | None) -> None:
        """Delete all but the newest `keep` checkpoints and the best one, and leftovers of failed saves;
        only checkpoints bdh marked as its own and that hold nothing else are deleted."""
        steps = self.checkpoint_steps()
        keep_steps = set(steps[-keep:]) | ({best_step} if best_step is not None else set())
        for step in steps:
            if step not in keep_steps:
                _remove_if_ours(self.step_dir(step))
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Temporary directories of checkpoint saves that a kill interrupted (bdh.fileio.output_directory)."""
        if self.checkpoints_dir.is_dir():
            for pattern in (".step-*.tmp", ".step-*.trash"):
                for leftover in self.checkpoints_dir.glob(pattern):
                    shutil.rmtree(leftover, ignore_errors=True)

    def clear(self) -> None:
        """Remove what a previous run wrote (and only that) from the directory: files bdh names, and
        the checkpoints bdh marked; anything else stays where it is."""
        for step in self.checkpoint_steps():
            _remove_if_ours(self.step_dir(step))
        self._remove_leftovers()
        for name in (LATEST_FILE, METRICS_FILE, TRAIN_CONFIG_FILE, BEST_FILE):
            path = self.path / name
            if path.is_file():
                path.unlink()
        if self.checkpoints_dir.is_dir() and not any(self.checkpoints_dir.iterdir()):
            self.checkpoints_dir.rmdir()

    def good_checkpoint(self) -> Path:
        """The checkpoint `latest` names if it is whole, else the newest older one that is, with a
        one-line warning on stderr naming the step that was lost."""
        latest = self.latest()
        latest_step = _step_of(latest) if latest is not None else None
        candidates = [latest] if latest is not None else []
        candidates += [self.step_dir(s) for s in reversed(self.checkpoint_steps())
                       if latest_step is None or s < latest_step]
        first_problem = None
        for candidate in candidates:
            missing = [n for n in (MODEL_CONFIG_FILE, WEIGHTS_FILE) if not (candidate / n).is_file()]
            problem = f"{missing[0]} is missing" if missing else checkpoint_problem(candidate)
            if problem is None:
                if first_problem is not None and latest is not None:
                    _warn(f"bdh: warning: the newest checkpoint {latest} is unusable ({first_problem}); "
                               f"using step {_step_of(candidate)} instead: step {latest_step} was lost")
                return candidate
            first_problem = first_problem or problem
        if latest is not None:
            raise UserError(f"no usable checkpoint in {self.path}: the newest, {latest}, is unusable ({first_problem}) "
                            "and no older one passes its checks")
        raise UserError(f"no checkpoint in {self.path} yet")

    # records
    def append_metrics(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics_file, record)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_file)

    def rewrite_metrics(self, records: list[dict[str, Any]]) -> None:
        rewrite_jsonl(self.metrics_file, records)

    def write_train_config(self, resolved: dict[str, Any]) -> None:
        write_json(self.train_config_file, resolved)

    def read_train_config(self) -> dict[str, Any]:
        return read_json(self.train_config_file)


def resolve_checkpoint(path: str | Path) -> Path:
    """A whole checkpoint: the directory itself, or a run directory's newest good checkpoint
    (RunDir.good_checkpoint). A damaged checkpoint is refused, never loaded."""
    path = Path(path)
    if (path / MODEL_CONFIG_FILE).is_file():
        problem = checkpoint_problem(path)
        if problem is not None:
            raise UserError(f"checkpoint {path} is damaged: {problem}")
        return path
    run = RunDir(path)
    if (path / LATEST_FILE).is_file() or run.checkpoint_steps():
        return run.good_checkpoint()
    if not path.exists():
        raise UserError(f"no checkpoint at {path}: the path does not exist")
    raise UserError(f"no checkpoint at {path}: expected {MODEL_CONFIG_FILE} and {WEIGHTS_FILE} "
                    f"(or a run directory with '{LATEST_FILE}')")


_VERIFIED: set[tuple] = set()  # checkpoints whose checksums passed, with the sizes and times of their files


def checkpoint_problem(directory: Path) -> str | None:
    """What makes a checkpoint directory unusable (missing files, sizes or sha256s that differ from
    its manifest or trainer_state.json), or None. Checksums are computed once per process for the
    same files (by size and modification time)."""
    directory = Path(directory)
    if not directory.is_dir():
        return "the directory is missing"
    stats = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.iterdir()) if p.is_file())
    key = (str(directory.resolve()), stats)
    if key in _VERIFIED:
        return None
    marker = read_marker(directory)
    checked: set[str] = set()  # files whose sha256 the manifest check compared already
    if marker is not None:
        problem = check_files(directory)
        if problem is not None:
            return problem
        checked = set(marker.get("files") or {})
    state_file = directory / TRAINER_STATE_FILE
    if state_file.is_file():
        try:
            files = json.loads(state_file.read_text(encoding="utf-8")).get("files") or {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            return f"{TRAINER_STATE_FILE} is unreadable"
        for name, digest in files.items():
            if not (directory / name).is_file():
                return f"{name} is missing"
            if name not in checked and sha256_file(directory / name) != digest:
                return f"{name} is truncated or corrupt (sha256 mismatch)"
    _VERIFIED.add(key)
    return None


def _step_of(checkpoint: Path) -> int | None:
    match = _STEP_DIR.match(Path(checkpoint).name)
    return int(match.group(1)) if match else None


def _warn(line: str) -> None:
    print(line, file=sys.stderr)


def _remove_if_ours(directory: Path) -> None:
    """Delete a directory bdh wrote, unless someone put other files into it since."""
    if read_marker(directory) is not None and not foreign_files(directory):
        shutil.rmtree(directory, ignore_errors=True)


def read_trainer_state(path: str | Path) -> dict[str, Any] | None:
    """trainer_state.json of the checkpoint at path, or None for a bare model directory."""
    file = resolve_checkpoint(path) / TRAINER_STATE_FILE
    return read_json(file) if file.is_file() else None


def load_checkpoint_tokenizer(path: str | Path, vocab_size: int):
    """The tokenizer saved with the checkpoint at path (or in the directory given); without one, a
    model of 256 tokens is taken to read bytes."""
    directory = resolve_checkpoint(path)
    for place in (directory, Path(path)):
        if (place / TOKENIZER_FILE).is_file():
            return load_tokenizer(place)
    if vocab_size == 256:
        return ByteTokenizer()
    raise UserError(f"no {TOKENIZER_FILE} next to {directory}; the model has vocabulary {vocab_size}, so it cannot "
                    "be the byte tokenizer: save the tokenizer into the checkpoint directory")


def find_metrics(path: str | Path) -> Path | None:
    """metrics.jsonl of the run a checkpoint (or run directory) belongs to, or None."""
    path = Path(path)
    try:
        resolved = resolve_checkpoint(path)
    except UserError:  # no checkpoint there: nothing to find
        return None
    for run in (RunDir(path), RunDir(resolved), RunDir.of_checkpoint(resolved)):
        if run.metrics_file.is_file():
            return run.metrics_file
    return None
