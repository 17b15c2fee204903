"""Models loaded with bitsandbytes NF4: taken over bit for bit, or refused with the fix."""
import pytest
import torch

from qbara import AdapterConfig, QbaraError, QuantConfig, load_adapter, prepare, save_adapter
from qbara.nn import QuantizedLinear

bnb = pytest.importorskip("bitsandbytes")


def _bnb_model(tmp_path, **bnb_kwargs):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qbara.models.tiny import tiny_llama

    model, tokenizer = tiny_llama(seed=0)
    folder = tmp_path / "dense"
    if not folder.exists():
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    config = BitsAndBytesConfig(load_in_4bit=True, **{"bnb_4bit_quant_type": "nf4", **bnb_kwargs})
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)


@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_nf4_layers_are_adopted_with_identical_weights(double_quant, tmp_path):
    import bitsandbytes.functional as F

    model = _bnb_model(tmp_path, bnb_4bit_use_double_quant=double_quant)
    names = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    reference = {n: F.dequantize_4bit(model.get_submodule(n).weight.data, model.get_submodule(n).weight.quant_state)
                 for n in names}
    ids = torch.tensor([[1, 7, 42, 3, 9]])
    model.train()  # bitsandbytes >= 0.50 repacks CPU weights at the first eval-mode forward: not here
    with torch.no_grad():
        expected = model(ids).logits
    prepare(model, QuantConfig("nf4", block_size=64, double_quant=False), AdapterConfig("lora", rank=4))
    for name in names:
        layer = model.get_submodule(name).base
        assert isinstance(layer, QuantizedLinear)
        assert torch.equal(layer.dequantize(torch.float32), reference[name].float()), name
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)  # LoRA's B is zero at step 0


def test_bnb_layers_repacked_for_the_cpu_kernel_are_adopted_in_their_canonical_layout(tmp_path):
    """After an eval-mode forward on an AVX512-BF16 CPU, bitsandbytes keeps its codes in another layout with
    bf16 absmax; adoption reads them back in the canonical layout: the weights bnb held before, up to that
    bf16 rounding of the scales (a permuted layout would be off by the weights' own size)."""
    import bitsandbytes.functional as F

    model = _bnb_model(tmp_path)
    names = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    reference = {n: F.dequantize_4bit(model.get_submodule(n).weight.data, model.get_submodule(n).weight.quant_state)
                 for n in names}
    model.eval()
    with torch.no_grad():
        model(torch.tensor([[1, 7, 42, 3, 9]]))
    prepare(model, QuantConfig("nf4", block_size=64, double_quant=False), None)
    for name in names:
        got, want = model.get_submodule(name).dequantize(torch.float32), reference[name].float()
        assert torch.allclose(got, want, rtol=2 ** -8, atol=0), name


def test_bnb_model_with_another_config_names_the_fix(tmp_path):
    model = _bnb_model(tmp_path)
    with pytest.raises(QbaraError, match=r"QuantConfig\('nf4', block_size=64, double_quant=False\).*without "
                                         r"quantization_config"):
        prepare(model, QuantConfig("int4", 32), AdapterConfig("qahira", rank=4))


@pytest.mark.parametrize("double_quant,config", [
    (False, QuantConfig("nf4", block_size=64, double_quant=False)),
    (True, QuantConfig("nf4", block_size=64, dq_style="bnb")),
], ids=["plain", "double-quant"])
def test_adapter_trained_on_a_bnb_base_loads_onto_it_again(tmp_path, double_quant, config):
    model = _bnb_model(tmp_path, bnb_4bit_use_double_quant=double_quant)
    prepare(model, config, AdapterConfig("lora", rank=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    ids = torch.tensor([[1, 7, 42, 3, 9]])
    with torch.no_grad():
        expected = model(ids).logits
    save_adapter(model, tmp_path / "adapter")
    fresh = _bnb_model(tmp_path, bnb_4bit_use_double_quant=double_quant)
    load_adapter(fresh, tmp_path / "adapter")
    assert all(m.quant_config == config for m in fresh.modules() if isinstance(m, QuantizedLinear))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)


def _reference(model):
    import bitsandbytes.functional as F

    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    return layers, {n: F.dequantize_4bit(m.weight.data, m.weight.quant_state) for n, m in layers.items()}


def test_double_quantized_bnb_layers_are_adopted_with_their_own_buffers(tmp_path):
    """compress_statistics layers become dq_style="bnb" layers holding bitsandbytes' very buffers (4.13
    bits/param instead of the 4.5 of the fp32-absmax adoption), with identical weights."""
    from qbara.nn.bnb import adoption_config

    model = _bnb_model(tmp_path, bnb_4bit_use_double_quant=True)
    config = QuantConfig("nf4", block_size=64, dq_style="bnb")
    assert adoption_config(model) == config
    layers, reference = _reference(model)
    states = {n: m.weight.quant_state for n, m in layers.items()}
    codes = {n: m.weight.data.reshape(-1).clone() for n, m in layers.items()}
    prepare(model, config, AdapterConfig("lora", rank=4))
    for name, state in states.items():
        layer = model.get_submodule(name).base
        assert layer.quant_config == config
        assert torch.equal(layer.codes, codes[name]) and torch.equal(layer.absmax_codes, state.absmax)
        assert torch.equal(layer.nested_absmax, state.state2.absmax)
        assert torch.equal(layer.absmax_offset, state.offset.reshape(1))
        assert torch.equal(layer.dequantize(torch.float32), reference[name])
        assert layer.bits_per_param < 4.2


def test_double_quantized_bnb_layers_repacked_for_the_cpu_kernel_keep_bnb_style(tmp_path):
    """After the CPU repacking bitsandbytes' own restore compresses its bf16-rounded scales again: adopted as they
    are then, still dq_style="bnb", the weights within that bf16 rounding of the original ones."""
    import bitsandbytes.functional as F

    model = _bnb_model(tmp_path, bnb_4bit_use_double_quant=True)
    layers, before = _reference(model)
    model.eval()
    with torch.no_grad():
        model(torch.tensor([[1, 7, 42, 3, 9]]))
    prepare(model, QuantConfig("nf4", block_size=64, dq_style="bnb"), None)
    for name, old in layers.items():
        got = model.get_submodule(name).dequantize(torch.float32)
        assert torch.equal(got, F.dequantize_4bit(old.weight.data, old.weight.quant_state)), name
        # bf16 rounding of the scales plus up to half a step of the dynamic map: 0.72 % at most measured here
        assert torch.allclose(got, before[name], rtol=2 ** -6, atol=0), name


def test_double_quantized_bnb_model_with_another_config_names_both_exact_ones(tmp_path):
    model = _bnb_model(tmp_path, bnb_4bit_use_double_quant=True)
    with pytest.raises(QbaraError, match=r"dq_style='bnb'\) or QuantConfig\('nf4', block_size=64, "
                                         r"double_quant=False\), not nf4-b64-dq8/fp32/256:"):
        prepare(model, QuantConfig("nf4"), None)
    plain = _bnb_model(tmp_path)
    with pytest.raises(QbaraError, match=r"exactly as QuantConfig\('nf4', block_size=64, double_quant=False\), not "
                                         r"nf4-b64-dq8/fp32/256-bnb"):
        prepare(plain, QuantConfig("nf4", 64, dq_style="bnb"), None)
