"""The R data reader and the Austen corpus built from Debian's r-cran-janeaustenr.

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python -m pytest tests/test_corpus.py -q

The reader is checked twice: on byte strings written here by hand from R's serialization format
(so it is tested without the package, malformed and oversized streams included), and on the real
package, against facts published with it (austen_books() has 73,422 lines; its own tests check the
book order and that Persuasion has fewer lines than Emma) and against the corpus's pinned hashes.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import random
import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest

from python3_distillation import corpus, rdata
from python3_distillation.corpus import CorpusError
from python3_distillation.paths import data_dir as default_data_dir
from python3_distillation.rdata import RDataError, RVector
from python3_distillation.resumable import read_manifest

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


def test_reads_a_named_list_with_na_and_a_back_reference():
    # list(x = c(1L, NA), z = c(TRUE, NA)), the inner x carrying its own names attribute, which
    # writes the "names" symbol first; the outer list's names refer back to it.
    x = i32(13 | HAS_ATTR, 2, 1, -(2**31)) + names_attr("p", "q")
    z = i32(10, 2, 1, -(2**31))
    ref_to_names = i32((1 << 8) | 255)  # REFSXP, index 1 packed in the flags
    value = rdata.unserialize(header(2) + named_list({"x": x, "z": z}, name_sym=ref_to_names))
    assert value.rtype == "list" and value.names == ["x", "z"]
    d = value.as_dict()
    assert list(d["x"]) == [1, None] and d["x"].names == ["p", "q"] and d["x"].rtype == "integer"
    assert list(d["z"]) == [True, None] and d["z"].rtype == "logical"


def lazy_load_db(objects: dict[str, bytes], compressed: int = 1) -> tuple[bytes, bytes]:
    """(.rdx, .rdb) as makeLazyLoadDB writes them with `compress = compressed`."""
    codec = {1: zlib.compress, 2: bz2.compress, 3: lambda b: b"Z" + lzma.compress(b)}[compressed]
    return lazy_load_index({name: struct.pack(">I", len(payload)) + codec(payload)
                            for name, payload in objects.items()}, compressed)


def lazy_load_index(entries: dict[str, bytes], compressed: int = 1) -> tuple[bytes, bytes]:
    """(.rdx, .rdb) for entries already in .rdb form (length header + compressed data)."""
    rdb, index = b"", {}
    for name, blob in entries.items():
        index[name] = i32(13, 2, len(rdb), len(blob))
        rdb += blob
    flag = i32(10, 1, 1) if compressed == 1 else i32(13, 1, compressed)  # TRUE, or the integer
    rdx = gzip.compress(header() + named_list({
        "variables": named_list(index), "references": i32(19, 0), "compressed": flag}))
    return rdx, rdb


@pytest.mark.parametrize("compressed", [1, 2, 3], ids=["zlib", "bzip2", "xz"])
def test_reads_a_hand_built_lazy_load_db(compressed):
    rdx, rdb = lazy_load_db({"first": header() + strsxp(charsxp("one"), charsxp("two")),
                             "second": header() + i32(13, 1, 42)}, compressed)
    db = rdata.read_lazyload_db(rdx, rdb)
    assert list(db) == ["first", "second"]
    assert list(db["first"]) == ["one", "two"] and list(db["second"]) == [42]


def compact_intseq(n: int) -> bytes:
    """1:n under format version 3: an ALTREP compact_intseq, 88 bytes whatever n is."""
    info = i32(2) + symbol("compact_intseq") + i32(2) + symbol("base") + i32(2) + i32(13, 1, 13) + NIL
    return i32(238) + info + i32(14, 3) + struct.pack(">3d", n, 1, 1) + NIL


# Every malformed stream is an RDataError that says why: never another exception, a silently
# shortened vector, a deep recursion or an allocation sized by the input's claims.
MALFORMED = {
    "deep nesting": (header() + i32(19, 1) * 100_000 + NIL, "nests deeper"),
    "huge length": (header() + i32(16, 2**31 - 1) + charsxp("a"), "does not fit"),
    "longer than its data": (header() + i32(13, 1_000_000, 1, 2), "does not fit"),
    "negative length": (header() + i32(13, -5), "length -5"),
    "compact_intseq": (header() + compact_intseq(2**31 - 1), "ALTREP"),
    "cut string": (header() + strsxp(charsxp("abc"))[:-2], "truncated"),
    "missing element": (header() + i32(16, 3) + charsxp("a") + charsxp("b"), "does not fit"),
    "bytes after the object": (header() + i32(13, 1, 5) + b"xx", "2 bytes after"),
    "empty": (b"", "truncated"),
    "ASCII format": (b"A\n1\n", "XDR"),
    "format version 4": (b"X\n" + i32(4, 0, 0), "version 4"),
    "bytecode": (header() + i32(21, 0), "bytecode"),
    "unknown type": (header() + i32(99), "code 99"),
    "bad reference": (header() + i32((7 << 8) | 255), "reference 7"),
    "non-string element": (header() + i32(16, 1) + i32(13, 0), "not a string"),
    "invalid UTF-8": (header() + i32(16, 1, 9 | UTF8, 2) + b"\xff\xfe", "not valid utf-8"),
    "unknown native encoding": (b"X\n" + i32(3, 0, 0, 4) + b"\0bad" + i32(16, 1, 9, 1) + b"a", "not valid"),
    "untagged attribute": (header() + i32(13 | HAS_ATTR, 0) + i32(2) + i32(13, 0) + NIL, "no symbol tag"),
    "attributes not a pairlist": (header() + i32(13 | HAS_ATTR, 0) + i32(13, 0), "not a pairlist"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_streams_raise_rdata_error(name):
    data, message = MALFORMED[name]
    t0 = time.perf_counter()
    with pytest.raises(RDataError, match=message):
        rdata.unserialize(data)
    assert time.perf_counter() - t0 < 0.5


def test_random_corruptions_raise_only_rdata_error():
    """Bytes flipped, cut, inserted, or overwritten with telling integers (lengths, type codes):
    each result reads, or raises RDataError, and never anything else."""
    good = header() + named_list({
        "a": strsxp(charsxp("EMMA"), charsxp(""), charsxp(None), charsxp("Émile", UTF8)),
        "b": i32(13 | HAS_ATTR, 2, 1, 2) + names_attr("p", "q"), "c": i32(10, 1, 1)})
    telling = [-1, -2, 0, 1, 2, 7, 9, 13, 16, 19, 238, 254, 255, 2**31 - 1]
    rng = random.Random(0)
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            i, op = rng.randrange(len(data) + 1), rng.random()
            if op < 0.5 and i < len(data):
                data[i] = rng.randrange(256)
            elif op < 0.75:
                data[i : i + 4] = struct.pack(">i", rng.choice(telling))
            elif op < 0.9:
                del data[i:]
            else:
                data[i:i] = rng.randbytes(rng.randint(1, 8))
        try:
            rdata.unserialize(bytes(data))
        except RDataError:
            pass


def zlib_bomb(size: int) -> bytes:
    z = zlib.compressobj(9)
    return b"".join(z.compress(bytes(1 << 20)) for _ in range(size >> 20)) + z.flush()


def test_decompression_stops_at_the_entry_header_and_at_the_cap(monkeypatch):
    bomb = zlib_bomb(256 << 20)  # 256 MB of zeros in ~250 kB
    t0 = time.perf_counter()
    with pytest.raises(RDataError, match="more than 1000 bytes"):  # what the entry's header says
        rdata.read_lazyload_db(*lazy_load_index({"v": struct.pack(">I", 1000) + bomb}))
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(RDataError, match="over the"):  # a header that claims 4 GB
        rdata.read_lazyload_db(*lazy_load_index({"v": struct.pack(">I", 2**32 - 1) + bomb}))
    monkeypatch.setattr(rdata, "MAX_BYTES", 1 << 20)
    with pytest.raises(RDataError, match="more than 1048576 bytes"):  # a gzip'd index
        rdata.read_lazyload_db(gzip.compress(bytes(2 << 20)), b"")


def test_malformed_databases_raise_rdata_error():
    payload = header() + strsxp(charsxp("one"))
    rdx, rdb = lazy_load_db({"v": payload})
    length = struct.pack(">I", len(payload))
    cases = {
        "outside": (rdx, rdb[:-5]),
        "truncated": lazy_load_index({"v": length + zlib.compress(payload)[:-6]}),
        "4 bytes after its compressed stream": lazy_load_index({"v": length + zlib.compress(payload) + b"junk"}),
        "does not decompress": lazy_load_index({"v": length + b"not zlib at all"}),
        f"holds {len(payload)} bytes, its header says {len(payload) + 1}": lazy_load_index(
            {"v": struct.pack(">I", len(payload) + 1) + zlib.compress(payload)}),
        "unknown compression type": lazy_load_index({"v": length + b"Q" + zlib.compress(payload)}, 3),
        "too short": lazy_load_index({"v": b"\0\0"}),
        "not gzip": (b"PK\x03\x04", rdb),
        "no 'variables' list": (gzip.compress(header() + named_list({"other": i32(19, 0)})), rdb),
        "not an \\(offset, length\\) pair": (
            gzip.compress(header() + named_list({"variables": named_list({"v": i32(13, 1, 0)})})), rdb),
        "'compressed' is": (
            gzip.compress(header() + named_list({"variables": i32(19, 0), "compressed": i32(13, 1, 7)})), rdb),
        "no proper names": (gzip.compress(header() + i32(19, 1) + i32(19, 0)), rdb),
    }
    for message, (bad_rdx, bad_rdb) in cases.items():
        with pytest.raises(RDataError, match=message):
            rdata.read_lazyload_db(bad_rdx, bad_rdb)


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
    manifest = read_manifest(default_data_dir() / "austen")
    for split in ("train", "validation"):
        entry = manifest["splits"][split]
        assert entry["paragraphs"] == len(paras[split])
        assert entry["characters"] == sum(map(len, paras[split]))
        assert all(p and p == p.strip() and "  " not in p for p in paras[split])
        assert not any(corpus.HEADING.fullmatch(p) for p in paras[split])
        assert "_" not in text[split]
    assert manifest["splits"]["validation"]["books"] == ["Persuasion"]
    assert 3_000_000 < manifest["splits"]["train"]["characters"] < 4_000_000


# The corpus built from r-cran-janeaustenr 1.0.0-1, byte for byte: a change to the reader or to the
# paragraph rules that alters one byte shows here (bump CORPUS_VERSION when it is meant).
CORPUS_SHA256 = {"r-cran-janeaustenr_1.0.0-1_all.deb": {
    "train": "fd97a3e45c3742732c6e737e9978383680974ce0b6ab16129413ebb0cc8efc57",
    "validation": "e49512fd72b4b5c3b0436987a55cd697c69b9a9e3850719ca142b05e01a3ca66"}}


def test_corpus_bytes_are_pinned(built):
    deb_name = read_manifest(default_data_dir() / "austen")["deb"]["file"]
    if deb_name not in CORPUS_SHA256:
        pytest.skip(f"no pinned hashes for {deb_name}")
    got = {split: hashlib.sha256(path.read_bytes()).hexdigest() for split, path in built.items()}
    assert got == CORPUS_SHA256[deb_name]


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
