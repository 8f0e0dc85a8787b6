"""Text → token blocks: read the sources, tokenize with ``datasets.map``, group into fixed blocks, cache.

    python -m python3_distillation data data.train=austen data.block_size=128

Sources (``DataConfig.train`` / ``.validation``): ``austen`` (the embedded corpus), local ``.txt`` /
``.jsonl`` files or folders (comma-separated), or a ``datasets`` hub spec ``name:config``
(``wikitext:wikitext-103-raw-v1``). Every document is followed by the EOS token, the stream is
cut into ``block_size`` blocks (the tail shorter than a block is dropped), and the result is cached
under ``<data dir>/blocks/<key>`` where the key hashes the tokenizer, the source contents and the
block settings, so a change to any of them rebuilds and nothing stale is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from python3_distillation.config import DataConfig
from python3_distillation.paths import data_dir as default_data_dir

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the tokenize/group logic changes
TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSONL_SUFFIXES = {".jsonl", ".json"}


class DataError(ValueError):
    """A data source is missing, empty, unreadable or not what it claims to be."""


@dataclass
class Blocks:
    """A split as one (n_blocks, block_size) int tensor of token ids."""

    ids: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.ids.numel()


# --------------------------------------------------------------------------- reading documents

def _read_utf8(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None


def split_documents(text: str, mode: str) -> list[str]:
    """Split one .txt file's text into documents (see ``DataConfig.document``)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if mode == "auto":
        mode = "paragraph" if "\n\n" in text.strip() else "line"
    if mode == "file":
        docs = [text.strip()]
    elif mode == "paragraph":
        docs = [p.strip() for p in text.split("\n\n")]
    else:
        docs = [line.strip() for line in text.split("\n")]
    return [d for d in docs if d]


def read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    for n, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            raise DataError(f"{path}:{n}: expected an object with a string field {text_field!r}")
        if row[text_field].strip():
            docs.append(row[text_field].strip())
    return docs


def _expand(spec: str) -> list[Path]:
    files: list[Path] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        path = Path(part).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES)
            if not found:
                raise DataError(f"{path}: folder holds no .txt or .jsonl files")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in TEXT_SUFFIXES | JSONL_SUFFIXES:
                raise DataError(f"{path}: unsupported file type (use .txt or .jsonl)")
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def is_local_spec(spec: str) -> bool:
    """Local when a part exists, names a .txt/.jsonl file, or is written as a path; else a hub id."""
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if (Path(part).expanduser().exists() or part.startswith(("/", "./", "../", "~"))
                or Path(part).suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES):
            return True
    return False


def read_local(spec: str, cfg: DataConfig) -> tuple[list[str], str]:
    """Documents from local files, and a fingerprint of their contents."""
    digest = hashlib.sha256()
    docs: list[str] = []
    for path in _expand(spec):
        raw = path.read_bytes()
        digest.update(path.name.encode() + hashlib.sha256(raw).digest())
        if path.suffix.lower() in JSONL_SUFFIXES:
            docs.extend(read_jsonl(path, cfg.text_field))
        else:
            docs.extend(split_documents(_read_utf8(path), cfg.document))
    if not docs:
        raise DataError(f"{spec}: no text found (empty files?)")
    return docs, digest.hexdigest()


def read_hub(spec: str, cfg: DataConfig) -> dict[str, list[str]]:
    """``name[:config]`` from the ``datasets`` hub; splits train/validation (needs the network)."""
    from datasets import load_dataset

    name, _, config = spec.partition(":")
    try:
        ds = load_dataset(name, config or None)
    except Exception as e:
        raise DataError(f"hub dataset {spec!r} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        "offline, use local .txt/.jsonl files instead") from None
    out = {}
    for split in ("train", "validation"):
        if split in ds:
            if cfg.text_field not in ds[split].column_names:
                raise DataError(f"hub dataset {spec!r} has no column {cfg.text_field!r} (has {ds[split].column_names})")
            out[split] = [t.strip() for t in ds[split][cfg.text_field] if t and t.strip()]
    if not out.get("train"):
        raise DataError(f"hub dataset {spec!r} has no non-empty train split")
    return out


def read_splits(cfg: DataConfig, data_dir: Path | None = None, seed: int = 0) -> tuple[dict[str, list[str]], str]:
    """Documents for ``train`` and ``validation`` plus a fingerprint of where they came from."""
    data_dir = Path(data_dir or default_data_dir())
    if cfg.train == "austen":
        from python3_distillation.corpus import build_austen_corpus

        paths = build_austen_corpus(data_dir)  # one paragraph per line: "auto" reads it as lines
        train, fp_train = read_local(str(paths["train"]), cfg)
        val, fp_val = read_local(str(paths["validation"]), cfg)
        splits, fingerprint = {"train": train, "validation": val}, f"austen:{fp_train}:{fp_val}"
    elif is_local_spec(cfg.train):
        train, fingerprint = read_local(cfg.train, cfg)
        splits = {"train": train}
    else:
        splits, fingerprint = read_hub(cfg.train, cfg), f"hub:{cfg.train}"

    if cfg.validation:
        if is_local_spec(cfg.validation):
            splits["validation"], fp = read_local(cfg.validation, cfg)
        else:
            splits["validation"], fp = read_hub(cfg.validation, cfg).get("validation") or [], f"hub:{cfg.validation}"
        fingerprint += f"|val:{fp}"
    if not splits.get("validation"):
        # No validation source: hold out a seeded random fraction of the documents.
        docs = splits["train"]
        if len(docs) < 2:
            raise DataError("need at least 2 documents to hold some out for validation (or set data.validation)")
        order = list(range(len(docs)))
        random.Random(seed).shuffle(order)
        n_val = max(1, int(len(docs) * cfg.validation_fraction))
        held = set(order[:n_val])
        splits = {"train": [d for i, d in enumerate(docs) if i not in held],
                  "validation": [docs[i] for i in sorted(held)]}
        fingerprint += f"|holdout:{cfg.validation_fraction}:{seed}"
    return splits, fingerprint


# --------------------------------------------------------------------------- tokenize + group

def tokenizer_fingerprint(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()[:16]


def tokenize_and_group(docs: list[str], tokenizer, block_size: int, desc: str = "tokenize") -> torch.Tensor:
    """EOS after every document, concatenate, cut into (n, block_size) blocks (tail dropped)."""
    from datasets import Dataset

    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    ds = Dataset.from_dict({"text": docs})
    ds = ds.map(lambda b: {"ids": [ids + [eos] for ids in tokenizer(b["text"])["input_ids"]]},
                batched=True, remove_columns=["text"], desc=desc, load_from_cache_file=False)

    def group(batch):  # HF run_clm's group_texts, carrying nothing across map batches
        flat = [t for ids in batch["ids"] for t in ids]
        n = len(flat) // block_size * block_size
        return {"block": [flat[i:i + block_size] for i in range(0, n, block_size)]}

    # One map batch holds ~1000 documents; the dropped tail per batch is < block_size tokens.
    ds = ds.map(group, batched=True, batch_size=1000, remove_columns=["ids"], desc=f"group {block_size}",
                load_from_cache_file=False)
    if len(ds) == 0:
        return torch.empty(0, block_size, dtype=torch.long)
    return torch.tensor(ds["block"], dtype=torch.long)


def load_blocks(cfg: DataConfig, tokenizer, data_dir: Path | None = None, seed: int = 0) -> dict[str, Blocks]:
    """Tokenized, grouped ``train``/``validation`` blocks, built once and cached on disk."""
    data_dir = Path(data_dir or default_data_dir())
    splits, fingerprint = read_splits(cfg, data_dir, seed)
    key_src = json.dumps({"v": CACHE_VERSION, "tok": tokenizer_fingerprint(tokenizer), "data": fingerprint,
                          "block": cfg.block_size, "doc": cfg.document, "field": cfg.text_field})
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    cache = data_dir / "blocks" / key
    if (cache / "done.json").exists():
        out = {s: Blocks(torch.load(cache / f"{s}.pt", weights_only=True)) for s in ("train", "validation")}
    else:
        out = {s: Blocks(tokenize_and_group(docs, tokenizer, cfg.block_size, desc=f"tokenize {s}"))
               for s, docs in splits.items()}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".blocks-", dir=cache.parent))
        try:
            for s, b in out.items():
                torch.save(b.ids, tmp / f"{s}.pt")
            (tmp / "done.json").write_text(key_src)
            if cache.exists():
                shutil.rmtree(cache)
            os.replace(tmp, cache)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for s, b in out.items():
        if len(b) == 0:
            raise DataError(f"the {s} split has fewer tokens than one block of {cfg.block_size}; "
                            "add text or lower data.block_size")
    log.info("data: %s", ", ".join(f"{s} {len(b):,} blocks ({b.n_tokens:,} tokens)" for s, b in out.items()))
    return out


def batch_indices(n_blocks: int, batch_size: int, micro_step: int, seed: int) -> torch.Tensor:
    """Block indices of global micro-batch ``micro_step``: a seeded permutation per epoch.

    A pure function of the step, so a resumed run reads exactly the batches an uninterrupted run
    would have, with no sampler state to save.
    """
    per_epoch = max(1, n_blocks // batch_size)  # full batches only
    epoch, i = divmod(micro_step, per_epoch)
    perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[i * batch_size:(i + 1) * batch_size]
