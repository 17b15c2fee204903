import numpy as np
import pytest
import torch

from qbara.quant import QuantConfig, dequantize_int, quantize, quantize_int


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("group_size,group_rows", [(32, 1), (64, 1), (32, 4)])
def test_int_round_trip_error_within_half_step(bits, group_size, group_rows):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(bits)) * 0.05
    codes, scale, minimum = quantize_int(w, bits, group_size, group_rows)
    assert scale.dtype == torch.float16 and minimum.dtype == torch.float16
    assert int(codes.max()) <= 2**bits - 1
    recon = dequantize_int(codes, scale, minimum, w.shape, group_size, group_rows)
    # Per element, the error is at most half a step, plus the fp16 rounding of min and scale.
    steps = scale.float().repeat_interleave(group_size * group_rows)
    blocks_err = _blockwise(recon - w, group_size, group_rows).abs()
    bound = scale.float()[:, None] * 0.5 + 1e-3 * _blockwise(w, group_size, group_rows).abs().amax(1, keepdim=True)
    assert torch.all(blocks_err <= bound), steps.max()


def _blockwise(x, g, r):
    d_out, d_in = x.shape
    return x.reshape(d_out // r, r, d_in // g, g).permute(0, 2, 1, 3).reshape(-1, r * g)


def test_int_block_min_and_max_are_hit():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    codes, scale, minimum = quantize_int(w, 4, 32)
    blocks = codes.reshape(8, 2, 32)
    assert torch.all(blocks.amin(-1) == 0) and torch.all(blocks.amax(-1) == 15)
    assert torch.equal(minimum, w.reshape(8, 2, 32).amin(-1).reshape(-1).half())


def test_constant_block_is_exact():
    w = torch.full((4, 64), 0.125)
    qt = quantize(w, QuantConfig("int4", block_size=32))
    assert torch.equal(qt.dequantize(), w)


def test_adding_a_constant_to_a_block_moves_only_the_minimum():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    qt = quantize(w, QuantConfig("int4", block_size=32))
    shifted = qt.dequantize() + 0.25
    qt.tensors["minimum"] = (qt.tensors["minimum"].float() + 0.25).half()
    err = (qt.dequantize() - shifted).abs().max()
    assert err <= 2e-3  # fp16 rounding of the moved minimum only


def _int5_reference(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """INT5 by its definition, in fp32 numpy: per 1 x G block s = fp16((max - min) / 31), m = fp16(min),
    q = clip(round((w - m) / s), 0, 31); returns (codes, s * q + m)."""
    blocks = w.astype(np.float32).reshape(w.shape[0], -1, group)
    lo, hi = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
    s = ((hi - lo) / np.float32(31)).astype(np.float16).astype(np.float32)
    m = lo.astype(np.float16).astype(np.float32)
    q = np.clip(np.round((blocks - m) / s), 0, 31)
    return q.astype(np.uint8).reshape(w.shape), (s * q + m).astype(np.float32).reshape(w.shape)


@pytest.mark.parametrize("group", [32, 64])
def test_int5_equals_a_dense_reference_formula(group):
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(group)) * 0.05
    qt = quantize(w, QuantConfig("int5", block_size=group))
    codes, want = _int5_reference(w.numpy(), group)
    assert qt.tensors["codes"].numel() == 24 * 128 * 5 // 8  # packed: 5 bits per code
    assert np.array_equal(qt.codes().reshape(24, 128).numpy(), codes)
    assert np.array_equal(qt.dequantize().numpy(), want)
    assert codes.max() == 31 and (np.abs(want - w.numpy()) > 0).any()
    assert qt.bits_per_param == QuantConfig("int5", block_size=group).bits_per_param == 5 + 32 / group
