import pytest
import torch

from qbara.quant import QuantConfig, double_dequantize, double_quantize, pack_bits, quantize
from qbara.quant.nf import nf_levels, quantize_nf


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


def _weights(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 256, generator=g) * torch.rand(48, 1, generator=g) * 0.05  # spread block absmaxes
    w[0, :64] = 0.0  # an all-zero block: offset 0
    w[1, :] = torch.distributions.StudentT(2.0).sample((256,)) * 0.01  # heavy tails
    return w


@pytest.mark.parametrize("b,b0,b1,B0,B1", [(4, 2, "fp32", 64, 256), (3, 3, "bf16", 32, 16), (2, 2, "fp16", 16, 64),
                                          (4, 8, "fp32", 64, 256), (8, 4, "bf16", 64, 16), (3, 4, "fp32", 16, 64)])
def test_double_quant_codes_are_the_best_codes_for_the_stored_scales(b, b0, b1, B0, B1):
    """Brute force: every stored code is an argmin over all 2**b levels of |w - level * ŝ| for the block's
    stored (double-dequantized) scale ŝ, including where ŝ < |w| (clamped to the extreme level)."""
    w = _weights(b * 10 + b0)
    qt = quantize(w, QuantConfig(f"nf{b}", B0, dq_bits=b0, dq_dtype=b1, dq_block_size=B1))
    scales = qt.scales().double().repeat_interleave(B0)
    flat = w.reshape(-1).double()
    candidates = nf_levels(b).double()[None, :] * scales[:, None]  # (numel, 2**b)
    best = (flat[:, None] - candidates).abs().min(dim=1).values
    chosen = (flat - nf_levels(b).double()[qt.codes().long()] * scales).abs()
    assert torch.all(chosen <= best + 1e-6 * scales + 1e-12)
    expected = nf_levels(b)[qt.codes().long()] * qt.scales().repeat_interleave(B0)
    assert torch.equal(qt.dequantize().reshape(-1), expected)
    if b0 == 2:  # the clamped case occurs: some stored scale below its block's absmax
        absmax = w.reshape(-1, B0).abs().amax(dim=1)
        assert (qt.scales() < absmax).any()


@pytest.mark.parametrize("b", [2, 3, 4])
def test_rounding_against_the_stored_scale_lowers_the_error(b):
    """Against codes rounded to the exact absmax and then dequantized with the stored scales (the old order,
    and bitsandbytes' for its own double quant): never worse, clearly better at b0 = 2."""
    w = _weights(b)
    for b0 in (2, 3, 4, 8):
        qt = quantize(w, QuantConfig(f"nf{b}", 64, dq_bits=b0, dq_dtype="fp32", dq_block_size=16))
        codes, _ = quantize_nf(w, b, 64)
        old = (nf_levels(b)[codes.long()].view(-1, 64) * qt.scales()[:, None]).view(w.shape)
        e_old = float(((w - old) ** 2).sum(dtype=torch.float64))
        e_new = float(((w - qt.dequantize()) ** 2).sum(dtype=torch.float64))
        assert e_new <= e_old * (1 + 1e-9)
        if b0 == 2:
            assert e_new < 0.97 * e_old


def test_dequantization_reads_stored_codes_as_they_are():
    """Folders saved before codes were rounded against the stored scales still dequantize to what they
    stored: dequantize looks up the codes and never re-rounds."""
    w = _weights(7)
    config = QuantConfig("nf3", 64, dq_bits=3, dq_dtype="bf16", dq_block_size=16)
    qt = quantize(w, config)
    codes, _ = quantize_nf(w, 3, 64)  # the old codes (rounded against the exact absmax)
    qt.tensors["codes"] = pack_bits(codes, 3)
    expected = (nf_levels(3)[codes.long()].view(-1, 64) * qt.scales()[:, None]).view(w.shape)
    assert torch.equal(qt.dequantize(), expected)
