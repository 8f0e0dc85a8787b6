"""A small standard-library reader of R's serialization format and of R lazy-load databases.

    python -m python3_distillation.rdata path/to/Rdata.rdx path/to/Rdata.rdb

Covers what R packages ship as data (``data/Rdata.rdx`` + ``data/Rdata.rdb``, ``*.rds``): XDR
streams ("X\\n", format versions 2 and 3), NULL, symbols, pairlists with tags/attributes,
CHARSXP (NA, UTF-8, latin1, bytes, native), logical/integer/double/complex/raw/character vectors,
lists, environments, references, persistent references and the common ALTREP classes. Anything
else (byte code, external pointers' contents, ...) raises :class:`RDataError` naming the type.

Values come back as plain Python where that loses nothing (``None`` for NULL) and otherwise as
:class:`RVector` (a ``list`` with ``rtype`` and ``attributes``), :class:`RPairlist`,
:class:`RSymbol`, :class:`REnvironment` or :class:`RObject`. Missing values (NA) become ``None``.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

BytesOrPath = Union[bytes, bytearray, memoryview, str, Path]


class RDataError(ValueError):
    """R data could not be read (message says where and why)."""


# SEXP type codes (R's Rinternals.h) and the stream-only pseudo-types (serialize.c).
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP = 7, 8, 9, 10, 13, 14, 15
STRSXP, DOTSXP, VECSXP, EXPRSXP, BCODESXP, EXTPTRSXP, WEAKREFSXP = 16, 17, 19, 20, 21, 22, 23
RAWSXP, S4SXP = 24, 25
ALTREP_SXP, ATTRLISTSXP, ATTRLANGSXP, BASEENV_SXP, EMPTYENV_SXP = 238, 239, 240, 241, 242
BCREPREF, BCREPDEF, GENERICREFSXP, CLASSREFSXP, PERSISTSXP = 243, 244, 245, 246, 247
PACKAGESXP, NAMESPACESXP, BASENAMESPACE_SXP, MISSINGARG_SXP = 248, 249, 250, 251
UNBOUNDVALUE_SXP, GLOBALENV_SXP, NILVALUE_SXP, REFSXP = 252, 253, 254, 255

TYPE_NAMES = {
    NILSXP: "NULL", SYMSXP: "symbol", LISTSXP: "pairlist", CLOSXP: "closure", ENVSXP: "environment",
    PROMSXP: "promise", LANGSXP: "language", SPECIALSXP: "special", BUILTINSXP: "builtin",
    CHARSXP: "char", LGLSXP: "logical", INTSXP: "integer", REALSXP: "double", CPLXSXP: "complex",
    STRSXP: "character", DOTSXP: "...", VECSXP: "list", EXPRSXP: "expression",
    BCODESXP: "bytecode", EXTPTRSXP: "externalptr", WEAKREFSXP: "weakref", RAWSXP: "raw",
    S4SXP: "S4", ALTREP_SXP: "altrep", BCREPREF: "bytecode reference", BCREPDEF: "bytecode definition",
    GENERICREFSXP: "generic reference", CLASSREFSXP: "class reference",
}

# Flag bits of a CHARSXP's "levels" (R's Defn.h): how its bytes are encoded.
BYTES_MASK, LATIN1_MASK, UTF8_MASK, ASCII_MASK = 1 << 1, 1 << 2, 1 << 3, 1 << 6
NA_INTEGER = -(2**31)  # R's NA for integers and logicals
NA_REAL_LOW_WORD = 1954  # R's NA_real_ is the NaN whose low 32-bit word is 1954 (R's Arithmetic.c)


class RVector(list):
    """An R atomic vector or list: the elements, R's type name and its attributes (``names``, ...)."""

    def __init__(self, items=(), rtype: str = "list", attributes: dict | None = None):
        super().__init__(items)
        self.rtype = rtype
        self.attributes = attributes or {}

    def __repr__(self) -> str:
        head = list.__repr__(self[:5])[:-1] + (", ...]" if len(self) > 5 else "]")
        return f"RVector<{self.rtype}, n={len(self)}, attrs={sorted(self.attributes)}>{head}"

    @property
    def names(self) -> list | None:
        return self.attributes.get("names")

    def as_dict(self) -> dict:
        """``{name: element}`` for a named vector or list (an unnamed one raises)."""
        names = self.names
        if names is None:
            raise RDataError(f"R {self.rtype} vector has no names attribute")
        return dict(zip(names, self))


class RPairlist(list):
    """An R pairlist (or call, when ``rtype == "language"``): values, their tags, its attributes."""

    def __init__(self, items=(), tags=(), rtype: str = "pairlist", attributes: dict | None = None):
        super().__init__(items)
        self.tags = list(tags)
        self.rtype = rtype
        self.attributes = attributes or {}

    def as_dict(self) -> dict:
        return dict(zip(self.tags, self))


@dataclass(frozen=True)
class RSymbol:
    name: str


@dataclass(eq=False)
class REnvironment:
    """An environment; ``name`` is set for the global/base/empty ones and for package/namespace refs."""

    name: str | None = None
    frame: dict = field(default_factory=dict)
    enclosure: object = None
    locked: bool = False
    attributes: dict = field(default_factory=dict)


@dataclass(eq=False)
class RObject:
    """Any other R object (closure, promise, S4 object, persistent reference, ...) by its parts."""

    rtype: str
    parts: dict = field(default_factory=dict)
    attributes: dict = field(default_factory=dict)


GLOBAL_ENV, BASE_ENV, EMPTY_ENV = REnvironment("R_GlobalEnv"), REnvironment("base"), REnvironment("R_EmptyEnv")
BASE_NAMESPACE = REnvironment("namespace:base")
MISSING_ARG, UNBOUND_VALUE = RObject("missing argument"), RObject("unbound value")
SPECIAL_VALUES = {
    NILVALUE_SXP: None, GLOBALENV_SXP: GLOBAL_ENV, BASEENV_SXP: BASE_ENV, EMPTYENV_SXP: EMPTY_ENV,
    BASENAMESPACE_SXP: BASE_NAMESPACE, MISSINGARG_SXP: MISSING_ARG, UNBOUNDVALUE_SXP: UNBOUND_VALUE,
}


def _na_or(x: int) -> int | None:
    return None if x == NA_INTEGER else x


class _Reader:
    """One pass over an XDR stream; mirrors ``ReadItem`` in R's src/main/serialize.c."""

    def __init__(self, data: bytes, persistent_hook: Callable[[list], object] | None):
        self.buf = memoryview(data)
        self.pos = 0
        self.refs: list = []
        self.native_encoding = "utf-8"
        self.persistent_hook = persistent_hook

    # -- primitive reads ------------------------------------------------------------------------
    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise RDataError(f"R stream truncated: need {n} bytes at offset {self.pos}, {len(self.buf) - self.pos} left")
        chunk = self.buf[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def ints(self, n: int) -> tuple:
        return struct.unpack(f">{n}i", self.take(4 * n))

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints, upper then lower 32 bits
            upper, lower = self.ints(2)
            n = (upper << 32) + (lower & 0xFFFFFFFF)
        if n < 0:
            raise RDataError(f"R stream: negative length {n} at offset {self.pos - 4}")
        return n

    def doubles(self, n: int) -> list:
        raw = self.take(8 * n)
        values = list(struct.unpack(f">{n}d", raw))
        for i, v in enumerate(values):
            if math.isnan(v) and struct.unpack_from(">I", raw, 8 * i + 4)[0] == NA_REAL_LOW_WORD:
                values[i] = None  # NA_real_; other NaNs stay float('nan')
        return values

    # -- header ---------------------------------------------------------------------------------
    def header(self) -> None:
        fmt = bytes(self.take(2))
        if fmt != b"X\n":
            kind = {b"A\n": "ASCII", b"B\n": "native binary"}.get(fmt, repr(fmt))
            raise RDataError(f"R stream format {kind} is not supported (only XDR 'X\\n')")
        version, _writer, _min_reader = self.ints(3)
        if version == 3:
            self.native_encoding = bytes(self.take(self.int())).decode("ascii", "replace") or "utf-8"
        elif version != 2:
            raise RDataError(f"R serialization format version {version} is not supported (2 or 3)")

    # -- items ----------------------------------------------------------------------------------
    def charsxp(self, levels: int) -> str | bytes | None:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = bytes(self.take(n))
        if levels & BYTES_MASK:
            return raw
        if levels & LATIN1_MASK:
            return raw.decode("latin-1")
        if levels & (UTF8_MASK | ASCII_MASK):
            encoding = "utf-8"
        else:
            encoding = self.native_encoding
        try:
            return raw.decode(encoding)
        except (UnicodeDecodeError, LookupError) as e:
            raise RDataError(f"R string at offset {self.pos - n} is not valid {encoding}: {e}") from e

    def string_vec(self) -> list:
        """``InStringVec``: a 0, a length, then that many CHARSXP items (persistent/package names)."""
        if self.int() != 0:
            raise RDataError("R stream: malformed string vector in a reference")
        return [self.item() for _ in range(self.length())]

    def attributes(self, has_attr: bool) -> dict:
        if not has_attr:
            return {}
        pl = self.item()
        if pl is None:
            return {}
        if not isinstance(pl, RPairlist):
            raise RDataError(f"R stream: attributes are a {type(pl).__name__}, expected a pairlist")
        return {(t.name if isinstance(t, RSymbol) else t): v for t, v in zip(pl.tags, pl)}

    def pairlist(self, sexptype: int, flags: int) -> RPairlist:
        # A pairlist is a chain of cons cells: read it as a loop, not by recursion on the CDR,
        # so a long argument list cannot exhaust Python's stack.
        out = RPairlist(rtype=TYPE_NAMES.get(sexptype, "pairlist"))
        first = True
        while True:
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
            attrs = self.attributes(has_attr)
            if first:
                out.attributes = attrs
                first = False
            tag = self.item() if has_tag else None
            out.tags.append(tag.name if isinstance(tag, RSymbol) else tag)
            out.append(self.item())
            flags = self.int()
            nxt = flags & 0xFF
            if nxt in (LISTSXP, ATTRLISTSXP) and sexptype in (LISTSXP, LANGSXP, DOTSXP):
                continue
            tail = self.item_from_flags(flags)
            if tail is not None:  # a dotted pair: keep its tail as a last, untagged element
                out.tags.append(None)
                out.append(tail)
            return out

    def vector(self, sexptype: int) -> list:
        n = self.length()
        if sexptype == LGLSXP:
            return [None if v == NA_INTEGER else bool(v) for v in self.ints(n)]
        if sexptype == INTSXP:
            return [_na_or(v) for v in self.ints(n)]
        if sexptype == REALSXP:
            return self.doubles(n)
        if sexptype == CPLXSXP:
            parts = self.doubles(2 * n)
            return [None if re is None or im is None else complex(re, im) for re, im in zip(parts[::2], parts[1::2])]
        if sexptype == RAWSXP:
            return [bytes(self.take(n))]
        if sexptype in (STRSXP, VECSXP, EXPRSXP):
            return [self.item() for _ in range(n)]
        raise AssertionError(sexptype)

    def item(self) -> object:
        return self.item_from_flags(self.int())

    def item_from_flags(self, flags: int) -> object:
        sexptype = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))

        if sexptype in SPECIAL_VALUES:
            return SPECIAL_VALUES[sexptype]
        if sexptype == REFSXP:
            index = (flags >> 8) or self.int()
            if not 1 <= index <= len(self.refs):
                raise RDataError(f"R stream: reference {index} out of range (table has {len(self.refs)})")
            return self.refs[index - 1]
        if sexptype == PERSISTSXP:
            names = self.string_vec()
            value = self.persistent_hook(names) if self.persistent_hook else RObject("persistent", {"names": names})
            self.refs.append(value)
            return value
        if sexptype == SYMSXP:
            name = self.item()  # a CHARSXP
            sym = RSymbol(name if isinstance(name, str) else repr(name))
            self.refs.append(sym)
            return sym
        if sexptype in (PACKAGESXP, NAMESPACESXP):
            names = self.string_vec()
            kind = "package" if sexptype == PACKAGESXP else "namespace"
            env = REnvironment(f"{kind}:{names[0] if names else '?'}")
            self.refs.append(env)
            return env
        if sexptype == ENVSXP:
            locked = self.int()
            env = REnvironment(locked=bool(locked))
            self.refs.append(env)  # before its contents: they may refer back to it
            env.enclosure = self.item()
            frame, hashtab = self.item(), self.item()
            env.attributes = self.attributes(True)
            for part in (frame, *(hashtab if isinstance(hashtab, list) else [])):
                if isinstance(part, RPairlist):
                    env.frame.update(part.as_dict())
            return env
        if sexptype in (LISTSXP, LANGSXP, DOTSXP):
            return self.pairlist(sexptype, flags)
        if sexptype in (ATTRLISTSXP, ATTRLANGSXP):
            return self.pairlist(LISTSXP if sexptype == ATTRLISTSXP else LANGSXP, flags | (1 << 9))
        if sexptype in (CLOSXP, PROMSXP):
            has_tag = bool(flags & (1 << 10))
            attrs = self.attributes(has_attr)
            env = self.item() if has_tag else None
            car, cdr = self.item(), self.item()
            names = ("formals", "body") if sexptype == CLOSXP else ("value", "expression")
            return RObject(TYPE_NAMES[sexptype], {names[0]: car, names[1]: cdr, "environment": env}, attrs)
        if sexptype in (SPECIALSXP, BUILTINSXP):
            name = bytes(self.take(self.int())).decode("ascii", "replace")
            return RObject(TYPE_NAMES[sexptype], {"name": name})
        if sexptype == CHARSXP:
            value = self.charsxp(levels)
            self.attributes(has_attr)  # old writers may attach one; R reads and drops it
            return value
        if sexptype in (LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP, VECSXP, EXPRSXP, RAWSXP):
            items = self.vector(sexptype)
            if sexptype == RAWSXP:
                items = list(items[0])  # ints 0..255, like R's as.integer(raw)
            return RVector(items, TYPE_NAMES[sexptype], self.attributes(has_attr))
        if sexptype == S4SXP:
            return RObject("S4", {}, self.attributes(has_attr))
        if sexptype == ALTREP_SXP:
            return self.altrep()
        name = TYPE_NAMES.get(sexptype, f"code {sexptype}")
        raise RDataError(f"R type {name} (SEXPTYPE {sexptype}) at offset {self.pos - 4} is not supported")

    def altrep(self) -> object:
        """Expand the ALTREP classes base R writes (compact sequences, wrappers, deferred strings)."""
        info, state, attr = self.item(), self.item(), self.item()
        cls = info[0].name if isinstance(info, RPairlist) and isinstance(info[0], RSymbol) else str(info)
        attrs = {(t.name if isinstance(t, RSymbol) else t): v for t, v in zip(attr.tags, attr)} if isinstance(attr, RPairlist) else {}
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = (int(v) for v in state)
            values = [start + i * step for i in range(n)]
            return RVector(values if cls == "compact_intseq" else [float(v) for v in values],
                           "integer" if cls == "compact_intseq" else "double", attrs)
        if cls.startswith("wrap_"):
            inner = state[0]
            if isinstance(inner, RVector):
                return RVector(inner, inner.rtype, {**inner.attributes, **attrs})
            return inner
        if cls == "deferred_string":
            arg = state[0] if isinstance(state, RPairlist) else state
            if isinstance(arg, RVector):
                text = [None if v is None else _format_number(v) for v in arg]
                return RVector(text, "character", attrs)
        raise RDataError(f"R ALTREP class {cls!r} is not supported")


def _format_number(v: object) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def unserialize(data: bytes, persistent_hook: Callable[[list], object] | None = None) -> object:
    """Read one object from an uncompressed XDR stream (R's ``unserialize``)."""
    reader = _Reader(bytes(data), persistent_hook)
    reader.header()
    obj = reader.item()
    return obj


def decompress_rds(data: bytes) -> bytes:
    """The XDR stream inside an .rds/.rdx: gzip, bzip2, xz, R's length+zlib block, or already raw."""
    data = bytes(data)
    try:
        if data[:2] == b"\x1f\x8b":
            return gzip.decompress(data)
        if data[:3] == b"BZh":
            return bz2.decompress(data)
        if data[:6] == b"\xfd7zXZ\x00":
            return lzma.decompress(data)
        if data[:2] in (b"X\n", b"A\n", b"B\n"):
            return data
        return _decompress_block(data, 1)
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as e:
        raise RDataError(f"cannot decompress R data ({e})") from e


def read_rds(source: BytesOrPath) -> object:
    """Read an .rds file (or its bytes)."""
    return unserialize(decompress_rds(_load(source)))


def _decompress_block(blob: bytes, compressed: int) -> bytes:
    """One lazy-load DB entry: 4-byte big-endian uncompressed length, then zlib (or typed) data."""
    if compressed == 0:
        return blob
    if len(blob) < 4:
        raise RDataError(f"lazy-load entry of {len(blob)} bytes is too short")
    (expected,) = struct.unpack(">I", blob[:4])
    body = blob[4:]
    try:
        if compressed == 1:
            out = zlib.decompress(body)
        else:
            # compress = 2 (bzip2) or 3 (xz) in makeLazyLoadDB: a type byte comes first.
            kind, body = body[:1], body[1:]
            if kind == b"2":
                out = bz2.decompress(body)
            elif kind == b"Z":
                out = lzma.decompress(body)
            elif kind == b"1":
                out = zlib.decompress(body)
            elif kind == b"0":
                out = bytes(body)
            else:
                raise RDataError(f"lazy-load entry has unknown compression type {kind!r}")
    except (zlib.error, OSError, EOFError, lzma.LZMAError) as e:
        raise RDataError(f"lazy-load entry does not decompress ({e})") from e
    if len(out) != expected:
        raise RDataError(f"lazy-load entry decompressed to {len(out)} bytes, header says {expected}")
    return out


def _load(source: BytesOrPath) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    try:
        return Path(source).read_bytes()
    except OSError as e:
        raise RDataError(f"{source}: cannot read ({e.strerror or e})") from e


def read_lazyload_db(rdx: BytesOrPath, rdb: BytesOrPath) -> dict[str, object]:
    """Every variable of an R lazy-load database (``X.rdx`` index + ``X.rdb`` blobs), by name."""
    index = read_rds(rdx)
    if not isinstance(index, RVector) or index.names is None:
        raise RDataError("lazy-load index is not a named list")
    parts = index.as_dict()
    if "variables" not in parts:
        raise RDataError("lazy-load index has no 'variables' entry")
    # makeLazyLoadDB's `compress`: TRUE (zlib, the default), 2 (bzip2), 3 (xz), FALSE (none).
    comp = parts.get("compressed")
    compressed = int(comp[0]) if isinstance(comp, list) and comp and comp[0] is not None else 1
    db = _load(rdb)
    references = parts.get("references")
    ref_table = references.as_dict() if isinstance(references, RVector) and references.names else {}
    ref_cache: dict[str, object] = {}

    def fetch(key: object, what: str) -> object:
        if not isinstance(key, list) or len(key) != 2 or any(k is None for k in key):
            raise RDataError(f"lazy-load index entry for {what} is not an (offset, length) pair")
        offset, length = int(key[0]), int(key[1])
        if offset < 0 or length < 0 or offset + length > len(db):
            raise RDataError(f"lazy-load entry {what} ({offset}+{length}) lies outside the {len(db)}-byte .rdb")
        try:
            return unserialize(_decompress_block(db[offset : offset + length], compressed), hook)
        except RDataError as e:
            raise RDataError(f"{what}: {e}") from e

    def hook(names: list) -> object:
        # Environments shared between variables are stored once under "references"; R restores
        # them from a list(bindings=, enclos=, ...); here that list itself is the value.
        name = names[0] if names else None
        if name not in ref_table:
            return RObject("persistent", {"names": names})
        if name not in ref_cache:
            ref_cache[name] = RObject("persistent", {"names": names})  # breaks cycles
            ref_cache[name] = fetch(ref_table[name], f"reference {name}")
        return ref_cache[name]

    variables = parts["variables"]
    if not isinstance(variables, RVector) or (len(variables) and variables.names is None):
        raise RDataError("lazy-load index 'variables' is not a named list")
    return {name: fetch(key, repr(name)) for name, key in variables.as_dict().items()} if len(variables) else {}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 1:
        print(repr(read_rds(args[0])))
        return 0
    if len(args) != 2:
        print("usage: python -m python3_distillation.rdata FILE.rds | FILE.rdx FILE.rdb", file=sys.stderr)
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
