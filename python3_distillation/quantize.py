"""Quantize a model folder to int8 (int8.py: the kernel and the folder format), with lineage, card and measurement.

    gpt2-distill quantize python3_distillation/gpt2_student_v2            # → python3_distillation/gpt2_student_v2_int8
    python python3_distillation/distill_infer_v2.py --model python3_distillation/gpt2_student_v2_int8 "Emma"

A folder of the old ``gpt2_distill_int8`` format is rewritten in the standard one, in place by
default, losslessly. The folder's contents: README.md, "Smaller and faster: int8 and narrow students".
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from python3_distillation.config import saved_config
from python3_distillation.data import Blocks, load_blocks
from python3_distillation.errors import BadInput, ModelError
from python3_distillation.evaluation.cards import model_card
from python3_distillation.evaluation.measure import quality, weights_bytes
from python3_distillation.int8 import (LEGACY_METHOD, QUANT_METHOD, SCHEME, is_int8_dir, quantization_config,
                                       quantize_model)
from python3_distillation.lineage import process_seconds, weights_sha256
from python3_distillation.models import count_parameters, is_model_dir, open_model, save_model, update_model_files
from python3_distillation.paths import display_path

log = logging.getLogger(__name__)


def run_quantize(src: str | Path, out: str | Path | None = None, head: bool = True, measure: bool = True) -> Path:
    """Quantize the model folder ``src`` → ``out`` (default ``<src>_int8``) with meta and card."""
    src = Path(src)
    if not is_model_dir(src):
        raise ModelError(f"{src}: not a model folder (no config.json); train one first (`make run`)")
    if quantization_config(src).get("quant_method") == LEGACY_METHOD:
        return rewrite_legacy(src, out)
    if is_int8_dir(src):
        raise ModelError(f"{src}: already an int8 model")
    out = Path(out) if out else src.with_name(f"{src.name}_int8")
    if out.resolve() == src.resolve():
        raise ModelError("--out must differ from the source folder")
    model, tokenizer, source_meta = open_model(src)
    meta = {k: v for k, v in source_meta.items() if k not in ("weights_sha256", "fingerprint", "val_loss", "val_ppl")}
    meta.update(stage="quantize", source=display_path(src), source_sha256=weights_sha256(model),
                n_params=source_meta.get("n_params") or count_parameters(model),
                quantization={"scheme": SCHEME, "method": QUANT_METHOD, "head": head})
    qmodel = quantize_model(model, head=head)
    meta["weights_sha256"] = weights_sha256(qmodel)
    if measure:
        meta.update(_measure(qmodel, open_model(src).model, tokenizer, src))
    save_model(qmodel, tokenizer, out, meta=meta, card="", copy_from=src)
    meta["size_mb"], meta["source_size_mb"] = weights_bytes(out) / 1e6, weights_bytes(src) / 1e6
    meta["stage_seconds"] = process_seconds()
    name = f"{source_meta.get('name') or src.name} (int8)"
    update_model_files(out, meta=meta, card=model_card(name, meta, None, {"size_mb": meta["size_mb"]}, folder=out.name))
    ppl = (f", validation perplexity {meta['val_ppl']:.2f} (fp32 {meta['source_val_ppl']:.2f}) on the first "
           f"{meta['eval_blocks']} validation blocks" if "val_ppl" in meta else "")
    print(f"int8 model saved to {out}: {meta['size_mb']:.1f} MB (fp32 {meta['source_size_mb']:.1f} MB){ppl}")
    return out


def rewrite_legacy(src: str | Path, out: str | Path | None = None) -> Path:
    """A ``gpt2_distill_int8`` folder rewritten in the compressed-tensors format (in place by default):
    the same int8 numbers and scales, so the project's logits do not change."""
    src = Path(src)
    out = Path(out) if out else src
    model, tokenizer, meta = open_model(src)  # everything is in memory before the folder is replaced
    card = (src / "README.md").read_text(encoding="utf-8") if (src / "README.md").exists() else ""
    meta.setdefault("quantization", {}).update(method=QUANT_METHOD, rewritten_from=LEGACY_METHOD)
    save_model(model, tokenizer, out, meta=meta, card=card, copy_from=src)
    print(f"{src}: rewritten as a compressed-tensors int8 folder at {out} (same int8 weights)")
    return out


def _measure(qmodel, fmodel, tokenizer, src: Path, max_blocks: int = 32) -> dict:
    """Perplexity of both and their top-1 agreement on the source's validation blocks (when its data is here)."""
    cfg = saved_config(src)
    if cfg is None:
        return {}
    try:
        val = load_blocks(cfg.data, tokenizer, seed=cfg.train.seed)["validation"]
    except BadInput as e:
        log.warning("quantize: perplexity not measured (%s)", e)
        return {}
    blocks = Blocks(val.ids[:min(max_blocks, len(val))])
    q = quality({"int8": qmodel, "fp32": fmodel}, blocks, reference="fp32")
    return {"val_ppl": q["int8"]["ppl"], "source_val_ppl": q["fp32"]["ppl"], "top1_vs_source": q["int8"]["top1"],
            "kl_vs_source": q["int8"]["kl"], "eval_blocks": len(blocks)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpt2-distill quantize", description=__doc__.splitlines()[0])
    p.add_argument("model", metavar="MODEL_DIR", help="a model folder (e.g. python3_distillation/gpt2_student_v2); "
                   "an int8 folder of the old gpt2_distill_int8 format is rewritten in the standard one")
    p.add_argument("--out", metavar="DIR", help="output folder (default: MODEL_DIR_int8; an old int8 folder: itself)")
    p.add_argument("--keep-head-fp32", action="store_true",
                   help="leave the tied embedding / LM head in fp32 (larger file, slightly closer to fp32)")
    p.add_argument("--no-measure", action="store_true", help="skip the perplexity/agreement measurement")
    args = p.parse_args(argv)
    run_quantize(args.model, args.out, head=not args.keep_head_fp32, measure=not args.no_measure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
