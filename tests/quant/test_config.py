import pytest
import torch

from qbara.errors import QbaraError
from qbara.quant import QuantConfig, quantize


def test_unknown_format_names_the_choices():
    with pytest.raises(QbaraError, match="unknown quantization format 'nf5'.*nf4"):
        QuantConfig("nf5")


def test_block_size_not_dividing_names_layer_and_fix():
    with pytest.raises(QbaraError, match=r"layers\.0\.q_proj: block_size 64 does not divide its 96.*e\.g\. \[16, 32\]"):
        quantize(torch.randn(8, 96), QuantConfig("nf4", 64), name="layers.0.q_proj")


def test_block_rows_not_dividing_rows():
    with pytest.raises(QbaraError, match="block_rows 8 does not divide its 12 output"):
        quantize(torch.randn(12, 64), QuantConfig("int4", 32, block_rows=8), name="x")


@pytest.mark.parametrize("weight", [torch.zeros(8, 64, dtype=torch.int32), torch.zeros(8, 64, dtype=torch.uint8)])
def test_non_floating_weight_is_refused(weight):
    with pytest.raises(QbaraError, match="non-floating weight"):
        quantize(weight, QuantConfig())


def test_nan_weight_is_refused():
    w = torch.randn(8, 64)
    w[3, 3] = float("nan")
    with pytest.raises(QbaraError, match="NaN"):
        quantize(w, QuantConfig())


def test_double_quant_on_int_is_refused():
    with pytest.raises(QbaraError, match="NF formats only"):
        QuantConfig("int4", 32, double_quant=True)


def test_defaults_and_dict_round_trip():
    assert QuantConfig("nf4").double_quant is True
    assert QuantConfig("int4", 32).double_quant is False
    cfg = QuantConfig("int3", 64, block_rows=2)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(QbaraError, match="unknown QuantConfig keys"):
        QuantConfig.from_dict({"format": "nf4", "blocksize": 64})


@pytest.mark.parametrize("fmt,g,expected", [("int4", 32, 5.0), ("int5", 32, 6.0), ("int8", 32, 9.0),
                                               ("nf4", 64, 4.5)])
def test_bits_per_param_without_double_quant(fmt, g, expected):
    cfg = QuantConfig(fmt, g, double_quant=False) if fmt.startswith("nf") else QuantConfig(fmt, g)
    assert cfg.bits_per_param == expected
    assert quantize(torch.randn(32, 256), cfg).bits_per_param == expected


def test_fp32_minima_cost_half_a_bit_at_g32_and_only_apply_to_int():
    from qbara.quant import quantize

    config = QuantConfig("int4", block_size=32, minimum_dtype="fp32")
    q = quantize(torch.randn(16, 64, generator=torch.Generator().manual_seed(0)), config)
    assert q.tensors["minimum"].dtype == torch.float32
    assert config.bits_per_param == q.bits_per_param == 5.5 and config.label == "int4-g32-m32"
    assert QuantConfig("int4", block_size=32).bits_per_param == 5.0
    with pytest.raises(QbaraError, match="int formats only"):
        QuantConfig("nf4", minimum_dtype="fp32")
    with pytest.raises(QbaraError, match="minimum_dtype must be one of"):
        QuantConfig("int4", minimum_dtype="bf16")
