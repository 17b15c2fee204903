import pytest
import torch

from qbara import AdapterConfig, QuantConfig, prepare
from qbara.adapters import adapter_layers

from .conftest import SETTINGS, build


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_only_adapter_parameters_train_and_receive_gradients(setting, batch):
    model, _ = build("tiny-qwen2", setting)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".hira_M" in n for n in trainable)
    model(batch, labels=batch).loss.backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all()
        else:
            assert p.grad is None, name
    # With B (or M) at zero the update is zero at step 0 but its gradient is not.
    grads = [p.grad.abs().sum() for n, p in model.named_parameters() if "lora_B" in n or "hira_M" in n]
    assert sum(grads) > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qalora", "qbara", "qahira"])
def test_a_few_steps_reduce_loss_on_smollm2(method, smollm2_fresh):
    model, tokenizer = smollm2_fresh
    quant = QuantConfig("nf4") if method in ("lora", "qbara") else QuantConfig("int4", 32)
    prepare(model, quant, AdapterConfig(method, rank=8, alpha=16, target_modules=("q_proj", "v_proj", "down_proj")))
    ids = tokenizer("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
                    return_tensors="pt").input_ids
    params = [p for p in model.parameters() if p.requires_grad]
    lr = 1e-3 if method in ("lora", "qbara", "qalora") else 1e-2
    opt = torch.optim.AdamW(params, lr=lr)
    torch.manual_seed(0)
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] - 0.05, losses
    assert len(adapter_layers(model)) == 30 * 3
