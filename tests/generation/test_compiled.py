"""The compiled decode step against transformers, the int8 model's own forward and the eager decoder.

    HF_HUB_OFFLINE=1 python -m pytest tests/generation/test_compiled.py -q

Tiny models (2 layers, width 32–64), so each bucket compiles in a few seconds; one compiled step per
model is shared by the tests (a generator keeps its own), as a server shares it between batches.
"""

from __future__ import annotations

import pytest
import torch

from conftest import PROMPTS, run_schedule, spread, tiny_gpt2
from python3_distillation.generation import Generator, GenerationError, RowInput, SamplingParams
from python3_distillation.generation.compiled import (CompiledGPT2Decoder, CompiledStep, bucket,
                                                      env_wants_compile)
from python3_distillation.int8 import quantize_model

EOS = 50256

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return spread(tiny_gpt2(n_layer=2, n_embd=32, n_head=2, n_positions=128))


@pytest.fixture(scope="module")
def gens(model, tokenizer):
    """The eager decoder and the compiled one over the same weights."""
    return {"eager": Generator(model, tokenizer, device="cpu", backend="gpt2", compile=False),
            "compiled": Generator(model, tokenizer, device="cpu", compile=True)}


@pytest.fixture(scope="module")
def int8_gen(tokenizer):
    q = quantize_model(spread(tiny_gpt2(n_layer=2, n_embd=64, n_head=2, n_positions=128)))
    return Generator(q, tokenizer, device="cpu", compile=True)


def hf_greedy(model, tokenizer, prompt: str, n: int) -> list[int]:
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=EOS)
    return out[0, enc.input_ids.shape[1]:].tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)


def test_the_generator_uses_the_compiled_step_only_when_asked(gens, model, tokenizer, monkeypatch):
    assert isinstance(gens["compiled"].new_decoder(), CompiledGPT2Decoder)
    assert not isinstance(gens["eager"].new_decoder(), CompiledGPT2Decoder)
    monkeypatch.delenv("DISTILL_COMPILE", raising=False)
    assert not Generator(model, tokenizer, device="cpu").compile  # the default is unchanged
    monkeypatch.setenv("DISTILL_COMPILE", "1")
    assert Generator(model, tokenizer, device="cpu").compile
    assert not Generator(model, tokenizer, device="cpu", compile=False).compile  # the argument wins
    # A model the step cannot run: the variable falls back to the eager path, the argument is an error.
    assert not Generator(model, tokenizer, device="cpu", backend="hf").compile
    with pytest.raises(GenerationError, match="compile"):
        Generator(model, tokenizer, device="cpu", backend="hf", compile=True)
    assert [env_wants_compile({"DISTILL_COMPILE": v}) for v in ("1", "true", " On ", "0", "", "no")] == \
        [True, True, True, False, False, False]
    assert [bucket(n) for n in (0, 1, 2, 3, 8, 9)] == [1, 1, 2, 4, 8, 16] and bucket(3, 16) == 16


def test_greedy_equals_transformers_generate(gens, model, tokenizer):
    """fp32, a batch of prompts of different lengths (left padded), columns growing past two buckets."""
    gen = gens["compiled"]
    out = gen.generate(PROMPTS, greedy(40))
    for prompt, c in zip(PROMPTS, out):
        assert c.token_ids == hf_greedy(model, tokenizer, prompt, 40), prompt
    # 5 rows (the 8-row bucket) and columns 32, then 64 (the longest prompt, 19 tokens, + 40 steps):
    # one package, compiled once (AOTInductor's rows and columns are dynamic past one row).
    assert set(gen._step.compile_seconds) == {"2+"}, gen._step.compile_seconds


def bf16_ulp(x: torch.Tensor) -> float:
    """The spacing of bfloat16 numbers at |x|'s largest element (8 significant bits)."""
    return 2.0 ** (torch.floor(torch.log2(x.abs().max())).item() - 7)


def test_int8_greedy_equals_the_int8_models_own_forward(int8_gen, tokenizer):
    """Each token is the argmax of the int8 model's own full forward, up to its ties.

    The int8 logits come out of a bfloat16 matmul (int8.py), so two of them are often exactly equal;
    the compiled step's C++ GEMM sums in another order and may round a logit one bfloat16 step the
    other way. So: every logit within two bfloat16 steps of the full forward's, and each chosen token
    the full forward's argmax or tied with it within those two steps.
    """
    q = int8_gen.model
    prompts = ["It is a truth", "Emma"]
    out = int8_gen.generate(prompts, greedy(24))
    exact = 0
    for prompt, completion in zip(prompts, out):
        ids = tokenizer(prompt)["input_ids"]
        dec = int8_gen.new_decoder()
        logits = dec.add(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool), 30)
        for token in completion.token_ids:
            with torch.no_grad():
                want = q(input_ids=torch.tensor([ids])).logits[0, -1]
            tol = 2 * bf16_ulp(want)
            torch.testing.assert_close(logits[0], want, rtol=0, atol=tol)
            assert want[token] >= want.max() - tol, (token, want.argmax().item())
            exact += token == want.argmax().item()
            ids.append(token)
            logits = dec.step(torch.tensor([token]))
        assert len(completion.token_ids) == 24
    assert exact >= 40  # ties are the exception: most tokens are the argmax itself
    assert int8_gen._step.graph.kinds["h0_qkv"] == "int8" and int8_gen._step.graph.kinds["head"] == "int8"


def test_two_models_of_one_shape_keep_their_own_frozen_weights(tokenizer):
    """Frozen weights are compiled in as constants: a second model of the same shape, in the same
    process, must not run the first one's graph (nor find it in the on-disk cache)."""
    from python3_distillation.generation.decoders import GPT2Decoder

    ids = torch.tensor([[464, 3290, 318]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    with torch.inference_mode():
        for seed in (1, 2):  # (not ``spread``: its weights do not depend on the seed)
            q = quantize_model(tiny_gpt2(n_layer=1, n_embd=32, n_head=2, n_positions=32, seed=seed))
            step = CompiledStep(q)
            assert step.options["freezing"]
            a, b = GPT2Decoder(q), CompiledGPT2Decoder(q, None, step)
            a.add(ids, mask, 4), b.add(ids, mask, 4)
            want = a.step(ids[:, -1])
            torch.testing.assert_close(b.step(ids[:, -1]), want, rtol=0, atol=2 * bf16_ulp(want))


def test_a_restart_loads_the_saved_package_and_another_model_compiles_its_own(model, tmp_path, monkeypatch):
    """The package is saved under a digest of the weights: a second step of the same weights loads it
    without compiling; weights that differ in one value get another digest."""
    first = CompiledStep(model, cache_dir=tmp_path)
    first.warm([1])
    assert [p.name for p in tmp_path.iterdir()] == [f"{first.key}-rows1"]

    def no_compile(*args):
        raise AssertionError("compiled again")

    monkeypatch.setattr(CompiledStep, "_compile", no_compile)
    again = CompiledStep(model, cache_dir=tmp_path)
    assert again.key == first.key and set(again.warm([1])) == {1}
    other = spread(tiny_gpt2(n_layer=2, n_embd=32, n_head=2, n_positions=128))
    with torch.no_grad():
        other.transformer.ln_f.bias[0] += 1e-3
    assert CompiledStep(other, cache_dir=tmp_path).key != first.key
    with pytest.raises(ValueError, match="engine"):
        CompiledStep(model, engine="jit")


@pytest.mark.slow  # ~45 s on a busy 2-core machine: rows buckets 1, 2, 4, 8 × columns compile
def test_rows_joining_and_leaving_get_the_tokens_of_decoding_alone(gens, model, tokenizer):
    """Continuous batching: rows join mid-decode (the row bucket grows 1 → 2 → 4 → 8) and leave
    (rows move, the batch shrinks); each row's tokens are those of decoding it alone."""
    gen = gens["compiled"]
    schedule = {0: [(PROMPTS[0], 14)],
                1: [(PROMPTS[1], 10)],  # 11 tokens join a 1-column history: the cache shifts
                3: [(PROMPTS[2], 16), (PROMPTS[3], 3)],
                6: [(PROMPTS[4], 20), (PROMPTS[0], 4), (PROMPTS[3], 9), (PROMPTS[1], 12)],
                12: [(PROMPTS[2], 6)]}
    done, sizes = run_schedule(gen, schedule)
    assert len(done) == sum(len(v) for v in schedule.values())
    for (_, prompt, n), c in done.items():
        alone = gen.generate([prompt], greedy(n))[0].token_ids
        assert c.token_ids == alone == hf_greedy(model, tokenizer, prompt, n), (prompt, n)
    assert max(sizes) >= 5 and 1 in sizes  # rows really decoded together, and the batch shrank


def test_a_long_decode_crosses_column_buckets_exactly(gens, model, tokenizer):
    """One row for 100 steps: the cache is reallocated into ever larger column buckets (16 → 128)."""
    gen = gens["compiled"]
    batch = gen.new_batch()
    p = greedy(100)
    events = batch.step([RowInput(0, PROMPTS[3], gen.check_prompt(PROMPTS[3], p), p)])
    widths = [batch.dec.capacity[1]]
    while len(batch):
        events += batch.step()
        widths.append(batch.dec.capacity[1])
    (c,) = [e.completion for e in events if e.finished]
    assert c.token_ids == hf_greedy(model, tokenizer, PROMPTS[3], 100)
    assert sorted(set(widths)) == [16, 32, 64, 128], sorted(set(widths))


def test_seeded_sampling_is_unchanged(gens):
    """Sampling happens outside the step: the same seeds give the eager decoder's tokens, per row."""
    params = [SamplingParams(max_new_tokens=20, temperature=1.2, top_k=200, top_p=0.95, seed=1234),
              SamplingParams(max_new_tokens=12, seed=7),
              SamplingParams(max_new_tokens=20, temperature=0),
              SamplingParams(max_new_tokens=16, temperature=0.8, repetition_penalty=1.3, seed=99)]
    prompts = PROMPTS[:4]
    eager = gens["eager"].generate(prompts, params)
    compiled = gens["compiled"].generate(prompts, params)
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
    assert len({tuple(c.token_ids) for c in compiled}) == 4


@pytest.mark.parametrize("engine", ["aoti", "dynamo"])
def test_the_step_matches_the_eager_step_logits(gens, model, engine):
    """One decoder against the other, step by step: logits agree to fp32 rounding (order of sums).
    Both engines: AOTInductor (CPU's) and torch.compile (CUDA's, run here on CPU)."""
    from python3_distillation.generation.decoders import GPT2Decoder

    step = gens["compiled"]._step if engine == "aoti" else CompiledStep(model, engine="dynamo")
    assert step.engine == engine
    a, b = GPT2Decoder(model), CompiledGPT2Decoder(model, None, step)
    ids = torch.randint(0, 50257, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, :4] = False  # a left-padded row
    la, lb = a.add(ids, mask, 20), b.add(ids, mask, 20)
    for _ in range(12):
        tok = la.argmax(-1)
        la, lb = a.step(tok), b.step(tok)
        assert lb.shape == la.shape == (3, 50257)
        torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)
    assert b.capacity == (4, 32)  # 3 rows in the 4-row bucket; 7 + 12 columns in 32
