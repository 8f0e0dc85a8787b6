"""Students built from the teacher, the distillation loss wiring, and a tiny end-to-end run."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_gpt2, tiny_run_config
from python3_distillation.config import DistillConfig
from python3_distillation.distill import make_distill_loss, run_distill
from python3_distillation.models import ModelError, build_student, check_same_vocab, save_model, spread_layers


def test_distilgpt2_layer_choice():
    assert spread_layers(12, 6) == [0, 2, 4, 7, 9, 11]  # DistilGPT2's blocks
    assert spread_layers(12, 12) == list(range(12))
    assert spread_layers(12, 1) == [0]
    assert spread_layers(4, 3) == [0, 2, 3]  # round(1.5) == 2 (round half to even)


def test_student_from_all_teacher_layers_reproduces_the_teacher():
    teacher = tiny_gpt2(n_layer=3)
    student, info = build_student(teacher, n_layer=3, init="teacher")
    ids = torch.randint(0, 50257, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(student.eval()(ids).logits, teacher(ids).logits, rtol=0, atol=0)
    assert info["layers"] == [0, 1, 2]


def test_student_copies_the_chosen_blocks():
    teacher = tiny_gpt2(n_layer=4)
    student, _ = build_student(teacher, n_layer=2, init="teacher", layers=[3, 1])
    torch.testing.assert_close(student.transformer.h[0].mlp.c_fc.weight, teacher.transformer.h[3].mlp.c_fc.weight)
    torch.testing.assert_close(student.transformer.h[1].attn.c_attn.weight, teacher.transformer.h[1].attn.c_attn.weight)
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()  # still tied
    with pytest.raises(ModelError, match="need 2 indices"):
        build_student(teacher, n_layer=2, init="teacher", layers=[0, 9])


def test_random_and_base_init():
    teacher = tiny_gpt2(n_layer=2)
    student, info = build_student(teacher, n_layer=4, init="random")
    assert student.config.n_layer == 4 and info["init"] == "random"
    student, info = build_student(teacher, n_layer=2, init="base", base=None)
    assert info["init"] == "random" and "from scratch" in info["note"]
    base = tiny_gpt2(n_layer=2, seed=5)
    student, info = build_student(teacher, n_layer=2, init="base", base=base)
    torch.testing.assert_close(student.transformer.wte.weight, base.transformer.wte.weight)


def test_vocab_mismatch_is_refused():
    teacher, student = tiny_gpt2(), tiny_gpt2()
    student.resize_token_embeddings(50300)
    with pytest.raises(ModelError, match="KL distillation needs the same vocabulary"):
        check_same_vocab(teacher, student)


def test_loss_terms_and_teacher_gets_no_gradient():
    teacher, student = tiny_gpt2(seed=1), tiny_gpt2(seed=2).train()
    ids = torch.randint(0, 50257, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    cfg = DistillConfig(temperature=2.0, alpha_kd=0.7, alpha_ce=0.3, alpha_cos=0.5)
    total, terms = make_distill_loss(teacher, cfg)(student, batch)
    assert set(terms) == {"kd", "ce", "cos"}
    expected = 0.7 * terms["kd"] + 0.3 * terms["ce"] + 0.5 * terms["cos"]
    torch.testing.assert_close(total.detach(), expected)
    # The ce term is transformers' own loss; the kd term the hand-written KL×T².
    torch.testing.assert_close(terms["ce"], student(ids, labels=ids).loss.detach(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        s, t = student(ids).logits.flatten(0, 1), teacher(ids).logits.flatten(0, 1)
        ref = torch.nn.functional.kl_div(torch.log_softmax(s / 2, -1), torch.softmax(t / 2, -1), reduction="batchmean") * 4
    torch.testing.assert_close(terms["kd"], ref, rtol=1e-4, atol=1e-5)
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_ce_only_baseline_skips_the_teacher():
    calls = []
    teacher = tiny_gpt2()
    teacher.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, 50257, (1, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    _, terms = make_distill_loss(teacher, DistillConfig(alpha_kd=0.0, alpha_ce=1.0))(tiny_gpt2(seed=3), batch)
    assert calls == [] and set(terms) == {"ce"}


def test_tiny_distillation_end_to_end(tmp_path, tokenizer, text_corpus):
    # A teacher that has learned the corpus a little, so its soft targets carry information.
    cfg_t = tiny_run_config(tmp_path, text_corpus, train={"max_steps": 20, "save_every": 0})
    from python3_distillation.teacher import run_teacher

    run_teacher(cfg_t)
    cfg = tiny_run_config(tmp_path, text_corpus, stage="distill",
                          student={"n_layer": 1, "init": "random"},
                          distill={"alpha_kd": 1.0, "alpha_ce": 0.0},
                          train={"max_steps": 16, "save_every": 8})
    out = run_distill(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in rows if "kd" in r]
    assert kd[-1] < 0.8 * kd[0]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.n_layer == 1
    meta = json.loads((out / "distill_meta.json").read_text())
    assert meta["student_init"]["init"] == "random" and meta["alpha_kd"] == 1.0
    assert "KL soft targets" in (out / "README.md").read_text()


def test_distill_refuses_a_teacher_with_another_vocabulary(tmp_path, tokenizer, text_corpus):
    teacher = tiny_gpt2()
    teacher.resize_token_embeddings(50300)
    save_model(teacher, tokenizer, tmp_path / "teacher")
    cfg = tiny_run_config(tmp_path, text_corpus, stage="distill")
    with pytest.raises(ModelError, match="50,257 tokens but the student has a vocabulary of 50,300"):
        run_distill(cfg)
    assert not (tmp_path / "student").exists()


# ----------------------------------------------------------------------------- narrower students

def test_narrow_init_at_full_width_reproduces_the_teacher():
    """With the identity basis and every head and neuron kept, the projection rule is exact."""
    from python3_distillation.models import narrow_init

    teacher = tiny_gpt2(n_layer=3, n_embd=32, n_head=2).eval()
    student = tiny_gpt2(n_layer=3, n_embd=32, n_head=2, seed=9).eval()
    narrow_init(student, teacher, [0, 1, 2], "truncate")
    student.tie_weights()
    ids = torch.randint(0, 50257, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=0, atol=0)


def test_narrow_student_projects_onto_the_embeddings_principal_directions():
    from python3_distillation.models import count_parameters, residual_basis

    teacher = tiny_gpt2(n_layer=4, n_embd=64, n_head=4).eval()  # head size 16
    with torch.no_grad():  # make head 2 of block 1 the strongest: it must be one of the two kept
        teacher.transformer.h[1].attn.c_proj.weight[32:48] *= 10
    student, info = build_student(teacher, n_layer=2, init="teacher", n_embd=32, width_init="pca")
    assert (student.config.n_embd, student.config.n_head, student.config.n_layer) == (32, 2, 2)
    assert info["width_init"] == "pca" and info["layers"] == [0, 3] and info["n_embd"] == 32
    p = residual_basis(teacher, 32, "pca")
    torch.testing.assert_close(p.t() @ p, torch.eye(32), rtol=0, atol=1e-5)  # orthonormal columns
    e = teacher.transformer.wte.weight.detach()
    e = e - e.mean(0)
    kept = lambda basis: ((e @ basis).norm() / e.norm()).item()  # noqa: E731 (share of variance kept)
    assert kept(p) >= kept(residual_basis(teacher, 32, "truncate"))
    torch.testing.assert_close(student.transformer.wte.weight, teacher.transformer.wte.weight @ p)
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()
    # Block 1 of the student is teacher block 3; check the head choice on a student built from block 1.
    s1, _ = build_student(teacher, n_layer=1, init="teacher", layers=[1], n_embd=32, width_init="pca")
    w_o = teacher.transformer.h[1].attn.c_proj.weight
    assert any(torch.allclose(s1.transformer.h[0].attn.c_proj.weight[r:r + 16], w_o[32:48] @ p) for r in (0, 16))
    # The default rule keeps the first 32 residual coordinates (measured ahead of pca and random).
    s2, info2 = build_student(teacher, n_layer=1, init="teacher", layers=[1], n_embd=32)
    assert info2["width_init"] == "truncate"
    torch.testing.assert_close(s2.transformer.wte.weight, teacher.transformer.wte.weight[:, :32])
    assert any(torch.allclose(s2.transformer.h[0].attn.c_proj.weight[r:r + 16], w_o[32:48, :32]) for r in (0, 16))
    assert count_parameters(student) < count_parameters(teacher) / 2
    with pytest.raises(ModelError, match="wider than the teacher"):
        build_student(teacher, n_embd=128)


def test_narrow_distillation_runs_and_refuses_the_cosine_term(tmp_path, tokenizer, text_corpus):
    teacher = tiny_gpt2(n_layer=2, n_embd=64, n_head=4)
    save_model(teacher, tokenizer, tmp_path / "teacher")
    cfg = tiny_run_config(tmp_path, text_corpus, stage="distill", student={"n_layer": 1, "n_embd": 32},
                          train={"max_steps": 4})
    out = run_distill(cfg)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.n_embd, model.config.n_head) == (32, 2)
    cos = tiny_run_config(tmp_path / "cos", text_corpus, stage="distill", student={"n_layer": 1, "n_embd": 32},
                          distill={"alpha_cos": 0.5}, teacher={"path": tmp_path / "teacher"})
    with pytest.raises(ModelError, match="set distill.alpha_cos=0"):
        run_distill(cos)
