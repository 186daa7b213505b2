"""Token arrays and the batches drawn from them.

A corpus is tokenized once and cached as two .npy files that later runs memory-map, so training
never re-reads or re-tokenizes text. Three ways to cut batches out of a token array:
- `RandomBatches`: independent random windows (the usual GPT-style training);
- `StreamBatches`: consecutive windows per row, for carrying the recurrent state across batches
  (truncated backpropagation through time);
- `eval_batches`: fixed, non-overlapping windows for a comparable validation loss.
Every batch is (x, y) with y the next token of x: int64 tensors of shape (B, T).
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import numpy as np
import torch

from bdh.data.cache import atomic_write_bytes, cache_problem, cache_root, discard_cache, publish_cache
from bdh.data.corpus import Corpus
from bdh.data.tokenizers import TextTokenizer
from bdh.errors import UserError

# bump when the cached token format changes, so old caches are not misread
_CACHE_VERSION = 1


@dataclass
class TokenData:
    """Train and validation tokens: 1-D read-only memory-mapped arrays (uint16 or uint32)."""

    train: np.ndarray
    val: np.ndarray
    #: the translation task: the validation stream's roles and pair starts (bdh.data.parallel.TaggedTokens)
    val_tagged: Any = None


def hold_out(tokens: TokenData, fraction: float) -> TokenData:
    """Keep the last `fraction` of the training tokens out of training and score on them instead.

    Returns TokenData(train=train[:cut], val=train[cut:]): two adjacent, disjoint slices of the
    training split, so a hyper-parameter search never looks at the real validation split, and
    no training window (which lies wholly inside train[:cut]) overlaps a scored one.
    """
    if fraction == 0.0:
        return tokens
    if not 0.0 < fraction < 1.0:
        raise UserError(f"holdout_fraction must lie in [0, 1), got {fraction!r}")
    cut = len(tokens.train) - int(round(len(tokens.train) * fraction))
    if not 0 < cut < len(tokens.train):
        raise UserError(f"holdout_fraction {fraction} of {len(tokens.train)} training tokens leaves nothing on "
                        "one side: change it or use more text")
    return TokenData(train=tokens.train[:cut], val=tokens.train[cut:])


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: uint16 up to 65,536 tokens."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenize_corpus(corpus: Corpus, tokenizer: TextTokenizer,
                    cache_dir: Path | str | None = None) -> TokenData:
    """Tokenize both splits once, cache them as .npy under <cache>/tokens/<key>/, and memory-map them.

    The directory carries a manifest (sizes, sha256s) checked on every use; a damaged one is rebuilt.

    The cache key hashes the corpus text and the tokenizer's fingerprint, so a changed corpus
    or tokenizer is tokenized afresh and an unchanged one is never tokenized twice.
    """
    folder = cache_root(cache_dir) / "tokens"
    directory = folder / _cache_key(corpus, tokenizer)
    if directory.is_dir():
        problem = cache_problem(directory)  # sizes always, sha256s when something changed since the last check
        if problem is not None:
            discard_cache(directory, problem)
    if not directory.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{directory.name}.", suffix=".tmp"))
        try:
            for split in ("train", "val"):
                ids = tokenizer.encode_array(getattr(corpus, split))
                _save_npy(tmp / f"{split}.npy", ids.astype(token_dtype(tokenizer.vocab_size)))
            publish_cache(tmp, directory, kind="tokens")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return TokenData(train=_load_npy(directory / "train.npy"), val=_load_npy(directory / "val.npy"))


def _cache_key(corpus: Corpus, tokenizer: TextTokenizer) -> str:
    """Hex digest naming the cached token files of this corpus under this tokenizer."""
    h = hashlib.sha256()
    for part in (f"v{_CACHE_VERSION}", tokenizer.fingerprint, corpus.train, corpus.val):
        data = part.encode("utf-8", errors="surrogatepass")
        # the length prefix keeps ("ab", "c") and ("a", "bc") apart
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:32]


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write an .npy atomically, so a crash or a concurrent rank never leaves half a file."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def _load_npy(path: Path) -> np.ndarray:
    """Memory-map a cached token file; an empty array cannot be mapped, so load it plainly."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:
        array = np.load(path, allow_pickle=False)
    return array


def _check_length(tokens: np.ndarray, batch_size: int, block_size: int, lanes: int = 1) -> None:
    """Every window needs block_size + 1 tokens (inputs plus the next-token targets)."""
    if batch_size < 1 or block_size < 1:
        raise UserError(f"batch_size and block_size must be positive, got {batch_size} and "
                        f"{block_size}")
    need = lanes * (block_size + 1)
    if len(tokens) < need:
        what = f"{lanes} lanes of block_size + 1" if lanes > 1 else "block_size + 1"
        raise UserError(f"this split has {len(tokens)} tokens but needs at least {need} "
                        f"({what} = {block_size + 1}): use a smaller block_size or batch size, "
                        "a larger val_fraction, or more text")


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int,
             device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) for windows tokens[s : s + T + 1] at each start s."""
    index = starts[:, None] + np.arange(block_size + 1)  # B, T+1
    window = torch.from_numpy(np.asarray(tokens[index]).astype(np.int64))  # B, T+1
    if torch.device(device).type == "cuda":
        window = window.pin_memory().to(device, non_blocking=True)
    else:
        window = window.to(device)
    return window[:, :-1], window[:, 1:]  # B, T each


class RandomBatches:
    """Endless random (x, y) windows, reproducible from `seed` and resumable.

    With several processes give each a different seed (e.g. seed + rank).
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int,
                 device: torch.device | str = "cpu"):
        _check_length(tokens, batch_size, block_size)
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.seed, self.device = seed, device
        self.step = 0
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> RandomBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        high = len(self.tokens) - self.block_size  # last start that leaves room for y
        starts = torch.randint(high, (self.batch_size,), generator=self.generator).numpy()
        self.step += 1
        return _windows(self.tokens, starts, self.block_size, self.device)

    def state_dict(self) -> dict:
        """Generator state and batch count: tensors and ints only (safe for weights_only loads)."""
        return {"seed": self.seed, "step": self.step, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the saved iterator stopped."""
        self.seed, self.step = int(state["seed"]), int(state["step"])
        self.generator.set_state(state["generator"])


class StreamBatches:
    """Consecutive windows: row i of each batch continues where row i of the previous one ended.

    The tokens are cut into batch_size * world_size contiguous lanes; rank r reads lanes
    [r * batch_size, (r + 1) * batch_size). Each call returns (x, y, reset): `reset` is True when
    the rows start afresh at the beginning of their lanes (first batch, and after every wrap,
    which also bumps `epoch`), so the caller knows to drop the carried recurrent state.
    After `load_state_dict` mid-lane, `reset` is False: restore the carried state from the same
    checkpoint, or reset it yourself.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu"):
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        lanes = batch_size * world_size
        _check_length(tokens, batch_size, block_size, lanes)
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.rank, self.world_size, self.device = rank, world_size, device
        self.lane_len = len(tokens) // lanes
        self.steps_per_epoch = (self.lane_len - 1) // block_size
        self.lane_starts = (rank * batch_size + np.arange(batch_size)) * self.lane_len  # B
        self.position = 0  # offset within every lane of the next batch
        self.epoch = 0

    def __iter__(self) -> StreamBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        if self.position + self.block_size + 1 > self.lane_len:
            self.position, self.epoch = 0, self.epoch + 1
        reset = self.position == 0
        x, y = _windows(self.tokens, self.lane_starts + self.position, self.block_size,
                        self.device)
        self.position += self.block_size
        return x, y, reset

    def state_dict(self) -> dict:
        """Position in the lanes, epoch, and the lane layout they refer to (ints only)."""
        return {"position": self.position, "epoch": self.epoch, "lane_len": self.lane_len,
                "block_size": self.block_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the saved stream stopped; if the lane layout changed
        (other batch size, world size, block size or data), restart the lanes from the top."""
        self.epoch = int(state["epoch"])
        same_layout = (int(state["lane_len"]) == self.lane_len
                       and int(state["block_size"]) == self.block_size)
        if same_layout:
            self.position = int(state["position"])
        else:
            warnings.warn("stream batches were saved with a different lane layout: "
                          "restarting the lanes from their beginning", stacklevel=2)
            self.position = 0


def eval_batches(tokens: np.ndarray, batch_size: int, block_size: int,
                 max_batches: int | None = None,
                 device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, non-overlapping (x, y) windows spread evenly over `tokens`, for validation loss.

    All windows are used when they fit in `max_batches` full batches (None: no limit); otherwise
    an evenly spaced subset, so the estimate still covers the whole split. Batches are full
    (batch_size rows) unless the split holds fewer windows than one batch. Checks run at the
    call, not at the first `next`, so a too-short split fails where it is asked for.
    """
    _check_length(tokens, batch_size, block_size)
    if max_batches is not None and max_batches < 1:
        raise UserError(f"max_batches must be at least 1 (or None for all), got {max_batches}")
    starts = _eval_starts(len(tokens), batch_size, block_size, max_batches)
    return (_windows(tokens, starts[i:i + batch_size], block_size, device)
            for i in range(0, len(starts), batch_size))


def _eval_starts(n_tokens: int, batch_size: int, block_size: int,
                 max_batches: int | None) -> np.ndarray:
    """Start offsets of the evaluation windows: multiples of block_size, thinned evenly."""
    starts = np.arange((n_tokens - 1) // block_size) * block_size  # each window spans T + 1
    keep = len(starts) if max_batches is None else min(len(starts), max_batches * batch_size)
    if keep >= batch_size:
        keep -= keep % batch_size
    if keep < len(starts):
        # spacing >= 1, so the rounded indices stay distinct
        starts = starts[np.linspace(0, len(starts) - 1, keep).round().astype(np.int64)]
    return starts
