"""int8 GPT-2: per-output-channel symmetric int8 weights, their kernel, and the folder format that stores them.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_quantize.py -q

``W ≈ scale[:, None] * q`` with ``scale = max|W_row| / 127`` for every block matmul and the tied token
embedding / LM head (stored once); the rest stays fp32. Imports nothing from the project. README.md, "Smaller
and faster: int8 and narrow students"; the kernel and the file layout: docs/design/training.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

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
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous(), scale


_KERNEL_OK: dict[str, bool] = {}


def int8_kernel_works(device: torch.device) -> bool:
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
    if int8_kernel_works(x.device):
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
    def like(cls, module: nn.Module) -> "Int8Linear":
        """An empty one of the shape of transformers' ``Conv1D`` (weight [in, out]) or ``nn.Linear`` ([out, in])."""
        conv = type(module).__name__ == "Conv1D"
        d_in, d_out = module.weight.shape if conv else module.weight.shape[::-1]
        return cls(d_in, d_out, bias=module.bias is not None)

    @classmethod
    def from_float(cls, module: nn.Module) -> "Int8Linear":
        out = cls.like(module)
        w = module.weight.detach()
        out.qweight, out.scale = quantize_rows(w.t() if type(module).__name__ == "Conv1D" else w)
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


def _to_int8(model, head: bool, make) -> GPT2LMHeadModel:
    """Every block matmul (and, with ``head``, the tied embedding + LM head) replaced by ``make(module)``."""
    for block in model.transformer.h:
        for proj in BLOCK_PROJECTIONS:
            part, attr = proj.split(".")
            setattr(block.get_submodule(part), attr, make(block.get_submodule(proj)))
    if head:
        table = make(model.lm_head)
        table.bias = None
        model.transformer.wte = Int8Embedding(table)
        model.lm_head = Int8LMHead(table)
    return model


def quantize_model(model, head: bool = True):
    """Replace a GPT2LMHeadModel's block matmuls (and, with ``head``, the tied embedding + LM head)
    by int8 modules, in place; returns the model (eval mode, fp32 elsewhere)."""
    model = model.float().eval()
    if head and model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr():
        raise ValueError("the LM head is not tied to the token embedding; quantize with head=False")
    return _to_int8(model, head, Int8Linear.from_float)


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
    """An int8 folder of either format (``load_int8`` opens it)."""
    q = quantization_config(path)
    return q.get("quant_method") == LEGACY_METHOD or _is_ours(q)


def int8_tensors(model) -> dict[str, torch.Tensor]:
    """The tensors of the compressed-tensors file (layout: docs/design/training.md)."""
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


def int8_config(model, head: bool = True) -> dict:
    """``config.json`` of an int8 folder: GPT-2's fields and compressed-tensors' ``quantization_config``."""
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
    return config


def save_int8_weights(model, folder: str | Path) -> None:
    # "format": "pt" is what transformers' own safetensors files carry.
    save_file(int8_tensors(model), str(Path(folder) / WEIGHTS_FILE), metadata={"format": "pt"})


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


def load_int8(path: str | Path) -> GPT2LMHeadModel:
    """An int8 folder (either format) as a GPT2LMHeadModel whose matmuls are ``Int8Linear`` (eval mode).
    A folder whose weights do not fit its config raises ValueError (models.open_model words it)."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    qcfg = config.pop("quantization_config")
    legacy = qcfg.get("quant_method") == LEGACY_METHOD
    head = (any(m.startswith("wte") for m in qcfg.get("modules", [])) if legacy
            else _TABLE_TARGET in next(iter(qcfg["config_groups"].values()))["targets"])
    weights_file = LEGACY_WEIGHTS_FILE if legacy else WEIGHTS_FILE
    if not (path / weights_file).exists():
        raise ValueError(f"{path}: an int8 folder without {weights_file}")
    gpt2 = GPT2Config.from_dict(config)
    with torch.device("meta"):  # shapes only: every tensor comes from the file below
        model = _to_int8(GPT2LMHeadModel(gpt2), head, Int8Linear.like)
    # Fresh (aligned) copies: tensors viewed straight from the file can be misaligned for the int8
    # kernel's vector loads, which crashed the process instead of raising.
    state = {k: v.clone() for k, v in load_file(str(path / weights_file)).items()}
    if not legacy:
        state = _internal(state, gpt2.n_layer, head)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: {weights_file} does not fit its config.json ({str(e).splitlines()[0]})") from None
    # The LM head is the embedding table (tied), stored once under the embedding's name.
    missing = [k for k in missing if not k.startswith("lm_head.")]
    if missing or unexpected:
        raise ValueError(f"{path}: {weights_file} does not fit its config.json "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if not head:
        model.lm_head.weight = model.transformer.wte.weight
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ValueError(f"{path}: {weights_file} lacks {leftover[:3]}")
    model.generation_config.pad_token_id = gpt2.eos_token_id
    model.config.quantization_scheme = SCHEME
    return model.eval()


def dequantize(model, dtype: torch.dtype = torch.float32) -> GPT2LMHeadModel:
    """A plain ``GPT2LMHeadModel`` from an int8 one, every weight ``scale · q`` computed once, in ``dtype``
    (how CUDA serves an int8 folder: device_plan.serving_dtype; 2× (bf16) or 4× (fp32) int8's memory).
    The file's tensors are in transformers' layout, each scale broadcasting over its weight."""
    fields = {k: v for k, v in model.config.to_dict().items()
              if k not in ("quantization_config", "quantization_scheme")}
    with torch.device("meta"):  # shapes only: every tensor is set below
        plain = GPT2LMHeadModel(GPT2Config.from_dict(fields))
    state = int8_tensors(model)
    for key in [k for k in state if k.endswith(".weight_scale")]:
        weight = key.removesuffix("_scale")
        state[weight] = state.pop(key).float() * state[weight].float()
    try:
        plain.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise ValueError(f"cannot dequantize: {str(e).splitlines()[0]}") from None
    plain.lm_head.weight = plain.transformer.wte.weight  # tied, as in GPT-2
    leftover = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if leftover:
        raise ValueError(f"cannot dequantize: nothing to fill {leftover[:3]} with")
    plain.generation_config = model.generation_config
    return plain.to(dtype).eval()
