"""One dequantization path: `QuantizedTensor.dequantize` and the forward's in-place `dequantize_into` are the
public `dequantize_nf` / `dequantize_int` (which read packed codes straight from the bytes, or unpacked ones)."""
from unittest import mock

import pytest
import torch

import qbara.quant.formats.intk
import qbara.quant.formats.nf
from qbara.quant import QuantConfig, dequantize_int, dequantize_nf, quantize

NF = [QuantConfig("nf4"), QuantConfig("nf2", 32), QuantConfig("nf3", 64), QuantConfig("nf8", 64),
      QuantConfig("nf4", 64, double_quant=True), QuantConfig("nf4", 64, dq_style="bnb")]
INT = [QuantConfig("int4", 32), QuantConfig("int2", 16), QuantConfig("int3", 32), QuantConfig("int5", 32),
       QuantConfig("int8", 32, minimum_dtype="fp32"), QuantConfig("int4", 4, block_rows=8)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weight():
    return torch.randn(48, 128, generator=torch.Generator().manual_seed(5)) * 0.05


@pytest.mark.parametrize("config", NF, ids=lambda c: c.label)
def test_nf_tensor_dequantizes_as_dequantize_nf_of_its_codes(config):
    qt = quantize(_weight(), config)
    codes, scales = qt.codes(), qt.scales()
    for dtype in DTYPES:
        want = dequantize_nf(codes, scales, config.bits, config.block_size, dtype)
        packed = dequantize_nf(qt.tensors["codes"], scales, config.bits, config.block_size, dtype, packed=True)
        assert torch.equal(packed, want) and torch.equal(qt.dequantize(dtype), want.view(qt.shape))
    out = torch.full((qt.numel,), float("nan"))  # 3-bit codes: computed aside, then written into out
    got = dequantize_nf(qt.tensors["codes"], scales, config.bits, config.block_size, packed=True, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(out, qt.dequantize().reshape(-1))


@pytest.mark.parametrize("config", INT, ids=lambda c: c.label)
def test_int_tensor_dequantizes_as_dequantize_int_of_its_codes(config):
    qt = quantize(_weight(), config)
    t, args = qt.tensors, (qt.shape, config.block_size, config.block_rows)
    codes = qt.codes()
    for dtype in DTYPES:
        want = dequantize_int(codes, t["scale"], t["minimum"], *args, dtype)
        assert torch.equal(dequantize_int(t["codes"], t["scale"], t["minimum"], *args, dtype, bits=config.bits), want)
        assert torch.equal(qt.dequantize(dtype), want)
    out = torch.full((qt.numel,), float("nan"))  # 2-D tiles and 3/5-bit codes: computed aside, then written
    got = dequantize_int(t["codes"], t["scale"], t["minimum"], *args, bits=config.bits, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(out.view(qt.shape), qt.dequantize())
    float_codes = codes.float()
    before = float_codes.clone()
    assert torch.equal(dequantize_int(float_codes, t["scale"], t["minimum"], *args), qt.dequantize())
    assert torch.equal(float_codes, before)  # the caller's codes are not written to


@pytest.mark.parametrize("config", [NF[0], NF[4], INT[0], INT[4]], ids=lambda c: c.label)
def test_dequantize_and_the_in_place_rebuild_call_the_public_primitives(config):
    qt = quantize(_weight(), config)
    name = "dequantize_nf" if config.kind == "nf" else "dequantize_int"
    module = qbara.quant.formats.nf if config.kind == "nf" else qbara.quant.formats.intk
    with mock.patch.object(module, name, wraps=getattr(module, name)) as spy:
        dense = qt.dequantize()
        into = qt.dequantize_into(torch.empty(qt.numel))
    assert spy.call_count == 2 and torch.equal(into, dense)


def test_out_buffer_must_be_fp32():
    qt = quantize(_weight(), QuantConfig("nf4"))
    with pytest.raises(ValueError, match="fp32"):
        dequantize_nf(qt.tensors["codes"], qt.scales(), 4, 64, packed=True, out=torch.empty(qt.numel).half())
    with pytest.raises(ValueError, match="fp32"):
        dequantize_nf(qt.tensors["codes"], qt.scales(), 4, 64, torch.bfloat16, packed=True,
                      out=torch.empty(qt.numel))
