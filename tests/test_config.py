"""Config: YAML diffs, dotted overrides, typed checks, clear errors."""

from pathlib import Path

import pytest

from python3_distillation.config import CONFIGS_DIR, ConfigError, RunConfig, load_config, parse_override


def test_defaults_validate():
    cfg = RunConfig()
    assert cfg.data.block_size <= cfg.teacher.n_positions


def test_every_shipped_config_loads():
    names = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
    assert {"teacher", "v1", "v2", "v2_ce"} <= set(names)
    for name in names:
        load_config([name])


def test_v1_v2_are_configs_of_one_code_path():
    v1, v2, ce = load_config(["v1"]), load_config(["v2"]), load_config(["v2_ce"])
    assert (v1.student.n_layer, v1.student.init) == (0, "base")  # teacher-sized
    assert (v2.student.n_layer, v2.student.init) == (6, "teacher")
    # The CE baseline differs from v2 only in the loss weights and where it is written.
    assert ce.train == v2.train and ce.student.n_layer == v2.student.n_layer and ce.student.init == v2.student.init
    assert ce.distill.alpha_kd == 0 and v2.distill.alpha_kd > 0


def test_yaml_is_a_diff_and_overrides_come_last(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.01\n  max_steps: 7\n")
    cfg = load_config([f], ["train.lr=3e-4", "student.layers=[0, 5]", "student.n_layer=2", "--train.cpu=true"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.max_steps == 7
    assert cfg.student.layers == [0, 5] and cfg.train.cpu is True
    assert cfg.train.batch_size == RunConfig().train.batch_size  # untouched default


@pytest.mark.parametrize("override, message", [
    ("train.nope=1", "unknown config key train.nope"),
    ("nosection.lr=1", "unknown config key nosection"),
    ("train.max_steps=1.5", "^train.max_steps: input should be a valid integer, got 1.5$"),
    ("train.max_steps=true", "^train.max_steps: input should be a valid integer, got True$"),
    ("train.lr=fast", "^train.lr: input should be a valid number, got 'fast'$"),
    ("train.lr=.nan", "^train.lr: input should be a finite number"),
    ("train.mixed_precision=fp8", "^train.mixed_precision: input should be 'auto', 'no', 'bf16' or 'fp16'"),
    ("train.lr=-1", "^train.lr: input should be greater than 0, got -1$"),
    ("train.cpu=1", "^train.cpu: input should be a valid boolean"),
    ("student.layers=[0, x]", r"^student.layers\[1\]: input should be a valid integer"),
    ("data.mix=[1, -1]", r"^data.mix\[1\]: input should be greater than 0"),
    ("distill.on_policy_temperature=101", "^distill.on_policy_temperature: input should be less than or equal to 100"),
    ("train=5", "^train: input should be a valid dictionary"),
    ("name=a/b", "name must be a non-empty word"),
    ("teacher.n_embd=250", "divisible"),
    ("student.layers=[0, 1]", "student.layers has 2 entries"),
    ("distill.temperature=0", "^distill.temperature: input should be greater than 0"),
    ("train", "must look like section.key=value"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config([], [override])
    assert "\n" not in str(err.value)


def test_yaml_1_1_spellings_keep_their_meaning(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: 123\ntrain:\n  lr: 3e-4\n  mixed_precision: no\n  compile: off\n  warmup_steps: 0\n")
    cfg = load_config([f])
    assert cfg.name == "123" and cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert (cfg.train.mixed_precision, cfg.train.compile) == ("no", "off")
    assert cfg.to_dict()["train"]["grad_clip"] == 1.0 and isinstance(load_config([], ["train.grad_clip=1"]).train.grad_clip, float)


def test_overrides_may_complete_what_the_files_leave_invalid(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("stage: distill\nstudent:\n  init: pruned\n")
    with pytest.raises(ConfigError, match="student.from_dir"):
        load_config([f])
    cfg = load_config([f], ["student.from_dir=some/folder"])
    assert cfg.student.from_dir == "some/folder" and cfg.name.startswith("run-")


def test_sections_built_directly_report_one_line():
    from python3_distillation.config import DataConfig

    with pytest.raises(ConfigError, match="^block_size: input should be greater than or equal to 2, got 1$"):
        DataConfig(block_size=1)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([bad])
    seq = tmp_path / "seq.yaml"
    seq.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config([seq])


def test_parse_override_types():
    assert parse_override("a.b=1") == {"a": {"b": 1}}
    assert parse_override("a.b=hello world") == {"a": {"b": "hello world"}}
    assert parse_override("name=") == {"name": ""}


def test_resolved_config_round_trips(tmp_path):
    import yaml

    cfg = load_config(["v1"], ["train.max_steps=3", "name=v1"])  # its own name: its own folders
    again = RunConfig.check(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert Path(again.student.output_dir).name == "gpt2_student"
