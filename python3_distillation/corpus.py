"""Jane Austen's six novels as a train/validation text corpus, read from Debian's r-cran-janeaustenr.

    DISTILL_DATA_DIR=./data gpt2-distill assets     # builds it; DISTILL_AUSTEN_DEB=FILE.deb reads a local .deb

The novels are public domain; read in pure Python (no R). Design notes: docs/design/data.md.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import re
import tarfile
from pathlib import Path

from python3_distillation.errors import AssetError
from python3_distillation.fsio import atomic_dir, sha256_file
from python3_distillation.paths import download
from python3_distillation.rdata import RDataError, read_lazyload_db
from python3_distillation.resumable import check_files, read_manifest, write_manifest

log = logging.getLogger(__name__)

DEB_PACKAGE = "r-cran-janeaustenr"
RDATA_DIR = "usr/lib/R/site-library/janeaustenr/data/"
MAX_MEMBER_BYTES = 64 << 20
# R object name → title, in publication order (the order of the R package's austen_books()).
BOOKS = {"sensesensibility": "Sense & Sensibility", "prideprejudice": "Pride & Prejudice",
         "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
         "persuasion": "Persuasion"}
VALIDATION_BOOKS = ("Persuasion",)
# Bumped whenever the paragraph rules change, so an old build is not mistaken for a current one.
CORPUS_VERSION = 1
SPLITS = ("train", "validation")

# "CHAPTER XII", "Chapter 3", "VOLUME I" — alone in their paragraph.
HEADING = re.compile(r"(?:CHAPTER|Chapter|VOLUME|Volume)\s+(?:[IVXLC]+|\d+)\.?")
# Where the novel's text stops: what follows is the edition's, not Austen's ("A NOTE ON THE TEXT").
END_MARKERS = {"THE END", "FINIS", "Finis", "A NOTE ON THE TEXT"}
# Transcribers' notes on where an edition's volumes ended: "[End volume one of this edition.",
# "[At this point in the first and second editions, Volume 1 ends.]", "(End of volume one.)".
EDITORIAL = re.compile(r"[\[(].*\b(?:edition|volume)\b", re.IGNORECASE)
PROSE_END = re.compile(r"""[.!?;:"'\-]$""")


class CorpusError(AssetError):
    """The Austen corpus could not be fetched, read or built (message says which file and why)."""


def fetch_austen_deb(download_dir: Path) -> Path:
    """Path of the r-cran-janeaustenr .deb: ``$DISTILL_AUSTEN_DEB``, else ``fetch_deb``'s."""
    env = os.environ.get("DISTILL_AUSTEN_DEB")
    if not env:
        return fetch_deb(DEB_PACKAGE, download_dir, f"pass a {DEB_PACKAGE} .deb path or set DISTILL_AUSTEN_DEB",
                         CorpusError)
    if not Path(env).expanduser().is_file():
        raise CorpusError(f"DISTILL_AUSTEN_DEB={env}: no such file")
    return Path(env).expanduser()


def fetch_deb(package: str, download_dir: Path, alternative: str, error: type[AssetError] = AssetError) -> Path:
    """A Debian package's .deb: a copy in ``download_dir``, or one fetched there with ``apt-get
    download`` (the apt lists, no root, nothing installed); ``error`` names what failed and the way out."""
    return download(["apt-get", "download", package], download_dir, f"{package}_*.deb", package,
                    f"run `apt-get update` (as root) and retry, or {alternative}", error, timeout=600)


def _ar_members(data: bytes, name: str) -> dict[str, bytes]:
    """The members of an ar archive (a .deb's outer layer): 60-byte headers, even-padded bodies."""
    if not data.startswith(b"!<arch>\n"):
        raise CorpusError(f"{name}: not a .deb (no ar archive header)")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        if header[58:60] != b"`\n":
            raise CorpusError(f"{name}: corrupt ar member header at byte {pos}")
        member = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise CorpusError(f"{name}: corrupt ar member size at byte {pos}") from None
        start = pos + 60
        if start + size > len(data):
            raise CorpusError(f"{name}: truncated (member {member} needs {size} bytes, {len(data) - start} left)")
        members[member] = data[start : start + size]
        pos = start + size + (size & 1)
    return members


def read_deb_member(deb_path: Path, suffix: str) -> bytes:
    """Bytes of the one regular file in the .deb's data archive whose path ends with ``suffix``, or
    (a ``re.Pattern``) whose path the pattern finds."""
    deb_path = Path(deb_path)
    try:
        data = deb_path.read_bytes()
    except OSError as e:
        raise CorpusError(f"{deb_path}: cannot read ({e.strerror or e})") from e
    members = _ar_members(data, str(deb_path))
    tar_name = next((m for m in members if m.startswith("data.tar")), None)
    if tar_name is None:
        raise CorpusError(f"{deb_path}: no data.tar.* member (has {sorted(members)})")
    if tar_name.endswith(".zst"):
        raise CorpusError(f"{deb_path}: {tar_name} is zstd-compressed; only xz, gz, bz2 or none are read")
    try:
        # "r:*" lets tarfile pick xz (Debian's default), gzip, bzip2 or plain from the magic bytes.
        with tarfile.open(fileobj=io.BytesIO(members[tar_name]), mode="r:*") as tar:
            hits = [m for m in tar.getmembers() if m.isfile() and
                    (suffix.search(m.name) if isinstance(suffix, re.Pattern) else m.name.endswith(suffix))]
            if len(hits) != 1:
                raise CorpusError(f"{deb_path}: {len(hits)} files end with {suffix!r} in {tar_name}, expected 1")
            if hits[0].size > MAX_MEMBER_BYTES:  # the R data is ~1.6 MB; refuse to unpack a giant
                raise CorpusError(f"{deb_path}: {hits[0].name} is {hits[0].size} bytes, over {MAX_MEMBER_BYTES}")
            return tar.extractfile(hits[0]).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CorpusError(f"{deb_path}: cannot read {tar_name} ({e})") from e


def read_austen_books(deb_path: Path) -> dict[str, list[str]]:
    """Book title → its printed lines, in publication order, read from the package's lazy-load DB."""
    rdx = read_deb_member(deb_path, RDATA_DIR + "Rdata.rdx")
    rdb = read_deb_member(deb_path, RDATA_DIR + "Rdata.rdb")
    try:
        objects = read_lazyload_db(rdx, rdb)
    except RDataError as e:
        raise CorpusError(f"{deb_path}: cannot read the R data ({e})") from e
    books = {}
    for name, title in BOOKS.items():
        lines = objects.get(name)
        if not isinstance(lines, list) or not all(x is None or isinstance(x, str) for x in lines):
            raise CorpusError(f"{deb_path}: R object {name!r} is missing or not a character vector")
        books[title] = ["" if x is None else x for x in lines]  # NA (none in 1.0.0) reads as blank
    return books


def to_paragraphs(lines: list[str]) -> list[str]:
    """Join wrapped lines into paragraphs (a blank line ends one), collapse whitespace, strip the
    italics underscores, and drop what is not the novel's text: the title block before the first
    heading (prose there, such as Northanger Abbey's advertisement, is kept), chapter/volume
    headings, "* * *" dividers, transcribers' volume notes, and everything from THE END/FINIS on."""
    # Underscores mark italics (_very_) in three of the six transcriptions only; they are markup,
    # not text, and would teach the student a typographic habit at ~1 token per mark.
    paragraphs = [" ".join(" ".join(group).replace("_", "").split())
                  for blank, group in itertools.groupby(lines, key=lambda line: not line.strip()) if not blank]
    out: list[str] = []
    in_front_matter = True
    for p in paragraphs:
        if p in END_MARKERS:
            break
        if HEADING.fullmatch(p):
            in_front_matter = False
            continue
        if not any(c.isalnum() for c in p) or EDITORIAL.match(p):
            continue
        if in_front_matter and not (PROSE_END.search(p) and any(c.islower() for c in p)):
            continue  # title, "By Jane Austen", "(1811)", an all-caps heading
        out.append(p)
    return out


def _manifest_ok(out_dir: Path, deb_sha: str | None) -> dict | None:
    """The manifest when it describes the files on disk (and ``deb_sha``'s .deb, if given)."""
    try:
        manifest = read_manifest(out_dir)
        if manifest.get("version") != CORPUS_VERSION or (deb_sha is not None and manifest["deb"]["sha256"] != deb_sha):
            return None
        files = {e["file"]: e for e in [manifest["splits"][s] for s in SPLITS]}
        return None if check_files(out_dir, files, ("sha256",)) else manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def split_paragraphs(books: dict[str, list[str]]) -> dict[str, list[str]]:
    """Train/validation paragraphs: whole books per split, train minus any validation paragraph."""
    validation = [p for title in VALIDATION_BOOKS for p in to_paragraphs(books[title])]
    held_out = set(validation)
    train = [p for title, lines in books.items() if title not in VALIDATION_BOOKS
             for p in to_paragraphs(lines) if p not in held_out]
    return {"train": train, "validation": validation}


def build_austen_corpus(data_dir: Path, deb: Path | None = None) -> dict[str, Path]:
    """Write ``data_dir/austen/{train,validation}.txt`` once; return ``{"train": …, "validation": …}``.

    A manifest that matches the files (and the .deb, when one is given or set by
    ``DISTILL_AUSTEN_DEB``) makes this a no-op; otherwise the folder is rebuilt beside the old one
    and swapped in whole, so an interrupted build leaves the previous corpus (or none) in place.
    """
    out_dir = Path(data_dir) / "austen"
    paths = {split: out_dir / f"{split}.txt" for split in SPLITS}
    if deb is None and not os.environ.get("DISTILL_AUSTEN_DEB") and _manifest_ok(out_dir, None):
        return paths
    deb = Path(deb) if deb is not None else fetch_austen_deb(Path(data_dir) / "downloads")
    if not deb.is_file():
        raise CorpusError(f"{deb}: no such .deb")
    deb_sha = sha256_file(deb)
    if _manifest_ok(out_dir, deb_sha):
        return paths

    splits = split_paragraphs(read_austen_books(deb))
    if empty := [split for split, paragraphs in splits.items() if not paragraphs]:
        raise CorpusError(f"{deb}: the {empty[0]} split came out empty")
    manifest = {"version": CORPUS_VERSION, "source": DEB_PACKAGE,
                "deb": {"file": deb.name, "sha256": deb_sha}, "splits": {}}
    with atomic_dir(out_dir) as tmp:
        for split, paragraphs in splits.items():
            text = "".join(p + "\n" for p in paragraphs)
            (tmp / paths[split].name).write_text(text, encoding="utf-8", newline="\n")
            manifest["splits"][split] = {
                "file": paths[split].name, "sha256": sha256_file(tmp / paths[split].name),
                "books": [t for t in BOOKS.values() if (t in VALIDATION_BOOKS) == (split == "validation")],
                "paragraphs": len(paragraphs), "characters": sum(map(len, paragraphs))}
        write_manifest(tmp, manifest)
    for split, entry in manifest["splits"].items():
        log.info("austen %s: %d paragraphs, %d characters", split, entry["paragraphs"], entry["characters"])
    return paths

