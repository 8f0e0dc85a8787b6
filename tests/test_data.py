"""Data: documents → EOS-separated token stream → flat token shards → even blocks; caching, resume, memory.

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python -m pytest tests/test_data.py -q
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from python3_distillation import data
from python3_distillation.config import DataConfig
import python3_distillation.data.shards as shard_io
from python3_distillation.data import (
    DataError,
    TokenBlocks,
    batch_indices,
    held_out,
    iter_local,
    load_blocks,
    prepare_tokens,
    split_documents,
    stream_source,
    tokenize_piece,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["It is a truth universally acknowledged.", "Emma Woodhouse, handsome, clever, and rich.", "Persuasion.",
        "The cat sat on the mat.\tCafé, naïve — “quoted”.", "Anne Elliot."]


def stream_of(docs, tokenizer) -> list[int]:
    """The reference: the tokenizer's own ids of each document, EOS after each, concatenated."""
    return [t for d in docs for t in tokenizer.encode(d) + [tokenizer.eos_token_id]]


def shard_ids(blocks) -> np.ndarray:
    """Every token of the split's file (the view's path), as written."""
    ids = blocks.ids
    return np.fromfile(ids.path, dtype=ids.dtype)


def write_jsonl(path: Path, docs) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def numbered_docs(n: int) -> list[str]:
    return [f"Document {i} of the corpus, chapter {i % 7}." for i in range(n)]


def word_tokenizer(n_words: int):
    """A real (tokenizers) word-level tokenizer with ``n_words`` + 2 ids: ``w0 .. w{n-1}``, EOS and UNK."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(n_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="[UNK]")


def leftovers(data_dir: Path) -> list[str]:
    """Anything in the tokens folder that is not a finished shard folder."""
    return sorted(p.name for p in (data_dir / "tokens").iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- shard contents and blocks


def test_shards_are_the_eos_joined_stream_and_blocks_cut_it_evenly(tmp_path, tokenizer):
    train, val = write_jsonl(tmp_path / "train.jsonl", DOCS), write_jsonl(tmp_path / "val.jsonl", DOCS[::-1])
    blocks = load_blocks(DataConfig(train=str(train), validation=str(val), block_size=5), tokenizer, data_dir=tmp_path)
    for split, docs in (("train", DOCS), ("validation", DOCS[::-1])):
        stream = stream_of(docs, tokenizer)
        b = blocks[split]
        assert shard_ids(b).dtype == np.uint16 and shard_ids(b).tolist() == stream  # the whole stream, on disk
        n = len(stream) // 5
        assert len(b) == n and b.n_tokens == n * 5
        got = b.ids[torch.arange(n)]
        assert got.dtype == torch.int64 and got.shape == (n, 5)
        assert got.flatten().tolist() == stream[:n * 5]  # block i = tokens[5i : 5i+5]
    # The indexing the training loop and the evaluation use.
    v = blocks["validation"]
    assert v.ids[2, :3].tolist() == stream_of(DOCS[::-1], tokenizer)[10:13]
    assert v.ids[torch.tensor([3, 0])].tolist() == [v.ids[3].tolist(), v.ids[0].tolist()]
    head = data.Blocks(v.ids[:2])  # as the evaluation takes its first blocks: a plain tensor
    assert isinstance(head.ids, torch.Tensor) and head.ids.tolist() == v.ids[torch.tensor([0, 1])].tolist()
    assert len(head) == 2 and head.n_tokens == 10
    with pytest.raises(IndexError, match="out of range"):
        v.ids[len(v)]


def test_pieces_and_parallel_processes_write_the_same_bytes(tmp_path, tokenizer, monkeypatch):
    docs = numbered_docs(300)
    train = write_jsonl(tmp_path / "train.jsonl", docs)
    monkeypatch.setattr(shard_io, "PIECE_BYTES_PER_PROC", 1500)  # ~20 pieces of ~40 documents
    outs = {}
    for n in (1, 2):
        shards = prepare_tokens(DataConfig(train=str(train), validation=str(train)), tokenizer,
                                data_dir=tmp_path / f"d{n}", num_proc=n)
        assert shards.manifest["num_proc"] == n
        outs[n] = shards.path("train").read_bytes()
    assert outs[1] == outs[2] == np.asarray(stream_of(docs, tokenizer), dtype=np.uint16).tobytes()


def test_manifest_records_what_the_shards_hold(tmp_path, tokenizer):
    train, val = write_jsonl(tmp_path / "train.jsonl", DOCS), write_jsonl(tmp_path / "val.jsonl", DOCS[:2])
    shards = prepare_tokens(DataConfig(train=str(train), validation=str(val)), tokenizer, data_dir=tmp_path)
    m = json.loads((shards.folder / "manifest.json").read_text())
    assert shards.folder == tmp_path / "tokens" / m["key"]
    assert m["version"] == data.CACHE_VERSION and m["dtype"] == "uint16" and m["eos_token_id"] == 50256
    assert m["tokenizer"]["vocab_size"] == 50257 and m["tokenizer"]["fingerprint"] == data.tokenizer_fingerprint(tokenizer)
    assert m["sources"] == {"train": str(train), "validation": str(val)}
    for split, docs in (("train", DOCS), ("validation", DOCS[:2])):
        n = len(stream_of(docs, tokenizer))
        assert m["splits"][split] == {"file": f"{split}.bin", "tokens": n, "documents": len(docs), "bytes": 2 * n}
        assert (shards.folder / f"{split}.bin").stat().st_size == 2 * n
    assert sorted(p.name for p in shards.folder.iterdir()) == ["manifest.json", "train.bin", "validation.bin"]
    summary = shards.summary(block_size=4)
    assert f"{len(stream_of(DOCS, tokenizer)) // 4:,} blocks of 4" in summary and str(shards.folder) in summary


def test_big_vocabularies_get_uint32_shards(tmp_path):
    tok = word_tokenizer(70_000)  # ids up to 70,001: past uint16
    docs = ["w1 w69999 w65536", "w65535 w2", "w300 w69998 w0 w7"]
    f = tmp_path / "t.txt"
    f.write_text("\n".join(docs) + "\n")
    shards = prepare_tokens(DataConfig(train=str(f), validation=str(f)), tok, data_dir=tmp_path)
    assert shards.manifest["dtype"] == "uint32"
    got = np.fromfile(shards.path("train"), dtype=np.uint32).tolist()
    assert got == stream_of(docs, tok) and max(got) == 70_001
    blocks = shards.blocks("train", 3)
    assert blocks.ids[torch.tensor([1])].tolist() == [got[3:6]]


def test_tokenize_piece_matches_the_tokenizer(tokenizer):
    ids, lengths = tokenize_piece(DOCS, tokenizer, "uint16")
    assert ids.dtype == np.uint16 and ids.tolist() == stream_of(DOCS, tokenizer)
    assert lengths.tolist() == [len(tokenizer.encode(d)) + 1 for d in DOCS]


# --------------------------------------------------------------------------- cache, resume, locking


def test_cache_is_reused_and_keyed(tmp_path, tokenizer, text_corpus):
    cfg = DataConfig(train=str(text_corpus["train"]), validation=str(text_corpus["validation"]), block_size=16)
    first = load_blocks(cfg, tokenizer, data_dir=tmp_path)
    caches = list((tmp_path / "tokens").iterdir())
    assert len(caches) == 1
    stamp = (caches[0] / "train.bin").stat().st_mtime_ns
    again = load_blocks(cfg, tokenizer, data_dir=tmp_path)
    assert torch.equal(first["train"].ids[torch.arange(len(first["train"]))], again["train"].ids[torch.arange(len(again["train"]))])
    assert (caches[0] / "train.bin").stat().st_mtime_ns == stamp  # read, not rebuilt
    # Another block size reads the same shards, cut differently.
    eight = load_blocks(DataConfig(train=cfg.train, validation=cfg.validation, block_size=8), tokenizer, data_dir=tmp_path)
    assert len(list((tmp_path / "tokens").iterdir())) == 1
    assert eight["train"].ids[1].tolist() == first["train"].ids[0, 8:].tolist()
    assert eight["train"].fingerprint != first["train"].fingerprint  # different blocks, different lineage
    # Changing the data, the document mode or the tokenizer gives a new key, not a stale cache.
    text_corpus["train"].write_text(text_corpus["train"].read_text() + "One more line.\n")
    load_blocks(cfg, tokenizer, data_dir=tmp_path)
    load_blocks(DataConfig(train=cfg.train, validation=cfg.validation, block_size=16, document="file"), tokenizer,
                data_dir=tmp_path)
    assert len(list((tmp_path / "tokens").iterdir())) == 3
    other = word_tokenizer(10)
    other.add_tokens(["One"])  # any change to the ids it gives
    assert data.tokenizer_fingerprint(other) != data.tokenizer_fingerprint(word_tokenizer(10))
    assert data.tokenizer_fingerprint(word_tokenizer(10)) == data.tokenizer_fingerprint(word_tokenizer(10))
    assert leftovers(tmp_path) == []


def test_an_interrupted_preparation_resumes_where_it_stopped(tmp_path, tokenizer, monkeypatch):
    docs = numbered_docs(200)
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "train.jsonl", docs)), validation_fraction=0.1)
    monkeypatch.setattr(shard_io, "PIECE_BYTES_PER_PROC", 2000)  # ~8 pieces
    commits, tokenized = [], []
    real_commit, real_map = shard_io._commit, shard_io.map_tokenize

    def commit_then_die(work, state):
        if len(commits) == 3:  # the 4th piece is on disk but not committed: a kill right here
            raise KeyboardInterrupt
        commits.append(state["streams"]["train"]["docs"])
        real_commit(work, state)

    def counting_map(texts, *args, **kwargs):
        chunks = real_map(texts, *args, **kwargs)
        tokenized.append(sum(len(c) for c in chunks))  # documents tokenized
        return chunks

    monkeypatch.setattr(shard_io, "_commit", commit_then_die)
    monkeypatch.setattr(shard_io, "map_tokenize", counting_map)
    with pytest.raises(KeyboardInterrupt):
        prepare_tokens(cfg, tokenizer, data_dir=tmp_path / "d", seed=3)
    partial = [p for p in (tmp_path / "d" / "tokens").iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1 and not (tmp_path / "d" / "tokens" / partial[0].name[1:-8]).exists()
    key = partial[0].name[1:-len(".partial")]
    for stale in (f".{key}-tmp-killed", ".0123456789abcdef0123.partial"):  # a killed publish; other data's work
        (tmp_path / "d" / "tokens" / stale).mkdir()
        (tmp_path / "d" / "tokens" / stale / "train.bin").write_bytes(b"junk")

    monkeypatch.setattr(shard_io, "_commit", real_commit)
    before = sum(tokenized)
    resumed = prepare_tokens(cfg, tokenizer, data_dir=tmp_path / "d", seed=3)
    assert resumed.manifest["resumed"] is True
    assert sum(tokenized) - before == len(docs) - commits[-1]  # only what was not committed is tokenized again
    fresh = prepare_tokens(cfg, tokenizer, data_dir=tmp_path / "fresh", seed=3)
    assert fresh.key == resumed.key
    for split in ("train", "validation"):
        assert resumed.path(split).read_bytes() == fresh.path(split).read_bytes()
        assert resumed.manifest["splits"][split] == fresh.manifest["splits"][split]
    assert leftovers(tmp_path / "d") == []


def test_a_corrupt_progress_record_starts_afresh(tmp_path, tokenizer, monkeypatch):
    docs = numbered_docs(60)
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "train.jsonl", docs)), validation=str(tmp_path / "train.jsonl"))
    monkeypatch.setattr(shard_io, "PIECE_BYTES_PER_PROC", 1000)
    calls = []

    def die_on_second(work, state):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        work.commit(state)  # the progress record, the token files not synced

    monkeypatch.setattr(shard_io, "_commit", die_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare_tokens(cfg, tokenizer, data_dir=tmp_path)
    monkeypatch.undo()
    partial = next((tmp_path / "tokens").glob(".*.partial"))
    (partial / "train.bin").write_bytes(b"")  # shorter than the record claims
    shards = prepare_tokens(cfg, tokenizer, data_dir=tmp_path)
    assert shards.manifest["resumed"] is False
    assert np.fromfile(shards.path("train"), dtype=np.uint16).tolist() == stream_of(docs, tokenizer)


def test_preparations_of_the_same_data_take_turns(tmp_path, tokenizer, caplog):
    """Training ranks that start together: one prepares, the others wait for it and read its shards."""
    import threading
    import time

    cfg = DataConfig(train=str(write_jsonl(tmp_path / "c.jsonl", DOCS)), validation=str(tmp_path / "c.jsonl"))
    root = tmp_path / "tokens"
    root.mkdir()
    results = []
    caplog.set_level("INFO", logger="python3_distillation.data")
    with shard_io.locked(root):  # another process is preparing here
        waiter = threading.Thread(target=lambda: results.append(prepare_tokens(cfg, tokenizer, data_dir=tmp_path)))
        waiter.start()
        deadline = time.monotonic() + 60
        while "waiting for another process" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "waiting for another process" in caplog.text
        assert waiter.is_alive() and list(root.iterdir()) == []  # it waits before writing anything
    waiter.join(timeout=60)
    assert not waiter.is_alive()
    assert results[0].path("train").read_bytes() == np.asarray(stream_of(DOCS, tokenizer), dtype=np.uint16).tobytes()


def test_bad_input_leaves_nothing_behind(tmp_path, tokenizer):
    f = tmp_path / "x.jsonl"
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in numbered_docs(50)) + "{oops\n")
    with pytest.raises(DataError, match=r"x.jsonl:51: malformed JSON"):
        load_blocks(DataConfig(train=str(f), validation=str(f)), tokenizer, data_dir=tmp_path)
    assert leftovers(tmp_path) == [] and list((tmp_path / "tokens").iterdir()) == []


# --------------------------------------------------------------------------- documents


def test_split_documents_modes():
    text = "a b\nc d\n\ne f\n"
    assert split_documents(text, "line") == ["a b", "c d", "e f"]
    assert split_documents(text, "paragraph") == ["a b\nc d", "e f"]
    assert split_documents(text, "file") == ["a b\nc d\n\ne f"]
    assert split_documents(text, "auto") == ["a b\nc d", "e f"]
    assert split_documents("x\ny\r\nz", "auto") == ["x", "y", "z"]


@pytest.mark.parametrize("mode", ["auto", "line", "paragraph", "file"])
@pytest.mark.parametrize("text", [
    "a b\nc d\n\ne f\n", "x\ny\r\nz", "p one\r\n\r\np two\r\rp three", "  \n\nlead\n \n\n\ntrail\n\n  ", "one line",
])
def test_streamed_files_split_like_the_whole_text(tmp_path, text, mode):
    f = tmp_path / "t.txt"
    f.write_bytes(text.encode())
    assert list(iter_local(str(f), DataConfig(document=mode))) == split_documents(text, mode)


def test_jsonl_and_folders(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.jsonl").write_text(json.dumps({"text": "first doc"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    (d / "b.txt").write_text("third\nfourth\n")
    assert list(iter_local(str(d), DataConfig())) == ["first doc", "second", "third", "fourth"]


def test_streamed_datasets_source(tmp_path):
    """The hub path reads with ``streaming=True``; the same code reads a local JSON set here."""
    f = write_jsonl(tmp_path / "rows.jsonl", ["alpha", "  ", "beta gamma"])
    src = stream_source("rows", "train", "text", "json", data_files=str(f))
    assert [d for d, _ in src.open()] == ["alpha", "beta gamma"]
    with pytest.raises(DataError, match="has no column 'body'"):
        list(stream_source("rows", "train", "body", "json", data_files=str(f)).open())


def test_hub_spec_offline_is_a_data_error(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="could not be loaded.*offline, use local"):
        load_blocks(DataConfig(train="no-such-user/no-such-set"), tokenizer, data_dir=tmp_path)


def test_holdout_when_no_validation(tmp_path, tokenizer):
    docs = numbered_docs(400)
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "train.jsonl", docs)), block_size=8)
    shards = prepare_tokens(cfg, tokenizer, data_dir=tmp_path, seed=5)
    train = np.fromfile(shards.path("train"), dtype=np.uint16).tolist()
    val = np.fromfile(shards.path("validation"), dtype=np.uint16).tolist()
    # Each document, in order, is exactly the next run of one split's stream (EOS makes this unambiguous).
    pos, held = {"train": 0, "validation": 0}, []
    for d in docs:
        ref = tokenizer.encode(d) + [tokenizer.eos_token_id]
        split = "validation" if val[pos["validation"]:pos["validation"] + len(ref)] == ref else "train"
        assert (train if split == "train" else val)[pos[split]:pos[split] + len(ref)] == ref
        pos[split] += len(ref)
        held.append(split == "validation")
    assert pos == {"train": len(train), "validation": len(val)}
    assert 0.01 < sum(held) / len(docs) < 0.12  # about validation_fraction = 5%
    assert shards.manifest["splits"]["validation"]["documents"] == sum(held)
    assert held_out(0, 400, 0.05, 6).tolist() != held  # another seed, another draw
    assert held_out(100, 50, 0.05, 5).tolist() == held[100:150]  # a function of the index alone


def test_holdout_of_a_tiny_corpus_keeps_one_document(tmp_path, tokenizer):
    f = tmp_path / "t.txt"
    f.write_text("first document here\nsecond one\nthird and last\n")
    shards = prepare_tokens(DataConfig(train=str(f)), tokenizer, data_dir=tmp_path, seed=0)
    assert shards.manifest["splits"]["validation"]["documents"] >= 1
    assert shards.manifest["splits"]["train"]["documents"] + shards.manifest["splits"]["validation"]["documents"] == 3
    one = tmp_path / "one.txt"
    one.write_text("only one document\n")
    with pytest.raises(DataError, match="need at least 2 documents"):
        prepare_tokens(DataConfig(train=str(one)), tokenizer, data_dir=tmp_path)


@pytest.mark.parametrize("content, message", [
    (b"", r"x.txt: no text found"),
    (b"\n\n  \n", r"x.txt: no text found"),
    (b"fine\ncaf\xe9 latin-1\n", r"x.txt:2: not UTF-8 text \(invalid byte at column 4\)"),
])
def test_bad_text_files(tmp_path, content, message):
    f = tmp_path / "x.txt"
    f.write_bytes(content)
    with pytest.raises(DataError, match=message):
        list(iter_local(str(f), DataConfig()))


def test_missing_and_malformed(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list(iter_local(str(tmp_path / "nope.txt"), DataConfig()))
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: malformed JSON"):
        list(iter_local(str(f), DataConfig()))
    g = tmp_path / "y.jsonl"
    g.write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"y.jsonl:1: expected an object with a string field 'text'"):
        list(iter_local(str(g), DataConfig()))
    h = tmp_path / "z.jsonl"
    h.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"z.jsonl:2: not UTF-8"):
        list(iter_local(str(h), DataConfig()))


def test_too_little_text_for_one_block(tmp_path, tokenizer):
    f = tmp_path / "t.txt"
    f.write_text("short\n")
    cfg = DataConfig(train=str(f), validation=str(f), block_size=64)
    with pytest.raises(DataError, match="fewer tokens than one block"):
        load_blocks(cfg, tokenizer, data_dir=tmp_path)


def test_embedded_corpus_split(tokenizer):
    from python3_distillation.corpus import build_austen_corpus
    from python3_distillation.paths import data_dir

    paths = build_austen_corpus(data_dir())
    train = set(paths["train"].read_text(encoding="utf-8").splitlines())
    val = set(paths["validation"].read_text(encoding="utf-8").splitlines())
    assert len(train) > 5000 and len(val) > 500
    assert not train & val


def test_prepare_data_command(tmp_path, tokenizer, monkeypatch, capsys):
    from python3_distillation.cli import main
    from python3_distillation.paths import data_dir

    tok_dir = data_dir() / "tokenizer" / "gpt2"  # built by the tokenizer fixture
    monkeypatch.setenv("DISTILL_DATA_DIR", str(tmp_path / "data"))
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    args = ["prepare-data", f"tokenizer={tok_dir}", f"data.train={corpus}", f"data.validation={corpus}", "data.block_size=4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    (folder,) = (tmp_path / "data" / "tokens").iterdir()
    n = len(stream_of(DOCS, tokenizer))
    assert f"token shards: {folder}" in out and f"{n:,} tokens" in out and f"{n // 4:,} blocks of 4" in out
    assert np.fromfile(folder / "train.bin", dtype=np.uint16).tolist() == stream_of(DOCS, tokenizer)
    # Training with the same config finds these shards instead of tokenizing again.
    assert load_blocks(DataConfig(train=str(corpus), validation=str(corpus), block_size=4), tokenizer,
                       data_dir=tmp_path / "data")["train"].fingerprint == f"tokens:{folder.name}:block4"
    assert main(["prepare-data", f"tokenizer={tok_dir}", f"data.train={tmp_path / 'nope.txt'}"]) == 2
    assert "nope.txt: no such file" in capsys.readouterr().err
    assert main(["prepare-data", "--num-proc", "0"]) == 2


# --------------------------------------------------------------------------- sampling


def test_batch_indices_are_a_pure_function_of_the_step():
    a = [batch_indices(10, 3, s, seed=1).tolist() for s in range(6)]
    b = [batch_indices(10, 3, s, seed=1).tolist() for s in range(6)]
    assert a == b
    epoch0 = [i for batch in a[:3] for i in batch]
    assert len(set(epoch0)) == 9  # within an epoch no block repeats
    assert a[:3] != a[3:6]  # a new permutation each epoch
    assert batch_indices(10, 3, 0, seed=2).tolist() != a[0]
    # The same order as a seeded torch.randperm per epoch, whatever the cache holds.
    for n, bs, step, seed in ((10, 3, 4, 1), (1000, 7, 500, 9), (5, 2, 0, 0)):
        epoch, i = divmod(step, max(1, n // bs))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        got = batch_indices(n, bs, step, seed)
        assert got.dtype == torch.int64 and got.tolist() == perm[i * bs:(i + 1) * bs].tolist()


# --------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def test_reading_every_block_keeps_rss_flat(tmp_path):
    """Gathering every block of a 64 MiB token file leaves RSS where it was: each batch maps the file
    and unmaps it again (a map kept open would hold every page read, 64 MiB here)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak RSS")
    path = tmp_path / "train.bin"
    rng = np.random.default_rng(0)
    with path.open("wb") as f:
        for _ in range(8):
            rng.integers(0, 50257, size=4 << 20, dtype=np.uint16).tofile(f)
    view = TokenBlocks(path, "uint16", 256)
    assert view.numel() * 2 == path.stat().st_size == 64 << 20
    view[torch.tensor([0])]  # first-use costs (numpy's memmap import, torch's allocator)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    total = 0
    for step in range(len(view) // 64):
        total += int(view[batch_indices(len(view), 64, step, seed=0)].sum())
    grew_mb = (_status_kb("VmHWM") - before) / 1024
    assert total > 0
    assert grew_mb < 12, f"peak RSS grew {grew_mb:.1f} MiB while reading a 64 MiB file"


MEMORY_CHILD = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from python3_distillation import data
    from python3_distillation.config import DataConfig
    from python3_distillation.data import shards
    from python3_distillation.tokenizer import load_tokenizer

    warm, corpus, work, cap_mb = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    shards.PIECE_BYTES_PER_PROC = 256 << 10
    tok = load_tokenizer("gpt2")

    def kb(field):
        return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))

    # A first, smaller corpus pays the one-time costs (lazy imports, the tokenizer's word cache,
    # allocator arenas); the cap and the measurement then see only what the corpus itself costs.
    data.load_blocks(DataConfig(train=str(warm), block_size=64), tok, data_dir=work, num_proc=1)
    cap = kb("VmData") * 1024 + (cap_mb << 20)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    Path("/proc/self/clear_refs").write_text("5")
    before = kb("VmRSS")
    blocks = data.load_blocks(DataConfig(train=str(corpus), block_size=64), tok, data_dir=work, num_proc=1)
    prep = kb("VmHWM") - before
    n = len(blocks["train"])
    seen = sum(int(blocks["train"].ids[data.batch_indices(n, 16, s, 0)].sum() > 0) for s in range(n // 16))
    print(json.dumps({"prep_mb": prep / 1024, "peak_mb": (kb("VmHWM") - before) / 1024,
                      "tokens": blocks["train"].n_tokens, "batches": seen}))
""")


def _text_corpus(path: Path, mb: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    words = np.array(" ".join(DOCS + numbered_docs(50)).split())
    with path.open("w", encoding="utf-8") as f:
        while f.tell() < mb * 2**20:
            f.write(" ".join(words[rng.integers(0, len(words), size=rng.integers(20, 200))]) + "\n")
    return path


def test_preparing_and_reading_fit_under_a_memory_cap(tmp_path):
    """After a warm-up run, a 4 MB corpus (~1M tokens) is prepared in 256 KiB pieces and every block
    read back with anonymous memory capped (RLIMIT_DATA) at 16 MiB more. The cap is the guard:
    tokenized as one piece the same corpus held 20 MiB, which the cap refuses. Peak RSS (measured
    4-7 MiB, once 14 on a fresh clone: file pages and allocator arenas count too) must stay well
    below the ~35 MB of a list-of-documents loader's Python int lists. benchmarks/bench_data.py
    measures a few hundred MB."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure peak RSS")
    warm, corpus = _text_corpus(tmp_path / "warm.txt", 1, 1), _text_corpus(tmp_path / "corpus.txt", 4, 2)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    # `make` sets glibc.malloc.hugetlb=1 (faster training); with it malloc grows RSS in 2 MiB huge
    # pages, which measured 14 MiB here for the same run. The child measures allocations, not pages.
    env.pop("GLIBC_TUNABLES", None)
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(warm), str(corpus), str(tmp_path), "16"],
                          check=False, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] > 900_000, result
    assert result["batches"] == result["tokens"] // 64 // 16
    assert result["peak_mb"] < 24, result
