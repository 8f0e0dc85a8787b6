"""The R data reader and the Austen corpus built from Debian's r-cran-janeaustenr.

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python -m pytest tests/test_corpus.py -q

The reader is checked twice: on byte strings written here by hand from R's serialization format
(so it is tested without the package), and on the real package, against facts published with it
(austen_books() has 73,422 lines; its own tests check the book order and that Persuasion has fewer
lines than Emma).
"""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from python3_distillation import corpus, rdata
from python3_distillation.corpus import CorpusError
from python3_distillation.paths import data_dir as default_data_dir
from python3_distillation.rdata import RDataError, RSymbol, RVector

# -- a hand-written XDR encoder (R's serialize.c, format version 2 or 3) ------------------------
ASCII, UTF8, LATIN1 = 64 << 12, 8 << 12, 4 << 12  # CHARSXP encoding flags, already shifted
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10
NIL = struct.pack(">i", 254)


def i32(*xs: int) -> bytes:
    return struct.pack(f">{len(xs)}i", *xs)


def header(version: int = 3) -> bytes:
    # "X\n", format version, written by R 4.2.1 (0x040201), readable by R 3.5.0 (0x030500).
    head = b"X\n" + i32(version, 0x040201, 0x030500)
    return head + (i32(5) + b"UTF-8" if version == 3 else b"")


def charsxp(s: str | None, flag: int = ASCII, encoding: str = "utf-8") -> bytes:
    if s is None:
        return i32(9, -1)  # NA_STRING
    raw = s.encode(encoding)
    return i32(9 | flag, len(raw)) + raw


def strsxp(*items: bytes, flags: int = 0) -> bytes:
    return i32(16 | flags, len(items)) + b"".join(items)


def symbol(name: str) -> bytes:
    return i32(1) + charsxp(name)


def names_attr(*names: str, name_sym: bytes | None = None) -> bytes:
    """The attribute pairlist ``(names = c(...))`` closing with NILVALUE."""
    return i32(2 | HAS_TAG) + (name_sym or symbol("names")) + strsxp(*map(charsxp, names)) + NIL


def named_list(items: dict[str, bytes], name_sym: bytes | None = None) -> bytes:
    return i32(19 | HAS_ATTR, len(items)) + b"".join(items.values()) + names_attr(*items, name_sym=name_sym)


# -- R serialization, byte strings written here -------------------------------------------------
def test_reads_a_character_vector_with_na_and_encodings():
    data = header() + strsxp(charsxp("a"), charsxp(None), charsxp("Émile", UTF8),
                             charsxp("café", LATIN1, "latin-1"))
    value = rdata.unserialize(data)
    assert isinstance(value, RVector) and value.rtype == "character"
    assert list(value) == ["a", None, "Émile", "café"]


def test_known_r_output_for_a_single_string():
    # serialize("a", NULL, version = 2) as R 3.6.2 writes it (XDR, version 2, min reader 2.3.0).
    data = bytes.fromhex("580a000000020003060200020300000000100000000100040009000000" "0161")
    assert list(rdata.unserialize(data)) == ["a"]


def test_reads_a_named_list_of_numbers_with_na_and_a_back_reference():
    # list(x = c(1L, NA), y = c(1.5, NA, NaN), z = c(TRUE, NA)), the inner x carrying its own
    # names attribute that writes the "names" symbol first; the outer one refers back to it.
    na_real = struct.pack(">II", 0x7FF00000, 1954)
    x = i32(13 | HAS_ATTR, 2, 1, -(2**31)) + names_attr("p", "q")
    y = i32(14, 3) + struct.pack(">d", 1.5) + na_real + struct.pack(">d", float("nan"))
    z = i32(10, 2, 1, -(2**31))
    ref_to_names = i32((1 << 8) | 255)  # REFSXP, index 1 packed in the flags
    value = rdata.unserialize(header(2) + named_list({"x": x, "y": y, "z": z}, name_sym=ref_to_names))
    assert value.rtype == "list" and value.names == ["x", "y", "z"]
    d = value.as_dict()
    assert list(d["x"]) == [1, None] and d["x"].names == ["p", "q"] and d["x"].rtype == "integer"
    assert d["y"][:2] == [1.5, None] and d["y"][2] != d["y"][2]  # NA → None, NaN stays NaN
    assert list(d["z"]) == [True, None]


def test_reads_a_tagged_pairlist_and_symbols():
    # pairlist(a = quote(b), 3L)
    data = header() + i32(2 | HAS_TAG) + symbol("a") + symbol("b") + i32(2) + i32(13, 1, 3) + NIL
    value = rdata.unserialize(data)
    assert value.tags == ["a", None]
    assert value[0] == RSymbol("b") and list(value[1]) == [3]


def test_reads_a_compact_integer_sequence():
    # 5:7 under format version 3 is an ALTREP compact_intseq: info pairlist, state c(n, start, step).
    info = i32(2) + symbol("compact_intseq") + i32(2) + symbol("base") + i32(2) + i32(13, 1, 13) + NIL
    state = i32(14, 3) + struct.pack(">3d", 3, 5, 1)
    value = rdata.unserialize(header() + i32(238) + info + state + NIL)
    assert value.rtype == "integer" and list(value) == [5, 6, 7]


def test_unsupported_type_and_truncation_raise_clear_errors():
    with pytest.raises(RDataError, match="bytecode"):
        rdata.unserialize(header() + i32(21, 0))
    with pytest.raises(RDataError, match="truncated"):
        rdata.unserialize(header() + strsxp(charsxp("abc"))[:-2])
    with pytest.raises(RDataError, match="ASCII"):
        rdata.unserialize(b"A\n1\n")
    with pytest.raises(RDataError, match="reference 7"):
        rdata.unserialize(header() + i32((7 << 8) | 255))


def test_reads_a_hand_built_lazy_load_db():
    objects = {"first": header() + strsxp(charsxp("one"), charsxp("two")),
               "second": header() + i32(13, 1, 42)}
    rdb, index = b"", {}
    for name, payload in objects.items():
        blob = struct.pack(">I", len(payload)) + zlib.compress(payload)
        index[name] = i32(13, 2, len(rdb), len(blob))
        rdb += blob
    rdx = gzip.compress(header() + named_list({
        "variables": named_list(index), "references": i32(19, 0), "compressed": i32(10, 1, 1)}))
    db = rdata.read_lazyload_db(rdx, rdb)
    assert list(db) == ["first", "second"]
    assert list(db["first"]) == ["one", "two"] and list(db["second"]) == [42]
    with pytest.raises(RDataError, match="outside"):
        rdata.read_lazyload_db(rdx, rdb[:-5])


# -- lines → paragraphs --------------------------------------------------------------------------
def test_to_paragraphs_joins_lines_and_drops_non_text():
    lines = ["EMMA", "", "By Jane Austen", "", "VOLUME I", "", "CHAPTER I", "",
             "Emma Woodhouse, handsome,  clever,", "   and _rich_.", "", "",
             "                          * * * * *", "",
             '"MY DEAR FRIEND,--', "", '"CAROLINE BINGLEY"', "",
             "[At this point in the first and second editions, Volume 1 ends.]", "",
             "Chapter 2", "", "She was the youngest.", "", "FINIS", "", "A note from the editor."]
    assert corpus.to_paragraphs(lines) == [
        "Emma Woodhouse, handsome, clever, and rich.", '"MY DEAR FRIEND,--', '"CAROLINE BINGLEY"',
        "She was the youngest."]


def test_front_matter_prose_is_kept():
    lines = ["NORTHANGER ABBEY", "", "ADVERTISEMENT BY THE AUTHORESS", "",
             "THIS little work was finished", "in the year 1803.", "", "CHAPTER 1", "", "No one."]
    assert corpus.to_paragraphs(lines) == ["THIS little work was finished in the year 1803.", "No one."]


# -- the real package ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deb() -> Path:
    return corpus.fetch_austen_deb(default_data_dir() / "downloads")


@pytest.fixture(scope="module")
def books(deb) -> dict[str, list[str]]:
    return corpus.read_austen_books(deb)


def test_six_books_in_publication_order(books):
    assert list(books) == ["Sense & Sensibility", "Pride & Prejudice", "Mansfield Park", "Emma",
                           "Northanger Abbey", "Persuasion"]
    assert sum(map(len, books.values())) == 73422  # rows of janeaustenr::austen_books()
    assert len(books["Persuasion"]) < len(books["Emma"])
    for title, lines in books.items():
        chars = sum(map(len, lines))
        assert 400_000 < chars < 900_000, (title, chars)
    assert books["Pride & Prejudice"][9].startswith("It is a truth universally acknowledged")


@pytest.fixture(scope="module")
def built() -> dict[str, Path]:
    return corpus.build_austen_corpus(default_data_dir())


def test_corpus_splits_are_disjoint_and_match_the_manifest(built):
    text = {split: path.read_text(encoding="utf-8") for split, path in built.items()}
    paras = {split: t.splitlines() for split, t in text.items()}
    assert not set(paras["train"]) & set(paras["validation"])
    assert paras["train"][0].startswith("The family of Dashwood had long been settled in Sussex.")
    assert "It is a truth universally acknowledged, that a single man in possession of a good " \
           "fortune, must be in want of a wife." in paras["train"]
    assert paras["validation"][0].startswith("Sir Walter Elliot, of Kellynch Hall")
    manifest = corpus.load_manifest(default_data_dir())
    for split in ("train", "validation"):
        entry = manifest["splits"][split]
        assert entry["paragraphs"] == len(paras[split])
        assert entry["characters"] == sum(map(len, paras[split]))
        assert all(p and p == p.strip() and "  " not in p for p in paras[split])
        assert not any(corpus.HEADING.fullmatch(p) for p in paras[split])
        assert "_" not in text[split]
    assert manifest["splits"]["validation"]["books"] == ["Persuasion"]
    assert 3_000_000 < manifest["splits"]["train"]["characters"] < 4_000_000


def test_second_build_is_a_no_op(built):
    stamps = {p: p.stat().st_mtime_ns for p in built.values()}
    assert corpus.build_austen_corpus(default_data_dir()) == built
    assert {p: p.stat().st_mtime_ns for p in built.values()} == stamps


def test_tampered_output_is_rebuilt(tmp_path, deb):
    paths = corpus.build_austen_corpus(tmp_path, deb)
    good = paths["validation"].read_bytes()
    paths["validation"].write_text("not Austen\n", encoding="utf-8")
    corpus.build_austen_corpus(tmp_path, deb)
    assert paths["validation"].read_bytes() == good
    assert json.loads((tmp_path / "austen" / "manifest.json").read_text())["version"] == corpus.CORPUS_VERSION
    assert sorted(p.name for p in (tmp_path / "austen").iterdir()) == ["manifest.json", "train.txt", "validation.txt"]


# -- errors --------------------------------------------------------------------------------------
def test_corrupt_or_missing_deb_gives_a_clear_error(tmp_path, deb):
    junk = tmp_path / "junk.deb"
    junk.write_bytes(b"this is not a debian package")
    with pytest.raises(CorpusError, match="not a .deb"):
        corpus.build_austen_corpus(tmp_path, junk)
    half = tmp_path / "half.deb"
    half.write_bytes(deb.read_bytes()[: deb.stat().st_size // 2])
    with pytest.raises(CorpusError, match="truncated"):
        corpus.read_austen_books(half)
    with pytest.raises(CorpusError, match="no such"):
        corpus.build_austen_corpus(tmp_path, tmp_path / "missing.deb")
    assert not (tmp_path / "austen").exists() or not any((tmp_path / "austen").iterdir())


def test_fetch_reuses_a_local_copy_and_honours_the_env(tmp_path, deb, monkeypatch):
    monkeypatch.delenv("DISTILL_AUSTEN_DEB", raising=False)
    shutil.copy(deb, tmp_path / deb.name)
    assert corpus.fetch_austen_deb(tmp_path) == tmp_path / deb.name
    monkeypatch.setenv("DISTILL_AUSTEN_DEB", str(tmp_path / "nowhere.deb"))
    with pytest.raises(CorpusError, match="DISTILL_AUSTEN_DEB"):
        corpus.fetch_austen_deb(tmp_path)


def test_fetch_without_apt_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("DISTILL_AUSTEN_DEB", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get on this PATH
    with pytest.raises(CorpusError, match=r"apt-get update.*DISTILL_AUSTEN_DEB"):
        corpus.fetch_austen_deb(tmp_path / "downloads")
