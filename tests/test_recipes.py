"""Distillation recipes: the divergence as a config choice, and on-policy batches sampled by the student.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_recipes.py -q
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_gpt2, tiny_run_config
from python3_distillation.config import ConfigError, DistillConfig, load_config
from python3_distillation.distill import OnPolicySampler, loss_name, make_distill_loss

T = 2.0


def _batch(seed: int, shape=(2, 12)) -> dict:
    ids = torch.randint(0, 50257, shape, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _probs(model, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, log p) at temperature T over the flattened positions, fp64."""
    with torch.no_grad():
        z = model(input_ids=ids).logits.double().flatten(0, 1) / T
    return torch.softmax(z, -1), torch.log_softmax(z, -1)


def _kd(dc: DistillConfig, student, teacher, batch, **kw) -> torch.Tensor:
    _, terms = make_distill_loss(teacher, dc, **kw)(student, batch)
    return terms["kd"]


@pytest.fixture(scope="module")
def pair():
    """Teacher and student with peaked distributions (a fresh tiny GPT-2's are nearly uniform, where
    every divergence is the same to second order)."""
    models = tiny_gpt2(seed=1), tiny_gpt2(seed=2).train()
    with torch.no_grad():
        for m in models:
            m.transformer.wte.weight.mul_(20)
    return models


def test_forward_kl_is_kl_div_batchmean(pair):
    teacher, student = pair
    batch = _batch(0)
    ps, log_ps = _probs(student, batch["input_ids"])
    pt, log_pt = _probs(teacher, batch["input_ids"])
    ref = F.kl_div(log_ps, pt, reduction="batchmean") * T**2
    got = _kd(DistillConfig(loss="forward_kl", temperature=T), student, teacher, batch)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)


def test_reverse_kl_is_kl_student_to_teacher(pair):
    teacher, student = pair
    batch = _batch(1)
    ps, log_ps = _probs(student, batch["input_ids"])
    pt, log_pt = _probs(teacher, batch["input_ids"])
    ref = (ps * (log_ps - log_pt)).sum(-1).mean() * T**2  # written out: Σ p_s log(p_s / p_t)
    got = _kd(DistillConfig(loss="reverse_kl", temperature=T), student, teacher, batch)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)
    assert not torch.isclose(got, _kd(DistillConfig(temperature=T), student, teacher, batch))


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_is_the_generalised_jensen_shannon_divergence(pair, beta):
    teacher, student = pair
    batch = _batch(2)
    ps, _ = _probs(student, batch["input_ids"])
    pt, _ = _probs(teacher, batch["input_ids"])
    m = (1 - beta) * ps + beta * pt  # GKD's mixture, in probability space
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1)  # noqa: E731
    ref = (beta * kl(pt, m) + (1 - beta) * kl(ps, m)).mean() * T**2
    got = _kd(DistillConfig(loss="jsd", jsd_beta=beta, temperature=T), student, teacher, batch)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("override, message", [
    ("distill.loss=js", "distill.loss: input should be 'forward_kl', 'reverse_kl' or 'jsd', got 'js'"),
    ("distill.jsd_beta=1.0", "distill.jsd_beta: input should be less than 1, got 1.0"),
    ("distill.on_policy_fraction=1.5", "distill.on_policy_fraction: input should be less than or equal to 1, got 1.5"),
    ("distill.on_policy_temperature=-1", "distill.on_policy_temperature: input should be greater than or equal to 0"),
])
def test_bad_recipe_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)) as err:
        load_config(["v2"], [override])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="needs distill.alpha_kd > 0"):
        load_config(["v2_ce"], ["distill.on_policy_fraction=0.5"])


def test_loss_names():
    assert loss_name(DistillConfig()) == "forward_kl"
    assert loss_name(DistillConfig(loss="jsd", jsd_beta=0.3, on_policy_fraction=0.5)) == "jsd(beta=0.3), on-policy 0.5"


# ------------------------------------------------------------------------------------- on-policy


def _one_token_student(token: int):
    """A student whose every next-token distribution is (to fp32 precision) all on ``token``."""
    model = tiny_gpt2(seed=4).train()
    with torch.no_grad():
        u = torch.randn(32) * 100 / (32 ** 0.5)  # |u| ≈ 100, so logit[token] ≈ 10⁴ ≫ every other (≈ 10)
        model.transformer.wte.weight[token] = u
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(u)  # the final state is u whatever the input: logits = wte · u
    return model


def test_on_policy_batches_hold_the_students_own_tokens(tokenizer):
    student, teacher = _one_token_student(1234), tiny_gpt2(seed=5)
    batch = _batch(3, (3, 16))
    dc = DistillConfig(on_policy_fraction=1.0, on_policy_prompt=5)
    seen = []
    teacher.register_forward_hook(lambda _m, _a, kwargs, _out: seen.append(kwargs["input_ids"]), with_kwargs=True)
    _, terms = make_distill_loss(teacher, dc, tokenizer, seed=7)(student, batch)
    (ids,) = seen
    assert torch.equal(ids[:, :5], batch["input_ids"][:, :5])  # the real prompt
    assert (ids[:, 5:] == 1234).all()  # then only what this student can say
    assert terms["on_policy"].item() == 1.0
    assert student.training  # sampling ran in eval mode and gave the mode back


def test_on_policy_tokens_are_the_students_seeded_samples(tokenizer):
    """The continuation equals a hand-written sampler: each row its own seeded torch.Generator, one
    uniform per token, inverse CDF of softmax(logits / temperature) from a full forward each step."""
    student = tiny_gpt2(seed=6)
    ids = _batch(4, (2, 10))["input_ids"]
    dc = DistillConfig(on_policy_fraction=1.0, on_policy_prompt=4, on_policy_temperature=0.8)
    sampler = OnPolicySampler(tokenizer, dc, seed=11)
    new_ids, kd_mask, labels = sampler.sample(student, ids)
    for row, seed in enumerate(sampler.row_seeds(ids)):
        g = torch.Generator().manual_seed(seed)
        seq = ids[row, :4].tolist()
        with torch.no_grad():
            for _ in range(6):
                probs = torch.softmax(student(input_ids=torch.tensor([seq])).logits[0, -1].float() / 0.8, -1)
                cdf = probs.cumsum(-1)
                u = torch.rand((), generator=g).item()
                seq.append(int(torch.searchsorted(cdf, u * cdf[-1:], right=True).clamp(max=50256)))
        assert new_ids[row].tolist() == seq
    assert kd_mask[:, :3].sum() == 0 and kd_mask[:, 3:].all()  # from the position predicting the first sample
    assert (labels[:, 4:] == -100).all() and torch.equal(labels[:, :4], ids[:, :4])  # CE on the real prompt only
    assert sampler.row_seeds(ids) != OnPolicySampler(tokenizer, dc, seed=12).row_seeds(ids)


def test_on_policy_kd_term_covers_the_sampled_positions_only(tokenizer):
    teacher, student = tiny_gpt2(seed=1), tiny_gpt2(seed=2)
    batch = _batch(5, (2, 12))
    dc = DistillConfig(on_policy_fraction=1.0, on_policy_prompt=6, temperature=T)
    new_ids, _, _ = OnPolicySampler(tokenizer, dc, seed=3).sample(student, batch["input_ids"])
    got = _kd(dc, student, teacher, batch, tokenizer=tokenizer, seed=3)
    with torch.no_grad():
        s, t = student(input_ids=new_ids).logits[:, 5:], teacher(input_ids=new_ids).logits[:, 5:]
    ref = F.kl_div(F.log_softmax(s.flatten(0, 1) / T, -1), F.softmax(t.flatten(0, 1) / T, -1), reduction="batchmean")
    torch.testing.assert_close(got, ref * T**2, rtol=1e-4, atol=1e-6)


def test_on_policy_share_follows_the_fraction_and_is_a_function_of_batch_and_seed(tokenizer):
    batches = [_batch(100 + i)["input_ids"] for i in range(400)]
    a = OnPolicySampler(tokenizer, DistillConfig(on_policy_fraction=0.3), seed=1)
    picks = [a.chosen(ids) for ids in batches]
    assert abs(sum(picks) / 400 - 0.3) < 4 * (0.3 * 0.7 / 400) ** 0.5  # binomial, 4 sigma
    assert picks == [a.chosen(ids) for ids in batches]  # the same batch, the same choice
    other = OnPolicySampler(tokenizer, DistillConfig(on_policy_fraction=0.3), seed=2)
    assert picks != [other.chosen(ids) for ids in batches]
    with pytest.raises(ConfigError, match="leaves nothing to sample"):
        OnPolicySampler(tokenizer, DistillConfig(on_policy_fraction=0.3, on_policy_prompt=12), 1).prompt_length(12)


def test_on_policy_distillation_end_to_end(tmp_path, tokenizer, text_corpus):
    from python3_distillation.distill import run_distill
    from python3_distillation.models import save_model

    save_model(tiny_gpt2(n_layer=2), tokenizer, tmp_path / "teacher")
    cfg = tiny_run_config(tmp_path, text_corpus, stage="distill", student={"n_layer": 1},
                          distill={"loss": "jsd", "jsd_beta": 0.5, "on_policy_fraction": 0.5},
                          train={"max_steps": 6, "save_every": 3})
    out = run_distill(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    shares = [r["on_policy"] for r in rows if "on_policy" in r]
    assert len(shares) == 6 and set(shares) <= {0.0, 1.0}
    meta = json.loads((out / "distill_meta.json").read_text())
    assert meta["loss"] == "jsd(beta=0.5), on-policy 0.5"
    assert "jsd(beta=0.5), on-policy 0.5 soft targets" in (out / "README.md").read_text()


# ----------------------------------------------------------------------------- make experiments


def test_experiments_run_every_comparison_and_resume(tmp_path, tokenizer, text_corpus):
    """The whole `make experiments` flow on a tiny teacher: tables, charts, equal steps, and a second
    run that resumes every stage instead of redoing it."""
    from conftest import tiny_overrides
    from python3_distillation.augment import AugmentSettings
    from python3_distillation.experiments import run_experiments
    from python3_distillation.models import save_model

    overrides = [o for o in tiny_overrides(tmp_path, text_corpus, stage="distill") if not o.startswith(
        ("name=", "student.output_dir=", "train.run_dir="))]
    overrides += ["train.max_steps=2", "train.save_every=1", "distill.on_policy_prompt=16"]
    save_model(tiny_gpt2(n_layer=4), tokenizer, tmp_path / "teacher", load_config([], tiny_overrides(tmp_path, text_corpus)))
    kwargs = dict(root=tmp_path / "exp", out_dir=tmp_path / "reports", overrides=overrides, eval_blocks=4,
                  prune_batches=1, augment=AugmentSettings(n_samples=4, prompt_tokens=8, new_tokens=8, batch_size=4))
    report = run_experiments(**kwargs)
    text = (tmp_path / "reports" / "experiments.md").read_text()
    assert text.count("\n## ") == 3 and text.count("at equal steps (2)") == 3
    for q in ("pruning", "augmentation", "losses"):
        assert (tmp_path / "reports" / f"experiments_{q}.png").stat().st_size > 0
    models = report["models"]
    assert models["pruned 50%"]["train_steps"] is None and models["pruned 50% + KD recovery"]["train_steps"] == 2
    assert (models["same-size student (50%)"]["n_layer"], models["same-size student (50%)"]["n_inner"]) == (
        models["pruned 50%"]["n_layer"], models["pruned 50%"]["n_inner"])
    assert models["reverse_kl"]["loss"] == "reverse_kl" and "on-policy" in models["forward_kl, on-policy 0.5"]["loss"]
    assert models["forward_kl (real + teacher samples)"]["data"].endswith("teacher_samples.jsonl")
    assert models["teacher"]["kl_teacher"] == 0.0 and models["teacher"]["top1_teacher"] == 1.0
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in models.values())

    logs = sorted((tmp_path / "exp" / "runs").glob("*/metrics.jsonl"))
    before = {p: p.read_text() for p in logs}
    stamp = (tmp_path / "exp" / "pruned25" / "model.safetensors").stat().st_mtime_ns
    again = run_experiments(**kwargs, only=["pruning"])  # one question is enough to see the resume
    assert all(p.read_text() == before[p] for p in logs)  # nothing retrained
    assert (tmp_path / "exp" / "pruned25" / "model.safetensors").stat().st_mtime_ns == stamp  # nor re-pruned
    assert again["models"]["same-size student (25%)"]["val_ppl"] == pytest.approx(
        models["same-size student (25%)"]["val_ppl"])
    assert "## 1." in (tmp_path / "reports" / "experiments.md").read_text() and "reverse_kl" not in again["models"]


def test_experiments_command_line_parses(capsys):
    """`make experiments` reaches the runner: its defaults (the augment sample count) are read from the settings."""
    from python3_distillation.experiments import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "(default 512)" in capsys.readouterr().out
    assert main(["--eval-blocks", "0"]) == 2  # a bad value is one error line, exit 2, before any work
