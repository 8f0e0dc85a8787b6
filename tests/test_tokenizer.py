"""The GPT-2 tokenizer rebuilt offline must be GPT-2's, id for id."""

import tarfile
import time

import pytest

from python3_distillation import tokenizer as tk

# Ids published for GPT-2's tokenizer (openai/gpt-2, tiktoken r50k_base).
KNOWN = {
    "Hello world": [15496, 995],
    " Hello world": [18435, 995],
    "The quick brown fox": [464, 2068, 7586, 21831],
    "<|endoftext|>": [50256],
}


def test_known_ids(tokenizer):
    assert len(tokenizer) == 50257
    assert tokenizer.eos_token_id == 50256
    for text, ids in KNOWN.items():
        assert tokenizer.encode(text) == ids, text


def test_unicode_round_trip(tokenizer):
    text = "Naïve café — 日本語のテキスト, emoji 🙂👍🏽, Ελληνικά, עברית, tabs\tand\nnewlines  "
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    # Byte-level BPE: every byte sequence maps onto the 50,257 ids.
    assert max(ids) < 50257


def test_bpe_merges_are_rank_ordered():
    ranks = {bytes([i]): i for i in range(256)}
    ranks[b"ab"] = 256
    ranks[b"abc"] = 257
    vocab, merges = tk.ranks_to_vocab_and_merges(ranks)
    assert merges == [("a", "b"), ("ab", "c")]
    assert vocab["<|endoftext|>"] == 258


def test_rebuild_from_archive(tmp_path):
    """The builder itself, from the real archive (downloaded once into the data dir)."""
    from python3_distillation.paths import data_dir

    archive = tk.download_whisper_archive(data_dir() / "downloads")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "stale.txt").write_text("from an older build")
    out = tk.build_gpt2_tokenizer(tmp_path / "tok", archive)
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "stale.txt").exists(), "the old folder is replaced whole, not merged into"
    assert [p.name for p in tmp_path.iterdir()] == ["tok"], "no temp folder left beside it"
    tok = tk.load_tokenizer(out)
    assert tok.encode("Hello world") == [15496, 995]


def test_tampered_archive_is_refused(tmp_path):
    from python3_distillation.paths import data_dir

    archive = tk.download_whisper_archive(data_dir() / "downloads")
    bad = tmp_path / tk.WHISPER_ARCHIVE
    with tarfile.open(archive) as src, tarfile.open(bad, "w:gz") as dst:
        member = src.getmember(tk.TIKTOKEN_MEMBER)
        data = src.extractfile(member).read().replace(b" 0\n", b" 1\n", 1)
        member.size = len(data)
        import io

        dst.addfile(member, io.BytesIO(data))
    with pytest.raises(tk.AssetError, match="sha256"):
        tk.build_gpt2_tokenizer(tmp_path / "tok", bad)
    assert not (tmp_path / "tok").exists()  # nothing half-written


def test_offline_setting_skips_the_hub_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    assert tk.hub_reachable() is False
    assert time.perf_counter() - t0 < 0.5


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(tk.AssetError, match="not reachable"):
        tk.load_tokenizer("someone/some-tokenizer")


def test_local_folder_without_tokenizer(tmp_path):
    with pytest.raises(tk.AssetError, match="not a tokenizer folder"):
        tk.load_tokenizer(tmp_path)


def test_one_tokenizer_rule_for_model_folders_and_stages(tmp_path, tokenizer, monkeypatch):
    from types import SimpleNamespace

    from python3_distillation import models

    own, bare = tmp_path / "own", tmp_path / "bare"
    tokenizer.save_pretrained(own)
    bare.mkdir()
    assert models.tokenizer_source(own) == str(own)
    assert models.tokenizer_source(bare) == "gpt2" and models.tokenizer_source(bare, "custom") == "custom"
    monkeypatch.setattr(models, "load_tokenizer", lambda spec: spec)  # which spec each stage loads

    def cfg(stage, tokenizer="gpt2", init_from="", path=""):
        return SimpleNamespace(stage=stage, tokenizer=tokenizer, teacher=SimpleNamespace(init_from=init_from, path=path))

    assert models.stage_tokenizer(cfg("teacher", init_from=str(own))) == str(own)  # a fine-tuned folder's own
    assert models.stage_tokenizer(cfg("teacher", "custom", init_from="gpt2")) == "custom"  # a hub checkpoint
    assert models.stage_tokenizer(cfg("teacher", "custom")) == "custom"  # from scratch
    assert models.stage_tokenizer(cfg("distill", path=str(own))) == str(own)  # the teacher folder's
    assert models.stage_tokenizer(cfg("distill", path=str(bare))) == "gpt2"
    assert models.stage_tokenizer(cfg("distill", "custom", path=str(own))) == "custom"  # named: it wins
    assert models.stage_tokenizer(cfg("teacher", path=str(own)), "distill") == str(own)
