"""Where the documents come from: local files, the embedded corpus or a streamed hub set, and the seeded hold-out.

    python -c "from python3_distillation.config import DataConfig; from python3_distillation.data.sources import \\
plan_sources; print(plan_sources(DataConfig()).fingerprint)"
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from python3_distillation.config import DataConfig
from python3_distillation.corpus import build_austen_corpus
from python3_distillation.data.documents import expand, is_local_spec, local_documents
from python3_distillation.errors import DataError
from python3_distillation.fsio import sha256_file
from python3_distillation.paths import data_dir as default_data_dir

SPLITS = ("train", "validation")


@dataclass
class Source:
    """A stream of documents: how to open it, what it is, and a fingerprint that changes with it."""

    describe: str
    fingerprint: str
    open: Callable[[], Iterator[tuple[str, int]]]  # a fresh pass: (document, raw bytes it took)
    n_bytes: int | None = None  # the size of the text when known (local files)


def local_source(spec: str, cfg: DataConfig) -> Source:
    files = expand(spec)
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + bytes.fromhex(sha256_file(path)))
    return Source(describe=", ".join(str(p) for p in files), fingerprint=digest.hexdigest(),
                  open=lambda: local_documents(spec, files, cfg), n_bytes=sum(p.stat().st_size for p in files))


def _hub_error(spec: str, e: Exception) -> DataError:
    return DataError(f"hub dataset {spec!r} could not be loaded ({type(e).__name__}: "
                     f"{(str(e).splitlines() or [''])[0][:200]}); offline, use local .txt/.jsonl files instead")


def stream_source(spec: str, split: str, text_field: str, name: str, config: str | None = None, **load_kwargs) -> Source:
    """One split of a ``datasets`` set read with ``streaming=True``: rows arrive as they are
    downloaded, so a set larger than memory (or than the hub cache) is never held whole."""

    def open_docs() -> Iterator[tuple[str, int]]:
        from datasets import load_dataset

        try:
            rows = load_dataset(name, config or None, split=split, streaming=True, **load_kwargs)
        except Exception as e:  # offline, no such set, no network: each is one line for the user
            raise _hub_error(spec, e) from None
        found = False
        for row in rows:
            if text_field not in row:
                raise DataError(f"dataset {spec!r} has no column {text_field!r} (has {sorted(row)})")
            text = row[text_field]
            if isinstance(text, str) and text.strip():
                found = True
                yield text.strip(), len(text.encode("utf-8"))
        if not found:
            raise DataError(f"dataset {spec!r} has no non-empty {split} split")

    return Source(describe=f"{spec} [{split}] (streamed)", fingerprint=f"stream:{spec}:{split}", open=open_docs)


def _hub_sources(spec: str, cfg: DataConfig) -> dict[str, Source]:
    """The hub set's ``train`` and, when it has one, ``validation`` split (needs the network)."""
    from datasets import get_dataset_split_names

    name, _, config = spec.partition(":")
    try:
        names = get_dataset_split_names(name, config or None)
    except Exception as e:  # offline, no such set, no network: each is one line for the user
        raise _hub_error(spec, e) from None
    if "train" not in names:
        raise DataError(f"hub dataset {spec!r} has no train split (has {names})")
    return {s: stream_source(spec, s, cfg.text_field, name, config) for s in SPLITS if s in names}


@dataclass
class Plan:
    """What to tokenize: a source per split, or a train source with a seeded hold-out."""

    sources: dict[str, Source]
    holdout: tuple[float, int] | None  # (fraction, seed) when validation comes out of train
    fingerprint: str


def plan_sources(cfg: DataConfig, data_dir: Path | None = None, seed: int = 0) -> Plan:
    """Resolve ``cfg.train`` / ``cfg.validation`` into sources (reading nothing but file hashes)."""
    data_dir = Path(data_dir or default_data_dir())
    if cfg.train == "austen":
        paths = build_austen_corpus(data_dir)  # one paragraph per line: "auto" reads it as lines
        sources = {s: local_source(str(paths[s]), cfg) for s in SPLITS}
        fingerprint = f"austen:{sources['train'].fingerprint}:{sources['validation'].fingerprint}"
    elif is_local_spec(cfg.train):
        sources = {"train": local_source(cfg.train, cfg)}
        fingerprint = sources["train"].fingerprint
    else:
        sources = _hub_sources(cfg.train, cfg)
        fingerprint = f"hub:{cfg.train}"

    if cfg.validation:
        if is_local_spec(cfg.validation):
            sources["validation"] = local_source(cfg.validation, cfg)
        else:
            hub = _hub_sources(cfg.validation, cfg)
            if "validation" not in hub:
                raise DataError(f"hub dataset {cfg.validation!r} has no validation split")
            sources["validation"] = hub["validation"]
        fingerprint += f"|val:{sources['validation'].fingerprint}"
    holdout = None
    if "validation" not in sources:
        holdout = (cfg.validation_fraction, seed)
        fingerprint += f"|holdout:{cfg.validation_fraction}:{seed}"
    return Plan(sources, holdout, fingerprint)


def held_out(start: int, n: int, fraction: float, seed: int) -> np.ndarray:
    """Whether documents ``start .. start+n-1`` of a stream go to validation.

    A seeded hash of the document's index (splitmix64), so the choice needs no document count (a
    streamed hub set has none up front) and does not depend on how the stream is cut into pieces.
    """
    x = np.arange(start, start + n, dtype=np.uint64)
    x = x + np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction
