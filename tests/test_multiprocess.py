"""Two training processes on CPU (gloo), launched the way a multi-GPU run is: ``accelerate launch``.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_multiprocess.py -q

The real CLI runs the teacher stage (the one training loop) under

    CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no --main_process_port PORT WRAPPER teacher ...

``--multi_gpu`` picks accelerate's torchrun launcher, which starts the processes; with no CUDA
device visible they train on CPU over gloo. accelerate 1.15's ``--cpu --num_processes 2`` starts
one process unless MPI is set up (``--mpirun_hostfile``). The one-process reference runs the same
wrapper with plain ``python``, also on CPU, so the comparison holds on a machine with a GPU too.
WRAPPER is the CLI plus instrumentation: it records the blocks each process reads, records any
write of a process other than rank 0 under the test's folders (an audit hook on files and folders,
and safetensors' writer, which bypasses Python's ``open``), and can SIGKILL every process at a step.

Checked: the processes read disjoint halves of each global batch; with ``train.batch_size`` halved
the result equals a one-process run (fp32, tolerance below: only the order of float additions
differs, DDP averaging two half-batch gradients); only rank 0 writes; a run killed under two
processes and resumed under two processes ends with the same weights, bit for bit, as an
uninterrupted two-process run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, tiny_overrides
from python3_distillation.cli import main as cli_main

pytestmark = pytest.mark.slow

ACCELERATE = Path(sys.executable).with_name("accelerate")
STEPS, SAVE_EVERY, KILL_AT = 8, 4, 6  # the killed run dies reading step 6's batch: checkpoint-4 is its last
# One process vs two, fp32, 8 AdamW steps at lr 3e-3: measured max |Δw| 2.6e-6 (weights up to ~1).
WEIGHT_ATOL, WEIGHT_RTOL = 1e-5, 1e-5
LOSS_ATOL = 2e-5  # logged losses are rounded to 5 decimals

WRAPPER = r'''
import json, os, signal, sys

rank = int(os.environ.get("RANK", "0"))
record_dir = os.environ["MP_RECORD_DIR"]
watch = [os.path.realpath(p) for p in os.environ["MP_WATCH"].split(os.pathsep)]
kill_at = int(os.environ.get("MP_KILL_AT", "0"))
# Opened before the audit hook exists; written with os.write so recording never re-enters the hook.
log_fd = os.open(os.path.join(record_dir, f"rank{rank}.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def record(**row):
    os.write(log_fd, (json.dumps(row) + "\n").encode())


def watched(path):
    try:
        p = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return any(p == w or p.startswith(w + os.sep) for w in watch)


WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATH_EVENTS = {"os.mkdir": 0, "os.rename": 0, "os.remove": 0, "os.rmdir": 0, "shutil.rmtree": 0,
               "os.truncate": 0, "os.symlink": 1, "os.link": 1, "os.chmod": 0, "os.utime": 0}


def audit(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & WRITE_FLAGS)
        if writing and watched(path):
            record(kind="write", event=event, path=os.fsdecode(path))
    elif event in PATH_EVENTS and args and isinstance(args[PATH_EVENTS[event]], (str, bytes, os.PathLike)):
        if watched(args[PATH_EVENTS[event]]):
            record(kind="write", event=event, path=os.fsdecode(args[PATH_EVENTS[event]]))


if rank != 0:
    sys.addaudithook(audit)
    import safetensors.torch as st

    real_serialize = st.serialize_file

    def serialize_file(tensors, filename, *a, **k):
        if watched(filename):
            record(kind="write", event="safetensors", path=os.fsdecode(filename))
        return real_serialize(tensors, filename, *a, **k)

    st.serialize_file = serialize_file

import python3_distillation.train as train_module

real_make_batch = train_module.make_batch
train_calls = 0


def make_batch(blocks, idx, device, **kwargs):
    global train_calls
    record(kind="batch", n=len(blocks), idx=idx.tolist())
    if len(blocks) == int(os.environ["MP_TRAIN_BLOCKS"]):
        train_calls += 1
        if train_calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_make_batch(blocks, idx, device, **kwargs)


train_module.make_batch = make_batch
from python3_distillation.cli import main

sys.exit(main(sys.argv[1:]))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _settings(root: Path, corpus: dict[str, Path], batch_size: int) -> list[str]:
    return tiny_overrides(root, corpus, train={"max_steps": STEPS, "save_every": SAVE_EVERY, "batch_size": batch_size,
                                               "keep_checkpoints": 3})


def _launch(root: Path, args: list[str], record: Path, train_blocks: int, kill_at: int = 0,
            processes: int = 2, devices: str = "") -> subprocess.CompletedProcess:
    """``devices`` is CUDA_VISIBLE_DEVICES: empty trains on CPU over gloo, GPUs over nccl (test_cuda.py)."""
    record.mkdir(parents=True, exist_ok=True)
    wrapper = record / "wrapper.py"
    wrapper.write_text(WRAPPER)
    env = {**os.environ, "MP_RECORD_DIR": str(record), "MP_WATCH": str(root), "MP_KILL_AT": str(kill_at),
           "MP_TRAIN_BLOCKS": str(train_blocks), "CUDA_VISIBLE_DEVICES": devices, "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(wrapper), *args] if processes == 1 else [
        str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(wrapper), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    """One process (batch 4), two processes (batch 2 each), and two processes killed then resumed."""
    from conftest import TEXT
    from python3_distillation.config import load_config
    from python3_distillation.data import load_blocks

    if not ACCELERATE.exists():
        pytest.fail(f"{ACCELERATE} is missing: the train extra (accelerate) is not installed")
    tmp = tmp_path_factory.mktemp("multiprocess")
    corpus = {"train": tmp / "train.txt", "validation": tmp / "validation.txt"}
    corpus["train"].write_text(TEXT * 40, encoding="utf-8")
    corpus["validation"].write_text(TEXT * 4, encoding="utf-8")
    out: dict = {"root": tmp}

    one = _settings(tmp / "one", corpus, 4)
    n_train = len(load_blocks(load_config([], one).data, tokenizer)["train"])  # also prepares the shards once
    out["n_train"] = n_train
    out["one"] = _launch(tmp / "one", ["teacher", *one], tmp / "record-one", n_train, processes=1)
    two = _settings(tmp / "two", corpus, 2)
    out["two"] = _launch(tmp / "two", ["teacher", *two], tmp / "record-two", n_train)
    cut = _settings(tmp / "cut", corpus, 2)
    out["killed"] = _launch(tmp / "cut", ["teacher", *cut], tmp / "record-killed", n_train, kill_at=KILL_AT)
    out["resumed"] = _launch(tmp / "cut", ["teacher", *cut, "--resume"], tmp / "record-resumed", n_train)
    yield out
    shutil.rmtree(tmp, ignore_errors=True)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_two_processes_read_disjoint_halves_of_each_global_batch(runs):
    _ok(runs["one"])
    _ok(runs["two"])
    record = runs["root"] / "record-two"
    per_rank, one_process = ([[r["idx"] for r in _rows(folder / f"rank{k}.jsonl") if r["kind"] == "batch"
                               and r["n"] == runs["n_train"]] for k in ranks]
                             for folder, ranks in ((record, (0, 1)), (runs["root"] / "record-one", (0,))))
    assert len(per_rank[0]) == len(per_rank[1]) == len(one_process[0]) == STEPS
    for step, (a, b, whole) in enumerate(zip(*per_rank, one_process[0]), 1):
        assert len(a) == len(b) == 2, step
        assert not set(a) & set(b), f"step {step}: both processes read blocks {set(a) & set(b)}"
        assert sorted(a + b) == sorted(whole), f"step {step}: not the one-process run's global batch"
    # Validation is split too: each process evaluates other blocks, together all of them once.
    val = [[i for r in _rows(record / f"rank{k}.jsonl") if r["kind"] == "batch" and r["n"] != runs["n_train"]
            for i in r["idx"]] for k in (0, 1)]
    assert val[0] and val[1] and not set(val[0]) & set(val[1])
    assert sorted(val[0] + val[1]) == list(range(8))  # data.max_eval_blocks=8


def test_two_processes_equal_one_process_with_the_same_global_batch(runs):
    _ok(runs["one"])
    _ok(runs["two"])
    root = runs["root"]
    one, two = _weights(root / "one" / "teacher"), _weights(root / "two" / "teacher")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL, msg=k)
    # The log: the loss of the whole batch (mean over processes), the global token count, the same
    # validation loss (split over processes, summed back).
    log_one = _rows(root / "one" / "runs" / "teacher" / "metrics.jsonl")
    log_two = _rows(root / "two" / "runs" / "teacher" / "metrics.jsonl")
    assert [r["step"] for r in log_one] == [r["step"] for r in log_two]
    for a, b in zip(log_one, log_two):
        if "loss" in a:
            assert b["loss"] == pytest.approx(a["loss"], abs=LOSS_ATOL) and b["tokens"] == a["tokens"], (a, b)
        else:
            assert b["val_loss"] == pytest.approx(a["val_loss"], abs=LOSS_ATOL), (a, b)
    meta_one = json.loads((root / "one" / "teacher" / "distill_meta.json").read_text())
    meta_two = json.loads((root / "two" / "teacher" / "distill_meta.json").read_text())
    assert meta_two["val_loss"] == pytest.approx(meta_one["val_loss"], abs=1e-5)
    assert meta_two["train_tokens"] == meta_one["train_tokens"]


def test_only_rank_0_writes(runs):
    _ok(runs["two"])
    root = runs["root"]
    for name in ("record-two", "record-killed", "record-resumed"):
        writes = [r for r in _rows(root / name / "rank1.jsonl") if r["kind"] == "write"]
        assert writes == [], f"{name}: rank 1 wrote {writes[:5]}"
        assert [r for r in _rows(root / name / "rank0.jsonl") if r["kind"] == "write"] == []  # rank 0 is not audited
    # ... and rank 0 wrote every process's RNG state into each checkpoint, listed in its manifest.
    run_dir = root / "two" / "runs" / "teacher"
    for ckpt in ("checkpoint-4", "checkpoint-8"):
        listed = json.loads((run_dir / ckpt / "manifest.json").read_text())["files"]
        assert {"rng-0.safetensors", "rng-0.json", "rng-1.safetensors", "rng-1.json"} <= set(listed)
        assert json.loads((run_dir / ckpt / "trainer_state.json").read_text())["world_size"] == 2
    # The stage printed its result once (the main process saves, the other returns).
    assert runs["two"].stdout.count("teacher saved to") == 1, runs["two"].stdout
    assert ": processes: 2 over gloo" in runs["two"].stderr  # CPU processes: gloo (CUDA: test_cuda.py)


def test_kill_and_resume_under_two_processes_equals_uninterrupted(runs):
    _ok(runs["two"])
    killed, resumed = runs["killed"], runs["resumed"]
    root = runs["root"]
    assert killed.returncode != 0, "the killed run finished"
    assert "SIGKILL" in killed.stderr or "Signals.SIGKILL" in killed.stderr or "-9" in killed.stderr, killed.stderr[-3000:]
    _ok(resumed)
    assert "resumed from" in resumed.stderr and "checkpoint-4" in resumed.stderr, resumed.stderr[-3000:]
    two, cut = _weights(root / "two" / "teacher"), _weights(root / "cut" / "teacher")
    assert two.keys() == cut.keys()
    for k in two:
        assert torch.equal(two[k], cut[k]), k
    steps = [r["step"] for r in _rows(root / "cut" / "runs" / "teacher" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # the killed run's rows past checkpoint-4 were dropped


def test_resume_refuses_another_number_of_processes(runs, capsys):
    """A two-process checkpoint resumed by one process is refused (the RNG states and data split differ)."""
    _ok(runs["resumed"])
    root = runs["root"]
    corpus = {"train": root / "train.txt", "validation": root / "validation.txt"}
    args = ["teacher", *_settings(root / "cut", corpus, 2), "train.max_steps=12", "--resume"]
    capsys.readouterr()
    assert cli_main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "2 process(es), this launch has 1" in err[0]
