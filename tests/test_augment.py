"""Teacher-generated samples: provenance, the teacher's own seeded sampling, resume, and reading them back.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_augment.py -q
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_gpt2, tiny_overrides
from python3_distillation.augment import AugmentSettings, run_augment, sample_seed
from python3_distillation.cli import main as cli_main
from python3_distillation.config import load_config
from python3_distillation.errors import DataError
from python3_distillation.lineage import weights_sha256
from python3_distillation.models import save_model


class Killed(Exception):
    pass


@pytest.fixture
def setup(tmp_path, tokenizer, text_corpus):
    teacher = tiny_gpt2(n_layer=2)
    save_model(teacher, tokenizer, tmp_path / "teacher")
    cfg = load_config([], tiny_overrides(tmp_path, text_corpus))
    return cfg, teacher


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


SMALL = dict(n_samples=5, prompt_tokens=8, new_tokens=6, batch_size=2)


def test_samples_carry_their_provenance_and_are_the_teachers_seeded_samples(setup, tmp_path, tokenizer):
    from python3_distillation.data import load_blocks

    cfg, teacher = setup
    out = run_augment(cfg, tmp_path / "s.jsonl", AugmentSettings(**SMALL, top_p=1.0, temperature=0.9))
    rows = _rows(out)
    assert [r["index"] for r in rows] == list(range(5))
    train = load_blocks(cfg.data, tokenizer, seed=cfg.train.seed)["train"]
    for r in rows:
        assert r["run"]["teacher_sha256"] == weights_sha256(teacher)
        assert r["run"]["sampling"] == {"temperature": 0.9, "top_p": 1.0, "top_k": 0, "max_new_tokens": 6}
        assert r["seed"] == sample_seed(cfg.train.seed, r["index"])
        prompt = train.ids[r["source"]["block"], :8].tolist()
        assert r["source"]["token_offset"] == r["source"]["block"] * 32
        assert r["prompt"] == tokenizer.decode(prompt) and r["text"] == r["prompt"] + r["completion"]
        # The continuation, sampled again by hand: the row's seeded generator, one uniform per token,
        # inverse CDF of softmax(logits / T), stopping at end-of-text.
        g, seq = torch.Generator().manual_seed(r["seed"]), list(prompt)
        with torch.no_grad():
            for _ in range(6):
                probs = torch.softmax(teacher(input_ids=torch.tensor([seq])).logits[0, -1] / 0.9, -1)
                cdf = probs.cumsum(-1)
                tok = int(torch.searchsorted(cdf, torch.rand((), generator=g).item() * cdf[-1:], right=True))
                if tok == tokenizer.eos_token_id:
                    break
                seq.append(tok)
        assert r["completion"] == tokenizer.decode(seq[8:])
        assert r["completion_tokens"] == len(seq) - 8


def test_a_killed_run_continues_without_duplicates(setup, tmp_path):
    cfg, _ = setup
    whole = run_augment(cfg, tmp_path / "whole.jsonl", AugmentSettings(**SMALL))

    def die(n):
        if n >= 2:
            raise Killed

    part = tmp_path / "part.jsonl"
    with pytest.raises(Killed):
        run_augment(cfg, part, AugmentSettings(**SMALL), on_batch=die)
    assert len(_rows(part)) == 2
    with part.open("a", encoding="utf-8") as f:
        f.write('{"index": 2, "text": "half a li')  # what a kill in the middle of a write leaves
    run_augment(cfg, part, AugmentSettings(**SMALL))
    assert part.read_bytes() == whole.read_bytes()
    run_augment(cfg, part, AugmentSettings(**{**SMALL, "n_samples": 7}))  # more samples later: appended
    assert [r["index"] for r in _rows(part)] == list(range(7))
    assert _rows(part)[:5] == _rows(whole)


def test_other_settings_do_not_continue_a_file(setup, tmp_path, capsys):
    cfg, _ = setup
    out = run_augment(cfg, tmp_path / "s.jsonl", AugmentSettings(**SMALL))
    with pytest.raises(DataError, match="sampling differ"):
        run_augment(cfg, out, AugmentSettings(**{**SMALL, "n_samples": 9, "temperature": 0.5}))
    out.write_text("not json\n" + out.read_text())
    with pytest.raises(DataError, match="not a JSON line"):
        run_augment(cfg, out, AugmentSettings(**SMALL))


def test_augment_command_and_training_reads_the_file(setup, tmp_path, text_corpus, tokenizer, capsys):
    from python3_distillation.data import load_blocks

    out = tmp_path / "cli.jsonl"
    overrides = tiny_overrides(tmp_path, text_corpus)
    command = ["augment", "--out", str(out), "--n-samples", "3", "--prompt-tokens", "8", "--new-tokens", "20"]
    assert cli_main(command + overrides) == 0
    assert len(_rows(out)) == 3
    data = load_config([], overrides + [f"data.train={out}", "data.block_size=8"]).data
    assert len(load_blocks(data, tokenizer)["train"]) > 0
    assert cli_main(command + ["--top-p", "0"] + overrides) == 2
    assert "error: --top-p: input should be greater than 0, got 0.0\n" in capsys.readouterr().err


# ------------------------------------------------------------------------------- mixing them in


def test_mixed_blocks_give_each_source_its_share():
    from python3_distillation.data import MixedBlocks, batch_indices

    real = torch.arange(100 * 4).reshape(100, 4)  # row r holds 4r..4r+3
    generated = -torch.arange(1, 10 * 4 + 1).reshape(10, 4)
    mixed = MixedBlocks([real, generated], [3, 1])  # 75% / 25%, normalised
    # Reference: the real rows once, then the 10 generated rows repeated to fill a quarter.
    n_gen = round(100 / 0.75 * 0.25)
    ref = torch.cat([real, generated[torch.arange(n_gen) % 10]])
    assert mixed.shape == tuple(ref.shape) == (133, 4)
    idx = torch.tensor([5, 120, 0, 132, 99, 100])
    assert torch.equal(mixed[idx], ref[idx])
    assert torch.equal(mixed[120, :2], ref[120, :2]) and torch.equal(mixed[:3], ref[:3])
    assert torch.equal(mixed[-1], ref[-1])
    with pytest.raises(IndexError):
        mixed[torch.tensor([133])]
    # One epoch of batches (a pure function of the step) draws exactly those shares.
    drawn = torch.cat([mixed[batch_indices(len(mixed), 7, step, seed=3)] for step in range(len(mixed) // 7)])
    share = (drawn[:, 0] < 0).float().mean().item()
    assert abs(share - n_gen / 133) < 7 / 133


def test_a_larger_second_source_is_thinned_evenly():
    from python3_distillation.data import MixedBlocks

    mixed = MixedBlocks([torch.zeros(10, 2, dtype=torch.long), torch.arange(100).repeat_interleave(2).view(100, 2)],
                        [0.5, 0.5])
    assert len(mixed) == 20
    assert mixed[torch.arange(10, 20)][:, 0].tolist() == list(range(0, 100, 10))


def test_data_mix_reads_austen_style_first_source_and_the_samples_file(setup, tmp_path, text_corpus, tokenizer):
    from python3_distillation.config import ConfigError
    from python3_distillation.data import load_blocks

    cfg, _ = setup
    samples = run_augment(cfg, tmp_path / "s.jsonl", AugmentSettings(**SMALL))
    overrides = tiny_overrides(tmp_path, text_corpus) + ["data.block_size=8"]
    plain = load_blocks(load_config([], overrides).data, tokenizer)
    mixed = load_blocks(load_config([], overrides + [f"data.train={text_corpus['train']},{samples}",
                                                     "data.mix=[0.6, 0.4]"]).data, tokenizer)
    assert torch.equal(mixed["validation"].ids[:], plain["validation"].ids[:])  # the first source's validation
    assert mixed["train"].fingerprint.startswith("mix:") and mixed["train"].fingerprint != plain["train"].fingerprint
    counts = mixed["train"].ids.counts
    assert counts[0] == len(plain["train"]) and counts[1] == pytest.approx(counts[0] / 0.6 * 0.4, abs=1)
    with pytest.raises(ConfigError, match="one share per comma-separated source"):
        load_config([], overrides + ["data.mix=[1.0]"])
    with pytest.raises(DataError, match="must be a local"):
        load_blocks(load_config([], overrides + [f"data.train={text_corpus['train']},wikitext:x",
                                                 "data.mix=[1, 1]"]).data, tokenizer)
