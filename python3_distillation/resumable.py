"""Outputs written over one or more runs: a work folder published whole when complete, and append-only JSONL.

    python -c "from python3_distillation.resumable import jsonl_rows; print(jsonl_rows('runs/v2/metrics.jsonl')[-1])"

Every ``manifest.json`` is written, read and checked here. Design notes: docs/design/data.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from python3_distillation.errors import DataError
from python3_distillation.fsio import atomic_write_text, publish_dir, sha256_file

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
MANIFEST = "manifest.json"


class WorkFolder:
    """``dest`` in the making: the folder ``.<name>.partial`` beside it (same file system: the publish is a rename)."""

    def __init__(self, dest: str | Path):
        self.dest = Path(dest)
        self.path = self.dest.with_name(f".{self.dest.name}.partial")

    def resume(self, accept: Callable[[dict], bool]) -> dict | None:
        """The progress record of an interrupted run when ``accept`` takes it; else None, and an empty folder."""
        try:
            record = json.loads((self.path / PROGRESS).read_text())
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict) and accept(record):
            return record
        self.start()
        return None

    def start(self) -> None:
        """An empty work folder (whatever was there is removed)."""
        self.discard()
        self.path.mkdir(parents=True)

    def commit(self, record: dict, sync: Iterable[Path] = ()) -> None:
        """Record progress; the files in ``sync`` are synced first, so the record never claims more than is on disk."""
        for path in sync:
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        atomic_write_text(self.path / PROGRESS, json.dumps(record, indent=1))

    def publish(self, manifest: dict | None = None) -> None:
        """The progress record goes, ``manifest.json`` is written last, and the folder replaces ``dest`` whole."""
        (self.path / PROGRESS).unlink(missing_ok=True)
        if manifest is not None:
            write_manifest(self.path, manifest)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        publish_dir(self.path, self.dest)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def write_manifest(folder: Path, manifest: dict) -> None:
    """``folder/manifest.json``, UTF-8 and indented; written last, its presence says the folder is complete."""
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_manifest(folder: Path) -> dict:
    """``folder``'s manifest: FileNotFoundError when there is none, ValueError or TypeError when not a JSON object."""
    manifest = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    if not isinstance(manifest, dict):
        raise TypeError(f"{MANIFEST} is not a JSON object")
    return manifest


def file_entries(folder: Path) -> dict[str, dict]:
    """``{name: {"bytes", "sha256"}}`` of every file in ``folder`` but the manifest."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != MANIFEST}


def check_files(folder: Path, files: dict[str, dict], keys=("bytes", "sha256"), complete: bool = False) -> str | None:
    """Why the files in ``folder`` do not match ``files`` (name → its manifest entry), or None when they do;
    ``keys``: what is compared, ``bytes`` (the size: cheap, catches a truncated file) and/or ``sha256``
    (reads every byte); ``complete``: anything in the folder that is not listed is a mismatch too."""
    folder = Path(folder)
    if complete and (extra := sorted({p.name for p in folder.iterdir() if p.name != MANIFEST} - set(files))):
        return f"files not in its manifest: {', '.join(extra)} (tampered with?)"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size, want = path.stat().st_size, entry.get("bytes")
        if "bytes" in keys and size != want:
            return f"{name} does not match its manifest: {size} bytes, not {want} (truncated, corrupt or tampered with)"
        if "sha256" in keys and sha256_file(path) != entry.get("sha256"):
            return f"{name} does not match its sha256 in the manifest (corrupt or tampered with)"
    return None


def jsonl_rows(path: str | Path) -> list[dict]:
    """The rows of an append-only JSONL file, one object a line. A last line without its newline was
    torn by a kill: it is cut off the file (a warning says so). Any other line that is not a JSON
    object is a DataError naming ``path:line``."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    rows = []
    for n, raw in enumerate(lines[:-1], 1):
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: not a JSON line; the file is not one this project wrote")
        rows.append(row)
    if lines[-1]:
        log.warning("%s: dropping a line cut off by an interrupted run (%d bytes)", path, len(lines[-1]))
        os.truncate(path, path.stat().st_size - len(lines[-1]))
    return rows


def append_jsonl(path: str | Path, rows: Iterable[dict], sync: bool = False) -> None:
    """Append one line per row; ``sync``: on disk before returning (a kill after it loses none of them)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        if sync:
            f.flush()
            os.fsync(f.fileno())
