"""Model cards (the README.md inside every saved model folder) and the markdown the reports are written in.

    python -m python3_distillation report      # rewrites the cards with speed, size and fidelity too
"""

from __future__ import annotations

from pathlib import Path

from python3_distillation.config import RunConfig


def fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    """The lines of a markdown table; ``align``: ``l`` or ``r`` per column (default: first left, rest right)."""
    rule = "|".join("---" if a == "l" else "---:" for a in align or "l" + "r" * (len(header) - 1))
    return [f"| {' | '.join(header)} |", f"|{rule}|", *(f"| {' | '.join(r)} |" for r in rows)]


def model_card(name: str, meta: dict, cfg: RunConfig | None = None, measured: dict | None = None,
               folder: str | None = None) -> str:
    """Markdown card: lineage, shape, training, validation perplexity, and (when measured) speed."""
    folder = folder or (Path(cfg.output_dir).name if cfg is not None else "path/to/this/folder")
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [gpt2, distillation]", "---",
             f"# {name}", ""]
    if meta.get("stage") == "teacher":
        lines.append(f"GPT-2 teacher, {meta.get('init', '')}.")
    elif meta.get("stage") == "prune":
        p = meta.get("student_init", {})
        lines.append(f"Pruned from `{meta.get('source')}` (`gpt2-distill prune`): blocks {p.get('layers')} kept, "
                     f"{p.get('n_inner')} MLP neurons each, {p.get('block_params_removed', 0):.1%} of the block "
                     "parameters removed; not trained since (recover it with `gpt2-distill distill` and "
                     "student.init=pruned).")
    else:
        init = meta.get("student_init", {})
        how = {"teacher": f"initialised from teacher blocks {init.get('layers')} + embeddings + final norm",
               "base": f"initialised from the teacher's base checkpoint {init.get('base', '')}",
               "random": "randomly initialised",
               "pruned": f"initialised from the pruned model `{init.get('from')}`"}.get(init.get("init"), str(init))
        if init.get("note"):
            how += f" ({init['note']})"
        divergence = "KL" if meta.get("loss", "forward_kl") == "forward_kl" else meta["loss"]
        kd = (f"{divergence} soft targets at T={meta.get('temperature')} (alpha_kd={meta.get('alpha_kd')}, "
              f"alpha_ce={meta.get('alpha_ce')}, alpha_cos={meta.get('alpha_cos')})" if meta.get("alpha_kd")
              else "labels only (CE baseline, alpha_kd=0)")
        lines.append(f"Student distilled from `{meta.get('teacher')}` with {kd}; {how}.")
    lines += ["", "| | |", "|---|---|", f"| parameters | {meta.get('n_params', 0) / 1e6:.2f}M "
              f"({meta.get('n_layer')} layers × {meta.get('n_embd')}) |"]
    if meta.get("stage") != "prune":
        lines.append(f"| training | {meta.get('train_steps')} steps, {meta.get('train_tokens', 0):,} tokens, "
                     f"{fmt(meta.get('train_seconds'), '.0f')} s on `{meta.get('data')}` |")
    lines.append(f"| validation perplexity | {fmt(meta.get('val_ppl'))} |")
    if meta.get("precision"):
        lines.append(f"| trained in | {meta['precision'].get('label')} ({meta['precision'].get('reason')}) |")
    for key, label, spec in (("seed", "seed", ""), ("teacher_val_ppl", "teacher validation perplexity", ".2f")):
        if meta.get(key) is not None:
            lines.append(f"| {label} | {fmt(meta[key], spec)} |")
    for key, label, spec in (("size_mb", "size on disk (MB)", ".1f"),
                             ("top1_teacher", "top-1 agreement with the teacher", ".3f"),
                             ("kl_teacher", "mean KL(teacher ‖ model) per position", ".3f"),
                             ("tok_s_b1", "generation, batch 1 (tokens/s)", ".1f"),
                             ("tok_s_b8", "generation, batch 8 (tokens/s)", ".1f"), ("device", "measured on", "")):
        if (measured or {}).get(key) is not None:
            lines.append(f"| {label} | {fmt(measured[key], spec)} |")
    lines += ["", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'tok = AutoTokenizer.from_pretrained("{folder}"); '
              f'model = AutoModelForCausalLM.from_pretrained("{folder}")', "```", ""]
    if meta.get("quantization"):
        lines += [
            "int8 weights (one scale per output channel) in the compressed-tensors format: the snippet above "
            "needs the `compressed-tensors` package and gives fp32 weights equal to scale × int8 (fp32 speed). "
            "To keep them int8 and decode with the int8 kernel, load it with this project:", "",
            "```python", "from python3_distillation.models import open_model",
            f'model, tokenizer, meta = open_model("{folder}")', "```", ""]
    if cfg is not None:
        lines.append("The resolved training config is in `distill_config.yaml` beside this card.")
    return "\n".join(lines) + "\n"
