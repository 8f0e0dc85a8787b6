"""The inference CLI end to end, in process, on tiny saved models: text, streams, batch files, errors.

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python -m pytest tests/test_infer.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from python3_distillation import infer, paths
from python3_distillation.generation import Generator, SamplingParams

REPO = Path(__file__).resolve().parent.parent
KEYS = ["prompt", "completion", "prompt_tokens", "completion_tokens", "seconds", "finish_reason"]


pytestmark = pytest.mark.usefixtures("one_thread")


def save_tiny(out: Path, tokenizer, seed: int, n_layer: int = 2) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, n_positions=64, vocab_size=50257,
                               initializer_range=0.2)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer) -> Path:
    return save_tiny(tmp_path_factory.mktemp("models") / "gpt2_student_v2", tokenizer, seed=0)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tokenizer) -> Path:
    return save_tiny(tmp_path_factory.mktemp("models") / "gpt2_teacher", tokenizer, seed=1, n_layer=3)


@pytest.fixture(scope="module")
def gen(student) -> Generator:
    return Generator.from_pretrained(student, device="cpu")


def run(capsys, *argv: str, default_model: str = "v2") -> tuple[int, str, str]:
    rc = infer.main([str(a) for a in argv], default_model=default_model)
    out, err = capsys.readouterr()
    return rc, out, err


GREEDY = ["--temperature", "0", "--max-new-tokens", "6"]


def test_single_prompt(capsys, student, gen):
    rc, out, err = run(capsys, "It is a truth", "--model", student, *GREEDY)
    expected = gen.generate(["It is a truth"], SamplingParams(max_new_tokens=6, temperature=0))[0]
    assert rc == 0 and out == "It is a truth" + expected.text + "\n"
    assert "6 tokens" in err and "tok/s" in err


def test_stream_prints_the_same_text(capsys, student):
    rc, plain, _ = run(capsys, "Once upon a time", "--model", student, "--seed", "3", "--max-new-tokens", "12")
    rc2, streamed, _ = run(capsys, "Once upon a time", "--model", student, "--seed", "3", "--max-new-tokens", "12",
                           "--stream")
    assert rc == rc2 == 0 and streamed == plain and plain.startswith("Once upon a time")


def test_txt_file_to_jsonl(capsys, tmp_path, student, gen):
    f = tmp_path / "prompts.txt"
    f.write_text("It is a truth\n\n   \nHello there\n{\"not\": \"json here\"}\n", encoding="utf-8")
    out_file = tmp_path / "out.jsonl"
    rc, out, err = run(capsys, "--model", student, "--prompts-file", f, "--output", out_file, "--batch-size", "2",
                       *GREEDY)
    assert rc == 0 and out == ""
    recs = [json.loads(line) for line in out_file.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in recs] == ["It is a truth", "Hello there", '{"not": "json here"}']
    assert all(list(r) == KEYS for r in recs)
    ref = gen.generate([r["prompt"] for r in recs], SamplingParams(max_new_tokens=6, temperature=0))
    assert [r["completion"] for r in recs] == [c.text for c in ref]
    assert all(r["completion_tokens"] == 6 and r["finish_reason"] == "length" for r in recs)
    assert "prompt" in err  # the progress bar, on stderr


def test_jsonl_file_per_line_params_and_bad_lines(capsys, tmp_path, student, gen):
    f = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "It is a truth", "max_new_tokens": 3},
        "{not json",
        {"prompt": "Hello", "top_p": 1.5},
        {"prompt": ""},
        ["a list"],
        {"text": "no prompt"},
        {"prompt": "Hello", "temprature": 1},
        {"prompt": "The cat", "seed": 4, "temperature": 0.9},
        {"prompt": "Hi", "stop": ["s" * 300]},
        {"prompt": "Hi", "top_k": 2**63},
        '{"prompt": "\\ud800"}',
    ]
    f.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    rc, out, err = run(capsys, "--model", student, "--prompts-file", f, *GREEDY)
    assert rc == 2
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in recs] == ["It is a truth", "The cat"]
    assert recs[0]["completion_tokens"] == 3  # the line's own max_new_tokens wins over the flag
    first = gen.generate(["It is a truth"], SamplingParams(max_new_tokens=3, temperature=0))[0]
    assert recs[0]["completion"] == first.text
    assert recs[1]["completion"] == gen.generate(["The cat"], SamplingParams(max_new_tokens=6, temperature=0.9,
                                                                             seed=4))[0].text
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert [e.split(":")[2] for e in errors] == ["2", "3", "4", "5", "6", "7", "9", "10", "11"]
    assert "invalid JSON" in errors[0] and "top_p" in errors[1] and "prompt is empty" in errors[2]
    assert "JSON object" in errors[3] and '"prompt" string' in errors[4] and "temprature" in errors[5]
    # the server's bounds
    assert ":9: stop[0]: string should have at most 256 characters" in errors[6]
    assert ":10: top_k: input should be less than or equal to 2147483647" in errors[7]
    assert "unicode" in errors[8]  # a lone surrogate


def test_compare_side_by_side(capsys, student, teacher):
    rc, out, err = run(capsys, "It is a truth", "--model", student, "--compare", "--teacher", teacher, *GREEDY)
    assert rc == 0, err
    head = out.splitlines()[2]
    assert head.startswith("teacher gpt2_teacher: 6 tokens") and "| student gpt2_student_v2: 6 tokens" in head
    assert head.count("tok/s") == 2 and "the teacher's tokens/s" in out
    t = Generator.from_pretrained(teacher, device="cpu").generate(["It is a truth"], SamplingParams(
        max_new_tokens=6, temperature=0))[0].text
    assert t.split()[0] in out


def test_compare_in_a_file_adds_the_teachers_result(capsys, tmp_path, student, teacher):
    f = tmp_path / "p.txt"
    f.write_text("Hello\n", encoding="utf-8")
    rc, out, _ = run(capsys, "--model", student, "--teacher", teacher, "--compare", "--prompts-file", f, *GREEDY)
    rec = json.loads(out)
    assert rc == 0 and rec["teacher"]["completion_tokens"] == 6 and "prompt" not in rec["teacher"]


def test_long_prompt_is_truncated_with_a_warning(capsys, student):
    rc, out, err = run(capsys, "word" + " word" * 99, "--model", student, *GREEDY)
    assert rc == 0 and "warning: prompt 1: prompt is 100 tokens" in err and "keeping its last 58" in err


@pytest.mark.parametrize("argv,message", [
    (["", "--model", "{student}"], "prompt is empty"),
    (["hi", "--model", "{student}", "--temperature", "-1"], "--temperature: input should be greater than or equal to 0, got -1.0"),
    (["hi", "--model", "{student}", "--top-p", "0"], "--top-p: input should be greater than 0, got 0.0"),
    (["hi", "--model", "{student}", "--top-p", "1.5"], "--top-p: input should be less than or equal to 1, got 1.5"),
    (["hi", "--model", "{student}", "--max-new-tokens", "2.5"], "--max-new-tokens: invalid int value"),
    (["hi", "--model", "{student}", "--max-new-tokens", "0"], "--max-new-tokens: input should be greater than or equal to 1, got 0"),
    (["hi", "--model", "{student}", "--max-new-tokens", "64"], "leaves no room for a prompt"),
    (["hi", "--model", "{student}", "--repetition-penalty", "0"], "--repetition-penalty: input should be greater than or equal to 0.01, got 0.0"),
    (["hi", "--model", "{student}", "--stop", ""], "--stop[0]: string should have at least 1 character"),
    (["hi", "--model", "{student}", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--model", "{student}"], "no prompt"),
    (["hi", "--model", "{missing}"], "model folder {missing} not found; `make run` creates it"),
    (["hi", "--model", "{student}", "--compare", "--teacher", "{missing}"], "teacher model folder {missing} not found"),
    (["--model", "{student}", "--prompts-file", "{missing}"], "prompts file {missing} not found"),
    (["hi", "--model", "{student}", "--stream", "--compare"], "--stream"),
    (["hi", "--model", "{student}", "--bogus"], "unrecognized arguments: --bogus"),
    (["bad \udc80 bytes", "--model", "{student}", "--max-new-tokens", "4"],
     "prompt 1: prompt cannot be tokenized"),  # a lone surrogate, as argv decodes bytes that are not UTF-8
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, student, argv, message):
    fill = {"student": student, "missing": tmp_path / "missing"}
    rc, out, err = run(capsys, *[a.format(**fill) for a in argv])
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message.format(**fill) in lines[0], err


def test_default_model_folder_is_named_when_missing(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(paths.MODEL_DIRS, "v1", tmp_path / "gpt2_student")
    rc, _, err = run(capsys, "hi", default_model="v1")
    assert rc == 2 and f"student model folder {tmp_path / 'gpt2_student'} not found; `make run`" in err


def test_help(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0
    for words in ("--prompts-file", "--compare", "--stream", "truncated from the left", "exit status"):
        assert words in out


def test_add_arguments_serves_another_parser(student, capsys):
    import argparse

    p = infer.add_arguments(argparse.ArgumentParser(prog="gpt2-distill infer"), default_model="v1")
    args = p.parse_args(["Hello", "--model", str(student), *GREEDY])
    assert infer.run(args) == 0 and capsys.readouterr().out.startswith("Hello")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["distill_infer_v2.py", "distill_infer.py"])
def test_scripts_run_as_files(student, script):
    proc = subprocess.run([sys.executable, f"python3_distillation/{script}", "It is a truth", "--model", str(student),
                           *GREEDY], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("It is a truth") and "Loading" not in proc.stderr
