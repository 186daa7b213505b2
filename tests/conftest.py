import pytest
import torch

from tests.helpers import write_text


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Corpus and token caches go to the test's own directory, never to the user's ~/.cache."""
    monkeypatch.setenv("BDH_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def text_file(tmp_path):
    return write_text(tmp_path / "text.txt")
