"""Measuring models: perplexity, fidelity to a reference model, decode speed, FLOPs, size on disk.

    python -c "from python3_distillation.evaluation.measure import forward_flops_per_token as f; print(f(12, 768, 50257, 64))"

Pure measurements, shared by the report (report.py) and the benchmarks. Compared things are timed
interleaved in one process (``interleaved``) so drift on a shared machine hits them all alike.
Softmaxes and KLs run on the model's device in fp32; only the reduced sums come back to the host,
once per call (on CPU the same operations in the same order: the same numbers as before).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch

from python3_distillation.data import Blocks

EVAL_BATCH = 8
PROMPT_TOKENS = 16  # length of each prompt cut from the validation text


# ------------------------------------------------------------------------------------- size, FLOPs

def weights_bytes(path: str | Path) -> int:
    """Size of the weights file(s) in a model folder (``*.safetensors``, else ``*.bin``)."""
    path = Path(path)
    files = list(path.glob("*.safetensors")) or list(path.glob("*.bin"))
    return sum(f.stat().st_size for f in files)


def non_embedding_params(n_layer: int, n_embd: int, n_inner: int | None = None) -> int:
    """GPT-2 parameters outside the token/position embeddings: blocks + final norm.

    Per block: attention qkv (d·3d + 3d) and output (d² + d), MLP (d·f + f, f·d + d), two norms (4d).
    """
    d, f = n_embd, n_inner or 4 * n_embd
    per_block = 3 * d * d + 3 * d + d * d + d + d * f + f + f * d + d + 4 * d
    return n_layer * per_block + 2 * d


def forward_flops_per_token(n_layer: int, n_embd: int, vocab: int, ctx: float, n_inner: int | None = None) -> float:
    """Forward FLOPs for one token at context ``ctx``: 2·(non-embedding params + LM head) + 2·n_layer·ctx·n_embd.

    The LM head (``n_embd × vocab``, tied to the token embedding) is a real matrix product per token,
    so it is counted; the embedding lookups are not. The last term is attention's QKᵀ and AV.
    """
    return 2.0 * (non_embedding_params(n_layer, n_embd, n_inner) + n_embd * vocab) + 2.0 * n_layer * ctx * n_embd


def model_flops_per_token(config, ctx: float) -> float:
    return forward_flops_per_token(config.n_layer, config.n_embd, config.vocab_size, ctx, getattr(config, "n_inner", None))


def device_label(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    n = torch.get_num_threads()
    return f"CPU, {n} thread{'s' if n > 1 else ''} (torch {torch.__version__})"


# ------------------------------------------------------------------------------------ quality

def model_device(model) -> torch.device:
    p = next(iter(model.parameters()), None)
    if p is None:
        p = next(iter(model.buffers()))
    return p.device


def perplexity(model, blocks: Blocks, batch_size: int = EVAL_BATCH, device=None) -> tuple[float, float]:
    """(mean next-token loss in nats, its exp) over every block, fp32, no autocast."""
    from python3_distillation.train import evaluate_loss

    loss = evaluate_loss(model, blocks, batch_size, 0, device=device or model_device(model))
    return loss, math.exp(min(loss, 50.0))


@torch.no_grad()
def fidelity(model, reference, blocks: Blocks, batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """How closely ``model`` imitates ``reference`` on ``blocks`` (every position, fp32):

    ``top1``: share of positions where both pick the same most likely next token;
    ``kl``: mean KL(reference ‖ model) in nats per position (T = 1).
    """
    import torch.nn.functional as F

    was = model.training, reference.training
    model.eval()
    reference.eval()
    dev, ref_dev = model_device(model), model_device(reference)
    # Sums on the model's device (fp64, the arithmetic of the Python floats they replace), read once.
    agree, kl, count = torch.zeros((), dtype=torch.int64, device=dev), torch.zeros((), dtype=torch.float64, device=dev), 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks.ids[torch.arange(start, min(len(blocks), start + batch_size))]
        s = model(input_ids=ids.to(dev)).logits.float()
        t = reference(input_ids=ids.to(ref_dev)).logits.float().to(dev)
        agree += (s.argmax(-1) == t.argmax(-1)).sum()
        logp_t, logp_s = F.log_softmax(t, -1), F.log_softmax(s, -1)
        kl += (logp_t.exp() * (logp_t - logp_s)).sum().double()
        count += ids.numel()
    model.train(was[0])
    reference.train(was[1])
    return {"top1": int(agree) / max(1, count), "kl": float(kl) / max(1, count)}


@torch.no_grad()
def quality(models: dict, blocks: Blocks, reference: str | None = None, batch_size: int = EVAL_BATCH,
            device=None) -> dict[str, dict[str, float]]:
    """Perplexity of every model and, with ``reference`` (a key of ``models``), each one's fidelity
    to it, in ONE pass over ``blocks``: each batch runs every model once and the reference's
    log-probabilities are shared, where separate ``perplexity`` and ``fidelity`` calls would run the
    reference once more per model. Same numbers as those two (fp32, no autocast)."""
    import torch.nn.functional as F

    from python3_distillation.losses import lm_loss

    states = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    # Each model's sums live on its device (fp64, the arithmetic of the Python floats they replace)
    # and are read back once at the end; the reference's log-probabilities move only when a model
    # sits on another device.
    devices = {k: torch.device(device) if device is not None else model_device(m) for k, m in models.items()}
    acc = {k: torch.zeros(3, dtype=torch.float64, device=devices[k]) for k in models}  # loss, top1, kl sums
    targets = positions = 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks.ids[torch.arange(start, min(len(blocks), start + batch_size))]
        ref = None
        if reference is not None:
            ref_logits = models[reference](input_ids=ids.to(devices[reference])).logits
            ref = F.log_softmax(ref_logits.float(), -1)
        for k, m in models.items():
            on = ids.to(devices[k])
            logits = m(input_ids=on).logits.float()
            acc[k][0] += lm_loss(logits, on).double() * ids[:, 1:].numel()
            if ref is not None and k != reference:
                r = ref.to(logits.device)
                logp = F.log_softmax(logits, -1)
                acc[k][1] += (logits.argmax(-1) == r.argmax(-1)).sum()
                acc[k][2] += (r.exp() * (r - logp)).sum().double()
        targets += ids[:, 1:].numel()
        positions += ids.numel()
    for k, m in models.items():
        m.train(states[k])
    sums = {k: dict(zip(("loss", "top1", "kl"), a.tolist())) for k, a in acc.items()}
    out = {}
    for k, s in sums.items():
        loss = s["loss"] / max(1, targets)
        out[k] = {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
        if reference is not None:
            out[k].update(top1=1.0 if k == reference else s["top1"] / max(1, positions),
                          kl=0.0 if k == reference else s["kl"] / max(1, positions))
    return out


def validation_prompts(tokenizer, blocks: Blocks, n: int = 8, n_tokens: int = PROMPT_TOKENS) -> list[str]:
    """``n`` fixed prompts: the first ``n_tokens`` tokens of blocks spread over the validation set."""
    prompts = []
    for i in range(n):
        ids = blocks.ids[i * len(blocks) // n, :n_tokens].tolist()
        text = tokenizer.decode(ids)
        prompts.append(text if text.strip() else "It is a truth universally acknowledged")
    return prompts


# -------------------------------------------------------------------------------------- speed

def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(jobs: dict, rounds: int) -> dict[object, list[float]]:
    """Seconds of each job (a no-argument callable) over ``rounds`` interleaved rounds.

    One untimed warm-up of each first; the order rotates every round so no job always runs first.
    """
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
    ``new_tokens`` tokens: the models do the same work.
    """
    from python3_distillation.generation import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    batches = prompts if isinstance(prompts, dict) else {None: prompts}
    counts: dict = {}

    def job(name, bs):
        def f():
            out = generators[name].generate(batches[bs], params, truncate=True)
            counts[name, bs] = sum(c.completion_tokens for c in out)
        return f

    jobs = {(n, bs): job(n, bs) for bs in batches for n in generators}
    times = interleaved(jobs, rounds)
    return {(k if isinstance(prompts, dict) else k[0]): counts[k] / statistics.median(v) for k, v in times.items()}
