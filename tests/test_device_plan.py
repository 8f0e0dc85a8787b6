"""Per-device decisions (device_plan.py) tested on CPU with the GPU's facts faked; tests/test_cuda.py meets a real one.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_device_plan.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_gpt2, tiny_run_config
from python3_distillation import device_plan, losses
from python3_distillation.device_plan import DevicePlan, Precision, decide_compile, serving_dtype


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    """torch.cuda's answers for a GPU that is not here (``is_bf16_supported`` as torch answers it)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or capability[0] >= 8)
    monkeypatch.setattr(torch.version, "hip", None)


# ----------------------------------------------------------------------------------- KL chunks

def test_kl_chunks_are_cache_sized_on_cpu_and_large_on_cuda():
    assert losses.CHUNK_ELEMENTS == 16 * 50257  # the CPU size the make run weights were trained with
    assert losses.default_chunk_rows(50257) == losses.default_chunk_rows(50257, "cpu") == 16
    assert losses.default_chunk_rows(50257, "cuda") == losses.default_chunk_rows(50257, torch.device("cuda", 1)) == 1024
    assert losses.default_chunk_rows(10**9, "cuda") == 1


def test_kd_loss_asks_for_the_chunk_of_its_logits_device(monkeypatch):
    asked, used = [], []
    monkeypatch.setattr(losses, "kd_chunk_elements", lambda device: asked.append(torch.device(device)) or 4 * 50)
    real_map = losses.map_chunks
    monkeypatch.setattr(losses, "map_chunks", lambda fn, n, rows, device: used.append(rows) or real_map(fn, n, rows, device))
    s, t = torch.randn(3, 7, 50), torch.randn(3, 7, 50)
    losses.kd_loss(s, t)
    assert asked == [torch.device("cpu")] and set(used) == {4}


# ------------------------------------------------------------------------------------- compile

def test_compile_auto_is_off_on_cpu_and_on_for_cuda_with_triton(monkeypatch):
    assert decide_compile("auto", "cpu", has_triton=lambda: True)[0] is False
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    on, why = decide_compile("auto", "cuda", has_triton=lambda: True)
    assert on and "9.0" in why and "triton" in why
    off, why = decide_compile("auto", "cuda", has_triton=lambda: False)
    assert not off and "triton" in why
    fake_gpu(monkeypatch, "Tesla P100", (6, 0))
    assert decide_compile("auto", "cuda", has_triton=lambda: True) == (False, "compute capability 6.0 < 7.0: "
                                                                       "inductor's triton kernels need 7.0")
    assert decide_compile("on", "cpu") == (True, "set explicitly")
    assert decide_compile("off", "cuda") == (False, "set explicitly")
    with pytest.raises(ValueError, match="expected auto, on or off"):
        decide_compile("max", "cpu")


def test_train_compile_is_a_typed_config_field():
    from python3_distillation.config import ConfigError, load_config

    assert load_config(["v2"]).train.compile == "auto"
    assert load_config(["v2"], ["train.compile=off"]).train.compile == "off"  # YAML's bare off is False
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(["v2"], ["train.compile=fast"])


def test_compile_blocks_keeps_names_and_weights():
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert device_plan.compile_blocks(model) == model.config.n_layer
    assert all(block._compiled_call_impl is not None for block in model.transformer.h)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# ------------------------------------------------------------------------------------ the plan

@pytest.fixture
def tf32_off():
    """TF32 off for the test, restored after (a process-wide flag; monkeypatch cannot undo it)."""
    was = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = was


def test_cpu_plan_changes_nothing_and_says_so(tf32_off):
    plan = device_plan.plan("cpu", Precision("no", "set explicitly", "no"), compile="auto")
    assert (plan.compile, plan.tf32, plan.prefetch, plan.pin_memory) == (False, False, False, False)
    plan.apply()
    assert torch.backends.cuda.matmul.allow_tf32 is False
    precision_line, compile_line, device_line = plan.lines(10)
    assert precision_line == "precision: fp32 — set explicitly" and compile_line.startswith("compile: off — cpu:")
    assert device_line == ("device: cpu — KL in chunks of 16 rows of a 50,257-token vocabulary; fp32 matmuls in fp32; "
                           "batches gathered in place; losses read back every 10 steps (train.log_every)")


def test_cuda_plan_turns_on_tf32_for_cuda_only(tf32_off):
    cpu_matmul = torch.backends.mkldnn.matmul.fp32_precision
    plan = DevicePlan("cuda:0", Precision("bf16", "native"), True, "why", "auto")
    assert (plan.tf32, plan.prefetch, plan.pin_memory, plan.kd_chunk_elements) == (True, True, True, 1024 * 50257)
    plan.apply()
    assert torch.backends.cuda.matmul.allow_tf32 is True
    assert torch.backends.mkldnn.matmul.fp32_precision == cpu_matmul  # CPU matmuls untouched
    line = plan.device_line()
    assert "1,024 rows" in line and "TF32" in line and "pinned memory" in line
    assert json.loads(json.dumps(plan.to_dict()))["compile"] == {"on": True, "requested": "auto", "reason": "why"}


# ------------------------------------------------------------------------ batches and syncs

def test_prefetcher_makes_the_next_batch_ahead_only_when_asked(monkeypatch):
    from python3_distillation import train as train_module
    from python3_distillation.data import Blocks

    made = []

    def fake_make_batch(blocks, idx, device, pin=None):
        made.append((int(idx[0]), pin))
        return {"k": int(idx[0])}

    monkeypatch.setattr(train_module, "make_batch", fake_make_batch)
    blocks = Blocks(torch.zeros(10, 4, dtype=torch.long))
    rows = lambda k: torch.tensor([k])  # noqa: E731
    ahead = train_module.BatchPrefetcher(blocks, rows, "cuda", prefetch=True, end=3)
    assert [ahead.get(k)["k"] for k in range(3)] == [0, 1, 2]
    assert made == [(0, True), (1, True), (2, True)]  # each made once, one ahead, none past the end
    made.clear()
    plain = train_module.BatchPrefetcher(blocks, rows, "cpu", prefetch=False, end=3)
    assert [plain.get(k)["k"] for k in range(3)] == [0, 1, 2]
    assert made == [(0, False), (1, False), (2, False)]  # made when asked, unpinned


def test_the_loop_reads_losses_back_only_when_it_logs(tmp_path, text_corpus, monkeypatch):
    """No ``float()``/``.item()`` of a tensor inside the loop (each one is a host sync on CUDA); one
    read-back per logged step."""
    from python3_distillation import train as train_module
    from python3_distillation.teacher import run_teacher

    syncs = []
    for name in ("__float__", "item"):
        real = getattr(torch.Tensor, name)

        def spy(self, _real=real):
            syncs.append(sys._getframe(1).f_code.co_name)
            return _real(self)

        monkeypatch.setattr(torch.Tensor, name, spy)
    reads = []
    real_read = train_module._read_back
    monkeypatch.setattr(train_module, "_read_back", lambda *args: reads.append(1) or real_read(*args))
    run_teacher(tiny_run_config(tmp_path, text_corpus, train={"max_steps": 6, "log_every": 3, "grad_accum": 2}))
    assert "train" not in syncs
    assert len(reads) == 2


# ------------------------------------------------------------------------------------- serving

@pytest.mark.parametrize("name, capability, dtype", [
    ("NVIDIA H100 80GB HBM3", (9, 0), torch.bfloat16), ("NVIDIA L4", (8, 9), torch.bfloat16),
    ("Tesla T4", (7, 5), torch.float16), ("Tesla P100", (6, 0), torch.float32),
])
def test_serving_dtype_auto_follows_the_gpu(monkeypatch, name, capability, dtype):
    fake_gpu(monkeypatch, name, capability)
    got, why = serving_dtype("auto", "cuda")
    assert got == dtype and name in why
    got, why = serving_dtype("auto", "cuda", int8=True)
    assert got == dtype and "int8 is a CPU format" in why and "dequantized once" in why
    assert serving_dtype("fp32", "cuda", int8=True)[0] == torch.float32


def test_serving_dtype_on_cpu_is_fp32_and_int8_stays_int8():
    assert serving_dtype("auto", "cpu") == (torch.float32, "cpu: fp32")
    assert serving_dtype("auto", "cpu", int8=True) == (None, "int8 kernels on CPU")
    assert serving_dtype("bf16", "cpu") == (torch.bfloat16, "set explicitly")
    with pytest.raises(ValueError, match="expected one of auto, fp32, bf16, fp16"):
        serving_dtype("int4", "cpu")


def test_server_settings_take_the_dtype(monkeypatch):
    from python3_distillation.serving.cli import build_parser, config_from
    from python3_distillation.serving.settings import ServeConfig

    assert ServeConfig().dtype == "auto"
    assert ServeConfig.from_env({"DISTILL_DTYPE": "fp16"}).dtype == "fp16"
    with pytest.raises(ValueError, match=r"dtype \(DISTILL_DTYPE\): input should be 'auto', 'fp32', 'bf16' or 'fp16'"):
        ServeConfig.from_env({"DISTILL_DTYPE": "int4"})
    args = build_parser("v2").parse_args(["--dtype", "bf16", "--model", str(ROOT)])
    assert config_from(args).dtype == "bf16"


@pytest.fixture
def int8_folder(tmp_path, tokenizer):
    from python3_distillation.quantize import run_quantize

    src = tmp_path / "tiny"
    model = tiny_gpt2(n_positions=64)
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    return src, run_quantize(src, tmp_path / "tiny_int8", measure=False)


def test_an_int8_folder_on_a_faked_gpu_is_served_dequantized(monkeypatch, int8_folder):
    from python3_distillation import int8 as int8_module
    from python3_distillation.generation import Generator
    from python3_distillation.serving.settings import ServeConfig
    from python3_distillation.serving.state import ServingState

    _, int8_dir = int8_folder
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    state = ServingState(ServeConfig(model_dirs=[str(int8_dir)], device="cuda"))
    dtype, why = state.weights_dtype(int8_dir)
    assert dtype == torch.bfloat16 and "dequantized once at load" in why
    state.close()
    # The load itself, on CPU (no GPU here): the same dequantize-once path, then the same numbers
    # as the int8 layers computing scale·q per call in fp32.
    served = Generator.from_pretrained(int8_dir, device="cpu", dtype="fp32")
    assert served.precision == "fp32 (int8 dequantized at load)"
    assert type(served.model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    int8 = Generator.from_pretrained(int8_dir, device="cpu")
    assert int8.precision == "int8"
    monkeypatch.setitem(int8_module._KERNEL_OK, "cpu", False)  # the per-call fp32 dequantization path
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(served.model(input_ids=ids).logits, int8.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- evaluation

def test_quality_on_cpu_gives_the_numbers_it_always_gave():
    """The sums moved onto the model's device; on CPU they must equal the old host-side arithmetic."""
    import torch.nn.functional as F

    from python3_distillation.data import Blocks
    from python3_distillation.evaluation.measure import quality

    a, b = tiny_gpt2(seed=1).eval(), tiny_gpt2(seed=2).eval()
    blocks = Blocks(torch.randint(0, a.config.vocab_size, (5, 24), generator=torch.Generator().manual_seed(0)))
    got = quality({"a": a, "b": b}, blocks, reference="a", batch_size=2)
    loss = top1 = kl = 0.0
    targets = positions = 0
    with torch.no_grad():
        for start in range(0, 5, 2):
            ids = blocks.ids[start:start + 2]
            ref = F.log_softmax(a(input_ids=ids).logits.float(), -1)
            logits = b(input_ids=ids).logits.float()
            loss += losses.lm_loss(logits, ids).item() * ids[:, 1:].numel()
            top1 += (logits.argmax(-1) == ref.argmax(-1)).sum().item()
            kl += (ref.exp() * (ref - F.log_softmax(logits, -1))).sum().item()
            targets += ids[:, 1:].numel()
            positions += ids.numel()
    assert got["b"]["loss"] == loss / targets and got["b"]["top1"] == top1 / positions
    assert got["b"]["kl"] == kl / positions


def test_the_plan_prints_from_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "python3_distillation.device_plan"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**__import__("os").environ, "MIXED_PRECISION": "no"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["precision", "compile", "device"]
