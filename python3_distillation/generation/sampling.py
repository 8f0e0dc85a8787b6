"""How the next token is picked: sampling settings, their bounds, and the batched sampler.

    python -c "from python3_distillation.generation import SamplingParams; print(SamplingParams(temperature=0).validate())"

Every row of a batch has its own settings (greedy when temperature is 0, temperature, top-k, top-p,
CTRL repetition penalty), applied to the whole batch at once. Randomness: every sampled row owns a
CPU ``torch.Generator`` and draws exactly one uniform number per sampled token, turned into a token
by inverse-CDF on the row's own probabilities on the model's device, so a seed means the same text
on CPU and CUDA whatever batch position or neighbours the row has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

# Bounds of every sampling field, declared once: SamplingParams checks them for library callers and
# the request schemas (serving/schemas.py) declare the same numbers for the API and the CLI files.
MAX_STOP_STRINGS = 4  # OpenAI's own limit
MAX_STOP_CHARS = 256  # text held back per step is checked against every stop: keep each one short
MAX_TEMPERATURE = 100.0  # past this every distribution is flat to fp32 precision anyway
# A positive temperature below this is greedy: logits / 1e-50 overflow fp32 to inf and the softmax
# of inf - inf is NaN, so tiny temperatures decode as their limit (vLLM draws the same line).
GREEDY_BELOW = 1e-5
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_TOP_K = 2**31 - 1  # the model's vocabulary is the real bound, checked where the model is known
MAX_NEW_TOKENS = 2**20  # the model's context is the real bound, checked where the model is known
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes [0, 2**64)


class GenerationError(ValueError):
    """Bad sampling parameters, prompt or model folder; the message is one line meant for the user."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (_is_int(x) or isinstance(x, float)) and math.isfinite(x)


@dataclass
class SamplingParams:
    """How to pick tokens. ``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` switch those filters off.

    ``ignore_eos``: the end-of-text token does not finish the row, which runs to ``max_new_tokens``
    (fixed-length decoding for speed measurements).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def validate(self) -> SamplingParams:
        """Check types and ranges (raises :class:`GenerationError`); normalises numbers to float/int, returns self."""
        if not _is_int(self.max_new_tokens) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise GenerationError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS}], "
                                  f"got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise GenerationError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy), "
                                  f"got {self.temperature!r}")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_TOP_K:
            raise GenerationError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if (not _is_number(self.repetition_penalty)
                or not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY):
            raise GenerationError(f"repetition_penalty must be a number in [{MIN_REPETITION_PENALTY:g}, "
                                  f"{MAX_REPETITION_PENALTY:g}] (1 = off), got {self.repetition_penalty!r}")
        if isinstance(self.stop, str) or not isinstance(self.stop, (list, tuple)):
            raise GenerationError(f"stop must be a list of strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise GenerationError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise GenerationError(f"stop strings must be non-empty strings, got {s!r}")
            if len(s) > MAX_STOP_CHARS:
                raise GenerationError(f"stop strings must be at most {MAX_STOP_CHARS} characters, got {len(s)}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            raise GenerationError(f"seed must be an integer in [0, 2**64) or null, got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise GenerationError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
        self.repetition_penalty = float(self.repetition_penalty)
        self.stop = list(self.stop)
        return self

    @classmethod
    def from_dict(cls, d: dict) -> SamplingParams:
        """Build from JSON-like fields; unknown keys are an error; a single ``stop`` string is accepted."""
        if not isinstance(d, dict):
            raise GenerationError(f"sampling parameters must be an object, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise GenerationError(f"unknown sampling parameter(s): {', '.join(map(str, unknown))}; "
                                  f"expected some of: {', '.join(known)}")
        d = dict(d)
        if isinstance(d.get("stop"), str):
            d["stop"] = [d["stop"]]
        if d.get("stop", ()) is None:
            d["stop"] = []
        return cls(**d).validate()


def new_rng(params: SamplingParams) -> torch.Generator | None:
    """The row's own random stream: seeded from ``seed``, else fresh; None for greedy rows."""
    if params.greedy:
        return None
    gen = torch.Generator()
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


@dataclass
class Knobs:
    """Sampling settings of the rows in the batch, as tensors (rebuilt when rows join or leave)."""

    greedy: list[bool]
    sample_rows: torch.Tensor | None  # batch positions of sampled rows
    temperature: torch.Tensor | None  # [m, 1] for the sampled rows
    top_k: list[int]
    top_p: torch.Tensor | None  # [m, 1]
    plain: list[bool]  # sampled rows without top-k / top-p
    penalty: torch.Tensor | None  # [n, 1]; None when no row uses one

    @classmethod
    def build(cls, params: list[SamplingParams], device: torch.device) -> Knobs:
        greedy = [p.greedy for p in params]
        sampled = [p for p, g in zip(params, greedy) if not g]
        penalty = None
        if any(p.repetition_penalty != 1 for p in params):
            penalty = torch.tensor([[p.repetition_penalty] for p in params], dtype=torch.float32, device=device)
        if not sampled:
            return cls(greedy, None, None, [], None, [], penalty)
        return cls(
            greedy=greedy,
            sample_rows=torch.tensor([i for i, g in enumerate(greedy) if not g], device=device),
            temperature=torch.tensor([[p.temperature] for p in sampled], dtype=torch.float32, device=device),
            top_k=[p.top_k for p in sampled],
            top_p=torch.tensor([[p.top_p] for p in sampled], dtype=torch.float32, device=device),
            plain=[p.top_k == 0 and p.top_p >= 1 for p in sampled],
            penalty=penalty,
        )


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of ``probs`` (not necessarily normalised) by the uniforms ``u`` [m, 1]."""
    cdf = probs.cumsum(-1)
    j = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1)
    # Rounding can push u·total onto the last boundary; never return a token of probability 0.
    bad = probs.gather(1, j) <= 0
    return torch.where(bad, probs.argmax(-1, keepdim=True), j).squeeze(1)


def sample(x: torch.Tensor, top_k: list[int], top_p: torch.Tensor, plain: list[bool],
           u: torch.Tensor) -> torch.Tensor:
    """Sample one token per row of temperature-scaled logits ``x`` [m, V] with per-row top-k / top-p."""
    m, vocab = x.shape
    out = torch.empty(m, dtype=torch.long, device=x.device)
    idx_plain = [i for i in range(m) if plain[i]]
    idx_filt = [i for i in range(m) if not plain[i]]
    if idx_plain:
        sel = idx_plain if len(idx_plain) < m else slice(None)
        out[sel] = inverse_cdf(torch.softmax(x[sel], -1), u[sel])
    if idx_filt:
        sel = idx_filt if len(idx_filt) < m else slice(None)
        # A k past the vocabulary keeps every token, the same as no k.
        ks = [k if 0 < k < vocab else 0 for k in (top_k[i] for i in idx_filt)]
        # Work on the candidates only: the top max(k) logits when every filtered row has a k,
        # else the whole vocab sorted (top-p alone).
        width = vocab if 0 in ks else max(ks)
        vals, cand = x[sel].topk(width, dim=-1, sorted=True)
        pos = torch.arange(width, device=x.device)
        k_t = torch.tensor([k if k > 0 else width for k in ks], device=x.device)
        vals = vals.masked_fill(pos[None, :] >= k_t[:, None], float("-inf"))
        p = top_p[sel]
        if bool((p < 1).any()):
            # transformers' TopPLogitsWarper: drop the least likely tokens whose ascending cumulative
            # probability stays <= 1 - top_p, always keeping the most likely one.
            ascending = torch.softmax(vals, -1).flip(-1).cumsum(-1)
            drop = (ascending <= (1 - p)).flip(-1)
            drop[:, 0] = False
            vals = vals.masked_fill(drop, float("-inf"))
        out[sel] = cand.gather(1, inverse_cdf(torch.softmax(vals, -1), u[sel])[:, None]).squeeze(1)
    return out


@torch.inference_mode()
def choose(logits: torch.Tensor, knobs: Knobs, seen: torch.Tensor | None,
           generators: list[torch.Generator | None]) -> list[int]:
    """Next token of every row of ``logits`` [n, V] (float32)."""
    if knobs.penalty is not None and seen is not None:
        # CTRL / transformers' RepetitionPenaltyLogitsProcessor; rows with penalty 1 are unchanged (x*1 = x/1 = x).
        pen = knobs.penalty
        logits = torch.where(seen, torch.where(logits < 0, logits * pen, logits / pen), logits)
    tokens = logits.argmax(-1)
    if knobs.sample_rows is None:
        return tokens.tolist()
    rows = [i for i, g in enumerate(knobs.greedy) if not g]
    u = torch.tensor([[torch.rand((), generator=generators[i]).item()] for i in rows],
                     dtype=torch.float32).to(logits.device)
    x = logits.index_select(0, knobs.sample_rows) / knobs.temperature
    tokens[knobs.sample_rows] = sample(x, knobs.top_k, knobs.top_p, knobs.plain, u)
    return tokens.tolist()
