"""The READMEs' example commands never write to `make run`'s folders, so trying one never costs
the user the default student or the main command.

    python -m pytest -q tests/test_examples.py
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import tiny_gpt2
from python3_distillation.config import CONFIGS_DIR, load_config

ROOT = Path(__file__).resolve().parent.parent
READMES = [ROOT / "README.md", ROOT / "README_python3_distillation.md"]
# make run: teacher, distill-v2 (the entry script = --config v2), distill-v2-ce.
MAKE_RUN = {"teacher": ["teacher"], "v2": ["v2"], "v2_ce": ["v2_ce"]}
# The verb → its default config, as cli.py declares them; the entry scripts name their config.
DEFAULTS = {"teacher": "teacher", "distill": "v2", "cache-teacher": "v2", "prepare-data": "teacher"}
SCRIPTS = {"python3_distillation/distill_training_v2.py": "v2", "python3_distillation/distill_training.py": "v1"}


def readme_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(verb, argv) of every training command in the file's ```bash blocks, `$VAR`s expanded."""
    out, vars_ = [], {}
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if not words:
                continue
            if len(words) == 1 and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                name, value = words[0].split("=", 1)
                vars_[name] = value
                continue
            words = [w for word in words for w in (shlex.split(vars_[word[1:]]) if word[:1] == "$" and
                                                   word[1:] in vars_ else [word])]
            if "python3_distillation" in words and "-m" in words:  # accelerate launch … -m python3_distillation
                words = ["gpt2-distill", *words[words.index("python3_distillation") + 1:]]
            if words[:1] == ["gpt2-distill"] and len(words) > 1 and words[1] in DEFAULTS:
                out.append((words[1], words[2:]))
            elif words[:1] == ["python"] and len(words) > 1 and words[1] in SCRIPTS:
                out.append(("distill", ["--config", SCRIPTS[words[1]], *words[2:]]))
    return out


def resolve(verb: str, argv: list[str]):
    p = argparse.ArgumentParser()
    p.add_argument("--config", action="append")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out")
    p.add_argument("--num-proc")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    return load_config(args.config or [DEFAULTS[verb]], args.overrides)


def test_the_readmes_have_training_examples():
    for readme in READMES:
        cmds = readme_commands(readme)
        assert sum(1 for _, argv in cmds if any("=" in a for a in argv)) >= 8, readme.name


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.name)
def test_no_example_writes_a_make_run_folder(readme):
    stages = {name: load_config(files) for name, files in MAKE_RUN.items()}
    taken = {Path(c.output_dir): n for n, c in stages.items()} | {Path(c.run_dir): n for n, c in stages.items()}
    for verb, argv in readme_commands(readme):
        cfg = resolve(verb, argv)
        if any(cfg.to_dict() == stage.to_dict() for stage in stages.values()):
            continue  # that is a make run stage itself (it resumes)
        if verb in ("teacher", "distill"):
            assert Path(cfg.output_dir) not in taken, f"{verb} {' '.join(argv)} → {cfg.output_dir}"
            assert Path(cfg.run_dir) not in taken, f"{verb} {' '.join(argv)} → {cfg.run_dir}"


def test_overrides_move_the_folders_and_name_picks_them():
    base = load_config(["v2"])
    changed = load_config(["v2"], ["student.n_layer=4"])
    assert changed.name.startswith("v2-") and changed.name == load_config(["v2"], ["--student.n_layer=4"]).name
    assert Path(changed.output_dir) == Path("python3_distillation") / f"gpt2_student_{changed.name}"
    assert changed.run_dir == Path("runs") / changed.name
    named = load_config(["v2"], ["name=v2_4layers", "student.n_layer=4"])
    assert (Path(named.output_dir).name, named.run_dir) == ("gpt2_student_v2_4layers", Path("runs/v2_4layers"))
    # The config's own values given again change nothing; naming the folders yourself is yours to do.
    assert load_config(["v2"], ["train.max_steps=200"]).to_dict() == base.to_dict()
    own = load_config(["v2"], ["name=v2", "student.n_layer=4"])
    assert (own.output_dir, own.run_dir) == (base.output_dir, base.run_dir)
    explicit = load_config(["v2"], ["student.n_layer=3", "student.output_dir=elsewhere", "train.run_dir=r"])
    assert (explicit.name, explicit.output_dir, explicit.run_dir) == ("v2", Path("elsewhere"), Path("r"))
    teacher = load_config(["teacher"], ["train.max_steps=10"])
    assert Path(teacher.output_dir).name == f"gpt2_{teacher.name}" and teacher.name.startswith("teacher-")


def test_an_example_run_then_the_main_stage_still_resumes(tmp_path, monkeypatch, tokenizer, text_corpus):
    """A tiny stand-in for `make distill-v2` (a config file named v2, relative folders), an example
    with overrides run next to it, then the stage again with --resume: it finds its own finished run,
    not "cannot resume: config changed", and its weights are untouched."""
    from python3_distillation.cli import main

    monkeypatch.chdir(tmp_path)
    teacher = tmp_path / "teacher"
    tiny_gpt2(n_layer=2, n_embd=32, n_head=2).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    stage = tmp_path / "v2.yaml"
    stage.write_text(yaml.safe_dump({
        "base": str(CONFIGS_DIR / "v2.yaml"), "teacher": {"path": str(teacher)},
        "data": {"train": str(text_corpus["train"]), "validation": str(text_corpus["validation"]),
                 "block_size": 32, "max_eval_blocks": 4},
        "train": {"max_steps": 4, "batch_size": 2, "warmup_steps": 1, "eval_every": 0, "save_every": 2,
                  "mixed_precision": "no"}}), encoding="utf-8")
    assert main(["distill", "--config", str(stage)]) == 0
    weights = tmp_path / "python3_distillation" / "gpt2_student_v2" / "model.safetensors"
    before = weights.read_bytes()
    assert main(["distill", "--config", str(stage), "student.n_layer=1", "distill.temperature=4"]) == 0
    example = [p for p in (tmp_path / "python3_distillation").iterdir() if p.name.startswith("gpt2_student_v2-")]
    assert len(example) == 1 and (example[0] / "model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["v2", example[0].name.removeprefix("gpt2_student_")]
    assert main(["distill", "--config", str(stage), "--resume"]) == 0
    assert weights.read_bytes() == before
    assert json.loads((weights.parent / "config.json").read_text())["n_layer"] == 6
