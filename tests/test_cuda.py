"""The CUDA path on a real GPU: skipped (reported as skipped, never passed) where there is none.

    HF_HUB_OFFLINE=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 python -m pytest -m cuda tests/test_cuda.py -q
    make gpu-check                   # runs these first, then the real-shape numbers (scripts/gpu_check.py)

The same decisions are tested on CPU with the device facts faked in tests/test_device_plan.py; here
they meet a GPU: greedy tokens CPU fp32 == CUDA fp32, bf16 within a stated tolerance, ``kd_loss``'s
large CUDA chunks against the CPU reference, kill-and-resume, int8 folders served on CUDA, the server
answering the ``openai`` client, and nccl for two processes where there are two GPUs.
"""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from conftest import TEXT, StopTraining, tiny_gpt2, tiny_run_config

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, if CUDA starts after this

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check on one)")]

CUDA = torch.device("cuda")
# bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%); through 2 blocks and the LM head of a
# tiny random model the logits drift by a few of those steps.
BF16_ATOL = BF16_RTOL = 5e-2


@pytest.fixture
def corpus(tmp_path):
    train, val = tmp_path / "train.txt", tmp_path / "validation.txt"
    train.write_text(TEXT * 40, encoding="utf-8")
    val.write_text(TEXT * 4, encoding="utf-8")
    return {"train": train, "validation": val}


@pytest.fixture
def saved_tiny(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path / "tiny"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=50257,
                               bos_token_id=50256, eos_token_id=50256)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_greedy_tokens_cpu_fp32_equal_cuda_fp32(saved_tiny):
    from python3_distillation.generation import Generator, SamplingParams

    params = SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True)
    prompts = ["It is a truth universally acknowledged", "The cat sat"]
    cpu = Generator.from_pretrained(saved_tiny, device="cpu", dtype="fp32").generate(prompts, params)
    gpu = Generator.from_pretrained(saved_tiny, device="cuda", dtype="fp32")
    assert gpu.device.type == "cuda"
    assert [c.token_ids for c in gpu.generate(prompts, params)] == [c.token_ids for c in cpu]


def test_bf16_logits_within_tolerance_of_fp32():
    model = tiny_gpt2(n_layer=2, n_embd=64, n_head=2).to(CUDA).eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(0)).to(CUDA)
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        low = model.to(torch.bfloat16)(input_ids=ids).logits.float()
    torch.testing.assert_close(low, ref, atol=BF16_ATOL, rtol=BF16_RTOL)


def test_kd_loss_on_cuda_matches_the_cpu_reference():
    from python3_distillation.losses import default_chunk_rows, kd_loss

    assert default_chunk_rows(50257, CUDA) == 1024 and default_chunk_rows(50257, "cpu") == 16
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 1100, 50257, generator=g), torch.randn(2, 1100, 50257, generator=g)  # 3 CUDA chunks
    mask = torch.ones(2, 1100)
    mask[1, 700:] = 0
    for beta in (0.0, 1.0, 0.5):
        s_cpu, s_gpu = s.clone().requires_grad_(), s.to(CUDA).requires_grad_()
        ref = kd_loss(s_cpu, t, mask, temperature=2.0, beta=beta)
        got = kd_loss(s_gpu, t.to(CUDA), mask.to(CUDA), temperature=2.0, beta=beta)
        ref.backward()
        got.backward()
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s_gpu.grad.cpu(), s_cpu.grad, rtol=1e-4, atol=1e-9)


def test_kill_and_resume_on_cuda(tmp_path, corpus, capsys):
    from safetensors.torch import load_file

    from python3_distillation.teacher import run_teacher

    train = {"max_steps": 6, "save_every": 2, "mixed_precision": "no"}
    whole = run_teacher(tiny_run_config(tmp_path / "whole", corpus, train=train))
    meta = json.loads((whole / "distill_meta.json").read_text())
    assert meta["precision"]["mode"] == "no"

    def die(step):
        if step == 3:
            raise StopTraining

    cut_cfg = tiny_run_config(tmp_path / "cut", corpus, train=train)
    with pytest.raises(StopTraining):
        run_teacher(cut_cfg, on_step=die)
    capsys.readouterr()
    cut = run_teacher(cut_cfg, resume=True)
    assert "resumed from" in capsys.readouterr().err
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys()
    # SDPA's CUDA backward may sum in another order from run to run: equal to float rounding, not bits.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=k)


def test_int8_folder_on_cuda_is_served_dequantized_and_matches_fp32(saved_tiny, tmp_path):
    from python3_distillation.device_plan import serving_dtype
    from python3_distillation.generation import Generator, SamplingParams
    from python3_distillation.quantize import run_quantize

    int8_dir = run_quantize(saved_tiny, tmp_path / "tiny_int8", measure=False)
    dtype, why = serving_dtype("auto", CUDA, int8=True)
    assert dtype in (torch.bfloat16, torch.float16) and "dequantized once" in why
    served = Generator.from_pretrained(int8_dir, device="cuda", dtype=dtype)
    assert "int8 dequantized at load" in served.precision and served.device.type == "cuda"
    assert not any(p.dtype == torch.int8 for p in served.model.parameters())
    fp32 = Generator.from_pretrained(saved_tiny, device="cuda", dtype="fp32")
    ids = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(1)).to(CUDA)
    with torch.no_grad():
        ref = torch.log_softmax(fp32.model(input_ids=ids).logits.float(), -1)
        got = torch.log_softmax(served.model(input_ids=ids).logits.float(), -1)
    # int8 rounding (≤ 0.5/127 of a row's largest weight) plus bf16: log-probabilities within 0.1 nats.
    assert (got - ref).abs().max().item() < 0.1
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    assert all(c.completion_tokens == 8 for c in served.generate(["The cat sat"], params))


def test_server_on_cuda_answers_the_openai_client(saved_tiny):
    from openai import OpenAI
    from werkzeug.serving import make_server

    from python3_distillation.serving.app import create_app
    from python3_distillation.serving.settings import ServeConfig

    app = create_app(ServeConfig(model_dirs=[str(saved_tiny)], device="cuda", load_in_background=False))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        client = OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
        (model,) = [m.id for m in client.models.list()]
        out = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
        assert out.choices[0].text and out.usage.completion_tokens >= 1
        info = app.test_client().get("/api/info").get_json()["models"][0]
        assert info["device"].startswith("cuda")
        assert info["precision"] in ("bf16", "fp16") and info["precision_reason"]
    finally:
        server.shutdown()
        app.extensions["distill"].close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl needs a GPU per process: 2 GPUs")
def test_two_processes_on_two_gpus_use_nccl(tmp_path, tokenizer):
    from test_multiprocess import _launch, _settings

    from python3_distillation.config import load_config
    from python3_distillation.data import load_blocks

    corpus = {"train": tmp_path / "train.txt", "validation": tmp_path / "validation.txt"}
    corpus["train"].write_text(TEXT * 40, encoding="utf-8")
    corpus["validation"].write_text(TEXT * 4, encoding="utf-8")
    args = _settings(tmp_path / "two", corpus, 2)
    n_train = len(load_blocks(load_config([], args).data, tokenizer)["train"])
    proc = _launch(tmp_path / "two", ["teacher", *args], tmp_path / "record", n_train, devices="0,1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "processes: 2 over nccl" in proc.stderr
    assert (tmp_path / "two" / "teacher" / "model.safetensors").exists()
