"""File primitives shared by checkpoints, runs and caches: atomic writes, JSON, tensors, checksums.

Everything is written under a temporary name, fsynced and renamed into place (the directory
fsynced after), so a kill or a power loss at any instant leaves the previous file whole. Every
directory bdh writes carries a marker (OUTPUT_MARKER) with its manifest; bdh replaces only what it
marked and never touches files it did not write. Nothing is ever unpickled: tensors come from safetensors, the
rest from JSON. This module knows no model class (bdh.checkpoint maps model types to classes).
"""

from __future__ import annotations

import hashlib
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


# where caches live unless a call names a directory: corpora, tokens, fused-layer plans
CACHE_ENV = "BDH_CACHE"


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """The cache directory: `cache_dir` if given, else $BDH_CACHE, else ~/.cache/bdh (created)."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "bdh"
    root = Path(cache_dir).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the cache directory {root} ({e.strerror}): "
            f"set {CACHE_ENV} to a writable directory"
        ) from None
    return root



@contextmanager
def _replacing(path: Path) -> Iterator[str]:
    """A temporary file beside path to fill; then it is fsynced and renamed over path, and the
    directory fsynced: readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace path's content with data, atomically and durably (see _replacing)."""
    with _replacing(path) as tmp:
        Path(tmp).write_bytes(data)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"missing file {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a line cut short by a crash ends the read."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # a line cut short by a crash: everything after it is unusable as well
            break
    return records


def rewrite_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    with _replacing(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def load_tensors(path: Path, device=None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"missing file {path}")
    try:
        return load_file(str(path), device=str(device) if device is not None else "cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is truncated or corrupt ({str(err).splitlines()[0]})") from None


# durability ---------------------------------------------------------------------------------

def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it, a new file) survive a power loss."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory: renames are as durable as it allows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under root, then every directory, the deepest first."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(folder))


# outputs: what bdh wrote carries a marker, and bdh replaces nothing else ------------------------

#: the file in every directory bdh writes: proof that bdh wrote it, and its manifest (name -> size, sha256)
OUTPUT_MARKER = ".bdh-output.json"
_WRITTEN_BY = "bdh"


def manifest_of(directory: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} of every file under directory (the marker excepted)."""
    out = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if name != OUTPUT_MARKER and name not in exclude:
            out[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def write_marker(directory: Path, kind: str, files: dict[str, dict[str, Any]] | None) -> None:
    """Mark directory as written by bdh; `files` (its manifest) is None for a directory that grows
    (a run, an experiment), whose files bdh knows by name."""
    write_json(directory / OUTPUT_MARKER, {"written_by": _WRITTEN_BY, "kind": kind, "files": files})
    fsync_dir(directory)


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The marker of a directory bdh wrote, or None (no marker, or not one of ours)."""
    path = Path(directory) / OUTPUT_MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) and marker.get("written_by") == _WRITTEN_BY else None


def check_files(directory: Path, checksums: bool = True) -> str | None:
    """What is wrong with a directory against its manifest (missing, resized or changed files), or
    None when it is whole. Sizes are always compared, sha256s when `checksums`."""
    marker = read_marker(directory)
    if marker is None:
        return f"{OUTPUT_MARKER} is missing or unreadable"
    files = marker.get("files")
    if not isinstance(files, dict):
        return None
    for name, want in files.items():
        path = Path(directory) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want.get("size"):
            return f"{name} is truncated or corrupt ({path.stat().st_size} bytes, expected {want.get('size')})"
        if checksums and sha256_file(path) != want.get("sha256"):
            return f"{name} is truncated or corrupt (sha256 mismatch)"
    return None


def foreign_files(directory: Path, marker: dict[str, Any] | None = None) -> list[str]:
    """Files in a bdh output directory that its manifest does not list: someone else put them there.
    marker: the directory's marker when the caller has read it already."""
    marker = marker if marker is not None else read_marker(directory) or {}
    listed = set(marker.get("files") or {}) | {OUTPUT_MARKER}
    return [p.relative_to(directory).as_posix() for p in sorted(Path(directory).rglob("*"))
            if not p.is_dir() and p.relative_to(directory).as_posix() not in listed]


def check_output_dir(final: Path, replace: bool, flag: str | None) -> bool:
    """Refuse (UserError) an output directory that bdh may not fill; True when it holds bdh output.

    Allowed: no such path, an empty directory, or a directory bdh marked as its own (then only
    with `replace`, and only if nothing foreign was put into it since). `flag` names the option
    that sets `replace` in the message.
    """
    final = Path(final)
    if not final.exists() and not final.is_symlink():
        return False
    if not final.is_dir():
        raise UserError(f"{final} exists and is not a directory: bdh does not replace it; choose another path")
    marker = read_marker(final)
    if marker is None:
        if not any(final.iterdir()):
            return False
        raise UserError(f"{final} exists and holds files bdh did not write ({OUTPUT_MARKER} is missing): "
                        "bdh does not replace them; choose another path or move them away")
    if not replace:
        how = f"pass {flag} to replace it" if flag else "remove it first"
        raise UserError(f"{final} holds earlier bdh output: {how}, or choose another path")
    foreign = foreign_files(final, marker) if marker.get("files") is not None else []
    if foreign:
        raise UserError(f"{final} holds bdh output but also {len(foreign)} file(s) bdh did not write (e.g. "
                        f"{foreign[0]}): bdh does not replace them; move them away or choose another path")
    return True


def _sibling(final: Path, suffix: str) -> Path:
    return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=suffix))


@contextmanager
def output_directory(final: str | Path, kind: str, replace: bool = False, flag: str | None = None) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `final` to fill; on success mark it as bdh's (with its
    manifest), fsync it, and move it into place. A target bdh did not write is never touched
    (check_output_dir says what is allowed); a kill at any instant leaves the old directory or
    the new one at `final`, or nothing when replacing (never a part of either)."""
    final = Path(final)
    check_output_dir(final, replace, flag)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final, ".tmp")
    try:
        yield tmp
        write_marker(tmp, kind, manifest_of(tmp))
        fsync_tree(tmp)
        held = check_output_dir(final, replace, flag)  # again: it may have changed meanwhile
        if held:
            trash = _sibling(final, ".trash")
            os.replace(final, trash / final.name)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)  # replaces an empty directory too
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def claim_directory(path: str | Path, kind: str, adopt: bool = False) -> None:
    """Make `path` a directory bdh may keep writing into (a run, an experiment): create it marked,
    or mark an empty one; one that holds files but no marker is refused unless `adopt` (the caller
    checked the files are bdh's, e.g. a run written before markers existed)."""
    path = Path(path)
    if read_marker(path) is not None:
        return
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a directory: bdh does not replace it; choose another path")
    if path.is_dir():
        if any(path.iterdir()) and not adopt:
            raise UserError(f"{path} exists and holds files bdh did not write ({OUTPUT_MARKER} is missing): "
                            "choose another path or move them away")
        write_marker(path, kind, None)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, ".tmp")
    try:
        write_marker(tmp, kind, None)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def check_output_file(path: Path, replace: bool, flag: str | None) -> None:
    """Refuse (UserError) an output file that bdh may not write: an existing file is replaced only
    with `replace` and only when bdh wrote it (a JSON object with "written_by": "bdh")."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    try:
        ours = path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("written_by") == _WRITTEN_BY
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        ours = False
    if not ours:
        raise UserError(f"{path} exists and was not written by bdh: bdh does not replace it; choose another path")
    if not replace:
        how = f"pass {flag} to replace it" if flag else "remove it first"
        raise UserError(f"{path} holds earlier bdh output: {how}, or choose another path")


def write_output_file(path: str | Path, data: bytes, replace: bool = False, flag: str | None = None) -> None:
    """Write one output file (JSON carrying "written_by": "bdh") atomically, after check_output_file."""
    check_output_file(Path(path), replace, flag)
    atomic_write_bytes(Path(path), data)
