"""Where a token sits in the decoded text: its characters, the word around it, a short context.

Works for any tokenizer with `decode` (bytes or BPE) by measuring decoded prefixes, so it costs
one decode per asked position; the report asks for a few dozen positions, never all of them.
"""

from __future__ import annotations

from typing import Sequence

VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def visible(piece: str) -> str:
    """Whitespace made visible, so a table cell holding a space still shows something."""
    return "".join(VISIBLE.get(ch, ch) for ch in piece) or "∅"


def char_span(tokenizer, ids: Sequence[int], t: int) -> tuple[str, int, int]:
    """(decoded text of ids[: t + 1 + a little], start, end) of token t's characters in it."""
    ids = [int(i) for i in ids]
    head = len(tokenizer.decode(ids[:t]))
    text = tokenizer.decode(ids[: t + 1 + 32])
    end = len(tokenizer.decode(ids[: t + 1]))
    # a byte in the middle of a multi-byte character decodes to nothing new: point at that character
    start = min(head, end - 1) if end > head else max(0, end - 1)
    return text, start, max(end, start + 1)


def word_around(text: str, start: int, end: int) -> str:
    """The whitespace/punctuation-delimited word holding text[start:end] (or the piece itself)."""
    def inside(ch: str) -> bool:
        return ch.isalnum() or ch in "'’-_"

    if not any(inside(ch) for ch in text[start:end]):
        return text[start:end]
    left, right = start, end
    while left > 0 and inside(text[left - 1]):
        left -= 1
    while right < len(text) and inside(text[right]):
        right += 1
    return text[left:right]


def describe_token(tokenizer, ids: Sequence[int], t: int, width: int = 24) -> dict:
    """{"position", "token", "word", "context"} for token t; the token is bracketed in the context."""
    text, start, end = char_span(tokenizer, ids, t)
    before = text[max(0, start - width):start].replace("\n", " ")
    after = text[end:end + width].replace("\n", " ")
    return {
        "position": int(t),
        "token": visible(text[start:end]),
        "word": word_around(text, start, end).strip() or visible(text[start:end]),
        "context": f"{before}[{text[start:end]}]{after}".replace("\n", "↵"),
    }


def token_words(tokenizer, ids: Sequence[int]) -> tuple[list[str], list[str]]:
    """(word, visible piece) for every token of a short sequence (one decode per token)."""
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids)
    ends = [len(tokenizer.decode(ids[: t + 1])) for t in range(len(ids))]
    words, pieces = [], []
    for t, end in enumerate(ends):
        head = ends[t - 1] if t else 0
        start = min(head, end - 1) if end > head else max(0, end - 1)
        end = max(end, start + 1)
        pieces.append(visible(text[start:end]))
        words.append(word_around(text, start, end).strip() or visible(text[start:end]))
    return words, pieces
