"""Data: tokenizers (bytes, BPE, GPT-2), corpora (registry-backed, cached, split), batching."""

from bdh.data.batches import (
    RandomBatches,
    StreamBatches,
    TokenData,
    eval_batches,
    hold_out,
    token_dtype,
    tokenize_corpus,
)
from bdh.data.cache import cache_root
from bdh.data.corpus import Corpus, check_outside_data, load_corpus, read_text_file, shakespeare_from_archive
from bdh.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    TextTokenizer,
    encode_prompt,
    load_tokenizer,
    make_tokenizer,
)

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "Corpus",
    "RandomBatches",
    "StreamBatches",
    "TextTokenizer",
    "TokenData",
    "cache_root",
    "check_outside_data",
    "encode_prompt",
    "eval_batches",
    "hold_out",
    "load_corpus",
    "load_tokenizer",
    "make_tokenizer",
    "read_text_file",
    "shakespeare_from_archive",
    "token_dtype",
    "tokenize_corpus",
]
