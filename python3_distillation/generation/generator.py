"""A model and its tokenizer, completing prompts in batched decodes that rows join and leave.

    HF_HUB_OFFLINE=1 python -c "from python3_distillation.generation import Generator, SamplingParams as P; \
g = Generator.from_pretrained('python3_distillation/gpt2_student_v2'); print(g.generate(['It is'], P(seed=1))[0].text)"

Continuous batching: README.md, "Serving"; how a step runs and fails: docs/design/generation.md.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from python3_distillation.device_plan import pick_device, resolve_dtype
from python3_distillation.generation.compiled import ENV, CompiledGPT2Decoder, CompiledStep, bucket, env_wants_compile
from python3_distillation.generation.decoders import GPT2Decoder, HFDecoder, cpu_head_t
from python3_distillation.generation.sampling import GenerationError, Knobs, SamplingParams, choose, new_rng
from python3_distillation.generation.text import RowText, token_byte_table
from python3_distillation.int8 import is_int8_dir
from python3_distillation.models import open_model

log = logging.getLogger(__name__)

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"


@dataclass
class Completion:
    """One finished row. ``finish_reason``: ``stop`` (stop string or EOS), ``length`` or ``cancelled``."""

    prompt: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    seconds: float
    # The generated ids (EOS excluded); ``completion_tokens == len(token_ids)``.
    token_ids: list[int] = field(default_factory=list, repr=False)


@dataclass
class StreamEvent:
    """New text of the row keyed ``row`` (its index for ``stream_batch``); its last event has ``finished=True``.

    ``completion`` is set on that event, or, for a row that failed, ``None`` with the exception in ``error``.
    """

    row: Any
    text: str
    finished: bool
    completion: Completion | None = None
    error: BaseException | None = None


@dataclass
class RowInput:
    """A row to decode: the caller's key, the prompt, its token ids (checked) and its sampling settings."""

    key: Any
    prompt: str
    ids: list[int]
    params: SamplingParams


@dataclass(eq=False)
class _Row(RowInput):
    text: RowText
    rng: torch.Generator | None
    started: float
    token_ids: list[int] = field(default_factory=list)
    done: bool = False


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class Generator:
    """A causal LM and its tokenizer, ready to complete prompts (one at a time, batched, or streamed)."""

    def __init__(self, model, tokenizer, device: str | torch.device | None = None, name: str | None = None,
                 *, backend: str = "auto", meta: dict | None = None, compile: bool | None = None):
        if device is not None:
            model = model.to(torch.device(device))
        self.model = model.eval()
        self.tokenizer = tokenizer
        # Fast tokenizers must not be used by two threads at once; request threads tokenize under this.
        self._tokenizer_lock = threading.Lock()
        params = list(model.parameters())
        self.device = params[0].device
        cfg = model.config
        self.name = name or Path(str(getattr(cfg, "name_or_path", "") or "")).name or type(model).__name__
        # parameters() yields a tied tensor once, so tied embeddings are counted once.
        self.n_params = sum(p.numel() for p in params)
        self.context_length = int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings"))
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(cfg, "eos_token_id", None)
        self.eos_token_id, self.pad_token_id = eos, eos if eos is not None else 0
        if backend not in {"auto", "gpt2", "hf"}:
            raise GenerationError(f"unknown backend {backend!r}; expected auto, gpt2 or hf")
        if backend == "gpt2" and not GPT2Decoder.supports(model):
            raise GenerationError(f"backend 'gpt2' needs a plain GPT2LMHeadModel, got {type(model).__name__}")
        self.backend = "gpt2" if backend in {"auto", "gpt2"} and GPT2Decoder.supports(model) else "hf"
        weight = getattr(model.get_output_embeddings(), "weight", None)
        self.vocab_size = int(weight.shape[0]) if isinstance(weight, torch.Tensor) else int(cfg.vocab_size)
        self.meta = meta or {}
        # What the weights are stored in: the quantization scheme of the folder's lineage, else the dtype.
        scheme = (self.meta.get("quantization") or {}).get("scheme")
        self.precision = str(scheme) if scheme else DTYPE_NAMES.get(params[0].dtype, str(params[0].dtype))
        self._step = self._compiled_step(compile)
        self.compile = self._step is not None

    def _compiled_step(self, wanted: bool | None):
        """The opt-in compiled decode step (generation/compiled.py): ``compile``, else ``DISTILL_COMPILE``."""
        if not (env_wants_compile() if wanted is None else wanted):
            return None
        if self.backend != "gpt2" or not CompiledStep.supports(self.model):
            if wanted:
                raise GenerationError("compile=True needs a GPT2LMHeadModel of float or int8 modules "
                                      f"on the 'gpt2' backend; this is {type(self.model).__name__} on '{self.backend}'")
            log.warning("%s ignored: the compiled step cannot run this model; decoding eagerly", ENV)
            return None
        return CompiledStep(self.model, self.head_t)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, compile: bool | None = None) -> Generator:
        """A saved model folder (``models.open_model``) on ``device``, else ``pick_device``'s.

        ``dtype`` None/``auto`` keeps the weights as saved (an int8 folder runs its int8 layers); a dtype
        given for an int8 folder dequantizes it at load (what the server does on CUDA: device_plan.serving_dtype).
        """
        path = Path(model_dir).expanduser()
        if not path.is_dir():
            raise GenerationError(f"model folder {path} does not exist")
        if not (path / "config.json").is_file():
            raise GenerationError(f"{path} is not a saved model folder (no config.json)")
        torch_dtype = resolve_dtype(dtype)
        try:
            model, tokenizer, meta = open_model(path, dtype=torch_dtype)
        except Exception as e:  # corrupt weights, unknown architecture…: one line for the user
            raise GenerationError(f"cannot load the model in {path}: {str(e).strip().splitlines()[0]}") from e
        try:
            gen = cls(model, tokenizer, device=pick_device(device), name=path.name, meta=meta, compile=compile)
        except (RuntimeError, AssertionError) as e:  # "cuda" without CUDA, a malformed device string
            raise GenerationError(f"cannot use device {device!r}: {str(e).strip().splitlines()[0]}") from e
        if is_int8_dir(path) and torch_dtype is not None:
            gen.precision = f"{DTYPE_NAMES.get(torch_dtype, str(torch_dtype))} (int8 dequantized at load)"
        return gen

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; safe to call from several threads."""
        with self._tokenizer_lock:
            return self.tokenizer.encode(text)

    def check_prompt(self, prompt: str, params: SamplingParams, truncate: bool = False) -> list[int]:
        """Token ids of ``prompt``; errors for bad settings, empty or too-long prompts (``truncate``: keep the end)."""
        if not isinstance(prompt, str):
            raise GenerationError(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise GenerationError("prompt is empty")
        if params.top_k > self.vocab_size:
            raise GenerationError(f"top_k must be at most the vocabulary size {self.vocab_size}, got {params.top_k}")
        room = self.context_length - params.max_new_tokens
        if room < 1:
            raise GenerationError(f"max_new_tokens is {params.max_new_tokens} but the model's context is "
                                  f"{self.context_length} tokens, which leaves no room for a prompt")
        try:
            ids = self.encode(prompt)
        except Exception as e:  # e.g. a lone surrogate, which the fast tokenizer refuses
            raise GenerationError(f"prompt cannot be tokenized: {type(e).__name__}: {str(e)[:200]}") from None
        if len(ids) > room:
            if not truncate:
                raise GenerationError(f"prompt is {len(ids)} tokens; with max_new_tokens {params.max_new_tokens} "
                                      f"that is {len(ids) + params.max_new_tokens}, more than the model's context "
                                      f"of {self.context_length} tokens")
            log.warning("prompt is %d tokens; keeping its last %d so that %d new tokens fit the context of %d",
                        len(ids), room, params.max_new_tokens, self.context_length)
            ids = ids[-room:]
        return ids

    def generate(self, prompts: Sequence[str], params: SamplingParams | Sequence[SamplingParams],
                 truncate: bool = False) -> list[Completion]:
        """Complete every prompt in one batched decode; results in prompt order."""
        return [c for _, c in sorted(_finished(self.stream_batch(prompts, params, truncate=truncate)).items())]

    def stream(self, prompt: str, params: SamplingParams, truncate: bool = False) -> Iterator[str]:
        """Text pieces of one completion as they are produced (they concatenate to its ``text``)."""
        return (ev.text for ev in self.stream_batch([prompt], params, truncate=truncate) if ev.text)

    def stream_batch(self, prompts: Sequence[str], params: SamplingParams | Sequence[SamplingParams],
                     truncate: bool = False, cancelled: Callable[[int], bool] | None = None) -> Iterator[StreamEvent]:
        """One batched decode with per-row params, yielding each row's new text as it is produced.

        Inputs are checked before the first event, so a bad prompt raises at the call; ``cancelled(row)`` is
        asked before every forward (``DecodeBatch.step``'s ``stop``).
        """
        if isinstance(prompts, str):
            raise GenerationError("prompts must be a list of strings, not one string")
        prompts = list(prompts)
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise GenerationError(f"{len(prompts)} prompts but {len(plist)} sampling parameter sets")
        if bad := [p for p in plist if not isinstance(p, SamplingParams)]:
            raise GenerationError(f"expected SamplingParams, got {type(bad[0]).__name__}")
        rows = [RowInput(i, p, self.check_prompt(p, q, truncate), q) for i, (p, q) in enumerate(zip(prompts, plist))]
        return self._run(rows, cancelled)

    def _run(self, rows: list[RowInput], cancelled: Callable[[int], bool] | None) -> Iterator[StreamEvent]:
        batch = self.new_batch()
        new: Sequence[RowInput] = rows
        while new or batch:
            for ev in batch.step(new, cancelled):
                if ev.error is not None:
                    raise ev.error
                yield ev
            new = ()

    def new_batch(self) -> DecodeBatch:
        """An empty batched decode of this model (the server keeps one running)."""
        return DecodeBatch(self)

    @cached_property
    def token_bytes(self) -> list[bytes]:  # built on first use: ~0.2 s for GPT-2's 50257 tokens
        return token_byte_table(self.tokenizer, self.vocab_size)

    @cached_property
    def head_t(self) -> torch.Tensor | None:
        return cpu_head_t(self.model)

    def use_compiled_step(self, max_rows: int) -> float:
        """Switch to the compiled decode step, compiled (or loaded) for 1 … ``max_rows`` rows now; seconds taken.

        Raises GenerationError where the model has no compiled form, and what compiling raised; it then stays eager.
        """
        if self._step is None:
            self._step = self._compiled_step(True)
        t0 = time.perf_counter()
        try:
            self._step.warm([1 << i for i in range(bucket(max_rows).bit_length())])
        except Exception:
            self._step, self.compile = None, False
            raise
        self.compile = True
        return time.perf_counter() - t0

    def new_decoder(self):
        if self.backend != "gpt2":
            return HFDecoder(self.model, self.context_length)
        if self._step is not None:
            return CompiledGPT2Decoder(self.model, self.head_t, self._step)
        return GPT2Decoder(self.model, self.head_t)


def complete_rows(generator: Generator, rows: Sequence[RowInput]) -> dict[Any, Completion]:
    """Decode ``rows`` in one batch from their token ids (not re-tokenized): {row key: Completion}; failures raise."""
    return _finished(generator._run(list(rows), None))


def _finished(events: Iterator[StreamEvent]) -> dict[Any, Completion]:
    return {ev.row: ev.completion for ev in events if ev.finished}


class DecodeBatch:
    """Rows decoding together: they join at any step and leave when finished.

    ``step(new, stop)`` → one step's events; ``stop(key)``, asked for every row first, finishes it ``cancelled``.
    """

    # Drop finished rows from the cache once this share of the batch is finished (each drop copies).
    PRUNE_SHARE = 0.25

    def __init__(self, generator: Generator):
        self.gen = generator
        self.dec = generator.new_decoder()
        self.rows: list[_Row] = []  # in the decoder's row order; finished rows stay until pruned
        self.tokens: list[int] = []  # each row's newest token: the next forward's input
        self.knobs: Knobs | None = None
        self.seen: torch.Tensor | None = None  # [n, vocab] tokens seen, when a row has a repetition penalty
        self.can_prune = True

    def __len__(self) -> int:
        return sum(not r.done for r in self.rows)

    @property
    def accepts_rows(self) -> bool:
        """Whether rows can join now (always for GPT-2; for other models only when the batch is empty)."""
        return not self.rows or getattr(self.dec, "can_add", True)

    @property
    def rows_in_use(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def step(self, new: Sequence[RowInput] = (), stop: Callable[[Any], bool] | None = None) -> list[StreamEvent]:
        stop = stop or (lambda key: False)
        events = [self._finish(r, FINISH_CANCELLED) for r in self.rows if not r.done and stop(r.key)]
        stopped = [stop(inp.key) for inp in new]
        events += [self._finish(self._row(inp), FINISH_CANCELLED) for inp, s in zip(new, stopped) if s]
        joining = [inp for inp, s in zip(new, stopped) if not s]
        self._prune(force=bool(joining))
        logits = []
        if self.rows:
            try:
                logits.append(self.dec.step(torch.tensor(self.tokens, dtype=torch.long).to(self.gen.device)))
            except Exception as e:  # not any one row's doing: every row fails
                log.exception("decode step failed")
                events += [StreamEvent(r.key, "", True, error=e) for r in self.rows if not r.done]
                self._reset()
        if joining and (joined := self._join(joining, events)) is not None:
            logits.append(joined)
        if not self.rows:
            return events
        events += self._advance(torch.cat(logits) if len(logits) > 1 else logits[0])
        if all(r.done for r in self.rows):
            self._reset()
        return events

    def _row(self, inp: RowInput) -> _Row:
        return _Row(inp.key, inp.prompt, list(inp.ids), inp.params, RowText(inp.params.stop), new_rng(inp.params),
                    time.perf_counter())

    def _join(self, inputs: list[RowInput], events: list[StreamEvent]) -> torch.Tensor | None:
        """Prefill ``inputs`` into the batch; a group that fails is retried row by row, failing only culprits."""
        rows = [self._row(inp) for inp in inputs]
        room = max(r.params.max_new_tokens - len(r.token_ids) for r in rows + self.rows if not r.done)
        if len(rows) > 1:
            with contextlib.suppress(Exception):  # retried row by row below
                return self._prefill(rows, room)
        logits = [x for x in self._alone(rows, lambda j, r: self._prefill([r], room), events, "join") if x is not None]
        return torch.cat(logits) if logits else None

    def _alone(self, rows: list[_Row], fn: Callable[[int, _Row], Any], events: list[StreamEvent], what: str) -> list:
        """``fn(j, row)`` of each row alone, after the batch's call failed: only the rows at fault fail (None)."""
        out = [None] * len(rows)
        for j, r in enumerate(rows):
            try:
                out[j] = None if r.done else fn(j, r)
            except Exception as e:
                self._fail(r, e, events, what)
        return out

    def _fail(self, row: _Row, e: Exception, events: list[StreamEvent], what: str) -> None:
        log.warning("row %r failed to %s: %r", row.key, what, e)
        row.done = True
        events.append(StreamEvent(row.key, "", True, error=e))

    def _prefill(self, rows: list[_Row], room: int) -> torch.Tensor:
        width = max(len(r.ids) for r in rows)
        pads = [width - len(r.ids) for r in rows]  # LEFT padded
        ids = torch.tensor([[self.gen.pad_token_id] * p + r.ids for p, r in zip(pads, rows)], dtype=torch.long)
        mask = torch.tensor([[False] * p + [True] * len(r.ids) for p, r in zip(pads, rows)], dtype=torch.bool)
        logits = self.dec.add(ids.to(self.gen.device), mask.to(self.gen.device), room)
        self.rows += rows
        self.tokens += [self.gen.pad_token_id] * len(rows)  # replaced by their first token below
        self.knobs = None
        if self.seen is not None or any(r.params.repetition_penalty != 1 for r in self.rows):
            # Which tokens each row has seen (prompt and output), for the repetition penalty.
            fresh = rows if self.seen is not None else self.rows
            seen = torch.zeros(len(fresh), self.gen.vocab_size, dtype=torch.bool, device=self.gen.device)
            for j, r in enumerate(fresh):
                ids = [i for i in r.ids + r.token_ids if 0 <= i < self.gen.vocab_size]
                seen[j, torch.tensor(ids, dtype=torch.long, device=seen.device)] = True
            self.seen = seen if self.seen is None else torch.cat([self.seen, seen])
        return logits

    def _advance(self, logits: torch.Tensor) -> list[StreamEvent]:
        """Pick every row's next token from ``logits`` [n, V] and turn it into events."""
        if self.knobs is None:
            self.knobs = Knobs.build([r.params for r in self.rows], self.gen.device)
        events: list[StreamEvent] = []
        try:
            tokens = choose(logits, self.knobs, self.seen, [r.rng for r in self.rows])
        except Exception:  # sample each row alone: only the row at fault fails
            def one(j: int, r: _Row) -> int:
                seen = self.seen[j:j + 1] if self.seen is not None else None
                return choose(logits[j:j + 1], Knobs.build([r.params], self.gen.device), seen, [r.rng])[0]

            tokens = [-1 if t is None else t for t in self._alone(self.rows, one, events, "sample")]
        table, eos = self.gen.token_bytes, self.gen.eos_token_id
        for r, tok in zip(self.rows, tokens):
            if r.done:
                continue
            try:
                if tok == eos and not r.params.ignore_eos:
                    events.append(self._finish(r, FINISH_STOP))
                    continue
                r.token_ids.append(tok)
                delta = r.text.add(table[tok])
                if r.text.stopped:
                    events.append(self._finish(r, FINISH_STOP, delta))
                elif len(r.token_ids) >= r.params.max_new_tokens:
                    events.append(self._finish(r, FINISH_LENGTH, delta))
                elif delta:
                    events.append(StreamEvent(r.key, delta, False))
            except Exception as e:  # this row's text handling: it fails alone
                self._fail(r, e, events, "decode")
        live = [j for j, r in enumerate(self.rows) if not r.done]
        if self.seen is not None and live:
            idx = torch.tensor(live, device=self.seen.device)
            t = torch.tensor([tokens[j] for j in live], device=self.seen.device).clamp(0, self.gen.vocab_size - 1)
            self.seen[idx, t] = True
        self.tokens = [t if t >= 0 else self.gen.pad_token_id for t in tokens]
        return events

    def _finish(self, row: _Row, reason: str, delta: str = "") -> StreamEvent:
        row.done = True
        delta += row.text.finish()
        c = Completion(prompt=row.prompt, text=row.text.text, prompt_tokens=len(row.ids),
                       completion_tokens=len(row.token_ids), finish_reason=reason,
                       seconds=time.perf_counter() - row.started, token_ids=row.token_ids)
        return StreamEvent(row.key, delta, True, c)

    def _prune(self, force: bool) -> None:
        """Drop finished rows when enough have finished, or when rows join (the batch changes anyway)."""
        done = [j for j, r in enumerate(self.rows) if r.done]
        if done and len(done) == len(self.rows):
            self._reset()
            return
        if not done or not self.can_prune or not (force or len(done) >= max(1, self.PRUNE_SHARE * len(self.rows))):
            return
        if (order := self.dec.remove(done)) is None:
            self.can_prune = False
            return
        self.rows = [self.rows[j] for j in order]
        self.tokens = [self.tokens[j] for j in order]
        if self.seen is not None:
            self.seen = self.seen[torch.tensor(order, device=self.seen.device)]
        self.knobs = None

    def _reset(self) -> None:
        self.rows, self.tokens, self.knobs, self.seen, self.can_prune = [], [], None, None, True
        if isinstance(self.dec, GPT2Decoder):
            self.dec.n, self.dec.first = 0, []  # the cache storage is kept for the next rows
        else:
            self.dec = self.gen.new_decoder()
