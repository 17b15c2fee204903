"""The method registry's contract: what each AdapterMethod says (parameter count, saved shapes, tensor names,
knobs, capabilities) is what its layer and save_adapter do, and a method defined here plus one registry entry
trains, saves, loads and merges with no other module changed."""
import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from qbara import AdapterConfig, QbaraError, load_adapter, merge, prepare, save_adapter
from qbara.adapters import adapter_layers, trainable_parameter_count
from qbara.adapters.base import AdapterMethod
from qbara.adapters.lora import LoRALinear, lora_shapes
from qbara.adapters.methods import ADAPTER_TENSORS, METHODS, build_adapter
from qbara.adapters.peft_layout import PREFIX
from qbara.lq import LQConfig
from qbara.models import tiny_llama
from qbara.nn import QuantizedLinear
from qbara.validate import safetensors_shapes

from .conftest import NF4, SETTINGS, build

SHAPES = [(64, 64), (128, 64), (64, 256), (192, 576)]


def _record(layer) -> dict:
    """A layer's entry in the saved record, as save_adapter writes it (less its quant)."""
    return {"in_features": layer.in_features, "out_features": layer.out_features, "pool_in": layer.pool_in,
            "pool_out": layer.pool_out}


def test_each_entry_is_its_layers_method():
    fields = {f.name for f in dataclasses.fields(AdapterConfig)}
    for name, method in METHODS.items():
        assert method.name == name == method.layer.method
        assert set(method.knobs) <= fields
        assert set(method.tensors) <= set(ADAPTER_TENSORS)
    assert set(ADAPTER_TENSORS) == {t for method in METHODS.values() for t in method.tensors}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("d_out,d_in", SHAPES)
def test_count_and_shapes_are_the_layers_trainable_parameters(setting, d_out, d_in):
    config, quant = SETTINGS[setting]
    layer = build_adapter(QuantizedLinear.from_linear(nn.Linear(d_in, d_out, bias=False), quant), config)
    method = METHODS[config.method]
    assert method.shapes(config, _record(layer)) == {n: tuple(p.shape) for n, p in layer.adapter_parameters().items()}
    assert {n.removesuffix(".weight") for n in layer.adapter_parameters()} == set(method.tensors)
    assert method.parameter_count(config, _record(layer)) == trainable_parameter_count(layer) == layer.num_trainable


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_knobs_a_method_does_not_take_change_nothing(setting):
    config, quant = SETTINGS[setting]
    base = QuantizedLinear.from_linear(nn.Linear(256, 128, bias=False), quant)
    shapes = {n: p.shape for n, p in build_adapter(base, config).adapter_parameters().items()}
    for knob, other in {"pool": 4, "pool_in": 2, "pool_out": 2}.items():
        if knob not in METHODS[config.method].knobs:
            layer = build_adapter(base, dataclasses.replace(config, **{knob: other}))
            assert {n: p.shape for n, p in layer.adapter_parameters().items()} == shapes, knob


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_saved_shapes_are_what_save_adapter_writes(setting, tmp_path):
    model, _ = build("tiny-llama", setting)
    save_adapter(model, tmp_path)
    record = json.loads((tmp_path / "qbara_adapter.json").read_text())
    config = AdapterConfig.from_dict(record["adapter"])
    expected = {f"{PREFIX}{name}.{key}": shape for name, layer in record["layers"].items()
                for key, shape in METHODS[config.method].shapes(config, layer).items()}
    assert safetensors_shapes(tmp_path / "adapter_model.safetensors") == expected


@pytest.mark.parametrize("name", list(METHODS))
def test_only_methods_that_start_from_factors_take_lq_or_loftq(name):
    config = AdapterConfig(name, rank=4)
    if METHODS[name].starts_from_factors:
        assert AdapterConfig(name, rank=4, init="lq").init == "lq"
        assert LQConfig(budget=3.0).adapter_config(config).init == "lq"
    else:
        with pytest.raises(QbaraError, match="initialises plain LoRA factors"):
            AdapterConfig(name, rank=4, init="lq")
        with pytest.raises(QbaraError, match="LQ-LoRA / LoftQ initialise plain LoRA factors"):
            LQConfig(budget=3.0).adapter_config(config)


# --- a new method: this module and one registry entry (the monkeypatched line stands for methods.py's)

class RSLoRALinear(LoRALinear):
    """rsLoRA: LoRA scaled by alpha / sqrt(r) (Kalajdzievski, 2023, arXiv:2312.03732)."""

    method = "rslora"


class RSLoRA(AdapterMethod):
    layer = RSLoRALinear
    tensors = ("lora_A", "lora_B")

    def build(self, base, config, name="layer"):
        return RSLoRALinear(base, config.rank, config.alpha / math.sqrt(config.rank), dropout=config.dropout,
                            name=name)

    def shapes(self, config, layer):
        return lora_shapes(config.rank, layer)


@pytest.fixture
def rslora(monkeypatch):
    monkeypatch.setitem(METHODS, "rslora", RSLoRA())


def test_a_new_method_trains_saves_loads_and_merges(rslora, batch, tmp_path):
    model, _ = tiny_llama(seed=0)
    prepare(model, NF4, AdapterConfig("rslora", rank=4, alpha=8))
    layers = adapter_layers(model)
    assert len(layers) == 14 and all(type(m) is RSLoRALinear and m.scaling == 4.0 for m in layers.values())
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    model(batch, labels=batch).loss.backward()
    torch.optim.SGD(params, lr=0.5).step()
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    model.eval()
    with torch.no_grad():
        expected = model(batch).logits
    save_adapter(model, tmp_path / "rslora")
    config = json.loads((tmp_path / "rslora" / "adapter_config.json").read_text())
    assert config["peft_type"].startswith("RSLORA (a qbara adapter")  # PEFT has no such layer

    fresh, _ = tiny_llama(seed=0)  # dense: quantized on load as the adapter records
    load_adapter(fresh, tmp_path / "rslora")
    assert all(type(m) is RSLoRALinear and m.scaling == 4.0 for m in adapter_layers(fresh).values())
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(batch).logits, expected)
        merge(fresh, into="dense")
        assert not adapter_layers(fresh)
        assert torch.allclose(fresh(batch).logits, expected, atol=1e-4, rtol=0)
