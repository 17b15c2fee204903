import pytest
import torch

from qbara.quant import QuantConfig, double_dequantize, double_quantize, quantize


def test_qlora_default_bits_per_param_is_4_127():
    config = QuantConfig("nf4", block_size=64, double_quant=True, dq_bits=8, dq_dtype="fp32", dq_block_size=256)
    assert round(config.bits_per_param, 3) == 4.127
    assert round(QuantConfig("nf3").bits_per_param, 3) == 3.127


@pytest.mark.parametrize("b,b0,b1,B0,B1", [(4, 8, "fp32", 64, 256), (3, 4, "bf16", 32, 16), (2, 2, "fp16", 16, 64),
                                          (8, 3, "fp32", 64, 16)])
def test_bits_formula_matches_measured_buffers(b, b0, b1, B0, B1):
    config = QuantConfig(f"nf{b}", block_size=B0, dq_bits=b0, dq_dtype=b1, dq_block_size=B1)
    bits_b1 = {"fp32": 32, "bf16": 16, "fp16": 16}[b1]
    assert config.bits_per_param == pytest.approx(b + b0 / B0 + bits_b1 / (B0 * B1))
    # A matrix whose scale count is a multiple of B1: measured = formula + the one fp32 offset.
    d_in = B0 * B1
    qt = quantize(torch.randn(16, d_in), config)
    assert qt.bits_per_param == pytest.approx(config.bits_per_param + 32 / qt.numel)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_double_quant_round_trip_error_bound(bits):
    scales = torch.rand(1000, generator=torch.Generator().manual_seed(bits)) * 3 + 0.1
    codes, gmax, offset = double_quantize(scales, bits, 256, "fp32")
    recon = double_dequantize(codes, gmax, offset, bits, 256)
    step = gmax.repeat_interleave(256)[:1000] / (2**bits - 1)
    assert torch.all((recon - scales).abs() <= step / 2 + 1e-6)
    assert torch.isclose(recon.min(), scales.min())


def test_double_quant_reduces_nf4_storage_and_keeps_error():
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    plain = quantize(w, QuantConfig("nf4", double_quant=False))
    dq = quantize(w, QuantConfig("nf4", double_quant=True))
    assert dq.nbytes < plain.nbytes
    e_plain = (plain.dequantize() - w).norm() / w.norm()
    e_dq = (dq.dequantize() - w).norm() / w.norm()
    assert e_dq < e_plain * 1.05
