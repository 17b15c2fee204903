"""qbara.from_pretrained: the one-call path (quantize on load + adapters) equals the step-by-step one."""
import pytest
import torch

from qbara import AdapterConfig, QbaraError, QuantConfig, from_pretrained, load_model, prepare, save_adapter
from qbara.adapters import adapter_layers
from qbara.models import tiny_llama
from tests.helpers import randomize_adapters

IDS = torch.tensor([[1, 7, 42, 3, 9]])


@pytest.fixture
def folder(tmp_path):
    model, tokenizer = tiny_llama(seed=0)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_new_adapters_then_a_saved_one_round_trip(folder, tmp_path):
    quant, adapter = QuantConfig("int4", 32), AdapterConfig("qahira", rank=4)
    model, tokenizer = from_pretrained(str(folder), quant, adapter)
    step_by_step, _ = load_model(str(folder), quant=quant)
    prepare(step_by_step, quant, adapter)
    assert tokenizer is not None and model.qbara.base_fingerprint == step_by_step.qbara.base_fingerprint
    for m in (model, step_by_step):
        randomize_adapters(m, seed=7)
    with torch.no_grad():
        expected = model(IDS).logits
        assert torch.equal(step_by_step(IDS).logits, expected)
    save_adapter(model, tmp_path / "adapter")
    loaded, _ = from_pretrained(str(folder), adapter=str(tmp_path / "adapter"))
    assert sorted(adapter_layers(loaded)) == sorted(adapter_layers(model))
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, expected)


def test_bad_calls_name_the_fix(folder):
    with pytest.raises(QbaraError, match="new adapters need a quantized base"):
        from_pretrained(str(folder), adapter=AdapterConfig("lora", rank=4))
    with pytest.raises(QbaraError, match="adapter must be an AdapterConfig or an adapter folder"):
        from_pretrained(str(folder), QuantConfig("nf4", 32), adapter={"method": "lora"})
