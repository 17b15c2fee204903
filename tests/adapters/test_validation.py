import pytest
from torch import nn

from qbara import AdapterConfig, QbaraError, QuantConfig, merge, prepare
from qbara.adapters import adapter_layers
from qbara.adapters.methods import build_adapter
from qbara.models import tiny_llama
from qbara.nn import QuantizedLinear


def test_unknown_method_suggests_the_closest():
    with pytest.raises(QbaraError, match="unknown adapter method 'qbra'.*did you mean 'qbara'"):
        AdapterConfig("qbra")


@pytest.mark.parametrize("rank", [0, -3])
def test_rank_must_be_positive(rank):
    with pytest.raises(QbaraError, match="rank must be a positive integer"):
        AdapterConfig("lora", rank=rank)


def test_pool_not_dividing_names_layer():
    base = nn.Linear(96, 64)
    with pytest.raises(QbaraError, match="mlp.up: qbara input pooling 5 does not divide the layer's 96"):
        build_adapter(base, AdapterConfig("qbara", rank=2, pool=5), name="mlp.up")
    with pytest.raises(QbaraError, match="qahira input pooling 7 does not divide"):
        build_adapter(base, AdapterConfig("qahira", rank=2, pool_in=7), name="x")


@pytest.mark.parametrize("method,quant,reason", [
    ("lora", QuantConfig("int4", 32), "constant on 1x1 tiles"),
    ("qbara", QuantConfig("int4", 32), "constant on 2x2 tiles"),
    ("qalora", QuantConfig("nf4", 32), "no zero-point"),
    ("qahira", QuantConfig("nf4", 32), "no zero-point"),
])
def test_fold_is_refused_with_the_reason(method, quant, reason):
    model, _ = tiny_llama()
    prepare(model, quant, AdapterConfig(method, rank=4))
    with pytest.raises(QbaraError, match=f"cannot merge into the quantized model: .*{reason}"):
        merge(model, into="quantized")
    # Nothing was replaced by the refused merge.
    assert len(adapter_layers(model)) == 14
    assert all(isinstance(m.base, QuantizedLinear) for m in adapter_layers(model).values())


def test_qahira_pool_in_not_covering_blocks_cannot_fold():
    model, _ = tiny_llama()
    prepare(model, QuantConfig("int4", 32), AdapterConfig("qahira", rank=4, pool_in=16))
    with pytest.raises(QbaraError, match="input pooling a multiple of 32"):
        merge(model, into="quantized")


def test_merge_without_adapters_and_unknown_target():
    model, _ = tiny_llama()
    with pytest.raises(QbaraError, match="no adapters to merge"):
        merge(model)
    prepare(model, QuantConfig("nf4", 32), AdapterConfig("lora", rank=2))
    with pytest.raises(QbaraError, match="unknown merge target 'fp16'"):
        merge(model, into="fp16")


def test_target_modules_matching_nothing_lists_layer_names():
    model, _ = tiny_llama()
    with pytest.raises(QbaraError, match="no linear layer.*'q_proj'"):
        prepare(model, QuantConfig("nf4", 32), AdapterConfig("lora", rank=2, target_modules=("attn_q",)))
