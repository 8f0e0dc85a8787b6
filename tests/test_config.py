"""Config: YAML diffs, dotted overrides, typed checks, clear errors."""

from pathlib import Path

import pytest

from python3_distillation.config import CONFIGS_DIR, ConfigError, RunConfig, load_config, parse_override


def test_defaults_validate():
    cfg = RunConfig().validate()
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
    ("train.max_steps=1.5", "train.max_steps: expected an integer"),
    ("train.max_steps=true", "train.max_steps: expected an integer"),
    ("train.lr=fast", "train.lr: expected a number"),
    ("train.mixed_precision=fp8", "not one of"),
    ("train.lr=-1", "train.lr must be a positive number"),
    ("teacher.n_embd=250", "divisible"),
    ("student.layers=[0, 1]", "student.layers has 2 entries"),
    ("distill.temperature=0", "temperature must be > 0"),
    ("train", "must look like section.key=value"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], [override])


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

    from python3_distillation.config import config_from_dict

    cfg = load_config(["v1"], ["train.max_steps=3", "name=v1"])  # its own name: its own folders
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert Path(again.student.output_dir).name == "gpt2_student"
