"""Row-chunked quantization (bounded temporaries) gives exactly the buffers of quantizing the matrix at once."""
import pytest
import torch

from qbara.quant import tensor as qt
from qbara.quant.config import QuantConfig
from qbara.quant.formats import base


@pytest.mark.parametrize("config", [QuantConfig("nf4"), QuantConfig("nf3", 32),
                                    QuantConfig("nf2", 64, double_quant=False), QuantConfig("int4", 32),
                                    QuantConfig("int3", 32),
                                    QuantConfig("int4", 4, block_rows=8), QuantConfig("int8", 64, minimum_dtype="fp32")],
                         ids=lambda c: c.label)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_whole(config, dtype, monkeypatch):
    weight = (torch.randn(200, 256, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    whole = qt.quantize(weight, config)
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 256 * 24)  # 24 rows a chunk: 9 chunks, the last one short
    assert len(config.family.row_chunks((200, 256), config)) == 9
    chunked = qt.quantize(weight, config)
    assert whole.tensors.keys() == chunked.tensors.keys()
    for name in whole.tensors:
        assert torch.equal(whole.tensors[name], chunked.tensors[name]), name
