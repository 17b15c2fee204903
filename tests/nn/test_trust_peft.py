"""Issue #26: PEFT's target_modules="all-linear" on a qbara-quantized model resolves as PEFT defines it (every
linear layer but the output head) when register_with_peft gets the model, and is refused clearly without it."""
import pytest
import torch

from qbara import QbaraError, QuantConfig, quantize_model, register_with_peft
from qbara.export.hf import dense_copy
from qbara.models import tiny_llama
from qbara.nn.peft_support import all_linear_targets

peft = pytest.importorskip("peft")
IDS = torch.tensor([[1, 7, 42, 3, 9, 100]])
PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def _quantized():
    model, _ = tiny_llama(seed=0)
    return quantize_model(model, QuantConfig("nf4", 32))


def _adapted(peft_model) -> list[str]:
    return sorted(name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")
                  and not name.endswith(("lora_A", "lora_B")))


def test_all_linear_without_the_model_is_refused_with_the_reason():
    with pytest.raises(QbaraError) as err:
        register_with_peft(peft.LoraConfig(r=4, target_modules="all-linear"))
    assert str(err.value).startswith("target_modules='all-linear' needs the model: PEFT resolves it to nn.Linear "
                                     "layers only")
    assert "register_with_peft(config, model)" in str(err.value)


@torch.no_grad()
def test_all_linear_with_the_model_adapts_what_peft_adapts_on_the_dense_model():
    quantized = _quantized()
    reference_base = dense_copy(quantized)
    config = register_with_peft(peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                init_lora_weights=False), quantized)
    assert config.target_modules == set(PROJECTIONS) or sorted(config.target_modules) == PROJECTIONS
    ours = peft.get_peft_model(quantized, config)
    reference = peft.get_peft_model(reference_base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                    init_lora_weights=False))
    assert _adapted(ours) == _adapted(reference) and len(_adapted(ours)) == 2 * len(PROJECTIONS)
    assert not any("lm_head" in name for name in _adapted(ours))
    for name, param in reference.named_parameters():  # the same adapter weights on both
        if "lora_" in name:
            ours.get_parameter(name).copy_(param)
    assert torch.allclose(ours(IDS).logits, reference(IDS).logits, atol=1e-5, rtol=0)


def test_all_linear_on_a_partly_quantized_model_takes_both_kinds_of_layer():
    model, _ = tiny_llama(seed=0)
    quantize_model(model, QuantConfig("nf4", 32), modules=["q_proj", "k_proj"])
    assert all_linear_targets(model) == PROJECTIONS


def test_all_linear_falls_back_to_full_names_when_a_suffix_would_select_the_head():
    model, _ = tiny_llama(seed=0)
    model.model.layers[0].lm_head = torch.nn.Linear(64, 64)  # a layer sharing the head's last name
    targets = all_linear_targets(_quantize(model))
    assert "model.layers.0.lm_head" in targets and "lm_head" not in targets
    assert "model.layers.1.self_attn.q_proj" in targets


def _quantize(model):
    return quantize_model(model, QuantConfig("nf4", 32))
