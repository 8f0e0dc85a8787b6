"""Command line generation with a trained model: one prompt, a few, or a whole file of them.

    HF_HUB_OFFLINE=1 python python3_distillation/distill_infer_v2.py "It is a truth" --max-new-tokens 40 --seed 1

``distill_infer*.py`` and ``gpt2-distill infer`` call :func:`main`; :func:`add_arguments` and :func:`run`
let another parser reuse the options. File formats and input errors: README.md, "Inference".
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import textwrap
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

from tqdm import tqdm

from python3_distillation.errors import EXIT_BAD_INPUT, BadInput, ConfigError, DataError, GenerationError, ModelError
from python3_distillation.generation import Generator, SamplingParams
from python3_distillation.paths import model_arg, model_dir
from python3_distillation.validation import Stop, Text

MODEL_LABELS = {"v1": "the v1 student", "v2": "the v2 student", "teacher": "the teacher"}
SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "stop", "seed", "ignore_eos")

EPILOG = """\
prompts longer than the model's context (minus --max-new-tokens) are truncated from the left,
keeping their end, with a warning on stderr.

--prompts-file takes .txt (one prompt a line, blank lines skipped) or .jsonl, one object a line:
  {"prompt": "It is a truth", "temperature": 0.7, "max_new_tokens": 32, "stop": ["\\n"]}
(any sampling field overrides the command line flags for that line). Results are JSON lines
  {"prompt", "completion", "prompt_tokens", "completion_tokens", "seconds", "finish_reason"}
on stdout or in --output, in input order; a malformed line is reported as FILE:LINE and skipped.

examples:
  distill_infer_v2.py "It is a truth universally acknowledged" --seed 1
  distill_infer_v2.py "It is a truth" --temperature 0 --max-new-tokens 20 --stream
  distill_infer_v2.py "It is a truth" --compare            # teacher and student side by side
  distill_infer.py --prompts-file prompts.jsonl --output results.jsonl --batch-size 16
exit status: 0 ok, 2 bad input (one line on stderr)."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump) with exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def add_arguments(p: argparse.ArgumentParser, default_model: str = "v2") -> argparse.ArgumentParser:
    """Add the inference options to ``p`` (for ``gpt2-distill infer`` or the entry scripts)."""
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt(s) to continue")
    p.add_argument("--model", metavar="DIR", default=None, help="model folder or name, e.g. v2_int8 (default: "
                   f"{MODEL_LABELS.get(default_model, default_model)}, {model_dir(default_model)})")
    p.add_argument("--prompts-file", metavar="FILE", help="a .txt or .jsonl file of prompts (see below)")
    p.add_argument("--output", "-o", metavar="FILE", help="write JSON lines here instead of stdout")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="prompts decoded together (default 8)")
    g = p.add_argument_group("sampling (defaults: those of the server API)")
    g.add_argument("--max-new-tokens", type=int, metavar="N", help="tokens to generate at most (default 64)")
    g.add_argument("--temperature", type=float, metavar="T", help="0 = greedy (default 1.0)")
    g.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest tokens; 0 = off (default)")
    g.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling, in (0, 1]; 1 = off (default)")
    g.add_argument("--repetition-penalty", type=float, metavar="R", help="> 1 discourages repeats; 1 = off (default)")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text (repeatable)")
    g.add_argument("--seed", type=int, help="same seed → same text (default: random)")
    g.add_argument("--ignore-eos", action="store_true", default=None,
                   help="the end-of-text token does not end a prompt's text: always --max-new-tokens tokens")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--compare", action="store_true",
                   help="also run the teacher; show both continuations side by side with their tokens/s")
    p.add_argument("--teacher", metavar="DIR", default=None,
                   help=f"teacher folder for --compare (default: {model_dir('teacher')})")
    p.add_argument("--device", help="cpu, cuda, cuda:1… (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="load the weights in this dtype")
    p.set_defaults(default_model=default_model)
    return p


class PromptLine(SamplingParams):
    """One line of ``--prompts-file`` JSONL: a prompt and any sampling field, bounded as the server's requests."""

    stop: Stop = []
    prompt: Text


@dataclass
class Item:
    """One prompt to complete; ``where`` names it in messages (``file:line`` or ``prompt 2``)."""

    where: str
    prompt: str
    params: SamplingParams
    line: int = 0  # line in the prompts file, to report errors in file order


def read_prompts_file(path: Path, base: dict[str, Any]) -> tuple[list[Item], list[tuple[int, str]]]:
    """Items of a .txt / .jsonl file and the one-line errors of its bad lines (JSONL: bounded as requests)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"prompts file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read prompts file {path}: {e}") from None
    items, errors = [], []
    jsonl = path.suffix.lower() == ".jsonl"
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                prompt, params = _jsonl_line(line, base) if jsonl else (line, SamplingParams.from_dict(base))
                items.append(Item(f"{path}:{n}", prompt, params, n))
            except BadInput as e:
                errors.append((n, f"{path}:{n}: {e}"))
    return items, errors


def _jsonl_line(line: str, base: dict[str, Any]) -> tuple[str, SamplingParams]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object with a \"prompt\", got {type(obj).__name__}")
    prompt = obj.pop("prompt", None)
    if not isinstance(prompt, str):
        raise DataError("needs a \"prompt\" string")
    return prompt, PromptLine.check({**base, **obj, "prompt": prompt}).params()


def check_items(gen, items: list[Item], errors: list[tuple[int, str]]) -> list[Item]:
    """Items whose prompt the model can take; warns about those it will truncate, reports the rest."""
    ok = []
    for it in items:
        try:  # checked before counting: a prompt the tokenizer refuses (a lone surrogate) is an error, not a crash
            gen.check_prompt(it.prompt, it.params, truncate=True)
        except GenerationError as e:
            errors.append((it.line, f"{it.where}: {e}"))
            continue
        n, room = len(gen.encode(it.prompt)), gen.context_length - it.params.max_new_tokens
        if n > room:
            print(f"warning: {it.where}: prompt is {n} tokens, more than the {room} that fit with "
                  f"{it.params.max_new_tokens} new tokens in the context of {gen.context_length}; "
                  f"keeping its last {room}", file=sys.stderr)
        ok.append(it)
    return ok


def record(c) -> dict[str, Any]:
    return {"prompt": c.prompt, "completion": c.text, "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens, "seconds": round(c.seconds, 4), "finish_reason": c.finish_reason}


def tokens_per_second(c) -> float:
    return c.completion_tokens / c.seconds if c.seconds > 0 else 0.0


def side_by_side(left_title: str, left: str, right_title: str, right: str) -> str:
    """Two texts in columns under their titles, wrapped to the terminal width."""
    col = max(20, (shutil.get_terminal_size((120, 24)).columns - 3) // 2)

    def wrap(text: str) -> list[str]:  # paragraphs kept, an empty one as an empty line
        return [ln for para in text.split("\n") for ln in textwrap.wrap(para, col, replace_whitespace=False) or [""]]

    rows = [(left_title, right_title), ("-" * min(col, len(left_title)), "-" * min(col, len(right_title)))]
    rows += list(zip_longest(wrap(left), wrap(right), fillvalue=""))
    return "\n".join(f"{a:<{col}} | {b}".rstrip() for a, b in rows)


def describe(label: str, gen, c) -> str:
    return (f"{label} {gen.name}: {c.completion_tokens} tokens, {tokens_per_second(c):.1f} tok/s, "
            f"{c.finish_reason}")


def load_generator(args: argparse.Namespace, flag: str, default: str):
    """The model of ``--model`` / ``--teacher`` (``flag``), else the one ``default`` names."""
    folder = model_arg(getattr(args, flag)) if getattr(args, flag) else model_dir(default)
    if not folder.is_dir():
        what = "teacher " if flag == "teacher" else "" if args.model else "student "
        raise ModelError(f"{what}model folder {folder} not found; `make run` creates it (or pass --{flag} DIR)")
    return Generator.from_pretrained(folder, device=args.device, dtype=args.dtype)


def completed(gen, teacher, items: list[Item], size: int):
    """``(item, completion, teacher's completion or None)`` in input order, decoding ``size`` prompts together."""
    for i in range(0, len(items), size):
        chunk = items[i:i + size]
        prompts, params = [it.prompt for it in chunk], [it.params for it in chunk]
        done = gen.generate(prompts, params, truncate=True)
        theirs = teacher.generate(prompts, params, truncate=True) if teacher is not None else [None] * len(done)
        yield from zip(chunk, done, theirs)


def streamed(gen, items: list[Item]):
    """Like :func:`completed`, one prompt at a time, writing each prompt and its text to stdout as it comes."""
    for k, it in enumerate(items):
        print(("\n" if k else "") + it.prompt, end="", flush=True)
        c = None
        for ev in gen.stream_batch([it.prompt], it.params, truncate=True):
            print(ev.text, end="", flush=True)
            c = ev.completion or c
        print()
        yield it, c, None


def run_prompts(args, gen, teacher, items: list[Item]) -> None:
    """Prompts from the command line: printed as text (streamed or whole), or side by side with the teacher."""
    # --compare decodes each prompt alone, so each model's tokens/s are its own
    results = (streamed(gen, items) if args.stream
               else completed(gen, teacher, items, 1 if teacher is not None else args.batch_size))
    for k, (it, c, t) in enumerate(results):
        if t is None:
            if not args.stream:
                print(("\n" if k else "") + it.prompt + c.text)
            print(f"[{describe('', gen, c).strip()}, {c.seconds:.2f} s]", file=sys.stderr)
            continue
        print(("\n" if k else "") + f"prompt: {it.prompt}\n")
        print(side_by_side(describe("teacher", teacher, t), t.text, describe("student", gen, c), c.text))
        if t.seconds > 0 and c.seconds > 0:
            ratio = tokens_per_second(c) / max(tokens_per_second(t), 1e-9)
            print(f"\nstudent speed: {ratio:.2f}× the teacher's tokens/s")


def flag_params(base: dict[str, Any]) -> SamplingParams:
    """The sampling flags as SamplingParams; an error names the flag the user typed (``--top-p``), not the field."""
    try:
        return SamplingParams.from_dict(base)
    except GenerationError as e:
        field = (e.param or "").split(".")[0].split("[")[0]
        if not field or not e.message.startswith(field):
            raise
        raise GenerationError("--" + field.replace("_", "-") + e.message[len(field):], param=e.param) from None


def run(args: argparse.Namespace) -> int:
    """Carry out arguments parsed by a parser given :func:`add_arguments`."""
    errors: list[tuple[int, str]] = []
    try:
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
        if not args.prompts and not args.prompts_file:
            raise ConfigError("no prompt: give one as an argument or use --prompts-file FILE")
        if args.stream and (args.prompts_file or args.compare or args.output):
            raise ConfigError("--stream prints prompts given as arguments; it does not combine with "
                              "--prompts-file, --output or --compare")
        base = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}  # unset: the defaults
        cli_params = flag_params(base)
        if args.compare and cli_params.seed is None and cli_params.temperature > 0:
            # One seed for both models, so a rerun with it shows the same pair.
            base["seed"] = random.randrange(2**31)
            cli_params = flag_params(base)
        if empty := [k for k, prompt in enumerate(args.prompts, 1) if not prompt.strip()]:
            raise GenerationError(f"prompt {empty[0]} is empty" if len(args.prompts) > 1 else "prompt is empty")
        items = [Item(f"prompt {k}", prompt, cli_params) for k, prompt in enumerate(args.prompts, 1)]
        if args.prompts_file:
            file_items, errors = read_prompts_file(Path(args.prompts_file), base)
            items += file_items
        gen = load_generator(args, "model", args.default_model)
        teacher = load_generator(args, "teacher", "teacher") if args.compare else None
        items = check_items(gen, items, errors)
        if args.prompts_file or args.output:  # one JSON line per item, in input order
            with (open(args.output, "w", encoding="utf-8") if args.output else nullcontext(sys.stdout) as out,
                  tqdm(total=len(items), file=sys.stderr, unit="prompt", desc=gen.name, dynamic_ncols=True) as bar):
                for _, c, t in completed(gen, teacher, items, args.batch_size):
                    rec = record(c)
                    if t is not None:
                        rec["teacher"] = {k: v for k, v in record(t).items() if k != "prompt"}
                    print(json.dumps(rec, ensure_ascii=False), file=out, flush=True)
                    bar.update()
        else:
            run_prompts(args, gen, teacher, items)
    except BadInput as e:
        errors.append((0, str(e)))
    for _, msg in sorted(errors, key=lambda e: e[0]):
        print(f"error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT if errors else 0


def main(argv: list[str] | None = None, default_model: str = "v2", prog: str | None = None) -> int:
    """Entry point of ``distill_infer*.py`` and ``gpt2-distill infer``; returns the exit status."""
    if argv is None:  # run as a script: name it as invoked
        prog = prog or Path(sys.argv[0]).name
        argv = sys.argv[1:]
    prog = prog or ("gpt2-distill infer" if default_model == "v2" else f"distill_infer ({default_model})")
    try:
        p = _Parser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                    description="Continue prompts with a GPT-2 model "
                                f"(default: {MODEL_LABELS.get(default_model, default_model)}).")
        args = add_arguments(p, default_model).parse_args(argv)
    except SystemExit as e:  # --help, or a one-line usage error
        return int(e.code or 0)
    from transformers.utils import logging as hf_logging

    gen_log = logging.getLogger("python3_distillation.generation")
    level, hf_verbosity, hf_bars = gen_log.level, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    # The CLI prints its own truncation warnings, naming the prompt: silence the library's copy. Keep stderr
    # to our lines and the batch bar: no loading bars or notices from transformers.
    gen_log.setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return run(args)
    finally:
        gen_log.setLevel(level)
        hf_logging.set_verbosity(hf_verbosity)
        if hf_bars:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    raise SystemExit(main())
