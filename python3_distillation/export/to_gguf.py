"""A model folder as one GGUF file (llama.cpp, Ollama, LM Studio), written with llama.cpp's own ``gguf`` package.

    gpt2-distill export python3_distillation/gpt2_student_v2 --to gguf --type q8_0   # → ..._v2-q8_0.gguf
    llama-cli -m python3_distillation/gpt2_student_v2-q8_0.gguf -p "It is a truth" -n 64 --temp 0

What the file holds: README.md, "Run your student elsewhere"; the mapping and the types: docs/design/generation.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from python3_distillation.errors import ModelError
from python3_distillation.fsio import atomic_file

TYPES = ("f32", "f16", "q8_0")
# Activations llama.cpp's gpt2 graph computes: GELU with the tanh approximation.
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _vocab(tokenizer, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, their gguf TokenType, merges "a b" in rank order) from a transformers GPT-2 tokenizer."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    added = set(getattr(tokenizer, "added_tokens_decoder", {}))
    # An embedding row no token uses (a padded vocabulary): "[PAD<id>]", UNUSED.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.CONTROL if i in special else
             gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL for i in range(n_vocab)]
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise ModelError(f"the tokenizer is a {model.get('type')} model; GGUF's gpt2 tokenizer is byte-level BPE")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, [int(t) for t in types], merges


def _tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor in GGUF's row layout) for every weight llama.cpp reads."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, cfg.n_layer)
    tied = model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    out = []
    for name, t in model.state_dict().items():
        # Old transformers' causal-mask buffers are not weights; a tied head is the token embedding.
        if name.endswith((".attn.bias", ".attn.masked_bias")) or (name == "lm_head.weight" and tied):
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"no GGUF name for the tensor {name!r}")
        t = t.detach().float()
        if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            t = t.t()  # Conv1D [in, out] → [out, in]
        out.append((gguf_name, t.contiguous()))
    return out


def _encode(name: str, t: torch.Tensor, kind: str):
    """(numpy data, GGML type or None for plain numpy dtypes) for one tensor of the chosen file type."""
    import gguf

    data = t.numpy().astype(np.float32)
    if kind == "f32" or data.ndim < 2 or name == "position_embd.weight":
        return data, None
    if kind == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data, qtype), qtype
    return data.astype(np.float16), None


def write_gguf(model, tokenizer, out: str | Path, kind: str = "f32", name: str = "") -> Path:
    """Write ``model`` (an fp32 GPT2LMHeadModel) and its tokenizer as GGUF at ``out``, atomically; ``kind`` in TYPES."""
    import gguf

    cfg = model.config
    # GPT-2 variants llama.cpp's gpt2 graph would run differently (they would load and decode wrongly).
    unsupported = [why for bad, why in (
        (cfg.activation_function not in _GELU_TANH,
         f"activation_function={cfg.activation_function!r} (llama.cpp computes tanh-GELU)"),
        (getattr(cfg, "scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=true"),
        (not getattr(cfg, "scale_attn_weights", True), "scale_attn_weights=false"),
        (getattr(cfg, "add_cross_attention", False), "add_cross_attention=true")) if bad]
    if unsupported:
        raise ModelError(f"llama.cpp's gpt2 architecture cannot run this model: {', '.join(unsupported)}")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    tokens, types, merges = _vocab(tokenizer, cfg.vocab_size)
    tensors = [(n, *_encode(n, t, kind)) for n, t in _tensors(model)]
    out = Path(out)
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
        w.add_type(gguf.GGUFType.MODEL)
        if name:
            w.add_name(name)
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_vocab_size(cfg.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else cfg.bos_token_id)
        w.add_eos_token_id(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else cfg.eos_token_id)
        w.add_add_bos_token(False)
        for gguf_name, data, qtype in tensors:
            w.add_tensor(gguf_name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out
