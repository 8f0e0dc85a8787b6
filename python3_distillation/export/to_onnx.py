"""A model folder as an ONNX decoder with a KV cache (ONNX Runtime, transformers.js, ORT GenAI-style runners).

    gpt2-distill export python3_distillation/gpt2_student_v2 --to onnx            # → ..._v2_onnx/model.onnx
    gpt2-distill export python3_distillation/gpt2_student_v2 --to onnx --int8     # → ..._v2_onnx_int8/ (ORT int8)

One graph for the prompt and every next token (optimum's GPT-2 names): docs/design/generation.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from python3_distillation.fsio import atomic_dir
from python3_distillation.models import write_config

ONNX_FILE = "model.onnx"


class CachedDecoder(nn.Module):
    """transformers' GPT-2 forward with the KV cache as plain tensors in and out (what ONNX can carry)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):  # past: key, value of each block
        cache = DynamicCache(ddp_cache_data=list(zip(past[::2], past[1::2])))
        # transformers 5.25 renamed past_key_values → cache (the old name warns, and goes in 5.40).
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        # The cache was updated in place with this call's keys and values.
        return (out.logits, *(t for layer in cache.layers for t in (layer.keys, layer.values)))


def write_onnx(model, tokenizer, out: Path, int8: bool = False) -> Path:
    """Write the folder ``out``, atomically: ``model`` (an fp32 GPT2LMHeadModel) as the ONNX decoder.

    ``int8``: then ONNX Runtime's ``quantize_dynamic``. The config, generation config and tokenizer go beside it.
    """
    cfg = model.config
    heads, head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
    # Example sizes above 1: torch.export fixes a dimension traced at size 0 or 1 to that size.
    batch, past_len, seq = 2, 3, 4
    ids = torch.zeros(batch, seq, dtype=torch.long)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq).expand(batch, seq)
    past = tuple(torch.zeros(batch, heads, past_len, head_dim) for _ in range(2 * cfg.n_layer))
    b, s, p, t = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    shapes = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in past))
    names = [f"{i}.{kv}" for i in range(cfg.n_layer) for kv in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{n}" for n in names)]
    outputs = ["logits", *(f"present.{n}" for n in names)]
    decoder = CachedDecoder(model.float().eval()).eval()
    with torch.no_grad():
        program = torch.onnx.export(decoder, (ids, mask, positions, *past), dynamo=True, dynamic_shapes=shapes,
                                    input_names=inputs, output_names=outputs, optimize=True, verbose=False)
    with atomic_dir(out) as tmp:
        traced = tmp / ("model_fp32.onnx" if int8 else ONNX_FILE)
        program.save(str(traced))
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(traced), str(tmp / ONNX_FILE), weight_type=QuantType.QInt8)
            for f in tmp.glob("model_fp32.onnx*"):
                f.unlink()
        write_config(tmp, model.config.to_dict())
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def session(folder_or_file: str | Path, threads: int = 0):
    """An ONNX Runtime CPU session for an exported folder (or its model.onnx); ``threads`` 0 = ORT's default."""
    import onnxruntime as ort

    path = Path(folder_or_file)
    path = path / ONNX_FILE if path.is_dir() else path
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def greedy(sess, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """Greedy new tokens for one prompt through the exported decoder: the prompt once, then one token a call."""
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)  # [batch, heads, past, head_dim]
            for i in sess.get_inputs() if i.name.startswith("past_key_values.")}
    ids = np.array([prompt], dtype=np.int64)
    done, out = 0, []
    for _ in range(max_new_tokens):
        n = ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, done + n), np.int64),
                "position_ids": np.arange(done, done + n, dtype=np.int64)[None], **past}
        logits, *present = sess.run(None, feed)
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token == eos_token_id:
            break
        past = dict(zip(past, present))
        done += n
        ids = np.array([[token]], dtype=np.int64)
    return out
