"""The measurement (against hand computations), the report (perplexity against transformers' own loss, files,
errors), the FLOPs formula, the bench harness.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_evaluation.py -q
"""

from __future__ import annotations

import importlib.util
import json
import math
import textwrap
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, tiny_gpt2, tiny_run_config
from python3_distillation.cli import main as cli_main
from python3_distillation.data import Blocks
from python3_distillation.evaluation import measure, report as evaluation
from python3_distillation.evaluation.measure import forward_flops_per_token, non_embedding_params
from python3_distillation.models import build_student, save_model
from python3_distillation.paths import MODEL_DIRS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def report_cmd(argv: list[str]) -> int:
    """``gpt2-distill report ARGV``: input errors become one line on stderr and exit status 2."""
    return cli_main(["report", *argv])


def test_quality_is_the_hand_computed_nll_agreement_and_kl():
    """Perplexity is exp of the mean next-token NLL; top-1 and KL(reference ‖ model) are per position.
    12 blocks in batches of 8: a full batch, then a short one, weighed by their tokens."""
    student, teacher = tiny_gpt2(seed=2), tiny_gpt2(seed=1)
    with torch.no_grad():  # a peaked teacher, a flatter student: KL far from symmetric, argmax ties rare
        teacher.transformer.ln_f.weight.mul_(40.0)
        student.transformer.ln_f.weight.mul_(15.0)
    ids = torch.randint(0, student.config.vocab_size, (12, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s, t = student(input_ids=ids).logits, teacher(input_ids=ids).logits
    logp_s, logp_t = s.double().log_softmax(-1), t.double().log_softmax(-1)
    nll = -logp_s[:, :-1].gather(-1, ids[:, 1:, None]).mean().item()
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1).mean().item()
    top1 = (s.argmax(-1) == t.argmax(-1)).double().mean().item()
    got = measure.quality({"s": student, "t": teacher}, Blocks(ids), reference="t", batch_size=8)
    reverse = (logp_s.exp() * (logp_s - logp_t)).sum(-1).mean().item()
    assert got["s"]["loss"] == pytest.approx(nll, rel=1e-5)
    assert got["s"]["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert got["s"]["top1"] == pytest.approx(top1, abs=1e-9) and got["s"]["kl"] == pytest.approx(kl, rel=1e-4)
    assert got["s"]["kl"] != pytest.approx(reverse, rel=0.1)  # the direction is KL(reference ‖ model)
    assert got["t"]["top1"] == 1.0 and got["t"]["kl"] == 0.0
    # A model's loss does not depend on what else is measured with it.
    alone = measure.quality({"s": student}, Blocks(ids), batch_size=8)
    assert alone == {"s": {"loss": got["s"]["loss"], "ppl": got["s"]["ppl"]}}


@pytest.fixture
def saved_models(tmp_path, tokenizer, text_corpus):
    """Tiny teacher (2 layers), KD student and CE student (1 layer each), saved like the pipeline does."""
    teacher = tiny_gpt2(seed=0)
    t_cfg = tiny_run_config(tmp_path, text_corpus, "teacher", data={"max_eval_blocks": 0})
    t_cfg.name = "teacher"
    dirs = {"teacher": save_model(teacher, tokenizer, tmp_path / "teacher", t_cfg,
                                  {"stage": "teacher", "init": "trained from scratch", "train_steps": 8})}
    for i, (name, alpha_kd) in enumerate((("v2", 0.5), ("v2_ce", 0.0))):
        torch.manual_seed(i)
        student, info = build_student(teacher, 1, "teacher")
        with torch.no_grad():  # make the two students differ
            for p in student.transformer.h.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        cfg = tiny_run_config(tmp_path, text_corpus, "distill")
        cfg.name = name
        meta = {"stage": "distill", "student_init": info, "alpha_kd": alpha_kd, "alpha_ce": 1 - alpha_kd,
                "temperature": 2.0, "train_steps": 8, "train_tokens": 1024, "train_seconds": 1.0,
                "n_layer": 1, "n_embd": 32, "n_params": 1}
        dirs[name] = save_model(student, tokenizer, tmp_path / name, cfg, meta)
    # A training log for the teacher, where its config says the run lives.
    t_cfg.run_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"step": s, "loss": 10 - s, "ce": 10 - s} for s in (1, 2, 3)] + [{"step": 3, "val_loss": 7.5}]
    (t_cfg.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dirs


def _independent_ppl(model_dir, validation_txt, tokenizer, block_size: int) -> float:
    """Tokenize the validation file directly (a document per line + EOS), cut blocks, average HF's own loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = []
    for line in validation_txt.read_text().splitlines():
        if line.strip():
            ids += tokenizer.encode(line.strip()) + [tokenizer.eos_token_id]
    n = len(ids) // block_size
    assert n >= 4
    blocks = torch.tensor(ids[:n * block_size]).view(n, block_size)
    with torch.no_grad():
        losses = [model(input_ids=b[None], labels=b[None]).loss.item() for b in blocks]
    return math.exp(sum(losses) / len(losses))


def _independent_fidelity(student_dir, teacher_dir, ids):
    """Top-1 agreement and mean KL(teacher ‖ student) per position, with F.kl_div, from the saved folders."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    s_model = AutoModelForCausalLM.from_pretrained(str(student_dir)).eval()
    t_model = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    with torch.no_grad():
        s, t = s_model(input_ids=ids).logits.double(), t_model(input_ids=ids).logits.double()
    v = s.shape[-1]
    kl = F.kl_div(F.log_softmax(s, -1).view(-1, v), F.log_softmax(t, -1).view(-1, v), log_target=True,
                  reduction="batchmean")
    return (s.argmax(-1) == t.argmax(-1)).double().mean().item(), kl.item()


def test_report_perplexity_files_and_cards(tmp_path, saved_models, text_corpus, tokenizer, capsys, one_thread,
                                           monkeypatch):
    out = tmp_path / "reports"
    clock = iter(range(10**6))  # every timed job takes 0.5 s on this clock
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=lambda: next(clock) * 0.5))
    spec = ",".join(f"{k}={v}" for k, v in saved_models.items()) + f",v1={tmp_path / 'no_v1'}"
    assert report_cmd(["--models", spec, "--out", str(out), "--quick", "--max-eval-blocks", "0"]) == 0
    assert "v2_ce" in capsys.readouterr().out.split("## KD")[0]  # the table goes to stdout

    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "v2", "v2_ce"}
    assert any("v1 skipped" in n for n in report["notes"])
    new_tokens = report["settings"]["new_tokens"]  # EOS ignored: every row decodes exactly these
    for name, path in saved_models.items():
        want = _independent_ppl(path, text_corpus["validation"], tokenizer, 32)
        m = report["models"][name]
        assert m["val_ppl"] == pytest.approx(want, rel=1e-4), name
        assert m["size_mb"] == pytest.approx((path / "model.safetensors").stat().st_size / 1e6)
        assert (m["tok_s_b1"], m["tok_s_b8"]) == (new_tokens / 0.5, 8 * new_tokens / 0.5), name
        card = (path / "README.md").read_text()
        assert "generation, batch 1 (tokens/s)" in card and "size on disk (MB)" in card
    t, kd, ce = (report["models"][k] for k in ("teacher", "v2", "v2_ce"))
    assert kd["ppl_x_teacher"] == pytest.approx(kd["val_ppl"] / t["val_ppl"])
    assert kd["speedup_b1"] == kd["tok_s_b1"] / t["tok_s_b1"] == 1.0
    assert t["n_layer"] == 2 and kd["n_layer"] == 1
    kc = report["kd_vs_ce"]
    assert kc["ppl_ratio_kd_over_ce"] == pytest.approx(kd["val_ppl"] / ce["val_ppl"])
    assert kc["equal_steps"] and ("did NOT beat" in kc["statement"]) == (not kc["kd_beats_ce"])

    md = (out / "report.md").read_text()
    assert "| model | precision | layers × width | params | size MB | val ppl |" in md and kc["statement"] in md
    # Fidelity to the teacher, against an independent computation over the same blocks.
    blocks = evaluation.held_out([evaluation.load_entry("teacher", saved_models["teacher"])], 0)[1]
    want = _independent_fidelity(saved_models["v2"], saved_models["teacher"], blocks.ids)
    assert kd["top1_teacher"] == pytest.approx(want[0], abs=1e-9) and kd["kl_teacher"] == pytest.approx(want[1], rel=1e-4)
    assert t["top1_teacher"] == 1.0 and t["kl_teacher"] == 0.0
    assert set(report["pareto"]) == {"speed", "size"}
    for png in ("training_curves.png", "tradeoffs.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC


def test_missing_teacher_or_v2_exits_2(tmp_path, saved_models, monkeypatch, capsys):
    out = str(tmp_path / "r")
    spec = f"teacher={saved_models['teacher']},v2={tmp_path / 'nowhere'}"
    assert report_cmd(["--models", spec, "--out", out]) == 2
    assert "make run" in capsys.readouterr().err
    # By name: the package folders (pointed somewhere empty here).
    monkeypatch.setitem(MODEL_DIRS, "teacher", tmp_path / "no_teacher")
    monkeypatch.setitem(MODEL_DIRS, "v2", saved_models["v2"])
    assert report_cmd(["--models", "teacher,v2", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "teacher model not found" in err and "make run" in err
    assert not (tmp_path / "r" / "report.json").exists()


def test_flops_formula_on_known_shapes():
    # GPT-2 small: 124,439,808 parameters = 85,056,000 non-embedding + wte 50257×768 + wpe 1024×768.
    assert non_embedding_params(12, 768) == 85_056_000
    assert non_embedding_params(12, 768) + 50257 * 768 + 1024 * 768 == 124_439_808
    # By hand, 1 layer, d=4 (MLP 16), vocab 10, ctx 3: block = 4·12 + 12 + 16 + 4 + 4·16 + 16 + 16·4 + 4 + 16 = 244,
    # + final norm 8 = 252; FLOPs = 2·(252 + 40) + 2·1·3·4 = 608.
    assert non_embedding_params(1, 4) == 252
    assert forward_flops_per_token(1, 4, 10, 3) == 608
    # The ideal speed-ups the issue quotes: 12→6 layers is ~1.5× at d768, ~1.3× at d256 (LM head stays).
    r768 = forward_flops_per_token(12, 768, 50257, 64) / forward_flops_per_token(6, 768, 50257, 64)
    r256 = forward_flops_per_token(12, 256, 50257, 64) / forward_flops_per_token(6, 256, 50257, 64)
    assert 1.50 < r768 < 1.54 and 1.25 < r256 < 1.30


def _load_harness():
    spec = importlib.util.spec_from_file_location("bench_harness", ROOT / "benchmarks" / "run.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    return harness


def test_bench_harness_writes_results_and_survives_a_failing_section(tmp_path):
    harness = _load_harness()
    bench = tmp_path / "benches"
    bench.mkdir()
    (bench / "bench_fake.py").write_text(textwrap.dedent("""
        def run(quick=False):
            return {"section": "Fake", "rows": [
                {"metric": "speed-up", "value": 2.0, "unit": "×", "target": ">= 1.5", "met": True, "note": "q" if quick else ""},
                {"metric": "ratio", "value": 0.5, "unit": "", "target": ">= 0.9", "met": False, "note": "too slow"},
                {"metric": "info", "value": 3.0, "unit": "ms", "target": None, "met": None, "note": ""}]}
    """))
    (bench / "bench_broken.py").write_text("def run(quick=False):\n    raise RuntimeError('boom')\n")
    out = tmp_path / "out"
    rc = harness.main(["--quick", "--bench-dir", str(bench), "--out-dir", str(out)])
    assert rc == 1  # a section failed
    data = json.loads((out / "results.json").read_text())
    sections = {s["name"]: s for s in data["sections"]}
    assert sections["fake"]["rows"][0]["note"] == "q" and sections["fake"]["error"] is None
    assert "boom" in sections["broken"]["error"]
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["torch"] == torch.__version__
    md = (out / "results.md").read_text()
    assert "## Fake" in md and "✓" in md and "✗" in md and "boom" in md
    # --only runs just that section, and a clean run exits 0.
    assert harness.main(["--only", "fake", "--bench-dir", str(bench), "--out-dir", str(out)]) == 0
    assert [s["name"] for s in json.loads((out / "results.json").read_text())["sections"]] == ["fake"]
    # (a quick run's sections are not mixed into a full run's.) Rerunning one section keeps the others.
    first = json.loads((out / "results.json").read_text())["sections"][0]
    assert harness.main(["--only", "broken", "--bench-dir", str(bench), "--out-dir", str(out)]) == 1
    sections = json.loads((out / "results.json").read_text())["sections"]
    assert [s["name"] for s in sections] == ["fake", "broken"] and sections[0] == first
    assert "## Fake" in (out / "results.md").read_text() and first["date"] in (out / "results.md").read_text()


def test_report_refuses_a_student_of_another_teacher(tmp_path, saved_models, capsys):
    from python3_distillation.lineage import weights_sha256
    from python3_distillation.models import META_FILE, open_model

    meta_file = saved_models["v2"] / META_FILE
    meta = json.loads(meta_file.read_text())
    meta["teacher_sha256"] = weights_sha256(open_model(saved_models["teacher"]).model)
    meta_file.write_text(json.dumps(meta))
    spec = f"teacher={saved_models['teacher']},v2={saved_models['v2']}"
    assert report_cmd(["--models", spec, "--out", str(tmp_path / "ok"), "--quick", "--max-eval-blocks", "2"]) == 0
    # The teacher is retrained (its weights change): the old student no longer belongs beside it.
    teacher = open_model(saved_models["teacher"]).model
    with torch.no_grad():
        teacher.transformer.ln_f.bias.add_(0.01)
    teacher.save_pretrained(saved_models["teacher"])
    capsys.readouterr()
    assert report_cmd(["--models", spec, "--out", str(tmp_path / "bad"), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "v2" in err and "distilled from a teacher whose weights hash is" in err and "retrained" in err
    assert not (tmp_path / "bad" / "report.json").exists()


def test_pareto_front():
    from python3_distillation.evaluation.plots import pareto_front

    pts = {"a": (100.0, 50.0), "b": (200.0, 60.0), "c": (150.0, 70.0), "d": (90.0, 40.0), "e": (200.0, 60.0)}
    # c is beaten by b (faster and lower); b and e tie and both stay; a, d trade speed for quality.
    assert pareto_front(pts, higher_x_better=True) == {"a", "b", "d", "e"}
    size = {"small": (10.0, 80.0), "big": (40.0, 50.0), "worse": (20.0, 90.0)}
    assert pareto_front(size, higher_x_better=False) == {"small", "big"}


def test_markdown_table_aligns_columns_as_told():
    from python3_distillation.evaluation.cards import fmt, markdown_table

    assert markdown_table(["model", "ppl"], [["v2", fmt(12.345)], ["v1", fmt(None)]]) == [
        "| model | ppl |", "|---|---:|", "| v2 | 12.35 |", "| v1 | n/a |"]
    assert markdown_table(["a", "b", "c"], [], "lrl")[1] == "|---|---:|---|"
