"""Character vectors out of an R lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb`` entries).

    python -m python3_distillation.rdata path/to/Rdata.rdx path/to/Rdata.rdb

R packages ship their ``data/`` this way. Types such data does not use, and every malformed input,
raise :class:`RDataError`. Design notes: docs/design/data.md.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Union

BytesOrPath = Union[bytes, bytearray, memoryview, str, Path]


class RDataError(ValueError):
    """R data could not be read (message says where and why)."""


# Each novel is ~1 MB serialized and the index a few hundred bytes; these caps hold for any input.
MAX_BYTES = 64 << 20  # largest decompressed stream accepted (index or one entry)
MAX_DEPTH = 32  # objects nested in objects; a lazy-load index nests 4 deep

# SEXP type codes (R's Rinternals.h) and the stream-only codes (serialize.c) read here.
SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, STRSXP, VECSXP = 1, 2, 9, 10, 13, 16, 19
NILVALUE_SXP, REFSXP = 254, 255
TYPE_NAMES = {LGLSXP: "logical", INTSXP: "integer", STRSXP: "character", VECSXP: "list"}
# Named in the error when met, so "unsupported" says what was found.
OTHER_TYPES = {0: "NULL", 3: "closure", 4: "environment", 5: "promise", 6: "language", 14: "double",
               15: "complex", 20: "expression", 21: "bytecode", 22: "externalptr", 24: "raw", 25: "S4",
               238: "ALTREP (compact sequence, wrapper, deferred string)", 247: "persistent reference"}
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10
# A CHARSXP's encoding bits (R's Defn.h, in the flags' "levels" above bit 12).
BYTES_MASK, LATIN1_MASK, UTF8_MASK, ASCII_MASK = 1 << 1, 1 << 2, 1 << 3, 1 << 6
NA_INTEGER = -(2**31)  # R's NA for integers and logicals


@dataclass(frozen=True)
class RSymbol:
    name: str


class RVector(list):
    """An R vector or list: its elements (NA → None), R's type name and its attributes."""

    def __init__(self, items=(), rtype: str = "list", attributes: dict | None = None):
        super().__init__(items)
        self.rtype, self.attributes = rtype, attributes or {}

    def __repr__(self) -> str:
        head = list.__repr__(self[:3])[:-1] + (", ...]" if len(self) > 3 else "]")
        return f"RVector<{self.rtype}, n={len(self)}, attrs={sorted(self.attributes)}>{head}"

    @property
    def names(self) -> list | None:
        return self.attributes.get("names")

    def as_dict(self) -> dict[str, object]:
        """``{name: element}`` of a named vector (unnamed, mis-sized or NA names raise)."""
        names = self.names
        if not isinstance(names, list) or len(names) != len(self) or not all(isinstance(n, str) for n in names):
            raise RDataError(f"R {self.rtype} vector of {len(self)} has no proper names attribute")
        return dict(zip(names, self))


class _Reader:
    """One pass over an XDR stream; follows ``ReadItem`` in R's src/main/serialize.c."""

    def __init__(self, data: bytes):
        self.buf = memoryview(data)
        self.pos = self.depth = 0
        self.symbols: list[RSymbol] = []  # R's reference table; symbols are all it holds here
        self.encoding = "utf-8"

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise RDataError(f"R stream truncated: need {n} bytes at offset {self.pos}, {len(self.buf) - self.pos} left")
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self, min_item_bytes: int) -> int:
        # Every element takes at least `min_item_bytes` of the stream: a length the rest of the
        # stream cannot hold is refused before anything is allocated for it.
        n, left = self.int(), len(self.buf) - self.pos
        if n < 0 or n * min_item_bytes > left:
            raise RDataError(f"R stream: length {n} at offset {self.pos - 4} does not fit the {left} bytes left")
        return n

    def header(self) -> None:
        if bytes(self.take(2)) != b"X\n":
            raise RDataError("not an XDR R serialization (no 'X\\n'; ASCII and native formats are not read)")
        version = struct.unpack(">3i", self.take(12))[0]  # then R's writer and minimum reader versions
        if version == 3:
            self.encoding = bytes(self.take(self.int())).decode("ascii", "replace") or "utf-8"
        elif version != 2:
            raise RDataError(f"R serialization format version {version} is not supported (2 or 3)")

    def string(self, levels: int) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = bytes(self.take(n))
        if levels & BYTES_MASK:
            raise RDataError(f"R string at offset {self.pos - n} is marked as raw bytes, not text")
        encoding = "latin-1" if levels & LATIN1_MASK else "utf-8" if levels & (UTF8_MASK | ASCII_MASK) else self.encoding
        try:
            return raw.decode(encoding)
        except (ValueError, LookupError) as e:  # a bad byte, or a bad encoding name in the header
            raise RDataError(f"R string at offset {self.pos - n} is not valid {encoding}: {e}") from e

    def item(self) -> object:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise RDataError(f"R stream nests deeper than {MAX_DEPTH} levels at offset {self.pos}")
            return self.item_from_flags(self.int())
        finally:
            self.depth -= 1

    def item_from_flags(self, flags: int) -> object:
        kind = flags & 0xFF
        if kind == NILVALUE_SXP:
            return None
        if kind == REFSXP:
            index = (flags >> 8) or self.int()
            if not 1 <= index <= len(self.symbols):
                raise RDataError(f"R stream: reference {index} out of range (table has {len(self.symbols)})")
            return self.symbols[index - 1]
        if kind == SYMSXP:
            flags = self.int()
            name = self.string(flags >> 12) if flags & 0xFF == CHARSXP else None
            if name is None:
                raise RDataError(f"R stream: symbol before offset {self.pos} has no name")
            self.symbols.append(RSymbol(name))
            return self.symbols[-1]
        if kind == LISTSXP:
            return self.pairlist(flags)
        if kind in (LGLSXP, INTSXP):
            n = self.length(4)
            values = struct.unpack(f">{n}i", self.take(4 * n))
            items = [None if v == NA_INTEGER else bool(v) if kind == LGLSXP else v for v in values]
        elif kind == STRSXP:
            items = []
            for _ in range(self.length(8)):  # each element: its flags and its length, at least
                flags_i = self.int()
                if flags_i & 0xFF != CHARSXP:
                    raise RDataError(f"R stream: character vector element at offset {self.pos - 4} is not a string")
                items.append(self.string(flags_i >> 12))
        elif kind == VECSXP:
            items = [self.item() for _ in range(self.length(4))]
        else:
            name = OTHER_TYPES.get(kind, f"code {kind}")
            raise RDataError(f"R type {name} (SEXPTYPE {kind}) at offset {self.pos - 4} is not supported")
        return RVector(items, TYPE_NAMES[kind], self.attributes() if flags & HAS_ATTR else {})

    def attributes(self) -> dict:
        pairs = self.item()
        if not isinstance(pairs, dict):
            raise RDataError(f"R stream: attributes before offset {self.pos} are not a pairlist")
        return pairs

    def pairlist(self, flags: int) -> dict[str, object]:
        """A tagged pairlist (how R writes attributes) as ``{tag: value}``. A chain of cells is read
        as a loop, not by recursing on each cell's tail, so its length costs no depth."""
        out: dict[str, object] = {}
        while True:
            if flags & HAS_ATTR:
                self.attributes()  # a cell's own attributes: nothing R data needs, skipped
            tag = self.item() if flags & HAS_TAG else None
            if not isinstance(tag, RSymbol):
                raise RDataError(f"R stream: pairlist cell before offset {self.pos} has no symbol tag")
            out[tag.name] = self.item()
            flags = self.int()
            if flags & 0xFF == NILVALUE_SXP:
                return out
            if flags & 0xFF != LISTSXP:
                raise RDataError(f"R stream: pairlist at offset {self.pos - 4} ends in type {flags & 0xFF}, not NULL")


def unserialize(data: bytes) -> object:
    """One object from an uncompressed XDR stream (R's ``unserialize``), which it must fill exactly."""
    reader = _Reader(bytes(data))
    reader.header()
    value = reader.item()
    if reader.pos != len(reader.buf):
        raise RDataError(f"R stream has {len(reader.buf) - reader.pos} bytes after its object")
    return value


def _inflate(data: bytes, decompressor, what: str, limit: int | None = None) -> bytes:
    """All of ``data`` decompressed, but never more than ``limit`` (default ``MAX_BYTES``) bytes of
    output: a few kB of zlib can expand to gigabytes, so the cap applies while decompressing."""
    limit = MAX_BYTES if limit is None else limit
    try:
        out = decompressor.decompress(data, limit + 1)
    except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError) as e:
        raise RDataError(f"{what} does not decompress ({e})") from e
    if len(out) > limit:
        raise RDataError(f"{what} decompresses to more than {limit} bytes")
    if not decompressor.eof:
        raise RDataError(f"{what} is truncated: its compressed stream stops early")
    if decompressor.unused_data:
        raise RDataError(f"{what} has {len(decompressor.unused_data)} bytes after its compressed stream")
    return out


# An .rdx is saveRDS'd: gzip by default, or bzip2, xz; told apart by their magic bytes.
INDEX_CODECS = {b"\x1f\x8b": lambda: zlib.decompressobj(wbits=16 + zlib.MAX_WBITS), b"BZh": bz2.BZ2Decompressor,
                b"\xfd7zXZ\x00": lzma.LZMADecompressor}


def _decompress_index(data: bytes) -> bytes:
    """The XDR stream of an .rdx (compressed or not)."""
    if data[:2] == b"X\n":
        return data
    for magic, codec in INDEX_CODECS.items():
        if data.startswith(magic):
            return _inflate(data, codec(), "lazy-load index")
    raise RDataError(f"lazy-load index starts with {data[:6]!r}: not gzip, bzip2, xz or an XDR stream")


# makeLazyLoadDB's compress = TRUE (the default) is zlib, 2 is bzip2, and 3 prefixes the body with a type byte.
ENTRY_CODECS = {b"1": zlib.decompressobj, b"2": bz2.BZ2Decompressor, b"Z": lzma.LZMADecompressor}


def _decompress_entry(blob: bytes, compressed: int) -> bytes:
    """One .rdb entry: a 4-byte big-endian uncompressed length + compressed data; stored as is if compress = FALSE."""
    if compressed == 0:
        return blob
    if len(blob) < 4:
        raise RDataError(f"{len(blob)} bytes are too short for an entry")
    (expected,) = struct.unpack(">I", blob[:4])
    if expected > MAX_BYTES:
        raise RDataError(f"its header says {expected} bytes, over the {MAX_BYTES}-byte limit")
    kind, body = (b"%d" % compressed, blob[4:]) if compressed in (1, 2) else (blob[4:5], blob[5:])
    if kind != b"0" and kind not in ENTRY_CODECS:
        raise RDataError(f"unknown compression type {kind!r}")
    out = bytes(body) if kind == b"0" else _inflate(body, ENTRY_CODECS[kind](), "its data", limit=expected)
    if len(out) != expected:
        raise RDataError(f"it holds {len(out)} bytes, its header says {expected}")
    return out


def _load(source: BytesOrPath) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    try:
        return Path(source).read_bytes()
    except OSError as e:
        raise RDataError(f"{source}: cannot read ({e.strerror or e})") from e


def read_lazyload_db(rdx: BytesOrPath, rdb: BytesOrPath) -> dict[str, object]:
    """Every variable of an R lazy-load database (``X.rdx`` index + ``X.rdb`` entries), by name."""
    index = unserialize(_decompress_index(_load(rdx)))
    if not isinstance(index, RVector) or index.rtype != "list":
        raise RDataError("lazy-load index is not a list")
    parts = index.as_dict()
    variables = parts.get("variables")
    if not isinstance(variables, RVector) or variables.rtype != "list":
        raise RDataError("lazy-load index has no 'variables' list")
    comp = parts.get("compressed", [True])
    compressed = int(comp[0]) if isinstance(comp, list) and len(comp) == 1 and comp[0] is not None else -1
    if compressed not in (0, 1, 2, 3):
        raise RDataError(f"lazy-load index 'compressed' is {comp!r}, not TRUE, FALSE, 2 or 3")
    db = _load(rdb)
    out = {}
    for name, key in (variables.as_dict() if variables else {}).items():
        if not (isinstance(key, RVector) and key.rtype == "integer" and len(key) == 2 and None not in key):
            raise RDataError(f"lazy-load index entry for {name!r} is not an (offset, length) pair")
        offset, length = key
        if offset < 0 or length < 0 or offset + length > len(db):
            raise RDataError(f"lazy-load entry {name!r} ({offset}+{length}) lies outside the {len(db)}-byte .rdb")
        try:
            out[name] = unserialize(_decompress_entry(db[offset : offset + length], compressed))
        except RDataError as e:
            raise RDataError(f"lazy-load entry {name!r}: {e}") from e
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m python3_distillation.rdata FILE.rdx FILE.rdb", file=sys.stderr)
        return 2
    try:
        objects = read_lazyload_db(args[0], args[1])
    except RDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, value in objects.items():
        print(f"{name}: {value!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
