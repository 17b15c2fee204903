import pytest
import torch
from torch import nn

from qbara.eval.loss import masked_loss
from qbara.train.data import IGNORE_INDEX, Example

EXAMPLES = [Example([1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 3, 4]), Example([1, 2], [IGNORE_INDEX, 2])]


class UniformLM(nn.Module):
    """Uniform logits over `vocab` tokens on the device of its one parameter; records where its inputs were."""

    def __init__(self, device="cpu", vocab: int = 5):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, device=device))
        self.seen = []

    def forward(self, input_ids, attention_mask):
        self.seen.append({input_ids.device.type, attention_mask.device.type})
        if self.weight.device.type == "meta":
            raise StopIteration  # inputs recorded; meta tensors have no values to score
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.weight.numel())})()


def test_masked_loss_is_the_mean_nll_of_the_answer_tokens():
    result = masked_loss(UniformLM(), EXAMPLES, batch_size=2)
    assert result["tokens"] == 3 and result["records"] == 2
    assert abs(result["loss"] - torch.log(torch.tensor(5.0)).item()) < 1e-6  # uniform over 5: log 5 per token


def test_masked_loss_sends_the_batches_to_the_models_device():
    """A model away from the CPU (e.g. --device cuda) gets its batches on its own device."""
    model = UniformLM("meta")
    with pytest.raises(StopIteration):
        masked_loss(model, EXAMPLES, batch_size=2)
    assert model.seen == [{"meta"}]


def test_masked_loss_scores_in_eval_mode_and_restores_the_mode():
    model = UniformLM()
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    model.train()
    masked_loss(model, EXAMPLES, batch_size=2)
    assert modes == [False] and model.training


def test_masked_loss_restores_the_mode_when_the_forward_raises():
    """A forward that fails (out of memory, an interrupt) must not leave a training model in eval mode."""

    class FailingLM(UniformLM):
        def forward(self, input_ids, attention_mask):
            raise RuntimeError("out of memory")

    model = FailingLM().train()
    with pytest.raises(RuntimeError, match="out of memory"):
        masked_loss(model, EXAMPLES, batch_size=2)
    assert model.training
    model.eval()
    with pytest.raises(RuntimeError, match="out of memory"):
        masked_loss(model, EXAMPLES, batch_size=2)
    assert not model.training


def test_masked_loss_without_answer_tokens_says_so():
    from qbara import QbaraError

    with pytest.raises(QbaraError, match="no answer tokens"):
        masked_loss(UniformLM(), [Example([1, 2], [IGNORE_INDEX, IGNORE_INDEX])])
