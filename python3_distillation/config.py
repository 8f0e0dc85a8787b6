"""Typed run configuration: dataclass defaults, YAML files that are diffs, dotted overrides.

    python -m python3_distillation teacher --config configs/teacher.yaml train.max_steps=50

A YAML file in ``configs/`` only names what differs from the defaults below; ``section.key=value``
overrides on the command line come last (values parsed as YAML, so ``3e-4``, ``true``, ``[0, 2]``
work). Unknown keys and wrong types are errors that name the key; the resolved config is written
beside every checkpoint and model (``distill_config.yaml``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from python3_distillation.errors import ConfigError
from python3_distillation.paths import PACKAGE_DIR, default_model_path

CONFIG_FILE = "distill_config.yaml"
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # shipped in the package (the repo's configs/ links here)


@dataclass
class DataConfig:
    # "austen" (embedded: five novels train, Persuasion validation); a .txt/.jsonl file or folder
    # (comma-separate several); or a `datasets` hub spec "name:config" such as
    # "wikitext:wikitext-103-raw-v1" (needs the network).
    train: str = "austen"
    # Same forms as `train`; empty → the source's own validation split, else a held-out fraction.
    validation: str = ""
    validation_fraction: float = 0.05
    text_field: str = "text"  # the JSONL / hub column holding the text
    # How a .txt file splits into documents (an EOS token goes between documents):
    # "line" (each non-empty line), "paragraph" (blank-line separated), "file", or "auto"
    # (paragraph when the file has blank lines, else line).
    document: Literal["auto", "line", "paragraph", "file"] = "auto"
    # Tokens per training example (≤ the model's n_positions). Equal to the embedded teacher's
    # context so every position the server may use has been trained.
    block_size: int = 256
    max_eval_blocks: int = 256  # validation blocks used for perplexity (0 = all)
    # Tokenizing processes for the token shards; 0 = from the CPU count and the data size (one below
    # 32 MiB of text, where starting workers costs more than it saves).
    num_proc: int = 0
    # Shares of the training blocks taken from each comma-separated `train` source, e.g. [0.75, 0.25]
    # for "austen,samples.jsonl" (normalised; the sources after the first must be local files, used
    # whole for training); the first source also gives the validation split. Empty: the sources
    # form one stream, each in proportion to its size.
    mix: list[float] = field(default_factory=list)

    def validate(self) -> None:
        _check(self.block_size >= 2, "data.block_size must be ≥ 2")
        _check(0.0 < self.validation_fraction < 1.0, "data.validation_fraction must be in (0, 1)")
        _check(self.max_eval_blocks >= 0, "data.max_eval_blocks must be ≥ 0")
        _check(self.num_proc >= 0, "data.num_proc must be ≥ 0 (0 = automatic)")
        _check(bool(self.train.strip()), "data.train must name a data source")
        if self.mix:
            parts = [p for p in self.train.split(",") if p.strip()]
            _check(len(self.mix) == len(parts) >= 2, f"data.mix has {len(self.mix)} shares for {len(parts)} "
                   "data.train source(s); give one share per comma-separated source, at least two")
            _check(all(w > 0 and math.isfinite(w) for w in self.mix), "data.mix shares must be positive numbers")


@dataclass
class TrainConfig:
    max_steps: int = 600  # optimizer steps
    batch_size: int = 4  # blocks per micro-batch per process (4 × 256 = 1,024 tokens)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr × this
    warmup_steps: int = 50
    weight_decay: float = 0.1  # applied to matrices only, not biases/norms/embeddings' positions
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: measured per machine (precision.py)
    eval_every: int = 200  # steps between validation perplexity (0 = only at the end)
    save_every: int = 200  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 1337
    run_dir: str = ""  # checkpoints + metrics.jsonl; empty → runs/<name>
    cpu: bool = False  # force CPU even when CUDA is present
    # torch.compile of the transformer blocks; auto: off on CPU, on for CUDA with triton (device_plan.py)
    compile: Literal["auto", "on", "off"] = "auto"

    def validate(self) -> None:
        for key in ("max_steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            _check(getattr(self, key) >= 1, f"train.{key} must be ≥ 1")
        for key in ("warmup_steps", "eval_every", "save_every", "weight_decay", "grad_clip"):
            _check(getattr(self, key) >= 0, f"train.{key} must be ≥ 0")
        _check(self.lr > 0 and math.isfinite(self.lr), "train.lr must be a positive number")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio must be in [0, 1]")
        _check(0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0, "train.beta1/beta2 must be in [0, 1)")


@dataclass
class TeacherConfig:
    # Teacher folder: written by the teacher stage, read by distillation.
    path: str = default_model_path("teacher")
    # GPT-2 checkpoint to fine-tune (hub id such as "gpt2" or a local folder); empty → train from
    # scratch with the shape below (the embedded default: no hub needed).
    init_from: str = ""
    # From-scratch shape: 12 layers like GPT-2 small, narrower so it trains in minutes on 2 cores.
    n_layer: int = 12
    n_embd: int = 256
    n_head: int = 4
    n_positions: int = 256
    dropout: float = 0.0  # short runs underfit; dropout only slows them

    def validate(self) -> None:
        _check(self.n_layer >= 1 and self.n_head >= 1, "teacher.n_layer and teacher.n_head must be ≥ 1")
        _check(self.n_embd % self.n_head == 0, "teacher.n_embd must be divisible by teacher.n_head")
        _check(self.n_positions >= 2, "teacher.n_positions must be ≥ 2")
        _check(0.0 <= self.dropout < 1.0, "teacher.dropout must be in [0, 1)")


@dataclass
class StudentConfig:
    output_dir: str = default_model_path("v2")
    n_layer: int = 6  # 0 → the teacher's layer count
    # Width: 0 → the teacher's. A narrower student keeps the teacher's head size (n_embd / n_head)
    # unless n_head is given, and starts from the teacher by `width_init` (see models.narrow_init).
    n_embd: int = 0
    n_head: int = 0  # 0 → n_embd / the teacher's head size
    # How a narrower student takes the teacher's weights: "truncate" keeps the first n_embd
    # coordinates of the residual stream; "pca" projects it onto the top principal directions of
    # the teacher's token embedding. Both keep the largest heads and MLP neurons (by weight norm).
    # Measured on configs/v2_narrow.yaml (200 steps, same seed): truncate 295.7 validation
    # perplexity, pca 296.6, a random start far behind (README) — so truncate is the default.
    width_init: Literal["pca", "truncate"] = "truncate"
    # MLP width: 0 → the teacher's per-width share (4 × n_embd for GPT-2). A narrower MLP keeps the
    # teacher's largest neurons by weight norm (the same-size baseline of a pruned model).
    n_inner: int = 0
    # "teacher": copy embeddings, final norm and the blocks in `layers` from the teacher
    # (DistilGPT2's recipe); "base": the teacher's base checkpoint (the GPT-2 it was fine-tuned
    # from), falling back to random when it was trained from scratch; "random"; "pruned": start
    # from the model folder `from_dir` (made by `gpt2-distill prune`), shape and all, so that
    # distilling it from the unpruned model is the pruning's recovery.
    init: Literal["teacher", "base", "random", "pruned"] = "teacher"
    layers: list[int] = field(default_factory=list)  # teacher blocks to copy; empty → evenly spread
    from_dir: str = ""  # the starting model folder for init=pruned

    def validate(self) -> None:
        _check(self.n_layer >= 0, "student.n_layer must be ≥ 0 (0 = same as the teacher)")
        _check(self.n_embd >= 0 and self.n_head >= 0, "student.n_embd and student.n_head must be ≥ 0 (0 = the teacher's)")
        _check(self.n_inner >= 0, "student.n_inner must be ≥ 0 (0 = the teacher's MLP width per unit of width)")
        _check((self.init == "pruned") == bool(self.from_dir.strip()),
               "student.init=pruned starts from the folder student.from_dir: set both or neither")
        if self.n_embd and self.n_head:
            _check(self.n_embd % self.n_head == 0, "student.n_embd must be divisible by student.n_head")
        _check(all(i >= 0 for i in self.layers), "student.layers must be non-negative block indices")
        if self.layers and self.n_layer:
            _check(len(self.layers) == self.n_layer,
                   f"student.layers has {len(self.layers)} entries but student.n_layer is {self.n_layer}")


@dataclass
class DistillConfig:
    temperature: float = 2.0
    alpha_kd: float = 0.5  # weight of T²·KL(teacher_T ‖ student_T)
    alpha_ce: float = 0.5  # weight of the causal-LM cross-entropy on the labels
    alpha_cos: float = 0.0  # weight of 1 − cos(student hidden, teacher hidden) (equal widths only)
    # Positions per chunk of the KL (bounds its fp32 memory); 0 = automatic (16 at GPT-2's vocab,
    # ~3 MB per temporary, measured fastest here).
    kd_chunk_rows: int = 0
    # The divergence of the kd term (each × T²): "forward_kl" KL(teacher ‖ student), the classic
    # soft-target loss (mass-covering); "reverse_kl" KL(student ‖ teacher) (mode-seeking, MiniLLM);
    # "jsd" the generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024) with mixture
    # (1 − jsd_beta)·p_student + jsd_beta·p_teacher, which tends to forward KL as jsd_beta → 0 and
    # to reverse KL as jsd_beta → 1 (both limits scaled by jsd_beta resp. 1 − jsd_beta).
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    jsd_beta: float = 0.5  # only read with loss=jsd
    # On-policy distillation (GKD's λ): this share of the batches is replaced by sequences the
    # student samples itself — the first `on_policy_prompt` tokens of each block (0 = half the
    # block) continued by the student, without gradient — and the kd term is taken on the positions
    # that predict the student's tokens, scored by the teacher. Which batches: a seeded hash of the
    # batch (itself a function of the step), so a resumed run makes the same choices.
    on_policy_fraction: float = 0.0
    on_policy_prompt: int = 0
    on_policy_temperature: float = 1.0  # the student's sampling temperature (0 = greedy)
    # Offline KD: a folder written by `gpt2-distill cache-teacher` holding the teacher's top-k
    # log-probabilities at every position of the training blocks (teacher_cache.py). Set, the kd
    # term is read from it and no teacher is kept in memory while training; cache-teacher writes
    # there (empty: <data dir>/teacher_cache/<name>). It must have been made at this temperature.
    teacher_cache: str = ""
    cache_top_k: int = 64  # tokens kept per position by cache-teacher (+ one bucket for the rest)

    def validate(self) -> None:
        _check(self.temperature > 0 and math.isfinite(self.temperature), "distill.temperature must be > 0")
        for key in ("alpha_kd", "alpha_ce", "alpha_cos"):
            _check(getattr(self, key) >= 0, f"distill.{key} must be ≥ 0")
        _check(self.alpha_kd + self.alpha_ce + self.alpha_cos > 0, "distill: at least one alpha must be > 0")
        _check(self.kd_chunk_rows >= 0, "distill.kd_chunk_rows must be ≥ 0 (0 = automatic)")
        _check(0.0 < self.jsd_beta < 1.0, "distill.jsd_beta must be in (0, 1) (0 and 1 are loss=forward_kl / reverse_kl)")
        _check(0.0 <= self.on_policy_fraction <= 1.0, "distill.on_policy_fraction must be in [0, 1]")
        _check(self.on_policy_fraction == 0 or self.alpha_kd > 0,
               "distill.on_policy_fraction needs distill.alpha_kd > 0: on-policy batches are scored by the teacher")
        _check(self.on_policy_prompt >= 0, "distill.on_policy_prompt must be ≥ 0 (0 = half the block)")
        _check(0.0 <= self.on_policy_temperature <= 100.0,
               "distill.on_policy_temperature must be in [0, 100] (0 = greedy)")
        _check(self.cache_top_k >= 1, "distill.cache_top_k must be ≥ 1")
        if self.teacher_cache.strip():
            # The cache holds the teacher's distribution at the training blocks' positions, nothing else.
            _check(self.alpha_kd > 0, "distill.teacher_cache is read by the kd term only; with distill.alpha_kd=0 leave it empty")
            _check(self.loss == "forward_kl", f"distill.teacher_cache trains on forward KL over the cached buckets; "
                   f"distill.loss={self.loss} needs the live teacher (leave distill.teacher_cache empty)")
            _check(self.on_policy_fraction == 0, "distill.on_policy_fraction needs the live teacher to score the "
                   "student's own samples, which no cache holds; leave distill.teacher_cache empty")
            _check(self.alpha_cos == 0, "distill.alpha_cos needs the teacher's hidden states, which the cache does "
                   "not hold; set distill.alpha_cos=0 or leave distill.teacher_cache empty")


@dataclass
class RunConfig:
    name: str = "run"
    stage: Literal["teacher", "distill"] = "teacher"
    tokenizer: str = "gpt2"  # local folder or hub id; "gpt2" is rebuilt offline when the hub is unreachable
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self) -> "RunConfig":
        _check(bool(self.name.strip()) and "/" not in self.name, "name must be a non-empty word (no '/')")
        for section in (self.data, self.train, self.teacher, self.student, self.distill):
            section.validate()
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_dir or Path("runs") / self.name)

    @property
    def output_dir(self) -> Path:
        """The folder the finished model is saved to."""
        return Path(self.teacher.path if self.stage == "teacher" else self.student.output_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The config as saved beside checkpoints and models: paths under the working directory are
        written relative to it, so a saved config carries no build-machine paths."""
        d = self.to_dict()
        for section, key in PATH_KEYS:
            node = d if section is None else d[section]
            node[key] = ",".join(_portable(p) for p in str(node[key]).split(",")) if node[key] else node[key]
        return yaml.safe_dump(d, sort_keys=False, allow_unicode=True)


# Config values that hold paths (a comma-separated list for the data sources).
PATH_KEYS = [(None, "tokenizer"), ("data", "train"), ("data", "validation"), ("train", "run_dir"),
             ("teacher", "path"), ("teacher", "init_from"), ("student", "output_dir"), ("student", "from_dir"),
             ("distill", "teacher_cache")]


def _portable(path: str) -> str:
    p = Path(path.strip()).expanduser()
    if not p.is_absolute():
        return path.strip()
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return path.strip()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` (ints are accepted where floats are expected)."""
    origin = get_origin(tp)
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads a bare `no`/`off` as false
            value = next((c for c in (("yes", "true", "on") if value else ("no", "false", "off")) if c in get_args(tp)), value)
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)  # YAML reads `name: 123` as an int; a name is still a string
    raise ConfigError(f"{key}: unsupported type {tp!r}")


def _apply(obj: Any, updates: dict, prefix: str = "") -> None:
    if not isinstance(updates, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        if key not in names:
            raise ConfigError(f"unknown config key {prefix}{key!s} (valid: {', '.join(names)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{prefix}{key}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{prefix}{key}"))


def parse_override(text: str) -> dict:
    """``"train.lr=3e-4"`` → ``{"train": {"lr": 0.0003}}`` (leading dashes allowed)."""
    body = text.lstrip("-")
    if "=" not in body:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = body.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict:
    """A config file as a mapping (its ``base:`` key, if any, included)."""
    path = _resolve(Path(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(files: list[str | Path] = (), overrides: list[str] = (), base: RunConfig | None = None) -> RunConfig:
    """Defaults ← each YAML file in order (a file's ``base: other.yaml`` is applied first) ← overrides."""
    cfg = base or RunConfig()
    for f in files:
        chain = [read_yaml(f)]
        path = _resolve(Path(f))
        while chain[-1].get("base"):
            path = path.parent / chain[-1]["base"]
            if len(chain) > 8:
                raise ConfigError(f"config {f}: `base:` chain is too deep or circular")
            chain.append(read_yaml(path))
        for data in reversed(chain):
            _apply(cfg, {k: v for k, v in data.items() if k != "base"})
    if overrides:
        named = copy.deepcopy(cfg)  # what the files alone make, and where they write it
        for o in overrides:
            _apply(cfg, parse_override(o))
        _own_folders(cfg, named, overrides)
    return cfg.validate()


def _own_folders(cfg: RunConfig, named: RunConfig, overrides: list[str]) -> None:
    """Overrides that change what a config makes also change where it goes, so an experiment never
    overwrites (or blocks the resume of) the config's own model and run folders — `make run`'s, for
    the named configs. ``name=…`` picks the new name (→ ``python3_distillation/gpt2_student_<name>``,
    ``runs/<name>``); without it the name gets a short digest of the overrides. Folders the overrides
    set themselves are kept as given."""
    if cfg.to_dict() == named.to_dict():
        return
    keys = {o.lstrip("-").split("=", 1)[0].strip() for o in overrides}
    out_key = "teacher.path" if cfg.stage == "teacher" else "student.output_dir"
    if "name" in keys and cfg.name == named.name:
        return  # the user named the config's own folders: theirs to overwrite
    own_output = out_key not in keys and cfg.output_dir == named.output_dir
    own_run = "train.run_dir" not in keys and not cfg.train.run_dir
    if not (own_output or own_run):
        return
    if "name" not in keys:
        canonical = "\n".join(sorted(o.lstrip("-").strip() for o in overrides))
        cfg.name = f"{named.name}-{hashlib.sha256(canonical.encode()).hexdigest()[:6]}"
    if own_output:
        kind = "teacher" if cfg.stage == "teacher" else "student"
        folder = f"{PACKAGE_DIR.name}/gpt2_{'' if cfg.name.startswith(kind) else kind + '_'}{cfg.name}"
        if cfg.stage == "teacher":
            cfg.teacher.path = folder
        else:
            cfg.student.output_dir = folder


def _resolve(path: Path) -> Path:
    """A bare name such as ``v2`` means ``configs/v2.yaml``."""
    if not path.exists() and not path.suffix and (CONFIGS_DIR / f"{path}.yaml").exists():
        return CONFIGS_DIR / f"{path}.yaml"
    return path


def config_from_dict(d: dict) -> RunConfig:
    cfg = RunConfig()
    _apply(cfg, d)
    return cfg.validate()


def saved_config(folder: str | Path) -> RunConfig | None:
    """The :class:`RunConfig` a model folder was built with (its ``distill_config.yaml``), or None."""
    f = Path(folder) / CONFIG_FILE
    if not f.exists():
        return None
    try:
        return config_from_dict(yaml.safe_load(f.read_text(encoding="utf-8")) or {})
    except (ConfigError, yaml.YAMLError) as e:
        raise ConfigError(f"{f}: {e}") from None
