"""Token caching and the three batchers: determinism, continuity, resume, coverage."""

import numpy as np
import pytest
import torch

from bdh.data import (
    ByteTokenizer,
    Corpus,
    RandomBatches,
    StreamBatches,
    eval_batches,
    make_tokenizer,
    token_dtype,
    tokenize_corpus,
)
from bdh.errors import UserError


@pytest.fixture
def corpus():
    train = "".join(f"the {i} quick brown foxes\n" for i in range(200))
    return Corpus("toy", train, "a validation line\n" * 20, ["toy.txt"])


def positions(n: int = 10_000) -> np.ndarray:
    """Tokens equal to their own index, so every value tells where it came from."""
    return np.arange(n, dtype=np.uint16)


def test_token_dtype():
    assert token_dtype(256) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


@pytest.mark.parametrize("spec", ["bytes", "bpe:300"])
def test_tokenize_corpus_memmaps_and_caches(corpus, spec, tmp_path, monkeypatch):
    tok = make_tokenizer(spec, corpus.train)
    data = tokenize_corpus(corpus, tok, cache_dir=tmp_path)
    assert isinstance(data.train, np.memmap) and data.train.dtype == np.uint16
    assert data.train.tolist() == tok.encode(corpus.train)
    assert data.val.tolist() == tok.encode(corpus.val)

    def refuse(text):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(tok, "encode_array", refuse)
    again = tokenize_corpus(corpus, tok, cache_dir=tmp_path)
    assert np.array_equal(again.train, data.train) and np.array_equal(again.val, data.val)
    # one directory per corpus and tokenizer, with its manifest; no temporary left behind
    (directory,) = [p for p in (tmp_path / "tokens").iterdir() if not p.name.startswith(".")]
    assert sorted(p.name for p in directory.iterdir()) == [".bdh-output.json", "train.npy", "val.npy"]
    assert not list((tmp_path / "tokens").glob(".*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "same-size"])
def test_a_damaged_token_cache_is_detected_and_rebuilt(corpus, tmp_path, capsys, damage):
    tok = ByteTokenizer()
    first = tokenize_corpus(corpus, tok, cache_dir=tmp_path)
    expected = np.array(first.train), np.array(first.val)
    del first
    (directory,) = [p for p in (tmp_path / "tokens").iterdir() if not p.name.startswith(".")]
    cached = directory / "train.npy"
    data = cached.read_bytes()
    if damage == "truncate":
        cached.write_bytes(data[: len(data) // 2])
    else:  # a changed byte: the size is right, so only the checksum sees it (the file is newer than the last check)
        cached.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    capsys.readouterr()
    again = tokenize_corpus(corpus, tok, cache_dir=tmp_path)
    assert np.array_equal(again.train, expected[0]) and np.array_equal(again.val, expected[1])
    err = capsys.readouterr().err
    assert "bdh: warning: the cache" in err and "train.npy is truncated or corrupt" in err and "rebuilding" in err
    assert cached.read_bytes() == data  # rebuilt whole


def test_an_unchanged_cache_is_not_hashed_again(corpus, tmp_path, monkeypatch):
    from bdh import fileio

    tokenize_corpus(corpus, ByteTokenizer(), cache_dir=tmp_path)
    tokenize_corpus(corpus, ByteTokenizer(), cache_dir=tmp_path)  # first check after the build: hashes, stamps

    def no_hashing(path):
        raise AssertionError(f"hashed {path} although nothing changed since the last check")

    monkeypatch.setattr(fileio, "sha256_file", no_hashing)
    tokenize_corpus(corpus, ByteTokenizer(), cache_dir=tmp_path)  # sizes only


def test_cache_key_follows_corpus_and_tokenizer(corpus, tmp_path):
    tokenize_corpus(corpus, ByteTokenizer(), cache_dir=tmp_path)
    changed = Corpus(corpus.name, corpus.train + "x\n", corpus.val, corpus.files)
    tokenize_corpus(changed, ByteTokenizer(), cache_dir=tmp_path)
    tokenize_corpus(corpus, make_tokenizer("bpe:300", corpus.train), cache_dir=tmp_path)
    assert len([p for p in (tmp_path / "tokens").iterdir() if not p.name.startswith(".")]) == 3  # one per key


def test_random_batches_are_next_token_windows():
    tokens = positions()
    x, y = next(RandomBatches(tokens, 4, 16, seed=0))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    # each row is a contiguous slice and y is x shifted by one
    assert torch.equal(x[:, 1:] - x[:, :1], torch.arange(1, 16).expand(4, -1))
    assert torch.equal(y, x + 1)
    assert int(y.max()) < len(tokens)


def test_random_batches_determinism_and_resume(tmp_path):
    tokens = positions()
    a, b = RandomBatches(tokens, 4, 16, seed=1), RandomBatches(tokens, 4, 16, seed=1)
    for _ in range(3):
        assert torch.equal(next(a)[0], next(b)[0])
    assert not torch.equal(next(RandomBatches(tokens, 4, 16, seed=2))[0], next(a)[0])

    torch.save(a.state_dict(), tmp_path / "state.pt")
    expected = [next(a)[0] for _ in range(3)]
    resumed = RandomBatches(tokens, 4, 16, seed=1)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert all(torch.equal(next(resumed)[0], e) for e in expected)
    assert resumed.step == a.step


def test_stream_batches_continue_row_by_row():
    tokens = positions(1000)
    stream = StreamBatches(tokens, batch_size=4, block_size=10)
    assert stream.lane_len == 250 and stream.steps_per_epoch == 24
    x0, y0, reset0 = next(stream)
    x1, y1, reset1 = next(stream)
    assert reset0 and not reset1
    assert torch.equal(x0[:, 0], torch.tensor([0, 250, 500, 750]))
    # the next batch starts right after the previous one: its first input is the last target
    assert torch.equal(x1[:, 0], y0[:, -1]) and torch.equal(x1[:, 0], x0[:, -1] + 1)
    assert torch.equal(y0, x0 + 1)


def test_stream_batches_wrap_and_reset():
    stream = StreamBatches(positions(1000), batch_size=4, block_size=10)
    first = next(stream)
    resets = [next(stream)[2] for _ in range(stream.steps_per_epoch - 1)]
    assert not any(resets) and stream.epoch == 0
    x, _, reset = next(stream)
    assert reset and stream.epoch == 1 and torch.equal(x, first[0])


def test_stream_batches_ranks_use_disjoint_lanes():
    tokens = positions(2000)
    seen = []
    for rank in range(3):
        stream = StreamBatches(tokens, batch_size=2, block_size=8, rank=rank, world_size=3)
        rows = torch.cat([next(stream)[0] for _ in range(stream.steps_per_epoch)], dim=1)
        seen.append(set(rows.flatten().tolist()))
        assert torch.equal(rows[:, 0], torch.tensor([2 * rank, 2 * rank + 1]) * stream.lane_len)
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    with pytest.raises(UserError, match="rank"):
        StreamBatches(tokens, 2, 8, rank=3, world_size=3)


def test_stream_batches_resume():
    tokens = positions(1000)
    stream = StreamBatches(tokens, batch_size=4, block_size=10)
    for _ in range(30):  # past one wrap
        next(stream)
    state = stream.state_dict()
    expected = [next(stream) for _ in range(3)]
    resumed = StreamBatches(tokens, batch_size=4, block_size=10)
    resumed.load_state_dict(state)
    for (x, y, r), (ex, ey, er) in zip((next(resumed) for _ in range(3)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey) and r == er
    assert resumed.epoch == stream.epoch == 1

    other = StreamBatches(tokens, batch_size=5, block_size=10)
    with pytest.warns(UserWarning, match="lane layout"):
        other.load_state_dict(state)
    assert next(other)[2]


def test_eval_batches_cover_split_without_overlap():
    tokens = positions(1001)
    batches = list(eval_batches(tokens, batch_size=5, block_size=10, max_batches=None))
    assert len(batches) == 20 and all(x.shape == (5, 10) for x, _ in batches)
    xs = torch.cat([x.flatten() for x, _ in batches])
    assert torch.equal(xs.sort().values, torch.arange(1000))
    assert all(torch.equal(y, x + 1) for x, y in batches)
    again = list(eval_batches(tokens, 5, 10, None))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_eval_batches_limit_spreads_windows():
    batches = list(eval_batches(positions(1001), batch_size=5, block_size=10, max_batches=2))
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert len(batches) == 2 and starts[0] == 0 and starts[-1] == 990
    assert len(set(starts.tolist())) == 10


def test_eval_batches_smaller_than_one_batch():
    (x, y), = eval_batches(positions(35), batch_size=8, block_size=10, max_batches=4)
    assert x.shape == (3, 10)


@pytest.mark.parametrize("make", [
    lambda t: RandomBatches(t, 2, 64, seed=0),
    lambda t: StreamBatches(t, 2, 20, world_size=2),
    lambda t: eval_batches(t, 2, 64, max_batches=1),
])
def test_too_short_split_is_a_user_error(make):
    with pytest.raises(UserError, match="block_size"):
        make(positions(64))
