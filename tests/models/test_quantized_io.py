import pytest
import torch

from qbara import AdapterConfig, QuantConfig, load_model, merge, prepare
from qbara.models import tiny_llama
from qbara.models.quantized_io import save_quantized
from qbara.nn import QuantizedLinear
from tests.helpers import randomize_adapters


@pytest.mark.parametrize("tie, minimum_dtype", [(False, "fp16"), (True, "fp16"), (False, "fp32")])
def test_merged_quantized_model_round_trips(tmp_path, tie, minimum_dtype):
    model, tokenizer = tiny_llama(tie_word_embeddings=tie)
    prepare(model, QuantConfig("int4", 32, minimum_dtype=minimum_dtype), AdapterConfig("qahira", rank=4))
    randomize_adapters(model, std=0.01)
    merge(model, into="quantized")
    ids = torch.randint(0, 250, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    save_quantized(model, tokenizer, tmp_path / "q")
    loaded, loaded_tok = load_model(str(tmp_path / "q"))
    assert sum(isinstance(m, QuantizedLinear) for m in loaded.modules()) == 14
    want = torch.float32 if minimum_dtype == "fp32" else torch.float16
    assert all(m.minimum.dtype == want for m in loaded.modules() if isinstance(m, QuantizedLinear))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    assert loaded_tok is not None
