import pytest
import torch

from qbara import AdapterConfig, QuantConfig, prepare
from qbara.models import tiny_llama
from qbara.models.tiny import tiny_qwen2
from tests.helpers import randomize_adapters  # noqa: F401 (re-exported)

NF4 = QuantConfig("nf4", block_size=32)
INT4 = QuantConfig("int4", block_size=32)

# method -> (adapter config, base quantization); rank 4 keeps tiny models tiny.
SETTINGS = {
    "lora": (AdapterConfig("lora", rank=4, alpha=8), NF4),
    "qalora": (AdapterConfig("qalora", rank=4, alpha=8), INT4),
    "qbara": (AdapterConfig("qbara", rank=4, alpha=8, pool=2), NF4),
    "qahira": (AdapterConfig("qahira", rank=4, alpha=8), INT4),
    "qahira-tile": (AdapterConfig("qahira", rank=4, alpha=8, pool_in=4, pool_out=8),
                    QuantConfig("int4", block_size=4, block_rows=8)),
}
FOLDABLE = ("qalora", "qahira", "qahira-tile")
MODELS = {"tiny-llama": tiny_llama, "tiny-qwen2": tiny_qwen2}


def build(model_name, setting, seed=0):
    model, tokenizer = MODELS[model_name](seed=seed)
    adapter, quant = SETTINGS[setting]
    prepare(model, quant, adapter)
    return model, tokenizer


@pytest.fixture
def batch():
    return torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(7))
