"""Students for other engines: GGUF read back by llama.cpp's reader, ONNX greedy in ONNX Runtime, int8 in plain transformers.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_export.py -q
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import spread, tiny_gpt2
from python3_distillation.cli import main as cli_main
from python3_distillation.models import open_model, save_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    """A saved tiny fp32 student (2 blocks, width 64, a narrower MLP like a pruned one: 96 neurons)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_inner=96, n_positions=64, vocab_size=50257,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=50256, eos_token_id=50256)
    model = spread(GPT2LMHeadModel(cfg).eval())
    return save_model(model, tokenizer, tmp_path_factory.mktemp("export") / "student")


# ----------------------------------------------------------------------------------------- config.json

def test_saved_config_carries_n_ctx_and_the_same_weights(tmp_path, tokenizer):
    model = tiny_gpt2()
    out = save_model(model, tokenizer, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert config["n_ctx"] == config["n_positions"] == 64  # llama.cpp's converter reads n_ctx
    loaded = open_model(out).model
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------------------- GGUF

def _field(reader, key):
    return reader.fields[key].contents()


def _gguf_tensors(reader) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32 in its GGUF row layout ([out, in] for matrices)."""
    import gguf

    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (np.asarray(data, dtype=np.float32), t.tensor_type)
    return out


def _source_tensors(model) -> dict[str, np.ndarray]:
    """The fp32 source under GGUF names, Conv1D weights transposed to [out, in]."""
    names = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}
    parts = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name not in names:
            _, _, i, *rest = name.split(".")
            module, kind = ".".join(rest[:-1]), rest[-1]
            names[name] = f"blk.{i}.{parts[module]}.{kind}"
            if module in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj") and kind == "weight":
                t = t.t()
        out[names[name]] = t.detach().float().numpy()
    return out


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_gguf_reads_back_with_llama_cpps_reader(folder, tmp_path, tokenizer, kind):
    import gguf

    out = tmp_path / f"student-{kind}.gguf"
    assert cli_main(["export", str(folder), "--to", "gguf", "--type", kind, "--out", str(out)]) == 0
    reader = gguf.GGUFReader(out)
    assert _field(reader, "general.architecture") == "gpt2"
    assert _field(reader, "gpt2.context_length") == 64
    assert _field(reader, "gpt2.embedding_length") == 64
    assert _field(reader, "gpt2.block_count") == 2
    assert _field(reader, "gpt2.feed_forward_length") == 96  # the real MLP width, not 4 × n_embd
    assert _field(reader, "gpt2.attention.head_count") == 2
    assert _field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert _field(reader, "general.file_type") == {"f32": 0, "f16": 1, "q8_0": 7}[kind]
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 50257 and tokens[15496] == "Hello" and tokens[995] == "Ġworld"
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[50256] == gguf.TokenType.CONTROL and set(types[:50256]) == {gguf.TokenType.NORMAL}
    merges = _field(reader, "tokenizer.ggml.merges")
    assert len(merges) == 50000 and merges[0] == "Ġ t"
    assert _field(reader, "tokenizer.ggml.bos_token_id") == _field(reader, "tokenizer.ggml.eos_token_id") == 50256
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False

    want = _source_tensors(open_model(folder).model)
    got = _gguf_tensors(reader)
    assert set(got) == set(want)  # no output.weight: the LM head is the tied token embedding
    for name, w in want.items():
        g, qtype = got[name]
        assert g.shape == w.shape, name
        if kind == "f32" or w.ndim == 1 or name == "position_embd.weight":
            assert qtype == gguf.GGMLQuantizationType.F32 and np.array_equal(g, w), name
        elif kind == "f16":
            assert qtype == gguf.GGMLQuantizationType.F16
            assert np.array_equal(g, w.astype(np.float16).astype(np.float32)), name
        else:
            assert qtype == gguf.GGMLQuantizationType.Q8_0
            # Blocks of 32 values, scale d = max|block| / 127 stored in f16: error ≤ d/2 + 127·|d − f16(d)|.
            blocks = w.reshape(-1, 32)
            d = np.abs(blocks).max(axis=1, keepdims=True) / 127
            bound = d / 2 + 127 * d * 2.0 ** -11 + 1e-7
            assert (np.abs(g.reshape(-1, 32) - blocks) <= bound).all(), name
            assert np.abs(g - w).max() > 0  # really quantized


def test_q8_0_gguf_is_about_a_quarter_of_f32(folder, tmp_path):
    sizes = {}
    for kind in ("f32", "q8_0"):
        out = tmp_path / f"m-{kind}.gguf"
        assert cli_main(["export", str(folder), "--to", "gguf", "--type", kind, "--out", str(out)]) == 0
        sizes[kind] = out.stat().st_size
    # 8.5 bits a value for the matrices; the f32 position embeddings and norms and the vocabulary stay.
    assert 0.25 < sizes["q8_0"] / sizes["f32"] < 0.40


# ----------------------------------------------------------------------------------------- errors

def _one_error_line(err: str) -> bool:
    """One ``error:`` line (stderr also carries transformers' loading progress bar)."""
    return len([line for line in err.splitlines() if "error:" in line]) == 1 and err.rstrip().endswith(
        err.rstrip().rsplit("error:", 1)[-1])

def test_bad_inputs_are_one_line_errors_and_leave_nothing(folder, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert cli_main(["export", str(tmp_path / "missing"), "--to", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not a model folder" in err and _one_error_line(err)

    int8 = tmp_path / "int8"
    assert cli_main(["quantize", str(folder), "--out", str(int8), "--no-measure"]) == 0
    capsys.readouterr()
    for to in ("gguf", "onnx"):
        assert cli_main(["export", str(int8), "--to", to, "--out", str(tmp_path / f"q.{to}")]) == 2
        err = capsys.readouterr().err
        assert "a quantized folder" in err and "fp32" in err and _one_error_line(err)

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert cli_main(["export", str(folder), "--to", "gguf", "--out", str(blocker / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert "a_file is a file, not a folder" in err and _one_error_line(err)

    assert cli_main(["export", str(folder), "--to", "gguf", "--type", "q4_0", "--out", str(out)]) == 2
    assert "expected one of f32, f16, q8_0" in capsys.readouterr().err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "int8"]  # no temp file left anywhere


def test_a_failed_write_leaves_the_old_file_whole(folder, tmp_path, monkeypatch):
    from python3_distillation.export import to_gguf

    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")

    def broken(name, t, kind):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(to_gguf, "_encode", broken)
    assert cli_main(["export", str(folder), "--to", "gguf", "--out", str(out)]) == 2
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


# ----------------------------------------------------------------------------------------- ONNX

@pytest.fixture(scope="module")
def onnx_folder(folder):
    from python3_distillation.export import run_export

    return run_export(folder, "onnx", out=folder.with_name("student_onnx"))


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=50256)
    return out[0, len(prompt):].tolist()


def test_onnx_greedy_equals_transformers_generate(folder, onnx_folder, tokenizer):
    from python3_distillation.export.to_onnx import greedy, session

    assert (onnx_folder / "model.onnx").exists() and (onnx_folder / "tokenizer.json").exists()
    assert json.loads((onnx_folder / "config.json").read_text())["n_ctx"] == 64
    model = open_model(folder).model
    sess = session(onnx_folder, threads=1)
    names = [i.name for i in sess.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and "past_key_values.1.value" in names
    for prompt in ("It is a truth universally acknowledged", "Emma"):
        ids = tokenizer(prompt)["input_ids"]
        assert greedy(sess, ids, 24) == _hf_greedy(model, ids, 24), prompt


def test_onnx_logits_and_cache_match_transformers_with_left_padding(folder, onnx_folder):
    """A batch of two prompts, the shorter left-padded, prefilled then decoded one step: every real
    position's logits equal transformers' within fp32 rounding."""
    from python3_distillation.export.to_onnx import session

    model = open_model(folder).model
    sess = session(onnx_folder, threads=1)
    ids = torch.tensor([[50256, 50256, 464, 3797, 3332], [40, 716, 257, 922, 290]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    feed.update({i.name: np.zeros((2, 2, 0, 32), np.float32) for i in sess.get_inputs()[3:]})
    logits, *present = sess.run(None, feed)
    real = mask.bool().numpy()
    np.testing.assert_allclose(logits[real], want.logits.numpy()[real], atol=1e-4, rtol=1e-4)
    # one decode step on the returned cache
    nxt = torch.tensor([[11], [13]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    pos2 = positions[:, -1:] + 1
    with torch.no_grad():
        want2 = model(input_ids=nxt, attention_mask=mask2, position_ids=pos2, cache=want.past_key_values)
    feed = {"input_ids": nxt.numpy(), "attention_mask": mask2.numpy(), "position_ids": pos2.numpy()}
    feed.update(dict(zip([i.name for i in sess.get_inputs()[3:]], present)))
    logits2, *_ = sess.run(None, feed)
    np.testing.assert_allclose(logits2, want2.logits.numpy(), atol=1e-4, rtol=1e-4)


def test_onnx_int8_is_smaller_and_close(folder, onnx_folder, tmp_path, tokenizer):
    from python3_distillation.export.to_onnx import session

    out = tmp_path / "student_onnx_int8"
    assert cli_main(["export", str(folder), "--to", "onnx", "--int8", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("model*")) == ["model.onnx"]
    fp32, int8 = (onnx_folder / "model.onnx").stat().st_size, (out / "model.onnx").stat().st_size
    assert int8 < 0.4 * fp32
    ids = np.array([tokenizer("It is a truth universally acknowledged")["input_ids"]], dtype=np.int64)
    feeds = []
    for path in (onnx_folder, out):
        sess = session(path, threads=1)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
        feed.update({i.name: np.zeros((1, 2, 0, 32), np.float32) for i in sess.get_inputs()[3:]})
        feeds.append(sess.run(["logits"], feed)[0])
    a, b = feeds
    # Dynamic int8 (weights and per-call activations): measured 1–2% of the logits' norm here.
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.05


# ----------------------------------------------------------------------------------------- int8 in transformers

def test_int8_folder_loads_in_plain_transformers(folder, tmp_path):
    from transformers import AutoModelForCausalLM

    from python3_distillation.int8 import Int8Linear
    from python3_distillation.quantize import run_quantize

    out = run_quantize(folder, tmp_path / "int8", measure=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors" and config["n_ctx"] == 64
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ours = open_model(out).model
    assert isinstance(ours.transformer.h[0].mlp.c_fc, Int8Linear)  # the project keeps int8 and its kernel
    assert plain.lm_head.weight.data_ptr() == plain.transformer.wte.weight.data_ptr()  # still tied

    # transformers holds exactly the dequantized weights: scale · q.
    conv = plain.transformer.h[1].attn.c_attn.weight  # Conv1D [in, out]
    q = ours.transformer.h[1].attn.c_attn
    torch.testing.assert_close(conv, (q.qweight.float() * q.scale[:, None]).t(), rtol=0, atol=0)
    table = ours.transformer.wte.table
    torch.testing.assert_close(plain.transformer.wte.weight, table.qweight.float() * table.scale[:, None],
                               rtol=0, atol=0)

    ids = torch.randint(0, 50257, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = plain(ids).logits, ours(ids).logits
    # Stated tolerance: the project's kernel rounds activations to bf16 around each of the 9 matmuls
    # (2^-8 relative each); measured 0.7% of the logits' norm on these weights. Bound: 2%.
    assert ((a - b).norm() / a.norm()).item() < 0.02
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9


def test_old_int8_folders_load_and_rewrite_losslessly(folder, tmp_path, tokenizer):
    """A folder in the project's earlier format (gpt2_distill_int8 + model.int8.safetensors) still loads,
    and `gpt2-distill quantize OLD` rewrites it in place in the standard format with the same logits."""
    from safetensors.torch import save_file

    from python3_distillation.int8 import BLOCK_PROJECTIONS, quantize_model

    q = quantize_model(copy.deepcopy(open_model(folder).model))
    old = tmp_path / "old_int8"
    old.mkdir()
    state = {k: v.contiguous() for k, v in q.state_dict().items() if not k.startswith("lm_head.")}
    save_file(state, str(old / "model.int8.safetensors"), metadata={"format": "gpt2_distill_int8"})
    config = q.config.to_dict()
    config["quantization_config"] = {"quant_method": "gpt2_distill_int8", "bits": 8,
                                     "modules": list(BLOCK_PROJECTIONS) + ["wte+lm_head (tied)"]}
    (old / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(old)

    ids = torch.randint(0, 50257, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = q(ids).logits
        torch.testing.assert_close(open_model(old).model(ids).logits, want, rtol=0, atol=0)
        assert cli_main(["quantize", str(old)]) == 0
        assert not (old / "model.int8.safetensors").exists() and (old / "model.safetensors").exists()
        torch.testing.assert_close(open_model(old).model(ids).logits, want, rtol=0, atol=0)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(old)  # now readable without the project


# ----------------------------------------------------------------------------------------- llama.cpp

def _llama_cpp():
    """benchmarks/llama_cpp.py (finds the build that `python benchmarks/llama_cpp.py` makes)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "llama_cpp.py"
    spec = importlib.util.spec_from_file_location("llama_cpp_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(_llama_cpp().find_binaries() is None,
                    reason="no llama.cpp build: run `python benchmarks/llama_cpp.py` (or set $LLAMA_CPP_DIR)")
def test_llama_cpp_greedy_equals_transformers(folder, tmp_path, tokenizer):
    """llama.cpp runs the exported f32 GGUF: its tokenizer gives our prompt ids, and its greedy
    decode (llama-server, token ids returned) is transformers' greedy decode, token for token; the
    q8_0 GGUF decodes too."""
    out = tmp_path / "m.gguf"
    assert cli_main(["export", str(folder), "--to", "gguf", "--out", str(out)]) == 0
    llama = _llama_cpp()
    server = llama.find_binaries()["llama-server"]
    model = open_model(folder).model
    with llama.LlamaServer(server, out, "-c", "64", "-np", "1", "-t", "1", "--no-warmup",
                           log_path=tmp_path / "server.log") as srv:
        for prompt in ("It is a truth universally acknowledged", "Emma Woodhouse, handsome, clever, and rich,"):
            ids = tokenizer(prompt)["input_ids"]
            assert srv.post("/tokenize", {"content": prompt})["tokens"] == ids, prompt
            got = srv.post("/completion", {"prompt": ids, "n_predict": 24, "temperature": 0, "top_k": 1,
                                           "return_tokens": True, "cache_prompt": False, "ignore_eos": True})
            assert got["tokens"] == _hf_greedy(model, ids, 24), prompt
    q8 = tmp_path / "m-q8_0.gguf"  # the quantized matrix path runs too (rounded weights: no equality asked)
    assert cli_main(["export", str(folder), "--to", "gguf", "--type", "q8_0", "--out", str(q8)]) == 0
    with llama.LlamaServer(server, q8, "-c", "64", "-np", "1", "-t", "1", "--no-warmup",
                           log_path=tmp_path / "server-q8_0.log") as srv:
        got = srv.post("/completion", {"prompt": ids, "n_predict": 24, "temperature": 0, "return_tokens": True,
                                       "ignore_eos": True})
        assert len(got["tokens"]) == 24
