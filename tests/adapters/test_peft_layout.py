"""qbara's adapter folders as PEFT sees them: qalora in PEFT's QA-LoRA layout (same forward as PEFT's own
QA-LoRA code), qbara / qahira marked as qbara-only; PEFT QA-LoRA folders read back into qbara."""
import json

import pytest
import torch

from qbara import QbaraError, QuantConfig, load_adapter, quantize_model, register_with_peft, save_adapter
from qbara.export.hf import dense_copy
from qbara.models import tiny_llama

from .conftest import INT4, build, randomize_adapters

peft = pytest.importorskip("peft")
IDS = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(5))


def _saved_qalora(tmp_path):
    model, _ = build("tiny-llama", "qalora")  # INT4 G=32: n = 64/32 = 2 groups, down_proj 128/32 = 4
    randomize_adapters(model, seed=4)
    save_adapter(model, tmp_path / "qalora")
    with torch.no_grad():
        return model(IDS).logits, tmp_path / "qalora"


def _peft_load(base, folder):
    config = register_with_peft(peft.LoraConfig.from_pretrained(str(folder)))
    return peft.PeftModel.from_pretrained(base, str(folder), config=config).eval()


def test_qalora_folder_is_peft_qalora_with_alpha_per_group_count(tmp_path):
    _, folder = _saved_qalora(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_qalora"] is True and config["qalora_group_size"] == 32
    assert config["lora_alpha"] == 8 / 2 and config["alpha_pattern"] == {"down_proj": 8 / 4}
    record = json.loads((folder / "qbara_adapter.json").read_text())
    assert record["adapter"]["method"] == "qalora" and record["adapter"]["alpha"] == 8  # qbara's own record intact


@pytest.mark.parametrize("base", ["dequantized", "quantized"])
def test_peft_loads_a_qalora_folder_with_the_same_logits(base, tmp_path):
    expected, folder = _saved_qalora(tmp_path)
    model, _ = tiny_llama(seed=0)
    quantize_model(model, INT4)
    peft_model = _peft_load(dense_copy(model) if base == "dequantized" else model, folder)
    layer = peft_model.base_model.model.model.layers[0].mlp.down_proj
    assert "default" in layer.lora_variant  # PEFT's QA-LoRA code runs the forward
    with torch.no_grad():
        assert torch.allclose(peft_model(IDS).logits, expected, atol=1e-5, rtol=0)


def _peft_folder(tmp_path, **kwargs):
    """A folder PEFT itself wrote (QA-LoRA through qbara's registration: PEFT runs it on GPTQ layers only),
    and PEFT's logits on IDS."""
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                                **kwargs})
    peft_model = peft.get_peft_model(tiny_llama(seed=0)[0], register_with_peft(config))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        expected = peft_model.eval()(IDS).logits
    peft_model.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft", expected


@pytest.mark.parametrize("kwargs", [{"use_qalora": True, "qalora_group_size": 16},
                                    {"use_qalora": True, "qalora_group_size": 32, "use_rslora": True},
                                    {"use_qalora": True, "qalora_group_size": 16, "alpha_pattern": {"v_proj": 3}},
                                    {"alpha_pattern": {"q_proj": 16, "down_proj": 2}}],
                         ids=["qalora", "qalora-rslora", "qalora-pattern", "lora-pattern"])
def test_peft_folders_load_into_qbara_with_peft_forward(kwargs, tmp_path):
    folder, expected = _peft_folder(tmp_path, **kwargs)
    model, _ = tiny_llama(seed=0)
    with pytest.warns(UserWarning, match="records no fingerprint"):
        load_adapter(model, folder)
    assert model.qbara.adapter_config.method == ("qalora" if kwargs.get("use_qalora") else "lora")
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, expected, atol=1e-5, rtol=0)
    save_adapter(model, tmp_path / "again")  # and qbara writes it back in a layout PEFT reads the same way
    with torch.no_grad():
        assert torch.allclose(_peft_load(tiny_llama(seed=0)[0], tmp_path / "again")(IDS).logits, expected,
                              atol=1e-5, rtol=0)


def test_a_bad_alpha_pattern_is_refused(tmp_path):
    folder, _ = _peft_folder(tmp_path)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "alpha_pattern": {"q_proj": "x"}}))
    with pytest.raises(QbaraError, match="alpha_pattern"):
        load_adapter(tiny_llama(seed=0)[0], folder)


@pytest.mark.parametrize("setting", ["qbara", "qahira"])
def test_qbara_only_folders_say_so_and_peft_refuses_them(setting, tmp_path):
    model, _ = build("tiny-llama", setting)
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"].startswith(f"{setting.upper()} (a qbara adapter")  # issue #26: says what loads it
    assert "Only qbara loads" in config["qbara_note"] and "qbara export" in config["qbara_note"]
    with pytest.raises(Exception):
        peft.PeftModel.from_pretrained(tiny_llama(seed=0)[0], str(tmp_path / "a"))


def test_a_qalora_whose_layers_pool_differently_is_qbara_only(tmp_path):
    from qbara import AdapterConfig, prepare

    model, _ = tiny_llama(seed=0)
    quant = {name: QuantConfig("int4", 16 if "mlp" in name else 32) for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    prepare(model, quant, AdapterConfig("qalora", rank=4, alpha=8))
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"].startswith("QALORA (") and "use_qalora" not in config and "Only qbara" in config["qbara_note"]


def test_pattern_keys_select_what_peft_selects():
    from peft.utils.other import get_pattern_key

    from qbara.adapters.peft_layout import pattern_keys, pattern_value

    values = {"model.layers.0.mlp.down_proj": 4, "model.layers.1.mlp.down_proj": 4, "a.x": 2, "b.x": 8, "a.y": 2}
    pattern = pattern_keys(values, default=2)
    assert pattern == {"down_proj": 4, r"b\.x": 8}  # a suffix when it is unambiguous, else the escaped full name
    for name, value in values.items():
        assert pattern_value(pattern, name, 2) == value
        assert pattern.get(get_pattern_key(pattern.keys(), name), 2) == value  # PEFT's own lookup agrees
