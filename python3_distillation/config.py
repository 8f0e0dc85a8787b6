"""Typed run configuration: pydantic sections with defaults, YAML files that are diffs, dotted overrides.

    python -m python3_distillation teacher --config configs/teacher.yaml train.max_steps=50

Override values are parsed as YAML (``3e-4``, ``true``, ``[0, 2]``). Explained in README.md, "Training".
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, ValidationInfo, model_validator

from python3_distillation.errors import ConfigError
from python3_distillation.paths import PACKAGE_DIR, default_model_path
from python3_distillation.validation import Checked, Temperature

CONFIG_FILE = "distill_config.yaml"
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # shipped in the package (the repo's configs/ links here)


def _number(v: Any) -> Any:
    """YAML 1.1 reads ``3e-4`` (no dot) as a string."""
    try:
        return float(v) if isinstance(v, str) else v
    except ValueError:
        return v


def _text(v: Any) -> Any:
    """YAML reads ``name: 123`` as an int; a name is still a string."""
    return str(v) if isinstance(v, (bool, int, float)) else v


def _choice(*options: str) -> Any:
    """One of ``options``; YAML 1.1 reads a bare ``no`` / ``off`` as false, meaning the option so spelt."""

    def spelt(v: Any) -> Any:
        if isinstance(v, bool):
            return next((c for c in (("yes", "true", "on") if v else ("no", "false", "off")) if c in options), v)
        return v

    return Annotated[Literal[options], BeforeValidator(spelt)]


Float = Annotated[float, BeforeValidator(_number)]
Text = Annotated[str, BeforeValidator(_text)]


class Section(Checked):
    """A config section: strict types (an int is no float, a string no number) and finite numbers."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    error = ConfigError
    noun = "config key"


class DataConfig(Section):
    # "austen" (embedded: five novels train, Persuasion validation); .txt/.jsonl files or folders
    # (comma-separated); or a `datasets` hub spec such as "wikitext:wikitext-103-raw-v1" (network).
    train: Text = "austen"
    validation: Text = ""  # as `train`; empty → the source's own validation split, else a held-out fraction
    validation_fraction: Float = Field(0.05, gt=0, lt=1)
    text_field: Text = "text"  # the JSONL / hub column holding the text
    # .txt → documents (EOS between them): "line", "paragraph" (blank-line separated), "file", or
    # "auto" (paragraph when the file has blank lines, else line).
    document: _choice("auto", "line", "paragraph", "file") = "auto"
    # Tokens per example (≤ n_positions): the embedded teacher's context, so every position served was trained.
    block_size: int = Field(256, ge=2)
    max_eval_blocks: int = Field(256, ge=0)  # validation blocks used for perplexity (0 = all)
    # Tokenizing processes; 0 = from CPU count and data size (one below 32 MiB of text: workers cost more).
    num_proc: int = Field(0, ge=0)
    # Shares of the training blocks from each comma-separated `train` source, e.g. [0.75, 0.25] for
    # "austen,samples.jsonl" (normalised; later sources: local files used whole for training, the first
    # gives validation). Empty: the sources form one stream, each in proportion to its size.
    mix: list[Annotated[Float, Field(gt=0)]] = []


class TrainConfig(Section):
    max_steps: int = Field(600, ge=1)  # optimizer steps
    batch_size: int = Field(4, ge=1)  # blocks per micro-batch per process (4 × 256 = 1,024 tokens)
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    lr: Float = Field(1e-3, gt=0)
    min_lr_ratio: Float = Field(0.1, ge=0, le=1)  # cosine decays to lr × this
    warmup_steps: int = Field(50, ge=0)
    weight_decay: Float = Field(0.1, ge=0)  # applied to matrices only, not biases/norms/embeddings' positions
    beta1: Float = Field(0.9, ge=0, lt=1)
    beta2: Float = Field(0.95, ge=0, lt=1)
    grad_clip: Float = Field(1.0, ge=0)  # max global grad norm (0 = off)
    mixed_precision: _choice("auto", "no", "bf16", "fp16") = "auto"  # auto: measured per machine (device_plan.py)
    eval_every: int = Field(200, ge=0)  # steps between validation perplexity (0 = only at the end)
    save_every: int = Field(200, ge=0)  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = 1337
    run_dir: Text = ""  # checkpoints + metrics.jsonl; empty → runs/<name>
    cpu: bool = False  # force CPU even when CUDA is present
    # torch.compile of the transformer blocks; auto: off on CPU, on for CUDA with triton (device_plan.py)
    compile: _choice("auto", "on", "off") = "auto"


class TeacherConfig(Section):
    path: Text = default_model_path("teacher")  # written by the teacher stage, read by distillation
    # GPT-2 checkpoint to fine-tune (hub id such as "gpt2" or a local folder); empty → train from
    # scratch with the shape below (the embedded default: no hub needed).
    init_from: Text = ""
    # From-scratch shape: 12 layers like GPT-2 small, narrower so it trains in minutes on 2 cores.
    n_layer: int = Field(12, ge=1)
    n_embd: int = Field(256, ge=1)
    n_head: int = Field(4, ge=1)
    n_positions: int = Field(256, ge=2)
    dropout: Float = Field(0.0, ge=0, lt=1)  # short runs underfit; dropout only slows them


class StudentConfig(Section):
    output_dir: Text = default_model_path("v2")
    n_layer: int = Field(6, ge=0)  # 0 → the teacher's layer count
    # Width: 0 → the teacher's. A narrower student keeps the teacher's head size (n_embd / n_head)
    # unless n_head is given, and starts from the teacher by `width_init` (see models.narrow_init).
    n_embd: int = Field(0, ge=0)
    n_head: int = Field(0, ge=0)  # 0 → n_embd / the teacher's head size
    # A narrower student's start: "truncate" keeps the first n_embd residual coordinates; "pca" projects
    # onto the teacher embedding's top principal directions; both keep the largest heads and neurons.
    # configs/v2_narrow.yaml, 200 steps: truncate 295.7 validation perplexity, pca 296.6 (README).
    width_init: _choice("pca", "truncate") = "truncate"
    # MLP width: 0 → the teacher's per-width share (4 × n_embd for GPT-2). A narrower MLP keeps the
    # teacher's largest neurons by weight norm (the same-size baseline of a pruned model).
    n_inner: int = Field(0, ge=0)
    # "teacher": copy embeddings, final norm and the blocks in `layers` (DistilGPT2's recipe); "base":
    # the GPT-2 the teacher was fine-tuned from (random if trained from scratch); "random"; "pruned":
    # the folder `from_dir` from `gpt2-distill prune`, shape and all (distilling it is the recovery).
    init: _choice("teacher", "base", "random", "pruned") = "teacher"
    layers: list[Annotated[int, Field(ge=0)]] = []  # teacher blocks to copy; empty → evenly spread
    from_dir: Text = ""  # the starting model folder for init=pruned


class DistillConfig(Section):
    temperature: Float = Field(2.0, gt=0)
    alpha_kd: Float = Field(0.5, ge=0)  # weight of T²·KL(teacher_T ‖ student_T)
    alpha_ce: Float = Field(0.5, ge=0)  # weight of the causal-LM cross-entropy on the labels
    alpha_cos: Float = Field(0.0, ge=0)  # weight of 1 − cos(student hidden, teacher hidden) (equal widths only)
    kd_chunk_rows: int = Field(0, ge=0)  # positions per KL chunk (bounds its fp32 memory); 0 = device_plan.py's
    # The kd divergence (× T²): "forward_kl" KL(teacher ‖ student) (mass-covering); "reverse_kl"
    # KL(student ‖ teacher) (mode-seeking, MiniLLM); "jsd" GKD's generalised JSD (Agarwal et al. 2024)
    # with mixture (1 − jsd_beta)·p_student + jsd_beta·p_teacher.
    loss: _choice("forward_kl", "reverse_kl", "jsd") = "forward_kl"
    jsd_beta: Float = Field(0.5, gt=0, lt=1)  # only read with loss=jsd (0 and 1 are forward_kl / reverse_kl)
    # On-policy distillation (GKD's λ): this share of the batches (chosen by a seeded hash of the batch, so
    # resume repeats it) holds the student's continuations of `on_policy_prompt` tokens, scored by the teacher.
    on_policy_fraction: Float = Field(0.0, ge=0, le=1)
    on_policy_prompt: int = Field(0, ge=0)  # 0 = half the block
    on_policy_temperature: Annotated[Temperature, BeforeValidator(_number)] = 1.0  # the student's (0 = greedy)
    # Offline KD: the kd term from `gpt2-distill cache-teacher`'s top-k (teacher_cache.py), no teacher in
    # memory. cache-teacher writes there (empty: <data dir>/teacher_cache/<name>), at this temperature.
    teacher_cache: Text = ""
    cache_top_k: int = Field(64, ge=1)  # tokens kept per position by cache-teacher (+ one bucket for the rest)


class RunConfig(Section):
    name: Text = "run"
    stage: _choice("teacher", "distill") = "teacher"
    tokenizer: Text = "gpt2"  # local folder or hub id; "gpt2" is rebuilt offline when the hub is unreachable
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> RunConfig:
        """The rules between keys (skipped for the files' own config, which overrides may complete)."""
        if not (info.context or {}).get("rules", True):
            return self
        data, st, d = self.data, self.student, self.distill
        _check(bool(self.name.strip()) and "/" not in self.name, "name must be a non-empty word (no '/')")
        _check(bool(data.train.strip()), "data.train must name a data source")
        if data.mix:
            parts = [p for p in data.train.split(",") if p.strip()]
            _check(len(data.mix) == len(parts) >= 2, f"data.mix has {len(data.mix)} shares for {len(parts)} "
                   "data.train source(s); give one share per comma-separated source, at least two")
        _check(self.teacher.n_embd % self.teacher.n_head == 0, "teacher.n_embd must be divisible by teacher.n_head")
        _check((st.init == "pruned") == bool(st.from_dir.strip()),
               "student.init=pruned starts from the folder student.from_dir: set both or neither")
        if st.n_embd and st.n_head:
            _check(st.n_embd % st.n_head == 0, "student.n_embd must be divisible by student.n_head")
        if st.layers and st.n_layer:
            _check(len(st.layers) == st.n_layer,
                   f"student.layers has {len(st.layers)} entries but student.n_layer is {st.n_layer}")
        _check(d.alpha_kd + d.alpha_ce + d.alpha_cos > 0, "distill: at least one alpha must be > 0")
        _check(d.on_policy_fraction == 0 or d.alpha_kd > 0,
               "distill.on_policy_fraction needs distill.alpha_kd > 0: on-policy batches are scored by the teacher")
        if d.teacher_cache.strip():
            # The cache holds the teacher's distribution at the training blocks' positions, nothing else.
            _check(d.alpha_kd > 0, "distill.teacher_cache is read by the kd term only; with distill.alpha_kd=0 leave "
                   "it empty")
            _check(d.loss == "forward_kl", f"distill.teacher_cache trains on forward KL over the cached buckets; "
                   f"distill.loss={d.loss} needs the live teacher (leave distill.teacher_cache empty)")
            _check(d.on_policy_fraction == 0, "distill.on_policy_fraction needs the live teacher to score the "
                   "student's own samples, which no cache holds; leave distill.teacher_cache empty")
            _check(d.alpha_cos == 0, "distill.alpha_cos needs the teacher's hidden states, which the cache does "
                   "not hold; set distill.alpha_cos=0 or leave distill.teacher_cache empty")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_dir or Path("runs") / self.name)

    @property
    def output_dir(self) -> Path:
        """The folder the finished model is saved to."""
        return Path(self.teacher.path if self.stage == "teacher" else self.student.output_dir)

    def to_dict(self) -> dict:
        return self.model_dump()

    def to_yaml(self, precision: dict | None = None) -> str:
        """The config as saved beside checkpoints and models, headed by the ``precision`` it trained in
        (``Precision.to_dict()``): paths under the working directory are written relative to it, so a
        saved config carries no build-machine paths."""
        d = self.to_dict()
        for section, key in PATH_KEYS:
            node = d if section is None else d[section]
            node[key] = ",".join(_portable(p) for p in str(node[key]).split(",")) if node[key] else node[key]
        head = f"# precision used: {precision.get('label')} — {precision.get('reason')}\n" if precision else ""
        return head + yaml.safe_dump(d, sort_keys=False, allow_unicode=True)


# Config values that hold paths (a comma-separated list for the data sources).
PATH_KEYS = [(None, "tokenizer"), ("data", "train"), ("data", "validation"), ("train", "run_dir"),
             ("teacher", "path"), ("teacher", "init_from"), ("student", "output_dir"), ("student", "from_dir"),
             ("distill", "teacher_cache")]


def _portable(path: str) -> str:
    p = Path(path.strip()).expanduser()
    return str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else path.strip()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


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
    for part in reversed(dotted.strip().split(".")):
        value = {part: value}
    return value


def read_yaml(path: str | Path) -> dict:
    """A config file as a mapping (its ``base:`` key, if any, included)."""
    path = _resolve(Path(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data or {}


def load_config(files: list[str | Path] = (), overrides: list[str] = (), base: RunConfig | None = None) -> RunConfig:
    """Defaults ← each YAML file in order (a file's ``base: other.yaml`` is applied first) ← overrides."""
    data = (base or RunConfig()).to_dict()
    for f in files:
        chain = [read_yaml(f)]
        path = _resolve(Path(f))
        while chain[-1].get("base"):
            path = path.parent / chain[-1]["base"]
            if len(chain) > 8:
                raise ConfigError(f"config {f}: `base:` chain is too deep or circular")
            chain.append(read_yaml(path))
        for layer in reversed(chain):
            _merge(data, {k: v for k, v in layer.items() if k != "base"})
    if not overrides:
        return RunConfig.check(data)
    named = RunConfig.check(data, context={"rules": False})  # what the files alone make, and where they write it
    for o in overrides:
        _merge(data, parse_override(o))
    cfg = RunConfig.check(data)
    _own_folders(cfg, named, overrides)
    return cfg


def _merge(into: dict, updates: dict) -> None:
    """Deep-merge ``updates`` into ``into``: a section given as a mapping updates that section's keys."""
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _own_folders(cfg: RunConfig, named: RunConfig, overrides: list[str]) -> None:
    """Overrides that change what a config makes also change where it goes, so an experiment never
    overwrites (or blocks the resume of) the config's own (`make run`'s) model and run folders.
    ``name=…`` picks the new name (→ ``python3_distillation/gpt2_student_<name>``, ``runs/<name>``);
    else the name gets a short digest of the overrides. Folders the overrides set are kept as given."""
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
        kind, key = out_key.split(".")  # the section ("teacher" or "student") and its output key
        prefix = "" if cfg.name.startswith(kind) else kind + "_"
        setattr(getattr(cfg, kind), key, f"{PACKAGE_DIR.name}/gpt2_{prefix}{cfg.name}")


def _resolve(path: Path) -> Path:
    """A bare name such as ``v2`` means ``configs/v2.yaml``."""
    if not path.exists() and not path.suffix and (CONFIGS_DIR / f"{path}.yaml").exists():
        return CONFIGS_DIR / f"{path}.yaml"
    return path


def saved_config(folder: str | Path) -> RunConfig | None:
    """The :class:`RunConfig` a model folder was built with (its ``distill_config.yaml``), or None."""
    f = Path(folder) / CONFIG_FILE
    if not f.exists():
        return None
    try:
        return RunConfig.check(yaml.safe_load(f.read_text(encoding="utf-8")) or {})
    except (ConfigError, yaml.YAMLError) as e:
        raise ConfigError(f"{f}: {e}") from None
