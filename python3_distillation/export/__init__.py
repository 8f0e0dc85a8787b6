"""Run a student elsewhere: a model folder as a GGUF file (llama.cpp, Ollama) or an ONNX decoder (ONNX Runtime).

    gpt2-distill export python3_distillation/gpt2_student_v2 --to gguf --type q8_0   # → gpt2_student_v2-q8_0.gguf
    gpt2-distill export python3_distillation/gpt2_student_v2 --to onnx [--int8]      # → gpt2_student_v2_onnx/

Sources, outputs (complete or not at all) and engines: README.md, "Run your student elsewhere"; why an
int8 folder is refused: docs/design/generation.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from python3_distillation.errors import BadInput, ModelError
from python3_distillation.export.to_gguf import TYPES, write_gguf
from python3_distillation.export.to_onnx import write_onnx
from python3_distillation.int8 import quantization_config
from python3_distillation.models import check_vocab, is_model_dir, open_model

TARGETS = ("gguf", "onnx")


def run_export(src: str | Path, to: str, kind: str | None = None, out: str | Path | None = None) -> Path:
    """Export the model folder ``src`` to ``to`` (gguf: kind f32/f16/q8_0; onnx: kind fp32/int8) → the output path."""
    src = Path(src)
    if to not in TARGETS:
        raise BadInput(f"--to {to!r}: expected one of {', '.join(TARGETS)}")
    kind = kind or ("f32" if to == "gguf" else "fp32")
    allowed = TYPES if to == "gguf" else ("fp32", "int8")
    if kind not in allowed:
        raise BadInput(f"--type {kind!r} for {to}: expected one of {', '.join(allowed)}")
    default = f"{src.name}-{kind}.gguf" if to == "gguf" else f"{src.name}_onnx" + ("_int8" if kind == "int8" else "")
    out = Path(out) if out else src.with_name(default)
    if out.resolve() == src.resolve():
        raise BadInput("--out must differ from the source folder")
    # Fail before the minutes of work when the output's folder cannot be made or written.
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir():
        raise BadInput(f"{out}: cannot write there ({parent} is a file, not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"{out}: cannot write there ({parent} is not writable)")
    if not is_model_dir(src):
        raise ModelError(f"{src}: not a model folder (no config.json); train one first (`make run`)")
    if q := quantization_config(src):
        raise ModelError(f"{src}: a quantized folder ({q.get('quant_method')}); export the fp32 folder it was made "
                         "from, and pick the 8-bit type there (--type q8_0 for GGUF, --int8 for ONNX)")
    model, tokenizer, _ = open_model(src, dtype=torch.float32)
    check_vocab(tokenizer, model)
    try:  # OS errors while writing (a full disk, a file in the way) as one-line input errors
        if to == "gguf":
            write_gguf(model, tokenizer, out, kind, name=src.name)
            print(f"GGUF ({kind}) written to {out}: {out.stat().st_size / 1e6:.1f} MB")
            return out
        write_onnx(model, tokenizer, out, int8=kind == "int8")
    except OSError as e:
        what = "GGUF file" if to == "gguf" else "ONNX folder"
        raise BadInput(f"{out}: cannot write the {what} ({e.strerror or e})") from None
    size = sum(f.stat().st_size for f in out.glob("model.onnx*"))
    print(f"ONNX decoder ({kind}, KV cache) written to {out}: {size / 1e6:.1f} MB")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpt2-distill export", description=__doc__.splitlines()[0])
    p.add_argument("model", metavar="MODEL_DIR",
                   help="an fp32 model folder (e.g. python3_distillation/gpt2_student_v2)")
    p.add_argument("--to", required=True, choices=TARGETS, help="gguf (llama.cpp, Ollama) or onnx (ONNX Runtime)")
    p.add_argument("--type", dest="kind", metavar="TYPE",
                   help="gguf: f32 (default), f16 or q8_0; onnx: fp32 (default) or int8")
    p.add_argument("--int8", action="store_true", help="onnx: the same as --type int8 (ONNX Runtime quantize_dynamic)")
    p.add_argument("--out", metavar="PATH", help="output file (gguf) or folder (onnx); default beside MODEL_DIR")
    args = p.parse_args(argv)
    if args.int8 and (args.to != "onnx" or args.kind not in (None, "int8")):
        raise BadInput("--int8 is for --to onnx (for GGUF use --type q8_0)")
    run_export(args.model, args.to, "int8" if args.int8 else args.kind, args.out)
    return 0
