import copy

import pytest
import torch

from qbara import AdapterConfig, QuantConfig, merge, prepare
from qbara.adapters import adapter_layers
from qbara.models import tiny_llama
from qbara.nn import QuantizedLinear

from .conftest import FOLDABLE, MODELS, SETTINGS, build, randomize_adapters


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_merged_logits_equal_unmerged(model_name, setting, batch):
    model, _ = build(model_name, setting)
    # Adapter weights give an update of about a quarter of the base weights' spread (std 0.02).
    randomize_adapters(model, std=0.01)
    reference = model(batch).logits
    dense = merge(copy.deepcopy(model), into="dense")
    assert not adapter_layers(dense)
    assert _rel(dense(batch).logits, reference) <= 1e-5
    if setting in FOLDABLE:
        bits_before = {n: m.base.bits_per_param for n, m in adapter_layers(model).items()}
        folded = merge(copy.deepcopy(model), into="quantized")
        for name, bits in bits_before.items():
            layer = folded.get_submodule(name)
            assert isinstance(layer, QuantizedLinear) and layer.bits_per_param == bits
        err = _rel(folded(batch).logits, reference)
        print(f"{model_name} {setting}: fold max relative logit error {err:.2e}")
        assert err <= 1e-3


@torch.no_grad()
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_delta_weight_is_the_dense_form_of_the_adapter(setting):
    model, _ = build("tiny-qwen2", setting)
    randomize_adapters(model, seed=3)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    for layer in adapter_layers(model).values():
        x_in = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(2))
        dense = x_in @ layer.delta_weight().t()
        assert torch.allclose(layer.adapter_forward(x_in), dense, atol=1e-6, rtol=1e-5)
    assert x.shape[0] == 5


@torch.no_grad()
def test_fold_changes_only_the_minima():
    model, _ = build("tiny-llama", "qahira")
    randomize_adapters(model)
    name, layer = next(iter(adapter_layers(model).items()))
    before = {k: v.clone() for k, v in layer.base.state_dict().items()}
    merged = layer.merge("quantized")
    after = merged.state_dict()
    assert torch.equal(after["codes"], before["codes"]) and torch.equal(after["scale"], before["scale"])
    assert not torch.equal(after["minimum"], before["minimum"])
    # The fold equals the dense merge up to the fp16 rounding of each moved minimum (half an ulp).
    dense = layer.base.dequantize() + layer.delta_weight()
    exact_min = (before["minimum"].float() + layer.delta_weight()[:, ::32].reshape(-1))
    half_ulp = exact_min.abs() * 2.0**-11 + 2.0**-25
    err = (merged.dequantize() - dense).reshape(-1, 32).abs().amax(dim=1)
    assert torch.all(err <= half_ulp + 1e-7 * dense.abs().max())


@torch.no_grad()
@pytest.mark.parametrize("adapter", [AdapterConfig("qahira", rank=4, alpha=8), AdapterConfig("qalora", rank=4, alpha=8)],
                         ids=lambda a: a.method)
def test_fold_into_int5_moves_only_the_minima(adapter, batch):
    """QA-HiRA / QA-LoRA fold into an INT5 G32 base as into INT4: codes and scales kept, 6.0 bits/param, the
    dense merge up to the fp16 rounding of each moved minimum."""
    model, _ = tiny_llama(seed=0)
    prepare(model, QuantConfig("int5", block_size=32), adapter)
    randomize_adapters(model)
    reference = model(batch).logits
    for layer in adapter_layers(model).values():
        before, delta = layer.base.qweight.tensors, layer.delta_weight()
        merged = layer.merge("quantized")
        assert merged.quant_config == QuantConfig("int5", 32) and merged.bits_per_param == 6.0
        assert torch.equal(merged.codes, before["codes"]) and torch.equal(merged.scale, before["scale"])
        dense = layer.base.dequantize() + delta
        exact_min = before["minimum"].float() + delta[:, ::32].reshape(-1)
        err = (merged.dequantize() - dense).reshape(-1, 32).abs().amax(dim=1)
        assert torch.all(err <= exact_min.abs() * 2.0**-11 + 2.0**-25 + 1e-7 * dense.abs().max())
        assert float((merged.dequantize() - dense).norm() / delta.norm()) < 0.1
    assert _rel(merge(model, into="quantized")(batch).logits, reference) <= 1e-3


@torch.no_grad()
@pytest.mark.parametrize("minimum_dtype, std, warns", [("fp16", 0.01, False), ("fp16", 1e-5, True),
                                                       ("fp32", 1e-5, False)])
def test_fold_reports_what_rounding_of_the_minima_lost(minimum_dtype, std, warns):
    """model.qbara.fold_rounding equals the dense-computed relative RMS of (folded - (base + ΔW)) over ΔW; a warning
    comes when the update is too small for fp16 minima to hold, and fp32 minima hold it."""
    import warnings

    from qbara import AdapterConfig, QuantConfig, prepare
    from qbara.models import tiny_llama

    model, _ = tiny_llama(seed=0)
    prepare(model, QuantConfig("int4", block_size=32, minimum_dtype=minimum_dtype),
            AdapterConfig("qahira", rank=4, alpha=8))
    randomize_adapters(model, std=std)
    lost = total = 0.0
    for layer in adapter_layers(model).values():
        delta = layer.delta_weight()
        folded = layer.merge("quantized").dequantize().double()
        lost += float(((folded - layer.base.dequantize().double()) - delta.double()).pow(2).sum())
        total += float(delta.double().pow(2).sum())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge(model, into="quantized")
    print(f"{minimum_dtype} std {std}: fold lost {model.qbara.fold_rounding:.2%} of the update")
    assert model.qbara.fold_rounding == pytest.approx((lost / total) ** 0.5, rel=1e-3, abs=5e-4)  # fp32 dequant noise
    assert (model.qbara.fold_rounding > 0.05) == warns
    assert any("minima could not hold" in str(w.message) for w in caught) == warns


@torch.no_grad()
@pytest.mark.parametrize("setting", ["lora", "qbara", "qalora"])
def test_requantized_merge_is_the_dense_merge_quantized_with_the_base_config(setting):
    """into='requantized' (how other tools merge into a 4-bit model) against its definition, layer by layer."""
    from qbara.quant import quantize

    model, _ = build("tiny-llama", setting)
    randomize_adapters(model, std=0.01)
    expected = {n: quantize(layer.base.dequantize() + layer.delta_weight(), layer.base.quant_config).dequantize()
                for n, layer in adapter_layers(model).items()}
    merged = merge(model, into="requantized")
    for name, weight in expected.items():
        layer = merged.get_submodule(name)
        assert isinstance(layer, QuantizedLinear) and torch.equal(layer.dequantize(), weight)


@torch.no_grad()
def test_dequantize_model_replaces_every_quantized_layer_by_its_dense_weights(batch):
    from torch import nn

    from qbara import QbaraError
    from qbara.models.streaming import dequantize_model

    model, _ = build("tiny-llama", "qahira")
    with pytest.raises(QbaraError, match="merge them first"):
        dequantize_model(model)
    merge(model, into="quantized")
    weights = {n: m.dequantize() for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    reference = model(batch).logits
    dequantize_model(model)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    for name, weight in weights.items():
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and torch.equal(layer.weight, weight) and not layer.weight.requires_grad
    assert torch.allclose(model(batch).logits, reference, atol=1e-5, rtol=1e-5)


def test_refused_requantized_merge_leaves_the_model_as_it_was():
    """A dense base among the adapted layers is refused before any layer is merged."""
    from torch import nn

    from qbara import AdapterConfig, QbaraError, QuantConfig, prepare
    from qbara.models import tiny_llama

    model, _ = tiny_llama(seed=0)
    prepare(model, {"model.layers.0.self_attn.q_proj": QuantConfig("int4", 32)}, None)
    prepare(model, {}, AdapterConfig("lora", rank=2))
    before = {n: type(m) for n, m in adapter_layers(model).items()}
    with pytest.raises(QbaraError, match="needs a quantized base"):
        merge(model, into="requantized")
    assert {n: type(m) for n, m in adapter_layers(model).items()} == before
    assert isinstance(model.get_submodule("model.layers.0.self_attn.k_proj").base, nn.Linear)


def test_a_merged_model_forgets_its_old_base_fingerprint():
    """After a merge the base is another one: an adapter trained on it must not record the old fingerprint."""
    from qbara import AdapterConfig, prepare
    from qbara.fingerprint import model_fingerprint

    model, _ = build("tiny-llama", "qahira")
    randomize_adapters(model, std=0.01)
    merge(model, into="quantized")
    assert model.qbara.base_fingerprint is None
    prepare(model, {}, AdapterConfig("lora", rank=2))
    from qbara.adapters.io import base_fingerprint

    assert base_fingerprint(model) == model_fingerprint(model)
