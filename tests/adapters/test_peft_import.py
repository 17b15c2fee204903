"""Adapters PEFT wrote load into qbara: same forward as PEFT on the same (dequantized) base; the rest refused."""
import json

import pytest
import torch

from qbara import QbaraError, QuantConfig, load_adapter, quantize_model
from qbara.export.hf import dense_copy
from qbara.models import tiny_llama

peft = pytest.importorskip("peft")
IDS = torch.tensor([[1, 7, 42, 3, 9, 100]])


def _peft_adapter(tmp_path, **kwargs):
    model, _ = tiny_llama(seed=0)
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                                **kwargs})
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    wrapped.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft"


def _peft_logits(base, folder):
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(base, str(folder)).eval()(IDS).logits


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_lora_on_a_quantized_base_matches_peft_on_the_dequantized_base(rslora, tmp_path):
    folder = _peft_adapter(tmp_path, use_rslora=rslora)
    model, _ = tiny_llama(seed=0)
    quantize_model(model, QuantConfig("nf4", 32))
    reference = _peft_logits(dense_copy(model), folder)
    with pytest.warns(UserWarning, match="PEFT LoRA adapter records no fingerprint"):
        load_adapter(model, folder)
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, reference, atol=1e-5, rtol=0)
    dense, _ = tiny_llama(seed=0)
    with pytest.warns(UserWarning):
        load_adapter(dense, folder)  # on the dense base: PEFT's own model
    with torch.no_grad():
        assert torch.allclose(dense(IDS).logits, _peft_logits(tiny_llama(seed=0)[0], folder), atol=1e-5, rtol=0)


@pytest.mark.parametrize("change,message", [({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]},
                                            "modules_to_save"), ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
                                           ({"peft_type": "IA3"}, "PEFT LoRA adapters only")])
def test_what_qbara_cannot_represent_is_refused(change, message, tmp_path):
    folder = _peft_adapter(tmp_path)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(QbaraError, match=message):
        load_adapter(tiny_llama(seed=0)[0], folder)
