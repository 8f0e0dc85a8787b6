"""Resume that is safe: fingerprints, refused config changes, damaged checkpoints, no pickles, real kills.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_resume.py -q

The kill tests run the real CLI in separate processes: a process killed with SIGKILL (after a
checkpoint, or in the middle of writing one) and resumed must end with the same weights as an
uninterrupted run, and two runs of one config must give the same weights bit for bit.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, tiny_overrides, tiny_run_config
from python3_distillation import checkpoint as ckpt_io
from python3_distillation.cli import main as cli_main
from python3_distillation.data import load_blocks
from python3_distillation.train import METRICS_FILE, lm_loss_fn, train


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "python3_distillation", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, **kwargs)


# ------------------------------------------------------------------------------ fingerprints

def test_resume_after_the_teacher_changed_starts_afresh(tmp_path, text_corpus, capsys):
    teacher_args = ["teacher", *tiny_overrides(tmp_path, text_corpus, train={"max_steps": 4})]
    assert cli_main(teacher_args) == 0
    distill_args = ["distill", *tiny_overrides(tmp_path, text_corpus, "distill", student={"n_layer": 1})]
    assert cli_main(distill_args) == 0
    student_meta = json.loads((tmp_path / "student" / "distill_meta.json").read_text())
    teacher_meta = json.loads((tmp_path / "teacher" / "distill_meta.json").read_text())
    assert student_meta["teacher_sha256"] == teacher_meta["weights_sha256"]
    capsys.readouterr()

    # Same teacher: --resume continues the finished run (no notice, nothing retrained).
    assert cli_main(distill_args + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "starting it afresh" not in err and "resumed from" in err

    # The teacher trains further: the student's checkpoints are stale, so --resume starts afresh.
    assert cli_main(teacher_args[:1] + tiny_overrides(tmp_path, text_corpus, train={"max_steps": 6}) + ["--resume"]) == 0
    capsys.readouterr()
    assert cli_main(distill_args + ["--resume"]) == 0
    err = capsys.readouterr().err
    notice = [line for line in err.splitlines() if "starting it afresh" in line]
    assert len(notice) == 1 and "(teacher: " in notice[0]
    new_meta = json.loads((tmp_path / "student" / "distill_meta.json").read_text())
    assert new_meta["teacher_sha256"] == json.loads((tmp_path / "teacher" / "distill_meta.json").read_text())["weights_sha256"]
    assert new_meta["teacher_sha256"] != student_meta["teacher_sha256"]


def test_resume_refuses_a_changed_config_but_lets_the_budget_grow(tmp_path, text_corpus, capsys):
    args = ["teacher", *tiny_overrides(tmp_path, text_corpus)]
    assert cli_main(args) == 0
    saved = (tmp_path / "runs" / "teacher" / "distill_config.yaml").read_text()
    capsys.readouterr()
    assert cli_main(args + ["train.lr=1e-2", "--resume"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "train.lr: 0.003 → 0.01" in err[0] and "without --resume" in err[0]
    assert (tmp_path / "runs" / "teacher" / "distill_config.yaml").read_text() == saved  # not overwritten
    # A larger step budget is allowed: training continues from the last checkpoint.
    assert cli_main(args + ["train.max_steps=10", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().err
    assert json.loads((tmp_path / "teacher" / "distill_meta.json").read_text())["train_steps"] == 10
    # A smaller one is not.
    assert cli_main(args + ["train.max_steps=5", "--resume"]) == 2


# ------------------------------------------------------------------------------ damaged files

@pytest.fixture
def interrupted(tmp_path, tokenizer, text_corpus):
    """A teacher run stopped at step 12 of 16, with checkpoints at 4, 8 and 12, and its uninterrupted twin."""
    from conftest import StopTraining, tiny_gpt2

    settings = {"max_steps": 16, "save_every": 4, "keep_checkpoints": 3}
    full_cfg = tiny_run_config(tmp_path / "full", text_corpus, train=settings)
    blocks = load_blocks(full_cfg.data, tokenizer, data_dir=tmp_path / "data")
    full, _ = train(tiny_gpt2(seed=0), lm_loss_fn, blocks, full_cfg)
    cfg = tiny_run_config(tmp_path / "cut", text_corpus, train=settings)

    def stop(step):
        if step == 13:
            raise StopTraining

    with pytest.raises(StopTraining):
        train(tiny_gpt2(seed=0), lm_loss_fn, blocks, cfg, on_step=stop)
    assert [p.name for p in ckpt_io.list_checkpoints(cfg.run_dir)] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    return cfg, blocks, full


def _resume(cfg, blocks):
    from conftest import tiny_gpt2

    return train(tiny_gpt2(seed=7), lm_loss_fn, blocks, cfg, resume=True)


@pytest.mark.parametrize("damage", ["truncate_weights", "flip_optimizer_byte", "drop_manifest", "torn_state"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(interrupted, capsys, damage):
    cfg, blocks, full = interrupted
    newest = cfg.run_dir / "checkpoint-12"
    if damage == "truncate_weights":
        f = newest / ckpt_io.MODEL_FILE
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "flip_optimizer_byte":
        f = newest / ckpt_io.OPTIMIZER_TENSORS
        data = bytearray(f.read_bytes())
        data[-5] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "drop_manifest":
        (newest / ckpt_io.MANIFEST).unlink()
    else:
        f = newest / ckpt_io.STATE_FILE
        f.write_text(f.read_text()[:10])
    assert ckpt_io.newest_valid(cfg.run_dir)[0].name == "checkpoint-8"
    capsys.readouterr()
    resumed, result = _resume(cfg, blocks)
    err = capsys.readouterr().err
    assert "checkpoint-12" in err and "falling back" in err and "resumed from" in err and "checkpoint-8" in err
    assert result.step == 16
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_torn_last_metrics_line_is_dropped(interrupted):
    cfg, blocks, _ = interrupted
    log = cfg.run_dir / METRICS_FILE
    log.write_text(log.read_text() + '{"step": 13, "loss": 4.')
    _resume(cfg, blocks)
    rows = [json.loads(line) for line in log.read_text().splitlines()]  # every line parses
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 17))


def test_resume_unpickles_nothing_and_reports_tampering(interrupted, tmp_path, capsys):
    cfg, blocks, _ = interrupted
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    newest = cfg.run_dir / "checkpoint-12"
    # A pickle where accelerate would look for RNG state, and the optimizer file replaced by one.
    (newest / "random_states_0.pkl").write_bytes(pickle.dumps(Payload()))
    torch.save({"state": Payload()}, cfg.run_dir / "checkpoint-8" / ckpt_io.OPTIMIZER_TENSORS)
    capsys.readouterr()
    _, result = _resume(cfg, blocks)
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "random_states_0.pkl" in err and "tampered" in err  # refused loudly, not ignored
    assert any("checkpoint-8" in line and "does not match its manifest" in line for line in err.splitlines())
    assert "resumed from" in err and "checkpoint-4" in err and result.step == 16
    assert not list(cfg.run_dir.rglob("*.pkl")) and not list(cfg.run_dir.rglob("*.bin"))  # only our own files now


def test_checkpoints_hold_no_pickles(interrupted):
    cfg, _, _ = interrupted
    names = {p.name for p in (cfg.run_dir / "checkpoint-12").iterdir()}
    assert names == {ckpt_io.MODEL_FILE, ckpt_io.OPTIMIZER_TENSORS, ckpt_io.OPTIMIZER_GROUPS, ckpt_io.STATE_FILE,
                     ckpt_io.MANIFEST, *ckpt_io.rng_files(0)}


@pytest.mark.parametrize("devices", [12, 3])
def test_cuda_rng_states_are_restored_in_device_order(tmp_path, monkeypatch, devices):
    """Twelve saved CUDA states go back by device index (as text, torch_cuda_10 sorts before torch_cuda_2),
    as many as there are devices."""
    tensors, meta = ckpt_io.capture_rng()
    tensors.update({f"torch_cuda_{i}": torch.full((16,), i, dtype=torch.uint8) for i in range(12)})
    ckpt_io.save_rng(tmp_path, 0, (tensors, meta))
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    assert ckpt_io.restore_rng(tmp_path, 0)
    assert [int(t[0]) for t in restored] == list(range(devices))


# ------------------------------------------------------------------------------ separate processes

KILL_IN_CHECKPOINT = """
import os, signal, sys
from python3_distillation import checkpoint
real = checkpoint.save_optimizer
def save_optimizer(optimizer, folder):
    if folder.name == ".checkpoint-8.partial":  # the weights of checkpoint-8 are written, the rest is not
        os.kill(os.getpid(), signal.SIGKILL)
    real(optimizer, folder)
checkpoint.save_optimizer = save_optimizer
from python3_distillation.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_then_resume(tmp_path, text_corpus):
    settings = {"max_steps": 12, "save_every": 4}
    full = _cli(["teacher", *tiny_overrides(tmp_path / "full", text_corpus, train=settings)])
    assert full.returncode == 0, full.stderr[-2000:]
    args = ["teacher", *tiny_overrides(tmp_path / "cut", text_corpus, train=settings)]
    killed = subprocess.run([sys.executable, "-c", KILL_IN_CHECKPOINT, *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = tmp_path / "cut" / "runs" / "teacher"
    assert (run_dir / ".checkpoint-8.partial").is_dir() and not (run_dir / "checkpoint-8").exists()
    resumed = _cli(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr and "checkpoint-4" in resumed.stderr
    assert_same_weights(tmp_path / "full" / "teacher", tmp_path / "cut" / "teacher")


@pytest.mark.slow
def test_same_config_same_weights_in_separate_processes(tmp_path, text_corpus):
    """The from-scratch teacher and a randomly initialised student, each run twice in fresh processes."""
    for name in ("a", "b"):
        r = _cli(["teacher", *tiny_overrides(tmp_path / name, text_corpus, train={"max_steps": 6})])
        assert r.returncode == 0, r.stderr[-2000:]
    assert_same_weights(tmp_path / "a" / "teacher", tmp_path / "b" / "teacher")
    for name in ("a", "b"):
        r = _cli(["distill", *tiny_overrides(tmp_path / name, text_corpus, "distill", train={"max_steps": 6},
                                             student={"init": "random", "n_layer": 1})])
        assert r.returncode == 0, r.stderr[-2000:]
    assert_same_weights(tmp_path / "a" / "student", tmp_path / "b" / "student")
    meta = json.loads((tmp_path / "a" / "student" / "distill_meta.json").read_text())
    assert meta["seed"] == 1337 and meta["student_init"]["init"] == "random"


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume(tmp_path, text_corpus):
    settings = {"max_steps": 30, "save_every": 4, "log_every": 1}
    full = _cli(["teacher", *tiny_overrides(tmp_path / "full", text_corpus, train=settings)])
    assert full.returncode == 0, full.stderr[-2000:]
    args = ["teacher", *tiny_overrides(tmp_path / "cut", text_corpus, train=settings)]
    run_dir = tmp_path / "cut" / "runs" / "teacher"
    proc = subprocess.Popen([sys.executable, "-m", "python3_distillation", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoint-8").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "teacher").exists()
    resumed = _cli(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    assert_same_weights(tmp_path / "full" / "teacher", tmp_path / "cut" / "teacher")
