import pytest

from .helpers import write_text


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Token caches go to the test's own directory, never to ~/.cache."""
    monkeypatch.setenv("BDH_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def text_file(tmp_path):
    return write_text(tmp_path / "text.txt")
