"""dq_style="bnb": bitsandbytes' NF4 double quantization (`compress_statistics=True`) reproduced bit for bit."""
import pytest
import torch

from qbara.errors import QbaraError
from qbara.quant import QuantConfig, quantize
from qbara.quant.dq_bnb import dynamic_dequantize, dynamic_map, dynamic_quantize
from qbara.quant.nf import round_nf
from qbara.quant.packing import pack_bits

BNB = QuantConfig("nf4", 64, dq_style="bnb")


def _bnbf():
    return pytest.importorskip("bitsandbytes.functional")


def _weight(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 0.05  # spread block absmaxes
    w[0, : min(64, shape[1])] = 0.0  # an all-zero block
    return w.to(dtype)


# ------------------------------------------------------------------ config


def test_config_label_bits_and_dict_round_trip():
    assert BNB.double_quant and BNB.label == "nf4-b64-dq8/fp32/256-bnb" != QuantConfig("nf4").label
    assert round(BNB.bits_per_param, 3) == 4.127 == round(QuantConfig("nf4").bits_per_param, 3)
    assert QuantConfig.from_dict(BNB.to_dict()) == BNB and BNB.to_dict()["dq_style"] == "bnb"


def test_default_style_is_recorded_as_before_and_old_records_load():
    old = {"format": "nf4", "block_size": 64, "block_rows": 1, "double_quant": True, "dq_bits": 8,
           "dq_block_size": 256, "dq_dtype": "fp32", "minimum_dtype": "fp16"}
    assert QuantConfig("nf4").to_dict() == old  # no dq_style key: files and cache keys unchanged
    loaded = QuantConfig.from_dict(old)
    assert loaded == QuantConfig("nf4") and loaded.dq_style == "qbara"
    assert set(quantize(torch.randn(8, 64), loaded).tensors) == {"codes", "absmax_codes", "absmax_group_max",
                                                                 "absmax_offset"}


@pytest.mark.parametrize("kwargs,message", [
    ({"format": "nf3"}, r"use format 'nf4' \(bitsandbytes has no nf3\), or use dq_style='qbara'"),
    ({"format": "int4", "block_size": 32}, "use format 'nf4'"),
    ({"double_quant": False}, "set double_quant=True, or drop dq_style"),
    ({"block_size": 16}, "no NF4 block size 16; use one of 32, 64"),
    ({"dq_bits": 4}, r"got \{'dq_bits': 4\}: leave them at these defaults"),
    ({"dq_block_size": 64}, "dq_block_size=256"),
    ({"dq_dtype": "bf16"}, "dq_dtype='fp32'"),
    ({"dq_style": "gguf"}, "dq_style must be one of qbara, bnb"),
])
def test_what_bitsandbytes_cannot_hold_is_refused_with_the_fix(kwargs, message):
    with pytest.raises(QbaraError, match=message):
        QuantConfig(**{"format": "nf4", "block_size": 64, "dq_style": "bnb", **kwargs})


def test_measured_bits_per_param():
    qt = quantize(_weight((64, 256 * 4), 0), BNB)  # 1024 blocks: 4 nested blocks
    assert set(qt.tensors) == {"codes", "absmax_codes", "nested_absmax", "absmax_offset"}
    assert qt.tensors["absmax_codes"].dtype == torch.uint8 and qt.tensors["nested_absmax"].dtype == torch.float32
    assert qt.bits_per_param == pytest.approx(BNB.bits_per_param + 32 / qt.numel)  # + the one fp32 offset


# ------------------------------------------------------------------ against bitsandbytes


def test_dynamic_map_equals_bitsandbytes():
    assert torch.equal(dynamic_map(), _bnbf().create_dynamic_map())


def test_dynamic_quantize_equals_bitsandbytes_quantize_blockwise():
    F = _bnbf()
    g = torch.Generator().manual_seed(0)
    grid = torch.linspace(-1, 1, 255 * 400)  # every 1/50000 of [-1, 1], each in a block of absmax 1
    probes = [torch.cat([torch.ones(400, 1), grid.view(400, 255)], 1).reshape(-1)]
    probes += [torch.randn(n, generator=g) * 10.0 ** float(e) for n, e in [(1, 0), (300, -3), (2999, 2), (256, -6)]]
    probes += [torch.cat([torch.zeros(256), torch.randn(100, generator=g)])]  # a block of zeros
    for x in probes:
        codes, absmax = dynamic_quantize(x)
        ref, state = F.quantize_blockwise(x, blocksize=256)
        assert torch.equal(codes, ref) and torch.equal(absmax, state.absmax)
        assert torch.equal(dynamic_dequantize(codes, absmax), F.dequantize_blockwise(ref, state))


@pytest.mark.parametrize("shape,block,dtype", [
    ((96, 512), 64, torch.float32),     # 768 blocks: 3 whole nested blocks
    ((300, 64), 64, torch.float32),     # 300 blocks: a partial nested block
    ((7, 4096), 64, torch.float32),     # 448 blocks
    ((250, 320), 32, torch.float32),    # 2500 blocks of 32
    ((64, 1024), 256, torch.float32),   # 256 blocks of 256
    ((40, 192), 64, torch.bfloat16),    # 120 blocks, a bf16 weight
])
def test_quantize_equals_bitsandbytes_compress_statistics(shape, block, dtype):
    F = _bnbf()
    w = _weight(shape, shape[0], dtype)
    ref, state = F.quantize_4bit(w, blocksize=block, compress_statistics=True, quant_type="nf4")
    qt = quantize(w, QuantConfig("nf4", block, dq_style="bnb"))
    t = qt.tensors
    assert torch.equal(t["codes"], ref.reshape(-1))
    assert torch.equal(t["absmax_codes"], state.absmax)
    assert torch.equal(t["nested_absmax"], state.state2.absmax)
    assert torch.equal(t["absmax_offset"], state.offset.reshape(1))
    expected = F.dequantize_4bit(ref, state)
    assert torch.equal(qt.scales(), F.dequantize_blockwise(state.absmax, state.state2) + state.offset)
    assert torch.equal(qt.dequantize(expected.dtype), expected)
    if dtype == torch.float32:
        assert torch.equal(qt.dequantize_into(torch.empty(qt.numel)), expected)


def test_codes_are_rounded_against_the_exact_absmax_as_bitsandbytes_does():
    """Measured on bitsandbytes 0.50: quantize_4bit rounds the codes first and compresses the scales after,
    so its codes are the fp32-absmax codes, not the nearest levels for the scales it stores."""
    F = _bnbf()
    w = _weight((96, 512), 1)
    ref, _ = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    qt = quantize(w, BNB)
    plain = quantize(w, QuantConfig("nf4", 64, double_quant=False))
    assert torch.equal(qt.tensors["codes"], plain.tensors["codes"])
    assert torch.equal(ref.reshape(-1), qt.tensors["codes"])
    against_stored = pack_bits(round_nf(w, 4, 64, qt.scales()), 4)
    assert not torch.equal(against_stored, qt.tensors["codes"])


# ------------------------------------------------------------------ other paths


def test_lq_alternation_uses_the_bnb_quantizer():
    from qbara.lq.decompose import quantize_step
    from qbara.lq.tables import matrix_costs

    R = _weight((32, 256), 2)
    assert torch.equal(quantize_step(BNB)(R)[0], quantize(R, BNB).dequantize())
    costs = matrix_costs(R, [BNB, QuantConfig("nf4")], rank=2, iters=2)
    assert torch.isfinite(costs).all() and costs[0] != costs[1]
