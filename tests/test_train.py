"""The shared training loop and the teacher stage, on tiny models for a few steps."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import StopTraining, tiny_gpt2, tiny_run_config
from python3_distillation import checkpoint as ckpt_io
from python3_distillation.cli import main as cli_main
from python3_distillation.data import load_blocks
from python3_distillation.train import lm_loss_fn, lr_lambda, train


def _blocks(cfg, tokenizer, tmp_path):
    return load_blocks(cfg.data, tokenizer, data_dir=tmp_path / "data")


def test_loss_falls(tmp_path, tokenizer, text_corpus):
    cfg = tiny_run_config(tmp_path, text_corpus, train={"max_steps": 30, "save_every": 0})
    model, result = train(tiny_gpt2(), lm_loss_fn, _blocks(cfg, tokenizer, tmp_path), cfg)
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 2.0  # nats/token: from ~ln(50257)=10.8 down
    assert result.val_ppl is not None and result.val_ppl < 50257
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_loss"] == pytest.approx(result.val_loss, rel=1e-4)
    assert {"loss", "lr", "tokens", "tok_per_s"} <= set(rows[0])


def test_kill_and_resume_equals_uninterrupted(tmp_path, tokenizer, text_corpus):
    cfg_a = tiny_run_config(tmp_path / "a", text_corpus)
    blocks = _blocks(cfg_a, tokenizer, tmp_path)
    full, _ = train(tiny_gpt2(seed=0), lm_loss_fn, blocks, cfg_a)

    cfg_b = tiny_run_config(tmp_path / "b", text_corpus)

    def kill_at_6(step):
        if step == 6:
            raise StopTraining

    with pytest.raises(StopTraining):
        train(tiny_gpt2(seed=0), lm_loss_fn, blocks, cfg_b, on_step=kill_at_6)
    assert ckpt_io.newest_valid(cfg_b.run_dir)[0].name == "checkpoint-4"
    # A different init proves the weights come from the checkpoint, not from the seed.
    resumed, result = train(tiny_gpt2(seed=99), lm_loss_fn, blocks, cfg_b, resume=True)
    assert result.step == 8
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    steps = [json.loads(line)["step"] for line in (cfg_b.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # rows past the checkpoint were dropped, not duplicated


def test_warmup_cosine_schedule():
    from python3_distillation.config import TrainConfig

    f = lr_lambda(TrainConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


def test_teacher_stage_end_to_end(tmp_path, text_corpus, capsys):
    cfg = tiny_run_config(tmp_path, text_corpus)
    args = ["teacher"] + [f"{k}={v}" for k, v in _flat(cfg.to_dict()).items()]
    assert cli_main(args) == 0
    out = tmp_path / "teacher"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.n_layer == 2
    assert {"distill_config.yaml", "distill_meta.json", "README.md", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert "validation perplexity" in capsys.readouterr().out
    # --resume on a finished run does not train again.
    assert cli_main(args + ["--resume"]) == 0


@pytest.mark.parametrize("override, message", [
    ("data.block_size=128", "larger than the teacher's context"),
    ("data.train=/nonexistent/file.txt", "no such file"),
    ("train.max_steps=0", "train.max_steps: input should be greater than or equal to 1, got 0"),
])
def test_teacher_bad_input_exits_2_and_writes_nothing(tmp_path, text_corpus, capsys, override, message):
    cfg = tiny_run_config(tmp_path, text_corpus)
    args = ["teacher"] + [f"{k}={v}" for k, v in _flat(cfg.to_dict()).items()] + [override]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "teacher").exists()


def test_tokenizer_vocab_mismatch_is_refused(tmp_path, text_corpus, tokenizer):
    from python3_distillation.models import ModelError, check_vocab

    model = tiny_gpt2()
    model.resize_token_embeddings(50300)
    with pytest.raises(ModelError, match="50,257 tokens but the model has a vocabulary of 50,300"):
        check_vocab(tokenizer, model)


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, list):
            out[f"{prefix}{k}"] = json.dumps(v)
        else:
            out[f"{prefix}{k}"] = v
    return out
