"""int8 students for serving: per-output-channel symmetric int8 weights, a quarter of the bytes.

    gpt2-distill quantize python3_distillation/gpt2_student_v2            # → python3_distillation/gpt2_student_v2_int8
    python python3_distillation/distill_infer_v2.py --model python3_distillation/gpt2_student_v2_int8 "Emma"

Every block matmul (attention ``c_attn``/``c_proj``, MLP ``c_fc``/``c_proj``) and the token embedding,
which GPT-2 ties to the LM head, are stored as int8 with one fp32 scale per output row:
``W ≈ scale[:, None] * q`` with ``q = round(W / scale)``, ``scale = max|W_row| / 127``. Position
embeddings, layer norms and biases stay fp32 (0.4% of the bytes). The embedding lookup dequantizes
only the rows it reads; the LM head reads the same int8 table (stored once).

Kernel: PyTorch's own int8 weight-only matmul, ``aten._weight_int8pack_mm`` (bf16 activations, int8
weights, one scale per output channel), which reads the weights as int8. Measured on this 2-core
CPU at batch 1, the 50,257 × 256 LM head took 189 µs against 1,674 µs in fp32; torchao 0.18's
``Int8WeightOnlyConfig`` took 18,512 µs and its dynamic-activation config 16,750 µs on the same
shapes (its CPU path dequantizes), so torchao's kernels are not used. Where the int8 kernel is
missing (some devices), the weights are dequantized per call instead: the same numbers, slower.

On-disk format: compressed-tensors' ``int-quantized`` (the format llm-compressor writes), so plain
transformers opens the folder too:
- ``config.json``: GPT-2's config plus ``quantization_config = {"quant_method": "compressed-tensors",
  "format": "int-quantized", "config_groups": {"group_0": {"targets": [the four block projections,
  + wte], "weights": {"num_bits": 8, "type": "int", "symmetric": true, "strategy": "channel"}}},
  "dequantize": true, ...}``;
- ``model.safetensors``: each block projection's ``<module>.weight`` as int8 in GPT-2's own ``Conv1D``
  layout [in, out] with ``<module>.weight_scale`` fp32 [1, out] (one per output column); the tied
  table ``transformer.wte.weight`` int8 [vocab, d] with ``weight_scale`` [vocab, 1]; the fp32 rest
  under transformers' names;
- tokenizer, ``distill_meta.json`` (source folder and its weights hash, measured size, perplexity,
  speed), ``README.md`` card, the source's ``distill_config.yaml``.

``AutoModelForCausalLM.from_pretrained(DIR)`` loads it through compressed-tensors: ``dequantize:
true`` is needed because compressed-tensors 0.20 cannot run GPT-2's ``Conv1D`` compressed (without it
transformers 5.25 loads the int8 weights into the ``Conv1D`` and the forward fails with "self and
mat2 must have the same dtype"); the weights become fp32 ``scale * q`` at load time — exactly the
dequantized int8 model (tested), with the fp32 model's speed and memory. The project's loader
(``models.load_model``: the inference scripts, the server, the report, the Docker images) keeps
them int8 and runs the kernel above; its logits differ from transformers' by the bf16 activations
only (tests/test_export.py states the tolerance).

Folders written before this format (``quant_method = "gpt2_distill_int8"``, ``model.int8.safetensors``)
still load in the project; ``gpt2-distill quantize OLD_INT8_DIR`` rewrites one in this format in
place, losslessly (the same int8 numbers and scales).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

QUANT_METHOD = "compressed-tensors"
CT_FORMAT = "int-quantized"  # int8 values stored as int8, one scale per channel (compressed-tensors' name)
WEIGHTS_FILE = "model.safetensors"
LEGACY_METHOD = "gpt2_distill_int8"  # the project's own format before compressed-tensors
LEGACY_WEIGHTS_FILE = "model.int8.safetensors"
SCHEME = "int8"
BLOCK_PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# compressed-tensors matches targets against module names (``re:`` = Python regex from the start).
_TARGETS = {proj: "re:.*" + proj.replace(".", r"\.") + "$" for proj in BLOCK_PROJECTIONS}
_TABLE_TARGET = r"re:.*transformer\.wte$"
_WEIGHT_ARGS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (q int8 [rows, cols], scale fp32 [rows]) with ``w ≈ scale[:, None] * q``."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return q, scale


_KERNEL_OK: dict[str, bool] = {}


def _int8_kernel_works(device: torch.device) -> bool:
    """Whether ``aten._weight_int8pack_mm`` runs on this device type (checked once per type)."""
    if device.type not in _KERNEL_OK:
        try:
            x = torch.ones(1, 64, dtype=torch.bfloat16, device=device)
            w = torch.ones(8, 64, dtype=torch.int8, device=device)
            s = torch.ones(8, dtype=torch.bfloat16, device=device)
            _KERNEL_OK[device.type] = bool(torch.ops.aten._weight_int8pack_mm(x, w, s).float().sum().item() == 512.0)
        except (RuntimeError, NotImplementedError):
            _KERNEL_OK[device.type] = False
    return _KERNEL_OK[device.type]


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, scale_bf16: torch.Tensor) -> torch.Tensor:
    """``x @ (scale[:, None] * q).T`` for x [..., in] (any float dtype), q int8 [out, in]; output in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if _int8_kernel_works(x.device):
        y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), q, scale_bf16)
    else:
        y = F.linear(x2, q.to(x2.dtype)) * scale.to(x2.dtype)
    return y.to(x.dtype).reshape(*lead, q.shape[0])


class Int8Linear(nn.Module):
    """A GPT-2 ``Conv1D`` (or ``nn.Linear``) with int8 weights: ``y = x Wᵀ + b``, W = scale ⊙ q."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._scale_bf16: torch.Tensor | None = None

    @classmethod
    def from_float(cls, module: nn.Module) -> "Int8Linear":
        """From transformers' ``Conv1D`` (weight [in, out]) or ``nn.Linear`` (weight [out, in])."""
        w = module.weight.detach()
        if type(module).__name__ == "Conv1D":
            w = w.t()
        out = cls(w.shape[1], w.shape[0], bias=module.bias is not None)
        out.qweight, out.scale = quantize_rows(w)
        if module.bias is not None:
            out.bias = module.bias.detach().float().clone()
        return out

    def _apply(self, fn, recurse=True):  # a device/dtype move drops the cached bf16 scales
        self._scale_bf16 = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._scale_bf16 is None or self._scale_bf16.device != self.scale.device:
            self._scale_bf16 = self.scale.to(torch.bfloat16)
        y = int8_matmul(x, self.qweight, self.scale, self._scale_bf16)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8Embedding(nn.Module):
    """The token embedding as int8 rows with a scale each; the lookup dequantizes only the rows read."""

    def __init__(self, table: Int8Linear):
        super().__init__()
        self.table = table  # [vocab, d]: the same int8 matrix the LM head multiplies by

    @property
    def num_embeddings(self) -> int:
        return self.table.out_features

    @property
    def embedding_dim(self) -> int:
        return self.table.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.qweight[ids].float() * self.table.scale[ids].unsqueeze(-1)


class Int8LMHead(nn.Module):
    """The LM head over the int8 embedding table (weights tied, as in GPT-2)."""

    def __init__(self, table: Int8Linear):
        super().__init__()
        self.table = table

    @property
    def out_features(self) -> int:
        return self.table.out_features

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.table(h)


def _swap(model, name: str, new: nn.Module) -> None:
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], new)


def quantize_model(model, head: bool = True):
    """Replace a GPT2LMHeadModel's block matmuls (and, with ``head``, the tied embedding + LM head)
    by int8 modules, in place; returns the model (eval mode, fp32 elsewhere)."""
    model = model.float().eval()
    for i, _ in enumerate(model.transformer.h):
        for proj in BLOCK_PROJECTIONS:
            name = f"transformer.h.{i}.{proj}"
            _swap(model, name, Int8Linear.from_float(model.get_submodule(name)))
    if head:
        if model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr():
            raise ValueError("the LM head is not tied to the token embedding; quantize with head=False")
        table = Int8Linear.from_float(model.lm_head)
        table.bias = None
        model.transformer.wte = Int8Embedding(table)
        model.lm_head = Int8LMHead(table)
    return model


def quantization_config(path: str | Path) -> dict:
    """The ``quantization_config`` of a folder's config.json ({} when none, or no readable config)."""
    f = Path(path) / "config.json"
    if not f.exists():
        return {}
    try:
        q = json.loads(f.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return q if isinstance(q, dict) else {}


def _is_ours(q: dict) -> bool:
    """A compressed-tensors config with exactly this module's scheme (int8 weights per channel, no activations)."""
    groups = q.get("config_groups") or {}
    if q.get("quant_method") != QUANT_METHOD or len(groups) != 1:
        return False
    (group,) = groups.values()
    weights = group.get("weights") or {}
    return (group.get("input_activations") is None and q.get("format") == CT_FORMAT
            and all(weights.get(k) == v for k, v in _WEIGHT_ARGS.items() if k != "dynamic")
            and set(_TARGETS.values()) <= set(group.get("targets") or []))


def is_int8_dir(path: str | Path) -> bool:
    """An int8 folder this module wrote (either format): the project loads it with ``load_int8``."""
    q = quantization_config(path)
    return q.get("quant_method") == LEGACY_METHOD or _is_ours(q)


def _serialized(model) -> dict[str, torch.Tensor]:
    """The tensors of the compressed-tensors file (layout in the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    skip: list[str] = ["lm_head."]  # the LM head is the embedding table (tied): stored once, as the embedding
    for name, module in model.named_modules():
        if isinstance(module, Int8Embedding):
            out[f"{name}.weight"] = module.table.qweight.contiguous()  # [vocab, d]: a row per token
            out[f"{name}.weight_scale"] = module.table.scale[:, None].contiguous()
            skip.append(f"{name}.")
        elif isinstance(module, Int8Linear) and not name.endswith(".table"):
            out[f"{name}.weight"] = module.qweight.t().contiguous()  # back to Conv1D's [in, out]
            out[f"{name}.weight_scale"] = module.scale[None, :].contiguous()  # one per output column
            if module.bias is not None:
                out[f"{name}.bias"] = module.bias.contiguous()
            skip.append(f"{name}.")
    for name, t in model.state_dict().items():
        if not name.startswith(tuple(skip)):
            out[name] = t.detach().contiguous().cpu()
    return {k: v.detach().cpu() for k, v in out.items()}


def _internal(state: dict[str, torch.Tensor], n_layer: int, head: bool) -> dict[str, torch.Tensor]:
    """compressed-tensors names → this module's (``qweight`` [out, in], ``scale`` [out])."""
    state = dict(state)
    for i in range(n_layer):
        for proj in BLOCK_PROJECTIONS:
            name = f"transformer.h.{i}.{proj}"
            if f"{name}.weight_scale" in state:
                state[f"{name}.qweight"] = state.pop(f"{name}.weight").t().contiguous()
                state[f"{name}.scale"] = state.pop(f"{name}.weight_scale").reshape(-1).float().contiguous()
    if head and "transformer.wte.weight_scale" in state:
        state["transformer.wte.table.qweight"] = state.pop("transformer.wte.weight").contiguous()
        state["transformer.wte.table.scale"] = state.pop("transformer.wte.weight_scale").reshape(-1).float()
    return state


def save_int8(model, tokenizer, out_dir: str | Path, source: Path, meta: dict, card: str,
              head: bool = True) -> Path:
    """Write an int8 folder (format in the module docstring) atomically."""
    from safetensors.torch import save_file

    from python3_distillation.fsio import atomic_dir
    from python3_distillation.models import META_FILE, with_converter_fields

    config = model.config.to_dict()
    config.pop("quantization_scheme", None)  # set on loaded int8 models; not a GPT-2 field
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD, "format": CT_FORMAT, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": list(_TARGETS.values()) + ([_TABLE_TARGET] if head else []),
                                      "weights": dict(_WEIGHT_ARGS), "input_activations": None,
                                      "output_activations": None, "format": CT_FORMAT}},
        "ignore": ["lm_head"], "kv_cache_scheme": None,
        # transformers: dequantize at load time (compressed-tensors cannot run Conv1D compressed).
        "dequantize": True}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        # "format": "pt" is what transformers' own safetensors files carry.
        save_file(_serialized(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(with_converter_fields(config), indent=2, sort_keys=True) + "\n",
                                         encoding="utf-8")
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name in ("distill_config.yaml", "training_log.jsonl"):
            if (Path(source) / name).exists():
                shutil.copy2(Path(source) / name, tmp / name)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return out_dir


def load_int8(path: str | Path):
    """An int8 folder (either format) as a GPT2LMHeadModel whose matmuls are ``Int8Linear`` (eval mode)."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from python3_distillation.models import ModelError

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    qcfg = config.pop("quantization_config")
    legacy = qcfg.get("quant_method") == LEGACY_METHOD
    if legacy:
        head = any(m.startswith("wte") for m in qcfg.get("modules", []))
    else:
        head = _TABLE_TARGET in next(iter(qcfg["config_groups"].values()))["targets"]
    weights_file = LEGACY_WEIGHTS_FILE if legacy else WEIGHTS_FILE
    if not (path / weights_file).exists():
        raise ModelError(f"{path}: an int8 folder without {weights_file}")
    gpt2 = GPT2Config.from_dict(config)
    with torch.device("meta"):  # shapes only: every tensor comes from the file below
        model = GPT2LMHeadModel(gpt2)
    for i in range(gpt2.n_layer):
        for proj in BLOCK_PROJECTIONS:
            name = f"transformer.h.{i}.{proj}"
            m = model.get_submodule(name)
            d_in, d_out = m.weight.shape if type(m).__name__ == "Conv1D" else m.weight.shape[::-1]
            _swap(model, name, Int8Linear(d_in, d_out))
    if head:
        table = Int8Linear(gpt2.n_embd, gpt2.vocab_size, bias=False)
        model.transformer.wte = Int8Embedding(table)
        model.lm_head = Int8LMHead(table)
    # Fresh (aligned) copies: tensors viewed straight from the file can be misaligned for the int8
    # kernel's vector loads, which crashed the process instead of raising.
    state = {k: v.clone() for k, v in load_file(str(path / weights_file)).items()}
    if not legacy:
        state = _internal(state, gpt2.n_layer, head)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise ModelError(f"{path}: {weights_file} does not fit its config.json ({str(e).splitlines()[0]})") from None
    # The LM head is the embedding table (tied), stored once under the embedding's name.
    missing = [k for k in missing if not k.startswith("lm_head.")]
    if missing or unexpected:
        raise ModelError(f"{path}: {weights_file} does not fit its config.json "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if not head:
        model.lm_head.weight = model.transformer.wte.weight
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ModelError(f"{path}: {weights_file} lacks {leftover[:3]}")
    model.generation_config.pad_token_id = gpt2.eos_token_id
    model.config.quantization_scheme = SCHEME
    return model.eval()


# ----------------------------------------------------------------------------------------- command

def default_out(src: Path) -> Path:
    return src.with_name(f"{src.name}_int8")


def run_quantize(src: str | Path, out: str | Path | None = None, head: bool = True, measure: bool = True) -> Path:
    """Quantize the model folder ``src`` → ``out`` (default ``<src>_int8``) with meta and card."""
    from python3_distillation.evaluation.cards import model_card
    from python3_distillation.lineage import process_seconds, weights_sha256
    from python3_distillation.models import ModelError, count_parameters, is_model_dir, load_model, read_meta
    from python3_distillation.paths import display_path
    from python3_distillation.tokenizer import is_local_tokenizer_dir, load_tokenizer

    src = Path(src)
    if not is_model_dir(src):
        raise ModelError(f"{src}: not a model folder (no config.json); train one first (`make run`)")
    if quantization_config(src).get("quant_method") == LEGACY_METHOD:
        return rewrite_legacy(src, out)
    if is_int8_dir(src):
        raise ModelError(f"{src}: already an int8 model")
    out = Path(out) if out else default_out(src)
    if out.resolve() == src.resolve():
        raise ModelError("--out must differ from the source folder")
    model = load_model(src)
    tokenizer = load_tokenizer(src if is_local_tokenizer_dir(src) else "gpt2")
    source_meta = read_meta(src)
    meta = {k: v for k, v in source_meta.items() if k not in ("weights_sha256", "fingerprint", "val_loss", "val_ppl")}
    meta.update(stage="quantize", source=display_path(src), source_sha256=weights_sha256(model),
                n_params=source_meta.get("n_params") or count_parameters(model),
                quantization={"scheme": SCHEME, "method": QUANT_METHOD, "head": head})
    qmodel = quantize_model(model, head=head)
    meta["weights_sha256"] = weights_sha256(qmodel)
    if measure:
        meta.update(_measure(qmodel, load_model(src), src))
    save_int8(qmodel, tokenizer, out, src, meta, "", head)
    from python3_distillation.evaluation.measure import weights_bytes
    from python3_distillation.models import update_model_files

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
    from python3_distillation.models import read_meta
    from python3_distillation.tokenizer import load_tokenizer

    src = Path(src)
    out = Path(out) if out else src
    model = load_int8(src)  # everything is in memory before the folder is replaced
    tokenizer = load_tokenizer(src)
    card = (src / "README.md").read_text(encoding="utf-8") if (src / "README.md").exists() else ""
    meta = read_meta(src)
    head = isinstance(model.transformer.wte, Int8Embedding)
    meta.setdefault("quantization", {}).update(method=QUANT_METHOD, rewritten_from=LEGACY_METHOD)
    save_int8(model, tokenizer, out, src, meta, card, head)
    print(f"{src}: rewritten as a compressed-tensors int8 folder at {out} (same int8 weights)")
    return out


def _measure(qmodel, fmodel, src: Path, max_blocks: int = 32) -> dict:
    """Perplexity of both and their top-1 agreement on the source's validation blocks (when its data is here)."""
    from python3_distillation.config import saved_config
    from python3_distillation.data import Blocks, load_blocks
    from python3_distillation.errors import BadInput
    from python3_distillation.evaluation.measure import fidelity, perplexity
    from python3_distillation.tokenizer import load_tokenizer

    cfg = saved_config(src)
    if cfg is None:
        return {}
    try:
        val = load_blocks(cfg.data, load_tokenizer(src), seed=cfg.train.seed)["validation"]
    except BadInput as e:
        log.warning("quantize: perplexity not measured (%s)", e)
        return {}
    blocks = Blocks(val.ids[:min(max_blocks, len(val))])
    agree = fidelity(qmodel, fmodel, blocks)
    return {"val_ppl": perplexity(qmodel, blocks)[1], "source_val_ppl": perplexity(fmodel, blocks)[1],
            "top1_vs_source": agree["top1"], "kl_vs_source": agree["kl"], "eval_blocks": len(blocks)}


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
