"""Teacher-generated training text (sequence-level KD, Kim & Rush 2016): the teacher continues prompts
cut from the training text, and each continuation is appended to a JSONL file with its provenance.

    gpt2-distill augment --out runs/augment/teacher_samples.jsonl --n-samples 512 --temperature 1.0 --top-p 0.95
    gpt2-distill distill --config v2 data.train=austen,runs/augment/teacher_samples.jsonl "data.mix=[0.75, 0.25]"

Run again after a kill, it continues where it stopped; line format, seeding, resuming: docs/design/evaluation.md.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import Field
from tqdm.auto import tqdm

from python3_distillation.config import ConfigError, RunConfig, load_config
from python3_distillation.data import batch_indices, load_blocks
from python3_distillation.device_plan import pick_device
from python3_distillation.errors import DataError
from python3_distillation.generation import Generator, RowInput, SamplingParams, complete_rows
from python3_distillation.lineage import data_fingerprint, weights_sha256
from python3_distillation.models import open_model
from python3_distillation.paths import display_path
from python3_distillation.resumable import append_jsonl, jsonl_rows
from python3_distillation.validation import Checked, Temperature, TopK, TopP


class AugmentSettings(Checked):
    """The sampling of ``gpt2-distill augment``; bounds as every sampling request's, errors naming the flag."""

    error = ConfigError

    n_samples: int = Field(512, ge=1)
    prompt_tokens: int = Field(32, ge=1)  # cut from the start of a training block
    new_tokens: int = Field(96, ge=1)  # at most; a sampled end-of-text token ends the sample earlier
    temperature: Temperature = 1.0
    top_p: TopP = 0.95
    top_k: TopK = 0
    batch_size: int = Field(16, ge=1)  # rows decoded together

    @classmethod
    def label(cls, path: str) -> str:
        return "--" + path.replace("_", "-")

    def validate(self, block_size: int, context: int) -> AugmentSettings:  # type: ignore[override]
        """Check that prompts fit a training block and prompt + continuation the teacher's context."""
        if self.prompt_tokens > block_size:
            raise ConfigError(f"--prompt-tokens {self.prompt_tokens} is longer than a training block ({block_size})")
        if self.prompt_tokens + self.new_tokens > context:
            raise ConfigError(f"--prompt-tokens + --new-tokens = {self.prompt_tokens + self.new_tokens} exceeds the "
                              f"teacher's context of {context} tokens")
        return self


def sample_seed(seed: int, index: int) -> int:
    """Sample ``index``'s sampling seed: a hash of ``train.seed`` and the index (any run, any batch)."""
    return int.from_bytes(hashlib.sha256(f"augment|{seed}|{index}".encode()).digest()[:8], "big")


def _existing_rows(out: Path, run: dict) -> int:
    """How many samples ``out`` already holds (checked against ``run``); a line torn by a kill is cut off."""
    rows = jsonl_rows(out)
    for n, row in enumerate(rows):
        if row.get("index") != n:
            raise DataError(f"{out}:{n + 1}: expected sample {n}; the file is not one `gpt2-distill augment` wrote")
        mine = {k: v for k, v in (row.get("run") or {}).items() if k != "teacher"}
        wanted = {k: v for k, v in run.items() if k != "teacher"}
        if mine != wanted:
            changed = sorted(k for k in wanted.keys() | mine.keys() if mine.get(k) != wanted.get(k))
            raise DataError(f"{out} was sampled with other settings ({', '.join(changed)} differ); continue it with the "
                            "same teacher, data and sampling settings, or write to another --out")
    return len(rows)


def run_augment(cfg: RunConfig, out: str | Path, s: AugmentSettings,
                on_batch: Callable[[int], None] | None = None) -> Path:
    """Append samples to ``out`` until it holds ``s.n_samples`` of them; returns ``out``."""
    out = Path(out)
    teacher_dir = Path(cfg.teacher.path)
    teacher, tokenizer, _ = open_model(teacher_dir, tokenizer=cfg.tokenizer)
    s.validate(cfg.data.block_size, teacher.config.n_positions)
    seed = cfg.train.seed
    blocks = load_blocks(cfg.data, tokenizer, seed=seed)
    train = blocks["train"]
    run = {"teacher": display_path(teacher_dir), "teacher_sha256": weights_sha256(teacher), "data": cfg.data.train,
           "shards": data_fingerprint(blocks), "block_size": cfg.data.block_size, "prompt_tokens": s.prompt_tokens,
           "sampling": {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                        "max_new_tokens": s.new_tokens},
           "train_seed": seed}
    done = _existing_rows(out, run)
    if done >= s.n_samples:
        print(f"{out}: already holds {done} samples (asked for {s.n_samples}); nothing to do", file=sys.stderr)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    gen = Generator(teacher, tokenizer, device=pick_device(), name="teacher")
    t0, new_tokens = time.perf_counter(), 0
    with tqdm(total=s.n_samples, initial=done, desc="augment", unit="sample", dynamic_ncols=True) as bar:
        for start in range(done, s.n_samples, s.batch_size):
            indices = range(start, min(s.n_samples, start + s.batch_size))
            where = {i: int(batch_indices(len(train), 1, i, seed)[0]) for i in indices}  # epoch permutations
            rows = [RowInput(i, "", train.ids[block, :s.prompt_tokens].tolist(),
                             SamplingParams(max_new_tokens=s.new_tokens, temperature=s.temperature, top_p=s.top_p,
                                            top_k=s.top_k, seed=sample_seed(seed, i))) for i, block in where.items()]
            completions = complete_rows(gen, rows)
            samples = []
            for row in rows:
                c = completions[row.key]
                prompt, completion = tokenizer.decode(row.ids), tokenizer.decode(c.token_ids)
                samples.append({
                    "index": row.key, "text": prompt + completion, "prompt": prompt, "completion": completion,
                    "prompt_tokens": len(row.ids), "completion_tokens": c.completion_tokens,
                    "finish_reason": c.finish_reason,
                    "source": {"block": where[row.key], "token_offset": where[row.key] * cfg.data.block_size},
                    "seed": row.params.seed, "run": run})
                new_tokens += c.completion_tokens
            append_jsonl(out, samples, sync=True)  # a kill after this point loses nothing of this batch
            bar.update(len(rows))
            if on_batch is not None:
                on_batch(indices[-1] + 1)
    print(f"{out}: {s.n_samples} samples ({s.n_samples - done} new, {new_tokens:,} tokens sampled in "
          f"{time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpt2-distill augment", description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=None, metavar="FILE",
                   help="YAML config naming the teacher (teacher.path), the data and train.seed; repeatable")
    p.add_argument("--out", required=True, metavar="FILE", help="JSONL file to append to (resumed when it exists)")
    for name, what in (("n_samples", "samples in the file"),
                       ("prompt_tokens", "prompt length, cut from a training block"),
                       ("new_tokens", "tokens per continuation"), ("temperature", ""), ("top_p", ""),
                       ("top_k", "0 = off"), ("batch_size", "rows decoded together")):
        default = getattr(AugmentSettings(), name)
        p.add_argument(AugmentSettings.label(name), type=type(default), default=default,
                       help=f"{what} (default {default})".strip())
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. teacher.path=my/teacher")
    args = p.parse_args(argv)
    cfg = load_config(args.config or [], args.overrides)
    settings = AugmentSettings(**{k: getattr(args, k) for k in AugmentSettings.model_fields})
    run_augment(cfg, args.out, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
