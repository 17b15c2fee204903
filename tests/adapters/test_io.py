import json

import pytest
import torch

from qbara import QbaraError, load_adapter, save_adapter
from qbara.adapters import adapter_layers
from qbara.models import tiny_llama

from .conftest import SETTINGS, build, randomize_adapters


@torch.no_grad()
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_save_then_load_on_fresh_model_gives_identical_logits(setting, tmp_path, batch):
    model, _ = build("tiny-llama", setting)
    randomize_adapters(model, seed=11)
    expected = model(batch).logits
    save_adapter(model, tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    fresh, _ = tiny_llama(seed=0)
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(batch).logits, expected)
    assert {n: type(m) for n, m in adapter_layers(fresh).items()} == {n: type(m) for n, m in adapter_layers(model).items()}


def test_lora_adapter_config_is_peft_shaped(tmp_path):
    model, _ = build("tiny-llama", "lora")
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)


def test_load_onto_a_different_base_fails_clearly(tmp_path):
    model, _ = build("tiny-llama", "qahira", seed=0)
    save_adapter(model, tmp_path)
    other, _ = tiny_llama(seed=1)
    with pytest.raises(QbaraError, match="trained on a different base model"):
        load_adapter(other, tmp_path)


def test_missing_or_damaged_folder(tmp_path):
    model, _ = tiny_llama()
    with pytest.raises(QbaraError, match="does not exist"):
        load_adapter(model, tmp_path / "nope")
    (tmp_path / "adapter_config.json").write_text("{not json")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(QbaraError, match="not valid JSON"):
        load_adapter(model, tmp_path)
