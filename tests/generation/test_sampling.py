"""Sampling settings at their edges: bounds, tiny temperatures, ignore_eos, and a failing row failing alone.

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python -m pytest tests/generation/test_sampling.py -q
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from python3_distillation.generation import GenerationError, Generator, RowInput, SamplingParams
from python3_distillation.validation import MAX_STOP_CHARS, MAX_STOP_STRINGS
from python3_distillation.generation.text import RowText

EOS = 50256
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gen(tokenizer) -> Generator:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=50257,
                                       initializer_range=0.2)).eval()
    return Generator(model, tokenizer, device="cpu")


@pytest.mark.parametrize("field,value", [
    ("top_k", 2**63), ("seed", 2**64), ("seed", 10**400), ("temperature", 1e300), ("temperature", float("inf")),
    ("repetition_penalty", 1e-300), ("max_new_tokens", 10**400), ("stop", ["x"] * (MAX_STOP_STRINGS + 1)),
    ("stop", ["y" * (MAX_STOP_CHARS + 1)]), ("ignore_eos", 1),
])
def test_values_past_the_bounds_are_refused(field, value):
    with pytest.raises(GenerationError, match=field.split("_")[0]):
        SamplingParams(**{field: value})


def test_top_k_past_the_vocabulary_is_refused_for_that_model(gen):
    with pytest.raises(GenerationError, match="top_k must be at most the vocabulary size 50257"):
        gen.check_prompt("hi", SamplingParams(max_new_tokens=4, top_k=50258))
    assert gen.check_prompt("hi", SamplingParams(max_new_tokens=4, top_k=50257))


@pytest.mark.parametrize("temperature", [1e-50, 1e-40, 1e-6])
def test_tiny_temperatures_decode_greedily_not_nan(gen, temperature):
    prompts = ["It is a truth", "Hello"]
    greedy = [c.token_ids for c in gen.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0))]
    tiny = gen.generate(prompts, SamplingParams(max_new_tokens=10, temperature=temperature, seed=1))
    assert [c.token_ids for c in tiny] == greedy


def test_a_small_but_sampling_temperature_still_samples_without_nan(gen):
    c = gen.generate(["Hello"], SamplingParams(max_new_tokens=10, temperature=1e-3, top_p=0.5, top_k=5, seed=1))[0]
    assert c.completion_tokens == 10 and all(0 <= t < 50257 for t in c.token_ids)


class EOSLM(torch.nn.Module):
    """A causal LM whose every next token is EOS."""

    def __init__(self):
        from transformers import GPT2Config

        super().__init__()
        self.config = GPT2Config(n_positions=64, vocab_size=50257)
        self.out = torch.nn.Embedding(50257, 1)

    def get_output_embeddings(self):
        return self.out

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, cache=None, **kw):
        logits = torch.full((*input_ids.shape, 50257), -1e4)
        logits[..., EOS] = 0.0
        return SimpleNamespace(logits=logits, cache=None)


def test_ignore_eos_runs_to_max_new_tokens(tokenizer):
    g = Generator(EOSLM(), tokenizer, device="cpu")
    stopped, full = g.generate(["a", "b"], [SamplingParams(max_new_tokens=5, temperature=0),
                                           SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)])
    assert stopped.completion_tokens == 0 and stopped.finish_reason == "stop"
    assert full.completion_tokens == 5 and full.finish_reason == "length" and full.token_ids == [EOS] * 5


def test_long_stop_strings_cost_little_per_token():
    """Each token looks at the unsent text only: no work growing with the square of the output."""
    rt = RowText(["z" * MAX_STOP_CHARS] * MAX_STOP_STRINGS)
    out = "".join(rt.add(b"a") for _ in range(20_000))
    assert out == "a" * 20_000 and rt.finish() == ""


def test_a_row_whose_text_fails_fails_alone(gen, monkeypatch):
    params = SamplingParams(max_new_tokens=8, temperature=0)
    prompts = ["It is a truth", "Hello there", "The cat"]
    alone = {p: gen.generate([p], params)[0].text for p in prompts}
    add = RowText.add
    bad = set()

    def add_or_fail(self, data: bytes) -> str:
        if id(self) in bad:
            raise RuntimeError("this row's text broke")
        return add(self, data)

    monkeypatch.setattr(RowText, "add", add_or_fail)
    batch = gen.new_batch()
    rows = [RowInput(p, p, gen.check_prompt(p, params), params) for p in prompts]
    events = batch.step(rows)
    bad.add(id(batch.rows[1].text))  # "Hello there" breaks from its second token on
    while len(batch):
        events += batch.step()
    failed = [e for e in events if e.error is not None]
    assert [e.row for e in failed] == ["Hello there"]
    finished = {e.row: e.completion for e in events if e.finished and e.error is None}
    assert {k: c.text for k, c in finished.items()} == {p: alone[p] for p in prompts if p != "Hello there"}


def test_a_row_whose_sampling_fails_fails_alone(gen, monkeypatch):
    """The batch's sampler raises: every row is sampled alone, with its own seed, and only the culprit fails."""
    from python3_distillation.generation import generator

    params = [SamplingParams(max_new_tokens=8, temperature=1.0, seed=s) for s in (1, 2, 3)]
    prompts = ["It is a truth", "Hello there", "The cat"]
    alone = {p: gen.generate([p], [q])[0].token_ids for p, q in zip(prompts, params)}
    choose, bad = generator.choose, set()

    def choose_or_fail(logits, knobs, seen, generators):
        if any(id(g) in bad for g in generators):
            raise RuntimeError("this row's sampling broke")
        return choose(logits, knobs, seen, generators)

    monkeypatch.setattr(generator, "choose", choose_or_fail)
    batch = gen.new_batch()
    events = batch.step([RowInput(p, p, gen.check_prompt(p, q), q) for p, q in zip(prompts, params)])
    bad.add(id(batch.rows[1].rng))  # "Hello there" breaks from its second token on
    while len(batch):
        events += batch.step()
    failed = [e for e in events if e.error is not None]
    assert [(e.row, str(e.error)) for e in failed] == [("Hello there", "this row's sampling broke")]
    finished = {e.row: e.completion.token_ids for e in events if e.finished and e.error is None}
    assert finished == {p: alone[p] for p in prompts if p != "Hello there"}


def test_a_row_whose_prefill_fails_fails_alone(gen):
    """Rows joining together: one whose ids the model cannot embed fails; the others join one by one."""
    params = SamplingParams(max_new_tokens=6, temperature=0)
    prompts = ["It is a truth", "The cat"]
    alone = {p: gen.generate([p], params)[0].token_ids for p in prompts}
    rows = [RowInput(p, p, gen.check_prompt(p, params), params) for p in prompts]
    rows.insert(1, RowInput("bad", "", [10 ** 9], params))  # past the vocabulary
    batch = gen.new_batch()
    events = batch.step(rows)
    while len(batch):
        events += batch.step()
    failed = [e for e in events if e.error is not None]
    assert [e.row for e in failed] == ["bad"] and isinstance(failed[0].error, IndexError)
    assert {e.row: e.completion.token_ids for e in events if e.finished and e.error is None} == alone
