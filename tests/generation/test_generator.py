"""The decode loop checked against transformers: greedy and penalised greedy token for token, sampling filters.

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python -m pytest tests/generation -q

Models are tiny random GPT-2s (initialised with a wide spread so their greedy text varies instead of
repeating one token) and a scripted LM that emits a fixed token sequence, for exact text checks
(multi-byte characters split across tokens, stop strings across token boundaries).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from python3_distillation.generation import Completion, GenerationError, Generator, SamplingParams, StreamEvent
from python3_distillation.generation.decoders import GPT2Decoder, HFDecoder, cpu_head_t
from python3_distillation.generation.sampling import sample
from python3_distillation.generation.text import RowText, token_byte_table

EOS = 50256
PROMPTS = [
    "It is a truth universally acknowledged, that a single man",
    "Hello",
    "你好, 世界 🙂 — café",
    "The cat sat on the mat. The dog",
]
BACKENDS = ["gpt2", "hf"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, n_positions: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=n_positions, vocab_size=50257,
                     initializer_range=0.2, bos_token_id=EOS, eos_token_id=EOS)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def gens(model, tokenizer) -> dict[str, Generator]:
    return {b: Generator(model, tokenizer, device="cpu", backend=b) for b in BACKENDS}


def hf_greedy(model, tokenizer, prompt: str, n: int, **kw) -> list[int]:
    """transformers' own greedy continuation, cut at EOS."""
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=EOS, **kw)
    ids = out[0, enc.input_ids.shape[1]:].tolist()
    return ids[:ids.index(EOS)] if EOS in ids else ids


GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


# ------------------------------------------------------------------------------- against transformers


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_equals_hf_generate_one_at_a_time(gens, model, tokenizer, backend):
    for prompt in PROMPTS:
        c = gens[backend].generate([prompt], GREEDY)[0]
        ref = hf_greedy(model, tokenizer, prompt, 12)
        assert c.token_ids == ref, prompt
        assert c.text == tokenizer.decode(ref)
        assert c.prompt_tokens == len(tokenizer.encode(prompt))
        assert c.completion_tokens == len(ref)
    assert len({tuple(gens[backend].generate([p], GREEDY)[0].token_ids) for p in PROMPTS}) == len(PROMPTS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_batched_equals_one_at_a_time_and_hf(gens, model, tokenizer, backend):
    gen = gens[backend]
    batched = gen.generate(PROMPTS, GREEDY)
    assert len({len(tokenizer.encode(p)) for p in PROMPTS}) > 2  # really different lengths (left padding)
    for prompt, c in zip(PROMPTS, batched):
        assert c.prompt == prompt
        assert c.token_ids == gen.generate([prompt], GREEDY)[0].token_ids
        assert c.token_ids == hf_greedy(model, tokenizer, prompt, 12)


@pytest.mark.parametrize("penalty", [1.5, 0.7])
@pytest.mark.parametrize("backend", BACKENDS)
def test_repetition_penalty_greedy_equals_hf(gens, model, tokenizer, backend, penalty):
    params = SamplingParams(max_new_tokens=16, temperature=0, repetition_penalty=penalty)
    for prompt in PROMPTS[:2]:
        c = gens[backend].generate([prompt], params)[0]
        assert c.token_ids == hf_greedy(model, tokenizer, prompt, 16, repetition_penalty=penalty)
    # and it changes something, so the check above is not vacuous
    plain = gens[backend].generate(PROMPTS[:2], SamplingParams(max_new_tokens=16, temperature=0))
    assert [c.token_ids for c in plain] != [c.token_ids for c in gens[backend].generate(PROMPTS[:2], params)]


def test_finished_rows_leave_the_batch_without_changing_the_others(gens):
    """Rows with short budgets finish early (and are pruned); the long rows match solo runs."""
    for gen in gens.values():
        params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (2, 14, 1, 14)]
        batched = gen.generate(PROMPTS, params)
        for prompt, p, c in zip(PROMPTS, params, batched):
            assert c.token_ids == gen.generate([prompt], p)[0].token_ids
            assert c.completion_tokens == p.max_new_tokens and c.finish_reason == "length"


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_finishing_near_the_context_end_while_others_go_on(gens, tokenizer, backend):
    """A long prompt that fills the context finishes early; kept in the batch, it must not break the rest."""
    gen = gens[backend]
    long = "word" + " word" * 59  # 60 tokens + 3 new = 63 of the 64 positions
    prompts = [long] + PROMPTS * 2
    params = [SamplingParams(max_new_tokens=3, temperature=0)] + [SamplingParams(max_new_tokens=40, temperature=0)] * 8
    out = gen.generate(prompts, params)
    assert out[0].completion_tokens == 3
    for prompt, p, c in list(zip(prompts, params, out))[1:4]:
        assert c.token_ids == gen.generate([prompt], p)[0].token_ids


def test_gpt2_decoder_logits_equal_the_hf_forward(tokenizer):
    """Prefill and decode-step logits of the written-out forward vs GPT2LMHeadModel's, row by row."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=64, n_head=4, n_positions=64, vocab_size=50257)).eval()
    rows = [tokenizer.encode(p) for p in PROMPTS]
    for batch in (rows[:1], rows):  # 1 row (transposed-head path) and several (gemm path, left padding)
        width = max(map(len, batch))
        ids = torch.tensor([[EOS] * (width - len(r)) + r for r in batch])
        mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in batch])
        dec = GPT2Decoder(model, cpu_head_t(model))
        logits = dec.add(ids, mask, 3)
        nxt = [1000 + 7 * i for i in range(len(batch))]
        stepped = dec.step(torch.tensor(nxt))
        with torch.no_grad():
            for j, r in enumerate(batch):
                ref = model(torch.tensor([r + [nxt[j]]])).logits[0]
                torch.testing.assert_close(logits[j], ref[-2], atol=2e-5, rtol=1e-4)
                torch.testing.assert_close(stepped[j], ref[-1], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("decoder", [GPT2Decoder, HFDecoder])
def test_finished_rows_stop_costing_compute(gens, monkeypatch, decoder):
    sizes: list[int] = []
    step = decoder.step
    monkeypatch.setattr(decoder, "step", lambda self, tokens: (sizes.append(len(tokens)), step(self, tokens))[1])
    gen = gens["gpt2" if decoder is GPT2Decoder else "hf"]
    gen.generate(PROMPTS, [SamplingParams(max_new_tokens=n, temperature=0) for n in (1, 12, 2, 12)])
    assert sizes[0] == 3 and set(sizes) == {3, 2} and len(sizes) == 11


def test_bf16_runs_and_mostly_agrees(model, tokenizer):
    gen = Generator(tiny_model(), tokenizer, device="cpu")
    gen.model.to(torch.bfloat16)
    c = gen.generate([PROMPTS[0]], GREEDY)[0]
    assert c.completion_tokens == 12 and c.finish_reason == "length"
    ref = hf_greedy(gen.model, tokenizer, PROMPTS[0], 12)
    assert c.token_ids[:3] == ref[:3]


# ----------------------------------------------------------------------------------------- sampling


def test_top_k_1_and_tiny_top_p_equal_greedy(gens):
    gen = gens["gpt2"]
    greedy = [c.token_ids for c in gen.generate(PROMPTS, GREEDY)]
    for params in (SamplingParams(max_new_tokens=12, top_k=1, seed=3),
                   SamplingParams(max_new_tokens=12, top_p=1e-6, seed=3, temperature=1.5)):
        assert [c.token_ids for c in gen.generate(PROMPTS, params)] == greedy


def test_same_seed_same_sample_in_any_batch_position(gens):
    gen = gens["gpt2"]
    mine = SamplingParams(max_new_tokens=16, temperature=1.2, top_k=200, top_p=0.95, seed=1234)
    alone = gen.generate([PROMPTS[0]], mine)[0].text
    others = [SamplingParams(max_new_tokens=5, seed=7), SamplingParams(max_new_tokens=16, temperature=0),
              SamplingParams(max_new_tokens=9)]
    for pos in range(4):
        prompts = PROMPTS[1:].copy()
        params = others.copy()
        prompts.insert(pos, PROMPTS[0])
        params.insert(pos, mine)
        assert gen.generate(prompts, params)[pos].text == alone
    assert gens["hf"].generate([PROMPTS[0]], mine)[0].text == alone  # seeds mean the same on either path


def test_unseeded_rows_differ_and_seeds_matter(gens):
    gen = gens["gpt2"]
    hot = dict(max_new_tokens=16, temperature=2.0)
    assert gen.generate(["x"], SamplingParams(**hot))[0].text != gen.generate(["x"], SamplingParams(**hot))[0].text
    assert (gen.generate(["x"], SamplingParams(**hot, seed=1))[0].text
            != gen.generate(["x"], SamplingParams(**hot, seed=2))[0].text)


def test_sampling_filters_keep_exactly_transformers_support():
    """top-k / top-p candidates equal those TopKLogitsWarper / TopPLogitsWarper leave finite."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    vocab, draws = 50, 4000
    logits = torch.randn(1, vocab) * 2
    u = torch.rand(draws, 1)
    for k, p in [(5, 1.0), (0, 0.6), (10, 0.5), (1, 1.0), (0, 0.999)]:
        ref = logits.clone()
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        support = set(torch.isfinite(ref[0]).nonzero().flatten().tolist())
        x = logits.expand(draws, vocab)
        got = sample(x, [k] * draws, torch.full((draws, 1), p), [k == 0 and p >= 1] * draws, u)
        probs = torch.softmax(ref[0], -1)
        assert set(got.tolist()) <= support, (k, p)
        assert {i for i in support if probs[i] > 0.003} <= set(got.tolist()), (k, p)
        # frequencies follow the renormalised probabilities
        freq = torch.bincount(got, minlength=vocab).float() / draws
        assert (freq - probs).abs().max() < 0.04, (k, p)


def test_plain_sampling_follows_the_softmax():
    torch.manual_seed(1)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    draws = 20000
    got = sample(logits.expand(draws, 5), [0] * draws, torch.ones(draws, 1), [True] * draws, torch.rand(draws, 1))
    freq = torch.bincount(got, minlength=5).float() / draws
    assert (freq - torch.softmax(logits[0], -1)).abs().max() < 0.015
    assert freq[4] == 0


# ------------------------------------------------------------------------------ text, stops, streams


class ScriptedLM(torch.nn.Module):
    """A causal LM that emits ``script`` (one token per step, whatever the input), HF forward style."""

    def __init__(self, script: list[int], n_positions: int = 64):
        from transformers import GPT2Config

        super().__init__()
        self.config = GPT2Config(n_positions=n_positions, vocab_size=50257)
        self.out = torch.nn.Embedding(50257, 1)
        self.script = script

    def get_output_embeddings(self):
        return self.out

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, cache=None, **kw):
        step = 0 if cache is None else cache + 1
        logits = torch.full((*input_ids.shape, 50257), -1e4)
        logits[..., self.script[min(step, len(self.script) - 1)]] = 0.0
        return SimpleNamespace(logits=logits, cache=step)


def scripted(tokenizer, text: str, eos: bool = True) -> Generator:
    ids = tokenizer.encode(text) + ([EOS] if eos else [])
    return Generator(ScriptedLM(ids), tokenizer, device="cpu")


MULTIBYTE = " 你好, 世界 🙂🎉 café — naïve 😀"


def test_multibyte_text_streams_whole_characters(tokenizer):
    ids = tokenizer.encode(MULTIBYTE)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)  # the script really splits characters across tokens
    gen = scripted(tokenizer, MULTIBYTE)
    params = SamplingParams(max_new_tokens=40, temperature=0)
    streamed = list(gen.stream("hi", params))
    assert all("\ufffd" not in s for s in streamed)
    assert "".join(streamed) == MULTIBYTE
    c = gen.generate(["hi"], params)[0]
    assert c.text == MULTIBYTE and c.finish_reason == "stop" and c.completion_tokens == len(ids)


def test_dangling_partial_character_at_the_end_is_decoded_like_transformers(tokenizer):
    ids = tokenizer.encode(" 你好")
    cut = ids[:-1]  # ends in the middle of 好
    gen = Generator(ScriptedLM(cut), tokenizer, device="cpu")
    c = gen.generate(["x"], SamplingParams(max_new_tokens=len(cut), temperature=0))[0]
    assert c.text == tokenizer.decode(cut) and c.finish_reason == "length"


@pytest.mark.parametrize("stop,expected", [
    (["o wor"], " hell"),                 # spans the " hello" / " world" tokens
    (["world", "ll"], " he"),             # the earliest of several
    ([", the"], " hello world"),
    (["zzz"], " hello world, the end"),   # never found: EOS ends it
    (["end"], " hello world, the "),      # the last token
])
def test_stop_strings_cut_and_never_leak(tokenizer, stop, expected):
    gen = scripted(tokenizer, " hello world, the end")
    params = SamplingParams(max_new_tokens=20, temperature=0, stop=stop)
    events = list(gen.stream_batch(["x"], params))
    streamed = "".join(e.text for e in events)
    c = events[-1].completion
    assert c.text == streamed == expected and c.finish_reason == "stop"
    assert not any(s in c.text for s in stop)
    assert [e.finished for e in events] == [False] * (len(events) - 1) + [True]


def test_held_back_stop_prefix_is_released_when_it_turns_out_not_to_be_one():
    rt = RowText(["bcd"])
    assert rt.add(b"ab") == "a"          # "b" could start "bcd"
    assert rt.add(b"c") == ""            # "bc" still could
    assert rt.add(b"x") == "bcx"         # it was not
    assert rt.add(b"bc") == ""
    assert rt.finish() == "bc"           # the row ended: nothing held back any more
    assert rt.text == "abcxbc"


def test_stop_string_on_real_model_text(gens, tokenizer):
    gen = gens["gpt2"]
    full = gen.generate([PROMPTS[0]], SamplingParams(max_new_tokens=20, temperature=0))[0]
    i = len(full.text) // 2
    stop = full.text[i:i + 4]
    assert stop.strip()
    c = gen.generate([PROMPTS[0]], SamplingParams(max_new_tokens=20, temperature=0, stop=[stop]))[0]
    assert c.text == full.text[:full.text.index(stop)] and c.finish_reason == "stop"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_stream_concatenates_to_generate(gens, prompt):
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=5)
    for gen in gens.values():
        assert "".join(gen.stream(prompt, params)) == gen.generate([prompt], params)[0].text


def test_stream_batch_events_per_row(gens):
    gen = gens["gpt2"]
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (3, 8)]
    events = list(gen.stream_batch(PROMPTS[:2], params))
    assert all(isinstance(e, StreamEvent) for e in events)
    done = {e.row: e.completion for e in events if e.finished}
    assert set(done) == {0, 1} and all(isinstance(c, Completion) for c in done.values())
    for row in (0, 1):
        assert "".join(e.text for e in events if e.row == row) == done[row].text
        assert [e.finished for e in events if e.row == row][-1] is True
        assert sum(e.finished for e in events if e.row == row) == 1
    assert next(i for i, e in enumerate(events) if e.finished and e.row == 0) < len(events) - 1


def test_byte_table_matches_the_tokenizer(tokenizer):
    table = token_byte_table(tokenizer, 50257)
    for ids in (tokenizer.encode(MULTIBYTE), tokenizer.encode("Hello, world!\n\tSpaces  and  tabs"), [EOS]):
        assert b"".join(table[i] for i in ids).decode("utf-8", errors="replace") == tokenizer.decode(ids)


def test_eos_finishes_with_stop(tokenizer):
    c = scripted(tokenizer, " the end").generate(["x"], SamplingParams(max_new_tokens=10, temperature=0))[0]
    assert c.text == " the end" and c.finish_reason == "stop" and c.completion_tokens == 2


# --------------------------------------------------------------------------------------- cancellation


def test_cancelled_row_stops_the_others_go_on(gens):
    gen = gens["gpt2"]
    steps = {"n": 0}

    def cancelled(row: int) -> bool:
        steps["n"] += row == 1
        return row == 1 and steps["n"] > 3

    params = SamplingParams(max_new_tokens=15, temperature=0)
    events = list(gen.stream_batch(PROMPTS[:3], params, cancelled=cancelled))
    done = {e.row: e.completion for e in events if e.finished}
    assert done[1].finish_reason == "cancelled" and done[1].completion_tokens < 6
    assert "".join(e.text for e in events if e.row == 1) == done[1].text
    assert all(done[r].finish_reason == "length" and done[r].completion_tokens == 15 for r in (0, 2))
    assert done[0].token_ids == gen.generate([PROMPTS[0]], params)[0].token_ids
    # cancelled before anything ran
    c = list(gen.stream_batch(["a"], params, cancelled=lambda r: True))
    assert len(c) == 1 and c[0].completion.finish_reason == "cancelled" and c[0].completion.completion_tokens == 0


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", 0), ("max_new_tokens", 1.5), ("max_new_tokens", True), ("max_new_tokens", "8"),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "hot"), ("temperature", False),
    ("top_k", -1), ("top_k", 2.0), ("top_p", 0), ("top_p", 1.01), ("top_p", None),
    ("repetition_penalty", 0), ("repetition_penalty", -1.0), ("stop", "x"), ("stop", [""]), ("stop", [3]),
    ("seed", -1), ("seed", 1.0), ("seed", True),
])
def test_invalid_params_raise(field, value):
    with pytest.raises(GenerationError, match=field.split("_")[0]) as err:
        SamplingParams(**{field: value})
    assert "\n" not in str(err.value)


def test_from_dict():
    p = SamplingParams.from_dict({"temperature": 0, "stop": "\n", "max_new_tokens": 3, "seed": None})
    assert p == SamplingParams(max_new_tokens=3, temperature=0.0, stop=["\n"])
    with pytest.raises(GenerationError, match="unknown sampling parameter.*temprature"):
        SamplingParams.from_dict({"temprature": 1})
    with pytest.raises(GenerationError, match="top_p"):
        SamplingParams.from_dict({"top_p": 2})
    with pytest.raises(GenerationError):
        SamplingParams.from_dict(["temperature"])  # type: ignore[arg-type]


def test_prompt_checks(gens, caplog):
    gen = gens["gpt2"]
    p = SamplingParams(max_new_tokens=10)
    for empty in ("", "   \n"):
        with pytest.raises(GenerationError, match="prompt is empty"):
            gen.check_prompt(empty, p)
    long = "word" + " word" * 79  # 80 tokens > 64 context
    with pytest.raises(GenerationError, match=r"prompt is 80 tokens.*max_new_tokens 10.*90.*context of 64"):
        gen.check_prompt(long, p)
    with pytest.raises(GenerationError):
        gen.generate(["ok", long], p)  # the whole call is refused before any decoding
    with caplog.at_level(logging.WARNING, logger="python3_distillation.generation.generator"):
        ids = gen.check_prompt(long, p, truncate=True)
    assert ids == gen.tokenizer.encode(long)[-54:] and "keeping its last 54" in caplog.text
    c = gen.generate([long], p, truncate=True)[0]
    assert c.prompt_tokens == 54 and c.completion_tokens == 10
    with pytest.raises(GenerationError, match="no room"):
        gen.check_prompt("hi", SamplingParams(max_new_tokens=64))
    with pytest.raises(GenerationError, match="2 prompts but 1"):
        gen.generate(["a", "b"], [p])
    with pytest.raises(GenerationError, match="list of strings"):
        gen.generate("ab", p)  # type: ignore[arg-type]


def test_from_pretrained(tmp_path, model, tokenizer):
    with pytest.raises(GenerationError, match="does not exist"):
        Generator.from_pretrained(tmp_path / "nope")
    with pytest.raises(GenerationError, match="no config.json"):
        Generator.from_pretrained(tmp_path)
    with pytest.raises(GenerationError, match="cannot use device 'nodevice'"):
        model.save_pretrained(tmp_path / "m")
        Generator.from_pretrained(tmp_path / "m", device="nodevice")
    with pytest.raises(GenerationError, match="dtype"):
        model.save_pretrained(tmp_path / "m")
        Generator.from_pretrained(tmp_path / "m", dtype="float8")
    tokenizer.save_pretrained(tmp_path / "m")
    gen = Generator.from_pretrained(tmp_path / "m", device="cpu", dtype="bfloat16")
    assert gen.name == "m" and gen.context_length == 64 and gen.device.type == "cpu"
    assert gen.model.dtype == torch.bfloat16 and gen.backend == "gpt2"
    # tied embeddings are counted once
    assert gen.n_params == sum(p.numel() for p in model.parameters())
    assert gen.n_params < 2 * 50257 * 32 and len(gen.encode("Hello world")) == 2
    assert gen.generate(["Hello"], SamplingParams(max_new_tokens=3, seed=0))[0].completion_tokens == 3


def test_complete_rows_decodes_token_ids_as_given(gens, tokenizer):
    """The on-policy and augmentation loop: token-id prompts decoded in one batch, keyed as given."""
    from python3_distillation.generation import RowInput, complete_rows

    gen = gens["gpt2"]
    prompts = ["It is a truth", "Emma Woodhouse, handsome"]
    rows = [RowInput(f"row{i}", "", tokenizer.encode(p), GREEDY) for i, p in enumerate(prompts)]
    done = complete_rows(gen, rows)
    assert sorted(done) == ["row0", "row1"]
    for i, p in enumerate(prompts):
        assert done[f"row{i}"].token_ids == gen.generate([p], GREEDY)[0].token_ids
    bad = RowInput("bad", "", [10 ** 9], GREEDY)  # an id past the vocabulary: its prefill fails, and so the call
    with pytest.raises(IndexError, match="index out of range"):
        complete_rows(gen, [bad])
