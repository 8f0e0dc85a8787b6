"""Text files → documents, read as a stream: ``.txt`` split by line, paragraph or file, ``.jsonl`` by row.

    python -c "from python3_distillation.data import split_documents; print(split_documents('a\\n\\nb', 'auto'))"
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from python3_distillation.config import DataConfig
from python3_distillation.errors import DataError

JSONL_SUFFIXES = {".jsonl", ".json"}
SUFFIXES = {".txt", ".text", ".md"} | JSONL_SUFFIXES  # the files read from a folder


def _file_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(raw bytes, line)`` for each line of a UTF-8 file; ``\\r\\n`` and a lone ``\\r`` end lines
    too, as when the whole text is normalised first. Bad bytes are a DataError naming ``path:line``."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text (invalid byte at column {e.start + 1})") from None
            first, *rest = line.removesuffix("\n").removesuffix("\r").split("\r")
            yield len(raw), first
            for part in rest:
                yield 0, part


def _has_paragraphs(lines: Iterable[str]) -> bool:
    """True when an empty line separates text (``"\\n\\n" in text.strip()``), read line by line."""
    seen_text = gap = False
    for line in lines:
        if line == "":
            gap = seen_text
        elif line.strip():
            if gap:
                return True
            seen_text = True
    return False


def _documents(lines: Iterable[tuple[int, str]], mode: str) -> Iterator[tuple[str, int]]:
    """``(document, raw bytes it took)`` from ``(raw bytes, line)`` pairs in ``line``/``paragraph``/``file`` mode."""
    if mode == "line":
        pending = 0
        for size, line in lines:
            pending += size
            if line.strip():
                yield line.strip(), pending
                pending = 0
    elif mode == "paragraph":
        group: list[str] = []
        pending = 0
        for size, line in itertools.chain(lines, [(0, "")]):  # a last empty line ends the last paragraph
            pending += size
            if line == "":
                doc = "\n".join(group).strip()
                if doc:
                    yield doc, pending
                    pending = 0
                group = []
            else:
                group.append(line)
    else:
        pairs = list(lines)
        doc = "\n".join(line for _, line in pairs).strip()
        if doc:
            yield doc, sum(size for size, _ in pairs)


def split_documents(text: str, mode: str) -> list[str]:
    """Split one .txt file's text into documents (see ``DataConfig.document``)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if mode == "auto":
        mode = "paragraph" if _has_paragraphs(lines) else "line"
    return [doc for doc, _ in _documents(((0, line) for line in lines), mode)]


def _jsonl_documents(path: Path, text_field: str) -> Iterator[tuple[str, int]]:
    n = 0
    for size, line in _file_lines(path):
        n += 1 if size else 0  # a lone \r is not a JSONL line break; keep numbering by \n
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            raise DataError(f"{path}:{n}: expected an object with a string field {text_field!r}")
        if row[text_field].strip():
            yield row[text_field].strip(), size


def expand(spec: str) -> list[Path]:
    files: list[Path] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        path = Path(part).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not found:
                raise DataError(f"{path}: folder holds no .txt or .jsonl files")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise DataError(f"{path}: unsupported file type (use .txt or .jsonl)")
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def is_local_spec(spec: str) -> bool:
    """Local when a part exists, names a .txt/.jsonl file, or is written as a path; else a hub id."""
    return any(Path(part).expanduser().exists() or part.startswith(("/", "./", "../", "~"))
               or Path(part).suffix.lower() in SUFFIXES
               for part in (p.strip() for p in spec.split(",") if p.strip()))


def local_documents(spec: str, files: list[Path], cfg: DataConfig) -> Iterator[tuple[str, int]]:
    found = False
    for path in files:
        if path.suffix.lower() in JSONL_SUFFIXES:
            docs = _jsonl_documents(path, cfg.text_field)
        else:
            mode = cfg.document
            if mode == "auto":  # one extra read of the file, stopping at the first paragraph break
                mode = "paragraph" if _has_paragraphs(line for _, line in _file_lines(path)) else "line"
            docs = _documents(_file_lines(path), mode)
        for doc in docs:
            found = True
            yield doc
    if not found:
        raise DataError(f"{spec}: no text found (empty files?)")


def iter_local(spec: str, cfg: DataConfig) -> Iterator[str]:
    """The documents of local files or folders, in order, read as a stream."""
    return (doc for doc, _ in local_documents(spec, expand(spec), cfg))
