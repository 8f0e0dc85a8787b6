"""Rows joining a running decode, leaving it, and decoders over non-standard modules, against transformers.

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python -m pytest tests/generation/test_decoders.py -q
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import PROMPTS, run_schedule
from python3_distillation.generation import Generator, RowInput, SamplingParams
from python3_distillation.generation.decoders import GPT2Decoder

EOS = 50256

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=50257, initializer_range=0.2,
                     bos_token_id=EOS, eos_token_id=EOS)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def hf_greedy(model, tokenizer, prompt: str, n: int) -> list[int]:
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=EOS)
    ids = out[0, enc.input_ids.shape[1]:].tolist()
    return ids[:ids.index(EOS)] if EOS in ids else ids


@pytest.mark.parametrize("backend", ["gpt2", "hf"])
def test_rows_joining_a_running_decode_equal_transformers(model, tokenizer, backend):
    """Rows join at later steps (a longer prompt than the batch's history too) and leave; each row's greedy
    tokens are transformers' own, whatever joined or left around it."""
    gen = Generator(model, tokenizer, device="cpu", backend=backend)
    schedule = {0: [(PROMPTS[0], 12), (PROMPTS[4], 3)],
                1: [(PROMPTS[1], 10)],  # 11 tokens join a batch whose history is 1 column: the cache shifts
                4: [(PROMPTS[2], 12), (PROMPTS[3], 2)],
                5: [(PROMPTS[4], 12)],
                9: [(PROMPTS[1], 5), (PROMPTS[0], 6)]}
    done, sizes = run_schedule(gen, schedule)
    assert len(done) == sum(len(v) for v in schedule.values())
    for (_, prompt, n), c in done.items():
        assert c.token_ids == hf_greedy(model, tokenizer, prompt, n), (prompt, n)
        assert c.finish_reason == "length" and c.completion_tokens == n
    assert max(sizes) >= 4  # rows really decoded together


def test_long_running_batch_keeps_its_cache_bounded(model, tokenizer):
    """A row joins every step for 60 steps: old history is cut off, the cache stays the size of what is live."""
    gen = Generator(model, tokenizer, device="cpu", backend="gpt2")
    schedule = {s: [(PROMPTS[s % len(PROMPTS)], 6)] for s in range(60)}
    batch = gen.new_batch()
    widths = []
    key = 0
    for step in range(70):
        new = []
        for prompt, n in schedule.get(step, []):
            p = SamplingParams(max_new_tokens=n, temperature=0)
            new.append(RowInput(key, prompt, gen.check_prompt(prompt, p), p))
            key += 1
        batch.step(new)
        widths.append(batch.dec.capacity[1])
    assert not len(batch)
    assert batch.dec.t > 0 and max(widths) <= 2 * (max(len(gen.encode(p)) for p in PROMPTS) + 6) + 2, widths


class Wrapped(torch.nn.Module):
    """A module type the decoder does not know (like a quantized layer): it can only be called."""

    calls = 0

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        Wrapped.calls += 1
        return self.inner(x)


def linear_of(conv) -> torch.nn.Linear:
    """transformers' Conv1D (y = x W + b, W [in, out]) as the equivalent nn.Linear (W transposed)."""
    n_in, n_out = conv.weight.shape
    lin = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    return lin


def test_decoder_calls_any_module_type_and_matches_transformers(model, tokenizer):
    converted = copy.deepcopy(model)
    tr = converted.transformer
    for block in tr.h:
        block.attn.c_attn, block.attn.c_proj = linear_of(block.attn.c_attn), linear_of(block.attn.c_proj)
        block.mlp.c_fc, block.mlp.c_proj = linear_of(block.mlp.c_fc), linear_of(block.mlp.c_proj)
    tr.wte = Wrapped(tr.wte)
    converted.lm_head = Wrapped(converted.lm_head)
    assert GPT2Decoder.supports(converted)
    gen = Generator(converted, tokenizer, device="cpu", backend="gpt2")
    assert gen.backend == "gpt2" and gen.vocab_size == 50257
    Wrapped.calls = 0
    params = SamplingParams(max_new_tokens=10, temperature=0)
    out = gen.generate(PROMPTS, params)
    assert Wrapped.calls > 0  # the wrapped embedding and head were really called
    for prompt, c in zip(PROMPTS, out):
        assert c.token_ids == hf_greedy(model, tokenizer, prompt, 10), prompt


def test_supports_rejects_other_architectures(model):
    from transformers import GPT2Config, GPT2LMHeadModel

    assert GPT2Decoder.supports(model)
    cross = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=16, vocab_size=100,
                                       add_cross_attention=True))
    assert not GPT2Decoder.supports(cross)
