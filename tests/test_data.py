"""Data: documents → EOS-separated token stream → fixed blocks; caching; bad input."""

import json

import pytest
import torch

from python3_distillation.config import DataConfig
from python3_distillation.data import DataError, batch_indices, load_blocks, read_local, split_documents, tokenize_and_group


def test_blocks_are_the_eos_joined_stream_cut_evenly(tokenizer):
    docs = ["It is a truth universally acknowledged.", "Emma Woodhouse, handsome, clever, and rich.", "Persuasion."]
    blocks = tokenize_and_group(docs, tokenizer, block_size=5)
    stream = [t for d in docs for t in tokenizer.encode(d) + [tokenizer.eos_token_id]]
    n = len(stream) // 5 * 5
    assert blocks.shape == (n // 5, 5)
    assert blocks.flatten().tolist() == stream[:n]


def test_split_documents_modes():
    text = "a b\nc d\n\ne f\n"
    assert split_documents(text, "line") == ["a b", "c d", "e f"]
    assert split_documents(text, "paragraph") == ["a b\nc d", "e f"]
    assert split_documents(text, "file") == ["a b\nc d\n\ne f"]
    assert split_documents(text, "auto") == ["a b\nc d", "e f"]
    assert split_documents("x\ny\r\nz", "auto") == ["x", "y", "z"]


def test_cache_is_reused_and_keyed(tmp_path, tokenizer, text_corpus):
    cfg = DataConfig(train=str(text_corpus["train"]), validation=str(text_corpus["validation"]), block_size=16)
    first = load_blocks(cfg, tokenizer, data_dir=tmp_path)
    caches = list((tmp_path / "blocks").iterdir())
    assert len(caches) == 1
    stamp = (caches[0] / "train.pt").stat().st_mtime_ns
    again = load_blocks(cfg, tokenizer, data_dir=tmp_path)
    assert torch.equal(first["train"].ids, again["train"].ids)
    assert (caches[0] / "train.pt").stat().st_mtime_ns == stamp  # read, not rebuilt
    # Changing the data or the block size gives a new key, not a stale cache.
    text_corpus["train"].write_text(text_corpus["train"].read_text() + "One more line.\n")
    load_blocks(cfg, tokenizer, data_dir=tmp_path)
    load_blocks(DataConfig(train=cfg.train, validation=cfg.validation, block_size=8), tokenizer, data_dir=tmp_path)
    assert len(list((tmp_path / "blocks").iterdir())) == 3


def test_jsonl_and_folders(tmp_path, tokenizer):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.jsonl").write_text(json.dumps({"text": "first doc"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    (d / "b.txt").write_text("third\nfourth\n")
    docs, _ = read_local(str(d), DataConfig())
    assert docs == ["first doc", "second", "third", "fourth"]


def test_holdout_when_no_validation(tmp_path, tokenizer, text_corpus):
    blocks = load_blocks(DataConfig(train=str(text_corpus["train"]), block_size=8), tokenizer, data_dir=tmp_path)
    assert len(blocks["train"]) > 0 and len(blocks["validation"]) > 0


@pytest.mark.parametrize("content, message", [
    (b"", "no text found"),
    (b"\n\n  \n", "no text found"),
    (b"caf\xe9 latin-1\n", "not UTF-8"),
])
def test_bad_text_files(tmp_path, content, message):
    f = tmp_path / "x.txt"
    f.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_local(str(f), DataConfig())


def test_missing_and_malformed(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_local(str(tmp_path / "nope.txt"), DataConfig())
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: malformed JSON"):
        read_local(str(f), DataConfig())
    g = tmp_path / "y.jsonl"
    g.write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"y.jsonl:1: expected an object with a string field 'text'"):
        read_local(str(g), DataConfig())


def test_too_little_text_for_one_block(tmp_path, tokenizer):
    f = tmp_path / "t.txt"
    f.write_text("short\n")
    cfg = DataConfig(train=str(f), validation=str(f), block_size=64)
    with pytest.raises(DataError, match="fewer tokens than one block"):
        load_blocks(cfg, tokenizer, data_dir=tmp_path)


def test_batch_indices_are_a_pure_function_of_the_step():
    a = [batch_indices(10, 3, s, seed=1).tolist() for s in range(6)]
    b = [batch_indices(10, 3, s, seed=1).tolist() for s in range(6)]
    assert a == b
    epoch0 = sum(a[:3], [])
    assert len(set(epoch0)) == 9  # within an epoch no block repeats
    assert a[:3] != a[3:6]  # a new permutation each epoch
    assert batch_indices(10, 3, 0, seed=2).tolist() != a[0]


def test_embedded_corpus_split(tokenizer):
    from python3_distillation.corpus import build_austen_corpus
    from python3_distillation.paths import data_dir

    paths = build_austen_corpus(data_dir())
    train = set(paths["train"].read_text(encoding="utf-8").splitlines())
    val = set(paths["validation"].read_text(encoding="utf-8").splitlines())
    assert len(train) > 5000 and len(val) > 500
    assert not train & val
