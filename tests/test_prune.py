"""Structured pruning: exact copies of what is kept, measured importances, the CLI, KD recovery.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_prune.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_gpt2, tiny_run_config
from python3_distillation.cli import main as cli_main
from python3_distillation.losses import lm_loss
from python3_distillation.models import build_student, save_model
from python3_distillation.prune import (block_importance, block_parameters, candidate_shapes, neuron_importance,
                                        prune_model, run_prune, shrink)


def _head_outputs(block, x: torch.Tensor, n_head: int) -> torch.Tensor:
    """[B, T, n_head, head_size]: each head's attention output for input ``x`` (what enters c_proj)."""
    seen = []
    hook = block.attn.c_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        block(x)
    hook.remove()
    (merged,) = seen
    return merged.view(*merged.shape[:-1], n_head, -1)


def _mlp_with_neurons_zeroed(block, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The unpruned MLP's output with every neuron outside ``keep`` switched off."""
    gate = torch.zeros(block.mlp.c_fc.weight.shape[1])
    gate[keep] = 1.0
    hook = block.mlp.c_proj.register_forward_pre_hook(lambda _m, args: (args[0] * gate,))
    with torch.no_grad():
        out = block.mlp(x)
    hook.remove()
    return out


def test_kept_heads_and_neurons_compute_what_they_did():
    source = tiny_gpt2(n_layer=3, n_embd=32, n_head=2).eval()  # MLP of 128 neurons
    g = torch.Generator().manual_seed(0)
    keep = [torch.randperm(128, generator=g)[:40].sort().values for _ in range(2)]
    pruned = shrink(source, [0, 2], keep)
    assert (pruned.config.n_layer, pruned.config.n_inner, pruned.config.n_head) == (2, 40, 2)
    x = torch.randn(2, 9, 32, generator=g)
    for dst, src in enumerate([0, 2]):
        a, b = source.transformer.h[src], pruned.transformer.h[dst]
        # Every head of a kept block: the same output for the same input, bit for bit.
        torch.testing.assert_close(_head_outputs(b, x, 2), _head_outputs(a, x, 2), rtol=0, atol=0)
        with torch.no_grad():
            got = b.mlp(x)
        torch.testing.assert_close(got, _mlp_with_neurons_zeroed(a, x, keep[dst]), rtol=1e-5, atol=1e-6)
    # In the whole model the first block sees the unchanged embeddings: its heads match there too.
    ids = torch.randint(0, 50257, (2, 11), generator=g)

    def first_block_heads(model):
        seen = []
        hook = model.transformer.h[0].attn.c_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        with torch.no_grad():
            model(input_ids=ids)
        hook.remove()
        return seen[0]

    torch.testing.assert_close(first_block_heads(pruned), first_block_heads(source), rtol=0, atol=0)
    assert pruned.lm_head.weight.data_ptr() == pruned.transformer.wte.weight.data_ptr()  # still tied


def test_nothing_removed_is_the_same_model():
    source = tiny_gpt2(n_layer=2).eval()
    same = shrink(source, [0, 1], [torch.arange(128)] * 2)
    ids = torch.randint(0, 50257, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(same(ids).logits, source(ids).logits, rtol=0, atol=0)


def test_neuron_importance_is_first_order_taylor():
    """|Σ a·∂L/∂a| per neuron, from the activations' own gradients (no gates), averaged over batches."""
    model = tiny_gpt2(n_layer=2).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 50257, (2, 12), generator=g) for _ in range(2)]
    expected = torch.zeros(2, 128, dtype=torch.float64)
    for ids in batches:
        acts = []

        def keep(_m, _args, out):
            out.retain_grad()
            acts.append(out)

        hooks = [b.mlp.act.register_forward_hook(keep) for b in model.transformer.h]
        lm_loss(model(input_ids=ids).logits, ids).backward()
        for h in hooks:
            h.remove()
        model.zero_grad()
        expected += torch.stack([(a * a.grad).sum((0, 1)).abs().double() for a in acts])
    got = neuron_importance(model, batches)
    torch.testing.assert_close(got, (expected / 2).float(), rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())  # scoring leaves the model untouched


def test_block_importance_is_the_loss_rise_when_the_block_is_skipped():
    model = tiny_gpt2(n_layer=3).eval()
    batches = [torch.randint(0, 50257, (2, 10), generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        base = lm_loss(model(input_ids=batches[0]).logits, batches[0]).item()
        # The reference skips block 1 by building a 2-block student from teacher blocks 0 and 2.
        skipped, _ = build_student(model, n_layer=2, init="teacher", layers=[0, 2])
        ref = lm_loss(skipped.eval()(input_ids=batches[0]).logits, batches[0]).item() - base
    assert block_importance(model, batches)[1] == pytest.approx(ref, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("target", [0.25, 0.5, 0.8])
def test_candidate_shapes_meet_the_target_with_the_widest_mlp(target):
    model = tiny_gpt2(n_layer=4, n_embd=32, n_head=2)
    full = block_parameters(model)
    shapes = candidate_shapes(model, target)
    counts = [layers for layers, _ in shapes]
    assert counts == list(range(counts[0], counts[0] - len(counts), -1))  # consecutive block counts

    def params(layers, n):
        return block_parameters(shrink(model, list(range(layers)), [torch.arange(n)] * layers))

    # From the most blocks that can meet the target (one more block cannot, even with one neuron)...
    assert counts[0] == 4 or params(counts[0] + 1, 1) > (1 - target) * full
    for layers, inner in shapes:  # ...each with the widest MLP that meets it
        assert params(layers, inner) <= (1 - target) * full
        assert inner == 128 or params(layers, inner + 1) > (1 - target) * full
    assert shapes[-1][1] == 128 or counts[-1] == 1  # down to a whole MLP


def test_prune_model_takes_the_candidate_with_the_lowest_loss():
    model = tiny_gpt2(n_layer=4).eval()
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 50257, (2, 16), generator=g) for _ in range(4)]
    pruned, info = prune_model(model, 0.5, batches[:2], batches[2:])
    assert info["loss_after"] == min(c["loss"] for c in info["candidates"])
    assert info["block_params_removed"] >= 0.5
    assert (pruned.config.n_layer, pruned.config.n_inner) == (info["n_layer"], info["n_inner"])
    assert block_parameters(pruned) == info["block_params"]


@pytest.fixture
def saved_teacher(tmp_path, tokenizer, text_corpus):
    """A tiny trained-shape teacher folder with its config (the data pruning reads)."""
    cfg = tiny_run_config(tmp_path, text_corpus)
    teacher = tiny_gpt2(n_layer=4, n_embd=32, n_head=2)
    return save_model(teacher, tokenizer, tmp_path / "teacher", cfg), cfg


def test_prune_command_writes_a_gpt2_folder_both_loaders_read(saved_teacher, tmp_path, capsys):
    from python3_distillation.generation import Generator, SamplingParams

    teacher_dir, _ = saved_teacher
    out = tmp_path / "pruned"
    assert cli_main(["prune", str(teacher_dir), "--target", "0.25", "--out", str(out), "--batches", "2"]) == 0
    assert "block parameters removed" in capsys.readouterr().out
    meta = json.loads((out / "distill_meta.json").read_text())
    assert meta["stage"] == "prune" and meta["prune"]["block_params_removed"] >= 0.25
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.n_layer, model.config.n_inner) == (meta["n_layer"], meta["n_inner"])
    source = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert block_parameters(model) <= 0.75 * block_parameters(source)
    # The project's generator (its own GPT-2 decoder) gives transformers' greedy tokens.
    gen = Generator.from_pretrained(out, device="cpu")
    got = gen.generate(["It is a truth"], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))[0]
    ids = gen.tokenizer("It is a truth", return_tensors="pt").input_ids
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=50256)[0, ids.shape[1]:].tolist()
    assert got.token_ids == ref
    assert "Pruned from" in (out / "README.md").read_text()


def test_same_config_same_pruned_weights(saved_teacher, tmp_path):
    teacher_dir, _ = saved_teacher
    a = run_prune(teacher_dir, 0.5, tmp_path / "a", n_batches=2)
    b = run_prune(teacher_dir, 0.5, tmp_path / "b", n_batches=2)
    meta = [json.loads((d / "distill_meta.json").read_text()) for d in (a, b)]
    assert meta[0]["weights_sha256"] == meta[1]["weights_sha256"]


@pytest.mark.parametrize("argv, message", [
    (["--target", "1.5"], "--target must be a fraction"),
    (["--target", "0.5", "--batches", "0"], "--batches and --batch-size must be"),
])
def test_prune_refuses_bad_input(saved_teacher, capsys, argv, message):
    teacher_dir, _ = saved_teacher
    assert cli_main(["prune", str(teacher_dir), *argv]) == 2
    assert message in capsys.readouterr().err


def test_prune_refuses_a_missing_folder(tmp_path, capsys):
    assert cli_main(["prune", str(tmp_path / "nothing"), "--target", "0.5"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_recovery_distils_the_pruned_model_from_the_unpruned_one(saved_teacher, tmp_path, text_corpus):
    from python3_distillation.config import ConfigError
    from python3_distillation.distill import run_distill

    teacher_dir, _ = saved_teacher
    pruned = run_prune(teacher_dir, 0.5, tmp_path / "pruned", n_batches=2)
    start = AutoModelForCausalLM.from_pretrained(pruned)
    cfg = tiny_run_config(tmp_path, text_corpus, stage="distill", train={"max_steps": 4},
                          student={"init": "pruned", "from_dir": pruned, "n_layer": 0})
    out = run_distill(cfg)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.n_layer, model.config.n_inner) == (start.config.n_layer, start.config.n_inner)
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, start.transformer.h[0].mlp.c_fc.weight)  # trained
    meta = json.loads((out / "distill_meta.json").read_text())
    assert meta["student_init"]["init"] == "pruned" and meta["student_init"]["layers"]
    assert set(meta["fingerprint"]["inputs"]) >= {"teacher", "student_init", "data"}
    wrong = tiny_run_config(tmp_path / "w", text_corpus, stage="distill", teacher={"path": teacher_dir},
                            student={"init": "pruned", "from_dir": pruned, "n_layer": 3})
    with pytest.raises(ConfigError, match="shape is the folder's"):
        run_distill(wrong)


def test_same_size_student_keeps_attention_and_the_largest_neurons():
    teacher = tiny_gpt2(n_layer=4).eval()
    student, info = build_student(teacher, n_layer=2, init="teacher", n_inner=48)
    assert (student.config.n_layer, student.config.n_inner, info["n_inner"]) == (2, 48, 48)
    src = teacher.transformer.h[3]  # spread_layers(4, 2) = [0, 3]
    dst = student.transformer.h[1]
    torch.testing.assert_close(dst.attn.c_attn.weight, src.attn.c_attn.weight, rtol=0, atol=0)
    norms = src.mlp.c_fc.weight.norm(dim=0) * src.mlp.c_proj.weight.norm(dim=1)
    kept = norms.topk(48).indices.sort().values
    torch.testing.assert_close(dst.mlp.c_fc.weight, src.mlp.c_fc.weight[:, kept], rtol=0, atol=0)
    torch.testing.assert_close(student.transformer.wte.weight, teacher.transformer.wte.weight, rtol=0, atol=0)
