"""Measuring models: perplexity, fidelity to a reference model, decode speed, FLOPs, size on disk.

    python -c "from python3_distillation.evaluation.measure import forward_flops_per_token as f; print(f(12, 768, 50257, 64))"

The one place quality and speed are measured (design notes: docs/design/evaluation.md).
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from python3_distillation.data import Blocks
from python3_distillation.generation import SamplingParams
from python3_distillation.losses import lm_loss

EVAL_BATCH = 8
PROMPT_TOKENS = 16  # length of each prompt cut from the validation text


def weights_bytes(path: str | Path) -> int:
    """Size of the weights file(s) in a model folder (``*.safetensors``, else ``*.bin``)."""
    files = list(Path(path).glob("*.safetensors")) or list(Path(path).glob("*.bin"))
    return sum(f.stat().st_size for f in files)


def non_embedding_params(n_layer: int, n_embd: int, n_inner: int | None = None) -> int:
    """GPT-2 parameters outside the token/position embeddings: blocks + final norm."""
    d, f = n_embd, n_inner or 4 * n_embd
    # attention qkv and output, the MLP's two matrices, two norms
    per_block = 3 * d * d + 3 * d + d * d + d + d * f + f + f * d + d + 4 * d
    return n_layer * per_block + 2 * d


def forward_flops_per_token(n_layer: int, n_embd: int, vocab: int, ctx: float, n_inner: int | None = None) -> float:
    """Forward FLOPs for one token at context ``ctx``: 2·(non-embedding params + LM head) + 2·n_layer·ctx·n_embd.

    The LM head (tied to the token embedding) is a matrix product per token, so it counts; the embedding
    lookups do not. The last term is attention's QKᵀ and AV."""
    return 2.0 * (non_embedding_params(n_layer, n_embd, n_inner) + n_embd * vocab) + 2.0 * n_layer * ctx * n_embd


def model_flops_per_token(config, ctx: float) -> float:
    return forward_flops_per_token(config.n_layer, config.n_embd, config.vocab_size, ctx, getattr(config, "n_inner", None))


def device_label(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    n = torch.get_num_threads()
    return f"CPU, {n} thread{'s' if n > 1 else ''} (torch {torch.__version__})"


@torch.no_grad()
def quality(models: dict, blocks: Blocks, reference: str | None = None, batch_size: int = EVAL_BATCH,
            progress: str | None = None) -> dict[str, dict[str, float]]:
    """Every model's mean next-token loss (nats/token) and perplexity on ``blocks``; with ``reference``, fidelity.

    ``reference`` is a key of ``models``; fidelity to it is ``top1``, the share of positions where both pick the
    same most likely next token, and ``kl``, the mean KL(reference ‖ model) in nats per position (T = 1). fp32, no
    autocast; one pass, each batch running every model once (the reference's log-probabilities shared)."""
    states = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    # fp64 sums (Python floats' arithmetic) on each model's device; reference log-probs move only across devices.
    devices = {k: next(itertools.chain(m.parameters(), m.buffers())).device for k, m in models.items()}
    acc = {k: torch.zeros(3, dtype=torch.float64, device=devices[k]) for k in models}  # loss, top1, kl sums
    targets = positions = 0
    starts = range(0, len(blocks), batch_size)
    for start in tqdm(starts, desc=progress, unit="batch", dynamic_ncols=True, disable=progress is None):
        ids = blocks.ids[torch.arange(start, min(len(blocks), start + batch_size))]
        ref = None
        if reference is not None:
            ref = F.log_softmax(models[reference](input_ids=ids.to(devices[reference])).logits.float(), -1)
        for k, m in models.items():
            on = ids.to(devices[k])
            logits = m(input_ids=on).logits.float()
            acc[k][0] += lm_loss(logits, on).double() * ids[:, 1:].numel()
            if ref is not None and k != reference:
                r = ref.to(logits.device)
                acc[k][1] += (logits.argmax(-1) == r.argmax(-1)).sum()
                acc[k][2] += (r.exp() * (r - F.log_softmax(logits, -1))).sum().double()
        targets += ids[:, 1:].numel()
        positions += ids.numel()
    for k, m in models.items():
        m.train(states[k])
    out = {}
    for k, a in acc.items():
        loss_sum, top1, kl = a.tolist()
        loss = loss_sum / max(1, targets)
        out[k] = {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
        if reference is not None:
            out[k].update(top1=1.0 if k == reference else top1 / max(1, positions),
                          kl=0.0 if k == reference else kl / max(1, positions))
    return out


def validation_prompts(tokenizer, blocks: Blocks, n: int = 8, n_tokens: int = PROMPT_TOKENS) -> list[str]:
    """``n`` fixed prompts: the first ``n_tokens`` tokens of blocks spread over the validation set."""
    texts = [tokenizer.decode(blocks.ids[i * len(blocks) // n, :n_tokens].tolist()) for i in range(n)]
    return [t if t.strip() else "It is a truth universally acknowledged" for t in texts]


def interleaved(jobs: dict, rounds: int) -> dict[object, list[float]]:
    """Seconds of each job (a no-argument callable) over ``rounds`` interleaved rounds, after one untimed
    warm-up of each; the order rotates every round so no job always runs first."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    keys = list(jobs)
    for k in keys:
        jobs[k]()
    times: dict[object, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % len(keys)
        for k in keys[shift:] + keys[:shift]:
            sync()
            t0 = time.perf_counter()
            jobs[k]()
            sync()
            times[k].append(time.perf_counter() - t0)
    return times


def decode_speed(generators: dict, prompts: dict[int, list[str]] | list[str], new_tokens: int,
                 rounds: int) -> dict:
    """Greedy generation tokens/s of every generator at every batch, interleaved rounds, median.

    ``prompts`` is one batch of prompts or ``{batch size: prompts}``; the result is keyed by name, or
    by ``(name, batch size)`` for a dict. EOS is ignored so every row of every model decodes exactly
    ``new_tokens`` tokens: the models do the same work."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    batches = prompts if isinstance(prompts, dict) else {None: prompts}
    counts: dict = {}

    def run(name, bs):
        out = generators[name].generate(batches[bs], params, truncate=True)
        counts[name, bs] = sum(c.completion_tokens for c in out)

    jobs = {(n, bs): (lambda n=n, bs=bs: run(n, bs)) for bs in batches for n in generators}
    times = interleaved(jobs, rounds)
    return {(k if isinstance(prompts, dict) else k[0]): counts[k] / statistics.median(v) for k, v in times.items()}
