"""Structured pruning: fewer blocks and MLP neurons, chosen by measured importance, down to a target
share of the block parameters; recovered afterwards by distillation from the unpruned model.

    gpt2-distill prune python3_distillation/gpt2_teacher --target 0.5   # → python3_distillation/gpt2_teacher_pruned50
    gpt2-distill distill --config exp_prune50 student.from_dir=python3_distillation/gpt2_teacher_pruned50

See README.md, "Experiments: pruning, teacher-generated data, the loss family", and docs/design/evaluation.md.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GPT2LMHeadModel

from python3_distillation.config import ConfigError, RunConfig, saved_config
from python3_distillation.data import batch_indices, load_blocks
from python3_distillation.errors import ModelError
from python3_distillation.evaluation.cards import model_card
from python3_distillation.lineage import weights_sha256
from python3_distillation.losses import lm_loss
from python3_distillation.models import count_parameters, open_model, save_model, seeded
from python3_distillation.paths import display_path


def mlp_width(config) -> int:
    return config.n_inner or 4 * config.n_embd


def block_parameters(model: GPT2LMHeadModel) -> int:
    """Parameters inside the transformer blocks (attention, MLP, their layer norms): what pruning shrinks."""
    return sum(p.numel() for p in model.transformer.h.parameters())


def candidate_shapes(model: GPT2LMHeadModel, target: float) -> list[tuple[int, int]]:
    """``(n_layer, n_inner)`` shapes that remove at least ``target`` of the block parameters: for each
    block count, the widest MLP that fits; fewer blocks only until the MLP can stay whole."""
    cfg = model.config
    n_layer, n_inner = cfg.n_layer, mlp_width(cfg)
    per_block = block_parameters(model) // n_layer
    per_neuron = 2 * cfg.n_embd + 1  # a c_fc column, its bias, a c_proj row
    fixed = per_block - n_inner * per_neuron  # attention, norms, the MLP's output bias
    budget = (1.0 - target) * n_layer * per_block
    shapes = []
    # Dropping a block renumbers the ones after it, which changes their attention scale here.
    fewest = n_layer if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) else 1
    for layers in range(n_layer, fewest - 1, -1):
        inner = min(n_inner, math.floor((budget / layers - fixed) / per_neuron))
        if inner >= 1:
            shapes.append((layers, inner))
        if inner >= n_inner:
            break
    if not shapes:
        raise ConfigError(f"--target {target}: no GPT-2 shape with at least one block and one MLP neuron removes that "
                          "much of the block parameters")
    return shapes


@torch.no_grad()
def shrink(model: GPT2LMHeadModel, layers: list[int], neurons: list[torch.Tensor], seed: int = 0) -> GPT2LMHeadModel:
    """A new GPT-2 holding blocks ``layers`` of ``model``, block ``i`` keeping MLP neurons ``neurons[i]`` (all
    of one length, ``n_inner``); every kept weight copied unchanged. ValueError on mismatched lists."""
    if len(layers) != len(neurons) or len({len(n) for n in neurons}) != 1:
        raise ValueError("one neuron index list per kept block, all of one length")
    config = copy.deepcopy(model.config)
    config.n_layer, config.n_inner = len(layers), len(neurons[0])
    with seeded(seed):  # every weight is overwritten below; seeded all the same
        new = GPT2LMHeadModel(config).to(next(model.parameters()).dtype)
    src, dst = model.transformer, new.transformer
    for name in ("wte", "wpe", "ln_f"):
        getattr(dst, name).load_state_dict(getattr(src, name).state_dict())
    if not config.tie_word_embeddings:
        new.lm_head.load_state_dict(model.lm_head.state_dict())
    for i, (layer, keep) in enumerate(zip(layers, neurons)):
        a, b = src.h[layer], dst.h[i]
        for name in ("ln_1", "attn", "ln_2"):
            getattr(b, name).load_state_dict(getattr(a, name).state_dict())
        keep = torch.as_tensor(keep, dtype=torch.long)
        b.mlp.c_fc.weight.copy_(a.mlp.c_fc.weight[:, keep])  # Conv1D weights are [in, out]
        b.mlp.c_fc.bias.copy_(a.mlp.c_fc.bias[keep])
        b.mlp.c_proj.weight.copy_(a.mlp.c_proj.weight[keep])
        b.mlp.c_proj.bias.copy_(a.mlp.c_proj.bias)
    new.tie_weights()
    return new.eval()


def _loss(model, batches: list[torch.Tensor]) -> float:
    """Mean next-token loss (nats/token) over the batches, fp32, eval mode."""
    with torch.no_grad():
        return sum(lm_loss(model(input_ids=ids).logits, ids).item() for ids in batches) / len(batches)


def neuron_importance(model: GPT2LMHeadModel, batches: list[torch.Tensor]) -> torch.Tensor:
    """``[n_layer, n_inner]`` first-order Taylor importance of every MLP neuron: |∂L/∂g| averaged over
    batches, for a gate g = 1 on each neuron's activation (the input of ``mlp.c_proj``)."""
    model.eval()
    gates = [torch.ones(mlp_width(model.config), requires_grad=True) for _ in model.transformer.h]
    hooks = [block.mlp.c_proj.register_forward_pre_hook(lambda _m, args, g=g: (args[0] * g.to(args[0].dtype),))
             for block, g in zip(model.transformer.h, gates)]
    was = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():  # gradients flow to the gates only
        p.requires_grad_(False)
    score = torch.zeros(len(gates), gates[0].numel(), dtype=torch.float64)
    try:
        for ids in tqdm(batches, desc="neuron importance", leave=False):
            grads = torch.autograd.grad(lm_loss(model(input_ids=ids).logits, ids), gates)
            score += torch.stack(grads).abs().double()
    finally:
        for h in hooks:
            h.remove()
        for p, w in zip(model.parameters(), was):
            p.requires_grad_(w)
    return (score / len(batches)).float()


def block_importance(model: GPT2LMHeadModel, batches: list[torch.Tensor], seed: int = 0) -> list[float]:
    """The loss increase (nats/token) on ``batches`` when each block alone is skipped."""
    n_layer, full = model.config.n_layer, torch.arange(mlp_width(model.config))
    base = _loss(model, batches)
    kept = [[i for i in range(n_layer) if i != skip] for skip in range(n_layer)]  # each block skipped in turn
    return [_loss(shrink(model, k, [full] * len(k), seed), batches) - base
            for k in tqdm(kept, desc="block importance", leave=False)]


def prune_model(model: GPT2LMHeadModel, target: float, importance_batches: list[torch.Tensor],
                choice_batches: list[torch.Tensor], seed: int = 0) -> tuple[GPT2LMHeadModel, dict]:
    """Remove at least ``target`` of ``model``'s block parameters; returns it and what was measured and chosen."""
    if not 0.0 < target < 1.0:
        raise ConfigError(f"the pruning target must be a fraction in (0, 1), got {target}")
    shapes = candidate_shapes(model, target)
    n_layer = model.config.n_layer
    neurons = neuron_importance(model, importance_batches)
    blocks = block_importance(model, importance_batches, seed) if any(s[0] < n_layer for s in shapes) else [0.0] * n_layer
    # Least important first; ties keep the later block out first (earlier blocks feed more of the stack).
    order = sorted(range(n_layer), key=lambda i: (blocks[i], -i))
    before = _loss(model, choice_batches)
    candidates, best, best_model = [], None, None
    for layers, inner in tqdm(shapes, desc="candidate shapes", leave=False):
        kept = sorted(set(range(n_layer)) - set(order[:n_layer - layers]))
        keep = [neurons[i].topk(inner).indices.sort().values for i in kept]
        pruned = shrink(model, kept, keep, seed)
        row = {"n_layer": layers, "n_inner": inner, "layers": kept, "loss": _loss(pruned, choice_batches),
               "block_params": block_parameters(pruned)}
        candidates.append(row)
        if best is None or row["loss"] < best["loss"]:  # ties keep the earlier, deeper shape
            best, best_model = row, pruned
    source_params = block_parameters(model)
    info = {"target": target, **{k: best[k] for k in ("n_layer", "n_inner", "layers", "block_params")},
            "source_block_params": source_params, "block_params_removed": 1.0 - best["block_params"] / source_params,
            "loss_before": before, "loss_after": best["loss"], "block_loss_increase": [round(x, 5) for x in blocks],
            "candidates": candidates}
    return best_model, info


def run_prune(model_dir: str | Path, target: float, out: str | Path | None = None, n_batches: int = 4,
              batch_size: int = 4) -> Path:
    """Prune the model in ``model_dir`` and save it (default: ``<model_dir>_pruned<percent>``)."""
    if not 0.0 < target < 1.0:
        raise ConfigError(f"--target must be a fraction of the block parameters in (0, 1), e.g. 0.25 or 0.5; got {target}")
    if n_batches < 1 or batch_size < 1:
        raise ConfigError("--batches and --batch-size must be ≥ 1")
    model_dir = Path(model_dir)
    model, tokenizer, source_meta = open_model(model_dir, dtype=torch.float32)
    if source_meta.get("stage") == "quantize":
        raise ModelError(f"{model_dir} is an int8 copy; prune the fp32 model it was made from ({source_meta.get('source')})")
    if type(model) is not GPT2LMHeadModel:
        raise ModelError(f"{model_dir}: pruning needs a plain GPT2LMHeadModel, got {type(model).__name__}")
    cfg = saved_config(model_dir) or RunConfig()
    seed = cfg.train.seed
    if cfg.data.block_size > model.config.n_positions:
        raise ConfigError(f"data.block_size={cfg.data.block_size} of {model_dir}'s config exceeds its context "
                          f"({model.config.n_positions})")
    train = load_blocks(cfg.data, tokenizer, seed=seed)["train"]
    if len(train) < batch_size:
        raise ConfigError(f"--batch-size {batch_size} is more than the {len(train)} training blocks")
    # Two disjoint runs of seeded batches: one scores the units, the other chooses among the shapes.
    draw = [train.ids[batch_indices(len(train), batch_size, i, seed)] for i in range(2 * n_batches)]
    print(f"pruning {display_path(model_dir)}: {model.config.n_layer} blocks × {mlp_width(model.config)} MLP neurons, "
          f"target {target:.0%} of {block_parameters(model):,} block parameters; importance on "
          f"{n_batches} × {batch_size} training blocks of {cfg.data.block_size} tokens (seed {seed})", file=sys.stderr)
    pruned, info = prune_model(model, target, draw[:n_batches], draw[n_batches:], seed)

    out = Path(out) if out else model_dir.with_name(f"{model_dir.name}_pruned{round(target * 100)}")
    source_sha = weights_sha256(model)
    from_teacher = source_meta.get("stage", "teacher") == "teacher"
    meta = {"stage": "prune", "source": display_path(model_dir), "source_sha256": source_sha,
            # The teacher this model's lineage answers to: the source itself when it is a teacher.
            "teacher": display_path(model_dir) if from_teacher else source_meta.get("teacher"),
            "teacher_sha256": source_sha if from_teacher else source_meta.get("teacher_sha256"),
            "student_init": {"init": "pruned", "from": display_path(model_dir), "layers": info["layers"],
                             "n_inner": info["n_inner"], "target": target,
                             "block_params_removed": round(info["block_params_removed"], 4)},
            "n_params": count_parameters(pruned), "n_layer": pruned.config.n_layer, "n_embd": pruned.config.n_embd,
            "n_inner": info["n_inner"],
            "prune": {**info, "importance_blocks": n_batches * batch_size, "choice_blocks": n_batches * batch_size,
                      "block_size": cfg.data.block_size, "data": cfg.data.train, "split": "train"},
            "val_loss": None, "val_ppl": None, "seed": seed, "weights_sha256": weights_sha256(pruned)}
    out_cfg = cfg.model_copy(update={"name": out.name})  # its own run name: the source's training log is not its
    save_model(pruned, tokenizer, out, out_cfg, meta, model_card(out.name, meta, None, folder=out.name))
    print(f"pruned model saved to {out}: {info['n_layer']} blocks × {info['n_inner']} MLP neurons (kept blocks "
          f"{info['layers']}), {info['block_params_removed']:.1%} of the block parameters removed, "
          f"{meta['n_params'] / 1e6:.2f}M parameters; training loss on the choice batches "
          f"{info['loss_before']:.3f} → {info['loss_after']:.3f}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpt2-distill prune", description=__doc__.splitlines()[0])
    p.add_argument("model", metavar="MODEL_DIR", help="a model folder (e.g. python3_distillation/gpt2_teacher)")
    p.add_argument("--target", type=float, required=True, metavar="FRACTION",
                   help="share of the block parameters to remove, e.g. 0.25 or 0.5")
    p.add_argument("--out", metavar="DIR", help="output folder (default: MODEL_DIR_pruned<percent>)")
    p.add_argument("--batches", type=int, default=4, metavar="N",
                   help="training batches that score the units, and as many that choose the shape (default 4)")
    p.add_argument("--batch-size", type=int, default=4, metavar="B", help="blocks per batch (default 4)")
    args = p.parse_args(argv)
    run_prune(args.model, args.target, args.out, args.batches, args.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
