"""Text generation for the teacher and the students: one batched decode loop, shared by the CLI and the server.

    HF_HUB_OFFLINE=1 python -c "from python3_distillation.generate import Generator, SamplingParams as P; \
g = Generator.from_pretrained('python3_distillation/gpt2_student_v2'); print(g.generate(['It is'], P(seed=1))[0].text)"

How it decodes:

* prompts are LEFT padded into one batch, with an attention mask and per-row ``position_ids`` (pads
  never take a position), so every row's last column is its newest token;
* one prefill, then one forward per new token over a KV cache; finished rows are dropped from the
  batch (and from the cache) as they finish, a few at a time, so they stop costing compute;
* GPT-2 models go through ``_GPT2Decoder``, GPT-2's forward written out over the HF model's own weights
  with a preallocated cache (no per-step mask building or cache concatenation, the lm-head product in
  the layout the CPU's BLAS is fastest at); any other causal LM goes through ``_HFDecoder``, the HF
  forward with ``past_key_values``/``cache`` and ``use_cache=True``. Both are checked token for token
  against ``model.generate`` in the tests;
* per-row sampling settings (greedy when temperature is 0, temperature, top-k, top-p, CTRL repetition
  penalty) are applied to the whole batch at once;
* randomness: every sampled row owns a CPU ``torch.Generator`` seeded from ``seed`` (a fresh random seed
  when unset) and draws exactly one uniform number per sampled token, turned into a token by inverse-CDF
  on the row's own probabilities on the model's device. So a seed means the same text on CPU and CUDA,
  whatever batch position or neighbours the row has;
* text is produced from token bytes through an incremental UTF-8 decoder, so a streamed piece never
  holds half a character, and text that could be the start of a stop string is held back until it
  is known not to be one; stop strings never appear in the output.
"""

from __future__ import annotations

import codecs
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"


class GenerationError(ValueError):
    """Bad sampling parameters, prompt or model folder; the message is one line meant for the user."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """How to pick tokens. ``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` switch those filters off."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        """Check types and ranges (raises :class:`GenerationError`); normalises numbers to float/int, returns self."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise GenerationError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if (not _is_number(self.repetition_penalty) or not math.isfinite(self.repetition_penalty)
                or self.repetition_penalty <= 0):
            raise GenerationError(f"repetition_penalty must be a number > 0 (1 = off), got {self.repetition_penalty!r}")
        if isinstance(self.stop, str) or not isinstance(self.stop, (list, tuple)):
            raise GenerationError(f"stop must be a list of strings, got {self.stop!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise GenerationError(f"stop strings must be non-empty strings, got {s!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise GenerationError(f"seed must be an integer in [0, 2**64) or null, got {self.seed!r}")
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
        self.repetition_penalty = float(self.repetition_penalty)
        self.stop = list(self.stop)
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
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
    """New text of one row; ``completion`` is set on the row's last event (``finished=True``)."""

    row: int
    text: str
    finished: bool
    completion: Completion | None = None


# --------------------------------------------------------------------------------------------- text


def token_byte_table(tokenizer, size: int) -> list[bytes]:
    """UTF-8 bytes of every token id, so text can be assembled token by token without half characters.

    Exact for byte-level BPE (GPT-2: each token's characters map back to bytes); for other tokenizers
    an approximation from decoding each id alone.
    """
    from python3_distillation.tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    n = min(size, len(tokenizer))
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    table: list[bytes] = []
    for i, piece in enumerate(pieces):
        if piece is None:
            table.append(b"")
        elif piece in special:
            table.append(piece.encode("utf-8"))
        elif all(c in byte_of for c in piece):
            table.append(bytes(byte_of[c] for c in piece))
        else:
            table.append(tokenizer.decode([i]).encode("utf-8"))
    # Ids past the tokenizer (a model whose vocab was padded) have no text.
    return table + [b""] * (size - n)


class _RowText:
    """Text of one row: token bytes → whole characters → stop-string cut → the part safe to hand out."""

    def __init__(self, stop: list[str]):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = stop
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, data: bytes) -> str:
        """Feed one token's bytes; returns the newly safe text (maybe empty)."""
        return self._settle(self.decoder.decode(data))

    def finish(self) -> str:
        """The row ended: flush a dangling partial character (as U+FFFD, like ``decode``) and release held text."""
        delta = "" if self.stopped else self._settle(self.decoder.decode(b"", final=True))
        if self.stopped:
            return delta
        rest = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta + rest

    def _settle(self, new: str) -> str:
        if self.stopped:
            return ""
        old = len(self.text)
        self.text += new
        if not self.stop:
            return self._emit(len(self.text))
        # A stop string first completed by this piece starts no earlier than this.
        start = max(0, old - self.longest_stop + 1)
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            return self._emit(len(self.text))
        return self._emit(len(self.text) - self._held())

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return hold

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out


# ----------------------------------------------------------------------------------------- sampling


@dataclass
class _Knobs:
    """Sampling settings of the rows in the batch, as tensors (rebuilt when the batch shrinks)."""

    greedy: list[bool]
    sample_rows: torch.Tensor | None  # batch positions of sampled rows
    temperature: torch.Tensor | None  # [m, 1] for the sampled rows
    top_k: list[int]
    top_p: torch.Tensor | None  # [m, 1]
    plain: list[bool]  # sampled rows without top-k / top-p
    penalty: torch.Tensor | None  # [n, 1]; None when no row uses one

    @classmethod
    def build(cls, params: list[SamplingParams], device: torch.device) -> "_Knobs":
        greedy = [p.temperature == 0 for p in params]
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


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of ``probs`` (not necessarily normalised) by the uniforms ``u`` [m, 1]."""
    cdf = probs.cumsum(-1)
    j = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1)
    # Rounding can push u·total onto the last boundary; never return a token of probability 0.
    bad = probs.gather(1, j) <= 0
    return torch.where(bad, probs.argmax(-1, keepdim=True), j).squeeze(1)


def _sample(x: torch.Tensor, top_k: list[int], top_p: torch.Tensor, plain: list[bool],
            u: torch.Tensor) -> torch.Tensor:
    """Sample one token per row of temperature-scaled logits ``x`` [m, V] with per-row top-k / top-p."""
    m, vocab = x.shape
    out = torch.empty(m, dtype=torch.long, device=x.device)
    idx_plain = [i for i in range(m) if plain[i]]
    idx_filt = [i for i in range(m) if not plain[i]]
    if idx_plain:
        sel = idx_plain if len(idx_plain) < m else slice(None)
        out[sel] = _inverse_cdf(torch.softmax(x[sel], -1), u[sel])
    if idx_filt:
        sel = idx_filt if len(idx_filt) < m else slice(None)
        ks = [top_k[i] for i in idx_filt]
        # Work on the candidates only: the top max(k) logits when every filtered row has a k,
        # else the whole vocab sorted (top-p alone).
        width = vocab if 0 in ks else min(max(ks), vocab)
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
        out[sel] = cand.gather(1, _inverse_cdf(torch.softmax(vals, -1), u[sel])[:, None]).squeeze(1)
    return out


@torch.inference_mode()
def _choose(logits: torch.Tensor, knobs: _Knobs, seen: torch.Tensor | None,
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
    tokens[knobs.sample_rows] = _sample(x, knobs.top_k, knobs.top_p, knobs.plain, u)
    return tokens.tolist()


# ----------------------------------------------------------------------------------------- decoders


class _HFDecoder:
    """Any causal LM through its own forward: ``past_key_values``/``cache`` with ``use_cache=True``."""

    def __init__(self, model):
        self.model = model
        sig = inspect.signature(model.forward).parameters
        # transformers 5.x renamed past_key_values → cache (the old name is deprecated).
        self.cache_kw = "cache" if "cache" in sig else "past_key_values"
        self.logits_to_keep = "logits_to_keep" in sig
        cfg = model.config
        self.max_pos = int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings")) - 1
        self.cache: Any = None

    def _out_cache(self, out) -> Any:
        c = getattr(out, "cache", None)
        return c if c is not None else getattr(out, "past_key_values", None)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, capacity: int) -> torch.Tensor:
        self.mask = mask.long()
        pos = (self.mask.cumsum(1) - 1).clamp_(min=0)
        extra = {"logits_to_keep": 1} if self.logits_to_keep else {}
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, use_cache=True, **extra)
        self.cache = self._out_cache(out)
        self.pos = pos[:, -1:] + 1
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        # Finished rows still in the batch may run past the context; their output is unused.
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask,
                         position_ids=self.pos.clamp(max=self.max_pos), use_cache=True, **{self.cache_kw: self.cache})
        self.cache = self._out_cache(out)
        self.pos = self.pos + 1
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def keep(self, idx: torch.Tensor) -> bool:
        """Keep only batch rows ``idx``; False when this cache type cannot be pruned (rows then stay)."""
        select = getattr(self.cache, "batch_select_indices", None)
        if select is None:
            return False
        select(idx)
        self.mask, self.pos = self.mask[idx], self.pos[idx]
        return True


class _GPT2Decoder:
    """GPT-2's forward over the HF model's own weights, for decoding: preallocated KV cache, one mask per step.

    Same maths as ``GPT2LMHeadModel`` with SDPA attention (layer norms, ``addmm`` projections on the
    ``Conv1D`` weights, the model's attention scaling, its GELU fused), minus the per-step work of the
    general forward: building a 4-D mask, growing the cache by concatenation, keyword plumbing.
    """

    def __init__(self, model, head_t: torch.Tensor | None = None):
        cfg = model.config
        tr = model.transformer
        self.n_head, self.d = cfg.n_head, cfg.n_embd
        self.dh = self.d // self.n_head
        self.wte, self.wpe = tr.wte.weight, tr.wpe.weight
        self.max_pos = self.wpe.shape[0] - 1
        self.ln_f = (tr.ln_f.weight, tr.ln_f.bias, tr.ln_f.eps)
        self.head = model.lm_head.weight
        self.head_t = head_t
        self.layers = [(
            (b.ln_1.weight, b.ln_1.bias, b.ln_1.eps), b.attn.c_attn.weight, b.attn.c_attn.bias,
            b.attn.c_proj.weight, b.attn.c_proj.bias, b.attn.scaling,
            (b.ln_2.weight, b.ln_2.bias, b.ln_2.eps), b.mlp.c_fc.weight, b.mlp.c_fc.bias,
            b.mlp.c_proj.weight, b.mlp.c_proj.bias, self._activation(b.mlp.act),
        ) for b in tr.h]

    @staticmethod
    def _activation(act: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """GPT-2's ``gelu_new`` as PyTorch's fused tanh GELU: the same function in one kernel instead of
        eight (rounding differs by ~1e-7, checked token for token against ``generate`` in the tests)."""
        from transformers.activations import NewGELUActivation

        if type(act) is NewGELUActivation:
            return lambda x: F.gelu(x, approximate="tanh")
        return act

    @staticmethod
    def cpu_head_t(model) -> torch.Tensor | None:
        """The lm-head weight transposed ([d, vocab], contiguous) when the model is on CPU, else None.

        On CPU, MKL's product of one row with the vocab×d weight (a gemv, what ``F.linear`` does at
        batch 1) runs at a fraction of memory speed, while ``x @ Wᵀ`` with ``Wᵀ`` stored contiguous
        runs near it (benchmarks/bench_generate.py); batch 1 is the latency case, so it gets a copy.
        """
        w = model.lm_head.weight
        return w.detach().t().contiguous() if w.device.type == "cpu" else None

    @staticmethod
    def supports(model) -> bool:
        try:
            from transformers import GPT2LMHeadModel
        except ImportError:  # pragma: no cover
            return False
        cfg = model.config
        return (type(model) is GPT2LMHeadModel and not getattr(cfg, "add_cross_attention", False)
                and not getattr(cfg, "reorder_and_upcast_attn", False) and model.lm_head.bias is None
                and cfg.n_embd % cfg.n_head == 0)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(h, (self.d,), *self.ln_f)
        if self.head_t is None:
            return F.linear(h, self.head).float()
        if h.shape[0] == 1:
            return torch.mm(h, self.head_t).float()
        # Several rows: a real gemm, fastest with the weight as stored (measured) — then rows contiguous.
        return torch.mm(self.head, h.t()).t().contiguous().float()

    def _blocks(self, h: torch.Tensor, t0: int, t1: int, mask: torch.Tensor) -> torch.Tensor:
        """Run the blocks on ``h`` [b, q, d] at cache columns t0:t1; ``mask`` is additive, [b, 1, q or 1, t1]."""
        b, q, d = h.shape
        for kv, (ln1, w_qkv, b_qkv, w_o, b_o, scale, ln2, w_fc, b_fc, w_pr, b_pr, act) in zip(self.kv, self.layers):
            a = F.layer_norm(h, (d,), *ln1).view(-1, d)
            qkv = torch.addmm(b_qkv, a, w_qkv).view(b, q, 3, self.n_head, self.dh)
            kv[:, :, :, t0:t1] = qkv[:, :, 1:].permute(2, 0, 3, 1, 4)  # keys and values in one copy
            o = F.scaled_dot_product_attention(qkv[:, :, 0].transpose(1, 2), kv[0, :, :, :t1], kv[1, :, :, :t1],
                                               attn_mask=mask, scale=scale)
            h = h + torch.addmm(b_o, o.transpose(1, 2).reshape(-1, d), w_o).view(b, q, d)
            a = F.layer_norm(h, (d,), *ln2).view(-1, d)
            h = h + torch.addmm(b_pr, act(torch.addmm(b_fc, a, w_fc)), w_pr).view(b, q, d)
        return h

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        # Made once per forward: SDPA would otherwise turn a boolean mask into this in every layer.
        return torch.zeros(allowed.shape, dtype=self.wte.dtype, device=allowed.device).masked_fill_(
            ~allowed, float("-inf"))

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, capacity: int) -> torch.Tensor:
        b, t = ids.shape
        dev, dtype = self.wte.device, self.wte.dtype
        self.kv = [torch.empty(2, b, self.n_head, capacity, self.dh, device=dev, dtype=dtype) for _ in self.layers]
        self.valid = torch.zeros(b, capacity, dtype=torch.bool, device=dev)
        self.valid[:, :t] = mask
        pos = (mask.long().cumsum(1) - 1).clamp_(min=0)
        self.pos = pos[:, -1] + 1
        self.t = t
        causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril_()
        # Pad queries attend to themselves only, so no softmax row is empty (which would be NaN).
        allowed = (causal[None] & mask[:, None, :]) | torch.eye(t, dtype=torch.bool, device=dev)[None]
        h = F.embedding(ids, self.wte) + F.embedding(pos, self.wpe)
        h = self._blocks(h, 0, t, self._additive(allowed[:, None]))
        return self._logits(h[:, -1])

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.t
        self.valid[:, t] = True
        # Finished rows still in the batch (not yet dropped) may run past the context; their output is unused.
        pos = self.pos.clamp(max=self.max_pos)
        h = (F.embedding(tokens, self.wte) + F.embedding(pos, self.wpe))[:, None]
        h = self._blocks(h, t, t + 1, self._additive(self.valid[:, None, None, :t + 1]))
        self.pos += 1
        self.t = t + 1
        return self._logits(h[:, 0])

    @torch.inference_mode()
    def keep(self, idx: torch.Tensor) -> bool:
        self.kv = [c.index_select(1, idx) for c in self.kv]
        self.valid, self.pos = self.valid[idx], self.pos[idx]
        return True


# ---------------------------------------------------------------------------------------- generator


@dataclass
class _Row:
    index: int
    prompt: str
    ids: list[int]
    params: SamplingParams
    text: _RowText
    generator: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)
    done: bool = False


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``, ``"bfloat16"``, ``torch.float16``… → a torch dtype (None / ``"auto"`` → None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    key = str(dtype).lower().removeprefix("torch.")
    if key not in names:
        raise GenerationError(f"unknown dtype {dtype!r}; expected one of {', '.join(names)}")
    return names[key]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Generator:
    """A causal LM and its tokenizer, ready to complete prompts (one at a time, batched, or streamed)."""

    # Drop finished rows from the batch once this share of it is finished (each drop copies the cache).
    PRUNE_SHARE = 0.25

    def __init__(self, model, tokenizer, device: str | torch.device | None = None, name: str | None = None,
                 *, backend: str = "auto"):
        if device is not None:
            model = model.to(torch.device(device))
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        cfg = model.config
        self.name = name or Path(str(getattr(cfg, "name_or_path", "") or "")).name or type(model).__name__
        # parameters() yields a tied tensor once, so tied embeddings are counted once.
        self.n_params = sum(p.numel() for p in model.parameters())
        self.context_length = int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings"))
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(cfg, "eos_token_id", None)
        self.eos_token_id: int | None = eos
        self.pad_token_id = eos if eos is not None else 0
        if backend not in {"auto", "gpt2", "hf"}:
            raise GenerationError(f"unknown backend {backend!r}; expected auto, gpt2 or hf")
        if backend == "gpt2" and not _GPT2Decoder.supports(model):
            raise GenerationError(f"backend 'gpt2' needs a plain GPT2LMHeadModel, got {type(model).__name__}")
        self.backend = "gpt2" if backend in {"auto", "gpt2"} and _GPT2Decoder.supports(model) else "hf"
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._bytes: list[bytes] | None = None
        self._head_t: torch.Tensor | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None) -> "Generator":
        """Load a saved model folder (and its tokenizer, else GPT-2's); CUDA when available, else CPU."""
        from transformers import AutoModelForCausalLM

        from python3_distillation.tokenizer import is_local_tokenizer_dir, load_tokenizer

        path = Path(model_dir).expanduser()
        if not path.is_dir():
            raise GenerationError(f"model folder {path} does not exist")
        if not (path / "config.json").is_file():
            raise GenerationError(f"{path} is not a saved model folder (no config.json)")
        torch_dtype = resolve_dtype(dtype)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
        except Exception as e:  # corrupt weights, unknown architecture…: one line for the user
            raise GenerationError(f"cannot load the model in {path}: {str(e).strip().splitlines()[0]}") from e
        try:
            tokenizer = load_tokenizer(path if is_local_tokenizer_dir(path) else "gpt2")
        except Exception as e:
            raise GenerationError(f"cannot load a tokenizer for {path}: {str(e).strip().splitlines()[0]}") from e
        try:
            return cls(model, tokenizer, device=torch.device(device) if device else default_device(), name=path.name)
        except (RuntimeError, AssertionError) as e:  # "cuda" without CUDA, a malformed device string
            raise GenerationError(f"cannot use device {device!r}: {str(e).strip().splitlines()[0]}") from e

    # ------------------------------------------------------------------------------------- prompts

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def check_prompt(self, prompt: str, params: SamplingParams, truncate: bool = False) -> list[int]:
        """Token ids of ``prompt``; errors for empty or too-long prompts (or, with ``truncate``, keeps the end)."""
        params.validate()
        if not isinstance(prompt, str):
            raise GenerationError(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise GenerationError("prompt is empty")
        ids = self.tokenizer.encode(prompt)
        room = self.context_length - params.max_new_tokens
        if room < 1:
            raise GenerationError(f"max_new_tokens is {params.max_new_tokens} but the model's context is "
                                  f"{self.context_length} tokens, which leaves no room for a prompt")
        if len(ids) > room:
            if not truncate:
                raise GenerationError(
                    f"prompt is {len(ids)} tokens; with max_new_tokens {params.max_new_tokens} that is "
                    f"{len(ids) + params.max_new_tokens}, more than the model's context of "
                    f"{self.context_length} tokens")
            log.warning("prompt is %d tokens; keeping its last %d so that %d new tokens fit the context of %d",
                        len(ids), room, params.max_new_tokens, self.context_length)
            ids = ids[-room:]
        return ids

    # ---------------------------------------------------------------------------------- generation

    def generate(self, prompts: Sequence[str], params: SamplingParams | Sequence[SamplingParams],
                 truncate: bool = False) -> list[Completion]:
        """Complete every prompt in one batched decode; results in prompt order."""
        out: list[Completion | None] = [None] * len(prompts)
        for ev in self.stream_batch(prompts, params, truncate=truncate):
            if ev.finished:
                out[ev.row] = ev.completion
        return out  # type: ignore[return-value]

    def stream(self, prompt: str, params: SamplingParams, truncate: bool = False) -> Iterator[str]:
        """Text pieces of one completion as they are produced (they concatenate to its ``text``)."""
        return (ev.text for ev in self.stream_batch([prompt], params, truncate=truncate) if ev.text)

    def stream_batch(self, prompts: Sequence[str], params: SamplingParams | Sequence[SamplingParams],
                     truncate: bool = False, cancelled: Callable[[int], bool] | None = None) -> Iterator[StreamEvent]:
        """One batched decode with per-row params, yielding each row's new text as it is produced.

        Inputs are checked here, before the first event, so a bad prompt raises at the call.
        ``cancelled(row)`` is asked before every forward; a row it answers True for finishes with
        ``finish_reason="cancelled"``.
        """
        if isinstance(prompts, str):
            raise GenerationError("prompts must be a list of strings, not one string")
        prompts = list(prompts)
        if isinstance(params, SamplingParams):
            plist = [params] * len(prompts)
        else:
            plist = list(params)
            if len(plist) != len(prompts):
                raise GenerationError(f"{len(prompts)} prompts but {len(plist)} sampling parameter sets")
            for p in plist:
                if not isinstance(p, SamplingParams):
                    raise GenerationError(f"expected SamplingParams, got {type(p).__name__}")
        ids = [self.check_prompt(p, q, truncate) for p, q in zip(prompts, plist)]
        return self._decode(prompts, ids, plist, cancelled)

    def _token_bytes(self) -> list[bytes]:
        if self._bytes is None:  # built on first use: ~0.2 s for GPT-2's 50257 tokens
            self._bytes = token_byte_table(self.tokenizer, self.vocab_size)
        return self._bytes

    def _decoder(self):
        if self.backend != "gpt2":
            return _HFDecoder(self.model)
        if self._head_t is None:
            self._head_t = _GPT2Decoder.cpu_head_t(self.model)
        return _GPT2Decoder(self.model, self._head_t)

    def _decode(self, prompts: list[str], ids: list[list[int]], plist: list[SamplingParams],
                cancelled: Callable[[int], bool] | None) -> Iterator[StreamEvent]:
        if not prompts:
            return
        table = self._token_bytes()
        t_start = time.perf_counter()
        rows = []
        for i, (prompt, row_ids, p) in enumerate(zip(prompts, ids, plist)):
            gen = None
            if p.temperature > 0:
                gen = torch.Generator()
                if p.seed is None:
                    gen.seed()
                else:
                    gen.manual_seed(p.seed)
            rows.append(_Row(i, prompt, row_ids, p, _RowText(p.stop), gen))

        def finish(row: _Row, reason: str, delta: str) -> StreamEvent:
            row.done = True
            delta += row.text.finish()
            c = Completion(prompt=row.prompt, text=row.text.text, prompt_tokens=len(row.ids),
                           completion_tokens=len(row.token_ids), finish_reason=reason,
                           seconds=time.perf_counter() - t_start, token_ids=row.token_ids)
            return StreamEvent(row.index, delta, True, c)

        batch = list(rows)  # batch position → row
        events = [finish(r, FINISH_CANCELLED, "") for r in batch if cancelled is not None and cancelled(r.index)]
        yield from events
        batch = [r for r in batch if not r.done]
        if not batch:
            return
        dec = self._decoder()
        width = max(len(r.ids) for r in batch)
        capacity = width + max(r.params.max_new_tokens for r in batch)
        ids_t = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        mask_t = torch.zeros((len(batch), width), dtype=torch.bool)
        for j, r in enumerate(batch):
            ids_t[j, width - len(r.ids):] = torch.tensor(r.ids, dtype=torch.long)
            mask_t[j, width - len(r.ids):] = True
        ids_t, mask_t = ids_t.to(self.device), mask_t.to(self.device)
        logits = dec.prefill(ids_t, mask_t, capacity)
        knobs = _Knobs.build([r.params for r in batch], self.device)
        seen = self._seen(ids_t, mask_t) if knobs.penalty is not None else None
        can_prune = True
        while True:
            tokens = _choose(logits, knobs, seen, [r.generator for r in batch])
            events = []
            for r, tok in zip(batch, tokens):
                if r.done:
                    continue
                if tok == self.eos_token_id:
                    events.append(finish(r, FINISH_STOP, ""))
                    continue
                r.token_ids.append(tok)
                delta = r.text.add(table[tok])
                if r.text.stopped:
                    events.append(finish(r, FINISH_STOP, delta))
                elif len(r.token_ids) >= r.params.max_new_tokens:
                    events.append(finish(r, FINISH_LENGTH, delta))
                elif delta:
                    events.append(StreamEvent(r.index, delta, False))
            if cancelled is not None:
                events += [finish(r, FINISH_CANCELLED, "") for r in batch if not r.done and cancelled(r.index)]
            yield from events
            n_done = sum(r.done for r in batch)
            if n_done == len(batch):
                return
            if seen is not None:
                self._mark_seen(seen, tokens)
            if can_prune and n_done >= max(1, self.PRUNE_SHARE * len(batch)):
                keep = [j for j, r in enumerate(batch) if not r.done]
                idx = torch.tensor(keep, device=self.device)
                can_prune = dec.keep(idx)
                if can_prune:
                    batch = [batch[j] for j in keep]
                    tokens = [tokens[j] for j in keep]
                    knobs = _Knobs.build([r.params for r in batch], self.device)
                    seen = seen[idx] if seen is not None else None
            logits = dec.step(torch.tensor(tokens, dtype=torch.long).to(self.device))

    @torch.inference_mode()
    def _seen(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Which tokens each row has seen (prompt, real tokens only), for the repetition penalty."""
        seen = torch.zeros(ids.shape[0], self.vocab_size, dtype=torch.bool, device=ids.device)
        # Pads point at the row's last token (always real with left padding), so they mark nothing new.
        seen.scatter_(1, torch.where(mask, ids, ids[:, -1:]), True)
        return seen

    @torch.inference_mode()
    def _mark_seen(self, seen: torch.Tensor, tokens: list[int]) -> None:
        t = torch.tensor(tokens, device=seen.device)
        seen[torch.arange(len(tokens), device=seen.device), t.clamp(max=self.vocab_size - 1)] = True
