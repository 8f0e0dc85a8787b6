"""The GPT-2 tokenizer, found locally, on the hub, or rebuilt offline from GPT-2's BPE ranks.

    python -m python3_distillation assets        # builds it (and the corpus) under the data dir

Design notes (how a spec is resolved): docs/design/data.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
import sys
import tarfile
from pathlib import Path
from urllib.parse import urlparse

from python3_distillation.errors import AssetError
from python3_distillation.fsio import atomic_dir
from python3_distillation.paths import data_dir as default_data_dir, download

log = logging.getLogger(__name__)

WHISPER_VERSION = "20250625"
WHISPER_ARCHIVE = f"openai_whisper-{WHISPER_VERSION}.tar.gz"
TIKTOKEN_MEMBER = f"openai_whisper-{WHISPER_VERSION}/whisper/assets/gpt2.tiktoken"
TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOS_TOKEN = "<|endoftext|>"
EOS_ID = 50256
GPT2_VOCAB_SIZE = 50257
# Known encodings of GPT-2's tokenizer, checked after every rebuild.
KNOWN_ENCODINGS = {"Hello world": [15496, 995], " Hello world": [18435, 995]}


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Rank-ordered BPE on ``token`` using only merges ranked below ``max_rank``."""
    parts = [bytes([b]) for b in token]
    while True:
        best_rank, i = min(((ranks.get(a + b, max_rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))),
                           default=(max_rank, -1))
        if best_rank >= max_rank:
            return parts
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def ranks_to_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Turn tiktoken-style ranks into GPT-2's ``vocab.json`` dict and ordered ``merges.txt`` pairs.

    Each multi-byte token was made by exactly one merge; re-running BPE on its bytes with only the
    merges ranked before it leaves the two halves of that merge.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte → printable-character map

    b2u = bytes_to_unicode()

    def show(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {show(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted((kv for kv in ranks.items() if len(kv[0]) > 1), key=lambda kv: kv[1]):
        parts = _bpe_split(ranks, tok, rank)
        if len(parts) != 2:
            raise AssetError(f"BPE rank {rank} does not split into one merge ({len(parts)} parts)")
        merges.append((show(parts[0]), show(parts[1])))
    vocab[EOS_TOKEN] = len(ranks)
    return vocab, merges


def download_whisper_archive(download_dir: Path) -> Path:
    """The openai-whisper source archive in ``download_dir``, fetched with pip (no install, no dependencies)."""
    spec = f"openai-whisper=={WHISPER_VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", spec, "-d", "."]
    return download(cmd, download_dir, WHISPER_ARCHIVE, spec,
                    f"put {WHISPER_ARCHIVE} in {download_dir} by hand or set DISTILL_WHISPER_ARCHIVE",
                    failed=f"could not download {spec} source archive with pip")


def build_gpt2_tokenizer(out_dir: Path, archive: Path | None = None) -> Path:
    """Rebuild GPT-2's tokenizer offline into ``out_dir`` (written beside it, swapped in whole)."""
    from transformers import GPT2TokenizerFast

    out_dir = Path(out_dir)
    if archive is None:
        env = os.environ.get("DISTILL_WHISPER_ARCHIVE")
        archive = Path(env) if env else download_whisper_archive(out_dir.parent.parent / "downloads")
    try:
        with tarfile.open(archive) as tar:
            data = tar.extractfile(TIKTOKEN_MEMBER).read()
    except (OSError, KeyError, tarfile.TarError) as e:
        raise AssetError(f"{archive}: cannot read {TIKTOKEN_MEMBER} ({e})") from e
    if (digest := hashlib.sha256(data).hexdigest()) != TIKTOKEN_SHA256:
        raise AssetError(f"{archive}: gpt2.tiktoken has sha256 {digest}, expected {TIKTOKEN_SHA256}")
    pairs = (line.split() for line in data.splitlines() if line.strip())
    vocab, merges = ranks_to_vocab_and_merges({base64.b64decode(tok): int(rank) for tok, rank in pairs})

    with atomic_dir(out_dir) as tmp:
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
        # Loading the bare vocab/merges through the fast class and saving it again writes
        # tokenizer.json + tokenizer_config.json, which AutoTokenizer needs.
        tok = GPT2TokenizerFast.from_pretrained(str(tmp))
        if len(tok) != GPT2_VOCAB_SIZE or tok.eos_token_id != EOS_ID:
            raise AssetError(f"rebuilt tokenizer has {len(tok)} tokens / eos {tok.eos_token_id}, "
                             f"expected {GPT2_VOCAB_SIZE} / {EOS_ID}")
        for text, ids in KNOWN_ENCODINGS.items():
            if tok.encode(text) != ids:
                raise AssetError(f"rebuilt tokenizer encodes {text!r} as {tok.encode(text)}, GPT-2 gives {ids}")
        tok.save_pretrained(str(tmp))
    return out_dir


def hub_reachable(timeout: float = 2.0) -> bool:
    """True when the Hugging Face hub can be used: not offline by setting, and its host answers."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return False
    try:
        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
        host, port = endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except Exception:
        return False


def is_local_tokenizer_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json"))


def load_tokenizer(spec: str | os.PathLike | None = "gpt2", data_dir: Path | None = None):
    """Return a transformers tokenizer for ``spec`` (local dir, hub id, or ``gpt2`` rebuilt offline)."""
    from transformers import AutoTokenizer

    spec = str(spec or "gpt2")
    path = Path(spec).expanduser()
    if path.exists():
        if not is_local_tokenizer_dir(path):
            raise AssetError(f"{path}: not a tokenizer folder (no tokenizer.json / vocab.json)")
        return AutoTokenizer.from_pretrained(str(path))
    if hub_reachable():
        try:
            return AutoTokenizer.from_pretrained(spec)
        except Exception as e:  # a hub that answers but lacks the repo, or a flaky network
            log.warning("hub tokenizer %s failed (%s); trying the offline copy", spec, e)
    if spec not in {"gpt2", "openai-community/gpt2"}:
        raise AssetError(f"tokenizer {spec!r}: not a local folder and the hub is not reachable")
    cached = Path(data_dir or default_data_dir()) / "tokenizer" / "gpt2"
    if not is_local_tokenizer_dir(cached):
        log.info("rebuilding GPT-2's tokenizer offline into %s", cached)
        build_gpt2_tokenizer(cached)
    return AutoTokenizer.from_pretrained(str(cached))
