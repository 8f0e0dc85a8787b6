"""The continuous-batching worker on its own: rows joining a running decode, the bounded line, and a row
whose data breaks the model failing alone.

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python -m pytest tests/serving/test_batching.py -q
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from python3_distillation.generation import Generator, RowInput, SamplingParams
from python3_distillation.serving.batching import Batcher, Job, JobFailed, LineFull

from .helpers import Throttle

GREEDY = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)


def job(gen: Generator, *prompts: str, params: SamplingParams = GREEDY, ids: list[int] | None = None) -> Job:
    rows = [RowInput(i, p, ids if ids is not None else gen.check_prompt(p, params), params)
            for i, p in enumerate(prompts)]
    return Job(rows, time.monotonic() + 30)


def texts(j: Job) -> list[str]:
    out = {}
    for row, ev in j.events():
        if ev.finished:
            out[row] = ev.completion.text
    return [out[i] for i in sorted(out)]


@pytest.fixture
def batcher_of():
    made = []

    def make(gen, **kw):
        b = Batcher(gen, "tiny", window_s=0.001, max_wait_s=0.002, **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def test_a_job_joins_while_another_decodes(tiny_dir, batcher_of):
    gen = Generator.from_pretrained(tiny_dir, device="cpu")
    alone = {p: gen.generate([p], GREEDY)[0].text for p in ("It is a truth", "Hello there")}
    Throttle(gen, delay=0.01)
    b = batcher_of(gen)
    first = job(gen, "It is a truth", params=SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True))
    b.submit(first)
    first.wait_started()
    second = job(gen, "Hello there")
    b.submit(second)
    second.wait_started()
    assert second.batch_rows == 2 and first.remaining == 1  # joined while the first one decodes
    assert texts(second) == [alone["Hello there"]]
    assert first.remaining == 1  # still decoding when the second finished
    assert texts(first)[0].startswith(alone["It is a truth"])


def test_the_line_is_bounded(tiny_dir, batcher_of):
    gen = Generator.from_pretrained(tiny_dir, device="cpu")
    throttle = Throttle(gen)
    throttle.gate.clear()  # the model is stuck in its first step
    b = batcher_of(gen, max_rows=1, max_queue=2)
    running = job(gen, "a")
    b.submit(running)
    running.wait_started()
    waiting = [job(gen, "b"), job(gen, "c")]
    for j in waiting:
        b.submit(j)
    with pytest.raises(LineFull, match="limit 2"):
        b.submit(job(gen, "d"))
    b.withdraw(waiting[0])  # its client gave up: the place is free again
    b.submit(job(gen, "e"))
    assert b.queue_depth == 2
    throttle.gate.set()


def test_a_row_that_breaks_the_model_fails_alone(tiny_dir, batcher_of):
    """Token ids past the vocabulary make the prefill raise: that job fails, its neighbour does not."""
    gen = Generator.from_pretrained(tiny_dir, device="cpu")
    alone = gen.generate(["Hello there"], GREEDY)[0].text
    b = Batcher(gen, "tiny", window_s=0.2, max_wait_s=0.4)  # both arrive within the window: one prefill
    try:
        bad, good = job(gen, "bad", ids=[gen.vocab_size + 10]), job(gen, "Hello there")
        b.submit(bad)
        b.submit(good)
        good.wait_started()
        assert texts(good) == [alone]
        with pytest.raises(JobFailed):
            bad.wait_started()
            list(bad.events())
        assert b.alive
    finally:
        b.close()


def test_a_stopped_row_is_a_time_limit_unless_its_client_cancelled():
    stopped, done = SimpleNamespace(finish_reason="cancelled"), SimpleNamespace(finish_reason="length")
    j = Job([RowInput(0, "a", [64], GREEDY)], time.monotonic() + 30)
    assert (j.finish_reason(stopped), j.finish_reason(done)) == ("time_limit", "length")
    j.cancel()
    assert (j.finish_reason(stopped), j.finish_reason(done)) == ("cancelled", "length")
