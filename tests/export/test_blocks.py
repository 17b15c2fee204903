import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from qbara import QbaraError, QuantConfig, quantize
from qbara.quant import dequantize_int
from qbara.quant.ggml import dequantize_q8_0, pack_q4_1, pack_q5_1, quantize_q8_0


def q8_0(weight):
    """(int8 codes, fp16 d per block of 32) of a weight's Q8_0 blocks, and the blocks as numpy bytes."""
    raw = quantize_q8_0(weight).view(weight.shape[0], -1, 34)
    codes = raw[..., 2:].contiguous().view(torch.int8).reshape(weight.shape)
    return codes, raw[..., :2].contiguous().view(torch.float16).squeeze(-1), raw.reshape(weight.shape[0], -1).numpy()


def random_blocks(seed: int, bits: int):
    """Codes, fp16 scales and minima of a 3 x 64 weight in blocks of 32."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (3 * 64,), generator=gen, dtype=torch.uint8)
    return codes, (torch.rand(6, generator=gen) * 0.1).half(), (torch.randn(6, generator=gen) * 0.1).half()


def test_q4_1_layout_matches_gguf_reader():
    codes, scale, minimum = random_blocks(0, 4)
    raw = pack_q4_1(codes, scale, minimum, (3, 64)).numpy()
    assert raw.shape == (3, 40) and raw.dtype == np.uint8
    # block 0: d, m little-endian fp16, then element j low nibble / j + 16 high nibble of byte j
    assert raw[0, :2].tobytes() == scale[:1].numpy().astype("<f2").tobytes()
    assert raw[0, 2:4].tobytes() == minimum[:1].numpy().astype("<f2").tobytes()
    assert raw[0, 4] == int(codes[0]) | int(codes[16]) << 4
    want = dequantize_int(codes, scale, minimum, (3, 64), 32).numpy()
    assert np.array_equal(dequantize(raw, GGMLQuantizationType.Q4_1), want)


@pytest.mark.parametrize("fmt,pack,kind,bits", [("int4", pack_q4_1, GGMLQuantizationType.Q4_1, 5.0),
                                                 ("int5", pack_q5_1, GGMLQuantizationType.Q5_1, 6.0)])
def test_int_g32_of_a_quantized_tensor_is_exact(fmt, pack, kind, bits):
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(1))
    qt = quantize(w, QuantConfig(fmt, 32))
    raw = pack(qt.codes(), qt.tensors["scale"], qt.tensors["minimum"], qt.shape).numpy()
    assert np.array_equal(dequantize(raw, kind), qt.dequantize().numpy())
    assert raw.nbytes * 8 / qt.numel == qt.bits_per_param == bits  # 20 / 24 bytes per 32 weights


def test_q4_1_refuses_bad_shapes():
    with pytest.raises(QbaraError, match="multiple of 32"):
        pack_q4_1(torch.zeros(48, dtype=torch.uint8), torch.ones(1).half(), torch.zeros(1).half(), (1, 48))


def test_q5_1_layout_matches_gguf_reader():
    codes, scale, minimum = random_blocks(3, 5)
    raw = pack_q5_1(codes, scale, minimum, (3, 64)).numpy()
    assert raw.shape == (3, 48) and raw.dtype == np.uint8
    # block 0: d, m, then qh (bit j of a little-endian u32 = bit 4 of element j), then the low nibbles as Q4_1
    assert raw[0, :2].tobytes() == scale[:1].numpy().astype("<f2").tobytes()
    assert raw[0, 2:4].tobytes() == minimum[:1].numpy().astype("<f2").tobytes()
    qh = int.from_bytes(raw[0, 4:8].tobytes(), "little")
    assert [qh >> j & 1 for j in range(32)] == [int(c) >> 4 for c in codes[:32]]
    assert raw[0, 8] == (int(codes[0]) & 15) | (int(codes[16]) & 15) << 4
    want = dequantize_int(codes, scale, minimum, (3, 64), 32).numpy()
    assert np.array_equal(dequantize(raw, GGMLQuantizationType.Q5_1), want)


def test_q5_1_refuses_bad_shapes_and_codes():
    with pytest.raises(QbaraError, match="Q5_1 needs .* multiple of 32"):
        pack_q5_1(torch.zeros(48, dtype=torch.uint8), torch.ones(1).half(), torch.zeros(1).half(), (1, 48))
    with pytest.raises(QbaraError, match="5-bit"):
        pack_q5_1(torch.full((32,), 32, dtype=torch.uint8), torch.ones(1).half(), torch.zeros(1).half(), (1, 32))
    with pytest.raises(QbaraError, match="4-bit"):
        pack_q4_1(torch.full((32,), 16, dtype=torch.uint8), torch.ones(1).half(), torch.zeros(1).half(), (1, 32))


def test_q8_0_matches_gguf_reader_and_is_idempotent():
    w = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    w[1, :32] = 0.0  # an all-zero block
    codes, d, raw = q8_0(w)
    assert raw.shape == (5, 68)
    got = dequantize(raw, GGMLQuantizationType.Q8_0)
    assert np.array_equal(got, dequantize_q8_0(quantize_q8_0(w), (5, 64)).numpy())
    # half a step, plus up to 127 times the fp16 rounding of d
    step = d.float().repeat_interleave(32, dim=1).numpy()
    assert (np.abs(got - w.numpy()) <= step * (0.5 + 127 * 2.0**-11) + 1e-7).all()
    assert codes.abs().max() == 127
    again = q8_0(torch.from_numpy(got))  # a weight on the Q8_0 grid is reproduced exactly
    assert torch.equal(again[0], codes) and torch.equal(again[1], d)
