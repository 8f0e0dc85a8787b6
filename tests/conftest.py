"""Shared fixtures: the real GPT-2 tokenizer, tiny GPT-2 models and tiny text corpora.

    python -m pytest -x -q
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
# A run that changes `git status` of the checkout fails (these two hooks; see clean_tree.py).
from clean_tree import pytest_sessionfinish, pytest_sessionstart  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
# Offline by design: a hub id would otherwise hang ~48 s before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Share the project's data dir so the tokenizer/corpus are built once (for real, not mocked).
os.environ.setdefault("DISTILL_DATA_DIR", str(ROOT / "data"))
# Servers started from the environment decode eagerly unless a test asks for the compiled step (its
# default, auto, would compile each tiny model's packages on load; tests/generation/test_compiled.py
# and the compile tests of tests/serving/test_api.py cover it).
os.environ.setdefault("DISTILL_COMPILE", "0")

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.\n"
    "However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families.\n"
    "The cat sat on the mat. The dog sat on the log. The cat sat on the mat again.\n"
)


# Prompts for decoding tests: short, long, non-ASCII (multi-byte tokens), unequal lengths for padding.
PROMPTS = [
    "Hello",
    "It is a truth universally acknowledged, that a single man",
    "你好, 世界 🙂 — café",
    "The cat sat on the mat. The dog",
    "She",
]


class StopTraining(Exception):
    """Raised by a step callback to stop a run there (a simulated kill)."""


def spread(model, std: float = 0.15):
    """Weights with GPT-2-like spread, so logits are far from uniform and argmax ties are rare."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std, generator=g)
    return model


def run_schedule(gen, schedule: dict[int, list[tuple[str, int]]]) -> tuple[dict, list[int]]:
    """Step a DecodeBatch, adding ``schedule[step]`` rows (prompt, max_new_tokens) at that step: rows
    joining a running decode (continuous batching). Returns each row's completion and the batch sizes."""
    from python3_distillation.generation import RowInput, SamplingParams

    batch = gen.new_batch()
    done, sizes, key, step = {}, [], 0, 0
    while step <= max(schedule) or len(batch):
        new = []
        for prompt, n in schedule.get(step, []):
            params = SamplingParams(max_new_tokens=n, temperature=0)
            new.append(RowInput((key, prompt, n), prompt, gen.check_prompt(prompt, params), params))
            key += 1
        for ev in batch.step(new):
            assert ev.error is None, ev.error
            if ev.finished:
                done[ev.row] = ev.completion
        sizes.append(batch.rows_in_use)
        step += 1
    return done, sizes


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models decode fastest on one thread; two threads on a busy 2-core machine thrash."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer():
    from python3_distillation.tokenizer import load_tokenizer

    return load_tokenizer("gpt2")


def tiny_gpt2(n_layer: int = 2, n_embd: int = 32, n_head: int = 2, n_positions: int = 64, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions, vocab_size=50257,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=50256, eos_token_id=50256)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def text_corpus(tmp_path) -> dict[str, Path]:
    """A small train/validation pair of .txt files (one document per line)."""
    train = tmp_path / "train.txt"
    val = tmp_path / "validation.txt"
    train.write_text(TEXT * 40, encoding="utf-8")
    val.write_text(TEXT * 4, encoding="utf-8")
    return {"train": train, "validation": val}


def tiny_overrides(tmp_path: Path, corpus: dict[str, Path], stage: str = "teacher", **sections) -> list[str]:
    """Dotted overrides for a seconds-long CPU run on ``corpus`` (for the CLI or ``load_config``)."""
    overrides = [
        f"stage={stage}", f"name={stage}-tiny",
        f"data.train={corpus['train']}", f"data.validation={corpus['validation']}", "data.block_size=32",
        "data.max_eval_blocks=8",
        "teacher.n_layer=2", "teacher.n_embd=32", "teacher.n_head=2", "teacher.n_positions=64",
        f"teacher.path={tmp_path / 'teacher'}", f"student.output_dir={tmp_path / 'student'}",
        "train.max_steps=8", "train.batch_size=4", "train.warmup_steps=2", "train.lr=3e-3",
        "train.eval_every=0", "train.save_every=4", "train.log_every=1", "train.mixed_precision=no",
        f"train.run_dir={tmp_path / 'runs' / stage}",
    ]
    for section, values in sections.items():
        overrides += [f"{section}.{k}={v}" for k, v in values.items()]
    return overrides


def tiny_run_config(tmp_path: Path, corpus: dict[str, Path], stage: str = "teacher", **sections):
    """A RunConfig for a seconds-long CPU run on ``corpus``."""
    from python3_distillation.config import load_config

    return load_config([], tiny_overrides(tmp_path, corpus, stage, **sections))
