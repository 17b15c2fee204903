"""qbara's QuantizedLinear as a PEFT LoRA target: PEFT's own model on the dequantized base is the reference."""
import pytest
import torch

from qbara import QbaraError, QuantConfig, load_adapter, quantize_model, register_with_peft
from qbara.export.hf import dense_copy
from qbara.models import tiny_llama

peft = pytest.importorskip("peft")
IDS = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(3))
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _quantized(quant=QuantConfig("nf4", 32)):
    model, _ = tiny_llama(seed=0)
    return quantize_model(model, quant)


def _randomize_lora(peft_model, seed=1):
    """Non-zero A and B, the same values for the same parameter names."""
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + len(name))) * 0.1)


def _pair(**kwargs):
    """(PEFT on qbara's quantized base, stock PEFT on its dequantized copy), with equal random adapters."""
    quantized = _quantized()
    dense = dense_copy(quantized)
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS, **kwargs)
    ours = peft.get_peft_model(quantized, register_with_peft(peft.LoraConfig(**config)))
    reference = peft.get_peft_model(dense, peft.LoraConfig(**config))
    _randomize_lora(ours)
    _randomize_lora(reference)
    return ours, reference


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_matches_peft_on_the_dequantized_base(rslora):
    ours, reference = _pair(use_rslora=rslora)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "QbaraLoraLinear" and type(layer.base_layer).__name__ == "QuantizedLinear"
    with torch.no_grad():
        assert torch.allclose(ours(IDS).logits, reference(IDS).logits, atol=1e-5, rtol=0)


def test_one_adamw_step_trains_only_lora_and_matches_peft_gradients():
    ours, reference = _pair()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    losses = {}
    for tag, model in (("ours", ours), ("reference", reference)):
        model.train()
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        losses[tag] = loss
    assert torch.isfinite(losses["ours"]) and torch.allclose(losses["ours"], losses["reference"], atol=1e-5)
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    trainable = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and set(trainable) == set(grads) and all("lora_" in n for n in trainable)
    for name, p in trainable.items():
        assert torch.allclose(p.grad, grads[name], atol=1e-5), name
    torch.optim.AdamW(trainable.values(), lr=1e-3).step()
    after = ours.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if "lora_" in k}  # every LoRA tensor moved, nothing else did


def test_saved_folder_reloads_in_peft_and_in_qbara(tmp_path):
    ours, _ = _pair()
    ours.eval()
    with torch.no_grad():
        expected = ours(IDS).logits
    ours.save_pretrained(tmp_path / "peft")
    config = register_with_peft(peft.LoraConfig.from_pretrained(tmp_path / "peft"))
    again = peft.PeftModel.from_pretrained(_quantized(), tmp_path / "peft", config=config)
    qbara_model = _quantized()
    with pytest.warns(UserWarning, match="records no fingerprint"):
        load_adapter(qbara_model, tmp_path / "peft")
    with torch.no_grad():
        assert torch.allclose(again(IDS).logits, expected, atol=1e-6, rtol=0)
        assert torch.allclose(qbara_model(IDS).logits, expected, atol=1e-5, rtol=0)


def test_refusals_are_clear():
    with pytest.raises(QbaraError, match="peft.LoraConfig"):
        register_with_peft(peft.IA3Config(target_modules=["q_proj"]))
    with pytest.raises(QbaraError, match="plain LoRA or QA-LoRA only"):
        peft.get_peft_model(_quantized(), register_with_peft(peft.LoraConfig(r=4, target_modules=TARGETS,
                                                                              use_dora=True)))
    ours, _ = _pair()
    with pytest.raises(QbaraError, match="qbara.merge"):
        ours.merge_and_unload()
