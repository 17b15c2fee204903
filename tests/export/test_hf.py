import json

import pytest
import torch
from safetensors import safe_open

import qbara
from qbara import AdapterConfig, QbaraError
from qbara.adapters import adapter_layers
from qbara.export import export_hf
from qbara.models.tiny import tiny_qwen2

from .conftest import tiny_adapted


@pytest.fixture(scope="module")
def adapted():
    return tiny_adapted(adapter=AdapterConfig("qahira", rank=8, alpha=16), snap=False)


def test_export_hf_round_trip(adapted, ids, tmp_path):
    model, tokenizer = adapted
    out = export_hf(model, tokenizer, tmp_path / "hf", dtype="float32")
    assert adapter_layers(model)  # the model passed in is untouched
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    assert not any(n.endswith(".bin") for n in names)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert "model.layers.0.self_attn.q_proj.weight" in fh.keys()
        assert not [k for k in fh.keys() if "codes" in k or "hira" in k or "minimum" in k]
    loaded, tok = qbara.load_model(str(out))
    with torch.no_grad():
        ref, got = model(ids).logits, loaded(ids).logits
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5  # dense merge: float noise only
    assert tok("hello").input_ids == tokenizer("hello").input_ids


def test_export_hf_dtype_and_overwrite(adapted, tmp_path):
    model, tokenizer = adapted
    out = export_hf(model, tokenizer, tmp_path / "hf", dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert fh.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16
    export_hf(model, tokenizer, out, dtype="float16")  # a folder qbara wrote is replaced
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert fh.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.float16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    with pytest.raises(QbaraError, match="not empty and was not written by qbara.*--overwrite"):
        export_hf(model, tokenizer, users)
    export_hf(model, tokenizer, users, overwrite=True)
    assert (users / "notes.txt").read_text() == "mine" and (users / "model.safetensors").is_file()
    with pytest.raises(QbaraError, match="dtype"):
        export_hf(model, tokenizer, tmp_path / "x", dtype="int8")


def test_export_hf_other_architectures(tmp_path):
    model, tokenizer = tiny_qwen2()
    qbara.prepare(model, qbara.QuantConfig("nf4", 64), AdapterConfig("lora", rank=4))
    out = export_hf(model, tokenizer, tmp_path / "qwen")
    loaded, _ = qbara.load_model(str(out))
    assert type(loaded).__name__ == "Qwen2ForCausalLM"
